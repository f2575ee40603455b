"""`TorchrunBackend`: the loop as one of the processes that `torchrun` starts, one per GPU
(NCCL) or several on a CPU (gloo), on one host or many; each holds the whole model and DDP
averages the gradients. sharding.py's `FsdpBackend` builds on it."""
import contextlib
import datetime
import gc
import os

import torch

from runtime.backends import Backend
from runtime.errors import ReplicaLost, first_line


JOIN_TIMEOUT = datetime.timedelta(seconds=60)  # from the first process's arrival to the last's
SAYS_WHY = "it says why in its own output, or its torchrun does"


class TorchrunBackend(Backend):
    """One of the processes that `torchrun` starts: one per GPU (NCCL), or several on a CPU
    (gloo), on one host or many. Every process runs the whole script; RANK, LOCAL_RANK and
    WORLD_SIZE in its environment say which it is."""

    def __init__(self, kind, precision, activation_checkpointing=False):
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if kind == "cuda":
            torch.cuda.set_device(local_rank)  # before NCCL starts: its GPU is this one
        super().__init__(kind, precision, activation_checkpointing)
        self.device = torch.device(kind, local_rank if kind == "cuda" else None)
        # Gradients and losses live on the GPU and go through NCCL; flags and barrier
        # payloads are CPU tensors and go through gloo, so agreeing on a stop never waits
        # for the GPU's queue.
        self.join("cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo")
        # Every process takes the first one's precision: hosts with and without AMX would
        # otherwise differ.
        self.precision = self.barrier("started", self.precision)[0]

    def join(self, group):
        """Meet the others within JOIN_TIMEOUT, not torch's 30 minutes: torchrun starts them
        all at once, so one missing by then has failed (and says why). Once all are here,
        one that ends closes its connections, and the others' next collective fails at
        once; the default timeout then lets a long save keep the others waiting."""
        try:
            self.dist.init_process_group(group, timeout=JOIN_TIMEOUT)
        except self.dist.DistError as e:
            raise ReplicaLost(f"not all {self.world_size} processes of the run started within "
                              f"{JOIN_TIMEOUT.seconds} s ({first_line(e)}); {SAYS_WHY}") from None
        c10d = self.dist.distributed_c10d
        c10d._set_pg_timeout(c10d._get_default_timeout(self.dist.Backend(group)))

    @contextlib.contextmanager
    def collective(self, what):
        """A failed collective, as one line: another process has ended or is unreachable."""
        try:
            yield
        except RuntimeError as e:  # gloo's and the store's errors (DistError is one too)
            raise ReplicaLost(f"another process of the run ended or cannot be reached ({what}: "
                              f"{first_line(e)}); {SAYS_WHY}") from None

    def describe(self):
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        group = "NCCL" if self.device.type == "cuda" else "gloo"
        return (f"{self.device.type} ({name}), torchrun: {self.world_size} processes over "
                f"{group}, {self.precision}")

    def distribute(self, model):
        # DDP rather than one all-reduce after the backward: it all-reduces the gradients in
        # buckets while the backward still computes the earlier layers', which hides most of
        # the communication on GPUs, and averages them over the processes, as train_step
        # expects. Buffers are not broadcast: GPT-2's are constants.
        self.checkpoint_activations(model)
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def gradient_sync(self, model, sync):
        # DDP reads the flag in the forward: no_sync() there leaves that backward's gradients
        # in place, to be summed with the next micro-batch's.
        return contextlib.nullcontext() if sync else model.no_sync()

    def reduce_gradients(self, optimizer):
        pass  # DDP averaged them in the backward (gradient_sync)

    def all_reduce_sum(self, tensor):
        tensor = tensor.clone()  # all_reduce works in place
        with self.collective("a sum"):
            self.dist.all_reduce(tensor)
        return tensor

    def any_replica(self, flag):
        flag = torch.tensor([float(flag)])  # on the CPU: gloo, no wait for the GPU
        with self.collective("agreeing on a flag"):
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return flag.item() > 0

    def barrier(self, name, payload=b""):
        payloads = [None] * self.world_size
        with self.collective(f"barrier {name!r}"):
            self.dist.all_gather_object(payloads, payload)
        return payloads

    def seed_step(self, step):
        """From the first step on, each process draws dropout masks of its own, as one
        device does for the rows of one batch; a resumed run restores each process's
        generator instead (rng_state_<rank>.pt)."""
        if step == 0:
            torch.manual_seed(self.base_seed + 1_000_003 * self.rank)

    def close(self):
        # What used the process group (DDP's reducer, FSDP's shards) must be gone before it
        # is destroyed: freed later, at the interpreter's exit, it now and then ended a
        # finished run with SIGABRT ("terminate called without an active exception").
        # FSDP's hooks keep the model in reference cycles, which only a collection frees.
        gc.collect()
        self.dist.destroy_process_group()

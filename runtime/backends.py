"""Where the loop runs: the one place that chooses the device, and the only code that knows
which one it is on. `Backend` is the CPU or one CUDA GPU in one process; `XlaBackend`
overrides what differs when the same loop runs on every core of a TPU host, one replica per
core through `xmp.spawn` (the replicas then all-reduce gradients and losses, meet at
barriers and agree on when to stop); torchrun.py's `TorchrunBackend` does the same for the
processes that `torchrun` starts, and sharding.py's `FsdpBackend` shards the model over
them. launch.py starts them all.

A CPU/GPU-only copy of the loop can drop `XlaBackend` and xla_sharding.py; a single-process
one torchrun.py, sharding.py and agreement.py too (docs/adapting.md).
"""
import contextlib
import importlib.util
import os

import torch

from model import cpu_copy, cpu_state_dict, load_model
from options import check_launch_variables, started_by_torchrun, xla_accelerator
from runtime.activations import checkpoint_blocks
from runtime.errors import InputError, first_line
from runtime.hardware import fast_bf16, keep_freed_memory
from runtime.signals import StopRequested, StopSignal


def choose_device(device, tpu_cores=None, compile_flag=False, fsdp=False):
    """'xla', 'cuda' or 'cpu' for `--device` and the tutorial's `--tpu_cores`. Under torchrun
    (its variables in the environment) this process is one of several, on a GPU of its own
    or on the CPU: `run_process` joins it to the others. Flags that would do nothing on the
    device chosen are refused (--compile on XLA and --fsdp in one process here, --tpu_cores
    in options.check_args)."""
    check_launch_variables()
    if device != "auto":
        kind = device
    elif tpu_cores == 0 or started_by_torchrun():
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif tpu_cores or xla_accelerator():
        kind = "xla"
    else:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if kind == "xla" and started_by_torchrun():
        raise InputError("torchrun starts CPU or GPU processes; on a TPU run `python train.py` "
                         "(on every host of a pod), which starts a replica per core itself")
    if kind == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise InputError("--device xla: torch_xla is not installed; "
                         "pip install torch_xla with the same version as torch")
    if kind == "cuda" and started_by_torchrun():
        check_gpu_per_process()
    if kind == "xla" and compile_flag:
        raise InputError("--compile does nothing on XLA, which compiles every step already; "
                         "leave it out")
    if fsdp and kind != "xla" and not started_by_torchrun():
        raise InputError("--fsdp shards the model over the processes of a run: start it "
                         "with torchrun (torchrun --nproc_per_node N train.py --fsdp ...), "
                         "or leave --fsdp out")
    return kind


def first_on_host():
    """True but in torchrun's processes after the first on each host (LOCAL_RANK 0), which
    alone prepares the run, holds the directory lock and prints the errors that every
    process raises together."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def check_gpu_per_process():
    processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if processes > gpus:
        if not first_on_host():
            raise SystemExit(1)  # the first process says why
        raise InputError(f"torchrun --nproc_per_node {processes}: this host has {gpus} "
                         f"GPU{'s' * (gpus != 1)}, one per process; use --nproc_per_node "
                         f"{gpus} or fewer")


class Backend:
    """The CPU or one CUDA GPU, in one process."""
    world_size = 1
    rank = 0
    fixed_shapes = False  # batches may be cut to their longest example
    shards_model = False  # each replica holds the whole model (runtime/sharding.py: not so)
    reshards = False  # loads a sharded checkpoint on another number of replicas
    keeps_freed_memory = True  # on the CPU, for the next step (runtime/hardware.py)

    def __init__(self, kind, precision, activation_checkpointing=False):
        self.device = torch.device(kind)
        self.precision = precision or ("bf16" if fast_bf16(kind) else "fp32")
        self.activation_checkpointing = activation_checkpointing
        if kind == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        if kind == "cpu" and self.keeps_freed_memory:
            keep_freed_memory()

    @property
    def is_master(self):
        return self.rank == 0

    def describe(self):
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        return f"{self.device.type} ({name}), {self.precision}"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def compile(self, fn):
        """`fn` compiled by torch.compile when first called. Inductor needs a working C++
        compiler there (on a GPU too, for Triton's launcher): without one it fails with
        pages of traceback, which become one line."""
        compiled = torch.compile(fn)

        def run(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                raise InputError(f"--compile: torch.compile failed ({first_line(e)}); install "
                                 f"a C++ compiler (g++, or name yours in CXX) or leave out "
                                 f"--compile") from None
        return run

    def load_model(self, name, tokenizer, resuming=False):
        """`name`'s model on this device; `resuming`: `name` is the checkpoint resumed."""
        return load_model(name, tokenizer, device=self.device, resuming=resuming)

    def full_state_dict(self, model):
        """The whole model's weights on the CPU, on the master (None elsewhere)."""
        return cpu_state_dict(model) if self.is_master else None

    def distribute(self, model):
        """The model that the loss's forward and backward run through: here the model itself
        (TorchrunBackend wraps it). Evaluation and saving use `model`, unwrapped."""
        return self.checkpoint_activations(model)

    def checkpoint_activations(self, model):
        """--activation_checkpointing, set on the model before any wrapper goes around it."""
        if self.activation_checkpointing:
            checkpoint_blocks(model, xla=self.device.type == "xla")
        return model

    def gradient_sync(self, model, sync):
        """Around a micro-batch's forward: whether its backward all-reduces the gradients
        (DDP's, in the last micro-batch of a step only). Nothing to sync here."""
        return contextlib.nullcontext()

    def optimizer(self, param_groups, lr):
        # Fused: one kernel updates every parameter, on the GPU and on the CPU alike; the
        # default per-parameter loop makes the CPU's optimizer step about 4x slower.
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)

    def clip_gradients(self, model, max_norm):
        """At most `max_norm` for the norm of all of `model`'s gradients (DDP's, FSDP2's)."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def feed(self, loader):
        """Batches on the device; pinned host memory lets the copy overlap compute."""
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def pin_memory(self):
        return self.device.type == "cuda"

    def all_reduce_sum(self, tensor):
        return tensor

    def reduce_gradients(self, optimizer):
        pass

    def any_replica(self, flag):
        """True when `flag` is true on any replica (a host read on XLA: call it rarely)."""
        return flag

    def stoppable(self, batches):
        """`batches`, cut short by StopRequested once Ctrl-C or SIGTERM arrives: an
        evaluation of 50,000 reviews on a CPU takes minutes, too long to keep a signal
        waiting. (Reading a Python flag costs nothing, so every batch checks.)

        Several replicas must leave an evaluation together, inside its collectives, and
        agreeing costs a device read (their shards may also differ by a batch): they finish
        it and stop at the next report step. Evaluation is short there anyway, shared among
        the replicas."""
        if self.world_size > 1:
            yield from batches
            return
        for batch in batches:
            if StopSignal.signum is not None:
                raise StopRequested
            yield batch

    def on_host(self, fn, *args):
        """Run `fn(*args)` where it may read tensors: now here, after the step on XLA."""
        fn(*args)

    def barrier(self, name, payload=b""):
        """Wait until every replica is here; returns every replica's `payload`, by rank."""
        return [payload]

    def sync(self):
        """Finish the work queued on the device (XLA runs a step's graph lazily)."""

    def seed(self, seed):
        """The same seed on every replica while it sets up, so that all build one model."""
        torch.manual_seed(seed)
        self.base_seed = seed

    def seed_step(self, step):
        """Called before each optimizer step. The CPU and CUDA generators are restored
        exactly on resume, so there is nothing to do."""

    def rng_state(self):
        cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def set_rng_state(self, state):
        # What was saved on this kind of device; one saved on another kind restores nothing
        # (the run continues, no longer bit for bit).
        if "cpu" in state:
            torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def generation_model(self, model):
        """The model that `generate` samples from (in eval mode), on the master; every
        replica calls it. Here the model itself."""
        return model


class XlaBackend(Backend):
    """PyTorch/XLA: one replica per TPU chip (or core). Replicas are processes, or threads
    of one process (two per process on TPU v2/v3 hosts, all of them on XLA:CPU)."""
    fixed_shapes = True  # few shapes, each compiled once
    pin_layout = True  # of the all-reduces: one graph may not mix pinned and unpinned ones

    def __init__(self, precision, activation_checkpointing=False):
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.runtime as xr
        self.torch_xla, self.xm, self.pl = torch_xla, xm, pl
        self.device = torch_xla.device()
        self.world_size = xr.world_size()
        self.rank = xr.global_ordinal()
        self.hardware = xr.device_type()
        if precision is None:
            precision = "bf16" if self.hardware == "TPU" else "fp32"
        self.precision = precision
        self.activation_checkpointing = activation_checkpointing

    def describe(self):
        return f"xla ({self.hardware}, {self.world_size} replicas), {self.precision}"

    def compile(self, fn):
        return fn  # every step is compiled into one graph already

    def optimizer(self, param_groups, lr):
        return torch.optim.AdamW(param_groups, lr=lr)

    def feed(self, loader):
        # Copies batches to the device in the background and cuts the graph after each.
        return self.pl.MpDeviceLoader(loader, self.device)

    pin_memory = False

    def all_reduce_sum(self, tensor):
        return self.xm.all_reduce(self.xm.REDUCE_SUM, tensor, pin_layout=self.pin_layout)

    def reduce_gradients(self, optimizer):
        # xm.optimizer_step would reduce and step in one call; reducing first lets the
        # gradient be clipped by its global norm, the same on every replica.
        self.xm.reduce_gradients(optimizer)

    def any_replica(self, flag):
        if self.world_size == 1:
            return flag
        # One element, not a 0-d scalar: torch_xla bakes 0-d values into the graph, and
        # replicas holding different flags would then compile different graphs.
        flag = torch.tensor([float(flag)], device=self.device)
        return self.xm.all_reduce(self.xm.REDUCE_MAX, flag, pin_layout=self.pin_layout).item() > 0

    def on_host(self, fn, *args):
        self.xm.add_step_closure(fn, args)

    def barrier(self, name, payload=b""):
        return self.xm.rendezvous(name, payload)

    def sync(self):
        # Otherwise each tensor read back (weights for a checkpoint) would compile and run
        # a graph of its own.
        self.torch_xla.sync()

    def seed_step(self, step):
        """XLA moves its device generator on at every graph cut (each sync, barrier or host
        read), so after a resume, which cuts the graph a different number of times, the
        generator would be elsewhere. Keying dropout's random stream to (seed, replica,
        step) makes a resumed run draw the very masks an uninterrupted one draws, and
        each replica draw its own. Setting the seed compiles nothing new."""
        self.xm.set_rng_state(self.base_seed + 1_000_003 * (step * self.world_size + self.rank),
                              self.device)

    # The CPU generator is one per process, shared by replicas that are threads, and the
    # step draws nothing from it on XLA (dropout uses the device's): only the device's
    # generator is this replica's own. seed_step sets it before every step, so what is
    # restored here matters only until then (evaluation draws nothing either).
    def rng_state(self):
        return {"xla": self.xm.get_rng_state(self.device)}

    def set_rng_state(self, state):
        if "xla" in state:
            self.xm.set_rng_state(state["xla"], self.device)

    def generation_model(self, model):
        """A copy on the CPU, on the master (None elsewhere; every replica calls it):
        `generate` on XLA compiles a graph for almost every token."""
        return cpu_copy(model) if self.is_master else None

"""--fsdp: the model's parameters, gradients and optimizer state sharded over the processes
that torchrun starts (PyTorch's FSDP2, `fully_shard`), so that a model too large for one
device trains with the same loop; and what goes with it: the weights read once per run and
sent to the others, checkpoints that each process writes its shard of
(torch.distributed.checkpoint), and the whole model gathered where one process needs it.

    checkpoint-<step>/   config.json, tokenizer files, shards/ (torch.distributed.checkpoint:
                         the model and the optimizer), training_state.pt, rng_state_<rank>.pt
"""
import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.accelerate import init_empty_weights

from model import (LOADING, SHARDS, from_config, from_pretrained, is_sharded, load_model,
                   packs_reviews, splits_off_output_layer)
from runtime.torchrun import TorchrunBackend
from runtime.errors import CheckpointError, InputError, first_line

# torch.distributed.checkpoint's own writer calls the deprecated tensor.storage(): a warning
# per save that says nothing about the run.
TYPED_STORAGE_WARNING = "TypedStorage is deprecated"


class FsdpBackend(TorchrunBackend):
    """One of torchrun's processes, holding 1/world_size of every parameter, of its
    gradient and of AdamW's moments. Each block's weights are gathered just before its
    forward and its backward and freed after them; the backward reduce-scatters the
    gradients, so each process updates its own shard only."""
    shards_model = True
    reshards = True  # torch.distributed.checkpoint reshards on load
    # Kept, the memory freed by whole-model phases that run once (the weights sent to the
    # shards; each gathered for an evaluation or a save) stays held in pieces that the
    # shards' tensors reuse only in part: a 774M model's 2 processes held 4 GiB more each.
    keeps_freed_memory = False

    def __init__(self, kind, precision, activation_checkpointing=False):
        super().__init__(kind, precision, activation_checkpointing)
        self.weights = None     # the master's whole model, from load_model to distribute
        self.resuming = False   # from a sharded checkpoint: load_shards fills the weights
        self.model_class = None
        self.model = None       # the model distribute sharded (restore loads its shards)

    def describe(self):
        return f"{super().describe()}, sharded (FSDP)"

    def load_model(self, name, tokenizer, resuming=False):
        """The weights are read once per run, not once per process: the master loads the
        model on the CPU, the others build it with its parameters on the meta device (no
        memory), and `distribute` sends each process its shards. From a sharded checkpoint
        the weights come from its shards (`load_shards`); the master then builds a randomly
        initialised model, whose traits (packing, the output layer) it finds as on a fresh
        start. A refusal on the master (a model that sees the future, say) reaches all."""
        self.resuming = resuming and is_sharded(name)
        config = from_pretrained(AutoConfig, name, "--resume" if self.resuming else
                                 "--pretrained_model_name")
        error = traits = None
        if self.is_master:
            try:
                model = from_config(config) if self.resuming else load_model(name, tokenizer)
                traits = splits_off_output_layer(model), packs_reviews(model)
            except InputError as e:
                error = str(e)
        else:
            with LOADING, init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.tie_weights()  # built on meta it is not tied (GPT-2's output layer = wte)
        error, traits = self.barrier("model-loaded", (error, traits))[0]
        if error is not None:
            raise InputError(error)
        model.output_layer_splits_off, model.packing_works = traits  # as the master found
        self.model_class = type(model)
        if self.is_master and not self.resuming:
            self.weights = model.state_dict()
        return model

    def distribute(self, model):
        """FSDP2 on every transformer block (the classes the model names in
        `_no_split_modules`: what must stay whole on one device), then on the root, which
        holds the embeddings, the final norm and the output layer. Under bf16, the gathered
        weights and the activations are bf16, the master weights and the reduced gradients
        fp32."""
        self.checkpoint_activations(model)  # inside each block, so before it is sharded
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.precision == "bf16" else MixedPrecisionPolicy())
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if not self.is_master:
            materialize(model, self.device)
        if not self.resuming:  # the master's weights, one tensor at a time, to every shard
            set_model_state_dict(model, self.weights or {}, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
        self.weights, self.model = None, model
        return model

    def close(self):
        self.model = None  # before the process group goes (TorchrunBackend.close)
        super().close()

    def gradient_sync(self, model, sync):
        # Without sync, the backward keeps the gradients unsharded, to be summed with the
        # next micro-batch's; the last one's reduce-scatters the sum.
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def reduce_gradients(self, optimizer):
        pass  # the backward reduce-scattered them (gradient_sync)

    def feed(self, loader):
        """Every forward gathers weights from all processes, so every process must run as
        many as the others: one whose share of the validation set is a batch shorter runs
        one that scores nothing (training batches are equal in number everywhere)."""
        most = torch.tensor([len(loader)])
        with self.collective("agreeing on the batches"):
            self.dist.all_reduce(most, op=self.dist.ReduceOp.MAX)
        yield from super().feed(loader)
        for _ in range(int(most) - len(loader)):
            yield {k: v.to(self.device) for k, v in nothing_to_score(loader.dataset[[0]]).items()}

    def full_state_dict(self, model):
        """The whole model's weights on the master's CPU (None elsewhere): every process
        sends its shards, one tensor at a time, so no device holds the whole model. Each
        tied tensor once, as model.cpu_state_dict does."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not self.is_master:
            return None
        unique = {name for name, _ in model.named_parameters()}
        unique |= {name for name, _ in model.named_buffers()}
        return {name: tensor for name, tensor in state.items() if name in unique}

    def generation_model(self, model):
        """A whole copy on the master's CPU (a process alone cannot run the sharded model:
        each forward needs every process), which may not fit on one device."""
        state = self.full_state_dict(model)
        if not self.is_master:
            return None
        with LOADING:
            return self.model_class.from_pretrained(None, config=model.config,
                                                    state_dict=state).eval()

    def save_shards(self, model, optimizer, folder):
        """Each process writes its shards of the model and of the optimizer's state into
        `folder`/shards; a write that fails on any process raises OSError on every one."""
        model_state, optimizer_state = get_state_dict(model, optimizer)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", TYPED_STORAGE_WARNING, UserWarning)
                dcp.save({"model": model_state, "optimizer": optimizer_state},
                         checkpoint_id=Path(folder) / SHARDS)
        except CheckpointException as e:  # a BaseException: its first failure, as one line
            rank, (error, _) = next(iter(e.failures.items()))
            raise OSError(f"process {rank}: {first_line(error)}") from None

    def load_shards(self, model, optimizer, folder):
        """The model's and the optimizer's shards from `folder`, resharded when the
        checkpoint was written by another number of processes."""
        if not (Path(folder) / SHARDS / ".metadata").is_file():
            raise CheckpointError(f"--resume: {folder} was written by XLA replicas (--fsdp "
                                  f"on a TPU host); resume it there, or start a new "
                                  f"--downstream_model_dir")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=Path(folder) / SHARDS)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def materialize(model, device):
    """Storage on `device` for the parameters built on the meta device (the master's
    weights fill it next). The buffers were built real and are kept: the non-persistent
    ones (Llama's rotary inv_freq) are in no state dict, so nothing would fill them."""
    buffers = list(model.named_buffers(remove_duplicate=False))
    model.to_empty(device=device)
    for name, buffer in buffers:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)


def nothing_to_score(batch):
    """`batch` with no token trained (labels -100, which the loss ignores) and no review
    scored (polarity -1): it adds 0 to every sum."""
    batch = dict(batch)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    if "polarity" in batch:
        batch["polarity"] = torch.full_like(batch["polarity"], -1)
    return batch

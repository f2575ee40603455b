"""--fsdp: parameters, gradients and optimizer state sharded over the run's replicas, so
that each holds 1/N of them. `XlaFsdpBackend` does it for the XLA replicas of a TPU host
with PyTorch/XLA's FSDP (`XlaFullyShardedDataParallel`), every transformer block a unit of
its own and the root holding the rest. The loop calls it as it calls XlaBackend.
"""
import functools
import types
from pathlib import Path

import torch

from model import LOADING, SHARDS, load_model, to_cpu
from runtime.backends import XlaBackend
from runtime.errors import CheckpointError, InputError


class XlaFsdpBackend(XlaBackend):
    """XlaBackend with the model sharded by PyTorch/XLA's FSDP: every replica keeps its shard
    of each parameter (fp32), gathers a block's full parameters just before the block runs
    (in bf16 when the precision is bf16) and reduce-scatters its gradient in the backward."""
    shards_model = True

    def __init__(self, precision, activation_checkpointing=False):
        super().__init__(precision, activation_checkpointing)
        # Pinned layouts make FSDP's all-gather an all-reduce of a tensor padded by the
        # replica's ordinal: each replica then compiles a graph of its own, and on XLA:CPU,
        # where replicas are threads whose collectives meet by graph, they never meet.
        self.pin_layout = self.hardware != "CPU"

    def describe(self):
        return super().describe() + ", FSDP"

    def load_model(self, name, tokenizer, resuming=False):
        """On the CPU: distribute moves each replica's shards alone onto its device, so that
        no device holds the whole model."""
        return load_model(name, tokenizer, resuming=resuming)

    def distribute(self, model):
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as FSDP
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        blocks = {type(m) for m in model.modules()
                  if type(m).__name__ in (model._no_split_modules or [])}
        self.checkpoint_activations(model)  # inside each block, so before it is wrapped
        bf16 = self.precision == "bf16"
        with LOADING:  # from_pretrained, in another replica thread, patches register_parameter
            self.root = FSDP(
                model,
                auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                   transformer_layer_cls=blocks),
                compute_dtype=torch.bfloat16 if bf16 else None, fp32_reduce_scatter=bf16,
                pin_layout_in_collective_ops=self.pin_layout)
        route_calls_through(model, self.root)
        self.model = model  # what restore loads the shards of
        return self.root

    def optimizer(self, param_groups, lr):
        """AdamW over the shards, which the root holds (the embeddings' are not the model's
        any more) and which are all flat: weight decay goes by the full parameter's shape,
        on matrices only, as train.param_groups decides it."""
        decay = param_groups[0]["weight_decay"]
        shards = [p for p in self.root.parameters() if p.requires_grad]
        return super().optimizer(
            [{"params": [p for p in shards if len(p._orig_size) >= 2], "weight_decay": decay},
             {"params": [p for p in shards if len(p._orig_size) < 2], "weight_decay": 0.0}],
            lr)

    def feed(self, loader):
        """Every forward gathers the weights with the other replicas: a replica with a batch
        more than another would wait for it forever. Training's are the same in number;
        an evaluation's shares differ by an example when the examples do not divide."""
        counts = [int(c) for c in self.barrier("batches", str(len(loader)).encode())]
        if len(set(counts)) > 1:
            raise InputError(f"--fsdp: the replicas' shares of an evaluation have "
                             f"{min(counts)} to {max(counts)} batches, and each must run as "
                             f"many as the others; use an --eval_size and "
                             f"--polarity_eval_size that {self.world_size} x --batch_size "
                             f"divides")
        return super().feed(loader)

    def reduce_gradients(self, optimizer):
        pass  # the backward reduce-scattered them: each replica holds its shard of the mean

    def clip_gradients(self, model, max_norm):
        # Each replica holds a shard of every gradient: the norm is summed over them all.
        return self.root.clip_grad_norm_(max_norm)

    def full_state_dict(self, model):
        """The whole model's weights on the CPU on the master (None elsewhere), one unit's
        parameters at a time, so that no device holds more than one unit in full. Every
        replica must call it: the shards are gathered with an all-gather."""
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as FSDP
        state = {}
        for prefix, unit in self.root.named_modules():
            if not isinstance(unit, FSDP):
                continue
            gathered = [(p, self.xm.all_gather(p.detach(), pin_layout=self.pin_layout))
                        for p in unit.sharded_params]
            self.sync()
            for shard, full in gathered:
                name = original_name(f"{prefix}.{shard._orig_name}".lstrip("."))
                if self.is_master:
                    state[name] = full[:shard._orig_size.numel()].view(shard._orig_size).cpu()
        self.sync()
        if not self.is_master:
            return None
        saved = self.root.state_dict().keys()  # persistent buffers only, as save_pretrained
        buffers = {original_name(n): b.detach().to(getattr(b, "_orig_dtype", b.dtype)).cpu()
                   for n, b in self.root.named_buffers() if n in saved}
        return {**state, **buffers}

    def generation_model(self, model):
        """A copy on the CPU, on the master (None elsewhere); every replica must call it."""
        state = self.full_state_dict(model)
        if state is None:
            return None
        with LOADING:
            unsharded_class = type(model).__mro__[1]  # route_calls_through's base
            return unsharded_class.from_pretrained(None, config=model.config, state_dict=state)

    def shard_file(self, folder):
        return Path(folder) / SHARDS / f"shard_{self.rank}_of_{self.world_size}.pt"

    def save_shards(self, model, optimizer, folder):
        """This replica's shard of the model and of the optimizer's state, and the shard
        metadata that torch_xla's consolidate_sharded_model_checkpoints reads."""
        self.sync()
        self.shard_file(folder).parent.mkdir(exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in self.root.state_dict().items()},
                    "shard_metadata": self.root.get_shard_metadata(),
                    "optimizer": to_cpu(optimizer.state_dict())}, self.shard_file(folder))

    def load_shards(self, model, optimizer, folder):
        path = self.shard_file(folder)
        if (Path(folder) / SHARDS / ".metadata").is_file():  # torch.distributed.checkpoint's
            raise CheckpointError(f"--resume: {folder} was written by torchrun's processes "
                                  f"(--fsdp under torchrun); resume it there, or start a new "
                                  f"--downstream_model_dir")
        if not path.exists():
            raise CheckpointError(f"--resume: {folder} holds no shard for replica {self.rank} "
                                  f"of {self.world_size}; resume on as many replicas as "
                                  f"wrote it, or start a new --downstream_model_dir")
        saved = torch.load(path, weights_only=True)
        self.root.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])


def original_name(name):
    """The parameter's name in the model that FSDP wraps."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_fpw_module.", "")


def route_calls_through(model, root):
    """The loop evaluates and saves `model`, not what `distribute` returns; but the root's
    parameters (the embeddings, the final norm) are now the root wrapper's, and only its
    forward gathers them. So `model(...)` from outside runs through the root, and
    `model.parameters()` yields every shard; the root's own call of the model (inside its
    forward) runs the model. The class keeps its name: save_pretrained records it."""
    from torch_xla.distributed.fsdp.xla_fully_sharded_data_parallel import TrainingState
    base = type(model)

    def call(self, *args, **kwargs):
        if root.training_state == TrainingState.IDLE:
            return root(*args, **kwargs)
        return base.__call__(self, *args, **kwargs)

    def parameters(self, recurse=True):
        return root.parameters(recurse)
    model.__class__ = types.new_class(base.__name__, (base,), exec_body=lambda ns: ns.update(
        {"__call__": call, "parameters": parameters, "__module__": base.__module__}))

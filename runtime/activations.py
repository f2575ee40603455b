"""--activation_checkpointing: each transformer block keeps only its input from the forward
and runs its forward again in the backward to rebuild the rest, so that a step holds one
block's activations at a time instead of every block's, for a second forward's compute.

Hugging Face's own switch does it: every block (a GradientCheckpointingLayer) then runs
through a checkpoint function while the model trains, and as it was in eval mode, so that
evaluation and generation neither recompute nor lose their key/value cache. On the CPU and
GPUs the function is torch's non-reentrant checkpoint, which composes with DDP and FSDP
wrapped around the model afterwards and restores the random generators' state before
recomputing, so that dropout draws the masks of the forward again. On XLA it is torch_xla's
own: the recomputed forward would otherwise be the very expression the forward computed,
and the XLA compiler would merge the two (keeping every block's activations again); it puts
an optimization barrier between them."""
from runtime.errors import InputError, first_line


def checkpoint_blocks(model, xla=False):
    """Have every transformer block of `model` (unwrapped, before DDP or FSDP) recompute its
    activations in the backward. Raises InputError for a model that cannot."""
    try:
        if not model.supports_gradient_checkpointing:
            raise ValueError("transformers' supports_gradient_checkpointing is False")
        if xla:
            from torch_xla.utils.checkpoint import checkpoint  # reentrant: all it supports
            # What gradient_checkpointing_enable does, but with torch_xla's function, which
            # it has no argument for (transformers 4.57).
            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint)
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    except ValueError as e:  # what transformers raises for a model without the switch
        raise InputError(f"--activation_checkpointing: this {model.config.model_type} model "
                         f"cannot recompute its blocks' activations ({first_line(e)}); leave "
                         f"the flag out") from None

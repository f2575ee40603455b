"""Learning-rate schedule: linear warm-up to the peak rate, then linear decay to zero.

The schedule is a pure function of the optimizer step, so it can be tested on its own,
plotted, and restored on resume from nothing but the step number.
"""
import math

import torch


def warmup_steps_for(total_steps, warmup_ratio=0.1, warmup_steps=None):
    """Number of warm-up steps: `warmup_steps` if given, else `warmup_ratio` of the run."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step, warmup_steps, total_steps):
    """Fraction of the peak learning rate used by optimizer step `step` (0-based).

    Warm-up: steps 0 .. warmup_steps-1 rise linearly and the last of them reaches the
    peak (the first step already learns, unlike a ramp that starts at exactly 0).
    Decay: from the peak at `warmup_steps` down linearly to 0 at `total_steps`, which
    is one past the last step, so the last step still moves the weights a little.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_warmup_decay(optimizer, warmup_steps, total_steps):
    """`LambdaLR` around `lr_factor`; call its `.step()` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))

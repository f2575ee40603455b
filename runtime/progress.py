"""Where a run is (saved in every checkpoint), and what falls due after each optimizer step:
a report, an evaluation, a save, a stop. The loop asks once per step; this is where the
bookkeeping of epochs, report steps and stop signals lives."""
import math
import sys
from dataclasses import dataclass

from runtime.signals import StopSignal


@dataclass
class Progress:
    step: int = 0               # optimizer steps done
    epoch: int = 0              # the epoch in progress
    batches_done: int = 0       # micro-batches of that epoch already trained on
    best_val_loss: float = math.inf
    eval_pending: bool = False  # a stop cut this step's evaluation short: run it on resume


def planned_steps(steps_per_epoch, epochs, max_steps, warn=True):
    """The optimizer steps the run takes: `epochs` epochs, or fewer with `max_steps`. A
    --max_steps beyond the epochs cannot lengthen the run, which `warn` says."""
    steps = steps_per_epoch * epochs
    if max_steps is not None and max_steps > steps and warn:
        print(f"warning: --max_steps {max_steps:,} is more than the {steps:,} steps of "
              f"--epochs {epochs} ({steps_per_epoch:,} per epoch): the run stops after "
              f"{steps:,}; raise --epochs to train longer", file=sys.stderr)
    return min(steps, max_steps or steps)


@dataclass
class Due:
    """What the loop does after a step, in this order."""
    report: bool
    evaluate: bool
    save: bool
    stop: bool
    last: bool


class Milestones:
    """Moves `progress` on by one step at a time and says what falls due then: a report every
    `log_every` steps; an evaluation and a save at each epoch's end and at the last step, and
    every `eval_every` / `save_every` steps; a stop (after a save) once a signal has reached
    any replica."""

    def __init__(self, progress, total_steps, batches_per_epoch, log_every, eval_every=None,
                 save_every=None, backend=None):
        self.progress, self.total_steps = progress, total_steps
        self.batches_per_epoch = batches_per_epoch
        self.log_every, self.eval_every, self.save_every = log_every, eval_every, save_every
        self.backend = backend

    def after_step(self, micro_batches):
        """The step just taken trained on `micro_batches` micro-batches."""
        p = self.progress
        p.step += 1
        p.batches_done += micro_batches
        epoch_done = p.batches_done >= self.batches_per_epoch
        if epoch_done:
            p.epoch, p.batches_done = p.epoch + 1, 0
        last = p.step == self.total_steps
        stop = self.stopping()  # once a step: with several replicas it is a collective
        return Due(report=last or every(p.step, self.log_every),
                   evaluate=epoch_done or last or every(p.step, self.eval_every),
                   save=epoch_done or last or stop or every(p.step, self.save_every),
                   stop=stop, last=last)

    def stopping(self):
        """Whether a stop signal has reached any replica. A signal can reach one replica a
        few steps before another; with several, they agree at report steps only, since
        agreeing reads the device (on XLA it waits for the step's graph)."""
        backend, step = self.backend, self.progress.step
        if backend is None or backend.world_size == 1:
            return StopSignal.signum is not None
        return every(step, self.log_every) and backend.any_replica(StopSignal.signum is not None)


def every(step, n):
    return bool(n) and step % n == 0

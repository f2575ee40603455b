"""What a run tells its user, without slowing the step down: the loss summed on the device
and read once per report (`LossMeter`, `report`), metrics.jsonl and TensorBoard's event
files, the evaluation lines, the banner printed before training starts, and an estimate of
the run's length once the first report has timed its steps.
"""
import contextlib
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.errors import NonFiniteLoss, first_line, write_atomically
from runtime.rundir import saving


class LossMeter:
    """Sums loss and tokens on the device between reports, so the host reads them once
    per report rather than once per step, and remembers the first non-finite step."""

    def __init__(self, device, step, plan=None):
        self.device = device
        self.step = torch.tensor(step, device=device)
        self.first_bad_step = torch.tensor(0, device=device)  # 0: none so far
        self.nonfinite = None  # the host's message, once a report has seen a bad step
        self.reported_step = step  # the host's count, at the last report
        self.plan = plan  # what the estimate of the run's length needs; None: no estimate
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluating, saving) is not training time: tokens/s leaves it
        out."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def add(self, loss_sum, tokens):
        """Add a step's sums. Raises NonFiniteLoss once a report has seen a non-finite loss:
        on XLA a report is read after the next step's graph has run, so here, a step later."""
        if self.nonfinite:
            raise NonFiniteLoss(self.nonfinite)
        self.step += 1
        new_bad = ~torch.isfinite(loss_sum) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(new_bad, self.step, self.first_bad_step)
        self.loss_sum += loss_sum
        self.tokens += tokens

    def report(self, backend, log, bar, step, lr):
        """Report the sums so far (on XLA once the step's graph has run), and start anew.
        Raises NonFiniteLoss once a report has seen a non-finite loss (on XLA, the first
        report after it ran)."""
        seconds = time.perf_counter() - self.started
        backend.on_host(write_report, log, self, self.loss_sum, self.tokens, self.first_bad_step,
                        step, lr, seconds, bar)
        if self.plan and log.is_master and step < self.plan.total_steps:
            # Timed at a report, which reads the device anyway: no wait of its own.
            tqdm.write(self.plan.estimate(step, seconds / (step - self.reported_step)))
        self.plan = None
        self.reported_step = step
        self.reset()
        if self.nonfinite:
            raise NonFiniteLoss(self.nonfinite)

    def check_finite(self):
        """Before a save: no checkpoint may hold what a non-finite loss trained."""
        bad = int(self.first_bad_step.item())
        if bad:
            raise NonFiniteLoss(f"the training loss became non-finite at step {bad}")


def write_report(log, meter, loss_sum, tokens, first_bad_step, step, lr, seconds, bar):
    """Host side of a loss report: runs once the step's tensors are computed."""
    if int(first_bad_step):
        meter.nonfinite = f"the training loss became non-finite at step {int(first_bad_step)}"
        return
    loss = loss_sum.item() / max(1, tokens.item())
    tokens_per_s = tokens.item() / max(seconds, 1e-9)
    log.write({"event": "train", "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}, step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")


@dataclass
class Plan:
    """What remains of the run when training starts, for the estimate of its length."""
    total_steps: int
    evaluations: int             # still to come
    eval_seconds: float = None   # one evaluation, when the run started with one

    @classmethod
    def after(cls, step, total_steps, steps_per_epoch, eval_every):
        return cls(total_steps, evaluations_after(step, total_steps, steps_per_epoch,
                                                  eval_every))

    @contextlib.contextmanager
    def timing_evaluation(self):
        """Time the evaluation inside, for the estimate (when it completes)."""
        started = time.perf_counter()
        yield
        self.eval_seconds = time.perf_counter() - started

    def estimate(self, step, seconds_per_step):
        steps = self.total_steps - step
        line = (f"timing: {seconds_per_step:.3g} s/step so far; the {steps:,} steps left take "
                f"about {duration(steps * seconds_per_step)}")
        if self.evaluations and self.eval_seconds is not None:
            line += (f", plus {duration(self.evaluations * self.eval_seconds)} for "
                     f"{evaluations(self.evaluations)} like the first")
        elif self.evaluations:
            line += f", plus {evaluations(self.evaluations)}"
        return line


def evaluations_after(step, total_steps, steps_per_epoch, eval_every):
    """How many evaluations the loop runs after `step`: at each epoch's end, every
    `eval_every` steps, and at the last step."""
    return sum(1 for s in range(step + 1, total_steps + 1) if s % steps_per_epoch == 0
               or s == total_steps or (eval_every and s % eval_every == 0))


def evaluations(n):
    return "1 evaluation" if n == 1 else f"{n} evaluations"


def duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class MetricsLog:
    """metrics.jsonl, written by the master: one JSON event a line, with its step and
    epoch (fractional); and, with `tensorboard`, the same events as TensorBoard scalars
    (the samples as text) in `tensorboard/` beside it, flushed at each event."""

    def __init__(self, path, is_master, steps_per_epoch, tensorboard=False):
        self.path, self.is_master = Path(path), is_master
        self.steps_per_epoch = steps_per_epoch
        self.board = BoardWriter(self.path.parent / "tensorboard") if tensorboard else None

    def write(self, event, step):
        """Append `event`. A failed write (a full disk) is a warning, once: the master alone
        writes, and raising there would leave the other replicas waiting for it; the next
        checkpoint, which every replica takes part in, stops the run if the disk is full."""
        event = {**event, "step": step, "epoch": round(step / self.steps_per_epoch, 4)}
        if self.is_master and self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event, ensure_ascii=False) + "\n")
            except OSError as e:
                print(f"warning: could not write {self.path} ({first_line(e)}); training "
                      f"goes on without logging events there", file=sys.stderr)
                self.path = None
        if self.is_master and self.board:
            self.board.write(event)

    def restart_after(self, step):
        """Keep the events up to `step` (None: none), where the run continues: a resumed
        run logs the later steps again, and a run that starts afresh owns the whole log.
        Lines that are no event (the last line of a killed run, cut at any byte, even inside
        a character) are dropped, with a warning."""
        if self.board:  # called on the master only (checkpoint.master_writes)
            self.board.restart_after(step)
        if not self.path.exists():
            return
        kept, damaged = [], []
        # bytes.splitlines() splits at \n and \r alone, which JSON writes escaped in a string.
        lines = self.path.read_bytes().splitlines() if step is not None else []  # fresh: none
        for number, line in enumerate(lines, start=1):
            event = logged_event(line)
            if event is None:
                damaged.append(str(number))
            elif event["step"] <= step:
                kept.append(line + b"\n")
        if damaged:
            print(f"warning: {self.path}: dropping line{'s' * (len(damaged) > 1)} "
                  f"{', '.join(damaged)}, cut short (a run killed while writing it)",
                  file=sys.stderr)
        with saving(self.path, previous=self.path.parent):
            write_atomically(self.path, lambda tmp: tmp.write_bytes(b"".join(kept)))


def logged_event(line):
    """The event that a line of metrics.jsonl (bytes) holds, or None when it holds none."""
    try:
        event = json.loads(line)  # bytes: a character cut short is a ValueError too
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("step"), int) else None


class BoardWriter:
    """TensorBoard's event files, written by the master from the events of metrics.jsonl,
    so that they cost the step nothing more: the values are already on the host. A side
    channel: whatever fails in it (a full disk, a missing tensorboard package, the writer's
    own thread) is one warning, and the run goes on without it."""
    SCALARS = {"loss": "train/loss", "lr": "train/learning_rate",
               "tokens_per_s": "train/tokens_per_s", "val_loss": "eval/val_loss",
               "perplexity": "eval/perplexity", "polarity_accuracy": "eval/polarity_accuracy"}

    def __init__(self, folder):
        self.folder, self.writer = Path(folder), None
        # Every run opens its events with a start at purge_step: TensorBoard takes each
        # start after the first for a restart, and hides the points from that step on.
        self.purge_step = 0
        self.failed = False            # after a failure, nothing more is written or said
        self.threads = set()           # the writer's own
        self.lock = threading.Lock()   # its thread and the loop may fail at once

    def restart_after(self, step):
        """A resumed run hides what an earlier one logged after `step`; a fresh run
        removes an earlier run's event files."""
        if step is not None:
            self.purge_step = step + 1
            return
        for old in self.folder.glob("events.out.tfevents.*"):
            try:
                old.unlink(missing_ok=True)
            except OSError as e:  # harmless: this run's start at step 0 hides its points
                print(f"warning: could not remove {old}, an earlier run's TensorBoard events "
                      f"({first_line(e)}); this run's curves hide them", file=sys.stderr)

    def write(self, event):
        if self.failed:
            return
        try:
            self.add(event)
        except Exception as e:  # whatever it is, the run does not need these files
            self.give_up(e)

    def add(self, event):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # seconds to import: only now
            before = set(threading.enumerate())
            self.writer = SummaryWriter(self.folder, purge_step=self.purge_step)
            self.threads = set(threading.enumerate()) - before
            threading.excepthook = self.quiet_hook(threading.excepthook)
        for key, tag in self.SCALARS.items():
            if key in event:
                self.writer.add_scalar(tag, event[key], event["step"])
        if event.get("samples"):
            self.writer.add_text("samples", "\n\n".join(
                f"**{word}** {review}" for word, review in event["samples"].items()),
                event["step"])
        self.writer.flush()  # a run killed at any moment keeps its curves

    def quiet_hook(self, previous):
        """threading.excepthook, but for the writer's thread: a failure there (a full disk)
        would print its traceback in the middle of the run, then be raised again here at
        the next write. It is the one warning instead."""
        def hook(args):
            if args.thread in self.threads:
                self.give_up(args.exc_value)
            else:
                previous(args)
        return hook

    def give_up(self, error):
        with self.lock:
            if self.failed:
                return
            self.failed = True
        print(f"warning: could not write TensorBoard's events in {self.folder} "
              f"({first_line(error)}); training goes on without them", file=sys.stderr)


def print_evaluation(step, result):
    line = f"step {step}: val_loss {result['val_loss']:.4f} perplexity {result['perplexity']:.2f}"
    if "polarity_accuracy" in result:
        line += f" polarity_accuracy {result['polarity_accuracy']:.4f}"
    if "control_accuracy" in result:  # the judge's own accuracy beside: the figure's ceiling
        line += (f" control_accuracy {result['control_accuracy']:.4f} (judge "
                 f"{result['judge_accuracy']:.4f} accurate on the validation file)")
    tqdm.write(line)
    for word, review in result.get("samples", {}).items():
        tqdm.write(f"  {word}: {review}")


def print_banner(settings, backend, train_features, val_features, steps_per_epoch, total_steps,
                 warmup, checkpoint, progress, packed):
    """What the run will do, before it starts (the master says it). `settings`: the run's
    flags by name."""
    if not backend.is_master:
        return
    s = settings
    global_batch = s["batch_size"] * backend.world_size * s["grad_accum_steps"]
    words = ("긍정 or 부정 before each review" if train_features.labels is not None
             else "none (prompt/response pairs: the loss on the responses)"
             if trains_responses_only(train_features)
             else "none (no labels: plain language modelling)")
    polarity_size = (min(s["polarity_eval_size"], len(val_features))
                     if train_features.labels is not None else 0)
    lines = [
        f"device:           {backend.describe()}",
        f"model:            {s['pretrained_model_name']}",
        f"train examples:   {len(train_features):,} ({train_features.blank} blank skipped, "
        f"{train_features.truncated:,} cut to {s['max_seq_length']} tokens)",
        f"val examples:     {len(val_features):,} ({val_features.blank} blank skipped)",
        f"each evaluation:  loss on {min(s['eval_size'] or math.inf, len(val_features)):,} "
        f"of them, polarity accuracy on {polarity_size:,}",
        f"polarity word:    {words}",
        f"batch:            {s['batch_size']} x {backend.world_size} replicas x "
        f"{s['grad_accum_steps']} accumulation = {global_batch} examples per step, "
        f"{'packed end to end in rows' if packed else 'padded'}"
        f"{'' if packed or s['no_packing'] else ' (this model cannot take packed rows)'}",
        f"steps:            {steps_per_epoch:,} per epoch, {total_steps:,} in all, "
        f"{warmup:,} warm-up, peak lr {s['learning_rate']:g}",
        f"output:           {s['downstream_model_dir']}",
    ]
    for features, flag in ((train_features, "train_file"), (val_features, "val_file")):
        if features.left_out:
            lines.append(left_out_line(features, s[flag], s["max_seq_length"]))
    if checkpoint:
        lines.append(f"resuming:         {checkpoint} (step {progress.step}, "
                     f"epoch {progress.epoch + 1})")
    print("\n".join(lines), flush=True)


def trains_responses_only(features):
    """Whether some example of `features` has an untrained prompt."""
    return features.trained_from is not None and bool((features.trained_from > 0).any())


def left_out_line(features, corpus_file, max_seq_length):
    """The banner's line on the pairs of `corpus_file` left out as too long, the first
    few named by line."""
    named = ", ".join(f"{corpus_file}:{line}" for line in features.left_out_lines)
    more = features.left_out - len(features.left_out_lines)
    if more:
        named += f" and {more:,} more"
    return (f"left out:         {features.left_out:,} of {corpus_file}, their response too "
            f"long for --max_seq_length {max_seq_length} ({named}); raise --max_seq_length "
            f"to train on them")

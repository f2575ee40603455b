"""What a run tells its user, without slowing the step down: the loss summed on the device
and read once per report (`LossMeter`, `report`), metrics.jsonl, the evaluation lines, and
the banner printed before training starts.
"""
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
from checkpoint import NonFiniteLoss, saving


class LossMeter:
    """Sums loss and tokens on the device between reports, so the host reads them once
    per report rather than once per step, and remembers the first non-finite step."""

    def __init__(self, device, step):
        self.device = device
        self.step = torch.tensor(step, device=device)
        self.first_bad_step = torch.tensor(0, device=device)  # 0: none so far
        self.nonfinite = None  # the host's message, once a report has seen a bad step
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.started = time.perf_counter()

    def add(self, loss_sum, tokens):
        self.step += 1
        new_bad = ~torch.isfinite(loss_sum) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(new_bad, self.step, self.first_bad_step)
        self.loss_sum += loss_sum
        self.tokens += tokens

    def report(self, backend, log, bar, step, lr):
        """Report the sums so far (on XLA once the step's graph has run), and start anew."""
        backend.on_host(write_report, log, self, self.loss_sum, self.tokens, self.first_bad_step,
                        step, lr, time.perf_counter() - self.started, bar)
        self.reset()

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


class MetricsLog:
    """metrics.jsonl, written by the master: one JSON event a line, with its step and
    epoch (fractional)."""

    def __init__(self, path, is_master, steps_per_epoch):
        self.path, self.is_master = Path(path), is_master
        self.steps_per_epoch = steps_per_epoch

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
                print(f"warning: could not write {self.path} ({data.first_line(e)}); training "
                      f"goes on without logging events there", file=sys.stderr)
                self.path = None

    def restart_after(self, step):
        """Keep the events up to `step` (None: none), where the run continues: a resumed
        run logs the later steps again, and a run that starts afresh owns the whole log. A
        line cut short by a kill is dropped too."""
        if not self.path.exists():  # called on the master only (checkpoint.master_writes)
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run, half written
            if step is not None and event["step"] <= step:
                kept.append(line + "\n")
        with saving(self.path, previous=self.path.parent):
            data.write_atomically(self.path, lambda tmp: tmp.write_text("".join(kept),
                                                                         encoding="utf-8"))


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


def print_banner(args, backend, train_features, val_features, steps_per_epoch, total_steps,
                 warmup, checkpoint, progress):
    global_batch = args.batch_size * backend.world_size * args.grad_accum_steps
    words = ("긍정 or 부정 before each review" if train_features.labels is not None
             else "none (no labels: plain language modelling)")
    lines = [
        f"device:           {backend.describe()}",
        f"model:            {args.pretrained_model_name}",
        f"train examples:   {len(train_features):,} ({train_features.blank} blank skipped, "
        f"{train_features.truncated:,} cut to {args.max_seq_length} tokens)",
        f"val examples:     {len(val_features):,} ({val_features.blank} blank skipped)",
        f"polarity word:    {words}",
        f"batch:            {args.batch_size} x {backend.world_size} replicas x "
        f"{args.grad_accum_steps} accumulation = {global_batch} examples per step",
        f"steps:            {steps_per_epoch:,} per epoch, {total_steps:,} in all, "
        f"{warmup:,} warm-up, peak lr {args.learning_rate:g}",
        f"output:           {args.downstream_model_dir}",
    ]
    if checkpoint:
        lines.append(f"resuming:         {checkpoint} (step {progress.step}, "
                     f"epoch {progress.epoch + 1})")
    print("\n".join(lines), flush=True)

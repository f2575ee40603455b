"""Fine-tune KoGPT2 on NSMC so that it writes a positive or a negative movie review on
request: every review is trained as `긍정 review</s>` or `부정 review</s>`.

    python train.py                                  # every TPU core, else one GPU, else CPU
    python train.py --device cpu --max_steps 20      # a smoke run

Read it top to bottom: the loss, `train_step` (one optimizer step), `evaluate`, `train` (set
up, then the loop that every backend enters) and `main`. The machinery answers from layers of
its own: data.py and corpus/ (the examples and their batches), model.py, sched.py (the
learning rate), runtime/ (devices, launching, checkpoints, reporting) and task/ (what the
NSMC task adds to an evaluation). Its flags are in options.py.
"""
if __name__ == "__main__":  # before torch loads: --help at once, Ctrl-C in one line
    import runtime.start_up  # noqa: F401

import dataclasses
import math
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import sched
from data import DataConfig
from model import (WITHOUT_LOGITS, check_loadable, load_tokenizer, model_inputs, output_layer_at,
                   packs_reviews, splits_off_output_layer)
from options import check_args, parse_args
from runtime.backends import choose_device
from runtime.checkpoint import (CheckpointConfig, content_digests, export_best, restore,
                                run_tokenizer, save_checkpoint)
from runtime.errors import CheckpointError, InputError, NonFiniteLoss, ReplicaLost
from runtime.launch import run_process, spawn_replicas
from runtime.progress import Milestones, Progress, planned_steps
from runtime.reporting import LossMeter, MetricsLog, Plan, print_banner, print_evaluation
from runtime.rundir import (agreed_checkpoint, check_fresh_start, check_output_shared,
                            continues_here, delete_earlier_run, exclusive, master_writes)
from runtime.signals import Interrupted, StopRequested, StopSignal
from task.nsmc import NsmcTask, TaskConfig


# --------------------------------------------------------------------------- the loss

def token_loss_sum(model, batch):
    """Summed next-token cross-entropy over the trained tokens of `batch`, padded or packed."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).flatten()  # i predicts i+1
    where = batch.get("target_positions")  # positions before a trained token (not on XLA)
    if where is not None and splits_off_output_layer(model):
        hidden = model(**model_inputs(model, batch), **WITHOUT_LOGITS).hidden_states[-1]
        logits, targets = output_layer_at(model, hidden, where), targets[where]
    else:  # the output layer everywhere: XLA's fixed shapes, or a head that is more than it
        logits = model(**model_inputs(model, batch)).logits.flatten(0, 1)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def count_targets(batch):
    return (batch["labels"][:, 1:] != -100).sum()


# --------------------------------------------------------------------------- the step

def train_step(model, optimizer, scheduler, window, backend, step, max_grad_norm,
               loss_fn=token_loss_sum):
    """Optimizer step `step` on `window`, this replica's micro-batches (on the device), with
    the gradient of the mean loss over every trained token of the global batch: each token
    weighs the same however tokens fall across micro-batches and replicas. Returns the
    global loss sum and token count, left on the device: reading them here would make XLA
    run the step's graph at once and wait for it."""
    backend.seed_step(step)
    n_tokens = backend.all_reduce_sum(sum(count_targets(batch) for batch in window))
    loss_sum = torch.zeros((), device=backend.device)
    for batch in window:
        with backend.gradient_sync(model, batch is window[-1]):  # DDP: in the last one only
            with backend.autocast():
                batch_loss = loss_fn(model, batch)
            # Replica gradients are averaged, so each replica scales its share by world_size.
            (batch_loss * backend.world_size / n_tokens).backward()
        loss_sum += batch_loss.detach()
    backend.reduce_gradients(optimizer)  # all-reduce: every replica now holds the mean
    backend.clip_gradients(model, max_grad_norm)  # by the norm over every replica's shard
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return backend.all_reduce_sum(loss_sum), n_tokens


def param_groups(model, weight_decay):
    """Weight decay on matrices only: biases and LayerNorm weights are 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, val_loader, backend, task, loss_fn=token_loss_sum, final=False):
    """Validation loss over every trained token of the validation set (all replicas
    together), its perplexity, and what the task adds (`task.evaluate`)."""
    model.eval()
    loss_sum = torch.zeros((), device=backend.device)
    tokens = torch.zeros((), dtype=torch.long, device=backend.device)
    batches = tqdm(backend.feed(val_loader), "evaluate", len(val_loader), leave=False,
                   disable=None if backend.is_master else True)  # None: off when not a terminal
    for batch in backend.stoppable(batches):
        with backend.autocast():
            loss_sum += loss_fn(model, batch)
        tokens += count_targets(batch)
    val_loss = (backend.all_reduce_sum(loss_sum) / backend.all_reduce_sum(tokens)).item()
    result = {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50))}
    result.update(task.evaluate(model, backend, final))
    model.train()
    return result


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainConfig:
    """The loop's own settings (the flags of the same names), and the other layers'."""
    pretrained_model_name: str
    learning_rate: float
    epochs: int
    max_steps: int
    warmup_ratio: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    grad_accum_steps: int
    log_every: int
    eval_every: int
    seed: int
    precision: str
    compile: bool
    fsdp: bool
    no_packing: bool
    report_to: str
    data: DataConfig
    checkpoint: CheckpointConfig
    task: TaskConfig
    settings: dict  # every flag by name: recorded in checkpoints, compared on resume


def train(backend, cfg):
    """The whole run on one replica: every backend enters here."""
    backend.seed(cfg.seed)
    out = Path(cfg.checkpoint.downstream_model_dir)
    check_output_shared(backend, out)
    checkpoint = agreed_checkpoint(backend, cfg.checkpoint.resume, out)
    tokenizer = load_tokenizer(str(checkpoint or cfg.pretrained_model_name))  # prepare: alike
    train_features, val_features = data.load_corpus(cfg.data, tokenizer, backend.is_master)
    batches_per_epoch, steps_per_epoch = data.replica_steps(
        len(train_features), cfg.data.batch_size, backend.world_size, cfg.grad_accum_steps)
    total_steps = planned_steps(steps_per_epoch, cfg.epochs, cfg.max_steps, backend.is_master)
    model = backend.load_model(str(checkpoint or cfg.pretrained_model_name), tokenizer,
                               resuming=checkpoint is not None).train()
    data.record_polarity_words(model.config, train_features)
    packed = not cfg.no_packing and packs_reviews(model)
    train_batches, train_loader, val_loader = data.loaders(
        train_features, val_features, cfg.data, tokenizer.pad_token_id, backend, packed,
        cfg.grad_accum_steps)
    replica = backend.distribute(model)  # what the step runs through: DDP under torchrun
    optimizer = backend.optimizer(param_groups(model, cfg.weight_decay), cfg.learning_rate)
    warmup = sched.warmup_steps_for(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    scheduler = sched.linear_warmup_decay(optimizer, warmup, total_steps)
    # --compile: the loss with the model, so that the output layer and the loss fuse.
    loss_fn = backend.compile(token_loss_sum) if cfg.compile else token_loss_sum
    files = cfg.data.files()
    task = NsmcTask(cfg.task, tokenizer, val_features, *files)
    # What the flags leave to the machine: a resumed run says when they came out otherwise.
    settings = {**cfg.settings, **content_digests(files, cfg.pretrained_model_name, tokenizer),
                "world_size": backend.world_size, "precision": backend.precision}
    progress = (restore(checkpoint, cfg.checkpoint, backend, optimizer, scheduler, settings)
                if checkpoint else Progress())
    log = MetricsLog(out / "metrics.jsonl", backend.is_master, steps_per_epoch,
                     tensorboard=cfg.report_to == "tensorboard")
    here = checkpoint and continues_here(str(checkpoint), out)  # else this folder's log is new
    master_writes(backend, lambda: log.restart_after(progress.step if here else None))
    print_banner(settings, backend, train_features, val_features, steps_per_epoch,
                 total_steps, warmup, checkpoint, progress, packed)

    def evaluate_and_keep_best(export=True, final=False):
        """False when a stop signal cut the evaluation short: it is run again on resume."""
        try:
            result = evaluate(model, val_loader, backend, task, loss_fn, final)
        except StopRequested:
            progress.eval_pending = True
            return False
        if not math.isfinite(result["val_loss"]):
            raise NonFiniteLoss(f"validation loss is {result['val_loss']} at step {progress.step}")
        log.write({"event": "eval", **result}, progress.step)
        if backend.is_master:
            print_evaluation(progress.step, result)
        if export and result["val_loss"] < progress.best_val_loss:
            progress.best_val_loss = result["val_loss"]
            export_best(out, backend, model, tokenizer, progress.step)
        progress.eval_pending = False
        return True

    plan = Plan.after(progress.step, total_steps, steps_per_epoch, cfg.eval_every)
    if progress.step == 0 or progress.eval_pending:  # the starting point, for comparison
        with plan.timing_evaluation():
            if not evaluate_and_keep_best(export=progress.step > 0,
                                          final=progress.step == total_steps):
                raise Interrupted.at(progress.step, StopSignal.signum,
                                     saved=progress.step > 0 and checkpoint)
    meter = LossMeter(backend.device, progress.step, plan)  # the first report estimates the rest
    milestones = Milestones(progress, total_steps, batches_per_epoch, cfg.log_every,
                            cfg.eval_every, cfg.checkpoint.save_every_steps, backend)
    with tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True,
              disable=not backend.is_master) as bar:  # closed before any error is printed
        while progress.step < total_steps:
            train_batches.start_epoch(progress.epoch, skip_batches=progress.batches_done)
            for window in data.windows(backend.feed(train_loader), cfg.grad_accum_steps):
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss_sum, tokens = train_step(replica, optimizer, scheduler, window, backend,
                                              progress.step, cfg.max_grad_norm, loss_fn)
                meter.add(loss_sum, tokens)
                due = milestones.after_step(len(window))
                bar.update(1)
                if due.report:
                    meter.report(backend, log, bar, progress.step, lr)  # read after the step
                with meter.paused():  # tokens/s counts training time only
                    if due.evaluate and not evaluate_and_keep_best(final=due.last):
                        due.save = due.stop = True  # stopped mid-evaluation: save the step
                    if due.save:
                        meter.check_finite()  # no checkpoint holds what a NaN trained
                        save_checkpoint(cfg.checkpoint, backend, progress, model, tokenizer,
                                        optimizer, scheduler, settings)
                if due.stop:
                    raise Interrupted.at(progress.step, StopSignal.signum,
                                         saved=out / f"checkpoint-{progress.step}")
                if due.last:
                    break
    if backend.is_master:
        print(f"done: best val_loss {progress.best_val_loss:.4f}; model in {out}", flush=True)


# --------------------------------------------------------------------------- main

def config(args):
    """The run's settings, built once from the checked flags: each layer takes its own."""
    def flags(cls):
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                if hasattr(args, f.name)}
    return TrainConfig(**flags(TrainConfig), data=DataConfig(**flags(DataConfig)),
                       checkpoint=CheckpointConfig(**flags(CheckpointConfig)),
                       task=TaskConfig(**flags(TaskConfig)), settings=dict(vars(args)))


def prepare(cfg):
    """Work done once on each host, before its replicas train (under torchrun, by its first
    process once all have joined): check the model name and the output directory, find or
    download the corpus, tokenize it into the cache, check that the task's evaluations fit
    the model, train its judge. Replicas then only read the caches."""
    ckpt, out, name = cfg.checkpoint, cfg.checkpoint.downstream_model_dir, cfg.pretrained_model_name
    earlier_run = check_fresh_start(out, ckpt.resume, ckpt.overwrite_output_dir)
    positions = check_loadable(name, max_seq_length=cfg.data.max_seq_length)
    tokenizer = run_tokenizer(ckpt.resume, out, name)
    _, val_features = data.load_corpus(cfg.data, tokenizer)
    NsmcTask(cfg.task, tokenizer, val_features, *cfg.data.files()).prepare(positions)
    delete_earlier_run(out, earlier_run)  # --overwrite_output_dir, once nothing refused


# Errors every replica raises together, which main turns into one line.
AGREED_ERRORS = (InputError, CheckpointError, NonFiniteLoss, Interrupted)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        cfg = config(args)
        kind = choose_device(args.device, args.tpu_cores, args.compile, args.fsdp)
        with exclusive(cfg.checkpoint.downstream_model_dir):  # one lock per host
            if kind == "xla":
                spawn_replicas(train, prepare, cfg, args.tpu_cores == 1, agreed=AGREED_ERRORS)
            else:  # alone, or one of torchrun's: they join, then each host's first prepares
                run_process(train, prepare, cfg, kind, agreed=AGREED_ERRORS)
    except (InputError, CheckpointError, NonFiniteLoss, ReplicaLost) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except BrokenProcessPool as e:  # a replica process ended: e says how (spawn_replicas)
        print(f"error: a replica process ended early ({e}); nothing after the last "
              f"checkpoint was saved", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

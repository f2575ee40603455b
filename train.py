"""Fine-tune KoGPT2 on NSMC so that it writes a positive or a negative movie review on
request: every review is trained as `긍정 review</s>` or `부정 review</s>`.

    python train.py                                  # every TPU core, else one GPU, else CPU
    python train.py --device cpu --max_steps 20      # a smoke run

Read it top to bottom (its arguments are in options.py, parsed before torch loads): the
loss; `train_step`, one whole optimizer step; evaluation; `train`, the loop that every
backend enters (set up, then step, report, evaluate, save, stop); and `main`. The machinery
has modules of its own: backend.py (where the loop runs: CPU, CUDA or every XLA device),
checkpoint.py (what is saved, and how a run resumes), data.py (the corpus and its batches),
model.py, sched.py (the learning rate) and polarity.py (reviews on request, and polarity
accuracy).
"""
import math
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import options
from options import check_args, parse_args


def stopped_during_start_up(signum, frame):
    print("stopped by SIGINT during start-up: nothing was saved", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # Ctrl-C while torch loads or the corpus is tokenized: one line,
    signal.signal(signal.SIGINT, stopped_during_start_up)  # until main() installs StopSignal
    first = parse_args()  # --help and a mistyped flag answered before torch loads
    options.keep_xla_unloaded(first.device, first.tpu_cores)

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import polarity
import sched
from backend import (Interrupted, StopRequested, StopSignal, choose_device, first_on_host,
                     run_process, spawn_replicas)
from checkpoint import (CheckpointError, NonFiniteLoss, Progress, agreed_checkpoint,
                        check_fresh_start, check_output_shared, corpus_digest, exclusive,
                        export_best, find_resume_checkpoint, master_writes, restore,
                        save_checkpoint)
from options import InputError
from model import check_loadable, load_model, load_tokenizer, logits_at, packs_reviews
from reporting import (LossMeter, MetricsLog, Plan, evaluations_after, print_banner,
                       print_evaluation)


# --------------------------------------------------------------------------- the loss

def token_loss_sum(model, batch):
    """Summed next-token cross-entropy over the real tokens of `batch`, padded or packed,
    logits only where a target is: at the loader's target_positions, or everywhere in
    XLA's fixed-shape batches."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).flatten()  # i predicts i+1
    where = batch.get("target_positions")
    logits = logits_at(model, batch, where)
    return F.cross_entropy(logits.float(), targets if where is None else targets[where],
                           ignore_index=-100, reduction="sum")


def count_targets(batch):
    return (batch["labels"][:, 1:] != -100).sum()


# --------------------------------------------------------------------------- the step

def train_step(model, optimizer, scheduler, window, backend, step, max_grad_norm,
               loss_sum_fn=token_loss_sum):
    """Optimizer step `step` on `window`, this replica's micro-batches (already on the
    device). Returns the global loss sum and token count, left on the device: reading them
    here would make XLA run the step's graph at once and wait for it."""
    backend.seed_step(step)
    loss_sum, n_tokens = accumulate_gradients(model, window, backend, loss_sum_fn)
    backend.reduce_gradients(optimizer)  # all-reduce: every replica now holds the mean
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return backend.all_reduce_sum(loss_sum), n_tokens


def accumulate_gradients(model, window, backend, loss_sum_fn=token_loss_sum):
    """Backward over `window`, a list of micro-batches, so that once the replicas' gradients
    are averaged they are those of the mean loss over every real token of the global
    batch: each token weighs the same however tokens fall across micro-batches and
    replicas. Returns this replica's loss sum and the global token count, on the device."""
    n_tokens = backend.all_reduce_sum(sum(count_targets(batch) for batch in window))
    loss_sum = torch.zeros((), device=backend.device)
    for replica, batch in backend.micro_batches(model, window):  # replica: DDP under torchrun
        with backend.autocast():
            batch_loss = loss_sum_fn(replica, batch)
        # Replica gradients are averaged, so each replica scales its share by world_size.
        (batch_loss * backend.world_size / n_tokens).backward()
        loss_sum += batch_loss.detach()
    return loss_sum, n_tokens


def param_groups(model, weight_decay):
    """Weight decay on matrices only: biases and LayerNorm weights are 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, tokenizer, val_loader, backend, args, loss_sum_fn=token_loss_sum,
             final=False):
    """Validation loss over every real token of the validation set (all replicas
    together), its perplexity, and how well the model keeps the polarities apart."""
    model.eval()
    loss_sum = torch.zeros((), device=backend.device)
    tokens = torch.zeros((), dtype=torch.long, device=backend.device)
    batches = tqdm(backend.feed(val_loader), "evaluate", len(val_loader), leave=False,
                   disable=None if backend.is_master else True)  # None: off when not a terminal
    for batch in backend.stoppable(batches):
        with backend.autocast():
            loss_sum += loss_sum_fn(model, batch)
        tokens += count_targets(batch)
    val_loss = (backend.all_reduce_sum(loss_sum) / backend.all_reduce_sum(tokens)).item()
    result = {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50))}
    features = val_loader.dataset.features
    if features.labels is not None:  # a corpus with polarity words
        if args.polarity_eval_size:
            result["polarity_accuracy"] = polarity.polarity_accuracy(
                model, tokenizer, features, backend, args.batch_size, args.polarity_eval_size,
                args.cpu_workers)
        # The master writes reviews of each polarity; at the end a judge reads 200 of them.
        result.update(polarity.written_reviews(model, tokenizer, backend, args, final))
    model.train()
    return result


# --------------------------------------------------------------------------- set-up

def make_loader(features, index_batches, tokenizer, backend, args, packed):
    dataset = data.ReviewBatches(features, tokenizer.pad_token_id, backend.fixed_shapes,
                                 args.batch_size, packed)
    if packed and backend.fixed_shapes and isinstance(index_batches, data.TrainBatches):
        # XLA: one graph for all replicas and all micro-batches of a step
        index_batches.agree_on_rows(dataset.rows_for, args.grad_accum_steps)
    return data.make_loader(dataset, index_batches, args.cpu_workers, backend.pin_memory)


# --------------------------------------------------------------------------- the loop

def train(backend, args):
    """The whole run on one replica: every backend enters here."""
    backend.seed(args.seed)
    out = Path(args.downstream_model_dir)
    tokenizer = load_tokenizer(args.pretrained_model_name)
    train_features, val_features = data.load_corpus(args, tokenizer, backend.is_master)
    batches_per_epoch, steps_per_epoch = data.replica_steps(
        len(train_features), args.batch_size, backend.world_size, args.grad_accum_steps)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    lengths = train_features.lengths if args.group_by_length else None
    train_batches = data.TrainBatches(len(train_features), args.batch_size,
                                      backend.world_size, backend.rank, args.seed, lengths)
    check_output_shared(backend, out)
    checkpoint = agreed_checkpoint(backend, args.resume, out)
    model = load_model(str(checkpoint or args.pretrained_model_name), tokenizer,
                       device=backend.device).train()
    packed = not args.no_packing and packs_reviews(model)
    train_loader = make_loader(train_features, train_batches, tokenizer, backend, args, packed)
    val_loader = make_loader(val_features, data.eval_batches(
        len(val_features), args.batch_size, backend.world_size, backend.rank, args.eval_size),
        tokenizer, backend, args, packed)
    optimizer = backend.optimizer(param_groups(model, args.weight_decay), args.learning_rate)
    warmup = sched.warmup_steps_for(total_steps, args.warmup_ratio, args.warmup_steps)
    scheduler = sched.linear_warmup_decay(optimizer, warmup, total_steps)
    # --compile: the loss with the model, so that the output layer and the loss fuse.
    loss_fn = backend.compile(token_loss_sum) if args.compile else token_loss_sum
    # What the arguments leave to the machine: a resumed run says when they came out otherwise.
    facts = {"world_size": backend.world_size, "corpus": corpus_digest(args),
             "precision": backend.precision}
    progress = (restore(checkpoint, args, backend, optimizer, scheduler, facts) if checkpoint
                else Progress())
    log = MetricsLog(out / "metrics.jsonl", backend.is_master, steps_per_epoch,
                     tensorboard=args.report_to == "tensorboard")
    master_writes(backend, lambda: log.restart_after(progress.step if checkpoint else None))
    if backend.is_master:
        print_banner(args, backend, train_features, val_features, steps_per_epoch,
                     total_steps, warmup, checkpoint, progress, packed)

    def evaluate_and_keep_best(export=True, final=False):
        result = evaluate(model, tokenizer, val_loader, backend, args, loss_fn, final)
        if not math.isfinite(result["val_loss"]):
            raise NonFiniteLoss(f"validation loss is {result['val_loss']} at step {progress.step}")
        log.write({"event": "eval", **result}, progress.step)
        if backend.is_master:
            print_evaluation(progress.step, result)
        if export and result["val_loss"] < progress.best_val_loss:
            progress.best_val_loss = result["val_loss"]
            export_best(out, backend, model, tokenizer, progress.step)

    plan = Plan(total_steps, evaluations_after(progress.step, total_steps, steps_per_epoch,
                                               args.eval_every))
    if progress.step == 0 or progress.eval_pending:  # the starting point, for comparison
        started = time.perf_counter()
        try:
            evaluate_and_keep_best(export=progress.step > 0, final=progress.step == total_steps)
        except StopRequested:
            raise Interrupted.at(progress.step, StopSignal.signum, saved=progress.step > 0
                                 and checkpoint) from None
        progress.eval_pending = False
        plan.eval_seconds = time.perf_counter() - started
    meter = LossMeter(backend.device, progress.step, plan)  # the first report estimates the rest
    with tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True,
              disable=not backend.is_master) as bar:  # closed before any error is printed
        while progress.step < total_steps:
            train_batches.start_epoch(progress.epoch, skip_batches=progress.batches_done)
            for window in data.windows(backend.feed(train_loader), args.grad_accum_steps):
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss_sum, tokens = train_step(model, optimizer, scheduler, window, backend,
                                              progress.step, args.max_grad_norm, loss_fn)
                meter.add(loss_sum, tokens)
                progress.step += 1
                progress.batches_done += len(window)
                bar.update(1)

                last = progress.step == total_steps
                if last or progress.step % args.log_every == 0:
                    meter.report(backend, log, bar, progress.step, lr)  # read after the step
                if meter.nonfinite:
                    raise NonFiniteLoss(meter.nonfinite)
                epoch_done = progress.batches_done >= batches_per_epoch
                if epoch_done:
                    progress.epoch, progress.batches_done = progress.epoch + 1, 0
                # A signal can reach one replica a few steps before another; on XLA the
                # replicas agree on it at report steps only, since agreeing reads the device.
                stopping = ((backend.world_size == 1 or progress.step % args.log_every == 0)
                            and backend.any_replica(StopSignal.signum is not None))

                paused = time.perf_counter()
                try:
                    if epoch_done or last or due(progress.step, args.eval_every):
                        evaluate_and_keep_best(final=last)  # before saving: the checkpoint keeps it
                except StopRequested:  # mid-evaluation: the step is done, so save it
                    stopping = progress.eval_pending = True
                if epoch_done or last or stopping or due(progress.step, args.save_every_steps):
                    meter.check_finite()
                    save_checkpoint(args, backend, progress, model, tokenizer, optimizer,
                                    scheduler, facts)
                meter.started += time.perf_counter() - paused  # tokens/s: training time only
                if stopping:
                    raise Interrupted.at(progress.step, StopSignal.signum,
                                         saved=out / f"checkpoint-{progress.step}")
                if last:
                    break
    if backend.is_master:
        print(f"done: best val_loss {progress.best_val_loss:.4f}; model in {out}", flush=True)


def due(step, every):
    return bool(every) and step % every == 0


# --------------------------------------------------------------------------- main

def prepare(args):
    """Work done once on each host, before its replicas start: check the model name, find
    or download the corpus, tokenize it into the cache, train the judge of control accuracy
    when the final evaluation will use it. Replicas then only read the caches."""
    check_fresh_start(args.downstream_model_dir, args.resume, args.overwrite_output_dir)
    if args.resume != "latest":  # a path: check it here, not in the replicas
        find_resume_checkpoint(args.resume, args.downstream_model_dir)
    check_loadable(args.pretrained_model_name, "--pretrained_model_name", args.max_seq_length)
    corpus = data.load_corpus(args, load_tokenizer(args.pretrained_model_name))
    if args.polarity_eval_size:  # 0 skips control accuracy, and so the judge
        polarity.corpus_judge(args, corpus)


# Errors every replica raises together, which main turns into one line.
AGREED_ERRORS = (InputError, CheckpointError, NonFiniteLoss, Interrupted)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        kind = choose_device(args.device, args.tpu_cores)
        with exclusive(args.downstream_model_dir):  # one lock per host
            if first_on_host():  # torchrun runs main in every process: the others wait
                prepare(args)
            if kind == "xla":
                spawn_replicas(train, args, one_core=args.tpu_cores == 1, agreed=AGREED_ERRORS)
            else:  # this process alone, or one of those torchrun starts
                run_process(train, args, kind, agreed=AGREED_ERRORS)
    except (InputError, CheckpointError, NonFiniteLoss) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except BrokenProcessPool:  # a replica ended its process: its error is printed above
        print("error: a replica process ended early (its error is above); nothing after "
              "the last checkpoint was saved", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time our training loop against Hugging Face's `Trainer` on this machine: the same model,
the same token ids, the same batch size and optimizer settings. Ours runs as train.py does
by default (each batch's reviews packed end to end, in random order); then each loop runs
with the batches in random order, each padded to its longest review (like for like: ours
--no_packing), and with batches of similar lengths (ours --group_by_length --no_packing,
Trainer's group_by_length=True: Trainer at its best). --compile compiles both (ours
--compile, Trainer torch_compile=True).

    python benchmarks/bench_train.py --downstream_corpus_root_dir ../shared/data \
        --pretrained_model_name /tmp/tiny-kogpt2 --device cpu

It first times the data preparation (reading and tokenizing the corpus into an empty cache,
then loading it back), then runs each loop in a fresh process of its own, so that none
inherits another's warm caches and each reports its own peak memory. Each process trains
for --warmup_steps untimed steps, then --repeats times --steps timed steps; the table
shows medians over the repeats.
"""
import sys
from pathlib import Path

# train.py and its modules live one folder up; first on the path, because our sched.py
# shares its name with a module of Python's standard library.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402

from corpus import features as corpus_features  # noqa: E402
from corpus import read as corpus_read  # noqa: E402
import runtime.errors  # noqa: E402
import data  # noqa: E402
import sched  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402
from options import check_at_least, check_optimizer_args  # noqa: E402
from runtime.backends import choose_device  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from model import load_tokenizer, packs_reviews  # noqa: E402
from runtime.reporting import LossMeter  # noqa: E402
from measuring import (SHAPES, Clock, CountedReviewBatches, CountingCollator,  # noqa: E402
                       result, setup, tokenizer_source)


def parse_args(argv=None):
    p = options.ArgumentParser(
        description="Our training loop against transformers.Trainer: throughput and memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name", default=None,
                   help="a local model directory (any size) with its tokenizer; "
                        "unset: a randomly initialised model of --model_shape")
    p.add_argument("--model_shape", choices=sorted(SHAPES), default="kogpt2",
                   help="the model built when no --pretrained_model_name is given")
    p.add_argument("--tokenizer", default="skt/kogpt2-base-v2",
                   help="with --model_shape: hub name or directory of the tokenizer "
                        "(tests/fixtures.py builds one)")
    p.add_argument("--downstream_corpus_root_dir", default="~/Korpora",
                   help="holds nsmc/ratings_train.txt and nsmc/ratings_test.txt")
    p.add_argument("--downstream_corpus_name", default="nsmc")
    p.add_argument("--max_examples", type=int, default=None,
                   help="train on the first N training reviews only")
    p.add_argument("--max_seq_length", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="untimed steps before the first repeat, also the schedule's warm-up; "
                        "unset: --log_every + 1, so that the first loss read, which on XLA "
                        "compiles a graph of its own, happens before timing starts")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per loop, the loops taking turns (more: steadier numbers "
                        "on a busy machine)")
    p.add_argument("--log_every", type=int, default=50,
                   help="steps between loss reads, in both loops (train.py's default)")
    p.add_argument("--device", choices=["cpu", "cuda", "xla"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="unset: train.py's choice for the device (bf16 where the hardware has it)")
    p.add_argument("--compile", action="store_true",
                   help="ours: train.py --compile (the forward pass and loss compiled "
                        "together); Trainer: torch_compile=True (its model computes the loss). "
                        "Ignored on XLA")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per loop (torch.set_num_threads); unset: PyTorch's "
                        "default, one per core. 1 gives steadier numbers on a busy machine")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data_only", action="store_true",
                   help="time the data preparation only")
    p.add_argument(
        "--glibc_defaults",
        action="store_true",
        help="CPU: leave glibc's allocator as it is in both loops, instead of "
        "keeping freed memory as train.py does (runtime.hardware.keep_freed_memory)",
    )
    p.add_argument("--no_grouped", action="store_true",
                   help="skip the runs with batches grouped by length")
    return p.parse_args(argv)


def check_args(args):
    """The flags checked as train.py checks them, and the device there, before any work."""
    check_at_least(1, args, "max_seq_length", "batch_size", "warmup_steps", "steps", "repeats",
                   "rounds", "log_every", "threads")
    if args.warmup_steps is None:
        args.warmup_steps = args.log_every + 1
    check_optimizer_args(args)
    choose_device(args.device)
    if args.max_examples is not None and args.max_examples < args.batch_size:
        raise InputError(f"--max_examples {args.max_examples} is less than one batch "
                         f"(--batch_size {args.batch_size})")


# --------------------------------------------------------------------------- data

def prepare_data(args, tokenizer):
    """Time reading and tokenizing every corpus file into an empty cache (cold), then
    loading the features back from it (warm). Returns the training features, warm."""
    files = corpus_read.corpus_files(args.downstream_corpus_root_dir, args.downstream_corpus_name)

    def load_all(cache):
        return [
            corpus_features.load_features(f, tokenizer, args.max_seq_length, cache) for f in files
        ]

    with tempfile.TemporaryDirectory() as cache:
        cold, _ = timed(load_all, cache)
        warm, features = timed(load_all, cache)
    reviews = sum(len(f) for f in features)
    print(f"data preparation: {reviews:,} reviews in {len(files)} files, "
          f"max_seq_length {args.max_seq_length}")
    print(f"  cold (read, tokenize, cache): {cold:8.2f} s  ({reviews / cold:,.0f} reviews/s)")
    print(f"  warm (load from the cache):   {warm:8.2f} s", flush=True)
    return features[0]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def first(features, n):
    if n is None:
        return features
    return corpus_features.Features(
        features.input_ids[:n], features.lengths[:n], features.labels[:n],
        features.trained_from[:n]
    )


# --------------------------------------------------------------------------- the loops

def run_ours(args, features):
    """train.py's loop without evaluation and checkpoints: its backend, batches, step,
    schedule and loss meter, the loss read back every --log_every steps."""
    backend, tokenizer, model = setup(args)
    backend.seed(args.seed)
    model.to(backend.device).train()
    model.tie_weights()  # as train.py does: on XLA the move unties GPT-2's shared embedding
    optimizer = backend.optimizer(train.param_groups(model, args.weight_decay), args.learning_rate)
    total = args.warmup_steps + args.repeats * args.steps
    scheduler = sched.linear_warmup_decay(optimizer, args.warmup_steps, total)
    # As train.py --compile does: the forward pass and the loss compiled together.
    loss_fn = backend.compile(train.token_loss_sum) if args.compile else train.token_loss_sum
    batches = data.TrainBatches(len(features), args.batch_size, backend.world_size,
                                backend.rank, args.seed,
                                features.lengths if args.group_by_length else None)
    dataset = CountedReviewBatches(features, tokenizer.pad_token_id, backend.fixed_shapes,
                                   args.batch_size, args.packed and packs_reviews(model))
    loader = data.make_loader(dataset, batches, 0, backend.pin_memory)
    meter = LossMeter(backend.device, 0)
    clock = Clock(args, backend.device)
    for step, batch in enumerate(epochs(backend, loader, batches), start=1):
        # One micro-batch per step, as the tutorial.
        meter.add(*train.train_step(model, optimizer, scheduler, [batch], backend, step - 1,
                                    args.max_grad_norm, loss_fn))
        if step % args.log_every == 0:
            backend.on_host(read_loss, meter.loss_sum, meter.tokens)
            meter.reset()
        clock.tick(step)
        if step == total:
            break
    return {**result(clock, dataset.tokens, model, backend),
            "rows": sum(dataset.positions) / len(dataset.positions) / features.input_ids.shape[1],
            "real": sum(dataset.tokens) / sum(dataset.positions)}


def epochs(backend, loader, batches):
    """Batches on the device, epoch after epoch."""
    epoch = 0
    while True:
        batches.start_epoch(epoch)
        yield from backend.feed(loader)
        epoch += 1


def read_loss(loss_sum, tokens):
    return loss_sum.item() / max(1, tokens.item())


def run_trainer(args, features):
    """transformers.Trainer in a standard setup with our settings: the same examples as
    token-id lists, padded per batch by DataCollatorForLanguageModeling(mlm=False)."""
    from transformers import (DataCollatorForLanguageModeling, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)
    backend, tokenizer, model = setup(args)
    clock = Clock(args, backend.device)

    class StepClock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick(state.global_step)

    # On XLA every batch is padded to max_seq_length, as ours is, so one graph serves all.
    width = args.max_seq_length if backend.fixed_shapes else None
    collator = CountingCollator(
        DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=width))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.warmup_steps + args.repeats * args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
            lr_scheduler_type="linear", warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            bf16=backend.precision == "bf16", use_cpu=backend.device.type == "cpu",
            # Trainer's default, fused AdamW, has no XLA kernel; ours runs the plain one there.
            optim="adamw_torch" if backend.device.type == "xla" else "adamw_torch_fused",
            torch_compile=args.compile and backend.device.type != "xla",
            group_by_length=args.group_by_length,
            seed=args.seed, logging_steps=args.log_every, save_strategy="no", report_to=[],
            dataloader_num_workers=0, dataloader_pin_memory=backend.pin_memory,
            dataloader_drop_last=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=TokenIds(features),
                          data_collator=collator, callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)  # it prints every logged loss
        trainer.train()
    return result(clock, collator.tokens, model, backend)


class TokenIds(torch.utils.data.Dataset):
    """Each example as a list of its token ids, the form a tokenized dataset hands Trainer."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"input_ids": self.features.input_ids[i, :self.features.lengths[i]].tolist()}


def in_own_process(fn, args, features):
    """Run `fn` in a fresh process: its peak memory is its own and it inherits no warm
    state from the other loop."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, args, features).result()


# (name, function, group_by_length, packed): ours as train.py runs by default (reviews
# packed end to end, random order), then each loop padding batches in random order (like
# for like), and grouped by length (Trainer at its best).
LOOPS = [("ours", run_ours, False, True), ("ours, padded", run_ours, False, False),
         ("Trainer", run_trainer, False, False),
         ("ours, padded, grouped", run_ours, True, False),
         ("Trainer, grouped", run_trainer, True, False)]


def measure(args, features):
    """Each loop's results from --rounds processes, the loops taking turns: on a machine
    that other work shares, all then meet the same mix of quiet and busy spells."""
    loops = [loop for loop in LOOPS if not (args.no_grouped and loop[2])]
    results = {name: [] for name, *_ in loops}
    for _ in range(args.rounds):
        for name, fn, grouped, packed in list(loops):
            try:
                results[name].append(in_own_process(fn, argparse.Namespace(
                    **{**vars(args), "group_by_length": grouped, "packed": packed}), features))
            except Exception as e:
                if fn is run_ours or args.device != "xla":
                    raise
                print(f"{name}: skipped, it failed on XLA ({runtime.errors.first_line(e)})")
                loops.remove((name, fn, grouped, packed))
                del results[name]
    return results


# --------------------------------------------------------------------------- the report

def summary(processes, args):
    """Medians over every repeat of every process; examples/s and ms/step both come from
    the median repeat time. Peak memory: the largest of the processes."""
    seconds = [s for p in processes for s in p["seconds"]]
    tokens = [t for p in processes for t in p["tokens"]]
    median_seconds = statistics.median(seconds)
    return {"examples/s": args.steps * args.batch_size / median_seconds,
            "tokens/s": statistics.median(t / s for t, s in zip(tokens, seconds)),
            "ms/step": 1000 * median_seconds / args.steps,
            "peak MiB": max(p["peak_mib"] for p in processes)}


def print_report(results, args, n_examples):
    first = results["ours"][0]
    model = args.pretrained_model_name or f"random {args.model_shape}-shaped GPT-2"
    print(f"\ntraining: {first['device']}, {model} ({first['params'] / 1e6:.1f}M parameters), "
          f"{n_examples:,} examples, batch {args.batch_size}, max_seq_length "
          f"{args.max_seq_length}{', torch.compile' if args.compile else ''}"
          f"{', glibc allocator defaults' if args.glibc_defaults else ''}")
    print(f"  {args.rounds} process(es) per loop, each {args.warmup_steps} warm-up steps then "
          f"{args.repeats} x {args.steps} timed steps; medians over the repeats; tokens: "
          f"real (non-padding) ones; peak memory: "
          f"{'CUDA allocated' if args.device == 'cuda' else 'process RSS'}")
    for name, processes in results.items():
        if "rows" in processes[0]:
            print(f"  {name}: {processes[0]['rows']:.1f} rows of {args.max_seq_length} "
                  f"positions per batch on average (padded: cut to the longest review), "
                  f"{processes[0]['real']:.0%} of them real tokens")
        if processes[0]["compiles"]:
            counts = ", ".join(f"{p['compiles'][0]} -> {p['compiles'][-1]}" for p in processes)
            print(f"  XLA compilations ({name}), after warm-up -> at the end: {counts}")
    print_table({name: summary(processes, args) for name, processes in results.items()})


def print_table(rows):
    columns = ["examples/s", "tokens/s", "ms/step", "peak MiB"]
    print(f"{'':32}" + "".join(f"{c:>13}" for c in columns))
    for name, row in rows.items():
        print(f"{name:32}" + "".join(f"{row[c]:13,.1f}" for c in columns))
    ratios = {"ours/Trainer's best": ("ours", best_trainer(rows)),
              "ours, padded/Trainer": ("ours, padded", "Trainer"),
              "both padded and grouped": ("ours, padded, grouped", "Trainer, grouped")}
    for label, (ours, theirs) in ratios.items():
        if ours in rows and theirs in rows:
            print(f"{label:32}" + "".join(f"{rows[ours][c] / rows[theirs][c]:12.2f}x"
                                          for c in columns))


def best_trainer(rows):
    """Trainer at its best: grouped by length, with dynamic padding. Not simply the row with
    the most examples/s: in a short run Trainer's grouped batches are its longest ones (its
    sampler puts the longest first), which lowers its examples/s but not its speed."""
    return next((name for name in ("Trainer, grouped", "Trainer") if name in rows), None)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        if not args.pretrained_model_name:  # said aloud: the default is KoGPT2's, on the hub
            print(f"tokenizer: {args.tokenizer} (--tokenizer), for a randomly initialised "
                  f"{args.model_shape}-shaped model", flush=True)
        tokenizer = load_tokenizer(*tokenizer_source(args))
        features = first(prepare_data(args, tokenizer), args.max_examples)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.data_only:
        return 0
    # Whenever torch_xla is installed, Trainer (through accelerate) puts the model on an XLA
    # device, use_cpu=True or not. Both libraries read this switch at import, so it must be
    # set before the loops' processes start; it is their documented way out.
    os.environ["USE_TORCH_XLA"] = "1" if args.device == "xla" else "0"
    print_report(measure(args, features), args, len(features))
    return 0


if __name__ == "__main__":
    sys.exit(main())

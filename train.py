"""Fine-tune KoGPT2 on NSMC so that it writes a positive or a negative movie review on
request: every review is trained as `긍정 review</s>` or `부정 review</s>`.

One hand-written loop serves every backend:

    python train.py                                  # every TPU core, else one GPU, else CPU
    python train.py --device cpu --max_steps 20      # a smoke run

The file reads top to bottom: arguments, the backend, the training step, evaluation,
checkpoints, the loop, and `main`, which prepares the data once and starts the loop in
one process or, on a TPU host, in one process per chip through `xmp.spawn`.
"""
import argparse
import contextlib
import fcntl
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# transformers (imported by model.py) imports torch_xla when it is installed, and torch_xla
# then sets PJRT_DEVICE=CPU on every machine without a TPU. Keep what the user set.
USER_PJRT_DEVICE = os.environ.get("PJRT_DEVICE")

import data  # noqa: E402
import generate  # noqa: E402
import sched  # noqa: E402
from data import InputError  # noqa: E402
from model import (check_loadable, cpu_copy, cpu_state_dict, load_model,  # noqa: E402
                   load_tokenizer, save_pretrained)


# --------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune KoGPT2 on NSMC with polarity-prefixed reviews.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The tutorial's names (nlpbook's GenerationTrainArguments), so a reader finds each knob.
    p.add_argument("--pretrained_model_name", default="skt/kogpt2-base-v2",
                   help="hub name or local directory of a GPT-2-family model and its tokenizer")
    p.add_argument("--downstream_corpus_name", default="nsmc",
                   help="corpus folder under --downstream_corpus_root_dir, or the absolute "
                        "path of one, holding ratings_train.txt and ratings_test.txt")
    p.add_argument("--downstream_corpus_root_dir", default="~/Korpora",
                   help="holds nsmc/ratings_train.txt and nsmc/ratings_test.txt; "
                        "only missing files are downloaded")
    p.add_argument("--downstream_model_dir", default="checkpoint-generation",
                   help="output: the best model, checkpoint-<step>/ folders, metrics.jsonl")
    p.add_argument("--max_seq_length", type=int, default=32,
                   help="tokens per example, the polarity word and </s> included")
    p.add_argument("--batch_size", type=int, default=32, help="examples per device per step")
    p.add_argument("--learning_rate", type=float, default=5e-5,
                   help="peak learning rate, reached at the end of the warm-up")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tpu_cores", type=int, choices=[0, 1, 8], default=None,
                   help="8: every core of the TPU host, 1: one core, 0: no TPU; "
                        "unset: --device decides")
    p.add_argument("--cpu_workers", type=int, default=0,
                   help="DataLoader worker processes; batches are slices of one "
                        "pre-tokenized tensor, so 0 is fastest")
    # Beyond the tutorial.
    p.add_argument("--device", choices=["auto", "xla", "cuda", "cpu"], default="auto",
                   help="auto: XLA when a TPU is attached or PJRT_DEVICE is set, "
                        "else CUDA when available, else CPU")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="unset: bf16 on TPUs and on GPUs that support it, fp32 otherwise")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass and the loss together (CUDA and CPU; "
                        "XLA compiles every step anyway)")
    p.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="fraction of the optimizer steps spent warming up")
    p.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW weight decay (never on biases and LayerNorm)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--grad_accum_steps", type=int, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (the schedule ends there too)")
    p.add_argument("--log_every", type=int, default=50,
                   help="optimizer steps between loss reports (each reads the device once)")
    p.add_argument("--eval_every", type=int, default=None,
                   help="also evaluate every N optimizer steps (always after each epoch)")
    p.add_argument("--save_every_steps", type=int, default=None,
                   help="also save a checkpoint every N optimizer steps (always after each epoch)")
    p.add_argument("--keep_checkpoints", type=int, default=2,
                   help="how many checkpoint-<step>/ folders to keep, newest first")
    p.add_argument("--resume", default=None,
                   help="a checkpoint-<step> folder, or 'latest' for the newest complete one "
                        "in --downstream_model_dir")
    p.add_argument("--cache_dir", default=str(data.default_cache_dir()),
                   help="where tokenized corpora are cached")
    p.add_argument("--train_file", default=None,
                   help="your own corpus instead of NSMC, with --val_file: NSMC's layout, "
                        "'document<TAB>label' lines, or plain text (no labels, no polarity word)")
    p.add_argument("--val_file", default=None, help="the validation file of --train_file")
    p.add_argument("--polarity_eval_size", type=int, default=1000,
                   help="validation reviews scored for polarity accuracy at each evaluation "
                        "(0: none)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


def check_args(args):
    """Reject values that cannot work, naming the flag; resolve paths once."""
    positive = ["max_seq_length", "batch_size", "epochs", "grad_accum_steps", "log_every"]
    optional = ["max_steps", "eval_every", "save_every_steps", "keep_checkpoints"]
    for name in positive + [n for n in optional if getattr(args, n) is not None]:
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be 1 or more, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise InputError(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0 <= args.warmup_ratio <= 1:
        raise InputError(f"--warmup_ratio must be between 0 and 1, got {args.warmup_ratio}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise InputError(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    if args.cpu_workers < 0:
        raise InputError(f"--cpu_workers must be 0 or more, got {args.cpu_workers}")
    if args.polarity_eval_size < 0:
        raise InputError(f"--polarity_eval_size must be 0 or more, got {args.polarity_eval_size}")
    if args.tpu_cores == 0 and args.device == "xla":
        raise InputError("--tpu_cores 0 contradicts --device xla; drop one of them")
    # A local model is recorded by absolute path, so a resumed run from another
    # working directory still finds it and compares equal.
    if Path(args.pretrained_model_name).expanduser().is_dir():
        args.pretrained_model_name = str(Path(args.pretrained_model_name).expanduser().resolve())
    args.downstream_model_dir = str(Path(args.downstream_model_dir).expanduser())


# --------------------------------------------------------------------------- the backend

def choose_device(args):
    """The one place where the backend is decided: 'xla', 'cuda' or 'cpu'."""
    if args.device != "auto":
        kind = args.device
    elif args.tpu_cores == 0:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.tpu_cores or USER_PJRT_DEVICE or tpu_attached():
        kind = "xla"
    else:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if kind == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise InputError("--device xla: torch_xla is not installed; "
                         "pip install torch_xla with the same version as torch")
    return kind


def tpu_attached():
    if importlib.util.find_spec("torch_xla") is None:
        return False
    from torch_xla._internal import tpu  # reads the PCI bus; starts no runtime
    return tpu.num_available_chips() > 0


class Backend:
    """The CPU or one CUDA GPU, in one process. `XlaBackend` overrides what differs when
    the same loop runs on every core of a TPU host. Nothing else in this file asks which
    backend it is on."""
    world_size = 1
    rank = 0
    fixed_shapes = False  # batches may be cut to their longest example

    def __init__(self, kind, precision):
        self.device = torch.device(kind)
        if precision is None:
            precision = "bf16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        if kind == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True

    @property
    def is_master(self):
        return self.rank == 0

    def describe(self):
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        return f"{self.device.type} ({name}), {self.precision}"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def compile(self, fn):
        return torch.compile(fn)

    def optimizer(self, param_groups, lr):
        # Fused: one kernel updates every parameter, on the GPU and on the CPU alike; the
        # default per-parameter loop makes the CPU's optimizer step about 4x slower.
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)

    def feed(self, loader):
        """Batches on the device; pinned host memory lets the copy overlap compute."""
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def pin_memory(self):
        return self.device.type == "cuda"

    def all_reduce_sum(self, tensor):
        return tensor

    def reduce_gradients(self, optimizer):
        pass

    def any_replica(self, flag):
        """True when `flag` is true on any replica (a host read on XLA: call it rarely)."""
        return flag

    def on_host(self, fn, *args):
        """Run `fn(*args)` where it may read tensors: now here, after the step on XLA."""
        fn(*args)

    def barrier(self, name, payload=b""):
        """Wait until every replica is here; returns every replica's `payload`, by rank."""
        return [payload]

    def sync(self):
        """Finish the work queued on the device (XLA runs a step's graph lazily)."""

    def seed(self, seed):
        torch.manual_seed(seed)

    def seed_step(self, step):
        """Called before each optimizer step. The CPU and CUDA generators are restored
        exactly on resume, so there is nothing to do."""

    def rng_state(self):
        cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def set_rng_state(self, state):
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"])

    def generation_model(self, model):
        """The model that `generate` samples from (in eval mode): this one."""
        return model


class XlaBackend(Backend):
    """PyTorch/XLA: one replica per TPU chip (or core), each in its own process."""
    fixed_shapes = True  # one compiled graph for every step

    def __init__(self, precision):
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.runtime as xr
        self.torch_xla, self.xm, self.pl = torch_xla, xm, pl
        self.device = torch_xla.device()
        self.world_size = xr.world_size()
        self.rank = xr.global_ordinal()
        self.hardware = xr.device_type()
        if precision is None:
            precision = "bf16" if self.hardware == "TPU" else "fp32"
        self.precision = precision

    def describe(self):
        return f"xla ({self.hardware}, {self.world_size} replicas), {self.precision}"

    def compile(self, fn):
        return fn  # every step is compiled into one graph already

    def optimizer(self, param_groups, lr):
        return torch.optim.AdamW(param_groups, lr=lr)

    def feed(self, loader):
        # Copies batches to the device in the background and cuts the graph after each.
        return self.pl.MpDeviceLoader(loader, self.device)

    pin_memory = False

    def all_reduce_sum(self, tensor):
        return self.xm.all_reduce(self.xm.REDUCE_SUM, tensor)

    def reduce_gradients(self, optimizer):
        # xm.optimizer_step would reduce and step in one call; reducing first lets the
        # gradient be clipped by its global norm, the same on every replica.
        self.xm.reduce_gradients(optimizer)

    def any_replica(self, flag):
        if self.world_size == 1:
            return flag
        flag = torch.tensor(float(flag), device=self.device)
        return self.xm.all_reduce(self.xm.REDUCE_MAX, flag).item() > 0

    def on_host(self, fn, *args):
        self.xm.add_step_closure(fn, args)

    def barrier(self, name, payload=b""):
        return self.xm.rendezvous(name, payload)

    def sync(self):
        # Otherwise each tensor read back (weights for a checkpoint) would compile and run
        # a graph of its own.
        self.torch_xla.sync()

    def seed(self, seed):
        torch.manual_seed(seed)
        self.base_seed = seed

    def seed_step(self, step):
        """XLA moves its device generator on at every graph cut (each sync, barrier or host
        read), so after a resume, which cuts the graph a different number of times, the
        generator would be elsewhere. Keying dropout's random stream to (seed, replica,
        step) makes a resumed run draw the very masks an uninterrupted one draws, and
        each replica draw its own. Setting the seed compiles nothing new."""
        self.xm.set_rng_state(self.base_seed + 1_000_003 * (step * self.world_size + self.rank),
                              self.device)

    # The CPU generator is one per process, shared by replicas that are threads, and the
    # step draws nothing from it on XLA (dropout uses the device's): only the device's
    # generator is this replica's own. seed_step sets it before every step anyway.
    def rng_state(self):
        return {"xla": self.xm.get_rng_state(self.device)}

    def set_rng_state(self, state):
        self.xm.set_rng_state(state["xla"], self.device)

    def generation_model(self, model):
        """A copy on the CPU: `generate` on XLA compiles a graph for almost every token."""
        return cpu_copy(model)


def replica_steps(num_examples, batch_size, world_size, grad_accum_steps):
    """How the work splits across replicas: (micro-batches each replica trains on per
    epoch, optimizer steps per epoch, examples per optimizer step)."""
    batches = data.batches_per_epoch(num_examples, batch_size, world_size)
    return batches, math.ceil(batches / grad_accum_steps), batch_size * world_size * grad_accum_steps


# --------------------------------------------------------------------------- the step

def token_loss_sum(model, batch):
    """Summed next-token cross-entropy over the real (non-padding) tokens of `batch`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position i predicts token i+1. Shifting the labels left (the last position gets -100)
    # rather than dropping the last position's logits keeps the logits, the step's largest
    # tensor, contiguous: slicing them cost a full copy forward and another backward.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=-100, reduction="sum")


def count_targets(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def accumulate_gradients(model, window, backend, loss_sum_fn=token_loss_sum):
    """Backward over `window`, a list of micro-batches, so that once the replicas' gradients
    are averaged they are those of the mean loss over every real token of the global
    batch: each token weighs the same however tokens fall across micro-batches and
    replicas. Returns this replica's loss sum and the global token count, on the device."""
    n_tokens = backend.all_reduce_sum(sum(count_targets(batch) for batch in window))
    loss_sum = torch.zeros((), device=backend.device)
    for batch in window:
        with backend.autocast():
            batch_loss = loss_sum_fn(model, batch)
        # Replica gradients are averaged, so each replica scales its share by world_size.
        (batch_loss * backend.world_size / n_tokens).backward()
        loss_sum += batch_loss.detach()
    return loss_sum, n_tokens


def train_step(run, window):
    """One optimizer step; returns the global loss sum and token count, on the device."""
    loss_sum, n_tokens = accumulate_gradients(run.model, window, run.backend, run.loss_sum_fn)
    run.backend.reduce_gradients(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return run.backend.all_reduce_sum(loss_sum), n_tokens


def windows(batches, size):
    """Group micro-batches for gradient accumulation; the last group may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def param_groups(model, weight_decay):
    """Weight decay on matrices only: biases and LayerNorm weights are 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class LossMeter:
    """Sums loss and tokens on the device between reports, so the host reads them once
    per report rather than once per step, and remembers the first non-finite step."""

    def __init__(self, device, step):
        self.device = device
        self.step = torch.tensor(step, device=device)
        self.first_bad_step = torch.tensor(0, device=device)  # 0: none so far
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


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(run):
    """Validation loss over every real token of the validation set, all replicas
    together, and its perplexity."""
    model, backend = run.model, run.backend
    model.eval()
    loss_sum = torch.zeros((), device=backend.device)
    tokens = torch.zeros((), dtype=torch.long, device=backend.device)
    for batch in backend.feed(run.val_loader):
        with backend.autocast():
            loss_sum += run.loss_sum_fn(model, batch)
        tokens += count_targets(batch)
    model.train()
    val_loss = (backend.all_reduce_sum(loss_sum) / backend.all_reduce_sum(tokens)).item()
    return val_loss, math.exp(min(val_loss, 50))


def evaluate_polarity(run):
    """How well the model keeps the polarities apart: its polarity accuracy on
    --polarity_eval_size validation reviews, and one short review of each polarity (the
    master's). Nothing for a corpus without labels."""
    features = run.val_loader.dataset.features  # the validation set, as its loader holds it
    if features.labels is None:
        return {}
    result = {}
    run.model.eval()
    if run.args.polarity_eval_size:
        result["polarity_accuracy"] = polarity_accuracy(run, features)
    if run.backend.is_master:
        result["samples"] = training_samples(run)
    run.model.train()
    return result


def polarity_accuracy(run, features):
    """generate.polarity_accuracy on every replica at once: each scores its share of the
    reviews, in batches of one shape on XLA, and the counts are summed across replicas."""
    args, backend = run.args, run.backend
    dataset = generate.PolarityBatches(features, run.tokenizer, args.polarity_eval_size,
                                       backend.fixed_shapes, args.batch_size)
    index_batches = data.eval_batches(len(dataset), args.batch_size, backend.world_size,
                                      backend.rank)
    loader = data.make_loader(dataset, index_batches, args.cpu_workers, backend.pin_memory)
    with backend.autocast():
        counts = generate.polarity_counts(run.model, run.tokenizer, backend.feed(loader))
    correct, total = backend.all_reduce_sum(torch.stack(counts)).tolist()  # one host read
    return correct / total


def training_samples(run):
    """One short review of each polarity. Seeded, and drawn without touching the training
    RNG, so a run with samples trains exactly as one without."""
    model = run.backend.generation_model(run.model)
    settings = {**generate.SAMPLING, "max_new_tokens": 20}
    return {word: generate.write_reviews(model, run.tokenizer, word, settings,
                                         seed=run.args.seed)[0]
            for word in data.POLARITY.values()}


def evaluate_and_keep_best(run, export=True):
    val_loss, perplexity = evaluate(run)
    if not math.isfinite(val_loss):
        raise NonFiniteLoss(f"validation loss is {val_loss} at step {run.progress.step}")
    run.log({"event": "eval", "val_loss": val_loss, "perplexity": perplexity,
             **evaluate_polarity(run)})
    if export and val_loss < run.progress.best_val_loss:
        run.progress.best_val_loss = val_loss
        export_best(run)
    return val_loss


def export_best(run):
    """The best model so far, in Hugging Face format, at the top of downstream_model_dir.
    Written beside and renamed into place file by file, so a crash leaves the old one."""
    out = Path(run.args.downstream_model_dir)
    if run.backend.is_master:
        with saving(out / "best", previous=out):
            tmp = out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(run.model, run.tokenizer, tmp, cpu_state_dict(run.model))
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
    run.backend.barrier("best-exported")


# --------------------------------------------------------------------------- checkpoints

@dataclass
class Progress:
    step: int = 0               # optimizer steps done
    epoch: int = 0              # the epoch in progress
    batches_done: int = 0       # micro-batches of that epoch already trained on
    best_val_loss: float = math.inf


# Arguments that change what a step computes: resuming with others cannot continue the run.
SHAPE_ARGS = ["pretrained_model_name", "downstream_corpus_name", "train_file", "max_seq_length",
              "batch_size", "grad_accum_steps", "seed", "world_size"]
NOT_COMPARED = ["resume", "debug", "cpu_workers", "compile", "cache_dir",
                "downstream_model_dir", "downstream_corpus_root_dir"]


def save_checkpoint(run):
    """`checkpoint-<step>/`: the model in Hugging Face format plus everything needed to
    continue (optimizer, scheduler, progress, arguments, each replica's RNG state).

    Written under a temporary name and renamed when complete, so a crash mid-save leaves
    the previous checkpoint as it was. Every replica takes part: each writes its own RNG
    state and learns whether all writes succeeded (xm.save is not used because a write
    that fails on one replica would leave the others waiting in its barrier forever)."""
    backend, out = run.backend, Path(run.args.downstream_model_dir)
    backend.sync()
    check_finite(run)
    final = out / f"checkpoint-{run.progress.step}"
    tmp = out / f"checkpoint-{run.progress.step}.tmp"

    def write_model_and_state():
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(run.model, run.tokenizer, tmp, cpu_state_dict(run.model))
        torch.save(training_state(run), tmp / "training_state.pt")

    error = write_or_error(write_model_and_state) if backend.is_master else None
    backend.barrier("checkpoint-started")  # the folder exists before the replicas write in it
    error = error or write_or_error(
        lambda: torch.save(backend.rng_state(), tmp / f"rng_state_{backend.rank}.pt"))
    if backend.any_replica(error is not None):
        if backend.is_master:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out, warn=False)
        raise CheckpointError(
            f"could not write {final} ({data.first_line(error) if error else 'on another replica'}); "
            f"{f'{previous} is intact' if previous else 'no earlier checkpoint exists'}. "
            f"Free some space, then run the same command with --resume latest")
    backend.barrier("checkpoint-written")
    if backend.is_master:
        replace_dir(tmp, final)
        prune_checkpoints(out, run.args.keep_checkpoints)
    backend.barrier("checkpoint-done")
    return final


def write_or_error(write):
    """Run `write()`; return the OSError it raised (a full disk, say), or None."""
    try:
        write()
    except OSError as e:
        return e
    return None


def training_state(run):
    return {"progress": asdict(run.progress),
            "optimizer": to_cpu(run.optimizer.state_dict()),
            "scheduler": run.scheduler.state_dict(),
            "args": {**vars(run.args), "world_size": run.backend.world_size}}


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def replace_dir(src, dst):
    if dst.exists():  # the same step saved twice (an epoch's end that is also a save step)
        shutil.rmtree(dst)
    os.replace(src, dst)


def checkpoints(out):
    """checkpoint-<step> folders in `out`, newest first (temporary ones included)."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-").removesuffix(".tmp")
        if step.isdigit() and path.is_dir():
            found.append((int(step), path.name.endswith(".tmp"), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def is_complete(path):
    return all((path / f).is_file() for f in
               ("config.json", "model.safetensors", "training_state.pt", "rng_state_0.pt"))


def latest_checkpoint(out, warn=True):
    for path in checkpoints(out):
        if not path.name.endswith(".tmp") and is_complete(path):
            return path
        if warn:
            print(f"warning: skipping {path}: incomplete (a save was interrupted)", file=sys.stderr)
    return None


def prune_checkpoints(out, keep):
    complete = [p for p in checkpoints(out) if not p.name.endswith(".tmp")]
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(args):
    if args.resume is None:
        return None
    if args.resume == "latest":
        path = latest_checkpoint(args.downstream_model_dir)
        if path is None:
            print(f"--resume latest: no checkpoint in {args.downstream_model_dir} yet; "
                  f"starting from the beginning", file=sys.stderr)
        return path
    path = Path(args.resume).expanduser()
    if not is_complete(path):
        raise InputError(f"--resume {args.resume}: not a complete checkpoint folder (it needs "
                         f"config.json, model.safetensors, training_state.pt, rng_state_0.pt)")
    return path


def check_resume_args(saved, args, world_size):
    """Refuse to continue with arguments that change the work; warn about the rest."""
    current = {**vars(args), "world_size": world_size}
    changed = [k for k in current if k not in NOT_COMPARED and saved.get(k) != current[k]]
    fatal = [k for k in changed if k in SHAPE_ARGS]
    if "world_size" in fatal:
        raise InputError(f"--resume: the checkpoint was trained on {saved.get('world_size')} "
                         f"replicas and this run has {world_size}; resume on as many devices "
                         f"(CPU_NUM_DEVICES on the CPU, the same TPU), or start a new "
                         f"--downstream_model_dir")
    if fatal:
        k = fatal[0]
        raise InputError(f"--resume: --{k} is {current[k]!r} but the checkpoint was trained "
                         f"with {saved.get(k)!r}; use the same value or start a new "
                         f"--downstream_model_dir")
    for k in changed:
        print(f"warning: --resume: --{k} changed from {saved.get(k)!r} to {current[k]!r}",
              file=sys.stderr)


def restore(run, path):
    """Load the optimizer, scheduler, progress and this replica's RNG state from `path`
    (the weights were loaded from it with the model)."""
    state = torch.load(path / "training_state.pt", weights_only=True)
    check_resume_args(state["args"], run.args, run.backend.world_size)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.progress = Progress(**state["progress"])
    run.backend.set_rng_state(
        torch.load(path / f"rng_state_{run.backend.rank}.pt", weights_only=True))
    truncate_metrics(run.metrics_path, run.progress.step)


def check_finite(run):
    bad = int(run.meter.first_bad_step.item())
    if bad:
        raise NonFiniteLoss(f"the training loss became non-finite at step {bad}")


@contextlib.contextmanager
def saving(what, previous):
    """Turn a failed write (a full disk, a read-only folder) into one clear line."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"could not write {what} ({data.first_line(e)}); what was "
                              f"already in {previous} is intact. Free some space, then run "
                              f"the same command with --resume latest") from None


# --------------------------------------------------------------------------- the loop

class NonFiniteLoss(Exception):
    pass


class CheckpointError(Exception):
    pass


class Interrupted(Exception):
    def __init__(self, message, signum):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self):
        return self.message


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (preemption, `kill`) become a flag that the loop checks
    between steps, so the step in flight finishes and a checkpoint is written. A second
    signal of the same kind stops the process at once. One flag per process."""
    signum = None

    @classmethod
    def install(cls):
        cls.signum = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, cls.handle)

    @classmethod
    def handle(cls, signum, frame):
        cls.signum = signum
        signal.signal(signum, signal.SIG_DFL)


@dataclass
class Run:
    """What the loop works on, gathered so functions can take one argument."""
    args: argparse.Namespace
    backend: Backend
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_batches: data.TrainBatches
    train_loader: object
    val_loader: object
    steps_per_epoch: int
    batches_per_epoch: int
    total_steps: int
    metrics_path: Path
    loss_sum_fn: object = token_loss_sum
    progress: Progress = None
    meter: LossMeter = None
    nonfinite: str = None

    def log(self, event):
        """Append one event to metrics.jsonl (master only)."""
        if self.backend.is_master:
            epoch = round(self.progress.step / self.steps_per_epoch, 4)
            event = {**event, "step": self.progress.step, "epoch": epoch}
            with saving(self.metrics_path, previous=self.metrics_path.parent):
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event, ensure_ascii=False) + "\n")
            if event["event"] == "eval":
                line = (f"step {event['step']}: val_loss {event['val_loss']:.4f} "
                        f"perplexity {event['perplexity']:.2f}")
                if "polarity_accuracy" in event:
                    line += f" polarity_accuracy {event['polarity_accuracy']:.4f}"
                tqdm.write(line)
                for polarity, review in event.get("samples", {}).items():
                    tqdm.write(f"  {polarity}: {review}")


def truncate_metrics(path, step):
    """Drop events logged after `step`: a resumed run logs those steps again."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step)
    data.write_atomically(path, lambda tmp: tmp.write_text(kept, encoding="utf-8"))


def setup(backend, args):
    """Tokenizer, data, model, optimizer and schedule for one replica."""
    backend.seed(args.seed)
    tokenizer = load_tokenizer(args.pretrained_model_name)
    train_features, val_features = load_corpus(args, tokenizer)
    batches, steps_per_epoch, _ = replica_steps(len(train_features), args.batch_size,
                                                backend.world_size, args.grad_accum_steps)
    if batches == 0:
        raise InputError(f"{len(train_features)} training examples cannot fill one batch of "
                         f"--batch_size {args.batch_size} on each of {backend.world_size} "
                         f"replicas; lower --batch_size")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    train_batches = data.TrainBatches(len(train_features), args.batch_size,
                                      backend.world_size, backend.rank, args.seed)
    val_batches = data.eval_batches(len(val_features), args.batch_size,
                                    backend.world_size, backend.rank)

    def loader(features, index_batches):
        dataset = data.ReviewBatches(features, tokenizer.pad_token_id,
                                     backend.fixed_shapes, args.batch_size)
        return data.make_loader(dataset, index_batches, args.cpu_workers, backend.pin_memory)

    check_output_shared(backend, args.downstream_model_dir)
    checkpoint = agreed_checkpoint(backend, args)
    model = load_model(str(checkpoint or args.pretrained_model_name), tokenizer,
                       device=backend.device).train()
    optimizer = backend.optimizer(param_groups(model, args.weight_decay), args.learning_rate)
    warmup = sched.warmup_steps_for(total_steps, args.warmup_ratio, args.warmup_steps)
    run = Run(args=args, backend=backend, tokenizer=tokenizer, model=model, optimizer=optimizer,
              scheduler=sched.linear_warmup_decay(optimizer, warmup, total_steps),
              train_batches=train_batches, train_loader=loader(train_features, train_batches),
              val_loader=loader(val_features, val_batches), steps_per_epoch=steps_per_epoch,
              batches_per_epoch=batches, total_steps=total_steps,
              metrics_path=Path(args.downstream_model_dir) / "metrics.jsonl",
              progress=Progress())
    if args.compile:
        # The loss with the model, so that the compiler fuses the output layer, the step's
        # largest matrix product, with the cross-entropy that consumes it.
        run.loss_sum_fn = backend.compile(token_loss_sum)
    if checkpoint:
        restore(run, checkpoint)
    run.meter = LossMeter(backend.device, run.progress.step)
    if backend.is_master:
        print_banner(run, train_features, val_features, warmup, checkpoint)
    return run


def check_output_shared(backend, out):
    """Every replica must see what the master writes in `out`: it resumes from there. On a
    TPU pod, where each host runs this script, a folder on a host's own disk would leave
    the hosts resuming from different steps and waiting for each other forever: one line
    now instead."""
    if backend.world_size == 1:
        return
    probe = Path(out) / ".replicas-see-this"
    token = f"{os.getpid()} {time.time_ns()}"
    if backend.is_master:
        probe.write_text(token)
    token = backend.barrier("output-probe", token.encode())[0].decode()  # the master's
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    if backend.any_replica(not seen):
        raise InputError(f"--downstream_model_dir {out}: some replicas cannot see what the "
                         f"master writes there; on a TPU pod it must be storage every host "
                         f"sees (NFS, a Filestore or GCS FUSE mount), at the same path")


def agreed_checkpoint(backend, args):
    """The checkpoint to resume from, as the master chose it, so that every replica
    continues from the same step."""
    chosen = find_resume_checkpoint(args) if backend.is_master else None
    chosen = backend.barrier("resume-from", str(chosen or "").encode())[0].decode()
    return Path(chosen) if chosen else None


def load_corpus(args, tokenizer):
    """Train and validation features, from the cache after the first run."""
    train_file, val_file = data.corpus_files(args.downstream_corpus_root_dir,
                                             args.downstream_corpus_name,
                                             args.train_file, args.val_file)
    features = [data.load_features(f, tokenizer, args.max_seq_length, args.cache_dir)
                for f in (train_file, val_file)]
    if (features[0].labels is None) != (features[1].labels is None):
        unlabelled, labelled = ((train_file, val_file) if features[0].labels is None
                                else (val_file, train_file))
        raise InputError(f"{unlabelled} has no labels but {labelled} has; give both files "
                         f"labels, or neither")
    return features


def print_banner(run, train_features, val_features, warmup, checkpoint):
    args, backend = run.args, run.backend
    _, _, global_batch = replica_steps(len(train_features), args.batch_size,
                                       backend.world_size, args.grad_accum_steps)
    polarity = ("긍정 or 부정 before each review" if train_features.labels is not None
                else "none (no labels: plain language modelling)")
    lines = [
        f"device:           {backend.describe()}",
        f"model:            {args.pretrained_model_name}",
        f"train examples:   {len(train_features):,} ({train_features.blank} blank skipped, "
        f"{train_features.truncated:,} cut to {args.max_seq_length} tokens)",
        f"val examples:     {len(val_features):,} ({val_features.blank} blank skipped)",
        f"polarity word:    {polarity}",
        f"batch:            {args.batch_size} x {backend.world_size} replicas x "
        f"{args.grad_accum_steps} accumulation = {global_batch} examples per step",
        f"steps:            {run.steps_per_epoch:,} per epoch, {run.total_steps:,} in all, "
        f"{warmup:,} warm-up, peak lr {args.learning_rate:g}",
        f"output:           {args.downstream_model_dir}",
    ]
    if checkpoint:
        lines.append(f"resuming:         {checkpoint} (step {run.progress.step}, "
                     f"epoch {run.progress.epoch + 1})")
    print("\n".join(lines), flush=True)


def report(run, loss_sum, tokens, first_bad_step, step, lr, seconds, bar):
    """Host side of a loss report: runs once the step's tensors are computed."""
    if int(first_bad_step):
        run.nonfinite = f"the training loss became non-finite at step {int(first_bad_step)}"
        return
    loss = loss_sum.item() / max(1, tokens.item())
    tokens_per_s = tokens.item() / max(seconds, 1e-9)
    run.log({"event": "train", "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")


def after_step(run, stop):
    """Evaluate and save when due; returns True when a stop signal ends the run here."""
    args, backend, progress = run.args, run.backend, run.progress
    epoch_done = progress.batches_done >= run.batches_per_epoch
    if epoch_done:
        progress.epoch += 1
        progress.batches_done = 0
    last = progress.step >= run.total_steps
    # A signal can reach one replica a few steps before another. On XLA the replicas agree
    # on it at report steps only, because agreeing reads the device.
    stopping = False
    if backend.world_size == 1 or progress.step % args.log_every == 0:
        stopping = backend.any_replica(stop.signum is not None)
    paused = time.perf_counter()
    if epoch_done or last or (args.eval_every and progress.step % args.eval_every == 0):
        evaluate_and_keep_best(run)  # before saving, so the checkpoint knows the best loss
    if (epoch_done or last or stopping
            or (args.save_every_steps and progress.step % args.save_every_steps == 0)):
        save_checkpoint(run)
    run.meter.started += time.perf_counter() - paused  # tokens/s counts training time only
    return stopping


def step_and_report(run, window, bar):
    """Train on one window of micro-batches, count it, and report the loss when due."""
    progress, meter = run.progress, run.meter
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
    run.backend.seed_step(progress.step)
    loss_sum, tokens = train_step(run, window)
    progress.step += 1
    progress.batches_done += len(window)
    meter.add(loss_sum, tokens)
    bar.update(1)
    if progress.step % run.args.log_every == 0 or progress.step == run.total_steps:
        run.backend.on_host(report, run, meter.loss_sum, meter.tokens, meter.first_bad_step,
                            progress.step, lr, time.perf_counter() - meter.started, bar)
        meter.reset()
    if run.nonfinite:
        raise NonFiniteLoss(run.nonfinite)


def train(backend, args):
    """The whole run on one replica: every backend enters here."""
    if threading.current_thread() is threading.main_thread():
        StopSignal.install()  # XLA replicas: see the end of this file
    run = setup(backend, args)
    progress = run.progress
    if progress.step == 0:
        evaluate_and_keep_best(run, export=False)  # the starting point, for comparison
    run.meter.reset()
    with tqdm(total=run.total_steps, initial=progress.step, desc="train", dynamic_ncols=True,
              disable=not backend.is_master) as bar:  # closed before any error is printed
        while progress.step < run.total_steps:
            run.train_batches.start_epoch(progress.epoch, skip_batches=progress.batches_done)
            for window in windows(backend.feed(run.train_loader), args.grad_accum_steps):
                step_and_report(run, window, bar)
                if after_step(run, StopSignal):
                    raise interrupted(run, StopSignal.signum)
                if progress.step >= run.total_steps:
                    break
    if backend.is_master:
        print(f"done: best val_loss {progress.best_val_loss:.4f}; model in "
              f"{args.downstream_model_dir}", flush=True)


def interrupted(run, signum):
    signum = signum or signal.SIGTERM  # the signal may have reached another replica only
    saved = Path(run.args.downstream_model_dir) / f"checkpoint-{run.progress.step}"
    return Interrupted(f"stopped by {signal.Signals(signum).name} at step {run.progress.step}: "
                       f"saved {saved}. To continue, run the same command with --resume latest",
                       signum)


def train_on_xla(index, args):
    """Entry point of each XLA replica (xmp.spawn passes its index first)."""
    exit_with_launcher()
    backend = XlaBackend(args.precision)
    try:
        train(backend, args)
    except (InputError, Interrupted, CheckpointError, NonFiniteLoss):
        # Every replica raises these together: they read the same files with the same
        # arguments (check_output_shared made sure), and agree on signals and failed writes.
        raise
    except BaseException as e:
        if backend.world_size == 1:
            raise
        end_process(e, backend.rank)


def end_process(error, rank):
    """A replica that fails alone leaves the others waiting for it inside a collective,
    where nothing can reach them (replicas may be threads of this very process): print its
    error and end the process, which the launcher then reports."""
    print(f"replica {rank} failed:", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def exit_with_launcher():
    """A replica must not outlive its launcher (killed by SIGKILL, say): it would go on
    writing into an output directory that a new run may by then own."""
    launcher = multiprocessing.parent_process()
    if launcher is not None:  # None when xmp.spawn runs the replica in this process
        threading.Thread(target=lambda: (launcher.join(), os._exit(1)), daemon=True).start()


# --------------------------------------------------------------------------- main

@contextlib.contextmanager
def exclusive(directory):
    """Hold a lock on the output directory so two runs cannot write into it at once. The
    operating system releases it when the process ends, however it ends."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "a+")
    except OSError as e:
        raise InputError(f"--downstream_model_dir {directory} cannot be written "
                         f"({data.first_line(e)}); choose a writable directory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"--downstream_model_dir {directory} is in use by another "
                             f"training run (pid {lock.read().strip() or '?'}); wait for it "
                             f"to finish or choose another directory") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def prepare(args):
    """Work done once, before any replica starts: check the model name, find or download
    the corpus, tokenize it into the cache. Replicas then only read the cache."""
    check_loadable(args.pretrained_model_name, "--pretrained_model_name", args.max_seq_length)
    load_corpus(args, load_tokenizer(args.pretrained_model_name))


def spawn_xla(args):
    import torch_xla.distributed.xla_multiprocessing as xmp
    # Ctrl-C reaches every replica from the terminal; a SIGTERM sent to this process
    # alone (a preempted TPU VM, `kill`) is passed on so that every replica saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: [
        os.kill(child.pid, signum) for child in multiprocessing.active_children()])
    # nprocs: None means every device; recent torch_xla accepts nothing but 1 or None.
    xmp.spawn(train_on_xla, args=(args,), nprocs=1 if args.tpu_cores == 1 else None)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        kind = choose_device(args)
        print(f"device: {kind}", flush=True)
        with exclusive(args.downstream_model_dir):
            prepare(args)
            if kind == "xla":
                spawn_xla(args)
            else:
                train(Backend(kind, args.precision), args)
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


if __name__ == "__mp_main__" or multiprocessing.parent_process() is not None:
    # A replica process started by xmp.spawn imports this module in its main thread (as
    # __mp_main__ when it was the script run, else as `train`), then trains in a worker
    # thread, where Python cannot install signal handlers: install them now.
    StopSignal.install()

if __name__ == "__main__":
    sys.exit(main())

"""What bench_train.py measures with: the backend and the model each loop runs on, a clock
that reads the device only at its marks, the batches counted as they are built, peak memory,
and one result row. Imported by bench_train.py (run that)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import data  # noqa: E402
from model import load_model, load_tokenizer, packs_reviews, splits_off_output_layer  # noqa: E402
from runtime import backends  # noqa: E402
from runtime.errors import InputError  # noqa: E402

# Randomly initialised GPT-2 shapes for --model_shape. `kogpt2` is skt/kogpt2-base-v2's exact
# shape (125M parameters, vocabulary 51,200); `tiny` uses the tokenizer's own vocabulary.
SHAPES = {
    "kogpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=51200),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=128),
}


def make_backend(args):
    """train.py's backend: the device, precision and optimizer both loops use."""
    if args.device == "xla":
        return backends.XlaBackend(args.precision)
    return backends.Backend(args.device, args.precision)


def synchronize(device):
    """Wait until the device has run everything queued, so a timer read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "xla":
        import torch_xla
        import torch_xla.core.xla_model as xm
        torch_xla.sync()
        xm.wait_device_ops()


def xla_compiles():
    import torch_xla.debug.metrics as met
    compile_time = met.metric_data("CompileTime")
    return compile_time[0] if compile_time else 0


class Clock:
    """Time stamps at the steps that end the warm-up and each repeat, each taken after the
    device has caught up: between steps, never inside one."""

    def __init__(self, args, device):
        self.marks = {args.warmup_steps + i * args.steps for i in range(args.repeats + 1)}
        self.device = device
        self.times = []
        self.compiles = []  # XLA's compile count at the first and the last mark

    def tick(self, step):
        if step not in self.marks:
            return
        synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.device.type == "xla" and len(self.times) in (1, len(self.marks)):
            self.compiles.append(xla_compiles())


class CountedReviewBatches(data.ReviewBatches):
    """Our batches, noting each one's real (non-padding) tokens in the order they are built."""

    def __init__(self, *args):
        super().__init__(*args)
        self.tokens = []
        self.positions = []  # the batch's rows x columns: what the transformer runs on

    def __getitem__(self, item):
        batch = super().__getitem__(item)
        indices = item[0] if isinstance(item, tuple) else item
        self.tokens.append(int(self.features.lengths[indices].sum()))
        self.positions.append(batch["input_ids"].numel())
        return batch


class CountingCollator:
    """Trainer's collator, noting each batch's real tokens as CountedReviewBatches does."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def build_model(args, tokenizer):
    """The model both loops train: the same weights, from the same seed."""
    if args.pretrained_model_name:
        return load_model(args.pretrained_model_name, tokenizer)
    from transformers import GPT2Config, GPT2LMHeadModel
    shape = {"vocab_size": len(tokenizer), **SHAPES[args.model_shape]}
    if shape["vocab_size"] < len(tokenizer):
        raise InputError(f"--model_shape {args.model_shape}: the tokenizer has {len(tokenizer)} "
                         f"tokens, more than the model's {shape['vocab_size']}")
    torch.manual_seed(args.seed)
    config = GPT2Config(bos_token_id=0, eos_token_id=1, pad_token_id=3, **shape)
    model = GPT2LMHeadModel(config)
    splits_off_output_layer(model)  # as load_model does: found once, before compiling
    packs_reviews(model)
    return model


def tokenizer_source(args):
    """The tokenizer's name and the flag that gave it, for error messages."""
    if args.pretrained_model_name:
        return args.pretrained_model_name, "--pretrained_model_name"
    return args.tokenizer, "--tokenizer"


def setup(args):
    """What each loop's process starts with: backend, tokenizer, model."""
    from transformers.utils import logging
    logging.set_verbosity_error()  # keep the table readable
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.glibc_defaults:
        backends.keep_freed_memory = lambda: None
    backend = make_backend(args)
    tokenizer = load_tokenizer(*tokenizer_source(args))
    model = build_model(args, tokenizer)
    return backend, tokenizer, model


def peak_rss_mib():
    """This process's peak resident memory (Linux). /proc counts this process alone, while
    getrusage's ru_maxrss would also count the pages of the parent it was spawned from."""
    status = Path("/proc/self/status").read_text().splitlines()
    kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) / 2**10


def result(clock, tokens_per_batch, model, backend):
    """What a loop's process reports: per repeat its seconds and real tokens, plus memory."""
    if backend.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    marks = sorted(clock.marks)
    return {"seconds": [b - a for a, b in zip(clock.times, clock.times[1:])],
            "tokens": [sum(tokens_per_batch[a:b]) for a, b in zip(marks, marks[1:])],
            "peak_mib": peak, "compiles": clock.compiles,
            "device": backend.describe(),
            "params": sum(p.numel() for p in model.parameters())}

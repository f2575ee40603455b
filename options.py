"""train.py's arguments, checked; and what must be decided before torch is imported. Only
the standard library is used here, so that `--help` and a mistyped flag are answered at
once, and so that a run that will not use XLA can keep torch_xla from loading at all.
"""
import argparse
import glob
import importlib.util
import math
import os
from pathlib import Path

from runtime.errors import InputError


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kogpt2-nsmc"


# --------------------------------------------------------------------------- arguments

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, which answers a mistyped flag or value in one line, as every
    other bad input is answered, instead of its whole usage (dozens of lines for train.py)
    followed by the error. Every script of the project parses with it."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def parse_args(argv=None):
    p = ArgumentParser(
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
                        "unset: --device decides (1 and 8 need a TPU; --device xla "
                        "--tpu_cores 1: one XLA replica on the CPU)")
    p.add_argument("--cpu_workers", type=int, default=0,
                   help="DataLoader worker processes; batches are slices of one "
                        "pre-tokenized tensor, so 0 is fastest")
    # Beyond the tutorial.
    p.add_argument("--device", choices=["auto", "xla", "cuda", "cpu"], default="auto",
                   help="auto: XLA when a TPU is attached (or PJRT_DEVICE names an "
                        "accelerator), else CUDA when available, else CPU")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="unset: bf16 on TPUs, on GPUs that support it and on CPUs with AMX "
                        "(Intel Xeon from Sapphire Rapids on), fp32 otherwise")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass and the loss together (CUDA and CPU, "
                        "with a C++ compiler; refused on XLA, which compiles every step anyway)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the run's "
                        "processes (FSDP2 under torchrun) or XLA replicas (PyTorch/XLA's FSDP): "
                        "a model too large for one device trains, at the cost of more "
                        "communication per step")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="keep only each transformer block's input and recompute the rest in "
                        "the backward: less memory (most of the activations), a second "
                        "forward's compute; the same gradients, on every device")
    p.add_argument("--no_packing", action="store_true",
                   help="pad each batch's reviews to a rectangle instead of packing them end "
                        "to end in fewer rows (the same training either way; packing skips "
                        "most of the padding's work)")
    p.add_argument("--group_by_length", action="store_true",
                   help="batches of reviews of similar lengths, as Trainer's: less padding, "
                        "faster steps, another data order")
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
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh in a --downstream_model_dir that holds an earlier run, "
                        "deleting its checkpoints, metrics.jsonl and best model")
    p.add_argument("--cache_dir", default=str(default_cache_dir()),
                   help="where tokenized corpora are cached")
    p.add_argument("--train_file", default=None,
                   help="your own corpus instead of NSMC, with --val_file: NSMC's layout, "
                        "'document<TAB>label' lines, plain text (no labels, no polarity word), "
                        "or a .jsonl file of prompt/response pairs (the loss on the responses)")
    p.add_argument("--val_file", default=None, help="the validation file of --train_file")
    p.add_argument("--eval_size", type=int, default=2000,
                   help="validation reviews (spread over the file) whose loss each evaluation "
                        "measures (0: all of them)")
    p.add_argument("--polarity_eval_size", type=int, default=500,
                   help="validation reviews scored for polarity accuracy at each evaluation "
                        "(0: none, and no control accuracy either)")
    p.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard",
                   help="also write the metrics as TensorBoard event files in "
                        "--downstream_model_dir/tensorboard (metrics.jsonl is always written)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


def check_args(args):
    """Reject values that cannot work, naming the flag; resolve paths once. Written as
    `low <= value` so that NaN, which fails every comparison, is refused too."""
    check_at_least(1, args, "max_seq_length", "batch_size", "epochs", "grad_accum_steps",
                   "log_every", "max_steps", "eval_every", "save_every_steps", "keep_checkpoints")
    check_optimizer_args(args)
    require(0 <= args.warmup_ratio <= 1, "warmup_ratio", args.warmup_ratio, "between 0 and 1")
    check_at_least(0, args, "warmup_steps", "cpu_workers", "polarity_eval_size")
    check_at_least(0, args, "eval_size", note=" (0: all)")
    if args.tpu_cores == 0 and args.device == "xla":
        raise InputError("--tpu_cores 0 contradicts --device xla; drop one of them")
    check_tpu_cores(args.device, args.tpu_cores)
    refuse_empty_paths(args, PATH_FLAGS)
    # A local model is recorded by absolute path, so a resumed run from another
    # working directory still finds it.
    if Path(args.pretrained_model_name).expanduser().is_dir():
        args.pretrained_model_name = str(Path(args.pretrained_model_name).expanduser().resolve())
    args.downstream_model_dir = str(Path(args.downstream_model_dir).expanduser())
    check_output_apart(args)


def check_optimizer_args(args):
    """The flags of the optimizer and the seed, shared with benchmarks/bench_train.py."""
    require(0 < args.learning_rate < math.inf, "learning_rate", args.learning_rate, "positive")
    require(args.max_grad_norm > 0, "max_grad_norm", args.max_grad_norm,
            "positive (inf: no clipping); 0 would stop learning, a negative one ascend")
    require(0 <= args.weight_decay < math.inf, "weight_decay", args.weight_decay, "0 or more")
    require(0 <= args.seed < 2**32, "seed", args.seed, "between 0 and 2**32 - 1")


def require(ok, flag, value, what):
    if not ok:
        raise InputError(f"--{flag} must be {what}, got {value}")


def check_tpu_cores(device, tpu_cores):
    """--tpu_cores 1 or 8 only with a TPU to run on: elsewhere it would do nothing, or start
    XLA on the CPU unasked (--device xla --tpu_cores 1 asks for it: one XLA:CPU replica)."""
    if not tpu_cores:
        return
    if device in ("cpu", "cuda"):
        raise InputError(f"--tpu_cores {tpu_cores} contradicts --device {device}; drop one of "
                         f"them")
    if importlib.util.find_spec("torch_xla") is None:
        raise InputError(f"--tpu_cores {tpu_cores}: torch_xla is not installed; pip install "
                         f"torch_xla with the same version as torch, or leave --tpu_cores out")
    if not xla_accelerator() and not (device == "xla" and tpu_cores == 1):
        raise InputError(f"--tpu_cores {tpu_cores}: no TPU is attached to this machine; leave "
                         f"--tpu_cores out")


# The flags that name a file or a folder (--pretrained_model_name: or a hub name).
PATH_FLAGS = ["pretrained_model_name", "downstream_corpus_name", "downstream_corpus_root_dir",
              "downstream_model_dir", "cache_dir", "train_file", "val_file", "resume"]


def refuse_empty_paths(args, flags):
    """An empty path is the current directory to pathlib (--downstream_model_dir "" would
    write into it), or no file at all to a test of truth (--train_file "" would train on
    NSMC): most likely a variable that was never set."""
    for name in flags:
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise InputError(f"--{name} is empty; give a path, or leave the flag out for its "
                             f"default")


def check_output_apart(args):
    """The output directory gets the best model written over its top and, with
    --overwrite_output_dir, an earlier run deleted from it: what the run reads (a local
    --pretrained_model_name, the checkpoint --resume names) must lie elsewhere."""
    if args.resume == "latest" and args.overwrite_output_dir:
        raise InputError("--resume latest continues the run in --downstream_model_dir and "
                         "--overwrite_output_dir deletes it; drop one of them")
    out = Path(args.downstream_model_dir).resolve()
    read = [("--pretrained_model_name", args.pretrained_model_name)]
    read += [("--resume", args.resume)] if args.resume not in (None, "latest") else []
    for flag, name in read:
        source = Path(name).expanduser().resolve()
        if not source.is_dir():
            continue  # a hub name, or a checkpoint that does not exist: named later
        if out == source:
            hint = " (--resume latest continues the run in it)" if flag == "--resume" else ""
            raise InputError(f"--downstream_model_dir {args.downstream_model_dir} is the "
                             f"folder of {flag} {name}: the run would write its best model "
                             f"over what it reads; choose another --downstream_model_dir{hint}")
        if args.overwrite_output_dir and (out in source.parents or source in out.parents):
            where = "holds" if out in source.parents else "lies inside"
            raise InputError(f"--overwrite_output_dir: --downstream_model_dir "
                             f"{args.downstream_model_dir} {where} {flag} {name}, which the run "
                             f"reads; choose a --downstream_model_dir apart from it")


# The checks of numeric flags that every script's command line shares, each refusal one line
# naming the flag. Each test says what is allowed, so that NaN, which fails every comparison,
# is refused too. Flags left unset (None) are not checked.

def check_at_least(low, args, *names, note=""):
    """Whole numbers of at least `low`: counts, sizes, steps."""
    for name in set_flags(args, names):
        require(getattr(args, name) >= low, name, getattr(args, name), f"{low} or more{note}")


def check_positive(args, *names, note=""):
    """Finite numbers above 0: a learning rate, a timeout."""
    for name in set_flags(args, names):
        require(0 < getattr(args, name) < math.inf, name, getattr(args, name),
                f"a finite number above 0{note}")


def check_probability(args, *names, note=""):
    """Numbers above 0 and at most 1: a share, a top-p."""
    for name in set_flags(args, names):
        require(0 < getattr(args, name) <= 1, name, getattr(args, name),
                f"above 0 and at most 1{note}")


def check_between(low, high, args, *names, note=""):
    """Numbers from `low` to `high`, both included: a factor whose extremes overflow the
    float32 arithmetic it enters (NaN and infinities refused with them)."""
    for name in set_flags(args, names):
        require(low <= getattr(args, name) <= high, name, getattr(args, name),
                f"from {low:g} to {high:g}{note}")


def set_flags(args, names):
    return [name for name in names if getattr(args, name) is not None]


# --------------------------------------------------------------------------- XLA or not

# PCI ids of Google's TPU chips (the same list torch_xla reads); Google's vendor id alone
# would also match its virtual network card.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0063", "0x006f", "0x0056", "0x0062", "0x0076"}


def xla_accelerator():
    """A TPU on the PCI bus, or PJRT_DEVICE naming an accelerator. Read without importing
    torch_xla: importing it sets PJRT_DEVICE=CPU, with a warning, on every machine without
    a TPU. XLA on the CPU is asked for with --device xla."""
    if importlib.util.find_spec("torch_xla") is None:
        return False
    if os.environ.get("PJRT_DEVICE", "CPU") != "CPU":
        return True
    return any(read(vendor) == GOOGLE_PCI_VENDOR
               and read(os.path.join(os.path.dirname(vendor), "device")) in TPU_PCI_DEVICES
               for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"))


def read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def keep_xla_unloaded(device, tpu_cores=None):
    """Before torch is imported: when the run will not use XLA, tell accelerate and
    transformers (which import torch_xla when it is installed) to leave it alone."""
    auto_finds_no_tpu = device == "auto" and not tpu_cores and not xla_accelerator()
    if device in ("cpu", "cuda") or tpu_cores == 0 or auto_finds_no_tpu:
        os.environ.setdefault("USE_TORCH_XLA", "0")


# What torchrun sets for every process it starts: which process it is, and where the others
# meet (its own store, or process 0's when a script of one's own launches them).
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def started_by_torchrun():
    """torchrun's variables: this process is one of those it started."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def check_launch_variables():
    """A process told that it is one of several (RANK, WORLD_SIZE set by a script of one's
    own) without all of torchrun's variables could not find the others: one line, rather
    than training alone or a traceback from torch. With WORLD_SIZE=1 it is alone anyway."""
    told = {"RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)
    if not told or started_by_torchrun() or os.environ.get("WORLD_SIZE") == "1":
        return
    present = [name for name in LAUNCH_VARIABLES if name in os.environ]
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    raise InputError(f"{listed(present)} {'are' if len(present) > 1 else 'is'} set but "
                     f"{listed(missing)} {'are' if len(missing) > 1 else 'is'} not, so this "
                     f"process cannot find the others of its run: start them with torchrun, "
                     f"or set all of {listed(LAUNCH_VARIABLES)} for each")


def listed(names):
    """'A', 'A and B', 'A, B and C'."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)

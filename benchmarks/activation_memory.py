"""Peak memory and step time of train.py's training step with and without
--activation_checkpointing, on a randomly initialised GPT-2 of KoGPT2's shape by default.

    python benchmarks/activation_memory.py --device cpu --batch_size 8 --seq_length 128

Each setting trains in a fresh process of its own (so that its peaks are its own): the
backend, optimizer, schedule and step that train.py uses, on rows of random token ids, every
row full (as packed rows nearly are), dropout on. --warmup_steps untimed steps, then --steps
timed ones (ms/step: the median over every process's timed steps), then one step more for
memory alone. "process peak": the process's peak over the timed steps (on the CPU its
resident memory, with train.py's allocator settings, which keep what a step frees; on a GPU
what CUDA's allocator handed out): the weights, AdamW's moments and the step's own.
"step peak": the most that the last step held at once beyond what it started with, its
activations, gradients and temporaries (see `step_peak_mib`). With --rounds, the largest
peaks of the processes.
"""
import sys
from pathlib import Path

# train.py and its modules live one folder up; first on the path, because our sched.py
# shares its name with a module of Python's standard library.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import os  # noqa: E402

# CPU or CUDA only: transformers, which imports torch_xla whenever it is installed, leaves it
# unloaded (and the processes this one starts inherit the switch).
os.environ.setdefault("USE_TORCH_XLA", "0")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import options  # noqa: E402
import sched  # noqa: E402
import train  # noqa: E402
from bench_train import in_own_process  # noqa: E402
from measuring import SHAPES, peak_rss_mib, synchronize  # noqa: E402
from model import splits_off_output_layer  # noqa: E402
from options import check_at_least  # noqa: E402
from runtime.backends import Backend, choose_device  # noqa: E402
from runtime.errors import InputError  # noqa: E402

VOCABULARY = 512  # the tiny shape's, which has no vocabulary of its own


def parse_args(argv=None):
    p = options.ArgumentParser(
        description="Peak memory and step time with and without --activation_checkpointing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_shape", choices=sorted(SHAPES), default="kogpt2")
    p.add_argument("--batch_size", type=int, default=8, help="rows per step")
    p.add_argument("--seq_length", type=int, default=128, help="tokens per row")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per setting, the settings taking turns")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="unset: train.py's choice for the device (bf16 where the hardware has it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); unset: one per core")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def check_args(args):
    check_at_least(1, args, "batch_size", "seq_length", "warmup_steps", "steps", "rounds",
                   "threads")
    positions = SHAPES[args.model_shape]["n_positions"]
    if args.seq_length > positions:
        raise InputError(f"--seq_length {args.seq_length} is longer than the {positions} "
                         f"positions of --model_shape {args.model_shape}")
    choose_device(args.device)


def current_rss_mib():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) / 2**10


def process_peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def step_peak_mib(device, run_step):
    """The most memory that one step held at once beyond what it started with: its
    activations, gradients and temporaries. On the CPU glibc is first told to hand every
    block over 128 KiB back to the system as soon as it is freed (train.py has it keep them),
    and Linux to restart the peak from the present, so that the process's peak resident
    memory follows what the step's tensors hold."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run_step()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 2**17)
    libc.mallopt(m_trim_threshold, 2**17)
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0 on)
    start = current_rss_mib()
    run_step()
    return peak_rss_mib() - start


def one_setting(args, recompute):
    """Train --warmup_steps + --steps steps as train.py does, then one step more whose memory
    alone is measured; returns the timed steps' seconds and the peaks."""
    from transformers import GPT2Config, GPT2LMHeadModel
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = Backend(args.device, args.precision, activation_checkpointing=recompute)
    backend.seed(args.seed)
    config = GPT2Config(**{"vocab_size": VOCABULARY, **SHAPES[args.model_shape]})
    model = GPT2LMHeadModel(config).to(backend.device).train()
    splits_off_output_layer(model)  # as load_model does, before the first step
    replica = backend.distribute(model)
    optimizer = backend.optimizer(train.param_groups(model, 0.0), 5e-5)
    total = args.warmup_steps + args.steps + 1
    scheduler = sched.linear_warmup_decay(optimizer, 0, total)
    ids = torch.randint(7, config.vocab_size, (args.batch_size, args.seq_length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "target_positions": F.pad(ids[:, 1:] > 0, (0, 1)).flatten().nonzero()[:, 0]}
    batch = {k: v.to(backend.device) for k, v in batch.items()}

    def run_step(step):
        train.train_step(replica, optimizer, scheduler, [batch], backend, step, 1.0)
        synchronize(backend.device)
    times = []
    for step in range(total - 1):
        began = time.perf_counter()
        run_step(step)
        times.append(time.perf_counter() - began)
    peak = process_peak_mib(backend.device)
    return {"process peak": peak, "step peak": step_peak_mib(backend.device,
                                                             lambda: run_step(total - 1)),
            "timed": times[args.warmup_steps:],
            "device": backend.describe(), "params": sum(p.numel() for p in model.parameters())}


SETTINGS = {"without": False, "--activation_checkpointing": True}


def measure(args):
    """--rounds processes per setting, the settings taking turns, so that both meet the same
    mix of quiet and busy spells on a shared machine: the median step time over all of
    them, the largest peaks."""
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, recompute in SETTINGS.items():
            runs[name].append(in_own_process(one_setting, args, recompute))
    return {name: {**results[0],
                   "ms/step": 1000 * statistics.median(t for r in results for t in r["timed"]),
                   "process peak": max(r["process peak"] for r in results),
                   "step peak": max(r["step peak"] for r in results)}
            for name, results in runs.items()}


def print_report(rows, args):
    first = rows["without"]
    print(f"{first['device']}, random {args.model_shape}-shaped GPT-2 "
          f"({first['params'] / 1e6:.1f}M parameters), batch {args.batch_size} x "
          f"{args.seq_length} tokens, {args.rounds} process(es) per setting, each "
          f"{args.warmup_steps} untimed + {args.steps} timed steps; "
          f"memory: {'CUDA allocated' if args.device == 'cuda' else 'process RSS'}")
    columns = ["process peak", "step peak", "ms/step"]
    print(f"{'':28}" + "".join(f"{c + (' MiB' if c != 'ms/step' else ''):>18}" for c in columns))
    for name, row in rows.items():
        print(f"{name:28}" + "".join(f"{row[c]:18,.1f}" for c in columns))
    with_, without = rows["--activation_checkpointing"], rows["without"]
    print(f"{'with/without':28}" + "".join(f"{with_[c] / without[c]:17.2f}x" for c in columns))


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_report(measure(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Show that N processes under torchrun (`torchrun --nproc_per_node N train.py`, gloo on the
CPU) train what one process with an N-fold batch trains, and how long each takes.

    python benchmarks/torchrun_replicas.py [--processes 2] [--global_batch 32] [--max_steps 8]
                                           [--repeats 3]

The reference is one plain `python train.py --device cpu` process with --batch_size GLOBAL;
each N runs `python -m torch.distributed.run --nproc_per_node N --standalone train.py` with
--batch_size GLOBAL/N, so every run takes optimizer steps over the same GLOBAL examples.
Runs are interleaved (1, N, 1, N, ...) and the wall time is the median over --repeats; the
losses and weights are those of the first repeat (the runs are deterministic). The tables
show the training loss at every step, the validation loss before and after, and how far
the final weights are from the reference's. A few 1e-6 is float rounding (a batch's
gradient summed in another order, which Adam's normalised steps pass on); a real
difference, a lost all-reduce or a process on other data, moves the weights by about the
learning rate per step.

By default the model is tests/fixtures.py's tiny GPT-2 with dropout off, and the corpus
its NSMC-format one.
"""
import sys
from pathlib import Path

# train.py lives one folder up, the fixtures in tests/, the shared helpers beside this file.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import fixtures  # noqa: E402
import options  # noqa: E402
from options import check_at_least  # noqa: E402
from xla_replicas import (check_args, dropout_free_fixture_model, work_folder,  # noqa: E402
                          max_weight_difference, one_line_errors, val_losses)


def parse_args(argv=None):
    p = options.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[2],
                   help="process counts to run under torchrun beside the one-process reference")
    p.add_argument("--global_batch", type=int, default=32, help="examples per step, all processes")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved")
    p.add_argument("--pretrained_model_name", default=None,
                   help="unset: the tiny fixture GPT-2, dropout-free, built in --work")
    p.add_argument("--downstream_corpus_root_dir", default=None,
                   help="unset: the fixture NSMC-format corpus, written in --work")
    p.add_argument("--work", default=None, help="folder for model, corpus and runs; unset: a "
                                                "temporary one, removed at the end")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    return p.parse_args(argv)


def train_command(args, model, corpus, out, n):
    launcher = (["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone"]
                if n > 1 else [])
    return [sys.executable, *launcher, str(ROOT / "train.py"), "--device", "cpu",
            "--pretrained_model_name", str(model), "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--batch_size", str(args.global_batch // n), "--max_steps", str(args.max_steps),
            "--learning_rate", str(args.learning_rate), "--log_every", "1",
            # fp32, as on the XLA:CPU replicas: bf16 (the default on a CPU with AMX) rounds
            # differently when the batch is split differently, which would hide the agreement.
            "--precision", "fp32"]


def run(command, timeout):
    """(wall seconds, CompletedProcess), or (seconds, None) on a timeout."""
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = None
    return time.perf_counter() - started, result


def train_losses(out):
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["event"] == "train"]


def run_all(args, work):
    model = args.pretrained_model_name or dropout_free_fixture_model(work / "model")
    corpus = args.downstream_corpus_root_dir or fixtures.write_corpus(work / "corpus")
    counts = [1] + sorted(set(args.processes) - {1})
    seconds = {n: [] for n in counts}
    for repeat in range(args.repeats):
        for n in counts:  # interleaved, so that a busy moment of a shared machine hits both
            out = work / f"out-{n}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an old one
            command = train_command(args, model, corpus, out, n)
            print(f"N={n} (repeat {repeat + 1}): {shlex.join(command)}", flush=True)
            wall, result = run(command, args.timeout)
            if result is None or result.returncode != 0:
                why = "timed out" if result is None else f"exited with {result.returncode}"
                tail = "" if result is None else "\n".join(result.stderr.splitlines()[-30:])
                print(f"N={n}: train.py {why} after {wall:.0f} s\n{tail}", file=sys.stderr)
                return None
            seconds[n].append(wall)
    rows = []
    reference = work / "out-1-0"
    for n in counts:
        out = work / f"out-{n}-0"
        losses = dict(val_losses(out))
        rows.append((n, args.global_batch // n, train_losses(out), losses[0],
                     losses[args.max_steps],
                     max_weight_difference(out / f"checkpoint-{args.max_steps}",
                                           reference / f"checkpoint-{args.max_steps}"),
                     statistics.median(seconds[n])))
    return rows


def print_tables(rows, args):
    print(f"\ncommand: {shlex.join(['python', *sys.argv])}")
    print(f"machine: nproc {len(os.sched_getaffinity(0))}; N=1 is one plain process, N>1 "
          f"runs under torchrun (gloo, OMP_NUM_THREADS=1 per process, torchrun's default)")
    print(f"{args.max_steps} steps of {args.global_batch} examples, learning rate "
          f"{args.learning_rate}\n")
    print("training loss at each step")
    print(f"{'step':>6}" + "".join(f"{f'N={n}':>14}" for n, *_ in rows)
          + "".join(f"{f'|N={n} - N=1|':>16}" for n, *_ in rows[1:]))
    reference = rows[0][2]
    for step in range(len(reference)):
        losses = [row[2][step] for row in rows]
        print(f"{step + 1:>6}" + "".join(f"{loss:>14.6f}" for loss in losses)
              + "".join(f"{abs(loss - reference[step]):>16.1e}" for loss in losses[1:]))
    header = ["N", "batch/process", "val_loss@0", f"val_loss@{args.max_steps}",
              "max |dw| vs N=1", f"wall s (median of {args.repeats})"]
    print("\n" + "".join(f"{h:>17}" for h in header[:-1]) + f"{header[-1]:>26}")
    for n, batch, _, before, after, dw, wall in rows:
        print(f"{n:>17}{batch:>17}{before:>17.6f}{after:>17.6f}{dw:>17.2e}{wall:>26.1f}")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    check_args(args, "processes")
    check_at_least(1, args, "repeats")
    with work_folder(args.work, "torchrun-replicas-") as work:
        rows = run_all(args, work)
    if rows:
        print_tables(rows, args)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

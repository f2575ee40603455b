"""Show that the multi-replica XLA path (`train.py --device xla`, which runs `xmp.spawn`)
computes what one device computes, on the CPU.

    python benchmarks/xla_replicas.py [--replicas 1 2 4 8] [--global_batch 32] [--max_steps 8]

For each N it trains in a fresh `train.py` process with N XLA:CPU replicas (the test-only
set-up of tests/xla_cpu_replicas.py) and --batch_size GLOBAL/N, so every run takes optimizer
steps over the same GLOBAL examples. The table then shows the validation loss before and
after training and how far each run's final weights are from the one-replica run with the
whole batch. A few 1e-6 is float rounding (a batch's gradient summed in another order,
which Adam's normalised steps pass on); a real difference in training, a lost all-reduce or
a replica on other data, moves the weights by about the learning rate per step.

By default the model is tests/fixtures.py's tiny GPT-2 with its dropout set to 0, and the
corpus its NSMC-format one. A model given with --pretrained_model_name is used as it is:
with dropout on, the replicas draw other masks than one device does and the weights differ.
"""
import sys
from pathlib import Path

# train.py lives one folder up, the fixtures and the XLA:CPU replica set-up in tests/.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import fixtures  # noqa: E402
import options  # noqa: E402
import xla_cpu_replicas  # noqa: E402
from options import check_at_least, check_positive  # noqa: E402
from runtime.errors import InputError  # noqa: E402

# transformers imports torch_xla when it is installed, which warns without a PJRT device;
# the train.py runs get theirs from xla_cpu_replicas.env().
os.environ.setdefault("PJRT_DEVICE", "CPU")


def parse_args(argv=None):
    p = options.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="replica counts to run; 1, the reference, is always run first")
    p.add_argument("--global_batch", type=int, default=32, help="examples per step, all replicas")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--pretrained_model_name", default=None,
                   help="unset: the tiny fixture GPT-2, dropout-free, built in --work")
    p.add_argument("--downstream_corpus_root_dir", default=None,
                   help="unset: the fixture NSMC-format corpus, written in --work")
    p.add_argument("--work", default=None, help="folder for model, corpus and runs; unset: a "
                                                "temporary one, removed at the end")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    args = p.parse_args(argv)
    # The one-replica, full-batch run is what the others are compared against.
    args.replicas = [1] + sorted(set(args.replicas) - {1})
    return args


def check_args(args, counts="replicas"):
    """Refuse what cannot work in one line, before the first run; `counts`: the flag that
    lists the replica (or process) counts to run."""
    check_at_least(1, args, "global_batch", "max_steps")
    check_positive(args, "learning_rate", "timeout")
    bad = [n for n in getattr(args, counts) if not 1 <= n <= args.global_batch
           or args.global_batch % n]
    if bad:
        raise InputError(f"--global_batch {args.global_batch} does not split over {bad} "
                         f"{counts}; give --{counts} that divide it")


@contextlib.contextmanager
def work_folder(work, prefix):
    """--work's folder, created if need be and kept; unset, a temporary one removed at the
    end."""
    if work:
        folder = Path(work).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def one_line_errors(main):
    """`main(argv)` that answers bad input in one line, exit status 1."""
    def checked(argv=None):
        try:
            return main(argv)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return checked


def dropout_free_fixture_model(folder):
    """The tests' tiny model (conftest.py) with no dropout, so any split of a batch
    computes one function."""
    texts = [doc for doc, _ in fixtures.make_reviews(400)] + ['"최고의 영화" 라고']
    model = fixtures.build_tiny_kogpt2(folder, texts)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config_path.write_text(json.dumps(config))
    return model


def train_command(args, model, corpus, work, n):
    return [sys.executable, str(ROOT / "train.py"), "--device", "xla",
            "--pretrained_model_name", str(model), "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(work / f"out-{n}"), "--cache_dir", str(work / "cache"),
            "--batch_size", str(args.global_batch // n), "--max_steps", str(args.max_steps),
            "--learning_rate", str(args.learning_rate), "--log_every", "1"]


def run_replicas(command, n, timeout):
    """Run train.py with `n` XLA:CPU replicas; returns (wall seconds, CompletedProcess),
    or (seconds, None) on a timeout (a hang in a collective, say)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **xla_cpu_replicas.env(n)}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        result = None  # the replicas end with their killed launcher (exit_with_launcher)
    return time.perf_counter() - started, result


def val_losses(out):
    """(step, val_loss) of every evaluation in the run's metrics.jsonl, in order."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    return [(e["step"], e["val_loss"]) for e in events if e["event"] == "eval"]


def max_weight_difference(a, b):
    from safetensors.torch import load_file
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def run_all(args, work):
    model = args.pretrained_model_name or dropout_free_fixture_model(work / "model")
    corpus = args.downstream_corpus_root_dir or fixtures.write_corpus(work / "corpus")
    rows, reference = [], None
    for n in args.replicas:
        command = train_command(args, model, corpus, work, n)
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an old one
        print(f"N={n}: {shlex.join(command)}", flush=True)
        seconds, result = run_replicas(command, n, args.timeout)
        if result is None or result.returncode != 0:
            why = "timed out" if result is None else f"exited with {result.returncode}"
            tail = "" if result is None else "\n".join(result.stderr.splitlines()[-30:])
            print(f"N={n}: train.py {why} after {seconds:.0f} s\n{tail}", file=sys.stderr)
            return rows, False
        final = out / f"checkpoint-{args.max_steps}"
        reference = reference or final  # N=1 runs first
        losses = dict(val_losses(out))
        rows.append((n, args.global_batch // n, losses[0], losses[args.max_steps],
                     max_weight_difference(final, reference), seconds))
    return rows, True


def print_table(rows, args):
    print(f"\ncommand: {shlex.join(['python', *sys.argv])}")
    print(f"machine: nproc {len(os.sched_getaffinity(0))}; the N XLA:CPU replicas are "
          f"threads of one process that share these cores")
    print(f"{args.max_steps} steps of {args.global_batch} examples, learning rate "
          f"{args.learning_rate}; max |dw|: final weights against N=1; wall s: the whole "
          f"train.py process, start-up, evaluations and XLA compiles included\n")
    header = ["N", "batch/replica", "val_loss@0", f"val_loss@{args.max_steps}",
              "max |dw| vs N=1", "wall s"]
    print("".join(f"{h:>17}" for h in header))
    for n, batch, before, after, dw, seconds in rows:
        print(f"{n:>17}{batch:>17}{before:>17.6f}{after:>17.6f}{dw:>17.2e}{seconds:>17.1f}")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    with work_folder(args.work, "xla-replicas-") as work:
        rows, ok = run_all(args, work)
    if rows:
        print_table(rows, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

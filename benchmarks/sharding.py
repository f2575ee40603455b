"""Peak memory per process and speed of DDP against FSDP (`--fsdp`), each run as
`torchrun --nproc_per_node N train.py` on the CPU, for randomly initialised GPT-2 shapes.

    python benchmarks/sharding.py [--shapes kogpt2 gpt2-large] [--modes ddp fsdp fsdp+ac]
                                  [--processes 2] [--max_steps 4] [--memory_cap_gib 20]

Each process's peak is the most resident memory not backed by a file (its tensors:
RssAnon + RssShmem) this script saw it hold, read every 0.2 s while the run lasts; tokens/s is
train.py's own figure (metrics.jsonl, training time only), over the steps after the first;
s/step the time between the lines of consecutive steps from the second on, as seen every
0.2 s (so it includes the report). A run whose processes together pass --memory_cap_gib is
stopped there and reported as not fitting, so that a shape too large for the machine ends
as a row, not as the kernel's out-of-memory kill of something else.

The corpus is tests/fixtures.py's NSMC-format sample and the tokenizer its small one: the
model's shape, not its vocabulary's use, sets the memory. Every run writes its step-0 and
final evaluation (each with one review of each polarity, from a whole copy of the model),
the exported best model and a checkpoint, as `python train.py` does: the peaks include
them. Left out (--polarity_eval_size 0): the polarity scoring and the final evaluation's
200 judged reviews, which a 774M model writes on one CPU thread in longer than the run
trains. Each run's folder is removed once read.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402

import psutil  # noqa: E402

import fixtures  # noqa: E402
import options  # noqa: E402
from options import check_at_least, check_positive  # noqa: E402
from xla_replicas import one_line_errors, work_folder  # noqa: E402

# GPT-2 shapes with KoGPT2's vocabulary (51,200): `kogpt2` is skt/kogpt2-base-v2's (125M
# parameters), `gpt2-large` GPT-2 large's (774M), `tiny` the tests'.
SHAPES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=128),
    "kogpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=51200),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=51200),
}
MODES = {"ddp": [], "fsdp": ["--fsdp"], "fsdp+ac": ["--fsdp", "--activation_checkpointing"],
         "ddp+ac": ["--activation_checkpointing"]}
GIB = 2**30


def parse_args(argv=None):
    p = options.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["kogpt2", "gpt2-large"])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["ddp", "fsdp"],
                   help="+ac: with --activation_checkpointing")
    p.add_argument("--processes", type=int, default=2, help="torchrun's --nproc_per_node")
    p.add_argument("--batch_size", type=int, default=2, help="examples per process and step")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="unset: train.py's choice for this CPU")
    p.add_argument("--memory_cap_gib", type=float, default=20.0,
                   help="stop a run whose processes together hold more than this")
    p.add_argument("--work", default=None, help="folder for models, corpus and runs; unset: a "
                                                "temporary one, removed at the end")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    return p.parse_args(argv)


def check_args(args):
    check_at_least(1, args, "processes", "batch_size", "max_seq_length", "max_steps")
    check_at_least(3, args, "max_steps", note=" (the speed is read after the second step)")
    check_positive(args, "memory_cap_gib", "timeout")


def build_shape(work, shape):
    """A randomly initialised GPT-2 of `shape` with the fixture tokenizer, saved once."""
    folder = work / f"model-{shape}"
    if not (folder / "config.json").is_file():
        texts = [doc for doc, _ in fixtures.make_reviews(400)]
        tokenizer = fixtures.build_tokenizer(["긍정 부정", *texts], folder)
        sizes = {"vocab_size": len(tokenizer), **SHAPES[shape]}
        fixtures.build_model(folder, sizes.pop("vocab_size"), **sizes)
    return folder


def train_command(args, model, corpus, out, mode):
    precision = ["--precision", args.precision] if args.precision else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(args.processes), str(ROOT / "train.py"), "--device", "cpu",
            "--pretrained_model_name", str(model), "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
            "--max_steps", str(args.max_steps), "--log_every", "1", "--report_to", "none",
            "--polarity_eval_size", "0",
            *precision, *MODES[mode]]


def private_bytes(pid):
    """The process's resident memory that no file backs (RssAnon + RssShmem): its tensors.
    Left out: the pages of files it maps (a model's safetensors while it loads), which the
    kernel can drop and read again, so they do not decide whether a run fits. None once
    the process has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in status if line.startswith(("RssAnon:", "RssShmem:"))]
    return sum(kib) * 1024 if kib else None


def train_events(out):
    """How many steps the run has logged so far (metrics.jsonl, one line a step)."""
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    return sum('"event": "train"' in line for line in lines)


def run_watched(command, out, cap_bytes, timeout):
    """Run `command`; returns (exit status or a reason, wall seconds, peak bytes of each
    worker process, seconds a step). Every 0.2 s it reads each worker's memory (private_bytes) and
    whether a step's line has reached `out`/metrics.jsonl; it stops the run once the
    workers together hold more than `cap_bytes`."""
    started = time.perf_counter()
    launcher = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks, outcome, logged = {}, None, []  # logged: when each step's line was first seen
    stderr_lines = []
    reader = _drain(launcher.stderr, stderr_lines)
    while launcher.poll() is None:
        try:
            workers = psutil.Process(launcher.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        held = 0
        for worker in workers:
            now = private_bytes(worker.pid)
            if now is not None:
                peaks[worker.pid] = max(peaks.get(worker.pid, 0), now)
                held += now
        logged += [time.perf_counter()] * (train_events(out) - len(logged))
        if held > cap_bytes:
            outcome = f"stopped at the {cap_bytes / GIB:g} GiB cap"
        elif time.perf_counter() - started > timeout:
            outcome = f"timed out after {timeout} s"
        if outcome:  # torchrun's workers may lead sessions of their own: each is killed
            for process in [*workers, psutil.Process(launcher.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            break
        time.sleep(0.2)
    launcher.wait()
    reader.join()
    if outcome is None:
        outcome = launcher.returncode
    if outcome != 0:
        print("\n".join(stderr_lines[-20:]), file=sys.stderr)
    gaps = [b - a for a, b in zip(logged[1:], logged[2:])]  # after step 2: warmed up
    step_s = sum(gaps) / len(gaps) if gaps else float("nan")
    return outcome, time.perf_counter() - started, sorted(peaks.values(), reverse=True), step_s


def _drain(stream, lines):
    """Read `stream` into `lines` in the background, so a chatty run never blocks on a
    full pipe while this script polls."""
    thread = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in stream),
                              daemon=True)
    thread.start()
    return thread


def tokens_per_second(out):
    """Mean of train.py's tokens/s over the steps after the first (which also warms up)."""
    path = out / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rates = [e["tokens_per_s"] for e in events if e["event"] == "train" and e["step"] > 1]
    return sum(rates) / len(rates) if rates else float("nan")


def parameters(model):
    config = json.loads((model / "config.json").read_text())
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    block = 12 * d * d + 13 * d  # attention and MLP weights and biases, two LayerNorms
    return layers * block + (vocab + config["n_positions"]) * d + 2 * d  # + final LayerNorm


def run_all(args, work):
    corpus = fixtures.write_corpus(work / "corpus")
    rows = []
    for shape in args.shapes:
        model = build_shape(work, shape)
        for mode in args.modes:
            out = work / f"out-{shape}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            command = train_command(args, model, corpus, out, mode)
            print(f"{shape} {mode}: {shlex.join(command)}", flush=True)
            outcome, wall, peaks, step_s = run_watched(command, out,
                                                       args.memory_cap_gib * GIB, args.timeout)
            rate = tokens_per_second(out) if outcome == 0 else float("nan")
            shutil.rmtree(out, ignore_errors=True)  # a 774M model's checkpoint: 9 GB
            rows.append((shape, parameters(model), mode, outcome, peaks[:args.processes],
                         rate, step_s if outcome == 0 else float("nan"), wall))
    return rows


def print_table(rows, args):
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    print(f"\n{date.today()}, {cpu}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / GIB:.0f} GiB; "
          f"command: {shlex.join(['python', *sys.argv])}")
    print(f"{args.processes} processes under torchrun (gloo), batch {args.batch_size} x "
          f"{args.max_seq_length} tokens per process, {args.max_steps} steps\n")
    print("| shape | parameters | mode | outcome | peak GiB per process | tokens/s | s/step "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, params, mode, outcome, peaks, rate, step_s, wall in rows:
        peak = ", ".join(f"{p / GIB:.2f}" for p in peaks) or "-"
        result = "trained" if outcome == 0 else (f"exit {outcome}" if isinstance(outcome, int)
                                                 else outcome)
        print(f"| {shape} | {params / 1e6:.3g}M | {mode} | {result} | {peak} | {rate:,.0f} "
              f"| {step_s:.1f} | {wall:.0f} |")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    with work_folder(args.work, "sharding-") as work:
        rows = run_all(args, work)
    print_table(rows, args)
    return 0 if all(row[3] == 0 or "cap" in str(row[3]) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a tiny KoGPT2 stand-in and an NSMC-format corpus in temporary folders,
and a helper that runs `python train.py` as a real process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the network
# XLA:CPU spends most of a tiny run in LLVM, compiling each graph; the tests check what the
# graphs compute, not how fast the CPU's code for them runs. Unoptimised code computes the
# same to rounding (a sum taken in another order), and every run of a test compiles alike;
# an XLA run, in-process or a child process, then compiles in about half the time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# pytest.ini runs two tests at once (pytest-xdist). Each would start torch with a thread per
# core: on two cores, four busy threads that spend the surplus waiting for each other (the
# slow tier took half again as much CPU time, and ended hardly sooner). One thread in each
# worker, inherited by the processes its tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import fixtures  # noqa: E402
import xla_cpu_replicas  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tokenizer trained on the fixture text plus a 2-layer, 64-wide GPT-2."""
    texts = [doc for doc, _ in fixtures.make_reviews(400)] + ['"최고의 영화" 라고']
    return fixtures.build_tiny_kogpt2(tmp_path_factory.mktemp("model"), texts)


@pytest.fixture(scope="session")
def dropout_free_model(tiny_model, tmp_path_factory):
    """The tiny model without dropout, so that any split of a batch computes one function:
    the replica, torchrun and FSDP tests compare runs that split a batch differently."""
    out = tmp_path_factory.mktemp("dropout-free")
    for f in tiny_model.iterdir():
        shutil.copy(f, out)
    config = json.loads((out / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


GLOBAL_BATCH = 32  # N XLA replicas x --batch_size 32/N; 258 reviews give 8 steps an epoch


def replica_args(model, corpus, out, replicas, *extra):
    """Arguments for train.py on `replicas` XLA replicas with the global batch of 32."""
    return ["--pretrained_model_name", str(model), "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--batch_size", str(GLOBAL_BATCH // replicas), "--learning_rate", "1e-3",
            "--log_every", "1", *extra]


@pytest.fixture(scope="session")
def one_replica(dropout_free_model, tmp_path_factory):
    """(corpus, output folder) of the XLA tests' reference: one replica with the whole
    global batch, 4 steps; what N replicas, sharded or not, must train too."""
    root = tmp_path_factory.mktemp("one-replica")
    corpus = fixtures.write_corpus(root / "corpus")
    out = root / "out"
    result = run_train(replica_args(dropout_free_model, corpus, out, 1, "--max_steps", "4"),
                       replicas=1)
    assert result.returncode == 0, result.stderr
    return corpus, out


@pytest.fixture
def corpus(tmp_path):
    """`root` holding nsmc/ratings_train.txt (256 reviews plus a blank, a quoted and a
    long one) and nsmc/ratings_test.txt (64 reviews)."""
    return fixtures.write_corpus(tmp_path / "corpus")


def quick_run_args(model, corpus, folder):
    """Arguments for a quick CPU run of train.py that writes into `folder`/out."""
    return ["--pretrained_model_name", str(model),
            "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(folder / "out"),
            "--cache_dir", str(folder / "cache"),
            "--batch_size", "16", "--learning_rate", "1e-3", "--log_every", "1",
            "--device", "cpu"]


@pytest.fixture
def train_args(tiny_model, corpus, tmp_path):
    """Arguments for a quick run of train.py on the fixtures; tests append their own."""
    return quick_run_args(tiny_model, corpus, tmp_path)


def run_train(args, env=None, timeout=600, replicas=None, script="train.py", **kwargs):
    """`python train.py ARGS` as a real process; returns the CompletedProcess.

    `replicas=N` runs the XLA path with N replicas on the CPU (tests/xla_cpu_replicas.py).
    A run that outlives `timeout` (a hang in a collective, say) fails the test with what it
    printed; the replicas end with their killed launcher."""
    if replicas:
        env = {**xla_cpu_replicas.env(replicas), **(env or {})}
        args = [*args, "--device", "xla"]
    command = [sys.executable, str(ROOT / script), *args]
    try:
        return subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        output = "\n".join(text.decode(errors="replace") if isinstance(text, bytes) else text
                           for text in (e.stdout, e.stderr) if text)
        pytest.fail(f"{script} did not finish in {timeout} s (a hang?); it printed:\n"
                    f"{output[-4000:]}", pytrace=False)


def read_metrics(out_dir, event=None):
    lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if event is None or e["event"] == event]

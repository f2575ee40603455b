"""The XLA path with 2, 4 and 8 real replicas on the CPU (tests/xla_cpu_replicas.py): the
replicas together compute what one device computes, and everything that needs their
agreement (evaluation, checkpoints, signals, resume, failures) works across them."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xla_cpu_replicas
from conftest import GLOBAL_BATCH, ROOT, read_metrics, replica_args, run_train
from interrupt import awaiting_mark
from safetensors.torch import load_file

import runtime.backends
import runtime.rundir
from runtime.errors import InputError

pytestmark = pytest.mark.slow  # every test here runs train.py or generate.py as a process


def max_weight_difference(a, b):
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_weights(trained, reference, initial):
    """`trained` and `reference`, both trained from `initial`, agree to 1% of how far
    training moved the weights. Not to a fixed 1e-5: a batch split another way sums its
    gradients in another order, and AdamW divides each gradient by its running size, so
    for a weight whose gradient is near zero that rounding moves the update by a sizeable
    share of the learning rate (1.3e-5 of a 3e-3 move, seen on one CPU and not another).
    A batch whose parts were not averaged would miss by the size of the move itself."""
    moved = max_weight_difference(reference, initial)
    assert max_weight_difference(trained, reference) < 0.01 * moved


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_n_replicas_train_what_one_replica_with_an_n_fold_batch_trains(
        dropout_free_model, one_replica, tmp_path, replicas):
    corpus, reference = one_replica
    out = tmp_path / "out"
    result = run_train(replica_args(dropout_free_model, corpus, out, replicas, "--max_steps", "4"),
                       replicas=replicas)
    assert result.returncode == 0, result.stderr
    assert f"xla (CPU, {replicas} replicas)" in result.stdout
    assert f"= {GLOBAL_BATCH} examples per step" in result.stdout

    ours, theirs = read_metrics(out), read_metrics(reference)
    assert [(e["event"], e["step"]) for e in ours] == [(e["event"], e["step"]) for e in theirs]
    for a, b in zip(ours, theirs):
        if a["event"] == "eval":   # sharded across replicas, summed: every review once
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
            assert a["polarity_accuracy"] == b["polarity_accuracy"]
        else:                       # the data each replica sees and the token-mean loss
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["lr"] == b["lr"]
    assert_same_weights(out / "checkpoint-4", reference / "checkpoint-4", dropout_free_model)
    # The master alone exported the best model (the last one here), once.
    assert max_weight_difference(out, out / "checkpoint-4") == 0
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng_state_*.pt")) == [
        f"rng_state_{rank}.pt" for rank in range(replicas)]


def wait_for(condition, process, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout} s")


def start(args, replicas, script="train.py"):
    return subprocess.Popen([sys.executable, str(ROOT / script), *args, "--device", "xla"],
                            cwd=ROOT, env={**os.environ, **xla_cpu_replicas.env(replicas)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trained_steps(out):
    path = out / "metrics.jsonl"
    return [e["step"] for e in read_metrics(out, "train")] if path.exists() else []


def assert_same_run(a, b):
    """The same losses, learning rates, validation losses and final weights, exactly."""
    keys = ("event", "step", "loss", "lr", "val_loss")
    assert ([{k: e[k] for k in keys if k in e} for e in read_metrics(a)]
            == [{k: e[k] for k in keys if k in e} for e in read_metrics(b)])
    assert max_weight_difference(a, b) == 0


def all_await_the_signal(train_args, replicas):
    """Every replica of an `interrupt.py await-signal` run waits for the signal."""
    return all(awaiting_mark(train_args, rank).exists() for rank in range(replicas))


def test_sigterm_kill_9_and_resume_at_4_replicas_end_as_an_uninterrupted_run(
        tiny_model, corpus, tmp_path):
    """Dropout on, so each replica's random stream must continue exactly. One run is
    stopped two ways in turn, resumed with --resume latest each time, and ends as the
    uninterrupted run ends: SIGTERM to the launcher (a preempted TPU host) stops every
    replica at the same step, with one checkpoint holding each replica's state; kill -9 of
    the replicas' process loses only what came after the last checkpoint. Then another
    number of replicas is refused the checkpoint."""
    run = ["--max_steps", "12", "--save_every_steps", "4", "--log_every", "2",
           "--keep_checkpoints", "5"]
    reference = tmp_path / "reference"
    result = run_train(replica_args(tiny_model, corpus, reference, 4, *run), replicas=4)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    args = replica_args(tiny_model, corpus, out, 4, *run)
    process = start(["await-signal", "2", "--", *args], 4, script="tests/interrupt.py")
    try:
        wait_for(lambda: all_await_the_signal(args, 4), process, "step 2 in every replica")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at step 2: saved" in stderr and "--resume latest" in stderr
    saved = out / "checkpoint-2"
    assert runtime.rundir.is_complete(saved)
    assert sorted(p.name for p in saved.glob("rng_state_*.pt")) == [
        f"rng_state_{rank}.pt" for rank in range(4)]

    # SIGKILL to the replicas' process as soon as step 10 is computed, after checkpoint-8.
    killed = run_train(["sigkill", "10", "--", *args, "--resume", "latest"], replicas=4,
                       script="tests/interrupt.py")
    assert killed.returncode != 0
    # The launcher names the signal, which nothing else prints.
    assert "error: a replica process ended early (pid " in killed.stderr
    assert " killed by SIGKILL); nothing after the last checkpoint was saved" in killed.stderr
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-8"

    resumed = run_train(args + ["--resume", "latest"], replicas=4)
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 8," in resumed.stdout
    assert_same_run(out, reference)

    other = replica_args(tiny_model, corpus, out, 2, *run, "--batch_size", "8")
    refused = run_train(other + ["--resume", "latest"], replicas=2)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --resume: the checkpoint was trained on 4 replicas and this run has 2; "
        "resume on as many devices (torchrun's --nnodes x --nproc_per_node, CPU_NUM_DEVICES "
        "for XLA on the CPU, the same TPU), or start a new --downstream_model_dir")


def test_kill_9_then_resume_ends_with_the_weights_of_an_uninterrupted_one_replica_run(
        tiny_model, corpus, tmp_path):
    """Dropout on: the device's random stream must continue exactly after a resume. One
    replica runs in a process of its own too (--tpu_cores 1, or --device xla)."""
    run = ["--max_steps", "12", "--save_every_steps", "4", "--log_every", "2"]
    reference = tmp_path / "reference"
    result = run_train(replica_args(tiny_model, corpus, reference, 1, *run), replicas=1)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    args = replica_args(tiny_model, corpus, out, 1, *run)
    # SIGKILL to the replica's process as soon as step 6 is computed, after checkpoint-4.
    killed = run_train(["sigkill", "6", "--", *args], replicas=1, script="tests/interrupt.py")
    assert killed.returncode != 0
    assert "error: a replica process ended early (pid " in killed.stderr
    assert " killed by SIGKILL); nothing after the last checkpoint was saved" in killed.stderr
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-4"

    resumed = run_train(args + ["--resume", "latest"], replicas=1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_a_replica_that_fails_alone_ends_the_run_promptly_with_its_error(
        tiny_model, corpus, tmp_path):
    """The other replicas wait for it inside a collective: without care, forever."""
    args = replica_args(tiny_model, corpus, tmp_path / "out", 4, "--max_steps", "6")
    result = run_train(["fail-replica", "3", "--", *args], replicas=4, timeout=240,
                       script="tests/interrupt.py")
    assert result.returncode == 1
    assert "replica 1 failed" in result.stderr
    assert "RuntimeError: injected failure in replica 1" in result.stderr
    assert "error: a replica process ended early (its error is above)" in result.stderr


def test_a_write_only_the_master_makes_fails_on_every_replica_together(tiny_model, corpus,
                                                                       tmp_path):
    """The best model's export fails on a full disk: the master alone writes it, and the
    other replicas must not go on to wait for it in the next collective."""
    out = tmp_path / "out"
    args = replica_args(tiny_model, corpus, out, 2, "--max_steps", "2")
    result = run_train(["best-disk-full", "0", "--", *args], replicas=2, timeout=240,
                       script="tests/interrupt.py")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: could not write {out / 'the best model'} (Error while serializing")
    assert not (out / ".best.tmp").exists()


@pytest.mark.parametrize("device", ["cpu", "xla"])
def test_max_seq_length_beyond_the_models_positions_is_one_line(train_args, device):
    result = run_train(train_args + ["--max_seq_length", "129", "--device", device],
                       env={"PJRT_DEVICE": "CPU"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --max_seq_length 129 is longer than the 128 positions of "
        f"--pretrained_model_name {train_args[1]}; use at most 128")


class ThreadReplica(runtime.backends.Backend):
    """One of two replicas that are threads, each with its own view of the file system."""

    def __init__(self, rank, shared):
        super().__init__("cpu", "fp32")
        self.rank, self.world_size, self.shared = rank, 2, shared

    def barrier(self, name, payload=b""):
        self.shared["payloads"][self.rank] = payload
        self.shared["barrier"].wait()
        payloads = list(self.shared["payloads"])
        self.shared["barrier"].wait()
        return payloads

    def any_replica(self, flag):
        return any(p[0] for p in self.barrier("any", bytes([flag])))


@pytest.mark.parametrize("shared_folder", [True, False])
def test_replicas_check_that_they_see_the_masters_output_folder(tmp_path, shared_folder):
    """A TPU pod host whose --downstream_model_dir is on its own disk: one clear line on
    every host, instead of replicas resuming from different steps and hanging."""
    shared = {"barrier": threading.Barrier(2, timeout=30), "payloads": [None, None]}
    folders = [tmp_path / "host0", tmp_path / ("host0" if shared_folder else "host1")]
    errors = [None, None]

    def replica(rank):
        folders[rank].mkdir(exist_ok=True)
        try:
            runtime.rundir.check_output_shared(ThreadReplica(rank, shared), folders[rank])
        except InputError as e:
            errors[rank] = str(e)
    threads = [threading.Thread(target=replica, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if shared_folder:
        assert errors == [None, None]
    else:
        assert all(error and "storage every host sees" in error for error in errors)

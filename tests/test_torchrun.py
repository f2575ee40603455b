"""train.py under torchrun with 2 real CPU processes (gloo): they train what one process
with twice the batch trains, and stopping, killing and resuming them loses nothing. Each
run starts 2 processes on a 2-core machine, so the checks share a few runs."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_metrics, run_train
from test_replicas import (
    all_await_the_signal,
    assert_same_run,
    assert_same_weights,
    max_weight_difference,
    trained_steps,
    wait_for,
)

import runtime.rundir

pytestmark = pytest.mark.slow  # every test here runs train.py or generate.py as a process


def torchrun_command(args, script="train.py", nproc=2):
    # --standalone: a rendezvous on a free local port, so runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--standalone", str(ROOT / script), *args]


def start_torchrun(args, script="train.py"):
    return subprocess.Popen(torchrun_command(args, script), cwd=ROOT, env=os.environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun(args, script="train.py", timeout=300):
    """Run to the end; returns (exit status, stdout, stderr). torchrun's processes live in
    sessions of their own, so a run that hangs is ended through torchrun, which passes
    SIGTERM on and kills what is left 30 s later."""
    process = start_torchrun(args, script)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish in {timeout} s (a hang?); it printed:\n"
                    f"{(stdout + stderr)[-4000:]}", pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_two_hosts(args_of_node):
    """Two torchrun commands of one process each, as two hosts (nodes 0 and 1) that meet at
    a rendezvous on this machine; node K runs train.py with `args_of_node(K)`."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(k),
         "--nproc_per_node", "1", "--rdzv_endpoint", f"localhost:{port}", str(ROOT / "train.py"),
         *args_of_node(k)], cwd=ROOT, env=os.environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for k in (0, 1)]


def both_ended(nodes, timeout):
    """Each node's CompletedProcess once both have ended."""
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.terminate()
    return [subprocess.CompletedProcess(node.args, node.returncode, *output)
            for node, output in zip(nodes, outputs)]


def two_hosts(args, timeout=300):
    """Both hosts run train.py with `args`; returns node 0's CompletedProcess."""
    first, second = both_ended(start_two_hosts(lambda k: args), timeout)
    assert second.returncode == 0, second.stderr
    return first


def run_args(model, corpus, out, batch_size, *extra):
    return ["--pretrained_model_name", str(model), "--downstream_corpus_root_dir", str(corpus),
            "--downstream_model_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--batch_size", str(batch_size), "--learning_rate", "1e-3", "--log_every", "1",
            "--device", "cpu", *extra]


def test_two_processes_train_what_one_process_with_a_double_batch_trains(
        dropout_free_model, corpus, tmp_path):
    """2 processes x 16 examples on one host, and 2 hosts x 1 process x 8 examples x 2
    accumulated (DDP syncs on the last micro-batch only), against one process with 32: the
    same losses, evaluations and weights. In fp32: bf16 (the default on a CPU with AMX)
    keeps 8 bits of each product, and a batch split another way rounds elsewhere."""
    reference = tmp_path / "one"
    result = run_train(run_args(dropout_free_model, corpus, reference, 32, "--max_steps", "4",
                                "--precision", "fp32"))
    assert result.returncode == 0, result.stderr
    for name, batch, accumulation, launch in [("one-host", 16, 1, torchrun),
                                              ("two-hosts", 8, 2, two_hosts)]:
        out = tmp_path / name
        result = launch(run_args(dropout_free_model, corpus, out, batch, "--max_steps", "4",
                                 "--grad_accum_steps", str(accumulation), "--precision", "fp32"))
        assert result.returncode == 0, result.stderr
        assert "cpu (CPU), torchrun: 2 processes over gloo, fp32" in result.stdout
        assert f"{batch} x 2 replicas x {accumulation} accumulation = 32 examples" in result.stdout
        assert result.stdout.count("done: best val_loss") == 1  # the master alone reports

        ours, theirs = read_metrics(out), read_metrics(reference)
        assert [(e["event"], e["step"]) for e in ours] == [(e["event"], e["step"]) for e in theirs]
        for a, b in zip(ours, theirs):
            if a["event"] == "eval":  # each process scores its shard; the sums are reduced
                assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
                assert a["polarity_accuracy"] == b["polarity_accuracy"]
            else:  # the global token-mean loss, each step over the same 32 examples
                assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
                assert a["lr"] == b["lr"]
        assert_same_weights(out / "checkpoint-4", reference / "checkpoint-4", dropout_free_model)
        assert max_weight_difference(out, out / "checkpoint-4") == 0  # the best model, once
        assert sorted(p.name for p in (out / "checkpoint-4").glob("rng_state_*.pt")) == [
            "rng_state_0.pt", "rng_state_1.pt"]
    assert (tmp_path / "two-hosts" / ".lock-node1").exists()  # each host holds a lock


def test_sigterm_kill_9_and_resume_at_2_processes_end_as_an_uninterrupted_run(
        tiny_model, corpus, tmp_path):
    """Dropout on, so each process's random state must continue exactly. One run is
    stopped three ways in turn (SIGTERM to torchrun, SIGTERM in each process, kill -9),
    resumed each time with --resume latest, and ends as the uninterrupted run does; then
    one process is refused the 2-process checkpoint in one line."""
    run = ["--max_steps", "12", "--save_every_steps", "4", "--log_every", "2",
           "--keep_checkpoints", "5"]
    reference = tmp_path / "reference"
    result = torchrun(run_args(tiny_model, corpus, reference, 16, *run))
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    args = run_args(tiny_model, corpus, out, 16, *run)
    # SIGTERM to torchrun, which passes it on to each process (a preempted machine, `kill`).
    process = start_torchrun(["await-signal", "2", "--", *args], "tests/interrupt.py")
    try:
        wait_for(lambda: all_await_the_signal(args, 2), process, "step 2 in both processes")
        second = run_train(args + ["--resume", "latest"])  # the first process holds the lock
        assert second.returncode == 1 and "is in use by another training run" in second.stderr
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.terminate()
    assert stderr.count("stopped by SIGTERM at step 2: saved") == 1, stderr  # rank 0 says it
    assert "Unable to shutdown process" not in stderr  # torchrun did not have to kill one
    assert [p.name for p in runtime.rundir.checkpoints(out)] == ["checkpoint-2"]
    assert runtime.rundir.is_complete(out / "checkpoint-2")
    assert trained_steps(out) == [2]

    # SIGTERM in each process after step 6: each saves its part once and exits 143.
    stopped = torchrun(["sigterm", "6", "--", *args, "--resume", "latest"],
                       script="tests/interrupt.py")
    assert stopped.stderr.count("stopped by SIGTERM at step 6: saved") == 1, stopped.stderr
    # torchrun reports the processes it saw end (one or both): each with status 143.
    assert set(re.findall(r"exitcode *: (-?\d+)", stopped.stderr)) == {"143"}, stopped.stderr
    assert "again" not in stopped.stderr  # torchrun's own SIGTERM to the last one is ignored
    assert [p.name for p in runtime.rundir.checkpoints(out)] == ["checkpoint-6", "checkpoint-4",
                                                                 "checkpoint-2"]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("rng_state_*.pt")) == [
        "rng_state_0.pt", "rng_state_1.pt"]

    # kill -9 of both processes two steps after checkpoint-8.
    killed = torchrun(["sigkill", "10", "--", *args, "--resume", "latest"],
                      script="tests/interrupt.py")
    assert killed.returncode != 0
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-8"

    resumed = torchrun(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 8," in resumed.stdout
    assert_same_run(out, reference)

    alone = run_train(args + ["--resume", "latest"])
    assert alone.returncode == 1
    assert alone.stderr.strip().splitlines()[-1] == (
        "error: --resume: the checkpoint was trained on 2 replicas and this run has 1; "
        "resume on as many devices (torchrun's --nnodes x --nproc_per_node, CPU_NUM_DEVICES "
        "for XLA on the CPU, the same TPU), or start a new --downstream_model_dir")


def error_lines(stderr):
    """Our lines, without what torchrun prints about the processes it saw fail."""
    return [line for line in stderr.splitlines() if line.startswith(("error: ", "stopped by "))]


def test_a_process_started_with_other_arguments_stops_every_process_before_training(
        tiny_model, corpus, tmp_path):
    """Process 1 alone gets another --max_steps (a wrapper adds it): one line names the
    flag, and nothing is trained."""
    wrapper = tmp_path / "rank_1_differs.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.argv += ['--max_steps', '3']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    out = tmp_path / "out"
    result = torchrun(run_args(tiny_model, corpus, out, 16, "--max_steps", "2"),
                      script=str(wrapper), timeout=120)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        "error: --max_steps is 3 in replica 1 but 2 in replica 0: every replica of a run, on "
        "every host, needs the same arguments"], result.stderr
    assert not (out / "metrics.jsonl").exists()


def test_a_host_that_fails_to_start_stops_the_other_at_once_with_its_reason(
        tiny_model, corpus, tmp_path):
    """Host 1's copy of the corpus is broken, so its first process cannot prepare the run:
    host 0 stops within seconds saying so in one line, instead of waiting in a collective
    (torch's default: 30 minutes)."""
    broken = tmp_path / "broken"
    (broken / "nsmc").mkdir(parents=True)
    (broken / "nsmc" / "ratings_train.txt").write_text("")
    (broken / "nsmc" / "ratings_test.txt").write_bytes(
        (corpus / "nsmc" / "ratings_test.txt").read_bytes())
    args = run_args(tiny_model, corpus, tmp_path / "out", 16, "--max_steps", "2")
    started = time.monotonic()
    nodes = start_two_hosts(lambda k: args + ["--downstream_corpus_root_dir", str(broken)] * k)
    try:
        first, second = both_ended(nodes, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("host 0 was still waiting for host 1 after 2 minutes", pytrace=False)
    assert time.monotonic() - started < 90
    reason = (f"{broken / 'nsmc' / 'ratings_train.txt'}: the file is empty; expected the header "
              f"'id<TAB>document<TAB>label' and one review per line")
    assert error_lines(second.stderr) == [f"error: {reason}"], second.stderr
    assert error_lines(first.stderr) == [
        f"error: process 1 could not start the run: {reason}"], first.stderr
    assert first.returncode != 0 and second.returncode != 0


def test_processes_whose_torchrun_is_killed_save_their_step_and_stop(
        tiny_model, corpus, tmp_path):
    """kill -9 of torchrun while its processes train: no signal reaches them from it, yet
    they save the step and end within seconds, leaving the output directory's lock free."""
    out = tmp_path / "out"
    args = run_args(tiny_model, corpus, out, 16, "--max_steps", "6")
    # Each process waits after step 2 (up to 2 minutes) for a signal: one that keeps
    # training would still be there.
    process = start_torchrun(["await-signal", "2", "--", *args], "tests/interrupt.py")
    try:
        wait_for(lambda: all_await_the_signal(args, 2), process, "step 2 in both processes")
        process.kill()
        killed = time.monotonic()
        # The processes hold torchrun's output pipes: they are closed once both have ended.
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - killed < 30
    assert stderr.count("which started it, has ended; stopping at the next report step") == 2
    assert error_lines(stderr) == [
        f"stopped by SIGTERM at step 2: saved {out / 'checkpoint-2'}. To continue, run the "
        f"same command with --resume latest"], stderr
    assert runtime.rundir.is_complete(out / "checkpoint-2")
    with runtime.rundir.exclusive(out):  # no process holds the lock any more
        pass

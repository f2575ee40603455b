"""Nothing lost: exact resume after SIGKILL, atomic checkpoints, preemption by signal,
non-finite losses, and arguments that change between a run and its resumption."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fixtures
import pytest
from conftest import ROOT, quick_run_args, read_metrics, run_train
from safetensors.torch import load_file

import runtime.rundir
import train

# 258 training reviews in batches of 16: 16 optimizer steps an epoch, 48 in all. A
# checkpoint every 5 steps puts them mid-epoch; the kill at step 23 is mid-epoch too.
RUN = ["--epochs", "3", "--save_every_steps", "5", "--keep_checkpoints", "3"]


def interrupted(fault, step, args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "interrupt.py"), fault,
                           str(step), "--", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kwargs)


def weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """The reference, run once for the tests below: the same run, never stopped (on a
    corpus folder of its own, which holds the same reviews)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    corpus = fixtures.write_corpus(folder / "corpus")
    result = run_train(quick_run_args(tiny_model, corpus, folder) + RUN)
    assert result.returncode == 0, result.stderr
    return folder / "out"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(train_args, tmp_path,
                                                                    uninterrupted):
    args = train_args + RUN
    killed = interrupted("sigkill", 23, args)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-20"   # mid-epoch 2
    resumed = run_train(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:         " in resumed.stdout and "(step 20, epoch 2)" in resumed.stdout

    assert_same_weights(out / "checkpoint-48", uninterrupted / "checkpoint-48")
    assert_same_weights(out, uninterrupted)                          # the best model too
    assert_same_losses(out, uninterrupted)


@pytest.mark.slow
def test_resume_with_group_by_length_matches_an_uninterrupted_run(train_args, tmp_path):
    # The order of the batches grouped by length is a function of seed and epoch alone.
    args = train_args + RUN + ["--group_by_length"]
    reference = tmp_path / "reference"
    assert run_train(args + ["--downstream_model_dir", str(reference)]).returncode == 0
    assert interrupted("sigkill", 23, args).returncode == -signal.SIGKILL
    resumed = run_train(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 20, epoch 2)" in resumed.stdout
    assert_same_weights(tmp_path / "out" / "checkpoint-48", reference / "checkpoint-48")
    assert_same_losses(tmp_path / "out", reference)


def assert_same_losses(a, b):
    """Every logged loss, learning rate and validation loss agrees exactly (timings and
    speeds need not)."""
    keys = ("event", "step", "loss", "lr", "val_loss")

    def losses(directory):
        return [{k: e[k] for k in keys if k in e} for e in read_metrics(directory)]
    assert losses(a) == losses(b)


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(train_args, tmp_path, uninterrupted):
    args = train_args + RUN
    killed = interrupted("kill-in-save", 15, args)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert (out / "checkpoint-15.tmp").is_dir()                        # the half-written one
    assert (out / "checkpoint-10" / "training_state.pt").is_file()
    resumed = run_train(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping" in resumed.stderr and "checkpoint-15.tmp" in resumed.stderr
    assert "(step 10, epoch 1)" in resumed.stdout
    assert_same_weights(out / "checkpoint-48", uninterrupted / "checkpoint-48")
    assert not (out / "checkpoint-15.tmp").exists()                    # cleaned by the next save
    assert_same_losses(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_prints_how_to_resume_and_exits_nonzero(train_args, tmp_path,
                                                              uninterrupted):
    args = train_args + RUN
    stopped = interrupted("sigterm", 23, args)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 23" in stopped.stderr
    assert "--resume latest" in stopped.stderr and "Traceback" not in stopped.stderr
    out = tmp_path / "out"
    assert runtime.rundir.latest_checkpoint(out).name == "checkpoint-23"
    resumed = run_train(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(out / "checkpoint-48", uninterrupted / "checkpoint-48")
    assert_same_losses(out, uninterrupted)


def wait_for_training(out, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and read_metrics(out, "train"):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.slow
@pytest.mark.parametrize("sig, device", [(signal.SIGINT, "cpu"), (signal.SIGTERM, "xla")])
def test_signal_to_a_running_process(train_args, tmp_path, sig, device):
    """Ctrl-C on the CPU; on XLA a SIGTERM to the launcher reaches the replica, which saves."""
    out = tmp_path / "out"
    args = train_args + ["--epochs", "1000", "--device", device]
    env = {**os.environ, "PJRT_DEVICE": "CPU"} if device == "xla" else os.environ
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(out, process)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "--resume latest" in stderr
    saved = runtime.rundir.latest_checkpoint(out)
    assert saved is not None and (saved / "training_state.pt").is_file()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_args, tmp_path):
    args = train_args + ["--save_every_steps", "2", "--log_every", "4", "--epochs", "1"]
    result = interrupted("nan", 5, args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the training loss became non-finite at step 5")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(train_args, tmp_path):
    args = train_args + RUN
    result = interrupted("disk-full", 10, args)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write") and "checkpoint-10" in line
    assert "No space left on device" in line and "checkpoint-5 is intact" in line
    out = tmp_path / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-5"]
    assert runtime.rundir.is_complete(out / "checkpoint-5")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_refuses_changed_shapes_and_warns_about_harmless_changes(train_args, tmp_path,
                                                                        capsys):
    args = train_args + ["--max_steps", "4", "--save_every_steps", "2"]
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main(args + ["--resume", "latest", "--batch_size", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --resume: --batch_size is 8 but the checkpoint was trained with 16; "
                   "use the same value or start a new --downstream_model_dir")
    assert train.main(args + ["--resume", "latest", "--max_seq_length", "24"]) == 1
    assert "--max_seq_length is 24" in capsys.readouterr().err
    assert train.main(args + ["--resume", "latest", "--group_by_length"]) == 1  # another order
    assert "--group_by_length is True" in capsys.readouterr().err
    assert train.main(args + ["--resume", "latest", "--log_every", "3"]) == 0
    assert "warning: --resume: --log_every changed from 1 to 3" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_latest_with_no_checkpoint_starts_afresh(train_args, capsys):
    assert train.main(train_args + ["--max_steps", "2", "--resume", "latest"]) == 0
    assert "no checkpoint in" in capsys.readouterr().err


@pytest.mark.slow
def test_xla_replicas_exit_with_a_killed_launcher(train_args, tmp_path):
    import psutil
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args,
                                "--epochs", "1000", "--device", "xla"], cwd=ROOT,
                               env={**os.environ, "PJRT_DEVICE": "CPU"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_training(out, process)
        replicas = psutil.Process(process.pid).children()
        assert replicas
        process.kill()
        gone, alive = psutil.wait_procs(replicas, timeout=60)
        assert not alive, "a replica outlived its launcher"
    finally:
        process.kill()

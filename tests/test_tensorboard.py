"""TensorBoard: the curves of metrics.jsonl in event files, read back with TensorBoard's own
reader; a resumed run continues them with no stale points after the resume step; whatever
fails in it is one warning, and the run goes on."""
import errno
import os
import pathlib
import sys
import threading

import pytest
from conftest import read_metrics, run_train
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from runtime.reporting import MetricsLog

SCALARS = {"train/loss": ("train", "loss"), "train/learning_rate": ("train", "lr"),
           "train/tokens_per_s": ("train", "tokens_per_s"), "eval/val_loss": ("eval", "val_loss"),
           "eval/perplexity": ("eval", "perplexity"),
           "eval/polarity_accuracy": ("eval", "polarity_accuracy")}

# 258 training reviews in batches of 16: 8 steps, a checkpoint every 2, evaluations at 0, 4, 8.
RUN = ["--max_steps", "8", "--save_every_steps", "2", "--eval_every", "4",
       "--keep_checkpoints", "10"]


def board(out):
    """What TensorBoard shows: the reader its server uses, which keeps every point (0) and
    reads every event file of the folder, oldest first."""
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                  for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}


@pytest.mark.slow
def test_event_files_hold_what_metrics_jsonl_holds_and_a_resume_continues_them(train_args,
                                                                               tmp_path):
    first = run_train(train_args + RUN)
    assert first.returncode == 0, first.stderr
    # Once the first report (step 1 here) has timed a step, one line estimates the rest.
    assert first.stdout.count("timing: ") == 1 and "the 7 steps left take about" in first.stdout
    out = tmp_path / "out"
    # Resume from step 4 of the finished run: steps 5 to 8 are trained (and logged) again.
    resumed = run_train(train_args + RUN + ["--resume", str(out / "checkpoint-4")])
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2

    events = board(out)
    for tag, (kind, key) in SCALARS.items():
        logged = read_metrics(out, kind)
        # One point a step: the first run's points after step 4 were purged, not doubled.
        assert [step for step, _ in events[tag]] == [e["step"] for e in logged], tag
        assert [value for _, value in events[tag]] == pytest.approx(
            [e[key] for e in logged], rel=1e-6)
    assert [step for step, _ in events["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in events["eval/val_loss"]] == [0, 4, 8]

    samples = events["samples/text_summary"]
    assert [step for step, _ in samples] == [0, 4, 8]
    last = samples[-1][1].decode()
    for word, review in read_metrics(out, "eval")[-1]["samples"].items():
        assert f"**{word}** {review}" in last


@pytest.mark.slow
def test_report_to_none_writes_no_event_files(train_args, tmp_path):
    result = run_train(train_args + ["--max_steps", "2", "--report_to", "none"])
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path / "out", "train")           # metrics.jsonl is still written
    assert not (tmp_path / "out" / "tensorboard").exists()


def test_the_estimate_counts_the_evaluations_still_to_come():
    from runtime import reporting

    # 48 steps of 16 a epoch: evaluations at 16, 32, 48; with --eval_every 10 also 10, 20, 30, 40.
    assert reporting.evaluations_after(0, 48, 16, None) == 3
    assert reporting.evaluations_after(0, 48, 16, 10) == 7
    assert reporting.evaluations_after(20, 48, 16, None) == 2       # resumed at step 20
    line = reporting.Plan(100, 1, 360.0).estimate(50, 4.7)
    assert line == ("timing: 4.7 s/step so far; the 50 steps left take about 4 min, plus 6 min "
                    "for 1 evaluation like the first")


# --------------------------------------------------------------------------- failures

def warning(out):
    return (f"warning: could not write TensorBoard's events in {out / 'tensorboard'} "
            f"([Errno 28] No space left on device); training goes on without them\n")


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failure_in_the_writers_thread_is_one_warning_and_no_traceback(tmp_path, capsys,
                                                                         monkeypatch):
    printed = []  # what would print a thread's traceback
    monkeypatch.setattr(threading, "excepthook", printed.append)
    log = MetricsLog(tmp_path / "metrics.jsonl", True, 4, tensorboard=True)
    before = set(threading.enumerate())
    log.write({"event": "train", "loss": 1.0}, 1)
    writer_threads = set(threading.enumerate()) - before
    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)  # the thread writes
    log.write({"event": "train", "loss": 0.9}, 2)
    for thread in writer_threads:
        thread.join(timeout=30)  # it ends with the failure
    log.write({"event": "train", "loss": 0.8}, 3)
    assert printed == []
    assert capsys.readouterr().err == warning(tmp_path)
    assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2, 3]  # metrics.jsonl goes on


def test_a_failure_to_start_the_writer_is_one_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    log = MetricsLog(tmp_path / "metrics.jsonl", True, 4, tensorboard=True)
    for step in (1, 2):
        log.write({"event": "train", "loss": 1.0}, step)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: could not write TensorBoard's events in "
                          f"{tmp_path / 'tensorboard'} (import of torch.utils.tensorboard ")
    assert err.count("\n") == 1 and len(read_metrics(tmp_path)) == 2


def test_an_old_event_file_that_cannot_be_removed_is_one_warning(tmp_path, capsys, monkeypatch):
    old = tmp_path / "tensorboard" / "events.out.tfevents.1.host.1.0"
    old.parent.mkdir()
    old.write_bytes(b"an earlier run's events")
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "unlink", full_disk)
        log = MetricsLog(tmp_path / "metrics.jsonl", True, 4, tensorboard=True)
        log.restart_after(None)  # a fresh run
    log.write({"event": "train", "loss": 1.0}, 1)
    assert capsys.readouterr().err == (
        f"warning: could not remove {old}, an earlier run's TensorBoard events ([Errno 28] No "
        f"space left on device); this run's curves hide them\n")
    assert board(tmp_path)["train/loss"] == [(1, 1.0)]  # the new events, after the old

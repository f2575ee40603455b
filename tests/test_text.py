"""Text never crashes a run: a file read back on resume that was cut at any byte (inside a
Hangul character too), a terminal that cannot show Hangul, text that is not UTF-8."""
import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import runtime.errors
from runtime.reporting import MetricsLog

EVENTS = [{"event": "eval", "val_loss": 5.0, "samples": {"긍정": "최고의 영화", "부정": "지루했다"}},
          {"event": "train", "loss": 4.5, "lr": 1e-3, "tokens_per_s": 10.0},
          {"event": "eval", "val_loss": 4.0, "samples": {"긍정": "다시 보고 싶다", "부정": "별로"}}]


def written_log(path):
    """metrics.jsonl with EVENTS at steps 0, 1, 2: (its bytes, the offset of its last line)."""
    log = MetricsLog(path, is_master=True, steps_per_epoch=2)
    for step, event in enumerate(EVENTS):
        log.write(event, step)
    data = path.read_bytes()
    return data, data.rindex(b"\n", 0, len(data) - 1) + 1


def test_a_last_line_of_metrics_cut_at_any_byte_is_dropped_with_one_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    data, last = written_log(path)
    hangul = data.index("보".encode(), last)
    assert hangul + 1 < len(data) - 1  # the cuts below include two inside that character
    for cut in range(last + 1, len(data) - 1):  # every cut that leaves part of the line
        path.write_bytes(data[:cut])
        MetricsLog(path, is_master=True, steps_per_epoch=2).restart_after(2)
        assert path.read_bytes() == data[:last], cut           # the whole lines, kept as written
        err = capsys.readouterr().err
        assert err == f"warning: {path}: dropping line 3, cut short (a run killed while " \
                      f"writing it)\n", cut


def test_a_fresh_run_drops_a_cut_log_without_a_word(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    data, last = written_log(path)
    path.write_bytes(data[:data.index("보".encode(), last) + 1])
    MetricsLog(path, is_master=True, steps_per_epoch=2).restart_after(None)
    assert path.read_bytes() == b"" and capsys.readouterr().err == ""


def test_output_that_the_terminal_cannot_show_is_replaced(monkeypatch):
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="euc-kr")
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("PYTHONIOENCODING", "euc-kr")
    runtime.errors.print_on_any_terminal()
    print("긍정 😀 부정")
    terminal.flush()
    assert terminal.buffer.getvalue().decode("euc-kr") == "긍정 ? 부정\n"
    # Processes started from here (XLA replicas) replace too.
    assert runtime.errors.os.environ["PYTHONIOENCODING"] == "euc-kr:replace"


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["ascii", "euc-kr"])
def test_generate_help_on_a_terminal_that_is_not_utf8(encoding):
    """Its help holds Hangul (and no torch loads for it: a cheap process). A whole run of
    train.py on an ASCII terminal: tests/test_train.py."""
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], cwd=ROOT,
                            capture_output=True, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    assert "--polarity" in result.stdout.decode(encoding, errors="strict")

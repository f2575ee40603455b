"""Text never crashes a run: a file read back on resume that was cut at any byte (inside a
Hangul character too), a terminal that cannot show Hangul, text that is not UTF-8."""
import io
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import generate
import runtime.errors
from corpus.read import read_corpus
from model import load_tokenizer
from runtime.errors import InputError
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


# --------------------------------------------------------------------------- not UTF-8

def test_a_prompt_that_is_not_utf8_is_one_line(tiny_model, capsys):
    # What Python makes of cp949 bytes for "이 영" in argv: one lone surrogate a byte.
    prompt = "이 영".encode("cp949").decode("utf-8", "surrogateescape")
    status = generate.main(["--downstream_model_dir", str(tiny_model), "--device", "cpu",
                            "--prompt", prompt, "--num_samples", "1"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err == ("error: --prompt is not UTF-8 (a terminal in cp949 or euc-kr sends other "
                   "bytes); give it in UTF-8\n")


def test_a_corpus_file_in_cp949_says_how_to_convert_it(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_bytes("document\tlabel\n최고의 영화\t1\n".encode("cp949"))
    with pytest.raises(InputError) as error:
        read_corpus(path)
    assert str(error.value) == (f"{path}:2: byte 0xc3 is not UTF-8; re-save the file as UTF-8 "
                                f"(it reads as cp949/euc-kr: iconv -f cp949 -t utf-8 {path} > "
                                f"utf8.txt)")


@pytest.mark.parametrize("kept", [1, 3], ids=["inside a character", "after a character"])
def test_a_tokenizer_json_cut_short_is_one_line(tiny_model, tmp_path, kept):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    data = (directory / "tokenizer.json").read_bytes()
    (directory / "tokenizer.json").write_bytes(data[:data.index("영".encode()) + kept])
    with pytest.raises(InputError) as error:
        load_tokenizer(str(directory), flag="--downstream_model_dir")
    assert str(error.value).startswith(f"--downstream_model_dir {directory}: tokenizer.json "
                                       f"does not load (")

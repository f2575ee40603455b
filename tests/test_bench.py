"""The benchmark runs end to end at a tiny size and prints its tables (no timing checks:
a test machine's speed says nothing about the code)."""
import pytest
import os
import re
import subprocess
import sys

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs train.py or generate.py as a process


def test_benchmark_prints_data_timings_and_every_loop(tiny_model, corpus):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"),
         "--pretrained_model_name", str(tiny_model), "--downstream_corpus_root_dir", str(corpus),
         "--device", "cpu", "--batch_size", "8", "--warmup_steps", "1", "--steps", "2",
         "--repeats", "1", "--log_every", "1"],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.lstrip().startswith("cold (read, tokenize, cache):") for line in lines)
    assert any(line.lstrip().startswith("warm (load from the cache):") for line in lines)
    header = next(line for line in lines if "examples/s" in line and "tokens/s" in line)
    assert "ms/step" in header and "peak MiB" in header
    rows = ("ours ", "ours, padded ", "Trainer ", "ours, padded, grouped ", "Trainer, grouped ",
            "ours/Trainer's best ", "ours, padded/Trainer ", "both padded and grouped ")
    for row in rows:
        assert any(line.startswith(row) for line in lines), row
    packed, padded = (next(line for line in lines if line.lstrip().startswith(f"{name}: "))
                      for name in ("ours", "ours, padded"))
    assert "rows of 32 positions per batch on average" in packed
    share = [int(re.search(r"(\d+)% of them real tokens", line)[1]) for line in (packed, padded)]
    assert share[0] > share[1]  # packing: more of what the transformer runs on is real


def test_activation_memory_benchmark_prints_both_settings_and_their_ratio():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "activation_memory.py"), "--model_shape",
         "tiny", "--device", "cpu", "--batch_size", "2", "--seq_length", "16", "--steps", "1"],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "process peak MiB" in lines[1] and "step peak MiB" in lines[1]
    assert "ms/step" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == [
        "without", "--activation_checkpointing", "with/without"]

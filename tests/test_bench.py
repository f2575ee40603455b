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


def run_sharding_benchmark(tmp_path, *flags):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sharding.py"), "--shapes", "tiny",
         "--max_steps", "3", "--batch_size", "2", "--max_seq_length", "32",
         "--work", str(tmp_path), *flags],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=600)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| tiny ")]
    return result, [[cell.strip() for cell in row] for row in rows]


def test_sharding_benchmark_reports_each_process_peak_memory_and_speed(tmp_path):
    result, rows = run_sharding_benchmark(tmp_path, "--modes", "ddp", "fsdp")
    assert result.returncode == 0, result.stderr
    assert [row[2] for row in rows] == ["ddp", "fsdp"]
    for shape, params, mode, outcome, peaks, rate, step_s, wall in rows:
        assert outcome == "trained"
        assert len(peaks.split(", ")) == 2 and all(float(p) > 0.1 for p in peaks.split(", "))
        assert float(rate.replace(",", "")) > 0
        assert 0 <= float(step_s) < float(wall)  # nan (no step seen twice) fails too


def test_sharding_benchmark_stops_a_run_at_the_memory_cap(tmp_path):
    result, rows = run_sharding_benchmark(tmp_path, "--modes", "ddp", "--memory_cap_gib", "0.2")
    assert result.returncode == 0, result.stderr  # a shape that does not fit is a result
    assert rows[0][3] == "stopped at the 0.2 GiB cap"

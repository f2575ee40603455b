"""Every script of the repository answers bad input in one line: `error: ...` on stderr,
no traceback, a non-zero exit status, before any work. Each script runs here through its
`main(argv)`, in this process; a mistyped flag or value is answered by argparse through
options.ArgumentParser, in one line too (exit status 2)."""
import importlib.util
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from conftest import ROOT

import fixtures

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")


def load(script):
    """The module of `script` (a path from the repository's root), imported once. Imported
    with the environment restored afterwards: a benchmark sets a default PJRT_DEVICE."""
    name = "script_" + script.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        sys.path.insert(0, str(ROOT / os.path.dirname(script)))  # its neighbours (measuring.py)
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        module = importlib.util.module_from_spec(spec)
        with mock.patch.dict(os.environ):
            spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


@pytest.fixture
def inputs(tmp_path, tiny_model):
    """Bad and partial input files, and the paths the cases name, by placeholder."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    empty_corpus = fixtures.write_corpus(tmp_path / "corpus")
    (empty_corpus / "nsmc" / "ratings_test.txt").write_text("")
    event = '{"event": "train", "step": 1, "loss": 2.0}\n'
    (tmp_path / "cut-inside.jsonl").write_text(event + '{"event": "ev\n' + event)
    (tmp_path / "cut-first.jsonl").write_text(event[:20])
    return {"tmp": tmp_path, "empty": empty, "empty_corpus": empty_corpus, "model": tiny_model}


BENCH = "benchmarks/bench_train.py"
CONTROL = "benchmarks/polarity_control.py"
XLA = "benchmarks/xla_replicas.py"
TORCHRUN = "benchmarks/torchrun_replicas.py"
MEMORY = "benchmarks/activation_memory.py"
SHARDING = "benchmarks/sharding.py"
PLOT = "docs/plot_metrics.py"
FIXTURES = "tests/fixtures.py"
CUDA = "--device cuda: no CUDA GPU is visible"
EMPTY = "the file is empty"

CASES = [
    # generate.py: every sampling flag, the counts, the device, an empty file
    ("generate.py", ["--temperature", "1e-30"], "--temperature must be from 1e-06 to 1e+06"),
    ("generate.py", ["--temperature", "nan"], "--temperature must be from 1e-06 to 1e+06"),
    ("generate.py", ["--temperature", "-1"], "--temperature must be from 1e-06 to 1e+06"),
    ("generate.py", ["--top_p", "0"], "--top_p must be above 0 and at most 1"),
    ("generate.py", ["--top_k", "-1"], "--top_k must be 0 or more"),
    ("generate.py", ["--repetition_penalty", "1e-30"], "--repetition_penalty must be from"),
    ("generate.py", ["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be 0 or"),
    ("generate.py", ["--guidance", "nan"], "--guidance must be from 1 to 1e+06"),
    ("generate.py", ["--num_samples", "0"], "--num_samples must be 1 or more"),
    ("generate.py", ["--max_new_tokens", "-1"], "--max_new_tokens must be 1 or more"),
    ("generate.py", ["--batch_size", "0"], "--batch_size must be 1 or more"),
    ("generate.py", ["--max_seq_length", "0"], "--max_seq_length must be 1 or more"),
    ("generate.py", ["--polarity_eval_size", "0"], "--polarity_eval_size must be 1 or more"),
    ("generate.py", ["--control_samples", "-1"], "--control_samples must be 0 or more"),
    ("generate.py", ["--seed", str(2**64)], "--seed must be from -2**63"),
    ("generate.py", ["--num_samples", "nan"], "argument --num_samples: invalid int value"),
    ("generate.py", ["--device", "tpu"], "argument --device: invalid choice"),
    pytest.param("generate.py", ["--device", "cuda"], CUDA, marks=NO_CUDA),
    ("generate.py", ["--downstream_model_dir", "{model}", "--device", "cpu", "--evaluate",
                     "--val_file", "{empty}"], EMPTY),
    # train.py: its checks are tests/test_nothing_lost.py's; its parser is the shared one
    ("train.py", ["--batch_size", "1.5"], "argument --batch_size: invalid int value"),
    ("train.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    # benchmarks
    (BENCH, ["--steps", "0"], "--steps must be 1 or more"),
    (BENCH, ["--threads", "0"], "--threads must be 1 or more"),
    (BENCH, ["--max_examples", "1"], "--max_examples 1 is less than one batch"),
    (BENCH, ["--learning_rate", "nan"], "--learning_rate must be positive"),
    (BENCH, ["--weight_decay", "-1"], "--weight_decay must be 0 or more"),
    (BENCH, ["--max_grad_norm", "0"], "--max_grad_norm must be positive"),
    (BENCH, ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (BENCH, ["--repeats", "nan"], "argument --repeats: invalid int value"),
    pytest.param(BENCH, ["--device", "cuda"], CUDA, marks=NO_CUDA),
    (BENCH, ["--downstream_corpus_root_dir", "{empty_corpus}", "--pretrained_model_name",
             "{model}", "--device", "cpu", "--data_only"], EMPTY),
    (CONTROL, ["--max_steps", "0"], "--max_steps must be 1 or more"),
    (CONTROL, ["--samples", "-1"], "--samples must be 1 or more"),
    (CONTROL, ["--val_reviews", "-1"], "--val_reviews must be 0 or more"),
    (CONTROL, ["--learning_rate", "0"], "--learning_rate must be a finite number above 0"),
    (CONTROL, ["--guidance", "1", "1e-30"], "--guidance must be from 1 to 1e+06"),
    (CONTROL, ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (CONTROL, ["--device", "tpu"], "argument --device: invalid choice"),
    pytest.param(CONTROL, ["--device", "cuda"], CUDA, marks=NO_CUDA),
    (CONTROL, ["--downstream_corpus_root_dir", "{empty_corpus}", "--device", "cpu"], EMPTY),
    (XLA, ["--replicas", "0"], "--global_batch 32 does not split over [0] replicas"),
    (XLA, ["--replicas", "3"], "--global_batch 32 does not split over [3] replicas"),
    (XLA, ["--global_batch", "0"], "--global_batch must be 1 or more"),
    (XLA, ["--max_steps", "-1"], "--max_steps must be 1 or more"),
    (XLA, ["--learning_rate", "nan"], "--learning_rate must be a finite number above 0"),
    (XLA, ["--timeout", "0"], "--timeout must be a finite number above 0"),
    (TORCHRUN, ["--processes", "-2"], "--global_batch 32 does not split over [-2] processes"),
    (TORCHRUN, ["--repeats", "0"], "--repeats must be 1 or more"),
    (TORCHRUN, ["--timeout", "-1"], "--timeout must be a finite number above 0"),
    (MEMORY, ["--steps", "0"], "--steps must be 1 or more"),
    (MEMORY, ["--model_shape", "tiny", "--seq_length", "129"],
     "--seq_length 129 is longer than the 128 positions of --model_shape tiny"),
    pytest.param(MEMORY, ["--device", "cuda"], CUDA, marks=NO_CUDA),
    (SHARDING, ["--processes", "0"], "--processes must be 1 or more"),
    (SHARDING, ["--max_steps", "2"], "--max_steps must be 3 or more (the speed is read after"),
    (SHARDING, ["--memory_cap_gib", "0"], "--memory_cap_gib must be a finite number above 0"),
    (SHARDING, ["--shapes", "huge"], "argument --shapes: invalid choice"),
    # docs/plot_metrics.py: empty, cut and missing logs, an output it cannot write
    (PLOT, ["{empty}", "{tmp}/out.svg"], "no training or validation loss to draw yet"),
    (PLOT, ["{tmp}/cut-first.jsonl", "{tmp}/out.svg"], "no training or validation loss"),
    (PLOT, ["{tmp}/cut-inside.jsonl", "{tmp}/out.svg"], "cut-inside.jsonl:2: not a JSON event"),
    (PLOT, ["{tmp}/missing.jsonl", "{tmp}/out.svg"], "missing.jsonl: cannot be read"),
    (PLOT, ["{tmp}/cut-inside.jsonl"], "the following arguments are required: out"),
    # tests/fixtures.py as a command line
    (FIXTURES, [], "give --write_corpus DIR, or --corpus FILE and --out DIR"),
    (FIXTURES, ["--corpus", "{empty}"], "--corpus and --out go together"),
    (FIXTURES, ["--corpus", "{empty}", "--out", "{tmp}/m"], EMPTY),
    (FIXTURES, ["--corpus", "{tmp}/missing", "--out", "{tmp}/m"], "--corpus"),
    (FIXTURES, ["--write_corpus", "{tmp}/c", "--train_reviews", "0"], "--train_reviews must be"),
    (FIXTURES, ["--write_corpus", "{tmp}/c", "--test_reviews", "-1"], "--test_reviews must be"),
    (FIXTURES, ["--corpus", "{empty}", "--out", "{tmp}/m", "--vocab_size", "0"],
     "--vocab_size must be 8 or more"),
    (FIXTURES, ["--corpus", "{empty}", "--out", "{tmp}/m", "--n_head", "3"],
     "--n_embd 64 does not split over --n_head 3"),
    (FIXTURES, ["--corpus", "{empty}", "--out", "{tmp}/m", "--n_layer", "0"],
     "--n_layer must be 1 or more"),
    (FIXTURES, ["--corpus", "{empty}", "--out", "{tmp}/m", "--lines", "nan"],
     "argument --lines: invalid int value"),
]


@pytest.mark.parametrize("script, argv, expected", CASES)
def test_bad_input_is_one_line(script, argv, expected, inputs, capsys):
    argv = [arg.format(**inputs) for arg in argv]
    try:
        status = load(script).main(argv)
    except SystemExit as e:  # argparse: a mistyped flag or value
        status = e.code
    out, err = capsys.readouterr()
    assert status in (1, 2) and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (inputs["tmp"] / "out.svg").exists()  # nothing written: refused before


def test_plot_metrics_draws_a_log_whose_last_line_was_cut(tmp_path):
    """A run killed while writing metrics.jsonl leaves half a line: the rest is drawn."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"event": "train", "step": 1, "loss": 2.0}\n'
                   '{"event": "eval", "step": 1, "val_loss": 1.5, "polarity_accuracy": 0.5}\n'
                   '{"event": "train", "step": 2, "lo')
    assert load(PLOT).main([str(log), str(tmp_path / "out.svg")]) == 0
    assert (tmp_path / "out.svg").read_text().count("<polyline") == 3


@pytest.mark.slow
@pytest.mark.parametrize("script, argv", [
    ("generate.py", ["--num_samples", "x"]), ("train.py", ["--batch_size", "x"]),
    (PLOT, ["missing.jsonl", "out.svg"]), (FIXTURES, ["--vocab_size", "0", "--write_corpus", "c"]),
    (XLA, ["--timeout", "0"])])
def test_each_script_as_a_process_exits_with_its_one_line(script, argv, tmp_path):
    """The scripts' `__main__` blocks pass main's status on, and print nothing more. (Those
    that load torch before their arguments, a second or more each, are left to the test
    above: their `__main__` is `sys.exit(main())` alone.)"""
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PJRT_DEVICE": "CPU"})
    assert result.returncode in (1, 2) and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")

"""The model's positions are checked once, before the first step or the first token, on
every path that runs the model past a training row: generate.py's reviews, its --evaluate
(polarity scoring and control accuracy), and train.py's evaluations (the reviews each one
writes, the control accuracy of the last one, polarity scoring). Whatever does not fit is
one line naming the flag and the limit; whatever fits, up to the last position, runs."""
import json
import shutil

import pytest

import fixtures
import generate
import task.polarity
import train
from model import load_model, load_tokenizer
from corpus.features import load_features
from runtime.backends import Backend
from runtime.errors import InputError

POSITIONS = 128  # the tiny model's n_positions


def error_line(capsys):
    """The one line printed for bad input, checked to be alone and to come before any
    other output."""
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, (out, err)
    return err.rstrip("\n")


@pytest.fixture
def evaluate_args(tiny_model, corpus, tmp_path):
    return ["--downstream_model_dir", str(tiny_model), "--device", "cpu", "--evaluate",
            "--downstream_corpus_root_dir", str(corpus), "--cache_dir", str(tmp_path / "cache"),
            "--control_samples", "1", "--max_new_tokens", "4"]


# --------------------------------------------------------------------------- generate.py

@pytest.mark.parametrize("flags, expected", [
    (["--max_new_tokens", str(POSITIONS)],
     f"error: --max_new_tokens {POSITIONS} does not fit the model's {POSITIONS} positions after "
     f"the 1 token of the polarity word; use --max_new_tokens {POSITIONS - 1} or less"),
    (["--max_seq_length", str(POSITIONS + 1)],
     f"error: --max_seq_length {POSITIONS + 1} does not fit the model's {POSITIONS} positions; "
     f"use --max_seq_length {POSITIONS} or less"),
])
def test_evaluate_checks_the_positions_before_scoring(evaluate_args, capsys, flags, expected):
    """Control accuracy's reviews used to run past the positions (an IndexError) after the
    whole polarity scoring; now the line comes before anything is scored."""
    assert generate.main(evaluate_args + flags) == 1
    assert error_line(capsys) == expected


def test_evaluate_scores_rows_as_long_as_the_positions(evaluate_args, capsys):
    """--max_seq_length at the model's positions works. (The longest --max_new_tokens that
    fits works too: tests/test_generate_args.py, the same check.)"""
    argv = evaluate_args + ["--max_seq_length", str(POSITIONS), "--control_samples", "0"]
    assert generate.main(argv) == 0
    assert "polarity accuracy:" in capsys.readouterr().out


# --------------------------------------------------------------------------- polarity scoring

class FixedShapes(Backend):
    """The CPU with XLA's batches: every row as wide as --max_seq_length."""
    fixed_shapes = True


def test_polarity_scoring_in_fixed_shapes_fills_the_positions(tiny_model, corpus, tmp_path):
    """On XLA the scored rows were the polarity word plus a whole --max_seq_length row: one
    position past the model's at --max_seq_length equal to them (an IndexError at step 0)."""
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer).eval()
    features = load_features(corpus / "nsmc" / "ratings_test.txt", tokenizer, POSITIONS,
                             tmp_path / "cache")
    backend = FixedShapes("cpu", "fp32")
    accuracy = task.polarity.polarity_accuracy(model, tokenizer, features, backend, 16)
    assert accuracy == task.polarity.polarity_accuracy(model, tokenizer, features,
                                                       Backend("cpu", "fp32"), 16)


def test_polarity_words_of_different_lengths_leave_less_room(tiny_model, monkeypatch):
    """Scoring puts either word before a review cut for its own: a longer other word needs
    as many more positions."""
    monkeypatch.setattr(task.polarity, "word_lengths", lambda tokenizer: {0: 1, 1: 3})
    tokenizer = load_tokenizer(str(tiny_model))
    task.polarity.check_scoring_fits(POSITIONS, tokenizer, POSITIONS - 2)
    with pytest.raises(InputError) as refused:
        task.polarity.check_scoring_fits(POSITIONS, tokenizer, POSITIONS - 1)
    assert str(refused.value) == (
        f"--max_seq_length {POSITIONS - 1} does not fit the model's {POSITIONS} positions after "
        f"the 2 tokens that polarity scoring adds before a review cut for the shorter polarity "
        f"word; use --max_seq_length {POSITIONS - 2} or less")


# --------------------------------------------------------------------------- train.py

def with_positions(tiny_model, folder, positions):
    """The tiny model's tokenizer with a fresh model of `positions` positions."""
    folder.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder)
    vocab_size = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    fixtures.build_model(folder, vocab_size, n_positions=positions)
    return folder


@pytest.mark.parametrize("positions, expected", [
    (20, "error: the short review that each evaluation writes, 20 tokens, does not fit the "
         "model's 20 positions after the 1 token of the polarity word; "
         "--pretrained_model_name: use a model with 21 positions or more"),
    (40, "error: each review that control accuracy writes, 40 tokens, does not fit the model's "
         "40 positions after the 1 token of the polarity word; use --polarity_eval_size 0 (no "
         "polarity or control accuracy), or a model with 41 positions or more"),
])
def test_train_checks_its_evaluations_fit_before_the_first_step(
        tiny_model, train_args, tmp_path, capsys, positions, expected):
    """The control accuracy's reviews used to run past a 40-position model's positions at
    the final evaluation, after the whole run; the samples at the first one."""
    model = with_positions(tiny_model, tmp_path / "short", positions)
    argv = train_args + ["--pretrained_model_name", str(model), "--max_seq_length", "16"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == expected and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # not a step was taken


def test_train_without_polarity_scoring_needs_room_for_the_samples_only(tiny_model, corpus,
                                                                        tmp_path):
    model = with_positions(tiny_model, tmp_path / "short", 21)
    tokenizer = load_tokenizer(str(model))
    features = load_features(corpus / "nsmc" / "ratings_test.txt", tokenizer, 16,
                             tmp_path / "cache")
    nsmc = task.nsmc.NsmcTask(task.nsmc.TaskConfig(polarity_eval_size=0), tokenizer, features,
                              None, None)
    nsmc.check_positions(21)
    with pytest.raises(InputError, match="control accuracy"):
        task.nsmc.NsmcTask(task.nsmc.TaskConfig(), tokenizer, features, None,
                           None).check_positions(21)

"""generate.py's sampling flags: every value that cannot work is refused in one line that
names the flag and what it accepts (exit status 1, no traceback), and every edge that can
work does: temperature 0 is greedy decoding, a review may fill the model's positions."""
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT

import generate
import task.generation
from model import load_model, load_tokenizer


def run(argv, capsys):
    """generate.main(argv) in this process: (exit status, stdout, stderr)."""
    status = generate.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def error_line(argv, capsys):
    """The one line that generate.py prints for bad input, checked to be alone."""
    status, out, err = run(argv, capsys)
    assert status == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.fixture
def model_args(tiny_model):
    """A tiny GPT-2 with 128 positions, for runs that reach `generate`."""
    return ["--downstream_model_dir", str(tiny_model), "--device", "cpu"]


# --------------------------------------------------------------------------- temperature 0

def test_temperature_0_is_greedy_decoding(tiny_model, model_args, capsys, caplog):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer).eval()
    settings = dict(max_new_tokens=8, repetition_penalty=1.2, no_repeat_ngram_size=3)
    expected = []
    for word in ["긍정", "부정"]:
        input_ids = task.generation.prompt_ids(tokenizer, word, "영화")
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **settings)
        skip = task.generation.prompt_ids(tokenizer, word).shape[1]
        expected.append(tokenizer.decode(output[0, skip:], skip_special_tokens=True).strip())

    argv = model_args + ["--temperature", "0", "--prompt", "영화", "--max_new_tokens", "8",
                         "--repetition_penalty", "1.2", "--no_repeat_ngram_size", "3",
                         "--guidance", "1"]  # plain greedy decoding, as above
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # --num_samples and --seed change nothing: greedy decoding has a single answer.
        first = run(argv + ["--num_samples", "3", "--seed", "1"], capsys)
        second = run(argv + ["--seed", "2"], capsys)
    assert first == second == (0, "\n".join(expected) + "\n", "")  # one review per polarity
    # Nor does transformers warn (or log) that temperature, top_k or top_p go unused.
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------- values out of range

@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "-0.5"], "--temperature must be from 1e-06 to 1e+06 "
     "(0: greedy decoding), got -0.5"),
    (["--temperature", "nan"], "--temperature must be from 1e-06 to 1e+06 "
     "(0: greedy decoding), got nan"),
    (["--temperature", "inf"], "--temperature must be from 1e-06 to 1e+06 "
     "(0: greedy decoding), got inf"),
    (["--temperature", "1e-30"], "--temperature must be from 1e-06 to 1e+06 "
     "(0: greedy decoding), got 1e-30"),
    (["--top_p", "0"], "--top_p must be above 0 and at most 1 (1: off), got 0.0"),
    (["--top_p", "1.5"], "--top_p must be above 0 and at most 1 (1: off), got 1.5"),
    (["--top_p", "nan"], "--top_p must be above 0 and at most 1 (1: off), got nan"),
    (["--top_k", "-1"], "--top_k must be 0 or more (0: off), got -1"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be from 1e-06 to "
     "1e+06 (1: off; below 1: favours repetition), got 0.0"),
    (["--repetition_penalty", "-1"], "--repetition_penalty must be from 1e-06 to "
     "1e+06 (1: off; below 1: favours repetition), got -1.0"),
    (["--repetition_penalty", "nan"], "--repetition_penalty must be from 1e-06 to "
     "1e+06 (1: off; below 1: favours repetition), got nan"),
    (["--repetition_penalty", "inf"], "--repetition_penalty must be from 1e-06 to "
     "1e+06 (1: off; below 1: favours repetition), got inf"),
    (["--repetition_penalty", "1e-30"], "--repetition_penalty must be from 1e-06 to "
     "1e+06 (1: off; below 1: favours repetition), got 1e-30"),
    (["--guidance", "1e300"], "--guidance must be from 1 to 1e+06 (1: off), got 1e+300"),
    (["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be 0 or more (0: off), "
                                       "got -1"),
    (["--num_samples", "0"], "--num_samples must be 1 or more, got 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be 1 or more, got 0"),
    (["--seed", str(2**64)], f"--seed must be from -2**63 to 2**64 - 1 (64 bits), got {2**64}"),
    (["--seed", str(-2**63 - 1)], f"--seed must be from -2**63 to 2**64 - 1 (64 bits), "
                                  f"got {-2**63 - 1}"),
])
def test_a_sampling_flag_out_of_range_is_one_line(model_args, capsys, flags, expected):
    assert error_line(model_args + ["--num_samples", "1", "--max_new_tokens", "4", *flags],
                      capsys) == f"error: {expected}"


def test_the_edges_of_each_range_are_allowed(model_args, capsys):
    """The smallest or largest value each flag accepts: the sampling filters off, a penalty
    that favours repetition, the extreme seeds."""
    argv = model_args + ["--polarity", "긍정", "--num_samples", "1", "--max_new_tokens", "4",
                         "--top_p", "1", "--top_k", "0", "--no_repeat_ngram_size", "0",
                         "--repetition_penalty", "0.5"]
    for seed in [str(-2**63), str(2**64 - 1)]:
        status, out, _ = run(argv + ["--seed", seed], capsys)
        assert status == 0 and out.count("\n") == 1


@pytest.mark.slow
def test_a_real_run_prints_the_one_line_and_exits_with_1(tiny_model):
    """As a process: exit status 1 and the error as the last line of stderr, no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--downstream_model_dir",
                             str(tiny_model), "--temperature", "nan"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == ("error: --temperature must be from 1e-06 to 1e+06 "
                                              "(0: greedy decoding), got nan")


# --------------------------------------------------------------------------- the model's positions

POSITIONS = 128  # the tiny model's n_positions


def prompt_length(tiny_model, words, prompt=""):
    """Tokens given to the model before the review: the longest polarity word and prompt."""
    tokenizer = load_tokenizer(str(tiny_model))
    return max(task.generation.prompt_ids(tokenizer, word, prompt).shape[1] for word in words)


@pytest.mark.parametrize("flags, words, prompt, n, expected", [
    ([], ["긍정", "부정"], "", 1,
     "error: --max_new_tokens 128 does not fit the model's 128 positions after the 1 token of "
     "the polarity word; use --max_new_tokens 127 or less"),
    (["--polarity", "부정", "--prompt", "배우 연기"], ["부정"], "배우 연기", 3,
     "error: --max_new_tokens 126 does not fit the model's 128 positions after the 3 tokens of "
     "the polarity word and --prompt; use --max_new_tokens 125 or less"),
    (["--polarity", "none", "--prompt", "배우 연기"], [""], "배우 연기", 2,
     "error: --max_new_tokens 127 does not fit the model's 128 positions after the 2 tokens of "
     "--prompt; use --max_new_tokens 126 or less"),
])
@pytest.mark.slow
def test_max_new_tokens_past_the_positions_is_one_line(tiny_model, model_args, capsys, flags,
                                                       words, prompt, n, expected):
    assert prompt_length(tiny_model, words, prompt) == n  # as the fixture's tokenizer splits
    fits = POSITIONS - n
    argv = model_args + ["--num_samples", "1", *flags, "--max_new_tokens"]
    assert error_line(argv + [str(fits + 1)], capsys) == expected
    # The largest value that fits does: prompt and review fill the positions exactly.
    status, out, _ = run(argv + [str(fits)], capsys)
    assert status == 0 and out.count("\n") == len(words)


@pytest.mark.parametrize("flags, repeats, expected", [
    (["--polarity", "긍정"], 200,
     "error: --prompt is 201 tokens with the polarity word, too long for the model's 128 "
     "positions; shorten it by at least 74 tokens to leave room for the review"),
    (["--polarity", "none"], 200,
     "error: --prompt is 200 tokens, too long for the model's 128 positions; shorten it by at "
     "least 73 tokens to leave room for the review"),
    (["--polarity", "none"], 128,  # as many tokens as positions: no room for a review
     "error: --prompt is 128 tokens, too long for the model's 128 positions; shorten it by at "
     "least 1 token to leave room for the review"),
])
def test_a_prompt_past_the_positions_is_one_line(model_args, capsys, flags, repeats, expected):
    prompt = " ".join(["영화"] * repeats)  # one token each
    argv = model_args + [*flags, "--prompt", prompt, "--max_new_tokens", "1"]
    assert error_line(argv, capsys) == expected

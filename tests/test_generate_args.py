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

import generate
import polarity
from conftest import ROOT
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
        input_ids = polarity.prompt_ids(tokenizer, word, "영화")
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **settings)
        skip = polarity.prompt_ids(tokenizer, word).shape[1]
        expected.append(tokenizer.decode(output[0, skip:], skip_special_tokens=True).strip())

    argv = model_args + ["--temperature", "0", "--prompt", "영화", "--max_new_tokens", "8",
                         "--repetition_penalty", "1.2", "--no_repeat_ngram_size", "3"]
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

"""generate.py answering prompts, for a model trained on prompt/response pairs: each prompt
given to the model as training tokenized it, only the response printed; --prompts_file
answered in JSON Lines, in batches that change nothing under greedy decoding; bad prompts
files and prompts too long refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import data
import generate
import task.generation
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer

PROMPTS = ["영화 어때", "배우 연기 정말 최고 스토리", " 감독 ", "별로", "그 영화 진짜 지루 했다"]


@pytest.fixture
def pair_model(tiny_model, tmp_path):
    """The tiny model as train.py leaves one trained on prompt/response pairs."""
    model = tmp_path / "pairs"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(
        json.dumps({**config, "polarity_words": [], "prompt_response": True}), encoding="utf-8")
    return model


def write_prompts(path, lines):
    """A prompts file: each of `lines` a JSON object's prompt, or (a str starting with `{` or
    blank) the line itself."""
    text = "".join((line if line.strip() == "" or line.startswith("{")
                    else json.dumps({"prompt": line}, ensure_ascii=False)) + "\n"
                   for line in lines)
    Path(path).write_text(text, encoding="utf-8")
    return str(path)


def run(argv, capsys):
    status = generate.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def greedy_response(model, tokenizer, prompt, max_new_tokens):
    """The response to `prompt` alone, no padding: greedy decoding of its training tokens."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=False, max_new_tokens=max_new_tokens,
                                repetition_penalty=1.2, no_repeat_ngram_size=3,  # the defaults
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


GREEDY = ["--temperature", "0", "--max_new_tokens", "6", "--device", "cpu"]


# --------------------------------------------------------------------------- the record

def test_train_py_records_that_a_model_answers_prompts(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    recorded = {}
    for name, corpus in [("pairs", corpus_read.Pairs(["영화 어때"], ["최고"])),
                         ("texts", corpus_read.Pairs(["", ""], ["최고", "별로"])),
                         ("nsmc", corpus_read.Reviews(["최고"], [1]))]:
        config = type("Config", (), {})()
        data.record_polarity_words(config, corpus_features.encode(corpus, tokenizer, 16))
        recorded[name] = config.prompt_response
    assert recorded == {"pairs": True, "texts": False, "nsmc": False}


def test_a_prompt_is_given_as_training_tokenized_it(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [" 영화 어때 ", "배우 연기"]  # spaces and all: training does not strip them
    features = corpus_features.encode(corpus_read.Pairs(prompts, ["최고", "별로"]), tokenizer, 32)
    given = task.generation.response_prompt_ids(tokenizer, prompts)
    for row, ids in enumerate(given):
        assert features.trained_from[row] == len(ids)
        assert features.input_ids[row, :len(ids)].tolist() == ids


# --------------------------------------------------------------------------- answers

def test_prompts_file_is_answered_in_json_lines_as_each_prompt_alone(pair_model, tmp_path,
                                                                     capsys):
    tokenizer = load_tokenizer(str(pair_model))
    model = load_model(str(pair_model), tokenizer).eval()
    expected = [greedy_response(model, tokenizer, prompt, 6) for prompt in PROMPTS]
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", [PROMPTS[0], "", *PROMPTS[1:]])
    argv = ["--downstream_model_dir", str(pair_model), "--prompts_file", prompts_file, *GREEDY]
    outputs = []
    for batch_size in ["2", "1", "5"]:  # left padding changes no response
        status, out, err = run(argv + ["--batch_size", batch_size], capsys)
        assert status == 0 and err == ""
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]
    lines = [json.loads(line) for line in outputs[0].splitlines()]
    assert lines == [{"prompt": p, "response": r} for p, r in zip(PROMPTS, expected)]
    assert all(expected)  # each prompt has new tokens written after it


def test_a_prompt_is_answered_not_continued(pair_model, tiny_model, capsys):
    tokenizer = load_tokenizer(str(pair_model))
    model = load_model(str(pair_model), tokenizer).eval()
    argv = ["--polarity", "none", "--prompt", PROMPTS[1], *GREEDY]
    status, out, _ = run(["--downstream_model_dir", str(pair_model), *argv], capsys)
    assert (status, out) == (0, greedy_response(model, tokenizer, PROMPTS[1], 6) + "\n")
    # Before: the same model (not said to answer prompts) continues, the prompt in front.
    status, out, _ = run(["--downstream_model_dir", str(tiny_model), *argv, "--guidance", "1"],
                         capsys)
    assert status == 0 and out.startswith("배우 연기 정말 최고 스토리 ")


def test_sampled_responses_follow_the_seed(pair_model, tmp_path, capsys):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    argv = ["--downstream_model_dir", str(pair_model), "--prompts_file", prompts_file,
            "--max_new_tokens", "6", "--device", "cpu"]
    first, again, other = (run(argv + ["--seed", seed], capsys) for seed in ["1", "1", "2"])
    assert first == again and first[0] == 0 and other != first
    assert len(first[1].splitlines()) == len(PROMPTS)


# --------------------------------------------------------------------------- refusals

EXAMPLE = 'such as {{"prompt": "..."}}'
FILE_TO_FIX = [
    ([], f"{{f}}: the file is empty; expected one JSON object a line, {EXAMPLE}"),
    (["", "  "],
     f"{{f}}: no prompts, only blank lines; expected one JSON object a line, {EXAMPLE}"),
    (["영화", "{not json"],
     f"{{f}}:2: not JSON (Expecting property name enclosed in double quotes at column 2); "
     f"write one object a line, {EXAMPLE}"),
    (['{"text": "영화"}'], f'{{f}}:1: no "prompt" key; write one object a line, {EXAMPLE}'),
    (['{"prompt": 3}'], '{f}:1: "prompt" must be a string, found a number'),
    (["영화", '{"prompt": " "}'],
     "{f}:2: the prompt is blank; give the text to answer, or delete the line"),
]


@pytest.mark.parametrize("lines, message", FILE_TO_FIX)
def test_a_bad_prompts_file_is_one_line(pair_model, tmp_path, capsys, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("")
    prompts_file = write_prompts(path, lines) if lines else str(path)
    status, out, err = run(["--downstream_model_dir", str(pair_model), "--prompts_file",
                            prompts_file, *GREEDY], capsys)
    assert (status, out) == (1, "")
    assert err == f"error: {message.format(f=prompts_file)}\n"


def test_a_prompt_too_long_for_the_positions_is_named(pair_model, tmp_path, capsys):
    tokenizer = load_tokenizer(str(pair_model))
    longest = " ".join(["정말"] * 120)
    size = len(task.generation.response_prompt_ids(tokenizer, [longest])[0])
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", ["영화", longest, "별로"])
    argv = ["--downstream_model_dir", str(pair_model), "--prompts_file", prompts_file,
            "--device", "cpu"]
    assert run(argv + ["--max_new_tokens", "128"], capsys) == (
        1, "", f"error: --max_new_tokens 128 does not fit the model's 128 positions after the "
        f"{size} tokens of the longest prompt, {prompts_file}:2; use --max_new_tokens "
        f"{128 - size} or less\n")
    write_prompts(prompts_file, ["영화", " ".join(["정말"] * 200)])
    status, _, err = run(argv, capsys)
    assert status == 1 and err.startswith(f"error: {prompts_file}:2: the prompt is ")
    assert err.count("\n") == 1 and "too long for the model's 128 positions" in err


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "영화"], "leave --prompt out"),
    (["--polarity", "긍정"], "leave --polarity 긍정 out"),
])
def test_prompts_file_flags_that_cannot_go_with_it(pair_model, tmp_path, capsys, flags, message):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    assert run(["--downstream_model_dir", str(pair_model), "--prompts_file", prompts_file,
                *flags], capsys) == (1, "", f"error: --prompts_file writes a response to each "
                                            f"of its prompts, without polarity words; {message}\n")


def test_a_model_not_trained_on_pairs_answers_no_prompts_file(tiny_model, tmp_path, capsys):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    status, out, err = run(["--downstream_model_dir", str(tiny_model), "--prompts_file",
                            prompts_file, "--device", "cpu"], capsys)
    assert (status, out) == (1, "")
    assert err == (
        f"error: --prompts_file: --downstream_model_dir {tiny_model} was not trained on "
        f"prompt/response pairs (train.py writes prompt_response: true into config.json for a "
        f".jsonl corpus of them); use --prompt to continue a text\n")


# --------------------------------------------------------------------------- --evaluate

PAIRS = [("영화 어때", "정말 최고"), ("배우 연기", "별로 지루"), ("그 영화", "감독 최고 배우"),
         ("스토리", "지루 했다")]


def write_pairs(path, pairs):
    lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=False) for p, r in pairs]
    Path(path).write_text("\n".join(lines + ['{"text": "prompt 없는 글"}']) + "\n",
                          encoding="utf-8")
    return str(path)


def test_evaluate_reports_the_loss_on_the_responses_and_the_exact_share(
        pair_model, tmp_path, capsys):
    val = write_pairs(tmp_path / "val.jsonl", PAIRS)
    status, out, err = run(["--downstream_model_dir", str(pair_model), "--evaluate",
                            "--val_file", val, "--max_seq_length", "32", "--batch_size", "3",
                            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"], capsys)
    assert status == 0, err
    tokenizer = load_tokenizer(str(pair_model))
    model = load_model(str(pair_model), tokenizer).eval()
    features = corpus_features.encode(corpus_read.read_corpus(val), tokenizer, 32)
    loss, count, same = 0.0, 0, 0
    for ids, length, start in zip(features.input_ids, features.lengths, features.trained_from):
        ids = ids[:length].long()
        with torch.no_grad():  # each example alone: the targets are the response and </s>
            logits = model(ids[None]).logits[0]
        first = max(int(start), 1)
        loss += torch.nn.functional.cross_entropy(logits[first - 1:-1], ids[first:],
                                                  reduction="sum").item()
        count += length.item() - first
        if start > 0:  # a pair: does plain greedy decoding write its response, then </s>?
            prompt = ids[None, :start]
            written = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     do_sample=False, max_new_tokens=int(length - start),
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)[0, start:]
            same += tokenizer.decode(written, skip_special_tokens=True).strip() == \
                tokenizer.decode(ids[start:-1], skip_special_tokens=True).strip()
    lines = out.splitlines()
    assert lines[0].startswith(f"val_loss {loss / count:.4f} ")
    assert "on the responses of 5 examples" in lines[0]
    assert lines[1].startswith(f"exact responses: {same / len(PAIRS):.4f} of {len(PAIRS)} prompts")


def test_the_exact_share_counts_responses_written_word_for_word(tiny_model, monkeypatch):
    tokenizer = load_tokenizer(str(tiny_model))
    features = corpus_features.encode(corpus_read.Pairs(*map(list, zip(*PAIRS))), tokenizer, 32)
    asked = []

    def two_right_two_wrong(model, tokenizer, prompts_ids, settings, seed=0):
        assert settings["temperature"] == 0  # greedy decoding
        asked.extend(prompts_ids)
        return [response if i < 2 else response + " 더" for i, (_, response) in enumerate(PAIRS)]
    monkeypatch.setattr(task.generation, "write_responses", two_right_two_wrong)
    share, count = task.generation.reproduced_share(None, tokenizer, features, range(4), 4)
    assert (share, count) == (0.5, 4)
    # each from its prompt as training tokenized it
    assert asked == [features.input_ids[i, :features.trained_from[i]].tolist() for i in range(4)]


def test_evaluate_needs_the_pairs_to_score(pair_model, capsys):
    status, _, err = run(["--downstream_model_dir", str(pair_model), "--evaluate",
                          "--device", "cpu"], capsys)
    assert status == 1
    assert err.strip() == ("error: --evaluate: give --val_file, a .jsonl file of prompts and "
                           "responses")

"""Prompt/response corpora (JSON Lines): read strictly, the prompt's tokens untrained (label
-100) in padded and packed batches and in the validation loss, cut to fit from the prompt's
start, cached; and NSMC as one instance of them, with the very tokens and loss it had."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, run_train

import data
import generate
import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer
from runtime.backends import Backend
from runtime.errors import InputError
from task.nsmc import NsmcTask, TaskConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def write_jsonl(path, objects):
    """One JSON object a line (a str is written as the line itself)."""
    lines = [o if isinstance(o, str) else json.dumps(o, ensure_ascii=False) for o in objects]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return Path(path)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def words(n):
    """A text of `n` tokens: each 정말 is one token of the tiny tokenizer."""
    return " ".join(["정말"] * n)


PAIRS = [("영화 어때", "정말 최고 영화"), ("배우 연기는", "너무 별로"), ("스토리", "감동 명작 추천"),
         ("그 감독", "진짜 지루")]


def pair_features(tokenizer, pairs=PAIRS, max_seq_length=16):
    prompts, responses = zip(*pairs)
    return corpus_features.encode(corpus_read.Pairs(list(prompts), list(responses)),
                                  tokenizer, max_seq_length)


# --------------------------------------------------------------------------- reading

def test_pairs_and_texts_are_read_from_json_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = ['{"prompt": "영화 어때", "response": "최고 \\"명작\\"", "id": 7}', "",
             '{"text": "그냥 그렇다"}', '{"prompt": "별로", "response": "  "}']
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())  # BOM, CRLF
    pairs = corpus_read.read_corpus(path)
    assert (pairs.prompts, pairs.responses) == (["영화 어때", ""], ['최고 "명작"', "그냥 그렇다"])
    assert pairs.lines == [1, 3] and pairs.blank == 2  # a blank line, a blank response
    assert pairs.labels is None and not pairs.prompt_trained


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n',
     ":2: not JSON (Expecting ',' delimiter at column 16); write one object a line"),
    ('["a", "b"]\n', ":1: expected a JSON object, found an array"),
    ('{"prompt": "a"}\n', ':1: no "response" key; each line needs "prompt" and "response", '
                          'or "text" alone'),
    ('{"response": "a"}\n', ':1: no "prompt" key'),
    ('{"prompt": 1, "response": "b"}\n', ':1: "prompt" must be a string, found a number'),
    ('{"text": null}\n', ':1: "text" must be a string, found null'),
    ('{"text": "a", "prompt": "b"}\n', ':1: both "text" and "prompt"/"response"'),
    ('{"prompt": "\\ud800", "response": "b"}\n', ':1: "prompt" holds a \\u escape that is no '
                                                 'character (a lone surrogate)'),
    ("", ": the file is empty; expected one JSON object a line"),
], ids=["bad-json", "not-an-object", "no-response", "no-prompt", "number", "null",
        "text-and-prompt", "lone-surrogate", "empty"])
def test_malformed_json_lines_are_named(tmp_path, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as error:
        corpus_read.read_corpus(path)
    assert str(error.value).startswith(str(path) + message)


def test_train_py_names_a_malformed_line_in_one_line(train_args, tmp_path, capsys):
    good = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a", "response": "b"}])
    bad = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"},
                                                 {"prompt": "a", "response": 3}])
    argv = train_args + ["--train_file", str(bad), "--val_file", str(good)]
    assert train.main(argv) == 1
    assert capsys.readouterr().err == (f'error: {bad}:2: "response" must be a string, found '
                                       f'a number\n')


# --------------------------------------------------------------------------- features and batches

def test_the_prompt_is_context_and_the_response_and_eos_are_trained(tokenizer):
    features = pair_features(tokenizer)
    for i, (prompt, response) in enumerate(PAIRS):
        row = features.input_ids[i, :features.lengths[i]].tolist()
        assert row == ids(tokenizer, prompt) + ids(tokenizer, response) + [tokenizer.eos_token_id]
        assert features.trained_from[i] == len(ids(tokenizer, prompt))
    for packed in (False, True):
        for fixed_shape in (False, True):
            batch = data.ReviewBatches(features, tokenizer.pad_token_id, fixed_shape, 8,
                                       packed)[[0, 1, 2, 3]]
            for i, (prompt, response) in enumerate(PAIRS):
                trained = ids(tokenizer, response) + [tokenizer.eos_token_id]
                at = (batch["review_ids"] == i if packed
                      else torch.arange(batch["input_ids"].shape[1]) < features.lengths[i])
                labels = batch["labels"][at if packed else i][:int(features.lengths[i])]
                assert labels.tolist() == [-100] * len(ids(tokenizer, prompt)) + trained


def test_a_long_pair_loses_its_prompts_start_first(tokenizer):
    assert len(ids(tokenizer, words(10))) == 10
    prompt = "영화 " + words(9)  # its last tokens are the ones kept
    features = pair_features(tokenizer, [(prompt, "최고 명작 추천")], max_seq_length=8)
    row = features.input_ids[0, :features.lengths[0]].tolist()
    assert row == ids(tokenizer, words(4)) + ids(tokenizer, "최고 명작 추천") + [1]
    assert (features.trained_from.tolist(), features.truncated) == ([4], 1)


def test_a_response_with_no_room_for_its_prompt_is_left_out_and_named(tokenizer, tmp_path):
    lines = [{"prompt": "영화", "response": words(6)},    # 1 + 6 + </s>: fits in 8
             {"prompt": "영화", "response": words(7)},    # no room left for the prompt
             {"text": words(7)},                          # no prompt: fits whole
             {"text": words(9)}]                          # cut at its end, </s> kept
    lines += [{"prompt": "a", "response": words(8 + i)} for i in range(6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    features = corpus_features.load_features(path, tokenizer, 8, tmp_path / "cache")
    assert features.left_out == 7 and features.left_out_lines == [2, 5, 6, 7, 8]
    assert features.lengths.tolist() == [8, 8, 8] and features.trained_from.tolist() == [1, 0, 0]
    assert (features.input_ids[:, -1] == tokenizer.eos_token_id).all()
    assert features.truncated == 1
    assert features.input_ids[2].tolist() == ids(tokenizer, words(7)) + [1]


def test_nothing_that_fits_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "영화", "response": words(9)}])
    with pytest.raises(InputError, match=r"pairs.jsonl: no response fits in --max_seq_length 8"):
        corpus_features.load_features(path, tokenizer, 8, tmp_path / "cache")


def test_the_cache_keeps_what_is_trained(tokenizer, tmp_path, monkeypatch):
    lines = [{"prompt": "영화 어때", "response": "최고"}, {"prompt": "a", "response": words(40)}]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    first = corpus_features.load_features(path, tokenizer, 16, tmp_path / "cache")
    monkeypatch.setattr(corpus_features, "read_corpus", lambda path: pytest.fail("not cached"))
    cached = corpus_features.load_features(path, tokenizer, 16, tmp_path / "cache")
    assert torch.equal(cached.trained_from, first.trained_from)
    assert (cached.left_out, cached.left_out_lines) == (first.left_out, [2])
    # The same bytes in another layout are other features: the suffix is in the key.
    plain = tmp_path / "pairs.txt"
    plain.write_bytes(path.read_bytes())
    assert (corpus_features.cache_path(tmp_path, plain, tokenizer, 16).name.split("-")[-1]
            != corpus_features.cache_path(tmp_path, path, tokenizer, 16).name.split("-")[-1])


# --------------------------------------------------------------------------- the loss

def full_logits_loss_sum(model, input_ids, lengths, labels):
    """The loss from logits at every position of a padded batch, `labels` given whole."""
    mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def response_labels(features):
    """Labels built by hand: each response and </s>, nothing of the prompt nor padding."""
    columns = torch.arange(features.input_ids.shape[1])
    trained = ((columns >= features.trained_from[:, None])
               & (columns < features.lengths[:, None]))
    return features.input_ids.long().masked_fill(~trained, -100)


def test_packed_pairs_train_what_padded_pairs_train(tiny_model, tokenizer):
    features = pair_features(tokenizer)
    model = load_model(str(tiny_model), tokenizer).eval()  # no dropout: one function
    reference = copy.deepcopy(model)
    expected = full_logits_loss_sum(reference, features.input_ids.long(), features.lengths,
                                    response_labels(features))
    expected.backward()
    targets = int((features.lengths - features.trained_from).sum())  # responses and </s>
    for fixed in (False, True):
        for packed in (False, True):
            batch = data.ReviewBatches(features, tokenizer.pad_token_id, fixed, 8,
                                       packed)[[0, 1, 2, 3]]
            assert int(train.count_targets(batch)) == targets
            model.zero_grad()
            loss = train.token_loss_sum(model, batch)
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
            loss.backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_prompt_tokens_add_nothing_to_the_gradient(tiny_model, tokenizer):
    # Logits everywhere (XLA's fixed shapes): the loss's gradient is exactly 0 at each
    # position that predicts a prompt token, and not at one that predicts a response token
    # or </s>. Cut batches have no logits before a prompt token at all.
    features = pair_features(tokenizer)
    model = load_model(str(tiny_model), tokenizer).eval()
    logits = []
    model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out) or
                                        out.retain_grad())
    for packed in (False, True):
        batch = data.ReviewBatches(features, tokenizer.pad_token_id, True, 8, packed)[[0, 1, 2, 3]]
        train.token_loss_sum(model, batch).backward()
        grad = logits.pop().grad.abs().sum(-1)  # [rows, columns]
        untrained = (batch["labels"] == -100) & (batch["input_ids"] != tokenizer.pad_token_id)
        before_prompt = F.pad(untrained[:, 1:], (0, 1), value=False)
        before_trained = F.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)
        prompt_tokens = int((features.trained_from - 1).sum())  # a row's first predicts none
        assert int(before_prompt.sum()) >= prompt_tokens > 0
        assert (grad[before_prompt] == 0).all() and (grad[before_trained] > 0).all()
        cut = data.ReviewBatches(features, tokenizer.pad_token_id, False, 8, packed)[[0, 1, 2, 3]]
        targets = F.pad(cut["labels"][:, 1:], (0, 1), value=-100).flatten()
        assert (targets[cut["target_positions"]] != -100).all()
        assert len(cut["target_positions"]) == int((targets != -100).sum())


def test_the_validation_loss_is_over_the_responses_alone(tiny_model, tokenizer):
    features = pair_features(tokenizer)
    model = load_model(str(tiny_model), tokenizer).eval()
    backend = Backend("cpu", "fp32")
    loader = data.make_loader(data.ReviewBatches(features, tokenizer.pad_token_id, False, 3),
                              data.eval_batches(len(features), 3, 1, 0), 0, False)
    task = NsmcTask(TaskConfig(), tokenizer, features, None, None)  # no labels: adds nothing
    result = train.evaluate(model, loader, backend, task)
    model.eval()  # evaluate leaves the model training
    with torch.no_grad():
        args = (model, features.input_ids.long(), features.lengths)
        responses = full_logits_loss_sum(*args, response_labels(features))
        everything = full_logits_loss_sum(*args, response_labels(
            corpus_features.Features(features.input_ids, features.lengths, None,
                                     torch.zeros_like(features.trained_from))))
    n = int((features.lengths - features.trained_from).sum())
    assert result["val_loss"] == pytest.approx(float(responses) / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    everything = float(everything) / int((features.lengths - 1).sum())
    assert result["val_loss"] != pytest.approx(everything, rel=1e-4)  # the prompt's are left out


# --------------------------------------------------------------------------- NSMC, one instance

REVIEWS = corpus_read.Reviews(["정말 최고 영화", " 배우 연기 별로", "스토리  감동", words(40),
                               '"최고의 영화" 라고'], [1, 0, 1, 0, 1])


def old_features(tokenizer, reviews, max_seq_length):
    """NSMC's examples as the code before prompt/response pairs made them: `polarity
    review` tokenized in one piece, cut to leave room for `</s>`, every real token trained."""
    texts = [f"{corpus_features.POLARITY[label]} {text}"
             for text, label in zip(reviews.texts, reviews.labels)]
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True,
                       max_length=max_seq_length - 1)["input_ids"]
    input_ids = torch.full((len(pieces), max_seq_length), tokenizer.pad_token_id)
    for i, piece in enumerate(pieces):
        input_ids[i, :len(piece) + 1] = torch.tensor(piece + [tokenizer.eos_token_id])
    lengths = torch.tensor([len(piece) + 1 for piece in pieces])
    real = torch.arange(max_seq_length) < lengths[:, None]
    return input_ids, lengths, input_ids.masked_fill(~real, -100)


@pytest.mark.parametrize("polarity", [None, {1: "명작감동", 0: "졸작지루"}],
                         ids=["words-of-one-token", "words-of-three-tokens"])
def test_nsmc_reviews_keep_their_tokens_and_their_loss(tiny_model, tokenizer, monkeypatch,
                                                       polarity):
    for label, word in (polarity or {}).items():
        monkeypatch.setitem(corpus_features.POLARITY, label, word)
    word_length = len(ids(tokenizer, corpus_features.POLARITY[1]))
    assert word_length == (3 if polarity else 1)
    input_ids, lengths, labels = old_features(tokenizer, REVIEWS, 16)
    features = corpus_features.encode(REVIEWS, tokenizer, 16)
    assert torch.equal(features.input_ids.long(), input_ids)
    assert torch.equal(features.lengths.long(), lengths)
    assert features.trained_from.tolist() == [0] * 5  # the polarity word is trained
    assert features.truncated == 1 and features.labels.tolist() == REVIEWS.labels

    model = load_model(str(tiny_model), tokenizer).eval()
    with torch.no_grad():
        old = full_logits_loss_sum(model, input_ids, lengths, labels)
        for packed in (False, True):
            batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 5,
                                       packed)[list(range(5))]
            if not packed:
                assert torch.equal(batch["labels"], labels[:, :batch["labels"].shape[1]])
            mean = train.token_loss_sum(model, batch) / train.count_targets(batch)
            assert float(mean) == pytest.approx(float(old) / int((lengths - 1).sum()), abs=1e-6)
        # Why the word stays trained: leaving it out would drop its tokens after the first.
        untrained = copy.copy(features)
        untrained.trained_from = torch.full_like(features.trained_from, word_length)
        batch = data.ReviewBatches(untrained, tokenizer.pad_token_id, False, 5)[list(range(5))]
        changed = train.token_loss_sum(model, batch) / train.count_targets(batch)
        gap = abs(float(changed) - float(old) / int((lengths - 1).sum()))
        assert (gap > 1e-3) == bool(polarity)


# --------------------------------------------------------------------------- train.py

@pytest.mark.slow
def test_train_on_prompt_response_pairs(train_args, tmp_path, capsys):
    pairs = [{"prompt": f"영화 {i} 어때", "response": "최고 명작" if i % 2 else "최악 지루"}
             for i in range(64)]
    train_file = write_jsonl(tmp_path / "train.jsonl",
                             pairs + [{"prompt": "영화", "response": words(40)}])
    val_file = write_jsonl(tmp_path / "val.jsonl", pairs[:16])
    i = train_args.index("--downstream_corpus_root_dir")
    argv = train_args[:i] + train_args[i + 2:] + ["--max_steps", "4", "--train_file",
                                                  str(train_file), "--val_file", str(val_file)]
    result = run_train(argv)
    assert result.returncode == 0, result.stderr
    assert "train examples:   64 " in result.stdout
    assert "polarity word:    none (prompt/response pairs: the loss on the responses)" in \
        result.stdout
    assert (f"left out:         1 of {train_file}, their response too long for "
            f"--max_seq_length 32 ({train_file}:65); raise --max_seq_length") in result.stdout
    evaluation = read_metrics(tmp_path / "out", "eval")[-1]
    assert "val_loss" in evaluation and "polarity_accuracy" not in evaluation
    # Recorded with the model: generate.py answers its prompts (tests/test_respond.py).
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["prompt_response"] is True and config["polarity_words"] == []
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "영화 3 어때"}])
    assert generate.main(["--downstream_model_dir", str(tmp_path / "out"), "--prompts_file",
                          str(prompts), "--max_new_tokens", "4", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "영화 3 어때"

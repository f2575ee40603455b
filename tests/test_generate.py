"""Using the fine-tuned model: reviews written on request, polarity accuracy (the model
read as a classifier), and both at each evaluation of train.py."""
import json
import re
import shutil
from types import SimpleNamespace

import fixtures
import pytest
import torch
from conftest import read_metrics, run_train

import data
import generate
import task
import task.generation
import task.polarity
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer

SETTINGS = {**task.SAMPLING, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """train.py run for real on the fixture corpus, whose two polarities use disjoint words:
    a case where the model must learn to tell them apart."""
    root = fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("trained")
    args = ["--pretrained_model_name", str(tiny_model), "--downstream_corpus_root_dir", str(root),
            "--downstream_model_dir", str(out), "--cache_dir", str(out / "cache"),
            "--batch_size", "16", "--learning_rate", "1e-3", "--log_every", "8",
            "--device", "cpu", "--epochs", "5", "--eval_every", "16"]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(out=out, root=root, stdout=result.stdout)


@pytest.fixture
def untrained(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    return load_model(str(tiny_model), tokenizer).eval(), tokenizer


def review_features(tokenizer, texts, label):
    return corpus_features.encode(
        corpus_read.Reviews(texts, None if label is None else [label] * len(texts)),
        tokenizer,
        max_seq_length=32,
    )


# --------------------------------------------------------------------------- writing reviews

def test_a_review_starts_as_in_training(untrained):
    _, tokenizer = untrained
    row = review_features(tokenizer, ["영화 최고 감동"], 1).input_ids[0].tolist()
    word = task.generation.prompt_ids(tokenizer, "긍정")[0].tolist()
    review = task.generation.prompt_ids(tokenizer, "", "영화 최고 감동")[0].tolist()
    # Training's row is the polarity word alone, then the review, then </s>: no token for
    # the space between them, and no special token in front.
    assert row[:len(word) + len(review) + 1] == word + review + [tokenizer.eos_token_id]
    with_prompt = task.generation.prompt_ids(tokenizer, "긍정", "영화 최고")[0].tolist()
    assert row[:len(with_prompt)] == with_prompt


def test_the_same_seed_writes_the_same_reviews_and_leaves_the_rng_alone(untrained):
    model, tokenizer = untrained
    state = torch.get_rng_state()
    first = task.generation.write_reviews(model, tokenizer, "긍정", SETTINGS, num_samples=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 3
    for seed, same in [(1, True), (2, False)]:
        again = task.generation.write_reviews(
            model, tokenizer, "긍정", SETTINGS, num_samples=3, seed=seed
        )
        assert (again == first) == same


# --------------------------------------------------------------------------- polarity accuracy

def test_stripping_the_polarity_word_leaves_the_bare_review(untrained):
    _, tokenizer = untrained
    texts = ["영화 최고 감동", "정말 별로", "이 배우 연기 너무 좋았다"]
    bare = review_features(tokenizer, texts, None)
    for label in corpus_features.POLARITY:
        stripped = task.polarity.strip_polarity(review_features(tokenizer, texts, label), tokenizer)
        # As much narrower as the polarity word: with the word back in front, as wide again.
        word = task.generation.prompt_ids(tokenizer, corpus_features.POLARITY[label]).shape[1]
        assert stripped.input_ids.shape[1] == bare.input_ids.shape[1] - word
        assert torch.equal(stripped.input_ids, bare.input_ids[:, :-word])
        assert (bare.input_ids[:, -word:] == tokenizer.pad_token_id).all()
        assert torch.equal(stripped.lengths, bare.lengths)


@pytest.mark.parametrize("fixed_shape", [True, False])
def test_review_log_prob_scores_the_review_and_not_the_prefix(untrained, fixed_shape):
    model, tokenizer = untrained
    texts = ["영화 최고 감동", "정말 별로", "이 배우 연기 너무 좋았다"]
    features = review_features(tokenizer, texts, 1)
    dataset = task.polarity.PolarityBatches(features, tokenizer, None, fixed_shape, batch_size=4)
    batch = dataset[[0, 1, 2]]
    prefix = task.generation.prompt_ids(tokenizer, "부정")
    with torch.no_grad():
        batched = task.polarity.review_log_prob(model, prefix, batch)
        for row, text in enumerate(texts):
            # One review alone, no padding: the sum of log p(token | everything before it)
            # over the review's tokens and </s>.
            review = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prefix[0].tolist() + review + [tokenizer.eos_token_id]])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
            start = prefix.shape[1]
            expected = sum(log_probs[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
            assert batched[row].item() == pytest.approx(expected.item(), abs=1e-4)
    if fixed_shape:
        assert batched[3].item() == 0.0  # the padding row of the fixed shape


def test_fixed_shapes_count_every_review_once(untrained):
    model, tokenizer = untrained
    features = corpus_features.encode(
        corpus_read.Reviews(*zip(*fixtures.make_reviews(12))), tokenizer, 32
    )
    counts = []
    for fixed_shape in (False, True):
        dataset = task.polarity.PolarityBatches(features, tokenizer, 11, fixed_shape, batch_size=4)
        batches = [dataset[indices] for indices in data.eval_batches(len(dataset), 4, 1, 0)]
        counts.append([int(n) for n in task.polarity.polarity_counts(model, tokenizer, batches)])
    assert counts[0] == counts[1]
    assert counts[0][1] == 11


def accuracy_printed(capsys, argv):
    assert generate.main(argv + ["--control_samples", "0"]) == 0  # tests/test_control.py
    out = capsys.readouterr().out
    return float(re.fullmatch(r"polarity accuracy: ([\d.]+) on 64 reviews of .*\n", out).group(1))


@pytest.mark.slow
def test_a_trained_model_tells_the_polarities_apart(trained, capsys):
    argv = ["--evaluate", "--downstream_corpus_root_dir", str(trained.root),
            "--cache_dir", str(trained.out / "cache")]
    assert accuracy_printed(capsys, argv + ["--downstream_model_dir", str(trained.out)]) >= 0.9


def test_an_untrained_model_scores_about_half(tiny_model, corpus, tmp_path, capsys):
    (corpus / "nsmc" / "ratings_train.txt").unlink()  # --evaluate reads the test file alone
    argv = ["--evaluate", "--downstream_corpus_root_dir", str(corpus),
            "--cache_dir", str(tmp_path / "cache"), "--downstream_model_dir", str(tiny_model)]
    assert 0.3 <= accuracy_printed(capsys, argv) <= 0.7


# --------------------------------------------------------------------------- generate.py

@pytest.mark.slow
def test_generate_prints_reviews_of_each_polarity(trained, capsys):
    argv = ["--downstream_model_dir", str(trained.out), "--num_samples", "3"]
    assert generate.main(argv + ["--show_polarity"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["긍정"] * 3 + ["부정"] * 3
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [line.split(" ", 1)[1] for line in lines]
    assert generate.main(argv + ["--polarity", "부정"]) == 0  # the same seed, the same reviews
    assert capsys.readouterr().out.splitlines() == [line.split(" ", 1)[1] for line in lines[3:]]


@pytest.mark.slow  # uses `trained`, a whole train.py run
def test_a_checkpoint_continues_a_prompt(trained, capsys):
    checkpoint = sorted(trained.out.glob("checkpoint-*"))[0]
    argv = ["--downstream_model_dir", str(checkpoint), "--polarity", "긍정", "--prompt", "배우 연기",
            "--num_samples", "2"]
    assert generate.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("배우 연기") for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--polarity", "중립"], "error: --polarity 중립: choose 긍정 (positive), 부정 (negative), "
                           "both, or none"),
    (["--polarity", "none"], "error: --polarity none needs a --prompt"),
    (["--downstream_model_dir", "/no/such/model"],
     "error: --downstream_model_dir /no/such/model: "),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert generate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_run_without_its_best_model_yet_names_its_checkpoints(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    for step in (2, 4):  # what a run killed before its first export leaves
        shutil.copytree(tiny_model, out / f"checkpoint-{step}")
    (out / "checkpoint-6.tmp").mkdir()  # a save cut short is no checkpoint
    assert generate.main(["--downstream_model_dir", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: --downstream_model_dir {out}: no best model in it yet, only its checkpoints "
        f"checkpoint-4, checkpoint-2; give one of them, such as --downstream_model_dir "
        f"{out / 'checkpoint-4'}\n")


@pytest.fixture
def plain_text_model(tiny_model, tmp_path):
    """The tiny model as train.py leaves one trained on plain text: no polarity words."""
    model = tmp_path / "plain"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps({**config, "polarity_words": []}),
                                       encoding="utf-8")
    return model


@pytest.mark.parametrize("argv, refusal", [
    ([], "; use --polarity none with a --prompt"),
    (["--polarity", "긍정"], "; use --polarity none with a --prompt"),
    (["--evaluate"], ": it has no polarity to measure"),
])
def test_polarity_words_for_a_model_trained_on_plain_text_are_refused(plain_text_model, capsys,
                                                                      argv, refusal):
    assert generate.main(["--downstream_model_dir", str(plain_text_model), "--device", "cpu",
                          *argv]) == 1
    assert capsys.readouterr().err == (f"error: --downstream_model_dir {plain_text_model} was "
                                       f"trained on plain text, without polarity words{refusal}\n")
    argv = ["--downstream_model_dir", str(plain_text_model), "--device", "cpu", "--polarity",
            "none", "--prompt", "영화", "--num_samples", "1", "--max_new_tokens", "4"]
    assert generate.main(argv) == 0 and capsys.readouterr().out  # what it can do


# --------------------------------------------------------------------------- while training

@pytest.mark.slow  # uses `trained`, a whole train.py run
def test_each_evaluation_reports_polarity_accuracy_and_samples(trained):
    evaluations = read_metrics(trained.out, "eval")
    assert [e["step"] for e in evaluations] == [0, 16, 32, 48, 64, 80]  # 0: before training
    assert all(0 <= e["polarity_accuracy"] <= 1 for e in evaluations)
    assert evaluations[-1]["polarity_accuracy"] >= 0.9
    assert all(set(e["samples"]) == {"긍정", "부정"} for e in evaluations)
    assert f"polarity_accuracy {evaluations[-1]['polarity_accuracy']:.4f}" in trained.stdout
    assert f"  부정: {evaluations[-1]['samples']['부정']}\n" in trained.stdout


@pytest.mark.slow
def test_evaluating_does_not_change_training(train_args, tmp_path):
    """Samples and polarity accuracy draw nothing from the training RNG: the losses of a
    run that evaluates after every step are those of one that does not, bit for bit."""
    losses = []
    for out, extra in [("quiet", ["--polarity_eval_size", "0"]), ("busy", ["--eval_every", "1"])]:
        result = run_train(train_args + ["--max_steps", "6", "--downstream_model_dir",
                                         str(tmp_path / out), *extra])
        assert result.returncode == 0, result.stderr
        losses.append([e["loss"] for e in read_metrics(tmp_path / out, "train")])
    quiet = read_metrics(tmp_path / "quiet", "eval")  # before training and at the end
    assert [e["step"] for e in quiet] == [0, 6]
    assert "polarity_accuracy" not in quiet[-1] and "samples" in quiet[-1]
    assert "control_accuracy" not in quiet[-1]  # --polarity_eval_size 0 skips it too
    assert len(read_metrics(tmp_path / "busy", "eval")) == 7
    assert losses[0] == losses[1]

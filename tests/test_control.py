"""Polarity control: the independent judge (task/judge.py), classifier-free guidance towards
the requested polarity (task/generation.py:write_reviews), and control accuracy in generate.py
and train.py."""

import fixtures
import pytest
import torch
from conftest import read_metrics, run_train

import data
import generate
import runtime.errors
import task
import task.generation
import task.judge
import train
from corpus import features as corpus_features
from model import load_model, load_tokenizer

SETTINGS = {**task.SAMPLING, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """The fixture corpus: positive and negative reviews drawn from disjoint word lists."""
    root = fixtures.write_corpus(tmp_path_factory.mktemp("corpus"))
    return root / "nsmc" / "ratings_train.txt", root / "nsmc" / "ratings_test.txt"


@pytest.fixture(scope="module")
def fixture_judge(corpus_files, tmp_path_factory):
    return task.judge.load_judge(*corpus_files, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def briefly_trained(tiny_model, corpus_files, tmp_path_factory):
    """The tiny model after 10 steps on the fixture corpus: the polarity word has begun to
    matter, not yet enough to decide every review (seeded, so the same model every time)."""
    tokenizer = load_tokenizer(str(tiny_model))
    features = corpus_features.load_features(
        corpus_files[0], tokenizer, 32, tmp_path_factory.mktemp("c")
    )
    batches = data.ReviewBatches(features, tokenizer.pad_token_id, False, 16)
    torch.manual_seed(0)
    model = load_model(str(tiny_model), tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(10):
        batch = batches[torch.randperm(len(features), generator=order)[:16].tolist()]
        (train.token_loss_sum(model, batch) / train.count_targets(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- the judge

def test_the_judge_reads_polarity_from_disjoint_words(fixture_judge):
    # Unseen reviews of the fixture: each polarity has words of its own.
    assert fixture_judge.val_accuracy >= 0.95
    assert fixture_judge.predict(["최고 감동 명작", "최악 지루 졸작", "영화 정말 추천"]) == [1, 0, 1]


def test_the_judge_is_cached_by_the_files_contents(corpus_files, tmp_path, capsys):
    first = task.judge.load_judge(*corpus_files, tmp_path)
    [cached] = tmp_path.glob("judge-*.pt")
    assert torch.load(cached, weights_only=True)["val_accuracy"] == first.val_accuracy
    again = task.judge.load_judge(*corpus_files, tmp_path)
    assert again.weights == first.weights and list(tmp_path.glob("judge-*.pt")) == [cached]
    cached.write_bytes(b"not a judge")  # damaged: ignored with a warning, trained again
    assert task.judge.load_judge(*corpus_files, tmp_path).weights == first.weights
    assert "warning: ignoring the cache file" in capsys.readouterr().err
    changed = tmp_path / "train.txt"
    changed.write_text(corpus_files[0].read_text(encoding="utf-8").replace("\t1\n", "\t0\n", 5),
                       encoding="utf-8")
    task.judge.load_judge(changed, corpus_files[1], tmp_path)
    assert len(list(tmp_path.glob("judge-*.pt"))) == 2


def test_the_judge_needs_labels(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("영화 최고\n영화 최악\n", encoding="utf-8")
    with pytest.raises(runtime.errors.InputError, match="no labelled reviews"):
        task.judge.load_judge(plain, plain, tmp_path)


def only_positive(path):
    """Rewrite the NSMC file `path` with every review positive."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0]] + [line[:-1] + "1" for line in lines[1:]]) + "\n",
                    encoding="utf-8")


def test_a_refusal_for_the_judges_sake_names_the_flag_that_skips_it(
        train_args, corpus, tiny_model, tmp_path, capsys):
    folder = corpus / "nsmc"
    train_file, val_file = folder / "ratings_train.txt", folder / "ratings_test.txt"
    only_positive(train_file)
    assert train.main(train_args) == 1
    assert capsys.readouterr().err == (
        f"error: {train_file}: every review is positive, and the judge of control accuracy "
        f"learns from both polarities; --polarity_eval_size 0 trains without it (and without "
        f"polarity accuracy)\n")
    assert generate.main(["--downstream_model_dir", str(tiny_model), "--device", "cpu",
                          "--evaluate", "--val_file", str(val_file), "--train_file",
                          str(train_file), "--cache_dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {train_file}: every review is positive, and the judge of control "
                   f"accuracy learns from both polarities; --control_samples 0 measures "
                   f"polarity accuracy alone\n")


# --------------------------------------------------------------------------- guidance

@pytest.mark.slow
def test_guidance_steers_reviews_towards_the_requested_polarity(briefly_trained, fixture_judge):
    model, tokenizer = briefly_trained
    unguided, _ = task.generation.control_accuracy(
        model, tokenizer, fixture_judge, 32, 7, 1, SETTINGS
    )
    guided, _ = task.generation.control_accuracy(
        model, tokenizer, fixture_judge, 32, 7, 3, SETTINGS
    )
    assert guided >= unguided + 0.1, (unguided, guided)


def test_the_same_seed_writes_the_same_guided_reviews(briefly_trained):
    model, tokenizer = briefly_trained
    state = torch.get_rng_state()
    first = task.generation.write_reviews(model, tokenizer, "부정", SETTINGS, "영화", 4, 1, guidance=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert task.generation.write_reviews(model, tokenizer, "부정", SETTINGS, "영화", 4, 1,
                                         guidance=2) == first
    assert task.generation.write_reviews(model, tokenizer, "부정", SETTINGS, "영화", 4, 2,
                                         guidance=2) != first
    assert all(review.startswith("영화") for review in first)


def test_guidance_contrasts_with_the_other_word_and_the_same_prompt(briefly_trained):
    _, tokenizer = briefly_trained
    arguments = task.generation.guidance_arguments(tokenizer, "긍정", "영화", 2, 3, torch.device("cpu"))
    expected = task.generation.prompt_ids(tokenizer, "부정", "영화")
    assert arguments["guidance_scale"] == 2.0
    assert torch.equal(arguments["negative_prompt_ids"], expected.expand(3, -1))
    # Off at 1, and off for a model trained without labels: no other word to contrast with.
    assert task.generation.guidance_arguments(tokenizer, "긍정", "", 1, 3, torch.device("cpu")) == {}
    assert task.generation.guidance_arguments(tokenizer, "", "영화", 2, 3, torch.device("cpu")) == {}


# --------------------------------------------------------------------------- generate.py

@pytest.mark.parametrize("value, extra", [("0.5", []), ("nan", []), ("inf", []), ("-1", []),
                                          ("2", ["--polarity", "none", "--prompt", "영화"])])
def test_bad_guidance_is_one_line_naming_the_flag(value, extra, capsys):
    assert generate.main(["--guidance", value, *extra]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --guidance") and err.count("\n") == 1, err


def test_guidance_defaults_on_with_polarity_words_and_off_without():
    for argv, expected in [([], task.GUIDANCE), (["--polarity", "none"], 1.0),
                           (["--guidance", "1"], 1.0), (["--guidance", "3"], 3.0)]:
        args = generate.parse_args(argv)
        generate.check_guidance(args)
        assert args.guidance == expected


@pytest.mark.slow
def test_generate_evaluate_prints_control_accuracy_and_the_judges_own(
        briefly_trained, corpus_files, tmp_path, capsys):
    model, tokenizer = briefly_trained
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--evaluate", "--downstream_model_dir", str(tmp_path / "model"),
            "--downstream_corpus_root_dir", str(corpus_files[0].parent.parent),
            "--cache_dir", str(tmp_path / "cache"), "--control_samples", "32",
            "--max_new_tokens", "12"]
    printed = []
    for guidance in ("1", "3"):
        assert generate.main(argv + ["--guidance", guidance]) == 0
        printed.append(capsys.readouterr().out.splitlines()[1])
    judge_ = task.judge.load_judge(*corpus_files, tmp_path / "cache")
    for line, guidance in zip(printed, (1, 3)):
        accuracy, _ = task.generation.control_accuracy(
            model, tokenizer, judge_, 32, 7, guidance, SETTINGS
        )
        assert line.startswith(f"control accuracy: {accuracy:.4f} of 64 reviews written with "
                               f"--guidance {guidance}, judged by a character n-gram naive Bayes")
        assert line.endswith(f"({judge_.val_accuracy:.4f} accurate on {corpus_files[1]})")


# --------------------------------------------------------------------------- train.py

@pytest.mark.slow
def test_the_final_evaluation_reports_control_accuracy(train_args, tmp_path):
    result = run_train(train_args + ["--max_steps", "4", "--eval_every", "2"])
    assert result.returncode == 0, result.stderr
    evaluations = read_metrics(tmp_path / "out", "eval")
    assert [e["step"] for e in evaluations] == [0, 2, 4]
    assert ["control_accuracy" in e for e in evaluations] == [False, False, True]
    final = evaluations[-1]
    assert 0 <= final["control_accuracy"] <= 1 and final["judge_accuracy"] >= 0.95
    assert (f"control_accuracy {final['control_accuracy']:.4f} (judge "
            f"{final['judge_accuracy']:.4f} accurate on the validation file)") in result.stdout


@pytest.mark.slow
def test_the_final_evaluation_reports_control_accuracy_on_xla_replicas(train_args, tmp_path):
    result = run_train(train_args[:-2] + ["--max_steps", "2"], replicas=2)
    assert result.returncode == 0, result.stderr
    final = read_metrics(tmp_path / "out", "eval")[-1]
    assert final["step"] == 2 and 0 <= final["control_accuracy"] <= 1


@pytest.mark.slow
def test_the_benchmark_prints_the_guidance_table_and_both_recipes(tiny_model, corpus, tmp_path):
    """benchmarks/polarity_control.py end to end at a tiny size (its figures mean nothing)."""
    result = run_train(["--pretrained_model_name", str(tiny_model),
                        "--downstream_corpus_root_dir", str(corpus), "--work_dir",
                        str(tmp_path / "work"), "--cache_dir", str(tmp_path / "cache"),
                        "--max_steps", "2", "--batch_size", "16", "--val_reviews", "0",
                        "--samples", "4", "--guidance", "1", "2", "--device", "cpu"],
                       script="benchmarks/polarity_control.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith(("| 1 |", "| 2 |"))] == [
        "| 1", "| 2"]
    assert any(line.startswith("| ours | ") for line in lines)
    assert any(line.startswith("| seed's recipe | ") for line in lines)
    # The seed's recipe trained its padding as text: its own log counts every position.
    seed_log = read_metrics(tmp_path / "work" / "seed-recipe", "train")
    ours_log = read_metrics(tmp_path / "work" / "ours", "train")
    assert seed_log[0]["loss"] != ours_log[0]["loss"]

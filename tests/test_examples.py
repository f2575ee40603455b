"""examples/nsmc_classification.py: NSMC written as prompt/response pairs (review and question
in, polarity word out), the answers of generate.py --prompts_file scored against them, and the
whole path of docs/adapting.md at a tiny size."""
import contextlib
import importlib.util
import io
import json

import pytest

import generate
from conftest import ROOT, run_train

spec = importlib.util.spec_from_file_location("nsmc_classification",
                                              ROOT / "examples" / "nsmc_classification.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def lines_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(argv, capsys):
    status = example.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_labelled_reviews_become_a_question_and_its_answer(corpus, tmp_path, capsys):
    test_file = corpus / "nsmc" / "ratings_test.txt"
    out = tmp_path / "test.jsonl"
    status, printed, _ = run(["--corpus", str(test_file), "--out", str(out)], capsys)
    assert status == 0
    rows = [line.split("\t") for line in test_file.read_text(encoding="utf-8").splitlines()[1:]]
    reviews = [(text, {"1": "긍정", "0": "부정"}[label]) for _, text, label in rows if text]
    assert lines_of(out) == [{"prompt": text + example.QUESTION, "response": word}
                             for text, word in reviews]
    assert printed == f"wrote {len(reviews)} pairs to {out}\n"


def test_answers_are_scored_against_the_pairs(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"리뷰 {i}", "response": word},
                                        ensure_ascii=False) + "\n"
                             for i, word in enumerate(["긍정", "부정", "긍정", "부정"])),
                     encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": f"리뷰 {i}", "response": word},
                                          ensure_ascii=False) + "\n"
                               for i, word in enumerate(["긍정", "긍정", " 긍정", "부정 영화"])),
                       encoding="utf-8")
    assert run(["--score", str(answers), "--pairs", str(pairs)], capsys)[1] == "accuracy: 0.5000\n"


def test_an_answer_is_compared_as_the_tokenizer_can_write_it(tiny_model, tmp_path, capsys):
    pairs, answers = tmp_path / "pairs.jsonl", tmp_path / "answers.jsonl"
    pairs.write_text('{"prompt": "리뷰", "response": "꿻정"}\n', encoding="utf-8")  # 꿻: unknown
    answers.write_text('{"prompt": "리뷰", "response": "정"}\n', encoding="utf-8")
    argv = ["--score", str(answers), "--pairs", str(pairs)]
    assert run(argv, capsys)[1] == "accuracy: 0.0000\n"
    assert run(argv + ["--tokenizer", str(tiny_model)], capsys)[1] == "accuracy: 1.0000\n"


@pytest.mark.parametrize("case, message", [
    ("unlabelled", "no labels; give a labelled file"),
    ("unwritable", "could not write it"),
    ("other prompts", "its prompts are not those of --pairs"),
    ("bad answer line", ":2: not JSON"),
    ("no pairs", "--score needs --pairs"),
    ("nothing to do", "give --corpus and --out to write pairs, or --score and --pairs")])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    plain = tmp_path / "plain.txt"
    plain.write_text("그냥 글\n", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "response": "긍정"}\n', encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text({"other prompts": '{"prompt": "b", "response": "긍정"}\n',
                        "bad answer line": '{"prompt": "a", "response": "긍정"}\n{oops\n'}
                       .get(case, '{"prompt": "a", "response": "긍정"}\n'), encoding="utf-8")
    labelled = tmp_path / "labelled.txt"
    labelled.write_text("좋은 영화\t1\n", encoding="utf-8")
    argv = {"unlabelled": ["--corpus", str(plain), "--out", str(tmp_path / "x.jsonl")],
            "unwritable": ["--corpus", str(labelled), "--out", str(plain / "x.jsonl")],
            "no pairs": ["--score", str(answers)], "nothing to do": []}.get(
        case, ["--score", str(answers), "--pairs", str(pairs)])
    status, _, err = run(argv, capsys)
    assert status == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_classification_example_runs_as_docs_show_it(train_args, corpus, tmp_path, capsys):
    """Build the pairs, train on them, answer the test reviews with --prompts_file, score
    the answers: the accuracy is the share of answers that --evaluate finds word for word."""
    built = {}
    for split in ("train", "test"):
        built[split] = tmp_path / f"{split}.jsonl"
        assert example.main(["--corpus", str(corpus / "nsmc" / f"ratings_{split}.txt"),
                             "--out", str(built[split])]) == 0
    i = train_args.index("--downstream_corpus_root_dir")
    result = run_train(train_args[:i] + train_args[i + 2:] + [
        "--train_file", str(built["train"]), "--val_file", str(built["test"]),
        "--max_seq_length", "48", "--max_steps", "6"])
    assert result.returncode == 0, result.stderr
    capsys.readouterr()
    plain_greedy = ["--temperature", "0", "--repetition_penalty", "1", "--no_repeat_ngram_size",
                    "0", "--device", "cpu", "--downstream_model_dir", str(tmp_path / "out")]
    assert generate.main(["--prompts_file", str(built["test"]), "--max_new_tokens", "4",
                          "--batch_size", "16", *plain_greedy]) == 0
    answers = tmp_path / "answers.jsonl"
    answers.write_text(capsys.readouterr().out, encoding="utf-8")
    assert len(lines_of(answers)) == len(lines_of(built["test"]))
    assert generate.main(["--evaluate", "--val_file", str(built["test"]), "--max_seq_length", "48",
                          "--cache_dir", str(tmp_path / "cache"), *plain_greedy]) == 0
    exact = capsys.readouterr().out.splitlines()[1].split()[2]  # "exact responses: 0.5000 of..."
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert example.main(["--score", str(answers), "--pairs", str(built["test"])]) == 0
    assert printed.getvalue() == f"accuracy: {exact}\n"

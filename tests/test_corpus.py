"""Your own corpus: the three layouts read_corpus accepts, its error messages, features
without a polarity word, and train.py on each kind of file."""
import json
from pathlib import Path

import fixtures
import pytest
from conftest import read_metrics, run_train

from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_tokenizer
from runtime.errors import InputError
from train import main as train_main


def write(path, text, encoding="utf-8"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def two_columns(reviews, header=True):
    lines = ["document\tlabel"] if header else []
    return "\n".join(lines + [f"{doc}\t{label}" for doc, label in reviews]) + "\n"


def plain_text(reviews):
    return "\n".join(doc for doc, _ in reviews) + "\n"


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize("text", [
    "id\tdocument\tlabel\n1\t재밌다\t1\n2\t\"별로\" 였다\t0\n",
    "document\tlabel\n재밌다\t1\n\"별로\" 였다\t0\n",
    "\ufeff재밌다\t1\r\n\"별로\" 였다\t0\r\n",   # no header, a BOM, CRLF line endings
], ids=["nsmc", "two-columns", "two-columns-no-header"])
def test_labelled_layouts_read_the_same_reviews(tmp_path, text):
    reviews = corpus_read.read_corpus(write(tmp_path / "corpus.tsv", text))
    assert reviews.texts == ["재밌다", '"별로" 였다']
    assert reviews.labels == [1, 0]


def test_plain_text_is_read_without_labels(tmp_path):
    reviews = corpus_read.read_corpus(write(tmp_path / "corpus.txt", '재밌다\n\n"별로" 였다\n  \n'))
    assert reviews.texts == ["재밌다", '"별로" 였다']
    assert reviews.labels is None
    assert reviews.blank == 2


@pytest.mark.parametrize("text, message", [
    ("id\tdocument\tlabel\n1\t좋다\t1\n2\t좋다\n",
     ":3: expected 3 tab-separated fields (id, document, label), found 2"),
    ("document\tlabel\n좋다\t1\t1\n",
     ":2: expected 2 tab-separated fields (document, label), found 3"),
    ("좋다\t1\n좋다\tpos\n", ":2: label must be 0 or 1, found 'pos'"),
    ("text\tlabel\n좋다\t1\n", ":1: label must be 0 or 1, found 'label'; a header must read "
     "'document<TAB>label'"),
    ("좋다\n별로\n별로\t0\n", ":3: a tab in a plain-text corpus (line 1 has none"),
    ("id\ttext\tlabel\n1\t좋다\t1\n", ":1: expected the header 'id<TAB>document<TAB>label', "
     "found 'id\\ttext\\tlabel'"),
    ("", ": the file is empty"),
], ids=["nsmc-fields", "two-column-fields", "label", "header", "tab-in-plain-text",
        "unknown-header", "empty"])
def test_malformed_files_name_the_file_and_line(tmp_path, text, message):
    path = write(tmp_path / "corpus.tsv", text)
    with pytest.raises(InputError) as error:
        corpus_read.read_corpus(path)
    assert str(error.value).startswith(str(path) + message)


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "corpus.tsv"
    path.write_bytes("document\tlabel\n".encode() + b"\xff\t1\n")
    with pytest.raises(InputError, match=r"corpus.tsv:2: byte 0xff is not UTF-8"):
        corpus_read.read_corpus(path)


# --------------------------------------------------------------------------- features

def test_texts_without_labels_get_no_polarity_word(tmp_path, tokenizer):
    path = write(tmp_path / "corpus.txt", "영화 최고\n정말 별로 연기\n")
    first = corpus_features.load_features(path, tokenizer, 32, tmp_path / "cache")
    cached = corpus_features.load_features(path, tokenizer, 32, tmp_path / "cache")
    for features in (first, cached):
        assert features.labels is None
        row = features.input_ids[0, :features.lengths[0]].tolist()
        assert row == tokenizer("영화 최고", add_special_tokens=False)["input_ids"] + [1]  # </s>


def test_the_cache_key_follows_the_polarity_words(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "corpus.tsv", two_columns([("영화 최고", 1)]))
    before = corpus_features.cache_path(tmp_path, path, tokenizer, 32)
    monkeypatch.setitem(corpus_features.POLARITY, 1, "좋음")
    assert corpus_features.cache_path(tmp_path, path, tokenizer, 32) != before


# --------------------------------------------------------------------------- finding the files

def test_train_and_val_files_go_together(tmp_path):
    train = write(tmp_path / "train.txt", "좋다\n")
    with pytest.raises(InputError, match="--train_file and --val_file go together"):
        corpus_read.corpus_files("~/Korpora", train_file=str(train))
    with pytest.raises(InputError, match=r"--val_file .*missing.txt: no such file"):
        corpus_read.corpus_files("~/Korpora", train_file=str(train),
                                 val_file=str(tmp_path / "missing.txt"))
    both = corpus_read.corpus_files("~/Korpora", train_file=str(train), val_file=str(train))
    assert both == [train, train]


def test_an_absolute_corpus_name_is_the_folder_itself(tmp_path):
    folder = fixtures.write_corpus(tmp_path / "elsewhere") / "nsmc"
    files = corpus_read.corpus_files("~/Korpora", str(folder))
    assert files == [folder / name for name in corpus_read.NSMC_FILES]


# --------------------------------------------------------------------------- training on them

def own_corpus_args(train_args, *corpus):
    """train_args with `corpus` in place of the fixture NSMC folder, for a short run."""
    i = train_args.index("--downstream_corpus_root_dir")
    return train_args[:i] + train_args[i + 2:] + ["--max_steps", "4", *corpus]


@pytest.mark.slow
def test_train_on_a_two_column_corpus_folder(train_args, tmp_path):
    folder = tmp_path / "mine"
    write(folder / "ratings_train.txt", two_columns(fixtures.make_reviews(64, seed=1)))
    write(folder / "ratings_test.txt", two_columns(fixtures.make_reviews(16, seed=2), header=False))
    result = run_train(own_corpus_args(train_args, "--downstream_corpus_name", str(folder)))
    assert result.returncode == 0, result.stderr
    assert "train examples:   64 " in result.stdout
    assert "polarity word:    긍정 or 부정 before each review" in result.stdout
    assert "polarity_accuracy" in read_metrics(tmp_path / "out", "eval")[-1]


@pytest.mark.slow
def test_train_on_plain_text_files_without_polarity(train_args, tmp_path):
    train = write(tmp_path / "train.txt", plain_text(fixtures.make_reviews(64, seed=1)))
    val = write(tmp_path / "val.txt", plain_text(fixtures.make_reviews(16, seed=2)))
    argv = own_corpus_args(train_args, "--train_file", str(train), "--val_file", str(val))
    result = run_train(argv)
    assert result.returncode == 0, result.stderr
    assert "polarity word:    none (no labels: plain language modelling)" in result.stdout
    evaluation = read_metrics(tmp_path / "out", "eval")[-1]
    assert "val_loss" in evaluation
    assert "polarity_accuracy" not in evaluation and "samples" not in evaluation
    # Recorded with the model, so that generate.py can say what the model cannot do.
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["polarity_words"] == [] and config["prompt_response"] is False


def test_train_and_val_files_must_agree_on_labels(train_args, tmp_path, capsys):
    train = write(tmp_path / "train.tsv", two_columns(fixtures.make_reviews(64, seed=1)))
    val = write(tmp_path / "val.txt", plain_text(fixtures.make_reviews(16, seed=2)))
    # In this process: the corpus is refused before any training starts.
    argv = own_corpus_args(train_args, "--train_file", str(train), "--val_file", str(val))
    assert train_main(argv) == 1
    assert capsys.readouterr().err == (f"error: {val} has no labels but {train} has; give both "
                                       f"files labels, or neither\n")

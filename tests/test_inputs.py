"""Inputs that are not what they seem: characters that look like line breaks, paths that
are not files, a damaged or foreign cache, a full disk, model folders that are incomplete,
damaged or not a causal language model. Each is handled, or named in one line."""
import os
from pathlib import Path

import pytest

import data
import train
from data import InputError


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- line breaks

# Characters that str.splitlines() also breaks on. In NSMC they are part of a review.
NOT_LINE_BREAKS = {"line-separator": "\u2028", "paragraph-separator": "\u2029",
                   "next-line": "\x85", "form-feed": "\f", "vertical-tab": "\v",
                   "lone-cr": "\r", "file-separator": "\x1c", "group-separator": "\x1d",
                   "record-separator": "\x1e"}


@pytest.mark.parametrize("char", NOT_LINE_BREAKS.values(), ids=NOT_LINE_BREAKS.keys())
def test_only_newline_ends_a_line(tmp_path, char):
    # With a BOM, CRLF and LF endings, and no newline after the last line.
    text = (f"\ufeffid\tdocument\tlabel\r\n1\t좋다{char}정말\t1\r\n"
            f"2\t싫다\t0\n3\t별로{char}\t0")
    path = write(tmp_path / "corpus.tsv", text)
    reviews = data.read_corpus(path)
    assert reviews.texts == [f"좋다{char}정말", "싫다", f"별로{char}"]
    assert reviews.labels == [1, 0, 0]


@pytest.mark.parametrize("char", NOT_LINE_BREAKS.values(), ids=NOT_LINE_BREAKS.keys())
def test_plain_text_keeps_them_in_the_text(tmp_path, char):
    reviews = data.read_corpus(write(tmp_path / "corpus.txt", f"좋다{char}정말\n별로\n"))
    assert reviews.texts == [f"좋다{char}정말", "별로"]


def test_error_line_numbers_count_newlines_only(tmp_path):
    text = "id\tdocument\tlabel\n1\t좋다\u2028정말\t1\n2\t싫다\x85별로\t0\n3\t별로\n"
    path = write(tmp_path / "corpus.tsv", text)
    with pytest.raises(InputError, match=r"corpus.tsv:4: expected 3 tab-separated fields"):
        data.read_corpus(path)
    # The UTF-8 check counts lines in bytes: it must agree.
    path.write_bytes(text.encode() + b"4\t\xff\t1\n")
    with pytest.raises(InputError, match=r"corpus.tsv:5: byte 0xff is not UTF-8"):
        data.read_corpus(path)


# --------------------------------------------------------------------------- paths that are not files

def make_directory(path):
    path.mkdir(parents=True)
    return "is a directory, not a file"


def make_fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)  # reading it would wait for a writer forever
    return "is not a regular file (a pipe or a device?)"


NOT_FILES = {"directory": make_directory, "fifo": make_fifo}


@pytest.mark.parametrize("make", NOT_FILES.values(), ids=NOT_FILES.keys())
@pytest.mark.parametrize("flag", ["--train_file", "--val_file"])
def test_a_corpus_flag_naming_something_else_than_a_file(tmp_path, make, flag):
    good, odd = write(tmp_path / "good.txt", "좋다\n"), tmp_path / "odd"
    problem = make(odd)
    given = {"--train_file": good, "--val_file": good, flag: odd}
    with pytest.raises(InputError) as error:
        data.corpus_files("~/Korpora", train_file=str(given["--train_file"]),
                          val_file=str(given["--val_file"]))
    assert str(error.value).startswith(f"{flag} {odd}: {problem}")


@pytest.mark.parametrize("make", NOT_FILES.values(), ids=NOT_FILES.keys())
def test_an_nsmc_file_that_is_not_a_file_is_not_downloaded(corpus, make, monkeypatch):
    path = corpus / "nsmc" / "ratings_train.txt"
    path.unlink()
    problem = make(path)
    monkeypatch.setattr(data, "download_nsmc", lambda *a: pytest.fail("tried to download"))
    with pytest.raises(InputError) as error:
        data.corpus_files(corpus)
    assert str(error.value).startswith(f"{path} {problem}; ")


def test_an_nsmc_file_that_is_a_directory_stops_train_py(train_args, corpus, capsys,
                                                         monkeypatch):
    path = corpus / "nsmc" / "ratings_test.txt"
    path.unlink()
    path.mkdir()
    monkeypatch.setattr(data, "download_nsmc", lambda *a: pytest.fail("tried to download"))
    assert train.main(train_args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path} is a directory, not a file; put NSMC's ratings_test.txt in its place, "
        f"or remove it to download NSMC")

"""Inputs that are not what they seem: characters that look like line breaks, paths that
are not files, a damaged or foreign cache, a full disk, model folders that are incomplete,
damaged or not a causal language model. Each is handled, or named in one line."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_train

import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import check_loadable, load_model, load_tokenizer
from runtime.errors import InputError


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
    reviews = corpus_read.read_corpus(path)
    assert reviews.texts == [f"좋다{char}정말", "싫다", f"별로{char}"]
    assert reviews.labels == [1, 0, 0]


@pytest.mark.parametrize("char", NOT_LINE_BREAKS.values(), ids=NOT_LINE_BREAKS.keys())
def test_plain_text_keeps_them_in_the_text(tmp_path, char):
    reviews = corpus_read.read_corpus(write(tmp_path / "corpus.txt", f"좋다{char}정말\n별로\n"))
    assert reviews.texts == [f"좋다{char}정말", "별로"]


def test_error_line_numbers_count_newlines_only(tmp_path):
    text = "id\tdocument\tlabel\n1\t좋다\u2028정말\t1\n2\t싫다\x85별로\t0\n3\t별로\n"
    path = write(tmp_path / "corpus.tsv", text)
    with pytest.raises(InputError, match=r"corpus.tsv:4: expected 3 tab-separated fields"):
        corpus_read.read_corpus(path)
    # The UTF-8 check counts lines in bytes: it must agree.
    path.write_bytes(text.encode() + b"4\t\xff\t1\n")
    with pytest.raises(InputError, match=r"corpus.tsv:5: byte 0xff is not UTF-8"):
        corpus_read.read_corpus(path)


# --------------------------------------------------------------------------- not files

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
        corpus_read.corpus_files("~/Korpora", train_file=str(given["--train_file"]),
                                 val_file=str(given["--val_file"]))
    assert str(error.value).startswith(f"{flag} {odd}: {problem}")


@pytest.mark.parametrize("make", NOT_FILES.values(), ids=NOT_FILES.keys())
def test_an_nsmc_file_that_is_not_a_file_is_not_downloaded(corpus, make, monkeypatch):
    path = corpus / "nsmc" / "ratings_train.txt"
    path.unlink()
    problem = make(path)
    monkeypatch.setattr(corpus_read, "download_nsmc", lambda *a: pytest.fail("tried to download"))
    with pytest.raises(InputError) as error:
        corpus_read.corpus_files(corpus)
    assert str(error.value).startswith(f"{path} {problem}; ")


def test_an_nsmc_file_that_is_a_directory_stops_train_py(train_args, corpus, capsys,
                                                         monkeypatch):
    path = corpus / "nsmc" / "ratings_test.txt"
    path.unlink()
    path.mkdir()
    monkeypatch.setattr(corpus_read, "download_nsmc", lambda *a: pytest.fail("tried to download"))
    assert train.main(train_args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path} is a directory, not a file; put NSMC's ratings_test.txt in its place, "
        f"or remove it to download NSMC")


# --------------------------------------------------------------------------- the cache

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture
def cached(tmp_path, tokenizer):
    """A corpus file, its cache file and the features in it."""
    corpus_file = write(tmp_path / "corpus.tsv", "좋다\t1\n정말 별로\t0\n최고 영화\t1\n")
    features = corpus_features.load_features(corpus_file, tokenizer, 16, tmp_path / "cache")
    return (
        corpus_file,
        corpus_features.cache_path(tmp_path / "cache", corpus_file, tokenizer, 16),
        features,
    )


def same_features(a, b):
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.lengths, b.lengths)
            and torch.equal(a.labels, b.labels)
            and (a.blank, a.truncated) == (b.blank, b.truncated))


def saved(features, **changes):
    """The dictionary the cache holds for `features`, with `changes`."""
    return {**vars(features), **changes}


# Ways a cache file can hold something else than what this script wrote: a copy cut short,
# a disk error, another program's file at the same name, a tensor corrupted in place.
DAMAGED_FILES = {
    "truncated": lambda raw: raw[:len(raw) // 2],
    "empty": lambda raw: b"",
    "garbage": lambda raw: b"not a torch file\n" * 10,
}
FOREIGN_CONTENTS = {
    "other-dict": lambda f: {"x": 1},
    "a-list": lambda f: [1, 2, 3],
    "a-tensor": lambda f: f.input_ids,
    "missing-key": lambda f: {k: v for k, v in vars(f).items() if k != "lengths"},
    "extra-key": lambda f: saved(f, extra=1),
    "float-ids": lambda f: saved(f, input_ids=f.input_ids.float()),
    "other-width": lambda f: saved(f, input_ids=f.input_ids[:, :8]),
    "one-dimensional-ids": lambda f: saved(f, input_ids=f.input_ids.flatten()),
    "lengths-of-other-rows": lambda f: saved(f, lengths=f.lengths[:2]),
    "int64-lengths": lambda f: saved(f, lengths=f.lengths.long()),
    "zero-length": lambda f: saved(f, lengths=f.lengths * 0),
    "longer-than-a-row": lambda f: saved(f, lengths=f.lengths + 16),
    "end-not-at-length": lambda f: saved(f, lengths=f.lengths - 1),
    "id-beyond-vocabulary": lambda f: saved(f, input_ids=f.input_ids + 100_000),
    "negative-id": lambda f: saved(f, input_ids=f.input_ids - 100),
    "labels-of-other-rows": lambda f: saved(f, labels=f.labels[:1]),
    "label-2": lambda f: saved(f, labels=f.labels + 2),
    "labels-as-list": lambda f: saved(f, labels=f.labels.tolist()),
    "blank-as-text": lambda f: saved(f, blank="0"),
    "version-2-layout": lambda f: {k: v for k, v in vars(f).items()
                                   if k not in ("trained_from", "left_out", "left_out_lines")},
    "int64-trained-from": lambda f: saved(f, trained_from=f.trained_from.long()),
    "eos-untrained": lambda f: saved(f, trained_from=f.lengths),
    "negative-trained-from": lambda f: saved(f, trained_from=f.trained_from - 1),
    "left-out-lines-as-text": lambda f: saved(f, left_out_lines="2, 5"),
    "no-rows": lambda f: saved(f, input_ids=f.input_ids[:0], lengths=f.lengths[:0],
                               labels=f.labels[:0]),
}


def damage_with_bytes(damage):
    def apply(path, features):
        path.write_bytes(damage(path.read_bytes()))
    return apply


def damage_with_content(make):
    def apply(path, features):
        torch.save(make(features), path)
    return apply


DAMAGE = {**{name: damage_with_bytes(d) for name, d in DAMAGED_FILES.items()},
          **{name: damage_with_content(m) for name, m in FOREIGN_CONTENTS.items()}}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_cache_is_tokenized_again(cached, tokenizer, damage, capsys):
    corpus_file, cache_file, features = cached
    damage(cache_file, features)
    capsys.readouterr()
    again = corpus_features.load_features(corpus_file, tokenizer, 16, cache_file.parent)
    assert same_features(again, features)
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: ignoring the cache file {cache_file} (")
    assert warning.endswith(f"); tokenizing {corpus_file} again\n")
    assert warning.count("\n") == 1
    # The cache is whole again: the next run reads it, with no warning.
    assert same_features(
        corpus_features.Features(**torch.load(cache_file, weights_only=True)), features
    )
    corpus_features.load_features(corpus_file, tokenizer, 16, cache_file.parent)
    assert capsys.readouterr().err == ""


def test_a_full_disk_is_a_warning_and_leaves_no_file_behind(tmp_path, tokenizer, monkeypatch,
                                                            capsys):
    corpus_file = write(tmp_path / "corpus.tsv", "좋다\t1\n정말 별로\t0\n")

    def full_disk(obj, path):  # torch.save's own words on a full disk: a RuntimeError
        Path(path).write_bytes(b"PK\x03\x04 the first bytes made it")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    features = corpus_features.load_features(corpus_file, tokenizer, 16, tmp_path / "cache")
    assert len(features) == 2
    assert capsys.readouterr().err == (
        f"warning: could not cache {corpus_file} in {tmp_path / 'cache'} ([enforce fail at "
        f"inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file "
        f"write failed); the next run will tokenize it again\n")
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------- models

def model_copy(tiny_model, tmp_path, without=()):
    """A copy of the tiny model's directory, less the files `without`."""
    directory = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    for name in without:
        (directory / name).unlink()
    return directory


def last_error_line(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.mark.slow
def test_a_model_directory_without_tokenizer_files(train_args, tiny_model, tmp_path):
    directory = model_copy(tiny_model, tmp_path, without=TOKENIZER_FILES)
    result = run_train(train_args + ["--pretrained_model_name", str(directory)])
    assert last_error_line(result) == (
        f"error: --pretrained_model_name {directory}: the directory has no tokenizer.json; copy "
        f"the tokenizer files of the model it came from (tokenizer.json, tokenizer_config.json) "
        f"into it")


def test_tokenizer_json_is_the_file_that_counts(tiny_model, tmp_path):
    directory = model_copy(tiny_model, tmp_path, without=["tokenizer.json"])
    with pytest.raises(InputError, match=r": the directory has no tokenizer.json; copy"):
        load_tokenizer(str(directory))


def cut_to_half(raw):
    return raw[:len(raw) // 2]


TRUNCATIONS = {"half": cut_to_half, "inside-the-header": lambda raw: raw[:20],
               "empty": lambda raw: b""}


@pytest.mark.parametrize("truncate", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_a_truncated_model_safetensors_is_named(tiny_model, tmp_path, truncate):
    directory = model_copy(tiny_model, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(truncate(weights.read_bytes()))
    tokenizer = load_tokenizer(str(directory))  # the tokenizer files are fine
    with pytest.raises(InputError) as error:
        load_model(str(directory), tokenizer)
    assert str(error.value).startswith(f"--pretrained_model_name {directory}: {weights} is "
                                       f"damaged (")
    assert str(error.value).endswith("); delete it, then download the model again or save "
                                     "it again")


@pytest.mark.slow
def test_train_py_on_a_truncated_model_safetensors(train_args, tiny_model, tmp_path):
    directory = model_copy(tiny_model, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(cut_to_half(weights.read_bytes()))
    result = run_train(train_args + ["--pretrained_model_name", str(directory)])
    assert last_error_line(result) == (
        f"error: --pretrained_model_name {directory}: {weights} is damaged (Error while "
        f"deserializing header: incomplete metadata, file not fully covered); delete it, then "
        f"download the model again or save it again")


@pytest.mark.slow
def test_a_damaged_download_in_the_hub_cache_is_named(train_args, tiny_model, tmp_path):
    # The hub cache's layout: models--ORG--NAME/refs/main names the snapshot that holds the files.
    repo, commit = tmp_path / "hub" / "models--some-org--kogpt2", "0" * 40
    weights = Path(shutil.copytree(tiny_model, repo / "snapshots" / commit)) / "model.safetensors"
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_train(train_args + ["--pretrained_model_name", "some-org/kogpt2"],
                       env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert last_error_line(result).startswith(
        f"error: --pretrained_model_name some-org/kogpt2: {weights} is damaged (")


def bert_next_to_the_tokenizer(tiny_model, tmp_path, **config):
    """A tiny BERT with the tiny model's tokenizer: an encoder, which sees the whole text."""
    from transformers import BertConfig, BertLMHeadModel
    directory = tmp_path / "bert"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model / name, directory / name)
    vocab_size = len(load_tokenizer(str(tiny_model)))
    torch.manual_seed(0)
    BertLMHeadModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=128, **config)).save_pretrained(directory)
    return directory


CAUSAL_LM_HINT = ("use a causal language model: KoGPT2 or another of the GPT-2 family, or any "
                  "model that AutoModelForCausalLM loads and that takes input_ids and "
                  "attention_mask")


@pytest.mark.slow
def test_an_encoder_is_refused(train_args, tiny_model, tmp_path):
    # BertLMHeadModel is among AutoModelForCausalLM's classes, so it loads; but as an encoder
    # it sees the next token it is asked to predict. Trained 800 steps on the fixtures, its
    # validation loss fell to 0.06 where the same BERT as a decoder stayed near 3: it copies.
    directory = bert_next_to_the_tokenizer(tiny_model, tmp_path)
    result = run_train(train_args + ["--pretrained_model_name", str(directory),
                                     "--max_steps", "2"])
    assert last_error_line(result) == (
        f"error: --pretrained_model_name {directory}: this bert model sees the tokens after "
        f"each position, so it would learn to copy the next token instead of predicting it; "
        f"{CAUSAL_LM_HINT}")


def test_bert_as_a_decoder_is_causal_and_loads(tiny_model, tmp_path):
    directory = bert_next_to_the_tokenizer(tiny_model, tmp_path, is_decoder=True)
    tokenizer = load_tokenizer(str(directory))
    assert load_model(str(directory), tokenizer).config.model_type == "bert"


def test_a_model_type_that_is_no_causal_lm(tiny_model, tmp_path):
    from transformers import DistilBertConfig
    directory = model_copy(tiny_model, tmp_path, without=["config.json"])
    DistilBertConfig(vocab_size=200, dim=32, n_layers=1, n_heads=2).save_pretrained(directory)
    with pytest.raises(InputError) as error:
        check_loadable(str(directory), "--pretrained_model_name", 32)
    assert str(error.value) == (f"--pretrained_model_name {directory}: a distilbert model is "
                                f"not a causal language model; {CAUSAL_LM_HINT}")


# --------------------------------------------------------------------------- paths

TRAIN_PATH_FLAGS = ["--pretrained_model_name", "--downstream_corpus_name",
                    "--downstream_corpus_root_dir", "--downstream_model_dir", "--cache_dir",
                    "--train_file", "--val_file", "--resume"]


@pytest.mark.parametrize("value", ["", " "])
@pytest.mark.parametrize("flag", TRAIN_PATH_FLAGS)
def test_an_empty_path_is_refused(train_args, capsys, flag, value):
    """--downstream_model_dir "" would be the current directory, --train_file "" no file."""
    assert train.main(train_args + [flag, value]) == 1
    assert capsys.readouterr().err == (f"error: {flag} is empty; give a path, or leave the flag "
                                       f"out for its default\n")


@pytest.mark.parametrize("flag", ["--downstream_model_dir", "--val_file", "--cache_dir"])
def test_generate_py_refuses_an_empty_path_too(capsys, flag):
    import generate
    assert generate.main([flag, ""]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {flag} is empty; give a path, or leave the flag out for its default")


def test_resume_latest_with_overwrite_output_dir_is_refused(train_args, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    assert train.main(train_args + ["--resume", "latest", "--overwrite_output_dir"]) == 1
    assert capsys.readouterr().err == (
        "error: --resume latest continues the run in --downstream_model_dir and "
        "--overwrite_output_dir deletes it; drop one of them\n")
    assert (out / "checkpoint-2").is_dir()


def test_the_output_directory_is_never_the_model_it_starts_from(train_args, tiny_model,
                                                                tmp_path, capsys):
    model = model_copy(tiny_model, tmp_path)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    for extra in [[], ["--overwrite_output_dir"]]:
        assert train.main(train_args + ["--pretrained_model_name", str(model),
                                        "--downstream_model_dir", str(model), *extra]) == 1
        assert capsys.readouterr().err == (
            f"error: --downstream_model_dir {model} is the folder of --pretrained_model_name "
            f"{model}: the run would write its best model over what it reads; choose another "
            f"--downstream_model_dir\n")
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before


def checkpoint_folder(path):
    """A folder that looks like a checkpoint to the checks on paths (they come first)."""
    path.mkdir(parents=True)
    (path / "training_state.pt").write_bytes(b"kept")
    return path


OVERLAPS = {
    "holds the model": lambda out: ("--pretrained_model_name", out / "model", "holds"),
    "inside the model": lambda out: ("--pretrained_model_name", out.parent, "lies inside"),
    "holds the checkpoint": lambda out: ("--resume", out / "checkpoint-2", "holds"),
    "inside the checkpoint": lambda out: ("--resume", out.parent, "lies inside"),
}


@pytest.mark.parametrize("overlap", OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overwrite_output_dir_never_deletes_what_the_run_reads(train_args, tiny_model, tmp_path,
                                                               capsys, overlap):
    out = tmp_path / "work" / "out"
    flag, source, where = overlap(out)
    if flag == "--pretrained_model_name":
        shutil.copytree(tiny_model, source, dirs_exist_ok=True)
    else:
        checkpoint_folder(source)
    checkpoint_folder(out / "checkpoint-6")                     # an earlier run to delete
    args = train_args + ["--downstream_model_dir", str(out), flag, str(source),
                         "--overwrite_output_dir"]
    assert train.main(args) == 1
    assert capsys.readouterr().err == (
        f"error: --overwrite_output_dir: --downstream_model_dir {out} {where} {flag} {source}, "
        f"which the run reads; choose a --downstream_model_dir apart from it\n")
    assert (out / "checkpoint-6" / "training_state.pt").read_bytes() == b"kept"

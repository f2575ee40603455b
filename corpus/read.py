"""Corpus files: found where the tutorial keeps them (NSMC downloaded with Korpora, only
the files that are missing) or given by name, and read strictly: NSMC's TSV, two-column
`document<TAB>label` files, plain text, or prompt/response pairs in JSON Lines, each line
checked, a bad one named by file and line."""
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InputError, first_line

NSMC_FILES = ("ratings_train.txt", "ratings_test.txt")
NSMC_HEADER = ["id", "document", "label"]
PAIR_HEADER = ["document", "label"]     # the optional header of a two-column corpus


def corpus_files(root_dir, corpus_name="nsmc", train_file=None, val_file=None, names=NSMC_FILES):
    """The train and validation files: `train_file` and `val_file` when given, else
    ratings_train.txt and ratings_test.txt (those of `names`) in the folder
    `root_dir/corpus_name` (an absolute `corpus_name` is that folder itself). Of NSMC, only
    the missing files are downloaded (Korpora.fetch opens the network even when the files
    are there)."""
    if train_file or val_file:
        if not (train_file and val_file):
            raise InputError("--train_file and --val_file go together: give both (the "
                             "validation file decides which model is kept as the best)")
        return [given_file("--train_file", train_file), given_file("--val_file", val_file)]
    folder = Path(root_dir).expanduser() / Path(corpus_name).expanduser()
    paths = [folder / name for name in names]
    for path in paths:
        # Something else in a file's place: a download could not put the file there either.
        if path.exists() and not path.is_file():
            hint = (f"put NSMC's {path.name} in its place, or remove it to download NSMC"
                    if corpus_name == "nsmc" else "put the corpus file in its place")
            raise InputError(f"{path} {what_it_is(path)}; {hint}")
    missing = [p for p in paths if not p.exists()]
    if missing:
        if corpus_name != "nsmc":
            raise InputError(f"--downstream_corpus_name {corpus_name}: no {missing[0]}; "
                             f"only nsmc can be downloaded, other corpora must be on disk")
        download_nsmc(folder, missing)
    return paths


def given_file(flag, name):
    path = Path(name).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {name}: no such file")
    if not path.is_file():
        raise InputError(f"{flag} {name}: {what_it_is(path)}; name the corpus file itself")
    return path


def what_it_is(path):
    """What stands at `path` instead of a regular file, for error messages. A named pipe or
    a device is refused too: reading it might never end, and the cache key reads it twice."""
    if path.is_dir():
        return "is a directory, not a file"
    return "is not a regular file (a pipe or a device?)"


def download_nsmc(folder, missing):
    """Fetch NSMC with Korpora into a scratch folder, then move the missing files into
    place, so that an interrupted download never leaves a truncated file behind."""
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        from Korpora import Korpora
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            Korpora.fetch("nsmc", root_dir=scratch)
            for path in missing:
                os.replace(Path(scratch) / "nsmc" / path.name, path)
    except Exception as e:  # no network, proxy, read-only folder, ...: all end the same way
        for path in created:  # an empty ~/Korpora/nsmc/ would only mislead the next run
            with contextlib.suppress(OSError):
                path.rmdir()
        raise InputError(
            f"NSMC is not at {missing[0]} and downloading it failed ({first_line(e)}); "
            f"put {' and '.join(p.name for p in missing)} in {folder}/ or point "
            f"--downstream_corpus_root_dir at the folder that holds nsmc/") from e


@dataclass
class Reviews:
    texts: list
    labels: list          # 1 positive, 0 negative; None for a corpus without labels
    blank: int = 0        # reviews skipped because their text is empty


@dataclass
class Pairs:
    """Examples as a prompt and its response, each trained as `prompt response</s>`: the
    response and `</s>` always, the prompt only when `prompt_trained` (otherwise its tokens
    are context, labelled -100). corpus/features.py says how a pair too long is cut."""
    prompts: list            # "" where there is none: the response is trained alone
    responses: list
    lines: list = None       # each pair's line in its file, to name it in reports
    blank: int = 0           # lines skipped: blank, or with a blank response
    labels: list = None      # NSMC's polarity labels (1 positive, 0 negative), else None
    prompt_trained: bool = False


JSONL_SUFFIX = ".jsonl"
JSONL_EXAMPLE = '{"prompt": "...", "response": "..."}'


def read_corpus(path):
    """Read a corpus file strictly: a `.jsonl` file as prompt/response pairs (see
    `read_jsonl`), any other in the layout its first line shows:

    - NSMC: the header `id<TAB>document<TAB>label`, then three fields a line;
    - two columns: `document<TAB>label` lines, the first of them either that very header
      or already a review;
    - plain text: no tab on the first line. Every line is then one text without a label
      (trained with no polarity word), and a tab on a later line is an error: it means a
      labelled file whose first line lost its tab.

    Fields are split on tabs with no quoting (reviews contain `"`); labels are 0 or 1.
    A UTF-8 BOM and CRLF line endings are accepted; blank texts are skipped and counted;
    anything else names its line."""
    if Path(path).suffix == JSONL_SUFFIX:
        return read_jsonl(path)
    lines = read_lines(path)
    numbered = list(enumerate(lines, start=1))
    first = lines[0].split("\t")
    if first in (NSMC_HEADER, PAIR_HEADER):
        return read_labelled(path, numbered[1:], columns=first)
    if len(first) == 2:
        return read_labelled(path, numbered, columns=PAIR_HEADER)
    if len(first) == 1:
        return read_plain(path, numbered)
    raise InputError(f"{path}:1: expected the header 'id<TAB>document<TAB>label', found "
                     f"{lines[0][:60]!r}; NSMC's files start with that header (other "
                     f"layouts: 'document<TAB>label' lines, or plain text without tabs)")


def read_lines(path):
    """The lines of a UTF-8 text file, split only at line feeds, without their endings
    (CRLF included); at least one."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8; "
                         f"re-save the file as UTF-8{korean_encoding_hint(raw, path)}") from None
    # Only \n ends a line. str.splitlines() would also break on \r, \f, \v, U+0085, U+2028,
    # U+2029 and \x1c-\x1e, which reviews contain as text: a review cut in two there
    # shows up as a wrong field count on a wrong line number.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    if not lines:
        raise InputError(f"{path}: the file is empty; expected the header "
                         f"'id<TAB>document<TAB>label' and one review per line")
    return lines


def korean_encoding_hint(raw, path):
    """How to convert a file that reads as cp949 (which covers euc-kr), Korean Windows'
    encoding; nothing for other bytes."""
    try:
        raw.decode("cp949")
    except UnicodeDecodeError:
        return ""
    return f" (it reads as cp949/euc-kr: iconv -f cp949 -t utf-8 {path} > utf8.txt)"


def read_labelled(path, numbered, columns):
    """Reviews from (line number, line) pairs of tab-separated `columns`."""
    reviews = Reviews([], [])
    for number, line in numbered:
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise InputError(f"{path}:{number}: expected {len(columns)} tab-separated fields "
                             f"({', '.join(columns)}), found {len(fields)}; fix or delete the line")
        document, label = fields[-2:]  # both layouts end with document, label
        if label not in ("0", "1"):
            # The likeliest cause on line 1: a header other than `document<TAB>label`.
            hint = ("a header must read 'document<TAB>label'" if number == 1
                    else "use 1 for a positive review, 0 for a negative one")
            raise InputError(f"{path}:{number}: label must be 0 or 1, found "
                             f"{label!r}; {hint}")
        if not document.strip():
            reviews.blank += 1
            continue
        reviews.texts.append(document)
        reviews.labels.append(1 if label == "1" else 0)
    return reviews


def read_plain(path, numbered):
    """Texts without labels, one a line."""
    reviews = Reviews([], labels=None)
    for number, line in numbered:
        if "\t" in line:
            raise InputError(f"{path}:{number}: a tab in a plain-text corpus (line 1 has "
                             f"none, so every line is read as one text without a label); "
                             f"remove the tab, or write every line as 'document<TAB>label'")
        if not line.strip():
            reviews.blank += 1
            continue
        reviews.texts.append(line)
    return reviews


def read_jsonl(path):
    """Pairs from JSON Lines: one object a line, `{"prompt": ..., "response": ...}`, or
    `{"text": ...}` alone for a text trained whole (no prompt). Other keys are ignored.
    Blank lines, and lines whose response or text is blank, are skipped and counted; a line
    that is no such object is named, with what is wrong."""
    if Path(path).stat().st_size == 0:  # before read_lines, whose message is for NSMC's TSV
        raise InputError(f"{path}: the file is empty; expected one JSON object a line, such "
                         f"as {JSONL_EXAMPLE}")
    pairs = Pairs([], [], lines=[])
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            pairs.blank += 1
            continue
        prompt, response = pair_of(json_object(path, number, line), f"{path}:{number}")
        if not response.strip():
            pairs.blank += 1
            continue
        pairs.prompts.append(prompt)
        pairs.responses.append(response)
        pairs.lines.append(number)
    return pairs


def read_prompts(path):
    """(prompts, their line numbers) of a JSON Lines file of `{"prompt": ...}` objects, one
    a line (other keys ignored: a corpus file's responses are left alone), for generate.py
    to answer. Blank lines are skipped; a line that is no such object, or a blank prompt,
    is named, with what is wrong."""
    if Path(path).stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; expected one JSON object a line, such "
                         f"as {PROMPT_EXAMPLE}")
    prompts, lines = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        value = json_object(path, number, line, PROMPT_EXAMPLE)
        if "prompt" not in value:
            raise InputError(f'{path}:{number}: no "prompt" key; write one object a line, '
                             f'such as {PROMPT_EXAMPLE}')
        check_string(value, "prompt", f"{path}:{number}")
        if not value["prompt"].strip():
            raise InputError(f"{path}:{number}: the prompt is blank; give the text to answer, "
                             f"or delete the line")
        prompts.append(value["prompt"])
        lines.append(number)
    if not prompts:
        raise InputError(f"{path}: no prompts, only blank lines; expected one JSON object a "
                         f"line, such as {PROMPT_EXAMPLE}")
    return prompts, lines


PROMPT_EXAMPLE = '{"prompt": "..."}'


def json_object(path, number, line, example=JSONL_EXAMPLE):
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno}); write "
                         f"one object a line, such as {example}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}:{number}: expected a JSON object, found {json_kind(value)}; "
                         f"write one object a line, such as {example}")
    return value


def pair_of(value, where):
    """(prompt, response) of one line's object `value`; `where` names the line."""
    if "text" in value and ("prompt" in value or "response" in value):
        raise InputError(f'{where}: both "text" and "prompt"/"response"; give a pair, or '
                         f'"text" alone for a text trained whole')
    keys = ["text"] if "text" in value else ["prompt", "response"]
    for key in keys:
        if key not in value:
            raise InputError(f'{where}: no "{key}" key; each line needs "prompt" and '
                             f'"response", or "text" alone')
        check_string(value, key, where)
    return ("", value["text"]) if keys == ["text"] else (value["prompt"], value["response"])


def check_string(value, key, where):
    """Refuse `value[key]` unless it is a string the tokenizer can read."""
    if not isinstance(value[key], str):
        raise InputError(f'{where}: "{key}" must be a string, found {json_kind(value[key])}')
    try:
        value[key].encode("utf-8")
    except UnicodeEncodeError:  # json.loads lets \ud800 through; the tokenizer cannot
        raise InputError(f'{where}: "{key}" holds a \\u escape that is no character (a '
                         f'lone surrogate); fix the escape') from None


def json_kind(value):
    """What a JSON value is, for error messages."""
    kinds = [(bool, "true or false"), (str, "a string"), ((int, float), "a number"),
             (list, "an array"), (dict, "an object"), (type(None), "null")]
    return next(kind for types, kind in kinds if isinstance(value, types))

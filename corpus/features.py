"""Reviews as token ids, tokenized once and cached: `polarity review</s>` for a labelled
corpus (`text</s>` without labels) in rows of `max_seq_length`, kept as plain tensors so that
`torch.load` needs no pickle, and checked when read back (a cache cut short or damaged is
tokenized again, never trained on)."""
import dataclasses
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from corpus.read import read_corpus
from runtime.errors import InputError, add_file_bytes, first_line, write_atomically

POLARITY = {1: "긍정", 0: "부정"}        # the word each review is prefixed with
CACHE_VERSION = 2                       # bump when the cached layout changes


@dataclass
class Features:
    """A split as fixed-width token ids: `input_ids[i, :lengths[i]]` is one example,
    the rest of the row is padding."""
    input_ids: torch.Tensor   # int32 [N, max_seq_length]
    lengths: torch.Tensor     # int32 [N]
    labels: torch.Tensor      # int8 [N], the review's polarity; None without labels
    blank: int = 0
    truncated: int = 0

    def __len__(self):
        return len(self.lengths)


def min_seq_length(tokenizer):
    """The shortest `max_seq_length` that leaves room for one review token: the longest
    polarity word, one review token, and `</s>`."""
    prefix = max(len(tokenizer(word, add_special_tokens=False)["input_ids"])
                 for word in POLARITY.values())
    return prefix + 2


def encode(reviews, tokenizer, max_seq_length, progress=False):
    """`polarity review</s>` as token ids, or `text</s>` for a corpus without labels. The
    review is cut to fit; `</s>` always stays, so the model learns where a review ends.
    `progress`: show a progress bar (on a terminal only)."""
    if reviews.labels is None:
        prompts, labels = reviews.texts, None
    else:
        prompts = [f"{POLARITY[label]} {text}"
                   for text, label in zip(reviews.texts, reviews.labels)]
        labels = torch.tensor(reviews.labels, dtype=torch.int8)
    pieces = token_ids(prompts, tokenizer, max_length=max_seq_length - 1, progress=progress)
    lengths = torch.tensor([len(ids) for ids in pieces], dtype=torch.int32)
    # One copy of every id into place, rather than a small tensor per review.
    flat = torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.int32)
    input_ids = torch.full((len(pieces), max_seq_length), tokenizer.pad_token_id, dtype=torch.int32)
    input_ids[torch.arange(max_seq_length) < lengths[:, None]] = flat
    input_ids[torch.arange(len(pieces)), lengths.long()] = tokenizer.eos_token_id
    lengths += 1
    return Features(input_ids, lengths, labels,
                    blank=reviews.blank, truncated=int((lengths == max_seq_length).sum()))


def token_ids(texts, tokenizer, max_length, progress=False, chunk=20_000):
    """Each text's token ids, no special tokens, cut to `max_length` from the right (the
    polarity word stays). The Rust tokenizer encodes each chunk of texts in parallel:
    calling it directly skips the Python objects that `tokenizer(texts)` builds for every
    text, which took as long as the tokenizing itself (`encode_batch_fast` also skips the
    character offsets, which nothing here reads)."""
    rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy to configure
    rust.no_padding()
    rust.enable_truncation(max_length)
    ids = []
    with tqdm(total=len(texts), desc="tokenize", unit=" reviews", disable=not progress or None,
              dynamic_ncols=True) as bar:
        for start in range(0, len(texts), chunk):
            encodings = rust.encode_batch_fast(texts[start:start + chunk], add_special_tokens=False)
            ids += [encoding.ids for encoding in encodings]
            bar.update(len(encodings))
    return ids


def cache_path(cache_dir, corpus_file, tokenizer, max_seq_length):
    """The cache file for one corpus file, keyed by everything that changes its features:
    the file's bytes (which also decide its layout, and so whether reviews get a polarity
    word), the polarity words, the tokenizer (its full definition) and `max_seq_length`."""
    key = add_file_bytes(hashlib.sha256(), corpus_file)
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(f"{POLARITY}|{max_seq_length}|{tokenizer.eos_token_id}|"
               f"{tokenizer.pad_token_id}|{CACHE_VERSION}".encode())
    return Path(cache_dir).expanduser() / f"{Path(corpus_file).stem}-{key.hexdigest()[:16]}.pt"


def tokenizer_fingerprint(tokenizer):
    """The tokenizer's full definition, minus the truncation and padding settings that
    each call leaves behind in it."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


def load_features(corpus_file, tokenizer, max_seq_length, cache_dir, progress=False):
    """Features of `corpus_file`, from the cache when it has them, else read, tokenized
    (with a progress bar when `progress`) and cached. The cache holds plain tensors and
    ints, so `torch.load` needs no pickle."""
    if max_seq_length < min_seq_length(tokenizer):
        raise InputError(f"--max_seq_length {max_seq_length} is too small: the polarity "
                         f"word and </s> leave no room for the review; use at least "
                         f"{min_seq_length(tokenizer)}")
    cached = cache_path(cache_dir, corpus_file, tokenizer, max_seq_length)
    features = read_cache(cached, corpus_file, tokenizer, max_seq_length)
    if features is None:
        features = tokenize(corpus_file, tokenizer, max_seq_length, progress)
        write_cache(cached, corpus_file, features)
    return features


def tokenize(corpus_file, tokenizer, max_seq_length, progress=False):
    """Read `corpus_file` and turn its reviews into features."""
    reviews = read_corpus(corpus_file)
    if not reviews.texts:
        raise InputError(f"{corpus_file}: no reviews with text; the file holds only a header "
                         f"or blank reviews")
    return encode(reviews, tokenizer, max_seq_length, progress)


def read_cache(path, corpus_file, tokenizer, max_seq_length):
    """The features cached at `path`, or None (see `load_cached`). Tokenizing again costs
    seconds; wrong features could cost the whole run."""
    saved = load_cached(path, lambda saved: cache_layout_problem(saved, max_seq_length)
                        or cache_value_problem(saved, tokenizer),
                        instead=f"tokenizing {corpus_file} again")
    return None if saved is None else Features(**saved)


def load_cached(path, problem_of, instead):
    """What torch saved at `path`, when `problem_of(it)` finds nothing wrong with it (returns
    None); None when there is no such file, or, with a warning ending in `instead`, when it
    holds anything else: cut short, damaged on disk, another program's."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:
        # A damaged file fails inside torch.load in many ways: zip, pickle, UTF-8, struct,
        # EOF errors and more. Any of them means the same: this file cannot be used.
        problem = f"not a readable torch file: {type(e).__name__}"
    else:
        problem = problem_of(saved)
    if problem is None:
        return saved
    print(f"warning: ignoring the cache file {path} ({problem}); {instead}", file=sys.stderr)
    return None


def cache_layout_problem(saved, max_seq_length):
    """What keeps `saved` from being the fields of Features, with rows `max_seq_length`
    wide; None when nothing does."""
    names = {field.name for field in dataclasses.fields(Features)}
    if not isinstance(saved, dict) or set(saved) != names:
        return f"not cached features: expected exactly the keys {', '.join(sorted(names))}"
    ids, lengths, labels = saved["input_ids"], saved["lengths"], saved["labels"]
    if not is_tensor(ids, torch.int32, (None, max_seq_length)) or len(ids) == 0:
        return f"input_ids is not an int32 tensor [N, {max_seq_length}] with N > 0"
    if not is_tensor(lengths, torch.int32, (len(ids),)):
        return f"lengths is not an int32 tensor [{len(ids)}], one per row of input_ids"
    if labels is not None and not is_tensor(labels, torch.int8, (len(ids),)):
        return f"labels is neither None nor an int8 tensor [{len(ids)}]"
    if not all(type(saved[name]) is int and saved[name] >= 0 for name in ("blank", "truncated")):
        return "blank or truncated is not a count"
    return None


def cache_value_problem(saved, tokenizer):
    """What in well-shaped features `encode` could not have written; None when nothing."""
    ids, lengths, labels = saved["input_ids"], saved["lengths"], saved["labels"]
    # One pass over each tensor (aminmax, gather): a warm start reads the cache in ~0.1 s.
    if not in_range(ids, 0, len(tokenizer) - 1):
        return f"token ids outside 0..{len(tokenizer) - 1}, the tokenizer's vocabulary"
    if not in_range(lengths, 1, ids.shape[1]):
        return f"lengths outside 1..{ids.shape[1]}"
    last_ids = ids.gather(1, lengths[:, None].long() - 1)
    if not in_range(last_ids, tokenizer.eos_token_id, tokenizer.eos_token_id):
        return "an example does not end with </s> at its length"
    if labels is not None and not in_range(labels, 0, 1):
        return "labels other than 0 and 1"
    return None


def in_range(tensor, low, high):
    smallest, largest = tensor.aminmax()
    return low <= smallest and largest <= high


def is_tensor(value, dtype, shape):
    """Whether `value` is a tensor of `dtype` and `shape` (None in `shape`: any size)."""
    return (isinstance(value, torch.Tensor) and value.dtype == dtype
            and value.dim() == len(shape)
            and all(want in (None, got) for want, got in zip(shape, value.shape)))


def write_cache(path, corpus_file, features):
    """Cache `features` at `path`, or warn that the next run will tokenize again."""
    try:
        write_atomically(path, lambda tmp: torch.save(vars(features), tmp))
    # The features are in hand; only the next run pays for this. torch.save reports a full
    # disk as a RuntimeError ("PytorchStreamWriter failed writing file"), not an OSError.
    except (OSError, RuntimeError) as e:
        print(f"warning: could not cache {corpus_file} in {path.parent} ({first_line(e)}); "
              f"the next run will tokenize it again", file=sys.stderr)

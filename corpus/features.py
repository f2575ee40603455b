"""Examples as token ids, tokenized once and cached: `prompt response</s>` in rows of
`max_seq_length`, with the first column that is trained (the prompt's tokens before it are
labelled -100 in batches), kept as plain tensors so that `torch.load` needs no pickle, and
checked when read back (a cache cut short or damaged is tokenized again, never trained on).

Every corpus is prompt/response pairs (corpus/read.py's Pairs). A JSON Lines corpus gives
them as they are: the prompt is context, not trained. NSMC's layouts are the tutorial's
`polarity review</s>`: the polarity word is the prompt, trained as the tutorial trains it,
and ` review` the response. Plain text is responses without a prompt."""
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

from corpus.read import Pairs, Reviews, read_corpus
from runtime.errors import InputError, add_file_bytes, first_line, write_atomically

POLARITY = {1: "긍정", 0: "부정"}        # the word each review is prefixed with
CACHE_VERSION = 3                       # bump when the cached layout changes
NAMED_LEFT_OUT = 5                      # pairs left out that reports name by line


@dataclass
class Features:
    """A split as fixed-width token ids: `input_ids[i, :lengths[i]]` is one example, the
    rest of the row is padding; its tokens from column `trained_from[i]` on are trained,
    those before (an untrained prompt) are context only. `trained_from` None: all are."""
    input_ids: torch.Tensor   # int32 [N, max_seq_length]
    lengths: torch.Tensor     # int32 [N]
    labels: torch.Tensor      # int8 [N], the review's polarity; None without labels
    trained_from: torch.Tensor = None  # int32 [N], 0 where every token is trained
    blank: int = 0
    truncated: int = 0        # examples cut to fit
    left_out: int = 0         # pairs whose response does not fit (see `fit`)
    left_out_lines: list = dataclasses.field(default_factory=list)  # the first few's lines

    def __len__(self):
        return len(self.lengths)


def min_seq_length(tokenizer):
    """The shortest `max_seq_length` that leaves room for one review token: the longest
    polarity word, one review token, and `</s>`."""
    prefix = max(len(tokenizer(word, add_special_tokens=False)["input_ids"])
                 for word in POLARITY.values())
    return prefix + 2


def as_pairs(corpus):
    """`corpus` (what read_corpus returns) as Pairs. A labelled review is the tutorial's
    `polarity review`: the prompt is the polarity word, the response the review after the
    space that joins them (tokenized apart, they are the very tokens of the whole: the
    tokenizer splits at spaces before it merges). The word stays trained: the tutorial
    trains every token, and where the word is more than one token, leaving it out would
    change the loss."""
    if isinstance(corpus, Pairs):
        return corpus
    if corpus.labels is None:
        return Pairs([""] * len(corpus.texts), corpus.texts, blank=corpus.blank)
    return Pairs([POLARITY[label] for label in corpus.labels],
                 [f" {text}" for text in corpus.texts], blank=corpus.blank,
                 labels=corpus.labels, prompt_trained=True)


def encode(corpus, tokenizer, max_seq_length, progress=False):
    """Each example of `corpus` (Reviews or Pairs) as `prompt response</s>` token ids, cut
    to fit `max_seq_length` (see `fit`); `</s>` always stays, so the model learns where a
    response ends. `progress`: show a progress bar (on a terminal only)."""
    pairs = as_pairs(corpus)
    budget = max_seq_length - 1  # </s> takes the last position
    prompts = prompt_token_ids(pairs.prompts, tokenizer, budget)
    responses = token_ids(pairs.responses, tokenizer, max_seq_length, progress)
    pieces, trained_from, kept, left_out, truncated = [], [], [], [], 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        fitted = fit(prompt, response, budget, pairs.prompt_trained)
        if fitted is None:
            left_out.append(pairs.lines[i] if pairs.lines else i + 1)  # else its number
            continue
        truncated += fitted != (prompt, response)
        pieces.append(fitted[0] + fitted[1])
        trained_from.append(0 if pairs.prompt_trained else len(fitted[0]))
        kept.append(i)
    lengths = torch.tensor([len(ids) for ids in pieces], dtype=torch.int32)
    # One copy of every id into place, rather than a small tensor per example.
    flat = torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.int32)
    input_ids = torch.full((len(pieces), max_seq_length), tokenizer.pad_token_id, dtype=torch.int32)
    input_ids[torch.arange(max_seq_length) < lengths[:, None]] = flat
    input_ids[torch.arange(len(pieces)), lengths.long()] = tokenizer.eos_token_id
    labels = (None if pairs.labels is None  # only pairs without labels are ever left out
              else torch.tensor(pairs.labels, dtype=torch.int8)[kept])
    return Features(input_ids, lengths + 1, labels,
                    torch.tensor(trained_from, dtype=torch.int32), blank=pairs.blank,
                    truncated=truncated, left_out=len(left_out),
                    left_out_lines=left_out[:NAMED_LEFT_OUT])


def fit(prompt, response, budget, prompt_trained):
    """(prompt, response) token ids cut to at most `budget` together, or None when the
    response cannot fit. An untrained prompt is context: its start goes first, its end,
    next to the response, stays; a response so long that not even the prompt's last token
    fits before it is left out (an answer without its question would teach nothing). A
    trained prompt (NSMC's polarity word) stays whole and the response's end is cut, as the
    tutorial cut long reviews; so is a text without a prompt."""
    over = len(prompt) + len(response) - budget
    if over <= 0:
        return prompt, response
    if prompt_trained or not prompt:
        return prompt, response[:budget - len(prompt)]
    if len(response) >= budget:
        return None
    return prompt[over:], response


def prompt_token_ids(prompts, tokenizer, max_length):
    """Each prompt's token ids, at most its last `max_length`; each distinct prompt is
    tokenized once (NSMC's are two polarity words)."""
    distinct = list(dict.fromkeys(prompts))
    ids = dict(zip(distinct, token_ids(distinct, tokenizer, max_length, direction="left")))
    return [ids[prompt] for prompt in prompts]


def token_ids(texts, tokenizer, max_length, progress=False, chunk=20_000, direction="right"):
    """Each text's token ids, no special tokens, cut to `max_length` (the tokens on the
    `direction` side go). The Rust tokenizer encodes each chunk of texts in parallel:
    calling it directly skips the Python objects that `tokenizer(texts)` builds for every
    text, which took as long as the tokenizing itself (`encode_batch_fast` also skips the
    character offsets, which nothing here reads)."""
    rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy to configure
    rust.no_padding()
    rust.enable_truncation(max_length, direction=direction)
    ids = []
    with tqdm(total=len(texts), desc="tokenize", unit=" examples", disable=not progress or None,
              dynamic_ncols=True) as bar:
        for start in range(0, len(texts), chunk):
            encodings = rust.encode_batch_fast(texts[start:start + chunk], add_special_tokens=False)
            ids += [encoding.ids for encoding in encodings]
            bar.update(len(encodings))
    return ids


def cache_path(cache_dir, corpus_file, tokenizer, max_seq_length):
    """The cache file for one corpus file, keyed by everything that changes its features:
    the file's bytes and suffix (which decide its layout, and so whether reviews get a
    polarity word or prompts go untrained), the polarity words, the tokenizer (its full
    definition) and `max_seq_length`."""
    key = add_file_bytes(hashlib.sha256(), corpus_file)
    key.update(tokenizer_fingerprint(tokenizer).encode())
    key.update(f"{POLARITY}|{max_seq_length}|{tokenizer.eos_token_id}|"
               f"{tokenizer.pad_token_id}|{Path(corpus_file).suffix}|{CACHE_VERSION}".encode())
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
    """Read `corpus_file` and turn its examples into features."""
    corpus = read_corpus(corpus_file)
    if isinstance(corpus, Reviews) and not corpus.texts:
        raise InputError(f"{corpus_file}: no reviews with text; the file holds only a header "
                         f"or blank reviews")
    if isinstance(corpus, Pairs) and not corpus.responses:
        raise InputError(f"{corpus_file}: no examples; every line is blank or has a blank "
                         f"response or text")
    features = encode(corpus, tokenizer, max_seq_length, progress)
    if not len(features):
        raise InputError(f"{corpus_file}: no response fits in --max_seq_length "
                         f"{max_seq_length} after at least the last token of its prompt; "
                         f"raise --max_seq_length")
    return features


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
    if not is_tensor(saved["trained_from"], torch.int32, (len(ids),)):
        return f"trained_from is not an int32 tensor [{len(ids)}], one per row of input_ids"
    counts = ("blank", "truncated", "left_out")
    if not all(type(saved[name]) is int and saved[name] >= 0 for name in counts):
        return f"{', '.join(counts)} are not all counts"
    lines = saved["left_out_lines"]
    if not (isinstance(lines, list) and all(type(n) is int and n > 0 for n in lines)):
        return "left_out_lines is not a list of line numbers"
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
    trained_from = saved["trained_from"]
    if not (in_range(trained_from, 0, ids.shape[1])
            and in_range(lengths - trained_from, 1, ids.shape[1])):
        return "trained_from outside 0..length - 1 (</s> is always trained)"
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

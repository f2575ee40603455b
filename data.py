"""NSMC for sentence generation: find or download the corpus (or take your own files), read
it strictly, turn each review into `polarity review</s>` token ids once (`text</s>` for a
corpus without labels), cache them, and serve batches.

Every batch is a slice of one pre-tokenized tensor: no per-example Python work while
training. Padding is masked by length (attention 0, label -100), never by token id.
"""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

from options import InputError, default_cache_dir  # noqa: F401 (data.InputError for callers)

POLARITY = {1: "긍정", 0: "부정"}        # the word each review is prefixed with
NSMC_FILES = ("ratings_train.txt", "ratings_test.txt")
NSMC_HEADER = ["id", "document", "label"]
PAIR_HEADER = ["document", "label"]     # the optional header of a two-column corpus
CACHE_VERSION = 2                       # bump when the cached layout changes


# --------------------------------------------------------------------------- the corpus

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


def read_corpus(path):
    """Read a corpus file strictly, in the layout its first line shows:

    - NSMC: the header `id<TAB>document<TAB>label`, then three fields a line;
    - two columns: `document<TAB>label` lines, the first of them either that very header
      or already a review;
    - plain text: no tab on the first line. Every line is then one text without a label
      (trained with no polarity word), and a tab on a later line is an error: it means a
      labelled file whose first line lost its tab.

    Fields are split on tabs with no quoting (reviews contain `"`); labels are 0 or 1.
    A UTF-8 BOM and CRLF line endings are accepted; blank texts are skipped and counted;
    anything else names its line."""
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
                         f"re-save the file as UTF-8") from None
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


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------- features

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


def add_file_bytes(digest, path):
    """`digest` updated with the bytes of the file `path`, read a megabyte at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


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
    """The features cached at `path`; None when there is no such file, or, with a warning,
    when it holds anything but features of this shape: cut short, damaged on disk, another
    program's. Tokenizing again costs seconds; wrong features could cost the whole run."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:
        # A damaged file fails inside torch.load in many ways: zip, pickle, UTF-8, struct,
        # EOF errors and more. Any of them means the same: this file cannot be used.
        problem = f"not a readable torch file: {type(e).__name__}"
    else:
        problem = (cache_layout_problem(saved, max_seq_length)
                   or cache_value_problem(saved, tokenizer))
    if problem is None:
        return Features(**saved)
    print(f"warning: ignoring the cache file {path} ({problem}); tokenizing {corpus_file} "
          f"again", file=sys.stderr)
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


def write_atomically(path, write):
    """Call `write(tmp)` then rename tmp to `path`: readers see the old file or the whole
    new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- batches

PACKED_ROWS_STEP = 8  # on XLA: one compiled graph per multiple of 8 rows that occurs


class ReviewBatches(torch.utils.data.Dataset):
    """Indexed by a list of example indices, returns the whole batch in a few tensor ops.

    `packed=True` lays the reviews end to end in as few rows of `max_seq_length` as they
    fit in (see `pack`), each review seeing only itself: the loss and its gradients are
    those of the padded batch, with the transformer's work on padding mostly gone. A
    packed batch has `review_ids` (which review of the batch each position holds, -1 on
    padding) and `position_ids` (restarting at 0 with each review) where a padded batch
    has `attention_mask`. In both, `labels` is -100 on padding; in packed rows also at each
    review's first token, whose predecessor belongs to another review. (The loss predicts
    labels[:, 1:], so a row's first label is never a target.)

    A batch is indexed by a list of example indices, or on XLA by (indices, rows): the
    row count that every replica's packed batch of the step fits in (see `rows_for`).

    `fixed_shape=True` (XLA) keeps the shapes few, so that each is compiled once: padded
    batches are always `batch_size` rows of `max_seq_length` (extra rows are all padding),
    packed ones round their row count up to a multiple of PACKED_ROWS_STEP, or take the
    count they are given with their indices (see `rows_for`). Otherwise a padded batch is
    cut to its longest example, and "target_positions" lists the flat indices of the
    positions that predict a real token, where the loss needs logits."""

    def __init__(self, features, pad_token_id, fixed_shape, batch_size, packed=False):
        self.features = features
        self.pad_token_id = pad_token_id
        self.fixed_shape = fixed_shape
        self.batch_size = batch_size
        self.packed = packed

    def __len__(self):
        return len(self.features)

    def __getitem__(self, item):
        indices, rows = item if isinstance(item, tuple) else (item, None)
        indices = torch.as_tensor(indices, dtype=torch.long)
        batch = self.packed_batch(indices, rows) if self.packed else self.padded_batch(indices)
        if not self.fixed_shape:  # where the loss needs logits: before each real token
            batch["target_positions"] = F.pad(batch["labels"][:, 1:] != -100,
                                              (0, 1)).flatten().nonzero()[:, 0]
        return batch

    def padded_batch(self, indices):
        lengths = self.features.lengths[indices].long()
        width = self.features.input_ids.shape[1] if self.fixed_shape else int(lengths.max())
        input_ids = self.features.input_ids[indices, :width].long()
        if self.fixed_shape and len(indices) < self.batch_size:
            missing = self.batch_size - len(indices)
            input_ids = torch.cat([input_ids,
                                   input_ids.new_full((missing, width), self.pad_token_id)])
            lengths = torch.cat([lengths, lengths.new_zeros(missing)])
        real = torch.arange(width) < lengths[:, None]
        return {"input_ids": input_ids,
                "attention_mask": real.long(),
                "labels": input_ids.masked_fill(~real, -100)}

    def rows_for(self, index_batches):
        """The rows, a multiple of PACKED_ROWS_STEP, that every one of `index_batches` fits
        in when packed: XLA replicas run one graph, collectives and all, so the replicas'
        batches of a step must have one shape."""
        width = self.features.input_ids.shape[1]
        needed = [max(pack(self.features.lengths[indices].tolist(), width)[0]) + 1
                  for indices in index_batches]
        return self.fixed_rows(max(needed))

    def fixed_rows(self, needed):
        """`needed` rounded up to a multiple of PACKED_ROWS_STEP, at most batch_size."""
        return min(math.ceil(needed / PACKED_ROWS_STEP) * PACKED_ROWS_STEP, self.batch_size)

    def packed_batch(self, indices, rows=None):
        lengths = self.features.lengths[indices].long()
        width = self.features.input_ids.shape[1]
        row, column = pack(lengths.tolist(), width)
        if rows is None:
            rows = self.fixed_rows(max(row) + 1) if self.fixed_shape else max(row) + 1
        # Token j of review i goes to flat position row[i] * width + column[i] + j.
        offsets = torch.arange(width)
        real = offsets < lengths[:, None]
        where = (torch.tensor(row) * width + torch.tensor(column))[:, None] + offsets
        where = where[real]
        input_ids = torch.full((rows * width,), self.pad_token_id, dtype=torch.long)
        input_ids[where] = self.features.input_ids[indices].long()[real]
        review_ids = torch.full((rows * width,), -1, dtype=torch.long)
        review_ids[where] = torch.arange(len(indices))[:, None].expand(-1, width)[real]
        position_ids = torch.zeros(rows * width, dtype=torch.long)
        position_ids[where] = offsets.expand(len(indices), -1)[real]
        # No target at padding, nor at a review's first token: the token before it belongs
        # to another review, which must not learn to predict it.
        labels = input_ids.masked_fill((review_ids < 0) | (position_ids == 0), -100)
        return {"input_ids": input_ids.view(rows, width),
                "review_ids": review_ids.view(rows, width),
                "position_ids": position_ids.view(rows, width),
                "labels": labels.view(rows, width)}


def pack(lengths, width):
    """Where each review (of `lengths` tokens) goes in rows of `width` positions: (row,
    column) of its first token. First fit decreasing: longest first, each into the first
    row with room. It fills all rows but the last few almost to the brim."""
    row, column = [0] * len(lengths), [0] * len(lengths)
    used = []  # positions taken in each row so far
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, taken in enumerate(used) if taken + lengths[i] <= width), len(used))
        if r == len(used):
            used.append(0)
        row[i], column[i] = r, used[r]
        used[r] += lengths[i]
    return row, column


class TrainBatches:
    """Index batches for one replica: each epoch a fresh shuffle (DistributedSampler's,
    keyed by seed and epoch), sharded across replicas, only full batches. `start_epoch`
    can skip the batches already trained on, so a resumed run continues mid-epoch with
    the very same data order.

    Given the examples' `lengths` (--group_by_length), each batch holds reviews of similar
    lengths, so that a batch cut to its longest review is mostly real tokens (see
    `grouped_by_length`); the order is still a function of seed and epoch alone."""

    def __init__(self, num_examples, batch_size, world_size, rank, seed, lengths=None):
        self.sampler = DistributedSampler(range(num_examples), num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.lengths = lengths
        self.skip = 0
        self.shared_rows = None
        self.window = 1

    def agree_on_rows(self, rows_for, window=1):
        """From now on, yield (indices, rows) where rows = `rows_for(batches)` over every
        replica's batches of the step's `window` micro-batches: each replica works out the
        others' batches, a function of seed and epoch, so that all agree on the rows without
        a word between them, and a step's micro-batches share one shape (on XLA a step is
        one graph, however many micro-batches it holds)."""
        self.shared_rows, self.window = rows_for, window

    def start_epoch(self, epoch, skip_batches=0):
        self.sampler.set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self):
        if self.shared_rows is None:
            batches = self.replica_batches(self.sampler)
        else:
            every = zip(*(self.replica_batches(self.replica_sampler(rank))
                          for rank in range(self.sampler.num_replicas)))
            batches = self.with_shared_rows(every)
        return itertools.islice(iter(batches), self.skip, None)

    def with_shared_rows(self, every):
        """(this replica's batch, rows) for each of `every` (all replicas' batches of each
        micro-batch), the rows agreed over each window of micro-batches, counted from the
        start of the epoch so that a resumed run cuts the same windows."""
        for window in windows(every, self.window):
            rows = self.shared_rows([batch for batches in window for batch in batches])
            for batches in window:
                yield batches[self.sampler.rank], rows

    def replica_batches(self, sampler):
        if self.lengths is None:
            return BatchSampler(sampler, self.batch_size, drop_last=True)
        generator = torch.Generator().manual_seed(sampler.seed + sampler.epoch)
        return grouped_by_length(list(sampler), self.lengths, self.batch_size, generator)

    def replica_sampler(self, rank):
        """The sampler of replica `rank`, at this replica's epoch."""
        own = self.sampler
        sampler = DistributedSampler(own.dataset, num_replicas=own.num_replicas, rank=rank,
                                     shuffle=True, seed=own.seed, drop_last=True)
        sampler.set_epoch(own.epoch)
        return sampler

    def __len__(self):
        return len(self.sampler) // self.batch_size - self.skip


def grouped_by_length(indices, lengths, batch_size, generator, group=50):
    """Full batches of `indices` (already shuffled), each of reviews of similar lengths, in
    a random order drawn from `generator`. As Trainer's `group_by_length` does: the indices
    are cut into groups of `group` batches, each group is sorted by length and cut into
    batches. Sorting within groups rather than over the whole epoch keeps each batch a
    random draw among reviews of its length."""
    indices = torch.tensor(indices, dtype=torch.long)
    size = group * batch_size
    ordered = torch.cat([chunk[lengths[chunk].argsort(descending=True, stable=True)]
                         for chunk in indices.split(size)])
    batches = ordered[:len(ordered) // batch_size * batch_size].view(-1, batch_size)
    return batches[torch.randperm(len(batches), generator=generator)].tolist()


def eval_batches(num_examples, batch_size, world_size, rank, max_examples=None):
    """Index batches for one replica's share of the validation set: every example exactly
    once across replicas (DistributedSampler would repeat some to even the shards out).
    With `max_examples`, only that many, spread evenly over the file (see `spread`)."""
    shard = spread(num_examples, max_examples)[rank::world_size]
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]


def spread(num_examples, max_examples=None):
    """`max_examples` indices (all when None or 0) spread evenly over `num_examples`: the
    first ones could all share a polarity in a file sorted by label."""
    n = min(max_examples or num_examples, num_examples)
    return [i * num_examples // n for i in range(n)]


def batches_per_epoch(num_examples, batch_size, world_size):
    """Full batches each replica trains on per epoch (the rest is dropped)."""
    return (num_examples // world_size) // batch_size


def load_corpus(args, tokenizer, progress=True):
    """Train and validation features for train.py's `args`, from the cache after the first
    run. `progress`: a progress bar while tokenizing (on a terminal; the master's only)."""
    train_file, val_file = corpus_files(args.downstream_corpus_root_dir,
                                             args.downstream_corpus_name,
                                             args.train_file, args.val_file)
    features = [load_features(f, tokenizer, args.max_seq_length, args.cache_dir, progress)
                for f in (train_file, val_file)]
    if (features[0].labels is None) != (features[1].labels is None):
        unlabelled, labelled = ((train_file, val_file) if features[0].labels is None
                                else (val_file, train_file))
        raise InputError(f"{unlabelled} has no labels but {labelled} has; give both files "
                         f"labels, or neither")
    return features


def replica_steps(num_examples, batch_size, world_size, grad_accum_steps):
    """How the work splits across replicas: (micro-batches each replica trains on per
    epoch, optimizer steps per epoch)."""
    batches = batches_per_epoch(num_examples, batch_size, world_size)
    if batches == 0:
        raise InputError(f"{num_examples} training examples cannot fill one batch of "
                         f"--batch_size {batch_size} on each of {world_size} replicas; "
                         f"lower --batch_size")
    return batches, math.ceil(batches / grad_accum_steps)


def windows(batches, size):
    """Group micro-batches for gradient accumulation; the last group may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def make_loader(dataset, batches, workers, pin_memory):
    # batch_size=None: `batches` yields lists of indices and the dataset builds each batch.
    # A private generator keeps the loader from drawing on the global RNG, which drives
    # dropout and must replay exactly after a resume.
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))

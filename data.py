"""The data a loop sees: train and validation features of a corpus (corpus/ finds, reads,
tokenizes and caches them), cut into batches: each epoch a fresh shuffle sharded across
replicas, a resumed run continuing mid-epoch in the very same order, reviews packed end to
end in rows or padded, and on XLA batches of few fixed shapes.

Every batch is a slice of one pre-tokenized tensor: no per-example Python work while
training. Padding is masked by length (attention 0, label -100), never by token id, and an
untrained prompt by its example's `trained_from` column (label -100).
"""
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from corpus.features import POLARITY, load_features
from corpus.read import corpus_files
from runtime.errors import InputError


@dataclass
class DataConfig:
    """Where the corpus is and how it is batched (train.py's flags of the same names)."""
    downstream_corpus_root_dir: str = "~/Korpora"
    downstream_corpus_name: str = "nsmc"
    train_file: str = None          # your own corpus instead, with val_file
    val_file: str = None
    cache_dir: str = "~/.cache/kogpt2-nsmc"
    max_seq_length: int = 32
    batch_size: int = 32            # examples per replica per micro-batch
    eval_size: int = 2000           # validation examples per evaluation (0: all)
    group_by_length: bool = False
    cpu_workers: int = 0
    seed: int = 7

    def files(self):
        """(train file, validation file)."""
        return corpus_files(self.downstream_corpus_root_dir, self.downstream_corpus_name,
                            self.train_file, self.val_file)


def load_corpus(cfg, tokenizer, progress=True):
    """Train and validation features, from the cache after the first run. `progress`: a
    progress bar while tokenizing (on a terminal; the master's only)."""
    train_file, val_file = cfg.files()
    features = [load_features(f, tokenizer, cfg.max_seq_length, cfg.cache_dir, progress)
                for f in (train_file, val_file)]
    if (features[0].labels is None) != (features[1].labels is None):
        unlabelled, labelled = ((train_file, val_file) if features[0].labels is None
                                else (val_file, train_file))
        raise InputError(f"{unlabelled} has no labels but {labelled} has; give both files "
                         f"labels, or neither")
    return features


def record_polarity_words(config, train_features):
    """Note in the model's config (its config.json, in every checkpoint and the best model)
    the words its reviews are trained after: none for plain text; and `prompt_response`,
    whether it was trained to answer prompts (a .jsonl corpus of prompt/response pairs,
    whose prompts are context, not trained). generate.py reads both."""
    config.polarity_words = list(POLARITY.values()) if train_features.labels is not None else []
    trained_from = train_features.trained_from
    config.prompt_response = bool(trained_from is not None and (trained_from > 0).any())


def loaders(train_features, val_features, cfg, pad_token_id, backend, packed, grad_accum_steps):
    """(the training batches' order, the training loader, the validation loader) for one
    replica of `backend`."""
    train_batches = TrainBatches(len(train_features), cfg.batch_size, backend.world_size,
                                 backend.rank, cfg.seed,
                                 train_features.lengths if cfg.group_by_length else None)
    train_set = ReviewBatches(train_features, pad_token_id, backend.fixed_shapes,
                              cfg.batch_size, packed)
    if packed and backend.fixed_shapes:  # XLA: one graph for all replicas and micro-batches
        train_batches.agree_on_rows(train_set.rows_for, grad_accum_steps)
    val_set = ReviewBatches(val_features, pad_token_id, backend.fixed_shapes, cfg.batch_size,
                            packed)
    val_batches = eval_batches(len(val_features), cfg.batch_size, backend.world_size,
                               backend.rank, cfg.eval_size)
    return (train_batches,
            make_loader(train_set, train_batches, cfg.cpu_workers, backend.pin_memory),
            make_loader(val_set, val_batches, cfg.cpu_workers, backend.pin_memory))


# --------------------------------------------------------------------------- batches

PACKED_ROWS_STEP = 8  # on XLA: one compiled graph per multiple of 8 rows that occurs


class ReviewBatches(torch.utils.data.Dataset):
    """Indexed by a list of example indices, returns the whole batch in a few tensor ops.

    `packed=True` lays the reviews end to end in as few rows of `max_seq_length` as they
    fit in (see `pack`), each review seeing only itself: the loss and its gradients are
    those of the padded batch, with the transformer's work on padding mostly gone. A
    packed batch has `review_ids` (which review of the batch each position holds, -1 on
    padding) and `position_ids` (restarting at 0 with each review) where a padded batch
    has `attention_mask`. In both, `labels` is -100 on padding and on an example's untrained
    prompt (its columns before `features.trained_from`); in packed rows also at each
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

    def trained_from(self, indices):
        """The first trained column of each example of `indices` (0: all are trained)."""
        if self.features.trained_from is None:
            return torch.zeros(len(indices), dtype=torch.long)
        return self.features.trained_from[indices].long()

    def padded_batch(self, indices):
        lengths = self.features.lengths[indices].long()
        trained_from = self.trained_from(indices)
        width = self.features.input_ids.shape[1] if self.fixed_shape else int(lengths.max())
        input_ids = self.features.input_ids[indices, :width].long()
        if self.fixed_shape and len(indices) < self.batch_size:
            missing = self.batch_size - len(indices)
            input_ids = torch.cat([input_ids,
                                   input_ids.new_full((missing, width), self.pad_token_id)])
            lengths = torch.cat([lengths, lengths.new_zeros(missing)])
            trained_from = torch.cat([trained_from, trained_from.new_zeros(missing)])
        columns = torch.arange(width)
        real = columns < lengths[:, None]
        trained = real & (columns >= trained_from[:, None])
        return {"input_ids": input_ids,
                "attention_mask": real.long(),
                "labels": input_ids.masked_fill(~trained, -100)}

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
        # No target at padding, on an untrained prompt, nor at a review's first token: the
        # token before it belongs to another review, which must not learn to predict it.
        first_target = torch.zeros(rows * width, dtype=torch.long)
        first_target[where] = self.trained_from(indices).clamp(min=1)[:, None].expand(
            -1, width)[real]
        labels = input_ids.masked_fill((review_ids < 0) | (position_ids < first_target), -100)
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

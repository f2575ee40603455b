"""Polarity accuracy: the fine-tuned model read as a classifier. A review is called positive
when log p(review</s> | 긍정) > log p(review</s> | 부정), scoring the review's tokens and
`</s>`, never the polarity word itself.
"""
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from corpus.features import POLARITY, Features
from model import WITHOUT_LOGITS, output_layer_at, splits_off_output_layer
from runtime.errors import InputError
from task.generation import check_fits, prompt_ids, tokens


def word_lengths(tokenizer):
    """The tokens of each polarity word alone, by label."""
    return {label: prompt_ids(tokenizer, word).shape[1] for label, word in POLARITY.items()}


def check_scoring_fits(positions, tokenizer, max_seq_length,
                       fix="use --max_seq_length {room} or less"):
    """Before scoring: a row of `max_seq_length` tokens holds a review after its own
    polarity word; scoring puts either word in front of it, so a longer other word runs it
    that much further (see `strip_polarity`). Checked with `check_fits`."""
    lengths = word_lengths(tokenizer).values()
    extra = max(lengths) - min(lengths)
    check_fits(positions, extra, max_seq_length, f"--max_seq_length {max_seq_length}",
               extra and f"the {tokens(extra)} that polarity scoring adds before a review cut "
                         f"for the shorter polarity word", fix)


def strip_polarity(features, tokenizer, max_examples=None):
    """Reviews of labelled `features` without their polarity word: Features whose rows are
    `review</s>`, left-aligned, the labels kept. With `max_examples`, only that many, spread
    evenly over the file: the first ones could all share a polarity in a file sorted by label.

    The cached rows are `polarity review</s>`, tokenized in one piece; the tokenizer splits
    words at spaces before it merges pieces, so each row starts with exactly the tokens of
    its polarity word alone, whatever their number (checked here).

    The rows are as much narrower as the shorter word: with either word in front (see
    `review_log_prob`) a row is then as wide as `features`' rows when the words are of one
    length, so a `max_seq_length` that fits the model's positions fits them here too, in
    fixed shapes (XLA) as well."""
    chosen = torch.tensor(data.spread(len(features), max_examples))
    input_ids, lengths = features.input_ids[chosen], features.lengths[chosen]
    labels = features.labels[chosen]
    width = input_ids.shape[1]
    reviews = input_ids.new_full((len(chosen), width - min(word_lengths(tokenizer).values())),
                                 tokenizer.pad_token_id)
    review_lengths = lengths.clone()
    for label, word in POLARITY.items():
        prefix = prompt_ids(tokenizer, word)[0].to(input_ids.dtype)
        rows = labels == label
        if not (input_ids[rows, :len(prefix)] == prefix).all():
            raise InputError(f"the tokenizer joins the polarity word {word!r} to the review "
                             f"that follows it, so the review cannot be scored on its own")
        reviews[rows, :width - len(prefix)] = input_ids[rows, len(prefix):]
        review_lengths[rows] -= len(prefix)
    return Features(reviews, review_lengths, labels)


class PolarityBatches(data.ReviewBatches):
    """Batches of reviews without their polarity word (see `strip_polarity`), and under
    "polarity" each row's label: -1 on the all-padding rows that fixed shapes add. Every
    real token is scored, the first one too (after the polarity word that `review_log_prob`
    puts in front): "review_positions" lists them all, but for fixed shapes."""

    def __init__(self, features, tokenizer, max_examples, fixed_shape, batch_size):
        super().__init__(strip_polarity(features, tokenizer, max_examples),
                         tokenizer.pad_token_id, fixed_shape, batch_size)

    def __getitem__(self, indices):
        batch = super().__getitem__(indices)
        polarity = self.features.labels[torch.as_tensor(indices, dtype=torch.long)].long()
        batch["polarity"] = F.pad(polarity, (0, len(batch["input_ids"]) - len(polarity)), value=-1)
        if batch.pop("target_positions", None) is not None:
            batch["review_positions"] = batch["attention_mask"].flatten().nonzero()[:, 0]
        return batch


def review_log_prob(model, prefix, batch):
    """log p(review</s> | prefix) for each row of a PolarityBatches batch: `prefix` (token
    ids) goes in front of every review, and only the review's tokens are scored."""
    rows, width = batch["input_ids"].shape
    prefix = prefix.expand(rows, -1)
    input_ids = torch.cat([prefix, batch["input_ids"]], dim=1)
    attention_mask = torch.cat([torch.ones_like(prefix), batch["attention_mask"]], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "review_positions" not in batch or not splits_off_output_layer(model):  # every position
        targets = torch.cat([torch.full_like(prefix, -100), batch["labels"]], dim=1)
        logits = model(**inputs).logits
        # Position t predicts token t+1; -100 (the prefix, padding) scores 0.
        return -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets[:, 1:],
                                ignore_index=-100, reduction="none").sum(dim=1)
    # Logits only before each review token: review column j is predicted by the position
    # just before it, column prefix_length - 1 + j of input_ids.
    where = batch["review_positions"]
    row, column = where // width, where % width
    hidden = model(**inputs, **WITHOUT_LOGITS).hidden_states[-1]
    logits = output_layer_at(model, hidden, row * input_ids.shape[1] + prefix.shape[1] - 1 + column)
    token_log_probs = -F.cross_entropy(logits.float(), batch["labels"].flatten()[where],
                                       reduction="none")
    return torch.zeros(rows, device=logits.device).index_add(0, row, token_log_probs)


@torch.no_grad()
def polarity_counts(model, tokenizer, batches):
    """(correct, total) over PolarityBatches `batches` already on the model's device, as
    tensors there: no host read, so that XLA runs it as a few whole graphs."""
    device = model.device
    prefixes = {label: prompt_ids(tokenizer, word).to(device) for label, word in POLARITY.items()}
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches:
        positive = review_log_prob(model, prefixes[1], batch)
        negative = review_log_prob(model, prefixes[0], batch)
        predicted = (positive > negative).long()  # a tie counts as negative
        real = batch["polarity"] >= 0
        correct += ((predicted == batch["polarity"]) & real).sum()
        total += real.sum()
    return correct, total


def polarity_accuracy(model, tokenizer, features, backend, batch_size, max_examples=None,
                      workers=0):
    """The share of reviews of `features` (`max_examples` of them, spread over the file)
    whose polarity the model (in eval mode) gets right. Every replica of `backend` (see
    runtime/backends.py) scores its share, in batches of one shape on XLA, and the counts
    are summed."""
    dataset = PolarityBatches(features, tokenizer, max_examples, backend.fixed_shapes, batch_size)
    index_batches = data.eval_batches(len(dataset), batch_size, backend.world_size, backend.rank)
    loader = data.make_loader(dataset, index_batches, workers, backend.pin_memory)
    batches = tqdm(backend.feed(loader), "polarity accuracy", len(loader), leave=False,
                   disable=None if backend.is_master else True)  # None: off when not a terminal
    with backend.autocast():
        counts = polarity_counts(model, tokenizer, backend.stoppable(batches))
    correct, total = backend.all_reduce_sum(torch.stack(counts)).tolist()  # one host read
    return correct / total

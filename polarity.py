"""Writing reviews of a polarity, and measuring how well the model keeps the polarities
apart: shared by train.py (its evaluations) and generate.py (the command line).

The model is given exactly what training gave it: `긍정 prompt` tokenized without special
tokens, with no token_type_ids, and it writes until `</s>`. Polarity accuracy calls a review
positive when log p(review</s> | 긍정) > log p(review</s> | 부정), scoring the review's
tokens and `</s>`, never the polarity word itself. Control accuracy is the share of reviews
the model writes that an independent judge (judge.py) finds in the polarity asked for.
"""
import functools

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import judge
from data import POLARITY, InputError
from model import logits_at

from options import GUIDANCE, SAMPLING

CONTROL_SAMPLES = 100  # reviews of each polarity written and judged at the final evaluation


# --------------------------------------------------------------------------- writing reviews

def prompt_ids(tokenizer, polarity, prompt=""):
    """Token ids [1, n] that start a review the way training started one: `polarity prompt`
    with no special tokens. With no prompt the polarity word stands alone: `"긍정 "` would
    add a token for the trailing space, which training never put there."""
    text = f"{polarity} {prompt.strip()}".strip()
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def other_word(polarity):
    """The polarity word that is not `polarity`."""
    return next(word for word in POLARITY.values() if word != polarity)


def guidance_arguments(tokenizer, polarity, prompt, guidance, rows, device):
    """`generate`'s arguments for classifier-free guidance that contrasts `polarity` with
    the other word: the next token's log-probabilities become
    u + guidance * (c - u), c given `polarity prompt` and u given `other prompt`.
    transformers runs the other word's branch itself, with a cache of its own, one row per
    sequence generated (it does not expand the negative prompt to num_return_sequences)."""
    if guidance == 1 or not polarity:  # no other word to contrast with a model without labels
        return {}
    negative = prompt_ids(tokenizer, other_word(polarity), prompt).to(device).expand(rows, -1)
    return dict(guidance_scale=float(guidance), negative_prompt_ids=negative,
                negative_prompt_attention_mask=torch.ones_like(negative))


@torch.no_grad()
def write_reviews(model, tokenizer, polarity, settings, prompt="", num_samples=1, seed=0,
                  guidance=1.0):
    """`num_samples` reviews of `polarity` (a POLARITY word, or "" for a model trained
    without labels) that continue `prompt`, from one batched `generate` call, each decoded
    without the polarity word. `settings` are `generate`'s sampling arguments (SAMPLING);
    `guidance` above 1 steers the reviews towards `polarity` (see `guidance_arguments`).

    Temperature 0 is greedy decoding, the likeliest token each time: it has no randomness,
    so it writes one review whatever `num_samples`, and temperature, top_k and top_p have
    nothing to act on (they are left out: transformers refuses or warns about them).

    The same seed gives the same reviews, and the caller's random state is left as it
    was, so that training goes on exactly as if no samples had been drawn."""
    greedy = settings.get("temperature") == 0
    if greedy:
        settings = {name: value for name, value in settings.items()
                    if name not in ("temperature", "top_k", "top_p")}
        num_samples = 1
    input_ids = prompt_ids(tokenizer, polarity, prompt).to(model.device)
    guided = guidance_arguments(tokenizer, polarity, prompt, guidance, num_samples, model.device)
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                do_sample=not greedy, num_return_sequences=num_samples,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **guided, **settings)
    # Whitespace splits the polarity word from the prompt, so it is the same tokens alone.
    skip = prompt_ids(tokenizer, polarity).shape[1] if polarity else 0
    return [tokenizer.decode(row[skip:], skip_special_tokens=True).strip() for row in output]


# --------------------------------------------------------------------------- polarity accuracy

def strip_polarity(features, tokenizer, max_examples=None):
    """Reviews of labelled `features` without their polarity word: Features whose rows are
    `review</s>`, left-aligned, the labels kept. With `max_examples`, only that many, spread
    evenly over the file: the first ones could all share a polarity in a file sorted by label.

    The cached rows are `polarity review</s>`, tokenized in one piece; the tokenizer splits
    words at spaces before it merges pieces, so each row starts with exactly the tokens of
    its polarity word alone, whatever their number (checked here)."""
    n = len(features) if max_examples is None else min(max_examples, len(features))
    chosen = torch.arange(n) * len(features) // n
    input_ids, lengths = features.input_ids[chosen], features.lengths[chosen]
    labels = features.labels[chosen]
    reviews = torch.full_like(input_ids, tokenizer.pad_token_id)
    review_lengths = lengths.clone()
    width = input_ids.shape[1]
    for label, word in POLARITY.items():
        prefix = prompt_ids(tokenizer, word)[0].to(input_ids.dtype)
        rows = labels == label
        if not (input_ids[rows, :len(prefix)] == prefix).all():
            raise InputError(f"the tokenizer joins the polarity word {word!r} to the review "
                             f"that follows it, so the review cannot be scored on its own")
        reviews[rows, :width - len(prefix)] = input_ids[rows, len(prefix):]
        review_lengths[rows] -= len(prefix)
    return data.Features(reviews, review_lengths, labels)


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
    if "review_positions" not in batch:  # XLA: every position, one shape
        targets = torch.cat([torch.full_like(prefix, -100), batch["labels"]], dim=1)
        logits = logits_at(model, inputs).unflatten(0, (rows, -1))
        # Position t predicts token t+1; -100 (the prefix, padding) scores 0.
        return -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets[:, 1:],
                                ignore_index=-100, reduction="none").sum(dim=1)
    # Logits only before each review token: review column j is predicted by the position
    # just before it, column prefix_length - 1 + j of input_ids.
    where = batch["review_positions"]
    row, column = where // width, where % width
    logits = logits_at(model, inputs, row * input_ids.shape[1] + prefix.shape[1] - 1 + column)
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
    backend.py) scores its share, in batches of one shape on XLA, and the counts are summed."""
    dataset = PolarityBatches(features, tokenizer, max_examples, backend.fixed_shapes, batch_size)
    index_batches = data.eval_batches(len(dataset), batch_size, backend.world_size, backend.rank)
    loader = data.make_loader(dataset, index_batches, workers, backend.pin_memory)
    batches = tqdm(backend.feed(loader), "polarity accuracy", len(loader), leave=False,
                   disable=None if backend.is_master else True)  # None: off when not a terminal
    with backend.autocast():
        counts = polarity_counts(model, tokenizer, backend.stoppable(batches))
    correct, total = backend.all_reduce_sum(torch.stack(counts)).tolist()  # one host read
    return correct / total


# --------------------------------------------------------------------------- control accuracy

def control_accuracy(model, tokenizer, judge_, num_samples, seed, guidance=GUIDANCE,
                     settings=SAMPLING):
    """The share of `num_samples` reviews written for each polarity that `judge_` (see
    judge.py) finds in the polarity asked for; also the reviews, by label."""
    reviews = {label: write_reviews(model, tokenizer, word, settings, "", num_samples, seed,
                                    guidance)
               for label, word in POLARITY.items()}
    right = sum(predicted == label for label, texts in reviews.items()
                for predicted in judge_.predict(texts))
    return right / sum(len(texts) for texts in reviews.values()), reviews


@functools.lru_cache(maxsize=4)
def judge_of(train_file, val_file, cache_dir):
    return judge.load_judge(train_file, val_file, cache_dir)


def corpus_judge(args, corpus=None):
    """The judge of control accuracy for train.py's corpus (`args`): trained on its training
    file, checked on its validation file; None for a corpus without labels (given `corpus`,
    its features, the files are not read to find out)."""
    if corpus is not None and corpus[0].labels is None:
        return None
    files = data.corpus_files(args.downstream_corpus_root_dir, args.downstream_corpus_name,
                              args.train_file, args.val_file)
    return judge_of(*files, args.cache_dir)


def written_reviews(model, tokenizer, backend, args, final):
    """What train.py's evaluations show of the reviews the model writes, on the master only
    (on the CPU for XLA: see backend.generation_model): one short review of each polarity,
    and at the `final` evaluation (unless --polarity_eval_size 0) the control accuracy of
    CONTROL_SAMPLES of each, with the judge's own accuracy beside it. Seeded, and drawn
    without touching the training RNG, so a run with samples trains exactly as one without.
    Only at the end: that is 200 reviews, each token computed twice under guidance."""
    if not backend.is_master:
        return {}
    model = backend.generation_model(model)
    result = {"samples": one_review_each(model, tokenizer, args.seed)}
    if final and args.polarity_eval_size:
        judge_ = corpus_judge(args)
        result["control_accuracy"], _ = control_accuracy(model, tokenizer, judge_,
                                                         CONTROL_SAMPLES, args.seed)
        result["judge_accuracy"] = judge_.val_accuracy
    return result


def one_review_each(model, tokenizer, seed, max_new_tokens=20, guidance=GUIDANCE):
    """One short review of each polarity, as train.py shows at each evaluation."""
    settings = {**SAMPLING, "max_new_tokens": max_new_tokens}
    return {word: write_reviews(model, tokenizer, word, settings, seed=seed, guidance=guidance)[0]
            for word in POLARITY.values()}

"""An independent judge of a review's polarity: a character 1-3-gram naive Bayes classifier
trained on the training file. It is not the language model, so it can check whether the
reviews the model *writes* have the polarity that was asked for (control accuracy).

Naive Bayes on character n-grams suits Korean reviews: no tokenizer to share with the model,
and endings such as "최고" or "ㅋㅋ" are a few characters each. It is trained once per training
file and cached beside the tokenized corpus, as plain tensors and strings, keyed by the
file's bytes.
"""
import hashlib
import math
import sys
from collections import Counter
from pathlib import Path

import torch

from corpus.features import load_cached
from corpus.read import read_corpus
from runtime.errors import InputError, add_file_bytes, first_line, write_atomically

NGRAM_SIZES = (1, 2, 3)
SMOOTHING = 1.0   # add-one (Laplace): an n-gram seen in one polarity only is not infinitely telling
JUDGE_VERSION = 1  # bump when the features or the cached layout change


def char_ngrams(text):
    """The distinct character n-grams of `text`, spaces collapsed, with a space at each end
    so that a review's first and last characters make n-grams of their own. Each counts
    once per review: a review that repeats "ㅋ" ten times is not ten times as positive."""
    text = f" {' '.join(text.split())} "
    return {text[i:i + n] for n in NGRAM_SIZES for i in range(len(text) - n + 1)}


class Judge:
    """Calls a text positive when log p(positive | its n-grams) > log p(negative | them)."""

    def __init__(self, ngrams, weights, prior):
        self.weights = dict(zip(ngrams, weights.tolist()))  # n-gram -> log p(g|pos)/p(g|neg)
        self.prior = prior                                  # log p(pos)/p(neg)

    def score(self, text):
        weights = self.weights
        return self.prior + sum(weights.get(g, 0.0) for g in char_ngrams(text))

    def predict(self, texts):
        """1 (positive) or 0 (negative) for each text; a tie counts as negative."""
        return [int(self.score(text) > 0) for text in texts]

    def accuracy(self, texts, labels):
        predicted = self.predict(texts)
        return sum(p == label for p, label in zip(predicted, labels)) / len(labels)


def train_judge(texts, labels):
    """Counts of each n-gram's reviews per polarity, turned into log-likelihood ratios: the
    judge as plain tensors and strings (its cached form). `labels` hold both polarities
    (`labelled_reviews` checks)."""
    counts = {0: Counter(), 1: Counter()}
    for text, label in zip(texts, labels):
        counts[label].update(char_ngrams(text))
    ngrams = sorted(counts[0].keys() | counts[1].keys())
    per_label = {label: torch.tensor([counts[label][g] for g in ngrams], dtype=torch.float64)
                 for label in (0, 1)}
    log_p = {label: (c + SMOOTHING).log() - math.log(c.sum() + SMOOTHING * len(ngrams))
             for label, c in per_label.items()}
    positive = sum(labels)
    return {"ngrams": ngrams, "weights": (log_p[1] - log_p[0]).float(),
            "prior": math.log(positive / (len(labels) - positive)), "version": JUDGE_VERSION}


def load_judge(train_file, val_file, cache_dir, skip=None):
    """The judge trained on the labelled `train_file`, its own accuracy on `val_file` in
    `val_accuracy`; trained and measured once, then read from the cache. `skip`: how the
    caller's command line does without the judge, said when the files cannot make one."""
    key = hashlib.sha256()
    for path in (train_file, val_file):
        add_file_bytes(key, path)
    key.update(f"{NGRAM_SIZES}|{SMOOTHING}|{JUDGE_VERSION}".encode())
    path = Path(cache_dir).expanduser() / f"judge-{Path(train_file).stem}-{key.hexdigest()[:16]}.pt"
    saved = load_cached(path, judge_problem, instead="training the judge again")
    if saved is None:
        try:
            saved = train_judge(*labelled_reviews(train_file, both_polarities=True))
            saved["val_accuracy"] = Judge(**judge_fields(saved)).accuracy(
                *labelled_reviews(val_file))
        except InputError as e:
            raise InputError(f"{e}; {skip}" if skip else str(e)) from None
        try:
            write_atomically(path, lambda tmp: torch.save(saved, tmp))
        except (OSError, RuntimeError) as e:
            print(f"warning: could not cache the judge in {path.parent} ({first_line(e)});"
                  f" the next run will train it again", file=sys.stderr)
    judge = Judge(**judge_fields(saved))
    judge.val_accuracy = saved["val_accuracy"]
    return judge


def judge_fields(saved):
    return {name: saved[name] for name in ("ngrams", "weights", "prior")}


def labelled_reviews(path, both_polarities=False):
    reviews = read_corpus(path)
    if reviews.labels is None or not reviews.texts:
        raise InputError(f"{path}: no labelled reviews, so no judge of polarity can be "
                         f"trained or checked on it")
    if both_polarities and len(set(reviews.labels)) == 1:
        polarity = "positive" if reviews.labels[0] else "negative"
        raise InputError(f"{path}: every review is {polarity}, and the judge of control "
                         f"accuracy learns from both polarities")
    return reviews.texts, reviews.labels


def judge_problem(saved):
    """What keeps `saved` from being a judge of this version; None when nothing does."""
    try:
        ok = (saved["version"] == JUDGE_VERSION and isinstance(saved["ngrams"], list)
              and isinstance(saved["weights"], torch.Tensor)
              and saved["weights"].shape == (len(saved["ngrams"]),)
              and all(isinstance(saved[name], float) for name in ("prior", "val_accuracy")))
    except (TypeError, KeyError):
        ok = False
    return None if ok else "not a judge of this version"

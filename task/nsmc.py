"""The NSMC task's part of an evaluation, the hook that train.py's `evaluate` calls after the
validation loss: polarity accuracy, one short review of each polarity, and at the final
evaluation the control accuracy of the reviews the model writes. A loop for another task
replaces this class with its own `evaluate(model, backend, final)`."""
import functools
from dataclasses import dataclass

from corpus.features import POLARITY
from task import GUIDANCE, SAMPLING
from task.generation import (SAMPLE_TOKENS, check_fits, control_accuracy, one_review_each,
                             prompt_length, tokens)
from task.judge import load_judge
from task.polarity import check_scoring_fits, polarity_accuracy

CONTROL_SAMPLES = 100  # reviews of each polarity written and judged at the final evaluation
SKIP_JUDGE = "--polarity_eval_size 0 trains without it (and without polarity accuracy)"


@dataclass
class TaskConfig:
    """train.py's flags of the same names."""
    polarity_eval_size: int = 500   # validation reviews scored (0: none, nor control accuracy)
    batch_size: int = 32
    cpu_workers: int = 0
    seed: int = 7                   # the samples' seed
    cache_dir: str = "~/.cache/kogpt2-nsmc"


class NsmcTask:
    """Evaluates a model on labelled validation features; a corpus without labels (plain
    text, no polarity words) has nothing of this to evaluate."""

    def __init__(self, cfg, tokenizer, val_features, train_file, val_file):
        self.cfg, self.tokenizer, self.val_features = cfg, tokenizer, val_features
        self.files = (train_file, val_file)
        self.labelled = val_features.labels is not None

    def prepare(self, positions):
        """Work done once on each host before its replicas start: check that what the
        evaluations run through the model fits its `positions`, and train the judge of
        control accuracy (and cache it) when the final evaluation will use it."""
        self.check_positions(positions)
        if self.labelled and self.cfg.polarity_eval_size:
            self.judge()

    def check_positions(self, positions):
        """Before the first step: the reviews each evaluation writes, and at the final one
        the control accuracy's, and the rows polarity scoring reads, all fit the model's
        `positions`, so that no run fails at its first evaluation or after its last step."""
        if not self.labelled:
            return
        given = prompt_length(self.tokenizer, list(POLARITY.values()), "", GUIDANCE)
        word = f"the {tokens(given)} of the polarity word"
        check_fits(positions, given, SAMPLE_TOKENS,
                   f"the short review that each evaluation writes, {SAMPLE_TOKENS} tokens,", word,
                   "--pretrained_model_name: use a model with {need} positions or more")
        if self.cfg.polarity_eval_size:
            new = SAMPLING["max_new_tokens"]
            check_fits(positions, given, new, f"each review that control accuracy writes, {new} "
                       f"tokens,", word, "use --polarity_eval_size 0 (no polarity or "
                       "control accuracy), or a model with {need} positions or more")
            check_scoring_fits(positions, self.tokenizer, self.val_features.input_ids.shape[1],
                               "use --max_seq_length {room} or less, or --polarity_eval_size 0")

    def judge(self):
        """The judge: trained on the training file, checked on the validation file."""
        return judge_of(*self.files, self.cfg.cache_dir, SKIP_JUDGE)

    def evaluate(self, model, backend, final):
        """Polarity accuracy (every replica scores its share), and what `written_reviews`
        shows; the model is in eval mode."""
        if not self.labelled:
            return {}
        result = {}
        if self.cfg.polarity_eval_size:
            result["polarity_accuracy"] = polarity_accuracy(
                model, self.tokenizer, self.val_features, backend, self.cfg.batch_size,
                self.cfg.polarity_eval_size, self.cfg.cpu_workers)
        generation_model = backend.generation_model(model)  # --fsdp: every replica gathers
        if backend.is_master:
            result.update(self.written_reviews(generation_model, final))
        return result

    def written_reviews(self, model, final):
        """One short review of each polarity, and at the `final` evaluation (unless
        --polarity_eval_size 0) the control accuracy of CONTROL_SAMPLES of each, with the
        judge's own accuracy beside it. Seeded, and drawn without touching the training RNG,
        so a run with samples trains exactly as one without. The control accuracy only at
        the end: that is 200 reviews, each token computed twice under guidance."""
        result = {"samples": one_review_each(model, self.tokenizer, self.cfg.seed)}
        if final and self.cfg.polarity_eval_size:
            judge = self.judge()
            result["control_accuracy"], _ = control_accuracy(model, self.tokenizer, judge,
                                                             CONTROL_SAMPLES, self.cfg.seed)
            result["judge_accuracy"] = judge.val_accuracy
        return result


@functools.lru_cache(maxsize=4)
def judge_of(train_file, val_file, cache_dir, skip=None):
    """The judge of these files, trained or read from the cache once per process. `skip`:
    the flag that does without it (see `load_judge`)."""
    return load_judge(train_file, val_file, cache_dir, skip)

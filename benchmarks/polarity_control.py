"""Polarity control, measured: fine-tune a model with train.py, then

  (1) the guidance table: for each classifier-free guidance scale G, the control accuracy
      of reviews written at G (the share an independent judge, judge.py, finds in the
      polarity asked for), their diversity (distinct-1 and distinct-2: distinct token
      n-grams over all n-grams of the samples) and their fluency (mean NLL per token of
      the samples under the same model without guidance, given their polarity word);
  (2) ours against the seed's recipe at the same budget: the seed trained padding as text
      (pad_token = </s>, labels = input_ids, no -100), ours appends </s> once and masks the
      padding. Both are compared on one validation NLL, ours (every real token, padding
      excluded), and on likelihood polarity accuracy and control accuracy.

    python benchmarks/polarity_control.py \\
        --pretrained_model_name ../shared/models/kogpt2-standin \\
        --downstream_corpus_root_dir ../shared/data

Both fine-tunes run as `python train.py` processes (the seed's recipe through this script's
--as_seed_recipe, which swaps in its batches and nothing else). A fine-tune whose last
checkpoint is already in --work_dir is reused, so the tables can be printed again cheaply.
The validation file is every k-th review of ratings_test.txt (--val_reviews of them), for
training-time evaluations and for the comparison alike.
"""
import sys
from pathlib import Path

# train.py and its modules live one folder up; first on the path, because our sched.py
# shares its name with a module of Python's standard library.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from corpus import features as corpus_features  # noqa: E402
from corpus import read as corpus_read  # noqa: E402
import options  # noqa: E402
import task  # noqa: E402
from options import check_at_least, check_positive, require  # noqa: E402
from runtime.backends import Backend, choose_device  # noqa: E402
from runtime.errors import InputError, print_on_any_terminal  # noqa: E402
import task.generation  # noqa: E402
import task.nsmc  # noqa: E402
import task.polarity  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from model import load_model, load_tokenizer, max_positions  # noqa: E402


def parse_args(argv=None):
    p = options.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name", default="../shared/models/kogpt2-standin",
                   help="the model to fine-tune (documented default: the workplace's "
                        "stand-in, a small pretrained Korean GPT-2 with KoGPT2's tokenizer kind)")
    p.add_argument("--downstream_corpus_root_dir", default="../shared/data",
                   help="holds nsmc/ratings_train.txt and nsmc/ratings_test.txt")
    p.add_argument("--work_dir", default="/tmp/polarity-control",
                   help="fine-tuned models and the validation file; finished runs are reused")
    p.add_argument("--cache_dir", default=str(options.default_cache_dir()))
    p.add_argument("--max_steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--max_seq_length", type=int, default=32)
    p.add_argument("--val_reviews", type=int, default=5000,
                   help="validation reviews, spread over ratings_test.txt (0: all 50,000)")
    p.add_argument("--samples", type=int, default=300, help="reviews written per polarity and G")
    p.add_argument("--guidance", type=float, nargs="+", default=[1, 1.5, 2, 3, 4])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", choices=["auto", "xla", "cuda", "cpu"], default="auto",
                   help="train.py's --device for the fine-tunes")
    p.add_argument("--skip_seed_recipe", action="store_true", help="print the G table only")
    return p.parse_args(argv)


def check_args(args):
    """What cannot work, refused in one line before the first fine-tune: the flags as
    train.py and generate.py check theirs, the device, the corpus."""
    check_at_least(1, args, "max_steps", "batch_size", "max_seq_length", "samples")
    check_at_least(0, args, "val_reviews", note=" (0: all)")
    check_positive(args, "learning_rate")
    for guidance in args.guidance:
        require(1 <= guidance <= task.FACTORS[1], "guidance", guidance,
                f"from 1 to {task.FACTORS[1]:g} (1: off) for every value")
    require(0 <= args.seed < 2**32, "seed", args.seed, "between 0 and 2**32 - 1")
    choose_device(args.device)
    for path in corpus_read.corpus_files(args.downstream_corpus_root_dir):
        if corpus_read.read_corpus(path).labels is None:
            raise InputError(f"{path}: no labels, so there is no polarity to control")


# --------------------------------------------------------------------------- the seed's recipe

class SeedRecipeBatches(data.ReviewBatches):
    """The tutorial's batches: every row padded to max_seq_length with </s> (its pad_token
    was eos), and labels = input_ids, so the padding is trained as text."""

    def __getitem__(self, indices):
        self.fixed_shape = True  # padding="max_length"
        batch = super().__getitem__(indices)
        input_ids = batch["input_ids"].masked_fill(batch["labels"] == -100, self.eos_token_id)
        return {"input_ids": input_ids, "attention_mask": batch["attention_mask"],
                "labels": input_ids}


def train_as_seed_recipe(argv):
    """train.py's main with the seed's batches for training and its evaluations' loss."""
    model_name = options.parse_args(argv).pretrained_model_name
    SeedRecipeBatches.eos_token_id = load_tokenizer(model_name).eos_token_id
    data.ReviewBatches, ours = SeedRecipeBatches, data.ReviewBatches  # what data.loaders builds
    try:
        return train.main(argv + ["--no_packing"])  # padded, as the seed's batches are
    finally:
        data.ReviewBatches = ours


# --------------------------------------------------------------------------- fine-tuning

def validation_file(args, work):
    """Every k-th review of ratings_test.txt, in NSMC's layout, so both labels stay even."""
    lines = (Path(args.downstream_corpus_root_dir).expanduser() / "nsmc" /
             "ratings_test.txt").read_text(encoding="utf-8").splitlines()
    reviews = lines[1:]
    step = max(1, len(reviews) // args.val_reviews) if args.val_reviews else 1
    path = work / "val.txt"
    path.write_text("\n".join([lines[0], *reviews[::step]]) + "\n", encoding="utf-8")
    return path


def fine_tune(args, out, val_file, seed_recipe=False):
    """Run train.py (or the seed's recipe) unless `out` already holds its last checkpoint;
    returns the checkpoint and the run's seconds (None when reused)."""
    checkpoint = out / f"checkpoint-{args.max_steps}"
    if checkpoint.is_dir():
        return checkpoint, None
    train_file = Path(args.downstream_corpus_root_dir).expanduser() / "nsmc" / "ratings_train.txt"
    argv = ["--pretrained_model_name", args.pretrained_model_name, "--train_file",
            str(train_file), "--val_file", str(val_file), "--downstream_model_dir", str(out),
            "--cache_dir", args.cache_dir, "--max_steps", str(args.max_steps),
            "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--max_seq_length", str(args.max_seq_length), "--seed", str(args.seed),
            "--device", args.device, "--log_every", "50", "--overwrite_output_dir"]
    script = [__file__, "--as_seed_recipe"] if seed_recipe else [str(ROOT / "train.py")]
    started = time.perf_counter()
    subprocess.run([sys.executable, *script, *argv], cwd=ROOT, check=True)
    return checkpoint, time.perf_counter() - started


# --------------------------------------------------------------------------- measures

@torch.no_grad()
def validation_nll(model, tokenizer, features, batch_size=64):
    """Our validation loss: mean cross-entropy over every real token, padding excluded."""
    dataset = data.ReviewBatches(features, tokenizer.pad_token_id, False, batch_size)
    loss, tokens = 0.0, 0
    for indices in data.eval_batches(len(dataset), batch_size, 1, 0):
        batch = dataset[indices]
        loss += train.token_loss_sum(model, batch).item()
        tokens += train.count_targets(batch).item()
    return loss / tokens


def distinct(token_lists, n):
    """Distinct n-grams over all n-grams of the samples (Li et al., 2016)."""
    grams = [tuple(ids[i:i + n]) for ids in token_lists for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def fluency(model, tokenizer, reviews):
    """Mean NLL per token of review</s> given its polarity word, under `model` (unguided)."""
    nll, tokens = 0.0, 0
    for label, texts in reviews.items():
        texts = [text for text in texts if text.strip()]
        if not texts:
            continue
        features = corpus_features.encode(
            corpus_read.Reviews(texts, [label] * len(texts)),
            tokenizer,
            max_positions(model.config) or 1024,
        )
        dataset = task.polarity.PolarityBatches(features, tokenizer, None, False, 64)
        prefix = task.generation.prompt_ids(tokenizer, corpus_features.POLARITY[label])
        for indices in data.eval_batches(len(dataset), 64, 1, 0):
            batch = dataset[indices]
            nll -= task.polarity.review_log_prob(model, prefix, batch).sum().item()
            tokens += (batch["labels"] != -100).sum().item()
    return nll / tokens


def guidance_row(model, tokenizer, judge, args, guidance):
    accuracy, reviews = task.generation.control_accuracy(model, tokenizer, judge, args.samples,
                                                         args.seed, guidance)
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"]
                   for texts in reviews.values() for text in texts]
    return dict(guidance=guidance, control=accuracy, distinct1=distinct(token_lists, 1),
                distinct2=distinct(token_lists, 2),
                nll=fluency(model, tokenizer, reviews), examples=reviews)


def load(checkpoint):
    tokenizer = load_tokenizer(str(checkpoint))
    return load_model(str(checkpoint), tokenizer).eval(), tokenizer


# --------------------------------------------------------------------------- tables

def print_guidance_table(rows):
    print("\n| G | control accuracy | distinct-1 | distinct-2 | NLL/token (unguided model) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['guidance']:g} | {row['control']:.3f} | {row['distinct1']:.3f} | "
              f"{row['distinct2']:.3f} | {row['nll']:.3f} |")


def print_comparison(results):
    print(f"\n| recipe | val NLL (real tokens) | polarity accuracy (likelihood) | control "
          f"accuracy, G=1 | control accuracy, G={task.GUIDANCE:g} | fine-tune s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        seconds = "reused" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {name} | {r['val_nll']:.4f} | {r['polarity']:.3f} | {r['control_1']:.3f} | "
              f"{r['control_g']:.3f} | {seconds} |")


def measure_recipe(checkpoint, seconds, judge, val_features, args):
    model, tokenizer = load(checkpoint)
    control = {g: task.generation.control_accuracy(model, tokenizer, judge, args.samples,
                                                   args.seed, g)[0]
               for g in (1, task.GUIDANCE)}
    return dict(seconds=seconds, val_nll=validation_nll(model, tokenizer, val_features),
                polarity=task.polarity.polarity_accuracy(model, tokenizer, val_features,
                                                         Backend("cpu", "fp32"), 64),
                control_1=control[1], control_g=control[task.GUIDANCE])


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        return measure(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:  # train.py said why, in its last line
        print(f"error: the fine-tune stopped (exit status {e.returncode}); see above",
              file=sys.stderr)
        return 1


def measure(args):
    """Fine-tune, then print the tables."""
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    val_file = validation_file(args, work)
    train_file = Path(args.downstream_corpus_root_dir).expanduser() / "nsmc" / "ratings_train.txt"
    ours, ours_seconds = fine_tune(args, work / "ours", val_file)
    judge = task.nsmc.judge_of(train_file, val_file, args.cache_dir)
    print(f"judge: character 1-3-gram naive Bayes trained on {train_file}, "
          f"{judge.val_accuracy:.4f} accurate on {val_file}")

    model, tokenizer = load(ours)
    rows = [guidance_row(model, tokenizer, judge, args, g) for g in args.guidance]
    print(f"\nours, {args.max_steps} steps at batch {args.batch_size}, lr {args.learning_rate:g}; "
          f"{args.samples} reviews per polarity and G, seed {args.seed}, sampling "
          f"{json.dumps(task.SAMPLING)}")
    print_guidance_table(rows)
    for row in rows:
        if row["guidance"] in (1, task.GUIDANCE):
            print(f"\nG={row['guidance']:g}, first reviews: "
                  + " / ".join(texts[0] for texts in row["examples"].values()))
    unguided = next((row for row in rows if row["guidance"] == 1), None)
    chosen = next((row for row in rows if row["guidance"] == task.GUIDANCE), None)
    if unguided and chosen:
        print(f"\ndefault G={task.GUIDANCE:g}: control accuracy {chosen['control']:.3f} "
              f"(target 0.95), distinct-2 {chosen['distinct2'] / unguided['distinct2'] - 1:+.1%} "
              f"against unguided sampling (target within 10%)")
    if args.skip_seed_recipe:
        return 0

    seed, seed_seconds = fine_tune(args, work / "seed-recipe", val_file, seed_recipe=True)
    val_features = corpus_features.load_features(
        val_file, tokenizer, args.max_seq_length, args.cache_dir
    )
    results = {"ours": measure_recipe(ours, ours_seconds, judge, val_features, args),
               "seed's recipe": measure_recipe(seed, seed_seconds, judge, val_features, args)}
    print(f"\nthe same {args.max_steps} steps, batch {args.batch_size}, lr "
          f"{args.learning_rate:g}, seed {args.seed}; validation: {len(val_features):,} "
          f"reviews of {val_file}")
    print_comparison(results)
    return 0


if __name__ == "__main__":
    print_on_any_terminal()  # the reviews it prints are Hangul
    if sys.argv[1:2] == ["--as_seed_recipe"]:
        sys.exit(train_as_seed_recipe(sys.argv[2:]))
    sys.exit(main())

"""NSMC as classification by generation: a task of your own, written as prompts and responses.

Each labelled review becomes one JSON line, the review and a short question as the prompt and
the polarity word as the response, so that train.py trains the model to answer, not to write
reviews (the loss on the answer alone), and `generate.py --prompts_file` answers the test
reviews. The steps, as docs/adapting.md runs them:

    python examples/nsmc_classification.py --corpus NSMC/ratings_train.txt --out cls/train.jsonl
    python examples/nsmc_classification.py --corpus NSMC/ratings_test.txt --out cls/test.jsonl
    python train.py --train_file cls/train.jsonl --val_file cls/test.jsonl ...
    python generate.py --prompts_file cls/test.jsonl --temperature 0 ... > cls/answers.jsonl
    python examples/nsmc_classification.py --score cls/answers.jsonl --pairs cls/test.jsonl
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules

from corpus.features import POLARITY  # noqa: E402
from corpus.read import (Reviews, given_file, json_object, read_corpus,  # noqa: E402
                         read_prompts)
from model import load_tokenizer  # noqa: E402
from options import ArgumentParser, check_at_least  # noqa: E402
from runtime.errors import InputError, first_line, write_atomically  # noqa: E402

QUESTION = "\n이 리뷰는 긍정일까요, 부정일까요?"  # after the review: a long one loses its start


def parse_args(argv=None):
    p = ArgumentParser(description="NSMC as prompt/response pairs: review and question in, "
                                   "polarity word out; or score the answers to them.")
    p.add_argument("--corpus", help="a labelled corpus file in any layout train.py reads")
    p.add_argument("--out", help="the .jsonl file of pairs to write")
    p.add_argument("--max_examples", type=int, default=None,
                   help="write only the first N reviews (unset: all)")
    p.add_argument("--score", metavar="ANSWERS",
                   help="generate.py --prompts_file's output, to score against --pairs")
    p.add_argument("--pairs", help="--score: the .jsonl file the prompts came from")
    p.add_argument("--tokenizer", help="--score: the model's folder; each expected answer is "
                                       "compared as its tokenizer can write it (a character it "
                                       "lacks, an <unk>, drops out of the model's answers too)")
    return p.parse_args(argv)


def write_pairs(corpus, out, max_examples=None):
    """`corpus`'s labelled reviews as prompt/response lines in `out`; returns how many."""
    reviews = read_corpus(given_file("--corpus", corpus))
    if not isinstance(reviews, Reviews) or reviews.labels is None:
        raise InputError(f"--corpus {corpus}: no labels; give a labelled file (NSMC's layout, "
                         f"or review<TAB>label lines)")
    pairs = list(zip(reviews.texts, reviews.labels))[:max_examples]
    lines = [json.dumps({"prompt": text + QUESTION, "response": POLARITY[label]},
                        ensure_ascii=False) for text, label in pairs]
    try:
        write_atomically(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n",
                                                               encoding="utf-8"))
    except OSError as e:  # a full disk, a folder that cannot be made: nothing half-written
        raise InputError(f"--out {out}: could not write it ({first_line(e)})") from None
    return len(lines)


def accuracy(answers, pairs, tokenizer=None):
    """The share of the prompts of `pairs` whose answer in `answers` is their response (as
    `tokenizer`, when given, writes it)."""
    prompts, _ = read_prompts(given_file("--pairs", pairs))  # each line checked, bad ones named
    wanted = [value["response"] for value in json_lines(pairs)]
    if tokenizer:
        tok = load_tokenizer(tokenizer, flag="--tokenizer")
        wanted = [tok.decode(tok(w, add_special_tokens=False)["input_ids"],
                             skip_special_tokens=True).strip() for w in wanted]
    given = json_lines(given_file("--score", answers))
    if [answer.get("prompt") for answer in given] != prompts:
        raise InputError(f"--score {answers}: its prompts are not those of --pairs {pairs}, in "
                         f"order; answer that very file with generate.py --prompts_file")
    return sum(str(a.get("response")).strip() == w for a, w in zip(given, wanted)) / len(wanted)


def json_lines(path):
    """The objects of a JSON Lines file, blank lines skipped, a bad line named."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    return [json_object(path, number, line) for number, line in enumerate(lines, start=1)
            if line.strip()]


def main(argv=None):
    args = parse_args(argv)
    try:
        check_at_least(1, args, "max_examples")
        if args.score:
            if not args.pairs:
                raise InputError("--score needs --pairs, the file whose prompts were answered")
            print(f"accuracy: {accuracy(args.score, args.pairs, args.tokenizer):.4f}")
        elif args.corpus and args.out:
            count = write_pairs(args.corpus, args.out, args.max_examples)
            print(f"wrote {count:,} pairs to {args.out}")
        else:
            raise InputError("give --corpus and --out to write pairs, or --score and --pairs")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Use a model fine-tuned by train.py: write positive or negative reviews on request, and
measure how well the model keeps the two polarities apart.

    python generate.py                                   # 5 positive, then 5 negative reviews
    python generate.py --polarity 부정 --prompt "이 영화" --num_samples 3
    python generate.py --evaluate                        # polarity and control accuracy
    python generate.py --guidance 1                      # sampling without guidance
    python generate.py --prompts_file questions.jsonl    # a model trained on a .jsonl corpus

The model is given exactly what training gave it: `긍정 prompt` tokenized without special
tokens, with no token_type_ids, and it writes until `</s>`. Sampling runs on a GPU when
there is one, else on the CPU, also for a model trained on a TPU: `generate` on an XLA
device compiles a new graph for almost every token.

Polarity accuracy reads the fine-tuned model as a classifier: a review is called positive
when log p(review</s> | 긍정) > log p(review</s> | 부정), scoring the review's tokens and
`</s>`, never the polarity word itself. Control accuracy reads the reviews the model writes:
the share of them that an independent judge (judge.py, a character n-gram naive Bayes trained
on the training file) finds in the polarity asked for.

`--guidance G` steers each review towards its polarity with transformers' classifier-free
guidance, the other polarity word as the negative prompt (polarity.guidance_arguments).

A model trained on a .jsonl corpus of prompt/response pairs answers prompts instead (train.py
writes `prompt_response: true` into its config.json): each prompt is tokenized as training
tokenized it, and only the new tokens, the response, are printed.
"""
import argparse
import json
import math
import sys

import options
from options import (ArgumentParser, check_at_least, check_between, check_probability,
                     default_cache_dir, require)
from runtime.errors import print_on_any_terminal
from task import FACTORS, GUIDANCE, SAMPLING


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(
        description="Write positive or negative movie reviews with a fine-tuned KoGPT2, "
                    "or measure its polarity accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--downstream_model_dir", default="checkpoint-generation",
                   help="the model: train.py's --downstream_model_dir (its best model), one "
                        "of its checkpoint-<step>/ folders, or a hub name")
    p.add_argument("--polarity", default="both",
                   help="긍정 (positive), 부정 (negative), both, or none for a model trained "
                        "on texts without labels")
    p.add_argument("--prompt", default="",
                   help="the start of every review, to be continued; for a model trained on "
                        "prompt/response pairs (its config.json says prompt_response: true), "
                        "the prompt to answer: only the response is printed")
    p.add_argument("--prompts_file", default=None,
                   help="for a model trained on prompt/response pairs: a .jsonl file of "
                        "{\"prompt\": ...} lines, answered --batch_size at a time with "
                        "{\"prompt\": ..., \"response\": ...} lines on standard output")
    p.add_argument("--num_samples", type=int, default=5, help="reviews per polarity")
    p.add_argument("--max_new_tokens", type=int, default=SAMPLING["max_new_tokens"],
                   help="a review stops at </s> or after this many tokens; with the "
                        "polarity word and --prompt it must fit the model's positions "
                        "(KoGPT2 has 1024)")
    p.add_argument("--top_k", type=int, default=SAMPLING["top_k"],
                   help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=SAMPLING["top_p"],
                   help="... and among the fewest whose probabilities add up to p (1: off)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                   help="below 1: safer, more repetitive text; above 1: wilder; 0: greedy "
                        "decoding, the likeliest token each time (one review per polarity, "
                        "whatever --num_samples; --top_k, --top_p and --seed play no part)")
    p.add_argument("--repetition_penalty", type=float, default=SAMPLING["repetition_penalty"],
                   help="divides the odds of tokens already written (1: off; below 1: "
                        "favours them)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=SAMPLING["no_repeat_ngram_size"],
                   help="never repeat a run of this many tokens (0: off)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance: how far each token is pushed from what the "
                        f"other polarity word would write (1: off; unset: {GUIDANCE:g}, or 1 "
                        f"with --polarity none)")
    p.add_argument("--seed", type=int, default=7, help="the same seed writes the same reviews")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when available, else the CPU (also for a model trained "
                        "on a TPU: generate on XLA is very slow)")
    p.add_argument("--show_polarity", action="store_true",
                   help="print each review after its polarity word, as training saw it")
    p.add_argument("--evaluate", action="store_true",
                   help="print the polarity accuracy on the validation file, and the "
                        "control accuracy of reviews written by the model, instead")
    p.add_argument("--downstream_corpus_root_dir", default="~/Korpora",
                   help="--evaluate: holds nsmc/ratings_test.txt, the reviews scored")
    p.add_argument("--downstream_corpus_name", default="nsmc",
                   help="--evaluate: the corpus folder under --downstream_corpus_root_dir, "
                        "or the absolute path of one")
    p.add_argument("--val_file", default=None,
                   help="--evaluate: score this labelled file instead (any layout train.py reads)")
    p.add_argument("--train_file", default=None,
                   help="--evaluate: the labelled file the judge of control accuracy learns "
                        "from (unset: ratings_train.txt beside the validation file; with "
                        "--val_file, no control accuracy)")
    p.add_argument("--control_samples", type=int, default=100,
                   help="--evaluate: reviews written for each polarity and judged (0: none)")
    p.add_argument("--polarity_eval_size", type=int, default=None,
                   help="--evaluate: score only N reviews (or pairs), spread over the file "
                        "(unset: all)")
    p.add_argument("--max_seq_length", type=int, default=32,
                   help="--evaluate: reviews are cut to this many tokens, as in training")
    p.add_argument("--batch_size", type=int, default=32,
                   help="--evaluate: reviews per batch; --prompts_file: prompts per batch")
    p.add_argument("--cache_dir", default=str(default_cache_dir()),
                   help="where tokenized corpora are cached")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


if __name__ == "__main__":
    print_on_any_terminal()  # before --help, whose text holds Hangul
    parse_args()  # --help and a mistyped flag answered before torch loads
    options.keep_xla_unloaded("cpu")  # sampling never runs on XLA (see above)

import torch  # noqa: E402

from corpus.features import POLARITY, load_features  # noqa: E402
from corpus.read import NSMC_FILES, corpus_files, given_file, read_prompts  # noqa: E402
from data import ReviewBatches, spread  # noqa: E402
from model import load_model, load_tokenizer, max_positions, model_inputs  # noqa: E402
from runtime.backends import Backend, choose_device  # noqa: E402
from runtime.errors import InputError, not_utf8  # noqa: E402
from runtime.rundir import check_best_model  # noqa: E402
from task.generation import (check_fits, control_accuracy, prompt_length,  # noqa: E402
                             response_prompt_ids, tokens, write_responses, write_reviews)
from task.generation import reproduced_share  # noqa: E402
from task.nsmc import judge_of  # noqa: E402
from task.polarity import check_scoring_fits, polarity_accuracy  # noqa: E402


def polarity_words(polarity):
    """The polarity words that --polarity asks for, in print order ("" for none)."""
    return {"both": list(POLARITY.values()), "none": [""]}.get(polarity, [polarity])


def check_args(args):
    """Reject values that cannot work, naming the flag, before the model loads."""
    options.refuse_empty_paths(args, ["downstream_model_dir", "downstream_corpus_root_dir",
                                      "downstream_corpus_name", "val_file", "train_file",
                                      "cache_dir", "prompts_file"])
    for name in ["polarity", "prompt"]:
        if not_utf8(getattr(args, name)):
            raise InputError(f"--{name} is not UTF-8 (a terminal in cp949 or euc-kr sends "
                             f"other bytes); give it in UTF-8")
    if args.polarity not in [*POLARITY.values(), "both", "none"]:
        raise InputError(f"--polarity {args.polarity}: choose 긍정 (positive), 부정 (negative), "
                         f"both, or none")
    if args.prompts_file:
        check_prompts_file_args(args)
    elif args.polarity == "none" and not args.prompt.strip():
        raise InputError("--polarity none needs a --prompt (or --prompts_file): a model "
                         "trained without labels has nothing to start a text from")
    check_at_least(1, args, "num_samples", "max_new_tokens", "batch_size", "max_seq_length",
                   "polarity_eval_size")
    check_at_least(0, args, "control_samples", note=" (0: none)")
    check_guidance(args)
    if args.temperature != 0:
        check_between(*FACTORS, args, "temperature", note=" (0: greedy decoding)")
    check_probability(args, "top_p", note=" (1: off)")
    check_at_least(0, args, "top_k", "no_repeat_ngram_size", note=" (0: off)")
    check_between(*FACTORS, args, "repetition_penalty",
                  note=" (1: off; below 1: favours repetition)")
    require(-2**63 <= args.seed < 2**64, "seed", args.seed, "from -2**63 to 2**64 - 1 (64 bits)")


def check_prompts_file_args(args):
    """--prompts_file answers prompts without polarity words: --polarity none, implied."""
    for flag, given in [("--prompt", args.prompt), ("--evaluate", args.evaluate),
                        (f"--polarity {args.polarity}", args.polarity not in ("both", "none"))]:
        if given:
            raise InputError(f"--prompts_file writes a response to each of its prompts, "
                             f"without polarity words; leave {flag} out")
    args.polarity = "none"


def check_guidance(args):
    """Resolve --guidance: the default for a model with polarity words, off without them."""
    if args.guidance is None:
        args.guidance = 1.0 if args.polarity == "none" else GUIDANCE
    check_between(1, FACTORS[1], args, "guidance", note=" (1: off)")
    if args.polarity == "none" and args.guidance != 1:
        raise InputError("--guidance contrasts the two polarity words, and --polarity none "
                         "has none; leave --guidance out")


def check_positions(args, model, tokenizer):
    """Before the first token: what this run gives the model fits the positions it has
    (task.generation.check_fits), the rows it scores and the reviews it writes alike."""
    positions = max_positions(model.config)
    if args.evaluate:
        check_scoring_fits(positions, tokenizer, args.max_seq_length)
        if args.control_samples:
            check_review_fits(args, positions, tokenizer, list(POLARITY.values()), "")
    else:
        check_review_fits(args, positions, tokenizer, polarity_words(args.polarity), args.prompt)


def check_review_fits(args, positions, tokenizer, words, prompt):
    """Refuse a --prompt or --max_new_tokens that runs past the model's positions."""
    given = prompt_length(tokenizer, words, prompt, args.guidance)
    if positions and given >= positions:
        with_word = " with the polarity word" if any(words) else ""
        raise InputError(f"--prompt is {tokens(given)}{with_word}, too long for the model's "
                         f"{positions} positions; shorten it by at least "
                         f"{tokens(given - positions + 1)} to leave room for the review")
    parts = [part for part, present in [("the polarity word", any(words)),
                                        ("--prompt", prompt.strip())] if present]
    check_fits(positions, given, args.max_new_tokens, f"--max_new_tokens {args.max_new_tokens}",
               f"the {tokens(given)} of {' and '.join(parts)}",
               "use --max_new_tokens {room} or less")


def responds(model):
    """Whether train.py trained the model on prompt/response pairs (its config.json says
    prompt_response: true), so that a prompt is answered rather than continued."""
    return getattr(model.config, "prompt_response", None) is True


def check_polarity_words(args, model):
    """A model trained on plain text or prompt/response pairs (its config.json, written by
    train.py, lists no polarity words) has no polarity to write or measure."""
    model_dir = f"--downstream_model_dir {args.downstream_model_dir}"
    if args.prompts_file and not responds(model):
        raise InputError(f"--prompts_file: {model_dir} was not trained on prompt/response "
                         f"pairs (train.py writes prompt_response: true into config.json for a "
                         f".jsonl corpus of them); use --prompt to continue a text")
    if getattr(model.config, "polarity_words", None) != []:
        return  # trained after them, or a model that does not say (not train.py's)
    kind = "prompt/response pairs" if responds(model) else "plain text"
    trained = f"{model_dir} was trained on {kind}, without polarity words"
    if args.evaluate and not responds(model):
        raise InputError(f"{trained}: it has no polarity to measure")
    if args.polarity != "none" and not args.evaluate:  # a pairs model's: its responses
        also = ", or --prompts_file" if responds(model) else ""
        raise InputError(f"{trained}; use --polarity none with a --prompt{also}")


def prompts_to_answer(args):
    """(prompts, how each is named in messages): --prompts_file's, else --prompt's, as many
    times as --num_samples asks for (once for greedy decoding: it has one answer)."""
    if args.prompts_file:
        prompts, lines = read_prompts(given_file("--prompts_file", args.prompts_file))
        return prompts, [f"{args.prompts_file}:{line}" for line in lines]
    copies = 1 if args.temperature == 0 else args.num_samples
    return [args.prompt] * copies, ["--prompt"] * copies


def check_responses_fit(args, positions, prompts_ids, names):
    """Refuse, naming it, a prompt that leaves less than --max_new_tokens positions."""
    longest = max(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    given, name = len(prompts_ids[longest]), names[longest]
    if positions and given >= positions:
        raise InputError(f"{name}: the prompt is {tokens(given)}, too long for the model's "
                         f"{positions} positions; shorten it by at least "
                         f"{tokens(given - positions + 1)} to leave room for the response")
    which = "--prompt" if name == "--prompt" else f"the longest prompt, {name}"
    check_fits(positions, given, args.max_new_tokens, f"--max_new_tokens {args.max_new_tokens}",
               f"the {tokens(given)} of {which}", "use --max_new_tokens {room} or less")


def print_responses(args, model, tokenizer, prompts, names):
    """Each prompt's response: as JSON lines for --prompts_file, else one a line."""
    prompts_ids = response_prompt_ids(tokenizer, prompts)
    check_responses_fit(args, max_positions(model.config), prompts_ids, names)
    settings = sampling_settings(args)
    for start in range(0, len(prompts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        responses = write_responses(model, tokenizer, prompts_ids[batch], settings, args.seed)
        for prompt, response in zip(prompts[batch], responses):
            line = {"prompt": prompt, "response": response}
            print(json.dumps(line, ensure_ascii=False) if args.prompts_file else response,
                  flush=True)


def sampling_settings(args):
    return dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p,
                temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size)


def print_reviews(args, model, tokenizer):
    settings = sampling_settings(args)
    # Each polarity starts from the same seed: where their reviews differ, the polarity
    # word made the difference.
    for polarity in polarity_words(args.polarity):
        for review in write_reviews(model, tokenizer, polarity, settings, args.prompt,
                                    args.num_samples, args.seed, args.guidance):
            print(f"{polarity} {review}".strip() if args.show_polarity else review, flush=True)


def evaluation_files(args):
    """(training file or None, validation file) for --evaluate."""
    if args.val_file:
        train_file = args.train_file and given_file("--train_file", args.train_file)
        return train_file, given_file("--val_file", args.val_file)
    val_file, = corpus_files(args.downstream_corpus_root_dir,  # only the test file
                             args.downstream_corpus_name, names=NSMC_FILES[1:])
    if args.train_file:
        return given_file("--train_file", args.train_file), val_file
    beside = val_file.parent / NSMC_FILES[0]  # the judge's, when it is on disk already
    return (beside if beside.is_file() else None), val_file


def print_evaluation(args, model, tokenizer):
    train_file, val_file = evaluation_files(args)
    print_polarity_accuracy(args, model, tokenizer, val_file)
    if not args.control_samples:
        return
    if train_file is None:
        print("control accuracy: not measured: give --train_file, the labelled file the "
              "judge learns from", flush=True)
        return
    judge = judge_of(train_file, val_file, args.cache_dir,
                     skip="--control_samples 0 measures polarity accuracy alone")
    accuracy, _ = control_accuracy(model, tokenizer, judge, args.control_samples, args.seed,
                                   args.guidance, sampling_settings(args))
    print(f"control accuracy: {accuracy:.4f} of {2 * args.control_samples:,} reviews written "
          f"with --guidance {args.guidance:g}, judged by a character n-gram naive Bayes "
          f"trained on {train_file} ({judge.val_accuracy:.4f} accurate on {val_file})",
          flush=True)


@torch.no_grad()
def print_response_evaluation(args, model, tokenizer):
    """--evaluate for a model trained on pairs: the loss on the responses of --val_file (the
    prompts' labels are -100, as in training), and the share of them that greedy decoding
    writes exactly."""
    if not args.val_file:
        raise InputError("--evaluate: give --val_file, a .jsonl file of prompts and responses")
    check_fits(max_positions(model.config), 0, args.max_seq_length,
               f"--max_seq_length {args.max_seq_length}", "", "use --max_seq_length {room}")
    val_file = given_file("--val_file", args.val_file)
    features = load_features(val_file, tokenizer, args.max_seq_length, args.cache_dir)
    indices = spread(len(features), args.polarity_eval_size)
    batches = ReviewBatches(features, tokenizer.pad_token_id, False, args.batch_size)
    loss, count = 0.0, 0
    for first in range(0, len(indices), args.batch_size):
        batch = batches[indices[first:first + args.batch_size]]
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
        trained = (batch["labels"][:, 1:] != -100).sum().item()  # what the mean is over
        loss += model(**model_inputs(model, batch), labels=batch["labels"]).loss.item() * trained
        count += trained
    loss /= max(count, 1)
    print(f"val_loss {loss:.4f} perplexity {math.exp(min(loss, 50)):.2f} on the responses of "
          f"{len(indices):,} examples of {val_file}", flush=True)
    share, asked = reproduced_share(model, tokenizer, features, indices, args.batch_size)
    print(f"exact responses: {share:.4f} of {asked:,} prompts answered word for word by "
          f"greedy decoding", flush=True)


def print_polarity_accuracy(args, model, tokenizer, val_file):
    features = load_features(val_file, tokenizer, args.max_seq_length, args.cache_dir)
    if features.labels is None or len(features) == 0:
        raise InputError(f"{val_file}: no labelled reviews, so there is no polarity to check")
    n = min(len(features), args.polarity_eval_size or len(features))
    accuracy = polarity_accuracy(model, tokenizer, features, Backend(model.device.type, "fp32"),
                                 args.batch_size, n)
    print(f"polarity accuracy: {accuracy:.4f} on {n:,} reviews of {val_file}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        requests = prompts_to_answer(args) if args.prompts_file else None  # before the model
        device = torch.device(choose_device(args.device, tpu_cores=0))  # never XLA: see above
        check_best_model(args.downstream_model_dir, "--downstream_model_dir")
        tokenizer = load_tokenizer(args.downstream_model_dir, flag="--downstream_model_dir")
        model = load_model(args.downstream_model_dir, tokenizer,
                           flag="--downstream_model_dir").to(device).eval()
        check_polarity_words(args, model)
        if responds(model) and args.evaluate:
            print_response_evaluation(args, model, tokenizer)
        elif responds(model):
            print_responses(args, model, tokenizer, *(requests or prompts_to_answer(args)))
        if responds(model):
            return 0
        check_positions(args, model, tokenizer)
        if args.evaluate:
            print_evaluation(args, model, tokenizer)
        else:
            print_reviews(args, model, tokenizer)
    except InputError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

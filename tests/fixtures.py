"""A tiny KoGPT2 stand-in and NSMC-format corpora, built in a folder for tests and runs.

KoGPT2's weights cannot be downloaded here, so tests use a SentencePiece-style BPE
tokenizer trained on the fixture text, with KoGPT2's special tokens at KoGPT2's ids, and
a 2-layer GPT-2 saved with `save_pretrained`: the very files `from_pretrained` reads.

Also a script, for real-data runs with a tiny model trained on NSMC's own text:
    python tests/fixtures.py --corpus ../shared/data/nsmc/ratings_train.txt --out tiny-kogpt2
"""
import random
import sys
from pathlib import Path

# The project's modules, one folder up, for the command line's checks and the corpus reader.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from options import ArgumentParser, check_at_least  # noqa: E402
from runtime.errors import InputError  # noqa: E402

# KoGPT2's special tokens, in id order: <s>=0 </s>=1 <usr>=2 <pad>=3 <sys>=4 <unk>=5 <mask>=6
SPECIAL_TOKENS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]

POSITIVE_WORDS = ["최고", "감동", "재밌다", "추천", "명작", "훌륭한", "아름다운", "웃기고", "좋았다", "완벽"]
NEGATIVE_WORDS = ["최악", "지루", "별로", "실망", "졸작", "아깝다", "엉망", "짜증", "유치", "노잼"]
COMMON_WORDS = ["영화", "배우", "연기", "스토리", "정말", "너무", "진짜", "이", "그", "감독"]


def make_reviews(n, seed=0):
    """`n` (document, label) pairs whose polarity shows in their words: easy to learn."""
    rng = random.Random(seed)
    reviews = []
    for i in range(n):
        label = i % 2
        words = POSITIVE_WORDS if label else NEGATIVE_WORDS
        length = rng.randint(3, 9)
        reviews.append((" ".join(rng.choice(words + COMMON_WORDS) for _ in range(length)), label))
    return reviews


def write_nsmc(path, reviews, extra_lines=()):
    """An NSMC-format file: header, then `id<TAB>document<TAB>label` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["id\tdocument\tlabel"]
    lines += [f"{1000 + i}\t{doc}\t{label}" for i, (doc, label) in enumerate(reviews)]
    lines += list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_corpus(root, n_train=256, n_test=64):
    """`root/nsmc/ratings_{train,test}.txt`, with a blank review, one with quotes and a
    long one among the training lines, as in the real NSMC."""
    special = ["9000001\t\t0",
               '9000002\t"최고의 영화" 라고 "말하고" 싶다"\t1',
               "9000003\t" + " ".join(["정말"] * 60 + ["최고"]) + "\t1"]
    write_nsmc(Path(root) / "nsmc" / "ratings_train.txt", make_reviews(n_train, seed=1), special)
    write_nsmc(Path(root) / "nsmc" / "ratings_test.txt", make_reviews(n_test, seed=2))
    return Path(root)


def build_tokenizer(texts, out_dir, vocab_size=400):
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast
    backend = SentencePieceBPETokenizer()
    backend.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                                special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i, token
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_model(out_dir, vocab_size, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0,
                **config):
    """`config`: more GPT2Config settings, say resid_pdrop=0.0."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=0, eos_token_id=1,
                        pad_token_id=3, **config)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir)
    return model


def build_tiny_kogpt2(out_dir, texts, vocab_size=400, **model_kwargs):
    """Tokenizer and randomly initialised tiny GPT-2 in `out_dir`; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(["긍정 부정"] + list(texts), out_dir, vocab_size)
    build_model(out_dir, len(tokenizer), **model_kwargs)
    return out_dir


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Either --write_corpus DIR (a small NSMC-format sample corpus), or --corpus FILE "
               "--out DIR (a tiny model whose tokenizer is trained on FILE), or both.")
    p.add_argument("--write_corpus", metavar="DIR",
                   help="write a sample corpus in NSMC's layout: DIR/nsmc/ratings_train.txt "
                        "and DIR/nsmc/ratings_test.txt")
    p.add_argument(
        "--train_reviews", type=int, default=1000, help="--write_corpus: training reviews"
    )
    p.add_argument("--test_reviews", type=int, default=200, help="--write_corpus: test reviews")
    p.add_argument("--corpus", help="an NSMC-format file to train the tokenizer on")
    p.add_argument("--out", help="where to save the tiny model and its tokenizer")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--lines", type=int, default=50000, help="reviews used to train the tokenizer")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=2)
    a = p.parse_args(argv)
    if bool(a.corpus) != bool(a.out):
        p.error("--corpus and --out go together")
    if not a.write_corpus and not a.corpus:
        p.error("give --write_corpus DIR, or --corpus FILE and --out DIR")
    return a


def check_args(a):
    """Refuse, in one line, what cannot build a corpus or a model."""
    check_at_least(1, a, "train_reviews", "test_reviews", "lines", "n_layer", "n_embd", "n_head")
    check_at_least(len(SPECIAL_TOKENS) + 1, a, "vocab_size",
                   note=" (the special tokens and one more)")
    if a.n_embd % a.n_head:
        raise InputError(f"--n_embd {a.n_embd} does not split over --n_head {a.n_head} "
                         f"attention heads; give an --n_embd that --n_head divides")


def tokenizer_texts(corpus, lines):
    """The reviews of the first `lines` lines of an NSMC-format file (its header skipped)."""
    from corpus.read import given_file, read_corpus
    texts = read_corpus(given_file("--corpus", corpus)).texts[:lines]
    if not texts:
        raise InputError(f"--corpus {corpus}: no review text to train a tokenizer on")
    return texts


def main(argv=None):
    a = parse_args(argv)
    try:
        check_args(a)
        if a.corpus:  # read first: a bad file stops before anything is written
            texts = tokenizer_texts(a.corpus, a.lines)
        if a.write_corpus:
            root = write_corpus(a.write_corpus, n_train=a.train_reviews, n_test=a.test_reviews)
            print(root / "nsmc" / "ratings_train.txt")
            print(root / "nsmc" / "ratings_test.txt")
        if a.corpus:
            print(build_tiny_kogpt2(a.out, texts, a.vocab_size, n_layer=a.n_layer,
                                    n_embd=a.n_embd, n_head=a.n_head))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import os  # built on the CPU: keep accelerate from importing torch_xla (and its warning)
    os.environ.setdefault("USE_TORCH_XLA", "0")
    sys.exit(main())

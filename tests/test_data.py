"""Reading NSMC, turning reviews into features, the cache, and batches."""
import fixtures
import pytest
import torch

import data
import runtime.errors
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_tokenizer_has_kogpt2_special_tokens_at_kogpt2_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 1)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 5, 6)


def test_reader_keeps_quotes_and_skips_blank_reviews(corpus):
    reviews = corpus_read.read_corpus(corpus / "nsmc" / "ratings_train.txt")
    assert reviews.blank == 1
    assert len(reviews.texts) == len(reviews.labels) == 258
    assert '"최고의 영화" 라고 "말하고" 싶다"' in reviews.texts  # csv quoting would mangle it
    assert set(reviews.labels) == {0, 1}


def test_reader_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffid\tdocument\tlabel\r\n1\t좋다\t1\r\n2\t싫다\t0\r\n".encode())
    reviews = corpus_read.read_corpus(path)
    assert (reviews.texts, reviews.labels) == (["좋다", "싫다"], [1, 0])


@pytest.mark.parametrize("content, message", [
    ("id\tdocument\tlabel\n1\t좋다\t1\n2\t싫다\n", "bad.txt:3: expected 3 tab-separated fields"),
    ("id\tdocument\tlabel\n1\t좋다\t1\n2\t싫다\t5\n", "bad.txt:3: label must be 0 or 1, found '5'"),
    ("id\tdocument\tlabel\n1\t좋\tdu\t1\n", "bad.txt:2: expected 3 tab-separated fields"),
    ("id\treview\tlabel\n1\t좋다\t1\n", "bad.txt:1: expected the header"),
    ("document\tscore\n좋다\t1\n", "bad.txt:1: label must be 0 or 1, found 'score'; a header"),
    ("", "bad.txt: the file is empty"),
])
def test_malformed_lines_are_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(runtime.errors.InputError, match=message):
        corpus_read.read_corpus(path)


def test_bytes_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"id\tdocument\tlabel\n1\tok\t1\n2\t\xff\xfe\t0\n")
    with pytest.raises(runtime.errors.InputError, match=r"bad.txt:3: byte 0xff is not UTF-8"):
        corpus_read.read_corpus(path)


def test_features_are_polarity_review_eos(tokenizer):
    reviews = corpus_read.Reviews(["최고 영화", "최악 영화"], [1, 0])
    features = corpus_features.encode(reviews, tokenizer, max_seq_length=16)
    for row, (text, word) in enumerate([("최고 영화", "긍정"), ("최악 영화", "부정")]):
        ids = features.input_ids[row, :features.lengths[row]].tolist()
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == f"{word} {text}"
        assert (features.input_ids[row, features.lengths[row]:] == tokenizer.pad_token_id).all()
    assert features.labels.tolist() == [1, 0]


def test_truncation_cuts_the_review_and_keeps_eos(tokenizer):
    reviews = corpus_read.Reviews([" ".join(["정말"] * 50)], [1])
    features = corpus_features.encode(reviews, tokenizer, max_seq_length=8)
    ids = features.input_ids[0].tolist()
    assert features.lengths.tolist() == [8] and features.truncated == 1
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[:-1]).startswith("긍정 정말")


def test_token_ids_are_those_the_tokenizer_gives_in_chunks_too(tokenizer):
    texts = [" ".join(["정말", "최고", "영화"][: 1 + i % 3] * (1 + i)) for i in range(7)]
    expected = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=5)[
        "input_ids"
    ]
    assert corpus_features.token_ids(texts, tokenizer, max_length=5, chunk=3) == expected
    assert max(map(len, expected)) == 5 and min(map(len, expected)) < 5  # some were cut
    # The tokenizer is configured on a copy: its own calls are left untruncated.
    assert len(tokenizer(texts[-1], add_special_tokens=False)["input_ids"]) > 5


def test_the_progress_bar_is_quiet_when_stderr_is_no_terminal(tokenizer, capsys):
    corpus_features.encode(
        corpus_read.Reviews(["최고 영화"] * 3, [1, 0, 1]), tokenizer, 16, progress=True
    )
    assert capsys.readouterr().err == ""


def test_batches_mask_padding_in_labels_and_pass_no_token_type_ids(tokenizer):
    reviews = corpus_read.Reviews(["최고", "정말 너무 재밌다 추천"], [1, 1])
    features = corpus_features.encode(reviews, tokenizer, max_seq_length=16)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, fixed_shape=False, batch_size=2)[
        [0, 1]
    ]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "target_positions"}
    width = int(features.lengths.max())
    assert batch["input_ids"].shape == (2, width)                 # cut to the longest
    real = batch["attention_mask"].bool()
    assert real.sum(1).tolist() == features.lengths.tolist()
    assert (batch["labels"][~real] == -100).all()                 # exactly the padding
    assert (batch["labels"][real] == batch["input_ids"][real]).all()
    assert (batch["input_ids"][~real] == tokenizer.pad_token_id).all()


def test_fixed_shape_batches_pad_rows_and_columns(tokenizer):
    reviews = corpus_read.Reviews(["최고", "별로"], [1, 0])
    features = corpus_features.encode(reviews, tokenizer, max_seq_length=16)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, fixed_shape=True, batch_size=4)[
        [1]
    ]
    assert batch["input_ids"].shape == (4, 16)
    assert (batch["labels"][1:] == -100).all()                    # filler rows add no loss


def test_packing_fills_rows_without_overlap():
    lengths = [7, 3, 5, 8, 2, 8, 1, 6]
    row, column = data.pack(lengths, 8)
    taken = set()
    for r, c, n in zip(row, column, lengths):
        cells = {(r, c + j) for j in range(n)}
        assert c + n <= 8 and not cells & taken
        taken |= cells
    assert max(row) + 1 == 5  # 40 tokens fill 5 rows of 8 to the brim


def test_packed_batches_hold_each_review_once_from_position_0(tokenizer):
    reviews = corpus_read.Reviews(["최고", "정말 너무 재밌다 추천", "별로", "그냥 그렇다"], [1, 1, 0, 0])
    features = corpus_features.encode(reviews, tokenizer, max_seq_length=16)
    for fixed_shape in (False, True):
        batch = data.ReviewBatches(features, tokenizer.pad_token_id, fixed_shape, 16,
                                   packed=True)[[0, 1, 2, 3]]
        rows = batch["input_ids"].shape[0]
        # XLA: one compiled graph per multiple of PACKED_ROWS_STEP rows, not 16 rows of padding
        assert rows == data.PACKED_ROWS_STEP if fixed_shape else rows < 4
        assert ("target_positions" in batch) != fixed_shape
        for i in range(4):
            at = batch["review_ids"] == i
            length = int(features.lengths[i])
            assert batch["input_ids"][at].tolist() == features.input_ids[i, :length].tolist()
            assert batch["position_ids"][at].tolist() == list(range(length))
            # Every token is a target but the first, whose predecessor is another review's.
            assert batch["labels"][at].tolist() == [-100] + batch["input_ids"][at][1:].tolist()
        padding = batch["review_ids"] < 0
        assert (batch["labels"][padding] == -100).all()
        assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
        if not fixed_shape:
            assert len(batch["target_positions"]) == int(features.lengths.sum()) - 4


def test_cache_is_reused_and_keyed_by_content(tokenizer, corpus, tmp_path, monkeypatch):
    train_file = corpus / "nsmc" / "ratings_train.txt"
    first = corpus_features.load_features(train_file, tokenizer, 32, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_reading(path):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(corpus_features, "read_corpus", no_reading)
    second = corpus_features.load_features(train_file, tokenizer, 32, tmp_path / "cache")
    assert torch.equal(first.input_ids, second.input_ids) and second.blank == first.blank

    monkeypatch.undo()
    fixtures.write_nsmc(train_file, [("다른 내용", 1)])           # new content: a new key
    third = corpus_features.load_features(train_file, tokenizer, 32, tmp_path / "cache")
    assert len(third) == 1 and len(list((tmp_path / "cache").iterdir())) == 2


LENGTHS = torch.randint(2, 33, (1000,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["shuffled", "grouped_by_length"])
def test_sharding_and_step_counts_for_1_and_8_replicas(lengths):
    n, batch = 1000, 16
    for world in (1, 8):
        shards = []
        for rank in range(world):
            batches = data.TrainBatches(n, batch, world, rank, seed=7, lengths=lengths)
            batches.start_epoch(0)
            shards.append([i for b in batches for i in b])
            assert len(batches) == data.batches_per_epoch(n, batch, world) == (n // world) // batch
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == world * (n // world // batch) * batch  # disjoint
    assert data.batches_per_epoch(1000, 16, 8) == 7


@pytest.mark.parametrize("lengths", [None, LENGTHS[:100]], ids=["shuffled", "grouped_by_length"])
def test_each_epoch_reshuffles_and_resume_skips_exactly(lengths):
    batches = data.TrainBatches(100, 10, 1, 0, seed=7, lengths=lengths)
    batches.start_epoch(0)
    epoch0 = list(batches)
    batches.start_epoch(1)
    epoch1 = list(batches)
    assert epoch0 != epoch1
    batches.start_epoch(1, skip_batches=3)
    assert list(batches) == epoch1[3:] and len(batches) == 7
    again = data.TrainBatches(100, 10, 1, 0, seed=7, lengths=lengths)  # a resumed run's
    again.start_epoch(1, skip_batches=3)
    assert list(again) == epoch1[3:]


@pytest.mark.parametrize("lengths", [None, LENGTHS[:400]], ids=["shuffled", "grouped_by_length"])
@pytest.mark.parametrize("window", [1, 3], ids=["one micro-batch", "3 accumulated"])
def test_xla_replicas_agree_on_the_rows_of_packed_batches(lengths, window):
    # Each replica works the rows out alone, from every replica's batches of the step (all
    # its micro-batches), and a resumed run (skipping 3 micro-batches) cuts the same windows.
    world, width, skip = 4, 32, 3
    features = corpus_features.Features(torch.zeros(400, width, dtype=torch.int32),
                                        (LENGTHS[:400] % width + 1).int(), None)
    dataset = data.ReviewBatches(features, 0, fixed_shape=True, batch_size=10, packed=True)
    plain, agreed = [], []
    for rank in range(world):
        own, sharing = (data.TrainBatches(400, 10, world, rank, seed=7, lengths=lengths)
                        for _ in range(2))
        sharing.agree_on_rows(dataset.rows_for, window)
        for batches in (own, sharing):
            batches.start_epoch(1)
        plain.append(list(own))
        agreed.append(list(sharing))
        sharing.start_epoch(1, skip_batches=skip)
        assert list(sharing) == agreed[rank][skip:]
    steps = len(plain[0])
    for start in range(0, steps, window):
        micro_batches = range(start, min(start + window, steps))
        expected = dataset.rows_for([p[i] for p in plain for i in micro_batches])
        for i in micro_batches:
            assert [agreed[rank][i] for rank in range(world)] == [(p[i], expected) for p in plain]
            assert {dataset[agreed[rank][i]]["input_ids"].shape for rank in range(world)} == \
                {(expected, width)}
    assert len({a[1] for rank in agreed for a in rank}) > 1  # not simply the most rows


def test_grouping_by_length_takes_as_many_reviews_with_less_padding():
    def widths(batches):  # what the batches cost, each cut to its longest review
        return sum(int(LENGTHS[b].max()) * len(b) for b in batches)
    shuffled, grouped = (data.TrainBatches(1000, 16, 1, 0, seed=7, lengths=lengths)
                         for lengths in (None, LENGTHS))
    for epoch in (0, 1):
        shuffled.start_epoch(epoch)
        grouped.start_epoch(epoch)
        plain, by_length = list(shuffled), list(grouped)
        assert len(set(sum(by_length, []))) == len(sum(plain, [])) == 1000 // 16 * 16
        assert widths(by_length) < 0.7 * widths(plain)
        assert [len(set(LENGTHS[b].tolist())) for b in by_length] != [1] * len(by_length)


def test_eval_shards_cover_every_example_once():
    for world in (1, 8):
        seen = [
            i for rank in range(world) for b in data.eval_batches(103, 4, world, rank) for i in b
        ]
        assert sorted(seen) == list(range(103))


def test_a_cache_that_cannot_be_written_is_a_warning(tokenizer, corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    features = corpus_features.load_features(corpus / "nsmc" / "ratings_train.txt", tokenizer, 32,
                                             blocker / "cache")
    assert len(features) == 258
    assert "warning: could not cache" in capsys.readouterr().err


def test_a_tokenizer_without_pad_pads_with_its_end_token(tmp_path):
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast
    backend = SentencePieceBPETokenizer()
    backend.train_from_iterator(["긍정 부정 좋은 영화", "나쁜 영화"], vocab_size=60,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        tmp_path
    )
    from transformers import GPT2Config
    GPT2Config(vocab_size=60).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    features = corpus_features.encode(corpus_read.Reviews(["좋은 영화"], [1]), tokenizer, 8)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, True, 1)[[0]]
    assert (batch["labels"] != -100).sum() == features.lengths[0]   # padding masked by length


def test_only_missing_corpus_files_are_downloaded(tmp_path, monkeypatch):
    from Korpora import Korpora
    folder = tmp_path / "nsmc"
    fixtures.write_nsmc(folder / "ratings_train.txt", [("있던 파일", 1)])
    before = (folder / "ratings_train.txt").read_bytes()

    def fake_fetch(name, root_dir):  # what Korpora does: both files under root_dir/nsmc/
        for f in corpus_read.NSMC_FILES:
            fixtures.write_nsmc(tmp_path / root_dir / "nsmc" / f, [("내려받은 파일", 0)])
    monkeypatch.setattr(Korpora, "fetch", fake_fetch)
    train_file, test_file = corpus_read.corpus_files(tmp_path, "nsmc")
    assert train_file.read_bytes() == before                        # left as it was
    assert corpus_read.read_corpus(test_file).texts == ["내려받은 파일"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        corpus_read.NSMC_FILES
    )  # no scratch left

    monkeypatch.setattr(Korpora, "fetch", lambda *a, **k: pytest.fail("files were there"))
    assert corpus_read.corpus_files(tmp_path, "nsmc") == [train_file, test_file]

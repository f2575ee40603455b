"""End-to-end runs of train.py on the CPU and on the XLA path, and the arithmetic that
depends on the number of replicas."""
import copy
import math

import pytest
import torch
from conftest import read_metrics, run_train
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

import data
import runtime.backends
import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer


@pytest.mark.slow
def test_cpu_run_learns_and_saves_a_loadable_model(train_args, tmp_path):
    # On a terminal that cannot show Hangul (the samples, the banner): shown as "?".
    result = run_train(train_args + ["--epochs", "3", "--keep_checkpoints", "2",
                                     "--max_steps", "100"], env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "device:           cpu" in result.stdout
    assert "polarity word:    ?? or ??" in result.stdout
    # --max_steps beyond the 3 epochs: one warning, and the epochs decide.
    assert ("warning: --max_steps 100 is more than the 48 steps of --epochs 3 (16 per epoch): "
            "the run stops after 48; raise --epochs to train longer") in result.stderr
    assert (
        "258 (1 blank skipped" in result.stdout
        and "steps:            16 per epoch, 48 in all" in result.stdout
    )

    evals = read_metrics(tmp_path / "out", "eval")
    assert [e["step"] for e in evals] == [0, 16, 32, 48]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    trains = read_metrics(tmp_path / "out", "train")
    assert len(trains) == 48 and all(e["tokens_per_s"] > 0 for e in trains)
    assert trains[0]["lr"] == pytest.approx(1e-3 / 5)              # warm-up: 5 steps
    assert max(e["lr"] for e in trains) == pytest.approx(1e-3)

    out = tmp_path / "out"
    model = GPT2LMHeadModel.from_pretrained(out)
    assert model.config.polarity_words == ["긍정", "부정"]  # what generate.py reads back
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert tokenizer.pad_token_id == 3 and tokenizer.eos_token_id == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-32", "checkpoint-48"]
    assert GPT2LMHeadModel.from_pretrained(out / "checkpoint-48") is not None
    best = min(e["val_loss"] for e in evals[1:])
    assert best == evals[-1]["val_loss"]                             # so the best is the last
    final = GPT2LMHeadModel.from_pretrained(out / "checkpoint-48")
    for (name, a), b in zip(model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_two_cpu_runs_with_the_same_seed_give_the_same_losses(train_args, tmp_path):
    losses = []
    for name in ("a", "b"):
        args = train_args + ["--max_steps", "6", "--downstream_model_dir", str(tmp_path / name)]
        assert run_train(args).returncode == 0
        losses.append([e["loss"] for e in read_metrics(tmp_path / name, "train")])
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.slow
def test_xla_path_through_xmp_spawn(train_args, tmp_path):
    args = train_args + ["--device", "xla", "--max_steps", "6", "--log_every", "3"]
    result = run_train(args, env={"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"})
    assert result.returncode == 0, result.stderr
    assert "xla (CPU, 1 replicas)" in result.stdout
    evals = read_metrics(tmp_path / "out", "eval")
    assert [e["step"] for e in evals] == [0, 6] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert [e["step"] for e in read_metrics(tmp_path / "out", "train")] == [3, 6]
    # The saved model is the one that was evaluated (moving GPT-2 to an XLA device unties
    # its output layer from the embedding unless they are tied again).
    saved = cpu_val_loss(tmp_path / "out", tmp_path / "corpus" / "nsmc" / "ratings_test.txt")
    assert saved == pytest.approx(evals[1]["val_loss"], rel=1e-4)


def cpu_val_loss(model_dir, corpus_file):
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer).eval()
    features = corpus_features.encode(corpus_read.read_corpus(corpus_file), tokenizer, 32)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, len(features))[
        list(range(len(features)))]
    with torch.no_grad():
        return (train.token_loss_sum(model, batch) / train.count_targets(batch)).item()


class Replica(runtime.backends.Backend):
    """One of `world_size` replicas, on the CPU, whose all-reduce returns a known total."""

    def __init__(self, rank, world_size, total):
        super().__init__("cpu", "fp32")
        self.rank, self.world_size, self.total = rank, world_size, total

    def all_reduce_sum(self, tensor):
        return self.total


class Untouched:
    """An optimizer and a scheduler that do nothing: the gradients stay as computed."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


@pytest.mark.parametrize("world_size, accumulation", [(1, 1), (1, 2), (8, 1), (8, 2)])
def test_replicas_together_take_the_token_mean_gradient(tiny_model, world_size, accumulation):
    """Whatever the split across replicas and micro-batches, the averaged gradient is that
    of the mean loss over every real token of the global batch."""
    tokenizer = load_tokenizer(str(tiny_model))
    texts = [" ".join(["정말"] * (1 + i % 7)) for i in range(32)]   # uneven lengths
    features = corpus_features.encode(
        corpus_read.Reviews(texts, [i % 2 for i in range(32)]), tokenizer, 16
    )
    batches = data.ReviewBatches(features, tokenizer.pad_token_id, False, 32)
    model = load_model(str(tiny_model), tokenizer)
    model.eval()  # no dropout, so every split computes the same function

    everything = batches[list(range(32))]
    reference = copy.deepcopy(model)
    (train.token_loss_sum(reference, everything) / train.count_targets(everything)).backward()

    total = train.count_targets(everything)
    summed = None
    for rank in range(world_size):
        shard = list(range(rank, 32, world_size))
        micro = len(shard) // accumulation
        window = [batches[shard[i:i + micro]] for i in range(0, len(shard), micro)]
        replica = copy.deepcopy(model)
        # No clipping (inf), and an optimizer that leaves the gradients to be read here.
        train.train_step(replica, Untouched(), Untouched(), window,
                         Replica(rank, world_size, total), step=0, max_grad_norm=math.inf)
        grads = [p.grad for p in replica.parameters()]
        summed = grads if summed is None else [s + g for s, g in zip(summed, grads)]
    for (name, p), g in zip(reference.named_parameters(), summed):
        torch.testing.assert_close(g / world_size, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("world_size", [1, 8])
def test_step_counts_follow_from_the_per_device_batch(world_size):
    batches, steps = data.replica_steps(150_000, 32, world_size, 2)
    assert batches == 150_000 // world_size // 32
    assert steps == -(-batches // 2)


def test_max_steps_beyond_the_epochs_is_said_once_and_changes_nothing(capsys):
    from runtime.progress import planned_steps
    assert planned_steps(16, 3, None) == 48 and planned_steps(16, 3, 20) == 20
    assert planned_steps(16, 3, 48) == 48 and capsys.readouterr().err == ""
    assert planned_steps(16, 3, 49, warn=False) == 48 and capsys.readouterr().err == ""
    assert planned_steps(16, 3, 1000) == 48
    assert capsys.readouterr().err.count("\n") == 1

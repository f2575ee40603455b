"""--fsdp on the XLA path (PyTorch/XLA's FSDP) with 2 and 4 real replicas on the CPU
(tests/xla_cpu_replicas.py): sharded, the replicas train what one unsharded replica with
the whole batch trains, and the model they export is one that from_pretrained loads."""
import json

import pytest
from conftest import read_metrics, replica_args, run_train
from test_replicas import assert_same_run, assert_same_weights
from transformers import AutoModelForCausalLM

import runtime.rundir

pytestmark = pytest.mark.slow  # every test here runs train.py as a process


@pytest.mark.parametrize("replicas", [2, 4])
def test_sharded_replicas_train_what_one_replica_with_an_n_fold_batch_trains(
        dropout_free_model, one_replica, tmp_path, replicas):
    corpus, reference = one_replica
    out = tmp_path / "out"
    args = replica_args(dropout_free_model, corpus, out, replicas, "--max_steps", "4", "--fsdp")
    result = run_train(args, replicas=replicas)
    assert result.returncode == 0, result.stderr
    assert f"xla (CPU, {replicas} replicas), fp32, FSDP" in result.stdout

    ours, theirs = read_metrics(out), read_metrics(reference)
    assert [(e["event"], e["step"]) for e in ours] == [(e["event"], e["step"]) for e in theirs]
    for a, b in zip(ours, theirs):
        if a["event"] == "eval":
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
            assert a["polarity_accuracy"] == b["polarity_accuracy"]
        else:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["lr"] == b["lr"]
    # The best model (the last one here), gathered from the shards by the master.
    assert_same_weights(out, reference / "checkpoint-4", dropout_free_model)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    AutoModelForCausalLM.from_pretrained(out)
    # Each replica wrote its own shard of the model and of the optimizer's state.
    assert sorted(p.name for p in (out / "checkpoint-4" / "shards").glob("shard_*.pt")) == [
        f"shard_{rank}_of_{replicas}.pt" for rank in range(replicas)]


def test_kill_9_then_resume_continues_a_sharded_run_exactly(
        tiny_model, corpus, tmp_path):
    """Dropout on. The checkpoint holds each replica's shard of the weights and of AdamW's
    state; resumed from it, the run ends with the weights of an uninterrupted one (another
    number of replicas is refused: tests/test_sharding.py)."""
    run = ["--max_steps", "12", "--save_every_steps", "4", "--log_every", "2", "--fsdp"]
    reference = tmp_path / "reference"
    result = run_train(replica_args(tiny_model, corpus, reference, 2, *run), replicas=2)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    args = replica_args(tiny_model, corpus, out, 2, *run)
    killed = run_train(["sigkill", "6", "--", *args], replicas=2, script="tests/interrupt.py")
    assert " killed by SIGKILL); nothing after the last checkpoint was saved" in killed.stderr
    saved = runtime.rundir.latest_checkpoint(out)
    assert saved.name == "checkpoint-4"
    assert sorted(p.name for p in (saved / "shards").glob("shard_*.pt")) == [
        "shard_0_of_2.pt", "shard_1_of_2.pt"]
    assert not (saved / "model.safetensors").exists()

    resumed = run_train(args + ["--resume", "latest"], replicas=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_evaluation_shares_of_unequal_batch_counts_are_refused_in_one_line(
        tiny_model, corpus, tmp_path):
    """33 reviews over 2 replicas of 16: 2 batches on one, 1 on the other, whose forward
    would wait for the first's second all-gather forever."""
    args = replica_args(tiny_model, corpus, tmp_path / "out", 2, "--max_steps", "2",
                        "--fsdp", "--eval_size", "33")
    result = run_train(args, replicas=2, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --fsdp: the replicas' shares of an evaluation have 1 to 2 batches, and each "
        "must run as many as the others; use an --eval_size and --polarity_eval_size that "
        "2 x --batch_size divides")

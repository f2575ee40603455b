"""--fsdp on the XLA path (PyTorch/XLA's FSDP) with 2 and 4 real replicas on the CPU
(tests/xla_cpu_replicas.py): sharded, the replicas train what one unsharded replica with
the whole batch trains, and the model they export is one that from_pretrained loads."""
import json

import pytest
from conftest import read_metrics, run_train
from test_replicas import (assert_same_weights, dropout_free_model, one_replica,  # noqa: F401
                           replica_args)
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # every test here runs train.py as a process


@pytest.mark.parametrize("replicas", [2, 4])
def test_sharded_replicas_train_what_one_replica_with_an_n_fold_batch_trains(
        dropout_free_model, one_replica, tmp_path, replicas):  # noqa: F811
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
    assert sorted(p.name for p in (out / "checkpoint-4").glob("shard_*.pt")) == [
        f"shard_{rank}_of_{replicas}.pt" for rank in range(replicas)]

"""--fsdp's checks that need no processes: where it is refused, what a sharded checkpoint
may resume with, and how a damaged one is found (the runs are in tests/test_fsdp.py)."""
import functools
import json
import types

import pytest
import torch
import torch.distributed.checkpoint as dcp

import runtime.rundir
import train
from model import load_model, load_tokenizer
from runtime.checkpoint import check_resume_args
from runtime.errors import CheckpointError, InputError
from runtime.sharding import FsdpBackend
from runtime.xla_sharding import XlaFsdpBackend


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_fsdp_without_torchrun_is_one_line(train_args, capsys, tmp_path):
    assert train.main(train_args + ["--fsdp"]) == 1
    assert last_error(capsys) == (
        "error: --fsdp shards the model over the processes of a run: start it with torchrun "
        "(torchrun --nproc_per_node N train.py --fsdp ...), or leave --fsdp out")
    assert not (tmp_path / "out").exists()  # refused before the run took its directory


def sharded_model_folder(tiny_model, folder, dtype="bfloat16"):
    """A --fsdp checkpoint's model part: its config (recording `dtype`) and shards/."""
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    (folder / "shards").mkdir()
    return folder


def test_a_sharded_checkpoint_is_no_model_to_start_from_nor_to_generate_with(
        tiny_model, tmp_path):
    """Its weights are in shards that only a resumed --fsdp run reads: loaded as a model it
    would be random weights, trained or sampled as if they were the checkpoint's."""
    folder = sharded_model_folder(tiny_model, tmp_path / "checkpoint-4")
    with pytest.raises(InputError) as refused:
        load_model(str(folder), load_tokenizer(str(tiny_model)))
    assert "a checkpoint saved under --fsdp holds its weights in shards, which only --resume " \
           "reads (with --fsdp); the run's best model, whole, is in its " \
           "--downstream_model_dir" in str(refused.value)


def test_a_resumed_sharded_checkpoint_builds_fp32_master_weights_whatever_its_config_says(
        tiny_model, tmp_path):
    folder = sharded_model_folder(tiny_model, tmp_path / "checkpoint-4", dtype="bfloat16")
    model = load_model(str(folder), load_tokenizer(str(tiny_model)), resuming=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


SAVED = {"model": "m", "corpus": "c", "batch_size": 16, "world_size": 2, "fsdp": True,
         "group_by_length": False, "seed": 7}


def resumed(**changes):
    return {**SAVED, **changes}


def test_a_sharded_checkpoint_resumes_on_other_processes_with_the_same_global_batch(capsys):
    check_resume_args(SAVED, resumed(world_size=1, batch_size=32), reshards=True)
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: --resume: the checkpoint was trained on 2 processes and this run has 1: "
        "resharded, with the same global batch of 32, it continues the run, no longer bit "
        "for bit"]
    check_resume_args(SAVED, resumed(world_size=4, batch_size=8), reshards=True)
    assert "on 2 processes and this run has 4" in capsys.readouterr().err
    check_resume_args(SAVED, resumed(), reshards=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("current, message", [
    (resumed(world_size=1), "--resume: the checkpoint was trained with a global batch of 32 "
     "examples (--batch_size 16 on each of 2 processes) and this run has 16 x 1; use "
     "--batch_size 32 to keep it"),
    (resumed(world_size=3, batch_size=10), "--resume: the checkpoint was trained with a global "
     "batch of 32 examples (--batch_size 16 on each of 2 processes) and this run has 10 x 3; "
     "resume on a number of processes that divides 32"),
    (resumed(world_size=1, batch_size=32, group_by_length=True), "--resume: --group_by_length "
     "groups each process's share of the data by length, so this run's 1 would train on other "
     "batches than the checkpoint's 2 processes; resume on 2 processes"),
    (resumed(fsdp=False), "--resume: the checkpoint was saved with --fsdp; resume it with "
     "--fsdp, or start a new --downstream_model_dir"),
    (resumed(fsdp=False, world_size=1, batch_size=32), "--resume: the checkpoint was saved with "
     "--fsdp; resume it with --fsdp"),
    (resumed(batch_size=8), "--resume: --batch_size is 8 but the checkpoint was trained with "
     "16"),
])
def test_what_a_sharded_checkpoint_refuses(current, message):
    with pytest.raises(InputError) as refused:
        check_resume_args(SAVED, current, warn=False, reshards=True)
    assert str(refused.value).startswith(message)


def test_an_unsharded_checkpoint_refuses_fsdp_and_other_processes():
    unsharded = {k: v for k, v in SAVED.items() if k != "fsdp"}  # saved before --fsdp
    with pytest.raises(InputError, match="saved without --fsdp; resume it without --fsdp"):
        check_resume_args(unsharded, resumed(), warn=False, reshards=True)
    with pytest.raises(InputError, match="trained on 2 replicas and this run has 1"):
        check_resume_args(unsharded, resumed(fsdp=False, world_size=1, batch_size=32), False,
                          reshards=True)


def sharded_checkpoint(folder):
    """What save_checkpoint writes under --fsdp, written by this process alone."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "tokenizer.json").write_text("{}")
    torch.save({"progress": {"step": 4}}, folder / "training_state.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state_0.pt")
    with pytest.warns(UserWarning):  # no process group: torch.distributed.checkpoint says so
        dcp.save({"model": {"w": torch.ones(1000)}}, checkpoint_id=folder / "shards")
    return folder


def test_a_sharded_checkpoint_is_complete_and_one_cut_short_is_skipped(tmp_path, capsys):
    checkpoint = sharded_checkpoint(tmp_path / "checkpoint-4")
    assert runtime.rundir.damage(checkpoint) is None
    assert runtime.rundir.latest_checkpoint(tmp_path) == checkpoint
    shard = next((checkpoint / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert runtime.rundir.damage(checkpoint).startswith(
        f"shards does not load ({shard.name} holds 100 bytes of ")
    assert runtime.rundir.latest_checkpoint(tmp_path) is None
    assert f"skipping {checkpoint}: shards does not load" in capsys.readouterr().err
    (checkpoint / "shards" / ".metadata").unlink()  # a save cut before its index
    assert runtime.rundir.damage(checkpoint).startswith("shards does not load")


def test_a_backend_that_cannot_reshard_refuses_another_number_of_replicas():
    """XLA's FSDP: each replica's shard file is its own, so its checkpoints resume only on
    as many replicas as wrote them (torch.distributed.checkpoint's reshard)."""
    with pytest.raises(InputError, match="the checkpoint was trained on 2 replicas and this "
                                         "run has 4; resume on as many devices"):
        check_resume_args(SAVED, resumed(world_size=4, batch_size=8), False, reshards=False)
    assert not XlaFsdpBackend.reshards


def test_a_checkpoint_missing_a_replica_rng_state_is_skipped(tmp_path):
    checkpoint = sharded_checkpoint(tmp_path / "checkpoint-4")
    torch.save({"progress": {"step": 4}, "settings": {"world_size": 2}},
               checkpoint / "training_state.pt")
    assert runtime.rundir.damage(checkpoint) == "rng_state_1.pt is missing (one per replica)"
    torch.save({"cpu": torch.get_rng_state()}, checkpoint / "rng_state_1.pt")
    assert runtime.rundir.damage(checkpoint) is None


def test_xla_replicas_shards_are_complete_only_all_of_them_and_each_whole(tmp_path):
    checkpoint = sharded_checkpoint(tmp_path / "checkpoint-4")
    for path in (checkpoint / "shards").iterdir():  # XLA's layout instead of dcp's
        path.unlink()
    shards = [checkpoint / "shards" / f"shard_{rank}_of_2.pt" for rank in range(2)]
    torch.save({"model": {"w": torch.ones(1000)}}, shards[0])
    assert runtime.rundir.damage(checkpoint) == (
        "shards does not load (holds 1 of 2 replicas' shards)")
    torch.save({"model": {"w": torch.ones(1000)}}, shards[1])
    assert runtime.rundir.damage(checkpoint) is None
    shards[1].write_bytes(shards[1].read_bytes()[:200])
    assert runtime.rundir.damage(checkpoint).startswith("shards does not load (")


def test_each_sharded_layout_resumed_by_the_other_backend_names_where_it_resumes(tmp_path):
    """torchrun's shards (torch.distributed.checkpoint) on a TPU host, XLA's under torchrun."""
    replica = types.SimpleNamespace(rank=0, world_size=2)
    replica.shard_file = functools.partial(XlaFsdpBackend.shard_file, replica)
    torchruns = sharded_checkpoint(tmp_path / "checkpoint-4")
    with pytest.raises(CheckpointError, match=f"--resume: {torchruns} was written by "
                                              f"torchrun's processes .--fsdp under torchrun.; "
                                              f"resume it there"):
        XlaFsdpBackend.load_shards(replica, None, None, torchruns)
    xlas = tmp_path / "checkpoint-6"
    (xlas / "shards").mkdir(parents=True)
    torch.save({"model": {}}, xlas / "shards" / "shard_0_of_2.pt")
    with pytest.raises(CheckpointError, match=f"--resume: {xlas} was written by XLA replicas"):
        FsdpBackend.load_shards(replica, None, None, xlas)

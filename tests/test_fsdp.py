"""--fsdp under torchrun with real CPU processes (gloo): sharded, they train what one process
with the whole global batch trains; sharded checkpoints resume exactly after kill -9, and
on another number of processes; a Llama-family model trains and exports. Each run starts
processes on a 2-core machine, so each test keeps to a few short runs."""
import re
import subprocess

import pytest
import torch
from conftest import ROOT, read_metrics, run_train
from test_replicas import assert_same_run, assert_same_weights, max_weight_difference
from test_torchrun import error_lines, run_args, torchrun, torchrun_command
from transformers import AutoModelForCausalLM

import runtime.rundir

pytestmark = pytest.mark.slow  # every test here runs train.py under torchrun


def torchrun_on(nproc, args, script="train.py", timeout=300):
    """torchrun with `nproc` processes, run to the end."""
    return subprocess.run(torchrun_command(args, script, nproc), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def train_losses(out, after=0):
    return {e["step"]: e["loss"] for e in read_metrics(out, "train") if e["step"] > after}


def assert_same_losses(a, b, tolerance):
    ours, theirs = read_metrics(a), read_metrics(b)
    assert [(e["event"], e["step"]) for e in ours] == [(e["event"], e["step"]) for e in theirs]
    for x, y in zip(ours, theirs):
        key = "val_loss" if x["event"] == "eval" else "loss"
        assert x[key] == pytest.approx(y[key], abs=tolerance), (x, y)


def test_two_sharded_processes_train_what_one_process_with_a_double_batch_trains(
        dropout_free_model, corpus, tmp_path):
    """2 processes x 16 examples, and x 8 examples x 2 accumulated (the gradients reduced
    after the last micro-batch only), against one process with 32: the same losses and
    weights, to the DDP test's tolerance. A low --max_grad_norm clips every step, so a norm
    taken over one process's shards alone would train something else. 33 validation
    reviews: one process scores 17 (2 batches), the other 16 (1 batch, and one that scores
    nothing, since every forward needs both)."""
    common = ["--max_steps", "4", "--precision", "fp32", "--max_grad_norm", "0.05",
              "--eval_size", "33", "--polarity_eval_size", "33"]
    reference = tmp_path / "one"
    result = run_train(run_args(dropout_free_model, corpus, reference, 32, *common))
    assert result.returncode == 0, result.stderr
    for batch, accumulation in [(16, 1), (8, 2)]:
        out = tmp_path / f"fsdp-{batch}"
        result = torchrun(run_args(dropout_free_model, corpus, out, batch, *common, "--fsdp",
                                   "--grad_accum_steps", str(accumulation)))
        assert result.returncode == 0, result.stderr
        assert "torchrun: 2 processes over gloo, fp32, sharded (FSDP)" in result.stdout
        assert_same_losses(out, reference, 1e-5)
        assert_same_weights(out, reference, dropout_free_model)  # the best models, exported
        assert runtime.rundir.is_complete(out / "checkpoint-4")
        assert sorted(p.name for p in (out / "checkpoint-4" / "shards").glob("*.distcp")) == [
            "__0_0.distcp", "__1_0.distcp"]
        assert not (out / "checkpoint-4" / "model.safetensors").exists()


def test_kill_9_mid_epoch_then_resume_latest_ends_as_an_uninterrupted_run(
        tiny_model, corpus, tmp_path):
    """Dropout on and the CPU's default precision (bf16 where it has AMX): each process's
    shards, optimizer state and random state continue exactly."""
    run = ["--max_steps", "6", "--save_every_steps", "3", "--log_every", "1", "--fsdp"]
    reference = tmp_path / "reference"
    assert torchrun(run_args(tiny_model, corpus, reference, 16, *run)).returncode == 0
    args = run_args(tiny_model, corpus, tmp_path / "out", 16, *run)
    killed = torchrun(["sigkill", "5", "--", *args], script="tests/interrupt.py")
    assert killed.returncode != 0
    assert runtime.rundir.latest_checkpoint(tmp_path / "out").name == "checkpoint-3"
    resumed = torchrun(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 3, epoch 1)" in resumed.stdout
    assert_same_run(tmp_path / "out", reference)


@pytest.mark.parametrize("fault, who", [("shard-disk-full", "process 1: "),
                                        ("disk-full", "")])
def test_a_checkpoint_that_one_process_cannot_write_is_one_line_and_keeps_the_last(
        tiny_model, corpus, tmp_path, fault, who):
    """Process 1's shards, or the master's training_state.pt (the others still write their
    shards: a collective, which must not leave them waiting), hit a full disk."""
    out = tmp_path / "out"
    args = run_args(tiny_model, corpus, out, 16, "--max_steps", "4", "--save_every_steps", "2",
                    "--fsdp")
    result = torchrun([fault, "4", "--", *args], script="tests/interrupt.py", timeout=150)
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        f"error: could not write {out / 'checkpoint-4'} ({who}[Errno 28] No space left "
        f"on device); {out / 'checkpoint-2'} is intact. Free some space, then run the same "
        f"command with --resume latest"], result.stderr
    assert [p.name for p in runtime.rundir.checkpoints(out)] == ["checkpoint-2"]
    assert runtime.rundir.is_complete(out / "checkpoint-2")


def test_a_checkpoint_of_2_processes_resumes_on_1_and_on_2(
        dropout_free_model, corpus, tmp_path):
    """Resharded onto 1 process with the same global batch, the run continues where the
    epoch stood (the same examples each step): the losses of the run on 2, to rounding; on
    2 again, exactly. Another global batch is refused in one line naming the fix."""
    run = ["--max_steps", "6", "--save_every_steps", "3", "--precision", "fp32", "--fsdp"]
    two = tmp_path / "two"
    assert torchrun(run_args(dropout_free_model, corpus, two, 16, *run)).returncode == 0
    checkpoint = ["--resume", str(two / "checkpoint-3")]
    again = tmp_path / "again"
    result = torchrun(run_args(dropout_free_model, corpus, again, 16, *run, *checkpoint))
    assert result.returncode == 0, result.stderr
    assert "no longer bit for bit" not in result.stderr
    assert train_losses(again) == train_losses(two, after=3)

    one = tmp_path / "one"
    refused = torchrun_on(1, run_args(dropout_free_model, corpus, one, 16, *run, *checkpoint))
    assert refused.returncode != 0
    assert error_lines(refused.stderr) == [
        "error: --resume: the checkpoint was trained with a global batch of 32 examples "
        "(--batch_size 16 on each of 2 processes) and this run has 16 x 1; use --batch_size "
        "32 to keep it"]
    result = torchrun_on(1, run_args(dropout_free_model, corpus, one, 32, *run, *checkpoint))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("warning")] == [
        "warning: --resume: the checkpoint was trained on 2 processes and this run has 1: "
        "resharded, with the same global batch of 32, it continues the run, no longer bit "
        "for bit"]
    assert train_losses(one) == pytest.approx(train_losses(two, after=3), abs=1e-5)
    assert max_weight_difference(one, two) < 1e-4


def tiny_llama(folder, tokenizer_from):
    """A 2-layer Llama (rotary positions: inv_freq, a buffer in no state dict; RMSNorm;
    untied output layer) with the fixtures' tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_sharded_llama_trains_what_one_process_trains_and_exports(tiny_model, corpus,
                                                                    tmp_path):
    """Another architecture than GPT-2: the blocks found by `_no_split_modules`, the rotary
    buffers of the processes that built the model without weights kept (else their
    positions would be garbage and the losses differ), the export loadable."""
    llama = tiny_llama(tmp_path / "llama", tiny_model)
    common = ["--max_steps", "3", "--precision", "fp32"]
    reference = tmp_path / "one"
    assert run_train(run_args(llama, corpus, reference, 32, *common)).returncode == 0
    out = tmp_path / "fsdp"
    result = torchrun(run_args(llama, corpus, out, 16, *common, "--fsdp"))
    assert result.returncode == 0, result.stderr
    assert_same_losses(out, reference, 1e-5)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert_same_weights(out, reference, llama)


@pytest.mark.parametrize("mode", [[], ["--every_process"]])
def test_load_once_reports_each_process_peak_memory(tiny_model, mode):
    """benchmarks/load_once.py, which measured docs/bigger-models.md's table, at a tiny size."""
    result = torchrun(["--pretrained_model_name", str(tiny_model), *mode],
                      script="benchmarks/load_once.py", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()[-2:]
    assert [line.split(":")[0] for line in lines] == ["process 0", "process 1"]
    assert all(re.fullmatch(r"process \d: peak RSS \d+ MiB", line) for line in lines)


CLIP_CHECK = """
import sys
import weakref
sys.path.insert(0, {root!r})
import torch
from model import load_tokenizer
from runtime.sharding import FsdpBackend
backend = FsdpBackend("cpu", "fp32", activation_checkpointing={recompute})
model = backend.load_model({model!r}, load_tokenizer({model!r})).train()  # as train.py
backend.distribute(model)
assert model.is_gradient_checkpointing == {recompute}
ids = torch.arange(2, 18).view(2, 8)[backend.rank:backend.rank + 1]  # a row each
model(input_ids=ids, labels=ids).loss.backward()  # FSDP averages the two rows' gradients
norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3).full_tensor()  # all gather
grads = {{name: p.grad.full_tensor() for name, p in model.named_parameters()}}
if backend.is_master:
    torch.save({{"norm": norm, "grads": grads}}, {out!r})
alive = weakref.ref(model)
del model
backend.close()
assert alive() is None, "the sharded model outlived its process group"
"""


@pytest.mark.parametrize("recompute", [False, True], ids=["", "activation_checkpointing"])
def test_clip_grad_norm_takes_the_norm_over_every_process_shards(dropout_free_model, tmp_path,
                                                                 recompute):
    """torch.nn.utils.clip_grad_norm_, as train_step calls it, on FSDP's sharded gradients:
    the norm of the whole gradient (not of one process's shards), and every shard scaled by
    it, as one process holding both rows computes; also when each block recomputes its
    activations in the backward (--activation_checkpointing with --fsdp). Closed, the
    backend leaves nothing of the model to outlive the process group."""
    script, out = tmp_path / "clip_check.py", tmp_path / "clipped.pt"
    script.write_text(CLIP_CHECK.format(root=str(ROOT), model=str(dropout_free_model),
                                        out=str(out), recompute=recompute))
    result = subprocess.run(torchrun_command([], str(script)), capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    sharded = torch.load(out)
    model = AutoModelForCausalLM.from_pretrained(dropout_free_model)
    ids = torch.arange(2, 18).view(2, 8)
    losses = [model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss for i in (0, 1)]
    (sum(losses) / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert sharded["norm"] == pytest.approx(norm.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(sharded["grads"][name], p.grad, atol=1e-9), name

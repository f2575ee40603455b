"""--activation_checkpointing: every transformer block runs its forward again in the backward
(counted by a hook), and the loss and its gradients are those without it, with
dropout on too (its masks drawn again, from the same generator state), on the CPU, through
DDP and on XLA:CPU; evaluation and generation do not recompute; a model that cannot is one
line."""
import copy
import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch

import data
from conftest import ROOT, read_metrics
import runtime.backends
import runtime.checkpoint
import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer, unwrapped
from options import parse_args
from runtime.activations import checkpoint_blocks
from runtime.backends import Backend
from runtime.torchrun import TorchrunBackend
from runtime.errors import InputError
from runtime.launch import Replica, run_process


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def features(tokenizer):
    return make_features(tokenizer)


def make_features(tokenizer):
    texts = [" ".join(["정말", "최고", "영화", "별로"][: 1 + i % 4] * (1 + i % 5)) for i in range(12)]
    return corpus_features.encode(
        corpus_read.Reviews(texts, [i % 2 for i in range(12)]), tokenizer, 16)


def with_dropout(model, p):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


def count_block_forwards(model):
    """A list that grows by one as each forward of one of the model's blocks starts (a
    recomputation stops once it has rebuilt what the backward needs, before the end)."""
    calls = []
    for block in unwrapped(model).transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def step(model, batch, reseed, sync=lambda: None):
    """The loss and the gradients of one micro-batch, as train_step takes them."""
    reseed()
    model.zero_grad(set_to_none=True)
    loss = train.token_loss_sum(model, batch)
    loss.backward()
    sync()  # XLA: one graph for the step, not one for each gradient read
    return loss.detach(), {name: p.grad for name, p in unwrapped(model).named_parameters()}


def compare(plain, recomputing, batch, reseed, sync=lambda: None):
    """Trains one micro-batch through both; the same loss and gradients, and each block of
    `recomputing` ran twice (its forward, then again in the backward)."""
    plain_calls, calls = count_block_forwards(plain), count_block_forwards(recomputing)
    expected_loss, expected = step(plain, batch, reseed, sync)
    loss, grads = step(recomputing, batch, reseed, sync)
    blocks = len(plain.transformer.h)
    assert (len(plain_calls), len(calls)) == (blocks, 2 * blocks)
    torch.testing.assert_close(loss.cpu(), expected_loss.cpu(), rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name].cpu(), grad.cpu(), rtol=1e-5, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_cpu_recomputes_every_block_with_the_same_gradients(tiny_model, tokenizer,
                                                                features, dropout):
    plain = with_dropout(load_model(str(tiny_model), tokenizer), dropout).train()
    recomputing = Backend("cpu", "fp32", activation_checkpointing=True).distribute(
        copy.deepcopy(plain))
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 12,
                               packed=True)[list(range(12))]  # train.py's default batches
    compare(plain, recomputing, batch, lambda: torch.manual_seed(3))
    # The generator is where it would be without recomputing: a resumed run stays exact.
    after = torch.get_rng_state()
    step(plain, batch, lambda: torch.manual_seed(3))
    assert torch.equal(torch.get_rng_state(), after)


def test_evaluation_and_generation_do_not_recompute(tiny_model, tokenizer, features):
    plain = load_model(str(tiny_model), tokenizer)
    model = Backend("cpu", "fp32", activation_checkpointing=True).distribute(
        copy.deepcopy(plain).train())
    calls = count_block_forwards(model)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 12)[list(range(12))]
    train.token_loss_sum(model, batch).backward()
    assert len(calls) == 2 * len(model.transformer.h)  # training recomputes
    calls.clear()
    model.eval()
    with torch.no_grad():
        train.token_loss_sum(model, batch)
    assert len(calls) == len(model.transformer.h)
    prompt = torch.tensor([[0, 5, 9]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(prompt, **settings),
                       plain.eval().generate(prompt, **settings))


def test_a_model_that_cannot_recompute_is_refused_in_one_line():
    from transformers import JetMoeConfig, JetMoeForCausalLM
    model = JetMoeForCausalLM(JetMoeConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_key_value_heads=1,
        kv_channels=8, intermediate_size=16, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(InputError) as refused:
        Backend("cpu", "fp32", activation_checkpointing=True).distribute(model)
    assert str(refused.value) == (
        "--activation_checkpointing: this jetmoe model cannot recompute its blocks' "
        "activations (transformers' supports_gradient_checkpointing is False); leave the "
        "flag out")


def test_the_flag_reaches_every_backend_that_launch_builds(train_args, monkeypatch):
    cfg = train.config(parse_args(train_args + ["--activation_checkpointing"]))
    assert run_process(lambda backend, cfg: backend, lambda cfg: None, cfg,
                       "cpu").activation_checkpointing
    built = []
    for name, value in torchrun_variables().items():  # one process of one
        monkeypatch.setenv(name, value)
    run_process(lambda backend, cfg: built.append(backend.activation_checkpointing),
                lambda cfg: None, cfg, "cpu")

    class OneReplica:
        world_size = 1
    monkeypatch.setattr("runtime.launch.XlaBackend",
                        lambda *args: built.append(args) or OneReplica())
    Replica(lambda backend, cfg: None, ())(0, cfg)
    assert built == [True, (None, True)]


def torchrun_variables():
    """What torchrun would set for the only process of a run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


@pytest.mark.slow
def test_train_py_with_the_flag_trains_what_it_trains_without(train_args, tmp_path,
                                                              monkeypatch):
    """The whole run, dropout on: its evaluations (generation included), checkpoints and the
    best model's export, with the same losses at every step."""
    applied = []

    def spy(model, xla=False):
        applied.append(xla)
        checkpoint_blocks(model, xla)
    monkeypatch.setattr(runtime.backends, "checkpoint_blocks", spy)
    for name, flag in (("without", []), ("with", ["--activation_checkpointing"])):
        assert train.main([*train_args, "--downstream_model_dir", str(tmp_path / name),
                           "--max_steps", "3", "--precision", "fp32", *flag]) == 0
    assert applied == [False]
    ours, theirs = read_metrics(tmp_path / "with"), read_metrics(tmp_path / "without")
    assert [(e["event"], e["step"]) for e in ours] == [(e["event"], e["step"]) for e in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss", "polarity_accuracy"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), (a, b)
    assert (tmp_path / "with" / "model.safetensors").is_file()


def test_a_resume_does_not_compare_it():
    """It changes nothing a step computes: a run may resume with it on or off, and from a
    checkpoint saved before the flag existed, without a warning."""
    saved = {"pretrained_model_name": "m", "model": "digest", "world_size": 1}
    with mock.patch("builtins.print") as printed:
        runtime.checkpoint.check_resume_args(saved, {**saved, "activation_checkpointing": True})
    printed.assert_not_called()


def test_ddp_recomputes_with_the_same_gradients(tiny_model, tokenizer, features, monkeypatch):
    """TorchrunBackend sets it on the model before DDP wraps it (one process of one)."""
    for name, value in torchrun_variables().items():
        monkeypatch.setenv(name, value)
    plain = with_dropout(load_model(str(tiny_model), tokenizer), 0.1).train()
    backend = TorchrunBackend("cpu", "fp32", activation_checkpointing=True)
    try:
        wrapped = backend.distribute(copy.deepcopy(plain))
        batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 12,
                                   packed=True)[list(range(12))]
        compare(plain, wrapped, batch, lambda: torch.manual_seed(3))
    finally:
        backend.close()


def test_xla_recomputes_every_block_behind_a_barrier_with_the_same_gradients(tiny_model):
    """Without dropout and with it, on one XLA:CPU device, in a process of its own: torch's
    autograd engine sizes its device queues at the first backward of a process, so XLA's
    backward fails in one where torch_xla was imported after a CPU backward ran. Without
    torch_xla's optimization barrier the compiler could merge the recomputed forward into the
    first and keep every activation."""
    code = (f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'tests')]!r}\n"
            f"import test_activation_checkpointing as t\n"
            f"t.xla_step_matches({str(tiny_model)!r}, 0.0)\n"
            f"t.xla_step_matches({str(tiny_model)!r}, 0.1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PJRT_DEVICE": "CPU"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def xla_step_matches(tiny_model, dropout):
    import torch_xla
    import torch_xla.core.xla_model as xm
    from runtime.backends import XlaBackend
    backend = XlaBackend("fp32", activation_checkpointing=True)
    tokenizer = load_tokenizer(tiny_model)
    plain = with_dropout(load_model(tiny_model, tokenizer, device=backend.device),
                         dropout).train()
    recomputing = backend.distribute(copy.deepcopy(plain))
    batch = data.ReviewBatches(make_features(tokenizer), tokenizer.pad_token_id, True, 12,
                               packed=True)[list(range(12))]
    batch = {k: v.to(backend.device) for k, v in batch.items()}

    def reseed():
        xm.set_rng_state(3, backend.device)
    _, grads = step(recomputing, batch, reseed)
    assert "opt-barrier" in torch_xla._XLAC._get_xla_tensors_hlo(list(grads.values()))
    compare(plain, recomputing, batch, reseed, sync=torch_xla.sync)

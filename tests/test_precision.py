"""bf16 where the hardware multiplies it fast: the CPU's default follows AMX, and a bf16
run on the CPU learns while its weights, optimizer and checkpoints stay fp32."""
import pytest
import torch
from conftest import read_metrics, run_train
from safetensors.torch import load_file

import runtime.backends


def test_the_cpu_default_is_bf16_with_amx_and_fp32_without(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.backends.Backend("cpu", None).precision == "bf16"
    assert runtime.backends.Backend("cpu", "fp32").precision == "fp32"  # --precision decides
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runtime.backends.Backend("cpu", None).precision == "fp32"
    assert runtime.backends.Backend("cpu", "bf16").precision == "bf16"


@pytest.mark.slow
def test_bf16_on_the_cpu_learns_and_keeps_fp32_weights(train_args, tmp_path):
    result = run_train(train_args + ["--precision", "bf16", "--max_steps", "6"])
    assert result.returncode == 0, result.stderr
    assert "cpu (CPU), bf16" in result.stdout
    evals = read_metrics(tmp_path / "out", "eval")
    assert [e["step"] for e in evals] == [0, 6] and evals[1]["val_loss"] < evals[0]["val_loss"]
    # Autocast computes in bf16; what is stored and updated stays fp32.
    weights = load_file(tmp_path / "out" / "checkpoint-6" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    state = torch.load(tmp_path / "out" / "checkpoint-6" / "training_state.pt",
                       weights_only=True)
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values()
               if v.dim() > 0]
    assert moments and {m.dtype for m in moments} == {torch.float32}


@pytest.mark.slow
def test_resuming_in_another_precision_says_so(train_args, capsys):
    """The precision is recorded as run, not as asked (unset lets the machine choose), so a
    checkpoint trained in fp32 and resumed where bf16 is chosen names the change."""
    import train
    args = train_args + ["--max_steps", "2", "--save_every_steps", "2"]
    assert train.main(args + ["--precision", "fp32"]) == 0
    capsys.readouterr()
    assert train.main(args + ["--precision", "bf16", "--resume", "latest"]) == 0
    assert "warning: --resume: --precision changed from 'fp32' to 'bf16'" in capsys.readouterr().err

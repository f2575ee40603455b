"""The loop's pieces used the way the README's "Adapting the loop" tells a reader to use
them in a loop of their own: no command line, no checkpoints, no XLA."""
import pytest
import sched

import data
import runtime.backends
import train
from corpus import features as corpus_features
from model import load_model, load_tokenizer


def test_the_loops_pieces_train_the_tiny_model_without_the_command_line(tiny_model, corpus,
                                                                        tmp_path):
    tokenizer = load_tokenizer(str(tiny_model))
    features = corpus_features.load_features(corpus / "nsmc" / "ratings_train.txt", tokenizer,
                                             max_seq_length=32, cache_dir=tmp_path)
    device = runtime.backends.Backend("cpu", "fp32")
    model = load_model(str(tiny_model), tokenizer, device=device.device).train()
    optimizer = device.optimizer(train.param_groups(model, weight_decay=0.0), lr=1e-3)
    steps = 32
    scheduler = sched.linear_warmup_decay(optimizer, warmup_steps=3, total_steps=steps)
    batches = data.TrainBatches(len(features), batch_size=16, world_size=1, rank=0, seed=0)
    dataset = data.ReviewBatches(features, tokenizer.pad_token_id, fixed_shape=False,
                                 batch_size=16)
    loader = data.make_loader(dataset, batches, workers=0, pin_memory=False)

    losses = []
    for epoch in range(2):
        batches.start_epoch(epoch)
        for batch in device.feed(loader):
            loss_sum, tokens = train.train_step(model, optimizer, scheduler, [batch], device,
                                                step=len(losses), max_grad_norm=1.0)
            losses.append((loss_sum / tokens).item())
    assert len(losses) == steps
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    assert scheduler.get_last_lr()[0] == 0.0  # the schedule ran to its end


@pytest.mark.slow
def test_the_machinery_stands_without_train_py_and_importing_does_no_work():
    """Modules a reader can skip or drop import neither train.py nor each other in a cycle,
    and importing train.py installs no signal handler (main does, when it runs)."""
    import subprocess
    import sys

    from conftest import ROOT
    code = ("import signal, sys\n"
            "for name in ['sched', 'data', 'model', 'corpus.read', 'corpus.features',"
            " 'runtime.backends', 'runtime.launch', 'runtime.checkpoint', 'runtime.rundir',"
            " 'runtime.reporting', 'task.polarity', 'task.generation', 'task.nsmc', 'generate']:\n"
            "    __import__(name)\n"
            "    assert 'train' not in sys.modules, name\n"
            "import train\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr

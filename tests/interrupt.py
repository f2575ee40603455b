"""Run train.py with a fault at a chosen optimizer step, as a real process:

    python tests/interrupt.py FAULT STEP -- <train.py arguments>

FAULT is one of
  sigkill        SIGKILL right after step STEP is computed (nothing else runs)
  sigterm        SIGTERM at the same point (the run should save and exit)
  kill-in-save   SIGKILL while checkpoint-STEP is being written
  disk-full      the write of checkpoint-STEP fails with ENOSPC
  shard-disk-full  under --fsdp, process 1's shards of checkpoint-STEP fail with ENOSPC
  nan            the loss of step STEP is NaN
  fail-replica   replica 1 alone raises an error in step STEP (XLA, 2 or more replicas)
  sigterm-in-eval    SIGTERM as evaluation number STEP starts (1: the one before training)
  two-signals-in-eval  SIGINT, then SIGTERM, as evaluation number STEP starts
  best-disk-full every export of the best model fails as on a full disk
  await-signal   after step STEP, wait (up to 2 minutes) for a signal sent from outside (to
                 torchrun, say), so that the run surely stops at STEP, a report step; each
                 process marks that it waits (awaiting_mark), for the test to signal then

On XLA the faults are set up in the replica process too: `xmp.spawn` starts it by importing
this script again (as __mp_main__, with the same sys.argv). Under torchrun every process
runs this script.
"""
import errno
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runtime.checkpoint  # noqa: E402
import train  # noqa: E402
from runtime.signals import StopSignal  # noqa: E402


def at_step(function, step, fault, step_of):
    """Wrap `function` so that `fault(function, *args)` runs instead when `step_of(*args)`,
    the optimizer step it works on, is `step`."""
    def wrapped(*args, **kwargs):
        if step_of(*args, **kwargs) == step:
            return fault(function, *args, **kwargs)
        return function(*args, **kwargs)
    return wrapped


def computing(model, optimizer, scheduler, window, backend, step, *rest):
    return step + 1  # train_step computes step+1 (its `step` counts the steps done)


def saving(progress, *rest):
    return progress.step  # runtime.checkpoint.training_state, called inside save_checkpoint


def after(sig):
    def fault(function, *args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return result
    return fault


def fail_in_replica_1(function, model, optimizer, scheduler, window, backend, *rest):
    if backend.rank == 1:
        raise RuntimeError("injected failure in replica 1")
    return function(model, optimizer, scheduler, window, backend, *rest)


def awaiting_mark(train_args, rank):
    """The file that process `rank` of an await-signal run creates once it waits for the
    signal, beside the run's output directory: a test that signals before every process
    is there would stop the run at an earlier step, whatever the machine's load."""
    out = Path(train_args[train_args.index("--downstream_model_dir") + 1])
    return out.with_name(f"{out.name}.awaiting-signal-{rank}")


def install_fault():
    """Wrap train.py's functions as sys.argv asks; returns the arguments for train.py."""
    fault, step, dashes, *train_args = sys.argv[1:]
    step = int(step)
    assert dashes == "--", __doc__
    if fault == "fail-replica":
        train.train_step = at_step(train.train_step, step, fail_in_replica_1, computing)
    elif fault == "await-signal":
        def wait_for_signal(function, *args):
            result = function(*args)
            awaiting_mark(train_args, args[4].rank).touch()  # the test may signal now
            deadline = time.monotonic() + 120
            while StopSignal.signum is None and time.monotonic() < deadline:
                time.sleep(0.05)
            return result
        train.train_step = at_step(train.train_step, step, wait_for_signal, computing)
    elif fault in ("sigkill", "sigterm"):
        sig = signal.SIGKILL if fault == "sigkill" else signal.SIGTERM
        train.train_step = at_step(train.train_step, step, after(sig), computing)
    elif fault == "kill-in-save":
        runtime.checkpoint.training_state = at_step(runtime.checkpoint.training_state, step,
                                                    lambda *a: os.kill(os.getpid(), signal.SIGKILL),
                                                    saving)
    elif fault == "disk-full":
        def no_space(function, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        runtime.checkpoint.training_state = at_step(
            runtime.checkpoint.training_state, step, no_space, saving
        )
    elif fault == "shard-disk-full":  # process 1 alone cannot write its shards (--fsdp)
        from torch.distributed.checkpoint import FileSystemWriter
        real_write = FileSystemWriter.write_data

        def write_data(writer, *args):
            if os.environ.get("RANK") == "1" and f"checkpoint-{step}.tmp" in str(writer.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(writer, *args)
        FileSystemWriter.write_data = write_data
    elif fault in ("sigterm-in-eval", "two-signals-in-eval"):
        signals = (
            [signal.SIGTERM] if fault == "sigterm-in-eval" else [signal.SIGINT, signal.SIGTERM]
        )
        original, calls = train.evaluate, {"n": 0}

        def signalled_evaluate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                for sig in signals:
                    os.kill(os.getpid(), sig)
            return original(*args, **kwargs)
        train.evaluate = signalled_evaluate
    elif fault == "best-disk-full":  # every export of the best model; STEP is not used
        from safetensors import SafetensorError
        real_save = runtime.checkpoint.save_pretrained

        def no_space(model, tokenizer, directory, state_dict):
            if Path(directory).name != ".best.tmp":
                return real_save(model, tokenizer, directory, state_dict)
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")
        runtime.checkpoint.save_pretrained = no_space
    elif fault == "nan":
        original = train.train_step
        calls = {"n": 0}

        def nan_loss(*args, **kwargs):
            calls["n"] += 1
            loss_sum, tokens = original(*args, **kwargs)
            return (loss_sum * float("nan") if calls["n"] == step else loss_sum), tokens
        train.train_step = nan_loss
    else:
        sys.exit(f"unknown fault {fault!r}")
    return train_args


if __name__ == "__mp_main__":  # an XLA replica process
    install_fault()

if __name__ == "__main__":
    sys.exit(train.main(install_fault()))

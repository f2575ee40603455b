"""What a run keeps in `--downstream_model_dir`, written so that a crash, a kill or a full
disk at any moment loses nothing already saved, and read back so that `--resume` continues
exactly where a run stopped:

    checkpoint-<step>/   the model (Hugging Face format), training_state.pt (optimizer,
                         scheduler, progress, arguments) and rng_state_<rank>.pt per replica
    config.json, model.safetensors, tokenizer files: the best model so far
    metrics.jsonl        one event a line (train, eval; written by reporting.py)
    .lock                held while a run writes here

Every replica takes part in a save: checkpoints are written under a temporary name and
renamed once every replica's part is written. A CPU/GPU-only copy of the loop can keep
`save_checkpoint`/`restore` and drop the barriers (they do nothing there).
"""
import contextlib
import fcntl
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
from data import InputError
from model import cpu_state_dict, save_pretrained


class CheckpointError(Exception):
    """A save failed (a full disk, say); what was saved before is intact."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: nothing it trained may be saved."""


@dataclass
class Progress:
    step: int = 0               # optimizer steps done
    epoch: int = 0              # the epoch in progress
    batches_done: int = 0       # micro-batches of that epoch already trained on
    best_val_loss: float = math.inf


# Arguments that change what a step computes: resuming with others cannot continue the run.
SHAPE_ARGS = ["pretrained_model_name", "downstream_corpus_name", "train_file", "max_seq_length",
              "batch_size", "grad_accum_steps", "seed", "world_size"]
NOT_COMPARED = ["resume", "debug", "cpu_workers", "compile", "cache_dir",
                "downstream_model_dir", "downstream_corpus_root_dir"]


# --------------------------------------------------------------------------- saving

def save_checkpoint(args, backend, progress, model, tokenizer, optimizer, scheduler):
    """Write `checkpoint-<step>/` and keep the newest `--keep_checkpoints` of them.

    Every replica writes its own RNG state and learns whether all writes succeeded
    (xm.save is not used: a write that fails on one replica would leave the others waiting
    in its barrier forever)."""
    out = Path(args.downstream_model_dir)
    backend.sync()
    final, tmp = out / f"checkpoint-{progress.step}", out / f"checkpoint-{progress.step}.tmp"

    def write_model_and_state():
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tokenizer, tmp, cpu_state_dict(model))
        torch.save(training_state(progress, optimizer, scheduler, args, backend.world_size),
                   tmp / "training_state.pt")

    error = write_or_error(write_model_and_state) if backend.is_master else None
    backend.barrier("checkpoint-started")  # the folder exists before the replicas write in it
    error = error or write_or_error(
        lambda: torch.save(backend.rng_state(), tmp / f"rng_state_{backend.rank}.pt"))
    if backend.any_replica(error is not None):
        if backend.is_master:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out, warn=False)
        raise CheckpointError(
            f"could not write {final} ({data.first_line(error) if error else 'on another replica'}); "
            f"{f'{previous} is intact' if previous else 'no earlier checkpoint exists'}. "
            f"Free some space, then run the same command with --resume latest")
    backend.barrier("checkpoint-written")
    if backend.is_master:
        replace_dir(tmp, final)
        prune_checkpoints(out, args.keep_checkpoints)
    backend.barrier("checkpoint-done")
    return final


def training_state(progress, optimizer, scheduler, args, world_size):
    """Everything but the weights and the random state that a resumed run needs."""
    return {"progress": asdict(progress),
            "optimizer": to_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "args": {**vars(args), "world_size": world_size}}


def write_or_error(write):
    """Run `write()`; return the OSError it raised (a full disk, say), or None."""
    try:
        write()
    except OSError as e:
        return e
    return None


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def replace_dir(src, dst):
    if dst.exists():  # the same step saved twice (an epoch's end that is also a save step)
        shutil.rmtree(dst)
    os.replace(src, dst)


def export_best(out, backend, model, tokenizer):
    """The best model so far, in Hugging Face format, at the top of `out`. Written beside
    and renamed into place file by file, so a crash leaves the old one."""
    out = Path(out)
    if backend.is_master:
        with saving(out / "best", previous=out):
            tmp = out / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tokenizer, tmp, cpu_state_dict(model))
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
    backend.barrier("best-exported")


@contextlib.contextmanager
def saving(what, previous):
    """Turn a failed write (a full disk, a read-only folder) into one clear line."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"could not write {what} ({data.first_line(e)}); what was "
                              f"already in {previous} is intact. Free some space, then run "
                              f"the same command with --resume latest") from None


# --------------------------------------------------------------------------- finding and resuming

def checkpoints(out):
    """checkpoint-<step> folders in `out`, newest first (temporary ones included)."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-").removesuffix(".tmp")
        if step.isdigit() and path.is_dir():
            found.append((int(step), path.name.endswith(".tmp"), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def is_complete(path):
    return all((path / f).is_file() for f in
               ("config.json", "model.safetensors", "training_state.pt", "rng_state_0.pt"))


def latest_checkpoint(out, warn=True):
    for path in checkpoints(out):
        if not path.name.endswith(".tmp") and is_complete(path):
            return path
        if warn:
            print(f"warning: skipping {path}: incomplete (a save was interrupted)", file=sys.stderr)
    return None


def prune_checkpoints(out, keep):
    complete = [p for p in checkpoints(out) if not p.name.endswith(".tmp")]
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(resume, out):
    """The folder `--resume` names: None, 'latest' (the newest complete one) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(out)
        if path is None:
            print(f"--resume latest: no checkpoint in {out} yet; starting from the beginning",
                  file=sys.stderr)
        return path
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise InputError(f"--resume {resume}: not a complete checkpoint folder (it needs "
                         f"config.json, model.safetensors, training_state.pt, rng_state_0.pt)")
    return path


def agreed_checkpoint(backend, resume, out):
    """The checkpoint to resume from, as the master chose it, so that every replica
    continues from the same step."""
    chosen = find_resume_checkpoint(resume, out) if backend.is_master else None
    chosen = backend.barrier("resume-from", str(chosen or "").encode())[0].decode()
    return Path(chosen) if chosen else None


def check_output_shared(backend, out):
    """Every replica must see what the master writes in `out`: it resumes from there. On a
    TPU pod, where each host runs this script, a folder on a host's own disk would leave
    the hosts resuming from different steps and waiting for each other forever: one line
    now instead."""
    if backend.world_size == 1:
        return
    probe = Path(out) / ".replicas-see-this"
    token = f"{os.getpid()} {time.time_ns()}"
    if backend.is_master:
        probe.write_text(token)
    token = backend.barrier("output-probe", token.encode())[0].decode()  # the master's
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    if backend.any_replica(not seen):
        raise InputError(f"--downstream_model_dir {out}: some replicas cannot see what the "
                         f"master writes there; on a TPU pod it must be storage every host "
                         f"sees (NFS, a Filestore or GCS FUSE mount), at the same path")


def check_resume_args(saved, args, world_size):
    """Refuse to continue with arguments that change the work; warn about the rest."""
    current = {**vars(args), "world_size": world_size}
    changed = [k for k in current if k not in NOT_COMPARED and saved.get(k) != current[k]]
    fatal = [k for k in changed if k in SHAPE_ARGS]
    if "world_size" in fatal:
        raise InputError(f"--resume: the checkpoint was trained on {saved.get('world_size')} "
                         f"replicas and this run has {world_size}; resume on as many devices "
                         f"(CPU_NUM_DEVICES on the CPU, the same TPU), or start a new "
                         f"--downstream_model_dir")
    if fatal:
        k = fatal[0]
        raise InputError(f"--resume: --{k} is {current[k]!r} but the checkpoint was trained "
                         f"with {saved.get(k)!r}; use the same value or start a new "
                         f"--downstream_model_dir")
    for k in changed:
        print(f"warning: --resume: --{k} changed from {saved.get(k)!r} to {current[k]!r}",
              file=sys.stderr)


def restore(path, args, backend, optimizer, scheduler):
    """Load the optimizer, scheduler and this replica's RNG state from `path` (the weights
    were loaded from it with the model); returns the progress to continue from."""
    state = torch.load(path / "training_state.pt", weights_only=True)
    check_resume_args(state["args"], args, backend.world_size)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    backend.set_rng_state(torch.load(path / f"rng_state_{backend.rank}.pt", weights_only=True))
    return Progress(**state["progress"])


# --------------------------------------------------------------------------- the directory lock

@contextlib.contextmanager
def exclusive(directory):
    """Hold a lock on the output directory so two runs cannot write into it at once. The
    operating system releases it when the process ends, however it ends."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "a+")
    except OSError as e:
        raise InputError(f"--downstream_model_dir {directory} cannot be written "
                         f"({data.first_line(e)}); choose a writable directory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"--downstream_model_dir {directory} is in use by another "
                             f"training run (pid {lock.read().strip() or '?'}); wait for it "
                             f"to finish or choose another directory") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield

"""The output directory, `--downstream_model_dir`: owned by one run at a time (a lock per
host), never shared by two runs' checkpoints, seen alike by every host, and searched for the
checkpoint a run resumes from (the newest one that loads: a kill or a full disk can leave
files that exist but are cut short).

    checkpoint-<step>/   written by checkpoint.py
    config.json, model.safetensors, tokenizer files: the best model so far
    metrics.jsonl        one event a line (written by reporting.py)
    .lock                held while a run writes here
"""
import contextlib
import fcntl
import filecmp
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model import SHARDS, is_sharded
from runtime.backends import first_on_host
from runtime.errors import CheckpointError, InputError, first_line

# What a failed write raises: OSError for most, RuntimeError from torch.save on a full disk
# ("PytorchStreamWriter failed writing file"), SafetensorError from the safetensors writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_state.pt",
                    "rng_state_0.pt")


BEST_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Weights in other layouts than one model.safetensors, which another model may have left.
OTHER_WEIGHTS = ("model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def master_writes(backend, write):
    """Run `write()` on the master alone, and when it fails (CheckpointError) make every
    replica raise: a replica that raised alone would leave the others waiting for it at
    their next collective, forever. The master's error is the one the launcher prints."""
    error = None
    if backend.is_master:
        try:
            write()
        except CheckpointError as e:
            error = e
    if backend.any_replica(error is not None):
        raise error or CheckpointError("the master could not write (its error is above)")


@contextlib.contextmanager
def saving(what, previous):
    """Turn a failed write (a full disk, a read-only folder) into one clear line."""
    try:
        yield
    except WRITE_ERRORS as e:
        raise CheckpointError(f"could not write {what} ({first_line(e)}); what was "
                              f"already in {previous} is intact. Free some space, then run "
                              f"the same command with --resume latest") from None


# --------------------------------------------------------------------------- finding checkpoints


def checkpoints(out):
    """checkpoint-<step> folders in `out`, newest first by name (temporary ones included)."""
    found = []
    for path in Path(out).glob("checkpoint-*"):
        step = named_step(path)
        if step is not None and path.is_dir():
            found.append((step, path.name.endswith(".tmp"), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def named_step(path):
    """The step in the name of a checkpoint-<step> (or checkpoint-<step>.tmp) folder, or
    None for another name."""
    name = Path(path).name
    step = name.removeprefix("checkpoint-").removesuffix(".tmp")
    return int(step) if name.startswith("checkpoint-") and step.isdigit() else None


def held_step(path):
    """The step that the checkpoint folder `path` holds, read from its training_state.pt
    without reading the optimizer's tensors (mapped, not loaded), or None when it does not
    load."""
    try:
        state = torch.load(Path(path) / "training_state.pt", weights_only=True, mmap=True)
        return int(state["progress"]["step"])
    except Exception:  # whatever a damaged file makes its reader raise
        return None


def misnamed(path):
    """Why the name of checkpoint folder `path` cannot be trusted (it says another step than
    the folder holds: renamed or copied by hand), or None. Resuming, going back and pruning
    all go by the name: a wrong one would have them resume from, or delete, the wrong step."""
    named, held = named_step(path), held_step(path)
    if named is None or held is None or named == held:
        return None
    return (f"its name says step {named} but it holds step {held} (renamed?); rename it "
            f"checkpoint-{held}")


def is_complete(path):
    return damage(path) is None


def check_shards(folder):
    """Raise unless the shards in `folder` load. torch.distributed.checkpoint's (torchrun):
    the index it writes last, and every file as long as the index says (a copy cut short).
    XLA's (runtime/xla_sharding.py): every replica's file, each a dict that loads."""
    replicas = sorted(Path(folder).glob("shard_*_of_*.pt"))
    if replicas:
        expected = int(replicas[0].stem.rsplit("_", 1)[1])
        if len(replicas) != expected:
            raise ValueError(f"holds {len(replicas)} of {expected} replicas' shards")
        for path in replicas:  # mmap: the header and index are read, not every tensor
            if not isinstance(torch.load(path, weights_only=True, mmap=True), dict):
                raise ValueError(f"{path.name} does not hold a dict")
        return
    import torch.distributed.checkpoint as dcp  # only a torchrun --fsdp run's needs it
    index = dcp.FileSystemReader(folder).read_metadata()
    ends = {}
    for stored in index.storage_data.values():
        end = stored.offset + stored.length
        ends[stored.relative_path] = max(end, ends.get(stored.relative_path, 0))
    for name, end in ends.items():
        size = (Path(folder) / name).stat().st_size if (Path(folder) / name).is_file() else 0
        if size < end:
            raise ValueError(f"{name} holds {size} bytes of {end}")


def damage(path):
    """Why the checkpoint folder `path` cannot be resumed from, or None when every file
    loads. A kill or a full disk can leave files that exist but are cut short."""
    path = Path(path)
    sharded = is_sharded(path)  # its weights in shards/ (--fsdp), not in model.safetensors
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file() and not (sharded and name == "model.safetensors"):
            return f"{name} is missing"
    try:
        name = "config.json"
        json.loads((path / name).read_text(encoding="utf-8"))
        if sharded:
            name = SHARDS
            check_shards(path / name)
        else:
            name = "model.safetensors"
            with safe_open(path / name, "pt"):  # checks the header against the file's size
                pass
        for name in ["training_state.pt"] + sorted(p.name for p in path.glob("rng_state_*.pt")):
            state = torch.load(path / name, weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a dict")
            if name == "training_state.pt":
                saved = state.get("settings", state.get("args", {}))
                replicas = int(saved.get("world_size", 1)) if isinstance(saved, dict) else 1
    except Exception as e:  # whatever a damaged file makes its reader raise
        return f"{name} does not load ({first_line(e)})"
    missing = [f"rng_state_{rank}.pt" for rank in range(replicas)
               if not (path / f"rng_state_{rank}.pt").is_file()]
    return f"{missing[0]} is missing (one per replica)" if missing else None


def latest_checkpoint(out, warn=True):
    """The newest checkpoint that loads; the damaged and unfinished ones are skipped."""
    for path in checkpoints(out):
        problem = ("a save was interrupted" if path.name.endswith(".tmp")
                   else damage(path) or misnamed(path))
        if problem is None:
            return path
        if warn:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
    return None


def check_best_model(out, flag):
    """A run's folder whose best model is not there yet (train.py exports it after its first
    evaluation past step 0) but that holds checkpoints: name them, and how to use one."""
    out = Path(out)
    saved = [p.name for p in checkpoints(out) if not p.name.endswith(".tmp")]
    if not saved or (out / "config.json").exists():
        return
    raise InputError(f"{flag} {out}: no best model in it yet, only its checkpoints "
                     f"{', '.join(saved)}; give one of them, such as {flag} {out / saved[0]}")


def prune_checkpoints(out, keep):
    """Delete all but the newest `keep` checkpoints. One whose name is not the step it holds
    is neither counted nor deleted: its name cannot say whether it is newer."""
    complete = [p for p in checkpoints(out) if not p.name.endswith(".tmp") and not misnamed(p)]
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(resume, out, quiet=False):
    """The folder `--resume` names: None, 'latest' (the newest complete one) or a path.
    `quiet`: without the warnings (a look ahead; the run says them when it resumes)."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(out, warn=not quiet)
        if path is None and not quiet:
            print(f"--resume latest: no checkpoint in {out} yet; starting from the beginning",
                  file=sys.stderr)
        return path
    path = Path(resume).expanduser()
    problem = damage(path)
    if problem:
        raise InputError(f"--resume {resume}: not a checkpoint that loads: {problem}; use "
                         f"another checkpoint-<step> folder, or --resume latest")
    problem = misnamed(path)
    if problem:
        raise InputError(f"--resume {resume}: {problem}, or resume from another checkpoint")
    return path


def continues_here(resume, out):
    """Whether `--resume` continues the run kept in `out`: 'latest', or one of its
    checkpoints. A checkpoint in another folder starts that run's sequel here."""
    return resume == "latest" or (resume is not None and Path(resume).expanduser().resolve()
                                  .parent == Path(out).expanduser().resolve())


def check_fresh_start(out, resume, overwrite):
    """A run that does not continue the run in its folder (a fresh one, or one resumed from
    a checkpoint elsewhere) must not share the folder with that run's checkpoints: --resume
    latest would then pick whichever has the higher step, and going back and pruning would
    delete the other run's. Refuse, or with --overwrite_output_dir return the earlier run's
    checkpoints, for delete_earlier_run once every other check has passed."""
    old = checkpoints(out)
    if continues_here(resume, out) or not old:
        return []
    if not overwrite and resume is not None:
        raise InputError(f"--downstream_model_dir {out} holds another run ({old[0].name}) than "
                         f"the one --resume {resume} continues, and resuming would delete its "
                         f"checkpoints; choose another --downstream_model_dir, or pass "
                         f"--overwrite_output_dir to replace that run")
    if not overwrite:
        raise InputError(f"--downstream_model_dir {out} holds an earlier run ({old[0].name}); "
                         f"continue it with --resume latest, pass --overwrite_output_dir to "
                         f"replace it, or choose another directory")
    return old


def delete_earlier_run(out, old):
    """--overwrite_output_dir: delete the checkpoints `old`, metrics.jsonl and the best
    model. (On a TPU pod every host does this at once, hence the deletions that tolerate a
    file already gone.)"""
    if not old:
        return
    for path in best_model_files(out) + [Path(out) / "metrics.jsonl",
                                         Path(out) / ".replicas-see-this"]:
        path.unlink(missing_ok=True)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def best_model_files(out):
    """The files of the best model at the top of `out`."""
    out = Path(out)
    return ([out / name for name in BEST_MODEL_FILES if (out / name).is_file()]
            + [path for pattern in OTHER_WEIGHTS for path in sorted(out.glob(pattern))])


def move_model_into(new, out):
    """Move the files of the model folder `new` to the top of `out`, over the model there, so
    that `out` holds at every moment the old model whole, the new one whole, or no
    config.json and so no model at all: never the config of one beside the weights of the
    other. Between two exports of a run only the weights differ: one file, renamed whole.
    Otherwise (a first export over another run's model, or over one half written by a
    kill) config.json is taken away first and put back last, once every file is the new
    model's."""
    new, out = Path(new), Path(out)
    changed = [f for f in sorted(new.iterdir())
               if not (out / f.name).is_file() or not filecmp.cmp(f, out / f.name, False)]
    stale = [f for f in best_model_files(out) if not (new / f.name).exists()]
    if len(changed) > 1 or stale:
        (out / "config.json").unlink(missing_ok=True)
        for path in stale:
            path.unlink(missing_ok=True)
    for f in sorted(changed, key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)


def drop_later_checkpoints(out, step):
    """Resuming from `step` abandons the checkpoints after it (a damaged newest one, or the
    later steps of a run resumed from an earlier point): left there, they would be what
    --resume latest picks next time, and the pruning would delete the new ones instead. One
    whose name is not the step it holds is left alone: its name says nothing of its step."""
    for path in checkpoints(out):
        if named_step(path) > step and not misnamed(path):
            print(f"warning: removing {path}: it is later than the step resumed from",
                  file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)


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
                         f"master writes there; on several hosts (a TPU pod, torchrun --nnodes) "
                         f"it must be storage every host sees (NFS, a Filestore or GCS FUSE "
                         f"mount), at the same path")


# --------------------------------------------------------------------------- the directory lock


@contextlib.contextmanager
def exclusive(directory):
    """Hold a lock on the output directory so two runs cannot write into it at once. The
    operating system releases it when the process ends, however it ends. On a TPU pod every
    host runs this script on the same shared folder, and so does every node of a torchrun
    (GROUP_RANK): one lock per host, held by its first process."""
    if not first_on_host():  # torchrun's other processes on this host: the first holds it
        yield
        return
    directory = Path(directory)
    worker, node = os.environ.get("TPU_WORKER_ID"), int(os.environ.get("GROUP_RANK", 0))
    name = f".lock-worker{worker}" if worker else f".lock-node{node}" if node else ".lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / name, "a+")
    except OSError as e:
        raise InputError(f"--downstream_model_dir {directory} cannot be written "
                         f"({first_line(e)}); choose a writable directory") from None
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

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
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import data
from backend import first_on_host
from data import InputError
from model import cpu_state_dict, save_pretrained

# What a failed write raises: OSError for most, RuntimeError from torch.save on a full disk
# ("PytorchStreamWriter failed writing file"), SafetensorError from the safetensors writer.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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
    eval_pending: bool = False  # a stop cut this step's evaluation short: run it on resume


# On resume, arguments that change what a step computes or the schedule under way are
# refused: with others the run would not be the one it continues. The corpus is compared by
# content (its files' SHA-256), so its folder may move.
FIXED_ON_RESUME = ["pretrained_model_name", "max_seq_length", "batch_size", "grad_accum_steps", "seed", "epochs",
                   "max_steps", "warmup_ratio", "warmup_steps", "world_size", "corpus",
                   "group_by_length"]
# Applied from the resumed step on, in place of the values the optimizer saved.
APPLIED_ON_RESUME = ["learning_rate", "weight_decay"]
NOT_COMPARED = ["resume", "debug", "cpu_workers", "compile", "cache_dir", "overwrite_output_dir",
                "downstream_model_dir", "downstream_corpus_root_dir"]
CHECKPOINT_FILES = ("config.json", "model.safetensors", "training_state.pt", "rng_state_0.pt")
# What save_pretrained writes for a GPT-2 and its fast tokenizer: the best model's files.
BEST_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- saving

def save_checkpoint(args, backend, progress, model, tokenizer, optimizer, scheduler, run_facts):
    """Write `checkpoint-<step>/` and keep the newest `--keep_checkpoints` of them.

    Every replica writes its own RNG state and learns whether all writes succeeded
    (xm.save is not used: a write that fails on one replica would leave the others waiting
    in its barrier forever)."""
    out = Path(args.downstream_model_dir)
    backend.sync()
    check_finite_weights(model, progress.step)
    final, tmp = out / f"checkpoint-{progress.step}", out / f"checkpoint-{progress.step}.tmp"

    def write_model_and_state():
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tokenizer, tmp, cpu_state_dict(model))
        torch.save(training_state(progress, optimizer, scheduler, args, run_facts),
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


def training_state(progress, optimizer, scheduler, args, run_facts):
    """Everything but the weights and the random state that a resumed run needs.
    `run_facts`: what the arguments do not say (the number of replicas, the corpus)."""
    return {"progress": asdict(progress),
            "optimizer": to_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "args": {**vars(args), **run_facts}}


def write_or_error(write):
    """Run `write()`; return the error it raised (a full disk, say), or None."""
    try:
        write()
    except WRITE_ERRORS as e:
        return e
    return None


def check_finite_weights(model, step):
    """A non-finite loss is caught when it is reported; weights that overflowed without
    one (an infinite learning rate) are caught here, before anything is written. One host
    read for all the parameters."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise NonFiniteLoss(f"the weights became non-finite at step {step} (is the learning "
                            f"rate too high?); nothing was saved for this step")


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


def export_best(out, backend, model, tokenizer, step):
    """The best model so far, in Hugging Face format, at the top of `out`, so that
    `from_pretrained(out)` loads it. Written into a folder beside it, then each file renamed
    into place, `config.json` last: a kill at any moment leaves a model that loads (each
    rename is whole, and within a run only the weights change), or, during the very first
    export, no config.json and so no model at all."""
    out, tmp = Path(out), Path(out) / ".best.tmp"
    check_finite_weights(model, step)  # every replica: the weights are the same on each

    def write():
        try:
            with saving(out / "the best model", previous=out):
                shutil.rmtree(tmp, ignore_errors=True)
                save_pretrained(model, tokenizer, tmp, cpu_state_dict(model))
                for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                    os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    master_writes(backend, write)


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
    return damage(path) is None


def damage(path):
    """Why the checkpoint folder `path` cannot be resumed from, or None when every file
    loads. A kill or a full disk can leave files that exist but are cut short."""
    path = Path(path)
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        name = "config.json"
        json.loads((path / name).read_text(encoding="utf-8"))
        name = "model.safetensors"
        with safe_open(path / name, "pt"):  # checks the header against the file's size
            pass
        for name in ["training_state.pt"] + sorted(p.name for p in path.glob("rng_state_*.pt")):
            state = torch.load(path / name, weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a dict")
    except Exception as e:  # whatever a damaged file makes its reader raise
        return f"{name} does not load ({data.first_line(e)})"
    return None


def latest_checkpoint(out, warn=True):
    """The newest checkpoint that loads; the damaged and unfinished ones are skipped."""
    for path in checkpoints(out):
        problem = "a save was interrupted" if path.name.endswith(".tmp") else damage(path)
        if problem is None:
            return path
        if warn:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
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
    problem = damage(path)
    if problem:
        raise InputError(f"--resume {resume}: not a checkpoint that loads: {problem}; use "
                         f"another checkpoint-<step> folder, or --resume latest")
    return path


def check_fresh_start(out, resume, overwrite):
    """A run that does not resume must not share its folder with an earlier run's
    checkpoints: --resume latest would then pick whichever has the higher step, and pruning
    would delete the new run's. Refuse, or with --overwrite_output_dir delete the earlier
    run: its checkpoints, metrics.jsonl and best model. (On a TPU pod every host does this
    at once, hence the deletions that tolerate a file already gone.)"""
    old = checkpoints(out)
    if resume is not None or not old:
        return
    if not overwrite:
        raise InputError(f"--downstream_model_dir {out} holds an earlier run ({old[0].name}); "
                         f"continue it with --resume latest, pass --overwrite_output_dir to "
                         f"replace it, or choose another directory")
    for name in BEST_MODEL_FILES + ("metrics.jsonl", ".replicas-see-this"):
        (Path(out) / name).unlink(missing_ok=True)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def drop_later_checkpoints(out, step):
    """Resuming from `step` abandons the checkpoints after it (a damaged newest one, or the
    later steps of a run resumed from an earlier point): left there, they would be what
    --resume latest picks next time, and the pruning would delete the new ones instead."""
    for path in checkpoints(out):
        if int(path.name.removeprefix("checkpoint-").removesuffix(".tmp")) > step:
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


def check_resume_args(saved, args, run_facts, warn=True):
    """Refuse to continue with arguments that change the work; say what the rest do."""
    current = {**vars(args), **run_facts}
    changed = [k for k in current if k not in NOT_COMPARED and saved.get(k) != current[k]]
    fatal = [k for k in changed if k in FIXED_ON_RESUME]
    world_size = current["world_size"]
    if "corpus" in fatal:
        raise InputError("--resume: the corpus files differ from the ones the checkpoint was "
                         "trained on (edited, or another --downstream_corpus_root_dir); "
                         "resume with the same files, or start a new --downstream_model_dir")
    if "world_size" in fatal:
        raise InputError(f"--resume: the checkpoint was trained on {saved.get('world_size')} "
                         f"replicas and this run has {world_size}; resume on as many devices "
                         f"(torchrun's --nnodes x --nproc_per_node, CPU_NUM_DEVICES for XLA "
                         f"on the CPU, the same TPU), or start a new --downstream_model_dir")
    if fatal:
        k = fatal[0]
        raise InputError(f"--resume: --{k} is {current[k]!r} but the checkpoint was trained "
                         f"with {saved.get(k)!r}; use the same value or start a new "
                         f"--downstream_model_dir")
    for k in changed if warn else []:
        applied = " (applied from the resumed step on)" if k in APPLIED_ON_RESUME else ""
        print(f"warning: --resume: --{k} changed from {saved.get(k)!r} to {current[k]!r}"
              f"{applied}", file=sys.stderr)


def corpus_digest(args):
    """SHA-256 of the corpus files' bytes: a resumed run must train on what its checkpoint
    was trained on, wherever the files now are."""
    digest = hashlib.sha256()
    for path in data.corpus_files(args.downstream_corpus_root_dir, args.downstream_corpus_name,
                                  args.train_file, args.val_file):
        data.add_file_bytes(digest, path)
    return digest.hexdigest()


def restore(path, args, backend, optimizer, scheduler, run_facts):
    """Load the optimizer, scheduler and this replica's RNG state from `path` (the weights
    were loaded from it with the model); returns the progress to continue from."""
    state = torch.load(path / "training_state.pt", weights_only=True)
    # Every replica checks (they must all refuse together); the master alone warns.
    check_resume_args(state["args"], args, run_facts, warn=backend.is_master)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    apply_hyperparameters(optimizer, scheduler, args)
    backend.set_rng_state(torch.load(path / f"rng_state_{backend.rank}.pt", weights_only=True))
    progress = Progress(**state["progress"])
    master_writes(backend, lambda: drop_later_checkpoints(args.downstream_model_dir,
                                                          progress.step))
    return progress


def apply_hyperparameters(optimizer, scheduler, args):
    """The saved optimizer state carries the old peak learning rate and weight decay:
    replace them with this run's, so a changed flag means what it says."""
    scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = args.learning_rate
        group["lr"] = args.learning_rate * lr_lambda(scheduler.last_epoch)
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # the decayed group


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

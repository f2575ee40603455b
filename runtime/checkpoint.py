"""Saving a run so that `--resume` continues it exactly, and the best model so far:

    checkpoint-<step>/   the model (Hugging Face format), training_state.pt (optimizer,
                         scheduler, progress, the run's settings) and rng_state_<rank>.pt
                         per replica; under --fsdp the config and a shards/ folder in
                         place of the weights, the optimizer's state in the shards too
    config.json, model.safetensors, tokenizer files: the best model so far

Every replica takes part in a save: checkpoints are written under a temporary name and
renamed once every replica's part is written, so a crash, a kill or a full disk at any
moment loses nothing already saved. rundir.py finds them again. A CPU/GPU-only copy of the
loop can keep `save_checkpoint`/`restore` and drop the barriers (they do nothing there).
"""
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from corpus.features import tokenizer_fingerprint
from model import from_pretrained, load_tokenizer, save_pretrained, to_cpu
from runtime.errors import CheckpointError, InputError, NonFiniteLoss, add_file_bytes, first_line
from runtime.progress import Progress
from runtime.rundir import (WRITE_ERRORS, continues_here, drop_later_checkpoints,
                            find_resume_checkpoint, latest_checkpoint, master_writes,
                            move_model_into,
                            prune_checkpoints, saving)


@dataclass
class CheckpointConfig:
    """Where a run is kept and how often (train.py's flags of the same names)."""
    downstream_model_dir: str = "checkpoint-generation"
    save_every_steps: int = None    # also every N optimizer steps (always after each epoch)
    keep_checkpoints: int = 2
    resume: str = None              # None, "latest" or a checkpoint-<step> folder
    overwrite_output_dir: bool = False


# On resume, settings that change what a step computes or the schedule under way are
# refused: with others the run would not be the one it continues. The model and the corpus
# are compared by content (SHA-256), so their folders may move.
FIXED_ON_RESUME = ["model", "max_seq_length", "batch_size", "grad_accum_steps",
                   "seed", "epochs", "max_steps", "warmup_ratio", "warmup_steps", "world_size",
                   "corpus", "group_by_length", "fsdp"]
# Applied from the resumed step on, in place of the values the optimizer saved.
APPLIED_ON_RESUME = ["learning_rate", "weight_decay"]
NOT_COMPARED = ["resume", "debug", "cpu_workers", "compile", "cache_dir", "overwrite_output_dir",
                "downstream_model_dir", "downstream_corpus_root_dir",
                "activation_checkpointing"]  # the same steps, in less memory


# --------------------------------------------------------------------------- saving


def save_checkpoint(cfg, backend, progress, model, tokenizer, optimizer, scheduler, settings):
    """Write `checkpoint-<step>/` and keep the newest `cfg.keep_checkpoints` of them.
    `settings`: the run's settings, recorded so that a resume can compare its own.

    Every replica writes its own RNG state and learns whether all writes succeeded
    (xm.save is not used: a write that fails on one replica would leave the others waiting
    in its barrier forever)."""
    out = Path(cfg.downstream_model_dir)
    backend.sync()
    check_finite_weights(backend, model, progress.step)
    final, tmp = out / f"checkpoint-{progress.step}", out / f"checkpoint-{progress.step}.tmp"
    sharded = backend.shards_model  # the weights and the optimizer's state: each its shards

    def write_model_and_state():
        shutil.rmtree(tmp, ignore_errors=True)
        if sharded:  # config and tokenizer: what finds and checks the model on resume
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:  # (full_state_dict gathers nothing here: the master alone may call it)
            save_pretrained(model, tokenizer, tmp, backend.full_state_dict(model))
        torch.save(training_state(progress, None if sharded else optimizer, scheduler, settings),
                   tmp / "training_state.pt")

    def write_replica_part():
        if sharded:
            backend.save_shards(model, optimizer, tmp)
        torch.save(backend.rng_state(), tmp / f"rng_state_{backend.rank}.pt")

    error = write_or_error(write_model_and_state) if backend.is_master else None
    backend.barrier("checkpoint-started")  # the folder exists before the replicas write in it
    # Every replica, even after the master's failure: writing shards is a collective.
    part_error = write_or_error(write_replica_part)
    error = error or part_error
    if backend.any_replica(error is not None):
        if backend.is_master:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out, warn=False)
        raise CheckpointError(
            f"could not write {final} ({first_line(error) if error else 'on another replica'}); "
            f"{f'{previous} is intact' if previous else 'no earlier checkpoint exists'}. "
            f"Free some space, then run the same command with --resume latest")
    backend.barrier("checkpoint-written")
    if backend.is_master:
        replace_dir(tmp, final)
        prune_checkpoints(out, cfg.keep_checkpoints)
    backend.barrier("checkpoint-done")
    return final


def training_state(progress, optimizer, scheduler, settings):
    """Everything but the weights and the random state that a resumed run needs (and but
    the optimizer's state, None when sharded)."""
    state = {"progress": asdict(progress), "scheduler": scheduler.state_dict(),
             "settings": settings}
    if optimizer is not None:
        state["optimizer"] = to_cpu(optimizer.state_dict())
    return state


def write_or_error(write):
    """Run `write()`; return the error it raised (a full disk, say), or None."""
    try:
        write()
    except WRITE_ERRORS as e:
        return e
    return None


def check_finite_weights(backend, model, step):
    """A non-finite loss is caught when it is reported; weights that overflowed without
    one (an infinite learning rate) are caught here, before anything is written. One host
    read for all the parameters; sharded, each replica reads its shards and all agree."""
    finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                          for p in model.parameters()]).all()
    if backend.shards_model:
        finite = not backend.any_replica(not finite)
    if not finite:
        raise NonFiniteLoss(f"the weights became non-finite at step {step} (is the learning "
                            f"rate too high?); nothing was saved for this step")


def replace_dir(src, dst):
    if dst.exists():  # the same step saved twice (an epoch's end that is also a save step)
        shutil.rmtree(dst)
    os.replace(src, dst)


def export_best(out, backend, model, tokenizer, step):
    """The best model so far, in Hugging Face format, at the top of `out`, so that
    `from_pretrained(out)` loads it. Written into a folder beside it, then moved into place
    (rundir.move_model_into): a kill at any moment leaves the previous model or this one,
    whole, or no config.json and so no model at all."""
    out, tmp = Path(out), Path(out) / ".best.tmp"
    check_finite_weights(backend, model, step)  # every replica
    state = backend.full_state_dict(model)  # every replica: sharded, each sends its shards

    def write():
        try:
            with saving(out / "the best model", previous=out):
                shutil.rmtree(tmp, ignore_errors=True)
                save_pretrained(model, tokenizer, tmp, state)
                move_model_into(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    master_writes(backend, write)


# --------------------------------------------------------------------------- resuming


def check_resume_args(saved, current, warn=True, reshards=False):
    """Refuse to continue with settings that change the work; say what the rest do.
    `saved` and `current`: the checkpoint's settings and this run's, flag by flag, with what
    the flags leave to the machine (world_size, corpus, precision). `reshards`: whether this
    run's backend loads a sharded checkpoint on another number of processes."""
    fixed = FIXED_ON_RESUME
    saved = {"fsdp": False, **saved}  # saved before --fsdp existed
    if "model" not in saved:  # saved before 2026-12: the model is known by its name alone
        saved, fixed = {**saved, "model": current["model"]}, fixed + ["pretrained_model_name"]
    changed = [k for k in current if k not in NOT_COMPARED and saved.get(k) != current[k]]
    if (reshards and saved["fsdp"] and current.get("fsdp")
            and saved.get("world_size") != current["world_size"]):
        changed = [k for k in changed if k not in ("world_size", "batch_size")]
        check_resharding(saved, current, warn)
    fatal = [k for k in changed if k in fixed]
    world_size = current["world_size"]
    if "fsdp" in fatal:
        was = "with" if saved["fsdp"] else "without"
        raise InputError(f"--resume: the checkpoint was saved {was} --fsdp; resume it {was} "
                         f"--fsdp, or start a new --downstream_model_dir")
    if "model" in fatal:
        raise InputError(f"--resume: --pretrained_model_name {current['pretrained_model_name']} "
                         f"is not the model the checkpoint was trained from "
                         f"({saved.get('pretrained_model_name')}): its config or tokenizer "
                         f"differs; resume with that model, or start a new "
                         f"--downstream_model_dir")
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


def check_resharding(saved, current, warn):
    """A sharded checkpoint resumes on another number of processes when the global batch
    stays the same: DistributedSampler then deals each step the very examples it dealt
    before (global batch k is examples k*G to (k+1)*G-1 of the epoch's shuffle, however G
    is split), so the epoch continues where it stood. Refused otherwise, in one line."""
    before, now = saved["world_size"], current["world_size"]
    batch = saved["batch_size"] * before
    if current["batch_size"] * now != batch:
        fix = (f"use --batch_size {batch // now} to keep it" if batch % now == 0 else
               f"resume on a number of processes that divides {batch}")
        raise InputError(f"--resume: the checkpoint was trained with a global batch of {batch} "
                         f"examples (--batch_size {saved['batch_size']} on each of {before} "
                         f"processes) and this run has {current['batch_size']} x {now}; {fix}")
    if current.get("group_by_length"):
        raise InputError(f"--resume: --group_by_length groups each process's share of the data "
                         f"by length, so this run's {now} would train on other batches than "
                         f"the checkpoint's {before} processes; resume on {before} processes")
    if warn:
        print(f"warning: --resume: the checkpoint was trained on {before} processes and this "
              f"run has {now}: resharded, with the same global batch of {batch}, it continues "
              f"the run, no longer bit for bit", file=sys.stderr)


def content_digests(files, name, tokenizer):
    """The corpus and the model a run trains on, known by content, so that a resume
    recognises them wherever they now lie."""
    return {"corpus": corpus_digest(files), "model": model_digest(name, tokenizer)}


def model_digest(name, tokenizer):
    """SHA-256 of what a run takes from its pretrained model `name`: its config (less the
    version of the library that saved it) and the tokenizer. Not its weights: a resumed run
    loads its checkpoint's."""
    config = from_pretrained(AutoConfig, name, "--pretrained_model_name").to_diff_dict()
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(tokenizer_key(tokenizer).encode())
    return digest.hexdigest()


def tokenizer_key(tokenizer):
    """What makes two tokenizers tokenize alike: their definition and special tokens."""
    return f"{tokenizer_fingerprint(tokenizer)}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}"


def run_tokenizer(resume, out, name):
    """The tokenizer a run tokenizes with: --pretrained_model_name's (`name`), or on resume
    the one its checkpoint carries, which must tokenize alike (the corpus cache is keyed by
    it). A --resume path is checked here, once, before any replica starts."""
    checkpoint = find_resume_checkpoint(resume, out, quiet=True)
    if checkpoint is None:
        return load_tokenizer(name)
    tokenizer = load_tokenizer(str(checkpoint), "--resume")
    if tokenizer_key(tokenizer) != tokenizer_key(load_tokenizer(name)):
        raise InputError(f"--resume: the tokenizer of --pretrained_model_name {name} differs "
                         f"from the one {checkpoint} was trained with; resume with the model "
                         f"the run started from, or start a new --downstream_model_dir")
    return tokenizer


def corpus_digest(files):
    """SHA-256 of the corpus files' bytes: a resumed run must train on what its checkpoint
    was trained on, wherever the files now are."""
    digest = hashlib.sha256()
    for path in files:
        add_file_bytes(digest, path)
    return digest.hexdigest()


def restore(path, cfg, backend, optimizer, scheduler, settings):
    """Load the optimizer, scheduler and this replica's RNG state from `path` (the weights
    were loaded from it with the model); returns the progress to continue from."""
    state = torch.load(path / "training_state.pt", weights_only=True)
    # Every replica checks (they must all refuse together); the master alone warns.
    saved = state["settings"] if "settings" in state else state["args"]  # before 2026-12
    check_resume_args(saved, settings, warn=backend.is_master, reshards=backend.reshards)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    else:  # sharded: the model's shards too (train.py loaded only its config)
        backend.load_shards(backend.model, optimizer, path)
    scheduler.load_state_dict(state["scheduler"])
    apply_hyperparameters(optimizer, scheduler, settings["learning_rate"],
                          settings["weight_decay"])
    progress = Progress(**state["progress"])
    rng_state = path / f"rng_state_{backend.rank}.pt"
    new_stream = backend.reshards and backend.rank >= saved["world_size"]  # more than saved
    # Agreed: a replica that alone raised would leave the others waiting in a collective.
    if backend.any_replica(not rng_state.is_file() and not new_stream):
        raise CheckpointError(f"--resume: {path} lacks a replica's rng_state_<rank>.pt "
                              f"(copied in part?); copy the whole checkpoint folder, or "
                              f"resume an earlier one")
    if new_stream:  # a random stream of its own: (seed, rank, step)
        torch.manual_seed(settings["seed"] + 1_000_003 * backend.rank + progress.step)
    else:
        backend.set_rng_state(torch.load(rng_state, weights_only=True))
    if not continues_here(str(path), cfg.downstream_model_dir):
        progress.best_val_loss = math.inf  # a new folder: its first evaluation exports
    master_writes(backend, lambda: drop_later_checkpoints(cfg.downstream_model_dir,
                                                          progress.step))
    return progress


def apply_hyperparameters(optimizer, scheduler, learning_rate, weight_decay):
    """The saved optimizer state carries the old peak learning rate and weight decay:
    replace them with this run's, so a changed flag means what it says."""
    scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
    optimizer.param_groups[0]["weight_decay"] = weight_decay  # the decayed group

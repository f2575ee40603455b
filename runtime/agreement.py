"""Replicas of one run check, before they train, that they were started alike: the same
arguments and the same corpus. Under torchrun on several hosts, or on a TPU pod, each host
runs its own command; one that differs (another --max_steps, an edited ratings_train.txt)
would otherwise train something else, or leave the others waiting in a collective."""
import hashlib
import json
from pathlib import Path

from runtime.errors import InputError, add_file_bytes

# Flags that may differ between hosts: each host's own cache, and where its copy of the corpus
# is (the files' bytes are compared instead); the data loader's workers, --debug.
PER_HOST = {"cache_dir", "downstream_corpus_root_dir", "downstream_corpus_name", "train_file",
            "val_file", "cpu_workers", "debug"}


def check_same_run(backend, settings, files):
    """Every replica sends what it was started with through one barrier; all of them find
    the same first difference from replica 0, so they all stop together, each host's
    first saying so in one line."""
    if backend.world_size == 1:
        return
    started_with = run_description(settings, files)
    everyone = backend.barrier("same-run", json.dumps(started_with).encode())
    problem = first_difference([json.loads(payload) for payload in everyone])
    if problem:
        raise InputError(problem)


def run_description(settings, files):
    """The flags that must agree, and the corpus files' names, paths and digests."""
    flags = {name: value for name, value in settings.items() if name not in PER_HOST}
    corpus = [{"name": Path(path).name, "path": str(path),
               "sha256": add_file_bytes(hashlib.sha256(), path).hexdigest()} for path in files]
    return json.loads(json.dumps({"flags": flags, "corpus": corpus}, default=str))


def first_difference(descriptions):
    """One line for the first replica whose description differs from replica 0's, or None.
    `descriptions[r]` is replica r's `run_description`."""
    first = descriptions[0]
    for rank, theirs in enumerate(descriptions[1:], start=1):
        for name, value in first["flags"].items():
            if theirs["flags"].get(name) != value:
                return (f"--{name} is {theirs['flags'].get(name)!r} in replica {rank} but "
                        f"{value!r} in replica 0: every replica of a run, on every host, "
                        f"needs the same arguments")
        for ours, other in zip(first["corpus"], theirs["corpus"]):
            if other["sha256"] != ours["sha256"]:
                return (f"the corpus file {ours['name']} differs: replica {rank} reads "
                        f"{other['path']}, whose bytes are not those of replica 0's "
                        f"{ours['path']}; every host must train on the same files (copy them "
                        f"from replica 0's host)")
    return None

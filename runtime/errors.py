"""The errors a run turns into one line instead of a traceback, the helpers that keep that
line short, and the output that never raises one. Standard library only: the command line
uses it before torch loads."""
import os
import sys
from pathlib import Path


class InputError(Exception):
    """Something the user can fix (a file, a line, a flag): printed as one line."""


class CheckpointError(Exception):
    """A save failed (a full disk, say); what was saved before is intact."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: nothing it trained may be saved."""


def print_on_any_terminal():
    """Let every script's output reach a terminal that cannot show Hangul (PYTHONIOENCODING
    =ascii, an euc-kr or cp949 console): what it cannot show comes out as "?" instead of a
    UnicodeEncodeError in the middle of a run. Processes started from here (XLA replicas,
    spawned afresh) read the same setting from the environment. (stderr never raises: its
    errors are "backslashreplace" already.)"""
    if hasattr(sys.stdout, "reconfigure"):  # not when a caller swapped in its own stream
        sys.stdout.reconfigure(errors="replace")
    encoding = os.environ.get("PYTHONIOENCODING", "").partition(":")[0]
    os.environ["PYTHONIOENCODING"] = f"{encoding}:replace"


def not_utf8(argument):
    """Whether a command-line argument came as bytes that are not UTF-8: Python keeps each
    such byte as a lone surrogate (U+DC80 to U+DCFF), which no tokenizer or file takes."""
    return any("\udc80" <= char <= "\udcff" for char in argument)


class ReplicaLost(Exception):
    """Another replica of the run (a process, a host) ended or did not start: the replicas
    that saw it say so in one line each; the one that failed says why in its own output."""


def first_line(error):
    """The first line of `error`'s message (its type's name when it has none), cut to 200
    characters: enough to say what went wrong inside one line of ours."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def write_atomically(path, write):
    """Call `write(tmp)` then rename tmp to `path`: readers see the old file or the whole
    new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_file_bytes(digest, path):
    """`digest` updated with the bytes of the file `path`, read a megabyte at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest

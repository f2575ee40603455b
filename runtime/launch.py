"""Starting the loop: in this process alone, as one of the processes torchrun starts, or as a
replica on every XLA device through `xmp.spawn`; and what a replica does when it fails
alone (it must not leave the others waiting in a collective)."""
import multiprocessing
import os
import signal
import sys
import threading
import traceback

from runtime.backends import (Backend, TorchrunBackend, XlaBackend, first_on_host,
                              started_by_torchrun)
from runtime.signals import Interrupted, StopSignal


def run_process(train, cfg, kind, agreed=()):
    """Run `train` in this process: alone, or as one of those torchrun starts."""
    if not started_by_torchrun():
        StopSignal.install()
        return train(Backend(kind, cfg.precision), cfg)
    backend = TorchrunBackend(kind, cfg.precision)  # waits for every process
    # Only now: until every process is up, torchrun ends a waiting one with SIGTERM when
    # another fails to start.
    StopSignal.install()
    try:
        train(backend, cfg)
    except agreed as error:
        # Leaving together. Once one process has left, torchrun sends SIGTERM to the others:
        # with nothing left to save, it must not end them as a second signal would.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        backend.close()
        if not first_on_host():  # every process raised it: the host's first prints it
            raise SystemExit(128 + error.signum if isinstance(error, Interrupted) else 1)
        raise
    # Not after other errors: they may have reached one process alone, and torchrun ends
    # the others, which may be waiting for it.
    backend.close()


def spawn_replicas(train, cfg, one_core=False, agreed=()):
    """Run `train(XlaBackend, cfg)` on every XLA device (one, with `one_core`)."""
    import torch_xla.distributed.xla_multiprocessing as xmp
    # Ctrl-C reaches every replica from the terminal; a SIGTERM sent to this process
    # alone (a preempted TPU VM, `kill`) is passed on so that every replica saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: [
        os.kill(child.pid, signum) for child in multiprocessing.active_children()])
    # nprocs: None means every device; recent torch_xla accepts nothing but 1 or None.
    xmp.spawn(Replica(train, agreed), args=(cfg,), nprocs=1 if one_core else None)


class Replica:
    """What `xmp.spawn` runs on each device. It reaches a replica process pickled, and is
    unpickled in that process's main thread, before the replicas start as threads, where
    Python can no longer install signal handlers: `__setstate__` installs them then."""

    def __init__(self, train, agreed):
        self.train, self.agreed = train, agreed

    def __setstate__(self, state):
        self.__dict__.update(state)
        StopSignal.install()
        exit_with_launcher()

    def __call__(self, index, cfg):
        if threading.current_thread() is threading.main_thread():
            StopSignal.install()  # nprocs=1: this replica runs in the launcher itself
        backend = XlaBackend(cfg.precision)
        try:
            self.train(backend, cfg)
        except self.agreed:
            raise  # every replica raises it together
        except BaseException as e:
            if backend.world_size == 1:
                raise
            end_process(e, backend.rank)


def exit_with_launcher():
    """A replica must not outlive its launcher (killed by SIGKILL, say): it would go on
    writing into an output directory that a new run may by then own."""
    launcher = multiprocessing.parent_process()
    if launcher is not None:
        threading.Thread(target=lambda: (launcher.join(), os._exit(1)), daemon=True).start()


def end_process(error, rank):
    """A replica that fails alone leaves the others waiting for it inside a collective,
    where nothing can reach them (replicas may be threads of this very process): print its
    error and end the process, which the launcher then reports."""
    print(f"replica {rank} failed:", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)

"""Starting the loop: in this process alone, as one of the processes torchrun starts, or as a
replica on every XLA device through `xmp.spawn`; and what a replica does when it fails
alone (it must not leave the others waiting in a collective)."""
import contextlib
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool

from options import started_by_torchrun
from runtime.agreement import check_same_run
from runtime.backends import Backend, XlaBackend, first_on_host
from runtime.errors import InputError, ReplicaLost
from runtime.sharding import FsdpBackend
from runtime.torchrun import TorchrunBackend
from runtime.signals import STOP_SIGNALS, Interrupted, StopSignal
from runtime.xla_sharding import XlaFsdpBackend


def run_process(train, prepare, cfg, kind, agreed=()):
    """Run `train` in this process: alone, or as one of those torchrun starts. `prepare(cfg)`
    is the work done once on each host before training (see train.py's)."""
    if not started_by_torchrun():
        prepare(cfg)
        StopSignal.install()
        return train(Backend(kind, cfg.precision, recomputes(cfg)), cfg)
    stop_with_launcher()
    joined = FsdpBackend if cfg.fsdp else TorchrunBackend
    backend = joined(kind, cfg.precision, recomputes(cfg))  # every process joins, or all stop
    try:
        prepare_on_each_host(backend, prepare, cfg, agreed)
        check_same_run(backend, cfg.settings, cfg.data.files())
        # Only now: until every process is ready, torchrun ends a waiting one with SIGTERM
        # when another fails to start.
        StopSignal.install()
        train(backend, cfg)
    except (*agreed, ReplicaLost) as error:
        # The traceback holds train()'s frame and so DDP, whose reducer must be gone before
        # the process group it uses: drop the frames' locals (the lines stay for --debug).
        traceback.clear_frames(error.__traceback__)
        # Leaving together. Once one process has left, torchrun sends SIGTERM to the others:
        # with nothing left to save, it must not end them as a second signal would.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        backend.close()
        # Every process raised an agreed error: the host's first prints it. A lost process
        # is seen by each apart.
        if not first_on_host() and not isinstance(error, ReplicaLost):
            raise SystemExit(128 + error.signum if isinstance(error, Interrupted) else 1)
        raise
    # Not after other errors: they may have reached one process alone, and torchrun ends
    # the others, which may be waiting for it.
    backend.close()


def recomputes(cfg):
    """--activation_checkpointing, for the backend: read from the run's flags, since the loop
    itself (TrainConfig) has no use for it."""
    return cfg.settings["activation_checkpointing"]


def prepare_on_each_host(backend, prepare, cfg, agreed):
    """The first process of each host prepares the run while the others wait for it; a
    host that cannot (a corpus missing there, say) stops every process at once, each host
    saying why in one line, instead of leaving the others waiting in a collective."""
    error = None
    if first_on_host():
        try:
            prepare(cfg)
        except agreed as e:
            error = e
    reasons = backend.barrier("prepared", None if error is None else str(error))
    if error is not None:
        raise error
    for rank, reason in enumerate(reasons):
        if reason is not None:
            raise InputError(f"process {rank} could not start the run: {reason}")


def stop_with_launcher():
    """torchrun's agent started this process: when it ends (kill -9, its machine's OOM
    killer), nothing passes a signal on, and the process would go on training, holding
    the output directory's lock. A SIGTERM to itself, once its parent is gone, saves the
    step and stops, as torchrun's own SIGTERM would. Only under torchrun's agent: a script
    of one's own may well exit and leave its processes running."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(1)
        with contextlib.suppress(Exception):  # its stderr may be gone with it
            print(f"\nprocess {os.getpid()}: torchrun (pid {launcher}), which started it, "
                  f"has ended; stopping at the next report step", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()


def spawn_replicas(train, prepare, cfg, one_core=False, agreed=()):
    """Run `train(XlaBackend, cfg)` on every XLA device (one, with `one_core`), after
    `prepare(cfg)` here, once for the host."""
    import torch_xla.distributed.xla_multiprocessing as xmp
    prepare(cfg)
    # Ctrl-C reaches every replica from the terminal; a SIGTERM or SIGHUP sent to this
    # process alone (a preempted TPU VM, `kill`, the end of an SSH session it leads) is
    # passed on so that every replica saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: [
            os.kill(child.pid, signum) for child in multiprocessing.active_children()])
    # nprocs: None means every device; recent torch_xla accepts nothing but 1 or None.
    with ReplicaProcesses() as replicas:
        try:
            xmp.spawn(Replica(train, agreed), args=(cfg,), nprocs=1 if one_core else None)
        except BrokenProcessPool as e:
            raise ReplicaProcessEnded(replicas.how_they_ended(e)) from e


class ReplicaProcessEnded(BrokenProcessPool):
    """A replica process ended in the middle of the run; str() says how, in a few words."""


class ReplicaProcesses:
    """Holds on to the processes that `xmp.spawn` starts (its ProcessPoolExecutor keeps them
    to itself), so that when one ends early the launcher can say how: its exit code, or the
    signal that killed it (a crash, the OOM killer), which nothing else prints. A thread
    picks them up from `multiprocessing.active_children()` while they run."""

    def __init__(self):
        self.processes, self.done = {}, threading.Event()

    def __enter__(self):
        def watch():
            while not self.done.wait(0.2):
                for child in multiprocessing.active_children():
                    self.processes.setdefault(child.pid, child)
        threading.Thread(target=watch, name="replica-watch", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def how_they_ended(self, broken):
        """E.g. "pid 7 killed by SIGSEGV", "pid 7: exit code 3", "its error is above"."""
        if broken.__cause__ is not None:  # alive, but its result could not be read
            lines = str(broken.__cause__).strip("\n'").splitlines()
            return f"the launcher could not read its result: {lines[-1] if lines else '?'}"
        endings = []
        for process in self.processes.values():
            process.join(5)  # the pool has joined it already: this only reads its status
            code = process.exitcode
            if code == 1:  # end_process and exit_with_launcher print why before exit 1
                endings.append("its error is above")
            elif code is not None and code < 0:
                endings.append(f"pid {process.pid} killed by {signal.Signals(-code).name}")
            elif code:
                endings.append(f"pid {process.pid}: exit code {code}")
        return "; ".join(endings) or "how it ended is unknown: it was not seen running"


class Replica:
    """What `xmp.spawn` runs on each device. It reaches a replica process pickled, and is
    unpickled in that process's main thread, before the replicas start as threads, where
    Python can no longer install signal handlers: `__setstate__` installs them then."""

    def __init__(self, train, agreed):
        self.train, self.agreed = train, agreed

    def __setstate__(self, state):
        self.__dict__.update(state)
        # A crash in native code (XLA, torch) would otherwise end the process without a
        # word: print every thread's Python stack on SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL.
        faulthandler.enable(all_threads=True)
        StopSignal.install()
        exit_with_launcher()

    def __call__(self, index, cfg):
        if threading.current_thread() is threading.main_thread():
            StopSignal.install()  # nprocs=1: this replica runs in the launcher itself
        xla = XlaFsdpBackend if cfg.fsdp else XlaBackend
        backend = xla(cfg.precision, recomputes(cfg))
        try:
            check_same_run(backend, cfg.settings, cfg.data.files())
            self.train(backend, cfg)
        except self.agreed:
            raise  # every replica raises it together
        except BaseException as e:
            if backend.world_size == 1:
                raise
            end_process(e, backend.rank)


def exit_with_launcher():
    """A replica must not outlive its launcher (killed by SIGKILL, say): it would go on
    writing into an output directory that a new run may by then own.

    `parent_process().join()` only waits for the pipe whose write end the launcher's Popen
    object holds to close: it returns as well when that end is closed while the launcher
    lives on (the Popen finalized, or a stray close of its fd), and a silent exit then ended
    the run with nothing said. So the process ends only once it has been re-parented, and
    never without saying why."""
    launcher = multiprocessing.parent_process()
    if launcher is None:
        return

    def wait_for_launcher():
        launcher.join()
        while os.getppid() == launcher.pid:  # alive: the pipe closed without it ending
            time.sleep(1)
        with contextlib.suppress(Exception):  # its stderr may be gone with it
            print(f"\nreplica process {os.getpid()}: its launcher (pid {launcher.pid}) has "
                  f"ended; ending too", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=wait_for_launcher, name="exit-with-launcher", daemon=True).start()


def end_process(error, rank):
    """A replica that fails alone leaves the others waiting for it inside a collective,
    where nothing can reach them (replicas may be threads of this very process): print its
    error and end the process, which the launcher then reports."""
    print(f"replica {rank} failed:", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)

"""Ctrl-C, SIGTERM and SIGHUP as a flag that the loop reads between steps, so that the step
in flight finishes and is saved; and the exceptions that carry a stop out of the loop."""
import os
import signal
import stat
import sys

# Ctrl-C; preemption, `kill`, torchrun passing either on; a closed terminal or SSH session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    def __init__(self, message, signum):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self):
        return self.message

    @classmethod
    def at(cls, step, signum, saved):
        """The run stopped by `signum` after `step` steps, having saved the folder `saved`."""
        signum = signum or signal.SIGTERM  # the signal may have reached another replica only
        what = (f"saved {saved}. To continue, run the same command with --resume latest"
                if saved else "nothing was trained yet, so nothing was saved")
        return cls(f"stopped by {signal.Signals(signum).name} at step {step}: {what}", signum)


class StopRequested(Exception):
    """Raised inside an evaluation when a stop signal arrives (see Backend.stoppable)."""


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM (preemption, `kill`) and SIGHUP (the terminal or SSH session
    closed) become a flag that the loop checks between steps, so the step in flight
    finishes and a checkpoint is written. A second signal stops the process at once; but
    not another SIGHUP: one hang-up can arrive twice (from the shell that passes it on to
    its jobs and from the launcher that passes it on to its replicas). One flag per
    process."""
    signum = None

    @classmethod
    def install(cls):
        cls.signum = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, cls.handle)

    @classmethod
    def handle(cls, signum, frame):
        if signum == signal.SIGHUP:
            silence_hung_up_terminal()
        if cls.signum is None:
            cls.signum = signum
            return
        if signum == cls.signum == signal.SIGHUP:
            return
        # A newline first: the progress bar's line is left open.
        print(f"\n{signal.Signals(signum).name} again: stopped at once; nothing more was saved "
              f"(the last checkpoint is intact: --resume latest continues from it)",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


def silence_hung_up_terminal(fds=(1, 2)):
    """Point stdout and stderr at /dev/null when they were a terminal that has hung up:
    every write there fails (EIO), and the first report line would end the run before it
    saves. A terminal that hung up is still a character device but no longer a tty."""
    for fd in fds:
        try:
            hung_up = stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd)
        except OSError:  # closed
            continue
        if hung_up:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)

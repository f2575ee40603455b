"""Ctrl-C and SIGTERM as a flag that the loop reads between steps, so that the step in
flight finishes and is saved; and the exceptions that carry a stop out of the loop."""
import os
import signal
import sys


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
    """SIGINT (Ctrl-C) and SIGTERM (preemption, `kill`) become a flag that the loop checks
    between steps, so the step in flight finishes and a checkpoint is written. A second
    signal stops the process at once. One flag per process."""
    signum = None

    @classmethod
    def install(cls):
        cls.signum = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, cls.handle)

    @classmethod
    def handle(cls, signum, frame):
        if cls.signum is None:
            cls.signum = signum
            return
        # A newline first: the progress bar's line is left open.
        print(f"\n{signal.Signals(signum).name} again: stopped at once; nothing more was saved "
              f"(the last checkpoint is intact: --resume latest continues from it)",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

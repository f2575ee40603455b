"""What `python train.py` does before torch is imported (train.py imports this first when it
runs as a script): answer --help and a mistyped flag at once, turn Ctrl-C during the slow
start-up into one line, print on any terminal, and keep torch_xla from loading when the run
will not use XLA.
Standard library only."""
import signal
import sys

from options import keep_xla_unloaded, parse_args
from runtime.errors import print_on_any_terminal


def stopped_during_start_up(signum, frame):
    print("stopped by SIGINT during start-up: nothing was saved", file=sys.stderr)
    raise SystemExit(128 + signum)


# Ctrl-C while torch loads or the corpus is tokenized: one line, until the launcher installs
# the StopSignal that saves a step in flight.
signal.signal(signal.SIGINT, stopped_during_start_up)
print_on_any_terminal()  # before --help, whose text may hold Hangul
first = parse_args()
keep_xla_unloaded(first.device, first.tpu_cores)

"""`python -m dist_train.torchrun ARGS`: torchrun itself, ending quietly on a stop signal.

torchrun's agent already does the right thing on SIGTERM/SIGINT: it forwards the
signal to the workers (which stop after their current optimizer step) and waits
for them up to its grace period. Then it re-raises the signal as an exception,
which Python prints as a traceback of torchrun's internals and exit code 1. This
wrapper ends instead with exit code 128 + signal, the workers' own, and lets
their one "stopped" line be the last word.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as e:
        sys.exit(128 + int(e.sigval))

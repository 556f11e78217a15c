"""`python -m dist_train.accelerate_launch ARGS`: `accelerate launch`, ending with the workers' exit code.

`accelerate launch` reports a failed worker as a traceback of its own internals
(torch's ChildFailedError, or CalledProcessError for its simple launcher) and exit
code 1, after the worker already printed its one-line error. This wrapper ends
instead with the worker's exit code (2 bad input, 1 a failed run, 128 + signal a
stopped one) and adds a line only when a worker died without saying why (killed
by a signal).
"""

import signal
import subprocess
import sys


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # -N: killed by signal N


def main() -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args()
    try:
        launch_command(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "?"
            print(f"dist-train: error: rank {rank} was killed by {name}", file=sys.stderr, flush=True)
        return _exit_code(failure.exitcode)
    except subprocess.CalledProcessError as e:
        return _exit_code(e.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())

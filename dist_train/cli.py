"""Command line: `dist-train train|verify|plot` (also `python -m dist_train`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional, Sequence

from dist_train.errors import TrainingError, UsageError


INJECTIONS = ("unsynced-grads",)  # faults `verify --inject` can plant (dist_train.verify)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dist-train", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train with a config file and key=value overrides")
    t.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")

    v = sub.add_parser("verify", help="check distributed training against a single-process reference")
    v.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    v.add_argument("--steps", type=int, default=10, help="optimizer steps to compare (default 10)")
    v.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of norms and loss (default 1e-4)")
    v.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of parameters (default 1e-5)")
    v.add_argument("--inject", choices=INJECTIONS,
                   help="deliberately break training to see verify fail (self-test)")
    v.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")

    pl = sub.add_parser("plot", help="plot loss and raw vs clipped grad norm of a run")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output PNG (default: RUN_DIR/plot.png)")
    return p


@contextlib.contextmanager
def _distributed(cfg):
    """Rank, device and process group from the launcher environment, for one command."""
    from dist_train.amp import pick_device
    from dist_train.distributed import DistState

    state = DistState.from_env()
    device = pick_device(cfg.train.device, state.local_rank)
    with state.session(device, cfg.dist.backend.value, cfg.dist.timeout_s):
        yield state, device


def _train(args: argparse.Namespace) -> int:
    from dist_train.config import load_config
    from dist_train.trainer import train

    cfg = load_config(args.config, args.overrides)
    with _distributed(cfg) as (state, device):
        run_dir = train(cfg, state, device)
    if state.is_main:
        print(f"run directory: {run_dir}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dist_train.config import load_config
    from dist_train.verify import verify

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not (args.rtol >= 0 and args.atol >= 0):
        raise UsageError("--rtol and --atol must be >= 0")
    cfg = load_config(args.config, args.overrides)
    with _distributed(cfg) as (state, device):
        ok = verify(cfg, state, device, args.steps, args.rtol, args.atol, args.inject)
    return 0 if ok else 1


def _plot(args: argparse.Namespace) -> int:
    from dist_train.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    if out is None:
        raise UsageError(f"'{args.run_dir}' has no logged step yet; nothing to plot")
    print(out)
    return 0


COMMANDS = {"train": _train, "verify": _verify, "plot": _plot}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, TrainingError) as e:
        if debug:
            raise
        print(f"dist-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dist-train: interrupted", file=sys.stderr)
        return 130

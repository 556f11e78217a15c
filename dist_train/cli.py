"""Command line: `dist-train train|verify|plot|prepare` (also `python -m dist_train`).

This is the one error boundary: every failure ends here as one line on stderr
and an exit code (2 bad input, 1 a failed run, 128 + signal a stopped run, 130
an interrupted setup). `--debug`, anywhere on the command line, adds the
traceback and keeps the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from typing import Optional, Sequence

from dist_train.errors import DistTrainError, TrainingError, UsageError, describe, is_out_of_memory, signal_name

INJECTIONS = ("unsynced-grads",)
#: Seconds a rank whose error another rank reports waits before it exits.
QUIET_RANK_EXIT_DELAY_S = 2.0  # faults `verify --inject` can plant (dist_train.verify)


TRAIN_EPILOG = """\
config keys (override any as section.key=value; `--print-config` lists them all with their meaning):
  run.      out_dir name overwrite
  train.    max_steps epochs global_batch_size grad_accum_steps seed device precision checkpoint
            checkpoint_every keep_checkpoints resume
  optim.    name lr weight_decay beta1 beta2 momentum nesterov warmup_steps schedule
  clip.     policy max_norm warmup_steps zscore_* percentile window agc_* skip_* eps max_consecutive_nonfinite
  logging.  every per_layer_every spike_top_k progress wandb.mode wandb.project wandb.entity
  task.     name loss
  model.    factory n_layer n_head d_model block_size dropout
  data.     text_file token_file file val_file factory val_fraction shuffle num_workers token_dtype
            num_samples skip_steps skip_steps_file vocab_size
  eval.     every max_batches
  dist.     strategy deepspeed_config backend timeout_s check_sync_every

examples:
  dist-train train --config configs/debug.yaml train.max_steps=10
  dist-train train --config configs/debug.yaml --print-config optim.lr=3e-4
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dist-train", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks (accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train with a config file and key=value overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    t.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    t.add_argument("--check", action="store_true", help="check the config and the run directory, then exit")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults < --config < overrides), each key with its meaning, "
                   "then exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")

    v = sub.add_parser("verify", help="check distributed training against a single-process reference")
    v.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    v.add_argument("--check", action="store_true", help="check the config and arguments, then exit")
    v.add_argument("--steps", type=int, default=10, help="optimizer steps to compare (default 10)")
    v.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of norms and loss (default 1e-4)")
    v.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of parameters (default 1e-5)")
    v.add_argument("--inject", choices=INJECTIONS,
                   help="deliberately break training to see verify fail (self-test)")
    v.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")

    pl = sub.add_parser("plot", help="plot loss and raw vs clipped grad norm of a run (and its per-layer norms)")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output PNG (default: RUN_DIR/plot.png; the per-layer heatmap, when the run has "
                    "one, goes beside it as <name>_per_layer.png, default RUN_DIR/per_layer.png)")

    pr = sub.add_parser(
        "prepare", help="turn UTF-8 text (a file or a folder) into a token file for data.token_file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Character-level token file from UTF-8 text, for data.token_file=OUT.\n\n"
        "Writes OUT (raw little-endian token ids, no header: uint16 when the text has at most 65536 distinct\n"
        "characters, else uint32; nanoGPT's format) and its sidecar, OUT with the suffix .json (dtype, vocab_size,\n"
        "num_tokens, and vocab: the character of each id). The vocabulary is the distinct characters sorted by\n"
        "code point and line ends are read as text (CRLF and CR become LF), as data.text_file reads a file, so\n"
        "the ids are the ones data.text_file would train on. A folder's files are taken recursively, in sorted\n"
        "order of their paths, and concatenated as they are; names starting with '.' are skipped. The text is\n"
        "streamed (progress on stderr); both files appear only once complete.",
    )
    pr.add_argument("input", help="a UTF-8 text file, or a folder of them")
    pr.add_argument("out", help="the token file to write, e.g. data/tokens.bin (its folder must exist)")
    pr.add_argument("--glob", default="*", metavar="PATTERN",
                    help="with a folder, take only the files whose name matches, e.g. '*.txt' (default: every file)")
    pr.add_argument("--overwrite", action="store_true", help="replace OUT and its sidecar if they exist")
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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _say_notes(cfg) -> None:
    """The config's notes (dist_train.config.notes), once per job: by rank 0."""
    from dist_train.config import notes
    from dist_train.launchers import ranks_from_env

    if ranks_from_env()[0] == 0:
        for note in notes(cfg):
            _say(f"dist-train: note: {note}")


def _stop_signal(is_main: bool):
    from dist_train.progress import say  # like _say, but on a line of its own above a progress bar
    from dist_train.signals import StopSignal

    def first(signum: int) -> None:
        if is_main:
            say(f"dist-train: {signal_name(signum)} received; stopping after the current optimizer step "
                "(send it again to abort at once)")

    def abort(signum: int) -> None:
        say(f"dist-train: {signal_name(signum)} received again; aborting at once "
            "(metrics.jsonl holds every step logged so far)")
        os._exit(128 + signum)

    from dist_train.distributed import in_slurm_step
    from dist_train.signals import DUPLICATE_S, DUPLICATE_S_SLURM

    return StopSignal(first, abort, DUPLICATE_S_SLURM if in_slurm_step() else DUPLICATE_S)


def _train(args: argparse.Namespace) -> int:
    from dist_train.preflight import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from dist_train.config import describe_config

        sys.stdout.write(describe_config(cfg))
        return 0
    _say_notes(cfg)
    if args.check:
        from dist_train.rundir import RunDir

        RunDir(cfg.run.out_dir).check(cfg.run.overwrite, cfg.train.resume != "none")
        if cfg.train.resume != "none":  # the checkpoint named exists and is intact (a launcher's preflight)
            from pathlib import Path

            from dist_train.checkpoint import resolve_resume

            resolve_resume(cfg.train.resume, Path(cfg.run.out_dir), warn=False)
        _say("dist-train: config OK")
        return 0
    from dist_train.distributed import DistState, requeue_slurm_job, slurm_job_id
    from dist_train.errors import Stopped
    from dist_train.signals import REQUEUE_SIGNALS
    from dist_train.trainer import train

    is_main = DistState.from_env().is_main
    try:
        with _distributed(cfg) as (state, device), _stop_signal(state.is_main) as stop:
            run_dir = train(cfg, state, device, stop)
    except Stopped as e:
        # The requeue signal: with the checkpoint written and every rank done (the process group is gone),
        # one rank asks Slurm to requeue the job; the requeued job resumes from the checkpoint.
        if e.signum not in REQUEUE_SIGNALS or e.checkpoint is None or slurm_job_id() is None:
            raise
        if not is_main:
            return 0
        # Slurm answers the requeue by sending SIGTERM to the job: with everything saved, this process
        # only has to report and exit 0, so that signal must not cut the report short.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            try:
                job = requeue_slurm_job()
            except TrainingError as err:
                raise TrainingError(f"{signal_name(e.signum)}: checkpoint {e.checkpoint} written, but {err}; "
                                    "resubmit the job: it resumes from the checkpoint with train.resume=auto") from None
            _say(f"dist-train: {signal_name(e.signum)}: stopped after a checkpoint ({e.checkpoint}); Slurm job {job} "
                 "requeued: it resumes from there")
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0
    if state.is_main:
        _say(f"dist-train: done; run directory {run_dir}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dist_train.preflight import load_config
    from dist_train.distributed import DistState

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not (args.rtol >= 0 and args.atol >= 0):
        raise UsageError("--rtol and --atol must be >= 0")
    cfg = load_config(args.config, args.overrides)
    if args.check:
        _say("dist-train: config OK")
        return 0
    if not DistState.from_env().distributed:
        raise UsageError("verify compares a distributed run with a single-process reference and needs at least 2 "
                         "ranks; start it under a launcher, e.g. COMMAND=verify NPROC_PER_NODE=2 launch/torchrun.sh")
    from dist_train.verify import verify

    with _distributed(cfg) as (state, device):
        ok = verify(cfg, state, device, args.steps, args.rtol, args.atol, args.inject)
    return 0 if ok else 1


def _plot(args: argparse.Namespace) -> int:
    from dist_train.plot import layers_path, plot_layers, plot_run

    out = plot_run(args.run_dir, args.out)
    if out is None:
        raise UsageError(f"'{args.run_dir}' has no logged step yet; nothing to plot")
    print(out)
    layers = plot_layers(args.run_dir, layers_path(args.run_dir, args.out))
    if layers is not None:
        print(layers)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from dist_train.prepare import prepare

    done = prepare(args.input, args.out, overwrite=args.overwrite, pattern=args.glob, say=_say)
    _say(f"dist-train: prepare: wrote {done.num_tokens} tokens ({done.dtype}, {done.vocab_size} distinct characters) "
         f"to {done.out}, and the vocabulary to {done.sidecar}; train on it with data.token_file={done.out}")
    return 0


COMMANDS = {"train": _train, "verify": _verify, "plot": _plot, "prepare": _prepare}


def classify(e: BaseException) -> DistTrainError:
    """Any exception as the one-line error the user sees."""
    if isinstance(e, DistTrainError):
        return e
    if isinstance(e, KeyboardInterrupt):
        err = DistTrainError("interrupted")
        err.exit_code = 130
        return err
    if is_out_of_memory(e):
        return TrainingError(f"out of memory ({describe(e)}); lower train.global_batch_size, raise "
                             "train.grad_accum_steps or use a smaller model")
    if isinstance(e, OSError) and e.filename:
        return TrainingError(f"'{e.filename}': {e.strerror or e}")
    return TrainingError(f"{describe(e)} (run with --debug for the traceback)")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"dist-train: {record.levelname.lower()}: " + " ".join(record.getMessage().split("\n"))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the one at setup), so that main()
    called again in one process (tests, notebooks) never writes to a stream since replaced or closed."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """On a line of its own above a progress bar that is showing (dist_train.progress.say), not glued to it."""
        progress = sys.modules.get("dist_train.progress")  # no bar can show before that module is loaded
        if progress is None:
            return super().emit(record)
        try:
            progress.say(self.format(record), self.stream)
        except Exception:
            self.handleError(record)


def _setup_logging(debug: bool) -> None:
    logger = logging.getLogger("dist_train")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(getattr(h, "_dist_train", False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_OneLine())
        handler._dist_train = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def _printed_here(err: DistTrainError) -> bool:
    """Under a launcher, the error of every rank alike is printed once (per node, or by rank 0)."""
    from dist_train.launchers import ranks_from_env

    rank, local_rank = ranks_from_env()
    return {"every": True, "node": local_rank == 0, "main": rank == 0}.get(err.scope, True)


def _steered(e: UsageError, argv: list[str]) -> UsageError:
    """`--max_steps 10` (or `--train.max_steps=10`) is a config key written as a flag: name the override."""
    if "unrecognized arguments" not in str(e):
        return e
    from dist_train.config import all_keys, keys_named

    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "VALUE"
        keys = [name.replace("-", "_")] if name.replace("-", "_") in all_keys() else keys_named(name)
        if keys:
            return UsageError(f"'{token}' is not an option: config keys are key=value overrides, e.g. "
                              f"{' or '.join(f'{k}={value}' for k in keys)} (see 'dist-train train --print-config')")
    return e


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _setup_logging(debug)
    try:
        try:
            args = _parser().parse_args(argv)
        except UsageError as e:
            raise _steered(e, argv) from None
        return COMMANDS[args.command](args)
    except SystemExit:  # --help
        raise
    except BaseException as e:
        err = classify(e)
        if debug:
            traceback.print_exc()
        if _printed_here(err):
            _say(f"dist-train: {err.label}: {' '.join(str(err).split())}")
        else:
            # Another rank reports this one. A launcher that sees this rank exit first stops the others
            # (SIGTERM), which could cut that report off: leave it time to be printed.
            time.sleep(QUIET_RANK_EXIT_DELAY_S)
        return err.exit_code


class _ReaderGone:
    """sys.stdout or sys.stderr of the `dist-train` process: when the pipe's reader has gone (`| head -3`),
    the write is dropped and the stream's descriptor is pointed at /dev/null, so that nothing (Python, tqdm,
    a C library) writes there again, and the run is stopped as by a stop signal (signals.reader_gone): it
    ends after the current step with everything written whole, and exits 128 + SIGPIPE."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _gone(self) -> None:
        from dist_train.signals import reader_gone

        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        reader_gone()

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            with contextlib.suppress(BrokenPipeError):  # what was buffered goes to /dev/null now
                self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def entry() -> None:
    """The `dist-train` command and `python -m dist_train`: main(), then exit with its code.

    After a DeepSpeed run, the process ends without the interpreter's shutdown
    (everything is flushed and closed by then). DeepSpeed's gloo process groups
    live in its module globals until that shutdown, and their worker threads
    release the tensors of finished collectives, which takes the GIL. A thread
    that does so while the interpreter shuts down is ended by Python inside a
    C++ destructor, and the process aborts (SIGABRT, exit -6, "terminate called
    without an active exception"; a gloo runloop thread destroying an
    AsyncBroadcastWork in the backtrace): 4 of 12 runs that failed right after
    the engine's parameter broadcast, 0 of 12 with this exit. Sinks, the run
    directory and the process group are closed before main() returns, so
    skipping the shutdown loses nothing of dist_train's. The same abort was seen once
    in a plain 2-rank DDP `verify` on a loaded machine (rank 1, -6, "terminate called
    without an active exception"), so every rank of a multi-process run ends this way.
    """
    sys.stdout, sys.stderr = _ReaderGone(sys.stdout), _ReaderGone(sys.stderr)
    code = main()
    from dist_train.launchers import world_size_from_env

    if "deepspeed" in sys.modules or world_size_from_env() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)

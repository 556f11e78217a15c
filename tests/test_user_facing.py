"""What people read: the plot, the progress lines and their numbers, a message printed while a progress bar
shows, the benchmarks' --help, prepare's progress. No distributed processes; one short resumed run."""

from __future__ import annotations

import argparse
import json
import re
import runpy
import signal
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

from dist_train import plot as plot_module
from dist_train.cli import main
from dist_train.config import ProgressMode as Progress
from dist_train.metrics import RESUMED_FROM, JsonlSink, read_jsonl
from dist_train.plot import decimal_label, plot_layers, plot_run
from dist_train.prepare import prepare
from dist_train.progress import ProgressReporter, count, num, percent, say, summary
from tests.conftest import DEBUG, ROOT
from tests.test_logging import Stream


def screen(text: str) -> list[str]:
    """The lines a terminal shows after `text`: '\\r' goes back to the start of the line, '\\n' to the next
    one, each character overwrites the one under it (escape sequences dropped)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for ch in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
    shown = ["".join(line).rstrip() for line in lines]
    while shown and not shown[-1]:
        shown.pop()
    return shown


# ---------------------------------------------------------------- the plot

@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, by file name, drawn (tick labels exist only then), to inspect."""
    figures = {}
    save = plot_module._save

    def keep(fig, out_path):
        fig.canvas.draw()
        figures[Path(out_path).name] = fig
        save(fig, out_path)

    monkeypatch.setattr(plot_module, "_save", keep)
    return figures


def run_dir(tmp_path: Path, rows: list[dict], name: str = "metrics.jsonl") -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def row(step: int, loss=1.0, raw=0.5, clipped=None, threshold=1.0, **extra) -> dict:
    clipped = raw if clipped is None else clipped
    return {"step": step, "train/loss": loss, "grad_norm/raw": raw, "grad_norm/clipped": clipped,
            "grad_norm/threshold": threshold, "optim/step_skipped": int(raw is None), **extra}


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_an_all_nan_run_says_in_each_panel_why_it_is_empty(tmp_path, drawn):
    rows = [row(s, loss=None, raw=None) for s in range(1, 6)]  # metrics.jsonl writes NaN/inf as null
    plot_run(run_dir(tmp_path, rows))
    ax_loss, ax_norm = drawn["plot.png"].axes
    assert texts(ax_loss) == ["no finite loss: every logged loss is NaN/inf"]
    assert texts(ax_norm) == ["no finite gradient norm: every logged norm is NaN/inf"]


def test_a_run_with_one_finite_value_draws_it_and_adds_no_note(tmp_path, drawn):
    plot_run(run_dir(tmp_path, [row(1, loss=None, raw=None), row(2, loss=2.5, raw=0.7)]))
    ax_loss, ax_norm = drawn["plot.png"].axes
    assert texts(ax_loss) == [] and texts(ax_norm) == []
    (line,) = ax_loss.get_lines()
    assert list(line.get_xdata()) == [2] and line.get_marker() == "o"  # one point: a line alone would not show


def test_a_per_layer_heatmap_with_nothing_finite_says_so(tmp_path, drawn):
    run = run_dir(tmp_path, [{"step": s, "grad_norm_layer/a": None, "grad_norm_layer/b": None} for s in (1, 2)],
                  name="per_layer.jsonl")
    plot_layers(run)
    fig = drawn["per_layer.png"]
    assert texts(fig.axes[0]) == ["no finite per-layer norm: every one logged is NaN/inf or 0"]
    assert len(fig.axes) == 1  # no colour bar of a made-up scale either


def test_the_raw_norm_shows_when_nothing_is_clipped_and_the_legend_matches_the_lines(tmp_path, drawn):
    rows = [row(s, raw=0.5 + 0.01 * s) for s in range(1, 21)]  # clipped == raw on every step
    plot_run(run_dir(tmp_path, rows))
    ax_norm = drawn["plot.png"].axes[1]
    lines = {line.get_label(): line for line in ax_norm.get_lines()}
    raw, clipped = lines["raw (pre-clip)"], lines["clipped (applied)"]
    order = ax_norm.get_lines().index
    # Raw is drawn over the clipped band, which is wider, so both show where they are equal.
    assert (raw.get_zorder(), order(raw)) > (clipped.get_zorder(), order(clipped))
    assert clipped.get_linewidth() >= 2 * raw.get_linewidth()
    legend = ax_norm.get_legend()
    for handle, label in zip(legend.legend_handles, legend.get_texts()):
        line = lines[label.get_text()]
        assert line.get_alpha() in (None, 1.0), label.get_text()  # no blend that the legend does not show
        assert to_rgba(handle.get_color()) == to_rgba(line.get_color()), label.get_text()
        assert (handle.get_linewidth(), handle.get_linestyle()) == (line.get_linewidth(), line.get_linestyle())


@pytest.mark.parametrize("low, high", [(0.45, 2.1), (0.01, 900.0)])
def test_the_norm_axis_is_labelled_in_plain_decimals(tmp_path, drawn, low, high):
    rows = [row(s, raw=low + (high - low) * s / 20) for s in range(0, 21)]
    plot_run(run_dir(tmp_path, rows))
    ax_norm = drawn["plot.png"].axes[1]
    lo, hi = ax_norm.get_ylim()
    labels = [t.get_text() for t in ax_norm.yaxis.get_ticklabels(which="both")
              if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(labels) >= 2 and "1" in labels, labels
    assert all(re.fullmatch(r"\d+(\.\d+)?", s) for s in labels), labels  # not 6×10⁻¹ or 10⁰


@pytest.mark.parametrize("x, label", [(0.6, "0.6"), (1.0, "1"), (2.0, "2"), (10.0, "10"), (0.001, "0.001"),
                                      (0.30000000000000004, "0.3"), (5000.0, "5000"), (1e-5, "1e-05"),
                                      (2e6, "2e+06")])
def test_decimal_tick_labels(x, label):
    assert decimal_label(x) == label


def test_a_resume_is_marked_in_metrics_jsonl_and_in_the_plot(tmp_path, drawn, no_wandb_env, capsys):
    run = tmp_path / "run"
    args = ["train", "-c", str(DEBUG), f"run.out_dir={run}", "optim.warmup_steps=2", "logging.every=2",
            "logging.wandb.mode=disabled", "logging.progress=plain"]
    assert main([*args, "train.max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"precision fp32, model \d+(\.\d+)?k parameters$", err.splitlines()[0]), err  # not 0.106M
    assert main([*args, "train.max_steps=8", "train.resume=auto"]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r.get(RESUMED_FROM)) for r in rows] == [(2, None), (4, None), (6, 4), (8, None)]
    ax_loss, ax_norm = drawn["plot.png"].axes
    for ax in (ax_loss, ax_norm):
        marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [4, 4]]
        assert len(marks) == 1, ax.get_lines()
    assert "resumed" in [line.get_label() for line in ax_norm.get_lines()]
    assert "resumed from step 4" in texts(ax_loss)


def continued(path: Path, keep_through: int, steps) -> list[dict]:
    sink = JsonlSink(path, keep_through=keep_through)
    for s in steps:
        sink.log({"step": s})
    sink.close()
    return read_jsonl(path)


def test_a_resume_marks_the_first_new_row_of_metrics_jsonl_only(tmp_path):
    for name in ("metrics.jsonl", "per_layer.jsonl"):
        path = tmp_path / name
        assert continued(path, None, (1, 2, 3)) == [{"step": 1}, {"step": 2}, {"step": 3}]
        mark = {RESUMED_FROM: 2} if name == "metrics.jsonl" else {}  # per_layer.jsonl: every other key a module
        # a resume from the checkpoint of step 2
        assert continued(path, 2, (3, 4)) == [{"step": 1}, {"step": 2}, {"step": 3, **mark}, {"step": 4}]
    # train.resume=auto that found no checkpoint starts afresh: no resume to mark
    assert continued(tmp_path / "metrics.jsonl", 0, (1,)) == [{"step": 1}]
    # another run's checkpoint into a new run directory: its file starts with the mark
    (tmp_path / "new").mkdir()
    assert continued(tmp_path / "new" / "metrics.jsonl", 5, (6,)) == [{"step": 6, RESUMED_FROM: 5}]


# ---------------------------------------------------------------- progress lines

@pytest.mark.parametrize("value, text", [
    (1.294, "1.294"), (1.0, "1.000"), (0.98414, "0.9841"), (20.85, "20.85"), (3310.25, "3310"),
    (14496.7, "14500"), (0.0206, "0.02060"), (0.003, "0.003000"), (9.99996, "10.00"), (0.00099996, "0.001000"),
    (0.0004065, "4.065e-04"), (14490.0 * 10, "1.449e+05"), (99999.6, "1.000e+05"), (0.0, "0"), (-2.5, "-2.500"),
    (3, "3"), (None, "nan"), (float("inf"), "inf"),
])
def test_numbers_have_four_significant_digits_in_one_style(value, text):
    assert num(value) == text


@pytest.mark.parametrize("frac, text", [(0, "0%"), (0.004, "<1%"), (1 / 3, "33%"), (0.9, "90%"), (0.996, ">99%"),
                                        (1.0, "100%"), (None, "nan")])
def test_percentages(frac, text):
    assert percent(frac) == text


@pytest.mark.parametrize("n, text", [(950, "950"), (1000, "1.00k"), (20_600, "20.6k"), (105_920, "106k"),
                                     (999_999, "1.00M"), (1_234_567, "1.23M"), (7_000_000_000, "7.00B")])
def test_parameter_counts(n, text):
    assert count(n) == text


FULL = {"step": 10, "train/loss": 3.47412, "grad_norm/raw": 1.29411, "grad_norm/clipped": 0.99999994,
        "grad_norm/clip_coef": 0.7727, "grad_norm/threshold": 1.0, "grad_norm/clipped_frac": 0.9, "optim/lr": 0.003,
        "optim/step_skipped": 0, "optim/skipped_steps": 0, "perf/samples_per_sec": 20.8512}


def test_a_progress_line_says_what_each_number_is():
    assert summary(FULL) == ("loss 3.474 grad_norm 1.294 -> 1.000 (90% of steps clipped) lr 0.003000 "
                             "skipped_steps 0 samples/s 20.85")
    assert summary(FULL, on_bar=True) == "loss 3.474 grad_norm 1.294 -> 1.000"


def test_a_skipped_step_reads_as_one():
    nan = {**FULL, "train/loss": None, "grad_norm/raw": None, "grad_norm/clipped": None, "optim/step_skipped": 1,
           "optim/skipped_steps": 1, "grad_norm/clipped_frac": 0.0}
    assert summary(nan) == ("loss nan grad_norm nan (step skipped; 0% of steps clipped) lr 0.003000 "
                            "skipped_steps 1 samples/s 20.85")
    spike = {**FULL, "grad_norm/raw": 41.0, "grad_norm/clipped": None, "optim/spike_skipped": 1,
             "optim/spike_skipped_steps": 2}
    assert summary(spike, on_bar=True) == "loss 3.474 grad_norm 41.00 (spike: step skipped)"
    assert "skipped_steps 0 spike_skipped_steps 2 " in summary(spike)


def test_a_stop_signal_message_goes_on_its_own_line_above_the_bar(monkeypatch):
    """cli's handler of the first SIGINT, while the trainer's bar is on the terminal (sys.stderr)."""
    from dist_train import cli

    terminal = Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", terminal)
    record = {"step": 3, "train/loss": 1.5, "grad_norm/raw": 2.0, "grad_norm/clipped": 1.0}
    bar = ProgressReporter(Progress.auto, total=20)
    for _ in range(3):
        bar.step(record)
    cli._stop_signal(True)._handle(signal.SIGINT, None)
    bar.step(record)
    bar.close()
    lines = screen(terminal.getvalue())
    assert ("dist-train: SIGINT received; stopping after the current optimizer step (send it again to abort at "
            "once)") in lines, lines
    assert lines[-1].startswith("4/20 ") and lines[-1].endswith("loss 1.500 grad_norm 2.000 -> 1.000"), lines


def test_a_warning_logged_while_the_bar_shows_goes_on_its_own_line(monkeypatch):
    """The package's log records (e.g. "W&B stopped working") through cli's handler, with a bar showing."""
    import logging

    from dist_train import cli

    terminal = Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", terminal)
    cli._setup_logging(False)
    record = {"step": 3, "train/loss": 1.5, "grad_norm/raw": 2.0, "grad_norm/clipped": 1.0}
    bar = ProgressReporter(Progress.auto, total=20)
    for _ in range(3):
        bar.step(record)
    logging.getLogger("dist_train").warning("W&B stopped working")
    bar.step(record)
    bar.close()
    lines = screen(terminal.getvalue())
    assert "dist-train: warning: W&B stopped working" in lines, lines
    assert lines[-1].startswith("4/20 "), lines


def test_say_without_a_bar_is_a_plain_line():
    out = Stream(tty=False)
    say("hello", out)
    assert out.getvalue() == "hello\n"


# ---------------------------------------------------------------- prepare

def test_prepare_shows_each_pass_from_0_to_100_percent(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello world\n" * 100, encoding="utf-8")
    plain = Stream(tty=False)
    prepare(src, tmp_path / "plain.bin", stream=plain)
    lines = plain.getvalue().splitlines()
    for phase in ("1/2 vocabulary", "2/2 ids"):
        last = [ln for ln in lines if f" prepare: {phase}: " in ln][-1]
        assert "1.2 KiB of 1.2 KiB read (100%)" in last, lines

    terminal = Stream(tty=True)
    prepare(src, tmp_path / "bar.bin", stream=terminal)
    lines = screen(terminal.getvalue())
    assert len(lines) == 2, lines  # a bar of its own for each pass
    for line, phase in zip(lines, ("1/2 vocabulary", "2/2 ids")):
        assert line.startswith(f"{phase}: 100%|"), lines


# ---------------------------------------------------------------- benchmarks

BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_every_benchmark_script_is_checked():
    assert {p.name for p in BENCHMARKS} >= {"bench_step.py", "bench_ddp.py", "bench_clip.py", "bench_data.py",
                                           "bench_startup.py", "stability.py"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_option_shows_its_default_in_help(script, monkeypatch, capsys):
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def keep(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` puts it first
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    (parser,) = parsers
    out = capsys.readouterr().out
    # Each option's entry: its line of the options list and the lines indented under it.
    entries = {m.group(1): " ".join(m.group(0).split())
               for m in re.finditer(r"^  (-[-\w]+)[^\n]*(?:\n {6,}[^\n]*)*", out, re.M)}
    shown = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
             and a.default not in (None, False, argparse.SUPPRESS)]
    assert shown
    for action in shown:
        entry = entries[action.option_strings[0]]
        assert "(default: " in entry, entry

"""`dist-train plot RUN_DIR`: loss, and raw vs clipped gradient norm with the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dist_train.errors import UsageError
from dist_train.metrics import read_jsonl
from dist_train.rundir import atomic_path


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Optional[Path]:
    """Write RUN_DIR/plot.png (or `out`); None when the run has no logged step yet."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"'{run_dir}' has no metrics.jsonl; pass a run directory written by 'dist-train train'")
    out_path = Path(out) if out is not None else run_dir / "plot.png"
    if not out_path.parent.is_dir():
        raise UsageError(f"cannot write the plot to '{out_path}': the directory '{out_path.parent}' does not exist")
    records = read_jsonl(metrics)
    if not records:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    try:
        ax_loss.plot(*_series(records, "train/loss"), color="tab:blue")
        ax_loss.set_ylabel("train/loss")
        ax_loss.set_title(run_dir.resolve().name)
        ax_loss.grid(alpha=0.3)

        raw = _series(records, "grad_norm/raw")
        ax_norm.plot(*raw, label="raw (pre-clip)", color="tab:red")
        ax_norm.plot(*_series(records, "grad_norm/clipped"), label="clipped", color="tab:green")
        xs, ys = _series(records, "grad_norm/threshold")
        if xs:
            ax_norm.plot(xs, ys, label="threshold", color="black", linestyle="--")
        skipped = [r["step"] for r in records if r.get("optim/step_skipped")]
        for i, s in enumerate(skipped):
            ax_norm.axvline(s, color="orange", alpha=0.6, label="skipped step" if i == 0 else None)
        if any(v > 0 for v in raw[1] + ys):
            ax_norm.set_yscale("log")  # a log axis needs a positive value to show
        if not raw[0]:
            ax_norm.text(0.5, 0.5, "no finite gradient norm was logged", transform=ax_norm.transAxes,
                         ha="center", va="center")
        ax_norm.set_xlabel("optimizer step")
        ax_norm.set_ylabel("global grad norm")
        ax_norm.grid(alpha=0.3, which="both")
        ax_norm.legend(loc="best")
        fig.tight_layout()
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out_path

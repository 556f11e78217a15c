"""`dist-train plot RUN_DIR`: loss, and raw vs clipped gradient norm with the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dist_train.errors import UsageError
from dist_train.metrics import read_jsonl


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
    records = read_jsonl(metrics)
    if not records:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax_loss.plot(*_series(records, "train/loss"), color="tab:blue")
    ax_loss.set_ylabel("train/loss")
    ax_loss.set_title(run_dir.name)
    ax_loss.grid(alpha=0.3)

    ax_norm.plot(*_series(records, "grad_norm/raw"), label="raw (pre-clip)", color="tab:red")
    ax_norm.plot(*_series(records, "grad_norm/clipped"), label="clipped", color="tab:green")
    xs, ys = _series(records, "grad_norm/threshold")
    if xs:
        ax_norm.plot(xs, ys, label="threshold", color="black", linestyle="--")
    skipped = [r["step"] for r in records if r.get("optim/step_skipped")]
    for i, s in enumerate(skipped):
        ax_norm.axvline(s, color="orange", alpha=0.6, label="skipped step" if i == 0 else None)
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("optimizer step")
    ax_norm.set_ylabel("global grad norm")
    ax_norm.grid(alpha=0.3, which="both")
    ax_norm.legend()
    fig.tight_layout()

    out_path = Path(out) if out is not None else run_dir / "plot.png"
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path

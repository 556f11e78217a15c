"""benchmarks/stability.py --quick: it runs, writes every cell, and the table's LR sensitivity is the formula's
(check_quick_grid, on the README's own --quick command in tests/test_readme.py), and its spike count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["none", "fixed", "zscore", "percentile", "agc", "fixed+skip"]


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The first table's rows (policy, task) -> cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| policy | task | LR sensitivity"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0], cells[1]] = cells[2:]
    return rows


def sensitivity(cells: list[dict]) -> float:
    """Wortsman et al.'s LR sensitivity, written out again from its definition (not the script's code):
    per seed min(final, initial), a diverged seed its initial loss; mean over seeds per lr; then
    mean over lr of min(L(lr), L0) minus min over lr of L(lr)."""
    lrs = sorted({c["lr"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    initial = {s: next(c["initial_loss"] for c in cells if c["seed"] == s) for s in seeds}
    l0 = sum(initial.values()) / len(seeds)
    curve = []
    for lr in lrs:
        vals = []
        for s in seeds:
            (c,) = [c for c in cells if c["lr"] == lr and c["seed"] == s]
            f = c["final_loss"]
            vals.append(initial[s] if f is None or not math.isfinite(f) else min(f, initial[s]))
        curve.append(sum(vals) / len(vals))
    return sum(min(v, l0) for v in curve) / len(curve) - min(curve)


def check_quick_grid(out: Path, stdout: str) -> None:
    """What `benchmarks/stability.py --quick --out OUT` must have written: every cell of the grid, finite
    initial losses, no non-finite weights, and a table whose LR sensitivity is the formula's over its own
    cells (sensitivity above). The README test runs the README's own `--quick` command and checks it here;
    the grid is run once in the suite."""
    assert "FAIL" not in stdout
    text = out.read_text()
    rows = table_rows(text)
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert data["policies"] == POLICIES
    tasks, lrs, seeds = data["tasks"], data["lrs"], data["seeds"]
    assert tasks == ["synthetic", "text"] and len(lrs) >= 3 and seeds
    for policy in POLICIES:
        assert f"| {policy} |" in text
    cells = data["cells"]
    keys = [(c["task"], c["policy"], c["lr"], c["seed"]) for c in cells]
    expected = [(t, p, lr, s) for t in tasks for p in POLICIES for lr in lrs for s in seeds]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    for c in cells:
        assert math.isfinite(c["initial_loss"]), c
        assert c["nonfinite_in_weights"] is False, c
        assert c["diverged"] == (c["final_loss"] is None)
    # The first step's loss is taken before any update: the same for every lr and policy of a task and seed.
    for t in tasks:
        for s in seeds:
            assert len({c["initial_loss"] for c in cells if c["task"] == t and c["seed"] == s}) == 1
    for policy in POLICIES:
        for task in tasks:
            stated = float(rows[policy, task][0])
            ours = sensitivity([c for c in cells if c["policy"] == policy and c["task"] == task])
            assert stated == pytest.approx(ours, abs=6e-5), (policy, task)


def test_spike_definition():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stability", ROOT / "benchmarks/stability.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nan = float("nan")
    # Running min 0.05: 0.08 is noise (< min + 0.1); 0.2 rises (one spike, held for two steps); 0.3 rises
    # again and stays high through a NaN: two spikes. Before `start`, nothing counts.
    assert mod.count_spikes([3, 2, 1, 0.05, 0.08, 0.05, 0.2, 0.2, 0.05, 0.3, nan, 1], 1) == 2
    assert mod.count_spikes([1.0, 2.0, 1.0, 2.0], 3) == 1
    assert mod.count_spikes([1.0, 1.4, 1.49], 1) == 0

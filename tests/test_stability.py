"""benchmarks/stability.py: its --quick grid runs and its summaries are the definitions' (check_study, on
docs/clipping.md's own --quick command in tests/test_readme.py, so the grid runs once in the suite, and on the
committed results); the planted
bad batches are reproducible; the forensics recipe finds exactly the planted batches and the rerun without them
equals the clean run.

The summaries are written out again here from their definitions (the module docstring), not with the script's
code, so that a table cannot drift from its runs."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["none", "fixed", "zscore", "percentile", "agc", "fixed+skip"]
WORKLOADS = ["cnn", "lstm", "gpt"]


@functools.cache
def study():
    """benchmarks/stability.py as a module (registered, as its dataclasses need)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/stability.py` has it, for its `quick`
    spec = importlib.util.spec_from_file_location("stability", ROOT / "benchmarks/stability.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["stability"] = mod
    spec.loader.exec_module(mod)
    return mod


def md_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def per_seed(c: dict) -> float:
    f = c["final_loss"]
    return c["initial_loss"] if f is None or not math.isfinite(f) else min(f, c["initial_loss"])


def sensitivity(cells: list[dict]) -> float:
    """Wortsman et al.'s LR sensitivity: per seed min(final, initial), a diverged seed its initial loss; mean
    over seeds per lr; then mean over lr of min(L(lr), L0) minus min over lr of L(lr)."""
    lrs = sorted({c["lr"] for c in cells})
    initial = {c["seed"]: c["initial_loss"] for c in cells}
    l0 = sum(initial.values()) / len(initial)
    curve = []
    for lr in lrs:
        vals = [per_seed(c) for c in cells if c["lr"] == lr]
        assert len(vals) == len(initial)
        curve.append(sum(vals) / len(vals))
    return sum(min(v, l0) for v in curve) / len(curve) - min(curve)


def area_between(bad: list, clean: list, initial: float, planted: set[int]) -> float:
    """Sum over the steps not planted of the run's loss minus the clean run's, each at most the initial loss (a
    non-finite loss counting as it)."""
    steps = [t for t in range(len(bad)) if t not in planted]
    cap = [[initial if x[t] is None or not math.isfinite(x[t]) else min(x[t], initial) for t in steps]
           for x in (bad, clean)]
    return sum(cap[0]) - sum(cap[1])


def check_study(out: Path, stdout: str) -> None:
    """What `benchmarks/stability.py [--quick] --out OUT` must have written: every run of the three questions,
    no non-finite weights, and tables whose figures are recomputed here from the runs."""
    assert "FAIL" not in stdout
    text = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    for suffix in ("-lr.png", "-threshold.png", "-bad.png"):
        assert out.with_name(out.stem + suffix).stat().st_size > 0
    assert data["workloads"] == WORKLOADS
    cells, seeds = data["cells"], data["seeds"]
    for c in cells:
        assert math.isfinite(c["initial_loss"]) and c["nonfinite_in_weights"] is False, c
        assert len(c["losses"]) == data["settings"]["steps"]
        assert c["diverged"] == (c["final_loss"] is None or c["final_loss"] > c["initial_loss"])

    # Q1: every (workload, policy, lr, seed) once; the first loss is before any update, so it is the same for
    # every lr and policy of a workload and seed; the table's sensitivity is the formula's.
    q1 = [c for c in cells if c["q"] == "lr"]
    keys = sorted((c["workload"], c["policy"], c["lr"], c["seed"]) for c in q1)
    assert keys == sorted((w, p, lr, s) for w in WORKLOADS for p in POLICIES for lr in data["lrs"][w] for s in seeds)
    for w in WORKLOADS:
        for s in seeds:
            assert len({c["initial_loss"] for c in q1 if c["workload"] == w and c["seed"] == s}) == 1
    table = {(r[0], r[1]): r for r in md_rows(text, "| workload | policy | LR sensitivity")}
    for w in WORKLOADS:
        for p in POLICIES:
            mine = [c for c in q1 if c["workload"] == w and c["policy"] == p]
            assert float(table[w, p][2]) == pytest.approx(sensitivity(mine), abs=6e-5), (w, p)
            diverged = sum(c["final_loss"] is None or c["final_loss"] > c["initial_loss"] for c in mine)
            assert table[w, p][5] == f"{diverged}/{len(mine)}"
            assert table[w, p][6:8] == [str(sum(c[k] for c in mine)) for k in ("nonfinite_skips", "spike_skips")]

    # Q2: at fixed clipping's best rate of Q1 and the next one; each knob's L the mean over seeds; spread and
    # gap from those.
    q2 = [c for c in cells if c["q"] == "threshold"]
    for w in WORKLOADS:
        fixed = {lr: sum(per_seed(c) for c in q1 if c["workload"] == w and c["policy"] == "fixed" and c["lr"] == lr)
                 for lr in data["lrs"][w]}
        best = min(fixed, key=fixed.get)
        assert data["best_lr"][w] == best
        rates = data["lrs"][w]
        assert sorted({c["lr"] for c in q2 if c["workload"] == w}) == rates[rates.index(best):rates.index(best) + 2]
    knobs = {"fixed": None, "zscore": data["settings"]["z_values"], "percentile": data["settings"]["p_values"]}
    rows = md_rows(text, "| workload | lr | policy | knob: L")
    assert len(rows) == 3 * sum(len({c["lr"] for c in q2 if c["workload"] == w}) for w in WORKLOADS)
    best_fixed = {}
    for r in rows:
        w, policy = r[0], r[2]
        mine = [c for c in q2 if c["workload"] == w and c["policy"] == policy and f"{c['lr']:.3g}" == r[1]]
        values = sorted({c["knob"] for c in mine})
        if knobs[policy] is not None:
            assert values == sorted(knobs[policy])
        else:
            assert len(values) == len(data["settings"]["threshold_factors"])
        L = {k: sum(per_seed(c) for c in mine if c["knob"] == k) / len(seeds) for k in values}
        assert all(sum(c["knob"] == k for c in mine) == len(seeds) for k in values)
        lo, hi = min(L.values()), max(L.values())
        assert float(r[4].split()[0]) == pytest.approx(lo, abs=6e-5)
        assert float(r[5].split()[0]) == pytest.approx(hi, abs=6e-5)
        assert float(r[6].rstrip("%")) == pytest.approx(100 * (hi - lo) / lo, abs=0.06)
        if policy == "fixed":
            best_fixed[w, r[1]] = lo
            assert r[8] == "—"
        else:
            default = {"zscore": 2.5, "percentile": 10.0}[policy]
            gap = (L[default] - best_fixed[w, r[1]]) / best_fixed[w, r[1]]
            assert float(r[8].rstrip("%")) == pytest.approx(100 * gap, abs=0.06), r

    # Q3: the same planted batches in every bad run, read once each; damage against the policy's clean run.
    planted = data["planted"]
    assert len(planted) == data["settings"]["n_bad"] == len(set(planted))
    q3 = [c for c in cells if c["q"] == "bad"]
    rows = md_rows(text, "| workload | lr | policy | planted steps")
    assert len(rows) == 5 * len(WORKLOADS)
    for r in rows:
        w, policy = r[0], r[2]
        (clean,) = [c for c in q3 if c["workload"] == w and c["policy"] == policy and c["role"] == "clean"]
        (bad,) = [c for c in q3 if c["workload"] == w and c["policy"] == policy and c["role"] == "bad"]
        assert bad["planted"] == planted and sorted(bad["planted_read"]) == planted and not clean["planted_read"]
        assert r[3] == ", ".join(str(b + 1) for b in planted)
        expected = area_between(bad["losses"], clean["losses"], bad["initial_loss"], set(planted))
        assert float(r[6]) == pytest.approx(expected, abs=0.006), r
    # The forensics table says what its runs say.
    rows = md_rows(text, "| workload | policy | planted batches")
    skippers = ("fixed+skip", "fixed+skip-loss")
    assert sorted((r[0], r[1]) for r in rows) == sorted((w, p) for w in WORKLOADS for p in skippers)
    for r in rows:
        runs = {c["role"]: c for c in q3 if c["workload"] == r[0] and c["policy"] == r[1]}
        assert json.loads(r[2]) == [b + 1 for b in planted]
        assert json.loads(r[3]) == runs["bad"]["spike_batches"] and json.loads(r[4]) == runs["clean"]["spike_batches"]
        exact = runs["bad"]["spike_batches"] == [b + 1 for b in planted] and not runs["clean"]["spike_batches"]
        assert r[5] == ("yes" if exact else "NO")
        assert sorted(runs["rerun"]["planted_read"]) == sorted(set(planted) - {b - 1 for b in json.loads(r[3])})
        assert (r[6] == "yes, every loss") == (runs["rerun"]["losses"] == runs["clean-skipped"]["losses"])


RESULTS = ROOT / "benchmarks/results/stability.md"


def test_the_published_results_are_their_runs(tmp_path):
    """The committed study (benchmarks/results/stability.md, docs/clipping.md's figures): every table recomputed
    from the runs in its JSON. Negative control: one sensitivity edited in a copy of the report is caught."""
    check_study(RESULTS, "")
    copy = tmp_path / RESULTS.name
    for suffix in (".json", "-lr.png", "-threshold.png", "-bad.png"):
        copy.with_name(copy.stem + suffix).write_bytes(RESULTS.with_name(RESULTS.stem + suffix).read_bytes())
    row = md_rows(RESULTS.read_text(), "| workload | policy |")[0]
    line = "| " + " | ".join(row) + " |"
    row[2] = f"{float(row[2]) + 0.01:.4f}"
    copy.write_text(RESULTS.read_text().replace(line, "| " + " | ".join(row) + " |", 1))
    with pytest.raises(AssertionError):
        check_study(copy, "")


def test_planted_batches_are_reproducible():
    """The same seed plants the same steps, and the same corrupted data; another seed other steps."""
    import torch

    mod = study()
    a, b = mod.plant_steps(0, 10, 80, 270), mod.plant_steps(0, 10, 80, 270)
    assert a == b and len(set(a)) == 10 and all(80 <= x < 270 for x in a) and a == sorted(a)
    assert mod.plant_steps(1, 10, 80, 270) != a
    with pytest.raises(ValueError):
        mod.plant_steps(0, 10, 0, 5)
    ids = torch.arange(12).reshape(3, 4)
    assert torch.equal(mod.corrupt(ids, "repeat"), torch.tensor([[0] * 4, [4] * 4, [8] * 4]))
    images, labels = torch.ones(2, 3), torch.tensor([1, 2])
    scaled = mod.corrupt((images, labels), "scale")
    assert torch.equal(scaled[0], images * 100) and scaled[1] is labels


def forensics_overrides(tmp: Path, role: str) -> list[str]:
    mod = study()
    w = mod.workloads(False, tmp / "cnn")["cnn"]
    return ([f"run.out_dir={tmp / role}", "train.max_steps=90", "optim.warmup_steps=9", "optim.schedule=constant",
             "train.device=cpu", "train.precision=no", "logging.wandb.mode=disabled", "logging.progress=plain",
             "logging.every=1", "train.checkpoint=false", "clip.skip_window=32", "clip.skip_min_steps=24",
             "optim.lr=0.01", "train.seed=0"] + list(w.overrides) + mod.policy_overrides("fixed+skip-loss", w.max_norm))


def test_forensics_find_exactly_the_planted_batches_and_the_rerun_equals_the_clean_run(tmp_path):
    """The CNN of the study, 3 batches of images x100 planted from seed 0, spike skipping on the loss:
    spikes.jsonl lists exactly the planted batches and the clean run's lists none (on the norm, this run's
    clean norms rise from 2 to 20 while the loss falls, and the rise itself is flagged); a rerun of the bad data
    with data.skip_steps_file equals, loss for loss, the clean data with the same batches left out.
    Negative control: a skip file that misses one planted batch makes the rerun differ."""
    import torch

    from dist_train.preflight import load_config
    from dist_train.trainer import train
    from examples.seed_cnn import write

    mod = study()
    write(tmp_path / "cnn", 16 * 90, 16, 0)
    planted = mod.plant_steps(0, 3, 30, 80)

    def run(role: str, bad: bool, more=()) -> tuple[list[float], list[int], list[int]]:
        wrapped = []
        cfg = load_config(None, forensics_overrides(tmp_path, role) + list(more))
        d = train(cfg, device=torch.device("cpu"),
                  prepare=lambda s: wrapped.append(mod.plant(s, planted, "scale")) if bad else None)
        losses = [json.loads(x)["train/loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        spikes = [json.loads(x)["batch"] for x in (d / "spikes.jsonl").read_text().splitlines()]
        return losses, spikes, wrapped[0].hits if wrapped else []

    clean, clean_spikes, _ = run("clean", False)
    bad, spikes, read = run("bad", True)
    assert read == planted  # each planted batch was read once, where it was planted
    assert clean_spikes == [], "a false positive on the clean run"
    assert spikes == [b + 1 for b in planted]
    assert len(clean) == len(bad) == 90 and bad != clean
    listed = tmp_path / "bad" / "spikes.jsonl"
    rerun, _, reread = run("rerun", True, [f"data.skip_steps_file={listed}"])
    reference, _, _ = run("clean-skipped", False, [f"data.skip_steps_file={listed}"])
    assert reread == [] and rerun == reference
    missed = tmp_path / "missed.jsonl"
    missed.write_text("".join(line + "\n" for line in listed.read_text().splitlines()[:-1]))
    rerun, _, reread = run("missed-rerun", True, [f"data.skip_steps_file={missed}"])
    reference, _, _ = run("missed-clean", False, [f"data.skip_steps_file={missed}"])
    assert reread == planted[-1:] and rerun != reference

"""Adaptive clip policies and spike skipping as pure functions of a stream of norms (no processes).

Each policy's thresholds are checked against a direct re-computation of its formula in plain Python floats,
written from the documented definition (not from the implementation), at the edges that matter: the
warm-up's last step, a window that wraps, a single sample, an empty window, a constant stream. A stream
with NaN/Inf at several places must give finite thresholds and the very state of the same stream with those
entries removed; the negative control feeds the NaN in (taken=True) and shows the comparison catches it.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.clip import AGC, PercentileClip, SpikeSkip, ZScoreClip

#: Raw norms reach the policies as fp32 tensors: the references take the same fp32 values.
STREAM = torch.tensor([1.0, 1.2, 0.9, 1.1, 5.0, 1.0, 0.95, 1.3, 0.8, 7.5, 1.05, 1.15, 0.7, 1.25, 3.0, 1.0]).tolist()


def feed(policy, norms, taken=None):
    """Run a policy over a stream as the step does: threshold from the state, then observe (masked)."""
    out = []
    for i, x in enumerate(norms):
        raw = torch.tensor(x, dtype=torch.float32)
        out.append(policy.threshold(raw).item())
        ok = math.isfinite(x) if taken is None else taken[i]
        policy.observe(raw, torch.tensor(ok))
    return out


# ---- direct re-computations -------------------------------------------------------------------------
def zscore_reference(norms, max_norm, alpha, z, warmup, update_with):
    """ZClip's recipe from its definition: warm-up at the fixed max_norm, collecting raw norms; then the EMA
    starts from their mean and population variance; threshold mean + z*std; the EMA takes min(raw, thr)."""
    seen, mean, var, out = [], None, None, []
    for x in norms:
        thr = max_norm if mean is None else mean + z * math.sqrt(var)
        out.append(thr)
        if not math.isfinite(x):
            continue
        if mean is None:
            seen.append(x)
            if len(seen) == warmup:
                mean = sum(seen) / warmup
                var = sum((v - mean) ** 2 for v in seen) / warmup
            continue
        v = min(x, thr) if update_with == "clipped" else x
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
    return out


def linear_percentile(values, p):
    """numpy's default ('linear') percentile, by hand."""
    s = sorted(values)
    rank = p / 100 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (rank - lo) * (s[hi] - s[lo])


def percentile_reference(norms, max_norm, p, window, warmup):
    history, out = [], []
    for x in norms:
        out.append(linear_percentile(history[-window:], p) if len(history) >= warmup else max_norm)
        if math.isfinite(x):
            history.append(x)
    return out


def spike_limits_reference(norms, k, window, min_count, max_consecutive):
    """(limit before each step, whether it was skipped) for spike skipping on the norm."""
    accepted, out, run = [], [], 0
    for x in norms:
        w = accepted[-window:]
        if len(accepted) >= min_count:
            mean = sum(w) / len(w)
            limit = mean + k * math.sqrt(sum((v - mean) ** 2 for v in w) / len(w))
        else:
            limit = math.inf
        spike = math.isfinite(x) and x > limit and run < max_consecutive
        out.append((limit, spike))
        run = run + 1 if spike else 0
        if math.isfinite(x) and not spike:
            accepted.append(x)
    return out


# ---- thresholds against the formulas ----------------------------------------------------------------
@pytest.mark.parametrize("warmup", [1, 3, 5])
@pytest.mark.parametrize("update_with", ["clipped", "raw"])
@pytest.mark.parametrize("alpha, z", [(0.97, 2.5), (0.5, 1.0)])
def test_zscore_thresholds_match_the_formula(warmup, update_with, alpha, z):
    got = feed(ZScoreClip(1.0, alpha, z, warmup, update_with), STREAM)
    want = zscore_reference(STREAM, 1.0, alpha, z, warmup, update_with)
    assert got[:warmup] == [1.0] * warmup  # the fixed clip through the warm-up's last step
    assert got == pytest.approx(want, rel=1e-6)


def test_zscore_update_with_clipped_keeps_a_spike_out_of_the_statistics():
    """A spike (7.5, 5.0) enters the EMA at the threshold with 'clipped' and as itself with 'raw': the next
    thresholds differ, and 'raw' lets the spike inflate them."""
    clipped = feed(ZScoreClip(1.0, 0.9, 2.5, 3, "clipped"), STREAM)
    raw = feed(ZScoreClip(1.0, 0.9, 2.5, 3, "raw"), STREAM)
    assert clipped[5] < raw[5]


@pytest.mark.parametrize("p", [0.0, 10.0, 50.0, 100.0])
@pytest.mark.parametrize("window, warmup", [(4, 1), (4, 4), (5, 2), (1000, 3)])
def test_percentile_thresholds_match_the_formula(p, window, warmup):
    got = feed(PercentileClip(1.0, p, window, warmup), STREAM)
    assert got == pytest.approx(percentile_reference(STREAM, 1.0, p, window, warmup), rel=1e-6)


def test_percentile_matches_torch_quantile_on_a_wrapped_window():
    policy = PercentileClip(1.0, 37.0, window=6, warmup=1)
    feed(policy, STREAM)
    expected = torch.quantile(torch.tensor(STREAM[-6:], dtype=torch.float64), 0.37).item()
    assert policy.next_threshold(torch.device("cpu")).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("window, min_count, k, max_consecutive", [(8, 4, 2.0, 5), (4, 4, 1.0, 1), (128, 3, 3.0, 2)])
def test_spike_limits_match_the_formula(window, min_count, k, max_consecutive):
    skip = SpikeSkip(k, window, min_count, "norm", max_consecutive)
    want = spike_limits_reference(STREAM, k, window, min_count, max_consecutive)
    for x, (limit, spike) in zip(STREAM, want):
        raw = torch.tensor(x)
        got = skip.spike(raw, torch.tensor(0.0))
        assert skip.limits()[0].item() == pytest.approx(limit, rel=1e-9)
        assert bool(got) == spike
        skip.observe(raw, torch.tensor(0.0), torch.isfinite(raw) & ~got, got)
    assert any(s for _, s in want), "the stream should hold a spike"


def test_a_spike_skipped_stays_out_of_the_window():
    skip = SpikeSkip(2.0, window=8, min_count=4)
    for x in (1.0, 1.1, 0.9, 1.0):
        skip.observe(torch.tensor(x), torch.tensor(0.0), torch.tensor(True), torch.tensor(False))
    before = skip.limits()[0].item()
    spike = skip.spike(torch.tensor(50.0), torch.tensor(0.0))
    assert bool(spike)
    skip.observe(torch.tensor(50.0), torch.tensor(0.0), ~spike, spike)
    assert skip.limits()[0].item() == before


def test_a_norm_that_moved_for_good_is_followed_after_max_consecutive_skips():
    skip = SpikeSkip(2.0, window=4, min_count=4, max_consecutive=2)
    decisions = []
    for x in [1.0, 1.1, 0.9, 1.0] + [3.0] * 8:
        raw = torch.tensor(x)
        spike = skip.spike(raw, torch.tensor(0.0))
        decisions.append(bool(spike))
        skip.observe(raw, torch.tensor(0.0), ~spike, spike)
    assert decisions[4:7] == [True, True, False]  # two skipped, then taken: it enters the window
    assert not any(decisions[-3:])  # the window now holds the new level


# ---- NaN/Inf never enter a policy's state -------------------------------------------------------------
POISONED = [1.0, float("nan"), 1.2, 0.9, float("inf"), 1.1, 5.0, float("nan"), 1.0, 0.95, float("-inf"), 1.3, 0.8]


def _policies():
    return [ZScoreClip(1.0, 0.9, 2.5, 3), PercentileClip(1.0, 10.0, 4, 2)]


def _same_state(a, b):
    for (k, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), f"{k}: {x} vs {y}"


@pytest.mark.parametrize("index", [0, 1])
def test_non_finite_norms_leave_the_state_as_if_they_never_happened(index):
    poisoned, clean = _policies()[index], _policies()[index]
    thresholds = feed(poisoned, POISONED)
    feed(clean, [x for x in POISONED if math.isfinite(x)])
    assert all(math.isfinite(t) for t in thresholds)
    _same_state(poisoned, clean)


@pytest.mark.parametrize("index", [0, 1])
def test_negative_control_a_nan_fed_into_the_state_is_caught(index):
    """taken=True for every step: the reference bug (ZClip's EMA, AutoClip's history take the NaN)."""
    poisoned, clean = _policies()[index], _policies()[index]
    feed(poisoned, POISONED, taken=[True] * len(POISONED))
    feed(clean, [x for x in POISONED if math.isfinite(x)])
    with pytest.raises(AssertionError):
        _same_state(poisoned, clean)


def test_non_finite_values_leave_the_spike_window_alone():
    a, b = SpikeSkip(3.0, 8, 2), SpikeSkip(3.0, 8, 2)
    for x in POISONED:
        raw = torch.tensor(x)
        spike = a.spike(raw, torch.tensor(0.5))
        a.observe(raw, torch.tensor(0.5), torch.isfinite(raw) & ~spike, spike)
        assert not math.isnan(a.limits()[0].item())  # +inf until min_count values, never NaN
    for x in (x for x in POISONED if math.isfinite(x)):
        raw = torch.tensor(x)
        spike = b.spike(raw, torch.tensor(0.5))
        b.observe(raw, torch.tensor(0.5), ~spike, spike)
    _same_state(a, b)


# ---- defined thresholds at the edges ------------------------------------------------------------------
def test_single_sample_empty_window_and_constant_stream_give_defined_thresholds():
    cpu = torch.device("cpu")
    # Empty: the warm-up threshold (max_norm), never NaN.
    assert PercentileClip(0.7, 10.0, 10, 1).next_threshold(cpu).item() == 0.7
    assert ZScoreClip(0.7, warmup=1).next_threshold(cpu).item() == 0.7
    assert SpikeSkip(6.0, 8, 1).limits()[0].item() == math.inf
    # One sample: std 0, the threshold is that sample.
    z = ZScoreClip(0.7, warmup=1)
    feed(z, [2.0])
    assert z.next_threshold(cpu).item() == 2.0
    p = PercentileClip(0.7, 10.0, 10, 1)
    feed(p, [2.0])
    assert p.next_threshold(cpu).item() == 2.0
    s = SpikeSkip(6.0, 8, 1)
    s.observe(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(True), torch.tensor(False))
    assert s.limits().tolist() == [2.0, 1.0]
    # Constant: zero variance, the threshold is the constant.
    for policy in (ZScoreClip(0.7, warmup=3), PercentileClip(0.7, 10.0, 5, 3)):
        thresholds = feed(policy, [1.5] * 12)
        assert thresholds[3:] == [1.5] * 9
        stats = policy.stats()
        assert all(math.isfinite(v.item()) for v in stats.values()), stats


def test_state_round_trips_through_a_checkpoint():
    for make in (lambda: ZScoreClip(1.0, 0.9, 2.5, 3), lambda: PercentileClip(1.0, 10.0, 4, 2),
                 lambda: SpikeSkip(3.0, 8, 2)):
        a = make()
        if isinstance(a, SpikeSkip):
            for x in STREAM[:7]:
                a.observe(torch.tensor(x), torch.tensor(0.1), torch.tensor(True), torch.tensor(False))
        else:
            feed(a, STREAM[:7])
        b = make()
        b.load_state_dict(torch.load(_roundtrip(a.state_dict()), weights_only=True))
        _same_state(a, b)


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


# ---- AGC ----------------------------------------------------------------------------------------------
def test_agc_clips_each_unit_to_lambda_times_its_weight_norm():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    b = torch.randn(5)
    gw = torch.randn(5, 3) * torch.tensor([0.001, 10.0, 0.01, 5.0, 0.0])[:, None]
    gb = torch.randn(5) * 3
    want_w = []
    for i in range(5):  # by hand: row i of the weight, the whole bias
        limit = 0.1 * max(w[i].norm().item(), 1e-3)
        n = gw[i].norm().item()
        want_w.append(gw[i] * (limit / max(n, 1e-6) if n > limit else 1.0))
        limit_b = 0.1 * max(b.norm().item(), 1e-3)
    want_b = gb * (limit_b / gb.norm().item() if gb.norm().item() > limit_b else 1.0)
    gw0, gb0 = gw.clone(), gb.clone()
    agc = AGC(0.1, 1e-3)
    clipped = agc.apply_([(w, gw), (b, gb)], None)
    torch.testing.assert_close(gw, torch.stack(want_w))
    torch.testing.assert_close(gb, want_b)
    assert clipped.item() == pytest.approx(torch.cat([gw.reshape(-1), gb]).norm().item(), rel=1e-6)
    assert not torch.equal(gw, gw0) and not torch.equal(gb, gb0)  # both kinds of unit were clipped
    assert torch.equal(gw[0], gw0[0]) and torch.equal(gw[4], gw0[4])  # small rows left alone


def test_agc_on_fp16_scaled_gradients_judges_the_unscaled_norm():
    torch.manual_seed(1)
    w, g = torch.randn(4, 6), torch.randn(4, 6)
    plain, scaled = g.clone(), g.clone() * 1024
    n_plain = AGC(0.05).apply_([(w, plain)], None)
    n_scaled = AGC(0.05).apply_([(w, scaled)], torch.tensor(1024.0))
    torch.testing.assert_close(scaled / 1024, plain)
    assert n_scaled.item() == pytest.approx(n_plain.item(), rel=1e-6)


def test_the_config_names_exactly_the_policies_there_are():
    """config.POLICY_NAMES (checked without importing torch) and clip.POLICIES (what builds them) agree."""
    from dist_train.clip import POLICIES
    from dist_train.config import POLICY_NAMES

    assert tuple(POLICIES) == POLICY_NAMES

"""The on-demand epoch permutation (dist_train.shuffle) and the batches it orders.

Every statistic below is computed over fixed seeds, so each test is deterministic:
it cannot flake, and the bounds (five standard deviations above a chi-square's mean)
are generous. The negative controls show the same checks failing on orders that
are not shuffles (the identity, a rotation) and on a Feistel network of too few rounds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import dist_train.shuffle as shuffle
from dist_train.data import GlobalBatches
from dist_train.shuffle import EpochPermutation


def order(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    return EpochPermutation(n, seed, epoch)(torch.arange(n)).numpy()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 255, 256, 257, 1000, 1023,
                               1024, 1025, 4095, 4096, 4097])
def test_a_bijection_on_0_to_n(n):
    for seed, epoch in ((0, 0), (1, 0), (0, 1), (2**62, 12345)):
        values = order(n, seed, epoch)
        assert np.array_equal(np.sort(values), np.arange(n)), (n, seed, epoch)


@pytest.mark.parametrize("n", [16385, 30011])  # 16385 = 2^14 + 1: half the 2^15 values walk
def test_a_bijection_on_larger_n(n):
    assert np.array_equal(np.sort(order(n, 3, 1)), np.arange(n))


def test_deterministic_and_fixed():
    """The order is a function of (n, seed, epoch) alone, the same on every machine and in every release
    (a resumed run, or another world size, relies on it): pinned here."""
    assert order(10, 0).tolist() == [2, 7, 5, 8, 9, 4, 1, 0, 6, 3]
    assert order(100, 0)[:12].tolist() == [51, 22, 37, 69, 38, 70, 85, 57, 89, 64, 86, 78]  # 7 bits: 3 + 4
    big = EpochPermutation(10**10, 7, 3)(torch.tensor([0, 1, 2, 10**10 - 1]))
    assert big.tolist() == [6545381716, 1623001735, 4860545763, 6992177556]
    assert np.array_equal(order(1000, 5, 2), order(1000, 5, 2))
    positions = torch.tensor([[999, 0], [17, 500]])  # any shape, any positions
    assert torch.equal(EpochPermutation(1000, 5, 2)(positions), torch.from_numpy(order(1000, 5, 2))[positions])


def test_different_for_every_seed_and_epoch():
    n = 1000
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 2)]  # (0, 1) and (1, 0) too: no seed + epoch
    orders = [order(n, s, e) for s, e in keys]
    for i in range(len(keys)):
        for j in range(i):
            same = int((orders[i] == orders[j]).sum())
            assert same < 10, f"{keys[i]} and {keys[j]} agree at {same} of {n} positions (about 1 expected)"


def correlation(values: np.ndarray) -> float:
    return float(np.corrcoef(np.arange(len(values)), values)[0, 1])


def uncorrelated(values: np.ndarray) -> bool:
    """Position and value uncorrelated: |r| within 4 standard deviations (1/sqrt(n)) of 0."""
    return abs(correlation(values)) < 4 / np.sqrt(len(values))


@pytest.mark.parametrize("n", [1000, 4097, 16384])
def test_position_and_value_uncorrelated(n):
    for seed in range(3):
        for epoch in range(2):
            assert uncorrelated(order(n, seed, epoch)), (n, seed, epoch, correlation(order(n, seed, epoch)))


def test_correlation_check_rejects_orders_that_are_not_shuffled():
    n = 4097
    assert not uncorrelated(np.arange(n))  # identity
    assert not uncorrelated((np.arange(n) + n // 3) % n)  # a rotation
    assert not uncorrelated(np.arange(n)[::-1].copy())  # reversed


SEEDS = 2000


def tallies(n: int, perm) -> tuple[np.ndarray, np.ndarray]:
    """Over SEEDS seeds: counts[v, p] (how often value v sat at position p) and pairs[a, b] (how often
    positions 0 and 1 held a and b)."""
    counts, pairs = np.zeros((n, n)), np.zeros((n, n))
    for seed in range(SEEDS):
        v = perm(n, seed)
        counts[v, np.arange(n)] += 1
        pairs[v[0], v[1]] += 1
    return counts, pairs


def chi2_ok(observed: np.ndarray, dof: int) -> bool:
    """Pearson's chi-square against a uniform table, below its mean plus 5 standard deviations."""
    expected = observed.sum() / observed.size
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    return chi2 < dof + 5 * np.sqrt(2 * dof)


def uniform_positions(counts: np.ndarray) -> bool:
    """Each value's position uniform over seeds: the (value, position) table, (n-1)^2 degrees of freedom."""
    n = len(counts)
    return chi2_ok(counts, (n - 1) ** 2)


def independent_pairs(pairs: np.ndarray) -> bool:
    """The values at positions 0 and 1 uniform over the n(n-1) ordered pairs of distinct values."""
    n = len(pairs)
    return chi2_ok(pairs[~np.eye(n, dtype=bool)], n * (n - 1) - 1)


@pytest.mark.parametrize("n", [5, 10, 20])  # 5, 10: 16 values, 2-bit parts; 20: 32 values, 2- and 3-bit parts
def test_positions_uniform_and_pairs_independent_over_seeds(n):
    counts, pairs = tallies(n, order)
    assert uniform_positions(counts)
    assert independent_pairs(pairs)


def test_uniformity_checks_reject_orders_that_are_not_shuffled(monkeypatch):
    n = 10
    counts, pairs = tallies(n, lambda n, seed: np.arange(n))
    assert not uniform_positions(counts) and not independent_pairs(pairs)
    # A rotation by the seed puts each value everywhere equally often, but its neighbour always beside it.
    counts, pairs = tallies(n, lambda n, seed: (np.arange(n) + seed) % n)
    assert uniform_positions(counts) and not independent_pairs(pairs)
    # Four rounds are a pseudo-random permutation with pseudo-random round functions, but on 2-bit halves the
    # round functions are far from that, and the bias shows: why shuffle.ROUNDS is 8.
    monkeypatch.setattr(shuffle, "ROUNDS", 4)
    counts, pairs = tallies(5, order)
    assert not uniform_positions(counts) and not independent_pairs(pairs)


def test_one_batch_of_ten_billion_samples_costs_only_the_batch():
    """An n-sized index (80 GB here) is never built: the last batch of the second epoch takes milliseconds."""
    n, batch = 10**10, 64
    batches = GlobalBatches(n, batch, seed=0)
    step = 2 * batches.steps_per_epoch - 1
    t0 = time.perf_counter()
    idx = batches.indices(step)
    elapsed = time.perf_counter() - t0
    assert idx.shape == (batch,) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < n and idx.unique().numel() == batch
    assert elapsed < 1.0, f"{elapsed:.2f} s for one batch"
    # The positions are the epoch's last ones: the same values as the permutation gives them directly.
    positions = torch.arange(n - n % batch - batch, n - n % batch)
    assert torch.equal(idx, EpochPermutation(n, 0, 1)(positions))


def test_a_global_batch_is_a_slice_of_its_epochs_order():
    n, batch = 103, 10  # 10 steps an epoch, 3 samples left out of each
    batches = GlobalBatches(n, batch, seed=4)
    for epoch in range(3):
        full = torch.cat([batches.indices(epoch * 10 + k) for k in range(10)])
        assert torch.equal(full, torch.from_numpy(order(n, 4, epoch))[:100])

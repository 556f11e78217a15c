"""The data order of an epoch: a permutation of [0, n) computed on demand, position by position.

A stored permutation costs 8 bytes a sample (1.2 GB for 10 GB of uint16 ids in
samples of 32 tokens); this one costs nothing per sample. `EpochPermutation(n, seed,
epoch)(positions)` gives the sample at each position of the epoch's order, for
any set of positions, in O(len(positions)) time and memory.

How it works: a Feistel network over [0, 2^b), b the bits of n - 1 (at least
4), so 2^b < 2n. A value is cut into a left and a right part (b/2 bits each,
the right one a bit wider when b is odd); each of its ROUNDS rounds moves the
right part to the left and puts there instead the left part XOR a keyed hash of
the right one, which is invertible whatever the hash, so the network is a
bijection on [0, 2^b). Cycle-walking restricts it to [0, n): a value >= n is
encrypted again until it lands below n, which keeps the map a bijection on
[0, n) (following the network's cycle from a position below n always comes back
below n) and takes fewer than 2 passes on average, since more than half the
domain lies below n (for n > 8).

How random it is: by Luby and Rackoff, a Feistel network of 4 or more rounds
whose round functions are pseudo-random functions is a (strong) pseudo-random
permutation: no efficient test that queries it can tell it from a permutation
drawn uniformly at random (shown for equal parts; ours differ by at most a bit).
Our round functions are a fast integer hash (multiply-xorshift) keyed by
BLAKE2b of (seed, epoch), not a cryptographic function, so the claim we make is
the statistical one the tests check: a bijection, a different order per seed
and per epoch, no correlation between position and value, each sample's
position uniform over seeds, and consecutive positions independent. On parts of
one or two bits a round's hash is far from random, and 4 rounds show a bias
there: hence 8 rounds and b >= 4. It is not a uniform draw from all n!
permutations (a Feistel network on 2^b values only ever yields even
permutations of them, for one); an SGD shuffle needs none of that.

All arithmetic is int64 torch ops: values stay non-negative (no right shift of a
negative number) and every product is of a value below 2^32 and a constant
below 2^31, so below 2^63.
"""

from __future__ import annotations

import hashlib

import torch

ROUNDS = 8
_M32 = 0xFFFF_FFFF
# Odd multipliers below 2^31 (see the module docstring).
_C1, _C2, _C3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39
#: The largest n: parts of at most 31 bits, so a part times a constant stays below 2^63.
MAX_N = 1 << 62


def round_keys(seed: int, epoch: int) -> list[int]:
    """ROUNDS 32-bit keys for (seed, epoch): BLAKE2b of both, so (seed 0, epoch 1) and (seed 1, epoch 0) differ."""
    digest = hashlib.blake2b(f"dist_train.shuffle:{seed}:{epoch}".encode(), digest_size=4 * ROUNDS).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(ROUNDS)]


def _mix(half: torch.Tensor, key: int) -> torch.Tensor:
    """A keyed hash of values below 2^31 to 32 bits: XOR the key in, then multiply-xorshift."""
    x = half ^ key  # < 2^32: the part has at most 31 bits, the key 32
    x = (x * _C1) & _M32
    x = x ^ (x >> 16)
    x = (x * _C2) & _M32
    x = x ^ (x >> 15)
    x = (x * _C3) & _M32
    return x ^ (x >> 16)


class EpochPermutation:
    """The order of one epoch over n samples: `perm(positions)` -> the samples at those positions."""

    def __init__(self, n: int, seed: int, epoch: int):
        if not 0 < n <= MAX_N:
            raise ValueError(f"a permutation needs 0 < n <= 2^62, got {n}")
        bits = max(4, (n - 1).bit_length())
        self.n = n
        self.left_bits, self.right_bits = bits // 2, bits - bits // 2
        self.keys = round_keys(seed, epoch)

    def _encrypt(self, x: torch.Tensor) -> torch.Tensor:
        lb, rb = self.left_bits, self.right_bits
        left, right = x >> rb, x & ((1 << rb) - 1)
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & ((1 << lb) - 1))
            lb, rb = rb, lb  # the parts trade places, and widths
        return (left << rb) | right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The sample at each of `positions` (int64, each in [0, n)); a tensor of the same shape."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        out = self._encrypt(positions.reshape(-1))
        todo = (out >= self.n).nonzero().squeeze(1)
        while todo.numel():  # cycle-walking: encrypt again what fell outside [0, n)
            walked = self._encrypt(out[todo])
            out[todo] = walked
            todo = todo[walked >= self.n]
        return out.reshape(positions.shape)

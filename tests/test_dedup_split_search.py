"""The exact pigeonhole Hamming search (stages.dedup.split_hamming_pairs) against flat brute force."""

from __future__ import annotations

import numpy as np
import pytest

from stages.dedup import MIRROR_MASK, hamming_pairs_dist, split_hamming_pairs, split_parts


def _codes_with_near_copies(n: int, radius: int, seed: int) -> np.ndarray:
    """Random 64-bit codes, a third of them copies of others with about ``radius`` bits flipped,
    and a run of 40 equal codes (a block much larger than the rest)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    src, dst = rng.integers(0, n, n // 3), rng.integers(0, n, n // 3)
    flips = np.zeros(len(dst), np.uint64)
    for _ in range(radius + 2):
        bit = np.uint64(1) << rng.integers(0, 64, len(dst)).astype(np.uint64)
        flips ^= np.where(rng.random(len(dst)) < 0.6, bit, np.uint64(0))
    codes[dst] = codes[src] ^ flips
    codes[:40] = codes[40]
    return codes


@pytest.mark.parametrize("radius", [0, 3, 10, 14])
def test_split_search_equals_flat(radius: int) -> None:
    codes = _codes_with_near_copies(4000, radius, seed=radius)
    queries = np.concatenate([codes, codes ^ np.uint64(MIRROR_MASK)])  # as AlignedMatches queries frames
    flat = hamming_pairs_dist(codes, radius, queries, method="flat")
    assert len(flat[0]) > len(codes) + 40 * 39  # beyond each code itself: the run of equal codes, near copies
    for parts in (None, 3, 5, 16):
        split = split_hamming_pairs(codes, radius, queries, parts)
        for got, want in zip(split, flat, strict=True):
            np.testing.assert_array_equal(got, want)  # same pairs, distances and order
    np.testing.assert_array_equal(hamming_pairs_dist(codes, radius, queries, method="split")[1], flat[1])


def test_auto_splits_only_large_searches() -> None:
    assert not split_parts(2_000, 1_000, 10)[1]  # small: one flat search is cheaper
    parts, pays = split_parts(1_600_000, 800_000, 10)  # the frames of 10^5 bench clips
    assert pays and 10 // parts <= 3

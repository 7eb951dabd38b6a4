"""Dedup: a global phase that groups duplicate clips and keeps one clip per group.

A duplicate is a clip whose content really repeats another's: a copy, a re-encode, a crop, a
letterbox, a brightness change, a mirror, a trimmed copy, or a loop within one video. A pair of
clips is *linked* only on evidence that a chance match cannot give:

* **exact**: equal ``content_hash`` (stages/fingerprint.py: decoded frames, so re-muxed copies match);
* **frames** / **audio**: perceptual codes (stages/fingerprint.py) searched with a FAISS binary
  index under Hamming distance (frame queries also in mirrored form). Only informative frames and
  audio windows have codes at all (flat, dark, smooth frames and silence, hum or a steady tone
  give none), and a code that matches more than ``common_code_clips`` (or ``common_code_share``)
  other clips is *common* and ignored, like stop-listed hashes in audio fingerprinting. The
  matches of a pair must line up in time, as landmark fingerprints do: at one offset (within
  ``*_offset_tolerance``) at least ``*_match_ratio`` of the informative units where the two clips
  overlap must match, in at least ``min_matched_codes`` distinct segments (a still picture is
  one segment, not forty frames), and the overlap must cover ``min_overlap`` of the shorter clip;
* **semantic**: ``visual_embedding`` / ``text_embedding`` with cosine similarity of at least
  ``semantic_threshold``, searched exactly (flat) for small runs and with IVF-Flat, IVF-PQ (with
  exact re-ranking) or HNSW above (``index``); on GPUs when faiss has them.

An exact, frame or audio link is **refused when the other perceptual signal contradicts it**: when
both clips carry at least ``veto_min_segments`` informative segments of that signal where they
overlap and fewer than ``veto_ratio`` of them match near the link's offset. Two videos on the same
test pattern or still picture with different speech, or the same tune under different pictures,
are not copies. Neighbouring clips of one video get no special treatment: they are linked only
when their content repeats (a loop, a still picture with the same sound).

**Groups are formed around the kept clip**: clips are visited best first under the ``keep`` rule
(quality score, longest, highest resolution or earliest input; ties fall to the later rules and
finally to the earliest key); each joins the best representative it is linked to directly, or
becomes a representative. So a chain of links (A~B, B~C) never merges A and C by itself, and
``duplicate_of`` always names a kept clip the duplicate was itself matched with
(``grouping="connected"`` restores union-find). Duplicates get ``drop_reason="duplicate"``.

The phase works on tables of signals (``signals_table``): the engine writes one per input
partition on the workers (``DedupStage.phase_signals`` -> ``OUTPUT/signals/``, kept in the output
so that later runs can dedup against it), ``DedupStage.decide`` decides over the files
(stages/_dedup_scale.py: one task running ``find_duplicates`` below ``distributed_min_rows``
clips, a distributed job above it whose candidate pairs are verified by the same rule,
``verified_links``) and writes the decisions of each partition (with a readable ``evidence``
column: ratio, segments, offset and overlap of each link) to
``STAGING/dedup/decisions/{partition:06d}.parquet``; ``apply_partition`` turns them into updates.
``dedup_parquet`` decides again on one machine from signal files. The core algorithms are plain
functions on numpy arrays (``hamming_pairs``, ``cosine_pairs``, ``AlignedMatches``,
``group_by_representative``, ``rank_keys``) so benchmarks call them directly. Precision and
recall on hard negatives: ``python -m tests.bench.dedup_bench --hard``; the distributed job at
10^5-10^6 clips: ``python -m tests.bench.dedup_scale_bench``. Scaling to 100 M clips:
infra/DEDUP_SCALING.md.

Placed early in ``stages`` (``[download, split, extract, quality, fingerprint, dedup, asr, ...]``)
it removes duplicates on cheap signals before the expensive model stages see them; placed after
the embedding stages it can also use the semantic signal.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.config import DedupConfig
from pipeline.errors import ConfigError
from pipeline.stage import Resources, Row, Stage
from stages.fingerprint import FRAME_SCALES, MIRROR_MASK

if TYPE_CHECKING:
    import faiss

    from pipeline.stage import MapFn

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]
DEFAULT_FRAME_STEP = 0.25  # seconds between frames of signal rows written without hash_times
DEFAULT_AUDIO_STEP = 0.032  # seconds between audio codes of signal rows written without code_times

SIGNAL_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("key", pa.string()),
    ("input_index", pa.int64()),
    ("clip_index", pa.int64()),
    ("duration", pa.float64()),
    ("pixels", pa.int64()),
    ("quality", pa.float64()),
    ("content_hash", pa.string()),
    ("frame_hashes", pa.list_(pa.int64())),
    ("hash_times", pa.list_(pa.float32())),
    ("audio_fingerprint", pa.list_(pa.int64())),
    ("code_times", pa.list_(pa.float32())),
    ("visual_embedding", pa.list_(pa.float32())),
    ("text_embedding", pa.list_(pa.float32())),
)


# --------------------------------------------------------------------------- grouping


def union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` items linked by ``pairs`` (m x 2): a label per item."""
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def choose_kept(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per item: -1 when kept, else the index of its group's kept item (lowest ``rank``)."""
    order = np.lexsort((rank, labels))  # by group, best first
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best_of_group = np.empty(len(labels), dtype=np.int64)
    group_best = order[first]
    group_ids = labels[order][first]
    lookup = dict(zip(group_ids.tolist(), group_best.tolist(), strict=True))
    for i, g in enumerate(labels.tolist()):
        best_of_group[i] = lookup[g]
    return np.where(best_of_group == np.arange(len(labels)), -1, best_of_group)


def rank_keys(
    keep: str,
    quality: np.ndarray,
    duration: np.ndarray,
    pixels: np.ndarray,
    input_index: np.ndarray,
    clip_index: np.ndarray,
    keys: Sequence[str],
) -> np.ndarray:
    """A rank per item (0 = best) under the keep rule; ties go to the next rules, then earliest.

    Durations compare at 0.1 s, so a re-encode a few milliseconds longer does not win "longest".
    """
    q = np.nan_to_num(np.asarray(quality, np.float64), nan=-np.inf)
    dur = np.round(np.nan_to_num(np.asarray(duration, np.float64), nan=0.0), 1)  # AAC padding is no length
    px = np.nan_to_num(np.asarray(pixels, np.float64), nan=0.0)
    early = (np.asarray(input_index, np.int64), np.asarray(clip_index, np.int64), np.asarray(keys, dtype=object))
    rules = {
        "quality": (-q, -dur, -px),
        "longest": (-dur, -px, -q),
        "resolution": (-px, -dur, -q),
        "earliest": (),
    }
    columns = [*rules[keep], *early]
    # np.lexsort sorts by the last key first
    order = np.lexsort([np.unique(c, return_inverse=True)[1] for c in reversed(columns)])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


# --------------------------------------------------------------------------- exact


def exact_pairs(hashes: Sequence[str | None]) -> np.ndarray:
    """Pairs (first occurrence, item) of items with the same non-empty hash."""
    first: dict[str, int] = {}
    pairs = []
    for i, h in enumerate(hashes):
        if not h:
            continue
        j = first.setdefault(h, i)
        if j != i:
            pairs.append((j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- Hamming (binary FAISS)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("the dedup stage needs faiss: pip install 'avforge[dedup]' (faiss-cpu)") from None
    return faiss


def _as_bytes(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(codes, dtype=np.uint64)).view(np.uint8).reshape(-1, 8)


def binary_index(codes: np.ndarray, radius: int, method: str = "auto") -> faiss.IndexBinary:
    """A FAISS binary index over 64-bit codes.

    ``flat`` is exact brute force (AVX-512 popcount, ~0.3 ns per pair here); ``multihash`` splits
    codes into 4 substrings of 16 bits and probes every substring within ``nflip`` bits of the
    query's, which finds every code within ``4 * (nflip + 1) - 1`` bits (pigeonhole). It pays off
    for small radii only: up to 7 bits (``nflip`` 1, 68 probes per query) it beats brute force
    above ~200 k codes; at 8-11 bits (``nflip`` 2, 548 probes) it was slower than brute force at
    1 M random codes (tests/bench/dedup_bench.py), so ``auto`` keeps ``flat`` there.
    """
    faiss = _faiss()
    n = len(codes)
    if method == "auto":
        method = "multihash" if n > 200_000 and radius <= 7 else "flat"
    if method == "flat":
        index = faiss.IndexBinaryFlat(64)
    elif method == "multihash":
        index = faiss.IndexBinaryMultiHash(64, 4, 16)
        index.nflip = max(0, math.ceil((radius + 1) / 4) - 1)
    else:
        raise ValueError(f"unknown binary index method {method!r}")
    index.add(_as_bytes(codes))
    return index


def hamming_pairs(
    codes: np.ndarray, radius: int, queries: np.ndarray | None = None, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """All (query index, code index) with Hamming distance <= ``radius`` (queries default: codes)."""
    qi, ci, _ = hamming_pairs_dist(codes, radius, queries, method)
    return qi, ci


def hamming_pairs_dist(
    codes: np.ndarray, radius: int, queries: np.ndarray | None = None, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`hamming_pairs` with the distance of each pair, ordered by query, then code.

    ``method``: ``flat``, ``multihash`` (:func:`binary_index`), ``split`` (:func:`split_hamming_pairs`)
    or ``auto``: multihash where :func:`binary_index` picks it, else split where its cost model
    beats flat brute force (large inputs), else flat. All of them find every pair within ``radius``.
    """
    codes = np.asarray(codes, dtype=np.uint64)
    q = codes if queries is None else np.asarray(queries, dtype=np.uint64)
    if len(codes) == 0 or len(q) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if method == "auto" and not (len(codes) > 200_000 and radius <= 7):  # binary_index's multihash range
        method = "split" if split_parts(len(q), len(codes), radius)[1] else "flat"
    if method == "split":
        return split_hamming_pairs(codes, radius, q)
    index = binary_index(codes, radius, method)
    lims, dist, ids = index.range_search(_as_bytes(q), radius + 1)  # FAISS: distance < radius
    qi = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64))
    return qi, ids.astype(np.int64), dist.astype(np.int64)


# cost model of split_hamming_pairs against flat search, measured on the 2-core VM (10^5-10^6 codes)
FLAT_PAIR_SECONDS = 0.45e-9  # IndexBinaryFlat range search per (query, code) pair, 2 threads
SPLIT_PAIR_SECONDS = 0.85e-9  # the same in split_hamming_pairs' blocks (1 thread)
SPLIT_BLOCK_SECONDS = 80e-6  # the fixed cost of one block (gather, index, search call)


def _substrings(parts: int) -> list[tuple[int, int]]:
    """(shift, width) of ``parts`` disjoint substrings covering the 64 bits, widths differing by at most 1."""
    widths = [64 // parts + (1 if i < 64 % parts else 0) for i in range(parts)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def _ball(width: int, t: int) -> np.ndarray:
    """Every ``width``-bit value with at most ``t`` bits set."""
    masks = [sum(1 << b for b in bits) for k in range(t + 1) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, np.int64)


def split_parts(n_queries: int, n_codes: int, radius: int) -> tuple[int, bool]:
    """Substrings for :func:`split_hamming_pairs` (the cheapest under a cost model) and whether it beats flat."""
    best, best_cost = 3, math.inf
    for parts in range(3, 17):  # at most 22-bit substrings: a 2^22 table of block starts
        t = radius // parts
        cost = 0.0
        for _, w in _substrings(parts):
            pairs = n_queries * n_codes * sum(math.comb(w, k) for k in range(t + 1)) / 2**w
            cost += min(2**w, n_queries) * SPLIT_BLOCK_SECONDS + pairs * SPLIT_PAIR_SECONDS
        if cost < best_cost:
            best, best_cost = parts, cost
    return best, best_cost < 0.5 * n_queries * n_codes * FLAT_PAIR_SECONDS


def split_hamming_pairs(
    codes: np.ndarray, radius: int, queries: np.ndarray, parts: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact Hamming range search by pigeonhole, in blocks searched by FAISS brute force.

    The 64 bits are cut into ``parts`` substrings; a pair within ``radius`` bits is within
    ``t = radius // parts`` bits on at least one substring. For each substring, the queries are
    grouped by their value of it and each group is searched (IndexBinaryFlat, full 64-bit
    distance) against only the codes whose value is within ``t`` bits of the group's: every pair
    within ``radius`` is found, and kept at the first substring where it is within ``t``. Same
    pairs, distances and order as flat search, with a small share of its comparisons.
    """
    faiss = _faiss()
    codes = np.asarray(codes, dtype=np.uint64)
    queries = np.asarray(queries, dtype=np.uint64)
    parts = parts or split_parts(len(queries), len(codes), radius)[0]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # many small searches: threads waiting on each other cost more than they gain
    try:
        return _split_search(faiss, codes, radius, queries, parts)
    finally:
        faiss.omp_set_num_threads(threads)


def _split_search(
    faiss: Any, codes: np.ndarray, radius: int, queries: np.ndarray, parts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`split_hamming_pairs` (FAISS on one thread)."""
    t = radius // parts
    subs = _substrings(parts)
    out_q: list[np.ndarray] = []
    out_c: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    for i, (shift, width) in enumerate(subs):
        mask = np.uint64((1 << width) - 1)
        ball = _ball(width, t)
        c_val = ((codes >> np.uint64(shift)) & mask).astype(np.int64)
        c_order = np.argsort(c_val, kind="stable")
        c_bytes = _as_bytes(codes[c_order])
        c_start = np.searchsorted(c_val[c_order], np.arange(2**width + 1))
        q_val = ((queries >> np.uint64(shift)) & mask).astype(np.int64)
        q_order = np.argsort(q_val, kind="stable")
        values, first, count = np.unique(q_val[q_order], return_index=True, return_counts=True)
        q_bytes = _as_bytes(queries[q_order])
        found_q: list[np.ndarray] = []
        found_c: list[np.ndarray] = []
        found_d: list[np.ndarray] = []
        for v, f, k in zip(values.tolist(), first.tolist(), count.tolist(), strict=True):
            near = v ^ ball
            lo = c_start[near]
            lens = c_start[near + 1] - lo
            total = int(lens.sum())
            if total == 0:
                continue
            rows = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)  # the codes of those values
            index = faiss.IndexBinaryFlat(64)
            index.add(c_bytes[rows])
            lims, dist, ids = index.range_search(q_bytes[f : f + k], radius + 1)  # FAISS: distance < radius
            if len(ids):
                found_q.append(f + np.repeat(np.arange(k), np.diff(lims).astype(np.int64)))
                found_c.append(rows[ids])
                found_d.append(dist)
        if not found_q:
            continue
        qi, ci = q_order[np.concatenate(found_q)], c_order[np.concatenate(found_c)]
        dist = np.concatenate(found_d).astype(np.int64)
        x = queries[qi] ^ codes[ci]
        first_here = np.ones(len(qi), bool)  # not found at an earlier substring
        for s2, w2 in subs[:i]:
            first_here &= np.bitwise_count((x >> np.uint64(s2)) & np.uint64((1 << w2) - 1)) > t
        out_q.append(qi[first_here])
        out_c.append(ci[first_here])
        out_d.append(dist[first_here])
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    qi, ci, dist = np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_d)
    order = np.lexsort((ci, qi))
    return qi[order].astype(np.int64), ci[order].astype(np.int64), dist[order]


# --------------------------------------------------------------------------- cosine (float FAISS)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def choose_index_kind(n: int, flat_max_rows: int, ivf_max_rows: int) -> IndexKind:
    if n <= flat_max_rows:
        return "flat"
    if n <= ivf_max_rows:
        return "ivf"
    return "ivfpq"


def ivf_nlist(n: int) -> int:
    """IVF cells: ~2 sqrt(n), a power of two, at most n / 39 (so k-means has points to learn from).

    For a self-join the cost is ``n * nlist * d`` (assigning rows to cells) plus
    ``nprobe * n^2 / nlist * d`` (comparing within cells); ~sqrt(nprobe * n) cells balance them.
    """
    target = 2 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    return int(max(1, min(nlist, n // 39 or 1)))


def train_centroids(x: np.ndarray, nlist: int, niter: int = 10, max_points_per_centroid: int = 32, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (FAISS) of unit rows ``x``, trained on a sample."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    n = len(x)
    sample_size = min(n, nlist * max_points_per_centroid)
    sample = x if sample_size == n else x[np.sort(rng.choice(n, sample_size, replace=False))]
    km = faiss.Kmeans(
        x.shape[1], nlist, niter=niter, spherical=True, seed=seed,
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
    )  # fmt: skip
    km.train(np.ascontiguousarray(sample))
    return np.asarray(km.centroids, dtype=np.float32)


def ivf_join_pairs(
    x: np.ndarray, threshold: float, nlist: int | None = None, nprobe: int = 3, block_floats: int = 1 << 25
) -> tuple[np.ndarray, np.ndarray]:
    """Self-join of unit rows by IVF, cell by cell: pairs (i < j) with ``x_i . x_j >= threshold``.

    Each row lives in its nearest cell and probes its ``nprobe`` nearest cells, as in a FAISS
    IVF search; but the comparisons are done cell-major, as dense matrix products of the rows
    probing a cell against the rows living in it, which on CPU is several times faster than
    ``n`` separate IVF searches. A pair is missed only when neither row's probes reach the
    other's cell.
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    nlist = nlist or ivf_nlist(n)
    nprobe = min(nprobe, nlist)
    t0 = time.perf_counter()
    centroids = train_centroids(x, nlist)
    t1 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    _, probes = quantizer.search(x, nprobe)  # (n, nprobe) cells, nearest first
    t2 = time.perf_counter()
    home = probes[:, 0]
    members_order = np.argsort(home, kind="stable")
    members_bounds = np.searchsorted(home[members_order], np.arange(nlist + 1))
    flat = probes.reshape(-1)
    probe_order = np.argsort(flat, kind="stable")
    probe_rows = probe_order // nprobe
    probe_bounds = np.searchsorted(flat[probe_order], np.arange(nlist + 1))
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    sims_out: list[np.ndarray] = []
    for cell in range(nlist):
        members = members_order[members_bounds[cell] : members_bounds[cell + 1]]
        queries = probe_rows[probe_bounds[cell] : probe_bounds[cell + 1]]
        if len(members) == 0 or len(queries) == 0:
            continue
        xm = x[members]
        step = max(1, block_floats // len(members))
        for s in range(0, len(queries), step):
            q = queries[s : s + step]
            sims = x[q] @ xm.T
            qi, mi = np.nonzero(sims >= threshold)
            a, b = q[qi], members[mi]
            keep = a != b
            rows_out.append(np.minimum(a, b)[keep])
            cols_out.append(np.maximum(a, b)[keep])
            sims_out.append(sims[qi, mi][keep])
    log.info(
        "ivf join: %d rows, %d cells, nprobe %d: train %.1f s, assign %.1f s, join %.1f s",
        n, nlist, nprobe, t1 - t0, t2 - t1, time.perf_counter() - t2,
    )  # fmt: skip
    if not rows_out:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs = np.stack([np.concatenate(rows_out), np.concatenate(cols_out)], axis=1).astype(np.int64)
    sims_all = np.concatenate(sims_out).astype(np.float32)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, sims_all[first]


def build_cosine_index(
    x: np.ndarray, kind: IndexKind, nprobe: int = 16, use_gpu: bool = False, train_size: int = 262_144, seed: int = 0
) -> faiss.Index:
    """An inner-product index over unit vectors ``x``, trained on a sample when it needs training."""
    faiss = _faiss()
    n, d = x.shape
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, metric)
        index.hnsw.efConstruction = 40
    elif kind in ("ivf", "ivfpq"):
        nlist = ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        else:
            m = max((m for m in range(1, 65) if d % m == 0 and d // m >= 8), default=1)  # >= 8 dims per code byte
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, metric)
        index.nprobe = min(nprobe, nlist)
        index.cp.min_points_per_centroid = 5
        rng = np.random.default_rng(seed)
        sample = x if n <= train_size else x[np.sort(rng.choice(n, train_size, replace=False))]
        index.train(sample)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if use_gpu and kind != "hnsw" and _gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def _gpu_count() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def cosine_pairs(
    x: np.ndarray,
    threshold: float,
    kind: IndexKind | Literal["auto"] = "auto",
    neighbors: int = 32,
    nprobe: int = 16,
    use_gpu: bool = False,
    flat_max_rows: int = 50_000,
    ivf_max_rows: int = 20_000_000,
    batch: int = 8192,  # queries per search call (IVF-PQ keeps a lookup table per query in flight)
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of ``x`` with cosine similarity >= ``threshold``, and the similarities.

    ``flat`` and ``ivf`` use range search (every pair above the threshold; IVF only within the
    ``nprobe`` cells); ``hnsw`` and ``ivfpq`` retrieve ``neighbors`` per row, and ``ivfpq`` re-ranks
    them with exact similarities. On a GPU every kind retrieves ``neighbors`` per row.
    """
    x = normalize(x)
    n = len(x)
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    if kind == "auto":
        kind = choose_index_kind(n, flat_max_rows, ivf_max_rows)
    gpu = use_gpu and _gpu_count() > 0
    if kind == "ivf" and not gpu:
        return ivf_join_pairs(x, threshold, nprobe=nprobe)
    index = build_cosine_index(x, kind, nprobe=nprobe, use_gpu=use_gpu)
    if kind == "hnsw":
        index.hnsw.efSearch = max(2 * neighbors, 64)
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    sims_out: list[np.ndarray] = []
    for s in range(0, n, batch):
        q = x[s : s + batch]
        if kind in ("flat", "ivf") and not gpu:
            lims, sims, ids = index.range_search(q, threshold - 1e-6)
            r = s + np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64))
            c = ids.astype(np.int64)
        else:
            sims, ids = index.search(q, min(neighbors + 1, n))
            r = s + np.repeat(np.arange(len(q), dtype=np.int64), ids.shape[1])
            c = ids.reshape(-1).astype(np.int64)
            sims = sims.reshape(-1)
            valid = c >= 0
            r, c, sims = r[valid], c[valid], sims[valid]
            if kind == "ivfpq":  # PQ similarities are approximate: re-rank exactly
                sims = np.einsum("ij,ij->i", x[r], x[c])
        keep = (r < c) & (sims >= threshold)
        rows_out.append(r[keep])
        cols_out.append(c[keep])
        sims_out.append(sims[keep].astype(np.float32))
    pairs = np.stack([np.concatenate(rows_out), np.concatenate(cols_out)], axis=1)
    sims_all = np.concatenate(sims_out)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, sims_all[first]


# --------------------------------------------------------------------------- signal table


def _quality(row: Row, name: str) -> float | None:
    for s in row.get("scores") or []:
        sname = s["name"] if isinstance(s, dict) else s.name
        if sname == name:
            return float(s["value"] if isinstance(s, dict) else s.value)
    return None


def signals_table(rows: list[Row], quality_score: str) -> pa.Table:
    """The dedup signals of ``rows`` as an Arrow table (``SIGNAL_FIELDS``)."""
    cols: dict[str, list[Any]] = {name: [] for name, _ in SIGNAL_FIELDS}
    for i, row in enumerate(rows):
        start, end = row.get("clip_start"), row.get("clip_end")
        w, h = row.get("width"), row.get("height")
        cols["key"].append(row.get("key") or row.get("video_id") or str(i))
        cols["input_index"].append(int(row.get("input_index") or 0))
        cols["clip_index"].append(int(row.get("clip_index") or 0))
        cols["duration"].append(float(end - start) if start is not None and end is not None else None)
        cols["pixels"].append(int(w * h) if w and h else None)
        cols["quality"].append(_quality(row, quality_score))
        cols["content_hash"].append(row.get("content_hash"))
        for name in ("frame_hashes", "hash_times", "audio_fingerprint", "code_times", "visual_embedding",
                     "text_embedding"):  # fmt: skip
            cols[name].append(list(row.get(name) or []))
    return pa.table(cols, schema=pa.schema([pa.field(n, t) for n, t in SIGNAL_FIELDS]))


def _flat_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (uint64) of a list<int64> column and the row of each."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    owner = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    return values, owner


def _embedding_rows(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that have an embedding (of the most common length) and the matrix of them."""
    lists = column.to_pylist()
    lengths = [len(v) if v else 0 for v in lists]
    dims = [d for d in lengths if d > 0]
    if not dims:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    dim = max(set(dims), key=dims.count)
    rows = np.array([i for i, d in enumerate(lengths) if d == dim], dtype=np.int64)
    if len(rows) < len(dims):
        log.warning("dedup: %d embeddings with a dimension other than %d ignored", len(dims) - len(rows), dim)
    return rows, np.array([lists[i] for i in rows], dtype=np.float32)


# --------------------------------------------------------------------------- aligned evidence


@dataclass
class CodeSet:
    """One perceptual signal (frames or audio) of every clip: codes grouped into timed units.

    A unit is what one code describes: a frame (whose ``len(FRAME_SCALES)`` hashes share it) or
    an audio window. ``unit_segment`` numbers runs of near-identical consecutive units of a clip
    (a still picture is one segment, ~256 ms of audio is one): matches are counted in distinct
    segments, so a still picture or a held note is one piece of evidence, not forty.
    """

    name: str
    codes: np.ndarray  # uint64, all codes
    code_unit: np.ndarray  # int64, the unit of each code
    unit_owner: np.ndarray  # int64, the clip of each unit
    unit_time: np.ndarray  # float64, seconds from the clip start
    unit_segment: np.ndarray  # int64, global segment id of each unit
    n_clips: int

    @property
    def n_units(self) -> int:
        return len(self.unit_owner)


def _segments(first_codes: np.ndarray, owner: np.ndarray, radius: int) -> np.ndarray:
    """Global ids of runs of units whose first code stays within ``radius`` of the run's first."""
    seg = np.zeros(len(first_codes), np.int64)
    current = -1
    anchor = 0
    prev_owner = -1
    for i, (code, own) in enumerate(zip(first_codes.tolist(), owner.tolist(), strict=True)):
        if own != prev_owner or (code ^ anchor).bit_count() > radius:
            current += 1
            anchor = code
            prev_owner = own
        seg[i] = current
    return seg


def code_set(
    name: str, codes_col: pa.ChunkedArray, times_col: pa.ChunkedArray | None, per_unit: int, default_step: float,
    radius: int,
) -> CodeSet:  # fmt: skip
    """Build a :class:`CodeSet` from a list<int64> code column and its list<float> time column.

    Rows without times (signal files from before times were stored) get ``default_step``
    seconds between units.
    """
    codes, owner = _flat_codes(codes_col)
    n = len(codes_col)
    counts = np.bincount(owner, minlength=n)
    if per_unit > 1 and np.any(counts % per_unit):
        log.warning("dedup: %s not in groups of %d; counting each code as a unit", name, per_unit)
        per_unit = 1
    units_per_clip = counts // per_unit
    code_unit = np.arange(len(codes), dtype=np.int64) // per_unit
    unit_owner = np.repeat(np.arange(n, dtype=np.int64), units_per_clip)
    times: list[Any] = times_col.to_pylist() if times_col is not None else [None] * n
    unit_time = np.empty(len(unit_owner), np.float64)
    pos = 0
    for i, k in enumerate(units_per_clip.tolist()):
        t = times[i]
        unit_time[pos : pos + k] = t if t is not None and len(t) == k else np.arange(k) * default_step
        pos += k
    first = codes[::per_unit] if per_unit > 1 else codes
    segment = _segments(first, unit_owner, radius)
    return CodeSet(name, codes, code_unit, unit_owner, unit_time, segment, n)


@dataclass
class Evidence:
    """How well clip ``a``'s units match clip ``b``'s at one time offset (``b`` time = ``a`` time + offset)."""

    offset: float
    overlap: float  # seconds both clips cover at this offset
    units_a: int  # informative units of a inside the overlap
    units_b: int
    matched_a: int  # of them, matched by b at this offset
    matched_b: int
    segments: int  # distinct matched segments (the smaller side)
    distance: float = 0.0  # median Hamming distance of the matched units (each unit's closest match)

    @property
    def ratio(self) -> float:
        """Share of matched units: the better of the two sides (a shorter or degraded copy has fewer)."""
        ra = self.matched_a / self.units_a if self.units_a else 0.0
        rb = self.matched_b / self.units_b if self.units_b else 0.0
        return max(ra, rb)


class AlignedMatches:
    """Unit matches of one signal between clips, with time offsets; rare codes only.

    Every code (and, for frames, its mirrored form) is searched under Hamming ``radius`` (FAISS).
    A unit that matches units of more than ``max_clips`` other clips is *common* (a test pattern, a
    logo, a generic texture: like a stop-listed hash in audio fingerprinting) and takes no part:
    neither as a match nor as a unit that must be matched.
    """

    def __init__(
        self, cs: CodeSet, radius: int, max_clips: int, tolerance: float, mirror_mask: int = 0, method: str = "auto",
        common: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """``common``: a per-unit mask decided elsewhere (the distributed job counts document
        frequencies over the whole corpus; a sub-table of a few clips cannot)."""
        self.cs = cs
        self.tolerance = tolerance
        n_codes = len(cs.codes)
        empty = np.zeros(0, np.int64)
        ua = ub = mir = dist = empty
        if n_codes:
            queries = cs.codes if not mirror_mask else np.concatenate([cs.codes, cs.codes ^ np.uint64(mirror_mask)])
            qi, ci, dist = hamming_pairs_dist(cs.codes, radius, queries, method)
            mir = (qi >= n_codes).astype(np.int64)
            ua, ub = cs.code_unit[qi % n_codes], cs.code_unit[ci]
            other = cs.unit_owner[ua] != cs.unit_owner[ub]
            ua, ub, mir, dist = ua[other], ub[other], mir[other], dist[other]
        if common is not None:
            self.common = np.asarray(common, bool)
        else:  # document frequency: other clips each unit matches
            self.common = unit_document_frequency(ua, cs.unit_owner[ub], cs.n_units) > max_clips
        if common is None and self.common.any():
            log.info("dedup: %d of %d %s units are common (match > %d clips): ignored",
                     int(self.common.sum()), cs.n_units, cs.name, max_clips)  # fmt: skip
        keep = ~self.common[ua] & ~self.common[ub] if len(ua) else np.zeros(0, bool)
        ua, ub, mir, dist = ua[keep], ub[keep], mir[keep], dist[keep]
        a, b = cs.unit_owner[ua], cs.unit_owner[ub]
        fwd = a < b  # the search is symmetric (mirror too: d(x^m, y) == d(x, y^m)): keep one direction
        ua, ub, mir, dist = ua[fwd], ub[fwd], mir[fwd], dist[fwd]
        if len(ua):  # one match per (unit, unit, orientation): the closest of their codes
            o = np.lexsort((dist, mir, ub, ua))
            ua, ub, mir, dist = ua[o], ub[o], mir[o], dist[o]
            first = np.ones(len(ua), bool)
            first[1:] = (ua[1:] != ua[:-1]) | (ub[1:] != ub[:-1]) | (mir[1:] != mir[:-1])
            ua, ub, mir, dist = ua[first], ub[first], mir[first], dist[first]
        a, b = cs.unit_owner[ua], cs.unit_owner[ub]
        order = np.lexsort((ub, ua, b, a))
        self.ua, self.ub, self.mir, self.dist = ua[order], ub[order], mir[order], dist[order]
        self.pa, self.pb = a[order], b[order]
        pair_keys = self.pa * np.int64(cs.n_clips) + self.pb
        self._keys, self._starts = np.unique(pair_keys, return_index=True)
        self._ends = np.append(self._starts[1:], len(pair_keys))
        # informative (non-common) unit times per clip, sorted, for the overlap denominators
        informative = ~self.common
        self._times: list[np.ndarray] = []
        self._segs: list[np.ndarray] = []
        by_owner = np.argsort(cs.unit_owner, kind="stable")
        bounds = np.searchsorted(cs.unit_owner[by_owner], np.arange(cs.n_clips + 1))
        for c in range(cs.n_clips):
            idx = by_owner[bounds[c] : bounds[c + 1]]
            idx = idx[informative[idx]]
            o = np.argsort(cs.unit_time[idx], kind="stable")
            self._times.append(cs.unit_time[idx][o])
            self._segs.append(cs.unit_segment[idx][o])

    def candidate_pairs(self, min_segments: int) -> np.ndarray:
        """Clip pairs (a < b) whose matches touch at least ``min_segments`` segments of each clip."""
        if not len(self._keys):
            return np.zeros((0, 2), np.int64)
        seg_a = np.unique(np.stack([self.pa, self.pb, self.cs.unit_segment[self.ua]], axis=1), axis=0)
        seg_b = np.unique(np.stack([self.pa, self.pb, self.cs.unit_segment[self.ub]], axis=1), axis=0)
        pairs_a, count_a = np.unique(seg_a[:, :2], axis=0, return_counts=True)
        pairs_b, count_b = np.unique(seg_b[:, :2], axis=0, return_counts=True)
        ok_a = {tuple(p) for p in pairs_a[count_a >= min_segments].tolist()}
        ok_b = {tuple(p) for p in pairs_b[count_b >= min_segments].tolist()}
        return np.array(sorted(ok_a & ok_b), dtype=np.int64).reshape(-1, 2)

    def _pair(self, a: int, b: int) -> slice:
        key = a * self.cs.n_clips + b
        i = int(np.searchsorted(self._keys, key))
        if i < len(self._keys) and self._keys[i] == key:
            return slice(int(self._starts[i]), int(self._ends[i]))
        return slice(0, 0)

    def informative_units(self, clip: int, lo: float, hi: float) -> tuple[int, int]:
        """(units, distinct segments) of ``clip`` with lo <= time <= hi."""
        t = self._times[clip]
        i, j = np.searchsorted(t, lo - 1e-6), np.searchsorted(t, hi + 1e-6, side="right")
        return int(j - i), len(np.unique(self._segs[clip][i:j]))

    def evidence(
        self, a: int, b: int, duration_a: float, duration_b: float, around: tuple[float, float] | None = None
    ) -> Evidence:
        """Evidence for clips ``a`` < ``b`` at the best offset of their matches.

        The best offset is the one most distinct units of ``a`` agree on, within ``tolerance``
        (the matches of a copy share one offset; chance matches scatter). ``around`` = (offset,
        radius) restricts the search to offsets near one found by another signal; without any
        match there the evidence is taken at that offset (and is empty).
        """
        s = self._pair(a, b)
        ua, ub, mir, dist = self.ua[s], self.ub[s], self.mir[s], self.dist[s]
        off = self.cs.unit_time[ub] - self.cs.unit_time[ua]
        tol = self.tolerance
        if around is not None:
            sel = np.abs(off - around[0]) <= around[1] + tol
            ua, ub, mir, off, dist = ua[sel], ub[sel], mir[sel], off[sel], dist[sel]
        if len(off) == 0 and around is None:
            return Evidence(0.0, 0.0, 0, 0, 0, 0, 0)
        offset = around[0] if around is not None else 0.0
        best_n = -1
        step = tol / 2
        for m in np.unique(mir).tolist():  # mirrored and plain matches are separate hypotheses
            o, u = off[mir == m], ua[mir == m]
            for c in np.unique(np.round(o / step)).tolist():  # candidate offsets on a grid of tol / 2
                w = np.abs(o - c * step) <= tol
                n = len(np.unique(u[w]))
                if n > best_n:
                    best_n, offset = n, float(np.median(o[w]))
        near = np.abs(off - offset) <= tol
        if near.any():  # the orientation with more matches at this offset
            m_best = max(np.unique(mir[near]).tolist(), key=lambda m: int(np.sum(near & (mir == m))))
            near &= mir == m_best
        lo_a = max(0.0, -offset)
        hi_a = min(duration_a, duration_b - offset)
        overlap = max(0.0, hi_a - lo_a)
        units_a, _ = self.informative_units(a, lo_a - tol, hi_a + tol)
        units_b, _ = self.informative_units(b, lo_a + offset - tol, hi_a + offset + tol)
        ua_n, ub_n, d_n = ua[near], ub[near], dist[near]
        segments = min(len(np.unique(self.cs.unit_segment[ua_n])), len(np.unique(self.cs.unit_segment[ub_n])))
        distance = 0.0
        if len(ua_n):  # the median over matched units of a of each one's closest match
            o = np.lexsort((d_n, ua_n))
            closest = np.ones(len(o), bool)
            closest[1:] = ua_n[o][1:] != ua_n[o][:-1]
            distance = float(np.median(d_n[o][closest]))
        return Evidence(
            offset, overlap, units_a, units_b, len(np.unique(ua_n)), len(np.unique(ub_n)), segments, distance
        )

    def segments_in_overlap(self, a: int, b: int, ev: Evidence) -> tuple[int, int]:
        lo_a = max(0.0, -ev.offset)
        hi_a = lo_a + ev.overlap
        tol = self.tolerance
        return (
            self.informative_units(a, lo_a - tol, hi_a + tol)[1],
            self.informative_units(b, lo_a + ev.offset - tol, hi_a + ev.offset + tol)[1],
        )


def unit_document_frequency(units: np.ndarray, other_clips: np.ndarray, n_units: int) -> np.ndarray:
    """Per unit: the number of distinct other clips it matches (``units[i]`` matched ``other_clips[i]``)."""
    if not len(units):
        return np.zeros(n_units, np.int64)
    uc = np.unique(np.stack([units, other_clips], axis=1), axis=0)
    return np.bincount(uc[:, 0], minlength=n_units)


def group_by_representative(n: int, pairs: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Groups in which every member is linked directly to its group's kept clip.

    Clips are visited best first (``rank``); a clip joins the best-ranked representative it has
    a link to, or becomes a representative itself. Unlike connected components, a chain
    A-B-C of two links does not put A and C together unless one of them links the other's
    representative: one weak link cannot merge two groups. Returns, per clip, the index of its
    group's representative (itself for a representative).
    """
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        if a != b:
            neighbours[a].append(b)
            neighbours[b].append(a)
    rep = np.full(n, -1, dtype=np.int64)
    for i in np.argsort(rank, kind="stable").tolist():
        reps = [j for j in neighbours[i] if rep[j] == j]
        rep[i] = min(reps, key=lambda j: rank[j]) if reps else i
    return rep


def _durations(table: pa.Table, sets: Sequence[CodeSet]) -> np.ndarray:
    dur = np.array([np.nan if v is None else v for v in table.column("duration").to_pylist()], np.float64)
    for cs in sets:  # rows without clip times: as long as their last timed unit
        if np.isnan(dur).any() and cs.n_units:
            last = np.zeros(table.num_rows)
            np.maximum.at(last, cs.unit_owner, cs.unit_time)
            dur = np.where(np.isnan(dur), np.maximum(last, 0.0) + 0.5, dur)
    return np.nan_to_num(dur, nan=0.0)


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def common_limit(cfg: DedupConfig, n: int) -> int:
    """A unit matching more than this many other clips (of ``n``) is common."""
    return max(cfg.common_code_clips, math.ceil(cfg.common_code_share * n))


def perceptual_links(
    table: pa.Table,
    cfg: DedupConfig,
    common: dict[str, np.ndarray] | None = None,
    only: set[tuple[int, int]] | None = None,
    n_total: int | None = None,
) -> tuple[dict[tuple[int, int], dict[str, Evidence]], dict[str, AlignedMatches], np.ndarray]:
    """Aligned frame / audio evidence per clip pair (a < b) that passes the signal's thresholds.

    ``common`` (per signal, a mask over the table's units), ``only`` (the pairs to look at) and
    ``n_total`` (the corpus size) let the distributed job verify its candidate pairs on a
    sub-table of their clips with the corpus-wide common codes: the same rule as on the whole table.
    """
    n = table.num_rows
    max_clips = common_limit(cfg, n_total or n)
    common = common or {}
    matches: dict[str, AlignedMatches] = {}
    ratios: dict[str, float] = {}
    if cfg.frames:
        cs = code_set("frames", table.column("frame_hashes"), _column(table, "hash_times"), len(FRAME_SCALES),
                      DEFAULT_FRAME_STEP, cfg.frame_radius)  # fmt: skip
        matches["frames"] = AlignedMatches(cs, cfg.frame_radius, max_clips, cfg.frame_offset_tolerance, MIRROR_MASK,
                                           common=common.get("frames"))  # fmt: skip
        ratios["frames"] = cfg.frame_match_ratio
    if cfg.audio:
        cs = code_set("audio", table.column("audio_fingerprint"), _column(table, "code_times"), 1,
                      DEFAULT_AUDIO_STEP, cfg.audio_radius)  # fmt: skip
        matches["audio"] = AlignedMatches(cs, cfg.audio_radius, max_clips, cfg.audio_offset_tolerance,
                                          common=common.get("audio"))  # fmt: skip
        ratios["audio"] = cfg.audio_match_ratio
    dur = _durations(table, [m.cs for m in matches.values()])
    found: dict[tuple[int, int], dict[str, Evidence]] = {}
    for name, m in matches.items():
        for a, b in m.candidate_pairs(cfg.min_matched_codes).tolist():
            if only is not None and (a, b) not in only:
                continue
            ev = m.evidence(a, b, dur[a], dur[b])
            if (
                ev.segments >= cfg.min_matched_codes
                and ev.ratio >= ratios[name]
                and ev.overlap >= cfg.min_overlap * min(dur[a], dur[b])
            ):
                found.setdefault((a, b), {})[name] = ev
    return found, matches, dur


def contradiction(
    a: int, b: int, offset: float, search: float, m: AlignedMatches, dur: np.ndarray, cfg: DedupConfig
) -> Evidence | None:
    """The evidence of signal ``m`` against linking ``a`` and ``b`` at ``offset``, or None.

    Both clips must carry enough information in that signal where they overlap (at least
    ``veto_min_segments`` distinct segments each) and match poorly there (``veto_ratio``): a
    frame link between two clips that say different things, or an audio link between different
    pictures, is a coincidence (same test pattern, same still picture, same tune), not a copy.
    """
    ev = m.evidence(a, b, dur[a], dur[b], around=(offset, search))
    seg_a, seg_b = m.segments_in_overlap(a, b, ev)
    if seg_a >= cfg.veto_min_segments and seg_b >= cfg.veto_min_segments and ev.ratio < cfg.veto_ratio:
        return ev
    # one clip says a lot where the other says (almost) nothing: speech against a bare tone,
    # a moving picture against a still one
    few, many = sorted((seg_a, seg_b))
    if many >= 2 * cfg.veto_min_segments and few < cfg.veto_min_segments and few < many / 4:
        return ev
    return None


def _describe(name: str, ev: Evidence) -> str:
    return (
        f"{name} {ev.ratio:.2f} of units ({ev.segments} segments, median distance {ev.distance:g}) "
        f"at {ev.offset:+.2f} s over {ev.overlap:.1f} s"
    )


Links = dict[tuple[int, int], dict[str, str]]  # (a, b) with a < b -> signal -> readable evidence


def verified_links(
    table: pa.Table,
    cfg: DedupConfig,
    common: dict[str, np.ndarray] | None = None,
    only: set[tuple[int, int]] | None = None,
    exact: Sequence[tuple[int, int]] | None = None,
    n_total: int | None = None,
    fixed: np.ndarray | None = None,
) -> tuple[Links, int, np.ndarray]:
    """Exact, frame and audio links no other perceptual signal contradicts: the precise rule.

    On a whole table (the single-machine path) every pair is looked at and exact pairs are found
    here; the distributed job passes the candidate pairs of a sub-table (``only``), its exact
    pairs (``exact``), the corpus-wide common units (``common``) and the corpus size
    (``n_total``). Pairs of two ``fixed`` rows (clips of earlier outputs) are never linked.
    Returns the links, the number of vetoed candidates and the clip durations.
    """
    if cfg.frames or cfg.audio:
        perceptual, matches, dur = perceptual_links(table, cfg, common, only, n_total)
    else:
        perceptual, matches, dur = {}, {}, _durations(table, [])
    candidates: dict[tuple[int, int], dict[str, Evidence]] = {p: dict(v) for p, v in perceptual.items()}
    if cfg.exact:
        if exact is None:
            exact = [(min(i, j), max(i, j)) for i, j in exact_pairs(table.column("content_hash").to_pylist()).tolist()]
        for a, b in exact:
            same = Evidence(0.0, float(min(dur[a], dur[b])), 1, 1, 1, 1, 1)
            candidates.setdefault((a, b), {})["exact"] = same
    keys = table.column("key").to_pylist()
    links: Links = {}
    vetoed = 0
    for (a, b), signals in candidates.items():
        if fixed is not None and fixed[a] and fixed[b]:
            continue
        lead = next(s for s in ("exact", "frames", "audio") if s in signals)
        offset = signals[lead].offset
        search = 0.0 if lead == "exact" else matches[lead].tolerance
        against = None
        for name, m in matches.items():
            if name in signals:
                continue
            ev = contradiction(a, b, offset, search + (0.25 if lead == "exact" else 0.0), m, dur, cfg)
            if ev is not None:
                against = (name, ev)
                break
        if against is not None:
            vetoed += 1
            log.debug("dedup: %s ~ %s by %s vetoed: %s", keys[a], keys[b], lead, _describe(*against))
            continue
        links[(a, b)] = {s: ("same content_hash" if s == "exact" else _describe(s, ev)) for s, ev in signals.items()}
    return links, vetoed, dur


def semantic_text(sim: float) -> str:
    return f"cosine {sim:.3f}"


def add_semantic_links(table: pa.Table, cfg: DedupConfig, links: Links) -> None:
    """Cosine links of ``cfg.semantic_fields`` over the whole table (never vetoed)."""
    for name in cfg.semantic_fields:
        if name not in table.column_names:
            continue
        rows, x = _embedding_rows(table.column(name))
        if len(rows) < 2:
            continue
        kind = "auto" if cfg.index == "auto" else cfg.index
        pairs, sims = cosine_pairs(
            x, cfg.semantic_threshold, kind, cfg.neighbors, cfg.nprobe, cfg.use_gpu, cfg.flat_max_rows, cfg.ivf_max_rows
        )  # fmt: skip
        for (i, j), sim in zip(pairs.tolist(), sims.tolist(), strict=True):
            a, b = sorted((int(rows[i]), int(rows[j])))
            links.setdefault((a, b), {})[f"semantic:{name}"] = semantic_text(sim)


def _floats(column: pa.ChunkedArray | list[Any]) -> np.ndarray:
    values = column.to_pylist() if isinstance(column, pa.ChunkedArray) else column
    return np.array([np.nan if v is None else v for v in values], np.float64)


def keep_rank(
    cfg: DedupConfig,
    quality: np.ndarray,
    duration: np.ndarray,
    pixels: np.ndarray,
    input_index: np.ndarray,
    clip_index: np.ndarray,
    keys: Sequence[str],
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`rank_keys` under ``cfg.keep``, with ``fixed`` rows (earlier outputs) ranked before all others.

    The relative order of any subset of clips is the same whichever other clips are ranked with
    them, so the distributed job ranks only the clips that have links.
    """
    rank = rank_keys(cfg.keep, quality, duration, pixels, input_index, clip_index, keys)
    if fixed is None or not np.any(fixed):
        return rank
    order = np.lexsort((rank, ~np.asarray(fixed, bool)))
    out = np.empty(len(order), np.int64)
    out[order] = np.arange(len(order))
    return out


def table_rank(table: pa.Table, cfg: DedupConfig, dur: np.ndarray, fixed: np.ndarray | None = None) -> np.ndarray:
    return keep_rank(
        cfg, _floats(table.column("quality")), dur, _floats(table.column("pixels")),
        np.array(table.column("input_index").to_pylist(), np.int64),
        np.array(table.column("clip_index").to_pylist(), np.int64), table.column("key").to_pylist(), fixed,
    )  # fmt: skip


def group_links(
    keys: Sequence[str], links: Links, rank: np.ndarray, cfg: DedupConfig, fixed: np.ndarray | None = None
) -> pa.Table:
    """Groups around kept clips from ``links`` between rows ``0..len(keys)``; the decisions table.

    Columns: key, group (the representative's key), duplicate_of (kept key or null), signals (of
    the clip's link to its representative; for a representative, of its members' links) and
    evidence (a readable account of that link). ``fixed`` rows (earlier outputs) are only ever
    representatives: links between two of them are dropped, and they rank first.
    """
    n = len(keys)
    if fixed is not None:
        links = {p: v for p, v in links.items() if not (fixed[p[0]] and fixed[p[1]])}
    pairs = np.array(sorted(links), dtype=np.int64).reshape(-1, 2)
    if cfg.grouping == "connected":
        labels = union_find(n, pairs)
        kept_of = choose_kept(labels, rank)
        rep = np.where(kept_of < 0, np.arange(n), kept_of)
    else:
        rep = group_by_representative(n, pairs, rank)
    signals: list[set[str]] = [set() for _ in range(n)]
    evidence: list[str | None] = [None] * n
    for i in range(n):
        r = int(rep[i])
        if r == i:
            continue
        link = links.get((min(i, r), max(i, r)))
        if link is None:  # connected components: no direct link to the kept clip
            signals[i].add("chain")
            continue
        signals[i].update(link)
        signals[r].update(link)
        evidence[i] = "; ".join(link.values())
    return pa.table(
        {
            "key": list(keys),
            "group": [keys[int(g)] for g in rep.tolist()],
            "duplicate_of": [None if int(rep[i]) == i else keys[int(rep[i])] for i in range(n)],
            "signals": [sorted(s) for s in signals],
            "evidence": pa.array(evidence, pa.string()),
        }
    )


def links_per_signal(links: Links) -> dict[str, int]:
    per_signal: dict[str, int] = {}
    for sigs in links.values():
        for s in sigs:
            per_signal[s] = per_signal.get(s, 0) + 1
    return per_signal


def find_duplicates(table: pa.Table, cfg: DedupConfig, fixed: np.ndarray | None = None) -> pa.Table:
    """Decide duplicates from a signals table (the single-machine path).

    Returns one row per input row (see :func:`group_links`). ``fixed`` marks rows of earlier
    outputs: never duplicates, always representatives, ranked before every other clip.
    """
    n = table.num_rows
    started = time.perf_counter()
    links, vetoed, dur = verified_links(table, cfg, fixed=fixed)
    if cfg.semantic:
        add_semantic_links(table, cfg, links)
    log.info(
        "dedup: links per signal %s; %d candidate links vetoed by a contradicting signal", links_per_signal(links), vetoed
    )  # fmt: skip
    decisions = group_links(table.column("key").to_pylist(), links, table_rank(table, cfg, dur, fixed), cfg, fixed)
    dup_of = decisions.column("duplicate_of").to_pylist()
    groups = decisions.column("group").to_pylist()
    log.info(
        "dedup: %d rows, %d duplicates in %d groups (%.2f s)",
        n, sum(d is not None for d in dup_of), len({g for g, d in zip(groups, dup_of, strict=True) if d is not None}),
        time.perf_counter() - started,
    )  # fmt: skip
    return decisions


def dedup_parquet(paths: Sequence[str | Path], cfg: DedupConfig) -> pa.Table:
    """Decide again, on one machine, from signal files written earlier (``OUTPUT/signals/*.parquet``)."""
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p, columns=[n for n, _ in SIGNAL_FIELDS]) for p in paths])
    return find_duplicates(table, cfg)


class DedupStage(Stage[DedupConfig]):
    """Global dedup phase: marks duplicates with ``drop_reason='duplicate'`` and ``duplicate_of``.

    The engine calls, in order: ``phase_signals(rows)`` on the workers (each partition's signal
    table, written to ``OUTPUT/signals/``); ``decide(signal_uris, against, run_map)`` once (the
    driver coordinates, the work runs as tasks; decisions go to ``STAGING/dedup/decisions/``);
    ``apply_partition(partition, rows)`` on the workers (the updates of one partition's rows).
    """

    name = "dedup"
    global_phase = True
    reads = (
        "key", "input_index", "clip_index", "clip_start", "clip_end", "width", "height", "scores",
        "content_hash", "frame_hashes", "hash_times", "audio_fingerprint", "code_times",
        "visual_embedding", "text_embedding",
    )  # fmt: skip
    # quality scores and embeddings are used when present (semantic dedup needs visual_tags / text_embed)
    optional_reads = ("scores", "visual_embedding", "text_embedding")
    writes = ("drop_reason", "duplicate_of")

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return 1_000_000

    def setup(self) -> None:
        _faiss()  # fail early and clearly when faiss is missing

    def process_batch(self, rows: list[Row]) -> list[Any]:
        """The single-machine decision over rows already in memory (one update per row)."""
        decisions = find_duplicates(signals_table(rows, self.config.quality_score), self.config)
        return [
            {"drop_reason": "duplicate", "duplicate_of": dup} if dup is not None else {}
            for dup in decisions.column("duplicate_of").to_pylist()
        ]

    def phase_signals(self, rows: list[Row]) -> pa.Table:
        """Phase 1, on a worker: the dedup signals of one partition's surviving rows."""
        return signals_table(rows, self.config.quality_score)

    def decide(self, signal_uris: list[str], against: Sequence[Any], run_map: MapFn) -> dict[str, Any]:
        """Decide once over the signal files; decisions per partition under ``STAGING/dedup/decisions/``.

        ``against``: earlier outputs' committed partitions (``pipeline.resume.AgainstPartition``:
        partition, signals, rejects); their clips are fixed representatives, never marked.
        Returns a small summary (rows, duplicates, groups, links per signal, method, seconds).
        """
        from stages._dedup_scale import decide

        return decide(signal_uris, list(against), self.config, self.decisions_uri, run_map)

    @property
    def decisions_uri(self) -> str:
        from pipeline import storage

        return storage.join(self.context.staging_dir, "dedup", "decisions")

    def apply_partition(self, partition: int, rows: list[Row]) -> list[Any]:
        """Phase 2, on a worker: one update per row from the partition's decisions file."""
        from stages._dedup_scale import read_decisions

        dup_of = read_decisions(self.decisions_uri, partition)
        out: list[Any] = []
        for row in rows:
            target = dup_of.get(row.get("key"))
            out.append({"drop_reason": "duplicate", "duplicate_of": target} if target else {})
        return out

"""Dedup: a global phase that groups duplicate clips and keeps one clip per group.

Signals (each optional, see ``DedupConfig``); a pair of clips is linked when any enabled one says so:

* **exact**: equal ``content_hash`` (stages/fingerprint.py: decoded media, so re-muxed copies match);
* **frames**: perceptual frame hashes searched with a FAISS binary index under Hamming distance
  (queries also in mirrored form); clip A is a copy of B when at least ``frame_match_ratio`` of
  A's frames have a hash within ``frame_radius`` bits of one of B's hashes (either direction);
* **audio**: the same with audio codes, ``audio_radius`` and ``audio_match_ratio``;
* **semantic**: ``visual_embedding`` / ``text_embedding`` with cosine similarity of at least
  ``semantic_threshold``, searched exactly (flat) for small runs and with IVF-Flat, IVF-PQ (with
  exact re-ranking) or HNSW above (``index``); on GPUs when faiss has them.

Linked clips form groups (union-find over every link). In each group one clip is kept by the
``keep`` rule (quality score, longest, highest resolution or earliest input; ties fall to the
later rules and finally to the earliest key); the others get ``drop_reason="duplicate"`` and
``duplicate_of`` = the kept clip's key, so ``duplicate_of`` always names a kept clip.

The phase works on a table of signals: ``process_all`` writes it to
``STAGING/dedup/signals.parquet``, decides from it, and writes the decisions to
``STAGING/dedup/duplicates.parquet``; ``dedup_parquet`` runs the same decision on signal files
written earlier (re-runs, offline runs at scale). The core algorithms are plain functions on
numpy arrays (``hamming_pairs``, ``cosine_pairs``, ``code_match_pairs``, ``union_find``,
``choose_kept``) so benchmarks call them directly. Scaling to 100 M clips: infra/DEDUP_SCALING.md.

Placed early in ``stages`` (``[download, split, extract, quality, fingerprint, dedup, asr, ...]``)
it removes duplicates on cheap signals before the expensive model stages see them; placed after
the embedding stages it can also use the semantic signal.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
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

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]

SIGNAL_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("key", pa.string()),
    ("input_index", pa.int64()),
    ("clip_index", pa.int64()),
    ("duration", pa.float64()),
    ("pixels", pa.int64()),
    ("quality", pa.float64()),
    ("content_hash", pa.string()),
    ("frame_hashes", pa.list_(pa.int64())),
    ("audio_fingerprint", pa.list_(pa.int64())),
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
    codes = np.asarray(codes, dtype=np.uint64)
    q = codes if queries is None else np.asarray(queries, dtype=np.uint64)
    if len(codes) == 0 or len(q) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = binary_index(codes, radius, method)
    lims, _dist, ids = index.range_search(_as_bytes(q), radius + 1)  # FAISS: distance < radius
    qi = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64))
    return qi, ids.astype(np.int64)


def code_match_pairs(
    codes: np.ndarray,
    owner: np.ndarray,
    unit: np.ndarray,
    radius: int,
    min_ratio: float,
    min_count: int,
    mirror_mask: int = 0,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Clip pairs whose codes match: ((m x 2) pairs, their match ratio).

    ``owner[c]`` is the clip of code ``c``; ``unit[c]`` the unit it describes (a frame, whose
    several hashes share it, or the code itself), numbered globally. Clip A matches B when at least
    ``min_ratio`` of A's units (and ``min_count`` units) have a code within ``radius`` of one of B's
    codes; with ``mirror_mask`` the mirrored queries (``code ^ mirror_mask``) count too.
    """
    codes = np.asarray(codes, dtype=np.uint64)
    owner = np.asarray(owner, dtype=np.int64)
    unit = np.asarray(unit, dtype=np.int64)
    if len(codes) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    queries = codes
    q_unit = unit
    q_owner = owner
    if mirror_mask:
        queries = np.concatenate([codes, codes ^ np.uint64(mirror_mask)])
        q_unit = np.concatenate([unit, unit])
        q_owner = np.concatenate([owner, owner])
    qi, ci = hamming_pairs(codes, radius, queries, method)
    a, b, u = q_owner[qi], owner[ci], q_unit[qi]
    other = a != b
    a, b, u = a[other], b[other], u[other]
    if len(a) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    triples = np.unique(np.stack([a, b, u], axis=1), axis=0)  # each unit of A counted once per B
    pairs, matched = np.unique(triples[:, :2], axis=0, return_counts=True)
    units_per_clip = np.bincount(
        owner[np.unique(unit, return_index=True)[1]], minlength=int(owner.max()) + 1
    )
    ratio = matched / np.maximum(units_per_clip[pairs[:, 0]], 1)
    ok = (ratio >= min_ratio) & (matched >= min_count)
    return pairs[ok], ratio[ok]


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
        for name in ("frame_hashes", "audio_fingerprint", "visual_embedding", "text_embedding"):
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


def find_duplicates(table: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Decide duplicates from a signals table: key, group, duplicate_of (kept key or null), signals."""
    n = table.num_rows
    keys = table.column("key").to_pylist()
    edges: list[np.ndarray] = []
    edge_signal: list[str] = []

    def add(pairs: np.ndarray, signal: str) -> None:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        log.info("dedup: %d %s links", len(pairs), signal)
        edges.append(pairs)
        edge_signal.extend([signal] * len(pairs))

    started = time.perf_counter()
    if cfg.exact:
        add(exact_pairs(table.column("content_hash").to_pylist()), "exact")
    if cfg.frames:
        codes, owner = _flat_codes(table.column("frame_hashes"))
        # the len(FRAME_SCALES) hashes of one frame are one unit; rows hold whole frames
        per = len(FRAME_SCALES)
        if np.any(np.bincount(owner, minlength=n) % per):
            log.warning("dedup: frame_hashes not in groups of %d; counting each hash as a frame", per)
            per = 1
        unit = np.arange(len(codes)) // per
        pairs, _ = code_match_pairs(
            codes, owner, unit, cfg.frame_radius, cfg.frame_match_ratio, cfg.min_matched_codes, MIRROR_MASK
        )
        add(pairs, "frames")
    if cfg.audio:
        codes, owner = _flat_codes(table.column("audio_fingerprint"))
        pairs, _ = code_match_pairs(
            codes, owner, np.arange(len(codes)), cfg.audio_radius, cfg.audio_match_ratio, cfg.min_matched_codes
        )
        add(pairs, "audio")
    if cfg.semantic:
        for name in cfg.semantic_fields:
            rows, x = _embedding_rows(table.column(name))
            if len(rows) < 2:
                continue
            kind = "auto" if cfg.index == "auto" else cfg.index
            pairs, _ = cosine_pairs(
                x, cfg.semantic_threshold, kind, cfg.neighbors, cfg.nprobe, cfg.use_gpu,
                cfg.flat_max_rows, cfg.ivf_max_rows,
            )  # fmt: skip
            add(rows[pairs] if len(pairs) else pairs, f"semantic:{name}")
    all_edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    labels = union_find(n, all_edges)
    rank = rank_keys(
        cfg.keep,
        np.array([np.nan if v is None else v for v in table.column("quality").to_pylist()], np.float64),
        np.array([np.nan if v is None else v for v in table.column("duration").to_pylist()], np.float64),
        np.array([np.nan if v is None else v for v in table.column("pixels").to_pylist()], np.float64),
        np.array(table.column("input_index").to_pylist(), np.int64),
        np.array(table.column("clip_index").to_pylist(), np.int64),
        keys,
    )
    kept_of = choose_kept(labels, rank)
    signals: list[set[str]] = [set() for _ in range(n)]
    for (a, b), sig in zip(all_edges.tolist(), edge_signal, strict=True):
        signals[a].add(sig)
        signals[b].add(sig)
    dup_of = [None if k < 0 else keys[k] for k in kept_of.tolist()]
    log.info(
        "dedup: %d rows, %d duplicates in %d groups (%.2f s)",
        n, sum(d is not None for d in dup_of), len({labels[i] for i in range(n) if kept_of[i] >= 0}),
        time.perf_counter() - started,
    )  # fmt: skip
    return pa.table(
        {
            "key": keys,
            "group": [keys[int(g)] for g in labels.tolist()],
            "duplicate_of": dup_of,
            "signals": [sorted(s) for s in signals],
        }
    )


def dedup_parquet(paths: Sequence[str | Path], cfg: DedupConfig) -> pa.Table:
    """Re-run the decision on signal files written by earlier runs (``signals.parquet``)."""
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in paths])
    return find_duplicates(table, cfg)


class DedupStage(Stage[DedupConfig]):
    """Global dedup phase: marks duplicates with ``drop_reason='duplicate'`` and ``duplicate_of``."""

    name = "dedup"
    global_phase = True
    reads = (
        "key", "input_index", "clip_index", "clip_start", "clip_end", "width", "height", "scores",
        "content_hash", "frame_hashes", "audio_fingerprint", "visual_embedding", "text_embedding",
    )  # fmt: skip
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
        return self.process_all(rows)

    def process_all(self, rows: list[Row]) -> list[Any]:
        table = signals_table(rows, self.config.quality_score)
        decisions = find_duplicates(table, self.config)
        if self.config.write_signals:
            self._write(table, decisions)
        out: list[Any] = []
        for dup in decisions.column("duplicate_of").to_pylist():
            out.append({"drop_reason": "duplicate", "duplicate_of": dup} if dup is not None else {})
        return out

    def _write(self, table: pa.Table, decisions: pa.Table) -> None:
        """STAGING/dedup/{signals,duplicates}.parquet (uploaded when staging is an object store)."""
        import pyarrow.parquet as pq

        from pipeline.storage import StagingArea

        staging = StagingArea(self.context.staging_dir)
        for name, data in (("signals", table), ("duplicates", decisions)):
            rel = f"dedup/{name}.parquet"
            pq.write_table(data, staging.local(rel))
            uri = staging.publish(rel)
        log.info("dedup: signals and decisions written beside %s", uri)
    # quality scores and embeddings are used when present (semantic dedup needs visual_tags / text_embed)
    optional_reads = ("scores", "visual_embedding", "text_embedding")

"""The dedup decision over signal files: one task for small runs, a distributed job above.

``decide`` is what ``DedupStage.decide`` runs. It never reads rows on the driver: the work runs
as tasks through the engine's ``run_map`` (Ray Data tasks on the workers, or in-process), and
between rounds the driver holds counts and lists of partition numbers, never pairs or rows.

**Single task** (fewer than ``distributed_min_rows`` clips, or ``job: single``): one task reads
every signal file and runs :func:`stages.dedup.find_duplicates`.

**Distributed job** (``job: distributed``, or ``auto`` above the threshold), every step a set of
tasks; the shuffles are parquet files under ``STAGING/dedup/work/`` written through
``pipeline.storage`` (local folders or an object store):

1. *scan* (a task per signal file): exact hashes to hash-prefix partitions; every frame / audio
   code (frames also mirrored, as queries) cut into ``lsh_bands`` 32-bit bands, each band value
   to a bucket partition; a sample of each embedding field.
2. *exact* (a task per hash partition): rows with the same ``content_hash`` become the pairs
   (first row, each other row), as ``exact_pairs`` makes them on one machine.
3. *buckets* (a task per bucket partition and signal): within each bucket, code pairs of two
   clips within the Hamming radius are unit matches; a bucket holding codes of more than the
   common-code limit of clips is stop-listed (its units are common), which bounds the work.
4. *clips* (a task per chunk of signal files): a unit's document frequency over all bands (the
   distinct other clips it matches), common units (kept for verification), and candidate clip
   pairs whose non-common matches touch ``lsh_min_segments`` segments of each clip.
5. *semantic* (per embedding field): centroids trained on the sample (one task); each row
   assigned to its home and ``nprobe`` probe cells (a task per file); per-cell exact search
   (a task per cell partition, FAISS; a GPU kNN when faiss has GPUs).
   Steps 2, 4 and 5 write their candidate pairs to *pair partitions* (by the pair's first clip).
6. *pairs* (a task per pair partition): the candidates of every source merged, one row per pair
   (both sides of an LSH candidate must pass); the clips they need, listed per signal file.
7. *gather* (a task per signal file): those rows, with their common units, copied to their pair
   partitions.
8. *verify* (a task per few pair partitions, ~``pairs_per_task`` pairs): the precise
   single-machine rule (``stages.dedup.verified_links``: time-aligned evidence, thresholds,
   contradiction veto, with the corpus-wide common units) on sub-tables of a few clips, and the
   exact cosine of the semantic pairs. The links go to ``STAGING/dedup/links/`` (kept: the
   evidence of every pair), the rank columns of their clips to the work folder.
9. *components* (one task): connected components of the linked clips over the links' two id
   columns (16 bytes per link; scipy), each clip's group partition from its component.
10. *scatter* (a task per verify batch) moves links and rank rows to their group partitions;
    *group* (a task per group partition) groups around representatives over whole components
    (``group_links``, the single-machine grouping, so the same decisions) and *write* (a task
    per share of the input partitions, as many as new signal files) writes the decisions files.

Clips of earlier outputs (``against``) are read like the new ones (their duplicates, from their
rejects, left out), ranked before every new clip, never linked to each other and never written
into the decisions.

Decisions: ``{decisions}/{partition:06d}.parquet`` with the clips of that partition that belong
to a duplicate group (duplicates and their kept clips): key, group, duplicate_of, signals,
evidence. A clip not listed is kept and linked to nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.config import DedupConfig
from stages.dedup import (
    DEFAULT_AUDIO_STEP,
    DEFAULT_FRAME_STEP,
    SIGNAL_FIELDS,
    Links,
    _faiss,
    _gpu_count,
    code_set,
    common_limit,
    find_duplicates,
    group_links,
    ivf_nlist,
    keep_rank,
    links_per_signal,
    normalize,
    semantic_text,
    train_centroids,
    union_find,
    unit_document_frequency,
    verified_links,
)
from stages.fingerprint import FRAME_SCALES, MIRROR_MASK

log = logging.getLogger(__name__)

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
SIGNAL_NAMES = [n for n, _ in SIGNAL_FIELDS]
SIGNAL_SCHEMA = pa.schema([pa.field(n, t) for n, t in SIGNAL_FIELDS])
DECISION_SCHEMA = pa.schema(
    [("key", pa.string()), ("group", pa.string()), ("duplicate_of", pa.string()),
     ("signals", pa.list_(pa.string())), ("evidence", pa.string())]
)  # fmt: skip
GID_SHIFT = 32  # a clip's id: file index << 32 | row in the file (the order of the single-machine table)
# (codes column, times column, codes per unit, default step, mirrored queries)
PERCEPTUAL = {
    "frames": ("frame_hashes", "hash_times", len(FRAME_SCALES), DEFAULT_FRAME_STEP, True),
    "audio": ("audio_fingerprint", "code_times", 1, DEFAULT_AUDIO_STEP, False),
}
MAX_COMPONENT = 48  # verification: a connected component of more clips is verified pair by pair
BATCH_CODES = 4096  # verification: codes per sub-table (its search is brute force: cost ~ codes^2)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SignalFile:
    uri: str
    index: int  # clip ids of its rows: index << GID_SHIFT | row
    fixed: bool  # an earlier output's: its clips are fixed representatives
    rejects: tuple[str, ...] = ()  # fixed: its partition's rejects parts (duplicates left out)
    partition: int | None = None  # an earlier output's partition (new files carry a partition column)


def read_parquet(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    path = storage.localize(uri)
    if columns is not None:
        names = set(pq.read_schema(path).names)
        columns = [c for c in columns if c in names]
    return pq.read_table(path, columns=columns)


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a whole parquet file at ``uri`` (readers never see a partial one)."""
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="avforge-dedup-") as tmp:
            local = Path(tmp) / "part.parquet"
            pq.write_table(table, local)
            storage.put_file(local, uri)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)


def read_folder(uri: str, columns: Sequence[str] | None = None, prefix: str = "") -> pa.Table | None:
    """The parquet files of a folder (those whose names start with ``prefix``), concatenated; None if none has rows."""
    names = [u for u in storage.listdir(uri, ".parquet") if u.rsplit("/", 1)[-1].startswith(prefix)]
    tables = [read_parquet(u, columns) for u in names]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _duplicate_keys(rejects: Sequence[str]) -> set[str]:
    keys: set[str] = set()
    for uri in rejects:
        t = read_parquet(uri, ["key", "drop_reason"])
        if "drop_reason" in t.column_names:
            keys.update(t.filter(pc.equal(t.column("drop_reason"), "duplicate")).column("key").to_pylist())
    return keys


def load_signals(f: SignalFile, columns: Sequence[str]) -> tuple[pa.Table, np.ndarray]:
    """The rows of a signal file (an earlier output's without its duplicates) and their clip ids."""
    cols = list(dict.fromkeys(["key", *columns]))
    t = read_parquet(f.uri, cols)
    gids = (np.int64(f.index) << np.int64(GID_SHIFT)) + np.arange(t.num_rows, dtype=np.int64)
    if f.fixed and f.rejects:
        dups = _duplicate_keys(f.rejects)
        if dups:
            keep = ~pc.is_in(t.column("key"), value_set=pa.array(sorted(dups), pa.string())).to_numpy(zero_copy_only=False)
            t, gids = t.filter(pa.array(keep)), gids[keep]
    return t, gids


def _partitions(f: SignalFile, t: pa.Table) -> np.ndarray:
    if "partition" in t.column_names:
        return np.array(t.column("partition").to_pylist(), np.int64)
    p = f.partition if f.partition is not None else layout.partition_of_name(f.uri.rsplit("/", 1)[-1])
    return np.full(t.num_rows, p or 0, np.int64)


def _signal_table(t: pa.Table) -> pa.Table:
    """``t`` with exactly the signal columns (absent ones null), in ``SIGNAL_FIELDS`` order."""
    cols = [t.column(n).cast(typ) if n in t.column_names else pa.nulls(t.num_rows, typ) for n, typ in SIGNAL_FIELDS]
    return pa.Table.from_arrays(cols, schema=SIGNAL_SCHEMA)


def read_decisions(uri: str, partition: int) -> dict[str, str]:
    """key -> duplicate_of of one partition's duplicates (no file: none)."""
    file = storage.join(uri, f"{partition:06d}.parquet")
    if not storage.exists(file):
        return {}
    t = read_parquet(file, ["key", "duplicate_of"])
    return {k: d for k, d in zip(t.column("key").to_pylist(), t.column("duplicate_of").to_pylist(), strict=True) if d}


def _write_decisions(uri: str, item: tuple[int, pa.Table]) -> int:
    partition, table = item
    write_parquet(storage.join(uri, f"{partition:06d}.parquet"), table.cast(DECISION_SCHEMA))
    return table.num_rows


def grouped_rows(decisions: pa.Table) -> np.ndarray:
    """Rows of a decisions table whose group has more than one member."""
    groups = decisions.column("group").to_pylist()
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    return np.array([sizes[g] > 1 for g in groups], bool)


# --------------------------------------------------------------------------- entry point


def decide(
    signal_uris: Sequence[str], against: Sequence[Any], cfg: DedupConfig, out_uri: str, run_map: MapFn
) -> dict[str, Any]:
    """Decide over the signal files (and ``against``: ``AgainstPartition``-like objects with
    partition, signals, rejects); write the decisions under ``out_uri``; return a summary."""
    started = time.perf_counter()
    files: list[SignalFile] = []
    for a in against:
        for uri in a.signals:
            files.append(SignalFile(str(uri), len(files), True, tuple(str(r) for r in a.rejects), int(a.partition)))
    for uri in signal_uris:
        files.append(SignalFile(str(uri), len(files), False))
    storage.remove_tree(out_uri)  # decisions are made anew over every file
    counts = [_count_rows(f.uri) for f in files]  # footers only
    total = int(sum(c[0] for c in counts))
    mode = cfg.job
    if mode == "auto":
        mode = "distributed" if total >= cfg.distributed_min_rows else "single"
    if mode == "single":
        summary = run_map(functools.partial(_single_task, cfg=cfg, out_uri=out_uri), [files])[0] if files else {}
    else:
        summary = DistributedJob(files, counts, cfg, out_uri, run_map).run()
    summary["method"] = mode
    summary["seconds"] = round(time.perf_counter() - started, 3)
    log.info("dedup: %s", summary)
    return summary


def _count_rows(uri: str) -> tuple[int, int]:
    """(rows, frame and audio codes) of a signal file, from its parquet footer alone."""
    if storage.is_remote(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as fh:  # range reads of the footer only
            meta = pq.ParquetFile(fh).metadata
    else:
        meta = pq.ParquetFile(uri).metadata
    codes = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".", 1)[0] in ("frame_hashes", "audio_fingerprint"):
                codes += int(col.num_values)
    return int(meta.num_rows), codes


def _single_task(files: list[SignalFile], cfg: DedupConfig, out_uri: str) -> dict[str, Any]:
    """Every signal in one task; ``find_duplicates`` decides; decisions written per partition."""
    tables, fixed, parts = [], [], []
    for f in files:
        t, _ = load_signals(f, [*SIGNAL_NAMES, "partition"])
        tables.append(_signal_table(t))
        fixed.append(np.full(t.num_rows, f.fixed))
        parts.append(_partitions(f, t))
    table = pa.concat_tables(tables)
    is_fixed, partition = np.concatenate(fixed), np.concatenate(parts)
    decisions = find_duplicates(table, cfg, fixed=is_fixed if is_fixed.any() else None)
    write = grouped_rows(decisions) & ~is_fixed
    for p in np.unique(partition[write]).tolist():
        _write_decisions(out_uri, (p, decisions.filter(pa.array(write & (partition == p)))))
    return _summary(decisions.filter(pa.array(~is_fixed)), int((~is_fixed).sum()), int(is_fixed.sum()))


def _summary(decisions: pa.Table, rows: int, fixed_rows: int, **extra: Any) -> dict[str, Any]:
    dup = [d for d in decisions.column("duplicate_of").to_pylist() if d is not None]
    per_signal: dict[str, int] = {}
    for d, sigs in zip(decisions.column("duplicate_of").to_pylist(), decisions.column("signals").to_pylist(), strict=True):
        for s in sigs if d is not None else []:
            per_signal[s] = per_signal.get(s, 0) + 1
    return {"rows": rows, "against_rows": fixed_rows, "duplicates": len(dup), "groups": len(set(dup)),
            "duplicates_per_signal": per_signal, **extra}  # fmt: skip


# --------------------------------------------------------------------------- LSH helpers


def band_positions(bands: int) -> list[np.ndarray]:
    """Bit positions of each 32-bit band: the two halves, even / odd bits, then seeded random halves."""
    out = [np.arange(32), np.arange(32, 64), np.arange(0, 64, 2), np.arange(1, 64, 2)]
    rng = np.random.default_rng(1234)
    while len(out) < bands:
        perm = rng.permutation(64)
        out += [np.sort(perm[:32]), np.sort(perm[32:])]
    return [p.astype(np.uint64) for p in out[:bands]]


def band_values(codes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The bits of ``codes`` at ``positions``, packed into a uint64 (< 2^32)."""
    if np.array_equal(positions, np.arange(32, dtype=np.uint64)):
        return codes & np.uint64(0xFFFFFFFF)
    if np.array_equal(positions, np.arange(32, 64, dtype=np.uint64)):
        return codes >> np.uint64(32)
    out = np.zeros(len(codes), np.uint64)
    for j, p in enumerate(positions.tolist()):
        out |= ((codes >> np.uint64(p)) & np.uint64(1)) << np.uint64(j)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit hash of int64 keys (splitmix64 finaliser)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _partition_of(keys: np.ndarray, n: int) -> np.ndarray:
    return (_mix(keys) % np.uint64(n)).astype(np.int64)


def _scatter(table: pa.Table, parts: np.ndarray, folder: str, name: str) -> None:
    """Write the rows of ``table`` to ``{folder}/{part:05d}/{name}.parquet``, one file per part."""
    if not table.num_rows:
        return
    order = np.argsort(parts, kind="stable")
    sorted_parts = parts[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    for chunk in np.split(order, bounds):
        p = int(parts[chunk[0]])
        write_parquet(storage.join(folder, f"{p:05d}", f"{name}.parquet"), table.take(pa.array(chunk)))


# --------------------------------------------------------------------------- the distributed job


@dataclass(frozen=True)
class Plan:
    """What every task of the distributed job needs to know (picklable, small)."""

    cfg: DedupConfig
    work: str
    links: str  # the verified links, kept beside the decisions (evidence of the pairs)
    decisions: str
    n_fixed_files: int
    exact_parts: int
    bucket_parts: int
    pair_parts: int
    files_per_chunk: int
    n_total: int = 0  # clips, known after the scan
    cell_parts: int = 1
    nlist: int = 1
    sample_per_file: int = 0
    group_parts: int = 1  # known after the links
    write_parts: int = 1  # tasks writing decision files (each a share of the input partitions)

    def fixed(self, gids: np.ndarray) -> np.ndarray:
        return (np.asarray(gids) >> np.int64(GID_SHIFT)) < self.n_fixed_files

    def chunk(self, gids: np.ndarray) -> np.ndarray:
        return (np.asarray(gids) >> np.int64(GID_SHIFT)) // self.files_per_chunk

    def new_pairs(self, pairs: np.ndarray) -> np.ndarray:
        """The pairs (k x 2) that are not two clips of earlier outputs."""
        return pairs[~(self.fixed(pairs[:, 0]) & self.fixed(pairs[:, 1]))]


class DistributedJob:
    def __init__(
        self, files: list[SignalFile], counts: list[tuple[int, int]], cfg: DedupConfig, out_uri: str, run_map: MapFn
    ) -> None:
        """``counts``: (rows, codes) per file (``_count_rows``): partition counts follow from them."""
        self.files, self.cfg, self.run_map = files, cfg, run_map
        n = max(1, int(sum(c[0] for c in counts)))
        codes = int(sum(c[1] for c in counts))
        per_file = max(1, n // max(1, len(files)))
        parent = str(out_uri).rstrip("/").rsplit("/", 1)[0]
        nlist = ivf_nlist(n)
        self.plan = Plan(
            cfg=cfg, work=storage.join(parent, "work"), links=storage.join(parent, "links"), decisions=str(out_uri),
            n_fixed_files=sum(f.fixed for f in files),
            exact_parts=max(1, math.ceil(n / (cfg.rows_per_task * 20))),
            bucket_parts=max(1, math.ceil(2 * codes * cfg.lsh_bands / cfg.codes_per_task)),
            pair_parts=max(1, math.ceil(n / cfg.rows_per_task)),
            write_parts=max(1, sum(not f.fixed for f in files)),
            files_per_chunk=max(1, cfg.rows_per_task // per_file),
            cell_parts=max(1, math.ceil(n * min(cfg.nprobe, nlist) / (4 * cfg.rows_per_task))),
            nlist=nlist, sample_per_file=math.ceil(min(n, nlist * 32) / max(1, len(files))),
        )  # fmt: skip
        self.seconds: dict[str, float] = {}

    def _step(self, name: str, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        t0 = time.perf_counter()
        items = list(items)
        log.info("dedup job: %s, %d tasks", name, len(items))
        out = self.run_map(functools.partial(fn, self.plan), items) if items else []
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
        log.info("dedup job: %s done in %.1f s", name, time.perf_counter() - t0)
        return out

    def run(self) -> dict[str, Any]:
        """Rounds of tasks; between them the driver holds counts and lists of partitions only."""
        cfg = self.cfg
        storage.remove_tree(self.plan.work)
        storage.remove_tree(self.plan.links)
        scans = self._step("scan", _scan, self.files)
        n_total = int(sum(s["rows"] for s in scans))
        fixed_rows = int(sum(s["rows"] for s, f in zip(scans, self.files, strict=True) if f.fixed))
        self.plan = dataclasses.replace(self.plan, n_total=n_total)
        signals = [s for s in PERCEPTUAL if getattr(cfg, s)]
        fields = self._semantic_fields(scans) if cfg.semantic else {}
        chunks = math.ceil(len(self.files) / self.plan.files_per_chunk)
        reduce_items: list[tuple[str, Any]] = [("exact", p) for p in range(self.plan.exact_parts if cfg.exact else 0)]
        reduce_items += [("bucket", (name, p)) for name in signals for p in range(self.plan.bucket_parts)]
        reduce_items += [("train", (field, dim, nlist)) for field, (dim, nlist) in fields.items()]
        reduced = self._step("reduce", _run_task, reduce_items)
        trained = [item[1][0] for item, ok in zip(reduce_items, reduced, strict=True) if item[0] == "train" and ok]
        second: list[tuple[str, Any]] = [("clips", (name, c)) for name in signals for c in range(chunks)]
        second += [("assign", (field, fields[field][0], f)) for field in trained for f in self.files]
        self._step("clips", _run_task, second)
        self._step("cells", _run_task, [("cells", (field, p)) for field in trained for p in range(self.plan.cell_parts)])
        merged = self._step("pairs", _pair_partition, range(self.plan.pair_parts))
        candidates = _add_counts([m["candidates"] for m in merged])
        self._step("gather", _gather, self.files)
        verified = self._step("verify", _verify_batch, _batches([m["pairs"] for m in merged], cfg.pairs_per_task))
        linked = [v["batch"] for v in verified if v["n"]]
        comp = self._step("components", _components, [None])[0] if linked else {"clips": 0}
        grouped: list[dict[str, Any]] = []
        if comp["clips"]:
            self.plan = dataclasses.replace(self.plan, group_parts=comp["parts"])
            self._step("scatter", _scatter_links, linked)
            grouped = self._step("group", _group_part, range(comp["parts"]))
            self._step("write", _write_partitions, range(self.plan.write_parts))
        storage.remove_tree(self.plan.work)
        counts = _add_counts(grouped)
        return {
            "rows": n_total - fixed_rows, "against_rows": fixed_rows, "duplicates": counts.get("duplicates", 0),
            "groups": counts.get("groups", 0), "duplicates_per_signal": counts.get("duplicates_per_signal", {}),
            "candidates": candidates, "candidate_pairs": int(sum(m["pairs"] for m in merged)),
            "links": _add_counts([v["links"] for v in verified]),
            "vetoed": int(sum(v["vetoed"] for v in verified)), "linked_clips": comp["clips"],
            "files": len(self.files), "step_seconds": self.seconds,
        }  # fmt: skip

    def read_links(self) -> dict[tuple[str, str], dict[str, str]]:
        """The verified links by (key, key): signal -> evidence (tests, benchmark; not the job's path)."""
        t = read_folder(self.plan.links)
        if t is None:
            return {}
        return {(a, b): json.loads(s) for a, b, s in zip(*(t.column(c).to_pylist() for c in ("key_a", "key_b", "signals")), strict=True)}

    def _semantic_fields(self, scans: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
        """Per embedding field with rows: (its most common dimension, IVF cells)."""
        out: dict[str, tuple[int, int]] = {}
        for field in self.cfg.semantic_fields:
            dims: dict[int, int] = {}
            for s in scans:
                for d, c in s["dims"].get(field, {}).items():
                    dims[d] = dims.get(d, 0) + c
            if dims and sum(dims.values()) >= 2:
                dim = max(dims, key=lambda d: (dims[d], -d))
                out[field] = (dim, max(1, min(self.plan.nlist, ivf_nlist(dims[dim]))))
        return out


EXACT_FLAG = 1
SEMANTIC_FLAG = 2  # << field index
LINK_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("key_a", pa.string()), ("key_b", pa.string()),
                         ("signals", pa.string())])  # fmt: skip  # signals: JSON {signal: evidence}
RANK_COLUMNS = ("key", "quality", "duration", "pixels", "input_index", "clip_index", "partition")


def _add_counts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum of count dicts (nested dicts summed per key)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict):
                out[k] = _add_counts([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def _batches(sizes: Sequence[int], per_batch: int) -> list[list[int]]:
    """Consecutive pair partitions with pairs, packed into batches of about ``per_batch`` pairs."""
    out: list[list[int]] = []
    size = 0
    for p, n in enumerate(sizes):
        if not n:
            continue
        if not out or size + n > per_batch:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out


def _concat_pairs(parts: Sequence[np.ndarray]) -> np.ndarray:
    parts = [np.asarray(p, np.int64).reshape(-1, 2) for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def _rows_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of ``a`` (k x 2): whether ``b`` has the same row."""
    if not len(a) or not len(b):
        return np.zeros(len(a), bool)
    _, ids = np.unique(np.concatenate([a, b]), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    return np.isin(ids[: len(a)], ids[len(a) :])


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.unique(a, axis=0) if len(a) else np.zeros((0, 2), np.int64)
    return a[_rows_in(a, b)]


def _merge_pairs(parts: list[np.ndarray]) -> np.ndarray:
    """Candidate pairs (a, b, flags) with one row per pair, flags OR-ed."""
    rows = [p.reshape(-1, 3) for p in parts if len(p)]
    if not rows:
        return np.zeros((0, 3), np.int64)
    allp = np.concatenate(rows)
    uniq, inverse = np.unique(allp[:, :2], axis=0, return_inverse=True)
    flags = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(flags, inverse.reshape(-1), allp[:, 2])
    return np.column_stack([uniq, flags])


def _by_gid(t: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows of ``t`` in clip-id order, one per clip id (the first), and their ids."""
    t = t.take(pa.array(np.argsort(t.column("gid").to_numpy(), kind="stable")))
    gids = t.column("gid").to_numpy()
    first = np.r_[True, gids[1:] != gids[:-1]]
    return (t, gids) if first.all() else (t.filter(pa.array(first)), gids[first])


def _pairs_of(t: pa.Table | None) -> np.ndarray:
    if t is None:
        return np.zeros((0, 2), np.int64)
    return np.column_stack([t.column("a").to_numpy(), t.column("b").to_numpy()]).astype(np.int64)


def _write_candidates(plan: Plan, pairs: np.ndarray, folder: str, name: str, flags: int = 0) -> int:
    """Candidate pairs (a < b) to ``{work}/{folder}/{pair partition of a}/{name}.parquet``."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(pairs):
        t = pa.table({"a": pairs[:, 0], "b": pairs[:, 1], "flags": np.full(len(pairs), flags, np.int64)})
        _scatter(t, _partition_of(pairs[:, 0], plan.pair_parts), storage.join(plan.work, folder), name)
    return len(pairs)


# --------------------------------------------------------------------------- tasks


def _run_task(plan: Plan, item: tuple[str, Any]) -> Any:
    """One task of a round that mixes kinds (fewer rounds: each round is one ``run_map``)."""
    kind, arg = item
    return _TASKS[kind](plan, arg)


def _scan(plan: Plan, f: SignalFile) -> dict[str, Any]:
    """Per signal file: exact hashes, LSH band entries and embedding samples to the shuffle."""
    cfg = plan.cfg
    cols = ["content_hash"] if cfg.exact else []
    for name in PERCEPTUAL:
        if getattr(cfg, name):
            cols += list(PERCEPTUAL[name][:2])
    cols += list(cfg.semantic_fields) if cfg.semantic else []
    t, gids = load_signals(f, cols)
    stem = f"{f.index:06d}"
    if cfg.exact and "content_hash" in t.column_names:
        hashes = t.column("content_hash").to_pylist()
        sel = [i for i, h in enumerate(hashes) if h]
        if sel:
            hs = [hashes[i] for i in sel]
            parts = np.array([zlib.crc32(h.encode()) % plan.exact_parts for h in hs], np.int64)
            _scatter(pa.table({"hash": hs, "gid": gids[sel]}), parts, storage.join(plan.work, "exact"), stem)
    for name, (codes_col, times_col, per_unit, step, mirrored) in PERCEPTUAL.items():
        if getattr(cfg, name) and codes_col in t.column_names:
            entries = _band_entries(t, gids, name, codes_col, times_col, per_unit, step, mirrored, cfg)
            if entries is not None:
                keys = entries.column("key").to_numpy()
                _scatter(entries, _partition_of(keys, plan.bucket_parts), storage.join(plan.work, f"lsh-{name}"), stem)
    dims: dict[str, dict[int, int]] = {}
    for field in cfg.semantic_fields if cfg.semantic else []:
        if field not in t.column_names:
            continue
        lengths = pc.fill_null(pc.list_value_length(t.column(field)), 0).to_numpy(zero_copy_only=False)
        counts = np.bincount(lengths) if len(lengths) else np.zeros(1, np.int64)
        dims[field] = {int(d): int(c) for d, c in enumerate(counts.tolist()) if d > 0 and c}
        have = np.flatnonzero(lengths > 0)
        if len(have):
            rng = np.random.default_rng(f.index)
            take = np.sort(rng.choice(have, min(len(have), plan.sample_per_file), replace=False))
            sample = pa.table({"gid": gids[take], "vec": t.column(field).take(pa.array(take))})
            write_parquet(storage.join(plan.work, f"sem-{field}", "sample", f"{stem}.parquet"), sample)
    return {"rows": t.num_rows, "dims": dims}


def _band_entries(
    t: pa.Table, gids: np.ndarray, name: str, codes_col: str, times_col: str, per_unit: int, step: float,
    mirrored: bool, cfg: DedupConfig,
) -> pa.Table | None:  # fmt: skip
    """One row per (code, band) and, for frames, per mirrored code and band (a query only)."""
    radius = cfg.frame_radius if name == "frames" else cfg.audio_radius
    times = t.column(times_col) if times_col in t.column_names else None
    cs = code_set(name, t.column(codes_col), times, per_unit, step, radius)
    if not len(cs.codes):
        return None
    first_unit = np.searchsorted(cs.unit_owner, np.arange(t.num_rows))
    unit_local = np.arange(cs.n_units) - first_unit[cs.unit_owner]
    first_seg = np.full(t.num_rows, 0, np.int64)
    first_seg[cs.unit_owner[::-1]] = cs.unit_segment[::-1]  # the first segment of each clip
    seg_local = cs.unit_segment - first_seg[cs.unit_owner]
    unit = cs.code_unit
    codes = cs.codes
    mir = np.zeros(len(codes), np.int8)
    if mirrored:
        unit = np.concatenate([unit, unit])
        codes = np.concatenate([codes, codes ^ np.uint64(MIRROR_MASK)])
        mir = np.concatenate([mir, np.ones(len(mir), np.int8)])
    tables = []
    for band, pos in enumerate(band_positions(cfg.lsh_bands)):
        key = (np.uint64(band) << np.uint64(32)) | band_values(codes, pos)
        tables.append(pa.table({
            "key": key.view(np.int64), "code": codes.view(np.int64), "gid": gids[cs.unit_owner[unit]],
            "unit": unit_local[unit].astype(np.int32), "seg": seg_local[unit].astype(np.int32), "mir": mir,
        }))  # fmt: skip
    return pa.concat_tables(tables)


def _exact_reduce(plan: Plan, part: int) -> int:
    """Pairs (first clip, other clip) of clips with the same content hash, to the pair partitions."""
    t = read_folder(storage.join(plan.work, "exact", f"{part:05d}"))
    if t is None:
        return 0
    hashes = np.array(t.column("hash").to_pylist(), dtype=object)
    gids = t.column("gid").to_numpy()
    order = np.lexsort((gids, hashes.astype(str)))
    hashes, gids = hashes[order], gids[order]
    start = np.ones(len(gids), bool)
    start[1:] = hashes[1:] != hashes[:-1]
    first = gids[np.maximum.accumulate(np.where(start, np.arange(len(gids)), 0))]
    pairs = np.column_stack([first, gids])[~start]  # two earlier outputs' clips: left out by the pair partition
    return _write_candidates(plan, pairs, "cand", f"exact-{part:05d}", EXACT_FLAG)


def _bucket_reduce(plan: Plan, item: tuple[str, int]) -> dict[str, int]:
    """Unit matches within each LSH bucket of one partition; stop-listed buckets' units are common."""
    name, part = item
    cfg = plan.cfg
    radius = cfg.frame_radius if name == "frames" else cfg.audio_radius
    max_clips = common_limit(cfg, plan.n_total)
    t = read_folder(storage.join(plan.work, f"lsh-{name}", f"{part:05d}"))
    if t is None:
        return {"entries": 0, "matches": 0}
    key, code, gid = t.column("key").to_numpy(), t.column("code").to_numpy().view(np.uint64), t.column("gid").to_numpy()
    unit, seg, mir = t.column("unit").to_numpy(), t.column("seg").to_numpy(), t.column("mir").to_numpy()
    order = np.lexsort((gid, key))
    key, code, gid, unit, seg, mir = key[order], code[order], gid[order], unit[order], seg[order], mir[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    bucket = np.repeat(np.arange(len(starts)), sizes)
    # distinct clips per bucket (entries are sorted by gid within a bucket)
    new_clip = np.r_[True, (gid[1:] != gid[:-1]) | (bucket[1:] != bucket[:-1])]
    clips = np.bincount(bucket, weights=new_clip, minlength=len(starts)).astype(np.int64)
    # every unit there shares 32 bits with more than that many other clips; the cap keeps the
    # quadratic work per bucket bounded when the common-code limit grows with the corpus
    stop = clips > min(max_clips, cfg.lsh_max_bucket_clips) + 1
    common_sel = stop[bucket]
    out_rows: list[pa.Table] = []
    active = np.flatnonzero((clips > 1) & ~stop)
    # all ordered entry pairs within the active buckets, a block of buckets at a time
    cost = sizes[active].astype(np.int64) ** 2
    block_ends = np.searchsorted(np.cumsum(cost), np.arange(1, 1 + (cost.sum() // 4_000_000) + 1) * 4_000_000)
    lo = 0
    for hi in [*block_ends.tolist(), len(active)]:
        blk = active[lo:hi]
        lo = max(lo, hi)
        if not len(blk):
            continue
        s, st = sizes[blk], starts[blk]
        i = np.repeat(st, s) + (np.arange(s.sum()) - np.repeat(np.cumsum(s) - s, s))  # every entry of the block
        si = np.repeat(s, s)
        ii = np.repeat(i, si)
        first = np.repeat(np.repeat(st, s), si)
        jj = first + (np.arange(len(ii)) - np.repeat(np.cumsum(si) - si, si))
        ok = (mir[jj] == 0) & (gid[ii] != gid[jj])
        ii, jj = ii[ok], jj[ok]
        ok = np.bitwise_count(code[ii] ^ code[jj]) <= radius
        ii, jj = ii[ok], jj[ok]
        # both directions: the query's unit matched the index clip, and the other way round
        out_rows.append(pa.table({"gid": np.r_[gid[ii], gid[jj]], "unit": np.r_[unit[ii], unit[jj]],
                                  "seg": np.r_[seg[ii], seg[jj]], "other": np.r_[gid[jj], gid[ii]]}))  # fmt: skip
    matches = pa.concat_tables(out_rows) if out_rows else None
    if matches is not None and matches.num_rows:
        _scatter(matches, plan.chunk(matches.column("gid").to_numpy()), storage.join(plan.work, f"match-{name}"),
                 f"{part:05d}")  # fmt: skip
    if common_sel.any():
        common = pa.table({"gid": gid[common_sel], "unit": unit[common_sel]})
        _scatter(common, plan.chunk(gid[common_sel]), storage.join(plan.work, f"stop-{name}"), f"{part:05d}")
    return {"entries": len(key), "matches": 0 if matches is None else matches.num_rows}


def _clip_reduce(plan: Plan, item: tuple[str, int]) -> int:
    """Common units of a chunk's clips (document frequency over all bands) and one-sided candidates.

    Writes the pairs (a, b), a < b, whose side ``a`` passes (``a-`` files) and those whose side
    ``b`` passes (``b-`` files) to the pair partitions: a candidate needs both.
    """
    name, chunk = item
    cfg = plan.cfg
    max_clips = common_limit(cfg, plan.n_total)
    m = read_folder(storage.join(plan.work, f"match-{name}", f"{chunk:05d}"))
    stop = read_folder(storage.join(plan.work, f"stop-{name}", f"{chunk:05d}"))
    empty = np.zeros((0, 2), np.int64)
    unit_ids: list[np.ndarray] = []
    if stop is not None:
        unit_ids.append(np.column_stack([stop.column("gid").to_numpy(), stop.column("unit").to_numpy()]))
    if m is None:
        common = np.unique(np.concatenate(unit_ids), axis=0) if unit_ids else empty
        _write_common(plan, name, chunk, common)
        return 0
    gid, unit = m.column("gid").to_numpy(), m.column("unit").to_numpy().astype(np.int64)
    seg, other = m.column("seg").to_numpy().astype(np.int64), m.column("other").to_numpy()
    # a unit id per (clip, unit)
    uid_pairs = np.column_stack([gid, unit])
    units, uid = np.unique(uid_pairs, axis=0, return_inverse=True)
    uid = uid.reshape(-1)
    df = unit_document_frequency(uid, other, len(units))
    is_common = df > max_clips
    if stop is not None:
        stopped = np.column_stack([stop.column("gid").to_numpy(), stop.column("unit").to_numpy()])
        is_common |= _rows_in(units.astype(np.int64), stopped.astype(np.int64))
    unit_ids.append(units[is_common])
    _write_common(plan, name, chunk, np.unique(np.concatenate(unit_ids), axis=0))
    keep = ~is_common[uid]
    trip = np.unique(np.column_stack([gid[keep], other[keep], seg[keep]]), axis=0)
    pairs, counts = np.unique(trip[:, :2], axis=0, return_counts=True)
    pairs = pairs[counts >= cfg.lsh_min_segments]
    lo = pairs[:, 0] < pairs[:, 1]
    side_a = _write_candidates(plan, pairs[lo], f"side-{name}", f"a-{chunk:05d}")
    return side_a + _write_candidates(plan, pairs[~lo][:, ::-1], f"side-{name}", f"b-{chunk:05d}")


def _write_common(plan: Plan, name: str, chunk: int, units: np.ndarray) -> None:
    units = units.reshape(-1, 2)
    write_parquet(storage.join(plan.work, f"common-{name}", f"{chunk:05d}.parquet"),
                  pa.table({"gid": units[:, 0].astype(np.int64), "unit": units[:, 1].astype(np.int64)}))  # fmt: skip


def _train(plan: Plan, item: tuple[str, int, int]) -> bool:
    field, dim, nlist = item
    t = read_folder(storage.join(plan.work, f"sem-{field}", "sample"))
    if t is None:
        return False
    vecs = [v for v in t.column("vec").to_pylist() if v is not None and len(v) == dim]
    if len(vecs) < 2:
        return False
    x = normalize(np.array(vecs, np.float32))
    centroids = train_centroids(x, max(1, min(nlist, len(x) // 39 or 1)))
    write_parquet(storage.join(plan.work, f"sem-{field}", "centroids.parquet"),
                  pa.table({"c": pa.FixedSizeListArray.from_arrays(centroids.reshape(-1), dim)}))  # fmt: skip
    return True


def _centroids(plan: Plan, field: str) -> np.ndarray:
    t = read_parquet(storage.join(plan.work, f"sem-{field}", "centroids.parquet"))
    col = t.column("c")
    return pc.list_flatten(col).to_numpy().reshape(len(col), -1).astype(np.float32)


def _assign(plan: Plan, item: tuple[str, int, SignalFile]) -> int:
    """Each row of a file to its home cell (member) and its probe cells (query), by cell partition."""
    field, dim, f = item
    faiss = _faiss()
    t, gids = load_signals(f, [field])
    if field not in t.column_names:
        return 0
    lengths = pc.fill_null(pc.list_value_length(t.column(field)), 0).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(lengths == dim)
    if not len(rows):
        return 0
    col = t.column(field).take(pa.array(rows))
    x = normalize(pc.list_flatten(col).to_numpy().reshape(len(rows), dim))
    centroids = _centroids(plan, field)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    nprobe = min(plan.cfg.nprobe, len(centroids))
    _, probes = quantizer.search(x, nprobe)
    cell = probes.reshape(-1).astype(np.int64)
    row = np.repeat(np.arange(len(rows)), nprobe)
    home = np.tile(np.r_[True, np.zeros(nprobe - 1, bool)], len(rows))
    table = pa.table({
        "gid": gids[rows][row], "cell": cell, "home": home,
        "vec": pa.FixedSizeListArray.from_arrays(x[row].reshape(-1), dim),
    })  # fmt: skip
    _scatter(table, cell % plan.cell_parts, storage.join(plan.work, f"sem-{field}", "cells"), f"{f.index:06d}")
    return len(rows)


def _cell_reduce(plan: Plan, item: tuple[str, int]) -> int:
    """Per cell: every probing row against the rows living there, exact inner products (FAISS);
    the pairs to the pair partitions."""
    field, part = item
    t = read_folder(storage.join(plan.work, f"sem-{field}", "cells", f"{part:05d}"))
    if t is None:
        return 0
    gid, cell, home = t.column("gid").to_numpy(), t.column("cell").to_numpy(), t.column("home").to_numpy(zero_copy_only=False)
    col = t.column("vec")
    x = pc.list_flatten(col).to_numpy().reshape(len(col), -1).astype(np.float32)
    order = np.argsort(cell, kind="stable")
    bounds = np.flatnonzero(np.r_[True, cell[order][1:] != cell[order][:-1], True])
    out: list[np.ndarray] = []
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        q = order[s:e]
        members = q[home[q]]
        if not len(members):
            continue
        qi, mi = cell_search(x[q], x[members], plan.cfg.semantic_threshold, plan.cfg.neighbors, plan.cfg.use_gpu)
        a, b = gid[q][qi], gid[members][mi]
        keep = a != b
        out.append(np.column_stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]]))
    pairs = _concat_pairs(out)
    pairs = np.unique(pairs, axis=0) if len(pairs) else pairs
    bit = list(plan.cfg.semantic_fields).index(field)
    return _write_candidates(plan, pairs, "cand", f"sem{bit}-{part:05d}", SEMANTIC_FLAG << bit)


@functools.cache
def _gpu_resources() -> Any:
    """One FAISS GPU resource object per process (its scratch memory is reused across cells)."""
    return _faiss().StandardGpuResources()


def cell_search(q: np.ndarray, m: np.ndarray, threshold: float, neighbors: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """(query index, member index) of inner products >= ``threshold``: FAISS flat range search on
    CPU; on a GPU (faiss-gpu) a kNN of ``neighbors`` per query, filtered by the threshold."""
    faiss = _faiss()
    if use_gpu and _gpu_count() > 0:
        k = min(len(m), neighbors + 1)
        sims, ids = faiss.knn_gpu(_gpu_resources(), q, m, k, metric=faiss.METRIC_INNER_PRODUCT)
        qi = np.repeat(np.arange(len(q)), k)
        ok = (ids.reshape(-1) >= 0) & (sims.reshape(-1) >= threshold)
        return qi[ok], ids.reshape(-1)[ok].astype(np.int64)
    index = faiss.IndexFlatIP(m.shape[1])
    index.add(np.ascontiguousarray(m))
    lims, sims, ids = index.range_search(np.ascontiguousarray(q), threshold - 1e-6)
    qi = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
    ok = sims >= threshold
    return qi[ok], ids[ok].astype(np.int64)


def _pair_partition(plan: Plan, pp: int) -> dict[str, Any]:
    """One pair partition (pairs by their first clip): the candidates of every source merged into
    one row per pair, and the clips they need listed per signal file for the gather."""
    cfg = plan.cfg
    new = plan.new_pairs
    cand = read_folder(storage.join(plan.work, "cand", f"{pp:05d}"))
    pairs = _pairs_of(cand)
    flags = cand.column("flags").to_numpy() if cand is not None else np.zeros(0, np.int64)
    parts: list[np.ndarray] = []
    candidates: dict[str, int] = {}
    if cfg.exact:
        sel = new(pairs[flags == EXACT_FLAG])
        candidates["exact"] = len(sel)
        parts.append(np.column_stack([sel, np.full(len(sel), EXACT_FLAG)]))
    for name in PERCEPTUAL:
        if getattr(cfg, name):
            folder = storage.join(plan.work, f"side-{name}", f"{pp:05d}")
            both = new(_intersect(_pairs_of(read_folder(folder, prefix="a-")), _pairs_of(read_folder(folder, prefix="b-"))))
            candidates[name] = len(both)
            parts.append(np.column_stack([both, np.zeros(len(both), np.int64)]))
    for bit, field in enumerate(cfg.semantic_fields if cfg.semantic else []):
        sel = pairs[flags == (SEMANTIC_FLAG << bit)]
        sel = new(np.unique(sel, axis=0) if len(sel) else sel)
        candidates[f"semantic:{field}"] = len(sel)
        parts.append(np.column_stack([sel, np.full(len(sel), SEMANTIC_FLAG << bit)]))
    merged = _merge_pairs(parts)
    if len(merged):
        write_parquet(storage.join(plan.work, "pairs", f"{pp:05d}.parquet"),
                      pa.table({"a": merged[:, 0], "b": merged[:, 1], "flags": merged[:, 2]}))  # fmt: skip
        clips = np.unique(merged[:, :2])
        _scatter(pa.table({"gid": clips}), clips >> np.int64(GID_SHIFT), storage.join(plan.work, "want"), f"{pp:05d}")
    return {"candidates": candidates, "pairs": len(merged)}


def _gather(plan: Plan, f: SignalFile) -> int:
    """The rows the pair partitions need from one file, with their common units."""
    wanted = storage.listdir(storage.join(plan.work, "want", f"{f.index:05d}"), ".parquet")
    if not wanted:
        return 0
    t, gids = load_signals(f, [*SIGNAL_NAMES, "partition"])
    partition = _partitions(f, t)
    t = _signal_table(t).append_column("gid", pa.array(gids)).append_column("partition", pa.array(partition))
    chunk = int(plan.chunk(np.array([f.index << GID_SHIFT]))[0])
    for name in PERCEPTUAL:
        lists: list[list[int]] = [[] for _ in range(t.num_rows)]
        if getattr(plan.cfg, name):
            uri = storage.join(plan.work, f"common-{name}", f"{chunk:05d}.parquet")
            if storage.exists(uri):
                c = read_parquet(uri)
                cg, cu = c.column("gid").to_numpy(), c.column("unit").to_numpy()
                pos = np.searchsorted(gids, cg)
                ok = (pos < len(gids)) & (gids[np.minimum(pos, len(gids) - 1)] == cg)
                for r, u in zip(pos[ok].tolist(), cu[ok].tolist(), strict=True):
                    lists[r].append(int(u))
        t = t.append_column(f"_common_{name}", pa.array(lists, pa.list_(pa.int64())))
    rows_out = 0
    for uri in wanted:
        pp = int(uri.rsplit("/", 1)[-1].split(".")[0])
        rows = np.searchsorted(gids, read_parquet(uri).column("gid").to_numpy())
        write_parquet(storage.join(plan.work, "gather", f"{pp:05d}", f"{f.index:06d}.parquet"), t.take(pa.array(rows)))
        rows_out += len(rows)
    return rows_out


def _verify_batch(plan: Plan, pps: list[int]) -> dict[str, Any]:
    """The precise rule on the candidate pairs of a few pair partitions, a small sub-table at a time;
    the links go to ``{links}/{first partition}.parquet``, the rank columns of their clips to
    ``{work}/ranks/``."""
    cfg = plan.cfg
    cand = pa.concat_tables([read_parquet(storage.join(plan.work, "pairs", f"{pp:05d}.parquet")) for pp in pps])
    pairs = np.column_stack([cand.column(c).to_numpy() for c in ("a", "b", "flags")]).astype(np.int64)
    gathered = [read_folder(storage.join(plan.work, "gather", f"{pp:05d}")) for pp in pps]
    t, gids = _by_gid(pa.concat_tables([g for g in gathered if g is not None]))  # a clip gathered twice: once
    a, b = np.searchsorted(gids, pairs[:, 0]), np.searchsorted(gids, pairs[:, 1])
    flags = pairs[:, 2]
    fixed = plan.fixed(gids)
    perceptual = cfg.exact or cfg.frames or cfg.audio
    links: list[tuple[int, int, dict[str, str]]] = []
    vetoed = 0
    # sub-tables: connected components of the candidate pairs (a big one: pair by pair)
    label = union_find(len(gids), np.column_stack([a, b]))
    comp_of_pair = label[a]
    order = np.argsort(comp_of_pair, kind="stable")
    bounds = np.flatnonzero(np.r_[True, comp_of_pair[order][1:] != comp_of_pair[order][:-1], True])
    units: list[np.ndarray] = []  # components (or single pairs of a big one) ...
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        sel = order[s:e]
        rows = np.unique(np.r_[a[sel], b[sel]])
        units += [sel] if len(rows) <= MAX_COMPONENT else [np.array([p]) for p in sel.tolist()]
    # ... packed into sub-tables of up to BATCH_CODES codes: a pair's evidence depends on its two
    # clips alone (with the common units given), so clips of other pairs beside them change nothing
    codes = np.zeros(len(gids), np.int64)
    for col in ("frame_hashes", "audio_fingerprint"):
        codes += pc.fill_null(pc.list_value_length(t.column(col)), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for sel in units:
        c = int(codes[np.unique(np.r_[a[sel], b[sel]])].sum())
        if current and size + c > BATCH_CODES:
            batches.append(np.concatenate(current))
            current, size = [], 0
        current.append(sel)
        size += c
    if current:
        batches.append(np.concatenate(current))
    for sel in batches:
        rows = np.unique(np.r_[a[sel], b[sel]])
        local = {int(r): i for i, r in enumerate(rows.tolist())}
        sub = t.take(pa.array(rows))
        la, lb = [local[int(x)] for x in a[sel]], [local[int(x)] for x in b[sel]]
        found: Links = {}
        if perceptual:
            common = {name: _common_mask(sub, name, cfg) for name in PERCEPTUAL if getattr(cfg, name)}
            exact = [(x, y) for x, y, fl in zip(la, lb, flags[sel].tolist(), strict=True) if fl & EXACT_FLAG]
            found, v, _ = verified_links(
                _signal_table(sub), cfg, common=common, only=set(zip(la, lb, strict=True)), exact=exact,
                n_total=plan.n_total, fixed=fixed[rows],
            )  # fmt: skip
            vetoed += v
        for bit, field in enumerate(cfg.semantic_fields if cfg.semantic else []):
            for x, y, fl in zip(la, lb, flags[sel].tolist(), strict=True):
                if fl & (SEMANTIC_FLAG << bit):
                    va, vb = sub.column(field)[x].as_py(), sub.column(field)[y].as_py()
                    if not va or not vb or len(va) != len(vb):
                        continue
                    sim = float(normalize(np.array([va, vb], np.float32)).prod(axis=0).sum())
                    if sim >= cfg.semantic_threshold:
                        found.setdefault((x, y), {})[f"semantic:{field}"] = semantic_text(sim)
        sub_gids = sub.column("gid").to_numpy()
        for (x, y), sig in found.items():
            links.append((int(sub_gids[x]), int(sub_gids[y]), sig))
    if links:
        la_, lb_ = np.array([x for x, _, _ in links], np.int64), np.array([y for _, y, _ in links], np.int64)
        keys = t.column("key")
        write_parquet(storage.join(plan.links, f"{pps[0]:05d}.parquet"), pa.table({
            "a": la_, "b": lb_, "key_a": keys.take(pa.array(np.searchsorted(gids, la_))),
            "key_b": keys.take(pa.array(np.searchsorted(gids, lb_))),
            "signals": [json.dumps(sig) for _, _, sig in links],  # in order: evidence joins the values
        }, schema=LINK_SCHEMA))  # fmt: skip
        sub = t.take(pa.array(np.flatnonzero(np.isin(gids, np.r_[la_, lb_]))))
        write_parquet(storage.join(plan.work, "ranks", f"{pps[0]:05d}.parquet"), _rank_table(sub, cfg))
    return {"batch": pps[0], "n": len(links), "links": links_per_signal({(x, y): s for x, y, s in links}),
            "vetoed": vetoed}  # fmt: skip


def _rank_table(sub: pa.Table, cfg: DedupConfig) -> pa.Table:
    """What ranking a clip within its group needs (``keep_rank``'s inputs), one row per clip."""

    def floats(name: str) -> pa.Array:
        return pc.fill_null(sub.column(name).cast(pa.float64()), float("nan"))

    return pa.table({
        "gid": sub.column("gid"), "key": sub.column("key"), "quality": floats("quality"),
        "duration": pa.array(_sub_durations(sub, cfg), pa.float64()), "pixels": floats("pixels"),
        "input_index": sub.column("input_index").cast(pa.int64()), "clip_index": sub.column("clip_index").cast(pa.int64()),
        "partition": sub.column("partition").cast(pa.int64()),
    })  # fmt: skip


def _components(plan: Plan, _: object) -> dict[str, int]:
    """Connected components of the linked clips (16 bytes per link, one task): each clip's group
    partition (by its component's first clip), so a component's links meet in one grouping task."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = _pairs_of(read_folder(plan.links, ["a", "b"]))
    gids, inv = np.unique(pairs, return_inverse=True)
    inv = inv.reshape(-1, 2)
    n = len(gids)
    graph = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    _, first = np.unique(label, return_index=True)  # gids are sorted: a component's first clip
    parts = max(1, math.ceil(n / plan.cfg.rows_per_task))
    part = _partition_of(gids[first][label], parts)
    write_parquet(storage.join(plan.work, "labels.parquet"), pa.table({"gid": gids, "part": part}))
    return {"clips": n, "components": int(n_comp), "parts": parts}


def _scatter_links(plan: Plan, batch: int) -> int:
    """One verification batch's links and rank rows to the group partitions of their components."""
    labels = read_parquet(storage.join(plan.work, "labels.parquet"))
    lg, lp = labels.column("gid").to_numpy(), labels.column("part").to_numpy()
    links = read_parquet(storage.join(plan.links, f"{batch:05d}.parquet"))
    part = lp[np.searchsorted(lg, links.column("a").to_numpy())]
    _scatter(links, part, storage.join(plan.work, "groups"), f"l-{batch:05d}")
    ranks = read_parquet(storage.join(plan.work, "ranks", f"{batch:05d}.parquet"))
    _scatter(ranks, lp[np.searchsorted(lg, ranks.column("gid").to_numpy())], storage.join(plan.work, "groups"),
             f"r-{batch:05d}")  # fmt: skip
    return links.num_rows


def _group_part(plan: Plan, part: int) -> dict[str, Any]:
    """Groups around representatives over whole components; decisions to their input partitions."""
    cfg = plan.cfg
    folder = storage.join(plan.work, "groups", f"{part:05d}")
    links, ranks = read_folder(folder, prefix="l-"), read_folder(folder, prefix="r-")
    if links is None or ranks is None:
        return {}
    ranks, gids = _by_gid(ranks)  # a clip linked in two batches: once
    keys = ranks.column("key").to_pylist()
    fixed = plan.fixed(gids)
    col = {c: ranks.column(c).to_numpy() for c in RANK_COLUMNS if c != "key"}
    rank = keep_rank(cfg, col["quality"], col["duration"], col["pixels"], col["input_index"], col["clip_index"], keys, fixed)
    ia, ib = np.searchsorted(gids, links.column("a").to_numpy()), np.searchsorted(gids, links.column("b").to_numpy())
    local = {(int(x), int(y)): json.loads(s) for x, y, s in zip(ia.tolist(), ib.tolist(), links.column("signals").to_pylist(), strict=True)}
    decisions = group_links(keys, local, rank, cfg, fixed if fixed.any() else None)
    counts = _summary(decisions.filter(pa.array(~fixed)), 0, 0)
    write = grouped_rows(decisions) & ~fixed
    out = decisions.append_column("gid", pa.array(gids)).append_column("partition", pa.array(col["partition"]))
    out = out.filter(pa.array(write))
    _scatter(out, col["partition"][write] % plan.write_parts, storage.join(plan.work, "decisions"), f"{part:05d}")
    return {k: counts[k] for k in ("duplicates", "groups", "duplicates_per_signal")}


def _write_partitions(plan: Plan, share: int) -> int:
    """The decisions files of the input partitions ``p`` with ``p % write_parts == share``, rows in
    clip order (as the single-machine path writes them)."""
    t = read_folder(storage.join(plan.work, "decisions", f"{share:05d}"))
    if t is None:
        return 0
    t = t.take(pa.array(np.lexsort((t.column("gid").to_numpy(), t.column("partition").to_numpy()))))
    partition = t.column("partition").to_numpy()
    bounds = np.flatnonzero(np.r_[True, partition[1:] != partition[:-1], True])
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        _write_decisions(plan.decisions, (int(partition[s]), t.slice(s, e - s).select(DECISION_SCHEMA.names)))
    return t.num_rows


def _sub_durations(sub: pa.Table, cfg: DedupConfig) -> np.ndarray:
    """Durations as the single-machine path computes them (rows without one: from their unit times)."""
    from stages.dedup import _durations

    sets = []
    for name, (codes_col, times_col, per_unit, step, _) in PERCEPTUAL.items():
        if getattr(cfg, name):
            radius = cfg.frame_radius if name == "frames" else cfg.audio_radius
            sets.append(code_set(name, sub.column(codes_col), sub.column(times_col), per_unit, step, radius))
    return _durations(sub, sets)


def _common_mask(sub: pa.Table, name: str, cfg: DedupConfig) -> np.ndarray:
    """The corpus-wide common units of the sub-table's clips, as a mask over its code set's units."""
    codes_col, times_col, per_unit, step, _ = PERCEPTUAL[name]
    radius = cfg.frame_radius if name == "frames" else cfg.audio_radius
    cs = code_set(name, sub.column(codes_col), sub.column(times_col), per_unit, step, radius)
    mask = np.zeros(cs.n_units, bool)
    first_unit = np.searchsorted(cs.unit_owner, np.arange(sub.num_rows))
    counts = np.bincount(cs.unit_owner, minlength=sub.num_rows)
    for r, units in enumerate(sub.column(f"_common_{name}").to_pylist()):
        for u in units or []:
            if u < counts[r]:
                mask[first_unit[r] + u] = True
    return mask


_TASKS: dict[str, Callable[[Plan, Any], Any]] = {
    "exact": _exact_reduce, "bucket": _bucket_reduce, "train": _train, "clips": _clip_reduce,
    "assign": _assign, "cells": _cell_reduce,
}  # fmt: skip

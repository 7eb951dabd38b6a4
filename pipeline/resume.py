"""The driver's side of the output: commit partitions, resume from markers, stream the final files.

* ``Committer`` takes the writers' manifests (``pipeline.writer``) and writes a completion marker
  ``_markers/{partition:06d}.json`` once every video of a partition is written: its shard, rejects
  and errors files and its counts. It keeps state only for partitions in flight.
* ``committed_partitions`` / ``remove_uncommitted``: a rerun lists markers (not keys), skips their
  partitions and deletes every file under ``shards/`` and ``_parts/`` that no marker names (left by
  an interrupted run or a killed writer attempt), so no key is ever published twice.
* ``plan_retry``: ``--retry-errors`` reads the errors parts of committed partitions that recorded
  transient failures (``pipeline.layout.TRANSIENT_ERRORS``) and retries exactly those inputs; the
  new marker of the partition adds the new files and lists the retried error rows as superseded.
* ``finalize``: index.parquet, rejects.parquet and errors.parquet streamed file by file
  (``ParquetWriter``; memory bounded by one file), and the totals for stats.json from the markers.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.writer import SHARD_FIELD, OutputTarget
from schemas.records import Clip, ErrorRecord, arrow_schema, index_schema

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- markers


def _marker_uris(target: OutputTarget) -> list[str]:
    return storage.listdir(target.path(layout.MARKERS), ".json")


def committed_partitions(target: OutputTarget) -> set[int]:
    """Partitions with a completion marker (a listing: no marker is read)."""
    return {int(u.rsplit("/", 1)[-1].split(".")[0]) for u in _marker_uris(target)}


def read_marker(target: OutputTarget, partition: int) -> dict[str, Any]:
    return json.loads(storage.read_bytes(target.path(layout.MARKERS, layout.marker_name(partition))))


def iter_markers(target: OutputTarget, threads: int = 16) -> Iterator[dict[str, Any]]:
    """Every marker, in partition order, read a window at a time (threads for object stores)."""
    parts = sorted(committed_partitions(target))
    window = 256
    with ThreadPoolExecutor(max_workers=threads if target.remote else 1) as pool:
        for i in range(0, len(parts), window):
            yield from pool.map(lambda p: read_marker(target, p), parts[i : i + window])


def write_marker(target: OutputTarget, marker: dict[str, Any]) -> None:
    data = json.dumps(marker, sort_keys=True).encode("utf-8")
    storage.write_bytes(target.path(layout.MARKERS, layout.marker_name(marker["partition"])), data)


def remove_uncommitted(target: OutputTarget) -> int:
    """Delete files under shards/, _parts/ and signals/ that no marker names, and the writers' temp folder."""
    named: set[str] = set()
    for m in iter_markers(target):
        for s in m["shards"]:
            named.add(s["name"] + layout.TAR)
            named.add(s["name"] + layout.SIDECAR)
        named.update(m["rejects"])
        named.update(m["errors"])
        named.update(m.get("signals", []))
    removed = 0
    for sub in (layout.SHARDS, layout.PARTS, layout.SIGNALS):
        for uri in storage.listdir(target.path(sub)):
            name = uri.rsplit("/", 1)[-1]
            if name not in named:
                log.warning("removing %s: not committed (left by an interrupted run or a retried writer)", uri)
                storage.remove(uri)
                removed += 1
        if not target.remote:  # hidden temp files of the old layout
            for tmp in Path(target.path(sub)).glob(".*"):
                tmp.unlink(missing_ok=True)
    if not target.remote:
        shutil.rmtree(Path(target.uri) / layout.TMP, ignore_errors=True)
    return removed


@dataclass(frozen=True)
class AgainstPartition:
    """One committed partition of an earlier output, for a global phase's ``decide``: its signal
    files and its rejects parts (to tell the clips it shipped or filtered later from its duplicates)."""

    partition: int
    signals: list[str]
    rejects: list[str]


def committed_dataset(uri: str) -> Iterator[AgainstPartition]:
    """The committed partitions of the output at ``uri`` that carry signals (read from its markers)."""
    target = OutputTarget(uri)
    for m in iter_markers(target):
        if m.get("signals"):
            yield AgainstPartition(
                int(m["partition"]),
                [target.path(layout.SIGNALS, n) for n in m["signals"]],
                [target.path(layout.PARTS, n) for n in m["rejects"]],
            )


# ---------------------------------------------------------------------- retry of transient errors


@dataclass
class RetryPlan:
    """Inputs to retry per partition; of videos with clip-level errors, only those keys."""

    videos: dict[int, set[str]] = field(default_factory=dict)
    only_keys: dict[str, list[str]] = field(default_factory=dict)
    superseded: dict[int, list[list[Any]]] = field(default_factory=dict)  # [video_id, key, stage/type]

    @property
    def inputs(self) -> int:
        return sum(len(v) for v in self.videos.values())


def _read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One small parquet file. ``ParquetFile`` rather than ``pq.read_table``: the dataset path of
    the latter keeps ~15 KB per call (60 MB over 4 000 parts), which would make the merge's memory
    grow with the number of partitions."""
    source: Any = pa.BufferReader(storage.read_bytes(uri)) if storage.is_remote(uri) else uri
    return pq.ParquetFile(source).read(columns=columns, use_threads=False)


def plan_retry(target: OutputTarget) -> RetryPlan:
    plan = RetryPlan()
    for m in iter_markers(target):
        if not m.get("transient"):
            continue
        p = m["partition"]
        for name in m["errors"]:
            t = _read_parquet(target.path(layout.PARTS, name))
            gone = {(v, k, s) for v, k, s, _ in m.get("superseded", [])}
            for r in t.to_pylist():  # one small errors part at a time
                if not layout.is_transient(r["error_type"]) or (r["video_id"], r["key"], r["error_stage"]) in gone:
                    continue
                plan.videos.setdefault(p, set()).add(r["video_id"])
                plan.superseded.setdefault(p, []).append(
                    [r["video_id"], r["key"], r["error_stage"], f"{r['error_stage']}/{r['error_type']}"]
                )
                if r["key"] is not None:
                    plan.only_keys.setdefault(r["video_id"], []).append(r["key"])
    # a video-level failure (no clips written) is retried whole
    for p, entries in plan.superseded.items():
        for vid, key, _, _ in entries:
            if key is None:
                plan.only_keys.pop(vid, None)
    return plan


# ---------------------------------------------------------------------- commit


@dataclass
class _Open:
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    drop_reasons: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    transient: int = 0
    video_errors: int = 0
    video_seconds: float = 0.0
    videos: dict[str, int] = field(default_factory=dict)  # rows seen of videos not yet complete
    done: int = 0
    writers: set[tuple[int, str]] = field(default_factory=set)


def _add_counts(a: dict[str, Any], b: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    out = Counter(a)
    for k, v in b.items():
        out[k] += sign * v
    return {k: v for k, v in out.items() if v}


class Committer:
    """Gathers manifests on the driver; writes a partition's marker when all its videos are in."""

    def __init__(
        self,
        target: OutputTarget,
        expected: dict[int, int],
        staging: storage.StagingArea | None = None,
        retry: RetryPlan | None = None,
        expected_rows: dict[str, int] | None = None,
    ) -> None:
        self.target = target
        self.expected = dict(expected)  # partition -> videos to write in this run
        self.staging = staging
        self.retry = retry
        self.expected_rows = expected_rows or {}  # retries: rows to expect of a video
        self.open: dict[int, _Open] = {}
        self.committed = 0
        self.done_parts: set[int] = set()
        # this run's totals (for stats.json and the summary)
        self.counts: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.stage_rows: Counter[str] = Counter()
        self.video_seconds = 0.0
        self.writers: set[tuple[int, str]] = set()
        self.shards = 0
        self._last_log = time.monotonic()

    def add(self, manifest: dict[str, Any]) -> None:
        p = int(manifest["partition"])
        st = self.open.setdefault(p, _Open())
        st.shards += manifest["shards"]
        st.rejects += manifest["rejects"]
        st.errors += manifest["errors"]
        st.counts.update(manifest["counts"])
        st.drop_reasons.update(manifest["drop_reasons"])
        st.error_types.update(manifest["error_types"])
        st.transient += manifest["transient"]
        st.video_errors += manifest.get("video_errors", 0)
        writer = (int(manifest["writer"]["pid"]), str(manifest["writer"]["node"]))
        st.writers.add(writer)
        self.writers.add(writer)
        self.counts.update(manifest["counts"])
        for stage, (seconds, rows) in manifest["stage_seconds"].items():
            self.stage_seconds[stage] += seconds
            self.stage_rows[stage] += int(rows)
        for vid, rows, clip_count, seconds, local_path, whole in manifest["videos"]:
            seen = st.videos.get(vid, 0) + rows
            if seen == rows:  # first rows of this video
                st.video_seconds += seconds
                self.video_seconds += seconds
            want = self.expected_rows.get(vid, clip_count)
            if whole or (want is not None and seen >= want):
                st.videos.pop(vid, None)
                st.done += 1
                self._cleanup_video(vid, local_path)
            else:
                st.videos[vid] = seen
        if st.done >= self.expected.get(p, 0):
            self._commit(p)
        self.shards += len(manifest["shards"])
        if time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            log.info(
                "progress: %d clips kept, %d rejected, %d errors, %d shards, %d partitions committed",
                self.counts["keep"], self.counts["reject"], self.counts["error"], self.shards, self.committed,
            )  # fmt: skip

    def add_signals(self, partition: int, name: str) -> None:
        """A global phase's signal file of ``partition`` (named in its marker when it commits)."""
        self.open.setdefault(partition, _Open()).signals.append(name)

    def _cleanup_video(self, video_id: str, local_path: str | None) -> None:
        """Staged media of a finished video: its clips folder and its download."""
        if self.staging is None or self.target.write.keep_staging:
            return
        storage.remove_tree(self.staging.uri_of(f"clips/{video_id}"))
        if local_path and local_path.startswith(self.staging.uri_of("videos")):
            storage.remove(local_path)
            if not self.staging.remote:
                (self.staging.root / "videos" / f"{video_id}.done").unlink(missing_ok=True)

    def _commit(self, p: int) -> None:
        st = self.open.pop(p, None) or _Open()
        marker: dict[str, Any] = {
            "partition": p,
            "shards": st.shards,
            "rejects": st.rejects,
            "errors": st.errors,
            "signals": st.signals,
            "counts": dict(st.counts),
            "drop_reasons": dict(st.drop_reasons),
            "error_types": dict(st.error_types),
            "transient": st.transient,
            "video_errors": st.video_errors,
            "video_seconds": round(st.video_seconds, 3),
            "superseded": [],
            "writers": sorted([pid, node] for pid, node in st.writers),
        }
        if self.retry is not None and p in self.retry.videos:
            marker = self._merge(p, marker, self.retry.superseded.get(p, []))
        elif p in self.done_parts:  # late rows of a partition committed already: never drop its files
            log.warning("partition %d got rows after its commit; adding them to its marker", p)
            marker = self._merge(p, marker, [])
        write_marker(self.target, marker)
        self.expected.pop(p, None)
        self.done_parts.add(p)
        self.committed += 1

    def _merge(self, p: int, new: dict[str, Any], gone: list[list[Any]]) -> dict[str, Any]:
        """The marker of a partition committed before: the earlier files and counts plus the new
        ones, less the error rows now retried (listed as superseded, left out of errors.parquet)."""
        old = read_marker(self.target, p)
        errors_gone = Counter(kind for _, _, _, kind in gone)
        video_gone = sum(1 for _, key, _, _ in gone if key is None)
        return {
            "partition": p,
            "shards": old["shards"] + new["shards"],
            "rejects": old["rejects"] + new["rejects"],
            "errors": old["errors"] + new["errors"],
            "signals": old.get("signals", []) + new["signals"],
            "counts": _add_counts(_add_counts(old["counts"], new["counts"]), {"error": len(gone)}, -1),
            "drop_reasons": _add_counts(old["drop_reasons"], new["drop_reasons"]),
            "error_types": _add_counts(_add_counts(old["error_types"], new["error_types"]), errors_gone, -1),
            "transient": old["transient"] - len(gone) + new["transient"],
            "video_errors": old.get("video_errors", 0) - video_gone + new["video_errors"],
            "video_seconds": old.get("video_seconds", 0.0),
            "superseded": old.get("superseded", []) + [e[:3] for e in gone],
            "writers": old.get("writers", []) + new["writers"],
        }

    def finish(self) -> None:
        """End of a completed stream: every partition of this run is written (some videos make no
        rows at all, e.g. no clip long enough), so commit whatever is still open."""
        for p in sorted(set(self.expected) | set(self.open)):
            self._commit(p)


# ---------------------------------------------------------------------- final files


def _sorted(table: pa.Table, by: str) -> pa.Table:
    if table.num_rows < 2:
        return table
    return table.take(pc.sort_indices(table, sort_keys=[(by, "ascending")]))


class _RowGroups:
    """A ParquetWriter fed many small tables: they are gathered into row groups of up to
    ``rows`` rows or ``nbytes`` bytes (bounded memory, and a footer that does not grow with every
    tiny sidecar or part)."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int = 100_000, nbytes: int = 64 * 2**20) -> None:
        self.writer = pq.ParquetWriter(path, schema)
        self.schema = schema
        self.rows, self.nbytes = rows, nbytes
        self.pending: list[pa.Table] = []
        self.pending_rows = self.pending_bytes = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.pending_bytes += table.nbytes
        # many tiny tables cost far more than their bytes (~14 KB each): flush every 256 too
        if self.pending_rows >= self.rows or self.pending_bytes >= self.nbytes or len(self.pending) >= 256:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def final_error_schema() -> pa.Schema:
    return arrow_schema(ErrorRecord).append(pa.field("transient", pa.bool_()))


def finalize(target: OutputTarget, local_root: Path) -> dict[str, Any]:
    """Stream index.parquet, rejects.parquet and errors.parquet into ``local_root`` from the
    committed files, one file in memory at a time; return totals summed over the markers."""
    ischema = index_schema(Clip, (SHARD_FIELD,))
    rschema = index_schema(Clip)
    eschema = final_error_schema()
    tmp = {n: local_root / f".{n}.tmp" for n in (layout.INDEX, layout.REJECTS, layout.ERRORS)}
    totals: dict[str, Any] = {"counts": Counter(), "drop_reasons": Counter(), "error_types": Counter(),
                              "transient": 0, "video_errors": 0, "partitions": 0, "shards": 0}  # fmt: skip
    iw = _RowGroups(tmp[layout.INDEX], ischema)
    rw = _RowGroups(tmp[layout.REJECTS], rschema)
    ew = _RowGroups(tmp[layout.ERRORS], eschema)
    try:
        for m in iter_markers(target):
            totals["partitions"] += 1
            totals["counts"].update(m["counts"])
            totals["drop_reasons"].update(m["drop_reasons"])
            totals["error_types"].update(m["error_types"])
            totals["transient"] += m["transient"]
            totals["video_errors"] += m.get("video_errors", 0)
            for s in sorted(m["shards"], key=lambda s: s["name"]):
                totals["shards"] += 1
                t = _read_parquet(target.path(layout.SHARDS, s["name"] + layout.SIDECAR))
                iw.write(_sorted(t.select(ischema.names).cast(ischema), "key"))
            for name in sorted(m["rejects"]):
                t = _read_parquet(target.path(layout.PARTS, name))
                rw.write(_sorted(t.select(rschema.names).cast(rschema), "key"))
            gone = {(v, k, s) for v, k, s in (e[:3] for e in m.get("superseded", []))}
            for name in sorted(m["errors"]):
                t = _read_parquet(target.path(layout.PARTS, name))
                if "transient" not in t.column_names:
                    t = t.append_column("transient", pa.array([layout.is_transient(x) for x in t.column("error_type").to_pylist()]))
                if gone:
                    keep = [(v, k, s) not in gone for v, k, s in zip(*(t.column(c).to_pylist() for c in ("video_id", "key", "error_stage")), strict=True)]  # fmt: skip
                    t = t.filter(pa.array(keep))
                ew.write(t.select(eschema.names).cast(eschema))
    finally:
        for w in (iw, rw, ew):
            w.close()
    for name, path in tmp.items():
        path.replace(local_root / name)
    return totals

"""The writer: finished rows -> shards, sidecars, rejects and errors parts, on the worker that holds them.

``ShardWriter.write(rows)`` runs where the rows are (the last Ray Data task of a run, or in-process
for the sequential backend). It groups the rows by input partition, writes each group's kept clips
into WebDataset tars (media bytes read from staging once, straight into the tar), a sidecar index
per tar, and a rejects and an errors part, each under a name derived from its partition and the
keys it holds (``pipeline.layout``). Every file is written to a temporary name and then moved or
uploaded as a whole, tar before sidecar, so a reader (or a resume) never sees half a shard. It
returns one small manifest per partition group: file names, counts per outcome, per-video row
counts and the writer's pid and node. The driver (``pipeline.resume.Committer``) gathers these
and commits a partition when all of its videos are written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tarfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.config import WriteConfig
from pipeline.sanitize import sanitize_record
from pipeline.stage import Row
from schemas.records import Clip, ErrorRecord, arrow_schema, index_fields, shard_json, to_table

log = logging.getLogger(__name__)

SHARD_FIELD = (layout.SHARD_COLUMN, pa.string())
_ERR_EXTRA = (("clip_count", pa.int64()), ("input_index", pa.int64()), ("transient", pa.bool_()))


def error_part_schema() -> pa.Schema:
    schema = arrow_schema(ErrorRecord)
    for name, tp in _ERR_EXTRA:
        schema = schema.append(pa.field(name, tp))
    return schema


def classify(row: Row) -> str:
    if row.get("error_stage"):
        return "error"
    if row.get("drop_reason"):
        return "reject"
    return "keep"


def _node_id() -> str:
    """The Ray node this process runs on, or the host name outside Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return str(ray.get_runtime_context().get_node_id())
        except Exception:  # noqa: BLE001 - informational only
            pass
    return socket.gethostname()


@dataclass(frozen=True)
class OutputTarget:
    """Where and how to write (picklable: it travels to the workers)."""

    uri: str  # the output folder: an absolute local path or an object-store URL
    write: WriteConfig = field(default_factory=WriteConfig)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.uri)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)


class ShardWriter:
    """Writes rows of finished clips into the output, one partition group at a time."""

    def __init__(self, target: OutputTarget, only_keys: Mapping[str, list[str]] | None = None) -> None:
        self.target = target
        self.cfg = target.write
        # --retry-errors: of these videos, write only these keys (the others were written before)
        self.only_keys = {v: set(ks) for v, ks in (only_keys or {}).items()}

    # ------------------------------------------------------------------ entry point

    def write(self, rows: list[Row]) -> list[dict[str, Any]]:
        groups: dict[int, list[Row]] = defaultdict(list)
        for row in rows:
            groups[layout.partition_of(row.get("input_index") or 0, self.cfg.inputs_per_partition)].append(row)
        return [self._write_group(p, groups[p]) for p in sorted(groups)]

    # ------------------------------------------------------------------ one partition group

    def wanted(self, row: Row) -> bool:
        """Whether this run writes ``row``: of a video retried for clip-level errors, only those clips."""
        keys = self.only_keys.get(row["video_id"])
        return keys is None or row.get("key") is None or row["key"] in keys

    def _write_group(self, partition: int, rows: list[Row]) -> dict[str, Any]:
        # the one place rows are made safe for strict JSON and parquet (finite numbers, valid UTF-8)
        rows = [sanitize_record(r) for r in rows if self.wanted(r)]
        kept = sorted((r for r in rows if classify(r) == "keep"), key=lambda r: r["key"])
        rejects = sorted((r for r in rows if classify(r) == "reject"), key=lambda r: r.get("key") or r["video_id"])
        errors = sorted((r for r in rows if classify(r) == "error"), key=lambda r: (r.get("key") or "", r["video_id"]))
        manifest: dict[str, Any] = {
            "partition": partition,
            "shards": self._write_shards(partition, kept),
            "rejects": [self._write_rejects(partition, rejects)] if rejects else [],
            "errors": [self._write_errors(partition, errors)] if errors else [],
            "counts": dict(Counter(classify(r) for r in rows)),
            "drop_reasons": dict(Counter(str(r["drop_reason"]) for r in rejects)),
            "error_types": dict(Counter(f"{r['error_stage']}/{r.get('error_type') or 'error'}" for r in errors)),
            "transient": sum(1 for r in errors if layout.is_transient(r.get("error_type"))),
            "video_errors": len({r["video_id"] for r in errors if r.get("key") is None}),
            "videos": self._videos(rows),
            "stage_seconds": self._stage_seconds(rows),
            "writer": {"pid": os.getpid(), "node": _node_id()},
        }
        return manifest

    @staticmethod
    def _videos(rows: list[Row]) -> list[list[Any]]:
        """[video_id, rows written, clip_count, video seconds, local_path, video-level outcome]."""
        out: dict[str, list[Any]] = {}
        for r in rows:
            v = out.setdefault(r["video_id"], [r["video_id"], 0, None, float(r.get("video_duration") or 0.0),
                                               r.get("local_path"), False])  # fmt: skip
            v[1] += 1
            if r.get("clip_count"):
                v[2] = int(r["clip_count"])
            if r.get("key") is None:
                v[5] = True
        return [out[v] for v in sorted(out)]

    @staticmethod
    def _stage_seconds(rows: list[Row]) -> dict[str, list[float]]:
        acc: dict[str, list[float]] = {}
        for r in rows:
            for t in r.get("timings") or []:
                a = acc.setdefault(t["stage"], [0.0, 0])
                a[0] += float(t["seconds"])
                a[1] += 1
        return acc

    # ------------------------------------------------------------------ files

    def _tmp(self, suffix: str) -> Path:
        base = Path(self.target.uri) / layout.TMP if not self.target.remote else storage.SCRATCH / "writer"
        base.mkdir(parents=True, exist_ok=True)
        return base / f"{uuid.uuid4().hex}{suffix}"

    def _publish(self, tmp: Path, *rel: str) -> None:
        """Move (local) or upload (object store) a finished file to its final name."""
        storage.put_file(tmp, self.target.path(*rel))
        tmp.unlink(missing_ok=True)

    def write_parquet(self, table: pa.Table, *rel: str) -> None:
        self.write_parquet_to(table, self.target.path(*rel))

    def write_parquet_to(self, table: pa.Table, uri: str) -> None:
        """A parquet file written whole to a temporary name, then moved or uploaded to ``uri``."""
        tmp = self._tmp(".parquet")
        pq.write_table(table, tmp)
        storage.put_file(tmp, uri)
        tmp.unlink(missing_ok=True)

    def _members(self, row: Row) -> list[tuple[str, bytes]]:
        key = row["key"]
        out: list[tuple[str, bytes]] = []
        if row.get("audio_uri"):
            out.append((f"{key}.flac", storage.read_bytes(row["audio_uri"])))
        for i, uri in enumerate(row.get("frame_uris") or []):
            out.append((f"{key}.{i}.jpg", storage.read_bytes(uri)))
        if row.get("clip_uri"):
            out.append((f"{key}.mp4", storage.read_bytes(row["clip_uri"])))
        doc = shard_json(row)
        out.append((f"{key}.json", json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")))
        out.append((f"{key}.txt", (row.get("caption") or "").encode("utf-8")))
        return out

    def _write_shards(self, partition: int, kept: list[Row]) -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        limit = self.cfg.max_shard_mb * 1024 * 1024
        tmp: Path | None = None
        tar: tarfile.TarFile | None = None
        rows: list[Row] = []
        size = 0

        def close() -> None:
            nonlocal tmp, tar, rows, size
            if tar is None or tmp is None:
                return
            tar.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            stem = layout.shard_stem(partition, (r["key"] for r in rows))
            nbytes = tmp.stat().st_size
            self._publish(tmp, layout.SHARDS, stem + layout.TAR)  # the tar first: a sidecar means a whole tar
            table = to_table(rows).select(list(index_fields(Clip)))
            table = table.append_column(pa.field(*SHARD_FIELD), pa.array([stem + layout.TAR] * len(rows), pa.string()))
            self.write_parquet(table, layout.SHARDS, stem + layout.SIDECAR)
            log.info("wrote shard %s.tar (%d samples, %.1f MiB)", stem, len(rows), nbytes / 2**20)
            written.append({"name": stem, "rows": len(rows), "bytes": nbytes})
            tmp, tar, rows, size = None, None, [], 0

        for row in kept:
            members = self._members(row)
            nbytes = sum(len(data) + 1024 for _, data in members)
            if rows and (len(rows) >= self.cfg.max_samples_per_shard or size + nbytes > limit):
                close()
            if tar is None:
                tmp = self._tmp(".tar")
                tar = tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            rows.append(row)
            size += nbytes
        close()
        return written

    def _write_rejects(self, partition: int, rows: list[Row]) -> str:
        name = layout.part_name("rejects", partition, (r.get("key") or r["video_id"] for r in rows))
        self.write_parquet(to_table(rows).select(list(index_fields(Clip))), layout.PARTS, name)
        return name

    def _write_errors(self, partition: int, rows: list[Row]) -> str:
        recs = [
            {
                "source_url": r.get("source_url") or "",
                "video_id": r["video_id"],
                "key": r.get("key"),
                "error_stage": r["error_stage"],
                "error_type": r.get("error_type") or "error",
                "error": r.get("error") or "",
                "clip_count": r.get("clip_count"),
                "input_index": r.get("input_index"),
                "transient": layout.is_transient(r.get("error_type")),
            }
            for r in rows
        ]
        name = layout.part_name("errors", partition, (f"{r['video_id']}/{r.get('key')}/{r['error_stage']}" for r in rows))
        self.write_parquet(pa.Table.from_pylist(recs, schema=error_part_schema()), layout.PARTS, name)
        return name


class PhaseWriter:
    """The end of the streaming stages before a global phase (dedup), on the worker.

    Rows that failed or were dropped are finished: the ``ShardWriter`` writes them as usual. The
    others wait for the phase's decision: per input partition, they are written to staging
    (``phase{n}/``, read back by ``pipeline.blocks.StagedBlock``) and the phase's signals of them
    (``Stage.phase_signals`` plus a ``partition`` column) to the output's ``signals/``. Both names
    derive from the partition, the phase and the keys, so a retried task rewrites its own files.
    Manifests of staged rows carry ``staged`` (the file), ``signals`` (its name) and ``rows``.
    """

    def __init__(
        self, shards: ShardWriter, staging_uri: str, phase: int, stage: Any
    ) -> None:  # stage: pipeline.stage.Stage (a global phase)
        self.shards = shards
        self.staging_uri = staging_uri
        self.phase = phase
        self.stage = stage

    @property
    def target(self) -> OutputTarget:
        return self.shards.target

    def write(self, rows: list[Row]) -> list[dict[str, Any]]:
        rows = [r for r in rows if self.shards.wanted(r)]
        done = [r for r in rows if classify(r) != "keep"]
        manifests = self.shards.write(done) if done else []
        groups: dict[int, list[Row]] = defaultdict(list)
        for row in rows:
            if classify(row) == "keep":
                groups[layout.partition_of(row.get("input_index") or 0, self.target.write.inputs_per_partition)].append(row)
        for p in sorted(groups):
            part = sorted(groups[p], key=lambda r: r["key"])
            name = layout.phase_file_name(p, self.phase, (r["key"] for r in part))
            staged = storage.join(self.staging_uri, f"phase{self.phase}", name)
            self.shards.write_parquet_to(to_table(part), staged)
            signals = self.stage.phase_signals(part)
            signals = signals.append_column("partition", pa.array([p] * signals.num_rows, pa.int64()))
            self.shards.write_parquet(signals, layout.SIGNALS, name)
            manifests.append({"partition": p, "staged": staged, "signals": name, "rows": len(part)})
        return manifests

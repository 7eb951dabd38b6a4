"""The sink: WebDataset shards, parquet index, rejects, errors, and resume bookkeeping.

Layout under the output folder::

    shards/{n:06d}.tar       samples of kept clips (written to a hidden temp file, then renamed)
    shards/{n:06d}.parquet   sidecar index of that shard (written after its tar: a tar without
                             a sidecar is an interrupted write and is removed on resume)
    _parts/rejects-{n:06d}.parquet, _parts/errors-{n:06d}.parquet
                             rejects and errors, flushed atomically with each shard
    index.parquet, rejects.parquet, errors.parquet   merged at the end of a run

A video is done when it has a video-level error or all its ``clip_count`` clips are in shards,
rejects or errors; a rerun skips done videos and never writes a key twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import WriteConfig
from pipeline.stage import Row
from pipeline.storage import StagingArea
from schemas.records import Clip, ErrorRecord, arrow_schema, index_fields, index_schema, shard_json, to_table

log = logging.getLogger(__name__)

SHARD_FIELD = ("shard", pa.string())
_ERR_EXTRA = ("clip_count", pa.int64())


class OutputStore:
    """The output folder: a local folder, or a local mirror of an object-store prefix.

    Everything is written locally first (atomically) and then ``publish``-ed: a no-op for a local
    output, an upload of the finished file for a remote one (an object appears only once its
    upload completes, so readers never see half a shard). ``pull`` brings the small bookkeeping
    files of earlier runs (sidecars, parts) into the mirror for resume.
    """

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.remote = storage.is_remote(self.uri)
        if self.remote:
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
            self.root = storage.SCRATCH / f"output-{digest}"
            shutil.rmtree(self.root, ignore_errors=True)  # a cache: the remote is the truth (see pull)
        else:
            self.root = Path(self.uri).resolve()
            self.uri = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(self, rel: str, keep_local: bool = True) -> None:
        if not self.remote:
            return
        storage.put_file(self.root / rel, storage.join(self.uri, *rel.split("/")))
        if not keep_local:
            (self.root / rel).unlink(missing_ok=True)

    def pull(self) -> None:
        """Fetch sidecars and parts of earlier runs; delete remote tars that have no sidecar."""
        if not self.remote:
            return
        for sub in ("shards", "_parts"):
            remote = storage.join(self.uri, sub)
            for uri in storage.listdir(remote, ".parquet"):
                local = self.root / sub / uri.rsplit("/", 1)[-1]
                if not local.exists():
                    storage.get_file(uri, local)
        sides = {u.rsplit("/", 1)[-1][: -len(".parquet")] for u in storage.listdir(storage.join(self.uri, "shards"), ".parquet")}
        for uri in storage.listdir(storage.join(self.uri, "shards"), ".tar"):
            if uri.rsplit("/", 1)[-1][: -len(".tar")] not in sides:
                log.warning("removing %s: written by an interrupted run (no sidecar index)", uri)
                storage.remove(uri)


def error_part_schema() -> pa.Schema:
    return arrow_schema(ErrorRecord).append(pa.field(*_ERR_EXTRA))


def classify(row: Row) -> str:
    if row.get("error_stage"):
        return "error"
    if row.get("drop_reason"):
        return "reject"
    return "keep"


@dataclass
class ResumeState:
    """What earlier runs into the same output folder already accounted for."""

    keys: set[str] = field(default_factory=set)
    per_video: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    clip_counts: dict[str, int] = field(default_factory=dict)
    failed_videos: set[str] = field(default_factory=set)
    next_shard: int = 0
    next_part: int = 0

    def account(self, video_id: str, key: str | None, clip_count: int | None) -> None:
        if key is None:
            self.failed_videos.add(video_id)
            return
        self.keys.add(key)
        self.per_video[video_id].add(key)
        if clip_count:
            self.clip_counts[video_id] = int(clip_count)

    def video_done(self, video_id: str) -> bool:
        if video_id in self.failed_videos:
            return True
        count = self.clip_counts.get(video_id)
        return count is not None and len(self.per_video.get(video_id, ())) >= count

    @classmethod
    def load(cls, store: OutputStore) -> ResumeState:
        state = cls()
        store.pull()
        out_dir = store.root
        shards = out_dir / "shards"
        parts = out_dir / "_parts"
        for tmp in list(shards.glob(".*.tmp")) + list(parts.glob(".*.tmp")):
            tmp.unlink()
        for tar in sorted(shards.glob("*.tar")):
            if not tar.with_suffix(".parquet").exists():
                log.warning("removing %s: written by an interrupted run (no sidecar index)", tar)
                tar.unlink()
        for side in sorted(shards.glob("*.parquet")):
            t = pq.read_table(side, columns=["key", "video_id", "clip_count"])
            for k, v, c in zip(*(t.column(n).to_pylist() for n in ("key", "video_id", "clip_count")), strict=True):
                state.account(v, k, c)
            state.next_shard = max(state.next_shard, int(side.stem) + 1)
        for part in sorted(parts.glob("*.parquet")):
            t = pq.read_table(part, columns=["key", "video_id", "clip_count"])
            for k, v, c in zip(*(t.column(n).to_pylist() for n in ("key", "video_id", "clip_count")), strict=True):
                state.account(v, k, c)
            state.next_part = max(state.next_part, int(part.stem.split("-")[1]) + 1)
        if state.keys or state.failed_videos:
            log.info(
                "resume: %d clips and %d failed videos already accounted for",
                len(state.keys), len(state.failed_videos),
            )  # fmt: skip
        return state


def _atomic_write_parquet(table: pa.Table, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)


class Sink:
    """Consumes finished rows, writes shards and parts, and counts what it saw."""

    def __init__(self, store: OutputStore, cfg: WriteConfig, state: ResumeState, staging: StagingArea) -> None:
        self.store = store
        self.out = store.root
        self.cfg = cfg
        self.state = state
        self.staging = staging
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        (self.out / "_parts").mkdir(parents=True, exist_ok=True)
        self._shard_rows: list[Row] = []
        self._shard_bytes = 0
        self._tar: tarfile.TarFile | None = None
        self._tar_tmp: Path | None = None
        self._rejects: list[Row] = []
        self._errors: list[Row] = []
        self.counts: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.stage_rows: Counter[str] = Counter()
        self.video_seconds = 0.0
        self._seen_videos: set[str] = set()
        self._taken: set[str] = set()
        self._last_log = time.monotonic()

    # ------------------------------------------------------------------ intake

    def add(self, rows: list[Row]) -> None:
        for row in rows:
            key = row.get("key")
            if key is not None and (key in self.state.keys or key in self._taken):
                continue  # written by an earlier run, or already seen in this one
            if key is not None:
                self._taken.add(key)
            for t in row.get("timings") or []:
                self.stage_seconds[t["stage"]] += t["seconds"]
                self.stage_rows[t["stage"]] += 1
            vid = row["video_id"]
            if vid not in self._seen_videos:
                self._seen_videos.add(vid)
                self.video_seconds += float(row.get("video_duration") or 0.0)
            kind = classify(row)
            self.counts[kind] += 1
            if kind == "keep":
                self._add_sample(row)
            elif kind == "reject":
                self._rejects.append(row)
            else:
                self._errors.append(row)
        if time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            log.info(
                "progress: %d clips kept, %d rejected, %d errors, %d shards",
                self.counts["keep"], self.counts["reject"], self.counts["error"], self.state.next_shard,
            )  # fmt: skip

    def _add_sample(self, row: Row) -> None:
        members = self._members(row)
        size = sum(len(data) + 1024 for _, data in members)
        if self._shard_rows and (
            len(self._shard_rows) >= self.cfg.max_samples_per_shard
            or self._shard_bytes + size > self.cfg.max_shard_mb * 1024 * 1024
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._shard_rows.append(row)
        self._shard_bytes += size

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

    # ------------------------------------------------------------------ shards and parts

    def _shard_name(self) -> str:
        return f"{self.state.next_shard:06d}"

    def _open_shard(self) -> None:
        self._tar_tmp = self.out / "shards" / f".{self._shard_name()}.tar.tmp"
        self._tar = tarfile.open(self._tar_tmp, "w", format=tarfile.GNU_FORMAT)

    def _close_shard(self) -> None:
        if self._tar is None or self._tar_tmp is None:
            return
        self._tar.close()
        with open(self._tar_tmp, "rb") as f:
            os.fsync(f.fileno())
        name = self._shard_name()
        tar_path = self.out / "shards" / f"{name}.tar"
        os.replace(self._tar_tmp, tar_path)
        tar_mib = tar_path.stat().st_size / 2**20
        self.store.publish(f"shards/{name}.tar", keep_local=False)
        table = to_table(self._shard_rows)
        table = table.select(list(index_fields(Clip)))
        table = table.append_column(pa.field(*SHARD_FIELD), pa.array([f"{name}.tar"] * table.num_rows, pa.string()))
        _atomic_write_parquet(table, self.out / "shards" / f"{name}.parquet")
        self.store.publish(f"shards/{name}.parquet")
        log.info("wrote shard %s.tar (%d samples, %.1f MiB)", name, table.num_rows, tar_mib)
        rows = self._shard_rows
        self._shard_rows, self._shard_bytes, self._tar, self._tar_tmp = [], 0, None, None
        self.state.next_shard += 1
        for r in rows:
            self.state.account(r["video_id"], r["key"], r.get("clip_count"))
        self._flush_parts()
        self._cleanup(rows)

    def _flush_parts(self) -> None:
        if not self._rejects and not self._errors:
            return
        n = self.state.next_part
        if self._rejects:
            t = to_table(self._rejects).select(list(index_fields(Clip)))
            _atomic_write_parquet(t, self.out / "_parts" / f"rejects-{n:06d}.parquet")
            self.store.publish(f"_parts/rejects-{n:06d}.parquet")
        if self._errors:
            recs = [
                {
                    "source_url": r.get("source_url") or "",
                    "video_id": r["video_id"],
                    "key": r.get("key"),
                    "error_stage": r["error_stage"],
                    "error_type": r.get("error_type") or "error",
                    "error": r.get("error") or "",
                    "clip_count": r.get("clip_count"),
                }
                for r in self._errors
            ]
            _atomic_write_parquet(pa.Table.from_pylist(recs, schema=error_part_schema()),
                                  self.out / "_parts" / f"errors-{n:06d}.parquet")  # fmt: skip
            self.store.publish(f"_parts/errors-{n:06d}.parquet")
        done = self._rejects + self._errors
        self._rejects, self._errors = [], []
        self.state.next_part += 1
        for r in done:
            self.state.account(r["video_id"], r.get("key"), r.get("clip_count"))
        self._cleanup(done)

    def _cleanup(self, rows: list[Row]) -> None:
        """Delete staged media of written rows, and downloads of finished videos."""
        if self.cfg.keep_staging:
            return
        videos = set()
        for r in rows:
            for uri in [r.get("audio_uri"), r.get("clip_uri"), *(r.get("frame_uris") or [])]:
                if uri:
                    storage.remove(uri)
            videos.add((r["video_id"], r.get("local_path")))
        staged_videos = self.staging.uri_of("videos")
        for vid, local in videos:
            if local and self.state.video_done(vid) and local.startswith(staged_videos):
                storage.remove(local)
                (self.staging.root / "videos" / f"{vid}.done").unlink(missing_ok=True)
                if not self.staging.remote:
                    shutil.rmtree(self.staging.root / "clips" / vid, ignore_errors=True)

    def close(self) -> None:
        """Write the open shard and pending parts (end of input)."""
        self._close_shard()
        self._flush_parts()

    def abort(self) -> None:
        """Interrupted: keep finished rejects/errors, drop the half-written shard."""
        if self._tar is not None and self._tar_tmp is not None:
            self._tar.close()
            self._tar_tmp.unlink(missing_ok=True)
            self._tar, self._shard_rows = None, []
        self._flush_parts()


# ---------------------------------------------------------------------- final outputs


def _concat(paths: list[Path], schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(p).select(schema.names).cast(schema) for p in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _dedupe_sorted(table: pa.Table, by: list[str]) -> pa.Table:
    if table.num_rows == 0:
        return table
    rows = table.to_pylist()
    seen: dict[tuple[Any, ...], Row] = {}
    for r in rows:
        seen.setdefault(tuple(r.get(k) for k in by), r)
    ordered = sorted(seen.values(), key=lambda r: tuple("" if r.get(k) is None else str(r.get(k)) for k in by))
    return pa.Table.from_pylist(ordered, schema=table.schema)


def finalize_outputs(store: OutputStore) -> dict[str, int]:
    """Merge sidecars and parts into index.parquet, rejects.parquet and errors.parquet."""
    out_dir = store.root
    ischema = index_schema(Clip, (SHARD_FIELD,))
    index = _concat(sorted((out_dir / "shards").glob("*.parquet")), ischema)
    index = _dedupe_sorted(index, ["key"])
    _atomic_write_parquet(index, out_dir / "index.parquet")
    rschema = index_schema(Clip)
    rejects = _dedupe_sorted(_concat(sorted((out_dir / "_parts").glob("rejects-*.parquet")), rschema), ["key"])
    _atomic_write_parquet(rejects, out_dir / "rejects.parquet")
    eschema = arrow_schema(ErrorRecord)
    errors = _concat(sorted((out_dir / "_parts").glob("errors-*.parquet")), eschema)
    errors = _dedupe_sorted(errors, ["video_id", "key", "error_stage"])
    _atomic_write_parquet(errors, out_dir / "errors.parquet")
    for name in ("index.parquet", "rejects.parquet", "errors.parquet"):
        store.publish(name)
    return {"kept": index.num_rows, "rejected": rejects.num_rows, "errors": errors.num_rows}

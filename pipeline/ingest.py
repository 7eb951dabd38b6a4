"""Read the input LIST as blocks on the workers: the driver plans, the workers read and check.

``plan_blocks`` turns a LIST (``.txt``, ``.csv``/``.tsv``, ``.jsonl``/``.ndjson``, ``.parquet``; a
local path or an object-store URL) into :class:`ListBlock` objects: byte ranges (row groups for
parquet) whose ``read()``, on a worker, parses its records and runs the ingest checks of
``stages.ingest`` per record (bad lines become typed ``ingest`` error rows exactly as a whole-file
read makes them). The driver never reads the LIST's records: it reads cheap metadata only (the
size, the first 64 KiB for the encoding and a CSV header, a parquet footer) and runs two passes
as tasks through ``map_fn`` (``ray_runner.ray_map`` on Ray, ``stage.map_in_process`` otherwise):

1. **Scan** (one task per ``chunk_bytes`` of the file, or per group of parquet row groups): each
   task counts the records and lines of its range, cut into segments of ``block_rows`` records at
   record boundaries, so the driver knows every record's ``input_index`` (the record number, as a
   whole-file read gives it: ``layout.partition_of(input_index, per_partition)`` keeps its meaning)
   and every partition's size before any row is written. Text is cut at line starts: a task seeks
   to its nominal start and skips to the next line start (LF, CRLF, CR); a BOM is skipped.
   Each task also hashes (BLAKE2b-128) the ``video_id`` of every usable record into ``buckets``
   bucket files under ``scratch`` (16 bytes of hash plus the record number per usable record).
2. **Resolve** (one task per bucket): sorts its bucket's hashes; in every group of equal hashes the
   lowest record number is the first occurrence and each later one a duplicate. The tasks return
   only (duplicate, first) pairs; each block gets the pairs of its own range and turns those rows
   into ``ingest/duplicate_input`` rows, as ``mark_duplicates`` would on the whole LIST.

What it costs: the scan parses every record and runs its checks once more than the reads do (a
local path is stat'ed twice); the shuffle writes and reads 24 bytes per usable record (about half a
LIST of URLs); the driver holds 32 bytes per segment (``block_rows`` records), 16 bytes per
*duplicate* and the committed-partition set, never one entry per id (today's driver-side
``iter_partitions`` keeps every id). Two distinct ids are merged only if their 128-bit hashes
collide (about 1e-20 for 1e8 ids). The first block starts when both passes have finished: they
are parallel, so on a cluster a 1e8-line LIST plans in well under a minute.

Rules per format: UTF-8 text (with or without a BOM) is split anywhere at line starts. UTF-16/32
text (a BOM, or NUL bytes in the first 512) is decoded whole and is one block. A CSV is split at
line starts when no quoted field spans lines: the scan parses each chunk as if it began at a
record, which is exact unless some record spans lines, and every chunk checks that none does
(the first multi-line record is always seen by the chunk it starts in); otherwise the CSV is
scanned again by a chain of tasks, one after another, each starting at the record boundary where
the last stopped (``chunk_bytes`` of memory each; startup time grows with the file). Parquet
blocks are whole row groups (write big LISTs with row groups of about ``block_rows`` rows).

A block yields the records of its range whose partition this run processes: every record of a
partition not committed earlier, and of a committed partition with ``retry_videos`` only those
ids (such a partition lies wholly in one block: its count is the number of retried videos). The
LIST must not change between a run and its resume (record numbers are partition keys).

``iter_partitions`` is the earlier driver-side reader over ``stages.ingest.iter_rows`` (kept for
comparison in the benchmark).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout, storage
from pipeline.errors import InputListError
from pipeline.stage import MapFn, Row, map_in_process
from stages.ingest import (
    CsvHeader,
    count_lines,
    detect_encoding,
    duplicate_row,
    iter_rows,
    list_uri,
    read_csv_header,
    record_to_row,
    records_from_bytes,
    slice_records,
    spans_lines,
    usable_video_id,
)

log = logging.getLogger(__name__)

@dataclass
class IngestCounts:
    inputs: int = 0
    unusable: int = 0
    partitions: int = 0  # partitions of the LIST (numbered 0 .. partitions - 1)


def iter_partitions(
    list_path: str | Path,
    per_partition: int,
    wanted: Callable[[int, Row], bool],
    counts: IngestCounts,
) -> Iterator[tuple[int, list[Row]]]:
    """(partition, rows to process) in order; rows ``wanted`` rejects (done earlier) are left out."""
    current: list[Row] = []
    last: int | None = None
    for row in iter_rows(list_path):
        counts.inputs += 1
        if row.get("error_stage"):
            counts.unusable += 1
        p = layout.partition_of(row["input_index"], per_partition)
        counts.partitions = max(counts.partitions, p + 1)
        if last is not None and p != last and current:
            yield last, current
            current = []
        last = p
        if wanted(p, row):
            current.append(row)
    if last is not None and current:
        yield last, current
    log.info("ingest: %d inputs from %s (%d unusable)", counts.inputs, list_path, counts.unusable)


# ----------------------------------------------------------------------------- distributed reading

HEAD_BYTES = 1 << 16
_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class ListSource:
    """A LIST file and what its readers need from its head: picklable, sent with every task."""

    uri: str  # absolute local path or object-store URL
    name: str  # as the user gave it (messages)
    fmt: str  # lines (.txt and others) | jsonl | csv | parquet | whole (UTF-16/32 text, read whole)
    suffix: str
    size: int
    data_start: int = 0  # first byte of the records: after a BOM and a CSV's header
    first_line: int = 1  # line number at data_start
    header: CsvHeader | None = None

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file: a ranged read for an object-store URL."""
        end = min(end, self.size)
        if end <= start:
            return b""
        if storage.is_remote(self.uri):
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.uri)
            return bytes(fs.cat_file(path, start=start, end=end))
        with open(self.uri, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def parquet(self) -> Any:
        import pyarrow.parquet as pq

        try:
            if storage.is_remote(self.uri):
                import fsspec

                fs, path = fsspec.core.url_to_fs(self.uri)
                return pq.ParquetFile(fs.open(path, "rb"))
            return pq.ParquetFile(self.uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise InputListError(f"{self.name}: not a readable parquet file: {exc}") from None


def open_source(list_path: str | Path) -> ListSource:
    """The LIST's metadata (size, encoding, CSV header, parquet schema); raises InputListError
    for a LIST that is missing or unreadable as a whole. Reads at most the head of the file."""
    text = str(list_path)
    uri = list_uri(text)
    if not storage.is_remote(uri):
        uri = str(Path(uri).resolve())
    suffix = Path(text).suffix.lower()
    src = ListSource(uri, text, "lines", suffix, storage.size(uri))
    if suffix == ".parquet":
        names = src.parquet().schema_arrow.names
        if not any(str(n).lstrip("\ufeff").strip().lower() == "url" for n in names):
            raise InputListError(f"{text}: parquet needs a 'url' column, has {names}")
        return replace(src, fmt="parquet")
    try:
        head = src.read(0, HEAD_BYTES)
    except OSError as exc:
        raise InputListError(f"cannot read input list {text}: {exc.strerror or exc}") from None
    encoding, bom = detect_encoding(head[:512])
    if encoding != "utf-8":
        return replace(src, fmt="whole")
    if suffix not in (".csv", ".tsv"):
        return replace(src, fmt="jsonl" if suffix in (".jsonl", ".ndjson") else "lines", data_start=bom)
    want = HEAD_BYTES
    while True:  # the header record may span lines: read until it ends before what was read
        header, used, lines = read_csv_header(head[bom:], text, "\t" if suffix == ".tsv" else ",")
        if header is None or bom + used < len(head) or len(head) >= src.size:
            break
        want *= 4
        head = src.read(0, want)
    if header is None:
        return replace(src, fmt="csv", data_start=src.size)
    return replace(src, fmt="csv", data_start=bom + used, first_line=lines + 1, header=header)


def _line_start(src: ListSource, x: int) -> int:
    """The first line start at or after byte ``x`` (LF, CRLF, CR; a CRLF is never cut)."""
    if x <= src.data_start:
        return src.data_start
    pos = x - 1
    while pos < src.size:
        buf = src.read(pos, pos + HEAD_BYTES)
        m = _EOL.search(buf)
        if m is None:
            pos += len(buf)
            continue
        end = pos + m.end()
        if m.group() == b"\r" and m.end() == len(buf) and end < src.size:
            return end + (src.read(end, end + 1) == b"\n")
        return end
    return src.size


@dataclass(frozen=True)
class _Scan:
    """One scan task: records, lines and usable ids of a range of the LIST."""

    source: ListSource
    chunk: int  # number of the task (bucket file names)
    start: int  # byte (row group for parquet); skipped forward to a line start unless ``chained``
    end: int
    segment_rows: int
    buckets: int
    scratch: str
    chained: bool = False  # CSV with multi-line records: start is a record start; stop at the last whole record


@dataclass
class _Scanned:
    chunk: int
    segments: np.ndarray  # int64 rows (start, end, records, lines), in order
    usable: int
    files: list[str]  # one bucket file per bucket ("" when none)
    spans_lines: bool = False  # a CSV record spans lines: the speculative split is invalid
    next_start: int = -1  # chained scan: where the next task starts (-1: done)


def _scan(task: _Scan) -> _Scanned:
    """Run on a worker: cut the range into segments of ``segment_rows`` records and write the
    hashes of its usable records' ids into bucket files (record numbers local to the task)."""
    src = task.source
    hashes = bytearray()
    local: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    flagged = False
    next_start = -1

    def add(record: dict[str, Any], k: int) -> None:
        vid = usable_video_id(record)
        if vid is not None:
            hashes.extend(hashlib.blake2b(vid.encode("utf-8", "surrogatepass"), digest_size=16).digest())
            local.append(k)

    k = 0
    if src.fmt == "parquet":
        pf = src.parquet()
        columns = [n for n in pf.schema_arrow.names if str(n).lstrip("\ufeff").strip().lower() in ("url", "id")]
        for group in range(task.start, task.end):
            first = k
            for batch in pf.iter_batches(row_groups=[group], columns=columns, batch_size=8192):
                for record in batch.to_pylist():
                    add(record, k)
                    k += 1
            segments.append((group, group + 1, k - first, 0))
    elif src.fmt == "whole":
        for record in records_from_bytes(src.read(0, src.size), src.suffix, src.name):
            add(record, k)
            k += 1
        segments.append((0, src.size, k, 0))
    else:
        start = task.start if task.chained else _line_start(src, task.start)
        window = task.end - task.start
        while True:
            end = min(src.size, start + window) if task.chained else _line_start(src, task.end)
            data = src.read(start, end)
            at_eof = end >= src.size
            if not task.chained or at_eof:
                break
            last = 0  # a chained task keeps records that end before its window does (they are whole)
            for _, stop, _ in slice_records(data, src.fmt, 1, src.header):
                if stop >= len(data):
                    break
                last = stop
            if last:
                data = data[:last]
                next_start = start + last
                break
            window *= 2  # one record longer than the window
        seg_start = seg_lines = n = 0
        for record, stop, lines in slice_records(data, src.fmt, 1, src.header):
            if src.fmt == "csv" and not task.chained and spans_lines(record):
                flagged = True
                break
            add(record, k)
            k += 1
            n += 1
            if n == task.segment_rows:
                segments.append((start + seg_start, start + stop, n, lines - seg_lines))
                seg_start, seg_lines, n = stop, lines, 0
        if not flagged and len(data) > seg_start:
            segments.append((start + seg_start, start + len(data), n, count_lines(data) - seg_lines))
    files = [""] * task.buckets
    if local:
        table = np.empty((len(local), 3), np.uint64)
        table[:, :2] = np.frombuffer(bytes(hashes), dtype="<u8").reshape(-1, 2)
        table[:, 2] = local
        bucket = table[:, 0] % np.uint64(task.buckets)
        order = np.argsort(bucket, kind="stable")
        table, bucket = table[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(task.buckets + 1, dtype=np.uint64))
        for b in range(task.buckets):
            part = table[bounds[b] : bounds[b + 1]]
            if len(part):
                buf = io.BytesIO()
                np.save(buf, part)
                files[b] = storage.join(task.scratch, f"{task.chunk:06d}-{b:04d}.npy")
                storage.write_bytes(files[b], buf.getvalue())
    seg = np.array(segments, np.int64).reshape(-1, 4)
    return _Scanned(task.chunk, seg, len(local), files, flagged, next_start)


def _resolve(parts: list[tuple[int, str]]) -> np.ndarray:
    """Run on a worker: one bucket's (first record number of its task, file) list -> int64 rows
    (duplicate, first occurrence) sorted by duplicate. The lowest record number of an id wins."""
    arrays = []
    for offset, uri in parts:
        a = np.load(io.BytesIO(storage.read_bytes(uri)))
        a[:, 2] += np.uint64(offset)
        arrays.append(a)
    if not arrays:
        return np.empty((0, 2), np.int64)
    t = np.concatenate(arrays)
    t = t[np.lexsort((t[:, 2], t[:, 1], t[:, 0]))]
    new = np.ones(len(t), bool)
    new[1:] = (t[1:, 0] != t[:-1, 0]) | (t[1:, 1] != t[:-1, 1])
    firsts = np.maximum.accumulate(np.where(new, np.arange(len(t)), 0))
    dup = ~new
    out = np.stack([t[dup, 2], t[firsts[dup], 2]], axis=1).astype(np.int64)
    return out[np.argsort(out[:, 0], kind="stable")]


@dataclass(slots=True)
class ListBlock:
    """A range of the LIST read on a worker (an ``InputBlock``): ``read()`` gives its rows this run
    processes, in LIST order, exactly as the whole-file reader would give them. Small (the driver
    may hold every block of a run): a few ints and dicts of its own partitions and duplicates."""

    source: ListSource
    start: int  # bytes; row groups for parquet
    end: int
    first_index: int  # record number of the first record in the range
    first_line: int  # line number of the first line in the range
    per_partition: int
    partitions: dict[int, int]  # partition -> rows this block yields in this run (no other is read)
    rows: int = 0
    retry: dict[int, frozenset[str]] | None = None  # partition -> the only video ids it yields
    duplicates: dict[int, int] | None = None  # record number -> the record number of the id's first occurrence

    def _records(self) -> Iterator[dict[str, Any]]:
        src = self.source
        if src.fmt == "parquet":
            groups = list(range(self.start, self.end))
            for batch in src.parquet().iter_batches(row_groups=groups, batch_size=8192):
                yield from batch.to_pylist()
        elif src.fmt == "whole":
            yield from records_from_bytes(src.read(0, src.size), src.suffix, src.name)
        else:
            data = src.read(self.start, self.end)
            for record, _, _ in slice_records(data, src.fmt, self.first_line, src.header):
                yield record

    def read(self) -> list[Row]:
        out: list[Row] = []
        for index, record in enumerate(self._records(), self.first_index):
            p = layout.partition_of(index, self.per_partition)
            if p not in self.partitions:
                continue
            row = record_to_row(record, index)
            first = self.duplicates.get(index) if self.duplicates else None
            if first is not None and not row.get("error_stage"):
                row = duplicate_row(row, first)
            ids = self.retry.get(p) if self.retry else None
            if ids is None or row["video_id"] in ids:
                out.append(row)
        return out


def _scan_all(src: ListSource, tasks: list[_Scan], map_fn: MapFn) -> list[_Scanned]:
    scanned: list[_Scanned] = map_fn(_scan, tasks)
    if src.fmt != "csv" or not any(s.spans_lines for s in scanned):
        return scanned
    log.info("ingest: %s has quoted fields spanning lines: scanning it again in one chain of tasks", src.name)
    base = tasks[0]
    scanned, start, chunk = [], src.data_start, len(tasks)
    while 0 <= start < src.size:
        task = replace(base, chunk=chunk, start=start, end=start + (base.end - base.start), chained=True)
        (done,) = map_fn(_scan, [task])
        scanned.append(done)
        start, chunk = done.next_start, chunk + 1
    return scanned


MAX_BLOCKS = 50_000  # blocks per LIST at most (100 M lines: blocks of 2 000 rows)


def plan_blocks(
    list_path: str | Path,
    per_partition: int,
    done: set[int] | frozenset[int],
    retry_videos: dict[int, set[str]] | None,
    counts: IngestCounts,
    *,
    block_rows: int = 64,
    map_fn: MapFn = map_in_process,
    scratch: str | None = None,
    chunk_bytes: int = 32 << 20,
    buckets: int | None = None,
) -> Iterator[ListBlock]:
    """The LIST as blocks read on the workers (see the module's docstring), in LIST order.

    ``done``: partitions committed earlier (left out but for ``retry_videos``, partition -> video
    ids to retry). ``map_fn`` runs the scan and resolve tasks; ``scratch`` is a folder every task
    can reach (the output's ``_tmp`` on a cluster; a local temporary folder when None) for the id
    buckets, removed when planning ends. ``counts`` is filled before the first block is given.
    """
    src = open_source(list_path)
    per = max(1, per_partition)
    rows_per_task = max(1, chunk_bytes // 64)
    n_buckets = buckets or max(1, min(256, math.ceil(src.size / (64 << 20))))
    work = tempfile.mkdtemp(prefix="avforge-ingest-") if scratch is None else storage.join(scratch, f"ingest-{uuid.uuid4().hex[:12]}")
    tasks: list[_Scan] = []
    if src.fmt == "parquet":
        meta = src.parquet().metadata
        first = total = 0
        for g in range(meta.num_row_groups):
            total += meta.row_group(g).num_rows
            if total >= rows_per_task or g == meta.num_row_groups - 1:
                tasks.append(_Scan(src, len(tasks), first, g + 1, block_rows, n_buckets, work))
                first, total = g + 1, 0
    elif src.fmt == "whole":
        tasks.append(_Scan(src, 0, 0, src.size, block_rows, n_buckets, work))
    else:
        step = max(1, chunk_bytes)
        for start in range(src.data_start, src.size, step):
            tasks.append(_Scan(src, len(tasks), start, start + step, block_rows, n_buckets, work))
    try:
        scanned = _scan_all(src, tasks, map_fn) if tasks else []
        offsets = np.cumsum([0] + [int(s.segments[:, 2].sum()) for s in scanned])
        resolve = [
            [(int(offsets[i]), s.files[b]) for i, s in enumerate(scanned) if s.files[b]] for b in range(n_buckets)
        ]
        found = map_fn(_resolve, [r for r in resolve if r])
    finally:
        storage.remove_tree(work)
    dups = np.concatenate([np.empty((0, 2), np.int64), *found])
    dups = dups[np.argsort(dups[:, 0], kind="stable")]
    segments = np.concatenate([np.empty((0, 4), np.int64), *(s.segments for s in scanned)])
    total = int(offsets[-1])
    usable = sum(s.usable for s in scanned)
    counts.inputs += total
    counts.unusable += total - usable + len(dups)
    counts.partitions = max(counts.partitions, math.ceil(total / per))
    log.info("ingest: %d inputs from %s (%d unusable, %d duplicates) in %d segments",
             total, src.name, total - usable + len(dups), len(dups), len(segments))  # fmt: skip
    # the driver holds every block of a run (a Ray Data read task each): a huge LIST gets bigger blocks
    block_rows = max(block_rows, math.ceil(total / MAX_BLOCKS))
    yield from _blocks(src, segments, per, done, retry_videos or {}, dups, block_rows, total)


def _blocks(src: ListSource, segments: np.ndarray, per: int, done: set[int] | frozenset[int],
            retry: dict[int, set[str]], dups: np.ndarray, block_rows: int, total: int) -> Iterator[ListBlock]:  # fmt: skip
    """Consecutive segments grouped into blocks of about ``block_rows`` rows this run processes; a
    retried partition is never split (its row count is its retried videos')."""
    cur: ListBlock | None = None

    def close(block: ListBlock, last: int) -> ListBlock:
        lo, hi = np.searchsorted(dups[:, 0], [block.first_index, last])
        block.duplicates = dict(dups[lo:hi].tolist()) or None
        block.rows = sum(block.partitions.values())
        return block

    index, line = 0, src.first_line
    rows = (row for i in range(0, len(segments), 4096) for row in segments[i : i + 4096].tolist())
    for start, end, n, lines in rows:  # Python ints a slice at a time (a list of them all is ~200 B a segment)
        s, first_line = index, line
        index, line = index + n, line + lines
        if n == 0:
            if cur is not None:
                cur.end = end
            continue
        shares: dict[int, int] = {}  # partition -> its rows in this segment
        retried: dict[int, frozenset[str]] = {}
        for p in range(s // per, (s + n - 1) // per + 1):
            if p not in done:
                shares[p] = min(index, (p + 1) * per) - max(s, p * per)
            elif p in retry:
                retried[p] = frozenset(retry[p])
        if not shares and not retried:
            if cur is not None:
                yield close(cur, s)
                cur = None
            continue
        if cur is None:
            cur = ListBlock(src, start, end, s, first_line, per, {})
        cur.end = end
        for p, k in shares.items():
            cur.partitions[p] = cur.partitions.get(p, 0) + k
        if retried:
            cur.retry = {**(cur.retry or {}), **retried}
            cur.partitions.update((p, len(ids)) for p, ids in retried.items())
        last = (index - 1) // per
        splits_retry = last in retried and index < min(total, (last + 1) * per)
        if sum(cur.partitions.values()) >= block_rows and not splits_retry:
            yield close(cur, index)
            cur = None
    if cur is not None:
        yield close(cur, index)

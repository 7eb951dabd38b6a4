"""Stream the input LIST into partitions of rows, without holding every row on the driver.

The per-record work (decoding, URL and path checks, ids, duplicate marking) is the ingest stage's
(``stages.ingest``: ``iter_records``, ``record_to_row``, ``mark_duplicates``); this module only
cuts the stream into input partitions (``write.inputs_per_partition`` consecutive lines), leaves
out partitions that earlier runs committed, and counts what it saw. The Ray runner turns each
partition into one small Arrow block in the object store as it is read, so the driver keeps one
partition's rows at a time (plus the ids seen, to mark duplicates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import layout, storage
from pipeline.errors import InputListError
from pipeline.stage import Row
from stages.ingest import iter_records, mark_duplicates, record_to_row

log = logging.getLogger(__name__)


@dataclass
class IngestCounts:
    inputs: int = 0
    unusable: int = 0
    partitions: set[int] = field(default_factory=set)  # every partition of the LIST


def _local_list(list_path: str | Path) -> Path:
    if storage.is_remote(list_path):
        if not storage.exists(str(list_path)):
            raise InputListError(f"input list not found: {list_path}")
        return storage.localize(str(list_path))
    path = Path(list_path)
    try:
        ok = path.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise InputListError(f"input list not found: {str(path)[:300]}")
    return path


def iter_rows(list_path: str | Path) -> Iterator[Row]:
    """Every input as a row (a video row or an ingest error row), in LIST order, lazily."""
    path = _local_list(list_path)
    return mark_duplicates(record_to_row(rec, i) for i, rec in enumerate(iter_records(path)))


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
        counts.partitions.add(p)
        if last is not None and p != last and current:
            yield last, current
            current = []
        last = p
        if wanted(p, row):
            current.append(row)
    if last is not None and current:
        yield last, current
    log.info("ingest: %d inputs from %s (%d unusable)", counts.inputs, list_path, counts.unusable)

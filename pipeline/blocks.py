"""Input blocks: what a run feeds its streaming stages, planned on the driver and read on a worker.

A block is a small picklable description (a byte range of the LIST, a staged file of rows) whose
``read()`` produces the rows where they are processed: one Ray Data read task per block, or an
in-process call for the sequential backend. The driver never holds the rows, only the blocks'
``partitions`` (input partition -> videos of it the block yields in this run), which the committer
needs before any row of a partition is written.

* ``RowsBlock``: rows already in memory (tests, tools).
* the LIST's blocks: ``pipeline.ingest``.
* ``StagedBlock``: the rows that reached a global phase (dedup), written to staging by the workers
  in the phase before it, read back with the phase's decisions applied (``Stage.apply_partition``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.executor import apply_global
from pipeline.stage import Row, Stage

log = logging.getLogger(__name__)


class InputBlock(Protocol):
    partitions: dict[int, int]  # input partition -> videos of it this block yields in this run
    rows: int  # estimated rows (task sizing)

    def read(self) -> list[Row]: ...


@dataclass
class RowsBlock:
    """Rows already in memory (picklable as they are)."""

    data: list[Row]
    partitions: dict[int, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.data)

    def read(self) -> list[Row]:
        return self.data


def read_rows(uri: str) -> list[Row]:
    """A staged file of rows (written by ``pipeline.writer.PhaseWriter``)."""
    source: object = pa.BufferReader(storage.read_bytes(uri)) if storage.is_remote(uri) else uri
    return pq.ParquetFile(source).read(use_threads=False).to_pylist()


@dataclass
class StagedBlock:
    """One staged file of rows of one input partition, read back after ``stage``'s decision."""

    uri: str
    partition: int
    rows: int
    stage: Stage
    partitions: dict[int, int] = field(default_factory=dict)  # videos were counted in the phase before

    def read(self) -> list[Row]:
        rows = read_rows(self.uri)
        if len(rows) != self.rows:
            raise RuntimeError(f"staged file {self.uri} holds {len(rows)} rows, its manifest said {self.rows}")
        return apply_global(self.stage, self.partition, rows)

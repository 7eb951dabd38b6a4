"""The stage contract. Stages never import Ray; ``pipeline.ray_runner`` maps them onto Ray Data.

A stage declares the columns it ``reads`` and ``writes``, its ``resources`` and ``batch_size``,
loads heavy things in ``setup()`` (never at import time or in ``__init__``) and implements
``process_batch(rows)``:

* a map stage returns one value per input row: a dict of updates (keys within ``writes``) or an
  ``Exception`` instance, which marks that row as failed;
* a fan-out stage (``fan_out = True``) returns one value per input row: a list of child updates
  (each becomes a row: the parent row with the update applied) or an ``Exception`` instance.

A stage may instead raise: the runner then retries the batch row by row to isolate the bad row
(on out-of-memory it retries halves of the batch instead, down to one row). Rows that already failed, and rows a filter marked with
``drop_reason`` (when ``skip_dropped``), pass through a stage untouched.

A **global phase** (``global_phase = True``: dedup) decides over every row that reaches it, without
the rows ever meeting in one process:

1. on the workers, the runner writes each input partition's surviving rows to staging and
   ``phase_signals(rows)`` (one small row per clip) to the output's ``signals/`` dataset;
2. once, ``decide(signal_uris, against, run_map)`` reads only those files, runs its heavy work as
   tasks through ``run_map`` (Ray Data tasks on the workers, or in-process), writes its decisions
   per input partition to staging and returns a small summary;
3. on the workers, each partition's staged rows are read back and ``apply_partition(partition,
   rows)`` returns one update per row (like ``process_batch``); then the next stages stream on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from pipeline.config import PoolConfig
from pipeline.errors import StageError

Row = dict[str, Any]
C = TypeVar("C", bound=BaseModel)
P = TypeVar("P", bound=PoolConfig)
# run_map(fn, items) -> [fn(item) for item in items], each call a task on the workers (Ray Data) or
# in-process (sequential backend); fn and items must be picklable, results small
MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def map_in_process(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The sequential backend's ``MapFn``."""
    return [fn(item) for item in items]


def per_row(fn: Callable[[Row], Any], rows: list[Row]) -> list[Any]:
    """``fn`` on each row; a StageError it raises becomes that row's result and the others go on."""
    out: list[Any] = []
    for row in rows:
        try:
            out.append(fn(row))
        except StageError as exc:
            out.append(exc)
    return out


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs.

    ``cpus`` and ``gpus`` may be fractional. ``pool_size`` is the number of actors for a
    stateful stage, or the maximum number of concurrent tasks for a stateless one.
    """

    cpus: float = 1.0
    gpus: float = 0.0
    pool_size: int = 1


@dataclass(frozen=True)
class StageContext:
    """Run-wide settings a stage may need: where to put intermediate media."""

    staging_dir: str = "/tmp/avforge-staging"


class Stage(ABC, Generic[C]):
    name: ClassVar[str]
    # Columns the stage uses. Those not in ``optional_reads`` are required: when the pipeline is
    # built from the config (``pipeline.registry.unmet_reads``), ingest or an earlier stage must
    # write each of them, or the config is refused. ``optional_reads`` are used when present.
    reads: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    fan_out: ClassVar[bool] = False
    stateful: ClassVar[bool] = False  # True: model stages, run as an actor pool
    skip_dropped: ClassVar[bool] = True
    # A global phase (dedup) decides over every row reaching it: phase_signals / decide /
    # apply_partition (see the module docstring) instead of process_batch.
    global_phase: ClassVar[bool] = False

    def __init__(self, config: C, context: StageContext | None = None) -> None:
        self.config = config
        self.context = context or StageContext()

    @classmethod
    def required_reads(cls) -> tuple[str, ...]:
        """The ``reads`` an earlier stage (or ingest) must write."""
        return tuple(c for c in cls.reads if c not in cls.optional_reads)

    @property
    def resources(self) -> Resources:
        return Resources()

    @property
    def batch_size(self) -> int:
        return 1

    def setup(self) -> None:
        """Load models and other heavy state. Called once per worker before any batch."""

    def teardown(self) -> None:
        """Release what ``setup`` took."""

    @abstractmethod
    def process_batch(self, rows: list[Row]) -> list[Any]:
        """One value per row: an update dict (a list of them for fan-out) or an Exception."""

    # ------------------------------------------------------------------ global phases only

    def phase_signals(self, rows: list[Row]) -> Any:
        """A global phase: the small table (pyarrow) it decides on, one row per active row."""
        raise NotImplementedError(f"stage {self.name} is not a global phase")

    def decide(self, signal_uris: list[str], against: Sequence[Any], run_map: MapFn) -> dict[str, Any]:
        """A global phase: decide over every signal file (and earlier outputs' ``against``
        partitions, ``pipeline.resume.AgainstPartition``); returns a small summary."""
        raise NotImplementedError(f"stage {self.name} is not a global phase")

    def apply_partition(self, partition: int, rows: list[Row]) -> list[Any]:
        """A global phase: one update per row of ``partition`` from the decisions."""
        raise NotImplementedError(f"stage {self.name} is not a global phase")


class PooledStage(Stage[P]):
    """A model stage run as an actor pool sized by its config (``num_cpus``, ``num_gpus``,
    ``pool_size``, ``batch_size``: see ``pipeline.config.PoolConfig``)."""

    stateful: ClassVar[bool] = True

    @property
    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.num_cpus, gpus=c.num_gpus, pool_size=c.pool_size)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

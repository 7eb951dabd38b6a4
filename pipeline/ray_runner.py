"""Map stages onto Ray Data. The only module that imports Ray.

* stateless stages (ffmpeg, yt-dlp, PyAV) run as tasks with bounded concurrency
  (``TaskPoolStrategy``); neighbouring ones with equal resources fuse into one task
  (``fuse_stages``), each stage still batching by its own ``batch_size``;
* stateful (model) stages run as actor pools (``ActorPoolStrategy``) with ``num_gpus``;
* batches travel as Arrow tables of the ``Clip`` schema; rows carry media URIs, not bytes;
* faults: Ray Data reruns a task whose worker process or node died (``max_retries=-1``; input
  blocks lost with a node are rebuilt from lineage) and restarts a dead actor and resends its
  batch (``max_restarts=-1``, ``max_task_retries=-1``): its defaults, which tests/test_faults.py
  relies on. Stages catch their own exceptions (errors are data), so only system failures are
  retried. The last task writes shards on the worker (``pipeline.writer``); a retried writer
  task rewrites the same names, and only files named in a partition's completion marker count;
* per-stage row and error counters are Ray metrics (``StageMetrics``) for Prometheus.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.executor import apply_stage
from pipeline.stage import Row, Stage
from pipeline.blocks import InputBlock
from pipeline.writer import PhaseWriter, ShardWriter
from schemas.records import Video, arrow_schema, to_table

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402

Writer = ShardWriter | PhaseWriter

# A fused group of task stages gets enough rows per task for about this many tasks per worker.
TASKS_PER_WORKER = 4

_READY: dict[int, Stage] = {}


def _ready(stage: Stage) -> Stage:
    """Set a stage up once per worker process (task workers are reused between tasks)."""
    key = hash((stage.name, stage.config.model_dump_json(), stage.context))
    cached = _READY.get(key)
    if cached is None:
        stage.setup()
        _READY[key] = cached = stage
    return cached


class StageMetrics:
    """avforge's per-stage counters as Ray metrics, exported by each node's metrics agent.

    Prometheus sees them as ``ray_avforge_stage_rows_in_total`` (rows a stage processed),
    ``ray_avforge_stage_rows_out_total`` (rows it passed on; more than in for a fan-out) and
    ``ray_avforge_stage_errors_total`` (rows it failed, by ``error_type``), all tagged with ``stage``.
    Created lazily in each worker process.
    """

    def __init__(self) -> None:
        from ray.util import metrics

        self.rows_in = metrics.Counter("avforge_stage_rows_in", "rows a stage processed", tag_keys=("stage",))
        self.rows_out = metrics.Counter("avforge_stage_rows_out", "rows a stage passed on", tag_keys=("stage",))
        self.errors = metrics.Counter("avforge_stage_errors", "rows a stage failed", tag_keys=("stage", "error_type"))

    def record(self, stage: Stage, rows_in: list[Row], rows_out: list[Row]) -> None:
        """Count one ``apply_stage`` call: rows it processed (not failed or dropped before), rows
        out, and the errors it added."""
        name = stage.name
        active = sum(
            1 for r in rows_in if not r.get("error_stage") and not (stage.skip_dropped and r.get("drop_reason"))
        )
        if active:
            self.rows_in.inc(active, tags={"stage": name})
        if rows_out:
            self.rows_out.inc(len(rows_out), tags={"stage": name})
        before = Counter(r.get("error_type") for r in rows_in if r.get("error_stage") == name)
        after = Counter(r.get("error_type") for r in rows_out if r.get("error_stage") == name)
        for error_type, n in (after - before).items():
            self.errors.inc(n, tags={"stage": name, "error_type": str(error_type)})


_METRICS: list[StageMetrics] = []


def stage_metrics() -> StageMetrics:
    """This process's counters (one set per process: Ray refuses two metrics of one name)."""
    if not _METRICS:
        _METRICS.append(StageMetrics())
    return _METRICS[0]


def apply_group(stages: list[Stage], rows: list[Row]) -> list[Row]:
    """Apply fused stages in order, each on chunks of its own ``batch_size`` (after any fan-out)."""
    for stage in stages:
        out: list[Row] = []
        for i in range(0, len(rows), stage.batch_size):
            out.extend(apply_stage(stage, rows[i : i + stage.batch_size]))
        stage_metrics().record(stage, rows, out)
        rows = out
    return rows


def _manifests(manifests: list[dict[str, Any]]) -> pa.Table:
    """What a writer task returns to the driver: one small JSON manifest per partition group."""
    return pa.table({"manifest": pa.array([json.dumps(m) for m in manifests], pa.string())})


def _run_task(table: pa.Table, stages: list[Stage], writer: Writer | None = None) -> pa.Table:
    rows = apply_group([_ready(s) for s in stages], table.to_pylist())
    if writer is None:
        return to_table(rows)
    return _manifests(writer.write(rows))


def _write_task(table: pa.Table, writer: Writer) -> pa.Table:
    return _manifests(writer.write(table.to_pylist()))


class _StageActor:
    """One actor of a stateful stage's pool: set up once, then serve batches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return to_table(apply_group([self.stage], table.to_pylist()))


def fuse_stages(stages: list[Stage]) -> list[list[Stage]]:
    """Group neighbouring stateless stages with equal resources: each group runs as one task.

    Fusing here rather than leaving it to Ray Data keeps each stage's ``batch_size`` meaning rows
    *after* the fan-outs before it: Ray Data fuses ``map_batches`` calls by bundling the input up
    to the largest batch size, so a 64-row filter after ``split`` would make every task take 64
    videos, serialising a small job into one task and streaming nothing until it ends.
    """
    groups: list[list[Stage]] = []
    for stage in stages:
        last = groups[-1] if groups else None
        if last and not stage.stateful and not last[0].stateful and stage.resources == last[0].resources:
            last.append(stage)
        else:
            groups.append([stage])
    return groups


def rows_per_task(group: list[Stage], rows: int, workers: int) -> int:
    """Input rows per task of a fused group: the first stage's batch size, raised until the job
    makes about ``TASKS_PER_WORKER`` tasks per worker, but never above the group's largest batch
    size (Ray's per-task overhead is ~0.1-1 s: one task per short video costs more than it works).
    """
    wanted = math.ceil(rows / (TASKS_PER_WORKER * max(1, workers)))
    return max(group[0].batch_size, min(wanted, max(s.batch_size for s in group)))


def init_ray(config: RunConfig) -> None:
    cfg = config.ray
    if cfg.address:
        if not ray.is_initialized():
            log.info("connecting to Ray at %s", cfg.address)
            ray.init(address=cfg.address, log_to_driver=True)
        return
    from pipeline.registry import actor_cpu_demand

    # every actor pool must fit at its minimum size, with a CPU left for the task stages, or a pool
    # never starts and the run waits forever: logical CPUs beyond the cores time-share them
    needed = math.ceil(actor_cpu_demand(config)) + 1
    if ray.is_initialized():
        have = _cluster_cpus()
        if cfg.num_cpus or have >= needed:
            return
        # an in-process Ray started earlier in this process (a previous run, a notebook, a test) with
        # too few CPUs for this run's actor pools would leave a pool pending forever: start anew
        log.warning("the in-process Ray has %d CPUs, fewer than the %d this run's actor pools need: restarting it",
                    int(have), needed)  # fmt: skip
        ray.shutdown()
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, needed)
    if num_cpus < needed:
        log.warning("ray.num_cpus=%d is less than the %d the stages' actor pools need: the run may wait forever",
                    num_cpus, needed)  # fmt: skip
    log.info("starting Ray in-process with %d CPUs", num_cpus)
    ray.init(
        address="local",  # a new in-process instance, even if another Ray runs on this machine
        num_cpus=num_cpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": dict(RAY_ENV)},
    )


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


@functools.cache
def input_schema() -> pa.Schema:
    """Input rows (``stages.ingest``): the Video record and the error fields of unusable lines."""
    schema = arrow_schema(Video)
    for name in ("error_stage", "error_type", "error"):
        schema = schema.append(pa.field(name, pa.string()))
    return schema


def _read_block(block: InputBlock) -> list[pa.Table]:
    """A read task on a worker: the block's rows as one Arrow table (input rows keep the narrow
    input schema: a Clip table costs ~1 ms a row)."""
    rows = block.read()
    if any(r.get("key") for r in rows):  # clips (after a global phase): every column
        return [to_table(rows)]
    return [pa.Table.from_pylist(rows, schema=input_schema())]


def _datasource(blocks: list[InputBlock]) -> Any:
    """The blocks as a Ray Data source: one read task per block, run on a worker."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Source(Datasource):  # type: ignore[misc]
        def get_name(self) -> str:
            return "AvforgeInputs"

        def estimate_inmemory_data_size(self) -> int:  # a rough 4 KB a row: only Ray's planning uses it
            return sum(b.rows for b in blocks) * 4096

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[Any]:
            return [
                ReadTask(functools.partial(_read_block, b), BlockMetadata(num_rows=b.rows, size_bytes=b.rows * 4096, input_files=None, exec_stats=None))
                for b in blocks
            ]

    return Source()


def _actor_pool(stage: Stage, config: RunConfig) -> Any:
    """(min, max) actors: the stage's pool_size, growing to ``ray.max_actors_per_stage`` while the
    cluster has room (the autoscaler adds nodes for pending actors)."""
    from ray.data import ActorPoolStrategy

    low = stage.resources.pool_size
    high = max(low, config.ray.max_actors_per_stage or low)
    return ActorPoolStrategy(min_size=low, max_size=high)


def build_dataset(stages: list[Stage], blocks: list[InputBlock], config: RunConfig, writer: Writer) -> Any:
    """The Ray Data plan: one read task per input block, fused task groups and actor pools, and
    the writer in the last task (fused into the last task group when that group is stateless)."""
    import ray.data
    from ray.data import TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.ray.progress_bars
    if not blocks:
        return None
    n_rows = sum(b.rows for b in blocks)
    ds = ray.data.read_datasource(_datasource(blocks), override_num_blocks=len(blocks))
    workers = config.ray.workers_per_cpu_stage or max(1, int(_cluster_cpus()))
    groups = fuse_stages(stages)
    for n, group in enumerate(groups):
        first = group[0]
        res = first.resources
        if first.stateful:
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": first},
                compute=_actor_pool(first, config),
                num_cpus=res.cpus,
                num_gpus=res.gpus or None,
                batch_size=first.batch_size,
                batch_format="pyarrow",
            )
        else:
            # No fixed pool size: tasks are limited by the CPUs they reserve, so concurrency grows
            # with the cluster (a 0.25-CPU download task gives 4 download slots per core of every node).
            size = config.ray.workers_per_cpu_stage
            fused_writer = writer if n == len(groups) - 1 else None
            ds = ds.map_batches(
                _run_task,
                fn_kwargs={"stages": group, "writer": fused_writer},
                compute=TaskPoolStrategy(size=size),
                num_cpus=res.cpus,
                num_gpus=res.gpus or None,
                batch_size=rows_per_task(group, n_rows, workers),
                batch_format="pyarrow",
            )
    if not groups or groups[-1][0].stateful:
        ds = ds.map_batches(
            _write_task,
            fn_kwargs={"writer": writer},
            compute=TaskPoolStrategy(size=config.ray.workers_per_cpu_stage),
            num_cpus=config.ray.writer_cpus,
            batch_size=None,
            batch_format="pyarrow",
        )
    return ds


def _map_call(payload: Any, row: dict[str, Any]) -> dict[str, Any]:
    import pickle

    fn, items = ray.get(payload)
    return {"id": row["id"], "out": pickle.dumps(fn(items[row["id"]]))}


def ray_map(fn: Callable[[Any], Any], items: Sequence[Any], cpus: float = 1.0) -> list[Any]:
    """``[fn(item) for item in items]``, each call a Ray Data task on the workers (the ``MapFn`` of
    a global phase's ``decide``). ``fn`` and ``items`` travel once, through the object store; the
    results (small: file names, counts) come back to the driver in order."""
    import pickle

    import ray.data

    if not items:
        return []
    payload = ray.put((fn, list(items)))
    ds = ray.data.range(len(items), override_num_blocks=len(items))
    ds = ds.map(functools.partial(_map_call, payload), num_cpus=cpus)
    out: dict[int, Any] = {}
    for row in ds.iter_rows():
        out[int(row["id"])] = pickle.loads(row["out"])
    return [out[i] for i in range(len(items))]


def run_on_ray(stages: list[Stage], blocks: Iterable[InputBlock], config: RunConfig, writer: Writer) -> Iterator[dict[str, Any]]:
    """Read the blocks on the workers, run the stages, write there; the driver gets each task's
    manifests (small dicts: file names and counts), never rows."""
    init_ray(config)
    ds = build_dataset(stages, list(blocks), config, writer)
    if ds is None:
        return
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for text in batch.column("manifest").to_pylist():
            yield json.loads(text)
    log.debug("Ray Data stats:\n%s", ds.stats())

"""Map stages onto Ray Data. The only module that imports Ray.

* stateless stages (ffmpeg, yt-dlp, PyAV) run as tasks with bounded concurrency
  (``TaskPoolStrategy``); neighbouring ones with equal resources fuse;
* stateful (model) stages run as actor pools (``ActorPoolStrategy``) with ``num_gpus``;
* batches travel as Arrow tables of the ``Clip`` schema; rows carry media URIs, not bytes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.executor import apply_stage
from pipeline.stage import Row, Stage
from schemas.records import to_table

log = logging.getLogger(__name__)

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402

_READY: dict[int, Stage] = {}


def _ready(stage: Stage) -> Stage:
    """Set a stage up once per worker process (task workers are reused between tasks)."""
    key = hash((stage.name, stage.config.model_dump_json(), stage.context))
    cached = _READY.get(key)
    if cached is None:
        stage.setup()
        _READY[key] = cached = stage
    return cached


def _run_task(table: pa.Table, stage: Stage) -> pa.Table:
    return to_table(apply_stage(_ready(stage), table.to_pylist()))


class _StageActor:
    """One actor of a stateful stage's pool: set up once, then serve batches."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return to_table(apply_stage(self.stage, table.to_pylist()))


def init_ray(config: RunConfig) -> None:
    if ray.is_initialized():
        return
    cfg = config.ray
    if cfg.address:
        log.info("connecting to Ray at %s", cfg.address)
        ray.init(address=cfg.address, log_to_driver=True)
        return
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    log.info("starting Ray in-process with %d CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": dict(RAY_ENV)},
    )


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def build_dataset(stages: list[Stage], rows: list[Row], config: RunConfig) -> Any:
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # One block per few inputs so downloads and decodes spread over workers.
    per_block = max(1, math.ceil(len(rows) / 2000))
    tables = [to_table(rows[i : i + per_block]) for i in range(0, len(rows), per_block)]
    ds = ray.data.from_arrow(tables)
    cpu_workers = config.ray.workers_per_cpu_stage or max(1, int(_cluster_cpus()))
    for stage in stages:
        res = stage.resources
        if stage.stateful:
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": stage},
                compute=ActorPoolStrategy(size=res.pool_size),
                num_cpus=res.cpus,
                num_gpus=res.gpus or None,
                batch_size=stage.batch_size,
                batch_format="pyarrow",
            )
        else:
            size = res.pool_size if res.pool_size > 1 else cpu_workers
            ds = ds.map_batches(
                _run_task,
                fn_kwargs={"stage": stage},
                compute=TaskPoolStrategy(size=size),
                num_cpus=res.cpus,
                batch_size=stage.batch_size,
                batch_format="pyarrow",
            )
    return ds


def run_on_ray(stages: list[Stage], rows: list[Row], config: RunConfig) -> Iterator[list[Row]]:
    """Stream finished rows back to the driver as Ray Data produces them."""
    init_ray(config)
    ds = build_dataset(stages, rows, config)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.to_pylist()
    log.debug("Ray Data stats:\n%s", ds.stats())

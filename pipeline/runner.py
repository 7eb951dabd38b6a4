"""Run a job: stream the LIST, run the stages (on Ray Data or in-process); workers write, the driver commits."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import layout, storage
from pipeline.config import RunConfig, dump_config
from pipeline.executor import apply_stage
from pipeline.ingest import IngestCounts, iter_partitions
from pipeline.lock import output_lock
from pipeline.registry import build_stages
from pipeline.resume import Committer, committed_partitions, finalize, plan_retry, remove_uncommitted
from pipeline.stage import Row, Stage, StageContext
from pipeline.storage import OutputStore, StagingArea
from pipeline.writer import OutputTarget, ShardWriter
from stages.ingest import read_inputs

log = logging.getLogger(__name__)

Backend = Literal["ray", "sequential"]


@dataclass
class RunSummary:
    output: Path
    inputs: int
    kept: int
    rejected: int
    errors: int
    wall_seconds: float
    video_seconds: float
    stats: dict[str, Any]
    output_uri: str = ""

    def lines(self) -> list[str]:
        rate = self.video_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        return [
            f"inputs:      {self.inputs}",
            f"clips kept:  {self.kept}",
            f"rejected:    {self.rejected}",
            f"errors:      {self.errors}",
            f"wall time:   {self.wall_seconds:.1f} s",
            f"throughput:  {rate:.2f} video-seconds per second (this run)",
            f"output:      {self.output_uri or self.output}",
        ]


def split_phases(stages: list[Stage]) -> list[tuple[list[Stage], Stage | None]]:
    """Cut the stage list at global phases: [(streaming stages, global stage or None), ...]."""
    phases: list[tuple[list[Stage], Stage | None]] = []
    current: list[Stage] = []
    for stage in stages:
        if stage.global_phase:
            phases.append((current, stage))
            current = []
        else:
            current.append(stage)
    phases.append((current, None))
    return phases


Chunks = Iterable[tuple[int, list[Row]]]  # (input partition, its rows to process)


def _sequential(stages: list[Stage], chunks: Chunks) -> Iterator[list[Row]]:
    """In-process runner: same semantics as the Ray runner, one partition of inputs at a time."""
    for stage in stages:
        stage.setup()
    try:
        for _, batch in chunks:
            for stage in stages:
                out: list[Row] = []
                for j in range(0, len(batch), stage.batch_size):
                    out.extend(apply_stage(stage, batch[j : j + stage.batch_size]))
                batch = out
            yield batch
    finally:
        for stage in stages:
            stage.teardown()


def _rechunk(rows: list[Row], per_partition: int) -> Chunks:
    """Rows gathered at a global phase, cut again into input partitions."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        groups.setdefault(layout.partition_of(row["input_index"], per_partition), []).append(row)
    return sorted(groups.items())


def _run_phases(
    stages: list[Stage], chunks: Chunks, config: RunConfig, backend: Backend, writer: ShardWriter, committer: Committer
) -> None:
    """Stream partitions of inputs through the stages into the writer; the driver only commits
    the writers' manifests.

    A global phase (dedup) is the exception: the rows reaching it are gathered on the driver
    (issue 16 distributes it); rows that failed or were dropped before it are written at once.
    """
    phases = split_phases(stages)
    for n, (streaming, barrier) in enumerate(phases):
        last = barrier is None and n == len(phases) - 1
        if last:
            if backend == "sequential":
                for batch in _sequential(streaming, chunks):
                    for manifest in writer.write(batch):
                        committer.add(manifest)
            else:
                from pipeline.ray_runner import run_on_ray

                for manifest in run_on_ray(streaming, chunks, config, writer):
                    committer.add(manifest)
            return
        batches: Iterable[list[Row]]
        if backend == "sequential":
            batches = _sequential(streaming, chunks)
        else:
            from pipeline.ray_runner import run_on_ray

            batches = run_on_ray(streaming, chunks, config, None)
        gathered: list[Row] = []
        for batch in batches:
            done = [row for row in batch if row.get("error_stage") or row.get("drop_reason")]
            gathered += [row for row in batch if not (row.get("error_stage") or row.get("drop_reason"))]
            for manifest in writer.write(done) if done else []:
                committer.add(manifest)
        assert barrier is not None
        log.info("global phase %s over %d rows (gathered on the driver)", barrier.name, len(gathered))
        if not gathered:
            return
        barrier.setup()
        try:
            rows = apply_stage(barrier, gathered)
        finally:
            barrier.teardown()
        chunks = _rechunk(rows, config.write.inputs_per_partition)


def _stats(store: OutputStore, totals: dict[str, Any], committer: Committer, inputs: int, wall: float,
           config: RunConfig) -> dict:  # fmt: skip
    """stats.json from the markers' aggregates (totals) and this run's manifests (runs[-1])."""
    previous: list[dict[str, Any]] = []
    try:
        if storage.exists(storage.join(store.uri, layout.STATS)):
            previous = json.loads(storage.read_bytes(storage.join(store.uri, layout.STATS))).get("runs", [])
    except (json.JSONDecodeError, AttributeError, OSError):
        previous = []
    run = {
        "started_unix": time.time() - wall,
        "wall_seconds": round(wall, 3),
        "video_seconds": round(committer.video_seconds, 3),
        "clips": {k: v for k, v in committer.counts.items() if v},
        "video_seconds_per_second": round(committer.video_seconds / wall, 3) if wall > 0 else None,
        "clips_per_second": round(sum(committer.counts.values()) / wall, 3) if wall > 0 else None,
        "stages": {
            s: {"seconds": round(committer.stage_seconds[s], 3), "rows": committer.stage_rows[s]}
            for s in committer.stage_seconds
        },
        "partitions_committed": committer.committed,
        "writers": len(committer.writers),
    }
    counts = totals["counts"]
    return {
        "inputs": inputs,
        "videos": {"errored": totals["video_errors"]},
        "clips": {"kept": counts["keep"], "rejected": counts["reject"], "errored": counts["error"] - totals["video_errors"]},
        "drop_reasons": {k: v for k, v in totals["drop_reasons"].items() if v},
        "errors": {k: v for k, v in totals["error_types"].items() if v},
        "transient_errors": totals["transient"],
        "partitions": totals["partitions"],
        "shards": totals["shards"],
        "runs": previous + [run],
        "config": config.model_dump(mode="json"),
    }


def dry_run(input_list: str | Path, config: RunConfig) -> dict[str, Any]:
    """Validate the inputs without processing: ingest, then each download's preflight checks."""
    from pipeline.errors import StageError
    from stages.download import DownloadStage

    rows = read_inputs(input_list)
    checker = DownloadStage(config.download, StageContext())
    outcome: Counter[str] = Counter()
    examples: dict[str, str] = {}
    checked_hosts: dict[str, str | None] = {}
    for row in rows:
        reason = f"{row['error_stage']}/{row['error_type']}" if row.get("error_stage") else None
        if reason is None:
            url = row.get("fetch_url") or row["source_url"]
            host = url.split("/")[2] if "://" in url and not url.startswith("file:") else None
            try:
                if host is not None and host in checked_hosts:
                    reason = checked_hosts[host]
                else:
                    checker.preflight(url)
            except StageError as exc:
                reason = f"download/{exc.error_type}"
            if host is not None:
                checked_hosts[host] = reason
        outcome[reason or "ok"] += 1
        if reason:
            examples.setdefault(reason, row["source_url"])
    return {"inputs": len(rows), "outcomes": dict(outcome), "examples": examples, "stages": config.stages}


def run_pipeline(
    input_list: str | Path,
    output_dir: str | Path,
    config: RunConfig,
    *,
    backend: Backend = "ray",
    retry_errors: bool = False,
) -> RunSummary:
    """Run the whole job into ``output_dir``; a rerun resumes where an earlier run stopped.

    A rerun skips the input partitions with a completion marker; ``retry_errors`` also retries
    the inputs whose earlier failures were transient (rate limits, timeouts, 5xx, out of memory).
    """
    store = OutputStore(output_dir)
    with output_lock(store.uri):  # one live run per output folder (a second is refused)
        return _run_locked(input_list, store, config, backend, retry_errors)


def _run_locked(input_list: str | Path, store: OutputStore, config: RunConfig, backend: Backend,
                retry_errors: bool) -> RunSummary:  # fmt: skip
    started = time.monotonic()
    out = store.root
    if config.staging_dir:
        staging_uri = config.staging_dir if storage.is_remote(config.staging_dir) else str(Path(config.staging_dir).resolve())
    else:
        staging_uri = storage.join(store.uri, layout.STAGING)
    staging = StagingArea(staging_uri)
    saved = out / layout.CONFIG
    text = dump_config(config)
    if saved.exists() and saved.read_text() != text:
        log.warning("config differs from the one saved in %s by an earlier run; resuming with the new one", saved)
    saved.write_text(text)
    store.publish(layout.CONFIG)

    target = OutputTarget(store.uri, config.write)
    remove_uncommitted(target)
    done = committed_partitions(target)
    retry = plan_retry(target) if retry_errors else None
    per = config.write.inputs_per_partition
    expected_rows = {v: len(ks) for v, ks in retry.only_keys.items()} if retry else None
    committer = Committer(target, {}, staging, retry, expected_rows)
    writer = ShardWriter(target, retry.only_keys if retry else None)
    counts = IngestCounts()

    def wanted(p: int, row: Row) -> bool:
        return p not in done or (retry is not None and row["video_id"] in retry.videos.get(p, ()))

    def chunks() -> Iterator[tuple[int, list[Row]]]:
        for p, rows in iter_partitions(input_list, per, wanted, counts):
            committer.expected[p] = len(rows)  # set before any of its rows can be written
            yield p, rows

    log.info("resume: %d partitions committed earlier%s", len(done), f"; {retry.inputs} inputs to retry" if retry else "")
    stages = build_stages(config, StageContext(staging_dir=staging.uri))
    try:
        _run_phases(stages, chunks(), config, backend, writer, committer)
        committer.finish()
    except BaseException:
        log.warning("run interrupted: committed partitions are kept; rerun the same command to resume")
        raise
    n_inputs = counts.inputs
    remove_uncommitted(target)  # files of writer attempts that Ray retried
    totals = finalize(target, out)
    for name in (layout.INDEX, layout.REJECTS, layout.ERRORS):
        store.publish(name)
    wall = time.monotonic() - started
    stats = _stats(store, totals, committer, n_inputs, wall, config)
    tmp = out / f".{layout.STATS}.tmp"
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=False))
    os.replace(tmp, out / layout.STATS)
    store.publish(layout.STATS)
    if not config.write.keep_staging and not staging.remote and committed_partitions(target) >= counts.partitions:
        shutil.rmtree(staging.root / "clips", ignore_errors=True)
    if config.report.enabled:
        try:
            from pipeline.tools.report import write_report

            write_report(out, config.report)
            for f in sorted((out / layout.REPORT).rglob("*")):
                if f.is_file():
                    store.publish(f.relative_to(out).as_posix())
        except Exception:  # noqa: BLE001 - the report is a by-product: never fail a finished run for it
            log.warning("could not write the report under %s/report", out, exc_info=True)
    counts = totals["counts"]
    return RunSummary(
        out, n_inputs, counts["keep"], counts["reject"], counts["error"], wall, committer.video_seconds, stats, store.uri
    )

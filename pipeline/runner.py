"""Run a job: ingest, stages (on Ray Data or in-process), sink, final outputs and stats."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import RunConfig, dump_config
from pipeline.executor import apply_stage
from pipeline.registry import build_stages
from pipeline.sink import OutputStore, ResumeState, Sink, finalize_outputs
from pipeline.stage import Row, Stage, StageContext
from pipeline.storage import StagingArea
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


def _sequential(stages: list[Stage], rows: list[Row], chunk: int = 8) -> Iterator[list[Row]]:
    """In-process runner: same semantics as the Ray runner, one chunk of inputs at a time."""
    for stage in stages:
        stage.setup()
    try:
        for i in range(0, len(rows), chunk):
            batch = rows[i : i + chunk]
            for stage in stages:
                out: list[Row] = []
                for j in range(0, len(batch), stage.batch_size):
                    out.extend(apply_stage(stage, batch[j : j + stage.batch_size]))
                batch = out
            yield batch
    finally:
        for stage in stages:
            stage.teardown()


def _run_phases(stages: list[Stage], rows: list[Row], config: RunConfig, backend: Backend, sink: Sink) -> None:
    """Stream rows through the stages; at a global phase gather every row, apply it, go on.

    Rows that failed or were dropped before a global phase go to the sink at once.
    """
    phases = split_phases(stages)
    for n, (streaming, barrier) in enumerate(phases):
        if not rows:
            return
        last = barrier is None and n == len(phases) - 1
        batches: Iterable[list[Row]]
        if not streaming:
            batches = [rows]
        elif backend == "sequential":
            batches = _sequential(streaming, rows)
        else:
            from pipeline.ray_runner import run_on_ray

            batches = run_on_ray(streaming, rows, config)
        if last:
            for batch in batches:
                sink.add(batch)
            return
        gathered: list[Row] = []
        for batch in batches:
            for row in batch:
                if row.get("error_stage") or row.get("drop_reason"):
                    sink.add([row])
                else:
                    gathered.append(row)
        assert barrier is not None
        log.info("global phase %s over %d rows", barrier.name, len(gathered))
        barrier.setup()
        try:
            rows = apply_stage(barrier, gathered)
        finally:
            barrier.teardown()


def _stats(out_dir: Path, sink: Sink, summary: dict[str, int], inputs: int, wall: float, config: RunConfig) -> dict:
    errors = pq.read_table(out_dir / "errors.parquet").to_pylist()
    rejects = pq.read_table(out_dir / "rejects.parquet", columns=["drop_reason"]).column(0).to_pylist()
    video_errors = [e for e in errors if e["key"] is None]
    previous: list[dict[str, Any]] = []
    stats_path = out_dir / "stats.json"
    if stats_path.exists():
        try:
            previous = json.loads(stats_path.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            previous = []
    run = {
        "started_unix": time.time() - wall,
        "wall_seconds": round(wall, 3),
        "video_seconds": round(sink.video_seconds, 3),
        "clips": dict(sink.counts),
        "video_seconds_per_second": round(sink.video_seconds / wall, 3) if wall > 0 else None,
        "clips_per_second": round(sum(sink.counts.values()) / wall, 3) if wall > 0 else None,
        "stages": {
            s: {"seconds": round(sink.stage_seconds[s], 3), "rows": sink.stage_rows[s]} for s in sink.stage_seconds
        },
    }
    return {
        "inputs": inputs,
        "videos": {"errored": len({e["video_id"] for e in video_errors})},
        "clips": {"kept": summary["kept"], "rejected": summary["rejected"], "errored": summary["errors"] - len(video_errors)},
        "drop_reasons": dict(Counter(rejects)),
        "errors": dict(Counter(f"{e['error_stage']}/{e['error_type']}" for e in errors)),
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
) -> RunSummary:
    """Run the whole job into ``output_dir``; a rerun resumes where an earlier run stopped."""
    started = time.monotonic()
    store = OutputStore(output_dir)
    out = store.root
    if config.staging_dir:
        staging_uri = config.staging_dir if storage.is_remote(config.staging_dir) else str(Path(config.staging_dir).resolve())
    else:
        staging_uri = storage.join(store.uri, "_staging")
    staging = StagingArea(staging_uri)
    saved = out / "config.yaml"
    text = dump_config(config)
    if saved.exists() and saved.read_text() != text:
        log.warning("config differs from the one saved in %s by an earlier run; resuming with the new one", saved)
    saved.write_text(text)
    store.publish("config.yaml")

    state = ResumeState.load(store)
    rows = read_inputs(input_list)
    sink = Sink(store, config.write, state, staging)
    todo: list[Row] = []
    for row in rows:
        if state.video_done(row["video_id"]):
            continue
        if row.get("error_stage"):
            sink.add([row])
        else:
            todo.append(row)
    log.info("%d inputs: %d to process, %d done earlier or unusable", len(rows), len(todo), len(rows) - len(todo))

    stages = build_stages(config, StageContext(staging_dir=staging.uri))
    try:
        _run_phases(stages, todo, config, backend, sink)
        sink.close()
    except BaseException:
        log.warning("run interrupted: keeping finished work; rerun the same command to resume")
        sink.abort()
        raise
    counts = finalize_outputs(store)
    wall = time.monotonic() - started
    stats = _stats(out, sink, counts, len(rows), wall, config)
    tmp = out / ".stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=False))
    os.replace(tmp, out / "stats.json")
    store.publish("stats.json")
    if not config.write.keep_staging and not staging.remote and all(state.video_done(r["video_id"]) for r in rows):
        import shutil

        shutil.rmtree(staging.root / "clips", ignore_errors=True)
    if config.report.enabled:
        try:
            from pipeline.report import write_report

            write_report(out, config.report)
            for f in sorted((out / "report").rglob("*")):
                if f.is_file():
                    store.publish(f.relative_to(out).as_posix())
        except Exception:  # noqa: BLE001 - the report is a by-product: never fail a finished run for it
            log.warning("could not write the report under %s/report", out, exc_info=True)
    return RunSummary(
        out, len(rows), counts["kept"], counts["rejected"], counts["errors"], wall, sink.video_seconds, stats, store.uri
    )

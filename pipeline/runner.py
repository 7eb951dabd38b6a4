"""Run a job: stream the LIST, run the stages (on Ray Data or in-process); workers write, the driver commits."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import layout, storage
from pipeline.blocks import InputBlock, StagedBlock
from pipeline.config import RunConfig, dump_config
from pipeline.errors import ConfigError
from pipeline.executor import apply_stage
from pipeline.ingest import IngestCounts, plan_blocks
from pipeline.lock import output_lock
from pipeline.registry import build_stages
from pipeline.resume import (
    AgainstPartition,
    Committer,
    committed_dataset,
    committed_partitions,
    finalize,
    plan_retry,
    remove_uncommitted,
)
from pipeline.stage import MapFn, Row, Stage, StageContext, map_in_process
from pipeline.storage import OutputStore, StagingArea
from pipeline.writer import OutputTarget, PhaseWriter, ShardWriter

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


Sink = ShardWriter | PhaseWriter


def _sequential(stages: list[Stage], blocks: Iterable[InputBlock], sink: Sink) -> Iterator[dict[str, Any]]:
    """In-process runner: same semantics as the Ray runner, one input partition of a block at a
    time (so shards appear, and a partition commits, as the run goes)."""
    per = sink.target.write.inputs_per_partition
    for stage in stages:
        stage.setup()
    try:
        for block in blocks:
            parts: dict[int, list[Row]] = {}
            for row in block.read():
                parts.setdefault(layout.partition_of(row.get("input_index") or 0, per), []).append(row)
            for batch in parts.values():
                for stage in stages:
                    out: list[Row] = []
                    for j in range(0, len(batch), stage.batch_size):
                        out.extend(apply_stage(stage, batch[j : j + stage.batch_size]))
                    batch = out
                yield from sink.write(batch)
    finally:
        for stage in stages:
            stage.teardown()


def _run_phases(
    stages: list[Stage],
    blocks: Iterable[InputBlock],
    config: RunConfig,
    backend: Backend,
    writer: ShardWriter,
    committer: Committer,
    staging_uri: str,
    against: Callable[[], list[Any]],
) -> dict[str, Any]:
    """Stream the input blocks through the stages into the writer; the driver only commits the
    writers' manifests.

    At a global phase (dedup) the rows stay on the workers: the last task before it stages each
    partition's surviving rows and writes their signals (``PhaseWriter``); the phase decides from
    the signal files alone (``Stage.decide``, its tasks on the workers); then each staged file is
    read back on a worker with the decisions applied (``StagedBlock``) and the next stages stream on.
    Returns each global phase's summary.
    """
    summaries: dict[str, Any] = {}
    phases = split_phases(stages)
    for n, (streaming, barrier) in enumerate(phases):
        sink: Sink = writer if barrier is None else PhaseWriter(writer, staging_uri, n, barrier)
        if backend == "sequential":
            manifests = _sequential(streaming, blocks, sink)
        else:
            from pipeline.ray_runner import run_on_ray

            manifests = run_on_ray(streaming, blocks, config, sink)
        staged: list[dict[str, Any]] = []
        for manifest in manifests:
            if "staged" in manifest:
                staged.append(manifest)
                committer.add_signals(int(manifest["partition"]), manifest["signals"])
            else:
                committer.add(manifest)
        if barrier is None or not staged:
            return summaries
        signal_uris = [writer.target.path(layout.SIGNALS, m["signals"]) for m in staged]
        log.info("global phase %s: deciding over %d rows in %d signal files", barrier.name,
                 sum(m["rows"] for m in staged), len(signal_uris))  # fmt: skip
        if backend == "sequential":
            run_map: MapFn = map_in_process
        else:
            from pipeline.ray_runner import ray_map as run_map
        summary = barrier.decide(signal_uris, against(), run_map)
        log.info("global phase %s: %s", barrier.name, summary)
        summaries[barrier.name] = summary
        blocks = [StagedBlock(m["staged"], int(m["partition"]), int(m["rows"]), barrier) for m in staged]
    return summaries


def _plain(value: Any) -> Any:
    """JSON for what a global phase's summary may hold beyond JSON's types (numpy scalars, sets)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return str(value)


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
    """Validate the inputs without processing: ingest, then each download's preflight checks.

    The LIST is streamed (``stages.ingest.iter_rows``): memory holds the counts, one example per
    outcome and one preflight result per host, not the rows."""
    from pipeline.errors import StageError
    from stages.download import DownloadStage
    from stages.ingest import iter_rows

    inputs = 0
    checker = DownloadStage(config.download, StageContext())
    outcome: Counter[str] = Counter()
    examples: dict[str, str] = {}
    checked_hosts: dict[str, str | None] = {}
    for row in iter_rows(input_list):
        inputs += 1
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
    return {"inputs": inputs, "outcomes": dict(outcome), "examples": examples, "stages": config.stages}


def run_pipeline(
    input_list: str | Path,
    output_dir: str | Path,
    config: RunConfig,
    *,
    backend: Backend = "ray",
    retry_errors: bool = False,
    dedup_against: Sequence[str | Path] = (),
) -> RunSummary:
    """Run the whole job into ``output_dir``; a rerun resumes where an earlier run stopped.

    A rerun skips the input partitions with a completion marker; ``retry_errors`` also retries
    the inputs whose earlier failures were transient (rate limits, timeouts, 5xx, out of memory).
    A global phase (dedup) decides the new clips against the clips the output's earlier runs
    committed and against the outputs in ``dedup_against`` (never modified).
    """
    store = OutputStore(output_dir)
    against = [_earlier_output(d, store.uri) for d in dedup_against]
    with output_lock(store.uri):  # one live run per output folder (a second is refused)
        return _run_locked(input_list, store, config, backend, retry_errors, against)


PLAN_IN_PROCESS_BYTES = 32 << 20  # plan_blocks' scan chunk: a smaller LIST is one scan task anyway


def _list_bytes(input_list: str | Path) -> int:
    try:
        return storage.size(str(input_list))
    except (OSError, ValueError):
        return 0  # plan_blocks reports a missing or unreadable LIST


def _earlier_output(path: str | Path, own: str) -> str:
    """An output named by ``--dedup-against``: an absolute URI, checked to be a finished output."""
    uri = str(path) if storage.is_remote(path) else str(Path(path).resolve())
    if uri.rstrip("/") == own.rstrip("/"):
        raise ConfigError(f"--dedup-against {str(path)[:200]}: that is this run's own output (its earlier runs count anyway)")
    if not storage.exists(storage.join(uri, layout.MARKERS)):
        raise ConfigError(f"--dedup-against {str(path)[:200]}: not an avforge output (no {layout.MARKERS}/ folder)")
    return uri


def _against(own: str, others: list[str], retried: set[str]) -> list[AgainstPartition]:
    """The committed partitions of this output's earlier runs and of the other outputs. Of a
    retried partition, this output's own signals are left out: the retried clips may be there."""
    out: list[AgainstPartition] = []
    for uri in [own, *others]:
        for part in committed_dataset(uri):
            if uri == own and part.partition in retried:
                continue
            out.append(part)
    return out


def _run_locked(input_list: str | Path, store: OutputStore, config: RunConfig, backend: Backend,
                retry_errors: bool, dedup_against: list[str]) -> RunSummary:  # fmt: skip
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

    def blocks() -> Iterator[InputBlock]:
        """The LIST planned as blocks read on the workers (its scan tasks run where the stages do;
        a LIST of one scan chunk is scanned in-process: two Ray jobs would cost more than the scan)."""
        map_fn: MapFn = map_in_process
        if backend != "sequential" and _list_bytes(input_list) > PLAN_IN_PROCESS_BYTES:
            from pipeline.ray_runner import init_ray, ray_map

            init_ray(config)
            map_fn = ray_map
        yield from plan_blocks(input_list, per, done, retry.videos if retry else None, counts,
                               block_rows=config.ray.input_block_rows, map_fn=map_fn, scratch=staging.uri)  # fmt: skip

    def planned() -> Iterator[InputBlock]:
        for block in blocks():
            for p, n in block.partitions.items():  # set before any of its rows can be written
                committer.expected[p] = committer.expected.get(p, 0) + n
            yield block

    log.info("resume: %d partitions committed earlier%s", len(done), f"; {retry.inputs} inputs to retry" if retry else "")
    stages = build_stages(config, StageContext(staging_dir=staging.uri))
    retried = set(retry.videos) if retry else set()
    try:
        phases = _run_phases(stages, planned(), config, backend, writer, committer, staging.uri,
                             lambda: _against(store.uri, dedup_against, retried))  # fmt: skip
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
    stats["runs"][-1]["global_phases"] = phases
    tmp = out / f".{layout.STATS}.tmp"
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=False, default=_plain))
    os.replace(tmp, out / layout.STATS)
    store.publish(layout.STATS)
    if not config.write.keep_staging and not staging.remote and len(committed_partitions(target)) >= counts.partitions:
        shutil.rmtree(staging.root / "clips", ignore_errors=True)
        for phase_dir in staging.root.glob("phase*"):  # rows staged for a global phase: all written now
            shutil.rmtree(phase_dir, ignore_errors=True)
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

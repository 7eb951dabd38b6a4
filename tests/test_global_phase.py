"""A global phase without gathering rows: signals written per partition by the workers, one decision
over the signal files (its tasks through ``run_map``), staged rows read back with the decisions.

The phase here is a small one declared in this test (it keeps the first clip of each ``content_hash``
and drops the others), so these tests check the engine's contract alone: what the workers write,
what the driver sees, what a rerun and ``--dedup-against``-style earlier outputs hand to ``decide``.
The dedup stage's own decisions are tested in tests/test_dedup*.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from pipeline import layout, storage
from pipeline.blocks import RowsBlock
from pipeline.config import RunConfig, WriteConfig
from pipeline.resume import AgainstPartition, Committer, committed_dataset, finalize, iter_markers
from pipeline.runner import _run_phases
from pipeline.stage import MapFn, Row, Stage, StageContext
from pipeline.writer import OutputTarget, ShardWriter


class _Cfg(BaseModel):
    pass


def _decide_file(args: tuple[str, list[str], str]) -> dict[str, Any]:
    """One task: the decisions of one signal file (its rows against the whole run's first keys)."""
    uri, firsts, work = args
    t = pq.read_table(uri)
    first = dict(json.loads(s) for s in firsts)
    rows = []
    for key, h, p in zip(*(t.column(c).to_pylist() for c in ("key", "content_hash", "partition")), strict=True):
        if first[h] != key:
            rows.append({"key": key, "duplicate_of": first[h], "partition": p})
    for p in {r["partition"] for r in rows}:
        part = [r for r in rows if r["partition"] == p]
        pq.write_table(pa.Table.from_pylist(part), Path(work) / f"{p:06d}-{Path(uri).stem}.parquet")
    return {"file": uri, "rows": t.num_rows, "pid": os.getpid()}


class FirstOfHash(Stage[_Cfg]):
    """Keeps the first clip (by key) of each content_hash, and any clip an earlier output holds."""

    name = "dedup"
    global_phase = True
    reads = ("key", "content_hash")
    writes = ("drop_reason", "duplicate_of")
    seen_against: list[AgainstPartition] = []

    def process_batch(self, rows: list[Row]) -> list[Any]:
        raise AssertionError("a global phase is never called with process_batch")

    def phase_signals(self, rows: list[Row]) -> pa.Table:
        return pa.table({"key": [r["key"] for r in rows], "content_hash": [r["content_hash"] for r in rows]})

    def decide(self, signal_uris: list[str], against: Sequence[Any], run_map: MapFn) -> dict[str, Any]:
        FirstOfHash.seen_against = list(against)
        first: dict[str, str] = {}
        for part in against:  # earlier clips win
            for uri in part.signals:
                for k, h in zip(*(pq.read_table(uri).column(c).to_pylist() for c in ("key", "content_hash")), strict=True):
                    first.setdefault(h, k)
        for uri in signal_uris:  # small enough in a test to read here
            t = pq.read_table(uri)
            for k, h in sorted(zip(*(t.column(c).to_pylist() for c in ("key", "content_hash")), strict=True)):
                if h not in first or (k < first[h] and not any(first[h] in _keys(a) for a in against)):
                    first[h] = k
        work = Path(self.context.staging_dir) / "toy"
        work.mkdir(parents=True, exist_ok=True)
        results = run_map(_decide_file, [(u, [json.dumps([h, k]) for h, k in first.items()], str(work)) for u in signal_uris])
        return {"files": len(results), "rows": sum(r["rows"] for r in results), "pids": sorted({r["pid"] for r in results})}

    def apply_partition(self, partition: int, rows: list[Row]) -> list[Any]:
        dup: dict[str, str] = {}
        for f in (Path(self.context.staging_dir) / "toy").glob(f"{partition:06d}-*.parquet"):
            dup.update({r["key"]: r["duplicate_of"] for r in pq.read_table(f).to_pylist()})
        return [{"drop_reason": "duplicate", "duplicate_of": dup[r["key"]]} if r["key"] in dup else {} for r in rows]


def _keys(part: AgainstPartition) -> set[str]:
    return {k for u in part.signals for k in pq.read_table(u).column("key").to_pylist()}


def _rows(videos: list[tuple[int, str, list[str]]]) -> list[Row]:
    """Clip rows of (input_index, video_id, content hash per clip); clip 'x' hashes are failures."""
    rows = []
    for index, vid, hashes in videos:
        for c, h in enumerate(hashes):
            row: Row = {"video_id": vid, "source_url": f"/in/{vid}.mp4", "input_index": index, "key": f"{vid}_{c:04d}",
                        "clip_index": c, "clip_count": len(hashes), "clip_start": 2.0 * c, "clip_end": 2.0 * c + 2,
                        "content_hash": h, "caption": f"clip {c} of {vid}"}  # fmt: skip
            if h == "x":
                row.update(error_stage="extract", error_type="decode_error", error="bad clip")
            rows.append(row)
    return rows


VIDEOS = [(0, "a", ["h1", "h2"]), (1, "b", ["h1", "x"]), (2, "c", ["h3", "h2", "h4"]), (3, "d", ["h4"])]


def _run(out: Path, staging: Path, backend: str, videos: list[tuple[int, str, list[str]]],
         against: list[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    target = OutputTarget(str(out), WriteConfig(inputs_per_partition=2))
    writer = ShardWriter(target)
    committer = Committer(target, {})
    stage = FirstOfHash(_Cfg(), StageContext(staging_dir=str(staging)))
    rows = _rows(videos)
    blocks = []
    for p in sorted({layout.partition_of(i, 2) for i, _, _ in videos}):
        part = [r for r in rows if layout.partition_of(r["input_index"], 2) == p]
        blocks.append(RowsBlock(part, {p: len({r["video_id"] for r in part})}))
    for b in blocks:
        for p, n in b.partitions.items():
            committer.expected[p] = n

    def against_parts() -> list[AgainstPartition]:
        return [a for uri in [str(out), *against] for a in committed_dataset(uri)]

    config = RunConfig.model_validate({"stages": ["download"], "ray": {"num_cpus": 2, "object_store_mb": 200}})
    summaries = _run_phases([stage], blocks, config, backend, writer, committer, str(staging), against_parts)  # type: ignore[arg-type]
    committer.finish()
    totals = finalize(target, out)
    return summaries, totals


@pytest.mark.parametrize("backend", ["sequential", "ray"])
def test_global_phase_decides_from_signal_files_written_by_the_workers(tmp_path: Path, backend: str) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    summaries, totals = _run(out, staging, backend, VIDEOS)
    assert summaries["dedup"]["rows"] == 7 and summaries["dedup"]["files"] == 2  # the failed clip never reached it
    if backend == "ray":  # decide's tasks ran in worker processes, not on the driver
        assert os.getpid() not in summaries["dedup"]["pids"]
    index = pq.read_table(out / layout.INDEX).to_pylist()
    rejects = {r["key"]: r for r in pq.read_table(out / layout.REJECTS).to_pylist()}
    errors = pq.read_table(out / layout.ERRORS).to_pylist()
    assert sorted(r["key"] for r in index) == ["a_0000", "a_0001", "c_0000", "c_0002"]
    assert {k: (r["drop_reason"], r["duplicate_of"]) for k, r in rejects.items()} == {
        "b_0000": ("duplicate", "a_0000"), "c_0001": ("duplicate", "a_0001"), "d_0000": ("duplicate", "c_0002"),
    }  # fmt: skip
    assert [(e["key"], e["error_type"]) for e in errors] == [("b_0001", "decode_error")]
    assert totals["counts"] == {"keep": 4, "reject": 3, "error": 1}
    markers = list(iter_markers(OutputTarget(str(out))))
    assert [m["partition"] for m in markers] == [0, 1]
    for m in markers:  # each partition's signal file is named in its marker and holds its clips that reached the phase
        assert len(m["signals"]) == 1
        sig = pq.read_table(out / layout.SIGNALS / m["signals"][0]).to_pylist()
        assert {r["partition"] for r in sig} == {m["partition"]}
    assert sorted(a.partition for a in committed_dataset(str(out))) == [0, 1]
    # staged rows are files of the phase, named like the signals
    assert sorted(p.name for p in (staging / "phase0").iterdir()) == sorted(m["signals"][0] for m in markers)


def test_a_new_run_decides_against_an_earlier_output_without_touching_it(tmp_path: Path) -> None:
    first, second, staging = tmp_path / "first", tmp_path / "second", tmp_path / "staging"
    first.mkdir()
    second.mkdir()
    _run(first, staging / "1", "sequential", VIDEOS)
    before = sorted((p.relative_to(first).as_posix(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file())
    # e repeats a's first clip (h1), f is new
    _run(second, staging / "2", "sequential", [(0, "e", ["h1"]), (1, "f", ["h9"])], against=[str(first)])
    assert sorted(a.partition for a in FirstOfHash.seen_against) == [0, 1]
    assert all(a.signals and storage.exists(a.signals[0]) for a in FirstOfHash.seen_against)
    rejects = pq.read_table(second / layout.REJECTS).to_pylist()
    assert [(r["key"], r["duplicate_of"]) for r in rejects] == [("e_0000", "a_0000")]
    assert [r["key"] for r in pq.read_table(second / layout.INDEX).to_pylist()] == ["f_0000"]
    after = sorted((p.relative_to(first).as_posix(), p.stat().st_mtime_ns) for p in first.rglob("*") if p.is_file())
    assert after == before

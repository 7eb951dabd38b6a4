"""The writer, the committer and the streamed final files, without Ray or media decoding.

Rows point at small staged files (the writer copies their bytes into the tar as they are), so
these tests check the bookkeeping that lets workers write: deterministic names, a retried
writer attempt that rewrites the same files, files of uncommitted attempts removed, partitions
committed when every video is in, the index streamed from the committed sidecars.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline import layout
from pipeline.config import WriteConfig
from pipeline.resume import Committer, committed_partitions, finalize, remove_uncommitted
from pipeline.storage import StagingArea
from pipeline.writer import OutputTarget, ShardWriter


def _rows(staging: Path, videos: list[tuple[int, str, int]]) -> list[dict[str, Any]]:
    """Clip rows of (input_index, video_id, clips); clip 1 of each video is rejected."""
    rows = []
    for index, vid, clips in videos:
        for c in range(clips):
            key = f"{vid}_{c:04d}"
            audio = staging / "clips" / vid / f"{key}.flac"
            frame = staging / "clips" / vid / f"{key}.0.jpg"
            audio.parent.mkdir(parents=True, exist_ok=True)
            audio.write_bytes(b"flac" + key.encode())
            frame.write_bytes(b"jpeg" + key.encode())
            rows.append({
                "video_id": vid, "source_url": f"/in/{vid}.mp4", "input_index": index, "key": key,
                "clip_index": c, "clip_count": clips, "clip_start": 4.0 * c, "clip_end": 4.0 * c + 4,
                "audio_uri": str(audio), "frame_uris": [str(frame)], "video_duration": 4.0 * clips,
                "drop_reason": "silent" if c == 1 else None,
                "timings": [{"stage": "extract", "seconds": 0.5}],
            })  # fmt: skip
    return rows


def _target(out: Path, **write: Any) -> OutputTarget:
    return OutputTarget(str(out), WriteConfig(max_samples_per_shard=2, inputs_per_partition=2, **write))


def test_writer_names_are_deterministic_and_a_retry_rewrites_them(tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    rows = _rows(staging, [(0, "a", 3), (1, "b", 2), (2, "c", 4)])
    writer = ShardWriter(_target(out))
    first = writer.write(rows)
    assert [m["partition"] for m in first] == [0, 1]  # a and b: partition 0; c: partition 1
    files = sorted(p.name for p in (out / "shards").iterdir())
    again = writer.write(list(reversed(rows)))  # a retried task, rows in another order
    assert [{k: v for k, v in m.items() if k != "writer"} for m in again] == [
        {k: v for k, v in m.items() if k != "writer"} for m in first
    ]
    assert sorted(p.name for p in (out / "shards").iterdir()) == files  # the same names, rewritten
    assert not list((out / "_tmp").iterdir())
    m0 = first[0]
    assert m0["counts"] == {"keep": 3, "reject": 2} and m0["drop_reasons"] == {"silent": 2}
    assert [s["rows"] for s in m0["shards"]] == [2, 1]  # max_samples_per_shard=2
    assert all(n.startswith("000000-") for n in (s["name"] for s in m0["shards"]))
    assert sorted(v[:3] for v in m0["videos"]) == [["a", 3, 3], ["b", 2, 2]]
    tar = out / "shards" / f"{m0['shards'][0]['name']}.tar"
    with tarfile.open(tar) as t:
        names = t.getnames()
    side = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
    assert names == [f"{k}.{e}" for k in ("a_0000", "a_0002") for e in ("flac", "0.jpg", "json", "txt")]
    assert [r["key"] for r in side] == ["a_0000", "a_0002"] and {r["shard"] for r in side} == {tar.name}


def test_only_committed_files_survive_and_partitions_commit_when_complete(tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    target = _target(out)
    rows = _rows(staging, [(0, "a", 3), (1, "b", 2), (2, "c", 4)])
    writer = ShardWriter(target)
    committer = Committer(target, {0: 2, 1: 1}, StagingArea(str(staging)))
    # partition 0 arrives in two writer calls (its clips spread over two tasks)
    part_a = [r for r in rows if r["video_id"] == "a"]
    for m in writer.write(part_a[:2]) + writer.write(part_a[2:]):
        committer.add(m)
    assert committed_partitions(target) == set()  # b is not in yet
    assert not (staging / "clips" / "a").exists()  # a is complete: its staged media are gone
    for m in writer.write([r for r in rows if r["video_id"] == "b"]):
        committer.add(m)
    assert committed_partitions(target) == {0}
    # a writer attempt killed mid-write: its tar is published, its sidecar is not
    c_rows = [r for r in rows if r["video_id"] == "c"]
    (orphan,) = writer.write(c_rows[:1])
    orphan_side = out / "shards" / f"{orphan['shards'][0]['name']}.parquet"
    orphan_side.unlink()
    assert remove_uncommitted(target) == 1  # the orphan tar
    assert sorted(p.stem for p in (out / "shards").glob("*.tar")) == sorted(
        p.stem for p in (out / "shards").glob("*.parquet")
    )
    for m in writer.write(c_rows):  # the retry writes partition 1 whole
        committer.add(m)
    assert committed_partitions(target) == {0, 1}
    marker = json.loads((out / "_markers" / "000000.json").read_text())
    assert marker["counts"] == {"keep": 3, "reject": 2} and len(marker["writers"]) == 1

    totals = finalize(target, out)
    index = pq.read_table(out / layout.INDEX).to_pylist()
    rejects = pq.read_table(out / layout.REJECTS).to_pylist()
    assert sorted(r["key"] for r in index) == ["a_0000", "a_0002", "b_0000", "c_0000", "c_0002", "c_0003"]
    assert sorted(r["key"] for r in rejects) == ["a_0001", "b_0001", "c_0001"]
    assert totals["counts"] == {"keep": 6, "reject": 3} and totals["partitions"] == 2
    assert pq.read_table(out / layout.ERRORS).num_rows == 0


def test_a_partition_with_missing_rows_commits_at_the_end_of_the_stream(tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    target = _target(out)
    committer = Committer(target, {0: 2, 1: 1})  # partition 1's only video made no rows at all
    for m in ShardWriter(target).write(_rows(staging, [(0, "a", 1), (1, "b", 1)])):
        committer.add(m)
    assert committed_partitions(target) == {0}
    committer.finish()
    assert committed_partitions(target) == {0, 1}
    assert json.loads((out / "_markers" / "000001.json").read_text())["shards"] == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_writer_output_is_strict_json(tmp_path: Path, bad: float) -> None:
    out, staging = tmp_path / "out", tmp_path / "staging"
    rows = _rows(staging, [(0, "a", 1)])
    rows[0]["audio_rms_db"] = bad
    (m,) = ShardWriter(_target(out)).write(rows)
    with tarfile.open(out / "shards" / f"{m['shards'][0]['name']}.tar") as t:
        doc = json.loads(t.extractfile("a_0000.json").read(), parse_constant=lambda c: pytest.fail(c))  # type: ignore[union-attr]
    assert doc["audio_rms_db"] is None


def test_a_second_live_run_on_one_output_is_refused(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.lock import OutputLockedError, output_lock
    from pipeline.runner import run_pipeline

    inputs = tmp_path / "l.txt"
    inputs.write_text(str(tmp_path / "missing.mp4") + "\n")
    cfg = load_config(None, ["stages=[download]", "report.enabled=false"])
    out = tmp_path / "out"
    with output_lock(out), pytest.raises(OutputLockedError):
        run_pipeline(inputs, out, cfg, backend="sequential")
    summary = run_pipeline(inputs, out, cfg, backend="sequential")  # released: runs
    assert summary.errors == 1 and not (out / ".avforge.lock").exists()

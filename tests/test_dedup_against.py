"""Incremental datasets: ``avforge run --dedup-against DIR`` over real media, through the CLI.

A first run ships two videos. A second run gets copies and re-encodes of them (a byte copy under
another name, a half-resolution low-bitrate re-encode, a crop, a mirror) and two videos of the same
kind that are genuinely new: it must ship only the new ones, mark each copy ``duplicate_of`` a key of
the first run, and leave the first output untouched. A rerun of the second job into its own output
then adds nothing: its committed clips count as earlier clips too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import layout
from pipeline.tools.samples import synth_video
from tests.test_dedup import KINDS, _transform

STAGES = "stages=[download,split,extract,quality,fingerprint,dedup]"
# one input per partition, so a rerun's new line is a partition of its own
SETS = [STAGES, "write.inputs_per_partition=1", "split.mode=whole", "split.max_clip_seconds=20", "extract.frames_per_clip=2", "report.enabled=false"]


def _avforge(inputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--input", str(inputs), "--output", str(out),
           "--backend", "sequential", *extra]  # fmt: skip
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _list(path: Path, records: list[tuple[str, Path]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "url": str(p)}) + "\n" for i, p in records))
    return path


def _files(root: Path) -> list[tuple[str, int, int]]:
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("against_media")
    out: dict[str, Path] = {}
    for i in range(2):
        src = root / f"old{i}.mp4"
        synth_video(src, duration=8.0, n_scenes=3, seed=900 + i, scene_kinds=KINDS[i])
        out[f"old{i}"] = src
        new = root / f"new{i}.mp4"  # the same kind of video, other content
        synth_video(new, duration=8.0, n_scenes=3, seed=950 + i, scene_kinds=KINDS[i])
        out[f"new{i}"] = new
    for name, src in (("copy", "old0"), ("lowres", "old0"), ("crop", "old1"), ("mirror", "old1")):
        dst = root / f"{src}_{name}.mp4"
        _transform(out[src], name, dst)
        out[f"{src}_{name}"] = dst
    return out


def test_second_run_ships_only_new_videos_and_leaves_the_first_output_alone(media: dict[str, Path], tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    r = _avforge(_list(tmp_path / "first.jsonl", [("old0", media["old0"]), ("old1", media["old1"])]), first)
    assert r.returncode == 0, r.stderr[-3000:]
    old_keys = set(pq.read_table(first / layout.INDEX).column("key").to_pylist())
    assert len(old_keys) == 2
    assert list((first / layout.SIGNALS).glob("*.parquet"))  # kept in the output for later runs
    before = _files(first)

    copies = ["old0_copy", "old0_lowres", "old1_crop", "old1_mirror"]
    inputs = _list(tmp_path / "second.jsonl", [(c, media[c]) for c in copies] + [("new0", media["new0"]), ("new1", media["new1"])])
    r = _avforge(inputs, second, "--dedup-against", str(first))
    assert r.returncode == 0, r.stderr[-3000:]
    index = pq.read_table(second / layout.INDEX).to_pylist()
    rejects = pq.read_table(second / layout.REJECTS).to_pylist()
    assert sorted(row["video_id"] for row in index) == ["new0", "new1"]
    dups = {row["video_id"]: row["duplicate_of"] for row in rejects if row["drop_reason"] == "duplicate"}
    assert set(dups) == set(copies)
    assert all(d in old_keys for d in dups.values())
    assert dups["old0_copy"].startswith("old0") and dups["old1_crop"].startswith("old1")
    assert _files(first) == before  # the earlier output is never modified

    # a rerun into the same output with a new input: the committed clips are earlier clips too
    more = _list(tmp_path / "third.jsonl", [(c, media[c]) for c in copies] + [("new0", media["new0"]), ("new1", media["new1"]),
                                            ("again", media["new1"])])  # fmt: skip
    r = _avforge(more, second, "--dedup-against", str(first))
    assert r.returncode == 0, r.stderr[-3000:]
    rejects = pq.read_table(second / layout.REJECTS).to_pylist()
    again = [row for row in rejects if row["video_id"] == "again"]
    assert len(again) == 1 and again[0]["duplicate_of"].startswith("new1")
    assert sorted(row["video_id"] for row in pq.read_table(second / layout.INDEX).to_pylist()) == ["new0", "new1"]


def test_dedup_against_refuses_what_is_not_an_output(tmp_path: Path) -> None:
    inputs = _list(tmp_path / "in.jsonl", [])
    r = _avforge(inputs, tmp_path / "out", "--dedup-against", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not an avforge output" in r.stderr

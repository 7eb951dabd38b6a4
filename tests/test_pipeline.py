"""End to end: real Ray, yt-dlp from a loopback server, shards read back with webdataset."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.config import load_config
from pipeline.runner import run_pipeline


def _accounting(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    return index, rejects, errors


def _inputs(media_server: str, corpus_dir: Path, tmp: Path) -> Path:
    lines = [
        {"url": f"{media_server}/sample_000.mp4", "id": "clip.one/ä", "title": "first", "channel": "synth"},
        {"url": f"{media_server}/sample_001.mp4", "id": "two", "title": "second"},
        {"url": str(corpus_dir / "sample_002.mp4"), "id": "three"},
        {"url": f"{media_server}/missing.mp4", "id": "gone"},
        {"url": f"{media_server}/bad/html_page.mp4", "id": "html"},
        {"url": f"{media_server}/bad/video_no_audio.mp4", "id": "mute"},
        {"url": f"{media_server}/sample_001.mp4", "id": "two"},
    ]
    f = tmp / "inputs.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    return f


@pytest.mark.timeout(300)
def test_end_to_end_on_ray(media_server: str, corpus_dir: Path, tmp_path: Path) -> None:
    inputs = _inputs(media_server, corpus_dir, tmp_path)
    out = tmp_path / "out"
    cfg = load_config(None, ["split.clip_seconds=4", "split.min_clip_seconds=1", "split.max_clip_seconds=6",
                             "extract.frames_per_clip=3", "ray.num_cpus=4", "write.max_samples_per_shard=4",
                             "download.allowed_hosts=[127.0.0.1]"])  # fmt: skip
    summary = run_pipeline(inputs, out, cfg, backend="ray")
    index, rejects, errors = _accounting(out)

    # every input is accounted for
    assert summary.inputs == 7
    by_video = {r["video_id"] for r in index} | {r["video_id"] for r in rejects} | {r["video_id"] for r in errors}
    assert len(by_video) == 7
    err_types = {(e["video_id"], e["error_stage"], e["error_type"]) for e in errors}
    assert ("gone", "download", "not_found") in err_types
    assert ("html", "download", "not_a_video") in err_types
    assert any(t[1:] == ("ingest", "duplicate_input") for t in err_types)
    assert {r["drop_reason"] for r in rejects if r["video_id"] == "mute"} == {"no_audio"}

    # shards: deterministic names (partition and a digest of their keys), rolled by count,
    # each named by a partition's completion marker, no temp files left
    tars = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert all(re.fullmatch(r"\d{6}-[0-9a-f]{12}\.tar", t) for t in tars) and len(tars) >= 2
    assert not list((out / "shards").glob(".*")) and not (out / "_tmp").exists()
    committed = [json.loads(m.read_text()) for m in sorted((out / "_markers").glob("*.json"))]
    assert len(committed) == 1  # 7 inputs, 8 per partition
    assert sorted(s["name"] + ".tar" for m in committed for s in m["shards"]) == tars
    assert len(index) == summary.kept > 6
    keys = [r["key"] for r in index]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)

    # read everything back with webdataset and compare with the index
    urls = [str(out / "shards" / t) for t in tars]
    rows = {r["key"]: r for r in index}
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        key = sample["__key__"]
        meta = sample["json"]
        row = rows[key]
        assert meta["key"] == key and meta["source_url"] == row["source_url"]
        assert meta["clip_start"] == row["clip_start"] and meta["clip_end"] == row["clip_end"]
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16000 and np.asarray(audio).ndim == 1
        assert abs(len(audio) / rate - (row["clip_end"] - row["clip_start"])) < 0.01
        frames = [sample[f"{i}.jpg"] for i in range(3)]
        assert all(isinstance(f, Image.Image) and min(f.size) <= 256 for f in frames)
        assert "txt" in sample
        if row["video_id"] == "clip_one_-" + row["video_id"].split("-")[-1]:
            assert meta["metadata"] == {"title": "first", "channel": "synth"}
        seen += 1
    assert seen == len(index)

    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == 7 and stats["clips"]["kept"] == len(index)
    assert {"download", "split", "extract", "quality"} <= set(stats["runs"][-1]["stages"])
    assert (out / "config.yaml").read_text().startswith("stages:")

    # a rerun on the same output resumes: nothing new, nothing duplicated
    again = run_pipeline(inputs, out, cfg, backend="ray")
    index2, rejects2, errors2 = _accounting(out)
    assert index2 == index and len(rejects2) == len(rejects) and len(errors2) == len(errors)
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == tars
    assert again.stats["runs"][-1]["clips"] == {}


def test_shard_json_is_complete(corpus_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text(str(corpus_dir / "sample_000.mp4") + "\n")
    out = tmp_path / "o"
    run_pipeline(f, out, load_config(None, ["extract.frames_per_clip=2"]), backend="sequential")
    tar = next((out / "shards").glob("*.tar"))
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False)))
    meta = json.load(io.BytesIO(sample["json"]))
    for field in ("key", "video_id", "source_url", "clip_start", "clip_end", "width", "height", "fps",
                  "has_audio", "audio_rms_db", "silence_ratio", "black_ratio", "frozen_ratio", "frame_times",
                  "transcript", "audio_tags", "visual_tags", "captions", "scores", "metadata", "schema_version"):
        assert field in meta, field
    assert "audio_uri" not in meta and "local_path" not in meta  # staging paths never leak


def test_shards_roll_by_size(corpus_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text(str(corpus_dir / "sample_000.mp4") + "\n" + str(corpus_dir / "sample_001.mp4") + "\n")
    out = tmp_path / "o"
    cfg = load_config(None, ["split.clip_seconds=3", "split.min_clip_seconds=1", "split.max_clip_seconds=4",
                             "write.max_shard_mb=0.05", "report.enabled=false"])  # fmt: skip
    summary = run_pipeline(f, out, cfg, backend="sequential")
    tars = sorted((out / "shards").glob("*.tar"))
    assert len(tars) == summary.kept > 2  # every sample is over 50 KB: one per shard
    names = [pq.read_table(t.with_suffix(".parquet"), columns=["shard"]).column(0).to_pylist() for t in tars]
    assert names == [[t.name] for t in tars]

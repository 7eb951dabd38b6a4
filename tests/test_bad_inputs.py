"""The bad-input list of the foundation issue: each gets a typed error or reject, the job finishes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.runner import run_pipeline


@pytest.mark.timeout(300)
def test_every_bad_input_is_accounted_for(media_server: str, corpus_dir: Path, bad_dir: Path, tmp_path: Path) -> None:
    good = str(corpus_dir / "sample_000.mp4")
    cases = {
        "http404": (f"{media_server}/nothing_here.mp4", "error", "download/not_found"),
        "zero": (str(bad_dir / "zero_bytes.mp4"), "error", "download/empty_file"),
        "html": (str(bad_dir / "html_page.mp4"), "error", "download/not_a_video"),
        "random": (str(bad_dir / "random_bytes.mp4"), "error", "download/not_a_video"),
        "truncated": (str(bad_dir / "truncated.mp4"), "error", "corrupt_media"),
        "audio_only": (str(bad_dir / "audio_only.m4a"), "reject", "no_video"),
        "no_audio": (str(bad_dir / "video_no_audio.mp4"), "reject", "no_audio"),
        "tiny": (str(bad_dir / "tiny_0_3s.mp4"), "reject", "too_short"),
        "dots.and/slashes ü": (good, "keep", None),
        "dup": (good, "keep", None),
    }
    lines = [{"url": url, "id": vid} for vid, (url, _, _) in cases.items()]
    lines.append({"url": good, "id": "dup"})  # a duplicate id
    lines.append({"url": "definitely not a url", "id": "words"})
    f = tmp_path / "inputs.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    out = tmp_path / "out"
    summary = run_pipeline(f, out, load_config(None, ["split.min_clip_seconds=1", "download.allow_private_addresses=true"]), backend="sequential")
    assert summary.inputs == len(lines)

    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    by_vid = {r["video_id"]: r for r in errors}
    errors_by_url = {r["source_url"]: r for r in errors}
    assert errors_by_url[cases["http404"][0]]["error_type"] == "not_found"
    for name in ("zero", "html", "random"):
        e = errors_by_url[cases[name][0]]
        assert f"{e['error_stage']}/{e['error_type']}" == cases[name][2], e
    trunc = [e for e in errors if e["source_url"] == cases["truncated"][0]]
    assert trunc and all(e["error_type"] == "corrupt_media" for e in trunc)
    reject_reasons = {r["source_url"]: r["drop_reason"] for r in rejects}
    for name in ("audio_only", "no_audio", "tiny"):
        assert reject_reasons[cases[name][0]] == cases[name][2]
    dup = [e for e in errors if e["error_type"] == "duplicate_input"]
    assert len(dup) == 1 and dup[0]["error_stage"] == "ingest"
    words = [e for e in errors if e["source_url"] == "definitely not a url"]
    assert words and words[0]["error_type"] == "invalid_input"
    odd = [r for r in index if r["video_id"].startswith("dots_and_slashes")]
    assert odd and all(r["key"].isascii() and "." not in r["key"] and "/" not in r["key"] for r in odd)
    # every input line is somewhere
    accounted = {r["video_id"] for r in index} | {r["video_id"] for r in rejects} | set(by_vid)
    assert len(accounted) == len(lines)


def test_empty_list_finishes(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n# nothing here\n")
    summary = run_pipeline(f, tmp_path / "out", load_config(None, []), backend="sequential")
    assert (summary.inputs, summary.kept, summary.errors) == (0, 0, 0)
    assert pq.read_table(tmp_path / "out" / "index.parquet").num_rows == 0
    assert (tmp_path / "out" / "stats.json").exists()


@pytest.mark.timeout(600)
def test_hostile_list_lines_through_the_cli(corpus_dir: Path, tmp_path: Path) -> None:
    """A LIST with a BOM, CRLF, a non-UTF-8 line, a 300-character file name, a 5,000-character path,
    a NUL byte and an rtsp:// URL: one error row each, the good line is processed, no traceback."""
    import subprocess
    import sys

    good = str(corpus_dir / "sample_000.mp4").encode()
    lines = [
        b"\xef\xbb\xbf" + good,
        b"/tmp/caf\xe9.mp4",
        b"a" * 300 + b".mp4",
        b"/" + b"/".join([b"d" * 99] * 50) + b"/x.mp4",
        b"/tmp/nul\x00byte.mp4",
        b"rtsp://127.0.0.1/cam",
    ]
    listing = tmp_path / "hostile.txt"
    listing.write_bytes(b"\r\n".join(lines) + b"\r\n")
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", str(listing), "--output", str(out), "--recipe", "media",
         "--backend", "sequential", "--set", "split.min_clip_seconds=1"],
        capture_output=True, text=True, timeout=540,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    by_type = sorted((e["error_stage"], e["error_type"]) for e in errors if e["error_stage"] == "ingest")
    assert by_type == [("ingest", "invalid_input")] * 4 + [("ingest", "unsupported_scheme")], by_type
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert any(r["source_url"] == good.decode() for r in index + rejects)

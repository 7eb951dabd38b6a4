"""``avforge bench`` runs end to end and reports what it promises (the figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tools.bench import format_table, run_bench
from pipeline.tools.samples import parse_size


def test_parse_size() -> None:
    assert parse_size("1280x720") == (1280, 720)
    with pytest.raises(ValueError, match="1280x720"):
        parse_size("720p")


@pytest.mark.timeout(300)
def test_bench_reports_floor_memory_cpu_and_stages(tmp_path: Path) -> None:
    results = run_bench(tmp_path, count=1, scales=[1], backend="sequential", size=(160, 120))
    (entry,) = results["scales"]
    assert results["corpus"]["size"] == "160x120"
    assert entry["videos"] == 1 and entry["clips_kept"] >= 1 and entry["errors"] == 0
    assert entry["video_seconds"] > 10
    assert all(v > 0 for v in entry["ffmpeg_decode_floor_seconds"].values())
    assert entry["ratio_to_floor"] == pytest.approx(
        entry["wall_seconds"] / min(entry["ffmpeg_decode_floor_seconds"].values()), rel=0.05
    )
    assert entry["peak_rss_mb"] > 50 and entry["cpu_seconds"] > 0
    assert {"download", "split", "extract"} <= set(entry["stage_seconds"])
    assert (tmp_path / "out_x1" / "report" / "index.html").is_file()
    assert json.loads((tmp_path / "bench.json").read_text()) == results
    table = format_table(results)
    assert "160x120" in table and "per stage" in table

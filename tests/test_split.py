from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import SplitConfig
from pipeline.errors import StageError
from stages.split import SplitStage, fixed_windows, shot_windows


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (1.0, []),  # shorter than min_clip_seconds
        (5.0, [(0.0, 5.0)]),
        (10.0, [(0.0, 10.0)]),
        (11.0, [(0.0, 11.0)]),  # tail merged, stays under max
        (25.0, [(0.0, 10.0), (10.0, 25.0)]),  # tail of 5 s merged into the 2nd window (15 <= 20)
        (32.0, [(0.0, 10.0), (10.0, 20.0), (20.0, 32.0)]),
    ],
)
def test_fixed_windows(duration: float, expected: list[tuple[float, float]]) -> None:
    assert fixed_windows(0.0, duration, 10.0, 2.0, 20.0) == expected


def test_fixed_windows_cover_without_gaps_and_respect_bounds() -> None:
    for duration in [2.0, 7.3, 19.9, 20.1, 33.3, 101.7]:
        for overlap in (0.0, 2.0):
            w = fixed_windows(0.0, duration, 8.0, 2.0, 12.0, overlap)
            assert w[0][0] == 0.0 and abs(w[-1][1] - duration) < 1e-6
            for (a, b), (c, _) in zip(w[:-1], w[1:]):
                assert c <= b + 1e-6  # no gap
                assert abs((b - c) - overlap) < 1e-6 or c == b
            assert all(2.0 - 1e-6 <= b - a <= 12.0 + 1e-6 for a, b in w)


def test_shot_windows_follow_cuts() -> None:
    clips = shot_windows(30.0, [3.0, 3.3, 9.0], clip=10.0, min_len=2.0, max_len=12.0)
    # [0,3] kept, [3,3.3] too short, [3.3,9] kept, [9,30] (21 s) windowed
    assert [(a, b) for a, b, _ in clips] == [(0.0, 3.0), (3.3, 9.0), (9.0, 19.0), (19.0, 30.0)]


def _row(path: Path, vid: str = "v") -> dict:
    return {"video_id": vid, "source_url": str(path), "input_index": 0, "local_path": str(path)}


def test_split_stage_fixed_on_real_video(corpus_dir: Path) -> None:
    sample = json.loads((corpus_dir / "manifest.jsonl").read_text().splitlines()[0])
    path = corpus_dir / sample["path"]
    stage = SplitStage(SplitConfig(clip_seconds=3.0, min_clip_seconds=1.0, max_clip_seconds=5.0))
    (children,) = stage.process_batch([_row(path)])
    assert [c["key"] for c in children] == [f"v_{i:04d}" for i in range(len(children))]
    assert all(c["clip_count"] == len(children) for c in children)
    assert children[0]["has_audio"] and children[0]["has_video"]
    assert abs(children[-1]["clip_end"] - sample["duration"]) < 0.1


def test_split_stage_shots_uses_true_cuts(corpus_dir: Path) -> None:
    sample = json.loads((corpus_dir / "manifest.jsonl").read_text().splitlines()[1])
    path = corpus_dir / sample["path"]
    stage = SplitStage(SplitConfig(mode="shots", clip_seconds=10.0, min_clip_seconds=0.5, max_clip_seconds=20.0))
    (children,) = stage.process_batch([_row(path)])
    starts = [c["clip_start"] for c in children[1:]]
    assert len(starts) == len(sample["cut_times"])
    for found, true in zip(starts, sample["cut_times"]):
        assert abs(found - true) <= 0.1


def test_split_too_short_and_unreadable(bad_dir: Path) -> None:
    stage = SplitStage(SplitConfig())
    (tiny,) = stage.process_batch([_row(bad_dir / "tiny_0_3s.mp4")])
    assert len(tiny) == 1 and tiny[0]["drop_reason"] == "too_short" and tiny[0]["key"] == "v_0000"
    res = stage.process_batch([_row(bad_dir / "html_page.mp4"), _row(bad_dir / "random_bytes.mp4")])
    assert all(isinstance(r, StageError) for r in res)
    assert [r.error_type for r in res] == ["not_a_video", "not_a_video"]

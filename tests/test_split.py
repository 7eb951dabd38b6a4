from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_video
from stages._vad import Pause
from stages.split import SplitStage, fixed_windows, nearest_pause_point, shot_windows, snap_windows
from tests.bench.split_bench import spoken, talk_video, voiced_spans, word_stream


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


# ---------------------------------------------------------------- cuts moved into pauses (fixed mode)


def test_snap_windows_moves_cuts_into_the_nearest_pause_within_bounds() -> None:
    pauses = [Pause(a, b, (a + b) / 2) for a, b in [(8.5, 9.0), (11.8, 12.4), (19.0, 19.05), (23.0, 23.5)]]

    def near(lo: float, hi: float) -> list[Pause]:
        return [p for p in pauses if p.end > lo and p.start < hi]

    windows = [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 37.0)]
    out = snap_windows(windows, near, tolerance=2.0, min_len=2.0, max_len=20.0)
    # 10 -> the middle of the long pause at 8.5-9.0 (0.5 s: shorter than two margins); 20 -> only a
    # short gap (19.0-19.05) in reach: its middle; 30 -> nothing within 2 s: stays
    assert out == [(0.0, 8.75), (8.75, 19.025), (19.025, 30.0), (30.0, 37.0)]
    assert snap_windows(windows, near, tolerance=0.0, min_len=2.0, max_len=20.0) == windows
    # length bounds win over pauses: with max_len 10.5 the second clip cannot start at 8.92
    tight = snap_windows(windows, near, tolerance=2.0, min_len=9.5, max_len=10.5)
    assert all(9.5 - 1e-6 <= b - a <= 10.5 + 1e-6 for a, b in tight[:-1])
    # overlapping windows move their starts and ends alike, in order
    lapped = snap_windows([(0.0, 10.0), (8.0, 18.0), (16.0, 26.0)], near, 2.0, 2.0, 20.0)
    assert lapped[0][1] == 8.75 and lapped[1][0] == 8.75 and lapped[2][0] == 16.0
    assert all(a < b for a, b in lapped)


@pytest.fixture(scope="module")
def speech_over_tone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[float, float]]]:
    """A 30 s video whose speech (espeak-ng, over a quiet tone) covers 10 s and 20 s, the fixed cuts."""
    root = tmp_path_factory.mktemp("snap")
    rate = 16000
    texts = [
        "The river flows slowly through the valley before it reaches the sea.",
        "Please remember to save your work before closing the application.",
        "Turn left at the second traffic light and the museum is on your right.",
        "Scientists have discovered a new species of frog in the rainforest.",
        "Mix the blue and yellow paint to get a soft shade of green.",
        "Lower the sail and steer the boat into the wind.",
    ]
    clips = [spoken(text, root) for text in texts]  # espeak-ng, trimmed to the voiced part
    lengths = [len(c) / rate for c in clips]
    starts = [0.0] * len(clips)
    starts[1] = 10.0 - lengths[1] / 2  # centred on the 10 s cut
    starts[0] = starts[1] - 0.5 - lengths[0]
    starts[2] = starts[1] + lengths[1] + 0.5
    starts[3] = max(20.0 - lengths[3] / 2, starts[2] + lengths[2] + 0.4)  # covers the 20 s cut
    starts[4] = starts[3] + lengths[3] + 0.5
    starts[5] = starts[4] + lengths[4] + 0.6
    assert starts[0] > 0.3 and starts[3] < 20.0 < starts[3] + lengths[3]
    total = max(starts[5] + lengths[5] + 1.0, 31.0)
    speech = np.zeros(int(total * rate), np.float32)
    for s, c in zip(starts, clips, strict=True):
        speech[int(s * rate) : int(s * rate) + len(c)] += c
    voiced = voiced_spans(speech, rate)
    video = talk_video(root / "talk.mp4", speech)  # over a quiet tone
    return video, voiced


def _cuts(children: list[dict]) -> list[float]:
    return [c["clip_start"] for c in children[1:]]


def test_fixed_cuts_never_fall_inside_speech(speech_over_tone: tuple[Path, list[tuple[float, float]]]) -> None:
    video, voiced = speech_over_tone

    def inside(t: float) -> bool:
        return any(a < t < b for a, b in voiced)

    plain = SplitStage(SplitConfig(snap_to_silence=False)).process_batch([_row(video)])[0]
    assert _cuts(plain) == [10.0, 20.0] and all(inside(t) for t in _cuts(plain))  # the test is meaningful
    stage = SplitStage(SplitConfig())  # snap_to_silence=True, 2 s tolerance
    (children,) = stage.process_batch([_row(video)])
    cuts = _cuts(children)
    assert len(cuts) == 2
    for cut, planned in zip(cuts, (10.0, 20.0), strict=True):
        assert not inside(cut), (cut, voiced)
        assert abs(cut - planned) <= 2.0
    for a, b in zip(children[:-1], children[1:]):
        assert a["clip_end"] == b["clip_start"]  # still contiguous
    assert [c["key"] for c in children] == ["v_0000", "v_0001", "v_0002"]
    (again,) = stage.process_batch([_row(video)])
    assert _cuts(again) == cuts  # deterministic: same input, same cuts, same keys


def test_a_short_pause_is_cut_at_its_quietest_point() -> None:
    # a quiet run holding a word's faint end (21.75-21.98) and the gap after it (quietest at 22.03)
    merged = Pause(21.75, 22.08, 22.03)
    assert nearest_pause_point(20.0, [merged], 18.0, 22.5) == 22.03
    assert nearest_pause_point(20.0, [merged], 18.0, 21.9) == 21.9  # bounds win: clamped into [lo, hi]
    long = Pause(8.0, 9.0, 8.3)  # a long pause: the point nearest the cut, 0.25 s inside it
    assert nearest_pause_point(10.0, [long], 8.0, 12.0) == 8.75


def test_a_sentence_gap_at_the_edge_of_reach_beats_a_pause_inside_a_sentence() -> None:
    # the fixed cut at 10 s; within 2 s only a 0.2 s break between two words (9.92-10.12) and the
    # start of a 0.6 s gap between sentences (11.84-12.45) whose 0.25 s margin lies out of reach
    pauses = [Pause(9.92, 10.12, 10.02), Pause(11.84, 12.45, 12.38)]

    def near(lo: float, hi: float) -> list[Pause]:
        return [p for p in pauses if p.end > lo and p.start < hi]

    (first, second) = snap_windows([(0.0, 10.0), (10.0, 24.0)], near, tolerance=2.0, min_len=2.0, max_len=20.0)
    assert first[1] == second[0]
    assert 11.84 + 0.1 - 1e-6 <= first[1] <= 12.0  # in the sentence gap, at least 0.1 s inside it
    assert nearest_pause_point(10.0, [Pause(11.95, 12.45, 12.3)], 8.0, 12.0) is None  # < 0.1 s of it in reach


@pytest.fixture(scope="module")
def no_pauses(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[float, float]]]:
    """32 s of words spoken one by one 0.1 s apart (no longer pause), over a quiet tone; word times known."""
    path, words, _ = word_stream(tmp_path_factory.mktemp("no_pauses") / "words.mp4", 32.0)
    return path, words


def test_speech_without_pauses_is_cut_between_words(no_pauses: tuple[Path, list[tuple[float, float]]]) -> None:
    video, words = no_pauses
    cfg = SplitConfig()  # 10 s clips, at most 20 s: no pause in reach of a cut but gaps between words
    plain = SplitStage(cfg.model_copy(update={"snap_to_silence": False})).process_batch([_row(video)])[0]
    assert sum(any(a < t < b for a, b in words) for t in _cuts(plain)) >= 2  # plain cuts hit words
    (children,) = SplitStage(cfg).process_batch([_row(video)])
    cuts = _cuts(children)
    assert len(cuts) == len(_cuts(plain)) == 2
    for cut, planned in zip(cuts, _cuts(plain), strict=True):
        assert abs(cut - planned) <= cfg.snap_tolerance_seconds + 1e-6
        assert not any(a < cut < b for a, b in words), (cut, [w for w in words if abs(w[0] - cut) < 1])
    assert all(2.0 - 1e-6 <= c["clip_end"] - c["clip_start"] <= 20.0 + 1e-6 for c in children)


@pytest.mark.parametrize("music", [True, False], ids=["melody", "noise_hum"])
def test_cuts_stay_fixed_without_speech(tmp_path: Path, music: bool) -> None:
    video = synth_video(tmp_path / "bed.mp4", duration=31.0, speech=[], music=music, seed=7)
    plain = SplitStage(SplitConfig(snap_to_silence=False)).process_batch([_row(video.path)])[0]
    (snapped,) = SplitStage(SplitConfig()).process_batch([_row(video.path)])
    assert _cuts(plain) == [10.0, 20.0]
    assert _cuts(snapped) == _cuts(plain)  # no pause to find in a steady bed: nothing moves

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_speech_wav
from stages.split import SplitStage, fixed_windows, shot_windows, snap_windows


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
    pauses = [(8.5, 9.0), (11.8, 12.4), (19.0, 19.05), (23.0, 23.5)]

    def near(lo: float, hi: float) -> list[tuple[float, float]]:
        return [(a, b) for a, b in pauses if b > lo and a < hi]

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


def _voiced_spans(samples: np.ndarray, rate: int, merge_gap: float = 0.1) -> list[tuple[float, float]]:
    """Spans of 10 ms windows above 1 % of full scale, merging gaps shorter than ``merge_gap``."""
    win = rate // 100
    rms = np.sqrt(np.mean(samples[: len(samples) // win * win].reshape(-1, win) ** 2, axis=1))
    spans: list[list[float]] = []
    for k in np.flatnonzero(rms > 0.01):
        t = k * win / rate
        if spans and t - spans[-1][1] < merge_gap:
            spans[-1][1] = t + win / rate
        else:
            spans.append([t, t + win / rate])
    return [(a, b) for a, b in spans]


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
    clips = []
    for i, text in enumerate(texts):
        synth_speech_wav(root / f"s{i}.wav", text)
        with wave.open(str(root / f"s{i}.wav"), "rb") as w:
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
        (a, b), *_ = [(s[0][0], s[-1][1]) for s in [_voiced_spans(x, rate)]]
        clips.append(x[int(a * rate) : int(b * rate)])
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
    voiced = _voiced_spans(speech, rate)
    t = np.arange(len(speech)) / rate
    mix = speech + 0.03 * np.sin(2 * np.pi * 220 * t).astype(np.float32)  # a quiet tone under it all
    wav = root / "mix.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(mix, -1, 1) * 32767).astype(np.int16).tobytes())
    video = root / "talk.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s=160x120:r=25:d={total:.2f}",
         "-i", str(wav), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(video)],
        check=True, timeout=120,
    )  # fmt: skip
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

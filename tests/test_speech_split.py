"""Speech-aligned splitting: clips cut between words, never inside one (``split.mode=speech``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pipeline.config import SplitConfig
from pipeline.tools.samples import synth_video
from stages._speech import TimedWord, speech_windows
from stages.split import SplitStage, fixed_windows


def _inside(t: float, start: float, end: float) -> bool:
    return start < t < end


def _check(windows: list[tuple[float, float]], words: list[TimedWord], lo: float, hi: float) -> None:
    assert windows == sorted(windows)
    for (_, e), (s, _) in itertools.pairwise(windows):
        assert e <= s
    for s, e in windows:
        assert lo - 1e-6 <= e - s <= hi + 1e-6
        for w in words:
            assert not _inside(s, w.start, w.end) and not _inside(e, w.start, w.end), (s, e, w)


def _regular_words(n_sentences: int = 6, per_sentence: int = 7) -> list[TimedWord]:
    words, t = [], 0.5
    for _ in range(n_sentences):
        for k in range(per_sentence):
            words.append(TimedWord(t, t + 0.3, k == per_sentence - 1))
            t += 0.3 + (0.08 if k < per_sentence - 1 else 0.7)
    return words


def test_windows_cut_between_words_and_prefer_sentence_ends() -> None:
    words = _regular_words()
    duration = words[-1].end + 1.0
    windows = speech_windows(words, duration, clip_seconds=6.0, min_seconds=3.0, max_seconds=9.0)
    _check(windows, words, 3.0, 9.0)
    covered = [w for w in words if any(s <= w.start and w.end <= e for s, e in windows)]
    assert covered == words  # every word in a clip
    ends = [w.end for w in words if w.sentence_end]
    for _, e in windows:  # each clip ends in the pause after a sentence
        assert any(0 <= e - end <= 0.7 for end in ends)


def test_windows_edge_cases() -> None:
    assert speech_windows([], 10.0, 5.0, 2.0, 8.0) == []
    burst = [TimedWord(4.0, 4.3, False), TimedWord(4.4, 4.8, True)]  # 0.8 s of speech in silence
    (window,) = speech_windows(burst, 10.0, 5.0, 2.0, 8.0)
    assert window[1] - window[0] >= 2.0 and window[0] <= 4.0 and window[1] >= 4.8  # widened into silence
    assert speech_windows(burst, 1.0 + 4.8, 5.0, 9.0, 12.0) == []  # cannot reach the minimum: no clip
    words = _regular_words(3, 7)
    tail = [TimedWord(words[-1].end + 0.5, words[-1].end + 0.9, True)]
    windows = speech_windows(words + tail, tail[0].end + 0.5, 6.0, 3.0, 20.0)
    assert windows[-1][1] >= tail[0].end  # a short tail joins the previous clip
    _check(windows, words + tail, 3.0, 20.0)


@pytest.fixture(scope="module")
def talk(tmp_path_factory: pytest.TempPathFactory) -> object:
    return synth_video(tmp_path_factory.mktemp("talk") / "talk.mp4", duration=30.0, n_scenes=3, seed=3)


def test_split_speech_mode_never_cuts_a_sentence(talk: object) -> None:
    cfg = SplitConfig(mode="speech", clip_seconds=8.0, min_clip_seconds=3.0, max_clip_seconds=14.0)
    ((*clips,),) = SplitStage(cfg).process_batch([{"video_id": "talk", "local_path": str(talk.path)}])
    assert len(clips) >= 3
    bounds = [(c["clip_start"], c["clip_end"]) for c in clips]
    assert [c["key"] for c in clips] == [f"talk_{i:04d}" for i in range(len(clips))]
    for s, e in bounds:
        assert 3.0 - 1e-6 <= e - s <= 14.0 + 1e-6
    for sentence in talk.sentences:  # the known transcript: every sentence lies whole in one clip
        a, b = sentence["start"], sentence["end"]
        holders = [(s, e) for s, e in bounds if s <= a + 0.05 and b - 0.05 <= e]
        assert len(holders) == 1, (sentence, bounds)
        for s, e in bounds:
            assert not _inside(s, a + 0.05, b - 0.05) and not _inside(e, a + 0.05, b - 0.05)


def test_split_speech_mode_without_speech_falls_back_to_fixed_windows(tmp_path: Path) -> None:
    video = synth_video(tmp_path / "music.mp4", duration=12.0, speech=[], music=True, seed=4)
    cfg = SplitConfig(mode="speech", clip_seconds=5.0, min_clip_seconds=2.0, max_clip_seconds=8.0)
    ((*clips,),) = SplitStage(cfg).process_batch([{"video_id": "m", "local_path": str(video.path)}])
    expected = fixed_windows(0.0, clips[0]["video_duration"], 5.0, 2.0, 8.0)
    assert [(c["clip_start"], c["clip_end"]) for c in clips] == expected

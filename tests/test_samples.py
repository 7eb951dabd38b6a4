"""Tests for pipeline.tools.samples: synthetic media with known ground truth."""

from __future__ import annotations

import json
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.tools import samples
from pipeline.tools.samples import SampleVideo, generate_corpus, make_bad_inputs, synth_speech_wav, synth_video


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0] if c.streams.video else None
        a = c.streams.audio[0] if c.streams.audio else None
        return {
            "duration": c.duration / 1e6 if c.duration else 0.0,
            "video": None if v is None else {
                "codec": v.codec_context.name, "width": v.codec_context.width, "height": v.codec_context.height,
                "fps": float(v.average_rate), "frames": v.frames, "pix_fmt": v.codec_context.pix_fmt,
                "duration": float(v.duration * v.time_base) if v.duration else None,
            },
            "audio": None if a is None else {
                "codec": a.codec_context.name,
                "rate": a.codec_context.sample_rate,
                "channels": a.codec_context.channels,
            },
        }


def _decode_audio_mono(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate = stream.codec_context.sample_rate
        chunks = [f.to_ndarray().mean(axis=0) for f in c.decode(stream)]  # fltp: (channels, n)
    return np.concatenate(chunks), rate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SampleVideo]]:
    out = tmp_path_factory.mktemp("corpus")
    return out, generate_corpus(out, count=4, seed=7, duration=6.0)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    ("duration", "fps", "size", "n_scenes"),
    [(5.3, 30.0, (256, 144), 2), (8.0, 25.0, (320, 240), 3), (7.0, 30000 / 1001, (320, 180), 4)],
)
def test_synth_video_matches_request(tmp_path: Path, duration: float, fps: float, size: tuple[int, int],
                                     n_scenes: int) -> None:
    s = synth_video(tmp_path / "v.mp4", duration=duration, fps=fps, width=size[0], height=size[1],
                    n_scenes=n_scenes, seed=3)
    info = _probe(s.path)
    assert abs(info["duration"] - duration) <= 0.1
    assert abs(s.duration - duration) <= 0.1
    v = info["video"]
    assert v["codec"] == "h264" and v["pix_fmt"] == "yuv420p"
    assert (v["width"], v["height"]) == size == (s.width, s.height)
    assert abs(v["fps"] - fps) < 0.01 and abs(s.fps - fps) < 0.01
    assert abs(v["frames"] / fps - duration) <= 0.1
    a = info["audio"]
    assert a == {"codec": "aac", "rate": 48000, "channels": 2}
    assert s.has_audio and s.has_video
    # cut times: n_scenes - 1 cuts inside (0, end), every scene at least 1.5 s, on frame boundaries
    assert len(s.cut_times) == n_scenes - 1
    bounds = [0.0, *s.cut_times, v["frames"] / fps]
    assert all(b - a >= 1.5 - 1e-6 for a, b in zip(bounds, bounds[1:]))
    assert all(abs(c * fps - round(c * fps)) < 1e-3 for c in s.cut_times)
    assert len(s.scene_kinds) == n_scenes


def test_speech_is_where_the_ground_truth_says(tmp_path: Path) -> None:
    texts = ["The train to the city center leaves from platform four.", "Cats sleep for up to sixteen hours a day."]
    s = synth_video(tmp_path / "speech.mp4", duration=9.0, speech=texts, seed=5)
    assert [x["text"] for x in s.sentences] == texts
    assert s.transcript == " ".join(texts)
    prev_end = 0.0
    for x in s.sentences:
        assert prev_end <= x["start"] < x["end"] <= s.duration
        assert x["end"] - x["start"] > 1.0
        prev_end = x["end"]
    # speech is far louder than the bed: RMS inside the sentences vs. in the silence between
    pcm, rate = _decode_audio_mono(s.path)

    def rms(a: float, b: float) -> float:
        seg = pcm[int(a * rate) : int(b * rate)]
        return float(np.sqrt(np.mean(seg**2)))

    inside = min(rms(x["start"], x["end"]) for x in s.sentences)
    outside = rms(0.0, s.sentences[0]["start"] - 0.05)
    assert inside > 5 * outside > 0


def test_audio_and_video_switches(tmp_path: Path) -> None:
    silent = synth_video(tmp_path / "silent.mp4", duration=4.0, n_scenes=2, audio=False, seed=1)
    info = _probe(silent.path)
    assert info["audio"] is None and info["video"] is not None
    assert not silent.has_audio and silent.transcript == "" and silent.sentences == []

    audio_only = synth_video(tmp_path / "voice.m4a", duration=4.0, video=False, seed=1)
    info = _probe(audio_only.path)
    assert info["video"] is None and info["audio"]["codec"] == "aac"
    assert abs(info["duration"] - 4.0) <= 0.1
    assert not audio_only.has_video and audio_only.cut_times == [] and audio_only.transcript

    music = synth_video(tmp_path / "music.mp4", duration=4.0, n_scenes=1, speech=[], music=True, seed=1)
    pcm, _ = _decode_audio_mono(music.path)
    assert music.transcript == "" and float(np.abs(pcm).max()) > 0.02  # the melody is audible

    with pytest.raises(ValueError):
        synth_video(tmp_path / "none.mp4", audio=False, video=False)
    with pytest.raises(ValueError, match="do not fit"):
        synth_video(tmp_path / "crowded.mp4", duration=4.0, n_scenes=3)


def test_determinism(tmp_path: Path) -> None:
    a = synth_video(tmp_path / "a.mp4", duration=7.0, n_scenes=3, seed=11)
    b = synth_video(tmp_path / "b.mp4", duration=7.0, n_scenes=3, seed=11)
    c = synth_video(tmp_path / "c.mp4", duration=7.0, n_scenes=3, seed=12)
    assert a.cut_times == b.cut_times and a.transcript == b.transcript and a.sentences == b.sentences
    assert a.scene_kinds == b.scene_kinds
    assert a.path.read_bytes() == b.path.read_bytes()  # bit-exact flags: same bytes for the same ffmpeg build
    assert (a.cut_times, a.transcript) != (c.cut_times, c.transcript)


def test_generation_is_fast(tmp_path: Path) -> None:
    t = time.perf_counter()
    synth_video(tmp_path / "fast.mp4", duration=8.0, n_scenes=3, seed=2)
    # ~0.4 s on an idle 2-core machine; generous bound for a loaded CI box
    assert time.perf_counter() - t < 6.0


def test_corpus_manifest(corpus: tuple[Path, list[SampleVideo]]) -> None:
    out, videos = corpus
    assert [v.path.name for v in videos] == [f"sample_{i:03d}.mp4" for i in range(4)]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for line, v in zip(lines, videos):
        d = json.loads(line)
        assert d["path"] == v.path.name  # relative to the corpus directory
        back = SampleVideo.from_dict(d, base_dir=out)
        assert back == v
        assert back.path.is_file()
        info = _probe(back.path)
        assert abs(info["duration"] - d["duration"]) <= 0.1
        assert d["transcript"] and d["sentences"] and d["has_audio"] and d["has_video"]
    inputs = (out / "inputs.txt").read_text().splitlines()
    assert inputs == [str(v.path.resolve()) for v in videos]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in inputs)
    durations = [v.duration for v in videos]
    assert len(set(durations)) > 1 and all(4.4 <= d <= 10.6 for d in durations)
    assert any(v.music for v in videos) and not all(v.music for v in videos)


def test_corpus_is_deterministic(tmp_path: Path, corpus: tuple[Path, list[SampleVideo]]) -> None:
    _, first = corpus
    again = generate_corpus(tmp_path, count=2, seed=7, duration=6.0)
    for a, b in zip(first, again):
        assert (a.duration, a.cut_times, a.transcript, a.sentences) == (b.duration, b.cut_times, b.transcript,
                                                                         b.sentences)


def test_bad_inputs(bad: dict[str, Path]) -> None:
    assert set(bad) == {"zero_bytes", "html_page", "random_bytes", "truncated", "audio_only", "video_no_audio",
                        "tiny_0_3s"}
    assert all(p.is_file() for p in bad.values())
    assert bad["zero_bytes"].stat().st_size == 0
    assert bad["html_page"].read_text().lstrip().lower().startswith("<!doctype html")
    for name in ("zero_bytes", "html_page", "random_bytes"):
        with pytest.raises(av.error.FFmpegError):
            av.open(str(bad[name])).close()

    # truncated: opens (moov is up front), declares more frames than can be decoded
    decoded = 0
    declared = 0
    failed = False
    with av.open(str(bad["truncated"])) as c:
        declared = c.streams.video[0].frames
        try:
            for _ in c.decode(video=0):
                decoded += 1
        except av.error.FFmpegError:
            failed = True
    assert declared > 0 and (failed or decoded < declared) and decoded < declared

    info = _probe(bad["audio_only"])
    assert info["video"] is None and info["audio"] is not None
    info = _probe(bad["video_no_audio"])
    assert info["video"] is not None and info["audio"] is None
    info = _probe(bad["tiny_0_3s"])
    assert info["video"] is not None and 0.2 <= info["duration"] <= 0.4


def test_speech_wav(tmp_path: Path) -> None:
    dur = synth_speech_wav(tmp_path / "hello.wav", "Hello world, this is a test of the speech synthesiser.")
    with wave.open(str(tmp_path / "hello.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert abs(w.getnframes() / 16000 - dur) < 1e-6
    assert 1.5 < dur < 8.0
    with pytest.raises(ValueError):
        synth_speech_wav(tmp_path / "empty.wav", "  ")


@pytest.mark.parametrize("missing", ["espeak-ng", "ffmpeg"])
def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    real_which = samples.shutil.which
    monkeypatch.setattr(samples.shutil, "which", lambda name: None if name == missing else real_which(name))
    with pytest.raises(RuntimeError, match=f"'{missing}'.*install"):
        synth_video(tmp_path / "x.mp4", duration=3.0, n_scenes=1)

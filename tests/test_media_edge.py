"""Media that used to come out wrong (issue 15): display rotation, MPEG-TS that starts at a large or
negative timestamp, a declared audio stream without packets, an mp3 with cover art."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig, QualityConfig, SplitConfig
from pipeline.errors import StageError
from pipeline.stage import StageContext
from stages._media import probe
from stages.extract import ExtractStage
from stages.quality import QualityStage
from stages.split import SplitStage

FF = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
# picture brightness tells the time (luma 16 + 45 t), audio is silent for 2 s and then a tone
RAMP = "nullsrc=s=160x120:r=25,geq=lum='16+45*T':cb=128:cr=128"
TONE = "sine=frequency=440:sample_rate=44100,volume=enable='lt(t,2)':volume=0"


def _ff(*args: str) -> None:
    subprocess.run([*FF, *args], check=True, timeout=120)


def _ramp_mp4(path: Path, seconds: float = 4.0) -> Path:
    _ff("-f", "lavfi", "-i", f"{RAMP},trim=duration={seconds}", "-f", "lavfi", "-i", f"{TONE},atrim=duration={seconds}",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "25", "-c:a", "aac", "-shortest", str(path))  # fmt: skip
    return path


def _split(path: Path, **cfg: object) -> list[dict]:
    split = SplitStage(SplitConfig(**{"clip_seconds": 2.0, "min_clip_seconds": 1.0, "max_clip_seconds": 3.0, **cfg}))
    (children,) = split.process_batch(
        [{"video_id": path.stem, "source_url": str(path), "input_index": 0, "local_path": str(path)}]
    )
    assert not isinstance(children, Exception), children
    return [{"video_id": path.stem, "source_url": str(path), "local_path": str(path), **c} for c in children]


def _extract(rows: list[dict], tmp: Path, **cfg: object) -> list:
    stage = ExtractStage(ExtractConfig(**{"frames_per_clip": 3, "frame_size": 120, **cfg}), StageContext(str(tmp)))
    return stage.process_batch(rows)


def _audio(uri: str) -> np.ndarray:
    with av.open(uri) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype(np.float32) / 32768.0


def _onset(samples: np.ndarray, rate: int = 16000) -> float:
    """Time of the first 10 ms window louder than -30 dBFS."""
    win = rate // 100
    rms = np.sqrt(np.mean(samples[: len(samples) // win * win].reshape(-1, win) ** 2, axis=1))
    return float(np.argmax(rms > 10 ** (-30 / 20)) * win / rate)


def test_rotated_phone_video_frames_come_out_upright(tmp_path: Path) -> None:
    src = tmp_path / "landscape.mp4"
    _ff("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=3", "-f", "lavfi", "-i", "sine=d=3",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src))  # fmt: skip
    portrait = tmp_path / "portrait.mp4"  # a phone held upright stores landscape pictures + a display matrix
    _ff("-i", str(src), "-c", "copy", "-metadata:s:v", "rotate=90", str(portrait))
    info = probe(portrait)
    assert (info.width, info.height, info.rotation) == (240, 320, 90)
    rows = _split(portrait, mode="whole")
    assert (rows[0]["width"], rows[0]["height"]) == (240, 320)
    (res,) = _extract(rows, tmp_path / "staging", frame_size=240)
    assert not isinstance(res, Exception), res
    for uri, t in zip(res["frame_uris"], res["frame_times"], strict=True):
        ours = np.asarray(Image.open(uri).convert("L"), np.float32)
        assert ours.shape == (320, 240)  # portrait
        ref_png = tmp_path / "ref.png"  # what ffmpeg (autorotate) shows at that time
        _ff("-ss", f"{t:.3f}", "-i", str(portrait), "-frames:v", "1", str(ref_png))
        ref = np.asarray(Image.open(ref_png).convert("L"), np.float32)
        assert ref.shape == ours.shape
        assert float(np.abs(ours - ref).mean()) < 8.0  # JPEG and frame-time slack; a wrong turn gives > 40


@pytest.mark.parametrize("shift", ["large", "negative", "default"])
def test_mpegts_with_any_start_timestamp_is_aligned(tmp_path: Path, shift: str) -> None:
    base = _ramp_mp4(tmp_path / "base.mp4")
    ts = tmp_path / f"{shift}.ts"
    if shift == "large":
        _ff("-i", str(base), "-c", "copy", "-output_ts_offset", "10000", "-f", "mpegts", str(ts))
    elif shift == "negative":
        _ff("-itsoffset", "-2", "-i", str(base), "-c", "copy", "-avoid_negative_ts", "disabled", "-f", "mpegts", str(ts))
    else:  # mpegts muxers start at 1.4 s
        _ff("-i", str(base), "-c", "copy", "-f", "mpegts", str(ts))
    info = probe(ts)
    assert info.has_video and info.has_audio and 3.5 < info.duration < 4.5
    if shift == "negative":
        assert info.start_time < 0
    rows = _split(ts)
    results = _extract(rows, tmp_path / "staging")
    for row, res in zip(rows, results, strict=True):
        assert not isinstance(res, Exception), (row["key"], res)
        for uri, t in zip(res["frame_uris"], res["frame_times"], strict=True):
            assert row["clip_start"] - 0.05 <= t <= row["clip_end"] + 0.05
            grey = float(np.asarray(Image.open(uri).convert("L"), np.float32).mean())
            seen = grey * 219.0 / 255.0 / 45.0  # the time the picture shows
            assert abs(seen - t) < 0.2, (t, seen)
        samples = _audio(res["audio_uri"])
        assert abs(len(samples) / 16000 - (row["clip_end"] - row["clip_start"])) < 0.01
        if row["clip_start"] < 2.0 < row["clip_end"] - 0.3:  # the tone starts at 2 s of the stream
            assert abs(row["clip_start"] + _onset(samples) - 2.0) < 0.1


@pytest.mark.parametrize("container", ["mkv", "ts"])
def test_declared_audio_stream_without_packets_is_no_audio(tmp_path: Path, container: str) -> None:
    path = tmp_path / f"empty_audio.{container}"
    _ff("-f", "lavfi", "-i", "testsrc2=s=160x120:r=25:d=3", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo",
        "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-frames:a", "0",
        "-t", "3", str(path))  # fmt: skip
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1  # declared ...
    info = probe(path)
    assert info.has_video and not info.has_audio and "empty_audio_stream" in info.notes  # ... but empty
    rows = _split(path, mode="whole")
    assert rows[0]["has_audio"] is False
    assert QualityStage(QualityConfig()).reason(rows[0]) == "no_audio"  # a typed reason, not corrupt_media
    (res,) = _extract(rows, tmp_path / "staging")  # video-only processing works
    assert not isinstance(res, Exception) and len(res["frame_uris"]) == 3 and "audio_uri" not in res
    # a row that still claims audio (an older probe) gets the typed error, not corrupt_media
    (claimed,) = _extract([{**rows[0], "has_audio": True}], tmp_path / "staging2")
    assert isinstance(claimed, StageError) and claimed.error_type == "no_audio"


def test_mp3_with_cover_art_is_audio_without_video(tmp_path: Path) -> None:
    path = tmp_path / "song.mp3"
    _ff("-f", "lavfi", "-i", "sine=frequency=330:d=4", "-f", "lavfi", "-i", "testsrc2=s=300x300:d=1",
        "-map", "0:a", "-map", "1:v", "-frames:v", "1", "-c:a", "libmp3lame", "-c:v", "mjpeg",
        "-disposition:v", "attached_pic", "-id3v2_version", "3", str(path))  # fmt: skip
    info = probe(path)
    assert info.has_audio and not info.has_video and "cover_art" in info.notes
    assert 3.5 < info.duration < 4.5
    rows = _split(path)
    assert len(rows) == 2 and not rows[0]["has_video"]
    assert QualityStage(QualityConfig()).reason(rows[0]) == "no_video"
    results = _extract(rows, tmp_path / "staging")  # audio-only handling: audio, no frames
    for res in results:
        assert not isinstance(res, Exception), res
        assert "frame_uris" not in res and res["audio_rms_db"] > -30

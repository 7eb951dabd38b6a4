"""Fingerprint stage: exact hash survives re-muxing, frame hashes survive edits, audio codes a shift."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import ExtractConfig, FingerprintConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_video
from pipeline.stage import StageContext
from stages.extract import ExtractStage
from stages.fingerprint import (
    FRAME_SCALES,
    FingerprintStage,
    as_uint64,
    audio_codes,
    audio_codes_timed,
    frame_hash,
    frame_information,
    hamming,
    mirror_hash,
    read_audio,
    sample_frames,
)

FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp_media")
    src = root / "src.mp4"
    synth_video(src, duration=6.0, n_scenes=2, seed=42, scene_kinds=["mandelbrot", "life"])
    other = root / "other.mp4"
    synth_video(other, duration=6.0, n_scenes=2, seed=43, scene_kinds=["mandelbrot", "life"])
    remux = root / "remux.mkv"
    subprocess.run([*FFMPEG, "-i", str(src), "-c", "copy", str(remux)], check=True)
    reencode = root / "reencode.mp4"
    subprocess.run([*FFMPEG, "-i", str(src), "-c:v", "libx264", "-crf", "30", "-c:a", "aac", "-b:a", "48k",
                    str(reencode)], check=True)  # fmt: skip
    audio_only = root / "audio_only.m4a"
    synth_video(audio_only, duration=4.0, video=False, seed=44)
    return {"src": src, "other": other, "remux": remux, "reencode": reencode, "audio_only": audio_only}


def _rows(paths: dict[str, Path], names: list[str], staging: Path) -> list[dict[str, Any]]:
    """Rows as extract leaves them (one whole-file clip per file), run through the real extract."""
    from stages._media import probe

    rows = []
    for name in names:
        info = probe(paths[name])
        rows.append({
            "video_id": name, "key": f"{name}_0000", "local_path": str(paths[name]), "clip_start": 0.0,
            "clip_end": info.duration, "has_video": info.has_video, "has_audio": info.has_audio, "shot_times": [],
        })  # fmt: skip
    extract = ExtractStage(ExtractConfig(frames_per_clip=1), StageContext(staging_dir=str(staging)))
    extract.setup()
    for row, update in zip(rows, extract.process_batch(rows), strict=True):
        assert not isinstance(update, Exception), update
        row.update(update)
    return rows


@pytest.fixture(scope="module")
def fingerprints(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    names = ["src", "other", "remux", "reencode", "audio_only"]
    rows = _rows(media, names, tmp_path_factory.mktemp("fp_staging"))
    stage = FingerprintStage(FingerprintConfig())
    stage.setup()
    out = stage.process_batch(rows)
    assert not any(isinstance(o, Exception) for o in out), out
    return dict(zip(names, out, strict=True))


def _match_ratio(a: list[int], b: list[int], radius: int) -> float:
    qa, qb = as_uint64(a), as_uint64(b)
    best = [min(hamming(int(x), int(y)) for y in qb) for x in qa]
    return float(np.mean(np.array(best) <= radius))


def test_content_hash_same_for_remux_differs_for_reencode(fingerprints: dict[str, dict[str, Any]]) -> None:
    fp = fingerprints
    assert fp["src"]["content_hash"] == fp["remux"]["content_hash"]
    assert fp["src"]["content_hash"] != fp["reencode"]["content_hash"]
    assert fp["src"]["content_hash"] != fp["other"]["content_hash"]


def test_perceptual_codes_match_reencode_not_other_video(fingerprints: dict[str, dict[str, Any]]) -> None:
    fp = fingerprints
    n_frames = len(fp["src"]["frame_hashes"]) // len(FRAME_SCALES)
    assert 20 <= n_frames <= 25  # 4 frames/s of 6 s
    assert len(fp["src"]["audio_fingerprint"]) > 100
    assert _match_ratio(fp["reencode"]["frame_hashes"], fp["src"]["frame_hashes"], 10) >= 0.9
    assert _match_ratio(fp["reencode"]["audio_fingerprint"], fp["src"]["audio_fingerprint"], 14) >= 0.8
    assert _match_ratio(fp["other"]["audio_fingerprint"], fp["src"]["audio_fingerprint"], 14) <= 0.1
    # the other video zooms into the same fractal: a few of its frames look like src's, but they
    # do not line up in time and its sound differs, so dedup keeps it apart
    from pipeline.config import DedupConfig
    from stages.dedup import find_duplicates, signals_table

    names = ["src", "other", "remux", "reencode"]
    rows = [{"key": n, "input_index": i, "clip_start": 0.0, "clip_end": 6.0, **fp[n]} for i, n in enumerate(names)]
    decided = {d["key"]: d["duplicate_of"] for d in find_duplicates(signals_table(rows, "quality"), DedupConfig()).to_pylist()}
    assert decided == {"src": None, "other": None, "remux": "src", "reencode": "src"}


def test_audio_only_clip(fingerprints: dict[str, dict[str, Any]]) -> None:
    fp = fingerprints["audio_only"]
    assert fp["frame_hashes"] == []
    # one ~1 s sentence over a quiet noise bed: the speech gives codes, the bed (below -55 dBFS in
    # the fingerprint bands) none
    assert 15 <= len(fp["audio_fingerprint"]) <= 60
    assert fp["content_hash"] and fp["content_hash"] != fingerprints["src"]["content_hash"]


def test_frame_hash_invariances(media: dict[str, Path]) -> None:
    """Brightness/contrast, mirror, letterbox bars and a 10% centred crop on decoded frames."""
    frames = sample_frames(str(media["src"]), 0.0, 6.0, 1.0, 6)
    assert len(frames) == 6
    hashed = [(f.astype(np.float32), frame_hash(f)) for f in frames]
    assert sum(h is not None for _, h in hashed) >= 5  # a zoom into a flat part of the fractal is flat
    for g, h in hashed:
        if h is None:
            continue
        assert len(h) == len(FRAME_SCALES)
        brighter = frame_hash(np.clip(g * 1.15 + 20, 0, 255))
        assert brighter is not None and hamming(h[0], brighter[0]) <= 4
        mirrored = frame_hash(g[:, ::-1])
        assert mirrored is not None and hamming(mirror_hash(h[0]), mirrored[0]) <= 2
        assert hamming(h[0], mirrored[0]) > 8  # the mirror is a different picture until unmirrored
        boxed = np.zeros((g.shape[0] + 40, g.shape[1]), np.float32) + 16
        boxed[20:-20] = g
        lb = frame_hash(boxed)
        assert lb is not None and hamming(h[0], lb[0]) <= 4
        dy, dx = round(g.shape[0] * 0.05), round(g.shape[1] * 0.05)
        cropped = frame_hash(g[dy:-dy, dx:-dx])
        assert cropped is not None and min(hamming(cropped[0], x) for x in h) <= 8


def test_flat_frames_have_no_hash() -> None:
    assert frame_hash(np.full((128, 128), 16.0)) is None
    assert frame_hash(np.full((128, 128), 200.0)) is None


def test_audio_codes_robust_to_time_shift(media: dict[str, Path]) -> None:
    x = read_audio(str(media["src"]))
    shift = int(1.5 * 16000) + 113  # 1.5 s plus a few ms: not a multiple of the code stride
    a, b = audio_codes(x), audio_codes(x[shift:])
    best = [min((int(q) ^ int(c)).bit_count() for c in a) for q in b]
    assert np.mean(np.array(best) <= 14) >= 0.8
    assert audio_codes(np.zeros(16000 * 3, np.float32)).size == 0  # silence gives no codes


def test_errors_are_typed(media: dict[str, Path], tmp_path: Path) -> None:
    stage = FingerprintStage(FingerprintConfig())
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    rows = [
        {"key": "a", "local_path": str(bad), "clip_start": 0.0, "clip_end": 2.0, "has_video": True},
        {"key": "b", "local_path": str(media["src"]), "clip_start": 0.0, "clip_end": 2.0, "has_video": True,
         "has_audio": True, "audio_uri": None},
        {"key": "c", "local_path": str(media["src"]), "clip_start": 0.0, "clip_end": 2.0, "has_video": True,
         "has_audio": False},
    ]  # fmt: skip
    out = stage.process_batch(rows)
    assert isinstance(out[0], StageError) and out[0].error_type == "corrupt_media"
    assert isinstance(out[1], StageError) and out[1].error_type == "missing_input"
    assert not isinstance(out[2], Exception) and out[2]["audio_fingerprint"] == []
    # 50 frames at 25 fps, every 6th: 9 sampled; frames the fractal zoom leaves flat carry no hash
    assert 7 <= len(out[2]["hash_times"]) <= 9
    assert len(out[2]["frame_hashes"]) == len(out[2]["hash_times"]) * len(FRAME_SCALES)


def _lavfi_frames(tmp: Path, graph: str, seconds: float = 2.0) -> list[np.ndarray]:
    out = tmp / "pic.mp4"
    subprocess.run([*FFMPEG, "-filter_complex", graph, "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(out)], check=True)  # fmt: skip
    return sample_frames(str(out), 0.0, seconds, 2.0, 10)


def _dots_graph() -> str:
    parts = ["color=c=0x0a0a0a:s=320x240:r=25:d=2[bg0]"]
    for i, (x, y, vx) in enumerate([(40, 50, 20), (200, 90, -15), (120, 200, 30), (280, 30, -25), (70, 150, 10)]):
        parts.append(f"color=c=0xf0f0ff:s=4x4:r=25:d=2[p{i}]")
        parts.append(f"[bg{i}][p{i}]overlay=x='mod({x}+t*{vx}+3200,320)':y={y}:shortest=1[bg{i + 1}]")
    return ";".join(parts) + ";[bg5]format=yuv420p"


def test_low_information_frames_give_no_hash(tmp_path: Path) -> None:
    """Near-black, near-uniform frames and a dark scene of a few moving dots do not vote."""
    for graph in (
        _dots_graph(),
        "color=c=0x141414:s=320x240:r=25,noise=alls=3:allf=t",  # near black, a little sensor noise
        "color=c=0x808890:s=320x240:r=25,noise=alls=4:allf=t",  # near uniform grey
    ):
        frames = _lavfi_frames(tmp_path, graph)
        assert frames
        assert all(frame_hash(f) is None for f in frames), graph
        assert max(frame_information(f) for f in frames) < 16
    for graph in ("testsrc2=s=320x240:r=25", "life=s=320x240:r=25:seed=7:ratio=0.3", "mandelbrot=s=320x240:r=25"):
        frames = _lavfi_frames(tmp_path, graph)
        assert all(frame_hash(f) is not None for f in frames), graph


def _wav(tmp: Path, graph: str, seconds: float = 4.0) -> np.ndarray:
    out = tmp / "a.flac"
    subprocess.run([*FFMPEG, "-filter_complex", graph, "-t", str(seconds), "-ac", "1", "-ar", "16000", str(out)],
                   check=True)  # fmt: skip
    return read_audio(str(out))


def test_tone_hum_and_silence_give_no_audio_codes(tmp_path: Path) -> None:
    """Steady tones (in and below the fingerprint bands), hum and silence carry no information."""
    for graph in (
        "sine=f=440:r=48000,volume=0.16",  # -30 dBFS tone inside the bands
        "sine=f=1250:r=48000,volume=0.5",  # loud tone inside the bands
        "sine=f=243:r=48000,volume=0.16",  # tone below the bands (its leakage only reaches them)
        "sine=f=50:r=48000,volume=0.3",  # mains hum
        "anullsrc=r=48000:cl=mono",
    ):
        codes, times = audio_codes_timed(_wav(tmp_path, graph))
        assert len(codes) <= 3, (graph, len(codes))
        assert len(times) == len(codes)


def test_speech_gives_timed_codes(tmp_path: Path) -> None:
    from pipeline.tools.samples import synth_speech_wav

    wav = tmp_path / "speech.wav"
    synth_speech_wav(wav, "The old captain carried a wooden boat before the storm.")
    x = read_audio(str(wav))
    codes, times = audio_codes_timed(x)
    assert len(codes) > 40  # ~31 codes per second of speech
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] <= len(x) / 16000
    # over a quiet tone the speech still gives its codes, the tone alone none
    t = np.arange(len(x)) / 16000
    mixed = x + 0.02 * np.sin(2 * np.pi * 330 * t).astype(np.float32)
    assert len(audio_codes(mixed)) >= 0.8 * len(codes)


def test_stage_writes_times(fingerprints: dict[str, dict[str, Any]]) -> None:
    fp = fingerprints["src"]
    assert len(fp["hash_times"]) * len(FRAME_SCALES) == len(fp["frame_hashes"])
    assert len(fp["code_times"]) == len(fp["audio_fingerprint"])
    for name in ("hash_times", "code_times"):
        times = np.array(fp[name])
        assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < 6.0, name

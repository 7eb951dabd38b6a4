"""Probe and split: one video row in, its clip rows out (fan-out).

Modes: ``fixed`` windows (target length, min/max, overlap), ``shots`` (shot boundaries from
``stages._shots``; long shots are windowed, shots shorter than the minimum are skipped) and
``whole`` (one clip per video). A video too short for any clip yields one clip row marked
``drop_reason='too_short'`` so that it is accounted for in ``rejects.parquet``.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import SplitConfig
from pipeline.errors import StageError
from pipeline.stage import Resources, Row, Stage, per_row
from pipeline.storage import localize
from stages._media import probe

log = logging.getLogger(__name__)

EPS = 1e-6


def clip_key(video_id: str, clip_index: int) -> str:
    return f"{video_id}_{clip_index:04d}"


def fixed_windows(
    start: float, end: float, clip: float, min_len: float, max_len: float, overlap: float = 0.0
) -> list[tuple[float, float]]:
    """Windows of length ``clip`` stepping by ``clip - overlap`` over [start, end].

    The tail is merged into the last window when that stays within ``max_len``, kept as its own
    window when at least ``min_len`` long, and otherwise left out.
    """
    length = end - start
    if length < min_len - EPS:
        return []
    if length <= max_len + EPS and length < clip + min_len - EPS:
        return [(start, end)]
    step = clip - overlap
    out: list[tuple[float, float]] = []
    s = start
    while s + clip <= end + EPS:
        out.append((s, s + clip))
        s += step
    last_end = out[-1][1] if out else start
    tail = end - last_end
    if tail > EPS:
        if out and (out[-1][1] - out[-1][0]) + tail <= max_len + EPS:
            out[-1] = (out[-1][0], end)
        elif tail >= min_len - EPS:
            out.append((max(start, last_end - overlap), end))
    return [(round(a, 6), round(b, 6)) for a, b in out]


def shot_windows(
    duration: float, cuts: list[float], clip: float, min_len: float, max_len: float, overlap: float = 0.0
) -> list[tuple[float, float, list[float]]]:
    """Clips that follow shots: (start, end, cut times inside). Long shots are windowed."""
    bounds = [0.0] + sorted(c for c in cuts if EPS < c < duration - EPS) + [duration]
    out: list[tuple[float, float, list[float]]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > max_len + EPS:
            out.extend((s, e, []) for s, e in fixed_windows(a, b, clip, min_len, max_len, overlap))
        elif b - a >= min_len - EPS:
            out.append((round(a, 6), round(b, 6), []))
    return out


class SplitStage(Stage[SplitConfig]):
    """Probe a downloaded video and cut it into clip rows."""

    name = "split"
    fan_out = True
    reads = ("video_id", "local_path")
    writes = (
        "video_duration", "width", "height", "fps", "video_codec", "audio_codec", "has_video",
        "has_audio", "key", "clip_index", "clip_count", "clip_start", "clip_end", "shot_times",
        "drop_reason",
    )  # fmt: skip

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return 1

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return per_row(self._split, rows)

    def plan(self, duration: float, cuts: list[float] | None) -> list[tuple[float, float, list[float]]]:
        cfg = self.config
        if cfg.mode == "whole":
            return [(0.0, duration, list(cuts or []))] if duration >= cfg.min_clip_seconds - EPS else []
        if cfg.mode == "shots":
            return shot_windows(
                duration, cuts or [], cfg.clip_seconds, cfg.min_clip_seconds, cfg.max_clip_seconds,
                cfg.overlap_seconds,
            )
        windows = fixed_windows(
            0.0, duration, cfg.clip_seconds, cfg.min_clip_seconds, cfg.max_clip_seconds, cfg.overlap_seconds
        )
        return [(s, e, []) for s, e in windows]

    def _split(self, row: Row) -> list[dict[str, Any]]:
        path = row.get("local_path")
        if not path:
            raise StageError("no local file to split (download stage missing?)", "missing_input")
        path = str(localize(path))
        info = probe(path)
        base: dict[str, Any] = {
            "video_duration": info.duration,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "video_codec": info.video_codec,
            "audio_codec": info.audio_codec,
            "has_video": info.has_video,
            "has_audio": info.has_audio,
        }
        cuts: list[float] | None = None
        if info.has_video and self.config.mode == "shots":
            from stages._shots import detect_shot_boundaries

            try:
                cuts = detect_shot_boundaries(
                    path, threshold=self.config.shot_threshold, min_shot_seconds=self.config.min_shot_seconds
                )
            except Exception as exc:  # noqa: BLE001 - a decode failure is a property of the input
                raise StageError(f"shot detection could not decode the video: {exc}", "corrupt_media") from None
        windows = self.plan(info.duration, cuts)
        if self.config.mode == "speech" and info.has_audio:  # clips cut between words; no speech: fixed
            from stages._speech import plan_speech_clips

            cfg = self.config
            speech = plan_speech_clips(path, cfg.clip_seconds, cfg.min_clip_seconds, cfg.max_clip_seconds)
            windows = [(s, e, []) for s, e in speech] or windows
        if len(windows) > self.config.max_clips_per_video:
            log.warning(
                "split %s: %d clips, keeping the first %d (max_clips_per_video)",
                row["video_id"], len(windows), self.config.max_clips_per_video,
            )
            windows = windows[: self.config.max_clips_per_video]
        if not windows:
            return [
                {
                    **base,
                    "key": clip_key(row["video_id"], 0),
                    "clip_index": 0,
                    "clip_count": 1,
                    "clip_start": 0.0,
                    "clip_end": info.duration,
                    "shot_times": [],
                    "drop_reason": "too_short",
                }
            ]
        children = []
        for i, (start, end, _) in enumerate(windows):
            inside = [c for c in (cuts or []) if start + EPS < c < end - EPS]
            children.append(
                {
                    **base,
                    "key": clip_key(row["video_id"], i),
                    "clip_index": i,
                    "clip_count": len(windows),
                    "clip_start": start,
                    "clip_end": end,
                    "shot_times": inside,
                }
            )
        log.debug("split %s: %d clips", row["video_id"], len(children))
        return children

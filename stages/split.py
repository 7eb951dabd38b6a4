"""Probe and split: one video row in, its clip rows out (fan-out).

Modes: ``fixed`` windows (target length, min/max, overlap), ``shots`` (shot boundaries from
``stages._shots``; long shots are windowed, shots shorter than the minimum are skipped),
``speech`` (``stages._speech``: cuts between transcribed words) and ``whole`` (one clip per video).

In ``fixed`` mode each cut is moved to the nearest pause in the audio within
``snap_tolerance_seconds`` (``snap_to_silence``), so that clips do not start or end inside a word:
the audio around each cut is decoded (a seek, not the whole track) and its pauses are found from
the energy relative to the local floor (``stages._vad.pauses``), which works over a hum, a tone or
a quiet music bed. Cuts depend only on the audio, so keys stay deterministic. A video too short for any clip yields one clip row marked
``drop_reason='too_short'`` so that it is accounted for in ``rejects.parquet``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.config import SplitConfig
from pipeline.errors import StageError
from pipeline.stage import Resources, Row, Stage, per_row
from pipeline.storage import localize
from stages._media import probe
from stages._vad import Pause, load_audio_window, pauses

log = logging.getLogger(__name__)

EPS = 1e-6
PAUSE_MARGIN = 0.25  # a moved cut stays this far inside its pause (s), or at its quietest point when it is shorter
PAUSE_EDGE = 0.1  # ... or, where the tolerance allows no more, at least this far inside a long pause (s)
# A cut goes to the nearest pause of the first tier that has one in reach: pauses between sentences
# or phrases (>= 0.3 s), then shorter breaks (>= 0.15 s), then any gap between two words.
PAUSE_TIERS = (0.3, 0.15, 0.0)


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


def nearest_pause_point(b: float, spans: list[Pause], lo: float, hi: float, margin: float = PAUSE_MARGIN) -> float | None:
    """The point in a pause (``spans``) nearest ``b`` within [lo, hi]; None when no pause reaches [lo, hi].

    In a pause at least twice ``margin`` long the point stays ``margin`` s inside it, or as far
    inside as [lo, hi] allows (at least ``PAUSE_EDGE`` s: a sentence gap at the edge of reach beats
    a pause inside a sentence); in a shorter pause it is the pause's quietest point (its gap between
    words, not the faint end of a word that the quiet run may also hold)."""
    best: float | None = None
    for a, e, quietest in spans:
        if e - a < 2 * margin:  # a short pause: its quietest point
            aim0 = aim1 = quietest
            p0, p1 = max(a, lo), min(e, hi)
        else:
            aim0, aim1 = a + margin, e - margin
            p0, p1 = max(a + PAUSE_EDGE, lo), min(e - PAUSE_EDGE, hi)
        if p0 > p1 + EPS:
            continue
        point = min(max(min(max(b, aim0), aim1), p0), p1)
        if best is None or abs(point - b) < abs(best - b) - EPS:
            best = point
    return best


def snap_windows(
    windows: list[tuple[float, float]],
    pauses_near: Callable[[float, float], list[Pause]],
    tolerance: float,
    min_len: float,
    max_len: float,
) -> list[tuple[float, float]]:
    """Move each inner cut of ``windows`` to the nearest pause within ``tolerance`` seconds.

    ``pauses_near(lo, hi)`` gives the pauses (absolute seconds) found in [lo, hi]. Long pauses
    (between sentences or phrases) are preferred to nearer short ones (``PAUSE_TIERS``): a gap
    between two words is taken only when no longer pause is in reach. A cut with no pause in reach
    stays where it is. Cuts move in time order and every clip stays between ``min_len`` and ``max_len``; the
    first start and the last end (the video's ends) never move. Contiguous windows share a cut;
    overlapping windows move their starts and ends alike.
    """
    if len(windows) < 2 or tolerance <= 0:
        return windows
    fixed_ends = {windows[0][0], windows[-1][1]}
    moved: dict[float, float] = {}
    for cut in sorted({t for w in windows for t in w} - fixed_ends):
        lo, hi = cut - tolerance, cut + tolerance
        for s, e in windows:  # every clip that starts or ends at this cut keeps its length bounds
            if s == cut:  # its end moves later, against the new start: bound by the current end
                lo, hi = max(lo, e - max_len), min(hi, e - min_len)
            if e == cut:  # its start has moved already
                s2 = moved.get(s, s)
                lo, hi = max(lo, s2 + min_len), min(hi, s2 + max_len)
        new = cut
        if lo <= hi:
            spans = pauses_near(lo, hi)
            for shortest in PAUSE_TIERS:
                point = nearest_pause_point(cut, [p for p in spans if p.end - p.start >= shortest], lo, hi)
                if point is not None:
                    new = round(point, 3)
                    break
        moved[cut] = new
    return [(moved.get(s, s), moved.get(e, e)) for s, e in windows]


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

    def _snap(self, path: str, windows: list[tuple[float, float, list[float]]]) -> list[tuple[float, float, list[float]]]:
        """Fixed windows with their cuts moved into pauses of the audio (see the module docstring)."""
        cfg = self.config

        def pauses_near(lo: float, hi: float) -> list[Pause]:
            # 1 s of context on each side, so the floor and speech levels are those of the neighbourhood
            audio, t0 = load_audio_window(path, max(0.0, lo - 1.0), hi + 1.0)
            return [Pause(t0 + a, t0 + b, t0 + q) for a, b, q in pauses(audio)]

        try:
            snapped = snap_windows(
                [(s, e) for s, e, _ in windows], pauses_near, cfg.snap_tolerance_seconds,
                cfg.min_clip_seconds, cfg.max_clip_seconds,
            )  # fmt: skip
        except StageError as exc:  # audio that cannot be decoded: keep the plain windows, extract will tell
            log.warning("split %s: cuts not moved to pauses: %s", path, exc)
            return windows
        return [(s, e, []) for s, e in snapped]

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
        if self.config.mode == "fixed" and self.config.snap_to_silence and info.has_audio and len(windows) > 1:
            windows = self._snap(path, windows)
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

"""Media helpers shared by the download, split and extract stages (PyAV, in-process)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av

from pipeline.errors import StageError

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    duration: float
    has_video: bool
    has_audio: bool
    width: int | None
    height: int | None
    fps: float | None
    video_codec: str | None
    audio_codec: str | None


def _classify_open_failure(path: Path, exc: Exception) -> StageError:
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return StageError("file is empty (0 bytes)", "empty_file")
    lowered = head.lower()
    if b"<html" in lowered or b"<!doctype" in lowered:
        return StageError("file is an HTML page, not a video", "not_a_video")
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free") or head[:4] == b"\x1aE\xdf\xa3":
        return StageError(f"container is damaged or truncated: {exc}", "corrupt_media")
    return StageError(f"not a media file ffmpeg can read: {exc}", "not_a_video")


def probe(path: str | Path) -> ProbeResult:
    """Read container and stream metadata. Raises StageError with a typed reason."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"no such file: {p}", "not_found")
    if p.stat().st_size == 0:
        raise StageError("file is empty (0 bytes)", "empty_file")
    try:
        container = av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise _classify_open_failure(p, exc) from None
    with container:
        vs = next((s for s in container.streams.video if s.codec_context is not None), None)
        aus = next(iter(container.streams.audio), None)
        if vs is None and aus is None:
            raise StageError("file has neither a video nor an audio stream", "not_a_video")
        durations = []
        if container.duration is not None:
            durations.append(container.duration / av.time_base)
        for s in (vs, aus):
            if s is not None and s.duration is not None and s.time_base is not None:
                durations.append(float(s.duration * s.time_base))
        duration = max(durations) if durations else 0.0
        fps = None
        if vs is not None:
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            fps = float(rate) if rate else None
        return ProbeResult(
            duration=duration,
            has_video=vs is not None,
            has_audio=aus is not None,
            width=vs.codec_context.width if vs is not None else None,
            height=vs.codec_context.height if vs is not None else None,
            fps=fps,
            video_codec=vs.codec_context.name if vs is not None else None,
            audio_codec=aus.codec_context.name if aus is not None else None,
        )

"""Media helpers shared by the download, split and extract stages (PyAV, in-process)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av

import numpy as np

from pipeline.errors import StageError
from stages._picture import analysis_size

log = logging.getLogger(__name__)


AUDIO_SCAN_PACKETS = 4000  # packets demuxed (not decoded) to find out whether a declared audio stream has any


@dataclass
class ProbeResult:
    duration: float
    has_video: bool
    has_audio: bool
    width: int | None  # as displayed (rotation applied)
    height: int | None
    fps: float | None
    video_codec: str | None
    audio_codec: str | None
    rotation: int = 0  # degrees counter-clockwise the decoded frames are turned for display (0, 90, 180, -90)
    start_time: float = 0.0  # seconds of the container's first timestamp; clip times count from it
    notes: tuple[str, ...] = ()  # what was set aside: "cover_art", "empty_audio_stream"


def main_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The first real video stream: not cover art (an mp3/m4a picture, ``attached_pic``), decodable."""
    for s in container.streams.video:
        if s.codec_context is None:
            continue
        if s.disposition & (av.stream.Disposition.attached_pic | av.stream.Disposition.timed_thumbnails):
            continue
        return s
    return None


def stream_origin(container: av.container.InputContainer) -> float:
    """Seconds of the container's first timestamp. MPEG-TS starts at 1.4 s by default, and a cut or
    re-muxed stream can start far later or below zero; frame times minus this count from 0."""
    start = container.start_time
    return float(start) / av.time_base if start is not None else 0.0


def _audio_has_packets(path: Path, stream: av.audio.stream.AudioStream) -> bool:
    """Whether a declared audio stream carries any packet (demuxed, not decoded; bounded scan)."""
    if stream.frames and stream.frames > 0:  # counted by the container (mp4)
        return True
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            for i, packet in enumerate(container.demux()):
                if packet.stream.index == stream.index and packet.size > 0:
                    return True
                if i >= AUDIO_SCAN_PACKETS:
                    return True  # not found yet on a long file: let the decoder tell
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        log.debug("audio packet scan of %s stopped: %s", path, exc)
        return True
    return False


def display_rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Rotation (degrees, counter-clockwise) of the display matrix, read from the first decoded frame."""
    try:
        for frame in container.decode(stream):
            r = right_angle(frame.rotation)
            return -90 if r == 270 else r
    except (av.error.FFmpegError, ValueError) as exc:
        log.debug("no frame to read the rotation from: %s", exc)
    return 0




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
        vs = main_video_stream(container)
        aus = next(iter(container.streams.audio), None)
        notes: list[str] = []
        if vs is None and container.streams.video:
            notes.append("cover_art")
        if vs is None and aus is None:
            if notes:
                raise StageError("file holds only a still picture (cover art), no video or audio", "no_video")
            raise StageError("file has neither a video nor an audio stream", "not_a_video")
        if aus is not None and not _audio_has_packets(p, aus):
            notes.append("empty_audio_stream")
            log.info("%s: the audio stream holds no packets; treated as video without audio", p.name)
            aus = None
            if vs is None:
                raise StageError("the audio stream holds no packets and there is no video", "no_audio")
        durations = []
        if container.duration is not None:
            durations.append(container.duration / av.time_base)
        for s in (vs, aus):
            if s is not None and s.duration is not None and s.time_base is not None:
                durations.append(float(s.duration * s.time_base))
        duration = max(durations) if durations else 0.0
        fps = None
        width = height = None
        rotation = 0
        if vs is not None:
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            fps = float(rate) if rate else None
            width, height = vs.codec_context.width, vs.codec_context.height
            rotation = display_rotation(container, vs)
            if rotation in (90, -90):
                width, height = height, width
        return ProbeResult(
            duration=duration,
            has_video=vs is not None,
            has_audio=aus is not None,
            width=width,
            height=height,
            fps=fps,
            video_codec=vs.codec_context.name if vs is not None else None,
            audio_codec=aus.codec_context.name if aus is not None else None,
            rotation=rotation,
            start_time=stream_origin(container),
            notes=tuple(notes),
        )


def right_angle(rotation: float | None) -> int:
    """The display rotation rounded to a right angle (PIL's ``rotate`` turns counter-clockwise, as
    PyAV reports it; this reproduces ffmpeg's autorotate)."""
    return round((rotation or 0) / 90.0) * 90 % 360


def analysis_frame(frame: av.VideoFrame) -> np.ndarray:
    """Small area-averaged luma image of a decoded frame, limited range (black is 16), float32."""
    w, h = analysis_size(frame.width, frame.height)
    small = frame.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")
    y = small.planes[0]
    luma = np.frombuffer(y, np.uint8).reshape(h, y.line_size)[:, :w].astype(np.float32)
    if frame.color_range == 2:  # full range (yuvj*): black is 0; map onto the limited scale
        luma = 16.0 + luma * (219.0 / 255.0)
    return luma

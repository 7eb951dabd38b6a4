"""Audio loading and voice activity detection (silero-vad) for the audio stages.

``load_audio`` decodes any file PyAV opens into 16 kHz mono float32 (the extract stage already
writes that as FLAC, so this is a plain decode there). ``SileroVad`` finds speech spans with the
ONNX silero model that ships in the ``silero-vad`` package: no download, CPU only, ~1-3 ms per
second of audio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import StageError
from pipeline.storage import is_remote, localize

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
Span = tuple[float, float]


def load_audio(path: str | Path) -> np.ndarray:
    """Decode ``path`` to 16 kHz mono float32 in [-1, 1]. Raises StageError on unreadable audio."""
    import av

    if is_remote(path):  # staging on an object store
        path = localize(str(path))
    p = Path(path)
    if not p.exists():
        raise StageError(f"audio file not found: {p}", "not_found")
    if p.stat().st_size == 0:
        raise StageError(f"audio file is empty: {p}", "corrupt_media")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(p), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise StageError(f"no audio stream in {p.name}", "no_audio")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except StageError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise StageError(f"cannot decode audio {p.name}: {exc}", "corrupt_media") from None
    if not chunks:
        raise StageError(f"audio stream of {p.name} decodes to no samples", "corrupt_media")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.all(np.isfinite(audio)):
        raise StageError(f"audio of {p.name} holds NaN or infinite samples", "corrupt_media")
    return audio


def load_audio_window(path: str | Path, start: float, end: float) -> tuple[np.ndarray, float]:
    """Decode [start, end) seconds (from the stream's first sample) of ``path`` to 16 kHz mono float32.

    Seeks near ``start`` instead of decoding the whole track (cheap on long videos). Returns the
    samples and the time of the first one (close to ``start``; later when the audio starts later).
    Raises StageError when the file has no audio stream or cannot be decoded.
    """
    import av

    from stages._media import stream_origin

    if is_remote(path):
        path = localize(str(path))
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise StageError(f"cannot open {Path(path).name}: {exc}", "corrupt_media") from None
    chunks: list[np.ndarray] = []
    first: float | None = None
    with container:
        if not container.streams.audio:
            raise StageError(f"no audio stream in {Path(path).name}", "no_audio")
        stream = container.streams.audio[0]
        origin = stream_origin(container)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            if start > 1.0:
                container.seek(int((origin + start - 1.0) * av.time_base), backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time) - origin
                if first is None:
                    first = t
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                if t >= end:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            log.debug("audio window of %s: decoding stopped early: %s", path, exc)
    if first is None or not chunks:
        return np.zeros(0, np.float32), start
    audio = np.nan_to_num(np.concatenate(chunks).astype(np.float32, copy=False))
    skip = max(0, round((start - first) * SAMPLE_RATE))
    n = max(0, round((end - start) * SAMPLE_RATE))
    return audio[skip : skip + n], max(start, first)


HOP = 0.01  # seconds between energy frames


def frame_energy_db(audio: np.ndarray, window: float = 0.03) -> np.ndarray:
    """RMS level (dBFS) of ``window``-second frames every ``HOP`` s (frame k centred at k * HOP)."""
    hop = round(HOP * SAMPLE_RATE)
    win = round(window * SAMPLE_RATE)
    n = len(audio) // hop
    if n == 0:
        return np.zeros(0, np.float32)
    padded = np.pad(audio.astype(np.float64), (win // 2, win))
    csum = np.concatenate([[0.0], np.cumsum(padded * padded)])
    starts = np.arange(n) * hop
    power = (csum[starts + win] - csum[starts]) / win
    return (10 * np.log10(power + 1e-12)).astype(np.float32)


class Pause(NamedTuple):
    """A pause in speech (seconds)."""

    start: float
    end: float
    quietest: float  # centre of its quietest QUIET_WINDOW s


QUIET_WINDOW = 0.05  # seconds averaged when looking for the quietest point of a pause


def pauses(
    audio: np.ndarray,
    min_pause: float = 0.06,
    over_floor_db: float = 6.0,
    below_loud_db: float = 35.0,
    min_range_db: float = 12.0,
) -> list[Pause]:
    """Pauses in speech (seconds from the audio start), from energy relative to the local floor.

    A frame is quiet when its level is within ``over_floor_db`` of the floor (5th percentile of the
    levels: a room tone, a hum, a quiet music bed or digital silence) or ``below_loud_db`` under
    the loud level (95th percentile: the speech), whichever is higher. Runs of quiet frames
    at least ``min_pause`` long are pauses. Audio whose levels span less than ``min_range_db``
    (steady music, a tone, silence throughout) has no pauses to tell apart: [] is returned.

    A quiet run can hold the soft end of a word as well as the gap after it (the closure and the
    faint release of a final stop, a fading fricative, a few dB over a hum), so each pause also
    gives the centre of its quietest ``QUIET_WINDOW`` s: the gap between the words.
    """
    db = frame_energy_db(audio)
    if db.size < 5:
        return []
    floor, loud = float(np.percentile(db, 5)), float(np.percentile(db, 95))
    if loud - floor < min_range_db:
        return []
    quiet = db <= max(floor + over_floor_db, loud - below_loud_db)
    width = max(1, round(QUIET_WINDOW / HOP))
    out: list[Pause] = []
    k, n = 0, len(quiet)
    while k < n:
        if not quiet[k]:
            k += 1
            continue
        j = k
        while j < n and quiet[j]:
            j += 1
        a, b = k * HOP, j * HOP
        if b - a >= min_pause - 1e-9:
            run = db[k:j].astype(np.float64)
            w = min(width, len(run))
            mean = np.convolve(run, np.ones(w) / w, mode="valid")  # mean[i]: frames k+i .. k+i+w-1
            q = k + int(np.argmin(mean)) + (w - 1) / 2
            out.append(Pause(a, b, round(q * HOP, 3)))
        k = j
    return out


def span_seconds(spans: list[Span]) -> float:
    return float(sum(max(0.0, b - a) for a, b in spans))


def overlap_seconds(spans: list[Span], start: float, end: float) -> float:
    """Seconds of [start, end] covered by ``spans`` (which do not overlap each other)."""
    return float(sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans))


@dataclass
class VadResult:
    spans: list[Span]  # speech, seconds from the audio start
    duration: float

    @property
    def speech_seconds(self) -> float:
        return span_seconds(self.spans)

    @property
    def speech_ratio(self) -> float:
        return min(1.0, self.speech_seconds / self.duration) if self.duration > 0 else 0.0


class SileroVad:
    """silero-vad (ONNX) speech spans. Load once (``load``), then call ``detect`` per audio."""

    def __init__(self, threshold: float = 0.5, min_speech_ms: int = 250, min_silence_ms: int = 100) -> None:
        self.threshold = threshold
        self.min_speech_ms = min_speech_ms
        self.min_silence_ms = min_silence_ms
        self._model: Any = None
        self._timestamps: Any = None

    def load(self) -> None:
        import torch

        threads = torch.get_num_threads()
        from silero_vad import get_speech_timestamps, load_silero_vad  # sets torch threads to 1 on import

        torch.set_num_threads(threads)
        self._model = load_silero_vad(onnx=True)
        self._timestamps = get_speech_timestamps

    def detect(self, audio: np.ndarray) -> VadResult:
        import torch

        if self._model is None:
            self.load()
        duration = len(audio) / SAMPLE_RATE
        if len(audio) < 512:  # shorter than one VAD window (32 ms)
            return VadResult([], duration)
        stamps = self._timestamps(
            torch.from_numpy(np.ascontiguousarray(audio)),
            self._model,
            threshold=self.threshold,
            sampling_rate=SAMPLE_RATE,
            min_speech_duration_ms=self.min_speech_ms,
            min_silence_duration_ms=self.min_silence_ms,
            speech_pad_ms=30,
        )
        self._model.reset_states()
        spans = [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]
        return VadResult(spans, duration)

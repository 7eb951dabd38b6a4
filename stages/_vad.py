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
from typing import Any

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

"""Speech-aligned clip planning (``split.mode=speech``), the HowToCaption way.

The whole audio track of a video is transcribed once (VAD, then Whisper windows cut in silences,
with word timestamps). Clips are then cut *between* words: each clip covers whole words, ends
preferably at the end of an ASR segment (a sentence) and lasts between ``min_seconds`` and
``max_seconds``, as close to ``clip_seconds`` as the pauses allow. A cut sits in the pause between
two words, padded by up to ``PAD`` seconds of silence on each side, so no clip starts or ends inside
a word. Stretches without speech get no clip; a video without speech gets none (the split stage
then falls back to fixed windows).

The ASR model is loaded once per process and reused (``asr`` settings default to ``AsrConfig()``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import AsrConfig
from stages._vad import SAMPLE_RATE, SileroVad, load_audio
from stages._whisper import WhisperEngine, make_engine, transcribe_audios

log = logging.getLogger(__name__)

PAD = 0.2  # seconds of silence kept around the first and last word of a clip
_LOCK = threading.Lock()
_MODELS: dict[str, tuple[WhisperEngine, SileroVad | None]] = {}


@dataclass(frozen=True)
class TimedWord:
    start: float
    end: float
    sentence_end: bool  # last word of an ASR segment


def _models(asr: AsrConfig) -> tuple[WhisperEngine, SileroVad | None]:
    key = asr.model_dump_json()
    with _LOCK:
        if key not in _MODELS:
            vad = SileroVad(asr.vad_threshold) if asr.vad else None
            if vad is not None:
                vad.load()
            engine = make_engine(asr)
            engine.load()
            _MODELS[key] = (engine, vad)
        return _MODELS[key]


def speech_windows(
    words: list[TimedWord], duration: float, clip_seconds: float, min_seconds: float, max_seconds: float
) -> list[tuple[float, float]]:
    """Clip windows over timed words (sorted by start) that never cut a word.

    A window covers whole words, from a word's start to a later word's end, widened into the
    silence around it (``PAD`` s, or more to reach ``min_seconds``, never past the middle of the
    pause to the neighbouring word). Words too few for a clip of their own at the end join the
    previous clip while that stays within ``max_seconds``; a burst of speech that cannot reach
    ``min_seconds`` even with the silence around it gets no clip.
    """
    words = [w for w in words if w.end > w.start]
    n = len(words)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < n:
        fits = [j for j in range(i, n) if words[j].end - words[i].start <= max_seconds]
        if not fits:  # one word longer than a clip: a timestamp glitch, not a place to cut
            i += 1
            continue
        k = fits[-1]
        best_j, best_score = None, float("-inf")
        for j in fits:
            length = words[j].end - words[i].start
            if length < min_seconds:
                continue
            gap = words[j + 1].start - words[j].end if j + 1 < n else 1.0
            score = -abs(length - clip_seconds) / clip_seconds + float(words[j].sentence_end) + min(gap, 1.0)
            if score > best_score:
                best_j, best_score = j, score
        if best_j is not None:
            spans.append((i, best_j))
            i = best_j + 1
            continue
        if k == n - 1 and spans and words[k].end - words[spans[-1][0]].start <= max_seconds:
            spans[-1] = (spans[-1][0], k)  # a short tail joins the previous clip
            break
        spans.append((i, k))  # short: widened into the silence around it below, or dropped
        i = k + 1
    out = []
    for a, b in spans:
        lo = (words[a - 1].end + words[a].start) / 2 if a > 0 else 0.0
        hi = (words[b].end + words[b + 1].start) / 2 if b + 1 < n else duration
        length = words[b].end - words[a].start
        pad = max(min(PAD, (max_seconds - length) / 2), (min_seconds - length) / 2, 0.0)
        start = max(lo, words[a].start - pad)
        end = min(hi, words[b].end + pad)
        if end - start < min_seconds:  # use the silence on the other side
            end = min(hi, start + min_seconds)
            start = max(lo, end - min_seconds)
        if end - start >= min_seconds - 1e-6:
            out.append((round(max(0.0, start), 3), round(min(duration, end), 3)))
    return out


def transcribe_words(path: str | Path, asr: AsrConfig | None = None) -> tuple[list[TimedWord], float]:
    """Timed words of the whole audio track of ``path``, and its duration in seconds."""
    asr = asr or AsrConfig()
    if not asr.word_timestamps:
        asr = asr.model_copy(update={"word_timestamps": True})
    engine, vad = _models(asr)
    audio = load_audio(path)
    duration = len(audio) / SAMPLE_RATE
    speech = vad.detect(audio).spans if vad is not None else None
    if speech is not None and not speech:
        return [], duration
    (tr,) = transcribe_audios(engine, [audio], [speech], asr.batch_size)
    words: list[TimedWord] = []
    for seg in tr.segments:
        for k, w in enumerate(seg.words):
            words.append(TimedWord(w.start, w.end, k == len(seg.words) - 1))
    words.sort(key=lambda w: w.start)
    return words, duration


def plan_speech_clips(
    path: str | Path,
    clip_seconds: float,
    min_seconds: float,
    max_seconds: float,
    asr: AsrConfig | None = None,
) -> list[tuple[float, float]]:
    """(start, end) of clips cut between words of the speech in ``path``; [] when there is none."""
    words, duration = transcribe_words(path, asr)
    windows = speech_windows(words, duration, clip_seconds, min_seconds, max_seconds)
    log.debug("speech split %s: %d words -> %d clips", path, len(words), len(windows))
    return windows

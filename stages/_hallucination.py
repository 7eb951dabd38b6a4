"""Guards against Whisper's known failure modes on silence, music and noise.

Whisper invents text where there is no speech: loops of one phrase ("Thank you. Thank you. ..."),
subtitle credits learned from its training data ("Subtitles by the Amara.org community"), stock
endings ("Thanks for watching!"), music symbols, and low-confidence babble. Each guard below looks at
one signal; :func:`judge` applies them to every segment and to the clip as a whole.

Outcome (what the ASR stage writes):

* a segment with a flag is not used as speech: its text stays in ``asr_segments`` (nothing is
  lost) and ``asr_flags`` gets ``"REASON@INDEX"`` (index into ``asr_segments``);
* a clip-level flag (``"REASON"``, no index) rejects the whole transcript;
* ``transcript`` holds the text of the unflagged segments, or None when none is usable.

Reasons: ``repetition``, ``compression_ratio``, ``low_logprob``, ``no_speech_prob``,
``outside_vad_speech``, ``boilerplate``, ``non_speech_text`` and, for a whole clip,
``no_vad_speech`` (text on a clip where the VAD found no speech).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import AsrConfig
from schemas.records import Segment
from stages._vad import Span, overlap_seconds, span_seconds

MAX_NGRAM = 8

# Credits and watermarks Whisper copies from subtitle files: flagged wherever they appear.
_CREDIT_PATTERNS = re.compile(
    r"amara\.org|\bsubtitles?\s+(?:by|made\s+by|created\s+by|provided\s+by)\b|\bcaptions?\s+by\b"
    r"|\btranscri(?:bed|ption|pt)\s+by\b|\btranslated\s+by\b|castingwords|\bwww\.|https?://"
    r"|sous-titr|untertitel|subt[ií]tulos\s+(?:realizados|por|hechos)|sottotitoli"
    r"|字幕|продолжение следует|редактор субтитров|mbc\s*뉴스",
    re.IGNORECASE,
)

# Stock phrases Whisper emits on silence and music: flagged when they are the whole segment and
# the VAD heard (almost) no speech under it. Compared after ``normalize``.
STOCK_PHRASES: frozenset[str] = frozenset(
    {
        "you", "so", "bye", "bye bye", "okay", "oh", "uh", "um", "hmm",
        "thank you", "thank you very much", "thank you so much", "thanks",
        "thanks for watching", "thank you for watching", "thank you so much for watching",
        "thanks for watching and see you next time", "see you next time", "see you in the next video",
        "please subscribe", "subscribe to my channel", "like and subscribe",
        "please like and subscribe", "dont forget to like and subscribe",
        "merci", "merci davoir regardé", "vielen dank", "danke", "danke fürs zuschauen", "gracias",
        "gracias por ver", "obrigado", "grazie", "ご視聴ありがとうございました", "谢谢观看", "감사합니다",
    }
)  # fmt: skip

# Music symbols and sound-effect tags such as "♪", "[Music]", "(upbeat music)", "*applause*".
_NON_SPEECH = re.compile(r"^(?:\s|[♪♫♬♩#*~\-.…]|\[[^\]]*\]|\([^)]*\)|\*[^*]*\*)*$")


def normalize(text: str) -> str:
    """Lower case, punctuation and apostrophes removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("’", "")
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def compression_ratio(text: str) -> float:
    """gzip compression ratio of the UTF-8 text (Whisper's own repetition signal)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def longest_repeat(text: str, max_n: int = MAX_NGRAM) -> int:
    """The most consecutive copies of any word n-gram (n <= ``max_n``) in ``text``.

    "thank you thank you thank you" gives 3; a text without a repeat gives 1. Languages written
    without spaces are compared by characters.
    """
    norm = normalize(text)
    words = norm.split()
    tokens: Sequence[str] = words
    if words and len(norm) / len(words) > 12:  # a script written without spaces
        tokens = [ch for ch in norm if not ch.isspace()]
    best = 1 if tokens else 0
    for n in range(1, min(max_n, len(tokens) // 2) + 1):
        i = 0
        while i + 2 * n <= len(tokens):
            run = 1
            while tokens[i + run * n : i + (run + 1) * n] == tokens[i : i + n]:
                run += 1
            best = max(best, run)
            i += 1
    return best


def is_boilerplate(text: str) -> bool:
    """Subtitle credits anywhere in ``text``."""
    return bool(_CREDIT_PATTERNS.search(text))


def is_stock_phrase(text: str) -> bool:
    return normalize(text) in STOCK_PHRASES


def is_non_speech_text(text: str) -> bool:
    """Only music symbols, bracketed sound tags and punctuation (an empty text is not)."""
    return bool(text.strip()) and bool(_NON_SPEECH.match(text))


def _repeat_limit(cfg: AsrConfig, text: str) -> bool:
    return longest_repeat(text) >= cfg.max_ngram_repeats


def segment_reasons(seg: Segment, cfg: AsrConfig, speech: list[Span] | None) -> list[str]:
    """Why one segment is not usable as speech (empty: it is). ``speech``: VAD spans or None."""
    text = seg.text.strip()
    if not text:
        return []
    reasons: list[str] = []
    if is_non_speech_text(text):
        reasons.append("non_speech_text")
    if is_boilerplate(text):
        reasons.append("boilerplate")
    if _repeat_limit(cfg, text):
        reasons.append("repetition")
    ratio = seg.compression_ratio if seg.compression_ratio is not None else compression_ratio(text)
    if ratio > cfg.max_compression_ratio:
        reasons.append("compression_ratio")
    low = seg.avg_logprob is not None and seg.avg_logprob < cfg.min_avg_logprob
    if low:
        reasons.append("low_logprob")
    if low and seg.no_speech_prob is not None and seg.no_speech_prob > cfg.max_no_speech_prob:
        reasons.append("no_speech_prob")
    covered: float | None = None
    if speech is not None:
        length = max(seg.end - seg.start, 1e-3)
        covered = overlap_seconds(speech, seg.start, seg.end) / length
        if covered < cfg.min_vad_overlap:
            reasons.append("outside_vad_speech")
    if is_stock_phrase(text) and (covered is None or covered < 0.5):
        reasons.append("boilerplate")
    return sorted(set(reasons))


@dataclass
class Verdict:
    transcript: str | None
    flags: list[str]


def judge(segments: list[Segment], cfg: AsrConfig, speech: list[Span] | None) -> Verdict:
    """Apply every guard to ``segments`` (times relative to the clip) and to their joined text.

    ``speech``: the clip's VAD speech spans, or None when VAD did not run.
    """
    flags: list[str] = []
    kept: list[str] = []
    for i, seg in enumerate(segments):
        reasons = segment_reasons(seg, cfg, speech)
        flags.extend(f"{r}@{i}" for r in reasons)
        if not reasons and seg.text.strip():
            kept.append(seg.text.strip())
    if speech is not None and span_seconds(speech) < cfg.min_speech_seconds and any(s.text.strip() for s in segments):
        flags.append("no_vad_speech")
    whole = " ".join(kept)  # loops across segments, in the text that would be used as speech
    if len(kept) > 1 and _repeat_limit(cfg, whole):
        flags.append("repetition")
    if len(kept) > 1 and compression_ratio(whole) > cfg.max_compression_ratio:
        flags.append("compression_ratio")
    clip_level = any("@" not in f for f in flags)
    transcript = None if clip_level or not kept else " ".join(kept)
    return Verdict(transcript, flags)

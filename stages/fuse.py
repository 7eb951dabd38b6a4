"""LLM caption fusion: a prompt preset rendered from the clip's signals, a structured answer,
one repair attempt, and a deterministic fallback caption when the model gives nothing usable.

Writes ``captions`` (the clip's other captions kept, earlier fused ones replaced by kind
``fused`` / ``fused_<modality>``, each with provenance in ``extra_json``), ``caption`` (the final
caption) and ``llm_flags`` (``fuse_fallback:<reason>``, ``suspected_injection:<signal>``).
The ``wavcaps`` preset may reject a clip whose text says nothing about the sound:
``drop_reason="no_sound_description"``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pipeline.config import FuseConfig, LLMStageConfig
from pipeline.stage import Resources, Row, Stage, StageContext
from schemas.llm import Answer, FAVDAnswer, HowToCaptionAnswer, MMTrailAnswer, TimedCaption, WavCapsAnswer
from stages._llm import LLMBackend, make_backend
from stages._prompts import (
    FUSED_KINDS_PREFIX,
    JUDGE_KIND,
    Outcome,
    Preset,
    Rendered,
    Signals,
    ask_structured,
    load_preset,
    render,
    signals_from_row,
)

log = logging.getLogger(__name__)

FALLBACK_MODEL = "fallback"
REJECTED_REASON = "no_sound_description"


# --------------------------------------------------------------------------- shared by fuse and judge


def llm_resources(cfg: LLMStageConfig) -> Resources:
    """Worker resources of an LLM stage: GPUs for vLLM, CPU threads for llama.cpp."""
    llm = cfg.llm
    if llm.backend == "vllm":
        return Resources(cpus=llm.cpus, gpus=float(llm.tensor_parallel_size), pool_size=llm.replicas)
    if llm.backend == "llama_cpp":
        return Resources(cpus=float(llm.threads or llm.cpus), pool_size=llm.replicas)
    return Resources(cpus=llm.cpus, pool_size=llm.replicas)


L = TypeVar("L", bound=LLMStageConfig)


class LLMStage(Stage[L]):
    """What the fuse and judge stages share: a preset and a backend loaded in ``setup``, an actor
    pool sized by the backend (``llm_resources``), batches of ``batch_size``."""

    stateful = True

    def __init__(self, config: L, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self.preset: Preset | None = None
        self.backend: LLMBackend | None = None

    @property
    def resources(self) -> Resources:
        return llm_resources(self.config)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def check_preset(self, preset: Preset) -> None:
        """Raise ValueError when ``preset`` does not answer what this stage needs."""

    def setup(self) -> None:
        self.preset = load_preset(self.config.preset, self.config.prompts_dir)
        self.check_preset(self.preset)
        self.backend = make_backend(self.config.llm)
        log.info("%s: preset %s with %s/%s", self.name, self.preset.prompt_id, self.backend.name, self.backend.model_id)

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def provenance(
    stage: str, preset: Preset, backend: LLMBackend, cfg: LLMStageConfig, rendered: Rendered, outcome: Outcome
) -> dict[str, Any]:
    """Everything needed to trace a caption back to its call: preset, model, sampling, inputs, raw answers."""
    prompt_tokens, completion_tokens = outcome.tokens()
    llm = cfg.llm
    return {
        "stage": stage,
        "preset": preset.name,
        "preset_version": preset.version,
        "backend": backend.name,
        "model": backend.model_id,
        "sampling": {
            "temperature": llm.temperature,
            "top_p": llm.top_p,
            "seed": llm.seed,
            "repetition_penalty": llm.repetition_penalty if backend.name != "openai" else None,
            "max_tokens": llm.max_tokens or preset.max_tokens,
            "json_mode": llm.json_mode,
        },
        "inputs": rendered.shown,
        "prompt": rendered.messages[-1]["content"],
        "raw_answer": outcome.attempts[-1]["raw"] if outcome.attempts else None,
        "attempts": outcome.attempts,
        "fallback": outcome.answer is None,
        "failure": outcome.failure,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "input_flags": rendered.flags,
    }


def _caption(kind: str, text: str, model: str, preset: Preset, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind,
        "text": text,
        "model": model,
        "prompt_id": preset.prompt_id,
        "extra_json": json.dumps(extra, ensure_ascii=False),
    }


# --------------------------------------------------------------------------- deterministic fallbacks


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?…" else text + "."


def _join_labels(labels: list[str], limit: int = 3) -> str:
    picked = [label.lower() for label in labels[:limit]]
    if len(picked) <= 1:
        return "".join(picked)
    return ", ".join(picked[:-1]) + " and " + picked[-1]


def _visual_text(s: Signals) -> str:
    for kind, text in s.input_captions:
        if "visual" in kind or kind in ("image", "video", "frame"):
            return _sentence(text)
    if s.visual_labels:
        return f"A video showing {_join_labels(s.visual_labels)}."
    return ""


def _audio_text(s: Signals) -> str:
    for kind, text in s.input_captions:
        if "audio" in kind:
            return _sentence(text)
    if s.audio_labels:
        return f"Sounds of {_join_labels(s.audio_labels)}."
    return ""


def _music_text(s: Signals) -> str:
    music = [label for label in s.audio_labels if any(w in label.lower() for w in ("music", "sing", "song"))]
    return f"{music[0]} can be heard." if music else ""


def _speech_text(s: Signals) -> str:
    if not s.transcript:
        return ""
    quote = s.transcript if len(s.transcript) <= 200 else s.transcript[:199].rstrip() + "…"
    return f'Someone says: "{quote}"'


def _title_text(s: Signals) -> str:
    return f'A video titled "{s.title}".' if s.title else "A video clip."


def fallback_answer(answer: str, s: Signals) -> Answer:
    """A deterministic answer of shape ``answer`` assembled from the signals alone."""
    visual, audio, music, speech = _visual_text(s), _audio_text(s), _music_text(s), _speech_text(s)
    if answer == "mmtrail":
        main = " ".join(p for p in (visual, audio, speech) if p) or _title_text(s)
        return MMTrailAnswer(
            audio_visual_caption=main[:600],
            visual_caption=visual[:400],
            audio_caption=audio[:400],
            music_caption=music[:400],
            speech_caption=speech[:400],
        )
    if answer == "wavcaps":  # a fallback never rejects: the model did not decide
        return WavCapsAnswer(about_sound=True, caption=(audio or _title_text(s))[:300])
    if answer == "howtocaption":
        end = s.duration or 0.0
        parts = s.segments or [(0.0, end, s.transcript or _title_text(s))]
        return HowToCaptionAnswer(captions=[TimedCaption(start=a, end=max(a, b), text=t[:300]) for a, b, t in parts[:32]])
    if answer == "favd":
        return FAVDAnswer(
            summary=_title_text(s)[:300],
            visual_details=(visual or "No visual details are available.")[:600],
            audio_details=(" ".join(p for p in (audio, speech) if p) or "No audio details are available.")[:600],
        )
    raise ValueError(f"no deterministic fallback for answer shape {answer!r}")


# --------------------------------------------------------------------------- answer -> captions


def _timed(c: TimedCaption) -> str:
    return f"{c.start:.1f}s: {c.text}"


def captions_of(answer: Answer) -> tuple[str, dict[str, str]]:
    """The final caption and the per-modality captions (kind suffix -> text) of an answer."""
    if isinstance(answer, MMTrailAnswer):
        parts = {
            "visual": answer.visual_caption,
            "audio": answer.audio_caption,
            "music": answer.music_caption,
            "speech": answer.speech_caption,
        }
        return answer.audio_visual_caption, {k: v for k, v in parts.items() if v}
    if isinstance(answer, WavCapsAnswer):
        return answer.caption, {}
    if isinstance(answer, HowToCaptionAnswer):
        return "\n".join(_timed(c) for c in answer.captions), {}
    if isinstance(answer, FAVDAnswer):
        return " ".join(_sentence(p) for p in (answer.summary, answer.visual_details, answer.audio_details)), {}
    raise TypeError(f"fuse cannot use answer {type(answer).__name__}")


# --------------------------------------------------------------------------- the stage


class FuseStage(LLMStage[FuseConfig]):
    name = "fuse"
    reads = (
        "title",
        "metadata_json",
        "clip_start",
        "clip_end",
        "transcript",
        "asr_segments",
        "audio_tags",
        "visual_tags",
        "captions",
    )
    writes = ("captions", "caption", "llm_flags", "drop_reason")

    def check_preset(self, preset: Preset) -> None:
        if preset.answer == "judge":
            raise ValueError(f"preset {preset.name!r} is a judge preset; use it in the judge stage")

    def process_batch(self, rows: list[Row]) -> list[Any]:
        assert self.preset is not None and self.backend is not None, "setup() first"
        signals = [signals_from_row(r, self.config.max_field_chars) for r in rows]
        rendered = [render(self.preset, s) for s in signals]
        outcomes = ask_structured(self.backend, self.preset, rendered, temperature=self.config.llm.temperature)
        return [self._update(r, s, p, o) for r, s, p, o in zip(rows, signals, rendered, outcomes, strict=True)]

    def _update(self, row: Row, signals: Signals, rendered: Rendered, outcome: Outcome) -> dict[str, Any]:
        assert self.preset is not None and self.backend is not None
        preset, backend = self.preset, self.backend
        extra = provenance(self.name, preset, backend, self.config, rendered, outcome)
        flags = [f for f in (row.get("llm_flags") or []) if not f.startswith("fuse_")]
        flags += [f for f in rendered.flags if f not in flags]
        answer = outcome.answer
        model = backend.model_id
        if answer is None:
            answer = fallback_answer(preset.answer, signals)
            model = FALLBACK_MODEL
            flags.append(f"fuse_fallback:{outcome.failure_reason}")
        extra["answer"] = answer.model_dump()
        kept = [
            c
            for c in (row.get("captions") or [])
            if not str(c.get("kind", "")).startswith(FUSED_KINDS_PREFIX) and c.get("kind") != JUDGE_KIND
        ]
        update: dict[str, Any] = {"llm_flags": flags}
        if isinstance(answer, WavCapsAnswer) and not answer.about_sound:
            flags.append("fuse_rejected:no_sound_description")
            kept.append(_caption(FUSED_KINDS_PREFIX, "", model, preset, extra))
            return {**update, "captions": kept, "caption": None, "drop_reason": REJECTED_REASON}
        main, parts = captions_of(answer)
        kept.append(_caption(FUSED_KINDS_PREFIX, main, model, preset, extra))
        small = {k: extra[k] for k in ("stage", "preset", "preset_version", "backend", "model", "fallback")}
        for modality, text in parts.items():
            kept.append(_caption(f"{FUSED_KINDS_PREFIX}_{modality}", text, model, preset, {**small, "part_of": "fused"}))
        return {**update, "captions": kept, "caption": main}

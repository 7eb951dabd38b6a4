"""LLM caption fusion: a prompt preset rendered from the clip's signals, a structured answer,
one repair attempt, a grounding check, and a deterministic fallback caption when the model gives
nothing usable.

Grounding (``fuse.grounding``, stages/_grounding.py): every text of the answer is checked against
the signals the model was shown (signals flagged as suspected injection support nothing). First,
per-modality captions whose signal is absent are emptied (no ``music_caption`` without a music tag,
no ``speech_caption`` without a transcript, no visual caption without visual tags or a visual
caption). Then a text whose supported share of content words is below ``min_share``, or that holds
an unsupported name or number, is repaired (its unsupported sentences and clauses dropped); when
that leaves a required text empty or still ungrounded, the model is asked once more with the
unsupported words named; when that fails too, the deterministic caption replaces the answer.
The provenance (``extra_json["grounding"]["outcome"]``) says which happened: ``llm``,
``repaired``, ``retried`` or ``fallback``.

Writes ``captions`` (the clip's other captions kept, earlier fused ones replaced by kind
``fused`` / ``fused_<modality>``, each with provenance in ``extra_json``), ``caption`` (the final
caption), a ``Score(name="caption_grounding")`` in ``scores`` (share of the shipped texts' content
words the signals support) and ``llm_flags``
(``fuse_fallback:<reason>`` with reason ``ungrounded`` for a grounding fallback,
``caption_grounding:repaired|retried``, ``ungrounded_caption`` when the shipped caption is still not
grounded, ``suspected_injection:<signal>``). The ``wavcaps`` preset may reject a clip whose text says
nothing about the sound: ``drop_reason="no_sound_description"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from pipeline.config import CaptionGroundingConfig, FuseConfig, LLMStageConfig
from pipeline.stage import Resources, Row, Stage, StageContext
from schemas.llm import Answer, FAVDAnswer, HowToCaptionAnswer, MMTrailAnswer, TimedCaption, WavCapsAnswer
from stages._grounding import EMPTY, Grounding, Support, carried_share, check, normalise_words, repair
from stages._llm import LLMBackend, make_backend
from stages._prompts import (
    FUSED_KINDS_PREFIX,
    INJECTION_FLAG,
    JUDGE_KIND,
    Outcome,
    Preset,
    Rendered,
    Signals,
    ask_grounding_retry,
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
    """Worker resources of an LLM stage: GPUs for vLLM, CPU threads for llama.cpp and transformers."""
    llm = cfg.llm
    if llm.backend == "vllm":
        return Resources(cpus=llm.cpus, gpus=float(llm.tensor_parallel_size), pool_size=llm.replicas)
    if llm.backend == "llama_cpp":
        return Resources(cpus=float(llm.threads or llm.cpus), pool_size=llm.replicas)
    if llm.backend == "transformers":  # CPU threads, or a GPU share when llm.gpus > 0
        return Resources(cpus=float(llm.threads or llm.cpus), gpus=llm.gpus, pool_size=llm.replicas)
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


# --------------------------------------------------------------------------- grounding

GROUNDING_SCORE = "caption_grounding"
GROUNDING_FLAG = "caption_grounding:"  # + repaired | retried
UNGROUNDED_FLAG = "ungrounded_caption"
UNGROUNDED_REASON = "ungrounded"  # fuse_fallback:ungrounded
NO_VISUAL = "No visual details are available."
NO_AUDIO = "No audio details are available."
_SUPPORT_SIGNALS = ("title", "description", "keywords", "metadata", "transcript", "timed_transcript", "captions", "duration")


@dataclass
class ClipEvidence:
    """What the signals shown to the model support, and which modalities they attest."""

    support: Support
    visual: bool
    audio: bool
    music: bool
    speech: bool
    flagged: frozenset[str]  # signals with suspected injection: they support nothing


def clip_evidence(signals: Signals, rendered: Rendered, cfg: CaptionGroundingConfig) -> ClipEvidence:
    """The support of one clip's prompt: the text of every signal shown (tags above
    ``min_tag_score``), less the signals flagged as suspected injection."""
    shown = rendered.shown
    flagged = frozenset(f[len(INJECTION_FLAG) :] for f in rendered.flags if f.startswith(INJECTION_FLAG))
    support = Support(allowed=normalise_words(cfg.extra_allowed_words))
    for name in _SUPPORT_SIGNALS:
        if name in shown and name not in flagged:
            support.add_text(shown[name])
    visual = audio = music = False
    if "audio_tags" in shown:
        for label, score in signals.audio_tags:
            if score >= cfg.min_tag_score:
                support.add_label(label)
                audio = True
    if "visual_tags" in shown:
        for label, score in signals.visual_tags:
            if score >= cfg.min_tag_score:
                support.add_label(label)
                visual = True
    if "captions" in shown:
        for kind, _text in signals.input_captions:
            kind = kind.lower()
            visual |= "visual" in kind or kind in ("image", "video", "frame")
            audio |= "audio" in kind or "music" in kind
            music |= "music" in kind
    speech = "transcript" in shown or "timed_transcript" in shown
    music |= "music" in support.conditions
    audio |= speech or music
    support.conditions.update(c for c, on in (("visual", visual), ("audio", audio), ("music", music), ("speech", speech)) if on)
    return ClipEvidence(support, visual, audio, music, speech, flagged)


def gate_modalities(answer: Answer, ev: ClipEvidence) -> tuple[Answer, list[str]]:
    """Empty the per-modality texts whose signal is absent; returns the answer and the fields emptied."""
    if isinstance(answer, MMTrailAnswer):
        rules = {"visual_caption": ev.visual, "audio_caption": ev.audio, "music_caption": ev.music, "speech_caption": ev.speech}
        emptied = [f for f, present in rules.items() if not present and getattr(answer, f)]
        return (answer.model_copy(update={f: "" for f in emptied}) if emptied else answer), emptied
    if isinstance(answer, FAVDAnswer):
        update = {}
        if not ev.visual and answer.visual_details != NO_VISUAL:
            update["visual_details"] = NO_VISUAL
        if not ev.audio and answer.audio_details != NO_AUDIO:
            update["audio_details"] = NO_AUDIO
        return (answer.model_copy(update=update) if update else answer), sorted(update)
    return answer, []


def answer_texts(answer: Answer) -> dict[str, str]:
    """The texts of an answer that a grounding check reads, by field (``captions.N`` for timed ones)."""
    if isinstance(answer, MMTrailAnswer):
        return {f: getattr(answer, f) for f in ("audio_visual_caption", "visual_caption", "audio_caption", "music_caption", "speech_caption")}
    if isinstance(answer, WavCapsAnswer):
        return {"caption": answer.caption} if answer.about_sound else {}
    if isinstance(answer, HowToCaptionAnswer):
        return {f"captions.{i}": c.text for i, c in enumerate(answer.captions)}
    if isinstance(answer, FAVDAnswer):
        return {"summary": answer.summary, "visual_details": answer.visual_details, "audio_details": answer.audio_details}
    raise TypeError(f"no grounding for answer {type(answer).__name__}")


@dataclass
class AnswerGrounding:
    total: Grounding  # all texts of the answer together
    failing: list[str]  # the fields that are not grounded

    @property
    def grounded(self) -> bool:
        return not self.failing

    def summary(self) -> dict[str, Any]:
        return {
            "score": round(self.total.score, 4),
            "grounded": self.grounded,
            "content_words": self.total.content,
            "unsupported": self.total.unsupported[:40],
            "names": self.total.names[:20],
            "numbers": self.total.numbers[:20],
            "failing_fields": self.failing,
        }


def ground_answer(answer: Answer, ev: ClipEvidence, cfg: CaptionGroundingConfig) -> AnswerGrounding:
    """Check every text of ``answer``; grounded when each text is."""
    fields = {name: check(text, ev.support) for name, text in answer_texts(answer).items() if text}
    total = EMPTY
    for g in fields.values():
        total = total + g
    # a text without a single content word ("...", "-") says nothing: it fails like an invented one
    failing = [f for f, g in fields.items() if not g.content or not g.grounded(cfg.min_share, cfg.max_unsupported_names)]
    return AnswerGrounding(total, failing)


def repair_answer(answer: Answer, ev: ClipEvidence, cfg: CaptionGroundingConfig) -> tuple[Answer | None, list[str]]:
    """``answer`` with the unsupported sentences and clauses of its ungrounded texts dropped, or None
    when a required text is left empty (or the result is still not grounded); and the fields changed."""
    changed: list[str] = []

    def fix(text: str) -> str:
        g = check(text, ev.support)
        if not text or (g.content and g.grounded(cfg.min_share, cfg.max_unsupported_names)):
            return text
        return repair(text, ev.support, cfg.min_share)

    data = answer.model_dump()
    if isinstance(answer, HowToCaptionAnswer):
        captions = []
        for i, c in enumerate(data["captions"]):
            new = fix(c["text"])
            if new != c["text"]:
                changed.append(f"captions.{i}")
            if new:
                captions.append({**c, "text": new})
        data["captions"] = captions
    else:
        for name, text in answer_texts(answer).items():
            new = fix(text)
            if new != text:
                changed.append(name)
                data[name] = new
    try:
        fixed = type(answer).model_validate(data)
    except ValidationError:
        return None, changed  # a required text left empty
    if not ground_answer(fixed, ev, cfg).grounded:
        return None, changed
    return fixed, changed


# --------------------------------------------------------------------------- the stage


@dataclass
class _Pending:
    """One row between the first answer and the shipped one."""

    answer: Answer | None
    outcome: str  # llm | repaired | retried | fallback
    grounding: dict[str, Any]


# the clip's signals a prompt shows (fuse and judge read the same ones)
SIGNAL_READS = (
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


class FuseStage(LLMStage[FuseConfig]):
    name = "fuse"
    reads = (*SIGNAL_READS, "scores")
    # the signals are used when an earlier stage wrote them (a WavCaps rewrite needs none of them)
    optional_reads = ("transcript", "asr_segments", "audio_tags", "visual_tags", "captions", "scores")
    writes = ("captions", "caption", "scores", "llm_flags", "drop_reason")

    def check_preset(self, preset: Preset) -> None:
        if preset.answer == "judge":
            raise ValueError(f"preset {preset.name!r} is a judge preset; use it in the judge stage")

    def process_batch(self, rows: list[Row]) -> list[Any]:
        assert self.preset is not None and self.backend is not None, "setup() first"
        signals = [signals_from_row(r, self.config.max_field_chars) for r in rows]
        rendered = [render(self.preset, s) for s in signals]
        outcomes = ask_structured(self.backend, self.preset, rendered, temperature=self.config.llm.temperature)
        evidence = [clip_evidence(s, p, self.config.grounding) for s, p in zip(signals, rendered, strict=True)]
        pending = self._ground(rendered, outcomes, evidence)
        return [
            self._update(r, s, p, o, e, g)
            for r, s, p, o, e, g in zip(rows, signals, rendered, outcomes, evidence, pending, strict=True)
        ]

    def _ground(self, rendered: list[Rendered], outcomes: list[Outcome], evidence: list[ClipEvidence]) -> list[_Pending]:
        """Gate, check, repair and (once, batched) retry every answer; fallback is left to ``_update``."""
        assert self.preset is not None and self.backend is not None
        cfg = self.config.grounding
        pending: list[_Pending] = []
        retry: list[int] = []
        for i, (outcome, ev) in enumerate(zip(outcomes, evidence, strict=True)):
            answer = outcome.answer
            if answer is None or cfg.mode == "off":
                pending.append(_Pending(answer, "llm" if answer is not None else "fallback", {}))
                continue
            answer, emptied = gate_modalities(answer, ev)
            first = ground_answer(answer, ev, cfg)
            info: dict[str, Any] = {"first": first.summary(), "emptied": emptied}
            if first.grounded or cfg.mode == "flag":
                pending.append(_Pending(answer, "llm", info))
                continue
            fixed, changed = repair_answer(answer, ev, cfg)
            if fixed is not None:
                pending.append(_Pending(fixed, "repaired", {**info, "repaired_fields": changed}))
                continue
            pending.append(_Pending(None, "fallback", info))
            if cfg.retry:
                retry.append(i)
        if retry:
            items = []
            for i in retry:
                first = pending[i].grounding["first"]
                words = first["unsupported"] or [f"{f} (says nothing)" for f in first["failing_fields"]]
                items.append((rendered[i], outcomes[i].attempts[-1]["raw"] if outcomes[i].attempts else None, words))
            answers = ask_grounding_retry(self.backend, self.preset, items, temperature=self.config.llm.temperature)
            for i, (answer, attempt) in zip(retry, answers, strict=True):
                outcomes[i].attempts.append(attempt)
                info = pending[i].grounding
                if answer is None:
                    info["retry"] = {"error": attempt["error"]}
                    continue
                answer, emptied = gate_modalities(answer, evidence[i])
                again = ground_answer(answer, evidence[i], cfg)
                info["retry"] = {**again.summary(), "emptied": emptied}
                if not again.grounded:
                    answer, changed = repair_answer(answer, evidence[i], cfg)
                    info["retry"]["repaired_fields"] = changed
                if answer is not None:
                    pending[i] = _Pending(answer, "retried", info)
        return pending

    def _update(
        self, row: Row, signals: Signals, rendered: Rendered, outcome: Outcome, ev: ClipEvidence, pending: _Pending
    ) -> dict[str, Any]:
        assert self.preset is not None and self.backend is not None
        preset, backend, cfg = self.preset, self.backend, self.config.grounding
        extra = provenance(self.name, preset, backend, self.config, rendered, outcome)
        drop = ("fuse_", GROUNDING_FLAG, UNGROUNDED_FLAG)
        flags = [f for f in (row.get("llm_flags") or []) if not f.startswith(drop)]
        flags += [f for f in rendered.flags if f not in flags]
        answer = pending.answer
        model = backend.model_id
        if answer is None:
            answer = fallback_answer(preset.answer, _trusted(signals, ev.flagged))
            model = FALLBACK_MODEL
            reason = outcome.failure_reason if outcome.answer is None else UNGROUNDED_REASON
            flags.append(f"fuse_fallback:{reason}")
            extra["fallback"] = True
            extra["failure"] = outcome.failure if outcome.answer is None else f"{UNGROUNDED_REASON}: no grounded answer"
        elif pending.outcome in ("repaired", "retried"):
            flags.append(f"{GROUNDING_FLAG}{pending.outcome}")
        extra["answer"] = answer.model_dump()
        update: dict[str, Any] = {"llm_flags": flags}
        scores = [s for s in (row.get("scores") or []) if s.get("name") != GROUNDING_SCORE]
        if cfg.mode != "off":
            shipped = ground_answer(answer, ev, cfg)
            carried = carried_share(signals.transcript, " ".join(answer_texts(answer).values())) if ev.speech else None
            extra["grounding"] = {
                **pending.grounding,
                "outcome": pending.outcome,
                "mode": cfg.mode,
                "min_share": cfg.min_share,
                "max_unsupported_names": cfg.max_unsupported_names,
                "shipped": shipped.summary(),
                "transcript_carried": None if carried is None else round(carried, 4),
            }
            if not (isinstance(answer, WavCapsAnswer) and not answer.about_sound):
                scores.append({"name": GROUNDING_SCORE, "value": round(shipped.total.score, 4)})
            if not shipped.grounded:
                flags.append(UNGROUNDED_FLAG)
        update["scores"] = scores
        kept = [
            c
            for c in (row.get("captions") or [])
            if not str(c.get("kind", "")).startswith(FUSED_KINDS_PREFIX) and c.get("kind") != JUDGE_KIND
        ]
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


def _trusted(signals: Signals, flagged: frozenset[str]) -> Signals:
    """``signals`` without the texts flagged as suspected injection (for the deterministic caption)."""
    if not flagged:
        return signals
    changes: dict[str, Any] = {}
    if "title" in flagged:
        changes["title"] = None
    if flagged & {"transcript", "timed_transcript"}:
        changes.update(transcript=None, segments=[])
    if "captions" in flagged:
        changes["input_captions"] = []
    return dataclasses.replace(signals, **changes) if changes else signals

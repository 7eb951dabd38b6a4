"""Audio-language captions: an audio-language model (e.g. Qwen2-Audio-Instruct) describes a clip's
sound, one prompt preset per caption kind, through the LLM backends of ``stages/_llm.py``:

* ``openai``: any OpenAI-compatible endpoint that accepts ``input_audio`` content parts (vLLM's
  server with an audio model, hosted APIs): the audio goes base64 in the user message;
* ``vllm``: vLLM's offline engine inside this stage's GPU actor pool; ``LLM.chat`` takes the same
  OpenAI-format messages with ``input_audio`` parts. This path needs CUDA and is not tested here.

Presets (``prompts/audio_events.yaml``, ``audio_music.yaml``, ``audio_speech_style.yaml``; answer
shape ``audio_caption``: ``{"present": bool, "caption": str}``) ask for sound events, the music,
and how the voices sound (never the words: the transcript has those). The text signals a preset
lists (audio tags, duration ...) are shown too, as data. A kind is asked only when the clip's audio
tags hold one of its ``gates`` labels (when the clip has audio tags). Answers are validated, with
one repair (``stages/_prompts.ask_structured``).

Accept or retry (AudioSetCaps style), when ``clap_model`` is set: the caption and the plain labels
text (``a, b, c`` from ``audio_tags``) are scored against the audio with CLAP; a caption scoring
below the labels (+ ``accept_margin``) is asked again, with feedback naming both scores, up to
``max_retries`` times; when none passes, the labels text is the caption (model ``fallback``). The
attempts, scores and outcome (``accepted`` / ``retried`` / ``fallback`` / ``unchecked``) are in the
caption's ``extra_json["agreement"]``.

Each caption: ``Caption(kind, text, model, prompt_id=preset@version, extra_json)`` with provenance
(stage, preset, backend, model, audio sent, raw answers, tokens). Earlier captions are kept;
earlier captions of the kinds this stage writes are replaced. ``llm_flags`` gets
``audio_caption_fallback:<kind>:<reason>`` for each kind that fell back.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field
from string import Template
from typing import Any

import numpy as np

from pipeline.config import AudioCaptionConfig
from pipeline.errors import StageError
from pipeline.stage import PooledStage, Row, StageContext
from schemas.llm import AudioCaptionAnswer
from schemas.records import Caption
from stages._clap import ClapScorer, label_text
from stages._llm import ChatRequest, LLMBackend, make_backend
from stages._prompts import Outcome, Preset, Rendered, _attempt, _check, ask_structured, load_preset, render, signals_from_row
from stages._vad import SAMPLE_RATE, load_audio

log = logging.getLogger(__name__)

ANSWER = "audio_caption"
FALLBACK_MODEL = "fallback"
FLAG = "audio_caption_fallback:"
RETRY_FEEDBACK = (
    "An audio-text model rates your description as a worse match for this audio ($caption_score) than "
    "the plain labels \"$labels\" ($label_score). Listen again and describe only what is clearly "
    "audible, in one or two plain sentences; leave out anything you are unsure of.\n"
    "Answer with only one JSON object with the same keys as before."
)


def encode_audio(audio: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV or FLAC bytes of a mono float32 waveform."""
    import soundfile as sf

    buf = io.BytesIO()
    pcm = np.clip(audio, -1.0, 1.0)
    sf.write(buf, pcm, rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def audio_part(data: bytes, fmt: str) -> dict[str, Any]:
    """An OpenAI ``input_audio`` content part."""
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def with_audio(rendered: Rendered, part: dict[str, Any]) -> Rendered:
    """``rendered`` with the audio part added to its (first) user message."""
    messages = []
    added = False
    for message in rendered.messages:
        if message["role"] == "user" and not added:
            message = {"role": "user", "content": [part, {"type": "text", "text": str(message["content"])}]}
            added = True
        messages.append(message)
    return Rendered(messages=messages, shown=rendered.shown, flags=rendered.flags)


def tag_labels(tags: Any) -> set[str] | None:
    """The clip's audio tag labels (lower case), None when it has no audio_tags column value."""
    if tags is None:
        return None
    return {str(t.get("label") if isinstance(t, dict) else getattr(t, "label", "")).lower() for t in tags}


@dataclass
class _Job:
    """One (clip, kind) question and what happened to it."""

    row: int
    kind: str
    preset: Preset
    rendered: Rendered
    outcome: Outcome | None = None
    answer: AudioCaptionAnswer | None = None
    scores: list[float] = field(default_factory=list)  # CLAP score of each checked answer
    status: str = "unchecked"
    baseline: float | None = None  # CLAP score of the plain labels text


class AudioCaptionStage(PooledStage[AudioCaptionConfig]):
    name = "audio_caption"
    reads = ("audio_uri", "has_audio", "audio_tags", "captions", "llm_flags", "clip_start", "clip_end", "title", "metadata_json")
    optional_reads = ("has_audio", "audio_tags", "captions", "llm_flags", "clip_start", "clip_end", "title", "metadata_json")
    writes = ("captions", "llm_flags")

    def __init__(self, config: AudioCaptionConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self.presets: dict[str, Preset] = {}
        self.backend: LLMBackend | None = None
        self.clap: ClapScorer | None = None

    def setup(self) -> None:
        c = self.config
        for kind, name in c.presets.items():
            preset = load_preset(name, c.prompts_dir)
            if preset.answer != ANSWER:
                raise ValueError(f"audio_caption preset {name!r} answers {preset.answer!r}, not {ANSWER!r}")
            self.presets[kind] = preset
        self.backend = make_backend(c.llm)
        if c.clap_model:
            self.clap = ClapScorer(c.clap_model, device=c.device, fp16=c.fp16)
        log.info("audio_caption: %s through %s/%s; accept-or-retry: %s", sorted(self.presets), self.backend.name,
                 self.backend.model_id, c.clap_model or "off")

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.clap is not None:
            self.clap.close()
            self.clap = None

    # ------------------------------------------------------------------ batches

    def process_batch(self, rows: list[Row]) -> list[Any]:
        assert self.backend is not None, "setup() first"
        c = self.config
        results: list[Any] = [None] * len(rows)
        audios: dict[int, np.ndarray] = {}
        sent: dict[int, dict[str, Any]] = {}
        jobs: list[_Job] = []
        for i, row in enumerate(rows):
            uri = row.get("audio_uri")
            if not uri:
                if row.get("has_audio") is False:  # nothing to hear: nothing to add
                    results[i] = {"captions": list(row.get("captions") or []), "llm_flags": list(row.get("llm_flags") or [])}
                else:
                    results[i] = StageError("row has no audio_uri (run extract first)", "missing_input")
                continue
            try:
                audio = load_audio(uri)
            except StageError as exc:
                results[i] = exc
                continue
            audio = audio[: int(c.max_audio_seconds * SAMPLE_RATE)]
            audios[i] = audio
            part = audio_part(encode_audio(audio, c.audio_format), c.audio_format)
            sent[i] = {"format": c.audio_format, "seconds": round(len(audio) / SAMPLE_RATE, 3), "sample_rate": SAMPLE_RATE}
            signals = signals_from_row(row, c.max_field_chars)
            labels = tag_labels(row.get("audio_tags"))
            for kind, preset in self.presets.items():
                gate = [g.lower() for g in c.gates.get(kind, [])]
                if gate and labels is not None and not labels.intersection(gate):
                    continue
                jobs.append(_Job(i, kind, preset, with_audio(render(preset, signals), part)))
        self._ask(jobs)
        if self.clap is not None:
            self._accept_or_retry(rows, jobs, audios)
        for i in sent:
            results[i] = self._update(rows[i], [j for j in jobs if j.row == i], sent[i])
        return results

    def _ask(self, jobs: list[_Job]) -> None:
        """First answers, one batched call per preset (with one format repair each)."""
        assert self.backend is not None
        for preset in {id(j.preset): j.preset for j in jobs}.values():
            mine = [j for j in jobs if j.preset is preset]
            outcomes = ask_structured(self.backend, preset, [j.rendered for j in mine], temperature=self.config.llm.temperature)
            for job, outcome in zip(mine, outcomes, strict=True):
                job.outcome = outcome
                job.answer = outcome.answer if isinstance(outcome.answer, AudioCaptionAnswer) else None

    def _accept_or_retry(self, rows: list[Row], jobs: list[_Job], audios: dict[int, np.ndarray]) -> None:
        """AudioSetCaps: a caption CLAP rates below the plain labels is asked again with feedback."""
        assert self.clap is not None and self.backend is not None
        c = self.config
        baselines: dict[int, tuple[str, float]] = {}
        audio_emb: dict[int, np.ndarray] = {}
        rows_with_labels = [i for i in audios if label_text(rows[i].get("audio_tags"), c.max_labels)]
        if rows_with_labels:
            emb = self.clap.audio_embeddings([audios[i] for i in rows_with_labels])
            texts = [label_text(rows[i].get("audio_tags"), c.max_labels) or "" for i in rows_with_labels]
            label_emb = self.clap.text_embeddings(texts)
            for n, i in enumerate(rows_with_labels):
                baselines[i] = (texts[n], float(label_emb[n] @ emb[n]))
            audio_emb = {i: emb[n] for n, i in enumerate(rows_with_labels)}
        for job in jobs:
            job.baseline = baselines[job.row][1] if job.row in baselines else None
        pending = [j for j in jobs if j.row in baselines and j.answer is not None and j.answer.present]
        for attempt in range(c.max_retries + 1):
            if not pending:
                break
            sims = self.clap.text_embeddings([j.answer.caption for j in pending if j.answer is not None])
            retry: list[_Job] = []
            for job, text_emb in zip(pending, sims, strict=True):
                score = float(text_emb @ audio_emb[job.row])
                job.scores.append(score)
                if score >= baselines[job.row][1] + c.accept_margin:
                    job.status = "accepted" if attempt == 0 else "retried"
                else:
                    job.status = "fallback"
                    retry.append(job)
            if attempt == c.max_retries or not retry:
                break
            pending = self._retry(retry, baselines)

    def _retry(self, jobs: list[_Job], baselines: dict[int, tuple[str, float]]) -> list[_Job]:
        """Ask each job again with the CLAP feedback; returns the jobs that got a usable answer."""
        assert self.backend is not None
        requests = []
        for job in jobs:
            assert job.outcome is not None and job.answer is not None
            labels, label_score = baselines[job.row]
            feedback = Template(RETRY_FEEDBACK).substitute(
                caption_score=f"{job.scores[-1]:.3f}", labels=labels, label_score=f"{label_score:.3f}"
            )
            messages = list(job.rendered.messages)
            messages.append({"role": "assistant", "content": job.answer.model_dump_json()})
            messages.append({"role": "user", "content": feedback})
            requests.append(
                ChatRequest(messages, max_tokens=job.preset.max_tokens, temperature=self.config.llm.temperature,
                            json_schema=job.preset.json_schema)
            )  # fmt: skip
        usable = []
        for job, result in zip(jobs, self.backend.chat(requests), strict=True):
            answer, error = _check(job.preset, result)
            record = _attempt(result, error)
            record["purpose"] = "agreement_retry"
            assert job.outcome is not None
            job.outcome.attempts.append(record)
            if isinstance(answer, AudioCaptionAnswer) and answer.present:
                job.answer = answer
                usable.append(job)
        return usable

    # ------------------------------------------------------------------ output

    def _update(self, row: Row, jobs: list[_Job], sent: dict[str, Any]) -> dict[str, Any]:
        assert self.backend is not None
        c = self.config
        kinds = set(self.presets)
        captions = [cap for cap in (row.get("captions") or []) if cap.get("kind") not in kinds]
        flags = [f for f in (row.get("llm_flags") or []) if not f.startswith(FLAG)]
        labels = label_text(row.get("audio_tags"), c.max_labels)
        for job in jobs:
            assert job.outcome is not None
            prompt_tokens, completion_tokens = job.outcome.tokens()
            extra: dict[str, Any] = {
                "stage": self.name,
                "preset": job.preset.name,
                "preset_version": job.preset.version,
                "backend": self.backend.name,
                "model": self.backend.model_id,
                "temperature": c.llm.temperature,
                "audio": sent,
                "inputs": sorted(job.rendered.shown),
                "attempts": job.outcome.attempts,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
            }
            if self.clap is not None:
                extra["agreement"] = {
                    "model": self.clap.model_id,
                    "labels": labels,
                    "label_score": None if job.baseline is None else round(job.baseline, 4),
                    "scores": [round(s, 4) for s in job.scores],
                    "outcome": job.status,
                    "tries": len(job.scores),
                    "margin": c.accept_margin,
                }
            text, model = (job.answer.caption if job.answer is not None else ""), self.backend.model_id
            reason = None
            if job.answer is None:
                reason = job.outcome.failure_reason or "no_answer"
            elif job.status == "fallback":
                reason = "low_agreement"
            if reason is not None:
                if labels is None:
                    flags.append(f"{FLAG}{job.kind}:{reason}")
                    continue  # nothing to fall back to
                text, model = labels, FALLBACK_MODEL
                extra["fallback"] = True
                flags.append(f"{FLAG}{job.kind}:{reason}")
            elif job.answer is not None and not job.answer.present:
                continue  # the model hears none of it (no music, no voice)
            cap = Caption(kind=job.kind, text=text, model=model, prompt_id=job.preset.prompt_id,
                          extra_json=json.dumps(extra, ensure_ascii=False))  # fmt: skip
            captions.append(cap.to_dict())
        return {"captions": captions, "llm_flags": flags}

"""Prompt presets: load (``prompts/*.yaml`` and a user folder), render from a clip's signals, and
ask a backend for a structured answer with one repair attempt.

A preset file holds ``name``, ``version``, ``answer`` (an answer shape of ``schemas/llm.py``),
``description``, ``inputs`` (which signals it shows, in order), ``max_tokens``, an ``example``
answer, and the ``system`` / ``user`` / ``repair`` templates, plus an optional ``grounding_retry``
template (sent once when the answer states things no signal supports; a built-in text is used when
a preset has none). Templates use ``string.Template`` placeholders: ``$signals``, ``$missing``,
``$schema``, ``$example`` (and ``$error`` in ``repair``, ``$unsupported`` in ``grounding_retry``).
The built-in caption presets leave ``$example`` and ``$schema`` out of their prompts and name the
answer's keys in words: small models copy an example or a JSON schema verbatim instead of answering
(SmolLM2-135M echoed ``{"maxLength":600,"type":"string"}``). The schema still reaches backends that
enforce it (``json_schema`` of the request); the example still documents (and tests) the shape.

Untrusted text (titles, descriptions, keywords, other metadata fields, transcripts, other models'
captions) is data, not instructions: it is normalised (Unicode NFKC, zero-width, bidi and control
characters removed: ``_grounding.fold_text``), each signal is wrapped in its own
``<name>...</name>`` block with any ``<``/``>`` inside it neutralised, clipped to a length limit,
and scanned for instruction-like text, which is reported as a ``suspected_injection:<signal>`` flag.
The scan reads the text's Latin skeleton (homoglyphs and accents folded) and the variants an
obfuscated instruction hides behind (letters spaced out one by one, digits for letters).

The title shown is the input LIST's ``title`` (column or field) when it has one, else the title the
download found (for a direct file: its file stem). The LIST's ``description``, ``tags`` /
``keywords`` / ``categories`` and every other metadata field (``metadata`` signal) reach the prompt.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError
from pipeline.stage import Row
from schemas.llm import ANSWERS, Answer, AnswerError, answer_model, answer_schema, compact_schema, parse_answer
from stages._grounding import check_variants, fold_text
from stages._llm import ChatRequest, ChatResult, LLMBackend

log = logging.getLogger(__name__)

# Signals a preset may show, with whether their text comes from outside (untrusted).
SIGNALS: dict[str, bool] = {
    "title": True,
    "description": True,
    "keywords": True,
    "metadata": True,  # every other field of the input LIST's metadata, one "key: value" a line
    "duration": False,
    "transcript": True,
    "timed_transcript": True,
    "audio_tags": False,
    "visual_tags": False,
    "captions": True,
    "caption": True,  # the caption under review (judge)
}
PLACEHOLDERS = frozenset({"signals", "missing", "schema", "example"})
REPAIR_PLACEHOLDERS = PLACEHOLDERS | {"error"}
GROUNDING_PLACEHOLDERS = PLACEHOLDERS | {"unsupported"}
DEFAULT_GROUNDING_RETRY = (
    "Your answer states things that no signal of the clip supports: $unsupported.\n"
    "Answer again using only what the signals say: no names, places, numbers, objects or sounds that "
    'are not in the signals, and "" for any optional field that no signal supports.\n'
    "Answer with only one JSON object with the same keys as before."
)
# metadata keys shown as their own signals (not repeated in ``metadata``)
_OWN_SIGNAL_KEYS = frozenset({"title", "description", "tags", "keywords", "categories"})
FUSED_KINDS_PREFIX = "fused"  # captions written by the fuse stage: "fused", "fused_visual" ...
JUDGE_KIND = "judge"
INJECTION_FLAG = "suspected_injection:"  # + the signal holding instruction-like text

_INJECTION_PATTERNS = [
    r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(instruction|instructions|prompt|rules|above|previous|prior|system)\b",
    r"\b(rate|score|grade|judge)\b[^.\n]{0,30}\b([1-5]|five|one)\b(\s*(/|out of)\s*5|\s*stars?)?[^.\n]{0,10}\b(now|instead|please|this)?",
    r"\b(you are now|act as|pretend to be|new instructions?|system prompt|developer mode|jailbreak)\b",
    r"\b(respond|answer|reply|output|print|return)\b[^.\n]{0,20}\b(with|only)\b[^.\n]{0,30}\b(json|score|yes|caption)\b",
    r"</?\s*(system|assistant|user|im_start|im_end|s)\s*>|<\|",
    r"\b(as an ai|language model)\b[^.\n]{0,40}\b(must|should|will)\b",
]
_INJECTION_RE = re.compile("|".join(f"(?:{p})" for p in _INJECTION_PATTERNS), re.IGNORECASE)


def instruction_like(text: str) -> bool:
    """True when ``text`` reads like an instruction to a model (prompt injection heuristics), after
    normalisation, homoglyph folding, and in its de-obfuscated variants (``check_variants``)."""
    return any(_INJECTION_RE.search(variant) for variant in check_variants(text))


# --------------------------------------------------------------------------- presets


class _PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    version: int = Field(ge=1)
    answer: str
    description: str
    inputs: list[str] = Field(min_length=1)
    max_tokens: int = Field(ge=16, le=8192)
    example: dict[str, Any]
    system: str
    user: str
    repair: str
    grounding_retry: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    version: int
    answer: str
    description: str
    inputs: tuple[str, ...]
    max_tokens: int
    example: dict[str, Any]
    system: str
    user: str
    repair: str
    source: str
    grounding_retry: str = DEFAULT_GROUNDING_RETRY

    @property
    def prompt_id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def answer_model(self) -> type[Answer]:
        return answer_model(self.answer)

    @property
    def json_schema(self) -> dict[str, Any]:
        return answer_schema(self.answer)


def _placeholders(template: str) -> set[str]:
    names = set()
    for match in Template.pattern.finditer(template):
        if match.group("invalid") is not None:
            raise ValueError(f"invalid '$' at char {match.start()} (write $$ for a dollar sign)")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


def parse_preset(text: str, source: str) -> Preset:
    """Validate one preset file's text. Raises ConfigError naming the file and the problem."""
    try:
        data = yaml.safe_load(text)
        spec = _PresetFile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"preset {source}: {exc}") from None
    problems: list[str] = []
    if spec.answer not in ANSWERS:
        problems.append(f"answer {spec.answer!r} is not one of {sorted(ANSWERS)}")
    unknown = [s for s in spec.inputs if s not in SIGNALS]
    if unknown:
        problems.append(f"unknown inputs {unknown}; known: {sorted(SIGNALS)}")
    parts = [("system", PLACEHOLDERS), ("user", PLACEHOLDERS), ("repair", REPAIR_PLACEHOLDERS)]
    if spec.grounding_retry is not None:
        parts.append(("grounding_retry", GROUNDING_PLACEHOLDERS))
    for part, allowed in parts:
        try:
            extra = _placeholders(getattr(spec, part)) - allowed
        except ValueError as exc:
            problems.append(f"{part}: {exc}")
            continue
        if extra:
            problems.append(f"{part} uses unknown placeholders {sorted(extra)}; allowed: {sorted(allowed)}")
    if "signals" not in _placeholders(spec.user):
        problems.append("user template must contain $signals")
    if not problems:
        try:
            answer_model(spec.answer).model_validate(spec.example)
        except ValidationError as exc:
            problems.append(f"example does not match answer {spec.answer!r}: {exc}")
    if problems:
        raise ConfigError(f"preset {source}: " + "; ".join(problems))
    return Preset(
        name=spec.name,
        version=spec.version,
        answer=spec.answer,
        description=spec.description.strip(),
        inputs=tuple(spec.inputs),
        max_tokens=spec.max_tokens,
        example=spec.example,
        system=spec.system.strip(),
        user=spec.user.strip(),
        repair=spec.repair.strip(),
        source=source,
        grounding_retry=(spec.grounding_retry or DEFAULT_GROUNDING_RETRY).strip(),
    )


def preset_files(prompts_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """name -> (source, text) of every preset: built-ins, then the user folder (which wins)."""
    found: dict[str, tuple[str, str]] = {}
    for entry in sorted(importlib.resources.files("prompts").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            found[entry.name[: -len(".yaml")]] = (f"prompts/{entry.name}", entry.read_text(encoding="utf-8"))
    if prompts_dir is not None:
        folder = Path(prompts_dir)
        if not folder.is_dir():
            raise ConfigError(f"prompts_dir {folder} is not a folder")
        for path in sorted(folder.glob("*.yaml")):
            found[path.stem] = (str(path), path.read_text(encoding="utf-8"))
    return found


def load_preset(name: str, prompts_dir: Path | None = None) -> Preset:
    files = preset_files(prompts_dir)
    if name not in files:
        raise ConfigError(f"unknown prompt preset {name!r}; known: {sorted(files)}")
    source, text = files[name]
    preset = parse_preset(text, source)
    if preset.name != name:
        raise ConfigError(f"preset {source}: its name {preset.name!r} differs from the file name {name!r}")
    return preset


# --------------------------------------------------------------------------- signals


@dataclass
class Signals:
    """What a clip tells about itself, as text ready to show (absent signals are None)."""

    values: dict[str, str | None]
    # structured copies for deterministic fallbacks
    title: str | None = None
    transcript: str | None = None
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    audio_labels: list[str] = field(default_factory=list)
    visual_labels: list[str] = field(default_factory=list)
    input_captions: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)
    duration: float | None = None
    audio_tags: list[tuple[str, float]] = field(default_factory=list)  # (label, score), best first
    visual_tags: list[tuple[str, float]] = field(default_factory=list)

    def present(self, name: str) -> bool:
        return bool(self.values.get(name))


def _clean(text: Any, limit: int) -> str | None:
    """Untrusted text as shown: normalised (``fold_text``), whitespace collapsed, '<' '>'
    neutralised, clipped."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = ", ".join(str(t) for t in text if t)
    out = " ".join(fold_text(str(text)).split()).replace("<", "‹").replace(">", "›")
    if len(out) > limit:
        out = out[: limit - 1].rstrip() + "…"
    return out or None


def _metadata(row: Row) -> dict[str, Any]:
    raw = row.get("metadata_json")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _key(name: Any) -> str:
    return " ".join(fold_text(str(name)).split()).casefold()


def _meta_get(meta: dict[str, Any], name: str) -> Any:
    """A metadata field by name, ignoring case and stray spaces ("Title", " description ")."""
    if name in meta:
        return meta[name]
    return next((v for k, v in meta.items() if _key(k) == name), None)


def _metadata_text(meta: dict[str, Any], limit: int) -> str | None:
    """The metadata fields without a signal of their own, one ``key: value`` a line."""
    lines = []
    for key in sorted(meta):
        value = meta[key]
        if _key(key) in _OWN_SIGNAL_KEYS or value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        name = " ".join(fold_text(str(key)).split())[:60]
        text = _clean(value, limit)
        if name and text:
            lines.append(f"{_clean(name, 60)}: {text}")
    out = "\n".join(lines)
    if len(out) > limit:
        out = out[: limit - 1].rstrip() + "…"
    return out or None


def _tags(tags: Any) -> list[tuple[str, float]]:
    out = []
    for tag in tags or []:
        label = tag.get("label") if isinstance(tag, dict) else getattr(tag, "label", None)
        score = tag.get("score") if isinstance(tag, dict) else getattr(tag, "score", None)
        if label:
            out.append((str(label), float(score or 0.0)))
    return sorted(out, key=lambda t: -t[1])


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def signals_from_row(row: Row, max_chars: int = 1500, *, max_tags: int = 8) -> Signals:
    """Collect a clip row's signals (any subset may be missing)."""
    meta = _metadata(row)
    # the LIST's own title wins over the downloaded one (for a direct file that is only its file stem)
    list_title = _meta_get(meta, "title")
    title = list_title if isinstance(list_title, str) and list_title.strip() else row.get("title")
    keywords = _meta_get(meta, "tags") or _meta_get(meta, "keywords") or _meta_get(meta, "categories")
    start, end = row.get("clip_start"), row.get("clip_end")
    duration = float(end) - float(start) if start is not None and end is not None else row.get("video_duration")
    segments = []
    for seg in row.get("asr_segments") or []:
        text = _get(seg, "text")
        if text and str(text).strip():
            segments.append((float(_get(seg, "start") or 0.0), float(_get(seg, "end") or 0.0), str(text).strip()))
    transcript = row.get("transcript") or (" ".join(s[2] for s in segments) if segments else None)
    if transcript is not None and not str(transcript).strip():
        transcript = None
    audio = _tags(row.get("audio_tags"))[:max_tags]
    visual = _tags(row.get("visual_tags"))[:max_tags]
    captions = []
    for cap in row.get("captions") or []:
        kind, text = str(_get(cap, "kind") or ""), _get(cap, "text")
        if text and not kind.startswith(FUSED_KINDS_PREFIX) and kind != JUDGE_KIND:
            captions.append((kind, str(text)))
    timed = None
    if segments:
        timed = "\n".join(f"[{s:.1f}-{e:.1f}] {_clean(t, max_chars)}" for s, e, t in segments)
        if len(timed) > max_chars * 2:
            timed = timed[: max_chars * 2 - 1] + "…"
    elif transcript:  # no segment times: the whole transcript spans the clip
        timed = f"[0.0-{duration or 0.0:.1f}] {_clean(transcript, max_chars)}"
    values: dict[str, str | None] = {
        "title": _clean(title, 300),
        "description": _clean(_meta_get(meta, "description"), max_chars),
        "keywords": _clean(keywords, 300),
        "metadata": _metadata_text(meta, max_chars),
        "duration": f"{duration:.1f} seconds" if duration else None,
        "transcript": _clean(transcript, max_chars),
        "timed_transcript": timed,
        "audio_tags": ", ".join(f"{label} ({score:.2f})" for label, score in audio) or None,
        "visual_tags": ", ".join(f"{label} ({score:.2f})" for label, score in visual) or None,
        "captions": "\n".join(f"{kind}: {_clean(text, max_chars)}" for kind, text in captions) or None,
        "caption": _clean(row.get("caption"), max_chars),
    }
    return Signals(
        values=values,
        title=values["title"],
        transcript=values["transcript"],
        segments=segments,
        audio_labels=[t[0] for t in audio],
        visual_labels=[t[0] for t in visual],
        input_captions=captions,
        duration=duration,
        audio_tags=audio,
        visual_tags=visual,
    )


# --------------------------------------------------------------------------- rendering


@dataclass
class Rendered:
    messages: list[dict[str, Any]]
    shown: dict[str, str]  # signal -> text shown to the model
    flags: list[str]  # e.g. suspected_injection:transcript (any untrusted signal of the clip)


def _label(name: str) -> str:
    return name.replace("_", " ")


def render(preset: Preset, signals: Signals) -> Rendered:
    """The chat messages of ``preset`` for one clip; absent signals are listed, never invented."""
    shown = {name: signals.values[name] for name in preset.inputs if signals.values.get(name)}
    blocks = [f"<{name}>\n{text}\n</{name}>" for name, text in shown.items()]
    missing = [_label(n) for n in preset.inputs if n not in shown]
    # every untrusted signal of the clip is scanned, shown or not: its text may reach a model elsewhere
    flags = [f"{INJECTION_FLAG}{n}" for n, text in signals.values.items() if text and SIGNALS[n] and instruction_like(text)]
    values = {
        "signals": "\n".join(blocks) if blocks else "(no signals are available for this clip)",
        "missing": ", ".join(missing) if missing else "none",
        "schema": compact_schema(preset.answer),
        "example": json.dumps(preset.example, ensure_ascii=False),
    }
    messages = [
        {"role": "system", "content": Template(preset.system).substitute(values)},
        {"role": "user", "content": Template(preset.user).substitute(values)},
    ]
    return Rendered(messages=messages, shown={k: str(v) for k, v in shown.items()}, flags=flags)


# --------------------------------------------------------------------------- structured answers


@dataclass
class Outcome:
    """The result of asking for one structured answer (with at most one repair)."""

    answer: Answer | None
    attempts: list[dict[str, Any]]  # raw answers, errors and token counts, in order
    failure: str | None = None  # "<reason>: <detail>" when no valid answer came back

    @property
    def failure_reason(self) -> str | None:
        return self.failure.split(":", 1)[0] if self.failure else None

    def tokens(self) -> tuple[int, int]:
        prompt = sum(a.get("prompt_tokens") or 0 for a in self.attempts)
        completion = sum(a.get("completion_tokens") or 0 for a in self.attempts)
        return prompt, completion


def _attempt(result: ChatResult, error: str | None) -> dict[str, Any]:
    return {
        "raw": result.text,
        "error": error,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "seconds": round(result.seconds, 4) if result.seconds is not None else None,
    }


def _check(preset: Preset, result: ChatResult) -> tuple[Answer | None, str | None]:
    if result.error is not None:
        return None, f"backend_error: {result.error}"
    try:
        return parse_answer(preset.answer, result.text, truncated=result.finish_reason == "length"), None
    except AnswerError as exc:
        return None, str(exc)


def _repair_messages(preset: Preset, rendered: Rendered, raw: str | None, error: str) -> list[dict[str, Any]]:
    values = {
        "signals": "",
        "missing": "",
        "schema": compact_schema(preset.answer),
        "example": json.dumps(preset.example, ensure_ascii=False),
        "error": error[:400],
    }
    messages = list(rendered.messages)
    if raw and raw.strip():
        messages.append({"role": "assistant", "content": raw[:4000]})
    messages.append({"role": "user", "content": Template(preset.repair).substitute(values)})
    return messages


def ask_structured(
    backend: LLMBackend, preset: Preset, rendered: list[Rendered], *, temperature: float = 0.0
) -> list[Outcome]:
    """Ask for one answer per prompt; one repair attempt for invalid answers (not for backend errors)."""
    if not rendered:
        return []
    schema = preset.json_schema
    first = backend.chat(
        [ChatRequest(r.messages, max_tokens=preset.max_tokens, temperature=temperature, json_schema=schema) for r in rendered]
    )
    outcomes: list[Outcome] = []
    to_repair: list[int] = []
    for i, result in enumerate(first):
        answer, error = _check(preset, result)
        outcomes.append(Outcome(answer, [_attempt(result, error)], error))
        if answer is None and result.error is None:
            to_repair.append(i)
    if to_repair:
        requests = [
            ChatRequest(
                _repair_messages(preset, rendered[i], first[i].text, outcomes[i].failure or ""),
                max_tokens=preset.max_tokens,
                temperature=temperature,
                json_schema=schema,
            )
            for i in to_repair
        ]
        for i, result in zip(to_repair, backend.chat(requests), strict=True):
            answer, error = _check(preset, result)
            outcomes[i].attempts.append(_attempt(result, error))
            outcomes[i].answer = answer
            outcomes[i].failure = error  # None once repaired; else the last attempt's reason
    for outcome in outcomes:
        if outcome.failure:
            log.info("preset %s: no valid answer (%s)", preset.prompt_id, outcome.failure[:200])
    return outcomes


def grounding_retry_messages(preset: Preset, rendered: Rendered, raw: str | None, unsupported: list[str]) -> list[dict[str, Any]]:
    """The conversation of a grounding retry: the prompt, the model's answer, and the feedback
    naming the words no signal supports."""
    words = list(dict.fromkeys(unsupported))[:20]
    values = {
        "signals": "",
        "missing": "",
        "schema": compact_schema(preset.answer),
        "example": json.dumps(preset.example, ensure_ascii=False),
        "unsupported": ", ".join(f'"{w}"' for w in words) or "(none)",
    }
    messages = list(rendered.messages)
    if raw and raw.strip():
        messages.append({"role": "assistant", "content": raw[:4000]})
    messages.append({"role": "user", "content": Template(preset.grounding_retry).substitute(values)})
    return messages


def ask_grounding_retry(
    backend: LLMBackend,
    preset: Preset,
    items: list[tuple[Rendered, str | None, list[str]]],
    *,
    temperature: float = 0.0,
) -> list[tuple[Answer | None, dict[str, Any]]]:
    """One more answer per ``(rendered, previous raw answer, unsupported words)``: the parsed answer
    (None when unusable) and the attempt record. No format repair on top: this is the one retry."""
    if not items:
        return []
    requests = [
        ChatRequest(
            grounding_retry_messages(preset, rendered, raw, words),
            max_tokens=preset.max_tokens,
            temperature=temperature,
            json_schema=preset.json_schema,
        )
        for rendered, raw, words in items
    ]
    out = []
    for result in backend.chat(requests):
        answer, error = _check(preset, result)
        attempt = _attempt(result, error)
        attempt["purpose"] = "grounding_retry"
        out.append((answer, attempt))
    return out

"""The JSON answers asked of the LLM, declared once.

String limits stay at or below 600 characters: llama.cpp turns ``maxLength`` into a nested grammar
rule and refuses (and llama-cpp-python then crashes on) grammars past ~1000 repetitions.

Each preset in ``prompts/`` names one answer shape here (its ``answer`` key). From each pydantic
model derive both the JSON schema shown to the model (and enforced by backends that support
constrained decoding) and the validator of its raw answer: ``answer_schema(name)`` and
``parse_answer(name, text)``.
"""

from __future__ import annotations

import json
from functools import cache
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

JudgeFlag = Literal["contradicts_signals", "no_information", "unsafe"]


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # Caption answers are read tolerantly (small models add keys, leave out optional ones, or run
    # out of tokens after the captions): unknown keys are dropped, missing keys take these values,
    # and the flat fields of a cut-off object are salvaged. The JSON schema stays strict.
    tolerant: ClassVar[bool] = False
    missing_defaults: ClassVar[dict[str, Any]] = {}


class MMTrailAnswer(Answer):
    """MMTrail style: one audio-visual caption plus one caption per modality ("" when absent)."""

    tolerant: ClassVar[bool] = True
    missing_defaults: ClassVar[dict[str, Any]] = {"visual_caption": "", "audio_caption": "", "music_caption": "", "speech_caption": ""}

    audio_visual_caption: str = Field(min_length=1, max_length=600)
    visual_caption: str = Field(max_length=400)
    audio_caption: str = Field(max_length=400)
    music_caption: str = Field(max_length=400)
    speech_caption: str = Field(max_length=400)


class WavCapsAnswer(Answer):
    """WavCaps style: a short audio caption from noisy text, or a rejection."""

    tolerant: ClassVar[bool] = True

    about_sound: bool
    caption: str = Field(max_length=300)

    @model_validator(mode="after")
    def _caption_when_kept(self) -> WavCapsAnswer:
        if self.about_sound and not self.caption:
            raise ValueError("caption must not be empty when about_sound is true")
        return self


class TimedCaption(Answer):
    start: float = Field(ge=0)
    end: float = Field(ge=0)
    text: str = Field(min_length=1, max_length=300)

    @model_validator(mode="after")
    def _ordered(self) -> TimedCaption:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class HowToCaptionAnswer(Answer):
    """HowToCaption style: timestamped captions derived from a timestamped transcript."""

    tolerant: ClassVar[bool] = True

    captions: list[TimedCaption] = Field(min_length=1, max_length=32)


class FAVDAnswer(Answer):
    """FAVD style paragraph: one summary sentence, then visual details, then audio details."""

    tolerant: ClassVar[bool] = True

    summary: str = Field(min_length=1, max_length=300)
    visual_details: str = Field(min_length=1, max_length=600)
    audio_details: str = Field(min_length=1, max_length=600)


class JudgeAnswer(Answer):
    """A caption-quality verdict."""

    score: int = Field(ge=1, le=5)
    reasons: list[Annotated[str, Field(max_length=160)]] = Field(max_length=3)
    flags: list[JudgeFlag] = Field(max_length=3)


class AudioCaptionAnswer(Answer):
    """An audio-language model's description of one aspect of a clip's sound (stages/audio_caption.py):
    ``present`` false (and ``caption`` "") when the clip has none of it (no music, no voice)."""

    tolerant: ClassVar[bool] = True

    present: bool
    caption: str = Field(max_length=400)

    @model_validator(mode="after")
    def _caption_when_present(self) -> AudioCaptionAnswer:
        if self.present and not self.caption:
            raise ValueError("caption must not be empty when present is true")
        return self


ANSWERS: dict[str, type[Answer]] = {
    "mmtrail": MMTrailAnswer,
    "wavcaps": WavCapsAnswer,
    "howtocaption": HowToCaptionAnswer,
    "favd": FAVDAnswer,
    "judge": JudgeAnswer,
    "audio_caption": AudioCaptionAnswer,
}


class AnswerError(ValueError):
    """A raw answer that cannot be used; ``reason`` is one of empty, not_json, truncated, wrong_fields."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def answer_model(name: str) -> type[Answer]:
    try:
        return ANSWERS[name]
    except KeyError:
        raise KeyError(f"unknown answer shape {name!r}; known: {sorted(ANSWERS)}") from None


def _strip_titles(node: Any) -> Any:
    """Drop ``title`` and ``description`` strings (class names, docstrings): prompt tokens only."""
    if isinstance(node, dict):
        return {
            k: _strip_titles(v)
            for k, v in node.items()
            if k not in ("title", "description") or not isinstance(v, str)
        }
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace ``{"$ref": "#/$defs/X"}`` by X's schema (the shapes here are not recursive)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


@cache
def _schema_json(name: str) -> str:
    schema = answer_model(name).model_json_schema()
    flat = _inline_refs(schema, schema.get("$defs", {}))
    return json.dumps(_strip_titles(flat), separators=(",", ":"))


def answer_schema(name: str) -> dict[str, Any]:
    """The JSON schema of answer shape ``name`` (titles stripped to keep prompts short)."""
    return json.loads(_schema_json(name))  # type: ignore[no-any-return]


def compact_schema(name: str) -> str:
    """The schema as compact JSON text, as shown to the model."""
    return _schema_json(name)


def _extract_json(text: str) -> str:
    """The JSON object inside ``text``: tolerate a Markdown fence or prose around it."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`")
        if stripped.lower().startswith("json"):
            stripped = stripped[4:]
        stripped = stripped.strip()
    start = stripped.find("{")
    end = stripped.rfind("}")
    if start > 0 and end > start:
        return stripped[start : end + 1]
    return stripped


_STRING_FIELD = r'"{key}"\s*:\s*"((?:[^"\\]|\\.)*)"'
_BOOL_FIELD = r'"{key}"\s*:\s*(true|false)\b'


def salvage_fields(model: type[Answer], text: str) -> dict[str, Any]:
    """The complete top-level string and boolean fields of ``model`` found in a broken JSON text
    (each field's first complete occurrence; a string cut off before its closing quote is not taken)."""
    out: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        kind = info.annotation
        if kind is str:
            match = re.search(_STRING_FIELD.format(key=re.escape(key)), text)
            if match:
                try:
                    out[key] = json.loads(f'"{match.group(1)}"')
                except json.JSONDecodeError:
                    continue
        elif kind is bool:
            match = re.search(_BOOL_FIELD.format(key=re.escape(key)), text)
            if match:
                out[key] = match.group(1) == "true"
    return out


def _tolerant_data(model: type[Answer], data: dict[str, Any]) -> dict[str, Any]:
    known = {k: v for k, v in data.items() if k in model.model_fields}
    return {**model.missing_defaults, **known}


def parse_answer(name: str, text: str | None, *, truncated: bool = False) -> Answer:
    """Validate a raw model answer against shape ``name``. Raises ``AnswerError`` with a reason.

    Shapes marked ``tolerant`` (the caption answers) drop unknown keys, fill missing optional keys
    from ``missing_defaults``, and, when the JSON is broken, are rebuilt from the complete fields
    found in the text (:func:`salvage_fields`) if those make a valid answer."""
    if text is None or not text.strip():
        raise AnswerError("empty", "the model returned no text")
    model = answer_model(name)
    candidate = _extract_json(text)
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as exc:
        if model.tolerant:
            salvaged = salvage_fields(model, candidate)
            if salvaged:
                try:
                    return model.model_validate(_tolerant_data(model, salvaged))
                except ValidationError:
                    pass
        cut_short = truncated or exc.pos >= len(candidate.rstrip()) - 1 or candidate.count("{") > candidate.count("}")
        if cut_short and candidate.lstrip().startswith("{"):
            raise AnswerError("truncated", f"JSON ends early ({exc.msg} at char {exc.pos})") from None
        raise AnswerError("not_json", f"{exc.msg} at char {exc.pos}") from None
    if not isinstance(data, dict):
        raise AnswerError("wrong_fields", f"expected a JSON object, got {type(data).__name__}")
    if model.tolerant:
        data = _tolerant_data(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(object)'}: {e['msg']}" for e in exc.errors()[:6]
        )
        raise AnswerError("wrong_fields", problems) from None

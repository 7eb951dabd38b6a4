"""Every record avforge writes, declared once.

A record is a dataclass. From that one declaration derive:

* the Arrow schema (``arrow_schema(Clip)``) used between stages, in parquet and in the index;
* the typed record used in tests (``Clip.from_dict(row)`` / ``record.to_dict()``);
* the JSON written into each shard sample (``shard_json(row)``).

Field metadata steers the derivations:

* ``arrow``: an explicit Arrow type (e.g. float32 embeddings);
* ``json``: ``False`` keeps a field out of the shard JSON (staging URIs, timings, embeddings);
* ``index``: ``False`` keeps a field out of ``index.parquet`` / ``rejects.parquet`` (staging URIs).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar, Union

import pyarrow as pa

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Record")


def _meta(*, arrow: pa.DataType | None = None, json: bool = True, index: bool = True) -> dict[str, Any]:
    return {"arrow": arrow, "json": json, "index": index}


def opt(default: Any = None, **meta: Any) -> Any:
    """An optional field (default None) with derivation metadata."""
    return field(default=default, metadata=_meta(**meta))


def opt_list(**meta: Any) -> Any:
    return field(default_factory=list, metadata=_meta(**meta))


class Record:
    """Mixin for record dataclasses: dict round trip with nested records."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _from_value(hints[f.name], data[f.name])
        return cls(**kwargs)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        raise TypeError(f"unsupported union {tp}")
    return tp


def _from_value(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return tp.from_dict(value)  # type: ignore[union-attr]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_from_value(item, v) for v in value]
    return value


# --------------------------------------------------------------------------- nested records


@dataclass
class Tag(Record):
    """A label with a score (audio tags, visual tags)."""

    label: str
    score: float


@dataclass
class Word(Record):
    word: str
    start: float
    end: float
    probability: float | None = None


@dataclass
class Segment(Record):
    """One ASR segment, times in seconds relative to the clip start."""

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    words: list[Word] = field(default_factory=list)


@dataclass
class Caption(Record):
    """One caption of a clip with its provenance."""

    kind: str  # e.g. visual, audio, speech, fused, audio_visual
    text: str
    model: str
    prompt_id: str | None = None
    extra_json: str | None = None  # backend-specific provenance (sampling params, raw answer), JSON


@dataclass
class Score(Record):
    name: str
    value: float


@dataclass
class StageTime(Record):
    stage: str
    seconds: float


# --------------------------------------------------------------------------- top-level records


@dataclass
class Video(Record):
    """One input line after ingest."""

    video_id: str
    source_url: str  # credentials redacted
    input_index: int
    metadata_json: str | None = opt()  # input columns besides url/id, carried to the shard JSON
    fetch_url: str | None = opt(json=False, index=False)  # the URL as given (may hold credentials)


@dataclass
class Clip(Record):
    """The row that flows through the pipeline: a video before split, a clip after it.

    Errors and drop reasons live on the row (``error_stage`` / ``drop_reason``); later
    stages pass such rows through untouched.
    """

    # -- video
    video_id: str
    source_url: str  # credentials redacted
    input_index: int
    metadata_json: str | None = opt()
    fetch_url: str | None = opt(json=False, index=False)  # the URL as given (may hold credentials)
    title: str | None = opt()
    local_path: str | None = opt(json=False, index=False)  # staging URI of the downloaded file
    video_duration: float | None = opt()
    width: int | None = opt()
    height: int | None = opt()
    fps: float | None = opt()
    video_codec: str | None = opt()
    audio_codec: str | None = opt()
    has_video: bool | None = opt()
    has_audio: bool | None = opt()
    # -- clip
    key: str | None = opt()
    clip_index: int | None = opt()
    clip_count: int | None = opt()  # clips cut from this video (for resume bookkeeping)
    clip_start: float | None = opt()
    clip_end: float | None = opt()
    shot_times: list[float] = opt_list()  # cut times inside the clip, seconds from the video start
    audio_uri: str | None = opt(json=False, index=False)
    frame_uris: list[str] = opt_list(json=False, index=False)
    frame_times: list[float] = opt_list()
    clip_uri: str | None = opt(json=False, index=False)
    # -- cheap quality signals (extract)
    audio_rms_db: float | None = opt()
    audio_peak_db: float | None = opt()
    silence_ratio: float | None = opt()
    brightness: float | None = opt()
    black_ratio: float | None = opt()
    frozen_ratio: float | None = opt()
    # -- visual quality signals (visual_quality)
    sharpness: float | None = opt()  # median variance of the Laplacian of the frames' luma (0-255 scale)
    colourfulness: float | None = opt()  # mean Hasler-Suesstrunk colourfulness of the frames
    motion_score: float | None = opt()  # mean abs luma change (0-255) between analysis frames, cuts left out
    still_ratio: float | None = opt()  # share of analysis-frame steps with (almost) no change
    cut_count: int | None = opt()  # hard cuts seen between analysis frames
    slideshow: bool | None = opt()  # still images joined by cuts
    nsfw_score: float | None = opt()  # Open-NSFW probability, max over the scored frames
    # -- audio understanding
    transcript: str | None = opt()
    language: str | None = opt()
    language_prob: float | None = opt()
    asr_segments: list[Segment] = opt_list()
    asr_flags: list[str] = opt_list()
    speech_ratio: float | None = opt()
    audio_tags: list[Tag] = opt_list()
    # -- visual understanding
    visual_tags: list[Tag] = opt_list()
    visual_embedding: list[float] = opt_list(arrow=pa.list_(pa.float32()), json=False)
    text_embedding: list[float] = opt_list(arrow=pa.list_(pa.float32()), json=False)
    # -- captions and scores
    captions: list[Caption] = opt_list()
    caption: str | None = opt()  # the final caption (KEY.txt)
    scores: list[Score] = opt_list()
    llm_flags: list[str] = opt_list()  # fuse/judge: fallback reasons, suspected injection, judge flags
    # -- filtering and dedup
    drop_reason: str | None = opt()
    duplicate_of: str | None = opt()
    # -- dedup fingerprints (stages/fingerprint.py); 64-bit codes stored as int64 (two's complement)
    content_hash: str | None = opt()  # SHA-1 of decoded low-res frames (audio if no video): exact duplicates
    frame_hashes: list[int] = opt_list(json=False, index=False)  # 64-bit DCT-sign hashes, 2 per frame
    audio_fingerprint: list[int] = opt_list(json=False, index=False)  # 64-bit band-energy codes, ~31/s
    hash_times: list[float] = opt_list(arrow=pa.list_(pa.float32()), json=False, index=False)  # s, per hashed frame
    code_times: list[float] = opt_list(arrow=pa.list_(pa.float32()), json=False, index=False)  # s, per audio code
    nonfinite_fields: list[str] = opt_list()  # fields whose NaN/Inf value was written as null (pipeline/sanitize.py)
    # -- failure
    error_stage: str | None = opt()
    error_type: str | None = opt()
    error: str | None = opt()
    # -- bookkeeping
    timings: list[StageTime] = opt_list(json=False, index=False)


@dataclass
class ErrorRecord(Record):
    """One row of errors.parquet."""

    source_url: str
    video_id: str
    key: str | None
    error_stage: str
    error_type: str
    error: str


# --------------------------------------------------------------------------- derivations

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}


def arrow_type(tp: Any) -> pa.DataType:
    tp = _strip_optional(tp)
    if tp in _SCALARS:
        return _SCALARS[tp]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return pa.list_(arrow_type(item))
    if dataclasses.is_dataclass(tp):
        return pa.struct([pa.field(n, t) for n, t in _fields(tp)])
    raise TypeError(f"no Arrow type for {tp!r}")


def _fields(cls: type) -> list[tuple[str, pa.DataType]]:
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        explicit = f.metadata.get("arrow")
        out.append((f.name, explicit if explicit is not None else arrow_type(hints[f.name])))
    return out


@cache
def arrow_schema(cls: type) -> pa.Schema:
    """The Arrow schema of a record class."""
    return pa.schema([pa.field(n, t) for n, t in _fields(cls)])


@cache
def index_fields(cls: type = Clip) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("index", True))


@cache
def json_fields(cls: type = Clip) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True))


def index_schema(cls: type = Clip, extra: tuple[tuple[str, pa.DataType], ...] = ()) -> pa.Schema:
    """Schema of index/rejects parquet: the record less staging fields, plus ``extra``."""
    full = arrow_schema(cls)
    fields = [full.field(n) for n in index_fields(cls)]
    fields += [pa.field(n, t) for n, t in extra]
    return pa.schema(fields)


def to_table(rows: list[dict[str, Any]], cls: type = Clip) -> pa.Table:
    """Rows (plain dicts, missing keys allowed) as a table of the record's schema."""
    schema = arrow_schema(cls)
    names = schema.names
    cols = {n: [r.get(n) for r in rows] for n in names}
    for name in _list_fields(cls):  # list fields: None -> []
        cols[name] = [[] if v is None else v for v in cols[name]]
    return pa.Table.from_pydict(cols, schema=schema)


@cache
def _list_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING)


def shard_json(row: dict[str, Any]) -> dict[str, Any]:
    """The ``KEY.json`` document of a kept clip: every metadata field, decoded where JSON."""
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    lists = _list_fields(Clip)
    for name in json_fields(Clip):
        value = row.get(name)
        if value is None and name in lists:
            value = []
        if name == "metadata_json":
            doc["metadata"] = json.loads(value) if value else {}
            continue
        if name in ("error_stage", "error_type", "error") and value is None:
            continue
        doc[name] = value
    captions = []
    for cap in doc.get("captions") or []:  # new dicts: the row itself is not modified
        fields = {k: v for k, v in cap.items() if k != "extra_json"}
        extra = cap.get("extra_json")
        fields["extra"] = json.loads(extra) if extra else None
        captions.append(fields)
    doc["captions"] = captions
    return doc

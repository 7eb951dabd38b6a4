"""Making rows and records safe to write as strict JSON and as parquet, in one place.

Strict JSON has no ``NaN`` / ``Infinity`` (Python's ``json`` writes them by default and strict
readers then fail), and parquet / Arrow strings must be valid UTF-8. A clip whose audio decodes to
NaN, a model that returns ``inf``, a title with undecodable bytes or a NUL must not make an
output file unreadable. :func:`sanitize` walks any value (dicts, lists, tuples, numpy scalars and
arrays) and returns a clean copy:

* a non-finite float becomes ``None``, and the dotted path of each such field is reported
  (``scores.judge``, ``tags[2].score``) so the row can carry ``nonfinite_fields``;
* a string keeps its text but lone surrogates (undecodable bytes read with ``surrogateescape``)
  become U+FFFD and NUL characters are removed; dict keys likewise;
* a string field whose name ends in ``_json`` (a JSON document kept as text, e.g.
  ``metadata_json``) is re-encoded strictly if it holds ``NaN`` / ``Infinity``;
* ``bytes`` are left alone (binary columns), other objects are kept as they are.

The writer calls :func:`sanitize_record` on every row before it builds shard JSON, sidecars and
parquet files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

#: the row field that lists the paths of values that were not finite numbers
NONFINITE_FIELD = "nonfinite_fields"
_BAD_TEXT = re.compile(r"[\ud800-\udfff\x00]")
_NONFINITE_TOKEN = re.compile(r"\b(NaN|Infinity)\b")


def clean_text(text: str) -> str:
    """``text`` as valid UTF-8 without NUL: lone surrogates become U+FFFD, NULs are dropped."""
    if not _BAD_TEXT.search(text):
        return text
    return _BAD_TEXT.sub(lambda m: "" if m.group(0) == "\x00" else "\ufffd", text)


def _restrict_json(text: str, path: str, bad: list[str]) -> str:
    """A JSON text re-encoded without NaN/Infinity (they become null); unparsable text is kept."""
    try:
        doc = json.loads(text)
    except ValueError:
        return clean_text(text)
    return json.dumps(_walk(doc, path, bad), allow_nan=False, ensure_ascii=False)


def _walk(value: Any, path: str, bad: list[str]) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        bad.append(path or "<value>")
        return None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key = clean_text(k) if isinstance(k, str) else k
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(v, str) and isinstance(key, str) and key.endswith("_json") and _NONFINITE_TOKEN.search(v):
                out[key] = _restrict_json(v, sub, bad)
            else:
                out[key] = _walk(v, sub, bad)
        return out
    if isinstance(value, (list, tuple)):
        items = [_walk(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return _walk(tolist(), path, bad)
    return value


def sanitize(value: Any) -> tuple[Any, list[str]]:
    """A JSON- and parquet-safe copy of ``value`` and the paths of the non-finite numbers it held."""
    bad: list[str] = []
    return _walk(value, "", bad), bad


def sanitize_row(row: Mapping[str, Any], flag_field: str | None = NONFINITE_FIELD) -> dict[str, Any]:
    """A clean copy of one row. If any value was non-finite and ``flag_field`` is given, the copy
    carries ``flag_field`` = sorted list of their paths (merged with any list already there)."""
    clean, bad = sanitize(dict(row))
    if bad and flag_field:
        earlier = clean.get(flag_field) or []
        clean[flag_field] = sorted({*earlier, *bad})
    return clean


sanitize_record = sanitize_row  # the name pipeline/writer.py looks up


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of the sanitised ``obj`` with ``allow_nan=False`` (raises if anything slipped through)."""
    clean, _ = sanitize(obj)
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(clean, allow_nan=False, **kwargs)


def is_strict_json(text: str) -> bool:
    """True if ``text`` parses as JSON without NaN/Infinity constants."""

    def _refuse(name: str) -> Any:
        raise ValueError(f"non-finite constant {name}")

    try:
        json.loads(text, parse_constant=_refuse)
    except ValueError:
        return False
    return True

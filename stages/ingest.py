"""Ingest: read the input LIST into video rows.

LIST is a ``.txt`` (one URL or path a line; blank lines and ``#`` comments ignored), ``.csv``,
``.jsonl`` or ``.parquet`` file with a ``url`` column, an optional ``id`` column and any other
columns, which are carried through to the shard JSON as ``metadata``.

Bad lines do not stop the job: each becomes an error row (``error_stage='ingest'``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import storage
from pipeline.errors import InputListError
from pipeline.security import redact_url
from pipeline.stage import Row

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "file", "s3", "gs", "gcs", "az", "abfs", "ftp")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _digest(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def make_video_id(url: str, given_id: str | None = None) -> str:
    """A deterministic id safe in WebDataset keys and file names: ``[A-Za-z0-9_-]`` only.

    A given id is kept when already safe; otherwise it is sanitised and a hash of the original
    is appended, so distinct ids stay distinct. Without an id, the URL's file stem plus a hash
    of the whole URL is used.
    """
    if given_id is not None and str(given_id).strip():
        raw = str(given_id).strip()
        safe = _SAFE.sub("_", raw).strip("_")[:64]
        if safe == raw:
            return safe
        return f"{safe[:48] or 'id'}-{_digest(raw, 8)}"
    stem = Path(urlparse(url).path).stem or "video"
    return f"{_SAFE.sub('_', stem).strip('_')[:40] or 'video'}-{_digest(url)}"


def _is_url(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme.lower() in URL_SCHEMES and bool(parsed.netloc or parsed.path)


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return []
            if "url" not in reader.fieldnames:
                raise InputListError(f"{path}: CSV needs a 'url' column, has {reader.fieldnames}")
            return [dict(r) for r in reader]
    if suffix in (".jsonl", ".ndjson"):
        out: list[dict[str, Any]] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append({"url": line.strip(), "_error": f"line {n} is not JSON: {exc.msg}"})
                continue
            out.append(obj if isinstance(obj, dict) else {"url": "", "_error": f"line {n} is not an object"})
        return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "url" not in table.column_names:
            raise InputListError(f"{path}: parquet needs a 'url' column, has {table.column_names}")
        return table.to_pylist()
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"url": ln.strip()} for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def read_inputs(list_path: str | Path) -> list[Row]:
    """Rows for every input: a video row, or an error row for a line that cannot be used."""
    if storage.is_remote(list_path):
        if not storage.exists(str(list_path)):
            raise InputListError(f"input list not found: {list_path}")
        path = storage.localize(str(list_path))
    else:
        path = Path(list_path)
    if not path.is_file():
        raise InputListError(f"input list not found: {path}")
    records = _read_records(path)
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for index, rec in enumerate(records):
        url_value = rec.get("url")
        url = "" if url_value is None else str(url_value).strip()
        given = rec.get("id")
        meta = {k: _jsonable(v) for k, v in rec.items() if k not in ("url", "id", "_error")}
        row: Row = {
            "source_url": redact_url(url),
            "fetch_url": url,
            "input_index": index,
            "metadata_json": json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None,
        }
        problem = rec.get("_error")
        if problem is None and not url:
            problem = "empty url"
        if problem is None and not _is_url(url) and not Path(url).expanduser().exists():
            problem = f"not a URL ({', '.join(URL_SCHEMES)}) and no such local file: {redact_url(url)!r}"
        row["video_id"] = make_video_id(url or f"line-{index}", None if given is None else str(given))
        if problem is not None:
            kind = "invalid_input"
            if url and not _is_url(url) and ("/" in url or Path(url).suffix) and " " not in url:
                kind, problem = "not_found", f"no such local file: {redact_url(url)!r}"
            rows.append({**row, "error_stage": "ingest", "error_type": kind, "error": problem})
            continue
        first = seen.get(row["video_id"])
        if first is not None:
            what = "id" if given is not None else "url"
            rows.append(
                {
                    **row,
                    "video_id": f"{row['video_id']}-dup{index}",
                    "error_stage": "ingest",
                    "error_type": "duplicate_input",
                    "error": f"same {what} as input line {first + 1}",
                }
            )
            continue
        seen[row["video_id"]] = index
        rows.append(row)
    log.info("ingest: %d inputs from %s (%d unusable)", len(rows), path, sum(1 for r in rows if r.get("error")))
    return rows

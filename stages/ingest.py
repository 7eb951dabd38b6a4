"""Ingest: read the input LIST into video rows.

LIST is a ``.txt`` (one URL or path a line; blank lines and ``#`` comments ignored), ``.csv``,
``.tsv``, ``.jsonl`` or ``.parquet`` file with a ``url`` column, an optional ``id`` column and any
other columns, which are carried through to the shard JSON as ``metadata``.

Text LISTs may be UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32 with a byte-order
mark (what "Unicode text" exports of spreadsheets and Windows editors write), with LF, CRLF or CR
line ends. A CSV may use ``,``, ``;``, tab or ``|`` as delimiter (sniffed from the header), and its
``url`` / ``id`` headers match case-insensitively.

Bad lines do not stop the job: each becomes an error row (``error_stage='ingest'``): a line that
is not valid UTF-8, holds a NUL byte, is too long, names a file that does not exist or whose name
is longer than the file system allows, and so on. Only a LIST that cannot be read at all raises
:class:`~pipeline.errors.InputListError`.

The module is built from per-record functions so that a distributed reader can call them on
slices of the LIST (see :func:`iter_records`, :func:`record_to_row`, :func:`mark_duplicates`):

* ``records_from_bytes(data, suffix, name, first_lineno)``: records of a whole LIST or of a
  slice cut at line ends (bytes; encoding, BOM and line ends handled);
* ``decode_list_bytes(data) -> str``: the LIST's text; undecodable bytes survive as lone
  surrogates, so one bad line is found and reported by the per-line step, not the whole file;
* ``parse_text_line(line, lineno)`` / ``parse_jsonl_line(line, lineno)`` -> a record dict or
  ``None`` (blank or comment); a record carrying ``_error`` becomes an error row;
* ``slice_records(data, fmt, first_line, header)``: records of a slice of a UTF-8 LIST cut at
  record boundaries, with where each ends (``pipeline.ingest`` plans such slices as blocks);
  ``read_csv_header`` reads a CSV's header once for all its slices;
* ``record_to_row(record, index) -> Row``: a video row or an ingest error row (never raises);
  ``usable_video_id(record)``: the id it would get, None if it becomes an error row;
* ``mark_duplicates(rows, seen)``: turns repeats of an earlier ``video_id`` into error rows
  (``duplicate_row``; the distributed reader finds the repeats with a pass over id hashes).
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from pipeline import storage
from pipeline.errors import InputListError
from pipeline.security import redact_url
from pipeline.stage import Row

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "file", "s3", "gs", "gcs", "az", "abfs", "ftp")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]{1,30})://")
#: longest accepted URL or path line, in characters (browsers and servers stop near 8 KiB)
MAX_URL_CHARS = 8192
#: how much of an unusable line an error row keeps (the line number identifies it anyway)
_SHOWN_CHARS = 512
_NAME_MAX = 255  # bytes per path component on common file systems
_PATH_MAX = 4096  # bytes per path on Linux
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _digest(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


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
    fast = _plain_url(url)
    try:
        stem = _stem(fast[1] if fast else urlparse(url).path) or "video"
    except ValueError:  # e.g. an invalid IPv6 netloc
        stem = "video"
    return f"{_SAFE.sub('_', stem).strip('_')[:40] or 'video'}-{_digest(url)}"


def _stem(path: str) -> str:
    """``Path(path).stem`` without building a Path (a third of an id's cost on a big LIST)."""
    name = path.rsplit("/", 1)[-1]
    if name in ("", "."):  # a trailing slash or "." component: pathlib drops them
        return Path(path).stem
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


# scheme://netloc with a plain ASCII netloc: urlparse needs no more (it costs ~5 us a URL)
_PLAIN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#\[\]]+)(?=[/?#]|\Z)")
_PATH_END = re.compile(r"[?#]")


def _plain_url(text: str) -> tuple[str, str] | None:
    """(scheme, path) as ``urlparse`` gives them, for a printable ASCII URL with a host and no
    ``;`` parameters; None for anything else (then ``urlparse`` itself decides)."""
    if not (text.isascii() and text.isprintable()):
        return None
    m = _PLAIN_URL.match(text)
    if m is None:
        return None
    path = _PATH_END.split(text[m.end() :], 1)[0]
    return None if ";" in path else (m.group(1).lower(), path)


def _is_url(text: str) -> bool:
    fast = _plain_url(text)
    if fast is not None:
        return fast[0] in URL_SCHEMES
    try:
        parsed = urlparse(text)
    except ValueError:
        return False
    return parsed.scheme.lower() in URL_SCHEMES and bool(parsed.netloc or parsed.path)


# ----------------------------------------------------------------------------- decoding


def detect_encoding(head: bytes) -> tuple[str, int]:
    """(encoding, length of its byte-order mark) from a LIST's first bytes: a UTF-8/16/32 BOM, or
    BOM-less UTF-16 recognised by its NUL bytes (ASCII text in UTF-16 is half NULs), else UTF-8."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    if len(head) >= 4 and b"\0" in head[:512]:
        head = head[:512]
        even, odd = head[0::2], head[1::2]
        if odd.count(0) > len(odd) * 0.6 and even.count(0) < len(even) * 0.1:
            return "utf-16-le", 0
        if even.count(0) > len(even) * 0.6 and odd.count(0) < len(odd) * 0.1:
            return "utf-16-be", 0
    return "utf-8", 0


def decode_list_bytes(data: bytes) -> str:
    """Decode a LIST file (see :func:`detect_encoding`); the BOM itself is dropped. Undecodable
    UTF-8 bytes become lone surrogates (``surrogateescape``) that :func:`_unusable` reports line
    by line; wider encodings replace them."""
    encoding, bom = detect_encoding(data[:512])
    return data[bom:].decode(encoding, "surrogateescape" if encoding == "utf-8" else "replace")


def _printable(text: str, limit: int = _SHOWN_CHARS) -> str:
    """``text`` made storable (valid UTF-8, no NUL) and short, for error rows."""
    text = _SURROGATE.sub("\ufffd", text).replace("\0", "\\0")
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"


def _unusable(text: str, what: str) -> str | None:
    """Why ``text`` (a URL/path or an id) cannot be used at all, or None."""
    if _SURROGATE.search(text):
        return f"{what} is not valid UTF-8"
    if "\0" in text:
        return f"{what} contains a NUL byte"
    return None


# ----------------------------------------------------------------------------- per-record parsing


def parse_text_line(line: str, lineno: int) -> dict[str, Any] | None:
    """One line of a ``.txt`` LIST -> a record, or None for a blank line or a ``#`` comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    problem = _unusable(text, f"line {lineno}")
    return {"url": text, "_error": problem} if problem else {"url": text}


def parse_jsonl_line(line: str, lineno: int) -> dict[str, Any] | None:
    """One line of a ``.jsonl`` LIST -> a record (``_error`` set if unusable), or None if blank."""
    if not line.strip():
        return None
    problem = _unusable(line, f"line {lineno}")
    if problem:
        return {"url": line.strip(), "_error": problem}
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return {"url": line.strip(), "_error": f"line {lineno} is not JSON: {msg}"}
    if not isinstance(obj, dict):
        return {"url": "", "_error": f"line {lineno} is not an object"}
    return normalize_record(obj)


def normalize_record(record: dict[str, Any]) -> dict[str, Any]:
    """Column names trimmed (a stray BOM or spaces from a spreadsheet), ``url``/``id`` matched
    case-insensitively. Other columns keep their names."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = str(key).lstrip("\ufeff").strip()
        if name.lower() in ("url", "id") and name.lower() not in out:
            name = name.lower()
        out.setdefault(name, value)
    return out


def _normalize_header(fieldnames: list[str] | None) -> list[str] | None:
    """CSV header names as :func:`normalize_record` names them (same count and order)."""
    if fieldnames is None:
        return None
    names = [str(f).lstrip("\ufeff").strip() for f in fieldnames]
    for wanted in ("url", "id"):
        if wanted not in names:
            match = next((i for i, n in enumerate(names) if n.lower() == wanted), None)
            if match is not None:
                names[match] = wanted
    return names


def _sniff_delimiter(header: str, default: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    if counts[default]:
        return default
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else default


def _csv_records(stream: TextIO, path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    """Records of CSV text read from ``stream`` (opened with ``newline=""``)."""
    first = stream.readline()
    lines = itertools.chain([first], stream)
    reader = csv.DictReader(lines, delimiter=_sniff_delimiter(first, delimiter))
    try:
        fieldnames = _normalize_header(reader.fieldnames)
    except csv.Error as exc:
        raise InputListError(f"{path}: cannot read the CSV header: {exc}") from None
    if fieldnames is None:
        return
    reader.fieldnames = fieldnames
    check_csv_header(fieldnames, path)
    yield from _csv_dicts(reader, 0)


def check_csv_header(fieldnames: list[str], path: str | Path) -> None:
    """Raise InputListError unless the (normalised) CSV header has a ``url`` column."""
    if "url" not in fieldnames:
        shown = [_printable(f, 40) for f in fieldnames[:20]]
        raise InputListError(f"{path}: CSV needs a 'url' column, has {shown}")


def _csv_dicts(reader: csv.DictReader, line_offset: int) -> Iterator[dict[str, Any]]:
    """The records of a ``DictReader`` whose field names are set; bad rows become ``_error``
    records naming their last line (the csv reader's count: ``DictReader.line_num`` is not
    updated past skipped blank lines or on an error) plus ``line_offset``."""
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a NUL byte or a field over the size limit
            yield {"url": "", "_error": f"CSV line {reader.reader.line_num + line_offset}: {exc}"}
            continue
        lineno = reader.reader.line_num + line_offset
        rec.pop(None, None)  # values beyond the header (ragged row)
        # url and id must be exact; other columns are metadata: undecodable bytes become U+FFFD
        problem = next((p for k in ("url", "id") if (p := _unusable(rec.get(k) or "", f"CSV line {lineno}: {k}"))), None)
        if problem:
            yield {"url": rec.get("url") or "", "_error": problem}
        else:
            yield dict(rec)


# ----------------------------------------------------------------------------- slices (distributed reads)

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def count_lines(data: bytes) -> int:
    """Lines in UTF-8 LIST bytes as a reader counts them (LF, CRLF and CR end a line)."""
    if not data:
        return 0
    ends = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return ends + (data[-1:] not in (b"\n", b"\r"))


def iter_line_spans(data: bytes) -> Iterator[tuple[str, int]]:
    """(line with its line end, offset just past it) for UTF-8 LIST bytes, split exactly as a text
    stream opened with ``newline=""`` splits them; undecodable bytes become lone surrogates."""
    for m in _LINE.finditer(data):
        yield m.group().decode("utf-8", "surrogateescape"), m.end()


@dataclass(frozen=True)
class CsvHeader:
    """What a slice of a CSV needs from its first line: the delimiter and the normalised names."""

    delimiter: str
    fieldnames: tuple[str, ...]


def read_csv_header(data: bytes, path: str | Path, default_delimiter: str) -> tuple[CsvHeader | None, int, int]:
    """(header, bytes it takes, lines it takes) from the start of a UTF-8 CSV (after any BOM).

    ``data`` must hold the whole header record; a header is None for an empty CSV. Raises
    InputListError for a header without a ``url`` column, as :func:`iter_records` does."""
    spans = iter_line_spans(data)
    first = next(spans, None)
    if first is None:
        return None, 0, 0
    delimiter = _sniff_delimiter(first[0], default_delimiter)
    pos = first[1]

    def lines() -> Iterator[str]:
        nonlocal pos
        yield first[0]
        for line, end in spans:
            pos = end
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        names = next(reader, None)
    except csv.Error as exc:
        raise InputListError(f"{path}: cannot read the CSV header: {exc}") from None
    if names is None:
        return None, 0, 0
    fieldnames = _normalize_header(names) or []
    check_csv_header(fieldnames, path)
    return CsvHeader(delimiter, tuple(fieldnames)), pos, reader.line_num


def slice_records(data: bytes, fmt: str, first_line: int = 1, header: CsvHeader | None = None) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(record, offset just past it, lines read so far) for a slice of a UTF-8 LIST cut at record
    boundaries: ``fmt`` is ``lines`` (.txt), ``jsonl`` or ``csv`` (then ``header`` is the file's
    header and the slice holds data records only); ``first_line`` is the slice's first line number.

    Gives the records :func:`iter_records` gives for the same lines of the whole file."""
    if fmt == "csv":
        assert header is not None
        pos = 0

        def lines() -> Iterator[str]:
            nonlocal pos
            for line, end in iter_line_spans(data):
                pos = end
                yield line

        reader = csv.DictReader(lines(), fieldnames=list(header.fieldnames), delimiter=header.delimiter)
        for rec in _csv_dicts(reader, first_line - 1):
            yield rec, pos, reader.reader.line_num
        return
    parse = parse_jsonl_line if fmt == "jsonl" else parse_text_line
    for n, (line, end) in enumerate(iter_line_spans(data), 1):
        rec = parse(line.rstrip("\r\n"), first_line + n - 1)
        if rec is not None:
            yield rec, end, n


def spans_lines(record: dict[str, Any]) -> bool:
    """Whether a CSV record holds a line end in a value (a quoted field that spans lines)."""
    for value in record.values():
        for v in value if isinstance(value, list) else (value,):
            if isinstance(v, str) and ("\n" in v or "\r" in v):
                return True
    return False


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a local LIST file, in order, streamed (UTF-8 text and parquet are never held
    whole; UTF-16/32 text is decoded whole); raises InputListError only if it is unreadable as a whole."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InputListError(f"cannot read input list {path}: {exc.strerror or exc}") from None
    with f:
        encoding, bom = detect_encoding(f.read(512))
        f.seek(0)
        if encoding != "utf-8":
            yield from records_from_bytes(f.read(), suffix, path)  # UTF-16/32: decoded whole
            return
        f.seek(bom)
        stream = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        yield from _records_from_stream(stream, suffix, path, 1)


def records_from_bytes(data: bytes, suffix: str, name: str | Path = "LIST", first_lineno: int = 1) -> Iterator[dict[str, Any]]:
    """Records of LIST text (``.txt``/``.jsonl``/``.csv``/``.tsv``, by ``suffix``) given as bytes:
    a whole file, or a slice of one that a distributed reader cut at line ends (a CSV slice must
    start with the header line; ``first_lineno`` numbers the slice's lines in error messages)."""
    yield from _records_from_stream(io.StringIO(decode_list_bytes(data), newline=""), suffix, Path(name), first_lineno)


def _records_from_stream(stream: TextIO, suffix: str, path: Path, first_lineno: int) -> Iterator[dict[str, Any]]:
    suffix = suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _csv_records(stream, path, "\t" if suffix == ".tsv" else ",")
        return
    parse = parse_jsonl_line if suffix in (".jsonl", ".ndjson") else parse_text_line
    for lineno, line in enumerate(stream, first_lineno):  # LF, CRLF and CR (newline="")
        rec = parse(line.rstrip("\r\n"), lineno)
        if rec is not None:
            yield rec


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputListError(f"{path}: not a readable parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if "url" not in (_normalize_header(names) or []):
        raise InputListError(f"{path}: parquet needs a 'url' column, has {names}")
    for batch in pf.iter_batches(batch_size=8192):
        yield from batch.to_pylist()  # record_to_row normalises the column names


# ----------------------------------------------------------------------------- validation


def _local_path_problem(text: str) -> tuple[str, str] | None:
    """(error_type, message) if ``text`` cannot name an existing local file, else None.

    Never raises: over-long names and paths (ENAMETOOLONG), NUL bytes and permission errors
    become typed reasons."""
    try:
        encoded = os.fsencode(text)
    except UnicodeError:
        return "invalid_input", "path is not encodable on this file system"
    if len(encoded) >= _PATH_MAX:
        return "invalid_input", f"path is too long ({len(encoded)} bytes; the limit is {_PATH_MAX - 1})"
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > _NAME_MAX:
        return "invalid_input", f"a file name in the path is too long ({longest} bytes; the limit is {_NAME_MAX})"
    try:
        path = Path(text).expanduser()
        path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not_found", f"no such local file: {_printable(redact_url(text))!r}"
        if exc.errno == errno.ENAMETOOLONG:
            return "invalid_input", "path is too long for the file system"
        return "invalid_input", f"cannot use local path {_printable(text)!r}: {exc.strerror or exc}"
    except (ValueError, RuntimeError) as exc:  # embedded NUL, unresolvable ~user
        return "invalid_input", f"cannot use local path {_printable(text)!r}: {exc}"
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return _printable(value, 1 << 20) if _SURROGATE.search(value) or "\0" in value else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _looks_like_path(url: str) -> bool:
    return bool(url) and not _is_url(url) and ("/" in url or bool(Path(url).suffix)) and " " not in url


def _assess(record: dict[str, Any]) -> tuple[dict[str, Any], str, str | None, str, str | None]:
    """(normalised record, url, given id, error type, problem or None): the checks of one record."""
    rec = normalize_record(record)
    for name in ("url", "id"):  # a binary column (parquet) holding text
        if isinstance(rec.get(name), (bytes, bytearray)):
            rec[name] = bytes(rec[name]).decode("utf-8", "surrogateescape")
    url_value = rec.get("url")
    url = "" if url_value is None else str(url_value).strip()
    given = rec.get("id")
    given_text = None if given is None or (isinstance(given, str) and not given.strip()) else str(given)
    problem: str | None = rec.get("_error")
    kind = "invalid_input"
    if problem is None and not url:
        problem = "empty url"
    if problem is None:
        problem = _unusable(url, "url") or (_unusable(given_text, "id") if given_text else None)
    if problem is None and len(url) > MAX_URL_CHARS:
        problem = f"line is too long for a URL or path ({len(url)} characters; the limit is {MAX_URL_CHARS})"
    is_url = problem is None and _is_url(url)
    if problem is None and not is_url and (scheme := _SCHEME.match(url)):
        kind = "unsupported_scheme"
        problem = f"URL scheme {scheme.group(1).lower()!r} is not fetched (supported: {', '.join(URL_SCHEMES)})"
    if problem is None and not is_url:
        found = _local_path_problem(url)
        if found is not None:
            kind, problem = found
            if kind == "not_found" and not _looks_like_path(url):
                kind = "invalid_input"
                problem = f"not a URL ({', '.join(URL_SCHEMES)}) and no such local file: {_printable(redact_url(url))!r}"
    return rec, url, given_text, kind, problem


def usable_video_id(record: dict[str, Any]) -> str | None:
    """The ``video_id`` :func:`record_to_row` gives a usable record (before duplicate marking), or
    None for a record it turns into an error row: the same checks, without building the row."""
    _, url, given_text, _, problem = _assess(record)
    return None if problem is not None else make_video_id(url, given_text)


def record_to_row(record: dict[str, Any], index: int) -> Row:
    """One LIST record -> a video row, or an ingest error row for a record that cannot be used.

    Pure and per record (no duplicate check: see :func:`mark_duplicates`); never raises."""
    rec, url, given_text, kind, problem = _assess(record)
    meta = {k: _jsonable(v) for k, v in rec.items() if k not in ("url", "id", "_error")}
    storable = url if problem is None else _printable(url)
    if given_text is not None and _unusable(given_text, "id"):
        given_text = _printable(given_text)
    row: Row = {
        "source_url": redact_url(storable),
        "fetch_url": storable,
        "input_index": index,
        "metadata_json": json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None,
        "video_id": make_video_id(storable or f"line-{index}", given_text),
    }
    if problem is not None:
        row.update({"error_stage": "ingest", "error_type": kind, "error": problem})
    return row


def duplicate_row(row: Row, first: int) -> Row:
    """A usable row whose ``video_id`` the row at input index ``first`` already has, as an
    ``ingest/duplicate_input`` error row with a distinct id."""
    vid, index = row["video_id"], row["input_index"]
    what = "url" if vid == make_video_id(row.get("fetch_url") or "") else "id"
    return {
        **row,
        "video_id": f"{vid}-dup{index}",
        "error_stage": "ingest",
        "error_type": "duplicate_input",
        "error": f"same {what} as input line {first + 1}",
    }


def mark_duplicates(rows: Iterable[Row], seen: dict[str, int] | None = None) -> Iterator[Row]:
    """Rows in order; a usable row whose ``video_id`` an earlier row already has becomes an
    ``ingest/duplicate_input`` error row (:func:`duplicate_row`). ``seen`` maps ids to input
    indexes and may be shared across calls."""
    seen = {} if seen is None else seen
    for row in rows:
        if row.get("error_stage"):
            yield row
            continue
        first = seen.setdefault(row["video_id"], row["input_index"])
        yield row if first == row["input_index"] else duplicate_row(row, first)


def list_uri(list_path: str | Path) -> str:
    """The LIST's URI (an object-store URL, or the local path as given); InputListError when it is
    not an existing file."""
    text = str(list_path)
    if storage.is_remote(text):
        if not storage.exists(text):
            raise InputListError(f"input list not found: {text}")
        return text
    try:
        ok = Path(text).is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise InputListError(f"input list not found: {_printable(text, 300)}")
    return text


def iter_rows(list_path: str | Path) -> Iterator[Row]:
    """Every input as a row (a video row, or an error row for a line that cannot be used), in LIST
    order, lazily."""
    uri = list_uri(list_path)
    path = storage.localize(uri) if storage.is_remote(uri) else Path(uri)
    return mark_duplicates(record_to_row(rec, i) for i, rec in enumerate(iter_records(path)))


def read_inputs(list_path: str | Path) -> list[Row]:
    """:func:`iter_rows` as a list."""
    rows = list(iter_rows(list_path))
    log.info("ingest: %d inputs from %s (%d unusable)", len(rows), list_path, sum(1 for r in rows if r.get("error")))
    return rows

"""Typed errors. A stage raises these for a bad sample; the runner records them as data.

``error_type`` in ``errors.parquet`` is one of :data:`ERROR_TYPES`, a closed, documented set
(README "Error types"). A failure nobody classified (an exception from a library) is recorded as
``internal_error`` with the exception's class and message in ``error``: see :func:`error_type_of`.
"""

from __future__ import annotations

#: every ``error_type`` avforge writes, with its meaning (README lists the same table)
ERROR_TYPES: dict[str, str] = {
    # ingest (error_stage=ingest)
    "invalid_input": "a LIST line/record that cannot be used (not a URL or path, not UTF-8, NUL byte, too long)",
    "duplicate_input": "the same id or URL as an earlier LIST line",
    # download
    "not_found": "HTTP 404/410, no such local file or object",
    "forbidden": "HTTP 401/403/451, private or sign-in only",
    "rate_limited": "HTTP 429 after all retries (Retry-After honoured within the deadline)",
    "timeout": "the per-input wall-clock deadline (download.max_download_seconds) or a socket timeout",
    "unreachable": "the host cannot be resolved or refuses connections",
    "server_error": "HTTP 5xx after all retries",
    "blocked_address": "a URL, redirect, segment or key on a private/loopback/link-local address",
    "unsupported_scheme": "a URL scheme or protocol avforge does not fetch (rtsp, rtmp, mms, a redirect to "
    "file://, ...)",
    "protocol_refused": "a stream yt-dlp would hand to ffmpeg or another external program (live HLS/DASH, "
    "DRM/SAMPLE-AES, rtmp): refused unless download.allow_external_downloaders",
    "playlist_refused": "the URL is a playlist or a page of several videos (one URL per video)",
    "not_a_video": "no video formats, an HTML page, a playlist/manifest file or bytes ffmpeg cannot read",
    "empty_file": "0 bytes",
    "too_large": "over download.max_filesize_mb or max_source_height",
    "too_long": "over download.max_duration_seconds",
    "local_paths_disabled": "a local path while download.allow_local_paths=false",
    "file_url_refused": "a file:// URL while download.allow_file_urls=false",
    "path_refused": "a local path outside download.local_path_roots",
    "download_failed": "any other download failure (detail in `error`)",
    # media and later stages
    "corrupt_media": "the container or a stream cannot be decoded (truncated, damaged, NaN samples)",
    "no_video": "no video stream where one is needed",
    "no_audio": "no audio stream or no audio packets where they are needed",
    "no_frames": "a clip without frames for a frame-based stage",
    "missing_input": "a column an earlier stage should have filled is empty",
    "ffmpeg_failed": "the ffmpeg CLI failed to cut or convert",
    "empty_caption": "a captioner returned an empty caption",
    "llm_failed": "an LLM backend call failed",
    "out_of_memory": "host or accelerator out of memory on a single row",
    "internal_error": "an unclassified exception (class and message in `error`)",
}


class AvforgeError(Exception):
    """Base class of avforge's own errors."""


class ConfigError(AvforgeError):
    """A config file, a ``--set`` override or a command-line value is wrong."""


class InputListError(AvforgeError):
    """The input LIST cannot be read at all (missing file, unknown format, no url column)."""


class StageError(AvforgeError):
    """A per-sample failure with a machine-readable ``error_type``.

    ``error_type`` is a short snake_case reason such as ``not_found``, ``forbidden``,
    ``rate_limited``, ``timeout``, ``not_a_video``, ``too_large``, ``corrupt_media``.
    ``transient`` marks failures worth retrying (network hiccups, rate limits).
    """

    def __init__(self, message: str, error_type: str = "error", *, transient: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.transient = transient

    def __reduce__(self) -> tuple[object, ...]:  # keep error_type across pickling (Ray)
        return (_rebuild_stage_error, (type(self), str(self), self.error_type, self.transient))


def _rebuild_stage_error(cls: type[StageError], message: str, error_type: str, transient: bool) -> StageError:
    err = cls.__new__(cls)
    StageError.__init__(err, message, error_type, transient=transient)
    return err


def is_out_of_memory(exc: BaseException) -> bool:
    """True for host or accelerator out-of-memory errors (not retried row by row)."""
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemory" in text


def error_type_of(exc: BaseException) -> str:
    """The documented ``error_type`` for any exception: a StageError's own type if it is in
    :data:`ERROR_TYPES`, ``out_of_memory`` for OOM, else ``internal_error`` (keep the detail, e.g.
    ``f"{type(exc).__name__}: {exc}"``, in ``error``)."""
    if is_out_of_memory(exc):
        return "out_of_memory"
    if isinstance(exc, StageError) and exc.error_type in ERROR_TYPES:
        return exc.error_type
    return "internal_error"


def error_message_of(exc: BaseException) -> str:
    """The ``error`` text that goes with :func:`error_type_of`: the class name is kept for
    exceptions whose type is not in the documented set."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, StageError) and exc.error_type in ERROR_TYPES:
        return text
    if isinstance(exc, StageError):
        return f"{exc.error_type}: {text}"
    return f"{type(exc).__name__}: {text}" if str(exc) else type(exc).__name__

"""Download: fetch each input into the staging area with yt-dlp (local paths used in place).

Every failure gets a documented ``error_type`` (pipeline/errors.py ``ERROR_TYPES``):
``not_found``, ``forbidden``, ``rate_limited``, ``timeout``, ``unreachable``, ``server_error``,
``blocked_address``, ``unsupported_scheme``, ``protocol_refused``, ``playlist_refused``,
``not_a_video``, ``empty_file``, ``corrupt_media``, ``too_large``, ``too_long``,
``local_paths_disabled``, ``file_url_refused``, ``path_refused`` or ``download_failed``.
Transient failures (rate limits, socket timeouts, 5xx) are retried with exponential backoff;
a ``Retry-After`` header (seconds or an HTTP date) is honoured.

yt-dlp runs in a child process (stages/_ytdlp_worker.py, which says what it refuses and why):
``download.max_download_seconds`` is a hard wall-clock deadline per input, retries and waits
included. The child stops itself at the deadline; if it cannot (a C-level stall), the stage
kills its process group a few seconds later and starts a fresh child for the next input.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.config import DownloadConfig
from pipeline.errors import StageError
from pipeline import storage
from pipeline.security import BLOCKED_MARK, check_host, redact_text
from pipeline.stage import Resources, Row, Stage, StageContext, per_row
from pipeline.storage import StagingArea
from stages._media import probe
from stages._ytdlp_worker import CAP_MARK

log = logging.getLogger(__name__)

MEDIA_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg", ".m4a", ".mp3", ".wav", ".flac", ".ogg", ".opus"}
)
OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hdfs")
FETCH_SCHEMES = ("http", "https", "ftp")
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
#: seconds the stage waits past the deadline for the child to stop itself before killing it
KILL_GRACE_SECONDS = 3.0
#: first bytes of files ffmpeg would open as a playlist or manifest and follow the URLs inside
_MANIFEST_HEADS = (b"#EXTM3U", b"#EXTINF", b"<?xml", b"<MPD", b"<SMIL", b"<smil", b"ffconcat", b"[playlist]", b"v=0\r\n", b"v=0\n")


def classify_download_error(message: str) -> StageError:
    """Map a yt-dlp error message to a typed StageError."""
    message = redact_text(message)
    if BLOCKED_MARK in message:
        return StageError(message, "blocked_address")
    if CAP_MARK in message:
        kind = "too_large" if "bytes" in message else "timeout"
        return StageError(message, kind)
    m = _HTTP_STATUS.search(message)
    if m:
        code = int(m.group(1))
        if code in (404, 410):
            return StageError(message, "not_found")
        if code in (401, 403, 451):
            return StageError(message, "forbidden")
        if code == 429:
            return StageError(message, "rate_limited", transient=True)
        if 300 <= code < 400 and "infinite loop" not in message:
            # urllib answers a redirect it will not follow (file://, data:, ...) with the 3xx itself
            return StageError(f"redirect to a scheme that is not fetched: {message}", "unsupported_scheme")
        if code >= 500:
            return StageError(message, "server_error", transient=True)
        return StageError(message, "download_failed")
    low = message.lower()
    if any(m in low for m in ("file:// urls are disabled", "unsupported url scheme", "no supporting handlers",
                              "no connection adapters", "unknown url type", "unsupported scheme")):
        return StageError(message, "unsupported_scheme")
    if "timed out" in low or "timeout" in low:
        return StageError(message, "timeout", transient=True)
    if "unsupported url" in low or "no video formats" in low or "requested format is not available" in low:
        return StageError(message, "not_a_video")
    if "live" in low and "not supported" in low:  # e.g. "Live DASH videos are not supported"
        return StageError(message, "protocol_refused")
    if "drm protected" in low:
        return StageError(message, "protocol_refused")
    if "private video" in low or "sign in" in low or "members-only" in low:
        return StageError(message, "forbidden")
    if "video unavailable" in low or "not found" in low:
        return StageError(message, "not_found")
    if "did not get any data blocks" in low:
        return StageError(message, "empty_file")
    if "larger than max-filesize" in low:
        return StageError(message, "too_large")
    if "connection refused" in low or "name or service not known" in low or "failed to resolve" in low:
        return StageError(message, "unreachable", transient=True)
    return StageError(message, "download_failed")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def _error_from_answer(answer: dict[str, Any]) -> StageError:
    kind, message = str(answer.get("kind")), redact_text(str(answer.get("message") or "download failed"))
    if kind == "deadline":
        return StageError(message, "timeout")
    if kind in ("protocol_refused", "playlist_refused", "unsupported_scheme", "blocked_address", "too_large", "download_failed"):
        return StageError(message, kind)
    if kind == "notes":
        if "max-filesize" in message:
            return StageError(message, "too_large")
        if "does not pass filter" in message:
            return StageError(message, "too_long")
        return StageError(message, "download_failed")
    err = classify_download_error(message)
    err.retry_after = parse_retry_after(answer.get("retry_after"))  # type: ignore[attr-defined]
    return err


class _Worker:
    """The yt-dlp child process of one stage instance (see stages/_ytdlp_worker.py)."""

    #: how long the child may take to import yt-dlp and compile its extractors (a busy machine)
    STARTUP_SECONDS = 180.0

    def __init__(self, config: DownloadConfig, target_dir: Path) -> None:
        data = config.model_dump(mode="json")
        if config.proxy is not None:
            data["proxy"] = config.proxy.get_secret_value()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *[p for p in sys.path if p]])}
        env["AVFORGE_WORKER_LOG"] = logging.getLevelName(min(max(log.getEffectiveLevel(), logging.DEBUG), logging.WARNING))
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stages._ytdlp_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
            start_new_session=True,  # its own process group: a kill takes ffmpeg & co. with it
        )
        self._buf = b""
        self.warmed = False
        self._send({"config": data, "target_dir": str(target_dir)})
        ready = self._read(self.STARTUP_SECONDS)
        if not ready or not ready.get("ready"):
            self.kill()
            why = (ready or {}).get("message") or f"no answer within {self.STARTUP_SECONDS:.0f}s"
            raise StageError(f"the download worker did not start: {why}", "download_failed")
        log.debug("download worker %d ready in %.2fs", self.proc.pid, time.monotonic() - started)

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise StageError(f"the download worker died (exit status {self.proc.wait()})", "download_failed") from None

    def _read(self, wait: float | None) -> dict[str, Any] | None:
        """The next answer line, or None (and the child killed) if none came within ``wait`` seconds."""
        out = self.proc.stdout
        assert out is not None
        end = None if wait is None else time.monotonic() + wait
        fd = out.fileno()
        while b"\n" not in self._buf:
            timeout = None if end is None else max(0.0, end - time.monotonic())
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self.kill()
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise StageError(f"the download worker died (exit status {self.proc.wait()})", "download_failed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def warm(self) -> None:
        """Have the child compile yt-dlp's extractor patterns (once; before a deadline starts)."""
        if self.warmed:
            return
        if self.request({"warm": True}, self.STARTUP_SECONDS) is None:
            raise StageError("the download worker did not finish loading yt-dlp's extractors", "download_failed")
        self.warmed = True

    def request(self, req: dict[str, Any], wait: float | None) -> dict[str, Any] | None:
        """Send one request; the answer, or None if none came within ``wait`` seconds (the
        child is then killed)."""
        self._send(req)
        return self._read(wait)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def __del__(self) -> None:
        """A stage dropped without teardown: end of input makes the idle child exit."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def list_title(row: Row) -> str | None:
    """The LIST's own ``title`` column (any case, stray spaces ignored), which wins over the title
    yt-dlp reports (for a direct file that is only the file's stem)."""
    try:
        meta = json.loads(row.get("metadata_json") or "{}")
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    for key, value in meta.items():
        if str(key).strip().lower() == "title" and isinstance(value, str) and value.strip():
            return value.strip()
    return None


class DownloadStage(Stage[DownloadConfig]):
    """Fetch URLs with yt-dlp into ``STAGING/videos``; local files are checked and used in place."""

    name = "download"
    reads = ("video_id", "source_url", "metadata_json")
    optional_reads = ("metadata_json",)
    writes = ("local_path", "title", "video_duration")

    def __init__(self, config: DownloadConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self._worker: _Worker | None = None  # the yt-dlp child process, started on the first URL
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # a child process and a lock: each process starts its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_worker", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._worker = None
        self._lock = threading.Lock()

    @property
    def resources(self) -> Resources:
        # I/O bound: a fraction of a CPU each, bounded concurrency.
        return Resources(cpus=0.25, pool_size=self.config.concurrency)

    @property
    def batch_size(self) -> int:
        return 1

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return per_row(self._one, rows)

    def setup(self) -> None:
        """Nothing to load: the yt-dlp child starts with the first URL (local inputs never need it)."""

    def teardown(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    # ------------------------------------------------------------------ one input

    def _one(self, row: Row) -> dict[str, Any]:
        url: str = row.get("fetch_url") or row["source_url"]
        try:
            parsed = urlparse(url)
        except ValueError as exc:  # e.g. "http://[::1" (an unclosed IPv6 literal)
            raise StageError(f"not a valid URL: {exc}", "invalid_input") from None
        if parsed.scheme in FETCH_SCHEMES:
            self._check_address(parsed.hostname or "")
            path, title = self._fetch_with_retries(url, row["video_id"])
        elif parsed.scheme in OBJECT_SCHEMES:
            path, title = self._fetch_object(url, row["video_id"]), Path(parsed.path).stem
        else:
            path = self._local_path(url)
            title = path.stem
        try:
            duration = self._check_media(path)
        except StageError:
            if self._staged(path):
                path.unlink(missing_ok=True)
            raise
        local_path = self.staging.publish(f"videos/{path.name}") if self._staged(path) else str(path)
        return {"local_path": local_path, "title": list_title(row) or title, "video_duration": duration}

    @property
    def staging(self) -> StagingArea:
        return StagingArea(self.context.staging_dir)

    def _staged(self, path: Path) -> bool:
        return path.parent == self.staging.root / "videos"

    def _fetch_object(self, url: str, video_id: str) -> Path:
        """Copy an object-store URL (s3://, gs://, ...) into the staging area."""
        try:
            nbytes = storage.size(url)
        except FileNotFoundError:
            raise StageError(f"no such object: {redact_text(url)}", "not_found") from None
        except PermissionError as exc:
            raise StageError(f"access denied: {exc}", "forbidden") from None
        cap = self.config.max_filesize_mb
        if cap is not None and nbytes > cap * 1024 * 1024:
            raise StageError(f"object is {nbytes / 2**20:.1f} MiB, over max_filesize_mb={cap}", "too_large")
        target = self.staging.local(f"videos/{video_id}{Path(urlparse(url).path).suffix or '.mp4'}")
        storage.get_file(url, target)
        return target

    def _check_media(self, path: Path) -> float:
        """Check size, duration and height caps; return the duration."""
        self._check_size(path)
        self._refuse_manifest(path)
        info = probe(path)
        cap = self.config.max_duration_seconds
        if cap is not None and info.duration > cap:
            raise StageError(f"duration {info.duration:.0f}s exceeds max_duration_seconds={cap:.0f}", "too_long")
        max_h = self.config.max_source_height
        if max_h is not None and info.height is not None and info.height > max_h:
            raise StageError(f"video is {info.height}px tall, over max_source_height={max_h}", "too_large")
        return info.duration

    @staticmethod
    def _refuse_manifest(path: Path) -> None:
        """A playlist or manifest (HLS, DASH, SMIL, ffconcat, SDP) is not media: ffmpeg and PyAV
        would follow the URLs inside it on their own connections, outside the address guard,
        whatever the file is called. Refused before any decoder opens it."""
        with path.open("rb") as f:
            head = f.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(_MANIFEST_HEADS):
            kind = head.split(b"\n", 1)[0][:20].decode("ascii", "replace").strip()
            raise StageError(f"the file is a playlist or manifest ({kind!r}), not media", "not_a_video")

    def preflight(self, url: str) -> None:
        """The checks a download makes before fetching anything (used by ``--dry-run``)."""
        try:
            parsed = urlparse(url)
        except ValueError as exc:
            raise StageError(f"not a valid URL: {exc}", "invalid_input") from None
        if parsed.scheme in FETCH_SCHEMES:
            self._check_address(parsed.hostname or "")
        elif parsed.scheme in OBJECT_SCHEMES:
            if not storage.exists(url):
                raise StageError(f"no such object: {redact_text(url)}", "not_found")
        else:
            self._local_path(url)

    def _check_address(self, host: str) -> None:
        if self.config.allow_private_addresses:
            return
        try:
            check_host(host, self.config.allowed_hosts)
        except PermissionError as exc:
            raise StageError(str(exc), "blocked_address") from None
        except OSError as exc:
            raise StageError(f"cannot resolve {host}: {exc}", "unreachable", transient=True) from None

    def _local_path(self, url: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if not self.config.allow_file_urls:
                raise StageError("file:// URLs are refused (download.allow_file_urls=false)", "file_url_refused")
            path = Path(unquote(parsed.path))
        elif parsed.scheme:
            raise StageError(f"unsupported URL scheme {parsed.scheme!r}", "unsupported_scheme")
        else:
            if not self.config.allow_local_paths:
                raise StageError("local paths are refused (download.allow_local_paths=false)", "local_paths_disabled")
            path = Path(url).expanduser()
        try:
            path = path.resolve()
            roots = self.config.local_path_roots
            if roots is not None and not any(path.is_relative_to(Path(r).resolve()) for r in roots):
                raise StageError(f"{path} is outside download.local_path_roots", "path_refused")
            if not path.is_file():
                raise StageError(f"no such file: {path}", "not_found")
        except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES ...
            raise StageError(f"cannot use local path: {exc.strerror or exc}", "invalid_input") from None
        except ValueError as exc:  # embedded NUL
            raise StageError(f"cannot use local path: {exc}", "invalid_input") from None
        return path

    def _check_size(self, path: Path) -> None:
        cap = self.config.max_filesize_mb
        size = path.stat().st_size
        if cap is not None and size > cap * 1024 * 1024:
            raise StageError(f"file is {size / 2**20:.1f} MiB, over max_filesize_mb={cap}", "too_large")

    def _fetch_with_retries(self, url: str, video_id: str) -> tuple[Path, str | None]:
        target_dir = self.staging.root / "videos"
        target_dir.mkdir(parents=True, exist_ok=True)
        done = target_dir / f"{video_id}.done"
        if done.exists() and not self.staging.remote:  # resume: downloaded by an earlier run
            name, _, title = done.read_text().partition("\n")
            cached = target_dir / name
            if cached.is_file():
                log.info("download %s: reusing %s", video_id, cached)
                return cached, title or None
        cfg = self.config
        with self._lock:  # start-up and warm-up are not charged to the deadline
            if self._worker is None or not self._worker.alive():
                self._worker = _Worker(cfg, target_dir)
            if not self._generic(url):
                self._worker.warm()
        limit = cfg.max_download_seconds
        deadline = None if limit is None else time.monotonic() + limit  # per input, retries included
        delay = cfg.backoff_seconds
        for attempt in range(cfg.retries + 1):
            if cfg.sleep_seconds:
                self._sleep(cfg.sleep_seconds, deadline, "sleep_seconds")
            try:
                path, title = self._fetch(url, video_id, target_dir, deadline)
                done.write_text(f"{path.name}\n{title or ''}")
                return path, title
            except StageError as exc:
                if not exc.transient or attempt == cfg.retries:
                    raise
                wait = delay
                hinted = getattr(exc, "retry_after", None)
                if hinted is not None:
                    if hinted > cfg.max_retry_wait_seconds:
                        raise StageError(f"{exc} (Retry-After {hinted:.0f}s is over download.max_retry_wait_seconds)",
                                         exc.error_type) from None
                    wait = max(wait, hinted)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    raise StageError(f"{exc} (no time left for a retry in {wait:.1f}s before max_download_seconds)",
                                     exc.error_type) from None
                log.info("download %s: %s (attempt %d), retrying in %.1fs", redact_text(url), exc.error_type, attempt + 1, wait)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def _generic(url: str) -> bool:
        """A direct link to a media file or manifest needs no site extractor: skip matching ~1,800
        of them (about 1 s of regex compilation in each new worker process)."""
        return Path(urlparse(url).path).suffix.lower() in MEDIA_SUFFIXES | {".m3u8", ".mpd"}

    @staticmethod
    def _sleep(seconds: float, deadline: float | None, what: str) -> None:
        if deadline is not None and time.monotonic() + seconds >= deadline:
            raise StageError(f"{CAP_MARK}: {what} would pass max_download_seconds", "timeout")
        time.sleep(seconds)

    def _fetch(self, url: str, video_id: str, target_dir: Path, deadline: float | None) -> tuple[Path, str | None]:
        generic = self._generic(url)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise StageError(f"{CAP_MARK}: no time left (max_download_seconds)", "timeout")
        req = {"url": url, "video_id": video_id, "target_dir": str(target_dir), "seconds_left": left, "generic": generic}
        try:
            with self._lock:
                if self._worker is None or not self._worker.alive():  # killed at an earlier deadline
                    self._worker = _Worker(self.config, target_dir)
                answer = self._worker.request(req, None if left is None else left + KILL_GRACE_SECONDS)
                if answer is None:
                    self._worker = None  # killed: the next input gets a fresh child
        finally:
            for part in target_dir.glob(f"{video_id}.*.part"):
                part.unlink(missing_ok=True)
        if answer is None or not answer.get("ok"):  # partial files, fragments, .ytdl state
            for partial in target_dir.glob(f"{video_id}.*"):
                if partial.suffix != ".done":
                    partial.unlink(missing_ok=True)
        if answer is None:
            raise StageError(f"{CAP_MARK}: still downloading at max_download_seconds={self.config.max_download_seconds}; "
                             "the download was killed", "timeout")
        if not answer.get("ok"):
            raise _error_from_answer(answer)
        files = [Path(f) for f in answer.get("files") or []]
        files = [f for f in files if f.is_file() and f.resolve().parent == target_dir.resolve()]
        if not files:
            notes = "; ".join(answer.get("notes") or [])
            if "max-filesize" in notes:
                raise StageError(notes, "too_large")
            if "does not pass filter" in notes:
                raise StageError(notes, "too_long")
            raise StageError(notes or "yt-dlp produced no file", "download_failed")
        title = answer.get("title")
        return files[0], str(title) if title else None

"""Download: fetch each input into the staging area with yt-dlp (local paths used in place).

Every failure gets a typed ``error_type``: ``not_found``, ``forbidden``, ``rate_limited``,
``timeout``, ``unreachable``, ``server_error``, ``not_a_video``, ``empty_file``,
``corrupt_media``, ``too_large``, ``too_long``, ``local_paths_disabled`` or ``download_failed``.
Transient failures (rate limits, timeouts, 5xx) are retried with exponential backoff.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.config import DownloadConfig
from pipeline.errors import StageError
from pipeline import storage
from pipeline.security import BLOCKED_MARK, address_guard, check_host, redact_text
from pipeline.stage import Resources, Row, Stage, StageContext, per_row
from pipeline.storage import StagingArea
from stages._media import probe

log = logging.getLogger(__name__)

MEDIA_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg", ".m4a", ".mp3", ".wav", ".flac", ".ogg", ".opus"}
)
OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hdfs")
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
CAP_MARK = "download cap"


class _CapExceeded(Exception):
    """Raised from yt-dlp's progress hook when a download passes a size or time cap."""


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
        if code >= 500:
            return StageError(message, "server_error", transient=True)
        return StageError(message, "download_failed")
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return StageError(message, "timeout", transient=True)
    if "unsupported url" in low or "no video formats" in low or "requested format is not available" in low:
        return StageError(message, "not_a_video")
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


class _YtdlpLogger:
    """Route yt-dlp's output into logging and remember its last error and skip notes."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def debug(self, msg: str) -> None:
        if not msg.startswith("[debug] "):
            self.info(msg)

    def info(self, msg: str) -> None:
        msg = redact_text(msg)
        log.debug("yt-dlp: %s", msg)
        if "max-filesize" in msg or "does not pass filter" in msg:
            self.notes.append(msg)

    def warning(self, msg: str) -> None:
        msg = redact_text(msg)
        log.debug("yt-dlp warning: %s", msg)
        self.notes.append(msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp error: %s", redact_text(msg))


class DownloadStage(Stage[DownloadConfig]):
    """Fetch URLs with yt-dlp into ``STAGING/videos``; local files are checked and used in place."""

    name = "download"
    reads = ("video_id", "source_url")
    writes = ("local_path", "title", "video_duration")

    def __init__(self, config: DownloadConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self._client: tuple[Any, _YtdlpLogger] | None = None  # (YoutubeDL, its logger), per process
        self._started = 0.0  # when the current download began (max_download_seconds)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # sockets and locks: each process builds its own

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
        self._ydl()

    def teardown(self) -> None:
        if self._client is not None:
            self._client[0].close()
            self._client = None

    # ------------------------------------------------------------------ one input

    def _one(self, row: Row) -> dict[str, Any]:
        url: str = row.get("fetch_url") or row["source_url"]
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ftp"):
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
        return {"local_path": local_path, "title": title, "video_duration": duration}

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
        info = probe(path)
        cap = self.config.max_duration_seconds
        if cap is not None and info.duration > cap:
            raise StageError(f"duration {info.duration:.0f}s exceeds max_duration_seconds={cap:.0f}", "too_long")
        max_h = self.config.max_source_height
        if max_h is not None and info.height is not None and info.height > max_h:
            raise StageError(f"video is {info.height}px tall, over max_source_height={max_h}", "too_large")
        return info.duration

    def preflight(self, url: str) -> None:
        """The checks a download makes before fetching anything (used by ``--dry-run``)."""
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ftp"):
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
            raise StageError(f"unsupported URL scheme {parsed.scheme!r}", "unsupported_url")
        else:
            if not self.config.allow_local_paths:
                raise StageError("local paths are refused (download.allow_local_paths=false)", "local_paths_disabled")
            path = Path(url).expanduser()
        path = path.resolve()
        roots = self.config.local_path_roots
        if roots is not None and not any(path.is_relative_to(Path(r).resolve()) for r in roots):
            raise StageError(f"{path} is outside download.local_path_roots", "path_refused")
        if not path.is_file():
            raise StageError(f"no such file: {path}", "not_found")
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
        delay = self.config.backoff_seconds
        for attempt in range(self.config.retries + 1):
            if self.config.sleep_seconds:
                time.sleep(self.config.sleep_seconds)
            try:
                path, title = self._fetch(url, video_id, target_dir)
                done.write_text(f"{path.name}\n{title or ''}")
                return path, title
            except StageError as exc:
                if not exc.transient or attempt == self.config.retries:
                    raise
                log.info("download %s: %s (attempt %d), retrying in %.1fs", url, exc.error_type, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _ytdlp_options(self, target_dir: Path, logger: _YtdlpLogger) -> dict[str, Any]:
        from yt_dlp.utils import parse_bytes

        cfg = self.config
        height = cfg.max_height
        fmt = cfg.format or (
            f"bv*[height<={height}]+ba/b[height<={height}]/bv*+ba/b" if height else "bv*+ba/b"
        )
        opts: dict[str, Any] = {
            # the file is named by the row's video_id, passed per call as extra info
            "outtmpl": str(target_dir / "%(avforge_id)s.%(ext)s"),
            "format": fmt,
            "merge_output_format": "mp4",
            "noplaylist": True,
            "quiet": True,
            "no_warnings": False,
            "noprogress": True,
            "logger": logger,
            "socket_timeout": cfg.timeout_seconds,
            "retries": 0,  # retries are ours, with backoff and typed reasons
            "fragment_retries": 2,
            "overwrites": True,
            "continuedl": False,
            "cachedir": False,
        }
        if cfg.max_filesize_mb is not None:
            opts["max_filesize"] = int(cfg.max_filesize_mb * 1024 * 1024)
        if cfg.rate_limit:
            opts["ratelimit"] = parse_bytes(cfg.rate_limit)
        if cfg.proxy:
            opts["proxy"] = cfg.proxy.get_secret_value()
        if cfg.cookies_file:
            opts["cookiefile"] = str(cfg.cookies_file)
        if cfg.max_duration_seconds is not None:
            cap = cfg.max_duration_seconds

            def _duration_filter(info: dict[str, Any], *, incomplete: bool = False) -> str | None:
                d = info.get("duration")
                return f"duration {d}s exceeds {cap}s" if d and d > cap else None

            opts["match_filter"] = _duration_filter
        opts["progress_hooks"] = [self._cap_hook]
        return opts

    def _ydl(self) -> tuple[Any, _YtdlpLogger]:
        """This stage's YoutubeDL, built once per process: building one costs ~45 ms of CPU
        (option parsing, ~1,800 extractor entries, a TLS context), as much as a small download.
        Rows are fetched one at a time; per-call state (log notes, cap clock) is reset per call."""
        if self._client is None:
            import yt_dlp

            logger = _YtdlpLogger()
            ydl = yt_dlp.YoutubeDL(self._ytdlp_options(self.staging.root / "videos", logger))
            self._client = (ydl, logger)
        return self._client

    def _cap_hook(self, status: dict[str, Any]) -> None:
        """Abort endless or oversized streams (no Content-Length) and downloads that take too long."""
        cfg = self.config
        got = status.get("downloaded_bytes") or 0
        if cfg.max_filesize_mb is not None and got > cfg.max_filesize_mb * 1024 * 1024:
            raise _CapExceeded(f"{CAP_MARK}: {got} bytes received, over max_filesize_mb")
        limit = cfg.max_download_seconds
        if limit is not None and time.monotonic() - self._started > limit:
            raise _CapExceeded(f"{CAP_MARK}: still downloading after max_download_seconds={limit}")

    def _fetch(self, url: str, video_id: str, target_dir: Path) -> tuple[Path, str | None]:
        import yt_dlp

        ydl, logger = self._ydl()
        logger.notes.clear()
        self._started = time.monotonic()
        cfg = self.config
        # A direct link to a media file needs no site extractor: skip matching ~1800 of them
        # (about 1 s of regex compilation in each new worker process).
        generic = Path(urlparse(url).path).suffix.lower() in MEDIA_SUFFIXES
        try:
            with address_guard(cfg.allow_private_addresses, cfg.allowed_hosts):
                info = ydl.extract_info(
                    url, download=True, force_generic_extractor=generic, extra_info={"avforge_id": video_id}
                )
        except yt_dlp.utils.DownloadError as exc:
            raise classify_download_error(str(exc)) from None
        except (OSError, _CapExceeded) as exc:
            raise classify_download_error(f"{type(exc).__name__}: {exc}") from None
        finally:
            for part in target_dir.glob(f"{video_id}.*.part"):
                part.unlink(missing_ok=True)
        if info is None:
            raise StageError("; ".join(logger.notes) or "yt-dlp returned nothing", "download_failed")
        if info.get("_type") == "playlist":
            raise StageError("URL is a playlist; give one URL per video", "not_a_video")
        downloads = info.get("requested_downloads") or []
        files = [Path(d["filepath"]) for d in downloads if d.get("filepath")]
        files = [f for f in files if f.is_file() and f.resolve().parent == target_dir.resolve()]
        if not files:
            notes = "; ".join(logger.notes)
            if "max-filesize" in notes:
                raise StageError(notes, "too_large")
            if "does not pass filter" in notes:
                raise StageError(notes, "too_long")
            raise StageError(notes or "yt-dlp produced no file", "download_failed")
        title = info.get("title")
        return files[0], str(title) if title else None

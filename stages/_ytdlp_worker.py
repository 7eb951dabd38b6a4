"""The yt-dlp child process of the download stage.

Why a child process: a download must end by its deadline whatever the library does. A read
timeout never fires on a server that trickles one byte every few seconds, and an extractor's
regular expression on a hostile page can spin in C code where no Python timer reaches it. The
stage (stages/download.py) sends one request a line on the child's stdin and waits for the
answer line with a deadline; past it, it kills the child's whole process group and starts a
fresh child for the next input. Inside the child, an interval timer raises :class:`Deadline`
a little before that, so a typed ``timeout`` usually comes back without a kill.

What the child refuses (every byte must come through a connection the address guard checked):

* yt-dlp's external downloaders (ffmpeg, aria2c, curl, wget, axel, httpie) and rtmpdump: they
  open their own connections, outside this process's name-resolution guard. yt-dlp hands
  live HLS/DASH, SAMPLE-AES / DRM-less "unsupported" HLS and rtmp streams to them; here that
  raises :class:`Refused` (``protocol_refused``) unless ``allow_external_downloaders``.
  ``FFmpegFD.available()`` answers False, so AES-128 HLS is decrypted natively (key and
  segments fetched through the guard) instead of being handed to ffmpeg;
* ffmpeg post-processing (merge, fixups) gets ``-protocol_whitelist file,pipe`` on every input:
  a downloaded "video" that is really a playlist cannot make ffmpeg fetch anything;
* the curl_cffi request handler (libcurl resolves names in C, outside the guard);
* playlists and multi-video pages are decided *before* any entry is fetched (``process=False``
  first, then ``url`` results resolved one hop at a time), so a refused page of 200 videos
  costs the page itself.

Protocol: one JSON object per line each way. First ``{"config", "target_dir"}``, answered with
``{"ready": true}`` once yt-dlp is imported; ``{"warm": true}`` (sent once, before the first URL
that is not a direct media link) compiles the ~1,800 extractor patterns. Neither is charged to
any input's deadline. Then per input a request: ``{"url", "video_id", "target_dir",
"seconds_left", "generic"}``; answer: ``{"ok": true, "files": [...], "title": ...}`` or
``{"ok": false, "kind": ..., "message": ..., "retry_after": ...}``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import DownloadConfig
from pipeline.security import BLOCKED_MARK, address_guard, redact_text

log = logging.getLogger(__name__)

CAP_MARK = "download cap"
REFUSED_MARK = "refused"
MAX_URL_HOPS = 5  # url / url_transparent results followed before giving up


class Deadline(BaseException):
    """The per-input wall-clock deadline passed (a BaseException: no library retry loop swallows it)."""


class CapExceeded(Exception):
    """Raised from the progress hook when a download passes the size cap."""


class Refused(Exception):
    """A download yt-dlp would hand to a program outside the address guard, or a playlist."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class YtdlpLogger:
    """Route yt-dlp's output into logging and remember its warnings and skip notes."""

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


# ----------------------------------------------------------------------------- hardening yt-dlp


def harden_ytdlp(allow_external: bool) -> None:
    """Patch yt-dlp's classes in this (dedicated) process; see the module docstring."""
    from yt_dlp.downloader import external, rtmp
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor

    if getattr(harden_ytdlp, "done", None) == allow_external:
        return
    if not allow_external:

        def refuse(self: Any, filename: str, info_dict: dict[str, Any]) -> bool:
            proto = info_dict.get("protocol") or "?"
            live = " live" if info_dict.get("is_live") else ""
            raise Refused(
                f"{REFUSED_MARK}: yt-dlp would hand this{live} {proto} stream to {self.get_basename()}, which "
                "connects outside the address guard (download.allow_external_downloaders=false)",
                "protocol_refused",
            )

        external.ExternalFD.real_download = refuse  # ffmpeg, aria2c, curl, wget, axel, httpie
        rtmp.RtmpFD.real_download = refuse
        external.FFmpegFD.available = classmethod(lambda cls, path=None: False)  # native AES-128 HLS

    original = getattr(FFmpegPostProcessor, "_avforge_original_run", FFmpegPostProcessor.real_run_ffmpeg)

    def local_only(self: Any, input_path_opts: Any, output_path_opts: Any, **kwargs: Any) -> Any:
        inputs = [(path, ["-protocol_whitelist", "file,pipe", *(opts or [])]) for path, opts in input_path_opts]
        return original(self, inputs, output_path_opts, **kwargs)

    FFmpegPostProcessor._avforge_original_run = original  # type: ignore[attr-defined]
    FFmpegPostProcessor.real_run_ffmpeg = local_only
    harden_ytdlp.done = allow_external  # type: ignore[attr-defined]


def ytdlp_options(cfg: DownloadConfig, target_dir: Path, logger: YtdlpLogger, hook: Any) -> dict[str, Any]:
    from yt_dlp.utils import parse_bytes

    height = cfg.max_height
    fmt = cfg.format or (f"bv*[height<={height}]+ba/b[height<={height}]/bv*+ba/b" if height else "bv*+ba/b")
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
        "retries": 0,  # retries are the stage's, with backoff, Retry-After and typed reasons
        "extractor_retries": 0,
        "fragment_retries": 2,
        # a fragment that cannot be fetched (refused address, 404) fails the input: skipping it
        # would ship a video with holes
        "skip_unavailable_fragments": False,
        "overwrites": True,
        "continuedl": False,
        "cachedir": False,
        "enable_file_urls": False,  # a page or redirect must never read local files
        "playlist_items": "1:2",  # never more than two entries looked at (one is taken, two is refused)
        "lazy_playlist": True,
    }
    if not cfg.allow_external_downloaders:
        opts["external_downloader"] = {"default": "native"}
        opts["hls_prefer_native"] = True
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
            return f"duration {d}s exceeds {cap}s" if isinstance(d, (int, float)) and d > cap else None

        opts["match_filter"] = _duration_filter
    opts["progress_hooks"] = [hook]
    return opts


# ----------------------------------------------------------------------------- one download


def _entries_head(entries: Any, n: int = 2) -> list[Any]:
    """The first ``n`` entries of a playlist result without resolving the rest (lists, lazy
    lists, paged lists, generators)."""
    if entries is None:
        return []
    if isinstance(entries, (list, tuple)):
        return list(entries[:n])
    getslice = getattr(entries, "getslice", None)
    if callable(getslice):
        return list(getslice(0, n))
    return list(itertools.islice(iter(entries), n))


def _retry_after(exc: BaseException | None) -> str | None:
    """The Retry-After header of the HTTP error behind ``exc`` (yt-dlp wraps it), if any."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        headers = getattr(response, "headers", None)
        if headers is not None and getattr(cur, "status", None) in (429, 503):
            value = headers.get("Retry-After")
            if value:
                return str(value)
        info = getattr(cur, "exc_info", None)
        if isinstance(info, tuple) and len(info) > 1:
            stack.append(info[1])
        stack.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])
    return None


class Downloader:
    """One YoutubeDL for this process (building one costs ~45 ms of CPU: option parsing, ~1,800
    extractor entries, a TLS context); per-call state is reset per call."""

    def __init__(self, cfg: DownloadConfig, target_dir: Path) -> None:
        import yt_dlp

        harden_ytdlp(cfg.allow_external_downloaders)
        self.cfg = cfg
        self.target_dir = target_dir
        self.logger = YtdlpLogger()
        self.ydl = yt_dlp.YoutubeDL(ytdlp_options(cfg, target_dir, self.logger, self._hook))
        self._cap_whole_reads(int(cfg.max_page_mb * 2**20))
        director = getattr(self.ydl, "_request_director", None)
        handlers = getattr(director, "handlers", None)
        if isinstance(handlers, dict):
            handlers.pop("CurlCFFI", None)  # libcurl resolves names outside the guard

    def _cap_whole_reads(self, cap: int) -> None:
        """Every response body read whole (web pages, HLS/DASH manifests, keys) stops at ``cap``
        bytes: an endless or huge page must not fill memory. Media is read in blocks and capped
        by max_filesize_mb instead."""
        urlopen = self.ydl.urlopen
        limit_mb = self.cfg.max_page_mb

        def capped_urlopen(req: Any) -> Any:
            resp = urlopen(req)
            raw_read = resp.read

            def read(amt: int | None = None) -> bytes:
                if amt is not None and amt >= 0:
                    return raw_read(amt)
                chunks: list[bytes] = []
                total = 0
                while True:
                    chunk = raw_read(min(1 << 20, cap + 1 - total))
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > cap:
                        resp.close()
                        raise Refused(f"{CAP_MARK}: a page or manifest over download.max_page_mb={limit_mb:g}",
                                      "too_large")

            resp.read = read
            return resp

        self.ydl.urlopen = capped_urlopen

    def _hook(self, status: dict[str, Any]) -> None:
        """Abort endless or oversized streams (no Content-Length)."""
        cap = self.cfg.max_filesize_mb
        got = status.get("downloaded_bytes") or 0
        if cap is not None and got > cap * 1024 * 1024:
            raise CapExceeded(f"{CAP_MARK}: {got} bytes received, over max_filesize_mb")

    def _resolve(self, url: str, generic: bool) -> dict[str, Any]:
        """Extract without downloading and without processing entries; follow ``url`` results one
        hop at a time; refuse playlists of more than one entry before any entry is fetched."""
        ie: dict[str, Any] | None = self.ydl.extract_info(url, download=False, process=False, force_generic_extractor=generic)
        for _ in range(MAX_URL_HOPS):
            if ie is None:
                raise Refused("yt-dlp returned nothing", "download_failed")
            kind = ie.get("_type", "video")
            if kind in ("playlist", "multi_video"):
                head = _entries_head(ie.get("entries"))
                if len(head) != 1:
                    what = "several videos" if head else "no videos"
                    raise Refused(f"{REFUSED_MARK}: the URL is a playlist or a page of {what}; give one URL per video",
                                  "playlist_refused")
                ie = head[0]
                continue
            if kind in ("url", "url_transparent"):
                outer = {k: v for k, v in ie.items() if v is not None and k not in ("_type", "url", "ie_key", "id")}
                inner = self.ydl.extract_info(ie["url"], download=False, process=False, ie_key=ie.get("ie_key"))
                if inner is None:
                    ie = None
                    continue
                ie = {**inner, **outer} if kind == "url_transparent" else inner
                continue
            return ie
        raise Refused(f"more than {MAX_URL_HOPS} redirections between extractors", "download_failed")

    def download(self, url: str, video_id: str, generic: bool) -> dict[str, Any]:
        self.logger.notes.clear()
        try:
            ie = self._resolve(url, generic)
            info = self.ydl.process_ie_result(ie, download=True, extra_info={"avforge_id": video_id})
        finally:
            for part in self.target_dir.glob(f"{video_id}.*.part"):
                part.unlink(missing_ok=True)
        if info is None:
            return {"ok": False, "kind": "notes", "message": "; ".join(self.logger.notes) or "yt-dlp returned nothing"}
        if info.get("_type") in ("playlist", "multi_video"):
            return {"ok": False, "kind": "playlist_refused", "message": "the URL is a playlist; give one URL per video"}
        files = [str(d["filepath"]) for d in info.get("requested_downloads") or [] if d.get("filepath")]
        title = info.get("title")
        return {"ok": True, "files": files, "title": str(title) if title else None, "notes": self.logger.notes[-5:]}


def _answer_error(exc: BaseException) -> dict[str, Any]:
    import yt_dlp
    from yt_dlp.networking.exceptions import NoSupportingHandlers, UnsupportedRequest

    message = redact_text(f"{exc}" or type(exc).__name__)
    cause = exc.exc_info[1] if isinstance(exc, yt_dlp.utils.DownloadError) and exc.exc_info else exc
    chain = [exc, cause, getattr(cause, "cause", None), getattr(cause, "__cause__", None)]
    unexpected = [str(e) for c in chain if isinstance(c, NoSupportingHandlers) for e in c.unexpected_errors]
    if isinstance(exc, Deadline):
        kind = "deadline"
    elif BLOCKED_MARK in message or any(BLOCKED_MARK in e for e in unexpected):
        kind = "blocked_address"
    elif any(isinstance(c, Refused) for c in chain):
        kind = next(c.kind for c in chain if isinstance(c, Refused))
    elif any(isinstance(c, (NoSupportingHandlers, UnsupportedRequest)) for c in chain):
        kind = "unsupported_scheme"
    elif any(isinstance(c, (CapExceeded, MemoryError)) for c in chain):
        kind = "too_large"
        if any(isinstance(c, MemoryError) for c in chain):
            message = f"the download worker ran out of its memory (download.worker_memory_mb): {message}"
    else:
        kind = "message"  # the stage classifies the message (HTTP status, ...)
    if kind == "message" and not isinstance(exc, yt_dlp.utils.YoutubeDLError):
        message = f"{type(exc).__name__}: {message}"
    return {"ok": False, "kind": kind, "message": message[:4000], "retry_after": _retry_after(exc)}


def _on_alarm(signum: int, frame: Any) -> None:
    raise Deadline(f"{CAP_MARK}: still downloading at the deadline (download.max_download_seconds)")


def warm_up() -> None:
    """Compile every extractor's URL pattern now (about a second of CPU, once per child, only if a
    URL needs the site extractors), so that no input's deadline pays for it."""
    from yt_dlp.extractor import gen_extractor_classes

    for ie in gen_extractor_classes():
        try:
            ie.suitable("https://example.invalid/warm-up")
        except Exception:  # noqa: BLE001 - an extractor's own check; irrelevant here
            continue


def serve(stdin: Any, stdout: Any) -> None:
    """The child's loop: the first line is the config (answered with ``{"ready": ...}`` once yt-dlp
    is loaded and warm), then one answer per request."""
    first = stdin.readline()
    if not first:
        return
    setup = json.loads(first)
    downloaders: dict[str, Downloader] = {}
    try:
        started = time.monotonic()
        cfg = DownloadConfig.model_validate(setup["config"])
        if cfg.worker_memory_mb is not None:  # a backstop: whatever a page or stream does, not the host's memory
            limit = int(cfg.worker_memory_mb) * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        target = str(setup.get("target_dir") or "")
        if target:
            downloaders[target] = Downloader(cfg, Path(target))
        ready: dict[str, Any] = {"ready": True, "seconds": round(time.monotonic() - started, 3)}
    except Exception as exc:  # noqa: BLE001 - reported to the stage, which fails the input with it
        ready = {"ready": False, "message": redact_text(f"{type(exc).__name__}: {exc}")[:2000]}
    stdout.write(json.dumps(ready) + "\n")
    stdout.flush()
    if not ready["ready"]:
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    warmed = False
    for line in stdin:
        req = json.loads(line)
        answer: dict[str, Any]
        if req.get("warm"):  # before a site URL's deadline starts: compile the extractor patterns once
            if not warmed:
                warm_up()
                warmed = True
            stdout.write(json.dumps({"ok": True, "warmed": True}) + "\n")
            stdout.flush()
            continue
        seconds_left = req.get("seconds_left")
        try:
            if seconds_left is not None:
                signal.setitimer(signal.ITIMER_REAL, max(0.01, float(seconds_left)))
            try:
                target = str(req["target_dir"])
                dl = downloaders.get(target)
                if dl is None:
                    dl = downloaders[target] = Downloader(cfg, Path(target))
                with address_guard(cfg.allow_private_addresses, cfg.allowed_hosts):
                    answer = dl.download(req["url"], req["video_id"], bool(req.get("generic")))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:  # noqa: BLE001 - every failure is an answer, never a dead child
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            answer = _answer_error(exc)
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


def main() -> None:
    # the protocol owns the original stdout; anything else printed goes to stderr
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    level = os.environ.get("AVFORGE_WORKER_LOG", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s download-worker %(levelname)s %(message)s")
    serve(sys.stdin, proto)


if __name__ == "__main__":
    main()

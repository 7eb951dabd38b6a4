"""Hostile servers against the download stage, on loopback addresses.

The "refused" server runs on 127.0.0.1, which is never allowed here; the "allowed" server runs on
127.0.0.2, allowed through ``download.allowed_hosts``. Every test that points something at the
refused server asserts that it received no request at all: every byte must come through a
connection the address guard checked, including HLS keys and segments fetched by yt-dlp's
downloaders and anything ffmpeg would fetch on its own.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from pipeline.config import DownloadConfig
from pipeline.errors import StageError
from pipeline.tools.serve import Route, serve_directory
from pipeline.stage import StageContext
from stages.download import DownloadStage, parse_retry_after

ALLOWED = "127.0.0.2"


def _row(url: str, vid: str = "v1") -> dict:
    return {"video_id": vid, "source_url": url, "input_index": 0}


def _stage(tmp_path: Path, **cfg: object) -> DownloadStage:
    base: dict[str, object] = {"retries": 0, "timeout_seconds": 5.0, "allowed_hosts": [ALLOWED]}
    return DownloadStage(DownloadConfig(**{**base, **cfg}), StageContext(str(tmp_path / "staging")))


def _one(stage: DownloadStage, url: str, vid: str = "v1") -> object:
    try:
        (res,) = stage.process_batch([_row(url, vid)])
    finally:
        stage.teardown()
    return res


def _err(res: object) -> StageError:
    assert isinstance(res, StageError), res
    return res


@pytest.fixture(scope="module")
def hls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 1 s MPEG-TS segments (e0..e2.ts) and the same three encrypted with AES-128 (c0..c2.ts, key k.key)."""
    root = tmp_path_factory.mktemp("hls")
    src = ["-f", "lavfi", "-i", "testsrc=duration=3:size=160x120:rate=10", "-f", "lavfi", "-i", "sine=duration=3"]
    enc = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-c:a", "aac", "-shortest", "-f", "hls",
           "-hls_time", "1", "-hls_list_size", "0"]
    ff = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
    subprocess.run([*ff, *src, *enc, "-hls_segment_filename", str(root / "e%d.ts"), str(root / "plain.m3u8")], check=True)
    (root / "k.key").write_bytes(bytes(range(16)))
    (root / "ki.txt").write_text(f"KEYURI\n{root / 'k.key'}\n")
    subprocess.run([*ff, *src, *enc, "-hls_key_info_file", str(root / "ki.txt"), "-hls_segment_filename",
                    str(root / "c%d.ts"), str(root / "enc.m3u8")], check=True)
    return root


@pytest.fixture(scope="module")
def dash_mpd(hls_dir: Path) -> str:
    """A static two-stream DASH presentation (video + audio, 1 s segments) in ``hls_dir``; its MPD text."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=duration=3:size=160x120:rate=10",
         "-f", "lavfi", "-i", "sine=duration=3", "-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-c:a", "aac",
         "-shortest", "-f", "dash", "-seg_duration", "1", "-use_template", "1", "-use_timeline", "0",
         "-init_seg_name", "init-$RepresentationID$.m4s", "-media_seg_name", "chunk-$RepresentationID$-$Number%05d$.m4s",
         str(hls_dir / "d.mpd")],
        check=True,
    )
    return (hls_dir / "d.mpd").read_text()


@pytest.fixture()
def refused(hls_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 (never allowed here) and the list of paths it was asked for."""
    log: list[str] = []
    with serve_directory(hls_dir, requests=log, host="127.0.0.1") as base:
        yield base, log


def _playlist(segments: list[str], *, key: str | None = None, method: str = "AES-128", endlist: bool = True,
              sequence: int = 0) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1", f"#EXT-X-MEDIA-SEQUENCE:{sequence}"]
    if key is not None:
        lines.append(f'#EXT-X-KEY:METHOD={method},URI="{key}",IV=0x00000000000000000000000000000000')
    for seg in segments:
        lines += ["#EXTINF:1.0,", seg]
    if endlist:
        lines.append("#EXT-X-ENDLIST")
    return ("\n".join(lines) + "\n").encode()


def _m3u8(body: bytes) -> Route:
    return Route(200, body, {"Content-Type": "application/vnd.apple.mpegurl"})


# ----------------------------------------------------------------------------- HLS and the address guard


def test_native_hls_with_aes128_works_on_an_allowed_host(hls_dir: Path, tmp_path: Path) -> None:
    """The control: a VOD playlist, its AES-128 key and segments all on the allowed host download
    natively (key and segments through the guard) into a playable file."""
    log: list[str] = []
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED, requests=log) as base:
        routes["/vod.m3u8"] = _m3u8(_playlist([f"{base}/c{i}.ts" for i in range(3)], key=f"{base}/k.key"))
        res = _one(_stage(tmp_path), f"{base}/vod.m3u8")
    assert not isinstance(res, Exception), res
    assert res["video_duration"] > 2
    assert "/k.key" in log and "/c2.ts" in log


@pytest.mark.parametrize("what", ["segments", "key", "segment_redirect", "variant"])
def test_hls_parts_on_refused_addresses_fetch_nothing(hls_dir: Path, tmp_path: Path, refused: tuple[str, list[str]],
                                                      what: str) -> None:
    bad, bad_log = refused
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        if what == "segments":
            body = _playlist([f"{bad}/e{i}.ts" for i in range(3)])
        elif what == "key":
            body = _playlist([f"{base}/c{i}.ts" for i in range(3)], key=f"{bad}/k.key")
        elif what == "segment_redirect":
            routes["/hop0.ts"] = Route(302, b"", {"Location": f"{bad}/e0.ts"})
            body = _playlist([f"{base}/hop0.ts", f"{base}/e1.ts"])
        else:  # a master playlist whose variant lives on the refused host
            body = b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000,RESOLUTION=160x120\n" + f"{bad}/v.m3u8\n".encode()
            # (never served: the request must not happen)
        routes["/p.m3u8"] = _m3u8(body)
        res = _one(_stage(tmp_path), f"{base}/p.m3u8")
    err = _err(res)
    assert err.error_type in ("blocked_address", "not_a_video"), err
    assert bad_log == [], bad_log
    assert not list((tmp_path / "staging" / "videos").glob("v1.*[!e]"))  # nothing kept (only .done may never exist)


@pytest.mark.parametrize("case", ["live", "sample_aes", "live_sequence"])
def test_streams_yt_dlp_would_hand_to_ffmpeg_are_refused(hls_dir: Path, tmp_path: Path,
                                                        refused: tuple[str, list[str]], case: str) -> None:
    """A playlist that looks live, or uses SAMPLE-AES: yt-dlp delegates these to the ffmpeg binary,
    which connects on its own. Refused (protocol_refused), and nothing reaches the refused host."""
    bad, bad_log = refused
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        if case == "live":
            body = _playlist([f"{bad}/e{i}.ts" for i in range(3)], endlist=False)
        elif case == "sample_aes":
            body = _playlist([f"{bad}/c{i}.ts" for i in range(3)], key=f"{bad}/k.key", method="SAMPLE-AES")
        else:
            body = _playlist([f"{bad}/e{i}.ts" for i in range(3)], endlist=False, sequence=4711)
        routes["/p.m3u8"] = _m3u8(body)
        started = time.monotonic()
        res = _one(_stage(tmp_path, max_download_seconds=30), f"{base}/p.m3u8")
    err = _err(res)
    assert err.error_type == "protocol_refused", err
    assert "allow_external_downloaders" in str(err)
    assert bad_log == []
    assert time.monotonic() - started < 25


def _mpd(text: str, base: str | None = None, dynamic: bool = False) -> Route:
    if base is not None:
        text = text.replace("<Period ", f"<BaseURL>{base}/</BaseURL>\n\t<Period ", 1)
    if dynamic:
        text = text.replace('type="static"', 'type="dynamic" availabilityStartTime="2020-01-01T00:00:00Z"', 1)
    return Route(200, text.encode(), {"Content-Type": "application/dash+xml"})


def test_dash_on_an_allowed_host_downloads_and_merges(hls_dir: Path, dash_mpd: str, tmp_path: Path) -> None:
    """The control for DASH: native segment downloads, then ffmpeg merges video and audio from local files."""
    routes = {"/d1.mpd": _mpd(dash_mpd)}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path), f"{base}/d1.mpd")
    assert not isinstance(res, Exception), res
    assert res["video_duration"] > 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["segments_refused", "live"])
def test_dash_parts_on_refused_addresses_fetch_nothing(hls_dir: Path, dash_mpd: str, tmp_path: Path,
                                                       refused: tuple[str, list[str]], dynamic: bool) -> None:
    bad, bad_log = refused
    routes = {"/d2.mpd": _mpd(dash_mpd, base=bad, dynamic=dynamic)}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path, max_download_seconds=30), f"{base}/d2.mpd")
    err = _err(res)
    assert err.error_type in ("blocked_address", "protocol_refused", "not_a_video"), err
    assert bad_log == []


def test_hls_init_segment_on_a_refused_address(hls_dir: Path, tmp_path: Path, refused: tuple[str, list[str]]) -> None:
    bad, bad_log = refused
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        body = _playlist([f"{base}/e{i}.ts" for i in range(3)]).replace(
            b"#EXTINF", f'#EXT-X-MAP:URI="{bad}/init.mp4"\n#EXTINF'.encode(), 1)
        routes["/m.m3u8"] = _m3u8(body)
        res = _one(_stage(tmp_path), f"{base}/m.m3u8")
    assert _err(res).error_type in ("blocked_address", "protocol_refused"), res
    assert bad_log == []


@pytest.mark.parametrize("key", ["file:///etc/passwd", "skd://fairplay-key"])
def test_hls_keys_that_are_not_fetched(hls_dir: Path, tmp_path: Path, key: str) -> None:
    """A key on the local disk (file://) or a DRM key URI: never read, a documented type."""
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        routes["/k.m3u8"] = _m3u8(_playlist([f"{base}/c{i}.ts" for i in range(3)], key=key))
        res = _one(_stage(tmp_path), f"{base}/k.m3u8")
    err = _err(res)
    assert err.error_type in ("unsupported_scheme", "protocol_refused"), err
    assert "root:" not in str(err)


def test_a_downloaded_manifest_is_not_media(hls_dir: Path, tmp_path: Path, refused: tuple[str, list[str]]) -> None:
    """A "video.mp4" that is really an HLS playlist: ffmpeg/PyAV would follow its URLs."""
    bad, bad_log = refused
    routes = {"/video.mp4": Route(200, _playlist([f"{bad}/e0.ts"]), {"Content-Type": "video/mp4"})}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path), f"{base}/video.mp4")
    err = _err(res)
    assert err.error_type == "not_a_video" and "manifest" in str(err)
    assert bad_log == []


def test_media_url_and_redirects_to_refused_addresses(hls_dir: Path, tmp_path: Path, refused: tuple[str, list[str]]) -> None:
    bad, bad_log = refused
    routes = {
        "/hop.ts": Route(302, b"", {"Location": f"{bad}/e0.ts"}),
        "/hop2.ts": Route(301, b"", {"Location": f"http://{ALLOWED}:1/x"}),  # allowed but closed: not blocked
        "/ipv6.ts": Route(302, b"", {"Location": "http://[::1]:80/e0.ts"}),
        "/meta.ts": Route(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}),
        "/mapped.ts": Route(302, b"", {"Location": "http://[::ffff:127.0.0.1]/e0.ts"}),
        "/decimal.ts": Route(302, b"", {"Location": "http://2130706433/e0.ts"}),
    }
    stage = _stage(tmp_path)
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        rows = [_row(f"{bad}/e0.ts", "direct")] + [_row(f"{base}/{n}.ts", n) for n in ("hop", "ipv6", "meta", "mapped", "decimal")]
        results = stage.process_batch(rows)
    stage.teardown()
    for row, res in zip(rows, results, strict=True):
        assert _err(res).error_type == "blocked_address", (row["video_id"], res)
    assert bad_log == []


def test_redirect_to_file_url_is_an_unsupported_scheme(hls_dir: Path, tmp_path: Path) -> None:
    routes = {"/f.mp4": Route(302, b"", {"Location": "file:///etc/passwd"})}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path), f"{base}/f.mp4")
    err = _err(res)
    assert err.error_type == "unsupported_scheme", err
    assert "root:" not in str(err)


def test_rtsp_link_in_a_page_is_a_documented_type(hls_dir: Path, tmp_path: Path) -> None:
    from pipeline.errors import ERROR_TYPES

    page = b'<html><body><video src="rtsp://127.0.0.1:554/cam"></video></body></html>'
    routes = {"/page.html": Route(200, page, {"Content-Type": "text/html"})}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path), f"{base}/page.html")
    err = _err(res)
    assert err.error_type in ERROR_TYPES
    assert err.error_type in ("unsupported_scheme", "protocol_refused", "not_a_video", "blocked_address"), err


# ----------------------------------------------------------------------------- amplification


def test_a_page_of_200_videos_costs_the_page_only(hls_dir: Path, tmp_path: Path) -> None:
    log: list[str] = []
    page = "<html><body>" + "".join(f'<video src="/v{i:03d}.mp4"></video>' for i in range(200)) + "</body></html>"
    routes = {"/list.html": Route(200, page.encode(), {"Content-Type": "text/html"})}
    with serve_directory(hls_dir, routes, host=ALLOWED, requests=log) as base:
        res = _one(_stage(tmp_path), f"{base}/list.html")
    err = _err(res)
    assert err.error_type == "playlist_refused", err
    assert [p for p in log if p.startswith("/v")] == [], log
    assert len(log) <= 2, log  # the page (and at most one retry of it)


@pytest.mark.parametrize("path", ["/endless.html", "/endless.m3u8"])
def test_an_endless_page_or_manifest_is_cut_at_max_page_mb(hls_dir: Path, tmp_path: Path, path: str) -> None:
    kind = "text/html" if path.endswith(".html") else "application/vnd.apple.mpegurl"
    head = b"<html><body>" if path.endswith(".html") else b"#EXTM3U\n"
    routes = {path: Route(200, head + b"#" * 65536, {"Content-Type": kind}, endless=True)}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        started = time.monotonic()
        res = _one(_stage(tmp_path, max_page_mb=2, max_download_seconds=60), base + path)
    err = _err(res)
    assert err.error_type == "too_large" and "max_page_mb" in str(err), err
    assert time.monotonic() - started < 40


def test_a_page_with_one_video_is_accepted(hls_dir: Path, tmp_path: Path) -> None:
    page = b'<html><body><video src="/e0.ts"></video></body></html>'
    routes = {"/one.html": Route(200, page, {"Content-Type": "text/html"})}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        res = _one(_stage(tmp_path), f"{base}/one.html")
    assert not isinstance(res, Exception), res


# ----------------------------------------------------------------------------- hard deadline


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("path", "length"), [("/slow.mp4", 10_000_000), ("/slow.mp4", -1), ("/slow.html", -1)],
                         ids=["with_length", "without_length", "trickling_page"])
def test_trickling_server_ends_at_the_deadline(hls_dir: Path, tmp_path: Path, path: str, length: int) -> None:
    """Headers, then one byte a second: a socket timeout never fires; the deadline does (also while
    yt-dlp is still reading a web page to extract from)."""
    kind = "text/html" if path.endswith(".html") else "video/mp4"
    routes = {path: Route(200, b"<html>" + b" " * 1000, {"Content-Type": kind}, trickle_seconds=1.0,
                          content_length=length)}
    deadline = 3.0
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        stage = _stage(tmp_path, max_download_seconds=deadline, retries=2)
        routes["/warm.html"] = Route(200, b'<html><video src="/e0.ts"></video></html>', {"Content-Type": "text/html"})
        (warm,) = stage.process_batch([_row(f"{base}/warm.html", "warm")])  # the child's start-up is not timed
        assert not isinstance(warm, Exception), warm
        started = time.monotonic()
        (res,) = stage.process_batch([_row(base + path)])
        took = time.monotonic() - started  # the child's exit at teardown is not part of the input's time
        stage.teardown()
    err = _err(res)
    assert err.error_type == "timeout", err
    assert took < deadline + 5, took  # deadline plus kill slack, whatever the library does
    assert not [p for p in (tmp_path / "staging" / "videos").glob("v1.*")]


@pytest.mark.timeout(120)
def test_deadline_kills_ffmpeg_when_external_downloaders_are_allowed(hls_dir: Path, tmp_path: Path) -> None:
    """An endless (live) playlist handed to ffmpeg, explicitly allowed: the deadline still ends it,
    and ffmpeg does not outlive it (the whole process group is stopped)."""
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        routes["/slow.ts"] = Route(200, b"\x47" * 2000, {"Content-Type": "video/mp2t"}, trickle_seconds=0.5)
        routes["/live.m3u8"] = _m3u8(_playlist([f"{base}/slow.ts"] * 50, endlist=False))
        stage = _stage(tmp_path, max_download_seconds=4, allow_external_downloaders=True)
        (warm,) = stage.process_batch([_row(f"{base}/e0.ts", "warm")])  # start-up is not timed
        assert not isinstance(warm, Exception), warm
        started = time.monotonic()
        (res,) = stage.process_batch([_row(f"{base}/live.m3u8")])
        took = time.monotonic() - started
        worker = stage._worker
        stage.teardown()
    err = _err(res)
    assert err.error_type in ("timeout", "download_failed", "not_a_video", "corrupt_media"), err
    assert took < 4 + 6, took
    if worker is not None:  # the child stopped itself; its ffmpeg must be gone too
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(worker.proc.pid, 0)


# ----------------------------------------------------------------------------- Retry-After


def test_parse_retry_after() -> None:
    now = time.time()
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    when = parse_retry_after(formatdate(now + 30, usegmt=True), now=now)
    assert when is not None and 28 <= when <= 31
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("-3") is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["seconds", "http_date"])
def test_retry_after_is_honoured(hls_dir: Path, tmp_path: Path, form: str) -> None:
    times: list[float] = []

    class Log(list):  # record when each request arrived
        def append(self, item: str) -> None:
            times.append(time.monotonic())
            super().append(item)

    value = "2" if form == "seconds" else formatdate(time.time() + 8, usegmt=True)  # the child starts first
    routes = {"/busy.mp4": Route(429, b"slow down", {"Retry-After": value})}
    with serve_directory(hls_dir, routes, host=ALLOWED, requests=Log()) as base:
        res = _one(_stage(tmp_path, retries=1, backoff_seconds=0.1), f"{base}/busy.mp4")
    assert _err(res).error_type == "rate_limited"
    assert len(times) == 2, times
    assert times[1] - times[0] >= 1.9, times


def test_retry_after_beyond_the_deadline_fails_at_once(hls_dir: Path, tmp_path: Path) -> None:
    routes = {"/busy.mp4": Route(429, b"slow down", {"Retry-After": "3600"})}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        started = time.monotonic()
        res = _one(_stage(tmp_path, retries=3, max_download_seconds=20), f"{base}/busy.mp4")
    assert _err(res).error_type == "rate_limited"
    assert time.monotonic() - started < 40  # child start-up included; waiting would take an hour


# ----------------------------------------------------------------------------- the same on the Ray backend


@pytest.mark.timeout(600)
def test_hostile_servers_on_the_ray_backend(hls_dir: Path, tmp_path: Path, refused: tuple[str, list[str]]) -> None:
    """A trickling server, an HLS key on a refused address and a page of 50 videos, through
    ``run_pipeline`` on Ray: typed errors, nothing fetched from the refused host, no hang."""
    import json

    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    bad, bad_log = refused
    routes: dict[str, Route] = {}
    with serve_directory(hls_dir, routes, host=ALLOWED) as base:
        routes["/slow.mp4"] = Route(200, b"\0" * 1000, {"Content-Type": "video/mp4"}, trickle_seconds=1.0)
        routes["/key.m3u8"] = _m3u8(_playlist([f"{base}/c{i}.ts" for i in range(3)], key=f"{bad}/k.key"))
        page = "".join(f'<video src="/v{i}.mp4"></video>' for i in range(50))
        routes["/list.html"] = Route(200, page.encode(), {"Content-Type": "text/html"})
        lines = [{"url": f"{base}/slow.mp4", "id": "slow"}, {"url": f"{base}/key.m3u8", "id": "key"},
                 {"url": f"{base}/list.html", "id": "list"}]
        inputs = tmp_path / "in.jsonl"
        inputs.write_text("".join(json.dumps(r) + "\n" for r in lines))
        cfg = load_config(None, ["download.max_download_seconds=8", "download.retries=1", "ray.num_cpus=4",
                                 f"download.allowed_hosts=[{ALLOWED}]"])
        run_pipeline(inputs, tmp_path / "out", cfg, backend="ray")
    errors = {e["video_id"]: e for e in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()}
    assert {v: (e["error_stage"], e["error_type"]) for v, e in errors.items()} == {
        "slow": ("download", "timeout"), "key": ("download", "blocked_address"), "list": ("download", "playlist_refused"),
    }
    assert bad_log == []

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DownloadConfig
from pipeline.errors import StageError
from pipeline.stage import StageContext
from stages.download import DownloadStage, classify_download_error


def _stage(tmp_path: Path, **cfg: object) -> DownloadStage:
    base = {"retries": 1, "backoff_seconds": 0.05, "timeout_seconds": 5.0, "allow_private_addresses": True,
            "allow_file_urls": True}
    return DownloadStage(DownloadConfig(**{**base, **cfg}), StageContext(str(tmp_path)))


def _row(url: str, vid: str = "v1") -> dict:
    return {"video_id": vid, "source_url": url, "input_index": 0}


def test_downloads_over_http_with_ytdlp(media_server: str, tmp_path: Path, corpus_dir: Path) -> None:
    stage = _stage(tmp_path)
    (res,) = stage.process_batch([_row(f"{media_server}/sample_000.mp4")])
    assert not isinstance(res, Exception), res
    path = Path(res["local_path"])
    assert path.parent == tmp_path / "videos" and path.name.startswith("v1.")
    assert path.read_bytes() == (corpus_dir / "sample_000.mp4").read_bytes()
    assert res["video_duration"] > 5
    # a rerun reuses the finished download
    (again,) = stage.process_batch([_row(f"{media_server}/sample_000.mp4")])
    assert again["local_path"] == res["local_path"]


@pytest.mark.parametrize(
    ("path", "error_type"),
    [
        ("/missing.mp4", "not_found"),
        ("/forbidden.mp4", "forbidden"),
        ("/limited.mp4", "rate_limited"),
        ("/broken.mp4", "server_error"),
        ("/bad/html_page.mp4", "not_a_video"),
        ("/bad/random_bytes.mp4", "not_a_video"),
        ("/bad/zero_bytes.mp4", "empty_file"),
    ],
)
def test_http_failures_are_typed(media_server: str, tmp_path: Path, path: str, error_type: str) -> None:
    (res,) = _stage(tmp_path).process_batch([_row(media_server + path)])
    assert isinstance(res, StageError), res
    assert res.error_type == error_type, str(res)


def test_size_cap(media_server: str, tmp_path: Path) -> None:
    (res,) = _stage(tmp_path, max_filesize_mb=0.01).process_batch([_row(f"{media_server}/sample_000.mp4")])
    assert isinstance(res, StageError) and res.error_type == "too_large", res


def test_duration_cap(corpus_dir: Path, tmp_path: Path) -> None:
    (res,) = _stage(tmp_path, max_duration_seconds=1.0).process_batch([_row(str(corpus_dir / "sample_000.mp4"))])
    assert isinstance(res, StageError) and res.error_type == "too_long"


def test_local_paths_and_file_urls(corpus_dir: Path, tmp_path: Path) -> None:
    src = corpus_dir / "sample_001.mp4"
    stage = _stage(tmp_path)
    plain, file_url, missing = stage.process_batch(
        [_row(str(src)), _row(src.as_uri(), "v2"), _row(str(corpus_dir / "nope.mp4"), "v3")]
    )
    assert plain["local_path"] == str(src.resolve()) == file_url["local_path"]
    assert isinstance(missing, StageError) and missing.error_type == "not_found"
    (off,) = _stage(tmp_path, allow_local_paths=False).process_batch([_row(str(src))])
    assert isinstance(off, StageError) and off.error_type == "local_paths_disabled"


def test_transient_errors_are_retried(media_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="stages.download")
    (res,) = _stage(tmp_path, retries=2).process_batch([_row(f"{media_server}/limited.mp4")])
    assert isinstance(res, StageError) and res.error_type == "rate_limited"
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(
    ("message", "error_type"),
    [
        ("ERROR: [generic] Unable to download webpage: HTTP Error 404: Not Found", "not_found"),
        ("ERROR: Unable to download webpage: <urlopen error timed out>", "timeout"),
        ("ERROR: Unsupported URL: http://x/y", "not_a_video"),
        ("ERROR: Private video. Sign in if you've been granted access", "forbidden"),
        ("ERROR: something odd", "download_failed"),
        ("No connection adapters were found for 'file:///etc/passwd'", "unsupported_scheme"),
        ("<urlopen error unknown url type: gopher>", "unsupported_scheme"),
        ("ERROR: Unable to download webpage: HTTP Error 302: Found", "unsupported_scheme"),
        ("ERROR: Live DASH videos are not supported", "protocol_refused"),
    ],
)
def test_classify_messages(message: str, error_type: str) -> None:
    assert classify_download_error(message).error_type == error_type


# ----------------------------------------------------------------------------- refusing bad input


def test_private_addresses_are_refused_by_default(media_server: str, tmp_path: Path) -> None:
    stage = DownloadStage(DownloadConfig(retries=0), StageContext(str(tmp_path)))
    for url in (f"{media_server}/sample_000.mp4", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.mp4"):
        (res,) = stage.process_batch([_row(url)])
        assert isinstance(res, StageError) and res.error_type == "blocked_address", (url, res)
    assert not (tmp_path / "videos").exists() or not list((tmp_path / "videos").glob("v1.*"))


def test_redirect_to_loopback_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    """The first hop (127.0.0.2) is allowed by config; its redirect to 127.0.0.1 is not."""
    from pipeline.tools.serve import Route, serve_directory

    with serve_directory(corpus_dir) as target:
        routes = {"/hop.mp4": Route(302, b"", {"Location": f"{target}/sample_000.mp4"})}
        with serve_directory(corpus_dir, routes, host="127.0.0.2") as first:
            cfg = DownloadConfig(retries=0, allowed_hosts=["127.0.0.2"])
            stage = DownloadStage(cfg, StageContext(str(tmp_path)))
            ok, hop = stage.process_batch([_row(f"{first}/sample_001.mp4", "ok"), _row(f"{first}/hop.mp4", "hop")])
    assert not isinstance(ok, Exception), ok  # the allowed host itself works
    assert isinstance(hop, StageError) and hop.error_type == "blocked_address", hop
    assert not list((tmp_path / "videos").glob("hop.*"))


def test_endless_stream_is_cut_at_the_size_cap(tmp_path: Path, corpus_dir: Path) -> None:
    from pipeline.tools.serve import Route, serve_directory

    routes = {"/live.mp4": Route(200, b"\0" * 65536, {"Content-Type": "video/mp4"}, endless=True)}
    with serve_directory(corpus_dir, routes) as base:
        stage = _stage(tmp_path, max_filesize_mb=2, retries=0)
        (res,) = stage.process_batch([_row(f"{base}/live.mp4")])
    assert isinstance(res, StageError) and res.error_type == "too_large", res
    assert not list((tmp_path / "videos").glob("*.part"))


def test_file_urls_refused_by_default(tmp_path: Path) -> None:
    stage = DownloadStage(DownloadConfig(), StageContext(str(tmp_path)))
    (res,) = stage.process_batch([_row("file:///etc/passwd")])
    assert isinstance(res, StageError) and res.error_type == "file_url_refused"
    roots = DownloadStage(DownloadConfig(local_path_roots=[tmp_path]), StageContext(str(tmp_path)))
    (res,) = roots.process_batch([_row("/etc/passwd")])
    assert isinstance(res, StageError) and res.error_type == "path_refused"


def test_credentials_never_reach_errors(media_server: str, tmp_path: Path) -> None:
    url = media_server.replace("http://", "http://alice:s3cret@") + "/missing.mp4?X-Amz-Signature=abcdef123456"
    (res,) = _stage(tmp_path).process_batch([_row(url)])
    assert isinstance(res, StageError) and res.error_type == "not_found"
    assert "s3cret" not in str(res) and "abcdef123456" not in str(res)


def test_the_list_title_wins_over_the_downloaded_title(media_server: str, corpus_dir: Path, tmp_path: Path) -> None:
    stage = _stage(tmp_path)
    titled = {**_row(f"{media_server}/sample_000.mp4"), "metadata_json": '{" Title ": "Harbour at dawn", "channel": "x"}'}
    local = {**_row(str(corpus_dir / "sample_000.mp4"), "v2"), "metadata_json": '{"title": "Harbour at dawn"}'}
    plain = _row(str(corpus_dir / "sample_000.mp4"), "v3")
    broken = {**_row(str(corpus_dir / "sample_000.mp4"), "v4"), "metadata_json": "[1, 2"}
    results = stage.process_batch([titled, local, plain, broken])
    assert [r["title"] for r in results] == ["Harbour at dawn", "Harbour at dawn", "sample_000", "sample_000"]

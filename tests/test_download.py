from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DownloadConfig
from pipeline.errors import StageError
from pipeline.stage import StageContext
from stages.download import DownloadStage, classify_download_error


def _stage(tmp_path: Path, **cfg: object) -> DownloadStage:
    base = {"retries": 1, "backoff_seconds": 0.05, "timeout_seconds": 5.0}
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
    ],
)
def test_classify_messages(message: str, error_type: str) -> None:
    assert classify_download_error(message).error_type == error_type

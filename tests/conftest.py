"""Shared fixtures: generated media (never downloaded) and a loopback HTTP server."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short generated videos with speech and cuts (manifest.jsonl beside them)."""
    from pipeline.tools.samples import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, count=3, seed=7, duration=8.0)
    return root


@pytest.fixture(scope="session")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tools.samples import make_bad_inputs

    root = tmp_path_factory.mktemp("bad")
    make_bad_inputs(root)
    return root


@pytest.fixture(scope="session")
def media_server(corpus_dir: Path, bad_dir: Path) -> Iterator[str]:
    """Serves the corpus at /, the bad inputs at /bad/, plus canned 403/429/500 answers."""
    from pipeline.tools.serve import Route, serve_directory

    (corpus_dir / "bad").mkdir(exist_ok=True)
    for p in bad_dir.iterdir():
        target = corpus_dir / "bad" / p.name
        if not target.exists():
            target.write_bytes(p.read_bytes())
    routes = {
        "/forbidden.mp4": Route(403, b"forbidden"),
        "/limited.mp4": Route(429, b"slow down", {"Retry-After": "1"}),
        "/broken.mp4": Route(500, b"oops"),
    }
    with serve_directory(corpus_dir, routes) as base:
        yield base


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the default stages over generated media (tests/test_data.py)."""
    from tests.test_data import make_run

    return make_run(tmp_path_factory, "plain")


@pytest.fixture(scope="session")
def enriched_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run whose clips carry every model field and outcome (tests/test_data.py)."""
    from tests.test_data import make_run

    return make_run(tmp_path_factory, "enriched")


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1, with the AWS_* environment pointing at it;
    yields its endpoint URL. fsspec caches S3 file systems by their arguments, so one made while an
    earlier server ran would keep its endpoint: the cache is dropped before and after."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        server.stop()


def default_sigint() -> None:
    """``preexec_fn`` of a child process a test interrupts with Ctrl-C (SIGINT): the child gets
    SIGINT's default disposition, unblocked, as a process started from a terminal does. A child
    inherits an ignored or blocked SIGINT, and something earlier in a full test session leaves it
    ignored in the pytest process: the child then ran to its end and exited 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

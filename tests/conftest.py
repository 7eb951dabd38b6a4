"""Shared fixtures: generated media (never downloaded) and a loopback HTTP server."""

from __future__ import annotations

import os
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

"""``--retry-errors``: inputs that failed transiently (rate limits, 5xx, timeouts) are retried, and
nothing else, without writing any key twice.

A loopback server answers 503 and 429 for two inputs in the first run and serves them in the
second; a third input is a 404 (final: never retried). A stand-in stage fails one clip of a good
video with a ``timeout`` in the first run: the retry reprocesses that video but writes only that
clip.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest

from pipeline.config import QualityConfig, load_config
from pipeline.errors import StageError
from pipeline.runner import run_pipeline
from pipeline.tools.serve import Route, serve_directory
from pipeline.stage import Row, Stage

FLAKY: dict[str, bool] = {"on": False}


class FlakyClip(Stage[QualityConfig]):
    """Times out on clip 1 of video ``good`` while ``FLAKY['on']``."""

    name: ClassVar[str] = "flaky_clip"
    writes: ClassVar[tuple[str, ...]] = ()

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return [
            StageError("upstream model timed out", "timeout", transient=True)
            if FLAKY["on"] and r.get("key") == f"{r['video_id']}_0001" and r["video_id"] == "good"
            else {}
            for r in rows
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _outputs(out: Path) -> tuple[list[str], list[dict], list[dict]]:
    keys: list[str] = []
    for side in sorted((out / "shards").glob("*.parquet")):
        keys += pq.read_table(side, columns=["key"]).column(0).to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    index = pq.read_table(out / "index.parquet").to_pylist()
    return keys, index, errors


@pytest.mark.timeout(300)
def test_retry_errors_retries_exactly_the_transient_inputs(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import registry

    monkeypatch.setitem(registry.STAGES, "flaky_clip", (f"{__name__}:FlakyClip", "quality"))
    media = tmp_path / "media"
    media.mkdir()
    for name, src in (("good", 0), ("busy", 1), ("limited", 2)):
        shutil.copy(corpus_dir / f"sample_{src:03d}.mp4", media / f"{name}.mp4")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("url,id\n" + "".join(f"{base}/{n}.mp4,{n}\n" for n in ("good", "busy", "limited", "gone")))
    cfg = load_config(None, [
        "stages=[download, split, extract, flaky_clip, quality]", "download.allowed_hosts=[127.0.0.1]",
        "download.retries=0", "split.clip_seconds=4", "split.min_clip_seconds=1", "split.max_clip_seconds=6",
        "extract.frames_per_clip=1", "write.inputs_per_partition=2", "write.max_samples_per_shard=2",
        "report.enabled=false",
    ])  # fmt: skip
    out = tmp_path / "out"

    failing = {"/busy.mp4": Route(503, b"busy"), "/limited.mp4": Route(429, b"slow down", {"Retry-After": "0"})}
    FLAKY["on"] = True
    try:
        with serve_directory(media, failing, port=port):
            first = run_pipeline(inputs, out, cfg, backend="sequential")
    finally:
        FLAKY["on"] = False
    keys1, index1, errors1 = _outputs(out)
    kinds = {(e["video_id"], e["key"], e["error_type"], e["transient"]) for e in errors1}
    assert kinds == {
        ("busy", None, "server_error", True),
        ("limited", None, "rate_limited", True),
        ("gone", None, "not_found", False),
        ("good", "good_0001", "timeout", True),
    }
    assert first.stats["transient_errors"] == 3
    assert "good_0001" not in keys1 and {"good_0000"} <= set(keys1)

    with serve_directory(media, port=port):
        plain = run_pipeline(inputs, out, cfg, backend="sequential")  # a plain rerun retries nothing
        assert plain.stats["runs"][-1]["clips"] == {}
        retried = run_pipeline(inputs, out, cfg, backend="sequential", retry_errors=True)

    keys2, index2, errors2 = _outputs(out)
    assert not [k for k, n in Counter(keys2).items() if n > 1]  # no key twice
    assert [(e["video_id"], e["error_type"]) for e in errors2] == [("gone", "not_found")]  # the final error stays
    assert {r["video_id"] for r in index2} == {"good", "busy", "limited"}
    assert "good_0001" in keys2 and set(keys1) <= set(keys2)
    assert sorted(r["key"] for r in index2) == sorted(keys2)
    run = retried.stats["runs"][-1]
    # exactly the transient work was redone: one clip of good, all clips of busy and limited
    busy_limited = sum(1 for r in index2 if r["video_id"] in ("busy", "limited"))
    assert sum(run["clips"].values()) == 1 + busy_limited
    assert retried.stats["transient_errors"] == 0 and retried.stats["errors"] == {"download/not_found": 1}
    assert retried.kept == len(index2) and retried.errors == 1

    # a second retry finds nothing left to retry
    again = run_pipeline(inputs, out, cfg, backend="sequential", retry_errors=True)
    assert again.stats["runs"][-1]["clips"] == {}
    marker = json.loads((out / "_markers" / "000000.json").read_text())
    assert {tuple(s) for s in marker["superseded"]} == {("good", "good_0001", "flaky_clip"), ("busy", None, "download")}

"""``avforge inspect`` (pipeline/tools/inspect.py) on a real enriched run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import AvforgeError
from pipeline.tools.inspect import describe, iter_samples


def test_folder_summary(enriched_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = json.loads((enriched_run / "stats.json").read_text())
    assert main(["inspect", str(enriched_run), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    clips = stats["clips"]
    assert f"kept {clips['kept']} · rejected {clips['rejected']} · errored clips {clips['errored']}" in text
    shards = sorted((enriched_run / "shards").glob("*.tar"))
    assert f"shards: {len(shards)} tars" in text
    for reason in stats["drop_reasons"]:
        assert reason in text
    assert "test_enrich/internal_error 1" in text
    first_keys = [k for k, _ in iter_samples(shards[0])][:2]
    assert all(k in text for k in first_keys)
    assert text.count("      caption:    Someone says hello world") == 2
    assert "report: " in text and "filled: transcript" in text


def test_shard_summary(enriched_run: Path) -> None:
    shard = sorted((enriched_run / "shards").glob("*.tar"))[1]
    side = pq.read_table(shard.with_suffix(".parquet"), columns=["key"]).column("key").to_pylist()
    text = describe(shard, samples=1)
    assert f"samples: {len(side)}" in text
    assert f"jpg {8 * len(side)}" in text and f"flac {len(side)}" in text
    assert side[0] in text and side[-1] not in text.split("first 1 samples:")[1]


def test_one_sample_in_full(enriched_run: Path) -> None:
    index = pq.read_table(enriched_run / "index.parquet", columns=["key", "shard"]).to_pylist()
    key, shard = index[-1]["key"], enriched_run / "shards" / index[-1]["shard"]
    text = describe(enriched_run, key=key)
    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers() if m.name.startswith(key + ".")]
        doc = json.loads(tar.extractfile(f"{key}.json").read())  # type: ignore[union-attr]
    assert all(n in text for n in names) and len(names) == 11
    assert "16000 Hz, 1 ch, flac" in text and "320x240 JPEG" in text
    full = text.split(f"{key}.json:\n", 1)[1]
    assert json.loads(full) == doc
    assert describe(shard, key=key) == text  # the same view from the shard alone


def test_rejected_and_failed_keys(enriched_run: Path) -> None:
    rejected = pq.read_table(enriched_run / "rejects.parquet", columns=["key", "drop_reason"]).to_pylist()
    dup = next(r for r in rejected if r["drop_reason"] == "duplicate")
    text = describe(enriched_run, key=dup["key"])
    assert "was rejected" in text and '"drop_reason": "duplicate"' in text and '"duplicate_of": "' in text
    failed = pq.read_table(enriched_run / "errors.parquet").to_pylist()[0]
    text = describe(enriched_run, key=failed["key"])
    assert "was failed" in text and "test_failure" in text


def test_bad_paths_and_keys(enriched_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AvforgeError, match="no clip"):
        describe(enriched_run, key="nope_0000")
    with pytest.raises(AvforgeError, match="not an avforge output folder"):
        describe(tmp_path)
    assert main(["inspect", str(tmp_path / "missing.tar")]) == 2
    assert "expected an output folder or a .tar shard" in capsys.readouterr().err

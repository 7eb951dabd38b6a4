"""Inputs, staging and outputs on s3:// against a real S3-compatible server on 127.0.0.1 (moto)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from tests.conftest import s3_server

BUCKET = "avforge-test"


@pytest.fixture(scope="module")
def s3(corpus_dir: Path) -> Iterator[object]:
    with s3_server():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for p in sorted(corpus_dir.glob("sample_*.mp4")):
            client.upload_file(str(p), BUCKET, f"in/{p.name}")
        yield client


def _keys(client: object, prefix: str) -> list[str]:
    resp = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.mark.timeout(300)
def test_run_with_inputs_staging_and_outputs_on_s3(s3: object, corpus_dir: Path, tmp_path: Path) -> None:
    client = s3
    lines = [f"s3://{BUCKET}/in/sample_000.mp4", f"s3://{BUCKET}/in/sample_001.mp4", f"s3://{BUCKET}/in/nope.mp4"]
    client.put_object(Bucket=BUCKET, Key="lists/inputs.txt", Body="\n".join(lines).encode())  # type: ignore[attr-defined]
    out = f"s3://{BUCKET}/runs/one"
    cfg = load_config(None, ["extract.frames_per_clip=2", "write.max_samples_per_shard=2", "split.clip_seconds=4",
                             "split.min_clip_seconds=1", "split.max_clip_seconds=6"])  # fmt: skip
    summary = run_pipeline(f"s3://{BUCKET}/lists/inputs.txt", out, cfg, backend="sequential")
    assert summary.output_uri == out and summary.kept >= 3 and summary.errors == 1

    keys = _keys(client, "runs/one/")
    for name in ("index.parquet", "rejects.parquet", "errors.parquet", "stats.json", "config.yaml"):
        assert f"runs/one/{name}" in keys
    tars = [k for k in keys if k.endswith(".tar")]
    assert tars and all(k.replace(".tar", ".parquet") in keys for k in tars)
    assert not [k for k in keys if "/_staging/clips/" in k]  # staged media removed once written

    body = client.get_object(Bucket=BUCKET, Key="runs/one/index.parquet")["Body"].read()  # type: ignore[attr-defined]
    index = pq.read_table(io.BytesIO(body)).to_pylist()
    assert len(index) == summary.kept and all(r["source_url"].startswith("s3://") for r in index)
    errors = pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key="runs/one/errors.parquet")["Body"].read())).to_pylist()  # type: ignore[attr-defined]
    assert errors[0]["error_type"] == "not_found"

    tar_bytes = client.get_object(Bucket=BUCKET, Key=tars[0])["Body"].read()  # type: ignore[attr-defined]
    local = tmp_path / "s.tar"
    local.write_bytes(tar_bytes)
    sample = next(iter(wds.WebDataset(str(local), shardshuffle=False)))
    assert {"flac", "0.jpg", "1.jpg", "json", "txt"} <= set(sample)
    assert json.loads(sample["json"])["key"] == sample["__key__"]

    # resume on S3: a tar left without sidecar by a dead run is removed; nothing is redone
    client.put_object(Bucket=BUCKET, Key="runs/one/shards/000099.tar", Body=b"half written")  # type: ignore[attr-defined]
    again = run_pipeline(f"s3://{BUCKET}/lists/inputs.txt", out, cfg, backend="sequential")
    assert again.stats["runs"][-1]["clips"] == {}
    assert "runs/one/shards/000099.tar" not in _keys(client, "runs/one/")
    assert [k for k in _keys(client, "runs/one/") if k.endswith(".tar")] == tars

"""Resume: an interrupted run (SIGKILL of the driver, Ctrl-C) finishes on rerun, with no duplicates."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import default_sigint

ARGS = ["--backend", "sequential", "--set", "write.max_samples_per_shard=1", "--set", "extract.frames_per_clip=1",
        "--set", "write.inputs_per_partition=2",
        "--set", "split.clip_seconds=4", "--set", "split.min_clip_seconds=1", "--set", "split.max_clip_seconds=6"]  # fmt: skip


def _inputs(corpus_dir: Path, tmp: Path) -> Path:
    f = tmp / "inputs.csv"
    rows = [f"{corpus_dir / f'sample_{i % 3:03d}.mp4'},vid{i:02d}" for i in range(12)]
    f.write_text("url,id\n" + "\n".join(rows) + "\n")
    return f


def _cmd(inputs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--recipe", "media", "--input", str(inputs), "--output", str(out), *ARGS]


def _keys(out: Path) -> list[str]:
    keys = []
    for side in sorted((out / "shards").glob("*.parquet")):
        keys += pq.read_table(side, columns=["key"]).column(0).to_pylist()
    return keys


def _interrupt(cmd: list[str], out: Path, sig: int) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("*.tar"))) >= 2:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail("run finished before it could be interrupted")
    proc.send_signal(sig)
    return proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out"
    subprocess.run(_cmd(_inputs(corpus_dir, tmp), out), check=True, capture_output=True)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) >= 24
    return sorted(keys)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_interrupted_run_finishes_on_rerun(corpus_dir: Path, tmp_path: Path, reference: list[str], sig: int) -> None:
    inputs = _inputs(corpus_dir, tmp_path)
    out = tmp_path / "out"
    code = _interrupt(_cmd(inputs, out), out, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    partial = _keys(out)
    assert 0 < len(partial) < len(reference)
    assert not (out / "index.parquet").exists() or sig != signal.SIGKILL
    done = subprocess.run(_cmd(inputs, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = _keys(out)
    assert sorted(keys) == reference  # everything, once
    index = pq.read_table(out / "index.parquet").column("key").to_pylist()
    assert sorted(index) == reference
    leftovers = [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    tars = sorted(p.stem for p in (out / "shards").glob("*.tar"))
    sides = sorted(p.stem for p in (out / "shards").glob("*.parquet"))
    assert tars == sides  # no half-written shard

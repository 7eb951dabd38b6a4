"""Faults on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

A head node with no CPUs (it holds the driver's objects) and two worker nodes with 2 logical CPUs
each. Each test injects one fault while tasks are running on a worker node and checks that the
job still ends with every input accounted for exactly once and no duplicated or half-written
shard: a worker process killed (running a CPU stage's task, or a model stage's actor mid-batch),
a whole node removed, the driver interrupted (Ctrl-C, SIGKILL) and the job rerun.
(tests/test_resume.py covers driver interrupts without a cluster.) The last tests check the Ray
runner's own pieces: stage fusion, rows per task, the per-stage Ray metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.config import QualityConfig
from pipeline.stage import Resources, Row, Stage
from tests.conftest import default_sigint

SETTINGS = [
    "split.clip_seconds=4", "split.min_clip_seconds=1", "split.max_clip_seconds=6",
    "extract.frames_per_clip=1", "extract.batch_size=4", "write.max_samples_per_shard=2", "report.enabled=false",
    "write.inputs_per_partition=2", "ray.input_block_rows=2", "ray.progress_bars=false",
]  # fmt: skip
VIDEOS = 24  # inputs: the 3 corpus videos listed 8 times each under distinct ids


class ProbeModel(Stage[QualityConfig]):
    """A stand-in model stage: stateful, so it runs as a Ray Data actor pool (two actors).

    It scores each clip with the pid of the actor that saw it, so a test can tell the pool served
    every row, across an actor restart.
    """

    name: ClassVar[str] = "probe_model"
    writes: ClassVar[tuple[str, ...]] = ("scores",)
    stateful: ClassVar[bool] = True

    @property
    def resources(self) -> Resources:
        return Resources(cpus=0.5, pool_size=2)

    @property
    def batch_size(self) -> int:
        return 2

    def process_batch(self, rows: list[Row]) -> list[Any]:
        time.sleep(0.3)  # a model's forward pass: long enough to be killed in the middle of one
        return [{"scores": [*(r.get("scores") or []), {"name": "probe_pid", "value": float(os.getpid())}]} for r in rows]


class SlowCpu(Stage[QualityConfig]):
    """A stand-in slow CPU stage (a task, merged with split/extract), so a run lasts long enough
    to be hit mid-way however fast the machine is."""

    name: ClassVar[str] = "slow_cpu"
    writes: ClassVar[tuple[str, ...]] = ()

    def process_batch(self, rows: list[Row]) -> list[Any]:
        time.sleep(0.3 * len(rows))
        return [{} for _ in rows]


SLOW = "stages=[download, split, extract, slow_cpu, quality]"


@pytest.fixture
def probe_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``probe_model`` and ``slow_cpu`` stage names (the driver builds stages; workers
    unpickle these classes)."""
    from pipeline import registry

    monkeypatch.setitem(registry.STAGES, "probe_model", (f"{__name__}:ProbeModel", "quality"))
    monkeypatch.setitem(registry.STAGES, "slow_cpu", (f"{__name__}:SlowCpu", "quality"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # an in-process Ray left by an earlier test module would take this module's runs
    mib = 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * mib})
    for _ in range(2):
        c.add_node(num_cpus=2, object_store_memory=150 * mib)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(autouse=True)
def _disconnect() -> Iterator[None]:
    """Each test's driver connects afresh (init_ray skips init when Ray is already up)."""
    yield
    import ray

    ray.shutdown()


def _inputs(corpus_dir: Path, tmp: Path) -> Path:
    f = tmp / "inputs.csv"
    rows = [f"{corpus_dir / f'sample_{i % 3:03d}.mp4'},vid{i:02d}" for i in range(VIDEOS)]
    f.write_text("url,id\n" + "\n".join(rows) + "\n")
    return f


def _config(address: str, *extra: str) -> Any:
    from pipeline.config import load_config

    return load_config(None, [*SETTINGS, f"ray.address={address}", *extra])


def _worker_nodes(cluster: Any) -> list[Any]:
    return [n for n in cluster.worker_nodes if n.any_processes_alive()]


def _busy_workers(node: Any, title: str = "ray::MapBatches") -> list[psutil.Process]:
    """Worker processes of ``node`` running a map task now (Ray titles them after the task):
    ``ray::MapBatches(...)`` for a task, ``ray::MapWorker(...).submit`` for an actor's batch."""
    busy = []
    for raylet in node.all_processes.get("raylet", []):
        try:
            children = psutil.Process(raylet.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in children:
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith(title):
                    busy.append(p)
            except psutil.Error:
                continue
    return busy


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shards(out: Path) -> int:
    return len(list((out / "shards").glob("*.tar")))


class Fault(threading.Thread):
    """Wait until shards are being written and a worker node runs a task, then ``inject(node)``."""

    def __init__(
        self, cluster: Any, out: Path, inject: Callable[[Any, list[psutil.Process]], None], title: str = "ray::MapBatches"
    ) -> None:
        super().__init__(daemon=True)
        self.cluster, self.out, self.inject, self.title = cluster, out, inject, title
        self.stop = threading.Event()
        self.fired: dict[str, Any] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            if _shards(self.out) >= 1:
                for node in _worker_nodes(self.cluster):
                    busy = _busy_workers(node, self.title)
                    if busy:
                        self.fired = {"shards": _shards(self.out), "busy": [p.pid for p in busy]}
                        self.inject(node, busy)
                        return
            time.sleep(0.02)


def _run_with_fault(
    cluster: Any,
    inputs: Path,
    out: Path,
    inject: Callable[[Any, list[psutil.Process]], None],
    title: str = "ray::MapBatches",
    settings: tuple[str, ...] = (),
) -> dict:
    from pipeline.runner import run_pipeline

    fault = Fault(cluster, out, inject, title)
    fault.start()
    try:
        run_pipeline(inputs, out, _config(cluster.address, *settings), backend="ray")
    finally:
        fault.stop.set()
        fault.join(timeout=30)
    assert fault.fired, "the run ended before the fault could be injected"
    return fault.fired


def _tar_keys(tar: Path) -> dict[str, set[str]]:
    members: dict[str, set[str]] = defaultdict(set)
    with tarfile.open(tar) as t:  # a truncated tar raises here
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            members[key].add(ext)
    return members


def _assert_every_input_once(out: Path) -> int:
    """Every input video complete, each clip once, in exactly one complete shard; returns #shards."""
    shards = out / "shards"
    assert not [p.name for p in shards.iterdir() if p.name.startswith(".")], "temporary shard left behind"
    tars = sorted(p.stem for p in shards.glob("*.tar"))
    assert tars == sorted(p.stem for p in shards.glob("*.parquet")), "a tar without its sidecar or the reverse"
    shard_keys: list[str] = []
    for name in tars:
        side = pq.read_table(shards / f"{name}.parquet", columns=["key"]).column(0).to_pylist()
        members = _tar_keys(shards / f"{name}.tar")
        assert sorted(members) == sorted(side), f"shard {name}: tar and sidecar disagree"
        for key, exts in members.items():
            assert {"flac", "0.jpg", "json", "txt"} <= exts, f"{key} is incomplete in shard {name}"
        shard_keys += side
    duplicated = [k for k, n in Counter(shard_keys).items() if n > 1]
    assert not duplicated, f"written twice: {duplicated}"

    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert errors == []  # good media only: a lost task must not turn into an error row
    assert sorted(r["key"] for r in index) == sorted(shard_keys)
    rows = index + rejects
    assert len({r["key"] for r in rows}) == len(rows)
    per_video: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_video[r["video_id"]].append(r)
    assert sorted(per_video) == [f"vid{i:02d}" for i in range(VIDEOS)]
    counts_by_source: dict[str, set[int]] = defaultdict(set)
    for vid, clips in per_video.items():
        count = clips[0]["clip_count"]
        assert sorted(c["key"] for c in clips) == [f"{vid}_{i:04d}" for i in range(count)], vid
        counts_by_source[clips[0]["source_url"]].add(count)
    assert all(len(c) == 1 for c in counts_by_source.values())  # same source, same clips
    return len(tars)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["task", "actor"])
def test_worker_process_killed_mid_run(
    cluster: Any, corpus_dir: Path, tmp_path: Path, target: str, probe_model: None
) -> None:
    """SIGKILL a worker process while it runs a CPU stage's task, or a model stage's actor mid-batch."""
    killed: list[int] = []

    def kill_worker(node: Any, busy: list[psutil.Process]) -> None:
        busy[0].send_signal(signal.SIGKILL)
        killed.append(busy[0].pid)

    out = tmp_path / "out"
    if target == "task":
        fired = _run_with_fault(cluster, _inputs(corpus_dir, tmp_path), out, kill_worker, settings=(SLOW,))
    else:
        stages = "stages=[download, split, extract, quality, probe_model]"
        fired = _run_with_fault(cluster, _inputs(corpus_dir, tmp_path), out, kill_worker,
                                title="ray::MapWorker(MapBatches(_StageActor)).submit", settings=(stages,))  # fmt: skip
    assert killed == fired["busy"][:1] and not _alive(killed[0])
    assert _assert_every_input_once(out) > fired["shards"]  # the job went on after the kill
    assert len(_worker_nodes(cluster)) == 2  # a dead worker process is not a dead node
    if target == "actor":  # every kept clip went through the model pool exactly once, its batch resent
        index = pq.read_table(out / "index.parquet").to_pylist()
        assert all(sum(s["name"] == "probe_pid" for s in r["scores"]) == 1 for r in index)


@pytest.mark.timeout(180)
def test_node_removed_mid_run(cluster: Any, corpus_dir: Path, tmp_path: Path, probe_model: None) -> None:
    removed: list[Any] = []

    def remove_node(node: Any, busy: list[psutil.Process]) -> None:
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node)

    out = tmp_path / "out"
    try:
        fired = _run_with_fault(cluster, _inputs(corpus_dir, tmp_path), out, remove_node, settings=(SLOW,))
        assert removed and len(_worker_nodes(cluster)) == 1
        assert not any(_alive(pid) for pid in fired["busy"])  # its tasks died with it
        assert _assert_every_input_once(out) > fired["shards"]
    finally:
        if removed:  # back to two worker nodes for the next test
            cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
            cluster.wait_for_nodes()


def _finished_shards(out: Path) -> dict[str, tuple[int, int]]:
    """Committed shards (named by a partition's completion marker), with the tar's inode and
    modification time."""
    shards = out / "shards"
    names = []
    for marker in sorted((out / "_markers").glob("*.json")) if (out / "_markers").is_dir() else []:
        try:
            names += [s["name"] for s in json.loads(marker.read_text())["shards"]]
        except (json.JSONDecodeError, OSError):
            continue  # being written
    return {n: ((shards / f"{n}.tar").stat().st_ino, (shards / f"{n}.tar").stat().st_mtime_ns) for n in names}


def _cli(inputs: Path, out: Path, address: str) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return [sys.executable, "-m", "pipeline.cli", "run", "--recipe", "media", "--input", str(inputs), "--output", str(out),
            "--address", address, *sets]  # fmt: skip


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_driver_interrupted_then_rerun(cluster: Any, corpus_dir: Path, tmp_path: Path, sig: int) -> None:
    inputs, out = _inputs(corpus_dir, tmp_path), tmp_path / "out"
    cmd = _cli(inputs, out, cluster.address)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tmp_path / "driver.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 150
    # interrupt at the first finished shard: at two, a run on a quiet cluster could be past its last
    # write and inside Ray's shutdown (atexit), where a Ctrl-C no longer changes the exit code
    while proc.poll() is None and time.monotonic() < deadline and len(_finished_shards(out)) < 1:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the driver finished before it could be interrupted")
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), log.read_text(errors="replace")[-4000:]
    finished = _finished_shards(out)
    assert len(finished) >= 1

    rerun = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=150)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _assert_every_input_once(out) > len(finished)
    kept = _finished_shards(out)
    assert {name: kept.get(name) for name in finished} == finished  # resumed: the first run's shards untouched


@pytest.mark.timeout(180)
def test_shards_are_written_by_worker_processes(cluster: Any, corpus_dir: Path, tmp_path: Path) -> None:
    """Workers write the shards: every partition's marker names writer processes on the two
    worker nodes, never the driver (the head node, which has no CPUs, holds only the driver)."""
    import ray

    from pipeline.runner import run_pipeline

    out = tmp_path / "out"
    summary = run_pipeline(_inputs(corpus_dir, tmp_path), out, _config(cluster.address), backend="ray")
    head = cluster.head_node.node_id
    workers = {n.node_id for n in _worker_nodes(cluster)}
    assert ray.get_runtime_context().get_node_id() == head
    markers = [json.loads(m.read_text()) for m in sorted((out / "_markers").glob("*.json"))]
    assert len(markers) == VIDEOS // 2 and sum(m["counts"].get("keep", 0) for m in markers) == summary.kept
    writers = {(pid, node) for m in markers for pid, node in m["writers"]}
    assert writers and all(pid != os.getpid() and node in workers for pid, node in writers)
    assert len({node for _, node in writers}) == 2  # both worker nodes wrote shards
    assert summary.stats["runs"][-1]["writers"] == len(writers)
    _assert_every_input_once(out)


# ---------------------------------------------------------------------- the Ray runner's pieces


def _stages(names: list[str], *sets: str) -> list[Any]:
    from pipeline.config import load_config
    from pipeline.registry import build_stages
    from pipeline.stage import StageContext

    return build_stages(load_config(None, [f"stages={names}", *sets]), StageContext())


def test_neighbouring_task_stages_fuse_and_keep_their_batch_sizes() -> None:
    from pipeline.ray_runner import fuse_stages, rows_per_task

    stages = _stages(["download", "split", "extract", "quality", "asr", "fingerprint"], "extract.batch_size=16")
    groups = [[s.name for s in g] for g in fuse_stages(stages)]
    # download (0.25 CPU) and the model stage (an actor pool) stay alone; nothing fuses across an actor
    assert groups == [["download"], ["split", "extract", "quality"], ["asr"], ["fingerprint"]]
    split_group = fuse_stages(stages)[1]
    assert rows_per_task(split_group, rows=24, workers=4) == 2  # ~4 tasks per worker: 24 videos, 12 tasks
    assert rows_per_task(split_group, rows=10, workers=4) == 1  # never below the first stage's batch
    assert rows_per_task(split_group, rows=1_000_000, workers=4) == 64  # never above the largest (quality)
    assert rows_per_task(fuse_stages(stages)[0], rows=1_000_000, workers=4) == 1  # download: one video a task


def test_stage_metrics_count_rows_and_new_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.util import metrics

    from pipeline.ray_runner import StageMetrics

    seen: list[tuple[str, float, dict[str, str]]] = []

    class FakeCounter:
        def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
            self.name, self.tag_keys = name, tag_keys

        def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            assert set(tags or {}) == set(self.tag_keys)
            seen.append((self.name, value, tags or {}))

    monkeypatch.setattr(metrics, "Counter", FakeCounter)
    rows_in = [{"key": "a"}, {"key": "b"}, {"key": "c", "error_stage": "download", "error_type": "not_found"},
               {"key": "d", "drop_reason": "too_short"}]  # fmt: skip
    rows_out = [{"key": "a_0"}, {"key": "a_1"}, {"key": "b", "error_stage": "split", "error_type": "corrupt_media"},
                rows_in[2], rows_in[3]]  # fmt: skip
    (_, split) = _stages(["download", "split"])
    StageMetrics().record(split, rows_in, rows_out)
    assert seen == [
        ("avforge_stage_rows_in", 2, {"stage": "split"}),  # the errored and the dropped row were not processed
        ("avforge_stage_rows_out", 5, {"stage": "split"}),
        ("avforge_stage_errors", 1, {"stage": "split", "error_type": "corrupt_media"}),  # not download's error
    ]


@pytest.mark.timeout(120)
def test_stage_metrics_register_in_a_ray_worker(cluster: Any) -> None:
    import ray

    ray.init(address=cluster.address)

    @ray.remote(num_cpus=1)
    def record() -> list[dict[str, Any]]:
        from pipeline.config import ExtractConfig
        from pipeline.ray_runner import stage_metrics
        from stages.extract import ExtractStage

        m = stage_metrics()
        m.record(ExtractStage(ExtractConfig()), [{"key": "k"}],
                 [{"key": "k", "error_stage": "extract", "error_type": "corrupt_media"}])  # fmt: skip
        assert stage_metrics() is m  # one set per process
        return [c.info for c in (m.rows_in, m.rows_out, m.errors)]

    infos = ray.get(record.remote(), timeout=90)
    assert [(i["name"], tuple(i["tag_keys"])) for i in infos] == [
        ("avforge_stage_rows_in", ("stage",)),
        ("avforge_stage_rows_out", ("stage",)),
        ("avforge_stage_errors", ("stage", "error_type")),
    ]

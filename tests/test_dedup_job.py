"""The dedup decision over signal files: the distributed job against the single-machine path.

Signals of real clips (the hard-negative corpus of tests/bench/dedup_bench.py: lavfi pictures,
espeak speech, tones and silence, with planted transforms, fingerprinted by the real extract and
fingerprint stages) plus synthetic hard negatives (tests/bench/dedup_scale_bench.py: logos and
jingles shared by many clips, half-copied and time-reversed clips, copied pictures under other
sound), spread over several signal files as the engine writes them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DedupConfig
from pipeline.resume import AgainstPartition
from pipeline.stage import map_in_process
from stages._dedup_scale import SIGNAL_NAMES, DistributedJob, SignalFile, _count_rows, decide
from stages.dedup import add_semantic_links, signals_table, verified_links
from tests.bench.dedup_bench import corpus_clips, fingerprint_clips, make_hard_corpus, true_duplicate
from tests.bench.dedup_scale_bench import signal_table as synth_table
from tests.bench.dedup_scale_bench import synth_signals

# small shuffle partitions and verification groups: many tasks even on a few hundred clips
JOB = {"rows_per_task": 100, "codes_per_task": 5000, "pairs_per_task": 100}


def _write(path: Path, rows: list[dict[str, Any]], partition: int) -> str:
    table = signals_table(rows, "quality")
    table = table.append_column("partition", pa.array([partition] * table.num_rows, pa.int64()))
    pq.write_table(table, path)
    return str(path)


@pytest.fixture(scope="module")
def real_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Fingerprinted clips of 7 originals, one planted transform of each, and a looping video."""
    root = tmp_path_factory.mktemp("dedup_job")
    corpus = make_hard_corpus(root / "media", originals=7, copies=7, seed=5)
    return fingerprint_clips(corpus_clips(corpus), root / "staging")


@pytest.fixture(scope="module")
def signal_files(real_rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The real clips over 3 signal files and 600 synthetic clips over 3 more (keys c000…)."""
    root = tmp_path_factory.mktemp("dedup_job_signals")
    uris = []
    for p in range(3):
        uris.append(_write(root / f"{p:06d}-real.parquet", [r for r in real_rows if r["input_index"] % 3 == p], p))
    cols, _ = synth_signals(600, seed=7)
    for p, rows in enumerate(np.array_split(np.random.default_rng(1).permutation(600), 3), start=3):
        path = root / f"{p:06d}-synth.parquet"
        pq.write_table(synth_table(cols, np.sort(rows), p), path)
        uris.append(str(path))
    return uris


def _decisions(folder: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def _single_links(uris: list[str], cfg: DedupConfig) -> dict[tuple[str, str], dict[str, str]]:
    """The single-machine links over the files in order (the table ``find_duplicates`` sees)."""
    table = pa.concat_tables([pq.read_table(u, columns=SIGNAL_NAMES) for u in uris])
    links, _, _ = verified_links(table, cfg)
    add_semantic_links(table, cfg, links)
    keys = table.column("key").to_pylist()
    return {(keys[a], keys[b]): v for (a, b), v in links.items()}


def test_distributed_job_equals_single_machine(signal_files: list[str], tmp_path: Path) -> None:
    """Same links (pairs, signals and evidence) and the same decisions, on real and synthetic signals."""
    single_cfg = DedupConfig(job="single")
    summary = decide(signal_files, [], single_cfg, str(tmp_path / "single"), map_in_process)
    assert summary["method"] == "single"
    cfg = DedupConfig(job="distributed", **JOB)
    files = [SignalFile(u, i, False) for i, u in enumerate(signal_files)]
    job = DistributedJob(files, [_count_rows(u) for u in signal_files], cfg, str(tmp_path / "dist"), map_in_process)
    dist = job.run()
    expected = _single_links(signal_files, single_cfg)
    assert job.read_links() == expected
    per_signal = dist["links"]
    # every kind of evidence and the hard cases took part
    assert per_signal["exact"] and per_signal["frames"] and per_signal["audio"] and per_signal["semantic:visual_embedding"]
    assert dist["vetoed"] > 0
    # the pairs, links and components were split: several pair partitions, verify batches and group partitions
    assert dist["linked_clips"] > JOB["rows_per_task"] and sum(dist["candidates"].values()) > JOB["pairs_per_task"]
    assert any(k.startswith(("orig", "loop")) for p in job.read_links() for k in p)
    single, distributed = _decisions(tmp_path / "single"), _decisions(tmp_path / "dist")
    assert single == distributed
    assert summary["duplicates"] == dist["duplicates"] > 0
    # a real planted copy is marked, with its evidence
    assert single["orig00_copy_0000"]["duplicate_of"] == "orig00_0000"
    assert "exact" in single["orig00_copy_0000"]["signals"]


def test_small_runs_take_one_task(signal_files: list[str], tmp_path: Path) -> None:
    calls: list[int] = []

    def counting_map(fn: Any, items: Any) -> list[Any]:
        calls.append(len(items))
        return map_in_process(fn, items)

    summary = decide(signal_files, [], DedupConfig(), str(tmp_path / "d"), counting_map)
    assert summary["method"] == "single"
    assert calls == [1]  # row counts from the footers on the driver, then one task decides
    calls.clear()
    synthetic = signal_files[3:4]  # 200 clips: above a threshold of 100
    big = decide(synthetic, [], DedupConfig(distributed_min_rows=100, **JOB), str(tmp_path / "e"), counting_map)
    assert big["method"] == "distributed" and len(calls) > 1


# --------------------------------------------------------------------------- multi-node Ray


@pytest.fixture
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.ray_runner import RAY_ENV

    for k, v in RAY_ENV.items():  # the engine's Ray settings (no auth, no usage stats)
        os.environ.setdefault(k, v)
    ray.shutdown()
    mib = 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * mib})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=100 * mib)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _on_node(fn: Any, item: Any) -> tuple[Any, str]:
    import ray

    return fn(item), ray.get_runtime_context().get_node_id()


@pytest.mark.timeout(900)
def test_distributed_job_on_a_multi_node_cluster(cluster: Any, signal_files: list[str], tmp_path: Path) -> None:
    """decide through ray_map on 3 nodes: the same groups as the single-machine path."""
    from pipeline.ray_runner import ray_map

    nodes: set[str] = set()

    def spread_map(fn: Any, items: Any) -> list[Any]:
        out = ray_map(functools.partial(_on_node, fn), items)
        nodes.update(n for _, n in out)
        return [r for r, _ in out]

    cfg = DedupConfig(job="distributed", **JOB)
    summary = decide(signal_files, [], cfg, str(tmp_path / "ray"), spread_map)
    assert summary["method"] == "distributed" and summary["duplicates"] > 0
    assert len(nodes) >= 2, nodes  # the tasks ran on more than one node
    decide(signal_files, [], DedupConfig(job="single"), str(tmp_path / "single"), map_in_process)
    assert _decisions(tmp_path / "ray") == _decisions(tmp_path / "single")


# --------------------------------------------------------------------------- against earlier outputs


OLD_VIDEOS = {"orig00", "orig01", "orig02", "orig03", "orig04"}


@pytest.mark.parametrize("job", ["single", "distributed"])
def test_against_earlier_outputs(job: str, real_rows: list[dict[str, Any]], tmp_path: Path) -> None:
    """Old clips are never marked nor listed; new copies of them are duplicates of old keys;
    genuinely new clips are kept; an old clip its own run rejected as a duplicate is no target."""
    old = [r for r in real_rows if r["video_id"] in OLD_VIDEOS]
    rejected = [dict(r) for r in real_rows if r["video_id"] == "orig00_copy"]  # the earlier run's duplicate
    new = [r for r in real_rows if r["video_id"] not in OLD_VIDEOS and r["video_id"] != "orig00_copy"]
    new += [{**r, "key": "again_" + r["key"]} for r in rejected]  # the same copy, arriving again
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    against = []
    for p in range(2):
        part = [r for r in old if r["input_index"] % 2 == p] + (rejected if p == 0 else [])
        sig = _write(earlier / f"{p:06d}-old.parquet", part, p)
        rejects = earlier / f"rejects-{p:06d}.parquet"
        dups = [r["key"] for r in rejected] if p == 0 else []
        pq.write_table(pa.table({"key": pa.array(dups, pa.string()), "drop_reason": pa.array(["duplicate"] * len(dups), pa.string())}), rejects)
        against.append(AgainstPartition(p, [sig], [str(rejects)]))
    uris = [_write(tmp_path / f"{p:06d}-new.parquet", [r for r in new if r["input_index"] % 2 == p], p) for p in range(2)]
    cfg = DedupConfig(job=job, **JOB)
    summary = decide(uris, against, cfg, str(tmp_path / "decisions"), map_in_process)
    assert summary["method"] == job
    decided = _decisions(tmp_path / "decisions")
    old_keys = {r["key"] for r in old}
    rejected_keys = {r["key"] for r in rejected}
    truth = {r["key"]: r["_truth"] for r in real_rows}
    truth.update({"again_" + r["key"]: r["_truth"] for r in rejected})
    assert not set(decided) & (old_keys | rejected_keys)  # old clips are never written
    targets = {d["duplicate_of"] for d in decided.values() if d["duplicate_of"]}
    assert not targets & rejected_keys
    for key, d in decided.items():
        if d["duplicate_of"]:
            assert true_duplicate(truth[key], truth[d["duplicate_of"]]), (key, d)
    # new copies of old clips point at old keys
    copies_of_old = [r["key"] for r in new if any(true_duplicate(r["_truth"] if "_truth" in r else truth[r["key"]], truth[o])
                                                  for o in old_keys)]  # fmt: skip
    assert copies_of_old
    marked = [k for k in copies_of_old if decided.get(k, {}).get("duplicate_of") in old_keys]
    assert len(marked) >= 0.9 * len(copies_of_old), set(copies_of_old) - set(marked)
    assert decided["again_orig00_copy_0000"]["duplicate_of"] == "orig00_0000"
    # genuinely new clips are kept
    for key in ("orig05_0000", "orig06_0000"):
        assert decided.get(key, {}).get("duplicate_of") is None
    assert summary["against_rows"] == len(old)


def test_distributed_job_without_links(tmp_path: Path) -> None:
    """Only hard negatives: candidates are generated and all refused; no links, no decisions, nothing left over."""
    cols, truth = synth_signals(400, seed=3, copy_fraction=0.0, negative_fraction=0.3)
    # two negatives of one kind made from the same clip are true copies of each other: keep one
    derived = [(k, s) for k, s in zip(truth["kind"].tolist(), truth["source"].tolist(), strict=True)]
    rows = np.array([i for i, d in enumerate(derived) if d[1] < 0 or derived.index(d) == i])
    uris = []
    for p in range(2):
        path = tmp_path / "signals" / f"{p:06d}-synth.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(synth_table(cols, rows[p::2], p), path)
        uris.append(str(path))
    summary = decide(uris, [], DedupConfig(job="distributed", semantic=False, **JOB), str(tmp_path / "d" / "decisions"),
                     map_in_process)  # fmt: skip
    assert sum(summary["candidates"].values()) > 0 and summary["vetoed"] > 0
    assert summary["duplicates"] == 0 and summary["linked_clips"] == 0 and not summary["links"]
    assert not list((tmp_path / "d").rglob("*.parquet"))  # no decisions, no links, the work folder removed

"""Dedup on generated corpora with planted duplicates and hard negatives.

1. Through the real pipeline: three source videos, each copied seven ways (byte copy, low-bitrate
   half-resolution re-encode, 10% centred crop, letterbox, brightness/contrast shift, mirror flip,
   1.5 s head trim), plus three distinct videos of the same kind (same scene kinds, other seeds).
2. Hard negatives (tests/bench/dedup_bench.py ``make_hard_corpus``): originals on smooth
   gradients, cellular automata, fractals, testsrc2 / smptebars (the same luma in every video), a
   dark scene of sparse moving dots; two sentences each in *one* synthetic voice over a quiet tone
   of the video's own pitch, or a bare tone, or silence; cut into consecutive 10 s clips; the seven
   transforms planted on them, and one video whose content really repeats.

Precision and recall are measured over pairs with the shipped default thresholds.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DedupConfig, RunConfig
from pipeline.runner import run_pipeline
from pipeline.tools.samples import synth_video
from stages.dedup import (
    SIGNAL_FIELDS,
    AlignedMatches,
    CodeSet,
    choose_kept,
    cosine_pairs,
    find_duplicates,
    group_by_representative,
    rank_keys,
    signals_table,
    union_find,
)
from tests.bench.dedup_bench import (
    HARD_TRANSFORMS,
    corpus_clips,
    fingerprint_clips,
    make_hard_corpus,
    score_decisions,
    true_duplicate,
)

log = logging.getLogger(__name__)

FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
REENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-c:a", "aac", "-b:a", "64k"]
TRANSFORMS: dict[str, list[str] | None] = {
    "copy": None,
    "lowres": ["-vf", "scale=iw/2:ih/2", "-c:v", "libx264", "-preset", "veryfast", "-b:v", "120k",
               "-c:a", "aac", "-b:a", "32k"],
    "crop": ["-vf", "crop=iw*0.9:ih*0.9", *REENCODE],
    "letterbox": ["-vf", "scale=320:180,pad=320:240:0:30:black", *REENCODE],
    "bright": ["-vf", "eq=brightness=0.08:contrast=1.15", *REENCODE],
    "mirror": ["-vf", "hflip", *REENCODE],
    "trim": REENCODE,  # with -ss 1.5 before the input
}  # fmt: skip
KINDS = [["life", "gradients", "movingbox"], ["mandelbrot", "cellauto", "pan"], ["sierpinski", "life", "gradients"]]


def _transform(src: Path, name: str, out: Path) -> None:
    args = TRANSFORMS[name]
    if args is None:
        shutil.copyfile(src, out)
        return
    pre = ["-ss", "1.5"] if name == "trim" else []
    subprocess.run([*FFMPEG, *pre, "-i", str(src), *args, str(out)], check=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Input list and truth: video id -> source group (distinct videos are their own group)."""
    root = tmp_path_factory.mktemp("dedup_corpus")
    truth: dict[str, str] = {}
    records: list[dict[str, str]] = []
    for i, kinds in enumerate(KINDS):
        src = root / f"src{i}.mp4"
        synth_video(src, duration=8.0, n_scenes=3, seed=500 + i, scene_kinds=kinds, music=i == 2)
        records.append({"url": str(src), "id": f"src{i}"})
        truth[f"src{i}"] = f"src{i}"
        for name in TRANSFORMS:
            out = root / f"src{i}_{name}.mp4"
            _transform(src, name, out)
            records.append({"url": str(out), "id": f"src{i}_{name}"})
            truth[f"src{i}_{name}"] = f"src{i}"
    for i, kinds in enumerate(KINDS):  # same kind of video, other content: must stay apart
        other = root / f"other{i}.mp4"
        synth_video(other, duration=8.0, n_scenes=3, seed=700 + i, scene_kinds=kinds, music=i == 2)
        records.append({"url": str(other), "id": f"other{i}"})
        truth[f"other{i}"] = f"other{i}"
    inputs = root / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
    return inputs, truth


@pytest.fixture(scope="module")
def dedup_run(planted: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs, _ = planted
    out = tmp_path_factory.mktemp("dedup_out")
    config = RunConfig(
        stages=["download", "split", "extract", "quality", "fingerprint", "dedup"],
        split={"mode": "whole", "max_clip_seconds": 20.0},
        extract={"frames_per_clip": 2},
    )
    summary = run_pipeline(inputs, out, config, backend="sequential")
    assert summary.errors == 0
    return out


def _pair_scores(groups: dict[str, str], truth: dict[str, str]) -> tuple[float, float, list[tuple[str, str]]]:
    vids = sorted(truth)
    tp = fp = fn = 0
    missed: list[tuple[str, str]] = []
    for a, b in itertools.combinations(vids, 2):
        same_truth = truth[a] == truth[b]
        same_pred = groups[a] == groups[b]
        tp += same_truth and same_pred
        fp += same_pred and not same_truth
        fn += same_truth and not same_pred
        if same_truth and not same_pred:
            missed.append((a, b))
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), missed


def _groups(out: Path) -> tuple[dict[str, str], dict[str, str | None], set[str]]:
    """video id -> kept key of its group; key -> duplicate_of; kept keys."""
    index = pq.read_table(out / "index.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    kept = {r["key"] for r in index}
    dup_of = {r["key"]: r["duplicate_of"] for r in rejects}
    groups = {r["video_id"]: r["key"] for r in index}
    for r in rejects:
        assert r["drop_reason"] == "duplicate", r
        groups[r["video_id"]] = r["duplicate_of"]
    return groups, dup_of, kept


def test_planted_duplicates_precision_recall(dedup_run: Path, planted: tuple[Path, dict[str, str]]) -> None:
    _, truth = planted
    groups, dup_of, kept = _groups(dedup_run)
    assert set(groups) == set(truth)
    precision, recall, missed = _pair_scores(groups, truth)
    log.info("video-pair precision %.3f recall %.3f; missed %s", precision, recall, missed)
    assert precision == 1.0
    assert recall >= 0.95, missed
    # every planted copy is found (a source plus 7 copies per group), every distinct video kept
    assert len(kept) == len(KINDS) * 2
    for i in range(len(KINDS)):
        assert f"other{i}_0000" in kept


def test_duplicate_of_points_at_kept_keys(dedup_run: Path) -> None:
    _, dup_of, kept = _groups(dedup_run)
    assert dup_of, "no duplicates found"
    assert all(target in kept for target in dup_of.values())
    assert not set(dup_of) & kept


def run_signals(out: Path) -> pa.Table:
    """The signal files a run left in its output (``OUTPUT/signals/``), as one table."""
    files = sorted((out / "signals").glob("*.parquet"))
    assert files, "no signal files"
    return pa.concat_tables([pq.read_table(f, columns=[n for n, _ in SIGNAL_FIELDS]) for f in files])


def run_decisions(out: Path) -> list[dict]:
    """The decisions a run's dedup wrote (``_staging/dedup/decisions/``): clips in duplicate groups."""
    files = sorted((out / "_staging" / "dedup" / "decisions").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_signals_written_and_rerunnable(dedup_run: Path, planted: tuple[Path, dict[str, str]]) -> None:
    """The phase leaves its signals as parquet; deciding again from them gives the same answer,
    and each signal alone finds the copies it is built for."""
    table = run_signals(dedup_run)
    written = {r["key"]: r for r in run_decisions(dedup_run)}
    assert table.num_rows == len(planted[1])
    decided = find_duplicates(table, DedupConfig()).to_pylist()
    grouped = {r["group"] for r in decided if r["duplicate_of"]}
    assert {r["key"] for r in decided if r["duplicate_of"] or r["key"] in grouped} == set(written)
    for r in decided:
        assert written.get(r["key"], {}).get("duplicate_of") == r["duplicate_of"]
    by_key = {r["key"]: r for r in decided}
    for r in decided:
        log.info("%s -> %s via %s", r["key"], r["duplicate_of"], ",".join(r["signals"]) or "-")
    # byte copies are exact duplicates; the mirror flip is found by frames (audio matches too)
    assert "exact" in by_key["src0_copy_0000"]["signals"]
    assert "frames" in by_key["src1_mirror_0000"]["signals"]
    frames_only = {r["key"]: r["duplicate_of"] for r in find_duplicates(table, DedupConfig(audio=False)).to_pylist()}
    audio_only = {
        r["key"]: r["duplicate_of"]
        for r in find_duplicates(table, DedupConfig(frames=False, exact=False)).to_pylist()
    }  # fmt: skip
    for name in ("crop", "letterbox", "bright", "mirror", "trim"):
        assert frames_only[f"src0_{name}_0000"] is not None, name
    for name in ("lowres", "crop", "mirror", "trim"):
        assert audio_only[f"src1_{name}_0000"] is not None, name


@pytest.mark.parametrize("keep", ["earliest", "longest", "resolution"])
def test_keep_rule(dedup_run: Path, keep: str) -> None:
    table = run_signals(dedup_run)
    rows = {r["key"]: r for r in table.to_pylist()}
    decided = find_duplicates(table, DedupConfig(keep=keep)).to_pylist()
    members: dict[str, list[str]] = {}
    for r in decided:
        members.setdefault(r["duplicate_of"] or r["key"], []).append(r["key"])
    for kept_key, keys in members.items():
        assert rows[kept_key]["key"] == kept_key
        if keep == "earliest":
            assert rows[kept_key]["input_index"] == min(rows[k]["input_index"] for k in keys)
        elif keep == "longest":
            assert rows[kept_key]["duration"] == pytest.approx(max(rows[k]["duration"] for k in keys))
        else:
            assert rows[kept_key]["pixels"] == max(rows[k]["pixels"] for k in keys)
    if keep == "earliest":
        assert {k for k in members if k.startswith("src")} == {"src0_0000", "src1_0000", "src2_0000"}
    if keep == "longest":  # the trimmed copies are 1.5 s shorter: never kept
        assert not any(k.endswith("_trim_0000") for k in members)
    if keep == "resolution":  # half-resolution copies are never kept
        assert not any(k.endswith("_lowres_0000") for k in members)


def test_keep_quality_score_then_ties() -> None:
    keys = ["a", "b", "c", "d"]
    rank = rank_keys(
        "quality",
        quality=np.array([0.2, 0.9, np.nan, 0.9]),
        duration=np.array([10.0, 5.0, 20.0, 8.0]),
        pixels=np.array([100, 100, 100, 100]),
        input_index=np.arange(4),
        clip_index=np.zeros(4),
        keys=keys,
    )
    # d and b tie on quality; d is longer. A missing score ranks last.
    assert list(np.argsort(rank)) == [3, 1, 0, 2]
    labels = union_find(4, np.array([[0, 1], [1, 2], [2, 3]]))
    assert list(choose_kept(labels, rank)) == [3, 3, 3, -1]


def test_union_find_groups_transitively() -> None:
    labels = union_find(6, np.array([[0, 1], [3, 4], [1, 2]]))
    assert labels[0] == labels[1] == labels[2]
    assert labels[3] == labels[4]
    assert len(set(labels.tolist())) == 3


def _code_set(clips: list[tuple[np.ndarray, np.ndarray]]) -> CodeSet:
    codes = np.concatenate([c for c, _ in clips])
    owner = np.repeat(np.arange(len(clips)), [len(c) for c, _ in clips])
    return CodeSet(
        "test", codes, np.arange(len(codes)), owner, np.concatenate([t for _, t in clips]).astype(np.float64),
        np.arange(len(codes)), len(clips),
    )  # fmt: skip


def test_aligned_matches_need_one_offset_and_see_mirrors() -> None:
    """A copy's matches share one time offset; the same codes at scattered times are chance."""
    rng = np.random.default_rng(0)
    mask = 0xAAAAAAAAAAAAAAAA
    a = rng.integers(0, 2**63, size=10, dtype=np.uint64)
    t = np.arange(10) * 0.5
    clips = [
        (a, t),
        (a[2:8] ^ np.uint64(mask), t[2:8] + 1.0),  # 1: mirrored copy of 6 codes, 1 s later
        (rng.integers(0, 2**63, size=10, dtype=np.uint64), t),  # 2: unrelated
        (a[rng.permutation(10)], t),  # 3: the same codes in another order: no common offset
    ]
    m = AlignedMatches(_code_set(clips), radius=4, max_clips=10, tolerance=0.2, mirror_mask=mask)
    ev = m.evidence(0, 1, 5.0, 5.0)
    assert ev.offset == pytest.approx(1.0)
    assert ev.matched_a == 6 and ev.ratio == pytest.approx(1.0)  # all of clip 1's units, at one offset
    assert m.evidence(0, 2, 5.0, 5.0).matched_a == 0
    shuffled = m.evidence(0, 3, 5.0, 5.0)
    assert shuffled.matched_a <= 3 and shuffled.ratio < 0.5  # far from the 10 of 10 of a real copy
    plain = AlignedMatches(_code_set(clips), radius=4, max_clips=10, tolerance=0.2)
    assert plain.evidence(0, 1, 5.0, 5.0).matched_a == 0  # without mirrored queries nothing matches


def test_common_codes_are_ignored() -> None:
    """A code shared by more clips than max_clips (a logo, a test card) is no evidence."""
    rng = np.random.default_rng(1)
    logo = rng.integers(0, 2**63, size=1, dtype=np.uint64)
    clips = []
    for _ in range(6):
        own = rng.integers(0, 2**63, size=4, dtype=np.uint64)
        clips.append((np.concatenate([logo, own]), np.arange(5) * 0.5))
    m = AlignedMatches(_code_set(clips), radius=2, max_clips=3, tolerance=0.2)
    assert m.common.sum() == 6  # the logo in every clip
    assert len(m.candidate_pairs(1)) == 0


def test_groups_do_not_chain_through_one_link() -> None:
    """0~1 and 1~2 but not 0~2: union-find merges all three, grouping by representative does not."""
    pairs = np.array([[0, 1], [1, 2], [3, 4]])
    rank = np.array([0, 1, 2, 3, 4])
    rep = group_by_representative(5, pairs, rank)
    assert rep.tolist() == [0, 0, 2, 3, 3]
    labels = union_find(5, pairs)
    assert labels[0] == labels[2]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_cosine_pairs_find_planted_near_copies(kind: str) -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 64)).astype(np.float32)
    x = centers[rng.integers(0, 20, 3000)] + 0.6 * rng.normal(size=(3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = x[:100] + 0.02 * rng.normal(size=(100, 64)).astype(np.float32)  # cosine ~0.99
    data = np.concatenate([x, copies])
    pairs, sims = cosine_pairs(data, 0.95, kind, neighbors=16, nprobe=8)
    planted = {(i, 3000 + i) for i in range(100)}
    truth_pairs, _ = cosine_pairs(data, 0.95, "flat")
    truth = {tuple(p) for p in truth_pairs.tolist()}
    assert planted <= truth
    found = {tuple(p) for p in pairs.tolist()}
    assert found <= truth  # approximate indexes may miss pairs, never invent them
    assert len(found & truth) / len(truth) >= 0.95
    assert np.all(sims >= 0.95)


def test_semantic_embeddings_dedup_through_stage(tmp_path: Path) -> None:
    """Rows with visual embeddings only: near-identical embeddings merge, others stay apart."""
    from pipeline.stage import StageContext, map_in_process
    from stages.dedup import DedupStage

    rng = np.random.default_rng(2)
    base = rng.normal(size=(4, 32)).astype(np.float32)
    rows = []
    for i, vec in enumerate([base[0], base[1], base[0] + 0.01, base[2], base[3], base[1] * 2.0]):
        rows.append({
            "key": f"v{i}_0000", "video_id": f"v{i}", "input_index": i, "clip_index": 0,
            "clip_start": 0.0, "clip_end": 5.0, "visual_embedding": vec.tolist(),
        })  # fmt: skip
    stage = DedupStage(DedupConfig(), StageContext(staging_dir=str(tmp_path)))
    stage.setup()
    # the engine's three calls: signals per partition (two here), one decision, updates per partition
    for p, part in ((0, rows[:3]), (1, rows[3:])):
        pq.write_table(stage.phase_signals(part), tmp_path / f"{p:06d}-x.parquet")
    summary = stage.decide([str(tmp_path / "000000-x.parquet"), str(tmp_path / "000001-x.parquet")], [], map_in_process)
    assert summary["duplicates"] == 2 and summary["method"] == "single"
    out = stage.apply_partition(0, rows[:3]) + stage.apply_partition(1, rows[3:])
    assert out[2] == {"drop_reason": "duplicate", "duplicate_of": "v0_0000"}
    assert out[5] == {"drop_reason": "duplicate", "duplicate_of": "v1_0000"}
    assert out[0] == out[1] == out[3] == out[4] == {}
    assert stage.process_batch(rows) == out  # the same decision on rows in memory


@pytest.mark.timeout(900)
def test_dedup_on_ray(tmp_path: Path) -> None:
    """The global phase gathers rows streamed by the Ray runner (fixed 3 s windows, per-window groups)."""
    src, other = tmp_path / "src.mp4", tmp_path / "other.mp4"
    synth_video(src, duration=6.0, n_scenes=2, seed=900, scene_kinds=["life", "movingbox"])
    synth_video(other, duration=6.0, n_scenes=2, seed=901, scene_kinds=["life", "movingbox"])
    shutil.copyfile(src, tmp_path / "copy.mp4")
    _transform(src, "mirror", tmp_path / "mirror.mp4")
    names = ["src", "copy", "mirror", "other"]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"url": str(tmp_path / f"{n}.mp4"), "id": n}) + "\n" for n in names))
    config = RunConfig(
        stages=["download", "split", "extract", "quality", "fingerprint", "dedup"],
        split={"mode": "fixed", "clip_seconds": 3.0, "min_clip_seconds": 1.0},
        extract={"frames_per_clip": 1},
        ray={"num_cpus": 4},
    )
    summary = run_pipeline(inputs, tmp_path / "out", config, backend="ray")
    assert summary.errors == 0
    _, dup_of, kept = _groups(tmp_path / "out")
    assert {"src_0000", "src_0001", "other_0000", "other_0001"} <= kept
    assert dup_of["copy_0000"] == "src_0000" and dup_of["copy_0001"] == "src_0001"
    assert dup_of["mirror_0000"] == "src_0000"
    # a cut moved to a pause can leave a short tail clip with no informative frame or sound:
    # nothing perceptual to match it by, so only a clip that carries codes must be found
    signals = {r["key"]: r for r in run_signals(tmp_path / "out").to_pylist()}
    if signals["mirror_0001"]["frame_hashes"] or signals["mirror_0001"]["audio_fingerprint"]:
        assert dup_of["mirror_0001"] == "src_0001"
    assert set(dup_of) <= {"copy_0000", "copy_0001", "mirror_0000", "mirror_0001"}


# --------------------------------------------------------------------------- hard negatives


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    """The hard-negative corpus: 10 originals, the 7 transforms on originals 0-6, one looping video."""
    root = tmp_path_factory.mktemp("dedup_hard")
    corpus = make_hard_corpus(root / "media", originals=10, copies=len(HARD_TRANSFORMS), seed=3)
    rows = fingerprint_clips(corpus_clips(corpus), root / "staging")
    decided = find_duplicates(signals_table(rows, "quality"), DedupConfig()).to_pylist()
    return rows, decided


@pytest.mark.timeout(900)
def test_hard_negatives_no_false_duplicates(hard: tuple[list[dict], list[dict]]) -> None:
    rows, decided = hard
    result = score_decisions(rows, decided)
    for d in decided:
        if d["duplicate_of"]:
            log.info("%s -> %s: %s", d["key"], d["duplicate_of"], d["evidence"])
    log.info("hard negatives: %s", {k: v for k, v in result.items() if k not in ("false_pairs", "missed_pairs")})
    assert result["false_pairs"] == [], result["false_pairs"]
    assert result["mark_precision"] == 1.0
    # consecutive clips of one video are never duplicates, unless the content repeats (the loop)
    by_key = {d["key"]: d for d in decided}
    for r in rows:
        if r["clip_index"] == 1 and r["video_id"] != "loop":
            first = by_key[f"{r['video_id']}_0000"]
            assert by_key[r["key"]]["group"] != first["group"], r["key"]


@pytest.mark.timeout(900)
def test_hard_corpus_planted_transforms_found(hard: tuple[list[dict], list[dict]]) -> None:
    rows, decided = hard
    result = score_decisions(rows, decided)
    assert result["recall"] >= 0.95, result["missed_pairs"]
    truth = {r["key"]: r["_truth"] for r in rows}
    group = {d["key"]: d["group"] for d in decided}
    found = set()
    for r in rows:  # every transform is found on at least one clip of its copy
        name = r["video_id"].split("_", 1)[1] if "_" in r["video_id"] else None
        if name in HARD_TRANSFORMS and any(
            group[k] == group[r["key"]] and k != r["key"] and true_duplicate(truth[k], truth[r["key"]]) for k in group
        ):
            found.add(name)
    assert found == set(HARD_TRANSFORMS)
    assert group["loop_0000"] == group["loop_0001"]  # content that really repeats is a duplicate

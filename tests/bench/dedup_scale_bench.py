"""The distributed dedup job on synthetic signal files: wall time, per-process memory, precision/recall.

    python -m tests.bench.dedup_scale_bench --clips 100000 --files 50 --workdir /tmp/dedup_scale
    python -m tests.bench.dedup_scale_bench --clips 1000000 --files 200 --workdir /tmp/dedup_scale

Synthetic signals (``synth_signals``), written as parquet files in the engine's layout
(``{partition:06d}-synth.parquet`` with a ``partition`` column), per clip: 4 frames x 2 scales of
64-bit frame codes (one frame every 2 s of a 10 s clip), 8 audio codes (one a second), a 32-d
visual embedding and a content hash. That is ~1/10 of a real clip's codes (~42 frames x 2 and
~300 audio codes): the same kind of work per code at a tenth of the volume, so 10^6 clips fit
this 2-core VM. Each code gets a ``code_times`` / ``hash_times`` entry.

Planted duplicates (a copy of a random original): exact (same hash and codes), bit-flipped
(every code 0-4 bits flipped, some 5-8), mirrored frames (frames XOR the mirror mask, flipped),
trimmed (starts 1 s later, codes flipped), and semantic only (fresh codes, an embedding at
cosine ~0.97). Hard negatives: frames copied but different informative audio (the contradiction
veto must refuse it), half the units copied (below the 0.8 match ratio), the same codes in reverse
time order (no common offset), and logos / jingles (one frame unit and one audio unit shared by
more than 3x the common-code limit of clips: common, no evidence).

The decision runs through ``stages._dedup_scale.DistributedJob`` with a process pool as
``run_map`` (2 processes): each task reports its process's peak RSS (``ru_maxrss``), so the
table shows the largest worker process per step and the driver's own peak. Quality: the links
of the distributed job restricted to a random subsample of whole families (~``--sample`` clips)
against the single-machine path on that subsample with exact search: exact brute force (every
code pair within the radius and every embedding pair above the threshold is looked at; the Hamming
search of ~10^6 codes is ``stages.dedup.split_hamming_pairs``, exact by pigeonhole: the whole
brute force of a 10^5-clip subsample took 95 s here; with flat search it is ~14 min on an idle
machine (0.43 ns per code pair) and ran over an hour under a load of 8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DedupConfig
from stages.fingerprint import MIRROR_MASK

log = logging.getLogger("dedup_scale_bench")

FRAME_UNITS, SCALES, AUDIO_UNITS, DIM = 4, 2, 8, 32
FRAME_T0, FRAME_STEP, AUDIO_T0, AUDIO_STEP, CLIP_SECONDS = 0.5, 2.0, 0.25, 1.0, 10.0
COPY_KINDS = ("exact", "flipped", "mirrored", "trimmed", "semantic")
NEGATIVE_KINDS = ("veto", "half", "reversed")


def _codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random 64-bit codes."""
    return rng.integers(0, 2**32, size=shape, dtype=np.uint64) << np.uint64(32) | rng.integers(0, 2**32, size=shape, dtype=np.uint64)


def _flip(codes: np.ndarray, rng: np.random.Generator, max_bits: int) -> np.ndarray:
    """Flip 0-4 random bits of each code (0-``max_bits`` for one code in ten)."""
    out = codes.copy()
    nbits = rng.integers(0, 5, size=codes.shape)
    big = rng.random(codes.shape) < 0.1
    nbits[big] = rng.integers(min(5, max_bits), max_bits + 1, size=int(big.sum()))
    for k in range(max_bits):
        bit = rng.integers(0, 64, size=codes.shape).astype(np.uint64)
        out ^= np.where(nbits > k, np.uint64(1) << bit, np.uint64(0))  # a repeated bit flips back: ~k bits
    return out


def synth_signals(n: int, seed: int = 0, copy_fraction: float = 0.08, negative_fraction: float = 0.06,
                  cfg: DedupConfig | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Columns of ``n`` synthetic clips and the truth (planted pairs, families, kinds)."""
    cfg = cfg or DedupConfig()
    rng = np.random.default_rng(seed)
    frames = _codes(rng, (n, FRAME_UNITS, SCALES))
    audio = _codes(rng, (n, AUDIO_UNITS))
    ftimes = np.tile(FRAME_T0 + FRAME_STEP * np.arange(FRAME_UNITS), (n, 1)).astype(np.float32)
    atimes = np.tile(AUDIO_T0 + AUDIO_STEP * np.arange(AUDIO_UNITS), (n, 1)).astype(np.float32)
    fvalid = np.ones((n, FRAME_UNITS), bool)
    avalid = np.ones((n, AUDIO_UNITS), bool)
    centres = rng.normal(size=(max(1, n // 500), DIM)).astype(np.float32)
    emb = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    duration = np.full(n, CLIP_SECONDS)
    hashes = np.array([f"{h:016x}" for h in rng.integers(0, 2**63, size=n).tolist()], dtype=object)
    kind = np.array(["original"] * n, dtype=object)
    source = np.full(n, -1, np.int64)
    n_copy, n_neg = int(n * copy_fraction), int(n * negative_fraction)
    derived = rng.permutation(n)[: n_copy + n_neg]
    originals = np.setdiff1d(np.arange(n), derived)
    src = rng.choice(originals, size=len(derived))
    for j, (row, s) in enumerate(zip(derived.tolist(), src.tolist(), strict=True)):
        k = COPY_KINDS[j % len(COPY_KINDS)] if j < n_copy else NEGATIVE_KINDS[j % len(NEGATIVE_KINDS)]
        kind[row], source[row] = k, s
    for k in (*COPY_KINDS, *NEGATIVE_KINDS):
        rows = np.flatnonzero(kind == k)
        s = source[rows]
        if k == "exact":
            frames[rows], audio[rows], hashes[rows] = frames[s], audio[s], hashes[s]
            emb[rows] = emb[s]
        elif k in ("flipped", "mirrored", "trimmed"):
            frames[rows] = _flip(frames[s] ^ (np.uint64(MIRROR_MASK) if k == "mirrored" else np.uint64(0)), rng, 8)
            audio[rows] = _flip(audio[s], rng, 8)
            emb[rows] = emb[s] + 0.04 * rng.normal(size=(len(rows), DIM)).astype(np.float32) * np.linalg.norm(
                emb[s], axis=1, keepdims=True) / np.sqrt(DIM)  # fmt: skip
            if k == "trimmed":  # starts 1 s later: every time 1 s earlier, the first units gone
                ftimes[rows] -= 1.0
                atimes[rows] -= 1.0
                fvalid[rows] = ftimes[rows] >= 0
                avalid[rows] = atimes[rows] >= 0
                duration[rows] = CLIP_SECONDS - 1.0
        elif k == "semantic":
            emb[rows] = emb[s] + 0.04 * rng.normal(size=(len(rows), DIM)).astype(np.float32) * np.linalg.norm(
                emb[s], axis=1, keepdims=True) / np.sqrt(DIM)  # fmt: skip
        elif k == "veto":  # the same picture, different (informative) sound
            frames[rows] = _flip(frames[s], rng, 4)
        elif k == "half":  # half the units copied, at the same times
            frames[rows, : FRAME_UNITS // 2] = frames[s, : FRAME_UNITS // 2]
            audio[rows, : AUDIO_UNITS // 2] = audio[s, : AUDIO_UNITS // 2]
        elif k == "reversed":  # the same codes, no common time offset
            frames[rows] = frames[s][:, ::-1]
            audio[rows] = audio[s][:, ::-1]
    # logos and jingles: shared by 3x the common-code limit of clips
    limit = max(cfg.common_code_clips, int(np.ceil(cfg.common_code_share * n)))
    logos = max(1, n // 200 // (3 * limit + 1))
    carriers = rng.permutation(n)[: logos * (3 * limit + 1)].reshape(logos, -1)
    for m, rows in enumerate(carriers):
        logo = _codes(rng, (SCALES + 1,))
        rows = rows[kind[rows] == "original"]
        frames[rows, FRAME_UNITS - 1] = logo[:SCALES]
        audio[rows, AUDIO_UNITS - 1] = logo[SCALES]
    columns = {
        "frames": frames, "ftimes": ftimes, "fvalid": fvalid, "audio": audio, "atimes": atimes, "avalid": avalid,
        "emb": emb, "duration": duration, "hashes": hashes,
    }  # fmt: skip
    family = np.where(source >= 0, source, np.arange(n))
    return columns, {"kind": kind, "source": source, "family": family, "logos": logos, "logo_clips": 3 * limit + 1}


def _lists(values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    per_row = valid.reshape(len(valid), -1)
    flat = values.reshape(len(values), per_row.shape[1], -1)[per_row].reshape(-1)
    width = flat.size // max(1, per_row.sum())
    offsets = np.r_[0, np.cumsum(per_row.sum(axis=1) * width)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))


def signal_table(cols: dict[str, np.ndarray], rows: np.ndarray, partition: int) -> pa.Table:
    """The signal table of ``rows`` (``stages.dedup.SIGNAL_FIELDS`` plus ``partition``)."""
    n = len(rows)
    fv = cols["fvalid"][rows]
    frames = cols["frames"][rows].view(np.int64)
    times = np.repeat(cols["ftimes"][rows][:, :, None], 1, axis=2)
    return pa.table({
        "key": [f"c{r:08d}" for r in rows.tolist()],
        "input_index": pa.array(rows // 2, pa.int64()),
        "clip_index": pa.array(rows % 2, pa.int64()),
        "duration": pa.array(cols["duration"][rows], pa.float64()),
        "pixels": pa.array(np.full(n, 640 * 360), pa.int64()),
        "quality": pa.array(((rows * 2654435761) % 1000) / 1000.0, pa.float64()),
        "content_hash": pa.array(cols["hashes"][rows].tolist(), pa.string()),
        "frame_hashes": _lists(frames, np.repeat(fv[:, :, None], SCALES, axis=2), pa.int64()),
        "hash_times": _lists(times, fv, pa.float32()),
        "audio_fingerprint": _lists(cols["audio"][rows].view(np.int64), cols["avalid"][rows], pa.int64()),
        "code_times": _lists(cols["atimes"][rows], cols["avalid"][rows], pa.float32()),
        "visual_embedding": _lists(cols["emb"][rows], np.ones((n, 1), bool), pa.float32()),
        "text_embedding": pa.array([[]] * n, pa.list_(pa.float32())),
        "partition": pa.array(np.full(n, partition), pa.int64()),
    })  # fmt: skip


def write_files(cols: dict[str, np.ndarray], n: int, files: int, folder: Path, seed: int = 0) -> list[str]:
    """The clips in random order over ``files`` signal files (``{partition:06d}-synth.parquet``)."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed + 1).permutation(n)
    uris = []
    for p, rows in enumerate(np.array_split(order, files)):
        uri = folder / f"{p:06d}-synth.parquet"
        pq.write_table(signal_table(cols, np.sort(rows), p), uri)
        uris.append(str(uri))
    return uris


# --------------------------------------------------------------------------- process-pool map


def _measured(fn: Any, item: Any) -> tuple[Any, int, int, float]:
    t0 = time.process_time()
    out = fn(item)
    return out, os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.process_time() - t0


class PoolMap:
    """A ``MapFn`` over a process pool that records each worker process's peak RSS and CPU time."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self.peak: dict[int, int] = {}
        self.cpu = 0.0
        self.calls: list[dict[str, Any]] = []

    def __call__(self, fn: Any, items: Any) -> list[Any]:
        import functools

        t0 = time.perf_counter()
        results = list(self.pool.map(functools.partial(_measured, fn), list(items)))
        name = getattr(getattr(fn, "func", fn), "__name__", str(fn))
        kinds = sorted({i[0] for i in items if isinstance(i, tuple) and i and isinstance(i[0], str)})
        if name == "_run_task":
            name = "+".join(kinds)
        peak = 0
        step_cpu = 0.0
        for _, pid, rss, cpu in results:
            self.peak[pid] = max(self.peak.get(pid, 0), rss)
            peak = max(peak, rss)
            step_cpu += cpu
        self.cpu += step_cpu
        self.calls.append({"step": name, "tasks": len(results), "seconds": round(time.perf_counter() - t0, 2),
                           "cpu_seconds": round(step_cpu, 1), "worker_peak_rss_mib": round(peak / 2**20, 1)})  # fmt: skip
        return [r[0] for r in results]

    def close(self) -> None:
        self.pool.shutdown()


# --------------------------------------------------------------------------- quality


def subsample(truth: dict[str, Any], n: int, size: int, seed: int = 2) -> np.ndarray:
    """Rows of whole families (an original with its planted copies and negatives), ~``size`` of them."""
    rng = np.random.default_rng(seed)
    fam = truth["family"]
    chosen = rng.permutation(np.unique(fam))[: max(1, int(len(np.unique(fam)) * size / n))]
    return np.flatnonzero(np.isin(fam, chosen))


def compare(found: dict[tuple[str, str], Any], truth: dict[tuple[str, str], Any], keys: set[str]) -> dict[str, Any]:
    got = {frozenset(p) for p in found if p[0] in keys and p[1] in keys}
    want = {frozenset(p) for p in truth}
    tp = len(got & want)
    return {"true_links": len(want), "found_links": len(got), "correct": tp,
            "precision": round(tp / max(1, len(got)), 4), "recall": round(tp / max(1, len(want)), 4)}  # fmt: skip


def planted_recall(found: dict[tuple[str, str], Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Per planted kind: share of (source, copy) pairs linked; per negative kind: share linked (should be 0)."""
    linked = {frozenset(p) for p in found}
    out: dict[str, Any] = {}
    for k in (*COPY_KINDS, *NEGATIVE_KINDS):
        rows = np.flatnonzero(truth["kind"] == k)
        hit = sum(frozenset((f"c{r:08d}", f"c{s:08d}")) in linked for r, s in zip(rows, truth["source"][rows], strict=True))
        out[k] = round(hit / max(1, len(rows)), 4)
    return out


def _generate(clips: int, files: int, seed: int, work: str, cfg_json: str) -> None:
    """Write the signal files and the truth (run in a child process: the job's processes and the
    driver never hold the generated corpus)."""
    cfg = DedupConfig(**json.loads(cfg_json))
    cols, truth = synth_signals(clips, seed, cfg=cfg)
    root = Path(work)
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_files(cols, clips, files, root / "signals", seed)
        (root / "done").write_text("")
    np.savez(root / "truth.npz", kind=truth["kind"].astype(str), source=truth["source"], family=truth["family"])


def _subsample_table(uris: list[str], keys: set[str]) -> pa.Table:
    """The signal rows of ``keys``, in file order (the order the job numbers clips in)."""
    import pyarrow.compute as pc

    from stages._dedup_scale import SIGNAL_NAMES

    value_set = pa.array(sorted(keys), pa.string())
    return pa.concat_tables(
        [t.filter(pc.is_in(t.column("key"), value_set=value_set)) for t in (pq.read_table(u, columns=SIGNAL_NAMES) for u in uris)]
    )


def brute_force_table_links(table: pa.Table, cfg: DedupConfig) -> dict[tuple[str, str], set[str]]:
    """The single-machine rule with exact search: links by key.

    Embeddings: flat (exact) cosine search. Hamming codes: ``verified_links``' own search, exact
    whichever way ``stages.dedup.hamming_pairs_dist`` runs it (flat, or split by pigeonhole for
    large inputs: same pairs); no LSH or approximate index as in the distributed job.
    """
    from stages.dedup import add_semantic_links, verified_links

    exact_cfg = cfg.model_copy(update={"index": "flat"})
    links, _, _ = verified_links(table, exact_cfg)
    if exact_cfg.semantic:
        add_semantic_links(table, exact_cfg, links)
    keys = table.column("key").to_pylist()
    return {(keys[a], keys[b]): set(v) for (a, b), v in links.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing

    from stages._dedup_scale import DistributedJob, SignalFile, _count_rows
    from tests.bench.dedup_bench import PeakRSS

    cfg = DedupConfig(job="distributed", **json.loads(args.config))
    work = Path(args.workdir) / f"n{args.clips}_f{args.files}_s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as gen:
        gen.submit(_generate, args.clips, args.files, args.seed, str(work), args.config).result()
    t_gen = time.perf_counter() - t0
    uris = sorted(str(p) for p in (work / "signals").glob("*.parquet"))
    files = [SignalFile(u, i, False) for i, u in enumerate(uris)]
    counts = [_count_rows(u) for u in uris]
    pool = PoolMap(args.workers)  # spawned processes: their memory is the tasks' alone
    load0 = os.getloadavg()
    t1 = time.perf_counter()
    cpu_driver0 = time.process_time()
    with PeakRSS(interval=0.2) as driver_mem:
        job = DistributedJob(files, counts, cfg, str(work / "staging" / "dedup" / "decisions"), pool)
        summary = job.run()
    wall = time.perf_counter() - t1
    cpu_driver = time.process_time() - cpu_driver0
    pool.close()
    load1 = os.getloadavg()
    links = job.read_links()  # after the measurement: the job's driver never holds them
    npz = np.load(work / "truth.npz")  # the truth too (it grows with N): the driver's RSS is the job's
    truth = {"kind": npz["kind"].astype(object), "source": npz["source"], "family": npz["family"]}
    result: dict[str, Any] = {
        "clips": args.clips, "files": args.files, "workers": args.workers, "generate_seconds": round(t_gen, 1),
        "wall_seconds": round(wall, 1), "cpu_seconds_workers": round(pool.cpu, 1),
        "cpu_seconds_driver": round(cpu_driver, 1),
        "worker_peak_rss_mib": round(max(pool.peak.values()) / 2**20, 1),
        "driver_rss_mib_before_peak": [round(driver_mem.start / 2**20, 1), round(driver_mem.peak / 2**20, 1)],
        "load_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "steps": pool.calls, "summary": summary, "planted": planted_recall(links, truth),
        "codes_per_clip": {"frames": FRAME_UNITS * SCALES, "audio": AUDIO_UNITS, "embedding_dim": DIM},
        "config": json.loads(args.config),
    }  # fmt: skip
    if args.sample:
        rows = subsample(truth, args.clips, args.sample)
        keys = {f"c{r:08d}" for r in rows.tolist()}
        t2 = time.perf_counter()
        exact = brute_force_table_links(_subsample_table(uris, keys), cfg)
        result["brute_force_seconds"] = round(time.perf_counter() - t2, 1)
        result["quality"] = {"sample_clips": len(rows), **compare(links, exact, keys)}
        result["quality_per_signal"] = {
            s: compare({p: v for p, v in links.items() if s in v}, {p: v for p, v in exact.items() if s in v}, keys)
            for s in ("exact", "frames", "audio", "semantic:visual_embedding")
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=50, help="signal files (input partitions)")
    ap.add_argument("--workers", type=int, default=2, help="processes of the pool (run_map)")
    ap.add_argument("--sample", type=int, default=100_000, help="clips of the brute-force subsample (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/dedup_scale")
    ap.add_argument("--config", default="{}", help="DedupConfig overrides as JSON, e.g. '{\"lsh_bands\": 2}'")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

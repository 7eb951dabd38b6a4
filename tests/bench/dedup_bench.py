"""Dedup at 1 M: semantic (512-d embeddings) and perceptual (64-bit fingerprints) near-duplicates.

Run from the repository root::

    python -m tests.bench.dedup_bench                         # 1 M embeddings + 1 M codes
    python -m tests.bench.dedup_bench --embeddings 200000 --codes 200000 --methods ivf,ivfpq,hnsw
    python -m tests.bench.dedup_bench --nprobe 2,4 --json /tmp/dedup_bench.json
    python -m tests.bench.dedup_bench --embeddings 0 --radius 7        # codes only, smaller radius

Data (synthetic, seeded): embeddings are unit vectors around 2000 cluster centres (like real
embeddings, which are not uniform on the sphere); a ``--dup-fraction`` share of rows are planted
near-copies of other rows (cosine ~0.97). Codes are uniform random 64-bit words, a share of them
near-copies with 0..``--radius`` flipped bits.

For every method: wall time and process CPU time of the whole dedup (index training, adding and
the all-pairs search over every row), peak resident memory of the process during it (and above
the data it started with), the number of pairs found, and recall against exact search *in the
same run*: exact search is run for ``--sample-queries`` random rows (exact all-pairs at 1 M would
take hours) and recall is the share of those rows' true pairs the method found. Approximate
methods verify candidates exactly, so their precision is 1.

Methods (see stages/dedup.py): ``ivf`` = FAISS k-means cells, each row probing its ``nprobe``
nearest cells, compared cell by cell as dense matrix products (``ivf_join_pairs``); ``ivfpq`` =
FAISS IVF-PQ kNN (``--neighbors``) re-ranked exactly; ``hnsw`` = FAISS HNSW kNN; codes:
``flat`` = brute force IndexBinaryFlat range search over all codes (exact) and ``multihash`` =
FAISS IndexBinaryMultiHash range search (exact for radius <= 4 (nflip+1) - 1; ``--binary-methods``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.dedup import cosine_pairs, hamming_pairs, ivf_join_pairs  # noqa: E402

logger = logging.getLogger("dedup_bench")


class PeakRSS:
    """Samples the process's resident memory in a thread while a block runs."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(name: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        result = fn()
    stats = {
        "method": name,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "peak_rss_gib": round(mem.peak / 2**30, 3),
        "extra_rss_gib": round((mem.peak - mem.start) / 2**30, 3),
    }
    logger.info("%s: %s", name, stats)
    return result, stats


# --------------------------------------------------------------------------- data


def synth_embeddings(n: int, d: int, dup_fraction: float, seed: int, clusters: int = 2000) -> np.ndarray:
    """Unit vectors around cluster centres; ``dup_fraction`` of rows replaced by near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    chunk = 65_536
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = centres[rng.integers(0, clusters, m)]
        block += 1.2 * rng.standard_normal((m, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s : s + m] = block
    n_dup = int(n * dup_fraction)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(n, n_dup, replace=False)
    for s in range(0, n_dup, chunk):
        a, b = src[s : s + chunk], dst[s : s + chunk]
        noise = rng.standard_normal((len(a), d), dtype=np.float32)
        noise *= 0.25 / np.linalg.norm(noise, axis=1, keepdims=True)  # cosine ~ 1 / sqrt(1 + 0.25^2) = 0.97
        block = x[a] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[b] = block
    return x


def synth_codes(n: int, dup_fraction: float, radius: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    n_dup = int(n * dup_fraction)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(n, n_dup, replace=False)
    flips = np.zeros(n_dup, np.uint64)
    k = rng.integers(0, radius + 1, n_dup)
    for j in range(radius):
        bit = rng.integers(0, 64, n_dup).astype(np.uint64)
        flips ^= np.where(k > j, np.uint64(1) << bit, np.uint64(0))  # may re-flip a bit: <= k flips
    codes[dst] = codes[src] ^ flips
    return codes


# --------------------------------------------------------------------------- recall


def _pair_set(pairs: np.ndarray, rows: set[int]) -> set[tuple[int, int]]:
    return {(a, b) for a, b in pairs.tolist() if a in rows or b in rows}


def exact_cosine_truth(x: np.ndarray, sample: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x[sample], threshold - 1e-6)
    out = set()
    for qi, q in enumerate(sample.tolist()):
        for j in ids[lims[qi] : lims[qi + 1]].tolist():
            if j != q:
                out.add((min(q, j), max(q, j)))
    return out


def exact_hamming_truth(codes: np.ndarray, sample: np.ndarray, radius: int) -> set[tuple[int, int]]:
    qi, ci = hamming_pairs(codes, radius, codes[sample], method="flat")
    rows = sample[qi]
    return {(min(a, b), max(a, b)) for a, b in zip(rows.tolist(), ci.tolist(), strict=True) if a != b}


def recall(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> float:
    return len(found & truth) / len(truth) if truth else 1.0


# --------------------------------------------------------------------------- runs


def bench_embeddings(args: argparse.Namespace) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    x = synth_embeddings(args.embeddings, args.dim, args.dup_fraction, args.seed)
    logger.info("embeddings: %d x %d generated in %.1f s", len(x), x.shape[1], time.perf_counter() - t0)
    rng = np.random.default_rng(args.seed + 1)
    sample = np.sort(rng.choice(len(x), min(args.sample_queries, len(x)), replace=False))
    truth, exact_stats = measure("exact flat (sampled queries)", lambda: exact_cosine_truth(x, sample, args.threshold))
    rows = set(sample.tolist())
    exact_stats.update({"queries": len(sample), "true_pairs": len(truth)})
    results = [exact_stats]
    for method in args.methods:
        probes = args.nprobe if method in ("ivf", "ivfpq") else [None]
        for nprobe in probes:
            label = f"{method}" + (f" nprobe={nprobe}" if nprobe else "")
            if method == "ivf":
                fn = lambda nprobe=nprobe: ivf_join_pairs(x, args.threshold, nprobe=nprobe)  # noqa: E731
            else:
                fn = lambda method=method, nprobe=nprobe: cosine_pairs(  # noqa: E731
                    x, args.threshold, method, neighbors=args.neighbors, nprobe=nprobe or 1, use_gpu=False
                )
            (pairs, _), stats = measure(label, fn)
            found = _pair_set(pairs, rows)
            stats.update({"rows": len(x), "pairs": len(pairs), "recall": round(recall(found, truth), 4),
                          "false_pairs_on_sample": len(found - truth)})  # fmt: skip
            logger.info("%s: recall %.4f, %d pairs", label, stats["recall"], len(pairs))
            results.append(stats)
    return results


def bench_codes(args: argparse.Namespace) -> list[dict[str, Any]]:
    codes = synth_codes(args.codes, args.dup_fraction, args.radius, args.seed)
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(len(codes), min(args.sample_queries, len(codes)), replace=False))
    truth, exact_stats = measure("binary flat (sampled queries)", lambda: exact_hamming_truth(codes, sample, args.radius))
    exact_stats.update({"queries": len(sample), "true_pairs": len(truth)})
    results = [exact_stats]
    methods = args.binary_methods
    rows = set(sample.tolist())
    for method in methods:
        (qi, ci), stats = measure(f"binary {method}", lambda method=method: hamming_pairs(codes, args.radius, method=method))
        keep = qi < ci
        pairs = np.stack([qi[keep], ci[keep]], axis=1)
        stats.update({"rows": len(codes), "pairs": len(pairs), "recall": round(recall(_pair_set(pairs, rows), truth), 4)})
        logger.info("binary %s: recall %.4f, %d pairs", method, stats["recall"], len(pairs))
        results.append(stats)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--dup-fraction", type=float, default=0.05)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument("--methods", default="ivf", help="comma list of ivf, ivfpq, hnsw")
    parser.add_argument("--nprobe", default="3", help="comma list of IVF probes per row")
    parser.add_argument("--neighbors", type=int, default=16)
    parser.add_argument("--sample-queries", type=int, default=2000)
    parser.add_argument("--binary-methods", default="flat,multihash", help="comma list of flat, multihash")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v]
    args.binary_methods = [m for m in args.binary_methods.split(",") if m]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import faiss

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "faiss": faiss.__version__,
                    "faiss_threads": faiss.omp_get_max_threads()},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }  # fmt: skip
    if args.embeddings:
        report["embeddings"] = bench_embeddings(args)
    if args.codes:
        report["codes"] = bench_codes(args)
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

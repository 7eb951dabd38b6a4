"""One-shot check of dedup's GPU paths (faiss-gpu) against the CPU ones, on planted near-copies.

Two searches run on a GPU when faiss has one (``faiss-gpu-cu12``, the ``gpu`` extra):

* the distributed job's per-cell search (``stages._dedup_scale.cell_search``): a kNN of
  ``neighbors`` per query (``faiss.knn_gpu``) filtered by the threshold, where the CPU runs a flat
  range search;
* the single-machine cosine search (``stages.dedup.cosine_pairs`` with ``use_gpu``): the flat
  index moved to the GPUs (``index_cpu_to_all_gpus``) and a kNN per row.

Random unit vectors around ``--centres`` centres with ``--copies`` planted near-copies (cosine
~0.97); the GPU pairs are compared with the CPU pairs (recall and precision of the pair sets, which
must both be 1.0 when no row has more than ``neighbors`` rows above the threshold) and timed.
Without a GPU it says so and exits 2 (nothing to compare). Needs faiss and numpy only.

    python tests/bench/gpu_check_dedup.py                      # from the repository root
    python -m tests.bench.gpu_check_dedup --rows 200000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from stages._dedup_scale import cell_search  # noqa: E402
from stages.dedup import _gpu_count, cosine_pairs, normalize  # noqa: E402

log = logging.getLogger("gpu_check_dedup")


def planted(rows: int, dim: int, centres: int, copies: int, seed: int = 0) -> np.ndarray:
    """Unit rows around ``centres`` centres (cosine ~0.8 to their centre), ``copies`` of them near-copies."""
    rng = np.random.default_rng(seed)
    c = normalize(rng.standard_normal((centres, dim)).astype(np.float32))
    x = c[rng.integers(0, centres, rows)] + 0.75 * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    x = normalize(x)
    src, dst = rng.choice(rows, size=(2, copies), replace=False)
    x[dst] = normalize(x[src] + 0.25 * rng.standard_normal((copies, dim)).astype(np.float32) / np.sqrt(dim))
    return x


def _pairs(qi: np.ndarray, mi: np.ndarray) -> set[tuple[int, int]]:
    return {(int(min(a, b)), int(max(a, b))) for a, b in zip(qi.tolist(), mi.tolist(), strict=True) if a != b}


def _agreement(gpu: set[tuple[int, int]], cpu: set[tuple[int, int]]) -> dict[str, Any]:
    both = len(gpu & cpu)
    return {"cpu_pairs": len(cpu), "gpu_pairs": len(gpu), "recall": round(both / max(1, len(cpu)), 4),
            "precision": round(both / max(1, len(gpu)), 4)}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    x = planted(args.rows, args.dim, args.centres, args.copies)
    out: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "gpus": _gpu_count()}
    # the distributed job's cell search: one "cell" of members, queried by every row
    members = x[: args.rows // 2]
    timings: dict[str, float] = {}
    found: dict[str, set[tuple[int, int]]] = {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        t = time.perf_counter()
        qi, mi = cell_search(x, members, args.threshold, args.neighbors, gpu)
        timings[f"cell_search_{name}_s"] = round(time.perf_counter() - t, 3)
        found[name] = _pairs(qi, mi)
    out["cell_search"] = _agreement(found["gpu"], found["cpu"]) | timings
    timings, found = {}, {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        t = time.perf_counter()
        pairs, _ = cosine_pairs(x, args.threshold, kind="flat", neighbors=args.neighbors, use_gpu=gpu,
                                flat_max_rows=args.rows)  # fmt: skip
        timings[f"cosine_pairs_{name}_s"] = round(time.perf_counter() - t, 3)
        found[name] = {(int(a), int(b)) for a, b in pairs.tolist()}
    out["cosine_pairs"] = _agreement(found["gpu"], found["cpu"]) | timings
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centres", type=int, default=500)
    ap.add_argument("--copies", type=int, default=2_000)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--neighbors", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if _gpu_count() == 0:
        print("gpu_check_dedup: faiss sees no GPU (install faiss-gpu-cu12 on a CUDA machine); nothing to compare")
        return 2
    result = run(args)
    print(json.dumps(result, indent=2))
    ok = all(result[k]["recall"] >= 0.99 and result[k]["precision"] >= 0.99 for k in ("cell_search", "cosine_pairs"))
    print("gpu_check_dedup:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

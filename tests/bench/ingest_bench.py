"""Ingest on the driver: time to the first block and the driver's peak RSS, planned blocks vs the
driver-side stream.

For each size a LIST of N URL lines is generated under /tmp (about 1 % duplicates, a comment
every 1 000 lines, one bad line every 10 000), then each mode runs in a fresh child process (the
driver), which reports its own ``getrusage(RUSAGE_SELF)`` peak RSS:

* ``stream``: today's driver-side ``pipeline.ingest.iter_partitions`` (every record parsed,
  checked and duplicate-marked on the driver); first = the first partition's rows, all = the
  whole LIST streamed (the runner's driver does that before the last partition is committed);
* ``blocks``: ``pipeline.ingest.plan_blocks`` with its scan and resolve tasks run by a pool of
  ``--workers`` processes (standing in for Ray tasks: the driver's RSS excludes them); first =
  planning plus the first block's ``read()`` (on the driver here, as a read task would on a
  worker), all = every block planned (not read: the workers read them).

Run::

    .venv/bin/python -m tests.bench.ingest_bench --sizes 1000000 10000000 --workers 2

and compare ``first_s`` (time from the start to the first block's rows) and ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def make_list(n: int, folder: Path) -> Path:
    path = folder / f"avforge-ingest-bench-{n}.txt"
    if path.exists():
        return path
    tmp = path.with_suffix(".part")
    with tmp.open("w") as f:
        for i in range(n):
            if i % 1000 == 999:
                f.write("# a comment line\n")
            if i % 10000 == 9999:
                f.write("not a url or a file\n")
            elif i % 100 == 99:
                f.write(f"https://videos.example.org/c/{i - 50:09d}/clip.mp4\n")  # an earlier line again
            else:
                f.write(f"https://videos.example.org/c/{i:09d}/clip.mp4\n")
    os.replace(tmp, path)
    return path


def _child(mode: str, list_path: str, per: int, block_rows: int, workers: int) -> dict[str, Any]:
    from pipeline.ingest import IngestCounts, iter_partitions, plan_blocks

    counts = IngestCounts()
    started = time.monotonic()
    first_s = None
    first_rows = 0
    n = 0
    if mode == "stream":
        for _, rows in iter_partitions(list_path, per, lambda p, r: True, counts):
            if first_s is None:
                first_s, first_rows = time.monotonic() - started, len(rows)
            n += 1
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            def map_fn(fn: Any, items: Any) -> list[Any]:
                return pool.map(fn, items, chunksize=1)

            for block in plan_blocks(list_path, per, set(), None, counts, block_rows=block_rows, map_fn=map_fn):
                if first_s is None:
                    first_rows = len(block.read())
                    first_s = time.monotonic() - started
                n += 1
    all_s = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "mode": mode,
        "inputs": counts.inputs,
        "unusable": counts.unusable,
        "first_s": round(first_s or all_s, 2),
        "first_rows": first_rows,
        "all_s": round(all_s, 2),
        "units": n,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "driver_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--modes", nargs="+", default=["stream", "blocks"], choices=["stream", "blocks"])
    ap.add_argument("--workers", type=int, default=2, help="processes running the scan/resolve tasks")
    ap.add_argument("--per-partition", type=int, default=8)
    ap.add_argument("--block-rows", type=int, default=64)
    ap.add_argument("--folder", type=Path, default=Path("/tmp"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LIST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.per_partition, args.block_rows, args.workers)))
        return
    print(json.dumps({"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "workers": args.workers}))
    for n in args.sizes:
        path = make_list(n, args.folder)
        for mode in args.modes:
            cmd = [sys.executable, "-m", "tests.bench.ingest_bench", "--child", mode, str(path),
                   "--workers", str(args.workers), "--per-partition", str(args.per_partition),
                   "--block-rows", str(args.block_rows)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result = {"lines": n, "list_mb": round(path.stat().st_size / 2**20, 1), **json.loads(out)}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

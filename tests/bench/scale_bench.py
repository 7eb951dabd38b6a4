"""Driver cost as inputs grow: peak RSS and CPU time of the driver process only.

Each size runs ``run_pipeline`` in a fresh child process (the driver) over N inputs that a
stand-in stage refuses at once on the workers (``FailFast``: one error row per input, written by
the workers as errors parts), so the run measures what the driver does per input: ingest, input
blocks, manifests, commits, markers, the streamed index/rejects/errors merge and stats. The child reports its own ``getrusage(RUSAGE_SELF)``: peak RSS and user+system
CPU seconds (Ray's worker processes are not counted). Run::

    .venv/bin/python -m tests.bench.scale_bench --sizes 2000 8000 32000

and compare ``rss_ratio`` (peak RSS / the smallest size's; the bar is <= 1.15) and ``cpu_ms_per_input``
(flat or falling).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import QualityConfig
from pipeline.errors import StageError
from pipeline.stage import Row, Stage


class FailFast(Stage[QualityConfig]):
    """A stand-in first stage that refuses every input at once, in batches of 64 (a real download
    stage takes one video per task: on a 2-core machine Ray's per-task overhead, not the driver,
    would then set the pace)."""

    name: ClassVar[str] = "bench_fail_fast"
    writes: ClassVar[tuple[str, ...]] = ()

    @property
    def batch_size(self) -> int:
        return 64

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return [StageError(f"refused: {r['source_url']}", "forbidden") for r in rows]


def _one(list_path: Path, out: Path, backend: str, num_cpus: int, per_partition: int) -> dict[str, Any]:
    from pipeline import registry
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    # by its importable name, so Ray workers unpickle the class by reference
    registry.STAGES["bench_fail_fast"] = ("tests.bench.scale_bench:FailFast", "quality")
    cfg = load_config(None, [
        "stages=[bench_fail_fast]", "report.enabled=false", "ray.progress_bars=false", f"ray.num_cpus={num_cpus}",
        f"write.inputs_per_partition={per_partition}",
    ])  # fmt: skip
    started = time.monotonic()
    summary = run_pipeline(list_path, out, cfg, backend=backend)  # type: ignore[arg-type]
    wall = time.monotonic() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "inputs": summary.inputs,
        "errors": summary.errors,
        "wall_s": round(wall, 2),
        "driver_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "driver_peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "partitions": summary.stats["partitions"],
    }


def run_size(n: int, workdir: Path, backend: str, num_cpus: int, per_partition: int) -> dict[str, Any]:
    root = workdir / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lst = root / "inputs.txt"
    lst.write_text("".join(f"http://10.255.{i // 250 % 250}.{i % 250 + 1}/video_{i:07d}.mp4\n" for i in range(n)))
    cmd = [sys.executable, "-m", "tests.bench.scale_bench", "--one", str(lst), "--out", str(root / "out"),
           "--backend", backend, "--num-cpus", str(num_cpus), "--per-partition", str(per_partition)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"size {n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/avforge-scale-bench"))
    ap.add_argument("--backend", choices=["ray", "sequential"], default="ray")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the in-process Ray")
    ap.add_argument("--per-partition", type=int, default=8, help="write.inputs_per_partition")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = _one(args.one, args.out, args.backend, args.num_cpus, args.per_partition)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    rows = [run_size(n, args.workdir, args.backend, args.num_cpus, args.per_partition) for n in args.sizes]
    base = rows[0]
    header = f"{'inputs':>8} {'wall s':>8} {'driver CPU s':>13} {'CPU ms/input':>13} {'peak RSS MB':>12} {'RSS ratio':>10}"
    print(header)
    for r in rows:
        r["cpu_ms_per_input"] = round(1000 * r["driver_cpu_s"] / r["inputs"], 3)
        r["rss_ratio"] = round(r["driver_peak_rss_mb"] / base["driver_peak_rss_mb"], 3)
        print(f"{r['inputs']:>8} {r['wall_s']:>8} {r['driver_cpu_s']:>13} {r['cpu_ms_per_input']:>13} "
              f"{r['driver_peak_rss_mb']:>12} {r['rss_ratio']:>10}")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``avforge bench``: the pipeline against the ffmpeg decode floor, at several corpus sizes.

For each scale it reports video-seconds processed per wall-second, per-stage time (summed over
workers), the peak resident memory of the whole process tree (driver, Ray's daemons and
workers; RSS summed, so shared object-store pages count once per process mapping them: an upper
bound), the CPU seconds that tree used, and, in the same run, the time ``ffmpeg`` alone takes to
decode the same inputs (one process per core, the faster of ``-threads 1`` and ffmpeg's own
threading). The timed run is download + split + extract + write; the HTML report, a by-product,
is written afterwards and timed on its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.tools.samples import generate_corpus
from pipeline.tools.serve import serve_directory

log = logging.getLogger(__name__)


class PeakMemory:
    """Samples the RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self.cpu_seconds = 0.0  # CPU time the tree used between enter and exit
        self._cpu: dict[int, float] = {}  # last CPU time seen per process
        self._cpu_at_enter: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self._sample()
        self._cpu_at_enter = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        # processes that ended between samples lose at most their last 0.1 s
        self.cpu_seconds = sum(t - self._cpu_at_enter.get(pid, 0.0) for pid, t in self._cpu.items())


def decode_floor(paths: list[Path], workers: int) -> dict[str, float]:
    """Wall seconds for ffmpeg to decode every input (audio and video) to null."""

    def decode(path: Path, threads: str) -> None:
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-threads", threads, "-i", str(path), "-f", "null", "-"],
            check=True,
        )

    out = {}
    for label, threads, pool in (("one_thread_per_process", "1", workers), ("ffmpeg_threads", "0", 1)):
        started = time.perf_counter()
        with ThreadPoolExecutor(pool) as ex:
            list(ex.map(lambda p: decode(p, threads), paths))
        out[label] = time.perf_counter() - started
    return out


def _probe_seconds(paths: list[Path]) -> float:
    from stages._media import probe

    return sum(probe(p).duration for p in paths)


def _corpus(workdir: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """The bench corpus for ``count`` and ``size``, generated once and reused."""
    corpus = workdir / f"corpus_{size[0]}x{size[1]}"
    if not (corpus / "manifest.jsonl").exists() or len(list(corpus.glob("sample_*.mp4"))) != count:
        shutil.rmtree(corpus, ignore_errors=True)
        generate_corpus(corpus, count=count, seed=3, duration=20.0, width=size[0], height=size[1])
    return sorted(corpus.glob("sample_*.mp4"))


def run_bench(
    workdir: Path,
    count: int = 8,
    scales: list[int] | None = None,
    backend: str = "ray",
    size: tuple[int, int] = (1280, 720),
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    from pipeline.tools.report import write_report

    scales = scales or [1, 4]
    workdir.mkdir(parents=True, exist_ok=True)
    videos = _corpus(workdir, count, size)
    corpus = videos[0].parent
    cores = os.cpu_count() or 1
    config = load_config(None, ["download.allowed_hosts=[127.0.0.1]", "report.enabled=false", *(overrides or [])])
    if backend == "ray":
        from pipeline.ray_runner import init_ray

        init_ray(config)  # start Ray once, outside the timings
    results: dict[str, Any] = {
        "machine": {"cores": cores, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "backend": backend,
        "corpus": {"videos": count, "size": f"{size[0]}x{size[1]}", "overrides": overrides or []},
        "scales": [],
    }
    with serve_directory(corpus) as base:
        for scale in scales:
            paths = videos * scale
            seconds = _probe_seconds(paths)
            floor = decode_floor(paths, cores)
            listing = workdir / f"inputs_x{scale}.csv"
            listing.write_text("url,id\n" + "".join(f"{base}/{p.name},v{i:05d}\n" for i, p in enumerate(paths)))
            out = workdir / f"out_x{scale}"
            shutil.rmtree(out, ignore_errors=True)
            with PeakMemory() as mem:
                started = time.perf_counter()
                summary = run_pipeline(listing, out, config, backend=backend)  # type: ignore[arg-type]
                wall = time.perf_counter() - started
            started = time.perf_counter()
            write_report(out, config.report)
            report_seconds = time.perf_counter() - started
            best_floor = min(floor.values())
            entry = {
                "scale": scale,
                "videos": len(paths),
                "video_seconds": round(seconds, 2),
                "clips_kept": summary.kept,
                "errors": summary.errors,
                "wall_seconds": round(wall, 2),
                "video_seconds_per_second": round(seconds / wall, 2),
                "ffmpeg_decode_floor_seconds": {k: round(v, 2) for k, v in floor.items()},
                "ratio_to_floor": round(wall / best_floor, 2),
                "peak_rss_mb": round(mem.peak / 2**20),
                "cpu_seconds": round(mem.cpu_seconds, 2),
                "cpu_utilisation": round(mem.cpu_seconds / (wall * cores), 2),
                "report_seconds": round(report_seconds, 2),
                "stage_seconds": {k: v["seconds"] for k, v in summary.stats["runs"][-1]["stages"].items()},
            }
            results["scales"].append(entry)
            log.info("bench x%d: %s", scale, json.dumps(entry))
    (workdir / "bench.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    c = results.get("corpus", {})
    head = f"{'scale':>5} {'videos':>6} {'video s':>8} {'wall s':>7} {'vs/s':>6} {'floor s':>8} {'ratio':>6} {'peak MB':>8} {'CPU use':>7}"
    lines = [f"corpus: {c.get('videos')} videos of {c.get('size')} per 1x; {results['machine']['cores']} cores", head]
    for e in results["scales"]:
        floor = min(e["ffmpeg_decode_floor_seconds"].values())
        lines.append(
            f"{e['scale']:>5} {e['videos']:>6} {e['video_seconds']:>8.1f} {e['wall_seconds']:>7.1f} "
            f"{e['video_seconds_per_second']:>6.2f} {floor:>8.1f} {e['ratio_to_floor']:>6.2f} {e['peak_rss_mb']:>8}"
            f" {e['cpu_utilisation']:>6.0%}"
        )
        lines.append("      per stage (s, summed over workers): " + ", ".join(f"{k} {v:.1f}" for k, v in e["stage_seconds"].items()))
        lines.append(f"      report (not in wall): {e['report_seconds']:.1f} s")
    return "\n".join(lines)


def run_quality_bench(workdir: Path, **options: Any) -> tuple[dict[str, Any], str]:
    """``avforge bench --quality``: the quality benchmark (dedup, filters, WER, captions, judge
    against planted truth), implemented in ``tests/bench/quality_bench.py``; returns the results
    and a printable summary. Needs a source checkout (the benchmark lives beside the tests)."""
    import sys

    root = Path(__file__).resolve().parents[2]  # a source checkout (editable install) holds tests/ here
    if (root / "tests" / "bench" / "quality_bench.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from tests.bench.quality_bench import format_summary, run_quality_bench as run
    except ImportError as exc:
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"the quality benchmark lives in tests/bench/quality_bench.py of a source checkout ({exc}); "
            "run avforge from the repository root"
        ) from None
    results = run(workdir, **options)
    return results, format_summary(results)

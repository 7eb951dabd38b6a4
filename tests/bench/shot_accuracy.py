"""Shot boundary accuracy and speed on synthetic videos with known hard cuts.

Run from the repository root::

    python -m tests.bench.shot_accuracy                # 30 videos, report to stdout
    python -m tests.bench.shot_accuracy -n 100 --seed 3 --json out.json
    python tests/bench/shot_accuracy.py --size 1280x720  # speed at a larger size
    python -m tests.bench.shot_accuracy --degrade        # grain + heavy compression

Videos come from :func:`pipeline.tools.samples.synth_video` (1-6 scenes, 6-14 s, 24/25/29.97/30 fps,
320x180 to 640x360 unless ``--size``, scenes with heavy motion), so cut times are frame-exact.
A detected cut matches a true cut within ``--tolerance`` seconds (one-to-one, nearest first).
Reports precision, recall, F1, mean absolute timing error and analysis speed (frames/s of the
detector alone, decode included, by wall clock and per CPU-second of the process, the latter being
steadier on a shared machine; generation time is not counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.tools.samples import SampleVideo, synth_video  # noqa: E402
from stages._shots import detect_shot_boundaries  # noqa: E402

logger = logging.getLogger("shot_accuracy")

SIZES = ((320, 240), (320, 180), (480, 270), (640, 360))
RATES = (24.0, 25.0, 30000 / 1001, 30.0)


@dataclass
class Match:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: list[float] = field(default_factory=list)  # |detected - true| of each true positive

    def __iadd__(self, other: Match) -> Match:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.errors += other.errors
        return self

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def mae(self) -> float:
        return sum(self.errors) / len(self.errors) if self.errors else 0.0


def match_cuts(true_cuts: list[float], detected: list[float], tolerance: float = 0.1) -> Match:
    """One-to-one matching of detected to true cut times within ``tolerance`` (closest pairs first)."""
    pairs = sorted(
        (abs(d - t), i, j) for i, t in enumerate(true_cuts) for j, d in enumerate(detected) if abs(d - t) <= tolerance
    )
    used_t: set[int] = set()
    used_d: set[int] = set()
    m = Match()
    for err, i, j in pairs:
        if i in used_t or j in used_d:
            continue
        used_t.add(i)
        used_d.add(j)
        m.tp += 1
        m.errors.append(err)
    m.fn = len(true_cuts) - m.tp
    m.fp = len(detected) - m.tp
    return m


def make_benchmark_videos(
    out_dir: Path,
    n: int,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    audio: bool = False,
    durations: tuple[float, float] = (6.0, 14.0),
) -> list[SampleVideo]:
    """``n`` synthetic videos with varied rate, size, length and 1-6 scenes, deterministic for ``seed``."""
    videos = []
    for i in range(n):
        rng = random.Random(f"shot-bench-{seed}-{i}")
        fps = rng.choice(RATES)
        w, h = size or rng.choice(SIZES)
        duration = rng.uniform(*durations)
        n_scenes = rng.randint(1, min(6, int(duration // 1.6)))
        videos.append(
            synth_video(out_dir / f"bench_{i:03d}.mp4", duration=duration, n_scenes=n_scenes, width=w, height=h,
                        fps=fps, audio=audio, seed=seed * 10_007 + i)
        )
    return videos


def degrade(video: SampleVideo) -> None:
    """Re-encode in place with strong temporal grain (noise alls=60) and crf 32; timing unchanged."""
    tmp = video.path.with_suffix(".degraded.mp4")
    cmd = [shutil.which("ffmpeg") or "ffmpeg", "-v", "error", "-y", "-i", str(video.path), "-vf",
           "noise=alls=60:allf=t+u", "-c:v", "libx264", "-preset", "veryfast", "-crf", "32", "-c:a", "copy",
           str(tmp)]
    subprocess.run(cmd, check=True, capture_output=True)
    tmp.replace(video.path)


def run(n: int, seed: int, tolerance: float, size: tuple[int, int] | None, audio: bool,
        out_dir: Path | None = None, degraded: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="shot_bench_") as tmp:
        work = out_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        videos = make_benchmark_videos(work, n, seed, size, audio)
        if degraded:
            for v in videos:
                degrade(v)
        gen_s = time.perf_counter() - t0
        total = Match()
        frames = 0
        det_s = 0.0
        cpu_s = 0.0
        video_s = 0.0
        for v in videos:
            t, c = time.perf_counter(), time.process_time()
            cuts = detect_shot_boundaries(v.path)
            det_s += time.perf_counter() - t
            cpu_s += time.process_time() - c
            frames += round(v.duration * v.fps)
            video_s += v.duration
            m = match_cuts(v.cut_times, cuts, tolerance)
            if m.fp or m.fn:
                logger.warning("%s (%s): true %s detected %s", v.path.name, ",".join(v.scene_kinds), v.cut_times, cuts)
            total += m
    return {
        "videos": n,
        "seed": seed,
        "size": f"{size[0]}x{size[1]}" if size else "mixed",
        "degraded": degraded,
        "true_cuts": total.tp + total.fn,
        "detected": total.tp + total.fp,
        "tp": total.tp,
        "fp": total.fp,
        "fn": total.fn,
        "precision": round(total.precision, 4),
        "recall": round(total.recall, 4),
        "f1": round(total.f1, 4),
        "mae_seconds": round(total.mae, 4),
        "max_error_seconds": round(max(total.errors, default=0.0), 4),
        "tolerance_seconds": tolerance,
        "frames": frames,
        "detect_seconds": round(det_s, 3),
        "detect_cpu_seconds": round(cpu_s, 3),
        "analysis_fps": round(frames / det_s, 1) if det_s else None,
        "analysis_fps_per_cpu_second": round(frames / cpu_s, 1) if cpu_s else None,
        "times_realtime": round(video_s / det_s, 1) if det_s else None,
        "generate_seconds": round(gen_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--videos", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.1, help="seconds (default 0.1)")
    ap.add_argument("--size", default=None, help="WxH for every video (default: mixed small sizes)")
    ap.add_argument("--audio", action="store_true", help="also synthesise audio (slower, same cuts)")
    ap.add_argument("--degrade", action="store_true",
                    help="re-encode every video with strong grain and crf 32 before detection")
    ap.add_argument("--keep", type=Path, default=None, help="write the videos here instead of a temp dir")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    size: tuple[int, int] | None = None
    if args.size:
        w, h = (int(x) for x in args.size.lower().split("x"))
        size = (w, h)
    report = run(args.videos, args.seed, args.tolerance, size, args.audio, args.keep, args.degrade)
    for k, v in report.items():
        print(f"{k:>18}: {v}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

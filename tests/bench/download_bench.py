"""Download overhead: the yt-dlp child process and the per-file cost over loopback HTTP.

Run from the repository root::

    python -m tests.bench.download_bench                 # 8 files of 4 s, 320x240
    python -m tests.bench.download_bench --count 20 --json /tmp/download_bench.json

Reported: how long the child takes to be ready (Python start, yt-dlp import, YoutubeDL, extractor
patterns compiled: paid once per worker process and not charged to any input's deadline), and
the wall time per downloaded file (fetch, probe, caps), first and median, with the machine's load
average, since these figures move with it. The same stage instance serves every file, as a Ray
task worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import DownloadConfig
from pipeline.tools.samples import generate_corpus
from pipeline.tools.serve import serve_directory
from pipeline.stage import StageContext
from stages.download import DownloadStage, _Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        generate_corpus(corpus, count=args.count, seed=3, duration=args.duration)
        files = sorted(p.name for p in corpus.glob("*.mp4"))

        started = time.monotonic()
        _Worker(DownloadConfig(), root / "probe").close()
        worker_start = time.monotonic() - started

        stage = DownloadStage(DownloadConfig(allowed_hosts=["127.0.0.1"]), StageContext(str(root / "staging")))
        per_file: list[float] = []
        with serve_directory(corpus) as base:
            for i, name in enumerate(files):
                t = time.monotonic()
                (res,) = stage.process_batch([{"video_id": f"b{i}", "source_url": f"{base}/{name}", "input_index": i}])
                if isinstance(res, Exception):
                    raise SystemExit(f"download failed: {res}")
                per_file.append(time.monotonic() - t)
        stage.teardown()

    result = {
        "files": len(per_file),
        "worker_ready_s": round(worker_start, 3),
        "first_file_s": round(per_file[0], 3),
        "median_file_s": round(statistics.median(per_file[1:] or per_file), 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""ASR speed and accuracy: real-time factors per model, the ASR stage against faster-whisper called
directly on the same clips, and per-clip against whole-video transcription.

Run from the repository root::

    python -m tests.bench.asr_bench                     # 6 videos x 20 s, report to stdout
    python -m tests.bench.asr_bench -n 10 --duration 30 --json asr.json

Media: :func:`pipeline.tools.samples.generate_corpus` videos (espeak-ng sentences over a noise bed or
music, known transcripts). The pipeline (download, split, extract, asr; sequential runner, fixed
10 s clips) writes the clips' 16 kHz FLAC files, which every measurement below then reads:

* ``stage_in_pipeline``: the asr stage's own time in that run (``stats.json``);
* ``stage``: ``apply_stage(AsrStage)`` on the clip rows (the executor path every runner uses);
* ``direct_sequential``: ``WhisperModel.transcribe(path, beam_size=5, word_timestamps=True,
  vad_filter=True)`` clip by clip, the usual way to call faster-whisper;
* ``direct_batched``: ``BatchedInferencePipeline.transcribe(path, batch_size=16, ...)`` clip by clip;
* ``whole_video``: each video's whole audio track through the same engine (windows around VAD
  speech), segments then sliced to the clip times; WER against the known transcripts for both.

Each figure is given by wall clock and by this process's CPU seconds (steadier on a shared
machine), the best of ``--rounds`` interleaved rounds. RTF = processing seconds / audio seconds
(lower is faster). Every measured call is warmed up once first, except the pipeline run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import AsrConfig, load_config  # noqa: E402
from pipeline.executor import apply_stage  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402
from pipeline.tools.samples import generate_corpus  # noqa: E402
from stages._hallucination import normalize  # noqa: E402
from stages._vad import SAMPLE_RATE, SileroVad, load_audio  # noqa: E402
from stages._whisper import pick_threads, resolve_model, transcribe_audios  # noqa: E402
from stages.asr import AsrStage  # noqa: E402

logger = logging.getLogger("asr_bench")


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def wer(refs: list[str], hyps: list[str | None]) -> float:
    """Word error rate over all pairs (a missing hypothesis counts as empty)."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = normalize(ref).split(), normalize(hyp or "").split()
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors += d[len(h)]
        words += len(r)
    return errors / max(1, words)


def figure(audio_seconds: float, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "rtf_wall": round(wall / audio_seconds, 4),
        "rtf_cpu": round(cpu / audio_seconds, 4),
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--videos", type=int, default=6)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--models", default="offline:base,offline:tiny.en")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "load_avg_start": os.getloadavg()}

    with tempfile.TemporaryDirectory(prefix="asr_bench_") as tmp_name:
        tmp = Path(tmp_name)
        samples = generate_corpus(tmp / "corpus", count=args.videos, seed=args.seed, duration=args.duration)
        inputs = tmp / "inputs.txt"
        inputs.write_text("".join(f"{s.path}\n" for s in samples))
        main_model = args.models.split(",")[0]
        cfg = load_config(
            None,
            ["stages=[download,split,extract,asr]", f"asr.model={main_model}", "extract.frames_per_clip=1",
             "write.keep_staging=true", f"staging_dir={tmp / 'staging'}"],
        )  # fmt: skip
        summary, wall, _ = timed(lambda: run_pipeline(inputs, tmp / "out", cfg, backend="sequential"))
        flacs = sorted((tmp / "staging" / "clips").rglob("*.flac"))
        audio_seconds = sum(len(load_audio(f)) for f in flacs) / SAMPLE_RATE
        stage_s = summary.stats["runs"][-1]["stages"]["asr"]["seconds"]
        report["corpus"] = {"videos": len(samples), "clips": len(flacs), "audio_seconds": round(audio_seconds, 1)}
        report["stage_in_pipeline"] = figure(audio_seconds, stage_s, float("nan"), pipeline_wall_s=round(wall, 1))

        rows = [{"key": f.stem, "audio_uri": str(f), "has_audio": True} for f in flacs]
        runners = {f"stage[{m}]": stage_runner(m, rows) for m in args.models.split(",")}
        runners.update(direct_runners(main_model, flacs))
        best: dict[str, tuple[float, float]] = {}
        outputs: dict[str, Any] = {}
        for _ in range(args.rounds):  # interleaved, best of the rounds: load from other work evens out
            for name, run in runners.items():
                outputs[name], w, c = timed(run)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], w), min(old[1], c))
        for name, (w, c) in best.items():
            report[name] = figure(audio_seconds, w, c)
        index = pq.read_table(tmp / "out" / "index.parquet", columns=["key", "source_url"]).to_pylist()
        sources = {r["key"]: r["source_url"] for r in index}
        stage_rows = outputs[f"stage[{main_model}]"]
        report["whole_video"], report["wer"] = whole_vs_clips(main_model, samples, stage_rows, sources)
        stage = report[f"stage[{main_model}]"]
        for ref in ("direct_sequential", "direct_batched"):
            report[f"stage_throughput_vs_{ref}"] = {
                "by_wall": round(report[ref]["wall_s"] / stage["wall_s"], 3),
                "by_cpu": round(report[ref]["cpu_s"] / stage["cpu_s"], 3),
            }
        report["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return report


def stage_runner(model: str, rows: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
    """The ASR stage through the executor, in batches of its batch_size (set up and warmed up here)."""
    stage = AsrStage(AsrConfig(model=model))
    stage.setup()
    stage.process_batch(rows[:1])  # warm-up (first-call allocations), not timed

    def run() -> list[dict[str, Any]]:
        done = []
        for i in range(0, len(rows), stage.batch_size):
            done.extend(apply_stage(stage, rows[i : i + stage.batch_size]))
        return done

    return run


def direct_runners(model: str, flacs: list[Path]) -> dict[str, Callable[[], int]]:
    """faster-whisper called directly, clip by clip: plain and batched (set up and warmed up here)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    cfg = AsrConfig(model=model)
    fw = WhisperModel(resolve_model(model), device="cpu", compute_type="int8", cpu_threads=pick_threads(cfg))
    batched = BatchedInferencePipeline(fw)
    list(fw.transcribe(str(flacs[0]), beam_size=5)[0])  # warm-up, not timed

    def sequential() -> int:
        n = 0
        for f in flacs:
            segs, _ = fw.transcribe(str(f), beam_size=5, word_timestamps=True, vad_filter=True)
            n += len(list(segs))
        return n

    def in_batches() -> int:
        n = 0
        for f in flacs:
            segs, _ = batched.transcribe(str(f), beam_size=5, word_timestamps=True, batch_size=16)
            n += len(list(segs))
        return n

    return {"direct_sequential": sequential, "direct_batched": in_batches}


def whole_vs_clips(
    model: str, samples: list[Any], stage_rows: list[dict[str, Any]], sources: dict[str, str]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Transcribe each video once and compare WER with the per-clip transcripts of the stage."""
    stage = AsrStage(AsrConfig(model=model))
    stage.setup()
    assert stage.engine is not None
    vad = SileroVad()
    vad.load()
    audios = [load_audio(s.path) for s in samples]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE

    def run() -> list[Any]:
        spans = [vad.detect(a).spans for a in audios]
        return transcribe_audios(stage.engine, audios, spans, stage.batch_size)  # type: ignore[arg-type]

    transcribe_audios(stage.engine, audios[:1], [None], stage.batch_size)  # warm-up, not timed
    done, w, c = timed(run)
    by_video: dict[str, list[str]] = {}
    for row in sorted(stage_rows, key=lambda r: r["key"]):
        by_video.setdefault(Path(sources[row["key"]]).name, []).append(row.get("transcript") or "")
    refs = [s.transcript for s in samples]
    clip_hyps = [" ".join(by_video.get(Path(s.path).name, [])) for s in samples]
    whole_hyps = [" ".join(seg.text for seg in tr.segments) for tr in done]
    windows = sum(tr.windows for tr in done)
    return figure(seconds, w, c, windows=windows), {
        "per_clip": round(wer(refs, clip_hyps), 4),
        "whole_video": round(wer(refs, whole_hyps), 4),
    }


if __name__ == "__main__":
    main()

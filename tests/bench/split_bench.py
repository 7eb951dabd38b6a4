"""Word error rate of per-clip transcripts against whole-track transcripts: do fixed clips cut words?

Run from the repository root::

    python -m tests.bench.split_bench                    # 6 videos of ~30 s, Whisper base, stdout
    python -m tests.bench.split_bench -n 10 --duration 40 --json split.json

Media: :func:`pipeline.tools.samples.generate_corpus` videos (espeak-ng sentences at known times over a
noise/hum bed or a melody, known transcripts). For each setting the split stage (``fixed`` mode,
``clip_seconds``) cuts every video, the extract stage writes the clips' 16 kHz audio and the ASR
stage transcribes each clip; the clip transcripts of a video, joined in order, are scored against
its reference. The whole track of each video goes through the same Whisper engine once (windows
around VAD speech), as the reference point. Settings:

* ``plain``: fixed windows (``split.snap_to_silence=false``, the former behaviour);
* ``snapped``: each cut moved to the nearest pause within ``snap_tolerance_seconds`` (default).

It prints WER per setting, the whole-track WER, the ratio per-clip / whole-track (target <= 1.10),
how many cuts fell inside a sentence (ground truth of the corpus) and how far cuts moved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import AsrConfig, ExtractConfig, SplitConfig  # noqa: E402
from pipeline.tools.samples import generate_corpus  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from stages._vad import SAMPLE_RATE, SileroVad, load_audio  # noqa: E402
from stages._whisper import transcribe_audios  # noqa: E402
from stages.asr import AsrStage  # noqa: E402
from stages.extract import ExtractStage  # noqa: E402
from stages.split import SplitStage  # noqa: E402
from tests.bench.asr_bench import wer  # noqa: E402

logger = logging.getLogger("split_bench")


def clip_transcripts(
    samples: list[Any], split_cfg: SplitConfig, asr: AsrStage, staging: Path
) -> tuple[list[str], list[list[tuple[float, float]]]]:
    """Per video: the clip transcripts joined in order, and the clip windows."""
    split = SplitStage(split_cfg)
    extract = ExtractStage(ExtractConfig(frames_per_clip=0), StageContext(str(staging)))
    texts, windows = [], []
    for s in samples:
        row = {"video_id": s.id, "source_url": str(s.path), "input_index": 0, "local_path": str(s.path)}
        (children,) = split.process_batch([row])
        if isinstance(children, Exception):
            raise children
        rows = [{**row, **c} for c in children]
        extracted = extract.process_batch(rows)
        clips = []
        for r, e in zip(rows, extracted, strict=True):
            if isinstance(e, Exception):
                raise e
            clips.append({**r, **e})
        out = []
        for i in range(0, len(clips), asr.batch_size):
            out.extend(asr.process_batch(clips[i : i + asr.batch_size]))
        texts.append(" ".join((o.get("transcript") or "") for o in out if not isinstance(o, Exception)))
        windows.append([(c["clip_start"], c["clip_end"]) for c in children])
    return texts, windows


def cuts_inside_sentences(samples: list[Any], windows: list[list[tuple[float, float]]]) -> tuple[int, int]:
    """(cuts inside a spoken sentence of the ground truth, all inner cuts)."""
    inside = total = 0
    for s, ws in zip(samples, windows, strict=True):
        for _, end in ws[:-1]:
            total += 1
            inside += any(x["start"] < end < x["end"] for x in s.sentences)
    return inside, total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--videos", type=int, default=6)
    ap.add_argument("--duration", type=float, default=30.0, help="mean video length (0.75x-1.75x)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--clip-seconds", type=float, default=10.0)
    ap.add_argument("--tolerance", type=float, default=2.0, help="split.snap_tolerance_seconds")
    ap.add_argument("--model", default="offline:base")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "model": args.model}
    with tempfile.TemporaryDirectory(prefix="split_bench_") as tmp_name:
        tmp = Path(tmp_name)
        samples = generate_corpus(tmp / "corpus", count=args.videos, seed=args.seed, duration=args.duration)
        refs = [s.transcript for s in samples]
        report["corpus"] = {"videos": len(samples), "seconds": round(sum(s.duration for s in samples), 1)}
        asr = AsrStage(AsrConfig(model=args.model))
        asr.setup()
        assert asr.engine is not None
        vad = SileroVad()
        vad.load()
        audios = [load_audio(s.path) for s in samples]
        t0 = time.perf_counter()
        whole = transcribe_audios(asr.engine, audios, [vad.detect(a).spans for a in audios], asr.batch_size)
        whole_wer = wer(refs, [" ".join(seg.text for seg in tr.segments) for tr in whole])
        report["whole_track"] = {"wer": round(whole_wer, 4), "seconds": round(time.perf_counter() - t0, 1)}
        base = SplitConfig(mode="fixed", clip_seconds=args.clip_seconds, snap_tolerance_seconds=args.tolerance)
        plain_windows: list[list[tuple[float, float]]] = []
        for name, cfg in (("plain", base.model_copy(update={"snap_to_silence": False})), ("snapped", base)):
            t0 = time.perf_counter()
            texts, windows = clip_transcripts(samples, cfg, asr, tmp / f"staging_{name}")
            clip_wer = wer(refs, texts)
            inside, total = cuts_inside_sentences(samples, windows)
            entry: dict[str, Any] = {
                "wer": round(clip_wer, 4),
                "wer_over_whole_track": round(clip_wer / whole_wer, 3) if whole_wer > 0 else None,
                "cuts": total,
                "cuts_inside_a_sentence": inside,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if name == "plain":
                plain_windows = windows
            else:
                moves = [
                    abs(a[1] - b[1])
                    for pw, sw in zip(plain_windows, windows, strict=True)
                    for a, b in zip(pw[:-1], sw[:-1], strict=False)
                ]
                entry["mean_cut_move_s"] = round(sum(moves) / max(1, len(moves)), 3)
                entry["max_cut_move_s"] = round(max(moves, default=0.0), 3)
            report[name] = entry
        audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
        report["corpus"]["audio_seconds"] = round(audio_seconds, 1)
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return report


if __name__ == "__main__":
    main()

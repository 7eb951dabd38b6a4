"""Agreement stage speed: clips/s through ``agreement`` (CLAP on the audio, CLIP on the frames, every
caption scored) against the same scorers called directly on the same inputs in the same run (the
stage's own overhead: row handling, audio decode, frame loading, score records).

Run from the repository root::

    python -m tests.bench.agreement_bench                 # 16 clips of 8 s, 4 frames, 4 captions each
    python -m tests.bench.agreement_bench --clips 32 --repeats 3 --json out.json
    python -m tests.bench.agreement_bench --device cuda --clips 64   # on a GPU machine

No weights are downloaded: the CLAP and CLIP models are the tiny random ones of the tests
(``tests/tiny_clap.py``, ``stages.visual_tags.save_tiny_clip``), so the figures measure the stage's
overhead over the model calls on CPU, not a real model's speed (no GPU was available). Audio is
espeak-ng speech and lavfi tones, frames are lavfi test patterns. Timings are medians of
``--repeats`` interleaved runs (stage, direct).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline.config import AgreementConfig  # noqa: E402
from pipeline.tools.samples import synth_speech_wav  # noqa: E402
from stages._vad import load_audio  # noqa: E402
from stages.agreement import AgreementStage  # noqa: E402
from stages.visual_tags import save_tiny_clip  # noqa: E402
from tests.tiny_clap import save_tiny_clap  # noqa: E402

log = logging.getLogger("agreement_bench")
CAPTIONS = [("audio", "a man speaks in a quiet room"), ("music", "a steady high tone"),
            ("visual", "colour bars on a screen"), ("fused", "a man speaks over colour bars")]  # fmt: skip


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def make_rows(root: Path, clips: int, seconds: float, frames: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(clips):
        audio = root / f"a{i}.flac"
        if i % 2 == 0:
            wav = root / f"s{i}.wav"
            synth_speech_wav(wav, "The next train to the city centre leaves in five minutes from platform two.")
            _ffmpeg("-i", str(wav), "-af", f"apad=whole_dur={seconds}", "-t", str(seconds), "-ar", "16000", str(audio))
        else:
            _ffmpeg("-f", "lavfi", "-i", f"sine=frequency={300 + 40 * i}:sample_rate=16000:duration={seconds}", str(audio))
        src = "smptebars" if i % 2 else "testsrc"
        _ffmpeg("-f", "lavfi", "-i", f"{src}=size=320x240:rate=4", "-frames:v", str(frames), str(root / f"f{i}_%d.jpg"))
        rows.append({
            "video_id": f"v{i}", "key": f"v{i}_0000", "source_url": f"v{i}", "input_index": i, "has_audio": True,
            "audio_uri": str(audio), "frame_uris": [str(root / f"f{i}_{k}.jpg") for k in range(1, frames + 1)],
            "captions": [{"kind": k, "text": t, "model": "m", "prompt_id": None, "extra_json": None} for k, t in CAPTIONS],
            "caption": CAPTIONS[-1][1], "audio_tags": [{"label": "Speech", "score": 0.9}],
        })  # fmt: skip
    return rows


def direct(stage: AgreementStage, rows: list[dict[str, Any]]) -> None:
    """The same model work without the stage: decode, embed, score."""
    assert stage.clap is not None and stage.clip is not None
    audio = stage.clap.audio_embeddings([load_audio(r["audio_uri"]) for r in rows])
    frames = stage.clip.frame_embeddings([r["frame_uris"] for r in rows], stage.config.max_frames)
    for i, row in enumerate(rows):
        texts = [c["text"] for c in row["captions"]]
        _ = stage.clap.text_embeddings([*texts[:2], texts[3], row["caption"], "speech"]) @ audio[i]
        _ = stage.clip.text_embeddings([texts[2], texts[3], row["caption"]]) @ frames[i]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="cuda: the GPU check")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="agreement_bench_") as tmp:
        root = Path(tmp)
        rows = make_rows(root, args.clips, args.seconds, args.frames)
        cfg = AgreementConfig(clap_model=str(save_tiny_clap(root / "clap")), clip_model=str(save_tiny_clip(root / "clip")),
                              device=args.device, max_frames=args.frames)  # fmt: skip
        stage = AgreementStage(cfg)
        stage.setup()
        batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
        for b in batches[:1]:  # warm-up
            stage.process_batch(b)
        times: dict[str, list[float]] = {"stage": [], "direct": []}
        for rep in range(args.repeats):
            order = ["stage", "direct"] if rep % 2 == 0 else ["direct", "stage"]
            for name in order:
                started = time.perf_counter()
                for b in batches:
                    stage.process_batch(b) if name == "stage" else direct(stage, b)
                times[name].append(time.perf_counter() - started)
    result = {
        "device": stage.clap.device if stage.clap else args.device, "clips": args.clips, "seconds_per_clip": args.seconds, "frames": args.frames, "repeats": args.repeats,
        "stage_clips_per_s": round(args.clips / statistics.median(times["stage"]), 2),
        "direct_clips_per_s": round(args.clips / statistics.median(times["direct"]), 2),
    }  # fmt: skip
    result["stage_over_direct"] = round(result["stage_clips_per_s"] / result["direct_clips_per_s"], 3)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

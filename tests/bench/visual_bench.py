"""Visual stages speed: frames/s through ``visual_tags`` against the model called directly on the
same frames in the same run (target: the stage reaches >= 90% of the direct call), plus the cost of
decoding the frames and the throughput of ``visual_quality``.

Run from the repository root::

    python -m tests.bench.visual_bench                  # ViT-B/32-sized CLIP (random weights), 24 clips x 8 frames
    python -m tests.bench.visual_bench --model tiny     # the tiny test model: overheads dominate
    python -m tests.bench.visual_bench --clips 48 --repeats 5 --json out.json

No weights are downloaded: the "vitb32" model is CLIP ViT-B/32's architecture (the default
``CLIPConfig`` vision tower: 12 layers, width 768, patch 32, 224 px) with random weights, which
costs the same compute as openai/clip-vit-base-patch32. The text tower is tiny (it only runs once,
in ``setup()``, for the label vocabulary).

Frames come from generated videos through the extract stage (JPEG files, 256 px short side), as
in a run. Between workers only the frame paths travel (a row holds a few hundred bytes of paths,
not the frames): the JPEG bytes are read once, by the tagging worker, so the frame decode cost is
paid in the stage and is measured separately here. The direct call uses the same forward-pass size
(``--frame-batch``) as the stage. Timings are the median of ``--repeats`` interleaved runs (stage,
direct, model only, decode, decode+preprocess; the order rotates each repeat), by wall clock and
by CPU time of the process (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import ExtractConfig, VisualQualityConfig, VisualTagsConfig  # noqa: E402
from pipeline.tools.samples import synth_video  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from stages.extract import ExtractStage  # noqa: E402
from stages.visual_quality import VisualQualityStage  # noqa: E402
from stages.visual_tags import VisualTagStage, load_image, save_tiny_clip  # noqa: E402

log = logging.getLogger("visual_bench")

VITB32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32)


def make_clips(root: Path, n_clips: int, frames: int) -> list[dict[str, Any]]:
    """``n_clips`` 4 s clips (2 per generated 8 s video) with ``frames`` JPEG frames each."""
    rows = []
    for v in range((n_clips + 1) // 2):
        path = synth_video(root / f"v{v}.mp4", duration=8.0, n_scenes=2, audio=False, seed=100 + v).path
        for c in range(2):
            rows.append({"video_id": f"v{v}", "key": f"v{v}_{c:04d}", "source_url": str(path), "input_index": v,
                         "local_path": str(path), "clip_start": 4.0 * c, "clip_end": 4.0 * c + 4.0,
                         "has_video": True, "has_audio": False, "shot_times": []})  # fmt: skip
    rows = rows[:n_clips]
    extract = ExtractStage(ExtractConfig(frames_per_clip=frames), StageContext(str(root / "staging")))
    out = []
    for row, res in zip(rows, extract.process_batch(rows), strict=True):
        if isinstance(res, Exception):
            raise res
        out.append({**row, **res})
    return out


def _batches(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory(prefix="visual_bench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        clips = make_clips(root / "media", args.clips, args.frames)
        log.info("made %d clips in %.1f s", len(clips), time.perf_counter() - t0)
        vision = VITB32 if args.model == "vitb32" else {}
        model_dir = save_tiny_clip(root / "model", image_size=224 if args.model == "vitb32" else 32, **vision)
        cfg = VisualTagsConfig(model=str(model_dir), batch_size=args.batch, frame_batch=args.frame_batch, device="cpu")
        stage = VisualTagStage(cfg)
        stage.setup()
        n_frames = sum(len(c["frame_uris"]) for c in clips)
        batches = _batches(clips, args.batch)

        def through_stage() -> None:
            for b in batches:
                stage.process_batch(b)

        fb = args.frame_batch

        def direct() -> None:  # what a user would write: open the JPEGs, preprocess, image tower
            from PIL import Image

            with torch.inference_mode():
                for b in batches:
                    images = []
                    for c in b:
                        for u in c["frame_uris"]:
                            with Image.open(u) as im:
                                images.append(im.convert("RGB"))
                    for i in range(0, len(images), fb):
                        pixels = stage.processor(images=images[i : i + fb], return_tensors="pt")["pixel_values"]
                        stage.model.get_image_features(pixel_values=pixels)

        frames_all = [load_image(u) for c in clips for u in c["frame_uris"]]
        pixels_all = [
            stage.processor(images=frames_all[i : i + fb], return_tensors="pt")["pixel_values"]
            for i in range(0, len(frames_all), fb)
        ]

        def model_only() -> None:
            with torch.inference_mode():
                for px in pixels_all:
                    stage.model.get_image_features(pixel_values=px)

        def decode_only() -> None:
            for c in clips:
                for u in c["frame_uris"]:
                    load_image(u)

        def preprocess_only() -> None:
            for b in batches:
                stage.processor(images=[load_image(u) for c in b for u in c["frame_uris"]], return_tensors="pt")

        through_stage()  # warm-up (allocator, thread pools)
        times: dict[str, list[float]] = {
            "stage": [],
            "direct": [],
            "model_only": [],
            "decode": [],
            "decode+preprocess": [],
        }
        fns = {"stage": through_stage, "direct": direct, "model_only": model_only, "decode": decode_only,
               "decode+preprocess": preprocess_only}  # fmt: skip
        cpu: dict[str, list[float]] = {k: [] for k in times}
        order = list(fns)
        for r in range(args.repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:  # rotate: no fixed position bias
                fn = fns[name]
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

        vq = VisualQualityStage(VisualQualityConfig())
        vq.setup()
        t = time.perf_counter()
        for b in _batches(clips, 16):
            vq.process_batch(b)
        vq_seconds = time.perf_counter() - t
        vq_nomodel = VisualQualityStage(VisualQualityConfig(nsfw=False))
        vq_nomodel.setup()
        t = time.perf_counter()
        for b in _batches(clips, 16):
            vq_nomodel.process_batch(b)
        vq_nomodel_seconds = time.perf_counter() - t

        row_bytes = len(json.dumps({k: clips[0][k] for k in ("key", "frame_uris")}))
        frame_bytes = sum(Path(u).stat().st_size for u in clips[0]["frame_uris"])
        return {
            "model": args.model,
            "clips": len(clips),
            "frames": n_frames,
            "batch_clips": args.batch,
            "frame_batch": args.frame_batch,
            "torch_threads": torch.get_num_threads(),
            "frames_per_s": {k: round(n_frames / v, 1) for k, v in med.items()},
            "ms_per_frame": {k: round(1000 * v / n_frames, 2) for k, v in med.items()},
            "stage_vs_direct": round(med["direct"] / med["stage"], 3),
            "stage_vs_model_only": round(med["model_only"] / med["stage"], 3),
            "cpu_ms_per_frame": {k: round(1000 * v / n_frames, 2) for k, v in med_cpu.items()},
            "stage_vs_direct_by_cpu_time": round(med_cpu["direct"] / med_cpu["stage"], 3),
            "visual_quality_clips_per_s": round(len(clips) / vq_seconds, 2),
            "visual_quality_without_nsfw_clips_per_s": round(len(clips) / vq_nomodel_seconds, 2),
            "row_frame_refs_bytes": row_bytes,
            "clip_frame_jpeg_bytes": frame_bytes,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vitb32", "tiny"], default="vitb32")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--batch", type=int, default=16, help="clips per batch")
    parser.add_argument("--frame-batch", type=int, default=64, help="frames per forward pass (stage and direct alike)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

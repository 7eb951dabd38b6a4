"""GPU check of the ASR backends with tiny random Whisper models (no download, ~1 minute).

Run from the repository root on a machine with CUDA (it runs on CPU too, and says so)::

    python -m tests.bench.gpu_check_asr
    python tests/bench/gpu_check_asr.py --batch 32 --json gpu_asr.json

What it does:

1. builds a tiny random Whisper from a ``transformers`` config, converts it to CTranslate2 (float16)
   with the tokenizer of the offline base model, and runs ``FasterWhisperEngine`` with
   ``device=auto`` / ``compute_type=auto`` (cuda + float16 when CUDA is there) on a batch of
   ``--batch`` windows: one encoder call, language detection and one beam search for the batch;
2. saves a tiny random openai-whisper checkpoint and runs ``OpenAIWhisperEngine`` on the same batch
   (fp16 on CUDA, greedy, so the batch is decoded together);
3. prints device placement, dtypes, CUDA memory and timings (first call and a warm call), and checks
   that slicing a batch's encoder output (done for word alignment when some windows have no text)
   matches encoding those windows alone.

Random weights make random text: this checks placement, precision and batching, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from pipeline.config import AsrConfig  # noqa: E402
from pipeline.tools.samples import synth_speech_wav  # noqa: E402
from stages._vad import load_audio  # noqa: E402
from stages._whisper import (  # noqa: E402
    FasterWhisperEngine,
    OpenAIWhisperEngine,
    encoded_subset,
    offline_base_dir,
    save_tiny_openai_checkpoint,
)
from tests.bench.report_out import emit  # noqa: E402


def tiny_ct2_model(root: Path) -> Path:
    import ctranslate2
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.alignment_heads = [[1, 0], [1, 1]]
    hf_dir, ct2_dir = root / "hf", root / "ct2"
    model.save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir), load_as_float16=True).convert(
        str(ct2_dir), quantization="float16"
    )
    base = offline_base_dir()  # same vocabulary: take its tokenizer, vocabulary and token ids
    for name in ("tokenizer.json", "vocabulary.json"):
        shutil.copy2(base / name, ct2_dir / name)
    for stale in ("vocabulary.txt",):
        (ct2_dir / stale).unlink(missing_ok=True)
    meta = json.loads((base / "config.json").read_text())
    meta["alignment_heads"] = model.generation_config.alignment_heads
    (ct2_dir / "config.json").write_text(json.dumps(meta))
    return ct2_dir


def cuda_memory() -> dict[str, float] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {
        "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
        "max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def run_engine(engine: Any, windows: list[np.ndarray]) -> dict[str, Any]:
    import torch

    t = time.perf_counter()
    engine.transcribe_windows(windows)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    t = time.perf_counter()
    results = engine.transcribe_windows(windows)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    warm = time.perf_counter() - t
    return {
        "windows": len(windows),
        "first_call_s": round(first, 3),
        "warm_call_s": round(warm, 3),
        "windows_per_s_warm": round(len(windows) / warm, 2),
        "languages": sorted({r.language for r in results if r.language}),
        "segments": sum(len(r.segments) for r in results),
    }


def subset_check(engine: FasterWhisperEngine, windows: list[np.ndarray]) -> float:
    """Encoder output of a batch, sliced to some windows (the word-alignment path) vs encoded alone."""
    from faster_whisper.audio import pad_or_trim

    m = engine.model
    feats = np.stack([pad_or_trim(m.feature_extractor(w)[..., :-1]) for w in windows])
    sliced = encoded_subset(m.encode(feats), [0, 2], len(windows), m)
    alone = m.encode(feats[[0, 2]])
    if m.model.device == "cuda":
        import torch

        a, b = torch.as_tensor(sliced, device="cuda").float(), torch.as_tensor(alone, device="cuda").float()
        return float((a - b).abs().max())
    return float(np.abs(np.asarray(sliced) - np.asarray(alone)).max())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import ctranslate2
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "torch_cuda": torch.cuda.is_available(),
        "ct2_cuda_devices": ctranslate2.get_cuda_device_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if not report["torch_cuda"]:
        sys.stderr.write("no CUDA: running the same check on CPU\n")
    with tempfile.TemporaryDirectory(prefix="gpu_check_asr_") as tmp_name:
        tmp = Path(tmp_name)
        synth_speech_wav(tmp / "s.wav", "Turn left at the second traffic light and the museum is on your right.")
        speech = load_audio(tmp / "s.wav")
        window = np.concatenate([speech] * 6)[: 30 * 16000]  # a full 30 s window
        windows = [np.roll(window, 1600 * i) for i in range(args.batch)]

        ct2 = tiny_ct2_model(tmp)
        fw = FasterWhisperEngine(AsrConfig(model=str(ct2), batch_size=args.batch, beam_size=5))
        fw.load()
        report["faster_whisper"] = {
            "device": fw.device,
            "compute_type": fw.compute_type,
            "ct2_model_device": fw.model.model.device,
            "ct2_compute_type": fw.model.model.compute_type,
            "supported_compute_types": sorted(ctranslate2.get_supported_compute_types(fw.device)),
            **run_engine(fw, windows),
            "encoded_subset_max_abs_diff": subset_check(fw, windows[:3]),
            "cuda_memory": cuda_memory(),
        }
        del fw

        ckpt = save_tiny_openai_checkpoint(tmp / "openai-tiny.pt")
        ow = OpenAIWhisperEngine(AsrConfig(backend="openai-whisper", model=str(ckpt), beam_size=1))
        ow.load()
        param = next(ow.model.parameters())
        report["openai_whisper"] = {
            "device": ow.device,
            "parameter_device": str(param.device),
            "parameter_dtype": str(param.dtype),
            "compute_dtype": "float16" if ow.device == "cuda" else "float32",
            **run_engine(ow, windows),
            "cuda_memory": cuda_memory(),
        }
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()

"""Benchmark of LLM caption fusion, and how a backend/model behaves on the injection set.

    python -m tests.bench.llm_bench [--backend transformers|llama_cpp|openai] [--clips 16] [--preset mmtrail]

For the chosen backend (``transformers``, the default: the SmolLM2 GGUF through transformers;
``llama_cpp``: the same GGUF in llama.cpp, optional extra; ``openai`` starts an OpenAI-compatible server
on 127.0.0.1 with the same model: ``python -m llama_cpp.server`` when llama-cpp-python is installed,
else tests/openai_compat_server.py over the transformers backend), on the same rendered prompts in the
same run:

* clips/s, seconds per clip and generated tokens/s of the backend called directly (``backend.chat``
  on the prompts) and through the fuse stage (render + call + validate + repair + grounding +
  fallback + provenance); the target is stage >= 90 % of direct;
* prompt tokens per clip for every preset (one short call per clip: the endpoint counts them);
* the injection set (tests/test_injection.py): flags raised, the judge's score with and without the
  attack, whether the fused caption repeats the attack, and the final decision.

Writes a JSON report with ``--out``. Signals are synthetic text rows (titles, transcripts with
timestamps, tags, a visual caption), varied by a seed; the fusion stage reads only these fields.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import FuseConfig, JudgeConfig, LLMBackendConfig
from pipeline.executor import apply_stage
from stages._llm import ChatRequest, LLMBackend, default_gguf, make_backend
from stages._prompts import load_preset, render, signals_from_row
from stages.fuse import FuseStage
from stages.judge import JudgeStage

PRESETS = ["mmtrail", "wavcaps", "howtocaption", "favd", "judge"]
SUBJECTS = ["a dog", "a violinist", "a chef", "rain", "a crowd", "a train", "a child", "a guitarist"]
PLACES = ["in a park", "on a street", "in a kitchen", "at a station", "on a beach", "in a hall"]
SENTENCES = [
    "Welcome back to the channel.",
    "Today we are going to try something new.",
    "Listen to how the sound changes here.",
    "Make sure you hold it steady.",
    "That was the last step.",
    "Thanks for watching and see you next time.",
]
AUDIO = ["Speech", "Music", "Dog", "Rain", "Vehicle", "Crowd", "Violin", "Guitar", "Applause"]
VISUAL = ["person", "street", "kitchen", "animal", "instrument", "train", "water", "stage"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
        t, segments = 0.0, []
        for sentence in rng.sample(SENTENCES, rng.randint(1, 3)):
            end = t + rng.uniform(1.5, 3.0)
            segments.append({"start": round(t, 2), "end": round(end, 2), "text": sentence})
            t = end + rng.uniform(0.1, 0.8)
        rows.append(
            {
                "key": f"bench_{i:04d}",
                "video_id": "bench",
                "source_url": f"bench://{i}",
                "input_index": i,
                "title": f"{subject} {place} #{i}",
                "metadata_json": json.dumps({"description": f"Short clip of {subject} {place}.", "tags": [subject, "clip"]}),
                "clip_start": 0.0,
                "clip_end": round(t + 1.0, 2),
                "transcript": " ".join(s["text"] for s in segments),
                "asr_segments": segments,
                "audio_tags": [{"label": a, "score": round(rng.uniform(0.2, 0.95), 2)} for a in rng.sample(AUDIO, 3)],
                "visual_tags": [{"label": v, "score": round(rng.uniform(0.2, 0.95), 2)} for v in rng.sample(VISUAL, 3)],
                "captions": [{"kind": "visual", "text": f"{subject.capitalize()} {place}.", "model": "bench-vlm"}],
                "caption": f"{subject.capitalize()} {place}.",
            }
        )
    return rows


@contextmanager
def openai_server(threads: int) -> Iterator[str]:
    """A local OpenAI-compatible server with the SmolLM2 model: llama.cpp's when installed, else ours."""
    from tests.test_llm_backends import llama_cpp_server_installed

    if llama_cpp_server_installed():
        with llama_server(threads) as base:
            yield base
        return
    from tests.openai_compat_server import serve

    backend = make_backend(LLMBackendConfig(backend="transformers", threads=threads))
    try:
        with serve(backend, model="smollm2") as base:
            yield base
    finally:
        backend.close()


@contextmanager
def llama_server(threads: int) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama_cpp.server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def backend_config(args: argparse.Namespace, base_url: str | None) -> LLMBackendConfig:
    if args.backend == "openai":
        from tests.test_llm_backends import llama_cpp_server_installed

        mode = "object_schema" if llama_cpp_server_installed() else "schema"
        return LLMBackendConfig(backend="openai", model="smollm2", base_url=base_url or "", max_concurrency=1, json_mode=mode)
    return LLMBackendConfig(backend=args.backend, threads=args.threads)


def time_direct(backend: LLMBackend, requests: list[ChatRequest], batch: int) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(requests), batch):
        for result in backend.chat(requests[i : i + batch]):
            tokens += result.completion_tokens or 0
    return time.perf_counter() - started, tokens


def time_stage(stage: FuseStage, rows: list[dict[str, Any]], batch: int) -> tuple[float, int, int, int]:
    started = time.perf_counter()
    out: list[dict[str, Any]] = []
    for i in range(0, len(rows), batch):
        out += apply_stage(stage, rows[i : i + batch])
    seconds = time.perf_counter() - started
    tokens = repairs = fallbacks = 0
    for row in out:
        extra = json.loads([c for c in row["captions"] if c["kind"] == "fused"][0]["extra_json"])
        tokens += extra["completion_tokens"]
        repairs += len(extra["attempts"]) - 1
        fallbacks += int(extra["fallback"])
    return seconds, tokens, repairs, fallbacks


def throughput(args: argparse.Namespace, cfg: LLMBackendConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    preset = load_preset(args.preset)
    fuse_cfg = FuseConfig(preset=args.preset, batch_size=args.batch_size, llm=cfg)
    stage = FuseStage(fuse_cfg)
    stage.setup()
    assert stage.backend is not None
    backend = stage.backend  # the same loaded model for both paths
    requests = [
        ChatRequest(r.messages, max_tokens=preset.max_tokens, temperature=cfg.temperature, json_schema=preset.json_schema)
        for r in (render(preset, signals_from_row(row, fuse_cfg.max_field_chars)) for row in rows)
    ]
    backend.chat(requests[:1])  # warm-up
    direct_a = time_direct(backend, requests, args.batch_size)
    stage_s, stage_tokens, repairs, fallbacks = time_stage(stage, rows, args.batch_size)
    direct_b = time_direct(backend, requests, args.batch_size)
    stage.teardown()
    direct_s = (direct_a[0] + direct_b[0]) / 2
    direct_tokens = (direct_a[1] + direct_b[1]) / 2
    n = len(rows)
    return {
        "preset": args.preset,
        "clips": n,
        "direct_clips_per_s": round(n / direct_s, 3),
        "direct_seconds_per_clip": round(direct_s / n, 2),
        "direct_tokens_per_s": round(direct_tokens / direct_s, 1),
        "stage_clips_per_s": round(n / stage_s, 3),
        "stage_seconds_per_clip": round(stage_s / n, 2),
        "stage_tokens_per_s": round(stage_tokens / stage_s, 1),
        "stage_vs_direct_clips": round(direct_s / stage_s, 3),
        "direct_seconds": [round(direct_a[0], 2), round(direct_b[0], 2)],
        "stage_seconds": round(stage_s, 2),
        "repairs": repairs,
        "fallbacks": fallbacks,
    }


def prompt_tokens(cfg: LLMBackendConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    backend = make_backend(cfg)
    out = {}
    try:
        for name in PRESETS:
            preset = load_preset(name)
            requests = [ChatRequest(render(preset, signals_from_row(r)).messages, max_tokens=1) for r in rows]
            counts = [r.prompt_tokens or 0 for r in backend.chat(requests)]
            out[name] = {"mean": round(statistics.mean(counts), 1), "min": min(counts), "max": max(counts)}
    finally:
        backend.close()
    return out


def injection_report(cfg: LLMBackendConfig) -> list[dict[str, Any]]:
    from tests.test_fuse import ROW
    from tests.test_injection import INJECTION_CASES

    caption = "A man cooks pasta in a kitchen."
    rows = [{**ROW, "key": "control", "caption": caption}]
    rows += [{**ROW, "key": name, "caption": caption, **fields} for name, fields in INJECTION_CASES]
    fuse = FuseStage(FuseConfig(batch_size=len(rows), llm=cfg))
    judge = JudgeStage(JudgeConfig(batch_size=len(rows), llm=cfg))
    fuse.setup()
    judge.setup()
    try:
        fused = apply_stage(fuse, [dict(r) for r in rows])
        judged = apply_stage(judge, [dict(r) for r in rows])  # judged on the fixed caption, not the fused one
    finally:
        fuse.teardown()
        judge.teardown()
    report = []
    for f, j in zip(fused, judged, strict=True):
        score = [s["value"] for s in j["scores"] if s["name"] == "judge"]
        echoed = any(w in (f["caption"] or "").lower() for w in ("ignore", "score 5", "rate", "instruction", "system"))
        report.append(
            {
                "case": f["key"],
                "flags": sorted({x for x in f["llm_flags"] + j["llm_flags"] if x.startswith("suspected_injection")}),
                "judge_score": score[0] if score else None,
                "judge_flags": [x for x in j["llm_flags"] if x.startswith("judge")],
                "fused_caption_repeats_attack": echoed,
                "fused_fallback": any(x.startswith("fuse_fallback") for x in f["llm_flags"]),
                "decision": j.get("drop_reason") or "kept",
            }
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["transformers", "llama_cpp", "openai"], default="transformers")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="mmtrail")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: 1 for llama.cpp, whose threads spin: keep <= idle cores; 2 for transformers)",
    )  # fmt: skip
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "tokens", "injection"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is None:
        args.threads = 1 if args.backend == "llama_cpp" else 2
    rows = synthetic_rows(args.clips)
    result: dict[str, Any] = {"backend": args.backend, "model": default_gguf().name, "threads": args.threads}
    with openai_server(args.threads) if args.backend == "openai" else _nothing() as base_url:
        cfg = backend_config(args, base_url)
        if "throughput" not in args.skip:
            result["throughput"] = throughput(args, cfg, rows)
            print(json.dumps(result["throughput"]))
        if "tokens" not in args.skip:
            result["prompt_tokens_per_clip"] = prompt_tokens(cfg, rows)
            print(json.dumps(result["prompt_tokens_per_clip"]))
        if "injection" not in args.skip:
            result["injection"] = injection_report(cfg)
            for line in result["injection"]:
                print(json.dumps(line))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()

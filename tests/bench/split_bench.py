"""Word error rate of per-clip transcripts against whole-track transcripts: do fixed clips cut words?

Run from the repository root::

    python -m tests.bench.split_bench                    # 6 videos of ~30 s, Whisper base, stdout
    python -m tests.bench.split_bench -n 10 --duration 40 --json split.json

Media: :func:`pipeline.tools.samples.generate_corpus` videos (espeak-ng sentences at known times over a
noise/hum bed or a melody, known transcripts). For each setting the split stage cuts every video,
the extract stage writes the clips' 16 kHz audio and the ASR stage transcribes each clip; the clip
transcripts of a video, joined in order, are scored against its reference. Reference points:

* ``whole_track``: each video's audio decoded directly and sent through the same Whisper engine
  (windows around VAD speech), as ``stages._speech`` does;
* ``whole_clip``: each video as one clip (``split.mode=whole``) through the same split, extract and
  ASR stages as the clips: it differs from the clip settings only in having no cut.

Settings (``fixed`` mode, ``clip_seconds``):

* ``plain``: fixed windows (``split.snap_to_silence=false``, the former behaviour);
* ``snapped``: each cut moved to the nearest pause within ``snap_tolerance_seconds`` (default);
* ``oracle``: each fixed cut moved to the middle of the ground-truth gap between the two sentences
  nearest it (no tolerance): the best any cut placement can do for clips of this length.

It prints WER per setting and per video, the ratios per-clip / whole-track and per-clip /
whole-clip (target <= 1.10), how many cuts fell inside a sentence (ground truth) and how far cuts
moved. Hard cases, outside those figures:

* ``no_pauses``: one video of words spoken one by one with 0.1 s between them and no longer pause
  (``word_stream``), longer than ``max_clip_seconds``: word times are known, so cuts inside a word
  are counted, plain and snapped, with the WER of both;
* ``no_speech``: a melody and a noise/hum bed without speech: cuts must stay where ``fixed`` puts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import AsrConfig, ExtractConfig, SplitConfig  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.tools.samples import SENTENCES, generate_corpus, synth_speech_wav, synth_video  # noqa: E402
from stages._vad import SAMPLE_RATE, SileroVad, load_audio  # noqa: E402
from stages._whisper import transcribe_audios  # noqa: E402
from stages.asr import AsrStage  # noqa: E402
from stages.extract import ExtractStage  # noqa: E402
from stages.split import SplitStage  # noqa: E402
from tests.bench.asr_bench import wer  # noqa: E402
from tests.bench.report_out import emit  # noqa: E402

logger = logging.getLogger("split_bench")

Span = tuple[float, float]
Children = list[dict[str, Any]]


# ------------------------------------------------------------------ media with known word times


def voiced_spans(samples: np.ndarray, rate: int = SAMPLE_RATE, merge_gap: float = 0.1) -> list[Span]:
    """Spans of 10 ms windows above 1 % of full scale, merging gaps shorter than ``merge_gap``."""
    win = rate // 100
    rms = np.sqrt(np.mean(samples[: len(samples) // win * win].reshape(-1, win) ** 2, axis=1))
    spans: list[list[float]] = []
    for k in np.flatnonzero(rms > 0.01):
        t = k * win / rate
        if spans and t - spans[-1][1] < merge_gap:
            spans[-1][1] = t + win / rate
        else:
            spans.append([t, t + win / rate])
    return [(a, b) for a, b in spans]


def spoken(text: str, tmp: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng (16 kHz float32), trimmed to its voiced part."""
    wav = tmp / "spoken.wav"
    synth_speech_wav(wav, text, SAMPLE_RATE)
    with wave.open(str(wav), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    spans = voiced_spans(x)
    if not spans:
        raise ValueError(f"espeak-ng wrote no voiced audio for {text!r}")
    return x[int(spans[0][0] * SAMPLE_RATE) : int(spans[-1][1] * SAMPLE_RATE)]


def talk_video(path: Path, speech: np.ndarray, tone: float = 0.03) -> Path:
    """A video (testsrc2 picture) whose audio is ``speech`` over a quiet 220 Hz tone."""
    t = np.arange(len(speech)) / SAMPLE_RATE
    mix = speech + tone * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    wav = path.with_suffix(".wav")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(mix, -1, 1) * 32767).astype(np.int16).tobytes())
    seconds = len(speech) / SAMPLE_RATE
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc2=s=160x120:r=25:d={seconds:.2f}", "-i", str(wav), "-c:v", "libx264", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-shortest", str(path)],
        check=True, timeout=120,
    )  # fmt: skip
    wav.unlink()
    return path


def word_stream(path: Path, seconds: float, gap: float = 0.1, lead: float = 0.5) -> tuple[Path, list[Span], str]:
    """Speech without pauses: words of :data:`SENTENCES`, each spoken alone by espeak-ng, one after
    the other ``gap`` s apart (sentences too), for about ``seconds``. Returns the video, the word
    times (s) and the transcript."""
    cache: dict[str, np.ndarray] = {}
    words = [w for s in SENTENCES for w in s.split()]
    pieces, times, said = [np.zeros(int(lead * SAMPLE_RATE), np.float32)], [], []
    t = lead
    with tempfile.TemporaryDirectory(prefix="word_stream_") as tmp:
        for word in words:
            if t >= seconds - lead:
                break
            key = word.strip(".,!?").lower()
            if key not in cache:
                cache[key] = spoken(key, Path(tmp))
            x = cache[key]
            times.append((t, t + len(x) / SAMPLE_RATE))
            pieces += [x, np.zeros(int(gap * SAMPLE_RATE), np.float32)]
            said.append(word)
            t += len(x) / SAMPLE_RATE + int(gap * SAMPLE_RATE) / SAMPLE_RATE
    pieces.append(np.zeros(int(lead * SAMPLE_RATE), np.float32))
    return talk_video(path, np.concatenate(pieces)), times, " ".join(said)


# ------------------------------------------------------------------ measuring


def oracle_cuts(sample: Any, children: Children) -> Children:
    """``children`` with each inner cut moved to the middle of the nearest ground-truth sentence gap."""
    gaps = [(a["end"], b["start"]) for a, b in zip(sample.sentences[:-1], sample.sentences[1:])]
    if not gaps:
        return children
    bounds = [children[0]["clip_start"]]
    for c in children[1:]:
        a, b = min(gaps, key=lambda g: abs((g[0] + g[1]) / 2 - c["clip_start"]))
        bounds.append(round((a + b) / 2, 3))
    bounds.append(children[-1]["clip_end"])
    return [{**c, "clip_start": bounds[k], "clip_end": bounds[k + 1]} for k, c in enumerate(children)]


def clip_transcripts(
    samples: list[Any],
    split_cfg: SplitConfig,
    asr: AsrStage,
    staging: Path,
    move_cuts: Callable[[Any, Children], Children] | None = None,
) -> tuple[list[str], list[list[Span]]]:
    """Per video: the clip transcripts joined in order, and the clip windows."""
    split = SplitStage(split_cfg)
    extract = ExtractStage(ExtractConfig(frames_per_clip=0), StageContext(str(staging)))
    texts, windows = [], []
    for s in samples:
        row = {"video_id": s.id, "source_url": str(s.path), "input_index": 0, "local_path": str(s.path)}
        (children,) = split.process_batch([row])
        if isinstance(children, Exception):
            raise children
        if move_cuts is not None:
            children = move_cuts(s, children)
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


def cuts_inside(spans_per_video: list[list[Span]], windows: list[list[Span]]) -> tuple[int, int]:
    """(inner cuts that fall inside one of the video's spans, all inner cuts)."""
    inside = total = 0
    for spans, ws in zip(spans_per_video, windows, strict=True):
        for _, end in ws[:-1]:
            total += 1
            inside += any(a < end < b for a, b in spans)
    return inside, total


def whole_track(samples: list[Any], asr: AsrStage) -> list[str]:
    """Each video's whole audio track through the ASR engine (windows around VAD speech)."""
    assert asr.engine is not None
    vad = SileroVad(threshold=asr.config.vad_threshold)
    vad.load()
    audios = [load_audio(s.path) for s in samples]
    whole = transcribe_audios(asr.engine, audios, [vad.detect(a).spans for a in audios], asr.batch_size)
    return [" ".join(seg.text for seg in tr.segments) for tr in whole]


def per_video(refs: list[str], hyps: list[str]) -> list[float]:
    return [round(wer([r], [h]), 3) for r, h in zip(refs, hyps, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--videos", type=int, default=6)
    ap.add_argument("--duration", type=float, default=30.0, help="mean video length (0.75x-1.75x)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--clip-seconds", type=float, default=10.0)
    ap.add_argument("--tolerance", type=float, default=2.0, help="split.snap_tolerance_seconds")
    ap.add_argument("--model", default="offline:base")
    ap.add_argument("--no-hard-cases", action="store_true", help="skip the no_pauses / no_speech videos")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", "model": args.model}
    with tempfile.TemporaryDirectory(prefix="split_bench_") as tmp_name:
        tmp = Path(tmp_name)
        samples = generate_corpus(tmp / "corpus", count=args.videos, seed=args.seed, duration=args.duration)
        refs = [s.transcript for s in samples]
        sentences = [[(x["start"], x["end"]) for x in s.sentences] for s in samples]
        report["corpus"] = {"videos": len(samples), "seconds": round(sum(s.duration for s in samples), 1)}
        asr = AsrStage(AsrConfig(model=args.model))
        asr.setup()
        t0 = time.perf_counter()
        hyps = whole_track(samples, asr)
        whole_wer = wer(refs, hyps)
        report["whole_track"] = {
            "wer": round(whole_wer, 4), "per_video": per_video(refs, hyps), "seconds": round(time.perf_counter() - t0, 1)
        }  # fmt: skip
        t0 = time.perf_counter()
        hyps, _ = clip_transcripts(samples, SplitConfig(mode="whole"), asr, tmp / "staging_whole")
        whole_clip_wer = wer(refs, hyps)
        report["whole_clip"] = {
            "wer": round(whole_clip_wer, 4), "per_video": per_video(refs, hyps), "seconds": round(time.perf_counter() - t0, 1)
        }  # fmt: skip
        base = SplitConfig(mode="fixed", clip_seconds=args.clip_seconds, snap_tolerance_seconds=args.tolerance)
        plain = base.model_copy(update={"snap_to_silence": False})
        plain_windows: list[list[Span]] = []
        for name, cfg, move in (("plain", plain, None), ("snapped", base, None), ("oracle", plain, oracle_cuts)):
            t0 = time.perf_counter()
            texts, windows = clip_transcripts(samples, cfg, asr, tmp / f"staging_{name}", move)
            clip_wer = wer(refs, texts)
            inside, total = cuts_inside(sentences, windows)
            entry: dict[str, Any] = {
                "wer": round(clip_wer, 4),
                "wer_over_whole_track": round(clip_wer / whole_wer, 3) if whole_wer > 0 else None,
                "wer_over_whole_clip": round(clip_wer / whole_clip_wer, 3) if whole_clip_wer > 0 else None,
                "per_video": per_video(refs, texts),
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
        report["corpus"]["audio_seconds"] = round(sum(s.duration for s in samples), 1)
        if not args.no_hard_cases:
            report["hard_cases"] = hard_cases(tmp, asr, base, plain)
    emit(report, args.json)
    return report


def hard_cases(tmp: Path, asr: AsrStage, snapped: SplitConfig, plain: SplitConfig) -> dict[str, Any]:
    """Speech without pauses longer than ``max_clip_seconds``; videos without speech."""
    seconds = snapped.max_clip_seconds + snapped.clip_seconds + 2.0
    path, words, transcript = word_stream(tmp / "no_pauses.mp4", seconds)
    video = argparse.Namespace(id="no_pauses", path=path, transcript=transcript)
    out: dict[str, Any] = {"no_pauses": {"seconds": round(words[-1][1] + 0.5, 1), "words": len(words)}}
    out["no_pauses"]["whole_track_wer"] = round(wer([transcript], whole_track([video], asr)), 4)
    for name, cfg in (("plain", plain), ("snapped", snapped)):
        texts, windows = clip_transcripts([video], cfg, asr, tmp / f"staging_np_{name}")
        inside, total = cuts_inside([words], windows)
        out["no_pauses"][name] = {"wer": round(wer([transcript], texts), 4), "cuts": total, "cuts_inside_a_word": inside}
    quiet = {
        "melody": synth_video(tmp / "melody.mp4", duration=seconds, speech=[], music=True, seed=11),
        "noise_hum": synth_video(tmp / "noise_hum.mp4", duration=seconds, speech=[], music=False, seed=12),
    }
    for name, v in quiet.items():
        row = {"video_id": name, "local_path": str(v.path)}
        (a,) = SplitStage(plain).process_batch([row])
        (b,) = SplitStage(snapped).process_batch([row])
        moved = sum(x["clip_start"] != y["clip_start"] for x, y in zip(a[1:], b[1:], strict=True))
        out.setdefault("no_speech", {})[name] = {"cuts": len(a) - 1, "cuts_moved": moved}
    return out


if __name__ == "__main__":
    main()

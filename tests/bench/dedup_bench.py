"""Dedup benchmarks: precision/recall on a hard-negative media corpus, and speed at 1 M.

Run from the repository root::

    python -m tests.bench.dedup_bench --hard                       # hard-negative corpus (precision/recall)
    python -m tests.bench.dedup_bench --hard --originals 22 --copies 14 --keep-media /tmp/dd_corpus
    python -m tests.bench.dedup_bench                         # 1 M embeddings + 1 M codes (speed)
    python -m tests.bench.dedup_bench --embeddings 200000 --codes 200000 --methods ivf,ivfpq,hnsw
    python -m tests.bench.dedup_bench --nprobe 2,4 --json /tmp/dedup_bench.json
    python -m tests.bench.dedup_bench --embeddings 0 --radius 7        # codes only, smaller radius

**Hard-negative corpus** (``--hard``; :func:`make_hard_corpus`, also used by tests/test_dedup.py):
distinct originals of ~22 s made with ffmpeg lavfi pictures (slow gradients, cellular automata,
fractal zooms, testsrc2 and smptebars whose luma is the same in every video, a dark scene of sparse
bright moving dots, life, a camera pan, sierpinski), each with two different espeak-ng sentences
spoken by *one* synthetic voice over a quiet sine tone of the video's own pitch; some originals are
silent or carry only their tone (on pictures that do not repeat: ``PERIODIC``; lavfi's testsrc2 and
gradients animations loop, and a loop with no sound to tell its turns apart is a repeat). Planted
copies: byte copy, low-bitrate half-resolution re-encode, 10% crop, letterbox, brightness/contrast,
mirror, 1.5 s head trim; plus one video whose content really repeats (a 10 s segment played twice:
its two clips are duplicates). Videos are cut into fixed 10 s windows by the split stage's own
``fixed_windows``; extract + fingerprint run on each window and ``find_duplicates`` decides. Truth
at clip level: two clips are duplicates when they come from the same original and their source time
ranges overlap by at least half of the shorter one. Reported: pair precision/recall over clips in
the same group, the share of ``duplicate_of`` marks that point at a true duplicate, false and missed
pairs by name.

Measured (2 shared CPU cores, default ``DedupConfig``; seeds are held out from the tests' seed 3):
``--hard --originals 22 --copies 14 --seed 21``: 37 videos, 74 clips, 29 true pairs, precision 1.000,
recall 1.000 (26 candidate links refused by a contradicting signal); ``--originals 30 --copies 21
--seed 12``: 104 clips, 43 true pairs, precision 1.000, recall 1.000.

**Speed at 1 M**: semantic (512-d embeddings) and perceptual (64-bit fingerprints) near-duplicates.

Data (synthetic, seeded): embeddings are unit vectors around 2000 cluster centres (like real
embeddings, which are not uniform on the sphere); a ``--dup-fraction`` share of rows are planted
near-copies of other rows (cosine ~0.97). Codes are uniform random 64-bit words, a share of them
near-copies with 0..``--radius`` flipped bits.

For every method: wall time and process CPU time of the whole dedup (index training, adding and
the all-pairs search over every row), peak resident memory of the process during it (and above
the data it started with), the number of pairs found, and recall against exact search *in the
same run*: exact search is run for ``--sample-queries`` random rows (exact all-pairs at 1 M would
take hours) and recall is the share of those rows' true pairs the method found. Approximate
methods verify candidates exactly, so their precision is 1.

Methods (see stages/dedup.py): ``ivf`` = FAISS k-means cells, each row probing its ``nprobe``
nearest cells, compared cell by cell as dense matrix products (``ivf_join_pairs``); ``ivfpq`` =
FAISS IVF-PQ kNN (``--neighbors``) re-ranked exactly; ``hnsw`` = FAISS HNSW kNN; codes:
``flat`` = brute force IndexBinaryFlat range search over all codes (exact) and ``multihash`` =
FAISS IndexBinaryMultiHash range search (exact for radius <= 4 (nflip+1) - 1; ``--binary-methods``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.dedup import cosine_pairs, hamming_pairs, ivf_join_pairs  # noqa: E402

logger = logging.getLogger("dedup_bench")


class PeakRSS:
    """Samples the process's resident memory in a thread while a block runs."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(name: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        result = fn()
    stats = {
        "method": name,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "peak_rss_gib": round(mem.peak / 2**30, 3),
        "extra_rss_gib": round((mem.peak - mem.start) / 2**30, 3),
    }
    logger.info("%s: %s", name, stats)
    return result, stats


# --------------------------------------------------------------------------- hard-negative media corpus

FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
W, H, FPS = 320, 240, 25
CLIP_SECONDS, MIN_CLIP_SECONDS, MAX_CLIP_SECONDS = 10.0, 2.0, 20.0  # the split stage's defaults
ORIGINAL_SECONDS = 22.0  # two 10 s windows (the 2 s tail merges into the second); a 1.5 s trim keeps them apart
LOOP_SECONDS = 10.0  # the repeating video: one 10 s segment played twice
TONE_AMPLITUDE = 0.02  # quiet background sine (about -37 dBFS RMS), its pitch one per video
VOICE = ("en-us", 160, 50)  # one synthetic voice (voice, words/min, pitch) for every sentence: a hard negative

#: picture kinds, in the order originals take them (cycled)
PICTURES = ("gradients", "cellauto", "mandelbrot", "testsrc2", "smptebars", "dots", "life", "pan", "sierpinski",
            "mandelbrot", "dots", "gradients", "cellauto", "smptebars")  # fmt: skip
#: lavfi animations that repeat within a 22 s video (testsrc2 every ~2 s, gradients every 2 pi / speed
#: frames, cellauto rules that cycle): with no informative sound their clips really repeat, so the
#: corpus gives them speech; the silent and tone-only originals get pictures that do not repeat
PERIODIC = frozenset({"testsrc2", "gradients", "cellauto", "pan"})
#: a still picture (its luma the same in every video) with no informative sound cannot be told from
#: another still of the same picture: no copy is planted on it (it stays a hard negative)
STILL = frozenset({"smptebars"})
#: what the audio of original i carries: speech (two sentences over the tone), the tone alone, or silence
AUDIO_PLAN = ("speech", "speech", "speech", "speech", "speech", "speech", "tone", "speech", "speech", "silent",
              "speech", "speech", "speech", "tone")  # fmt: skip
HARD_TRANSFORMS: dict[str, list[str] | None] = {
    "copy": None,
    "lowres": ["-vf", "scale=iw/2:ih/2", "-c:v", "libx264", "-preset", "veryfast", "-b:v", "120k",
               "-c:a", "aac", "-b:a", "32k"],
    "crop": ["-vf", "crop=iw*0.9:ih*0.9", "-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-c:a", "aac", "-b:a", "64k"],
    "letterbox": ["-vf", "scale=320:180,pad=320:240:0:30:black", "-c:v", "libx264", "-preset", "veryfast", "-crf", "26",
                  "-c:a", "aac", "-b:a", "64k"],
    "bright": ["-vf", "eq=brightness=0.08:contrast=1.15", "-c:v", "libx264", "-preset", "veryfast", "-crf", "26",
               "-c:a", "aac", "-b:a", "64k"],
    "mirror": ["-vf", "hflip", "-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-c:a", "aac", "-b:a", "64k"],
    "trim": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-c:a", "aac", "-b:a", "64k"],
}  # fmt: skip
TRIM_SECONDS = 1.5

_SUBJECTS = ("the old captain", "my neighbour", "a tired engineer", "the young teacher", "our guide", "the baker",
             "a quiet student", "the night nurse", "my brother", "the farmer", "a travelling singer", "the pilot")
_VERBS = ("carried", "painted", "repaired", "described", "found", "counted", "sold", "measured", "cleaned", "opened")
_OBJECTS = ("a wooden boat", "the broken radio", "seven green bottles", "the heavy door", "a map of the river",
            "the tallest ladder", "a basket of apples", "the kitchen clock", "an empty suitcase", "the garden gate")
_TAILS = ("before the storm", "on a quiet morning", "after the long meeting", "near the station", "in the cold rain",
          "at the end of summer", "while the children slept", "under the bridge", "for the whole village")  # fmt: skip


def hard_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` different sentences from one small vocabulary: any two share at most one of their four
    parts (subject, verb, object, place), so they share words and short phrases but say different
    things. (Two sentences equal but for their subject are mostly the same audio in one voice.)"""
    import random

    rng = random.Random(seed)
    parts: list[tuple[str, str, str, str]] = []
    while len(parts) < n:
        cand = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS))
        if all(sum(x == y for x, y in zip(cand, p, strict=True)) <= 1 for p in parts):
            parts.append(cand)
    return [" ".join(p)[0].upper() + " ".join(p)[1:] + "." for p in parts]


def _picture(kind: str, rng: Any, duration: float) -> str:
    """A filtergraph producing ``[v]``: ``duration`` s of one lavfi picture kind."""
    sz = f"s={W}x{H}:r={FPS}"
    hue = rng.randrange(360)
    if kind == "gradients":  # smooth, slowly turning colour gradients
        cols = ":".join(f"c{i}=0x{rng.randrange(1 << 24):06x}" for i in range(3))
        src = f"gradients={sz}:{cols}:nb_colors=3:seed={rng.randrange(1 << 30)}:speed={rng.uniform(0.005, 0.02):.4f}"
    elif kind == "cellauto":
        src = (f"cellauto={sz}:rule={rng.choice([18, 30, 45, 73, 90, 105, 110, 150])}:seed={rng.randrange(1 << 30)}:"
               f"ratio={rng.uniform(0.3, 0.7):.2f}")  # fmt: skip
    elif kind == "mandelbrot":
        x, y = -0.743643887 + rng.uniform(-3e-5, 3e-5), -0.131825904 + rng.uniform(-3e-5, 3e-5)
        src = (f"mandelbrot={sz}:maxiter=64:start_x={x:.9f}:start_y={y:.9f}:"
               f"start_scale={rng.uniform(2.0, 3.5):.3f}:end_scale={rng.uniform(0.1, 0.5):.3f}:"
               f"end_pts={rng.uniform(15, 40):.1f},hue=h={hue}")  # fmt: skip
    elif kind == "testsrc2":  # the same luma in every video (hue changes chroma only)
        src = f"testsrc2={sz},hue=h={hue}"
    elif kind == "smptebars":  # a static picture, the same luma in every video
        src = f"smptebars={sz},hue=h={hue}"
    elif kind == "life":
        src = f"life={sz}:seed={rng.randrange(1 << 30)}:ratio={rng.uniform(0.1, 0.4):.2f}:mold={rng.randrange(30)}"
    elif kind == "pan":
        src = f"testsrc2={sz},scroll=h={rng.uniform(0.005, 0.02):.4f}:v={rng.uniform(-0.01, 0.01):.4f},hue=h={hue}"
    elif kind == "sierpinski":
        src = f"sierpinski={sz}:seed={rng.randrange(1 << 30)}:jump={rng.randrange(50, 150)}"
    elif kind == "dots":  # a dark scene with a few small bright dots drifting over it (night sky, stage)
        d = f"{duration:.3f}"
        parts = [f"color=c=0x0a0a0a:{sz}:d={d}[bg0]"]
        n = rng.randrange(6, 12)
        for i in range(n):
            size = rng.choice([3, 4, 5])
            parts.append(f"color=c=0x{rng.randrange(180, 256):02x}{rng.randrange(180, 256):02x}ff:s={size}x{size}:r={FPS}:d={d}[p{i}]")
            x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
            vx, vy = rng.uniform(-30, 30), rng.uniform(-20, 20)
            parts.append(f"[bg{i}][p{i}]overlay=x='mod({x0:.1f}+t*{vx:.2f}+{W}*10,{W})':"
                         f"y='mod({y0:.1f}+t*{vy:.2f}+{H}*10,{H})':shortest=1[bg{i + 1}]")  # fmt: skip
        parts.append(f"[bg{n}]format=yuv420p[v]")
        return ";".join(parts)
    else:
        raise ValueError(f"unknown picture kind {kind!r}")
    return f"{src},trim=duration={duration:.3f},setpts=PTS-STARTPTS,format=yuv420p[v]"


def _speech_wav(text: str, out: Path) -> None:
    voice, speed, pitch = VOICE
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text],
                   check=True, capture_output=True)  # fmt: skip


def make_original(path: Path, picture: str, audio: str, seed: int, sentences: list[str], duration: float) -> None:
    """One original: ``picture`` frames; ``audio`` = speech (sentences over a tone) | tone | silent."""
    import random
    import tempfile

    rng = random.Random(f"dedup-hard-{seed}")
    graph = [_picture(picture, rng, duration)]
    inputs: list[str] = []
    d = f"{duration:.3f}"
    tone = rng.uniform(160.0, 900.0)
    with tempfile.TemporaryDirectory(prefix="dedup_hard_") as tmp:
        if audio == "silent":
            graph.append(f"anullsrc=r=48000:cl=stereo,atrim=duration={d}[a]")
        else:
            graph.append(f"sine=f={tone:.1f}:r=48000:d={d},volume={TONE_AMPLITUDE / 0.125:.4f}[tone]")
            mix = ["[tone]"]
            if audio == "speech":
                for j, text in enumerate(sentences):
                    wav = Path(tmp) / f"s{j}.wav"
                    _speech_wav(text, wav)
                    inputs += ["-i", str(wav)]
                    delay = round((1.0 + j * duration / len(sentences) + rng.uniform(0.0, 2.0)) * 1000)
                    graph.append(f"[{j}:a]aresample=48000,adelay=delays={delay}:all=1[s{j}]")
                    mix.append(f"[s{j}]")
            graph.append(f"{''.join(mix)}amix=inputs={len(mix)}:duration=first:normalize=0,atrim=duration={d},"
                         "aformat=sample_rates=48000:channel_layouts=stereo[a]")  # fmt: skip
        cmd = [*FFMPEG, *inputs, "-filter_complex", ";".join(graph), "-map", "[v]", "-map", "[a]",
               "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-r", str(FPS), "-c:a", "aac", "-b:a", "96k",
               "-t", d, str(path)]  # fmt: skip
        subprocess.run(cmd, check=True)


def transform(src: Path, name: str, out: Path) -> None:
    """A planted copy of ``src`` (``HARD_TRANSFORMS``)."""
    import shutil

    args = HARD_TRANSFORMS[name]
    if args is None:
        shutil.copyfile(src, out)
        return
    pre = ["-ss", str(TRIM_SECONDS)] if name == "trim" else []
    subprocess.run([*FFMPEG, *pre, "-i", str(src), *args, str(out)], check=True)


def _probe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return float(out.stdout.strip())


def make_hard_corpus(root: Path, originals: int = 14, copies: int = 7, seed: int = 0, loop: bool = True) -> dict[str, Any]:
    """Generate the hard-negative corpus under ``root``.

    Returns ``{"videos": [{"id", "path", "root", "shift", "period"}...]}``: a video's source time
    ``t`` is ``t + shift`` in its root original (``period``: the content repeats every so many
    seconds, for the looping video). Copies take the transforms in ``HARD_TRANSFORMS`` order,
    applied to originals 0, 1, 2, ... in turn (``copies`` of them; not to a still picture without
    speech, see ``STILL``).
    """
    root.mkdir(parents=True, exist_ok=True)
    texts = hard_sentences(2 * originals + 2, seed)
    videos: list[dict[str, Any]] = []
    for i in range(originals):
        vid = f"orig{i:02d}"
        path = root / f"{vid}.mp4"
        picture, audio = PICTURES[i % len(PICTURES)], AUDIO_PLAN[i % len(AUDIO_PLAN)]
        assert audio == "speech" or picture not in PERIODIC, (picture, audio)
        make_original(path, picture, audio, seed * 1000 + i, texts[2 * i : 2 * i + 2], ORIGINAL_SECONDS)
        videos.append({"id": vid, "path": str(path), "root": vid, "shift": 0.0, "period": None,
                       "picture": picture, "audio": audio})  # fmt: skip
    names = list(HARD_TRANSFORMS)
    sources = [v for v in videos if v["audio"] == "speech" or v["picture"] not in STILL]
    for c in range(copies):
        name = names[c % len(names)]
        src = sources[c % len(sources)]
        vid = f"{src['id']}_{name}"
        out = root / f"{vid}.mp4"
        transform(Path(src["path"]), name, out)
        videos.append({"id": vid, "path": str(out), "root": src["id"], "shift": TRIM_SECONDS if name == "trim" else 0.0,
                       "period": None, "picture": src["picture"], "audio": src["audio"], "transform": name})  # fmt: skip
    if loop:
        seg = root / "loop_segment.mp4"
        make_original(seg, "cellauto", "speech", seed * 1000 + 999, texts[-2:-1], LOOP_SECONDS)
        out = root / "loop.mp4"
        subprocess.run([*FFMPEG, "-stream_loop", "1", "-i", str(seg), "-c:v", "libx264", "-preset", "veryfast",
                        "-crf", "23", "-c:a", "aac", "-b:a", "96k", str(out)], check=True)  # fmt: skip
        videos.append({"id": "loop", "path": str(out), "root": "loop", "shift": 0.0, "period": LOOP_SECONDS,
                       "picture": "cellauto", "audio": "speech"})  # fmt: skip
    for v in videos:
        v["duration"] = _probe_duration(Path(v["path"]))
    return {"videos": videos}


def corpus_clips(corpus: dict[str, Any]) -> list[dict[str, Any]]:
    """Clip rows (as split leaves them: fixed 10 s windows) with their source ranges for the truth."""
    from stages.split import fixed_windows

    rows: list[dict[str, Any]] = []
    for n, v in enumerate(corpus["videos"]):
        for k, (s, e) in enumerate(fixed_windows(0.0, v["duration"], CLIP_SECONDS, MIN_CLIP_SECONDS, MAX_CLIP_SECONDS)):
            src_s = s + v["shift"]
            if v["period"]:
                src_s = src_s % v["period"]
            rows.append({
                "video_id": v["id"], "key": f"{v['id']}_{k:04d}", "input_index": n, "clip_index": k,
                "local_path": v["path"], "clip_start": s, "clip_end": e, "has_video": True, "has_audio": True,
                "shot_times": [], "width": W, "height": H,
                "_truth": (v["root"], src_s, src_s + (e - s)),
            })  # fmt: skip
    return rows


def fingerprint_clips(rows: list[dict[str, Any]], staging: Path) -> list[dict[str, Any]]:
    """Run the real extract and fingerprint stages over clip rows (in place); errors raise."""
    from pipeline.config import ExtractConfig, FingerprintConfig
    from pipeline.stage import StageContext
    from stages.extract import ExtractStage
    from stages.fingerprint import FingerprintStage

    extract = ExtractStage(ExtractConfig(frames_per_clip=1), StageContext(staging_dir=str(staging)))
    fingerprint = FingerprintStage(FingerprintConfig())
    for stage in (extract, fingerprint):
        stage.setup()
        for start in range(0, len(rows), 8):
            batch = rows[start : start + 8]
            for row, update in zip(batch, stage.process_batch(batch), strict=True):
                if isinstance(update, Exception):
                    raise update
                row.update(update)
        stage.teardown()
    return rows


def true_duplicate(a: tuple[str, float, float], b: tuple[str, float, float], min_overlap: float = 0.5) -> bool:
    """Same root original and source ranges overlapping by at least ``min_overlap`` of the shorter."""
    if a[0] != b[0]:
        return False
    overlap = min(a[2], b[2]) - max(a[1], b[1])
    return overlap >= min_overlap * min(a[2] - a[1], b[2] - b[1])


def score_decisions(rows: list[dict[str, Any]], decided: list[dict[str, Any]]) -> dict[str, Any]:
    """Clip-pair precision/recall of ``find_duplicates`` output against the rows' ``_truth``."""
    import itertools

    truth = {r["key"]: r["_truth"] for r in rows}
    group = {d["key"]: d["duplicate_of"] or d["key"] for d in decided}
    keys = sorted(truth)
    tp = fp = fn = 0
    false_pairs: list[tuple[str, str]] = []
    missed: list[tuple[str, str]] = []
    for a, b in itertools.combinations(keys, 2):
        same_truth = true_duplicate(truth[a], truth[b])
        same_pred = group[a] == group[b]
        tp += same_truth and same_pred
        if same_pred and not same_truth:
            fp += 1
            false_pairs.append((a, b))
        if same_truth and not same_pred:
            fn += 1
            missed.append((a, b))
    marks = [(d["key"], d["duplicate_of"]) for d in decided if d["duplicate_of"]]
    good_marks = sum(true_duplicate(truth[k], truth[t]) for k, t in marks)
    return {
        "clips": len(keys),
        "true_pairs": tp + fn,
        "predicted_pairs": tp + fp,
        "precision": round(tp / max(tp + fp, 1), 4),
        "recall": round(tp / max(tp + fn, 1), 4),
        "duplicate_marks": len(marks),
        "mark_precision": round(good_marks / max(len(marks), 1), 4),
        "false_pairs": false_pairs,
        "missed_pairs": missed,
    }


def bench_hard(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from pipeline.config import DedupConfig
    from stages.dedup import find_duplicates, signals_table

    with tempfile.TemporaryDirectory(prefix="dedup_hard_") as tmp:
        root = Path(args.keep_media) if args.keep_media else Path(tmp)
        t0 = time.perf_counter()
        saved = root / "corpus.json"
        spec = {"originals": args.originals, "copies": args.copies, "seed": args.seed}
        if saved.exists() and json.loads(saved.read_text()).get("spec") == spec:  # --keep-media: reuse the media
            corpus = json.loads(saved.read_text())
        else:
            corpus = make_hard_corpus(root / "media", args.originals, args.copies, args.seed)
            corpus["spec"] = spec
            if args.keep_media:
                saved.write_text(json.dumps(corpus))
        t1 = time.perf_counter()
        rows = fingerprint_clips(corpus_clips(corpus), root / "staging")
        t2 = time.perf_counter()
        table = signals_table(rows, "quality")
        if args.keep_media:
            import pyarrow.parquet as pq

            pq.write_table(table, root / "signals.parquet")
            (root / "truth.json").write_text(json.dumps({r["key"]: r["_truth"] for r in rows}))
        decided = find_duplicates(table, DedupConfig(semantic=False)).to_pylist()
        t3 = time.perf_counter()
    result = score_decisions(rows, decided)
    result["signals"] = {d["key"]: d["signals"] for d in decided if d["duplicate_of"]}
    result["videos"] = len(corpus["videos"])
    result["seconds"] = {"generate": round(t1 - t0, 1), "fingerprint": round(t2 - t1, 1), "dedup": round(t3 - t2, 2)}
    logger.info("hard corpus: precision %.4f recall %.4f (%d clips, %d true pairs); false %s; missed %s",
                result["precision"], result["recall"], result["clips"], result["true_pairs"],
                result["false_pairs"], result["missed_pairs"])  # fmt: skip
    return result


# --------------------------------------------------------------------------- data


def synth_embeddings(n: int, d: int, dup_fraction: float, seed: int, clusters: int = 2000) -> np.ndarray:
    """Unit vectors around cluster centres; ``dup_fraction`` of rows replaced by near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    chunk = 65_536
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = centres[rng.integers(0, clusters, m)]
        block += 1.2 * rng.standard_normal((m, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s : s + m] = block
    n_dup = int(n * dup_fraction)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(n, n_dup, replace=False)
    for s in range(0, n_dup, chunk):
        a, b = src[s : s + chunk], dst[s : s + chunk]
        noise = rng.standard_normal((len(a), d), dtype=np.float32)
        noise *= 0.25 / np.linalg.norm(noise, axis=1, keepdims=True)  # cosine ~ 1 / sqrt(1 + 0.25^2) = 0.97
        block = x[a] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[b] = block
    return x


def synth_codes(n: int, dup_fraction: float, radius: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    n_dup = int(n * dup_fraction)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(n, n_dup, replace=False)
    flips = np.zeros(n_dup, np.uint64)
    k = rng.integers(0, radius + 1, n_dup)
    for j in range(radius):
        bit = rng.integers(0, 64, n_dup).astype(np.uint64)
        flips ^= np.where(k > j, np.uint64(1) << bit, np.uint64(0))  # may re-flip a bit: <= k flips
    codes[dst] = codes[src] ^ flips
    return codes


# --------------------------------------------------------------------------- recall


def _pair_set(pairs: np.ndarray, rows: set[int]) -> set[tuple[int, int]]:
    return {(a, b) for a, b in pairs.tolist() if a in rows or b in rows}


def exact_cosine_truth(x: np.ndarray, sample: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x[sample], threshold - 1e-6)
    out = set()
    for qi, q in enumerate(sample.tolist()):
        for j in ids[lims[qi] : lims[qi + 1]].tolist():
            if j != q:
                out.add((min(q, j), max(q, j)))
    return out


def exact_hamming_truth(codes: np.ndarray, sample: np.ndarray, radius: int) -> set[tuple[int, int]]:
    qi, ci = hamming_pairs(codes, radius, codes[sample], method="flat")
    rows = sample[qi]
    return {(min(a, b), max(a, b)) for a, b in zip(rows.tolist(), ci.tolist(), strict=True) if a != b}


def recall(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> float:
    return len(found & truth) / len(truth) if truth else 1.0


# --------------------------------------------------------------------------- runs


def bench_embeddings(args: argparse.Namespace) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    x = synth_embeddings(args.embeddings, args.dim, args.dup_fraction, args.seed)
    logger.info("embeddings: %d x %d generated in %.1f s", len(x), x.shape[1], time.perf_counter() - t0)
    rng = np.random.default_rng(args.seed + 1)
    sample = np.sort(rng.choice(len(x), min(args.sample_queries, len(x)), replace=False))
    truth, exact_stats = measure("exact flat (sampled queries)", lambda: exact_cosine_truth(x, sample, args.threshold))
    rows = set(sample.tolist())
    exact_stats.update({"queries": len(sample), "true_pairs": len(truth)})
    results = [exact_stats]
    for method in args.methods:
        probes = args.nprobe if method in ("ivf", "ivfpq") else [None]
        for nprobe in probes:
            label = f"{method}" + (f" nprobe={nprobe}" if nprobe else "")
            if method == "ivf":
                fn = lambda nprobe=nprobe: ivf_join_pairs(x, args.threshold, nprobe=nprobe)  # noqa: E731
            else:
                fn = lambda method=method, nprobe=nprobe: cosine_pairs(  # noqa: E731
                    x, args.threshold, method, neighbors=args.neighbors, nprobe=nprobe or 1, use_gpu=False
                )
            (pairs, _), stats = measure(label, fn)
            found = _pair_set(pairs, rows)
            stats.update({"rows": len(x), "pairs": len(pairs), "recall": round(recall(found, truth), 4),
                          "false_pairs_on_sample": len(found - truth)})  # fmt: skip
            logger.info("%s: recall %.4f, %d pairs", label, stats["recall"], len(pairs))
            results.append(stats)
    return results


def bench_codes(args: argparse.Namespace) -> list[dict[str, Any]]:
    codes = synth_codes(args.codes, args.dup_fraction, args.radius, args.seed)
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(len(codes), min(args.sample_queries, len(codes)), replace=False))
    truth, exact_stats = measure("binary flat (sampled queries)", lambda: exact_hamming_truth(codes, sample, args.radius))
    exact_stats.update({"queries": len(sample), "true_pairs": len(truth)})
    results = [exact_stats]
    methods = args.binary_methods
    rows = set(sample.tolist())
    for method in methods:
        (qi, ci), stats = measure(f"binary {method}", lambda method=method: hamming_pairs(codes, args.radius, method=method))
        keep = qi < ci
        pairs = np.stack([qi[keep], ci[keep]], axis=1)
        stats.update({"rows": len(codes), "pairs": len(pairs), "recall": round(recall(_pair_set(pairs, rows), truth), 4)})
        logger.info("binary %s: recall %.4f, %d pairs", method, stats["recall"], len(pairs))
        results.append(stats)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--dup-fraction", type=float, default=0.05)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument("--methods", default="ivf", help="comma list of ivf, ivfpq, hnsw")
    parser.add_argument("--nprobe", default="3", help="comma list of IVF probes per row")
    parser.add_argument("--neighbors", type=int, default=16)
    parser.add_argument("--sample-queries", type=int, default=2000)
    parser.add_argument("--binary-methods", default="flat,multihash", help="comma list of flat, multihash")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hard", action="store_true", help="precision/recall on the hard-negative media corpus only")
    parser.add_argument("--originals", type=int, default=14, help="--hard: distinct original videos (22 s each)")
    parser.add_argument("--copies", type=int, default=14, help="--hard: planted copies (transforms in turn)")
    parser.add_argument("--keep-media", help="--hard: generate the corpus here and keep it")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v]
    args.binary_methods = [m for m in args.binary_methods.split(",") if m]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import faiss

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "faiss": faiss.__version__,
                    "faiss_threads": faiss.omp_get_max_threads()},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }  # fmt: skip
    if args.hard:
        report["hard_negatives"] = bench_hard(args)
        args.embeddings = args.codes = 0
    if args.embeddings:
        report["embeddings"] = bench_embeddings(args)
    if args.codes:
        report["codes"] = bench_codes(args)
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

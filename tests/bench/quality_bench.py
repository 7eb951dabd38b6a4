"""The quality benchmark: what the pipeline *makes*, measured against planted truth.

Run from the repository root (or ``avforge bench --quality``)::

    python -m tests.bench.quality_bench                          # default corpus, ~10 min on 2 cores
    python -m tests.bench.quality_bench --count 8 --duplicates 5 --bad 7 --seed 1
    python -m tests.bench.quality_bench --set fuse.llm.backend=openai --set judge.llm.backend=openai

It generates a corpus with ground truth (:mod:`tests.bench.quality_corpus`: originals with hard
negatives, planted duplicates of every transform, planted bad videos), serves it on 127.0.0.1 (the
yt-dlp path, as in production) with a CSV LIST carrying titles and descriptions, runs the full
offline pipeline (:data:`FULL_STAGES`, default models) through ``pipeline.runner.run_pipeline``,
reads ``index.parquet``, ``rejects.parquet``, ``errors.parquet``, the dedup signals
(``signals/*.parquet``: every clip that reached dedup) and decisions
(``_staging/dedup/decisions/*.parquet``: the clips in duplicate groups), and reports (stdout and ``WORKDIR/quality.json``):

* **dedup**: pairwise precision and recall over the clips that reached dedup; a pair is a true
  duplicate when both clips show the same original over the same time span (on the original's
  timeline the shared span covers at least half of the shorter clip: a head-trimmed copy's clips
  shift by the trim, a 10 s clip inside a 20 s clip is covered); recall per transform; every
  wrong and missed pair with the videos' roles, picture kinds and the clips' dedup signals; and the
  drop precision (duplicate drops whose kept clip really covers the dropped clip's content);
* **filters**: for every drop reason, its false-drop rate on good clips (originals and planted
  copies) and what it caught among the planted bad clips; catch rate per bad kind; the good clips
  that ``black`` / ``frozen`` dropped, with their picture kinds;
* **WER**: per-clip transcripts joined in time order per original vs the same ASR stage (same
  model and settings) on each original's whole track; reference = the espeak-ng sentences;
* **captions** (shipped clips): share grounded by the pipeline's own ``caption_grounding`` where it
  is present, and by the benchmark's own check (content words of the final caption that no signal
  of the clip mentions: transcript, tags, title, description, input captions; grounded when at most
  ``--max-unsupported`` of them are unsupported), the share of unsupported content words overall,
  transcript content words carried into captions, the fallback share;
* **judge**: rank-based AUC of the judge score, good clips vs planted bad ones (those scored).

The corpus is generated once per (seed, counts) under WORKDIR and reused; the pipeline output is
rewritten on every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.quality_corpus import VideoTruth, build_corpus, load_truth, write_listing  # noqa: E402
from tests.bench.quality_metrics import (  # noqa: E402
    ClipSpan,
    auc,
    carried,
    groups_from_links,
    pairs_from_groups,
    precision_recall,
    rate,
    supported,
    true_duplicate_pairs,
)

log = logging.getLogger("quality_bench")

#: the full offline pipeline (every stage whose default model ships offline)
FULL_STAGES = "[download,split,extract,quality,visual_quality,fingerprint,dedup,asr,audio_tags,text_embed,fuse,judge]"
#: drop reasons that filters set before dedup (such clips never reach it)
GOOD_ROLES = ("original", "duplicate")
MIN_COVER = 0.5  # true duplicates share at least half of the shorter clip's span


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def _read(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.exists() else []


def _read_dir(folder: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f, columns=columns).to_pylist()]


def read_outputs(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(index, rejects, errors, partial) of a run; an unfinished run (no index.parquet yet) is read
    from the files its writers have written so far (shard sidecars, ``_parts/``)."""
    if (out / "index.parquet").exists():
        return _read(out / "index.parquet"), _read(out / "rejects.parquet"), _read(out / "errors.parquet"), False

    def gather(paths: list[Path]) -> list[dict[str, Any]]:
        rows: dict[Any, dict[str, Any]] = {}
        for p in paths:
            for r in _read(p):
                rows[(r.get("video_id"), r.get("key"), r.get("error_stage"))] = r
        return list(rows.values())

    index = gather(sorted((out / "shards").glob("*.parquet")))
    rejects = gather(sorted((out / "_parts").glob("rejects-*.parquet")))
    errors = gather(sorted((out / "_parts").glob("errors-*.parquet")))
    return index, rejects, errors, True


def _meta_texts(row: dict[str, Any]) -> list[str]:
    raw = row.get("metadata_json")
    if not raw:
        return []
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return [str(raw)]
    return [str(v) for v in meta.values()] if isinstance(meta, dict) else [str(meta)]


def _score(row: dict[str, Any], name: str) -> float | None:
    for s in row.get("scores") or []:
        if s.get("name") == name:
            return float(s["value"])
    return None


# --------------------------------------------------------------------------- the run


def pipeline_config(overrides: list[str]) -> Any:
    """The config a user gets from ``avforge run`` (the default recipe, where the package has
    recipes; else :data:`FULL_STAGES`), serving from loopback, no HTML report, then ``overrides``."""
    import inspect

    from pipeline import config as cfg

    base = ["download.allowed_hosts=[127.0.0.1]", "report.enabled=false"]
    recipe = getattr(cfg, "DEFAULT_RECIPE", None)
    if recipe and "recipe" in inspect.signature(cfg.load_config).parameters:
        return cfg.load_config([], [*base, *overrides], recipe=recipe)
    return cfg.load_config(None, [f"stages={FULL_STAGES}", *base, *overrides])


def run_pipeline_on(corpus: Path, truth: list[VideoTruth], seed: int, out: Path, overrides: list[str], backend: str) -> dict[str, Any]:
    """Serve the corpus on loopback, write the CSV LIST, run the pipeline into ``out``."""
    from pipeline.config import dump_config
    from pipeline.runner import run_pipeline
    from pipeline.tools.serve import serve_directory

    config = pipeline_config(overrides)
    shutil.rmtree(out, ignore_errors=True)
    with serve_directory(corpus) as base:
        listing = write_listing(corpus, truth, seed, base_url=base)
        started = time.perf_counter()
        summary = run_pipeline(listing, out, config, backend=backend)  # type: ignore[arg-type]
        wall = time.perf_counter() - started
    return {
        "config": config,
        "config_yaml": dump_config(config),
        "wall_seconds": round(wall, 1),
        "kept": summary.kept,
        "rejected": summary.rejected,
        "errors": summary.errors,
        "stages": list(config.stages),
        "recipe": getattr(config, "recipe", None),
    }


# --------------------------------------------------------------------------- evaluation


def evaluate(out: Path, truth: list[VideoTruth], max_unsupported: float = 0.2) -> dict[str, Any]:
    """All figures from a finished run's outputs (no model calls; the whole-track WER is apart)."""
    videos = {t.id: t for t in truth}
    index, rejects, errors, partial = read_outputs(out)
    for r in index:
        r["_shipped"] = True
    clips = [r for r in index + rejects if r.get("key") and r.get("video_id") in videos]
    res: dict[str, Any] = {"partial_run": partial}

    # -- accounting: every input in the index, the rejects or the errors
    seen = {r["video_id"] for r in clips} | {e.get("video_id") for e in errors}
    res["accounting"] = {
        "videos": len(truth),
        "clips": len(clips),
        "shipped": len(index),
        "rejected": len(rejects),
        "error_rows": len(errors),
        "videos_missing": sorted(v for v in videos if v not in seen),
        "errors": [
            {"video_id": e.get("video_id"), "key": e.get("key"), "stage": e.get("error_stage"), "type": e.get("error_type"),
             "role": videos[e["video_id"]].role if e.get("video_id") in videos else None, "error": str(e.get("error"))[:200]}
            for e in errors
        ],
    }  # fmt: skip

    def span(row: dict[str, Any]) -> ClipSpan:
        t = videos[row["video_id"]]
        return ClipSpan(row["key"], t.content_id, float(row["clip_start"]) + t.offset, float(row["clip_end"]) + t.offset)

    res["dedup"] = evaluate_dedup(out, clips, videos, span)
    res["filters"] = evaluate_filters(clips, videos)
    res["captions"] = evaluate_captions(index, videos, max_unsupported)
    res["judge"] = evaluate_judge(clips, videos)
    res["clip_truth"] = [
        {"key": r["key"], "video_id": r["video_id"], "role": videos[r["video_id"]].role,
         "content_id": videos[r["video_id"]].content_id, "transform": videos[r["video_id"]].transform,
         "bad_kind": videos[r["video_id"]].bad_kind, "picture": videos[r["video_id"]].picture,
         "span_on_original": [round(span(r).start, 2), round(span(r).end, 2)],
         "outcome": "shipped" if r.get("_shipped") else r.get("drop_reason"), "duplicate_of": r.get("duplicate_of")}
        for r in sorted(clips, key=lambda r: r["key"])
    ]  # fmt: skip
    return res


def evaluate_dedup(out: Path, clips: list[dict[str, Any]], videos: dict[str, VideoTruth], span: Any) -> dict[str, Any]:
    by_key = {r["key"]: r for r in clips}
    decisions = _read_dir(out / "_staging" / "dedup" / "decisions")  # clips in duplicate groups
    sig = _read_dir(out / "signals", ["key", "clip_index", "duration"])  # every clip that reached dedup
    if sig and any(s["key"] not in by_key for s in sig):
        # an unfinished run has not written every clip yet: place the others from dedup's own signal
        # table (clips of a video are contiguous: a clip starts where the previous one ends)
        per_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in sig:
            per_video[row["key"].rsplit("_", 1)[0]].append(row)
        for vid, rows_ in per_video.items():
            start = 0.0
            for row in sorted(rows_, key=lambda r: r["clip_index"]):
                before = by_key.get(f"{vid}_{int(row['clip_index']) - 1:04d}")
                if before is not None and before.get("clip_end") is not None:  # a written neighbour fixes the start
                    start = float(before["clip_end"])
                end = start + float(row["duration"] or 0.0)
                if row["key"] not in by_key and vid in videos:
                    by_key[row["key"]] = {"key": row["key"], "video_id": vid, "clip_start": start, "clip_end": end}
                start = end
    signals: dict[str, list[str]] = {}
    if sig:
        source = "signals/ and _staging/dedup/decisions/"
        universe = [s["key"] for s in sig if s["key"] in by_key]
        decided = {d["key"]: d["group"] for d in decisions}
        group_of = {k: decided.get(k, k) for k in universe}
        signals = {d["key"]: list(d.get("signals") or []) for d in decisions}
    else:  # no signal files: rebuild the groups from duplicate_of, over clips no earlier filter dropped
        source = "rejects.parquet duplicate_of"
        early = {"black", "frozen", "silent", "no_audio", "no_video", "too_short", "static", "blurry",
                 "colourless", "slideshow", "nsfw"}  # fmt: skip
        universe = [r["key"] for r in clips if r.get("drop_reason") not in early]
        links = [(r["key"], r["duplicate_of"]) for r in clips if r.get("duplicate_of")]
        group_of = groups_from_links(universe, links)
    spans = [span(by_key[k]) for k in universe]
    truth_pairs = true_duplicate_pairs(spans, MIN_COVER)
    predicted = pairs_from_groups(group_of)
    precision, recall = precision_recall(predicted, truth_pairs)

    def describe(pair: frozenset[str]) -> dict[str, Any]:
        a, b = sorted(pair)
        out_ = {}
        for name, k in (("a", a), ("b", b)):
            t = videos[by_key[k]["video_id"]]
            s = span(by_key[k])
            out_[name] = {"key": k, "role": t.role, "content": t.content_id, "transform": t.transform, "picture": t.picture,
                          "tone_hz": t.tone_hz, "voice": t.voice, "span": [round(s.start, 2), round(s.end, 2)],
                          "signals": signals.get(k, [])}  # fmt: skip
        return out_

    transform_of = {}
    for pair in truth_pairs:
        ts = {videos[by_key[k]["video_id"]].transform for k in pair} - {None}
        transform_of[pair] = "+".join(sorted(ts)) if ts else "same_video"
    per_transform: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pair, tr in transform_of.items():
        per_transform[tr][1] += 1
        per_transform[tr][0] += pair in predicted
    group_sizes = Counter(Counter(group_of.values()).values())
    # the data-loss view: a dropped clip is rightly dropped when the clip it is a duplicate of shows
    # the same content over at least half of the dropped clip's span (a 10 s half of a 20 s clip is)
    dup_of = {d["key"]: d.get("duplicate_of") for d in decisions} if decisions else {
        r["key"]: r.get("duplicate_of") for r in clips if r["key"] in group_of}
    drops = [(k, v) for k, v in dup_of.items() if v and k in by_key and v in by_key]
    wrong_drops = []
    for k, v in drops:
        a, b = span(by_key[k]), span(by_key[v])
        overlap = min(a.end, b.end) - max(a.start, b.start)
        if a.content_id != b.content_id or overlap < 0.5 * (a.end - a.start):
            wrong_drops.append({"dropped": describe(frozenset((k, v)))["a" if k < v else "b"], "kept": describe(frozenset((k, v)))["b" if k < v else "a"]})
    return {
        "source": source,
        "clips_in_dedup": len(universe),
        "true_pairs": len(truth_pairs),
        "predicted_pairs": len(predicted),
        "correct_pairs": len(predicted & truth_pairs),
        "precision": _r(precision),
        "recall": _r(recall),
        "recall_per_transform": {k: f"{v[0]}/{v[1]}" for k, v in sorted(per_transform.items())},
        "drops": len(drops),
        "drop_precision": _r(rate(len(drops) - len(wrong_drops), len(drops))),
        "wrong_drops": wrong_drops,
        "group_sizes": {str(k): v for k, v in sorted(group_sizes.items())},
        "wrong_pairs": [describe(p) for p in sorted(predicted - truth_pairs, key=sorted)],
        "missed_pairs": [describe(p) for p in sorted(truth_pairs - predicted, key=sorted)],
    }


def evaluate_filters(clips: list[dict[str, Any]], videos: dict[str, VideoTruth]) -> dict[str, Any]:
    good = [r for r in clips if videos[r["video_id"]].role in GOOD_ROLES]
    bad = [r for r in clips if videos[r["video_id"]].role == "bad"]
    reasons = Counter(r.get("drop_reason") for r in clips if r.get("drop_reason"))
    per_reason = {}
    for reason in sorted(set(reasons) | {"black", "frozen"}):
        dropped_good = [r for r in good if r.get("drop_reason") == reason]
        per_reason[reason] = {
            "false_drop_rate": _r(rate(len(dropped_good), len(good))),
            "good_dropped": len(dropped_good),
            "bad_caught": dict(Counter(videos[r["video_id"]].bad_kind for r in bad if r.get("drop_reason") == reason)),
        }
    intended = {"black": {"black"}, "frozen": {"frozen"}, "frozen_grain": {"frozen"}}
    per_kind: dict[str, dict[str, Any]] = {}
    for r in bad:
        kind = videos[r["video_id"]].bad_kind or "?"
        d = per_kind.setdefault(kind, {"clips": 0, "not_shipped": 0, "by_intended_filter": 0, "outcomes": []})
        d["clips"] += 1
        d["not_shipped"] += not r.get("_shipped")
        d["by_intended_filter"] += r.get("drop_reason") in intended.get(kind, set())
        d["outcomes"].append("shipped" if r.get("_shipped") else r.get("drop_reason"))
    for d in per_kind.values():
        d["catch_rate"] = _r(rate(d["not_shipped"], d["clips"]))
    lively_dropped = [
        {"key": r["key"], "reason": r["drop_reason"], "picture": videos[r["video_id"]].picture,
         "role": videos[r["video_id"]].role, "black_ratio": r.get("black_ratio"), "frozen_ratio": r.get("frozen_ratio"),
         "brightness": r.get("brightness"), "motion_score": r.get("motion_score")}
        for r in good if r.get("drop_reason") in ("black", "frozen", "static", "slideshow")
    ]  # fmt: skip
    return {
        "good_clips": len(good),
        "bad_clips": len(bad),
        "per_reason": per_reason,
        "bad_catch": dict(sorted(per_kind.items())),
        "bad_catch_rate": _r(rate(sum(not r.get("_shipped") for r in bad), len(bad))),
        "good_dropped_by_black_or_frozen": lively_dropped,
        "good_unique_shipped": len({(videos[r["video_id"]].content_id, round(float(r["clip_start"]) + videos[r["video_id"]].offset))
                                    for r in good if r.get("_shipped")}),
    }  # fmt: skip


def evaluate_captions(index: list[dict[str, Any]], videos: dict[str, VideoTruth], max_unsupported: float) -> dict[str, Any]:
    from stages._prompts import FUSED_KINDS_PREFIX, JUDGE_KIND

    shipped = [r for r in index if r.get("video_id") in videos]
    words = unsupported_n = grounded = with_caption = 0
    own_flags: Counter[str] = Counter()
    pipeline_scores: list[float] = []
    fallback_flag = deterministic = 0
    carried_n = carried_d = 0
    examples = []
    for r in shipped:
        caption = r.get("caption")
        flags = list(r.get("llm_flags") or [])
        own_flags.update(f.split(":")[0] + (":" + f.split(":")[1] if ":" in f else "") for f in flags if "ground" in f)
        g = _score(r, "caption_grounding")
        if g is not None:
            pipeline_scores.append(g)
        fallback_flag += any(f.startswith("fuse_fallback") for f in flags)
        caps = r.get("captions") or []
        deterministic += any(
            c.get("kind") == FUSED_KINDS_PREFIX and c.get("model") == "fallback" and c.get("text") == caption for c in caps
        )
        if not caption:
            continue
        with_caption += 1
        inputs = [c.get("text") for c in caps if not str(c.get("kind", "")).startswith(FUSED_KINDS_PREFIX) and c.get("kind") != JUDGE_KIND]
        # the clip's duration is one of the prompt's inputs (stages/_prompts.py writes "15.0 seconds")
        start, end = r.get("clip_start"), r.get("clip_end")
        duration = f"{float(end) - float(start):.1f} seconds" if start is not None and end is not None else None
        signals = [r.get("transcript"), r.get("title"), duration, *_meta_texts(r), *inputs,
                   *[t.get("label") for t in r.get("audio_tags") or []], *[t.get("label") for t in r.get("visual_tags") or []]]  # fmt: skip
        cw, un = supported(caption, signals)
        words += len(cw)
        unsupported_n += len(un)
        ok = len(un) <= max_unsupported * len(cw)
        grounded += ok
        if not ok and len(examples) < 12:
            examples.append({"key": r["key"], "caption": caption, "unsupported": un})
        c, d = carried(r.get("transcript"), caption)
        carried_n += c
        carried_d += d
    return {
        "shipped": len(shipped),
        "with_caption": with_caption,
        "grounded_share_bench": _r(rate(grounded, with_caption)),
        "unsupported_word_share": _r(rate(unsupported_n, words)),
        "pipeline_caption_grounding": {
            "clips_scored": len(pipeline_scores),
            "mean": _r(sum(pipeline_scores) / len(pipeline_scores)) if pipeline_scores else None,
            "grounding_flags": dict(own_flags),
        },
        "transcript_words_carried": _r(rate(carried_n, carried_d)),
        "fuse_fallback_share": _r(rate(fallback_flag, len(shipped))),
        "deterministic_caption_share": _r(rate(deterministic, len(shipped))),
        "ungrounded_examples": examples,
    }


def evaluate_judge(clips: list[dict[str, Any]], videos: dict[str, VideoTruth]) -> dict[str, Any]:
    good, bad = [], []
    per_kind: dict[str, list[float]] = defaultdict(list)
    flags: Counter[str] = Counter()
    for r in clips:
        s = _score(r, "judge")
        flags.update(f for f in r.get("llm_flags") or [] if f.startswith("judge:"))
        if s is None:
            continue
        t = videos[r["video_id"]]
        (bad if t.role == "bad" else good).append(s)
        per_kind[t.bad_kind or "good"].append(s)
    return {
        "scored_good": len(good),
        "scored_bad": len(bad),
        "auc": _r(auc(good, bad)),
        "score_histogram_good": dict(sorted(Counter(good).items())),
        "mean_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())},
        "judge_flags": dict(flags.most_common()),
    }


def evaluate_wer(out: Path, corpus: Path, truth: list[VideoTruth], config: Any) -> dict[str, Any]:
    """Per-clip transcripts (joined in time order) vs the ASR stage on each original's whole track.

    A clip that dedup dropped before ASR borrows the transcript of the kept clip with the same
    content and span (a copy whose audio is the same signal); a video without a transcript for
    every one of its clips is left out of both figures.
    """
    from stages.asr import AsrStage
    from tests.bench.asr_bench import wer

    videos = {t.id: t for t in truth}
    index, rejects, _errors, _partial = read_outputs(out)
    rows = [r for r in index + rejects if r.get("video_id") in videos]
    by_content: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_content[videos[r["video_id"]].content_id].append(r)

    def on_original(r: dict[str, Any]) -> tuple[float, float]:
        off = videos[r["video_id"]].offset
        return float(r["clip_start"]) + off, float(r["clip_end"]) + off

    refs, clip_hyps, used = [], [], []
    cuts: list[list[float]] = []  # where each used video was cut
    for t in truth:
        if t.role != "original" or not t.sentences:
            continue
        own = sorted((r for r in rows if r["video_id"] == t.id), key=lambda r: r["clip_start"])
        texts = []
        for r in own:
            text = r.get("transcript")
            if text is None and not (r.get("asr_flags") or []):  # ASR never ran on it (dropped before)
                same = [
                    c for c in by_content[t.id]
                    if c is not r and videos[c["video_id"]].offset == 0 and (c.get("transcript") is not None or c.get("asr_flags"))
                    and abs(on_original(c)[0] - on_original(r)[0]) < 0.05 and abs(on_original(c)[1] - on_original(r)[1]) < 0.05
                ]  # fmt: skip
                if not same:
                    texts = None
                    break
                text = same[0].get("transcript")
            texts.append(text or "")
        if not own or texts is None:
            continue
        refs.append(t.reference)
        clip_hyps.append(" ".join(texts))
        used.append(t)
        cuts.append([round(float(r["clip_start"]), 2) for r in own[1:]])
    if not used:
        return {"videos": 0, "per_clip": None, "whole_track": None}
    stage = AsrStage(config.asr)
    stage.setup()
    try:
        started = time.perf_counter()
        whole = stage.process_batch(
            [{"key": t.id, "audio_uri": str(corpus / t.file), "has_audio": True} for t in used]
        )  # fmt: skip
        seconds = time.perf_counter() - started
    finally:
        stage.teardown()
    whole_hyps = [w.get("transcript") if isinstance(w, dict) else None for w in whole]
    per_clip, whole_track = wer(refs, clip_hyps), wer(refs, whole_hyps)
    return {
        "videos": len(used),
        "model": config.asr.model,
        "per_clip": _r(per_clip),
        "whole_track": _r(whole_track),
        "ratio": _r(per_clip / whole_track) if whole_track else None,
        "videos_cut": sum(bool(c) for c in cuts),  # the others are one clip: per-clip = whole track there
        "per_clip_on_cut_videos": _r(wer([r for r, c in zip(refs, cuts) if c], [h for h, c in zip(clip_hyps, cuts) if c]))
        if any(cuts) else None,
        "whole_track_on_cut_videos": _r(wer([r for r, c in zip(refs, cuts) if c], [h for h, c in zip(whole_hyps, cuts) if c]))
        if any(cuts) else None,
        "whole_track_asr_seconds": round(seconds, 1),
        "per_video": [
            {"video": t.id, "cuts": cut, "per_clip": _r(wer([ref], [c])), "whole": _r(wer([ref], [w])), "reference": ref, "clips": c, "whole_track": w}
            for t, ref, c, w, cut in zip(used, refs, clip_hyps, whole_hyps, cuts, strict=True)
        ],
    }  # fmt: skip


# --------------------------------------------------------------------------- entry points


def run_quality_bench(
    workdir: Path,
    count: int = 16,
    duplicates: int = 10,
    bad: int = 7,
    seed: int = 0,
    backend: str = "sequential",
    overrides: list[str] | None = None,
    max_unsupported: float = 0.2,
    skip_wer: bool = False,
    evaluate_only: bool = False,
    seconds: float = 20.0,
) -> dict[str, Any]:
    """Generate (or reuse) the corpus, run the pipeline, evaluate; writes ``workdir/quality.json``."""
    workdir = Path(workdir).resolve()
    corpus = workdir / (f"corpus_s{seed}_o{count}_d{duplicates}_b{bad}" + (f"_t{seconds:g}" if seconds != 20.0 else ""))
    started = time.perf_counter()
    if (corpus / "truth.json").exists():
        truth = load_truth(corpus)
    else:
        shutil.rmtree(corpus, ignore_errors=True)
        truth = build_corpus(corpus, seed=seed, originals=count, duplicates=duplicates, bad=bad, original_seconds=seconds)
    corpus_seconds = time.perf_counter() - started
    out = workdir / "out"
    if evaluate_only:  # figures from an earlier (possibly unfinished) run in workdir/out
        config = pipeline_config(list(overrides or []))
        run = {"wall_seconds": None, "kept": None, "rejected": None, "errors": None, "stages": list(config.stages),
               "recipe": getattr(config, "recipe", None), "evaluate_only": True}
    else:
        run = run_pipeline_on(corpus, truth, seed, out, list(overrides or []), backend)
        config = run.pop("config")
    results: dict[str, Any] = {
        "command": "avforge bench --quality " + " ".join(
            [f"--workdir {workdir}", f"--count {count}", f"--duplicates {duplicates}", f"--bad {bad}", f"--seed {seed}",
             f"--backend {backend}", *([f"--seconds {seconds:g}"] if seconds != 20.0 else []),
             *[f"--set '{o}'" for o in overrides or []]]),
        "corpus": {
            "dir": str(corpus), "seed": seed, "originals": count, "duplicates": duplicates, "bad": bad,
            "generate_seconds": round(corpus_seconds, 1),
            "transforms": dict(Counter(t.transform for t in truth if t.transform)),
            "bad_kinds": dict(Counter(t.bad_kind for t in truth if t.bad_kind)),
        },
        "run": {k: v for k, v in run.items() if k != "config_yaml"},
        "llm": {"fuse": f"{config.fuse.llm.backend}:{config.fuse.llm.model or 'default'}",
                "judge": f"{config.judge.llm.backend}:{config.judge.llm.model or 'default'}"},
    }  # fmt: skip
    results.update(evaluate(out, truth, max_unsupported))
    if not skip_wer and "asr" in config.stages:
        results["wer"] = evaluate_wer(out, corpus, truth, config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "quality.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    if "config_yaml" in run:
        (workdir / "config.yaml").write_text(run["config_yaml"])
    return results


def format_summary(res: dict[str, Any]) -> str:
    d, f, c, j = res["dedup"], res["filters"], res["captions"], res["judge"]
    w = res.get("wer") or {}
    acc = res["accounting"]
    lines = [
        f"quality bench: {res['corpus']['originals']} originals, {res['corpus']['duplicates']} planted duplicates, "
        f"{res['corpus']['bad']} planted bad videos; pipeline {res['run']['wall_seconds']} s "
        f"(kept {res['run']['kept']}, rejected {res['run']['rejected']}, errors {res['run']['errors']}); LLM {res['llm']['fuse']}",
        f"accounting{' (UNFINISHED RUN: partial outputs)' if res.get('partial_run') else ''}: {acc['clips']} clips, missing videos: {len(acc['videos_missing'])}, error rows: {acc['error_rows']}",
        f"dedup:   precision {d['precision']}  recall {d['recall']}  ({d['correct_pairs']} correct of {d['predicted_pairs']} "
        f"predicted pairs, {d['true_pairs']} true; {len(d['wrong_pairs'])} wrong, {len(d['missed_pairs'])} missed)",
        f"         recall per transform: {d['recall_per_transform']}",
        f"         drop precision {d['drop_precision']} ({len(d['wrong_drops'])} of {d['drops']} duplicate drops lose content "
        "no kept clip covers)",
        "filters: false-drop rate on good clips: "
        + ", ".join(f"{k} {v['false_drop_rate']}" for k, v in f["per_reason"].items() if k != "duplicate"),
        "         bad caught: " + ", ".join(f"{k} {v['not_shipped']}/{v['clips']}" for k, v in f["bad_catch"].items())
        + f"; good clips dropped by black/frozen: {len(f['good_dropped_by_black_or_frozen'])}",
        f"WER:     per clip {w.get('per_clip')}  whole track {w.get('whole_track')}  (ratio {w.get('ratio')}, {w.get('videos')} videos, "
        f"{w.get('videos_cut')} of them cut; on those: per clip {w.get('per_clip_on_cut_videos')}, whole {w.get('whole_track_on_cut_videos')})",
        f"captions: grounded (bench check) {c['grounded_share_bench']}, unsupported content words {c['unsupported_word_share']}, "
        f"pipeline caption_grounding on {c['pipeline_caption_grounding']['clips_scored']}/{c['shipped']} clips",
        f"         transcript words carried {c['transcript_words_carried']}, fuse fallback {c['fuse_fallback_share']}, "
        f"deterministic caption {c['deterministic_caption_share']}",
        f"judge:   AUC good vs bad {j['auc']} ({j['scored_good']} good, {j['scored_bad']} bad scored); mean by kind {j['mean_by_kind']}",
    ]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/avforge-quality"))
    ap.add_argument("--count", type=int, default=16, help="distinct originals")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each original (over split.max_clip_seconds forces a cut)")
    ap.add_argument("--duplicates", type=int, default=10, help="planted duplicates (cycling through the transforms)")
    ap.add_argument("--bad", type=int, default=7, help="planted bad videos (cycling through the bad kinds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=["ray", "sequential"], default="sequential")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override of the pipeline run")
    ap.add_argument("--max-unsupported", type=float, default=0.2, help="bench grounding check: share of unsupported words")
    ap.add_argument("--skip-wer", action="store_true", help="skip the whole-track ASR pass")
    ap.add_argument("--evaluate-only", action="store_true", help="no run: evaluate WORKDIR/out as it is (even unfinished)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_quality_bench(
        args.workdir, args.count, args.duplicates, args.bad, args.seed, args.backend, args.set, args.max_unsupported,
        args.skip_wer, args.evaluate_only, args.seconds,
    )  # fmt: skip
    sys.stdout.write(format_summary(res) + f"\nfull results: {args.workdir / 'quality.json'}\n")
    return res


if __name__ == "__main__":
    main()

"""The caption-quality report: one self-contained static HTML page, ``DIR/report/index.html``.

It reads what a run wrote (``stats.json``, ``config.yaml``, ``index.parquet``, ``rejects.parquet``,
``errors.parquet`` and, for the gallery only, the few shard samples it shows) and renders:

- an overview: inputs, clips kept / rejected / errored, hours, throughput, stage times, config;
- plots (inline SVG drawn here, no chart library): clip durations, caption lengths, vocabulary and
  frequent words, languages, speech ratio, audio and visual tags, score and signal histograms,
  drop reasons, error types per stage, duplicate group sizes;
- a gallery of sampled kept clips, the lowest-scoring ones and sampled rejects: frame thumbnails,
  an audio player (Opus data URI), the transcript, every caption with its model and prompt, tags,
  scores and why a clip was dropped, with in-page filters by status, group and tag.

Everything is inlined (no network, no server). Large runs stay cheap: plots use columns only,
text statistics a bounded sample, and the gallery reads only the samples it shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import random
import re
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline import layout
from pipeline.config import ReportConfig

log = logging.getLogger(__name__)

MAX_TEXT_ROWS = 20_000  # text statistics use at most this many clips (a random sample beyond)
THUMB_WIDTH = 128
THUMBS_PER_CLIP = 6
AUDIO_BITRATE = 16_000
TOP_N = 20
_SKIP_COLUMNS = {"visual_embedding", "text_embedding", "asr_segments"}  # large, not shown
# numeric columns that are not quality signals (times, sizes, ids) or that have a plot of their own
_NOT_SIGNALS = frozenset({
    "input_index", "video_duration", "width", "height", "fps", "clip_index", "clip_count", "clip_start", "clip_end",
    "speech_ratio",
})  # fmt: skip
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_STOPWORDS = frozenset(
    """a an the and or but if then of to in on at by for with from into over under as is are was were be been
    being it its this that these those there here he she they we you i me my your our their his her them us
    not no so too very can will would should could do does did has have had just also than up down out about
    s t one two all any some such only own same other more most what which who whom whose when where why how
    while during before after again further once each few both nor off""".split()
)


@dataclass
class RunData:
    """What a run wrote, as the report needs it."""

    out_dir: Path
    staging_dir: Path
    stats: dict[str, Any]
    config_text: str
    kept: pa.Table
    rejected: pa.Table
    errors: pa.Table


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        return pa.table({})
    names = [n for n in pq.read_schema(path).names if n not in _SKIP_COLUMNS]
    return pq.read_table(path, columns=names)


def load_run(out_dir: Path) -> RunData:
    stats_path = out_dir / layout.STATS
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    config_path = out_dir / layout.CONFIG
    if config_path.exists():
        config_text = config_path.read_text()
    else:
        config_text = json.dumps(stats.get("config", {}), indent=2)
    staging = (yaml.safe_load(config_text) or {}).get("staging_dir") if config_path.exists() else None
    return RunData(
        out_dir=out_dir,
        staging_dir=Path(staging) if staging else out_dir / layout.STAGING,
        stats=stats,
        config_text=config_text,
        kept=_read_table(out_dir / layout.INDEX),
        rejected=_read_table(out_dir / layout.REJECTS),
        errors=_read_table(out_dir / layout.ERRORS),
    )


# --------------------------------------------------------------------------- columns


def _col(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = _col(table, name)
    if col is None:
        return np.zeros(0)
    values = pc.drop_null(col).to_numpy(zero_copy_only=False)
    return values.astype(np.float64)


def _durations(table: pa.Table) -> np.ndarray:
    if table.num_rows == 0 or _col(table, "clip_start") is None:
        return np.zeros(0)
    return pc.drop_null(pc.subtract(table["clip_end"], table["clip_start"])).to_numpy(zero_copy_only=False)


def _strings(table: pa.Table, name: str) -> list[str]:
    col = _col(table, name)
    return [] if col is None else [s for s in col.to_pylist() if s]


def _counts(values: list[str]) -> list[tuple[str, int]]:
    return Counter(values).most_common()


def _items(table: pa.Table, name: str, *fields: str) -> tuple[list[list[Any]], np.ndarray]:
    """Fields of a list<struct> column, flattened, and the row index of each item."""
    col = _col(table, name)
    if col is None or table.num_rows == 0:
        return [[] for _ in fields], np.zeros(0, dtype=np.int64)
    lists = col.combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    return [pc.struct_field(flat, f).to_pylist() for f in fields], parents


def _tag_counts(table: pa.Table, name: str) -> list[tuple[str, int]]:
    """Label -> number of clips carrying it."""
    (labels,), parents = _items(table, name, "label")
    pairs = {(lab, int(p)) for lab, p in zip(labels, parents, strict=True) if lab}
    return Counter(lab for lab, _ in pairs).most_common()


def _scores(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Score name -> (values, row indices)."""
    (names, values), parents = _items(table, "scores", "name", "value")
    by: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    for n, v, p in zip(names, values, parents, strict=True):
        if v is not None:
            by[n][0].append(float(v))
            by[n][1].append(int(p))
    return {n: (np.array(v), np.array(p, dtype=np.int64)) for n, (v, p) in sorted(by.items())}


def _quality_rank(table: pa.Table) -> dict[int, float]:
    """Row -> mean percentile of its scores among all kept clips (scale-free across score names)."""
    total: dict[int, float] = defaultdict(float)
    count: Counter[int] = Counter()
    for values, rows in _scores(table).values():
        if len(values) == 0:
            continue
        order = values.argsort(kind="stable").argsort(kind="stable")
        pct = (order + 0.5) / len(values)
        for r, q in zip(rows.tolist(), pct.tolist(), strict=True):
            total[r] += q
            count[r] += 1
    return {r: total[r] / count[r] for r in count}


def _signal_names(*tables: pa.Table) -> list[str]:
    """Numeric scalar columns of the clip record that hold a quality signal (whatever stages ran)."""
    names: dict[str, None] = {}
    for table in tables:
        for f in table.schema:
            if f.name not in _NOT_SIGNALS and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type)):
                names[f.name] = None
    return list(names)


def _text_sample(table: pa.Table, seed: int) -> pa.Table:
    if table.num_rows <= MAX_TEXT_ROWS:
        return table
    rows = sorted(random.Random(seed).sample(range(table.num_rows), MAX_TEXT_ROWS))
    return table.take(pa.array(rows))


def _word_stats(texts: list[str]) -> tuple[int, list[tuple[str, int]]]:
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w.lower() for w in _WORD.findall(text))
    top = [(w, n) for w, n in words.most_common() if w not in _STOPWORDS and len(w) > 1][:TOP_N]
    return len(words), top


def _caption_texts(table: pa.Table) -> dict[str, list[str]]:
    """Caption kind -> texts (the final caption as ``final``)."""
    out: dict[str, list[str]] = {}
    final = _strings(table, "caption")
    if final:
        out["final"] = final
    (kinds, texts), _ = _items(table, "captions", "kind", "text")
    for kind, text in zip(kinds, texts, strict=True):
        if text:
            out.setdefault(kind or "caption", []).append(text)
    return out


# --------------------------------------------------------------------------- plots


_COLOURS = ("#4c78a8", "#e45756", "#54a24b", "#b279a2", "#f58518", "#72b7b2")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _svg_doc(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg class="plot" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(label)}" '
            f'xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="system-ui, sans-serif">'
            + "".join(body) + "</svg>")  # fmt: skip


def _hist(series: dict[str, np.ndarray], xlabel: str, bins: int = 30, small: bool = False) -> str | None:
    """Overlaid histograms with shared bins, as an SVG element."""
    series = {k: v for k, v in series.items() if len(v)}
    if not series:
        return None
    lo = min(float(v.min()) for v in series.values())
    hi = max(float(v.max()) for v in series.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = {k: np.histogram(v, bins=edges)[0] for k, v in series.items()}
    top = max(int(c.max()) for c in counts.values()) or 1
    w, h = (240, 150) if small else (480, 250)
    left, right, bottom, head = 34, 10, 34, 22 if (len(series) > 1 or small) else 8
    pw, ph = w - left - right, h - bottom - head
    body = [f'<line x1="{left}" y1="{head + ph}" x2="{left + pw}" y2="{head + ph}" stroke="#777"/>',
            f'<line x1="{left}" y1="{head}" x2="{left}" y2="{head + ph}" stroke="#777"/>',
            f'<text x="{left - 4}" y="{head + 4}" text-anchor="end">{top}</text>',
            f'<text x="{left - 4}" y="{head + ph}" text-anchor="end">0</text>']  # fmt: skip
    bw = pw / bins
    for n, (name, c) in enumerate(counts.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        opacity = 0.55 if len(series) > 1 else 0.9
        for i, v in enumerate(c.tolist()):
            if v:
                bh = ph * v / top
                body.append(f'<rect x="{left + i * bw:.1f}" y="{head + ph - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                            f'height="{bh:.1f}" fill="{colour}" fill-opacity="{opacity}"><title>{_e(name)} '
                            f'{_fmt(edges[i])}–{_fmt(edges[i + 1])}: {v}</title></rect>')  # fmt: skip
    for i in range(5):
        x = left + pw * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        body.append(f'<text x="{x:.1f}" y="{head + ph + 14}" text-anchor="{anchor}">{_fmt(lo + (edges[-1] - lo) * i / 4)}</text>')
    body.append(f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle" fill="#555">{_e(xlabel)}</text>')
    if small or len(series) > 1:
        x = left
        for n, (name, v) in enumerate(series.items()):
            label = f"{name} (n={len(v)})"
            body.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{_COLOURS[n % len(_COLOURS)]}"/>'
                        f'<text x="{x + 14}" y="13">{_e(label)}</text>')  # fmt: skip
            x += 24 + 6.5 * len(label)
    return _svg_doc(w, h, body, xlabel)


def _bars(counts: list[tuple[str, int]], xlabel: str, limit: int = TOP_N) -> str | None:
    """Horizontal bars, largest first, as an SVG element."""
    counts = counts[:limit]
    if not counts:
        return None
    w, row, left, right = 480, 18, 170, 44
    h = 26 + row * len(counts)
    top = max(c for _, c in counts) or 1
    body = []
    for i, (label, value) in enumerate(counts):
        y = 4 + i * row
        bw = (w - left - right) * value / top
        short = label if len(label) <= 28 else label[:26] + "…"
        body.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end"><title>{_e(label)}</title>{_e(short)}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{bw:.1f}" height="{row - 5}" fill="{_COLOURS[0]}"/>'
                    f'<text x="{left + bw + 4:.1f}" y="{y + 12}">{value}</text>')  # fmt: skip
    body.append(f'<text x="{left + (w - left - right) / 2}" y="{h - 5}" text-anchor="middle" fill="#555">{_e(xlabel)}</text>')
    return _svg_doc(w, h, body, xlabel)


def _multiples(series: dict[str, np.ndarray], bins: int = 20, limit: int = 12) -> str | None:
    """One small histogram per series."""
    charts = [_hist({name: values}, name, bins=bins, small=True) for name, values in list(series.items())[:limit]]
    charts = [c for c in charts if c]
    return f'<div class="multiples">{"".join(charts)}</div>' if charts else None


@dataclass
class Plot:
    id: str
    title: str
    svg: str | None
    note: str = ""


def build_plots(data: RunData, seed: int = 0) -> list[Plot]:
    kept, rejected = data.kept, data.rejected
    plots: list[Plot] = []

    plots.append(Plot("durations", "Clip durations (s)",
                      _hist({"kept": _durations(kept), "rejected": _durations(rejected)}, "seconds")))  # fmt: skip

    sample = _text_sample(kept, seed)
    sampled = f" (a random sample of {MAX_TEXT_ROWS} clips)" if sample.num_rows < kept.num_rows else ""
    captions = _caption_texts(sample)
    lengths = {kind: np.array([len(_WORD.findall(t)) for t in texts]) for kind, texts in captions.items()}
    transcripts = _strings(sample, "transcript")
    if transcripts:
        lengths["transcript"] = np.array([len(_WORD.findall(t)) for t in transcripts])
    plots.append(Plot("caption-lengths", "Caption and transcript lengths (words)", _hist(lengths, "words"),
                      note=sampled))  # fmt: skip

    for name, texts in (("captions", [t for ts in captions.values() for t in ts]), ("transcripts", transcripts)):
        vocab, top = _word_stats(texts)
        note = f"vocabulary: {vocab} distinct words over {len(texts)} texts{sampled}" if texts else ""
        plots.append(Plot(f"words-{name}", f"Most frequent words in {name} (stop words removed)",
                          _bars(top, "occurrences"), note=note))  # fmt: skip

    languages = [x or "unknown" for x in (_col(kept, "language").to_pylist() if _col(kept, "language") else [])]
    plots.append(Plot("languages", "Languages (kept clips)",
                      _bars(_counts(languages), "clips") if any(x != "unknown" for x in languages) else None))
    plots.append(Plot("speech-ratio", "Speech ratio (kept clips)", _hist({"": _floats(kept, "speech_ratio")}, "speech ratio")))
    plots.append(Plot("audio-tags", "Audio tags (clips carrying each label)", _bars(_tag_counts(kept, "audio_tags"), "clips")))
    plots.append(Plot("visual-tags", "Visual tags (clips carrying each label)", _bars(_tag_counts(kept, "visual_tags"), "clips")))
    plots.append(Plot("scores", "Quality scores (kept clips)", _multiples({n: v for n, (v, _) in _scores(kept).items()})))
    signals = {s: np.concatenate([_floats(kept, s), _floats(rejected, s)]) for s in _signal_names(kept, rejected)}
    plots.append(Plot("signals", "Quality signals (kept and rejected clips)", _multiples(signals, limit=12)))
    plots.append(Plot("drop-reasons", "Drop reasons", _bars(_counts(_strings(rejected, "drop_reason")), "clips")))
    errors = [
        f"{s}/{t}" for s, t in zip(_strings(data.errors, "error_stage"), _strings(data.errors, "error_type"), strict=False)
    ]
    plots.append(Plot("errors", "Errors per stage / type", _bars(_counts(errors), "failures")))
    groups = Counter(_strings(rejected, "duplicate_of"))
    sizes = _counts([str(n + 1) for n in groups.values()])
    sizes.sort(key=lambda kv: int(kv[0]))
    plots.append(Plot("duplicates", "Duplicate group sizes (original + duplicates)", _bars(sizes, "groups", limit=50),
                      note=f"{len(groups)} groups, {sum(groups.values())} duplicates dropped" if groups else ""))
    return plots


# --------------------------------------------------------------------------- gallery media


def _thumb(data: bytes) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB_WIDTH, THUMB_WIDTH))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=60)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def opus_data_uri(audio: bytes, bitrate: int = AUDIO_BITRATE) -> str:
    """Re-encode an audio file (FLAC) to mono Ogg Opus at 16 kHz, as a data URI."""
    out_buf = io.BytesIO()
    with av.open(io.BytesIO(audio)) as src, av.open(out_buf, "w", format="ogg") as dst:
        stream = dst.add_stream("libopus", rate=16000, layout="mono")
        stream.bit_rate = bitrate
        stream.codec_context.options = {"compression_level": "2"}  # a preview: favour speed
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        fifo = av.AudioFifo()
        size = stream.codec_context.frame_size or 320

        def drain(final: bool) -> None:
            while fifo.samples >= size or (final and fifo.samples > 0):
                frame = fifo.read(min(size, fifo.samples) if final else size)
                if frame.samples < size:  # pad the last frame to the codec's frame size
                    pad = np.zeros((1, size), dtype=np.int16)
                    pad[0, : frame.samples] = frame.to_ndarray().reshape(-1)
                    frame = av.AudioFrame.from_ndarray(pad, format="s16", layout="mono")
                    frame.sample_rate = 16000
                for packet in stream.encode(frame):
                    dst.mux(packet)

        for frame in src.decode(audio=0):
            for out in resampler.resample(frame):
                out.pts = None
                fifo.write(out)
            drain(final=False)
        for out in resampler.resample(None):
            out.pts = None
            fifo.write(out)
        drain(final=True)
        for packet in stream.encode(None):
            dst.mux(packet)
    return "data:audio/ogg;base64," + base64.b64encode(out_buf.getvalue()).decode("ascii")


def _frame_index(name: str, key: str) -> int | None:
    rest = name[len(key) + 1 :]
    head, _, ext = rest.partition(".")
    return int(head) if ext == "jpg" and head.isdigit() else None


def _media(key: str, audio: bytes | None, frames: list[tuple[int, bytes]]) -> dict[str, Any]:
    """{"thumbs": [data URIs of up to THUMBS_PER_CLIP frames], "audio": Opus data URI or None}."""
    entry: dict[str, Any] = {"thumbs": [], "audio": None}
    if audio is not None:
        try:
            entry["audio"] = opus_data_uri(audio)
        except (av.error.FFmpegError, ValueError) as exc:
            log.warning("report: cannot re-encode the audio of %s: %s", key, exc)
    frames = sorted(frames)
    picks = sorted({round(x) for x in np.linspace(0, len(frames) - 1, min(len(frames), THUMBS_PER_CLIP))})
    entry["thumbs"] = [_thumb(frames[i][1]) for i in picks]
    return entry


def read_media(shard: Path, keys: set[str]) -> dict[str, dict[str, Any]]:
    """Thumbnails and audio of ``keys`` from one shard tar: key -> {"thumbs": [...], "audio": uri}."""
    audio: dict[str, bytes] = {}
    frames: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key not in keys or not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            if member.name.endswith(".flac"):
                audio[key] = f.read()
            elif (i := _frame_index(member.name, key)) is not None:
                frames[key].append((i, f.read()))
    return {k: _media(k, audio.get(k), frames.get(k, [])) for k in set(audio) | set(frames)}


def read_staged_media(staging: Path, video_id: str, key: str) -> dict[str, Any] | None:
    """Media of a clip still in the staging area (``write.keep_staging``), e.g. a rejected one."""
    folder = staging / "clips" / video_id
    flac = folder / f"{key}.flac"
    frames = [(i, p.read_bytes()) for p in folder.glob(f"{key}.*.jpg") if (i := _frame_index(p.name, key)) is not None]
    if not frames and not flac.exists():
        return None
    return _media(key, flac.read_bytes() if flac.exists() else None, frames)


# --------------------------------------------------------------------------- gallery


@dataclass
class Card:
    row: dict[str, Any]
    status: str  # "kept" or the drop reason
    groups: list[str]
    media: dict[str, Any] | None


def pick_gallery(data: RunData, cfg: ReportConfig) -> list[Card]:
    rng = random.Random(cfg.seed)
    kept, rejected = data.kept, data.rejected
    chosen: dict[int, list[str]] = defaultdict(list)
    for i in rng.sample(range(kept.num_rows), min(cfg.gallery_size, kept.num_rows)):
        chosen[i].append("sampled")
    ranks = _quality_rank(kept)
    for i in sorted(ranks, key=lambda r: (ranks[r], r))[: cfg.lowest]:
        chosen[i].append("lowest")
    cards: list[Card] = []
    if chosen:
        rows = kept.take(pa.array(sorted(chosen))).to_pylist()
        for i, row in zip(sorted(chosen), rows, strict=True):
            cards.append(Card(row, "kept", chosen[i], None))
    by_shard: dict[str, set[str]] = defaultdict(set)
    for card in cards:
        by_shard[card.row["shard"]].add(card.row["key"])
    media: dict[str, dict[str, Any]] = {}
    for shard, keys in by_shard.items():
        path = data.out_dir / layout.SHARDS / shard
        if path.exists():
            media.update(read_media(path, keys))
    for card in cards:
        card.media = media.get(card.row["key"])
    picks = sorted(rng.sample(range(rejected.num_rows), min(cfg.rejected, rejected.num_rows)))
    if picks:
        for row in rejected.take(pa.array(picks)).to_pylist():
            staged = read_staged_media(data.staging_dir, row["video_id"], row["key"]) if row.get("key") else None
            cards.append(Card(row, row.get("drop_reason") or "rejected", ["rejected"], staged))
    return cards


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _chips(tags: list[dict[str, Any]]) -> str:
    return "".join(
        f'<span class="chip">{_e(t.get("label"))} <b>{_num(t.get("score"))}</b></span>'
        for t in sorted(tags, key=lambda t: -(t.get("score") or 0.0))
    )


def render_card(card: Card) -> str:
    r = card.row
    tags = [t.get("label", "") for t in (r.get("audio_tags") or []) + (r.get("visual_tags") or [])]
    kept = card.status == "kept"
    badge = '<span class="badge kept">kept</span>' if kept else f'<span class="badge rejected">{_e(card.status)}</span>'
    badge += "".join(f'<span class="badge group">{_e(g)}</span>' for g in card.groups)
    start, end = r.get("clip_start"), r.get("clip_end")
    times = f"{start:.2f}–{end:.2f} s" if start is not None and end is not None else ""
    parts = [
        f'<div class="card" data-status="{_e(card.status)}" data-groups="{_e(" ".join(card.groups))}" '
        f'data-tags="{_e("|".join(t.lower() for t in tags))}" id="clip-{_e(r.get("key"))}">',
        f"<h3>{_e(r.get('key'))}</h3>",
        f'<div class="meta">{badge} {_e(times)} · {_e(r.get("source_url"))}</div>',
    ]
    media = card.media or {}
    if media.get("thumbs"):
        parts.append('<div class="thumbs">' + "".join(f'<img alt="frame" src="{u}">' for u in media["thumbs"]) + "</div>")
    else:
        parts.append('<div class="nomedia">no media: rejected clips are not written to shards '
                     '(set write.keep_staging=true to see them here)</div>'
                     if not kept else '<div class="nomedia">no frames</div>')  # fmt: skip
    if media.get("audio"):
        parts.append(f'<audio controls preload="metadata" src="{media["audio"]}"></audio>')
    rows: list[tuple[str, str]] = []
    if not kept:
        why = _e(r.get("drop_reason"))
        if r.get("duplicate_of"):
            why += f" (duplicate of <code>{_e(r['duplicate_of'])}</code>)"
        rows.append(("dropped because", why))
    if r.get("caption"):
        rows.append(("final caption", f"<b>{_e(r['caption'])}</b>"))
    if r.get("transcript"):
        lang = f" <span class=\"chip\">{_e(r.get('language'))}</span>" if r.get("language") else ""
        rows.append(("transcript", f'<div class="transcript">{_e(r["transcript"])}</div>{lang}'))
    if r.get("audio_tags"):
        rows.append(("audio tags", _chips(r["audio_tags"])))
    if r.get("visual_tags"):
        rows.append(("visual tags", _chips(r["visual_tags"])))
    if r.get("scores"):
        rows.append(("scores", " ".join(f'<span class="chip">{_e(s["name"])} <b>{_num(s["value"])}</b></span>'
                                        for s in r["scores"])))  # fmt: skip
    signals = [(s, v) for s, v in r.items() if s not in _NOT_SIGNALS - {"speech_ratio"} and v is not None
               and isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    if signals:
        rows.append(("signals", " ".join(f'<span class="chip">{_e(s)} <b>{_num(v)}</b></span>' for s, v in signals)))
    parts.append("<table>" + "".join(f'<tr><td class="k">{k}</td><td>{v}</td></tr>' for k, v in rows) + "</table>")
    captions = r.get("captions") or []
    if captions:
        head = "<tr><th>kind</th><th>caption</th><th>model</th><th>prompt</th></tr>"
        body = "".join(
            f"<tr><td>{_e(c.get('kind'))}</td><td>{_e(c.get('text'))}</td><td>{_e(c.get('model'))}</td>"
            f"<td>{_e(c.get('prompt_id'))}</td></tr>"
            for c in captions
        )
        parts.append(f'<table class="captions">{head}{body}</table>')
    parts.append("</div>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- page


def _asset(name: str) -> str:
    return (resources.files("pipeline.tools") / "report_assets" / name).read_text(encoding="utf-8")


def _kpi(value: str, label: str) -> str:
    return f'<div class="kpi"><div class="v">{_e(value)}</div><div class="l">{_e(label)}</div></div>'


def _overview(data: RunData) -> str:
    s = data.stats
    clips = s.get("clips", {})
    runs = s.get("runs", [])
    wall = sum(r.get("wall_seconds") or 0.0 for r in runs)
    video_s = sum(r.get("video_seconds") or 0.0 for r in runs)
    kept_hours = float(_durations(data.kept).sum()) / 3600
    kpis = [
        _kpi(str(s.get("inputs", "–")), "inputs"),
        _kpi(str(clips.get("kept", data.kept.num_rows)), "clips kept"),
        _kpi(str(clips.get("rejected", data.rejected.num_rows)), "clips rejected"),
        _kpi(str(clips.get("errored", "–")), "clips errored"),
        _kpi(str(s.get("videos", {}).get("errored", "–")), "videos failed"),
        _kpi(f"{kept_hours:.3f} h", "kept audio-video"),
        _kpi(f"{video_s / 3600:.3f} h", "source video processed"),
        _kpi(f"{video_s / wall:.2f}" if wall > 0 else "–", "video-seconds per second"),
        _kpi(f"{wall:.1f} s", f"wall time ({len(runs)} run{'s' if len(runs) != 1 else ''})"),
    ]
    stage_s: Counter[str] = Counter()
    stage_rows: Counter[str] = Counter()
    for r in runs:
        for name, st in (r.get("stages") or {}).items():
            stage_s[name] += st.get("seconds") or 0.0
            stage_rows[name] += st.get("rows") or 0
    stage_table = ""
    if stage_s:
        body = "".join(
            f"<tr><td>{_e(n)}</td><td>{stage_s[n]:.2f}</td><td>{stage_rows[n]}</td>"
            f"<td>{(stage_s[n] / stage_rows[n] * 1000 if stage_rows[n] else 0):.1f}</td></tr>"
            for n in stage_s
        )
        stage_table = ("<h3>Stage time</h3><table><tr><th>stage</th><th>seconds</th><th>rows</th><th>ms / row</th></tr>"
                       f"{body}</table>")  # fmt: skip
    return (
        '<section id="overview"><h2>Overview</h2>'
        f'<div class="kpis">{"".join(kpis)}</div>{stage_table}'
        f"<details><summary>Config</summary><pre>{_e(data.config_text)}</pre></details></section>"
    )


def _plots_html(plots: list[Plot]) -> str:
    figs = []
    for p in plots:
        body = p.svg or '<div class="empty">no data in this run</div>'
        note = f" — {_e(p.note)}" if p.note else ""
        wide = ' class="wide"' if p.svg and p.svg.startswith('<div class="multiples">') else ""
        figs.append(f'<figure id="plot-{p.id}"{wide}>{body}<figcaption>{_e(p.title)}{note}</figcaption></figure>')
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{"".join(figs)}</div></section>'


def _errors_html(data: RunData, limit: int = 50) -> str:
    if data.errors.num_rows == 0:
        return '<section id="errors"><h2>Errors</h2><p class="empty">no errors</p></section>'
    rows = data.errors.slice(0, limit).to_pylist()
    body = "".join(
        f"<tr><td>{_e(r.get('error_stage'))}</td><td>{_e(r.get('error_type'))}</td><td>{_e(r.get('key') or r.get('video_id'))}</td>"
        f"<td>{_e(r.get('source_url'))}</td><td>{_e((r.get('error') or '')[:300])}</td></tr>"
        for r in rows
    )
    more = f"<p>{data.errors.num_rows - limit} more in errors.parquet</p>" if data.errors.num_rows > limit else ""
    return (
        '<section id="errors"><h2>Errors</h2><table><tr><th>stage</th><th>type</th><th>key / video</th>'
        f"<th>source</th><th>message</th></tr>{body}</table>{more}</section>"
    )


def _gallery_html(cards: list[Card]) -> str:
    statuses = sorted({c.status for c in cards} - {"kept"})
    options = '<option value="">all</option><option value="kept">kept</option>' + "".join(
        f'<option value="{_e(s)}">{_e(s)}</option>' for s in statuses
    )
    groups = "".join(
        f'<option value="{g}">{g}</option>' for g in ("sampled", "lowest", "rejected") if any(g in c.groups for c in cards)
    )
    filters = (
        '<div class="filters"><label>status / reason <select id="f-status">' + options + "</select></label>"
        '<label>group <select id="f-group"><option value="">all</option>' + groups + "</select></label>"
        '<label>tag <input id="f-tag" type="search" placeholder="e.g. speech"></label><span id="shown"></span></div>'
    )
    body = "\n".join(render_card(c) for c in cards) if cards else '<p class="empty">no clips</p>'
    return f'<section id="gallery"><h2>Gallery</h2>{filters}<div class="gallery">{body}</div></section>'


def render_report(data: RunData, cfg: ReportConfig) -> str:
    plots = build_plots(data, cfg.seed)
    cards = pick_gallery(data, cfg)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>avforge report: {_e(data.out_dir.name)}</title><link rel="icon" href="data:,">
<style>{_asset("report.css")}</style></head>
<body><header><h1>avforge caption-quality report</h1>
<div class="sub">{_e(data.out_dir)} · generated {when}</div></header>
<nav><a href="#overview">Overview</a><a href="#plots">Plots</a><a href="#gallery">Gallery</a><a href="#errors">Errors</a></nav>
<main>{_overview(data)}{_plots_html(plots)}{_gallery_html(cards)}{_errors_html(data)}</main>
<script>{_asset("report.js")}</script></body></html>
"""


def write_report(out_dir: str | Path, cfg: ReportConfig | None = None) -> Path:
    """Write ``out_dir/report/index.html`` from a finished (or partial) run; returns its path."""
    out = Path(out_dir)
    started = time.monotonic()
    page = render_report(load_run(out), cfg or ReportConfig())
    target = out / "report" / "index.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".index.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    log.info("wrote %s (%.0f KiB, %.1f s)", target, target.stat().st_size / 1024, time.monotonic() - started)
    return target

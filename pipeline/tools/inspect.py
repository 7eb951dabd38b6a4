"""``avforge inspect PATH``: a terminal summary of an output folder or one shard, and a few samples.

``describe(path)`` returns the text; ``describe(path, key=K)`` shows one sample in full (every
member with its size, audio length, frame sizes and the whole ``KEY.json``). For an output folder
a key that was rejected or failed is looked up in ``rejects.parquet`` / ``errors.parquet``.
"""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pyarrow.parquet as pq
from PIL import Image

from pipeline import layout
from pipeline.errors import AvforgeError

_SKIP = {"visual_embedding", "text_embedding"}
_WIDTH = 100


def iter_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar, in order."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(shard, "r:") as tar:
        for m in tar:
            if not m.isfile() or "." not in Path(m.name).name:
                continue
            k, ext = m.name.split(".", 1)
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            f = tar.extractfile(m)
            members[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, members


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _audio_info(data: bytes) -> str:
    try:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.audio[0]
            seconds = c.duration / 1_000_000 if c.duration else 0.0
            return f"{seconds:.2f} s, {s.sample_rate} Hz, {s.channels} ch, {s.codec_context.name}"
    except (av.error.FFmpegError, IndexError) as exc:
        return f"unreadable ({exc})"


def _image_info(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"{im.width}x{im.height} {im.format}"
    except OSError as exc:
        return f"unreadable ({exc})"


def _clip(text: str | None, width: int = _WIDTH - 16) -> str:
    return textwrap.shorten(text or "", width=width, placeholder=" …") if text else "–"


def _tags(tags: list[dict[str, Any]] | None) -> str:
    return ", ".join(f"{t['label']} {t['score']:.2f}" for t in (tags or [])[:5]) or "–"


def _sample_lines(key: str, members: dict[str, bytes]) -> list[str]:
    doc = json.loads(members["json"]) if "json" in members else {}
    start, end = doc.get("clip_start"), doc.get("clip_end")
    span = f"{end - start:.2f} s [{start:.2f}–{end:.2f}]" if start is not None and end is not None else "?"
    frames = [n for n in members if n.endswith(".jpg")]
    frame_info = f"{len(frames)} frames {_image_info(members[frames[0]]).split()[0]}" if frames else "no frames"
    audio = f"audio {_audio_info(members['flac'])}" if "flac" in members else "no audio"
    lines = [f"  {key}  {span}  {frame_info}  {audio}"]
    caption = members.get("txt", b"").decode("utf-8")
    lines.append(f"      caption:    {_clip(caption)}")
    lines.append(f"      transcript: {_clip(doc.get('transcript'))}" + (f"  ({doc['language']})" if doc.get("language") else ""))
    lines.append(f"      captions:   {len(doc.get('captions') or [])}  " +
                 "; ".join(f"{c['kind']}/{c['model']}" for c in doc.get("captions") or []))  # fmt: skip
    lines.append(f"      audio tags: {_tags(doc.get('audio_tags'))}   visual tags: {_tags(doc.get('visual_tags'))}")
    if doc.get("scores"):
        lines.append("      scores:     " + ", ".join(f"{s['name']} {s['value']:.3f}" for s in doc["scores"]))
    return lines


def _full_sample(key: str, members: dict[str, bytes], where: str) -> str:
    lines = [f"sample {key} in {where}", "members:"]
    for ext, data in members.items():
        info = ""
        if ext == "flac":
            info = _audio_info(data)
        elif ext.endswith(".jpg"):
            info = _image_info(data)
        elif ext == "txt":
            info = repr(data.decode("utf-8"))
        lines.append(f"  {key}.{ext:<8} {_size(len(data)):>10}  {info}")
    if "json" in members:
        lines += [f"{key}.json:", json.dumps(json.loads(members["json"]), indent=2, ensure_ascii=False)]
    return "\n".join(lines)


def _counts(values: list[Any]) -> str:
    return ", ".join(f"{k} {n}" for k, n in Counter(v for v in values if v).most_common(10)) or "–"


def _describe_shard(shard: Path, samples: int) -> str:
    exts: Counter[str] = Counter()
    n = 0
    shown: list[str] = []
    for key, members in iter_samples(shard):
        n += 1
        exts.update(e.rsplit(".", 1)[-1] for e in members)
        if len(shown) < samples:
            shown += _sample_lines(key, members)
    lines = [
        f"shard {shard} ({_size(shard.stat().st_size)})",
        f"  samples: {n}",
        "  members: " + ", ".join(f"{e} {c}" for e, c in sorted(exts.items())),
    ]
    side = shard.with_suffix(".parquet")
    if side.exists():
        lines.append(f"  sidecar: {side.name} ({pq.read_metadata(side).num_rows} rows)")
    if shown:
        lines += ["", f"first {min(samples, n)} samples:", *shown]
    return "\n".join(lines)


def _filled(table: Any) -> str:
    out = []
    for name in ("transcript", "language", "speech_ratio", "audio_tags", "visual_tags", "captions", "caption", "scores"):
        if name not in table.column_names:
            continue
        values = table.column(name).to_pylist()
        out.append(f"{name} {sum(1 for v in values if v not in (None, '', []))}")
    return ", ".join(out)


def _describe_folder(out: Path, samples: int) -> str:
    stats = json.loads((out / layout.STATS).read_text()) if (out / layout.STATS).exists() else {}
    clips = stats.get("clips", {})
    shards = sorted((out / layout.SHARDS).glob(f"*{layout.TAR}"))
    index_path = out / layout.INDEX
    lines = [f"avforge output {out}"]
    if stats:
        lines.append(
            f"  inputs {stats.get('inputs')} · kept {clips.get('kept')} · rejected {clips.get('rejected')} · "
            f"errored clips {clips.get('errored')} · failed videos {stats.get('videos', {}).get('errored')}"
        )
        runs = stats.get("runs") or []
        wall = sum(r.get("wall_seconds") or 0 for r in runs)
        video = sum(r.get("video_seconds") or 0 for r in runs)
        lines.append(f"  {len(runs)} run(s): {wall:.1f} s wall, {video:.1f} s of video"
                     + (f" ({video / wall:.2f} video-s/s)" if wall else ""))  # fmt: skip
        lines.append(f"  drop reasons: {_counts([k for k, n in (stats.get('drop_reasons') or {}).items() for _ in range(n)])}")
        lines.append(f"  errors: {_counts([k for k, n in (stats.get('errors') or {}).items() for _ in range(n)])}")
    lines.append(f"  shards: {len(shards)} tars, {_size(sum(s.stat().st_size for s in shards))}")
    if index_path.exists():
        names = [n for n in pq.read_schema(index_path).names if n not in _SKIP]
        index = pq.read_table(index_path, columns=names)
        if index.num_rows:
            durations = [e - s for s, e in zip(index.column("clip_start").to_pylist(), index.column("clip_end").to_pylist(),
                                               strict=True) if s is not None and e is not None]  # fmt: skip
            lines.append(f"  kept clips: {index.num_rows}, {sum(durations) / 3600:.3f} h, "
                         f"mean {sum(durations) / max(1, len(durations)):.2f} s")  # fmt: skip
            lines.append(f"  languages: {_counts(index.column('language').to_pylist())}")
            lines.append(f"  filled: {_filled(index)}")
    report = out / "report" / "index.html"
    if report.exists():
        lines.append(f"  report: {report}")
    if shards and samples:
        shown: list[str] = []
        for i, (key, members) in enumerate(iter_samples(shards[0])):
            if i >= samples:
                break
            shown += _sample_lines(key, members)
        lines += ["", f"samples from {shards[0].name}:", *shown]
    return "\n".join(lines)


def _find_in_folder(out: Path, key: str) -> str:
    index_path = out / layout.INDEX
    if index_path.exists():
        hit = pq.read_table(index_path, columns=["key", layout.SHARD_COLUMN], filters=[("key", "=", key)]).to_pylist()
        if hit:
            return _find_in_shard(out / layout.SHARDS / hit[0][layout.SHARD_COLUMN], key)
    for name, label in ((layout.REJECTS, "rejected"), (layout.ERRORS, "failed")):
        path = out / name
        if not path.exists():
            continue
        names = [n for n in pq.read_schema(path).names if n not in _SKIP]
        rows = pq.read_table(path, columns=names, filters=[("key", "=", key)]).to_pylist()
        if rows:
            return f"{key} was {label} (in {name}; no media kept):\n" + json.dumps(rows[0], indent=2, default=str)
    raise AvforgeError(f"no clip {key!r} in {out} (not in index, rejects or errors)")


def _find_in_shard(shard: Path, key: str) -> str:
    for k, members in iter_samples(shard):
        if k == key:
            return _full_sample(k, members, str(shard))
    raise AvforgeError(f"no sample {key!r} in {shard}")


def describe(path: str | Path, *, samples: int = 3, key: str | None = None) -> str:
    """The summary of an output folder or shard tar (or, with ``key``, that one sample in full)."""
    p = Path(path)
    if p.is_dir():
        if not (p / layout.SHARDS).is_dir() and not (p / layout.INDEX).exists():
            raise AvforgeError(f"{p} is not an avforge output folder (no shards/ or index.parquet)")
        return _find_in_folder(p, key) if key else _describe_folder(p, samples)
    if p.suffix == ".tar" and p.exists():
        return _find_in_shard(p, key) if key else _describe_shard(p, samples)
    raise AvforgeError(f"{p}: expected an output folder or a .tar shard")

"""Read avforge output for training: streaming, random access, index queries, Hugging Face datasets.

An output folder (``avforge run --output DIR``) holds WebDataset shards ``DIR/shards/*.tar`` with
one sample per clip (``KEY.flac``, ``KEY.0.jpg`` ... ``KEY.{k}.jpg``, optional ``KEY.mp4``,
``KEY.json``, ``KEY.txt``), their sidecars ``DIR/shards/*.parquet`` (same order as the tar) and
``DIR/index.parquet`` (one row per kept clip, with its ``shard``). ``DIR`` may be a local folder or
an object-store / HTTP URL (read through fsspec and webdataset's ``gopen``).

Streaming, for training (a ``torch.utils.data.IterableDataset``)::

    from torch.utils.data import DataLoader
    from pipeline.tools.loader import load_shards, query_index

    picked = query_index("out/", languages=["en"], min_duration=3.0, audio_tags=["Speech"],
                         min_scores={"caption_quality": 0.5})
    ds = load_shards("out/", keys=picked, audio_rate=16000, frames="tensor", shuffle=1000, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for sample in DataLoader(ds, batch_size=None, num_workers=4):
            sample["key"], sample["audio"], sample["frames"], sample["caption"], sample["meta"]

Shards are split across nodes (``rank`` / ``world_size``, by default from ``torch.distributed``
or the ``RANK`` / ``WORLD_SIZE`` variables) and then across DataLoader workers, so every sample is
read exactly once per epoch; give it at least ``world_size * num_workers`` shards to keep every
worker busy. Clips have different lengths: use ``batch_size=None``, or ``collate_fn=collate_clips`` (pads audio).

Random access by position or key (``wids``; needs torch)::

    clips = open_random_access("out/")
    clips[0], clips.get("vid_0003"), len(clips)
    sampler = wids.DistributedChunkedSampler(clips.dataset, chunksize=1000)  # shard-friendly order

Hugging Face ``datasets`` (the "webdataset" builder; audio stays FLAC bytes, since the datasets
``Audio`` feature needs torchcodec; decode it with :func:`decode_audio`)::

    from datasets import load_dataset
    from pipeline.tools.loader import hf_features, shard_urls

    ds = load_dataset("webdataset", data_files={"train": shard_urls("out/")},
                      features=hf_features("out/"), split="train")  # or streaming=True
    row = ds[0]   # row["json"] (dict), row["txt"], row["0.jpg"] (PIL), row["flac"] (bytes)
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from webdataset.pytorch import IterableDataset
from webdataset.tariterators import tarfile_samples

from pipeline import layout

log = logging.getLogger(__name__)

FrameFormat = Literal["tensor", "pil", "none"]
Source = str | Path | Sequence[str]
Sample = dict[str, Any]

__all__ = [
    "ClipStream",
    "RandomAccessClips",
    "collate_clips",
    "decode_audio",
    "decode_sample",
    "hf_features",
    "load_shards",
    "open_random_access",
    "query_index",
    "read_index",
    "shard_urls",
]


# --------------------------------------------------------------------------- locations


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _join(base: str | Path, *parts: str) -> str:
    base = str(base)
    if _is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(_local(base)).joinpath(*parts))


def _read_parquet(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    cols = list(columns) if columns is not None else None
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return pq.read_table(f, columns=cols)
    return pq.read_table(_local(path), columns=cols)


def _read_schema(path: str) -> pa.Schema:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return pq.read_schema(f)
    return pq.read_schema(_local(path))


def read_index(source: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """``index.parquet`` of an output folder (local or URL), optionally only ``columns``."""
    return _read_parquet(_join(source, layout.INDEX), columns)


def shard_urls(source: Source, keys: pa.Table | None = None) -> list[str]:
    """The shard tars of ``source``.

    ``source`` is an output folder (local path or URL), one ``.tar`` path or brace pattern
    (``s3://b/shards/{000000..000009}.tar``), or a list of tar URLs. Given ``keys`` (a table
    from :func:`query_index`), only the shards holding those clips.
    """
    if not isinstance(source, (str, Path)):
        return [str(u) for u in source]
    text = str(source)
    if text.endswith(".tar") or "{" in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    table = keys if keys is not None else read_index(text, [layout.SHARD_COLUMN])
    names = sorted(set(table.column(layout.SHARD_COLUMN).to_pylist()))
    return [_join(text, layout.SHARDS, n) for n in names]


# --------------------------------------------------------------------------- index queries


def _rows_with_item(column: pa.ChunkedArray, mask_of: Callable[[pa.StructArray], pa.Array]) -> np.ndarray:
    """Rows of a list<struct> column with at least one item for which ``mask_of`` is true."""
    lists = column.combine_chunks()
    out = np.zeros(len(lists), dtype=bool)
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return out
    parents = pc.list_parent_indices(lists)
    hits = pc.filter(parents, pc.fill_null(mask_of(flat), False))
    out[hits.to_numpy(zero_copy_only=False)] = True
    return out


def _tag_rows(column: pa.ChunkedArray, labels: Iterable[str], min_score: float) -> np.ndarray:
    wanted = pa.array([label.lower() for label in labels], pa.string())

    def mask(flat: pa.StructArray) -> pa.Array:
        label = pc.utf8_lower(pc.struct_field(flat, "label"))
        return pc.and_(pc.is_in(label, value_set=wanted), pc.greater_equal(pc.struct_field(flat, "score"), min_score))

    return _rows_with_item(column, mask)


def _score_rows(column: pa.ChunkedArray, name: str, minimum: float) -> np.ndarray:
    def mask(flat: pa.StructArray) -> pa.Array:
        return pc.and_(
            pc.equal(pc.struct_field(flat, "name"), name), pc.greater_equal(pc.struct_field(flat, "value"), minimum)
        )

    return _rows_with_item(column, mask)


def query_index(
    source: str | Path | pa.Table,
    *,
    languages: Iterable[str] | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    audio_tags: Iterable[str] | None = None,
    visual_tags: Iterable[str] | None = None,
    min_tag_score: float = 0.0,
    min_scores: Mapping[str, float] | None = None,
    where: pc.Expression | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of ``index.parquet`` (of a folder, or a table already read) that match every condition.

    - ``languages``: the clip's ``language`` is one of these;
    - ``min_duration`` / ``max_duration``: bounds on ``clip_end - clip_start`` in seconds;
    - ``audio_tags`` / ``visual_tags``: the clip has one of these labels (case-insensitive) with
      a score of at least ``min_tag_score``;
    - ``min_scores``: for each name, the clip has that score with at least this value;
    - ``where``: any further pyarrow expression, e.g. ``pc.field("speech_ratio") > 0.5``.

    The result keeps ``key`` and ``shard`` (pass it to :func:`load_shards` as ``keys``); give
    ``columns`` to keep only those (plus ``key`` and ``shard``).
    """
    if isinstance(source, pa.Table):
        table = source
    else:
        # embeddings are large and never filtered on: skip them unless asked for
        skip = {"visual_embedding", "text_embedding"} - set(columns or ())
        names = [n for n in _read_schema(_join(source, layout.INDEX)).names if n not in skip]
        table = read_index(source, names)
    keep = np.ones(table.num_rows, dtype=bool)
    if languages is not None:
        keep &= pc.fill_null(pc.is_in(table["language"], value_set=pa.array(list(languages))), False).to_numpy()
    if min_duration is not None or max_duration is not None:
        duration = pc.subtract(table["clip_end"], table["clip_start"])
        if min_duration is not None:
            keep &= pc.fill_null(pc.greater_equal(duration, min_duration), False).to_numpy()
        if max_duration is not None:
            keep &= pc.fill_null(pc.less_equal(duration, max_duration), False).to_numpy()
    if audio_tags is not None:
        keep &= _tag_rows(table["audio_tags"], audio_tags, min_tag_score)
    if visual_tags is not None:
        keep &= _tag_rows(table["visual_tags"], visual_tags, min_tag_score)
    for name, minimum in (min_scores or {}).items():
        keep &= _score_rows(table["scores"], name, minimum)
    table = table.filter(pa.array(keep))
    if where is not None:
        table = table.filter(where)
    if columns is not None:
        wanted = ["key", "shard"] + [c for c in columns if c not in ("key", "shard")]
        table = table.select([c for c in wanted if c in table.column_names])
    return table


# --------------------------------------------------------------------------- decoding


def decode_audio(data: bytes, rate: int) -> np.ndarray:
    """Decode an audio file's bytes to mono float32 samples in [-1, 1] at ``rate`` Hz."""
    chunks: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def _frame_names(members: Mapping[str, Any]) -> list[str]:
    """``0.jpg``, ``1.jpg``, ... in frame order."""
    names = [n for n in members if n.endswith(".jpg") and n.split(".", 1)[0].isdigit()]
    return sorted(names, key=lambda n: int(n.split(".", 1)[0]))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if hasattr(value, "read"):
        return value.read()  # type: ignore[no-any-return]
    return bytes(value)


def decode_sample(members: Mapping[str, Any], audio_rate: int | None = 16000, frames: FrameFormat = "tensor") -> Sample:
    """Turn one shard sample (member extension -> bytes, plus ``__key__``) into training fields.

    Returns ``key``, ``meta`` (the ``KEY.json`` document), ``caption`` (``KEY.txt``),
    ``frame_times``, ``audio`` (float32 tensor of shape ``(samples,)``, when ``audio_rate`` is
    set), ``sample_rate``, ``frames`` (uint8 tensor ``(T, H, W, 3)`` or a list of PIL images;
    absent for ``frames="none"``) and ``mp4`` (bytes) when the shard carries the clip video.
    """
    m = {k.lstrip("."): v for k, v in members.items()}
    meta = json.loads(_as_bytes(m["json"]).decode("utf-8"))
    out: Sample = {
        "key": m["__key__"],
        "meta": meta,
        "caption": _as_bytes(m["txt"]).decode("utf-8") if "txt" in m else "",
        "frame_times": list(meta.get("frame_times") or []),
    }
    if "__url__" in m:
        out["shard"] = m["__url__"]
    if audio_rate is not None and "flac" in m:
        import torch

        out["audio"] = torch.from_numpy(decode_audio(_as_bytes(m["flac"]), audio_rate))
        out["sample_rate"] = audio_rate
    if frames != "none":
        images = [Image.open(io.BytesIO(_as_bytes(m[n]))).convert("RGB") for n in _frame_names(m)]
        if frames == "pil":
            out["frames"] = images
        else:
            import torch

            arrays = [np.asarray(im) for im in images]
            out["frames"] = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    if "mp4" in m:
        out["mp4"] = _as_bytes(m["mp4"])
    return out


# --------------------------------------------------------------------------- streaming


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker() -> tuple[int, int]:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:
        return 0, 1
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ClipStream(IterableDataset):  # type: ignore[misc]
    """An iterable of decoded clips over shards, split by node and DataLoader worker.

    Build it with :func:`load_shards`. Call :meth:`set_epoch` before each epoch to get a new
    shuffle order (the order is a function of ``seed`` and the epoch only).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        keys: frozenset[str] | None,
        audio_rate: int | None,
        frames: FrameFormat,
        shuffle: int,
        seed: int,
        rank: int | None,
        world_size: int | None,
        skip_errors: bool,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.keys = keys
        self.audio_rate = audio_rate
        self.frames: FrameFormat = frames
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skip_errors = skip_errors
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        """The shards this node and worker read in this epoch."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        rank, world = _distributed(self.rank, self.world_size)
        worker, workers = _worker()
        if len(urls) < world * workers:
            log.warning("%d shards for %d nodes x %d workers: some workers get no data", len(urls), world, workers)
        return urls[rank * workers + worker :: world * workers]

    def _handler(self, exc: Exception) -> bool:
        if not self.skip_errors:
            raise exc
        log.warning("skipping a sample that failed to read or decode: %s", exc)
        return True

    def __iter__(self) -> Iterator[Sample]:
        samples: Iterator[Sample] = tarfile_samples(({"url": u} for u in self.my_shards()), handler=self._handler)
        if self.keys is not None:
            samples = (s for s in samples if s["__key__"] in self.keys)
        if self.shuffle > 1:
            rank, _ = _distributed(self.rank, self.world_size)
            worker, _ = _worker()
            samples = _shuffled(samples, self.shuffle, random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}"))
        for s in samples:
            try:
                yield decode_sample(s, self.audio_rate, self.frames)
            except Exception as exc:  # noqa: BLE001 - a bad sample is skipped or raised as asked
                self._handler(exc)


def _shuffled(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Shuffle through a buffer of ``size`` items."""
    buf: list[Sample] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def load_shards(
    source: Source,
    *,
    keys: pa.Table | Iterable[str] | None = None,
    audio_rate: int | None = 16000,
    frames: FrameFormat = "tensor",
    shuffle: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    skip_errors: bool = False,
) -> ClipStream:
    """Stream decoded clips from the shards of ``source`` (see :func:`shard_urls`).

    - ``keys``: only these clips; a table from :func:`query_index` also narrows the shards read;
    - ``audio_rate``: decode ``KEY.flac`` to mono float32 at this rate (None: no audio);
    - ``frames``: ``"tensor"`` (uint8 ``(T, H, W, 3)``), ``"pil"`` or ``"none"``;
    - ``shuffle``: shuffle the shard order and samples through a buffer of this many (0: in order);
    - ``rank`` / ``world_size``: this node's place (default: torch.distributed, then env vars);
    - ``skip_errors``: log and skip samples that fail to read or decode instead of raising.
    """
    table = keys if isinstance(keys, pa.Table) else None
    urls = shard_urls(source, table) if table is not None and isinstance(source, (str, Path)) else shard_urls(source)
    wanted: frozenset[str] | None = None
    if table is not None:
        wanted = frozenset(table.column("key").to_pylist())
    elif keys is not None:
        wanted = frozenset(keys)  # type: ignore[arg-type]
    return ClipStream(
        urls, keys=wanted, audio_rate=audio_rate, frames=frames, shuffle=shuffle, seed=seed,
        rank=rank, world_size=world_size, skip_errors=skip_errors,
    )  # fmt: skip


def collate_clips(samples: list[Sample]) -> dict[str, Any]:
    """A DataLoader ``collate_fn`` for clips of different lengths.

    ``audio`` is zero-padded to the longest clip, with ``audio_lengths``; ``frames`` (tensors of one
    size) are stacked to ``(B, T, H, W, 3)`` when every clip has the same count, else kept as a
    list; ``key``, ``caption``, ``meta`` and ``frame_times`` become lists.
    """
    import torch

    out: dict[str, Any] = {name: [s[name] for s in samples] for name in ("key", "caption", "meta", "frame_times")}
    if samples and "audio" in samples[0]:
        lengths = [len(s["audio"]) for s in samples]
        audio = torch.zeros((len(samples), max(lengths)), dtype=torch.float32)
        for i, s in enumerate(samples):
            audio[i, : lengths[i]] = s["audio"]
        out.update(audio=audio, audio_lengths=torch.tensor(lengths), sample_rate=samples[0]["sample_rate"])
    if samples and "frames" in samples[0]:
        frames = [s["frames"] for s in samples]
        same = all(isinstance(f, torch.Tensor) and f.shape == frames[0].shape for f in frames)
        out["frames"] = torch.stack(frames) if same else frames
    return out


# --------------------------------------------------------------------------- random access


class RandomAccessClips:
    """Clips by position or key over a ``wids.ShardListDataset`` (``.dataset``)."""

    def __init__(self, dataset: Any, keys: list[str]) -> None:
        self.dataset = dataset
        self.keys = keys
        self._position = {k: i for i, k in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample:
        return self.dataset[index]  # type: ignore[no-any-return]

    def position(self, key: str) -> int:
        return self._position[key]

    def get(self, key: str) -> Sample:
        return self[self._position[key]]


def open_random_access(
    source: str | Path,
    *,
    audio_rate: int | None = 16000,
    frames: FrameFormat = "tensor",
    cache_dir: str | Path | None = None,
) -> RandomAccessClips:
    """Random access to the clips of an output folder through ``wids``.

    Local shards are read in place; remote ones are copied to ``cache_dir`` (default: wids's
    ``$WIDS_CACHE`` or ``/tmp/_wids_cache``). Positions follow the shard order, and the sample
    order inside each shard (from the shard sidecars).
    """
    from wids import ShardListDataset
    from wids.wids import DefaultLocalname

    urls = shard_urls(source)
    shardlist: list[dict[str, Any]] = []
    keys: list[str] = []
    for url in urls:
        side = _read_parquet(url[: -len(".tar")] + ".parquet", ["key"]).column("key").to_pylist()
        shardlist.append({"url": _local(url) if not _is_url(url) else url, "nsamples": len(side)})
        keys.extend(side)

    def transform(sample: Sample) -> Sample:
        return decode_sample(sample, audio_rate, frames)

    if all(not _is_url(u) for u in urls):
        localname: Callable[[str], str] = str  # read local shards where they are: no copy
    else:  # one cache file per full URL (wids's cache_dir= keys by file name only, which collides)
        localname = DefaultLocalname(str(cache_dir or os.environ.get("WIDS_CACHE", "/tmp/_wids_cache")))
    dataset = ShardListDataset(shardlist, localname=localname, transformations=[transform])
    return RandomAccessClips(dataset, keys)


# --------------------------------------------------------------------------- Hugging Face datasets


def hf_features(source: Source) -> Any:
    """``datasets.Features`` for loading these shards with the "webdataset" builder.

    Frames as ``Image``, ``json`` as ``Json``, ``txt`` as a string and ``flac`` / ``mp4`` as raw
    bytes (the ``Audio`` feature needs torchcodec; decode the bytes with :func:`decode_audio`).
    The member set is read from the first sample of the first shard.
    """
    from datasets import Features, Image as HFImage, Json, Value

    urls = shard_urls(source)
    if not urls:
        raise ValueError(f"no shards in {source}")
    first = next(iter(tarfile_samples([{"url": urls[0]}])))
    features: dict[str, Any] = {}
    for name in first:
        if name.startswith("__"):
            continue
        if name.endswith(".jpg"):
            features[name] = HFImage()
        elif name == "json":
            features[name] = Json()
        elif name == "txt":
            features[name] = Value("string")
        else:
            features[name] = Value("binary")
    features["__key__"] = Value("string")
    features["__url__"] = Value("string")
    return Features(features)

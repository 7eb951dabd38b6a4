"""The training loader (pipeline/tools/loader.py) on real runs of the pipeline over generated media.

The runs here (``make_run``, behind the session fixtures ``plain_run`` and ``enriched_run`` in
conftest.py) are shared with tests/test_inspect.py and tests/test_report.py:

- ``plain``: the default stages, as a user runs them;
- ``enriched``: the same plus ``EnrichStage`` (test-only), which fills every signal the model
  stages add (transcript, segments, language, tags, embeddings, captions, scores), drops some
  clips (a low score, a duplicate) and fails one, so every field and outcome is exercised.
"""

from __future__ import annotations

import copy
import json
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import QualityConfig, load_config
from pipeline.errors import StageError
from pipeline.runner import run_pipeline
from pipeline.tools.samples import generate_corpus
from pipeline.stage import Resources, Row, Stage
from schemas.records import shard_json

torch = pytest.importorskip("torch")

from pipeline.tools.loader import (  # noqa: E402 - after the torch check
    collate_clips,
    decode_audio,
    hf_features,
    load_shards,
    open_random_access,
    query_index,
    read_index,
    shard_urls,
)

ENRICHED_OVERRIDES = [
    "split.clip_seconds=3",
    "write.max_samples_per_shard=2",
    "write.keep_staging=true",
    "stages=[download,split,extract,quality,test_enrich]",
]
LANGS = ("en", "de", "fr")
AUDIO_LABELS = ("Speech", "Music", "Narration, monologue", "Wind")
VISUAL_LABELS = ("a test pattern", "a fractal", "colour bars", "a moving box")


class EnrichStage(Stage[QualityConfig]):
    """Test-only: fills the fields model stages would, deterministically from the key."""

    name = "test_enrich"
    writes = (
        "transcript", "language", "language_prob", "asr_segments", "asr_flags", "speech_ratio", "audio_tags",
        "visual_tags", "visual_embedding", "text_embedding", "captions", "caption", "scores", "drop_reason",
        "duplicate_of",
    )  # fmt: skip

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return 1000

    def process_batch(self, rows: list[Row]) -> list[Any]:
        out: list[Any] = [self._one(r) for r in rows]
        # over the active clips in key order (one batch in a sequential run): the 2nd duplicates
        # the 1st, the 3rd scores too low, the last fails
        order = sorted(range(len(rows)), key=lambda i: rows[i]["key"])
        if len(order) >= 4:
            out[order[1]].update(drop_reason="duplicate", duplicate_of=rows[order[0]]["key"])
            out[order[2]].update(drop_reason="low_caption_score")
            out[order[-1]] = StageError("synthetic model failure on this clip", "test_failure")
        return out

    def _one(self, row: Row) -> dict[str, Any]:
        key, video, clip = row["key"], row["input_index"], row["clip_index"]
        h = zlib.crc32(key.encode())
        dur = row["clip_end"] - row["clip_start"]
        transcript = f"clip {clip} of video {video} says hello world number {h % 97}"
        out: dict[str, Any] = {
            "transcript": transcript,
            "language": LANGS[video % len(LANGS)],
            "language_prob": 0.5 + (h % 50) / 100,
            "asr_segments": [{
                "start": 0.0, "end": round(dur, 3), "text": transcript, "avg_logprob": -0.25, "no_speech_prob": 0.01,
                "compression_ratio": 1.2, "words": [{"word": "clip", "start": 0.0, "end": 0.4, "probability": 0.9}],
            }],  # fmt: skip
            "asr_flags": ["repetition"] if clip == 1 else [],
            "speech_ratio": (h % 100) / 100,
            "audio_tags": [
                {"label": AUDIO_LABELS[(h + i) % len(AUDIO_LABELS)], "score": round(0.9 - 0.3 * i, 3)} for i in range(2)
            ],
            "visual_tags": [{"label": VISUAL_LABELS[(h >> 3) % len(VISUAL_LABELS)], "score": 0.8}],
            "visual_embedding": [float((h >> i) % 7) / 7 for i in range(8)],
            "text_embedding": [float((h >> i) % 5) / 5 for i in range(4)],
            "captions": [
                {"kind": "visual", "text": f"A synthetic scene {h % 13} with bright colours.", "model": "tiny-blip",
                 "prompt_id": "visual_v1", "extra_json": json.dumps({"temperature": 0.0})},
                {"kind": "audio", "text": "A voice speaks over a quiet hum.", "model": "tiny-audio", "prompt_id": None,
                 "extra_json": None},
                {"kind": "fused", "text": f"Someone says hello world while scene {h % 13} plays.", "model": "smollm2",
                 "prompt_id": "fuse_v1", "extra_json": json.dumps({"raw": "ok"})},
            ],  # fmt: skip
            "caption": f"Someone says hello world while scene {h % 13} plays.",
            "scores": [{"name": "caption_quality", "value": round((h % 1000) / 1000, 3)},
                       {"name": "av_consistency", "value": round(((h >> 5) % 1000) / 1000, 3)}],  # fmt: skip
            "drop_reason": None,
            "duplicate_of": None,
        }
        return out


def make_run(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    """A finished run (``plain`` or ``enriched``); the session fixtures in conftest.py call it once."""
    root = tmp_path_factory.mktemp(f"run-{kind}")
    count = 3 if kind == "plain" else 4
    generate_corpus(root / "corpus", count=count)
    out = root / "out"
    if kind == "plain":
        run_pipeline(root / "corpus" / "inputs.txt", out, load_config(None, []), backend="sequential")
    else:
        with pytest.MonkeyPatch.context() as mp:
            from pipeline import registry

            mp.setitem(registry.STAGES, "test_enrich", ("tests.test_data:EnrichStage", "quality"))
            run_pipeline(root / "corpus" / "inputs.txt", out, load_config(None, ENRICHED_OVERRIDES), backend="sequential")
    return out


def _ffmpeg_pcm(path: Path, rate: int) -> np.ndarray:
    """Reference decode with the ffmpeg CLI (independent of the loader's PyAV path)."""
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", str(rate), "-f", "f32le", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, dtype=np.float32)


def _without_extra(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "captions": [{k: v for k, v in c.items() if k != "extra"} for c in doc["captions"]]}


def _close(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and bool(np.isclose(a, b, rtol=1e-9, atol=0))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_enriched_run_has_every_outcome(enriched_run: Path) -> None:
    index = read_index(enriched_run)
    rejects = pq.read_table(enriched_run / "rejects.parquet").to_pylist()
    errors = pq.read_table(enriched_run / "errors.parquet").to_pylist()
    assert index.num_rows >= 6
    assert {r["drop_reason"] for r in rejects} >= {"duplicate", "low_caption_score"}
    dup = next(r for r in rejects if r["drop_reason"] == "duplicate")
    assert dup["duplicate_of"] in set(index.column("key").to_pylist())
    # a stage's own error type outside the documented set is internal_error, the type kept in the message
    assert [e["error_type"] for e in errors] == ["internal_error"]
    assert errors[0]["error"].startswith("test_failure: synthetic model failure")
    assert len(shard_urls(enriched_run)) >= 3


def test_round_trip_every_field(enriched_run: Path) -> None:
    index = {r["key"]: r for r in read_index(enriched_run).to_pylist()}
    staging = enriched_run / "_staging" / "clips"
    seen = set()
    for sample in load_shards(enriched_run, audio_rate=16000, frames="tensor"):
        key = sample["key"]
        row = index[key]
        seen.add(key)
        # metadata: the KEY.json document is what the writer derives from the index row
        meta = sample["meta"]
        assert meta == json.loads(json.dumps(shard_json(copy.deepcopy(row))))
        assert [c["extra"] for c in meta["captions"]] == [{"temperature": 0.0}, None, {"raw": "ok"}]
        assert [c["extra_json"] for c in row["captions"]][1] is None  # the index keeps extra_json too
        assert sample["meta"]["audio_tags"] == row["audio_tags"] and sample["meta"]["scores"] == row["scores"]
        assert sample["caption"] == row["caption"] != ""
        assert sample["frame_times"] == row["frame_times"]
        # audio: same samples as an independent ffmpeg decode of the staged FLAC
        flac = staging / row["video_id"] / f"{key}.flac"
        ref = _ffmpeg_pcm(flac, 16000)
        audio = sample["audio"].numpy()
        assert sample["audio"].dtype == torch.float32 and sample["sample_rate"] == 16000
        assert len(audio) == round((row["clip_end"] - row["clip_start"]) * 16000) == len(ref)
        np.testing.assert_allclose(audio, ref, atol=1e-4)
        # frames: uint8 (T, H, W, 3), pixel-identical to the staged JPEGs
        frames = sample["frames"]
        assert frames.dtype == torch.uint8 and frames.shape[0] == len(row["frame_times"]) == 8
        for i in range(frames.shape[0]):
            staged = np.asarray(Image.open(staging / row["video_id"] / f"{key}.{i}.jpg").convert("RGB"))
            assert np.array_equal(frames[i].numpy(), staged)
    assert seen == set(index)


def test_resample_and_pil_frames(enriched_run: Path) -> None:
    sample = next(iter(load_shards(enriched_run, audio_rate=8000, frames="pil")))
    row = read_index(enriched_run).filter(pc.field("key") == sample["key"]).to_pylist()[0]
    ref = _ffmpeg_pcm(enriched_run / "_staging" / "clips" / row["video_id"] / f"{sample['key']}.flac", 8000)
    audio = sample["audio"].numpy()
    assert sample["sample_rate"] == 8000
    assert abs(len(audio) - len(ref)) <= 16
    n = min(len(audio), len(ref))
    assert np.corrcoef(audio[:n], ref[:n])[0, 1] > 0.99
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in sample["frames"])
    bare = next(iter(load_shards(enriched_run, audio_rate=None, frames="none")))
    assert "audio" not in bare and "frames" not in bare and bare["meta"]["key"] == bare["key"]


def test_dataloader_workers_split_without_duplicates_or_gaps(enriched_run: Path) -> None:
    from torch.utils.data import DataLoader

    all_keys = sorted(read_index(enriched_run).column("key").to_pylist())
    ds = load_shards(enriched_run, frames="none", shuffle=4, seed=3)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    got = [s["key"] for s in loader]
    assert sorted(got) == all_keys  # every clip exactly once
    ds.set_epoch(1)
    again = [s["key"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(again) == all_keys and again != got  # a new epoch reshuffles
    # two nodes x two workers each: disjoint parts that cover everything
    parts = []
    for rank in range(2):
        node = load_shards(enriched_run, frames="none", audio_rate=None, rank=rank, world_size=2)
        parts.append([s["key"] for s in DataLoader(node, batch_size=None, num_workers=2)])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == all_keys


def test_index_queries(enriched_run: Path) -> None:
    index = read_index(enriched_run).to_pylist()
    assert {r["language"] for r in index} >= {"en", "de"}

    en = query_index(enriched_run, languages=["en"])
    assert set(en.column("key").to_pylist()) == {r["key"] for r in index if r["language"] == "en"}

    long = query_index(enriched_run, min_duration=2.9, max_duration=3.1)
    want = {r["key"] for r in index if 2.9 <= r["clip_end"] - r["clip_start"] <= 3.1}
    assert set(long.column("key").to_pylist()) == want and 0 < len(want) < len(index)

    speech = query_index(enriched_run, audio_tags=["speech"], min_tag_score=0.85)
    want = {r["key"] for r in index if any(t["label"] == "Speech" and t["score"] >= 0.85 for t in r["audio_tags"])}
    assert set(speech.column("key").to_pylist()) == want

    good = query_index(enriched_run, min_scores={"caption_quality": 0.5}, where=pc.field("speech_ratio") >= 0.2)
    want = {
        r["key"] for r in index
        if r["speech_ratio"] >= 0.2 and any(s["name"] == "caption_quality" and s["value"] >= 0.5 for s in r["scores"])
    }  # fmt: skip
    assert set(good.column("key").to_pylist()) == want

    # the selection drives the loader: only those clips, only their shards
    picked = query_index(enriched_run, languages=["de"], columns=["language"])
    assert picked.column_names == ["key", "shard", "language"]
    stream = load_shards(enriched_run, keys=picked, frames="none", audio_rate=None)
    assert sorted(s["key"] for s in stream) == sorted(picked.column("key").to_pylist())
    assert set(stream.urls) == {str(enriched_run / "shards" / s) for s in picked.column("shard").to_pylist()}
    assert len(stream.urls) < len(shard_urls(enriched_run))


def test_random_access_with_wids(enriched_run: Path) -> None:
    clips = open_random_access(enriched_run, frames="tensor")
    index_keys = read_index(enriched_run).column("key").to_pylist()
    assert len(clips) == len(index_keys) and sorted(clips.keys) == sorted(index_keys)
    for key in (clips.keys[-1], clips.keys[0], clips.keys[len(clips) // 2]):
        sample = clips.get(key)
        assert sample["key"] == key and sample["meta"]["key"] == key
        assert sample["frames"].shape[0] == 8 and sample["audio"].ndim == 1
    assert clips[3]["key"] == clips.keys[3]


def test_huggingface_datasets_webdataset_builder(
    enriched_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local files only; model hubs are unreachable anyway
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": shard_urls(enriched_run)}, features=hf_features(enriched_run),
        split="train", cache_dir=str(tmp_path / "hf"),
    )  # fmt: skip
    index = {r["key"]: r for r in read_index(enriched_run).to_pylist()}
    assert sorted(ds["__key__"]) == sorted(index)
    row = ds[0]
    ref = index[row["__key__"]]
    # datasets' Json feature stores floats through ujson (about 10 significant digits)
    assert _close(_without_extra(row["json"]), _without_extra(json.loads(json.dumps(shard_json(copy.deepcopy(ref))))))
    assert row["txt"] == ref["caption"]
    assert row["0.jpg"].size[0] > 0 and "7.jpg" in row
    audio = decode_audio(row["flac"], 16000)
    assert len(audio) == round((ref["clip_end"] - ref["clip_start"]) * 16000)
    streamed = datasets.load_dataset(
        "webdataset", data_files={"train": shard_urls(enriched_run)}, features=hf_features(enriched_run),
        split="train", streaming=True,
    )  # fmt: skip
    assert sorted(r["__key__"] for r in streamed) == sorted(index)


def test_bad_sample_is_skipped_or_raised(enriched_run: Path, tmp_path: Path) -> None:
    import tarfile

    good = shard_urls(enriched_run)[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".flac"):
                data = b"not audio at all"
                m.size = len(data)
            import io

            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(Exception):
        list(load_shards([str(bad)]))
    assert list(load_shards([str(bad)], skip_errors=True)) == []
    assert len(list(load_shards([str(bad)], audio_rate=None))) == 2


def test_batches_with_padding_collate(enriched_run: Path) -> None:
    from torch.utils.data import DataLoader

    index = {r["key"]: r for r in read_index(enriched_run).to_pylist()}
    loader = DataLoader(load_shards(enriched_run), batch_size=3, num_workers=2, collate_fn=collate_clips)
    seen = []
    for batch in loader:
        n = len(batch["key"])
        assert batch["audio"].shape[0] == n and batch["frames"].shape[:2] == (n, 8)
        for i, key in enumerate(batch["key"]):
            samples = round((index[key]["clip_end"] - index[key]["clip_start"]) * 16000)
            assert int(batch["audio_lengths"][i]) == samples
            assert not batch["audio"][i, samples:].any()  # zero padding after the clip
        seen += batch["key"]
    assert sorted(seen) == sorted(index)


def test_remote_output_over_http(enriched_run: Path, tmp_path: Path) -> None:
    """An output folder behind a URL: index via fsspec, shards via webdataset, wids via its cache."""
    from pipeline.tools.serve import serve_directory

    index = read_index(enriched_run)
    with serve_directory(enriched_run.parent) as base:
        url = f"{base}/{enriched_run.name}"
        assert shard_urls(url) == [f"{url}/shards/{Path(u).name}" for u in shard_urls(enriched_run)]
        picked = query_index(url, languages=["en"])
        assert picked.num_rows == index.filter(pc.field("language") == "en").num_rows > 0
        keys = [s["key"] for s in load_shards(url, keys=picked, frames="none")]
        assert sorted(keys) == sorted(picked.column("key").to_pylist())
        clips = open_random_access(url, cache_dir=tmp_path / "wids")
        key = clips.keys[-1]
        assert clips.get(key)["key"] == key and len(clips) == index.num_rows
        assert any((tmp_path / "wids").iterdir())  # remote shards were cached locally

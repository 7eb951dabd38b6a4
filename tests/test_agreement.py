"""CLAP / CLIP agreement scores, thresholds and the choice among visual captioners, with tiny
randomly initialised CLAP and CLIP models built from configs (no hub), on generated audio and frames."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import numpy as np
import pytest

from pipeline.config import AgreementConfig, RunConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_speech_wav
from stages._clap import ClapScorer, ClipScorer, label_text
from stages._vad import load_audio
from stages.agreement import AgreementStage, CaptionSelectStage, choose_caption
from stages.visual_tags import save_tiny_clip
from tests.tiny_clap import save_tiny_clap


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("agreement_media")
    speech = root / "speech.wav"
    synth_speech_wav(speech, "The train to the airport leaves from platform four every twenty minutes.")
    sine = root / "sine.flac"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=12", "-ac", "1", str(sine))
    frames: dict[str, list[str]] = {}
    for name, src in (("bars", "smptebars=size=96x64:rate=4"), ("test", "testsrc=size=96x64:rate=4")):
        _ffmpeg("-f", "lavfi", "-i", src, "-frames:v", "4", str(root / f"{name}_%d.jpg"))
        frames[name] = [str(root / f"{name}_{i}.jpg") for i in range(1, 5)]
    return {"speech": str(speech), "sine": str(sine), "frames": frames, "root": root}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("agreement_models")
    return {"clap": str(save_tiny_clap(root / "clap")), "clip": str(save_tiny_clip(root / "clip"))}


@pytest.fixture(scope="module")
def scorers(models: dict[str, str]) -> tuple[ClapScorer, ClipScorer]:
    return ClapScorer(models["clap"], device="cpu"), ClipScorer(models["clip"], device="cpu")


def _stage(cls: type, models: dict[str, str], **cfg: Any) -> Any:
    stage = cls(AgreementConfig(clap_model=models["clap"], clip_model=models["clip"], device="cpu", **cfg))
    stage.setup()
    return stage


def _cap(kind: str, text: str, model: str = "m") -> dict[str, Any]:
    return {"kind": kind, "text": text, "model": model, "prompt_id": None, "extra_json": None}


def _row(media: dict[str, Any], key: str, audio: str | None, frames: str | None, **extra: Any) -> dict[str, Any]:
    row = {"video_id": key, "key": key, "source_url": key, "input_index": 0, "has_audio": audio is not None,
           "audio_uri": media[audio] if audio else None, "frame_uris": media["frames"][frames] if frames else []}  # fmt: skip
    row.update(extra)
    return row


def _score(rows_out: dict[str, Any], name: str) -> float | None:
    return next((s["value"] for s in rows_out["scores"] if s["name"] == name), None)


def test_clap_embeddings_unit_deterministic_and_batch_independent(media: dict[str, Any], scorers: Any) -> None:
    clap, _ = scorers
    audios = [load_audio(media["speech"]), load_audio(media["sine"])]  # the sine is 12 s: two 10 s windows
    both = clap.audio_embeddings(audios)
    assert both.shape[0] == 2
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    alone = clap.audio_embeddings(audios[1:])
    assert np.allclose(alone[0], both[1], atol=1e-5)
    assert not np.allclose(both[0], both[1], atol=1e-3)  # different sounds, different embeddings
    texts = clap.text_embeddings(["speech", "a steady sine tone", "music, speech"])
    sims = texts @ both.T
    assert np.all(sims >= -1.0) and np.all(sims <= 1.0)


def test_label_text() -> None:
    tags = [{"label": "Music", "score": 0.2}, {"label": "Speech", "score": 0.9}, {"label": "Speech", "score": 0.1}]
    assert label_text(tags) == "speech, music"
    assert label_text(tags, max_labels=1) == "speech"
    assert label_text([]) is None and label_text(None) is None


def test_agreement_scores_every_caption_kind(media: dict[str, Any], models: dict[str, str], scorers: Any) -> None:
    clap, clip = scorers
    stage = _stage(AgreementStage, models)
    captions = [
        _cap("audio", "a man speaks in a quiet room"),
        _cap("music", "a steady high tone"),
        _cap("visual", "colour bars on a screen"),
        _cap("fused", "a man speaks over colour bars"),
        _cap("speech", "the train leaves"),  # not an audio kind by default: not scored
    ]
    tags = [{"label": "Speech", "score": 0.9}]
    row = _row(media, "a", "speech", "bars", captions=captions, caption="a man speaks over colour bars",
               audio_tags=tags, scores=[{"name": "caption_grounding", "value": 0.9}])  # fmt: skip
    (out,) = stage.process_batch([row])
    names = {s["name"] for s in out["scores"]}
    assert {"clap_score", "clap_score:audio", "clap_score:music", "clap_score:fused", "clap_label_score",
            "clip_score", "clip_score:visual", "clip_score:fused", "caption_grounding"} <= names  # fmt: skip
    assert "clap_score:speech" not in names and "drop_reason" not in out
    assert all(-1.0 <= s["value"] <= 1.0 for s in out["scores"])
    audio = clap.audio_embeddings([load_audio(media["speech"])])[0]
    frames = clip.frame_embeddings([media["frames"]["bars"]], 8)[0]
    expect = clap.text_embeddings(["a man speaks in a quiet room", "a man speaks over colour bars", "speech"]) @ audio
    assert _score(out, "clap_score:audio") == pytest.approx(expect[0], abs=1e-3)
    assert _score(out, "clap_score") == pytest.approx(expect[1], abs=1e-3)  # headline: the final caption
    assert _score(out, "clap_label_score") == pytest.approx(expect[2], abs=1e-3)
    vis = clip.text_embeddings(["colour bars on a screen"]) @ frames
    assert _score(out, "clip_score:visual") == pytest.approx(vis[0], abs=1e-3)
    # a rerun replaces its own scores instead of adding more
    (again,) = stage.process_batch([{**row, "scores": out["scores"]}])
    assert len(again["scores"]) == len(out["scores"])


def test_headline_without_final_caption_is_the_mean(media: dict[str, Any], models: dict[str, str]) -> None:
    stage = _stage(AgreementStage, models)
    row = _row(media, "b", "sine", None, captions=[_cap("audio", "a steady tone"), _cap("music", "a high pitch hum")])
    (out,) = stage.process_batch([row])
    mean = (_score(out, "clap_score:audio") + _score(out, "clap_score:music")) / 2
    assert _score(out, "clap_score") == pytest.approx(mean, abs=2e-4)
    assert _score(out, "clip_score") is None  # no frames, no visual caption


def test_thresholds_mark_low_agreement(media: dict[str, Any], models: dict[str, str]) -> None:
    rows = [
        _row(media, "s", "speech", "bars", captions=[_cap("audio", "someone speaks"), _cap("visual", "colour bars")]),
        _row(media, "t", "sine", "test", captions=[_cap("audio", "a dog barks in the rain"), _cap("visual", "a street")]),
    ]
    base = _stage(AgreementStage, models).process_batch(rows)
    assert all("drop_reason" not in r for r in base)  # off by default
    clap = [_score(r, "clap_score") for r in base]
    assert clap[0] != clap[1]
    mid = (clap[0] + clap[1]) / 2
    marked = _stage(AgreementStage, models, min_clap_score=mid).process_batch(rows)
    low = int(np.argmin(clap))
    assert marked[low]["drop_reason"] == "low_clap_score"
    assert "drop_reason" not in marked[1 - low]
    everything = _stage(AgreementStage, models, min_clip_score=1.0).process_batch(rows)
    assert [r["drop_reason"] for r in everything] == ["low_clip_score", "low_clip_score"]
    nothing = _stage(AgreementStage, models, min_clap_score=-1.0, min_clip_score=-1.0).process_batch(rows)
    assert all("drop_reason" not in r for r in nothing)


def test_missing_media_are_row_errors_or_skipped(media: dict[str, Any], models: dict[str, str]) -> None:
    stage = _stage(AgreementStage, models)
    silent = _row(media, "n", None, "bars", captions=[_cap("audio", "a tone"), _cap("visual", "bars")])
    gone = _row(media, "g", "speech", None, captions=[_cap("audio", "a tone")])
    gone["audio_uri"] = str(media["root"] / "missing.flac")
    bad_frame = _row(media, "f", None, "bars", captions=[_cap("visual", "bars")])
    bad_frame["frame_uris"] = [str(media["root"] / "missing.jpg")]
    ok = _row(media, "o", "speech", "bars", captions=[_cap("audio", "someone speaks")])
    out = stage.process_batch([silent, gone, bad_frame, ok])
    assert _score(out[0], "clap_score") is None and _score(out[0], "clip_score") is not None
    assert isinstance(out[1], StageError) and out[1].error_type == "not_found"
    assert isinstance(out[2], StageError) and out[2].error_type == "not_found"
    assert _score(out[3], "clap_score") is not None


def test_choose_caption_keeps_the_best_and_records_the_others() -> None:
    caps = [_cap("visual", "a", "blip"), _cap("audio", "x"), _cap("visual", "b", "vlm"), _cap("visual", "c", "v2")]
    out, best = choose_caption(caps, "visual", [0.1, 0.3, 0.2])
    assert best == 1
    assert [c["text"] for c in out] == ["x", "b"]  # order kept, losers removed
    sel = json.loads(out[1]["extra_json"])["selection"]
    assert sel["score"] == 0.3 and [o["model"] for o in sel["others"]] == ["blip", "v2"]
    single, none = choose_caption(caps[:2], "visual", [0.5])
    assert none is None and single == caps[:2]
    with pytest.raises(ValueError):
        choose_caption(caps, "visual", [0.1])


def test_caption_select_keeps_the_best_clip_score(media: dict[str, Any], models: dict[str, str], scorers: Any) -> None:
    _, clip = scorers
    stage = _stage(CaptionSelectStage, models)
    assert stage.clap is None  # selection needs only CLIP
    texts = ["colour bars on a screen", "a dog in the street", "a person in a room"]
    row = _row(media, "v", None, "bars", captions=[_cap("visual", t, f"m{i}") for i, t in enumerate(texts)] + [_cap("audio", "hum")])
    one = _row(media, "w", None, "bars", captions=[_cap("visual", "colour bars")])
    out, unchanged = stage.process_batch([row, one])
    sims = clip.text_embeddings(texts) @ clip.frame_embeddings([media["frames"]["bars"]], 8)[0]
    visual = [c for c in out["captions"] if c["kind"] == "visual"]
    assert len(visual) == 1 and visual[0]["text"] == texts[int(np.argmax(sims))]
    assert any(c["kind"] == "audio" for c in out["captions"])
    assert _score(out, "clip_score:visual") == pytest.approx(float(np.max(sims)), abs=1e-3)
    assert len(json.loads(visual[0]["extra_json"])["selection"]["others"]) == 2
    assert unchanged["captions"] == one["captions"] and unchanged["scores"] == []


def test_stages_are_registered_and_ordered() -> None:
    cfg = RunConfig(stages=["download", "split", "extract", "audio_tags", "caption_select", "fuse", "agreement"])
    assert cfg.agreement.min_clap_score is None and cfg.agreement.min_clip_score is None
    with pytest.raises(ValueError):
        AgreementConfig(min_clap_score=2.0)


def test_through_the_executor_batch_independent_and_dropped_rows_pass(media: dict[str, Any], models: dict[str, str]) -> None:
    from pipeline.executor import apply_stage

    stage = _stage(AgreementStage, models, min_clap_score=1.0)  # every scored clip is below
    rows = [
        _row(media, "s", "speech", "bars", captions=[_cap("audio", "someone speaks"), _cap("visual", "colour bars")]),
        _row(media, "t", "sine", "test", captions=[_cap("audio", "a steady tone"), _cap("visual", "a test card")]),
        _row(media, "d", "sine", "test", captions=[_cap("audio", "a tone")], drop_reason="duplicate"),
    ]
    out = {r["key"]: r for r in apply_stage(stage, rows)}
    assert out["s"]["drop_reason"] == out["t"]["drop_reason"] == "low_clap_score"
    assert out["d"]["drop_reason"] == "duplicate" and not out["d"].get("scores")  # not scored
    assert "error" not in out["s"] or out["s"]["error"] is None
    (alone,) = stage.process_batch([rows[1]])
    together = {s["name"]: s["value"] for s in out["t"]["scores"]}
    assert {s["name"]: s["value"] for s in alone["scores"]} == pytest.approx(together, abs=2e-4)

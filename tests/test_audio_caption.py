"""The audio_caption stage against an OpenAI-compatible stand-in server on 127.0.0.1 that receives
the ``input_audio`` parts (and checks they decode to the clip's audio), with the accept-or-retry loop
scored by a tiny randomly initialised CLAP model built from a config (no hub)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import AudioCaptionConfig, LLMBackendConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_speech_wav
from stages._clap import ClapScorer
from stages._prompts import load_preset
from stages._vad import load_audio
from stages.audio_caption import AudioCaptionStage
from tests.openai_compat_server import Reply, chat_completion, scripted
from tests.tiny_clap import save_tiny_clap

Responder = Callable[[dict[str, Any], str], str]  # (request body, preset kind) -> answer text


class StandIn:
    """What the server received: request bodies and the decoded audio of each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.audio: list[tuple[np.ndarray, int]] = []
        self.respond: Responder = lambda body, kind: json.dumps({"present": True, "caption": f"{kind} caption"})


def _kind_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"]
    return "music" if "the music" in system else "speech_style" if "voices" in system else "audio"


@pytest.fixture()
def server() -> Iterator[tuple[str, StandIn]]:
    state = StandIn()

    def reply(body: dict[str, Any], headers: dict[str, str]) -> Reply:
        user = next(m for m in body["messages"] if m["role"] == "user")
        parts = [p for p in user["content"] if p.get("type") == "input_audio"]
        if len(parts) != 1:
            return 400, {"error": f"expected one input_audio part, got {len(parts)}"}, {}
        fmt = parts[0]["input_audio"]["format"]
        data, rate = sf.read(io.BytesIO(base64.b64decode(parts[0]["input_audio"]["data"])), dtype="float32")
        assert sf.info(io.BytesIO(base64.b64decode(parts[0]["input_audio"]["data"]))).format == fmt.upper()
        with state.lock:
            state.bodies.append(body)
            state.audio.append((data, rate))
        return 200, chat_completion(state.respond(body, _kind_of(body)), prompt_tokens=50, completion_tokens=9), {}

    with scripted(reply) as base:
        yield base, state


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("audio_caption_media")
    speech = root / "speech.wav"
    synth_speech_wav(speech, "Please keep your ticket until the end of the journey.")
    sine = root / "sine.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=660:sample_rate=16000:duration=4", "-ac", "1", str(sine)], check=True)  # fmt: skip
    return {"speech": str(speech), "sine": str(sine), "missing": str(root / "missing.flac")}


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_clap(tmp_path_factory.mktemp("ac_clap") / "clap"))


def _stage(base_url: str, **cfg: Any) -> AudioCaptionStage:
    llm = LLMBackendConfig(backend="openai", model="qwen2-audio-stand-in", base_url=base_url, retries=0, api_key_env=None)
    stage = AudioCaptionStage(AudioCaptionConfig(llm=llm, device="cpu", **cfg))
    stage.setup()
    return stage


def _row(media: dict[str, str], key: str, audio: str, tags: list[tuple[str, float]] | None, **extra: Any) -> dict[str, Any]:
    row = {"video_id": key, "key": key, "source_url": key, "input_index": 0, "has_audio": True,
           "audio_uri": media[audio], "clip_start": 0.0, "clip_end": 4.0}  # fmt: skip
    if tags is not None:
        row["audio_tags"] = [{"label": label, "score": score} for label, score in tags]
    row.update(extra)
    return row


def _caps(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in out["captions"]}


def test_audio_parts_reach_the_server_and_captions_carry_provenance(server: Any, media: dict[str, str]) -> None:
    url, state = server
    stage = _stage(url, max_audio_seconds=2.5)
    old = {"kind": "visual", "text": "colour bars", "model": "blip", "prompt_id": None, "extra_json": None}
    stale = {"kind": "audio", "text": "an old audio caption", "model": "x", "prompt_id": None, "extra_json": None}
    rows = [
        _row(media, "speech", "speech", [("Speech", 0.9)], captions=[old, stale]),  # music gated out
        _row(media, "sine", "sine", None),  # no tags: every kind asked
    ]
    out = stage.process_batch(rows)
    assert len(state.bodies) == 2 + 3
    expected = {0: load_audio(media["speech"])[: int(2.5 * 16000)], 1: load_audio(media["sine"])[: int(2.5 * 16000)]}
    for body, (audio, rate) in zip(state.bodies, state.audio, strict=True):
        assert rate == 16000 and body["model"] == "qwen2-audio-stand-in"
        assert body["response_format"]["type"] == "json_schema"
        match = [k for k, ref in expected.items() if len(ref) == len(audio) and np.allclose(ref, audio, atol=1e-4)]
        assert len(match) == 1, "the audio part decodes to the clip's audio (first 2.5 s)"
    speech = _caps(out[0])
    assert set(speech) == {"visual", "audio", "speech_style"}
    assert speech["visual"] == old and speech["audio"]["text"] == "audio caption"
    assert speech["speech_style"]["prompt_id"] == load_preset("audio_speech_style").prompt_id
    extra = json.loads(speech["audio"]["extra_json"])
    assert extra["model"] == "qwen2-audio-stand-in" and extra["backend"] == "openai"
    assert extra["audio"] == {"format": "wav", "seconds": 2.5, "sample_rate": 16000}
    assert extra["attempts"][0]["raw"] and "agreement" not in extra  # no CLAP configured
    assert set(_caps(out[1])) == {"audio", "music", "speech_style"}
    assert out[0]["llm_flags"] == [] and out[1]["llm_flags"] == []


def test_flac_parts_and_absent_aspects(server: Any, media: dict[str, str]) -> None:
    url, state = server
    state.respond = lambda body, kind: json.dumps(
        {"present": kind == "music", "caption": "a steady high tone" if kind == "music" else ""}
    )
    (out,) = _stage(url, audio_format="flac").process_batch([_row(media, "sine", "sine", [("Music", 0.8)])])
    assert all(b["messages"][1]["content"][0]["input_audio"]["format"] == "flac" for b in state.bodies)
    assert [c["kind"] for c in out["captions"]] == ["music"]  # audio answered present=false: no caption


def test_invalid_answers_are_repaired_or_fall_back_to_labels(server: Any, media: dict[str, str]) -> None:
    url, state = server

    def respond(body: dict[str, Any], kind: str) -> str:
        repaired = len(body["messages"]) > 2
        if kind == "audio":
            return json.dumps({"present": True, "caption": "a voice speaks"}) if repaired else "I hear a voice."
        return "not json at all"

    state.respond = respond
    rows = [_row(media, "a", "speech", [("Speech", 0.9), ("Music", 0.2)]), _row(media, "b", "speech", [])]
    out = _stage(url).process_batch(rows)
    caps = _caps(out[0])
    assert caps["audio"]["text"] == "a voice speaks"
    assert len(json.loads(caps["audio"]["extra_json"])["attempts"]) == 2  # first answer + repair
    for kind in ("music", "speech_style"):
        assert caps[kind]["model"] == "fallback" and caps[kind]["text"] == "speech, music"
        assert json.loads(caps[kind]["extra_json"])["fallback"] is True
        assert f"audio_caption_fallback:{kind}:not_json" in out[0]["llm_flags"]
    # empty tag list: music and speech_style gated out; audio repaired, nothing to fall back to
    assert set(_caps(out[1])) == {"audio"}


def test_rows_without_audio_and_bad_audio(server: Any, media: dict[str, str]) -> None:
    url, _ = server
    silent = {"video_id": "n", "key": "n", "source_url": "n", "input_index": 0, "has_audio": False, "captions": []}
    out = _stage(url).process_batch([silent, _row(media, "m", "missing", None), _row(media, "ok", "sine", None)])
    assert out[0] == {"captions": [], "llm_flags": []}
    assert isinstance(out[1], StageError) and out[1].error_type == "not_found"
    assert len(out[2]["captions"]) == 3


def test_text_only_backends_are_refused() -> None:
    with pytest.raises(ValueError, match="audio-language model"):
        AudioCaptionConfig(llm=LLMBackendConfig(backend="transformers"))


def _split_texts(clap: ClapScorer, audio: np.ndarray) -> tuple[str, str, str]:
    """(labels, a caption CLAP rates below them, one it rates above) for this tiny model and audio."""
    labels = ["speech", "music", "sine wave", "speech, music", "tone", "hum", "beep, speech"]
    captions = [
        "a dog barks in the rain", "a man speaks in a quiet room", "a steady high pitch tone", "birds sing",
        "a loud engine and cars in the street", "soft piano music plays", "a woman sings a slow song",
        "water and wind", "a child talks", "drums and guitar", "a buzz then silence", "people talking",
    ]  # fmt: skip
    emb = clap.audio_embeddings([audio])[0]
    ls = clap.text_embeddings(labels) @ emb
    cs = clap.text_embeddings(captions) @ emb
    for j in np.argsort(ls):
        below = [c for c, s in zip(captions, cs, strict=True) if s < ls[j] - 1e-3]
        above = [c for c, s in zip(captions, cs, strict=True) if s > ls[j] + 1e-3]
        if below and above:
            return labels[j], below[0], above[0]
    raise AssertionError("no label text between two captions for this model")


@pytest.mark.parametrize("script", ["accepted", "retried", "fallback"])
def test_accept_or_retry_against_the_labels(server: Any, media: dict[str, str], clap_dir: str, script: str) -> None:
    url, state = server
    clap = ClapScorer(clap_dir, device="cpu")
    labels, low, high = _split_texts(clap, load_audio(media["sine"]))
    first = {"accepted": high, "retried": low, "fallback": low}[script]
    again = {"accepted": high, "retried": high, "fallback": low}[script]

    def respond(body: dict[str, Any], kind: str) -> str:
        retry = any("plain labels" in str(m["content"]) for m in body["messages"][2:])
        return json.dumps({"present": True, "caption": again if retry else first})

    state.respond = respond
    stage = _stage(url, presets={"audio": "audio_events"}, clap_model=clap_dir, max_retries=2)
    tags = [(label, 0.9 - 0.1 * i) for i, label in enumerate(labels.split(", "))]
    (out,) = stage.process_batch([_row(media, "s", "sine", [(t.title(), s) for t, s in tags])])
    cap = _caps(out)["audio"]
    agreement = json.loads(cap["extra_json"])["agreement"]
    assert agreement["labels"] == labels and agreement["outcome"] == script
    assert all(-1.0 <= s <= 1.0 for s in [*agreement["scores"], agreement["label_score"]])
    if script == "accepted":
        assert cap["text"] == high and agreement["tries"] == 1 and len(state.bodies) == 1
        assert agreement["scores"][0] >= agreement["label_score"]
    elif script == "retried":
        assert cap["text"] == high and agreement["tries"] == 2 and len(state.bodies) == 2
        assert agreement["scores"][0] < agreement["label_score"] <= agreement["scores"][1]
        feedback = state.bodies[1]["messages"][-1]["content"]
        assert labels in feedback and state.bodies[1]["messages"][-2]["role"] == "assistant"
        assert json.loads(cap["extra_json"])["attempts"][-1]["purpose"] == "agreement_retry"
    else:
        assert cap["text"] == labels and cap["model"] == "fallback"
        assert agreement["tries"] == 3 and len(state.bodies) == 3  # first answer + max_retries
        assert all(s < agreement["label_score"] for s in agreement["scores"])
        assert out["llm_flags"] == ["audio_caption_fallback:audio:low_agreement"]


def test_fusion_presets_show_the_audio_captions(server: Any, media: dict[str, str]) -> None:
    from pipeline.config import CaptionGroundingConfig
    from stages._prompts import render, signals_from_row
    from stages.fuse import clip_evidence

    url, state = server
    state.respond = lambda body, kind: json.dumps({"present": True, "caption": f"a calm {kind} description"})
    row = _row(media, "m", "sine", [("Music", 0.8)])
    (out,) = _stage(url, presets={"music": "audio_music"}).process_batch([row])
    signals = signals_from_row({**row, **out})
    for name in ("mmtrail", "favd"):
        rendered = render(load_preset(name), signals)
        assert "music: a calm music description" in rendered.shown["captions"]
        ev = clip_evidence(signals, rendered, CaptionGroundingConfig())
        assert ev.music and ev.audio  # a music caption is music evidence for the grounding gate

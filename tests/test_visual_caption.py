"""Visual captions: a tiny random BLIP built from a config, and the VLM path through the shared LLM
interface against a real OpenAI-compatible HTTP server on loopback (a stand-in VLM)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import LLMBackendConfig, VisualCaptionConfig
from pipeline.errors import StageError
from pipeline.tools.samples import synth_video
from stages.visual_caption import VisualCaptionStage, save_tiny_blip
from tests.openai_compat_server import running
from tests.test_visual_quality import extract_rows

SPEECH = {"kind": "speech", "text": "hello there", "model": "whisper", "prompt_id": None, "extra_json": None}


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("tiny_blip") / "blip")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("vc")
    videos = {
        f"c{i}": synth_video(root / f"c{i}.mp4", duration=2.0, n_scenes=1, audio=False, seed=10 + i).path
        for i in range(3)
    }
    return extract_rows(videos, root / "staging", frames=5, end=2.0)


def _stage(**cfg: Any) -> VisualCaptionStage:
    stage = VisualCaptionStage(VisualCaptionConfig(**cfg))
    stage.setup()
    return stage


def test_blip_caption_is_appended_with_provenance(blip: Path, clips: list[dict[str, Any]]) -> None:
    stage = _stage(model=str(blip), text_prompt="a video of", max_new_tokens=8, prompt_id="blip_prefix_v1")
    rows = [{**clips[0], "captions": [SPEECH]}, clips[1]]
    out = stage.process_batch(rows)
    first, second = (o["captions"] for o in out)
    assert first[0] == SPEECH and len(first) == 2 and len(second) == 1
    cap = first[1]
    assert cap["kind"] == "visual" and cap["model"] == str(blip) and cap["prompt_id"] == "blip_prefix_v1"
    assert cap["text"].startswith("a video of") and len(cap["text"]) > len("a video of")
    extra = json.loads(cap["extra_json"])
    assert extra == {
        "backend": "transformers",
        "frames": 1,
        "text_prompt": "a video of",
        "max_new_tokens": 8,
        "num_beams": 1,
    }


def test_blip_is_deterministic_and_captions_the_middle_frame(blip: Path, clips: list[dict[str, Any]]) -> None:
    from stages.visual_tags import load_image

    stage = _stage(model=str(blip), max_new_tokens=6)
    batch = stage.process_batch(clips)
    again = _stage(model=str(blip), max_new_tokens=6).process_batch(clips)
    alone = [stage.process_batch([c])[0] for c in clips]
    assert batch == again
    assert [b["captions"][-1]["text"] for b in batch] == [a["captions"][-1]["text"] for a in alone]
    middle = [load_image(c["frame_uris"][2]) for c in clips]  # 5 frames: the middle is index 2
    assert stage.caption_images(middle) == [b["captions"][-1]["text"] for b in batch]


def test_blip_bad_rows_fail_alone(blip: Path, clips: list[dict[str, Any]], tmp_path: Path) -> None:
    stage = _stage(model=str(blip), text_prompt="a photo of", max_new_tokens=4)
    out = stage.process_batch(
        [{**clips[0], "frame_uris": []}, {**clips[0], "frame_uris": [str(tmp_path / "gone.jpg")]}, clips[0]]
    )
    assert isinstance(out[0], StageError) and out[0].error_type == "no_frames"
    assert isinstance(out[1], StageError) and out[1].error_type == "not_found"
    assert out[2]["captions"][-1]["kind"] == "visual"


class _FakeVLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that describes the images it was sent."""

    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        parts = body["messages"][0]["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        prompt = next(p["text"] for p in parts if p["type"] == "text")
        if "FAIL" in prompt:
            self._send(500, {"error": "boom"})
            return
        answer = f"  A clip shown in {len(images)} frames.  "
        self._send(200, {
            "choices": [{"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100 * len(images), "completion_tokens": 7},
        })  # fmt: skip

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass


def _images(body: dict[str, Any]) -> list[bytes]:
    parts = body["messages"][0]["content"]
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts if p["type"] == "image_url"]


@pytest.fixture()
def vlm_server() -> Iterator[str]:
    _FakeVLM.seen = []
    with running(_FakeVLM, "fake-vlm") as url:
        yield url


def test_vlm_caption_through_the_openai_backend(vlm_server: str, clips: list[dict[str, Any]]) -> None:
    pytest.importorskip("httpx", reason="the openai LLM backend needs httpx (the llm extra)")
    llm = LLMBackendConfig(backend="openai", model="tiny-vlm", base_url=vlm_server, retries=0, api_key_env=None)
    stage = _stage(backend="llm", llm=llm, vlm_frames=3, max_new_tokens=30)
    try:
        out = stage.process_batch([{**clips[0], "captions": [SPEECH]}, {**clips[1], "frame_uris": []}, clips[2]])
    finally:
        stage.teardown()
    assert isinstance(out[1], StageError) and out[1].error_type == "no_frames"
    cap = out[0]["captions"][-1]
    assert out[0]["captions"][0] == SPEECH
    assert cap["kind"] == "visual" and cap["model"] == "tiny-vlm" and cap["prompt_id"] == "visual_v1"
    assert cap["text"] == "A clip shown in 3 frames."
    extra = json.loads(cap["extra_json"])
    assert extra["backend"] == "openai" and extra["frames"] == 3 and extra["completion_tokens"] == 7
    assert out[2]["captions"][-1]["text"] == "A clip shown in 3 frames."
    # what went over the wire: the prompt, then the clip's JPEG files as base64 data URLs, first to last
    assert len(_FakeVLM.seen) == 2
    first_frame = Path(clips[0]["frame_uris"][0]).read_bytes()
    request = next(b for b in _FakeVLM.seen if _images(b)[0] == first_frame)  # requests run concurrently
    parts = request["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": VisualCaptionConfig().prompt}
    assert [p["image_url"]["url"].split(",")[0] for p in parts[1:]] == ["data:image/jpeg;base64"] * 3
    assert _images(request) == [Path(clips[0]["frame_uris"][i]).read_bytes() for i in (0, 2, 4)]
    assert request["model"] == "tiny-vlm" and request["max_tokens"] == 30


def test_vlm_failure_is_a_row_error(vlm_server: str, clips: list[dict[str, Any]]) -> None:
    pytest.importorskip("httpx", reason="the openai LLM backend needs httpx (the llm extra)")
    llm = LLMBackendConfig(backend="openai", model="tiny-vlm", base_url=vlm_server, retries=0, api_key_env=None)
    stage = _stage(backend="llm", llm=llm, prompt="FAIL please")
    try:
        (res,) = stage.process_batch([clips[0]])
    finally:
        stage.teardown()
    assert isinstance(res, StageError) and res.error_type == "llm_failed" and "500" in str(res)


def test_vlm_backend_must_see_images() -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a VLM"):
        load_config(None, ["visual_caption.backend=llm"])  # llama_cpp (SmolLM2) is text-only
    cfg = load_config(None, ["visual_caption.backend=llm", "visual_caption.llm.backend=openai"])
    assert cfg.visual_caption.llm.backend == "openai"

"""Visual captions: a transformers image captioner (BLIP family) or a VLM through the LLM backends.

* ``backend="transformers"``: ``AutoProcessor`` + ``AutoModelForImageTextToText`` (BLIP, BLIP-2, GIT,
  InstructBLIP ...) caption the clip's middle frame, optionally after a text prefix
  (``text_prompt``, e.g. "a video of"); one batched ``generate`` per batch of clips.
* ``backend="llm"``: ``vlm_frames`` evenly spaced frames are sent as ``image_url`` parts (the JPEG
  files extract wrote, base64, not re-encoded) with ``prompt`` to a VLM behind the shared LLM
  interface (``stages/_llm.py``: vLLM's offline engine or an OpenAI-compatible endpoint).

Each clip gets one more entry in ``captions``: ``Caption(kind="visual", text, model, prompt_id,
extra_json)``; captions written by earlier stages are kept. Frames travel as file paths.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import VisualCaptionConfig
from pipeline.errors import StageError
from pipeline.stage import PooledStage, Row
from pipeline.storage import read_bytes
from schemas.records import Caption
from stages.visual_tags import load_image, pick_evenly, resolve_device

T = TypeVar("T")

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


class VisualCaptionStage(PooledStage[VisualCaptionConfig]):
    name = "visual_caption"
    reads = ("frame_uris", "captions")
    optional_reads = ("captions",)  # earlier captions are kept when present
    writes = ("captions",)

    def setup(self) -> None:
        c = self.config
        if c.backend == "llm":
            from stages._llm import make_backend

            self.llm = make_backend(c.llm)
            self.model_id = self.llm.model_id
            log.info("visual_caption: VLM %s through the %s backend", self.model_id, self.llm.name)
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(c.device)
        self.dtype = torch.float16 if (self.device == "cuda" and c.fp16) else torch.float32
        log.info("visual_caption: loading %s on %s (%s)", c.model, self.device, self.dtype)
        self.processor = AutoProcessor.from_pretrained(c.model)
        self.model = AutoModelForImageTextToText.from_pretrained(c.model, dtype=self.dtype).to(self.device).eval()
        self.model_id = c.model

    def teardown(self) -> None:
        if hasattr(self, "llm"):
            self.llm.close()
            del self.llm
        if hasattr(self, "model"):
            del self.model

    # ------------------------------------------------------------------ transformers

    def caption_images(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (batched ``generate``)."""
        import torch

        c = self.config
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if c.text_prompt:
            kwargs["text"] = [c.text_prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=c.max_new_tokens, num_beams=c.num_beams, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def _transformers_batch(self, rows: list[Row]) -> list[Any]:
        c = self.config
        results, images, owners = _per_clip(rows, lambda uris: load_image(uris[len(uris) // 2]))
        if not images:
            return results
        texts = self.caption_images(images)
        extra = json.dumps(
            {"backend": "transformers", "frames": 1, "text_prompt": c.text_prompt, "max_new_tokens": c.max_new_tokens,
             "num_beams": c.num_beams}
        )  # fmt: skip
        for i, text in zip(owners, texts, strict=True):
            if not text.strip():
                results[i] = StageError("the captioner returned an empty caption", "empty_caption")
                continue
            results[i] = self._with_caption(rows[i], text, extra)
        return results

    # ------------------------------------------------------------------ VLM

    def vlm_request(self, frame_uris: list[str]) -> Any:
        """The chat request for one clip: the prompt, then its frames as base64 JPEG image parts."""
        from stages._llm import ChatRequest

        c = self.config
        parts: list[dict[str, Any]] = [{"type": "text", "text": c.prompt}]
        for uri in pick_evenly(frame_uris, c.vlm_frames):
            try:
                data = read_bytes(uri)
            except FileNotFoundError:
                raise StageError(f"frame file not found: {uri}", "not_found") from None
            url = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return ChatRequest(messages=[{"role": "user", "content": parts}], max_tokens=c.max_new_tokens)

    def _llm_batch(self, rows: list[Row]) -> list[Any]:
        c = self.config
        results, requests, owners = _per_clip(rows, self.vlm_request)
        if not requests:
            return results
        answers = self.llm.chat(requests)
        for i, req, ans in zip(owners, requests, answers, strict=True):
            text = " ".join((ans.text or "").split())
            if ans.error is not None or not text:
                results[i] = StageError(f"VLM caption failed: {ans.error or 'empty answer'}", "llm_failed")
                continue
            extra = json.dumps(
                {"backend": self.llm.name, "frames": len(req.messages[0]["content"]) - 1,
                 "max_tokens": c.max_new_tokens, "prompt_tokens": ans.prompt_tokens,
                 "completion_tokens": ans.completion_tokens, "seconds": ans.seconds}
            )  # fmt: skip
            results[i] = self._with_caption(rows[i], text, extra)
        return results

    # ------------------------------------------------------------------ common

    def _with_caption(self, row: Row, text: str, extra: str) -> dict[str, Any]:
        cap = Caption(kind="visual", text=text, model=self.model_id, prompt_id=self.config.prompt_id, extra_json=extra)
        return {"captions": list(row.get("captions") or []) + [cap.to_dict()]}

    def process_batch(self, rows: list[Row]) -> list[Any]:
        if self.config.backend == "llm":
            return self._llm_batch(rows)
        return self._transformers_batch(rows)


def _per_clip(rows: list[Row], build: Callable[[list[str]], T]) -> tuple[list[Any], list[T], list[int]]:
    """One captioner input per clip, built by ``build`` from its frame URIs: (results with the
    errors of clips without frames or whose input failed, the inputs, the row index of each)."""
    results: list[Any] = [None] * len(rows)
    inputs: list[T] = []
    owners: list[int] = []
    for i, row in enumerate(rows):
        uris = row.get("frame_uris") or []
        if not uris:
            results[i] = StageError("clip has no frames to caption", "no_frames")
            continue
        try:
            inputs.append(build(uris))
        except StageError as exc:
            results[i] = exc
            continue
        owners.append(i)
    return results, inputs, owners


# --------------------------------------------------------------------------- tiny models for tests


def save_tiny_blip(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny randomly initialised BLIP captioner (word-level BERT vocabulary, BLIP image
    processor) into ``folder``; loadable with ``VisualCaptionConfig(model=folder)``. Nothing is
    downloaded; its captions are random words."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words += "a an the of in on with and video photo frame person dog cat car street room table sky water tree".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", model_max_length=64)
    text = dict(
        vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3,
        encoder_hidden_size=32,
    )  # fmt: skip
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder

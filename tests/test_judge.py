"""The judge: a G-Eval score from token log-probabilities (expected value over "1".."5"), the sampled
digit where a backend gives none, and flags only where the clip supports them.

The real SmolLM2-135M-Instruct (transformers backend, the default) checks the mechanism end to end:
the expected value lies in [1, 5], the log-probability method is used, and the probabilities the
judge reads are the model's own distribution at the score position (recomputed here with a plain
forward pass). How well the score separates good from bad clips is measured by
``python -m tests.bench.judge_bench``, not asserted here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.config import JudgeConfig, LLMBackendConfig
from pipeline.executor import apply_stage
from schemas.llm import JudgeAnswer
from stages._llm import ChatRequest, ChatResult, TokenLogprob
from stages.judge import JudgeStage, estimate_score, score_distribution, supported_flags
from tests.test_fuse import ROW, extra_of, scripted_stage


def verdict(score: int, flags: list[str] | None = None) -> str:
    return json.dumps({"score": score, "reasons": [f"scored {score}"], "flags": flags or []})


def _tokens(pieces: list[str], tops: dict[int, dict[str, float]]) -> list[TokenLogprob]:
    out, offset = [], 0
    for i, piece in enumerate(pieces):
        top = tops.get(i, {piece: -0.01})
        out.append(TokenLogprob(piece, top.get(piece, -0.01), top, offset))
        offset += len(piece)
    return out


# --------------------------------------------------------------------------- the expected value


def test_expected_score_over_the_score_tokens() -> None:
    raw = '{"score": 4, "reasons": [], "flags": []}'
    pieces = ['{"', "score", '":', " ", "4", ", ", '"reasons": [], "flags": []}']
    tops = {4: {"4": math.log(0.5), "5": math.log(0.2), " 3": math.log(0.1), "the": math.log(0.2)}}
    probs, mass = score_distribution(raw, _tokens(pieces, tops))  # type: ignore[misc]
    assert mass == pytest.approx(0.8)
    assert probs == pytest.approx({"1": 0.0, "2": 0.0, "3": 0.125, "4": 0.625, "5": 0.25})
    answer = JudgeAnswer(score=4, reasons=[], flags=[])
    estimate = estimate_score(answer, raw, _tokens(pieces, tops), min_mass=0.5)
    assert estimate.method == "logprobs" and estimate.value == pytest.approx(3 * 0.125 + 4 * 0.625 + 5 * 0.25)
    # too little probability on the score tokens, or no log-probabilities: the sampled digit
    assert estimate_score(answer, raw, _tokens(pieces, tops), min_mass=0.9).method == "sampled"
    assert estimate_score(answer, raw, None, min_mass=0.5) == estimate_score(answer, raw, [], min_mass=0.5)
    sampled = estimate_score(answer, raw, None, min_mass=0.5)
    assert (sampled.method, sampled.value, sampled.probs) == ("sampled", 4.0, None)
    # the digit inside a token with a leading space (" 4"), as OpenAI-style servers often tokenise it
    spaced = _tokens(['{"score":', " 4", "}"], {1: {" 4": math.log(0.9), " 2": math.log(0.1)}})
    assert estimate_score(answer, '{"score": 4}', spaced, min_mass=0.5).value == pytest.approx(3.8)


def test_score_position_must_match_the_text() -> None:
    raw = '{"score": 4}'
    shifted = [TokenLogprob("4", -0.1, {"4": -0.1, "1": -2.4}, 3)]  # offsets that do not match the text
    assert score_distribution(raw, shifted) is None
    assert score_distribution('{"reasons": []}', [TokenLogprob("{", 0.0, {"{": 0.0}, 0)]) is None


# --------------------------------------------------------------------------- flags need support


def test_flags_are_kept_only_where_the_clip_supports_them() -> None:
    cfg = JudgeConfig()
    everything = ["contradicts_signals", "no_information", "unsafe"]
    specific = dict(ROW, caption="A man boils pasta in a kitchen while explaining each step.")
    assert supported_flags(everything, 4.6, specific, cfg) == ([], everything)
    assert supported_flags(everything, 1.4, specific, cfg) == (["contradicts_signals"], ["no_information", "unsafe"])
    vague = dict(ROW, caption="A video clip.", nsfw_score=0.93)
    assert supported_flags(everything, 3.0, vague, cfg) == (["no_information", "unsafe"], ["contradicts_signals"])
    assert supported_flags(everything, 4.6, specific, JudgeConfig(flag_evidence=False)) == (everything, [])


def test_judge_stage_drops_unsupported_flags_and_records_them(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, _ = scripted_stage(monkeypatch, lambda r: verdict(5, ["unsafe", "no_information"]), judge=True)
    good = dict(ROW, key="good", caption="A man boils pasta in a kitchen.")
    vague = dict(ROW, key="vague", caption="A video.")
    out = apply_stage(stage, [good, vague])
    assert [r["llm_flags"] for r in out] == [[], ["judge:no_information"]]
    extra = extra_of(out[0], "judge")
    assert extra["unsupported_flags"] == ["unsafe", "no_information"] and extra["answer"]["flags"] == ["unsafe", "no_information"]
    # a backend without log-probabilities (this scripted one): the sampled digit, said so
    assert extra["score_method"] == "sampled" and out[0]["scores"] == [{"name": "judge", "value": 5.0}]


def test_judge_uses_logprobs_a_backend_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = verdict(4)
    asked: list[int] = []

    def answer(request: ChatRequest) -> ChatResult:
        asked.append(request.logprobs)
        pieces = ['{"score": ', "4", raw[len('{"score": 4') :]]
        tops = {1: {"4": math.log(0.5), "2": math.log(0.5)}}
        return ChatResult(raw, prompt_tokens=50, completion_tokens=3, logprobs=_tokens(pieces, tops))

    stage, _ = scripted_stage(monkeypatch, answer, judge=True, min_score=3.5)
    (row,) = apply_stage(stage, [dict(ROW, caption="A man boils pasta.")])
    assert asked == [20]  # the judge asks for the top log-probabilities
    assert row["scores"] == [{"name": "judge", "value": 3.0}] and row["drop_reason"] == "low_judge_score"
    extra = extra_of(row, "judge")
    assert extra["score_method"] == "logprobs" and extra["score_probs"]["4"] == 0.5 and extra["answer"]["score"] == 4
    assert extra["p_below_min_score"] == 0.5  # P(score 2) >= drop_confidence: dropped
    judge_caption = [c for c in row["captions"] if c["kind"] == "judge"][0]
    assert judge_caption["text"].startswith("3.00/5: ")

    stage, _ = scripted_stage(monkeypatch, answer, judge=True, score_from="sampled")
    asked.clear()
    (row,) = apply_stage(stage, [dict(ROW, caption="A man boils pasta.")])
    assert asked == [0] and row["scores"] == [{"name": "judge", "value": 4.0}]


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_judge() -> Iterator[JudgeStage]:
    stage = JudgeStage(JudgeConfig(batch_size=4, llm=LLMBackendConfig(context_tokens=2048)))
    stage.setup()
    yield stage
    stage.teardown()


CLIPS: list[dict[str, Any]] = [
    dict(ROW, key="good", caption="A man boils water and adds pasta in a kitchen, explaining each step."),
    dict(ROW, key="mismatch", caption="A red sports car races around a desert track at night."),
    dict(ROW, key="vague", caption="A video."),
]


def test_smollm2_judge_scores_from_logprobs(smollm2_judge: JudgeStage) -> None:
    out = apply_stage(smollm2_judge, [dict(c) for c in CLIPS])
    scored = 0
    for row in out:
        assert row.get("error") is None
        if any(f.startswith("judge_fallback:") for f in row["llm_flags"]):
            continue  # no valid answer: abstains (rare)
        scored += 1
        (score,) = [s["value"] for s in row["scores"] if s["name"] == "judge"]
        extra = extra_of(row, "judge")
        assert extra["backend"] == "transformers" and extra["score_method"] == "logprobs"
        assert 1.0 <= score <= 5.0 and score == extra["score"]
        assert sum(extra["score_probs"].values()) == pytest.approx(1.0, abs=1e-3) and extra["score_mass"] >= 0.5
        assert (row.get("drop_reason") == "low_judge_score") == (extra["p_below_min_score"] >= 0.5)
        assert "judge:unsafe" not in row["llm_flags"]  # no evidence for it in any of these clips
    assert scored >= 2


def test_smollm2_score_probabilities_are_the_models_own(smollm2_judge: JudgeStage) -> None:
    """The probabilities the judge reads equal a plain forward pass over the prompt and the answer up to the score."""
    import torch

    (row,) = apply_stage(smollm2_judge, [dict(CLIPS[0])])
    extra = extra_of(row, "judge")
    if extra["score_method"] != "logprobs":
        pytest.skip(f"no valid answer from the model this time: {extra['failure']}")
    backend = smollm2_judge.backend
    tokenizer, model = backend.tokenizer, backend.model  # type: ignore[union-attr]
    if not (extra["partial_answer"] or len(extra["attempts"]) == 1):
        pytest.skip("the score came from the repair attempt this time")
    raw = extra["attempts"][0]["raw"]  # scored from the first answer: its prompt is the rendered one
    before_digit = raw[: re.search(r'"score"\s*:\s*', raw).end()]  # type: ignore[union-attr]
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": _system(smollm2_judge)}, {"role": "user", "content": extra["prompt"]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt + before_digit, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        probs = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)
    digits = {d: float(probs[tokenizer.convert_tokens_to_ids(d)]) for d in "12345"}
    expected = sum(int(d) * p for d, p in digits.items()) / sum(digits.values())
    assert expected == pytest.approx(extra["score"], abs=0.05)


def _system(stage: JudgeStage) -> str:
    from stages._prompts import render, signals_from_row

    assert stage.preset is not None
    rendered = render(stage.preset, signals_from_row(dict(CLIPS[0]), stage.config.max_field_chars))
    return str(rendered.messages[0]["content"])

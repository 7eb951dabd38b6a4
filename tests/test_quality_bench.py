"""The quality benchmark's own parts: its corpus records the truth it planted, its metrics compute
the right values on hand-made inputs. (The benchmark's figures come from ``avforge bench --quality``,
never from a test.)"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.bench.asr_bench import wer
from tests.bench.quality_metrics import (
    ClipSpan,
    auc,
    carried,
    content_words,
    groups_from_links,
    pairs_from_groups,
    precision_recall,
    supported,
    time_cover,
    time_iou,
    true_duplicate_pairs,
)

needs_media = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None, reason="needs ffmpeg and espeak-ng"
)


# --------------------------------------------------------------------------- metrics


def test_time_overlap_measures() -> None:
    assert time_cover((0, 20), (10, 20.01)) == pytest.approx(10 / 10.01)
    assert time_cover((0, 10), (10, 20)) == 0.0
    assert time_iou((0, 10), (0, 10)) == 1.0
    assert time_iou((0, 10), (10, 20)) == 0.0  # neighbours share no time
    assert time_iou((0, 10), (1.5, 11.5)) == pytest.approx(8.5 / 11.5)
    assert time_iou((0, 10), (5, 5)) == 0.0


def test_true_pairs_consecutive_clips_are_not_duplicates_and_trimmed_copies_are() -> None:
    clips = [
        ClipSpan("o_0", "o", 0, 10), ClipSpan("o_1", "o", 10, 20),  # two clips of one original
        ClipSpan("c_0", "o", 0, 10), ClipSpan("c_1", "o", 10, 20),  # a copy
        ClipSpan("t_0", "o", 1.6, 11.6), ClipSpan("t_1", "o", 11.6, 20),  # a head-trimmed copy (offset 1.6)
        ClipSpan("x_0", "x", 0, 10),  # other content at the same time
    ]  # fmt: skip
    pairs = true_duplicate_pairs(clips, 0.5)
    first = {"o_0", "c_0", "t_0"}
    second = {"o_1", "c_1", "t_1"}
    want = {frozenset((a, b)) for g in (first, second) for a in g for b in g if a < b}
    assert pairs == want
    assert frozenset(("o_0", "o_1")) not in pairs
    assert not any("x_0" in p for p in pairs)
    # a 10 s clip inside a 20 s clip of the same content is covered; the two halves are not duplicates
    halves = true_duplicate_pairs([ClipSpan("w", "o", 0, 20), ClipSpan("h0", "o", 0, 10), ClipSpan("h1", "o", 10, 20.01)])
    assert halves == {frozenset(("w", "h0")), frozenset(("w", "h1"))}


def test_pairs_groups_precision_recall() -> None:
    assert pairs_from_groups({"a": "g", "b": "g", "c": "g", "d": "h", "e": "e"}) == {
        frozenset(("a", "b")), frozenset(("a", "c")), frozenset(("b", "c"))
    }  # fmt: skip
    groups = groups_from_links(["a", "b", "c", "d"], [("b", "a"), ("c", "b"), ("z", "d")])
    assert groups["a"] == groups["b"] == groups["c"] != groups["d"]
    truth = {frozenset(("a", "b")), frozenset(("c", "d"))}
    predicted = {frozenset(("a", "b")), frozenset(("a", "c")), frozenset(("b", "c"))}
    p, r = precision_recall(predicted, truth)
    assert p == pytest.approx(1 / 3) and r == pytest.approx(1 / 2)
    assert precision_recall(set(), truth) == (None, 0.0)
    assert precision_recall(predicted, set()) == (0.0, None)


def test_auc_rank_based_with_ties() -> None:
    assert auc([5, 4, 3], [1, 2]) == 1.0
    assert auc([1, 2], [5, 4, 3]) == 0.0
    assert auc([3, 3], [3, 3]) == 0.5
    # 4 > 2 and 4 > 3; 2 vs 2 tie (0.5), 2 < 3  -> (1 + 1 + 0.5 + 0) / 4
    assert auc([4, 2], [2, 3]) == pytest.approx(0.625)
    assert auc([], [1]) is None and auc([1], []) is None


def test_wer_on_hand_made_inputs() -> None:
    assert wer(["the cat sat on the mat"], ["the cat sat on the mat"]) == 0.0
    assert wer(["the cat sat on the mat"], ["the cat sat on mat"]) == pytest.approx(1 / 6)  # one deletion
    assert wer(["the cat sat"], ["a cat sat down"]) == pytest.approx(2 / 3)  # substitution + insertion
    assert wer(["one two", "three four"], ["one two", None]) == pytest.approx(2 / 4)  # missing counts empty


def test_grounding_words() -> None:
    assert content_words("A video shows a man baking 200 loaves of bread.") == ["man", "baking", "200", "loaves", "bread"]
    words, unsupported = supported(
        "A narrator explains how to bake bread in London.",
        ["Set the oven to two hundred degrees and bake the bread", None, "Baking at home"],
    )
    assert words == ["bake", "bread", "london"] and unsupported == ["london"]
    # crude stems: plural and -ing forms of a signal word count as supported
    assert supported("Trains leaving", ["the train leaves"])[1] == []
    assert carried("The train to the city center leaves from platform four", "A train leaves the city.") == (3, 6)


# --------------------------------------------------------------------------- corpus


def _luma(path: Path, t: float) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            if frame.time is not None and frame.time >= t - 1e-6:
                return frame.to_ndarray(format="gray").astype(np.float32)
    raise AssertionError(f"no frame at {t} s in {path}")


def _audio(path: Path) -> np.ndarray:
    from stages._vad import SAMPLE_RATE, load_audio

    a = load_audio(path)
    assert SAMPLE_RATE == 16000
    return a


@needs_media
def test_corpus_records_planted_truth(tmp_path: Path) -> None:
    from tests.bench.quality_corpus import INJECTION_DESCRIPTIONS, build_corpus, load_truth

    truth = build_corpus(tmp_path, seed=5, originals=2, duplicates=2, bad=2,
                         transforms=("head_trim", "mirror"), bad_kinds=("black", "injection"))  # fmt: skip
    assert load_truth(tmp_path) == truth
    originals = [t for t in truth if t.role == "original"]
    dups = [t for t in truth if t.role == "duplicate"]
    bad = {t.bad_kind: t for t in truth if t.role == "bad"}
    assert len(originals) == 2 and len(dups) == 2 and set(bad) == {"black", "injection"}
    ids = {t.id for t in truth}
    assert len(ids) == len(truth)
    # the LIST names every video once, by an opaque id: nothing tells a copy or a bad clip apart
    with open(tmp_path / "inputs.csv", newline="") as f:
        listing = list(csv.DictReader(f))
    assert {r["id"] for r in listing} == ids
    assert all(Path(r["url"]).name == f"{r['id']}.mp4" and Path(r["url"]).exists() for r in listing)
    assert next(r for r in listing if r["id"] == bad["injection"].id)["description"] in INJECTION_DESCRIPTIONS

    for o in originals:
        assert o.content_id == o.id and len(o.sentences) == 2
        assert o.sentences[0]["end"] < o.sentences[1]["start"] and o.sentences[1]["end"] > 10.0
        a = _audio(tmp_path / o.file)
        assert len(a) / 16000 == pytest.approx(20.0, abs=0.1)
        s = o.sentences[0]
        inside = a[int(s["start"] * 16000) : int(s["end"] * 16000)]
        gap = a[int(s["end"] * 16000) + 1600 : int(o.sentences[1]["start"] * 16000) - 1600]
        if len(gap) > 1600:  # speech is where the truth says: much louder than the tone or silence around it
            assert np.sqrt(np.mean(inside**2)) > 4 * np.sqrt(np.mean(gap**2))

    trim = next(d for d in dups if d.transform == "head_trim")
    src = next(o for o in originals if o.id == trim.content_id)
    assert 1.2 <= trim.offset <= 2.0
    assert [s["start"] for s in trim.sentences] == [pytest.approx(s["start"] - trim.offset, abs=1e-3) for s in src.sentences]
    # time t of the trimmed copy shows the original's time t + offset (and not t)
    copy_frame = _luma(tmp_path / trim.file, 4.0)
    same = np.abs(copy_frame - _luma(tmp_path / src.file, 4.0 + trim.offset)).mean()
    other = np.abs(copy_frame - _luma(tmp_path / src.file, 4.0)).mean()
    assert same < other and same < 8.0

    mirror = next(d for d in dups if d.transform == "mirror")
    src = next(o for o in originals if o.id == mirror.content_id)
    assert mirror.offset == 0.0
    flipped = _luma(tmp_path / mirror.file, 3.0)[:, ::-1]
    assert np.abs(flipped - _luma(tmp_path / src.file, 3.0)).mean() < 8.0

    black = _luma(tmp_path / bad["black"].file, 2.0)
    assert black.max() <= 20  # truly black (limited-range black is 16)
    data = json.loads((tmp_path / "truth.json").read_text())
    assert data["seed"] == 5 and len(data["videos"]) == 6

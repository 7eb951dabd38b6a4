"""pipeline/sanitize.py: rows made JSON- and parquet-safe in one place."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.sanitize import NONFINITE_FIELD, clean_text, dumps_strict, is_strict_json, sanitize, sanitize_row


def test_nonfinite_numbers_become_null_and_are_flagged() -> None:
    row = {
        "key": "v_0000",
        "score": float("nan"),
        "scores": {"judge": math.inf, "ok": 0.5},
        "tags": [{"label": "x", "score": -math.inf}, {"label": "y", "score": 1.0}],
        "embedding": np.array([0.1, np.nan], dtype=np.float32),
        "rms": np.float64("inf"),
        "n": np.int64(3),
    }
    clean = sanitize_row(row)
    assert clean["score"] is None and clean["scores"] == {"judge": None, "ok": 0.5}
    assert clean["tags"][0]["score"] is None and clean["tags"][1]["score"] == 1.0
    assert clean["embedding"][1] is None and clean["embedding"][0] == pytest.approx(0.1)
    assert clean["rms"] is None and clean["n"] == 3 and type(clean["n"]) is int
    assert clean[NONFINITE_FIELD] == sorted(["score", "scores.judge", "tags[0].score", "embedding[1]", "rms"])
    text = json.dumps(clean, allow_nan=False)  # strict JSON: would raise on NaN
    assert is_strict_json(text)
    assert row["score"] != row["score"]  # the input is not modified


def test_finite_rows_are_unchanged_and_unflagged() -> None:
    row = {"a": 1.5, "b": "text", "c": [1, 2], "d": None, "e": True, "blob": b"\x00\xff"}
    assert sanitize_row(row) == row
    assert NONFINITE_FIELD not in sanitize_row(row)


def test_strings_become_valid_utf8_without_nul() -> None:
    broken = b"caf\xe9 \x00 ok".decode("utf-8", "surrogateescape")
    clean, bad = sanitize({"title": broken, broken: "key too", "list": [broken]})
    assert bad == []
    for text in (clean["title"], *clean.keys(), clean["list"][0]):
        text.encode("utf-8")  # would raise on a lone surrogate
        assert "\x00" not in text
    assert clean["title"] == "caf\ufffd  ok"
    assert clean_text("plain") == "plain"
    pa.Table.from_pylist([sanitize_row({"t": broken})])  # Arrow accepts it


def test_json_text_fields_are_reencoded_strictly() -> None:
    row = {"metadata_json": '{"fps": NaN, "title": "x"}', "note_json": "not json NaN"}
    clean = sanitize_row(row)
    assert json.loads(clean["metadata_json"]) == {"fps": None, "title": "x"}
    assert clean[NONFINITE_FIELD] == ["metadata_json.fps"]
    assert clean["note_json"] == "not json NaN"  # unparsable text is left as it is


def test_dumps_strict_and_is_strict_json() -> None:
    assert dumps_strict({"x": float("nan"), "y": "é"}) == '{"x": null, "y": "é"}'
    assert not is_strict_json('{"a": NaN}') and not is_strict_json('{"a": -Infinity}') and not is_strict_json("{")
    assert is_strict_json('{"a": 1}')


def test_a_clip_row_with_nan_and_inf_writes_strict_json_and_parquet(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What the writer does with a clip whose audio decodes to -inf dB (digital silence) or NaN."""
    import pyarrow.parquet as pq

    from schemas.records import Clip, shard_json, to_table

    row = {
        "key": "v_0000", "video_id": "v", "source_url": "http://h/v.mp4", "clip_start": 0.0, "clip_end": 2.0,
        "audio_rms_db": -math.inf, "audio_peak_db": float("nan"), "fps": math.inf, "shot_times": [0.5, float("nan")],
        "metadata_json": '{"title": "caf\\u00e9", "rate": NaN}',
    }
    clean = sanitize_row(row)
    assert set(clean[NONFINITE_FIELD]) == {"audio_rms_db", "audio_peak_db", "fps", "shot_times[1]", "metadata_json.rate"}
    doc = json.dumps(shard_json(clean), allow_nan=False)
    assert is_strict_json(doc)
    pq.write_table(to_table([clean], Clip), tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet").to_pylist()[0]
    assert back["audio_rms_db"] is None and back["fps"] is None

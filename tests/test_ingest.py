from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputListError
from stages.ingest import make_video_id, read_inputs


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error_stage")]


def test_txt_skips_blanks_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text("# a comment\nhttp://127.0.0.1:1/a.mp4\n\nhttps://example.org/b.mp4\n")
    rows = read_inputs(f)
    assert [r["source_url"] for r in rows] == ["http://127.0.0.1:1/a.mp4", "https://example.org/b.mp4"]
    assert [r["input_index"] for r in rows] == [0, 1]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_tabular_formats_carry_metadata(tmp_path: Path, fmt: str) -> None:
    records = [
        {"url": "http://127.0.0.1:1/a.mp4", "id": "vid1", "title": "A title", "lang": "en"},
        {"url": "http://127.0.0.1:1/b.mp4", "id": "vid2", "title": "Another", "lang": "de"},
    ]
    f = tmp_path / f"l.{fmt}"
    if fmt == "csv":
        f.write_text("url,id,title,lang\n" + "".join(f"{r['url']},{r['id']},{r['title']},{r['lang']}\n" for r in records))
    elif fmt == "jsonl":
        f.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), f)
    rows = read_inputs(f)
    assert [r["video_id"] for r in rows] == ["vid1", "vid2"]
    assert json.loads(rows[1]["metadata_json"]) == {"title": "Another", "lang": "de"}


def test_ids_are_sanitised_deterministic_and_distinct() -> None:
    a = make_video_id("http://x/a.mp4", "my.video/1")
    b = make_video_id("http://x/a.mp4", "my_video_1")
    c = make_video_id("http://x/a.mp4", "vidéo ünïcode")
    for vid in (a, b, c):
        assert all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in vid), vid
    assert a != b  # sanitised ids keep a hash of the original
    assert a == make_video_id("http://x/a.mp4", "my.video/1")
    assert make_video_id("http://h/dir/clip.v2.mp4") == make_video_id("http://h/dir/clip.v2.mp4")
    assert make_video_id("http://h/a/clip.mp4") != make_video_id("http://h/b/clip.mp4")


def test_bad_lines_become_error_rows(tmp_path: Path) -> None:
    f = tmp_path / "l.jsonl"
    f.write_text(
        '{"url": "http://127.0.0.1:1/a.mp4", "id": "same"}\n'
        '{"url": "http://127.0.0.1:1/b.mp4", "id": "same"}\n'
        "this is not json\n"
        '{"url": "just words here"}\n'
        '{"url": "/no/such/file.mp4"}\n'
        '{"id": "nourl"}\n'
    )
    rows = read_inputs(f)
    assert len(rows) == 6
    kinds = [r.get("error_type") for r in rows]
    assert kinds == [None, "duplicate_input", "invalid_input", "invalid_input", "not_found", "invalid_input"]
    assert len({r["video_id"] for r in rows}) == 6  # every input keeps its own identity
    assert all(r["error_stage"] == "ingest" for r in rows[1:])


def test_empty_list_and_missing_list(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert read_inputs(f) == []
    with pytest.raises(InputListError):
        read_inputs(tmp_path / "missing.txt")
    bad = tmp_path / "x.csv"
    bad.write_text("link,name\na,b\n")
    with pytest.raises(InputListError, match="url"):
        read_inputs(bad)
    assert _ok([]) == []

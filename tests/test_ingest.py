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


# ----------------------------------------------------------------------------- hostile LIST files


def test_utf8_bom_txt_keeps_its_first_url(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhttp://127.0.0.1:1/a.mp4\r\nhttp://127.0.0.1:1/b.mp4\r\n")
    rows = read_inputs(f)
    assert [r["source_url"] for r in rows] == ["http://127.0.0.1:1/a.mp4", "http://127.0.0.1:1/b.mp4"]
    assert not any(r.get("error_stage") for r in rows)


def test_spreadsheet_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    f = tmp_path / "sheet.csv"
    f.write_bytes(b"\xef\xbb\xbfURL,Id,title\r\nhttp://127.0.0.1:1/a.mp4,one,First \xc3\xa9\r\nhttp://127.0.0.1:1/b.mp4,two,Second\r\n")
    rows = read_inputs(f)
    assert [r["video_id"] for r in rows] == ["one", "two"]
    assert rows[0]["source_url"] == "http://127.0.0.1:1/a.mp4"
    assert json.loads(rows[0]["metadata_json"]) == {"title": "First é"}


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_delimiter_is_sniffed(tmp_path: Path, delimiter: str) -> None:
    f = tmp_path / "eu.csv"
    f.write_text(f"url{delimiter}title\nhttp://127.0.0.1:1/a.mp4{delimiter}x, y\n")
    (row,) = read_inputs(f)
    assert row["source_url"] == "http://127.0.0.1:1/a.mp4" and json.loads(row["metadata_json"]) == {"title": "x, y"}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_lists(tmp_path: Path, encoding: str) -> None:
    """utf-16 / utf-32 write a BOM; bare utf-16-le (no BOM) is recognised from its NUL bytes."""
    f = tmp_path / "wide.txt"
    f.write_bytes("http://127.0.0.1:1/a.mp4\r\nhttp://127.0.0.1:1/ü.mp4\r\n".encode(encoding))
    rows = read_inputs(f)
    assert [r["source_url"] for r in rows] == ["http://127.0.0.1:1/a.mp4", "http://127.0.0.1:1/ü.mp4"]
    c = tmp_path / "wide.csv"
    c.write_bytes("url\tid\r\nhttp://127.0.0.1:1/a.mp4\tx1\r\n".encode(encoding))
    assert [r["video_id"] for r in read_inputs(c)] == ["x1"]


def test_non_utf8_line_is_an_error_row_and_others_go_on(tmp_path: Path) -> None:
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"http://127.0.0.1:1/a.mp4\nhttp://127.0.0.1:1/caf\xe9.mp4\n\xff\xfe\xfd\nhttp://127.0.0.1:1/c.mp4\n")
    rows = read_inputs(f)
    assert len(rows) == 4
    assert [r.get("error_type") for r in rows] == [None, "invalid_input", "invalid_input", None]
    assert "line 2 is not valid UTF-8" in rows[1]["error"] and "line 3" in rows[2]["error"]
    for r in rows:  # every string is storable: valid UTF-8 (parquet refuses lone surrogates)
        for v in r.values():
            if isinstance(v, str):
                v.encode("utf-8")
    pa.Table.from_pylist(rows)  # would raise on invalid strings
    j = tmp_path / "mixed.jsonl"
    j.write_bytes(b'{"url": "http://127.0.0.1:1/a.mp4"}\n{"url": "http://127.0.0.1:1/\xe9.mp4"}\n')
    assert [r.get("error_type") for r in read_inputs(j)] == [None, "invalid_input"]
    c = tmp_path / "mixed.csv"
    c.write_bytes(b"url,title\nhttp://127.0.0.1:1/\xe9.mp4,t\nhttp://127.0.0.1:1/b.mp4,caf\xe9\n")
    bad, ok = read_inputs(c)
    assert bad["error_type"] == "invalid_input" and "CSV line 2" in bad["error"]
    assert ok.get("error_type") is None and json.loads(ok["metadata_json"]) == {"title": "caf\ufffd"}


def test_overlong_names_and_paths_are_typed_errors(tmp_path: Path) -> None:
    f = tmp_path / "long.txt"
    long_name = "a" * 300 + ".mp4"
    long_path = "/" + "/".join(["d" * 99] * 50) + "/x.mp4"  # ~5,000 characters
    nul = "/tmp/x\0y.mp4"
    f.write_text(f"{long_name}\n{tmp_path}/{long_name}\n{long_path}\nhttp://127.0.0.1:1/{'q' * 9000}.mp4\n{nul}\n")
    rows = read_inputs(f)
    assert len(rows) == 5
    assert all(r["error_stage"] == "ingest" and r["error_type"] == "invalid_input" for r in rows), rows
    assert "too long" in rows[0]["error"] and "too long" in rows[2]["error"] and "too long" in rows[3]["error"]
    assert "NUL" in rows[4]["error"]
    assert len(rows[2]["source_url"]) < 1000  # error rows keep a bounded excerpt
    pa.Table.from_pylist(rows)


def test_per_record_functions_compose(tmp_path: Path) -> None:
    """The pieces a distributed reader uses give the same rows as read_inputs."""
    from stages.ingest import decode_list_bytes, mark_duplicates, parse_text_line, record_to_row

    data = b"\xef\xbb\xbfhttp://127.0.0.1:1/a.mp4\n# c\nhttp://127.0.0.1:1/a.mp4\n"
    f = tmp_path / "l.txt"
    f.write_bytes(data)
    lines = decode_list_bytes(data).splitlines()
    records = [r for n, ln in enumerate(lines, 1) if (r := parse_text_line(ln, n)) is not None]
    seen: dict[str, int] = {}
    rows = [*mark_duplicates([record_to_row(records[0], 0)], seen), *mark_duplicates([record_to_row(records[1], 1)], seen)]
    assert rows == read_inputs(f)
    assert rows[1]["error_type"] == "duplicate_input"


def test_unsupported_schemes_are_typed(tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text("rtsp://127.0.0.1/cam\nrtmp://h/live\nmms://h/x\nhttps://example.org/a.mp4\n")
    rows = read_inputs(f)
    assert [r.get("error_type") for r in rows] == ["unsupported_scheme"] * 3 + [None]
    assert "'rtsp'" in rows[0]["error"]


def test_binary_url_column_in_parquet(tmp_path: Path) -> None:
    f = tmp_path / "b.parquet"
    table = pa.table({"URL": pa.array([b"http://127.0.0.1:1/a.mp4", b"http://127.0.0.1:1/\xff.mp4"], pa.binary())})
    pq.write_table(table, f)
    ok, bad = read_inputs(f)
    assert ok["source_url"] == "http://127.0.0.1:1/a.mp4" and not ok.get("error_type")
    assert bad["error_type"] == "invalid_input" and "UTF-8" in bad["error"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_old_mac_line_ends(tmp_path: Path, suffix: str) -> None:
    urls = ["http://127.0.0.1:1/a.mp4", "http://127.0.0.1:1/b.mp4"]
    if suffix == ".txt":
        body = "\r".join(urls) + "\r"
    elif suffix == ".csv":
        body = "url\r" + "\r".join(urls) + "\r"
    else:
        body = "\r".join(json.dumps({"url": u}) for u in urls) + "\r"
    f = tmp_path / f"cr{suffix}"
    f.write_bytes(body.encode())
    assert [r["source_url"] for r in read_inputs(f)] == urls

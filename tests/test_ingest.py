from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputListError
from pipeline.ingest import IngestCounts
from stages.ingest import make_video_id, read_inputs
from tests.conftest import s3_server


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


# ----------------------------------------------------------------------------- blocks read on workers


def _planned(list_path: str | Path, per: int = 3, done: set[int] | None = None, retry: dict[int, set[str]] | None = None,
             **kw: object) -> tuple[list[dict], list, IngestCounts]:  # fmt: skip
    """Rows of every planned block, read in-process (pickled first, as a Ray read task gets it)."""
    import pickle

    from pipeline.ingest import plan_blocks

    counts = IngestCounts()
    blocks = list(plan_blocks(list_path, per, done or set(), retry, counts, **kw))  # type: ignore[arg-type]
    rows: list[dict] = []
    for block in blocks:
        got = pickle.loads(pickle.dumps(block)).read()
        by_partition: dict[int, int] = {}
        for r in got:
            by_partition[r["input_index"] // per] = by_partition.get(r["input_index"] // per, 0) + 1
        assert by_partition == {p: n for p, n in block.partitions.items() if n}, "a block's partitions count its rows"
        assert block.rows == len(got)
        rows += got
    return rows, blocks, counts


def _today(list_path: Path, per: int = 3, done: set[int] | None = None, retry: dict[int, set[str]] | None = None) -> list[dict]:
    from pipeline.ingest import IngestCounts, iter_partitions

    def wanted(p: int, row: dict) -> bool:
        return p not in (done or set()) or (retry is not None and row["video_id"] in retry.get(p, ()))

    return [r for _, part in iter_partitions(list_path, per, wanted, IngestCounts()) for r in part]


_HARD_TXT = (
    b"\xef\xbb\xbf# exported list\r\n"
    b"http://127.0.0.1:1/a.mp4\r\n"
    b"\r\n"
    b"   \n"
    b"http://127.0.0.1:1/b.mp4\r"
    b"http://127.0.0.1:1/caf\xe9.mp4\n"  # not UTF-8
    b"http://127.0.0.1:1/a.mp4\n"  # duplicate of line 2
    b"  # indented comment\n"
    b"http://127.0.0.1:1/" + b"x" * 300 + b".mp4\r\n"
    b"just words here\n"
    b"rtsp://127.0.0.1/cam\n"
    b"http://127.0.0.1:1/nul\x00.mp4\n"
    b"http://127.0.0.1:1/b.mp4\r\n"  # duplicate of line 5
    b"http://127.0.0.1:1/c.mp4"  # no line end
)


@pytest.mark.parametrize("chunk", [1, 2, 7, 25, 64, 1 << 20])
@pytest.mark.parametrize("block_rows", [1, 2, 5])
def test_blocks_give_the_rows_of_a_whole_file_read(tmp_path: Path, chunk: int, block_rows: int) -> None:
    """Cut anywhere (inside CRLFs, BOM, long lines), the blocks give today's rows: same indexes,
    line numbers in messages, error rows and duplicates (across blocks and bucket files)."""
    f = tmp_path / "hard.txt"
    f.write_bytes(_HARD_TXT)
    rows, blocks, counts = _planned(f, chunk_bytes=chunk, block_rows=block_rows, buckets=3)
    assert rows == _today(f)
    assert counts.inputs == len(rows) == 10 and counts.unusable == sum(1 for r in rows if r.get("error_stage"))
    assert [r.get("error_type") for r in rows if r.get("error_stage")].count("duplicate_input") == 2
    assert "line 6 is not valid UTF-8" in rows[2]["error"]
    assert counts.partitions == 4
    if chunk == 1 and block_rows == 1:
        assert len(blocks) >= 10  # really split


def _write(path: Path, fmt: str, records: list[dict]) -> None:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\nnot json\n")
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text("url" + sep + "id" + sep + "title\r\n" + "".join(f"{r['url']}{sep}{r['id']}{sep}{r['title']}\r\n" for r in records))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_tabular_blocks_match_a_whole_file_read(tmp_path: Path, fmt: str) -> None:
    records = [
        {"url": f"http://127.0.0.1:1/{i % 17}.mp4", "id": f"v{i % 23}" if i % 5 else "", "title": f"t{i}"}
        for i in range(60)
    ]
    f = tmp_path / f"l.{fmt}"
    _write(f, fmt, records)
    want = _today(f, per=4)
    assert any(r.get("error_type") == "duplicate_input" for r in want)
    for chunk, block_rows in [(13, 3), (97, 8), (1 << 20, 64)]:
        rows, blocks, _ = _planned(f, per=4, chunk_bytes=chunk, block_rows=block_rows, buckets=4)
        assert rows == want, (chunk, block_rows)
    if fmt == "parquet":
        assert [b.end - b.start for b in blocks] and max(b.end for b in blocks) == 15  # whole row groups


def test_csv_with_quoted_line_ends_is_scanned_in_a_chain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A quoted field spanning lines makes the speculative split invalid: the chained scan still
    cuts the CSV only at record boundaries, and line numbers in messages stay right."""
    f = tmp_path / "q.csv"
    lines = ['"url","title"\n']
    for i in range(40):
        title = f'"line one\nline ""two"" {i}"' if i % 3 == 0 else f"plain {i}"
        url = f"http://127.0.0.1:1/{i % 11}.mp4" if i != 7 else "\udcff"
        lines.append(f"{url},{title}\r\n")
    f.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    want = _today(f, per=2)
    assert "CSV line" in next(r["error"] for r in want if r.get("error_type") == "invalid_input")
    with caplog.at_level("INFO", logger="pipeline.ingest"):
        rows, blocks, _ = _planned(f, per=2, chunk_bytes=40, block_rows=4, buckets=2)
    assert rows == want and len(blocks) > 3
    assert "spanning lines" in caplog.text


def test_wide_encodings_are_one_block(tmp_path: Path) -> None:
    for name, encoding in [("w.txt", "utf-16"), ("w.csv", "utf-32"), ("bare.txt", "utf-16-le")]:
        f = tmp_path / name
        body = "url\tid\r\n" if name.endswith(".csv") else ""
        body += "".join(f"http://127.0.0.1:1/ü{i % 5}.mp4" + ("\tx" + str(i) if name.endswith(".csv") else "") + "\r\n" for i in range(9))
        f.write_bytes(body.encode(encoding))
        rows, blocks, _ = _planned(f, per=2, chunk_bytes=8, block_rows=2)
        assert rows == _today(f, per=2) and len(rows) == 9 and len(blocks) == 1


def test_resume_and_retry_blocks_count_only_what_they_yield(tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text("".join(f"http://127.0.0.1:1/{i}.mp4\n" + ("\n# gap\n" if i % 4 == 0 else "") for i in range(50)))
    everything = _today(f, per=5)
    retry = {2: {everything[11]["video_id"], everything[13]["video_id"]}, 7: {everything[39]["video_id"]}}
    done = {0, 1, 2, 3, 7, 8}
    for chunk in (9, 33, 1 << 20):
        rows, blocks, counts = _planned(f, per=5, done=done, retry=retry, chunk_bytes=chunk, block_rows=4)
        assert rows == _today(f, per=5, done=done, retry=retry)
        assert [r["input_index"] for r in rows if r["input_index"] < 45] == [11, 13, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 39]
        assert sum(b.partitions.get(2, 0) for b in blocks) == 2  # a retried partition: its retried videos
        assert sum(1 for b in blocks if 2 in b.partitions) == 1  # ... in one block
        assert counts.inputs == 50
    rows, blocks, _ = _planned(f, per=5, done=set(range(10)), retry=None, chunk_bytes=9)
    assert rows == [] and blocks == []


def test_planning_errors_and_empty_lists(tmp_path: Path) -> None:
    from pipeline.ingest import plan_blocks

    with pytest.raises(InputListError, match="not found"):
        list(plan_blocks(tmp_path / "missing.txt", 8, set(), None, IngestCounts()))
    bad = tmp_path / "x.csv"
    bad.write_text("link,name\na,b\n")
    with pytest.raises(InputListError, match="url"):
        list(plan_blocks(bad, 8, set(), None, IngestCounts()))
    nourl = tmp_path / "x.parquet"
    pq.write_table(pa.table({"link": ["a"]}), nourl)
    with pytest.raises(InputListError, match="url"):
        list(plan_blocks(nourl, 8, set(), None, IngestCounts()))
    for name, body in [("e.txt", b""), ("h.csv", b"url,id\n"), ("c.txt", b"# only\n\n\r\n")]:
        (tmp_path / name).write_bytes(body)
        rows, blocks, counts = _planned(tmp_path / name, chunk_bytes=2)
        assert rows == [] and counts.inputs == 0


def test_scratch_and_list_on_object_storage(tmp_path: Path) -> None:
    """An s3:// LIST is read by ranged GETs and the id buckets go to an s3:// scratch folder
    (a real S3-compatible server on 127.0.0.1), then are removed."""
    with s3_server():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="lists")
        f = tmp_path / "hard.txt"
        f.write_bytes(_HARD_TXT)
        client.upload_file(str(f), "lists", "in/hard.txt")
        rows, blocks, _ = _planned("s3://lists/in/hard.txt", chunk_bytes=16, block_rows=2, buckets=2, scratch="s3://lists/tmp")
        assert rows == _today(f) and len(blocks) > 2
        assert client.list_objects_v2(Bucket="lists", Prefix="tmp/").get("KeyCount") == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_lists_match_a_whole_file_read(tmp_path: Path, seed: int) -> None:
    import random

    rnd = random.Random(seed)
    pieces = [b"http://127.0.0.1:1/%d.mp4" % rnd.randrange(30) for _ in range(120)]
    pieces += [b"", b"   ", b"# c", b"\xff\xfe", b"nope", b"\xef\xbb\xbfhttp://127.0.0.1:1/1.mp4", b"\x00"] * 3
    rnd.shuffle(pieces)
    data = b"".join(p + rnd.choice([b"\n", b"\r\n", b"\r"]) for p in pieces)
    f = tmp_path / "r.txt"
    f.write_bytes(data)
    per = rnd.randrange(1, 9)
    done = {p for p in range(40) if rnd.random() < 0.3}
    rows, _, _ = _planned(f, per=per, done=done, chunk_bytes=rnd.randrange(1, 200), block_rows=rnd.randrange(1, 20),
                          buckets=rnd.randrange(1, 5))  # fmt: skip
    assert rows == _today(f, per=per, done=done)


def test_scan_and_resolve_run_as_ray_tasks(tmp_path: Path) -> None:
    """The scan and resolve passes through ``ray_map`` (Ray Data tasks on worker processes), the
    id buckets in a scratch folder, the blocks read by Ray read tasks: today's rows."""
    from pipeline.config import load_config
    from pipeline.ingest import plan_blocks
    from pipeline.ray_runner import init_ray, ray_map

    f = tmp_path / "hard.txt"
    f.write_bytes(_HARD_TXT * 3)
    init_ray(load_config(None, ["ray.num_cpus=2", "ray.progress_bars=false"]))
    import ray

    counts = IngestCounts()
    blocks = list(plan_blocks(f, 3, set(), None, counts, block_rows=4, chunk_bytes=100, buckets=2, map_fn=ray_map,
                              scratch=str(tmp_path / "scratch")))  # fmt: skip
    read = ray.remote(lambda block: (block.read(), os.getpid()))
    results = ray.get([read.remote(b) for b in blocks])
    assert [r for rows, _ in results for r in rows] == _today(f)
    assert os.getpid() not in {pid for _, pid in results}  # read by worker processes
    assert counts.inputs == 30 and not list((tmp_path / "scratch").iterdir())


def test_lines_longer_than_a_read_window_and_a_multiline_csv_header(tmp_path: Path) -> None:
    """A line longer than the 64 KiB window used to find line starts (and than a chunk) stays one
    line; a CSV header with a quoted line end is read whole before the first record."""
    f = tmp_path / "long.txt"
    f.write_bytes(b"http://127.0.0.1:1/a.mp4\r" + b"http://127.0.0.1:1/" + b"y" * 200_000 + b"\r\nhttp://127.0.0.1:1/b.mp4\n" * 2)
    for chunk in (1000, 70_000, 1 << 20):
        rows, _, _ = _planned(f, chunk_bytes=chunk, block_rows=1)
        assert rows == _today(f) and len(rows) == 4 and "too long" in rows[1]["error"]
    c = tmp_path / "h.csv"
    c.write_bytes(b'"url","ti\r\ntle"\r\n' + b"".join(b"http://127.0.0.1:1/%d.mp4,t%d\r\n" % (i % 4, i) for i in range(12)))
    rows, blocks, _ = _planned(c, chunk_bytes=30, block_rows=2)
    assert rows == _today(c) and len(rows) == 12 and len(blocks) > 2
    assert json.loads(rows[0]["metadata_json"]) == {"ti\r\ntle": "t0"}

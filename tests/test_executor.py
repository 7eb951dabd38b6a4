"""The executor turns failures into data: row isolation, out-of-memory batch halving, pass-through."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from pipeline.errors import StageError
from pipeline.executor import apply_stage
from pipeline.stage import Row, Stage


class _Cfg(BaseModel):
    max_rows: int = 1_000  # more rows than this in one call runs "out of memory"
    oom_keys: tuple[str, ...] = ()  # these rows run out of memory even alone
    bad_keys: tuple[str, ...] = ()  # these rows are bad input
    oom_error: str = "memory"  # memory: MemoryError; cuda: torch-style RuntimeError


class _Probe(Stage[_Cfg]):
    """Doubles ``n``; records the size of every call it gets."""

    name: ClassVar[str] = "probe"
    reads: ClassVar[tuple[str, ...]] = ("n",)
    writes: ClassVar[tuple[str, ...]] = ("doubled",)

    def __init__(self, config: _Cfg) -> None:
        super().__init__(config)
        self.calls: list[list[str]] = []

    def process_batch(self, rows: list[Row]) -> list[Any]:
        self.calls.append([r["key"] for r in rows])
        if len(rows) > self.config.max_rows or any(r["key"] in self.config.oom_keys for r in rows):
            if self.config.oom_error == "cuda":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
            raise MemoryError()
        for r in rows:
            if r["key"] in self.config.bad_keys:
                raise StageError(f"cannot read {r['key']}", "corrupt_media")
        return [{"doubled": 2 * r["n"]} for r in rows]


class _KeepDropped(_Probe):
    skip_dropped: ClassVar[bool] = False


class _WrongCount(_Probe):
    def process_batch(self, rows: list[Row]) -> list[Any]:
        super().process_batch(rows)
        return [{"doubled": 0}]  # one result whatever the batch size: a broken stage


def _rows(n: int) -> list[Row]:
    return [{"key": f"v_{i:04d}", "video_id": "v", "source_url": "/x/v.mp4", "n": i} for i in range(n)]


def _by_key(rows: list[Row]) -> dict[str, Row]:
    out = {r["key"]: r for r in rows}
    assert len(out) == len(rows), "a row was duplicated"
    return out


@pytest.mark.parametrize("oom_error", ["memory", "cuda"])
def test_out_of_memory_batch_is_retried_in_halves(oom_error: str, caplog: pytest.LogCaptureFixture) -> None:
    stage = _Probe(_Cfg(max_rows=3, oom_error=oom_error))
    with caplog.at_level(logging.WARNING, logger="pipeline.executor"):
        out = _by_key(apply_stage(stage, _rows(10)))
    assert sorted(out) == [f"v_{i:04d}" for i in range(10)]
    assert all(not r.get("error_stage") for r in out.values())
    assert [out[f"v_{i:04d}"]["doubled"] for i in range(10)] == [2 * i for i in range(10)]
    # 10 -> 5 + 5 -> (2 + 3) + (2 + 3): halves, not rows one by one
    assert [len(c) for c in stage.calls] == [10, 5, 2, 3, 5, 2, 3]
    assert "out of memory on a batch of 10 rows" in caplog.text


def test_row_that_runs_out_of_memory_alone_is_the_only_error() -> None:
    stage = _Probe(_Cfg(oom_keys=("v_0005",)))
    out = _by_key(apply_stage(stage, _rows(8)))
    failed = {k: r for k, r in out.items() if r.get("error_stage")}
    assert list(failed) == ["v_0005"]
    assert failed["v_0005"]["error_type"] == "out_of_memory"
    assert failed["v_0005"]["error_stage"] == "probe"
    assert all(out[k]["doubled"] == 2 * out[k]["n"] for k in out if k != "v_0005")
    # halving down to the single row: 8 -> 4 + 4 -> ... ; never more calls than 2n - 1
    assert ["v_0005"] in stage.calls
    assert len(stage.calls) <= 2 * 8 - 1


def test_bad_row_is_isolated_row_by_row(caplog: pytest.LogCaptureFixture) -> None:
    stage = _Probe(_Cfg(bad_keys=("v_0002",)))
    with caplog.at_level(logging.WARNING, logger="pipeline.executor"):
        out = _by_key(apply_stage(stage, _rows(4)))
    assert [len(c) for c in stage.calls] == [4, 1, 1, 1, 1]
    bad = out["v_0002"]
    assert (bad["error_stage"], bad["error_type"], bad["error"]) == ("probe", "corrupt_media", "cannot read v_0002")
    assert "doubled" not in bad
    assert [out[k]["doubled"] for k in ("v_0000", "v_0001", "v_0003")] == [0, 2, 6]
    assert "v_0002" in caplog.text  # the per-sample error log names the sample key


def test_bad_row_inside_an_out_of_memory_half_keeps_its_own_error() -> None:
    stage = _Probe(_Cfg(max_rows=4, bad_keys=("v_0006",)))
    out = _by_key(apply_stage(stage, _rows(8)))
    failed = {k: r["error_type"] for k, r in out.items() if r.get("error_stage")}
    assert failed == {"v_0006": "corrupt_media"}
    assert sum(1 for r in out.values() if "doubled" in r) == 7


def test_wrong_result_count_is_an_error_per_row() -> None:
    stage = _WrongCount(_Cfg())
    out = _by_key(apply_stage(stage, _rows(3)))
    # a broken batch result is retried row by row, where one result per row is right
    assert all(not r.get("error_stage") for r in out.values())
    assert [len(c) for c in stage.calls] == [3, 1, 1, 1]


def test_failed_and_dropped_rows_pass_through_untouched() -> None:
    rows = _rows(4)
    rows[1] = {**rows[1], "error_stage": "download", "error_type": "not_found", "error": "404"}
    rows[2] = {**rows[2], "drop_reason": "silent"}
    stage = _Probe(_Cfg())
    out = _by_key(apply_stage(stage, rows))
    assert stage.calls == [["v_0000", "v_0003"]]
    assert out["v_0001"] == rows[1]  # not even a timing added
    assert out["v_0002"] == rows[2]
    assert out["v_0000"]["doubled"] == 0 and out["v_0003"]["doubled"] == 6
    assert [t["stage"] for t in out["v_0000"]["timings"]] == ["probe"]

    keep = _KeepDropped(_Cfg())
    out = _by_key(apply_stage(keep, rows))
    assert keep.calls == [["v_0000", "v_0002", "v_0003"]]  # errored rows still skipped
    assert out["v_0002"]["doubled"] == 4 and out["v_0002"]["drop_reason"] == "silent"


def test_nothing_active_means_no_call() -> None:
    rows = [{**r, "error_stage": "split", "error_type": "corrupt_media", "error": "x"} for r in _rows(3)]
    stage = _Probe(_Cfg())
    assert apply_stage(stage, rows) == rows
    assert stage.calls == []


class _Split3(Stage[_Cfg]):
    """A fan-out stage: three children per row, after a short sleep."""

    name: ClassVar[str] = "split3"
    fan_out: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("n",)
    writes: ClassVar[tuple[str, ...]] = ("key",)

    def process_batch(self, rows: list[Row]) -> list[Any]:
        import time

        time.sleep(0.05)
        return [[{"key": f"{r['key']}_{i}"} for i in range(3)] for r in rows]


def test_fan_out_shares_time_so_stage_sums_stay_true() -> None:
    rows = [{**r, "timings": [{"stage": "download", "seconds": 0.9}]} for r in _rows(2)]
    out = apply_stage(_Split3(_Cfg()), rows)
    assert len(out) == 6
    total: dict[str, float] = {}
    for r in out:
        for t in r["timings"]:
            total[t["stage"]] = total.get(t["stage"], 0.0) + t["seconds"]
    assert total["download"] == pytest.approx(1.8)  # counted once per parent, not once per clip
    assert 0.05 <= total["split3"] < 0.5

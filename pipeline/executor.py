"""Apply one stage to one batch of rows, turning failures into data.

Shared by the Ray runner and the in-process sequential runner, so both behave the same.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from typing import Any

from pipeline.errors import error_message_of, error_type_of, is_out_of_memory
from pipeline.security import redact_text
from pipeline.stage import Row, Stage

log = logging.getLogger(__name__)


def _is_active(stage: Stage, row: Row) -> bool:
    if row.get("error_stage"):
        return False
    if stage.skip_dropped and row.get("drop_reason"):
        return False
    return True


def error_fields(stage: Stage, exc: BaseException) -> dict[str, Any]:
    """The error columns of a failed row: a documented ``error_type`` (pipeline/errors.py ERROR_TYPES)
    and the redacted detail, which keeps an unexpected exception's class name."""
    message = redact_text(error_message_of(exc))
    return {"error_stage": stage.name, "error_type": error_type_of(exc), "error": message[:2000]}


def _check(stage: Stage, rows: list[Row], results: list[Any]) -> None:
    if not isinstance(results, list) or len(results) != len(rows):
        got = len(results) if isinstance(results, list) else type(results).__name__
        raise RuntimeError(f"stage {stage.name} returned {got} results for {len(rows)} rows")


def _release_accelerator_memory() -> None:
    """After an out-of-memory error: free what the failed call left, and torch's CUDA cache if loaded."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _call(stage: Stage, rows: list[Row]) -> list[Any]:
    """process_batch; on an exception, isolate it by retrying row by row.

    Out of memory is not a bad row but too big a batch: the batch is retried as two halves
    (recursively, down to one row); only a single row that still runs out of memory fails.
    """
    try:
        results = stage.process_batch(rows)
        _check(stage, rows, results)
        return results
    except Exception as exc:  # noqa: BLE001 - any stage failure becomes data
        if len(rows) == 1:
            return [exc]
        out_of_memory = is_out_of_memory(exc)
        if not out_of_memory:
            log.info("stage %s: batch of %d failed (%s); retrying row by row", stage.name, len(rows), exc)
    if out_of_memory:  # outside the except block, so the failed call's frames can be freed
        half = len(rows) // 2
        log.warning(
            "stage %s: out of memory on a batch of %d rows; retrying as %d + %d",
            stage.name, len(rows), half, len(rows) - half,
        )  # fmt: skip
        _release_accelerator_memory()
        return _call(stage, rows[:half]) + _call(stage, rows[half:])
    out: list[Any] = []
    for row in rows:
        try:
            single = stage.process_batch([row])
            _check(stage, [row], single)
            out.extend(single)
        except Exception as row_exc:  # noqa: BLE001
            out.append(row_exc)
    return out


def _with_update(stage: Stage, row: Row, update: dict[str, Any]) -> Row:
    unknown = set(update) - set(stage.writes)
    if unknown:
        raise RuntimeError(f"stage {stage.name} wrote undeclared columns {sorted(unknown)}")
    new = dict(row)
    new.update(update)
    return new


def _log_error(stage: Stage, row: Row, fields: dict[str, Any]) -> None:
    log.warning(
        "stage %s failed on %s (%s): %s: %s",
        stage.name,
        row.get("key") or row.get("video_id"),
        row.get("source_url"),
        fields["error_type"],
        fields["error"],
    )


def apply_stage(stage: Stage, rows: list[Row]) -> list[Row]:
    """Run ``stage`` on ``rows``; failed and dropped rows pass through untouched."""
    active = [r for r in rows if _is_active(stage, r)]
    out: list[Row] = [r for r in rows if not _is_active(stage, r)]
    if not active:
        return out
    started = time.perf_counter()
    results = _call(stage, active)
    return out + _merge(stage, active, results, time.perf_counter() - started)


def apply_global(stage: Stage, partition: int, rows: list[Row]) -> list[Row]:
    """A global phase's decisions (``Stage.apply_partition``) applied to one partition's rows; if
    they cannot be read, every row fails with the stage's error (the rest of the run goes on)."""
    active = [r for r in rows if _is_active(stage, r)]
    out: list[Row] = [r for r in rows if not _is_active(stage, r)]
    if not active:
        return out
    started = time.perf_counter()
    try:
        results = stage.apply_partition(partition, active)
        _check(stage, active, results)
    except Exception as exc:  # noqa: BLE001 - a failed decision read becomes data
        log.error("global stage %s: partition %d failed: %s", stage.name, partition, exc)
        results = [exc] * len(active)
    return out + _merge(stage, active, results, time.perf_counter() - started)


def _merge(stage: Stage, active: list[Row], results: list[Any], seconds: float) -> list[Row]:
    """Each active row with its result applied: an update, a fan-out's children, or an error."""
    out: list[Row] = []
    share = seconds / len(active)
    for row, result in zip(active, results, strict=True):
        timed = dict(row)
        timed["timings"] = list(row.get("timings") or []) + [{"stage": stage.name, "seconds": share}]
        if isinstance(result, BaseException):
            fields = error_fields(stage, result)
            _log_error(stage, row, fields)
            out.append({**timed, **fields})
            continue
        try:
            if stage.fan_out:
                children = list(result)
                if children:  # the parent's time is shared by its children: sums stay true
                    timed["timings"] = [{**t, "seconds": t["seconds"] / len(children)} for t in timed["timings"]]
                out.extend(_with_update(stage, timed, child) for child in children)
            else:
                out.append(_with_update(stage, timed, result))
        except Exception as exc:  # noqa: BLE001 - a broken stage result still becomes data
            fields = error_fields(stage, exc)
            _log_error(stage, row, fields)
            out.append({**timed, **fields})
    return out

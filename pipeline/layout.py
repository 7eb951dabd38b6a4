"""The output folder's layout: every name the writer, the committer and the readers use.

Under ``OUTPUT``::

    shards/{partition:06d}-{digest}.tar      WebDataset samples of kept clips (written by a worker)
    shards/{partition:06d}-{digest}.parquet  the sidecar index of that shard (same rows, same order)
    _parts/rejects-{partition:06d}-{digest}.parquet, _parts/errors-{partition:06d}-{digest}.parquet
                                             rejects and errors, written by the same worker
    signals/{partition:06d}-{digest}.parquet  what a global phase (dedup) decided on, per clip that
                                             reached it (written by a worker; kept for later runs:
                                             ``avforge run --dedup-against``)
    _markers/{partition:06d}.json            completion marker of one input partition (the driver's
                                             commit): its shards, parts, signals and counts
    _tmp/                                    writers' files in progress (local outputs only)
    index.parquet, rejects.parquet, errors.parquet   streamed from the committed files at the end
    stats.json, config.yaml, report/

An input partition is ``inputs_per_partition`` consecutive lines of the LIST (by ``input_index``).
A shard's name is its partition and a digest of the keys it holds: the same rows always give the
same name, so a retried writer task overwrites its own earlier attempt instead of adding a copy.
Only files named by a marker are part of the dataset; anything else under ``shards/`` and
``_parts/`` is left by an interrupted attempt and removed on the next run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SHARDS = "shards"
SIGNALS = "signals"
PARTS = "_parts"
MARKERS = "_markers"
TMP = "_tmp"
STAGING = "_staging"
REPORT = "report"
INDEX = "index.parquet"
REJECTS = "rejects.parquet"
ERRORS = "errors.parquet"
STATS = "stats.json"
CONFIG = "config.yaml"
SHARD_COLUMN = "shard"  # the index's column naming a kept clip's tar (``{stem}.tar``)
TAR = ".tar"
SIDECAR = ".parquet"

# error_type values worth retrying (``avforge run --retry-errors``); every other error is final
TRANSIENT_ERRORS = frozenset(
    {"rate_limited", "timeout", "server_error", "unreachable", "out_of_memory", "worker_died", "connection_error"}
)


def is_transient(error_type: str | None) -> bool:
    return error_type in TRANSIENT_ERRORS


def partition_of(input_index: int, inputs_per_partition: int) -> int:
    return int(input_index) // max(1, inputs_per_partition)


def digest(keys: Iterable[str], n: int = 12) -> str:
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:n]


def shard_stem(partition: int, keys: Iterable[str]) -> str:
    return f"{partition:06d}-{digest(keys)}"


def part_name(kind: str, partition: int, keys: Iterable[str]) -> str:
    """``rejects-…`` or ``errors-…`` part file name (under ``_parts/``)."""
    return f"{kind}-{partition:06d}-{digest(keys)}{SIDECAR}"


def phase_file_name(partition: int, phase: int, keys: Iterable[str]) -> str:
    """A staged-rows or signals file of one partition's rows reaching global phase ``phase``."""
    return f"{partition:06d}-{digest([f'phase {phase}', *keys])}{SIDECAR}"


def partition_of_name(name: str) -> int | None:
    """The partition of a shard stem or part file name written by this layout, else None."""
    stem = name.rsplit("/", 1)[-1]
    if stem.startswith(("rejects-", "errors-")):
        stem = stem.split("-", 1)[1]
    head = stem.split("-", 1)[0]
    return int(head) if head.isdigit() and "-" in stem else None


def marker_name(partition: int) -> str:
    return f"{partition:06d}.json"

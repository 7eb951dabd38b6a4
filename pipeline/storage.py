"""Local paths and object-store URLs (``s3://``, ``gs://``, any fsspec URL) behind a few functions.

Local paths take the plain ``pathlib`` route. Remote URLs go through fsspec (``s3fs`` for S3,
honouring ``AWS_ENDPOINT_URL`` and the usual AWS credential variables). Media is decoded from
local files, so remote media is fetched into a per-process cache (``localize``), and files
produced on a worker are written locally and then uploaded (``StagingArea.publish``). An upload
is one object PUT (multipart for large files), which becomes visible only when complete: that
is what makes remote shard writes atomic.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCRATCH = Path(tempfile.gettempdir()) / "avforge-scratch"


def is_remote(uri: str | Path) -> bool:
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)  # type: ignore[no-any-return]


def join(base: str | Path, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return Path(uri).read_bytes()
    fs, path = _fs(uri)
    return fs.cat_file(path)  # type: ignore[no-any-return]


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; readers never see a partial one."""
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, path = _fs(uri)
    fs.pipe_file(path, data)


def put_file(local: Path, uri: str) -> None:
    """Move a finished local file to ``uri`` (upload for remote, rename for local)."""
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local, uri)
        except OSError as exc:  # another file system (e.g. staging elsewhere): copy, then rename there
            if exc.errno != errno.EXDEV:
                raise
            tmp = Path(uri).with_name(f".{Path(uri).name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, uri)
            local.unlink(missing_ok=True)
        return
    fs, path = _fs(uri)
    fs.put_file(str(local), path)


def get_file(uri: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part")
    if is_remote(uri):
        fs, path = _fs(uri)
        fs.get_file(path, str(tmp))
    else:
        shutil.copyfile(uri, tmp)
    os.replace(tmp, local)


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    fs, path = _fs(uri)
    return bool(fs.exists(path))


def size(uri: str) -> int:
    if not is_remote(uri):
        return Path(uri).stat().st_size
    fs, path = _fs(uri)
    return int(fs.size(path))


def remove(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).unlink(missing_ok=True)
        return
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm_file(path)


def remove_tree(uri: str) -> None:
    """Delete a folder (local) or every object under a prefix (object store); missing is fine."""
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def listdir(uri: str, suffix: str = "") -> list[str]:
    """File URIs directly under ``uri`` whose names end with ``suffix`` (sorted)."""
    if not is_remote(uri):
        base = Path(uri)
        return sorted(str(p) for p in base.glob(f"*{suffix}") if p.is_file()) if base.is_dir() else []
    fs, path = _fs(uri)
    if not fs.exists(path):
        return []
    scheme = str(uri).split("://", 1)[0]
    names = [p for p in fs.ls(path, detail=False, refresh=True) if p.endswith(suffix)]
    return sorted(f"{scheme}://{p}" for p in names)


# The per-process cache of fetched remote files is bounded: least recently used files go first.
CACHE_MAX_BYTES = int(os.environ.get("AVFORGE_CACHE_MB", "2048")) * 2**20
_CACHE: OrderedDict[Path, int] = OrderedDict()


def _cache_touch(local: Path) -> None:
    _CACHE[local] = local.stat().st_size
    _CACHE.move_to_end(local)
    total = sum(_CACHE.values())
    while total > CACHE_MAX_BYTES and len(_CACHE) > 1:
        old, size = _CACHE.popitem(last=False)
        shutil.rmtree(old.parent, ignore_errors=True)
        total -= size


def localize(uri: str) -> Path:
    """A local file with the content of ``uri`` (the path itself when already local).

    Remote files are fetched into a per-process cache capped at ``AVFORGE_CACHE_MB`` (2048 MiB):
    the least recently used files are deleted when it is full, so worker disks do not fill up.
    """
    if not is_remote(uri):
        return Path(uri)
    local = _cache_path(uri)
    if not local.exists():
        log.debug("fetching %s", uri)
        get_file(uri, local)
    _cache_touch(local)
    return local


def _cache_path(uri: str) -> Path:
    return SCRATCH / "cache" / hashlib.sha1(uri.encode()).hexdigest()[:16] / Path(uri).name


def _adopt(local: Path, uri: str) -> None:
    """Move a file just uploaded to ``uri`` into the cache as that URI's local copy."""
    cached = _cache_path(uri)
    cached.parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, cached)
    _cache_touch(cached)


def evict(uri: str) -> None:
    """Forget a fetched remote file now (its staged original is about to be deleted)."""
    if not is_remote(uri):
        return
    local = _cache_path(uri)
    _CACHE.pop(local, None)
    shutil.rmtree(local.parent, ignore_errors=True)


class StagingArea:
    """Where workers put intermediate media: a local folder or an object-store prefix.

    ``local(rel)`` is where to write a file; ``publish(rel)`` makes it visible at its staging URI
    (a no-op for a local staging folder, an upload for a remote one) and returns that URI.
    """

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        self.remote = is_remote(self.uri)
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
        self.root = SCRATCH / f"staging-{digest}" if self.remote else Path(self.uri)

    def local(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def uri_of(self, rel: str) -> str:
        return join(self.uri, *rel.split("/")) if self.remote else str(self.root / rel)

    def publish(self, rel: str) -> str:
        """Make ``rel`` visible at its staging URI. For an object store: upload it, then move the
        local copy into this process's bounded cache (a later ``localize`` here finds it; the
        least recently used copies are deleted), so worker disks do not fill with staged media."""
        if not self.remote:
            return str(self.root / rel)
        target = self.uri_of(rel)
        src = self.root / rel
        put_file(src, target)
        _adopt(src, target)
        return target


class OutputStore:
    """The driver's view of the output folder: a local folder, or a local mirror of an
    object-store prefix for the few files the driver writes (config, index, stats, report).

    Those are written locally first (atomically) and then ``publish``-ed: a no-op for a local
    output, an upload of the finished file for a remote one (an object appears only once its
    upload completes). Shards and parts are written by the workers straight to ``uri``
    (``pipeline.writer``).
    """

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.remote = is_remote(self.uri)
        if self.remote:
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
            self.root = SCRATCH / f"output-{digest}"
            shutil.rmtree(self.root, ignore_errors=True)  # a cache: the remote is the truth
        else:
            self.root = Path(self.uri).resolve()
            self.uri = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(self, rel: str, keep_local: bool = True) -> None:
        if not self.remote:
            return
        src = self.root / rel
        if keep_local:
            fs, path = _fs(join(self.uri, *rel.split("/")))
            fs.put_file(str(src), path)
        else:
            put_file(src, join(self.uri, *rel.split("/")))
            src.unlink(missing_ok=True)

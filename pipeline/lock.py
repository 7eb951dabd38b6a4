"""One run at a time per output folder.

Two runs writing one output interleave their partitions and commit markers: one may crash midway
and an input can end up in both ``errors.parquet`` and ``index.parquet``. A run therefore holds
``OUTPUT/.avforge.lock`` while it works:

* the lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds JSON:
  ``pid``, ``host``, the process start time (to see through pid reuse), ``started`` and a random
  ``token``;
* a heartbeat thread touches the file every ``heartbeat_s`` seconds;
* a second run finds the file and is refused with :class:`OutputLockedError` (a ConfigError: the
  CLI prints one line and exits 2) naming the holder — unless the lock is **stale**: its pid is
  gone (or is another process now) on this host, or its heartbeat is older than ``stale_after_s``
  (a run on another host that died). A stale lock is taken over, under an ``flock`` on a side
  file so that two runs breaking the same stale lock cannot both win;
* the lock is removed on exit, only if it still holds this run's token.

Object-store outputs (``s3://``...) are not locked here (no atomic create there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".avforge.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


class OutputLockedError(ConfigError):
    """Another live run holds the output folder."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22, counted after the ")" that ends the command name (which may hold spaces)
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class OutputLock:
    """The lock of one output folder; use :func:`output_lock` as a context manager."""

    def __init__(self, out_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ inspection

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content (``{}`` if unreadable or half-written), None if there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why the lock described by ``info`` no longer protects a live run, or None if it does."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s"
        pid, host = info.get("pid"), info.get("host")
        if not info:
            # a lock being written right now is a few ms old; an unreadable old one is junk
            return "unreadable lock file" if age > max(2.0, self.heartbeat_s) else None
        if host == socket.gethostname() and isinstance(pid, int):
            if not _pid_alive(pid):
                return f"process {pid} is gone"
            started = info.get("proc_start")
            if started is not None and _proc_start(pid) not in (None, started):
                return f"pid {pid} belongs to another process now"
        return None

    # ------------------------------------------------------------------ acquire / release

    def _create(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _proc_start(os.getpid()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": self.token,
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            info = self.holder()
            if info is None:
                continue  # released between our create and our read: try again
            reason = self.stale_reason(info)
            if reason is None:
                raise OutputLockedError(self._refusal(info))
            self._break(info, reason)
        raise OutputLockedError(f"cannot take the lock {self.path}: it keeps changing (another run starting?)")

    def _refusal(self, info: dict[str, Any]) -> str:
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}" if info else "another run"
        since = f" since {info['started']}" if info.get("started") else ""
        return (
            f"output {self.dir} is in use by a running avforge run ({who}{since}); wait for it to finish, "
            f"or use another --output. If that run is dead, its lock ({self.path}) is taken over after "
            f"{self.stale_after_s:.0f}s without heartbeat, or delete the file."
        )

    def _break(self, info: dict[str, Any], reason: str) -> None:
        """Remove a stale lock, unless it changed meanwhile (another run broke it and took it)."""
        side = self.dir / (LOCK_NAME + ".break")
        with open(side, "a") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
            try:
                now = self.holder()
                if now is None:
                    return
                if now != info or self.stale_reason(now) is None:
                    return  # someone else's fresh lock: the next round sees it
                log.warning("taking over the stale output lock %s (%s: %s)", self.path, reason,
                            {k: info.get(k) for k in ("pid", "host", "started")})
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(guard.fileno(), fcntl.LOCK_UN)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError as exc:
                    log.warning("cannot refresh the output lock %s: %s", self.path, exc)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="avforge-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        info = self.holder()
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(out_dir: str | Path, **kwargs: Any) -> Iterator[OutputLock | None]:
    """Hold ``out_dir``'s lock for the block; object-store outputs are not locked."""
    if "://" in str(out_dir):
        log.info("output %s is an object store: no output lock", out_dir)
        yield None
        return
    lock = OutputLock(out_dir, **kwargs)
    with lock:
        yield lock

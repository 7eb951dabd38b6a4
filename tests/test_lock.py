"""pipeline/lock.py: one run per output folder; a dead run's lock does not stay stuck."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, OutputLock, OutputLockedError, output_lock

ROOT = Path(__file__).resolve().parents[1]


def _holder_process(out: Path) -> subprocess.Popen:
    """Another process that takes the lock and holds it until killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.lock import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder_process(out)
    try:
        with pytest.raises(OutputLockedError) as info:
            with output_lock(out):
                pass
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(out) in message
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale (dead pid on this host) and taken over
    with output_lock(out) as lock:
        assert lock is not None
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()  # released on exit


def test_lock_content_and_release(tmp_path: Path) -> None:
    with output_lock(tmp_path) as lock:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["token"] == lock.token
        assert info["started"]
        with pytest.raises(OutputLockedError):  # same process, second run: refused too
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_heartbeat_from_another_host_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x", "token": "t"}))
    with pytest.raises(OutputLockedError):  # fresh heartbeat: a live run on another host
        OutputLock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    with output_lock(tmp_path, stale_after_s=120) as lock:
        assert lock is not None and json.loads(path.read_text())["token"] == lock.token


def test_reused_pid_is_not_a_live_holder(tmp_path: Path) -> None:
    """Our own pid, but recorded with another process start time: the pid was reused."""
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "1", "token": "t"}))
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc")
    with output_lock(tmp_path):
        pass


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    with output_lock(tmp_path, heartbeat_s=0.1):
        path = tmp_path / LOCK_NAME
        old = time.time() - 600
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5


def test_junk_lock_file_is_not_a_holder_for_ever(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text("{half-writ")
    old = time.time() - 60
    os.utime(path, (old, old))
    with output_lock(tmp_path):
        pass


def test_object_store_outputs_are_not_locked() -> None:
    with output_lock("s3://bucket/out") as lock:
        assert lock is None


@pytest.mark.timeout(300)
def test_cli_refuses_a_second_run_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    listing = tmp_path / "l.txt"
    listing.write_text("# nothing\n")
    holder = _holder_process(out)
    try:
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "--input", str(listing), "--output", str(out),
               "--recipe", "media", "--backend", "sequential"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2, res.stderr[-2000:]
    assert "in use" in res.stderr and f"pid {holder.pid}" in res.stderr
    assert "Traceback" not in res.stderr

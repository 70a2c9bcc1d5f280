"""One writer per results folder: a lock file naming its holder (host, pid, command, since). And claims: one of
several concurrent workers (search trials) makes a shared piece of work while the others wait for it.

A second ooc-ray command that would write into a folder another live process is writing fails at once with
that name. A lock whose holder is gone is taken over: on the same host when its pid no longer runs (or runs
another program: the pid's start time is recorded), on another host when its heartbeat (the file's mtime,
touched every HEARTBEAT_S by the holder) is older than STALE_S, e.g. a node that died on a shared file system.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ooc_ray.errors import LockError
from ooc_ray.logs import note

HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats: NFS attribute caches hold mtimes for up to 60 s


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: dict, mtime: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return time.time() - mtime < STALE_S
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # runs, as another user
    started = holder.get("started", "")
    return not started or started == _start_time(pid)  # else the pid was reused by another program


def current_holder(path: str | Path) -> tuple[dict, bool, float] | None:
    """(holder, whether it is alive, seconds since its heartbeat) of the lock at `path`, or None when free."""
    path = Path(path)
    try:
        holder, mtime = json.loads(path.read_text() or "{}"), path.stat().st_mtime
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return holder, _alive(holder, mtime), time.time() - mtime


class RunLock:
    """Context manager holding `path` for this process; a daemon thread keeps its heartbeat."""

    def __init__(self, path: str | Path, command: str):
        self.path, self.command = Path(path), command
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid), "command": self.command,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._holder(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another starter or a stale lock's removal: look again
            if self._try_create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="ooc-ray-lock")
                self._thread.start()
                return self
            try:
                holder, mtime = json.loads(self.path.read_text() or "{}"), self.path.stat().st_mtime
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.2)  # being written or removed right now
                continue
            if _alive(holder, mtime):
                raise LockError(
                    f"{self.path.parent} is being written by another ooc-ray run: host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, `{holder.get('command')}`, since {holder.get('since')}; wait for "
                    f"it, or stop it (a lock left by a killed run is taken over automatically)")
            note(f"taking over the lock of a run that is gone (host {holder.get('host')}, pid "
                 f"{holder.get('pid')}, since {holder.get('since')})")
            self.path.unlink(missing_ok=True)
        raise LockError(f"{self.path}: could not take the results lock (another run keeps starting)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_UNLOCKABLE: set[Path] = set()  # folders whose file system refused a lock (named once)


@contextlib.contextmanager
def claim(path: str | Path, wait: bool):
    """Hold the claim on `path` (an flock, which the system drops with the process, so a killed holder leaves
    none behind): yields True when held, False when another process holds it and `wait` is off. A claim only
    keeps concurrent workers from making one thing twice; what they make stays atomic and keyed without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:  # a file system without locks (ENOLCK): work as if unclaimed, the result is the same
            if path.parent not in _UNLOCKABLE:
                _UNLOCKABLE.add(path.parent)
                note(f"{path.parent}: no file locks here ({exc.strerror}); concurrent workers may make a shared "
                     "item twice (each save stays atomic)")
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

"""One writer per results folder: a lock file naming its holder (host, pid, command, since). And claims: one of
several concurrent workers (search trials) makes a shared piece of work while the others wait for it.

A second ooc-ray command that would write into a folder another live process is writing fails at once with
that name. A lock whose holder is gone is taken over: on the same host when its pid no longer runs (or runs
another program: the pid's start time is recorded), on another host when its heartbeat (the file's mtime,
touched every HEARTBEAT_S by the holder) is older than STALE_S, e.g. a node that died on a shared file system.
A lock file that is not a holder as RunLock writes it (it writes atomically, so no crash leaves half of one) is
named as unreadable, never taken over: see _read.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ooc_ray.errors import LockError
from ooc_ray.logs import note, warn

# What os.link raises where a file system has no hard links: the lock is then created exclusively instead.
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats: NFS attribute caches hold mtimes for up to 60 s


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: dict, mtime: float) -> bool:
    if holder["host"] != socket.gethostname():
        return time.time() - mtime < STALE_S
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # runs, as another user
    started = holder.get("started", "")
    return not started or started == _start_time(pid)  # else the pid was reused by another program


def _problem(holder: object) -> str:
    """What keeps `holder` (a lock file's parsed JSON) from being a holder as RunLock writes it; '' if nothing."""
    if not isinstance(holder, dict):
        return "not a JSON object"
    if not isinstance(holder.get("host"), str):
        return f"host {holder.get('host')!r} is not a host name"
    pid = holder.get("pid")
    if type(pid) is not int or not 0 < pid < 2**31:  # 0 and -1 would make os.kill signal a group or every process
        return f"pid {pid!r} is not a process id"
    for key in ("started", "command", "since"):
        if not isinstance(holder.get(key, ""), str):
            return f"{key} {holder[key]!r} is not text"
    return ""


def _read(path: Path) -> tuple[dict, float] | None:
    """(holder, mtime: its heartbeat) of the lock at `path`, None when there is none.

    A file that is not a holder as RunLock writes it is a LockError, never taken over: it names no holder, so
    whether a run still writes these results cannot be told, and taking it over could put two writers in one
    folder. RunLock writes atomically, so no crash of ours leaves one; the user decides."""
    try:
        text, mtime = path.read_bytes(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        holder, problem = None, "empty" if not text.strip() else "not JSON"
    else:
        problem = _problem(holder)
    if problem:
        raise LockError(f"{path}: the results lock is unreadable ({problem}), so whether a run writes here cannot "
                        "be told; if no ooc-ray run uses these results, delete it and run again")
    return holder, mtime


def current_holder(path: str | Path) -> tuple[dict, bool, float] | None:
    """(holder, whether it is alive, seconds since its heartbeat) of the lock at `path`, or None when free;
    LockError naming the file when it is unreadable."""
    found = _read(Path(path))
    if found is None:
        return None
    holder, mtime = found
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
        # Written whole to a file of our own, then hard-linked to the lock's name: the link either makes the lock
        # with all its content or fails because one exists, so no reader and no crash ever sees half a lock
        # (O_EXCL then write left an empty file when killed in between). Links are atomic on NFS too. The temp
        # name is unique (uuid): two containers can share a host name and a pid.
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w") as fh:
                self._write_holder(fh)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                # NFS: a link retried after its reply was lost says "exists" although it made the lock
                with contextlib.suppress(FileNotFoundError):  # removed since: not ours, look again
                    return os.stat(tmp).st_ino == os.stat(self.path).st_ino
                return False
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                return self._create_exclusive()
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """Where the file system has no hard links (FAT, SMB without unix extensions, FUSE object stores): create
        the lock exclusively, then write it; a crash in between leaves an empty lock, which is then named as
        unreadable (never taken over)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            self._write_holder(fh)
        return True

    def _write_holder(self, fh) -> None:
        json.dump(self._holder(), fh)
        fh.flush()
        os.fsync(fh.fileno())

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another starter or a stale lock's removal: look again
            if self._try_create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="ooc-ray-lock")
                self._thread.start()
                return self
            found = _read(self.path)  # LockError when unreadable
            if found is None:
                continue  # removed since: try again
            holder, mtime = found
            if _alive(holder, mtime):
                raise LockError(
                    f"{self.path.parent} is being written by another ooc-ray run: host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, `{holder.get('command')}`, since {holder.get('since')}; wait for "
                    f"it, or stop it (a lock left by a killed run is taken over automatically)")
            self._take_over(holder, mtime)
        raise LockError(f"{self.path}: could not take the results lock (another run keeps starting)")

    def _take_over(self, holder: dict, mtime: float) -> None:
        """Remove the lock of a run judged gone, if it is still that lock. One starter at a time (a claim beside
        it): two that found the same stale lock removed it one after the other, the second removing the lock the
        first had just taken, and both ran."""
        with claim(self.path.with_name(self.path.name + ".takeover"), wait=True):
            try:
                again = _read(self.path)
            except LockError:
                return  # replaced by something unreadable meanwhile: the next look names it
            if again != (holder, mtime):
                return  # taken over (or refreshed) meanwhile: look again
            note(f"taking over the lock of a run that is gone (host {holder.get('host')}, pid "
                 f"{holder.get('pid')}, since {holder.get('since')})")
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        me = self._holder()
        mine = (me["host"], me["pid"], me["started"])  # two containers may share a host name and a pid
        while not self._stop.wait(HEARTBEAT_S):
            try:
                found = _read(self.path)
            except LockError:
                return
            if found is None or (found[0].get("host"), found[0].get("pid"), found[0].get("started")) != mine:
                # Taken over after a pause longer than STALE_S (a suspended machine): never keep another run's
                # lock alive, and say so, since two runs now write these results.
                warn(f"{self.path}: this run's lock was taken over by another run while it was paused; stop one "
                     "of the two runs (their results folder has two writers)")
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:  # released (or taken over) between the look and the touch: look again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        try:
            found = _read(self.path)
        except LockError:
            return  # not the lock we wrote: left for the user to look at
        if found is not None and found[0]["pid"] == os.getpid():
            self.path.unlink(missing_ok=True)

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

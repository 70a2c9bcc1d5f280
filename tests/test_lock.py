"""The run lock and atomic writes, each behaviour a results folder relies on, checked on its own: the holder's
heartbeat moves the file's mtime, a live pid that is another program is no holder, release() never deletes a lock
another process holds, and a write interrupted inside atomic_path leaves the old bytes and no temp file."""
import json
import os
import socket
import time

import pytest

from ooc_ray import lock as lock_module
from ooc_ray.errors import LockError
from ooc_ray.io import atomic_dir, atomic_path, atomic_write_text, write_parquet
from ooc_ray.lock import RunLock


def test_the_heartbeat_moves_the_lock_files_mtime(tmp_path, monkeypatch):
    """A holder on another node is judged alive by its heartbeat alone: without it every long run's lock would
    look stale after STALE_S and be taken over while it writes."""
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    path = tmp_path / ".ooc-ray.lock"
    held = RunLock(path, "ooc-ray run x").acquire()
    try:
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.time() + 5
        while path.stat().st_mtime < old + 500 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > time.time() - 60
    finally:
        held.release()


def test_a_live_pid_with_another_start_time_is_not_the_holder(tmp_path):
    """The pid in the lock runs (here: this very process), but it started at another time than the holder did:
    the pid was reused by another program after the holder died, so the lock is taken over."""
    path = tmp_path / ".ooc-ray.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "1",
                                "command": "ooc-ray run old", "since": "then"}))
    held = RunLock(path, "me").acquire()
    try:
        assert json.loads(path.read_text())["command"] == "me"
    finally:
        held.release()
    # The same pid with its true start time is alive: refused, naming it.
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": lock_module._start_time(os.getpid()), "command": "ooc-ray run live",
                                "since": "now"}))
    with pytest.raises(LockError, match="ooc-ray run live"):
        RunLock(path, "me").acquire()


def test_release_leaves_a_lock_another_process_now_holds(tmp_path):
    """Ours was taken over while we still ran (our heartbeat stalled on a slow file system): release() must not
    delete the new holder's lock, or a third run would write beside it."""
    path = tmp_path / ".ooc-ray.lock"
    held = RunLock(path, "me").acquire()
    foreign = {"host": "gpu-node-7", "pid": 4242, "started": "9", "command": "ooc-ray run other", "since": "now"}
    path.write_text(json.dumps(foreign))
    held.release()
    assert json.loads(path.read_text()) == foreign


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("write", ["text", "parquet"])
def test_a_write_interrupted_inside_atomic_path_leaves_the_old_bytes(tmp_path, write):
    """A crash half-way through a write (here: an exception after some bytes reached the file) leaves the target
    as it was and no temp file beside it."""
    target = tmp_path / ("out.txt" if write == "text" else "out.parquet")
    if write == "text":
        atomic_write_text(target, "old")
    else:
        import pandas as pd

        write_parquet(pd.DataFrame({"a": [1]}), target)
    before = target.read_bytes()
    with pytest.raises(Interrupted):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half of the new")
                fh.flush()
            raise Interrupted
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_folder_interrupted_inside_atomic_dir_leaves_the_old_folder(tmp_path):
    target = tmp_path / "lora"
    with atomic_dir(target) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"old")
    with pytest.raises(Interrupted):
        with atomic_dir(target) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"new, but never finished")
            raise Interrupted
    assert (target / "weights.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_results_take_the_umask_not_mkstemps_0600(tmp_path, repo, mask, file_mode, dir_mode):
    """The data stage run through the CLI under a umask, then a folder made by atomic_dir (holding a file that
    safetensors writes 0600, as the LoRAs' and models' are) and a file by atomic_path in a process under the same
    umask: every file and folder a colleague on shared storage reads has the umask's mode."""
    import subprocess
    import sys

    out = tmp_path / "results"
    script = (f"import os, sys; os.umask({mask}); from ooc_ray.cli import main; from ooc_ray.io import atomic_dir, "
              "atomic_path\nimport numpy as np; from safetensors.numpy import save_file\n"
              f"with atomic_dir('{out}/made_by_atomic_dir') as tmp:\n"
              "    (tmp / 'file.txt').write_text('x'); (tmp / 'sub').mkdir()\n"
              "    save_file({'w': np.zeros(2)}, str(tmp / 'sub' / 'lora.safetensors'))\n"
              f"with atomic_path('{out}/weights.safetensors') as tmp: save_file({{'w': np.zeros(2)}}, str(tmp))\n"
              f"sys.exit(main(['data', '{repo}/experiments/demo.yaml', '--tiny', '-o', 'results_dir={out}']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in out.rglob("*") if ".lock" not in p.name}
    assert len([p for p in modes if p.suffix == ".parquet"]) >= 2  # manifest.parquet and folds.parquet
    assert len([p for p in modes if p.suffix == ".safetensors"]) == 2
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (dir_mode if (out / p).is_dir() else file_mode)}
    assert not wrong, wrong


def test_a_claim_held_elsewhere_is_refused_without_waiting_and_a_file_system_without_locks_is_named_once(
        tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from ooc_ray import lock

    path = tmp_path / ".claims" / "k"
    with lock.claim(path, wait=False) as first:
        with lock.claim(path, wait=False) as second:  # another open file: as another process would hold it
            assert (first, second) == (True, False)
    with lock.claim(path, wait=False) as again:  # released
        assert again

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level("INFO", logger="ooc_ray")
    for _ in range(2):
        with lock.claim(path, wait=True) as held:
            assert held  # the work goes on unclaimed
    assert caplog.text.count("no file locks here (No locks available)") == 1


def test_a_lock_write_that_dies_half_way_leaves_no_lock(tmp_path, monkeypatch):
    """json.dump fails on the last value after writing the others: the lock is made whole or not at all (a half
    lock would be unreadable, and an unreadable lock stops every later command until the user deletes it)."""
    path = tmp_path / ".ooc-ray.lock"
    monkeypatch.setattr(RunLock, "_holder", lambda self: {"host": socket.gethostname(), "pid": os.getpid(),
                                                          "since": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        RunLock(path, "me").acquire()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    held = RunLock(path, "me").acquire()
    assert json.loads(path.read_text())["command"] == "me" and list(tmp_path.iterdir()) == [path]
    path.write_text("garbage{")  # damaged while held: release() leaves it to the user
    held.release()
    assert path.read_text() == "garbage{"


def test_where_a_file_system_has_no_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    """FAT, SMB without unix extensions and FUSE object stores refuse os.link (EPERM, ENOTSUP): the lock is then
    made with O_EXCL, whole, and a second writer is still refused."""
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / ".ooc-ray.lock"
    with RunLock(path, "ooc-ray run x"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ooc-ray.lock"]  # no temp file left
        with pytest.raises(LockError, match="being written by another ooc-ray run"):
            RunLock(path, "ooc-ray run y").acquire()
    assert not path.exists()


def test_two_starters_finding_one_stale_lock_do_not_both_take_it(tmp_path, monkeypatch, capsys):
    """A and B both read the lock of a run that is gone. B takes it over first; A, removing "the stale lock" a
    moment later, must find it replaced and leave B's lock alone (A removed B's lock and both ran). A holder
    whose lock was taken over while it was paused stops its heartbeat (it kept the other run's lock alive) and
    says two runs write the folder."""
    path = tmp_path / ".ooc-ray.lock"
    gone = {"host": "gpu-node-7", "pid": 4242, "started": "9", "command": "ooc-ray run old", "since": "then"}
    path.write_text(json.dumps(gone))
    old = time.time() - lock_module.STALE_S - 60
    os.utime(path, (old, old))
    seen_by_a = lock_module._read(path)
    b = RunLock(path, "ooc-ray run b").acquire()
    try:
        RunLock(path, "ooc-ray run a")._take_over(*seen_by_a)
        assert json.loads(path.read_text())["command"] == "ooc-ray run b"
        with pytest.raises(LockError, match="ooc-ray run b"):
            RunLock(path, "ooc-ray run a").acquire()
    finally:
        b.release()
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    paused = RunLock(path, "ooc-ray run paused").acquire()
    path.write_text(json.dumps(gone))  # what a take-over while it was paused leaves
    os.utime(path, (old, old))
    paused._thread.join(timeout=5)
    assert not paused._thread.is_alive() and path.stat().st_mtime == pytest.approx(old)
    assert "this run's lock was taken over by another run while it was paused" in capsys.readouterr().err
    paused.release()
    assert json.loads(path.read_text()) == gone

"""Durable atomic writes, and checks that a file a stage would skip is whole.

A killed run leaves either the old file or the new one, never half of one: each write goes to a temp file
beside the target, is fsynced, renamed over the target, and the folder is fsynced (on NFS/EFS, where the
docs/cluster.md puts results_dir, a rename that is not followed by a folder fsync can be lost with the client).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ooc_ray.errors import MissingInputError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor fsyncs files and folders alike on Linux
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, and for a moment every thread of a Ray
    worker would create files under the temporary value)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # no /proc (macOS): the classic round trip
    os.umask(old)
    return old


def _plain_mode(path: Path, mask: int) -> None:
    """Give `path` the mode a plain open() or mkdir would under `mask` (0644 / 0755 under umask 0022), keeping
    an executable bit: mkstemp makes 0600 files, mkdtemp 0700 folders, and safetensors 0.8 writes its files 0600
    (the LoRAs and model weights were unreadable to colleagues on shared lab storage)."""
    executable = path.is_dir() or path.stat().st_mode & 0o111
    path.chmod((0o777 if executable else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; fsync it and rename it over `path` only if the block finishes, with the
    mode a plain open() would give it (_plain_mode), whatever wrote it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _plain_mode(tmp, umask())
        _fsync_path(tmp)
        os.replace(tmp, path)  # atomic on POSIX within one file system
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; fsync its files and move it to `path` only if the block finishes, it
    and everything in it with the modes a plain mkdir and open() would give them (_plain_mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        mask = umask()
        for item in [tmp, *tmp.rglob("*")]:
            if not item.is_symlink():
                _plain_mode(item, mask)
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_parquet(df: pd.DataFrame | pa.Table, path: str | Path) -> Path:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet(path: str | Path, command: str) -> pd.DataFrame:
    """The table a stage wrote at `path`; missing or damaged, an error naming it and `command`, which writes it."""
    problem = parquet_problem(path)
    if problem:
        raise MissingInputError(f"{path}: {problem}; run `{command}` first")
    return pd.read_parquet(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parquet_problem(path: str | Path) -> str:
    """'' when `path` is a whole Parquet file (its footer reads), else what is wrong with it."""
    try:
        pq.read_metadata(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable Parquet ({exc})"
    return ""


def image_problem(path: str | Path) -> str:
    """'' when `path` decodes as an image to its last pixel, else what is wrong with it."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        return "missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a whole image ({exc})"
    return ""



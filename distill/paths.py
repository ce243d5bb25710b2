"""Destinations a command will write to, checked before any work: a leaf module that imports no command."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from distill.errors import DistillError


def check_writable(path: Path, what: str) -> Path:
    """Refuse a destination folder that is a file, sits under a file, or cannot be written. Creates nothing:
    the probe file is removed again, so a refused command leaves the disk as it was."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise DistillError(f"{what} {path} {where}; give a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".distill-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise DistillError(f"{what} {path} cannot be written ({e.strerror})") from e
    return path


def contains(outer: Path, inner: Path) -> bool:
    """Whether `outer` is `inner` or one of its ancestors, after resolving both (symlinks included)."""
    outer, inner = Path(outer).expanduser().resolve(), Path(inner).expanduser().resolve()
    return outer == inner or outer in inner.parents


def write_atomic(path: Path, text: str | bytes) -> Path:
    """Write a file whole or not at all: into a temporary file beside it, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """A fresh temporary folder beside `folder` to write into. When the block ends it replaces `folder` in one
    rename (a folder already there is removed just before); when the block fails it is removed instead. So `folder`
    is never half written."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there if the block failed

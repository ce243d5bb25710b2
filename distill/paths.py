"""Destinations a command will write to, checked before any work: a leaf module that imports no command."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from distill.errors import DistillError


KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def cache_dir() -> Path:
    """Where distill keeps what it builds once for every run: built-in teachers, image-size indexes
    ($DISTILL_CACHE, default ~/.cache/distill)."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def kind(path: Path) -> str:
    """What `path` is, in words: 'missing', 'a folder', 'a file', 'a FIFO (named pipe)', ..., or why it cannot be
    looked at (a name too long for the file system, a link that loops)."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def regular_file(path: Path, what: str) -> Path:
    """`path` if it names a regular file (links followed); else a one-line DistillError saying what it is."""
    found = kind(path)
    if found == "missing":
        raise DistillError(f"{what} {path} does not exist")
    if found != "a file":
        raise DistillError(f"{what} {path} is {found}, not a regular file")
    return Path(path).expanduser()


def check_writable(path: Path, what: str) -> Path:
    """Refuse a destination folder that is a file, sits under a file, or cannot be written. Creates nothing:
    the probe file is removed again, so a refused command leaves the disk as it was."""
    path = Path(path).expanduser()
    if path.is_symlink() and not path.exists():
        raise DistillError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; give a "
                           "real folder")
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


def check_own_out(out: Path, command: str, ours, what: str) -> Path:
    """An --out file `distill command` may write: new, or a regular file `ours(path)` recognises as one it wrote
    before (never a folder, a FIFO or a user's own file), in a folder that can be written."""
    found = kind(out)
    if found == "a folder":
        raise DistillError(f"--out {out} is a folder; give the {what} file to write")
    if found != "missing" and (found != "a file" or not ours(out)):
        raise DistillError(f"--out {out} exists and distill {command} did not write it; it would be replaced, so give "
                           "a new file name")
    check_writable(out.parent, "--out")
    return out


def contains(outer: Path, inner: Path) -> bool:
    """Whether `outer` is `inner` or one of its ancestors, after resolving both (symlinks included)."""
    outer, inner = Path(outer).expanduser().resolve(), Path(inner).expanduser().resolve()
    return outer == inner or outer in inner.parents


def write_atomic(path: Path, text: str | bytes) -> Path:
    """Write a file whole or not at all: into a temporary file beside it, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, a file-size limit, a folder turned read-only: what was there stays
        tmp.unlink(missing_ok=True)
        raise DistillError(f"{path} could not be written ({e.strerror}); what was there is kept") from e
    return path


@contextlib.contextmanager
def new_file(path: Path, what: str):
    """A temporary file beside `path` to write into; when the block ends it becomes `path`, created exclusively (a
    file there, even one that appeared meanwhile, is never replaced). On failure, disk full included, the temporary
    file is removed and nothing is left under `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(name)
        os.link(name, path)
    except FileExistsError as e:
        raise DistillError(f"{what} {path} exists; distill does not replace a file: choose a new name") from e
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise DistillError(f"{what} {path} could not be written ({reason}); nothing was written") from e
    finally:
        os.unlink(name)


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # the disk, a size limit, a quota, a read-only mount


def write_failure(e: BaseException | None) -> str | None:
    """Why a write failed, when `e` (or what caused it) is the disk refusing: full, over a file-size limit or quota,
    read-only. Libraries wrap these (safetensors says 'os error 28'), so the message is read too."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL:
            return e.strerror
        code = re.search(r"os error (\d+)", str(e))
        if code and int(code.group(1)) in FULL:
            return os.strerror(int(code.group(1)))
        e = e.__cause__ or e.__context__
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        swap = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return swap(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """A fresh temporary folder beside `folder`, made under a unique name, to write into. When the block ends it takes
    `folder`'s place in one atomic swap where the system has one (else: the old folder is renamed aside, the new one
    renamed in, and the old one put back if that fails), so a kill at any moment leaves the old or the new one whole
    under the name. The old one is removed only after. When the block fails the temporary folder is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        if not folder.exists():
            os.replace(tmp, folder)
        elif not _exchange(tmp, folder):  # tmp now holds the old folder, removed below
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, old)  # onto the empty folder just made for it
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the failed block's files, or the old folder after a swap


def _lock_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


def in_use(folder: Path) -> bool:
    """Whether another process holds `folder`'s lock (`lock`) now. The probe takes a shared lock for an instant."""
    import fcntl

    path = _lock_file(Path(folder).expanduser())
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock


@contextlib.contextmanager
def lock(folder: Path, what: str):
    """Hold an exclusive lock on `folder` for the block: an flock on `.<name>.lock` beside it, which the system
    releases if the process dies. A second holder is refused in one line, whichever came first to the check."""
    import fcntl

    folder = Path(folder).expanduser()
    path = _lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DistillError(f"{what} {folder} cannot be locked ({e.strerror} for {path})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DistillError(f"{what} {folder} is in use by another distill process (it holds {path}); wait for "
                               "it to finish or choose another folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)

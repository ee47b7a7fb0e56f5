"""Writes that survive a power cut. A file written and renamed into place is on the disk only
once its bytes are flushed (fsync) before the rename and the folder that names it after: without
that, ext4 (data=ordered, delayed allocation), f2fs and others may keep the rename and lose the
bytes, and a device whose power is cut seconds after `install-service` or `export` returned
boots with a zero-length or truncated file under the new name (an installed bundle then fails
its SHA-256 check and the daemon does not start), or with the old file back.

Used by install-service (bundle copy, unit, drop-in, config), export (the bundle before and
after its final rename) and the audit log (a file created or rotated)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_path(path: Path | str) -> None:
    """Flush a file's bytes and its inode (size, mode, owner) to the disk. A folder too: its
    entries (names created, renamed or removed in it), where the file system can (some, a
    shared folder of a VM or a network file system, refuse fsync on a folder with EINVAL: their
    own semantics then hold, as sqlite does it)."""
    folder = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
    """`fsync_path` every file and folder under `root`, then `root` itself: files before the
    folder that names them, so that a copy is whole on the disk before it is renamed into place.
    Links are not followed (the link itself is in its folder's entries)."""
    folders = []
    for top, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                fsync_path(path)
        folders.append(top)
    for folder in reversed(folders):  # the deepest first, `root` last
        fsync_path(folder)


def exchange_paths(a: Path | str, b: Path | str) -> bool:
    """Swap the names `a` and `b` (two files or two folders of one file system) in one step, as
    Linux's renameat2(RENAME_EXCHANGE) does: at no moment, and after a power cut at any moment,
    is either name missing. False, and nothing changed, where the C library, the kernel (before
    3.15) or the file system cannot: the caller then renames twice."""
    err = _renameat2_exchange(os.fsencode(a), os.fsencode(b))
    if err == 0:
        return True
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _renameat2_exchange(a: bytes, b: bytes) -> int:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE): 0, or the errno (ENOSYS without it)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (AttributeError, OSError):
        return errno.ENOSYS
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return 0 if renameat2(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE) == 0 else ctypes.get_errno()


def write_file_durably(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`) atomically and durably: a temporary file beside
    it, written and flushed, renamed over it, and the folder flushed. After a power cut the name
    holds the old bytes or the new ones, whole. The temporary file is removed if writing fails."""
    tmp = path.with_name(f".{path.name}.tmp-install")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:  # a write can take part of the data
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_path(path.parent)

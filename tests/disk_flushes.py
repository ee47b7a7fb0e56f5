"""A record of what a command flushes to the disk and renames, to check that what it leaves is
whole after a power cut: the files a rename puts in place were flushed (fsync) before it, and
the folder it renames into was flushed after it.

Wraps os.fsync, os.replace and os.rename (Path.rename and Path.replace call them too), and the
exchange of two names (durable_files.exchange_paths: recorded as a rename of the first name's
files to the second, which is what the caller wants of it), in the test's own process: the command runs through its public function, and the record is the order
of the real calls, with the path each fsync'd descriptor names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from edge_runtime import durable_files


def _named_by(src: str) -> list[str]:
    """The paths a rename of `src` puts under its new name: the file, or the folder's files and
    its folders (they name the files)."""
    if not os.path.isdir(src):
        return [src]
    return [path for top, _, names in os.walk(src) for path in (top, *(os.path.join(top, n) for n in names))]


@dataclass
class DiskFlushes:
    events: list[tuple] = field(default_factory=list)  # ("fsync", path) | ("rename", src, dst, [files under src])

    def install(self, monkeypatch) -> "DiskFlushes":
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst, *args, **kwargs):
                src, dst = os.path.abspath(os.fsdecode(src)), os.path.abspath(os.fsdecode(dst))
                files = _named_by(src)
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", src, dst, files))
            return rename

        def exchange(a: bytes, b: bytes) -> int:
            src, dst = os.path.abspath(os.fsdecode(a)), os.path.abspath(os.fsdecode(b))
            files = _named_by(src)
            err = real_exchange(a, b)
            if err == 0:
                self.events.append(("rename", src, dst, files))
            return err

        real_exchange = durable_files._renameat2_exchange
        monkeypatch.setattr(durable_files, "_renameat2_exchange", exchange)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))
        return self

    def renames_into(self, dst: os.PathLike | str) -> list[int]:
        dst = os.path.abspath(os.fspath(dst))
        return [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == dst]

    def problems_of_rename(self, index: int) -> list[str]:
        """What a power cut right after the command could lose of the rename at `index`: a file
        it put in place that was not flushed before it (by its path then), and the folder it
        renames into, not flushed after it."""
        _, src, dst, files = self.events[index]
        flushed_before = {e[1] for e in self.events[:index] if e[0] == "fsync"}
        flushed_after = {e[1] for e in self.events[index + 1:] if e[0] == "fsync"}
        problems = [f"{f} not flushed before the rename to {dst}" for f in files if f not in flushed_before]
        if os.path.dirname(dst) not in flushed_after:
            problems.append(f"{os.path.dirname(dst)} (the folder of {dst}) not flushed after the rename")
        return problems

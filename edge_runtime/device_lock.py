"""One daemon per device and state directory: an exclusive lock on
``<state_dir>/edge-runtime-<device_id>.lock``, held for the daemon's life.

`edge-runtime serve` takes it before it loads the bundle, so a second daemon
started by mistake says so at once instead of after minutes of hashing."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from .errors import EdgeRuntimeError


class DeviceLock:
    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.path = Path(state_dir) / f"edge-runtime-{device_id}.lock"
        self.device_id = device_id
        self._file: IO[str] | None = None

    def acquire(self) -> "DeviceLock":
        """Take the lock (a no-op when this object holds it); EdgeRuntimeError naming the
        lock file when another daemon holds it."""
        if self._file is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not Unix
            return self
        try:
            f = open(self.path, "a+")
        except OSError as exc:
            raise EdgeRuntimeError(f"cannot open the lock file {self.path} (service.state_dir): "
                                   f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise EdgeRuntimeError(f"another edge-runtime daemon for device {self.device_id!r} is running "
                                   f"(it holds {self.path})") from None
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

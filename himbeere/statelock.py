"""One daemon per state directory: an ``fcntl`` lock on ``<state_dir>/himbeere.lock``.

Two daemons for one node would each run every command and kill each other's
programs.  The lock holds in every mode (``himbeere daemon`` in the
foreground, ``himbeere daemon start`` in the background, an embedding
:class:`~himbeere.daemon.Daemon`).  It is a POSIX record lock
(``fcntl(F_SETLK)``): the kernel drops it when the process dies, ``kill -9``
and power cut included, so a restart takes it at once; and a fork (a
program, a command) does not inherit it, so nothing the daemon leaves
running keeps a new daemon out.  The file holds the holder's pid, for the
error message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Union

from .exceptions import AlreadyRunning

LOCK_FILE = "himbeere.lock"

#: state directory -> the open lock file, for each lock this process holds.
_held: dict[str, int] = {}


def acquire(state_dir: Union[str, Path]) -> Path:
    """Take the lock of ``state_dir`` (again: a no-op); return the lock file.

    Raises :class:`AlreadyRunning` when another process holds it.
    """
    directory = Path(state_dir).absolute()
    path = directory / LOCK_FILE
    if str(directory) in _held:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise AlreadyRunning(
            f"another himbeere daemon{by} already runs on state directory {directory}; "
            "stop that one first, or give this one a --state-dir of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[str(directory)] = fd
    return path


def release(state_dir: Union[str, Path]) -> None:
    """Give the lock of ``state_dir`` up, if this process holds it."""
    fd = _held.pop(str(Path(state_dir).absolute()), None)
    if fd is not None:
        os.close(fd)  # closing drops a POSIX lock


def held(state_dir: Union[str, Path]) -> bool:
    """True if this process holds the lock of ``state_dir``."""
    return str(Path(state_dir).absolute()) in _held


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""

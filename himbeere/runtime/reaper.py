"""Nothing a program starts escapes its stop: subreapers and orphans.

A program's descendant that calls ``setsid()`` (a daemonised child,
``start_new_session=True``) leaves the program's process group, and once
its parent is gone the kernel hands it to the nearest *child subreaper*
above it (``prctl(PR_SET_CHILD_SUBREAPER)``), or to init.  So:

* Each program's process is a subreaper: while it runs, every orphan of its
  tree becomes its child, whatever sessions or groups it changed, so that
  nothing of the program is ever anybody else's.  A thread of the program
  (:class:`OrphanReaper`) reaps those orphans as they end; it never reaps a
  child the program started itself, whose exit status is the program's to
  read.
* The fork server is a subreaper too.  When a program's process ends, what
  is left of its tree becomes the server's; the server kills it
  (:func:`kill_children`).  An orphan of a program that still runs never
  reaches the server, so nothing is killed early.
* A program whose daemon is gone (``kill -9``) kills its own tree as it exits.

Signals go only to our own children before we reap them: their pids cannot
have been reused meanwhile.  A killed child's children become ours (we are a
subreaper) and go in the next round.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Collection
from typing import Any, Callable, Optional

#: prctl(2) option: orphaned descendants are reparented to us, not to init.
PR_SET_CHILD_SUBREAPER = 36
#: Seconds between two looks for orphans that ended; one that is still a
#: zombie at the next look is reaped.
REAP_INTERVAL = 2.0


#: prctl(2) through ctypes, loaded on first use: in the fork server, before
#: it forks any program, so every program shares it; never in the daemon.
_prctl: Optional[Callable[..., int]] = None


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux >= 3.4); False where it cannot."""
    global _prctl
    if _prctl is None:
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError, ImportError):
            return False
    return _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children() -> list[tuple[int, bool, str]]:
    """This process's children: (pid, is a zombie, start time)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 19 and fields[1].decode() == me:
            found.append((int(entry), fields[0] == b"Z", fields[19].decode()))
    return found


def kill_children(exclude: Collection[int] = (), wait: float = 0.0) -> int:
    """SIGKILL our children not in ``exclude`` and reap them; return how many.

    With ``wait``, go on round by round (their children become ours) until
    none is left or ``wait`` seconds have passed; without, one round.
    """
    deadline = time.monotonic() + wait
    killed = 0
    while True:
        left = [(pid, zombie) for pid, zombie, _ in children() if pid not in exclude]
        for pid, zombie in left:
            if not zombie:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        for pid, _ in left:
            _reap(pid)
        if not left or time.monotonic() >= deadline:
            return killed
        time.sleep(0.01)


def _reap(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return False


#: The program process whose own children the wrappers note, and those pids.
_program: Optional[int] = None
_own: set[int] = set()
_own_lock = threading.Lock()
_noting = False


def note_forks() -> None:
    """Wrap every way Python forks, to note a program's own children.

    Called once in the fork server, before it forks any program, so that the
    wrappers are shared by every program instead of copied into each; they
    note pids only in the process :class:`OrphanReaper` was made in.
    """
    global _noting
    if _noting:
        return
    _noting = True
    import subprocess

    for module, name in ((os, "fork"), (os, "forkpty"), (os, "posix_spawn"),
                         (os, "posix_spawnp"), (subprocess, "_fork_exec")):
        func = getattr(module, name, None)
        if func is not None:
            setattr(module, name, _noted(func))
    try:
        import _posixsubprocess
    except ImportError:
        return
    _posixsubprocess.fork_exec = _noted(_posixsubprocess.fork_exec)


def _noted(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        pid = result[0] if isinstance(result, tuple) else result
        if isinstance(pid, int) and pid > 0 and _program is not None \
                and os.getpid() == _program:
            with _own_lock:
                _own.add(pid)
        return result

    return wrapper


class OrphanReaper:
    """In a program's process: reap the orphans of its tree, and only those.

    The program's own children are known: :func:`note_forks` wraps every way
    Python forks (``os.fork``, ``os.forkpty``, ``os.posix_spawn[p]``, and the
    fork of ``subprocess``) to note their pids.  Any other child is an
    orphan that the kernel handed to us; it is reaped once it is seen a
    zombie twice, ``REAP_INTERVAL`` apart, so that a child a C library forked
    and waits for at once (``os.system``) is left to it.  :meth:`reap` is
    called every ``REAP_INTERVAL`` by the thread that watches for "quit"
    (child.py): no thread of its own.
    """

    def __init__(self) -> None:
        global _program
        note_forks()
        _program = os.getpid()
        with _own_lock:
            _own.clear()
        self._zombies: set[tuple[int, str]] = set()

    def reap(self) -> int:
        """One look: reap orphans seen as zombies last time too; return how many."""
        if not self._zombies and not _has_zombie():
            _forget_reaped()
            return 0
        found = children()
        with _own_lock:
            _own.intersection_update(pid for pid, _, _ in found)  # the program reaped the others
            own = set(_own)
        zombies = {(pid, started) for pid, zombie, started in found
                   if zombie and pid not in own}
        reaped = sum(_reap(pid) for pid, _ in zombies & self._zombies)
        self._zombies = zombies
        return reaped


def _forget_reaped() -> None:
    """Drop the program's children it has reaped itself (one stat each)."""
    with _own_lock:
        own = list(_own)
    gone = [pid for pid in own if _parent(pid) != _program]
    if gone:
        with _own_lock:
            _own.difference_update(gone)


def _parent(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _has_zombie() -> bool:
    """True if any child of ours has ended (without reaping it)."""
    try:
        info: Optional[Any] = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is not None

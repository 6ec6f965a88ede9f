"""A single-threaded fork server that starts programs warm.

Why not ``python -c``: a fresh interpreter costs ~45 ms before the first
line of a program runs.  Why not ``os.fork()`` in the daemon: the daemon has
threads (feed, heartbeat, commands), and forking a threaded process can
deadlock the child on a lock some other thread held.  Why not
``multiprocessing``'s forkserver: it re-imports the parent's ``__main__``
script in every child.

So the daemon starts this module once (``python -m himbeere.forkserver FD``)
with :data:`PRELOAD` imported; it has one thread, forks a child per request
and reports every child's exit.  It is a child subreaper: what is left of a
program's process tree when the program ends becomes its child, and it kills
that (see :mod:`himbeere.runtime.reaper`).  Messages on the socket are pickled tuples:

daemon -> server
    ``("start", token, spec)`` with the child's control socket attached
server -> daemon
    ``("started", token, pid)``, ``("failed", token, error)``,
    ``("exited", pid, exitcode)`` (negative: killed by that signal)
"""

from __future__ import annotations

import importlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Modules imported once in the server, so children start warm.  Not
#: ``couchdb``: its import costs 13 MB (it loads pkg_resources), which every
#: node would carry for the few programs that use ``db``; those import it on
#: first use.
PRELOAD = ("himbeere.runtime.child", "json", "traceback", "importlib.util",
           "faulthandler", "threading",
           # a program's first socket call with a host name needs this codec
           "encodings.idna")


class ForkServer:
    """The daemon's handle on the fork server process."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.conn: Optional[Connection] = None
        self._token = 0
        self._lock = threading.Lock()
        #: ("exited", pid, code) messages that arrived while waiting for a reply.
        self.exits: list[tuple[int, int]] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server process (again, if it died)."""
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The server must import this very copy of himbeere, installed or not.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "himbeere.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())

    def fileno(self) -> int:
        assert self.conn is not None
        return self.conn.fileno()

    def spawn(self, spec: Any, timeout: float = 10.0) -> tuple[int, Connection]:
        """Fork a child running ``spec``; return its pid and control connection."""
        with self._lock:
            if not self.running:
                self.start()
            assert self.conn is not None
            self._token += 1
            token = self._token
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.conn.send(("start", token, spec))
                with _as_socket(self.conn) as sock:
                    socket.send_fds(sock, [b"F"], [theirs.fileno()])
                while True:
                    if not self.conn.poll(timeout):
                        raise RuntimeError(f"fork server did not answer within {timeout} s")
                    message = self.conn.recv()
                    if message[0] == "exited":
                        self.exits.append((message[1], message[2]))
                    elif message[1] == token:
                        break
                if message[0] == "failed":
                    raise RuntimeError(message[2])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
        return message[2], Connection(ours.detach())

    def collect(self) -> list[tuple[int, int]]:
        """Exit reports (pid, exitcode) received so far; never blocks."""
        with self._lock:
            exits, self.exits = self.exits, []
            try:
                while self.conn is not None and self.conn.poll():
                    message = self.conn.recv()
                    if message[0] == "exited":
                        exits.append((message[1], message[2]))
            except (EOFError, OSError):
                log.error("the fork server died; starting a new one on the next start")
                self.close()
        return exits

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _as_socket(conn: Connection) -> socket.socket:
    return socket.socket(fileno=os.dup(conn.fileno()))


def serve(fd: int) -> None:
    """The server's loop: fork on request, report exits, end at EOF."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"himbeere fork server: cannot preload {name}: {exc}", file=sys.stderr)
    from himbeere.runtime import child, reaper

    reaper.note_forks()  # once, here: shared by every program

    conn = Connection(fd)
    sock = socket.socket(fileno=os.dup(fd))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The daemon decides when programs end.  A Ctrl-C on its terminal, or a
    # service manager signalling the whole group, must not kill us first:
    # we leave when the daemon closes our socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    reaper.become_subreaper()
    #: pids of the programs; any other child of ours is left over from one
    programs: set[int] = set()
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                _drain(wake_r)
                _report_exits(conn, programs)
                continue
            try:
                message = conn.recv()
                _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            except (EOFError, OSError):
                os._exit(0)
            _, token, spec = message
            try:
                pid = os.fork()
            except OSError as exc:
                for extra in fds:
                    os.close(extra)
                conn.send(("failed", token, f"fork failed: {exc}"))
                continue
            if pid == 0:
                selector.close()
                signal.set_wakeup_fd(-1)
                for extra in (fd, sock.fileno(), wake_r, wake_w):
                    os.close(extra)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                try:
                    child.main(spec, Connection(fds[0]))
                finally:
                    # child.main never returns; should it raise, the child
                    # must not unwind into this loop and serve as a second
                    # fork server.
                    os._exit(1)
            for extra in fds:
                os.close(extra)
            programs.add(pid)
            conn.send(("started", token, pid))
        _report_exits(conn, programs)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_exits(conn: Connection, programs: set[int]) -> None:
    """Report programs that ended; kill what they left behind."""
    from himbeere.runtime import reaper

    reaped = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            break
        reaped = True
        if pid in programs:
            programs.discard(pid)
            conn.send(("exited", pid, os.waitstatus_to_exitcode(status)))
    if reaped:
        # Any other child was a program's descendant, handed to us when the
        # program's process ended (it was the subreaper of its tree until
        # then).  One round: a killed one's children come to us, and their
        # SIGCHLD wakes us for the next.  Only after an exit: every look at
        # /proc costs pages that each program would then hold a copy of.
        reaper.kill_children(exclude=programs)


if __name__ == "__main__":
    serve(int(sys.argv[1]))

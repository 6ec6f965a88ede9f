"""A single-threaded fork server that starts programs warm.

Why not ``python -c``: a fresh interpreter costs ~45 ms before the first
line of a program runs.  Why not ``os.fork()`` in the daemon: the daemon has
threads (feed, heartbeat, commands), and forking a threaded process can
deadlock the child on a lock some other thread held.  Why not
``multiprocessing``'s forkserver: it re-imports the parent's ``__main__``
script in every child.

So the daemon starts this module once (``python -m himbeere.forkserver FD``)
with :data:`PRELOAD` imported; it has one thread, forks a child per request
and reports every child's exit.

Nothing a program starts escapes its stop.  A program's descendant that
calls ``setsid()`` leaves the program's process group, and once its parent
is gone the kernel hands it to the nearest *child subreaper* above it
(``prctl(PR_SET_CHILD_SUBREAPER)``), or to init.  So each program runs under
a *keeper* of its own (:func:`_keep`): a process forked by the server that
is a subreaper, forks the program, reaps every orphan of the program's tree
that ends while the program runs, and, once the program has exited, kills
whatever of the tree is left before it exits itself with the program's
status.  One subreaper per program is what tells whose an orphan is: the
kernel reparents it to the keeper of its own program, never to another's.
The keeper signals only its own unreaped children, so a reused pid is never
hit.  The server itself is a subreaper too, so that a program whose keeper
was killed is still reaped and reported here.  Messages on the socket are
pickled tuples:

daemon -> server
    ``("start", token, spec)`` with the child's control socket attached
server -> daemon
    ``("started", token, pid)``, ``("failed", token, error)``,
    ``("exited", pid, exitcode)`` (negative: killed by that signal); ``pid``
    is always the program's, never its keeper's
"""

from __future__ import annotations

import ctypes
import gc
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
PRELOAD = ("himbeere.child", "json", "traceback", "importlib.util",
           "faulthandler", "threading",
           # a program's first socket call with a host name needs this codec
           "encodings.idna")

#: prctl(2) option: orphaned descendants are reparented to us, not to init.
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux >= 3.4); False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


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
    from himbeere import child

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
    become_subreaper()
    #: keeper pid -> its program's pid
    keepers: dict[int, int] = {}
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                _drain(wake_r)
                _report_exits(conn, keepers)
                continue
            try:
                message = conn.recv()
                _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            except (EOFError, OSError):
                os._exit(0)
            _, token, spec = message
            try:
                keeper, pid = _start_keeper(spec, fds[0], (fd, sock.fileno(), wake_r, wake_w),
                                            selector, child.main)
            except OSError as exc:
                conn.send(("failed", token, f"fork failed: {exc}"))
                continue
            finally:
                for extra in fds:
                    os.close(extra)
            keepers[keeper] = pid
            conn.send(("started", token, pid))
        _report_exits(conn, keepers)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_exits(conn: Connection, keepers: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        program = keepers.pop(pid, None)
        if program is not None and _still_ours(program):
            # Its keeper was killed before the program ended: the program is
            # our child now (we are a subreaper); report its own exit later.
            continue
        conn.send(("exited", pid if program is None else program,
                   os.waitstatus_to_exitcode(status)))


def _still_ours(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


def _start_keeper(spec: Any, control: int, close: tuple[int, ...], selector: Any,
                  run: Any) -> tuple[int, int]:
    """Fork a keeper that forks the program; return (keeper pid, program pid)."""
    ready_r, ready_w = os.pipe()
    try:
        keeper = os.fork()
    except OSError:
        os.close(ready_r)
        os.close(ready_w)
        raise
    if keeper == 0:
        try:
            os.close(ready_r)
            selector.close()
            signal.set_wakeup_fd(-1)
            for extra in close:
                os.close(extra)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _keep(spec, control, ready_w, run)
        finally:
            # Never unwind into the server's loop and serve as a second one.
            os._exit(1)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        report = ready.read().decode("utf-8", "replace")
    if report.startswith("pid "):
        return keeper, int(report.split()[1])
    os.waitpid(keeper, 0)
    raise OSError(report or "the program's keeper died before it forked the program")


def _keep(spec: Any, control: int, ready: int, run: Any) -> None:
    """The keeper: fork the program, reap its tree, and end it with the program.

    Reaps by waiting for any child without reaping it first
    (``WNOWAIT``): the program itself is reaped last, so neither its pid nor
    its process group can be reused while the daemon may still signal them.
    """
    gc.disable()  # touching every object would copy the server's pages
    become_subreaper()
    try:
        pid = os.fork()
    except OSError as exc:
        os.write(ready, f"fork failed: {exc}".encode())
        os._exit(1)
    if pid == 0:
        os.close(ready)
        gc.enable()
        run(spec, Connection(control))
        os._exit(1)
    os.close(control)
    os.write(ready, f"pid {pid}".encode())
    os.close(ready)
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            os._exit(1)  # cannot be: the program is ours until we reap it
        except InterruptedError:
            continue
        if info is None:
            continue
        if info.si_pid == pid:
            break
        _reap(info.si_pid)  # an orphan of the program's tree that ended
    _kill_descendants(exclude=pid)
    _, status = os.waitpid(pid, 0)
    _exit_like(status)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _children(exclude: int) -> list[tuple[int, bool]]:
    """This process's children other than ``exclude``: (pid, is a zombie)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1].decode() == me and int(entry) != exclude:
            found.append((int(entry), fields[0] == b"Z"))
    return found


def _kill_descendants(exclude: int) -> None:
    """SIGKILL every descendant, level by level, until none is left.

    Only our own children are signalled, and only before we reap them, so
    their pids cannot have been reused.  A killed child's children become
    ours (we are a subreaper) and go in the next round.
    """
    while True:
        children = _children(exclude)
        if not children:
            return
        for pid, zombie in children:
            if not zombie:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid, _ in children:
            _reap(pid)


def _exit_like(status: int) -> None:
    """Exit with the program's wait status: its exit code, or its signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the program dumped already
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL and SIGSTOP cannot be caught: their default holds
    os.kill(os.getpid(), -code)
    os._exit(128 - code)


if __name__ == "__main__":
    serve(int(sys.argv[1]))

"""What runs inside a program's own process.

The daemon's fork server (see :mod:`himbeere.programs`) forks a child and
calls :func:`main` with the program's :class:`ProgramSpec`.  The child makes
itself a process group leader (so the daemon can signal everything it
starts), installs an importer for the program's modules and the global
modules, gives every module namespace the HimbeereCouch helpers (and
``state`` and ``leader()``, see :mod:`himbeere.runtime.progstate` and
:mod:`himbeere.runtime.leadership`) and calls ``main()``.  It reports back through
its control connection:

``("running", pid)``, ``("invalid", message)``, ``("crashed", traceback)``,
``("finished", None)``.

The daemon asks it to quit by sending ``"quit"`` (or by going away: the
connection closing has the same effect), which turns ``should_quit()`` true
and runs the quit notifications in a helper thread; the child exits only
once they are done.  A child whose daemon went away kills its own process
group as it exits, since no daemon is left to sweep it.
"""

from __future__ import annotations

import _thread
import builtins
import collections
import dataclasses
import faulthandler
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import os
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

from .. import defaults
from ..exceptions import ConfigError
from ..logtext import printable
from . import reaper
from .leadership import Leadership
from .progstate import ProgramState

#: Exit codes the daemon reads when a child could not report.
EXIT_FINISHED, EXIT_CRASHED, EXIT_INVALID = 0, 1, 3
#: Seconds a returning main() waits for the quit notifications to finish
#: (the daemon's grace period, then SIGTERM, usually ends it sooner).
NOTIFICATIONS_WAIT = 600.0
#: Lines a program may have queued for the daemon before the oldest are dropped.
LOG_BOUND = 1000
#: Seconds a request for ``state`` or a leadership may take: a save at quit
#: must end within the daemon's grace period.
STATUS_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything a child needs to run one program; picklable."""

    name: str
    doc_id: str
    rev: str
    modules: dict[str, str]
    main_module: str
    global_modules: dict[str, str]
    node: int
    couch_url: Optional[str] = None
    database: Optional[str] = None
    #: A git checkout to put first on sys.path, and the function to call.
    path: Optional[str] = None
    entry: str = "main"
    #: The status database (program state, leases); None: ``<database>_status``.
    status_database: Optional[str] = None
    #: Placed programs: seconds without an "alive" from the daemon after which
    #: the child is gone (see :func:`_watch_quit`); None: no such watch.
    fence: Optional[float] = None
    #: Seconds between automatic saves of ``state`` (0: only at save(), quit, exit).
    state_interval: float = defaults.STATE_SAVE_INTERVAL


class Helpers:
    """The helpers every module of a program sees as globals."""

    def __init__(self, spec: ProgramSpec, send: Callable[[Any], None]) -> None:
        self.spec = spec
        self._send = send
        self._quit = threading.Event()
        self._notified = threading.Event()
        #: True when the daemon went away instead of asking us to quit.
        self.orphaned = False
        self._notifications: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self._db: Any = None
        self._couch: Any = None
        self._status_db: Any = None
        self._connect_lock = threading.Lock()
        #: ``state``: the program's persistent dict, read on first use.
        self.state = ProgramState(self.status_db, spec.doc_id, spec.name, spec.node,
                                  clock=self.server_time, on_load=self._start_autosave)
        #: ``leader(group)`` and friends; nothing happens before the first call.
        self.leadership = Leadership(self.status_db, f"{spec.node}:{spec.doc_id}", spec.node,
                                     spec.doc_id, clock=self.server_time, report=self.log)

    def log(self, *args: Any) -> None:
        """Print ``args`` as one line, prefixed with the program's name."""
        text = " ".join(str(arg) for arg in args)
        _write_lines(self.spec.name, text + "\n")

    def should_quit(self) -> bool:
        """True once the daemon asked this program to stop."""
        return self._quit.is_set()

    def register_quit_notification(self, func: Callable[[], Any]) -> None:
        """Call ``func()`` (in a helper thread) when the program must quit."""
        with self._lock:
            self._notifications.append(func)
            late = self._quit.is_set()
        if late:
            self._call(func)

    def remove_quit_notification(self, func: Callable[[], Any]) -> None:
        with self._lock:
            if func in self._notifications:
                self._notifications.remove(func)

    def request_quit(self) -> None:
        with self._lock:
            if self._quit.is_set():
                return
            self._quit.set()
            pending = list(self._notifications)
        self.leadership.quitting = True  # keep what we lead, take nothing new
        try:
            for func in pending:
                self._call(func)
            # After the notifications, so what they change is saved too; and
            # now, in case main() does not return before the grace period ends.
            self.save_state("quit")
        finally:
            self._notified.set()

    def wait_for_notifications(self, timeout: float = NOTIFICATIONS_WAIT) -> None:
        """Once quit was requested: wait until the notifications have run.

        main() usually returns as soon as ``should_quit()`` turns true, which
        is before the notifications (run by another thread) are done; exiting
        then would cut them short.
        """
        if self._quit.is_set():
            self._notified.wait(timeout)

    def _call(self, func: Callable[[], Any]) -> None:
        try:
            func()
        except Exception:
            self.log("quit notification failed:\n" + traceback.format_exc().rstrip())

    @property
    def db(self) -> Any:
        """A CouchDB-Python database handle, made on first use."""
        if self._db is None and self.spec.couch_url and self.spec.database:
            import couchdb

            from ..couch import split_servers

            # One server (the daemon's at the start): CouchDB-Python takes one URL.
            url = split_servers(self.spec.couch_url)[0]
            self._db = couchdb.Server(url)[self.spec.database]
        return self._db

    def status_db(self) -> Any:
        """The status database (a :class:`himbeere.couch.Database`), made on first use.

        For ``state`` and ``leader()``: himbeere.couch is imported only by
        programs that use them.
        """
        with self._connect_lock:
            if self._status_db is None:
                spec = self.spec
                if not spec.couch_url or not (spec.status_database or spec.database):
                    raise ConfigError("state and leader() need the node's CouchDB server, "
                                      "and this program runs without one")
                from ..couch import Couch

                self._couch = Couch(spec.couch_url, timeout=STATUS_TIMEOUT)
                name = spec.status_database or f"{spec.database}{defaults.STATUS_SUFFIX}"
                self._status_db = self._couch.database(name)
            return self._status_db

    def server_time(self) -> float:
        """Now on the server's clock, as far as the answers' ``Date`` headers tell."""
        return self._couch.server_time() if self._couch is not None else time.time()

    def save_state(self, when: str) -> None:
        """Autosave ``state`` if the program touched it; a failure is logged."""
        if not self.state.loaded:
            return
        try:
            self.state.save()
        except Exception as exc:
            self.log(f"state not saved at {when}: {exc}")

    def _start_autosave(self) -> None:
        """``state`` was read (first use): from now on save it now and then."""
        if self.spec.state_interval > 0:
            start_thread(self._autosave, self.spec.state_interval)

    def _autosave(self, interval: float) -> None:
        """Save ``state`` every ``interval`` seconds if it changed, until quit.

        So that ``himbeere state`` shows what a long-running program keeps,
        and a power cut loses at most ``interval`` seconds of it.  A failure
        is logged once, not every ``interval`` while the server is away.
        """
        failed: Optional[str] = None
        while not self._quit.wait(interval):
            try:
                self.state.save()
                failed = None
            except Exception as exc:  # noqa: BLE001 - the program goes on regardless
                if str(exc) != failed:
                    self.log(f"state not saved (saved every {interval:g} s): {exc}")
                failed = str(exc)

    def close(self) -> None:
        """After main() returned or raised: save ``state``, release leaderships."""
        self.save_state("exit")
        self.leadership.close()

    def namespace(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "should_quit": self.should_quit,
            "register_quit_notification": self.register_quit_notification,
            "remove_quit_notification": self.remove_quit_notification,
            "db": _LazyDatabase(self),
            "node": self.spec.node,
            "state": self.state,
            "leader": self.leadership.leader,
            "is_leader": self.leadership.is_leader,
            "on_leadership": self.leadership.on_leadership,
        }


class _LazyDatabase:
    """Stands in for the database handle until a program touches it."""

    def __init__(self, helpers: Helpers) -> None:
        self._helpers = helpers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._helpers.db, name)

    def __getitem__(self, key: str) -> Any:
        return self._helpers.db[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._helpers.db[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._helpers.db

    def __repr__(self) -> str:
        return f"<database {self._helpers.spec.database!r}>"


class ProgramImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves imports from the program's modules, then the global modules.

    It sits first on ``sys.meta_path``, so a program's own ``util`` shadows a
    global ``util``, which shadows one on ``sys.path``.
    """

    def __init__(self, sources: Sequence[dict[str, str]], helpers: Helpers) -> None:
        self.sources = sources
        self.helpers = helpers

    def source(self, fullname: str) -> Optional[str]:
        for modules in self.sources:
            if fullname in modules:
                return modules[fullname]
        return None

    def is_package(self, fullname: str) -> bool:
        """True for ``pkg`` when there is a ``pkg.util``: dotted names make packages."""
        prefix = fullname + "."
        return any(name.startswith(prefix) for modules in self.sources for name in modules)

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        package = self.is_package(fullname)
        if self.source(fullname) is None and not package:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=f"<himbeere {fullname}>",
                                               is_package=package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        source = self.source(module.__name__) or ""  # "": a package with no module of its own
        module.__dict__.update(self.helpers.namespace())
        filename = f"<{self.helpers.spec.name}:{module.__name__}>"
        remember_source(filename, source)
        code = compile(source, filename, "exec")
        exec(code, module.__dict__)


def remember_source(filename: str, source: str) -> None:
    """Let ``traceback`` show the source lines of code compiled as ``filename``.

    The code of a program comes from CouchDB, not from a file, so linecache
    cannot read it: an entry whose mtime is None is one that
    ``linecache.checkcache`` keeps (it cannot check a file that is not there).
    """
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


class LogQueue:
    """Lines on their way to the daemon's log shipper; never blocks a writer.

    A bounded deque: when the daemon does not keep up, the oldest lines are
    dropped and counted.  A sender thread ships batches over the control
    connection as ``("log", [(time, line), ...], dropped)``.
    """

    def __init__(self, send: Callable[[Any], None], bound: int = LOG_BOUND) -> None:
        self._send = send
        self._lines: collections.deque[tuple[float, str]] = collections.deque(maxlen=bound)
        self._dropped = 0
        self._ready = threading.Condition()
        self._busy = False
        #: The sender thread starts with the first line, not before main().
        self._started = False

    def _start(self) -> None:
        """Called with ``_ready`` held, at the first line."""
        if not self._started:
            self._started = True
            start_thread(self._run)

    def add(self, lines: list[str]) -> None:
        now = time.time()
        with self._ready:
            overflow = len(self._lines) + len(lines) - (self._lines.maxlen or 0)
            if overflow > 0:
                self._dropped += overflow
            self._lines.extend((now, line) for line in lines)
            self._start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._lines and not self._dropped:
                    self._ready.wait()
                batch, self._lines = list(self._lines), collections.deque(
                    maxlen=self._lines.maxlen)
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            self._send(("log", batch, dropped))
            with self._ready:
                self._busy = False
                self._ready.notify_all()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until every queued line went out (bounded: exit must not hang)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._lines or self._busy) and time.monotonic() < deadline:
                self._ready.wait(max(0.0, deadline - time.monotonic()))


#: Set in the child by :func:`main`; None in any other process.
_log_queue: Optional[LogQueue] = None


def _write_lines(name: str, text: str, direct: bool = False) -> None:
    """Queue the lines of ``text`` for the daemon, which ships them to the
    status database and shows them in its log within its rate limit
    (logship.OutputLog); ``direct`` (or outside a daemon's child) writes them
    to fd 1 as well, each prefixed ``[name]``, in one write."""
    lines = text.splitlines()
    if _log_queue is not None:
        _log_queue.add(lines)
        if not direct:
            return
    data = "".join(f"[{printable(name)}] {line}\n" for line in lines)
    try:
        os.write(1, data.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


class PrefixedStream:
    """``sys.stdout`` replacement: whole lines, prefixed with the program name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._partial = ""
        self._lock = threading.Lock()

    encoding = "utf-8"
    errors = "backslashreplace"

    def write(self, text: str) -> int:
        with self._lock:
            joined = self._partial + text
            complete, newline, self._partial = joined.rpartition("\n")
        if newline:
            _write_lines(self.name, complete + "\n")
        return len(text)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        with self._lock:
            partial, self._partial = self._partial, ""
        if partial:
            _write_lines(self.name, partial + "\n")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1


def main(spec: ProgramSpec, conn: Any) -> None:
    """Entry point in the forked child; never returns normally."""
    os.setsid()
    # Every orphan of the program's tree becomes ours, whatever session it
    # made: nothing it starts outlives it (see himbeere.runtime.reaper).
    reaper.become_subreaper()
    orphans = reaper.OrphanReaper()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.stdout = PrefixedStream(spec.name)  # type: ignore[assignment]
    sys.stderr = PrefixedStream(spec.name)  # type: ignore[assignment]
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            try:
                conn.send(message)
            except OSError:
                pass

    global _log_queue
    _log_queue = LogQueue(send)
    helpers = Helpers(spec, send)
    # Not threading.Thread().start(): that waits until the new thread runs,
    # which costs the program ~0.5 ms (more on a busy machine) before main().
    # The watcher reports "running" itself, off the way to main().
    start_thread(_watch_quit, conn, helpers, spec.fence, orphans,
                 lambda: send(("running", os.getpid())))
    if spec.path:
        sys.path.insert(0, spec.path)
        os.chdir(spec.path)
        # Modules of a git checkout are imported the usual way, not by our
        # importer: they find the helpers among the builtins instead.
        builtins.__dict__.update(helpers.namespace())
    sys.meta_path.insert(0, ProgramImporter([spec.modules, spec.global_modules], helpers))
    status, detail = run_main(spec)
    helpers.wait_for_notifications()
    helpers.close()  # saves state (after a crash too), releases leaderships
    sys.stdout.flush()
    sys.stderr.flush()
    _log_queue.drain()
    if _fenced is not None:  # not "finished": the daemon restarts it if still ours
        status, detail = "crashed", _fenced
    send((status, detail))
    code = {"finished": EXIT_FINISHED, "invalid": EXIT_INVALID}.get(status, EXIT_CRASHED)
    if helpers.orphaned:
        # The daemon is gone (kill -9), so nobody will sweep our process
        # group after we exit: take what the program started along (and
        # ourselves; nobody reads our exit code now).
        reaper.kill_children(wait=2.0)
        try:
            os.killpg(0, signal.SIGKILL)
        except OSError:
            pass
    # os._exit: skip atexit handlers inherited from the fork server.
    os._exit(code)


def shadowed(modules: Iterable[str]) -> list[str]:
    """Names in ``modules`` that Python has already loaded a module of its own for.

    ``import json`` finds the ``json`` in ``sys.modules`` (the fork server
    preloads it) before any finder is asked, so a program's own ``json``
    would silently never run.
    """
    return sorted({name.split(".")[0] for name in modules} & set(sys.modules))


def run_main(spec: ProgramSpec) -> tuple[str, Optional[str]]:
    """Import the main module and call its ``main()``; say how it ended."""
    hidden = shadowed(spec.modules)
    if hidden:
        names = ", ".join(repr(name) for name in hidden)
        return "invalid", (f"modules: {names} would never be imported: Python has loaded a "
                           "module of that name already; rename yours")
    for name in shadowed(spec.global_modules):
        print(f"global module {name!r} is never imported here: Python has loaded a module of "
              "that name already; rename it", file=sys.stderr)
    try:
        module = importlib.import_module(spec.main_module)
    except SyntaxError:
        return "invalid", traceback.format_exc(limit=0)
    except BaseException as exc:
        return "crashed", program_traceback(exc)
    entry = getattr(module, spec.entry, None)
    if entry is None:
        return "invalid", (f"the main module defines no {spec.entry}(); "
                           f"define def {spec.entry}(): ...")
    if not callable(entry):
        return "invalid", (f"{spec.entry} is a {type(entry).__name__}, not a function; "
                           f"define def {spec.entry}(): ...")
    try:
        entry()
    except SystemExit as exc:
        if exc.code in (None, 0):
            return "finished", None
        return "crashed", f"SystemExit({exc.code!r})"
    except BaseException as exc:
        return "crashed", program_traceback(exc)
    return "finished", None


def _hidden(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    if filename.startswith("<"):
        return False  # a program's module: <name:module>
    return os.path.abspath(filename) in _HIDDEN_FILES


_HIDDEN_FILES = {os.path.abspath(__file__), os.path.abspath(importlib.__file__ or "")}


def program_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` with only the program's frames.

    Frames of this module and of importlib tell the user nothing about
    their program; chained exceptions keep their own traceback.
    """
    formatted = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    todo, seen = [formatted], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack[:] = [frame for frame in current.stack if not _hidden(frame.filename)]
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return "".join(formatted.format())


#: Why a placed program's child stopped on its own (see :func:`_watch_quit`).
_fenced: Optional[str] = None


def start_thread(target: Callable[..., Any], *args: Any) -> None:
    """Run ``target(*args)`` in a new daemon thread without waiting for it to start.

    The child ends with ``os._exit``, so nothing ever joins these threads.
    """
    _thread.start_new_thread(target, args)


def _watch_quit(conn: Any, helpers: Helpers, fence: Optional[float] = None,
                orphans: Optional[reaper.OrphanReaper] = None,
                started: Optional[Callable[[], None]] = None) -> None:
    """Request quit on ``"quit"`` from the daemon, or when the daemon is gone.

    Meanwhile, every ``REAP_INTERVAL`` seconds, reap the orphans of the
    program's tree that ended (``orphans``, see :mod:`himbeere.runtime.reaper`).

    With ``fence`` (a placed program) the daemon also sends ``"alive"``
    every ``fence / 6`` seconds.  Another node may start the program once
    this node is declared dead, so it must not outlive its daemon's silence
    (kill -9, SIGSTOP, a hung daemon): after ``fence / 2`` seconds without
    word the program is asked to quit, and ``fence`` seconds after the last
    word the child kills its own process group.
    """
    global _fenced
    if started is not None:
        started()
    heard = time.monotonic()
    while True:
        try:
            wait = reaper.REAP_INTERVAL
            if fence is not None:
                wait = min(wait, max(0.0, heard + fence / 2 - time.monotonic()))
            if not conn.poll(wait):
                if fence is not None and time.monotonic() >= heard + fence / 2:
                    helpers.orphaned = True  # nobody sweeps our group: take it along on exit
                    _fenced = f"no word from the daemon for {fence / 2:g} s: stopped (fence)"
                    break
                if orphans is not None:
                    orphans.reap()
                continue
            message = conn.recv()
        except (EOFError, OSError):
            helpers.orphaned = True
            break
        if message == "quit":
            fence = None  # the daemon watches the rest: grace period, SIGTERM
            break
        if message == "alive":
            heard = time.monotonic()
    if fence is None:
        helpers.request_quit()
        return
    # Quit notifications may take long or hang: the deadline holds regardless.
    threading.Thread(target=helpers.request_quit, name="quit-notify", daemon=True).start()
    time.sleep(max(0.0, heard + fence - time.monotonic()))
    # Written to fd 1 at once: the daemon is not listening (frozen, or gone).
    _write_lines(helpers.spec.name, f"still running {fence:g} s after the daemon's last "
                 "word: killed, so that it never runs on two nodes", direct=True)
    reaper.kill_children(wait=2.0)
    os.killpg(0, signal.SIGKILL)

"""Running commands exactly once each: ``<macid>_cmd`` documents and fleet commands.

A single-node command document, as in HimbeereCouch::

    {"type": "1234567_cmd", "cmd": ["uname", "-a"], "timeout": 30}

runs without a shell, in a process group of its own.  The node writes back
into the same document::

    "ret": [stdout, stderr], "returncode": 0, "state": "done",
    "started": "...", "finished": "...", "duration": 0.004, "node": 1234567

``state`` is ``done``, ``timeout`` (killed, with everything it started),
``error`` (it could not run: a missing binary, a ``cmd`` that is not a list
of strings) or ``interrupted`` (the daemon was stopped while it ran and
killed it; or its runner died too, in a power cut say: it may have run, its
result is unknown; it is not run again).  A command still running after a second is marked
``"state": "running"``.  Each of stdout and stderr keeps its first
``output_limit`` bytes; ``truncated`` says how many bytes were cut, and
``not_utf8`` names a stream that was not UTF-8 (its bytes >= 0x80 that do
not decode appear as ``\\xNN``).

Exactly once: a document that has a result is never run again, and every
command the daemon takes on is kept in a journal in the state directory
(``commands.json``, :mod:`himbeere.journal`) until its result is written: ``queued``, then
``started`` just before the process starts.  The next daemon runs a
``queued`` one (it never started).  Once the result is written, the ledger
(``finished.json``, :class:`~himbeere.journal.Ledger`) keeps it for 30
days: a node that moves to another server (a site's relay and the central
server) and finds the command there without its result writes the kept
result instead of running it again.

A command's outcome does not depend on the daemon's life: each runs under a
runner of its own (:mod:`himbeere.runner`, in its own session, forked by a
warm runner server, :mod:`himbeere.launcher`), which keeps
the output in ``commands/<id>/`` in the state directory, kills the command
at its timeout and writes the exit status there.  A daemon killed with -9
leaves the runner at work; the next daemon waits for it (for a ``started``
command whose runner still holds its lock), or writes the result the runner
left, and only then forgets the command.  Only a ``started`` command whose
runner died without a result (a power cut) is marked ``interrupted``.  A
result the server could not take when the daemon stopped stays on disk and
is written after the next start.

The result is written with the revision the feed delivered, without reading
the document again; a write-back conflict (409) is resolved by re-reading
it, never by dropping the result.  A result the server refuses as too large
(413, CouchDB's ``max_document_size``) is written again with its output
shortened, and ``error`` says so.

A **fleet command** is one document for many nodes (created by ``himbeere
cmd``, see :mod:`uploader.ops`)::

    {"type": "himbeere-command", "targets": "all" or [1234567, ...],
     "cmd": ["uname", "-a"], "timeout": 30, "created_time": 1714564800.1}

Each targeted node writes its result, the same fields as above plus
``type: "himbeere-result"``, ``command`` (the command's id) and ``cmd``,
into a document of its own in the status database,
``result:<command id>:<macid>``; the command document is never changed by a
node.  A result document with a final ``state`` means done; the journal
(keyed by the result document's id) makes it exactly once across crashes as
above.

A node that joins later does not run old ``"all"`` commands: the node
records its first start (on the server's clock) in ``first_start.json`` in
its state directory, and skips an ``"all"`` command whose ``created_time``
(also on the server's clock) is earlier, by more than :data:`JOIN_GRACE`
(10 s: the two clocks are estimates).  A command that names the node's
MAC id in ``targets`` always runs, however old, and so does an ``"all"``
command without a numeric ``created_time`` (written by hand: its age is
unknown).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import select
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from . import defaults, signing
from .component import Backoff, Component
from .couch import Database, Doc
from .exceptions import CommandError, CouchError, Unreachable
from .journal import QUEUED, STARTED, Journal, Ledger
from .launcher import Launcher, boot_id, remove_dir, runner_alive, signal_runner
from .logtext import EscapedArguments
from .schema import COMMAND_TYPE, RESULT_PREFIX, RESULT_TYPE, iso, result_id, targets_node

log = logging.getLogger(__name__)
# Document ids come from users: none may forge a line of the daemon's log.
log.addFilter(EscapedArguments())

FINAL_STATES = ("done", "timeout", "error", "interrupted")
STREAMS = ("stdout", "stderr")

#: Longest wait between two looks at a command's deadline and the stop flag.
SLICE = 0.2
#: Seconds to wait for a runner to end after SIGTERM.
KILL_WAIT = 5.0
#: Seconds between two looks at a runner's lock where there is no pidfd.
POLL = 0.01

INTERRUPTED = ("the daemon and this command's runner stopped while it ran (a power cut?): "
               "it may have run; its result is unknown; it is not run again")
KILLED = "the daemon stopped while this command ran; it was killed"

#: Output budgets (bytes per stream) tried in turn when the server refuses a result as too large.
SHORTER = (64 * 1024, 4 * 1024, 0)

#: Seconds an ``"all"`` command may predate a node's first start and still run
#: there: both times are our estimates of the server's clock (from whole-second
#: HTTP ``Date`` headers, good to about a second each), and a command sent
#: while a node was starting up is meant for it.
JOIN_GRACE = 10.0

def command_of(key: str) -> Optional[str]:
    """The fleet command id in a journal key ``result:<id>:<mac>`` (None: single-node)."""
    if not key.startswith(RESULT_PREFIX) or ":" not in key[len(RESULT_PREFIX):]:
        return None
    return key[len(RESULT_PREFIX):].rsplit(":", 1)[0]


def is_fleet_command(doc: Doc) -> bool:
    return doc.get("type") == COMMAND_TYPE


def has_result(doc: Doc) -> bool:
    """True for a command that ran (or was settled) already."""
    return "finished" in doc or "ret" in doc or doc.get("state") in FINAL_STATES


def parse_command(doc: Doc, default_timeout: float) -> tuple[list[str], float]:
    """``cmd`` and ``timeout`` of a command document, or :class:`CommandError`."""
    cmd = doc.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise CommandError(
            f"cmd: {_preview(cmd)} is not allowed; allowed: a non-empty list of strings, "
            'for example ["uname", "-a"]'
        )
    if any("\x00" in a for a in cmd):
        # The operating system cannot pass one: exec would raise ValueError.
        raise CommandError(
            f"cmd: {_preview(cmd)} is not allowed: it holds a NUL byte; "
            "allowed: strings without NUL bytes"
        )
    timeout = doc.get("timeout", default_timeout)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout <= 0):
        raise CommandError(f"timeout: {_preview(timeout)} is not allowed; allowed: seconds > 0")
    return cmd, float(timeout)


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def render(data: bytes, budget: int) -> tuple[str, bool, int]:
    """The text of one output stream for the document.

    Returns the text, whether ``data`` was not UTF-8, and how many bytes at
    the end were left out so that the text takes at most ``budget`` bytes
    as JSON: escapes (``\\xNN``, ``\\u0000``) make binary output up to six
    times larger, and Apache CouchDB 3 refuses documents over 8 MB.
    """
    try:
        data.decode("utf-8")
        not_utf8 = False
    except UnicodeDecodeError:
        not_utf8 = True

    def text_of(size: int) -> str:
        return data[:size].decode("utf-8", "backslashreplace")

    size = len(data)
    if _json_size(text_of(size)) > budget:
        low, high = 0, size  # text_of(low) fits, text_of(high + 1) does not
        while low < high:
            middle = (low + high + 1) // 2
            if _json_size(text_of(middle)) <= budget:
                low = middle
            else:
                high = middle - 1
        size = low
        if not not_utf8:
            while 0 < size < len(data) and data[size] & 0xC0 == 0x80:
                size -= 1  # do not cut a character in two
    return text_of(size), not_utf8, len(data) - size


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def _cut_partial_character(data: bytes) -> bytes:
    """``data`` without a UTF-8 character the output cap cut in two at its end."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.end == len(data):
            return data[:exc.start]
    return data


class FirstStart:
    """When this node first started, on the server's clock (``first_start.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.time = self._load()

    def _load(self) -> Optional[float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            value = data.get("time") if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None
        return float(value) if isinstance(value, (int, float)) else None

    def record(self, now: float) -> float:
        """Record ``now`` unless a first start is recorded already; return the record."""
        if self.time is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"time": now}), encoding="utf-8")
            os.replace(tmp, self.path)
            self.time = now
        return self.time


class Commands(Component):
    """Runs a node's commands in a thread pool and writes the results back.

    ``status_db`` receives fleet commands' result documents (without it,
    fleet commands are ignored); ``server_time()`` is now on the server's
    clock.  No thread of its own: the pool's threads start with the commands.
    """

    name = "commands"

    def __init__(
        self,
        db: Database,
        node: int,
        state_dir: Path,
        default_timeout: float = defaults.COMMAND_TIMEOUT,
        output_limit: int = defaults.COMMAND_OUTPUT_LIMIT,
        running_mark: float = defaults.COMMAND_RUNNING_MARK,
        max_workers: int = defaults.MAX_COMMANDS,
        on_result: Optional[Callable[[str, Doc], None]] = None,
        grace_period: float = defaults.GRACE_PERIOD,
        status_db: Optional[Database] = None,
        server_time: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.db = db
        self.status_db = status_db
        self.server_time = server_time
        self.first_start = FirstStart(state_dir / "first_start.json")
        #: Result document fields of the fleet commands in flight, by journal key.
        self.fleet: dict[str, Doc] = {}
        self.node = node
        self.default_timeout = default_timeout
        self.output_limit = output_limit
        self.running_mark = running_mark
        self.grace_period = grace_period
        self.journal = Journal(state_dir / "commands.json")
        #: What an earlier daemon left in the journal; this one only adds to it.
        self.leftover = self.journal.read()
        #: Commands whose result was written (on any server), with the result.
        self.ledger = Ledger(state_dir / "finished.json")
        #: Commands whose kept result was written again (logged once each).
        self._replayed: set[str] = set()
        self.on_result = on_result or (lambda doc_id, result: None)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="command")
        self.inflight: set[str] = set()
        self.running: set[str] = set()
        self.closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        #: Never set: a wait in slices once ``stopping`` is set.
        self._pause = threading.Event()
        #: Where runners keep each command's output and exit status.
        self.work_dir = state_dir / "commands"
        self.launcher = Launcher()
        self.boot_id = boot_id()
        self._anonymous = itertools.count()
        #: With ``require_signed``: what this node accepts (signing.py); else None.
        self.signatures: Optional[signing.Policy] = None
        self._sweep()

    # -- entry points ----------------------------------------------------------
    def recover(self) -> int:
        """Settle what an earlier daemon left in the journal.

        A command it had started gets the result its runner left (waiting
        for a runner still at work); one whose runner died without a result
        is marked ``interrupted``; one it had only queued runs now.  Returns
        the number marked interrupted.  Raises :class:`CouchError` when the
        server cannot be asked; call it again.
        """
        self.first_start.record(self.server_time())
        with self._lock:
            leftover = dict(self.leftover)
        interrupted = 0
        for key, phase in leftover.items():
            command_id = command_of(key)
            doc = self.db.get(command_id if command_id is not None else key)
            if doc is None or (command_id is not None and self.status_db is None):
                with self._lock:
                    self.leftover.pop(key, None)
                self.journal.remove(key)
                continue
            result = doc if command_id is None else self._result_doc(key)
            if phase == STARTED and not (result and has_result(result)) \
                    and key not in self.ledger and self._left_state(key) == "lost":
                interrupted += 1
            self.submit(doc)
        return interrupted

    def _result_doc(self, key: str) -> Optional[Doc]:
        assert self.status_db is not None
        return self.status_db.get(key)

    def submit(self, doc: Doc) -> None:
        """Handle a command document from the feed; never blocks on the command."""
        if is_fleet_command(doc):
            self._submit_fleet(doc)
            return
        doc_id = doc["_id"]
        with self._lock:
            if doc_id in self.inflight:
                return
            earlier = self.leftover.pop(doc_id, None)
            if has_result(doc):
                if earlier is not None:
                    self._forget(doc_id)
                return
            if self.closed:
                # Stopping: the next start runs it (a feed may deliver late).
                if doc_id not in self.ledger:
                    self.journal.set(doc_id, earlier or QUEUED)
                return
            self.inflight.add(doc_id)
        if doc_id in self.ledger:
            # It ran here, and its result went to another server.
            self.pool.submit(self._replay, doc_id, doc)
            return
        if (earlier == STARTED or "started" in doc) and self._left_state(doc_id) != "never":
            # Started by an earlier daemon that did not write the result.
            self.journal.set(doc_id, STARTED)
            self.pool.submit(self._collect_left, doc_id, doc)
            return
        self.journal.set(doc_id, QUEUED)
        try:
            self._check_signature(doc_id, doc, resumed=earlier is not None)
            cmd, timeout = parse_command(doc, self.default_timeout)
        except CommandError as exc:
            log.error("command %s: %s", doc_id, exc)
            self.pool.submit(self._finish_without_running, doc_id, {
                "state": "error", "error": str(exc), "ret": ["", str(exc)],
                "returncode": None,
            }, doc)
            return
        self.pool.submit(self._run, doc_id, cmd, timeout, doc)

    def _submit_fleet(self, doc: Doc) -> None:
        """A fleet command: run it here unless it is not for us, or too old, or done."""
        command_id = str(doc["_id"])
        if self.status_db is None:
            log.warning("command %s: no status database to write the result to; ignored",
                        command_id)
            return
        if not targets_node(doc, self.node):
            return
        key = result_id(command_id, self.node)
        with self._lock:
            if key in self.inflight:
                return
            earlier = self.leftover.pop(key, None)
        if earlier is None and key not in self.ledger and self._joined_later(doc):
            log.info("command %s for all nodes was created before this node first started; "
                     "not run here", command_id)
            return
        with self._lock:
            if self.closed:
                self.journal.set(key, earlier or QUEUED)
                return
            self.inflight.add(key)
            self.fleet[key] = {"type": RESULT_TYPE, "command": command_id,
                               "node": self.node, "cmd": doc.get("cmd")}
        self.journal.set(key, earlier or QUEUED)
        self.pool.submit(self._run_fleet, key, doc, earlier)

    def _joined_later(self, doc: Doc) -> bool:
        """True for an ``"all"`` command created before this node's first start."""
        created = doc.get("created_time")
        if doc.get("targets") != "all" or isinstance(created, bool) \
                or not isinstance(created, (int, float)):
            return False
        return created < self.first_start.record(self.server_time()) - JOIN_GRACE

    def _run_fleet(self, key: str, doc: Doc, earlier: Optional[str]) -> None:
        try:
            result = self._read_result(key)
            if result is None:
                return  # stopping: the journal keeps it for the next start
            if has_result(result):
                self._forget(key)
                return
            if key in self.ledger:
                self._replay(key, result)
                return
            if (earlier == STARTED or "started" in result) and self._left_state(key) != "never":
                self._collect_left(key, result)
                return
            try:
                self._check_signature(key, doc, resumed=earlier is not None)
                cmd, timeout = parse_command(doc, self.default_timeout)
            except CommandError as exc:
                log.error("command %s: %s", doc["_id"], exc)
                self._settle(key, {"state": "error", "error": str(exc),
                                   "ret": ["", str(exc)], "returncode": None}, known=result)
                self.journal.remove(key)
                return
            self._run(key, cmd, timeout, result)
        except Exception:
            log.exception("command %s failed", key)
        finally:
            self._done(key)

    def _check_signature(self, key: str, doc: Doc, resumed: bool) -> None:
        """Raise :class:`CommandError` ("refused: ...") if ``doc`` must not run here.

        ``resumed``: the journal had it (taken on before a restart), so it is
        no replay.
        """
        if self.signatures is None:
            return
        refusal = signing.verify(doc, self.signatures.trusted)
        if refusal is None and not resumed:
            with self._lock:  # two pool threads must not write the file at once
                refusal = self.signatures.commands.take(
                    key, doc[signing.SIGNATURE]["signed_at"], time.time())
        if refusal is not None:
            raise CommandError(f"refused: {refusal}")

    def _read_result(self, key: str) -> Optional[Doc]:
        """The result document so far (``{}`` if none), retried while unreachable."""
        assert self.status_db is not None
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                return self.status_db.get(key) or {}
            except Unreachable as exc:
                delay = backoff.next()
                log.warning("command %s: server unreachable (%s); retrying in %.1f s",
                            key, exc, delay)
                self.stopping.wait(delay)
        return None

    def start(self) -> Commands:
        return self  # the pool's threads start with the first commands

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop taking commands.

        Running commands get ``timeout`` seconds (default ``grace_period``)
        to end; then their runners kill them, and they are marked
        ``interrupted``.  Commands not started yet stay in the journal and
        run after the next start; so does a result the server cannot take
        now (the next start writes it).
        """
        grace = self.grace_period if timeout is None else timeout
        with self._lock:
            self.closed = True
            deadline = time.monotonic() + grace
            while self.running and time.monotonic() < deadline:
                self._idle.wait(min(SLICE, max(0.0, deadline - time.monotonic())))
            if self.running and not self.stopping.is_set():
                log.warning("killing %d command(s) still running: %s", len(self.running),
                            ", ".join(sorted(self.running)))
        return super().stop(timeout)

    def after_stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.launcher.stop()

    # -- running ----------------------------------------------------------------
    def _replay(self, key: str, known: Doc) -> None:
        """Write the kept result of command ``key``, which ran here already.

        The node wrote its result to another server (the relay, say) and then
        moved here before replication brought it over: running it again would
        run it twice.  ``known``: the document (or result document) here.
        """
        try:
            result = self.ledger.get(key)
            if result is None:
                return  # aged out of the ledger since submit(): nothing to write
            first = key not in self._replayed
            self._replayed.add(key)
            log.log(logging.INFO if first else logging.DEBUG,
                    "command %s ran here already (finished %s, result written to another "
                    "server); writing the kept result here instead of running it again",
                    key, result.get("finished"))
            self._settle(key, dict(result), known=known, record=False)
            self._forget(key)
        except Exception:
            log.exception("command %s: cannot write the kept result", key)
        finally:
            self._done(key)

    def _finish_without_running(self, doc_id: str, fields: Doc, known: Doc) -> None:
        try:
            self._settle(doc_id, fields, known=known)
            self.journal.remove(doc_id)
        except Exception:
            log.exception("command %s: cannot write the result", doc_id)
        finally:
            self._done(doc_id)

    def _run(self, doc_id: str, cmd: list[str], timeout: float, known: Doc) -> None:
        """Run a command; ``known`` is its document (or result document) as last seen."""
        try:
            with self._lock:
                if self.closed:
                    return  # not started: the journal keeps it queued
                self.running.add(doc_id)
            # The directory (with the boot id) is there before the journal
            # says "started": see _left_state().
            self._prepare(self._dir(doc_id))
            self.journal.set(doc_id, STARTED)
            # The document as we last wrote it: the result goes on top of the
            # ``running`` mark without reading it back (a GET, and a 409, less).
            latest = [known]

            def mark(started: str) -> None:
                saved = self._mark_running(doc_id, started, known=latest[0])
                if saved is not None:
                    latest[0] = saved

            result = self.execute(cmd, timeout, key=doc_id, on_slow=mark)
            if result is None:
                return  # stopping: the next daemon writes what the runner leaves
            self._finish(doc_id, result, latest[0], cmd[0])
        except Exception:
            log.exception("command %s failed", doc_id)
        finally:
            self._done(doc_id)

    def _collect_left(self, key: str, known: Doc) -> None:
        """Write the result of a command an earlier daemon started (``known``: its document).

        Its runner may still be at work (wait for it), may have left the
        result (write it), or may have died without one (``interrupted``).
        """
        directory = self._dir(key)
        try:
            with self._lock:
                self.running.add(key)
            if directory.is_dir():
                if not self._wait(directory):
                    return  # stopping: the next daemon waits on
                result = self._result_of(directory)
            else:
                result = {"state": "interrupted", "error": INTERRUPTED}
            self._finish(key, result, known, "started by an earlier daemon")
        except Exception:
            log.exception("command %s failed", key)
        finally:
            self._done(key)

    def _done(self, doc_id: str) -> None:
        with self._lock:
            self.inflight.discard(doc_id)
            self.running.discard(doc_id)
            self.fleet.pop(doc_id, None)
            self._idle.notify_all()

    def _finish(self, key: str, result: Doc, known: Doc, what: str) -> None:
        """Log how command ``key`` ended (``what``: its program, or where it came
        from), write its result, then forget it: in this order, so that a crash
        in between leaves the journal entry and the next daemon writes it again."""
        log.info("command %s: %s -> %s (%s)", key, what, result.get("returncode"),
                 result["state"])
        self._settle(key, result, known=known)
        self._forget(key)

    def _forget(self, key: str) -> None:
        """The result is written: drop the runner's files, then the journal entry."""
        remove_dir(self._dir(key))
        self.journal.remove(key)

    def execute(self, cmd: list[str], timeout: float,
                on_slow: Optional[Callable[[str], None]] = None,
                key: Optional[str] = None) -> Optional[Doc]:
        """Run ``cmd`` under a runner and return the result fields (no database involved).

        ``key`` names the runner's directory (the journal key); without it
        the directory is removed afterwards.  ``on_slow(started)`` is called
        from another thread if the command still runs after ``running_mark``
        seconds.  Returns None when the daemon stops and the runner does not
        end in time: its directory keeps the result for the next daemon.
        """
        anonymous = key is None
        directory = self._dir(f"execute:{os.getpid()}:{next(self._anonymous)}"
                              if key is None else key)
        started_at, started = time.monotonic(), iso()
        try:
            if anonymous:
                self._prepare(directory)
            pid = self._spawn(directory, cmd, timeout)
        except (OSError, ValueError) as exc:
            error = f"cmd: cannot run {cmd[0]!r}: {getattr(exc, 'strerror', None) or exc}"
            return {"started": started, "node": self.node, "state": "error", "error": error,
                    "ret": ["", error], "returncode": None, "finished": iso(),
                    "duration": round(time.monotonic() - started_at, 6)}
        timer = None
        if on_slow is not None:
            # A timer, not a step of the wait: writing the mark can take a
            # while, and the end of the command must not wait for it.
            timer = threading.Timer(self.running_mark, _quietly, (on_slow, started))
            timer.daemon = True
            timer.start()
        try:
            if not self._wait(directory, pid):
                return None
        finally:
            if timer is not None:
                timer.cancel()
        result = self._result_of(directory)
        result["started"] = started  # as in the ``running`` mark
        if anonymous:
            remove_dir(directory)
        return result

    def _dir(self, key: str) -> Path:
        """The runner directory of the command (or fleet result) ``key``."""
        name = urllib.parse.quote(key, safe="")
        if len(name) > 200:  # a file name has at most 255 bytes
            import hashlib
            name = name[:100] + "-" + hashlib.sha256(key.encode()).hexdigest()
        return self.work_dir / name

    def _prepare(self, directory: Path) -> None:
        """An empty runner directory that records this boot's id."""
        remove_dir(directory)  # left by a runner that never started
        directory.mkdir(parents=True)
        if self.boot_id:
            (directory / "boot").write_text(self.boot_id, encoding="utf-8")

    def _spawn(self, directory: Path, cmd: list[str], timeout: float) -> Optional[int]:
        """Start the runner of ``cmd``; its pid (None: it started, its pid is unknown)."""
        return self.launcher.start(directory, timeout, self.output_limit, cmd)

    def _wait(self, directory: Path, pid: Optional[int] = None) -> bool:
        """Wait until the runner in ``directory`` (with ``pid``, if known) ends.

        Once the daemon stops, the runner is asked (SIGTERM) to kill its
        command; returns False if it has not ended ``KILL_WAIT`` s later.
        """
        exited = _pidfd(pid) if pid is not None else None
        asked: Optional[float] = None
        try:
            # The lock tells whether the pidfd is the runner's: a pid that
            # ended before pidfd_open may belong to another process since.
            while runner_alive(directory):
                if exited is not None:
                    if _readable(exited, SLICE):
                        break
                else:
                    # No pidfd (Linux < 5.3): look at the lock now and then.
                    (self._pause if self.stopping.is_set() else self.stopping).wait(
                        POLL if pid is not None else SLICE)
                if not self.stopping.is_set():
                    continue
                if asked is None:
                    asked = time.monotonic()
                    signal_runner(directory)
                elif time.monotonic() - asked > KILL_WAIT:
                    log.warning("runner %s did not end %s s after SIGTERM; "
                                "the next start collects its result", directory, KILL_WAIT)
                    return False
        finally:
            if exited is not None:
                os.close(exited)
        return True

    def _result_of(self, directory: Path) -> Doc:
        """The result fields from what the runner in ``directory`` left."""
        try:
            ending = json.loads((directory / "exit.json").read_text(encoding="utf-8"))
            if not isinstance(ending, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            ending = None
        if ending is None:
            # The runner died (a power cut, SIGKILL) and left no exit status.
            result: Doc = {"state": "interrupted", "error": INTERRUPTED, "returncode": None,
                           "node": self.node}
            self._add_output(result, directory, [0, 0])
            return result
        result = {"started": _iso(ending.get("started")), "node": self.node}
        if ending.get("error"):
            error = str(ending["error"])
            result.update(state="error", error=error, ret=["", error], returncode=None)
        else:
            state = ending.get("ending") or "done"
            result.update(state=state, returncode=ending.get("returncode"))
            self._add_output(result, directory, ending.get("dropped") or [0, 0])
            if state == "timeout":
                result["error"] = f"timed out after {ending.get('timeout', 0):g} s and was killed"
            elif state == "interrupted":
                result["error"] = KILLED
        result["finished"] = _iso(ending.get("finished"))
        result["duration"] = ending.get("duration")
        return result

    def _add_output(self, result: Doc, directory: Path, dropped: list[int]) -> None:
        texts = []
        for name, cut in zip(STREAMS, dropped):
            try:
                with open(directory / name, "rb") as handle:
                    data = handle.read(self.output_limit)
            except OSError:
                data = b""
            if cut:
                whole = _cut_partial_character(data)
                cut, data = cut + len(data) - len(whole), whole
            text, not_utf8, more = render(data, 2 * self.output_limit)
            if not_utf8:
                result.setdefault("not_utf8", []).append(name)
            if cut + more:
                result.setdefault("truncated", {})[name] = cut + more
            texts.append(text)
        result["ret"] = texts

    def _left_state(self, key: str) -> str:
        """What became of a command an earlier daemon marked ``started``.

        ``running`` (its runner holds the lock), ``finished`` (the runner
        left ``exit.json``), ``never`` (no runner ever started: the runner
        server creates ``lock`` before it forks one; trusted only in the
        same boot, as a power cut may lose a file not yet on disk) or
        ``lost`` (it may have run; its result is unknown).
        """
        directory = self._dir(key)
        if runner_alive(directory):
            return "running"
        if (directory / "exit.json").exists():
            return "finished"
        try:
            boot = (directory / "boot").read_text(encoding="utf-8")
        except OSError:
            boot = None
        if boot and boot == self.boot_id and not (directory / "lock").exists():
            return "never"
        return "lost"

    def _sweep(self) -> None:
        """Remove runner directories that no command in the journal owns."""
        owned = {self._dir(key).name for key in self.leftover}
        try:
            entries = list(self.work_dir.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name not in owned and not runner_alive(entry):
                remove_dir(entry)

    # -- writing back -----------------------------------------------------------
    def _mark_running(self, doc_id: str, started: str,
                      known: Optional[Doc] = None) -> Optional[Doc]:
        return self._settle(doc_id, {"state": "running", "started": started,
                                     "node": self.node}, final=False, known=known)

    def _settle(self, doc_id: str, fields: Doc, final: bool = True,
                known: Optional[Doc] = None, record: bool = True) -> Optional[Doc]:
        """Merge ``fields`` into the command (or fleet result) document, retrying on 409.

        ``known`` is the document as the feed delivered it (a fleet result
        document as read before the run, ``{}`` if there was none), or as
        the ``running`` mark saved it: writing on top of it saves a GET
        before the PUT (on pouchdb-server 6 ms, a fifth of a command's round
        trip).  An edit since makes it stale; the server answers 409 and the
        document is read.  Returns the saved document (None: not written).
        A final result goes to the ledger once written (``record``), before
        the caller forgets the command.
        """
        if final:
            fields.setdefault("finished", iso())
            fields.setdefault("node", self.node)
        with self._lock:
            base = self.fleet.get(doc_id)
        db = self.db
        if base is not None:
            assert self.status_db is not None
            db = self.status_db

        def change(doc: Doc) -> bool:
            if base is None and "_rev" not in doc:
                log.warning("command %s was deleted; result not written", doc_id)
                return False
            if has_result(doc):
                return False  # settled already (an earlier attempt got through)
            doc.update(base or {})
            doc.update(fields)
            return True

        backoff = Backoff()
        shorter = iter(SHORTER)
        while True:
            try:
                saved = db.update(doc_id, change, known=known)
                break
            except Unreachable as exc:
                known = None  # the write may have gone through: read what is there
                # Keep the result until the server is back: it must not be lost.
                if not final or self.stopping.is_set():
                    raise
                delay = backoff.next()
                log.warning("command %s: server unreachable (%s); retrying in %.1f s",
                            doc_id, exc, delay)
                self.stopping.wait(delay)
            except CouchError as exc:
                budget = next(shorter, None) if exc.status == 413 and final \
                    and isinstance(fields.get("ret"), list) else None
                if budget is None:
                    log.error("command %s: cannot write the result: %s", doc_id, exc)
                    raise
                # The server refuses the document as too large (CouchDB's
                # max_document_size, 8 MB by default): keep less output.
                log.warning("command %s: the server refused the result as too large; "
                            "writing it with at most %d bytes of each output", doc_id, budget)
                fields = _shortened(fields, budget, str(exc))
        if final and record:
            self.ledger.record(doc_id, fields)
        if saved is not None and final:
            self.on_result(doc_id, fields)
        return saved


def _readable(fd: int, timeout: float) -> bool:
    """True if ``fd`` is readable within ``timeout`` s (poll: safe for fd >= 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _pidfd(pid: int) -> Optional[int]:
    """A pidfd of our child ``pid`` (Linux >= 5.3), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _quietly(on_slow: Callable[[str], None], started: str) -> None:
    """The ``running`` mark is a courtesy: failing to write it changes nothing."""
    try:
        on_slow(started)
    except Exception as exc:
        log.warning("could not mark a command running: %s", exc)


def _shortened(fields: Doc, budget: int, reason: str) -> Doc:
    """``fields`` with each output cut to ``budget`` bytes, and ``error`` saying why."""
    shorter = dict(fields)
    truncated = dict(fields.get("truncated") or {})
    texts = []
    for name, text in zip(STREAMS, fields["ret"]):
        data = str(text).encode("utf-8")
        kept, _, more = render(data, budget)
        if more:
            truncated[name] = truncated.get(name, 0) + more
        texts.append(kept)
    shorter["ret"] = texts
    if truncated:
        shorter["truncated"] = truncated
    note = (f"the server refused the whole result as too large ({reason}); "
            f"each output is cut to at most {budget} bytes")
    shorter["error"] = f"{fields['error']}; {note}" if fields.get("error") else note
    return shorter


def _iso(epoch: Any) -> Optional[str]:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return None
    return iso(epoch)

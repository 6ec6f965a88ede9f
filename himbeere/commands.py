"""Running commands exactly once each: ``<macid>_cmd`` documents and fleet commands.

A single-node command document, as in HimbeereCouch::

    {"type": "1234567_cmd", "cmd": ["uname", "-a"], "timeout": 30}

runs without a shell, in a process group of its own.  The node writes back
into the same document::

    "ret": [stdout, stderr], "returncode": 0, "state": "done",
    "started": "...", "finished": "...", "duration": 0.004, "node": 1234567

``state`` is ``done``, ``timeout`` (killed, with everything it started),
``error`` (it could not run: a missing binary, a ``cmd`` that is not a list
of strings) or ``interrupted`` (the daemon stopped or died while it ran; it
is not run again).  A command still running after a second is marked
``"state": "running"``.  Each of stdout and stderr keeps its first
``output_limit`` bytes; ``truncated`` says how many bytes were cut, and
``not_utf8`` names a stream that was not UTF-8 (its bytes >= 0x80 that do
not decode appear as ``\\xNN``).

Exactly once: a document that has a result is never run again, and every
command the daemon takes on is kept in a journal in the state directory
(``commands.json``) until its result is written: ``queued``, then
``started`` just before the process starts.  The next daemon marks a
``started`` one ``interrupted`` and runs a ``queued`` one (it never started).
The result is written with the revision the feed delivered, without reading
the document again; a write-back conflict (409) is resolved by re-reading
it, never by dropping the result.

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

import datetime
import json
import logging
import math
import os
import selectors
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from . import defaults
from .couch import Database, Doc
from .exceptions import CommandError, CouchError, Unreachable

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "timeout", "error", "interrupted")
STREAMS = ("stdout", "stderr")

#: Journal phases of a command.
QUEUED, STARTED = "queued", "started"

#: Longest wait between two looks at a command's deadline and the stop flag.
SLICE = 0.2
#: Seconds to wait for a SIGKILLed command to be reaped.
KILL_WAIT = 5.0

#: ``fdatasync`` where there is one (Linux); macOS has only ``fsync``.
_fdatasync = getattr(os, "fdatasync", os.fsync)

INTERRUPTED = "the daemon stopped while this command ran; it is not run again"

#: Seconds an ``"all"`` command may predate a node's first start and still run
#: there: both times are our estimates of the server's clock (from whole-second
#: HTTP ``Date`` headers, good to about a second each), and a command sent
#: while a node was starting up is meant for it.
JOIN_GRACE = 10.0

#: ``type`` of a fleet command (code database) and of a node's result (status database).
COMMAND_TYPE = "himbeere-command"
RESULT_TYPE = "himbeere-result"
RESULT_PREFIX = "result:"


def result_id(command_id: str, node: int) -> str:
    """Id of a node's result document of fleet command ``command_id``."""
    return f"{RESULT_PREFIX}{command_id}:{node}"


def command_of(key: str) -> Optional[str]:
    """The fleet command id in a journal key ``result:<id>:<mac>`` (None: single-node)."""
    if not key.startswith(RESULT_PREFIX) or ":" not in key[len(RESULT_PREFIX):]:
        return None
    return key[len(RESULT_PREFIX):].rsplit(":", 1)[0]


def is_fleet_command(doc: Doc) -> bool:
    return doc.get("type") == COMMAND_TYPE


def targets_node(doc: Doc, node: int) -> bool:
    """True if the fleet command ``doc`` is for ``node`` (``"all"`` or listed, int or str)."""
    targets = doc.get("targets")
    if targets == "all":
        return True
    return isinstance(targets, list) and str(node) in {str(t) for t in targets}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


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


class Journal:
    """Commands taken on whose result is not written yet: id -> phase.

    The file holds JSON lines, each ``{id: phase}`` or ``{id: null}`` (the
    result is written); read in order they give the commands open now.
    A change is one appended line made durable with ``fdatasync``, about a
    third of the cost of writing a new file, ``fsync`` and rename (measured
    0.25 against 0.7 ms, 0.6 against 1.4 ms after a pause), and the
    ``queued`` and ``started`` lines are on the way of every command.
    The file is rewritten that way when it has grown to
    :attr:`COMPACT_AFTER` lines (on a removal, which comes after the result
    is written), when it is missing, and when its last line is incomplete
    (a power cut mid-append) or it is in the format of earlier versions
    (one JSON object, no newline), which reads as one line.
    """

    #: Lines from which a removal rewrites the file (any change at four times as many).
    COMPACT_AFTER = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, str]:
        return self._load()[0]

    def _load(self) -> tuple[dict[str, str], int, bool]:
        """The open commands, the number of lines, and whether appending is safe."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return {}, 0, False
        data: dict[str, str] = {}
        lines = text.split("\n")
        for line in lines:
            try:
                entry = json.loads(line) if line.strip() else {}
            except ValueError:
                continue  # torn by a power cut: that change never completed
            if not isinstance(entry, dict):
                continue
            for key, phase in entry.items():
                if phase is None:
                    data.pop(str(key), None)
                else:
                    data[str(key)] = phase if phase in (QUEUED, STARTED) else STARTED
        return data, len(lines) - 1, text == "" or text.endswith("\n")

    def set(self, doc_id: str, phase: str) -> None:
        self._change(doc_id, phase)

    def remove(self, doc_id: str) -> None:
        self._change(doc_id, None)

    def _change(self, doc_id: str, phase: Optional[str]) -> None:
        with self._lock:
            data, lines, appendable = self._load()
            if data.get(doc_id) == phase:
                return
            if phase is None:
                data.pop(doc_id)
            else:
                data[doc_id] = phase
            limit = self.COMPACT_AFTER if phase is None else 4 * self.COMPACT_AFTER
            if appendable and lines < limit:
                # "started" must be on disk before the process is.
                with open(self.path, "ab") as handle:
                    handle.write(json.dumps({doc_id: phase}).encode() + b"\n")
                    handle.flush()
                    _fdatasync(handle.fileno())
            else:
                self._rewrite(data)

    def _rewrite(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data) + "\n" if data else "")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        # Lines appended from now on go to the new file: its name must be on
        # disk before them, or a power cut could bring back the old one alone.
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


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


class Commands:
    """Runs a node's commands in a thread pool and writes the results back.

    ``status_db`` receives fleet commands' result documents (without it,
    fleet commands are ignored); ``server_time()`` is now on the server's
    clock.
    """

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
        self.on_result = on_result or (lambda doc_id, result: None)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="command")
        self.inflight: set[str] = set()
        self.running: set[str] = set()
        self.closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.stop = threading.Event()

    # -- entry points ----------------------------------------------------------
    def recover(self) -> int:
        """Settle what an earlier daemon left in the journal.

        A command it had started is marked ``interrupted``; one it had only
        queued runs now.  Returns the number marked interrupted.  Raises
        :class:`CouchError` when the server cannot be asked; call it again.
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
            if phase == STARTED and not (result and has_result(result)):
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
                    self.journal.remove(doc_id)
                return
            if self.closed:
                # Stopping: the next start runs it (a feed may deliver late).
                self.journal.set(doc_id, earlier or QUEUED)
                return
            self.inflight.add(doc_id)
        if earlier == STARTED or "started" in doc:
            # Started by an earlier daemon that did not finish it.
            self.journal.set(doc_id, STARTED)
            self.pool.submit(self._finish_without_running, doc_id,
                             {"state": "interrupted", "error": INTERRUPTED}, doc)
            return
        self.journal.set(doc_id, QUEUED)
        try:
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
        if earlier is None and self._joined_later(doc):
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
                self.journal.remove(key)
                return
            if earlier == STARTED or "started" in result:
                self._settle(key, {"state": "interrupted", "error": INTERRUPTED}, known=result)
                self.journal.remove(key)
                return
            try:
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

    def _read_result(self, key: str) -> Optional[Doc]:
        """The result document so far (``{}`` if none), retried while unreachable."""
        assert self.status_db is not None
        delay = 0.5
        while not self.stop.is_set():
            try:
                return self.status_db.get(key) or {}
            except Unreachable as exc:
                log.warning("command %s: server unreachable (%s); retrying in %.1f s",
                            key, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
        return None

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking commands.

        With ``wait``, running commands get ``grace_period`` seconds to end;
        then (or at once without ``wait``) they are killed and marked
        ``interrupted``.  Commands not started yet stay in the journal and
        run after the next start.
        """
        with self._lock:
            self.closed = True
            if wait:
                deadline = time.monotonic() + self.grace_period
                while self.running and time.monotonic() < deadline:
                    self._idle.wait(min(SLICE, max(0.0, deadline - time.monotonic())))
            if self.running:
                log.warning("killing %d command(s) still running: %s", len(self.running),
                            ", ".join(sorted(self.running)))
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- running ----------------------------------------------------------------
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
            self.journal.set(doc_id, STARTED)
            result = self.execute(cmd, timeout,
                                  on_slow=lambda started: self._mark_running(doc_id, started))
            log.info("command %s: %s -> %s (%s)", doc_id, cmd[0], result.get("returncode"),
                     result["state"])
            self._settle(doc_id, result, known=known)
            self.journal.remove(doc_id)
        except Exception:
            log.exception("command %s failed", doc_id)
        finally:
            self._done(doc_id)

    def _done(self, doc_id: str) -> None:
        with self._lock:
            self.inflight.discard(doc_id)
            self.running.discard(doc_id)
            self.fleet.pop(doc_id, None)
            self._idle.notify_all()

    def execute(self, cmd: list[str], timeout: float,
                on_slow: Optional[Callable[[str], None]] = None) -> Doc:
        """Run ``cmd`` and return the result fields (no database involved).

        ``on_slow(started)`` is called from another thread if the command
        still runs after ``running_mark`` seconds.
        """
        started_at, started = time.monotonic(), now_iso()
        base = {"started": started, "node": self.node}
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                error = f"cmd: no such program: {cmd[0]!r}"
            else:
                error = f"cmd: cannot run {cmd[0]!r}: {exc.strerror or exc}"
            return dict(base, state="error", error=error, ret=["", error], returncode=None,
                        finished=now_iso(), duration=round(time.monotonic() - started_at, 6))
        timer = None
        if on_slow is not None:
            # A timer, not a step of the read loop: writing the mark can take
            # a while, and the command's output and deadline must not wait.
            timer = threading.Timer(self.running_mark, _quietly, (on_slow, started))
            timer.daemon = True
            timer.start()
        try:
            outputs, dropped, ending = self._collect(process, started_at + timeout)
        finally:
            if timer is not None:
                timer.cancel()
        result: Doc = dict(base, state=ending or "done", returncode=process.returncode)
        texts = []
        for name, data, cut in zip(STREAMS, outputs, dropped):
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
        if ending == "timeout":
            result["error"] = f"timed out after {timeout:g} s and was killed"
        elif ending == "interrupted":
            result["error"] = "the daemon stopped while this command ran; it was killed"
        result["finished"] = now_iso()
        result["duration"] = round(time.monotonic() - started_at, 6)
        return result

    def _collect(self, process: subprocess.Popen[bytes], deadline: float,
                 ) -> tuple[list[bytes], list[int], Optional[str]]:
        """Read stdout and stderr up to the cap until the command ends.

        Returns both outputs, the bytes cut from each, and ``None``,
        ``"timeout"`` or ``"interrupted"`` (the daemon is stopping); in the
        last two cases the command's process group was killed.
        """
        assert process.stdout is not None and process.stderr is not None
        buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
        dropped = {fd: 0 for fd in buffers}
        order = list(buffers)
        ending = None
        # Readable when the process has ended.  Popen.wait(timeout) polls
        # instead, and its first sleep (1 ms) is a third of running `true`.
        exited = _pidfd(process.pid)
        try:
            with selectors.DefaultSelector() as selector:
                for stream in (process.stdout, process.stderr):
                    selector.register(stream, selectors.EVENT_READ)
                if exited is not None:
                    selector.register(exited, selectors.EVENT_READ)
                while selector.get_map():
                    ending = self._ending(deadline)
                    if ending:
                        break
                    for key, _ in selector.select(_slice(deadline)):
                        if key.fd == exited:
                            selector.unregister(exited)
                            continue
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            selector.unregister(key.fileobj)
                            continue
                        buffer = buffers[key.fd]
                        room = max(0, self.output_limit - len(buffer))
                        buffer += chunk[:room]
                        dropped[key.fd] += len(chunk) - min(room, len(chunk))
        finally:
            if exited is not None:
                os.close(exited)
        # Both pipes are closed, but (without a pidfd) the command may live on.
        while ending is None:
            try:
                process.wait(_slice(deadline))
                break
            except subprocess.TimeoutExpired:
                ending = self._ending(deadline)
        if ending is not None:
            _kill_group(process.pid)
            try:
                process.wait(KILL_WAIT)
            except subprocess.TimeoutExpired:
                log.warning("command pid %s did not die after SIGKILL", process.pid)
        process.stdout.close()
        process.stderr.close()
        return [bytes(buffers[fd]) for fd in order], [dropped[fd] for fd in order], ending

    def _ending(self, deadline: float) -> Optional[str]:
        if time.monotonic() >= deadline:
            return "timeout"
        if self.stop.is_set():
            return "interrupted"
        return None

    # -- writing back -----------------------------------------------------------
    def _mark_running(self, doc_id: str, started: str) -> None:
        self._settle(doc_id, {"state": "running", "started": started, "node": self.node},
                     final=False)

    def _settle(self, doc_id: str, fields: Doc, final: bool = True,
                known: Optional[Doc] = None) -> None:
        """Merge ``fields`` into the command (or fleet result) document, retrying on 409.

        ``known`` is the document as the feed delivered it (a fleet result
        document as read before the run, ``{}`` if there was none): writing
        on top of it saves a GET before the PUT (on pouchdb-server 6 ms,
        a fifth of a command's round trip).  A ``running`` mark or an edit
        since makes it stale; the server answers 409 and the document is read.
        """
        if final:
            fields.setdefault("finished", now_iso())
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

        delay = 0.5
        while True:
            try:
                saved = db.update(doc_id, change, known=known)
                break
            except Unreachable as exc:
                known = None  # the write may have gone through: read what is there
                # Keep the result until the server is back: it must not be lost.
                if not final or self.stop.is_set():
                    raise
                log.warning("command %s: server unreachable (%s); retrying in %.1f s",
                            doc_id, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
            except CouchError as exc:
                log.error("command %s: cannot write the result: %s", doc_id, exc)
                raise
        if saved is not None and final:
            self.on_result(doc_id, fields)


def _slice(deadline: float) -> float:
    return max(0.0, min(SLICE, deadline - time.monotonic()))


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


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

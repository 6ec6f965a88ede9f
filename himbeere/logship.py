"""Shipping what programs print to the status database.

Each program's lines land in one document of the status database,
``log:<macid>:<program doc id>``::

    {"type": "himbeere-log", "node": 1234, "program": "1234:blink", "name": "blink",
     "lines": [[1700000000.123, "hello"], ...], "dropped": 0, "updated": "..."}

``lines`` is a ring of the last :data:`RING` lines (default 1000).  A line
the daemon wrote itself carries a third element, its kind: :data:`EVENT`
for what happened to the program ("started (pid 4242)", "crashed; restart 3
in 8 s", "stopped", "changed (rev 3-ab12), restarting") and :data:`ERROR`
for each line of a crash's traceback, e.g. ``[1700000000.2, "stopped",
"event"]``.  Readers that know only ``[time, text]`` still show its text;
``himbeere logs`` and the dashboard mark them (``uploader.ops.log_lines``).

Lines
are written in batches, at most every :data:`BATCH_SECONDS` per program, by
a thread of their own: a program never waits for the server.  While the
server is down they are buffered in memory, up to the same bound; beyond it
the oldest are dropped and counted in ``dropped``.

The daemon's own log (its file, or the journal under systemd) shows each
program's output only up to :class:`OutputLog`'s rate, ``program_log_rate``
lines a second (default 20); what is over it is counted and reported as
``[name] N lines not shown``, so a program printing in a loop cannot fill
the SD card.  The status database still gets every line, as above.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from . import defaults
from .component import Component
from .couch import Database, Doc
from .exceptions import Conflict, CouchError
from .logtext import printable
from .schema import iso, log_id

log = logging.getLogger(__name__)
#: Program output in the daemon's log comes from this logger.
output_log = logging.getLogger("himbeere.output")

RING = 1000
BATCH_SECONDS = 1.0
#: Kinds of the lines the daemon writes into a program's log (a third element).
EVENT = "event"
ERROR = "error"
KINDS = (EVENT, ERROR)

#: ``(time, text)`` from the program, ``(time, text, kind)`` from the daemon.
Line = tuple[Any, ...]


class _Pending:
    def __init__(self, name: str, ring: int) -> None:
        self.name = name
        self.lines: collections.deque[Line] = collections.deque(maxlen=ring)
        self.dropped = 0


class LogShipper(Component):
    """Collects lines per program and writes them in batches; all of them at the stop."""

    name = "logs"

    def __init__(self, db: Database, node: int, ring: int = RING,
                 interval: float = BATCH_SECONDS) -> None:
        super().__init__()
        self.db = db
        self.node = node
        self.ring = ring
        self.interval = interval
        self._pending: dict[str, _Pending] = {}
        #: Each log document as this shipper last saved it, by id: the next
        #: shipment is written on top of it, without a GET first.  Bounded:
        #: one ring of lines per program.
        self._saved: dict[str, Doc] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def add(self, program: str, name: str, lines: list[Line], dropped: int = 0) -> None:
        """Queue ``lines`` of ``program``; never blocks on the server."""
        with self._lock:
            pending = self._pending.get(program)
            if pending is None:
                pending = self._pending[program] = _Pending(name, self.ring)
            room = self.ring - len(pending.lines)
            if len(lines) > room:
                pending.dropped += len(lines) - max(0, room)
            pending.lines.extend(lines)
            pending.dropped += dropped
            pending.name = name
        self._wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            self.flush()
            self.stopping.wait(self.interval)
        self.flush()

    def wake(self) -> None:
        self._wake.set()

    def after_stop(self) -> None:
        self.flush()  # lines added while the thread wrote its last batch

    def flush(self) -> int:
        """Write every program's pending lines; return how many were written."""
        with self._lock:
            work = [(program, p.name, list(p.lines), p.dropped)
                    for program, p in self._pending.items() if p.lines or p.dropped]
            for program, *_ in work:
                self._pending[program].lines.clear()
                self._pending[program].dropped = 0
        written = 0
        for program, name, lines, dropped in work:
            try:
                self._write(program, name, lines, dropped)
                written += len(lines)
            except CouchError as exc:
                log.debug("cannot ship logs of %s yet: %s", program, exc)
                self._requeue(program, name, lines, dropped)
            except Exception:
                log.exception("cannot ship logs of %s", program)
                self._requeue(program, name, lines, dropped)
        return written

    def _requeue(self, program: str, name: str, lines: list[Line], dropped: int) -> None:
        """Put unsent lines back in front of newer ones, within the bound."""
        with self._lock:
            pending = self._pending.setdefault(program, _Pending(name, self.ring))
            newer = list(pending.lines)
            merged = lines + newer
            overflow = max(0, len(merged) - self.ring)
            pending.lines.clear()
            pending.lines.extend(merged[overflow:])
            pending.dropped += dropped + overflow

    def _write(self, program: str, name: str, lines: list[Line], dropped: int) -> None:
        doc_id = log_id(self.node, program)

        def change(doc: Doc) -> None:
            add_lines(doc, self.node, program, name, lines, dropped, self.ring)

        # Written on top of the copy saved last; the first shipment of a log
        # after a start creates it ({}), as for a program pushed just now: a
        # push to a fleet of thousands saves each node a GET.  If the
        # document exists (a restart) or anyone changed it since, the server
        # answers 409 (or 403, should validation see a field dropped) and
        # update() reads it and merges the lines in again.
        known = self._saved.pop(doc_id, {})
        try:
            saved = self.db.update(doc_id, change, known=known)
        except Conflict:
            saved = self.db.update(doc_id, change)
        if saved is not None:
            self._saved[doc_id] = saved


def add_lines(doc: Doc, node: int, program: str, name: str, lines: list[Line],
              dropped: int = 0, ring: int = RING) -> None:
    """Append ``lines`` to the log document ``doc`` (in place), keeping the last ``ring``."""
    kept: list[Any] = list(doc.get("lines") or []) + [_entry(line) for line in lines]
    doc.update({
        "type": "himbeere-log", "node": node, "program": program, "name": name,
        "lines": kept[-ring:],
        "dropped": int(doc.get("dropped") or 0) + dropped,
        "updated": iso(),
    })


def _entry(line: Line) -> list[Any]:
    """A line as stored: ``[time, text]``, or ``[time, text, kind]`` for the daemon's."""
    if len(line) > 2 and line[2] in KINDS:
        return [line[0], line[1], line[2]]
    return [line[0], line[1]]


class _Bucket:
    def __init__(self, name: str, tokens: float, now: float) -> None:
        self.name = name
        self.tokens = tokens
        self.last = now
        self.hidden = 0
        self.since = now  # the first line not shown since the last report


class OutputLog:
    """Program output in the daemon's log: at most ``rate`` lines a second each.

    A token bucket per program, holding one second's worth of lines: a
    program that prints a little now and then shows all of it; one that
    floods shows ``rate`` lines a second, and once a second (from
    :meth:`tick`, or the next line) ``[name] N lines not shown``.  Lines the
    program's own queue dropped (``dropped``) are counted as not shown too.
    Called from the supervisor's thread only.
    """

    REPORT_EVERY = 1.0
    #: Seconds after which a quiet program's bucket is forgotten.
    FORGET_AFTER = 60.0

    def __init__(self, rate: float = defaults.PROGRAM_LOG_RATE,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = output_log) -> None:
        self.rate = rate
        self.clock = clock
        self.logger = logger
        self._buckets: dict[str, _Bucket] = {}

    def add(self, program: str, name: str, lines: list[str], dropped: int = 0) -> None:
        now = self.clock()
        burst = max(1.0, self.rate)
        bucket = self._buckets.get(program)
        name = printable(name)  # a name must not forge a line of the daemon's log
        if bucket is None:
            bucket = self._buckets[program] = _Bucket(name, burst, now)
        bucket.name = name
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.last) * self.rate)
        bucket.last = now
        shown = min(len(lines), int(bucket.tokens)) if self.rate > 0 else 0
        for line in lines[:shown]:
            self.logger.info("[%s] %s", name, line)
        bucket.tokens -= shown
        if bucket.hidden == 0:
            bucket.since = now
        bucket.hidden += len(lines) - shown + dropped
        self._report(bucket, now)

    def tick(self) -> None:
        """Report what was not shown; forget programs that went quiet."""
        now = self.clock()
        for program, bucket in list(self._buckets.items()):
            self._report(bucket, now)
            if not bucket.hidden and now - bucket.last > self.FORGET_AFTER:
                del self._buckets[program]

    def flush(self) -> None:
        """Report every count now (the daemon is stopping)."""
        for bucket in self._buckets.values():
            self._report(bucket, bucket.since + self.REPORT_EVERY)

    def _report(self, bucket: _Bucket, now: float) -> None:
        if bucket.hidden and now - bucket.since >= self.REPORT_EVERY:
            self.logger.info("[%s] %d lines not shown (over %g lines/s; "
                             "`himbeere logs` shows them)",
                             bucket.name, bucket.hidden, self.rate)
            bucket.hidden = 0

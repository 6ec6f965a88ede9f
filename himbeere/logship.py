"""Shipping what programs print to the status database.

Each program's lines land in one document of the status database,
``log:<macid>:<program doc id>``::

    {"type": "himbeere-log", "node": 1234, "program": "1234:blink", "name": "blink",
     "lines": [[1700000000.123, "hello"], ...], "dropped": 0, "updated": "..."}

``lines`` is a ring of the last :data:`RING` lines (default 1000).  Lines
are written in batches, at most every :data:`BATCH_SECONDS` per program, by
a thread of their own: a program never waits for the server.  While the
server is down they are buffered in memory, up to the same bound; beyond it
the oldest are dropped and counted in ``dropped``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Optional

from .couch import Database, Doc
from .exceptions import Conflict, CouchError

log = logging.getLogger(__name__)

RING = 1000
BATCH_SECONDS = 1.0

Line = tuple[float, str]


def log_id(node: int, program: str) -> str:
    return f"log:{node}:{program}"


class _Pending:
    def __init__(self, name: str, ring: int) -> None:
        self.name = name
        self.lines: collections.deque[Line] = collections.deque(maxlen=ring)
        self.dropped = 0
        self.rev: Optional[str] = None


class LogShipper:
    """Collects lines per program and writes them in batches."""

    def __init__(self, db: Database, node: int, ring: int = RING,
                 interval: float = BATCH_SECONDS) -> None:
        self.db = db
        self.node = node
        self.ring = ring
        self.interval = interval
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="logs", daemon=True)
        self.thread.start()

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
        while not self.stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            self.flush()
            self.stop.wait(self.interval)
        self.flush()

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
            ring: list[Any] = list(doc.get("lines") or []) + [[t, text] for t, text in lines]
            doc.update({
                "type": "himbeere-log", "node": self.node, "program": program, "name": name,
                "lines": ring[-self.ring:],
                "dropped": int(doc.get("dropped") or 0) + dropped,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })

        try:
            self.db.update(doc_id, change)
        except Conflict:
            self.db.update(doc_id, change)

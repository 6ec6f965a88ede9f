"""The node's status document: heartbeats and program states.

Status lives in its own database (``<db>_status`` by default), never in the
code database: every node filters the code database's feed, and with 200
nodes heartbeat writes there kept CouchDB busy evaluating filters (21 to
42 s for one round of 200 writes on CouchDB 3.4.3).

The document ``status:<macid>`` is rewritten every ``heartbeat_interval``
seconds and at once when a program changes state.  Each heartbeat also goes
into the node's history (:mod:`himbeere.history`), which writes
``history:<macid>`` once per ``history_interval`` (5 minutes).
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
import time
from typing import Any, Callable, Optional

from . import __version__, defaults, identity
from .component import Component
from .couch import Database, Doc
from .exceptions import Conflict, CouchError, Unauthorized
from .history import History
from .schema import iso, status_id

log = logging.getLogger(__name__)

#: Soonest a program state change is written after the previous write.
MIN_GAP = 0.05


class Status(Component):
    """Writes the status document from its own thread; "stopped" once stopped."""

    name = "status"
    # A heartbeat still in flight would overwrite "stopped": wait for it.
    stop_timeout = 10.0

    def __init__(
        self,
        db: Database,
        node: int,
        interval: float,
        programs: Callable[[], dict[str, Any]],
        interface: Optional[str] = None,
        extra: Optional[Callable[[], dict[str, Any]]] = None,
        clock_offset: Optional[Callable[[], Optional[float]]] = None,
        history_interval: float = defaults.HISTORY_INTERVAL,
    ) -> None:
        super().__init__()
        self.clock_offset = clock_offset or (lambda: None)
        self.db = db
        self.node = node
        self.interval = interval
        self.programs = programs
        self.interface = interface
        self.extra = extra or (lambda: {})
        self.started = time.time()
        self.state = "running"
        self._rev: Optional[str] = None
        self._poke = threading.Event()
        self.writes = 0
        #: time.monotonic() of the last successful write (placement fencing).
        self.last_write: Optional[float] = None
        self.history = History(db, node, history_interval)

    def set_history_interval(self, seconds: float) -> None:
        """A new bucket size starts a new ring (samples on another grid do not mix)."""
        if seconds != self.history.interval:
            self.history = History(self.db, self.node, seconds)

    def poke(self) -> None:
        """Write soon: a program changed state."""
        self._poke.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.loop()
            self._poke.wait(self.interval)
            if self._poke.is_set():
                self.stopping.wait(MIN_GAP)  # gather a burst of changes into one write
            self._poke.clear()

    def wake(self) -> None:
        self.poke()

    def after_stop(self) -> None:
        try:
            self.write("stopped")
        except CouchError as exc:
            log.warning("could not write the final status: %s", exc)
        self.record(flush=True)

    def loop(self) -> None:
        try:
            self.write()
        except CouchError as exc:
            log.warning("cannot write status: %s", exc)
        except Exception:
            log.exception("cannot write status")

    def document(self) -> Doc:
        now = time.time()
        offset = self.clock_offset()
        doc: Doc = {
            "_id": status_id(self.node),
            "type": "himbeere-status",
            "node": self.node,
            "state": self.state,
            "hostname": socket.gethostname(),
            "ip": identity.getipaddr(self.interface),
            "daemon_version": __version__,
            "python": platform.python_version(),
            "started": iso(self.started),
            "uptime": round(now - self.started, 3),
            "heartbeat": iso(now),
            "heartbeat_time": now,
            "heartbeat_server_time": now + (offset or 0.0),
            "clock_offset": offset,
            "heartbeat_interval": self.interval,
            # The server this node uses now (one of a cluster's), no credentials.
            "server": self.db.couch.base,
            "programs": self.programs(),
        }
        doc.update(self.extra())
        return doc

    def write(self, state: Optional[str] = None) -> Doc:
        if state is not None:
            self.state = state
        doc = self.document()
        if self._rev is not None:
            doc["_rev"] = self._rev
        try:
            saved = self.db.save(doc)
        except Conflict:
            fresh = self.db.get(doc["_id"])
            if fresh is None:
                doc.pop("_rev", None)
            else:
                doc["_rev"] = fresh["_rev"]
            saved = self.db.save(doc)
        self._rev = saved["_rev"]
        self.writes += 1
        self.last_write = time.monotonic()
        self.record(doc)
        return saved

    def record(self, doc: Optional[Doc] = None, flush: bool = False) -> None:
        """Add a heartbeat to the history; a failed history write never fails a heartbeat."""
        try:
            if doc is not None:
                self.history.add(doc)
            if flush:
                self.history.flush()
        except Unauthorized as exc:
            log.warning("cannot write the history (%s): the status database's rules predate "
                        "history documents; run `himbeere-upload setup URL` to update them", exc)
        except CouchError as exc:
            log.warning("cannot write the history, kept for the next try: %s", exc)

"""Leases in CouchDB: one holder at a time, by compare-and-swap on ``_rev``.

A lease is a document ``lease:<name>`` in the status database::

    {"_id": "lease:scheduler", "type": "himbeere-lease", "name": "scheduler",
     "holder": "1234567", "epoch": 7, "expires": 1700000030.0, "ttl": 30.0}

Taking or renewing it is one PUT with the ``_rev`` last read: when two
contenders race, CouchDB accepts one write and answers 409 to the other, so
there is never more than one holder.  A holder that stops renewing loses the
lease when ``expires`` passes, and the next contender takes it with
``epoch + 1``.  Anything written under a lease that must not survive its
loss goes into the lease document itself (the scheduler's assignments do):
a stale holder's write then fails on ``_rev`` like any other.

Times are on the server's clock: pass ``clock`` that adds the measured
offset (see :attr:`himbeere.couch.Couch.clock_offset`), so that nodes with
wrong clocks agree on when a lease expires.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from .couch import Database, Doc
from .exceptions import Conflict, CouchError

log = logging.getLogger(__name__)


def lease_id(name: str) -> str:
    return f"lease:{name}"


class Lease:
    """One contender for the lease ``name``."""

    def __init__(self, db: Database, name: str, holder: str, ttl: float,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.db = db
        self.name = name
        self.holder = str(holder)
        self.ttl = ttl
        self.clock = clock or time.time
        #: The lease document as last read or written.
        self.doc: Optional[Doc] = None

    @property
    def held(self) -> bool:
        """True while we hold it, as far as our last successful write says."""
        doc = self.doc
        return bool(doc and doc.get("holder") == self.holder
                    and float(doc.get("expires", 0)) > self.clock())

    @property
    def epoch(self) -> int:
        return int((self.doc or {}).get("epoch", 0))

    def read(self) -> Optional[Doc]:
        self.doc = self.db.get(lease_id(self.name))
        return self.doc

    def acquire(self, **fields: Any) -> bool:
        """Take the lease if it is free or expired, or renew it if ours.

        ``fields`` are stored in the lease document (only when we hold it).
        Returns whether we hold it now.  Never raises for a lost race.
        """
        try:
            current = self.read()
        except CouchError as exc:
            log.debug("lease %s: cannot read: %s", self.name, exc)
            return False
        now = self.clock()
        mine = current is not None and current.get("holder") == self.holder
        free = current is None or float(current.get("expires", 0)) <= now
        if not mine and not free:
            return False
        doc: Doc = dict(current or {"_id": lease_id(self.name)})
        if not mine:
            doc["epoch"] = int(doc.get("epoch", 0)) + 1
            doc["since"] = now
        doc.update(fields)
        doc.update({"type": "himbeere-lease", "name": self.name, "holder": self.holder,
                    "expires": now + self.ttl, "ttl": self.ttl, "renewed": now})
        return self._write(doc)

    def update(self, **fields: Any) -> bool:
        """Write ``fields`` into the lease document, only if we still hold it."""
        if not self.held or self.doc is None:
            return False
        doc = dict(self.doc)
        doc.update(fields)
        doc.update({"expires": self.clock() + self.ttl, "renewed": self.clock()})
        return self._write(doc)

    def release(self) -> None:
        """Let the next contender in at once (a clean stop)."""
        if self.doc is None or self.doc.get("holder") != self.holder:
            return
        doc = dict(self.doc, expires=0.0, holder=None)
        try:
            self.db.save(doc)
        except CouchError as exc:
            log.debug("lease %s: cannot release: %s", self.name, exc)
        self.doc = None

    def _write(self, doc: Doc) -> bool:
        try:
            self.doc = self.db.save(doc)
            return True
        except Conflict:
            # Someone else wrote first: they hold it (or renewed it) now.
            self.doc = None
            return False
        except CouchError as exc:
            log.debug("lease %s: cannot write: %s", self.name, exc)
            return False

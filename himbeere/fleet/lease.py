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

The status database holds nodes to the same rules (see
:mod:`himbeere.security`), so a compromised node cannot break them either:
a node takes a lease only when it is absent, released (``holder`` null),
expired on the server's clock, or already its own; ``ttl`` is at most
:data:`~himbeere.defaults.LEASE_MAX_TTL` and ``expires`` at most ``ttl``
(plus :data:`~himbeere.defaults.LEASE_CLOCK_SLACK`) ahead of the server's
clock; only its holder (or an admin) deletes a lease.  An ``expires`` that
is not a number counts as expired, here and there.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from .. import defaults
from ..couch import Database, Doc
from ..exceptions import Conflict, CouchError, Unauthorized
from ..schema import lease_id

log = logging.getLogger(__name__)


#: :meth:`Lease.acquire` without ``known``: it reads the document first.
UNREAD: Any = object()


def expires(doc: Optional[Doc]) -> float:
    """``expires`` of a lease document; 0 (expired) when it is not a number."""
    value = (doc or {}).get("expires")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)


def is_free(doc: Optional[Doc], now: float) -> bool:
    """True when anyone may take the lease: absent, released or expired at ``now``."""
    return doc is None or doc.get("holder") is None or expires(doc) <= now


class Lease:
    """One contender for the lease ``name``."""

    def __init__(self, db: Database, name: str, holder: str, ttl: float,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.db = db
        self.name = name
        self.holder = str(holder)
        self._ttl = 0.0
        self.ttl = ttl
        self.clock = clock or time.time
        #: The lease document as last read or written.
        self.doc: Optional[Doc] = None

    @property
    def ttl(self) -> float:
        """Seconds the lease outlives its last renewal (at most ``LEASE_MAX_TTL``)."""
        return self._ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        if value > defaults.LEASE_MAX_TTL:
            log.warning("lease %s: ttl %g s is longer than the %g s the server allows; "
                        "using %g s", self.name, value, defaults.LEASE_MAX_TTL,
                        defaults.LEASE_MAX_TTL)
            value = defaults.LEASE_MAX_TTL
        self._ttl = float(value)

    @property
    def held(self) -> bool:
        """True while we hold it, as far as our last successful write says."""
        doc = self.doc
        return bool(doc and doc.get("holder") == self.holder and expires(doc) > self.clock())

    @property
    def epoch(self) -> int:
        return int((self.doc or {}).get("epoch", 0))

    def read(self) -> Optional[Doc]:
        self.doc = self.db.get(lease_id(self.name))
        return self.doc

    def acquire(self, known: Any = UNREAD, **fields: Any) -> bool:
        """Take the lease if it is free or expired, or renew it if ours.

        ``fields`` are stored in the lease document (only when we hold it).
        ``known`` is the document as the caller just read it (None: missing),
        which saves reading it again; had it changed since, the write gets
        a 409 and the lease is not ours.  Returns whether we hold it now.
        Never raises for a lost race.
        """
        if known is UNREAD:
            try:
                current = self.read()
            except CouchError as exc:
                log.debug("lease %s: cannot read: %s", self.name, exc)
                return False
        else:
            current = known
        now = self.clock()
        mine = current is not None and current.get("holder") == self.holder
        free = is_free(current, now)
        if not mine and not free:
            return False
        doc: Doc = dict(current or {"_id": lease_id(self.name)})
        if not mine:
            doc["epoch"] = int(doc.get("epoch", 0)) + 1
            doc["since"] = now
        doc.update(fields)
        doc.update({"type": "himbeere-lease", "name": self.name, "holder": self.holder,
                    "expires": now + self.ttl, "ttl": self.ttl, "renewed": now})
        return self._write(doc, taking=not mine)

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

    def _write(self, doc: Doc, taking: bool = False) -> bool:
        try:
            self.doc = self.db.save(doc)
            return True
        except Conflict:
            # Someone else wrote first: they hold it (or renewed it) now.
            self.doc = None
            return False
        except Unauthorized as exc:
            # The server's rules (security.py).  Taking over: on its clock the
            # lease has not quite expired (our estimate of it runs ahead), a
            # race like a 409, tried again later.  Renewing: our clock
            # estimate is off by more than LEASE_CLOCK_SLACK, which matters.
            if taking:
                log.debug("lease %s: not free yet on the server's clock: %s", self.name, exc)
            else:
                log.warning("lease %s: the server refused a renewal: %s", self.name, exc)
            return False
        except CouchError as exc:
            log.debug("lease %s: cannot write: %s", self.name, exc)
            return False

"""Conflicts of a node's own documents, resolved by the node that owns them.

A site node writes to its relay and, while the relay is away, to the central
server (``server = <relay>,<central>``).  When the two replicate again, a
document the node wrote on both sides has two leaf revisions: CouchDB keeps
both and shows one, chosen by revision number, not by content.  Only the
owner knows which content is right, so it resolves its own documents:

* ``status:<mac>``: the revision with the newest heartbeat;
* ``history:<mac>``: the one with the newest sample (then the newest ``updated``);
* ``result:<command>:<mac>`` and ``<mac>_cmd`` command documents: a revision
  with a final result over one without (``running``, or none); among those,
  the one with the most output (a result written again from the ledger
  keeps only 4 KB of each stream, :mod:`himbeere.journal`); equal: CouchDB's
  winner;
* ``log:<mac>:<program>``: the union of the lines, in time order, without
  duplicates, written on top of the winner;
* ``state:<program>``, a program's shared state, which no one node owns
  (two nodes on either side of a split may both save it): the revision
  saved last on its server's clock.  Any node with several servers resolves
  it; all choose alike.

Every other revision is deleted in the same ``_bulk_docs`` request.  The
choice depends only on the revisions' content, so two resolvers racing (two
copies of the view, or the relay's and the centre's) choose alike; a write
that lost a race (409) is read again, and a revision someone else deleted
already is left alone.

Finding them costs :data:`CONFLICT_HEARTBEATS`-th of two requests a beat:
each check asks the ``conflicts`` view of both databases (design version
9, installed by ``himbeere-upload setup``) for this node's key (and, in
the status database, for the shared key ``["state"]``).  Where the
view is missing (an older design document), the check is skipped quietly.
The daemon runs the check only with more than one server: a node with one
server never writes a document on two sides.  The same component moves the
node back to its first server (a site's relay) when that answers again
(:meth:`himbeere.couch.Couch.return_to_first`), at each check.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import defaults
from .commands import FINAL_STATES
from .component import Component
from .couch import Database, Doc, design
from .exceptions import CouchError, NotFound
from .logship import RING
from .logtext import printable
from .schema import (
    HISTORY_PREFIX,
    LOG_PREFIX,
    RESULT_PREFIX,
    STATE_PREFIX,
    STATUS_PREFIX,
    commands_id,
)

log = logging.getLogger(__name__)

#: The check runs every this many heartbeats (5 minutes by default).
#: Conflicts appear only after a failover and the replication that follows
#: it, and they harm little while they wait: both revisions are whole
#: documents, and the node's next write of a status or log lands on the
#: branch it follows, which then wins.  Two view requests every 30 beats
#: add 0.07 requests to each beat of a node (issue 14 counted every one).
CONFLICT_HEARTBEATS = 30
#: The ``conflicts`` view's key of documents no one node owns: ``state:*``.
SHARED = "state"
#: Reads and writes of one document before giving up until the next check.
ATTEMPTS = 5


class Conflicts(Component):
    """Every ``interval`` seconds, resolves the conflicts of this node's documents."""

    name = "conflicts"
    stop_timeout = 2.0

    def __init__(self, status_db: Database, code_db: Database, node: int,
                 interval: float) -> None:
        super().__init__()
        self.status_db = status_db
        self.code_db = code_db
        self.node = node
        self.interval = interval
        #: Databases whose view was missing at the last check (logged once).
        self.missing: set[str] = set()

    def run(self) -> None:
        # The first check one heartbeat after the start (a daemon started
        # again after an outage finds what replication left), then every interval.
        wait = self.interval / CONFLICT_HEARTBEATS
        while not self.stopping.wait(wait):
            wait = self.interval
            try:
                # Back to the first server (a site's relay) once it answers
                # again; then its conflicts, which replication left there.
                self.status_db.couch.return_to_first()
                self.check()
            except CouchError as exc:
                log.debug("conflicts: %s (next check in %.0f s)", exc, self.interval)

    def loop(self) -> None:
        self.check()

    def check(self) -> int:
        """One check of both databases; returns the number of documents resolved."""
        resolved = 0
        for db in (self.status_db, self.code_db):
            for doc_id in self.conflicted(db):
                if self.stopping.is_set():
                    return resolved
                if self.resolve(db, doc_id):
                    resolved += 1
        return resolved

    def conflicted(self, db: Database) -> list[str]:
        """Ids of this node's documents in ``db`` that have conflicts ([] without the view)."""
        keys = [[str(self.node)]] + ([[SHARED]] if db is self.status_db else [])
        try:
            rows = db.view(defaults.DESIGN, design.CONFLICTS_VIEW, keys=keys)
        except NotFound:
            if db.name not in self.missing:
                self.missing.add(db.name)
                log.debug("conflicts: no %s view in %s (design version < %s); not checked",
                          design.CONFLICTS_VIEW, db.name, design.CONFLICTS_SINCE)
            return []
        self.missing.discard(db.name)
        return sorted({str(row["id"]) for row in rows})

    def resolve(self, db: Database, doc_id: str) -> bool:
        """Leave one revision of ``doc_id``; True if there were conflicts to resolve."""
        rule = owner_rule(doc_id, self.node, code=db is self.code_db)
        if rule is None:
            return False
        resolved = False
        for _ in range(ATTEMPTS):
            winner = db.get(doc_id, conflicts=True)
            if winner is None or not winner.get("_conflicts"):
                return resolved  # an earlier round (or another resolver) was enough
            if rule == "command" and str(winner.get("type")) != commands_id(self.node):
                return False
            revisions = [winner]
            for rev in winner["_conflicts"]:
                other = db.get(doc_id, rev=rev)
                if other is not None and not other.get("_deleted"):
                    revisions.append(other)
            writes = resolution(rule, revisions)
            answers = db.bulk_docs(writes)
            lost = [a for a in answers if a.get("error") and a.get("error") != "conflict"]
            for answer in lost:
                log.warning("conflicts: cannot resolve %s: %s: %s", printable(doc_id),
                            answer.get("error"), answer.get("reason"))
            if lost:
                return resolved
            if any(not a.get("error") for a in answers):
                # All 409s: another resolver got there first; read again.
                resolved = True
                log.info("conflicts: resolved %s (%d revisions, kept %s)", printable(doc_id),
                         len(revisions), _kept_rev(writes, revisions))
        return resolved


def owner_rule(doc_id: str, node: int, code: bool = False) -> Optional[str]:
    """How this node resolves ``doc_id``: ``newest``, ``history``, ``result``,
    ``log``, ``command`` (in the code database, ``code``: its type is checked
    when read); None for a document it does not own."""
    if code:
        return None if doc_id.startswith("_") else "command"
    mac = str(node)
    if doc_id == STATUS_PREFIX + mac:
        return "newest"
    if doc_id == HISTORY_PREFIX + mac:
        return "history"
    if doc_id.startswith(f"{LOG_PREFIX}{mac}:"):
        return "log"
    if doc_id.startswith(RESULT_PREFIX) and doc_id.endswith(f":{mac}"):
        return "result"
    if doc_id.startswith(STATE_PREFIX):
        return "state"  # shared: whichever node looks first (all choose alike)
    return None


def resolution(rule: str, revisions: list[Doc]) -> list[Doc]:
    """The ``_bulk_docs`` writes that leave one revision (``revisions[0]``: the winner)."""
    winner = revisions[0]
    if rule == "log":
        merged = dict(winner, lines=merge_lines(revisions),
                      dropped=max(int(r.get("dropped") or 0) for r in revisions))
        merged.pop("_conflicts", None)
        return [merged] + [_deletion(r) for r in revisions[1:]]
    kept = choose(rule, revisions)
    return [_deletion(r) for r in revisions if r["_rev"] != kept["_rev"]]


def choose(rule: str, revisions: list[Doc]) -> Doc:
    """The revision to keep; ties go to the first (CouchDB's winner)."""
    if rule == "newest":
        return _best(revisions, lambda r: _number(r.get("heartbeat_time")))
    if rule == "history":
        return _best(revisions, lambda r: (_newest_sample(r), str(r.get("updated") or "")))
    if rule == "state":
        # The last save on the server's clock: a program's state is saved
        # whole every 10 s, so the newest revision is what it believes now.
        return _best(revisions, lambda r: (_number(r.get("saved")), str(r.get("node"))))
    if rule in ("result", "command"):
        return _best(revisions, lambda r: (r.get("state") in FINAL_STATES, _output(r)))
    return revisions[0]


def merge_lines(revisions: list[Doc]) -> list[Any]:
    """Every revision's log lines, by time, each once; the newest :data:`RING`."""
    seen: set[str] = set()
    lines: list[Any] = []
    for revision in revisions:
        for line in revision.get("lines") or []:
            key = repr(line)
            if key not in seen:
                seen.add(key)
                lines.append(line)
    lines.sort(key=lambda line: _number(line[0] if isinstance(line, list) and line else None))
    return lines[-RING:]


def _best(revisions: list[Doc], rank: Any) -> Doc:
    best = revisions[0]
    for revision in revisions[1:]:
        if rank(revision) > rank(best):
            best = revision
    return best


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else float("-inf")


def _newest_sample(doc: Doc) -> float:
    samples = doc.get("samples")
    if not isinstance(samples, list):
        return float("-inf")
    return max((_number(s[0]) for s in samples if isinstance(s, list) and s),
               default=float("-inf"))


def _output(doc: Doc) -> int:
    ret = doc.get("ret")
    return sum(len(str(text)) for text in ret) if isinstance(ret, list) else -1


def _deletion(doc: Doc) -> Doc:
    return {"_id": doc["_id"], "_rev": doc["_rev"], "_deleted": True}


def _kept_rev(writes: list[Doc], revisions: list[Doc]) -> str:
    deleted = {w["_rev"] for w in writes if w.get("_deleted")}
    left = [r["_rev"] for r in revisions if r["_rev"] not in deleted]
    return left[0] if left else "?"


"""Placement: programs the fleet runs on its least busy nodes, and moves.

A **placed program** is a code document whose ``type`` is
``"himbeere-placed"`` instead of a MAC id::

    {"_id": "aggregator", "type": "himbeere-placed", "name": "aggregator",
     "code": "def main(): ...",        # or "modules", or "git", as any program
     "replicas": 1,                    # how many nodes run it; default 1, 0 stops it
     "labels": {"room": "lab1"},       # only nodes having all these labels
     "requires": {"ram_mb": 200, "disk_mb": 100}}   # free RAM and disk a node needs

Every other field (``restart``, ``enabled``, ``restart_count``) works as for
any program.  Deployers create them; nodes may not (see
:mod:`himbeere.security`).  The feed filter lets them reach every node.

**The scheduler** runs in every daemon, and acts only in the one holding
the lease ``lease:scheduler`` in the status database (:mod:`himbeere.fleet.lease`,
ttl ``LEASE_TTL`` heartbeat intervals, renewed every heartbeat).  The
assignments live inside that lease document, so they are written with the
lease's compare-and-swap on ``_rev``: a stale leader's write fails, and two
leaders never assign at once::

    {"_id": "lease:scheduler", "type": "himbeere-lease", "name": "scheduler",
     "holder": "202481596941066", "epoch": 4, "since": 1714564700.0,
     "expires": 1714564830.0, "ttl": 30.0, "renewed": 1714564800.0,
     "scheduled": 1714564800.0,
     "assignments": {
       "aggregator": {
         "name": "aggregator", "replicas": 1,
         "nodes": [202481596941066],
         "why": {"202481596941066":
                 "least busy of 3: load 0.12 on 4 cpus, 1 program, 812 MB free"},
         "since": {"202481596941066": 1714564800.0},
         "draining": [],
         "problem": null}}}

``nodes`` are the MAC ids that run it; ``why`` says, per node, why it was
chosen ("least busy of N: ...", "moved from 1234 (dead); least busy ...");
``since`` is when (server clock); ``draining`` lists nodes that must stop it
before a replacement starts (labels changed, fewer replicas); ``problem``
says why fewer than ``replicas`` nodes run it (or why the document is not
valid), else null.

**Choosing a node** is :mod:`himbeere.fleet.scheduler`'s, a pure function
of the documents.

**Following the assignment.**  Every node reads the lease document once per
heartbeat and runs the placed programs that list it; when its MAC id goes,
the program stops.  A node does not take the assignments on trust (the
lease holder may be a compromised node): it runs a placed program only
while its own labels (its ``node:<mac>`` document, which only deployers
write) have all the program's ``labels``, and starts one only when its own
free RAM and disk cover ``requires``.  Otherwise it refuses, logs why and
shows it in its status document (``placement.refused``: ``{doc id:
reason}``); a program whose document it has not seen yet waits for it.

Fencing keeps a program from running on two nodes (``I`` = heartbeat
interval):

========= ===================================================================
0         a node's last heartbeat; then its daemon dies (kill -9), freezes,
          or loses the server
``3 I``   a node that has not read the assignment or written a heartbeat for
          ``FENCE_AFTER`` intervals stops its placed programs (quit, SIGTERM
          after ``I``, SIGKILL ``I/2`` later); a frozen daemon cannot, so its
          placed programs' children watch for the daemon's ``"alive"``
          messages: after ``CHILD_FENCE / 2`` intervals of silence they quit,
          after ``CHILD_FENCE`` they kill their process group
          (:mod:`himbeere.runtime.child`); a killed daemon's children quit at once
``6 I``   the node is ``dead`` (:data:`himbeere.health.DEAD_AFTER`); at its
          next heartbeat the leader assigns the program elsewhere, and the new
          node starts it at its own next heartbeat
========= ===================================================================

So a program moves 5 to 8 intervals after its node died (6 after the last
heartbeat, plus the leader's and the new node's next heartbeats; measured:
median 6.9 intervals, ``benchmarks/bench_failover.py``), within two
heartbeat timeouts.  When the leader itself died, another node holds the
lease 3 to 4 intervals after its last renewal, in time to do it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

from .. import codedoc
from ..codedoc import PLACED_TYPE
from ..component import Component
from ..couch import Database, Doc
from ..exceptions import CouchError, ProgramError
from ..logtext import EscapedArguments
from ..schema import NODE_PREFIX, STATUS_PREFIX, node_id
from .lease import Lease, is_free
from .scheduler import (
    SITE_LABEL,
    Assignments,
    NodeInfo,
    _gist,
    _macs,
    _number,
    assign,
    assigned_to,
    in_scope,
    node_info,
    nodes_from_docs,
    wanted,
)
from .targeting import NodeLabels

log = logging.getLogger(__name__)
# Document ids come from users: none may forge a line of the daemon's log.
log.addFilter(EscapedArguments())

__all__ = ["PLACED_TYPE", "LEASE_NAME", "Placement"]

LEASE_NAME = "scheduler"
#: In heartbeat intervals: the lease's ttl; how long a node keeps its placed
#: programs without reading the assignment; how long a placed program's
#: child lives on without word from its daemon.
LEASE_TTL = 3.0
FENCE_AFTER = 3.0
CHILD_FENCE = 3.0
#: A node with nothing placed, nothing assigned and no staged rollout, which
#: does not schedule, reads the lease only every IDLE_READS heartbeats: it
#: has nothing to learn from it but whether the leader died, and in a fleet
#: of thousands some node reads it within moments of that anyway.  Every
#: node reading it every beat was half the server's requests (issue 14).
IDLE_READS = 6
#: The fields of a placed document the scheduler reads.
PLACEMENT_FIELDS = ("_id", "_rev", "type", "name", "replicas", "labels", "requires")
#: Unknown placed documents looked up per heartbeat, at most.
LOOKUPS = 20


# -- the node's part --------------------------------------------------------------------
class Placement(Component):
    """Reads this node's assignment every heartbeat; schedules while holding the lease.

    ``loop()`` is one heartbeat (huey's pattern; tests call it directly);
    ``start()`` runs it in a thread.  ``on_assigned(programs, hurry)`` hands
    the supervisor the set of placed program ids this node must run;
    ``hurry`` (seconds) is set when they must stop quickly (fencing).
    ``stop()`` releases the lease, so that the next node schedules at once.
    """

    name = "placement"

    def __init__(self, status_db: Database, code_db: Database, node: int, interval: float,
                 on_assigned: Callable[[frozenset[str], Optional[float]], None],
                 clock: Optional[Callable[[], float]] = None,
                 last_heartbeat: Optional[Callable[[], Optional[float]]] = None,
                 resources: Optional[Callable[[], Mapping[str, Any]]] = None,
                 on_lead: Optional[Callable[[int], Any]] = None,
                 labels: Optional[NodeLabels] = None,
                 busy: Optional[Callable[[], bool]] = None) -> None:
        super().__init__()
        #: True while this node needs a leader for something else (a staged rollout).
        self.busy = busy or (lambda: False)
        self._skipped = IDLE_READS  # the first heartbeat reads the lease
        #: This node's labels, for programs for many nodes: refreshed every beat.
        self.labels = labels
        self.status_db = status_db
        self.code_db = code_db
        self.node = node
        self.interval = interval
        self.on_assigned = on_assigned
        self.clock = clock or time.time
        self.last_heartbeat = last_heartbeat or (lambda: None)
        #: This node's ``memory_used_mb``, ``memory_total_mb`` and
        #: ``disk_free_mb`` (None: only labels are checked).
        self.resources = resources
        #: Called with the lease epoch at each heartbeat this node leads:
        #: staged rollouts are driven there (:mod:`.rollout`).
        self.on_lead = on_lead
        self.lease = Lease(status_db, LEASE_NAME, str(node), ttl=LEASE_TTL * interval,
                           clock=self.clock)
        #: Placed documents seen on the feed, by id.
        self.placed: dict[str, Doc] = {}
        self.leader = False
        self.fenced = False
        self.mine: frozenset[str] = frozenset()
        #: What the lease assigns us, fitting or not; and why we refuse some.
        self.assigned: frozenset[str] = frozenset()
        self.refused: dict[str, str] = {}
        self.last_read: Optional[float] = None  # monotonic
        self.last_error: Optional[str] = None
        self._lock = threading.Lock()
        self._poke = threading.Event()

    # -- from other threads -------------------------------------------------------------
    def note(self, doc: Doc) -> None:
        """A document from the feed: remember placed ones (the leader schedules them)."""
        doc_id = str(doc.get("_id"))
        with self._lock:
            if codedoc.is_placed(doc):
                # Only what scheduling needs: the code may be megabytes.
                self.placed[doc_id] = {k: v for k, v in doc.items() if k in PLACEMENT_FIELDS}
            elif self.placed.pop(doc_id, None) is None:
                return
        if self.leader or doc_id in self.assigned:
            # Schedule now, not at the next heartbeat; or check it against
            # this node and run it (we may not have seen it yet).
            self._poke.set()

    def check_fence(self, now: Optional[float] = None) -> None:
        """From the main loop: stop placed programs when this node is out of touch.

        Not in this object's thread: a request hanging there must not delay it.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.fenced or not self.mine or not self._stale(now):
                return
            self.fenced, self.mine = True, frozenset()
        log.warning("placement: no assignment read or heartbeat written for %.0f s; "
                    "stopping placed programs, other nodes take them over",
                    FENCE_AFTER * self.interval)
        self.on_assigned(frozenset(), self.interval)

    def _stale(self, now: float) -> bool:
        touched = [t for t in (self.last_read, self.last_heartbeat()) if t is not None]
        return not touched or now - min(touched) > FENCE_AFTER * self.interval

    def describe(self) -> Doc:
        """For the status document."""
        return {"placement": {"leader": self.leader, "fenced": self.fenced,
                              "assigned": sorted(self.mine),
                              "refused": dict(self.refused)}}

    # -- running ------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            self.loop()
            self._poke.wait(self.interval)
            self._poke.clear()

    def loop(self) -> None:
        """One heartbeat: read the lease; schedule if we hold it or it is free."""
        if self.labels is not None:
            self.labels.refresh()  # a GET only once a program selected by labels
        if self.idle() and self._skipped < IDLE_READS - 1:
            self._skipped += 1
            return
        self._skipped = 0
        try:
            self._beat()
        except CouchError as exc:
            message = str(exc)
            if message != self.last_error:
                log.warning("placement: %s", message)
            self.last_error = message
        except Exception:
            log.exception("placement failed")

    def idle(self) -> bool:
        """Nothing to place, run or drive here: the lease can wait (:data:`IDLE_READS`)."""
        with self._lock:
            if self.leader or self.placed or self.assigned or self.mine:
                return False
        return not self.busy()

    def _beat(self) -> None:
        doc = self.lease.read()
        self._follow(doc)
        now = self.clock()
        mine = doc is not None and doc.get("holder") == self.lease.holder
        free = is_free(doc, now)
        if not mine and not free:
            self._lost()
            return
        if self._away_from_site():
            # A site node on its fallback (the central server) must not lead
            # there: it would place its site's programs a second time, beside
            # the relay's leader, and drop the central ones (in_scope).
            if mine:
                self.lease.release()
            self._lost()
            return
        current = (doc or {}).get("assignments")
        current = current if isinstance(current, dict) else {}
        assignments = self.schedule(current, now)
        if not self.lease.acquire(known=doc, assignments=assignments, scheduled=now):
            self._lost()
            return
        if not self.leader:
            log.info("placement: this node schedules now (lease epoch %s)", self.lease.epoch)
        self.leader = True
        self.last_error = None
        self._follow(self.lease.doc)
        if self.on_lead is not None:
            self.on_lead(self.lease.epoch)

    def _lost(self) -> None:
        if self.leader:
            log.info("placement: another node schedules now")
        self.leader = False

    def schedule(self, current: Mapping[str, Any], now: float) -> Assignments:
        """The leader's step: new assignments from every node's status."""
        with self._lock:
            placed = dict(self.placed)
        if not placed and not current:
            # Nothing placed, nothing assigned: the answer is {} whatever the
            # nodes say, so skip reading every status and node document (in a
            # fleet of thousands, most of a leader's heartbeat).  A placed
            # document arriving on the feed wakes us (note()).
            return {}
        statuses = self._prefixed(STATUS_PREFIX)
        node_docs = self._prefixed(NODE_PREFIX)
        unknown = [doc_id for doc_id in current if doc_id not in placed]
        carried = unknown[LOOKUPS:]
        for doc_id in unknown[:LOOKUPS]:
            # Not seen on our feed (yet): we just became the leader, or it was
            # deleted.  Ask, rather than drop a program that runs fine.
            try:
                found = self.code_db.get(doc_id)
            except CouchError as exc:
                log.warning("placement: cannot look up %s: %s", doc_id, exc)
                carried.append(doc_id)
                continue
            if found is not None and codedoc.is_placed(found):
                placed[doc_id] = found
                self.note(found)
        nodes = nodes_from_docs(statuses, node_docs, now)
        site = self._site(node_docs)
        programs, nodes = in_scope(placed.values(), nodes, site)
        if len(programs) < len(placed):
            log.debug("placement: %d placed programs belong to another site",
                      len(placed) - len(programs))
        result = assign(programs, nodes, current, now)
        result.update({doc_id: current[doc_id] for doc_id in carried})
        changed = {d for d in set(result) | set(current) if result.get(d) != current.get(d)}
        for doc_id in sorted(changed):
            entry = result.get(doc_id) or {}
            log.info("placement: %s on %s%s", doc_id, entry.get("nodes", "no node (deleted)"),
                     "; " + entry["problem"] if entry.get("problem") else "")
        return result

    def _away_from_site(self) -> bool:
        """True for a site node using another server than its first (its relay).

        Costs a read of ``node:<mac>`` per beat, only while on a fallback.
        """
        couch = self.status_db.couch
        if couch.current is couch.servers[0]:
            return False
        return self._site([self.status_db.get(node_id(self.node)) or {}]) is not None

    def _site(self, node_docs: list[Doc]) -> Optional[str]:
        """This node's edge site (its ``site`` label), or None."""
        mine = node_id(self.node)
        for doc in node_docs:
            if doc.get("_id") == mine:
                labels = doc.get("labels")
                value = labels.get(SITE_LABEL) if isinstance(labels, dict) else None
                return str(value) if value else None
        return None

    def _prefixed(self, prefix: str) -> list[Doc]:
        rows = self.status_db.all_docs(startkey=prefix, endkey=prefix + "\ufff0",
                                       include_docs=True)
        return [row["doc"] for row in rows if row.get("doc")]

    def _follow(self, doc: Optional[Doc]) -> None:
        """A fresh read of the lease document: run what it assigns to us, if it fits."""
        assignments = (doc or {}).get("assignments")
        assigned = assigned_to(assignments, self.node)
        mine = self._fitting(assigned, assignments, (doc or {}).get("holder"))
        now = time.monotonic()
        with self._lock:
            self.last_read = now
            if self._stale(now):
                return  # no heartbeat written lately: the leader may think us dead
            changed = mine != self.mine or self.fenced
            if self.fenced:
                log.info("placement: in touch again; running the assignment")
            self.fenced, self.mine = False, mine
        if changed:
            self.on_assigned(mine, None)

    def _fitting(self, assigned: frozenset[str], assignments: Any,
                 holder: Any) -> frozenset[str]:
        """The programs of ``assigned`` this node's labels and resources fit.

        Defence in depth: the assignments are whatever the lease holder
        wrote, and the holder may be a compromised node.  Labels are checked
        every time (a program stops when they no longer fit); resources only
        before a program starts, since a running one uses them itself.  An
        entry naming more nodes than the document's ``replicas`` runs on
        the first ``replicas`` of them only (the scheduler never names more).
        """
        with self._lock:
            docs = {doc_id: self.placed.get(doc_id) for doc_id in assigned}
            running = self.mine
        self.assigned = assigned
        fitting: set[str] = set()
        refused: dict[str, str] = {}
        info: Optional[NodeInfo] = None
        labels_read = False
        ram_taken = disk_taken = 0.0
        for doc_id in sorted(assigned):
            doc = docs[doc_id]
            if doc is None:
                continue  # not on our feed yet: note() wakes us when it comes
            try:
                want = wanted(doc)
            except ProgramError as exc:
                refused[doc_id] = f"its document is not valid: {exc}"
                continue
            if info is None or (want.labels and not labels_read):
                # The node document only when labels matter: one GET less a heartbeat.
                labels_read = bool(want.labels)
                info = self._own_info(labels_read)
            why = None
            place = _macs(assignments[doc_id].get("nodes")).index(self.node)
            if not want.has_labels(info):
                why = want.unfit(info)
            elif place >= want.replicas:
                refused[doc_id] = (
                    f"not run here: the assignment names more nodes than its {want.replicas} "
                    f"replica{'' if want.replicas == 1 else 's'}, this one as number "
                    f"{place + 1}")
                continue
            elif doc_id not in running and self.resources is not None:
                why = want.unfit(info, ram_taken, disk_taken)
                if why is None:  # what starts now takes its share from the next
                    ram_taken += want.ram_mb
                    disk_taken += want.disk_mb
            if why is None:
                fitting.add(doc_id)
                continue
            have = ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items())) or "none"
            if self.resources is not None:
                free, disk = info.memory_free_mb, info.disk_free_mb
                have += (f"; {'?' if free is None else f'{free:.0f}'} MB free RAM, "
                         f"{'?' if disk is None else f'{disk:.0f}'} MB free disk")
            refused[doc_id] = f"does not fit this node: {why} (this node has: {have})"
        for doc_id, reason in sorted(refused.items()):
            # Once per refusal, not per heartbeat: the figures in it change.
            if _gist(self.refused.get(doc_id)) != _gist(reason):
                log.warning("placement: refusing %s, which the scheduler lease assigns to "
                            "this node (lease holder %s): %s", doc_id, holder, reason)
        self.refused = refused
        return frozenset(fitting)

    def _own_info(self, labels: bool) -> NodeInfo:
        """This node's labels (its ``node:`` document) and resources, as the scheduler sees them."""
        node_doc = self.status_db.get(node_id(self.node)) if labels else None
        info = node_info(self.node, None, node_doc)
        info.state = "alive"
        figures = self.resources() if self.resources is not None else {}
        info.memory_used_mb = _number(figures.get("memory_used_mb"))
        info.memory_total_mb = _number(figures.get("memory_total_mb"))
        info.disk_free_mb = _number(figures.get("disk_free_mb"))
        return info

    def wake(self) -> None:
        self._poke.set()

    def after_stop(self) -> None:
        if self.leader:
            self.lease.release()
            self.leader = False

"""The scheduler: which nodes run which placed programs.  Pure: no server, no thread.

:class:`himbeere.fleet.placement.Placement` calls :func:`assign` while its
node holds ``lease:scheduler``, with the placed documents, the nodes as
:func:`nodes_from_docs` reads them from their status and ``node:`` documents,
and the assignments of the lease document (see that module for the document
and for fencing).

**Choosing a node.**  The leader reads every status document (health and
programs) and every ``node:<mac>`` document (labels).  A candidate is
``alive`` (:func:`himbeere.health.node_state`), has all the labels, and
has the RAM (``memory_total_mb - memory_used_mb``) and disk
(``disk_free_mb``) the document requires, less what placements made in the
same round already claimed.  Among candidates the least busy wins, ties to
the lower MAC id::

    busy = load (1 min) / cpus + 0.25 x programs + share of memory in use

where ``programs`` counts the node's running programs that are not placed
plus the placed programs assigned to it.  Assignments stay where they are
while their node is ``alive`` or ``suspect`` and has the labels: new nodes
cause no reshuffle.  A node that is ``dead``, ``stopped`` or unknown is
replaced at once.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from .. import health
from ..couch import Doc
from ..exceptions import ProgramError
from ..schema import NODE_PREFIX, STATUS_PREFIX, mac_of

#: What one program adds to a node's ``busy`` score.
PROGRAM_WEIGHT = 0.25
#: Node states whose placed programs stay where they are.
KEEP_STATES = ("alive", "suspect")
#: The ``problem`` of a placed program whose document says ``"enabled": false``.
DISABLED = 'disabled ("enabled": false): runs on no node until enabled again'


Assignments = dict[str, Doc]


# -- what a document asks for -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Wanted:
    """Where a placed program may run: its ``replicas``, ``labels``, ``requires``."""

    replicas: int = 1
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ram_mb: float = 0.0
    disk_mb: float = 0.0

    def has_labels(self, node: NodeInfo) -> bool:
        return all(node.labels.get(key) == value for key, value in self.labels.items())

    def unfit(self, node: NodeInfo, ram_taken: float = 0.0,
              disk_taken: float = 0.0) -> Optional[str]:
        """Why ``node`` cannot take it (None: it can), as a short phrase."""
        if node.state != "alive":
            return "not alive"
        if not self.has_labels(node):
            return "without " + ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        free = node.memory_free_mb
        if self.ram_mb and (free is None or free - ram_taken < self.ram_mb):
            return f"less than {self.ram_mb:g} MB free RAM"
        disk = node.disk_free_mb
        if self.disk_mb and (disk is None or disk - disk_taken < self.disk_mb):
            return f"less than {self.disk_mb:g} MB free disk"
        return None


def wanted(doc: Doc) -> Wanted:
    """Read ``replicas``, ``labels`` and ``requires``; :class:`ProgramError` if bad."""
    replicas = doc.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ProgramError(f"replicas: {replicas!r} is not allowed; allowed: a whole "
                           "number >= 0 (default 1)")
    labels = doc.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(v, str) for v in labels.values()):
        raise ProgramError(f"labels: {labels!r} is not allowed; allowed: an object of "
                           'strings, e.g. {"room": "lab1"}')
    requires = doc.get("requires") or {}
    if not isinstance(requires, dict):
        raise ProgramError(f"requires: {requires!r} is not allowed; allowed: an object "
                           'with ram_mb and/or disk_mb, e.g. {"ram_mb": 200}')
    for key, value in requires.items():
        if key not in ("ram_mb", "disk_mb"):
            raise ProgramError(f"requires: {key!r} is not allowed; allowed: ram_mb, disk_mb")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ProgramError(f"requires.{key}: {value!r} is not allowed; allowed: "
                               "megabytes, a number >= 0")
    return Wanted(replicas=replicas, labels=dict(labels),
                  ram_mb=float(requires.get("ram_mb", 0)),
                  disk_mb=float(requires.get("disk_mb", 0)))


# -- what a node offers -----------------------------------------------------------------
@dataclasses.dataclass
class NodeInfo:
    """One node as the scheduler sees it, from its status and ``node:`` documents."""

    node: int
    state: str = "alive"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    load: Optional[float] = None
    cpus: Optional[int] = None
    memory_used_mb: Optional[float] = None
    memory_total_mb: Optional[float] = None
    disk_free_mb: Optional[float] = None
    #: Running programs that are not placed.
    programs: int = 0
    #: Placed programs with a live process on this node.
    placed: frozenset[str] = frozenset()

    @property
    def memory_free_mb(self) -> Optional[float]:
        if self.memory_total_mb is None or self.memory_used_mb is None:
            return None
        return self.memory_total_mb - self.memory_used_mb

    def busy(self, placed: int = 0) -> float:
        """The score: lower is less busy (see the module docstring)."""
        load = (self.load or 0.0) / max(1, self.cpus or 1)
        memory = 0.0
        if self.memory_total_mb and self.memory_used_mb is not None:
            memory = self.memory_used_mb / self.memory_total_mb
        return load + PROGRAM_WEIGHT * (self.programs + placed) + memory

    def figures(self, placed: int = 0) -> str:
        """``load 0.12 on 4 cpus, 1 program, 812 MB free``"""
        count = self.programs + placed
        parts = [f"load {self.load if self.load is not None else '?'}"
                 + (f" on {self.cpus} cpus" if self.cpus else ""),
                 f"{count} program{'' if count == 1 else 's'}"]
        free = self.memory_free_mb
        parts.append(f"{free:.0f} MB free" if free is not None else "free RAM unknown")
        return ", ".join(parts)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def node_info(mac: int, status: Optional[Doc], node_doc: Optional[Doc],
              now: Optional[float] = None) -> NodeInfo:
    """A :class:`NodeInfo` from a node's status document and its ``node:`` document."""
    status = status or {}
    load = status.get("load")
    programs = status.get("programs") if isinstance(status.get("programs"), dict) else {}
    assert isinstance(programs, dict)
    running = {doc_id: p for doc_id, p in programs.items()
               if isinstance(p, dict) and p.get("pid")}
    labels = (node_doc or {}).get("labels")
    cpus = status.get("cpus")
    return NodeInfo(
        node=mac,
        state=health.node_state(status or None, now),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        load=_number(load[0]) if isinstance(load, list) and load else None,
        cpus=cpus if isinstance(cpus, int) and not isinstance(cpus, bool) else None,
        memory_used_mb=_number(status.get("memory_used_mb")),
        memory_total_mb=_number(status.get("memory_total_mb")),
        disk_free_mb=_number(status.get("disk_free_mb")),
        programs=sum(1 for p in running.values() if not p.get("placed")),
        placed=frozenset(doc_id for doc_id, p in running.items() if p.get("placed")),
    )


def nodes_from_docs(statuses: Iterable[Doc], node_docs: Iterable[Doc],
                    now: Optional[float] = None) -> dict[int, NodeInfo]:
    """Every node with a status document, from ``status:<mac>`` and ``node:<mac>``."""
    labels = {}
    for doc in node_docs:
        mac = mac_of(str(doc.get("_id", "")), NODE_PREFIX)
        if mac is not None:
            labels[mac] = doc
    nodes = {}
    for doc in statuses:
        mac = mac_of(str(doc.get("_id", "")), STATUS_PREFIX)
        if mac is not None:
            nodes[mac] = node_info(mac, doc, labels.get(mac), now)
    return nodes


# -- sites ---------------------------------------------------------------------------------
#: The node label that puts a node in an edge site (``himbeere-upload site add``).
SITE_LABEL = "site"


def in_scope(placed_docs: Iterable[Doc], nodes: Mapping[int, NodeInfo],
             site: Optional[str]) -> tuple[list[Doc], dict[int, NodeInfo]]:
    """The placed programs and the nodes that a leader in ``site`` places (None: no site).

    Leases do not cross a site's WAN link (a lease's one holder is a promise
    of one server's clock), so a site's relay elects a leader of its own,
    and the central server another.  Each places only the programs made for
    its side -- a site's programs say ``labels: {"site": NAME}`` -- on its
    side's nodes.  Otherwise a program with one replica could run once on
    each side of a split.
    """
    def site_of(labels: Mapping[str, Any]) -> Optional[str]:
        value = labels.get(SITE_LABEL)
        return str(value) if value else None

    programs = []
    for doc in placed_docs:
        labels = doc.get("labels")
        if site_of(labels if isinstance(labels, dict) else {}) == site:
            programs.append(doc)
    mine = {mac: info for mac, info in nodes.items() if site_of(info.labels) == site}
    return programs, mine


def _gist(refusal: Optional[str]) -> Optional[str]:
    """A node's refusal of a placed program without the node's figures."""
    return None if refusal is None else refusal.split(" (this node has: ")[0]


def _macs(value: Any) -> list[int]:
    if not isinstance(value, list):
        return []
    return [int(v) for v in value if str(v).isdigit()]


# -- the scheduler's decision -------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    doc: Doc
    want: Optional[Wanted]
    old: Doc
    kept: list[int]
    gone: list[tuple[int, str]]
    draining: list[int]
    problem: Optional[str] = None
    #: Replicas to show when ``want`` is None (a disabled program).
    replicas: Optional[int] = None


def assign(placed_docs: Iterable[Doc], nodes: Union[Mapping[int, NodeInfo], Iterable[NodeInfo]],
           current: Optional[Mapping[str, Any]] = None,
           now: Optional[float] = None) -> Assignments:
    """The new assignments of ``placed_docs`` to ``nodes``, given the ``current`` ones.

    Pure: no server, no clock but ``now`` (server time, for ``since``).
    Documents missing from ``placed_docs`` lose their assignment.
    """
    now = time.time() if now is None else now
    if not isinstance(nodes, Mapping):
        nodes = {info.node: info for info in nodes}
    current = current or {}
    placed_count: Counter[int] = Counter()
    ram_taken: dict[int, float] = collections.defaultdict(float)
    disk_taken: dict[int, float] = collections.defaultdict(float)
    plans: dict[str, _Plan] = {}
    # First what stays, everywhere: it counts when the new ones are placed.
    for doc in sorted(placed_docs, key=lambda d: str(d.get("_id"))):
        doc_id = str(doc.get("_id"))
        old = current.get(doc_id)
        old = old if isinstance(old, dict) else {}
        try:
            want: Optional[Wanted] = wanted(doc)
        except ProgramError as exc:
            plans[doc_id] = _Plan(doc, None, old, [], [], [], problem=str(exc))
            continue
        assert want is not None
        if doc.get("enabled") is False:
            # Stopped by its user (himbeere stop): it holds no node, so it
            # weighs on no node's choice; enabled again, it is placed anew.
            plans[doc_id] = _Plan(doc, None, old, [], [], [], problem=DISABLED,
                                  replicas=want.replicas)
            continue
        plan = _Plan(doc, want, old, [], [], [])
        leaving = []
        for mac in _macs(old.get("nodes")):
            info = nodes.get(mac)
            state = info.state if info else "unknown"
            if info is None or state not in KEEP_STATES:
                plan.gone.append((mac, state))
            elif not want.has_labels(info):
                leaving.append(mac)
            else:
                plan.kept.append(mac)
        if len(plan.kept) > want.replicas:
            plan.kept.sort(key=lambda m: (nodes[m].busy(), m))
            leaving += plan.kept[want.replicas:]
            del plan.kept[want.replicas:]
        for mac in leaving + _macs(old.get("draining")):
            info = nodes.get(mac)
            if (info is not None and info.state in KEEP_STATES and doc_id in info.placed
                    and mac not in plan.kept and mac not in plan.draining):
                plan.draining.append(mac)
        placed_count.update(plan.kept)
        plans[doc_id] = plan
    return {doc_id: _place(doc_id, plan, nodes, placed_count, ram_taken, disk_taken, now)
            for doc_id, plan in plans.items()}


def _place(doc_id: str, plan: _Plan, nodes: Mapping[int, NodeInfo], placed_count: Counter[int],
           ram_taken: dict[int, float], disk_taken: dict[int, float], now: float) -> Doc:
    old_why = plan.old.get("why") if isinstance(plan.old.get("why"), dict) else {}
    old_since = plan.old.get("since") if isinstance(plan.old.get("since"), dict) else {}
    assert isinstance(old_why, dict) and isinstance(old_since, dict)
    why = {str(m): old_why.get(str(m)) or "kept" for m in plan.kept}
    since = {str(m): old_since.get(str(m), now) for m in plan.kept}
    entry: Doc = {"name": plan.doc.get("name") or doc_id,
                  "replicas": plan.want.replicas if plan.want else plan.replicas,
                  "nodes": list(plan.kept), "why": why, "since": since,
                  "draining": list(plan.draining), "problem": plan.problem}
    want = plan.want
    if want is None:
        return entry
    free = want.replicas - len(plan.kept) - len(plan.draining)
    rejected: Counter[str] = Counter()
    if free > 0:
        candidates = []
        for mac in sorted(nodes):
            info = nodes[mac]
            if mac in plan.kept or mac in plan.draining:
                continue
            reason = want.unfit(info, ram_taken[mac], disk_taken[mac])
            if reason:
                rejected[reason] += 1
            else:
                candidates.append(info)
        candidates.sort(key=lambda i: (i.busy(placed_count[i.node]), i.node))
        gone = list(plan.gone)
        for info in candidates[:free]:
            mac = info.node
            text = f"least busy of {len(candidates)}: {info.figures(placed_count[mac])}"
            if gone:
                old_mac, state = gone.pop(0)
                text = f"moved from {old_mac} ({state}); {text}"
            entry["nodes"].append(mac)
            why[str(mac)] = text
            since[str(mac)] = now
            placed_count[mac] += 1
            ram_taken[mac] += want.ram_mb
            disk_taken[mac] += want.disk_mb
    missing = want.replicas - len(entry["nodes"])
    if missing > 0:
        reasons = []
        if plan.draining:
            reasons.append("waiting for " + ", ".join(str(m) for m in plan.draining)
                           + " to stop it")
        if rejected or not plan.draining:
            others = ", ".join(f"{count} {reason}" for reason, count in sorted(rejected.items()))
            reasons.append("no other node fits" + (f" ({others})" if others else
                                                   " (no nodes known)"))
        entry["problem"] = (f"{len(entry['nodes'])} of {want.replicas} replicas placed: "
                            + "; ".join(reasons))
    return entry


def assigned_to(assignments: Any, node: int) -> frozenset[str]:
    """The placed programs ``assignments`` gives ``node``."""
    if not isinstance(assignments, dict):
        return frozenset()
    return frozenset(doc_id for doc_id, entry in assignments.items()
                     if isinstance(entry, dict) and node in _macs(entry.get("nodes")))

"""Staged rollouts: a new release goes out in waves; a failure rolls it back.

``himbeere-upload push PATH --rollout 1,25%,100% --healthy-for 60s`` writes
the program's documents with ``"rollout": "rollout:<name>:<n>"`` and
``"previous_release"``, and creates this document in the status database::

    {"_id": "rollout:blink:000003", "type": "himbeere-rollout",
     "name": "blink", "release": 3, "previous_release": 2,
     "docs": ["placed:blink"],            # the program documents of the release
     "waves": ["1", "25%", "100%"],       # cumulative: counts or percentages
     "healthy_for": 60.0,                 # seconds each wave must run cleanly
     "state": "running",                  # RolloutState
     "nodes": [1001, 1002, 1003, 1004],   # the order in which nodes are admitted
     "wave": 1,                           # index of the wave under way (-1: none yet)
     "wave_started": ["2026-...Z", "2026-...Z"],
     "admitted": {"1001": "2026-...Z", "1002": "2026-...Z"},
     "health": {"1001": {"since": "2026-...Z", "restarts": 0, "state": "running",
                         "release": 3, "healthy": true}},
     "failure": null,     # or {"mac", "doc", "state", "error", "at", "why"}
     "requested": null,   # or {"action": "pause"|"resume"|"abort", "by", "at"}
     "created": "...", "created_by": "alice", "updated": "...", "finished": null,
     "driver": {"holder": "1001", "epoch": 4}}

**Who drives it.**  The node holding ``lease:scheduler`` calls
:meth:`Driver.drive` at each of its heartbeats (:mod:`.placement`).  Each
step is :func:`step`, a pure function of the rollout document, the nodes'
``status:<mac>`` documents and the server's clock; the result is written
back with the document's ``_rev`` (compare-and-swap), so two leaders never
both advance it.  Everything lives in the document: a new leader goes on
where the old one stopped.

**The rules.**  Wave ``k`` admits the first ``waves[k]`` nodes of ``nodes``
(a percentage of all of them, rounded up), once every node admitted before
has run the new release for ``healthy_for`` seconds, in state ``running``,
with no restart, while heartbeating (its last heartbeat came after the
``healthy_for`` had passed).  A failure of an admitted node (its program
``crashed``, ``invalid``, ``rejected`` or ``backing-off``, its restart count
grew, or the node is ``dead``) halts the rollout: ``rolled-back``, with the
node and the error.  Nodes are those whose status lists one of ``docs``;
one that shows up later is appended to ``nodes`` (and admitted at once in
the last wave).  While ``paused``, no new wave starts, yet failures still
roll back.  ``done``, ``rolled-back`` and ``aborted`` are final.

Each node decides itself what it runs from this document
(:mod:`himbeere.fleet.gate`).

**A daemon rollout** (``himbeere-upload upgrade --wheel W --rollout ...``)
is the same document with ``"kind": "daemon"`` (:data:`DAEMON_KIND`; a
program rollout has no ``kind``), the id ``rollout:daemon:<version>``
(:func:`daemon_rollout_id`), ``"name": "daemon"``, the version as
``release`` (a string), the version ``daemon:current`` named before as
``previous_release`` and ``"docs": ["daemon:current"]``.  Its nodes are
those whose status ``upgrade`` field ``wants`` the version (the upgrader
says so once the release is for it, and waits: :mod:`himbeere.upgrade`).
An admitted node is healthy once its status shows ``daemon_version`` the
release, in state ``running``, for ``healthy_for``; it failed when its
launcher reverted the version (status ``upgrade``: ``state`` ``reverted``,
``version`` the release) or it is ``dead``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

from .. import health
from ..couch import Database, Doc
from ..exceptions import Conflict, CouchError
from ..logtext import EscapedArguments
from ..schema import (
    DAEMON_CURRENT_ID,
    ROLLOUT_PREFIX,
    ROLLOUT_TYPE,
    STATUS_PREFIX,
    ProgramState,
    RolloutState,
    iso,
    mac_of,
    node_id,
    parse_iso,
)

log = logging.getLogger(__name__)
log.addFilter(EscapedArguments())

#: States after which nothing changes any more; nodes stop reading the document.
FINAL = frozenset({RolloutState.DONE.value, RolloutState.ROLLED_BACK.value,
                   RolloutState.ABORTED.value})
#: A program entry in one of these states on an admitted node halts the rollout.
FAILED_STATES = frozenset({ProgramState.CRASHED.value, ProgramState.INVALID.value,
                           ProgramState.REJECTED.value, ProgramState.BACKING_OFF.value})
#: States that count as running cleanly (a program may end by itself).
GOOD_STATES = frozenset({ProgramState.RUNNING.value, ProgramState.FINISHED.value})
#: ``kind`` of a daemon rollout (a program rollout has none).
DAEMON_KIND = "daemon"
DAEMON_NAME = "daemon"


def daemon_rollout_id(version: str) -> str:
    """The rollout of daemon release ``version``: ``rollout:daemon:<version>``."""
    return f"{ROLLOUT_PREFIX}{DAEMON_NAME}:{version}"


def is_daemon(rollout: Optional[Mapping[str, Any]]) -> bool:
    """True for the rollout of a daemon release (``kind`` ``daemon``)."""
    return bool(rollout) and (rollout or {}).get("kind") == DAEMON_KIND


def daemon_rollout(version: str, previous: Optional[str], waves: list[str],
                   healthy_for: float, user: Optional[str], now: str) -> Doc:
    """A new daemon rollout document (what ``himbeere-upload upgrade --rollout`` writes)."""
    return {"_id": daemon_rollout_id(version), "type": ROLLOUT_TYPE, "kind": DAEMON_KIND,
            "name": DAEMON_NAME, "release": version, "previous_release": previous,
            "docs": [DAEMON_CURRENT_ID], "waves": waves, "healthy_for": healthy_for,
            "state": RolloutState.RUNNING.value, "nodes": [], "wave": -1, "wave_started": [],
            "admitted": {}, "health": {}, "failure": None, "requested": None,
            "created": now, "created_by": user, "updated": now, "finished": None,
            "driver": None}


# -- waves -------------------------------------------------------------------------------
def wave_size(wave: str, total: int) -> int:
    """How many nodes, cumulatively, wave ``wave`` ("3" or "25%") covers of ``total``."""
    text = str(wave).strip()
    if text.endswith("%"):
        return min(total, math.ceil(float(text[:-1]) * total / 100.0 - 1e-9))
    return min(total, int(text))


def is_final(rollout: Optional[Mapping[str, Any]]) -> bool:
    return bool(rollout) and str(rollout.get("state")) in FINAL  # type: ignore[union-attr]


def admitted(rollout: Optional[Mapping[str, Any]], node: int) -> bool:
    """True when ``node`` is let to run the rollout's release."""
    marks = (rollout or {}).get("admitted")
    return isinstance(marks, dict) and str(node) in marks


# -- one step ----------------------------------------------------------------------------
def step(rollout: Doc, statuses: Mapping[int, Doc], now: float) -> Doc:
    """The rollout after one look at the nodes' ``statuses`` at ``now`` (pure).

    Returns a new document (the input is not changed); equal to the input
    when nothing happened.
    """
    doc = _copy(rollout)
    if str(doc.get("state")) in FINAL:
        return doc
    docs = [str(d) for d in doc.get("docs") or []]
    if is_daemon(doc):
        _discover_daemon(doc, statuses)
        failure = _check_daemon(doc, statuses, now)
    else:
        _discover(doc, statuses, docs)
        failure = _check_admitted(doc, statuses, docs, now)
    if failure is not None:
        failure["at"] = iso(now)
        doc.update(state=RolloutState.ROLLED_BACK.value, failure=failure, finished=iso(now))
        return doc
    if str(doc.get("state")) != RolloutState.RUNNING.value:
        return doc  # paused: no new wave
    _advance(doc, now)
    return doc


def _copy(rollout: Mapping[str, Any]) -> Doc:
    doc = dict(rollout)
    for key in ("admitted", "health"):
        doc[key] = {k: (dict(v) if isinstance(v, dict) else v)
                    for k, v in (rollout.get(key) or {}).items()}
    doc["nodes"] = [int(n) for n in rollout.get("nodes") or []]
    doc["wave_started"] = list(rollout.get("wave_started") or [])
    doc.setdefault("wave", -1)
    return doc


def entry_of(status: Optional[Mapping[str, Any]], docs: Iterable[str]) -> Optional[tuple[str, Doc]]:
    """The first program entry of ``docs`` in a node's status, with its doc id."""
    programs = (status or {}).get("programs")
    if not isinstance(programs, dict):
        return None
    for doc_id in docs:
        entry = programs.get(doc_id)
        if isinstance(entry, dict):
            return doc_id, entry
    return None


def _discover(doc: Doc, statuses: Mapping[int, Doc], docs: list[str]) -> None:
    """Append the nodes that list one of the documents and are not known yet."""
    known = set(doc["nodes"])
    new = sorted(mac for mac, status in statuses.items()
                 if mac not in known and entry_of(status, docs) is not None
                 and status.get("state") != "stopped")
    doc["nodes"].extend(new)


def _check_admitted(doc: Doc, statuses: Mapping[int, Doc], docs: list[str],
                    now: float) -> Optional[Doc]:
    """Update each admitted node's health; the first failure found, or None."""
    release = doc.get("release")
    healthy_for = float(doc.get("healthy_for") or 0.0)
    for key in sorted(doc["admitted"], key=lambda k: doc["admitted"][k]):
        mac = int(key)
        status = statuses.get(mac)
        seen: Doc = doc["health"].setdefault(key, {"since": None, "restarts": None,
                                                   "healthy": False})
        state = health.node_state(status, now)
        seen["node"] = state
        if state == "dead":
            age = health.heartbeat_age(status or {}, now)
            return {"mac": mac, "doc": None, "state": "dead", "error": None,
                    "why": f"node {mac} is dead: no heartbeat for {age or 0:.0f} s"}
        found = entry_of(status, docs)
        if found is None:
            seen["healthy"] = seen.get("since") is not None  # it ran; its program left
            continue
        doc_id, entry = found
        running = entry.get("release")
        seen.update(state=entry.get("state"), release=running)
        if running != release:
            seen["healthy"] = False
            continue  # not switched yet
        count = entry.get("restarts")
        restarts = count if isinstance(count, int) else 0
        if seen.get("restarts") is None:
            seen["restarts"] = restarts
        program_state = str(entry.get("state"))
        why = None
        if program_state in FAILED_STATES:
            why = f"its program {doc_id} is {program_state} on node {mac}"
        elif restarts > int(seen["restarts"]):
            why = f"its program {doc_id} restarted on node {mac} ({restarts} restarts)"
        if why is not None:
            return {"mac": mac, "doc": doc_id, "state": program_state,
                    "error": entry.get("last_error"), "why": why}
        if program_state not in GOOD_STATES:
            seen["healthy"] = False
            continue
        if seen.get("since") is None:
            seen["since"] = iso(now)
        since = parse_iso(seen["since"])
        beat = (status or {}).get("heartbeat_server_time")
        seen["healthy"] = (now - since >= healthy_for and isinstance(beat, (int, float))
                           and float(beat) >= since + healthy_for)
    return None


def upgrade_of(status: Optional[Mapping[str, Any]]) -> Doc:
    """A node status's ``upgrade`` field (the upgrader's), or {}."""
    upgrade = (status or {}).get("upgrade")
    return upgrade if isinstance(upgrade, dict) else {}


def _discover_daemon(doc: Doc, statuses: Mapping[int, Doc]) -> None:
    """Append the nodes whose upgrader wants the release and are not known yet."""
    known = set(doc["nodes"])
    version = doc.get("release")
    new = sorted(mac for mac, status in statuses.items()
                 if mac not in known and upgrade_of(status).get("wants") == version
                 and status.get("state") != "stopped")
    doc["nodes"].extend(new)


def _check_daemon(doc: Doc, statuses: Mapping[int, Doc], now: float) -> Optional[Doc]:
    """Each admitted node's health for a daemon release; the first failure, or None."""
    version = doc.get("release")
    healthy_for = float(doc.get("healthy_for") or 0.0)
    for key in sorted(doc["admitted"], key=lambda k: doc["admitted"][k]):
        mac = int(key)
        status = statuses.get(mac) or {}
        seen: Doc = doc["health"].setdefault(key, {"since": None, "healthy": False})
        state = health.node_state(status, now)
        running = status.get("daemon_version")
        seen.update(node=state, release=running, state=status.get("state"))
        upgrade = upgrade_of(status)
        if upgrade.get("state") == "reverted" and upgrade.get("version") == version:
            reason = upgrade.get("reason")
            return {"mac": mac, "doc": DAEMON_CURRENT_ID, "state": "reverted", "error": reason,
                    "why": f"node {mac} reverted daemon {version}: {reason}"}
        if state == "dead":
            age = health.heartbeat_age(status, now)
            return {"mac": mac, "doc": None, "state": "dead", "error": None,
                    "why": f"node {mac} is dead: no heartbeat for {age or 0:.0f} s"}
        if running != version or status.get("state") != "running":
            seen["healthy"] = False  # not switched yet, or between two daemons
            continue
        if seen.get("since") is None:
            seen["since"] = iso(now)
        since = parse_iso(seen["since"])
        beat = status.get("heartbeat_server_time")
        seen["healthy"] = (now - since >= healthy_for and isinstance(beat, (int, float))
                           and float(beat) >= since + healthy_for)
    return None


def _advance(doc: Doc, now: float) -> None:
    """Admit the next wave once every admitted node is healthy; or finish."""
    nodes: list[int] = doc["nodes"]
    waves = [str(w) for w in doc.get("waves") or ["100%"]]
    wave = int(doc.get("wave", -1))
    if not nodes:
        return  # nobody runs it yet: wait for the first status that lists it
    last = len(waves) - 1
    if wave == last:
        _admit(doc, nodes, now)  # late comers join the last wave at once
    if not all(doc["health"].get(k, {}).get("healthy") for k in doc["admitted"]):
        return
    if wave == last:
        doc.update(state=RolloutState.DONE.value, finished=iso(now))
        return
    wave += 1
    doc["wave"] = wave
    doc["wave_started"].append(iso(now))
    target = len(nodes) if wave == last else max(1, wave_size(waves[wave], len(nodes)))
    _admit(doc, nodes[:target], now)


def _admit(doc: Doc, nodes: list[int], now: float) -> None:
    for mac in nodes:
        if str(mac) not in doc["admitted"]:
            doc["admitted"][str(mac)] = iso(now)


# -- the leader's driver -----------------------------------------------------------------
class Driver:
    """Steps every rollout that is not final; run by the ``lease:scheduler`` holder."""

    def __init__(self, status_db: Database, holder: str,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.status_db = status_db
        self.holder = holder
        self.clock = clock or time.time

    def drive(self, epoch: int = 0) -> int:
        """One heartbeat of the leader; returns how many rollouts it moved on."""
        rollouts = [doc for doc in _prefixed(self.status_db, ROLLOUT_PREFIX)
                    if not is_final(doc)]
        if not rollouts or self._in_a_site():
            return 0
        statuses = {}
        for status in _prefixed(self.status_db, STATUS_PREFIX):
            mac = mac_of(str(status.get("_id")), STATUS_PREFIX)
            if mac is not None:
                statuses[mac] = status
        moved = 0
        for rollout in rollouts:
            moved += self._one(rollout, statuses, epoch)
        return moved

    def _in_a_site(self) -> bool:
        """True when this leader is a site's (label ``site``): it leaves rollouts alone.

        A rollout is one document that one leader moves on.  A site's relay
        has a copy (pulled from the centre) and a leader of its own; if both
        leaders stepped, their copies would split into a conflict.  So the
        central leader drives every rollout, site nodes included (their
        statuses reach it), and its admissions reach the site; during a WAN
        outage a site's waiting nodes stay on their release.  One GET a
        heartbeat, only while a rollout runs.
        """
        if not self.holder.isdigit():
            return False
        doc = self.status_db.get(node_id(int(self.holder))) or {}
        labels = doc.get("labels")
        return isinstance(labels, dict) and bool(labels.get("site"))

    def _one(self, rollout: Doc, statuses: Mapping[int, Doc], epoch: int) -> int:
        now = self.clock()
        new = step(rollout, statuses, now)
        if new == _copy(rollout):
            return 0
        new.update(updated=iso(now), driver={"holder": self.holder, "epoch": epoch})
        try:
            self.status_db.save(new)
        except Conflict:
            return 0  # changed meanwhile (a pause, another leader): next heartbeat
        except CouchError as exc:
            log.warning("rollout %s: cannot write: %s", rollout.get("_id"), exc)
            return 0
        _log_change(rollout, new)
        return 1


def _log_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    name = new.get("_id")
    if new.get("wave") != old.get("wave", -1):
        fresh = sorted(set(new["admitted"]) - set(old.get("admitted") or {}))
        log.info("rollout %s: wave %s of %s admits %s", name, int(new["wave"]) + 1,
                 len(new.get("waves") or []), ", ".join(fresh) or "no new node")
    if new.get("state") != old.get("state"):
        failure = new.get("failure") or {}
        log.log(logging.WARNING if failure else logging.INFO, "rollout %s: %s%s", name,
                new.get("state"), f": {failure.get('why')}" if failure else "")


def _prefixed(db: Database, prefix: str) -> list[Doc]:
    rows = db.all_docs(startkey=prefix, endkey=prefix + "\ufff0", include_docs=True)
    return [row["doc"] for row in rows if row.get("doc")]

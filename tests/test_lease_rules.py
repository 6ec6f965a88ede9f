"""A compromised node cannot take over scheduling or block elections (issue 9, section 1).

Node users (``node_user``) attack ``lease:*`` documents of the status
database over plain HTTP, with the current ``_rev``, the way node 1001 did
in the fault-injection run: take a live lease of another node, forge
``expires`` or ``ttl``, delete another node's lease, lock a program's group
election.  The server must answer 401/403 to each, and let every legal
path through: take an absent, released or expired lease, renew and release
one's own, delete one's own; an admin deletes any.  Times are the server's
(``validate_doc_update`` reads ``Date.now()``).

Then the daemon's own side: :class:`himbeere.fleet.lease.Lease` as node users,
and nodes that refuse placed programs that forged assignments give them.

Runs on pouchdb-server (default) and on Apache CouchDB
(``HIMBEERE_TEST_COUCH_URL``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests

from himbeere import defaults
from himbeere.couch import Couch, Doc, doc_path, quote
from himbeere.fleet import placement
from himbeere.fleet.lease import Lease, lease_id
from himbeere.fleet.placement import Placement
from tests.helpers import wait_for
from tests.nodes import Node
from uploader import ops
from uploader.fleet import Fleet

REFUSED = (401, 403)
NodeUserFactory = Callable[[], tuple[int, str]]


class Client:
    """Plain HTTP on the status database as one user, to see exact status codes."""

    def __init__(self, url: str, dbname: str) -> None:
        couch = Couch(url)
        self.base = couch.base
        self.auth = couch.auth
        self.db = dbname + defaults.STATUS_SUFFIX

    def url(self, doc_id: str) -> str:
        return f"{self.base}/{quote(self.db)}/{doc_path(doc_id)}"

    def get(self, doc_id: str) -> Optional[Doc]:
        answer = requests.get(self.url(doc_id), auth=self.auth, timeout=30)
        return answer.json() if answer.status_code == 200 else None

    def put(self, doc: Doc) -> int:
        answer = requests.put(self.url(doc["_id"]), json=doc, auth=self.auth, timeout=30)
        if answer.status_code in (200, 201):
            doc["_rev"] = answer.json()["rev"]
        return answer.status_code

    def delete(self, doc: Doc) -> int:
        return requests.delete(self.url(doc["_id"]), params={"rev": doc["_rev"]},
                               auth=self.auth, timeout=30).status_code

    def reason(self, doc: Doc) -> str:
        answer = requests.put(self.url(doc["_id"]), json=doc, auth=self.auth, timeout=30)
        return str(answer.json().get("reason"))


@pytest.fixture
def nodes(couch_url: str, dbname: str,
          node_user: NodeUserFactory) -> tuple[tuple[int, Client], tuple[int, Client], Client]:
    """(attacker, victim, admin): two node users and the admin on the status database."""
    (a, a_url), (b, b_url) = node_user(), node_user()
    return (a, Client(a_url, dbname)), (b, Client(b_url, dbname)), Client(couch_url, dbname)


def lease(name: str, holder: Any, ttl: Any = 30.0, **fields: Any) -> Doc:
    """A lease document as himbeere.fleet.lease writes it, ``ttl`` from now (our clock)."""
    now = time.time()
    return dict({"_id": lease_id(name), "type": "himbeere-lease", "name": name,
                 "holder": holder, "epoch": 1, "since": now,
                 "expires": now + (ttl if isinstance(ttl, (int, float)) else 30.0),
                 "ttl": ttl, "renewed": now}, **fields)


def current(client: Client, doc: Doc, **changes: Any) -> Doc:
    """The stored document with ``changes``, carrying its current ``_rev``."""
    stored = client.get(doc["_id"])
    assert stored is not None
    return dict(stored, **changes)


FORGED = {"agg": {"name": "agg", "replicas": 1, "nodes": [], "why": {}, "since": {},
                  "draining": [], "problem": None}}


# -- what a compromised node can no longer do ------------------------------------------------
def test_node_may_not_take_a_live_lease_held_by_another_node(nodes) -> None:
    (a, attacker), (b, victim), _admin = nodes
    held = lease("scheduler", str(b), assignments={})
    assert victim.put(held) == 201
    forged_assignments = {"agg": dict(FORGED["agg"], nodes=[a])}
    attacks = [
        # the attack of the fault-injection run
        current(victim, held, holder=f"{a}:x", expires=9e12, assignments=forged_assignments),
        # the same with a plausible expiry: the lease is live, so it is not free
        current(victim, held, holder=str(a), epoch=2, expires=time.time() + 30),
        current(victim, held, holder=f"{a}:x", expires=time.time() + 5, ttl=5.0),
        # "releasing" someone else's lease is taking it too
        current(victim, held, holder=None, expires=0.0),
        # keeping the holder's name but changing what the lease says
        current(victim, held, assignments=forged_assignments),
    ]
    for attack in attacks:
        assert attacker.put(attack) in REFUSED, attack
    assert "a lease changes hands only when it is free or expired" in attacker.reason(attacks[1])
    stored = victim.get(held["_id"])
    assert stored is not None and stored["holder"] == str(b) and stored["assignments"] == {}
    assert stored["_rev"] == held["_rev"]


def test_node_may_not_forge_expires_far_in_the_future(nodes) -> None:
    (a, attacker), _victim, _admin = nodes
    for expires in (9e12, time.time() + defaults.LEASE_MAX_TTL + 60, time.time() + 3600):
        assert attacker.put(lease("scheduler", str(a), expires=expires)) in REFUSED, expires
    assert attacker.put(lease("scheduler", str(a), expires="9e12")) in REFUSED
    assert attacker.put(lease("scheduler", None, expires=9e12)) in REFUSED  # "released"
    assert attacker.get(lease_id("scheduler")) is None
    # Renewing: the same rules hold for a lease it holds legally.
    mine = lease("scheduler", str(a))
    assert attacker.put(mine) == 201
    assert attacker.put(current(attacker, mine, expires=9e12)) in REFUSED
    assert "too far ahead" in attacker.reason(current(attacker, mine, expires=9e12))


def test_node_may_not_forge_a_huge_ttl(nodes) -> None:
    (a, attacker), _victim, _admin = nodes
    now = time.time()
    for ttl in (9e12, defaults.LEASE_MAX_TTL + 1, 0, -5, "30"):
        doc = lease("group:jobs", f"{a}:prog", expires=now + 10, ttl=ttl)
        assert attacker.put(doc) in REFUSED, ttl
    doc = lease("group:jobs", f"{a}:prog", expires=now + 10, ttl=9e12)
    assert f"at most {defaults.LEASE_MAX_TTL:g}" in attacker.reason(doc)
    # expires within the longest ttl, but further ahead than the lease's own ttl
    assert attacker.put(lease("group:jobs", f"{a}:prog", ttl=15.0,
                              expires=now + 600)) in REFUSED
    assert attacker.get(lease_id("group:jobs")) is None


def test_node_may_not_delete_another_nodes_lease(nodes) -> None:
    (a, attacker), (b, victim), admin = nodes
    live = lease("scheduler", str(b))
    assert victim.put(live) == 201
    assert attacker.delete(live) in REFUSED
    expired = lease("group:jobs", f"{b}:prog", ttl=10.0, expires=time.time() - 60)
    assert admin.put(expired) == 201
    assert attacker.delete(expired) in REFUSED  # expired, but still not the attacker's
    released = lease("group:other", None, expires=0.0)
    assert admin.put(released) == 201
    assert attacker.delete(released) in REFUSED
    for doc in (live, expired, released):
        assert victim.get(doc["_id"]) is not None
    # A deletion that carries a holder's name is refused all the same.
    assert attacker.put(current(victim, live, _deleted=True, holder=str(a))) in REFUSED
    assert victim.get(live["_id"]) is not None


def test_node_may_not_lock_another_programs_group_election(nodes) -> None:
    (a, attacker), (b, victim), _admin = nodes
    # Absent: the attacker may take it, but not for ever.
    assert attacker.put(lease("group:jobs2", f"{a}:x", expires=9e12)) in REFUSED
    assert attacker.put(lease("group:jobs2", f"{a}:x", ttl=9e12, expires=9e12)) in REFUSED
    # Held by the victim's program: the attacker cannot take it, nor lock it.
    held = lease("group:jobs2", f"{b}:jobs", ttl=15.0)
    assert victim.put(held) == 201
    assert attacker.put(current(victim, held, holder=f"{a}:x", expires=9e12)) in REFUSED
    assert attacker.put(current(victim, held, holder=f"{a}:x")) in REFUSED
    assert attacker.delete(current(victim, held)) in REFUSED
    assert (victim.get(held["_id"]) or {}).get("holder") == f"{b}:jobs"


# -- what every node still may do ------------------------------------------------------------
def test_legal_lease_paths_for_nodes_and_the_admin(nodes) -> None:
    (a, first), (b, second), admin = nodes
    # take an absent lease, in its own name or one of its programs'
    doc = lease("scheduler", str(a), ttl=30.0)
    assert first.put(doc) == 201
    assert first.put(lease("group:jobs", f"{a}:3:blink", ttl=15.0)) == 201
    # renew its own lease (expires may run a few seconds ahead: clock skew)
    doc.update(expires=time.time() + 30 + defaults.LEASE_CLOCK_SLACK / 2,
               renewed=time.time(), assignments={})
    assert first.put(doc) == 201
    # release it: the other node takes it at once
    doc.update(holder=None, expires=0.0)
    assert first.put(doc) == 201
    taken = current(first, doc, holder=str(b), epoch=2, expires=time.time() + 30)
    assert second.put(taken) == 201
    # take an expired lease of another node (expired on the server's clock)
    stale = lease("group:jobs3", f"{a}:prog", ttl=10.0, expires=time.time() - 30)
    assert admin.put(stale) == 201
    assert second.put(current(admin, stale, holder=f"{b}:prog",
                              expires=time.time() + 10)) == 201
    # delete its own lease, and take it again afterwards
    assert second.delete(current(second, taken)) == 200
    assert second.get(taken["_id"]) is None
    again = lease("scheduler", str(b))
    assert second.put(again) == 201
    # the admin deletes any, and may write anything
    assert admin.delete(current(admin, again)) == 200
    assert admin.put(lease("group:admin", "whoever", expires=9e12, ttl=9e12)) == 201
    assert admin.delete(current(admin, {"_id": lease_id("group:jobs")})) == 200


# -- the daemon's side: himbeere.fleet.lease as node users ----------------------------------------
def test_lease_takes_over_only_what_expired_on_the_servers_clock(
        couch_url: str, dbname: str, node_user: NodeUserFactory) -> None:
    (a, a_url), (b, b_url) = node_user(), node_user()
    status = dbname + defaults.STATUS_SUFFIX
    holder = Lease(Couch(a_url).database(status), "group:jobs", f"{a}:p", ttl=30.0)
    assert holder.acquire(node=a, program="p")
    # b's clock runs an hour ahead: it believes a's lease expired long ago
    ahead = Lease(Couch(b_url).database(status), "group:jobs", f"{b}:p", ttl=30.0,
                  clock=lambda: time.time() + 3600)
    assert not ahead.acquire(node=b, program="p")
    assert holder.acquire(node=a, program="p")  # a renews: still a's
    stored = Couch(couch_url).database(status).get(lease_id("group:jobs"))
    assert stored is not None and stored["holder"] == f"{a}:p" and stored["epoch"] == 1
    # a releases it: now b takes it, with its clock as it is
    holder.release()
    honest = Lease(Couch(b_url).database(status), "group:jobs", f"{b}:p", ttl=30.0)
    assert honest.acquire(node=b, program="p")
    assert honest.epoch == 2
    # a ttl beyond the longest allowed is capped, and the server accepts it
    long = Lease(Couch(a_url).database(status), "group:long", f"{a}:p", ttl=1e9)
    assert long.ttl == defaults.LEASE_MAX_TTL
    assert long.acquire()


# -- defence in depth: a node checks what the assignments give it ------------------------------
def test_node_refuses_a_forged_assignment_its_labels_or_resources_do_not_fit(
        couch_url: str, dbname: str, node_user: NodeUserFactory, node_factory,
        tmp_path: Path) -> None:
    fleet = Fleet(couch_url, dbname)
    (fit, fit_url), (wrong, wrong_url) = node_user(), node_user()
    ops.set_labels(fleet, fit, room="lab1")
    ops.set_labels(fleet, wrong, room="lab2")
    def code(events: Path) -> str:
        return ("import os, time\n"
                "def main():\n"
                f"    with open({str(events)!r}, 'a') as out:\n"
                "        out.write('%s %s\\n' % (node, os.getpid()))\n"
                "    while not should_quit():\n"
                "        time.sleep(0.05)\n")

    events = {name: tmp_path / f"events-{name}" for name in ("agg", "huge", "twice")}
    fleet.code.save({"_id": "agg", "type": placement.PLACED_TYPE, "name": "agg",
                     "labels": {"room": "lab1"}, "code": code(events["agg"])})
    fleet.code.save({"_id": "huge", "type": placement.PLACED_TYPE, "name": "huge",
                     "requires": {"ram_mb": 10**9}, "code": code(events["huge"])})
    fleet.code.save({"_id": "twice", "type": placement.PLACED_TYPE, "name": "twice",
                     "replicas": 1, "code": code(events["twice"])})
    # Written as admin: a scheduler lease that names both nodes for agg, the
    # fitting node for a program that needs a petabyte of RAM, and both nodes
    # for a program of one replica; held by a node that does not exist, so no
    # real scheduler overwrites it.
    now = time.time()
    fleet.status.save({"_id": lease_id(placement.LEASE_NAME), "type": "himbeere-lease",
                       "name": placement.LEASE_NAME, "holder": "999", "epoch": 1,
                       "expires": now + 3600, "ttl": 3600.0, "renewed": now,
                       "assignments": {
                           "agg": dict(FORGED["agg"], nodes=[fit, wrong]),
                           "huge": dict(FORGED["agg"], name="huge", nodes=[fit]),
                           "twice": dict(FORGED["agg"], name="twice", nodes=[wrong, fit])}})
    good = node_factory(mac_id=fit, url=fit_url)
    bad = node_factory(mac_id=wrong, url=wrong_url)

    def refused(node: Node, doc_id: str) -> Optional[str]:
        info = (node.status() or {}).get("placement") or {}
        return (info.get("refused") or {}).get(doc_id)

    good.wait_program("agg", timeout=40, state="running")
    reason = wait_for(lambda: refused(bad, "agg"), 40,
                      message=lambda: f"node {wrong} never refused agg:\n{bad.log()[-3000:]}")
    assert "room=lab1" in reason
    bad.wait_log("placement: refusing agg, which the scheduler lease assigns to this node")
    assert "room=lab1" in bad.log()
    huge = wait_for(lambda: refused(good, "huge"), 40,
                    message=lambda: f"node {fit} never refused huge:\n{good.log()[-3000:]}")
    assert "free RAM" in huge
    twice = wait_for(lambda: refused(good, "twice"), 40,
                     message=lambda: f"node {fit} never refused twice:\n{good.log()[-3000:]}")
    assert "names more nodes than its 1 replica, this one as number 2" in twice
    bad.wait_program("twice", timeout=40, state="running")
    assert bad.program("agg") == {}
    assert good.program("huge") == {} and good.program("twice") == {}

    def started(name: str) -> list[str]:
        path = events[name]
        return [line.split()[0] for line in path.read_text().splitlines()] \
            if path.exists() else []

    # one copy of each, where it fits
    assert (started("agg"), started("huge"), started("twice")) == ([str(fit)], [], [str(wrong)])


# -- the node's estimate of the server's clock ---------------------------------------------
def test_clock_offset_trusts_the_quickest_answers() -> None:
    """A busy server stamps ``Date`` when it finally answers: a slow answer says little.

    Found when the daemon's own leases first met the server's clock: under
    load, pouchdb-server queued requests for seconds, the offset (a median
    of all readings) ran 3 s ahead, and a node took over a lease that had
    not expired on the server's clock (the server refused it, rightly).
    """
    import email.utils

    couch = Couch("http://127.0.0.1:9")
    base = 1_800_000_000.0  # the server's clock equals ours
    # Six slow answers, stamped by the server at their very end ...
    for i in range(6):
        sent = base + 10 * i
        couch._note_clock(email.utils.formatdate(sent + 8.0, usegmt=True), sent, sent + 8.0)
    # ... and three quick ones.
    for i in range(3):
        sent = base + 100 + 10 * i
        couch._note_clock(email.utils.formatdate(sent + 0.02, usegmt=True), sent, sent + 0.05)
    offset = couch.clock_offset
    assert offset is not None and abs(offset) <= 0.6, offset


def test_placement_checks_each_assignment_against_the_node_itself(
        couch: Couch, dbname: str, caplog: pytest.LogCaptureFixture) -> None:
    """One heartbeat at a time (``Placement.loop``): what runs, what is refused, and why."""
    db = couch.database(dbname)
    figures = {"memory_used_mb": 200.0, "memory_total_mb": 1000.0, "disk_free_mb": 5000.0}
    got: list[frozenset[str]] = []
    node = Placement(db, db, 7, 1.0, lambda mine, hurry: got.append(mine),
                     resources=lambda: dict(figures))
    db.save({"_id": "node:7", "type": "himbeere-node", "node": 7, "labels": {"room": "lab1"}})
    docs = {"lab1": {"labels": {"room": "lab1"}}, "lab2": {"labels": {"room": "lab2"}},
            "small": {"requires": {"ram_mb": 500}}, "big": {"requires": {"ram_mb": 900}},
            "spare": {}}
    for doc_id, fields in docs.items():
        node.note(dict({"_id": doc_id, "type": placement.PLACED_TYPE, "name": doc_id},
                       **fields))
    entries = {doc_id: dict(FORGED["agg"], name=doc_id, nodes=[7]) for doc_id in docs}
    entries["spare"]["nodes"] = [8, 7]  # one replica, and we come second
    entries["unseen"] = dict(FORGED["agg"], name="unseen", nodes=[7])
    db.save({"_id": lease_id(placement.LEASE_NAME), "holder": "999", "expires": 9e12,
             "assignments": entries})
    caplog.set_level("WARNING", logger="himbeere.fleet.placement")
    node.loop()
    assert got == [frozenset({"lab1", "small"})]
    assert sorted(node.refused) == ["big", "lab2", "spare"]
    assert node.refused["lab2"].startswith("does not fit this node: without room=lab2 "
                                           "(this node has: room=lab1; 800 MB free RAM")
    assert node.refused["big"].startswith("does not fit this node: less than 900 MB free RAM")
    assert "this one as number 2" in node.refused["spare"]
    assert node.describe()["placement"]["refused"] == node.refused
    assert len(caplog.records) == 3
    # Running programs keep their RAM; new figures alone log nothing new.
    figures["memory_used_mb"] = 900.0
    node.loop()
    assert got == [frozenset({"lab1", "small"})] and len(caplog.records) == 3
    # The node leaves lab1: lab1 stops, whatever the assignments say.
    db.save(dict(db.get("node:7"), labels={"room": "lab2"}))
    node.loop()
    assert got[-1] == frozenset({"small", "lab2"}) and "lab1" in node.refused

"""Placement and failover: placed programs, the scheduler under its lease, fencing.

The scheduler's decision alone is in tests/test_scheduler.py.  The first
tests here call the :class:`~himbeere.fleet.placement.Placement` loop
directly; the others run real node daemons (``node_factory``, heartbeat
every second) on the real server.
Placed test programs take an exclusive ``flock`` on a shared file while they
run and write ``<node> <pid> start`` / ``stop`` lines: all simulated nodes
share this machine, so a second instance running at the same time finds the
lock taken and writes ``OVERLAP``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere.couch import Couch, Database, Doc, design
from himbeere.fleet import placement
from himbeere.fleet.lease import lease_id
from himbeere.fleet.placement import Placement
from tests.helpers import wait_for
from tests.nodes import ROOT, Node, pid_alive, start_nodes
from tests.test_scheduler import placed
from uploader import install, ops
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
SCHEDULER = lease_id(placement.LEASE_NAME)


# -- the lease: one scheduler ------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_status(db: Database, mac: int, now: float, **fields: Any) -> None:
    doc = dict({"_id": f"status:{mac}", "state": "running", "heartbeat_server_time": now,
                "heartbeat_interval": 1.0, "programs": {}}, **fields)
    current = db.get(doc["_id"])
    if current:
        doc["_rev"] = current["_rev"]
    db.save(doc)


def test_a_stale_leader_cannot_write_assignments(couch: Couch, dbname: str) -> None:
    status_db, code_db = couch.database(dbname), couch.database(dbname)
    clock = Clock()
    got: dict[int, list[frozenset[str]]] = {1: [], 2: []}
    a = Placement(status_db, code_db, 1, 1.0, lambda mine, hurry: got[1].append(mine),
                  clock=clock)
    b = Placement(status_db, code_db, 2, 1.0, lambda mine, hurry: got[2].append(mine),
                  clock=clock)
    for mac in (1, 2):
        fake_status(status_db, mac, clock.now, programs={"x": {"pid": 1}} if mac == 2 else {})
    a.note(placed("p"))
    b.note(placed("p"))
    a.loop()
    b.loop()
    assert a.leader and not b.leader
    lease = status_db.get(SCHEDULER)
    assert lease["holder"] == "1" and lease["epoch"] == 1
    assert lease["assignments"]["p"]["nodes"] == [1]  # node 2 runs another program
    assert got == {1: [frozenset({"p"})], 2: []}

    # a stops renewing (frozen); once the lease expired, b takes over, and once
    # node 1 is dead (6 intervals without a heartbeat) b moves the program.
    clock.now += 6.5
    fake_status(status_db, 2, clock.now)
    b.loop()
    assert b.leader
    assert status_db.get(SCHEDULER)["epoch"] == 2
    assert status_db.get(SCHEDULER)["assignments"]["p"]["nodes"] == [2]  # 1 is dead now
    assert got[2] == [frozenset({"p"})]

    # a wakes up with a clock that lags: it still believes it holds the lease ...
    clock.now = 1001.0
    assert a.lease.held
    stale = {"p": dict(status_db.get(SCHEDULER)["assignments"]["p"], nodes=[1])}
    assert a.lease.update(assignments=stale) is False  # ... but its write fails on _rev
    assert status_db.get(SCHEDULER)["assignments"]["p"]["nodes"] == [2]
    a.loop()  # and its next heartbeat reads who leads, and what runs where
    assert not a.leader and a.mine == frozenset()
    assert got[1] == [frozenset({"p"}), frozenset()]


def test_a_node_out_of_touch_stops_its_placed_programs(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    calls: list[tuple[frozenset[str], Optional[float]]] = []
    beat = {"at": 0.0}
    node_a = Placement(db, db, 1, 2.0, lambda mine, hurry: calls.append((mine, hurry)),
                       last_heartbeat=lambda: beat["at"])
    fake_status(db, 1, node_a.clock())
    node_a.note(placed("p"))
    beat["at"] = time.monotonic()
    node_a.loop()
    assert calls == [(frozenset({"p"}), None)]
    assert node_a.last_read is not None
    beat["at"] = node_a.last_read
    node_a.check_fence(now=node_a.last_read + 5.9)  # within 3 intervals: nothing happens
    assert len(calls) == 1
    node_a.check_fence(now=node_a.last_read + 6.1)
    assert calls[-1] == (frozenset(), 2.0) and node_a.fenced  # stop now, and fast
    node_a.check_fence(now=node_a.last_read + 9.0)
    assert len(calls) == 2  # once
    beat["at"] = 1e12  # a heartbeat went out again, and the next read works
    node_a.loop()
    assert calls[-1] == (frozenset({"p"}), None) and not node_a.fenced


# -- the feed filter -----------------------------------------------------------------------
def test_placed_documents_reach_every_node(couch: Couch, code_db: Database) -> None:
    install.setup(Fleet(couch.url, code_db.name))
    code_db.save(placed("everywhere"))
    code_db.save({"_id": "elsewhere", "type": 2000, "code": "def main(): pass"})
    for code_only in (False, True):
        answer = code_db.changes(0, design.node_filter(couch, 1000, code_only=code_only))
        ids = {c["id"] for c in answer["results"] if not c["id"].startswith("_design/")}
        assert ids == {"everywhere"}


def test_couchdb_gets_placed_documents_by_selector(couch: Couch,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(couch, "supports_selector", lambda: True)
    for code_only in (False, True):
        selector = design.node_filter(couch, 1000, code_only=code_only).selector
        assert {"type": placement.PLACED_TYPE} in selector["$or"]  # type: ignore[index]


# -- real nodes ----------------------------------------------------------------------------
def program(events: Path, lock: Path, stubborn: bool = False) -> str:
    """A placed program that logs ``node pid start|stop`` and holds ``lock`` while it runs."""
    return (
        "import fcntl, os, time\n"
        "def main():\n"
        f"    lock = open({str(lock)!r}, 'a')\n"
        "    try:\n"
        "        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "        mark = ''\n"
        "    except OSError:\n"
        "        mark = ' OVERLAP'\n"
        f"    with open({str(events)!r}, 'a') as out:\n"
        "        out.write('%s %s start%s\\n' % (node, os.getpid(), mark))\n"
        + ("    while True:\n" if stubborn else "    while not should_quit():\n") +
        "        time.sleep(0.05)\n"
        f"    with open({str(events)!r}, 'a') as out:\n"
        "        out.write('%s %s stop\\n' % (node, os.getpid()))\n"
    )


def events(path: Path) -> list[tuple[int, int, str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [(int(n), int(p), " ".join(rest)) for n, p, *rest in (line.split() for line in lines)]


def assert_never_twice(path: Path) -> None:
    """At most one instance ran at any time.

    The lock says so (a killed instance released it when it died), and so do
    the lines: an instance without a ``stop`` line before the next ``start``
    must have been killed, so it cannot be alive now.
    """
    seen = events(path)
    assert all("OVERLAP" not in what for _, _, what in seen), seen
    unstopped: set[int] = set()
    for _, pid, what in seen:
        if what == "start":
            assert not any(pid_alive(p) for p in unstopped), seen
            unstopped.add(pid)
        else:
            unstopped.discard(pid)


def lease(fleet: Fleet) -> Doc:
    return fleet.status.get(SCHEDULER) or {}


def assigned(fleet: Fleet, doc_id: str) -> list[int]:
    return list(((lease(fleet).get("assignments") or {}).get(doc_id) or {}).get("nodes") or [])


def wait_running(fleet: Fleet, nodes: dict[int, Node], doc_id: str, events_file: Path,
                 not_on: tuple[int, ...] = (), timeout: float = 40.0) -> tuple[int, int]:
    """Wait until exactly one node runs ``doc_id`` (not one of ``not_on``): (mac, pid)."""
    def check() -> Optional[tuple[int, int]]:
        where = assigned(fleet, doc_id)
        if len(where) != 1 or where[0] in not_on:
            return None
        mac = where[0]
        program = nodes[mac].program(doc_id)
        started = [pid for n, pid, what in events(events_file) if n == mac and what == "start"]
        if program.get("state") == "running" and started and program.get("pid") == started[-1]:
            return mac, started[-1]
        return None

    return wait_for(check, timeout, message=lambda: (
        f"{doc_id} never ran elsewhere than {not_on}: lease {json.dumps(lease(fleet))}\n"
        f"events {events(events_file)}\n" + "\n".join(
            f"--- node {mac} ---\n{n.log()[-2500:]}" for mac, n in nodes.items())))


def himbeere(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HIMBEERE_SERVER=fleet.couch.url,
               HIMBEERE_DATABASE=fleet.code.name)
    env.pop("HIMBEERE_STATUS_DATABASE", None)
    return subprocess.run([sys.executable, "-m", "himbeere", *args], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=60)


@pytest.mark.slow
def test_placed_on_the_least_busy_matching_node_and_moved_when_labels_change(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    for mac, room in ((1001, "lab1"), (1002, "lab1"), (1003, "lab2")):
        ops.set_labels(fleet, mac, room=room)
    for i in range(4):  # 1001 is busy; 1003 is idle but in the wrong room
        fleet.code.save({"_id": f"busy{i}", "type": 1001,
                         "code": "import time\ndef main():\n    while not should_quit():\n"
                                 "        time.sleep(0.05)\n"})
    nodes = {n.mac_id: n for n in start_nodes(node_factory, 1001, 1002, 1003)}
    for i in range(4):
        nodes[1001].wait_program(f"busy{i}", state="running")
    events_file, lock = tmp_path / "events", tmp_path / "lock"
    fleet.code.save(placed("agg", labels={"room": "lab1"},
                           code=program(events_file, lock)))
    mac, pid = wait_running(fleet, nodes, "agg", events_file)
    assert mac == 1002
    assert nodes[1002].program("agg")["placed"] is True
    assert nodes[1001].program("busy0")["placed"] is False
    entry = lease(fleet)["assignments"]["agg"]
    assert entry["why"]["1002"].startswith("least busy of 2: ")

    out = himbeere(fleet, "placements")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("scheduler: node 100")
    assert lines[1].split() == ["PROGRAM", "WANTS", "NODE", "NODE", "STATE", "STATE", "WHY"]
    row = lines[2].split()
    assert row[:6] == ["agg", "1x", "room=lab1", "1002", "alive", "running"], lines
    assert "least busy of 2:" in lines[2]
    answer = json.loads(himbeere(fleet, "placements", "--json").stdout)
    (agg,) = answer["placements"]
    assert agg["nodes"][0]["node"] == 1002 and agg["nodes"][0]["state"] == "running"
    assert answer["scheduler"]["node"] in (1001, 1002, 1003)
    assert "agg (placed)" in himbeere(fleet, "status", "1002").stdout

    # 1002 leaves lab1: it stops the program, then 1001 (the only other match) runs it.
    ops.set_labels(fleet, 1002, room="lab3")
    mac, new_pid = wait_running(fleet, nodes, "agg", events_file, not_on=(1002,))
    assert mac == 1001
    assert not pid_alive(pid)
    nodes[1002].wait_log("agg: no longer placed on this node, stopping")
    assert [(n, what) for n, _, what in events(events_file)] == [
        (1002, "start"), (1002, "stop"), (1001, "start")]
    assert_never_twice(events_file)


@pytest.mark.slow
def test_failover_when_the_node_daemon_is_killed(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    nodes = {n.mac_id: n for n in start_nodes(node_factory, 2001, 2002, 2003)}
    events_file, lock = tmp_path / "events", tmp_path / "lock"
    fleet.code.save(placed("mover", code=program(events_file, lock)))
    first, pid = wait_running(fleet, nodes, "mover", events_file)
    nodes[first].kill()  # kill -9: its program learns it from the closed connection
    second, new_pid = wait_running(fleet, nodes, "mover", events_file, not_on=(first,))
    assert second != first
    assert not pid_alive(pid)
    why = lease(fleet)["assignments"]["mover"]["why"][str(second)]
    assert why.startswith(f"moved from {first} (dead); least busy of 2")
    assert [(n, what) for n, _, what in events(events_file)] == [
        (first, "start"), (first, "stop"), (second, "start")]
    assert_never_twice(events_file)


@pytest.mark.slow
def test_program_of_a_frozen_daemon_fences_itself_before_it_moves(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    """SIGSTOP: the connection stays open, so only the missing "alive" messages tell
    the child; this one even ignores should_quit()."""
    nodes = {n.mac_id: n for n in start_nodes(node_factory, 3001, 3002)}
    events_file, lock = tmp_path / "events", tmp_path / "lock"
    fleet.code.save(placed("stubborn", code=program(events_file, lock, stubborn=True)))
    first, pid = wait_running(fleet, nodes, "stubborn", events_file)
    frozen = nodes[first]
    frozen.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not pid_alive(pid), 30, message=f"pid {pid} outlived its daemon")
        frozen.wait_log("[stubborn] still running 3 s after the daemon's last word: killed")
        second, _ = wait_running(fleet, nodes, "stubborn", events_file, not_on=(first,))
        assert_never_twice(events_file)
    finally:
        frozen.signal(signal.SIGCONT)
    # Back again, the old node learns that the program moved, and leaves it there.
    wait_for(lambda: ((frozen.status() or {}).get("placement") or {}).get("assigned") == []
             and "stubborn" not in (frozen.status() or {}).get("programs", {}), 30,
             message=lambda: f"status {frozen.status()}\n{frozen.log()[-3000:]}")
    assert assigned(fleet, "stubborn") == [second]
    assert nodes[second].program("stubborn")["state"] == "running"
    assert_never_twice(events_file)


@pytest.mark.slow
def test_another_node_takes_over_scheduling_when_the_leader_is_killed(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    nodes = {n.mac_id: n for n in start_nodes(node_factory, 4001, 4002, 4003)}
    wait_for(lambda: str(lease(fleet).get("holder") or "").isdigit(), 30,
             message=lambda: f"nobody took the lease: {lease(fleet)}")
    before = lease(fleet)
    leader = int(before["holder"])
    nodes[leader].kill()
    after = wait_for(lambda: lease(fleet) if lease(fleet).get("holder") not in (
        None, str(leader)) else None, 30, message=lambda: f"lease: {lease(fleet)}")
    assert after["epoch"] == before["epoch"] + 1
    # Scheduling goes on: a new program lands on a live node.
    events_file, lock = tmp_path / "events", tmp_path / "lock"
    fleet.code.save(placed("after", code=program(events_file, lock)))
    mac, _ = wait_running(fleet, nodes, "after", events_file, not_on=(leader,))
    assert mac != leader
    assert ops.placements(fleet)["scheduler"]["node"] == int(after["holder"])

"""Placement and failover: placed programs, the scheduler under its lease, fencing.

The first tests call :func:`himbeere.fleet.scheduler.assign` and the
:class:`~himbeere.fleet.placement.Placement` loop directly; the others run real
node daemons (``node_factory``, heartbeat every second) on the real server.
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
from himbeere.fleet import placement, scheduler
from himbeere.fleet.lease import lease_id
from himbeere.fleet.placement import Placement
from himbeere.fleet.scheduler import NodeInfo, assign
from tests.helpers import wait_for
from tests.nodes import ROOT, Node, pid_alive, start_nodes
from uploader import install, ops
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
SCHEDULER = lease_id(placement.LEASE_NAME)


# -- assign(): the decision alone --------------------------------------------------------
def placed(doc_id: str, **fields: Any) -> Doc:
    return dict({"_id": doc_id, "type": placement.PLACED_TYPE, "name": doc_id,
                 "code": "def main(): pass"}, **fields)


def node(mac: int, **fields: Any) -> NodeInfo:
    figures: dict[str, Any] = dict(load=0.5, cpus=4, memory_used_mb=200.0,
                                   memory_total_mb=1000.0, disk_free_mb=5000.0)
    figures.update(fields)
    return NodeInfo(node=mac, **figures)


def test_assign_picks_the_least_busy_alive_node() -> None:
    nodes = [node(1, programs=3), node(2, load=3.9), node(3, programs=1), node(4, state="suspect"),
             node(5, state="dead")]
    result = assign([placed("p")], nodes, {}, now=100.0)
    assert result["p"]["nodes"] == [3]
    assert result["p"]["why"] == {"3": "least busy of 3: load 0.5 on 4 cpus, 1 program, "
                                       "800 MB free"}
    assert result["p"]["since"] == {"3": 100.0}
    assert result["p"]["problem"] is None
    # Ties go to the lower MAC id; placements of one round spread out.
    result = assign([placed("a"), placed("b"), placed("c")], [node(8), node(7)], {})
    assert [result[d]["nodes"] for d in "abc"] == [[7], [8], [7]]


def test_assign_honours_labels_requires_and_replicas() -> None:
    nodes = {1: node(1, labels={"room": "lab1"}, memory_used_mb=900.0),
             2: node(2, labels={"room": "lab1"}, disk_free_mb=50.0),
             3: node(3, labels={"room": "lab1", "rack": "2"}, programs=2),
             4: node(4, labels={"room": "lab2"}),
             5: node(5, labels={"room": "lab1"}, memory_used_mb=None, memory_total_mb=None)}
    two = placed("two", replicas=2, labels={"room": "lab1"})
    result = assign([two], nodes, {})
    assert result["two"]["nodes"] == [5, 2]  # least busy first; 1 has little RAM left
    needy = placed("needy", labels={"room": "lab1"}, requires={"ram_mb": 200, "disk_mb": 100})
    assert assign([needy], nodes, {})["needy"]["nodes"] == [3]
    rack = placed("rack", replicas=2, labels={"rack": "2"})
    entry = assign([rack], nodes, {})["rack"]
    assert entry["nodes"] == [3]
    assert entry["problem"] == "1 of 2 replicas placed: no other node fits (4 without rack=2)"
    nowhere = assign([placed("x", requires={"ram_mb": 5000})], nodes, {})["x"]
    assert nowhere["nodes"] == []
    assert "5 less than 5000 MB free RAM" in nowhere["problem"]
    assert assign([placed("zero", replicas=0)], nodes, {})["zero"] == {
        "name": "zero", "replicas": 0, "nodes": [], "why": {}, "since": {}, "draining": [],
        "problem": None}


def test_assign_gives_a_disabled_program_no_node() -> None:
    """Regression: a stopped placed program kept its nodes and counted as
    their load, so new programs avoided nodes on which nothing ran."""
    current = assign([placed("p", replicas=2), placed("q")], [node(1), node(2)], {})
    assert current["p"]["nodes"] == [1, 2]
    stopped = assign([placed("p", replicas=2, enabled=False), placed("q"), placed("new")],
                     [node(1), node(2)], current)
    assert stopped["p"]["nodes"] == [] and stopped["p"]["replicas"] == 2
    assert stopped["p"]["problem"] == scheduler.DISABLED
    assert stopped["q"]["nodes"] == current["q"]["nodes"] == [1]
    assert stopped["new"]["nodes"] == [2]  # 2 runs nothing now
    again = assign([placed("p", replicas=2, enabled=True), placed("q"), placed("new")],
                   [node(1), node(2)], stopped)
    assert sorted(again["p"]["nodes"]) == [1, 2] and again["p"]["problem"] is None


def test_assign_reports_a_bad_placement_by_field() -> None:
    for fields, text in (({"replicas": "2"}, "replicas: '2' is not allowed"),
                         ({"labels": {"room": 1}}, "labels: {'room': 1} is not allowed"),
                         ({"requires": {"cpu": 2}}, "requires: 'cpu' is not allowed; allowed: "
                                                    "ram_mb, disk_mb"),
                         ({"requires": {"ram_mb": -1}}, "requires.ram_mb: -1 is not allowed")):
        entry = assign([placed("bad", **fields)], [node(1)], {"bad": {"nodes": [1]}})["bad"]
        assert entry["nodes"] == [] and entry["problem"].startswith(text), entry


def test_assign_does_not_reshuffle_when_nodes_join() -> None:
    current = assign([placed("p"), placed("q")], [node(1, programs=4), node(2, programs=4)], {},
                     now=1.0)
    assert current["p"]["nodes"] == [1] and current["q"]["nodes"] == [2]
    # Idle nodes join, one old node turns suspect: everything stays where it is.
    later = assign([placed("p"), placed("q")],
                   [node(1, programs=4, state="suspect"), node(2, programs=4), node(3), node(4)],
                   current, now=50.0)
    assert later == current


def test_assign_replaces_dead_and_stopped_nodes_and_forgets_deleted_documents() -> None:
    current = {"p": {"nodes": [1], "why": {"1": "least busy of 2: ..."}, "since": {"1": 1.0}},
               "q": {"nodes": [2], "why": {}, "since": {}},
               "deleted": {"nodes": [3], "why": {}, "since": {}}}
    nodes = [node(1, state="dead"), node(2, state="stopped"), node(3, programs=1), node(4)]
    result = assign([placed("p"), placed("q")], nodes, current, now=9.0)
    assert set(result) == {"p", "q"}
    assert result["p"]["nodes"] == [4]
    assert result["p"]["why"]["4"].startswith("moved from 1 (dead); least busy of 2")
    assert result["q"]["nodes"] == [3]
    assert result["q"]["why"]["3"].startswith("moved from 2 (stopped); least busy of 2")
    assert result["p"]["since"] == {"4": 9.0}
    # A node that vanished from the status database is replaced too.
    assert assign([placed("p")], [node(5)], current)["p"]["why"]["5"].startswith(
        "moved from 1 (unknown)")


def test_assign_waits_for_a_leaving_node_to_stop_the_program() -> None:
    """Labels changed on a live node: it must stop the program before another starts it."""
    current = assign([placed("p", labels={"room": "lab1"})],
                     [node(1, labels={"room": "lab1"}), node(2, labels={"room": "lab1"},
                                                             programs=3)], {})
    assert current["p"]["nodes"] == [1]
    relabelled = [node(1, labels={"room": "lab9"}, placed=frozenset({"p"})),
                  node(2, labels={"room": "lab1"}, programs=3)]
    draining = assign([placed("p", labels={"room": "lab1"})], relabelled, current)
    assert draining["p"]["nodes"] == [] and draining["p"]["draining"] == [1]
    assert draining["p"]["problem"] == "0 of 1 replicas placed: waiting for 1 to stop it"
    relabelled[0].placed = frozenset()  # its status shows it stopped
    moved = assign([placed("p", labels={"room": "lab1"})], relabelled, draining)
    assert moved["p"]["nodes"] == [2] and moved["p"]["draining"] == []
    # Fewer replicas: the busiest node leaves, the same way.
    two = assign([placed("r", replicas=2)], [node(1), node(2, programs=2)], {})
    one = assign([placed("r", replicas=1)], [node(1), node(2, programs=2,
                                                           placed=frozenset({"r"}))], two)
    assert one["r"]["nodes"] == [1] and one["r"]["draining"] == [2]


def test_node_info_reads_status_and_labels() -> None:
    status = {"_id": "status:7", "state": "running", "heartbeat_server_time": 100.0,
              "heartbeat_interval": 1.0, "load": [0.3, 0.2, 0.1], "cpus": 2,
              "memory_used_mb": 100.0, "memory_total_mb": 400.0, "disk_free_mb": 9.0,
              "programs": {"a": {"pid": 10}, "b": {"pid": None}, "c": {"pid": 11, "placed": True}}}
    nodes = scheduler.nodes_from_docs([status, {"_id": "status:7:x"}],
                                      [{"_id": "node:7", "labels": {"room": "lab1"}}], now=100.5)
    assert list(nodes) == [7]
    info = nodes[7]
    assert (info.state, info.labels, info.load, info.cpus, info.memory_free_mb,
            info.programs, info.placed) == ("alive", {"room": "lab1"}, 0.3, 2, 300.0, 1,
                                            frozenset({"c"}))
    assert scheduler.nodes_from_docs([status], [], now=110.0)[7].state == "dead"


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

"""The scheduler's decision alone: :func:`himbeere.fleet.scheduler.assign`, no server.

Pure functions of the placed documents, the nodes' figures and the current
assignments (tests/test_placement.py runs the scheduler under its lease).
"""

from __future__ import annotations

from typing import Any

from himbeere.couch import Doc
from himbeere.fleet import placement, scheduler
from himbeere.fleet.scheduler import NodeInfo, assign


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


def test_a_leader_places_only_its_own_sides_programs_on_its_own_sides_nodes() -> None:
    # A site's relay and the central server each elect a leader: a program
    # with one replica must not be placed once on each side of a WAN split.
    programs = [placed("central"), placed("here", labels={"site": "farm", "room": "barn"}),
                placed("elsewhere", labels={"site": "lab"})]
    nodes = {1: node(1), 2: node(2, labels={"site": "farm", "room": "barn"}),
             3: node(3, labels={"site": "lab"})}
    mine, candidates = scheduler.in_scope(programs, nodes, "farm")
    assert [d["_id"] for d in mine] == ["here"] and list(candidates) == [2]
    result = assign(mine, candidates, {}, now=1.0)
    assert result == {"here": result["here"]} and result["here"]["nodes"] == [2]
    mine, candidates = scheduler.in_scope(programs, nodes, None)
    assert [d["_id"] for d in mine] == ["central"] and list(candidates) == [1]
    # The central leader drops an old assignment of a site's program: its
    # site's leader places it now.
    result = assign(mine, candidates, {"here": {"nodes": [2]}}, now=1.0)
    assert set(result) == {"central"} and result["central"]["nodes"] == [1]

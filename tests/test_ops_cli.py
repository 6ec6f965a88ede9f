"""The laptop's fleet commands: ``himbeere nodes|status|logs|stop|start|restart|label``.

They run in-process through ``uploader.main.main`` (the real parser, the real
server); nodes are real daemons where a test needs states a daemon reports.
``himbeere cmd`` is tested in test_fleet_commands.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from himbeere.logship import LogShipper, log_id
from himbeere.status import status_id
from tests.helpers import himbeere, wait_for
from tests.nodes import ROOT, Node, pid_alive
from uploader import ops
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]

#: Every ``himbeere`` command here finds the test's server and databases.
pytestmark = pytest.mark.usefixtures("cli_env")


def program(fleet: Fleet, mac: int, name: str, code: str, **fields: Any) -> str:
    doc_id = f"{mac}:{name}"
    fleet.code.save(dict({"_id": doc_id, "type": mac, "name": name, "code": code}, **fields))
    return doc_id


def heartbeat(fleet: Fleet, mac: int, **fields: Any) -> None:
    """A status document as a daemon writes it (for tests that need no daemon)."""
    now = time.time()
    doc = dict({"_id": status_id(mac), "type": "himbeere-status", "node": mac,
                "state": "running", "heartbeat_time": now, "heartbeat_server_time": now,
                "heartbeat_interval": 10, "programs": {}}, **fields)
    fleet.status.update(doc["_id"], lambda old: old.update(doc))


# -- nodes and status --------------------------------------------------------------------
@pytest.mark.slow
def test_nodes_shows_alive_and_stopped_nodes(fleet: Fleet, node_factory: NodeFactory,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    first, second = node_factory(mac_id=1001), node_factory(mac_id=1002)
    fleet.set_name(1001, "kitchen")
    program(fleet, 1001, "sleeper", "def main():\n    while not should_quit(): pass\n")
    first.wait_program("1001:sleeper", state="running")
    wait_for(second.status, 30)
    assert second.stop() == 0
    code, out, _ = himbeere(capsys, "nodes")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "MAC", "ID", "IP", "STATE"]
    kitchen = next(line for line in lines if line.startswith("kitchen"))
    assert " 1001 " in kitchen and " alive " in kitchen and "1 running" in kitchen
    other = next(line for line in lines if line.startswith("-"))
    assert " 1002 " in other and " stopped " in other
    code, out, _ = himbeere(capsys, "nodes", "--json")
    nodes = {n["node"]: n for n in json.loads(out)["nodes"]}
    assert nodes[1001]["state"] == "alive" and nodes[1002]["state"] == "stopped"
    assert nodes[1001]["name"] == "kitchen" and nodes[1001]["running"] == 1
    assert nodes[1001]["programs"]["1001:sleeper"]["state"] == "running"
    assert nodes[1001]["daemon_version"] and nodes[1001]["heartbeat_age"] is not None


def test_nodes_without_a_heartbeat_and_an_empty_fleet(fleet: Fleet,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = himbeere(capsys, "nodes")
    assert code == 0 and out.startswith("no nodes yet")
    fleet.set_name(1005, "shed")
    heartbeat(fleet, 1006, heartbeat_server_time=time.time() - 3600)
    listing = {n["node"]: n for n in ops.list_nodes(fleet)}
    assert listing[1005]["state"] == "unknown" and listing[1005]["name"] == "shed"
    assert listing[1006]["state"] == "dead"


@pytest.mark.slow
def test_status_shows_a_crashed_programs_traceback(fleet: Fleet, node_factory: NodeFactory,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    node = node_factory(mac_id=1001)
    program(fleet, 1001, "crasher", "def main():\n    raise RuntimeError('the sensor is gone')\n",
            restart="never")
    node.wait_program("1001:crasher", state="crashed")
    code, out, _ = himbeere(capsys, "status", "1001")
    assert code == 0, out
    assert out.startswith("node 1001: alive")
    assert "last error of crasher (1001:crasher):" in out
    assert "Traceback (most recent call last):" in out
    assert "RuntimeError: the sensor is gone" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("crasher "))
    assert " crashed " in row
    code, out, _ = himbeere(capsys, "status", "1001", "--json")
    detail = json.loads(out)
    crashed = detail["programs"]["1001:crasher"]
    assert crashed["state"] == "crashed" and "the sensor is gone" in crashed["last_error"]
    assert crashed["enabled"] is True and crashed["in_database"] is True
    assert detail["status"]["node"] == 1001 and detail["crashed"] == 1


def test_status_of_an_unknown_node_is_one_line(fleet: Fleet,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = himbeere(capsys, "status", "1009")
    assert code == 1
    assert err.strip().splitlines() == [
        "himbeere: error: node 1009 is unknown: it never sent a heartbeat to "
        f"{fleet.server} and has no name; `himbeere nodes` lists the known ones"]
    code, _, err = himbeere(capsys, "status", "nosuchname")
    assert code == 1 and "no node is named 'nosuchname'" in err
    code, out, _ = himbeere(capsys, "status", "nosuchname", "--json")
    assert code == 1 and json.loads(out)["ok"] is False


def test_status_lists_the_nodes_commands(fleet: Fleet,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat(fleet, 1001)
    mine = ops.create_command(fleet, ["echo", "hi"], [1001])
    ops.create_command(fleet, ["echo", "not mine"], [1002])
    fleet.status.save({"_id": f"result:{mine}:1001", "type": "himbeere-result", "node": 1001,
                       "command": mine, "state": "done", "returncode": 0, "ret": ["hi\n", ""]})
    detail = ops.node_detail(fleet, 1001)
    assert [(c["command"], c["result"]["ret"][0]) for c in detail["commands"]] == [(mine, "hi\n")]
    code, out, _ = himbeere(capsys, "status", "1001")
    assert "latest commands:" in out and mine in out


# -- errors ------------------------------------------------------------------------------
def test_a_database_that_is_not_set_up_gets_a_hint(couch_url: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIMBEERE_SERVER", couch_url)
    code, _, err = himbeere(capsys, "nodes", "--database", "t_never_set_up")
    assert code == 1 and "does not exist" in err and "himbeere-upload setup" in err
    assert len(err.strip().splitlines()) == 1
    host = couch_url.split("//", 1)[1].split("@")[-1]
    code, _, err = himbeere(capsys, "nodes", "--server", f"http://nobody:wrong@{host}")
    assert code == 1 and "wrong credentials" in err
    monkeypatch.delenv("HIMBEERE_SERVER")
    code, _, err = himbeere(capsys, "nodes")
    assert code == 1 and "server: not set" in err


# -- logs --------------------------------------------------------------------------------
def ship(fleet: Fleet, mac: int, program_id: str, name: str, *lines: tuple[Any, ...]) -> None:
    shipper = LogShipper(fleet.status, mac)
    shipper.add(program_id, name, list(lines))
    assert shipper.flush() == len(lines)


def test_logs_shows_the_log_documents(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat(fleet, 1001)
    now = time.time()
    ship(fleet, 1001, "1001:blink", "blink", (now - 3, "on"), (now - 1, "off"))
    ship(fleet, 1001, "1001:temp", "temp", (now - 2, "21.5 C"))
    ship(fleet, 1002, "1002:blink", "blink", (now, "someone else's"))
    code, out, _ = himbeere(capsys, "logs", "1001")
    assert code == 0
    assert [line.split(" ", 1)[1] for line in out.splitlines()] == [
        "[blink] on", "[temp] 21.5 C", "[blink] off"]
    code, out, _ = himbeere(capsys, "logs", "1001", "blink")
    assert [line.split(" ", 1)[1] for line in out.splitlines()] == ["[blink] on", "[blink] off"]
    code, out, _ = himbeere(capsys, "logs", "1001", "1001:temp", "--json")
    docs = json.loads(out)["logs"]
    assert [d["_id"] for d in docs] == ["log:1001:1001:temp"]
    code, out, _ = himbeere(capsys, "logs", "1001", "-n", "1")
    assert out.splitlines()[0].endswith("[blink] off")


def test_logs_marks_what_the_daemon_wrote(fleet: Fleet,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: lifecycle events and tracebacks are marked lines of the program's log
    ([time, text, kind]); the program's own lines keep their form ([time, text])."""
    heartbeat(fleet, 1001)
    now = time.time()
    ship(fleet, 1001, "1001:blink", "blink", (now - 3, "started (pid 42)", "event"),
         (now - 2, "on"), (now - 1, "ValueError: no LED", "error"),
         (now - 1, "crashed; restart 1 in 1 s", "event"))
    code, out, _ = himbeere(capsys, "logs", "1001")
    assert code == 0
    assert [line.split(" ", 1)[1] for line in out.splitlines()] == [
        "[blink] -- started (pid 42)", "[blink] on", "[blink] !! ValueError: no LED",
        "[blink] -- crashed; restart 1 in 1 s"]
    lines = fleet.status.get(log_id(1001, "1001:blink"))["lines"]
    assert [len(line) for line in lines] == [3, 2, 3, 3]


def test_logs_of_a_program_that_does_not_exist(fleet: Fleet,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat(fleet, 1001)
    program(fleet, 1001, "blink", "def main(): pass\n")
    code, _, err = himbeere(capsys, "logs", "1001", "nosuch")
    assert code == 1 and "node 1001 has no program 'nosuch'; its programs: blink" in err
    code, out, err = himbeere(capsys, "logs", "1001", "blink")
    assert code == 0 and out == "" and "no log lines of program blink" in err


def test_logs_follow_prints_new_lines(fleet: Fleet, couch_url: str) -> None:
    heartbeat(fleet, 1001)
    ship(fleet, 1001, "1001:blink", "blink", (time.time() - 1, "before"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HIMBEERE_SERVER=couch_url,
               HIMBEERE_DATABASE=fleet.code.name)
    follower = subprocess.Popen([sys.executable, "-m", "himbeere", "logs", "1001", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=str(ROOT))
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().endswith("[blink] before\n")
        ship(fleet, 1001, "1001:blink", "blink", (time.time(), "after"))
        assert follower.stdout.readline().endswith("[blink] after\n")
    finally:
        follower.terminate()
        follower.wait(10)


# -- stop, start, restart, label ---------------------------------------------------------
def test_stop_start_restart_change_the_code_document(fleet: Fleet,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    fleet.set_name(1001, "kitchen")
    doc_id = program(fleet, 1001, "blink", "def main(): pass\n")

    def doc() -> dict[str, Any]:
        found = fleet.code.get(doc_id)
        assert found is not None
        return found

    code, out, _ = himbeere(capsys, "stop", "blink", "--node", "kitchen")
    assert code == 0 and out.strip() == "stopped 1001:blink (enabled: false)"
    assert doc()["enabled"] is False
    code, out, _ = himbeere(capsys, "stop", "1001:blink", "--node", "1001")
    assert code == 0 and "was stopped already" in out
    code, out, _ = himbeere(capsys, "start", "blink", "--node", "1001")
    assert code == 0 and doc()["enabled"] is True
    code, out, _ = himbeere(capsys, "restart", "blink", "--node", "1001")
    assert code == 0 and "restart_count 1" in out
    code, out, _ = himbeere(capsys, "restart", "blink", "--node", "1001", "--json")
    assert json.loads(out)["restart_count"] == 2 and doc()["restart_count"] == 2
    assert doc()["code"] == "def main(): pass\n"  # nothing else changed
    code, _, err = himbeere(capsys, "restart", "blinky", "--node", "1001")
    assert code == 1 and "node 1001 has no program 'blinky'; its programs: blink" in err
    code, _, err = himbeere(capsys, "stop", "blink", "--node", "1002")
    assert code == 1 and "node 1002 has no program 'blink'" in err


@pytest.mark.slow
def test_stop_and_start_reach_the_daemon(fleet: Fleet, node_factory: NodeFactory,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    node = node_factory(mac_id=1001)
    program(fleet, 1001, "sleeper", "def main():\n    while not should_quit(): pass\n")
    node.wait_program("1001:sleeper", state="running")
    assert himbeere(capsys, "stop", "sleeper", "--node", "1001")[0] == 0
    node.wait_program("1001:sleeper", state="stopped")
    assert himbeere(capsys, "start", "sleeper", "--node", "1001")[0] == 0
    node.wait_program("1001:sleeper", state="running")


def placed_program(fleet: Fleet, name: str, code: str, **fields: Any) -> str:
    doc_id = f"placed:{name}"
    fleet.code.save(dict({"_id": doc_id, "type": "himbeere-placed", "name": name,
                          "code": code}, **fields))
    return doc_id


def test_stop_start_restart_a_placed_program_without_node(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    doc_id = placed_program(fleet, "agg", "def main(): pass\n", replicas=2)
    program(fleet, 1001, "blink", "def main(): pass\n")
    fleet.status.save({"_id": "lease:scheduler", "type": "himbeere-lease",
                       "assignments": {doc_id: {"nodes": [1001, 1002]}}})

    def doc() -> dict[str, Any]:
        found = fleet.code.get(doc_id)
        assert found is not None
        return found

    code, out, _ = himbeere(capsys, "stop", "agg")
    assert code == 0
    assert out.strip() == ("stopped placed:agg (enabled: false); placed program, now placed "
                           "on 1001, 1002")
    assert doc()["enabled"] is False
    code, out, _ = himbeere(capsys, "stop", "placed:agg", "--placed")
    assert code == 0 and "was stopped already" in out
    code, out, _ = himbeere(capsys, "start", "agg", "--json")
    result = json.loads(out)
    assert result["placed"] is True and result["node"] is None
    assert result["nodes"] == [1001, 1002] and doc()["enabled"] is True
    code, out, _ = himbeere(capsys, "restart", "agg", "--placed")
    assert code == 0 and out.startswith("restart requested for placed:agg (restart_count 1)")
    assert doc()["restart_count"] == 1 and doc()["replicas"] == 2  # nothing else changed

    code, _, err = himbeere(capsys, "stop", "agg", "--placed", "--node", "1001")
    assert code == 1 and "drop --node" in err
    code, _, err = himbeere(capsys, "stop", "agg", "--node", "1001")
    assert code == 1 and "node 1001 has no program 'agg'" in err
    assert "'agg' is a placed program (placed:agg): without --node" in err
    code, _, err = himbeere(capsys, "stop", "blink")
    assert code == 1 and err.count("\n") == 1
    assert "no placed program or program for many nodes 'blink'; placed programs: agg; " \
           "programs for many nodes: none; node 1001 has a program 'blink': add --node " \
           "NODE" in err
    assert fleet.code.get("1001:blink").get("enabled") is None  # type: ignore[union-attr]


def test_stop_start_restart_a_program_for_many_nodes_without_node(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: stop/start/restart found no program:<name> (they looked for a
    placed program); its one document reaches every node it targets."""
    fleet.code.save({"_id": "program:sensor", "type": "himbeere-program", "name": "sensor",
                     "targets": {"labels": {"room": "lab"}}, "code": "def main(): pass\n",
                     "release": 3})
    for mac in (1001, 1002, 1003):
        ops.set_labels(fleet, mac, room="lab")
    ops.set_labels(fleet, 1004, room="office")

    def doc() -> dict[str, Any]:
        found = fleet.code.get("program:sensor")
        assert found is not None
        return found

    code, out, err = himbeere(capsys, "stop", "sensor")
    assert code == 0, err
    assert out.strip() == ("stopped program:sensor (enabled: false); program for many nodes "
                           "(targets room=lab): 3 nodes now (1001, 1002, 1003)")
    assert doc()["enabled"] is False
    code, out, _ = himbeere(capsys, "stop", "program:sensor", "--targeted")
    assert code == 0 and out.startswith("program:sensor was stopped already;")
    code, out, _ = himbeere(capsys, "start", "sensor", "--json")
    result = json.loads(out)
    assert (result["targeted"], result["placed"], result["node"]) == (True, False, None)
    assert result["nodes"] == [1001, 1002, 1003] and doc()["enabled"] is True
    assert result["targets"] == {"labels": {"room": "lab"}}
    code, out, _ = himbeere(capsys, "restart", "sensor", "--targeted")
    assert code == 0 and out.strip() == (
        "restart requested for program:sensor (restart_count 1); program for many nodes "
        "(targets room=lab): 3 nodes now (1001, 1002, 1003)")
    assert doc()["restart_count"] == 1 and doc()["release"] == 3  # nothing else changed

    code, _, err = himbeere(capsys, "stop", "sensor", "--targeted", "--node", "1001")
    assert code == 1 and "drop --node" in err
    code, _, err = himbeere(capsys, "stop", "sensor", "--placed")
    assert code == 1 and err.count("\n") == 1
    assert "no placed program 'sensor'; placed programs: none" in err
    code, _, err = himbeere(capsys, "stop", "sensor", "--node", "1001")
    assert code == 1 and "'sensor' is a program for many nodes (program:sensor): without " \
        "--node, stop, start and restart act on every node it targets" in err
    # A placed program of the same name: say which.
    placed_program(fleet, "sensor", "def main(): pass\n")
    code, _, err = himbeere(capsys, "restart", "sensor")
    assert code == 1 and "add --placed or --targeted" in err
    assert himbeere(capsys, "restart", "sensor", "--placed")[0] == 0
    assert fleet.code.get("placed:sensor")["restart_count"] == 1  # type: ignore[index]
    assert doc()["restart_count"] == 1


@pytest.mark.slow
def test_stop_start_restart_reach_every_node_running_a_placed_program(
        fleet: Fleet, node_factory: NodeFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """enabled=false on a placed document stops it on every node it is placed on."""
    nodes = [node_factory(mac_id=mac) for mac in (1001, 1002)]
    doc_id = placed_program(fleet, "agg", "def main():\n    while not should_quit(): pass\n",
                            replicas=2)
    first = [n.wait_program(doc_id, 40, state="running", placed=True)["pid"] for n in nodes]

    assert himbeere(capsys, "stop", "agg")[0] == 0
    for n in nodes:
        n.wait_program(doc_id, state="stopped", pid=None)
    assert not any(pid_alive(pid) for pid in first)
    # Stopped, not unplaced: the scheduler keeps it where it was.
    (agg,) = ops.placements(fleet)["placements"]
    assert sorted(n["node"] for n in agg["nodes"]) == [1001, 1002]

    assert himbeere(capsys, "start", "agg")[0] == 0
    second = [n.wait_program(doc_id, state="running")["pid"] for n in nodes]
    assert all(second) and not set(second) & set(first)

    assert himbeere(capsys, "restart", "agg")[0] == 0
    third = [wait_for(lambda n=n: n.program(doc_id).get("state") == "running"
                      and n.program(doc_id).get("pid") not in (None, *second)
                      and n.program(doc_id)["pid"], 20,
                      message=lambda n=n: f"no restart: {n.program(doc_id)}\n{n.log()[-3000:]}")
             for n in nodes]
    assert not any(pid_alive(pid) for pid in second)
    assert all(pid_alive(pid) for pid in third)


def test_label_sets_shows_and_removes_labels(fleet: Fleet,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fleet.set_name(1001, "kitchen")
    code, out, _ = himbeere(capsys, "label", "kitchen", "room=lab", "rack=2")
    assert code == 0 and out.strip() == "labels of kitchen: rack=2, room=lab"
    code, out, _ = himbeere(capsys, "label", "1001", "rack=")
    assert out.strip() == "labels of 1001: room=lab"
    code, out, _ = himbeere(capsys, "label", "1001", "--json")
    assert json.loads(out)["labels"] == {"room": "lab"}
    doc = fleet.status.get("node:1001")
    assert doc is not None and doc["name"] == "kitchen" and doc["labels"] == {"room": "lab"}
    assert ops.resolve_targets(fleet, labels=["room=lab"]) == [1001]
    code, _, err = himbeere(capsys, "label", "1001", "no-equals")
    assert code == 1 and "key=value" in err
    code, _, err = himbeere(capsys, "label", "1001", "9bad=x")
    assert code == 1 and "label key '9bad' is not allowed" in err


def test_labels_show_in_nodes(fleet: Fleet, capsys: pytest.CaptureFixture[str],
                              tmp_path: Path) -> None:
    heartbeat(fleet, 1001)
    ops.set_labels(fleet, 1001, room="lab")
    node = ops.list_nodes(fleet)[0]
    assert node["labels"] == {"room": "lab"} and node["state"] == "alive"

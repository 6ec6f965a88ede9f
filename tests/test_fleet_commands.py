"""Fleet commands: ONE ``himbeere-command`` document, a result document per node.

Real node daemons (``node_factory``) with distinct MAC ids follow the real
server; the command is created the way ``himbeere cmd`` creates it
(:mod:`uploader.ops`), and ``himbeere cmd`` itself runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere.commands import COMMAND_TYPE, Commands, result_id
from himbeere.couch import Couch, Doc, design, security
from himbeere.exceptions import ConfigError, NotFound, Unauthorized
from himbeere.journal import Journal
from himbeere.status import status_id
from tests.helpers import wait_for
from tests.nodes import ROOT, Node, start_nodes
from uploader import install, ops, users
from uploader.fleet import Fleet

PY = sys.executable
NodeFactory = Callable[..., Node]


def result(fleet: Fleet, command_id: str, mac: int) -> Optional[Doc]:
    return fleet.status.get(result_id(command_id, mac))


def wait_result(fleet: Fleet, command_id: str, mac: int, timeout: float = 30.0,
                node: Optional[Node] = None) -> Doc:
    """Wait for a final result of ``mac``."""
    def check() -> Optional[Doc]:
        doc = result(fleet, command_id, mac)
        return doc if doc and doc.get("state") in ops.FINAL_STATES else None

    return wait_for(check, timeout, message=lambda: (
        f"no result of {mac} for {command_id}: {result(fleet, command_id, mac)}"
        + (f"\nnode log:\n{node.log()[-3000:]}" if node else "")))


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def append_line(path: Path, text: str = "ran") -> list[str]:
    """A command that appends one line to ``path``: counts how often it ran."""
    return py(f"open({str(path)!r}, 'a').write({text!r} + '\\n')")


def himbeere(fleet: Fleet, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """``python -m himbeere ARGS`` against the test's server and databases."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HIMBEERE_SERVER=fleet.couch.url,
               HIMBEERE_DATABASE=fleet.code.name)
    env.pop("HIMBEERE_STATUS_DATABASE", None)
    return subprocess.run([PY, "-m", "himbeere", *args], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)


# -- the filter --------------------------------------------------------------------------
def test_the_feed_filter_lets_targeted_commands_through(fleet: Fleet, couch: Couch) -> None:
    """Whichever filter the server gets (JS or _selector): int and string MAC ids."""
    db = fleet.code
    docs = {
        "for-all": {"type": COMMAND_TYPE, "targets": "all", "cmd": ["true"]},
        "int": {"type": COMMAND_TYPE, "targets": [1000, 2000], "cmd": ["true"]},
        "str": {"type": COMMAND_TYPE, "targets": ["1000"], "cmd": ["true"]},
        "others": {"type": COMMAND_TYPE, "targets": [2000, 10000, 100], "cmd": ["true"]},
        "no-targets": {"type": COMMAND_TYPE, "cmd": ["true"]},
        "bad-targets": {"type": COMMAND_TYPE, "targets": {"1000": True}, "cmd": ["true"]},
        "mine-legacy": {"type": "1000_cmd", "cmd": ["true"]},
        "program": {"type": 1000, "code": "def main(): pass"},
        "not-a-command": {"type": "other", "targets": "all"},
    }
    for doc_id, doc in docs.items():
        db.save(dict(doc, _id=doc_id))

    def passed(node: int, code_only: bool = False) -> set[str]:
        answer = db.changes(0, design.node_filter(couch, node, code_only=code_only))
        return {c["id"] for c in answer["results"] if not c["id"].startswith("_design/")}

    assert passed(1000) == {"for-all", "int", "str", "mine-legacy", "program"}
    assert passed(2000) == {"for-all", "int", "others"}
    assert passed(100) == {"for-all", "others"}
    assert passed(1000, code_only=True) == {"program"}


def test_couchdb_gets_the_same_rule_as_a_selector(couch: Couch,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """pouchdb-server cannot run _selector; the shape is pinned here, the behaviour by the
    test above when HIMBEERE_TEST_COUCH_URL names an Apache CouchDB."""
    monkeypatch.setattr(couch, "supports_selector", lambda: True)
    either = design.node_filter(couch, 1000).selector["$or"]  # type: ignore[index]
    assert {"type": COMMAND_TYPE, "targets": "all"} in either
    assert {"type": COMMAND_TYPE, "targets": {"$elemMatch": {"$eq": 1000}}} in either
    assert {"type": COMMAND_TYPE, "targets": {"$elemMatch": {"$eq": "1000"}}} in either
    code_only = design.node_filter(couch, 1000, code_only=True).selector
    assert COMMAND_TYPE not in json.dumps(code_only)


def test_an_old_design_document_is_upgraded_by_setup(fleet: Fleet) -> None:
    current = fleet.code.get(design.DESIGN_ID)
    assert current is not None
    current["himbeere_version"] = design.FLEET_COMMANDS_SINCE - 1
    current["filters"]["node"] = "function (doc, req) { return false; }"
    fleet.code.save(current)
    assert design.design_usable(fleet.code)  # an old daemon's filter still runs
    install.setup(fleet)
    upgraded = fleet.code.get(design.DESIGN_ID)
    assert upgraded is not None and upgraded["himbeere_version"] == design.VERSION
    assert "himbeere-command" in upgraded["filters"]["node"]


# -- nodes running them ------------------------------------------------------------------
@pytest.mark.slow
def test_one_document_reaches_the_targeted_nodes_only(fleet: Fleet, node_factory: NodeFactory,
                                                       tmp_path: Path) -> None:
    nodes = start_nodes(node_factory, 1001, 1002, 1003)
    command_id = ops.create_command(
        fleet, py("import sys; print('hello from', sys.argv[1:])"), [1001, 1002])
    commands = [d for d in fleet.code.all_docs(include_docs=True)
                if d["doc"].get("type") == COMMAND_TYPE]
    assert [c["id"] for c in commands] == [command_id]  # ONE document
    for node in nodes[:2]:
        doc = wait_result(fleet, command_id, node.mac_id, node=node)
        assert doc["state"] == "done" and doc["returncode"] == 0
        assert doc["ret"] == ["hello from []\n", ""]
        assert doc["node"] == node.mac_id and doc["command"] == command_id
        assert doc["type"] == "himbeere-result" and doc["cmd"][0] == PY
        assert doc["started"] <= doc["finished"] and doc["duration"] >= 0
    # 1003 is listening (it answers the next command), yet never answered the first.
    second = ops.create_command(fleet, ["true"], [1003])
    wait_result(fleet, second, 1003, node=nodes[2])
    assert result(fleet, command_id, 1003) is None
    assert result(fleet, second, 1001) is None
    command = fleet.code.get(command_id)
    assert command is not None and "ret" not in command  # nodes never write the command
    answer = ops.command_results(fleet, command_id)
    assert set(answer["results"]) == {1001, 1002} and answer["pending"] == []
    assert answer["done"]


@pytest.mark.slow
def test_all_reaches_every_node_and_failures_are_recorded(fleet: Fleet,
                                                          node_factory: NodeFactory) -> None:
    start_nodes(node_factory, 1001, 1002)
    command_id = ops.create_command(fleet, ["sh", "-c", "echo out; echo err >&2; exit 3"], "all",
                                    timeout=20)
    for mac in (1001, 1002):
        doc = wait_result(fleet, command_id, mac)
        assert doc["returncode"] == 3 and doc["ret"] == ["out\n", "err\n"]
        assert ops.failed(doc)
    missing = ops.create_command(fleet, ["/no/such/program"], [1001])
    doc = wait_result(fleet, missing, 1001)
    assert doc["state"] == "error" and "no such program" in doc["error"]
    listing = ops.list_commands(fleet)
    assert [c["id"] for c in listing] == [missing, command_id]  # newest first
    assert listing[1]["answered"] == 2 and listing[1]["failed"] == 2


@pytest.mark.slow
def test_exactly_once_across_daemon_restarts_and_replays(fleet: Fleet, node_factory: NodeFactory,
                                                         tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    node = start_nodes(node_factory, 1001)[0]
    command_id = ops.create_command(fleet, append_line(ran), "all")
    wait_result(fleet, command_id, 1001, node=node)
    assert node.stop() == 0
    (node.state_dir / "seq.json").unlink()  # replay the whole feed after the restart
    node.start()
    wait_for(lambda: (node.status() or {}).get("state") == "running", 30)
    marker = ops.create_command(fleet, ["true"], [1001])
    wait_result(fleet, marker, 1001, node=node)  # the replay is past the first command
    assert ran.read_text() == "ran\n"
    # The journal entry goes just after the result is written.
    wait_for(lambda: Journal(node.state_dir / "commands.json").read() == {})


@pytest.mark.slow
def test_kill_9_mid_command_writes_its_real_result_once(fleet: Fleet, node_factory: NodeFactory,
                                                        tmp_path: Path) -> None:
    """Regression: a fleet command running at a kill -9 ran on, but was marked interrupted."""
    ran = tmp_path / "ran.txt"
    node = start_nodes(node_factory, 1001)[0]
    code = (f"open({str(ran)!r}, 'a').write('ran\\n'); import time, sys; time.sleep(3); "
            "print('slept'); sys.exit(4)")
    command_id = ops.create_command(fleet, py(code), [1001], timeout=120)
    try:
        wait_for(lambda: ran.exists() and (result(fleet, command_id, 1001) or {}).get("state")
                 == "running", 30, message=lambda: node.log()[-3000:])
        node.kill()
        node.kill_programs()
        node.start()
        doc = wait_result(fleet, command_id, 1001, node=node)
        assert doc["state"] == "done", doc
        assert doc["returncode"] == 4 and doc["ret"] == ["slept\n", ""]
        assert doc["command"] == command_id and doc["node"] == 1001
        wait_for(lambda: Journal(node.state_dir / "commands.json").read() == {})
        assert ran.read_text() == "ran\n"
    finally:
        for pid_file in (node.state_dir / "commands").glob("*/pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


@pytest.mark.slow
def test_a_node_that_joins_later_skips_old_all_commands_but_runs_named_ones(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    start_nodes(node_factory, 1001)
    old_all = ops.create_command(fleet, append_line(tmp_path / "all.txt"), "all")
    old_named = ops.create_command(fleet, ["true"], [1001, 1002])
    # 1001 was there when both were made. Wait for its results before the
    # backdating: a feed may hand it only the backdated revision, which an
    # "all" command's age rule would then rightly skip.
    wait_result(fleet, old_all, 1001)
    wait_result(fleet, old_named, 1001)
    for doc_id in (old_all, old_named):  # as if they were made an hour ago
        doc = fleet.code.get(doc_id)
        assert doc is not None
        doc["created_time"] -= 3600
        fleet.code.save(doc)
    late = start_nodes(node_factory, 1002)[0]
    wait_result(fleet, old_named, 1002, node=late)
    new_all = ops.create_command(fleet, ["true"], "all")
    wait_result(fleet, new_all, 1002, node=late)
    assert result(fleet, old_all, 1002) is None
    assert ops.command_results(fleet, old_all)["not_targeted"] == [1002]
    assert (tmp_path / "all.txt").read_text() == "ran\n"
    assert "created before this node first started" in late.log()
    assert json.loads((late.state_dir / "first_start.json").read_text())["time"] > 0


def test_journal_keys_of_fleet_commands_survive_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    """In-process: a queued fleet command left in the journal runs on recover()."""
    command_id = ops.create_command(fleet, ["echo", "late"], [1001])
    key = result_id(command_id, 1001)
    Journal(tmp_path / "commands.json").set(key, "queued")
    runner = Commands(fleet.code, 1001, tmp_path, status_db=fleet.status)
    try:
        assert runner.recover() == 0
        doc = wait_result(fleet, command_id, 1001)
        assert doc["ret"] == ["late\n", ""]
    finally:
        runner.stop()
    assert Journal(tmp_path / "commands.json").read() == {}


def test_a_started_fleet_command_in_the_journal_is_marked_interrupted(fleet: Fleet,
                                                                      tmp_path: Path) -> None:
    command_id = ops.create_command(fleet, ["echo", "never"], [1001])
    Journal(tmp_path / "commands.json").set(result_id(command_id, 1001), "started")
    runner = Commands(fleet.code, 1001, tmp_path, status_db=fleet.status)
    try:
        assert runner.recover() == 1
        doc = wait_result(fleet, command_id, 1001)
        assert doc["state"] == "interrupted" and "ret" not in doc
    finally:
        runner.stop()


@pytest.mark.slow
def test_a_daemon_with_node_credentials_answers_in_the_status_database(
        fleet: Fleet, node_factory: NodeFactory, couch: Couch) -> None:
    mac = 10**14 + secrets.randbelow(10**14)
    password = users.provision(fleet, mac)["password"]
    try:
        node_client = fleet.couch.as_user(str(mac), password)
        node = node_factory(mac_id=mac, url=node_client.url)
        wait_for(node.status, 30, message=lambda: node.log()[-3000:])
        command_id = ops.create_command(fleet, ["echo", "as a node"], [mac])
        doc = wait_result(fleet, command_id, mac, node=node)
        assert doc["ret"] == ["as a node\n", ""]
        # ...but a node may not make commands, nor answer for another node.
        as_node = Fleet(node_client.url, fleet.code.name)
        with pytest.raises(Unauthorized):
            as_node.code.save({"type": COMMAND_TYPE, "targets": "all", "cmd": ["reboot"]})
        with pytest.raises(Unauthorized):
            as_node.status.save({"_id": result_id(command_id, 1001), "node": 1001})
    finally:
        users_db = couch.database("_users")
        user = users_db.get(security.user_id(mac))
        if user:
            users_db.delete(user)


# -- targets -----------------------------------------------------------------------------
def test_targets_resolve_names_macs_and_labels(fleet: Fleet) -> None:
    fleet.set_name(1001, "kitchen")
    ops.set_labels(fleet, 1001, room="lab", rack="1")
    ops.set_labels(fleet, 1002, room="lab")
    ops.set_labels(fleet, 1003, room="office")
    assert ops.resolve_targets(fleet, all=True) == "all"
    assert ops.resolve_targets(fleet, labels=["room=lab"]) == [1001, 1002]
    assert ops.resolve_targets(fleet, labels={"room": "lab", "rack": "1"}) == [1001]
    assert ops.resolve_targets(fleet, nodes=["kitchen", "1003"]) == [1001, 1003]
    assert ops.resolve_targets(fleet, nodes=["1003"], labels=["rack=1"]) == [1001, 1003]
    with pytest.raises(NotFound, match="room=lab, room=office"):
        ops.resolve_targets(fleet, labels=["room=cellar"])
    with pytest.raises(ConfigError, match="--all"):
        ops.resolve_targets(fleet, all=True, nodes=["1001"])
    with pytest.raises(ConfigError, match="say where"):
        ops.resolve_targets(fleet)
    with pytest.raises(ConfigError, match="key=value"):
        ops.resolve_targets(fleet, labels=["room"])
    assert ops.set_labels(fleet, 1001, rack="") == {"room": "lab"}
    doc = fleet.status.get("node:1001")
    assert doc is not None and doc["name"] == "kitchen" and doc["labels"] == {"room": "lab"}


# -- the CLI -----------------------------------------------------------------------------
@pytest.mark.slow
def test_himbeere_cmd_prints_a_table_and_reports_a_node_that_is_down(
        fleet: Fleet, node_factory: NodeFactory) -> None:
    up, down = start_nodes(node_factory, 1001, 1002)
    fleet.set_name(1001, "kitchen")
    assert down.stop() == 0
    ran = himbeere(fleet, "cmd", "--brief", "--node", "kitchen", "--node", "1002",
                   "--timeout", "5", "--wait", "8", "--", "sh", "-c",
                   "echo first line; echo second")
    assert ran.returncode == 1, ran.stderr
    assert "1/2 answered" in ran.stderr
    assert "1 node(s) did not answer in time" in ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[1].split() == ["NODE", "EXIT", "STATE", "DURATION", "OUTPUT"]
    kitchen = next(line for line in lines if line.startswith("kitchen (1001)"))
    assert "0" in kitchen.split() and "done" in kitchen and "first line" in kitchen
    assert "second" not in kitchen
    other = next(line for line in lines if line.startswith("1002"))
    assert "no answer (node stopped)" in other
    command_id = lines[0].split()[1].rstrip(":")
    # The node comes back and answers; --result shows it.
    down.start()
    wait_result(fleet, command_id, 1002, node=down)
    again = himbeere(fleet, "cmd", "--result", command_id, "--brief")
    assert again.returncode == 0, again.stderr
    rows = again.stdout.splitlines()[2:]
    assert len(rows) == 2 and all("first line" in row for row in rows), again.stdout
    as_json = json.loads(himbeere(fleet, "cmd", "--result", command_id, "--json").stdout)
    assert as_json["ok"] and set(as_json["results"]) == {"1001", "1002"}
    assert as_json["pending"] == []


@pytest.mark.slow
def test_himbeere_cmd_exits_non_zero_when_a_node_fails(fleet: Fleet,
                                                       node_factory: NodeFactory) -> None:
    start_nodes(node_factory, 1001, 1002)
    ops.set_labels(fleet, 1001, role="a")
    ops.set_labels(fleet, 1002, role="a")
    code = "import sys; print('failing'); sys.exit(1)"
    ran = himbeere(fleet, "cmd", "--brief", "--label", "role=a", "--timeout", "20", "--", PY,
                   "-c", code)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "2/2 answered" in ran.stderr and "2 node(s) failed" in ran.stderr
    rows = [line.split() for line in ran.stdout.splitlines() if line.startswith("100")]
    assert [row[:3] for row in rows] == [["1001", "1", "done"], ["1002", "1", "done"]]
    ok = himbeere(fleet, "cmd", "--all", "--json", "--timeout", "20", "--", "echo", "fine")
    answer = json.loads(ok.stdout)
    assert ok.returncode == 0 and answer["ok"]
    assert {k: v["ret"][0] for k, v in answer["results"].items()} == {
        "1001": "fine\n", "1002": "fine\n"}
    listing = himbeere(fleet, "cmd", "--list")
    assert listing.returncode == 0 and "2/2" in listing.stdout


def test_himbeere_cmd_errors_are_one_line(fleet: Fleet) -> None:
    no_target = himbeere(fleet, "cmd", "--", "true")
    assert no_target.returncode == 1
    assert no_target.stderr.strip().splitlines() == [
        "himbeere: error: say where to run it: --all, --node NODE or --label key=value"]
    unknown = himbeere(fleet, "cmd", "--result", "cmd-nope")
    assert unknown.returncode == 1 and "no command 'cmd-nope'" in unknown.stderr
    nowhere = himbeere(fleet, "cmd", "--all", "--server", "http://127.0.0.1:9", "--", "true")
    assert nowhere.returncode == 1
    assert "cannot reach the CouchDB server at http://127.0.0.1:9" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1


def test_command_documents_have_the_documented_fields(fleet: Fleet) -> None:
    command_id = ops.create_command(fleet, ["uname", "-a"], [1002, 1001], timeout=7)
    doc = fleet.code.get(command_id)
    assert doc is not None
    expected: dict[str, Any] = {"type": "himbeere-command", "targets": [1001, 1002],
                                "cmd": ["uname", "-a"], "timeout": 7,
                                "expected": [1001, 1002]}
    assert {k: doc[k] for k in expected} == expected
    assert isinstance(doc["created_time"], float) and doc["created"].endswith("Z")
    assert command_id.startswith("cmd-")
    with pytest.raises(ConfigError):
        ops.create_command(fleet, [], "all")
    with pytest.raises(ConfigError):
        ops.create_command(fleet, ["true"], [])
    fleet.status.save({"_id": status_id(1003), "type": "himbeere-status", "node": 1003})
    everywhere = fleet.code.get(ops.create_command(fleet, ["true"], "all"))
    assert everywhere is not None and everywhere["targets"] == "all"
    assert everywhere["expected"] == [1003]

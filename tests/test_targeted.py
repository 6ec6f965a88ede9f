"""Programs for many nodes: one ``program:<name>`` document, run where its targets match.

``himbeere-upload push PATH --all`` or ``--label room=lab`` writes it; each
node runs it while its own labels (``node:<mac>``) match, and stops it when
they no longer do (:mod:`himbeere.fleet.targeting`).  The daemons here are
real (heartbeat every second) on the real server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import pytest

from himbeere.couch import Couch, Doc
from himbeere.exceptions import Unauthorized
from himbeere.fleet.targeting import READ_EVERY, NodeLabels
from himbeere.schema import PROGRAM_TYPE, node_id, targeted_id
from tests.conftest import Upload
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, pid_alive, start_nodes
from uploader import ops
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]

LOOP = ("import time\n"
        "def main():\n"
        "    log('up')\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")



def write(path: Path, text: str = LOOP) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def gone(node: Node, doc_id: str, timeout: float = 20.0) -> None:
    """Wait until ``node`` no longer reports ``doc_id`` (stopped and forgotten)."""
    wait_for(lambda: node.status() is not None and not node.program(doc_id), timeout,
             message=lambda: f"{doc_id} still on {node.mac_id}: {node.program(doc_id)}\n"
                             f"{node.log()[-3000:]}")


def beats(node: Node, count: int = 2) -> None:
    """Wait for ``count`` more heartbeats of ``node``: what it would do, it did."""
    first = (node.status() or {}).get("_rev", "0-")
    wait_for(lambda: int(str((node.status() or {}).get("_rev", "0-")).split("-")[0])
             >= int(first.split("-")[0]) + count, 20)


@pytest.mark.slow
def test_one_document_runs_where_the_labels_match_and_follows_them(
        fleet: Fleet, node_factory: NodeFactory, upload: Upload, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], cli_env: None) -> None:
    ops.set_labels(fleet, 1001, room="lab")
    nodes = {n.mac_id: n for n in start_nodes(node_factory, 1001, 1002)}
    source = write(tmp_path / "sensor.py")

    # --all: one document, both nodes run it.
    code, out, err = upload("push", str(source), "--all", "--name", "everywhere")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("created program:everywhere (rev ")
    assert lines[1:] == ["  added main.py (5 lines)", "  targets all"]
    for node in nodes.values():
        entry = node.wait_program("program:everywhere", state="running")
        assert entry["targets"] == "all" and entry["placed"] is False

    # --label: only the labelled node runs it.
    code, _, err = upload("push", str(source), "--label", "room=lab", "--name", "lab")
    assert code == 0, err
    doc = fleet.code.get(targeted_id("lab"))
    assert doc is not None and doc["type"] == PROGRAM_TYPE
    assert doc["targets"] == {"labels": {"room": "lab"}}
    nodes[1001].wait_program("program:lab", state="running")
    nodes[1001].wait_log("labels room=lab match")
    beats(nodes[1002])
    assert not nodes[1002].program("program:lab")
    # Pushed again unchanged: nothing written, nothing restarts.
    code, out, _ = upload("push", str(source), "--label", "room=lab", "--name", "lab")
    assert code == 0 and out.startswith("unchanged: program:lab")

    # A per-MAC document works beside them, as ever.
    code, _, err = upload("push", str(source), "--node", "1002", "--name", "own")
    assert code == 0, err
    nodes[1002].wait_program("1002:own", state="running")

    # 1002 joins the lab: it starts there; its log says why.
    ops.set_labels(fleet, 1002, room="lab")
    nodes[1002].wait_program("program:lab", state="running")
    nodes[1002].wait_log("labels room=lab match")
    # himbeere status lists it with the node's other programs, and says what it targets.
    code, out, err = himbeere(capsys, "status", "1002")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "program:lab" in rows["lab"] and "(targets room=lab)" in rows["lab"]
    assert "(targets all)" in rows["everywhere"] and "(targets" not in rows["own"]
    # 1001 leaves the lab: it stops there; the program's own log says why.
    pid = nodes[1001].program("program:lab")["pid"]
    ops.set_labels(fleet, 1001, room="")
    gone(nodes[1001], "program:lab")
    nodes[1001].wait_log("labels no longer match targets room=lab (this node has: none), "
                         "stopping")
    assert not _alive(pid)
    wait_for(lambda: any("labels no longer match targets room=lab" in text for _, _, text
                         in ops.log_lines(ops.logs(fleet, 1001, "program:lab"))), 20,
             message="the program's own log does not say why it stopped")
    for mac in (1001, 1002):  # the others run on, untouched
        assert nodes[mac].program("program:everywhere")["restarts"] == 0
    assert nodes[1002].program("1002:own")["state"] == "running"

    # ls: the node column says what it targets, the state where it runs.
    code, out, _ = upload("ls")
    rows = {line.split()[2]: line for line in out.splitlines()[1:]}
    assert rows["program:everywhere"].split()[:2] == ["all", "everywhere"]
    assert rows["program:everywhere"].endswith("running on 1001, 1002")
    assert rows["program:lab"].split()[:2] == ["room=lab", "lab"]
    assert rows["program:lab"].endswith("running on 1002")
    listing = json.loads(upload("ls", "--json")[1])["programs"]
    (lab,) = [p for p in listing if p["id"] == "program:lab"]
    assert lab["targets"] == {"labels": {"room": "lab"}} and lab["targeted"] is True

    # pull and rm address it like a placed program; removing it stops it.
    code, out, err = upload("pull", "lab", str(tmp_path / "pulled"), "--targeted")
    assert code == 0, err
    assert (tmp_path / "pulled" / "main.py").read_text() == LOOP
    code, out, err = upload("rm", "lab", "--targeted")
    assert code == 0 and out.strip() == "removed program:lab", err
    gone(nodes[1002], "program:lab")
    code, _, err = upload("rm", "lab", "--targeted")
    assert code == 1 and "no program 'lab' among the programs for many nodes; there are: " \
        "everywhere" in err


def _alive(pid: Optional[int]) -> bool:
    return pid is not None and pid_alive(pid)


@pytest.mark.slow
def test_a_node_reads_its_labels_when_the_first_targeted_document_arrives(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    """No label-selecting document yet: the node does not read its labels at each beat;
    the first one that arrives makes it read them at once, and it runs the program."""
    (node,) = start_nodes(node_factory, 1003)
    ops.set_labels(fleet, 1003, rack="2", room="lab")
    fleet.code.save({"_id": targeted_id("two"), "type": PROGRAM_TYPE, "name": "two",
                     "code": LOOP, "targets": {"labels": {"room": "lab", "rack": "2"}}})
    fleet.code.save({"_id": targeted_id("other"), "type": PROGRAM_TYPE, "name": "other",
                     "code": LOOP, "targets": {"labels": {"room": "kitchen"}}})
    fleet.code.save({"_id": targeted_id("listed"), "type": PROGRAM_TYPE, "name": "listed",
                     "code": LOOP, "targets": [1003]})
    node.wait_program("program:two", state="running", targets={
        "labels": {"room": "lab", "rack": "2"}})
    node.wait_program("program:listed", state="running")
    beats(node)
    assert not node.program("program:other")
    # Retargeted by hand to this node's room: it starts.
    doc = fleet.code.get(targeted_id("other"))
    assert doc is not None
    fleet.code.save(dict(doc, targets={"labels": {"room": "lab"}}))
    node.wait_program("program:other", state="running")


def test_node_labels_are_read_once_a_document_selects_by_them(fleet: Fleet) -> None:
    told: list[dict[str, str]] = []
    labels = NodeLabels(fleet.status, 1004, on_change=told.append)
    ops.set_labels(fleet, 1004, room="lab")
    labels.note({"_id": targeted_id("a"), "type": PROGRAM_TYPE, "targets": "all"})
    labels.refresh()  # nothing selects by labels yet: not read
    assert (labels.labels, told) == (None, [])
    labels.note({"_id": targeted_id("b"), "type": PROGRAM_TYPE,
                 "targets": {"labels": {"room": "lab"}}})
    assert told == [{"room": "lab"}]
    labels.refresh()  # unchanged: nothing told
    ops.set_labels(fleet, 1004, room="", rack="2")
    for _ in range(READ_EVERY - 2):  # read at every READ_EVERY-th heartbeat (issue 14)
        labels.refresh()
    assert told == [{"room": "lab"}]
    labels.refresh()
    assert told == [{"room": "lab"}, {"rack": "2"}]


def test_a_node_may_not_write_a_program_for_many_nodes(
        fleet: Fleet, node_user: Callable[[], tuple[int, str]]) -> None:
    mac, url = node_user()
    as_node = Couch(url).database(fleet.code.name)
    doc: Doc = {"_id": targeted_id("evil"), "type": PROGRAM_TYPE, "name": "evil",
                "code": "def main():\n    pass\n", "targets": "all"}
    with pytest.raises(Unauthorized, match="may not create documents"):
        as_node.save(dict(doc))
    assert fleet.code.get(doc["_id"]) is None
    saved = fleet.code.save(dict(doc, targets={"labels": {"room": "lab"}}))
    with pytest.raises(Unauthorized):  # nor retarget a deployer's to itself
        as_node.save(dict(doc, _rev=saved["_rev"], targets=[mac]))
    with pytest.raises(Unauthorized):  # nor give itself the labels it selects
        Couch(url).database(fleet.status.name).save(
            {"_id": node_id(mac), "type": "himbeere-node", "labels": {"room": "lab"}})
    assert fleet.code.get(doc["_id"])["targets"] == {"labels": {"room": "lab"}}  # type: ignore[index]


@pytest.mark.parametrize(("flags", "message"), [
    (["--all", "--node", "1000"], "--all pushes one program for many nodes; drop --node"),
    (["--label", "room"], "label 'room' is not allowed; allowed: key=value"),
    (["--label", "room="], "--label room= has no value"),
    (["--all", "--label", "room=lab"], "--all runs it on every node: drop --label"),
    (["--all", "--placed"], "drop --all"),
    (["--all", "--global"], "drop --global"),
])
def test_bad_flags_are_one_line_errors(fleet: Fleet, upload: Upload, tmp_path: Path,
                                       flags: list[str], message: str) -> None:
    code, out, err = upload("push", str(write(tmp_path / "p.py")), *flags)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert message in err
    assert fleet.code.get(targeted_id("p")) is None


def test_pull_and_rm_say_which_kind_of_program(fleet: Fleet, upload: Upload,
                                               tmp_path: Path) -> None:
    code, _, err = upload("pull", "x", str(tmp_path), "--targeted", "--placed")
    assert code == 1 and "one of --node, --global, --placed, --targeted" in err
    code, _, err = upload("rm", "x")
    assert code == 1 and "--node NODE, --global, --placed or --targeted" in err
    code, _, err = upload("pull", "x", str(tmp_path), "--targeted")
    assert code == 1 and "no program 'x' among the programs for many nodes" in err

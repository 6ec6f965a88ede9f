"""A program's persistent ``state`` (issue 5), on the real server.

Unit tests drive :class:`~himbeere.runtime.progstate.ProgramState` against the
server directly; the end-to-end tests run real daemons with real node
users (so the status database's write rules apply) and look where a user
would: at files the programs write, at ``himbeere state`` and at the
``state:<program id>`` document.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from himbeere import defaults
from himbeere.couch import Couch, Database
from himbeere.runtime.child import Helpers, ProgramSpec
from himbeere.runtime.progstate import STATE_TYPE, ProgramState, state_id
from tests.conftest import NodeUserFactory
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, wait_file
from tests.test_ops_cli import heartbeat
from uploader import install
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]


def state_of(db: Database, program: str, node: int = 1) -> ProgramState:
    return ProgramState(lambda: db, program, program.split(":")[-1], node)


# -- ProgramState against the server -------------------------------------------------------

def test_state_is_read_only_when_touched_and_written_only_when_changed(couch: Couch,
                                                                       dbname: str) -> None:
    db = couch.database(dbname)
    asked: list[int] = []

    def status_db() -> Database:
        asked.append(1)
        return db

    state = ProgramState(status_db, "1:counter", "counter", 1)
    assert state.save() is False and not state.loaded and asked == []
    assert "not read yet" in repr(state) and asked == []
    assert state.get("runs", 0) == 0 and state.loaded
    assert state.save() is False  # read, nothing changed: nothing written
    assert db.get(state_id("1:counter")) is None
    state["runs"] = 1
    assert state.save() is True
    doc = db.get(state_id("1:counter"))
    assert doc is not None
    assert doc["values"] == {"runs": 1}
    assert (doc["type"], doc["program"], doc["name"], doc["node"]) == (
        STATE_TYPE, "1:counter", "counter", 1)
    assert state.save() is False
    again = state_of(db, "1:counter")
    assert dict(again) == {"runs": 1}


def test_values_must_be_json(couch: Couch, dbname: str) -> None:
    state = state_of(couch.database(dbname), "1:p")
    with pytest.raises(TypeError, match="state keys are strings"):
        state[1] = "one"  # type: ignore[index]
    with pytest.raises(TypeError, match=r"state\['s'\] must be JSON"):
        state["s"] = {1, 2}
    with pytest.raises(TypeError, match="NaN"):
        state["n"] = float("nan")
    state["ok"] = {"nested": [1, 2.5, "x", None, True]}
    assert state.save()


def test_changes_in_place_and_deletions_are_saved(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    state = state_of(db, "1:p")
    state["seen"] = [1]
    state["gone"] = "soon"
    state.save()
    seen = state["seen"]
    seen.append(2)  # no assignment: a save still finds it
    del state["gone"]
    assert state.save() is True
    assert db.get(state_id("1:p"))["values"] == {"seen": [1, 2]}
    seen.append(3)  # the program's own list is still the one in state after a save
    assert state.save() is True
    assert db.get(state_id("1:p"))["values"] == {"seen": [1, 2, 3]}


def test_two_writers_merge_on_conflict(couch: Couch, dbname: str) -> None:
    """A 409 re-reads the document: our changed keys win, the other's keys stay."""
    db = couch.database(dbname)
    first, second = state_of(db, "p", node=1), state_of(db, "p", node=2)
    first.update(runs=1, a="a1", shared="first", doomed=True)
    first.save()
    assert dict(second) == {"runs": 1, "a": "a1", "shared": "first", "doomed": True}
    second["b"] = "b1"
    second["shared"] = "second"
    first["a"] = "a2"
    first["shared"] = "first again"
    del first["doomed"]
    first.save()
    assert second.save() is True  # stale _rev: 409, read again, merged
    values = db.get(state_id("p"))["values"]
    assert values == {"runs": 1, "a": "a2", "b": "b1", "shared": "second"}
    assert dict(second) == values  # the other writer's keys show after the save
    assert db.get(state_id("p"))["node"] == 2
    first["runs"] = 2
    first.save()  # conflicts too; keeps second's b and shared
    assert db.get(state_id("p"))["values"] == {"runs": 2, "a": "a2", "b": "b1",
                                                "shared": "second"}


def test_a_save_after_a_reset_starts_the_document_again(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    state = state_of(db, "p")
    state.update(runs=5, keep="me")
    state.save()
    db.delete(db.get(state_id("p")))  # what `himbeere state p --reset` does
    state["runs"] = 6
    assert state.save() is True
    assert db.get(state_id("p"))["values"] == {"runs": 6}  # only what changed since
    assert dict(state) == {"runs": 6}


def test_the_child_saves_state_every_interval_only_when_it_changed(
        couch: Couch, couch_url: str, dbname: str) -> None:
    """Issue 12: `himbeere state` said "no state yet" while the program updated it."""
    db = couch.database(dbname)
    spec = ProgramSpec(name="ticker", doc_id="1:ticker", rev="1-x", modules={},
                       main_module="main", global_modules={}, node=1, couch_url=couch_url,
                       database=dbname, status_database=dbname, state_interval=0.1)
    helpers = Helpers(spec, send=lambda message: None)
    try:
        helpers.state["ticks"] = 1  # the first touch reads the document, then saves begin
        saved = wait_for(lambda: db.get(state_id("1:ticker")))
        assert saved["values"] == {"ticks": 1} and isinstance(saved["saved"], float)
        time.sleep(5 * spec.state_interval)
        assert db.get(state_id("1:ticker"))["_rev"] == saved["_rev"]  # nothing changed
        helpers.state["ticks"] = 2
        again = wait_for(lambda: (db.get(state_id("1:ticker")) or {}).get("values") ==
                         {"ticks": 2} and db.get(state_id("1:ticker")))
        assert again["_rev"].startswith("2-")  # one save per change, none in between
    finally:
        helpers.request_quit()  # ends the saves (and saves once more: nothing changed)


def test_state_command_says_a_running_program_saves_soon(
        fleet: Fleet, cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.code.save({"_id": "1001:ticker", "type": 1001, "name": "ticker",
                     "code": "def main(): pass\n"})
    heartbeat(fleet, 1001, programs={"1001:ticker": {"name": "ticker", "state": "running"}})
    code, out, _ = himbeere(capsys, "state", "ticker")
    assert code == 0 and out.strip() == (
        "ticker (1001:ticker) has no state yet (it runs on node 1001; a program's state is "
        f"saved every {defaults.STATE_SAVE_INTERVAL:g} s once it changes)")


# -- programs on real nodes -----------------------------------------------------------------

COUNTER = """\
import os, time

def put(path, text):
    with open(path + '.tmp', 'w') as out:
        out.write(str(text))
    os.replace(path + '.tmp', path)

def main():
    state['runs'] = state.get('runs', 0) + 1
    state.setdefault('nodes', []).append(node)
    log('run', state['runs'], 'on', node)
    if state['runs'] < 3:
        put({runs!r}, state['runs'])
        raise RuntimeError('crash number %d' % state['runs'])  # saved at exit
    state.save()
    put({runs!r}, state['runs'])
    while not should_quit():
        time.sleep(0.05)
"""


@pytest.mark.slow
def test_state_survives_crashes_daemon_restarts_and_moves(
        node_user: NodeUserFactory, node_factory: NodeFactory, code_db: Database,
        couch: Couch, dbname: str, tmp_path: Path, cli_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    status_db = couch.database(dbname + "_status")
    runs = tmp_path / "runs"
    (mac, url), (other_mac, other_url) = node_user(), node_user()
    doc_id = f"{mac}:counter"
    code_db.save({"_id": doc_id, "type": mac, "name": "counter",
                  "code": COUNTER.format(runs=str(runs))})

    # Two crashes (autosaved after each), then it stays up: runs == 3.
    node = node_factory(mac_id=mac, url=url)
    wait_file(runs, contains="3", timeout=30)
    node.wait_program(doc_id, state="running", restarts=2, timeout=30)
    assert status_db.get(state_id(doc_id))["values"] == {"runs": 3, "nodes": [mac] * 3}

    # A daemon restart: the fresh process reads 3 back.
    assert node.stop() == 0
    node = node_factory(mac_id=mac, url=url)
    wait_file(runs, contains="4")
    node.wait_log("[counter] run 4 on")

    code, out, _ = himbeere(capsys, "state", "counter")
    assert code == 0
    assert out.startswith(f"state of counter ({doc_id}), saved ")
    assert json.loads(out.split(":\n", 1)[1]) == {"runs": 4, "nodes": [mac] * 4}
    code, out, _ = himbeere(capsys, "state", doc_id, "--json")
    shown = json.loads(out)
    assert shown["values"]["runs"] == 4 and shown["running_on"] == [mac]

    # Moved to another node: the state follows (the id has no MAC in it).
    code_db.save(dict(code_db.get(doc_id), type=other_mac))
    other = node_factory(mac_id=other_mac, url=other_url)
    wait_file(runs, contains="5")
    other.wait_log("[counter] run 5 on")
    other.wait_program(doc_id, state="running")
    values = status_db.get(state_id(doc_id))["values"]
    assert values == {"runs": 5, "nodes": [mac] * 4 + [other_mac]}
    assert status_db.get(state_id(doc_id))["node"] == other_mac

    # --reset clears it: the next start counts from 1 again.
    assert other.stop() == 0
    code, out, err = himbeere(capsys, "state", "counter", "--reset")
    assert code == 0 and out.strip() == f"cleared the state of counter ({doc_id})"
    assert status_db.get(state_id(doc_id)) is None
    code, out, _ = himbeere(capsys, "state", "counter")
    # (The first node's status may still list it as running: then it says so.)
    assert code == 0 and out.startswith(f"counter ({doc_id}) has no state yet")
    code, out, _ = himbeere(capsys, "state", "counter", "--reset")
    assert code == 0 and "had no state; nothing to clear" in out
    again = node_factory(mac_id=other_mac, url=other_url)
    again.wait_log("[counter] run 1 on")
    again.wait_program(doc_id, state="running", restarts=2, timeout=30)
    for daemon in (node, other, again):
        log = daemon.log()
        for refusal in (" 401 ", " 403 ", "not saved"):
            assert refusal not in log, f"{refusal!r} in the node log:\n{log[-3000:]}"


@pytest.mark.slow
def test_state_is_saved_when_asked_to_quit_even_if_main_never_returns(
        node_factory: NodeFactory, code_db: Database, couch: Couch, dbname: str,
        tmp_path: Path) -> None:
    """Autosave on should_quit: after the quit notifications, before the SIGTERM."""
    started = tmp_path / "started"
    code_db.save({"_id": "stubborn", "type": 1000, "restart": "never", "code": (
        "import time\n"
        "def main():\n"
        "    state['before'] = 'quit'\n"
        "    register_quit_notification(lambda: state.update(bye=True))\n"
        f"    open({str(started)!r}, 'w').write('started')\n"
        "    while True:\n"          # ignores should_quit(): ends by SIGTERM
        "        time.sleep(0.05)\n")})
    node = node_factory(mac_id=1000)
    wait_file(started)
    node.wait_program("stubborn", state="running")
    code_db.save(dict(code_db.get("stubborn"), enabled=False))
    node.wait_program("stubborn", state="stopped", timeout=30)
    assert "stubborn: did not quit within the grace period; SIGTERM" in node.log()
    doc = couch.database(dbname + "_status").get(state_id("stubborn"))
    assert doc is not None and doc["values"] == {"before": "quit", "bye": True}


TICKER = """\
import time

def main():
    ticks = 0
    while not should_quit():
        ticks += 1
        state['ticks'] = ticks  # never state.save(): the child saves it now and then
        time.sleep(0.05)
"""


@pytest.mark.slow
def test_state_of_a_running_program_shows_without_save(
        node_factory: NodeFactory, code_db: Database, fleet: Fleet, cli_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: `himbeere state` said "no state yet" while the program updated it."""
    code_db.save({"_id": "ticker", "type": 1000, "name": "ticker", "code": TICKER})
    node = node_factory(mac_id=1000)
    node.wait_program("ticker", state="running")

    def shown() -> str:
        code, out, err = himbeere(capsys, "state", "ticker")
        assert code == 0, err
        return out if out.startswith("state of ticker, saved at ") else ""

    # Within one interval of the first change, and the timeout leaves room for more.
    out = wait_for(shown, timeout=defaults.STATE_SAVE_INTERVAL + 20)
    header, values = out.split(":\n", 1)
    assert header.endswith("ago) by node 1000")
    assert json.loads(values)["ticks"] > 0


def test_state_command_finds_programs_by_name_id_and_node(
        couch: Couch, couch_url: str, dbname: str, cli_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)
    fleet.set_name(1001, "kitchen")
    for mac in (1001, 1002):
        fleet.code.save({"_id": f"{mac}:counter", "type": mac, "name": "counter",
                         "code": "def main(): pass\n"})
    state = state_of(fleet.status, "1002:counter", node=1002)
    state["runs"] = 7
    state.save()

    code, _, err = himbeere(capsys, "state", "counter")
    assert code == 1
    assert "several nodes have a program 'counter'" in err and "--node NODE" in err
    code, out, _ = himbeere(capsys, "state", "counter", "--node", "1002")
    assert code == 0 and json.loads(out.split(":\n", 1)[1]) == {"runs": 7}
    code, out, _ = himbeere(capsys, "state", "counter", "--node", "kitchen")
    assert code == 0 and out.strip() == "counter (1001:counter) has no state yet"
    code, out, _ = himbeere(capsys, "state", "1002:counter", "--json")
    answer: dict[str, Any] = json.loads(out)
    assert answer["ok"] and answer["values"] == {"runs": 7} and answer["node"] == 1002
    assert answer["running_on"] == []

    # The code is gone, the state is left: it can still be shown and cleared.
    fleet.code.delete(fleet.code.get("1002:counter"))
    code, out, _ = himbeere(capsys, "state", "1002:counter")
    assert code == 0 and '"runs": 7' in out
    code, _, err = himbeere(capsys, "state", "nothing")
    assert code == 1
    assert "no program 'nothing'" in err and "programs with state: 1002:counter" in err
    code, out, _ = himbeere(capsys, "state", "1002:counter", "--reset")
    assert code == 0 and out.strip() == "cleared the state of 1002:counter"
    wait_for(lambda: fleet.status.get(state_id("1002:counter")) is None)

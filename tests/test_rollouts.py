"""Staged rollouts (issue 13, part 2): waves, automatic rollback, leader failover, steering.

The first tests are pure steps of :func:`himbeere.fleet.rollout.step`; the
others run real node daemons (heartbeat 1 s) against the real server.  Each
program release writes a marker file ``<node>-<tag>`` when it starts, so a
test sees which node ever ran which release.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere.couch import Couch, Doc
from himbeere.exceptions import ConfigError, Unauthorized
from himbeere.fleet import rollout
from himbeere.schema import rollout_id
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, start_nodes
from uploader import install, ops, push, rollouts
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]


# -- flags ---------------------------------------------------------------------------------
def test_waves_and_durations_parse_and_bad_ones_say_what_is_allowed() -> None:
    assert rollouts.parse_waves("1,25%,100%") == ["1", "25%", "100%"]
    assert rollouts.parse_waves("2, 5, 100.0%") == ["2", "5", "100%"]
    for bad in ("1,25%", "25%,10%,100%", "0,100%", "x,100%", "1,,100%", "3,2,100%"):
        with pytest.raises(ConfigError, match="allowed: node counts or percentages"):
            rollouts.parse_waves(bad)
    assert rollouts.parse_duration("60s") == 60 and rollouts.parse_duration("2m") == 120
    assert rollouts.parse_duration("1h") == 3600 and rollouts.parse_duration("1.5") == 1.5
    with pytest.raises(ConfigError, match="--healthy-for '5 minutes' is not allowed"):
        rollouts.parse_duration("5 minutes")
    assert rollout.wave_size("25%", 4) == 1 and rollout.wave_size("25%", 5) == 2
    assert rollout.wave_size("3", 2) == 2 and rollout.wave_size("100%", 7) == 7


# -- pure steps ----------------------------------------------------------------------------
def doc(**fields: Any) -> Doc:
    return dict({"_id": "rollout:p:000002", "name": "p", "release": 2, "previous_release": 1,
                 "docs": ["placed:p"], "waves": ["1", "100%"], "healthy_for": 10.0,
                 "state": "running", "nodes": [], "wave": -1, "admitted": {}, "health": {}},
                **fields)


def status(mac: int, now: float, release: Optional[int] = 2, state: str = "running",
           restarts: int = 0, error: Optional[str] = None) -> Doc:
    programs = {} if release is None else {"placed:p": {
        "state": state, "release": release, "restarts": restarts, "last_error": error}}
    return {"_id": f"status:{mac}", "heartbeat_server_time": now, "heartbeat_interval": 1.0,
            "state": "running", "programs": programs}


def test_a_step_admits_the_canary_then_the_rest_once_it_ran_healthy_for() -> None:
    now = 1000.0
    first = rollout.step(doc(), {1: status(1, now, 1), 2: status(2, now, 1)}, now)
    assert first["nodes"] == [1, 2] and list(first["admitted"]) == ["1"] and first["wave"] == 0
    # Switched, running: healthy only once healthy_for passed and a heartbeat came after.
    seen = rollout.step(first, {1: status(1, now + 1), 2: status(2, now + 1, 1)}, now + 1)
    assert seen["health"]["1"]["since"] and not seen["health"]["1"]["healthy"]
    later = rollout.step(seen, {1: status(1, now + 8), 2: status(2, now + 12, 1)}, now + 12)
    assert later["wave"] == 0, "the canary's last heartbeat is older than healthy_for"
    later = rollout.step(later, {1: status(1, now + 12), 2: status(2, now + 12, 1)}, now + 12)
    assert later["wave"] == 1 and set(later["admitted"]) == {"1", "2"}
    done = rollout.step(later, {1: status(1, now + 30), 2: status(2, now + 30)}, now + 30)
    assert done["state"] == "running"  # node 2 first seen running the release now
    done = rollout.step(done, {1: status(1, now + 41), 2: status(2, now + 41)}, now + 41)
    assert done["state"] == "done"
    assert rollout.step(done, {}, now + 99) == rollout._copy(done)


@pytest.mark.parametrize("bad, why", [
    (dict(state="crashed", error="Traceback...\nRuntimeError: boom"), "is crashed on node 1"),
    (dict(state="backing-off"), "is backing-off"),
    (dict(state="invalid"), "is invalid"),
    (dict(state="rejected"), "is rejected"),
    (dict(restarts=2), "restarted on node 1 (2 restarts)"),
])
def test_a_failure_of_an_admitted_node_rolls_back(bad: dict[str, Any], why: str) -> None:
    now = 1000.0
    running = rollout.step(doc(), {1: status(1, now, 1), 2: status(2, now, 1)}, now)
    running = rollout.step(running, {1: status(1, now + 1), 2: status(2, now + 1, 1)}, now + 1)
    after = rollout.step(running, {1: status(1, now + 2, **bad), 2: status(2, now + 2, 1)},
                         now + 2)
    assert after["state"] == "rolled-back" and after["failure"]["mac"] == 1
    assert why in after["failure"]["why"]
    # A crash on a node not admitted is none of this rollout's business.
    other = rollout.step(running, {1: status(1, now + 2), 2: status(2, now + 2, 1, "crashed")},
                         now + 2)
    assert other["state"] == "running"


def test_a_dead_admitted_node_rolls_back_and_paused_admits_nothing() -> None:
    now = 1000.0
    running = rollout.step(doc(), {1: status(1, now, 1)}, now)
    dead = rollout.step(running, {1: status(1, now - 30)}, now)
    assert dead["state"] == "rolled-back" and "node 1 is dead" in dead["failure"]["why"]
    paused = rollout.step(doc(state="paused"), {1: status(1, now, 1)}, now)
    assert paused["admitted"] == {} and paused["state"] == "paused"


def test_the_gate_runs_the_previous_release_unless_admitted() -> None:
    from himbeere.fleet.gate import choose

    program = {"_id": "placed:p", "rollout": "rollout:p:000002"}
    assert choose(program, None, 1)[0] == "previous"
    assert choose(program, doc(admitted={"1": "t"}, wave=0), 1)[0] == "new"
    assert choose(program, doc(admitted={"1": "t"}, wave=0), 2) == (
        "previous", "not yet admitted by rollout:p:000002")
    back = doc(admitted={"1": "t"}, state="rolled-back", failure={"why": "it crashed"})
    assert choose(program, back, 1) == ("previous",
                                        "rollout:p:000002 was rolled-back (it crashed)")
    assert choose(program, doc(state="done"), 2)[0] == "new"


def test_nodes_move_a_rollout_on_but_may_not_create_delete_or_rewrite_one(
        fleet: Fleet, node_user: Any) -> None:
    mac, url = node_user()  # sets the databases up as in production
    rid = rollout_id("p", 2)
    fleet.status.save(doc(_id=rid, type="himbeere-rollout"))
    as_node = Couch(url).database(fleet.status.name)
    mine = as_node.get(rid)
    assert mine is not None
    as_node.save(dict(mine, wave=0, admitted={"1": "t"}))  # what the scheduler does
    for change in ({"docs": ["evil"]}, {"release": 7}, {"waves": ["100%"]},
                   {"kind": "daemon"}):
        current = as_node.get(rid)
        with pytest.raises(Unauthorized, match="may not change"):
            as_node.save(dict(current, **change))
    with pytest.raises(Unauthorized, match="may not create or delete"):
        as_node.save(doc(_id=rollout_id("p", 9), type="himbeere-rollout"))
    with pytest.raises(Unauthorized, match="may not create or delete"):
        as_node.delete(as_node.get(rid))


# -- real nodes ----------------------------------------------------------------------------
def program(markers: Path, tag: str, crash: bool = False) -> str:
    return (
        "import os, time\n"
        "def main():\n"
        f"    with open(os.path.join({str(markers)!r}, f'{{node}}-{tag}'), 'a') as f:\n"
        "        f.write('x')\n"
        + (f"    time.sleep(0.3)\n    raise RuntimeError('release {tag} is broken')\n"
           if crash else "")
        + "    while not should_quit():\n"
        "        time.sleep(0.05)\n")


def release(fleet: Fleet, tmp_path: Path, tag: str, replicas: int, waves: Optional[str] = None,
            healthy_for: str = "2s", crash: bool = False,
            labels: tuple[str, ...] = ()) -> Doc:
    """Push release ``tag`` of the placed program ``p``, with a rollout if ``waves``."""
    source = tmp_path / f"{tag}.py"
    source.write_text(program(tmp_path / "markers", tag, crash))
    plan = rollouts.Plan.parse(waves, healthy_for) if waves else None
    return push.push(fleet, source, None, "p", push.Placed.parse(str(replicas), labels),
                     rollout=plan)


def ran(tmp_path: Path) -> dict[str, int]:
    """``{"<node>-<tag>": starts}`` of every marker file."""
    return {f.name: len(f.read_text()) for f in (tmp_path / "markers").iterdir()}


def wait_markers(tmp_path: Path, names: list[str], timeout: float = 60.0) -> None:
    wait_for(lambda: set(names) <= set(ran(tmp_path)), timeout,
             message=lambda: f"markers {sorted(ran(tmp_path))}, wanted {names}")


def get_rollout(fleet: Fleet, rid: str) -> Doc:
    found = fleet.status.get(rid)
    assert found is not None
    return found


def wait_rollout(fleet: Fleet, rid: str, check: Callable[[Doc], bool],
                 timeout: float = 60.0) -> Doc:
    return wait_for(lambda: (lambda d: d if check(d) else None)(get_rollout(fleet, rid)),
                    timeout, message=lambda: f"rollout now {get_rollout(fleet, rid)}")


def first_release_everywhere(fleet: Fleet, tmp_path: Path, nodes: list[Node],
                             labels: tuple[str, ...] = ()) -> None:
    (tmp_path / "markers").mkdir()
    release(fleet, tmp_path, "r1", len(nodes), labels=labels)
    wait_markers(tmp_path, [f"{n.mac_id}-r1" for n in nodes])
    # The leader discovers a rollout's nodes from their heartbeats, and the
    # canary is the lowest id among those found at its first step: so every
    # status must list release 1 before the next release, or a node whose
    # heartbeat came late would not be the canary the tests expect.
    for node in nodes:
        node.wait_program("placed:p", 30, release=1, state="running")


def release_of(node: Node) -> Any:
    return node.program("placed:p").get("release")


def test_a_good_release_reaches_every_node_wave_by_wave(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, capsys: Any,
        cli_env: None) -> None:
    nodes = start_nodes(node_factory, 1101, 1102, 1103, 1104)
    first_release_everywhere(fleet, tmp_path, nodes)
    result = release(fleet, tmp_path, "r2", 4, waves="1,50%,100%", healthy_for="2s")
    rid = result["rollout"]
    assert rid == rollout_id("p", 2)  # r1 was release 1
    done = rollouts.wait(fleet, rid, say=lambda line: None, timeout=120)
    assert done["state"] == "done" and done["nodes"] == [1101, 1102, 1103, 1104]
    wait_markers(tmp_path, [f"{n.mac_id}-r2" for n in nodes])
    for node in nodes:
        wait_for(lambda n=node: release_of(n) == 2, 20, message=lambda n=node: n.program(
            "placed:p"))
    # The waves show in the admission times: 1 node, then 2, then 4, each
    # after the ones before ran the release cleanly for healthy_for.
    admitted = {int(k): rollout.parse_iso(v) for k, v in done["admitted"].items()}
    by_time = sorted(set(admitted.values()))
    assert [sum(1 for t in admitted.values() if t <= moment) for moment in by_time] == [1, 2, 4]
    for earlier, later in zip(by_time, by_time[1:]):
        assert later - earlier >= 2.0
    assert [int(k) for k in done["admitted"] if admitted[int(k)] == by_time[0]] == [1101]
    record = fleet.code.get("release:p:000002")
    assert record and record["outcome"] == "done" and record["rollout"] == rid
    code, out, _ = himbeere(capsys, "rollouts")
    assert code == 0 and "rollout:p:000002" in out and "done" in out and "4/4" in out, out
    code, out, _ = himbeere(capsys, "rollout", rid)
    assert code == 0 and "1104" in out, out


def test_a_release_that_crashes_on_the_canary_rolls_back_and_goes_no_further(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    nodes = start_nodes(node_factory, 1201, 1202, 1203)
    first_release_everywhere(fleet, tmp_path, nodes)
    result = release(fleet, tmp_path, "bad", 3, waves="1,100%", healthy_for="5s", crash=True)
    with pytest.raises(rollouts.RolloutFailed, match="rolled-back: .*release bad is broken"):
        rollouts.wait(fleet, result["rollout"], say=lambda line: None, timeout=120)
    done = get_rollout(fleet, result["rollout"])
    canary = done["failure"]["mac"]
    assert list(done["admitted"]) == [str(canary)] and canary == 1201
    assert "RuntimeError: release bad is broken" in done["failure"]["error"]
    # The canary runs the previous release again; nobody else ever ran the bad one.
    wait_for(lambda: ran(tmp_path).get(f"{canary}-r1", 0) >= 2, 30,
             message=lambda: f"markers {ran(tmp_path)}")
    node = next(n for n in nodes if n.mac_id == canary)
    wait_for(lambda: node.program("placed:p").get("state") == "running"
             and release_of(node) == 1, 30, message=lambda: node.program("placed:p"))
    assert "was rolled-back" in node.program("placed:p")["rollout"]
    assert [name for name in ran(tmp_path) if name.endswith("-bad")] == [f"{canary}-bad"]
    assert all(ran(tmp_path)[f"{n.mac_id}-r1"] == 1 for n in nodes if n.mac_id != canary)
    node.wait_log("runs release 1: rollout:p:000002 was rolled-back")
    assert fleet.code.get("release:p:000002")["outcome"] == "rolled-back"


@pytest.mark.slow
def test_a_rollout_goes_on_when_the_scheduler_leader_is_killed(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    # The leader starts first and alone, and runs no copy of the program, so
    # that killing it is not a failure of the rollout.
    leader = start_nodes(node_factory, 1301)[0]
    wait_for(lambda: (fleet.status.get("lease:scheduler") or {}).get("holder") == "1301", 30)
    others = start_nodes(node_factory, 1302, 1303, 1304)
    for node in others:
        ops.set_labels(fleet, node.mac_id, room="lab")
    first_release_everywhere(fleet, tmp_path, others, labels=("room=lab",))
    result = release(fleet, tmp_path, "r2", 3, waves="1,2,100%", healthy_for="3s",
                     labels=("room=lab",))
    rid = result["rollout"]
    wait_rollout(fleet, rid, lambda d: d.get("wave") == 0 and d["driver"]["holder"] == "1301")
    leader.kill()
    done = rollouts.wait(fleet, rid, say=lambda line: None, timeout=120)
    assert done["state"] == "done" and done["driver"]["holder"] != "1301"
    assert done["driver"]["epoch"] >= 2
    assert set(done["admitted"]) == {"1302", "1303", "1304"}
    wait_markers(tmp_path, [f"{n.mac_id}-r2" for n in others])


def test_pause_resume_and_abort(fleet: Fleet, node_factory: NodeFactory, tmp_path: Path,
                                capsys: Any, cli_env: None) -> None:
    nodes = start_nodes(node_factory, 1401, 1402, 1403)
    first_release_everywhere(fleet, tmp_path, nodes)
    rid = release(fleet, tmp_path, "r2", 3, waves="1,2,100%", healthy_for="3s")["rollout"]
    wait_rollout(fleet, rid, lambda d: d.get("wave") == 0)
    code, out, err = himbeere(capsys, "rollout", rid, "--pause")
    assert code == 0 and "paused" in out, err
    # Paused: the canary still gets checked (and is healthy), yet no wave starts.
    wait_rollout(fleet, rid, lambda d: d["health"].get("1401", {}).get("healthy"))
    time.sleep(4)  # four of the leader's heartbeats, each could admit the next wave
    assert get_rollout(fleet, rid)["wave"] == 0 and get_rollout(fleet, rid)["state"] == "paused"
    code, out, err = himbeere(capsys, "rollout", rid, "--resume")
    assert code == 0, err
    assert rollouts.wait(fleet, rid, say=lambda line: None, timeout=120)["state"] == "done"
    code, _, err = himbeere(capsys, "rollout", rid, "--pause")
    assert code == 1 and "is done already" in err

    # Abort: the canary of release r3 goes back to r2.
    rid3 = release(fleet, tmp_path, "r3", 3, waves="1,100%", healthy_for="60s")["rollout"]
    wait_markers(tmp_path, ["1401-r3"])
    code, out, err = himbeere(capsys, "rollout", rid3, "--abort")
    assert code == 0 and "aborted" in out, err
    wait_for(lambda: ran(tmp_path).get("1401-r2", 0) >= 2, 30,
             message=lambda: f"markers {ran(tmp_path)}")
    assert not {"1402-r3", "1403-r3"} & set(ran(tmp_path))
    assert get_rollout(fleet, rid3)["requested"]["action"] == "abort"


def test_the_dashboard_shows_rollouts_and_one_rollouts_nodes(
        fleet: Fleet, couch: Couch, deployer: tuple[str, str]) -> None:
    from tests.test_dashboard import login
    from uploader.dashboard import create_app

    install.setup(fleet)
    now = time.time()
    rid = rollout_id("p", 2)
    fleet.status.save(doc(_id=rid, type="himbeere-rollout", nodes=[1501, 1502], wave=0,
                          wave_started=["2026-01-01T00:00:00.000Z"],
                          admitted={"1501": "2026-01-01T00:00:00.000Z"},
                          health={"1501": {"healthy": True}}, created="2026-01-01T00:00:00.000Z",
                          updated="2026-01-01T00:00:00.000Z"))
    fleet.status.save(dict(status(1501, now), _id="status:1501"))
    fleet.status.save(dict(status(1502, now, 1), _id="status:1502"))
    app = create_app(couch.base, fleet.code.name, secret_key="test secret")
    app.config["TESTING"] = True
    try:
        client = app.test_client()
        login(client, *deployer)
        page = client.get("/rollouts").get_data(as_text=True)
        assert rid in page and "rollouts.js" in page
        listing = client.get("/api/rollouts").get_json()
        assert [(r["id"], r["ok"], r["admitted"]) for r in listing["rollouts"]] == [(rid, 1, 1)]
        one = client.get(f"/api/rollouts/{rid}").get_json()
        assert [(n["node"], n["release"], n["healthy"]) for n in one["node_list"]] == [
            (1501, 2, True), (1502, 1, False)]
        assert one["ok"] == 1  # healthy admitted nodes, not true (the page showed "true/1")
        assert client.get(f"/rollouts/{rid}").status_code == 200
        assert client.get("/api/rollouts/rollout:nope:000001").status_code == 404
    finally:
        app.extensions["himbeere"].hub.close()


def test_deployers_pause_resume_and_abort_a_rollout_on_its_page(
        fleet: Fleet, couch: Couch, deployer: tuple[str, str], make_user: Any) -> None:
    """The rollout page steers it as ``himbeere rollout ID --pause`` does; a node
    signed in gets no buttons, and its POST is refused (CouchDB would let it)."""
    from himbeere.couch import security
    from tests.test_dashboard import login, page_csrf
    from uploader.dashboard import create_app

    install.setup(fleet)
    rid = rollout_id("p", 2)
    fleet.status.save(doc(_id=rid, type="himbeere-rollout", nodes=[1501], wave=0))
    fleet.code.save({"_id": "release:p:000002", "type": "himbeere-release", "name": "p",
                     "release": 2, "docs": {}})
    app = create_app(couch.base, fleet.code.name, secret_key="test secret")
    app.config["TESTING"] = True
    try:
        client = app.test_client()
        login(client, *deployer)
        page = client.get(f"/rollouts/{rid}").get_data(as_text=True)
        assert 'id="rollout-pause"' in page and 'id="rollout-abort"' in page
        headers = {"X-CSRF-Token": page_csrf(client)}

        def steer(action: Any) -> Any:
            return client.post(f"/api/rollouts/{rid}", json={"action": action}, headers=headers)

        answer = steer("pause")
        assert answer.status_code == 200, answer.get_json()
        assert (answer.get_json()["state"], answer.get_json()["ok"]) == ("paused", 0)
        assert get_rollout(fleet, rid)["requested"]["action"] == "pause"
        assert get_rollout(fleet, rid)["requested"]["by"] == deployer[0]
        refused = steer("pause")
        assert refused.status_code == 400 and "is paused" in refused.get_json()["error"]
        assert steer("resume").get_json()["state"] == "running"
        bad = steer("explode")
        assert bad.status_code == 400
        assert "allowed: pause, resume, abort" in bad.get_json()["error"]
        assert client.post(f"/api/rollouts/{rid}", json={"action": "pause"}).status_code == 403
        assert steer("abort").get_json()["state"] == "aborted"
        assert fleet.code.get("release:p:000002")["outcome"] == "aborted"  # type: ignore[index]
        over = steer("resume")
        assert over.status_code == 400 and "is aborted already" in over.get_json()["error"]
        assert client.post("/api/rollouts/rollout:nope:000001", json={"action": "pause"},
                           headers=headers).status_code == 404

        fleet.status.save(dict(get_rollout(fleet, rid), state="running"))
        node_client = app.test_client()
        login(node_client, *make_user([security.NODE_ROLE],
                                      str(10**14 + secrets.randbelow(10**14))))
        page = node_client.get(f"/rollouts/{rid}").get_data(as_text=True)
        assert "rollout-controls" not in page
        answer = node_client.post(f"/api/rollouts/{rid}", json={"action": "abort"},
                                  headers={"X-CSRF-Token": page_csrf(node_client)})
        assert answer.status_code == 403 and "may not steer" in answer.get_json()["error"]
        assert get_rollout(fleet, rid)["state"] == "running"
    finally:
        app.extensions["himbeere"].hub.close()


def test_a_sites_leader_leaves_rollouts_to_the_central_leader(fleet: Fleet) -> None:
    # A relay holds a copy of each rollout; if its leader stepped it too, the
    # two copies would split into a conflict (docs/edge-sites.rst).
    now = time.time()
    fleet.status.save(doc(_id=rollout_id("p", 2), type="himbeere-rollout"))
    fleet.status.save(dict(status(11, now, 1), _id="status:11"))
    fleet.status.save({"_id": "node:21", "type": "himbeere-node", "node": 21,
                       "labels": {"site": "farm"}})
    assert rollout.Driver(fleet.status, "21").drive() == 0
    assert get_rollout(fleet, rollout_id("p", 2))["admitted"] == {}
    assert rollout.Driver(fleet.status, "12").drive() == 1  # no node document: central
    assert list(get_rollout(fleet, rollout_id("p", 2))["admitted"]) == ["11"]

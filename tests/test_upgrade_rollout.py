"""Staged daemon upgrades: ``himbeere-upload upgrade --wheel W --rollout 1,100%``.

The first tests are pure steps of :func:`himbeere.fleet.rollout.step` on a
daemon rollout; the others run three real nodes through the launcher
(``himbeere launch``), as tests/test_upgrade.py does, with its wheels: a
good version reaches the canary first and the other nodes after it ran
``healthy_for``; a broken one (its daemon exits at start) is reverted on the
canary, the rollout is rolled back and the others never install it; an
aborted rollout sends the nodes that upgraded back to their previous version.

Each node runs a program that appends to a marker file at each start (its
starts across an upgrade), and commands append to a ledger (each ran once).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import __version__, launch, schema
from himbeere.couch import Doc
from himbeere.fleet import rollout
from himbeere.fleet.gate import admits
from tests.helpers import himbeere, wait_for
from tests.nodes import Node
from tests.test_upgrade import launched, lines, make_wheel, run_once, runs_version, upload
from tests.test_upgrade import wait_status as wait_node
from uploader import push
from uploader.fleet import Fleet

RID = "rollout:daemon:0.2.0"


# -- pure steps ----------------------------------------------------------------------------
def daemon_doc(**fields: Any) -> Doc:
    return dict(rollout.daemon_rollout("0.2.0", None, ["1", "100%"], 10.0, "alice", "t"),
                **fields)


def status(mac: int, now: float, version: str = "0.1.0", wants: Optional[str] = "0.2.0",
           upgrade: Optional[Doc] = None, state: str = "running") -> Doc:
    field = dict(upgrade or {}, **({"wants": wants, "waiting": "..."} if wants else {}))
    return {"_id": f"status:{mac}", "heartbeat_server_time": now, "heartbeat_interval": 1.0,
            "state": state, "daemon_version": version, "upgrade": field or None}


def test_a_daemon_rollout_admits_the_canary_then_the_nodes_that_want_it() -> None:
    now = 1000.0
    first = rollout.step(daemon_doc(), {1: status(1, now), 2: status(2, now),
                                        3: status(3, now, wants=None)}, now)
    assert first["_id"] == RID and first["kind"] == "daemon"
    assert first["nodes"] == [1, 2] and list(first["admitted"]) == ["1"] and first["wave"] == 0
    # Between two daemons (stopped), then the new version: healthy after healthy_for.
    seen = rollout.step(first, {1: status(1, now + 1, state="stopped", wants=None),
                                2: status(2, now + 1)}, now + 1)
    assert seen["state"] == "running" and not seen["health"]["1"]["healthy"]
    seen = rollout.step(seen, {1: status(1, now + 2, "0.2.0", None), 2: status(2, now + 2)},
                        now + 2)
    assert seen["health"]["1"]["since"] and seen["wave"] == 0
    later = rollout.step(seen, {1: status(1, now + 12, "0.2.0", None),
                                2: status(2, now + 12)}, now + 12)
    assert later["wave"] == 1 and set(later["admitted"]) == {"1", "2"}
    done = rollout.step(later, {1: status(1, now + 13, "0.2.0", None),
                                2: status(2, now + 13, "0.2.0", None)}, now + 13)
    done = rollout.step(done, {1: status(1, now + 24, "0.2.0", None),
                               2: status(2, now + 24, "0.2.0", None)}, now + 24)
    assert done["state"] == "done" and done["nodes"] == [1, 2]


def test_a_daemon_rollout_rolls_back_when_the_canary_reverts_or_dies() -> None:
    now = 1000.0
    running = rollout.step(daemon_doc(), {1: status(1, now), 2: status(2, now)}, now)
    reverted = {"state": "reverted", "version": "0.2.0", "reason": "exited with code 1"}
    back = rollout.step(running, {1: status(1, now + 5, upgrade=reverted, wants=None),
                                  2: status(2, now + 5)}, now + 5)
    assert back["state"] == "rolled-back" and back["failure"]["mac"] == 1
    assert back["failure"]["why"] == "node 1 reverted daemon 0.2.0: exited with code 1"
    # An older revert of another version is not this rollout's failure.
    old = dict(reverted, version="0.1.5")
    fine = rollout.step(running, {1: status(1, now + 5, upgrade=old, wants=None)}, now + 5)
    assert fine["state"] == "running"
    dead = rollout.step(running, {1: status(1, now - 60)}, now)
    assert dead["state"] == "rolled-back" and "node 1 is dead" in dead["failure"]["why"]


def test_the_upgraders_gate_is_the_programs() -> None:
    assert admits(RID, None, 1) == (False, f"{RID} not found")
    assert admits(RID, daemon_doc(), 1) == (False, f"not yet admitted by {RID}")
    assert admits(RID, daemon_doc(admitted={"1": "t"}, wave=0), 1)[0]
    assert admits(RID, daemon_doc(state="done"), 2)[0]
    assert admits(RID, daemon_doc(admitted={"1": "t"}, state="aborted"), 1) == (
        False, f"{RID} was aborted")


# -- real nodes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rollout-wheels")
    return {"0.2.0": make_wheel(out, "0.2.0"), "0.3.0": make_wheel(out, "0.3.0"),
            "0.4.0": make_wheel(out, "0.4.0", broken=True)}


def keeper(markers: Path) -> str:
    """A program that marks each start, and takes a moment to stop (a wider window
    between the old daemon's install and the new daemon's first heartbeat)."""
    return (
        "import os, time\n"
        "def main():\n"
        f"    with open(os.path.join({str(markers)!r}, str(node)), 'a') as f:\n"
        "        f.write('x')\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n"
        "    time.sleep(1.5)\n")


def three_nodes(node_factory: Callable[..., Node], fleet: Fleet, tmp_path: Path,
                macs: tuple[int, ...]) -> list[Node]:
    """Three launched nodes, each running the marking program once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    source = tmp_path / "keeper.py"
    source.write_text(keeper(markers))
    nodes = [launched(node_factory, mac) for mac in macs]
    for node in nodes:
        runs_version(node, __version__)
        push.push(fleet, source, node.mac_id, "keeper")
    for node in nodes:
        node.wait_program(f"{node.mac_id}:keeper", 60, state="running")
    return nodes


def starts(tmp_path: Path, node: Node) -> int:
    path = tmp_path / "markers" / str(node.mac_id)
    return len(path.read_text()) if path.exists() else 0


def get_rollout(fleet: Fleet, rid: str) -> Doc:
    found = fleet.status.get(rid)
    assert found is not None, rid
    return found


def wait_rollout(fleet: Fleet, rid: str, check: Callable[[Doc], bool],
                 timeout: float = 120.0) -> Doc:
    return wait_for(lambda: (lambda d: d if check(d) else None)(get_rollout(fleet, rid)),
                    timeout, message=lambda: f"rollout now {get_rollout(fleet, rid)}")


def waiting(node: Node, text: str) -> dict[str, Any]:
    return wait_node(node, f"waiting: {text}", lambda s: text in str(
        (s.get("upgrade") or {}).get("waiting")))


@pytest.mark.slow
def test_a_good_version_reaches_the_canary_first_and_an_aborted_one_goes_back(
        node_factory: Callable[..., Node], fleet: Fleet, couch_url: str, dbname: str,
        tmp_path: Path, wheels: dict[str, Path], capsys: pytest.CaptureFixture[str],
        cli_env: None) -> None:
    nodes = three_nodes(node_factory, fleet, tmp_path, (7201, 7202, 7203))
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                          "--rollout", "1,100%", "--healthy-for", "5s")
    assert code == 0 and answer["rollout"] == RID, answer
    first = wait_rollout(fleet, RID, lambda d: d["admitted"])
    canary = next(n for n in nodes if str(n.mac_id) in first["admitted"])
    others = [n for n in nodes if n is not canary]
    for node in others:  # not admitted: they stay, and say why
        status = waiting(node, f"not yet admitted by {RID}")
        assert status["daemon_version"] == __version__
        assert status["upgrade"]["wants"] == "0.2.0"

    # A command written while the canary upgrades (installed, the new daemon not
    # yet heartbeating) runs exactly once.
    ledger = tmp_path / "ledger"
    db = fleet.code  # a deployer writes commands
    wait_for(lambda: (canary.state_dir / "versions" / "0.2.0").is_dir(), 120,
             interval=0.01, message=lambda: canary.log()[-3000:])
    db.save({"_id": f"{canary.mac_id}-during", "type": schema.commands_id(canary.mac_id),
             "cmd": [*_append(ledger, "during")]})
    assert canary.status()["daemon_version"] == __version__, (  # type: ignore[index]
        "the command was written before the new daemon's first heartbeat")
    runs_version(canary, "0.2.0")
    wait_for(lambda: (db.get(f"{canary.mac_id}-during") or {}).get("state") == "done", 60,
             message=lambda: f"{db.get(f'{canary.mac_id}-during')}\n{canary.log()[-3000:]}")

    done = wait_rollout(fleet, RID, lambda d: d["state"] == "done")
    admitted = {int(k): rollout.parse_iso(v) for k, v in done["admitted"].items()}
    assert sorted(admitted) == [7201, 7202, 7203] and sorted(done["nodes"]) == sorted(admitted)
    for node in others:  # after the canary ran the version healthy_for
        assert admitted[node.mac_id] - admitted[canary.mac_id] >= 5.0
    for node in nodes:
        status = runs_version(node, "0.2.0")
        assert "wants" not in (status.get("upgrade") or {}), status["upgrade"]
        # The program restarted once across the upgrade, and runs.
        node.wait_program(f"{node.mac_id}:keeper", 60, state="running")
        assert starts(tmp_path, node) == 2, starts(tmp_path, node)
    assert lines(ledger) == ["during"]

    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    assert code == 0 and answer["rollout"]["state"] == "done", answer
    assert {r["state"] for r in answer["nodes"] if r["node"] in admitted} == {"upgraded"}
    code, out, _ = himbeere(capsys, "rollouts")
    assert code == 0 and RID in out and "daemon" in out and "2/2" in out, out
    code, out, _ = himbeere(capsys, "rollout", RID)
    assert code == 0 and "daemon version 0.2.0" in out and "7203" in out, out

    # 0.3.0, then aborted once the canary runs it: the canary goes back to 0.2.0;
    # the others never install 0.3.0.
    rid3 = "rollout:daemon:0.3.0"
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.3.0"]),
                  "--rollout", "1,100%", "--healthy-for", "600s")[0] == 0
    canary3 = next(n for n in nodes if str(n.mac_id) in wait_rollout(
        fleet, rid3, lambda d: d["admitted"])["admitted"])
    runs_version(canary3, "0.3.0")
    code, out, err = himbeere(capsys, "rollout", rid3, "--abort")
    assert code == 0 and "aborted" in out, err
    status = wait_node(canary3, "back on 0.2.0", lambda s: s.get("daemon_version") == "0.2.0"
                       and (s.get("upgrade") or {}).get("state") == "reverted")
    assert status["upgrade"]["version"] == "0.3.0" and status["upgrade"]["from"] == "0.2.0"
    assert f"{rid3} was aborted" in status["upgrade"]["reason"], status["upgrade"]
    assert not (canary3.state_dir / "versions" / "0.3.0").exists()
    for node in nodes:
        if node is not canary3:
            status = waiting(node, f"{rid3} was aborted")
            assert status["daemon_version"] == "0.2.0" and "wants" not in status["upgrade"]
            assert not (node.state_dir / "versions" / "0.3.0").exists()
        run_once(fleet.code, node, ledger, f"after-{node.mac_id}")
    assert sorted(lines(ledger)) == sorted(["during"] + [f"after-{n.mac_id}" for n in nodes])


def _append(ledger: Path, mark: str) -> list[str]:
    return [sys.executable, "-c", f"open({str(ledger)!r}, 'a').write({mark!r} + '\\n')"]


@pytest.mark.slow
def test_a_broken_version_is_reverted_on_the_canary_and_goes_no_further(
        node_factory: Callable[..., Node], fleet: Fleet, couch_url: str, dbname: str,
        tmp_path: Path, wheels: dict[str, Path], capsys: pytest.CaptureFixture[str],
        cli_env: None) -> None:
    nodes = three_nodes(node_factory, fleet, tmp_path, (7301, 7302, 7303))
    rid = "rollout:daemon:0.4.0"
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.4.0"]),
                  "--rollout", "1,100%", "--healthy-for", "3s")[0] == 0
    done = wait_rollout(fleet, rid, lambda d: d["state"] == "rolled-back")
    assert len(done["admitted"]) == 1 and done["wave"] == 0, done
    canary = next(n for n in nodes if str(n.mac_id) in done["admitted"])
    assert done["failure"]["mac"] == canary.mac_id and done["failure"]["state"] == "reverted"
    assert "exited with code 1" in done["failure"]["why"], done["failure"]
    status = wait_node(canary, "reverted", lambda s: (s.get("upgrade") or {}).get(
        "state") == "reverted")
    assert status["upgrade"]["version"] == "0.4.0" and status["daemon_version"] == __version__
    for node in nodes:
        if node is not canary:
            status = waiting(node, f"{rid} was rolled-back")
            assert status["daemon_version"] == __version__
            assert not (node.state_dir / "versions" / "0.4.0").exists()
            assert launch.read_outcome(node.state_dir) == {}, "it never installed anything"
            assert starts(tmp_path, node) == 1  # its program never restarted
    ledger = tmp_path / "ledger"
    for node in nodes:
        run_once(fleet.code, node, ledger, f"after-{node.mac_id}")
    assert sorted(lines(ledger)) == sorted(f"after-{n.mac_id}" for n in nodes)

    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    assert code == 0 and answer["rollout"]["state"] == "rolled-back", answer
    states = {r["node"]: r["state"] for r in answer["nodes"]}
    assert states[canary.mac_id] == "reverted"
    assert {states[n.mac_id] for n in nodes if n is not canary} == {"waiting"}
    code, out, _ = himbeere(capsys, "rollout", rid)
    assert code == 0 and "rolled-back" in out and f"node {canary.mac_id} reverted" in out, out


def test_upgrade_rollout_flags_say_what_is_allowed(fleet: Fleet, couch_url: str, dbname: str,
                                                   wheels: dict[str, Path]) -> None:
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                          "--rollout", "1,50%")
    assert code == 1 and "the last wave must be 100%" in answer["error"]
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                          "--healthy-for", "5s")
    assert code == 1 and "add --rollout WAVES" in answer["error"]
    # A new upgrade supersedes a daemon rollout under way: it is aborted.
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                  "--rollout", "1,100%")[0] == 0
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.3.0"]))
    assert code == 0 and answer["rollout"] is None
    old = get_rollout(fleet, RID)
    assert old["state"] == "aborted" and old["failure"]["why"] == "superseded by daemon:0.3.0"
    assert (fleet.code.get("daemon:current") or {}).get("rollout") is None

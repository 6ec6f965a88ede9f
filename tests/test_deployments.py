"""Issue 13 end to end: signing, releases, rollback and staged rollouts together.

The four parts (programs for many nodes, signing, release history, staged
rollouts) have tests of their own; these check that they work together, with
real daemons (``require_signed`` and a trusted key) on the real server.
Each release of a program writes a marker file ``<node>-<tag>`` when it
starts (tests/test_rollouts.py), so a test sees which node ever ran what.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import signing
from himbeere.couch import Couch, Doc
from himbeere.fleet import rollout
from himbeere.schema import ProgramState, iso, release_id, result_id, rollout_id
from tests.conftest import Upload
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, start_nodes
from tests.test_rollouts import get_rollout, program, ran, wait_markers, wait_rollout
from tests.test_signing import make_key, pub, rejected, resave
from uploader import install, keys, ops, push, rollouts
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
PLACED = "placed:p"


@pytest.fixture
def key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> keys.SigningKey:
    """The deployer's key; no other key is found (no HIMBEERE_SIGNING_KEY, no default)."""
    monkeypatch.delenv(keys.ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/himbeere/signing.key
    return make_key(tmp_path)



def signed_nodes(node_factory: NodeFactory, key: keys.SigningKey, *macs: int) -> list[Node]:
    """Daemons with ``require_signed`` that trust ``key``, each heartbeating."""
    return start_nodes(node_factory, *macs,
                       flags=["--require-signed", "yes", "--trusted-keys", pub(key)])


def source(tmp_path: Path, tag: str, crash: bool = False) -> Path:
    """Release ``tag``'s code as a file (its marker: ``<node>-<tag>``)."""
    (tmp_path / "markers").mkdir(exist_ok=True)
    path = tmp_path / "src" / tag / "p.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(program(tmp_path / "markers", tag, crash))
    return path


def push_placed(fleet: Fleet, tmp_path: Path, tag: str, replicas: int,
                key: Optional[keys.SigningKey], waves: Optional[str] = None,
                healthy_for: str = "2s", crash: bool = False) -> Doc:
    """Push release ``tag`` of the placed program ``p``, signed with ``key``."""
    plan = rollouts.Plan.parse(waves, healthy_for) if waves else None
    return push.push(fleet, source(tmp_path, tag, crash), None, "p",
                     push.Placed.parse(str(replicas)), rollout=plan, signing_key=key)


def runs(node: Node, doc_id: str, release: int) -> dict[str, Any]:
    """Wait until ``node`` runs release ``release`` of ``doc_id``."""
    return wait_for(lambda: (lambda e: e if e.get("state") == "running"
                             and e.get("release") == release else None)(node.program(doc_id)),
                    60, message=lambda: f"{node.mac_id} {doc_id}: {node.program(doc_id)}\n"
                                        f"{node.log()[-3000:]}")


def on_disk(node: Node) -> dict[str, Any]:
    """The releases the node ran, as it keeps them (the downgrade rule's memory)."""
    path = node.state_dir / signing.RELEASES_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def admitted_waves(done: Doc) -> list[int]:
    """How many nodes were admitted by each distinct admission time: [1, 3] for 1,100%."""
    admitted = [rollout.parse_iso(v) for v in done["admitted"].values()]
    return [sum(1 for t in admitted if t <= moment) for moment in sorted(set(admitted))]


# -- 1. a signed rollout rolls back under require_signed ------------------------------------
def test_a_signed_rollout_that_crashes_rolls_back_to_the_signed_previous_release(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path,
        key: keys.SigningKey) -> None:
    nodes = signed_nodes(node_factory, key, 2101, 2102, 2103)
    first = push_placed(fleet, tmp_path, "r1", 3, key)
    assert first["release"] == 1 and first["key"] == key.key_id
    wait_markers(tmp_path, [f"{n.mac_id}-r1" for n in nodes])

    bad = push_placed(fleet, tmp_path, "bad", 3, key, waves="1,100%", healthy_for="5s",
                      crash=True)
    rid = bad["rollout"]
    assert rid == rollout_id("p", 2)
    with pytest.raises(rollouts.RolloutFailed, match="rolled-back: .*release bad is broken"):
        rollouts.wait(fleet, rid, say=lambda line: None, timeout=120)
    done = get_rollout(fleet, rid)
    canary = done["failure"]["mac"]
    assert list(done["admitted"]) == [str(canary)]
    node = next(n for n in nodes if n.mac_id == canary)

    # The canary ran release 2 (its downgrade floor is 2 now), and yet runs
    # release 1 again: the signed release 2 names it as its previous_release.
    wait_for(lambda: ran(tmp_path).get(f"{canary}-r1", 0) >= 2, 60,
             message=lambda: f"markers {ran(tmp_path)}\n{node.log()[-3000:]}")
    entry = runs(node, PLACED, 1)
    assert "rollout:p:000002 was rolled-back" in entry["rollout"]
    assert entry.get("last_error") is None or "refused" not in str(entry["last_error"])
    node.wait_log("runs release 1: rollout:p:000002 was rolled-back")
    assert on_disk(node)[PLACED] == {"release": 2, "previous": 1}
    # No node of the later wave ever ran release 2.
    assert [name for name in ran(tmp_path) if name.endswith("-bad")] == [f"{canary}-bad"]
    assert all(ran(tmp_path)[f"{n.mac_id}-r1"] == 1 for n in nodes if n.mac_id != canary)
    record = fleet.code.get(release_id("p", 2))
    assert record is not None and record["outcome"] == "rolled-back"
    assert record["key"] == key.key_id


# -- 2. a hostile admin and the rollout document --------------------------------------------
def test_a_hostile_admin_editing_a_rollout_runs_nothing_unsigned(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path,
        key: keys.SigningKey) -> None:
    nodes = signed_nodes(node_factory, key, 2201, 2202)
    push_placed(fleet, tmp_path, "r1", 2, key)
    wait_markers(tmp_path, ["2201-r1", "2202-r1"])
    # Release 2 waits forever after its canary (healthy for an hour).
    rid = push_placed(fleet, tmp_path, "r2", 2, key, waves="1,100%", healthy_for="1h")["rollout"]
    running = wait_rollout(fleet, rid, lambda d: len(d.get("admitted") or {}) == 1)
    canary = int(next(iter(running["admitted"])))
    other = next(n for n in nodes if n.mac_id != canary)
    wait_markers(tmp_path, [f"{canary}-r2"])

    # The admin admits every node: they run release 2, signed.
    def admit_all(doc: Doc) -> bool:
        doc["admitted"] = {str(n.mac_id): doc["admitted"].get(str(n.mac_id), iso())
                           for n in nodes}
        return True

    fleet.status.update(rid, admit_all)
    wait_markers(tmp_path, [f"{other.mac_id}-r2"])
    runs(other, PLACED, 2)

    # The admin rolls it back by hand: every node runs the signed release 1.
    def roll_back(doc: Doc) -> bool:
        doc["state"] = "rolled-back"
        return True

    fleet.status.update(rid, roll_back)
    for node in nodes:
        runs(node, PLACED, 1)
        assert on_disk(node)[PLACED] == {"release": 2, "previous": 1}

    # A release record the admin writes, with unsigned code, named by a forged
    # previous_release of the program document: the edit breaks its signature,
    # and the node runs neither.
    evil = tmp_path / "evil.ran"
    body = {"_id": PLACED, "type": "himbeere-placed", "name": "p", "replicas": 2,
            "release": 0, "code": f"def main():\n    open({str(evil)!r}, 'w')\n"}
    fleet.code.save({"_id": release_id("p", 0), "type": "himbeere-release", "name": "p",
                     "release": 0, "docs": {PLACED: body}})
    current = fleet.code.get(PLACED)
    assert current is not None and current["previous_release"] == 1
    before = ran(tmp_path)
    resave(fleet, current, previous_release=0)
    for node in nodes:
        entry = rejected(node, PLACED, "signature does not match the document (edited?)")
        assert entry["pid"] is None
    assert not evil.exists()
    assert {k: v for k, v in ran(tmp_path).items() if k.endswith("-r1")} == {
        k: v for k, v in before.items() if k.endswith("-r1")}

    # The signed document again: the nodes go back to release 1 (still rolled back).
    resave(fleet, current)
    for node in nodes:
        runs(node, PLACED, 1)
    assert not evil.exists()


# -- 3. a signed rollback is a new, signed release --------------------------------------------
def test_a_signed_rollback_runs_and_an_unsigned_one_is_refused(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, key: keys.SigningKey,
        upload: Upload) -> None:
    node = signed_nodes(node_factory, key, 2301)[0]
    doc_id = "2301:p"
    for tag in ("v1", "v2"):
        code, _, err = upload("push", str(source(tmp_path, tag)), "--node", "2301",
                              "--signing-key", key.path)
        assert code == 0, err
        # Each release runs before the next is pushed: a feed may hand a node
        # only the newest revision, and v1 would then never run before the
        # rollback (failed once in CI so).
        wait_markers(tmp_path, [f"2301-{tag}"])
    runs(node, doc_id, 2)

    code, out, err = upload("rollback", "p", "--to", "1", "--signing-key", key.path)
    assert code == 0, err
    assert out.strip() == (f"release 3 of p: rollback to release 1 ({doc_id}), "
                           f"signed by {key.key_id}")
    runs(node, doc_id, 3)
    wait_for(lambda: ran(tmp_path).get("2301-v1", 0) == 2, 30,
             message=lambda: f"markers {ran(tmp_path)}")
    written = fleet.code.get(doc_id)
    assert written is not None and written["release"] == 3
    assert signing.verify(written, {key.key_id: key.public}) is None

    # Without a key: written (release 4), refused by the node, never run.
    code, out, err = upload("rollback", "p", "--to", "2")
    assert code == 0, err
    assert out.strip() == f"release 4 of p: rollback to release 2 ({doc_id})"
    entry = rejected(node, doc_id, "no signature")
    assert entry["state"] == ProgramState.REJECTED.value and entry["pid"] is None
    assert ran(tmp_path)["2301-v2"] == 1


# -- 4. rollback goes through the rollout rules --------------------------------------------
def test_rollback_with_rollout_goes_out_in_waves_and_waits(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, key: keys.SigningKey,
        upload: Upload) -> None:
    nodes = signed_nodes(node_factory, key, 2401, 2402, 2403)
    push_placed(fleet, tmp_path, "r1", 3, key)
    wait_markers(tmp_path, [f"{n.mac_id}-r1" for n in nodes])
    push_placed(fleet, tmp_path, "r2", 3, key)
    wait_markers(tmp_path, [f"{n.mac_id}-r2" for n in nodes])

    code, out, err = upload("rollback", "p", "--to", "1", "--rollout", "1,100%",
                            "--healthy-for", "2s", "--wait", "--signing-key", key.path)
    assert code == 0, err
    rid = rollout_id("p", 3)
    assert out.splitlines()[-1] == f"{rid}: done", out
    done = get_rollout(fleet, rid)
    assert done["state"] == "done" and done["previous_release"] == 2
    assert admitted_waves(done) == [1, 3]
    for node in nodes:
        runs(node, PLACED, 3)
    wait_for(lambda: all(ran(tmp_path)[f"{n.mac_id}-r1"] == 2 for n in nodes), 30,
             message=lambda: f"markers {ran(tmp_path)}")
    record = fleet.code.get(release_id("p", 3))
    assert record is not None and record["rollout"] == rid and record["outcome"] == "done"
    assert record["rollback_of"] == 1 and record["key"] == key.key_id
    assert signing.verify(record["docs"][PLACED], {key.key_id: key.public}) is None

    # The flags are checked as push checks them.
    code, _, err = upload("rollback", "p", "--wait")
    assert code == 1 and "--healthy-for and --wait are for staged rollouts" in err
    code, _, err = upload("rollback", "p", "--rollout", "50%")
    assert code == 1 and "the last wave must be 100%" in err


def test_a_rollback_whose_canary_crashes_is_rolled_back_too(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, upload: Upload) -> None:
    nodes = start_nodes(node_factory, 2451, 2452)
    push_placed(fleet, tmp_path, "bad", 2, None, crash=True)
    wait_markers(tmp_path, ["2451-bad", "2452-bad"])
    push_placed(fleet, tmp_path, "r2", 2, None)
    wait_markers(tmp_path, ["2451-r2", "2452-r2"])
    for node in nodes:
        runs(node, PLACED, 2)
    before = ran(tmp_path)  # release 1 (bad) no longer runs anywhere

    code, out, err = upload("rollback", "p", "--to", "1", "--rollout", "1,100%",
                            "--healthy-for", "60s", "--wait")
    assert code == 1 and "rolled-back" in err and "release bad is broken" in err, (out, err)
    done = get_rollout(fleet, rollout_id("p", 3))
    canary = done["failure"]["mac"]
    other = next(n.mac_id for n in nodes if n.mac_id != canary)
    # The canary ran the rollback and runs release 2 again; the other never left it.
    for node in nodes:
        runs(node, PLACED, 2)
    after = ran(tmp_path)
    assert after[f"{canary}-bad"] > before[f"{canary}-bad"]
    assert after[f"{other}-bad"] == before[f"{other}-bad"]
    assert after[f"{other}-r2"] == 1 and after[f"{canary}-r2"] >= 2
    assert fleet.code.get(release_id("p", 3))["outcome"] == "rolled-back"


# -- 5. a signed program for many nodes, in waves -------------------------------------------
def test_a_signed_program_for_labelled_nodes_goes_out_in_waves(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, key: keys.SigningKey,
        upload: Upload) -> None:
    for mac in (2501, 2502, 2503):
        ops.set_labels(fleet, mac, room="lab")
    nodes = signed_nodes(node_factory, key, 2501, 2502, 2503)
    unlabelled = signed_nodes(node_factory, key, 2504)[0]
    doc_id = "program:p"
    code, out, err = upload("push", str(source(tmp_path, "r1")), "--label", "room=lab",
                            "--name", "p", "--signing-key", key.path)
    assert code == 0 and f"release 1, signed by {key.key_id}" in out, err
    for node in nodes:
        runs(node, doc_id, 1)
    wait_markers(tmp_path, [f"{n.mac_id}-r1" for n in nodes])

    code, out, err = upload("push", str(source(tmp_path, "r2")), "--label", "room=lab",
                            "--name", "p", "--rollout", "1,100%", "--healthy-for", "2s",
                            "--wait", "--signing-key", key.path)
    assert code == 0, err
    rid = rollout_id("p", 2)
    assert out.splitlines()[-1] == f"{rid}: done", out
    done = get_rollout(fleet, rid)
    assert sorted(done["nodes"]) == [2501, 2502, 2503]
    assert admitted_waves(done) == [1, 3]
    for node in nodes:
        runs(node, doc_id, 2)
    wait_markers(tmp_path, [f"{n.mac_id}-r2" for n in nodes])
    assert not unlabelled.program(doc_id)
    assert not [name for name in ran(tmp_path) if name.startswith("2504-")]
    written = fleet.code.get(doc_id)
    assert written is not None and written["targets"] == {"labels": {"room": "lab"}}
    assert signing.verify(written, {key.key_id: key.public}) is None
    # Moving the signed program to every node breaks its signature.
    resave(fleet, written, targets="all")
    for node in nodes:
        rejected(node, doc_id, "signature does not match")


# -- 6. signed commands from the CLI and the dashboard --------------------------------------
def test_signed_commands_from_the_cli_and_the_dashboard_run(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path, key: keys.SigningKey,
        couch: Couch, deployer: tuple[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, cli_env: None) -> None:
    node = signed_nodes(node_factory, key, 2601)[0]
    code, out, err = himbeere(capsys, "cmd", "--node", "2601", "--json", "--signing-key",
                              key.path, "--wait", "60", "--", "echo", "signed")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["results"]["2601"]["returncode"] == 0, answer
    assert answer["results"]["2601"]["ret"][0] == "signed\n"

    code, out, err = himbeere(capsys, "cmd", "--node", "2601", "--json", "--wait", "60",
                              "--", "echo", "unsigned")
    assert code == 1, err
    result = json.loads(out)["results"]["2601"]
    assert result["state"] == "error" and result["error"] == "refused: no signature", result
    assert "unsigned" not in str(result.get("ret"))

    # HIMBEERE_SIGNING_KEY works for himbeere cmd as --signing-key does.
    monkeypatch.setenv(keys.ENV, key.path)
    code, out, err = himbeere(capsys, "cmd", "--node", "2601", "--json", "--wait", "60",
                              "--", "true")
    assert code == 0 and json.loads(out)["results"]["2601"]["returncode"] == 0, (out, err)

    # The dashboard signs with the key of the machine it runs on.
    from tests.test_dashboard import login, page_csrf
    from uploader.dashboard import create_app

    install.setup(fleet)
    app = create_app(couch.base, fleet.code.name, secret_key="test secret")
    app.config["TESTING"] = True
    try:
        client = app.test_client()
        login(client, *deployer)
        answer = client.post("/api/commands", json={"cmd": "echo from the dashboard",
                                                    "targets": [2601]},
                             headers={"X-CSRF-Token": page_csrf(client)})
        assert answer.status_code == 201, answer.get_json()
        command_id = answer.get_json()["id"]
    finally:
        app.extensions["himbeere"].hub.close()
    written = fleet.code.get(command_id)
    assert written is not None and written["signature"]["key"] == key.key_id
    assert signing.verify(written, {key.key_id: key.public}) is None
    done = wait_for(lambda: (lambda d: d if d and d.get("state") in ops.FINAL_STATES
                             else None)(fleet.status.get(result_id(command_id, 2601))), 60,
                    message=lambda: node.log()[-3000:])
    assert done["returncode"] == 0 and done["ret"][0] == "from the dashboard\n", done

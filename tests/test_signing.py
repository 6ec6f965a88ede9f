"""Signed code and commands (issue 13): a server admin turned hostile runs nothing.

Real daemons with ``require_signed`` follow the real server; every tamper
is done as the server admin (the test's credentials), with full rights on
every database.  A program or command that must not run would write a
marker file; the tests check that the file never appears, not only that a
status says so.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import discovery, schema, signing
from himbeere.config import Config
from himbeere.couch import Doc
from himbeere.schema import ProgramState
from tests.helpers import wait_for
from tests.nodes import Node, free_udp_port, wait_file
from uploader import cli, keys, ops, push
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
MAC = 4242


def program(marker: Path) -> str:
    """A program that appends a line to ``marker`` and runs until asked to quit."""
    return (f"import time\n"
            f"def main():\n"
            f"    open({str(marker)!r}, 'a').write('ran\\n')\n"
            f"    while not should_quit():\n"
            f"        time.sleep(0.05)\n")


def write_program(folder: Path, name: str, marker: Path) -> Path:
    path = folder / f"{name}.py"
    path.write_text(program(marker))
    return path


def make_key(tmp_path: Path, name: str = "a") -> keys.SigningKey:
    made = keys.keygen(str(tmp_path / "keys" / f"{name}.key"))
    return keys.load(made["key"])


def pub(key: keys.SigningKey) -> str:
    return key.path + keys.PUB_SUFFIX


def signed_node(node_factory: NodeFactory, *trusted: keys.SigningKey, mac: int = MAC,
                **options: Any) -> Node:
    flags = ["--require-signed", "yes",
             "--trusted-keys", ",".join(pub(key) for key in trusted)]
    return node_factory(mac_id=mac, flags=flags, **options)


def rejected(node: Node, doc_id: str, why: str) -> dict[str, Any]:
    """Wait until ``doc_id`` is ``rejected`` on ``node`` with ``why`` in its last_error."""
    def check() -> Optional[dict[str, Any]]:
        entry = node.program(doc_id)
        ok = entry.get("state") == "rejected" and why in str(entry.get("last_error"))
        return entry if ok else None

    return wait_for(check, 30, message=lambda: (
        f"{doc_id} not rejected with {why!r}: {node.program(doc_id)}\n{node.log()[-3000:]}"))


def resave(fleet: Fleet, doc: Doc, **changes: Any) -> Doc:
    """Save ``doc`` with ``changes`` over the current revision, as the admin."""
    current = fleet.code.get(doc["_id"])
    new = dict(doc, **changes)
    if current is not None:
        new["_rev"] = current["_rev"]
    else:
        new.pop("_rev", None)
    fleet.code.save(new)
    return new


# -- the key and the signed bytes (no server) ----------------------------------------------
def test_keygen_writes_a_private_key_0600_and_the_line_for_trusted_keys(
        tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "deployer" / "signing.key"
    assert cli.main(["keygen", "--out", str(out)], environ={}) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    public = Path(str(out) + ".pub").read_text().strip()
    raw = base64.b64decode(public)
    assert len(raw) == 32
    assert f"key id:      {signing.key_id(raw)}" in printed
    assert f"trusted_keys = {public}" in printed
    assert cli.main(["keygen", "--out", str(out)], environ={}) == 1
    assert "exists; use --force" in capsys.readouterr().err
    assert cli.main(["keygen", "--out", str(out), "--force"], environ={}) == 0
    assert Path(str(out) + ".pub").read_text().strip() != public


def test_the_signature_covers_what_runs_and_where_not_enabled(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    trusted = {key.key_id: key.public}
    doc = keys.sign({"_id": "1:p", "type": 1, "name": "p", "code": "x", "timeout": 30.0,
                     "release": 2, "enabled": True}, key)
    assert signing.verify(doc, trusted) is None
    # A JavaScript server gives 30.0 back as 30: still the same document.
    assert signing.verify(dict(doc, timeout=30), trusted) is None
    assert signing.verify(dict(doc, enabled=False, restart_count=3), trusted) is None
    for field, value in (("_id", "2:p"), ("type", 2), ("name", "q"), ("code", "y"),
                         ("release", 3), ("targets", "all")):
        assert signing.verify(dict(doc, **{field: value}), trusted) == \
            "signature does not match the document (edited?)", field
    assert signing.verify({"_id": "1:p"}, trusted) == "no signature"
    assert signing.verify(doc, {}) == f"signed by unknown key {key.key_id}"


def test_a_downgrade_is_refused_except_the_signed_previous_release(tmp_path: Path) -> None:
    releases = signing.Releases(tmp_path / "releases.json")
    releases.record({"_id": "p", "release": 5, "previous_release": 4})
    again = signing.Releases(tmp_path / "releases.json")  # kept on disk
    assert again.refusal({"_id": "p", "release": 5}) is None
    assert again.refusal({"_id": "p", "release": 4}) is None
    assert "older than release 5" in str(again.refusal({"_id": "p", "release": 3}))
    assert "older than release 5" in str(again.refusal({"_id": "p"}))
    again.record({"_id": "p", "release": 4})  # the fallback runs: 5 stays the floor
    assert "older than release 5" in str(again.refusal({"_id": "p", "release": 3}))


# -- a hostile admin against real daemons --------------------------------------------------
def test_a_hostile_admin_cannot_make_a_node_run_code(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    node = signed_node(node_factory, key)
    doc_id = schema.program_id(MAC, "sensor")
    markers = {name: tmp_path / f"{name}.ran" for name in
               ("v1", "v2", "edited", "other_node", "copied", "unsigned", "rogue")}

    first = push.push(fleet, write_program(tmp_path, "sensor", markers["v1"]), MAC,
                      signing_key=key)
    assert first["release"] == 1 and first["key"] == key.key_id
    node.wait_program(doc_id, state="running")
    release_1 = fleet.code.get(doc_id)
    assert release_1 is not None and release_1["signature"]["key"] == key.key_id

    # Edit the signed document's code.
    resave(fleet, release_1, code=program(markers["edited"]))
    rejected(node, doc_id, "signature does not match the document (edited?)")

    # A new signed push runs again (release 2).
    (tmp_path / "v2").mkdir()
    second = push.push(fleet, write_program(tmp_path / "v2", "sensor", markers["v2"]), MAC,
                       signing_key=key)
    assert second["release"] == 2
    node.wait_program(doc_id, state="running")
    wait_for(lambda: markers["v2"].exists(), 20)

    # Replay the older release, signature and all.
    resave(fleet, release_1)
    entry = rejected(node, doc_id, "release 1 is older than release 2")
    assert entry["pid"] is None

    # Strip the signature.
    release_2 = push.find(fleet, MAC, "sensor")
    assert release_2 is not None
    stripped = {k: v for k, v in release_2.items() if k != "signature"}
    resave(fleet, stripped, code=program(markers["unsigned"]))
    rejected(node, doc_id, "no signature")

    # Re-target: a document signed for another node, moved to this one...
    (tmp_path / "other").mkdir()
    push.push(fleet, write_program(tmp_path / "other", "elsewhere", markers["other_node"]),
              MAC + 1, signing_key=key)
    elsewhere = fleet.code.get(schema.program_id(MAC + 1, "elsewhere"))
    assert elsewhere is not None
    resave(fleet, elsewhere, type=MAC)
    rejected(node, elsewhere["_id"], "signature does not match")
    # ... and this node's signed document copied to another id.
    copy_id = schema.program_id(MAC, "copy")
    fleet.code.save({k: v for k, v in release_2.items() if k != "_rev"} | {"_id": copy_id})
    rejected(node, copy_id, "signature does not match")

    # trusted_keys written into CouchDB, anywhere, change nothing.
    rogue = make_key(tmp_path, "rogue")
    for db in (fleet.code, fleet.status):
        db.save({"_id": "trusted_keys", "trusted_keys": rogue.public_b64,
                 "require_signed": False})
    fleet.status.save({"_id": schema.node_id(MAC), "labels": {},
                       "trusted_keys": rogue.public_b64, "require_signed": False})
    (tmp_path / "rogue").mkdir()
    push.push(fleet, write_program(tmp_path / "rogue", "rogue", markers["rogue"]), MAC,
              signing_key=rogue)
    rejected(node, schema.program_id(MAC, "rogue"), f"signed by unknown key {rogue.key_id}")
    node.signal(signal.SIGHUP)  # a reload reads the node's own disk only
    node.wait_log("reload: restarting all programs")
    rejected(node, schema.program_id(MAC, "rogue"), "signed by unknown key")

    for name in ("edited", "other_node", "copied", "unsigned", "rogue"):
        assert not markers[name].exists(), name
    assert markers["v1"].read_text() == "ran\n"  # once: the replay never started
    log = node.log()
    assert "refused: no signature" in log
    status = node.status() or {}
    assert status["programs"][doc_id]["state"] == ProgramState.REJECTED.value


def test_unsigned_and_tampered_commands_get_an_error_and_never_run(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    node = signed_node(node_factory, key)
    wait_for(lambda: node.status(), 30)  # the node is up

    def touch(marker: Path) -> list[str]:
        return ["touch", str(marker)]

    def final(command_id: str) -> Doc:
        return wait_for(lambda: (lambda doc: doc if doc and doc.get("state") in
                                 ops.FINAL_STATES else None)(
            fleet.status.get(schema.result_id(command_id, MAC))), 30,
            message=lambda: node.log()[-3000:])

    signed_marker, unsigned_marker, tampered_marker, single_marker = (
        tmp_path / "signed", tmp_path / "unsigned", tmp_path / "tampered", tmp_path / "single")
    ok = ops.create_command(fleet, ["sh", "-c", f"echo ran >> {signed_marker}"], [MAC],
                            signing_key=key)
    assert final(ok)["state"] == "done" and signed_marker.read_text() == "ran\n"
    # Replay: the admin deletes the result and touches the command.
    done = fleet.status.get(schema.result_id(ok, MAC))
    assert done is not None
    fleet.status.delete(done)
    command = fleet.code.get(ok)
    assert command is not None
    fleet.code.save(dict(command, note="again"))
    replayed = final(ok)
    # The node's ledger of finished commands (issue 15) answers first: the
    # result it kept comes back, and the command does not run again.  (Past
    # the ledger's bounds the signature's replay guard refuses it.)
    assert replayed["state"] == "done" and replayed["started"] == done["started"]
    assert signed_marker.read_text() == "ran\n"
    node.wait_log(f"command result:{ok}:{MAC} ran here already")

    unsigned = ops.create_command(fleet, touch(unsigned_marker), [MAC])
    result = final(unsigned)
    assert result["state"] == "error" and result["error"] == "refused: no signature"

    # The admin edits a signed command before any node saw it.
    doc: Doc = {"_id": ops.new_command_id(), "type": schema.COMMAND_TYPE, "targets": [MAC],
                "cmd": ["true"], "created_time": 0}
    keys.sign(doc, key)
    doc["cmd"] = touch(tampered_marker)
    fleet.code.save(doc)
    result = final(doc["_id"])
    assert result["state"] == "error"
    assert result["error"] == "refused: signature does not match the document (edited?)"

    # The original single-node format, unsigned.
    single_id = schema.commands_id(MAC)
    fleet.code.save({"_id": single_id, "type": single_id, "cmd": touch(single_marker)})
    single = wait_for(lambda: (lambda d: d if d and d.get("state") == "error" else None)(
        fleet.code.get(single_id)), 30, message=lambda: node.log()[-3000:])
    assert single["error"] == "refused: no signature"

    assert not unsigned_marker.exists() and not tampered_marker.exists()
    assert not single_marker.exists()
    assert signed_marker.read_text() == "ran\n"  # once


def test_removing_a_key_and_sighup_revokes_it(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    old, new = make_key(tmp_path, "old"), make_key(tmp_path, "new")
    ini = tmp_path / "node.conf"
    ini.write_text(f"[himbeere]\nrequire_signed = yes\ntrusted_keys = {pub(old)}, {pub(new)}\n")
    node = node_factory(mac_id=MAC, env={"HIMBEERE_CONFIG": str(ini)})
    by_old, by_new = schema.program_id(MAC, "by_old"), schema.program_id(MAC, "by_new")
    push.push(fleet, write_program(tmp_path, "by_old", tmp_path / "old.ran"), MAC,
              signing_key=old)
    push.push(fleet, write_program(tmp_path, "by_new", tmp_path / "new.ran"), MAC,
              signing_key=new)
    node.wait_program(by_old, state="running")
    node.wait_program(by_new, state="running")

    ini.write_text(f"[himbeere]\nrequire_signed = yes\ntrusted_keys = {pub(new)}\n")
    node.signal(signal.SIGHUP)
    rejected(node, by_old, f"signed by unknown key {old.key_id}")
    node.wait_program(by_new, state="running")
    (tmp_path / "later").mkdir()
    later_marker = tmp_path / "later.ran"
    push.push(fleet, write_program(tmp_path / "later", "later", later_marker), MAC,
              signing_key=old)
    rejected(node, schema.program_id(MAC, "later"), "signed by unknown key")
    assert not later_marker.exists()


def test_a_node_that_was_off_refuses_what_was_written_meanwhile(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    state = tmp_path / "state"
    node = signed_node(node_factory, key, state_dir=state)
    doc_id = schema.program_id(MAC, "sensor")
    push.push(fleet, write_program(tmp_path, "sensor", tmp_path / "good.ran"), MAC,
              signing_key=key)
    node.wait_program(doc_id, state="running")
    assert node.stop() == 0

    signed = fleet.code.get(doc_id)
    assert signed is not None
    bad_marker = tmp_path / "bad.ran"
    resave(fleet, signed, code=program(bad_marker))
    again = signed_node(node_factory, key, state_dir=state)
    rejected(again, doc_id, "signature does not match")
    assert not bad_marker.exists()


def test_without_require_signed_signed_and_unsigned_code_run(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    node = node_factory(mac_id=MAC)
    push.push(fleet, write_program(tmp_path, "signed", tmp_path / "s.ran"), MAC,
              signing_key=key)
    push.push(fleet, write_program(tmp_path, "plain", tmp_path / "p.ran"), MAC)
    node.wait_program(schema.program_id(MAC, "signed"), state="running")
    node.wait_program(schema.program_id(MAC, "plain"), state="running")
    plain = fleet.code.get(schema.program_id(MAC, "plain"))
    assert plain is not None and "signature" not in plain and plain["release"] == 1


# -- pairing hands the keys over -----------------------------------------------------------
def test_pairing_hands_the_signing_key_over_inside_the_fleet_key_exchange(
        tmp_path: Path) -> None:
    fleet_key = tmp_path / "fleet.key"
    fleet_key.write_text("a fleet key long enough to count\n")
    fleet_key.chmod(0o600)
    config = Config(state_dir=str(tmp_path / "state"), mac_id=MAC, led_pin=None,
                    discovery_port=free_udp_port(),
                    fleet_key_file=str(fleet_key)).validate()
    key = make_key(tmp_path)
    secret = fleet_key.read_bytes().strip()

    # Changed on the way: the HMAC no longer matches, nothing is trusted.
    datagram, _ = discovery.make_request("http://couch.lab:5984", secret,
                                         trusted_keys=[key.public_b64])
    forged = json.loads(datagram)
    forged["trusted_keys"] = [make_key(tmp_path, "mallory").public_b64]
    pairing = discovery.Pairing(config, until_configured=True)
    assert pairing.handle(json.dumps(forged).encode(), ("127.0.0.1", 1)) is None
    assert signing.read_keys_file(config.state_path) == {}

    assert pairing.handle(datagram, ("127.0.0.1", 1)) is not None
    assert signing.read_keys_file(config.state_path) == {key.key_id: key.public}
    assert stat.S_IMODE(os.stat(config.state_path / signing.KEYS_FILE).st_mode) == 0o600
    policy = signing.policy("", True, config.state_path)
    assert policy is not None and list(policy.trusted) == [key.key_id]
    # Without trusted keys the request is the one it always was.
    plain, nonce = discovery.make_request("http://couch.lab:5984", secret)
    assert "trusted_keys" not in json.loads(plain)
    with pytest.raises(Exception, match="only with the fleet key"):
        discovery.make_request("http://couch.lab:5984", None, trusted_keys=[key.public_b64])


def test_global_modules_count_only_when_signed(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    """An unsigned global modules document is refused: no program imports its code."""
    key = make_key(tmp_path)
    node = signed_node(node_factory, key)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "helper.py").write_text("WHERE = 'signed'\n")
    push.push(fleet, shared, None, signing_key=key)
    user = tmp_path / "user.py"
    seen = tmp_path / "seen"
    user.write_text(f"import helper, time\n"
                    f"def main():\n"
                    f"    open({str(seen)!r}, 'a').write(helper.WHERE + '\\n')\n"
                    f"    while not should_quit():\n"
                    f"        time.sleep(0.05)\n")
    push.push(fleet, user, MAC, signing_key=key)
    wait_for(lambda: seen.exists() and seen.read_text() == "signed\n", 30,
             message=lambda: node.log()[-3000:])

    modules = fleet.code.get(schema.global_id("shared"))
    assert modules is not None
    resave(fleet, modules, global_modules={"helper": "WHERE = 'forged'\n"})
    node.wait_log("refused: signature does not match")
    # The program that imported it restarts without it, and fails to import.
    node.wait_program(schema.program_id(MAC, "user"), state="backing-off")
    assert "forged" not in seen.read_text()


def test_a_signed_git_program_runs_only_the_commit_it_pins(
        fleet: Fleet, node_factory: NodeFactory, tmp_path: Path) -> None:
    from tests.test_git import make_repo

    key = make_key(tmp_path)
    marker = tmp_path / "versions.txt"
    bare, v1_commit = make_repo(tmp_path, marker)
    node = signed_node(node_factory, key)
    source = {"url": f"file://{bare}", "entry": "station.app:run"}
    doc = keys.sign({"_id": "weather", "type": MAC, "name": "weather",
                     "git": dict(source, ref="v1", commit=v1_commit)}, key)
    fleet.code.save(doc)
    wait_file(marker, contains="v1")
    assert node.wait_program("weather", state="running")["commit"] == v1_commit
    # A ref that moved: the signature still holds, the fetched commit is another.
    moved = keys.sign(dict(doc, git=dict(source, ref="v2", commit=v1_commit)), key)
    resave(fleet, moved)
    entry = rejected(node, "weather", "is not the signed commit")
    assert v1_commit[:12] in entry["last_error"]
    # A tag or branch alone pins nothing: refused before anything is fetched.
    resave(fleet, keys.sign(dict(doc, git=dict(source, ref="v2")), key))
    rejected(node, "weather", "names no commit")
    assert marker.read_text().split() == ["v1"]


def test_a_file_that_is_no_key_is_a_one_line_error(tmp_path: Path) -> None:
    from himbeere.exceptions import ConfigError

    program = tmp_path / "p.py"
    program.write_text("def main():\n    pass\n")
    with pytest.raises(ConfigError) as caught:
        keys.load(str(program))
    text = str(caught.value)
    assert "is not a PEM private key without a password" in text and "keygen" in text
    assert "\n" not in text and "http" not in text
    with pytest.raises(ConfigError, match="No such file"):
        keys.load(str(tmp_path / "missing.key"))

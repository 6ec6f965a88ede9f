"""The shared conventions of :mod:`himbeere.schema`: ids, states, timestamps, the node rule.

The fast tests need no server.  The agreement test writes a few hundred
documents and holds the three spellings of "is this document for this
node?" together: the design document's JavaScript filter, the ``_selector``
CouchDB gets, and :func:`himbeere.schema.for_node`, the rule the daemon's
parts apply.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import pytest

from himbeere import codedoc, schema
from himbeere.couch import Couch, Database, Doc, FeedFilter, design
from himbeere.schema import CommandState, ProgramState

NODES = (1000, 2000, 202481596941066)
#: MAC ids that look like ours but are not (a prefix, a suffix, another node).
OTHERS = (100, 10000, 3000, 20248159694106)


# -- ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("build, prefix", [
    (schema.status_id, schema.STATUS_PREFIX), (schema.node_id, schema.NODE_PREFIX),
])
def test_a_mac_id_comes_back_out_of_the_id_built_with_it(build: Any, prefix: str) -> None:
    for node in NODES:
        assert schema.mac_of(build(node), prefix) == node
    assert schema.mac_of(build(1000) + ":extra", prefix) is None
    assert schema.mac_of(schema.node_id(1000), schema.STATUS_PREFIX) is None


def test_ids_have_the_documented_shape() -> None:
    assert schema.status_id(12) == "status:12"
    assert schema.node_id(12) == "node:12"
    assert schema.commands_id(12) == "12_cmd"
    assert schema.result_id("cmd-1", 12) == "result:cmd-1:12"
    assert schema.mac_of(schema.result_id("cmd-1", 12), schema.results_prefix("cmd-1")) == 12
    assert schema.log_id(12, "12:blink") == "log:12:12:blink"
    assert schema.log_id(12, "x").startswith(schema.logs_prefix(12))
    assert schema.state_id("12:blink") == "state:12:blink"
    assert schema.lease_id(schema.group_lease_name("jobs")) == "lease:group:jobs"
    assert schema.placement_id("web") == "placement:web"
    assert schema.placed_id("web") == "placed:web"
    assert schema.global_id("lib") == "global:lib"
    assert schema.program_id(12, "blink") == "12:blink"


def test_states_are_the_strings_on_the_wire() -> None:
    assert [s.value for s in CommandState] == [
        "running", "done", "error", "timeout", "interrupted"]
    assert {s.value for s in ProgramState} == {
        "starting", "fetching", "running", "backing-off", "stopping", "stopped", "finished",
        "crashed", "invalid", "rejected"}
    assert str(ProgramState.BACKING_OFF) == "backing-off"
    assert ProgramState("crashed") is ProgramState.CRASHED
    assert CommandState.DONE == "done"


# -- timestamps ---------------------------------------------------------------------------
def test_iso_is_utc_with_milliseconds_and_z() -> None:
    assert schema.iso(1795944600.123) == "2026-11-29T09:30:00.123Z"
    assert schema.iso(0) == "1970-01-01T00:00:00.000Z"
    assert schema.iso(1795944600.9996) == "2026-11-29T09:30:00.999Z"  # cut, never rounded up
    assert schema.iso().endswith("Z")


@pytest.mark.parametrize("text, epoch", [
    ("2026-11-29T09:30:00.123Z", 1795944600.123),        # schema.iso, from now on
    ("2026-11-29T09:30:00Z", 1795944600.0),              # status, programs, logs before
    ("2026-11-29T09:30:00.123+00:00", 1795944600.123),   # node command results before
])
def test_every_format_ever_written_parses(text: str, epoch: float) -> None:
    assert schema.parse_iso(text) == pytest.approx(epoch, abs=1e-6)


def test_iso_round_trips_and_sorts_as_text() -> None:
    moments = [0.0, 1.5, 1795944600.123, 1795944600.124, 1795944601.0]
    texts = [schema.iso(m) for m in moments]
    assert [schema.parse_iso(t) for t in texts] == pytest.approx(moments, abs=1e-6)
    assert sorted(texts) == texts


def test_a_timestamp_that_is_not_one_is_an_error() -> None:
    with pytest.raises(ValueError):
        schema.parse_iso("yesterday")


# -- the node rule ------------------------------------------------------------------------
def test_the_rule_in_python() -> None:
    assert schema.for_node({"type": 1000}, 1000)
    assert schema.for_node({"type": "1000"}, 1000)
    assert schema.for_node({"type": 1000.0}, 1000)
    assert not schema.for_node({"type": [1000]}, 1000)
    assert not schema.for_node({"type": True}, 1)
    assert schema.for_node({"type": "1000_cmd"}, 1000)
    assert not schema.for_node({"type": "1000_cmd"}, 1000, code_only=True)
    assert schema.for_node({"type": schema.COMMAND_TYPE, "targets": [1000.0]}, 1000)
    assert not schema.for_node({"type": schema.COMMAND_TYPE, "targets": [[1000]]}, 1000)
    assert schema.for_node({"_id": "x", "_deleted": True}, 1000)
    assert not schema.for_node({"_id": "_design/x", "type": 1000}, 1000)
    # A program for many nodes reaches every node, whatever it targets: only
    # the node knows its labels.
    for targets in ("all", [2000], {"labels": {"room": "lab"}}, None):
        doc = {"type": schema.PROGRAM_TYPE, "targets": targets}
        assert schema.for_node(doc, 1000) and schema.for_node(doc, 1000, code_only=True)
    assert not schema.for_node({"type": [schema.PROGRAM_TYPE]}, 1000)


def test_targets_match_labels_macs_or_all() -> None:
    lab = {"labels": {"room": "lab"}}
    assert schema.targets_labels("all", 1000, None)
    assert schema.targets_labels([2000, "1000"], 1000, None)
    assert not schema.targets_labels([2000], 1000, {"room": "lab"})
    assert schema.targets_labels(lab, 1000, {"room": "lab", "rack": "2"})
    assert not schema.targets_labels(lab, 1000, {"room": "kitchen"})
    assert not schema.targets_labels(lab, 1000, {})
    assert not schema.targets_labels(lab, 1000, None)  # labels not known yet
    two = {"labels": {"room": "lab", "rack": "2"}}
    assert not schema.targets_labels(two, 1000, {"room": "lab"})
    for junk in (None, "ALL", 1000, {"labels": "room=lab"}, {"labels": {"room": 1}},
                 {"room": "lab"}, dict(lab, extra=1)):
        assert not schema.targets_labels(junk, 1000, {"room": "lab", "1000": "1000"}), junk
    assert schema.targets_text("all") == "all"
    assert schema.targets_text(two) == "rack=2, room=lab"
    assert schema.targets_text([1001, 1002]) == "1001, 1002"
    # The daemon's parts apply the same rule (codedoc for programs).
    assert codedoc.matches_node({"type": 1000.0}, 1000)
    assert not codedoc.matches_node({"type": [1000]}, 1000)


def _junk() -> list[Any]:
    return [None, True, False, 0, "", "all", "ALL", "1000.0", " 1000", "01000", 1000.5,
            {"mac": 1000}, [], [1000], ["1000"], [[1000]], [1000, 2000], ["himbeere-placed"],
            [schema.COMMAND_TYPE], ["1000_cmd"], "himbeere-status", "_cmd", "1000_cmdx",
            "cmd_1000", "1000 _cmd"]


def _mac_values(rng: random.Random) -> list[Any]:
    """Ways of writing a MAC id: ours, others', as int, string, float."""
    node = rng.choice(NODES + OTHERS)
    return [node, str(node), float(node)]


def _targets(rng: random.Random) -> Any:
    shape = rng.randrange(6)
    if shape == 0:
        return "all"
    if shape == 1:
        return rng.choice(_junk() + [1000, "1000", {"1000": True}])
    count = rng.randrange(0, 5)
    items: list[Any] = []
    for _ in range(count):
        items.append(rng.choice(_mac_values(rng) if rng.random() < 0.7 else _junk()))
    return items


def _documents(seed: int, count: int) -> list[Doc]:
    """``count`` documents covering each case the filter tells apart (ids ``d<n>``)."""
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        doc: Doc = {"_id": f"d{n:04d}"}
        kind = rng.randrange(8)
        if kind <= 1:  # a program of some node
            doc["type"] = rng.choice(_mac_values(rng))
            doc["code"] = "def main(): pass"
        elif kind == 2:  # a node's own commands, or something like them
            node = rng.choice(NODES + OTHERS)
            doc["type"] = rng.choice([schema.commands_id(node), f"{node}_cmd", "_cmd",
                                      f"{node}_command", f"x{node}_cmd"])
            doc["cmd"] = ["true"]
        elif kind == 3:  # a fleet command
            doc["type"] = schema.COMMAND_TYPE
            if rng.random() < 0.9:
                doc["targets"] = _targets(rng)
            doc["cmd"] = ["true"]
        elif kind == 4:  # placed programs, programs for many nodes, global modules
            doc["_id"] = rng.choice([schema.placed_id, schema.global_id,
                                     schema.targeted_id])(f"p{n}")
            doc["type"] = rng.choice([schema.PLACED_TYPE, schema.PLACED_TYPE, None, "x",
                                      schema.PROGRAM_TYPE, schema.PROGRAM_TYPE,
                                      schema.PROGRAM_TYPE.upper(), [schema.PROGRAM_TYPE],
                                      # daemon upgrades: only the pointer passes
                                      schema.DAEMON_CURRENT_TYPE, [schema.DAEMON_CURRENT_TYPE],
                                      schema.DAEMON_RELEASE_TYPE])
            if rng.random() < 0.5:  # whatever the targets: the node decides, not the feed
                doc["targets"] = rng.choice(
                    [_targets(rng), {"labels": {"room": "lab"}}, {"labels": "room=lab"}])
            if doc["type"] is None:
                del doc["type"]
        elif kind == 5:  # junk types
            doc["type"] = rng.choice(_junk())
        elif kind == 6:  # no type at all
            doc["name"] = "untyped"
        else:  # fleet command targets on something that is not one
            doc["type"] = rng.choice(["himbeere-commands", "himbeere-result", 1000])
            doc["targets"] = _targets(rng)
        if rng.random() < 0.15:
            doc["global_modules"] = rng.choice(
                [{"lib": "X = 1"}, {}, None, 0, "", False, [], "lib"])
        docs.append(doc)
    return docs


def _write(db: Database, docs: list[Doc], rng: random.Random) -> set[str]:
    """Save ``docs``, delete some (half with their body kept); returns the deleted ids."""
    deleted = set()
    for doc in docs:
        saved = db.save(dict(doc))
        if rng.random() < 0.1:
            if rng.random() < 0.5:
                db.delete(dict(doc, _rev=saved["_rev"]))
            else:  # a deletion that keeps its fields, as a PUT with _deleted does
                db.save(dict(doc, _rev=saved["_rev"], _deleted=True))
            deleted.add(doc["_id"])
    return deleted


@pytest.fixture
def stored(couch: Couch, dbname: str) -> dict[str, Doc]:
    """The test's database with the design document and a few hundred documents (by id,
    as the rule sees them: a deleted one has ``_deleted``)."""
    db = couch.database(dbname)
    design.ensure_design(db)
    rng = random.Random(11)
    docs = _documents(seed=11, count=400)
    docs += [{"_id": "_design/mine", "type": NODES[0], "global_modules": {"lib": "X = 1"}},
             {"_id": "_design/gone", "type": NODES[0]}]
    deleted = _write(db, docs, rng)
    deleted_design = {"_id": "_design/deleted", "type": NODES[1]}
    db.delete(dict(deleted_design, _rev=db.save(dict(deleted_design))["_rev"]))
    deleted.add(deleted_design["_id"])
    assert len(deleted) > 10
    return {doc["_id"]: dict(doc, _deleted=True) if doc["_id"] in deleted else doc
            for doc in docs + [deleted_design]}


def _agree(db: Database, stored: dict[str, Doc], feed_filter: Callable[[int, bool], FeedFilter],
           ) -> None:
    """For each node, with and without commands: the server passes what the rule passes."""
    for node in NODES:
        for code_only in (False, True):
            rule = {doc_id for doc_id, doc in stored.items()
                    if schema.for_node(doc, node, code_only=code_only)}
            assert 5 < len(rule) < len(stored) - 5  # the rule tells documents apart
            # The server may pass design documents; the feed drops them before the rule.
            answer = db.changes(0, feed_filter(node, code_only))
            passed = {str(change["id"]) for change in answer["results"]
                      if not str(change["id"]).startswith("_design/")}
            differences = _differences(passed, rule, stored)
            assert not differences, f"node {node}, code_only={code_only}:{differences}"


def test_the_javascript_filter_passes_what_the_python_rule_does(
        couch: Couch, dbname: str, stored: dict[str, Doc]) -> None:
    _agree(couch.database(dbname), stored, design.javascript_filter)


def test_the_selector_passes_what_the_python_rule_does(
        couch: Couch, dbname: str, server_kind: str, stored: dict[str, Doc]) -> None:
    if server_kind != "couchdb":
        pytest.skip("needs Apache CouchDB: pouchdb-server crashes on filter=_selector "
                    "(HIMBEERE_TEST_SERVER=couchdb runs it)")
    _agree(couch.database(dbname), stored, design.selector_filter)


def _differences(passed: set[str], rule: set[str], stored: dict[str, Doc]) -> str:
    """The documents one side passes and the other does not, one a line ("" if none)."""
    return "".join([f"\n  server only: {stored[doc_id]}" for doc_id in sorted(passed - rule)]
                   + [f"\n  rule only: {stored[doc_id]}" for doc_id in sorted(rule - passed)])

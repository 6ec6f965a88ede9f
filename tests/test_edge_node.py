"""A site node between two servers (issue 15): exactly once across them, and
the conflicts of its own documents resolved by the node.

Two real servers: the test's own (``restartable_server``, stopped mid-test)
and the session's.  A document "replicated" from one to the other is copied
with ``new_edits=false``, as replication writes it; a conflict is made the
same way, with two revisions of one document.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from himbeere import journal
from himbeere.conflicts import Conflicts
from himbeere.couch import Couch, Database, Doc
from himbeere.journal import Ledger
from himbeere.schema import history_id, log_id, result_id, status_id
from tests.helpers import wait_for
from tests.nodes import Node
from uploader import install
from uploader.fleet import Fleet

PY = sys.executable
#: Revision ids of two siblings: CouchDB shows the one with the higher id, "f...".
LOW, HIGH = "1-" + "a" * 32, "1-" + "f" * 32


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def once(ledger: Path, mark: str) -> list[str]:
    """A command that appends ``mark`` to ``ledger``: the file shows each run."""
    return ["sh", "-c", f"echo {mark} >> '{ledger}'"]


def result_of(db: Database, doc_id: str) -> Callable[[], Optional[Doc]]:
    def finished() -> Optional[Doc]:
        try:
            doc = db.get(doc_id)
        except Exception:  # the server asked may be the one just stopped
            return None
        return doc if doc is not None and "finished" in doc else None
    return finished


def replicate(source: Database, target: Database, doc_id: str) -> None:
    """Copy ``doc_id`` with its revision, as replication would."""
    doc = source.get(doc_id)
    assert doc is not None
    target.bulk_docs([doc], new_edits=False)


def siblings(db: Database, doc_id: str, low: Doc, high: Doc) -> None:
    """Two conflicting revisions of ``doc_id``: ``high`` is the one CouchDB shows."""
    db.bulk_docs([dict(low, _id=doc_id, _rev=LOW), dict(high, _id=doc_id, _rev=HIGH)],
                 new_edits=False)
    shown = db.get(doc_id, conflicts=True)
    assert shown is not None and shown["_rev"] == HIGH and shown["_conflicts"] == [LOW]


# -- the ledger ------------------------------------------------------------------------

def test_the_ledger_keeps_the_newest_results_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "finished.json"
    ledger = Ledger(path, size=4)
    for index in range(10):
        ledger.record(f"c{index}", {"state": "done", "returncode": index, "ret": ["x", ""]})
    again = Ledger(path, size=4)
    assert [key for key in (f"c{i}" for i in range(10)) if key in again] == \
        ["c6", "c7", "c8", "c9"]
    assert again.get("c9") == {"state": "done", "returncode": 9, "ret": ["x", ""]}
    assert again.get("c1") is None
    assert len(path.read_text().splitlines()) <= 4 + 2  # compacted, bounded


def test_the_ledger_forgets_old_entries_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "finished.json"
    old = time.time() - 31 * 86400
    path.write_text(json.dumps({"id": "old", "at": old, "result": {"state": "done"}}) + "\n"
                    + json.dumps({"id": "new", "at": time.time(), "result": {"state": "done"}})
                    + "\n" + '{"id": "torn", "at"')
    ledger = Ledger(path)
    assert "old" not in ledger and "new" in ledger and "torn" not in ledger
    ledger.record("next", {"state": "done", "ret": ["é" * 5000, ""]})  # rewrites: torn end
    kept = Ledger(path).get("next")
    assert kept is not None
    assert len(kept["ret"][0].encode()) <= journal.LEDGER_OUTPUT
    assert kept["truncated"]["stdout"] == 10000 - len(kept["ret"][0].encode())


# -- exactly once across servers ---------------------------------------------------------

def test_a_command_that_ran_on_one_server_is_not_run_again_on_the_other(
        restartable_server: Any, couch_url: str, dbname: str, tmp_path: Path,
        node_factory: Callable[..., Node]) -> None:
    """The node runs a command and a fleet command on A (the relay); A goes
    away before replication carried the results; B (the centre) has both
    commands without results.  The node writes the kept results on B, and
    the ledger file shows each command ran once."""
    mac = 1000
    first, second = Fleet(restartable_server.url, dbname), Fleet(couch_url, dbname)
    install.setup(first)
    install.setup(second)
    # The node's feed resumes on B from the seq it saved on A.  CouchDB sees
    # that seq is another database's (its shard uuid) and starts B from 0;
    # pouchdb-server takes an integer as it is.  Here the centre has had more
    # changes than the relay, so B's commands come after that seq either way.
    second.code.bulk_docs([{"_id": f"other-{i}"} for i in range(60)])
    ledger = tmp_path / "ledger"
    first.code.save({"_id": "x", "type": f"{mac}_cmd", "cmd": once(ledger, "x")})
    first.code.save({"_id": "f", "type": "himbeere-command", "targets": [mac],
                     "cmd": once(ledger, "f"), "created_time": time.time()})
    for doc_id in ("x", "f"):
        replicate(first.code, second.code, doc_id)
    fleet_result = result_id("f", mac)

    node = node_factory(mac_id=mac, url=f"{restartable_server.url},{couch_url}")
    on_a = wait_for(result_of(first.code, "x"), 60, message=lambda: node.log()[-3000:])
    fleet_on_a = wait_for(result_of(first.status, fleet_result), 60,
                          message=lambda: node.log()[-3000:])
    assert sorted(lines(ledger)) == ["f", "x"]
    assert "finished" not in (second.code.get("x") or {})
    assert second.status.get(fleet_result) is None

    restartable_server.stop()  # before replication carried the results to B
    on_b = wait_for(result_of(second.code, "x"), 60, message=lambda: node.log()[-3000:])
    fleet_on_b = wait_for(result_of(second.status, fleet_result), 60,
                          message=lambda: node.log()[-3000:])
    for kept, original in ((on_b, on_a), (fleet_on_b, fleet_on_a)):
        for field in ("state", "returncode", "started", "finished", "ret", "node"):
            assert kept.get(field) == original.get(field), field
    assert fleet_on_b["type"] == "himbeere-result" and fleet_on_b["command"] == "f"
    node.wait_log("ran here already", count=2)
    assert sorted(lines(ledger)) == ["f", "x"]
    assert node.log().count("command x ran here already") == 1


# -- conflicts ---------------------------------------------------------------------------

def test_the_owner_resolves_the_conflicts_of_its_documents(
        couch: Couch, dbname: str, node_user: Callable[[], tuple[int, str]]) -> None:
    """As the node user: each kind keeps the right revision, or merges, even
    where CouchDB shows the wrong one; another node's conflict is left alone."""
    mac, url = node_user()
    other, _ = node_user()
    admin_code = couch.database(dbname)
    admin_status = couch.database(dbname + "_status")
    as_node = Couch(url)
    code, status = as_node.database(dbname), as_node.database(dbname + "_status")
    node = {"node": mac}
    siblings(admin_status, status_id(mac), dict(node, heartbeat_time=200.0, state="running"),
             dict(node, heartbeat_time=100.0, state="running"))
    siblings(admin_status, history_id(mac), dict(node, samples=[[300, 1], [600, 2]]),
             dict(node, samples=[[300, 1]]))
    siblings(admin_status, log_id(mac, "p"),
             dict(node, lines=[[2.0, "b"], [3.0, "c"]], dropped=1),
             dict(node, lines=[[1.0, "a"], [3.0, "c"]], dropped=0))
    siblings(admin_status, result_id("c1", mac),
             dict(node, state="done", ret=["the whole output", ""], returncode=0),
             dict(node, state="done", ret=["the", ""], returncode=0))
    siblings(admin_code, "cmd1", {"type": f"{mac}_cmd", "cmd": ["true"], "state": "done",
                                  "ret": ["", ""], "returncode": 0, "node": mac},
             {"type": f"{mac}_cmd", "cmd": ["true"], "state": "running", "node": mac})
    siblings(admin_status, status_id(other), {"node": other, "heartbeat_time": 2.0},
             {"node": other, "heartbeat_time": 1.0})
    # Shared state, saved last by another node on the other side of a split:
    # no one owns it, any node resolves it, and the last save wins.
    siblings(admin_status, "state:program:counter",
             {"node": other, "saved": 2000.0, "values": {"runs": 7}},
             {"node": other, "saved": 1000.0, "values": {"runs": 5}})

    resolver = Conflicts(status, code, mac, interval=30.0)
    assert resolver.check() == 6

    def shown(db: Database, doc_id: str) -> Doc:
        doc = db.get(doc_id, conflicts=True)
        assert doc is not None and not doc.get("_conflicts"), doc
        return doc

    assert shown(status, status_id(mac))["heartbeat_time"] == 200.0
    assert shown(status, history_id(mac))["samples"] == [[300, 1], [600, 2]]
    merged = shown(status, log_id(mac, "p"))
    assert merged["lines"] == [[1.0, "a"], [2.0, "b"], [3.0, "c"]] and merged["dropped"] == 1
    assert shown(status, result_id("c1", mac))["ret"] == ["the whole output", ""]
    assert shown(code, "cmd1")["state"] == "done"
    assert shown(status, "state:program:counter")["values"] == {"runs": 7}
    assert admin_status.get(status_id(other), conflicts=True)["_conflicts"] == [LOW]
    assert resolver.check() == 0  # idempotent: nothing left to do


def test_two_resolvers_racing_leave_one_revision(
        couch: Couch, dbname: str, node_user: Callable[[], tuple[int, str]]) -> None:
    """Two copies of the daemon's view list the same documents; one resolves
    them, the other acts on its list afterwards and changes nothing."""
    mac, url = node_user()
    admin_status = couch.database(dbname + "_status")
    status = Couch(url).database(dbname + "_status")
    siblings(admin_status, log_id(mac, "p"), {"node": mac, "lines": [[2.0, "b"]]},
             {"node": mac, "lines": [[1.0, "a"]]})
    siblings(admin_status, status_id(mac), {"node": mac, "heartbeat_time": 2.0},
             {"node": mac, "heartbeat_time": 1.0})
    late = Conflicts(status, Couch(url).database(dbname), mac, interval=30.0)
    listed = late.conflicted(status)
    assert listed == sorted([log_id(mac, "p"), status_id(mac)])
    assert Conflicts(status, Couch(url).database(dbname), mac, interval=30.0).check() == 2
    for doc_id in listed:  # the late one still acts on what it listed
        late.resolve(status, doc_id)
    doc = status.get(log_id(mac, "p"), conflicts=True)
    assert doc is not None and not doc.get("_conflicts")
    assert doc["lines"] == [[1.0, "a"], [2.0, "b"]]
    assert status.get(status_id(mac))["heartbeat_time"] == 2.0


class Racing(Database):
    """A real database handle that lets ``rival`` resolve first, just before
    this resolver's first write: the race of two copies of the daemon."""

    def __init__(self, db: Database, rival: Callable[[], Any]) -> None:
        super().__init__(db.couch, db.name)
        self.rival: Optional[Callable[[], Any]] = rival

    def bulk_docs(self, docs: list[Doc], new_edits: bool = True) -> list[Doc]:
        rival, self.rival = self.rival, None
        if rival is not None:
            rival()
        return super().bulk_docs(docs, new_edits)


def test_a_resolver_that_loses_the_race_reads_again_and_agrees(
        couch: Couch, dbname: str, node_user: Callable[[], tuple[int, str]]) -> None:
    """Its merged write and deletions get 409s; it reads again and finds the
    conflict resolved, with the same union of lines, nothing lost."""
    mac, url = node_user()
    admin_status = couch.database(dbname + "_status")
    status = Couch(url).database(dbname + "_status")
    code = Couch(url).database(dbname)
    siblings(admin_status, log_id(mac, "p"), {"node": mac, "lines": [[2.0, "b"]]},
             {"node": mac, "lines": [[1.0, "a"]]})
    rival = Conflicts(status, code, mac, interval=30.0)
    racing = Racing(status, lambda: rival.resolve(status, log_id(mac, "p")))
    late = Conflicts(racing, code, mac, interval=30.0)
    assert late.resolve(racing, log_id(mac, "p")) is False  # the rival did it
    assert racing.rival is None  # the race did happen
    doc = status.get(log_id(mac, "p"), conflicts=True)
    assert doc is not None and not doc.get("_conflicts")
    assert doc["lines"] == [[1.0, "a"], [2.0, "b"]]
    assert doc["_rev"].startswith("2-")  # one merged write, not two


def test_without_the_conflicts_view_the_check_is_skipped(
        couch: Couch, dbname: str) -> None:
    """An older design document (set up before version 9): no view, no error."""
    db = couch.database(dbname)
    resolver = Conflicts(db, db, 1000, interval=30.0)
    assert resolver.check() == 0
    assert db.name in resolver.missing


def test_the_daemon_with_two_servers_resolves_its_conflicts(
        dbname: str, tmp_path: Path, node_user: Callable[[], tuple[int, str]],
        couch: Couch) -> None:
    """The hook: a daemon with a server list checks one heartbeat after its start."""
    mac, url = node_user()
    admin_status = couch.database(dbname + "_status")
    siblings(admin_status, log_id(mac, "gone"), {"node": mac, "lines": [[2.0, "b"]]},
             {"node": mac, "lines": [[1.0, "a"]]})
    dead = "http://127.0.0.1:9"  # discard: refused at once; inherits the credentials
    node = Node(f"{url},{dead}", dbname, tmp_path / "state", mac)
    node.start()
    try:
        doc = wait_for(lambda: (lambda d: d if d and not d.get("_conflicts") else None)(
            admin_status.get(log_id(mac, "gone"), conflicts=True)), 60,
            message=lambda: node.log()[-3000:])
        assert doc["lines"] == [[1.0, "a"], [2.0, "b"]]
        assert "conflicts: resolved" in node.log()
    finally:
        node.stop()

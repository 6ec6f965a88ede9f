"""The feed: first start, resuming from ``seq.json``, reconnecting, design document.

Real daemons against real pouchdb-servers; the reconnect tests stop, restart
and freeze (SIGSTOP) a server of their own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from himbeere.couch import Couch, Database, design
from himbeere.feed import Backoff, SeqStore
from tests.helpers import needs_admin_daemon, wait_for
from tests.nodes import wait_file
from tests.servers import create_database
from tests.test_commands import command, settled, wait_doc


def appender(path: Path, text: str = "started") -> str:
    """Code of a program that appends a line to ``path`` each time it starts."""
    return f"def main():\n    open({str(path)!r}, 'a').write({text!r} + '\\n')\n"


def program(db: Database, doc_id: str, code: str, mac_id: int = 1000) -> dict[str, Any]:
    return db.save({"_id": doc_id, "type": mac_id, "name": doc_id, "code": code})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- Backoff -------------------------------------------------------------------------------
def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(first=1.0, cap=8.0)
    for step in (1, 2, 4, 8, 8, 8):
        delay = backoff.next()
        assert step / 2 <= delay <= step
    at_cap = [backoff.next() for _ in range(50)]
    assert all(4.0 <= delay <= 8.0 for delay in at_cap)
    assert len(set(at_cap)) > 1, "no jitter"
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0


def test_backoff_survives_a_long_outage() -> None:
    """Regression: after 1024 failures 2 ** attempt overflowed and ended the feed."""
    backoff = Backoff()
    assert all(backoff.next() <= backoff.cap for _ in range(5000))


# -- seq.json --------------------------------------------------------------------------------
def test_seq_store_ignores_another_servers_or_databases_seq(tmp_path: Path) -> None:
    store = SeqStore(tmp_path / "seq.json", "raspberries", "http://couch:5984")
    assert store.load() is None
    store.save(42)
    assert store.load() == 42
    assert SeqStore(store.path, "other", "http://couch:5984").load() is None
    assert SeqStore(store.path, "raspberries", "http://elsewhere:5984").load() is None
    store.path.write_text("{not json")
    assert store.load() is None


def test_first_start_loads_code_and_commands_then_resumes_from_seq(
        node_factory, code_db: Database, tmp_path: Path) -> None:
    starts, runs, later = tmp_path / "starts.txt", tmp_path / "runs.txt", tmp_path / "later.txt"
    program(code_db, "prog", appender(starts))
    command(code_db, "pending", ["sh", "-c", f"echo x >> {runs}"])
    node = node_factory(mac_id=1000)
    wait_file(starts)
    wait_doc(code_db, "pending")
    node.wait_program("prog", state="finished")
    seq_file = node.state_dir / "seq.json"
    saved = wait_for(lambda: seq_file.exists() and json.loads(seq_file.read_text()))
    assert saved["database"] == code_db.name
    assert saved["server"] == code_db.couch.base  # no credentials on disk
    assert "seq" in saved
    assert node.stop() == 0

    # While the daemon is down: a new program and a new command.
    program(code_db, "later", appender(later))
    command(code_db, "while-down", ["echo", "resumed"])
    node.start()
    wait_file(later)
    assert wait_doc(code_db, "while-down")["ret"] == ["resumed\n", ""]
    # The unchanged program starts again with the daemon (catch-up of code
    # documents older than the saved seq) ...
    wait_for(lambda: len(lines(starts)) == 2, message=lambda: f"starts: {lines(starts)}")
    # ... but the finished command is not run again.
    wait_for(lambda: settled(node), message="journal never emptied")
    assert lines(runs) == ["x"]
    resumed = json.loads(seq_file.read_text())
    assert resumed["seq"] != saved["seq"]


# -- losing the server -------------------------------------------------------------------------
def test_daemon_reconnects_after_a_server_restart(restartable_server, node_factory) -> None:
    server = restartable_server
    create_database(server.url, "raspberries")
    db = Couch(server.url).database("raspberries")
    node = node_factory(mac_id=1000, url=server.url, database="raspberries")
    command(db, "before", ["echo", "before"])
    wait_doc(db, "before")

    server.stop()
    node.wait_log("reconnecting in")
    node.wait_log("cannot reach")  # a reconnect attempt failed: it is backing off
    time.sleep(3)  # down long enough for the backoff to grow past a server start
    reconnected = node.log().count("feed: connected again")
    server.start()
    command(db, "after", ["echo", "after"])  # the daemon may not be back yet
    assert wait_doc(db, "after")["ret"] == ["after\n", ""]
    node.wait_log("feed: connected again", count=reconnected + 1)
    assert "Traceback" not in node.log()


def test_silent_dead_connection_is_detected_by_the_feed_timeout(
        restartable_server, node_factory) -> None:
    server = restartable_server
    create_database(server.url, "raspberries")
    db = Couch(server.url).database("raspberries")
    node = node_factory(mac_id=1000, url=server.url, database="raspberries",
                        env={"HIMBEERE_FEED_TIMEOUT": "2"})
    command(db, "before", ["echo", "before"])
    wait_doc(db, "before")

    server.pause()  # connections stay open and fall silent
    try:
        # Well within the default feed timeout of 30 s: the 2 s setting was used.
        node.wait_log("silent for 2 s, no heartbeat; reconnecting in", timeout=20)
    finally:
        server.resume()
    command(db, "after", ["echo", "after"])
    assert wait_doc(db, "after", timeout=60)["ret"] == ["after\n", ""]
    node.wait_log("feed: connected again")


# -- names and design document --------------------------------------------------------------
def test_database_name_with_a_slash_works_end_to_end(node_factory, dbname_factory,
                                                     couch: Couch, tmp_path: Path) -> None:
    name = dbname_factory("/raspberries")
    db = couch.database(name)
    marker = tmp_path / "slash.txt"
    program(db, "prog", appender(marker, "slash"))
    node = node_factory(mac_id=1000, database=name)
    assert wait_file(marker, contains="slash")
    command(db, "cmd", ["echo", "slash"])
    assert wait_doc(db, "cmd")["ret"] == ["slash\n", ""]
    status = wait_for(node.status, message="no status document")
    assert status["node"] == 1000


@needs_admin_daemon("only an admin may write design documents")
def test_daemon_installs_its_design_document_as_admin(node_factory, code_db: Database,
                                                      server_kind: str) -> None:
    """pouchdb-server needs the JavaScript filter; CouchDB filters with a _selector."""
    assert code_db.get(design.DESIGN_ID) is None
    node = node_factory(mac_id=1000)
    if server_kind == "pouchdb":
        installed = wait_for(lambda: code_db.get(design.DESIGN_ID), message="no design document")
        assert installed["filters"]["node"] == design.NODE_FILTER
        assert installed["himbeere_version"] == design.VERSION
        node.wait_log(f"installed {design.DESIGN_ID}")
    command(code_db, "cmd", ["echo", "filtered"])
    assert wait_doc(code_db, "cmd")["ret"] == ["filtered\n", ""]
    if server_kind == "couchdb":
        assert code_db.get(design.DESIGN_ID) is None
        assert f"installed {design.DESIGN_ID}" not in node.log()


def test_node_without_admin_rights_explains_the_missing_design_document(
        restartable_server, node_factory, server_kind: str) -> None:
    """On pouchdb-server the node needs the design document only an admin may
    write; on CouchDB it filters with a _selector, but the new databases are
    admin-only until the admin opens them to nodes."""
    # A server of its own: pouchdb-server dies when a non-admin creates a
    # database, which the daemon tries for a missing status database.
    server = restartable_server
    create_database(server.url, "raspberries")
    create_database(server.url, "raspberries_status")
    response = requests.put(f"{server.url}/_users/org.couchdb.user:1000", timeout=30, json={
        "name": "1000", "password": "nodepw", "type": "user", "roles": ["himbeere-node"]})
    assert response.ok, response.text
    db = Couch(server.url).database("raspberries")
    node_url = server.url.replace(f"{server.user}:{server.password}@", "1000:nodepw@")
    node = node_factory(mac_id=1000, url=node_url, database="raspberries")
    if server_kind == "couchdb":
        node.wait_log("403 forbidden: You are not allowed to access this db")
        for name in ("raspberries", "raspberries_status"):  # the admin fixes it
            response = requests.put(f"{server.url}/{name}/_security", timeout=30, json={
                "admins": {"names": [], "roles": []},
                "members": {"names": [], "roles": ["himbeere-node"]}})
            assert response.ok, response.text
    else:
        node.wait_log("may not write it: run `himbeere-upload setup URL` as an admin")
        assert db.get(design.DESIGN_ID) is None
        design.ensure_design(db)  # the admin fixes it; the node recovers by itself
    command(db, "cmd", ["echo", "as node"])
    assert wait_doc(db, "cmd")["ret"] == ["as node\n", ""]
    assert server.running
    if server_kind == "couchdb":
        assert db.get(design.DESIGN_ID) is None  # a _selector needs none

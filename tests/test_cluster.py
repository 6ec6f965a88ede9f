"""Several servers in ``server``: parsing, the rotation, and a real 3-node cluster.

The first tests need no cluster: a list whose first URL is a closed port and
whose second is the session's server shows the rotation on any server.  The
cluster tests run against one 3-node Apache CouchDB 3.5.2 cluster per test
session (tests/cluster.py), with ``HIMBEERE_TEST_SERVER=couchdb`` and the
CouchDB release; otherwise they are skipped.
CI runs them as ``HIMBEERE_TEST_SERVER=couchdb scripts/test tests/test_cluster.py``.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from himbeere import config
from himbeere.couch import Couch, Database, security, server_urls
from himbeere.exceptions import ConfigError, Unauthorized, Unreachable
from tests.cluster import NO_RELEASE, CouchCluster, open_cluster, release, skip_reason
from tests.helpers import wait_for
from tests.nodes import ROOT, Node, wait_file
from tests.servers import create_database, delete_database
from uploader import install, users
from uploader.fleet import Fleet

PY = sys.executable


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain(url: str) -> str:
    """``url`` without its credentials."""
    return Couch(url).base


def appender(path: Path, text: str) -> str:
    """Code of a program that appends ``text`` to ``path`` each time it starts."""
    return f"def main():\n    open({str(path)!r}, 'a').write({text!r} + '\\n')\n"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def once(ledger: Path, mark: str) -> list[str]:
    """A command that appends ``mark`` to ``ledger``: the ledger shows each run."""
    return [PY, "-c", f"open({str(ledger)!r}, 'a').write({mark!r} + '\\n')"]


def wait_result(db: Database, doc_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def finished() -> Optional[dict[str, Any]]:
        try:
            doc = db.get(doc_id)
        except Exception:  # the server we ask may be the one that just died
            return None
        return doc if doc is not None and "finished" in doc else None

    return wait_for(finished, timeout, message=f"{doc_id} never got its result")


# -- the list ------------------------------------------------------------------------------
def test_a_server_list_gives_every_url_the_first_urls_credentials() -> None:
    assert server_urls("http://admin:p,w@n1:5984, http://n2:5984 ,https://me:x@n3/couch") == [
        "http://admin:p,w@n1:5984", "http://admin:p,w@n2:5984", "https://me:x@n3/couch"]
    assert server_urls("http://n1:5984") == ["http://n1:5984"]
    couch = Couch("http://admin:pw@n1:5984,http://n2:5984")
    assert couch.bases == ["http://n1:5984", "http://n2:5984"]
    assert couch.base == "http://n1:5984" and couch.auth == ("admin", "pw")
    assert "pw" not in repr(couch)
    assert config.redact("http://admin:pw@n1:5984,http://n2:5984") == (
        "http://admin:***@n1:5984,http://admin:***@n2:5984")


def test_the_list_is_read_from_file_environment_and_flag(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("[himbeere]\nserver = http://a:1@n1:5984,http://n2:5984\n")
    assert config.load({}, environ={}, config_file=str(ini)).server == (
        "http://a:1@n1:5984,http://n2:5984")
    env = {"HIMBEERE_SERVER": "http://n3:5984,http://n4:5984"}
    assert config.load({}, environ=env, config_file=str(ini)).server == env["HIMBEERE_SERVER"]
    flag = config.load({"server": "http://n5:5984,http://n6:5984"}, environ=env,
                       config_file=str(ini))
    assert flag.server == "http://n5:5984,http://n6:5984"


def test_the_original_server_file_keeps_working(tmp_path: Path) -> None:
    (tmp_path / "server").write_text("http://original:5984\n")
    empty = tmp_path / "c.ini"
    empty.write_text("")
    cfg = config.load({"server_file": str(tmp_path / "server")}, environ={},
                      config_file=str(empty))
    assert cfg.server == "http://original:5984"
    assert Couch(cfg.server).bases == ["http://original:5984"]


@pytest.mark.parametrize("bad", ["http://n1:5984,ftp://n2", "http://n1:5984,http://:5984",
                                 "http://n1:5984,http://n2:port"])
def test_a_bad_url_in_the_list_is_one_error_naming_it(bad: str) -> None:
    wrong = bad.split(",")[1]
    with pytest.raises(ConfigError) as error:
        config.Config(server=bad).validate()
    assert str(error.value).startswith(f"server: {wrong!r} is not a URL")


def test_the_daemon_names_a_bad_url_of_the_list_in_one_line(tmp_path: Path) -> None:
    ini = tmp_path / "c.ini"
    ini.write_text("")
    result = subprocess.run(
        [PY, "-m", "himbeere", "daemon", "--server", "http://u:secret@n1:5984,nonsense",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
        env={"HIMBEERE_CONFIG": str(ini), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "himbeere: error: server: 'nonsense' is not a URL; allowed: "
        "http(s)://[user:password@]host[:port], several separated by commas"]


# -- the rotation, against the session's server ------------------------------------------
@pytest.mark.parametrize("transport", ["stdlib", "requests"])
def test_requests_move_on_from_a_dead_server_to_the_next(couch_url: str, dbname: str,
                                                        transport: str) -> None:
    dead = closed_port()
    couch = Couch(f"http://127.0.0.1:{dead},{couch_url}", transport=transport)
    db = couch.database(dbname)
    saved = db.save({"made": "by POST"})  # never sent to the dead one: safe to send again
    assert couch.base == plain(couch_url)
    assert db.get(saved["_id"])["made"] == "by POST"
    assert len(db.all_docs()) == 1  # created once


def test_a_dead_server_later_in_the_list_changes_nothing(couch_url: str, dbname: str) -> None:
    couch = Couch(f"{couch_url},http://127.0.0.1:{closed_port()}")
    db = couch.database(dbname)
    db.save({"_id": "a"})
    assert [c["id"] for c in db.changes()["results"]] == ["a"]
    assert couch.base == plain(couch_url)


def test_a_broken_feed_moves_every_user_of_the_server_on(
        restartable_server, couch_url: str, dbname: str) -> None:
    create_database(restartable_server.url, dbname)
    couch = Couch(f"{restartable_server.url},{couch_url}")
    db = couch.database(dbname)
    feed = db.follow(0, timeout=30)
    db.save({"_id": "first"})
    assert next(feed)["id"] == "first"
    restartable_server.stop()
    with pytest.raises(Unreachable):
        next(feed)
    # Every request through this Couch goes to the next server now.
    assert couch.base == plain(couch_url)
    db.save({"_id": "second"})
    assert Couch(couch_url).database(dbname).get("second") is not None
    assert [c["id"] for c in db.changes()["results"]] == ["second"]


def test_a_silent_feed_moves_on_to_the_next_server(
        restartable_server, couch_url: str, dbname: str) -> None:
    """A frozen server keeps its connections open: the feed's silence gives it away."""
    create_database(restartable_server.url, dbname)
    couch = Couch(f"{restartable_server.url},{couch_url}")
    db = couch.database(dbname)
    feed = db.follow(0, timeout=1)
    db.save({"_id": "first"})
    assert next(feed)["id"] == "first"
    restartable_server.pause()
    try:
        with pytest.raises(Unreachable, match="silent"):
            next(feed)
        assert couch.base == plain(couch_url)
        db.save({"_id": "second"})
        assert Couch(couch_url).database(dbname).get("second") is not None
    finally:
        restartable_server.resume()


def test_a_daemon_whose_first_server_is_dead_uses_the_next(
        couch_url: str, dbname: str, node_factory, tmp_path: Path) -> None:
    admin = Couch(couch_url)
    if admin.auth is None:
        pytest.skip("the session's server has no admin credentials to inherit")
    dead = f"http://{admin.auth[0]}:{admin.auth[1]}@127.0.0.1:{closed_port()}"
    marker = tmp_path / "ran"
    admin.database(dbname).save({"_id": "p", "type": 1000, "name": "p",
                                 "code": appender(marker, "ran")})
    # The second URL has no credentials of its own: it inherits the first's.
    node = node_factory(mac_id=1000, url=f"{dead},{plain(couch_url)}")
    wait_file(marker, contains="ran")
    status = wait_for(lambda: (node.status() or {}).get("server") and node.status(),
                      message=lambda: f"no server in the status; log:\n{node.log()[-2000:]}")
    assert status["server"] == plain(couch_url)


def test_laptop_tools_move_on_past_a_dead_server(couch_url: str, dbname: str) -> None:
    install.setup(Fleet(couch_url, dbname))
    dead = closed_port()
    result = subprocess.run(
        [PY, "-m", "uploader", "ls", "--server", f"http://127.0.0.1:{dead},{couch_url}",
         "--database", dbname, "--json"],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_the_dashboard_moves_on_past_a_dead_server(couch_url: str, dbname: str) -> None:
    pytest.importorskip("flask")
    from tests.test_dashboard import login
    from uploader.dashboard import create_app

    admin = Couch(couch_url)
    if admin.auth is None:
        pytest.skip("the session's server has no admin to sign in as")
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)
    fleet.status.save({"_id": "status:1234", "type": "himbeere-status", "node": 1234,
                       "state": "running", "server": "http://n2:5984"})
    app = create_app(f"http://127.0.0.1:{closed_port()},{plain(couch_url)}", dbname,
                     secret_key="x")
    app.config["TESTING"] = True
    try:
        client = app.test_client()
        assert login(client, *admin.auth).status_code == 302
        nodes = client.get("/api/nodes").get_json()["nodes"]
        assert [(n["node"], n["server"]) for n in nodes] == [(1234, "http://n2:5984")]
    finally:
        app.extensions["himbeere"].hub.close()


# -- a real 3-node cluster -----------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CouchCluster]:
    """The session's 3-node CouchDB cluster; stopped by PID at the end."""
    reason = skip_reason()
    found = release()
    if reason is not None or found is None:
        pytest.skip(reason or NO_RELEASE)
    nodes = open_cluster(found, tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def cluster_db(cluster: CouchCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the cluster, set up as ``himbeere-upload setup`` does."""
    name = f"t_cluster_{secrets.token_hex(4)}"
    create_database(cluster.url(2), name)
    install.setup(Fleet(cluster.server_list(2), name))
    yield name
    for index in (2, 3, 1):
        if cluster.up(index):
            for doomed in (name, name + "_status"):
                delete_database(cluster.url(index), doomed)
            break


def test_a_daemon_fails_over_when_its_node_dies_and_runs_nothing_twice(
        cluster: CouchCluster, cluster_db: str, tmp_path: Path) -> None:
    """kill -9 the followed node; a push and a command through another node arrive.

    The daemon logs in as its node user, as in production.
    """
    mac = 10**14 + secrets.randbelow(10**14)
    password = secrets.token_hex(8)
    users.provision(Fleet(cluster.server_list(2), cluster_db), mac, password=password)
    as_node = Couch(cluster.server_list(1)).as_user(str(mac), password).url
    node = Node(as_node, cluster_db, tmp_path / "state", mac)
    via = {i: Couch(cluster.url(i)).database(cluster_db) for i in (1, 2, 3)}
    status_via2 = Couch(cluster.url(2)).database(cluster_db + "_status")
    program, ledger = tmp_path / "program", tmp_path / "ledger"
    node.start()
    try:
        via[1].save({"_id": "p", "type": mac, "name": "p", "code": appender(program, "v1")})
        via[1].save({"_id": "c1", "type": f"{mac}_cmd", "cmd": once(ledger, "c1")})
        wait_file(program, contains="v1", timeout=60)
        assert wait_result(via[1], "c1")["returncode"] == 0
        wait_for(lambda: (node.status() or {}).get("server") == cluster.plain_url(1),
                 message=lambda: f"not on node 1: {node.status()}\n{node.log()[-2000:]}")

        # A command in flight when node 1 dies: its result goes through another.
        via[1].save({"_id": "long", "type": f"{mac}_cmd", "cmd": [
            PY, "-c", f"import time; open({str(ledger)!r}, 'a').write('long\\n'); "
                      "time.sleep(3)"]})
        wait_for(lambda: "long" in lines(ledger), 60, message="the long command never ran")
        cluster.kill(1)
        before = status_via2.get(f"status:{mac}")
        assert before is not None
        doc = via[2].get("p")
        assert doc is not None
        doc["code"] = appender(program, "v2")
        via[2].save(doc)
        via[2].save({"_id": "c2", "type": f"{mac}_cmd", "cmd": once(ledger, "c2")})

        wait_file(program, contains="v2", timeout=60)
        assert wait_result(via[2], "c2", timeout=60)["returncode"] == 0
        assert wait_result(via[3], "long", timeout=60)["returncode"] == 0

        def moved_on() -> Optional[dict[str, Any]]:
            now = status_via2.get(f"status:{mac}") or {}
            later = now.get("heartbeat_time", 0) > before["heartbeat_time"]
            on = now.get("server") in (cluster.plain_url(2), cluster.plain_url(3))
            return now if later and on else None

        status = wait_for(moved_on, timeout=60, message=lambda: (
            f"status: {status_via2.get(f'status:{mac}')}\nlog:\n{node.log()[-3000:]}"))
        assert status["state"] == "running"
        wait_for(lambda: status_via2.get(f"status:{mac}")["heartbeat_time"]
                 > status["heartbeat_time"], message="the heartbeat stopped")
        assert lines(program) == ["v1", "v2"]
        assert lines(ledger) == ["c1", "long", "c2"]
        shown = subprocess.run(
            [PY, "-m", "himbeere", "nodes", "--server", cluster.server_list(1),
             "--database", cluster_db], capture_output=True, text=True, timeout=120,
            cwd=str(ROOT))
        assert shown.returncode == 0, shown.stderr
        [row] = [line for line in shown.stdout.splitlines() if f" {mac} " in line]
        assert row.split()[-2] == status["server"]  # the SERVER column, then VERSION

        # Node 1 comes back and rejoins: the daemon goes on, nothing runs again.
        cluster.restart(1)
        via[1].save({"_id": "c3", "type": f"{mac}_cmd", "cmd": once(ledger, "c3")})
        assert wait_result(via[1], "c3", timeout=60)["returncode"] == 0
        assert via[1].get("c2")["returncode"] == 0  # node 1 caught up on what it missed
        # A graceful restart of the daemon resumes from its seq: no command again.
        assert node.stop() == 0
        node.start()
        wait_file(program, contains="v2\nv2", timeout=60)  # the program starts with it
        via[3].save({"_id": "c4", "type": f"{mac}_cmd", "cmd": once(ledger, "c4")})
        assert wait_result(via[3], "c4", timeout=60)["returncode"] == 0
        assert lines(ledger) == ["c1", "long", "c2", "c3", "c4"]
        assert lines(program) == ["v1", "v2", "v2"]
    finally:
        if not cluster.up(1):
            cluster.restart(1)
        node.stop()
        node.kill_programs()
        delete_user(cluster, mac)


def test_upload_setup_works_against_the_cluster(cluster: CouchCluster) -> None:
    name = f"t_cluster_setup_{secrets.token_hex(4)}"
    command = [PY, "-m", "uploader", "setup", cluster.server_list(1), "--database", name]
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=120,
                               cwd=str(ROOT))
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("set up ")
        second = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                cwd=str(ROOT))
        assert second.returncode == 0, second.stderr
        assert second.stdout.startswith("already set up: nothing changed")
        for index in (1, 2, 3):  # every node sees the same databases and rules
            db = Couch(cluster.url(index)).database(name)
            assert db.get("_design/himbeere") is not None
            assert db.security()["members"]["roles"]
    finally:
        for doomed in (name, name + "_status"):
            delete_database(cluster.url(1), doomed)


def test_node_user_rules_hold_through_every_node(cluster: CouchCluster,
                                                  cluster_db: str) -> None:
    fleet = Fleet(cluster.server_list(1), cluster_db)
    mine, theirs = (10**14 + secrets.randbelow(10**14) for _ in range(2))
    password = secrets.token_hex(8)
    users.provision(fleet, mine, password=password)
    users.provision(fleet, theirs, password=secrets.token_hex(8))
    admin_status = Couch(cluster.url(1)).database(cluster_db + "_status")
    admin_status.save({"_id": f"status:{theirs}", "node": theirs, "state": "running"})
    try:
        for index in (1, 2, 3):
            node = Couch(cluster.url(index)).as_user(str(mine), password)
            status = node.database(cluster_db + "_status")
            code = node.database(cluster_db)
            status.update(f"status:{mine}", lambda doc, i=index: doc.update(via=i))
            with pytest.raises(Unauthorized):
                status.update(f"status:{theirs}", lambda doc: doc.update(state="stopped"))
            with pytest.raises(Unauthorized):
                code.save({"_id": f"{theirs}:evil", "type": theirs, "name": "evil",
                           "code": "def main():\n    pass\n"})
        assert admin_status.get(f"status:{theirs}")["state"] == "running"
        assert admin_status.get(f"status:{mine}")["via"] == 3
    finally:
        for mac in (mine, theirs):
            delete_user(cluster, mac)


def delete_user(cluster: CouchCluster, mac: int) -> None:
    users_db = Couch(cluster.url(1)).database("_users")
    doc = users_db.get(security.user_id(mac))
    if doc:
        users_db.delete(doc)

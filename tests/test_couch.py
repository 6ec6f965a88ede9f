"""himbeere.couch against a real server (pouchdb-server unless
HIMBEERE_TEST_COUCH_URL names a CouchDB), plus a few pure unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from himbeere.couch import Couch, Database, FeedFilter, doc_path, quote
from himbeere.exceptions import Conflict, NotFound, Unauthorized, Unreachable
from tests.servers import SERVER_ENV, Server, ServerError, free_port, selected_kind
from tests.tls import TLSProxy

ROOT = Path(__file__).resolve().parent.parent

# A filter as the daemon installs it.  String() on both sides because
# pouchdb-server JSON-parses query parameters: ?mac=1000 reaches the filter as
# the number 1000, so `doc.mac === req.query.mac` would never match a MAC
# written in decimal (see test_changes_js_filter_compares_query_as_string).
NODE_FILTER = "function(doc, req) { return String(doc.mac) === String(req.query.mac); }"


@pytest.fixture(params=["stdlib", "requests"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every server test runs on both HTTP transports: the daemon's and the laptop's."""
    return str(request.param)


@pytest.fixture
def couch(couch_url: str, transport: str) -> Couch:
    return Couch(couch_url, transport=transport)


# -- pure unit tests ---------------------------------------------------------

def test_url_credentials_are_split_off_and_unquoted() -> None:
    couch = Couch("http://us%40er:p%3Aw%2F@couch.example:5984/")
    assert couch.auth == ("us@er", "p:w/")
    assert couch.base == "http://couch.example:5984"
    assert "p:w" not in repr(couch)


def test_url_path_prefix_is_kept() -> None:
    assert Couch("https://example.org/couchdb/").base == "https://example.org/couchdb"


def test_ipv6_host_keeps_its_brackets() -> None:
    assert Couch("http://admin:pw@[::1]:5984").base == "http://[::1]:5984"


def test_quote_and_doc_path() -> None:
    assert quote("nedm/raspberries") == "nedm%2Fraspberries"
    assert doc_path("a/b") == "a%2Fb"
    assert doc_path("_design/himbeere") == "_design/himbeere"
    assert doc_path("_local/a/b") == "_local/a%2Fb"


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ({"couchdb": "Welcome", "version": "3.3.3", "vendor": {"name": "The Apache Software "
                                                                      "Foundation"}}, True),
        ({"couchdb": "Welcome", "version": "2.3.1"}, True),
        ({"couchdb": "Welcome", "version": "1.6.1"}, False),
        ({"express-pouchdb": "Welcome!", "version": "4.2.0"}, False),
        ({"couchdb": "Welcome", "express-pouchdb": "Welcome!", "version": "4.2.0"}, False),
        ({"couchdb": "Welcome", "version": "garbage"}, False),
    ],
)
def test_supports_selector_decides_from_the_root_document(
    root: dict[str, Any], expected: bool
) -> None:
    couch = Couch("http://127.0.0.1:1")
    couch._info = root  # no request: the answer is cached
    assert couch.supports_selector() is expected


# -- the server --------------------------------------------------------------

def test_supports_selector_only_on_couchdb(couch: Couch, server_kind: str) -> None:
    """Regression: asking pouchdb-server for filter=_selector kills it."""
    if server_kind == "pouchdb":
        assert "express-pouchdb" in couch.info()
        assert couch.supports_selector() is False
    else:
        assert couch.info()["couchdb"] == "Welcome"
        assert couch.supports_selector() is True


def test_session_is_the_admin(couch: Couch) -> None:
    assert "_admin" in couch.session_info()["userCtx"]["roles"]


def test_wrong_password_is_unauthorized(couch: Couch, dbname: str, transport: str) -> None:
    wrong = Couch(f"http://admin:wrong@{couch.base.split('://', 1)[1]}", transport=transport)
    with pytest.raises(Unauthorized):
        wrong.database(dbname).get("anything")


def test_nothing_listening_is_unreachable(transport: str) -> None:
    with pytest.raises(Unreachable):
        Couch(f"http://127.0.0.1:{free_port()}", transport=transport).info()


def test_create_database_twice_and_missing_database(couch: Couch, dbname: str) -> None:
    assert couch.create_database(dbname) is False
    assert couch.database(dbname).exists()
    missing = couch.database(dbname + "_missing")
    assert not missing.exists()
    with pytest.raises(NotFound):
        missing.info()
    couch.delete_database(dbname + "_missing")  # deleting nothing is fine


# -- documents ---------------------------------------------------------------

def test_save_and_get(couch: Couch, dbname: str) -> None:
    """Regression: without Content-Type pouchdb-server stores an empty doc."""
    db = couch.database(dbname)
    doc = db.save({"_id": "node-1", "mac": "b8:27:eb:00:00:01", "n": [1, 2]})
    assert doc["_rev"].startswith("1-")
    got = db.get("node-1")
    assert got is not None
    assert got["mac"] == "b8:27:eb:00:00:01"
    assert got["n"] == [1, 2]

    posted = db.save({"kind": "no id"})
    assert posted["_id"]
    assert db.get(posted["_id"]) == posted

    assert db.get("no-such-doc") is None


def test_save_with_stale_rev_conflicts(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    first = db.save({"_id": "doc", "v": 1})
    stale = dict(first)
    db.save(dict(first, v=2))
    with pytest.raises(Conflict):
        db.save(dict(stale, v=3))
    got = db.get("doc")
    assert got is not None and got["v"] == 2


def test_delete(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    doc = db.save({"_id": "doomed"})
    db.delete(doc)
    assert db.get("doomed") is None


def test_ids_with_slashes_and_design_documents(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    db.save({"_id": "a/b", "v": 1})
    db.save({"_id": "_design/himbeere", "filters": {"node": NODE_FILTER}})
    got = db.get("a/b")
    assert got is not None and got["v"] == 1
    design = db.get("_design/himbeere")
    assert design is not None and design["filters"]["node"] == NODE_FILTER


def test_update_creates_then_changes(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)

    def count(doc: dict[str, Any]) -> None:
        doc["count"] = doc.get("count", 0) + 1

    db.update("counter", count)
    saved = db.update("counter", count)
    assert saved is not None and saved["count"] == 2
    got = db.get("counter")
    assert got is not None and got["count"] == 2


def test_update_leaves_doc_alone_when_change_returns_false(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    assert db.update("never", lambda doc: False) is None
    assert db.get("never") is None


def test_update_rereads_and_reapplies_on_conflict(couch: Couch, dbname: str) -> None:
    """A write that lands between update's read and its save must survive."""
    db = couch.database(dbname)
    db.save({"_id": "status", "from_daemon": 0})
    calls = []

    def change(doc: dict[str, Any]) -> None:
        calls.append(dict(doc))
        if len(calls) == 1:
            # Someone else writes after our read: our save gets a 409.
            other = db.get("status")
            assert other is not None
            db.save(dict(other, from_other=True))
        doc["from_daemon"] += 1

    saved = db.update("status", change)
    assert len(calls) == 2, "update did not retry after the conflict"
    assert "from_other" in calls[1], "the retry did not re-read the document"
    assert saved is not None
    got = db.get("status")
    assert got is not None
    assert got["from_other"] is True
    assert got["from_daemon"] == 1


def test_update_from_many_threads_loses_no_write(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)

    def bump(doc: dict[str, Any]) -> None:
        doc["n"] = doc.get("n", 0) + 1

    def worker() -> None:
        for _ in range(5):
            db.update("shared", bump, retries=200)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    got = db.get("shared")
    assert got is not None and got["n"] == 20


# -- database names with a slash ---------------------------------------------

def test_database_name_with_slash(couch: Couch, dbname_factory: Callable[..., str]) -> None:
    """Deployments use names like ``nedm/raspberries``; the slash goes as %2F.

    (pouchdb-server drops the slash from the stored name, so ``all_dbs`` and
    ``info()["db_name"]`` differ from ours there; CouchDB keeps it.)
    """
    name = dbname_factory("/raspberries")
    db = couch.database(name)
    assert db.exists()
    db.save({"_id": "node", "mac": "1000"})
    got = db.get("node")
    assert got is not None and got["mac"] == "1000"
    assert db.changes()["results"][0]["id"] == "node"

    handle = db.client_handle()  # what programs get as `db`
    assert handle["node"]["mac"] == "1000"
    handle.save({"_id": "from-program", "ok": True})
    assert db.get("from-program") == dict(handle["from-program"])


# -- _changes ----------------------------------------------------------------

def _two_nodes(db: Database) -> None:
    db.save({"_id": "_design/himbeere", "filters": {"node": NODE_FILTER}})
    db.save({"_id": "decimal", "mac": "1000"})
    db.save({"_id": "hex", "mac": "b8:27:eb:00:00:01"})
    db.save({"_id": "other", "mac": "b8:27:eb:00:00:02"})


def node_filter(mac: str) -> FeedFilter:
    return FeedFilter({"filter": "himbeere/node", "mac": mac})


def test_changes_normal_feed(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    db.save({"_id": "one"})
    first = db.changes()
    assert [change["id"] for change in first["results"]] == ["one"]
    db.save({"_id": "two"})
    later = db.changes(since=first["last_seq"], include_docs=True)
    assert [change["id"] for change in later["results"]] == ["two"]
    assert later["results"][0]["doc"]["_id"] == "two"


@pytest.mark.parametrize(("mac", "ids"), [("b8:27:eb:00:00:01", ["hex"]), ("1000", ["decimal"])])
def test_changes_js_filter_compares_query_as_string(
    couch: Couch, dbname: str, mac: str, ids: list[str]
) -> None:
    db = couch.database(dbname)
    _two_nodes(db)
    answer = db.changes(feed_filter=node_filter(mac), include_docs=True)
    assert [change["id"] for change in answer["results"]] == ids


def test_follow_yields_a_change_written_after_the_feed_started(
    couch: Couch, dbname: str
) -> None:
    db = couch.database(dbname)
    db.save({"_id": "before"})
    feed = db.follow(since=0, timeout=5)
    try:
        # Once "before" has arrived, the feed is certainly streaming.
        assert next(feed)["id"] == "before"
        db.save({"_id": "after", "v": 7})
        change = next(feed)
        assert change["id"] == "after"
        assert change["doc"]["v"] == 7
    finally:
        feed.close()


def test_follow_with_js_filter(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    _two_nodes(db)
    feed = db.follow(since=0, feed_filter=node_filter("1000"), timeout=5)
    try:
        assert next(feed)["id"] == "decimal"
        db.save({"_id": "ignored", "mac": "b8:27:eb:00:00:02"})
        db.save({"_id": "mine", "mac": "1000"})
        assert next(feed)["id"] == "mine"
    finally:
        feed.close()


def test_follow_returns_on_stop_at_the_next_heartbeat(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    db.save({"_id": "one"})
    stop = threading.Event()
    feed = db.follow(since=0, timeout=1, stop=stop)
    assert next(feed)["id"] == "one"
    stop.set()
    assert list(feed) == []


# -- a server that goes away -------------------------------------------------

def test_follow_a_stopped_server_is_unreachable(
    restartable_server: Server, transport: str
) -> None:
    db = Couch(restartable_server.url, transport=transport).database("gone")
    restartable_server.stop()
    with pytest.raises(Unreachable):
        next(db.follow(since=0, timeout=1))


def following(server: Server, transport: str, timeout: float) -> Iterator[dict[str, Any]]:
    """A feed of a new database on ``server`` that has delivered its first change."""
    couch = Couch(server.url, transport=transport)
    couch.create_database("feed")
    db = couch.database("feed")
    db.save({"_id": "one"})
    feed = db.follow(since=0, timeout=timeout)
    assert next(feed)["id"] == "one"
    return feed


def test_follow_raises_unreachable_when_the_server_stops_mid_feed(
    restartable_server: Server, transport: str
) -> None:
    feed = following(restartable_server, transport, timeout=2)
    restartable_server.stop()
    with pytest.raises(Unreachable):
        next(feed)


def test_follow_raises_unreachable_when_the_server_falls_silent(
    restartable_server: Server, transport: str
) -> None:
    """A frozen server (SIGSTOP) sends no heartbeat: dead after ``timeout``."""
    feed = following(restartable_server, transport, timeout=1)
    restartable_server.pause()
    try:
        with pytest.raises(Unreachable):
            next(feed)
    finally:
        restartable_server.resume()


def test_a_frozen_server_is_unreachable_after_the_timeout(
    restartable_server: Server, transport: str
) -> None:
    couch = Couch(restartable_server.url, timeout=1, transport=transport)
    assert couch.info(refresh=True)
    restartable_server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        with pytest.raises(Unreachable, match="(?i)did not answer within 1 s|timed out"):
            couch.info(refresh=True)
    finally:
        restartable_server.resume()
    assert couch.info(refresh=True)  # and back once it answers again


def test_restart_keeps_data_admin_and_port(
    restartable_server: Server, transport: str
) -> None:
    couch = Couch(restartable_server.url, transport=transport)
    couch.create_database("kept")
    couch.database("kept").save({"_id": "doc", "v": 1})
    url = restartable_server.url

    restartable_server.stop()
    with pytest.raises(Unreachable):
        couch.info(refresh=True)
    restartable_server.start()

    assert restartable_server.url == url
    assert "_admin" in couch.session_info()["userCtx"]["roles"]
    got = couch.database("kept").get("doc")
    assert got is not None and got["v"] == 1
    # Admin party stays over after the restart.
    anonymous = requests.get(f"{restartable_server.plain_url}/_session", timeout=10).json()
    assert "_admin" not in anonymous["userCtx"]["roles"]


def test_kill_9_then_start_keeps_what_the_server_acknowledged(
    restartable_server: Server, server_kind: str
) -> None:
    """The fault fixtures: ``kill()`` is a power cut, ``start()`` the same server again."""
    assert restartable_server.kind == server_kind
    couch = Couch(restartable_server.url)
    couch.create_database("durable")
    couch.database("durable").save({"_id": "doc", "v": 1})
    pid = restartable_server.pid
    restartable_server.kill()
    assert not restartable_server.running and restartable_server.pid is None
    with pytest.raises(Unreachable):
        couch.info(refresh=True)
    restartable_server.start()
    assert restartable_server.pid not in (None, pid)
    got = couch.database("durable").get("doc")
    assert got is not None and got["v"] == 1


def test_an_unknown_test_server_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_ENV, "mongodb")
    with pytest.raises(ServerError, match="HIMBEERE_TEST_SERVER='mongodb': must be one of "
                                          "pouchdb, couchdb"):
        selected_kind()
    monkeypatch.setenv(SERVER_ENV, "")
    assert selected_kind() == "pouchdb"


def test_a_keep_alive_connection_the_server_closed_is_not_reused(
    restartable_server: Server, transport: str
) -> None:
    """Regression: a request on an idle connection that the server had
    closed (a restart, or its keep-alive timeout) failed as Unreachable."""
    couch = Couch(restartable_server.url, transport=transport)
    assert couch.info(refresh=True)  # leaves a keep-alive connection open
    restartable_server.stop()
    restartable_server.start()
    assert "_admin" in couch.session_info()["userCtx"]["roles"]


# -- TLS ---------------------------------------------------------------------

def test_https_with_a_trusted_certificate(
    tls_proxy: TLSProxy, couch_url: str, dbname: str, transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_proxy.cert_file))  # http.client
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_proxy.cert_file))  # requests
    couch = Couch(tls_proxy.url(couch_url), transport=transport)
    assert couch.base.startswith("https://")
    assert "_admin" in couch.session_info()["userCtx"]["roles"]
    db = couch.database(dbname)
    db.save({"_id": "over-tls", "n": 1})
    assert next(db.follow(since=0, timeout=2))["id"] == "over-tls"


def test_https_refuses_an_unknown_certificate(
    tls_proxy: TLSProxy, couch_url: str, transport: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with pytest.raises(Unreachable, match="(?i)certificate"):
        Couch(tls_proxy.url(couch_url), transport=transport).info()


def test_a_daemon_that_skipped_openssl_still_speaks_https(
    tls_proxy: TLSProxy, couch_url: str,
) -> None:
    """The daemon imports http.client without ssl for an http:// server; a
    reload may bring an https:// one, which must still work."""
    script = (
        "import sys\n"
        "from himbeere.couch import transport\n"
        "transport.load_http_client(tls=False)\n"
        "print('ssl' in sys.modules, hasattr(sys.modules['http.client'], 'HTTPSConnection'))\n"
        "from himbeere.couch import Couch\n"
        f"print(Couch({tls_proxy.url(couch_url)!r}).info()['version'])\n"
    )
    env = dict(os.environ, SSL_CERT_FILE=str(tls_proxy.cert_file), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    skipped, version = done.stdout.splitlines()
    assert skipped == "False False"  # no OpenSSL loaded by the import...
    assert version  # ...and TLS anyway once an https:// server came up

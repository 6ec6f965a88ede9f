"""Fixtures for tests against a real CouchDB-compatible server.

By default each test session (each xdist worker) starts its own in-memory
pouchdb-server on a free loopback port (see tests/servers.py);
``HIMBEERE_TEST_SERVER=couchdb`` starts Apache CouchDB 3.5.2 instead.  Set
``HIMBEERE_TEST_COUCH_URL`` to the admin URL of a running server
(``http://admin:secret@127.0.0.1:5984``) to test against that; tests that
restart the server are skipped then.  Where the servers differ, a test asks
``server_kind`` and asserts what the server it runs on does.
"""

from __future__ import annotations

import os
import re
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests

from himbeere import defaults
from himbeere.commands import Commands
from himbeere.couch import Couch, Database, security
from tests.helpers import AS_NODE_ENV, USER_PASSWORD, random_mac
from tests.nodes import Node
from tests.servers import (
    Server,
    ServerError,
    create_database,
    delete_database,
    ensure_couchdb,
    make_server,
    selected_kind,
)
from tests.tls import TLSProxy
from uploader import cli, install, users
from uploader.fleet import Fleet

COUCH_URL_ENV = "HIMBEERE_TEST_COUCH_URL"


def pytest_configure(config: pytest.Config) -> None:
    """An unknown ``HIMBEERE_TEST_SERVER``, or no CouchDB release for ``couchdb``, is
    one clear error before any test runs."""
    try:
        if selected_kind() == "couchdb" and not os.environ.get(COUCH_URL_ENV):
            ensure_couchdb()  # once, before xdist starts its workers
    except ServerError as error:
        raise pytest.UsageError(str(error)) from None
    if os.environ.get(COUCH_URL_ENV) and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(f"{COUCH_URL_ENV} with -n: xdist workers would share one "
                                "server's node users; run without -n")


@pytest.fixture(scope="session")
def session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Optional[Server]]:
    """The session's own server (``HIMBEERE_TEST_SERVER``), or None with an external one."""
    if os.environ.get(COUCH_URL_ENV):
        yield None
        return
    kind = selected_kind()
    server = make_server(kind, tmp_path_factory.mktemp(kind), in_memory=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def couch_url(session_server: Optional[Server]) -> str:
    """Admin URL of the session's server (credentials included, no slash at the end)."""
    if session_server is None:
        return os.environ[COUCH_URL_ENV].rstrip("/")
    return session_server.url


@pytest.fixture(scope="session")
def server_kind(couch_url: str) -> str:
    """``pouchdb`` or ``couchdb``: what the session's server is (asked, for an external one).

    Where the two differ, a test asserts what this one does, so it never
    quietly passes on either.
    """
    return "pouchdb" if "express-pouchdb" in Couch(couch_url).info() else "couchdb"


@pytest.fixture
def couch(couch_url: str) -> Couch:
    return Couch(couch_url)


@pytest.fixture
def tls_proxy(couch_url: str, tmp_path: Path) -> Iterator[TLSProxy]:
    """The session's server behind TLS: ``tls_proxy.url(couch_url)`` is https."""
    parts = urllib.parse.urlsplit(couch_url)
    proxy = TLSProxy((parts.hostname or "127.0.0.1", parts.port or 5984), tmp_path)
    try:
        yield proxy
    finally:
        proxy.close()


DbnameFactory = Callable[..., str]


@pytest.fixture
def dbname_factory(
    request: pytest.FixtureRequest, couch_url: str, session_server: Optional[Server]
) -> Iterator[DbnameFactory]:
    """Make fresh databases: ``dbname_factory(suffix="")`` returns a new name.

    Each name is ``t_<test name>_<random hex><suffix>``, created at once and
    deleted after the test together with its ``_status`` companion.  A suffix
    like ``"/raspberries"`` gives the slash names of real deployments.
    """
    test = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")[:40]
    made: list[str] = []

    def make(suffix: str = "") -> str:
        name = f"t_{test}_{secrets.token_hex(4)}{suffix}"
        create_database(couch_url, name)
        made.append(name)
        return name

    yield make

    for name in made:
        try:
            for doomed in (name, name + defaults.STATUS_SUFFIX):
                delete_database(couch_url, doomed)
        except requests.ConnectionError:
            if session_server is not None and not session_server.running:
                pytest.fail(f"the {session_server.kind} server died during this test; its "
                            f"output:\n{session_server.log()}")
            raise


@pytest.fixture
def dbname(dbname_factory: DbnameFactory) -> str:
    """A fresh, empty database for this test (deleted afterwards)."""
    return dbname_factory()


@pytest.fixture
def restartable_server(tmp_path: Path) -> Iterator[Server]:
    """A server of this test's own (``HIMBEERE_TEST_SERVER``), on disk, to restart.

    ``.url`` (admin), ``.stop()``, ``.kill()`` (-9), ``.start()`` (same port
    and data), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT), ``.log()``.
    """
    if os.environ.get(COUCH_URL_ENV):
        pytest.skip(f"needs a server of its own to restart; {COUCH_URL_ENV} is set")
    kind = selected_kind()
    server = make_server(kind, tmp_path / kind)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def node_factory(couch_url: str, dbname: str, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start node daemons: ``node_factory(mac_id=1000, database=None, flags=[])``.

    Nodes use the test's database unless told otherwise; all are stopped at
    the end, and programs of daemons killed with -9 are killed too.
    """
    nodes: list[Node] = []
    as_node = AS_NODE_ENV in os.environ
    prepared: set[str] = set()
    provisioned: set[int] = set()

    def node_url(mac_id: int, database: str) -> str:
        """The URL of node user ``mac_id`` on a database set up as in production."""
        fleet = Fleet(couch_url, database)
        if database not in prepared:
            install.setup(fleet)
            prepared.add(database)
        password = secrets.token_hex(8)
        users.provision(fleet, mac_id, password=password)
        provisioned.add(mac_id)
        return Couch(couch_url).as_user(str(mac_id), password).url

    def make(mac_id: int = 1000, database: Optional[str] = None,
             flags: Optional[list[str]] = None, url: Optional[str] = None,
             start: bool = True, state_dir: Optional[Path] = None,
             env: Optional[dict[str, str]] = None) -> Node:
        database = database or dbname
        if url is None and as_node:
            url = node_url(mac_id, database)
        node = Node(url or couch_url, database,
                    state_dir or tmp_path / f"state-{mac_id}-{len(nodes)}", mac_id, flags, env)
        nodes.append(node)
        return node.start() if start else node

    yield make

    for node in nodes:
        try:
            if node.alive():
                node.stop()
        finally:
            node.kill_programs()
    users_db = Couch(couch_url).database("_users")
    for mac in provisioned:
        doc = users_db.get(security.user_id(mac))
        if doc:
            users_db.delete(doc)


@pytest.fixture
def code_db(couch: Couch, dbname: str) -> Database:
    """The test's code database (created by ``dbname``)."""
    return couch.database(dbname)


NodeUserFactory = Callable[[], tuple[int, str]]


@pytest.fixture
def node_user(couch: Couch, couch_url: str, dbname: str) -> Iterator[NodeUserFactory]:
    """``node_user()``: a new node user on the test's databases: (MAC id, its URL).

    The databases are set up as ``himbeere-upload setup`` does (design
    documents, write rules, ``_security``), so a daemon started with the URL
    runs with a real node's rights.  Users are server-wide: each gets a
    random MAC id, and all are deleted after the test.
    """
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)
    made: list[int] = []

    def make() -> tuple[int, str]:
        mac = random_mac()
        password = secrets.token_hex(8)
        made.append(mac)
        users.provision(fleet, mac, password=password)
        return mac, couch.as_user(str(mac), password).url

    yield make
    delete_users(couch, made)


# -- the fleet as the laptop tools see it, and real CouchDB users ---------------

#: ``make_user(roles, name=None, password=None)`` -> ``(name, password)``
UserFactory = Callable[..., "tuple[str, str]"]


@pytest.fixture
def fleet(couch_url: str, dbname: str) -> Fleet:
    """The test's databases, set up as ``himbeere-upload setup`` does (as the admin)."""
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)
    return fleet


#: ``upload(*argv)`` -> ``(exit code, stdout, stderr)`` of ``himbeere-upload``.
Upload = Callable[..., "tuple[int, str, str]"]


@pytest.fixture
def upload(couch_url: str, dbname: str, capsys: pytest.CaptureFixture[str]) -> Upload:
    """``upload(*argv)``: ``himbeere-upload ARGV`` in-process: exit code, stdout, stderr."""
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv), environ={"HIMBEERE_SERVER": couch_url,
                                             "HIMBEERE_DATABASE": dbname})
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def cli_env(couch_url: str, dbname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``himbeere`` subcommands find the test's server and databases."""
    monkeypatch.setenv("HIMBEERE_SERVER", couch_url)
    monkeypatch.setenv("HIMBEERE_DATABASE", dbname)
    monkeypatch.delenv("HIMBEERE_STATUS_DATABASE", raising=False)


def delete_users(couch: Couch, macs: list[int]) -> None:
    """Remove the ``_users`` documents of ``macs`` (provisioned by a test)."""
    users_db = couch.database("_users")
    for mac in macs:
        doc = users_db.get(security.user_id(mac))
        if doc:
            users_db.delete(doc)


@pytest.fixture
def make_user(couch: Couch) -> Iterator[UserFactory]:
    """``make_user(roles, name=None, password=None)``: a real CouchDB user, deleted after the test.

    Returns ``(name, password)``; an existing user of that name is replaced.
    """
    users_db = couch.database("_users")
    made: list[str] = []

    def make(roles: list[str], name: Optional[str] = None,
             password: Optional[str] = None) -> tuple[str, str]:
        name = name or f"user-{secrets.token_hex(4)}"
        password = password or USER_PASSWORD
        doc_id = security.USER_PREFIX + name
        doc = {"_id": doc_id, "name": name, "type": "user", "roles": roles,
               "password": password}
        old = users_db.get(doc_id)
        if old:
            doc["_rev"] = old["_rev"]
        users_db.save(doc)
        made.append(doc_id)
        return name, password

    yield make
    for doc_id in made:
        doc = users_db.get(doc_id)
        if doc:
            users_db.delete(doc)


@pytest.fixture
def deployer(make_user: UserFactory) -> tuple[str, str]:
    """A user with the deployer role: ``(name, password)``."""
    return make_user([security.DEPLOYER_ROLE], f"deployer-{secrets.token_hex(4)}")


@pytest.fixture
def provisioned(couch: Couch) -> Iterator[list[int]]:
    """Append the MAC ids a test provisions; their users are deleted afterwards."""
    macs: list[int] = []
    yield macs
    delete_users(couch, macs)


@pytest.fixture
def commands_factory(code_db: Database, tmp_path: Path) -> Iterator[Callable[..., Commands]]:
    """``commands_factory(db=None, **options)``: the command runner in-process, as node 1000."""
    made: list[Commands] = []

    def make(db: Optional[Database] = None, **options: Any) -> Commands:
        made.append(Commands(db or code_db, 1000, tmp_path / "state", **options))
        return made[-1]

    yield make
    for commands in made:
        commands.stop(0)

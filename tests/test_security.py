"""Who may do what, enforced by the server itself, with real users.

Every rule of himbeere/couch/security.py is tried over plain HTTP as the user it
is about: anonymous, a signed-up user without roles, node users, a deployer
and the admin.  Refusals are asserted by status code: 401 for anonymous
requests, 403 where a ``validate_doc_update`` rule refuses.  Where the two
servers differ by design (a member writing a design document, a
non-member reading), either 401 or 403 is accepted: both refuse.

The same tests run on pouchdb-server 4.2.0 (default) and on Apache CouchDB 3
(``HIMBEERE_TEST_COUCH_URL``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests

from himbeere.commands import Commands
from himbeere.couch import Couch, design, doc_path, quote, security
from himbeere.schema import history_id
from himbeere.status import status_id
from tests.helpers import random_mac, wait_for
from tests.nodes import wait_file
from uploader import push, users
from uploader.fleet import Fleet

REFUSED = (401, 403)


class Client:
    """Plain HTTP as one user (None: anonymous), to see exact status codes."""

    def __init__(self, base: str, user: Optional[str] = None,
                 password: Optional[str] = None) -> None:
        self.base = base
        self.auth = (user, password or "") if user else None

    def request(self, method: str, db: str, doc_id: Optional[str] = None,
                body: Any = None, **params: Any) -> requests.Response:
        url = f"{self.base}/{quote(db)}"
        if doc_id is not None:
            url += f"/{doc_path(doc_id)}"
        return requests.request(method, url, json=body, params=params or None,
                                auth=self.auth, timeout=30)

    def get(self, db: str, doc_id: Optional[str] = None, **params: Any) -> int:
        return self.request("GET", db, doc_id, **params).status_code

    def view(self, db: str, name: str) -> int:
        url = f"{self.base}/{quote(db)}/{design.DESIGN_ID}/_view/{name}"
        return requests.get(url, auth=self.auth, timeout=30).status_code

    def put(self, db: str, doc: dict[str, Any]) -> int:
        response = self.request("PUT", db, doc["_id"], doc)
        if response.status_code in (200, 201):
            doc["_rev"] = response.json()["rev"]
        return response.status_code

    def delete(self, db: str, doc: dict[str, Any]) -> int:
        return self.request("DELETE", db, doc["_id"], rev=doc["_rev"]).status_code


UserFactory = Callable[..., Client]


@pytest.fixture
def node(fleet: Fleet, make_client: UserFactory) -> tuple[int, Client]:
    mac = random_mac()
    return mac, make_client(str(mac), [security.NODE_ROLE])


@pytest.fixture
def other_node(fleet: Fleet, make_client: UserFactory) -> tuple[int, Client]:
    mac = random_mac()
    return mac, make_client(str(mac), [security.NODE_ROLE])


@pytest.fixture
def make_client(couch: Couch, make_user: Callable[..., tuple[str, str]]) -> UserFactory:
    """``make_client(name, roles, password=None)``: a new real user, as a :class:`Client`."""
    def make(name: str, roles: list[str], password: Optional[str] = None) -> Client:
        return Client(couch.base, *make_user(roles, name, password or secrets.token_hex(8)))
    return make


@pytest.fixture
def deployer(make_client: UserFactory) -> Client:
    return make_client(f"deployer-{secrets.token_hex(4)}", [security.DEPLOYER_ROLE])


@pytest.fixture
def admin(couch: Couch) -> Client:
    assert couch.auth is not None
    return Client(couch.base, *couch.auth)


def code_doc(mac: int, name: str = "blink") -> dict[str, Any]:
    return {"_id": f"{mac}:{name}", "type": mac, "name": name,
            "code": "def main():\n    log('hi')\n"}


def command_doc(mac: int) -> dict[str, Any]:
    return {"_id": f"cmd-{mac}-{secrets.token_hex(4)}", "type": f"{mac}_cmd",
            "cmd": ["echo", "hi"], "timeout": 30}


# -- anonymous and strangers ---------------------------------------------------------

def test_anonymous_gets_401_on_both_databases(fleet: Fleet, admin: Client) -> None:
    doc = code_doc(random_mac())
    assert admin.put(fleet.code.name, doc) == 201
    anonymous = Client(fleet.server)
    for db in (fleet.code.name, fleet.status.name):
        assert anonymous.get(db) == 401
        assert anonymous.get(db, "_all_docs") == 401
        assert anonymous.get(db, "_changes") == 401
        assert anonymous.put(db, {"_id": "anonymous-was-here"}) == 401
    assert anonymous.get(fleet.code.name, doc["_id"]) == 401
    assert anonymous.delete(fleet.code.name, doc) == 401


def test_signed_up_user_without_a_role_is_refused(fleet: Fleet, make_client: UserFactory) -> None:
    stranger = make_client(f"stranger-{secrets.token_hex(4)}", [])
    for db in (fleet.code.name, fleet.status.name):
        assert stranger.get(db) in REFUSED
        assert stranger.put(db, {"_id": "stranger-was-here"}) in REFUSED


# -- a node in the code database -----------------------------------------------------------

def test_node_reads_the_code_database(fleet: Fleet, admin: Client,
                                      node: tuple[int, Client]) -> None:
    mac, client = node
    doc = code_doc(mac)
    assert admin.put(fleet.code.name, doc) == 201
    assert client.get(fleet.code.name) == 200
    assert client.get(fleet.code.name, doc["_id"]) == 200
    assert client.view(fleet.code.name, "programs") == 200
    # The feed, filtered as the daemon filters it, with the node's own credentials.
    assert client.auth is not None
    as_node = fleet.couch.as_user(*client.auth)
    feed_filter = design.node_filter(as_node, mac)
    changes = as_node.database(fleet.code.name).changes(0, feed_filter)
    assert doc["_id"] in [change["id"] for change in changes["results"]]


def test_node_may_not_create_change_or_delete_code(fleet: Fleet, admin: Client,
                                                   node: tuple[int, Client]) -> None:
    mac, client = node
    db = fleet.code.name
    assert client.put(db, code_doc(mac, "own")) == 403
    assert client.put(db, {"_id": "g", "global_modules": {"shared": "X = 1\n"}}) == 403
    existing = code_doc(mac)
    assert admin.put(db, existing) == 201
    changed = dict(existing, code="def main():\n    pass\n")
    assert client.put(db, changed) == 403
    assert client.delete(db, existing) == 403
    assert client.put(db, {"_id": "_design/evil", "validate_doc_update":
                           "function () {}"}) in REFUSED
    design_doc = fleet.code.get(design.DESIGN_ID)
    assert design_doc is not None
    assert client.put(db, dict(design_doc, validate_doc_update="function () {}")) in REFUSED
    assert fleet.code.get(existing["_id"])["code"] == existing["code"]  # type: ignore[index]


def test_node_may_not_create_commands_even_its_own(fleet: Fleet, node: tuple[int, Client],
                                                   other_node: tuple[int, Client]) -> None:
    mac, client = node
    other_mac, _ = other_node
    assert client.put(fleet.code.name, command_doc(mac)) == 403
    assert client.put(fleet.code.name, command_doc(other_mac)) == 403


def test_node_adds_the_results_the_daemon_writes_to_its_own_command(
        fleet: Fleet, admin: Client, node: tuple[int, Client], tmp_path: Path) -> None:
    mac, client = node
    command = command_doc(mac)
    assert admin.put(fleet.code.name, command) == 201
    assert client.auth is not None
    as_node = fleet.couch.as_user(*client.auth).database(fleet.code.name)
    runner = Commands(as_node, mac, tmp_path)
    try:
        result = runner.execute(["echo", "hi"], 5)
    finally:
        runner.stop()
    saved = as_node.update(command["_id"], lambda doc: doc.update(result))
    assert saved is not None
    doc = fleet.code.get(command["_id"])
    assert doc is not None and doc["ret"] == ["hi\n", ""] and doc["cmd"] == ["echo", "hi"]


@pytest.mark.parametrize("edit", [
    pytest.param(lambda doc: doc.update(cmd=["rm", "-rf", "/"]), id="change-cmd"),
    pytest.param(lambda doc: doc.update(type="1_cmd"), id="change-type"),
    pytest.param(lambda doc: doc.update(extra="field"), id="add-other-field"),
    pytest.param(lambda doc: doc.pop("timeout"), id="remove-field"),
    pytest.param(lambda doc: doc.update(state="done", node=1), id="claim-another-node"),
])
def test_node_may_only_add_result_fields_to_its_command(
        fleet: Fleet, admin: Client, node: tuple[int, Client],
        edit: Callable[[dict[str, Any]], Any]) -> None:
    mac, client = node
    command = command_doc(mac)
    assert admin.put(fleet.code.name, command) == 201
    changed = dict(command, ret=["", ""], state="done")
    edit(changed)
    assert client.put(fleet.code.name, changed) == 403
    assert client.delete(fleet.code.name, command) == 403


def test_node_may_not_touch_another_nodes_command(fleet: Fleet, admin: Client,
                                                  node: tuple[int, Client],
                                                  other_node: tuple[int, Client]) -> None:
    _, client = node
    other_mac, _ = other_node
    command = command_doc(other_mac)
    assert admin.put(fleet.code.name, command) == 201
    assert client.put(fleet.code.name, dict(command, ret=["x", ""], state="done")) == 403
    assert client.delete(fleet.code.name, command) == 403


def test_node_that_gives_itself_the_deployer_role_still_cannot_push(
        fleet: Fleet, couch: Couch, node: tuple[int, Client], server_kind: str) -> None:
    """pouchdb-server 4.2.0 lets a user edit the roles of its own _users document
    (CouchDB answers 403); the rules treat a MAC-id name as a node whatever its roles."""
    mac, client = node
    response = client.request("GET", "_users", security.user_id(mac))
    if server_kind == "couchdb":
        # _users is admin-only there (CouchDB 3's default _security): not even readable.
        assert response.status_code == 403
        me = couch.database("_users").get(security.user_id(mac))
        assert me is not None
    else:
        assert response.status_code == 200
        me = response.json()
    me["roles"] = [security.DEPLOYER_ROLE]
    escalated = client.put("_users", me)
    assert escalated == (403 if server_kind == "couchdb" else 201)
    if escalated == 201:
        session = couch.as_user(*client.auth).session_info()  # type: ignore[misc]
        assert security.DEPLOYER_ROLE in session["userCtx"]["roles"]
    assert client.put(fleet.code.name, code_doc(mac, "sneaky")) == 403
    assert client.put(fleet.code.name, command_doc(mac)) == 403
    assert client.put(fleet.status.name, {"_id": "node:1", "name": "x"}) == 403


# -- deployer and admin ------------------------------------------------------------------

def test_deployer_pushes_code_and_creates_commands(fleet: Fleet, deployer: Client) -> None:
    mac = random_mac()
    db = fleet.code.name
    doc = code_doc(mac)
    assert deployer.put(db, doc) == 201
    changed = dict(doc, code="def main():\n    pass\n")
    assert deployer.put(db, changed) == 201
    assert deployer.delete(db, changed) == 200
    assert deployer.put(db, command_doc(mac)) == 201
    assert deployer.put(db, {"_id": "global:shared", "global_modules": {"s": "X = 1\n"}}) == 201
    assert deployer.put(fleet.status.name, {"_id": f"node:{mac}", "type": "himbeere-node",
                                            "node": mac, "name": "kitchen"}) == 201
    # ...but not the rules: design documents stay with the server admin.
    assert deployer.put(db, {"_id": "_design/mine", "views": {}}) in REFUSED


def test_admin_may_do_everything(fleet: Fleet, admin: Client) -> None:
    mac = random_mac()
    for db in (fleet.code.name, fleet.status.name):
        doc = {"_id": f"anything-{mac}", "type": f"{mac}_cmd", "cmd": ["true"]}
        assert admin.put(db, doc) == 201
        assert admin.delete(db, doc) == 200


# -- a node in the status database -----------------------------------------------------------

def test_node_writes_its_own_status_log_and_result_documents(
        fleet: Fleet, node: tuple[int, Client]) -> None:
    mac, client = node
    db = fleet.status.name
    assert client.get(db) == 200
    status = {"_id": status_id(mac), "type": "himbeere-status", "node": mac, "state": "up"}
    assert client.put(db, status) == 201
    assert client.put(db, dict(status, state="running")) == 201
    for doc_id in (f"status:{mac}:extra", f"log:{mac}:{mac}:blink", f"result:job7:{mac}",
                   history_id(mac)):
        doc = {"_id": doc_id, "node": mac}
        assert client.put(db, doc) == 201, doc_id
        assert client.delete(db, doc) == 200, doc_id


def test_node_may_not_write_other_documents_in_the_status_database(
        fleet: Fleet, admin: Client, node: tuple[int, Client],
        other_node: tuple[int, Client]) -> None:
    mac, client = node
    other, _ = other_node
    db = fleet.status.name
    for doc_id in (status_id(other), f"status:{mac}0", f"log:{other}:x", f"log:{mac}0:x",
                   f"result:x:{other}", f"result:x:{mac}0", f"node:{mac}", "anything",
                   history_id(other), f"history:{mac}0", f"history:{mac}:x"):
        assert client.put(db, {"_id": doc_id}) == 403, doc_id
    assert client.put(db, {"_id": status_id(mac), "node": other}) == 403
    theirs = {"_id": status_id(other), "node": other, "state": "running"}
    assert admin.put(db, theirs) == 201
    assert client.put(db, dict(theirs, state="stopped")) == 403
    assert client.delete(db, theirs) == 403


# -- what pouchdb-server 4.2.0 does (evidence for tests/servers.py) -----------------------------

def test_a_non_admin_creating_a_database_kills_pouchdb_server(restartable_server,
                                                              server_kind: str) -> None:
    """Pins the crash tests/servers.py warns about: it is database *creation*.

    ``PUT /<new db>`` by anyone but a server admin makes express-pouchdb call
    ``db.info`` on the rejected promise of ``PouchDB.new`` (routes/db.js:31):
    an uncaught TypeError ends the process.  Anonymous *document* writes do
    not crash it.  So nothing but a server admin may ever create a database
    on pouchdb-server -- which is why the daemon must not create the status
    database with a node's credentials.  CouchDB refuses with 401 and lives on.
    """
    server = restartable_server
    admin = Client(server.plain_url, server.user, server.password)
    anonymous = Client(server.plain_url)
    assert admin.request("PUT", "open").status_code == 201
    users_db = Couch(server.url).database("_users")
    users_db.save({"_id": security.user_id(1000), "name": "1000", "type": "user",
                   "roles": [security.NODE_ROLE], "password": "pw"})
    node = Client(server.plain_url, "1000", "pw")
    if server_kind == "couchdb":
        # A new database is admin-only there; creating one needs a server admin.
        assert anonymous.put("open", {"_id": "anonymous-write"}) == 401
        assert node.put("open", {"_id": "node-write"}) == 403
        assert node.request("PUT", "open").status_code == 401
        refused = node.request("PUT", "brand-new")
        assert refused.status_code == 401 and "not a server admin" in refused.text
        assert admin.request("GET", "brand-new").status_code == 404
        assert server.running
        return
    assert anonymous.put("open", {"_id": "anonymous-write"}) == 201  # no security: allowed
    assert node.request("PUT", "open").status_code == 412  # exists: answered before the bug
    with pytest.raises(requests.ConnectionError):
        node.request("PUT", "brand-new")
    wait_for(lambda: not server.running, timeout=10, message="pouchdb-server survived")
    assert "db.info is not a function" in server.log()


# -- the rules and the daemon agree ------------------------------------------------------------

def test_result_fields_cover_everything_commands_write(tmp_path: Path) -> None:
    """If commands.py starts writing a new field, security.RESULT_FIELDS must allow it."""
    runner = Commands(None, 1000, tmp_path, output_limit=4)  # type: ignore[arg-type]
    written: set[str] = set()
    try:
        for cmd, timeout in ((["echo", "hello world"], 5.0), (["/no/such/program"], 5.0),
                             (["sh", "-c", "printf '\\377\\376\\375\\374\\373'"], 5.0),
                             (["sleep", "5"], 0.2)):
            written |= set(runner.execute(cmd, timeout))
    finally:
        runner.stop()
    assert {"truncated", "not_utf8", "error"} <= written
    assert written <= set(security.RESULT_FIELDS)


@pytest.mark.slow
def test_daemon_runs_with_node_rights_only(fleet: Fleet, node_factory, tmp_path: Path,
                                           provisioned: list[int]) -> None:
    """The daemon under a node user's credentials: program, command and status work."""
    mac = random_mac()
    provisioned.append(mac)
    password = users.provision(fleet, mac)["password"]
    node_url = fleet.couch.as_user(str(mac), password).url
    marker = tmp_path / "ran.txt"
    program = tmp_path / "hello.py"
    program.write_text("def main():\n"
                       f"    open({str(marker)!r}, 'w').write('ran as ' + str(node))\n")
    pushed = push.push(fleet, program, mac)
    node = node_factory(mac_id=mac, url=node_url)
    try:
        assert wait_file(marker, contains=f"ran as {mac}")
        node.wait_program(pushed["id"], state="finished")
        command = {"_id": f"cmd-{mac}", "type": f"{mac}_cmd", "cmd": ["echo", "hi"]}
        fleet.code.save(command)
        done = wait_for(lambda: (fleet.code.get(command["_id"]) or {}).get("finished")
                        and fleet.code.get(command["_id"]),
                        message=lambda: f"no result; node log:\n{node.log()[-3000:]}")
        assert done["ret"] == ["hi\n", ""] and done["returncode"] == 0
        status = fleet.status.get(status_id(mac))
        assert status is not None and status["node"] == mac
        first = status["_rev"]
        wait_for(lambda: (fleet.status.get(status_id(mac)) or {}).get("_rev") != first,
                 message="the heartbeat never rewrote the status document")
    finally:
        assert node.stop() == 0
    final = fleet.status.get(status_id(mac))
    assert final is not None and final["state"] == "stopped"
    # Stopping closes the history's bucket early: the node wrote history:<mac> itself.
    history = fleet.status.get(history_id(mac))
    assert history is not None and history["node"] == mac and history["samples"]
    log = node.log()
    for refusal in (" 401 ", " 403 ", "Traceback"):
        assert refusal not in log, f"{refusal!r} in the node log:\n{log[-3000:]}"


def test_nodes_share_state_and_leases_but_take_leases_only_as_themselves(
        couch, dbname_factory) -> None:
    """Programs keep state and elect leaders across nodes (issue 5)."""
    from himbeere.exceptions import Unauthorized
    from uploader.cli import main as upload

    name = dbname_factory()
    assert upload(["setup", couch.url, "--database", name]) == 0
    password = "pw-" + name[-8:]
    assert upload(["provision", "5001", "--password", password, "--server", couch.url,
                   "--database", name]) == 0
    node = couch.as_user("5001", password).database(name + "_status")
    node.save({"_id": "state:3:blink", "count": 1})
    node.save({"_id": "lease:scheduler", "holder": "5001", "expires": 1.0})
    node.save({"_id": "lease:group:jobs", "holder": "5001:3:blink", "expires": 1.0})
    with pytest.raises(Unauthorized, match="only in its own name"):
        node.save({"_id": "lease:other", "holder": "5002", "expires": 1.0})
    with pytest.raises(Unauthorized):
        node.save({"_id": "status:5002", "node": 5002})

"""The web dashboard through Flask's test client, against the real test server.

Databases are set up as ``himbeere-upload setup`` does (members only, the
``validate_doc_update`` rules), and users are real CouchDB users, so every
refusal asserted here is CouchDB's own.  Nodes are status documents written
by hand (fast); tests/test_dashboard_browser.py runs real daemons.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import zlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import requests

pytest.importorskip("flask", reason="the dashboard needs Flask (pip install '.[dashboard]')")

from flask import Flask  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from himbeere.couch import Couch, Doc, security  # noqa: E402
from tests.conftest import UserFactory  # noqa: E402
from tests.helpers import USER_PASSWORD as PASSWORD  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from uploader import ops  # noqa: E402
from uploader.dashboard import create_app  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

TRACEBACK = ('Traceback (most recent call last):\n  File "main", line 3, in main\n'
             '    1 / 0\nZeroDivisionError: division by zero\n')

#: A MAC id no port number or random name contains: its absence means something.
SECRET_MAC = 202481596941066

# -- fixtures (the browser tests use them too) -------------------------------------------
@pytest.fixture
def app(couch: Couch, fleet: Fleet) -> Iterator[Flask]:
    """The dashboard for the test's databases; the server URL carries no credentials."""
    app = create_app(couch.base, fleet.code.name, secret_key="test secret")
    app.config["TESTING"] = True
    yield app
    app.extensions["himbeere"].hub.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, f"no csrf_token field in:\n{html[:2000]}"
    return match.group(1)


def login(client: FlaskClient, name: str, password: str, next_url: str = "/") -> Any:
    page = client.get("/login")
    return client.post("/login", data={"name": name, "password": password,
                                       "csrf_token": csrf_of(page.get_data(as_text=True)),
                                       "next": next_url})


def page_csrf(client: FlaskClient) -> str:
    """The CSRF token a signed-in page hands its script."""
    html = client.get("/commands").get_data(as_text=True)
    match = re.search(r'<script id="config" type="application/json">(.*?)</script>', html)
    assert match, html[:2000]
    return str(json.loads(match.group(1))["csrf"])


def status_doc(mac: int, age: float = 0.0, state: str = "running",
               programs: Optional[dict[str, Any]] = None) -> Doc:
    """A status document as a node writes it, its heartbeat ``age`` seconds old."""
    stamp = time.time() - age
    return {
        "_id": f"status:{mac}", "type": "himbeere-status", "node": mac, "state": state,
        "hostname": f"pi-{mac}", "ip": "192.0.2.7", "daemon_version": "0.1.0",
        "python": "3.11.2", "uptime": 100.0, "heartbeat_time": stamp,
        "heartbeat_server_time": stamp, "heartbeat_interval": 10.0, "clock_offset": 0.0,
        "load": [0.5, 0.25, 0.125], "cpu_percent": 12.5, "temperature": 48.3,
        "memory_used_mb": 211.0, "memory_total_mb": 926.0, "disk_free_mb": 20480.0,
        "throttled": None, "programs": programs or {},
    }


def crashed_program(mac: int) -> dict[str, Any]:
    return {f"{mac}:blink": {"name": "blink", "rev": "3-abc", "state": "backing-off",
                             "pid": None, "restarts": 4, "last_error": TRACEBACK}}


def session_cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("himbeere_dashboard")
    assert cookie is not None
    return cookie.value


def decode_flask_cookie(value: str) -> str:
    """The readable payload of Flask's signed (not encrypted) session cookie."""
    compressed = value.startswith(".")
    payload = value.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return (zlib.decompress(raw) if compressed else raw).decode()


# -- signing in ---------------------------------------------------------------------------
def test_nothing_is_shown_anonymously(client: FlaskClient, fleet: Fleet) -> None:
    fleet.status.save(status_doc(SECRET_MAC))
    page = client.get("/")
    assert page.status_code == 302
    assert page.headers["Location"].startswith("/login")
    for path in ("/api/nodes", f"/api/nodes/{SECRET_MAC}", f"/api/nodes/{SECRET_MAC}/logs",
                 "/api/commands", "/api/events"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert str(SECRET_MAC) not in answer.get_data(as_text=True), path
    assert client.get(f"/nodes/{SECRET_MAC}").status_code == 302


def test_wrong_password_is_refused(client: FlaskClient, deployer: tuple[str, str]) -> None:
    answer = login(client, deployer[0], "wrong")
    assert answer.status_code == 401
    assert "Wrong name or password" in answer.get_data(as_text=True)
    assert client.get("/api/nodes").status_code == 401


def test_login_shows_the_fleet_with_states(client: FlaskClient, fleet: Fleet,
                                           deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    fleet.status.save(status_doc(1002, age=3600))
    fleet.status.save(status_doc(1003, age=40))
    fleet.status.save(status_doc(1004, state="stopped", age=3600))
    fleet.set_name(1001, "kitchen")
    answer = login(client, *deployer, next_url="/nodes/1001")
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/nodes/1001"
    page = client.get("/")
    assert page.status_code == 200
    assert "Content-Security-Policy" in page.headers
    nodes = {n["node"]: n for n in client.get("/api/nodes").get_json()["nodes"]}
    assert {mac: n["state"] for mac, n in nodes.items()} == {
        1001: "alive", 1002: "dead", 1003: "suspect", 1004: "stopped"}
    assert nodes[1001]["name"] == "kitchen"
    assert nodes[1001]["memory"] == {"used_mb": 211.0, "total_mb": 926.0}
    assert client.get("/api/session").get_json()["name"] == deployer[0]


def test_the_cookie_holds_no_password(client: FlaskClient, deployer: tuple[str, str]) -> None:
    client.get("/login")
    before = decode_flask_cookie(session_cookie(client))
    login(client, *deployer)
    cookie = decode_flask_cookie(session_cookie(client))
    assert PASSWORD not in cookie
    assert "sid" in json.loads(cookie)
    assert json.loads(cookie)["csrf"] != json.loads(before)["csrf"]  # fresh after sign-in


def test_logout_forgets_the_session(client: FlaskClient, app: Flask,
                                    deployer: tuple[str, str]) -> None:
    login(client, *deployer)
    assert client.get("/api/nodes").status_code == 200
    token = page_csrf(client)
    stolen = session_cookie(client)
    assert client.post("/logout").status_code == 403  # no CSRF token
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/api/nodes").status_code == 401
    assert len(app.extensions["himbeere"].sessions) == 0
    client.set_cookie("himbeere_dashboard", stolen)  # an old cookie is worth nothing now
    assert client.get("/api/nodes").status_code == 401


def test_login_goes_nowhere_else(client: FlaskClient, deployer: tuple[str, str]) -> None:
    """Regression guard: ``next`` must not make the login an open redirect."""
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        answer = login(client, *deployer, next_url=target)
        assert answer.headers["Location"] == "/", target


# -- CSRF and CouchDB's rules --------------------------------------------------------------
def test_post_without_csrf_token_is_refused(client: FlaskClient, fleet: Fleet,
                                            deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    login(client, *deployer)
    body = {"cmd": ["echo", "hi"], "targets": [1001]}
    assert client.post("/api/commands", json=body).status_code == 403
    wrong = client.post("/api/commands", json=body, headers={"X-CSRF-Token": "forged"})
    assert wrong.status_code == 403
    assert "CSRF" in wrong.get_json()["error"]
    assert ops.list_commands(fleet) == []
    page = client.get("/login")
    assert client.post("/login", data={"name": deployer[0], "password": PASSWORD}
                       ).status_code == 403
    assert csrf_of(page.get_data(as_text=True))


def test_command_is_created_as_the_user(client: FlaskClient, fleet: Fleet,
                                        deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    fleet.status.save(status_doc(1002))
    fleet.set_name(1002, "garden")
    login(client, *deployer)
    answer = client.post("/api/commands", json={"cmd": "echo 'hello world'",
                                                "targets": [1001, "garden"], "timeout": 5},
                         headers={"X-CSRF-Token": page_csrf(client)})
    assert answer.status_code == 201, answer.get_json()
    command_id = answer.get_json()["id"]
    doc = fleet.code.get(command_id)
    assert doc is not None
    assert doc["cmd"] == ["echo", "hello world"]
    assert doc["targets"] == [1001, 1002]
    assert doc["created_by"] == deployer[0]
    assert doc["timeout"] == 5
    listing = client.get("/api/commands").get_json()["commands"]
    assert [c["id"] for c in listing] == [command_id]
    fleet.status.save({"_id": f"result:{command_id}:1001", "type": "himbeere-result",
                       "node": 1001, "command": command_id, "state": "done",
                       "returncode": 0, "ret": ["hello world\n", ""], "duration": 0.01})
    results = client.get(f"/api/commands/{command_id}").get_json()
    assert results["answered"] == 1
    assert results["pending"] == [1002]
    assert results["results"]["1001"]["ret"][0] == "hello world\n"
    assert {n["node"]: n["name"] for n in results["nodes"]} == {1001: None, 1002: "garden"}
    page = client.get(f"/commands/{command_id}")
    assert page.status_code == 200


def test_bad_commands_say_what_is_allowed(client: FlaskClient, fleet: Fleet,
                                          deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    login(client, *deployer)
    headers = {"X-CSRF-Token": page_csrf(client)}
    for body, text in (({"cmd": [], "targets": [1001]}, "non-empty list"),
                       ({"cmd": "echo 'unclosed", "targets": [1001]}, "cannot be split"),
                       ({"cmd": "ls", "targets": "some"}, "allowed"),
                       ({"cmd": "ls"}, "say where to run it"),
                       ({"cmd": "ls", "targets": [1001], "timeout": "soon"}, "a number")):
        answer = client.post("/api/commands", json=body, headers=headers)
        assert answer.status_code == 400, body
        assert text in answer.get_json()["error"], (body, answer.get_json())
    missing = client.post("/api/commands", json={"cmd": "ls", "targets": ["nosuchname"]},
                          headers=headers)
    assert missing.status_code == 404


def test_couchdb_decides_what_a_user_may_do(client: FlaskClient, fleet: Fleet,
                                            make_user: UserFactory) -> None:
    """Requests go out with the user's own credentials, so CouchDB's rules apply."""
    fleet.status.save(status_doc(SECRET_MAC))
    stranger = make_user([])  # signed up, in no role: not a member of the databases
    assert login(client, *stranger).status_code == 302
    refused = client.get("/api/nodes")
    assert refused.status_code == 403
    assert str(SECRET_MAC) not in refused.get_data(as_text=True)
    assert client.get("/").status_code == 403

    other = client.application.test_client()
    # A node (its name is its MAC id) reads, but may not command.
    node_user = make_user([security.NODE_ROLE], str(10**14 + secrets.randbelow(10**14)))
    assert login(other, *node_user).status_code == 302
    assert other.get("/api/nodes").status_code == 200
    answer = other.post("/api/commands", json={"cmd": "reboot", "targets": "all"},
                        headers={"X-CSRF-Token": page_csrf(other)})
    assert answer.status_code == 403
    assert ops.list_commands(fleet) == []


def test_a_node_sees_no_controls_it_cannot_use(client: FlaskClient, fleet: Fleet,
                                               make_user: UserFactory) -> None:
    """Regression: a node user saw Run, stop and restart, which CouchDB refuses it."""
    fleet.status.save(status_doc(1001))
    fleet.code.save({"_id": "1001:blink", "type": 1001, "name": "blink",
                     "code": "def main():\n    pass\n"})
    node_user = make_user([security.NODE_ROLE], str(10**14 + secrets.randbelow(10**14)))
    assert login(client, *node_user).status_code == 302
    for path in ("/", "/nodes/1001", "/commands"):
        html = client.get(path).get_data(as_text=True)
        assert 'id="run"' not in html and 'id="run-button"' not in html, path
        assert page_config(html)["may_act"] is False, path  # dashboard.js: no stop/restart
    answer = client.post("/api/nodes/1001/programs", json={"program": "blink", "action": "stop"},
                         headers={"X-CSRF-Token": page_csrf(client)})
    assert answer.status_code == 403  # and CouchDB still refuses it
    assert fleet.code.get("1001:blink").get("enabled", True) is True  # type: ignore[union-attr]

    deployer_client = client.application.test_client()
    deployer = make_user([security.DEPLOYER_ROLE], f"deployer-{secrets.token_hex(4)}")
    login(deployer_client, *deployer)
    for path in ("/", "/nodes/1001", "/commands"):
        html = deployer_client.get(path).get_data(as_text=True)
        assert 'id="run-button"' in html, path
        assert page_config(html)["may_act"] is True, path


def page_config(html: str) -> dict[str, Any]:
    match = re.search(r'<script id="config" type="application/json">(.*?)</script>', html)
    assert match, html[:2000]
    return dict(json.loads(match.group(1)))


def test_the_fleet_tables_figures_have_one_unit_each(client: FlaskClient, fleet: Fleet,
                                                     deployer: tuple[str, str]) -> None:
    """Regression: memory read "812 MB / 3.7 GB" next to "211 MB / 926 MB", and wrapped."""
    big = status_doc(1001)
    big.update(memory_used_mb=812.4, memory_total_mb=3792.0, disk_free_mb=512.0,
               load=[1.5, 0.123, 2], cpu_percent=7.46, temperature=61)
    fleet.status.save(big)
    small = status_doc(1002)
    small.update(load=None, cpu_percent=None, temperature=None, memory_total_mb=None)
    fleet.status.save(small)
    login(client, *deployer)
    shown = {n["node"]: n["formatted"] for n in client.get("/api/nodes").get_json()["nodes"]}
    assert shown[1001] == {"load": "1.50 0.12 2.00", "cpu": "7 %", "temperature": "61.0 \u00b0C",
                           "memory": "812 / 3792 MB", "disk_free": "0.5 GB"}
    assert shown[1002] == {"load": "\u2013", "cpu": "\u2013", "temperature": "\u2013",
                           "memory": "211 MB", "disk_free": "20.0 GB"}
    embedded = client.get("/").get_data(as_text=True)
    assert "812 / 3792 MB" in embedded  # the page is drawn from the same payload


def test_scripts_use_basic_auth(client: FlaskClient, fleet: Fleet,
                                deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    auth = "Basic " + base64.b64encode(f"{deployer[0]}:{PASSWORD}".encode()).decode()
    nodes = client.get("/api/nodes", headers={"Authorization": auth})
    assert nodes.status_code == 200
    assert [n["node"] for n in nodes.get_json()["nodes"]] == [1001]
    wrong = "Basic " + base64.b64encode(f"{deployer[0]}:nope".encode()).decode()
    assert client.get("/api/nodes", headers={"Authorization": wrong}).status_code == 401
    created = client.post("/api/commands", json={"cmd": ["true"], "targets": [1001]},
                          headers={"Authorization": auth})
    assert created.status_code == 201
    # A form (what a cross-site page can send without a preflight) still needs the token.
    form = client.post("/api/commands", data={"cmd": "true"}, headers={"Authorization": auth})
    assert form.status_code == 403
    assert "WWW-Authenticate" not in client.get("/api/nodes").headers


# -- one node -----------------------------------------------------------------------------
def test_node_detail_has_the_traceback_and_logs(client: FlaskClient, fleet: Fleet,
                                                deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001, programs=crashed_program(1001)))
    fleet.code.save({"_id": "1001:blink", "type": 1001, "name": "blink",
                     "code": "def main():\n    1 / 0\n"})
    fleet.status.save({"_id": "log:1001:1001:blink", "type": "himbeere-log", "node": 1001,
                       "program": "1001:blink", "name": "blink", "dropped": 0,
                       "lines": [[1000.0, "starting"], [1001.0, "about to divide"]]})
    login(client, *deployer)
    detail = client.get("/api/nodes/1001").get_json()
    program = detail["programs"]["1001:blink"]
    assert program["last_error"] == TRACEBACK
    assert program["restarts"] == 4
    assert program["in_database"] is True
    page = client.get("/nodes/1001").get_data(as_text=True)
    assert "ZeroDivisionError" in page  # in the embedded data, escaped for a script tag
    assert "<script" not in page.split('id="data"')[1].split("</script>")[0]
    logs = client.get("/api/nodes/1001/logs").get_json()
    assert logs["lines"] == [[1000.0, "blink", "starting"], [1001.0, "blink", "about to divide"]]
    assert logs["programs"][0]["program"] == "1001:blink"
    later = client.get("/api/nodes/1001/logs?after=1000&program=blink").get_json()
    assert later["lines"] == [[1001.0, "blink", "about to divide"]]
    assert client.get("/api/nodes/1001/logs?limit=1").get_json()["lines"][0][2] == \
        "about to divide"
    assert client.get("/api/nodes/4242").status_code == 404
    assert client.get("/nodes/4242").status_code == 404


def test_node_log_marks_the_daemons_lines(client: FlaskClient, fleet: Fleet,
                                          deployer: tuple[str, str]) -> None:
    """Issue 12: what the daemon wrote into a program's log ([time, text, kind])
    reaches the log view marked, between the program's own lines."""
    fleet.status.save(status_doc(1001, programs=crashed_program(1001)))
    fleet.status.save({"_id": "log:1001:1001:blink", "type": "himbeere-log", "node": 1001,
                       "program": "1001:blink", "name": "blink", "dropped": 0,
                       "lines": [[1000.0, "started (pid 42)", "event"],
                                 [1001.0, "about to divide"],
                                 [1002.0, "ZeroDivisionError: division by zero", "error"],
                                 [1002.0, "crashed; restart 4 in 8 s", "event"]]})
    login(client, *deployer)
    logs = client.get("/api/nodes/1001/logs").get_json()
    assert [line[2] for line in logs["lines"]] == [
        "-- started (pid 42)", "about to divide", "!! ZeroDivisionError: division by zero",
        "-- crashed; restart 4 in 8 s"]


def test_the_last_day_as_chart_columns_and_sparklines(client: FlaskClient, fleet: Fleet,
                                                      deployer: tuple[str, str]) -> None:
    now = ops.server_now(fleet)
    last = int(now // 300 * 300) - 300
    columns = ["time", "cpu_percent", "memory_used_mb", "temperature", "load", "disk_free_mb",
               "restarts"]
    fleet.status.save(status_doc(1001))
    fleet.status.save(status_doc(1002))
    fleet.status.save({"_id": "history:1001", "type": "himbeere-history", "node": 1001,
                       "interval": 300.0, "columns": columns,
                       "samples": [[last - 900, 10.0, 200.0, 45.0, 0.5, 9000.0, None],
                                   [last - 300, 30.0, 220.0, None, 0.7, 8990.0,
                                    {"1001:blink": 2}],
                                   [last, 20.0, 210.0, 46.0, 0.6, 8980.0, None]]})
    login(client, *deployer)
    chart = client.get("/api/nodes/1001/history").get_json()
    # A null where the node sent nothing (last - 600) and for the bucket still open (now).
    assert chart["time"] == [last - 900, last - 600, last - 300, last, last + 300]
    assert chart["cpu_percent"] == [10.0, None, 30.0, 20.0, None]
    assert chart["temperature"] == [45.0, None, None, 46.0, None]
    assert chart["restarts"] == [[last - 300, "1001:blink", 2]]
    empty = client.get("/api/nodes/1002/history").get_json()
    assert empty["time"] == [] and empty["node"] == 1002
    sparks = client.get("/api/history").get_json()
    assert sparks["figure"] == "cpu_percent"
    assert sparks["nodes"] == {"1001": {"time": chart["time"], "values": chart["cpu_percent"]}}
    one = client.get("/api/history?figure=load&node=1001&node=1002").get_json()
    assert one["nodes"]["1001"]["values"] == [0.5, None, 0.7, 0.6, None]
    bad = client.get("/api/history?figure=fan")
    assert bad.status_code == 400 and "figure 'fan' is not allowed; allowed: cpu_percent" in \
        bad.get_json()["error"]
    # The charting library comes from the dashboard itself, never from elsewhere.
    page = client.get("/nodes/1001").get_data(as_text=True)
    assert 'src="/static/vendor/uplot/uPlot.iife.min.js"' in page
    library = client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert library.status_code == 200 and b"uPlot" in library.data
    assert 'src="/static/charts.js"' in client.get("/").get_data(as_text=True)


def test_programs_stop_and_restart_through_their_document(
        client: FlaskClient, fleet: Fleet, deployer: tuple[str, str]) -> None:
    fleet.status.save(status_doc(1001))
    fleet.code.save({"_id": "1001:blink", "type": 1001, "name": "blink",
                     "code": "def main():\n    pass\n"})
    login(client, *deployer)
    headers = {"X-CSRF-Token": page_csrf(client)}
    url = "/api/nodes/1001/programs"
    assert client.post(url, json={"program": "blink", "action": "stop"}).status_code == 403
    assert client.post(url, json={"program": "blink", "action": "stop"},
                       headers=headers).status_code == 200
    assert fleet.code.get("1001:blink")["enabled"] is False  # type: ignore[index]
    assert client.post(url, json={"program": "1001:blink", "action": "restart"},
                       headers=headers).get_json()["restart_count"] == 1
    bad = client.post(url, json={"program": "blink", "action": "explode"}, headers=headers)
    assert bad.status_code == 400
    assert "stop, start, restart" in bad.get_json()["error"]


def test_a_placed_programs_buttons_act_wherever_it_is_placed(
        client: FlaskClient, fleet: Fleet, deployer: tuple[str, str]) -> None:
    """Regression: Stop on a node's page answered 404 for a placed program."""
    fleet.status.save(status_doc(1001))
    fleet.code.save({"_id": "placed:collector", "type": "himbeere-placed", "name": "collector",
                     "code": "def main():\n    pass\n"})
    login(client, *deployer)
    headers = {"X-CSRF-Token": page_csrf(client)}
    answer = client.post("/api/nodes/1001/programs", headers=headers,
                         json={"program": "placed:collector", "action": "stop"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["placed"] is True
    assert fleet.code.get("placed:collector")["enabled"] is False  # type: ignore[index]
    answer = client.post("/api/nodes/1001/programs", headers=headers,
                         json={"program": "collector", "action": "restart"})
    assert answer.get_json()["restart_count"] == 1
    missing = client.post("/api/nodes/1001/programs", headers=headers,
                          json={"program": "nothing", "action": "stop"})
    assert missing.status_code == 404


def test_a_program_for_many_nodes_has_buttons_that_act_on_every_node(
        client: FlaskClient, fleet: Fleet, deployer: tuple[str, str]) -> None:
    """Regression: a node's page showed no stop/restart for program:<name>, and the
    API answered 404 for it: it has one document for all its nodes."""
    running = {"program:sensor": {"name": "sensor", "state": "running",
                                  "targets": {"labels": {"room": "lab"}}}}
    fleet.status.save(status_doc(1001, programs=running))
    fleet.status.save(status_doc(1002, programs=running))
    for mac in (1001, 1002):
        fleet.status.save({"_id": f"node:{mac}", "type": "himbeere-node",
                           "labels": {"room": "lab"}})
    fleet.code.save({"_id": "program:sensor", "type": "himbeere-program", "name": "sensor",
                     "targets": {"labels": {"room": "lab"}}, "code": "def main():\n    pass\n"})
    login(client, *deployer)
    shown = client.get("/api/nodes/1001").get_json()["programs"]["program:sensor"]
    assert (shown["in_database"], shown["enabled"]) == (True, True)  # dashboard.js: buttons
    headers = {"X-CSRF-Token": page_csrf(client)}
    answer = client.post("/api/nodes/1001/programs", headers=headers,
                         json={"program": "program:sensor", "action": "stop"})
    assert answer.status_code == 200, answer.get_json()
    result = answer.get_json()
    assert (result["targeted"], result["placed"], result["nodes"]) == (True, False, [1001, 1002])
    assert fleet.code.get("program:sensor")["enabled"] is False  # type: ignore[index]
    assert client.get("/api/nodes/1002").get_json()["programs"]["program:sensor"][
        "enabled"] is False  # one document: stopped on the other node's page too
    answer = client.post("/api/nodes/1002/programs", headers=headers,
                         json={"program": "sensor", "action": "restart"})
    assert answer.get_json()["restart_count"] == 1


# -- live ---------------------------------------------------------------------------------
class EventReader:
    """Reads a streamed ``text/event-stream`` response, in the test's own thread."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.chunks = iter(response.response)
        self.text = ""

    def until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Read until ``predicate()``; keep-alives (made frequent) keep this moving."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"never happened; the stream: {self.text!r}"
            chunk = next(self.chunks)
            self.text += chunk.decode() if isinstance(chunk, bytes) else chunk

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line[len("data: "):]) for line in self.text.splitlines()
                if line.startswith("data: ")]

    def changed(self) -> set[str]:
        return {i for e in self.events() if e.get("type") == "changes" for i in e["ids"]}


def test_events_come_from_changes(client: FlaskClient, app: Flask, fleet: Fleet,
                                  deployer: tuple[str, str]) -> None:
    board = app.extensions["himbeere"]
    board.keepalive = 0.2
    login(client, *deployer)
    response = client.get("/api/events", buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    reader = EventReader(response)
    reader.until(lambda: {"type": "resync"} in reader.events())
    fleet.status.save(status_doc(1005))
    fleet.status.save({"_id": "log:1005:1005:blink", "lines": [[1.0, "hi"]]})
    reader.until(lambda: {"status:1005", "log:1005:1005:blink"} <= reader.changed())
    assert len(board.hub.feeds) == 1
    feed = next(iter(board.hub.feeds.values()))
    assert feed.db.couch.auth == deployer  # followed as the user, not as anyone else
    second = client.get("/api/events", buffered=False)  # another tab shares the feed
    other = EventReader(second)
    other.until(lambda: {"type": "resync"} in other.events())
    assert list(board.hub.feeds.values()) == [feed]
    second.close()
    response.close()
    wait_for(lambda: not board.hub.feeds, 30, message="the feed did not stop without tabs")
    wait_for(lambda: not feed.thread.is_alive(), 10, message="the feed's thread lives on")


def test_unreachable_server_is_a_clear_error(deployer: tuple[str, str]) -> None:
    from tests.servers import free_port

    app = create_app(f"http://127.0.0.1:{free_port()}", "nowhere", secret_key="x")
    client = app.test_client()
    answer = login(client, *deployer)
    assert answer.status_code == 503
    page = answer.get_data(as_text=True)
    # One line in words (regression: the page showed urllib3's "HTTPConnectionPool(...):
    # Max retries exceeded ... NewConnectionError(...)").
    error = re.search(r'<p class="error" role="alert">(.*?)</p>', page, re.S)
    assert error, page
    assert re.fullmatch(r"Cannot reach the CouchDB server at http://127\.0\.0\.1:\d+: "
                        r"connection refused", error.group(1)), error.group(1)
    for noise in ("HTTPConnectionPool", "Max retries", "NewConnectionError", "urllib3"):
        assert noise not in page, noise
    api = client.get("/api/nodes")
    assert api.status_code == 503
    assert api.get_json()["error"].endswith(": connection refused")


def test_dashboard_subcommand_is_registered() -> None:
    from uploader.dashboard import serve
    from uploader.main import build_parser

    args = build_parser().parse_args(["dashboard", "--port", "9999", "--server",
                                          "http://127.0.0.1:5984"])
    assert args.func is serve
    assert (args.port, args.host) == (9999, "127.0.0.1")


def test_a_public_database_is_shown_without_signing_in(couch: Couch, dbname: str,
                                                      server_kind: str) -> None:
    """A public database (empty ``_security``): anyone may read, and so do we."""
    admin_fleet = Fleet(couch.url, dbname)
    couch.create_database(admin_fleet.status.name)
    admin_fleet.status.save(status_doc(1001))
    anonymous = requests.get(f"{couch.base}/{admin_fleet.status.name}", timeout=30)
    if server_kind == "couchdb":
        # CouchDB 3 makes a new database admin-only; the admin opens it up.
        assert anonymous.status_code == 401
        for name in (dbname, admin_fleet.status.name):
            response = requests.put(f"{couch.url}/{name}/_security", timeout=30, json={
                "admins": {"names": [], "roles": []}, "members": {"names": [], "roles": []}})
            assert response.ok, response.text
    else:
        assert anonymous.status_code == 200  # pouchdb-server: no _security means public
    app = create_app(couch.base, dbname, secret_key="x")
    client = app.test_client()
    assert client.get("/").status_code == 200
    assert [n["node"] for n in client.get("/api/nodes").get_json()["nodes"]] == [1001]
    assert client.get("/api/session").get_json()["signed_in"] is False


def test_sessions_expire() -> None:
    from uploader.dashboard.sessions import Login, SessionStore

    store = SessionStore(idle_timeout=0.05)
    sid = store.add(Login(name="alice", fleet=Fleet("http://127.0.0.1:9"), roles=[]))
    assert store.get(sid) is not None
    assert store.get("forged") is None
    time.sleep(0.1)
    assert store.get(sid) is None
    assert len(store) == 0

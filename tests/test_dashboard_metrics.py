"""``/metrics``: the fleet for Prometheus, read back with prometheus_client's own parser.

Status documents are written by hand (known values, asserted exactly) and
by a real daemon (the field names the daemon really writes); users are
real CouchDB users, so every refusal is CouchDB's own.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

pytest.importorskip("flask", reason="the dashboard needs Flask (pip install '.[dashboard]')")
pytest.importorskip("prometheus_client", reason="/metrics needs prometheus_client "
                                                "(pip install '.[dashboard]')")

from flask.testing import FlaskClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from himbeere.couch import Couch  # noqa: E402
from himbeere.exceptions import CouchError  # noqa: E402
from himbeere.schema import ProgramState  # noqa: E402
from tests.conftest import UserFactory  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.nodes import Node  # noqa: E402
from tests.test_dashboard import crashed_program, login, status_doc  # noqa: E402
from uploader.dashboard import create_app  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

THROTTLED = {"raw": "0x50005", "flags": ["undervoltage", "throttled", "undervoltage_occurred",
                                         "throttling_occurred"]}


@pytest.fixture
def client(couch: Couch, fleet: Fleet) -> Iterator[FlaskClient]:
    """The dashboard for the test's databases (as in tests/test_dashboard.py)."""
    app = create_app(couch.base, fleet.code.name, secret_key="metrics test")
    app.config["TESTING"] = True
    yield app.test_client()
    app.extensions["himbeere"].hub.close()


def basic(user: tuple[str, str]) -> dict[str, str]:
    token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def scrape(client: FlaskClient, user: Any = None) -> Samples:
    """``GET /metrics`` parsed by prometheus_client: (sample name, labels) -> value."""
    answer = client.get("/metrics", headers=basic(user) if user else {})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.mimetype == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


def of(samples: Samples, metric: str, /, **labels: Any) -> dict[frozenset[tuple[str, str]],
                                                                float]:
    """The samples called ``metric`` whose labels include ``labels``."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return {key: value for (sample, key), value in samples.items()
            if sample == metric and wanted <= key}


def one(samples: Samples, metric: str, /, **labels: Any) -> float:
    found = of(samples, metric, **labels)
    assert len(found) == 1, f"{metric}{labels}: {found}"
    return next(iter(found.values()))


def test_metrics_of_known_nodes(client: FlaskClient, fleet: Fleet,
                                deployer: tuple[str, str]) -> None:
    kitchen = status_doc(1001, programs=dict(crashed_program(1001), **{
        "1001:clock": {"name": "clock", "state": "running", "pid": 42, "restarts": 0}}))
    kitchen["throttled"] = THROTTLED
    fleet.status.save(kitchen)
    fleet.set_name(1001, "kitchen")
    dead = status_doc(1002, age=3600)
    dead.update(temperature=None, cpu_percent=None, load=None)  # off a Pi, first heartbeat
    fleet.status.save(dead)
    fleet.set_name(1003, "shed")  # a node document, and never a heartbeat

    samples = scrape(client, deployer)

    kitchen_labels = {"node": "1001", "name": "kitchen"}
    assert one(samples, "himbeere_node_up", **kitchen_labels) == 1
    assert one(samples, "himbeere_node_up", node=1002, name="") == 0
    assert one(samples, "himbeere_node_up", node=1003, name="shed") == 0
    assert 0 <= one(samples, "himbeere_node_heartbeat_age_seconds", node=1001) < 60
    assert 3590 <= one(samples, "himbeere_node_heartbeat_age_seconds", node=1002) < 3700
    assert of(samples, "himbeere_node_heartbeat_age_seconds", node=1003) == {}
    assert one(samples, "himbeere_node_cpu_ratio", **kitchen_labels) == 0.125
    assert one(samples, "himbeere_node_temperature_celsius", node=1001) == 48.3
    assert one(samples, "himbeere_node_memory_used_bytes", node=1001) == 211 * 2**20
    assert one(samples, "himbeere_node_memory_total_bytes", node=1001) == 926 * 2**20
    assert one(samples, "himbeere_node_disk_free_bytes", node=1001) == 20480 * 2**20
    assert [one(samples, f"himbeere_node_load{m}", node=1001) for m in (1, 5, 15)] == \
        [0.5, 0.25, 0.125]
    # What a node did not report is absent, not 0 (a Grafana panel shows "no data").
    for name in ("himbeere_node_cpu_ratio", "himbeere_node_temperature_celsius",
                 "himbeere_node_load1", "himbeere_node_throttled"):
        assert of(samples, name, node=1002) == {}, name
    assert one(samples, "himbeere_node_info", node=1001, hostname="pi-1001",
               daemon_version="0.1.0") == 1

    throttled = {dict(k)["flag"]: v for k, v in
                 of(samples, "himbeere_node_throttled", node=1001).items()}
    assert throttled["undervoltage"] == 1 and throttled["throttling_occurred"] == 1
    assert throttled["soft_temperature_limit"] == 0 and len(throttled) == 8

    states = {dict(k)["state"]: v for k, v in
              of(samples, "himbeere_node_programs", node=1001).items()}
    assert set(states) == {state.value for state in ProgramState}  # every state, 0 or more
    assert states["backing-off"] == 1 and states["running"] == 1
    assert sum(states.values()) == 2
    assert sum(of(samples, "himbeere_node_programs", node=1002).values()) == 0

    assert one(samples, "himbeere_program_restarts_total", node=1001, name="kitchen",
               program="1001:blink", program_name="blink") == 4
    assert one(samples, "himbeere_program_restarts_total", program="1001:clock") == 0


def test_metrics_of_a_real_daemon(client: FlaskClient, fleet: Fleet, deployer: tuple[str, str],
                                  node_factory: Callable[..., Node]) -> None:
    mac = 10**14 + secrets.randbelow(10**14)
    fleet.code.save({"_id": f"{mac}:waiter", "type": mac, "name": "waiter",
                     "code": "import time\n\ndef main():\n    while not should_quit():\n"
                             "        time.sleep(0.2)\n"})
    node = node_factory(mac_id=mac)
    node.wait_program(f"{mac}:waiter", 40, state="running")

    def scraped() -> Samples:
        samples = scrape(client, deployer)
        return samples if of(samples, "himbeere_node_programs", node=mac, state="running") \
            and one(samples, "himbeere_node_programs", node=mac, state="running") == 1 else {}

    samples = wait_for(scraped, 40, interval=0.5, message=lambda: "no running program in "
                       f"{of(scrape(client, deployer), 'himbeere_node_programs', node=mac)}")
    assert one(samples, "himbeere_node_up", node=mac) == 1
    assert one(samples, "himbeere_node_memory_total_bytes", node=mac) > 2**20
    assert one(samples, "himbeere_node_disk_free_bytes", node=mac) > 0
    assert one(samples, "himbeere_node_heartbeat_age_seconds", node=mac) >= 0
    assert one(samples, "himbeere_program_restarts_total", node=mac,
               program_name="waiter") == 0


def test_prometheus_authenticates_with_basic_auth(
        client: FlaskClient, couch: Couch, fleet: Fleet, deployer: tuple[str, str],
        make_user: UserFactory) -> None:
    fleet.status.save(status_doc(1001))
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.mimetype == "text/plain"
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert "1001" not in anonymous.get_data(as_text=True)
    wrong = client.get("/metrics", headers=basic((deployer[0], "wrong")))
    assert wrong.status_code == 401
    stranger = make_user([])  # a user in no role and no database's members
    refused = client.get("/metrics", headers=basic(stranger))
    assert refused.status_code == 401  # as on /api/: basic auth CouchDB refused
    assert "may not read database" in refused.get_data(as_text=True)
    assert "1001" not in refused.get_data(as_text=True)

    # docs/operating.rst: a user in no role, a member of both databases by name,
    # reads the metrics and can write nothing.
    reader = make_user([], f"prometheus-{secrets.token_hex(3)}")
    for db in (fleet.code, fleet.status):
        sec = db.security()
        sec.setdefault("members", {}).setdefault("names", []).append(reader[0])
        db.set_security(sec)
    assert one(scrape(client, reader), "himbeere_node_up", node=1001) == 1
    as_reader = Fleet(Couch(couch.base).as_user(*reader).url, fleet.code.name)
    with pytest.raises(CouchError):
        as_reader.status.save({"_id": "status:1001", "state": "forged"})
    with pytest.raises(CouchError):
        as_reader.code.save({"_id": "1001:evil", "type": 1001, "name": "evil",
                             "code": "def main():\n    pass\n"})

    # A browser signed in to the dashboard sees the same without basic auth.
    login(client, *deployer)
    assert one(scrape(client), "himbeere_node_up", node=1001) == 1


def test_metrics_of_a_down_server_are_one_line(deployer: tuple[str, str]) -> None:
    from tests.servers import free_port

    app = create_app(f"http://127.0.0.1:{free_port()}", "nowhere", secret_key="x")
    answer = app.test_client().get("/metrics", headers=basic(deployer))
    assert answer.status_code == 503
    assert answer.mimetype == "text/plain"
    text = answer.get_data(as_text=True)
    assert text.startswith("cannot reach the CouchDB server at http://127.0.0.1:")
    assert text.endswith(": connection refused\n")


def test_a_scrape_reads_only_at_scrape_time(client: FlaskClient, fleet: Fleet,
                                            deployer: tuple[str, str]) -> None:
    """No cache and no background sampling: a new heartbeat shows at the next scrape."""
    fleet.status.save(status_doc(1001))
    assert one(scrape(client, deployer), "himbeere_node_temperature_celsius", node=1001) == 48.3
    doc = fleet.status.get("status:1001")
    assert doc is not None
    doc.update(temperature=71.5, heartbeat_time=time.time(), heartbeat_server_time=time.time())
    fleet.status.save(doc)
    assert one(scrape(client, deployer), "himbeere_node_temperature_celsius", node=1001) == 71.5

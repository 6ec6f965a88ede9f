"""An edge site through a WAN outage (issue 15): nothing lost, nothing run twice.

Three Apache CouchDB roles on loopback: the session's server is the central
one, a CouchDB of this module's own is the site's relay, and a
:class:`~tests.wan.WanLink` between them is the WAN (the relay's
replications reach the centre only through it).  Two real node daemons
have ``server = <relay>,<central>``; node B reaches its relay through a
LAN link of its own, which the test also cuts, so that B switches to the
central server in the middle of the outage.  Every command appends its tag
to a ledger file per node, so "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import schema
from himbeere.couch import Couch, Database
from tests.conftest import Upload, delete_users
from tests.helpers import himbeere, random_mac, wait_for
from tests.nodes import Node
from tests.servers import CouchServer
from tests.wan import WanLink
from uploader import ops, users
from uploader.fleet import Fleet

#: How long the WAN stays cut (the issue's figure).
CUT = 60.0
#: Replications restart within seconds (the relay's tuned scheduler), conflicts
#: are resolved within 30 heartbeats of 1 s: a minute and a half is ample.
CATCH_UP = 120.0

PROGRAM = """\
import os, time
def main():
    with open(os.path.join({markers!r}, str(node)), 'a') as f:
        f.write('x')
    while not should_quit():
        time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CouchServer]:
    server = CouchServer(tmp_path_factory.mktemp("relay"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ledger_command(tag: str, sleep: float = 0.0) -> list[str]:
    """A command that appends ``tag`` to its node's ledger file (``$LEDGER``), then sleeps."""
    return ["sh", "-c", f'echo {tag} >> "$LEDGER"' + (f"; sleep {sleep}" if sleep else "")]


def ledger_counts(ledger: Path) -> dict[str, Counter[str]]:
    """``{mac: {tag: runs}}`` from the ledger files."""
    return {f.name: Counter(f.read_text().split()) for f in ledger.iterdir()}


def final(doc: Optional[dict[str, Any]]) -> bool:
    return bool(doc) and (doc or {}).get("state") in ("done", "timeout", "error", "interrupted")


def node_command(db: Database, mac: int, tag: str, sleep: float = 0.0) -> str:
    """A single-node command (the original ``<mac>_cmd`` format); returns its id."""
    doc_id = f"{tag}-{secrets.token_hex(3)}"
    db.save({"_id": doc_id, "type": schema.commands_id(mac),
             "cmd": ledger_command(tag, sleep), "timeout": 30})
    return doc_id


def done_everywhere(servers: dict[str, Couch], dbname: str,
                    wanted: dict[str, list[tuple[str, int]]]) -> list[str]:
    """What is missing: each (command, node) of ``wanted`` needs a final result on
    every server (``<mac>_cmd``: in the document; a fleet command: ``result:``)."""
    missing = []
    for where, couch in servers.items():
        code, status = couch.database(dbname), couch.database(dbname + "_status")
        for tag, pairs in wanted.items():
            for doc_id, mac in pairs:
                fleet_result = status.get(schema.result_id(doc_id, mac))
                if not (final(fleet_result) or final(code.get(doc_id))):
                    missing.append(f"{where}: {tag} on {mac}")
    return missing


def conflicts(couch: Couch, names: list[str]) -> list[str]:
    """Every document with ``_conflicts`` in the ``names`` databases of ``couch``."""
    found = []
    for name in names:
        for row in couch.database(name).all_docs(include_docs=True, conflicts=True):
            if (row.get("doc") or {}).get("_conflicts"):
                found.append(f"{name}/{row['id']}")
    return found


def placed_runs(couch: Couch, dbname: str, macs: dict[str, int]) -> Optional[dict[int, int]]:
    """``{node: pid}`` of the site's placed program where exactly one node runs it."""
    status = couch.database(dbname + "_status")
    running = {}
    for mac in macs.values():
        entry = ((status.get(schema.status_id(mac)) or {}).get("programs") or {}).get(
            "placed:keeper") or {}
        if entry.get("state") == "running" and entry.get("pid"):
            running[mac] = int(entry["pid"])
    return running if len(running) == 1 else None


def heartbeat(db: Database, mac: int) -> float:
    return float((db.get(schema.status_id(mac)) or {}).get("heartbeat_time") or 0.0)


def test_a_site_runs_through_a_wan_outage_and_reconciles_with_nothing_lost_or_run_twice(
        couch_url: str, server_kind: str, dbname: str, fleet: Fleet, upload: Upload,
        relay_server: CouchServer, tmp_path: Path, capsys: Any, cli_env: None,
        node_factory: Callable[..., Node]) -> None:
    if server_kind != "couchdb":
        pytest.skip("a site needs Apache CouchDB centrally: the relay's filtered pull "
                    "(POST _changes?filter=_selector) gets 404 from pouchdb-server; "
                    "HIMBEERE_TEST_SERVER=couchdb runs this test")
    central = Couch(couch_url)
    central_port = int(couch_url.rsplit(":", 1)[1].strip("/"))
    relay_port = int(relay_server.url.rsplit(":", 1)[1].strip("/"))
    wan = WanLink(central_port)
    lan = {name: WanLink(relay_port) for name in "ab"}
    macs = {"a": random_mac(), "b": random_mac()}
    a, b = macs["a"], macs["b"]
    ledger, markers = tmp_path / "ledger", tmp_path / "markers"
    ledger.mkdir()
    markers.mkdir()
    relay = Couch(relay_server.url)
    servers = {"central": central, "relay": relay}
    at_relay = Fleet(relay_server.url, dbname)
    try:
        # -- the site: two nodes, each with server = <relay via its LAN>,<central> -------
        passwords = {mac: secrets.token_hex(8) for mac in macs.values()}
        for mac, password in passwords.items():
            users.provision(fleet, mac, password=password)
        code, _, err = upload("site", "add", "farm", "--relay", relay_server.url,
                              "--nodes", f"{a},{b}", "--central-url", wan.url(couch_url))
        assert code == 0, err
        nodes = {}
        for name, mac in macs.items():
            (ledger / str(mac)).touch()
            url = (f"http://{mac}:{passwords[mac]}@127.0.0.1:{lan[name].port},"
                   f"http://127.0.0.1:{central_port}")
            nodes[mac] = node_factory(mac_id=mac, url=url,
                                      env={"LEDGER": str(ledger / str(mac))})

        # -- a push at the centre runs at the site -------------------------------------
        source = tmp_path / "sensor.py"
        source.write_text(PROGRAM.format(markers=str(markers)))
        code, _, err = upload("push", str(source), "--all", "--name", "sensor")
        assert code == 0, err
        for mac in (a, b):
            wait_for(lambda m=mac: (markers / str(m)).exists(), 90, message=lambda m=mac: (
                f"the program never started on {m}:\n{nodes[m].log()[-3000:]}"))
            wait_for(lambda m=mac: ((fleet.status.get(schema.status_id(m)) or {})
                                    .get("programs", {}).get("program:sensor", {})
                                    .get("state") == "running"), 60,
                     message="the central server never saw the program running at the site")
        # A placed program restricted to the site: the relay's leader places it.
        keeper = tmp_path / "keeper.py"
        keeper.write_text("import time\ndef main():\n    while not should_quit():\n"
                          "        time.sleep(0.2)\n")
        code, _, err = upload("push", str(keeper), "--placed", "--label", "site=farm",
                              "--replicas", "1", "--name", "keeper")
        assert code == 0, err
        placed_on = wait_for(lambda: placed_runs(relay, dbname, macs), 90,
                             message=lambda: f"keeper never ran at the site: "
                                             f"{placed_runs(relay, dbname, macs)}")

        wanted: dict[str, list[tuple[str, int]]] = {}
        pre = ops.create_command(fleet, ledger_command("pre"), [a, b])
        wanted["pre"] = [(pre, a), (pre, b)]
        wait_for(lambda: not done_everywhere(servers, dbname, wanted), 60,
                 message=lambda: f"missing {done_everywhere(servers, dbname, wanted)}")

        # -- B is running a command from the centre when the WAN goes ------------------
        edge = node_command(fleet.code, b, "edge", sleep=4)
        wanted["edge"] = [(edge, b)]
        wait_for(lambda: "edge" in ledger_counts(ledger)[str(b)], 60,
                 message=lambda: f"B never started it: {ledger_counts(ledger)}")
        wan.cut()
        cut_at = time.monotonic()

        # -- during the cut: the relay's commands run, the centre's wait ---------------
        relay_fleet_command = ops.create_command(at_relay, ledger_command("relayF"), [a, b])
        relay_node_command = node_command(at_relay.code, a, "relayA")
        central_command = ops.create_command(fleet, ledger_command("centralF"), [a, b])
        wanted["relayF"] = [(relay_fleet_command, a), (relay_fleet_command, b)]
        wanted["relayA"] = [(relay_node_command, a)]
        wanted["centralF"] = [(central_command, a), (central_command, b)]
        at_site = {"relay": relay}
        wait_for(lambda: not done_everywhere(at_site, dbname, {
            k: wanted[k] for k in ("relayF", "relayA", "edge")}), 60,
            message=lambda: f"missing {done_everywhere(at_site, dbname, wanted)}")
        # The centre sees the site go silent: unreachable, not dead.
        wait_for(lambda: "unreachable (site farm offline since" in himbeere(
            capsys, "nodes")[1], 30, message=lambda: himbeere(capsys, "nodes")[1])
        counts = ledger_counts(ledger)
        assert "centralF" not in counts[str(a)] and "centralF" not in counts[str(b)]
        # The site's placed program kept its place (and its process) through the cut.
        assert placed_runs(relay, dbname, macs) == placed_on
        assert relay.database(dbname).get(central_command) is None
        assert fleet.status.get(schema.result_id(central_command, a)) is None
        assert not fleet.code.get(relay_node_command)  # still only at the relay

        # -- mid-outage, B loses its relay and switches to the centre ------------------
        lan["b"].cut()
        seen = heartbeat(fleet.status, b)
        wait_for(lambda: heartbeat(fleet.status, b) > seen, 60,
                 message=lambda: f"B never wrote to the centre:\n{nodes[b].log()[-3000:]}")
        # There B finds the command it ran at the relay without its result, and
        # the centre's waiting command: the first gets the kept result, the
        # second runs.
        wait_for(lambda: final(fleet.code.get(edge)), 60,
                 message=lambda: f"no result of edge centrally: {fleet.code.get(edge)}")
        wait_for(lambda: final(fleet.status.get(schema.result_id(central_command, b))), 60,
                 message="B never ran the centre's command at the centre")
        nodes[b].wait_log(f"command {edge} ran here already", 10)
        time.sleep(max(0.0, CUT - (time.monotonic() - cut_at)))
        assert ledger_counts(ledger)[str(b)]["edge"] == 1
        assert "centralF" not in ledger_counts(ledger)[str(a)]  # A is still cut off

        # -- the WAN and B's LAN come back ---------------------------------------------
        wan.restore()
        lan["b"].restore()
        wait_for(lambda: not done_everywhere(servers, dbname, wanted), CATCH_UP,
                 message=lambda: f"missing {done_everywhere(servers, dbname, wanted)}")
        restored = time.time()
        for mac in (a, b):
            wait_for(lambda m=mac: heartbeat(fleet.status, m) > restored, CATCH_UP,
                     message=lambda m=mac: f"no new heartbeat of {m} centrally")
        names = [dbname, dbname + "_status"]
        wait_for(lambda: not (conflicts(central, names) + conflicts(relay, names)), CATCH_UP,
                 message=lambda: f"conflicts left: central {conflicts(central, names)}, "
                                 f"relay {conflicts(relay, names)}")

        # -- the ledgers: each command ran exactly once on each node it targets ---------
        counts = ledger_counts(ledger)
        expected = {str(a): {"pre": 1, "relayF": 1, "relayA": 1, "centralF": 1},
                    str(b): {"pre": 1, "edge": 1, "relayF": 1, "centralF": 1}}
        assert {mac: dict(c) for mac, c in counts.items()} == expected
        # The program ran on through all of it: one start on each node.
        assert {m: (markers / str(m)).read_text() for m in (a, b)} == {a: "x", b: "x"}
        code, out, _ = himbeere(capsys, "nodes")
        assert "unreachable" not in out, out
    finally:
        wan.close()
        for link in lan.values():
            link.close()
        delete_users(relay, list(macs.values()))

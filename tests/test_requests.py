"""What a daemon asks the server, counted: a fleet of thousands pays for every request.

A real daemon runs behind :class:`tests.recorder.RecordingProxy`, which keeps
every request it sends; the tests assert on those, never on timings.  Beats
are counted by the lease's PUTs (the leader renews ``lease:scheduler`` once
per heartbeat), not by the clock.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

from himbeere.commands import result_id
from himbeere.couch import Couch, Doc
from himbeere.fleet import placement
from himbeere.fleet.lease import lease_id
from himbeere.fleet.targeting import READ_EVERY
from himbeere.schema import NODE_PREFIX, STATUS_PREFIX, log_id
from himbeere.schema import status_id as status_id_of
from tests.helpers import wait_for
from tests.nodes import Node
from tests.recorder import Recorded, RecordingProxy
from tests.test_scheduler import placed
from uploader import ops
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
SCHEDULER = lease_id(placement.LEASE_NAME)


@pytest.fixture
def proxy(couch_url: str) -> Iterator[RecordingProxy]:
    recorder = RecordingProxy(urllib.parse.urlsplit(couch_url).port or 5984)
    yield recorder
    recorder.close()


def behind(proxy: RecordingProxy, couch_url: str, node_factory: NodeFactory, mac: int,
           *flags: str) -> Node:
    """A daemon whose server is ``proxy`` (the admin's credentials, as the other tests')."""
    parts = urllib.parse.urlsplit(couch_url)
    url = proxy.url(urllib.parse.unquote(parts.username or ""),
                    urllib.parse.unquote(parts.password or ""))
    return node_factory(mac_id=mac, url=url, flags=list(flags))


def to(requests: list[Recorded], method: str, doc_id: str) -> list[Recorded]:
    """The requests ``method`` of one document (its id, unquoted, ends the path)."""
    return [r for r in requests if r.method == method and r.path.endswith("/" + doc_id)]


def prefixed_reads(requests: list[Recorded], prefix: str) -> list[Recorded]:
    """``_all_docs`` reads of the documents whose ids start with ``prefix``."""
    return [r for r in requests if r.path.endswith("/_all_docs")
            and r.query.get("startkey") == json.dumps(prefix)]


def summary(requests: list[Recorded]) -> str:
    return "\n".join(f"{r.method} {r.path} {r.query}" for r in requests[-60:])


@pytest.mark.slow
def test_a_leader_with_nothing_placed_reads_no_status_or_node_documents(
        proxy: RecordingProxy, couch_url: str, couch: Couch, dbname: str,
        node_factory: NodeFactory) -> None:
    """Issue 14: the leader read every node's status and node document at every
    heartbeat, to compute the empty assignments of a fleet with no placed program."""
    node = behind(proxy, couch_url, node_factory, 1000, "--heartbeat-interval", "0.5")

    def beats(count: int) -> list[Recorded]:
        return wait_for(lambda: len(to(proxy.taken(), "PUT", SCHEDULER)) >= count
                        and proxy.taken(), 60, message=lambda: node.log()[-3000:])

    taken = beats(6)
    assert prefixed_reads(taken, STATUS_PREFIX) == [], summary(taken)
    assert prefixed_reads(taken, NODE_PREFIX) == [], summary(taken)

    # A placed program: the leader reads the nodes again, and places it here.
    couch.database(dbname).save(placed("agg", code=(
        "import time\ndef main():\n    while not should_quit():\n        time.sleep(0.05)\n")))
    node.wait_program("agg", state="running", timeout=40)
    taken = proxy.taken()
    assert prefixed_reads(taken, STATUS_PREFIX), summary(taken)
    assert prefixed_reads(taken, NODE_PREFIX), summary(taken)
    lease = couch.database(dbname + "_status").get(SCHEDULER) or {}
    assert lease["assignments"]["agg"]["nodes"] == [1000]


@pytest.mark.slow
def test_log_shipments_are_puts_without_a_get_each(
        proxy: RecordingProxy, couch_url: str, couch: Couch, dbname: str,
        node_factory: NodeFactory) -> None:
    """Issue 14: each shipment of a program's lines was a GET of its log document,
    then a PUT; now the shipper writes on top of the copy it saved last."""
    doc_id = log_id(1000, "counter")
    couch.database(dbname).save({"_id": "counter", "type": 1000, "name": "counter", "code": (
        "import time\ndef main():\n    i = 0\n    while not should_quit():\n"
        "        print('line', i)\n        i += 1\n        time.sleep(0.1)\n")})
    node = behind(proxy, couch_url, node_factory, 1000)
    status_db = couch.database(dbname + "_status")

    def shipments(count: int) -> list[Recorded]:
        return wait_for(lambda: len(to(proxy.taken(), "PUT", doc_id)) >= count
                        and proxy.taken(), 60, message=lambda: node.log()[-3000:])

    taken = shipments(5)
    assert len(to(taken, "GET", doc_id)) <= 1, summary(taken)  # the first, after the start
    assert_every_line(status_db.get(doc_id))

    # Someone else edits the document: the next shipment gets a 409, reads
    # it once and keeps their edit, and no line is lost.
    gets = len(to(proxy.taken(), "GET", doc_id))
    status_db.update(doc_id, lambda doc: doc.update(note="kept"))
    taken = shipments(len(to(proxy.taken(), "PUT", doc_id)) + 3)
    doc = status_db.get(doc_id)
    assert doc is not None and doc["note"] == "kept"
    assert len(to(taken, "GET", doc_id)) == gets + 1, summary(taken)
    assert_every_line(doc)


def assert_every_line(doc: Optional[Doc]) -> None:
    """The program's lines (the daemon's have a kind too), every one, in order."""
    assert doc is not None
    own = [line[1] for line in doc["lines"] if len(line) == 2]
    assert own and own == [f"line {i}" for i in range(len(own))], own


@pytest.mark.slow
def test_a_fleet_command_writes_its_result_on_top_of_its_running_mark(
        proxy: RecordingProxy, couch_url: str, fleet: Fleet, node_factory: NodeFactory,
        tmp_path: Path) -> None:
    """Issue 14: a command still running at its ``running`` mark read its result
    document before the mark, and wrote the result on top of a stale copy (409),
    then read it again: GET, GET, PUT, PUT (409), GET, PUT.  Now: the GET that
    makes sure it never ran here (a replayed feed must not run it twice), the
    mark and the result."""
    node = behind(proxy, couch_url, node_factory, 1000)
    wait_for(node.status, 30, message=lambda: node.log()[-3000:])
    go = tmp_path / "go"
    command_id = ops.create_command(fleet, [sys.executable, "-c", (
        f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n"
        "print('went')")], [1000])
    key = result_id(command_id, 1000)
    wait_for(lambda: (fleet.status.get(key) or {}).get("state") == "running", 30,
             message=lambda: node.log()[-3000:])
    go.touch()
    doc = wait_for(lambda: (fleet.status.get(key) or {}).get("state") == "done"
                   and fleet.status.get(key), 30, message=lambda: node.log()[-3000:])
    assert doc["ret"] == ["went\n", ""] and doc["returncode"] == 0
    requests = [r for r in proxy.taken() if r.path.endswith("/" + key)]
    assert [r.method for r in requests] == ["GET", "PUT", "PUT"], summary(requests)
    assert [r.body["state"] for r in requests[1:]] == ["running", "done"]
    assert requests[2].body["_rev"]  # on top of the mark, as the mark saved it

    # One that ends before its mark: the GET, and the result.
    quick = ops.create_command(fleet, ["true"], [1000])
    wait_for(lambda: (fleet.status.get(result_id(quick, 1000)) or {}).get("state") == "done",
             30, message=lambda: node.log()[-3000:])
    requests = [r for r in proxy.taken() if r.path.endswith("/" + result_id(quick, 1000))]
    assert [r.method for r in requests] == ["GET", "PUT"], summary(requests)


@pytest.mark.slow
def test_a_follower_with_nothing_placed_reads_the_lease_every_few_beats(
        proxy: RecordingProxy, couch_url: str, couch: Couch, dbname: str,
        node_factory: NodeFactory) -> None:
    """Issue 14: every node read ``lease:scheduler`` at every heartbeat, half of a
    fleet's requests, though a node with nothing placed learns nothing from it
    but whether the leader died.  Now it reads it every IDLE_READS beats, and
    every beat again once a placed program exists.  The leader reads it once a
    beat, not twice (its renewal writes on top of what it read)."""
    status_db = couch.database(dbname + "_status")
    leader = behind(proxy, couch_url, node_factory, 999, "--heartbeat-interval", "0.5")
    wait_for(lambda: (status_db.get(SCHEDULER) or {}).get("holder") == "999", 30,
             message=lambda: leader.log()[-3000:])
    follower_proxy = RecordingProxy(urllib.parse.urlsplit(couch_url).port or 5984)
    try:
        follower = behind(follower_proxy, couch_url, node_factory, 1000,
                          "--heartbeat-interval", "0.5")
        status = status_id_of(1000)

        def beats(count: int) -> list[Recorded]:
            return wait_for(lambda: len(to(follower_proxy.taken(), "PUT", status)) >= count
                            and follower_proxy.taken(), 60,
                            message=lambda: follower.log()[-3000:])

        taken = beats(2 * placement.IDLE_READS + 1)
        reads = len(to(taken, "GET", SCHEDULER))
        assert 1 <= reads <= 3, summary(taken)  # beats 1, 7 and 13 at most

        couch.database(dbname).save(placed("agg", code=(
            "import time\ndef main():\n    while not should_quit():\n        time.sleep(0.05)\n")))
        wait_for(lambda: (status_db.get(SCHEDULER) or {}).get("assignments", {}).get("agg"), 30)
        before = len(to(follower_proxy.taken(), "PUT", status))
        reads = len(to(follower_proxy.taken(), "GET", SCHEDULER))
        taken = beats(before + placement.IDLE_READS + 1)
        assert len(to(taken, "GET", SCHEDULER)) - reads >= placement.IDLE_READS - 1, summary(taken)
    finally:
        follower_proxy.close()
    leads = proxy.taken()
    assert len(to(leads, "GET", SCHEDULER)) <= len(to(leads, "PUT", SCHEDULER)) + 1, summary(leads)


@pytest.mark.slow
def test_a_node_reads_its_labels_every_few_beats(
        proxy: RecordingProxy, couch_url: str, couch: Couch, dbname: str, fleet: Fleet,
        node_factory: NodeFactory) -> None:
    """Issue 14: once a program selected nodes by label, every node read its
    ``node:<mac>`` at every heartbeat; now every READ_EVERY heartbeats, and a
    change of labels still takes effect."""
    ops.set_labels(fleet, 1000, room="lab")
    couch.database(dbname).save({
        "_id": "program:lab", "type": "himbeere-program", "name": "lab",
        "targets": {"labels": {"room": "lab"}}, "code": (
            "import time\ndef main():\n    while not should_quit():\n        time.sleep(0.05)\n")})
    node = behind(proxy, couch_url, node_factory, 1000, "--heartbeat-interval", "0.5")
    node.wait_program("program:lab", state="running", timeout=40)
    status, labels = status_id_of(1000), f"node:{1000}"
    start = len(to(proxy.taken(), "PUT", status))
    reads = len(to(proxy.taken(), "GET", labels))
    taken = wait_for(lambda: len(to(proxy.taken(), "PUT", status)) >= start + 2 * READ_EVERY
                     and proxy.taken(), 60, message=lambda: node.log()[-3000:])
    assert 1 <= len(to(taken, "GET", labels)) - reads <= 3, summary(taken)
    ops.set_labels(fleet, 1000, room="")
    wait_for(lambda: node.program("program:lab").get("state") in (None, "stopped"), 40,
             message=lambda: node.log()[-3000:])


def test_a_fleet_command_and_its_polls_read_no_status_documents(
        proxy: RecordingProxy, couch_url: str, fleet: Fleet) -> None:
    """Issue 14: ``himbeere cmd --all`` read every node's status and node
    document (megabytes in a fleet of thousands) to list the nodes it expects,
    and again at each poll of the results, every 250 ms; the ids are enough."""
    for mac in (1001, 1002):
        fleet.status.save({"_id": status_id_of(mac), "type": "himbeere-status", "node": mac,
                           "programs": {"big": {"x": "y" * 1000}}})
    ops.set_labels(fleet, 1003, room="lab")
    parts = urllib.parse.urlsplit(couch_url)
    laptop = Fleet(proxy.url(urllib.parse.unquote(parts.username or ""),
                             urllib.parse.unquote(parts.password or "")),
                   fleet.code.name, fleet.status.name)
    command = ops.create_command(laptop, ["true"], "all")
    assert fleet.code.get(command)["expected"] == [1001, 1002, 1003]  # type: ignore[index]
    answer = ops.command_results(laptop, command)
    assert answer["pending"] == [1001, 1002, 1003]
    for prefix in (STATUS_PREFIX, NODE_PREFIX):
        reads = prefixed_reads(proxy.taken(), prefix)
        assert reads and all("include_docs" not in r.query for r in reads), summary(reads)

"""What a daemon asks the server, counted: a fleet of thousands pays for every request.

A real daemon runs behind :class:`tests.recorder.RecordingProxy`, which keeps
every request it sends; the tests assert on those, never on timings.  Beats
are counted by the lease's PUTs (the leader renews ``lease:scheduler`` once
per heartbeat), not by the clock.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Callable

import pytest

from himbeere.couch import Couch
from himbeere.fleet import placement
from himbeere.fleet.lease import lease_id
from himbeere.schema import NODE_PREFIX, STATUS_PREFIX
from tests.helpers import wait_for
from tests.nodes import Node
from tests.recorder import Recorded, RecordingProxy
from tests.test_scheduler import placed

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

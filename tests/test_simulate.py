"""The fleet simulator sends what a real daemon sends (issue 14).

``benchmarks/simulate.py`` plays thousands of nodes in one process; a
benchmark with it says something about a real fleet only while a simulated
node makes the requests a daemon makes and writes the documents a daemon
writes.  So a real daemon and one simulated node run side by side against
one server, each behind a :class:`~tests.recorder.RecordingProxy` of its
own, and go through the same steps: up (a heartbeat each), a program for
all nodes (``push --all``) reported running, one fleet command answered,
then a few more heartbeats.  Then their traffic is compared, with each
node's MAC id replaced by ``<mac>``:

- the kinds of request (method, path, query keys) are the same;
- per heartbeat, each kind is as frequent (within one request in the window);
- the documents written (status, command result, program log) have the same
  keys, and the ``_changes`` requests the same query keys and filter.

Both are **followers**: ``lease:scheduler`` is held by a third node for
longer than the test, written as the admin.  A leader's extra requests come
from the daemon's own :class:`~himbeere.fleet.placement.Placement`, which the
simulator runs unchanged in its first node; what can drift is what the
simulator writes itself, and every node of a simulated fleet but one is a
follower.

Where they still differ, on purpose:

- start-up: the simulator checks the server once for the whole fleet
  (:func:`~himbeere.couch.design.prepare`) before each node makes the
  daemon's own checks, so it sends ``GET /``, ``GET /<db>`` and the design
  document more often at start; only the window's counts are compared;
- a simulated node is a *restarted* daemon: it catches up on its code
  documents and follows from the current ``seq``; so the daemon here starts
  with a saved ``seq`` (a first start would follow from 0).

Both log in as node users, as in production; the test needs no admin
daemon, so the node-user passes of ``.ci/run`` need not run it again.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere.couch import Couch, Database, Doc
from himbeere.feed import SeqStore
from himbeere.schema import lease_id, log_id, result_id
from himbeere.status import status_id
from tests.conftest import NodeUserFactory, Upload
from tests.helpers import wait_for
from tests.nodes import Node
from tests.recorder import Recorded, RecordingProxy
from uploader import ops
from uploader.fleet import Fleet as Laptop

pytest.importorskip("aiohttp")  # the simulator's client: the ``test`` extra has it

from benchmarks import simulate  # noqa: E402
from himbeere.fleet.placement import IDLE_READS  # noqa: E402

PROGRAM = """\
import time


def main():
    while True:
        time.sleep(1)
"""
#: Heartbeats in the window whose request counts are compared.
WINDOW_BEATS = 7
#: Seconds of a history sample: the ring is written in the window too, not only
#: when the test happens to cross a 5-minute boundary.
HISTORY_INTERVAL = 2.0

Kind = tuple[str, str, tuple[str, ...]]


class SimulatedNode:
    """A one-node :class:`~benchmarks.simulate.Fleet` on an event loop in a thread."""

    def __init__(self, url: str, database: str, mac: int) -> None:
        self.fleet = simulate.Fleet(url, 1, database=database, first_mac=mac, heartbeat=1.0,
                                    history_interval=HISTORY_INTERVAL, leader=False)
        self.error: Optional[BaseException] = None
        self._up = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._done: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> SimulatedNode:
        self._thread.start()
        self._up.wait(60)
        if self.error is not None:
            raise AssertionError(f"the simulated node did not start: {self.error}; "
                                 f"errors: {dict(self.fleet.errors)}") from self.error
        assert self._up.is_set(), "the simulated node's feed never opened"
        return self

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        try:
            await self.fleet.start(connect_timeout=30)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self.error = exc
        self._up.set()
        try:
            if self.error is None:
                await self._done.wait()
        finally:
            await self.fleet.stop()

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the simulated node did not stop"


# -- what was sent, with the MAC id taken out --------------------------------------------
Names = dict[str, str]


def normal(value: Any, mac: int, names: Names) -> Any:
    """``value`` with ``mac`` (number or text) as ``<mac>``, and ``names`` replaced."""
    if isinstance(value, dict):
        return {normal(k, mac, names): normal(v, mac, names) for k, v in value.items()}
    if isinstance(value, list):
        return [normal(v, mac, names) for v in value]
    if isinstance(value, bool):
        return value
    if value == mac:
        return "<mac>"
    if isinstance(value, str):
        for name, placeholder in names.items():
            value = value.replace(name, placeholder)
        return value.replace(str(mac), "<mac>")
    return value


def kind(request: Recorded, mac: int, names: Names) -> Kind:
    return (request.method, normal(request.path, mac, names), tuple(sorted(request.query)))


def kinds(requests: list[Recorded], mac: int, names: Names) -> Counter[Kind]:
    return Counter(kind(r, mac, names) for r in requests)


def beats(requests: list[Recorded], mac: int) -> int:
    """Heartbeats sent: PUTs of the node's status document."""
    return sum(1 for r in requests if r.method == "PUT" and r.path.endswith("/" + status_id(mac)))


def written(requests: list[Recorded], doc_id: str) -> Doc:
    """The last body PUT to ``doc_id``."""
    bodies = [r.body for r in requests if r.method == "PUT" and r.path.endswith("/" + doc_id)]
    assert bodies, f"{doc_id} was never written"
    return dict(bodies[-1])


def keys(doc: Doc) -> set[str]:
    """Top-level keys but ``_rev``: only a document's first write goes without one."""
    return set(doc) - {"_rev"}


def feed_requests(requests: list[Recorded], mac: int, names: Names) -> set[str]:
    """``_changes`` requests: method, query (but ``since``) and body (the filter)."""
    return {json.dumps([r.method, normal({k: v for k, v in r.query.items() if k != "since"},
                                         mac, names), normal(r.body, mac, names)],
                       sort_keys=True)
            for r in requests if r.path.endswith("/_changes")}


def events(log: Doc) -> list[list[str]]:
    """A log document's lines without their times, pids as ``<pid>``."""
    return [[re.sub(r"pid \d+", "pid <pid>", line[1]), *line[2:]] for line in log["lines"]]


def show(counts: Counter[Kind]) -> str:
    return "\n".join(f"  {n:3d}  {' '.join(k[:2])} {','.join(k[2])}"
                     for k, n in sorted(counts.items()))


# -- the steps ---------------------------------------------------------------------------
def lease_held_by_another(status_db: Database, ttl: float = 3600.0) -> None:
    """``lease:scheduler`` held by a third node for longer than the test (as the admin)."""
    now = time.time()
    status_db.save({"_id": lease_id("scheduler"), "type": "himbeere-lease",
                    "name": "scheduler", "holder": "1", "epoch": 1, "since": now,
                    "renewed": now, "expires": now + ttl - 60, "ttl": ttl,
                    "assignments": {}})


def status_of(status_db: Database, mac: int) -> Optional[Doc]:
    return status_db.get(status_id(mac))


def running(status_db: Database, mac: int, doc_id: str) -> bool:
    program = ((status_of(status_db, mac) or {}).get("programs") or {}).get(doc_id) or {}
    return program.get("state") == "running"


def final_result(status_db: Database, command: str, mac: int) -> Optional[Doc]:
    doc = status_db.get(result_id(command, mac))
    return doc if doc and doc.get("state") in ops.FINAL_STATES else None


def credentials(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")


def restarted(state_dir: Path, url: str, database: str, seq: Any) -> Path:
    """A state directory as a daemon leaves it: the feed's ``seq`` saved.

    A simulated node follows from the database's current ``seq`` after
    catching up on its code documents, as a daemon does after a restart (a
    first start would get every command ever made, from ``since=0``).
    """
    SeqStore(state_dir / "seq.json", database, ",".join(sorted(Couch(url).bases))).save(seq)
    return state_dir


#: Requests only the daemon sends, and why the simulator leaves them out.
DAEMON_ONLY: dict[Kind, str] = {}


def test_a_simulated_node_sends_what_a_daemon_sends(
        couch_url: str, dbname: str, node_user: NodeUserFactory,
        node_factory: Callable[..., Node], upload: Upload, tmp_path: Path) -> None:
    admin = Couch(couch_url)
    port = urllib.parse.urlsplit(couch_url).port
    assert port is not None
    code_db, status_db = admin.database(dbname), admin.database(dbname + "_status")
    (daemon_mac, daemon_url), (sim_mac, sim_url) = node_user(), node_user()
    macs = {"daemon": daemon_mac, "simulator": sim_mac}
    lease_held_by_another(status_db)
    to_daemon, to_sim = RecordingProxy(port), RecordingProxy(port)
    sim: Optional[SimulatedNode] = None
    try:
        url = to_daemon.url(*credentials(daemon_url))
        daemon = node_factory(
            mac_id=daemon_mac, url=url, flags=["--history-interval", str(HISTORY_INTERVAL)],
            state_dir=restarted(tmp_path / "state", url, dbname, code_db.info()["update_seq"]))
        sim = SimulatedNode(to_sim.url(*credentials(sim_url)), dbname, sim_mac).start()
        wait_for(lambda: all(status_of(status_db, m) for m in macs.values()), 30,
                 message=lambda: f"no heartbeat of both; daemon log:\n{daemon.log()[-3000:]}")

        source = tmp_path / "everywhere.py"
        source.write_text(PROGRAM)
        code, _, err = upload("push", str(source), "--all", "--name", "everywhere")
        assert code == 0, err
        program = next(row["id"] for row in code_db.all_docs(include_docs=True)
                       if (row.get("doc") or {}).get("targets") == "all")
        for who, mac in macs.items():
            wait_for(lambda m=mac: running(status_db, m, program), 30,
                     message=lambda w=who: f"the {w} never reported {program} running; "
                                           f"daemon log:\n{daemon.log()[-3000:]}")
            wait_for(lambda m=mac: "started" in json.dumps(status_db.get(log_id(m, program))),
                     30, message=lambda w=who: f"the {w} never logged {program}'s start")

        command = ops.create_command(Laptop(couch_url, dbname), ["true"], sorted(macs.values()))
        results = {who: wait_for(lambda m=mac: final_result(status_db, command, m), 30,
                                 message=lambda w=who: f"no result from the {w}")
                   for who, mac in macs.items()}

        # The window: heartbeats after all of that, with nothing new to do.
        start = {"daemon": len(to_daemon.taken()), "simulator": len(to_sim.taken())}
        wait_for(lambda: beats(to_daemon.taken()[start["daemon"]:], daemon_mac) >= WINDOW_BEATS
                 and beats(to_sim.taken()[start["simulator"]:], sim_mac) >= WINDOW_BEATS, 30,
                 message="fewer heartbeats than the window")
        sent = {"daemon": to_daemon.taken(), "simulator": to_sim.taken()}
    finally:
        if sim is not None:
            sim.stop()
        to_daemon.close()
        to_sim.close()

    names = {command: "<cmd>", dbname: "<db>"}
    every = {who: kinds(sent[who], macs[who], names) for who in macs}
    window = {who: sent[who][start[who]:] for who in macs}
    steady = {who: kinds(window[who], macs[who], names) for who in macs}
    picture = (f"daemon:\n{show(every['daemon'])}\nsimulator:\n{show(every['simulator'])}\n"
               f"in the window, daemon:\n{show(steady['daemon'])}\n"
               f"simulator:\n{show(steady['simulator'])}")

    # (a) the same kinds of request
    assert set(every["daemon"]) - set(DAEMON_ONLY) == set(every["simulator"]), picture
    # (b) as often per heartbeat, within one request in the window
    ratio = beats(window["daemon"], daemon_mac) / beats(window["simulator"], sim_mac)
    history = ("PUT", "/<db>_status/history:<mac>", ())
    lease = ("GET", "/<db>_status/lease:scheduler", ())
    for who in macs:
        # Two kinds run on clocks of their own, not per heartbeat, so a beat
        # that comes late (a busy CI machine) shifts their counts: the history
        # ring is written once per bucket crossed, and an idle node reads the
        # lease every IDLE_READS turns of its placement loop (one a second).
        spent = window[who][-1].at - window[who][0].at
        assert 1 <= steady[who][history] <= spent / HISTORY_INTERVAL + 1, (who, spent, picture)
        assert steady[who][lease] <= spent / IDLE_READS + 2, (who, spent, picture)
    for each in set(steady["daemon"]) | set(steady["simulator"]):
        if each not in DAEMON_ONLY and each not in (history, lease):
            assert abs(steady["daemon"][each] - ratio * steady["simulator"][each]) <= 1, (
                each, picture)
    # (c) the same documents, and the same feed
    status = {who: written(sent[who], status_id(macs[who])) for who in macs}
    assert keys(status["daemon"]) == keys(status["simulator"])
    assert status["daemon"]["type"] == status["simulator"]["type"]
    entries = {who: status[who]["programs"][program] for who in macs}
    assert keys(entries["daemon"]) == keys(entries["simulator"])
    assert entries["daemon"]["state"] == entries["simulator"]["state"] == "running"
    answer = {who: written(sent[who], result_id(command, macs[who])) for who in macs}
    assert keys(answer["daemon"]) == keys(answer["simulator"])
    assert answer["daemon"]["type"] == answer["simulator"]["type"]
    for who in macs:
        assert (answer[who]["state"], answer[who]["returncode"]) == ("done", 0), answer[who]
        assert results[who]["state"] == "done", results[who]
    logs = {who: written(sent[who], log_id(macs[who], program)) for who in macs}
    assert keys(logs["daemon"]) == keys(logs["simulator"])
    assert logs["daemon"]["type"] == logs["simulator"]["type"]
    assert events(logs["daemon"]) == events(logs["simulator"]) == [
        ["targets all", "event"], ["started (pid <pid>)", "event"]]
    assert feed_requests(sent["daemon"], daemon_mac, names) == feed_requests(
        sent["simulator"], sim_mac, names)

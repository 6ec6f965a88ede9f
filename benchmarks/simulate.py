"""A fleet simulator: one asyncio process plays N himbeere nodes against a real server.

Real daemons cost about 40 MB each, so 200 of them fill a 2-core laptop and a
fleet benchmark with them measures the laptop more than the server.  A
simulated node costs a few kilobytes and makes the HTTP traffic a daemon
makes, with the same requests, documents and intervals:

- its own continuous ``_changes`` feed, filtered to its MAC id (a
  ``_selector`` on CouchDB, the design document's filter on pouchdb-server),
  opened as the daemon opens it: the database checked, the code documents
  caught up, then the feed;
- its heartbeat: ``status:<mac>`` every ``heartbeat`` seconds, with the
  daemon's fields (health figures of this machine), and its history ring;
- the scheduler lease read at each heartbeat; the first node runs the
  daemon's own :class:`~himbeere.fleet.placement.Placement` (and rollout
  driver) in a thread, so the lease is taken and renewed as a fleet does;
- a program's log lines at ``log_rate`` lines a second, shipped once a
  second;
- a command answered with a result document; a program document for it
  "run" (reported as running in its status, its start in its log), and
  stopped when deleted;
- its labels read (``node:<mac>``) once a program selects nodes by label.

It cannot drift from the daemon, because it builds nothing itself: every
request comes from :mod:`himbeere.couch` (:meth:`Database.prepare`,
:meth:`Database.follow_request`), the filter from
:func:`himbeere.couch.design.node_filter`, the status document from
:meth:`himbeere.status.Status.document`, a program's entry from
:meth:`himbeere.programs.Program.describe`, log documents from
:func:`himbeere.logship.add_lines`, the history from
:class:`himbeere.history.History`, and which documents a node takes from
:func:`himbeere.schema.for_node` and :func:`~himbeere.schema.targets_labels`.
``tests/test_simulate.py`` runs a real daemon and a simulated node side by
side and compares what each sent.

What it does not do: run code (a program "runs" at once), or open a
connection per thread as the daemon does: simulated nodes share one pool of
keep-alive connections, besides a connection each for their feeds.

Run it alone to watch a fleet (``--help``); ``bench_scale.py`` drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import socket
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import yarl  # noqa: E402

from himbeere import codedoc, defaults  # noqa: E402
from himbeere.couch import Couch, Database, Doc, Prepared, Seq, design, doc_path  # noqa: E402
from himbeere.fleet.placement import IDLE_READS, Placement  # noqa: E402
from himbeere.fleet.rollout import Driver  # noqa: E402
from himbeere.fleet.targeting import READ_EVERY, labels_of, selects_labels  # noqa: E402
from himbeere.health import Health  # noqa: E402
from himbeere.history import History  # noqa: E402
from himbeere.logship import BATCH_SECONDS, EVENT, add_lines  # noqa: E402
from himbeere.programs import Program  # noqa: E402
from himbeere.recheck import RECHECK_HEARTBEATS  # noqa: E402
from himbeere.schema import (  # noqa: E402
    COMMAND_TYPE,
    RESULT_TYPE,
    ProgramState,
    commands_id,
    for_node,
    history_id,
    iso,
    lease_id,
    log_id,
    node_id,
    result_id,
    targets_labels,
)
from himbeere.status import MIN_GAP, Status  # noqa: E402

log = logging.getLogger("simulate")

#: The first simulated MAC id: far from any real Pi's (those are 48-bit).
FIRST_MAC = 1 << 50
#: What a simulated command prints.
OUTPUT = "simulated\n"


class Conflict(Exception):
    """409 from the server."""


class HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text[:200]}")
        self.status = status


class Wire:
    """Sends :class:`Prepared` requests with aiohttp; counts them by kind."""

    def __init__(self, couch: Couch, session: aiohttp.ClientSession) -> None:
        server = couch.current
        self.base = server.base.rstrip("/")
        self.auth = dict(server.http.headers)  # Accept and the Basic credentials
        self.session = session
        self.sent: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def url(self, target: str) -> yarl.URL:
        return yarl.URL(f"{self.base}/{target}", encoded=True)  # the couch layer quoted it

    async def send(self, request: Prepared, kind: str, ok404: bool = False) -> Any:
        self.sent[kind] += 1
        headers = {**self.auth, **request.headers}
        try:
            async with self.session.request(request.method, self.url(request.target),
                                            data=request.body, headers=headers) as answer:
                body = await answer.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.failed[kind] += 1
            raise
        if answer.status == 404 and ok404:
            return None
        if answer.status == 409:
            raise Conflict(kind)
        if answer.headers.get("Content-Encoding", "") in ("gzip", "deflate"):
            # The session leaves bodies as sent (auto_decompress=False); a server
            # compresses large ones (the root document, a design document, programs).
            body = zlib.decompress(body, wbits=zlib.MAX_WBITS | 32)
        if answer.status >= 400:
            self.failed[kind] += 1
            raise HTTPError(answer.status, body.decode("utf-8", "replace"))
        return json.loads(body) if body else None


class Fleet:
    """N simulated nodes; ``await start()``, then measure, then ``await stop()``."""

    def __init__(self, url: Union[str, list[str]], nodes: int, *, database: str = defaults.DATABASE,
                 status_database: Optional[str] = None,
                 heartbeat: float = defaults.HEARTBEAT_INTERVAL,
                 feed_timeout: float = defaults.FEED_TIMEOUT, log_rate: float = 0.0,
                 first_mac: int = FIRST_MAC, leader: bool = True,
                 placement: type[Placement] = Placement, idle_reads: int = IDLE_READS,
                 label_reads: int = READ_EVERY,
                 history_interval: float = defaults.HISTORY_INTERVAL) -> None:
        #: Several URLs (a cluster's nodes): node i uses URL i % len, as a lab would
        #: spread its Pis over a cluster by listing its servers in turn.
        self.urls = [url] if isinstance(url, str) else list(url)
        self.couch = Couch(self.urls[0])
        self.db = self.couch.database(database)
        self.status_db = self.couch.database(status_database or database + "_status")
        self.heartbeat = heartbeat
        self.feed_timeout = feed_timeout
        self.log_rate = log_rate
        self.history_interval = history_interval
        self.macs = [first_mac + i for i in range(nodes)]
        self.leader = leader
        #: The scheduler the first node runs, and how often an idle node reads
        #: the lease: as the daemon does, unless a benchmark replays older code.
        self.placement = placement
        self.idle_reads = idle_reads
        self.label_reads = label_reads
        self.health = Health()
        self._health: Doc = {}
        self._health_at = 0.0
        self.nodes: list[Node] = []
        self.latencies: list[float] = []  # seconds per heartbeat PUT
        self.lags: list[float] = []  # seconds the event loop woke up late
        #: doc id -> mac -> perf_counter() when it arrived, was reported running, answered.
        self.delivered: dict[str, dict[int, float]] = {}
        self.reported: dict[str, dict[int, float]] = {}
        self.answered: dict[str, dict[int, float]] = {}
        self.errors: Counter[str] = Counter()
        self._placement: Optional[Placement] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._feeds: Optional[aiohttp.ClientSession] = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.wires: list[Wire] = []
        self.connected = 0
        self.selector = False  # the server's _changes takes a _selector

    # -- shared ----------------------------------------------------------------------
    def health_fields(self) -> Doc:
        """This machine's health figures, read at most once a second for all nodes."""
        now = time.monotonic()
        if now - self._health_at > 1.0:
            self._health = self.health.collect()
            self._health_at = now
        return self._health

    def mark(self, table: dict[str, dict[int, float]], doc_id: str, mac: int) -> None:
        table.setdefault(doc_id, {}).setdefault(mac, time.perf_counter())

    async def until_all(self, table: dict[str, dict[int, float]], doc_id: str,
                        timeout: float, count: Optional[int] = None) -> float:
        """perf_counter() when the last of ``count`` nodes got there (TimeoutError if not)."""
        wanted = len(self.macs) if count is None else count
        deadline = time.monotonic() + timeout
        while len(table.get(doc_id, {})) < wanted:
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError(
                    f"{doc_id}: {len(table.get(doc_id, {}))} of {wanted} nodes in {timeout} s")
            await asyncio.sleep(0.01)
        return max(table[doc_id].values())

    # -- running ---------------------------------------------------------------------
    async def start(self, connect_timeout: float = 300.0) -> None:
        """Open every node's feed and start its heartbeats; return once all feeds are open."""
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        feed_filter = await loop.run_in_executor(None, self._prepare_server)
        since = await loop.run_in_executor(None, lambda: self.db.info()["update_seq"])
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False)
        # The feeds get a pool of their own: in one pool with thousands of open
        # feeds, a heartbeat's PUT waited a second for a connection (1000 nodes).
        self._feeds = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        self.wires = [Wire(Couch(url), self._session) for url in self.urls]
        for index, mac in enumerate(self.macs):
            node = Node(self, mac, feed_filter(mac), since,
                        follows_lease=not (self.leader and index == 0),
                        wire=self.wires[index % len(self.wires)])
            self.nodes.append(node)
        if self.leader:
            self._placement = self._leader_placement(self.macs[0])
            self._placement.start()
        self._tasks.append(asyncio.ensure_future(self._watch_lag()))
        # Spread the nodes' beats over one interval, as daemons started at random times are.
        for node in self.nodes:
            self._tasks.append(asyncio.ensure_future(node.run(random.random())))
        deadline = time.monotonic() + connect_timeout
        while self.connected < len(self.nodes):
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError(
                    f"{self.connected} of {len(self.nodes)} feeds open in {connect_timeout} s")
            await asyncio.sleep(0.05)

    async def _watch_lag(self) -> None:
        """How late this process's event loop wakes up: if that grows, the
        simulator, not the server, is what makes requests slow."""
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - began - 0.01)

    def _prepare_server(self) -> Callable[[int], Any]:
        design.prepare(self.db, self.couch)  # a clear error before any node starts
        self.selector = self.couch.supports_selector()
        return lambda mac: design.node_filter(self.couch, mac)

    def _leader_placement(self, mac: int) -> Placement:
        """The daemon's own scheduler for the first node: it takes and renews the lease."""
        first = self.nodes[0]
        return self.placement(
            self.status_db, self.db, mac, self.heartbeat, on_assigned=lambda *_: None,
            clock=self.couch.server_time, last_heartbeat=lambda: first.last_write,
            on_lead=Driver(self.status_db, str(mac), clock=self.couch.server_time).drive)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._placement is not None:
            placement = self._placement
            await asyncio.get_running_loop().run_in_executor(None, placement.stop)
        for session in (self._session, self._feeds):
            if session is not None:
                await session.close()

    def requests(self) -> Counter[str]:
        """Requests sent so far, by kind."""
        total: Counter[str] = Counter()
        for wire in self.wires:
            total.update(wire.sent)
        return total


class Node:
    """One simulated node: a feed, heartbeats, logs, commands and "programs"."""

    def __init__(self, fleet: Fleet, mac: int, feed_filter: Any, since: Seq,
                 follows_lease: bool, wire: Wire) -> None:
        self.fleet = fleet
        self.wire = wire
        self.mac = mac
        self.feed_filter = feed_filter
        self.since = since
        self.follows_lease = follows_lease
        self.programs: dict[str, Program] = {}
        self.placed: set[str] = set()  # placed programs known: the lease is read each beat
        self.status = Status(fleet.status_db, mac, fleet.heartbeat, programs=self.snapshot,
                             extra=self.extra)
        self.history = _History(fleet.status_db, mac, fleet.history_interval)
        self.status_rev: Optional[str] = None
        self.last_write: Optional[float] = None
        self.labels: Optional[dict[str, str]] = None
        self.labels_wanted = False
        self.logs: dict[str, Doc] = {}  # log id -> the document as last written
        self.pending: dict[str, list[tuple[Any, ...]]] = {}  # program -> lines to ship
        self.names: dict[str, str] = {}  # program -> its name
        self.poke = asyncio.Event()
        self.started = False  # the first connection's checks are done

    def snapshot(self) -> dict[str, Any]:
        return {doc_id: program.describe() for doc_id, program in self.programs.items()}

    def extra(self) -> Doc:
        return dict(self.fleet.health_fields(),
                    placement={"leader": not self.follows_lease, "fenced": False,
                               "assigned": [], "refused": {}},
                    upgrade=None)  # himbeere.upgrade: no upgrade yet

    async def run(self, phase: float) -> None:
        """The daemon's threads as tasks: feed, status, placement, recheck (and a program)."""
        loops = [self.follow(), self.beat(phase), self.follow_lease(random.random()),
                 self.recheck(), self.ship_logs()]
        if self.fleet.log_rate > 0:
            loops.append(self.chatter())
        tasks = [asyncio.ensure_future(loop) for loop in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    # -- the feed -----------------------------------------------------------------------
    async def follow(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  - a node reconnects, as the daemon does
                self.fleet.errors[f"feed: {type(exc).__name__}"] += 1
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 30.0)

    async def _follow_once(self) -> None:
        fleet = self.fleet
        await self._prepare()
        catch_up = design.node_filter(fleet.couch, self.mac, code_only=True)
        answer = await self.wire.send(_changes(fleet.db, catch_up), "catch up")
        for change in answer.get("results", []):
            if not change.get("deleted"):
                await self.deliver(change)
        request = fleet.db.follow_request(self.since, self.feed_filter, fleet.feed_timeout)
        self.wire.sent["feed"] += 1
        timeout = aiohttp.ClientTimeout(total=None, sock_read=fleet.feed_timeout)
        headers = {**self.wire.auth, **request.headers}
        assert fleet._feeds is not None
        async with fleet._feeds.request(request.method, self.wire.url(request.target),
                                          data=request.body, headers=headers,
                                          timeout=timeout) as answer:
            if answer.status >= 400:
                raise HTTPError(answer.status, (await answer.read()).decode())
            fleet.connected += 1
            try:
                async for line in answer.content:
                    if not line.strip():
                        continue
                    change = json.loads(line)
                    if "last_seq" in change and "id" not in change:
                        break
                    await self.deliver(change)
                    if "seq" in change:
                        self.since = change["seq"]
            finally:
                fleet.connected -= 1

    async def _prepare(self) -> None:
        """What a daemon's feed sends before each connection (:func:`design.prepare`),
        and its first connection's check of the status database (``Daemon._connected``)."""
        fleet = self.fleet
        if not self.started:
            await self.wire.send(fleet.couch.prepare("GET", ""), "server info")
        await self.wire.send(fleet.db.prepare("GET"), "db exists")
        if not fleet.selector:  # ensure_design reads the filter's design document
            await self.wire.send(fleet.db.prepare("GET", doc_path(design.DESIGN_ID)), "design")
        if not self.started:
            await self.wire.send(fleet.status_db.prepare("GET"), "db exists", ok404=True)
            self.started = True

    async def deliver(self, change: Doc) -> None:
        doc = change.get("doc") or ({"_id": change.get("id"), "_deleted": True}
                                    if change.get("deleted") else None)
        if doc is None or str(doc.get("_id", "")).startswith("_design/"):
            return
        doc_id = str(doc["_id"])
        self.fleet.mark(self.fleet.delivered, doc_id, self.mac)
        if doc.get("_deleted"):
            self.placed.discard(doc_id)
            if self.programs.pop(doc_id, None) is not None:
                self.poke.set()
            return
        if not for_node(doc, self.mac):
            return
        kind = doc.get("type")
        if kind == COMMAND_TYPE or kind == commands_id(self.mac):
            asyncio.ensure_future(self.answer(doc))
        elif codedoc.is_placed(doc):
            self.placed.add(doc_id)  # the leader places it; the lease is read every beat
            return
        else:
            await self.take_program(doc)

    # -- programs -----------------------------------------------------------------------
    async def take_program(self, doc: Doc) -> None:
        if codedoc.is_targeted(doc):
            if selects_labels(doc) and not self.labels_wanted:
                self.labels_wanted = True
                await self.read_labels()
            if not targets_labels(doc.get("targets"), self.mac, self.labels):
                return
        parsed = codedoc.parse(doc)  # never raises: a bad one has ``error`` set
        doc_id = str(doc["_id"])
        program = Program(parsed, "")
        program.state = ProgramState.RUNNING
        program.pid = random.randint(1000, 60000)
        program.started = time.time()
        self.programs[doc_id] = program
        why = (f"targets {doc.get('targets')}" if codedoc.is_targeted(doc) else "started")
        self.log_line(doc_id, parsed.name, why, EVENT)
        self.log_line(doc_id, parsed.name, f"started (pid {program.pid})", EVENT)
        self.poke.set()

    async def read_labels(self) -> None:
        try:
            found = await self.wire.send(
                self.fleet.status_db.prepare("GET", doc_path(node_id(self.mac))), "labels",
                ok404=True)
        except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
            return
        self.labels = labels_of(found)

    # -- commands -----------------------------------------------------------------------
    async def answer(self, doc: Doc) -> None:
        """A result as the daemon writes one: into the status db (fleet) or the command."""
        now = time.time()
        fields = {"started": iso(now), "state": "done", "returncode": 0,
                  "ret": [OUTPUT, ""], "finished": iso(now), "duration": 0.001,
                  "node": self.mac}
        if doc.get("type") == COMMAND_TYPE:
            command = str(doc["_id"])
            doc_id = result_id(command, self.mac)
            result: Doc = {"_id": doc_id, "type": RESULT_TYPE, "command": command,
                           "node": self.mac, "cmd": doc.get("cmd"), **fields}
            db = self.fleet.status_db
            try:  # the daemon's exactly-once check: has this node answered it already?
                if await self.wire.send(db.prepare("GET", doc_path(doc_id)), "result",
                                        ok404=True) is not None:
                    return
            except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
                self.fleet.errors["result"] += 1
                return
        else:
            if "ret" in doc:
                return  # answered already
            doc_id = str(doc["_id"])
            result = dict(doc, **fields)
            db = self.fleet.db
        try:
            await self.wire.send(db.prepare("PUT", doc_path(doc_id), body=result), "result")
        except Conflict:
            return  # answered before (the feed may deliver a command twice)
        except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
            self.fleet.errors["result"] += 1
            return
        self.fleet.mark(self.fleet.answered, str(doc["_id"]), self.mac)

    # -- heartbeats ---------------------------------------------------------------------
    async def beat(self, phase: float) -> None:
        """:meth:`Status.run`: a write each interval, and soon after a program changes."""
        await asyncio.sleep(phase * self.fleet.heartbeat)
        poked = False
        while True:
            await self.write_status(timed=not poked)
            poked = False
            try:
                await asyncio.wait_for(self.poke.wait(), self.fleet.heartbeat)
                poked = True
                await asyncio.sleep(MIN_GAP)  # a burst of changes in one write
            except asyncio.TimeoutError:
                pass
            self.poke.clear()

    async def follow_lease(self, phase: float) -> None:
        """:meth:`Placement.loop` of a node that does not schedule: labels, then the lease."""
        fleet = self.fleet
        await asyncio.sleep(phase * fleet.heartbeat)
        every = self.fleet.idle_reads
        skipped = every  # the first heartbeat reads the lease
        label_beats = 0
        while True:
            if self.labels_wanted:  # NodeLabels.refresh()
                label_beats += 1
                if label_beats >= self.fleet.label_reads:
                    label_beats = 0
                    await self.read_labels()
            # Placement.idle(): a simulated node never schedules, runs a placed
            # program or takes part in a staged rollout; it only knows of placed ones.
            idle = not self.placed
            if self.follows_lease and idle and skipped < every - 1:
                skipped += 1
            elif self.follows_lease:
                skipped = 0
                try:
                    await self.wire.send(
                        fleet.status_db.prepare("GET", doc_path(lease_id("scheduler"))),
                        "lease", ok404=True)
                except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
                    fleet.errors["lease"] += 1
            await asyncio.sleep(fleet.heartbeat)

    async def recheck(self) -> None:
        """:class:`~himbeere.recheck.Recheck`: own programs' documents, every few beats."""
        fleet = self.fleet
        while True:
            await asyncio.sleep(RECHECK_HEARTBEATS * fleet.heartbeat)
            own = sorted(d for d, p in self.programs.items() if not p.doc.placed)
            if not own:
                continue
            try:
                await self.wire.send(fleet.db.prepare("GET", "_all_docs", params={
                    "keys": own, "include_docs": True}), "recheck")
            except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
                fleet.errors["recheck"] += 1

    async def write_status(self, timed: bool) -> None:
        doc = self.status.document()
        if self.status_rev is not None:
            doc["_rev"] = self.status_rev
        request = self.fleet.status_db.prepare("PUT", doc_path(doc["_id"]), body=doc)
        started = time.perf_counter()
        try:
            saved = await self.wire.send(request, "heartbeat")
        except Conflict:
            fresh = await self.wire.send(
                self.fleet.status_db.prepare("GET", doc_path(doc["_id"])), "heartbeat", ok404=True)
            self.status_rev = fresh["_rev"] if fresh else None
            return
        except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
            self.fleet.errors["heartbeat"] += 1
            return
        done = time.perf_counter()
        self.status_rev = saved["rev"]
        self.last_write = time.monotonic()
        if timed:
            self.fleet.latencies.append(done - started)
        for doc_id, program in self.programs.items():
            if program.state is ProgramState.RUNNING:
                self.fleet.mark(self.fleet.reported, doc_id, self.mac)
        self.history.add(doc)
        if self.history.due:
            await self.write_history()

    async def write_history(self) -> None:
        """:meth:`History.save`: the stored ring read before the first write."""
        self.history.due = False
        try:
            if not self.history.loaded:
                self.history.take_over(await self.wire.send(
                    self.fleet.status_db.prepare("GET", doc_path(history_id(self.mac))),
                    "history", ok404=True))
            doc = self.history.document()
            saved = await self.wire.send(
                self.fleet.status_db.prepare("PUT", doc_path(doc["_id"]), body=doc), "history")
            self.history.saved(saved["rev"])
        except (Conflict, HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
            self.fleet.errors["history"] += 1

    # -- logs ---------------------------------------------------------------------------
    def log_line(self, program: str, name: str, text: str, kind: Optional[str] = None) -> None:
        line = (time.time(), text, kind) if kind else (time.time(), text)
        self.pending.setdefault(program, []).append(line)
        self.names[program] = name

    async def chatter(self) -> None:
        """A program printing ``log_rate`` lines a second."""
        program, name = "sim", "sim"
        carry = random.random()
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            carry += self.fleet.log_rate * BATCH_SECONDS
            for _ in range(int(carry)):
                self.log_line(program, name, "a line of a simulated program")
            carry -= int(carry)

    async def ship_logs(self) -> None:
        """:class:`~himbeere.logship.LogShipper`: pending lines every BATCH_SECONDS,
        the events of a program's start too."""
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            await self.ship()

    async def ship(self) -> None:
        for program, lines in list(self.pending.items()):
            if not lines:
                continue
            self.pending[program] = []
            doc_id = log_id(self.mac, program)
            known: Optional[Doc] = self.logs.get(doc_id, {})  # LogShipper._write
            for _attempt in range(5):
                doc = dict(known, _id=doc_id) if known is not None else None
                if doc is None:
                    doc = await self.wire.send(
                        self.fleet.status_db.prepare("GET", doc_path(doc_id)), "log",
                        ok404=True) or {"_id": doc_id}
                add_lines(doc, self.mac, program, self.names.get(program, program), lines)
                try:
                    saved = await self.wire.send(
                        self.fleet.status_db.prepare("PUT", doc_path(doc_id), body=doc), "log")
                except Conflict:
                    known = None
                    continue
                except (HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
                    self.fleet.errors["log"] += 1
                    break
                doc["_rev"] = saved["rev"]
                self.logs[doc_id] = doc
                break


class _History(History):
    """The daemon's history ring; its reads and writes go through the simulator's client."""

    due = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def save(self) -> None:
        self.due = True  # written by the node's task, which reads the stored ring first
        self._unsaved = False

    def saved(self, rev: str) -> None:
        self._rev = rev
        self.writes += 1


def _changes(db: Database, feed_filter: Any) -> Prepared:
    """A normal ``_changes`` request, as :meth:`Database.changes` sends it."""
    query: dict[str, Any] = {"include_docs": True, "since": 0}
    query.update(feed_filter.params)
    if feed_filter.selector is not None:
        return db.prepare("POST", "_changes", params=query,
                          body={"selector": feed_filter.selector})
    return db.prepare("GET", "_changes", params=query)


def raise_fd_limit() -> None:
    """Thousands of feeds need thousands of sockets: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(args: argparse.Namespace) -> None:
    fleet = Fleet(args.server, args.nodes, database=args.database, heartbeat=args.heartbeat,
                  log_rate=args.log_rate)
    started = time.perf_counter()
    await fleet.start()
    print(f"{args.nodes} nodes connected in {time.perf_counter() - started:.1f} s "
          f"on {socket.gethostname()}", flush=True)
    try:
        await asyncio.sleep(args.seconds)
    finally:
        await fleet.stop()
    lat, lags = sorted(fleet.latencies), sorted(fleet.lags)
    print(json.dumps({"requests": dict(fleet.requests()), "errors": dict(fleet.errors),
                      "heartbeats": len(lat),
                      "heartbeat_ms_median": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
                      "loop_lag_ms_median": round(lags[len(lags) // 2] * 1000, 2) if lags else None,
                      "loop_lag_ms_p99": round(lags[int(len(lags) * 0.99)] * 1000, 2)
                      if lags else None}, indent=2))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="CouchDB URL with credentials")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--database", default=defaults.DATABASE)
    parser.add_argument("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL)
    parser.add_argument("--log-rate", type=float, default=0.0,
                        help="lines a second each node's program prints (default 0)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()

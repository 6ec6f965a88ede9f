"""Edge sites (issue 15): a push from the centre to a site node, and a site's catch-up.

Run from the checkout::

    .venv/bin/python benchmarks/bench_sites.py --json-out sites.json

It starts two single-node Apache CouchDB 3.5.2 servers from
``.cache/couchdb-3.5.2`` (``start.sh``, free loopback ports, data in a
temporary directory): the *central* server and a site's *relay*, pinned to
CPU 0 and CPU 1 with one Erlang scheduler each (two machines, as far as two
cores allow).  A :class:`tests.wan.WanLink` is the WAN between them: the
relay reaches the centre only through it.  ``uploader.sites.add_site`` makes
the site (its replications, with :data:`uploader.sites.REPLICATOR_SETTINGS`).
Everything started here is stopped at the end, after an error too.

push to running on a site node
    one real daemon (``python -m himbeere daemon``, heartbeat 1 s) with
    ``server = <relay>,<central>``.  ``--pushes`` times, the PUT of a new
    revision of its program document at the CENTRAL server, timed from the
    PUT's start to the UDP datagram the new revision's ``main()`` sends
    first (no heartbeat in the path).  ``replication_ms`` is the PUT's start
    to the revision's arrival on this process's continuous ``_changes`` feed
    of the relay; ``node_ms`` the rest (the daemon's feed on the relay, the
    old program's stop, the new one's start).  On a loaded machine this
    process's feed may wake after the daemon's: a sample's split can then be
    a few ms off, ``node_ms`` even below 0; the total is not affected.
catch-up after a cut
    ``--nodes`` simulated nodes (``benchmarks/simulate.py``, the daemon's own
    requests) heartbeat against the relay every ``--heartbeat`` seconds.  The
    WAN is cut; during the cut ``--commands`` fleet commands are written at
    the relay (``uploader.ops.create_command``) and every node answers each
    (``result:<cmd>:<mac>``, the daemon's fields), so results and heartbeats
    wait on the relay.  After ``--cut`` seconds the WAN is restored: the time
    until the central server holds every result and, for every node, the
    heartbeat it last wrote at the relay before the restore.  ``--rounds``
    rounds with the tuned replicator, then ``--default-rounds`` with CouchDB's
    defaults written back (``max_history`` 20, ``interval`` 60000 ms).
    ``--default-replicator``: every round with CouchDB's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import (  # noqa: E402
    PROGRAM,
    Arrivals,
    BenchError,
    Daemon,
    UdpListener,
    percentile,
)
from benchmarks.bench_fleet import git_tree  # noqa: E402
from benchmarks.bench_scale import Servers  # noqa: E402
from benchmarks.simulate import FIRST_MAC, Fleet  # noqa: E402
from himbeere import defaults, schema  # noqa: E402
from himbeere.exceptions import HimbeereError  # noqa: E402
from tests.wan import WanLink  # noqa: E402
from uploader import ops, sites, users  # noqa: E402
from uploader.fleet import Fleet as Laptop  # noqa: E402
from uploader.install import setup  # noqa: E402

SITE = "bench"
CENTRAL_CPU, RELAY_CPU = 0, 1
#: The issue's target for a push from the centre to a running program at a site.
TARGET_PUSH_MEDIAN_MS = 1000.0
#: CouchDB 3.5.2's own replicator settings (``couch_replicator_scheduler``: 20
#: events of history, a reschedule every 60 s), written back for the default rounds.
COUCHDB_REPLICATOR_DEFAULTS = {"max_history": "20", "interval": "60000"}
#: Seconds to wait for one push, and for a catch-up before calling it lost.
PUSH_TIMEOUT = 60.0
CATCH_UP_TIMEOUT = 900.0
POLL = 0.1  # how often the central server is read during a catch-up


# -- figures ------------------------------------------------------------------------
def summary(values: list[float], digits: int = 1) -> dict[str, Any]:
    """n, median, p99 (linear between ranks), min and max of ``values``."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "p99": round(percentile(values, 0.99), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def with_auth(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# -- the relay's feed ---------------------------------------------------------------
class RevisionWatcher:
    """This process's continuous ``_changes`` feed of one database, for some documents:
    records ``"<id> <rev>"`` with the :func:`time.perf_counter` of its arrival."""

    def __init__(self, db_url: str, doc_ids: list[str]) -> None:
        self.arrivals = Arrivals()
        self._stop = threading.Event()
        self._response: Optional[requests.Response] = None
        self._opened = threading.Event()
        self.error: Optional[BaseException] = None
        since = requests.get(db_url, timeout=10).json()["update_seq"]
        params = {"feed": "continuous", "since": since, "heartbeat": "1000",
                  "filter": "_doc_ids", "doc_ids": json.dumps(doc_ids)}
        self._thread = threading.Thread(target=self._run, args=(db_url, params),
                                        name="relay-feed", daemon=True)
        self._thread.start()
        if not self._opened.wait(10):
            raise BenchError(f"cannot follow {redact(db_url)}/_changes")
        if self.error is not None:
            raise BenchError(f"cannot follow {redact(db_url)}/_changes: {self.error}")

    def _run(self, db_url: str, params: dict[str, str]) -> None:
        try:
            with requests.get(f"{db_url}/_changes", params=params, stream=True,
                              timeout=(5, 30)) as response:
                response.raise_for_status()
                self._response = response
                self._opened.set()
                for line in response.iter_lines(chunk_size=1 << 16):
                    when = time.perf_counter()
                    if self._stop.is_set():
                        return
                    if line.strip():
                        change = json.loads(line)
                        for rev in change.get("changes") or []:
                            self.arrivals.record(f"{change.get('id')} {rev['rev']}", when)
        except Exception as exc:  # the wait for an arrival times out and says so
            self.error = exc
            self._opened.set()

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            try:
                self._response.close()
            except Exception:
                pass


# -- the two servers and the site -----------------------------------------------------
class Site:
    """Central server, relay, the WAN between them and the site ``bench``; ``close()``
    stops all of it."""

    def __init__(self, workdir: Path, macs: list[int], pin: bool) -> None:
        self.servers: list[Servers] = []
        self.wan: Optional[WanLink] = None
        try:
            erl_flags = "+S 1:1" if pin else ""  # one scheduler for the one core
            self.servers.append(Servers(1, workdir / "central", erl_flags))
            self.servers.append(Servers(1, workdir / "relay", erl_flags))
            if pin:
                self.servers[0].pin(CENTRAL_CPU)
                self.servers[1].pin(RELAY_CPU)
            self.central_url = self.servers[0].admin_urls()[0]
            self.relay_url = self.servers[1].admin_urls()[0]
            self.wan = WanLink(int(self.central_url.rsplit(":", 1)[1]))
            self.central = Laptop(self.central_url)
            self.relay = Laptop(self.relay_url)
            self.passwords = self._make(macs)
        except BaseException:
            self.close()
            raise

    def _make(self, macs: list[int]) -> dict[int, str]:
        """Set the centre up, provision the nodes, and make the site as ``site add`` does."""
        setup(self.central)
        passwords = {}
        for mac in macs:
            passwords[mac] = secrets.token_hex(8)
            users.provision(self.central, mac, password=passwords[mac])
        assert self.wan is not None
        report = sites.add_site(self.central, SITE, self.relay_url,
                                nodes=",".join(str(mac) for mac in macs),
                                central_url=self.wan.url(self.central_url))
        print(f"bench: site {SITE}: {len(report['changes'])} change(s), "
              f"{len(report['nodes'])} node(s)", file=sys.stderr)
        return passwords

    def node_server(self, mac: int) -> str:
        """A site node's ``server`` line: the relay, then the centre."""
        relay = with_auth(self.relay_url, str(mac), self.passwords[mac])
        return f"{relay},{redact(self.central_url)}"

    def replicator(self, settings: dict[str, str]) -> dict[str, str]:
        """Write ``settings`` into the relay's ``[replicator]``; returns what it now has."""
        couch = self.relay.couch
        for key, value in settings.items():
            couch.configure("replicator", key, value)
        return self.replicator_config()

    def replicator_config(self) -> dict[str, str]:
        found = self.relay.couch.request("GET", "_node/_local/_config/replicator") or {}
        return {key: found[key] for key in ("max_history", "interval") if key in found}

    def close(self) -> None:
        if self.wan is not None:
            self.wan.close()
        for server in reversed(self.servers):
            server.stop()


# -- 1. push to running -------------------------------------------------------------
def pushes(site: Site, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Time ``--pushes`` central writes of one running program until its new revision runs."""
    mac = args.mac_id
    udp = UdpListener()
    daemon = Daemon(site.node_server(mac), defaults.DATABASE, workdir / "daemon", mac, 1.0)
    doc_id = f"bench-sites-{mac}"
    relay_db = f"{site.relay_url}/{defaults.DATABASE}"
    watcher = RevisionWatcher(relay_db, [doc_id])
    central_db = f"{site.central_url}/{defaults.DATABASE}"
    session = requests.Session()
    total: list[float] = []
    replication: list[float] = []
    node: list[float] = []
    try:
        (workdir / "daemon").mkdir()
        daemon.start()
        rev: Optional[str] = None
        for index in range(-args.warmup, args.pushes):
            token = f"{'w' if index < 0 else 'p'}{abs(index)}"
            doc: dict[str, Any] = {"type": mac, "name": "bench-sites",
                                   "code": PROGRAM.format(token=token, port=udp.port)}
            if rev is not None:
                doc["_rev"] = rev
            time.sleep(args.gap)
            start = time.perf_counter()
            answer = session.put(f"{central_db}/{doc_id}", data=json.dumps(doc), timeout=30)
            if answer.status_code not in (201, 202):
                raise BenchError(f"PUT {doc_id}: {answer.status_code} {answer.text}")
            rev = str(answer.json()["rev"])
            try:
                running = udp.arrivals.wait(f"up {token}", PUSH_TIMEOUT)
                at_relay = watcher.arrivals.wait(f"{doc_id} {rev}", 1.0)
            except BenchError as exc:
                raise BenchError(f"push {token}: {exc}; daemon log:\n"
                                 f"{daemon.log_tail()}") from None
            if index >= 0:  # the warm-up pushes start the program and the fork server
                total.append(1000 * (running - start))
                replication.append(1000 * (at_relay - start))
                node.append(1000 * (running - at_relay))
            print(f"bench: push {token}: {1000 * (running - start):.0f} ms "
                  f"(relay after {1000 * (at_relay - start):.0f} ms)", file=sys.stderr)
    finally:
        watcher.close()
        exit_code = daemon.stop()
        udp.close()
    result = {"pushes": len(total), "heartbeat_interval_s": 1.0, "gap_s": args.gap,
              "total_ms": summary(total), "replication_ms": summary(replication),
              "node_ms": summary(node), "samples_ms": [round(t, 1) for t in total],
              "daemon_exit_code": exit_code}
    median = result["total_ms"].get("median")
    result["target"] = {"median_ms_at_most": TARGET_PUSH_MEDIAN_MS, "value": median,
                        "met": median is not None and median <= TARGET_PUSH_MEDIAN_MS}
    return result


# -- 2. catch-up after a cut -----------------------------------------------------------
def all_docs(db_url: str, keys: list[str], include_docs: bool = False) -> list[dict[str, Any]]:
    answer = requests.post(f"{db_url}/_all_docs", params={"include_docs": json.dumps(
        include_docs)}, json={"keys": keys}, timeout=30)
    answer.raise_for_status()
    return list(answer.json()["rows"])


def present(rows: list[dict[str, Any]]) -> set[str]:
    return {row["key"] for row in rows
            if "error" not in row and not (row.get("value") or {}).get("deleted")}


def heartbeats(db_url: str, macs: list[int]) -> dict[int, float]:
    """Each node's ``heartbeat_time`` in ``status:<mac>`` (0: none)."""
    rows = all_docs(db_url, [schema.status_id(mac) for mac in macs], include_docs=True)
    found = {}
    for mac, row in zip(macs, rows):
        found[mac] = float((row.get("doc") or {}).get("heartbeat_time") or 0.0)
    return found


async def catch_up_round(site: Site, fleet: Fleet, macs: list[int],
                         args: argparse.Namespace) -> dict[str, Any]:
    """One cut of ``--cut`` s with results written meanwhile; the catch-up after it."""
    loop = asyncio.get_running_loop()
    relay = Laptop(site.relay_url)
    central_status = f"{site.central_url}/{defaults.DATABASE}{defaults.STATUS_SUFFIX}"
    relay_status = f"{site.relay_url}/{defaults.DATABASE}{defaults.STATUS_SUFFIX}"
    assert site.wan is not None
    site.wan.cut()
    cut_at = time.monotonic()
    commands = []
    for _ in range(args.commands):
        commands.append(await loop.run_in_executor(
            None, lambda: ops.create_command(relay, ["true"], macs)))
    for command in commands:
        await fleet.until_all(fleet.answered, command, max(30.0, args.cut))
    results = [schema.result_id(command, mac) for command in commands for mac in macs]
    written = len(present(await loop.run_in_executor(None, all_docs, relay_status, results)))
    if written != len(results):
        raise BenchError(f"only {written} of {len(results)} results at the relay")
    await asyncio.sleep(max(0.0, args.cut - (time.monotonic() - cut_at)))
    # What waits: every result, and each node's newest heartbeat at the relay.
    newest = await loop.run_in_executor(None, heartbeats, relay_status, macs)
    states = await loop.run_in_executor(None, sites.replication_states, site.relay.couch, SITE)
    site.wan.restore()
    restored = time.perf_counter()
    cut_s = time.monotonic() - cut_at
    done: dict[str, Optional[float]] = {"results": None, "heartbeats": None, "first": None}
    arrived = 0
    while None in (done["results"], done["heartbeats"]):
        if time.perf_counter() - restored > CATCH_UP_TIMEOUT:
            raise BenchError(f"no catch-up within {CATCH_UP_TIMEOUT:g} s: {arrived} of "
                             f"{len(results)} results, {done}")
        await asyncio.sleep(POLL)
        now = time.perf_counter() - restored
        rows = await loop.run_in_executor(None, all_docs, central_status, results)
        arrived = len(present(rows))
        if arrived and done["first"] is None:
            done["first"] = now
        if done["results"] is None and arrived == len(results):
            done["results"] = now
        if done["heartbeats"] is None:
            central = await loop.run_in_executor(None, heartbeats, central_status, macs)
            if all(central[mac] >= newest[mac] > 0 for mac in macs):
                done["heartbeats"] = now
    total = max(done["results"] or 0.0, done["heartbeats"] or 0.0)
    print(f"bench: catch-up {total:.1f} s (results {done['results']:.1f} s, "
          f"heartbeats {done['heartbeats']:.1f} s)", file=sys.stderr)
    return {"catch_up_s": round(total, 2), "results_s": round(done["results"] or 0.0, 2),
            "heartbeats_s": round(done["heartbeats"] or 0.0, 2),
            "first_result_s": round(done["first"] or 0.0, 2), "cut_s": round(cut_s, 1),
            "results": len(results), "commands": len(commands),
            # How the relay's scheduler saw its replications just before the restore.
            "replications_at_restore": {doc_id: _state(doc) for doc_id, doc in states.items()}}


def _state(doc: Optional[dict[str, Any]]) -> Optional[str]:
    if doc is None:
        return None
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    error = (info or {}).get("error") or doc.get("error_count")
    error = " ".join(str(error or "").split())  # Erlang terms come over several lines
    return f"{doc.get('state')}" + (f" ({error})" if error else "")


async def catch_ups(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    macs = [FIRST_MAC + i for i in range(args.nodes)]
    fleet = Fleet(site.relay_url, args.nodes, heartbeat=args.heartbeat)
    await fleet.start(connect_timeout=120)
    central_status = f"{site.central_url}/{defaults.DATABASE}{defaults.STATUS_SUFFIX}"
    loop = asyncio.get_running_loop()
    kinds = (["default"] * args.rounds if args.default_replicator else ["tuned"] * args.rounds)
    kinds += ["default"] * args.default_rounds
    found: dict[str, Any] = {}
    try:
        # Every node known centrally before the first cut.
        deadline = time.monotonic() + 120
        while not all((await loop.run_in_executor(
                None, heartbeats, central_status, macs)).values()):
            if time.monotonic() > deadline:
                raise BenchError("the central server never saw every node's heartbeat")
            await asyncio.sleep(1)
        for index, kind in enumerate(kinds):
            settings = (sites.REPLICATOR_SETTINGS if kind == "tuned"
                        else COUCHDB_REPLICATOR_DEFAULTS)
            config = await loop.run_in_executor(None, site.replicator, dict(settings))
            await asyncio.sleep(args.settle)
            print(f"bench: round {index + 1} of {len(kinds)} ({kind} replicator {config}): "
                  f"cutting the WAN for {args.cut:g} s", file=sys.stderr)
            entry = found.setdefault(kind, {"replicator": config, "rounds": []})
            entry["rounds"].append(await catch_up_round(site, fleet, macs, args))
        errors = dict(fleet.errors)
    finally:
        await fleet.stop()
    for entry in found.values():
        for figure in ("catch_up_s", "results_s", "heartbeats_s", "first_result_s"):
            entry[figure] = summary([r[figure] for r in entry["rounds"]], 2)
    return {"nodes": args.nodes, "heartbeat_s": args.heartbeat, "cut_s": args.cut,
            "commands": args.commands, "results": args.commands * args.nodes,
            "simulator_errors": errors, **found}


# -- main ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-sites-"))
    load_before = os.getloadavg()
    code = git_tree()  # what runs, before anyone commits meanwhile
    macs = [args.mac_id] + [FIRST_MAC + i for i in range(args.nodes)]
    try:
        site = Site(workdir, macs, pin=not args.no_pin)
        try:
            push = pushes(site, args, workdir) if args.pushes else {}
            catch_up = asyncio.run(catch_ups(site, args)) if args.rounds or \
                args.default_rounds else {}
        finally:
            site.close()
    finally:
        if args.keep:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "bench_sites",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "server": "Apache CouchDB 3.5.2: two single-node servers (central, relay) on "
                  "loopback, a WanLink (tests/wan.py) between them",
        "pinned": None if args.no_pin else {"central_cpu": CENTRAL_CPU,
                                            "relay_cpu": RELAY_CPU, "erl_flags": "+S 1:1"},
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "kernel": platform.release(),
                    "python": f"{platform.python_implementation()} "
                              f"{platform.python_version()}",
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "code": code,
        "tuned_replicator_settings": dict(sites.REPLICATOR_SETTINGS),
        "couchdb_replicator_defaults": dict(COUCHDB_REPLICATOR_DEFAULTS),
        "push_to_running": push,
        "catch_up": catch_up,
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=20,
                        help="central pushes to the site node, measured (default 20; 0: none)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured pushes first (default 2)")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds between pushes, so each starts quiet (default 1)")
    parser.add_argument("--mac-id", type=int, default=7710, help="the daemon's MAC id (7710)")
    parser.add_argument("--nodes", type=int, default=50,
                        help="simulated site nodes in the catch-up (default 50)")
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="their heartbeat, seconds (default 5; the daemon's is 10)")
    parser.add_argument("--commands", type=int, default=4,
                        help="fleet commands written at the relay during a cut, each "
                        "answered by every node (default 4: 200 results of 50 nodes)")
    parser.add_argument("--cut", type=float, default=60.0,
                        help="seconds the WAN stays cut (default 60)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="catch-up rounds with the tuned replicator (default 3)")
    parser.add_argument("--default-rounds", type=int, default=1,
                        help="then rounds with CouchDB's default replicator settings (1)")
    parser.add_argument("--default-replicator", action="store_true",
                        help="do not apply REPLICATOR_SETTINGS: every round with CouchDB's "
                        "defaults")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds before each cut (default 10)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers to a CPU each")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (servers' data, daemon log)")
    args = parser.parse_args(argv)
    if min(args.pushes, args.warmup, args.rounds, args.default_rounds) < 0:
        parser.error("--pushes, --warmup, --rounds and --default-rounds must be >= 0")
    if args.nodes < 1 or args.commands < 1 or args.cut <= 0 or args.heartbeat <= 0:
        parser.error("--nodes and --commands must be >= 1, --cut and --heartbeat > 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM stops what was started, as Ctrl-C does (the stdlib's handler raises
    # KeyboardInterrupt, and every start above has its stop in a finally).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run(args)
    except (BenchError, HimbeereError, OSError, requests.RequestException,
            subprocess.CalledProcessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

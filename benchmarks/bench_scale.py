"""What one CouchDB server (or a 3-node cluster) carries: a simulated fleet of N nodes.

Run from the checkout::

    .venv/bin/python benchmarks/bench_scale.py --nodes 100,500,1000,2000
    .venv/bin/python benchmarks/bench_scale.py --cluster 3 --nodes 100,500,1000,2000

It starts Apache CouchDB 3.5.2 from ``.cache/couchdb-3.5.2`` (tests/servers.py
unpacks it from ``../shared/couchdb``): one node, or ``--cluster N`` nodes,
on loopback, with data in a temporary directory.  The server's processes are
pinned to CPU 0 (``taskset``) and this process, which plays the fleet with
``benchmarks/simulate.py``, to CPU 1, so each has its own core.  It sets up
the databases as ``himbeere-upload setup`` does, then for each N:

steady state
    the fleet connected (every feed open), ``--warmup`` seconds to settle,
    then ``--window`` seconds measured: the server's CPU share of one core
    (utime+stime of every server process, ``/proc/<pid>/stat``), its memory
    (VmRSS summed), the heartbeat write latency (each PUT of
    ``status:<mac>``: median and p99), the requests a second the fleet made,
    and how many continuous feeds the server holds (CouchDB's
    ``httpd/clients_requesting_changes``).
command to all
    ``--rounds`` times :func:`uploader.ops.create_command` with ``targets:
    "all"`` (what ``himbeere cmd --all -- true`` does) until the last of the
    N result documents is written; median and p99.
a program for many nodes
    ``--rounds`` times one PUT of a ``program:<name>`` document targeting a
    label every node has, until every node has reported it running in its
    status document (``reported``) and until the last node's feed delivered
    it (``delivered``); median and p99.  Each is deleted after its round.

It writes one JSON object (``--json-out``) and, with ``--chart PREFIX``,
two PNG charts (matplotlib): server CPU against N, and command and push
times against N, one line per server kind found in the JSON files given with
``--plot``.  It cleans up: the servers it started are stopped, by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.simulate import Fleet  # noqa: E402
from himbeere import defaults  # noqa: E402
from himbeere.couch import Couch  # noqa: E402
from himbeere.fleet.placement import IDLE_READS, Placement  # noqa: E402
from himbeere.fleet.targeting import READ_EVERY  # noqa: E402
from himbeere.schema import NODE_PREFIX, PROGRAM_TYPE, STATUS_PREFIX  # noqa: E402
from himbeere.status import Status  # noqa: E402
from tests.cluster import free_base_port  # noqa: E402
from tests.servers import ensure_couchdb  # noqa: E402
from uploader import ops  # noqa: E402
from uploader.fleet import Fleet as Laptop  # noqa: E402
from uploader.install import setup  # noqa: E402

ADMIN = ("admin", "password")
LABEL = {"bench": "scale"}
SERVER_CPU = 0
FLEET_CPU = 1


# -- servers -------------------------------------------------------------------------
class Servers:
    """One CouchDB, or a cluster, started from the release's scripts; stopped by stop()."""

    def __init__(self, nodes: int, workdir: Path, erl_flags: str = "") -> None:
        self.home = ensure_couchdb()
        # Read by the Erlang VM at start (erlexec honours ERL_FLAGS).
        env = dict(os.environ, ERL_FLAGS=erl_flags) if erl_flags else None
        self.workdir = workdir
        self.cluster = nodes > 1
        if self.cluster:
            base = free_base_port(nodes)  # below the ephemeral ports the fleet's sockets use
            out = subprocess.run([str(self.home / "start-cluster.sh"), str(nodes), str(base),
                                  str(workdir)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                subprocess.run([str(self.home / "stop-cluster.sh"), str(workdir)],
                               capture_output=True, check=False)
                raise RuntimeError(f"start-cluster.sh failed: {out.stderr[-2000:]}")
            self.urls = [line.strip() for line in out.stdout.splitlines()
                         if line.strip().startswith("http")]
            self.dirs = [workdir / f"node{i}" for i in range(1, nodes + 1)]
        else:
            port = free_base_port(1)
            subprocess.run([str(self.home / "start.sh"), str(port), str(workdir)], check=True,
                           capture_output=True, env=env)
            self.urls = [f"http://127.0.0.1:{port}"]
            self.dirs = [workdir]
        self.pids = [int((d / "couchdb.pid").read_text()) for d in self.dirs]

    def admin_urls(self) -> list[str]:
        out = []
        for url in self.urls:
            parts = urllib.parse.urlsplit(url)
            out.append(f"{parts.scheme}://{ADMIN[0]}:{ADMIN[1]}@{parts.netloc}")
        return out

    def pin(self, cpu: int) -> None:
        for pid in self.pids:
            subprocess.run(["taskset", "-a", "-pc", str(cpu), str(pid)], check=False,
                           capture_output=True)

    def processes(self) -> list[int]:
        """The servers and their children: ``couchjs`` runs every validate_doc_update
        and JavaScript filter in a process of its own, whose CPU the beam's
        ``/proc/<pid>/stat`` does not count while it lives."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], list(self.pids)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far by process name (``beam.smp``, ``couchjs``, ...)."""
        total: dict[str, float] = {}
        for pid in self.processes():
            try:
                head, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            except OSError:
                continue  # a couchjs that ended: its time went to the beam's cutime
            fields, name = rest.split(), head.split("(", 1)[1]
            # utime, stime, and the children's that ended (cutime, cstime)
            seconds = sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")
            total[name] = total.get(name, 0.0) + seconds
        return total

    def rss_mb(self) -> float:
        total = 0.0
        for pid in self.processes():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        return round(total, 1)

    def open_feeds(self, couch: Couch) -> int:
        total = 0
        for url in self.admin_urls():
            stats = Couch(url).request("GET", "_node/_local/_stats/couchdb/httpd/"
                                       "clients_requesting_changes") or {}
            total += int(stats.get("value") or 0)
        return total

    def request_time(self) -> dict[str, Any]:
        """The server's own request time (ms) over its last 10 s, first node's view."""
        stats = Couch(self.admin_urls()[0]).request(
            "GET", "_node/_local/_stats/couchdb/request_time") or {}
        value = stats.get("value") or {}
        percentiles = dict((int(p), round(v, 1)) for p, v in value.get("percentile") or [])
        return {"n": value.get("n"), "median": percentiles.get(50),
                "p99": percentiles.get(99)}

    def stop(self) -> None:
        script = "stop-cluster.sh" if self.cluster else "stop.sh"
        subprocess.run([str(self.home / script), str(self.workdir)], check=False,
                       capture_output=True)


# -- before issue 14 ---------------------------------------------------------------
class PlacementBefore(Placement):
    """The scheduler as it was before issue 14, for the figures before the fixes.

    It read every status and node document at every heartbeat, nothing
    placed or not, and read the lease a second time to renew it.
    """

    def schedule(self, current: Any, now: float) -> Any:
        self._prefixed(STATUS_PREFIX)
        self._prefixed(NODE_PREFIX)
        return super().schedule(current, now)

    def idle(self) -> bool:
        return False

    def _beat(self) -> None:
        acquire = self.lease.acquire
        self.lease.acquire = lambda known=None, **fields: acquire(**fields)  # type: ignore
        try:
            super()._beat()
        finally:
            self.lease.acquire = acquire  # type: ignore


# -- one size ------------------------------------------------------------------------
def summary(samples: list[float], scale: float = 1000.0) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(samples), "median": round(statistics.median(ordered) * scale, 1),
            "p99": round(p99 * scale, 1), "max": round(ordered[-1] * scale, 1)}


async def measure(servers: Servers, n: int, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    urls = servers.admin_urls()
    laptop = Laptop(urls[0])
    await loop.run_in_executor(None, label_nodes, laptop, n, args.first_mac)
    if args.aged:
        await loop.run_in_executor(None, age_statuses, laptop, n, args.first_mac, args.aged)
    fleet = Fleet(urls, n, heartbeat=args.heartbeat, log_rate=args.log_rate,
                  feed_timeout=args.feed_timeout,
                  first_mac=args.first_mac, leader=not args.no_leader,
                  placement=PlacementBefore if args.before else Placement,
                  idle_reads=1 if args.before else IDLE_READS,
                  label_reads=1 if args.before else READ_EVERY)
    began = time.perf_counter()
    await fleet.start(connect_timeout=600)
    connected_s = time.perf_counter() - began
    try:
        await asyncio.sleep(args.warmup)
        fleet.latencies.clear()
        fleet.lags.clear()
        sent0 = sum(fleet.requests().values())
        cpu0, wall0, own0 = servers.cpu_seconds(), time.monotonic(), os.times()
        await asyncio.sleep(args.window)
        cpu1, wall1, own1 = servers.cpu_seconds(), time.monotonic(), os.times()
        simulator = (own1.user + own1.system - own0.user - own0.system) / (wall1 - wall0)
        sent1 = sum(fleet.requests().values())
        shares = {name: round((cpu1[name] - cpu0.get(name, 0.0)) / (wall1 - wall0), 3)
                  for name in cpu1}
        steady = {
            "server_cpu_share": round(sum(shares.values()), 3),
            "server_cpu_by_process": shares,
            "server_rss_mb": servers.rss_mb(),
            # Near 1, the simulator (one core) is what limits, not the server.
            "simulator_cpu_share": round(simulator, 3),
            "heartbeat_ms": summary(list(fleet.latencies)),
            "server_request_ms": await loop.run_in_executor(None, servers.request_time),
            "simulator_loop_lag_ms": summary(list(fleet.lags)),
            "requests_per_s": round((sent1 - sent0) / (wall1 - wall0), 1),
            "open_feeds": await loop.run_in_executor(None, servers.open_feeds, laptop.couch),
        }
        print(f"  steady: {json.dumps(steady)}", file=sys.stderr, flush=True)
        commands: list[float] = []
        timeouts: dict[str, list[int]] = {"command": [], "program": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            command = await loop.run_in_executor(
                None, lambda: ops.create_command(laptop, ["true"], "all"))
            try:
                last = await fleet.until_all(fleet.answered, command, args.round_timeout)
                commands.append(last - start)
            except asyncio.TimeoutError:  # recorded: how many answered in time
                timeouts["command"].append(len(fleet.answered.get(command, {})))
            await asyncio.sleep(args.gap)
        reported: list[float] = []
        delivered: list[float] = []
        for index in range(args.rounds):
            doc_id = f"program:bench-scale-{index}"
            doc = {"_id": doc_id, "type": PROGRAM_TYPE, "name": f"bench-scale-{index}",
                   "code": "def main():\n    pass\n", "targets": {"labels": LABEL},
                   "restart": "never"}
            start = time.perf_counter()
            await loop.run_in_executor(None, laptop.code.save, doc)
            try:
                delivered.append(await fleet.until_all(fleet.delivered, doc_id,
                                                       args.round_timeout) - start)
                reported.append(await fleet.until_all(fleet.reported, doc_id,
                                                      args.round_timeout) - start)
            except asyncio.TimeoutError:
                timeouts["program"].append(len(fleet.reported.get(doc_id, {})))
            await loop.run_in_executor(None, laptop.code.delete, doc)
            await asyncio.sleep(args.gap + args.heartbeat)  # the deletion reported
        errors = dict(fleet.errors)
    finally:
        await fleet.stop()
    return {"nodes": n, "connected_s": round(connected_s, 1), **steady,
            "command_to_all_ms": summary(commands),
            "program_reported_ms": summary(reported),
            "program_delivered_ms": summary(delivered),
            # Rounds not done within --round-timeout: how many nodes had answered.
            "timed_out_rounds": timeouts,
            "requests": dict(fleet.requests()), "errors": errors}


def age_statuses(laptop: Laptop, n: int, first_mac: int, revisions: int) -> None:
    """Status documents as a fleet leaves them after ``revisions`` heartbeats each.

    Written with ``new_edits: false`` and a made-up revision path, in one
    request per 500 nodes: the server keeps as many of the revisions as its
    ``_revs_limit`` says, as it would have after that many real writes.
    """
    docs = []
    for mac in range(first_mac, first_mac + n):
        if laptop.status.get(f"status:{mac}") is not None:
            continue
        doc = Status(laptop.status, mac, 10.0, programs=lambda: {}).document()
        ids = [secrets.token_hex(16) for _ in range(revisions)]
        doc.update(_rev=f"{revisions}-{ids[0]}", _revisions={"start": revisions, "ids": ids})
        docs.append(doc)
    for start in range(0, len(docs), 500):
        laptop.status.couch.request("POST", f"{laptop.status.path}/_bulk_docs",
                                    body={"docs": docs[start:start + 500], "new_edits": False})


def label_nodes(laptop: Laptop, n: int, first_mac: int) -> None:
    """``node:<mac>`` documents with the benchmark's label, as `himbeere label` writes."""
    docs = []
    for mac in range(first_mac, first_mac + n):
        current = laptop.status.get(f"node:{mac}")
        if current is None:
            docs.append({"_id": f"node:{mac}", "type": "himbeere-node", "node": mac,
                         "labels": dict(LABEL)})
    for start in range(0, len(docs), 500):
        laptop.status.couch.request("POST", f"{laptop.status.path}/_bulk_docs",
                                    body={"docs": docs[start:start + 500]})


# -- charts --------------------------------------------------------------------------
def chart(results: list[dict[str, Any]], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        sizes = [s["nodes"] for s in result["sizes"]]
        ax.plot(sizes, [100 * s["server_cpu_share"] for s in result["sizes"]], marker="o",
                label=result["server"])
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="target: 50 %")
    ax.set_xlabel("simulated nodes")
    ax.set_ylabel("server CPU, % of one core")
    ax.set_title(f"Server CPU at steady state (heartbeat {results[0]['heartbeat_s']:g} s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{prefix}-cpu.png", dpi=100)
    written.append(f"{prefix}-cpu.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        sizes = [s["nodes"] for s in result["sizes"]]
        for key, name in (("command_to_all_ms", "command to all"),
                          ("program_reported_ms", "program running on all")):
            ax.plot(sizes, [s[key].get("median", float("nan")) / 1000 for s in result["sizes"]],
                    marker="o", label=f"{name} ({result['server']})")
    ax.axhline(3, color="grey", linestyle="--", linewidth=1, label="target: 3 s")
    ax.set_xlabel("simulated nodes")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Command and push to every node")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(f"{prefix}-times.png", dpi=100)
    written.append(f"{prefix}-times.png")
    return written


def _cell(size: dict[str, Any], key: str, scale: float = 1.0, digits: int = 0,
          kind: str = "") -> str:
    """``median / p99`` of one figure; how far a timed-out round got instead."""
    figure = size[key]
    missed = size.get("timed_out_rounds", {}).get(kind) or []
    if missed and not figure.get("n"):
        return f"timed out ({max(missed)} of {size['nodes']})"
    if not figure.get("n"):
        return "-"
    return f"{figure['median'] * scale:.{digits}f} / {figure['p99'] * scale:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """The figures as an reStructuredText table, for docs/sizing.rst."""
    head = ("server", "nodes", "server CPU", "RSS MB", "heartbeat ms median / p99",
            "command to all s median / p99", "program on all s median / p99")
    rows = [head]
    for result in results:
        for size in result["sizes"]:
            rows.append((result["server"].replace("CouchDB 3.5.2, ", ""), str(size["nodes"]),
                         f"{100 * size['server_cpu_share']:.0f} %", f"{size['server_rss_mb']:.0f}",
                         _cell(size, "heartbeat_ms"),
                         _cell(size, "command_to_all_ms", 1e-3, 1, "command"),
                         _cell(size, "program_reported_ms", 1e-3, 1, "program")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows[1:]]
    return "\n".join(lines + [rule])


# -- main ----------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    servers = Servers(args.cluster, workdir / "data", args.erl_flags)
    try:
        servers.pin(SERVER_CPU)
        try:
            os.sched_setaffinity(0, {FLEET_CPU})
        except OSError:
            pass
        laptop = Laptop(servers.admin_urls()[0])
        setup(laptop)
        if args.experiment == "no-autoupdate":  # ken does not index the status db's view
            ddoc = laptop.status.get("_design/himbeere") or {}
            laptop.status.save(dict(ddoc, options={"autoupdate": False}))
        elif args.experiment == "no-status-ddoc":  # no view, no validate_doc_update
            laptop.status.delete(laptop.status.get("_design/himbeere") or {})
        if args.revs_limit or args.before:
            laptop.status.set_revs_limit(args.revs_limit or 1000)
        sizes = []
        for n in args.nodes:
            print(f"{n} nodes ...", file=sys.stderr, flush=True)
            size = await measure(servers, n, args)
            print(json.dumps(size), file=sys.stderr, flush=True)
            sizes.append(size)
            # The server ends a closed feed only when it next writes to it:
            # wait, so that the next size does not pay for this one's feeds.
            deadline = time.monotonic() + 120
            while servers.open_feeds(laptop.couch) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(1)
        return {
            "benchmark": "bench_scale",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "server": ("CouchDB 3.5.2, " + (f"{args.cluster}-node cluster" if args.cluster > 1
                                            else "single node")
                       + (", before issue 14" if args.before else "")),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, load {os.getloadavg()}",
            "heartbeat_s": args.heartbeat, "log_rate": args.log_rate,
            "feed_timeout_s": args.feed_timeout,
            "aged_revisions": args.aged, "status_revs_limit": args.revs_limit
            or (1000 if args.before else defaults.STATUS_REVS_LIMIT),
            "leader": not args.no_leader, "before_issue_14": args.before,
            "experiment": args.experiment, "erl_flags": args.erl_flags,
            "warmup_s": args.warmup, "window_s": args.window, "rounds": args.rounds,
            "pinned": {"server_cpu": SERVER_CPU, "fleet_cpu": FLEET_CPU},
            "sizes": sizes,
        }
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="100,500,1000,2000",
                        type=lambda text: [int(n) for n in text.split(",") if n])
    parser.add_argument("--cluster", type=int, default=1, help="CouchDB nodes (default 1)")
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--log-rate", type=float, default=0.0)
    parser.add_argument("--feed-timeout", type=float, default=defaults.FEED_TIMEOUT,
                        help="the nodes' feed_timeout; the server sends a feed's empty "
                        "line every third of it (default 30: every 10 s)")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap", type=float, default=1.0)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--first-mac", type=int, default=1 << 50)
    parser.add_argument("--aged", type=int, default=1000, metavar="REVISIONS",
                        help="start from status documents with this many revisions, as a "
                        "fleet leaves them after running a while (default 1000: 3 hours of "
                        "10 s heartbeats); 0: fresh documents")
    parser.add_argument("--revs-limit", type=int, default=0,
                        help="the status database's _revs_limit instead of setup's")
    parser.add_argument("--before", action="store_true",
                        help="as before issue 14's fixes: _revs_limit 1000, every node reads "
                        "the lease (and its labels) every beat, the leader every status "
                        "document")
    parser.add_argument("--erl-flags", default="+S 1:1",
                        help="the server's Erlang VM flags (default '+S 1:1': one scheduler "
                        "for the one core it is pinned to; '' for CouchDB's own)")
    parser.add_argument("--experiment", choices=["no-autoupdate", "no-status-ddoc"],
                        help="change the server's setup to see what a part of it costs")
    parser.add_argument("--no-leader", action="store_true",
                        help="no node takes the scheduler lease (to see what the leader costs)")
    parser.add_argument("--json-out")
    parser.add_argument("--chart", metavar="PREFIX", help="write PREFIX-cpu.png, -times.png")
    parser.add_argument("--table", action="store_true",
                        help="print the figures as an reStructuredText table")
    parser.add_argument("--plot", nargs="*", default=[],
                        help="JSON results to chart beside this run's (or instead: --nodes '')")
    args = parser.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.plot]
    if args.nodes:
        result = asyncio.run(run(args))
        text = json.dumps(result, indent=2)
        print(text)
        if args.json_out:
            Path(args.json_out).write_text(text + "\n")
        results.append(result)
    if args.table and results:
        print(table(results))
    if args.chart and results:
        for path in chart(results, args.chart):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Benchmark failover: how long a placed program is gone when its node dies.

Run from the checkout (``python benchmarks/bench_failover.py``).  Without
``--couch-url`` it starts an in-memory pouchdb-server of its own (needs
scripts/install-pouchdb-server).  It starts ``--nodes`` daemons (3) with
distinct MAC ids, as tests/nodes.py does, saves one placed program
(``"type": "himbeere-placed"``), and then, ``--runs`` times (7):

1. waits until the program runs on some node X (its ``main()`` sends the
   datagram ``up <node> <pid>`` to this process);
2. kills X's daemon with SIGKILL (t0);
3. waits for ``up`` from another node (t1): **failover = t1 - t0**; the old
   instance's ``down`` datagram (sent when it quits, which a program of a
   killed daemon does at once) must come before it;
4. starts X's daemon again and waits until it is alive, so that every run
   starts from the same fleet.

It prints one JSON object: the failover time's median, p99, min and max in
seconds and in heartbeat intervals, how soon the old instance stopped, and
``overlaps`` (runs in which the new instance started before the old one
stopped: must be 0).  All times are :func:`time.perf_counter` in this
process.  Expect about 6 to 8 heartbeat intervals: a node is dead after 6
(:data:`himbeere.health.DEAD_AFTER`), then the leader's and the new node's
next heartbeats follow (see :mod:`himbeere.fleet.placement`).

It cleans up after itself: daemons get SIGTERM, only processes it started
are killed, and its two databases are deleted.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import (  # noqa: E402
    BenchError,
    bench_main,
    open_server,
    percentile,
    redact,
    server_info,
)
from himbeere import health  # noqa: E402
from himbeere.couch import Couch  # noqa: E402
from tests.nodes import Node  # noqa: E402
from tests.servers import create_database, delete_database  # noqa: E402

#: In heartbeat intervals: longest wait for one failover, or for a node to come up.
STEP_INTERVALS = 30.0

PROGRAM = """\
import os
import socket
import threading


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(("up %s %s" % (node, os.getpid())).encode(), ("127.0.0.1", {port}))
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
    sock.sendto(("down %s %s" % (node, os.getpid())).encode(), ("127.0.0.1", {port}))
"""




class Datagrams:
    """Every ``up``/``down`` datagram with its arrival time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[float, str, int, int]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="udp", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(256)
            except OSError:
                return
            when = time.perf_counter()
            kind, node, pid = data.decode().split()
            with self._cond:
                self.seen.append((when, kind, int(node), int(pid)))
                self._cond.notify_all()

    def wait(self, kind: str, after: float, timeout: float,
             not_node: Optional[int] = None) -> tuple[float, int, int]:
        """The first ``kind`` datagram that arrived after ``after``: (time, node, pid)."""
        def find() -> Optional[tuple[float, int, int]]:
            for when, what, node, pid in self.seen:
                if what == kind and when > after and node != not_node:
                    return when, node, pid
            return None

        with self._cond:
            if not self._cond.wait_for(find, timeout):
                raise BenchError(f"no {kind!r} datagram (not from {not_node}) within "
                                 f"{timeout:g} s")
            found = find()
            assert found is not None
            return found

    def close(self) -> None:
        self.sock.close()


def stats(values: list[float], unit: float = 1.0) -> dict[str, Any]:
    scaled = [v / unit for v in values]
    if not scaled:
        return {"n": 0}
    return {"n": len(scaled), "median": round(statistics.median(scaled), 3),
            "p99": round(percentile(scaled, 0.99), 3), "min": round(min(scaled), 3),
            "max": round(max(scaled), 3), "mean": round(statistics.fmean(scaled), 3)}


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.workdir = workdir
        self.interval = args.heartbeat_interval
        self.database = f"bench_failover_{secrets.token_hex(4)}"
        self.couch = Couch(url)
        self.status_db = self.couch.database(self.database + "_status")
        self.udp = Datagrams()
        self.macs = [args.mac_id + i for i in range(args.nodes)]
        self.nodes: dict[int, Node] = {}
        self.dead: list[Node] = []
        self.created: list[str] = []
        self.samples: list[dict[str, Any]] = []

    def node(self, mac: int) -> Node:
        node = Node(self.url, self.database, self.workdir / f"state-{mac}", mac,
                    flags=["--heartbeat-interval", f"{self.interval:g}"])
        self.nodes[mac] = node
        return node.start()

    def alive(self, mac: int, since: float) -> bool:
        """True once ``mac`` is alive with a heartbeat from a daemon started after ``since``."""
        status = self.status_db.get(f"status:{mac}") or {}
        now = self.couch.server_time()
        return (health.node_state(status, now) == "alive"
                and float(status.get("uptime") or 1e9) < time.time() - since + 1.0)

    def wait_alive(self, mac: int, since: float) -> None:
        deadline = time.monotonic() + STEP_INTERVALS * self.interval
        while not self.alive(mac, since):
            if time.monotonic() >= deadline:
                raise BenchError(f"node {mac} did not come up:\n{self.nodes[mac].log()[-3000:]}")
            time.sleep(0.1)

    def setup(self) -> None:
        for name in (self.database, self.database + "_status"):
            create_database(self.url, name)
            self.created.append(name)
        started = time.time()
        for mac in self.macs:
            self.node(mac)
        for mac in self.macs:
            self.wait_alive(mac, started)
        self.couch.database(self.database).save({
            "_id": "bench-placed", "type": "himbeere-placed", "name": "bench-placed",
            "code": PROGRAM.replace("{port}", str(self.udp.port))})

    def run_once(self, index: int, after: float) -> float:
        timeout = STEP_INTERVALS * self.interval
        _, victim, old_pid = self.udp.wait("up", after, timeout)
        time.sleep(self.args.settle)  # running steadily, heartbeats written
        killed = time.perf_counter()
        self.nodes[victim].kill()
        self.dead.append(self.nodes[victim])
        up, new_node, new_pid = self.udp.wait("up", killed, timeout, not_node=victim)
        try:
            down = self.udp.wait("down", killed, timeout / 3)[0]
        except BenchError:
            down = None
        sample = {"run": index, "killed_node": victim, "new_node": new_node,
                  "failover_s": round(up - killed, 3),
                  "old_stopped_s": None if down is None else round(down - killed, 3),
                  "overlap": down is not None and down > up}
        self.samples.append(sample)
        print(f"bench: run {index}: {victim} -> {new_node} in {up - killed:.2f} s",
              file=sys.stderr)
        restarted = time.time()
        self.node(victim)  # the fleet is whole again for the next run
        self.wait_alive(victim, restarted)
        return up - 1e-6

    def cleanup(self) -> None:
        try:
            for node in list(self.nodes.values()) + self.dead:
                try:
                    if node.alive():
                        node.stop()
                finally:
                    node.kill_programs()
        finally:
            self.udp.close()
            for name in self.created:
                try:
                    delete_database(self.url, name)
                except Exception as exc:
                    print(f"bench: could not delete database {name}: {exc}", file=sys.stderr)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="failovers measured (default 7)")
    parser.add_argument("--nodes", type=int, default=3, help="node daemons (default 3)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="the daemons' heartbeat, seconds (default 1)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds the program runs before its node is killed (1)")
    parser.add_argument("--couch-url", metavar="URL",
                        help="admin URL of a CouchDB to use instead of a pouchdb-server "
                        "started here")
    parser.add_argument("--mac-id", type=int, default=5100, help="first MAC id (5100)")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep logs and state directories")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.nodes < 2 or args.heartbeat_interval <= 0:
        parser.error("--runs >= 1, --nodes >= 2 and --heartbeat-interval > 0, please")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    url, server = open_server(args, workdir)
    load_before = os.getloadavg()
    try:
        info = server_info(url)
        bench = Bench(args, url, workdir)
        try:
            bench.setup()
            after = 0.0
            for index in range(args.runs):
                after = bench.run_once(index, after)
        finally:
            bench.cleanup()
        failover = [s["failover_s"] for s in bench.samples]
        stopped = [s["old_stopped_s"] for s in bench.samples if s["old_stopped_s"] is not None]
        return {
            "server": dict(info, started_here=server is not None, url=redact(url)),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "heartbeat_interval_s": args.heartbeat_interval,
            "dead_after_intervals": health.DEAD_AFTER,
            "nodes": args.nodes,
            "failover_s": stats(failover),
            "failover_intervals": stats(failover, args.heartbeat_interval),
            "old_instance_stopped_s": stats(stopped),
            "overlaps": sum(1 for s in bench.samples if s["overlap"]),
            "samples": bench.samples,
        }
    finally:
        if server is not None:
            server.stop()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return bench_main(args, "himbeere-failover-", run)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main())

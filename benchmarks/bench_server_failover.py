"""Benchmark server failover: a node daemon's cluster node dies; how soon is it back?

Run from the checkout (``python benchmarks/bench_server_failover.py``).  It
starts a 3-node Apache CouchDB 3.5.2 cluster of its own (tests/cluster.py:
the release in ``.cache/couchdb-3.5.2``, unpacked from ``../shared/couchdb``
if need be) on free ports, sets up two databases as ``himbeere-upload
setup`` does, and starts one daemon with the default settings whose
``server`` lists the three nodes.  Then, ``--runs`` times (5):

1. reads which node the daemon uses now (its status document's ``server``)
   and checks, with one command, that it answers;
2. kills that node with SIGKILL (t0);
3. at once writes a command document (``["true"]``) through another node;
4. polls that node every ``--poll`` seconds (0.01) until the command has
   its result (t1): **failover = t1 - t0**;
5. restarts the killed node (``start.sh PORT DATAROOT/node<i>``) and waits
   until it answers, so that every run starts from a whole cluster.

``--freeze`` stops the node with SIGSTOP instead (and SIGCONT after): a
node that falls silent without closing its connections, like one whose
cable was pulled.

It prints one JSON object: the failover time's median, p99, min and max in
seconds, each sample (the node killed, the node written through, the node
the daemon used afterwards) and the settings that decide it
(``feed_timeout``, the reconnect backoff).  The target is a median of at
most 3 s with the default settings.  A ``kill -9`` closes the node's
sockets, so the daemon's feed breaks at once and it moves on to the next
node after the first reconnect delay (0.25 to 0.5 s); a node that vanishes
from the network without closing its connections is noticed only after
``feed_timeout`` (30 s) of silence.

It cleans up after itself: the daemon gets SIGTERM, the cluster's nodes are
stopped by their PIDs, and its work directory is deleted.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import BenchError, bench_main, percentile  # noqa: E402
from himbeere import defaults  # noqa: E402
from himbeere.couch import Couch, Database  # noqa: E402
from tests.cluster import (  # noqa: E402
    NO_RELEASE,
    ClusterError,
    CouchCluster,
    open_cluster,
    release,
)
from tests.nodes import Node  # noqa: E402
from uploader import install  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

#: Longest wait, in seconds, for one failover or for a node to come back.
STEP_TIMEOUT = 120.0


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(percentile(values, 0.5), 3),
            "p99": round(percentile(values, 0.99), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: CouchCluster, workdir: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.workdir = workdir
        self.database = f"bench_server_failover_{secrets.token_hex(4)}"
        self.mac = 424242
        self.node: Optional[Node] = None
        self.samples: list[dict[str, Any]] = []

    def db(self, index: int) -> Database:
        return Couch(self.cluster.url(index)).database(self.database)

    def status(self, index: int) -> dict[str, Any]:
        doc = Couch(self.cluster.url(index)).database(self.database + "_status").get(
            f"status:{self.mac}")
        return doc or {}

    def setup(self) -> None:
        install.setup(Fleet(self.cluster.server_list(1), self.database))
        # Node's flags (heartbeat 1 s, grace 2 s) are for tests: back to the defaults.
        flags = ["--heartbeat-interval", str(defaults.HEARTBEAT_INTERVAL),
                 "--grace-period", str(defaults.GRACE_PERIOD)]
        self.node = Node(self.cluster.server_list(1), self.database,
                         self.workdir / "state", self.mac, flags)
        self.node.start()

    def command(self, via: int, timeout: float) -> float:
        """Write a command through node ``via``; seconds until its result is there."""
        db = self.db(via)
        doc_id = f"cmd-{secrets.token_hex(4)}"
        start = time.perf_counter()
        db.save({"_id": doc_id, "type": f"{self.mac}_cmd", "cmd": ["true"]})
        deadline = start + timeout
        while time.perf_counter() < deadline:
            try:
                doc = db.get(doc_id)
            except Exception:  # a node still settling after a restart: ask again
                doc = None
            if doc is not None and "finished" in doc:
                return time.perf_counter() - start
            time.sleep(self.args.poll)
        log = self.node.log()[-3000:] if self.node else ""
        raise BenchError(f"command {doc_id} through node{via} got no result within "
                         f"{timeout:g} s; daemon log:\n{log}")

    def followed(self, not_: Optional[int] = None) -> int:
        """The node the daemon uses now (other than ``not_``), from its status document."""
        deadline = time.monotonic() + STEP_TIMEOUT
        server = None
        while time.monotonic() < deadline:
            for index in range(1, self.cluster.size + 1):
                if not self.cluster.up(index):
                    continue
                server = self.status(index).get("server")
                for candidate in range(1, self.cluster.size + 1):
                    if server == self.cluster.plain_url(candidate) and candidate != not_:
                        return candidate
                break
            time.sleep(0.05)
        raise BenchError(f"the daemon never said which server it uses (last: {server}); "
                         f"daemon log:\n{self.node.log()[-3000:] if self.node else ''}")

    def run_once(self, index: int) -> None:
        followed = self.followed()
        others = [i for i in range(1, self.cluster.size + 1) if i != followed]
        self.command(others[0], STEP_TIMEOUT)  # the daemon answers before the kill
        time.sleep(self.args.gap)
        t0 = time.perf_counter()
        if self.args.freeze:
            self.cluster.freeze(followed)
        else:
            self.cluster.kill(followed)
        via = others[index % len(others)]
        elapsed = self.command(via, STEP_TIMEOUT)
        failover = time.perf_counter() - t0
        after = self.followed(not_=followed)
        self.samples.append({"run": index, "killed_node": followed, "written_via": via,
                             "command_round_trip_s": round(elapsed, 3),
                             "failover_s": round(failover, 3), "server_after": after})
        print(f"run {index}: {'froze' if self.args.freeze else 'killed'} node{followed}, "
              f"command through node{via}: "
              f"{failover:.3f} s; daemon now on node{after}", file=sys.stderr)
        if self.args.freeze:
            self.cluster.thaw(followed)
        else:
            self.cluster.restart(followed)
        deadline = time.monotonic() + STEP_TIMEOUT
        while not self.cluster.up(followed):
            if time.monotonic() > deadline:
                raise BenchError(f"node{followed} did not come back")
            time.sleep(0.2)
        time.sleep(self.args.settle)

    def cleanup(self) -> None:
        if self.node is not None:
            try:
                if self.node.alive():
                    self.node.stop()
            finally:
                self.node.kill_programs()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.01,
                        help="seconds between two reads of the command (0.01)")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds of quiet before each kill (1)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds for a restarted node to rejoin (5)")
    parser.add_argument("--freeze", action="store_true",
                        help="SIGSTOP the node instead of killing it: a node that falls "
                             "silent without closing its connections")
    parser.add_argument("--json-out", help="also write the JSON result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.poll <= 0:
        parser.error("--runs >= 1 and --poll > 0, please")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    try:
        return measure(args, workdir)
    except ClusterError as exc:
        raise BenchError(str(exc)) from None


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    found = release()
    if found is None:
        raise BenchError(NO_RELEASE)
    load_before = os.getloadavg()
    cluster = open_cluster(found, workdir)
    try:
        version = Couch(cluster.url(1)).info().get("version")
        bench = Bench(args, cluster, workdir)
        try:
            bench.setup()
            for index in range(args.runs):
                bench.run_once(index)
        finally:
            bench.cleanup()
        return {
            "server": {"vendor": "Apache CouchDB", "version": version,
                       "cluster_nodes": cluster.size, "started_here": True},
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "settings": {"feed_timeout_s": defaults.FEED_TIMEOUT,
                         "reconnect_min_s": defaults.RECONNECT_MIN,
                         "reconnect_max_s": defaults.RECONNECT_MAX,
                         "heartbeat_interval_s": defaults.HEARTBEAT_INTERVAL},
            "fault": "SIGSTOP" if args.freeze else "SIGKILL",
            "failover_s": stats([s["failover_s"] for s in bench.samples]),
            "target": {"median_s": 3.0},
            "samples": bench.samples,
        }
    finally:
        cluster.stop()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return bench_main(args, "himbeere-server-failover-", run, interruptible=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main())

"""Benchmark a staged rollout: a 3-wave release to many real node daemons.

Run from the checkout (``python benchmarks/bench_rollout.py``).  Without
``--couch-url`` it starts an in-memory pouchdb-server of its own.  It starts
``--nodes`` daemons (50; fewer on a small machine, the JSON says how many),
pushes release 0 of a placed program with one replica per node, waits until
every node runs it, then pushes the next release with ``--rollout
1,25%,100% --healthy-for H`` and follows the rollout document until it is
``done``; ``--rounds`` times, one release after the other.  It prints one
JSON object: per wave, seconds from the push to the wave's admission (server
clock) and to the moment every node of the wave reported the new release
running; the total from the push to ``done``; and the part of it that is
not ``healthy_for`` waiting (the overhead of driving it at heartbeats);
each as median and p99 over the rounds, with every round's figures.

It cleans up after itself: daemons get SIGTERM, and its two databases are
deleted.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import BenchError, bench_main, open_server, redact, server_info  # noqa: E402,E501
from himbeere.schema import parse_iso  # noqa: E402
from tests.nodes import Node  # noqa: E402
from uploader import install, push, rollouts  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

PROGRAM = ("import time\n# {tag}\ndef main():\n    while not should_quit():\n"
           "        time.sleep(0.2)\n")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50, help="node daemons (default 50)")
    parser.add_argument("--waves", default="1,25%,100%", help="the rollout (1,25%%,100%%)")
    parser.add_argument("--healthy-for", type=float, default=5.0,
                        help="seconds each wave must run cleanly (default 5)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="the daemons' heartbeat, seconds (default 1)")
    parser.add_argument("--couch-url", metavar="URL",
                        help="admin URL of a CouchDB to use instead of a pouchdb-server")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rollouts one after the other, for medians (default 3)")
    parser.add_argument("--mac-id", type=int, default=7000, help="first MAC id (7000)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after (600 s)")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep logs and state directories")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1 or args.healthy_for < 0 or args.heartbeat_interval <= 0:
        parser.error("--nodes >= 1, --healthy-for >= 0 and --heartbeat-interval > 0, please")
    return args


def releases(fleet: Fleet) -> dict[int, Any]:
    rows = fleet.status.all_docs(startkey="status:", endkey="status:\ufff0", include_docs=True)
    found = {}
    for row in rows:
        doc = row.get("doc") or {}
        entry = (doc.get("programs") or {}).get("placed:bench")
        if entry and entry.get("state") == "running":
            found[int(str(doc["_id"]).split(":")[1])] = entry.get("release")
    return found


def wait(what: str, check: Any, deadline: float, poll: float = 0.2) -> Any:
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(poll)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    url, server = open_server(args, workdir)
    database = "bench_rollout_" + secrets.token_hex(4)
    nodes: list[Node] = []
    fleet = Fleet(url, database)
    try:
        install.setup(fleet)
        deadline = time.monotonic() + args.timeout
        for i in range(args.nodes):
            node = Node(url, database, workdir / f"state-{i}", args.mac_id + i,
                        ["--heartbeat-interval", str(args.heartbeat_interval)])
            nodes.append(node.start())
        source = workdir / "bench.py"
        source.write_text(PROGRAM.format(tag="r0"))
        placed = push.Placed.parse(str(args.nodes))
        push.push(fleet, source, None, "bench", placed)
        wait("release 0 on every node", lambda: len(releases(fleet)) == args.nodes, deadline)
        plan = rollouts.Plan.parse(args.waves, f"{args.healthy_for}s")
        runs = [one_rollout(fleet, source, placed, plan, f"r{n + 1}", deadline)
                for n in range(args.rounds)]
        return {
            "server": dict(server_info(url), started_here=server is not None, url=redact(url)),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "nodes": args.nodes, "waves_spec": args.waves, "healthy_for_s": args.healthy_for,
            "heartbeat_interval_s": args.heartbeat_interval, "rounds": args.rounds,
            "states": [run["state"] for run in runs],
            "waves": summarize(runs, plan), "total_s": stats([run["total_s"] for run in runs]),
            "overhead_s": stats([run["total_s"] - args.healthy_for * len(plan.waves)
                                 for run in runs]),
            "runs": runs,
        }
    finally:
        for node in nodes:
            if node.alive():
                node.signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.stop(timeout=30)
            except Exception:  # noqa: BLE001 - cleaning up what we can
                pass
        for name in (database, database + "_status"):
            try:
                fleet.couch.delete_database(name)
            except Exception:  # noqa: BLE001
                pass
        if server is not None:
            server.stop()


def one_rollout(fleet: Fleet, source: Path, placed: push.Placed, plan: rollouts.Plan,
                tag: str, deadline: float) -> dict[str, Any]:
    """Push release ``tag`` with ``plan`` and follow it to its end: per wave, seconds
    from the push to its admission and to every node of it running the release."""
    source.write_text(PROGRAM.format(tag=tag))
    started = time.time()
    rid = push.push(fleet, source, None, "bench", placed, rollout=plan)["rollout"]
    waves: list[dict[str, Any]] = []
    while True:
        doc = fleet.status.get(rid) or {}
        now = time.time() - started
        running = releases(fleet)
        for index, stamp in enumerate(doc.get("wave_started") or []):
            if index == len(waves):
                waves.append({"wave": index + 1, "admitted_s": round(
                    parse_iso(stamp) - started, 3), "running_s": None})
            admitted = [int(k) for k, v in (doc.get("admitted") or {}).items() if v <= stamp]
            if waves[index]["running_s"] is None and admitted and all(
                    running.get(mac) == doc.get("release") for mac in admitted):
                waves[index].update(running_s=round(now, 3), nodes=len(admitted))
        if doc.get("state") in ("done", "rolled-back", "aborted"):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"rollout still {doc.get('state')} after the --timeout")
        time.sleep(0.2)
    return {"tag": tag, "state": doc.get("state"), "waves": waves,
            "total_s": round(time.time() - started, 3)}


def stats(values: list[float]) -> dict[str, Any]:
    """Median and p99 (nearest rank) of ``values``, with the values."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "median": None, "p99": None}
    rank = max(0, min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1))
    return {"n": len(ordered), "median": round(statistics.median(ordered), 3),
            "p99": round(ordered[rank], 3), "values": [round(v, 3) for v in values]}


def summarize(runs: list[dict[str, Any]], plan: rollouts.Plan) -> list[dict[str, Any]]:
    """Per wave, over the runs: admitted and running seconds after the push."""
    summary = []
    for index in range(len(plan.waves)):
        waves = [run["waves"][index] for run in runs if len(run["waves"]) > index]
        summary.append({
            "wave": index + 1, "nodes": waves[-1].get("nodes") if waves else None,
            "admitted_s": stats([w["admitted_s"] for w in waves]),
            "running_s": stats([w["running_s"] for w in waves if w["running_s"] is not None])})
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return bench_main(args, "himbeere-rollout-", run)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())

"""What a heartbeat write costs CouchDB as a status document's revisions pile up.

Run from the checkout: ``.venv/bin/python benchmarks/bench_revs.py``.

A heartbeat rewrites ``status:<mac>`` every ``heartbeat_interval`` (10 s),
so after three hours each node's document has 1000 revisions, CouchDB's
default ``_revs_limit``, and keeps it there.  This benchmark starts Apache
CouchDB 3.5.2 (``.cache/couchdb-3.5.2``, as tests/servers.py unpacks it),
pinned to CPU 0 with this process on CPU 1, and writes one status
document (the daemon's own, :meth:`himbeere.status.Status.document`)
``--writes`` times in a row, as one node's heartbeats, into two databases:
one left at the default ``_revs_limit`` (1000) and one set up by
``himbeere-upload setup`` (:data:`himbeere.defaults.STATUS_REVS_LIMIT`).
For each block of ``--block`` writes it records the server's CPU seconds per
write (utime+stime of the server and its children) and the median and p99
of the PUT's wall time.  One JSON object goes to stdout (``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import FLEET_CPU, SERVER_CPU, Servers  # noqa: E402
from himbeere import defaults  # noqa: E402
from himbeere.couch import Couch, Database  # noqa: E402
from himbeere.status import Status  # noqa: E402


def writes(servers: Servers, db: Database, count: int, block: int) -> list[dict[str, Any]]:
    status = Status(db, 1001, defaults.HEARTBEAT_INTERVAL, programs=lambda: {})
    blocks = []
    rev: Optional[str] = None
    for start in range(0, count, block):
        times = []
        cpu0 = sum(servers.cpu_seconds().values())
        for _ in range(block):
            doc = status.document()
            if rev is not None:
                doc["_rev"] = rev
            began = time.perf_counter()
            rev = db.save(doc)["_rev"]
            times.append(time.perf_counter() - began)
        cpu = sum(servers.cpu_seconds().values()) - cpu0
        ordered = sorted(times)
        blocks.append({
            "revisions": start + block,
            "server_cpu_ms_per_write": round(cpu * 1000 / block, 2),
            "put_ms": {"median": round(statistics.median(ordered) * 1000, 2),
                       "p99": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2)},
        })
    return blocks


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=1500)
    parser.add_argument("--block", type=int, default=250)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-revs-"))
    servers = Servers(1, workdir / "data")
    try:
        servers.pin(SERVER_CPU)
        os.sched_setaffinity(0, {FLEET_CPU})
        couch = Couch(servers.admin_urls()[0])
        runs = {}
        for limit in (1000, defaults.STATUS_REVS_LIMIT):
            db = couch.database(f"status_limit_{limit}")
            couch.create_database(db.name)
            db.set_revs_limit(limit)
            runs[str(limit)] = writes(servers, db, args.writes, args.block)
            print(f"_revs_limit {limit}: {json.dumps(runs[str(limit)])}", file=sys.stderr)
        result = {
            "benchmark": "bench_revs",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "server": "CouchDB 3.5.2, single node",
            "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()}",
            "writes": args.writes, "block": args.block,
            "by_revs_limit": runs,
        }
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Benchmark a simulated fleet: push to all, command to all, server cost per heartbeat round.

Run from the checkout (``python benchmarks/bench_fleet.py --nodes 1,50,200``).
Without ``--couch-url`` it starts an in-memory pouchdb-server of its own
(tests/servers.py; needs scripts/install-pouchdb-server) and sets up two
databases as ``himbeere-upload setup`` does.  The fleet grows
through the ``--nodes`` sizes in turn: daemons (``python -m himbeere daemon``
with distinct ``--mac-id`` and a state directory each, as bench_daemon.py
starts one) are started in batches of ``--batch``, and the next batch only
once every daemon of the last one has written its status document.  At
each size it measures, prints one JSON object at the end and cleans up:
every daemon gets SIGTERM (SIGKILL past ``--stop-timeout``), programs a
killed daemon left are killed by their recorded process groups, only
processes it started are touched, its databases are deleted.  Ctrl-C and
SIGTERM clean up the same way.

All times are :func:`time.perf_counter` in this process:

push to all
    from the start of ONE ``_bulk_docs`` request that updates N code
    documents (one program on each node, already running) to the arrival of
    the last of the N UDP datagrams their new versions' ``main()`` send
    first.  Median of ``--rounds``.  The first push (creating the
    documents, fork servers cold) is reported apart, unmeasured.
one program for many nodes
    from the start of ONE PUT of a ``program:<name>`` document of ``type:
    "himbeere-program"`` targeting a label every node has (``{"labels":
    {"bench": "fleet"}}``, what ``himbeere-upload push PATH --label
    bench=fleet`` writes) to the arrival of the last of the N datagrams its
    ``main()`` sends on each node.  ``targeted_to_all_ms``: updates of the
    running document, as push to all measures (its creation, when the
    nodes first read their labels, reported apart);
    ``targeted_new_to_all_ms``: a new document each round, deleted
    afterwards, unmeasured.  Medians of ``--rounds``.
command to all
    from the start of :func:`uploader.ops.create_command` with ``targets:
    "all"`` (what ``himbeere cmd --all -- true`` does before it waits: it
    checks the session and databases and lists the nodes, then saves the
    command document) to the arrival of the last of the N result
    documents holding ``ret`` on this process's continuous ``_changes``
    feed of the status database; ``from_command_document_ms`` starts at
    the PUT of the command document instead.  ``himbeere cmd`` itself
    polls every 250 ms, so it shows the answers up to that much later.
who is busy
    for both: when the first node and half the nodes were done
    (``first_node_ms``, ``half_the_nodes_ms``); CPU seconds per round of
    the server process and of the fleet (daemons, fork servers, programs,
    commands), and as a share of the round's wall time:
    ``server_busy_share`` near 1 means the (single-threaded) server is the
    bottleneck, ``fleet_cores_busy`` near the number of cores means the
    simulated nodes are; ``machine_cores_busy`` (/proc/stat) counts every
    process on the machine, other work included.
server cost
    utime+stime of the server process (``/proc/<pid>/stat``) over a quiet
    window of ``--quiet-rounds`` heartbeat intervals with no program
    running, divided by the number of heartbeat rounds in it; with
    ``--couch-url`` pass ``--server-pid``.  The daemons' own CPU over the
    same window is reported beside it.
daemon memory
    VmRSS and PSS of every daemon and of its fork server, in the same window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import (  # noqa: E402
    CLOCK_TICKS,
    PROGRAM,
    BenchError,
    Daemon,
    ResultWatcher,
    UdpListener,
    bench_main,
    open_server,
    proc_cpu_seconds,
    proc_pss_mb,
    proc_status,
    server_info,
    summary,
)
from himbeere.couch import Database, Doc  # noqa: E402
from himbeere.schema import PROGRAM_TYPE, node_id, result_id, targeted_id  # noqa: E402
from tests.nodes import free_udp_port  # noqa: E402
from tests.servers import db_url, delete_database  # noqa: E402
from uploader import install, ops  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

#: Goal of issue 4: command to all 200 nodes in <= 2 s, median.
TARGET_COMMAND_TO_ALL_200_MS = 2000.0
#: Goal of issue 13: one label-targeted program running on all 200 nodes in <= 2 s, median.
TARGET_TARGETED_TO_ALL_200_MS = 2000.0
#: The label every node gets, and the program for many nodes selects.
BENCH_LABELS = {"bench": "fleet"}
#: PROGRAM, saying which node it runs on: one document, N nodes.
TARGETED_PROGRAM = PROGRAM.replace('b"up {token}"', 'b"up {token}-" + str(node).encode()'
                                   ).replace('b"down {token}"',
                                             'b"down {token}-" + str(node).encode()')
#: What a run measures, in this order (--cases).
CASES = ("push", "targeted", "command", "quiet")
#: The first MAC id; node i is FIRST_MAC + i.
FIRST_MAC = 7_000_000


# -- /proc ------------------------------------------------------------------------------
def mem_available_mb() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def parents() -> dict[int, int]:
    """pid -> ppid of every process, in one pass over /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                table[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return table


def total_cpu(pid: int) -> float:
    """utime + stime of ``pid`` and of its children that have been waited for."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 2),
            "min": round(min(values), 2), "max": round(max(values), 2),
            "total": round(sum(values), 1)}


def git_tree() -> dict[str, Any]:
    """Which code ran: the commit and the files changed on top of it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line.split(maxsplit=1)[-1] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed_files": changed}


# -- the benchmark -----------------------------------------------------------------------
class TimedDatabase(Database):
    """Notes when a save starts: the command document's PUT inside create_command."""

    last_save = 0.0

    def save(self, doc: Doc) -> Doc:
        self.last_save = time.perf_counter()
        return super().save(doc)


class FleetBench:
    def __init__(self, args: argparse.Namespace, server_url: str, workdir: Path,
                 server_pid: Optional[int]) -> None:
        self.args = args
        self.server_url = server_url
        self.server_pid = server_pid
        self.workdir = workdir
        self.database = f"bench_fleet_{secrets.token_hex(4)}"
        self.db = db_url(server_url, self.database)
        self.status_db = db_url(server_url, self.database + "_status")
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        self.fleet = Fleet(server_url, self.database)
        self.code = self.fleet.code = TimedDatabase(self.fleet.couch, self.database)
        self.udp = UdpListener()
        self.daemons: list[Daemon] = []
        self.created: list[str] = []
        self.labelled: set[int] = set()

    # -- plumbing ----------------------------------------------------------------
    def bulk(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = self.session.post(f"{self.db}/_bulk_docs", data=json.dumps({"docs": docs}),
                                     timeout=300)
        if response.status_code not in (201, 202):
            raise BenchError(f"_bulk_docs: {response.status_code} {response.text[:500]}")
        answer: list[dict[str, Any]] = response.json()
        failed = [row for row in answer if "error" in row]
        if failed:
            raise BenchError(f"_bulk_docs: {len(failed)} failed, e.g. {failed[:2]}")
        return answer

    def step_timeout(self) -> float:
        return max(self.args.step_timeout, 0.5 * len(self.daemons))

    def daemon_log(self, limit: int = 3) -> str:
        dead = [d for d in self.daemons if not d.alive()]
        shown = dead[:limit] or self.daemons[:1]
        return "\n".join(f"--- node {d.mac_id} ({'dead' if not d.alive() else 'alive'}):\n"
                         f"{d.log_tail(2000)}" for d in shown)

    def cpu(self, end: bool = False) -> tuple[float, ...]:
        """CPU seconds so far: the server; the fleet (daemons, fork servers,
        programs, commands; the ones that ended count through their parent's
        cutime/cstime); the whole machine, busy and iowait.  The machine is
        read before the scan of /proc at the ``end`` of a round and after it
        at the start, so that scan does not count."""
        machine = machine_cpu() if end else None
        table = parents()
        fleet = {d.pid for d in self.daemons}
        for _ in range(2):  # daemons -> fork servers, commands -> programs
            fleet |= {pid for pid, ppid in table.items() if ppid in fleet}
        server = total_cpu(self.server_pid) if self.server_pid else 0.0
        return (server, sum(total_cpu(pid) for pid in fleet), *(machine or machine_cpu()))

    def check_alive(self) -> None:
        dead = [d.mac_id for d in self.daemons if not d.alive()]
        if dead:
            raise BenchError(f"{len(dead)} daemon(s) died, e.g. {dead[:5]}:\n{self.daemon_log()}")

    # -- growing the fleet ----------------------------------------------------------
    def setup(self) -> None:
        """Both databases as `himbeere-upload setup` makes them: the status
        database's ``validate_doc_update`` runs on every heartbeat, as in a fleet."""
        self.created += [self.database, self.database + "_status"]
        install.setup(self.fleet)

    def grow(self, size: int) -> dict[str, Any]:
        """Start daemons in batches until there are ``size``, each batch alive first."""
        started = time.perf_counter()
        batches = []
        while len(self.daemons) < size:
            free = mem_available_mb()
            if free < self.args.min_free_mb:
                raise BenchError(f"stopped at {len(self.daemons)} nodes: MemAvailable "
                                 f"{free:.0f} MB < --min-free-mb {self.args.min_free_mb}")
            batch = []
            for _ in range(min(self.args.batch, size - len(self.daemons))):
                mac = FIRST_MAC + len(self.daemons)
                # Pairing listens on loopback, on a port of this node's own (tests/nodes.py).
                env = {"HIMBEERE_DISCOVERY_ADDRESS": "127.255.255.255",
                       "HIMBEERE_DISCOVERY_PORT": str(free_udp_port())}
                daemon = Daemon(self.server_url, self.database, self.workdir / f"node-{mac}",
                                mac, self.args.heartbeat_interval, env=env)
                daemon.start()  # on the main thread: PR_SET_PDEATHSIG is per thread
                self.daemons.append(daemon)
                batch.append(daemon)
            t0 = time.perf_counter()
            self.wait_status([d.mac_id for d in batch])
            batches.append(round(time.perf_counter() - t0, 2))
        seconds = time.perf_counter() - started
        return {"seconds": round(seconds, 1), "batch_size": self.args.batch,
                "batch_seconds": batches,
                "mem_available_mb_after": round(mem_available_mb())}

    def wait_status(self, macs: list[int]) -> None:
        """Wait until every one of ``macs`` has written its status document."""
        keys = [f"status:{mac}" for mac in macs]
        deadline = time.monotonic() + self.args.start_timeout
        while True:
            self.check_alive()
            response = self.session.post(f"{self.status_db}/_all_docs",
                                         data=json.dumps({"keys": keys}), timeout=60)
            rows = response.json().get("rows", []) if response.ok else []
            missing = [row["key"] for row in rows if "error" in row or "value" not in row]
            if response.ok and not missing:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{len(missing) if response.ok else len(keys)} node(s) wrote "
                                 f"no status within {self.args.start_timeout:g} s, e.g. "
                                 f"{missing[:3]}:\n{self.daemon_log()}")
            time.sleep(0.5)

    # -- push to all -----------------------------------------------------------------------
    def pushes(self, size: int) -> dict[str, Any]:
        """A first push creating N documents, then ``--rounds`` updates of all N."""
        macs = [d.mac_id for d in self.daemons]
        ids = {mac: f"fleet-{size}-{mac}" for mac in macs}
        revs: dict[int, str] = {}
        first: Optional[float] = None
        rounds = Rounds()
        for round_ in range(self.args.rounds + 1):
            tag = f"n{size}r{round_}"
            docs = []
            for mac in macs:
                doc = {"_id": ids[mac], "type": mac, "name": "bench-fleet",
                       "code": PROGRAM.format(token=f"{tag}-{mac}", port=self.udp.port)}
                if mac in revs:
                    doc["_rev"] = revs[mac]
                docs.append(doc)
            self.settle()
            cpu0 = self.cpu()
            start = time.perf_counter()
            answer = self.bulk(docs)
            keys = [f"up {tag}-{mac}" for mac in macs]
            try:
                last = self.udp.arrivals.wait_all(keys, self.step_timeout())
            except BenchError as exc:
                raise BenchError(f"push {tag}: {exc}\n{self.daemon_log()}") from None
            cpu1 = self.cpu(end=True)
            revs = {mac: row["rev"] for mac, row in zip(macs, answer)}
            if round_ == 0:
                first = last - start
            else:
                rounds.add(start, [self.udp.arrivals.times[k] for k in keys], cpu0, cpu1)
        # Unmeasured: stop every program, so the rest runs with none.
        tag = f"n{size}r{self.args.rounds}"
        self.bulk([{"_id": ids[mac], "_rev": revs[mac], "_deleted": True} for mac in macs])
        self.udp.arrivals.wait_all([f"down {tag}-{mac}" for mac in macs], self.step_timeout())
        result = rounds.report()
        result["first_push_creating_ms"] = round((first or 0.0) * 1000, 1)
        return result

    # -- one program for many nodes -----------------------------------------------------
    def label(self) -> None:
        """Give every node not labelled yet :data:`BENCH_LABELS` (its ``node:<mac>``)."""
        new = [d.mac_id for d in self.daemons if d.mac_id not in self.labelled]
        docs = [{"_id": node_id(mac), "type": "himbeere-node", "node": mac,
                 "labels": dict(BENCH_LABELS)} for mac in new]
        response = self.session.post(f"{self.status_db}/_bulk_docs",
                                     data=json.dumps({"docs": docs}), timeout=300)
        if response.status_code not in (201, 202):
            raise BenchError(f"labels: {response.status_code} {response.text[:500]}")
        self.labelled.update(new)

    def targeted(self, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One running label-targeted document updated ``--rounds`` times (as
        :meth:`pushes` does; its creation reported apart), then ``--rounds``
        new documents, each deleted afterwards."""
        self.label()
        macs = [d.mac_id for d in self.daemons]
        updates, news = Rounds(), Rounds()
        rev: Optional[str] = None
        first = 0.0
        for round_ in range(self.args.rounds + 1):
            tag = f"t{size}u{round_}"
            doc = self.targeted_doc(f"bench-t{size}", tag)
            if rev is not None:
                doc["_rev"] = rev
            elapsed, rev = self.put_until_running(doc, tag, macs,
                                                  updates if round_ else None)
            first = first or elapsed
        self.delete_targeted(doc, rev, tag, macs)
        for round_ in range(self.args.rounds):
            tag = f"t{size}n{round_}"
            doc = self.targeted_doc(f"bench-{tag}", tag)
            _, rev = self.put_until_running(doc, tag, macs, news)
            self.delete_targeted(doc, rev, tag, macs)
        result = updates.report()
        result["first_push_creating_ms"] = round(first * 1000, 1)
        return result, news.report()

    def targeted_doc(self, name: str, tag: str) -> Doc:
        return {"_id": targeted_id(name), "type": PROGRAM_TYPE, "name": name,
                "targets": {"labels": dict(BENCH_LABELS)},
                "code": TARGETED_PROGRAM.format(token=tag, port=self.udp.port)}

    def put_until_running(self, doc: Doc, tag: str, macs: list[int],
                          rounds: Optional[Rounds]) -> tuple[float, str]:
        """PUT ``doc``; wait until every node's ``main()`` of it said "up"."""
        self.settle()
        cpu0 = self.cpu()
        start = time.perf_counter()
        saved = self.code.save(doc)
        keys = [f"up {tag}-{mac}" for mac in macs]
        try:
            last = self.udp.arrivals.wait_all(keys, self.step_timeout())
        except BenchError as exc:
            raise BenchError(f"targeted {tag}: {exc}\n{self.daemon_log()}") from None
        cpu1 = self.cpu(end=True)
        if rounds is not None:
            rounds.add(start, [self.udp.arrivals.times[k] for k in keys], cpu0, cpu1)
        return last - start, str(saved["_rev"])

    def delete_targeted(self, doc: Doc, rev: str, tag: str, macs: list[int]) -> None:
        """Unmeasured: delete it, and wait until every node stopped it."""
        self.code.delete(dict(doc, _rev=rev))
        self.udp.arrivals.wait_all([f"down {tag}-{mac}" for mac in macs], self.step_timeout())

    # -- command to all --------------------------------------------------------------------
    def commands(self, size: int) -> dict[str, Any]:
        info = self.session.get(self.status_db, timeout=30).json()
        watcher = ResultWatcher(self.status_db, info["update_seq"])
        macs = [d.mac_id for d in self.daemons]
        rounds, from_doc, failed = Rounds(), [], 0
        try:
            for round_ in range(self.args.rounds + 1):  # the first one warms up
                self.settle()
                cpu0 = self.cpu()
                start = time.perf_counter()
                command_id = ops.create_command(self.fleet, ["true"], "all")
                keys = [result_id(command_id, mac) for mac in macs]
                try:
                    last = watcher.arrivals.wait_all(keys, self.step_timeout())
                except BenchError as exc:
                    raise BenchError(f"command {command_id}: {exc}\n{self.daemon_log()}") from None
                cpu1 = self.cpu(end=True)
                answer = ops.command_results(self.fleet, command_id)
                if not answer["done"] or len(answer["command"]["expected"]) != size:
                    raise BenchError(f"command {command_id}: expected "
                                     f"{len(answer['command']['expected'])} nodes, "
                                     f"pending {answer['pending'][:5]}")
                failed += sum(1 for r in answer["results"].values() if ops.failed(r))
                if round_ > 0:
                    rounds.add(start, [watcher.arrivals.times[k] for k in keys], cpu0, cpu1)
                    from_doc.append(last - self.code.last_save)
        finally:
            watcher.close()
        result = rounds.report()
        result["from_command_document_ms"] = summary(from_doc)
        result["failed_results"] = failed
        return result

    # -- quiet: server cost, memory ------------------------------------------------------
    def quiet(self) -> dict[str, Any]:
        time.sleep(self.args.quiet_settle)
        self.check_alive()
        table = parents()
        daemon_pids = [d.pid for d in self.daemons]
        wanted = set(daemon_pids)
        fork_pids = [pid for pid, ppid in table.items() if ppid in wanted]
        interval = self.args.heartbeat_interval
        window = self.args.quiet_rounds * interval
        watched = daemon_pids + fork_pids + ([self.server_pid] if self.server_pid else [])
        cpu0 = {pid: _cpu(pid) for pid in watched}
        wall0 = time.monotonic()
        time.sleep(window)
        wall = time.monotonic() - wall0
        cpu = {pid: _cpu(pid) - cpu0[pid] for pid in watched}
        rounds = wall / interval
        result: dict[str, Any] = {"window_seconds": round(wall, 1),
                                  "heartbeat_interval": interval,
                                  "heartbeat_rounds": round(rounds, 2)}
        if self.server_pid:
            server_cpu = cpu[self.server_pid]
            result.update({
                "server_cpu_seconds": round(server_cpu, 3),
                "server_cpu_seconds_per_round": round(server_cpu / rounds, 4),
                "server_cpu_ms_per_heartbeat": round(1000 * server_cpu / rounds
                                                     / len(self.daemons), 3),
                "server_cpu_percent": round(100 * server_cpu / wall, 2),
                "server_rss_mb": _round(proc_status(self.server_pid, "VmRSS")),
            })
        else:
            result["server_cpu_seconds"] = None  # another machine's server: pass --server-pid
        daemons_cpu = sum(cpu[pid] for pid in daemon_pids + fork_pids)
        result["daemons_cpu_seconds_per_round"] = round(daemons_cpu / rounds, 4)
        result["daemons_cpu_percent_of_one_core"] = round(100 * daemons_cpu / wall, 2)

        def memory(pids: list[int]) -> dict[str, Any]:
            rss = [proc_status(pid, "VmRSS") for pid in pids]
            pss = [proc_pss_mb(pid) for pid in pids]
            return {"rss_mb": spread([v for v in rss if v is not None]),
                    "pss_mb": spread([v for v in pss if v is not None])}

        result["daemon_memory"] = memory(daemon_pids)
        result["forkserver_memory"] = memory(fork_pids)
        result["mem_available_mb"] = round(mem_available_mb())
        return result

    def settle(self) -> None:
        if self.args.gap > 0:
            time.sleep(self.args.gap)

    # -- cleaning up -------------------------------------------------------------------------
    def cleanup(self) -> dict[str, Any]:
        """Stop every daemon: SIGTERM to all at once, SIGKILL what is left."""
        for daemon in self.daemons:
            if daemon.alive():
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout
        killed = 0
        codes = []
        for daemon in self.daemons:
            assert daemon.process is not None
            try:
                daemon.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed += 1
                daemon.process.kill()
                daemon.process.wait(10)
            daemon._kill_programs()  # after a SIGKILL, its programs live on
            codes.append(daemon.process.returncode)
        self.udp.close()
        for name in self.created:
            try:
                delete_database(self.server_url, name)
            except Exception as exc:
                print(f"bench: could not delete database {name}: {exc}", file=sys.stderr)
        return {"daemons": len(codes), "exit_codes": sorted(set(codes), key=str),
                "sigkilled": killed}


class Rounds:
    """Measured rounds: when the N arrivals came, and who was busy meanwhile."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first: list[float] = []
        self.half: list[float] = []
        self.cpu: list[tuple[float, ...]] = []

    def add(self, start: float, arrivals: list[float], cpu0: tuple[float, ...],
            cpu1: tuple[float, ...]) -> None:
        self.times.append(max(arrivals) - start)
        self.first.append(min(arrivals) - start)
        self.half.append(statistics.median(arrivals) - start)
        self.cpu.append(tuple(b - a for a, b in zip(cpu0, cpu1)))

    def report(self) -> dict[str, Any]:
        """Times in ms; CPU seconds per round (medians) and busy shares of the
        round's wall time: the server is one thread, so ``server_busy_share``
        near 1 means it is the bottleneck; ``machine_cores_busy`` counts every
        process on the machine (os.cpu_count() cores)."""
        result = summary(self.times)
        result["rounds_ms"] = [round(t * 1000, 1) for t in self.times]
        if not self.times:
            return result
        result["first_node_ms"] = round(1000 * statistics.median(self.first), 1)
        result["half_the_nodes_ms"] = round(1000 * statistics.median(self.half), 1)
        wall = statistics.median(self.times)
        server, fleet, busy, iowait = (statistics.median(c[i] for c in self.cpu)
                                       for i in range(4))
        result.update({"server_cpu_seconds": round(server, 3),
                       "fleet_cpu_seconds": round(fleet, 3),
                       "server_busy_share": round(server / wall, 2),
                       "fleet_cores_busy": round(fleet / wall, 2),
                       "machine_cores_busy": round(busy / wall, 2),
                       "machine_cores_iowait": round(iowait / wall, 2)})
        return result


def machine_cpu() -> tuple[float, float]:
    """Busy and iowait CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(f) for f in handle.readline().split()[1:9]]
    user, nice, system, _, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS, iowait / CLOCK_TICKS


def _cpu(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return 0.0


def _round(value: Optional[float], digits: int = 2) -> Optional[float]:
    return None if value is None else round(value, digits)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,50,200",
                        help="fleet sizes, ascending, comma-separated (default 1,50,200)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measured pushes and commands per size (default 5)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0,
                        help="the daemons' heartbeat (default 10, the daemon's default)")
    parser.add_argument("--quiet-rounds", type=float, default=3.0,
                        help="heartbeat intervals in the server-cost window (default 3)")
    parser.add_argument("--quiet-settle", type=float, default=5.0,
                        help="seconds of quiet before that window (default 5)")
    parser.add_argument("--batch", type=int, default=20,
                        help="daemons started at once (default 20)")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds for a batch to write its status documents (180)")
    parser.add_argument("--step-timeout", type=float, default=30.0,
                        help="seconds for a push or command to reach every node, at least "
                        "0.5 s per node (default 30)")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds for all daemons to stop before SIGKILL (default 60)")
    parser.add_argument("--gap", type=float, default=3.0,
                        help="seconds between pushes/commands, so each starts quiet (3)")
    parser.add_argument("--min-free-mb", type=float, default=2048.0,
                        help="start no batch with less MemAvailable than this (2048)")
    parser.add_argument("--couch-url", metavar="URL",
                        help="admin URL of a CouchDB to use instead of a pouchdb-server "
                        "started here")
    parser.add_argument("--server-pid", type=int,
                        help="with --couch-url: the server's PID on this machine, for its CPU")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"what to measure at each size (default {','.join(CASES)})")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (daemon logs, state) and say where")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        parser.error(f"--nodes {args.nodes!r}: allowed: ascending integers, e.g. 1,50,200")
    if not args.sizes or args.sizes != sorted(set(args.sizes)) or args.sizes[0] < 1:
        parser.error(f"--nodes {args.nodes!r}: allowed: ascending integers >= 1, e.g. 1,50,200")
    args.cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"--cases {','.join(unknown) or '(none)'}: allowed: {', '.join(CASES)}")
    if args.rounds < 1 or args.batch < 1 or args.quiet_rounds <= 0:
        parser.error("--rounds and --batch must be >= 1, --quiet-rounds > 0")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    url, server = open_server(args, workdir)
    server_pid = args.server_pid if server is None else server.pid
    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    try:
        info = server_info(url)
        info["started_here"] = server is not None
        result.update({
            "server": info,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                        "kernel": platform.release(),
                        "mem_total_mb": round((os.sysconf("SC_PAGE_SIZE")
                                               * os.sysconf("SC_PHYS_PAGES")) / 2**20),
                        "load_average_before": [round(x, 2) for x in load_before]},
            "code": git_tree(),
            "heartbeat_interval": args.heartbeat_interval,
            "sizes": [],
        })
        bench = FleetBench(args, url, workdir, server_pid)
        try:
            bench.setup()
            for size in args.sizes:
                print(f"bench: growing the fleet to {size} node(s)", file=sys.stderr)
                level: dict[str, Any] = {"nodes": size, "start": bench.grow(size)}
                print(f"bench: {size} node(s) up in {level['start']['seconds']} s; pushing",
                      file=sys.stderr)
                if "push" in args.cases:
                    level["push_to_all_ms"] = bench.pushes(size)
                if "targeted" in args.cases:
                    print("bench: one program for many nodes", file=sys.stderr)
                    level["targeted_to_all_ms"], level["targeted_new_to_all_ms"] = (
                        bench.targeted(size))
                if "command" in args.cases:
                    print("bench: commands", file=sys.stderr)
                    level["command_to_all_ms"] = bench.commands(size)
                if "quiet" in args.cases:
                    print("bench: quiet window", file=sys.stderr)
                    level["quiet"] = bench.quiet()
                level["load_average"] = [round(x, 2) for x in os.getloadavg()]
                result["sizes"].append(level)
                print(f"bench: {json.dumps(growth(level))}", file=sys.stderr)
        finally:
            # Ctrl-C here must not leave 200 daemons behind: finish the cleanup.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                print(f"bench: stopping {len(bench.daemons)} daemon(s)", file=sys.stderr)
                result["cleanup"] = bench.cleanup()
            finally:
                signal.signal(signal.SIGINT, previous)
        result["growth"] = [growth(level) for level in result["sizes"]]
        result["targets"] = targets(result)
        return result
    finally:
        if server is not None:
            server.stop()


def growth(level: dict[str, Any]) -> dict[str, Any]:
    """One line of the growth curve (None for a case --cases left out)."""
    push = level.get("push_to_all_ms") or {}
    command = level.get("command_to_all_ms") or {}
    quiet = level.get("quiet") or {}
    memory = {kind: (quiet.get(kind) or {}).get("pss_mb") or {}
              for kind in ("daemon_memory", "forkserver_memory")}
    return {
        "nodes": level["nodes"],
        "push_to_all_median_ms": push.get("median"),
        "targeted_to_all_median_ms": (level.get("targeted_to_all_ms") or {}).get("median"),
        "targeted_new_to_all_median_ms": (level.get("targeted_new_to_all_ms")
                                          or {}).get("median"),
        "command_to_all_median_ms": command.get("median"),
        "server_busy_share_push_command": [push.get("server_busy_share"),
                                           command.get("server_busy_share")],
        "fleet_cores_busy_push_command": [push.get("fleet_cores_busy"),
                                          command.get("fleet_cores_busy")],
        "machine_cores_busy_push_command": [push.get("machine_cores_busy"),
                                            command.get("machine_cores_busy")],
        "server_cpu_seconds_per_round": quiet.get("server_cpu_seconds_per_round"),
        "daemons_cpu_percent_of_one_core": quiet.get("daemons_cpu_percent_of_one_core"),
        "daemon_rss_mb_median": ((quiet.get("daemon_memory") or {}).get("rss_mb")
                                 or {}).get("median"),
        "daemons_and_forkservers_pss_mb_total": round(
            sum(m.get("total", 0) for m in memory.values()), 1) if quiet else None,
        "start_seconds": level["start"]["seconds"],
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for level in result["sizes"]:
        if level["nodes"] != 200:
            continue
        for case, name, limit in (
                ("command_to_all_ms", "command_to_all_200_median_ms",
                 TARGET_COMMAND_TO_ALL_200_MS),
                ("targeted_to_all_ms", "targeted_to_all_200_median_ms",
                 TARGET_TARGETED_TO_ALL_200_MS),
                ("targeted_new_to_all_ms", "targeted_new_to_all_200_median_ms",
                 TARGET_TARGETED_TO_ALL_200_MS)):
            if case in level:
                value = level[case].get("median")
                checks[name] = {"limit": limit, "value": value,
                                "met": value is not None and value <= limit}
    return checks


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM cleans up as Ctrl-C does (the stdlib's handler raises KeyboardInterrupt).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return bench_main(args, "himbeere-fleet-", run,
                      keep_hint="rerun with --keep to keep the daemon logs", interruptible=True)


if __name__ == "__main__":
    sys.exit(main())

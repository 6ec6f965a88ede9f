"""Benchmark what one node daemon writes to disk: bytes and fsyncs per hour.

Run from the checkout (``python benchmarks/bench_disk.py``).  Without
``--couch-url`` it starts an in-memory pouchdb-server of its own.  For each
scenario it starts a fresh ``python -m himbeere daemon`` whose state
directory and log file (the daemon's stdout, standing in for the journal)
lie under ``--state-root`` (default /var/tmp: a real disk, not a tmpfs),
waits ``--settle`` seconds, then measures a window of ``--window`` seconds
and extrapolates to an hour:

idle
    no program.
programs
    ``--programs`` (5) programs running, each printing one line every
    ``--program-interval`` seconds (10).
flood
    one program printing ``--flood-rate`` (10,000) lines a second.

Figures (``per_hour``), summed over the daemon, its fork server and the
programs (which write no file of their own here, so what they write is
their output: straight into the daemon's log, before the rate limit moved
that into the daemon); each process's share is in ``window_by_process``:

``write_bytes``
    ``/proc/PID/io`` ``write_bytes``: what the processes dirtied in the page
    cache of a block device (counted when dirtied, so before the kernel
    writes it back); ``cancelled_write_bytes`` is what was truncated or
    deleted before it reached the disk (a temporary file replaced by
    ``os.replace`` counts in both).  0 on a tmpfs: hence ``--state-root``.
``wchar``
    every byte passed to write() and the like: the log and state files, and
    a program's pipe to the daemon (send() to the server is not counted).
``fsyncs``
    fsync, fdatasync and sync_file_range calls, counted by
    ``strace -f --seccomp-bpf`` (the daemon runs under it; only these
    calls stop) with the file each was for; None without strace.
``disk_growth_bytes``
    growth of the files under the state directory and of the log.

Processes that ended inside the window (none in these scenarios) are not
counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_daemon import (  # noqa: E402
    BenchError,
    bench_main,
    children,
    cmdline,
    open_server,
    server_info,
)
from himbeere.couch import Couch  # noqa: E402
from himbeere.programs import kill_recorded_programs  # noqa: E402
from tests.nodes import free_udp_port  # noqa: E402
from tests.servers import _die_with_parent, create_database, delete_database  # noqa: E402

#: Bytes per hour the idle daemon may write (issue 9).
IDLE_TARGET_BYTES_PER_HOUR = 2 * 1024 * 1024
IO_FIELDS = ("write_bytes", "cancelled_write_bytes", "wchar", "syscw")

QUIET_PROGRAM = """\
import time
def main():
    n = 0
    while not should_quit():
        print('still here', n)
        n += 1
        for _ in range(int({interval} * 20)):
            if should_quit():
                return
            time.sleep(0.05)
"""

FLOOD_PROGRAM = """\
import os
import time
def main():
    n, start = 0, time.monotonic()
    while not should_quit():
        for _ in range({batch}):
            print('flood line', n)
            n += 1
        ahead = start + n / {rate} - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        if n % {rate_int} < {batch}:  # once a second, on a tmpfs if there is one
            with open({counter!r} + '.tmp', 'w') as out:
                out.write(str(n))
            os.replace({counter!r} + '.tmp', {counter!r})
"""


def read_io(pid: int) -> Optional[dict[str, int]]:
    try:
        with open(f"/proc/{pid}/io") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return None
    return {key: int(fields[key]) for key in IO_FIELDS if key in fields}


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def tree_size(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            for entry in path.rglob("*"):
                try:
                    if entry.is_file() and not entry.is_symlink():
                        total += entry.stat().st_size
                except OSError:
                    pass
    return total


class TracedDaemon:
    """``python -m himbeere daemon``, under strace when there is one."""

    def __init__(self, server: str, database: str, workdir: Path, mac_id: int,
                 heartbeat: float, strace: Optional[str]) -> None:
        self.state_dir = workdir / "state"
        self.log_path = workdir / "daemon.log"
        self.trace_path = workdir / "fsync.trace" if strace else None
        self.args = [
            sys.executable, "-m", "himbeere", "daemon", "--server", server,
            "--database", database, "--state-dir", str(self.state_dir),
            "--mac-id", str(mac_id), "--heartbeat-interval", f"{heartbeat:g}",
            # A pairing port of its own: daemons of other runs and tests share this machine.
            "--discovery-address", "127.255.255.255", "--discovery-port", str(free_udp_port()),
        ]
        if strace:
            self.args = [strace, "-f", "-qq", "-ttt", "-y", "--seccomp-bpf",
                         "-e", "trace=fsync,fdatasync,sync_file_range", "-e", "signal=none",
                         "-o", str(self.trace_path), *self.args]
        self.empty_ini = workdir / "empty.conf"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.pid: Optional[int] = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.empty_ini.touch()
        env = dict(os.environ, HIMBEERE_CONFIG=str(self.empty_ini), PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT),
                                            preexec_fn=_die_with_parent)
        self.pid = self._find_daemon()

    def _find_daemon(self) -> int:
        assert self.process is not None
        if self.trace_path is None:
            return self.process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in children(self.process.pid):
                # strace forks short-lived children of its own, with its own
                # command line, to probe the kernel: only the exec'd daemon counts
                parts = cmdline(pid)
                if parts[:1] == [sys.executable] and "himbeere" in parts:
                    return pid
            time.sleep(0.05)
        raise BenchError("the daemon did not start under strace")

    def processes(self) -> list[int]:
        """The daemon, its fork server and every program."""
        assert self.pid is not None
        return [self.pid, *descendants(self.pid)]

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        """The daemon itself still runs (a zombie counts as gone)."""
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def _signal(self, sig: int) -> bool:
        try:
            os.kill(self.pid or 0, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM to the daemon (strace blocks it); SIGKILL past ``timeout``."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None and self.pid:
                # Under strace the daemon is strace's child and may be gone
                # already while strace still waits for its other tracees.
                if not self._signal(signal.SIGTERM):
                    print(f"bench: daemon {self.pid} had exited before it was stopped; "
                          f"its log ends:\n{self.log_tail()}", file=sys.stderr)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"bench: daemon {self.pid} ignored SIGTERM; SIGKILL", file=sys.stderr)
                    self._signal(signal.SIGKILL)
                    self.process.kill()
                    self.process.wait(10)
        finally:
            kill_recorded_programs(self.state_dir)
        return self.process.returncode


def fsyncs(trace: Optional[Path], start: float, end: float, workdir: Path) -> Any:
    """fsync-like calls between ``start`` and ``end`` (time.time()), by file."""
    if trace is None:
        return None
    by_file: collections.Counter[str] = collections.Counter()
    pattern = re.compile(r"^\d+\s+(\d+\.\d+)\s+(\w+)\(\d+(?:<([^>]*)>)?")
    try:
        lines = trace.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = pattern.match(line)
        if match and start <= float(match.group(1)) <= end:
            path = (match.group(3) or "?").replace(str(workdir), "")
            by_file[f"{match.group(2)} {path}"] += 1
    return {"count": sum(by_file.values()), "by_file": dict(by_file)}


class Scenario:
    def __init__(self, args: argparse.Namespace, server_url: str, root: Path, name: str) -> None:
        self.args = args
        self.name = name
        self.server_url = server_url
        self.workdir = Path(tempfile.mkdtemp(prefix=f"himbeere-disk-{name}-", dir=root))
        self.database = f"bench_disk_{secrets.token_hex(4)}"
        self.couch = Couch(server_url)
        self.daemon = TracedDaemon(server_url, self.database, self.workdir, args.mac_id,
                                   args.heartbeat_interval, args.strace)
        shm = Path("/dev/shm")
        self.counter = (shm if shm.is_dir() else self.workdir) / f"{self.workdir.name}.count"

    def programs(self) -> dict[str, str]:
        if self.name == "programs":
            code = QUIET_PROGRAM.format(interval=self.args.program_interval)
            return {f"quiet{i}": code for i in range(self.args.programs)}
        if self.name == "flood":
            batch = max(1, int(self.args.flood_rate // 100))
            return {"flood": FLOOD_PROGRAM.format(batch=batch, rate=float(self.args.flood_rate),
                                                  rate_int=int(self.args.flood_rate),
                                                  counter=str(self.counter))}
        return {}

    def run(self) -> dict[str, Any]:
        for name in (self.database, self.database + "_status"):
            create_database(self.server_url, name)
        try:
            self.daemon.start()
            programs = self.programs()
            db = self.couch.database(self.database)
            for doc_id, code in programs.items():
                db.save({"_id": doc_id, "type": self.args.mac_id, "name": doc_id, "code": code})
            self._wait_running(len(programs))
            time.sleep(self.args.settle)
            return self._measure(len(programs))
        finally:
            exit_code = self.daemon.stop()
            if exit_code:
                print(f"bench: {self.name}: daemon exit code {exit_code}", file=sys.stderr)
            for name in (self.database, self.database + "_status"):
                try:
                    delete_database(self.server_url, name)
                except Exception as exc:  # noqa: BLE001 - cleanup goes on
                    print(f"bench: could not delete {name}: {exc}", file=sys.stderr)
            self.counter.unlink(missing_ok=True)
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_running(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.daemon.alive():
                raise BenchError(f"{self.name}: the daemon exited before its programs ran; "
                                 f"log:\n{self.daemon.log_tail()}")
            if count == 0 and "himbeere node" in self.daemon.log_tail(100000):
                return
            if count and len(self.daemon.processes()) >= count + 2:
                return
            time.sleep(0.2)
        raise BenchError(f"{self.name}: {count} programs did not start; log:\n"
                         f"{self.daemon.log_tail()}")

    def _flood_lines(self) -> int:
        try:
            return int(self.counter.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _measure(self, programs: int) -> dict[str, Any]:
        pids = self.daemon.processes()
        before = {pid: read_io(pid) for pid in pids}
        size0 = tree_size(self.daemon.state_dir, self.daemon.log_path)
        lines0 = self._flood_lines()
        wall0, mono0 = time.time(), time.monotonic()
        time.sleep(self.args.window)
        seconds = time.monotonic() - mono0
        wall1 = time.time()
        after = {pid: read_io(pid) for pid in self.daemon.processes()}
        if not self.daemon.alive():
            raise BenchError(f"{self.name}: the daemon exited during the window; "
                             f"log:\n{self.daemon.log_tail()}")
        size1 = tree_size(self.daemon.state_dir, self.daemon.log_path)
        lines1 = self._flood_lines()
        forkserver = next((pid for pid in children(self.daemon.pid or 0)
                           if "himbeere.forkserver" in cmdline(pid)), None)
        by_process: dict[str, dict[str, int]] = {}
        for pid, now in after.items():
            if now is None:
                continue
            was = before.get(pid) or dict.fromkeys(IO_FIELDS, 0)
            role = ("daemon" if pid == self.daemon.pid else
                    "forkserver" if pid == forkserver else "programs")
            slot = by_process.setdefault(role, dict.fromkeys(IO_FIELDS, 0))
            for key in IO_FIELDS:
                slot[key] += now.get(key, 0) - (was or {}).get(key, 0)
        # Everything: these programs write no file of their own (the flood's
        # counter is on a tmpfs), so what they write to disk is their output,
        # which went straight into the daemon's log before it was rate-limited.
        totals = {key: sum(slot.get(key, 0) for slot in by_process.values())
                  for key in IO_FIELDS}
        hour = 3600.0 / seconds
        result: dict[str, Any] = {
            "seconds": round(seconds, 1),
            "programs": programs,
            "processes": len(after),
            "per_hour": {
                "write_bytes": round(totals["write_bytes"] * hour),
                "net_write_bytes": round((totals["write_bytes"]
                                          - totals["cancelled_write_bytes"]) * hour),
                "wchar": round(totals["wchar"] * hour),
                "disk_growth_bytes": round((size1 - size0) * hour),
            },
            "window": dict(totals, disk_growth_bytes=size1 - size0),
            "window_by_process": by_process,
        }
        traced = fsyncs(self.daemon.trace_path, wall0, wall1, self.workdir)
        if traced is not None:
            result["fsyncs"] = traced
            result["per_hour"]["fsyncs"] = round(traced["count"] * hour)
        else:
            result["fsyncs"] = None
        if self.name == "flood":
            result["flood_lines_per_second"] = round((lines1 - lines0) / seconds)
        log = self.daemon.log_path.read_text(errors="replace")
        result["log_lines_not_shown"] = sum(
            int(n) for n in re.findall(r"\] (\d+) lines not shown", log))
        return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--couch-url", metavar="URL",
                        help="admin URL of a CouchDB to use instead of a pouchdb-server")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--state-root", default="/var/tmp",
                        help="where the daemons' state and logs go; a real disk (/var/tmp)")
    parser.add_argument("--scenarios", default="idle,programs,flood",
                        help="comma-separated: idle, programs, flood (all)")
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds measured per scenario (60)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the programs started, before the window (5)")
    parser.add_argument("--programs", type=int, default=5, help="programs in 'programs' (5)")
    parser.add_argument("--program-interval", type=float, default=10.0,
                        help="seconds between two lines of each such program (10)")
    parser.add_argument("--flood-rate", type=float, default=10000.0,
                        help="lines per second of the 'flood' program (10000)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0,
                        help="the daemon's heartbeat (10, its default)")
    parser.add_argument("--mac-id", type=int, default=4343, help="the node's MAC id")
    parser.add_argument("--no-strace", action="store_true", help="do not count fsyncs")
    parser.add_argument("--keep", action="store_true", help="keep state dirs and logs")
    args = parser.parse_args(argv)
    args.scenarios = [name for name in args.scenarios.split(",") if name]
    unknown = set(args.scenarios) - {"idle", "programs", "flood"}
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: {sorted(unknown)} unknown; allowed: idle, programs, flood")
    if args.window <= 0 or args.flood_rate <= 0 or args.programs < 1:
        parser.error("--window and --flood-rate must be > 0, --programs >= 1")
    args.strace = None if args.no_strace else shutil.which("strace")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    root = Path(args.state_root)
    root.mkdir(parents=True, exist_ok=True)
    url, server = open_server(args, workdir)
    try:
        info = server_info(url)
        info["started_here"] = server is not None
        scenarios = {name: Scenario(args, url, root, name).run() for name in args.scenarios}
    finally:
        if server is not None:
            server.stop()
    filesystem = subprocess.run(["df", "--output=fstype", str(root)], capture_output=True,
                                text=True, check=False).stdout.split()[-1:]
    result: dict[str, Any] = {
        "server": info,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "kernel": platform.release(),
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "state_root": str(root),
        "state_root_filesystem": filesystem[0] if filesystem else None,
        "heartbeat_interval": args.heartbeat_interval,
        "fsyncs_counted_by": "strace -f --seccomp-bpf" if args.strace else None,
        "scenarios": scenarios,
    }
    if "idle" in scenarios:
        value = scenarios["idle"]["per_hour"]["write_bytes"]
        result["targets"] = {"idle_write_bytes_per_hour": {
            "limit": IDLE_TARGET_BYTES_PER_HOUR, "value": value,
            "met": value <= IDLE_TARGET_BYTES_PER_HOUR}}
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return bench_main(args, "himbeere-bench-disk-", run,
                      keep_hint="rerun with --keep to keep the daemons' logs")


if __name__ == "__main__":
    sys.exit(main())

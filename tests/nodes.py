"""Real node daemons for the tests: ``python -m himbeere daemon`` subprocesses.

Each :class:`Node` has its own state directory, MAC id and log file.  The
``node_factory`` fixture (conftest.py) stops every node a test started and
kills any program a ``kill -9``-ed daemon left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from himbeere.couch import Couch
from himbeere.programs import kill_recorded_programs
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Node:
    """One daemon process for one simulated node."""

    def __init__(self, url: str, database: str, state_dir: Path, mac_id: int,
                 flags: Optional[list[str]] = None, env: Optional[dict[str, str]] = None) -> None:
        self.url = url
        self.database = database
        self.state_dir = state_dir
        self.mac_id = mac_id
        self.flags = list(flags or [])
        self.env = dict(env or {})
        self.log_path = state_dir.parent / f"node-{mac_id}-{state_dir.name}.log"
        #: Pairing listens on loopback, on a port of this node's own: nodes on one
        #: machine would otherwise all bind 53000 ("Address already in use").
        self.discovery_port = free_udp_port()
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.couch = Couch(url)
        #: Start it through the launcher (``himbeere launch``), which can upgrade it.
        self.launch = False

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "himbeere", "launch" if self.launch else "daemon",
            "--server", self.url, "--database", self.database,
            "--state-dir", str(self.state_dir), "--mac-id", str(self.mac_id),
            "--heartbeat-interval", "1", "--grace-period", "2",
            "--discovery-address", "127.255.255.255", "--discovery-port", str(self.discovery_port),
            *self.flags,
        ]

    def start(self) -> Node:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        empty_ini = self.state_dir.parent / "empty.conf"
        empty_ini.touch()
        env = dict(os.environ, HIMBEERE_CONFIG=str(empty_ini), PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1")
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        wait_for(lambda: self.log().count(text) >= count, timeout,
                 message=lambda: f"{text!r} x{count} not in node log:\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM and wait; returns the exit code."""
        if not self.alive():
            return self.process.returncode if self.process else None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"daemon did not stop in {timeout} s:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        """``kill -9`` the daemon alone (its programs live on, as on a Pi)."""
        if self.alive():
            self.signal(signal.SIGKILL)
            self.process.wait(10)  # type: ignore[union-attr]

    def kill_programs(self) -> None:
        """Kill program groups recorded by the daemon (after a ``kill -9``)."""
        kill_recorded_programs(self.state_dir)

    # -- what a user sees --------------------------------------------------------------
    def status(self) -> Optional[dict[str, Any]]:
        db = self.couch.database(self.database + "_status")
        try:
            return db.get(f"status:{self.mac_id}")
        except Exception:
            return None

    def program(self, doc_id: str) -> dict[str, Any]:
        status = self.status() or {}
        return (status.get("programs") or {}).get(doc_id) or {}

    def wait_program(self, doc_id: str, timeout: float = 20.0, **expected: Any) -> dict[str, Any]:
        """Wait until the status shows ``doc_id`` with the ``expected`` fields."""
        def check() -> Any:
            program = self.program(doc_id)
            if program and all(program.get(k) == v for k, v in expected.items()):
                return program
            return None

        return wait_for(check, timeout, message=lambda: (
            f"program {doc_id} never had {expected}; status: "
            f"{json.dumps(self.program(doc_id))}\nlog:\n{self.log()[-3000:]}"))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_file(path: Path, timeout: float = 20.0, contains: str = "") -> str:
    """Wait until ``path`` exists (and holds ``contains``); return its text."""
    def check() -> Optional[str]:
        try:
            text = path.read_text()
        except OSError:
            return None
        return text if contains in text else None

    return wait_for(check, timeout, message=f"{path} never appeared with {contains!r}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def until(seconds: float) -> float:
    return time.monotonic() + seconds


def start_nodes(node_factory: Callable[..., Node], *macs: int,
                flags: Optional[list[str]] = None) -> list[Node]:
    """Start daemons and wait until each has sent a heartbeat (so it is "known")."""
    nodes = [node_factory(mac_id=mac, flags=flags) for mac in macs]
    for node in nodes:
        wait_for(node.status, 30, message=lambda n=node: f"no heartbeat:\n{n.log()[-3000:]}")
    return nodes

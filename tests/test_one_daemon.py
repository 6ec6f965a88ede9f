"""One daemon per node: a second one on the same state directory is refused.

Regression (issue 9, section 4): two daemons for one node ran 16 of 20
commands twice and killed each other's programs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from himbeere import service
from himbeere.couch import Database
from tests.helpers import wait_for
from tests.nodes import ROOT, pid_alive
from tests.test_programs import NodeFactory, looping, wait_pid


def test_second_daemon_is_refused_and_the_first_goes_on(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    state_dir, pidfile = tmp_path / "state", tmp_path / "prog.pid"
    code_db.save({"_id": "p", "type": 1000, "code": looping(pidfile)})
    first = node_factory(mac_id=1000, state_dir=state_dir)
    program = wait_pid(pidfile)
    first.wait_program("p", state="running", pid=program)

    # The same credentials: provisioning the node again would change its password.
    second = node_factory(mac_id=1000, state_dir=state_dir, start=False, url=first.url)
    second.log_path = tmp_path / "second.log"  # not the first one's
    second.start()
    assert second.process is not None
    assert second.process.wait(30) == 1
    error = (f"himbeere: error: another himbeere daemon (pid {first.pid}) already runs on "
             f"state directory {state_dir}; stop that one first, or give this one a "
             "--state-dir of its own")
    assert second.log().strip() == error  # one line, no traceback

    # The first one keeps its program, and runs a command exactly once.
    ledger = tmp_path / "ledger"
    code_db.save({"_id": "c1", "type": "1000_cmd", "cmd": ["sh", "-c", f"echo ran >> {ledger}"]})
    doc = wait_for(lambda: (code_db.get("c1") or {}).get("finished") and code_db.get("c1"))
    assert doc["returncode"] == 0
    assert ledger.read_text() == "ran\n"
    assert pid_alive(program) and first.alive()
    assert first.program("p")["pid"] == program
    assert "killing program" not in first.log() + second.log()


def test_background_start_is_refused_while_a_foreground_daemon_runs(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = node_factory(mac_id=1000, state_dir=state_dir)
    first.wait_log("himbeere node 1000")
    empty = tmp_path / "empty.conf"
    empty.touch()
    try:
        started = subprocess.run(
            [sys.executable, "-m", "himbeere", "daemon", "start", "--server", first.url,
             "--database", first.database, "--state-dir", str(state_dir), "--mac-id", "1000"],
            capture_output=True, text=True, timeout=60, cwd=str(ROOT),
            env=dict(os.environ, HIMBEERE_CONFIG=str(empty), PYTHONPATH=str(ROOT)))
    finally:
        background = service.read_pid(state_dir / "himbeere.pid")
        if background and background > 0 and service.alive(background):
            os.kill(background, signal.SIGKILL)  # a second daemon started after all
    assert started.returncode == 1
    assert started.stderr.splitlines() == [
        f"himbeere: another himbeere daemon (pid {first.pid}) already runs on state "
        f"directory {state_dir}; stop that one first, or give this one a --state-dir of "
        "its own"]
    assert not (state_dir / "himbeere.pid").exists()
    assert first.alive()


def test_a_killed_daemon_leaves_no_lock_behind(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    state_dir, pidfile = tmp_path / "state", tmp_path / "prog.pid"
    code_db.save({"_id": "p", "type": 1000, "code": looping(pidfile)})
    first = node_factory(mac_id=1000, state_dir=state_dir)
    old = wait_pid(pidfile)
    first.kill()  # kill -9: the kernel drops the lock with the process
    second = node_factory(mac_id=1000, state_dir=state_dir, url=first.url)
    new = wait_pid(pidfile, other_than=old)
    second.wait_program("p", state="running", pid=new)
    assert "already runs" not in second.log()

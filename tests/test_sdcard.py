"""Sparing the SD card (issue 9, section 5), with real daemons.

- A program that floods its output shows at most ``program_log_rate`` lines
  a second in the daemon's log, then ``[name] N lines not shown``; the
  status database's log ring still gets the lines.
- The background daemon's log file rotates at ``log_max_bytes`` and keeps
  ``log_backups`` old files.
- A ``restart: never`` program that ended does not run again when the
  daemon restarts or reloads; it does after a reboot (a new boot id) or
  when its code changes, and the status says which.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from himbeere.couch import Database
from himbeere.logship import log_id
from himbeere.oneshot import RUNS_AGAIN
from himbeere.programs import kill_recorded_programs
from tests.helpers import wait_for
from tests.nodes import ROOT, Node, free_udp_port
from uploader import install, ops
from uploader.fleet import Fleet
from uploader.opscli import format_detail

NodeFactory = Callable[..., Node]


def shown_and_hidden(log: str, name: str, prefix: str) -> tuple[int, int]:
    """Lines of ``name`` starting ``prefix`` in a daemon log, and the sum of "N lines not shown"."""
    shown = log.count(f"[{name}] {prefix}")
    hidden = sum(int(n) for n in re.findall(rf"\[{name}\] (\d+) lines not shown", log))
    return shown, hidden


def test_flooding_program_is_rate_limited_in_the_daemon_log(
        node_factory: NodeFactory, code_db: Database, couch: Any, dbname: str) -> None:
    """Regression: 10,000 lines/s grew the daemon's log by 12 MB in 30 s, every line copied."""
    code_db.save({"_id": "flood", "type": 1000, "name": "flood", "restart": "never", "code": (
        "def main():\n"
        "    for i in range(3000):\n"
        "        print('flooding', i)\n"
        "    print('flood over')\n")})
    node = node_factory(mac_id=1000, env={"HIMBEERE_PROGRAM_LOG_RATE": "5"})
    status_db = couch.database(dbname + "_status")

    def shipped() -> Any:
        doc = status_db.get(log_id(1000, "flood")) or {}
        # The program's own lines: the daemon's ("started", ...) have a kind too.
        texts = [line[1] for line in doc.get("lines", []) if len(line) == 2]
        return (doc, texts) if texts and texts[-1] == "flood over" else None

    doc, texts = wait_for(shipped, 30, message=lambda: node.log()[-2000:])
    assert len(doc["lines"]) == 1000 and texts[-2] == "flooding 2999"  # the ring: the last 1000
    node.wait_program("flood", state="finished")
    assert node.stop() == 0  # the count of lines not shown yet is written at the stop
    log = node.log()
    shown, hidden = shown_and_hidden(log, "flood", "flooding ")
    shown_over = log.count("[flood] flood over")
    assert "lines not shown (over 5 lines/s" in log, log[-3000:]
    assert shown < 100, f"{shown} of 3000 lines in the daemon's log"
    # Every line is either shown or counted, never silently lost.
    assert shown + shown_over + hidden == 3001, (shown, hidden)


def test_quiet_program_shows_every_line(node_factory: NodeFactory, code_db: Database) -> None:
    code_db.save({"_id": "quiet", "type": 1000, "name": "quiet", "restart": "never", "code": (
        "def main():\n"
        "    for i in range(3):\n"
        "        print('quiet', i)\n")})
    node = node_factory(mac_id=1000)
    node.wait_program("quiet", state="finished")
    node.wait_log("[quiet] quiet 2\n")
    assert node.stop() == 0
    assert "not shown" not in node.log()


# -- the log file rotates ---------------------------------------------------------------------

def himbeere(node: Node, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``himbeere daemon ARGS`` with the node's settings, as an init script runs it."""
    empty_ini = node.state_dir.parent / "empty.conf"
    empty_ini.touch()
    env = dict(os.environ, HIMBEERE_CONFIG=str(empty_ini), PYTHONPATH=str(ROOT),
               HIMBEERE_DISCOVERY_ADDRESS="127.255.255.255",
               HIMBEERE_DISCOVERY_PORT=str(free_udp_port()), **settings)
    command = node.command()
    at = command.index("daemon") + 1
    return subprocess.run(command[:at] + list(args) + command[at:], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60, check=False)


def test_background_log_file_rotates(node_factory: NodeFactory, code_db: Database) -> None:
    """Regression: the daemon's log file grew without limit (no rotation)."""
    code_db.save({"_id": "chatty", "type": 1000, "name": "chatty", "restart": "never", "code": (
        "import time\n"
        "def main():\n"
        "    for i in range(400):\n"
        "        print('chatty line', i, 'x' * 100)\n"
        "        time.sleep(0.002)\n"
        "    print('chatty done')\n")})
    node = node_factory(mac_id=1000, start=False)
    node.state_dir.mkdir(parents=True)
    log_file = node.state_dir / "himbeere.log"
    started = himbeere(node, "start", HIMBEERE_LOG_MAX_BYTES="4096", HIMBEERE_LOG_BACKUPS="2",
                       HIMBEERE_PROGRAM_LOG_RATE="100000")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        def logs() -> str:
            return "".join(path.read_text(errors="replace")
                           for path in sorted(node.state_dir.glob("himbeere.log*")))

        wait_for(lambda: "[chatty] chatty done" in logs(), 60, message=logs)
        files = sorted(path.name for path in node.state_dir.glob("himbeere.log*"))
        assert files == ["himbeere.log", "himbeere.log.1", "himbeere.log.2"]
        for path in node.state_dir.glob("himbeere.log*"):
            assert path.stat().st_size <= 4096 + 200, path  # at most one record over
        # What goes to stderr directly (stacks on SIGUSR1) follows to the new file.
        pid = int((node.state_dir / "himbeere.pid").read_text())
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: f"--- himbeere daemon {pid} stacks ---" in logs(), 20, message=logs)
        assert f"--- himbeere daemon {pid} stacks ---" in (
            log_file.read_text() + (node.state_dir / "himbeere.log.1").read_text())
    finally:
        stopped = himbeere(node, "stop")
        kill_recorded_programs(node.state_dir)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


# -- restart: never ---------------------------------------------------------------------------

def once_code(runs: Path, extra: str = "") -> str:
    return ("def main():\n"
            f"    with open({str(runs)!r}, 'a') as out:\n"
            "        out.write('ran\\n')\n"
            f"    print('once ran'){extra}\n")


def runs_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def finished_once(node_factory: NodeFactory, code_db: Database,
                  tmp_path: Path) -> tuple[Node, Path, Callable[[], int], str]:
    """A ``restart: never`` program that has run once and finished, beside one that runs on.

    Returns the node, the file each run of it appends to, a count of the
    marker program's starts (once it starts again, the daemon has handled
    both documents) and when the program ended.
    """
    runs, marker = tmp_path / "once.runs", tmp_path / "marker.pid"
    code_db.save({"_id": "once", "type": 1000, "name": "once", "restart": "never",
                  "code": once_code(runs)})
    code_db.save({"_id": "marker", "type": 1000, "name": "marker", "code": (
        "import os, time\n"
        "def main():\n"
        f"    open({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")})
    node = node_factory(mac_id=1000)
    program = node.wait_program("once", state="finished")
    assert runs_of(runs) == 1
    assert program["runs_again"] == RUNS_AGAIN and program["ended"]
    wait_for(lambda: runs_of(marker) == 1)
    return node, runs, lambda: runs_of(marker), program["ended"]


def test_finished_never_program_stays_finished_across_reload_and_restart(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path, couch_url: str,
        dbname: str) -> None:
    """Regression: a finished ``restart: never`` program ran again on every daemon start."""
    node, runs, marker_starts, ended = finished_once(node_factory, code_db, tmp_path)

    # A reload restarts every running program, but not this one.
    node.signal(signal.SIGHUP)
    wait_for(lambda: marker_starts() == 2, 30, message=lambda: node.log()[-3000:])
    node.wait_program("marker", state="running")
    assert runs_of(runs) == 1
    assert node.program("once")["state"] == "finished"

    # A daemon restart: still finished, with the time it ended the first time.
    assert node.stop() == 0
    node.start()
    wait_for(lambda: marker_starts() == 3, 30, message=lambda: node.log()[-3000:])
    program = node.wait_program("once", state="finished", runs_again=RUNS_AGAIN)
    assert program["ended"] == ended and program["pid"] is None
    node.wait_log("once: finished at")
    assert runs_of(runs) == 1
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)  # the views `himbeere status` reads
    shown = "\n".join(format_detail(ops.node_detail(fleet, "1000")))
    assert f"once (once) finished at {ended}; runs again at next boot or code change" in shown


def test_finished_never_program_runs_again_after_a_reboot(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    node, runs, _, _ = finished_once(node_factory, code_db, tmp_path)
    assert node.stop() == 0
    record_path = node.state_dir / "ended.json"
    record = json.loads(record_path.read_text())
    assert list(record["programs"]) == ["once"]
    record_path.write_text(json.dumps(dict(record, boot_id="an-earlier-boot")))
    node.start()
    wait_for(lambda: runs_of(runs) == 2, 30, message=lambda: node.log()[-3000:])
    node.wait_program("once", state="finished", runs_again=RUNS_AGAIN)


def test_finished_never_program_runs_again_when_its_code_changes(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    node, runs, _, _ = finished_once(node_factory, code_db, tmp_path)
    current = code_db.get("once")
    assert current is not None
    changed = code_db.save(dict(current, code=once_code(runs, extra="  # changed")))
    wait_for(lambda: runs_of(runs) == 2, 30, message=lambda: node.log()[-3000:])
    node.wait_program("once", state="finished", rev=changed["_rev"], runs_again=RUNS_AGAIN)


def test_other_policies_start_at_every_daemon_start(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    """on-failure programs that finished run again on a daemon start, as before."""
    runs = tmp_path / "again.runs"
    code_db.save({"_id": "again", "type": 1000, "name": "again", "restart": "on-failure",
                  "code": once_code(runs)})
    node = node_factory(mac_id=1000)
    assert node.wait_program("again", state="finished")["runs_again"] is None
    assert node.stop() == 0
    node.start()
    wait_for(lambda: runs_of(runs) == 2, 30, message=lambda: node.log()[-3000:])


def test_boot_id_is_read(tmp_path: Path) -> None:
    from himbeere.oneshot import boot_id

    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert re.fullmatch(r"[0-9a-f-]{36}", boot_id())
    assert boot_id(str(tmp_path / "missing")) == ""
    assert sys.platform != "linux" or boot_id()


# -- one step at a time ------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_output_log_shows_the_rate_then_counts(caplog: Any) -> None:
    from himbeere.logship import OutputLog

    clock = Clock()
    output = OutputLog(rate=3, clock=clock)
    with caplog.at_level("INFO", logger="himbeere.output"):
        output.add("1:p", "p", [f"a{i}" for i in range(10)], dropped=5)
        assert [r.getMessage() for r in caplog.records] == ["[p] a0", "[p] a1", "[p] a2"]
        output.tick()  # less than a second later: no report yet
        assert len(caplog.records) == 3
        clock.now += 1.0
        output.tick()
        assert caplog.records[-1].getMessage().startswith(
            "[p] 12 lines not shown (over 3 lines/s")
        clock.now += 1.0  # a second later the bucket holds 3 lines again
        output.add("1:p", "p", ["b0", "b1", "b2", "b3"])
        assert [r.getMessage() for r in caplog.records[-3:]] == ["[p] b0", "[p] b1", "[p] b2"]
        output.flush()  # the daemon stops: the count goes out at once
        assert caplog.records[-1].getMessage().startswith("[p] 1 lines not shown")


def test_log_settings_from_environment_and_their_errors(tmp_path: Path) -> None:
    import pytest

    from himbeere import config
    from himbeere.exceptions import ConfigError

    empty = str(tmp_path / "empty.conf")
    Path(empty).touch()
    loaded = config.load(environ={"HIMBEERE_LOG_MAX_BYTES": "4096", "HIMBEERE_LOG_BACKUPS": "2",
                                  "HIMBEERE_PROGRAM_LOG_RATE": "0"}, config_file=empty)
    assert (loaded.log_max_bytes, loaded.log_backups, loaded.program_log_rate) == (4096, 2, 0)
    defaults = config.load(environ={}, config_file=empty)
    assert (defaults.log_max_bytes, defaults.log_backups, defaults.program_log_rate) == (
        1024 * 1024, 3, 20)
    for key, value, message in (("LOG_BACKUPS", "0", "log_backups: 0 must be"),
                                ("LOG_MAX_BYTES", "10", "log_max_bytes: 10 must be"),
                                ("PROGRAM_LOG_RATE", "-1", "program_log_rate: -1.0 must be"),
                                ("LOG_BACKUPS", "many", "log_backups: 'many' is not")):
        with pytest.raises(ConfigError, match=message):
            config.load(environ={f"HIMBEERE_{key}": value}, config_file=empty)

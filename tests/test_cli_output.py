"""What the laptop's commands print: ``himbeere cmd`` output, ``logs -f`` across a
server restart, a pipe closed early, and commands a node joined too late for.

``himbeere cmd`` with real daemons is in test_fleet_commands.py; these tests
write result documents the way a node does, where the printing is the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Optional

import pytest

from himbeere.logship import LogShipper
from himbeere.status import status_id
from tests.helpers import himbeere, wait_for
from tests.nodes import ROOT, Node, start_nodes
from uploader import install, ops
from uploader.dashboard.payloads import command_payload, node_payload
from uploader.fleet import Fleet

NodeFactory = Callable[..., Node]
ARTIFACTS = ROOT / "artifacts"

pytestmark = pytest.mark.usefixtures("cli_env")


def heartbeat(fleet: Fleet, mac: int) -> None:
    """A status document as a daemon writes it (for tests that need no daemon)."""
    now = time.time()
    fleet.status.save({"_id": status_id(mac), "type": "himbeere-status", "node": mac,
                       "state": "running", "heartbeat_time": now,
                       "heartbeat_server_time": now, "heartbeat_interval": 10,
                       "programs": {}})


def answer(fleet: Fleet, command_id: str, mac: int, stdout: str = "", stderr: str = "",
           returncode: Optional[int] = 0, state: str = "done", **fields: Any) -> None:
    """The result document a node writes for a fleet command."""
    fleet.status.save(dict({"_id": f"result:{command_id}:{mac}", "type": "himbeere-result",
                            "command": command_id, "node": mac, "state": state,
                            "returncode": returncode, "ret": [stdout, stderr],
                            "duration": 0.25}, **fields))


def env_for(server: str, dbname: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HIMBEERE_SERVER=server,
               HIMBEERE_DATABASE=dbname)
    env.pop("HIMBEERE_STATUS_DATABASE", None)
    return env


# -- himbeere cmd: each node's whole output -----------------------------------------------
def test_cmd_result_shows_every_line_of_stdout_and_stderr_per_node(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.set_name(1001, "kitchen")
    command_id = ops.create_command(fleet, ["sh", "-c", "df -h; ls /nope"], [1001, 1002])
    answer(fleet, command_id, 1001, "Filesystem  Size\n/dev/root   30G\n/dev/sda1  100G\n",
           "ls: cannot access '/nope': No such file or directory\n", returncode=2)
    answer(fleet, command_id, 1002, "Filesystem  Size\n/dev/root   15G\n")
    code, out, err = himbeere(capsys, "cmd", "--result", command_id)
    assert code == 1 and "1 node(s) failed" in err
    assert out.splitlines() == [
        f"command {command_id}: sh -c 'df -h; ls /nope'",
        "=== kitchen (1001): done, exit 2, 0.25s",
        "--- stdout",
        "Filesystem  Size",
        "/dev/root   30G",
        "/dev/sda1  100G",
        "--- stderr",
        "ls: cannot access '/nope': No such file or directory",
        "=== 1002: done, exit 0, 0.25s",
        "--- stdout",
        "Filesystem  Size",
        "/dev/root   15G",
    ]
    # --brief: the one-line table of before, first line of output only
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id, "--brief")
    rows = out.splitlines()
    assert rows[1].split() == ["NODE", "EXIT", "STATE", "DURATION", "OUTPUT"]
    assert rows[2].split()[:5] == ["kitchen", "(1001)", "2", "done", "0.25s"]
    assert rows[2].endswith("Filesystem  Size") and "30G" not in out


def test_cmd_cuts_long_output_and_says_how_much_is_left(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    command_id = ops.create_command(fleet, ["seq", "250"], [1001])
    numbers = "".join(f"{i}\n" for i in range(1, 251))
    answer(fleet, command_id, 1001, numbers, "warning\n" * 3)
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id)
    lines = out.splitlines()
    assert code == 0
    assert lines[3:5] == ["1", "2"] and "200" in lines and "201" not in lines
    assert lines[lines.index("200") + 1] == "... +50 more lines (--max-lines 0 shows all)"
    assert lines[-4:] == ["--- stderr", "warning", "warning", "warning"]
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id, "--max-lines", "0")
    assert "250" in out.splitlines() and "more lines" not in out
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id, "--max-lines", "2")
    assert out.splitlines()[3:6] == ["1", "2", "... +248 more lines (--max-lines 0 shows all)"]
    with pytest.raises(SystemExit):
        himbeere(capsys, "cmd", "--result", command_id, "--max-lines", "-1")
    assert "'-1' is not allowed; allowed: a number of lines >= 0" in capsys.readouterr().err


def test_cmd_shows_errors_cut_output_and_silent_nodes(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    command_id = ops.create_command(fleet, ["sleep", "99"], [1001, 1002, 1003])
    answer(fleet, command_id, 1001, state="timeout", returncode=None,
           error="timed out after 5 s", truncated={"stdout": 1000})
    answer(fleet, command_id, 1002)
    heartbeat(fleet, 1003)
    code, out, err = himbeere(capsys, "cmd", "--result", command_id)
    assert code == 1 and "did not answer in time" in err
    assert out.splitlines()[1:] == [
        "=== 1001: timeout, exit -, 0.25s",
        "--- error: timed out after 5 s",
        "--- the node kept only part of the output (cut: stdout 1000 bytes)",
        "=== 1002: done, exit 0, 0.25s",
        "(no output)",
        "=== 1003: no answer (node alive)",
    ]


@pytest.mark.slow
def test_cmd_on_real_nodes_prints_whole_output_and_saves_an_example(
        fleet: Fleet, node_factory: NodeFactory) -> None:
    """The README's ``df -h`` example showed df's header only (issue 12, item 5)."""
    start_nodes(node_factory, 1001, 1002)
    fleet.set_name(1001, "kitchen")
    fleet.set_name(1002, "garden")
    argv = ["df", "-h", "/", "/no-such-dir"]  # df's table on stdout, an error on stderr
    ran = subprocess.run([sys.executable, "-m", "himbeere", "cmd", "--all", "--timeout", "20",
                          "--", *argv], capture_output=True, text=True,
                         env=env_for(fleet.couch.url, fleet.code.name), cwd=str(ROOT),
                         timeout=90)
    assert ran.returncode == 1 and "2 node(s) failed" in ran.stderr, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].endswith(": df -h / /no-such-dir")
    for name in ("garden (1002)", "kitchen (1001)"):
        header = next(i for i, line in enumerate(lines) if line.startswith(f"=== {name}: "))
        assert lines[header].startswith(f"=== {name}: done, exit 1, ")
        assert lines[header + 1] == "--- stdout" and lines[header + 2].startswith("Filesystem")
        assert lines[header + 3].endswith(" /"), "df's line of /, not only its header"
        assert lines[header + 4] == "--- stderr" and "/no-such-dir" in lines[header + 5]
    # As a terminal shows it: the progress (stderr), the results, the summary (stderr).
    err = ran.stderr.splitlines(keepends=True)
    progress = [line for line in err if "answered" in line or line.startswith("command ")]
    shown = (f"$ himbeere cmd --all --timeout 20 -- {' '.join(argv)}\n" + "".join(progress)
             + ran.stdout + "".join(line for line in err if line not in progress))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "himbeere-cmd.txt").write_text(shown, encoding="utf-8")


# -- not targeted (joined later) ---------------------------------------------------------
def test_a_node_that_joined_after_an_all_command_is_not_targeted(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """It showed the command as waiting forever (issue 12, item 11)."""
    heartbeat(fleet, 1001)
    command_id = ops.create_command(fleet, ["uname"], "all")
    answer(fleet, command_id, 1001, "Linux\n")
    heartbeat(fleet, 1002)  # joins later: its daemon skips the command
    fleet.set_name(1003, "spare")  # named later, never started
    code, out, err = himbeere(capsys, "cmd", "--result", command_id)
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "=== 1001: done, exit 0, 0.25s", "--- stdout", "Linux",
        "=== 1002: not targeted (joined later)",
        "=== spare (1003): not targeted (joined later)"]
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id, "--brief")
    row = next(line for line in out.splitlines() if line.startswith("1002"))
    assert "not targeted (joined later)" in row
    code, out, _ = himbeere(capsys, "cmd", "--result", command_id, "--json")
    assert json.loads(out)["not_targeted"] == [1002, 1003] and json.loads(out)["ok"]
    code, out, _ = himbeere(capsys, "status", "1002")
    row = next(line for line in out.splitlines() if command_id in line)
    assert "not targeted (joined later)" in row and "no answer" not in row
    code, out, _ = himbeere(capsys, "status", "1001")
    row = next(line for line in out.splitlines() if command_id in line)
    assert "done" in row and "Linux" in row
    # The dashboard's command page and node page get the same from their payloads.
    payload = command_payload(fleet, command_id)
    assert [(n["node"], n["not_targeted"]) for n in payload["nodes"]] == [
        (1001, False), (1002, True), (1003, True)]
    assert payload["done"] and payload["answered"] == 1
    history = node_payload(fleet, "1002")["commands"]
    assert [(c["command"], c["joined_later"]) for c in history] == [(command_id, True)]


def test_named_and_waiting_nodes_are_not_marked_joined_later(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    heartbeat(fleet, 1001)
    heartbeat(fleet, 1002)
    everyone = ops.create_command(fleet, ["true"], "all")
    named = ops.create_command(fleet, ["true"], [1001])
    heartbeat(fleet, 1003)
    answer_ = ops.command_results(fleet, everyone)
    assert answer_["pending"] == [1001, 1002] and answer_["not_targeted"] == [1003]
    assert ops.command_results(fleet, named)["not_targeted"] == []
    code, out, _ = himbeere(capsys, "status", "1001")
    assert "not targeted" not in out and out.count("no answer") == 2
    # A hand-made "all" command has no "expected": nothing to tell by.
    fleet.code.save({"_id": "cmd-by-hand", "type": "himbeere-command", "targets": "all",
                     "cmd": ["true"]})
    assert ops.command_results(fleet, "cmd-by-hand")["not_targeted"] == []


# -- logs -f across a server restart -----------------------------------------------------
class Lines:
    """Lines of a subprocess's stream, read in a thread (no test blocks on a read)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait(self, count: int, timeout: float = 60.0) -> list[str]:
        wait_for(lambda: len(self.lines) >= count, timeout,
                 message=lambda: f"got only {self.lines}")
        return self.lines[:count]


def ship(db: Any, *lines: tuple[float, str]) -> None:
    shipper = LogShipper(db, 1001)
    shipper.add("1001:blink", "blink", list(lines))
    assert shipper.flush() == len(lines)


@pytest.mark.slow
def test_logs_follow_reconnects_after_a_server_restart(restartable_server: Any,
                                                      dbname: str) -> None:
    """``logs -f`` died with a raw urllib3 error when the server restarted (item 7)."""
    fleet = Fleet(restartable_server.url, dbname)
    install.setup(fleet)
    now = time.time()
    ship(fleet.status, (now - 2, "one"), (now - 2, "two, same stamp"))
    follower = subprocess.Popen([sys.executable, "-m", "himbeere", "logs", "1001", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env_for(restartable_server.url, dbname), cwd=str(ROOT))
    assert follower.stdout is not None and follower.stderr is not None
    out, err = Lines(follower.stdout), Lines(follower.stderr)
    try:
        out.wait(2)
        restartable_server.stop()
        assert err.wait(1) == ["server unreachable; reconnecting..."]
        restartable_server.start()
        ship(fleet.status, (now - 2, "two, same stamp"), (time.time(), "after the restart"))
        assert err.wait(2)[1] == "server reachable again"
        shown = [line.split(" ", 1)[1] for line in out.wait(4)]
        assert shown == ["[blink] one", "[blink] two, same stamp",
                         "[blink] two, same stamp", "[blink] after the restart"]
        ship(fleet.status, (time.time(), "and on"))
        assert out.wait(5)[4].endswith("[blink] and on")
        assert follower.poll() is None
    finally:
        follower.terminate()
        follower.wait(10)
    assert len(out.lines) == 5, out.lines  # nothing twice
    assert "Traceback" not in "\n".join(err.lines)


# -- a pipe closed early -----------------------------------------------------------------
def closed_pipe() -> int:
    """The write end of a pipe whose reader has gone, like ``| head -1`` after its line."""
    read, write = os.pipe()
    os.close(read)
    return write


def test_upload_ls_into_a_closed_pipe_exits_quietly(fleet: Fleet) -> None:
    """``himbeere-upload ls | head -1`` printed a BrokenPipeError traceback (item 8)."""
    for i in range(3):
        fleet.code.save({"_id": f"1001:p{i}", "type": 1001, "name": f"p{i}",
                         "code": "def main(): pass\n"})
    env = env_for(fleet.couch.url, fleet.code.name)
    listed = subprocess.run([sys.executable, "-m", "uploader", "ls"], capture_output=True,
                            text=True, env=env, cwd=str(ROOT), timeout=60)
    assert listed.returncode == 0 and "p2" in listed.stdout, listed.stderr
    write = closed_pipe()
    try:
        ran = subprocess.run([sys.executable, "-m", "uploader", "ls"], stdout=write,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                             timeout=60)
    finally:
        os.close(write)
    assert ran.stderr == ""
    assert ran.returncode == 141


def test_logs_follow_into_a_pipe_that_closes_exits_quietly(fleet: Fleet) -> None:
    """``himbeere logs NODE -f | head -1``: the reader goes after one line (item 8)."""
    ship(fleet.status, (time.time() - 1, "first"))
    follower = subprocess.Popen([sys.executable, "-m", "himbeere", "logs", "1001", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env_for(fleet.couch.url, fleet.code.name), cwd=str(ROOT))
    assert follower.stdout is not None and follower.stderr is not None
    try:
        assert follower.stdout.readline().endswith("[blink] first\n")
        follower.stdout.close()  # head -1 is done
        ship(fleet.status, (time.time(), "second"))
        assert follower.wait(60) == 141
        assert follower.stderr.read() == ""
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)


def test_a_closed_pipe_ends_himbeere_quietly_too(fleet: Fleet) -> None:
    heartbeat(fleet, 1001)
    write = closed_pipe()
    try:
        ran = subprocess.run([sys.executable, "-m", "himbeere", "nodes"], stdout=write,
                             stderr=subprocess.PIPE, text=True,
                             env=env_for(fleet.couch.url, fleet.code.name), cwd=str(ROOT),
                             timeout=60)
    finally:
        os.close(write)
    assert (ran.returncode, ran.stderr) == (141, "")

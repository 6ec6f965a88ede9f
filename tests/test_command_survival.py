"""A command's result survives a crash of the daemon, and is never thrown away.

Each command runs under a runner of its own (:mod:`himbeere.runner`) that
outlives the daemon; these tests kill the daemon (``kill -9``), the runner
(a power cut), or the server connection, and check what the user sees: the
command document's result, a ledger that each command appends to once, and
which processes are left.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from himbeere.commands import Commands
from himbeere.couch import Couch, Database
from himbeere.journal import Journal
from tests.helpers import wait_for
from tests.nodes import Node, pid_alive, wait_file
from tests.test_commands import command, py, settled, wait_doc


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    found[int(entry)] = handle.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def stop_runners(state_dir: Path) -> None:
    """Ask every runner left in ``state_dir`` to kill its command (test clean-up)."""
    for pid_file in (state_dir / "commands").glob("*/pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


@pytest.fixture
def crash_node(node_factory: Callable[..., Node]) -> Iterator[Callable[..., Node]]:
    """``node_factory`` whose nodes' runners are stopped at the end, whatever happened."""
    made: list[Node] = []

    def make(**options: Any) -> Node:
        made.append(node_factory(**options))
        return made[-1]

    yield make
    for node in made:
        stop_runners(node.state_dir)


def test_fifty_commands_each_run_once_with_their_result_across_a_kill_9(
        crash_node: Callable[..., Node], code_db: Database, tmp_path: Path) -> None:
    """Regression: commands running at a kill -9 ran to the end, but their results were lost."""
    ledger = tmp_path / "ledger.txt"
    node = crash_node(mac_id=1000)
    ids = [f"c{i:02d}" for i in range(50)]
    for i, doc_id in enumerate(ids):
        # Each appends its id to the ledger, works a while, then answers.
        command(code_db, doc_id, ["sh", "-c", f"echo {doc_id} >> {ledger}; sleep {i % 4 * 0.5}; "
                                              f"echo out-{doc_id}; echo err-{i} >&2; exit {i % 5}"])
    wait_for(lambda: ledger.exists() and len(ledger.read_text().split()) >= 20, 60,
             message=lambda: node.log()[-3000:])
    old = node.pid
    old_children = children(old)
    assert any("import runner" in line for line in old_children.values()), old_children
    node.kill()
    left = Journal(node.state_dir / "commands.json").read()
    assert "started" in left.values(), f"no command was running at the kill: {left}"
    node.start()
    for i, doc_id in enumerate(ids):
        doc = wait_doc(code_db, doc_id, timeout=90)
        assert doc["state"] == "done", doc
        assert doc["returncode"] == i % 5, doc
        assert doc["ret"] == [f"out-{doc_id}\n", f"err-{i}\n"], doc
        assert doc["node"] == 1000
    wait_for(lambda: settled(node), message="journal never emptied")
    lines = ledger.read_text().split()
    assert sorted(lines) == ids, "a command ran twice or never"
    # No process of the old daemon is left: its fork server ended with it,
    # and its runners ended with their commands.
    assert not pid_alive(old)
    wait_for(lambda: not [pid for pid in old_children if pid_alive(pid)], 20,
             message=lambda: f"left from the old daemon: "
                             f"{ {p: c for p, c in old_children.items() if pid_alive(p)} }")
    assert list((node.state_dir / "commands").iterdir()) == []
    assert "Traceback" not in node.log()


def test_a_timeout_holds_while_the_daemon_is_down(crash_node: Callable[..., Node],
                                                  code_db: Database, tmp_path: Path) -> None:
    """Regression: a command outliving its daemon ran on without a timeout."""
    pid_file = tmp_path / "sleeper.pid"
    node = crash_node(mac_id=1000)
    command(code_db, "slow", ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], timeout=3)
    pid = int(wait_file(pid_file).strip())
    node.kill()
    wait_for(lambda: not pid_alive(pid), 30, message="the command outlived its timeout")
    node.start()
    doc = wait_doc(code_db, "slow")
    assert doc["state"] == "timeout", doc
    assert doc["returncode"] == -9
    assert "timed out after 3 s" in doc["error"]
    wait_for(lambda: settled(node), message="journal never emptied")


def test_a_command_whose_runner_died_is_interrupted_honestly(
        crash_node: Callable[..., Node], code_db: Database, tmp_path: Path) -> None:
    """A power cut kills the runner too: the result is unknown, and the document says so."""
    pid_file = tmp_path / "sleeper.pid"
    node = crash_node(mac_id=1000)
    command(code_db, "cut", ["sh", "-c", f"echo $$ > {pid_file}; echo partial; exec sleep 60"],
            timeout=120)
    pid = int(wait_file(pid_file).strip())
    runner = int(wait_file(node.state_dir / "commands" / "cut" / "pid"))
    node.kill()
    os.kill(runner, signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(runner) and not pid_alive(pid))
    node.start()
    doc = wait_doc(code_db, "cut")
    assert doc["state"] == "interrupted", doc
    assert "may have run; its result is unknown" in doc["error"]
    assert "not run again" in doc["error"]
    assert doc["returncode"] is None
    assert doc["ret"] == ["partial\n", ""]  # what it wrote before the cut
    node.wait_log("marked 1 command(s) interrupted")
    wait_for(lambda: settled(node), message="journal never emptied")
    assert not pid_alive(pid)


# -- in-process: Commands against the real server ------------------------------------------
def unreachable(db: Database) -> Database:
    """``db`` on a loopback port where no server listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Couch(f"http://127.0.0.1:{port}").database(db.name)


def test_a_finished_result_survives_a_stop_while_the_server_is_unreachable(
        commands_factory: Callable[..., Commands], code_db: Database, tmp_path: Path) -> None:
    """Regression: SIGTERM while the server was away dropped the result; then "interrupted"."""
    ended = tmp_path / "ended.txt"
    commands = commands_factory(db=unreachable(code_db), grace_period=1.0, running_mark=60)
    commands.submit(command(code_db, "kept", ["sh", "-c", f"echo finished; echo end > {ended}; "
                                                          "exit 5"]))
    wait_file(ended)
    wait_for(lambda: commands.journal.read() == {"kept": "started"})
    commands.stop()
    assert "state" not in code_db.get("kept")
    assert Journal(tmp_path / "state" / "commands.json").read() == {"kept": "started"}
    # The next start, with the server back, writes the real result.
    after = commands_factory()
    assert after.recover() == 0
    doc = wait_doc(code_db, "kept")
    assert doc["state"] == "done", doc
    assert doc["returncode"] == 5 and doc["ret"] == ["finished\n", ""]
    wait_for(lambda: after.journal.read() == {}, message="journal never emptied")


@pytest.fixture
def small_documents(couch_url: str) -> Iterator[int]:
    """The server's ``max_document_size`` lowered to 200 kB (CouchDB and pouchdb-server)."""
    limit = 200_000
    url = f"{couch_url}/_node/_local/_config/couchdb/max_document_size"
    before = requests.get(url, timeout=10)
    if before.status_code == 404 and before.json().get("reason") == "no_db_file":
        # pouchdb-server: no /_node, but the same setting under /_config.
        url = f"{couch_url}/_config/couchdb/max_document_size"
        before = requests.get(url, timeout=10)
    answer = requests.put(url, json=str(limit), timeout=10)
    assert answer.status_code == 200, answer.text
    try:
        yield limit
    finally:
        if before.status_code == 200:
            requests.put(url, json=before.json(), timeout=10)
        else:
            requests.delete(url, timeout=10)


def test_a_result_too_large_for_the_server_is_shortened_not_lost(
        commands_factory: Callable[..., Commands], code_db: Database,
        small_documents: int) -> None:
    """Regression: a 413 (document_too_large) on write-back dropped the result."""
    commands = commands_factory(running_mark=60)  # output_limit: 1 MiB per stream
    commands.submit(command(code_db, "huge", py(
        "import sys; sys.stdout.write('y' * 600000); sys.stderr.write('e' * 10); sys.exit(3)")))
    doc = wait_doc(code_db, "huge")
    assert doc["state"] == "done" and doc["returncode"] == 3, {k: v for k, v in doc.items()
                                                                  if k != "ret"}
    assert doc["ret"] == ["y" * 65536, "e" * 10]
    assert doc["truncated"] == {"stdout": 600000 - 65536}
    assert "refused the whole result as too large" in doc["error"]
    assert "at most 65536 bytes" in doc["error"]
    wait_for(lambda: commands.journal.read() == {}, message="journal never emptied")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("boot, expected", [("same", "done"), ("other", "interrupted")])
def test_a_command_whose_runner_never_started_runs_after_a_crash_of_the_same_boot(
        commands_factory: Callable[..., Commands], code_db: Database, tmp_path: Path,
        boot: str, expected: str) -> None:
    """The daemon died between "started" in the journal and the runner's start.

    In the same boot, no ``lock`` file means no runner ever ran it: it runs
    now.  After a reboot (a power cut), a file not yet on disk may be lost:
    it may have run, and is marked interrupted.
    """
    ledger = tmp_path / "ledger.txt"
    command(code_db, "pending", ["sh", "-c", f"echo ran >> {ledger}; echo hi"])
    state = tmp_path / "state"
    Journal(state / "commands.json").set("pending", "started")
    directory = state / "commands" / "pending"
    directory.mkdir(parents=True)
    (directory / "boot").write_text(boot_id() if boot == "same" else "another-boot")
    commands = commands_factory()
    assert commands.recover() == (0 if expected == "done" else 1)
    doc = wait_doc(code_db, "pending")
    assert doc["state"] == expected, doc
    if expected == "done":
        assert doc["ret"] == ["hi\n", ""] and ledger.read_text() == "ran\n"
    else:
        assert "may have run" in doc["error"] and not ledger.exists()
    wait_for(lambda: commands.journal.read() == {}, message="journal never emptied")
    assert not directory.exists()

"""Commands: ``<macid>_cmd`` documents run once and get their result written back.

Most tests run real daemons (``node_factory``) against the real server; the
ones about output limits, write conflicts, the journal and shutdown drive
:class:`himbeere.commands.Commands` in-process against the same server.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from himbeere.commands import Commands
from himbeere.couch import Couch, Database, Doc
from himbeere.journal import Journal
from tests.helpers import wait_for
from tests.nodes import Node, pid_alive, wait_file

PY = sys.executable


def wait_doc(db: Database, doc_id: str, check: Callable[[Doc], Any] = lambda d: "finished" in d,
             timeout: float = 30.0) -> Doc:
    """Wait until ``check(doc)`` holds for the document, and return it."""
    def probe() -> Optional[Doc]:
        doc = db.get(doc_id)
        return doc if doc is not None and check(doc) else None

    return wait_for(probe, timeout, message=lambda: f"{doc_id} never got there: {db.get(doc_id)}")


def command(db: Database, doc_id: str, cmd: Any, mac_id: int = 1000, **fields: Any) -> Doc:
    return db.save(dict({"_id": doc_id, "type": f"{mac_id}_cmd", "cmd": cmd}, **fields))


def py(code: str) -> list[str]:
    """A command running ``code`` in Python (no shell quoting to get wrong)."""
    return [PY, "-c", code]


def journal(node: Node) -> dict[str, str]:
    return Journal(node.state_dir / "commands.json").read()


def settled(node: Node) -> bool:
    """True when the daemon has no command queued or running."""
    return journal(node) == {}


# -- results -------------------------------------------------------------------------------
def test_result_is_written_back(node_factory, code_db: Database) -> None:
    cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    command(code_db, "c1", cmd, note="mine")
    node_factory(mac_id=1000)
    doc = wait_doc(code_db, "c1")
    assert doc["ret"] == ["out\n", "err\n"]
    assert doc["returncode"] == 3
    assert doc["state"] == "done"
    assert doc["node"] == 1000
    assert doc["cmd"] == cmd
    assert doc["note"] == "mine"
    assert doc["started"] <= doc["finished"]  # ISO timestamps, both UTC
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["started"])
    assert "error" not in doc and "truncated" not in doc and "not_utf8" not in doc


def test_timeout_kills_the_whole_process_group(node_factory, code_db: Database,
                                               tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    node_factory(mac_id=1000)
    command(code_db, "slow", ["sh", "-c", f"sleep 60 & echo $! > {child_pid}; sleep 60"],
            timeout=1)
    doc = wait_doc(code_db, "slow")
    assert doc["state"] == "timeout"
    assert "timed out after 1 s" in doc["error"]
    assert doc["returncode"] == -9
    pid = int(wait_file(child_pid).strip())
    wait_for(lambda: not pid_alive(pid), 10, message=f"background child {pid} survived")


def test_missing_binary_and_malformed_documents(node_factory, code_db: Database) -> None:
    node = node_factory(mac_id=1000)
    bad = {
        "missing": (["/no/such/program-xyz", "-a"], {}, "no such program: '/no/such/program-xyz'"),
        "string": ("uname -a", {}, 'cmd: "uname -a" is not allowed'),
        "empty": ([], {}, "cmd: [] is not allowed"),
        "number": (["echo", 1], {}, 'cmd: ["echo", 1] is not allowed'),
        "nocmd": (None, {}, "cmd: null is not allowed"),
        "word": (["echo"], {"timeout": "soon"}, 'timeout: "soon" is not allowed'),
        "negative": (["echo"], {"timeout": -1}, "timeout: -1 is not allowed"),
        "boolean": (["echo"], {"timeout": True}, "timeout: true is not allowed"),
    }
    for doc_id, (cmd, extra, _) in bad.items():
        command(code_db, doc_id, cmd, **extra)
    for doc_id, (cmd, _, error) in bad.items():
        doc = wait_doc(code_db, doc_id)
        assert doc["state"] == "error", doc
        assert error in doc["error"], doc
        assert doc["ret"] == ["", doc["error"]]
        assert doc["returncode"] is None
        assert doc["cmd"] == cmd
        assert doc["node"] == 1000
        if doc_id != "missing":
            assert "allowed:" in doc["error"]
    assert "Traceback" not in node.log()


def test_a_command_id_cannot_forge_a_line_of_the_daemon_log(node_factory,
                                                           code_db: Database) -> None:
    """Regression: ids went raw into log lines, so an id holding a newline
    wrote what looked like an entry of the daemon's own log."""
    command(code_db, "c1\nFAKE LOG LINE", ["true"])
    node = node_factory(mac_id=1000)
    wait_doc(code_db, "c1\nFAKE LOG LINE")
    wait_for(lambda: "command c1\\nFAKE LOG LINE: true -> 0 (done)" in node.log(),
             message=lambda: node.log()[-2000:])
    assert not any(line.startswith("FAKE LOG LINE") for line in node.log().splitlines())


def test_an_argv_with_a_nul_byte_gets_an_error_result_at_once(node_factory,
                                                               code_db: Database) -> None:
    """Regression: exec raised ValueError; no result, later mislabelled interrupted."""
    node = node_factory(mac_id=1000)
    command(code_db, "nul", ["echo", "a\u0000b"])
    doc = wait_doc(code_db, "nul")
    assert doc["state"] == "error", doc
    assert "NUL byte" in doc["error"] and "allowed:" in doc["error"]
    assert doc["ret"] == ["", doc["error"]] and doc["returncode"] is None
    wait_for(lambda: settled(node), message="journal never emptied")
    assert node.stop() == 0
    node.start()
    command(code_db, "marker", ["echo", "after"])
    wait_doc(code_db, "marker")
    assert code_db.get("nul")["_rev"] == doc["_rev"]  # not touched again
    assert "Traceback" not in node.log()


def test_big_output_is_capped_at_one_mib(node_factory, code_db: Database) -> None:
    node_factory(mac_id=1000)
    code = ("import sys; sys.stdout.write('x' * 1500000); sys.stderr.write('e' * 10)")
    command(code_db, "big", py(code))
    doc = wait_doc(code_db, "big")
    assert doc["state"] == "done"
    assert doc["ret"][0] == "x" * (1 << 20)
    assert doc["ret"][1] == "e" * 10
    assert doc["truncated"] == {"stdout": 1500000 - (1 << 20)}


def test_non_utf8_output_is_stored_and_marked(node_factory, code_db: Database) -> None:
    node_factory(mac_id=1000)
    command(code_db, "latin1", py(
        "import sys; sys.stdout.buffer.write(b'Gr\\xfc\\xdfe\\n'); sys.stderr.write('ok')"))
    doc = wait_doc(code_db, "latin1")
    assert doc["state"] == "done"
    assert doc["not_utf8"] == ["stdout"]
    assert doc["ret"] == ["Gr\\xfc\\xdfe\n", "ok"]


# -- concurrency ---------------------------------------------------------------------------
def test_commands_run_concurrently_and_long_ones_are_marked_running(
        node_factory, code_db: Database) -> None:
    node_factory(mac_id=1000)
    command(code_db, "sleeper", ["sleep", "8"])
    running = wait_doc(code_db, "sleeper", lambda d: d.get("state") == "running")
    assert running["node"] == 1000 and "started" in running and "finished" not in running
    command(code_db, "echo", ["echo", "quick"])
    echo = wait_doc(code_db, "echo")
    assert echo["ret"] == ["quick\n", ""]
    assert "finished" not in code_db.get("sleeper"), "echo waited for sleep 8"
    sleeper = wait_doc(code_db, "sleeper")
    assert sleeper["state"] == "done" and sleeper["returncode"] == 0
    assert sleeper["started"] == running["started"]
    assert echo["finished"] < sleeper["finished"]


def test_command_written_while_the_daemon_is_down_runs_after_start(
        node_factory, code_db: Database) -> None:
    node = node_factory(mac_id=1000)
    command(code_db, "before", ["echo", "before"])
    wait_doc(code_db, "before")
    assert node.stop() == 0
    command(code_db, "while-down", ["echo", "while down"])
    node.start()
    doc = wait_doc(code_db, "while-down")
    assert doc["ret"] == ["while down\n", ""]
    assert doc["state"] == "done"


def test_command_for_another_node_is_not_run(node_factory, code_db: Database,
                                             tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    command(code_db, "other", ["sh", "-c", f"echo 1001 >> {ran}"], mac_id=1001)
    node = node_factory(mac_id=1000)
    command(code_db, "mine", ["echo", "mine"])
    wait_doc(code_db, "mine")
    wait_for(lambda: settled(node), message="commands still in the journal")
    other = code_db.get("other")
    assert other is not None
    assert not {"ret", "state", "started", "finished", "node"} & set(other)
    assert not ran.exists()


# -- exactly once --------------------------------------------------------------------------
def test_kill_9_mid_command_writes_its_real_result_once(
        node_factory, code_db: Database, tmp_path: Path) -> None:
    """Regression: a command running at a kill -9 ran on, but was marked interrupted."""
    runs, ended = tmp_path / "runs.txt", tmp_path / "ended.txt"
    node = node_factory(mac_id=1000)
    command(code_db, "once", ["sh", "-c",
                              f"echo x >> {runs}; sleep 3; echo end > {ended}; echo out; exit 7"])
    wait_file(runs, contains="x")
    node.kill()
    node.start()
    doc = wait_doc(code_db, "once")
    assert doc["state"] == "done", doc
    assert doc["returncode"] == 7 and doc["ret"] == ["out\n", ""]
    assert "error" not in doc
    assert ended.read_text() == "end\n"
    wait_for(lambda: settled(node), message="journal never emptied")
    assert not (node.state_dir / "commands" / "once").exists()
    assert runs.read_text() == "x\n"
    # Even a full replay (no seq.json) does not run it again.
    assert node.stop() == 0
    (node.state_dir / "seq.json").unlink()
    node.start()
    command(code_db, "marker", ["echo", "after"])
    wait_doc(code_db, "marker")
    wait_for(lambda: settled(node), message="journal never emptied")
    assert runs.read_text() == "x\n"
    assert code_db.get("once")["_rev"] == doc["_rev"]


def test_full_replay_does_not_rerun_finished_commands(node_factory, code_db: Database,
                                                      tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    node = node_factory(mac_id=1000)
    command(code_db, "append", ["sh", "-c", f"echo x >> {runs}"])
    first = wait_doc(code_db, "append")
    assert node.stop() == 0
    (node.state_dir / "seq.json").unlink()
    node.start()
    command(code_db, "marker", ["echo", "replayed"])
    wait_doc(code_db, "marker")
    wait_for(lambda: settled(node), message="journal never emptied")
    assert runs.read_text() == "x\n"
    assert code_db.get("append")["_rev"] == first["_rev"]


def test_edit_while_running_keeps_both_the_edit_and_the_result(
        node_factory, code_db: Database) -> None:
    node_factory(mac_id=1000)
    command(code_db, "edited", ["sh", "-c", "sleep 3; echo done"])
    wait_doc(code_db, "edited", lambda d: d.get("state") == "running")

    def add_note(doc: Doc) -> None:
        doc["note"] = "written by someone else"

    code_db.update("edited", add_note)
    doc = wait_doc(code_db, "edited")
    assert doc["note"] == "written by someone else"
    assert doc["state"] == "done"
    assert doc["ret"] == ["done\n", ""]


# -- in-process: Commands against the real server ------------------------------------------
def run_in_process(commands: Commands, db: Database, doc_id: str, cmd: list[str],
                   **fields: Any) -> Doc:
    commands.submit(command(db, doc_id, cmd, **fields))
    return wait_doc(db, doc_id)


def test_each_stream_is_capped_and_the_cut_is_counted(commands_factory,
                                                      code_db: Database) -> None:
    commands = commands_factory(output_limit=100)
    doc = run_in_process(commands, code_db, "capped", py(
        "import sys; sys.stdout.write('a' * 1000); sys.stderr.write('b' * 150)"))
    assert doc["ret"] == ["a" * 100, "b" * 100]
    assert doc["truncated"] == {"stdout": 900, "stderr": 50}
    assert doc["state"] == "done"
    assert "not_utf8" not in doc


def test_cap_does_not_cut_a_character_in_two(commands_factory, code_db: Database) -> None:
    """Regression: a cap inside a UTF-8 character marked valid text not_utf8."""
    commands = commands_factory(output_limit=5)
    doc = run_in_process(commands, code_db, "umlauts", py("print('\u00fc\u00fc\u00fc')"))
    assert doc["ret"][0] == "\u00fc\u00fc"
    assert doc["truncated"] == {"stdout": 3}  # half an ü, a whole ü, the newline
    assert "not_utf8" not in doc


def test_binary_output_is_stored_escaped_within_budget(commands_factory,
                                                       code_db: Database) -> None:
    """Regression: escaping could make binary output several times its cap."""
    commands = commands_factory(output_limit=1000)
    doc = run_in_process(commands, code_db, "binary", py(
        "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4)"))
    text = doc["ret"][0]
    assert doc["not_utf8"] == ["stdout"]
    assert len(json.dumps(text, ensure_ascii=False).encode()) - 2 <= 2000
    assert text.startswith("\x00\x01\x02")
    assert "\\x80\\x81" in text
    assert doc["truncated"]["stdout"] > 24  # 1024 bytes read, 1000 kept, then the budget


def test_a_409_on_write_back_is_resolved_by_rereading(commands_factory, code_db: Database,
                                                      couch_url: str) -> None:
    """Someone writes the document between its delivery and our write: a real 409."""
    other = Couch(couch_url).database(code_db.name)
    interfered: list[str] = []

    class Racing(Database):
        def save(self, doc: Doc) -> Doc:
            if doc.get("_id") == "raced" and "ret" in doc and not interfered:
                theirs = dict(other.get("raced") or {}, note="theirs")
                other.save(theirs)
                interfered.append(theirs["_rev"])
            return super().save(doc)

    commands = commands_factory(db=Racing(code_db.couch, code_db.name), running_mark=60)
    doc = run_in_process(commands, code_db, "raced", ["echo", "hello"])
    assert interfered, "the race was never set up"
    assert doc["note"] == "theirs"
    assert doc["ret"] == ["hello\n", ""]
    assert doc["state"] == "done"


def test_the_result_is_written_on_the_delivered_revision_without_a_get(
        commands_factory, code_db: Database) -> None:
    """Regression: a GET before each write-back cost 6 of a command's 33 ms."""
    reads: list[str] = []

    class Counting(Database):
        def get(self, doc_id: str, **params: Any) -> Optional[Doc]:
            reads.append(doc_id)
            return super().get(doc_id, **params)

    commands = commands_factory(db=Counting(code_db.couch, code_db.name), running_mark=60)
    delivered = command(code_db, "direct", ["echo", "hi"])
    commands.submit(delivered)
    doc = wait_doc(code_db, "direct")
    assert doc["ret"] == ["hi\n", ""]
    assert doc["_rev"].startswith("2-")
    assert reads == []
    assert "ret" not in delivered  # the caller's copy is left alone


def test_a_stale_delivered_revision_is_read_again(commands_factory, code_db: Database) -> None:
    """The feed's copy is out of date (a ``running`` mark, an edit): 409, read, write."""
    commands = commands_factory(running_mark=60)
    delivered = command(code_db, "stale", ["echo", "hi"])
    code_db.save(dict(delivered, note="edited since"))
    commands.submit(delivered)
    doc = wait_doc(code_db, "stale")
    assert doc["note"] == "edited since" and doc["ret"] == ["hi\n", ""]
    assert doc["_rev"].startswith("3-")


def test_recover_marks_started_and_runs_queued_commands(commands_factory, code_db: Database,
                                                        tmp_path: Path) -> None:
    command(code_db, "was-running", ["echo", "never again"])
    command(code_db, "was-queued", ["echo", "queued"])
    command(code_db, "was-done", ["echo", "done"], ret=["done\n", ""], state="done")
    Journal(tmp_path / "state" / "commands.json").set("was-running", "started")
    Journal(tmp_path / "state" / "commands.json").set("was-queued", "queued")
    Journal(tmp_path / "state" / "commands.json").set("was-done", "started")
    Journal(tmp_path / "state" / "commands.json").set("was-deleted", "started")
    commands = commands_factory()
    assert commands.recover() == 1
    interrupted = wait_doc(code_db, "was-running")
    assert interrupted["state"] == "interrupted"
    assert "ret" not in interrupted
    queued = wait_doc(code_db, "was-queued")
    assert queued["state"] == "done" and queued["ret"] == ["queued\n", ""]
    wait_for(lambda: commands.journal.read() == {}, message="journal never emptied")


def test_stop_kills_running_commands_and_keeps_queued_ones(
        commands_factory, code_db: Database, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    commands = commands_factory(max_workers=1, grace_period=0.5)
    command(code_db, "long", ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"])
    command(code_db, "waiting", ["echo", "later"])
    commands.submit(code_db.get("long"))
    commands.submit(code_db.get("waiting"))
    pid = int(wait_file(pid_file).strip())
    stopper = threading.Thread(target=commands.stop)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop waited for a sleep 60"
    doc = code_db.get("long")
    assert doc["state"] == "interrupted" and doc["returncode"] == -9
    assert "daemon stopped" in doc["error"]
    assert not pid_alive(pid)
    assert "state" not in code_db.get("waiting")
    assert commands.journal.read() == {"waiting": "queued"}
    # The next daemon runs it.
    after = commands_factory()
    after.recover()
    assert wait_doc(code_db, "waiting")["ret"] == ["later\n", ""]

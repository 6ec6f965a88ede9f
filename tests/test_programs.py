"""Programs end to end: real daemons, a real pouchdb-server, real signals.

Every test looks where a user would: at files the programs write, at
their pids, at the node's status document (``programs.<doc_id>``) and at
the daemon's log.  Nodes run with ``--grace-period 2``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import defaults
from himbeere.couch import Database
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, pid_alive, wait_file

NodeFactory = Callable[..., Node]


# -- writing programs ---------------------------------------------------------------------

def put(path: Path, expr: str, indent: str = "    ") -> str:
    """Program lines that write ``str(expr)`` to ``path`` atomically (needs ``os``)."""
    tmp = str(path) + ".tmp"
    return (f"{indent}with open({tmp!r}, 'w') as _out:\n"
            f"{indent}    _out.write(str({expr}))\n"
            f"{indent}os.replace({tmp!r}, {str(path)!r})\n")


def looping(pidfile: Path, before: str = "", top: str = "") -> str:
    """A program that writes its pid to ``pidfile`` and runs until asked to quit."""
    return ("import os, time\n" + top +
            "def main():\n" + before + put(pidfile, "os.getpid()") +
            "    while not should_quit():\n"
            "        time.sleep(0.05)\n")


def read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_pid(path: Path, other_than: Optional[int] = None, timeout: float = 20.0) -> int:
    """Wait until ``path`` holds a live pid (other than ``other_than``)."""
    def check() -> Optional[int]:
        pid = read_pid(path)
        return pid if pid and pid != other_than and pid_alive(pid) else None

    return wait_for(check, timeout, message=lambda: f"{path} holds {read_pid(path)}")


def wait_dead(pid: int, timeout: float = 20.0) -> None:
    wait_for(lambda: not pid_alive(pid), timeout, message=f"pid {pid} is still alive")


def save(db: Database, doc: dict[str, Any]) -> dict[str, Any]:
    """Create or update ``doc`` by ``_id`` (whatever its current revision)."""
    current = db.get(doc["_id"])
    if current is not None:
        doc = dict(doc, _rev=current["_rev"])
    return db.save(dict(doc))


# -- running, updating, deleting ------------------------------------------------------------

def test_code_doc_runs_and_its_output_reaches_the_log(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile = tmp_path / "greeter.pid"
    code_db.save({"_id": "greeter", "type": 1000, "name": "greeter", "code": looping(
        pidfile, before=("    print('printed hello')\n"
                         "    log('logged hello', 42, 'on node', node)\n"))})
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    program = node.wait_program("greeter", state="running", pid=pid)
    assert program["name"] == "greeter"
    assert program["rev"] == code_db.get("greeter")["_rev"]
    node.wait_log("[greeter] printed hello\n")
    node.wait_log("[greeter] logged hello 42 on node 1000\n")


def test_updating_a_program_restarts_it_alone(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    a_pid, b_pid = tmp_path / "a.pid", tmp_path / "b.pid"
    version = tmp_path / "a.version"
    code_db.save({"_id": "a", "type": 1000, "code": looping(a_pid, before=put(version, "1"))})
    code_db.save({"_id": "b", "type": 1000, "code": looping(b_pid)})
    node = node_factory(mac_id=1000)
    old_a, b = wait_pid(a_pid), wait_pid(b_pid)
    node.wait_program("b", state="running", pid=b)
    node.wait_program("a", state="running", pid=old_a)

    saved = save(code_db, {"_id": "a", "type": 1000,
                           "code": looping(a_pid, before=put(version, "2"))})
    new_a = wait_pid(a_pid, other_than=old_a)
    assert version.read_text() == "2"
    node.wait_program("a", state="running", pid=new_a, rev=saved["_rev"])
    wait_dead(old_a)
    assert node.program("b")["pid"] == b == read_pid(b_pid)
    assert pid_alive(b)


def test_change_outside_the_code_does_not_restart(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile = tmp_path / "steady.pid"
    doc = {"_id": "steady", "type": 1000, "name": "steady", "code": looping(pidfile)}
    code_db.save(dict(doc))
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    node.wait_program("steady", state="running", pid=pid)

    saved = save(code_db, dict(doc, note="only a note changed"))
    node.wait_program("steady", rev=saved["_rev"])  # the daemon has seen it
    assert node.program("steady")["pid"] == pid == read_pid(pidfile)
    assert pid_alive(pid)
    assert node.log().count("steady: started") == 1


def test_deleting_a_doc_stops_its_program(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile = tmp_path / "doomed.pid"
    saved = code_db.save({"_id": "doomed", "type": 1000, "code": looping(pidfile)})
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    node.wait_program("doomed", state="running", pid=pid)
    code_db.delete(saved)
    wait_dead(pid)
    wait_for(lambda: "doomed" not in (node.status() or {}).get("programs", {}),
             message=lambda: f"status still lists it: {node.program('doomed')}")
    node.wait_log("doomed: document deleted, stopping")


# -- modules --------------------------------------------------------------------------------

def test_global_modules_reach_programs_and_restart_only_their_users(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    # Global modules come from a document of another node and from one without type.
    code_db.save({"_id": "lib", "type": 999, "global_modules": {"shared": "VALUE = 'one'\n"}})
    code_db.save({"_id": "lib2", "global_modules": {"extra": "from shared import VALUE\n"
                                                             "EXTRA = VALUE + '+extra'\n"}})
    user_pid, other_pid, seen = tmp_path / "user.pid", tmp_path / "other.pid", tmp_path / "seen"
    code_db.save({"_id": "user", "type": 1000, "code": looping(
        user_pid, top="import shared, extra\n", before=put(seen, "(shared.VALUE, extra.EXTRA)"))})
    code_db.save({"_id": "other", "type": 1000, "code": looping(other_pid)})
    node = node_factory(mac_id=1000)
    old_user, other = wait_pid(user_pid), wait_pid(other_pid)
    assert wait_file(seen) == "('one', 'one+extra')"

    save(code_db, {"_id": "lib", "type": 999, "global_modules": {"shared": "VALUE = 'two'\n"}})
    new_user = wait_pid(user_pid, other_than=old_user)
    assert wait_file(seen, contains="two") == "('two', 'two+extra')"
    node.wait_program("user", state="running", pid=new_user)
    assert node.program("other")["pid"] == other == read_pid(other_pid)
    assert pid_alive(other)
    assert node.program("user")["restarts"] == 0  # an update, not a crash
    assert "lib" not in node.status()["programs"]  # exporting is not running


def test_multi_module_program_and_its_own_module_shadowing_a_global(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    code_db.save({"_id": "lib", "global_modules": {"util": "WHO = 'global util'\n"}})
    own_pid, own_seen = tmp_path / "own.pid", tmp_path / "own.seen"
    code_db.save({"_id": "own", "type": 1000, "name": "own", "modules": {
        "main": looping(own_pid, top="import helper, util\n",
                        before=put(own_seen, "helper.greet() + ' / ' + util.WHO")),
        "helper": "import util\ndef greet():\n    log('helper has log too')\n"
                  "    return 'helper sees ' + util.WHO\n",
        "util": "WHO = 'own util'\n",
    }})
    global_pid, global_seen = tmp_path / "glob.pid", tmp_path / "glob.seen"
    code_db.save({"_id": "glob", "type": 1000, "code": looping(
        global_pid, top="import util\n", before=put(global_seen, "util.WHO"))})
    node = node_factory(mac_id=1000)
    own, old_global = wait_pid(own_pid), wait_pid(global_pid)
    assert wait_file(own_seen) == "helper sees own util / own util"
    assert wait_file(global_seen) == "global util"
    node.wait_log("[own] helper has log too\n")

    save(code_db, {"_id": "lib", "global_modules": {"util": "WHO = 'new global util'\n"}})
    wait_pid(global_pid, other_than=old_global)
    assert wait_file(global_seen, contains="new") == "new global util"
    # The heartbeat may not have shown "own" yet: wait for it, then the same PID.
    node.wait_program("own", state="running", pid=own)
    assert own == read_pid(own_pid)
    assert pid_alive(own)


def test_dotted_module_names_make_packages(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    """Regression: ``pkg.util`` passed validation, then failed to import."""
    code_db.save({"_id": "lib", "global_modules": {"shared.names": "WHO = 'shared'\n"}})
    seen = tmp_path / "seen"
    code_db.save({"_id": "dotted", "type": 1000, "modules": {
        "main": "import os\nimport pkg\nfrom pkg.util import WHO\nfrom pkg.deep.er import X\n"
                "from shared.names import WHO as SHARED\n"
                "def main():\n" + put(seen, "' '.join([pkg.NAME, WHO, X, SHARED])"),
        "pkg": "NAME = 'pkg'\n",
        "pkg.util": "WHO = 'util'\n",
        "pkg.deep.er": "X = 'deeper'\n",  # pkg.deep has no module: an empty package
    }})
    node = node_factory(mac_id=1000)
    assert wait_file(seen) == "pkg util deeper shared"
    node.wait_program("dotted", state="finished", last_error=None)


# -- helpers ------------------------------------------------------------------------------

def test_helpers_log_should_quit_notifications_and_db(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    code_db.save({"_id": "settings", "value": "read through db"})
    pidfile, seen = tmp_path / "helpers.pid", tmp_path / "seen"
    kept, removed = tmp_path / "kept", tmp_path / "removed"
    top = ("def keep():\n" + put(kept, "'notified'") +
           "def drop():\n" + put(removed, "'should not run'"))
    doc = {"_id": "helpers", "type": 1000, "name": "helpers", "code": looping(
        pidfile, top=top, before=(
            "    register_quit_notification(keep)\n"
            "    register_quit_notification(drop)\n"
            "    remove_quit_notification(drop)\n"
            "    log('should_quit is', should_quit())\n" + put(seen, "db['settings']['value']")))}
    code_db.save(dict(doc))
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    assert wait_file(seen) == "read through db"
    node.wait_log("[helpers] should_quit is False\n")

    save(code_db, dict(doc, enabled=False))
    wait_dead(pid)
    node.wait_program("helpers", state="stopped", pid=None)
    assert kept.read_text() == "notified"
    assert not removed.exists()
    assert "SIGTERM" not in node.log()  # it quit on its own, in time


def test_stubborn_program_and_its_subprocess_are_killed(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code_db.save({"_id": "stubborn", "type": 1000, "code": (
        "import os, signal, subprocess, time\n"
        "def main():\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    sleeper = subprocess.Popen(['sleep', '1000'])\n" +
        put(pids, "f'{os.getpid()} {sleeper.pid}'") +
        "    while True:  # ignores should_quit() and SIGTERM\n"
        "        time.sleep(0.05)\n")})
    node = node_factory(mac_id=1000)
    program, sleeper = (int(p) for p in wait_file(pids).split())
    assert pid_alive(sleeper)
    code_db.delete(code_db.get("stubborn"))
    node.wait_log("stubborn: did not quit within the grace period; SIGTERM")
    node.wait_log("stubborn: still alive after SIGTERM; SIGKILL")
    wait_dead(program)
    wait_dead(sleeper)
    assert node.alive()


# -- failures and restart policies -----------------------------------------------------------

def test_crash_loop_backs_off_and_shows_the_traceback(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code_db.save({"_id": "crasher", "type": 1000, "code": (
        "def main():\n"
        f"    open({str(runs)!r}, 'a').write('run\\n')\n"
        "    1 / 0\n")})
    node = node_factory(mac_id=1000)
    first = node.wait_program("crasher", state="backing-off", restarts=1)
    assert "ZeroDivisionError: division by zero" in first["last_error"]
    assert 'File "<crasher:main>", line 3, in main' in first["last_error"]
    assert first["next_start"] is not None
    later = wait_for(lambda: node.program("crasher").get("restarts", 0) >= 3
                     and node.program("crasher"), timeout=30)
    assert later["state"] in ("backing-off", "running")
    assert "ZeroDivisionError" in later["last_error"]
    assert runs.read_text().count("run") >= 3
    node.wait_log("crasher: crashed: Traceback")


def logs_of(capsys: pytest.CaptureFixture[str], program: str) -> list[str]:
    """``himbeere logs 1000 PROGRAM`` as a user reads it, without the clock."""
    code, out, err = himbeere(capsys, "logs", "1000", program, "-n", "0")
    assert code == 0, err
    return [line.split(" ", 1)[1] for line in out.splitlines()]


def in_order(lines: list[str], *expected: str) -> bool:
    """True if each of ``expected`` starts a line of ``lines``, in this order."""
    rest = iter(lines)
    return all(any(line.startswith(want) for line in rest) for want in expected)


@pytest.mark.usefixtures("cli_env", "fleet")  # fleet: set up as himbeere-upload setup does
def test_the_log_shows_lifecycle_events_and_the_traceback_with_source(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a crashing program's log showed its prints over and over, no error."""
    code_db.save({"_id": "crasher", "type": 1000, "code": (
        "def main():\n"
        "    print('about to divide')\n"
        "    ratio = 1 / 0\n")})
    pidfile = tmp_path / "steady.pid"
    steady = {"_id": "steady", "type": 1000, "code": looping(pidfile)}
    code_db.save(dict(steady))
    node = node_factory(mac_id=1000)
    expected = ("[crasher] -- started (pid ", "[crasher] about to divide",
                "[crasher] !! Traceback (most recent call last):",
                '[crasher] !!   File "<crasher:main>", line 3, in main',
                "[crasher] !!     ratio = 1 / 0",  # the source line, from linecache
                "[crasher] !! ZeroDivisionError: division by zero",
                "[crasher] -- crashed; restart 1 in 1 s",
                "[crasher] -- started (pid ", "[crasher] about to divide")
    wait_for(lambda: in_order(logs_of(capsys, "crasher"), *expected),
             message=lambda: "\n".join(logs_of(capsys, "crasher")) + node.log()[-2000:])

    pid = wait_pid(pidfile)
    save(code_db, dict(steady, code=looping(pidfile) + "# v2\n"))
    rev = code_db.get("steady")["_rev"]
    pid = wait_pid(pidfile, other_than=pid)
    save(code_db, dict(steady, code=looping(pidfile) + "# v2\n", enabled=False))
    stopped_rev = code_db.get("steady")["_rev"]
    wait_dead(pid)
    expected = ("[steady] -- started (pid ", f"[steady] -- changed (rev {rev}), restarting",
                "[steady] -- stopped", f"[steady] -- started (pid {pid})",
                f"[steady] -- disabled (rev {stopped_rev}), stopping", "[steady] -- stopped")
    wait_for(lambda: in_order(logs_of(capsys, "steady"), *expected),
             message=lambda: "\n".join(logs_of(capsys, "steady")))


def test_restart_policies_and_enabled(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    runs, again_runs = tmp_path / "never.runs", tmp_path / "always.runs"
    code_db.save({"_id": "never", "type": 1000, "restart": "never", "code": (
        "def main():\n"
        f"    open({str(runs)!r}, 'a').write('run\\n')\n"
        "    raise RuntimeError('gave up')\n")})
    code_db.save({"_id": "always", "type": 1000, "restart": "always", "code": (
        "def main():\n"
        f"    open({str(again_runs)!r}, 'a').write('run\\n')\n")})
    pidfile = tmp_path / "switch.pid"
    switch = {"_id": "switch", "type": 1000, "code": looping(pidfile)}
    code_db.save(dict(switch))
    node = node_factory(mac_id=1000)

    crashed = node.wait_program("never", state="crashed")
    assert "RuntimeError: gave up" in crashed["last_error"]
    assert crashed["restarts"] == 0 and crashed["pid"] is None

    wait_for(lambda: node.program("always").get("restarts", 0) >= 1)
    wait_file(again_runs, contains="run\nrun\n")
    assert node.program("always")["last_error"] is None

    pid = wait_pid(pidfile)
    save(code_db, dict(switch, enabled=False))
    wait_dead(pid)
    node.wait_program("switch", state="stopped", pid=None, enabled=False)
    save(code_db, dict(switch, enabled=True))
    node.wait_program("switch", state="running", enabled=True)
    assert wait_pid(pidfile, other_than=pid) == node.program("switch")["pid"]
    assert runs.read_text() == "run\n"  # never means never


BAD_DOCS = [
    # (doc id, fields, what last_error must say)
    ("syntax", {"code": "def main():\n    return (\n"}, "syntax error in module 'main', line"),
    ("no-main", {"code": "def start():\n    pass\n"}, "defines no main()"),
    ("main-not-callable", {"code": "main = 42\n"}, "main is a int, not a function"),
    ("code-number", {"code": 42}, "code: is a int"),
    ("modules-list", {"modules": ["main"]}, "modules: is a list"),
    ("global-not-str", {"code": "def main():\n    pass\n", "global_modules": {"g": 1}},
     "global_modules.g: is a int"),
    ("empty", {}, "nothing to run: the document has no code, modules or global_modules"),
    ("restart-bad", {"code": "def main():\n    pass\n", "restart": "sometimes"},
     "restart: 'sometimes' is not allowed"),
    ("enabled-bad", {"code": "def main():\n    pass\n", "enabled": "false"},
     "enabled: is a str"),
    ("huge", {"code": "def main():\n    pass\n" + "#" * defaults.MAX_CODE_BYTES + "\n"},
     f"allowed: at most {defaults.MAX_CODE_BYTES} bytes"),
    # Regression: a program's own json was silently replaced by Python's.
    ("stdlib-name", {"modules": {"main": "import json\ndef main():\n    json.MINE\n",
                                 "json": "MINE = 1\n"}},
     "modules: 'json' would never be imported: Python has loaded a module of that name"),
]


def test_bad_documents_are_reported_and_the_node_keeps_going(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile = tmp_path / "good.pid"
    code_db.save({"_id": "good", "type": 1000, "code": looping(pidfile)})
    node = node_factory(mac_id=1000)
    good = wait_pid(pidfile)
    for doc_id, fields, _ in BAD_DOCS:
        code_db.save(dict(fields, _id=doc_id, type=1000))
    for doc_id, _, expected in BAD_DOCS:
        program = node.wait_program(doc_id, state="invalid")
        assert expected in program["last_error"], doc_id
        assert program["pid"] is None
        node.wait_log(f"{doc_id}: ")
        assert expected in node.log()
    assert node.alive()
    assert node.program("good")["pid"] == good == read_pid(pidfile)
    assert pid_alive(good)

    # Fixing a document makes it run, with the error gone.
    fixed = tmp_path / "fixed.pid"
    save(code_db, {"_id": "syntax", "type": 1000, "code": looping(fixed)})
    node.wait_program("syntax", state="running", pid=wait_pid(fixed), last_error=None)


def test_document_for_another_node_is_not_run(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    theirs, mine = tmp_path / "theirs.pid", tmp_path / "mine.pid"
    code_db.save({"_id": "theirs", "type": 1001, "code": looping(theirs)})
    code_db.save({"_id": "mine", "type": "1000", "code": looping(mine)})  # a string works too
    node = node_factory(mac_id=1000)
    wait_pid(mine)  # the feed delivers in order: "theirs" was seen before
    node.wait_program("mine", state="running")
    assert not theirs.exists()
    assert "theirs" not in node.status()["programs"]

    other = node_factory(mac_id=1001)
    wait_pid(theirs)
    other.wait_program("theirs", state="running")
    assert "mine" not in other.status()["programs"]


# -- signals to the daemon ------------------------------------------------------------------

def test_sighup_restarts_every_program(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    a_pid, b_pid = tmp_path / "a.pid", tmp_path / "b.pid"
    code_db.save({"_id": "a", "type": 1000, "code": looping(a_pid)})
    code_db.save({"_id": "b", "type": 1000, "code": looping(b_pid)})
    node = node_factory(mac_id=1000)
    old_a, old_b = wait_pid(a_pid), wait_pid(b_pid)
    node.wait_program("b", state="running", pid=old_b)
    node.signal(signal.SIGHUP)
    new_a, new_b = wait_pid(a_pid, other_than=old_a), wait_pid(b_pid, other_than=old_b)
    node.wait_program("a", state="running", pid=new_a)
    node.wait_program("b", state="running", pid=new_b)
    wait_dead(old_a)
    wait_dead(old_b)
    assert node.alive()


def test_sigusr1_writes_the_stacks_of_daemon_and_programs(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile = tmp_path / "stacky.pid"
    code_db.save({"_id": "stacky", "type": 1000, "name": "stacky", "code": (
        "import os, time\n"
        "def waiting_for_quit():\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n"
        "def main():\n" + put(pidfile, "os.getpid()") +
        "    waiting_for_quit()\n")})
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    node.wait_program("stacky", state="running", pid=pid)
    node.signal(signal.SIGUSR1)
    node.wait_log(f"--- himbeere daemon {node.pid} stacks ---")
    node.wait_log(f"stack of stacky (pid {pid}) follows")
    node.wait_log('File "<stacky:main>", line 4 in waiting_for_quit')
    log = node.log()
    assert "Current thread" in log or "Thread 0x" in log
    assert "in run" in log  # the daemon's own threads
    assert node.alive() and pid_alive(pid)
    assert node.program("stacky")["pid"] == pid


def test_sigterm_stops_gracefully(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pidfile, bye = tmp_path / "polite.pid", tmp_path / "bye"
    code_db.save({"_id": "polite", "type": 1000, "code": looping(
        pidfile, top="def farewell():\n" + put(bye, "'goodbye'"),
        before="    register_quit_notification(farewell)\n")})
    node = node_factory(mac_id=1000)
    pid = wait_pid(pidfile)
    node.wait_program("polite", state="running", pid=pid)
    assert node.stop() == 0
    assert bye.read_text() == "goodbye"
    assert not pid_alive(pid)
    status = node.status()
    assert status["state"] == "stopped"
    assert status["programs"]["polite"]["state"] == "stopped"
    assert status["programs"]["polite"]["pid"] is None
    assert "SIGKILL" not in node.log()


# -- a daemon killed with -9 -----------------------------------------------------------------

def test_restarted_daemon_kills_the_program_a_killed_one_left(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    beats = tmp_path / "beats"
    beats.mkdir()
    code_db.save({"_id": "deaf", "type": 1000, "code": (
        "import os, time\n"
        "def main():\n"
        f"    beat = os.path.join({str(beats)!r}, str(os.getpid()))\n"
        "    while True:  # deaf to should_quit()\n"
        "        open(beat, 'a').write('.')\n"
        "        time.sleep(0.05)\n")})
    state_dir = tmp_path / "state"
    first = node_factory(mac_id=1000, state_dir=state_dir)
    old = wait_for(lambda: [int(p.name) for p in beats.iterdir()])[0]
    first.wait_program("deaf", state="running", pid=old)
    first.kill()
    size = (beats / str(old)).stat().st_size
    wait_for(lambda: (beats / str(old)).stat().st_size > size,
             message="the orphan stopped beating before the new daemon came")

    second = node_factory(mac_id=1000, state_dir=state_dir)
    second.wait_log(f"killing program deaf (pid {old}) left by a previous daemon")
    new = wait_for(lambda: [int(p.name) for p in beats.iterdir() if int(p.name) != old])[0]
    second.wait_program("deaf", state="running", pid=new)
    assert not pid_alive(old)
    live = [int(p.name) for p in beats.iterdir() if pid_alive(int(p.name))]
    assert live == [new]


def test_program_of_a_killed_daemon_quits_with_its_subprocesses(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code_db.save({"_id": "polite", "type": 1000, "code": (
        "import os, subprocess, time\n"
        "def main():\n"
        "    sleeper = subprocess.Popen(['sleep', '1000'])\n" +
        put(pids, "f'{os.getpid()} {sleeper.pid}'") +
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")})
    node = node_factory(mac_id=1000)
    program, sleeper = (int(p) for p in wait_file(pids).split())
    node.kill()
    wait_dead(program)  # the daemon's end of its connection closed: should_quit()
    wait_dead(sleeper)


def test_raising_restart_count_restarts_the_program(node_factory, code_db, tmp_path) -> None:
    """``himbeere restart`` raises ``restart_count``; nothing else in the doc changes."""
    pids = tmp_path / "pids"
    code_db.save({"_id": "r", "type": 1000, "name": "r", "code": (
        "import os, time\n"
        "def main():\n"
        f"    open({str(pids)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")})
    node = node_factory(mac_id=1000)
    first = node.wait_program("r", state="running")["pid"]
    doc = code_db.get("r")
    doc["restart_count"] = 1
    code_db.save(doc)
    second = wait_for(lambda: (node.program("r").get("state") == "running"
                               and node.program("r").get("pid") not in (None, first)
                               and node.program("r")["pid"]))
    # "running" is reported when the process starts, before main() writes
    # its pid: wait for the second line rather than read the file at once.
    wait_for(lambda: len(pids.read_text().split()) >= 2)
    assert pids.read_text().split() == [str(first), str(second)]


def test_a_program_name_cannot_forge_a_line_of_the_daemon_log(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    """Regression: a name like ``"a\\nFAKE LOG LINE"`` wrote what looked like
    an entry of the daemon's own log."""
    name = "a\nFAKE LOG LINE\r\x1b[2J"
    code_db.save({"_id": "forger\nFAKE ID LINE", "type": 1000, "name": name,
                  "restart": "never", "code": (
                      "def main():\n"
                      "    print('hi')\n"
                      "    raise RuntimeError('boom\\nFAKE ERROR LINE')\n")})
    node = node_factory(mac_id=1000)
    program = node.wait_program("forger\nFAKE ID LINE", state="crashed")
    assert program["name"] == name  # the status shows the name as it is
    escaped = "a\\nFAKE LOG LINE\\r\\x1b[2J"
    node.wait_log(f"{escaped}: crashed: Traceback")
    log = node.log()
    assert f"{escaped}: started (pid" in log
    assert f"[{escaped}] hi\n" in log
    forged = [line for line in log.splitlines() if line.startswith("FAKE")]
    assert forged == [], log
    assert "\x1b" not in log


def test_a_node_runs_at_most_max_programs(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    """Regression: 300 code documents started 300 processes.  Beyond
    ``max_programs`` a program is ``rejected``, says why, and starts once a
    slot frees."""
    for i in range(5):
        code_db.save({"_id": f"p{i}", "type": 1000, "code": looping(tmp_path / f"p{i}.pid")})
    node = node_factory(mac_id=1000, flags=["--max-programs", "3"])

    def states() -> dict[str, str]:
        return {doc_id: p.get("state") for doc_id, p in
                ((node.status() or {}).get("programs") or {}).items()}

    wait_for(lambda: sorted(states().values()) == ["rejected"] * 2 + ["running"] * 3,
             message=lambda: f"states: {states()}")
    rejected = sorted(d for d, state in states().items() if state == "rejected")
    for doc_id in rejected:
        assert node.program(doc_id)["last_error"] == (
            "not started: this node runs its ceiling of 3 programs (max_programs); "
            "it starts when one of them ends")
        assert not (tmp_path / f"{doc_id}.pid").exists()
    running = sorted(d for d, state in states().items() if state == "running")
    code_db.delete(code_db.get(running[0]))
    started = wait_for(lambda: [d for d in rejected if node.program(d).get("state") == "running"],
                       message=lambda: f"states: {states()}")
    assert len(started) == 1
    wait_pid(tmp_path / f"{started[0]}.pid")
    assert sorted(states().values()) == ["rejected"] + ["running"] * 3
    node.wait_log(f"{started[0]}: a slot is free, starting")


def test_code_that_makes_compile_raise_memoryerror_is_invalid(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path) -> None:
    """Regression: ``"x = " + "-" * 100000 + "1"`` made compile() raise
    MemoryError; the daemon logged it without the document's id and dropped
    the update while the old version kept running.  Now the update is
    ``invalid`` with the error, like any code that cannot run, and the node
    goes on."""
    pidfile = tmp_path / "deep.pid"
    code_db.save({"_id": "deep", "type": 1000, "code": looping(pidfile)})
    node = node_factory(mac_id=1000)
    old = wait_pid(pidfile)
    save(code_db, {"_id": "deep", "type": 1000,
                   "code": "x = " + "-" * 100000 + "1\n" + looping(pidfile)})
    program = node.wait_program("deep", state="invalid")
    assert program["rev"].startswith("2-")
    # Python 3.13 says why ("Parser stack overflowed ..."); older ones do not.
    assert program["last_error"].startswith("module 'main' cannot be compiled: MemoryError")
    assert program["last_error"].endswith("(nested too deeply?)")
    node.wait_log("deep: module 'main' cannot be compiled: MemoryError")
    wait_dead(old)
    assert "could not handle" not in node.log()
    save(code_db, {"_id": "deep", "type": 1000, "code": looping(pidfile)})
    node.wait_program("deep", state="running", pid=wait_pid(pidfile, other_than=old))
    assert node.alive()


@pytest.mark.parametrize("how", ["disable", "delete", "kill -9 of the daemon"])
def test_a_descendant_that_calls_setsid_goes_with_its_program(
        node_factory: NodeFactory, code_db: Database, tmp_path: Path, how: str) -> None:
    """Regression: a program's descendant that called setsid() kept running
    after the program was stopped or deleted."""
    pids = tmp_path / "pids"
    doc = {"_id": "esc", "type": 1000, "code": (
        "import os, subprocess, time\n"
        "def main():\n"
        "    sleeper = subprocess.Popen(['setsid', 'sleep', '1000'])\n"
        "    daemon = subprocess.run(['sh', '-c', 'setsid sleep 1000 >/dev/null 2>&1 & "
        "echo $!'], capture_output=True, text=True).stdout.strip()\n" +
        put(pids, "f'{os.getpid()} {sleeper.pid} {daemon}'") +
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")}
    code_db.save(dict(doc))
    node = node_factory(mac_id=1000)
    program, sleeper, daemon = (int(p) for p in wait_file(pids).split())
    try:
        node.wait_program("esc", state="running", pid=program)
        assert pid_alive(sleeper) and pid_alive(daemon)  # orphaned, yet alive while it runs
        if how == "disable":
            save(code_db, dict(doc, enabled=False))
            node.wait_program("esc", state="stopped")
        elif how == "delete":
            code_db.delete(code_db.get("esc"))
        else:
            node.kill()
        for pid in (program, sleeper, daemon):
            wait_dead(pid)
    finally:
        kill_leftover(sleeper, b"sleep")
        kill_leftover(daemon, b"sleep")


def kill_leftover(pid: int, command: bytes) -> None:
    """Kill ``pid`` if it still runs ``command`` (a test that failed left it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if command in handle.read():
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_a_program_given_to_another_node_stops_on_this_one(
        node_factory: NodeFactory, code_db: Database) -> None:
    """Regression: the feed's filter no longer passes a document whose ``type``
    names another node, so the program ran on both nodes until a restart."""
    code_db.save({"_id": "mover", "type": 1000, "name": "mover", "code": (
        "import time\n"
        "def main():\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n")})
    here, there = node_factory(mac_id=1000), node_factory(mac_id=2000)
    pid = here.wait_program("mover", state="running")["pid"]
    code_db.save(dict(code_db.get("mover"), type=2000))
    there.wait_program("mover", state="running", timeout=30)
    # Within six heartbeats (1 s here) the recheck finds it gone from this node.
    wait_for(lambda: not here.program("mover"), 30,
             message=lambda: f"{here.program('mover')}\n{here.log()[-2000:]}")
    wait_dead(pid)
    here.wait_log("recheck: mover now names node 2000, not this one")
    assert here.alive()

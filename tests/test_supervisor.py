"""The supervisor one ``loop()`` step at a time, without a CouchDB server.

Most tests use :class:`FakeForkServer`, which hands out made-up pids and
lets the test play the child (report, exit), and a fake clock, so grace
periods and backoff are stepped through instead of waited for.  Signals
the supervisor would send are recorded, never sent.  The tests at the end
use the real fork server and real children.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import codedoc, defaults, programs
from himbeere.programs import Supervisor
from tests.helpers import wait_for
from tests.nodes import pid_alive
from tests.test_programs import kill_leftover

NODE = 1000
GOOD = "def main():\n    pass\n"


class FakeChild:
    """One made-up program process: the test decides how it ends."""

    def __init__(self, server: FakeForkServer, pid: int, spec: Any, conn: Any) -> None:
        self.server, self.pid, self.spec, self.conn = server, pid, spec, conn

    def received(self) -> list[Any]:
        """What the supervisor sent this child ("quit")."""
        messages = []
        while not self.conn.closed and self.conn.poll():
            try:
                messages.append(self.conn.recv())
            except EOFError:
                break
        return messages

    def exit(self, code: int, report: Optional[tuple[str, Optional[str]]] = None) -> None:
        """Report like child.main would, close the connection, then exit."""
        if report is not None:
            self.conn.send(report)
        self.conn.close()
        self.server.exits.append((self.pid, code))

    def crash(self, text: str = "Traceback ...\nZeroDivisionError: boom\n") -> None:
        self.exit(1, ("crashed", text))


class FakeForkServer:
    """Stands in for :class:`~himbeere.forkserver.ForkServer`."""

    def __init__(self) -> None:
        self.running = True
        self.conn, self._far_end = multiprocessing.Pipe()
        self.children: list[FakeChild] = []
        self.exits: list[tuple[int, int]] = []
        self.fail: Optional[str] = None

    def start(self) -> None:
        pass

    def spawn(self, spec: Any) -> tuple[int, Any]:
        if self.fail:
            raise RuntimeError(self.fail)
        ours, theirs = multiprocessing.Pipe()
        child = FakeChild(self, 4_000_000 + len(self.children), spec, theirs)
        self.children.append(child)
        return child.pid, ours

    def collect(self) -> list[tuple[int, int]]:
        exits, self.exits = self.exits, []
        return exits

    def close(self) -> None:
        self.conn.close()
        self._far_end.close()
        for child in self.children:
            child.conn.close()

    def started(self, doc_id: str) -> list[FakeChild]:
        return [child for child in self.children if child.spec.doc_id == doc_id]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    fake_time = types.SimpleNamespace(monotonic=clock, time=time.time,
                                      strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr(programs, "time", fake_time)
    return clock


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(programs, "_kill_group",
                        lambda pid, sig, fallback=True: sent.append((pid, sig)))
    return sent


class Harness:
    def __init__(self, clock: Clock, tmp_path: Optional[Path] = None) -> None:
        self.clock = clock
        self.server = FakeForkServer()
        self.changes = 0
        self.sup = Supervisor(node=NODE, grace_period=2.0, kill_grace=3.0,
                              fork_server=self.server, on_change=self._changed,
                              state_dir=tmp_path)

    def _changed(self) -> None:
        self.changes += 1

    def step(self, advance: float = 0.0) -> None:
        self.clock.now += advance
        self.sup.loop(timeout=0)

    def doc(self, doc_id: str, rev: int = 1, **fields: Any) -> None:
        doc = {"_id": doc_id, "_rev": f"{rev}-x", "type": NODE}
        doc.update(fields)
        self.sup.submit(doc)
        self.step()

    def delete(self, doc_id: str) -> None:
        self.sup.submit({"_id": doc_id, "_deleted": True})
        self.step()

    def status(self, doc_id: str) -> dict[str, Any]:
        return self.sup.snapshot()[doc_id]

    def last(self, doc_id: str) -> FakeChild:
        return self.server.started(doc_id)[-1]


@pytest.fixture
def harness(clock: Clock, kills: list[tuple[int, int]]):
    harness = Harness(clock)
    yield harness
    harness.sup.close()


# -- starting and restarting ---------------------------------------------------------------

def test_code_doc_starts_a_program_with_its_modules(harness: Harness) -> None:
    harness.doc("multi", name="multi", modules={"main": "import util\ndef main(): pass\n",
                                                "util": "X = 1\n"})
    [child] = harness.server.started("multi")
    assert child.spec.name == "multi"
    assert child.spec.main_module == "main"
    assert set(child.spec.modules) == {"main", "util"}
    status = harness.status("multi")
    assert (status["state"], status["pid"], status["rev"]) == ("running", child.pid, "1-x")


def test_unchanged_code_under_a_new_revision_does_not_restart(harness: Harness) -> None:
    harness.doc("a", code=GOOD)
    harness.doc("a", rev=2, code=GOOD, note="only a note changed")
    assert len(harness.server.started("a")) == 1
    assert harness.last("a").received() == []
    assert harness.status("a")["rev"] == "2-x"


def test_changed_code_restarts_after_the_old_child_exits(harness: Harness) -> None:
    harness.doc("a", code=GOOD)
    old = harness.last("a")
    harness.doc("a", rev=2, code=GOOD + "# v2\n")
    assert old.received() == ["quit"]
    assert harness.status("a")["state"] == "stopping"
    assert len(harness.server.started("a")) == 1  # never two at once
    old.exit(0, ("finished", None))
    harness.step()
    new = harness.last("a")
    assert new is not old and "# v2" in new.spec.modules["main"]
    assert harness.status("a")["state"] == "running"


def test_crash_loop_backs_off_doubling(harness: Harness) -> None:
    harness.doc("crash", code=GOOD)
    delays = []
    for restart in (1, 2, 3):
        harness.last("crash").crash("Traceback ...\nZeroDivisionError: boom\n")
        harness.step()
        status = harness.status("crash")
        assert status["state"] == "backing-off"
        assert status["restarts"] == restart
        assert "ZeroDivisionError: boom" in status["last_error"]
        count = len(harness.server.started("crash"))
        delay = harness.sup.programs["crash"].next_start - harness.clock.now
        delays.append(delay)
        harness.step(delay - 0.01)
        assert len(harness.server.started("crash")) == count  # not yet
        harness.step(0.02)
        assert len(harness.server.started("crash")) == count + 1
        assert harness.status("crash")["state"] == "running"
        assert "ZeroDivisionError" in harness.status("crash")["last_error"]
    assert delays == [defaults.BACKOFF_MIN, 2 * defaults.BACKOFF_MIN, 4 * defaults.BACKOFF_MIN]


def test_lifecycle_events_go_into_the_programs_own_log(harness: Harness) -> None:
    """Issue 12: the log showed a crashing program's prints, never why it ended."""
    written: list[tuple[str, str, str]] = []
    harness.sup.on_log = lambda doc_id, name, lines, dropped: written.extend(
        (doc_id, line[2], line[1]) for line in lines if len(line) == 3)
    harness.doc("crash", code=GOOD)
    first = harness.last("crash")
    first.crash("Traceback (most recent call last):\n  File \"<crash:main>\", line 2\n"
                "ZeroDivisionError: boom\n")
    harness.step()
    harness.step(defaults.BACKOFF_MIN)
    second = harness.last("crash")
    harness.doc("crash", rev=2, code=GOOD + "# v2\n")
    second.exit(0, ("finished", None))
    harness.step()
    third = harness.last("crash")
    harness.doc("crash", rev=3, code=GOOD + "# v2\n", enabled=False)
    third.exit(0, ("finished", None))
    harness.step()
    assert written == [
        ("crash", "event", f"started (pid {first.pid})"),
        ("crash", "error", "Traceback (most recent call last):"),
        ("crash", "error", '  File "<crash:main>", line 2'),
        ("crash", "error", "ZeroDivisionError: boom"),
        ("crash", "event", f"crashed; restart 1 in {defaults.BACKOFF_MIN:g} s"),
        ("crash", "event", f"started (pid {second.pid})"),
        ("crash", "event", "changed (rev 2-x), restarting"),
        ("crash", "event", "stopped"),
        ("crash", "event", f"started (pid {third.pid})"),
        ("crash", "event", "disabled (rev 3-x), stopping"),
        ("crash", "event", "stopped"),
    ]


def test_restart_never_leaves_a_crashed_program(harness: Harness) -> None:
    harness.doc("once", code=GOOD, restart="never")
    harness.last("once").crash()
    harness.step(100)
    status = harness.status("once")
    assert status["state"] == "crashed" and "boom" in status["last_error"]
    assert len(harness.server.started("once")) == 1


def test_restart_always_restarts_a_finished_program(harness: Harness) -> None:
    harness.doc("again", code=GOOD, restart="always")
    harness.last("again").exit(0, ("finished", None))
    harness.step()
    assert harness.status("again")["state"] == "backing-off"
    harness.step(defaults.BACKOFF_MIN)
    assert len(harness.server.started("again")) == 2
    assert harness.status("again")["restarts"] == 1


def test_finished_program_with_on_failure_stays_finished(harness: Harness) -> None:
    harness.doc("done", code=GOOD)
    harness.last("done").exit(0, ("finished", None))
    harness.step(100)
    assert harness.status("done")["state"] == "finished"
    assert harness.status("done")["pid"] is None


def test_killed_program_says_by_which_signal(harness: Harness) -> None:
    harness.doc("oom", code=GOOD)
    harness.last("oom").exit(-signal.SIGKILL)
    harness.step()
    assert harness.status("oom")["last_error"] == "killed by SIGKILL"


def test_fork_failure_backs_off_instead_of_crashing_the_loop(harness: Harness) -> None:
    harness.server.fail = "fork failed: out of memory"
    harness.doc("a", code=GOOD)
    assert harness.status("a")["state"] == "backing-off"
    assert "out of memory" in harness.status("a")["last_error"]
    harness.server.fail = None
    harness.step(defaults.BACKOFF_MIN)
    assert harness.status("a")["state"] == "running"


# -- stopping ----------------------------------------------------------------------------

def test_stop_escalates_quit_then_sigterm_then_sigkill(
        harness: Harness, kills: list[tuple[int, int]]) -> None:
    harness.doc("stubborn", code=GOOD)
    child = harness.last("stubborn")
    harness.delete("stubborn")
    assert child.received() == ["quit"]
    harness.step(1.9)
    assert kills == []
    harness.step(0.2)  # past the 2 s grace period
    assert kills == [(child.pid, signal.SIGTERM)]
    harness.step(3.1)  # past kill_grace
    assert kills == [(child.pid, signal.SIGTERM), (child.pid, signal.SIGKILL)]
    child.exit(-signal.SIGKILL)
    harness.step()
    assert "stubborn" not in harness.sup.snapshot()


def test_program_that_quits_in_time_gets_no_signal(
        harness: Harness, kills: list[tuple[int, int]]) -> None:
    harness.doc("polite", code=GOOD)
    child = harness.last("polite")
    harness.sup.stop_all()
    child.exit(0, ("finished", None))
    harness.step()
    assert harness.status("polite")["state"] == "stopped"
    assert not harness.sup.busy()
    # What the program left behind the fork server killed (reaper.py): no
    # sweep from here, which could hit the program's pid reused.
    assert kills == []


def test_disabled_program_is_stopped_and_enabled_again(harness: Harness) -> None:
    harness.doc("a", code=GOOD)
    harness.doc("a", rev=2, code=GOOD, enabled=False)
    harness.last("a").exit(0, ("finished", None))
    harness.step()
    assert harness.status("a")["state"] == "stopped"
    harness.doc("a", rev=3, code=GOOD, enabled=True)
    assert len(harness.server.started("a")) == 2
    assert harness.status("a")["state"] == "running"


def test_disabling_a_backing_off_program_keeps_it_stopped(harness: Harness) -> None:
    """Regression: the pending restart of a backing-off program survived
    ``enabled: false`` and started the program anyway."""
    harness.doc("a", code=GOOD)
    harness.last("a").crash()
    harness.step()
    assert harness.status("a")["state"] == "backing-off"
    harness.doc("a", rev=2, code=GOOD, enabled=False)
    harness.step(100)
    assert harness.status("a")["state"] == "stopped"
    assert len(harness.server.started("a")) == 1


def test_invalid_update_of_a_backing_off_program_is_not_started(harness: Harness) -> None:
    """Regression: same as above, for an update that made the code invalid."""
    harness.doc("a", code=GOOD)
    harness.last("a").crash()
    harness.step()
    harness.doc("a", rev=2, code="def main(:\n")
    harness.step(100)
    assert harness.status("a")["state"] == "invalid"
    assert len(harness.server.started("a")) == 1


def test_fixed_program_does_not_show_the_old_error(harness: Harness) -> None:
    """Regression: a program fixed after being invalid ran with the syntax
    error still in ``last_error``."""
    harness.doc("a", code="def main(:\n")
    assert "syntax error" in harness.status("a")["last_error"]
    harness.doc("a", rev=2, code=GOOD)
    status = harness.status("a")
    assert status["state"] == "running"
    assert status["last_error"] is None


def test_restart_all_does_not_bring_back_a_deleted_program(harness: Harness) -> None:
    """Regression: SIGHUP while a deleted program was stopping restarted it."""
    harness.doc("gone", code=GOOD)
    child = harness.last("gone")
    harness.delete("gone")
    harness.sup.restart_all()
    harness.step()
    child.exit(0, ("finished", None))
    harness.step()
    assert "gone" not in harness.sup.snapshot()
    assert len(harness.server.started("gone")) == 1


def test_restart_all_restarts_running_and_finished_programs(harness: Harness) -> None:
    harness.doc("run", code=GOOD)
    harness.doc("done", code=GOOD)
    harness.last("done").exit(0, ("finished", None))
    harness.step()
    harness.sup.restart_all()
    harness.step()
    assert len(harness.server.started("done")) == 2
    harness.last("run").exit(0, ("finished", None))
    harness.step()
    assert len(harness.server.started("run")) == 2
    assert harness.status("run")["state"] == "running"


def test_nothing_starts_once_the_node_is_stopping(harness: Harness) -> None:
    """Regression: a document arriving during shutdown started a program
    that outlived the daemon."""
    harness.doc("a", code=GOOD)
    child = harness.last("a")
    harness.sup.stop_all()
    harness.doc("a", rev=2, code=GOOD + "# v2\n")
    harness.doc("b", code=GOOD)
    child.exit(0, ("finished", None))
    harness.step(100)
    assert len(harness.server.started("a")) == 1
    assert harness.server.started("b") == []
    assert not harness.sup.busy()


def test_forced_stop_does_not_delay_a_pending_sigkill(
        harness: Harness, kills: list[tuple[int, int]]) -> None:
    harness.doc("a", code=GOOD)
    child = harness.last("a")
    harness.sup.stop_all()
    harness.step(2.1)
    assert kills == [(child.pid, signal.SIGTERM)]
    harness.step(2.0)
    harness.sup.stop_all(force=True)  # a second Ctrl-C
    harness.step(1.1)
    assert (child.pid, signal.SIGKILL) in kills
    assert kills.count((child.pid, signal.SIGTERM)) == 1


# -- global modules ---------------------------------------------------------------------

def test_global_module_change_restarts_only_its_users(harness: Harness) -> None:
    harness.sup.submit({"_id": "lib", "_rev": "1-x", "global_modules": {"shared": "V = 1\n"}})
    harness.doc("user", code="import shared\ndef main(): pass\n")
    harness.doc("other", code=GOOD)
    user, other = harness.last("user"), harness.last("other")
    assert user.spec.global_modules["shared"] == "V = 1\n"
    harness.sup.submit({"_id": "lib", "_rev": "2-x", "type": 999,
                        "global_modules": {"shared": "V = 2\n"}})
    harness.step()
    assert user.received() == ["quit"]
    assert other.received() == []
    user.exit(0, ("finished", None))
    harness.step()
    assert harness.last("user").spec.global_modules["shared"] == "V = 2\n"


def test_every_program_sees_every_global_module(harness: Harness) -> None:
    """Regression: a program that imported one global module statically got
    only that one, so ``importlib.import_module("other")`` failed."""
    harness.sup.submit({"_id": "lib", "_rev": "1-x",
                        "global_modules": {"shared": "V = 1\n", "plugin": "P = 1\n"}})
    harness.doc("user", code="import shared\ndef main(): pass\n")
    assert set(harness.last("user").spec.global_modules) == {"shared", "plugin"}


def test_own_module_shadows_a_global_one_and_ignores_its_changes(harness: Harness) -> None:
    harness.sup.submit({"_id": "lib", "_rev": "1-x", "global_modules": {"util": "V = 1\n"}})
    harness.doc("own", modules={"main": "import util\ndef main(): pass\n", "util": "V = 0\n"})
    child = harness.last("own")
    harness.sup.submit({"_id": "lib", "_rev": "2-x", "global_modules": {"util": "V = 2\n"}})
    harness.step()
    assert child.received() == []
    assert harness.status("own")["state"] == "running"


def test_deleting_a_global_module_restarts_its_users(harness: Harness) -> None:
    harness.sup.submit({"_id": "lib", "_rev": "1-x", "global_modules": {"shared": "V = 1\n"}})
    harness.doc("user", code="import shared\ndef main(): pass\n")
    harness.delete("lib")
    assert harness.last("user").received() == ["quit"]


def test_globals_changing_back_while_stopping_restart_the_program(harness: Harness) -> None:
    """Regression: the fingerprint of a program restarted while the globals
    changed twice was the stale one, so changing them back to the first
    version did not restart the program, which kept running the second."""
    lib = {"_id": "lib", "global_modules": {"shared": "V = 'A'\n"}}
    harness.sup.submit(dict(lib, _rev="1-x"))
    harness.doc("user", code="import shared\ndef main(): pass\n")
    first = harness.last("user")
    harness.sup.submit(dict(lib, _rev="2-x", global_modules={"shared": "V = 'B'\n"}))
    harness.step()
    assert first.received() == ["quit"]
    harness.sup.submit(dict(lib, _rev="3-x"))  # back to A while the program stops
    harness.step()
    first.exit(0, ("finished", None))
    harness.step()
    second = harness.last("user")
    assert second.spec.global_modules["shared"] == "V = 'A'\n"
    harness.sup.submit(dict(lib, _rev="4-x", global_modules={"shared": "V = 'B'\n"}))
    harness.step()
    assert second.received() == ["quit"]


def test_broken_global_module_document_is_logged(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="himbeere")
    harness.sup.submit({"_id": "lib", "_rev": "1-x", "global_modules": {"shared": 5}})
    harness.step()
    assert "lib" in caplog.text and "global_modules.shared" in caplog.text
    assert harness.sup.snapshot() == {}


def test_broken_program_still_exports_its_global_modules(harness: Harness) -> None:
    """Regression: a syntax error in a document's own code also withdrew the
    global modules it exports, from every node."""
    harness.sup.submit({"_id": "lib", "_rev": "1-x", "type": NODE + 1,
                        "code": "def main(:\n", "global_modules": {"shared": "V = 1\n"}})
    harness.doc("mine-too", code="def main(:\n", global_modules={"other": "W = 1\n"})
    harness.doc("user", code="import shared, other\ndef main(): pass\n")
    assert harness.last("user").spec.global_modules == {"shared": "V = 1\n", "other": "W = 1\n"}
    assert harness.status("mine-too")["state"] == "invalid"


# -- bad documents ------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"code": "def main(:\n"}, "syntax error in module 'main', line 1"),
    ({"code": 42}, "code: is a int"),
    ({"modules": ["main"]}, "modules: is a list"),
    ({"modules": {"main": GOOD, "util": None}}, "modules.util: is a NoneType"),
    ({"modules": {"util": "X = 1\n"}}, "no 'main' module"),
    ({"modules": {"main": GOOD, "not a name": ""}}, "'not a name' is not a module name"),
    ({"code": GOOD, "global_modules": {"shared": 1}}, "global_modules.shared: is a int"),
    ({"code": GOOD, "restart": "sometimes"}, "restart: 'sometimes' is not allowed"),
    ({"code": GOOD, "enabled": "no"}, "enabled: is a str"),
    ({}, "nothing to run"),
    ({"code": GOOD + "#" * defaults.MAX_CODE_BYTES}, "allowed: at most"),
])
def test_bad_document_is_invalid_and_never_started(
        harness: Harness, fields: dict[str, Any], expected: str) -> None:
    harness.doc("good", code=GOOD)
    harness.doc("bad", **fields)
    status = harness.status("bad")
    assert status["state"] == "invalid"
    assert expected in status["last_error"]
    assert harness.server.started("bad") == []
    assert harness.status("good")["state"] == "running"


def test_other_nodes_documents_are_ignored(harness: Harness) -> None:
    harness.sup.submit({"_id": "theirs", "_rev": "1-x", "type": NODE + 1, "code": GOOD})
    harness.sup.submit({"_id": "cmd", "_rev": "1-x", "type": f"{NODE}_cmd", "cmd": ["ls"]})
    harness.step()
    assert harness.sup.snapshot() == {}
    assert harness.server.children == []


def test_program_moved_to_another_node_is_stopped_and_forgotten(harness: Harness) -> None:
    harness.doc("moving", code=GOOD)
    child = harness.last("moving")
    harness.sup.submit({"_id": "moving", "_rev": "2-x", "type": NODE + 1, "code": GOOD})
    harness.step()
    assert child.received() == ["quit"]
    child.exit(0, ("finished", None))
    harness.step()
    assert "moving" not in harness.sup.snapshot()


@pytest.mark.parametrize("kind", [NODE, str(NODE), float(NODE)])
def test_type_may_be_the_mac_id_as_int_string_or_whole_float(kind: Any) -> None:
    assert codedoc.matches_node({"type": kind}, NODE)


@pytest.mark.parametrize("kind", [NODE + 1, f"{NODE}_cmd", NODE + 0.5, None, True])
def test_type_of_another_node_does_not_match(kind: Any) -> None:
    assert not codedoc.matches_node({"type": kind}, NODE)


def test_a_failing_step_is_logged_and_the_loop_goes_on(
        harness: Harness, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    harness.doc("a", code=GOOD)

    def broken(doc: Any) -> None:
        raise RuntimeError("bug")

    with monkeypatch.context() as patch:
        patch.setattr(harness.sup, "_apply", broken)
        harness.doc("b", code=GOOD)
    assert "could not handle doc" in caplog.text
    harness.doc("c", code=GOOD)
    assert harness.status("c")["state"] == "running"


# -- orphans ------------------------------------------------------------------------------

def test_recorded_pids_survive_for_the_next_daemon(tmp_path: Path) -> None:
    """The file the next daemon reads to kill what a ``kill -9``-ed one left."""
    sleeper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    sleeper.start()
    try:
        (tmp_path / "programs.json").write_text(json.dumps({
            "p": [sleeper.pid, programs._start_time(sleeper.pid)],
            "reused": [os.getpid(), "1"],  # a pid now owned by someone else
        }))
        sup = Supervisor(node=NODE, state_dir=tmp_path, fork_server=FakeForkServer())
        os.setpgid(sleeper.pid, sleeper.pid)  # programs lead their own group
        assert sup.kill_orphans() == 1
        sleeper.join(10)
        assert sleeper.exitcode == -signal.SIGKILL
        assert not (tmp_path / "programs.json").exists()
        sup.close()
    finally:
        if sleeper.is_alive():
            sleeper.kill()


def test_unreadable_pid_record_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "programs.json").write_text('{"p": "nonsense"}')
    sup = Supervisor(node=NODE, state_dir=tmp_path, fork_server=FakeForkServer())
    assert sup.kill_orphans() == 0
    sup.close()


# -- real children ------------------------------------------------------------------------

@pytest.fixture
def real() -> Any:
    # The fork server starts with the first program, inside the test, so
    # ``capfd`` catches what the programs print.
    sup = Supervisor(node=NODE, grace_period=2.0, kill_grace=1.0)
    yield sup
    sup.stop_all(force=True)
    deadline = time.monotonic() + 10
    while sup.busy() and time.monotonic() < deadline:
        sup.loop(0.05)
    sup.close()


def written(path: Path) -> Callable[[], str]:
    """True once ``path`` has content: a program's ``open(path, 'w')`` creates it empty first."""
    def check() -> str:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return ""
    return check


def run_until(sup: Supervisor, predicate: Any, timeout: float = 20.0) -> Any:
    def step() -> Any:
        sup.loop(0.05)
        return predicate()
    return wait_for(step, timeout, interval=0, message=lambda: json.dumps(sup.snapshot()))


def test_real_child_output_goes_to_on_log_in_whole_lines(
        capfd: pytest.CaptureFixture, real: Supervisor) -> None:
    """Lines reach the daemon (which logs them, prefixed, within its rate
    limit: logship.OutputLog); the child no longer writes them to fd 1."""
    shipped: list[tuple[str, str, str]] = []
    events: list[str] = []

    def on_log(doc_id: str, name: str, lines: list[Any], dropped: int) -> None:
        for line in lines:
            if len(line) == 2:
                shipped.append((doc_id, name, line[1]))
            else:
                events.append(line[1])  # the daemon's own: (time, text, kind)

    real.on_log = on_log
    real.submit({"_id": "talk", "_rev": "1-x", "type": NODE, "name": "talker", "code": (
        "import sys\n"
        "def main():\n"
        "    print('from print')\n"
        "    log('from log', 42)\n"
        "    sys.stdout.write('part')\n"
        "    sys.stdout.write('ial\\n')\n"
        "    print('to stderr', file=sys.stderr)\n"
    )})
    run_until(real, lambda: real.snapshot().get("talk", {}).get("state") == "finished")
    assert shipped == [("talk", "talker", line) for line in (
        "from print", "from log 42", "partial", "to stderr")]
    assert events[0].startswith("started (pid ") and events[1:] == ["finished: main() returned"]
    assert "[talker]" not in capfd.readouterr().out


def test_quit_notification_finishes_before_the_program_exits(
        real: Supervisor, tmp_path: Path) -> None:
    """Regression: main() returning as soon as should_quit() turned true
    ended the process while the quit notification was still running."""
    marker, ready = tmp_path / "notified", tmp_path / "ready"
    real.submit({"_id": "n", "_rev": "1-x", "type": NODE, "code": (
        "import time\n"
        "def bye():\n"
        "    time.sleep(0.3)\n"
        f"    open({str(marker)!r}, 'w').write('bye')\n"
        "def main():\n"
        "    register_quit_notification(bye)\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    while not should_quit():\n"
        "        time.sleep(0.01)\n"
    )})
    run_until(real, ready.exists)
    real.stop_all()
    run_until(real, lambda: not real.busy())
    assert marker.read_text() == "bye"
    assert real.snapshot()["n"]["state"] == "stopped"


def test_crashed_program_takes_its_subprocesses_with_it(
        real: Supervisor, tmp_path: Path) -> None:
    """Regression: a program that crashed left what it started running, and
    every restart added another."""
    pidfile = tmp_path / "sleep.pid"
    real.submit({"_id": "c", "_rev": "1-x", "type": NODE, "restart": "never", "code": (
        "import subprocess\n"
        "def main():\n"
        "    sleeper = subprocess.Popen(['sleep', '1000'])\n"
        f"    open({str(pidfile)!r}, 'w').write(str(sleeper.pid))\n"
        "    raise RuntimeError('crash')\n"
    )})
    run_until(real, lambda: real.snapshot().get("c", {}).get("state") == "crashed")
    sleeper = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(sleeper), message=f"sleep {sleeper} survived its program")
    assert "RuntimeError: crash" in real.snapshot()["c"]["last_error"]


def test_crash_report_shows_only_the_programs_frames(real: Supervisor) -> None:
    real.submit({"_id": "deep", "_rev": "1-x", "type": NODE, "restart": "never", "modules": {
        "main": "import helper\ndef main():\n    helper.fail()\n",
        "helper": "def fail():\n    raise KeyError('missing')\n",
    }})
    run_until(real, lambda: real.snapshot().get("deep", {}).get("state") == "crashed")
    error = real.snapshot()["deep"]["last_error"]
    assert error.startswith("Traceback (most recent call last):\n")
    assert 'File "<deep:main>", line 3, in main' in error
    assert 'File "<deep:helper>", line 2, in fail' in error
    assert error.endswith("KeyError: 'missing'\n")
    assert "himbeere" not in error and "importlib" not in error


def test_import_failure_report_shows_only_the_programs_frames(real: Supervisor) -> None:
    real.submit({"_id": "imp", "_rev": "1-x", "type": NODE, "restart": "never",
                 "code": "import no_such_module\ndef main():\n    pass\n"})
    run_until(real, lambda: real.snapshot().get("imp", {}).get("state") == "crashed")
    error = real.snapshot()["imp"]["last_error"]
    assert 'File "<imp:main>", line 1, in <module>' in error
    assert "ModuleNotFoundError: No module named 'no_such_module'" in error
    assert "himbeere" not in error and "frozen" not in error


ESCAPER = (
    "import os, subprocess, time\n"
    "def main():\n"
    "    # one that leaves the group but keeps its parent...\n"
    "    sleeper = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
    "    # ...and a daemon in the classic way: fork, setsid, fork, parent exits\n"
    "    r, w = os.pipe()\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        if os.fork() == 0:\n"
    "            os.write(w, str(os.getpid()).encode())\n"
    "            while True:\n"
    "                time.sleep(1)\n"
    "        os._exit(0)\n"
    "    os.close(w)\n"
    "    daemon = int(os.read(r, 100))\n"
    "    open({pids!r}, 'w').write(f'{{sleeper.pid}} {{daemon}}')\n"
    "    while not should_quit():\n"
    "        time.sleep(0.05)\n"
)


@pytest.mark.parametrize("how", ["stop", "delete"])
def test_setsid_descendants_go_with_their_program(
        real: Supervisor, tmp_path: Path, how: str) -> None:
    """Regression: a descendant that called setsid() (a daemonised child,
    ``start_new_session=True``) left the program's process group and kept
    running after the program was stopped or deleted."""
    pids = tmp_path / "pids"
    real.submit({"_id": "esc", "_rev": "1-x", "type": NODE,
                 "code": ESCAPER.format(pids=str(pids))})
    run_until(real, written(pids))
    sleeper, daemon = (int(p) for p in pids.read_text().split())
    try:
        _stop_and_check(real, how, pids, sleeper, daemon)
    finally:
        kill_leftover(sleeper, b"sleep")
        kill_leftover(daemon, b"himbeere.forkserver")


def _stop_and_check(real: Supervisor, how: str, pids: Path, sleeper: int, daemon: int) -> None:
    program = real.snapshot()["esc"]["pid"]
    # The daemon's parent exited: it is an orphan, adopted by the program
    # (a subreaper), and lives on as long as the program runs.
    run_until(real, lambda: _ppid(_ppid(daemon)) != program)
    real.loop(0.2)
    assert pid_alive(sleeper) and pid_alive(daemon) and pid_alive(program)
    if how == "stop":
        real.submit({"_id": "esc", "_rev": "2-x", "type": NODE, "enabled": False,
                     "code": ESCAPER.format(pids=str(pids))})
        run_until(real, lambda: real.snapshot()["esc"]["state"] == "stopped")
    else:
        real.submit({"_id": "esc", "_deleted": True})
        run_until(real, lambda: "esc" not in real.snapshot())
    for pid in (program, sleeper, daemon):
        wait_for(lambda pid=pid: not pid_alive(pid),  # type: ignore[misc]
                 message=f"pid {pid} survived its program's {how}")


def _ppid(pid: Optional[int]) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_orphans_that_end_while_their_program_runs_leave_no_zombie(
        real: Supervisor, tmp_path: Path) -> None:
    """A program reaps what its tree orphaned (``cmd &``), or each would
    stay a zombie until the program ends."""
    pids = tmp_path / "pids"
    real.submit({"_id": "bg", "_rev": "1-x", "type": NODE, "code": (
        "import subprocess, time\n"
        "def main():\n"
        "    out = subprocess.run(['sh', '-c', 'sleep 0.2 & echo $!'], capture_output=True)\n"
        f"    open({str(pids)!r}, 'w').write(out.stdout.decode())\n"
        "    while not should_quit():\n"
        "        time.sleep(0.05)\n"
    )})
    run_until(real, written(pids))
    orphan = int(pids.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{orphan}"),
             message=f"pid {orphan} stays a zombie")
    assert real.snapshot()["bg"]["state"] == "running"


# -- the ceiling on programs ----------------------------------------------------------------

def test_programs_beyond_the_ceiling_are_rejected_until_a_slot_frees(harness: Harness) -> None:
    """Regression: 300 code documents started 300 processes."""
    harness.sup.max_programs = 2
    for doc_id in ("a", "b", "c", "d"):
        harness.doc(doc_id, code=GOOD)
    assert [harness.status(d)["state"] for d in "abcd"] == [
        "running", "running", "rejected", "rejected"]
    assert harness.status("c")["last_error"] == (
        "not started: this node runs its ceiling of 2 programs (max_programs); "
        "it starts when one of them ends")
    assert harness.server.started("c") == []
    # A program that backs off keeps its slot: it will run again.
    harness.last("a").crash()
    harness.step()
    assert harness.status("a")["state"] == "backing-off"
    harness.step()
    assert harness.status("c")["state"] == "rejected"
    # One that ends gives its slot to the first in the queue.
    harness.delete("b")
    harness.last("b").exit(0, ("finished", None))
    harness.step()
    assert harness.status("c")["state"] == "running"
    assert harness.status("d")["state"] == "rejected"
    harness.step(defaults.BACKOFF_MIN)
    assert harness.status("a")["state"] == "running"
    # Disabling one frees its slot too; enabling it again queues it.
    harness.doc("c", rev=2, code=GOOD, enabled=False)
    harness.last("c").exit(0, ("finished", None))
    harness.step()
    assert harness.status("d")["state"] == "running"
    harness.doc("c", rev=3, code=GOOD)
    assert harness.status("c")["state"] == "rejected"


# -- documents the daemon cannot handle -----------------------------------------------------

DEEP = "x = " + "-" * 100000 + "1\n"  # compile() raises MemoryError


def test_code_the_compiler_cannot_take_is_invalid_and_stops_the_old_version(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: compile() raising MemoryError was logged without the
    document's id, and the update silently dropped while the old version
    kept running."""
    harness.doc("m", code=GOOD)
    old = harness.last("m")
    harness.doc("m", rev=2, code=DEEP + GOOD)
    assert old.received() == ["quit"]
    old.exit(0, ("finished", None))
    harness.step()
    status = harness.status("m")
    assert (status["state"], status["rev"]) == ("invalid", "2-x")
    # Python 3.13 says why ("Parser stack overflowed ..."); older ones do not.
    assert status["last_error"].startswith("module 'main' cannot be compiled: MemoryError")
    assert status["last_error"].endswith("(nested too deeply?)")
    assert "m: module 'main' cannot be compiled: MemoryError" in caplog.text
    assert harness.server.started("m") == [old]
    harness.doc("n", code=GOOD)
    assert harness.status("n")["state"] == "running"
    harness.doc("m", rev=3, code=GOOD)  # the old code again: it runs
    assert harness.status("m")["state"] == "running"


def test_any_failure_to_handle_a_document_shows_as_invalid(
        harness: Harness, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    harness.doc("a", code=GOOD)
    old = harness.last("a")

    def broken(doc: Any, default_restart: str = "") -> Any:
        raise KeyError("surprise")

    with monkeypatch.context() as patch:
        patch.setattr(codedoc, "parse", broken)
        harness.doc("a", rev=2, name="alpha", code=GOOD)
    old.exit(0, ("finished", None))
    harness.step()
    status = harness.status("a")
    assert (status["state"], status["name"], status["rev"]) == ("invalid", "alpha", "2-x")
    assert status["last_error"] == (
        "the node could not handle this document: KeyError: 'surprise'")
    assert "could not handle document a: the node could not handle" in caplog.text
    harness.doc("a", rev=3, code=GOOD)  # fixed: it runs again
    assert harness.status("a")["state"] == "running"


def test_a_programs_own_children_keep_their_exit_status(
        real: Supervisor, tmp_path: Path) -> None:
    """The orphan reaper never reaps a child the program started itself,
    however long the program takes to wait for it."""
    result = tmp_path / "result"
    real.submit({"_id": "own", "_rev": "1-x", "type": NODE, "restart": "never", "code": (
        "import os, subprocess, time\n"
        "from himbeere.runtime import reaper\n"
        "def main():\n"
        "    popen = subprocess.Popen(['sh', '-c', 'exit 7'])\n"
        "    spawned = subprocess.Popen(['sh', '-c', 'exit 8'], close_fds=False)\n"
        "    forked = os.fork()\n"
        "    if forked == 0:\n"
        "        os._exit(9)\n"
        "    system = os.system('exit 10')\n"
        "    time.sleep(3 * reaper.REAP_INTERVAL)  # the reaper looks, and looks again\n"
        "    codes = [popen.wait(), spawned.wait(), os.waitpid(forked, 0)[1] >> 8,\n"
        "             system >> 8]\n"
        f"    open({str(result)!r}, 'w').write(repr(codes))\n"
    )})
    run_until(real, lambda: real.snapshot().get("own", {}).get("state") == "finished", 40)
    assert result.read_text() == "[7, 8, 9, 10]"

"""The program state machine, with no server: the transition table, the
phases of a stop, the supervisor's inbox, and the state names on the wire.

The rest of the suite runs with ``HIMBEERE_STRICT_STATES=1`` (tests/__init__.py),
so every edge the supervisor takes there is checked against the table too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from himbeere import codedoc, programs
from himbeere.programs import (
    ABANDON_AFTER,
    TRANSITIONS,
    AfterStop,
    Program,
    Stop,
    StopPhase,
    Supervisor,
    TransitionError,
)
from himbeere.schema import ProgramState as S
from tests.test_supervisor import FakeForkServer

NODE = 1000
GOOD = "def main():\n    pass\n"
DASHBOARD_JS = Path(__file__).parent.parent / "uploader" / "dashboard" / "static" / "dashboard.js"

#: The names status documents, ended.json, the ops CLI and the dashboard
#: have always used: they must never change.
HISTORIC = {
    "STARTING": "starting", "FETCHING": "fetching", "RUNNING": "running",
    "BACKING_OFF": "backing-off", "STOPPING": "stopping", "STOPPED": "stopped",
    "FINISHED": "finished", "CRASHED": "crashed", "INVALID": "invalid",
    "REJECTED": "rejected",
}

#: Edges the supervisor takes, each with where (the table must keep them).
TAKEN = [
    (S.STARTING, S.RUNNING),         # a new document, started
    (S.STARTING, S.FINISHED),        # restored: it ended since boot (oneshot.py)
    (S.STARTING, S.CRASHED),         # restored, or its fork failed (restart: never)
    (S.STARTING, S.REJECTED),        # no free slot (max_programs)
    (S.FETCHING, S.FETCHING),        # restarted while its fetch is under way
    (S.FETCHING, S.INVALID),         # a git error that will not go away
    (S.RUNNING, S.STOPPING),         # asked to stop
    (S.RUNNING, S.BACKING_OFF),      # crashed, restarts later
    (S.RUNNING, S.INVALID),          # the child found its code cannot run
    (S.BACKING_OFF, S.RUNNING),      # the delay is over
    (S.BACKING_OFF, S.BACKING_OFF),  # ... and the fork failed again
    (S.STOPPING, S.RUNNING),         # gone; started with its new code
    (S.STOPPING, S.STOPPED),         # gone; stays stopped
    (S.STOPPING, S.FETCHING),        # gone; its new commit is fetched first
    (S.STOPPED, S.REJECTED),         # enabled, but no free slot
    (S.STOPPED, S.STOPPED),          # changed, still disabled
    (S.FINISHED, S.RUNNING),         # restarted by hand (reload)
    (S.CRASHED, S.CRASHED),          # its new code failed to fork (restart: never)
    (S.INVALID, S.RUNNING),          # its document was fixed
    (S.REJECTED, S.REJECTED),        # still no free slot
    (S.REJECTED, S.RUNNING),         # admitted
    # require_signed (signing.py): a document whose signature or release is
    # refused never runs, whatever state its program was in
    (S.STOPPING, S.REJECTED),        # gone; its new document is refused
    (S.FETCHING, S.REJECTED),        # the fetched commit is not the signed one
    (S.BACKING_OFF, S.REJECTED),     # a refused document arrived while it waited
]

#: Edges that would be bugs: the table must refuse them.
NEVER = [
    *[(state, S.STARTING) for state in S],  # only a new Program starts there
    (S.RUNNING, S.RUNNING),      # a second process for one program
    (S.RUNNING, S.STOPPED),      # its process is not gone
    (S.RUNNING, S.REJECTED),     # it holds its slot
    (S.RUNNING, S.FETCHING),
    (S.STOPPING, S.STOPPING),    # a stop does not begin twice (no second "quit")
    (S.STOPPING, S.FINISHED),    # a stopped program did not finish by itself
    (S.BACKING_OFF, S.STOPPING),  # no process to stop
    (S.STOPPED, S.STOPPING),
    (S.FINISHED, S.STOPPING),
    (S.STOPPED, S.FINISHED),     # only a process finishes
    (S.INVALID, S.FINISHED),
]


def make_program(state: S = S.STARTING) -> Program:
    doc = codedoc.parse({"_id": "a", "_rev": "1-x", "type": NODE, "code": GOOD}, "on-failure")
    program = Program(doc, "fingerprint")
    program.state = state
    return program


@pytest.fixture(autouse=True)
def strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(programs.STRICT_ENV, "1")


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(programs, "_kill_group",
                        lambda pid, sig, fallback=True: sent.append(sig))
    return sent


@pytest.fixture
def server() -> FakeForkServer:
    return FakeForkServer()


@pytest.fixture
def sup(server: FakeForkServer, kills: list[int]) -> Iterator[Supervisor]:
    supervisor = Supervisor(node=NODE, grace_period=2.0, kill_grace=3.0, fork_server=server)
    yield supervisor
    supervisor.close()


def code_doc(doc_id: str = "a", rev: int = 1) -> dict[str, object]:
    return {"_id": doc_id, "_rev": f"{rev}-x", "type": NODE, "code": GOOD}


# -- the names on the wire -----------------------------------------------------------------

def test_state_values_are_the_names_documents_always_had() -> None:
    assert {state.name: state.value for state in S} == HISTORIC
    assert [str(state) for state in S] == list(HISTORIC.values())


def test_the_status_document_gets_plain_strings() -> None:
    program = make_program()
    for state in S:
        program.state = state
        written = program.describe()["state"]
        assert type(written) is str and written == HISTORIC[state.name]
        assert json.dumps(written) == json.dumps(HISTORIC[state.name])


def test_the_dashboard_script_keeps_no_copy_of_the_state_names() -> None:
    """The page hands it ops.CRASHED_STATES (page config) instead."""
    script = DASHBOARD_JS.read_text(encoding="utf-8")
    assert "config.crashed_states" in script
    for name in ("backing-off", "invalid", "fetching", "rejected"):
        assert f'"{name}"' not in script


# -- the table -------------------------------------------------------------------------------

def test_every_state_has_a_row_and_none_leads_back_to_starting() -> None:
    assert set(TRANSITIONS) == set(S)
    assert all(S.STARTING not in targets for targets in TRANSITIONS.values())


@pytest.mark.parametrize("old, new", [(old, new) for old, targets in TRANSITIONS.items()
                                      for new in sorted(targets)])
def test_every_listed_transition_is_accepted(old: S, new: S) -> None:
    program = make_program(old)
    program.transition(new)
    assert program.state is new


def test_every_unlisted_transition_is_refused() -> None:
    refused = 0
    for old, new in itertools.product(S, S):
        if new in TRANSITIONS[old]:
            continue
        program = make_program(old)
        with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
            program.transition(new)
        assert program.state is old
        refused += 1
    assert refused >= len(NEVER)


def test_the_table_keeps_the_edges_taken_and_refuses_the_bugs() -> None:
    assert [edge for edge in TAKEN if edge[1] not in TRANSITIONS[edge[0]]] == []
    assert [edge for edge in NEVER if edge[1] in TRANSITIONS[edge[0]]] == []


def test_on_a_node_an_unlisted_transition_is_logged_and_taken(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A node does not stop all its programs over a bookkeeping bug."""
    monkeypatch.delenv(programs.STRICT_ENV)
    program = make_program(S.RUNNING)
    with caplog.at_level(logging.ERROR, logger="himbeere.programs"):
        program.transition(S.STOPPED)
    assert program.state is S.STOPPED
    assert "running -> stopped is not an allowed transition" in caplog.text


# -- the phases of a stop ------------------------------------------------------------------

def test_a_stop_goes_term_kill_abandon_on_one_deadline() -> None:
    stop = Stop(AfterStop.STAY, deadline=102.0, kill_grace=3.0)
    assert (stop.phase, stop.deadline) == (StopPhase.TERM, 102.0)
    stop.escalate(102.5)
    assert (stop.phase, stop.deadline) == (StopPhase.KILL, 105.5)
    stop.escalate(106.0)
    assert (stop.phase, stop.deadline) == (StopPhase.ABANDON, 106.0 + ABANDON_AFTER)
    with pytest.raises(ValueError, match="nothing follows ABANDON"):
        stop.escalate(200.0)
    times = [f.name for f in dataclasses.fields(Stop) if f.type in ("float", "Optional[float]")]
    assert times == ["deadline", "kill_grace", "hurry"]  # one deadline, two waits


def test_hurry_caps_the_grace_period_and_halves_the_wait_after_sigterm() -> None:
    stop = Stop(AfterStop.REMOVE, deadline=110.0, kill_grace=3.0)
    stop.hurry_up(100.0, 2.0)
    assert stop.deadline == 102.0
    stop.hurry_up(100.5, 5.0)  # a later hurry never pushes the deadline out
    assert stop.deadline == 102.0
    stop.escalate(102.0)
    assert (stop.phase, stop.deadline) == (StopPhase.KILL, 104.5)  # min(3.0, 5.0 / 2)


def test_hurry_after_sigterm_leaves_the_sigkill_where_it_is() -> None:
    stop = Stop(AfterStop.REMOVE, deadline=102.0, kill_grace=3.0)
    stop.escalate(102.0)
    stop.hurry_up(103.0, 0.5)
    assert (stop.phase, stop.deadline) == (StopPhase.KILL, 105.0)


def test_the_supervisor_escalates_at_the_one_deadline(
        sup: Supervisor, server: FakeForkServer, kills: list[int]) -> None:
    sup.submit(code_doc())
    sup.loop(0)
    program = sup.programs["a"]
    assert program.state is S.RUNNING and program.stopping is None
    sup.submit({"_id": "a", "_deleted": True})
    sup.loop(0)
    stop = program.stopping
    assert program.state is S.STOPPING and stop is not None
    assert (stop.phase, stop.then) == (StopPhase.TERM, AfterStop.REMOVE)
    assert server.children[0].received() == ["quit"]
    for phase, sig in ((StopPhase.KILL, signal.SIGTERM), (StopPhase.ABANDON, signal.SIGKILL)):
        assert sup._next_deadline() == stop.deadline
        sent = len(kills)
        sup.loop(0, now=stop.deadline - 0.01)
        assert len(kills) == sent
        sup.loop(0, now=stop.deadline)
        assert stop.phase is phase and kills[-1] == sig
    sup.loop(0, now=stop.deadline)  # survives SIGKILL: given up on, and removed
    assert "a" not in sup.programs and program.stopping is None
    assert kills == [signal.SIGTERM, signal.SIGKILL]


def test_a_document_arriving_while_stopping_is_what_starts_next(
        sup: Supervisor, server: FakeForkServer) -> None:
    sup.submit(code_doc())
    sup.loop(0)
    sup.submit({"_id": "a", "_deleted": True})
    sup.submit(dict(code_doc(rev=3), code=GOOD + "# v3\n"))
    sup.loop(0)
    program = sup.programs["a"]
    assert program.stopping is not None and program.stopping.then is AfterStop.START
    server.children[0].exit(0, ("finished", None))
    sup.loop(0)
    assert program.state is S.RUNNING and program.stopping is None
    assert "# v3" in server.children[-1].spec.modules["main"]


# -- the inbox -------------------------------------------------------------------------------

def test_an_operation_the_supervisor_lacks_fails_where_it_is_asked(sup: Supervisor) -> None:
    """Regression: request("restart_al") was queued, then silently dropped."""
    with pytest.raises(AttributeError):
        sup.restart_al()  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        sup.request("restart_all")  # type: ignore[attr-defined]
    assert sup._inbox.empty()


def test_queued_calls_run_on_the_loop_thread_in_order(
        sup: Supervisor, server: FakeForkServer) -> None:
    sup.submit(code_doc())
    sup.restart_all()
    assert sup.programs == {} and server.children == []  # nothing until loop()
    sup.loop(0)
    # submitted first, so restart_all found it running and stopped it to start again
    program = sup.programs["a"]
    assert program.state is S.STOPPING and program.stopping is not None
    assert program.stopping.then is AfterStop.START


def test_a_queued_call_that_fails_is_logged_and_the_next_still_runs(
        sup: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    sup._queue(broken)
    sup.assign(frozenset({"placed:x"}), None)
    with caplog.at_level(logging.ERROR, logger="himbeere.programs"):
        sup.loop(0)
    assert "could not handle broken" in caplog.text
    assert sup.assigned == {"placed:x"}


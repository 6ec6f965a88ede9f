"""Supervising programs: one child process per code document.

Children are forked by :class:`~himbeere.forkserver.ForkServer`, a
single-threaded process with himbeere already imported, so a program starts
in a few milliseconds and the threaded daemon never forks.  Each child
becomes its own process group leader, so stopping a program reaches
everything it started, and whatever it started ends when it ends.

The :class:`Supervisor` is driven by :meth:`Supervisor.loop`, one iteration
at a time (huey's pattern); only the thread calling ``loop`` touches the
programs.  Other threads hand it documents with :meth:`Supervisor.submit`.

A program's state (:class:`~himbeere.schema.ProgramState`) changes only in
:meth:`Program.transition`, along the edges listed in :data:`TRANSITIONS`
(the model: supervisor's ``states.py`` and ``Subprocess.transition``).

What happens to a program also goes into its own log, between the lines
it printed (see :mod:`himbeere.logship`): "started (pid 4242)", a crash's
traceback, "crashed; restart 3 in 8 s", "stopped", "changed (rev 3-ab12),
restarting" and the like, written by :meth:`Supervisor._event`, so that
``himbeere logs`` and the dashboard show why a program went away, not only
what it printed before.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import multiprocessing.connection
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from . import codedoc, defaults, gitsource, oneshot, signing
from .codedoc import CodeDoc
from .exceptions import HimbeereError
from .forkserver import ForkServer
from .logship import ERROR, EVENT
from .logtext import printable
from .runtime import child
from .schema import ProgramState, iso, targets_labels, targets_text

log = logging.getLogger(__name__)

#: Seconds to wait for a SIGKILLed child before giving up on it.
ABANDON_AFTER = 5.0
#: Seconds to wait at startup for the SIGKILLed programs of a previous daemon.
ORPHAN_WAIT = 5.0
#: Set to 1 (the test suite does) to raise :class:`TransitionError` on a
#: transition TRANSITIONS does not list; otherwise it is logged as an error.
STRICT_ENV = "HIMBEERE_STRICT_STATES"

_S = ProgramState
#: What starting a program that has no process can lead to: it is fetched
#: first (git), runs, fails to fork (BACKING_OFF, or CRASHED for ``restart:
#: never``), has an error in its document (INVALID), or stays STOPPED
#: (disabled, or the node is going down), or is REJECTED: its signature or
#: release is refused (require_signed, see signing.py).
_START = frozenset({_S.FETCHING, _S.RUNNING, _S.BACKING_OFF, _S.CRASHED, _S.INVALID,
                    _S.STOPPED, _S.REJECTED})
#: The only edges a program's state may take; every other one is a bug.
#: A program without a process may be stopped (STOPPED) or (re)started at
#: any time; only a RUNNING one has a process to stop or to end by itself.
TRANSITIONS: dict[ProgramState, frozenset[ProgramState]] = {
    # a new document: started, or restored as it ended since boot (oneshot.py);
    # REJECTED: no free slot (max_programs)
    _S.STARTING: _START | {_S.REJECTED, _S.FINISHED},
    # fetched: the start goes on; a git error: INVALID, BACKING_OFF or CRASHED;
    # FETCHING -> FETCHING: started again while its fetch is under way
    _S.FETCHING: _START,
    # asked to stop; or it ended: FINISHED, CRASHED, BACKING_OFF (restarts), INVALID
    _S.RUNNING: frozenset({_S.STOPPING, _S.FINISHED, _S.CRASHED, _S.BACKING_OFF,
                           _S.INVALID}),
    # the delay is over: started again
    _S.BACKING_OFF: _START,
    # it ended (or was given up on): started with its new code, or STOPPED;
    # a stop that removes it leaves no state at all
    _S.STOPPING: _START,
    # enabled, changed, restarted by hand, or admitted; REJECTED: no free slot
    _S.STOPPED: _START | {_S.REJECTED},
    _S.FINISHED: _START | {_S.REJECTED},
    _S.CRASHED: _START | {_S.REJECTED},
    _S.INVALID: _START | {_S.REJECTED},
    _S.REJECTED: _START | {_S.REJECTED},
}
#: States in which a program holds one of the node's ``max_programs`` slots:
#: it has a process, or will have one without anybody asking.
HOLDS_SLOT = frozenset({_S.STARTING, _S.FETCHING, _S.RUNNING, _S.BACKING_OFF, _S.STOPPING})
#: States from which a start must find a free slot first.  A new program
#: (STARTING) holds one in the count of the others, yet must find one itself.
NEEDS_SLOT = frozenset({_S.STARTING, _S.STOPPED, _S.FINISHED, _S.CRASHED, _S.INVALID,
                        _S.REJECTED})


class TransitionError(HimbeereError, RuntimeError):
    """A program's state was to take an edge that TRANSITIONS does not list."""


class AfterStop(enum.Enum):
    """What becomes of a program once its process is gone."""

    START = "start"    #: it starts again, with the document the stop carries
    REMOVE = "remove"  #: it is forgotten: deleted, or no longer this node's
    STAY = "stay"      #: it stays, STOPPED (the node is going down)


class StopPhase(enum.Enum):
    """What a stop does at its deadline; the phases follow in this order."""

    TERM = "term"        #: "quit" went to the program: SIGTERM at the deadline
    KILL = "kill"        #: SIGTERM went to its group: SIGKILL at the deadline
    ABANDON = "abandon"  #: SIGKILL went to its group: given up on at the deadline


@dataclasses.dataclass
class Stop:
    """Where the stop of one program has got to: a phase and one deadline.

    The deadline (``time.monotonic()``) of TERM is the grace period after
    "quit", of KILL ``kill_grace`` after SIGTERM, of ABANDON
    :data:`ABANDON_AFTER` after SIGKILL.  A ``hurry`` (seconds; a fenced
    placed program must be gone fast) caps the grace period at ``hurry`` and
    the wait after SIGTERM at half of it.
    """

    then: AfterStop
    deadline: float
    kill_grace: float
    #: The document to run once it is gone (``then`` START).
    doc: Optional[CodeDoc] = None
    hurry: Optional[float] = None
    phase: StopPhase = StopPhase.TERM

    def hurry_up(self, now: float, hurry: float) -> None:
        """From now on stop within ``hurry`` seconds (a SIGKILL due keeps its time)."""
        self.hurry = hurry
        if self.phase is StopPhase.TERM:
            self.deadline = min(self.deadline, now + hurry)

    def escalate(self, now: float) -> None:
        """The deadline's step was taken at ``now``: on to the next phase."""
        if self.phase is StopPhase.TERM:
            wait = self.kill_grace if self.hurry is None else min(self.kill_grace, self.hurry / 2)
            self.phase, self.deadline = StopPhase.KILL, now + wait
        elif self.phase is StopPhase.KILL:
            self.phase, self.deadline = StopPhase.ABANDON, now + ABANDON_AFTER
        else:
            raise ValueError("nothing follows ABANDON: the stop is over")


class Program:
    """One code document and the child process running it."""

    def __init__(self, doc: CodeDoc, fingerprint: str) -> None:
        self.doc = doc
        self.fingerprint = fingerprint
        self.state = ProgramState.STARTING
        self.conn: Any = None
        self.eof = False
        #: For git programs: (fingerprint, (checkout path, commit)) once fetched.
        self.fetched: Optional[tuple[str, tuple[str, str]]] = None
        self.fetching: Optional[str] = None
        self.pid: Optional[int] = None
        #: The kernel's start time of ``pid`` (see :func:`_start_time`), read once.
        self.pid_start: Optional[str] = None
        self.started: Optional[float] = None
        self.started_mono: Optional[float] = None
        self.restarts = 0
        self.last_error: Optional[str] = doc.error
        self.exit_code: Optional[int] = None
        self.next_start: Optional[float] = None
        self.backoff = 0.0
        #: While STOPPING (and only then): how far its stop has got.
        self.stopping: Optional[Stop] = None
        self.outcome: Optional[tuple[str, Optional[str]]] = None
        #: A ``restart: never`` program that ended: when it runs again, and
        #: when it ended (maybe under an earlier daemon, see oneshot.py).
        self.runs_again: Optional[str] = None
        self.ended: Optional[str] = None
        #: While ``rejected``: its place in the queue for a free slot.
        self.queued: Optional[int] = None

    @property
    def name(self) -> str:
        """The program's name as it goes into a log line (escaped)."""
        return printable(self.doc.name)

    @property
    def checkout(self) -> Optional[tuple[str, str]]:
        return self.fetched[1] if self.fetched else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def transition(self, new: ProgramState) -> None:
        """Change the state to ``new``, along an edge TRANSITIONS lists.

        Any other edge is a bug in himbeere.  Under the test suite
        (``HIMBEERE_STRICT_STATES=1``) it raises :class:`TransitionError`.
        On a node it is logged as an error and the state changes anyway: the
        callers have already forgotten the process or sent the signal, so
        refusing would leave the bookkeeping half done, and an exception here
        would end the daemon's loop and every program of the node with it.
        """
        if new not in TRANSITIONS[self.state]:
            message = (f"{self.name}: {self.state.value} -> {new.value} is not an allowed "
                       "transition (programs.TRANSITIONS)")
            if os.environ.get(STRICT_ENV) == "1":
                raise TransitionError(message)
            log.error("%s; going on, please report this bug", message, stack_info=True)
        self.state = new

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.doc.name,
            "rev": self.doc.rev,
            "state": self.state.value,
            "pid": self.pid,
            "started": _iso(self.started),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "exit_code": self.exit_code,
            "restart": self.doc.restart,
            "runs_again": self.runs_again,
            "ended": self.ended,
            "enabled": self.doc.enabled,
            "placed": self.doc.placed,
            "release": self.doc.release,
            "rollout": self.doc.rollout_why,
            "targets": self.doc.targets,
            "git": self.doc.git.describe() if self.doc.git else None,
            "commit": self.checkout[1] if self.doc.git and self.checkout else None,
            "next_start": _iso(time.time() + self.next_start - time.monotonic())
            if self.state is ProgramState.BACKING_OFF and self.next_start is not None else None,
        }


def _iso(when: Optional[float]) -> Optional[str]:
    if when is None:
        return None
    return iso(when)


class Supervisor:
    """Starts, restarts and stops the programs of one node."""

    def __init__(
        self,
        node: int,
        couch_url: Optional[str] = None,
        database: Optional[str] = None,
        grace_period: float = defaults.GRACE_PERIOD,
        kill_grace: float = defaults.KILL_GRACE,
        default_restart: str = defaults.RESTART_POLICY,
        state_dir: Optional[Path] = None,
        on_change: Optional[Callable[[], None]] = None,
        fork_server: Optional[ForkServer] = None,
        on_log: Optional[Callable[[str, str, list[Any], int], None]] = None,
        status_database: Optional[str] = None,
        fence: Optional[float] = None,
        max_programs: int = defaults.MAX_PROGRAMS,
    ) -> None:
        #: Called with (doc id, name, [(time, line)], dropped) for program output.
        self.on_log = on_log or (lambda doc_id, name, lines, dropped: None)
        self.fork_server = fork_server or ForkServer()
        self.node = node
        self.couch_url = couch_url
        self.database = database
        #: Where programs keep ``state`` and leases (None: ``<database>_status``).
        self.status_database = status_database
        self.grace_period = grace_period
        self.kill_grace = kill_grace
        self.default_restart = default_restart
        self.state_dir = state_dir
        self.on_change = on_change or (lambda: None)
        self.programs: dict[str, Program] = {}
        self.ended = oneshot.EndedPrograms(state_dir) if state_dir is not None else None
        #: Placed programs (see placement.py): every placed document from the
        #: feed, the ones assigned to this node, and the children's fence:
        #: seconds a placed child lives on without an "alive" from us.
        self.placed_docs: dict[str, dict[str, Any]] = {}
        self.assigned: set[str] = set()
        self.fence = fence
        #: Programs for many nodes (targeting.py): every such document from
        #: the feed, and this node's labels (None: not read yet).
        self.targeted_docs: dict[str, dict[str, Any]] = {}
        self.labels: Optional[dict[str, str]] = None
        #: At most this many programs hold a process; more are ``rejected``
        #: and start, first come first served, once one of those ends.
        self.max_programs = max_programs
        self._queue_counter = 0
        self._next_ping: Optional[float] = None
        #: Set by stop_all(): the node is going down, nothing starts any more.
        self.closing = False
        #: doc id -> global modules it exports
        self.providers: dict[str, dict[str, str]] = {}
        self.global_sources: dict[str, str] = {}
        #: With ``require_signed``: what this node accepts (signing.py); else None.
        self.signatures: Optional[signing.Policy] = None
        #: Documents whose signature passed, as they came (checked again at a
        #: reload, when a key may have been revoked), and the refused ones' reasons.
        self.accepted: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, str] = {}
        #: Bound calls the loop thread makes for the other threads (see _queue).
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # -- talking to the supervisor thread --------------------------------
    # Other threads call these; each queues a bound method that the loop
    # thread calls next.  An operation that does not exist is an
    # AttributeError where it is asked for, never a message nobody handles.
    def submit(self, doc: Mapping[str, Any]) -> None:
        """Hand over a code document (or a deletion) from any thread."""
        self._queue(self._apply_or_fail, dict(doc))

    def assign(self, assigned: frozenset[str], hurry: Optional[float]) -> None:
        """Run the placed programs in ``assigned``, and only those (placement.py).

        ``hurry``: seconds within which the ones no longer assigned must stop.
        """
        self._queue(self._assign, frozenset(assigned), hurry)

    def relabel(self, labels: Mapping[str, str]) -> None:
        """This node's labels are now ``labels``: start and stop programs for many nodes."""
        self._queue(self._relabel, dict(labels))

    def restart_all(self) -> None:
        """Restart every program (a reload); one already stopping is left as it is."""
        self._queue(self._restart_all)

    def _queue(self, method: Callable[..., None], *args: Any) -> None:
        self._inbox.put(functools.partial(method, *args))
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- one iteration -----------------------------------------------------
    def loop(self, timeout: float = 1.0, now: Optional[float] = None) -> None:
        """Handle what arrived, reap children, enforce deadlines, then wait."""
        self._drain_inbox()
        now = time.monotonic() if now is None else now
        self._tick(now)
        self._ping(now)
        deadline = self._next_deadline()
        wait = timeout if deadline is None else max(0.0, min(timeout, deadline - now))
        waitables: list[Any] = [self._wake_r]
        if self.fork_server.running:
            waitables.append(self.fork_server.conn)
        for program in self.programs.values():
            if program.alive and program.conn is not None and not program.eof:
                waitables.append(program.conn)
        ready = multiprocessing.connection.wait(waitables, wait)
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        self._reap()
        self._admit()

    def _drain_inbox(self) -> None:
        while True:
            try:
                call = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                call()
            except Exception:
                name = getattr(getattr(call, "func", call), "__name__", call)
                log.exception("could not handle %s", name)

    def _apply_or_fail(self, doc: dict[str, Any]) -> None:
        try:
            self._apply(doc)
        except Exception as exc:
            self._failed(doc, exc)

    def _failed(self, doc: dict[str, Any], exc: Exception) -> None:
        """Handling ``doc`` raised: show it ``invalid`` with the error, go on."""
        doc_id = str(doc.get("_id"))
        error = f"the node could not handle this document: {type(exc).__name__}: {exc}"
        log.error("could not handle document %s: %s", printable(doc_id), printable(error),
                  exc_info=exc)
        try:
            if self._mine(doc) and not doc.get("_deleted"):
                self._deploy(codedoc.failed(doc, error, self.default_restart))
        except Exception:
            log.exception("%s: could not record that it failed", printable(doc_id))

    def _next_deadline(self) -> Optional[float]:
        times = []
        for program in self.programs.values():
            if program.next_start is not None:
                times.append(program.next_start)
            if program.stopping is not None:
                times.append(program.stopping.deadline)
        if self._next_ping is not None:
            times.append(self._next_ping)
        return min(times) if times else None

    # -- documents ---------------------------------------------------------
    def _apply(self, doc: dict[str, Any]) -> None:
        doc_id = str(doc.get("_id"))
        for kind, docs in ((codedoc.is_placed, self.placed_docs),
                           (codedoc.is_targeted, self.targeted_docs)):
            if kind(doc):
                docs[doc_id] = doc
            else:
                docs.pop(doc_id, None)
        if doc.get("_deleted"):
            self.accepted.pop(doc_id, None)
            self.refused.pop(doc_id, None)
            if self.providers.pop(doc_id, None) is not None:
                self._globals_changed()
            program = self.programs.get(doc_id)
            if program is not None:
                log.info("%s: document deleted, stopping", program.name)
                self._event(program, "document deleted, stopping")
                self._stop(program, AfterStop.REMOVE)
            return
        parsed = self._checked(doc)
        if parsed.global_modules or doc_id in self.providers:
            if parsed.global_modules != self.providers.get(doc_id, {}):
                if parsed.global_modules:
                    self.providers[doc_id] = parsed.global_modules
                else:
                    self.providers.pop(doc_id, None)
                self._globals_changed()
        mine = self._mine(doc)
        if not mine and parsed.error and doc.get("global_modules") \
                and not parsed.global_modules:
            # No status entry shows it (it is not this node's program), yet
            # this node's programs may need the modules: say so in the log.
            log.error("%s: its global_modules are not used: %s", printable(doc_id),
                      printable(parsed.error, multiline=True))
        program = self.programs.get(doc_id)
        if mine and program is None and parsed.targets is not None and parsed.is_program:
            self._targets_match(doc_id, parsed.name, parsed.targets)
        if not mine or not parsed.is_program:
            if program is not None:
                log.info("%s: no longer a program of this node, stopping", program.name)
                self._event(program, "no longer a program of this node, stopping")
                self._stop(program, AfterStop.REMOVE)
            elif not mine:
                log.debug("ignoring %s: for node %r, not %s", printable(doc_id), doc.get("type"),
                          self.node)
            return
        self._deploy(parsed)

    def _checked(self, doc: dict[str, Any]) -> CodeDoc:
        """``doc`` parsed; with ``require_signed``, refused without a valid signature."""
        doc_id = str(doc.get("_id"))
        self.accepted.pop(doc_id, None)
        self.refused.pop(doc_id, None)
        refusal = self.signatures.refusal(doc) if self.signatures is not None else None
        if refusal is None:
            if self.signatures is not None:
                self.accepted[doc_id] = doc
                if "global_modules" in doc:
                    self.signatures.ran(doc)  # its modules are in use from now on
            return codedoc.parse(doc, self.default_restart)
        self.refused[doc_id] = f"refused: {refusal}"
        # No modules, not even global ones: nothing of it may run anywhere.
        return codedoc.failed(doc, self.refused[doc_id], self.default_restart)

    def check_signatures(self) -> None:
        """Check the accepted documents again (a reload may have revoked a key)."""
        if self.signatures is None:
            return
        for doc in list(self.accepted.values()):
            if self.signatures.refusal(doc) is not None:
                self._apply(doc)
    def _mine(self, doc: dict[str, Any]) -> bool:
        """True if this node runs ``doc``: its own, placed here, or targeting its labels."""
        return codedoc.matches_node(doc, self.node) or (
            codedoc.is_placed(doc) and str(doc.get("_id")) in self.assigned) or (
            codedoc.is_targeted(doc)
            and targets_labels(doc.get("targets"), self.node, self.labels))

    def _relabel(self, labels: dict[str, str]) -> None:
        """Start the programs for many nodes the new labels match, stop the others."""
        before, self.labels = self.labels, labels
        for doc_id, doc in sorted(self.targeted_docs.items()):
            targets = doc.get("targets")
            if targets_labels(targets, self.node, before) == self._mine(doc):
                continue
            program = self.programs.get(doc_id)
            if self._mine(doc):
                self._apply(doc)
            elif program is not None:
                have = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
                why = (f"labels no longer match targets {targets_text(targets)} "
                       f"(this node has: {have}), stopping")
                log.info("%s: %s", program.name, why)
                self._event(program, why)
                self._stop(program, AfterStop.REMOVE)

    def _deploy(self, parsed: CodeDoc) -> None:
        fingerprint = parsed.fingerprint(self.global_sources)
        program = self.programs.get(parsed.doc_id)
        if program is None:
            program = Program(parsed, fingerprint)
            self.programs[parsed.doc_id] = program
            if not self._ended_in_this_boot(program):
                self._start_or_rest(program)
            return
        if program.state is ProgramState.STOPPING:
            self._stop(program, AfterStop.START, parsed)  # starts with this once gone
            return
        changed = fingerprint != program.fingerprint or parsed.enabled != program.doc.enabled
        if not changed:
            program.doc = parsed  # same code under a new revision
            self.on_change()
            return
        what = "changed" if parsed.enabled == program.doc.enabled else (
            "enabled" if parsed.enabled else "disabled")
        if program.alive:
            then = "restarting" if parsed.enabled else "stopping"
            log.info("%s: %s (rev %s), %s", printable(parsed.name), what,
                     printable(parsed.rev), then)
            self._event(program, f"{what} (rev {parsed.rev}), {then}")
            self._stop(program, AfterStop.START, parsed)
        else:
            self._event(program, f"{what} (rev {parsed.rev})")
            program.doc, program.fingerprint = parsed, fingerprint
            program.restarts, program.backoff = 0, 0.0
            program.last_error = parsed.error  # the old error was about the old code
            self._start_or_rest(program)

    def _globals_changed(self) -> None:
        merged: dict[str, str] = {}
        for doc_id in sorted(self.providers):
            for name, source in self.providers[doc_id].items():
                if name in merged and merged[name] != source:
                    log.warning("global module %s is defined twice; %s wins", name,
                                printable(doc_id))
                merged[name] = source
        self.global_sources = merged
        for program in list(self.programs.values()):
            if program.state is ProgramState.STOPPING:
                continue
            fingerprint = program.doc.fingerprint(merged)
            if program.runs_again and not program.alive:
                program.fingerprint = fingerprint  # its own code must change (oneshot.py)
                continue
            if fingerprint != program.fingerprint:
                log.info("%s: a global module it uses changed, restarting", program.name)
                self._event(program, "a global module it uses changed, restarting")
                self._deploy_fingerprint(program, fingerprint)

    def _deploy_fingerprint(self, program: Program, fingerprint: str) -> None:
        if program.alive:
            self._stop(program, AfterStop.START, program.doc)
        else:
            program.fingerprint = fingerprint
            self._start_or_rest(program)

    def _restart_all(self) -> None:
        self.check_signatures()
        for program in list(self.programs.values()):
            if program.state is ProgramState.STOPPING:
                continue  # it starts again, or goes away, as already decided
            if program.alive:
                self._event(program, "restarting (the daemon reloads)")
                self._stop(program, AfterStop.START, program.doc)
            elif program.doc.enabled and not program.doc.error and not program.runs_again:
                self._start(program)

    def _assign(self, assigned: frozenset[str], hurry: Optional[float]) -> None:
        before, self.assigned = self.assigned, set(assigned)
        for doc_id in sorted(before - self.assigned):
            program = self.programs.get(doc_id)
            if program is not None and program.doc.placed:
                log.info("%s: no longer placed on this node, stopping", program.name)
                self._event(program, "no longer placed on this node, stopping")
                self._stop(program, AfterStop.REMOVE, hurry=hurry)
        for doc_id in sorted(self.assigned - before):
            doc = self.placed_docs.get(doc_id)
            if doc is not None:  # else the feed brings it later
                log.info("%s: placed on this node", printable(doc.get("name") or doc_id))
                self._apply(doc)

    # -- starting ------------------------------------------------------------
    def _start_or_rest(self, program: Program) -> None:
        program.next_start = None  # a backoff restart of older code is void
        if program.doc.doc_id in self.refused:
            self._refuse(program, self.refused[program.doc.doc_id])
        elif program.doc.error:
            # Deployed as it is: the same code as before the error starts again.
            program.fingerprint = program.doc.fingerprint(self.global_sources)
            self._set(program, ProgramState.INVALID, error=program.doc.error)
            log.error("%s: %s", program.name, printable(program.doc.error, multiline=True))
            self._invalid_event(program, program.doc.error)
        elif not program.doc.enabled:
            self._set(program, ProgramState.STOPPED, error=None)
        else:
            self._start(program)

    def _start(self, program: Program) -> None:
        program.next_start = None
        if self.closing:
            self._set(program, ProgramState.STOPPED)
            return
        # One that already holds a slot keeps it (a restart); a new one
        # ("starting") or one that had ended must find a free one.
        if program.state in NEEDS_SLOT and not self._slot_free(program):
            self._reject(program)
            return
        program.queued = None
        doc = program.doc
        path, entry, main_module = None, "main", codedoc.MAIN
        if doc.git is not None:
            fingerprint = doc.fingerprint(self.global_sources)
            if program.fetched is None or program.fetched[0] != fingerprint:
                self._fetch(program, fingerprint)
                return
            path = program.fetched[1][0]
            entry, main_module = doc.git.function, doc.git.module
        # Every global module goes along: the fingerprint follows only the
        # ones found in import statements, but importlib.import_module()
        # and __import__() must find the others too.
        spec = child.ProgramSpec(
            name=doc.name, doc_id=doc.doc_id, rev=doc.rev, modules=doc.modules,
            main_module=main_module, global_modules=dict(self.global_sources),
            node=self.node, couch_url=self.couch_url, database=self.database,
            path=path, entry=entry, status_database=self.status_database,
            fence=self.fence if doc.placed else None,
        )
        # What runs now decides the next restart, whatever changed meanwhile.
        program.fingerprint = doc.fingerprint(self.global_sources)
        if self.signatures is not None and doc.doc_id in self.accepted:
            self.signatures.ran(self.accepted[doc.doc_id])  # the downgrade rule's floor
        # Taken before the fork: the child's first line must come after "started".
        spawned = time.time()
        try:
            pid, conn = self.fork_server.spawn(spec)
        except Exception as exc:
            log.exception("%s: could not start", program.name)
            self._crashed(program, f"could not start: {exc}", time.monotonic())
            return
        program.pid, program.conn, program.eof = pid, conn, False
        program.pid_start = _start_time(pid)
        # Recorded first: a daemon killed from here on leaves nothing that
        # the next one cannot find and kill.
        self._record_pids()
        program.started = time.time()
        program.started_mono = time.monotonic()
        program.outcome = None
        program.exit_code = None
        self._set(program, ProgramState.RUNNING, error=program.last_error)
        log.info("%s: started (pid %s, rev %s)", program.name, pid, printable(doc.rev))
        self._event(program, f"started (pid {pid})", when=spawned)

    def _refuse(self, program: Program, why: str) -> None:
        """``program`` must not run (require_signed): REJECTED, and its log says why."""
        program.fingerprint = program.doc.fingerprint(self.global_sources)
        self._set(program, ProgramState.REJECTED, error=why)
        log.error("%s: %s", program.name, printable(why))
        self._event(program, why, ERROR)

    def _slot_free(self, program: Program) -> bool:
        taken = sum(1 for other in self.programs.values()
                    if other is not program and other.state in HOLDS_SLOT)
        return taken < self.max_programs

    def _reject(self, program: Program) -> None:
        if program.queued is None:
            self._queue_counter += 1
            program.queued = self._queue_counter
            log.warning("%s: not started: this node runs its ceiling of %d programs "
                        "(max_programs)", program.name, self.max_programs)
            self._event(program, f"not started: this node runs its ceiling of "
                                 f"{self.max_programs} programs (max_programs)")
        self._set(program, ProgramState.REJECTED,
                  error=f"not started: this node runs its ceiling of {self.max_programs} "
                        "programs (max_programs); it starts when one of them ends")

    def _admit(self) -> None:
        """Start rejected programs, first come first served, while slots are free."""
        waiting = [p for p in self.programs.values() if p.state is ProgramState.REJECTED
                   and p.doc.doc_id not in self.refused]
        if not waiting or self.closing:
            return
        waiting.sort(key=lambda p: p.queued or 0)
        free = self.max_programs - sum(1 for p in self.programs.values()
                                       if p.state in HOLDS_SLOT)
        for program in waiting[:max(0, free)]:
            log.info("%s: a slot is free, starting", program.name)
            self._start(program)

    def _fetch(self, program: Program, fingerprint: str) -> None:
        """Fetch a git program in a thread; :meth:`_fetched` starts it after."""
        if program.fetching == fingerprint:
            self._set(program, ProgramState.FETCHING)  # the fetch under way will start it
            return
        program.fetching = fingerprint
        doc = program.doc
        assert doc.git is not None
        root = gitsource.checkout_root(self.state_dir or Path("."), doc.doc_id)
        self._set(program, ProgramState.FETCHING)
        log.info("%s: fetching %s", program.name, printable(doc.git.describe()))
        self._event(program, f"fetching {doc.git.describe()}")

        def work() -> None:
            try:
                path, commit = gitsource.fetch(doc.git, root)  # type: ignore[arg-type]
                result: Any = (str(path), commit)
            except gitsource.GitError as exc:
                result = exc
            except Exception as exc:  # noqa: BLE001 - reported in the status
                result = gitsource.GitError(f"git: {exc}")
            self._queue(self._fetched, doc.doc_id, fingerprint, result)

        threading.Thread(target=work, name=f"git-{doc.name}", daemon=True).start()

    def _fetched(self, doc_id: str, fingerprint: str, result: Any) -> None:
        program = self.programs.get(doc_id)
        if program is None or program.fetching != fingerprint:
            return  # deleted or changed again meanwhile
        program.fetching = None
        if program.state is not ProgramState.FETCHING:
            return  # stopped or disabled while fetching
        if isinstance(result, gitsource.GitError):
            if result.transient:
                self._crashed(program, str(result), time.monotonic())
            else:
                log.error("%s: %s", program.name, printable(result, multiline=True))
                self._set(program, ProgramState.INVALID, error=str(result))
                self._invalid_event(program, str(result))
            return
        pinned = signing.pinned_commit((self.accepted.get(doc_id) or {}).get("git"))
        if self.signatures is not None and pinned != result[1]:
            self.refused[doc_id] = (f"refused: fetched commit {result[1][:12]} is not the "
                                    f"signed commit {str(pinned)[:12]} (did the ref move?)")
            self._refuse(program, self.refused[doc_id])
            return
        program.fetched = (fingerprint, result)
        log.info("%s: fetched commit %s", program.name, result[1][:12])
        self._start(program)

    # -- stopping --------------------------------------------------------------
    def _stop(self, program: Program, then: AfterStop, doc: Optional[CodeDoc] = None,
              hurry: Optional[float] = None) -> None:
        """Ask ``program`` to quit; ``then`` it starts ``doc``, goes, or stays.

        Stopping one already stopping changes only what follows (and the
        deadline, if ``hurry``).  ``hurry`` shortens the grace period and the
        wait after SIGTERM (a fenced placed program, see :class:`Stop`).
        """
        program.next_start = None
        if not program.alive:
            self._after_stop(program, then, doc)
            return
        now = time.monotonic()
        stop = program.stopping
        if stop is not None:
            stop.then, stop.doc = then, doc
            if hurry is not None:
                stop.hurry_up(now, hurry)
            return
        try:
            program.conn.send("quit")
        except (OSError, ValueError):
            pass
        grace = self.grace_period if hurry is None else min(self.grace_period, hurry)
        program.stopping = Stop(then, now + grace, self.kill_grace, doc, hurry)
        self._set(program, ProgramState.STOPPING)

    def stop_all(self, force: bool = False) -> None:
        """Stop every program for good; ``force`` skips the grace period.

        On the loop thread (the daemon's shutdown), which then loops until
        :meth:`busy` is False.
        """
        self.closing = True
        for program in list(self.programs.values()):
            self._stop(program, AfterStop.STAY)
            # A SIGTERM already sent: leave the SIGKILL that follows it alone.
            stop = program.stopping
            if force and stop is not None and stop.phase is StopPhase.TERM:
                stop.deadline = time.monotonic()

    def busy(self) -> bool:
        """True while any program is still alive."""
        return any(program.alive for program in self.programs.values())

    def _tick(self, now: float) -> None:
        for program in list(self.programs.values()):
            if program.next_start is not None and now >= program.next_start:
                program.next_start = None
                self._start(program)
            if program.stopping is not None and program.alive:
                self._escalate(program, program.stopping, now)

    def _escalate(self, program: Program, stop: Stop, now: float) -> None:
        """Take the step of each phase whose deadline has passed, in order.

        One after the other in the same call, so a wait of 0 costs no loop.
        """
        if stop.phase is StopPhase.TERM and now >= stop.deadline:
            log.warning("%s: did not quit within the grace period; SIGTERM", program.name)
            self._event(program, "did not quit within the grace period; SIGTERM")
            _kill_group(program.pid, signal.SIGTERM)
            stop.escalate(now)
        if stop.phase is StopPhase.KILL and now >= stop.deadline:
            log.warning("%s: still alive after SIGTERM; SIGKILL", program.name)
            self._event(program, "still alive after SIGTERM; SIGKILL")
            _kill_group(program.pid, signal.SIGKILL)
            stop.escalate(now)
        if stop.phase is StopPhase.ABANDON and now >= stop.deadline:
            log.error("%s: pid %s survives SIGKILL; giving up on it", program.name,
                      program.pid)
            program.last_error = f"pid {program.pid} did not die after SIGKILL"
            self._event(program, f"pid {program.pid} survives SIGKILL; given up on", ERROR)
            self._forget(program)
            self._after_stop(program, stop.then, stop.doc)

    def _ping(self, now: float) -> None:
        """Tell placed children we are alive: a frozen daemon's children stop.

        Only when the socket has room: a child that stopped reading (SIGSTOP)
        must not block this loop.
        """
        if self.fence is None or (self._next_ping is not None and now < self._next_ping):
            return
        placed = [p for p in self.programs.values() if p.doc.placed and p.alive
                  and p.conn is not None and not p.eof and p.state is not ProgramState.STOPPING]
        self._next_ping = now + self.fence / 6 if placed else None
        for program in placed:
            try:
                poller = select.poll()  # not select(): safe for fd >= 1024
                poller.register(program.conn.fileno(), select.POLLOUT)
                if poller.poll(0):
                    program.conn.send("alive")
            except (OSError, ValueError):
                pass

    def _after_stop(self, program: Program, then: AfterStop, doc: Optional[CodeDoc]) -> None:
        """The process is gone: start ``doc``, forget the program, or keep it STOPPED."""
        program.stopping = None
        if then is AfterStop.REMOVE:
            self.programs.pop(program.doc.doc_id, None)
            if self.ended is not None:
                self.ended.forget(program.doc.doc_id)
            self.on_change()
        elif then is AfterStop.START and doc is not None:
            program.doc = doc
            program.restarts, program.backoff = 0, 0.0
            program.last_error = program.doc.error
            self._start_or_rest(program)
        else:
            self._set(program, ProgramState.STOPPED)

    # -- reaping -----------------------------------------------------------------
    def _reap(self) -> None:
        now = time.monotonic()
        exits = dict(self.fork_server.collect())
        server_gone = not self.fork_server.running
        for program in list(self.programs.values()):
            if not program.alive:
                continue
            eof = self._read_messages(program)
            if program.pid in exits:
                code: Optional[int] = exits[program.pid]
            elif server_gone and eof:
                code = None  # the fork server died; the closed socket says enough
            else:
                continue
            program.exit_code = code
            # Whether it was stopped, crashed or returned, what it started
            # goes too: the rest of its tree is the fork server's now, which
            # kills it (reaper.py), setsid() or not.
            self._forget(program)
            stop = program.stopping
            if stop is not None:
                log.info("%s: stopped", program.name)
                self._event(program, "stopped")
                self._after_stop(program, stop.then, stop.doc)
                continue
            self._exited(program, code, now)

    def _read_messages(self, program: Program) -> bool:
        """Take the child's reports; True once its connection is closed."""
        conn = program.conn
        try:
            while conn is not None and conn.poll():
                message = conn.recv()
                if not isinstance(message, tuple) or not message:
                    continue
                if message[0] == "log":
                    self._ship(program, message)
                elif message[0] != "running":
                    program.outcome = message
        except (EOFError, OSError):
            program.eof = True
        return program.eof

    def _ship(self, program: Program, message: tuple[Any, ...]) -> None:
        try:
            _, lines, dropped = message
            self.on_log(program.doc.doc_id, program.name, lines, dropped)
        except Exception:
            log.exception("%s: cannot ship its output", program.name)

    def _event(self, program: Program, text: str, kind: str = EVENT,
               when: Optional[float] = None) -> None:
        """Write ``text`` into ``program``'s own log, marked as the daemon's (``kind``).

        One line per line of ``text`` (a traceback), all with the same time
        ``when`` (default: now), so that they stay in their order.
        """
        stamp = time.time() if when is None else when
        lines = [(stamp, line, kind) for line in str(text).rstrip("\n").splitlines()]
        if lines:
            self._ship(program, ("log", lines, 0))

    def _targets_match(self, doc_id: str, name: str, targets: Any) -> None:
        """Say why a program for many nodes starts here, in the log and its own log."""
        name = printable(name)
        why = (f"labels {targets_text(targets)} match" if isinstance(targets, dict)
               else f"targets {targets_text(targets)}")
        log.info("%s: %s, starting", name, why)
        try:  # the program has no entry yet for _event
            self.on_log(doc_id, name, [(time.time(), why, EVENT)], 0)
        except Exception:
            log.exception("%s: cannot ship its output", name)

    def _forget(self, program: Program) -> None:
        if program.conn is not None:
            program.conn.close()
        program.conn = None
        program.pid = program.pid_start = None
        self._record_pids()

    def _exited(self, program: Program, code: Optional[int], now: float) -> None:
        status, detail = program.outcome or (None, None)
        if status == "invalid":
            self._set(program, ProgramState.INVALID, error=detail)
            log.error("%s: %s", program.name, printable(detail, multiline=True))
            self._invalid_event(program, detail)
            return
        if status == "finished" or (status is None and code == 0):
            log.info("%s: main() returned", program.name)
            if program.doc.restart == "always":
                self._back_off(program, now, "finished")
            else:
                self._event(program, "finished: main() returned")
                self._set(program, ProgramState.FINISHED, error=None)
            return
        if detail is None:
            detail = _describe_exit(code)
        self._crashed(program, detail, now)

    def _invalid_event(self, program: Program, error: Optional[str]) -> None:
        self._event(program, error or "invalid", ERROR)
        self._event(program, "invalid; it starts again when its code changes")

    def _crashed(self, program: Program, error: str, now: float) -> None:
        log.error("%s: crashed: %s", program.name, printable(error.rstrip(), multiline=True))
        program.last_error = error
        self._event(program, error, ERROR)
        if program.doc.restart == "never":
            self._event(program, "crashed; not restarted (restart: never)")
            self._set(program, ProgramState.CRASHED, error=error)
        else:
            self._back_off(program, now, "crashed", error)

    def _back_off(self, program: Program, now: float, why: str,
                  error: Optional[str] = None) -> None:
        ran = now - (program.started_mono if program.started_mono is not None else now)
        if ran >= defaults.BACKOFF_RESET:
            program.backoff = 0.0
        program.backoff = min(defaults.BACKOFF_MAX,
                              max(defaults.BACKOFF_MIN, program.backoff * 2))
        program.restarts += 1
        program.next_start = now + program.backoff
        log.info("%s: %s; restart %d in %.1f s", program.name, why, program.restarts,
                 program.backoff)
        self._event(program, f"{why}; restart {program.restarts} in {program.backoff:g} s")
        self._set(program, ProgramState.BACKING_OFF,
                  error=error if error is not None else program.last_error)

    def _set(self, program: Program, state: ProgramState, error: Any = ...) -> None:
        """Move ``program`` to ``state`` (checked), keep ended.json, tell on_change."""
        program.transition(state)
        if error is not ...:
            program.last_error = error
        if state in (ProgramState.FINISHED, ProgramState.CRASHED) \
                and program.doc.restart == "never":
            program.runs_again, program.ended = oneshot.RUNS_AGAIN, iso(time.time())
            if self.ended is not None:
                self.ended.ended(program.doc.doc_id, program.doc.fingerprint({}), state.value,
                                 program.ended, program.exit_code, program.last_error)
        elif state is not ProgramState.STOPPING:
            program.runs_again = program.ended = None
            if self.ended is not None and state is ProgramState.RUNNING:
                self.ended.forget(program.doc.doc_id)
        self.on_change()

    def _ended_in_this_boot(self, program: Program) -> bool:
        """True if ``program`` (restart: never) ended since boot with this code: it stays."""
        doc = program.doc
        if self.ended is None or doc.restart != "never" or not doc.enabled or doc.error:
            return False
        entry = self.ended.get(doc.doc_id, doc.fingerprint({}))
        if entry is None:
            return False
        # ended.json holds only these two (written by _set); anything else
        # in a damaged file reads as finished.
        program.transition(ProgramState.CRASHED if entry.get("state") == "crashed"
                           else ProgramState.FINISHED)
        program.last_error, program.exit_code = entry.get("error"), entry.get("exit_code")
        program.runs_again, program.ended = oneshot.RUNS_AGAIN, entry.get("ended")
        log.info("%s: %s at %s, since this machine booted; it runs again at the next boot "
                 "or when its code changes", program.name, program.state, program.ended)
        self.on_change()
        return True

    # -- orphan control ----------------------------------------------------------
    def _record_pids(self) -> None:
        """Remember live pids, so a daemon killed with -9 can clean up next time."""
        if self.state_dir is None:
            return
        # Each start time was read once, at the start: not one /proc read
        # per running program at every start and stop.
        live = {p.doc.doc_id: [p.pid, p.pid_start]
                for p in self.programs.values() if p.alive and p.pid}
        path = self.state_dir / "programs.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(live))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record program pids in %s: %s", path, exc)

    def kill_orphans(self) -> int:
        """Kill program process groups a previous daemon left behind.

        Returns once they are gone (or after ``ORPHAN_WAIT`` seconds), so
        that a program never runs twice when this daemon starts it again.
        """
        if self.state_dir is None:
            return 0
        killed = kill_recorded_programs(self.state_dir)
        (self.state_dir / "programs.json").unlink(missing_ok=True)
        return killed

    def snapshot(self) -> dict[str, Any]:
        """Every program's state for the status document.

        Called from the status thread: copy the dict first, as this thread
        adds and removes programs meanwhile.
        """
        return {doc_id: program.describe() for doc_id, program in list(self.programs.items())}

    def close(self) -> None:
        self.fork_server.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def kill_recorded_programs(state_dir: Path) -> int:
    """SIGKILL the program groups a daemon with ``state_dir`` recorded as running.

    Only groups whose leader still has the recorded start time: a pid the
    system gave to another process since is left alone.  Returns how many
    were killed, once they are gone (or after ``ORPHAN_WAIT`` seconds).
    Also for tests and benchmarks that kill a daemon with -9.
    """
    path = state_dir / "programs.json"
    try:
        recorded = json.loads(path.read_text())
        entries = [(str(doc_id), int(pid), started) for doc_id, (pid, started) in recorded.items()]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        if path.exists():
            log.warning("cannot read the program pids %s left: %s", path, exc)
        return 0
    killed = []
    for doc_id, pid, started in entries:
        if pid > 0 and started is not None and _start_time(pid) == started:
            log.warning("killing program %s (pid %s) left by a previous daemon",
                        printable(doc_id), pid)
            _kill_group(pid, signal.SIGKILL)
            killed.append((pid, started))
    deadline = time.monotonic() + ORPHAN_WAIT
    while any(_running(pid, started) for pid, started in killed):
        if time.monotonic() >= deadline:
            log.error("programs left by a previous daemon survive SIGKILL: %s",
                      [pid for pid, started in killed if _running(pid, started)])
            break
        time.sleep(0.01)  # at startup: no signal can be waiting for us yet
    return len(killed)


def _kill_group(pid: Optional[int], sig: int, fallback: bool = True) -> None:
    """Signal the process group ``pid`` leads; ``fallback`` to the pid alone.

    The fallback covers a child that has not reached ``setsid()`` yet; it is
    off once the child was reaped, because then the pid may be reused.
    """
    if not pid:
        return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        if fallback:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    except PermissionError:
        log.warning("not allowed to signal process group %s", pid)


def _start_time(pid: Optional[int]) -> Optional[str]:
    """The kernel's start time of ``pid``: tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, started: str) -> bool:
    """True while ``pid`` is the process started at ``started`` and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 19 and fields[19] == started and fields[0] != "Z"


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exited, status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"

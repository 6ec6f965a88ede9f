"""The node's side of a staged rollout: which release of a document runs here.

A program document with a ``"rollout"`` field (see :mod:`.rollout`) does not
go straight to the supervisor.  The daemon hands it to the :class:`Gate`,
which reads the rollout document (status database) and hands the
supervisor one of:

* the document itself, when this node is ``admitted`` and the rollout is
  neither ``rolled-back`` nor ``aborted`` (or when it is ``done``);
* otherwise the previous release's document, ``docs[<doc id>]`` of the
  release record ``release:<name>:<previous_release>`` (code database);
* or, when there is no previous release, the document disabled: nothing
  runs (its status entry says ``stopped`` and why).

Until the first decision the supervisor keeps what it runs, so a node not
yet reached never starts the new release, not even for a moment.  The gate
reads each rollout document once per heartbeat while it is not final, and
not at all afterwards; a rollout document that cannot be read leaves the
decision as it was.  What the supervisor got carries ``rollout_gate``
(``{"release": n, "why": ...}``), which the program's status entry shows;
each switch also goes into the daemon's log and the program's log.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..component import Component
from ..couch import Database, Doc
from ..exceptions import CouchError
from ..logtext import EscapedArguments
from ..schema import RolloutState, release_id
from .rollout import admitted, is_final

log = logging.getLogger(__name__)
log.addFilter(EscapedArguments())

#: The key of the note the gate adds to the document it hands the supervisor.
GATE_KEY = "rollout_gate"
_BACK = frozenset({RolloutState.ROLLED_BACK.value, RolloutState.ABORTED.value})


def choose(doc: Doc, rollout: Optional[Doc], node: int) -> tuple[str, str]:
    """``("new" | "previous", why)``: which release of ``doc`` ``node`` runs (pure)."""
    rid = doc.get("rollout")
    if rollout is None:
        return "previous", f"{rid} not found"
    state = str(rollout.get("state"))
    if state in _BACK:
        failure = (rollout.get("failure") or {}).get("why")
        return "previous", f"{rid} was {state}" + (f" ({failure})" if failure else "")
    if state == RolloutState.DONE.value:
        return "new", f"{rid} is done"
    if admitted(rollout, node):
        return "new", f"admitted by {rid} (wave {int(rollout.get('wave', 0)) + 1})"
    return "previous", f"not yet admitted by {rid}"


def admits(rid: str, rollout: Optional[Doc], node: int) -> tuple[bool, str]:
    """``(True, why)`` when rollout ``rid`` lets ``node`` take its release: the
    daemon upgrader's gate (:mod:`himbeere.upgrade`), the same rules as a program's."""
    choice, why = choose({"rollout": rid}, rollout, node)
    return choice == "new", why


class Gate(Component):
    """Holds the documents under a rollout; hands the supervisor the release to run."""

    name = "rollouts"

    def __init__(self, status_db: Database, code_db: Database, node: int, interval: float,
                 submit: Callable[[Doc], None],
                 on_event: Optional[Callable[[str, str, str], None]] = None) -> None:
        super().__init__()
        self.status_db = status_db
        self.code_db = code_db
        self.node = node
        self.interval = interval
        self.submit = submit
        #: (doc id, program name, text): a line for the program's own log.
        self.on_event = on_event or (lambda doc_id, name, text: None)
        #: doc id -> the newest document from the feed that has a rollout.
        self.held: dict[str, Doc] = {}
        #: doc id -> (rev, choice, why) last handed to the supervisor.
        self.decided: dict[str, tuple[str, str, str]] = {}
        #: doc ids whose rollout is final and whose decision was made after it.
        self.settled: set[str] = set()
        self._releases: dict[str, Optional[Doc]] = {}
        self._lock = threading.Lock()
        self._poke = threading.Event()

    def take(self, doc: Doc) -> bool:
        """A document from the feed: True if the gate holds it (do not submit it)."""
        doc_id = str(doc.get("_id"))
        if doc.get("_deleted") or not doc.get("rollout"):
            self.forget(doc_id)
            return False
        with self._lock:
            self.held[doc_id] = dict(doc)
            self.settled.discard(doc_id)
        self._poke.set()
        return True

    def busy(self) -> bool:
        """True while a rollout this node takes part in is not final: it needs a leader."""
        with self._lock:
            return any(doc_id not in self.settled for doc_id in self.held)

    def forget(self, doc_id: str) -> None:
        """Hold ``doc_id`` no more: what comes of it goes straight to the supervisor."""
        with self._lock:
            self.held.pop(doc_id, None)
            self.decided.pop(doc_id, None)
            self.settled.discard(doc_id)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.loop()
            self._poke.wait(self.interval)
            self._poke.clear()

    def loop(self) -> None:
        """One heartbeat: read each rollout not final yet; switch what changed."""
        with self._lock:
            todo = {k: v for k, v in self.held.items() if k not in self.settled}
        rollouts: dict[str, Optional[Doc]] = {}
        for doc_id, doc in sorted(todo.items()):
            rid = str(doc["rollout"])
            try:
                if rid not in rollouts:
                    rollouts[rid] = self.status_db.get(rid)
                self._decide(doc, rollouts[rid])
            except CouchError as exc:
                log.warning("rollout %s: cannot read it, %s keeps what it runs: %s", rid,
                            doc_id, exc)
            except Exception:
                log.exception("rollout %s: cannot decide for %s", rid, doc_id)

    def _decide(self, doc: Doc, rollout: Optional[Doc]) -> None:
        doc_id, rev = str(doc["_id"]), str(doc.get("_rev"))
        choice, why = choose(doc, rollout, self.node)
        final = is_final(rollout)
        if self.decided.get(doc_id, ("", "", ""))[:2] == (rev, choice):
            if final:
                self._settle(doc_id, doc)
            return
        run = doc if choice == "new" else self._previous(doc)
        release = doc.get("release") if choice == "new" else doc.get("previous_release")
        if run is None:
            run = dict(doc, enabled=False)
            text = (f"runs no release: {why}, and there is no earlier release "
                    f"(previous_release {doc.get('previous_release')})")
        else:
            text = f"runs release {release}: {why}"
        run = dict(run, _rev=doc.get("_rev"), **{GATE_KEY: {"release": release, "why": why}})
        with self._lock:
            if self.held.get(doc_id) is not doc:
                return  # a newer revision came meanwhile: the next loop decides
            self.decided[doc_id] = (rev, choice, why)
        log.info("%s: %s", doc_id, text)
        self.on_event(doc_id, str(doc.get("name") or doc_id), text)
        self.submit(run)
        if final:
            self._settle(doc_id, doc)

    def _settle(self, doc_id: str, doc: Doc) -> None:
        with self._lock:
            if self.held.get(doc_id) is doc:
                self.settled.add(doc_id)

    def _previous(self, doc: Doc) -> Optional[Doc]:
        """The previous release's document of ``doc`` (GET once), or None."""
        number = doc.get("previous_release")
        if isinstance(number, bool) or not isinstance(number, int):
            return None
        rid = release_id(str(doc.get("name")), number)
        if rid not in self._releases:
            record = self.code_db.get(rid)
            self._releases[rid] = record
        record = self._releases[rid]
        docs = (record or {}).get("docs")
        found = docs.get(str(doc["_id"])) if isinstance(docs, dict) else None
        return dict(found) if isinstance(found, dict) else None

    def wake(self) -> None:
        self._poke.set()

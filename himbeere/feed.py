"""Following the code database's ``_changes`` feed for one node.

The feed is how every change reaches a node: code documents, commands and
deletions.  It remembers the ``seq`` of the last change it handled in the
state directory (``seq.json``) and resumes from there after a restart or a
reconnect, so nothing written while the Pi was off or cut off is missed.
A ``seq`` is opaque: an integer on pouchdb-server, a string on CouchDB.

On every (re)connect the feed first reads the current code documents, then
follows from the saved ``seq``; handling a document twice is harmless,
because programs restart only when their code changed and a command that
has a result is never run again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional

from . import defaults
from .component import Backoff, Component
from .couch import Couch, Database, Doc, Seq, design
from .exceptions import CouchError, HimbeereError

log = logging.getLogger(__name__)


class SeqStore:
    """The last handled ``seq``, kept in a small JSON file."""

    def __init__(self, path: Path, database: str, server: str) -> None:
        self.path = path
        self.key = {"database": database, "server": server}

    def load(self) -> Optional[Seq]:
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in self.key.items()):
            return None  # another server or database: start over
        seq = saved.get("seq")
        return seq if isinstance(seq, (int, str)) else None

    def save(self, seq: Seq) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(dict(self.key, seq=seq)), encoding="utf-8")
        os.replace(tmp, self.path)


class Feed(Component):
    """Delivers a node's changes to ``on_change``; runs in its own thread."""

    name = "feed"
    # A feed notices ``stopping`` only at its next line (a heartbeat comes every
    # ``timeout / 3`` s); it delivers nothing once stopping, so stop() need not wait.
    stop_timeout = 0.0

    def __init__(
        self,
        couch: Couch,
        db: Database,
        node: int,
        seq_store: SeqStore,
        on_change: Callable[[Doc], None],
        timeout: float = defaults.FEED_TIMEOUT,
        on_connect: Optional[Callable[[], None]] = None,
        backoff: Optional[Backoff] = None,
    ) -> None:
        super().__init__()
        self.couch = couch
        self.db = db
        self.node = node
        self.seq_store = seq_store
        self.on_change = on_change
        self.on_connect = on_connect or (lambda: None)
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.connected = threading.Event()
        self.last_error: Optional[str] = None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.follow_once()
            except (CouchError, HimbeereError) as exc:
                self._lost(exc)
            except Exception as exc:  # a bug must not end the feed for good
                log.exception("feed failed")
                self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        self.connected.clear()
        if self.stopping.is_set():
            return
        delay = self.backoff.next()
        message = str(exc) or type(exc).__name__
        if message != self.last_error:
            log.warning("feed: %s; reconnecting in %.1f s", message, delay)
        else:
            log.debug("feed: %s; reconnecting in %.1f s", message, delay)
        self.last_error = message
        self.stopping.wait(delay)

    def follow_once(self) -> None:
        """Connect, catch up on code documents, then follow until it breaks."""
        design.prepare(self.db, self.couch)
        self.on_connect()
        saved = self.seq_store.load()
        if saved is None:
            since: Seq = 0  # first start: everything for this node, commands too
        else:
            since = saved
            self.catch_up()
        feed_filter = design.node_filter(self.couch, self.node)
        changes = self.db.follow(since, feed_filter, timeout=self.timeout, stop=self.stopping,
                                 on_open=self._opened)
        for change in changes:
            self.handle(change)
        # follow() returns when asked to stop, or when the node moved back to
        # its first server (Couch.return_to_first): the loop reconnects there

    def _opened(self) -> None:
        # Only an open feed resets the backoff: a server that answers the
        # first requests but fails the feed itself must not be hammered.
        if self.last_error is not None:
            log.info("feed: connected again")
        self.last_error = None
        self.backoff.reset()
        self.connected.set()

    def catch_up(self) -> None:
        """Hand over the current code documents (a restart missed nothing)."""
        feed_filter = design.node_filter(self.couch, self.node, code_only=True)
        answer = self.db.changes(0, feed_filter, include_docs=True)
        for change in answer.get("results", []):
            if change.get("deleted"):
                continue  # it was never started by this daemon
            self._deliver(change)

    def handle(self, change: Doc) -> None:
        if self.stopping.is_set():
            return  # not delivered, so its seq must not be saved either
        self._deliver(change)
        if "seq" in change:
            self.seq_store.save(change["seq"])

    def _deliver(self, change: Doc) -> None:
        doc = change.get("doc")
        if doc is None:
            doc = {"_id": change.get("id"), "_deleted": True} if change.get("deleted") else None
        if doc is None:
            return
        if doc.get("_id", "").startswith("_design/"):
            return
        try:
            self.on_change(doc)
        except Exception:
            log.exception("could not handle change of %s", doc.get("_id"))


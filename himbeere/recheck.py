"""Programs whose document left this node: the feed cannot tell.

A node's ``_changes`` filter passes a code document while its ``type`` names
the node.  When someone gives the document another node's MAC id (in
Fauxton, or to move a program), the new revision no longer passes the
filter, so the feed never says that the program left, and it would run on
both nodes.  Every ``interval`` seconds (six heartbeats: a minute by
default) this component asks for the current revisions of the node's own
programs in one ``_all_docs`` request, and hands the supervisor each
document that no longer names this node, or is gone.  Everything else is
the feed's to deliver (programs for many nodes too: every node gets them).
Placed programs are the scheduler's business.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from . import codedoc
from .component import Component
from .couch import Database, Doc
from .exceptions import CouchError
from .logtext import printable

log = logging.getLogger(__name__)

#: The recheck runs every this many heartbeat intervals.
RECHECK_HEARTBEATS = 6


class Recheck(Component):
    """Stops programs whose document moved to another node or vanished."""

    name = "recheck"
    stop_timeout = 2.0

    def __init__(self, db: Database, node: int, interval: float,
                 programs: Callable[[], Mapping[str, Mapping[str, Any]]],
                 on_change: Callable[[Doc], None]) -> None:
        super().__init__()
        self.db = db
        self.node = node
        self.interval = interval
        self.programs = programs
        self.on_change = on_change

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.loop()
            except CouchError as exc:
                log.debug("recheck: %s (next in %.0f s)", exc, self.interval)

    def loop(self) -> None:
        """One recheck: hand over each own program's document that left this node."""
        own = sorted(doc_id for doc_id, program in self.programs().items()
                     if not program.get("placed"))
        if not own:
            return
        for row in self.db.all_docs(keys=own, include_docs=True):
            doc_id = str(row.get("key"))
            doc = row.get("doc")
            if doc is None:  # deleted ({"value": {"deleted": true}}) or never there
                self.on_change({"_id": doc_id, "_deleted": True})
            elif not (codedoc.matches_node(doc, self.node) or codedoc.is_targeted(doc)):
                log.info("recheck: %s now names node %s, not this one", printable(doc_id),
                         printable(str(doc.get("type"))))
                self.on_change(doc)

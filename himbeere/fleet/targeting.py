"""Programs for many nodes: one document, run where its ``targets`` match.

A **program for many nodes** is a code document of ``type:
"himbeere-program"``, id ``program:<name>``, written by ``himbeere-upload
push PATH --all`` or ``--label room=lab``::

    {"_id": "program:sensor", "type": "himbeere-program", "name": "sensor",
     "code": "def main(): ...",          # or "modules", or "git", as any program
     "targets": {"labels": {"room": "lab"}}}    # or "all", or [mac, ...]

The feed filter passes it to every node (the server cannot know a node's
labels); each node runs it while its own labels match ``targets``
(:func:`himbeere.schema.targets_labels`) and stops it when they no longer
do.  A node's labels are its ``node:<mac>`` document in the status
database, which only deployers write (``himbeere label``), never the node.

:class:`NodeLabels` keeps them: read once when the first document that
selects by labels arrives, then again at every heartbeat (placement's beat
calls :meth:`NodeLabels.refresh`, one GET) from then on, so that the next
such document finds them known (a node that never sees one never reads
them).
A change is handed to the supervisor, which starts and stops the programs
it concerns (:meth:`himbeere.programs.Supervisor.relabel`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from .. import codedoc
from ..couch import Database, Doc
from ..exceptions import CouchError
from ..logtext import EscapedArguments
from ..schema import node_id

log = logging.getLogger(__name__)
# Labels come from users: none may forge a line of the daemon's log.
log.addFilter(EscapedArguments())

Labels = dict[str, str]


def selects_labels(doc: Doc) -> bool:
    """True for a program for many nodes whose ``targets`` is a label selector."""
    targets = doc.get("targets")
    return codedoc.is_targeted(doc) and isinstance(targets, dict)


def labels_of(node_doc: Optional[Doc]) -> Labels:
    """The labels of a ``node:<mac>`` document (none when it is missing), as strings."""
    labels = (node_doc or {}).get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(key): str(value) for key, value in labels.items()}


def labels_text(labels: Optional[Labels]) -> str:
    """``room=lab, rack=2`` (``none``), for log lines."""
    if not labels:
        return "none"
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))


#: Heartbeats between reads of this node's labels, once a program selects
#: nodes by label.  Labels change only when a deployer runs ``himbeere
#: label``, which so takes effect within this many heartbeats (a minute at
#: the default 10 s).  A read every heartbeat doubled a fleet's requests as
#: soon as one program was pushed with ``--label`` (issue 14).
READ_EVERY = 6


class NodeLabels:
    """This node's labels, cached; refreshed at each heartbeat once a document selected by them.

    ``on_change(labels)`` is called (from the thread that read them) with
    the new labels each time they differ from the last ones read, the
    first read included.  Thread-safe: the feed thread notes documents, the
    placement thread refreshes.
    """

    def __init__(self, status_db: Database, node: int,
                 on_change: Callable[[Labels], None]) -> None:
        self.status_db = status_db
        self.node = node
        self.on_change = on_change
        #: None until read.
        self.labels: Optional[Labels] = None
        #: Set once a label-selecting document came: refreshed at every beat from then on.
        self.wanted = False
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._beats = 0  # heartbeats since the last read

    def note(self, doc: Doc) -> None:
        """A document from the feed (feed thread): read the labels now if it needs them.

        Only the first label-selecting document waits for one GET; the
        following ones find the labels known.  A failed read is retried at
        the next heartbeat (the document waits until then).
        """
        if not selects_labels(doc):
            return
        with self._lock:
            self.wanted = True
            known = self.labels is not None
        if not known:
            self.refresh(now=True)

    def refresh(self, now: bool = False) -> None:
        """Read ``node:<mac>`` (one GET) once labels are wanted; tell a change.

        Called at every heartbeat; reads every :data:`READ_EVERY` of them, or
        ``now``.
        """
        if not self.wanted:
            return
        with self._lock:
            self._beats += 1
            if not now and self.labels is not None and self._beats < READ_EVERY:
                return
            self._beats = 0
        with self._reading:  # the feed and placement threads: one read at a time
            try:
                labels = labels_of(self.status_db.get(node_id(self.node)))
            except CouchError as exc:
                log.warning("targeting: cannot read this node's labels (%s): %s",
                            node_id(self.node), exc)
                return
            with self._lock:
                changed, self.labels = labels != self.labels, labels
            if changed:  # still holding _reading: changes are told in their order
                log.info("targeting: this node's labels are %s", labels_text(labels))
                self.on_change(dict(labels))

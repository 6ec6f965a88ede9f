"""A program's persistent ``state``: a dict of JSON values kept in CouchDB.

Every program sees ``state`` among its globals.  It lives as one document
of the status database, named after the program, not the node, so it
follows the program to whichever node runs it next::

    {"_id": "state:<program doc id>", "type": "himbeere-state",
     "program": "<program doc id>", "name": "counter",
     "values": {"runs": 3, "last": "2024-05-01"},
     "node": 202481596941066, "saved": 1714564800.123}

``node`` is the node that saved last, ``saved`` the time on the server's
clock.  Nodes may write any ``state:*`` document (see
:mod:`himbeere.security`).

Nothing is read before the program first touches ``state``; then the
document is read once.  It is written by :meth:`ProgramState.save`, and by
the child (see :mod:`himbeere.runtime.child`): every
``defaults.STATE_SAVE_INTERVAL`` seconds (10) once ``state`` was touched,
when asked to quit and at exit.  A save writes
only what this copy changed since it last read or saved: keys set, changed
in place (``state["seen"].append(x)`` counts) or deleted, applied to the
document as it is on the server.  When someone else saved in between, the
server answers 409; the document is read again and the same changes are
applied to it again: our changed keys win, every other key keeps the other
writer's value (and shows in ``state`` after the save).

``himbeere state NAME --reset`` deletes the document.  A program that is
running meanwhile still holds the old values in memory; only the keys it
changes afterwards are written back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..exceptions import Conflict, CouchError
from ..schema import state_id

if TYPE_CHECKING:  # couch.py imports http.client: a program that never uses state skips it
    from ..couch import Database, Doc

STATE_TYPE = "himbeere-state"
#: Times a save reads the document again after a conflict before it gives up.
SAVE_TRIES = 10


def canonical(value: Any) -> str:
    """``value`` as JSON, the same text for equal values (keys sorted)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check(key: Any, value: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"state keys are strings (JSON object keys), not "
                        f"{type(key).__name__}: {key!r}")
    try:
        return canonical(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"state[{key!r}] must be JSON: dict (string keys), list, str, int, "
                        f"float (not NaN or infinity), bool or None; {exc}") from None


class ProgramState(MutableMapping[str, Any]):
    """The ``state`` of one program: a dict that reads itself on first use."""

    def __init__(self, db: Callable[[], Database], program: str, name: str, node: int,
                 clock: Callable[[], float] = time.time, tries: int = SAVE_TRIES,
                 on_load: Optional[Callable[[], None]] = None) -> None:
        #: Gives the status database; called on first use only.
        self._db = db
        #: Called once, when the document was first read (the child's autosave starts).
        self._on_load = on_load
        self.program = program
        self.name = name
        self.node = node
        self.clock = clock
        self.tries = tries
        self.id = state_id(program)
        self._lock = threading.RLock()
        self._values: Optional[dict[str, Any]] = None
        #: key -> canonical JSON of each value as last read or saved.
        self._base: dict[str, str] = {}
        #: The document as last read or saved (None: there is none).
        self._doc: Optional[Doc] = None

    # -- reading -----------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """True once the document was read (``state`` was touched)."""
        return self._values is not None

    def _read(self) -> Optional[Doc]:
        try:
            return self._db().get(self.id)
        except CouchError as exc:
            error = type(exc)(f"state of {self.name}: cannot read {self.id}: {exc}")
            error.status = exc.status
            raise error from exc

    def _data(self) -> dict[str, Any]:
        with self._lock:
            if self._values is None:
                doc = self._read()
                values = _values_of(doc)
                self._doc = doc
                self._values = values
                self._base = {key: canonical(value) for key, value in values.items()}
                if self._on_load is not None:
                    self._on_load()
            return self._values

    # -- the dict ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return self._data()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        _check(key, value)
        with self._lock:
            self._data()[key] = value

    def __delitem__(self, key: str) -> None:
        with self._lock:
            del self._data()[key]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._data())

    def __repr__(self) -> str:
        if self._values is None:
            return f"<state of {self.name} (not read yet)>"
        with self._lock:
            return f"<state of {self.name} {self._values!r}>"

    # -- saving ------------------------------------------------------------------------
    def changes(self) -> tuple[dict[str, Any], list[str]]:
        """What a save would write: (keys set or changed -> value, keys deleted)."""
        with self._lock:
            if self._values is None:
                return {}, []
            changed = {}
            for key, value in self._values.items():
                text = _check(key, value)  # in-place changes were never checked
                if self._base.get(key) != text:
                    changed[key] = json.loads(text)  # a copy, as it will be stored
            deleted = [key for key in self._base if key not in self._values]
            return changed, deleted

    def save(self) -> bool:
        """Write what changed since the last read or save; False if nothing had.

        Raises :class:`~himbeere.exceptions.CouchError` when the server
        cannot be reached or refuses, and
        :class:`~himbeere.exceptions.Conflict` after :data:`SAVE_TRIES`
        conflicts in a row.
        """
        with self._lock:
            changed, deleted = self.changes()
            if not changed and not deleted:
                return False
            doc = self._doc
            for _ in range(self.tries):
                values = _values_of(doc)
                values.update(changed)
                for key in deleted:
                    values.pop(key, None)
                new: Doc = {"_id": self.id, "type": STATE_TYPE, "program": self.program,
                            "name": self.name, "values": values, "node": self.node,
                            "saved": round(self.clock(), 3)}
                if doc is not None and doc.get("_rev"):
                    new["_rev"] = doc["_rev"]
                try:
                    self._doc = self._db().save(new)
                except Conflict:
                    # Someone else saved meanwhile: apply our changes to theirs.
                    doc = self._read()
                    continue
                self._merged(values, changed)
                return True
            raise Conflict(f"state of {self.name}: {self.id} still conflicting after "
                           f"{self.tries} tries")

    def _merged(self, values: dict[str, Any], changed: dict[str, Any]) -> None:
        """Take the saved ``values`` in, keeping the program's own objects.

        The program may hold a reference to a value it changed in place
        (``seen = state["seen"]``): those objects stay; only other writers'
        keys are replaced or removed.
        """
        assert self._values is not None
        mine = self._values
        for key in list(mine):
            if key not in values:
                del mine[key]
        for key, value in values.items():
            if key not in changed or key not in mine:
                mine[key] = value
        self._base = {key: canonical(value) for key, value in values.items()}


def _values_of(doc: Optional[Doc]) -> dict[str, Any]:
    values = (doc or {}).get("values")
    return json.loads(json.dumps(values)) if isinstance(values, dict) else {}

"""Release history: every push of a program is a numbered release; rollback.

A push that writes program documents (per node, placed, global or
``program:<name>``) publishes them as release ``n`` of the program's name:
each document gets ``release``, ``pushed_by`` and ``pushed_at``, and a
release record ``release:<name>:<n>`` (:func:`himbeere.schema.release_id`)
in the code database keeps exactly what was written::

    {"_id": "release:blink:000003", "type": "himbeere-release", "name": "blink",
     "release": 3, "pushed_by": "alice", "pushed_at": "2026-11-29T09:30:00.123Z",
     "key": null, "docs": {"1234567:blink": {...the document as written...}},
     "rollout": null, "source": "/home/alice/blink.py",
     "changes": ["changed blink.py (+1 -1 lines)"], "rollback_of": null}

The record is a document of its own, so compacting the code database (which
drops the old revisions of the program documents) keeps the history.

Numbers are per program name and only grow: the next one is 1 + the highest
of the release records and of the documents being written.  Two laptops that
push at once both try the same number; the release record's PUT with a fixed
id is the compare-and-swap: the loser gets a 409 and takes the next number.
The record is written before the documents, so a node that wants an earlier
release (a rollout's fallback) always finds it.

``rollback NAME [--to N]`` writes release ``N``'s documents again as a new
release (the number keeps growing, so a node's downgrade rule still holds).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from himbeere import defaults
from himbeere.couch import Doc
from himbeere.exceptions import ConfigError, Conflict, NotFound
from himbeere.schema import (
    PLACED_TYPE,
    PROGRAM_TYPE,
    RELEASE_PREFIX,
    RELEASE_TYPE,
    ROLLOUT_PREFIX,
    STATUS_PREFIX,
    iso,
    mac_of,
    placed_id,
    release_id,
    releases_prefix,
    targeted_id,
)

from .fleet import Fleet

#: Fields that say which release a document is, not what it runs: a rollback
#: drops them from the old document and the new release sets them again.
RELEASE_FIELDS = ("release", "pushed_by", "pushed_at", "signature", "rollout",
                  "previous_release")
#: Fields an admin changes without a push (stop, start, restart): a rollback
#: keeps the current document's, so a stopped program stays stopped.
OPERATIONAL_FIELDS = ("enabled", "restart", "restart_count")
#: Who pushed, when the server does not know (admin party, no user).
ANONYMOUS = "admin"
#: How many taken numbers a push skips before it gives up.
MAX_TRIES = 100
#: A called-back step on each complete document, just before it is written
#: (a rollout's fields, then the signature: whatever must come last).
Finish = Callable[[Doc], None]


def pusher(fleet: Fleet) -> str:
    """The server user name this push is made as, or ``admin``."""
    return fleet.user or ANONYMOUS


def releases(fleet: Fleet, name: str) -> list[Doc]:
    """Every release record of program ``name``, oldest first."""
    prefix = releases_prefix(name)
    rows = fleet.code.all_docs(startkey=prefix, endkey=prefix + "\ufff0",
                               include_docs=True)
    found = [row["doc"] for row in rows if isinstance(row.get("doc"), dict)]
    return sorted((doc for doc in found if doc.get("type") == RELEASE_TYPE
                   and isinstance(doc.get("release"), int)), key=lambda doc: doc["release"])


def latest(fleet: Fleet, name: str) -> int:
    """The highest release number of program ``name`` (0: none yet)."""
    prefix = releases_prefix(name)
    rows = fleet.code.all_docs(startkey=prefix + "\ufff0", endkey=prefix,
                               descending=True, limit=1)
    if not rows:
        return 0
    tail = str(rows[0]["id"])[len(prefix):]
    return int(tail) if tail.isdigit() else 0


def named(fleet: Fleet) -> list[str]:
    """The names of the programs that have releases."""
    rows = fleet.code.all_docs(startkey=RELEASE_PREFIX,
                               endkey=RELEASE_PREFIX + "\ufff0")
    return sorted({str(row["id"])[len(RELEASE_PREFIX):].rsplit(":", 1)[0] for row in rows})


def _written(doc: Doc) -> Doc:
    """``doc`` as the release record keeps it: no ``_rev`` or other ``_`` fields but
    its id."""
    return {k: copy.deepcopy(v) for k, v in doc.items() if k == "_id" or not k.startswith("_")}


def _number_of(doc: Doc) -> int:
    number = doc.get("release")
    return number if isinstance(number, int) and not isinstance(number, bool) else 0


def publish(fleet: Fleet, name: str, docs: list[Doc], source: str,
            changes: Optional[list[str]] = None, finish: Optional[Finish] = None,
            rollback_of: Optional[int] = None) -> Doc:
    """Write ``docs`` (program documents, ``_rev`` set for those that exist) as the
    next release of ``name``; returns the release record.

    ``finish`` is called on every document once it is complete (release
    stamped), just before it is written; it runs again should the number be
    taken.  Each document gets its new ``_rev``.
    """
    if not docs:
        raise ConfigError(f"release of {name!r}: no documents to write")
    by = pusher(fleet)
    number = max([latest(fleet, name)] + [_number_of(doc) for doc in docs]) + 1
    for _ in range(MAX_TRIES):
        record = _record(name, number, by, docs, source, changes, finish, rollback_of)
        try:
            fleet.code.save(record)
        except Conflict:
            number += 1  # another push took this number first
            continue
        _write(fleet, name, record, docs)
        return record
    raise Conflict(f"release of {name!r}: numbers up to {number} were all taken while "
                   "pushing; push again")


def _record(name: str, number: int, by: str, docs: list[Doc], source: str,
            changes: Optional[list[str]], finish: Optional[Finish],
            rollback_of: Optional[int]) -> Doc:
    """Stamp ``docs`` as release ``number`` and build its record."""
    at = iso()
    for doc in docs:
        for field in ("signature", "rollout", "previous_release"):
            doc.pop(field, None)  # finish() sets them again for this release
        doc.update(release=number, pushed_by=by, pushed_at=at)
        # -- each document is complete here; finish() (rollout fields, then the
        # signature) is the last step before it is written.
        if finish is not None:
            finish(doc)
    signature = next((doc["signature"] for doc in docs
                      if isinstance(doc.get("signature"), dict)), None)
    rollout = next((doc["rollout"] for doc in docs if doc.get("rollout")), None)
    return {
        "_id": release_id(name, number), "type": RELEASE_TYPE, "name": name,
        "release": number, "pushed_by": by, "pushed_at": at,
        "key": signature.get("key") if signature else None,
        "docs": {doc["_id"]: _written(doc) for doc in docs},
        "rollout": rollout, "source": source, "changes": list(changes or []),
        "rollback_of": rollback_of,
    }


def _write(fleet: Fleet, name: str, record: Doc, docs: list[Doc]) -> None:
    """Write the documents of ``record``; a conflict on the first takes the record back."""
    for index, doc in enumerate(docs):
        try:
            fleet.code.save(doc)
        except Conflict:
            if index == 0:
                # Nothing of this release was written: free its number again.
                fleet.code.delete(record)
            raise Conflict(f"{doc['_id']} changed while pushing release {record['release']} "
                           f"of {name!r} (someone else pushed it at the same time); "
                           "push again") from None


# -- history and rollback -------------------------------------------------------------
def history(fleet: Fleet, name: str) -> list[Doc]:
    """The releases of ``name``, newest first, each as one history entry."""
    fleet.require_database(fleet.code)
    records = releases(fleet, name)
    if not records:
        raise _no_releases(fleet, name)
    return [entry(record) for record in reversed(records)]


def entry(record: Doc) -> Doc:
    """One line of history: number, when, who, key, targets, what changed, outcome."""
    return {
        "release": record["release"], "pushed_at": record.get("pushed_at"),
        "pushed_by": record.get("pushed_by"), "key": record.get("key"),
        "docs": sorted(record.get("docs") or {}), "what": what(record),
        "changes": record.get("changes") or [], "rollout": record.get("rollout"),
        "outcome": record.get("outcome"), "rollback_of": record.get("rollback_of"),
        "source": record.get("source"),
    }


def what(record: Doc) -> str:
    """What a release changed, in a few words."""
    if isinstance(record.get("rollback_of"), int):
        return f"rollback to release {record['rollback_of']}"
    changes = record.get("changes") or []
    if not changes:
        return "pushed"
    return "; ".join(str(change) for change in changes)


def _no_releases(fleet: Fleet, name: str) -> NotFound:
    there = ", ".join(named(fleet)) or "none"
    return NotFound(f"program {name!r} has no releases; programs with releases: {there}")


def rollback(fleet: Fleet, name: str, to: Optional[int] = None,
             finish: Optional[Finish] = None) -> Doc:
    """Write release ``to`` of ``name`` again as a new release (default: the release
    before the newest); returns the new release record."""
    fleet.require_database(fleet.code)
    records = {record["release"]: record for record in releases(fleet, name)}
    if not records:
        raise _no_releases(fleet, name)
    current = max(records)
    if to is None:
        earlier = [number for number in records if number < current]
        if not earlier:
            raise NotFound(f"program {name!r} has only release {current}: nothing to roll "
                           "back to")
        to = max(earlier)
    if to not in records:
        raise NotFound(f"program {name!r} has no release {to}; its releases: "
                       + ", ".join(str(n) for n in sorted(records)))
    docs = [_again(fleet, old) for old in (records[to].get("docs") or {}).values()]
    if not docs:
        raise NotFound(f"release {to} of {name!r} holds no documents: nothing to roll back to")
    if all(_same(doc, fleet.code.get(doc["_id"])) for doc in docs):
        raise ConfigError(f"program {name!r} already runs the code of release {to}: nothing "
                          "to roll back")
    return publish(fleet, name, docs, source=f"rollback to release {to}",
                   changes=[f"rollback to release {to}"], finish=finish, rollback_of=to)


def _again(fleet: Fleet, old: Doc) -> Doc:
    """``old`` (a document as a release wrote it) ready to be written again."""
    doc = {k: copy.deepcopy(v) for k, v in old.items() if k not in RELEASE_FIELDS}
    current = fleet.code.get(doc["_id"])
    if current is not None:
        doc["_rev"] = current["_rev"]
        for field in OPERATIONAL_FIELDS:
            if field in current:
                doc[field] = current[field]
            else:
                doc.pop(field, None)
    return doc


def _same(doc: Doc, current: Optional[Doc]) -> bool:
    """True when ``current`` already holds what ``doc`` would write."""
    if current is None:
        return False

    def content(d: Doc) -> Doc:
        return {k: v for k, v in d.items() if not k.startswith("_") and k not in RELEASE_FIELDS}

    return content(doc) == content(current)


def history_table(entries: list[Doc]) -> list[list[str]]:
    """History entries as rows of ``himbeere-upload history``: release, when, who,
    key, where, what."""
    rows = []
    for item in entries:
        what_text = item["what"]
        if item.get("outcome"):
            what_text += f" (rollout {item['outcome']})"
        elif item.get("rollout"):
            what_text += " (rollout)"
        rows.append([str(item["release"]), str(item.get("pushed_at") or "-"),
                     str(item.get("pushed_by") or "-"), str(item.get("key") or "-"),
                     ", ".join(item["docs"]) or "-", what_text])
    return rows


HISTORY_HEADER = ["RELEASE", "PUSHED", "BY", "KEY", "DOCUMENTS", "WHAT"]


# -- one program across the fleet (the dashboard's program page) ----------------------
def overview(fleet: Fleet, name: str) -> Doc:
    """Program ``name``: its documents, where it runs (each node's state and
    release), its history and its rollouts."""
    fleet.require_databases()
    docs = _current_docs(fleet, name)
    records = releases(fleet, name)
    ids = set(docs) | {doc_id for record in records for doc_id in record.get("docs") or {}}
    ids |= {targeted_id(name), placed_id(name)}
    try:
        names = fleet.names()
    except NotFound:  # no names view: the databases were not set up by the uploader
        names = {}
    nodes = []
    for status in _prefixed(fleet.status, STATUS_PREFIX):
        mac = mac_of(status["_id"], STATUS_PREFIX)
        for doc_id, running in sorted((status.get("programs") or {}).items()):
            if mac is None or not isinstance(running, dict) or doc_id not in ids:
                continue
            nodes.append({"node": mac, "node_name": names.get(mac), "id": doc_id,
                          "state": running.get("state"), "release": running.get("release"),
                          "restarts": running.get("restarts"),
                          "heartbeat_time": status.get("heartbeat_time")})
    if not docs and not records and not nodes:
        raise NotFound(f"no program named {name!r}: no documents, releases or nodes run it")
    rollouts = [{"id": doc["_id"], "state": doc.get("state"), "waves": doc.get("waves")}
                for doc in _prefixed(fleet.status, f"{ROLLOUT_PREFIX}{name}:")]
    return {"name": name, "docs": list(docs.values()), "nodes": nodes,
            "releases": [entry(record) for record in reversed(records)],
            "latest": records[-1]["release"] if records else None, "rollouts": rollouts}


def _current_docs(fleet: Fleet, name: str) -> dict[str, Doc]:
    """The code documents of program ``name`` now: id -> where, release, enabled."""
    found: dict[str, Doc] = {}
    for row in fleet.code.view(defaults.DESIGN, "programs"):
        if row["key"][1] != name:
            continue
        doc = fleet.code.get(row["id"]) or {}
        where = row["key"][0]  # the programs view's node: a MAC id, a type or None
        shown = {None: "global", PLACED_TYPE: "placed", PROGRAM_TYPE: "targeted"}.get(where)
        found[row["id"]] = {"id": row["id"], "where": shown or str(where),
                            "release": doc.get("release"),
                            "enabled": (row.get("value") or {}).get("enabled", True)}
    return found


def _prefixed(db: Any, prefix: str) -> list[Doc]:
    rows = db.all_docs(startkey=prefix, endkey=prefix + "\ufff0", include_docs=True)
    return [row["doc"] for row in rows if isinstance(row.get("doc"), dict)]

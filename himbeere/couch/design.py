"""The design document of the code database, and the node's feed filter.

The filter lets through, for one node: its code documents (``type`` equal to
its MAC id, as an integer or a string), its commands (``<macid>_cmd``),
fleet commands (``type: "himbeere-command"``) whose ``targets`` is ``"all"``
or a list holding its MAC id (integer or string), placed programs
(``type: "himbeere-placed"``: every node must know them, the scheduler
decides where they run), programs for many nodes (``type:
"himbeere-program"``: each node checks their ``targets`` against its own
labels), the daemon release pointer (``type: "himbeere-daemon-current"``,
see :mod:`himbeere.upgrade`), documents exporting ``global_modules`` and
deletions (a deleted document has no ``type`` left to
test, so every node sees every deletion and ignores the ones it does not
know).

Apache CouchDB >= 2 gets the same rule as a ``_selector``, which it runs
2 to 10 times cheaper than JavaScript; pouchdb-server crashes on
``_selector``, so it gets the JavaScript filter.  Query parameters reach a
pouchdb-server filter parsed as JSON (``mac=1000`` arrives as a number),
hence ``String(req.query.mac)``.

The same document holds the ``programs`` view (what ``himbeere-upload ls``
lists), the ``placed`` view (what ``himbeere placements`` lists), the
``conflicts`` view (a node's command documents in conflict) and the
``validate_doc_update`` rules of :mod:`himbeere.security`.
The status database gets a design document of its own
(:func:`status_design_doc`): its rules, the ``names`` view of friendly
node names and a ``conflicts`` view of its own.  Both are installed by
``himbeere-upload setup``; a daemon only
installs the code database's when it is missing and it may (an admin).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .. import defaults
from ..exceptions import CouchError, NotFound, Unauthorized
from ..schema import COMMAND_TYPE, DAEMON_CURRENT_TYPE, PLACED_TYPE, PROGRAM_TYPE, commands_id
from . import js, security
from .client import Couch, Database, Doc, FeedFilter

log = logging.getLogger(__name__)

DESIGN_ID = f"_design/{defaults.DESIGN}"
#: Bumped whenever the design document changes, so daemons and the
#: uploader know an installed copy is outdated.
VERSION = 10
#: The oldest version whose ``node`` filter this daemon can follow: code and
#: ``<macid>_cmd`` documents pass every version's filter (version 2 added
#: views and rules).  An older filter is used with a warning rather than
#: leaving the node idle: only fleet commands miss it.
FILTER_SINCE = 1
#: The first version whose filter lets fleet commands (``himbeere-command``) through.
FLEET_COMMANDS_SINCE = 3
#: The first version whose filter lets placed programs (``himbeere-placed``) through.
PLACED_SINCE = 5
#: Version 6: the filter takes a ``type`` or target only as a number or a
#: string (``[1000]`` was taken), and any ``global_modules`` (``null`` too,
#: so a node drops the modules), as the selector and the daemon do.
#: Version 7: a node may write its ``history:<mac>`` in the status database.
#: The first version whose filter lets programs for many nodes
#: (``himbeere-program``) through; its ``programs`` view gives their ``targets``.
TARGETED_SINCE = 8
#: The first version with the ``conflicts`` views (both databases), and whose
#: rules let a node delete a revision of its command that holds a result: a
#: node resolves the conflicts of its own documents (himbeere/conflicts.py).
CONFLICTS_SINCE = 9
#: The first version whose filter lets the daemon release pointer
#: (``daemon:current``, ``himbeere-daemon-current``) through: self-upgrades.
DAEMON_UPGRADE_SINCE = 10

#: The node's ``_changes`` filter (see above), for servers without ``_selector``.
NODE_FILTER = js.load("node_filter.js")
#: Programs by ``[node, name]``; ``node`` is null for a document that only
#: exports ``global_modules``.  Commands are left out.
PROGRAMS_MAP = js.load("programs_map.js")
#: Placed programs by name, with where they may run (see placement.py).
PLACED_MAP = js.load("placed_map.js")
#: Friendly node names: ``node:<macid>`` documents of the status database.
NAMES_MAP = js.load("names_map.js")
#: A node's conflicted documents by ``[node]``: its command documents in the
#: code database, its own documents in the status database.
COMMAND_CONFLICTS_MAP = js.load("command_conflicts_map.js")
STATUS_CONFLICTS_MAP = js.load("status_conflicts_map.js")
#: The name of those views in both design documents.
CONFLICTS_VIEW = "conflicts"


def design_doc() -> Doc:
    """The design document himbeere needs in the code database."""
    return {
        "_id": DESIGN_ID,
        "language": "javascript",
        "himbeere_version": VERSION,
        "filters": {"node": NODE_FILTER},
        "views": {"programs": {"map": PROGRAMS_MAP}, "placed": {"map": PLACED_MAP},
                  CONFLICTS_VIEW: {"map": COMMAND_CONFLICTS_MAP}},
        "validate_doc_update": security.code_validate(),
    }


def status_design_doc() -> Doc:
    """The design document of the status database: rules and node names."""
    return {
        "_id": DESIGN_ID,
        "language": "javascript",
        "himbeere_version": VERSION,
        "views": {"names": {"map": NAMES_MAP},
                  CONFLICTS_VIEW: {"map": STATUS_CONFLICTS_MAP}},
        "validate_doc_update": security.status_validate(),
    }


class DesignMissing(CouchError):
    """The filter's design document is missing or outdated, and we may not fix it."""


def ensure_design(db: Database, extra: Optional[Doc] = None,
                  wanted: Optional[Doc] = None) -> bool:
    """Install or upgrade the design document; True if it was written.

    ``wanted`` replaces :func:`design_doc` (the status database's), ``extra``
    adds fields.  A newer version (from a newer uploader) is never
    downgraded: that would drop rules an older daemon does not know.
    Raises :class:`DesignMissing` when it is needed but we lack the rights.
    """
    wanted = dict(wanted) if wanted is not None else design_doc()
    if extra:
        wanted.update(extra)
    current = db.get(DESIGN_ID)
    if current is not None and _same(current, wanted):
        return False
    if current is not None and _version(current) > VERSION:
        log.warning("%s in %s has version %s, newer than this himbeere's %s; left as it is",
                    DESIGN_ID, db.name, current.get("himbeere_version"), VERSION)
        return False
    if current is not None:
        wanted["_rev"] = current["_rev"]
    try:
        db.save(wanted)
    except Unauthorized:
        have = "missing" if current is None else (
            f"outdated (version {current.get('himbeere_version')}, need {VERSION})")
        raise DesignMissing(
            f"{DESIGN_ID} in database {db.name!r} is {have}, and these credentials may "
            "not write it: run `himbeere-upload setup URL` as an admin, or start the "
            "daemon once with admin credentials"
        ) from None
    log.info("installed %s (version %s) in %s", DESIGN_ID, VERSION, db.name)
    return True


def _same(current: Doc, wanted: Doc) -> bool:
    return all(current.get(k) == v for k, v in wanted.items() if k != "_rev")


def _version(doc: Doc) -> int:
    version = doc.get("himbeere_version", 0)
    return version if isinstance(version, int) else 0


def design_usable(db: Database) -> bool:
    """True if the installed design document has a filter this daemon can use."""
    current = db.get(DESIGN_ID)
    return current is not None and _version(current) >= FILTER_SINCE and (
        current.get("filters", {}).get("node") is not None)


def node_filter(couch: Couch, node: int, code_only: bool = False) -> FeedFilter:
    """The ``_changes`` filter for ``node``: selector or JavaScript by server."""
    if couch.supports_selector():
        return selector_filter(node, code_only)
    return javascript_filter(node, code_only)


def javascript_filter(node: int, code_only: bool = False) -> FeedFilter:
    """:data:`NODE_FILTER` of the installed design document, for ``node``."""
    params: dict[str, Any] = {"filter": f"{defaults.DESIGN}/node", "mac": str(node)}
    if code_only:
        params["kind"] = "code"
    return FeedFilter(params=params)


def selector_filter(node: int, code_only: bool = False) -> FeedFilter:
    """The rule of :data:`NODE_FILTER` as a ``_selector`` (Apache CouchDB >= 2 only)."""
    # One $eq each, not "$in": a selector's $in also matches an array holding
    # the value (type [1000]), which neither the JavaScript nor the daemon take.
    types: list[Any] = [node, str(node)]
    if not code_only:
        types.append(commands_id(node))
    either: list[Doc] = [{"_deleted": True}]
    either += [{"type": {"$eq": kind}} for kind in types]
    either += [{"type": PLACED_TYPE}, {"type": PROGRAM_TYPE}, {"type": DAEMON_CURRENT_TYPE},
               {"global_modules": {"$exists": True}}]
    if not code_only:
        either.append({"type": COMMAND_TYPE, "targets": "all"})
        either += [{"type": COMMAND_TYPE, "targets": {"$elemMatch": {"$eq": mac}}}
                   for mac in (node, str(node))]
    return FeedFilter(selector={"$or": either})


def prepare(db: Database, couch: Couch) -> None:
    """Make sure the feed filter can be used; raise a clear error if not."""
    if not db.exists():
        raise NotFound(
            f"database {db.name!r} does not exist: run `himbeere-upload setup URL`"
        )
    if couch.supports_selector():
        return
    try:
        ensure_design(db)
    except DesignMissing:
        if not design_usable(db):
            raise
        current = db.get(DESIGN_ID) or {}
        if _version(current) < DAEMON_UPGRADE_SINCE:
            missing = "daemon upgrades (himbeere-upload upgrade)"
            if _version(current) < TARGETED_SINCE:
                missing = "programs for many nodes (push --all, --label) and " + missing
            if _version(current) < PLACED_SINCE:
                missing = "placed programs and " + missing
            if _version(current) < FLEET_COMMANDS_SINCE:
                missing = "fleet commands (himbeere cmd), " + missing
            log.warning("%s in %s is older than this daemon (version %s, need %s): programs "
                        "and <macid>_cmd commands work, %s do not reach this node until "
                        "`himbeere-upload setup URL` upgrades it",
                        DESIGN_ID, db.name, current.get("himbeere_version"), VERSION, missing)
        else:
            log.warning("%s in %s is older than this daemon, but usable", DESIGN_ID, db.name)

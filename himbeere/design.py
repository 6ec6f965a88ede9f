"""The design document of the code database, and the node's feed filter.

The filter lets through, for one node: its code documents (``type`` equal to
its MAC id, as an integer or a string), its commands (``<macid>_cmd``),
documents exporting ``global_modules`` and deletions (a deleted document has
no ``type`` left to test, so every node sees every deletion and ignores the
ones it does not know).

Apache CouchDB >= 2 gets the same rule as a ``_selector``, which it runs
2 to 10 times cheaper than JavaScript; pouchdb-server crashes on
``_selector``, so it gets the JavaScript filter.  Query parameters reach a
pouchdb-server filter parsed as JSON (``mac=1000`` arrives as a number),
hence ``String(req.query.mac)``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import defaults
from .couch import Couch, Database, Doc, FeedFilter
from .exceptions import CouchError, NotFound, Unauthorized

log = logging.getLogger(__name__)

DESIGN_ID = f"_design/{defaults.DESIGN}"
#: Bumped whenever the design document changes, so daemons and the
#: uploader know an installed copy is outdated.
VERSION = 1

NODE_FILTER = """function (doc, req) {
  if (doc._deleted) { return true; }
  var mac = String(req.query.mac);
  var type = String(doc.type);
  if (type === mac || doc.global_modules) { return true; }
  if (String(req.query.kind) === 'code') { return false; }
  return type === mac + '_cmd';
}"""


def design_doc() -> Doc:
    """The design document himbeere needs in the code database."""
    return {
        "_id": DESIGN_ID,
        "language": "javascript",
        "himbeere_version": VERSION,
        "filters": {"node": NODE_FILTER},
    }


class DesignMissing(CouchError):
    """The filter's design document is missing or outdated, and we may not fix it."""


def ensure_design(db: Database, extra: Optional[Doc] = None) -> bool:
    """Install or upgrade the design document; True if it was written.

    ``extra`` adds fields (views, ``validate_doc_update``) for the uploader.
    Raises :class:`DesignMissing` when it is needed but we lack the rights.
    """
    wanted = design_doc()
    if extra:
        wanted.update(extra)
    current = db.get(DESIGN_ID)
    if current is not None and _same(current, wanted):
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


def design_usable(db: Database) -> bool:
    """True if the installed design document has this version's filter."""
    current = db.get(DESIGN_ID)
    return current is not None and current.get("himbeere_version", 0) >= VERSION and (
        current.get("filters", {}).get("node") is not None)


def node_filter(couch: Couch, node: int, code_only: bool = False) -> FeedFilter:
    """The ``_changes`` filter for ``node``: selector or JavaScript by server."""
    if couch.supports_selector():
        types: list[Any] = [node, str(node)]
        if not code_only:
            types.append(f"{node}_cmd")
        selector = {"$or": [
            {"_deleted": True},
            {"type": {"$in": types}},
            {"global_modules": {"$exists": True}},
        ]}
        return FeedFilter(selector=selector)
    params: dict[str, Any] = {"filter": f"{defaults.DESIGN}/node", "mac": str(node)}
    if code_only:
        params["kind"] = "code"
    return FeedFilter(params=params)


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
        log.warning("%s in %s is older than this daemon, but usable", DESIGN_ID, db.name)

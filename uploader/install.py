"""``himbeere-upload setup``: everything a fleet needs on the server, idempotently.

Creates the code database, the status database (and ``_users`` where a
fresh CouchDB lacks it), installs or upgrades the design documents (feed
filter, views, ``validate_doc_update``) and adds himbeere's roles to
``_security`` of both databases.  Names and roles already in ``_security``
are kept.  Every step looks before it writes, so a second run changes
nothing and says so.
"""

from __future__ import annotations

from himbeere import defaults
from himbeere.couch import Couch, Database, Doc, design, security
from himbeere.exceptions import CouchError

from .fleet import Fleet

USERS_DB = "_users"


def setup(fleet: Fleet) -> Doc:
    """Set up ``fleet``'s server; returns ``{"changes": [...], ...}`` for the report."""
    fleet.require_admin("setup")
    couch = fleet.couch
    changes: list[str] = []
    notes: list[str] = []
    for name in (fleet.code.name, fleet.status.name):
        if couch.create_database(name):
            changes.append(f"created database {name}")
    if not couch.database(USERS_DB).exists():
        couch.create_database(USERS_DB)
        changes.append(f"created database {USERS_DB} (node users live there)")
    for db, wanted in ((fleet.code, design.design_doc()),
                       (fleet.status, design.status_design_doc())):
        _install_design(db, wanted, changes, notes)
    _limit_revisions(fleet.status, changes)
    for db in (fleet.code, fleet.status):
        current = db.security()
        wanted = security.merge_security(current, security.security_object())
        if not security.same_security(current, wanted):
            db.set_security(wanted)
            changes.append(f"set _security of {db.name}: members {security.DEPLOYER_ROLE}, "
                           f"{security.NODE_ROLE}")
    return {
        "server": fleet.server,
        "databases": [fleet.code.name, fleet.status.name],
        "design_version": design.VERSION,
        "changes": changes,
        "notes": notes,
        "changed": bool(changes),
        "admin_party": admin_party(fleet),
    }


def _limit_revisions(db: Database, changes: list[str]) -> None:
    """Keep few revisions of status documents: heartbeats rewrite them all day.

    On a server without ``_revs_limit`` (pouchdb-server) nothing is set.
    """
    current = db.revs_limit()
    if current is None or current == defaults.STATUS_REVS_LIMIT:
        return
    db.set_revs_limit(defaults.STATUS_REVS_LIMIT)
    changes.append(f"set _revs_limit of {db.name} to {defaults.STATUS_REVS_LIMIT} "
                   f"(was {current}): heartbeats rewrite its documents")


def admin_party(fleet: Fleet) -> bool:
    """Whether the server has no admin at all, so that anonymous requests are admin.

    CouchDB before 3.0 and pouchdb-server start that way ("admin party"):
    ``GET /_session`` without credentials answers with role ``_admin``.
    """
    anonymous = Couch(fleet.server, transport="requests")  # fleet.server holds no password
    try:
        roles = anonymous.session_info().get("userCtx", {}).get("roles") or []
    except CouchError:
        return False  # refused: an admin exists
    return "_admin" in roles


def _install_design(db: Database, wanted: Doc, changes: list[str], notes: list[str]) -> None:
    current = db.get(design.DESIGN_ID)
    if design.ensure_design(db, wanted=wanted):
        old = None if current is None else current.get("himbeere_version")
        verb = "installed" if current is None else (
            f"upgraded (version {old} to {design.VERSION})" if old != design.VERSION
            else "updated")
        changes.append(f"{verb} {design.DESIGN_ID} in {db.name}")
    elif current is not None and current.get("himbeere_version", 0) != design.VERSION:
        notes.append(f"{design.DESIGN_ID} in {db.name} has version "
                     f"{current.get('himbeere_version')}, newer than this uploader's "
                     f"{design.VERSION}: left as it is")

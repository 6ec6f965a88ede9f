"""``himbeere-upload provision``: a node's CouchDB user and friendly name.

The user is ``org.couchdb.user:<macid>`` in ``_users``, named by the MAC id
in decimal, with role ``himbeere-node``.  Its password comes from the Pi's
broadcast reply, or is given, or (for a new user only) is generated; an
existing node user keeps its password unless one is given.  A given password
that already works (checked by logging in as the node) changes nothing.  An
existing user *without* the node role gets it only together with a given
password: anyone may sign up in ``_users``, and a squatter's password must
not become a node's.
"""

from __future__ import annotations

from typing import Optional

from himbeere import identity
from himbeere.couch import Doc, security
from himbeere.exceptions import ConfigError, Unauthorized

from .fleet import Fleet

USERS_DB = "_users"


def provision(fleet: Fleet, node: int, name: Optional[str] = None,
              password: Optional[str] = None) -> Doc:
    """Create or update ``node``'s user (and name); returns what was done.

    The result has ``action`` (created, updated, unchanged), ``password``
    only when it was generated here (the operator must give it to the Pi)
    and ``password_source`` (given, generated, kept).
    """
    fleet.require_admin("provision")
    if node < 0:
        raise ConfigError(f"MAC id {node} is not allowed; allowed: a whole number >= 0")
    if password is not None and not password:
        raise ConfigError("password: empty; allowed: any non-empty string")
    if name is not None:
        fleet.require_database(fleet.status)
    users = fleet.couch.database(USERS_DB)
    doc = users.get(security.user_id(node))
    result: Doc = {"node": node, "user": str(node), "id": security.user_id(node)}
    if doc is None:
        source = "given" if password is not None else "generated"
        if password is None:
            password = identity.random_password(18)
            result["password"] = password
        users.save({"_id": security.user_id(node), "name": str(node), "type": "user",
                    "roles": [security.NODE_ROLE], "password": password})
        action, changed = "created", ["user", "role", "password"]
    else:
        changed = []
        roles = list(doc.get("roles") or [])
        if security.NODE_ROLE not in roles and password is None:
            # Anyone may sign up in _users: never bless a password we do not know.
            raise ConfigError(
                f"user {node} exists but is not a himbeere node (someone may have signed up "
                "with that name); give --password to give it the node role with a new password"
            )
        if security.NODE_ROLE not in roles:
            doc["roles"] = roles + [security.NODE_ROLE]
            changed.append("role")
        source = "kept"
        if password is not None:
            source = "given"
            if not password_works(fleet, node, password):
                doc["password"] = password
                changed.append("password")
        if changed:
            users.save(doc)
        action = "updated" if changed else "unchanged"
    result.update(action=action, changed=changed, password_source=source)
    if name is not None:
        result["name_action"] = fleet.set_name(node, name)
        result["name"] = name
    else:
        result["name"] = fleet.name_of(node) if fleet.status.exists() else None
    return result


def password_works(fleet: Fleet, node: int, password: str) -> bool:
    """True if ``node`` can log in with ``password``."""
    try:
        answer = fleet.couch.as_user(str(node), password).session_info()
    except Unauthorized:
        return False
    return (answer.get("userCtx") or {}).get("name") == str(node)

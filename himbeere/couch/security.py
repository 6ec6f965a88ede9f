"""Who may do what: roles, ``_security`` objects and ``validate_doc_update`` rules.

CouchDB enforces all of it, so a stolen or compromised Pi cannot make any
other Pi run code:

==================== ======================== ===================================
who                  code database            status database
==================== ======================== ===================================
server admin         everything               everything
``himbeere-deployer`` push and delete code,   read; write anything but design
                     create commands (both    documents (node names, labels)
                     kinds)
``himbeere-node``    read; add result fields  read; write its own
(name = MAC id)      to its own ``<mac>_cmd`` ``status:<mac>``, ``status:<mac>:*``,
                     documents, nothing else  ``log:<mac>:*``, ``result:*:<mac>``,
                                              ``history:<mac>``;
                                              shared ``state:*`` and ``lease:*``
                                              (a lease only in its own name,
                                              only when free, at most its ttl)
anonymous            401                      401
==================== ======================== ===================================

Fleet commands (``type: "himbeere-command"``, one document for many nodes)
are documents of the code database like any other, so only admins and
deployers create or change them; nodes never write them.  A node answers in
the status database with ``result:<command id>:<mac>``, which only that
node (and admins and deployers) may create or update: the id must end in
``:<its MAC id>`` and ``node``, if present, must be its MAC id.

Leases (``lease:*``, see :mod:`himbeere.fleet.lease`) change hands only when free:
a node writes one only when it is absent, released (``holder`` null),
expired on the server's clock (``Date.now()``, which both pouchdb-server
and CouchDB 3.5's QuickJS give a validate function), or held in the node's
own name (``<mac>`` or ``<mac>:...``).  Its ``ttl`` is at most
:data:`~himbeere.defaults.LEASE_MAX_TTL`, its ``expires`` at most ``ttl``
(that maximum if it has none) plus
:data:`~himbeere.defaults.LEASE_CLOCK_SLACK` ahead of the server's clock,
and a node deletes only a lease it holds.  So a compromised node can no
longer take over scheduling or lock an election for good; it can still
contend for a free lease like any node (see the README's security model).

Reading is decided by ``_security`` (members: the two roles; anyone else is
refused, anonymous with 401); writing by the ``validate_doc_update``
functions ``js/code_validate.js`` and ``js/status_validate.js``.  Design
documents need a server admin on both servers.

A user whose name is all digits (a MAC id) is a node, whatever its roles:
pouchdb-server 4.2.0 lets a user edit the roles of its own ``_users``
document (CouchDB refuses), so there a node could give itself
``himbeere-deployer``; it would still be held to the node's rules here.
Deployers therefore need names that are not all digits.

The functions are ES5 (``indexOf``, no ``startsWith``) because CouchDB 3 may
run them in SpiderMonkey 1.8.5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .. import defaults
from . import js

NODE_ROLE = "himbeere-node"
DEPLOYER_ROLE = "himbeere-deployer"
USER_PREFIX = "org.couchdb.user:"

#: Fields a node writes into its command documents (see ``commands.py``);
#: any other change to a command document by a node is refused.
RESULT_FIELDS = (
    "ret", "returncode", "state", "started", "finished", "duration", "node", "error",
    "truncated", "not_utf8",
)


def _preamble() -> str:
    """The start of both validate functions: who is an admin, a deployer or a node."""
    return js.load("validate_preamble.js", NODE_ROLE=json.dumps(NODE_ROLE),
                   DEPLOYER_ROLE=json.dumps(DEPLOYER_ROLE))


def code_validate() -> str:
    """``validate_doc_update`` of the code database."""
    return js.load("code_validate.js", PREAMBLE=_preamble(),
                   RESULT_FIELDS=json.dumps(list(RESULT_FIELDS)))


def status_validate() -> str:
    """``validate_doc_update`` of the status database."""
    return js.load("status_validate.js", PREAMBLE=_preamble(),
                   LEASE_MAX_TTL=json.dumps(defaults.LEASE_MAX_TTL),
                   LEASE_CLOCK_SLACK=json.dumps(defaults.LEASE_CLOCK_SLACK))


def security_object() -> dict[str, Any]:
    """``_security`` of both databases: members are the two roles, admins server admins."""
    return {
        "admins": {"names": [], "roles": ["_admin"]},
        "members": {"names": [], "roles": [DEPLOYER_ROLE, NODE_ROLE]},
    }


def merge_security(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``current`` with every name and role of ``wanted`` added (none removed)."""
    merged = json.loads(json.dumps(current or {}))
    for section in ("admins", "members"):
        have = merged.setdefault(section, {})
        if not isinstance(have, dict):
            have = merged[section] = {}
        for kind in ("names", "roles"):
            values = have.get(kind)
            values = list(values) if isinstance(values, list) else []
            values += [v for v in wanted.get(section, {}).get(kind, []) if v not in values]
            have[kind] = values
    return merged


def same_security(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when both give the same names and roles (order and empty lists aside)."""
    def norm(sec: dict[str, Any]) -> dict[str, Any]:
        sec = sec or {}
        return {s: {k: sorted(_strings((sec.get(s) or {}).get(k))) for k in ("names", "roles")}
                for s in ("admins", "members")}
    return norm(a) == norm(b)


def _strings(values: Any) -> Iterable[str]:
    return [str(v) for v in values] if isinstance(values, list) else []


def user_id(node: int) -> str:
    """The ``_users`` document id of a node: ``org.couchdb.user:<macid>``."""
    return f"{USER_PREFIX}{node}"

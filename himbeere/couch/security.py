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
                     documents, nothing else  ``log:<mac>:*``, ``result:*:<mac>``;
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

Leases (``lease:*``, see :mod:`himbeere.lease`) change hands only when free:
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
functions below.  Design documents need a server admin on both servers.

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

NODE_ROLE = "himbeere-node"
DEPLOYER_ROLE = "himbeere-deployer"
USER_PREFIX = "org.couchdb.user:"

#: Fields a node writes into its command documents (see ``commands.py``);
#: any other change to a command document by a node is refused.
RESULT_FIELDS = (
    "ret", "returncode", "state", "started", "finished", "duration", "node", "error",
    "truncated", "not_utf8",
)

_PREAMBLE = """
  var NODE = %(node)s, DEPLOYER = %(deployer)s;
  var roles = userCtx.roles || [];
  function has(role) { return roles.indexOf(role) !== -1; }
  function listed(section) {
    section = section || {};
    if ((section.names || []).indexOf(userCtx.name) !== -1) { return true; }
    var wanted = section.roles || [];
    for (var i = 0; i < wanted.length; i++) { if (has(wanted[i])) { return true; } }
    return false;
  }
  function refuse(why) { throw({forbidden: why}); }
  // A name of digits is a MAC id: a node, whatever roles it claims (see below).
  var isNode = has(NODE) || /^[0-9]+$/.test(String(userCtx.name || ''));
  if (has('_admin') || (!isNode && (has(DEPLOYER) || listed((secObj || {}).admins)))) {
    return;
  }
  if (!userCtx.name) { throw({unauthorized: 'log in to write to this database'}); }
  if (!isNode) {
    refuse('only admins, deployers (role ' + DEPLOYER + ') and nodes (role ' + NODE +
           ') may write here; ' + userCtx.name + ' has neither role');
  }
  var me = String(userCtx.name);
"""

CODE_VALIDATE = """function (newDoc, oldDoc, userCtx, secObj) {%(preamble)s
  var RESULTS = %(results)s;
  function same(a, b) {
    if (a === b) { return true; }
    if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) {
      return false;
    }
    var k;
    for (k in a) { if (!(k in b) || !same(a[k], b[k])) { return false; } }
    for (k in b) { if (!(k in a)) { return false; } }
    return true;
  }
  var mine = me + '_cmd';
  if (!oldDoc || oldDoc._deleted) {
    refuse('node ' + me + ' may not create documents: code and commands come from a deployer');
  }
  if (String(oldDoc.type) !== mine) {
    refuse('node ' + me + ' may only add results to its own commands (type ' + mine +
           '), not change ' + newDoc._id);
  }
  if (newDoc._deleted) { refuse('node ' + me + ' may not delete ' + newDoc._id); }
  if (newDoc._attachments && !same(newDoc._attachments, oldDoc._attachments)) {
    refuse('node ' + me + ' may not change attachments of ' + newDoc._id);
  }
  var key;
  for (key in newDoc) {
    if (key.charAt(0) !== '_' && RESULTS.indexOf(key) === -1 && !same(newDoc[key], oldDoc[key])) {
      refuse('node ' + me + ' may only add result fields (' + RESULTS.join(', ') +
             ') to ' + newDoc._id + ', not change ' + key);
    }
  }
  for (key in oldDoc) {
    if (key.charAt(0) !== '_' && RESULTS.indexOf(key) === -1 && !(key in newDoc)) {
      refuse('node ' + me + ' may not remove ' + key + ' from ' + newDoc._id);
    }
  }
  if (newDoc.node !== undefined && String(newDoc.node) !== me) {
    refuse('node ' + me + ' may not write node: ' + newDoc.node);
  }
}"""

STATUS_VALIDATE = """function (newDoc, oldDoc, userCtx, secObj) {%(preamble)s
  var id = String(newDoc._id);
  function starts(text, prefix) { return text.slice(0, prefix.length) === prefix; }
  function ends(text, suffix) { return text.slice(text.length - suffix.length) === suffix; }
  // A lease changes hands only when it is free, lives at most its ttl, and
  // only its holder deletes it (see himbeere/lease.py).  Times are the
  // server's: Date.now() works in pouchdb-server's and CouchDB's engines.
  function lease() {
    var MAX_TTL = %(max_ttl)s, SLACK = %(slack)s;
    var now = Date.now() / 1000;
    function num(x) { return typeof x === 'number' && isFinite(x); }
    function held(holder) { return holder !== null && holder !== undefined; }
    function ours(holder) {
      return held(holder) && (String(holder) === me || starts(String(holder), me + ':'));
    }
    var old = oldDoc && !oldDoc._deleted ? oldDoc : null;
    var oldHolder = old ? old.holder : null;
    if (newDoc._deleted) {
      // On CouchDB a deletion carries only _id, _rev and _deleted.
      if (old && !ours(oldHolder)) {
        refuse('node ' + me + ' may delete only a lease it holds; ' + id + ' is held by ' +
               oldHolder);
      }
      return;
    }
    if (held(newDoc.holder) && !ours(newDoc.holder)) {
      refuse('node ' + me + ' may take a lease only in its own name, not ' + newDoc.holder);
    }
    if (old && held(oldHolder) && !ours(oldHolder) && num(old.expires) && old.expires > now) {
      refuse('node ' + me + ' may not take ' + id + ': ' + oldHolder + ' holds it until ' +
             old.expires + ' (server clock now ' + now + '); a lease changes hands only ' +
             'when it is free or expired');
    }
    var ttl = MAX_TTL;
    if (newDoc.ttl !== undefined) {
      if (!num(newDoc.ttl) || newDoc.ttl <= 0 || newDoc.ttl > MAX_TTL) {
        refuse('lease ttl ' + newDoc.ttl + ' is not allowed; allowed: seconds > 0, at most ' +
               MAX_TTL);
      }
      ttl = newDoc.ttl;
    }
    if (newDoc.expires === undefined && !held(newDoc.holder)) { return; }
    if (!num(newDoc.expires)) {
      refuse('lease expires ' + newDoc.expires + ' is not allowed; allowed: a number, ' +
             'seconds since 1970 on the server clock');
    }
    if (newDoc.expires > now + ttl + SLACK) {
      refuse('lease expires ' + newDoc.expires + ' is too far ahead; allowed: at most ' +
             'its ttl (' + ttl + ' s) + ' + SLACK + ' s after the server clock (now ' + now + ')');
    }
  }
  var own = id === 'status:' + me || starts(id, 'status:' + me + ':') ||
    starts(id, 'log:' + me + ':') || (starts(id, 'result:') && ends(id, ':' + me));
  // Shared by design: every node contends for leases, and a program's state
  // follows it from node to node.  A node takes a lease in its own name only.
  var shared = starts(id, 'state:') || starts(id, 'lease:');
  if (!own && !shared) {
    refuse('node ' + me + ' may only write status:' + me + ', log:' + me + ':..., result:...:' +
           me + ', state:..., lease:... here, not ' + id);
  }
  if (starts(id, 'lease:')) { lease(); }
  if (!newDoc._deleted && newDoc.node !== undefined && String(newDoc.node) !== me) {
    refuse('node ' + me + ' may not write node: ' + newDoc.node);
  }
}"""


def _render(template: str) -> str:
    preamble = _PREAMBLE % {"node": json.dumps(NODE_ROLE),
                            "deployer": json.dumps(DEPLOYER_ROLE)}
    return template % {"preamble": preamble.rstrip("\n"),
                       "results": json.dumps(list(RESULT_FIELDS)),
                       "max_ttl": json.dumps(defaults.LEASE_MAX_TTL),
                       "slack": json.dumps(defaults.LEASE_CLOCK_SLACK)}


def code_validate() -> str:
    """``validate_doc_update`` of the code database."""
    return _render(CODE_VALIDATE)


def status_validate() -> str:
    """``validate_doc_update`` of the status database."""
    return _render(STATUS_VALIDATE)


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

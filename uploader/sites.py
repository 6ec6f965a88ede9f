"""Site relays: a CouchDB near a site's Pis that carries them through WAN outages.

A *site* is some nodes and their *relay*, a CouchDB server near them holding
databases of the same names as the central server's.  ``himbeere-upload
site add`` sets the relay up (:func:`uploader.install.setup`), copies the
site nodes' users with their password hashes, labels the nodes ``site=NAME``
in the central ``node:<mac>`` documents, and writes four continuous
replications into the RELAY's ``_replicator`` (the relay is the side that can
reach the centre)::

    himbeere-site-<name>-code-pull     central code db   -> relay code db
    himbeere-site-<name>-code-push     relay code db     -> central code db
    himbeere-site-<name>-status-pull   central status db -> relay status db
    himbeere-site-<name>-status-push   relay status db   -> central status db

Each has a Mango ``selector`` (:func:`selectors`), so nothing of another
site's nodes crosses the WAN, and ``lease:*`` and ``placement:*`` never do:
a lease's promise (one holder) is made by one server's validate function on
that server's clock, which two servers cannot both make across a split.
Each site elects its own scheduler and group leaders on its relay.

The registry is one document per site in the central status database,
``site:<name>`` (:func:`himbeere.schema.site_id`), without credentials.

Central tools show a node of a site whose every node fell silent at once as
``unreachable (site NAME offline since ...)`` rather than dead
(:func:`offline_sites` and :func:`mark_offline`, from :mod:`uploader.sitestate`,
used by :func:`uploader.ops.list_nodes`).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Optional

from himbeere import schema
from himbeere.couch import Couch, Doc, security
from himbeere.exceptions import ConfigError, HimbeereError, NotFound, Unreachable

from . import install, ops
from .fleet import Fleet, check_name, short_reason
from .sitestate import SITE_LABEL, SYNC_SLACK, mark_offline, offline_sites

USERS_DB = "_users"
REPLICATOR_DB = "_replicator"
#: The four replications of a site: (database, direction).
REPLICATIONS = (("code", "pull"), ("code", "push"), ("status", "pull"), ("status", "push"))
#: Fields of a ``_users`` document that make a node's password work on the relay.
USER_FIELDS = ("name", "type", "roles", "password_scheme", "pbkdf2_prf", "iterations",
               "derived_key", "salt")
#: Fields of a replication document that say what it does (CouchDB adds others).
REPLICATION_FIELDS = ("source", "target", "continuous", "selector", "himbeere_site")

__all__ = ["SITE_LABEL", "SYNC_SLACK", "add_site", "list_sites", "mark_offline",
           "offline_sites", "remove_site", "replication_docs", "selectors", "site_status"]


# -- names and ids ------------------------------------------------------------------------
def check_site_name(name: str) -> str:
    """``name`` if it may name a site (a label value and part of replication ids)."""
    try:
        return check_name(name)
    except ConfigError:
        raise ConfigError(f"site name {name!r} is not allowed; allowed: a letter, then "
                          "letters, digits, '.', '_' or '-', at most 63 characters") from None


def replication_id(name: str, database: str, direction: str) -> str:
    """``himbeere-site-<name>-<code|status>-<pull|push>``: a replication on the relay."""
    return f"himbeere-site-{name}-{database}-{direction}"


# -- what replicates ----------------------------------------------------------------------
def _alternatives(macs: Iterable[int]) -> str:
    """``(1001|1002)``: a regex group matching exactly these MAC ids."""
    return "(" + "|".join(str(mac) for mac in sorted(set(macs))) + ")"


def selectors(macs: Iterable[int]) -> dict[str, Doc]:
    """The Mango selector of each replication of a site with nodes ``macs``.

    Keys are ``"code-pull"``, ``"code-push"``, ``"status-pull"``,
    ``"status-push"``.  A deletion carries only ``_id`` and ``_deleted``, so
    a selector on ``type`` lets it pass by: status documents are matched by
    their ids, and the code pull takes every deletion (a tombstone is small,
    and a program document of the original format may have any id; a node
    follows every deletion too, see :func:`himbeere.schema.for_node`).
    """
    macs = sorted(set(macs))
    if not macs:
        raise ConfigError("a site needs at least one node")
    ids = _alternatives(macs)
    types = [*macs, *(str(mac) for mac in macs)]  # a program's type: int or digit string
    commands = [schema.commands_id(mac) for mac in macs]
    shared_code = "^(" + "|".join((schema.GLOBAL_PREFIX, schema.COMMAND_PREFIX,
                                   schema.TARGETED_PREFIX, schema.PLACED_PREFIX,
                                   schema.RELEASE_PREFIX)) + ")"
    code_pull = {"$and": [
        {"_id": {"$not": {"$regex": "^_design/"}}},
        {"$or": [
            {"type": {"$in": types}},
            {"_deleted": True},
            {"type": {"$in": commands}},
            {"_id": {"$regex": shared_code}},
            {"global_modules": {"$exists": True}},
            {"type": {"$in": [schema.COMMAND_TYPE, schema.PROGRAM_TYPE, schema.PLACED_TYPE,
                              schema.RELEASE_TYPE]}},
        ]},
    ]}
    code_push = {"$or": [
        {"type": {"$in": commands}},
        # A node resolving a conflict of its command at the relay deletes the
        # losing revision; a deleted revision has no type, and without this
        # the centre kept the conflict (found by the WAN-outage test).
        {"_deleted": True},
        {"_id": {"$regex": f"^{schema.COMMAND_PREFIX}"}},  # fleet commands written there
    ]}
    own_status = [
        {"_id": {"$regex": f"^({schema.STATUS_PREFIX}|{schema.HISTORY_PREFIX}){ids}$"}},
        {"_id": {"$regex": f"^{schema.RESULT_PREFIX}.*:{ids}$"}},
        {"_id": {"$regex": f"^{schema.LOG_PREFIX}{ids}:"}},
        {"_id": {"$regex": f"^{schema.STATE_PREFIX}"}},
    ]
    status_pull = {"$or": own_status + [
        {"_id": {"$regex": f"^{schema.NODE_PREFIX}{ids}$"}},
        {"_id": {"$regex": f"^{schema.ROLLOUT_PREFIX}"}},
    ]}
    return {"code-pull": code_pull, "code-push": code_push,
            "status-pull": status_pull, "status-push": {"$or": own_status}}


def endpoint(couch: Couch, database: str) -> Doc:
    """A replication's ``source``/``target``: ``{"url": ..., "auth": {"basic": ...}}``.

    The database URL is the server's (without credentials) and the
    database's path as :mod:`himbeere.couch` quotes it; the credentials go
    in ``auth``, CouchDB 3's form, which it keeps out of ``_scheduler/docs``.
    """
    found: Doc = {"url": couch.database_url(database)}
    if couch.auth is not None:
        found["auth"] = {"basic": {"username": couch.auth[0], "password": couch.auth[1]}}
    return found


def replication_docs(name: str, macs: Iterable[int], central: Couch, relay: Couch,
                     code_db: str, status_db: str) -> dict[str, Doc]:
    """The four replication documents of site ``name``, by id (pure)."""
    chosen = selectors(macs)
    databases = {"code": code_db, "status": status_db}
    docs = {}
    for database, direction in REPLICATIONS:
        here, there = endpoint(relay, databases[database]), endpoint(central,
                                                                     databases[database])
        source, target = (there, here) if direction == "pull" else (here, there)
        doc_id = replication_id(name, database, direction)
        docs[doc_id] = {"_id": doc_id, "source": source, "target": target, "continuous": True,
                        "selector": chosen[f"{database}-{direction}"], "himbeere_site": name}
    return docs


# -- which nodes --------------------------------------------------------------------------
def resolve_nodes(fleet: Fleet, text: str) -> tuple[list[int], Optional[str]]:
    """The MAC ids ``--nodes`` names, and the text to keep to resolve it again.

    ``text`` is comma-separated MAC ids, MAC addresses, names and labels
    (``key=value``; a node needs every label given).  The second value is
    ``text`` when it has labels (they may match other nodes later), else None.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError("--nodes is empty; allowed: MAC ids or names, or labels key=value, "
                          "separated by commas")
    labels = [part for part in parts if "=" in part]
    macs = {ops.node_id(fleet, part) for part in parts if "=" not in part}
    if labels:
        macs.update(ops.nodes_with_labels(fleet, labels))
    return sorted(macs), (",".join(parts) if labels else None)


# -- the servers --------------------------------------------------------------------------
def open_relay(url: str, central: Fleet) -> Fleet:
    """The relay, with databases named as the central's; checked: reachable, admin, CouchDB."""
    relay = Fleet(url, central.code.name, central.status.name)
    try:
        relay.require_admin("a relay")
    except HimbeereError as exc:
        raise type(exc)(f"relay: {exc}") from None
    if not relay.couch.supports_selector():
        raise ConfigError(f"relay {relay.server} is not Apache CouchDB 2 or newer; a relay "
                          "runs the replications, with selectors, so it must be one")
    if relay.server == central.server:
        raise ConfigError(f"the relay {relay.server} is the central server; a relay is "
                          "another CouchDB, near the site's nodes")
    return relay


def registry(central: Fleet) -> list[Doc]:
    """Every site's registry document, by name."""
    central.require_databases()
    rows = central.status.all_docs(startkey=schema.SITE_PREFIX,
                                   endkey=schema.SITE_PREFIX + "\ufff0", include_docs=True)
    return [row["doc"] for row in rows if row.get("doc")
            and row["doc"].get("type") == schema.SITE_TYPE]


def site_doc(central: Fleet, name: str) -> Doc:
    """Site ``name``'s registry document; NotFound naming the sites there are."""
    central.require_databases()
    doc = central.status.get(schema.site_id(check_site_name(name)))
    if doc is None or doc.get("type") != schema.SITE_TYPE:
        known = ", ".join(sorted(d["name"] for d in registry(central))) or "none yet"
        raise NotFound(f"no site is named {name!r}; sites: {known} (`himbeere-upload site "
                       "add NAME --relay URL --nodes ...` makes one)")
    return doc


# -- site add -----------------------------------------------------------------------------
def add_site(central: Fleet, name: str, relay_url: str, nodes: Optional[str] = None,
             central_url: Optional[str] = None) -> Doc:
    """Make (or bring up to date) site ``name``; returns what was done.

    ``nodes`` is ``--nodes`` (None: resolve the registry's again);
    ``central_url`` the central server as the relay reaches it (default:
    ``central``'s own URL; credentials, if it has none, ``central``'s).
    The result has ``name``, ``relay`` and ``central`` (no credentials),
    ``nodes`` (MAC ids), ``left`` (nodes no longer in the site), ``selector``,
    ``changes`` (lines saying what changed; empty: unchanged), ``changed``
    and ``server_line`` (what a site node's configuration needs).
    """
    check_site_name(name)
    central.require_admin("site add")
    central.require_databases()
    existing = central.status.get(schema.site_id(name))
    if nodes is None:
        if existing is None:
            raise ConfigError(f"site {name!r} is new: say which nodes with --nodes (MAC ids, "
                              "names or labels key=value, separated by commas)")
        nodes = existing.get("selector") or ",".join(str(m) for m in existing["nodes"])
    macs, selector = resolve_nodes(central, nodes)
    _check_members(central, name, macs)
    relay = open_relay(relay_url, central)
    seen_from_relay = _central_for_relay(central, central_url)
    if not central.couch.supports_selector():
        # Found with pouchdb-server 4.2: it answers POST _changes?filter=_selector
        # with 404, and CouchDB's replicator crashes on that ({changes_req_failed,404}).
        raise ConfigError(f"the central server {central.server} is pouchdb-server, which "
                          "cannot serve the relay's filtered pulls (_changes?filter=_selector "
                          "answers 404); a site needs Apache CouchDB centrally")
    changes: list[str] = []
    report = install.setup(relay)
    changes += [f"relay: {change}" for change in report["changes"]]
    changes += copy_users(central, relay, macs)
    changes += tune_replicator(relay.couch)
    changes += _write_replications(
        relay.couch, replication_docs(name, macs, seen_from_relay, relay.couch,
                                      central.code.name, central.status.name))
    left = sorted(set(existing.get("nodes") or []) - set(macs)) if existing else []
    changes += _label(central, name, macs, left)
    changes += _register(central, name, relay.server, macs, selector, existing)
    return {"name": name, "relay": relay.server, "central": ",".join(seen_from_relay.bases),
            "nodes": macs, "left": left, "selector": selector, "changes": changes,
            "changed": bool(changes),
            "server_line": f"server = http://MACID:PASSWORD@{_host(relay.server)},"
                           f"{seen_from_relay.bases[0] if central_url else central.server}"}


def _host(url: str) -> str:
    return url.split("://", 1)[-1]


def _check_members(central: Fleet, name: str, macs: list[int]) -> None:
    """Each node has a node user centrally and is in no other site."""
    users = central.couch.database(USERS_DB)
    docs = ops._node_docs(central)
    for mac in macs:
        if users.get(security.user_id(mac)) is None:
            raise NotFound(f"node {mac} has no user on {central.server}: `himbeere-upload "
                           f"provision {mac}` (or discover) makes one; a site's relay gets "
                           "the same user")
        other = ((docs.get(mac) or {}).get("labels") or {}).get(SITE_LABEL)
        if other and other != name:
            raise ConfigError(f"node {mac} is in site {other!r} already; `himbeere-upload "
                              f"site rm {other}` or leave it out of --nodes")


def _central_for_relay(central: Fleet, url: Optional[str]) -> Couch:
    """The central server as the relay reaches it; credentials default to ``central``'s."""
    if not url:
        return Couch(central.couch.current_url, transport="requests")
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and central.couch.auth is not None:
        user, password = (urllib.parse.quote(part, safe="") for part in central.couch.auth)
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@"
                                                            f"{parts.netloc}"))
    return Couch(url, transport="requests")


def copy_users(central: Fleet, relay: Fleet, macs: Iterable[int]) -> list[str]:
    """Copy the nodes' ``_users`` documents, password hashes included, to the relay.

    A node then logs in to the relay with the password it has.  Returns the
    changes made.
    """
    source = central.couch.database(USERS_DB)
    target = relay.couch.database(USERS_DB)
    changes = []
    for mac in macs:
        user = source.get(security.user_id(mac))
        if user is None:
            raise NotFound(f"node {mac} has no user on {central.server}")
        wanted = {field: user[field] for field in USER_FIELDS if field in user}

        def change(doc: Doc, wanted: Doc = wanted) -> bool:
            if all(doc.get(field) == wanted.get(field) for field in USER_FIELDS):
                return False
            for field in USER_FIELDS:
                doc.pop(field, None)
            doc.pop("password", None)
            doc.update(wanted)
            return True

        if target.update(security.user_id(mac), change) is not None:
            changes.append(f"relay: copied user {mac} (its password hash)")
    return changes


#: The relay's replicator settings, for a WAN link that comes and goes.  CouchDB
#: backs a crashing replication off 30 s x 2^(crashes - 1), up to 8.5 hours
#: (``couch_replicator_scheduler``), counting the crashes in a job's last
#: ``max_history`` events, and retries jobs every ``interval`` ms.  After a
#: 60 s cut, the defaults (20, 60000) took 119 s to catch a site up
#: (benchmarks/bench_sites.py); with these, 3.0 s -- and after a day's outage no longer,
#: where the defaults would wait up to 8.5 hours.  The cost: a relay whose
#: WAN is down tries every 5 s, one small request per replication.
REPLICATOR_SETTINGS = {"max_history": "1", "interval": "5000"}


def tune_replicator(couch: Couch) -> list[str]:
    """Set :data:`REPLICATOR_SETTINGS` on the relay; what changed."""
    changes = []
    for key, value in REPLICATOR_SETTINGS.items():
        before = couch.configure("replicator", key, value)
        if before != value:
            changes.append(f"relay: replicator {key} = {value} (was {before or 'the default'})")
    return changes


def _write_replications(couch: Couch, wanted: Mapping[str, Doc]) -> list[str]:
    replicator = couch.database(REPLICATOR_DB)
    changes = []
    for doc_id, doc in wanted.items():
        verb = {"value": "wrote"}

        def change(current: Doc, doc: Doc = doc, verb: dict[str, str] = verb) -> bool:
            if all(current.get(field) == doc[field] for field in REPLICATION_FIELDS):
                return False
            verb["value"] = "rewrote" if "_rev" in current else "wrote"
            for field in list(current):
                if not field.startswith("_") or field.startswith("_replication"):
                    current.pop(field)
            current.update({k: v for k, v in doc.items() if k != "_id"})
            return True

        if replicator.update(doc_id, change) is not None:
            changes.append(f"relay: {verb['value']} replication {doc_id}")
    return changes


def _label(central: Fleet, name: str, macs: list[int], left: list[int]) -> list[str]:
    changes = []
    for mac in macs:
        before = ops._node_docs(central).get(mac) or {}
        if (before.get("labels") or {}).get(SITE_LABEL) != name:
            ops.set_labels(central, mac, **{SITE_LABEL: name})
            changes.append(f"labelled node {mac} {SITE_LABEL}={name}")
    for mac in left:
        ops.set_labels(central, mac, **{SITE_LABEL: ""})
        changes.append(f"node {mac} left the site: removed its label {SITE_LABEL}={name}")
    return changes


def _register(central: Fleet, name: str, relay: str, macs: list[int],
              selector: Optional[str], existing: Optional[Doc]) -> list[str]:
    wanted = {"type": schema.SITE_TYPE, "name": name, "relay": relay, "nodes": macs,
              "selector": selector}

    def change(doc: Doc) -> bool:
        if all(doc.get(key) == value for key, value in wanted.items()):
            return False
        doc.update(wanted)
        doc.setdefault("created", schema.iso())
        return True

    if central.status.update(schema.site_id(name), change) is None:
        return []
    verb = "updated" if existing else "registered"
    return [f"{verb} {schema.site_id(name)} in {central.status.name}"]


# -- site ls, status ----------------------------------------------------------------------
def relay_couch(doc: Doc, central: Fleet, relay_url: Optional[str] = None) -> Couch:
    """The relay of registry document ``doc``: ``relay_url`` (with credentials), else the
    registry's URL with the central server's credentials (often the same admin)."""
    if relay_url:
        return Couch(relay_url, transport="requests")
    couch = Couch(doc["relay"], transport="requests")
    if central.couch.auth is None:
        return couch
    return couch.as_user(*central.couch.auth)


def replication_states(couch: Couch, name: str) -> dict[str, Optional[Doc]]:
    """Each replication of site ``name`` as the relay's scheduler sees it (None: no such
    document).  Raises :class:`Unreachable` and the like when the relay does not answer."""
    answer = couch.request("GET", f"_scheduler/docs/{REPLICATOR_DB}")
    found = {str(doc.get("doc_id")): doc for doc in (answer or {}).get("docs") or []}
    return {replication_id(name, db, direction): found.get(replication_id(name, db, direction))
            for db, direction in REPLICATIONS}


def summarize_replication(doc_id: str, scheduled: Optional[Doc]) -> Doc:
    """One replication for ``site status``: ``state``, ``last_sync``, ``error``, ``lag``."""
    if scheduled is None:
        return {"id": doc_id, "state": "missing", "last_sync": None, "error": None,
                "lag": None, "docs_written": None}
    info = scheduled.get("info") if isinstance(scheduled.get("info"), dict) else {}
    error = info.get("error") if info else None
    return {"id": doc_id, "state": scheduled.get("state") or "-",
            "last_sync": scheduled.get("last_updated"),
            "error": error or scheduled.get("error") or None,
            "lag": (info or {}).get("changes_pending"),
            "docs_written": (info or {}).get("docs_written")}


def site_status(central: Fleet, name: str, relay_url: Optional[str] = None) -> Doc:
    """Site ``name``: its registry fields, ``replications`` (see
    :func:`summarize_replication`; empty with ``relay_error`` when the relay does
    not answer) and ``node_list`` (each node's :func:`uploader.ops.list_nodes` entry)."""
    doc = site_doc(central, name)
    result = _public(doc)
    result["replications"], result["relay_error"] = [], None
    try:
        states = replication_states(relay_couch(doc, central, relay_url), doc["name"])
        result["replications"] = [summarize_replication(k, v) for k, v in states.items()]
    except (HimbeereError, OSError) as exc:
        result["relay_error"] = _relay_error(exc)
    members = set(doc.get("nodes") or [])
    result["node_list"] = [n for n in ops.list_nodes(central) if n["node"] in members]
    return result


def list_sites(central: Fleet) -> list[Doc]:
    """Every site: registry fields, ``state`` (``running``, ``3 running, 1 crashing``,
    or ``relay unreachable``, the last with ``relay_error``)."""
    sites = []
    for doc in sorted(registry(central), key=lambda d: str(d.get("name"))):
        entry = _public(doc)
        entry["relay_error"] = None
        try:
            states = replication_states(relay_couch(doc, central), doc["name"])
            entry["state"] = _states_text(summarize_replication(k, v)["state"]
                                          for k, v in states.items())
        except (HimbeereError, OSError) as exc:
            entry["state"] = "relay unreachable"
            entry["relay_error"] = _relay_error(exc)
        sites.append(entry)
    return sites


def _states_text(states: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))


def _public(doc: Doc) -> Doc:
    return {"name": doc.get("name"), "relay": doc.get("relay"),
            "nodes": list(doc.get("nodes") or []), "selector": doc.get("selector"),
            "created": doc.get("created")}


def _relay_error(exc: BaseException) -> str:
    return short_reason(exc) if isinstance(exc, (Unreachable, OSError)) else str(exc)


# -- site rm ------------------------------------------------------------------------------
def remove_site(central: Fleet, name: str, relay_url: Optional[str] = None) -> Doc:
    """Delete site ``name``'s replications on the relay, its registry document and the
    nodes' ``site`` label; the relay's databases stay.  Returns ``changes``."""
    central.require_admin("site rm")
    doc = site_doc(central, name)
    changes = []
    couch = relay_couch(doc, central, relay_url)
    replicator = couch.database(REPLICATOR_DB)
    try:
        for db, direction in REPLICATIONS:
            current = replicator.get(replication_id(name, db, direction))
            if current is not None:
                replicator.delete(current)
                changes.append(f"relay: deleted replication {current['_id']}")
    except (HimbeereError, OSError) as exc:
        raise type(exc)(f"relay {doc['relay']}: {_relay_error(exc)}; nothing removed "
                        "(give --relay URL with the relay admin's credentials)") from None
    for mac in doc.get("nodes") or []:
        labels = (ops._node_docs(central).get(mac) or {}).get("labels") or {}
        if labels.get(SITE_LABEL) == name:
            ops.set_labels(central, mac, **{SITE_LABEL: ""})
            changes.append(f"removed label {SITE_LABEL}={name} of node {mac}")
    central.status.delete(doc)
    changes.append(f"deleted {doc['_id']} from {central.status.name}")
    return {"name": name, "relay": doc["relay"], "changes": changes}

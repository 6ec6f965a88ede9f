"""The server and its two databases, and how nodes are named.

A node is its MAC id, in decimal (``202481587074134``) or as a MAC address
(``b8:27:eb:12:34:56``), or a friendly name.  Names live in the status
database, one document per named node::

    {"_id": "node:202481587074134", "type": "himbeere-node",
     "node": 202481587074134, "name": "kitchen"}

and are looked up through the ``names`` view of its design document.  The
status database, not the code database: every node filters the code
database's feed, and a name is nothing a node runs.  Only admins and
deployers may write them (see :mod:`himbeere.security`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from himbeere import defaults
from himbeere.couch import Couch, Database, Doc
from himbeere.exceptions import ConfigError, CouchError, NotFound, Unauthorized, Unreachable
from himbeere.schema import node_id

NAME_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")
MAC_ADDRESS = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
NODE_DOC_TYPE = "himbeere-node"


def parse_mac(text: str) -> Optional[int]:
    """The MAC id ``text`` names, or None if it is not one (then it is a name)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if MAC_ADDRESS.match(text):
        return int(re.sub("[:-]", "", text), 16)
    return None


def check_name(name: str) -> str:
    if not NAME_RULE.match(name):
        raise ConfigError(
            f"name {name!r} is not allowed; allowed: a letter, then letters, digits, "
            "'.', '_' or '-', at most 63 characters"
        )
    return name


def short_reason(exc: BaseException) -> str:
    """``Connection refused`` out of a requests/urllib3 error chain."""
    text = str(exc)
    cause = exc.__cause__
    while cause is not None:  # couch.py cuts its message; the cause has it all
        text += " " + str(cause)
        cause = cause.__cause__
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip().rstrip(".")
    for known in ("timed out", "Name or service not known", "Connection refused"):
        if known in text:
            return known
    return str(exc).split(": ", 1)[-1][:160]


def parse_labels(labels: Union[Mapping[str, str], Iterable[str]]) -> dict[str, str]:
    """``["room=lab", "rack=2"]`` (or a mapping) as a dict; keys are checked."""
    if isinstance(labels, Mapping):
        pairs = [(str(k), "" if v is None else str(v)) for k, v in labels.items()]
    else:
        pairs = []
        for text in labels:
            key, sep, value = str(text).partition("=")
            if not sep:
                raise ConfigError(f"label {text!r} is not allowed; allowed: key=value "
                                  "(key=, with nothing after =, removes a label)")
            pairs.append((key.strip(), value.strip()))
    result = {}
    for key, value in pairs:
        try:
            check_name(key)
        except ConfigError:
            raise ConfigError(f"label key {key!r} is not allowed; allowed: a letter, then "
                              "letters, digits, '.', '_' or '-'") from None
        result[key] = value
    return result


class Fleet:
    """A CouchDB server (admin or deployer credentials in the URL) and its databases."""

    def __init__(self, url: str, database: str = defaults.DATABASE,
                 status_database: Optional[str] = None) -> None:
        # requests, not the daemon's http.client: proxies and certifi on laptops
        self.couch = Couch(url, transport="requests")
        self.code = self.couch.database(database)
        self.status = self.couch.database(status_database
                                          or database + defaults.STATUS_SUFFIX)
        self._session: Optional[Doc] = None

    @property
    def server(self) -> str:
        """The server's URL without credentials: safe to print.

        Every URL of a list of servers (a cluster), separated by commas.
        """
        return ",".join(self.couch.bases)

    # -- who we are -------------------------------------------------------------------
    def session(self) -> Doc:
        """``_session``'s user context; raises clear errors for the usual mistakes."""
        if self._session is None:
            try:
                answer = self.couch.session_info()
            except Unreachable as exc:
                reason = short_reason(exc)
                if reason == "timed out" and self.server.startswith("https://"):
                    # Apache CouchDB does not answer a TLS hello on its plain port:
                    # the handshake waits out the timeout, with no TLS error to show.
                    reason += "; if the server speaks plain HTTP there, use http:// instead"
                raise Unreachable(
                    f"cannot reach the CouchDB server at {self.server}: {reason}"
                ) from None
            except Unauthorized as exc:
                if self.couch.auth is None:
                    raise Unauthorized(
                        f"{self.server} refuses anonymous requests: put a name and password "
                        "in the URL, http://USER:PASSWORD@host:5984"
                    ) from None
                user = self.couch.auth[0]
                raise Unauthorized(
                    f"wrong credentials: {self.server} refused user {user!r} "
                    f"({str(exc).split(': ', 2)[-1]})"
                ) from None
            except CouchError as exc:
                raise CouchError(
                    f"{self.server} does not answer like a CouchDB server ({exc})"
                ) from None
            if not isinstance(answer, dict):
                raise CouchError(f"{self.server} does not answer like a CouchDB server")
            self._session = answer.get("userCtx") or {}
        return self._session

    @property
    def user(self) -> Optional[str]:
        return self.session().get("name")

    def is_admin(self) -> bool:
        return "_admin" in (self.session().get("roles") or [])

    def require_admin(self, action: str) -> None:
        """Raise :class:`Unauthorized` unless we are a server admin."""
        if self.is_admin():
            return
        who = f"user {self.user!r} is" if self.user else "anonymous requests are"
        raise Unauthorized(
            f"{action} needs a server admin, and {who} not one: put an admin's name and "
            f"password in the URL (http://USER:PASSWORD@{self.server.split('://', 1)[-1]})"
        )

    def require_databases(self) -> None:
        """Both databases exist and we may read them; else a clear error with a hint."""
        self.session()
        for db in (self.code, self.status):
            self.require_database(db)

    def require_database(self, db: Database) -> None:
        try:
            exists = db.exists()
        except Unauthorized:
            who = f"user {self.user!r}" if self.user else "an anonymous client"
            raise Unauthorized(
                f"{who} may not read database {db.name!r} on {self.server}: use an admin "
                "or a user with role himbeere-deployer"
            ) from None
        if not exists:
            raise NotFound(
                f"database {db.name!r} does not exist on {self.server}: run "
                f"`himbeere-upload setup {self.server}` first"
            )

    # -- nodes ------------------------------------------------------------------------
    def resolve_node(self, text: str) -> int:
        """The MAC id of ``text``: a MAC id, a MAC address or a friendly name."""
        node = parse_mac(text)
        if node is not None:
            return node
        found = self.node_named(text)
        if found is None:
            names = sorted(self.names().values())
            known = ", ".join(names) if names else "none yet"
            raise NotFound(
                f"no node is named {text!r}; known names: {known} "
                "(or give a MAC id; `himbeere-upload provision MACID --name NAME` names one)"
            )
        return found

    def node_named(self, name: str) -> Optional[int]:
        rows = self._names_view(key=name)
        return int(rows[0]["value"]) if rows else None

    def names(self) -> dict[int, str]:
        """Every named node: MAC id -> name."""
        return {int(row["value"]): str(row["key"]) for row in self._names_view()}

    def name_of(self, node: int) -> Optional[str]:
        doc = self.status.get(node_id(node))
        return doc.get("name") if doc else None

    def set_name(self, node: int, name: str) -> str:
        """Give ``node`` the name ``name``; returns ``unchanged``, ``named`` or ``renamed``."""
        check_name(name)
        if parse_mac(name) is not None:
            raise ConfigError(f"name {name!r} looks like a MAC address; pick another")
        owner = self.node_named(name)
        if owner is not None and owner != node:
            raise ConfigError(f"name {name!r} is taken by node {owner}; pick another")
        outcome = {"value": "unchanged"}

        def change(doc: Doc) -> bool:
            if doc.get("name") == name and doc.get("type") == NODE_DOC_TYPE:
                return False
            outcome["value"] = "renamed" if doc.get("name") else "named"
            doc.update(type=NODE_DOC_TYPE, node=node, name=name)
            return True

        self.status.update(node_id(node), change)
        return outcome["value"]

    def _names_view(self, **params: Any) -> list[Doc]:
        try:
            return self.status.view(defaults.DESIGN, "names", **params)
        except NotFound:
            raise NotFound(
                f"database {self.status.name!r} has no names view: run "
                f"`himbeere-upload setup {self.server}`"
            ) from None

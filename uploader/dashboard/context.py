"""Who is asking, and what a request may do: the dashboard's request helpers.

Each request is answered *as its user*: a signed-in user's own
:class:`~uploader.fleet.Fleet` (their name and password, kept server-side,
see :mod:`.sessions`); a script's ``Authorization: Basic`` header on
``/api/`` and ``/metrics`` (Prometheus); or, for nobody, an anonymous
client.  CouchDB then applies its own rules: when the databases require a
login, an anonymous request is refused there and the dashboard asks to sign
in; it shows nothing it did not get from CouchDB as that user.

Every POST needs the session's CSRF token, in the form field ``csrf_token``
or the header ``X-CSRF-Token``.  The one exception is a script on ``/api/``
that sends its own basic auth *and* ``Content-Type: application/json``: a
browser never sends that cross-site without a CORS preflight, which this
app never grants.

The factory (:mod:`.app`) installs :func:`identify` and :func:`check_csrf`
before every request; the blueprints (:mod:`.pages`, :mod:`.api`) and the
error handlers (:mod:`.errors`) use the rest.
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.parse
from typing import Any, Optional

from flask import Response, current_app, g, jsonify, render_template, request, session

from himbeere import defaults
from himbeere.couch import Couch, security

from ..fleet import Fleet
from . import sessions
from .live import KEEPALIVE, LiveHub

log = logging.getLogger(__name__)

#: The key of the :class:`Dashboard` in ``app.extensions``.
EXTENSION = "himbeere"
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
#: Prometheus scrapes here (:mod:`.metrics`); it reads text, never a page.
METRICS_PATH = "/metrics"


class Dashboard:
    """What one dashboard app knows: the server, the databases, who is signed in."""

    def __init__(self, server_url: str, database: str,
                 status_database: Optional[str] = None) -> None:
        server = Couch(server_url)
        if server.auth is not None:
            log.warning("the dashboard ignores the credentials in its server URL: every "
                        "user signs in with their own")
        self.server = Couch(",".join(server.bases), transport="requests")
        self.database = database
        self.status_database = status_database or database + defaults.STATUS_SUFFIX
        self.sessions = sessions.SessionStore()
        self.hub = LiveHub()
        #: Seconds between keep-alive comments on an idle event stream.
        self.keepalive = KEEPALIVE

    def fleet_as(self, name: Optional[str] = None, password: str = "") -> Fleet:
        """The fleet as user ``name`` (anonymous without one)."""
        couch = self.server.as_user(name, password) if name else self.server
        return Fleet(couch.url, self.database, self.status_database)


def dashboard() -> Dashboard:
    board: Dashboard = current_app.extensions[EXTENSION]
    return board


# -- who is asking ----------------------------------------------------------------------
def identify() -> None:
    """Set ``g.login`` (signed-in user or None), ``g.fleet`` and ``g.basic``."""
    board = dashboard()
    g.basic = False
    g.login = board.sessions.get(session.get("sid"))
    if g.login is None and "sid" in session:
        session.pop("sid")
    credentials = basic_auth()
    if credentials is not None and for_machines():
        g.basic = True
        g.fleet = board.fleet_as(*credentials)
    elif g.login is not None:
        g.fleet = g.login.fleet
    else:
        g.fleet = board.fleet_as()


def basic_auth() -> Optional[tuple[str, str]]:
    header = request.headers.get("Authorization", "")
    kind, _, encoded = header.partition(" ")
    if kind.lower() != "basic" or not encoded:
        return None
    try:
        name, sep, password = base64.b64decode(encoded).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (name, password) if sep and name else None


def is_api() -> bool:
    return request.path.startswith("/api/")


def is_metrics() -> bool:
    return request.path == METRICS_PATH


def for_machines() -> bool:
    """A script or Prometheus asks: basic auth counts, and no error is a page or redirect."""
    return is_api() or is_metrics()


def user_name() -> Optional[str]:
    if g.get("login") is not None:
        return str(g.login.name)
    fleet = g.get("fleet")
    if g.get("basic") and fleet is not None and fleet.couch.auth:
        return str(fleet.couch.auth[0])
    return None


# -- CSRF -------------------------------------------------------------------------------
def csrf_token() -> str:
    """The session's CSRF token (made on first use)."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = sessions.new_token()
    return str(token)


def check_csrf() -> Optional[Response]:
    if request.method not in UNSAFE_METHODS:
        return None
    if g.basic and request.mimetype == "application/json":
        return None  # a script with its own credentials; see the module docstring
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token")
    if sessions.same_token(session.get("csrf"), given):
        return None
    log.info("refused %s %s: CSRF token missing or wrong", request.method, request.path)
    return error_response(403, "CSRF token missing or wrong: reload the page and try again")


# -- answers ----------------------------------------------------------------------------
def error_response(status: int, message: str) -> Response:
    """JSON on ``/api/``, one line of text on ``/metrics``, the error page elsewhere."""
    if is_api():
        response = jsonify({"ok": False, "error": message})
    elif is_metrics():
        response = Response(message + "\n", mimetype="text/plain")
        if status == 401:  # a person opening /metrics gets the browser's password prompt
            response.headers["WWW-Authenticate"] = 'Basic realm="himbeere metrics"'
    else:
        response = Response(render_template("error.html", status=status, message=message))
        response.mimetype = "text/html"
    response.status_code = status
    return response


def may_act() -> bool:
    """False for a node signed in: CouchDB refuses its commands and program actions.

    The same rule as the databases' ``validate_doc_update``: a name of digits
    or the node role makes a node, whatever else it has, unless it is a
    server admin.  The pages then leave out the controls; the API still
    goes to CouchDB, which still refuses.
    """
    login = g.get("login")
    if login is None:
        return True
    roles = login.roles
    node = security.NODE_ROLE in roles or str(login.name).isdigit()
    return "_admin" in roles or not node


def template_globals() -> dict[str, Any]:
    board = dashboard()
    return {
        "csrf_token": csrf_token,
        "may_act": may_act(),
        "user": user_name(),
        "server": board.server.base,
        "database": board.database,
        "status_database": board.status_database,
    }


def safe_next(target: Optional[str]) -> str:
    """``target`` if it is a path on this site, else ``/`` (no open redirect)."""
    if not target:
        return "/"
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target:
        return "/"
    return target

"""The Flask application: who is asking, CSRF, errors, security headers.

Each request is answered *as its user*: a signed-in user's own
:class:`~uploader.fleet.Fleet` (their name and password, kept server-side,
see :mod:`.sessions`); a script's ``Authorization: Basic`` header on
``/api/``; or, for nobody, an anonymous client.  CouchDB then applies its
own rules: when the databases require a login, an anonymous request is
refused there and the dashboard asks to sign in; it shows nothing it did
not get from CouchDB as that user.

Every POST needs the session's CSRF token, in the form field ``csrf_token``
or the header ``X-CSRF-Token``.  The one exception is a script on ``/api/``
that sends its own basic auth *and* ``Content-Type: application/json``: a
browser never sends that cross-site without a CORS preflight, which this
app never grants.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import urllib.parse
from typing import Any, Optional, Union

from flask import (
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from himbeere import defaults
from himbeere.couch import Couch
from himbeere.exceptions import ConfigError, CouchError, NotFound, Unauthorized, Unreachable

from ..fleet import Fleet
from . import sessions
from .live import KEEPALIVE, LiveHub

log = logging.getLogger(__name__)

EXTENSION = "himbeere"
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")

#: No inline script or style, nothing from elsewhere: the pages work offline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


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


def create_app(server_url: str, database: str = defaults.DATABASE,
               status_database: Optional[str] = None,
               secret_key: Optional[Union[str, bytes]] = None) -> Flask:
    """The dashboard for the fleet of ``database`` on the CouchDB at ``server_url``.

    ``secret_key`` signs the session cookie; without one a random key is
    made, so every user signs in again after a restart (as they must
    anyway: passwords are kept in memory only).
    """
    from . import api, pages

    app = Flask(__name__)
    app.secret_key = secret_key or secrets.token_bytes(32)
    app.config.update(
        SESSION_COOKIE_NAME="himbeere_dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep ops' field order
    app.extensions[EXTENSION] = Dashboard(server_url, database, status_database)
    app.before_request(identify)
    app.before_request(check_csrf)
    app.after_request(security_headers)
    app.register_error_handler(CouchError, couch_error)
    app.register_error_handler(ConfigError, config_error)
    app.register_error_handler(HTTPException, http_error)
    app.context_processor(template_globals)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(api.blueprint)
    return app


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
    if credentials is not None and is_api():
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


# -- errors -----------------------------------------------------------------------------
def error_response(status: int, message: str) -> Response:
    if is_api():
        response = jsonify({"ok": False, "error": message})
    else:
        response = Response(render_template("error.html", status=status, message=message))
        response.mimetype = "text/html"
    response.status_code = status
    return response


def couch_error(exc: CouchError) -> Any:
    if isinstance(exc, Unauthorized):
        return unauthorized(exc)
    if isinstance(exc, NotFound):
        return error_response(404, str(exc))
    if isinstance(exc, Unreachable):
        return error_response(503, f"the CouchDB server is unreachable: {exc}")
    log.warning("CouchDB error on %s %s: %s", request.method, request.path, exc)
    return error_response(502, f"CouchDB answered with an error: {exc}")


def unauthorized(exc: Unauthorized) -> Any:
    """Anonymous: sign in.  A user whose credentials stopped working: sign in again.

    A user CouchDB refuses a database or an action: 403 with CouchDB's reason.
    """
    board = dashboard()
    login = g.get("login")
    if g.get("basic"):
        return error_response(401, str(exc))
    if login is not None and credentials_work(login):
        return error_response(403, str(exc))
    if login is not None:
        board.sessions.remove(session.pop("sid", None))
        g.login = None
    if is_api():
        return error_response(401, "sign in first: POST /login, or send basic auth")
    target = request.full_path if request.method == "GET" else "/"
    return redirect(url_for("pages.login", next=target.rstrip("?")))


def credentials_work(login: sessions.Login) -> bool:
    try:
        context = (login.fleet.couch.session_info() or {}).get("userCtx") or {}
    except Unauthorized:
        return False
    return context.get("name") == login.name


def config_error(exc: ConfigError) -> Response:
    return error_response(400, str(exc))


def http_error(exc: HTTPException) -> Any:
    if not is_api():
        return exc
    return error_response(exc.code or 500, exc.description or exc.name)


# -- responses --------------------------------------------------------------------------
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype in ("text/html", "application/json"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def template_globals() -> dict[str, Any]:
    board = dashboard()
    return {
        "csrf_token": csrf_token,
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

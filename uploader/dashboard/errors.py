"""The dashboard's error handlers: a JSON error on ``/api/``, an error page elsewhere.

A refusal by CouchDB decides between signing in (again) and 403; see
:func:`unauthorized`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, g, redirect, request, session, url_for
from werkzeug.exceptions import HTTPException

from himbeere.exceptions import ConfigError, CouchError, NotFound, Unauthorized, Unreachable

from . import sessions
from .context import dashboard, error_response, is_api

log = logging.getLogger(__name__)


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

"""The dashboard's error handlers: a JSON error on ``/api/``, an error page elsewhere.

A refusal by CouchDB decides between signing in (again) and 403; see
:func:`unauthorized`.  A server that cannot be reached is said in one line
of words (:func:`unreachable_message`), never in urllib3's.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

from flask import Response, g, redirect, request, session, url_for
from werkzeug.exceptions import HTTPException

from himbeere.exceptions import ConfigError, CouchError, NotFound, Unauthorized, Unreachable

from . import sessions
from .context import dashboard, error_response, is_api, is_metrics

log = logging.getLogger(__name__)


def couch_error(exc: CouchError) -> Any:
    if isinstance(exc, Unauthorized):
        return unauthorized(exc)
    if isinstance(exc, NotFound):
        return error_response(404, str(exc))
    if isinstance(exc, Unreachable):
        return error_response(503, unreachable_message(exc))
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
    if is_metrics():
        return error_response(401, "sign in first: send basic auth (a CouchDB user who may "
                                   "read the status database)")
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


# -- a server that cannot be reached ------------------------------------------------------
def unreachable_message(exc: Unreachable) -> str:
    """``cannot reach the CouchDB server at http://...: connection refused``.

    The dashboard talks to CouchDB through ``requests``, whose errors read
    like ``HTTPConnectionPool(host=..., port=...): Max retries exceeded
    with url: /_session (Caused by NewConnectionError(...))``; the socket
    error at the bottom of that chain says what happened in words.
    """
    servers = ", ".join(dashboard().server.bases)
    return f"cannot reach the CouchDB server at {servers}: {unreachable_reason(exc)}"


def unreachable_reason(exc: BaseException) -> str:
    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "no such host (the name does not resolve)"
        if isinstance(cause, ConnectionResetError):
            return "the connection was reset"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({getattr(cause, 'reason', None) or cause.__class__.__name__})"
        if isinstance(cause, (socket.timeout, TimeoutError)) or "Timeout" in type(cause).__name__:
            return "no answer in time"
        if type(cause) is OSError and cause.strerror:  # no route to host, network unreachable
            return str(cause.strerror).lower()
    # Not a socket error (a feed that broke, every server of a cluster): our own words.
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(" (Caused by ")[0][:200]


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, urllib3's ``reason`` and wrapped arguments included."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        cause = todo.pop(0)
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        todo += [cause.__cause__, cause.__context__, getattr(cause, "reason", None),
                 *cause.args]

"""The dashboard's Flask application factory: settings, hooks, error handlers, blueprints.

Who is asking and CSRF are in :mod:`.context`, the error handlers in
:mod:`.errors`, the pages and the JSON API in :mod:`.pages` and :mod:`.api`.
Prometheus scrapes :mod:`.metrics`.  This module imports them all; none of
them imports it.
"""

from __future__ import annotations

import secrets
from typing import Optional, Union

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from himbeere import defaults
from himbeere.exceptions import ConfigError, CouchError

from . import api, errors, metrics, pages, rollouts
from .context import EXTENSION, Dashboard, check_csrf, identify, template_globals

#: No inline script or style, nothing from elsewhere: the pages work offline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(server_url: str, database: str = defaults.DATABASE,
               status_database: Optional[str] = None,
               secret_key: Optional[Union[str, bytes]] = None) -> Flask:
    """The dashboard for the fleet of ``database`` on the CouchDB at ``server_url``.

    ``secret_key`` signs the session cookie; without one a random key is
    made, so every user signs in again after a restart (as they must
    anyway: passwords are kept in memory only).
    """
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
    app.register_error_handler(CouchError, errors.couch_error)
    app.register_error_handler(ConfigError, errors.config_error)
    app.register_error_handler(HTTPException, errors.http_error)
    app.context_processor(template_globals)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(rollouts.blueprint)
    return app


# -- every response -------------------------------------------------------------------
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype in ("text/html", "application/json"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response

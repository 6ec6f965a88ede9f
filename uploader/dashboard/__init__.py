"""The web dashboard: ``himbeere dashboard [--port 8080] [--host 127.0.0.1]``.

A Flask app that shows the fleet, one node, and fleet commands, live.

============== ==============================================================
``app``        the Flask app factory: settings, hooks, error handlers, blueprints
``context``    who is asking (session, basic auth), CSRF, error answers
``errors``     error handlers: sign in (again), 403, 404, 502, 503
``sessions``   signing in with CouchDB credentials; server-side sessions
``pages``      the HTML pages, signing in and out
``api``        the JSON API (``/api/...``) and the event stream
``payloads``   what a page embeds and the API answers: nodes, a node, a command
``metrics``    ``/metrics`` for Prometheus, read from the fleet at each scrape
``live``       the status database's ``_changes``, fanned out to browsers
``templates/`` Jinja templates; ``static/`` plain JavaScript and CSS (no build
               step and nothing fetched from elsewhere: a Pi lab has no internet)
============== ==============================================================

Everything it shows it reads from CouchDB as the signed-in user, through
:mod:`uploader.ops` (which goes through :mod:`himbeere.couch`).  Flask is
imported only when the dashboard runs, so ``himbeere`` itself works without
it (``pip install 'himbeerecouch[dashboard]'``, which brings Flask and
``prometheus_client``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"


def create_app(server_url: str, database: str = "raspberries",
               status_database: Optional[str] = None,
               secret_key: Optional[Union[str, bytes]] = None) -> Flask:
    """The dashboard's Flask app; see :func:`uploader.dashboard.app.create_app`."""
    from .app import create_app as make

    return make(server_url, database, status_database, secret_key)


def register(sub: Any) -> None:
    """Add the ``dashboard`` subcommand to ``himbeere``'s subparsers ``sub``."""
    parser = sub.add_parser("dashboard", help="serve the web dashboard",
                            description=serve.__doc__)
    group = parser.add_argument_group("server (flags win over HIMBEERE_* variables)")
    group.add_argument("--server", metavar="URL",
                       help="the CouchDB server, http://host:5984 (or HIMBEERE_SERVER); "
                            "users sign in with their own CouchDB name and password")
    group.add_argument("--database", metavar="NAME",
                       help="code database (HIMBEERE_DATABASE, default raspberries)")
    group.add_argument("--status-database", metavar="NAME",
                       help="status database (HIMBEERE_STATUS_DATABASE, default "
                            "<database>_status)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Serve the web dashboard: the fleet, one node, commands, live.

    Users sign in with their CouchDB name and password, and see and do what
    CouchDB lets them.  Without TLS in front, passwords cross the network in
    clear: keep the default loopback address, or put a TLS proxy before it.
    """
    from werkzeug.serving import make_server

    from himbeere.exceptions import ConfigError

    from ..cli import settings

    config = settings(args, os.environ)
    if not 0 < args.port < 65536:
        raise ConfigError(f"port {args.port} is not allowed; allowed: 1 to 65535")
    app = create_app(config.server or "", config.database, config.status_db)
    _setup_logging(getattr(args, "debug", False))
    server = make_server(args.host, args.port, app, threaded=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"himbeere dashboard on http://{shown}:{server.server_port}/ for "
          f"{','.join(app.extensions['himbeere'].server.bases)} (databases {config.database}, "
          f"{config.status_db}); Ctrl-C stops it", file=sys.stderr)
    if not _loopback(args.host):
        print("warning: listening beyond this machine without TLS: passwords cross the "
              "network in clear", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.extensions["himbeere"].hub.close()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _setup_logging(debug: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                            format="%(asctime)s dashboard %(levelname)s %(message)s")

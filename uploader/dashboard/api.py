"""The JSON API, for the pages and for scripts, and the live event stream.

=========================================== ===========================================
``GET /api/nodes``                          every node (``{"nodes": [...], ...}``)
``GET /api/nodes/<node>``                   one node: programs, status, commands
``GET /api/nodes/<node>/logs``              log lines (``program``, ``after``, ``limit``)
``GET /api/nodes/<node>/history``           the last day of health, as chart columns
``GET /api/history``                        one figure (``figure``) of every node's day,
                                            or of ``node`` (repeatable): the sparklines
``POST /api/nodes/<node>/programs``         ``{"program", "action": stop|start|restart}``
``GET /api/programs/<name>``                one program: where it runs, releases, rollouts
``GET /api/commands``                       the latest fleet commands (``limit``)
``POST /api/commands``                      ``{"cmd", "targets", "labels", "timeout"}``
``GET /api/commands/<id>``                  a command and its results so far
``GET /api/session``                        who the dashboard thinks you are
``GET /api/events``                         server-sent events (see :mod:`.live`)
=========================================== ===========================================

``<node>`` is a MAC id or a friendly name.  Errors are ``{"ok": false,
"error": "..."}`` with 400 (a bad value), 401 (sign in), 403 (CouchDB or
CSRF refused it), 404, 502 or 503 (CouchDB is unreachable).
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Optional

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from himbeere.couch import Doc
from himbeere.exceptions import ConfigError, NotFound

from .. import keys, ops
from ..fleet import Fleet
from . import live
from .context import dashboard, user_name
from .payloads import command_payload, node_payload, nodes_payload, program_payload

blueprint = Blueprint("api", __name__, url_prefix="/api")

#: Log lines a request returns at most.
MAX_LOG_LINES = 2000
DEFAULT_LOG_LINES = 500


# -- nodes ------------------------------------------------------------------------------
@blueprint.get("/nodes")
def nodes() -> Any:
    return jsonify(nodes_payload(g.fleet))


@blueprint.get("/nodes/<node>")
def node(node: str) -> Any:
    return jsonify(node_payload(g.fleet, node))


@blueprint.get("/nodes/<node>/logs")
def logs(node: str) -> Any:
    program = request.args.get("program") or None
    after = _number("after", request.args.get("after"))
    limit = int(_number("limit", request.args.get("limit")) or DEFAULT_LOG_LINES)
    limit = max(1, min(MAX_LOG_LINES, limit))
    docs = ops.logs(g.fleet, node, program)
    lines = ops.log_lines(docs, after)[-limit:]
    return jsonify({
        "node": ops.node_id(g.fleet, node),
        "programs": [{"program": d.get("program"), "name": d.get("name"),
                      "dropped": d.get("dropped", 0), "updated": d.get("updated"),
                      "lines": len(d.get("lines") or [])} for d in docs],
        "lines": [list(line) for line in lines],
    })


@blueprint.post("/nodes/<node>/programs")
def program_action(node: str) -> Any:
    body = _json_body()
    program = body.get("program")
    action = body.get("action")
    if not isinstance(program, str) or not program:
        raise ConfigError(f"program {program!r} is not allowed; allowed: a program's name or id")
    if action not in ("stop", "start", "restart"):
        raise ConfigError(f"action {action!r} is not allowed; allowed: stop, start, restart")

    def act(target: Optional[str]) -> Doc:
        if action == "restart":
            return ops.restart_program(g.fleet, target, program)
        return ops.set_enabled(g.fleet, target, program, action == "start")

    try:
        result = act(node)
    except NotFound:
        # A placed program (a program for many nodes) on this node's page: it
        # has one document for all its nodes, so the button acts wherever it
        # is placed (on every node it targets), as the CLI does without
        # --node, and the answer says so ("placed" or "targeted", "nodes").
        if not ops.is_shared(g.fleet, program):
            raise
        result = act(None)
    return jsonify(dict(result, ok=True))


# -- programs ---------------------------------------------------------------------------
@blueprint.get("/programs/<name>")
def program(name: str) -> Any:
    return jsonify(program_payload(g.fleet, name))


# -- health history ---------------------------------------------------------------------
@blueprint.get("/nodes/<node>/history")
def node_history(node: str) -> Any:
    return jsonify(ops.node_history(g.fleet, node))


@blueprint.get("/history")
def fleet_history() -> Any:
    figure = request.args.get("figure") or "cpu_percent"
    nodes = request.args.getlist("node") or None
    charts = ops.fleet_history(g.fleet, figure, nodes)
    return jsonify({"figure": figure, "nodes": {str(mac): chart for mac, chart in charts.items()}})


# -- commands ---------------------------------------------------------------------------
@blueprint.get("/commands")
def commands() -> Any:
    limit = int(_number("limit", request.args.get("limit")) or 20)
    return jsonify({"commands": ops.list_commands(g.fleet, max(1, min(200, limit)))})


@blueprint.post("/commands")
def create_command() -> Any:
    """Body: ``cmd`` (a list, or a string split like a shell would, run without one),
    ``targets`` (``"all"`` or MAC ids and names), ``labels`` (``{"room": "lab"}``
    or ``["room=lab"]``) and ``timeout`` (seconds)."""
    body = _json_body()
    argv = body.get("cmd")
    if isinstance(argv, str):
        try:
            argv = shlex.split(argv)
        except ValueError as exc:
            raise ConfigError(f"command {body['cmd']!r} cannot be split: {exc}") from None
    targets = body.get("targets")
    labels = body.get("labels") or ()
    if isinstance(labels, str):
        labels = labels.replace(",", " ").split()
    everywhere = targets == "all"
    if targets is None or everywhere:
        nodes: list[Any] = []
    elif isinstance(targets, list) and all(isinstance(t, (int, str)) for t in targets):
        nodes = [t for t in targets if t != ""]
    else:
        raise ConfigError(f"targets {targets!r} is not allowed; allowed: \"all\" or a list of "
                          "MAC ids and node names")
    resolved = ops.resolve_targets(g.fleet, all=everywhere, nodes=nodes, labels=labels)
    timeout = _number("timeout", body.get("timeout"))
    if not isinstance(argv, list):
        raise ConfigError(f"command {argv!r} is not allowed; allowed: a list of strings, or "
                          "one string split like a shell would (no shell runs it)")
    # Signed with the key of the machine the dashboard runs on, if it has one.
    command_id = ops.create_command(g.fleet, argv, resolved, timeout,
                                    signing_key=keys.find(None, os.environ))
    response = jsonify({"ok": True, "id": command_id, "targets": resolved,
                        "url": f"/commands/{command_id}"})
    response.status_code = 201
    return response


@blueprint.get("/commands/<command_id>")
def command(command_id: str) -> Any:
    return jsonify(command_payload(g.fleet, command_id))


# -- who, and what changes -----------------------------------------------------------------
@blueprint.get("/session")
def who() -> Any:
    context = g.fleet.session()
    return jsonify({"name": context.get("name"), "roles": context.get("roles") or [],
                    "signed_in": g.get("login") is not None, "user": user_name()})


@blueprint.get("/events")
def events() -> Response:
    """``text/event-stream`` of the status database's changes, read as this user."""
    fleet: Fleet = g.fleet
    fleet.require_database(fleet.status)  # refused here with 401/403, not in the stream
    key = fleet.couch.auth or ("", "")
    board = dashboard()
    stream = live.stream(board.hub, key, fleet.status, board.keepalive)
    response = Response(stream_with_context(stream), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


# -- helpers ----------------------------------------------------------------------------
def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object (Content-Type: "
                          "application/json)")
    return body


def _number(name: str, value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {value!r} is not allowed; allowed: a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} {value!r} is not allowed; allowed: a finite number")
    return number

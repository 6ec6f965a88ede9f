"""The HTML pages: sign in and out, the fleet, one node, one program, commands.

A page is rendered with its data as of now, embedded as JSON; the page's
script (``static/dashboard.js``) draws it and keeps it current from the
live feed (``/api/events``) and the JSON API.  Rendering the data here
also means a page asks CouchDB first, as its user: when that is refused,
the user is sent to sign in before anything is shown.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, redirect, render_template, request, session, url_for

from himbeere import health
from himbeere.exceptions import Unauthorized, Unreachable

from .. import ops
from . import payloads, sessions
from .context import csrf_token, dashboard, may_act, safe_next
from .errors import unreachable_message

blueprint = Blueprint("pages", __name__)


def render_page(template: str, page: str, data: Any, **context: Any) -> str:
    config = {
        "page": page,
        "csrf": csrf_token(),
        "thresholds": {"suspect_after": health.SUSPECT_AFTER, "dead_after": health.DEAD_AFTER},
        "crashed_states": [state.value for state in ops.CRASHED_STATES],
        "may_act": may_act(),
    }
    return render_template(template, page=page, data=data, page_config=config, **context)


@blueprint.route("/")
def fleet() -> Any:
    return render_page("fleet.html", "fleet", payloads.nodes_payload(g.fleet))


@blueprint.route("/nodes/<node>")
def node(node: str) -> Any:
    detail = payloads.node_payload(g.fleet, node)
    return render_page("node.html", "node", detail, node=detail["node"],
                       title=detail.get("name") or str(detail["node"]))


@blueprint.route("/programs/<name>")
def program(name: str) -> Any:
    return render_page("program.html", "program", payloads.program_payload(g.fleet, name),
                       name=name)


@blueprint.route("/commands")
def commands() -> Any:
    listing = {"commands": ops.list_commands(g.fleet, limit=50)}
    return render_page("commands.html", "commands", listing)


@blueprint.route("/commands/<command_id>")
def command(command_id: str) -> Any:
    return render_page("command.html", "command", payloads.command_payload(g.fleet, command_id),
                       command_id=command_id)


# -- signing in and out -------------------------------------------------------------------
@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    board = dashboard()
    target = safe_next(request.values.get("next"))
    error = None
    name = ""
    if request.method == "POST":  # the CSRF token was checked before we got here
        name = request.form.get("name", "").strip()
        password = request.form.get("password", "")
        try:
            login = sessions.sign_in(board.server, board.database, board.status_database,
                                     name, password)
        except Unauthorized:
            error = "Wrong name or password."
        except Unreachable as exc:
            message = unreachable_message(exc)
            error = message[0].upper() + message[1:]
        else:
            board.sessions.remove(session.get("sid"))
            session.clear()  # a fresh session id and CSRF token: no session fixation
            session["sid"] = board.sessions.add(login)
            csrf_token()
            return redirect(target)
    status = 401 if error and "Wrong" in error else 503 if error else 200
    return render_template("login.html", page="login", error=error, name=name,
                           next=target), status


@blueprint.route("/logout", methods=["POST"])
def logout() -> Any:
    dashboard().sessions.remove(session.get("sid"))
    session.clear()
    return redirect(url_for("pages.login"))

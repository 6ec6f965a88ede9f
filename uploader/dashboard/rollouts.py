"""The dashboard's rollouts: a list, one rollout's waves and nodes, live by polling.

=========================================== ===========================================
``GET /rollouts``, ``GET /rollouts/<id>``   the pages (``static/rollouts.js`` draws them)
``GET /api/rollouts``                       every rollout, summed up, newest first
``GET /api/rollouts/<id>``                  one rollout: waves, each node's release and
                                            health, its failure
``POST /api/rollouts/<id>``                 ``{"action": "pause" | "resume" | "abort"}``:
                                            steer it, as ``himbeere rollout ID --pause``
=========================================== ===========================================

One rollout's answers carry its summary, whose ``ok`` is the number of
admitted nodes that are healthy (not ``true``: it was, and the page showed
"true/3 admitted nodes healthy"); an error is ``{"ok": false, "error"}``.
The pages poll the API every two seconds: a rollout changes at the
scheduler's heartbeats, and its nodes' health with theirs.  The rollout
page has Pause, Resume and Abort buttons for deployers (a node signed in
gets none; CouchDB would refuse it anyway): they change the rollout
document's ``state`` at once (:func:`uploader.rollouts.steer`), and the
scheduler acts on it at its next heartbeat.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify, request

from himbeere.couch import security
from himbeere.exceptions import ConfigError

from .. import rollouts
from .context import error_response
from .pages import render_page

blueprint = Blueprint("rollouts", __name__)


@blueprint.route("/rollouts")
def listing_page() -> Any:
    return render_page("rollouts.html", "rollouts", {"rollouts": rollouts.listing(g.fleet)})


@blueprint.route("/rollouts/<rid>")
def rollout_page(rid: str) -> Any:
    shown = rollouts.show(g.fleet, rid)
    return render_page("rollout.html", "rollout", _public(shown), rollout_id=shown["id"])


@blueprint.route("/api/rollouts")
def listing_api() -> Any:
    return jsonify({"ok": True, "rollouts": rollouts.listing(g.fleet)})


@blueprint.route("/api/rollouts/<rid>")
def rollout_api(rid: str) -> Any:
    return jsonify(_public(rollouts.show(g.fleet, rid)))


@blueprint.post("/api/rollouts/<rid>")
def steer_api(rid: str) -> Any:
    body = request.get_json(silent=True)
    action = body.get("action") if isinstance(body, dict) else None
    if action not in rollouts.STEER:
        raise ConfigError(f"action {action!r} is not allowed; allowed: "
                          f"{', '.join(rollouts.STEER)}")
    # CouchDB lets nodes write a rollout's state (the scheduler is a node),
    # so it would not refuse a node user here: the dashboard does.
    who = g.fleet.session()
    roles = who.get("roles") or []
    if "_admin" not in roles and (security.NODE_ROLE in roles or str(who.get("name")).isdigit()):
        return error_response(403, f"node {who.get('name')} may not steer a rollout; a "
                                   "deployer does (himbeere rollout ID --pause)")
    return jsonify(rollouts.steer(g.fleet, rid, str(action)))


def _public(shown: dict[str, Any]) -> dict[str, Any]:
    """What the page shows: everything but the raw document."""
    return {k: v for k, v in shown.items() if k != "rollout"}

"""The dashboard's rollouts: a list, one rollout's waves and nodes, live by polling.

=========================================== ===========================================
``GET /rollouts``, ``GET /rollouts/<id>``   the pages (``static/rollouts.js`` draws them)
``GET /api/rollouts``                       every rollout, summed up, newest first
``GET /api/rollouts/<id>``                  one rollout: waves, each node's release and
                                            health, its failure
=========================================== ===========================================

The pages poll the API every two seconds: a rollout changes at the
scheduler's heartbeats, and its nodes' health with theirs.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, jsonify

from .. import rollouts
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
    return jsonify(dict(_public(rollouts.show(g.fleet, rid)), ok=True))


def _public(shown: dict[str, Any]) -> dict[str, Any]:
    """What the page shows: everything but the raw document."""
    return {k: v for k, v in shown.items() if k != "rollout"}

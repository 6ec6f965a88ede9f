"""What the pages and the JSON API show: the same payloads for both.

A page embeds its payload as JSON (:mod:`.pages`), and its script keeps it
current from the API (:mod:`.api`), which answers with the same payload.
"""

from __future__ import annotations

from typing import Any

from himbeere import health
from himbeere.exceptions import NotFound

from .. import ops
from ..fleet import Fleet


def nodes_payload(fleet: Fleet) -> dict[str, Any]:
    nodes = ops.list_nodes(fleet)
    return {
        "nodes": nodes,
        "server_time": ops.server_now(fleet),
        "thresholds": {"suspect_after": health.SUSPECT_AFTER, "dead_after": health.DEAD_AFTER},
    }


def node_payload(fleet: Fleet, node: str) -> dict[str, Any]:
    detail = ops.node_detail(fleet, node)
    detail["server_time"] = ops.server_now(fleet)
    return detail


def command_payload(fleet: Fleet, command_id: str) -> dict[str, Any]:
    answer = ops.command_results(fleet, command_id)
    expected = expected_nodes(answer)
    not_targeted = answer.get("not_targeted") or []
    macs = sorted(set(expected) | set(answer["results"]) | set(not_targeted))
    try:
        names = fleet.names()
    except NotFound:  # no names view: the databases were not set up by the uploader
        names = {}
    return {
        "command": answer["command"],
        "results": {str(mac): doc for mac, doc in answer["results"].items()},
        "pending": answer["pending"],
        "done": answer["done"],
        "expected": expected,
        "answered": len(expected) - len(answer["pending"]),
        "nodes": [{"node": mac, "name": names.get(mac), "not_targeted": mac in not_targeted}
                  for mac in macs],
    }


def expected_nodes(answer: dict[str, Any]) -> list[int]:
    """The MAC ids a command was meant for, as its creator resolved them."""
    command = answer["command"]
    for field in ("expected", "targets"):
        value = command.get(field)
        if isinstance(value, list):
            return sorted({int(m) for m in value if str(m).isdigit()})
    # "all", made by hand: whoever was pending when we asked, and whoever answered
    return sorted(set(answer["pending"]) | set(answer["results"]))

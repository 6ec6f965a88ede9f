"""What the pages and the JSON API show: the same payloads for both.

A page embeds its payload as JSON (:mod:`.pages`), and its script keeps it
current from the API (:mod:`.api`), which answers with the same payload.
"""

from __future__ import annotations

from typing import Any, Optional

from himbeere import health
from himbeere.exceptions import NotFound

from .. import ops, releases
from ..fleet import Fleet


def nodes_payload(fleet: Fleet) -> dict[str, Any]:
    nodes = ops.list_nodes(fleet)
    for node in nodes:
        node["formatted"] = formatted(node)
    return {
        "nodes": nodes,
        "server_time": ops.server_now(fleet),
        "thresholds": {"suspect_after": health.SUSPECT_AFTER, "dead_after": health.DEAD_AFTER},
    }


#: What the page shows for a figure a node did not report.
MISSING = "\u2013"


def formatted(node: dict[str, Any]) -> dict[str, str]:
    """The fleet table's figures as text, in one unit per column and fixed decimals.

    Load with two decimals; CPU in whole percent; temperature in °C with one
    decimal; memory as ``used / total MB`` (a Pi has 0.5 to 8 GB: whole MB
    stay short and comparable down a column); free disk in GB with one
    decimal.  A figure the node did not report is "–".
    """
    memory = node.get("memory") or {}
    used, total = _number(memory.get("used_mb")), _number(memory.get("total_mb"))
    load = node.get("load")
    given: list[Any] = load if isinstance(load, list) else []
    loads = [x for x in map(_number, given) if x is not None]
    free = _number((node.get("disk") or {}).get("free_mb"))
    cpu, temperature = _number(node.get("cpu_percent")), _number(node.get("temperature"))
    if used is None:
        shown_memory = MISSING
    elif total is None:
        shown_memory = f"{used:.0f} MB"
    else:
        shown_memory = f"{used:.0f} / {total:.0f} MB"
    return {
        "load": " ".join(f"{x:.2f}" for x in loads) if loads and len(loads) == len(given)
        else MISSING,
        "cpu": MISSING if cpu is None else f"{cpu:.0f} %",
        "temperature": MISSING if temperature is None else f"{temperature:.1f} \u00b0C",
        "memory": shown_memory,
        "disk_free": MISSING if free is None else f"{free / 1024:.1f} GB",
    }


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def node_payload(fleet: Fleet, node: str) -> dict[str, Any]:
    detail = ops.node_detail(fleet, node)
    detail["server_time"] = ops.server_now(fleet)
    return detail


def program_payload(fleet: Fleet, name: str) -> dict[str, Any]:
    """One program: where it runs, each node's release, its history and rollouts."""
    detail = releases.overview(fleet, name)
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

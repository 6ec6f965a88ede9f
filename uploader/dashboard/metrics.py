"""``GET /metrics``: the fleet in the Prometheus text format, read when scraped.

No thread samples anything in the background: each scrape reads the status
database once, as the asking user, through :func:`uploader.ops.list_nodes`
(two ``_all_docs`` requests, for ``status:`` and ``node:`` documents, plus
the cheap checks that the databases are there), and a
:class:`FleetCollector` turns those nodes into metric families.  So a
scrape shows what the dashboard's fleet page shows, and CouchDB decides
who may see it, exactly as for ``/api/nodes``.

Prometheus authenticates with basic auth (``basic_auth`` in a scrape
config), as scripts do on ``/api/``; a browser signed in to the dashboard
sees the same page.  docs/operating.rst has the scrape config and the
read-only CouchDB user it is meant for.

Every node has the labels ``node`` (its MAC id) and ``name`` (its friendly
name, empty if it has none); a program also ``program`` (its document id)
and ``program_name``.  Units are Prometheus's base units: seconds, bytes,
ratios from 0 to 1, degrees Celsius.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional

from flask import Blueprint, Response, g
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from himbeere import health
from himbeere.couch import Doc
from himbeere.schema import ProgramState

from .. import ops
from ..fleet import Fleet
from .context import METRICS_PATH

blueprint = Blueprint("metrics", __name__)

NODE_LABELS = ["node", "name"]
PROGRAM_LABELS = ["node", "name", "program", "program_name"]
MEBIBYTE = 2**20


@blueprint.get(METRICS_PATH)
def metrics() -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(g.fleet))  # type: ignore[arg-type]  # duck-typed
    return Response(generate_latest(registry), mimetype=None,
                    content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


class FleetCollector:
    """A custom collector: reads the fleet at each ``collect()``, keeps nothing."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        return iter(families(ops.list_nodes(self.fleet)))


def families(nodes: Iterable[Doc]) -> list[Metric]:
    """The metric families of ``nodes``, as :func:`uploader.ops.list_nodes` gives them."""
    def gauge(name: str, text: str, extra: Optional[list[str]] = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=NODE_LABELS + (extra or []))

    up = gauge("himbeere_node_up", "1 if the node's heartbeat is fresh (state alive), else 0")
    info = gauge("himbeere_node_info", "1 for every node, with what it runs as labels",
                 ["hostname", "ip", "daemon_version", "python"])
    age = gauge("himbeere_node_heartbeat_age_seconds",
                "Seconds since the node's last heartbeat, on the server's clock")
    cpu = gauge("himbeere_node_cpu_ratio",
                "CPU busy between the node's last two heartbeats, 0 to 1")
    temperature = gauge("himbeere_node_temperature_celsius", "CPU temperature")
    memory_used = gauge("himbeere_node_memory_used_bytes", "Memory in use (total - available)")
    memory_total = gauge("himbeere_node_memory_total_bytes", "Memory of the node")
    disk_free = gauge("himbeere_node_disk_free_bytes", "Free disk of the daemon's state directory")
    loads = [gauge(f"himbeere_node_load{minutes}", f"Load average over {minutes} minutes")
             for minutes in (1, 5, 15)]
    throttled = gauge("himbeere_node_throttled",
                      "1 if vcgencmd get_throttled reports the flag (Raspberry Pis only)",
                      ["flag"])
    programs = gauge("himbeere_node_programs", "Programs on the node in each state", ["state"])
    restarts = CounterMetricFamily("himbeere_program_restarts",
                                   "Restarts after crashes; 0 again when its code changes, "
                                   "it is restarted by hand or the daemon restarts",
                                   labels=PROGRAM_LABELS)
    for node in nodes:
        labels = [str(node["node"]), node.get("name") or ""]
        up.add_metric(labels, 1.0 if node.get("state") == "alive" else 0.0)
        info.add_metric(labels + [_text(node.get(k)) for k in
                                  ("hostname", "ip", "daemon_version", "python")], 1.0)
        memory = node.get("memory") or {}
        for family, value in ((age, node.get("heartbeat_age")),
                              (cpu, _scaled(node.get("cpu_percent"), 0.01)),
                              (temperature, node.get("temperature")),
                              (memory_used, _scaled(memory.get("used_mb"), MEBIBYTE)),
                              (memory_total, _scaled(memory.get("total_mb"), MEBIBYTE)),
                              (disk_free, _scaled((node.get("disk") or {}).get("free_mb"),
                                                  MEBIBYTE))):
            _add(family, labels, value)
        load = node.get("load")
        if isinstance(load, list) and len(load) == 3:
            for family, value in zip(loads, load):
                _add(family, labels, value)
        for flag, value in throttle_flags(node.get("throttled")).items():
            throttled.add_metric(labels + [flag], value)
        for state, count in program_states(node.get("programs") or {}).items():
            programs.add_metric(labels + [state], count)
        for program, entry in sorted((node.get("programs") or {}).items()):
            if isinstance(entry, dict) and _number(entry.get("restarts")) is not None:
                restarts.add_metric(labels + [program, _text(entry.get("name"))],
                                    float(entry["restarts"]))
    return [up, info, age, cpu, temperature, memory_used, memory_total, disk_free, *loads,
            throttled, programs, restarts]


def program_states(programs: dict[str, Any]) -> dict[str, float]:
    """Programs per state: every :class:`ProgramState` (0 if none), and any other seen."""
    counts = {state.value: 0.0 for state in ProgramState}
    for entry in programs.values():
        state = entry.get("state") if isinstance(entry, dict) else None
        if isinstance(state, str) and state:
            counts[state] = counts.get(state, 0.0) + 1
    return counts


def throttle_flags(throttled: Any) -> dict[str, float]:
    """Each flag :mod:`himbeere.health` decodes, 1 or 0; nothing off a Pi."""
    if not isinstance(throttled, dict) or not isinstance(throttled.get("flags"), list):
        return {}
    return {flag: float(flag in throttled["flags"]) for flag in health.THROTTLE_FLAGS.values()}


def _add(family: GaugeMetricFamily, labels: list[str], value: Any) -> None:
    number = _number(value)
    if number is not None:  # a figure the node cannot provide is left out, not 0
        family.add_metric(labels, number)


def _scaled(value: Any, factor: float) -> Optional[float]:
    number = _number(value)
    return None if number is None else number * factor


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)

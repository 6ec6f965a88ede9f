"""How central tools see a site whose relay went silent: the pure part of site relays.

A leaf of :mod:`uploader.sites`, apart so that :mod:`uploader.ops` (which
:mod:`uploader.sites` uses) can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterable

from himbeere import schema
from himbeere.couch import Doc

#: The label that makes a node a member of a site (``site=<name>``).
SITE_LABEL = "site"
#: A node of an offline site counts as reachable until the site went silent if
#: its last heartbeat is at most this many heartbeat intervals older than the
#: site's newest one: it was alive at the site's last sync.
SYNC_SLACK = 2.0


def offline_sites(nodes: Iterable[Doc], now: float) -> dict[int, Doc]:
    """Which nodes to show as ``unreachable``, not ``dead``, because their site is offline.

    ``nodes`` are :func:`uploader.ops.summarize` entries (``node``,
    ``labels``, ``state``, ``heartbeat_age``, ``heartbeat_interval``).  A
    site (label ``site``) is offline when none of its nodes is alive.  A
    dead node of it is unreachable when its last heartbeat is at most
    :data:`SYNC_SLACK` intervals older than the site's newest: it was alive
    when the site last synced.  Returns MAC id -> ``{"site", "since"}``
    (``since``: the site's newest heartbeat, seconds since the epoch); pure.
    """
    by_site: dict[str, list[Doc]] = {}
    for node in nodes:
        site = (node.get("labels") or {}).get(SITE_LABEL)
        if site:
            by_site.setdefault(site, []).append(node)
    found: dict[int, Doc] = {}
    for site, members in by_site.items():
        ages = [n["heartbeat_age"] for n in members if n.get("heartbeat_age") is not None]
        if not ages or any(n.get("state") == "alive" for n in members):
            continue
        newest = min(ages)
        for node in members:
            interval = float(node.get("heartbeat_interval") or 10.0)
            age = node.get("heartbeat_age")
            if (node.get("state") == "dead" and age is not None
                    and age - newest <= SYNC_SLACK * interval):
                found[node["node"]] = {"site": site, "since": now - newest}
    return found


def mark_offline(nodes: list[Doc], now: float) -> None:
    """Set ``state`` ``unreachable``, ``state_text``, ``site_offline_since`` (ISO) on the
    :func:`uploader.ops.summarize` entries of nodes of an offline site; in place."""
    offline = offline_sites(nodes, now)
    for node in nodes:
        found = offline.get(node["node"])
        if found is None:
            continue
        since = schema.iso(found["since"])
        node["state"] = "unreachable"
        node["site_offline_since"] = since
        node["state_text"] = f"unreachable (site {found['site']} offline since {since})"


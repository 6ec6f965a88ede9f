"""``himbeere-upload discover``: find the Pis on the network and provision each.

It broadcasts the server's URL *without credentials* (a Pi logs in as
itself), collects the replies ``{(ip, port): {"MacID": ..., "password": ...}}``
of :func:`himbeere.discovery.broadcast_message`, and provisions every Pi
that answered with its own password.  The broadcast function is a parameter
so tests can pass a fake one.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

from himbeere.couch import Doc, split_servers
from himbeere.exceptions import ConfigError, HimbeereError

from .fleet import Fleet
from .users import provision

Replies = dict[tuple[str, int], dict[str, Any]]
Broadcast = Callable[..., Replies]
Progress = Callable[[float, float], None]
OnReply = Callable[[tuple[str, int], dict[str, Any]], None]

#: Seconds between two progress reports while the broadcast waits.
TICK = 1.0


def default_broadcast() -> Broadcast:
    from himbeere.discovery import broadcast_message  # the Pi side lives there too

    return broadcast_message


def check_node_server(url: str) -> str:
    """The URL the Pis get (or several, separated by commas); no password."""
    for one in split_servers(url):
        parts = urllib.parse.urlsplit(one)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"node server {one!r} is not a URL; allowed: "
                              "http(s)://host[:port], several separated by commas")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("the URL broadcast to the Pis must not contain credentials: "
                              "each Pi logs in with its own MAC id and password")
    return url


def discover(fleet: Fleet, timeout: float = 10.0, node_server: Optional[str] = None,
             broadcast: Optional[Broadcast] = None, progress: Optional[Progress] = None,
             on_reply: Optional[OnReply] = None, **options: Any) -> list[Doc]:
    """Broadcast, then provision every Pi that answers; one row per reply.

    ``options`` (``port``, ``broadcast_address``, ``fleet_key``) go to the
    broadcast function as they are; ``on_reply(address, reply)`` is called
    as each answer arrives.
    """
    fleet.require_admin("discover")
    fleet.require_database(fleet.status)
    url = check_node_server(node_server or fleet.server)
    send = broadcast or default_broadcast()
    options = {key: value for key, value in options.items() if value is not None}
    if on_reply is not None:
        options["on_reply"] = on_reply
    replies = _with_progress(lambda: send(url, timeout=timeout, **options), timeout, progress)
    rows = []
    for (ip, port), reply in sorted(replies.items(), key=lambda item: str(item[0])):
        row: Doc = {"ip": ip, "port": port, "node": None, "name": None}
        try:
            node, password = _parse_reply(reply)
        except ConfigError as exc:
            row["state"] = f"bad reply: {exc}"
            rows.append(row)
            continue
        row["node"] = node
        try:
            result = provision(fleet, node, password=password)
            row.update(name=result.get("name"), state=result["action"])
        except HimbeereError as exc:
            row["state"] = f"failed: {exc}"
        rows.append(row)
    return rows


def _parse_reply(reply: Any) -> tuple[int, str]:
    if not isinstance(reply, dict):
        raise ConfigError(f"{reply!r} is not an object")
    mac = reply.get("MacID")
    if isinstance(mac, bool) or not isinstance(mac, (int, str)) or not str(mac).isdigit():
        raise ConfigError(f"MacID {mac!r} is not a MAC id")
    password = reply.get("password")
    if not isinstance(password, str) or not password:
        raise ConfigError("no password in the reply")
    return int(mac), password


def _with_progress(call: Callable[[], Replies], timeout: float,
                   progress: Optional[Progress]) -> Replies:
    """Run ``call``, reporting the seconds waited every :data:`TICK` from a thread."""
    if progress is None:
        return call()
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not done.wait(TICK):
            progress(time.monotonic() - started, timeout)

    ticker = threading.Thread(target=tick, name="discover-progress", daemon=True)
    ticker.start()
    try:
        return call()
    finally:
        done.set()
        ticker.join(TICK + 1)

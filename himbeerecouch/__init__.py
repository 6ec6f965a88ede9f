"""The original HimbeereCouch API, kept so old scripts and init files work.

``himbeerecouch`` is now a thin layer over :mod:`himbeere`:

* ``himbeerecouch.broadcast_message(server_url)`` tells listening nodes the
  server and returns their credentials (:mod:`himbeere.discovery`);
* ``himbeerecouch.util.getmacid()``, ``getpassword()``, ``getipaddr()`` and
  ``getserial()`` answer for this node (:mod:`himbeere.identity`);
* ``himbeerecouch.run_daemon(cmd, server_file, path)`` starts, stops...
  the daemon in the background (:mod:`himbeere.service`).

New code should use :mod:`himbeere` and the ``himbeere`` command directly.
"""

from __future__ import annotations

import sys
from typing import Any

from . import util

__all__ = ["broadcast_message", "run_daemon", "util"]


def broadcast_message(
    server_url: str = "", send_data: Any = None, timeout: float = 10, **kwargs: Any
) -> Any:
    """Broadcast ``server_url`` to listening nodes; return their answers.

    Same call as the original; forwards to
    :func:`himbeere.discovery.broadcast_message`.
    """
    try:
        from himbeere.discovery import broadcast_message as forward
    except ImportError as exc:
        if exc.name != "himbeere.discovery":
            raise
        raise NotImplementedError(
            "himbeerecouch.broadcast_message needs himbeere.discovery, which this "
            "installation of himbeere does not have"
        ) from None
    if send_data is not None:
        kwargs["send_data"] = send_data
    return forward(server_url, timeout=timeout, **kwargs)


def run_daemon(cmd: str, server_file: str, path: str) -> int:
    """Control the background daemon like the original ``rspby`` script did.

    ``cmd`` is start, stop, restart, reload or status; ``server_file`` the
    file holding the server URL (``/var/rspby/server``); ``path`` the folder
    for the pid and log files, which becomes the state directory.  Returns
    the LSB exit code.
    """
    from himbeere import config, service
    from himbeere.exceptions import ConfigError

    try:
        settings = config.load(flags={"server_file": server_file, "state_dir": path})
    except ConfigError as exc:
        print(f"himbeere: {exc}", file=sys.stderr)
        return service.EXIT_BAD_ARGUMENT
    return service.control(cmd, settings)

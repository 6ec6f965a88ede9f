"""The original ``himbeerecouch.util`` helpers, answering from the config.

They read the himbeere config (INI file and ``HIMBEERE_*`` variables) like
the daemon does, so ``getmacid()`` and ``getpassword()`` give the very
credentials the daemon logs in with.  A config that does not load is
reported as a warning and the defaults are used instead.
"""

from __future__ import annotations

import logging
from typing import Optional

from himbeere import config as _config
from himbeere import identity
from himbeere.exceptions import HimbeereError

__all__ = ["getipaddr", "getmacid", "getpassword", "getserial"]

logger = logging.getLogger(__name__)


def settings() -> _config.Config:
    """The node's config, or the defaults if it does not load."""
    try:
        return _config.load()
    except (HimbeereError, OSError) as exc:
        logger.warning("using default settings: %s", exc)
        return _config.Config()


def getmacid(interface: Optional[str] = None) -> int:
    """This node's MAC id, the CouchDB user name (``mac_id`` wins if set)."""
    if interface is not None:
        return identity.getmacid(interface)
    node = settings()
    return identity.getmacid(node.interface, override=node.mac_id)


def getpassword() -> str:
    """This node's CouchDB password (kept in ``<state_dir>/password``)."""
    node = settings()
    if node.legacy_password:
        macid = identity.getmacid(node.interface, override=node.mac_id)
        return identity.getpassword(node.state_dir, legacy=True, macid=macid)
    return identity.getpassword(node.state_dir)


def getipaddr(interface: Optional[str] = None) -> Optional[str]:
    """This node's IPv4 address (of the configured interface if it has one)."""
    return identity.getipaddr(interface or settings().interface)


def getserial() -> str:
    """The Raspberry Pi's serial number, ``"0000000000000000"`` elsewhere."""
    return identity.getserial()

"""Who this node is: its MAC id, its CouchDB password, serial and address.

A node is known to CouchDB by its *MAC id*, the MAC address of one network
interface read as a hexadecimal number (``b8:27:eb:12:34:56`` becomes
``202481587074134``), exactly as the original HimbeereCouch did.  The id is
also the node's CouchDB user name; its password is a random secret kept in
``<state_dir>/password``.

Network lookups go through :mod:`netifaces`; every function takes a
``backend`` argument so tests (and machines without ``netifaces``) can pass
an object with the same ``interfaces()``/``ifaddresses()``/``AF_LINK``/
``AF_INET`` attributes instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from .exceptions import ConfigError, HimbeereError

logger = logging.getLogger(__name__)

#: File in the state directory that holds the node's random password.
PASSWORD_FILE = "password"
#: What :func:`getserial` returns when ``/proc/cpuinfo`` has no serial
#: (any machine that is not a Raspberry Pi).
NO_SERIAL = "0000000000000000"

# Interfaces whose MAC says nothing about the machine: bridges and tunnels
# made by docker, libvirt, VPNs.  They are tried last, after physical ones,
# so installing docker on a Pi without eth0 does not change its identity.
_VIRTUAL_PREFIXES = ("docker", "br-", "veth", "virbr", "vnet", "tun", "tap", "wg", "zt")


def load_netifaces() -> Any:
    """The :mod:`netifaces` module, or a clear error if it is missing."""
    try:
        import netifaces
    except ImportError:
        raise HimbeereError(
            "netifaces is not installed; install it (pip install netifaces) "
            "or set mac_id in the config"
        ) from None
    return netifaces


def _candidates(backend: Any, preferred: Optional[str]) -> list[str]:
    """``preferred`` first, then physical interfaces, then virtual ones."""
    names = sorted(name for name in backend.interfaces() if name != "lo")
    names.sort(key=lambda name: name.startswith(_VIRTUAL_PREFIXES))
    if preferred is not None:
        names = [preferred] + [name for name in names if name != preferred]
    return names


def _addresses(backend: Any, interface: str, family: int) -> list[dict[str, str]]:
    try:
        return list(backend.ifaddresses(interface).get(family, []))
    except ValueError:
        # netifaces raises ValueError for an interface that does not exist.
        return []


def _mac_of(backend: Any, interface: str) -> Optional[int]:
    for entry in _addresses(backend, interface, backend.AF_LINK):
        digits = entry.get("addr", "").replace(":", "").replace("-", "")
        try:
            value = int(digits, 16)
        except ValueError:
            continue
        if value:
            return value
    return None


def getmacid(
    interface: str = "eth0", override: Optional[int] = None, backend: Any = None
) -> int:
    """This node's MAC id: ``override`` if given, else the MAC of ``interface``.

    When ``interface`` has no MAC (a Pi Zero W has no ``eth0``) the first
    other interface with one is used, in name order, skipping ``lo`` and
    trying virtual ones (docker, VPN...) last.
    """
    if override is not None:
        return int(override)
    backend = backend if backend is not None else load_netifaces()
    names = _candidates(backend, interface)
    for name in names:
        mac = _mac_of(backend, name)
        if mac is not None:
            if name != interface:
                logger.warning("interface %s has no MAC address; using %s's", interface, name)
            return mac
    raise ConfigError(
        f"interface: no MAC address on {interface!r} nor on any other interface "
        f"(looked at {', '.join(names) or 'none'}); set interface or mac_id in the config"
    )


def getipaddr(interface: Optional[str] = None, backend: Any = None) -> Optional[str]:
    """The IPv4 address of ``interface``, else of the first non-loopback one.

    ``None`` when the node has no IPv4 address at all (not connected yet).
    """
    backend = backend if backend is not None else load_netifaces()
    for name in _candidates(backend, interface):
        for entry in _addresses(backend, name, backend.AF_INET):
            addr = entry.get("addr")
            if addr and not addr.startswith("127."):
                return addr
    return None


def getserial(cpuinfo_path: Union[str, os.PathLike[str]] = "/proc/cpuinfo") -> str:
    """The Raspberry Pi's serial number from the ``Serial`` line of cpuinfo.

    :data:`NO_SERIAL` when the file or the line is missing (not a Pi).
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "Serial" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return NO_SERIAL


def random_password(nbytes: int = 24) -> str:
    """A random URL-safe password that does not start with ``-``.

    A leading dash would read as an option where users pass the password
    on a command line (``provision MACID --password PW``).
    """
    while True:
        import secrets  # here: hashlib and OpenSSL, for one call at first start

        password = secrets.token_urlsafe(nbytes)
        if not password.startswith("-"):
            return password


def legacy_password(macid: int, serial: str) -> str:
    """The original HimbeereCouch password: ``sha1(str(macid) + serial)``.

    Insecure: the MAC id is the node's user name and broadcast on the LAN,
    and the serial is printed by any program on the Pi (or guessable), so
    anyone who knows both can compute the password.  Only for nodes whose
    CouchDB users were created by the original daemon.
    """
    import hashlib

    return hashlib.sha1((str(macid) + serial).encode("ascii")).hexdigest()


def getpassword(
    state_dir: Union[str, os.PathLike[str]],
    legacy: bool = False,
    macid: Optional[int] = None,
    serial: Optional[str] = None,
) -> str:
    """This node's CouchDB password.

    A random secret made on first use and kept in ``<state_dir>/password``
    (mode 0600), so it survives reboots and reinstalls of the package.
    ``legacy=True`` returns the original's computable password instead (see
    :func:`legacy_password`); ``macid`` and ``serial`` default to this
    node's.
    """
    if legacy:
        macid = getmacid() if macid is None else macid
        serial = getserial() if serial is None else serial
        return legacy_password(macid, serial)
    path = Path(state_dir) / PASSWORD_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_password_file(path)
        mode = path.stat().st_mode
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise HimbeereError(
            f"password file {str(path)!r}: {exc.strerror or exc}; "
            "run as the daemon's user or set state_dir"
        ) from None
    if mode & 0o077:
        logger.warning("%s is readable by other users; chmod 600 it", path)
    if not password:
        raise HimbeereError(
            f"password file {str(path)!r} is empty; delete it to make a new password "
            "(and update the node's CouchDB user)"
        )
    return password


def _create_password_file(path: Path) -> None:
    """Write a new password to ``path`` unless another process already did.

    The secret goes to a private temporary file first and is then linked into
    place, so a reader never sees a half-written password and a crash (power
    loss on a Pi) leaves no empty password file behind.  O_EXCL makes the
    temporary file ours alone; link fails if ``path`` appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(random_password() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; its password stands
        except OSError:
            # A file system without hard links (vfat): create in place.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(tmp.read_text(encoding="utf-8"))
    finally:
        tmp.unlink(missing_ok=True)

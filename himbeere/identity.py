"""Who this node is: its MAC id, its CouchDB password, serial and address.

A node is known to CouchDB by its *MAC id*, the MAC address of one network
interface read as a hexadecimal number (``b8:27:eb:12:34:56`` becomes
``202481587074134``), exactly as the original HimbeereCouch did.  The id is
also the node's CouchDB user name; its password is a random secret kept in
``<state_dir>/password``.

Network lookups go through :mod:`netifaces` when it is installed, else, on
Linux, through :class:`SysfsNetwork`, which reads the same kernel data with
the standard library (``/sys/class/net/<if>/address`` and the
``SIOCGIFADDR`` ioctl), so a Pi needs no compiled package and no compiler.
Every function takes a ``backend`` argument so tests can pass an object
with the same ``interfaces()``/``ifaddresses()``/``AF_LINK``/``AF_INET``
attributes instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

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
    """How this machine's interfaces are read: :mod:`netifaces` if installed.

    Else :class:`SysfsNetwork` on Linux, and a clear error elsewhere (a
    laptop on macOS gets ``netifaces-plus`` with the package).
    """
    try:
        import netifaces
    except ImportError:
        if sys.platform.startswith("linux"):
            return SysfsNetwork()
        raise HimbeereError(
            "netifaces is not installed; install it (pip install netifaces-plus) "
            "or set mac_id in the config"
        ) from None
    return netifaces


# From <linux/sockios.h>; the ioctl fills a struct ifreq (16-byte name, then
# a struct sockaddr_in whose address is bytes 20..24 of the whole).
_SIOCGIFADDR = 0x8915
_IFNAMSIZ = 16


def ioctl_ipv4(interface: str) -> Optional[str]:
    """The primary IPv4 address of ``interface`` (``SIOCGIFADDR``), or ``None``.

    ``None`` also when the interface does not exist or its name cannot be
    one (longer than 15 bytes).  The primary address is the one
    ``getifaddrs`` (and so :mod:`netifaces`) lists first.
    """
    name = interface.encode("utf-8", "surrogateescape")
    if len(name) >= _IFNAMSIZ or not name:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifreq = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name))
        except OSError:
            # EADDRNOTAVAIL: no IPv4 address; ENODEV: no such interface.
            return None
    return socket.inet_ntoa(ifreq[20:24])


class SysfsNetwork:
    """The :mod:`netifaces` calls identity needs, from the standard library.

    Linux only.  The interfaces are the directories of
    ``<sys_root>/class/net``, their MACs the ``address`` files there;
    ``ipv4`` (default :func:`ioctl_ipv4`) gives an interface's IPv4
    address.  Both are arguments so tests can point them at a fake tree.
    """

    #: netifaces' AF_LINK on Linux is AF_PACKET (17).
    AF_LINK = getattr(socket, "AF_PACKET", 17)
    AF_INET = socket.AF_INET

    def __init__(
        self,
        sys_root: Union[str, os.PathLike[str]] = "/sys",
        ipv4: Callable[[str], Optional[str]] = ioctl_ipv4,
    ) -> None:
        self.net = Path(sys_root) / "class" / "net"
        self.ipv4 = ipv4

    def interfaces(self) -> list[str]:
        """The interface names; not files such as ``bonding_masters``."""
        try:
            entries = sorted(os.listdir(self.net))
        except OSError:
            return []
        return [name for name in entries if (self.net / name).is_dir()]

    def ifaddresses(self, interface: str) -> dict[int, list[dict[str, str]]]:
        """``{AF_LINK: [{"addr": mac}], AF_INET: [{"addr": ip}]}``, as netifaces.

        A family without an address is left out; an interface that does
        not exist raises ValueError, as with netifaces.
        """
        directory = self.net / interface
        if "/" in interface or not directory.is_dir():
            raise ValueError(f"no interface {interface!r} in {self.net}")
        found: dict[int, list[dict[str, str]]] = {}
        try:
            mac = (directory / "address").read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            mac = ""  # a tunnel (tun, wireguard) has no hardware address
        if mac:
            found[self.AF_LINK] = [{"addr": mac}]
        address = self.ipv4(interface)
        if address:
            found[self.AF_INET] = [{"addr": address}]
        return found


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

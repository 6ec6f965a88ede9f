"""The node's identity: MAC id, password, serial and IP address, off a Pi."""

from __future__ import annotations

import hashlib
import stat
import threading
from pathlib import Path
from typing import Any, Optional

import pytest

from himbeere import identity
from himbeere.exceptions import ConfigError, HimbeereError

AF_LINK = 17
AF_INET = 2


class FakeNetifaces:
    """Stands in for :mod:`netifaces`: ``{interface: {family: [entries]}}``."""

    AF_LINK = AF_LINK
    AF_INET = AF_INET

    def __init__(self, table: dict[str, dict[int, list[dict[str, str]]]]) -> None:
        self.table = table

    def interfaces(self) -> list[str]:
        return list(self.table)

    def ifaddresses(self, name: str) -> dict[int, list[dict[str, str]]]:
        if name not in self.table:
            raise ValueError("You must specify a valid interface name.")
        return self.table[name]


def link(mac: str) -> dict[int, list[dict[str, str]]]:
    return {AF_LINK: [{"addr": mac}]}


def inet(mac: str, ip: Optional[str]) -> dict[int, list[dict[str, str]]]:
    entries: dict[int, list[dict[str, str]]] = dict(link(mac))
    if ip is not None:
        entries[AF_INET] = [{"addr": ip, "netmask": "255.255.255.0"}]
    return entries


PI = FakeNetifaces({
    "lo": inet("00:00:00:00:00:00", "127.0.0.1"),
    "eth0": inet("b8:27:eb:12:34:56", "192.168.1.20"),
    "wlan0": inet("b8:27:eb:ab:cd:ef", "192.168.1.21"),
})


def test_macid_is_the_interface_mac_read_as_hex() -> None:
    assert identity.getmacid("eth0", backend=PI) == 0xB827EB123456
    assert identity.getmacid("wlan0", backend=PI) == 0xB827EBABCDEF


def test_override_wins_without_looking_at_interfaces() -> None:
    class Exploding:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("netifaces was consulted")

    assert identity.getmacid("eth0", override=1234, backend=Exploding()) == 1234


def test_missing_interface_falls_back_to_first_physical_one() -> None:
    # A Pi Zero W: no eth0; docker's bridge sorts first but is virtual.
    zero = FakeNetifaces({
        "docker0": link("02:42:ac:11:00:02"),
        "lo": link("00:00:00:00:00:00"),
        "wlan0": link("b8:27:eb:ab:cd:ef"),
        "usb0": link("00:00:00:00:00:00"),
    })
    assert identity.getmacid("eth0", backend=zero) == 0xB827EBABCDEF


def test_interface_without_mac_is_skipped() -> None:
    table = FakeNetifaces({
        "eth0": {AF_INET: [{"addr": "10.0.0.2"}]},
        "eth1": link("aa:bb:cc:dd:ee:ff"),
    })
    assert identity.getmacid("eth0", backend=table) == 0xAABBCCDDEEFF


def test_no_mac_anywhere_is_a_clear_error() -> None:
    bare = FakeNetifaces({"lo": link("00:00:00:00:00:00"), "tun0": {}})
    with pytest.raises(ConfigError, match=r"no MAC address on 'eth0'.*tun0.*mac_id"):
        identity.getmacid("eth0", backend=bare)


def test_ipaddr_of_interface_else_first_non_loopback() -> None:
    assert identity.getipaddr("wlan0", backend=PI) == "192.168.1.21"
    assert identity.getipaddr(None, backend=PI) == "192.168.1.20"
    offline = FakeNetifaces({"lo": inet("00:00:00:00:00:00", "127.0.0.1"),
                             "eth0": inet("b8:27:eb:12:34:56", None)})
    assert identity.getipaddr("eth0", backend=offline) is None
    wifi_only = FakeNetifaces({"eth0": inet("b8:27:eb:12:34:56", None),
                               "wlan0": inet("b8:27:eb:ab:cd:ef", "10.1.1.5")})
    assert identity.getipaddr("eth0", backend=wifi_only) == "10.1.1.5"


def test_password_is_stored_private_and_stable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = identity.getpassword(state)
    path = state / identity.PASSWORD_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert identity.getpassword(state) == first
    assert path.read_text().strip() == first
    assert [p.name for p in state.iterdir()] == [identity.PASSWORD_FILE]


def test_concurrent_first_calls_agree_on_one_password(tmp_path: Path) -> None:
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(identity.getpassword(tmp_path)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and len(set(results)) == 1


def test_different_state_dirs_get_different_passwords(tmp_path: Path) -> None:
    assert identity.getpassword(tmp_path / "a") != identity.getpassword(tmp_path / "b")


def test_empty_password_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / identity.PASSWORD_FILE).write_text("")
    with pytest.raises(HimbeereError, match="is empty; delete it"):
        identity.getpassword(tmp_path)


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HimbeereError, match="password file .*set state_dir"):
        identity.getpassword(blocker / "state")


def test_legacy_password_is_the_original_formula(tmp_path: Path) -> None:
    macid, serial = 0xB827EB123456, "00000000abcdef12"
    expected = hashlib.sha1(b"202481587074134" + b"00000000abcdef12").hexdigest()
    assert identity.getpassword(tmp_path, legacy=True, macid=macid, serial=serial) == expected
    assert not (tmp_path / identity.PASSWORD_FILE).exists()


CPUINFO = """\
processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
Features\t: half thumb fastmult vfp edsp neon

Hardware\t: BCM2835
Revision\t: a02082
Serial\t\t: 00000000abcdef12
Model\t\t: Raspberry Pi 3 Model B Rev 1.2
"""


def test_serial_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert identity.getserial(cpuinfo) == "00000000abcdef12"


def test_serial_absent_or_unreadable(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert identity.getserial(cpuinfo) == "0000000000000000"
    assert identity.getserial(tmp_path / "missing") == "0000000000000000"


def test_real_netifaces_if_installed() -> None:
    netifaces = pytest.importorskip("netifaces")
    try:
        macid = identity.getmacid("eth0", backend=netifaces)
    except ConfigError:
        pytest.skip("this machine has no interface with a MAC address")
    assert isinstance(macid, int) and macid > 0


def test_random_passwords_never_start_with_a_dash() -> None:
    """A password like ``-Yal...`` broke ``provision MACID --password PW`` (CI, 3.13)."""
    from himbeere.identity import random_password

    passwords = [random_password(3) for _ in range(2000)]
    assert not any(p.startswith("-") for p in passwords)
    assert len(set(passwords)) > 1900

"""The node's identity: MAC id, password, serial and IP address, off a Pi."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
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


# The standard-library backend (SysfsNetwork): what a Pi without netifaces
# uses, so that installing himbeere there needs no compiler (issue 12).

def fake_sys(root: Path, macs: dict[str, str]) -> Path:
    """A ``/sys`` tree with ``class/net/<name>/address`` for each interface."""
    net = root / "class" / "net"
    net.mkdir(parents=True)
    for name, mac in macs.items():
        (net / name).mkdir()
        (net / name / "address").write_text(mac + "\n" if mac else "\n")
    # Not an interface: the bonding driver's control file lives beside them.
    (net / "bonding_masters").write_text("\n")
    return root


def test_sysfs_backend_reads_macs_like_netifaces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Pi Zero W with docker and a VPN: no eth0, a tunnel without a MAC.
    root = fake_sys(tmp_path, {
        "lo": "00:00:00:00:00:00",
        "docker0": "02:42:ac:11:00:02",
        "tun0": "",
        "wlan0": "b8:27:eb:ab:cd:ef",
    })
    backend = identity.SysfsNetwork(root, ipv4=lambda name: None)
    assert backend.interfaces() == ["docker0", "lo", "tun0", "wlan0"]
    assert backend.ifaddresses("tun0") == {}
    assert identity.getmacid("wlan0", backend=backend) == 0xB827EBABCDEF
    assert identity.getmacid("eth0", backend=backend) == 0xB827EBABCDEF
    assert "interface eth0 has no MAC address; using wlan0's" in caplog.text
    with pytest.raises(ValueError):
        backend.ifaddresses("eth0")
    with pytest.raises(ValueError):
        backend.ifaddresses("../net/wlan0")


def test_sysfs_backend_ipv4_per_interface(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {
        "lo": "00:00:00:00:00:00",
        "eth0": "b8:27:eb:12:34:56",
        "wlan0": "b8:27:eb:ab:cd:ef",
    })
    addresses = {"lo": "127.0.0.1", "wlan0": "10.1.1.5"}
    backend = identity.SysfsNetwork(root, ipv4=addresses.get)
    assert backend.ifaddresses("wlan0") == {
        backend.AF_LINK: [{"addr": "b8:27:eb:ab:cd:ef"}],
        backend.AF_INET: [{"addr": "10.1.1.5"}],
    }
    # eth0 is not connected: the address of the next interface, never lo's.
    assert identity.getipaddr("eth0", backend=backend) == "10.1.1.5"
    assert identity.getipaddr("wlan0", backend=backend) == "10.1.1.5"
    offline = identity.SysfsNetwork(root, ipv4={"lo": "127.0.0.1"}.get)
    assert identity.getipaddr("eth0", backend=offline) is None


def test_sysfs_backend_without_sys_has_no_interfaces(tmp_path: Path) -> None:
    # A chroot without /sys mounted: the clear "set mac_id" error, no traceback.
    backend = identity.SysfsNetwork(tmp_path / "nothing", ipv4=lambda name: None)
    assert backend.interfaces() == []
    with pytest.raises(ConfigError, match="no MAC address on 'eth0'.*mac_id"):
        identity.getmacid("eth0", backend=backend)


def test_ioctl_ipv4_of_loopback_and_of_no_interface() -> None:
    assert identity.ioctl_ipv4("lo") == "127.0.0.1"
    assert identity.ioctl_ipv4("nosuchif0") is None
    assert identity.ioctl_ipv4("x" * 40) is None
    assert identity.ioctl_ipv4("") is None


def test_without_netifaces_linux_uses_sysfs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "netifaces", None)  # import raises ImportError
    assert isinstance(identity.load_netifaces(), identity.SysfsNetwork)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(HimbeereError, match=r"pip install netifaces-plus\) or set mac_id"):
        identity.load_netifaces()


def real_interfaces() -> list[str]:
    names = identity.SysfsNetwork().interfaces()
    if not any(name != "lo" for name in names):
        pytest.skip("this machine has no network interface but lo")
    return names


def test_sysfs_backend_agrees_with_netifaces_here() -> None:
    """Same MAC id and IP, interface by interface, as netifaces gives on this machine."""
    netifaces = pytest.importorskip("netifaces")
    names = real_interfaces()
    sysfs = identity.SysfsNetwork()
    assert sorted(netifaces.interfaces()) == names
    for name in names:
        try:
            expected: Optional[int] = identity.getmacid(name, backend=netifaces)
        except ConfigError:
            expected = None
        if expected is None:
            with pytest.raises(ConfigError):
                identity.getmacid(name, backend=sysfs)
        else:
            assert identity.getmacid(name, backend=sysfs) == expected, name
        assert identity.getipaddr(name, backend=sysfs) == identity.getipaddr(
            name, backend=netifaces
        ), name
    assert identity.getipaddr(None, backend=sysfs) == identity.getipaddr(None, backend=netifaces)


def test_sysfs_backend_agrees_with_iproute2_here() -> None:
    """The same check against ``ip -j addr``, for venvs without netifaces."""
    ip = shutil.which("ip") or pytest.skip("no ip command (iproute2)")
    listing = json.loads(subprocess.run(
        [ip, "-j", "addr"], check=True, capture_output=True, text=True
    ).stdout)
    names = real_interfaces()
    sysfs = identity.SysfsNetwork()
    assert sorted(entry["ifname"] for entry in listing) == names
    for entry in listing:
        mac = entry.get("address", "")
        inet4 = [a["local"] for a in entry.get("addr_info", []) if a["family"] == "inet"]
        link = sysfs.ifaddresses(entry["ifname"])
        if entry.get("link_type") in ("ether", "loopback", "none"):
            # (ip prints a tunnel's (sit, gre) hardware address as an IP address.)
            assert link.get(sysfs.AF_LINK, [{"addr": ""}])[0]["addr"] == mac
        assert [a["addr"] for a in link.get(sysfs.AF_INET, [])] == inet4[:1]

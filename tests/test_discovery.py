"""Pairing by UDP broadcast: window, fleet key, replays, the LED, a daemon without server.

Traffic stays on loopback (nodes listen on 127.255.255.255, the laptop side
broadcasts there), or inside two network namespaces this test creates and
deletes (only as root, with ``ip``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest

import himbeerecouch
from himbeere import cli, defaults, discovery, fleetkey, gpio, identity, statelock
from himbeere.config import Config, read_server_file
from himbeere.exceptions import ConfigError, HimbeereError
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
MACID = 0xB827EB123456
LOOPBACK_BROADCAST = "127.255.255.255"
SERVER = "http://couch.lab:5984"
KEY = "the fleet key of the test lab, long enough"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_key(path: Path, key: str = KEY) -> str:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def node_config(tmp_path: Path) -> Config:
    """A node listening on loopback broadcasts only, on a free port, without LED."""
    return Config(state_dir=str(tmp_path / "state"), mac_id=MACID, led_pin=None,
                  discovery_address=LOOPBACK_BROADCAST,
                  discovery_port=free_udp_port()).validate()


@pytest.fixture
def keyed_config(node_config: Config, tmp_path: Path) -> Config:
    return node_config.replace(fleet_key_file=write_key(tmp_path / "fleet.key"))


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="himbeere")
    return caplog


@contextmanager
def listening(config: Config) -> Iterator[discovery.Listener]:
    """A running daemon's pairing listener (window: ``himbeere pair``)."""
    listener = discovery.Listener(config).start()
    assert listener.sock is not None, "the listener did not start"
    try:
        yield listener
    finally:
        listener.stop()


def broadcast(config: Config, timeout: float = 1.0, **kwargs: Any) -> discovery.Replies:
    return discovery.broadcast_message(SERVER, timeout=timeout, port=config.discovery_port,
                                       broadcast_address=LOOPBACK_BROADCAST, **kwargs)


def password_of(config: Config) -> str:
    return identity.getpassword(config.state_dir)


def wait_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    wait_for(lambda: text in caplog.text, 5, message=lambda: f"{text!r} not in:\n{caplog.text}")


# -- the round trip ----------------------------------------------------------------------
def test_round_trip_on_loopback(node_config: Config, caplog_info: Any) -> None:
    discovery.open_pairing(node_config)
    seen: list[Any] = []
    with listening(node_config):
        replies = broadcast(node_config, on_reply=lambda address, reply: seen.append(address))
    password = password_of(node_config)
    assert replies == {("127.0.0.1", node_config.discovery_port):
                       {"MacID": MACID, "password": password}}
    assert seen == list(replies)
    # The node keeps the server with its own credentials, private to its user.
    server_file = node_config.state_path / "server"
    assert read_server_file(str(server_file)) == f"http://{MACID}:{password}@couch.lab:5984"
    assert server_file.stat().st_mode & 0o777 == 0o600
    assert (node_config.state_path / identity.PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
    assert "paired by 127.0.0.1" in caplog_info.text
    assert password not in caplog_info.text


def test_himbeerecouch_broadcast_message_forwards(node_config: Config) -> None:
    discovery.open_pairing(node_config)
    with listening(node_config):
        replies = himbeerecouch.broadcast_message(
            SERVER, timeout=1.0, port=node_config.discovery_port,
            broadcast_address=LOOPBACK_BROADCAST)
    assert [reply["MacID"] for reply in replies.values()] == [MACID]


def test_broadcast_refuses_a_url_with_credentials() -> None:
    with pytest.raises(ConfigError, match="broadcast in clear") as error:
        discovery.broadcast_message("http://admin:s3cret@couch.lab:5984", timeout=0.1)
    assert "s3cret" not in str(error.value)
    with pytest.raises(ConfigError, match="not a URL"):
        discovery.broadcast_message("couch.lab", timeout=0.1)


def test_node_puts_its_own_credentials_into_the_url(node_config: Config) -> None:
    pairing = discovery.Pairing(node_config, until_configured=True)
    request = json.dumps({"server": "https://someone:else@[fd00::5]:6984/couch"}).encode()
    reply = json.loads(pairing.handle(request, ("127.0.0.1", 4000)) or b"null")
    password = password_of(node_config)
    assert reply == {"MacID": MACID, "password": password}
    assert pairing.paired == f"https://{MACID}:{password}@[fd00::5]:6984/couch"


def test_legacy_password_option(node_config: Config) -> None:
    config = node_config.replace(legacy_password=True)
    with listening(config):
        discovery.open_pairing(config)
        replies = broadcast(config)
    expected = identity.legacy_password(MACID, identity.getserial())
    assert [reply["password"] for reply in replies.values()] == [expected]
    assert not (config.state_path / identity.PASSWORD_FILE).exists()


JUNK = [b"\xff\xfe", b"[]", b'{"server": 5}', b'{"server": "http://h\\u00e9"}',
        b'{"server": "not a url"}', b'{"server": "http://h\\ud800"}']
#: Junk only for a node with a fleet key (without one, they are fine requests).
UNSIGNED = [b'{"server": "http://h", "ts": 1, "nonce": "\\ud800", "hmac": "\\u00e9"}',
            b'{"server": "http://h", "ts": 1, "nonce": "00", "hmac": "00"}',
            b'{"server": "http://h", "ts": "1", "nonce": "%s", "hmac": "\\u00e9"}' % (b"0" * 32),
            b'{"server": "http://h", "ts": 1, "nonce": "%s", "hmac": "\\u00e9"}' % (b"0" * 32)]


@pytest.mark.parametrize("keyed", [False, True])
def test_junk_is_ignored_without_fuss(node_config: Config, keyed_config: Config,
                                      keyed: bool) -> None:
    pairing = discovery.Pairing(keyed_config if keyed else node_config, until_configured=True)
    for junk in JUNK + (UNSIGNED if keyed else []):
        assert pairing.handle(junk, ("127.0.0.1", 1)) is None, junk
    assert pairing.paired is None


# -- the pairing window --------------------------------------------------------------------
def test_closed_window_ignores_and_logs_then_pair_opens_it(
    node_config: Config, tmp_path: Path, caplog_info: Any, capsys: Any
) -> None:
    empty_ini = tmp_path / "empty.conf"
    empty_ini.write_text("[himbeere]\n")
    flags = ["--config", str(empty_ini), "--state-dir", node_config.state_dir]
    statelock.acquire(node_config.state_dir)  # as the daemon whose listener this is
    with listening(node_config):
        assert broadcast(node_config, timeout=0.5) == {}
        wait_log(caplog_info, "pairing request from 127.0.0.1 ignored: pairing is closed; "
                              "run `himbeere pair`")
        assert not (node_config.state_path / "server").exists()

        assert cli.main(["pair", *flags]) == 0
        assert "pairing open until" in capsys.readouterr().out
        assert list(broadcast(node_config).values()) == [
            {"MacID": MACID, "password": password_of(node_config)}]

        assert cli.main(["pair", "--close", *flags]) == 0
        assert capsys.readouterr().out.strip() == "pairing closed"
        assert broadcast(node_config, timeout=0.5) == {}
    statelock.release(node_config.state_dir)


def test_pair_without_a_running_daemon_says_so(tmp_path: Path, capsys: Any) -> None:
    """Regression: it announced an open window that no daemon would ever answer in."""
    state = tmp_path / "state"
    empty_ini = tmp_path / "empty.conf"
    empty_ini.write_text("[himbeere]\n")
    flags = ["--config", str(empty_ini), "--state-dir", str(state)]
    for ran_before in (False, True):  # no lock file yet; a daemon's left over
        if ran_before:
            statelock.acquire(state)
            statelock.release(state)
        assert cli.main(["pair", *flags]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.splitlines() == [
            f"himbeere: error: no himbeere daemon runs on state directory {state}, and only "
            "a running daemon answers pairing; start it (systemctl start himbeere, or "
            "himbeere daemon) and run himbeere pair again"]
        assert not (state / discovery.PAIRING_FILE).exists()


def test_window_closes_after_pairing_window_seconds(node_config: Config) -> None:
    opened = 1_700_000_000.0
    discovery.open_pairing(node_config, now=opened)
    clock = [opened + 599.0]
    pairing = discovery.Pairing(node_config, clock=lambda: clock[0])
    assert pairing.window_open()
    clock[0] = opened + 600.0
    assert not pairing.window_open()
    assert discovery.Pairing(node_config, until_configured=True, clock=lambda: clock[0]) \
        .window_open()


def test_ignored_requests_are_not_logged_one_by_one(node_config: Config, caplog: Any) -> None:
    pairing = discovery.Pairing(node_config)
    for _ in range(50):
        assert pairing.handle(b'{"server": "http://h:5984"}', ("10.0.0.9", 1)) is None
    assert caplog.text.count("ignored: pairing is closed") == 1


# -- the fleet key -----------------------------------------------------------------------
def test_fleet_key_round_trip(keyed_config: Config) -> None:
    discovery.open_pairing(keyed_config)
    with listening(keyed_config):
        replies = broadcast(keyed_config, fleet_key=KEY)
    assert list(replies.values()) == [{"MacID": MACID, "password": password_of(keyed_config)}]


@pytest.mark.parametrize("laptop_key, logged", [
    (None, "ignored: no HMAC, and this node has a fleet key"),
    ("another fleet key, just as long", "ignored: wrong HMAC"),
])
def test_request_without_valid_hmac_is_ignored(
    keyed_config: Config, caplog: Any, laptop_key: Optional[str], logged: str
) -> None:
    discovery.open_pairing(keyed_config)
    with listening(keyed_config):
        assert broadcast(keyed_config, timeout=0.5, fleet_key=laptop_key) == {}
        wait_log(caplog, logged)
    assert not (keyed_config.state_path / "server").exists()


def test_replayed_request_is_ignored(keyed_config: Config, caplog: Any) -> None:
    """The same signed datagram sent twice (say, captured and replayed) gets one answer."""
    discovery.open_pairing(keyed_config)
    datagram, nonce = discovery.make_request(SERVER, fleetkey.as_key(KEY))
    with listening(keyed_config), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as laptop:
        laptop.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        laptop.settimeout(2.0)
        laptop.sendto(datagram, (LOOPBACK_BROADCAST, keyed_config.discovery_port))
        first = json.loads(laptop.recv(65507))
        laptop.sendto(datagram, (LOOPBACK_BROADCAST, keyed_config.discovery_port))
        wait_log(caplog, "ignored: replayed (its nonce was seen before)")
        laptop.settimeout(0.3)
        with pytest.raises(socket.timeout):
            laptop.recv(65507)
    assert first["MacID"] == MACID and first["encryption"] == discovery.ENCRYPTION


def test_request_from_another_time_is_ignored(keyed_config: Config, caplog: Any) -> None:
    now = 1_700_000_000
    pairing = discovery.Pairing(keyed_config, until_configured=True, clock=lambda: now)
    key = fleetkey.as_key(KEY)
    stale, _ = discovery.make_request(SERVER, key, now=now - 3600)
    assert pairing.handle(stale, ("127.0.0.1", 1)) is None
    assert "its time is -3600 s from this node's clock (allowed ±300 s)" in caplog.text
    fresh, _ = discovery.make_request(SERVER, key, now=now - 290)
    assert pairing.handle(fresh, ("127.0.0.1", 1)) is not None


def test_encrypted_password_decrypts_with_the_key_only(keyed_config: Config) -> None:
    pairing = discovery.Pairing(keyed_config, until_configured=True)
    key = fleetkey.as_key(KEY)
    datagram, nonce = discovery.make_request(SERVER, key)
    assert nonce is not None
    raw = pairing.handle(datagram, ("127.0.0.1", 1))
    assert raw is not None
    password = password_of(keyed_config)
    assert password.encode() not in raw
    reply = json.loads(raw)
    assert reply["MacID"] == MACID and reply["password"] != password
    assert fleetkey.decrypt_password(key, reply["password"], nonce, MACID) == password
    other = fleetkey.as_key("another fleet key, just as long")
    with pytest.raises(HimbeereError, match="does not decrypt"):
        fleetkey.decrypt_password(other, reply["password"], nonce, MACID)
    with pytest.raises(HimbeereError, match="does not decrypt"):  # made for another request
        fleetkey.decrypt_password(key, reply["password"], "0" * 32, MACID)
    with pytest.raises(HimbeereError, match="does not decrypt"):  # claims another node
        fleetkey.decrypt_password(key, reply["password"], nonce, MACID + 1)
    address = ("127.0.0.1", 1)
    assert discovery.read_reply(raw, address, key, nonce) == {"MacID": MACID,
                                                             "password": password}
    assert discovery.read_reply(raw, address, None, None) is None


def test_laptop_with_fleet_key_ignores_unencrypted_replies(node_config: Config) -> None:
    """A spoofed plain reply would make the uploader provision an attacker's account."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as impostor:
        impostor.bind((LOOPBACK_BROADCAST, node_config.discovery_port))

        def answer() -> None:
            impostor.settimeout(5)
            _, address = impostor.recvfrom(65507)
            impostor.sendto(json.dumps({"MacID": 1, "password": "mine"}).encode(), address)

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            assert broadcast(node_config, timeout=0.5, fleet_key=KEY) == {}
        finally:
            thread.join(5)


def test_short_or_missing_fleet_key_is_refused(node_config: Config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too short"):
        discovery.broadcast_message(SERVER, timeout=0.1, fleet_key="short")
    short = node_config.replace(fleet_key_file=write_key(tmp_path / "short.key", "short"))
    with pytest.raises(ConfigError, match="too short"):
        discovery.Pairing(short)
    missing = node_config.replace(fleet_key_file=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="fleet_key_file"):
        discovery.Pairing(missing)


# -- the LED -----------------------------------------------------------------------------------
class FakeGPIO:
    """Records what RPi.GPIO would have been asked to do."""

    BCM, OUT, HIGH, LOW = "BCM", "OUT", 1, 0

    def __init__(self, fail_setup: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_setup = fail_setup

    def setwarnings(self, flag: bool) -> None:
        self.calls.append(("setwarnings", flag))

    def setmode(self, mode: str) -> None:
        self.calls.append(("setmode", mode))

    def setup(self, pin: int, direction: str) -> None:
        if self.fail_setup:
            raise RuntimeError("No access to /dev/mem.  Try running as root!")
        self.calls.append(("setup", pin, direction))

    def output(self, pin: int, value: int) -> None:
        self.calls.append(("output", pin, value))

    def cleanup(self, pin: int) -> None:
        self.calls.append(("cleanup", pin))

    def outputs(self) -> list[int]:
        return [call[2] for call in self.calls if call[0] == "output"]


def test_blinker_blinks_then_turns_off_and_releases_the_pin() -> None:
    fake = FakeGPIO()
    with gpio.Blinker(21, fake, interval=0.01) as blinker:
        assert blinker.blinking
        wait_for(lambda: fake.outputs().count(fake.HIGH) >= 3, 5)
    assert fake.calls[:3] == [("setwarnings", False), ("setmode", "BCM"), ("setup", 21, "OUT")]
    assert fake.outputs()[-1] == fake.LOW
    assert fake.calls[-1] == ("cleanup", 21)
    assert not blinker.blinking


def test_blinker_is_a_no_op_without_gpio_or_pin(
    monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def not_a_pi(name: str) -> Any:
        raise RuntimeError("This module can only be run on a Raspberry Pi!")

    monkeypatch.setattr(gpio.importlib, "import_module", not_a_pi)
    assert gpio.load_backend() is None
    assert not gpio.Blinker(16).start().blinking
    assert not gpio.Blinker(None, FakeGPIO()).start().blinking
    broken = FakeGPIO(fail_setup=True)
    blinker = gpio.Blinker(16, broken).start()
    wait_for(lambda: not blinker.blinking, 5)
    assert "cannot blink the LED on GPIO 16: No access" in caplog.text


def test_gpio_import_failure_on_this_machine_is_caught() -> None:
    try:
        import RPi.GPIO  # noqa: F401
    except (ImportError, RuntimeError):
        assert gpio.load_backend() is None
    else:
        pytest.skip("RPi.GPIO works here: this is a Pi")


# -- a node without server ---------------------------------------------------------------
def test_wait_for_server_blinks_saves_answers(node_config: Config) -> None:
    config = node_config.replace(led_pin=16)
    fake, result = FakeGPIO(), []
    stop = threading.Event()
    thread = threading.Thread(target=lambda: result.append(
        discovery.wait_for_server(config, gpio_backend=fake, stop=stop)))
    thread.start()
    try:
        wait_for(lambda: fake.outputs(), 5)
        replies = wait_for(lambda: broadcast(config, timeout=1.0), 10)
        thread.join(10)
    finally:
        stop.set()
        thread.join(10)
    password = password_of(config)
    assert list(replies.values()) == [{"MacID": MACID, "password": password}]
    assert result[0].server == f"http://{MACID}:{password}@couch.lab:5984"
    assert read_server_file(str(config.state_path / "server")) == result[0].server
    assert fake.calls[-1] == ("cleanup", 16)


def test_wait_for_server_ends_on_stop(node_config: Config) -> None:
    stop = threading.Event()
    stop.set()
    assert discovery.wait_for_server(node_config, stop=stop).server is None


def daemon_env(tmp_path: Path, port: int) -> dict[str, str]:
    empty_ini = tmp_path / "empty.conf"
    empty_ini.write_text("[himbeere]\n")
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                HIMBEERE_CONFIG=str(empty_ini),
                HIMBEERE_SERVER_FILE=str(tmp_path / "no-legacy-server-file"),
                HIMBEERE_DISCOVERY_PORT=str(port),
                HIMBEERE_DISCOVERY_ADDRESS=LOOPBACK_BROADCAST, HIMBEERE_LED_PIN="")


def wait_daemon_log(process: Any, log_path: Path, text: str) -> None:
    """Wait for ``text`` in the daemon's log; fail at once if the daemon exited."""
    def log() -> str:
        return log_path.read_text(errors="replace")

    wait_for(lambda: text in log() or process.poll() is not None, 30, message=log)
    assert text in log(), f"the daemon exited ({process.returncode}):\n{log()}"


@contextmanager
def daemon_without_server(tmp_path: Path, port: int,
                          flags: tuple[str, ...] = ()) -> Iterator[tuple[Any, Path, Path]]:
    """A ``python -m himbeere daemon`` process: (process, state dir, log file)."""
    state, log_path = tmp_path / "node-state", tmp_path / "node.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "himbeere", "daemon", "--state-dir", str(state),
             "--mac-id", str(MACID), "--heartbeat-interval", "1", "--grace-period", "2",
             *flags],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=daemon_env(tmp_path, port), cwd=str(ROOT))
    try:
        yield process, state, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_daemon_without_server_pairs_then_starts(tmp_path: Path) -> None:
    port = free_udp_port()
    server = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens: the feed retries
    with daemon_without_server(tmp_path, port) as (process, state, log_path):
        def log() -> str:
            return log_path.read_text(errors="replace")

        wait_daemon_log(process, log_path, "waiting for a pairing broadcast")
        assert not (state / "server").exists()
        replies = discovery.broadcast_message(server, timeout=2.0, port=port,
                                              broadcast_address=LOOPBACK_BROADCAST)
        password = (state / identity.PASSWORD_FILE).read_text().strip()
        assert list(replies.values()) == [{"MacID": MACID, "password": password}]
        assert read_server_file(str(state / "server")) == \
            f"http://{MACID}:{password}@127.0.0.1:{server.rsplit(':', 1)[1]}"
        # ...and then it runs as a daemon with that server.
        wait_daemon_log(process, log_path,
                        f"himbeere node {MACID}: server http://{MACID}:***@127.0.0.1")
        assert password not in log()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log()


@pytest.mark.slow
def test_daemon_waiting_for_server_stops_on_sigterm(tmp_path: Path) -> None:
    with daemon_without_server(tmp_path, free_udp_port()) as (process, state, log_path):
        wait_daemon_log(process, log_path, "waiting for a pairing broadcast")
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()
    assert "stopped while waiting" in log_path.read_text()
    assert not (state / "server").exists()


@pytest.mark.slow
def test_running_daemon_answers_only_after_himbeere_pair(tmp_path: Path) -> None:
    port = free_udp_port()
    server = f"http://127.0.0.1:{free_tcp_port()}"
    with daemon_without_server(tmp_path, port, ("--server", server)) as (process, state,
                                                                          log_path):
        def log() -> str:
            return log_path.read_text(errors="replace")

        def ask() -> discovery.Replies:
            return discovery.broadcast_message("http://new.lab:5984", timeout=0.5, port=port,
                                               broadcast_address=LOOPBACK_BROADCAST)

        wait_daemon_log(process, log_path, f"himbeere node {MACID}")
        # The listener may still be starting: ask until the refusal shows in the log.
        wait_for(lambda: ask() == {} and "ignored: pairing is closed" in log(), 30,
                 message=log)
        pair = subprocess.run(
            [sys.executable, "-m", "himbeere", "pair", "--state-dir", str(state)],
            env=daemon_env(tmp_path, port), cwd=str(ROOT), capture_output=True, text=True,
            timeout=60)
        assert pair.returncode == 0, pair.stderr
        assert "pairing open until" in pair.stdout
        replies = ask()
        password = (state / identity.PASSWORD_FILE).read_text().strip()
        assert list(replies.values()) == [{"MacID": MACID, "password": password}]
        assert read_server_file(str(state / "server")) == \
            f"http://{MACID}:{password}@new.lab:5984"
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log()


# -- across two network namespaces -----------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair: (node ns, laptop ns, subnet prefix).

    The node gets 10.213.N.1/24, the laptop 10.213.N.2/24 and a default route
    through the veth, so even 255.255.255.255 stays between the two.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces")
    tag = secrets.token_hex(3)
    node_ns, laptop_ns = f"himb-test-{tag}-node", f"himb-test-{tag}-laptop"
    prefix = f"10.213.{secrets.randbelow(256)}"
    made: list[str] = []
    try:
        for ns in (node_ns, laptop_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"hn{tag}", "netns", node_ns, "type", "veth",
            "peer", "name", f"hl{tag}", "netns", laptop_ns)
        for ns, dev, host in ((node_ns, f"hn{tag}", 1), (laptop_ns, f"hl{tag}", 2)):
            _ip("-n", ns, "addr", "add", f"{prefix}.{host}/24", "brd", "+", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", laptop_ns, "route", "add", "default", "dev", f"hl{tag}")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot make network namespaces here: {stderr.decode().strip() or exc}")
    try:
        yield node_ns, laptop_ns, prefix
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


NODE_SCRIPT = """
import json, logging, sys
from himbeere import discovery
from himbeere.config import Config
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
config = Config(state_dir=sys.argv[1], mac_id=int(sys.argv[2]), led_pin=None,
                fleet_key_file=sys.argv[3]).validate()
print(json.dumps(discovery.receive_broadcast_message(config, timeout=30)), flush=True)
"""

LAPTOP_SCRIPT = """
import json, logging, sys
from himbeere import discovery
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
replies = discovery.broadcast_message(sys.argv[1], timeout=3, broadcast_address=sys.argv[2],
                                      fleet_key=open(sys.argv[3]).read().strip())
print(json.dumps({f"{ip}:{port}": reply for (ip, port), reply in replies.items()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("broadcast_to", ["255.255.255.255", "subnet"])
def test_round_trip_across_network_namespaces(
    namespaces: tuple[str, str, str], tmp_path: Path, broadcast_to: str
) -> None:
    node_ns, laptop_ns, prefix = namespaces
    address = f"{prefix}.255" if broadcast_to == "subnet" else broadcast_to
    key_file = write_key(tmp_path / "fleet.key")
    state, node_log = tmp_path / "state", tmp_path / "node.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(node_log, "wb") as log:
        node = subprocess.Popen(
            ["ip", "netns", "exec", node_ns, sys.executable, "-c", textwrap.dedent(NODE_SCRIPT),
             str(state), str(MACID), key_file],
            stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT))
    try:
        wait_for(lambda: "waiting for a pairing broadcast" in node_log.read_text(), 30,
                 message=lambda: node_log.read_text())
        laptop = subprocess.run(
            ["ip", "netns", "exec", laptop_ns, sys.executable, "-c",
             textwrap.dedent(LAPTOP_SCRIPT), SERVER, address, key_file],
            capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=60)
        assert laptop.returncode == 0, laptop.stderr
        out, _ = node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
    password = (state / identity.PASSWORD_FILE).read_text().strip()
    assert json.loads(laptop.stdout) == {
        f"{prefix}.1:{defaults.DISCOVERY_PORT}": {"MacID": MACID,
                                                           "password": password}}
    assert json.loads(out) == f"http://{MACID}:{password}@couch.lab:5984"


# -- pairing a node whose daemon runs with credentials of its own (issue 12, item 10) ---
@pytest.mark.slow
def test_pairing_keeps_the_password_a_running_daemon_uses(
        node_factory: Any, node_user: Any, couch_url: str, dbname: str, tmp_path: Path,
        capsys: Any) -> None:
    """Regression: `himbeere pair` then `himbeere-upload discover` set the state
    directory's password on the node's user, and the daemon, started with its
    credentials in --server, got 401 on everything from then on."""
    from himbeere.couch import Couch
    from uploader import cli as upload_cli

    mac, url = node_user()
    node = node_factory(mac_id=mac, url=url)
    wait_for(node.status, 30, message=node.log)
    empty_ini = tmp_path / "empty.conf"
    empty_ini.write_text("[himbeere]\n")
    assert cli.main(["pair", "--config", str(empty_ini),
                     "--state-dir", str(node.state_dir)]) == 0
    assert "pairing open until" in capsys.readouterr().out

    code = upload_cli.main(
        ["discover", "--timeout", "2", "--port", str(node.discovery_port),
         "--broadcast-address", LOOPBACK_BROADCAST,
         "--node-server", ",".join(Couch(couch_url).bases)],
        environ={"HIMBEERE_SERVER": couch_url, "HIMBEERE_DATABASE": dbname})
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"answer from 127.0.0.1: MAC id {mac}" in err
    assert out.splitlines()[1].split()[:1] == [str(mac)]
    assert out.splitlines()[1].split()[-1] == "unchanged"  # the password it already had
    # The daemon's credentials still work, and it goes on writing heartbeats.
    assert Couch(url).session_info()["userCtx"]["name"] == str(mac)
    seen = (node.status() or {}).get("_rev")
    wait_for(lambda: (node.status() or {}).get("_rev") != seen, 30, message=node.log)
    # (": 401 " as the daemon logs a refusal: the test's temporary path may hold "401")
    assert ": 401 " not in node.log()
    # A later start without --server uses the saved server, with that password too.
    saved = read_server_file(str(node.state_dir / "server"))
    assert discovery.password_in(saved, mac) == discovery.password_in(url, mac) is not None

"""Pairing: a laptop broadcasts the server's URL, nodes answer with their credentials.

The wire format is the original HimbeereCouch's, JSON in UDP datagrams to
port 53000::

    laptop -> broadcast  {"server": "http://couch.lab:5984"}
    node   -> laptop     {"MacID": 202481587074134, "password": "..."}

**Pairing window.**  A node answers only while pairing is open: from boot
until it has a server (:func:`wait_for_server`), or for ``pairing_window``
seconds (10 minutes) after ``himbeere pair``.  That command writes the time
into ``<state_dir>/pairing``; the daemon's :class:`Listener` reads the file
at each request, so no signal or restart is needed, and deleting the file
(``himbeere pair --close``) closes the window.  Requests outside the window
are logged and ignored.

**Fleet key.**  With a shared secret in ``fleet_key_file`` on the nodes and
given to the laptop, a request also carries ``ts`` (unix time), ``nonce``
(32 random hex digits) and ``hmac``.  A node ignores a request without a
valid HMAC, with a timestamp more than ``PAIRING_MAX_SKEW`` from its clock,
or with a nonce it has seen.  It answers with ``"encryption":
"fleet-key-v1"`` and ``"password"`` holding base64(nonce + AES-256-GCM
ciphertext), bound to the request's nonce and the node's MAC id, so a
captured reply is of no use for any other request.  Both keys come from
the fleet key through HKDF-SHA256 (:mod:`cryptography`).

**Trusted keys.**  With a fleet key, a request may also carry
``"trusted_keys": [<base64 public key>, ...]``, the deployers' signing keys
(:mod:`himbeere.signing`), covered by the HMAC.  A node that checks the HMAC
adds them to ``<state_dir>/trusted_keys``, which it reads with its config.
A request without them has the HMAC it always had; a node without a fleet
key ignores them (anyone on the network could have sent them).

**What a node keeps.**  The server URL, with the node's own credentials put
in (``http://<macid>:<password>@host:5984``; a user name or password in the
broadcast URL is dropped), goes to ``<state_dir>/server`` (mode 0600), which
:func:`himbeere.config.load` reads when no server is set elsewhere.

**Which password.**  The state directory's (``<state_dir>/password``),
unless the running daemon logs in as its own user with a password given in
``server`` (``--server http://<macid>:PW@host``): then that one, so that
pairing never changes the password a running daemon uses.
``himbeere pair`` refuses when no daemon runs on the state directory.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from . import config as configuration
from . import defaults, identity, signing, statelock
from .component import Component
from .config import Config, redact
from .couch import split_servers
from .exceptions import ConfigError, HimbeereError
from .fleetkey import as_key, decrypt_password, encrypt_password, read_fleet_key, sign, verify
from .gpio import Blinker

log = logging.getLogger(__name__)

Address = Tuple[str, int]
Replies = Dict[Address, Dict[str, Any]]

#: File in the state directory holding the time ``himbeere pair`` was run.
PAIRING_FILE = "pairing"
ENCRYPTION = "fleet-key-v1"
#: Largest UDP payload over IPv4.
MAX_DATAGRAM = 65507
#: A pairing file up to this many seconds in the future still counts (clock steps).
_CLOCK_SLACK = 60.0
#: Ignored requests of one kind are logged at most once per this many seconds.
_LOG_EVERY = 10.0
_HEX32 = re.compile(r"[0-9a-f]{32}")


# -- the laptop side -------------------------------------------------------------------
def make_request(server_url: str, key: Optional[bytes] = None,
                 now: Optional[float] = None,
                 trusted_keys: Optional[list[str]] = None) -> Tuple[bytes, Optional[str]]:
    """The request datagram and its nonce (``None`` without a fleet key)."""
    if key is None:
        if trusted_keys:
            raise ConfigError("trusted keys are handed to nodes only with the fleet key "
                              "(--fleet-key-file): without it anyone could hand them theirs")
        return json.dumps({"server": server_url}).encode(), None
    import secrets  # here: the laptop's side; it costs a node hashlib

    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    request: Dict[str, Any] = {"server": server_url, "ts": ts, "nonce": nonce}
    if trusted_keys:
        request["trusted_keys"] = list(trusted_keys)
    request["hmac"] = sign(key, server_url, ts, nonce, _keys_text(request) or "")
    return json.dumps(request).encode(), nonce


def _keys_text(request: Dict[str, Any]) -> Optional[str]:
    """What of ``trusted_keys`` the HMAC covers ("" without; None: not a list of str)."""
    keys = request.get("trusted_keys")
    if keys is None:
        return ""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    return "trusted_keys\n" + "\n".join(keys)


def _check_broadcast_url(url: str) -> None:
    for one in split_servers(url):  # a cluster: several, separated by commas
        parts = urllib.parse.urlsplit(one)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server: {redact(one)!r} is not a URL; allowed: "
                              "http(s)://host[:port], several separated by commas")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"server: {redact(one)!r} holds a user name or password, which would be "
                "broadcast in clear to the whole network; give the URL alone (nodes log in "
                "as themselves)"
            )


def broadcast_message(
    server_url: str = "",
    timeout: float = 10,
    port: int = defaults.DISCOVERY_PORT,
    broadcast_address: str = "255.255.255.255",
    fleet_key: Union[str, bytes, None] = None,
    on_reply: Optional[Callable[[Address, Dict[str, Any]], None]] = None,
    *,
    send_data: Any = None,
    trusted_keys: Optional[list[str]] = None,
) -> Replies:
    """Tell listening nodes the server; return ``{(ip, port): {"MacID", "password"}}``.

    Waits ``timeout`` seconds for answers and calls ``on_reply(address,
    reply)`` for each as it comes.  With ``fleet_key`` the request is signed
    and only replies whose password decrypts are kept (decrypted).
    ``broadcast_address`` may be a subnet's broadcast (``10.0.0.255``) or one
    node's address when broadcasts do not get through.  ``send_data`` sends
    that JSON instead, as the original allowed (no fleet key then).
    ``trusted_keys`` (base64 public keys, with ``fleet_key`` only) go to the
    nodes, which trust them from then on.
    """
    key = None if fleet_key is None else as_key(fleet_key)
    nonce: Optional[str] = None
    if send_data is not None:
        if key is not None:
            raise ConfigError("send_data: cannot be sent with a fleet key; send a server URL")
        datagram = json.dumps(send_data).encode()
    else:
        _check_broadcast_url(server_url)
        datagram, nonce = make_request(server_url, key, trusted_keys=trusted_keys)
    if len(datagram) > MAX_DATAGRAM:
        raise ConfigError(f"send_data: {len(datagram)} bytes; at most {MAX_DATAGRAM} fit")
    replies: Replies = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("", 0))
        try:
            sock.sendto(datagram, (broadcast_address, port))
        except OSError as exc:
            raise HimbeereError(
                f"cannot send the broadcast to {broadcast_address}:{port}: "
                f"{exc.strerror or exc}; try the subnet's broadcast address (10.0.0.255)"
            ) from None
        log.debug("sent %d bytes to %s:%d", len(datagram), broadcast_address, port)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                break
            reply = read_reply(data, address, key, nonce)
            if reply is not None:
                replies[address] = reply
                if on_reply is not None:
                    on_reply(address, reply)
    return replies


def read_reply(data: bytes, address: Address, key: Optional[bytes],
               nonce: Optional[str]) -> Optional[Dict[str, Any]]:
    """A node's reply with its password in clear, or ``None`` (logged) if unusable."""
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        log.warning("reply from %s ignored: not a JSON object", address[0])
        return None
    if key is None:
        if "encryption" in reply:
            log.warning("reply from %s ignored: its password is encrypted with a fleet key; "
                        "give the fleet key", address[0])
            return None
        return reply
    macid = reply.get("MacID")
    if reply.get("encryption") != ENCRYPTION or not isinstance(macid, int) or nonce is None:
        # Without the fleet key anyone on the network could have sent it.
        log.warning("reply from %s ignored: not encrypted with the fleet key (is the key "
                    "set on that node?)", address[0])
        return None
    try:
        password = decrypt_password(key, str(reply.get("password")), nonce, macid)
    except HimbeereError as exc:
        log.warning("reply from %s ignored: %s", address[0], exc)
        return None
    return {"MacID": macid, "password": password}


# -- the pairing window ----------------------------------------------------------------
def daemon_running(state_dir: Union[str, os.PathLike[str]]) -> bool:
    """Whether a daemon holds the lock of ``state_dir`` (:mod:`himbeere.statelock`).

    It tries a shared lock on the lock file and gives it up at once: a
    daemon's exclusive lock refuses it.  Within the process that holds the
    lock the probe would *convert* that lock (POSIX locks belong to the
    process), and closing the probe's fd would drop it: so ask
    :func:`statelock.held` first.
    """
    if statelock.held(Path(state_dir)):
        return True
    path = Path(state_dir).absolute() / statelock.LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no daemon ever ran here
    except OSError:
        return True  # cannot tell; open_pairing says what is wrong with the directory
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the probe's lock
    return False


def require_daemon(config: Config) -> None:
    """Raise unless a daemon runs on ``config``'s state directory: only it answers."""
    if not daemon_running(config.state_dir):
        raise HimbeereError(
            f"no himbeere daemon runs on state directory {config.state_path.absolute()}, and "
            "only a running daemon answers pairing; start it (systemctl start himbeere, or "
            "himbeere daemon) and run himbeere pair again")


def open_pairing(config: Config, now: Optional[float] = None) -> float:
    """Open the pairing window (``himbeere pair``); return when it closes."""
    now = time.time() if now is None else now
    path = config.state_path / PAIRING_FILE
    tmp = path.with_name(f".{PAIRING_FILE}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{now}\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HimbeereError(
            f"cannot open pairing: {path}: {exc.strerror or exc}; run as the daemon's user"
        ) from None
    return now + config.pairing_window


def close_pairing(config: Config) -> bool:
    """Close the pairing window; ``False`` if it was not open."""
    path = config.state_path / PAIRING_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise HimbeereError(f"cannot close pairing: {path}: {exc.strerror or exc}") from None
    return True


def pairing_opened_at(config: Config) -> Optional[float]:
    """When ``himbeere pair`` was last run, or ``None``."""
    path = config.state_path / PAIRING_FILE
    try:
        return float(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("pairing file %s is unreadable (%s); pairing stays closed", path, exc)
        return None


# -- the node side ---------------------------------------------------------------------
class Pairing:
    """How a node answers pairing requests: window, fleet key, replay check.

    ``until_configured=True`` opens the window regardless of ``himbeere
    pair`` (a node without a server).  :meth:`handle` turns one datagram into
    the reply to send, or ``None``; after a reply, :attr:`paired` is the
    server URL (with the node's credentials) that was saved.
    """

    def __init__(self, config: Config, until_configured: bool = False,
                 on_server: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.time,
                 max_skew: float = defaults.PAIRING_MAX_SKEW) -> None:
        self.config = config
        self.until_configured = until_configured
        self.on_server = on_server
        self.clock = clock
        self.max_skew = max_skew
        self.key = read_fleet_key(config.fleet_key_file) if config.fleet_key_file else None
        self.macid = identity.getmacid(config.interface, config.mac_id)
        self.paired: Optional[str] = None
        self._nonces: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._ignored: Dict[str, Tuple[float, int]] = {}

    def window_open(self) -> bool:
        if self.until_configured:
            return True
        opened = pairing_opened_at(self.config)
        return opened is not None and (
            -_CLOCK_SLACK <= self.clock() - opened < self.config.pairing_window)

    def handle(self, data: bytes, address: Address) -> Optional[bytes]:
        """The reply to the request ``data`` from ``address``, or ``None``."""
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        server = request.get("server") if isinstance(request, dict) else None
        if not isinstance(server, str) or not server.isascii() or len(server) > 2048:
            log.debug("datagram from %s is no pairing request", address[0])
            return None
        peer = address[0]
        if not self.window_open():
            minutes = self.config.pairing_window / 60
            self._ignore(peer, "closed", f"pairing is closed; run `himbeere pair` on this node "
                                         f"to open it for {minutes:g} minutes")
            return None
        nonce = None
        if self.key is not None:
            refusal = self._refusal(request)
            if refusal is not None:
                self._ignore(peer, *refusal)
                return None
            nonce = str(request["nonce"])
            self._take_keys(request, peer)
        elif "trusted_keys" in request:
            log.warning("pairing request from %s: its trusted_keys are ignored: this node "
                        "has no fleet key, so anyone could have sent them", peer)
        password = self.password()
        try:
            server = self._node_url(server, password)
        except ConfigError as exc:
            self._ignore(peer, "url", str(exc))
            return None
        try:
            configuration.save_server(self.config, server)
        except OSError as exc:
            log.error("pairing request from %s not answered: cannot save the server: %s",
                      peer, exc)
            return None
        reply: Dict[str, Any] = {"MacID": self.macid, "password": password}
        if self.key is not None and nonce is not None:
            reply["password"] = encrypt_password(self.key, password, nonce, self.macid)
            reply["encryption"] = ENCRYPTION
        self.paired = server
        log.info("paired by %s: server %s saved, answering as node %s",
                 peer, redact(server), self.macid)
        if self.on_server is not None:
            self.on_server(server)
        return json.dumps(reply).encode()

    def _take_keys(self, request: Dict[str, Any], peer: str) -> None:
        """Trust the keys of a request whose HMAC was checked (written to the state dir)."""
        keys = request.get("trusted_keys")
        if not keys:
            return
        try:
            added = signing.add_keys(self.config.state_path, keys)
        except (HimbeereError, OSError) as exc:
            log.error("pairing request from %s: cannot keep its trusted keys: %s", peer, exc)
            return
        if added:
            log.info("pairing: now trusting signing key(s) %s (in %s; a reload or restart "
                     "applies them)", ", ".join(added),
                     self.config.state_path / signing.KEYS_FILE)

    def password(self) -> str:
        """The password this node answers with: the one its daemon logs in with.

        A daemon given its node user's credentials in ``server`` (``--server
        http://<macid>:PW@host:5984``) keeps using them.  Answering with the
        state directory's password instead made ``himbeere-upload discover``
        set that one on the node's user, and the running daemon got 401 on
        everything from then on (issue 12): pairing never changes a password
        the daemon does not use.
        """
        in_use = password_in(self.config.server, self.macid)
        if in_use is not None:
            return in_use
        return identity.getpassword(self.config.state_dir, legacy=self.config.legacy_password,
                                    macid=self.macid)

    def _refusal(self, request: Dict[str, Any]) -> Optional[Tuple[str, str]]:
        """Why a request fails the fleet key checks, or ``None`` if it passes."""
        ts, nonce, mac = request.get("ts"), request.get("nonce"), request.get("hmac")
        if not (isinstance(ts, int) and isinstance(nonce, str) and isinstance(mac, str)
                and _HEX32.fullmatch(nonce)):
            return "hmac", "no HMAC, and this node has a fleet key"
        extra = _keys_text(request)
        if extra is None:
            return "keys", "trusted_keys: allowed: a list of base64 public keys"
        if not verify(self.key or b"", mac, request["server"], ts, nonce, extra):
            return "hmac", "wrong HMAC (another fleet key?)"
        skew = ts - self.clock()
        if abs(skew) > self.max_skew:
            return "time", (f"its time is {skew:+.0f} s from this node's clock (allowed "
                            f"±{self.max_skew:g} s); are both clocks set (NTP)?")
        now = time.monotonic()
        while self._nonces and next(iter(self._nonces.values())) < now:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            return "replay", "replayed (its nonce was seen before)"
        # Kept until its timestamp has left the window in either direction.
        self._nonces[nonce] = now + 2 * self.max_skew
        return None

    def _node_url(self, url: str, password: str) -> str:
        """``url`` checked, with this node's credentials in place of any given."""
        self.config.replace(server=url)  # raises ConfigError naming what is wrong
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{self.macid}:{urllib.parse.quote(password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def _ignore(self, peer: str, kind: str, reason: str) -> None:
        # A flood of requests must not fill the SD card with log lines.
        now = time.monotonic()
        last, suppressed = self._ignored.get(kind, (-_LOG_EVERY, 0))
        if now - last < _LOG_EVERY:
            self._ignored[kind] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more like it not logged)" if suppressed else ""
        log.warning("pairing request from %s ignored: %s%s", peer, reason, more)
        self._ignored[kind] = (now, 0)


def password_in(server: Optional[str], macid: int) -> Optional[str]:
    """The password of user ``macid`` in the URL(s) ``server``, or ``None``."""
    for url in split_servers(server) if server else []:
        try:
            parts = urllib.parse.urlsplit(url)
            user, password = parts.username, parts.password
        except ValueError:
            continue  # validate() reports a bad URL; here it just holds no password
        if user is not None and password and urllib.parse.unquote(user) == str(macid):
            return urllib.parse.unquote(password)
    return None


def open_socket(config: Config) -> socket.socket:
    """The UDP socket on which a node listens for pairing requests."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((config.discovery_address, config.discovery_port))
    except OSError as exc:
        sock.close()
        where = f"{config.discovery_address or '*'}:{config.discovery_port}"
        raise HimbeereError(
            f"discovery_port: cannot listen on UDP {where}: {exc.strerror or exc}; "
            "is another himbeere daemon running?"
        ) from None
    return sock


def serve_once(sock: socket.socket, pairing: Pairing, wait: float) -> Optional[str]:
    """Answer at most one request arriving within ``wait`` seconds.

    Returns the saved server URL if this request paired the node.
    """
    sock.settimeout(wait)
    try:
        data, address = sock.recvfrom(MAX_DATAGRAM)
    except socket.timeout:
        return None
    try:
        reply = pairing.handle(data, address)
    except Exception:
        log.exception("pairing request from %s failed", address[0])
        return None
    if reply is None:
        return None
    try:
        sock.sendto(reply, address)
    except OSError as exc:
        log.warning("could not answer %s: %s", address[0], exc)
    return pairing.paired


def receive_broadcast_message(config: Optional[Config] = None, timeout: Optional[float] = None,
                              stop: Optional[threading.Event] = None) -> Optional[str]:
    """Wait for one pairing request, answer it, and return the saved server URL.

    The window is open (a node without a server).  ``None`` after
    ``timeout`` seconds, or once ``stop`` is set.  ``config`` defaults to
    the node's (:func:`himbeere.config.load`).
    """
    config = configuration.load() if config is None else config
    stop = stop or threading.Event()
    pairing = Pairing(config, until_configured=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    with open_socket(config) as sock:
        log.info("waiting for a pairing broadcast on UDP port %d (himbeere-upload discover)",
                 config.discovery_port)
        while not stop.is_set():
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return None
            server = serve_once(sock, pairing, wait)
            if server is not None:
                return server
    return None


class Listener(Component):
    """Answers pairing requests from a thread while the daemon runs.

    The window opens only through ``himbeere pair``; ``on_server(url)`` is
    called when a pairing saved a server.  Problems (port taken, fleet key
    file missing) are logged: the daemon runs on without pairing.
    """

    name = "himbeere-pairing"
    stop_timeout = 2.0

    def __init__(self, config: Config, on_server: Optional[Callable[[str], None]] = None) -> None:
        super().__init__()
        self.config = config
        self.on_server = on_server
        self.pairing: Optional[Pairing] = None
        self.sock: Optional[socket.socket] = None

    def start(self) -> Listener:
        try:
            self.pairing = Pairing(self.config, on_server=self._saved)
            self.sock = open_socket(self.config)
        except HimbeereError as exc:
            log.error("pairing is off: %s", exc)
            return self
        return super().start()

    def loop(self, wait: float = 0.5) -> None:
        """One step: answer at most one request."""
        if self.sock is not None and self.pairing is not None:
            serve_once(self.sock, self.pairing, wait)

    def _saved(self, server: str) -> None:
        if self.on_server is not None:
            self.on_server(server)
        elif server != self.config.server:
            log.warning("the daemon keeps using %s until it restarts (and then only if no "
                        "config file, HIMBEERE_SERVER or --server names one)",
                        redact(self.config.server))

    def after_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def wait_for_server(config: Config, reload_config: Optional[Callable[[], Config]] = None,
                    gpio_backend: Any = None, stop: Optional[threading.Event] = None) -> Config:
    """Wait, blinking the LED, until a laptop pairs this node; return the new config.

    For a daemon started without a server.  TERM or INT (or ``stop``) end
    the wait and ``config`` comes back still without a server; HUP re-reads
    the configuration with ``reload_config`` and returns it if it names a
    server by now.
    """
    stop = stop or threading.Event()
    reload = threading.Event()
    restore = _catch_signals(stop, reload)
    try:
        with Blinker(config.led_pin, gpio_backend):
            while not stop.is_set():
                pairing = Pairing(config, until_configured=True)
                with open_socket(config) as sock:
                    log.info("no server configured: waiting for a pairing broadcast on UDP "
                             "port %d (run `himbeere-upload discover`)", config.discovery_port)
                    while not stop.is_set() and not reload.is_set():
                        server = serve_once(sock, pairing, 0.5)
                        if server is not None:
                            return dataclasses.replace(config, server=server)
                if reload.is_set() and not stop.is_set():
                    reload.clear()
                    config = _reloaded(config, reload_config)
                    if config.server:
                        log.info("the configuration names a server now: %s",
                                 redact(config.server))
                        return config
        log.info("stopped while waiting for a pairing broadcast")
        return config
    finally:
        restore()


def _reloaded(config: Config, reload_config: Optional[Callable[[], Config]]) -> Config:
    if reload_config is None:
        return config
    try:
        return reload_config()
    except (HimbeereError, OSError) as exc:
        log.error("reload: %s; keeping the old configuration", exc)
        return config


def _catch_signals(stop: threading.Event, reload: threading.Event) -> Callable[[], None]:
    """Make TERM/INT set ``stop`` and HUP set ``reload``; return the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: Dict[int, Any] = {}
    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}
    for signum, flag in handlers.items():
        previous[signum] = signal.signal(signum, _setter(flag))

    def restore() -> None:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    return restore


def _setter(flag: threading.Event) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        flag.set()  # only a flag: logging in a signal handler is unsafe

    return handler

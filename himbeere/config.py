"""The daemon's settings: INI file, then ``HIMBEERE_*`` variables, then flags.

Every setting has the same name in all three places: ``heartbeat_interval``
in section ``[himbeere]`` of the INI file, ``HIMBEERE_HEARTBEAT_INTERVAL`` in
the environment and ``--heartbeat-interval`` on the command line.  A later
source wins.  The original HimbeereCouch server file (one line holding the
URL, default ``/var/rspby/server``) is read when no server is set elsewhere.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from . import couch, defaults
from .exceptions import ConfigError

SECTION = "himbeere"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a node needs to know; build it with :func:`load`."""

    server: Optional[str] = None
    database: str = defaults.DATABASE
    status_database: Optional[str] = None
    state_dir: str = defaults.STATE_DIR
    interface: str = defaults.INTERFACE
    mac_id: Optional[int] = None
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    feed_timeout: float = defaults.FEED_TIMEOUT
    grace_period: float = defaults.GRACE_PERIOD
    restart_policy: str = defaults.RESTART_POLICY
    command_timeout: float = defaults.COMMAND_TIMEOUT
    max_programs: int = defaults.MAX_PROGRAMS
    legacy_password: bool = False
    log_file: Optional[str] = None
    log_max_bytes: int = defaults.LOG_MAX_BYTES
    log_backups: int = defaults.LOG_BACKUPS
    program_log_rate: float = defaults.PROGRAM_LOG_RATE
    pid_file: Optional[str] = None
    server_file: str = defaults.LEGACY_SERVER_FILE
    discovery_port: int = defaults.DISCOVERY_PORT
    discovery_address: str = ""
    fleet_key_file: Optional[str] = None
    led_pin: Optional[int] = defaults.LED_PIN
    pairing_window: float = defaults.PAIRING_WINDOW
    history_interval: float = defaults.HISTORY_INTERVAL
    #: Public keys whose signatures this node trusts (see :mod:`himbeere.signing`).
    trusted_keys: str = ""
    #: Run only code and commands signed by a trusted key.
    require_signed: bool = False

    @property
    def status_db(self) -> str:
        """The status database's name: set, or ``<database>_status``."""
        return self.status_database or self.database + defaults.STATUS_SUFFIX

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def validate(self) -> Config:
        """Raise :class:`ConfigError` naming the first bad key; return self."""
        if self.server is not None:
            couch.server_urls(self.server)  # one URL, or several separated by commas
        for key in ("database", "status_database"):
            value = getattr(self, key)
            if value is not None and not _valid_db_name(value):
                raise ConfigError(
                    f"{key}: {value!r} is not a CouchDB database name; allowed: "
                    "lower-case letter first, then a-z 0-9 _ $ ( ) + - /"
                )
        for key in ("heartbeat_interval", "feed_timeout", "grace_period",
                    "command_timeout", "pairing_window", "history_interval"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: {getattr(self, key)!r} must be a number > 0")
        if self.restart_policy not in defaults.RESTART_POLICIES:
            raise ConfigError(
                f"restart_policy: {self.restart_policy!r} is not allowed; allowed: "
                + ", ".join(defaults.RESTART_POLICIES)
            )
        if self.program_log_rate < 0:
            raise ConfigError(f"program_log_rate: {self.program_log_rate!r} must be a number "
                              ">= 0 (lines per second; 0: none)")
        if self.log_max_bytes < 1024:
            raise ConfigError(f"log_max_bytes: {self.log_max_bytes!r} must be a whole number "
                              ">= 1024")
        if self.log_backups < 1:
            raise ConfigError(f"log_backups: {self.log_backups!r} must be a whole number >= 1")
        if self.max_programs < 1:
            raise ConfigError(
                f"max_programs: {self.max_programs!r} must be a whole number >= 1")
        if self.mac_id is not None and self.mac_id < 0:
            raise ConfigError(f"mac_id: {self.mac_id!r} must be a whole number >= 0")
        if not 0 < self.discovery_port < 65536:
            raise ConfigError(f"discovery_port: {self.discovery_port!r} must be 1 to 65535")
        if self.led_pin is not None and self.led_pin < 0:
            raise ConfigError(f"led_pin: {self.led_pin!r} must be a BCM pin number >= 0, "
                              "or empty for no LED")
        if self.trusted_keys:
            from .signing import parse_trusted  # reads .pub files; errors name the entry

            parse_trusted(self.trusted_keys)
        return self

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes).validate()


def _valid_db_name(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_$()+-/")
    return bool(name) and name[0].islower() and name[0].isalpha() and set(name) <= allowed


def redact(url: Optional[str]) -> str:
    """``url`` (or a list of them) with any password as ``***``, for logs and errors."""
    if not url:
        return str(url)
    try:
        urls = couch.split_servers(url)
    except ValueError:  # an unbalanced "[" of IPv6: no list to split; redact the whole
        urls = [url]
    return ",".join(_redact_one(one) for one in urls)


def _redact_one(url: str) -> str:
    """One URL with its password as ``***``; the host part is kept as written.

    Rebuilding the host from ``hostname`` and ``port`` lost an IPv6
    address's brackets: ``http://u:p@[::1]:5984`` became ``::1:5984``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "http://u:p@[::1": no URL, yet its password stays unprinted
        return url.rpartition("@")[2]
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _convert(key: str, raw: Any) -> Any:
    """Turn a string from a file, variable or flag into the field's type."""
    if not isinstance(raw, str):
        return raw
    kind = str(FIELDS[key].type)
    raw = raw.strip()
    if kind.startswith("Optional") and raw == "":
        return None
    try:
        if "float" in kind:
            return float(raw)
        if "int" in kind:
            return int(raw, 0)
    except ValueError:
        allowed = "a number" if "float" in kind else "a whole number"
        raise ConfigError(f"{key}: {raw!r} is not {allowed}") from None
    if "bool" in kind:
        lowered = raw.lower()
        if lowered in ("1", "yes", "true", "on"):
            return True
        if lowered in ("0", "no", "false", "off"):
            return False
        raise ConfigError(f"{key}: {raw!r} is not allowed; allowed: yes, no, true, false, 1, 0")
    return raw


def read_ini(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except configparser.Error as exc:
        raise ConfigError(f"config file {path}: {exc.message.splitlines()[0]}") from None
    if not parser.has_section(SECTION):
        return {}
    values = dict(parser.items(SECTION))
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown key in [{SECTION}] of {path}; allowed: "
            + ", ".join(FIELDS)
        )
    return values


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for key in FIELDS:
        name = "HIMBEERE_" + key.upper()
        if name in environ:
            values[key] = environ[name]
    return values


def load(
    flags: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
    config_file: Optional[str] = None,
) -> Config:
    """Merge INI file, environment and ``flags`` (``None`` values are unset)."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    explicit = config_file or flags.pop("config", None) or environ.get("HIMBEERE_CONFIG")
    path = Path(explicit or defaults.CONFIG_FILE)
    values: dict[str, Any] = {}
    if path.exists():
        values.update(read_ini(path))
    elif explicit:
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    values.update(from_environ(environ))
    values.update(flags)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting; allowed: " + ", ".join(FIELDS))
    converted = {key: _convert(key, value) for key, value in values.items()}
    config = Config(**converted)
    if config.server is None:
        server = read_server_file(config.server_file)
        server = server or read_server_file(str(config.state_path / "server"))
        config = dataclasses.replace(config, server=server)
    return config.validate()


def read_server_file(path: str) -> Optional[str]:
    """The URL in the original HimbeereCouch server file, if there is one."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


def save_server(config: Config, url: str) -> None:
    """Remember ``url`` for the next start (after pairing by broadcast)."""
    target = config.state_path / "server"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(url + "\n")
    os.replace(tmp, target)

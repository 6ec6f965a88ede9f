"""The node's commands of ``himbeere``: ``daemon``, ``launch`` and ``pair``.

``himbeere daemon`` runs a node in the foreground (for systemd and
supervisord); ``himbeere daemon start|stop|restart|reload|status`` runs it in
the background with a pidfile (for sysvinit and ``init_scripts/rspby``).
Errors print as one line; ``--debug`` shows the traceback.

The ``himbeere`` console script is the laptop's (:mod:`uploader.main`): it
adds the fleet, dashboard and upload commands to :func:`build_parser` and
hands a node's command straight to :func:`main`, so that a Pi never loads
the laptop side.  This package never imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

from . import __version__
from . import config as configuration
from .exceptions import HimbeereError

log = logging.getLogger("himbeere")

LOG_FORMAT = "%(asctime)s himbeere %(levelname)s %(message)s"


#: Every setting's flag: ``--<name>`` with its metavar and help.  tests/test_config.py
#: checks that each field of :class:`himbeere.config.Config` has one here.
SETTINGS: dict[str, tuple[str, str]] = {
    "server": ("URL", "CouchDB URL with credentials, http://user:pw@host:5984 (several: "
                      "comma-separated)"),
    "database": ("NAME", "code database (default raspberries)"),
    "status_database": ("NAME", "status database (default <database>_status)"),
    "state_dir": ("DIR", "where the node keeps seq, journal, password, pidfile, log "
                         "(default /var/lib/himbeere)"),
    "interface": ("IFACE", "network interface of the MAC id (default eth0)"),
    "mac_id": ("N", "use this MAC id (simulated nodes)"),
    "heartbeat_interval": ("S", "seconds between heartbeats (default 10)"),
    "feed_timeout": ("S", "seconds of silence after which the feed counts as dead "
                          "(default 30)"),
    "grace_period": ("S", "seconds a program has to quit before SIGTERM (default 10)"),
    "restart_policy": ("POLICY", "on-failure (default), always or never"),
    "command_timeout": ("S", "seconds a command may run unless it sets its own timeout "
                             "(default 300)"),
    "max_programs": ("N", "at most this many programs run at once; more are rejected "
                          "(default 64)"),
    "legacy_password": ("yes|no", "use the original's computable sha1(mac+serial) password "
                                  "(default no; the flag alone: yes)"),
    "log_file": ("FILE", "log file when in the background (default <state_dir>/himbeere.log)"),
    "log_max_bytes": ("N", "rotate the log file at this size (default 1048576)"),
    "log_backups": ("N", "old log files kept when rotating (default 3)"),
    "program_log_rate": ("LINES", "lines per second of each program's output in the daemon's "
                                  "log (default 20; all lines go to the status database)"),
    "pid_file": ("FILE", "pidfile of a background daemon (default <state_dir>/himbeere.pid)"),
    "server_file": ("FILE", "the original's file holding the server URL (default "
                            "/var/rspby/server)"),
    "discovery_port": ("PORT", "UDP port on which pairing listens (default 53000; simulated "
                               "nodes on one machine need one each)"),
    "discovery_address": ("ADDR", "address pairing listens on (default: all)"),
    "fleet_key_file": ("FILE", "file with the shared fleet key (default: none)"),
    "led_pin": ("PIN", "BCM pin of the pairing LED (default 16; empty: no LED)"),
    "pairing_window": ("S", "seconds `himbeere pair` opens pairing for (default 600)"),
    "history_interval": ("S", "seconds of one sample of the health history the dashboard "
                              "charts (default 300)"),
    "trusted_keys": ("KEYS", "public keys whose signatures this node trusts: base64, or "
                             "paths of .pub files, separated by commas (default: none)"),
    "require_signed": ("yes|no", "run only code and commands signed by a trusted key "
                                 "(default no)"),
}

#: The settings ``himbeere pair`` uses: where the daemon's state is, and its window.
PAIR_SETTINGS = ("state_dir",)


def add_config_flags(parser: argparse.ArgumentParser,
                     keys: Sequence[str] = tuple(SETTINGS)) -> None:
    """The settings ``keys`` as flags; they win over file and environment."""
    group = parser.add_argument_group("settings (flags win over HIMBEERE_* and the INI file)")
    group.add_argument("--config", metavar="FILE", help="INI file (default "
                       "/etc/himbeere/himbeere.conf, or HIMBEERE_CONFIG)")
    for key in keys:
        metavar, text = SETTINGS[key]
        flag = "--" + key.replace("_", "-")
        # A switch that a file's "yes" can be turned off by:
        if key in ("legacy_password", "require_signed"):
            group.add_argument(flag, metavar=metavar, nargs="?", const="yes", help=text)
        else:
            group.add_argument(flag, metavar=metavar, help=text)


#: Settings that name files: made absolute, for a daemon that runs in another directory.
PATH_SETTINGS = ("state_dir", "log_file", "pid_file", "server_file", "fleet_key_file")


def load_config(args: argparse.Namespace) -> Callable[[], configuration.Config]:
    """A function that (re)reads the configuration the way ``args`` asks."""
    flags: dict[str, Any] = {key: getattr(args, key, None) for key in SETTINGS}
    # A background daemon runs in /, and reload re-reads these: keep them absolute.
    for key in PATH_SETTINGS:
        if flags[key]:
            flags[key] = os.path.abspath(flags[key])
    config_file = os.path.abspath(args.config) if args.config else None

    def load() -> configuration.Config:
        return configuration.load(flags, config_file=config_file)

    return load


def cmd_daemon(args: argparse.Namespace) -> int:
    """Run the node daemon (foreground without an action)."""
    from . import daemon, service

    load = load_config(args)
    config = load()

    def run(cfg: configuration.Config) -> int:  # in the background: a log file of our own
        setup_logging(args.debug, service.log_path(cfg), cfg.log_max_bytes, cfg.log_backups)
        return daemon.run(cfg, load)

    if args.action is None:
        setup_logging(args.debug)
        return daemon.run(config, load)
    return service.control(args.action, config, run)


def cmd_launch(args: argparse.Namespace) -> int:
    """Run the daemon through the launcher (what systemd, supervisord and rspby start): it
    starts the active daemon version and reverts an upgrade that fails to come up
    (docs/upgrading.rst).  With an action, in the background with a pidfile."""
    from . import launch, service, statelock

    config = load_config(args)()
    launcher = launch.Launcher(config.state_path, daemon_argv(args),
                               heartbeat_timeout=float(args.upgrade_timeout))
    if args.action is None:
        setup_logging(args.debug)
        launcher.install_signals()
        return launcher.run()

    def run(cfg: configuration.Config) -> int:
        # The daemon logs to stdout, the log file here (no rotation: the daemon
        # writes through its own descriptor); the launcher logs there too.
        setup_logging(args.debug)
        statelock.release(cfg.state_dir)  # the daemon takes it: one daemon per node
        launcher.install_signals()
        return launcher.run()

    return service.control(args.action, config, run)


def daemon_argv(args: argparse.Namespace) -> list[str]:
    """The flags of ``args`` for ``himbeere daemon``, files as absolute paths."""
    argv = ["--config", os.path.abspath(args.config)] if args.config else []
    for key in SETTINGS:
        value = getattr(args, key, None)
        if value is not None:
            argv += ["--" + key.replace("_", "-"),
                     os.path.abspath(value) if key in PATH_SETTINGS else str(value)]
    return argv + (["--debug"] if args.debug else [])


def cmd_pair(args: argparse.Namespace) -> int:
    """Open pairing on this node: for pairing_window seconds (10 minutes) the running
    daemon answers `himbeere-upload discover` with the node's credentials."""
    import time

    from . import discovery

    config = load_config(args)()
    if args.close:
        closed = discovery.close_pairing(config)
        print("pairing closed" if closed else "pairing was not open")
        return 0
    # Only a running daemon answers: an open window with none would wait for nothing.
    discovery.require_daemon(config)
    until = discovery.open_pairing(config)
    print(f"pairing open until {time.strftime('%H:%M:%S', time.localtime(until))} "
          f"({config.pairing_window / 60:g} minutes): run `himbeere-upload discover` now")
    return 0


def setup_logging(debug: bool = False, log_file: Optional[os.PathLike[str]] = None,
                  max_bytes: int = 0, backups: int = 0) -> None:
    """Log to stdout (the journal under systemd), or to ``log_file``, rotated."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = rotating_log(log_file, max_bytes, backups)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def rotating_log(path: os.PathLike[str], max_bytes: int, backups: int) -> logging.Handler:
    """The background daemon's log file, rotated at ``max_bytes``, ``backups`` old files kept.

    A RotatingFileHandler that also moves fds 1 and 2 to the new file: what
    is written to them directly (a traceback, ``faulthandler`` stacks) would
    otherwise keep growing the renamed old file.  ``logging.handlers`` is
    imported here: a daemon under systemd does without it.
    """
    import logging.handlers

    class RotatingLog(logging.handlers.RotatingFileHandler):
        def doRollover(self) -> None:
            super().doRollover()
            if self.stream is not None:
                for fd in (1, 2):
                    os.dup2(self.stream.fileno(), fd)

    return RotatingLog(os.fspath(path), maxBytes=max_bytes, backupCount=backups,
                       encoding="utf-8")


#: Commands that run on a node; the laptop's ``himbeere`` (uploader/main.py) hands
#: them to :func:`main` before it imports anything of its own.
NODE_COMMANDS = ("daemon", "pair", "launch")

#: Adds commands to the parser's ``add_subparsers()`` object.
AddCommands = Callable[[Any], None]


def is_node_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for a node's command (its first word that is no flag)."""
    command = next((word for word in argv if not word.startswith("-")), None)
    return command in NODE_COMMANDS


def build_parser(add_commands: Sequence[AddCommands] = ()) -> argparse.ArgumentParser:
    """The node's commands, then those that each of ``add_commands`` adds.

    The laptop's commands come in through ``add_commands``: the node
    package never imports the laptop side, and the daemon parses its flags
    without the fleet and dashboard commands (they import requests for
    their flags, megabytes of RAM the daemon would carry for nothing).
    """
    parser = argparse.ArgumentParser(
        prog="himbeere", description="Run Python code stored in CouchDB on Raspberry Pis.")
    parser.add_argument("--version", action="version", version=f"himbeere {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    daemon = sub.add_parser("daemon", help="Run the node daemon", description=cmd_daemon.__doc__)
    daemon.add_argument("action", nargs="?", choices=("start", "stop", "restart", "reload",
                                                      "status"),
                        help="control a background daemon instead of running in the foreground")
    add_config_flags(daemon)
    daemon.set_defaults(func=cmd_daemon)
    launch = sub.add_parser("launch", help="Run the daemon through its upgrading launcher",
                            description=cmd_launch.__doc__)
    launch.add_argument("action", nargs="?", choices=("start", "stop", "restart", "reload",
                                                      "status"),
                        help="control a background launcher instead of running in the "
                             "foreground")
    launch.add_argument("--upgrade-timeout", metavar="S", type=float,
                        default=launch_timeout(),
                        help="seconds a new daemon version has to send its first heartbeat "
                             "before it is reverted (default 120; HIMBEERE_UPGRADE_TIMEOUT)")
    add_config_flags(launch)
    launch.set_defaults(func=cmd_launch)
    pair = sub.add_parser("pair", help="Open this node's pairing window",
                          description=cmd_pair.__doc__)
    pair.add_argument("--close", action="store_true", help="close pairing now")
    add_config_flags(pair, PAIR_SETTINGS)
    pair.set_defaults(func=cmd_pair)
    for add in add_commands:
        add(sub)
    add_debug_flags(sub)
    return parser


DEBUG_HELP = "show tracebacks and debug logs"


def launch_timeout() -> float:
    """``HIMBEERE_UPGRADE_TIMEOUT``, else 120 s (the default of ``--upgrade-timeout``)."""
    from .launch import HEARTBEAT_TIMEOUT

    try:
        return float(os.environ.get("HIMBEERE_UPGRADE_TIMEOUT", HEARTBEAT_TIMEOUT))
    except ValueError:
        return HEARTBEAT_TIMEOUT


def add_debug_flags(sub: Any) -> None:
    """``--debug`` after the command, too: ``himbeere daemon --debug``.

    Its default is SUPPRESS, so a subcommand that was not given it leaves
    the top level's value alone (``himbeere --debug nodes``).  A command
    with a ``--debug`` of its own keeps it.
    """
    for command in sub.choices.values():
        try:
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help=DEBUG_HELP)
        except argparse.ArgumentError:
            pass  # it has one


def run(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse ``argv`` and run its command: the exit code; an error is one line."""
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], Any]] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except HimbeereError as exc:
        if args.debug:
            raise
        print(f"himbeere: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The node's ``himbeere``: ``daemon`` and ``pair`` (the laptop's is uploader.main)."""
    return run(build_parser(), list(sys.argv[1:] if argv is None else argv))


#: The exit status when the reader of our output went away (``himbeere logs -f | head``):
#: 128 + SIGPIPE, what a shell reports for ``yes | head -1``, so that ``set -o pipefail``
#: sees the same as for any Unix tool, and a script can tell "cut short" from "done".
BROKEN_PIPE = 141  # 128 + 13


def quiet_broken_pipe(run: Callable[[], int]) -> int:
    """``run()``, but a closed stdout pipe ends it quietly with :data:`BROKEN_PIPE`.

    Python ignores SIGPIPE and raises BrokenPipeError instead, with a traceback;
    Unix tools just stop.  The recipe of the Python docs ("Note on SIGPIPE",
    https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    try:
        code = run()
        sys.stdout.flush()  # output still buffered fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout once more at exit: let that flush write to /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

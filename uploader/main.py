"""The ``himbeere`` command (the console script; also ``python -m himbeere``).

One parser for the node's commands and the laptop's: ``daemon`` and
``pair`` (:mod:`himbeere.cli`), ``upload`` (``himbeere-upload``), the fleet
commands (:mod:`uploader.opscli`) and ``dashboard``.

A node's command goes straight to :func:`himbeere.cli.main`, before anything
else of the laptop side is imported: a Pi runs ``himbeere daemon`` through
this module, and must not carry requests, Flask or the rest of the
uploader (tests/test_daemon_smoke.py checks it).  So this module imports
only the standard library and :mod:`himbeere.cli` at the top.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Optional

from himbeere import cli as node_cli


def add_upload(sub: Any) -> None:
    """``himbeere upload ...``, which :func:`main` runs as ``himbeere-upload ...``."""
    upload = sub.add_parser("upload", add_help=False, help=SUMMARIES["upload"],
                            description="Same as himbeere-upload; see himbeere upload --help.")
    upload.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    # `himbeere --debug upload ...`: the flag goes on to himbeere-upload.
    upload.set_defaults(func=lambda args: upload_main(
        args.rest + (["--debug"] if args.debug else [])))


def add_fleet_commands(sub: Any) -> None:
    """nodes, status, logs, cmd, stop, start, restart, placements, label, state."""
    from .opscli import register

    register(Summarized(sub))


def add_dashboard(sub: Any) -> None:
    """``dashboard``; Flask is imported only when it runs."""
    from .dashboard import register

    register(Summarized(sub))


#: The one-line help of the laptop's commands in ``himbeere --help``, in one style
#: (imperative, capital first, no full stop; tests/test_config.py walks the parsers).
#: Their docstrings, the ``--help`` of each, say more than one line can.
SUMMARIES = {
    "upload": "Set up servers and push code (himbeere-upload)",
    "nodes": "List every node with its health",
    "status": "Show one node in detail",
    "logs": "Show what a node's programs printed",
    "cmd": "Run a command on many nodes",
    "stop": "Stop a program on a node",
    "start": "Start a stopped program on a node",
    "restart": "Restart a program on a node",
    "placements": "Show what runs where, and why",
    "label": "Set or show a node's labels",
    "state": "Show or reset a program's persistent state",
    "rollouts": "List staged rollouts",
    "rollout": "Show, pause, resume or abort a staged rollout",
    "dashboard": "Serve the web dashboard",
}


def build_parser() -> argparse.ArgumentParser:
    """Every command of ``himbeere``."""
    return node_cli.build_parser((add_upload, add_fleet_commands, add_dashboard))


class Summarized:
    """An ``add_subparsers()`` object whose commands get their help from :data:`SUMMARIES`."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name in SUMMARIES:
            kwargs["help"] = SUMMARIES[name]
        parser: argparse.ArgumentParser = self.sub.add_parser(name, **kwargs)
        return parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sub, name)


def upload_main(argv: Sequence[str]) -> int:
    from .cli import main

    return main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return node_cli.quiet_broken_pipe(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if node_cli.is_node_command(argv):
        return node_cli.main(argv)  # the fast path of a node: nothing more to import
    if argv[:1] == ["upload"]:
        return upload_main(argv[1:])  # its own --help and flags
    return node_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

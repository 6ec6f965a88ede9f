"""``python -m himbeere``: the same as the ``himbeere`` command.

A node's commands (``daemon``, ``pair``) run right here: init scripts,
benchmarks and tests start ``python -m himbeere daemon``, which loads
nothing of the laptop side.  The other commands are the laptop's, which
this package never imports: they go to the installed ``himbeere`` console
script (:mod:`uploader.main`), found in the package metadata.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from himbeere import cli

#: The distribution whose ``himbeere`` console script has the laptop's commands.
DISTRIBUTION = "himbeerecouch"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if cli.is_node_command(argv):
        return cli.main(argv)
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        entry = next(ep for ep in distribution(DISTRIBUTION).entry_points
                     if ep.group == "console_scripts" and ep.name == "himbeere")
    except (PackageNotFoundError, StopIteration):
        print(f"himbeere: error: {DISTRIBUTION} is not installed, so only the node's "
              f"commands ({', '.join(cli.NODE_COMMANDS)}) run; pip install it for the others",
              file=sys.stderr)
        return 2
    return int(entry.load()(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())

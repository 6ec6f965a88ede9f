"""``python -m himbeere``: the same as the ``himbeere`` command."""

import sys

from himbeere.cli import main

if __name__ == "__main__":
    sys.exit(main())

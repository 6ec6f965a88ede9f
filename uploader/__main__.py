"""``python -m uploader``: the same as ``himbeere-upload``."""

import sys

from uploader.cli import main

if __name__ == "__main__":
    sys.exit(main())

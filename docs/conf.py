"""Sphinx configuration of himbeere's documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` (``.ci/run``
does).  Nothing here reaches the network: CI has none but PyPI, so
intersphinx stays off and a reference to Python's own documentation is
written as a plain link.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# autodoc imports the modules from the checkout, installed or not.
sys.path.insert(0, str(ROOT))


def read_version() -> str:
    """``__version__`` of himbeere/__init__.py, as setup.py reads it."""
    text = (ROOT / "himbeere" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    return match.group(1) if match else "unknown"


project = "himbeere"
author = "the himbeere authors"
copyright = "the himbeere authors"
release = read_version()
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# Docstrings write `name` for a Python object, as gpiozero's do; an object
# autodoc does not document renders as code instead of failing the build.
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# RPi.GPIO exists only on a Pi; the API pages must build anywhere.
autodoc_mock_imports = ["RPi"]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"himbeere {release}"

# Sections are referred to as "page:Title" (:ref:`programs:Persistent state`).
extensions.append("sphinx.ext.autosectionlabel")
autosectionlabel_prefix_document = True
# Only pages and their sections: the changelog repeats "Added" in every release.
autosectionlabel_maxdepth = 2

"""The package layout holds: what a Pi's processes import, and the JavaScript files.

No server needed.  Each import check runs in a fresh interpreter, so what
this test process has imported already cannot hide a regression.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import himbeere.runtime
from himbeere.couch import design, js, security

ROOT = Path(__file__).resolve().parent.parent

#: Top-level packages of the laptop side, or heavy for a Pi (requests ~17 MB,
#: couchdb ~13 MB with its pkg_resources): a node's processes import none of them.
LAPTOP_SIDE = ("uploader", "flask", "werkzeug", "jinja2", "requests", "urllib3", "couchdb",
               "pkg_resources")
#: Every module of the program process (a new one is checked without editing this test).
RUNTIME = ["himbeere.runtime"] + [
    f"himbeere.runtime.{info.name}" for info in pkgutil.iter_modules(himbeere.runtime.__path__)]


def loaded_after_import(*modules: str) -> set[str]:
    """The names in ``sys.modules`` of a fresh interpreter once it imported ``modules``."""
    script = ("import importlib, json, sys\n"
              f"for name in {list(modules)!r}:\n"
              "    importlib.import_module(name)\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def laptop_side(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in LAPTOP_SIDE)


def test_the_daemon_imports_nothing_of_the_laptop_side() -> None:
    loaded = loaded_after_import("himbeere.daemon")
    assert {"himbeere.daemon", "himbeere.couch.client", "himbeere.programs"} <= loaded
    assert laptop_side(loaded) == []


def test_a_program_process_imports_neither_the_couch_client_nor_the_daemon() -> None:
    """A program that never uses ``state``, ``leader()`` or ``db`` pays for none of it."""
    assert "himbeere.runtime.child" in RUNTIME and "himbeere.runtime.reaper" in RUNTIME
    loaded = loaded_after_import(*RUNTIME)
    assert set(RUNTIME) <= loaded
    assert laptop_side(loaded) == []
    assert sorted(loaded & {"himbeere.couch.client", "himbeere.couch.transport",
                            "himbeere.daemon", "http.client"}) == []


def test_the_design_documents_carry_no_placeholder() -> None:
    texts = [design.NODE_FILTER, design.PROGRAMS_MAP, design.PLACED_MAP, design.NAMES_MAP,
             security.code_validate(), security.status_validate()]
    assert all(text.startswith("function (") and text.endswith("}") for text in texts)
    assert [text for text in texts if js._PLACEHOLDER.search(text)] == []
    # The values reach the text as JSON.
    assert json.dumps(security.NODE_ROLE) in security.status_validate()
    assert json.dumps(list(security.RESULT_FIELDS)) in security.code_validate()


def test_a_javascript_file_wants_exactly_its_placeholders() -> None:
    with pytest.raises(ValueError, match="__LEASE_CLOCK_SLACK__"):
        js.load("status_validate.js", PREAMBLE="", LEASE_MAX_TTL="1")
    with pytest.raises(ValueError, match="__TYPO__"):
        js.load("node_filter.js", TYPO="1")
    assert js.load("validate_preamble.js", NODE_ROLE='"n"', DEPLOYER_ROLE='"d"').startswith(
        '  var NODE = "n", DEPLOYER = "d";')


@pytest.mark.parametrize("old", ["child", "progstate", "leadership"])
def test_an_old_module_path_is_the_moved_module(old: str) -> None:
    """Programs written for earlier versions import these by their old names."""
    script = (f"import himbeere.{old} as old, himbeere.runtime.{old} as new, sys\n"
              f"from himbeere.{old} import *\n"
              "print(old is new, 'himbeere.couch.client' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]

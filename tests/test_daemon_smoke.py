"""End to end: a code document becomes a running program; a command runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.nodes import wait_file
from tests.test_layout import LAPTOP_SIDE


def test_code_doc_runs_and_command_returns(node_factory, code_db, tmp_path: Path) -> None:
    marker = tmp_path / "hello.txt"
    code_db.save({"_id": "hello", "type": 1000, "name": "hello", "code": (
        "def main():\n"
        f"    open({str(marker)!r}, 'w').write('hello from ' + str(node))\n"
    )})
    node = node_factory(mac_id=1000)
    assert wait_file(marker, contains="hello from 1000")
    node.wait_program("hello", state="finished")
    code_db.save({"_id": "c1", "type": "1000_cmd", "cmd": ["echo", "hi"]})
    doc = wait_for(lambda: (code_db.get("c1") or {}).get("finished") and code_db.get("c1"))
    assert doc["ret"] == ["hi\n", ""]
    assert doc["returncode"] == 0
    assert doc["cmd"] == ["echo", "hi"]
    assert node.stop() == 0
    assert node.status()["state"] == "stopped"


#: Modules a node must not load: each costs the Pi megabytes of RAM for
#: nothing (requests ~17 MB, couchdb ~13 MB, Flask and the uploader are the
#: laptop's; OpenSSL ~4 MB only for an https:// server; hashlib and tarfile
#: only when a fleet key or a git program needs them).  ``_ssl``, not ``ssl``:
#: -X importtime lists the import of ``ssl`` that the daemon turns away.
#: tests/test_layout.py checks the imports alone, without a server.
HEAVY = LAPTOP_SIDE + ("_ssl", "hashlib", "tarfile")


#: What the ``himbeere`` console script (uploader/main.py) loads of the laptop
#: side before it hands ``daemon`` to himbeere.cli: two small modules, no more.
CONSOLE_SCRIPT_MODULES = ["uploader", "uploader.main"]


@pytest.mark.parametrize("launcher", ["python -m himbeere", "console script"])
def test_a_node_loads_none_of_the_heavy_modules(node_factory, code_db, tmp_path: Path,
                                                launcher: str) -> None:
    """Regression: the daemon imported requests, OpenSSL and the whole laptop
    CLI, and its fork server couchdb: 62 MB RSS for an idle node.  The
    daemon's budget is 25 MB.  Init scripts start the daemon both ways:
    ``bin/himbeere daemon`` (systemd, supervisord) and ``python -m himbeere``."""
    marker = tmp_path / "ran.txt"
    code_db.save({"_id": "p", "type": 1000, "code": (
        "def main():\n"
        f"    open({str(marker)!r}, 'w').write('ran')\n"
    )})
    node = node_factory(mac_id=1000, env={"PYTHONPROFILEIMPORTTIME": "1"}, start=False)
    allowed: list[str] = []
    if launcher == "console script":
        # The script pip made from setup.py's entry_points, next to the venv's python.
        script = Path(sys.executable).with_name("himbeere")
        assert "from uploader.main import main" in script.read_text()
        argv = node.command()
        assert argv[:3] == [sys.executable, "-m", "himbeere"]
        node.command = lambda: [str(script), *argv[3:]]  # type: ignore[method-assign]
        allowed = CONSOLE_SCRIPT_MODULES
    node.start()
    wait_file(marker, contains="ran")
    code_db.save({"_id": "c1", "type": "1000_cmd", "cmd": ["echo", "hi"]})
    wait_for(lambda: (code_db.get("c1") or {}).get("finished"))
    assert node.stop() == 0
    # -X importtime lines of the daemon, its fork server and the program.
    imported = {line.rsplit("|", 1)[-1].strip() for line in node.log().splitlines()
                if line.startswith("import time:")}
    assert "himbeere.daemon" in imported and "himbeere.forkserver" in imported
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert heavy == allowed


def test_a_node_behind_tls(node_factory, code_db, tls_proxy, couch_url: str) -> None:
    """A CouchDB behind an https:// proxy: the daemon verifies its certificate."""
    url = tls_proxy.url(couch_url)
    node_factory(mac_id=1000, url=url, env={"SSL_CERT_FILE": str(tls_proxy.cert_file)})
    code_db.save({"_id": "c1", "type": "1000_cmd", "cmd": ["echo", "over tls"]})
    doc = wait_for(lambda: (code_db.get("c1") or {}).get("finished") and code_db.get("c1"))
    assert doc["ret"] == ["over tls\n", ""]

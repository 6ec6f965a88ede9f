"""End to end: a code document becomes a running program; a command runs."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import wait_for
from tests.nodes import wait_file


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

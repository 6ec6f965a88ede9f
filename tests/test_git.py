"""Programs from git: deploy, redeploy on a new ref, and errors in the status."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from himbeere import gitsource
from himbeere.exceptions import ProgramError
from tests.helpers import wait_for
from tests.nodes import wait_file


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def make_repo(tmp_path: Path, marker: Path) -> tuple[Path, str]:
    """A bare repository with tags v1 and v2 of a program that writes ``marker``."""
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "--quiet", "-b", "main")
    git(work, "config", "user.email", "t@example.org")
    git(work, "config", "user.name", "t")
    (work / "station").mkdir()
    (work / "station" / "__init__.py").write_text("")
    for version in ("v1", "v2"):
        (work / "station" / "app.py").write_text(
            "import time\n"
            "from station import helper\n"
            "def run():\n"
            f"    open({str(marker)!r}, 'a').write(helper.VERSION + '\\n')\n"
            "    while not should_quit():\n"
            "        time.sleep(0.05)\n")
        (work / "station" / "helper.py").write_text(f"VERSION = {version!r}\n")
        git(work, "add", "-A")
        git(work, "commit", "--quiet", "-m", version)
        git(work, "tag", version)
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work), str(bare)], check=True)
    return bare, git(work, "rev-parse", "v1^{commit}").strip()


def test_git_deploy_and_redeploy(node_factory, code_db, tmp_path: Path) -> None:
    marker = tmp_path / "versions.txt"
    bare, v1_commit = make_repo(tmp_path, marker)
    code_db.save({"_id": "weather", "type": 1000, "name": "weather", "git": {
        "url": f"file://{bare}", "ref": "v1", "entry": "station.app:run"}})
    node = node_factory(mac_id=1000)
    wait_file(marker, contains="v1")
    program = node.wait_program("weather", state="running")
    assert program["commit"] == v1_commit
    assert program["git"] == f"file://{bare}@v1"
    doc = code_db.get("weather")
    doc["git"]["ref"] = "v2"
    code_db.save(doc)
    assert wait_file(marker, contains="v2").split() == ["v1", "v2"]
    # The status may still show the old run for a moment: wait for the new ref.
    program = node.wait_program("weather", state="running", git=f"file://{bare}@v2")
    assert program["commit"] != v1_commit
    assert program["restarts"] == 0


def test_git_errors_show_in_the_status(node_factory, code_db, tmp_path: Path) -> None:
    bare, _ = make_repo(tmp_path, tmp_path / "unused.txt")
    code_db.save({"_id": "noref", "type": 1000, "git": {
        "url": f"file://{bare}", "ref": "v9", "entry": "station.app:run"}})
    code_db.save({"_id": "noentry", "type": 1000, "git": {
        "url": f"file://{bare}", "ref": "v1", "entry": "station.missing:run"}})
    code_db.save({"_id": "nofunc", "type": 1000, "git": {
        "url": f"file://{bare}", "ref": "v1", "entry": "station.app:nothing"}})
    code_db.save({"_id": "norepo", "type": 1000, "git": {
        "url": f"file://{tmp_path}/absent.git", "ref": "v1", "entry": "a:b"}})
    code_db.save({"_id": "badfield", "type": 1000, "git": {"url": "x", "entry": "nocolon"}})
    node = node_factory(mac_id=1000)
    assert "'v9' does not exist" in node.wait_program("noref", state="invalid")["last_error"]
    assert "'station.missing' is not in" in node.wait_program(
        "noentry", state="invalid")["last_error"]
    assert "no nothing()" in node.wait_program("nofunc", state="invalid")["last_error"]
    assert "git.entry" in node.wait_program("badfield", state="invalid")["last_error"]
    unreachable = wait_for(lambda: node.program("norepo").get("restarts", 0) >= 1
                           and node.program("norepo"))
    assert "cannot fetch" in unreachable["last_error"]
    assert unreachable["state"] in ("backing-off", "fetching")
    assert node.alive()


@pytest.mark.parametrize("value, words", [
    ("https://x", "git: is a str"),
    ({"ref": "main"}, "git.url: missing"),
    ({"url": "u", "ref": "--upload-pack=evil"}, "git.ref"),
    ({"url": "u", "entry": "a.b:"}, "git.entry"),
    ({"url": "u", "entry": "1a:main"}, "git.entry"),
])
def test_git_field_is_checked(value, words: str) -> None:
    with pytest.raises(ProgramError, match=words):
        gitsource.parse(value)
    assert gitsource.parse({"url": "u"}) == gitsource.GitSource("u", "main", "main", "main")

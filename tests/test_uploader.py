"""``himbeere-upload`` end to end against the real test server.

Each test drives :func:`uploader.cli.main` as a user would (arguments and
``HIMBEERE_*`` variables) and checks both what it prints and what it left in
the databases.  ``discover`` gets a fake broadcast function: the UDP side is
tested with himbeere.discovery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import defaults
from himbeere.couch import Couch, design, security
from himbeere.exceptions import ProgramError
from tests.helpers import random_mac
from tests.servers import POUCHDB_SERVER, PouchServer, free_port
from uploader import push, users
from uploader.cli import main
from uploader.fleet import Fleet, parse_mac
from uploader.main import main as himbeere

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(couch_url: str, dbname: str, capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*argv, env=None, broadcast=None)``: exit code, stdout, stderr."""
    def run(*argv: str, env: Optional[dict[str, str]] = None,
            broadcast: Any = None) -> tuple[int, str, str]:
        environ = {"HIMBEERE_SERVER": couch_url, "HIMBEERE_DATABASE": dbname}
        environ.update(env or {})
        capsys.readouterr()
        code = main(list(argv), environ=environ, broadcast=broadcast)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def ready(run: Run) -> Run:
    """``run`` after ``setup``."""
    code, out, err = run("setup")
    assert code == 0, err
    return run


@pytest.fixture
def fleet(couch_url: str, dbname: str) -> Fleet:
    return Fleet(couch_url, dbname)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- setup -----------------------------------------------------------------------------------

def test_setup_creates_everything_and_a_second_run_changes_nothing(
        run: Run, couch: Couch, dbname_factory: Callable[..., str]) -> None:
    name = dbname_factory()
    couch.delete_database(name)  # setup must create it; the fixture still cleans up
    code, out, err = run("setup", "--database", name)
    assert code == 0, err
    assert f"created database {name}\n" in out
    assert f"created database {name}_status" in out
    for db_name in (name, name + "_status"):
        db = couch.database(db_name)
        doc = db.get(design.DESIGN_ID)
        assert doc is not None and doc["himbeere_version"] == design.VERSION
        assert "validate_doc_update" in doc
        members = db.security()["members"]["roles"]
        assert security.NODE_ROLE in members and security.DEPLOYER_ROLE in members
    revs = [couch.database(n).get(design.DESIGN_ID)["_rev"]  # type: ignore[index]
            for n in (name, name + "_status")]
    status = couch.database(name + "_status")
    if not couch.supports_selector():
        assert status.revs_limit() is None  # pouchdb-server has no _revs_limit: left alone
    else:
        assert status.revs_limit() == defaults.STATUS_REVS_LIMIT
        assert f"set _revs_limit of {name}_status to {defaults.STATUS_REVS_LIMIT}" in out
        assert couch.database(name).revs_limit() == 1000  # code documents: left as they are

    code, out, err = run("setup", "--database", name)
    assert code == 0 and "nothing changed" in out
    code, out, _ = run("setup", "--database", name, "--json")
    report = json.loads(out)
    assert report["changed"] is False and report["changes"] == []
    assert revs == [couch.database(n).get(design.DESIGN_ID)["_rev"]  # type: ignore[index]
                    for n in (name, name + "_status")]


def test_setup_keeps_names_and_roles_already_in_security(run: Run, couch: Couch,
                                                         dbname: str) -> None:
    couch.database(dbname).set_security({"members": {"names": ["alice"], "roles": ["lab"]}})
    assert run("setup")[0] == 0
    members = couch.database(dbname).security()["members"]
    assert "alice" in members["names"] and "lab" in members["roles"]
    assert security.NODE_ROLE in members["roles"]


def test_setup_takes_the_url_as_argument(run: Run, couch_url: str) -> None:
    code, out, err = run("setup", couch_url, env={"HIMBEERE_SERVER": ""})
    assert code == 0, err
    assert couch_url not in out  # the admin's password is never printed
    assert "admin party" not in err  # the test server has an admin


@pytest.fixture
def admin_party_url(tmp_path: Path) -> Iterator[str]:
    """A pouchdb-server of its own that never got an admin: anonymous is admin."""
    server = PouchServer(tmp_path / "party", in_memory=True)
    if not POUCHDB_SERVER.exists():
        pytest.skip("needs pouchdb-server (scripts/install-pouchdb-server)")
    server.workdir.mkdir(parents=True)
    server.port = free_port()
    server._spawn()  # start() would make an admin, ending admin party
    try:
        assert server._wait_until_up(), server.log()
        yield server.plain_url
    finally:
        server.stop()


def test_setup_warns_loudly_of_admin_party(admin_party_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["setup", admin_party_url], environ={}) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"set up {admin_party_url} (raspberries, raspberries_status):")
    rule = "!" * 78
    assert err.splitlines() == [
        rule,
        f"WARNING: {admin_party_url} is in admin party: it has no admin at all.",
        "Anyone who reaches it is an admin, without a password, and may read or",
        "change every program and node user.  Create an admin (CouchDB: PUT",
        "/_node/_local/_config/admins/NAME; pouchdb-server: PUT /_config/admins/NAME)",
        "and put its name and password in the URL.",
        rule]
    assert main(["setup", admin_party_url, "--json"], environ={}) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["admin_party"] is True and "WARNING" in err


def test_https_to_a_plain_http_server_says_so_in_full(run: Run, couch_url: str) -> None:
    """Regression: requests' long error was cut off in the middle of a word."""
    plain = Couch(couch_url).bases[0]
    https = "https://" + plain.split("://", 1)[1]
    for argv in (["ls"], ["setup"]):
        code, out, err = run(*argv, env={"HIMBEERE_SERVER": https})
        assert (code, out) == (1, "")
        # pouchdb-server answers the TLS hello with plain HTTP (OpenSSL 3.2 and
        # later say "record layer failure" instead); Apache CouchDB does not
        # answer it at all, so the handshake times out.
        reason = ("TLS failed \\((wrong version number|record layer failure)\\): the server "
                  "speaks plain HTTP there; use http:// instead of https://"
                  "|timed out; if the server speaks plain HTTP there, use http:// instead")
        assert re.fullmatch(
            f"himbeere-upload: error: cannot reach the CouchDB server at {re.escape(https)}: "
            f"({reason})\n", err), err


def test_setup_upgrades_an_old_design_document_of_the_daemon(run: Run, couch: Couch,
                                                             dbname: str) -> None:
    db = couch.database(dbname)
    db.save({"_id": design.DESIGN_ID, "himbeere_version": 1,
             "filters": {"node": design.NODE_FILTER}})
    code, out, _ = run("setup")
    assert code == 0 and f"upgraded (version 1 to {design.VERSION})" in out
    assert db.get(design.DESIGN_ID)["validate_doc_update"]  # type: ignore[index]


def test_a_newer_design_document_is_never_downgraded(couch: Couch, dbname: str) -> None:
    """An old daemon with admin rights must not drop rules a newer uploader installed."""
    db = couch.database(dbname)
    newer = dict(design.design_doc(), himbeere_version=design.VERSION + 1,
                 validate_doc_update="function () { /* newer rules */ }")
    db.save(newer)
    assert design.ensure_design(db) is False
    assert db.get(design.DESIGN_ID)["_rev"] == newer["_rev"]  # type: ignore[index]
    design.prepare(db, couch)  # and the daemon still starts


# -- errors: one clear line each ---------------------------------------------------------------

def test_unreachable_server_is_one_line(run: Run) -> None:
    code, out, err = run("ls", "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "cannot reach the CouchDB server" in err
    assert "Connection refused" in err


def test_wrong_credentials_are_one_line(run: Run, couch: Couch) -> None:
    url = couch.as_user(couch.auth[0] if couch.auth else "admin", "not-the-password").url
    for argv in (["ls"], ["setup"], ["provision", "1234"]):
        code, _, err = run(*argv, "--server", url)
        assert code == 1 and err.count("\n") == 1
        assert "wrong credentials" in err and "not-the-password" not in err


def test_missing_database_hints_at_setup(run: Run) -> None:
    code, _, err = run("ls", "--database", "no_such_db_here")
    assert code == 1 and err.count("\n") == 1
    assert "'no_such_db_here' does not exist" in err and "himbeere-upload setup" in err


def test_anonymous_and_node_users_get_a_clear_refusal(ready: Run, couch: Couch,
                                                      provisioned: list[int]) -> None:
    code, _, err = ready("ls", "--server", couch.base)
    assert code == 1 and "anonymous" in err and err.count("\n") == 1
    mac = random_mac()
    provisioned.append(mac)
    assert ready("provision", str(mac), "--password", "node-pw-1")[0] == 0
    code, _, err = ready("setup", "--server", couch.as_user(str(mac), "node-pw-1").url)
    assert code == 1 and "needs a server admin" in err


def test_no_server_at_all(run: Run) -> None:
    code, _, err = run("ls", env={"HIMBEERE_SERVER": ""})
    assert code == 1 and "server: not set" in err


# -- push ------------------------------------------------------------------------------------

def test_push_file_then_unchanged_then_changed(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    source = write(tmp_path / "blink.py", "def main():\n    log('on')\n")
    code, out, err = ready("push", str(source), "--node", "1000")
    assert code == 0, err
    assert out.startswith("created 1000:blink")
    doc = fleet.code.get("1000:blink")
    assert doc is not None
    assert doc["type"] == 1000 and doc["name"] == "blink" and doc["code"] == source.read_text()

    code, out, _ = ready("push", str(source), "--node", "1000")
    assert code == 0 and out.startswith("unchanged")
    assert fleet.code.get("1000:blink")["_rev"] == doc["_rev"]  # type: ignore[index]

    write(source, "def main():\n    log('off')\n    log('again')\n")
    code, out, _ = ready("push", str(source), "--node", "1000")
    assert code == 0 and out.startswith("updated 1000:blink")
    assert "changed main.py (+2 -1 lines)" in out


def test_push_folder_makes_main_and_modules(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    folder = tmp_path / "sensor"
    write(folder / "main.py", "import util\ndef main():\n    util.read()\n")
    write(folder / "util.py", "def read():\n    return 1\n")
    write(folder / "README.md", "not code")
    code, out, _ = ready("push", str(folder), "--node", "1000", "--json")
    result = json.loads(out)
    assert code == 0 and result["action"] == "created" and result["ignored"] == ["README.md"]
    assert result["changes"] == ["added main.py (3 lines)", "added util.py (2 lines)"]
    doc = fleet.code.get("1000:sensor")
    assert doc is not None
    assert doc["code"].startswith("import util") and set(doc["modules"]) == {"util"}

    (folder / "util.py").unlink()
    code, out, _ = ready("push", str(folder), "--node", "1000")
    assert "removed util.py" in out
    assert "modules" not in fleet.code.get("1000:sensor")  # type: ignore[operator]


def test_push_updates_a_document_written_by_hand(ready: Run, fleet: Fleet,
                                                 tmp_path: Path) -> None:
    fleet.code.save({"_id": "legacy-id", "type": "1000", "name": "blink", "code": "X = 1\n",
                     "restart": "always"})
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    code, out, _ = ready("push", str(source), "--node", "1000")
    assert code == 0 and out.startswith("updated legacy-id")
    doc = fleet.code.get("legacy-id")
    assert doc is not None and doc["restart"] == "always" and doc["type"] == "1000"
    assert fleet.code.get("1000:blink") is None


def test_push_global_modules(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    write(folder / "helpers.py", "X = 1\n")
    write(folder / "more.py", "Y = 2\n")
    code, out, _ = ready("push", str(folder), "--global")
    assert code == 0 and out.startswith("created global:shared")
    doc = fleet.code.get("global:shared")
    assert doc is not None and "type" not in doc
    assert doc["global_modules"] == {"helpers": "X = 1\n", "more": "Y = 2\n"}
    code, _, err = ready("push", str(folder), "--global", "--node", "1000")
    assert code == 1 and "drop --node" in err


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.txt", "hello", "is not a Python file"),
    ("broken.py", "def main(:\n", "is not Python: line 1"),
    ("binary.py", b"\xff\xfe\x00", "not UTF-8"),
    ("no_main.py", "def mian():\n    pass\n",
     "no_main.py defines no main(); a program needs def main(): ... (the node calls it)"),
    ("my-prog.py", "def main():\n    pass\n",
     "my-prog.py: 'my-prog' is not a Python module name; rename the file, or give "
     "--name my_prog"),
])
def test_push_refuses_what_is_not_python(ready: Run, tmp_path: Path, name: str,
                                         content: Any, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, out, err = ready("push", str(path), "--node", "1000")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize("source", [
    "def main():\n    pass\n", "async def main():\n    pass\n", "from os import getpid as main\n",
    "main = print\n", "try:\n    from fast import main\nexcept ImportError:\n    def main(): ...\n",
    "if True:\n    def main(): ...\n", "from helpers import *\n",
])
def test_push_accepts_every_way_of_defining_main(tmp_path: Path, source: str) -> None:
    assert push.read_source(write(tmp_path / "prog.py", source)).modules == {"main": source}


def test_push_refuses_a_folder_whose_main_defines_no_main(ready: Run, tmp_path: Path) -> None:
    """Regression: it was accepted, then turned up invalid on the node."""
    folder = tmp_path / "sensor"
    write(folder / "main.py", "import util\nclass Main:\n    def main(self): ...\n")
    write(folder / "util.py", "def main():\n    pass\n")
    code, out, err = ready("push", str(folder), "--node", "1000")
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"himbeere-upload: error: {folder / 'main.py'} defines no "
                                "main(); a program needs def main(): ... (the node calls it)"]


def test_push_my_prog_with_the_hinted_name(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    source = write(tmp_path / "my-prog.py", "def main():\n    pass\n")
    code, out, err = ready("push", str(source), "--node", "1000", "--name", "my_prog")
    assert code == 0, err
    assert out.splitlines() == ["created 1000:my_prog (rev " + out.split("(rev ")[1].split(")")[0]
                                + "), release 1", "  added main.py (2 lines)"]
    one = write(tmp_path / "one.py", "def main(): pass\n")
    code, out, err = ready("push", str(one), "--node", "1000")
    assert code == 0, err
    assert out.splitlines()[1] == "  added main.py (1 line)"  # not "(1 lines)"


def test_push_folder_without_main(tmp_path: Path) -> None:
    write(tmp_path / "lib" / "util.py", "X = 1\n")
    with pytest.raises(ProgramError, match="no main.py"):
        push.read_source(tmp_path / "lib")


def test_push_to_a_name_and_to_an_unknown_name(ready: Run, fleet: Fleet, tmp_path: Path,
                                               provisioned: list[int]) -> None:
    mac = random_mac()
    provisioned.append(mac)
    assert ready("provision", str(mac), "--name", "kitchen", "--password", "pw-kitchen")[0] == 0
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    code, out, _ = ready("push", str(source), "--node", "kitchen")
    assert code == 0 and out.startswith(f"created {mac}:blink")
    code, _, err = ready("push", str(source), "--node", "garage")
    assert code == 1 and "no node is named 'garage'" in err and "kitchen" in err


def test_node_is_a_mac_id_or_a_mac_address() -> None:
    assert parse_mac("1000") == 1000
    assert parse_mac("b8:27:eb:12:34:56") == 0xB827EB123456
    assert parse_mac("kitchen") is None


# -- pull, ls, rm ----------------------------------------------------------------------------

def test_pull_writes_the_files_back_and_a_push_of_them_is_unchanged(
        ready: Run, tmp_path: Path) -> None:
    folder = tmp_path / "sensor"
    write(folder / "main.py", "import util\ndef main():\n    util.read()\n")
    write(folder / "util.py", "def read():\n    return 1\n")
    assert ready("push", str(folder), "--node", "1000")[0] == 0
    out_dir = tmp_path / "pulled" / "sensor"
    code, out, _ = ready("pull", "sensor", str(out_dir))
    assert code == 0 and "main.py written" in out
    for file in ("main.py", "util.py"):
        assert (out_dir / file).read_text() == (folder / file).read_text()
    code, out, _ = ready("push", str(out_dir), "--node", "1000")
    assert out.startswith("unchanged")

    write(out_dir / "main.py", "edited locally\n")
    code, _, err = ready("pull", "sensor", str(out_dir))
    assert code == 1 and "--force" in err
    assert ready("pull", "sensor", str(out_dir), "--force")[0] == 0
    code, _, err = ready("pull", "nothing-like-it", str(out_dir))
    assert code == 1 and "no program named 'nothing-like-it'" in err


def test_pull_asks_which_node_when_a_name_is_on_several(ready: Run, tmp_path: Path) -> None:
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    for node in ("1000", "1001"):
        assert ready("push", str(source), "--node", node)[0] == 0
    code, _, err = ready("pull", "blink", str(tmp_path / "out"))
    assert code == 1 and "--node" in err
    assert ready("pull", "blink", str(tmp_path / "out"), "--node", "1001")[0] == 0


def test_ls_lists_programs_per_node_with_names_and_states(
        ready: Run, fleet: Fleet, tmp_path: Path, provisioned: list[int]) -> None:
    mac = random_mac()
    provisioned.append(mac)
    assert ready("provision", str(mac), "--name", "porch", "--password", "pw-porch")[0] == 0
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    assert ready("push", str(source), "--node", str(mac))[0] == 0
    assert ready("push", str(source), "--node", "1000")[0] == 0
    fleet.status.save({"_id": f"status:{mac}", "node": mac,
                       "programs": {f"{mac}:blink": {"state": "running"}}})
    code, out, _ = ready("ls")
    assert code == 0
    assert f"{mac} (porch)" in out and "running" in out and "1000" in out
    code, out, _ = ready("ls", "--node", "porch", "--json")
    programs = json.loads(out)["programs"]
    assert [(p["node"], p["node_name"], p["name"], p["state"]) for p in programs] == [
        (mac, "porch", "blink", "running")]


def test_ls_shows_release_numbers_and_a_nodes_programs_for_many_nodes(
        ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    """ls has a RELEASE column (- for a document pushed before releases were
    numbered); ls --node lists the programs for many nodes the node reports."""
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    assert ready("push", str(source), "--node", "1000")[0] == 0
    source.write_text("def main():\n    return 1\n")
    assert ready("push", str(source), "--node", "1000")[0] == 0
    sensor = write(tmp_path / "sensor.py", "def main():\n    pass\n")
    assert ready("push", str(sensor), "--label", "room=lab")[0] == 0
    assert ready("push", str(sensor), "--all", "--name", "everywhere")[0] == 0
    fleet.code.save({"_id": "1000:old", "type": 1000, "name": "old", "code": "x = 1\n"})
    fleet.status.save({"_id": "status:1000", "node": 1000, "programs": {
        "1000:blink": {"state": "running"}, "program:sensor": {"state": "running"}}})
    code, out, err = ready("ls", "--node", "1000")
    assert code == 0, err
    assert out.splitlines() == [
        "NODE      PROGRAM  ID              RELEASE  MODULES  STATE",
        "1000      blink    1000:blink      2        main     running",
        "1000      old      1000:old        -        main     -",
        "room=lab  sensor   program:sensor  1        main     running on 1000",
    ]  # not "everywhere": this node does not report running it
    code, out, _ = ready("ls", "--json")
    releases = {p["id"]: p["release"] for p in json.loads(out)["programs"]}
    assert releases == {"1000:blink": 2, "1000:old": None, "program:sensor": 1,
                        "program:everywhere": 1}


def test_rm_removes_and_names_what_is_there(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    assert ready("push", str(source), "--node", "1000")[0] == 0
    assert ready("push", str(source), "--node", "1000", "--name", "other")[0] == 0
    code, out, _ = ready("rm", "blink", "--node", "1000")
    assert code == 0 and out.strip() == "removed 1000:blink"
    assert fleet.code.get("1000:blink") is None
    code, _, err = ready("rm", "blink", "--node", "1000")
    assert code == 1 and "no program 'blink' on node 1000; there are: other" in err


# -- placed programs ---------------------------------------------------------------------------

def test_push_placed_then_unchanged_then_changed(ready: Run, fleet: Fleet,
                                                 tmp_path: Path) -> None:
    source = write(tmp_path / "agg.py", "def main():\n    log('on')\n")
    code, out, err = ready("push", str(source), "--placed", "--replicas", "2",
                           "--label", "room=lab1", "--requires", "ram_mb=200")
    assert code == 0, err
    assert out.splitlines()[0].startswith("created placed:agg (rev ")
    assert out.splitlines()[1:] == ["  added main.py (2 lines)", "  replicas 2",
                                    "  label room=lab1", "  requires ram_mb=200"]
    doc = fleet.code.get("placed:agg")
    assert doc is not None
    assert {k: doc[k] for k in ("type", "name", "replicas", "labels", "requires")} == {
        "type": "himbeere-placed", "name": "agg", "replicas": 2, "labels": {"room": "lab1"},
        "requires": {"ram_mb": 200}}

    # Flags left out keep the document's: a push of the same code changes nothing.
    code, out, _ = ready("push", str(source), "--placed")
    assert code == 0 and out.strip() == f"unchanged: placed:agg (rev {doc['_rev']})"
    code, out, _ = ready("push", str(source), "--placed", "--replicas", "2",
                         "--label", "room=lab1")
    assert out.startswith("unchanged")
    assert fleet.code.get("placed:agg")["_rev"] == doc["_rev"]  # type: ignore[index]

    code, out, _ = ready("push", str(source), "--placed", "--replicas", "3", "--label",
                         "room=lab2", "--label", "rack=2", "--requires", "ram_mb=",
                         "--requires", "disk_mb=100.5")
    assert code == 0 and out.splitlines()[1:] == [
        "  replicas 2 -> 3", "  added label rack=2", "  changed label room: lab1 -> lab2",
        "  added requires disk_mb=100.5", "  removed requires ram_mb=200"]
    write(source, "def main():\n    log('off')\n")
    code, out, _ = ready("push", str(source), "--placed", "--label", "rack=", "--json")
    result = json.loads(out)
    assert result["action"] == "updated" and result["placed"] is True
    assert result["changes"] == ["changed main.py (+1 -1 lines)", "removed label rack=2"]
    doc = fleet.code.get("placed:agg")
    assert doc is not None and doc["code"] == source.read_text()
    assert (doc["replicas"], doc["labels"], doc["requires"]) == (3, {"room": "lab2"},
                                                                 {"disk_mb": 100.5})


def test_push_placed_updates_a_placed_document_written_by_hand(ready: Run, fleet: Fleet,
                                                               tmp_path: Path) -> None:
    fleet.code.save({"_id": "aggregator", "type": "himbeere-placed", "name": "aggregator",
                     "code": "X = 1\n", "restart": "always"})
    source = write(tmp_path / "aggregator.py", "def main():\n    pass\n")
    code, out, _ = ready("push", str(source), "--placed")
    assert code == 0 and out.startswith("updated aggregator")
    assert "replicas" not in out  # the document's default stays as it is
    doc = fleet.code.get("aggregator")
    assert doc is not None and doc["restart"] == "always" and "replicas" not in doc
    assert fleet.code.get("placed:aggregator") is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "-1"], "--replicas '-1' is not allowed; allowed: a whole number >= 0"),
    (["--replicas", "two"], "--replicas 'two' is not allowed"),
    (["--replicas", "1.5"], "--replicas '1.5' is not allowed"),
    (["--label", "room"], "label 'room' is not allowed; allowed: key=value"),
    (["--label", "1room=lab"], "label key '1room' is not allowed"),
    (["--requires", "cpu=2"], "--requires 'cpu' is not allowed; allowed: ram_mb, disk_mb"),
    (["--requires", "ram_mb"], "--requires 'ram_mb' is not allowed; allowed: ram_mb=MB"),
    (["--requires", "ram_mb=-5"], "--requires ram_mb=-5 is not allowed; allowed: megabytes"),
    (["--requires", "disk_mb=lots"], "--requires disk_mb=lots is not allowed"),
])
def test_push_placed_refuses_bad_placement_in_one_line(ready: Run, fleet: Fleet, tmp_path: Path,
                                                       flags: list[str], message: str) -> None:
    source = write(tmp_path / "agg.py", "def main():\n    pass\n")
    code, out, err = ready("push", str(source), "--placed", *flags)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert message in err
    assert fleet.code.get("placed:agg") is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--placed", "--node", "1000"], "drop --node"),
    (["--placed", "--global"], "drop --global"),
    (["--node", "1000", "--replicas", "2"], "add --placed"),
    (["--node", "1000", "--requires", "ram_mb=1"], "add --placed"),
    # Without --placed, --label pushes a program for many nodes (test_targeted.py).
    (["--node", "1000", "--label", "room=lab1"], "drop --node"),
    ([], "or use --all, --label key=value, --global or --placed"),
])
def test_push_placed_flags_go_together(ready: Run, tmp_path: Path, flags: list[str],
                                       message: str) -> None:
    source = write(tmp_path / "agg.py", "def main():\n    pass\n")
    code, _, err = ready("push", str(source), *flags)
    assert code == 1 and err.count("\n") == 1 and message in err


def test_placed_programs_in_ls_pull_and_rm(ready: Run, fleet: Fleet, tmp_path: Path) -> None:
    folder = tmp_path / "agg"
    write(folder / "main.py", "import util\ndef main():\n    util.read()\n")
    write(folder / "util.py", "def read():\n    return 1\n")
    assert ready("push", str(folder), "--placed", "--replicas", "2")[0] == 0
    assert ready("push", str(folder / "main.py"), "--node", "1000", "--name", "blink")[0] == 0
    fleet.set_name(1002, "kitchen")
    code, out, _ = ready("ls")
    row = next(line for line in out.splitlines() if "placed:agg" in line)
    assert row.split()[:5] == ["placed", "agg", "placed:agg", "1", "main,"]
    assert row.endswith("not placed yet")

    # The scheduler placed it on two nodes; they report its state.
    fleet.status.save({"_id": "lease:scheduler", "type": "himbeere-lease",
                       "assignments": {"placed:agg": {"nodes": [1001, 1002]}}})
    for mac in (1001, 1002):
        fleet.status.save({"_id": f"status:{mac}", "node": mac,
                           "programs": {"placed:agg": {"state": "running", "placed": True}}})
    code, out, _ = ready("ls")
    row = next(line for line in out.splitlines() if "placed:agg" in line)
    assert row.endswith("running on 1001, 1002 (kitchen)")
    code, out, _ = ready("ls", "--json")
    (agg,) = [p for p in json.loads(out)["programs"] if p["placed"]]
    assert (agg["node"], agg["state"], agg["enabled"]) == ("placed", "running", True)
    assert agg["nodes"] == [{"node": 1001, "name": None, "state": "running"},
                            {"node": 1002, "name": "kitchen", "state": "running"}]
    code, out, _ = ready("ls", "--node", "1000")
    assert "placed:agg" not in out  # a placed program belongs to no node

    out_dir = tmp_path / "pulled"
    code, out, err = ready("pull", "agg", str(out_dir))
    assert code == 0, err
    assert out.startswith("pulled placed:agg into ")
    assert (out_dir / "util.py").read_text() == (folder / "util.py").read_text()
    assert ready("push", str(out_dir), "--placed", "--name", "agg")[1].startswith("unchanged")
    # The same name on a node and placed: pull asks which.
    assert ready("push", str(folder), "--node", "1000")[0] == 0
    code, _, err = ready("pull", "agg", str(tmp_path / "other"))
    assert code == 1 and "(1000, placed)" in err and "--placed" in err
    assert ready("pull", "agg", str(tmp_path / "other"), "--placed")[0] == 0

    code, _, err = ready("rm", "agg")
    assert code == 1 and "--node NODE, --global, --placed or --targeted" in err
    code, out, _ = ready("rm", "agg", "--placed")
    assert code == 0 and out.strip() == "removed placed:agg"
    assert fleet.code.get("placed:agg") is None and fleet.code.get("1000:agg") is not None
    code, _, err = ready("rm", "agg", "--placed")
    assert code == 1 and "no program 'agg' among the placed programs; there are: none" in err


# -- provision ----------------------------------------------------------------------------------

def test_provision_creates_a_node_user_that_can_log_in(ready: Run, couch: Couch,
                                                       provisioned: list[int]) -> None:
    mac = random_mac()
    provisioned.append(mac)
    code, out, _ = ready("provision", str(mac), "--json")
    result = json.loads(out)
    assert code == 0 and result["action"] == "created"
    password = result["password"]
    session = couch.as_user(str(mac), password).session_info()["userCtx"]
    assert session["name"] == str(mac) and security.NODE_ROLE in session["roles"]

    code, out, _ = ready("provision", str(mac))
    assert code == 0 and out.startswith(f"user {mac} unchanged") and password not in out
    code, out, _ = ready("provision", str(mac), "--password", password)
    assert out.startswith(f"user {mac} unchanged")
    code, out, _ = ready("provision", str(mac), "--password", "a-new-one", "--name", "shed")
    assert out.startswith(f"updated user {mac}: password; named shed")
    assert couch.as_user(str(mac), "a-new-one").session_info()["userCtx"]["name"] == str(mac)


def test_provision_never_prints_the_admin_password(ready: Run, couch: Couch,
                                                   provisioned: list[int]) -> None:
    assert couch.auth is not None
    admin_password = couch.auth[1]
    mac = random_mac()
    provisioned.append(mac)
    for argv in (["provision", str(mac), "--password", "given-pw"],
                 ["provision", str(mac), "--name", "barn", "--json"]):
        code, out, err = ready(*argv)
        assert code == 0
        assert f":{admin_password}@" not in out + err
        if len(admin_password) >= 6:  # a short one could be part of any word
            assert admin_password not in out + err


def test_provision_does_not_bless_a_squatters_account(ready: Run, couch: Couch, fleet: Fleet,
                                                      provisioned: list[int]) -> None:
    mac = random_mac()
    provisioned.append(mac)
    couch.database("_users").save({"_id": security.user_id(mac), "name": str(mac),
                                   "type": "user", "roles": [], "password": "squatter"})
    code, _, err = ready("provision", str(mac))
    assert code == 1 and "not a himbeere node" in err
    assert ready("provision", str(mac), "--password", "mine-now")[0] == 0
    assert not users.password_works(fleet, mac, "squatter")
    assert users.password_works(fleet, mac, "mine-now")


# -- discover -----------------------------------------------------------------------------------

def test_discover_provisions_every_pi_that_answers(ready: Run, couch: Couch,
                                                   provisioned: list[int]) -> None:
    macs = [random_mac(), random_mac()]
    provisioned.extend(macs)
    sent: list[tuple[str, dict[str, Any]]] = []

    def broadcast(server_url: str, timeout: float = 10, **options: Any) -> dict[Any, Any]:
        sent.append((server_url, options))
        replies = {("10.0.0.5", 53000): {"MacID": macs[0], "password": "pw-one"},
                   ("10.0.0.6", 53000): {"MacID": str(macs[1]), "password": "pw-two"},
                   ("10.0.0.7", 53000): {"MacID": "garbage"}}
        for address, reply in replies.items():
            options["on_reply"](address, reply)
        return replies

    code, out, err = ready("discover", "--timeout", "1", broadcast=broadcast)
    assert code == 0, err
    assert sent[0][0] == couch.base  # the URL without the admin's credentials
    assert "answer from 10.0.0.5" in err
    assert "MAC ID" in out and "10.0.0.6" in out and "bad reply" in out
    for mac, password in zip(macs, ("pw-one", "pw-two")):
        assert f"{mac}" in out
        assert couch.as_user(str(mac), password).session_info()["userCtx"]["name"] == str(mac)
    code, out, _ = ready("discover", "--json", broadcast=broadcast)
    states = {row["ip"]: row["state"] for row in json.loads(out)["nodes"]}
    assert states["10.0.0.5"] == "unchanged" and states["10.0.0.6"] == "unchanged"


def test_discover_shows_progress_while_it_waits(ready: Run) -> None:
    import time

    def slow(server_url: str, timeout: float = 10, **options: Any) -> dict[Any, Any]:
        time.sleep(2.5)
        return {}

    code, out, err = ready("discover", "--timeout", "2.5", broadcast=slow)
    assert code == 0 and "no Pi answered" in out
    assert "waiting for Pis to answer: " in err and "/2.5 s" in err


def test_discover_never_broadcasts_credentials(ready: Run, couch: Couch) -> None:
    code, _, err = ready("discover", "--node-server", couch.as_user("x", "y").url,
                         broadcast=lambda *a, **k: {})
    assert code == 1 and "must not contain credentials" in err


# -- every subcommand speaks JSON, and `himbeere upload` is the same command ----------------------

def test_json_everywhere(ready: Run, tmp_path: Path, provisioned: list[int]) -> None:
    mac = random_mac()
    provisioned.append(mac)
    source = write(tmp_path / "blink.py", "def main():\n    pass\n")
    for argv in (["setup"], ["push", str(source), "--node", "1000"],
                 ["pull", "blink", str(tmp_path / "out")], ["ls"],
                 ["provision", str(mac), "--password", "pw-json"],
                 ["rm", "blink", "--node", "1000"], ["rm", "blink", "--node", "1000"],
                 ["push", str(tmp_path), "--node", "nobody"]):
        code, out, _ = ready(*argv, "--json", broadcast=lambda *a, **k: {})
        payload = json.loads(out)
        assert payload["ok"] is (code == 0), argv
        if code:
            assert payload["error"]


def test_himbeere_upload_alias(ready: Run, couch_url: str, dbname: str,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIMBEERE_SERVER", couch_url)
    capsys.readouterr()
    assert himbeere(["upload", "ls", "--database", dbname, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "programs": []}
    with pytest.raises(SystemExit):
        himbeere(["upload", "--help"])
    assert "himbeere-upload" in capsys.readouterr().out


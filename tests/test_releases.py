"""Release history and rollback against the real server (issue 13, part 3).

Every push that writes is release ``n`` of its program: the documents get
``release``, ``pushed_by``, ``pushed_at`` and a ``release:<name>:<n>``
record keeps what was written.  ``history`` lists them, ``rollback``
writes an earlier one again as a new release, and a node reports which
release each program runs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from himbeere.couch import Couch
from himbeere.schema import RELEASE_TYPE, ROLLOUT_PREFIX, release_id, rollout_id
from tests.conftest import Upload
from tests.helpers import himbeere, wait_for
from tests.nodes import Node, wait_file
from uploader import releases, rollouts
from uploader.fleet import Fleet
from uploader.push import push


@pytest.fixture
def run(fleet: Fleet, upload: Upload) -> Upload:
    """``run(*argv)``: exit code, stdout, stderr of ``himbeere-upload``, databases set up."""
    return upload


def program(path: Path, text: str) -> Path:
    """A program that writes ``text`` into ``out.txt`` beside it, then waits."""
    out = path.parent / "out.txt"
    path.write_text(f"import time\ndef main():\n    with open({str(out)!r}, 'w') as f:\n"
                    f"        f.write({text!r})\n    time.sleep(3600)\n")
    return path


def records(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    return releases.releases(fleet, name)


def test_releases_count_up_and_an_unchanged_push_adds_none(fleet: Fleet, tmp_path: Path,
                                                           couch_url: str) -> None:
    source = program(tmp_path / "blink.py", "one")
    first = push(fleet, source, 1000)
    assert first["release"] == 1
    doc = fleet.code.get("1000:blink") or {}
    assert doc["release"] == 1 and doc["pushed_at"] and doc["pushed_by"]
    expected_user = Couch(couch_url).session_info()["userCtx"]["name"] or "admin"
    assert doc["pushed_by"] == expected_user

    again = push(fleet, source, 1000)
    assert again["action"] == "unchanged" and again["release"] == 1
    assert [r["release"] for r in records(fleet, "blink")] == [1]

    program(source, "two")
    assert push(fleet, source, 1000)["release"] == 2
    # The same name on another node, a placed and a global document: one numbering.
    assert push(fleet, source, 1001)["release"] == 3
    assert [r["release"] for r in records(fleet, "blink")] == [1, 2, 3]

    record = fleet.code.get(release_id("blink", 2)) or {}
    written = fleet.code.get("1000:blink") or {}
    assert record["type"] == RELEASE_TYPE and record["name"] == "blink"
    assert record["pushed_by"] == written["pushed_by"] and record["key"] is None
    assert record["rollout"] is None and record["source"] == str(source.resolve())
    # Exactly what was written, but the revision.
    assert record["docs"] == {"1000:blink": {k: v for k, v in written.items() if k != "_rev"}}
    assert record["changes"] == ["changed main.py (+1 -1 lines)"]


def test_placed_and_global_pushes_are_releases_too(fleet: Fleet, tmp_path: Path) -> None:
    from uploader.push import Placed

    source = program(tmp_path / "agg.py", "one")
    assert push(fleet, source, None, placed=Placed())["release"] == 1
    assert (fleet.code.get("placed:agg") or {})["release"] == 1
    shared = tmp_path / "lib" / "shared.py"
    shared.parent.mkdir()
    shared.write_text("X = 1\n")
    assert push(fleet, shared, None)["release"] == 1
    assert (fleet.code.get("global:shared") or {})["release"] == 1


def test_two_pushes_at_once_get_distinct_numbers(couch_url: str, dbname: str,
                                                 fleet: Fleet, tmp_path: Path) -> None:
    """Two laptops push the same program name at the same moment: the release
    record's PUT is the compare-and-swap, so neither number is lost or doubled."""
    nodes = list(range(2000, 2006))
    barrier = threading.Barrier(len(nodes))
    got: dict[int, Any] = {}

    def laptop(node: int) -> None:
        source = program(tmp_path / f"n{node}" / "race.py", f"from {node}")
        own = Fleet(couch_url, dbname)  # each laptop its own connection
        own.user  # noqa: B018 - ask for the session before the race starts
        barrier.wait()
        try:
            got[node] = push(own, source, node)["release"]
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            got[node] = exc

    for node in nodes:
        (tmp_path / f"n{node}").mkdir()
    threads = [threading.Thread(target=laptop, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got.values()) == list(range(1, len(nodes) + 1)), got
    numbers = {node: (fleet.code.get(f"{node}:race") or {}).get("release") for node in nodes}
    assert numbers == got
    assert [r["release"] for r in records(fleet, "race")] == list(range(1, len(nodes) + 1))
    for record in records(fleet, "race"):
        (doc_id,) = record["docs"]
        assert record["docs"][doc_id]["release"] == record["release"]


def test_history_lists_releases_newest_first(run: Upload, tmp_path: Path) -> None:
    source = program(tmp_path / "blink.py", "one")
    assert run("push", str(source), "--node", "1000")[0] == 0
    program(source, "two\n")
    code, out, err = run("push", str(source), "--node", "1000")
    assert code == 0, err
    assert out.splitlines()[0].endswith(", release 2")

    code, out, err = run("history", "blink")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["RELEASE", "PUSHED", "BY", "KEY", "DOCUMENTS", "WHAT"]
    assert [line.split()[0] for line in lines[1:]] == ["2", "1"]
    assert lines[1].endswith("1000:blink  changed main.py (+1 -1 lines)")
    assert lines[2].endswith("1000:blink  added main.py (5 lines)")

    code, out, err = run("history", "blink", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["ok"] and [e["release"] for e in answer["releases"]] == [2, 1]
    assert answer["releases"][0]["docs"] == ["1000:blink"]


def test_history_and_rollback_errors_are_one_line(run: Upload, tmp_path: Path) -> None:
    code, out, err = run("history", "nothing")
    assert code == 1 and err.strip() == ("himbeere-upload: error: program 'nothing' has no "
                                         "releases; programs with releases: none")
    source = program(tmp_path / "blink.py", "one")
    assert run("push", str(source), "--node", "1000")[0] == 0
    code, out, err = run("rollback", "blink")
    assert code == 1 and err.strip() == ("himbeere-upload: error: program 'blink' has only "
                                         "release 1: nothing to roll back to")
    code, out, err = run("rollback", "blink", "--to", "7")
    assert code == 1 and err.strip() == ("himbeere-upload: error: program 'blink' has no "
                                         "release 7; its releases: 1")
    code, out, err = run("rollback", "blink", "--to", "1")
    assert code == 1 and err.strip() == ("himbeere-upload: error: program 'blink' already "
                                         "runs the code of release 1: nothing to roll back")
    code, out, err = run("rollback", "other")
    assert code == 1 and err.strip() == ("himbeere-upload: error: program 'other' has no "
                                         "releases; programs with releases: blink")
    code, out, err = run("history", "other", "--json")
    assert code == 1 and json.loads(out)["ok"] is False


def test_rollback_runs_release_one_as_release_three(
        run: Upload, fleet: Fleet, tmp_path: Path, node_factory: Callable[..., Node],
        cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    node = node_factory(mac_id=1000)
    source = program(tmp_path / "blink.py", "version one")
    out_file = tmp_path / "out.txt"
    assert run("push", str(source), "--node", "1000")[0] == 0
    wait_file(out_file, contains="version one")
    node.wait_program("1000:blink", state="running", release=1)

    program(source, "version two")
    assert run("push", str(source), "--node", "1000")[0] == 0
    wait_file(out_file, contains="version two")
    node.wait_program("1000:blink", state="running", release=2)

    stopped = fleet.code.get("1000:blink") or {}
    code, out, err = run("rollback", "blink", "--to", "1")
    assert code == 0, err
    assert out.strip() == "release 3 of blink: rollback to release 1 (1000:blink)"
    wait_file(out_file, contains="version one")
    node.wait_program("1000:blink", state="running", release=3)

    doc = fleet.code.get("1000:blink") or {}
    first = (fleet.code.get(release_id("blink", 1)) or {})["docs"]["1000:blink"]
    assert doc["code"] == first["code"] and doc["release"] == 3
    assert doc["_rev"] != stopped["_rev"]
    code, out, err = run("history", "blink")
    assert out.splitlines()[1].endswith("1000:blink  rollback to release 1")
    code, out, err = himbeere(capsys, "status", "1000")
    header = next(line for line in out.splitlines() if "RELEASE" in line)
    row = next(line for line in out.splitlines() if "1000:blink" in line)
    assert header.split()[-1] == "RELEASE" and row.split()[-1] == "3"
    # Default: the one before the newest (2), again as a new release.
    code, out, err = run("rollback", "blink")
    assert code == 0, err
    wait_file(out_file, contains="version two")
    node.wait_program("1000:blink", state="running", release=4)


def test_rollback_keeps_a_stopped_program_stopped(run: Upload, fleet: Fleet,
                                                  tmp_path: Path) -> None:
    source = program(tmp_path / "blink.py", "one")
    push(fleet, source, 1000)
    program(source, "two")
    push(fleet, source, 1000)

    def stop(doc: dict[str, Any]) -> bool:
        doc["enabled"] = False
        return True

    fleet.code.update("1000:blink", stop)
    assert run("rollback", "blink")[0] == 0
    doc = fleet.code.get("1000:blink") or {}
    assert doc["enabled"] is False and doc["release"] == 3 and "'one'" in doc["code"]


def test_rollback_recreates_a_removed_document(run: Upload, fleet: Fleet, tmp_path: Path) -> None:
    source = program(tmp_path / "blink.py", "one")
    push(fleet, source, 1000)
    assert run("rm", "blink", "--node", "1000")[0] == 0
    program(source, "two")
    push(fleet, source, 1000)
    assert run("rm", "blink", "--node", "1000")[0] == 0
    assert run("rollback", "blink", "--to", "1")[0] == 0
    doc = fleet.code.get("1000:blink") or {}
    assert doc["release"] == 3 and "'one'" in doc["code"]


def test_compaction_keeps_the_history(run: Upload, fleet: Fleet, couch: Couch,
                                      tmp_path: Path) -> None:
    source = program(tmp_path / "blink.py", "one")
    for text in ("one", "two", "three"):
        program(source, text)
        push(fleet, source, 1000)
    couch.request("POST", f"{fleet.code.path}/_compact", body={})

    def compacted() -> bool:
        info = fleet.code.info()
        return not info.get("compact_running")

    wait_for(compacted, message="compaction never ended")
    assert [r["release"] for r in records(fleet, "blink")] == [1, 2, 3]
    first = (fleet.code.get(release_id("blink", 1)) or {})["docs"]["1000:blink"]
    assert "'one'" in first["code"]
    assert run("rollback", "blink", "--to", "1")[0] == 0
    assert "'one'" in (fleet.code.get("1000:blink") or {})["code"]


def test_a_push_that_loses_its_number_leaves_no_rollout_behind(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another laptop takes the release number between this push's look and its
    write: the push takes the next one, and the rollout it had made for the lost
    number goes (else it would stay ``running`` in ``himbeere rollouts`` for ever)."""
    source = program(tmp_path / "p.py", "one")
    push(fleet, source, 2100)
    fleet.code.save({"_id": release_id("p", 2), "type": RELEASE_TYPE, "name": "p",
                     "release": 2, "docs": {}})  # the other laptop's
    monkeypatch.setattr(releases, "latest", lambda fleet, name: 1)  # looked before it
    program(source, "two")
    result = push(fleet, source, 2100, rollout=rollouts.Plan.parse("1,100%", "1s"))
    assert result["release"] == 3 and result["rollout"] == rollout_id("p", 3)
    rows = fleet.status.all_docs(startkey=ROLLOUT_PREFIX, endkey=ROLLOUT_PREFIX + "\ufff0")
    assert [row["id"] for row in rows] == [rollout_id("p", 3)]
    assert fleet.code.get("2100:p")["rollout"] == rollout_id("p", 3)

"""The example programs in ``examples/``: each is a program the uploader
accepts and the docs show, and those that need no hardware run under a real
daemon and log what they say they do.

The examples are pushed with the uploader itself (``uploader.push.push``,
what ``himbeere-upload push`` runs), so a change that breaks pushing a file
or a folder breaks these tests too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from himbeere import codedoc
from himbeere.couch import Couch, Database
from tests.helpers import wait_for
from tests.nodes import Node
from uploader import install
from uploader.fleet import Fleet
from uploader.push import push, read_source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

#: Every example: a .py file or a folder with main.py, as ``push`` takes them.
ALL = sorted(path.name for path in EXAMPLES.iterdir()
             if path.suffix == ".py" or (path / "main.py").is_file())


def test_the_examples_are_the_ones_these_tests_know() -> None:
    """A new example needs a test here (and a page in the docs)."""
    assert ALL == ["aggregator.py", "blinker.py", "hello.py", "sensor_logger.py", "station"]


@pytest.mark.parametrize("name", ALL)
def test_an_example_is_a_valid_program(name: str) -> None:
    """What ``himbeere-upload push`` reads is a program the daemon would run."""
    source = read_source(EXAMPLES / name)
    doc = {"_id": f"1000:{source.name}", "type": 1000, "name": source.name, **source.fields()}
    program = codedoc.parse(doc)
    assert program.is_program
    if name == "station":  # a folder: main.py becomes the code, the rest modules
        assert "def main()" in doc["code"] and sorted(doc["modules"]) == ["report", "units"]


@pytest.mark.parametrize("name", ALL)
def test_the_docs_show_every_example(name: str) -> None:
    docs = "\n".join(page.read_text() for page in DOCS.glob("*.rst"))
    files = [EXAMPLES / name] if name.endswith(".py") else sorted((EXAMPLES / name).glob("*.py"))
    for path in files:
        assert f".. literalinclude:: ../examples/{path.relative_to(EXAMPLES)}" in docs


# -- under a real daemon -----------------------------------------------------------------

@pytest.fixture
def fleet(couch_url: str, dbname: str) -> Fleet:
    """The test's databases, set up as ``himbeere-upload setup`` does."""
    fleet = Fleet(couch_url, dbname)
    install.setup(fleet)
    return fleet


def pushed(fleet: Fleet, name: str, node: int = 1000) -> str:
    """Push ``examples/<name>`` to ``node``; the program's document id."""
    result = push(fleet, EXAMPLES / name, node)
    assert result["action"] == "created", result
    return str(result["id"])


def test_the_sensor_logger_keeps_its_tally_in_state(fleet: Fleet, node_factory,
                                                    code_db: Database, couch: Couch,
                                                    dbname: str) -> None:
    node: Node = node_factory(mac_id=1000)
    program = pushed(fleet, "sensor_logger.py")
    node.wait_log("[sensor_logger] reading 2: ")
    assert " C (min " in node.log() and "on node 1000" in node.log()

    # Stopped, it saves its state; started again, it carries on counting.
    code_db.save(dict(code_db.get(program), enabled=False))
    node.wait_program(program, state="stopped")
    kept = couch.database(dbname + "_status").get(f"state:{program}")
    assert kept is not None and kept["values"]["count"] >= 2, kept
    code_db.save(dict(code_db.get(program), enabled=True))
    node.wait_log(f"[sensor_logger] resuming after {kept['values']['count']} readings")
    node.wait_log(f"[sensor_logger] reading {kept['values']['count'] + 1}: ")


def test_the_aggregator_leads_and_summarises(fleet: Fleet, node_factory) -> None:
    node: Node = node_factory(mac_id=1000)
    pushed(fleet, "aggregator.py")
    node.wait_log("[aggregator] leading aggregator on node 1000")
    # Itself: one program on one node.
    node.wait_log("[aggregator] summary 1: 1 programs on 1 nodes")


def test_the_blinker_falls_back_to_the_log_without_gpio(fleet: Fleet, node_factory) -> None:
    node: Node = node_factory(mac_id=1000)
    program = pushed(fleet, "blinker.py")
    node.wait_log("[blinker] no GPIO here (")
    node.wait_log("[blinker] blink 10")
    node.wait_program(program, state="running")


def test_the_station_imports_its_modules(fleet: Fleet, node_factory) -> None:
    node: Node = node_factory(mac_id=1000)
    program = pushed(fleet, "station")
    node.wait_program(program, state="finished")
    node.wait_log("[station] kitchen: 21.5 C (70.7 F), 1013.2 hPa (29.92 inHg)")
    node.wait_log("[station] report done on node 1000")


def test_hello_ticks_and_says_goodbye(fleet: Fleet, node_factory, code_db: Database) -> None:
    node: Node = node_factory(mac_id=1000)
    program = pushed(fleet, "hello.py")
    node.wait_log("[hello] tick 2")
    code_db.save(dict(code_db.get(program), enabled=False))
    node.wait_log("[hello] asked to quit: goodbye")
    wait_for(lambda: node.program(program).get("state") == "stopped")

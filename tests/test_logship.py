"""Log shipping: a bounded ring per program, batched, surviving an outage."""

from __future__ import annotations

import re

from himbeere.couch import Couch
from himbeere.logship import LogShipper, log_id


def test_lines_land_in_a_bounded_ring(couch, dbname) -> None:
    db = couch.database(dbname)
    shipper = LogShipper(db, node=7, ring=5)
    shipper.add("7:blink", "blink", [(1.0, "one"), (2.0, "two")])
    assert shipper.flush() == 2
    doc = db.get(log_id(7, "7:blink"))
    assert doc["lines"] == [[1.0, "one"], [2.0, "two"]]
    assert doc["dropped"] == 0
    assert (doc["node"], doc["program"], doc["name"]) == (7, "7:blink", "blink")
    shipper.add("7:blink", "blink", [(float(i), f"line {i}") for i in range(3, 10)])
    shipper.flush()
    doc = db.get(log_id(7, "7:blink"))
    assert [text for _, text in doc["lines"]] == [f"line {i}" for i in range(5, 10)]
    # 7 lines arrived for a ring of 5: the buffer itself had to drop 2.
    assert doc["dropped"] == 2


def test_outage_buffers_then_drops_oldest_and_counts(restartable_server) -> None:
    couch = Couch(restartable_server.url)
    couch.create_database("logs")
    db = couch.database("logs")
    # pouchdb-server forgets a database that is still empty when it stops.
    db.save({"_id": "keep"})
    shipper = LogShipper(db, node=8, ring=4)
    restartable_server.stop()
    shipper.add("8:p", "p", [(1.0, "a"), (2.0, "b"), (3.0, "c")])
    assert shipper.flush() == 0  # server down: kept in memory
    shipper.add("8:p", "p", [(4.0, "d"), (5.0, "e"), (6.0, "f")])
    assert shipper.flush() == 0
    restartable_server.start()
    assert shipper.flush() == 4
    doc = db.get(log_id(8, "8:p"))
    assert [text for _, text in doc["lines"]] == ["c", "d", "e", "f"]
    assert doc["dropped"] == 2


def test_program_output_reaches_its_log_document(node_factory, couch, dbname) -> None:
    from tests.helpers import wait_for

    code = couch.database(dbname)
    code.save({"_id": "talker", "type": 1000, "name": "talker", "code": (
        "def main():\n"
        "    log('hello', 'log')\n"
        "    print('hello print')\n"
        "    for i in range(5000):\n"
        "        print('line', i)\n"
        "    print('last line')\n"
    )})
    node = node_factory(mac_id=1000)
    status_db = couch.database(dbname + "_status")

    def own(doc: dict) -> list:
        """The program's lines: the daemon's ("started", ...) have a kind too."""
        return [line[1] for line in doc.get("lines", []) if len(line) == 2]

    def shipped() -> dict:
        doc = status_db.get(log_id(1000, "talker")) or {}
        texts = own(doc)
        return doc if texts and texts[-1] == "last line" else {}

    doc = wait_for(shipped, message=lambda: node.log()[-2000:])
    texts = own(doc)
    assert len(doc["lines"]) == 1000  # the ring keeps the last 1000 lines
    assert texts[-2] == "line 4999"
    assert doc["name"] == "talker" and doc["node"] == 1000
    node.wait_program("talker", state="finished")
    # The daemon's own log shows the first lines, unless the child's queue
    # overflowed before they were sent; then it says how many it dropped.
    wait_for(lambda: "[talker] hello log" in node.log()
             or re.search(r"\[talker\] \d+ lines not shown", node.log()),
             message=lambda: node.log()[-3000:])


def test_the_daemons_lines_keep_their_kind(couch, dbname) -> None:
    """Issue 12: events and tracebacks are [time, text, kind]; a program's lines stay pairs."""
    from himbeere.logship import ERROR, EVENT

    db = couch.database(dbname)
    shipper = LogShipper(db, node=7)
    shipper.add("7:p", "p", [(1.0, "started (pid 4)", EVENT), (2.0, "hi"),
                             (3.0, "ZeroDivisionError: boom", ERROR)])
    assert shipper.flush() == 3
    assert db.get(log_id(7, "7:p"))["lines"] == [
        [1.0, "started (pid 4)", "event"], [2.0, "hi"], [3.0, "ZeroDivisionError: boom", "error"]]

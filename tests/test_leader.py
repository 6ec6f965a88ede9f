"""Leader election for programs (issue 5): ``leader``, ``is_leader``, ``on_leadership``.

In-process tests drive :class:`~himbeere.runtime.leadership.Leadership` against the
real server; the end-to-end tests run copies of one program on two real
daemons with real node users (the status database's rules let a node
take a lease only in a name starting with its MAC id).  Both copies append
to one shared file while they lead, each line stamped with the time, so
the file shows who led when, and that no two led at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from himbeere.couch import Couch, Database
from himbeere.fleet.lease import lease_id
from himbeere.runtime.leadership import Leadership, lease_name
from tests.conftest import NodeUserFactory
from tests.helpers import wait_for
from tests.nodes import Node

NodeFactory = Callable[..., Node]


def contender(db: Database, holder: str, reports: Optional[list[str]] = None,
              ttl: float = 3.0) -> Leadership:
    couch = db.couch
    node, _, program = holder.partition(":")
    return Leadership(lambda: db, holder, int(node), program,
                      clock=couch.server_time,
                      report=(reports if reports is not None else []).append,
                      ttl=ttl, retry=0.3)


# -- in process ------------------------------------------------------------------------------

def test_one_leads_and_a_release_hands_over(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    first, second = contender(db, "1:a"), contender(db, "2:b")
    events: list[str] = []
    gained = threading.Event()
    try:
        first.on_leadership("jobs", gained=lambda: events.append("first gained"),
                            lost=lambda: events.append("first lost"))
        assert first.leader("jobs") is True
        assert second.leader("jobs") is False
        assert first.is_leader("jobs") and not second.is_leader("jobs")
        wait_for(lambda: events == ["first gained"])
        second.on_leadership("jobs", gained=gained.set)
        lease = db.get(lease_id(lease_name("jobs")))
        assert lease is not None
        assert (lease["holder"], lease["node"], lease["program"]) == ("1:a", 1, "a")

        assert second.is_leader("other") is False  # asking does not join
        assert db.get(lease_id(lease_name("other"))) is None

        first.close()  # what the child does after main() returns
        assert db.get(lease_id(lease_name("jobs")))["holder"] is None
        assert not first.is_leader("jobs")
        wait_for(gained.is_set, message="the second never gained the released lease")
        assert second.is_leader("jobs")
        assert db.get(lease_id(lease_name("jobs")))["holder"] == "2:b"
        assert events == ["first gained"]  # a release at the end calls no lost()
    finally:
        first.close()
        second.close()


def test_lost_is_called_when_someone_else_holds_the_lease(couch: Couch, dbname: str) -> None:
    db = couch.database(dbname)
    reports: list[str] = []
    leader = contender(db, "1:a", reports)
    lost = threading.Event()
    try:
        leader.on_leadership("jobs", lost=lost.set)
        late: list[bool] = []
        leader.on_leadership("jobs", gained=lambda: late.append(True))
        wait_for(lambda: late == [True], message="gained() of a late registration not called")
        assert leader.is_leader("jobs")
        # An admin (or a stale write we lost to) puts someone else in.
        db.update(lease_id(lease_name("jobs")), lambda doc: doc.update(
            holder="9:other", expires=time.time() + 3600))
        wait_for(lost.is_set, message="lost() never called")
        assert not leader.is_leader("jobs") and not leader.leader("jobs")
        assert reports == []
    finally:
        leader.close()
    assert db.get(lease_id(lease_name("jobs")))["holder"] == "9:other"  # not ours to release


def test_helpers_say_what_is_allowed(couch: Couch, dbname: str) -> None:
    leadership = contender(couch.database(dbname), "1:a")
    with pytest.raises(ValueError, match="group '' is not allowed"):
        leadership.leader("")
    with pytest.raises(ValueError, match="ttl 0 is not allowed; allowed: seconds > 0"):
        leadership.leader("jobs", ttl=0)
    with pytest.raises(TypeError, match="gained must be a function"):
        leadership.on_leadership("jobs", gained=5)  # type: ignore[arg-type]
    leadership.close()


# -- copies of a program on two real nodes ------------------------------------------------------

ELECTED = """\
import os, time

def note(path, text):
    out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(out, (text + '\\n').encode())
    os.close(out)

def main():
    on_leadership('jobs', gained=lambda: note({events!r}, 'gained %d' % node),
                  lost=lambda: note({events!r}, 'lost %d' % node), ttl={ttl!r})
    note({events!r}, 'started %d' % node)
    while not should_quit():
        if leader('jobs'):
            note({leads!r}, '%d %.6f' % (node, time.time()))
        time.sleep(0.05)
"""


class Election:
    """Two nodes running copies of ELECTED, and what they wrote."""

    def __init__(self, node_user: NodeUserFactory, node_factory: NodeFactory,
                 code_db: Database, tmp_path: Path, ttl: float) -> None:
        self.events, self.leads = tmp_path / "events", tmp_path / "leads"
        self.code_db = code_db
        self.nodes: dict[int, Node] = {}
        code = ELECTED.format(events=str(self.events), leads=str(self.leads), ttl=ttl)
        for _ in range(2):
            mac, url = node_user()
            code_db.save({"_id": f"{mac}:jobs", "type": mac, "name": "jobs", "code": code})
            self.nodes[mac] = node_factory(mac_id=mac, url=url)

    def lines(self, path: Path) -> list[str]:
        try:
            return path.read_text().splitlines()
        except OSError:
            return []

    def led(self) -> list[tuple[int, float]]:
        return [(int(node), float(when)) for node, when in
                (line.split() for line in self.lines(self.leads))]

    def wait_event(self, text: str, timeout: float = 30.0) -> None:
        wait_for(lambda: text in self.lines(self.events), timeout, message=lambda: (
            f"{text!r} not among the events {self.lines(self.events)}; logs:\n"
            + "\n".join(node.log()[-2000:] for node in self.nodes.values())))

    def leader(self) -> int:
        """Once both copies run and one has led a while: which one leads."""
        for mac in self.nodes:
            self.wait_event(f"started {mac}")
        wait_for(lambda: len(self.led()) >= 40, message="nobody leads")
        gained = [line for line in self.lines(self.events) if line.startswith("gained")]
        assert len(gained) == 1, self.lines(self.events)
        leader = int(gained[0].split()[1])
        assert {node for node, _ in self.led()} == {leader}  # the other never led
        return leader

    def handed_over(self, old: int, new: int) -> None:
        """``new`` leads now, and started only after ``old`` had stopped."""
        wait_for(lambda: any(node == new for node, _ in self.led()),
                 message=f"node {new} never led")
        old_last = max(when for node, when in self.led() if node == old)
        new_first = min(when for node, when in self.led() if node == new)
        assert old_last < new_first, "two leaders at once"


@pytest.mark.slow
def test_the_other_node_takes_over_when_the_leaders_node_dies(
        node_user: NodeUserFactory, node_factory: NodeFactory, code_db: Database,
        couch: Couch, dbname: str, tmp_path: Path) -> None:
    election = Election(node_user, node_factory, code_db, tmp_path, ttl=4.0)
    leader = election.leader()
    follower = next(mac for mac in election.nodes if mac != leader)
    status_db = couch.database(dbname + "_status")
    lease = status_db.get(lease_id(lease_name("jobs")))
    assert lease["holder"] == f"{leader}:{leader}:jobs" and lease["epoch"] == 1

    # The leader's node dies: its program first (its daemon would restart
    # it), then the daemon; nothing releases the lease.
    election.nodes[leader].kill_programs()
    election.nodes[leader].kill()
    election.wait_event(f"gained {follower}")
    election.handed_over(leader, follower)
    lease = status_db.get(lease_id(lease_name("jobs")))
    assert lease["holder"] == f"{follower}:{follower}:jobs" and lease["epoch"] == 2
    assert f"lost {follower}" not in election.lines(election.events)
    log = election.nodes[follower].log()
    for refusal in (" 401 ", " 403 ", "leadership of jobs"):
        assert refusal not in log, f"{refusal!r} in the node log:\n{log[-3000:]}"


@pytest.mark.slow
def test_a_program_that_stops_hands_over_at_once(
        node_user: NodeUserFactory, node_factory: NodeFactory, code_db: Database,
        couch: Couch, dbname: str, tmp_path: Path) -> None:
    """The lease outlives a renewal by 60 s; a release at quit does not wait for that."""
    election = Election(node_user, node_factory, code_db, tmp_path, ttl=60.0)
    leader = election.leader()
    follower = next(mac for mac in election.nodes if mac != leader)
    code_db.save(dict(code_db.get(f"{leader}:jobs"), enabled=False))
    election.nodes[leader].wait_program(f"{leader}:jobs", state="stopped")
    released = couch.database(dbname + "_status").get(lease_id(lease_name("jobs")))
    assert released["holder"] in (None, f"{follower}:{follower}:jobs")
    election.wait_event(f"gained {follower}", timeout=20.0)  # well inside the 60 s
    election.handed_over(leader, follower)
    assert f"lost {leader}" not in election.lines(election.events)  # released at the end

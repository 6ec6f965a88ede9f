"""Leases by compare-and-swap on _rev, on the real server."""

from __future__ import annotations

from himbeere.fleet.lease import Lease, lease_id


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_holder_then_takeover_after_expiry(couch, dbname) -> None:
    db = couch.database(dbname)
    clock = Clock()
    a = Lease(db, "scheduler", "1", ttl=30, clock=clock)
    b = Lease(db, "scheduler", "2", ttl=30, clock=clock)
    assert a.acquire() is True
    assert b.acquire() is False
    assert a.held and not b.held
    assert a.epoch == 1
    clock.now += 20
    assert a.acquire() is True  # renewal
    clock.now += 20
    assert b.acquire() is False  # renewed 20 s ago: still a's
    clock.now += 15
    assert b.acquire() is True  # a stopped renewing: expired
    assert b.epoch == 2
    assert db.get(lease_id("scheduler"))["holder"] == "2"


def test_stale_holder_cannot_write(couch, dbname) -> None:
    db = couch.database(dbname)
    clock = Clock()
    a = Lease(db, "scheduler", "1", ttl=10, clock=clock)
    b = Lease(db, "scheduler", "2", ttl=10, clock=clock)
    assert a.acquire(assignments={"p": [1]})
    clock.now += 11
    assert b.acquire(assignments={"p": [2]})
    # a still thinks it holds the lease on a clock that lags behind
    clock.now -= 5
    assert a.held
    assert a.update(assignments={"p": [1]}) is False  # 409 on _rev
    assert db.get(lease_id("scheduler"))["assignments"] == {"p": [2]}


def test_racing_contenders_get_one_winner(couch, dbname) -> None:
    db = couch.database(dbname)
    clock = Clock()
    contenders = [Lease(db, "job", str(n), ttl=30, clock=clock) for n in range(5)]
    for lease in contenders:
        lease.read()  # everyone saw the lease free ...
    wins = [lease._write(dict({"_id": lease_id("job"), "holder": lease.holder,
                              "expires": clock.now + 30})) for lease in contenders]
    assert wins.count(True) == 1  # ... and only the first create wins


def test_release_lets_the_next_in(couch, dbname) -> None:
    db = couch.database(dbname)
    clock = Clock()
    a = Lease(db, "x", "1", ttl=30, clock=clock)
    b = Lease(db, "x", "2", ttl=30, clock=clock)
    assert a.acquire()
    a.release()
    assert b.acquire()

"""The health history ring (``history:<mac>``): bounded, 5-minute buckets, gaps, restarts.

Fast steps: heartbeats are handed to :class:`History` one by one, with the
times a test picks, and the ring is read back from the real status database.
"""

from __future__ import annotations

import json
import random
from typing import Any, Optional

from himbeere import defaults, history
from himbeere.health import Health
from himbeere.history import History
from himbeere.schema import history_id
from himbeere.status import Status
from uploader.fleet import Fleet

MAC = 4242
#: A Monday, 00:00:00 UTC: bucket boundaries are multiples of 300 from here.
T0 = 1764547200.0


def heartbeat(when: float, cpu: Optional[float] = 10.0, restarts: Optional[dict[str, int]] = None,
              **more: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "heartbeat_time": when - 3.0, "heartbeat_server_time": when,
        "cpu_percent": cpu, "memory_used_mb": 300.0, "temperature": 50.0,
        "load": [0.5, 0.4, 0.3], "disk_free_mb": 9000.0,
        "programs": {p: {"state": "running", "restarts": n}
                     for p, n in (restarts or {}).items()},
    }
    doc.update(more)
    return doc


def stored(fleet: Fleet) -> dict[str, Any]:
    doc = fleet.status.get(history_id(MAC))
    assert doc is not None, "no history document was written"
    return doc


def test_heartbeats_of_one_bucket_become_one_sample_of_their_means(fleet: Fleet) -> None:
    ring = History(fleet.status, MAC)
    for second, cpu in ((0, 10.0), (100, 20.0), (290, 60.0)):
        assert ring.add(heartbeat(T0 + second, cpu)) is False  # the bucket is not over
    assert fleet.status.get(history_id(MAC)) is None  # nothing written within a bucket
    assert ring.add(heartbeat(T0 + 300, 99.0)) is True
    doc = stored(fleet)
    assert doc["type"] == "himbeere-history" and doc["node"] == MAC
    assert doc["columns"] == ["time", "cpu_percent", "memory_used_mb", "temperature", "load",
                              "disk_free_mb", "restarts"]
    assert doc["samples"] == [[int(T0), 30.0, 300.0, 50.0, 0.5, 9000.0, None]]
    assert ring.writes == 1


def test_the_ring_keeps_a_day_of_five_minute_samples(fleet: Fleet) -> None:
    ring = History(fleet.status, MAC)
    assert (ring.interval, ring.length) == (300.0, 288) == (
        defaults.HISTORY_INTERVAL, defaults.HISTORY_LENGTH)
    # 30 hours of heartbeats, every 60 s: 360 buckets, one write per bucket.
    for minute in range(30 * 60 + 1):
        ring.add(heartbeat(T0 + 60 * minute + 1, cpu=float(minute % 100)))
    samples = stored(fleet)["samples"]
    assert len(samples) == 288
    times = [s[0] for s in samples]
    assert all(t % 300 == 0 for t in times)
    assert [b - a for a, b in zip(times, times[1:])] == [300] * 287
    assert times[-1] == T0 + 30 * 3600 - 300  # the last finished bucket
    assert ring.writes == 360


def test_a_missed_heartbeat_leaves_a_gap_not_a_made_up_sample(fleet: Fleet) -> None:
    ring = History(fleet.status, MAC)
    ring.add(heartbeat(T0 + 10, cpu=5.0))
    ring.add(heartbeat(T0 + 310, cpu=15.0))
    # The node is off for three buckets; the next heartbeat closes the 300 s bucket.
    ring.add(heartbeat(T0 + 1510, cpu=25.0))
    ring.add(heartbeat(T0 + 1810, cpu=35.0))
    doc = stored(fleet)
    assert [s[0] for s in doc["samples"]] == [T0, T0 + 300, T0 + 1500]
    chart = history.series(doc)
    assert chart["time"] == [T0 + 300 * i for i in range(6)]
    assert chart["cpu_percent"] == [5.0, 15.0, None, None, None, 25.0]
    assert chart["memory_used_mb"] == [300.0, 300.0, None, None, None, 300.0]


def test_a_figure_the_node_cannot_measure_is_null(fleet: Fleet) -> None:
    ring = History(fleet.status, MAC)
    ring.add(heartbeat(T0, cpu=None, temperature=None, load=None))
    ring.flush()
    assert stored(fleet)["samples"] == [[int(T0), None, 300.0, None, None, 9000.0, None]]


def test_restarts_are_counted_per_program_and_bucket(fleet: Fleet) -> None:
    ring = History(fleet.status, MAC)
    ring.add(heartbeat(T0, restarts={"4242:blink": 0, "4242:calm": 3}))  # counted before: not new
    ring.add(heartbeat(T0 + 100, restarts={"4242:blink": 2, "4242:calm": 3}))
    ring.add(heartbeat(T0 + 200, restarts={"4242:blink": 3, "4242:calm": 3}))
    # A new revision resets blink's counter; it restarted once since.
    ring.add(heartbeat(T0 + 400, restarts={"4242:blink": 1, "4242:calm": 3}))
    ring.add(heartbeat(T0 + 700, restarts={"4242:blink": 1}))
    samples = stored(fleet)["samples"]
    assert [s[-1] for s in samples] == [{"4242:blink": 3}, {"4242:blink": 1}]
    assert history.series(stored(fleet))["restarts"] == [
        [T0, "4242:blink", 3], [T0 + 300, "4242:blink", 1]]


def test_a_restarted_daemon_keeps_the_day_and_merges_its_bucket(fleet: Fleet) -> None:
    first = History(fleet.status, MAC)
    first.add(heartbeat(T0, cpu=10.0))
    first.add(heartbeat(T0 + 300, cpu=20.0, restarts={"p": 0}))
    first.add(heartbeat(T0 + 350, cpu=20.0, restarts={"p": 1}))
    first.flush()  # the daemon stops in the middle of the second bucket
    second = History(fleet.status, MAC)
    second.add(heartbeat(T0 + 400, cpu=40.0, restarts={"p": 0}))
    second.add(heartbeat(T0 + 600, cpu=50.0, restarts={"p": 2}))
    samples = stored(fleet)["samples"]
    assert [s[0] for s in samples] == [T0, T0 + 300]
    assert samples[0][1] == 10.0
    assert samples[1][1] == 40.0  # the newer figures of the bucket
    assert samples[1][-1] == {"p": 1}  # restarts of both daemons, added up


def test_a_ring_of_another_interval_is_started_afresh(fleet: Fleet) -> None:
    old = History(fleet.status, MAC, interval=60.0)
    old.add(heartbeat(T0))
    old.flush()
    ring = History(fleet.status, MAC)
    ring.add(heartbeat(T0 + 600))
    ring.flush()
    doc = stored(fleet)
    assert doc["interval"] == 300.0 and [s[0] for s in doc["samples"]] == [T0 + 600]


def test_a_separate_document_costs_the_heartbeat_nothing(fleet: Fleet) -> None:
    """Why ``history:<mac>`` and not a field of the status document: its size.

    A day of samples is about 15 KB; a heartbeat about 1 KB.  Inside the
    status document the ring would travel with every heartbeat (every 10 s);
    apart, it is written once per 5 minutes.
    """
    rng = random.Random(1)
    samples = [[int(T0) + 300 * i, round(rng.uniform(0, 100), 2), round(rng.uniform(200, 900), 2),
                round(rng.uniform(40, 80), 2), round(rng.uniform(0, 4), 2),
                round(rng.uniform(1000, 30000), 2), {f"{MAC}:blink": 1} if i % 50 == 0 else None]
               for i in range(288)]
    doc = {"_id": history_id(MAC), "_rev": "12-" + "a" * 32, "type": "himbeere-history",
           "node": MAC, "interval": 300.0, "columns": list(history.COLUMNS),
           "samples": samples, "updated": "2025-12-01T00:00:00.000Z"}
    size = len(json.dumps(doc))
    assert 10_000 < size < 20_000
    programs = {f"{MAC}:program-{i}": {"name": f"program-{i}", "state": "running", "pid": 4000 + i,
                                        "restarts": 0, "rev": "3-" + "b" * 32,
                                        "started": "2025-12-01T00:00:00.000Z"}
                for i in range(3)}
    status = Status(fleet.status, MAC, 10.0, programs=lambda: programs,
                    extra=Health(proc="/proc").collect)
    status_size = len(json.dumps(dict(status.document(), _rev="1-" + "c" * 32)))
    assert status_size * 10 < size

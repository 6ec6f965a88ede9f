"""Health figures (with fake /proc, thermal zone and vcgencmd) and node states."""

from __future__ import annotations

import os
from pathlib import Path

from himbeere import health
from himbeere.health import Health


def fake_proc(root: Path, idle: int, total_busy: int) -> Path:
    root.mkdir(exist_ok=True)
    (root / "uptime").write_text("12345.67 999.0\n")
    (root / "stat").write_text(f"cpu  {total_busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 1 1 1\n")
    (root / "meminfo").write_text(
        "MemTotal:        1024000 kB\nMemFree:          100000 kB\n"
        "MemAvailable:     512000 kB\n")
    return root


def test_figures_from_a_pi_like_machine(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", idle=1000, total_busy=1000)
    zone = tmp_path / "temp"
    zone.write_text("48312\n")
    vcgencmd = tmp_path / "vcgencmd"
    vcgencmd.write_text("#!/bin/sh\necho throttled=0x50005\n")
    vcgencmd.chmod(0o755)
    probe = Health(str(tmp_path), proc=str(proc), thermal_zone=str(zone),
                   vcgencmd=str(vcgencmd))
    first = probe.collect()
    assert first["system_uptime"] == 12345.7
    assert first["cpu_percent"] is None  # needs two readings
    assert first["memory_total_mb"] == 1000.0
    assert first["memory_used_mb"] == 500.0
    assert first["temperature"] == 48.3
    assert first["throttled"] == {"raw": "0x50005", "flags": [
        "undervoltage", "throttled", "undervoltage_occurred", "throttling_occurred"]}
    assert first["disk_free_mb"] > 0
    assert len(first["load"]) == 3
    fake_proc(proc, idle=1300, total_busy=1100)  # 100 busy of 400 ticks
    assert probe.collect()["cpu_percent"] == 25.0


def test_missing_figures_are_none_not_errors(tmp_path: Path) -> None:
    probe = Health(str(tmp_path / "missing"), proc=str(tmp_path / "noproc"),
                   thermal_zone=str(tmp_path / "nozone"), vcgencmd="no-such-vcgencmd")
    figures = probe.collect()
    for key in ("system_uptime", "cpu_percent", "memory_used_mb", "memory_total_mb",
                "disk_free_mb", "temperature", "throttled"):
        assert figures[key] is None, key


def test_node_states_by_heartbeat_age() -> None:
    now = 1_000_000.0
    def status(age: float, **extra: object) -> dict:
        return dict({"heartbeat_time": now - age, "heartbeat_interval": 10}, **extra)

    assert health.node_state(status(5), now) == "alive"
    assert health.node_state(status(25), now) == "alive"
    assert health.node_state(status(26), now) == "suspect"
    assert health.node_state(status(60), now) == "suspect"
    assert health.node_state(status(61), now) == "dead"
    assert health.node_state(status(600, state="stopped"), now) == "stopped"
    assert health.node_state(None, now) == "unknown"
    assert health.node_state({"heartbeat_time": "yesterday"}, now) == "unknown"
    # The server-clock stamp wins over the node's own clock.
    skewed = status(500, heartbeat_server_time=now - 1)
    assert health.node_state(skewed, now) == "alive"


def test_heartbeat_carries_health_and_clock_offset(node_factory) -> None:
    node = node_factory(mac_id=4242)
    from tests.helpers import wait_for

    # The first heartbeat may go out before any answer told us the server's clock.
    status = wait_for(lambda: (node.status() or {}).get("clock_offset") is not None
                      and node.status())
    assert status["memory_total_mb"] > 0
    assert status["node"] == 4242
    assert status["python"].count(".") == 2
    assert status["daemon_version"]
    assert isinstance(status["clock_offset"], float)
    assert abs(status["clock_offset"]) < 5  # same machine, same clock
    assert status["ip"] is None or status["ip"].count(".") == 3
    assert health.node_state(status) == "alive"
    assert node.stop() == 0
    assert health.node_state(node.status()) == "stopped"
    assert os.path.exists(node.state_dir)

"""Health figures for the heartbeat, and how alive a node is.

Every figure a machine cannot provide (no thermal zone off a Pi, no
``vcgencmd``) is ``None``, never an error.  Paths and commands are
arguments, so tests point them at files of their own (gpiozero's habit).

Failure detection uses documented multiples of the heartbeat interval,
judged by whoever reads a status document (CLI, dashboard, scheduler):

========== ==================================================================
``alive``  the last heartbeat is at most ``SUSPECT_AFTER`` (2.5) intervals old
``suspect`` older than that, but at most ``DEAD_AFTER`` (6) intervals
``dead``   older than ``DEAD_AFTER`` intervals
``stopped`` the daemon stopped cleanly and said so in its last heartbeat
========== ==================================================================

With the default 10 s interval a node is suspect after 25 s of silence and
dead after 60 s.  The age is measured on the server's clock: nodes stamp
their heartbeat with ``heartbeat_time`` corrected by their measured clock
offset, and readers correct their own clock the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

SUSPECT_AFTER = 2.5
DEAD_AFTER = 6.0

THERMAL_ZONE = "/sys/class/thermal/thermal_zone0/temp"
THROTTLE_FLAGS = {
    0: "undervoltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "undervoltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


def node_state(status: Optional[dict[str, Any]], now: Optional[float] = None) -> str:
    """``alive``, ``suspect``, ``dead``, ``stopped`` or ``unknown`` for a status doc."""
    if not status:
        return "unknown"
    if status.get("state") == "stopped":
        return "stopped"
    age = heartbeat_age(status, now)
    if age is None:
        return "unknown"
    interval = float(status.get("heartbeat_interval") or 10.0)
    if age <= SUSPECT_AFTER * interval:
        return "alive"
    if age <= DEAD_AFTER * interval:
        return "suspect"
    return "dead"


def heartbeat_age(status: dict[str, Any], now: Optional[float] = None) -> Optional[float]:
    """Seconds since the node's last heartbeat, on the server's clock if known."""
    stamp = status.get("heartbeat_server_time", status.get("heartbeat_time"))
    if not isinstance(stamp, (int, float)):
        return None
    return max(0.0, (time.time() if now is None else now) - float(stamp))


class Health:
    """Collects the figures; keeps the CPU counters between two calls."""

    def __init__(self, state_dir: str = "/", proc: str = "/proc",
                 thermal_zone: str = THERMAL_ZONE, vcgencmd: Optional[str] = "vcgencmd") -> None:
        self.state_dir = state_dir
        self.proc = Path(proc)
        self.thermal_zone = thermal_zone
        self.vcgencmd = vcgencmd
        self._cpu: Optional[tuple[int, int]] = None

    def collect(self) -> dict[str, Any]:
        memory = self.memory()
        return {
            "system_uptime": self.uptime(),
            "load": self.load(),
            "cpus": os.cpu_count(),
            "cpu_percent": self.cpu_percent(),
            "memory_used_mb": memory[0],
            "memory_total_mb": memory[1],
            "disk_free_mb": self.disk_free(),
            "temperature": self.temperature(),
            "throttled": self.throttled(),
        }

    def uptime(self) -> Optional[float]:
        try:
            return round(float((self.proc / "uptime").read_text().split()[0]), 1)
        except (OSError, ValueError, IndexError):
            return None

    def load(self) -> Optional[list[float]]:
        try:
            return [round(x, 2) for x in os.getloadavg()]
        except OSError:
            return None

    def cpu_percent(self) -> Optional[float]:
        """Busy share of all cores since the previous call (None the first time)."""
        try:
            fields = (self.proc / "stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) for v in fields]
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values[:8])
        previous, self._cpu = self._cpu, (idle, total)
        if previous is None or total <= previous[1]:
            return None
        busy = 1.0 - (idle - previous[0]) / (total - previous[1])
        return round(100.0 * max(0.0, min(1.0, busy)), 1)

    def memory(self) -> tuple[Optional[float], Optional[float]]:
        try:
            info = {}
            for line in (self.proc / "meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])
            total = info["MemTotal"]
            available = info.get("MemAvailable", info.get("MemFree", 0))
        except (OSError, ValueError, KeyError, IndexError):
            return None, None
        return round((total - available) / 1024, 1), round(total / 1024, 1)

    def disk_free(self) -> Optional[float]:
        try:
            return round(shutil.disk_usage(self.state_dir).free / 2**20, 1)
        except OSError:
            return None

    def temperature(self) -> Optional[float]:
        """CPU temperature in °C from the Pi's thermal zone."""
        try:
            return round(int(Path(self.thermal_zone).read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            return None

    def throttled(self) -> Optional[dict[str, Any]]:
        """``vcgencmd get_throttled`` decoded, or None off a Pi."""
        if not self.vcgencmd or shutil.which(self.vcgencmd) is None:
            return None
        try:
            output = subprocess.run([self.vcgencmd, "get_throttled"], capture_output=True,
                                    text=True, timeout=5).stdout
            value = int(output.strip().split("=")[1], 16)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
        return decode_throttled(value)


def decode_throttled(value: int) -> dict[str, Any]:
    flags = [name for bit, name in THROTTLE_FLAGS.items() if value & (1 << bit)]
    return {"raw": hex(value), "flags": flags}

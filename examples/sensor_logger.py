"""A sensor logger: reads a temperature every few seconds and keeps a tally in ``state``.

``state`` is a dict kept in CouchDB (``state:<program id>`` in the status
database): the count, the minimum and the maximum survive a restart, a
reboot, and a move of the program to another node.  On a Pi the sensor is
the SoC's own thermometer; anywhere else (a laptop running the demo) the
reading comes from the load average instead, so the program runs the same.

Push it with ``himbeere-upload push examples/sensor_logger.py --node NODE``
and watch it with ``himbeere logs NODE sensor_logger -f``; ``himbeere state
sensor_logger`` shows what it keeps.
"""

import os
import time

#: The Pi's SoC temperature, in thousandths of a degree Celsius.
THERMAL_ZONE = "/sys/class/thermal/thermal_zone0/temp"
#: Seconds between readings.
INTERVAL = 2.0
#: Save the state every this many readings (it is saved at quit anyway;
#: a power cut loses at most this many).
SAVE_EVERY = 5


def read_temperature():
    """Degrees Celsius, from the thermal zone or (without one) the load average."""
    try:
        with open(THERMAL_ZONE) as sensor:
            return int(sensor.read().strip()) / 1000.0
    except (OSError, ValueError):
        return 40.0 + os.getloadavg()[0]


def record(reading):
    """Add one reading to the tally in ``state``."""
    state["count"] = state.get("count", 0) + 1
    state["last"] = reading
    state["min"] = min(state.get("min", reading), reading)
    state["max"] = max(state.get("max", reading), reading)


def main():
    if state.get("count"):
        log(f"resuming after {state['count']} readings")
    while not should_quit():
        reading = round(read_temperature(), 1)
        record(reading)
        log(f"reading {state['count']}: {reading} C "
            f"(min {state['min']}, max {state['max']}) on node {node}")
        if state["count"] % SAVE_EVERY == 0:
            state.save()
        # Wait in short slices, so that a stop is noticed at once.
        deadline = time.monotonic() + INTERVAL
        while not should_quit() and time.monotonic() < deadline:
            time.sleep(0.1)

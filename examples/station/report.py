"""Formatting the report, a module of the ``station`` program.

The helpers (``log``, ``node``, ...) are globals of every module of a
program, not only of ``main``; this module needs none of them.
"""


def lines(readings, to_fahrenheit, to_inhg):
    """One line per (room, degrees Celsius, hectopascals) reading."""
    for room, celsius, hpa in readings:
        yield (f"{room}: {celsius:.1f} C ({to_fahrenheit(celsius):.1f} F), "
               f"{hpa:.1f} hPa ({to_inhg(hpa):.2f} inHg)")

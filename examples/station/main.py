"""A program of several modules: a weather station's report.

Pushing the folder (``himbeere-upload push examples/station --node NODE``)
makes one document: ``main.py`` becomes the main module, ``units.py`` and
``report.py`` become ``modules``, importable by name as if they were files
beside it.  A module pushed with ``--global`` would be importable by every
program in the same way.
"""

import report
import units

READINGS = [("kitchen", 21.5, 1013.2), ("cellar", 12.0, 1013.9), ("attic", 27.25, 1012.6)]


def main():
    for line in report.lines(READINGS, units.celsius_to_fahrenheit, units.hpa_to_inhg):
        log(line)
    log(f"report done on node {node}")

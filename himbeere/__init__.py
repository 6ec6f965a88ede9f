"""himbeere: run Python code stored in CouchDB on a fleet of Raspberry Pis.

The map of the package, one line per module, and how a change travels from
CouchDB to a running program, is in ``docs/architecture.rst``: kept in one
place, so that it cannot drift.
"""

__version__ = "0.1.0"

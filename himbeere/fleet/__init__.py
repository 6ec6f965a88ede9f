"""Fleet coordination: leases in CouchDB, the scheduler, and each node's part.

``lease``      one holder at a time, by compare-and-swap on ``_rev``
``scheduler``  which nodes run which placed programs (pure, no I/O)
``placement``  the node's thread: follows the assignment, schedules under the lease

This ``__init__`` imports nothing: a program's ``leader()`` imports only
:mod:`himbeere.fleet.lease`.
"""

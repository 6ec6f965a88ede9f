"""What runs inside a program's own process, forked by the fork server.

``child``       the program's main: helpers, importer, quit notifications
``progstate``   the program's persistent ``state`` (the status database)
``leadership``  ``leader(group)`` and ``on_leadership``: elections among programs
``reaper``      subreapers: nothing a program starts outlives it

Every program process carries these modules, so they stay light: none
imports the CouchDB client (:mod:`himbeere.couch`) before a program uses
``state``, ``leader()`` or ``db``, nor the daemon, nor anything of the
laptop side; ``tests/test_layout.py`` holds them to it.  This ``__init__``
imports nothing.
"""

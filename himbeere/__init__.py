"""himbeere: run Python code stored in CouchDB on a fleet of Raspberry Pis.

The map (one module per noun):

============== ============================================================
``config``     settings from INI file, ``HIMBEERE_*`` variables and flags
``defaults``   every default value, documented
``exceptions`` ``HimbeereError`` and its subclasses
``identity``   MAC id, password, serial number and IP address of a node
``couch/``     the CouchDB access layer, shared with the laptop tools: the
               client (the only module that builds a URL), transport, design
               documents and feed filter, security rules, their ``js/``
``feed``       following ``_changes``, saving the ``seq``, reconnecting
``codedoc``    reading code documents into programs
``programs``   supervising programs: start, restart, back off, stop
``forkserver`` the single-threaded process that forks programs warm
``runtime/``   what runs inside a program's process: helpers, importer
               (``child``), ``state`` (``progstate``), ``leader()``
               (``leadership``), subreapers (``reaper``)
``commands``   running commands exactly once (``<macid>_cmd``, fleet commands)
``journal``    the on-disk journal of commands taken on, for exactly once
``launcher``   the runner server, and what a runner's directory tells
``runner``     one command's runner: outlives the daemon, leaves the result on disk
``status``     the node's status document and heartbeat
``health``     health figures; alive, suspect, dead
``fleet/``     fleet coordination: leases in CouchDB (``lease``), the pure
               scheduler (``scheduler``) and the node's placement thread
               (``placement``): failover, fencing
``logship``    program output into the status database (and, up to a
               rate, into the daemon's log)
``oneshot``    ``restart: never`` programs that ended stay ended until reboot
``logtext``    names and errors from documents made safe for a log line
``discovery``  pairing by UDP broadcast, laptop and node sides
``fleetkey``   the shared pairing secret (HMAC, AES-GCM)
``gpio``       the node's LED
``daemon``     wiring it all together; signals
``statelock``  one daemon per state directory (an ``fcntl`` lock)
``service``    running the daemon in the background (pidfile)
``cli``        the ``himbeere`` command
============== ============================================================
"""

__version__ = "0.1.0"

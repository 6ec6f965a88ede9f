"""himbeere: run Python code stored in CouchDB on a fleet of Raspberry Pis.

The map (one module per noun):

============== ============================================================
``config``     settings from INI file, ``HIMBEERE_*`` variables and flags
``defaults``   every default value, documented
``exceptions`` ``HimbeereError`` and its subclasses
``identity``   MAC id, password, serial number and IP address of a node
``couch``      all CouchDB access; the only module that builds a URL
``design``     the design document and the node's ``_changes`` filter
``feed``       following ``_changes``, saving the ``seq``, reconnecting
``codedoc``    reading code documents into programs
``programs``   supervising programs: start, restart, back off, stop
``forkserver`` the single-threaded process that forks programs warm
``child``      what runs inside a program's process: helpers, importer
``reaper``     subreapers: nothing a program starts outlives it
``progstate``  a program's persistent ``state``, kept in the status database
``leadership`` ``leader(group)``, ``on_leadership``: elections among programs
``commands``   running commands exactly once (``<macid>_cmd``, fleet commands)
``launcher``   the runner server, and what a runner's directory tells
``runner``     one command's runner: outlives the daemon, leaves the result on disk
``status``     the node's status document and heartbeat
``health``     health figures; alive, suspect, dead
``lease``      leases in CouchDB, one holder at a time (CAS on ``_rev``)
``placement``  placed programs: the scheduler (under ``lease:scheduler``),
               assignments to the least busy nodes, failover, fencing
``logship``    program output into the status database (and, up to a
               rate, into the daemon's log)
``oneshot``    ``restart: never`` programs that ended stay ended until reboot
``logtext``    names and errors from documents made safe for a log line
``security``   roles, ``_security`` and ``validate_doc_update`` rules
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

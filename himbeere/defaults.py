"""Every default in one place, so the docs and the code cannot disagree."""

from __future__ import annotations

#: INI file read when no ``--config``/``HIMBEERE_CONFIG`` is given.
CONFIG_FILE = "/etc/himbeere/himbeere.conf"
#: The original HimbeereCouch server file: one line holding the server URL.
LEGACY_SERVER_FILE = "/var/rspby/server"

DATABASE = "raspberries"
STATUS_SUFFIX = "_status"
STATE_DIR = "/var/lib/himbeere"
INTERFACE = "eth0"

#: Seconds between two status documents written by a node.
HEARTBEAT_INTERVAL = 10.0
#: Seconds the server may stay silent on the feed before it counts as dead;
#: the feed asks the server for a heartbeat every third of this.
FEED_TIMEOUT = 30.0
#: Reconnect backoff of the feed: first delay and cap, in seconds.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0

#: Seconds a program has to quit after ``should_quit()`` turns true, before
#: SIGTERM goes to its process group; SIGKILL follows ``KILL_GRACE`` later.
GRACE_PERIOD = 10.0
KILL_GRACE = 3.0
#: Restart policy of a program whose document does not say: on-failure,
#: always or never.  Backoff between restarts doubles from MIN up to MAX and
#: starts again from MIN after a program ran for RESET seconds.
RESTART_POLICY = "on-failure"
RESTART_POLICIES = ("on-failure", "always", "never")
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
BACKOFF_RESET = 60.0
#: At most this many programs run on a node at once; more are ``rejected``
#: (the status says why) and start, first come first served, as others end.
MAX_PROGRAMS = 64

#: Lines per second of each program's output that the daemon's own log (its
#: file, or the journal) shows; beyond it the log says "N lines not shown".
#: Every line still goes to the program's log ring in the status database.
#: 0: no program output in the daemon's log at all.
PROGRAM_LOG_RATE = 20.0
#: The daemon's log file (background mode) is rotated at this many bytes,
#: keeping LOG_BACKUPS old files: at most (1 + LOG_BACKUPS) x LOG_MAX_BYTES.
LOG_MAX_BYTES = 1024 * 1024
LOG_BACKUPS = 3
#: The kernel's id of the current boot: a ``restart: never`` program that
#: ended runs again only after it changes (or its code does).
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"

#: Seconds a program's leadership (``leader(group)``) outlives its last
#: renewal: how long the other contenders wait for a leader that died.  The
#: leader renews every third of it; the others try every LEADER_RETRY
#: seconds (or a third of the ttl, if shorter).
LEADER_TTL = 15.0
LEADER_RETRY = 5.0

#: Longest ttl of any lease (``lease:*`` in the status database), seconds.
#: The status database refuses a node's lease with a longer ``ttl``, or
#: whose ``expires`` lies further ahead of the server's clock than its ttl
#: (this if it has none) plus LEASE_CLOCK_SLACK: no node can lock a lease
#: for longer than this without renewing it.  The scheduler's lease lasts 3
#: heartbeat intervals, so heartbeats longer than a third of this make its
#: lease expire between two renewals (himbeere.fleet.lease caps the ttl here).
LEASE_MAX_TTL = 3600.0
#: Seconds a node's estimate of the server's clock (its own clock corrected
#: by the offset measured from ``Date`` headers, good to about a second)
#: may run ahead of the server when it sets a lease's ``expires``.
LEASE_CLOCK_SLACK = 5.0

#: Largest code document (all its modules together) that becomes a program.
MAX_CODE_BYTES = 4 * 1024 * 1024

#: A command is killed after this many seconds unless its doc sets ``timeout``.
COMMAND_TIMEOUT = 300.0
#: Each of stdout and stderr of a command is cut after this many bytes.
COMMAND_OUTPUT_LIMIT = 1024 * 1024
#: A command still running after this long gets a ``running`` mark in its doc.
COMMAND_RUNNING_MARK = 1.0
#: At most this many commands run at once; more wait their turn.
MAX_COMMANDS = 16

#: Name of the design document the daemon and uploader install.
DESIGN = "himbeere"

#: UDP port on which nodes listen for pairing broadcasts (the original's).
DISCOVERY_PORT = 53000
#: Seconds the pairing window stays open after ``himbeere pair``.
PAIRING_WINDOW = 600.0
#: With a fleet key, a pairing request whose timestamp is further than this
#: many seconds from the node's clock is refused (a Pi has no battery clock:
#: it needs NTP, or fake-hwclock, to be this close).
PAIRING_MAX_SKEW = 300.0
#: BCM number of the GPIO pin whose LED blinks while a node waits to be paired.
LED_PIN = 16

#: Seconds between two automatic saves of a program's ``state`` (only when it
#: changed; also saved on ``state.save()``, when asked to quit and at exit):
#: at most this much of it is lost when the program or its node dies.
STATE_SAVE_INTERVAL = 10.0
#: Seconds of one sample of a node's health history (``history:<mac>``, 5 minutes).
HISTORY_INTERVAL = 300.0
#: Samples a history keeps: a day at 5 minutes (the ring's length in any case).
HISTORY_LENGTH = 288

#: Revisions CouchDB keeps of each document in the status database (its
#: ``_revs_limit``, 1000 by default), set by ``himbeere-upload setup``.  A
#: heartbeat rewrites ``status:<mac>`` every ``heartbeat_interval``, and each
#: write costs the server more the longer the document's revision path is:
#: 3.3 ms of CPU per write over the first 250 revisions, 10.7 ms past 1000;
#: with 100 kept, 4.2 ms throughout (CouchDB 3.5.2, benchmarks/bench_revs.py).
#: 100 revisions is 17 minutes of heartbeats.
STATUS_REVS_LIMIT = 100

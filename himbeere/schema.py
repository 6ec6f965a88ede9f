"""Document types, ids, states and timestamps: the conventions every part shares.

A leaf module: it imports nothing of the project, so the daemon, a program's
process and the laptop tools all import it at no cost.  Whatever names a
document, a state or a moment on the wire is defined here and nowhere else.

The databases, and the documents each holds (``<mac>`` is a node's MAC id as
a decimal integer)::

    code database                     status database (``<code>_status``)
    -------------                     -----------------------------------
    <any id>   type: <mac>  program   status:<mac>       heartbeat
    placed:<name>           placed    result:<cmd>:<mac> fleet command result
    global:<name>           module    log:<mac>:<prog>   program log
    <mac>_cmd               commands  state:<prog>:<key> program state
    cmd-<stamp>-<random>    fleet cmd lease:<name>       lease (scheduler, groups)
    program:<name>          targeted  placement:<name>   placement of a program
    release:<name>:<n>      release   history:<mac>      the last day of health
    daemon:<version>        daemon    node:<mac>         node info (labels)
    daemon:current          pointer   rollout:<name>:<n> a staged rollout
                                      site:<name>        a site's relay
"""

from __future__ import annotations

import datetime
import enum
import time
from typing import Any, Optional

# -- document types -----------------------------------------------------------

#: ``type`` of a fleet command (code database): one document for many nodes.
COMMAND_TYPE = "himbeere-command"
#: ``type`` of a node's result of a fleet command (status database).
RESULT_TYPE = "himbeere-result"
#: ``type`` of a placed program (code database): the scheduler picks its nodes.
PLACED_TYPE = "himbeere-placed"

# -- id prefixes and builders -------------------------------------------------

STATUS_PREFIX = "status:"
NODE_PREFIX = "node:"
RESULT_PREFIX = "result:"
LOG_PREFIX = "log:"
STATE_PREFIX = "state:"
LEASE_PREFIX = "lease:"
PLACEMENT_PREFIX = "placement:"
PLACED_PREFIX = "placed:"
GLOBAL_PREFIX = "global:"
COMMAND_PREFIX = "cmd-"
COMMANDS_SUFFIX = "_cmd"


def commands_id(node: int) -> str:
    """The node's own commands document, ``<mac>_cmd`` (the original format)."""
    return f"{node}{COMMANDS_SUFFIX}"


def status_id(node: int) -> str:
    return f"{STATUS_PREFIX}{node}"


def node_id(node: int) -> str:
    return f"{NODE_PREFIX}{node}"


def result_id(command_id: str, node: int) -> str:
    """Id of a node's result document of fleet command ``command_id``."""
    return f"{RESULT_PREFIX}{command_id}:{node}"


def lease_id(name: str) -> str:
    return f"{LEASE_PREFIX}{name}"


def placement_id(name: str) -> str:
    return f"{PLACEMENT_PREFIX}{name}"


def placed_id(name: str) -> str:
    return f"{PLACED_PREFIX}{name}"


def global_id(name: str) -> str:
    return f"{GLOBAL_PREFIX}{name}"


def mac_of(doc_id: str, prefix: str) -> Optional[int]:
    """The MAC id in ``<prefix><mac>`` (``status:12``, ``node:12``), or None."""
    if not doc_id.startswith(prefix):
        return None
    rest = doc_id[len(prefix):]
    return int(rest) if rest.isdigit() else None


def targets_node(doc: dict[str, Any], node: int) -> bool:
    """True if the fleet command ``doc`` is for ``node``: ``"all"``, or listed (int or str).

    The same rule is written in JavaScript (the filter) and as a Mango
    selector in :mod:`himbeere.design`; a test holds the three together.
    """
    targets = doc.get("targets")
    if targets == "all":
        return True
    return isinstance(targets, list) and any(names_node(target, node) for target in targets)


#: A group's lease is ``lease:group:<group>`` (:mod:`himbeere.leadership`).
GROUP_PREFIX = "group:"


def program_id(node: int, name: str) -> str:
    """Id the uploader gives program ``name`` of one node: ``<mac>:<name>``."""
    return f"{node}:{name}"


def results_prefix(command_id: str) -> str:
    """Start of the ids of every node's result of fleet command ``command_id``."""
    return f"{RESULT_PREFIX}{command_id}:"


def logs_prefix(node: int) -> str:
    """Start of the ids of every log document of ``node``."""
    return f"{LOG_PREFIX}{node}:"


def log_id(node: int, program: str) -> str:
    """The ring of the last lines of ``program`` (a program's doc id) on ``node``."""
    return f"{logs_prefix(node)}{program}"


def state_id(program: str) -> str:
    """The persistent state of program ``program`` (a doc id), shared by every node."""
    return f"{STATE_PREFIX}{program}"


def group_lease_name(group: str) -> str:
    """The name of ``group``'s lease; its document is ``lease_id(group_lease_name(group))``."""
    return f"{GROUP_PREFIX}{group}"


#: ``type`` of a node's health history (status database, :mod:`himbeere.history`).
HISTORY_TYPE = "himbeere-history"
HISTORY_PREFIX = "history:"


def history_id(node: int) -> str:
    """The ring of ``node``'s health samples of the last day, ``history:<mac>``."""
    return f"{HISTORY_PREFIX}{node}"


def names_node(value: Any, node: int) -> bool:
    """True when ``value`` (a ``type``, a fleet command's target) is ``node``'s MAC id.

    An int, a digit string or a whole float (CouchDB keeps ``1000.0`` as
    written); never a bool, and never a list, although JavaScript's
    ``String([1000])`` is ``"1000"`` too.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) == str(node)


def for_node(doc: dict[str, Any], node: int, code_only: bool = False) -> bool:
    """True if ``node`` follows ``doc``: the rule of the feed filter, in Python.

    :mod:`himbeere.design` writes the same rule in JavaScript (the design
    document's filter) and as a ``_selector``; ``tests/test_schema.py``
    holds the three together.  A node follows its programs, placed
    programs, programs for many nodes (whose ``targets`` the node checks
    against its own labels: the feed cannot know them), documents with
    ``global_modules`` and (unless ``code_only``) its commands.  A deletion
    is followed by every node: its body is gone, and a node that ran the
    program stops it.  The pointer to the daemon release to run
    (``daemon:current``) is followed by every node, as code.  Design documents are not
    followed (the feed drops them, whatever the server passes).
    """
    if str(doc.get("_id", "")).startswith("_design/"):
        return False
    if doc.get("_deleted"):
        return True
    kind = doc.get("type")
    if (names_node(kind, node) or kind in (PLACED_TYPE, PROGRAM_TYPE, DAEMON_CURRENT_TYPE)
            or "global_modules" in doc):
        return True
    if code_only:
        return False
    if kind == COMMAND_TYPE:
        return targets_node(doc, node)
    return kind == commands_id(node)


#: ``type`` of a site's registry document (status database of the CENTRAL
#: server): a relay near some nodes, see :mod:`uploader.sites`.
SITE_TYPE = "himbeere-site"
SITE_PREFIX = "site:"


def site_id(name: str) -> str:
    """The registry document of site ``name``: ``site:<name>``."""
    return f"{SITE_PREFIX}{name}"


# -- states -------------------------------------------------------------------

class ProgramState(str, enum.Enum):
    """Where a program is, as ``programs.<id>.state`` of a node's status shows it."""

    STARTING = "starting"        #: its document arrived; not yet started
    FETCHING = "fetching"        #: its git source is being fetched
    RUNNING = "running"          #: its process runs
    BACKING_OFF = "backing-off"  #: it crashed and waits before the next start
    STOPPING = "stopping"        #: it was asked to stop and has not ended yet
    STOPPED = "stopped"          #: disabled, or stopped by hand
    FINISHED = "finished"        #: it ended by itself with exit code 0
    CRASHED = "crashed"          #: it ended with an error and will not restart
    INVALID = "invalid"          #: its document cannot run (see ``last_error``)
    REJECTED = "rejected"        #: refused: over ``max_programs``, or not signed (``last_error``)

    def __str__(self) -> str:
        return self.value


class CommandState(str, enum.Enum):
    """Where a command is, as its result's ``state`` shows it."""

    RUNNING = "running"          #: started; the result is not in yet
    DONE = "done"                #: it ended; ``returncode`` says how
    ERROR = "error"              #: it could not start (see ``error``)
    TIMEOUT = "timeout"          #: it ran past its timeout and was killed
    INTERRUPTED = "interrupted"  #: killed, or its node died while it ran

    def __str__(self) -> str:
        return self.value


# -- timestamps ---------------------------------------------------------------

def iso(when: Optional[float] = None) -> str:
    """``when`` (seconds since the epoch; default now) as ISO 8601 UTC, ms and ``Z``.

    The one format of every timestamp the project writes into a document:
    ``2026-11-29T09:30:00.123Z``.  It sorts as text in time order.
    """
    when = time.time() if when is None else when
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float:
    """Seconds since the epoch of a timestamp in any of the formats ever written.

    Accepts ``...Z`` and ``...+00:00``, with or without fractions, so documents
    written by older versions still read.  Raises ValueError otherwise.
    """
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


# -- deployments: programs for many nodes, releases, rollouts -----------------

#: ``type`` of a program for many nodes (code database): ``targets`` says which
#: (``"all"``, a list of MAC ids, or ``{"labels": {...}}``).
PROGRAM_TYPE = "himbeere-program"
TARGETED_PREFIX = "program:"
#: ``type`` of a release record (code database): what one push of a program wrote.
RELEASE_TYPE = "himbeere-release"
RELEASE_PREFIX = "release:"
#: ``type`` of a staged rollout (status database), driven by the scheduler.
ROLLOUT_TYPE = "himbeere-rollout"
ROLLOUT_PREFIX = "rollout:"


def targeted_id(name: str) -> str:
    """Id of the one document of program ``name`` for many nodes: ``program:<name>``."""
    return f"{TARGETED_PREFIX}{name}"


def releases_prefix(name: str) -> str:
    """Start of the ids of every release of program ``name``."""
    return f"{RELEASE_PREFIX}{name}:"


def release_id(name: str, number: int) -> str:
    """``release:<name>:<n>``, ``n`` zero-padded so that ids sort in release order."""
    return f"{releases_prefix(name)}{number:06d}"


def rollout_id(name: str, number: int) -> str:
    """The rollout of release ``number`` of program ``name``: ``rollout:<name>:<n>``."""
    return f"{ROLLOUT_PREFIX}{name}:{number:06d}"


class RolloutState(str, enum.Enum):
    """Where a staged rollout is, as its ``state`` shows it."""

    RUNNING = "running"          #: waves go out as the nodes before stay healthy
    PAUSED = "paused"            #: no new wave starts until resumed
    DONE = "done"                #: every wave ran the release for ``healthy_for``
    ROLLED_BACK = "rolled-back"  #: a failure halted it; the reached nodes went back
    ABORTED = "aborted"          #: stopped by hand; the reached nodes went back

    def __str__(self) -> str:
        return self.value


def targets_labels(targets: Any, node: int, labels: Optional[dict[str, str]]) -> bool:
    """True if a program for many nodes with ``targets`` runs on ``node``, which has ``labels``.

    ``targets`` is ``"all"``, a list of MAC ids (see :func:`names_node`), or
    ``{"labels": {"room": "lab"}}``: every one of these labels, with this
    value.  ``labels`` None means the node does not know its labels yet: a
    label selector does not match then.  Anything else matches no node.
    """
    if targets == "all":
        return True
    if isinstance(targets, list):
        return any(names_node(target, node) for target in targets)
    wanted = targets.get("labels") if isinstance(targets, dict) and len(targets) == 1 else None
    if not isinstance(wanted, dict) or labels is None:
        return False
    return all(isinstance(value, str) and labels.get(key) == value
               for key, value in wanted.items())


def targets_text(targets: Any) -> str:
    """``targets`` as people read it: ``all``, ``room=lab``, ``1001, 1002``."""
    if targets == "all":
        return "all"
    if isinstance(targets, list):
        return ", ".join(str(target) for target in targets) or "no node"
    wanted = targets.get("labels") if isinstance(targets, dict) else None
    if isinstance(wanted, dict):
        return ", ".join(f"{key}={value}" for key, value in sorted(wanted.items())) or "all"
    return f"nothing ({targets!r} is not a target)"


# -- daemon upgrades -------------------------------------------------------------

#: ``type`` of a daemon release (code database, ``daemon:<version>``): the wheel
#: as the attachment :data:`DAEMON_WHEEL`, its ``version``, ``sha256`` and ``targets``.
DAEMON_RELEASE_TYPE = "himbeere-daemon-release"
#: ``type`` of the pointer :data:`DAEMON_CURRENT_ID`: which release nodes run
#: (``version``); the only daemon document the node's feed passes.
DAEMON_CURRENT_TYPE = "himbeere-daemon-current"
DAEMON_PREFIX = "daemon:"
DAEMON_CURRENT_ID = f"{DAEMON_PREFIX}current"
#: The name of a daemon release's attachment: the wheel itself.
DAEMON_WHEEL = "wheel"


def daemon_release_id(version: str) -> str:
    """The daemon release of ``version`` (as ``himbeere.__version__`` spells it)."""
    return f"{DAEMON_PREFIX}{version}"

"""Fleet operations: what the ``himbeere`` CLI and the dashboard do to a fleet.

Every function takes a :class:`~uploader.fleet.Fleet` (admin or deployer
credentials) and returns plain JSON-able dicts and lists, so the CLI prints
them and the dashboard serves them as they are.

Documents involved (see :mod:`himbeere.commands` for the node side):

* ``status:<mac>`` (status db): the heartbeat, read by :func:`list_nodes`.
* ``node:<mac>`` (status db): ``name`` and ``labels`` (``{"room": "lab"}``).
* ``log:<mac>:<program id>`` (status db): the ring of a program's last lines.
* ``lease:scheduler`` (status db): the scheduler's lease, holding the
  assignments of placed programs to nodes (:mod:`himbeere.fleet.placement`).
* A fleet command is ONE document in the code database::

    {"_id": "cmd-20240501-120000-123-ab12cd", "type": "himbeere-command",
     "targets": "all" or [202481596941066, ...], "cmd": ["uname", "-a"],
     "timeout": 30, "created": "2024-05-01T12:00:00.123Z",
     "created_time": 1714564800.123, "created_by": "alice",
     "expected": [202481596941066, ...]}

  Ids sort by creation time (the creator's clock), which is how
  :func:`list_commands` finds the latest without a view.  ``created_time``
  is on the server's clock (ours corrected by the offset seen in HTTP
  ``Date`` headers), because nodes compare it with their own first start on
  the server's clock.
  ``expected`` is what the creator resolved ``targets`` to (for ``"all"``,
  every node known then); nodes do not read it.
* Each node writes its result into the status database as
  ``result:<command id>:<mac>``, with the fields of a single-node command
  result (``ret``, ``returncode``, ``state``, ``started``, ``finished``,
  ``duration``, ``node``, ``error`` ...) plus ``type: "himbeere-result"``,
  ``command`` and ``cmd``.

Programs are stopped, started and restarted through fields of their code
document: ``enabled`` (false stops it) and ``restart_count`` (an integer;
each change restarts the program).  A placed program, and a program for
many nodes (``program:<name>``), has one document however many nodes run
it, so these act on every node that runs it.

A program's persistent ``state`` is the ``state:<program id>`` document of
the status database (see :mod:`himbeere.runtime.progstate`); :func:`program_state`
shows it and :func:`reset_state` deletes it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

from himbeere import codedoc, defaults, health, history, logship, schema
from himbeere.couch import Database, Doc
from himbeere.exceptions import ConfigError, Conflict, NotFound
from himbeere.fleet import placement, targeting
from himbeere.schema import ProgramState

from . import keys, push, sitestate
from .fleet import NODE_DOC_TYPE, Fleet, check_name, parse_labels

#: A command's result is final in one of these states (``running`` is not).
FINAL_STATES = ("done", "timeout", "error", "interrupted")
#: States of a program that count as crashed in the node summaries (and
#: on the dashboard, which gets them from here).
CRASHED_STATES = (ProgramState.CRASHED, ProgramState.BACKING_OFF, ProgramState.INVALID)
#: A label key: like a friendly name (checked by :func:`~uploader.fleet.parse_labels`).
LABEL_KEY = check_name

Targets = Union[str, list[int]]
NodeRef = Union[int, str]


# -- small helpers -----------------------------------------------------------------------
def server_now(fleet: Fleet) -> float:
    """Now on the server's clock, as far as the HTTP ``Date`` headers tell."""
    return fleet.couch.server_time()


def node_id(fleet: Fleet, node: NodeRef) -> int:
    """The MAC id of ``node``: an int already, or a MAC id, address or name."""
    if isinstance(node, int) and not isinstance(node, bool):
        return node
    return fleet.resolve_node(str(node))


def _prefixed(db: Database, prefix: str, **params: Any) -> list[Doc]:
    """Every document whose id starts with ``prefix`` (``include_docs``)."""
    rows = db.all_docs(startkey=prefix, endkey=prefix + "\ufff0", include_docs=True, **params)
    return [row["doc"] for row in rows if row.get("doc")]


# -- nodes -------------------------------------------------------------------------------
def _node_docs(fleet: Fleet) -> dict[int, Doc]:
    docs = {}
    for doc in _prefixed(fleet.status, schema.NODE_PREFIX):
        mac = schema.mac_of(doc["_id"], schema.NODE_PREFIX)
        if mac is not None:
            docs[mac] = doc
    return docs


def _macs(fleet: Fleet, prefix: str) -> set[int]:
    """The MAC ids of the ``<prefix><mac>`` documents: their ids only.

    A fleet command asks this at every poll of its results: with 2,000
    nodes their status documents are megabytes, their ids 60 KB (issue 14).
    """
    rows = fleet.status.all_docs(startkey=prefix, endkey=prefix + "\ufff0")
    macs = (schema.mac_of(str(row.get("id")), prefix) for row in rows)
    return {mac for mac in macs if mac is not None}


def _known_macs(fleet: Fleet) -> set[int]:
    """Every node with a heartbeat or a ``node:`` document."""
    return _macs(fleet, schema.STATUS_PREFIX) | _macs(fleet, schema.NODE_PREFIX)


def _status_docs(fleet: Fleet) -> dict[int, Doc]:
    docs = {}
    for doc in _prefixed(fleet.status, schema.STATUS_PREFIX):
        mac = schema.mac_of(doc["_id"], schema.STATUS_PREFIX)
        if mac is not None:
            docs[mac] = doc
    return docs


def summarize(node: int, status: Optional[Doc], node_doc: Optional[Doc],
              now: Optional[float] = None) -> Doc:
    """One node as :func:`list_nodes` shows it, from its two documents."""
    status = status or {}
    node_doc = node_doc or {}
    programs = status.get("programs") if isinstance(status.get("programs"), dict) else {}
    assert isinstance(programs, dict)
    states = [p.get("state") for p in programs.values() if isinstance(p, dict)]
    age = health.heartbeat_age(status, now) if status else None
    return {
        "node": node,
        "name": node_doc.get("name"),
        "labels": dict(node_doc.get("labels") or {}),
        "state": health.node_state(status, now),
        "heartbeat": status.get("heartbeat"),
        "heartbeat_age": None if age is None else round(age, 1),
        "heartbeat_interval": status.get("heartbeat_interval"),
        "ip": status.get("ip"),
        "hostname": status.get("hostname"),
        "server": status.get("server"),
        "daemon_version": status.get("daemon_version"),
        "upgrade": status.get("upgrade"),  # the launcher's last upgrade (himbeere.launch)
        "python": status.get("python"),
        "uptime": status.get("uptime"),
        "load": status.get("load"),
        "temperature": status.get("temperature"),
        "cpu_percent": status.get("cpu_percent"),
        "memory": {"used_mb": status.get("memory_used_mb"),
                   "total_mb": status.get("memory_total_mb")},
        "disk": {"free_mb": status.get("disk_free_mb")},
        "throttled": status.get("throttled"),
        "clock_offset": status.get("clock_offset"),
        "programs": programs,
        "running": states.count(ProgramState.RUNNING),
        "crashed": sum(1 for s in states if s in CRASHED_STATES),
    }


def list_nodes(fleet: Fleet) -> list[Doc]:
    """Every node that has a status document or a ``node:<mac>`` document.

    Each is a dict: ``node`` (MAC id), ``name``, ``labels``, ``state``
    (``alive``, ``suspect``, ``dead``, ``stopped``, or ``unknown`` for a
    node that never sent a heartbeat, see :func:`himbeere.health.node_state`;
    ``unreachable`` for a node of a site whose relay went silent, with
    ``state_text`` and ``site_offline_since``, see
    :func:`uploader.sitestate.mark_offline`),
    ``heartbeat_age`` (seconds, server clock), ``ip``, ``hostname``, ``server``
    (the CouchDB server the node uses now: one node of a cluster),
    ``load``, ``temperature``, ``cpu_percent``, ``memory`` (``used_mb``,
    ``total_mb``), ``disk`` (``free_mb``), ``daemon_version``, ``python``,
    ``uptime``, ``programs`` (program id -> the fields of the status
    document) and the counts ``running`` and ``crashed`` (crashed,
    backing-off or invalid).  Sorted by name, then MAC id.
    """
    fleet.require_databases()
    statuses = _status_docs(fleet)
    node_docs = _node_docs(fleet)
    now = server_now(fleet)
    nodes = [summarize(mac, statuses.get(mac), node_docs.get(mac), now)
             for mac in set(statuses) | set(node_docs)]
    sitestate.mark_offline(nodes, now)  # a silent site's nodes are unreachable, not dead
    nodes.sort(key=lambda n: (n["name"] is None, n["name"] or "", n["node"]))
    return nodes


def node_detail(fleet: Fleet, node: NodeRef, commands: int = 20) -> Doc:
    """One node: the :func:`list_nodes` fields, and more.

    ``status`` is the whole status document (``None`` if the node never
    sent one); ``programs`` gain the code document's ``enabled``,
    ``restart_count`` and ``in_database`` (false once the document is
    gone; placed programs and programs for many nodes included, whose
    document is shared by every node that runs them); their ``last_error``
    holds the traceback.  ``commands`` lists the
    results of the node's latest fleet commands (newest first), each
    ``{"command": id, "cmd", "created", "result": result doc or None,
    "joined_later"}`` (see :func:`node_commands`); ``None`` means it has not
    answered.
    """
    fleet.require_databases()
    mac = node_id(fleet, node)
    status = fleet.status.get(schema.status_id(mac))
    node_doc = fleet.status.get(schema.node_id(mac))
    if status is None and node_doc is None:
        raise _unknown_node(fleet, mac)
    now = server_now(fleet)
    detail = summarize(mac, status, node_doc, now)
    site = detail["labels"].get(sitestate.SITE_LABEL)
    if site and detail["state"] == "dead":  # unreachable if its whole site went silent
        statuses, node_docs = _status_docs(fleet), _node_docs(fleet)
        members = [summarize(m, statuses.get(m), doc, now) for m, doc in node_docs.items()
                   if (doc.get("labels") or {}).get(sitestate.SITE_LABEL) == site]
        sitestate.mark_offline(members, now)
        detail.update({k: v for m in members if m["node"] == mac for k, v in m.items()
                       if k in ("state", "state_text", "site_offline_since")})
    detail["status"] = status
    programs = {k: dict(v) for k, v in detail["programs"].items()}
    own = _code_docs(fleet, mac)
    others = set(programs) - {doc["_id"] for doc in own}
    for doc in own + _shared_docs(fleet, others):
        entry = programs.setdefault(doc["_id"], {"name": doc.get("name"), "state": None})
        entry["enabled"] = doc.get("enabled", True) is not False
        entry["restart_count"] = doc.get("restart_count", 0)
        entry["in_database"] = True
    for entry in programs.values():
        entry.setdefault("in_database", False)
    detail["programs"] = programs
    detail["commands"] = node_commands(fleet, mac, commands)
    return detail


def _code_docs(fleet: Fleet, mac: int) -> list[Doc]:
    rows = push._programs(fleet, startkey=[str(mac)], endkey=[str(mac), {}], include_docs=True)
    return [row["doc"] for row in rows if row.get("doc")]


def _shared_docs(fleet: Fleet, doc_ids: Iterable[str]) -> list[Doc]:
    """The placed programs and programs for many nodes among ``doc_ids`` (a node's
    programs, not its own documents).

    They have one document for all their nodes, so the node's page can stop
    and restart them too (on every node that runs them).
    """
    found = []
    for doc_id in sorted(doc_ids):
        if doc_id.startswith("_"):
            continue
        doc = fleet.code.get(doc_id)
        if doc is not None and (codedoc.is_placed(doc) or codedoc.is_targeted(doc)):
            found.append(doc)
    return found


def _unknown_node(fleet: Fleet, mac: int) -> NotFound:
    return NotFound(f"node {mac} is unknown: it never sent a heartbeat to {fleet.server} "
                    f"and has no name; `himbeere nodes` lists the known ones")


# -- labels ------------------------------------------------------------------------------
def set_labels(fleet: Fleet, node: NodeRef, **labels: str) -> dict[str, str]:
    """Set labels of ``node`` (``room="lab"``); an empty value removes one.

    Labels live in the ``node:<mac>`` document of the status database as
    ``labels: {key: value}``.  Returns the node's labels afterwards.
    """
    mac = node_id(fleet, node)
    wanted = parse_labels(labels)
    after: dict[str, str] = {}

    def change(doc: Doc) -> bool:
        current = dict(doc.get("labels") or {})
        for key, value in wanted.items():
            if value:
                current[key] = value
            else:
                current.pop(key, None)
        after.clear()
        after.update(current)
        if current == (doc.get("labels") or {}) and doc.get("type") == NODE_DOC_TYPE:
            return False
        doc.update(type=NODE_DOC_TYPE, node=mac, labels=current)
        return True

    fleet.status.update(schema.node_id(mac), change)
    return after


def nodes_with_labels(fleet: Fleet, labels: Union[Mapping[str, str], Iterable[str]],
                      ) -> list[int]:
    """MAC ids of the nodes that have every one of ``labels``."""
    wanted = parse_labels(labels)
    docs = _node_docs(fleet)
    found = sorted(mac for mac, doc in docs.items()
                   if all((doc.get("labels") or {}).get(k) == v for k, v in wanted.items()))
    if not found:
        known = sorted({f"{k}={v}" for doc in docs.values()
                        for k, v in (doc.get("labels") or {}).items()})
        shown = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise NotFound(f"no node has label {shown}; labels in use: "
                       f"{', '.join(known) if known else 'none yet'} "
                       "(`himbeere label NODE key=value` sets one)")
    return found


# -- commands ----------------------------------------------------------------------------
def resolve_targets(fleet: Fleet, all: bool = False, nodes: Iterable[NodeRef] = (),
                    labels: Union[Mapping[str, str], Iterable[str]] = ()) -> Targets:
    """``"all"``, or the sorted MAC ids of ``nodes`` plus the nodes with all ``labels``.

    Nodes are MAC ids, MAC addresses or names.  Exactly one of ``all`` and
    (``nodes`` and/or ``labels``) must be given.
    """
    nodes = list(nodes)
    labels = labels if isinstance(labels, Mapping) else list(labels)
    if all and (nodes or labels):
        raise ConfigError("--all runs everywhere: drop --node and --label")
    if all:
        return "all"
    if not nodes and not labels:
        raise ConfigError("say where to run it: --all, --node NODE or --label key=value")
    macs = {node_id(fleet, node) for node in nodes}
    if labels:
        macs.update(nodes_with_labels(fleet, labels))
    return sorted(macs)


def new_command_id(now: Optional[float] = None) -> str:
    """``cmd-YYYYMMDD-HHMMSS-mmm-<random>``: sorts by creation time."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{schema.COMMAND_PREFIX}{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


def create_command(fleet: Fleet, argv: list[str], targets: Targets,
                   timeout: Optional[float] = None,
                   signing_key: Optional[keys.SigningKey] = None) -> str:
    """Save ONE command document for ``targets``; returns its id.

    ``targets`` is ``"all"`` or a list of MAC ids (see
    :func:`resolve_targets`); ``timeout`` is seconds on each node (default:
    the node's ``command_timeout``).  With ``signing_key`` it is signed.
    """
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"command {argv!r} is not allowed; allowed: a non-empty list of "
                          "strings, e.g. ['uname', '-a']")
    if targets != "all" and (not isinstance(targets, list) or not targets):
        raise ConfigError(f"targets {targets!r} is not allowed; allowed: 'all' or a "
                          "non-empty list of MAC ids")
    if timeout is not None and not (timeout > 0):
        raise ConfigError(f"timeout {timeout!r} is not allowed; allowed: seconds > 0")
    fleet.require_databases()
    if targets == "all":
        expected = sorted(_known_macs(fleet))
    else:
        expected = sorted({int(t) for t in targets})
    now = server_now(fleet)
    doc: Doc = {
        # Our own clock for the id: the server-clock estimate moves as headers come in.
        "_id": new_command_id(),
        "type": schema.COMMAND_TYPE,
        "targets": "all" if targets == "all" else expected,
        "cmd": list(argv),
        "created": schema.iso(now),
        "created_time": round(now, 3),
        "created_by": fleet.user,
        "expected": expected,
    }
    if timeout is not None:
        doc["timeout"] = timeout
    if signing_key is not None:
        keys.sign(doc, signing_key)  # last: it covers id, targets, cmd and timeout
    fleet.code.save(doc)
    return str(doc["_id"])


def command_results(fleet: Fleet, command_id: str) -> Doc:
    """A command and its results so far.

    ``{"command": doc, "results": {mac: result doc}, "pending": [macs],
    "not_targeted": [macs], "done": bool}``: ``pending`` are the expected
    nodes without a final result (one still ``running`` is pending);
    ``results`` holds running ones too, and answers from nodes that were not
    expected.  ``not_targeted`` are the nodes known now that joined after an
    ``"all"`` command was made and did not answer: a node skips such an old
    command (see :mod:`himbeere.commands`), so they never will
    (:func:`joined_later`).
    """
    command = fleet.code.get(command_id)
    if command is None or command.get("type") != schema.COMMAND_TYPE:
        raise NotFound(f"no command {command_id!r} in database {fleet.code.name!r}; "
                       "`himbeere cmd --list` shows the latest")
    results: dict[int, Doc] = {}
    prefix = schema.results_prefix(command_id)
    for doc in _prefixed(fleet.status, prefix):
        mac = schema.mac_of(doc["_id"], prefix)
        if mac is not None:
            results[mac] = doc
    expected = _expected(fleet, command)
    pending = [mac for mac in expected
               if results.get(mac, {}).get("state") not in FINAL_STATES]
    not_targeted = []
    if command.get("targets") == "all" and isinstance(command.get("expected"), list):
        known = _known_macs(fleet)
        not_targeted = sorted(mac for mac in known
                              if joined_later(command, mac, results.get(mac)))
    return {"command": command, "results": results, "pending": pending,
            "not_targeted": not_targeted, "done": not pending}


def joined_later(command: Doc, node: int, result: Optional[Doc]) -> bool:
    """True if ``node`` joined the fleet after the ``"all"`` command was made.

    :func:`create_command` lists in ``expected`` every node known then; a node
    missing there that has not answered started later, and skips the command
    (:data:`himbeere.commands.JOIN_GRACE`).  One that started just in time
    answers, and its result shows instead.  A hand-made ``"all"`` command
    without ``expected`` cannot tell: it counts every node as expected.
    """
    expected = command.get("expected")
    return (command.get("targets") == "all" and isinstance(expected, list)
            and result is None and node not in {int(m) for m in expected if str(m).isdigit()})


def _expected(fleet: Fleet, command: Doc) -> list[int]:
    expected = command.get("expected")
    if isinstance(expected, list):
        return [int(m) for m in expected if str(m).isdigit()]
    targets = command.get("targets")
    if isinstance(targets, list):
        return sorted({int(m) for m in targets if str(m).isdigit()})
    return sorted(_macs(fleet, schema.STATUS_PREFIX))  # "all", by hand: every node with a heartbeat


def failed(result: Optional[Doc]) -> bool:
    """True unless ``result`` is a command that ran and exited 0."""
    return not result or result.get("state") != "done" or result.get("returncode") != 0


def list_commands(fleet: Fleet, limit: int = 20) -> list[Doc]:
    """The latest fleet commands, newest first, each with a summary.

    Each: ``id``, ``cmd``, ``targets``, ``created``, ``created_by``,
    ``timeout``, ``expected`` (count), ``answered`` (final results),
    ``failed`` (final results that did not exit 0).  Only commands with a
    ``cmd-...`` id (the ones :func:`create_command` makes) are listed.
    """
    fleet.require_databases()
    prefix = schema.COMMAND_PREFIX
    rows = fleet.code.all_docs(startkey=prefix + "\ufff0", endkey=prefix, descending=True,
                               include_docs=True, limit=limit)
    listing = []
    for row in rows:
        doc = row.get("doc") or {}
        if doc.get("type") != schema.COMMAND_TYPE:
            continue
        results = [d for d in _prefixed(fleet.status, schema.results_prefix(doc["_id"]))
                   if d.get("state") in FINAL_STATES]
        listing.append({
            "id": doc["_id"], "cmd": doc.get("cmd"), "targets": doc.get("targets"),
            "created": doc.get("created"), "created_by": doc.get("created_by"),
            "timeout": doc.get("timeout"), "expected": len(_expected(fleet, doc)),
            "answered": len(results), "failed": sum(1 for r in results if failed(r)),
        })
    return listing


def node_commands(fleet: Fleet, node: int, limit: int = 20) -> list[Doc]:
    """The node's part of the latest ``limit`` fleet commands that target it.

    Each: ``{"command": id, "cmd", "created", "result": result doc or None,
    "joined_later": bool}``; ``joined_later`` marks an ``"all"`` command made
    before the node joined, which it never runs (:func:`joined_later`).
    """
    prefix = schema.COMMAND_PREFIX
    rows = fleet.code.all_docs(startkey=prefix + "\ufff0", endkey=prefix, descending=True,
                               include_docs=True, limit=limit)
    docs = [row["doc"] for row in rows if row.get("doc")]
    commands = [doc for doc in docs
                if doc.get("type") == schema.COMMAND_TYPE and schema.targets_node(doc, node)]
    if not commands:
        return []
    keys = [schema.result_id(doc["_id"], node) for doc in commands]
    found = {row["key"]: row.get("doc") for row in fleet.status.all_docs(
        keys=keys, include_docs=True)}
    entries = []
    for doc in commands:
        result = found.get(schema.result_id(doc["_id"], node))
        entries.append({"command": doc["_id"], "cmd": doc.get("cmd"),
                        "created": doc.get("created"), "result": result,
                        "joined_later": joined_later(doc, node, result)})
    return entries


def wait_for_results(fleet: Fleet, command_id: str, wait: float, interval: float = 0.25,
                     ) -> Iterator[Doc]:
    """Yield :func:`command_results` until it is done or ``wait`` seconds passed.

    Yields at least once, and again whenever the number of answers changed;
    the last one yielded is the final state.
    """
    deadline = time.monotonic() + wait
    last: Optional[tuple[int, int]] = None
    while True:
        answer = command_results(fleet, command_id)
        seen = (len(answer["results"]), len(answer["pending"]))
        over = answer["done"] or time.monotonic() >= deadline
        if seen != last or over:
            last = seen
            yield answer
        if over:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# -- programs ----------------------------------------------------------------------------
def program_doc(fleet: Fleet, node: Optional[NodeRef], program: str, placed: bool = False,
                targeted: bool = False) -> Doc:
    """The code document of ``program`` (name or document id) on ``node``.

    ``node`` None: the placed program or the program for many nodes
    ``program`` (see :func:`shared_doc`; ``placed``/``targeted`` say which).
    """
    if node is None:
        return shared_doc(fleet, program, placed, targeted)
    mac = node_id(fleet, node)
    fleet.require_database(fleet.code)
    doc = fleet.code.get(program) if not program.startswith("_") else None
    if doc is not None and str(doc.get("type")) == str(mac):
        return doc
    doc = push.find(fleet, mac, program)
    if doc is not None and str(doc.get("type")) == str(mac):
        return doc
    names = sorted(str(d.get("name") or d["_id"]) for d in _code_docs(fleet, mac))
    hint = ""
    shared = _find_placed(fleet, program) or _find_targeted(fleet, program)
    if shared is not None:
        kind = "a placed program" if codedoc.is_placed(shared) else "a program for many nodes"
        where = "wherever it is placed" if codedoc.is_placed(shared) else "on every node it targets"
        hint = (f"; {program!r} is {kind} ({shared['_id']}): without --node, "
                f"stop, start and restart act {where}")
    raise NotFound(f"node {mac} has no program {program!r}; its programs: "
                   f"{', '.join(names) if names else 'none'}{hint}")


def is_placed(fleet: Fleet, program: str) -> bool:
    """True when ``program`` (name or document id) is a placed program."""
    return _find_placed(fleet, program) is not None


def is_shared(fleet: Fleet, program: str) -> bool:
    """True when ``program`` (name or id) has one document for many nodes: placed or targeted."""
    return is_placed(fleet, program) or _find_targeted(fleet, program) is not None


def _find_placed(fleet: Fleet, program: str) -> Optional[Doc]:
    doc = fleet.code.get(program) if not program.startswith("_") else None
    if doc is not None and codedoc.is_placed(doc):
        return doc
    return push.find(fleet, None, program, placed=True)


def _find_targeted(fleet: Fleet, program: str) -> Optional[Doc]:
    doc = fleet.code.get(program) if not program.startswith("_") else None
    if doc is not None and codedoc.is_targeted(doc):
        return doc
    return push.find(fleet, None, program, targeted=True)


def placed_doc(fleet: Fleet, program: str) -> Doc:
    """The code document of the placed program ``program`` (name or document id)."""
    return shared_doc(fleet, program, placed=True)


def shared_doc(fleet: Fleet, program: str, placed: bool = False, targeted: bool = False) -> Doc:
    """The one document of ``program`` (name or id) for many nodes: placed or targeted.

    ``placed`` (``targeted``) looks only among the placed programs (the
    programs for many nodes); neither: both, and a name that is both asks which.
    """
    fleet.require_database(fleet.code)
    found_placed = None if targeted else _find_placed(fleet, program)
    found_targeted = None if placed else _find_targeted(fleet, program)
    if found_placed is not None and found_targeted is not None:
        raise ConfigError(f"{program!r} is both a placed program ({found_placed['_id']}) and a "
                          f"program for many nodes ({found_targeted['_id']}): add --placed "
                          "or --targeted")
    doc = found_placed or found_targeted
    if doc is not None:
        return doc
    rows = push._programs(fleet)

    def names(kind: str) -> str:
        found = sorted({str(row["key"][1]) for row in rows if row["key"][0] == kind})
        return ", ".join(found) if found else "none"

    nodes = sorted({str(row["key"][0]) for row in rows if row["key"][1] == program
                    and str(row["key"][0]).isdigit()})
    hint = (f"; node {', '.join(nodes)} has a program {program!r}: add --node NODE" if nodes
            else "; a program of one node needs --node NODE")
    if placed:
        what, known = "placed program", f"placed programs: {names(placement.PLACED_TYPE)}"
    elif targeted:
        what, known = ("program for many nodes",
                       f"programs for many nodes: {names(schema.PROGRAM_TYPE)}")
    else:
        what = "placed program or program for many nodes"
        known = (f"placed programs: {names(placement.PLACED_TYPE)}; programs for many "
                 f"nodes: {names(schema.PROGRAM_TYPE)}")
    raise NotFound(f"no {what} {program!r}; {known}{hint}")


def _assigned(fleet: Fleet, doc_id: str) -> list[int]:
    """The nodes the scheduler placed ``doc_id`` on, from ``lease:scheduler``."""
    lease = fleet.status.get(schema.lease_id(placement.LEASE_NAME)) or {}
    assignments = lease.get("assignments")
    entry = assignments.get(doc_id) if isinstance(assignments, dict) else None
    macs = entry.get("nodes") if isinstance(entry, dict) else None
    return [int(m) for m in macs or [] if str(m).isdigit()]


def targeted_nodes(fleet: Fleet, targets: Any) -> list[int]:
    """The known nodes a program for many nodes with ``targets`` runs on now.

    Known: a heartbeat or a ``node:<mac>`` document; a MAC id listed in
    ``targets`` counts even before it is known.  Labels are the node
    documents' (what the nodes read, :mod:`himbeere.fleet.targeting`).
    """
    node_docs = _node_docs(fleet)
    known = _macs(fleet, schema.STATUS_PREFIX) | set(node_docs)
    if isinstance(targets, list):
        known |= {int(t) for t in targets if str(t).isdigit()}
    return sorted(mac for mac in known if schema.targets_labels(
        targets, mac, targeting.labels_of(node_docs.get(mac))))


def _target(fleet: Fleet, node: Optional[NodeRef], doc: Doc) -> Doc:
    """Where an action on ``doc`` reaches, for a result: ``node``, or ``placed`` /
    ``targeted`` (with ``targets``) and the ``nodes`` it runs on now."""
    if node is not None:
        return {"node": node_id(fleet, node), "placed": False, "targeted": False}
    if codedoc.is_targeted(doc):
        return {"node": None, "placed": False, "targeted": True, "targets": doc.get("targets"),
                "nodes": targeted_nodes(fleet, doc.get("targets"))}
    return {"node": None, "placed": True, "targeted": False,
            "nodes": _assigned(fleet, doc["_id"])}


def set_enabled(fleet: Fleet, node: Optional[NodeRef], program: str, enabled: bool,
                placed: bool = False, targeted: bool = False) -> Doc:
    """Stop (``enabled=False``) or start a program through its ``enabled`` field.

    ``node`` None: a placed program, wherever it is placed, or a program for
    many nodes, on every node it targets (``placed``/``targeted``: only
    that kind).  Returns ``{"id", "node", "name", "enabled", "changed",
    "placed", "targeted"}``, and without ``node``, ``nodes``: where the
    scheduler placed it, or the nodes it targets now (and its ``targets``).
    """
    doc = program_doc(fleet, node, program, placed, targeted)
    changed = {"value": False}

    def change(current: Doc) -> bool:
        if "_rev" not in current:
            raise NotFound(f"program {doc['_id']} was deleted meanwhile")
        if (current.get("enabled", True) is not False) == enabled:
            return False
        current["enabled"] = enabled
        changed["value"] = True
        return True

    fleet.code.update(doc["_id"], change)
    return dict(_target(fleet, node, doc), id=doc["_id"], name=doc.get("name"),
                enabled=enabled, changed=changed["value"])


def restart_program(fleet: Fleet, node: Optional[NodeRef], program: str, placed: bool = False,
                    targeted: bool = False) -> Doc:
    """Restart a program: increment the integer ``restart_count`` of its code document.

    The node restarts the program when the field changes (every node that
    runs it, for a placed program or a program for many nodes: ``node``
    None).  Returns ``{"id", "node", "name", "restart_count", "placed",
    "targeted"}``, and ``nodes`` without ``node`` (see :func:`set_enabled`).
    """
    doc = program_doc(fleet, node, program, placed, targeted)
    count = {"value": 0}

    def change(current: Doc) -> None:
        if "_rev" not in current:
            raise NotFound(f"program {doc['_id']} was deleted meanwhile")
        old = current.get("restart_count")
        count["value"] = (old if isinstance(old, int) and not isinstance(old, bool) else 0) + 1
        current["restart_count"] = count["value"]

    fleet.code.update(doc["_id"], change)
    return dict(_target(fleet, node, doc), id=doc["_id"], name=doc.get("name"),
                restart_count=count["value"])


# -- placements --------------------------------------------------------------------------
def placements(fleet: Fleet) -> Doc:
    """Placed programs (``type: "himbeere-placed"``): where they run, and why.

    Returns ``{"scheduler": ..., "placements": [...]}``.  ``scheduler`` is
    the holder of ``lease:scheduler`` (see :mod:`himbeere.fleet.placement`):
    ``{"node", "name", "node_state", "epoch", "expires_in", "scheduled_ago"}``,
    or None when no node holds the lease.  Each placement: ``id``, ``name``,
    ``replicas``, ``labels``, ``requires``, ``enabled``, ``assigned`` (false
    before the scheduler saw it), ``problem`` (why fewer nodes than
    ``replicas`` run it, or None), ``draining`` (nodes still stopping it)
    and ``nodes``: one ``{"node", "name", "node_state", "state", "pid",
    "why", "since"}`` per assigned node, ``state`` being the program's state
    in that node's status (None before the node reported it).
    """
    fleet.require_databases()
    try:
        rows = fleet.code.view(defaults.DESIGN, "placed")
    except NotFound:
        raise NotFound(f"database {fleet.code.name!r} has no placed view: run "
                       f"`himbeere-upload setup {fleet.server}`") from None
    lease = fleet.status.get(schema.lease_id(placement.LEASE_NAME)) or {}
    assignments = lease.get("assignments") if isinstance(lease.get("assignments"), dict) else {}
    assert isinstance(assignments, dict)
    statuses = _status_docs(fleet)
    names = {mac: doc.get("name") for mac, doc in _node_docs(fleet).items()}
    now = server_now(fleet)
    holder = str(lease.get("holder") or "")
    scheduler = None
    expires = lease.get("expires")
    if holder.isdigit() and isinstance(expires, (int, float)) and expires > now:
        mac = int(holder)
        scheduled = lease.get("scheduled")
        scheduler = {"node": mac, "name": names.get(mac),
                     "node_state": health.node_state(statuses.get(mac), now),
                     "epoch": lease.get("epoch"), "expires_in": round(expires - now, 1),
                     "scheduled_ago": round(now - scheduled, 1)
                     if isinstance(scheduled, (int, float)) else None}
    listing = []
    for row in rows:
        doc_id, value = row["id"], row.get("value") or {}
        entry = assignments.get(doc_id)
        entry = entry if isinstance(entry, dict) else {}
        why = entry.get("why") if isinstance(entry.get("why"), dict) else {}
        since = entry.get("since") if isinstance(entry.get("since"), dict) else {}
        assert isinstance(why, dict) and isinstance(since, dict)
        nodes = []
        for mac in [int(m) for m in entry.get("nodes") or [] if str(m).isdigit()]:
            status = statuses.get(mac)
            program = ((status or {}).get("programs") or {}).get(doc_id) or {}
            nodes.append({"node": mac, "name": names.get(mac),
                          "node_state": health.node_state(status, now),
                          "state": program.get("state"), "pid": program.get("pid"),
                          "why": why.get(str(mac)), "since": since.get(str(mac))})
        listing.append({"id": doc_id, "name": row["key"], "replicas": value.get("replicas"),
                        "labels": value.get("labels") or {},
                        "requires": value.get("requires") or {},
                        "enabled": value.get("enabled", True), "assigned": bool(entry),
                        "problem": entry.get("problem"),
                        "draining": list(entry.get("draining") or []), "nodes": nodes})
    listing.sort(key=lambda p: (str(p["name"]), p["id"]))
    return {"scheduler": scheduler, "placements": listing}

# -- logs --------------------------------------------------------------------------------
def logs(fleet: Fleet, node: NodeRef, program: Optional[str] = None) -> list[Doc]:
    """The log ring documents ``log:<mac>:<program id>`` of ``node``.

    ``program`` (a name or a program id) keeps only that program's.  Each
    document has ``program`` (id), ``name``, ``lines`` (``[[epoch, text],
    ...]``, oldest first), ``dropped`` and ``updated``.
    """
    fleet.require_database(fleet.status)
    mac = node_id(fleet, node)
    docs = _prefixed(fleet.status, schema.logs_prefix(mac))
    if program is not None:
        docs = [d for d in docs if program in (d.get("program"), d.get("name"))
                or d["_id"] == schema.log_id(mac, program)]
    return docs


#: How the lines the daemon wrote into a program's log (``[time, text,
#: kind]``, see himbeere.logship) start, to tell them from the program's own.
LINE_MARKS = {logship.EVENT: "-- ", logship.ERROR: "!! "}


def log_lines(docs: Iterable[Doc], after: Optional[float] = None) -> list[tuple[float, str, str]]:
    """Lines of several log documents merged by time: ``(epoch, program name, text)``.

    The daemon's lines are marked (:data:`LINE_MARKS`): ``-- started (pid
    4242)``, ``!! Traceback ...``.  ``after`` keeps only lines stamped later
    than it (for following).
    """
    lines = []
    for doc in docs:
        name = str(doc.get("name") or doc.get("program") or doc["_id"])
        for entry in doc.get("lines") or []:
            try:
                stamp, text = float(entry[0]), str(entry[1])
            except (TypeError, ValueError, IndexError):
                continue
            if len(entry) > 2 and entry[2] in LINE_MARKS:
                text = LINE_MARKS[entry[2]] + text
            if after is None or stamp > after:
                lines.append((stamp, name, text))
    lines.sort(key=lambda line: line[0])
    return lines


# -- program state -----------------------------------------------------------------------
#: Program states in which a node may still write the program's state back.
ACTIVE_STATES = (ProgramState.RUNNING, ProgramState.STOPPING, ProgramState.BACKING_OFF,
                 ProgramState.FETCHING, ProgramState.STARTING)


def state_program(fleet: Fleet, program: str, node: Optional[NodeRef] = None) -> Doc:
    """Which program ``program`` (a name or a document id) names, for its state.

    With ``node``, the program of that name (or id) on that node.  Without,
    a code document of that id, else the one program of that name on any
    node (several: an error that lists them), else a program whose code is
    gone but whose state is left.  Returns ``{"id", "name"}``.
    """
    fleet.require_databases()
    if node is not None:
        found = program_doc(fleet, node, program)
        return {"id": found["_id"], "name": found.get("name") or found["_id"]}
    doc = fleet.code.get(program) if not program.startswith("_") else None
    if doc is not None and not _is_command(doc):
        return {"id": doc["_id"], "name": doc.get("name") or doc["_id"]}
    rows = [row for row in push._programs(fleet)
            if row["key"][0] is not None and row["key"][1] == program]
    if len(rows) == 1:
        return {"id": rows[0]["id"], "name": program}
    if rows:
        where = ", ".join(f"{row['id']} on node {row['key'][0]}" for row in rows)
        raise ConfigError(f"several nodes have a program {program!r} ({where}); say which "
                          "with --node NODE or give the program's id")
    if fleet.status.get(schema.state_id(program)) is not None:
        return {"id": program, "name": program}
    kept = sorted(str(doc.get("program") or doc["_id"][len(schema.STATE_PREFIX):])
                  for doc in _prefixed(fleet.status, schema.STATE_PREFIX))
    raise NotFound(f"no program {program!r} in database {fleet.code.name!r}; programs with "
                   f"state: {', '.join(kept) if kept else 'none'}")


def _is_command(doc: Doc) -> bool:
    kind = str(doc.get("type"))
    return kind == schema.COMMAND_TYPE or kind.endswith(schema.COMMANDS_SUFFIX)


def program_state(fleet: Fleet, program: str, node: Optional[NodeRef] = None) -> Doc:
    """The persistent ``state`` of a program (see :func:`state_program` for ``program``).

    Returns ``{"id": program id, "name", "state_id", "exists", "values"
    (the dict; {} when there is none), "saved" (ISO time of the last save,
    server clock), "saved_ago" (seconds since, by the server's clock),
    "node" (the node that saved last), "running_on" (nodes where it is
    running, stopping or about to restart), "save_interval" (seconds
    between a running program's automatic saves)}``.
    """
    found = state_program(fleet, program, node)
    doc = fleet.status.get(schema.state_id(found["id"]))
    values = (doc or {}).get("values")
    saved = (doc or {}).get("saved")
    when = float(saved) if isinstance(saved, (int, float)) else None
    return dict(found, state_id=schema.state_id(found["id"]), exists=doc is not None,
                values=values if isinstance(values, dict) else {},
                saved=schema.iso(when) if when is not None else None,
                saved_ago=max(0.0, server_now(fleet) - when) if when is not None else None,
                node=(doc or {}).get("node"), running_on=_running_on(fleet, found["id"]),
                save_interval=defaults.STATE_SAVE_INTERVAL)


def reset_state(fleet: Fleet, program: str, node: Optional[NodeRef] = None) -> Doc:
    """Delete a program's ``state`` document; it starts from ``{}`` next time.

    Returns the :func:`program_state` fields from before, plus ``cleared``
    (False when there was nothing to clear).  A program that runs meanwhile
    (``running_on``) keeps the old values in memory and writes back the keys
    it changes: stop it first for a clean start.
    """
    before = program_state(fleet, program, node)
    cleared = False
    for _ in range(20):
        doc = fleet.status.get(before["state_id"])
        if doc is None:
            break
        try:
            fleet.status.delete(doc)
        except Conflict:
            continue  # saved meanwhile: delete that
        cleared = True
        break
    else:
        raise Conflict(f"{before['state_id']}: still conflicting after 20 tries")
    return dict(before, cleared=cleared)


def _running_on(fleet: Fleet, program: str) -> list[int]:
    now = server_now(fleet)
    return sorted(mac for mac, status in _status_docs(fleet).items()
                  if isinstance(status.get("programs"), dict)
                  and (status["programs"].get(program) or {}).get("state") in ACTIVE_STATES
                  and health.node_state(status, now) in ("alive", "suspect"))


# -- health history ----------------------------------------------------------------------
def node_history(fleet: Fleet, node: NodeRef) -> Doc:
    """The last day of ``node``'s health as chart columns, up to now on the server's clock.

    ``{"node", "interval", "time": [...], "cpu_percent": [...], "memory_used_mb",
    "temperature", "load", "disk_free_mb", "restarts": [[time, program id, count], ...]}``
    (see :func:`himbeere.history.series`); a bucket the node missed is null.
    The columns are empty for a node that has not written a history yet.
    """
    fleet.require_database(fleet.status)
    mac = node_id(fleet, node)
    chart = history.series(fleet.status.get(schema.history_id(mac)), until=server_now(fleet))
    return dict(chart, node=mac)


def fleet_history(fleet: Fleet, figure: str = "cpu_percent",
                  nodes: Optional[Iterable[NodeRef]] = None) -> dict[int, Doc]:
    """One figure of every node's last day (or of ``nodes``'): MAC id -> ``{"time", "values"}``.

    What the fleet page's sparklines draw; nodes without a history are left out.
    """
    if figure not in history.FIGURES:
        raise ConfigError(f"figure {figure!r} is not allowed; allowed: "
                          + ", ".join(history.FIGURES))
    fleet.require_database(fleet.status)
    if nodes is None:
        docs = _prefixed(fleet.status, schema.HISTORY_PREFIX)
    else:
        ids = [schema.history_id(node_id(fleet, node)) for node in nodes]
        rows = fleet.status.all_docs(keys=ids, include_docs=True) if ids else []
        docs = [row["doc"] for row in rows if row.get("doc")]
    now = server_now(fleet)
    charts = {}
    for doc in docs:
        mac = schema.mac_of(doc["_id"], schema.HISTORY_PREFIX)
        if mac is not None:
            chart = history.series(doc, until=now)
            charts[mac] = {"time": chart["time"], "values": chart[figure]}
    return charts

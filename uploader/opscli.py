"""Fleet operations on the ``himbeere`` command, for the laptop.

``nodes``, ``status``, ``logs``, ``cmd``, ``stop``, ``start``, ``restart``
(of a node's program, of a placed program wherever it runs, or of a
program for many nodes on every node it targets),
``label``, ``state`` and ``placements``; :func:`register` adds them to
``himbeere``'s subcommands (uploader/main.py).  The work is done by :mod:`uploader.ops`, which
the dashboard uses too.

The server comes from ``--server URL`` or ``HIMBEERE_SERVER``, the
databases from ``--database`` (``HIMBEERE_DATABASE``, default
``raspberries``) and ``--status-database`` (``HIMBEERE_STATUS_DATABASE``),
as for ``himbeere-upload``; credentials (an admin or a user with role
``himbeere-deployer``) go in the URL.  Errors print as one line;
``--json`` prints one JSON object, errors included.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import time
from collections import Counter
from typing import IO, Any, Callable, Optional

from himbeere.component import Backoff
from himbeere.exceptions import ConfigError, HimbeereError, Unauthorized, Unreachable
from himbeere.schema import targets_text

from . import keys, ops, rolloutscli
from .cli import common_flags, settings, table
from .fleet import Fleet

#: Seconds ``himbeere cmd`` waits for answers beyond the command's timeout.
WAIT_MARGIN = 10.0
#: Seconds it waits without ``--timeout`` (the nodes' own default is 300 s).
DEFAULT_WAIT = 30.0
#: Lines of stdout, and of stderr, ``himbeere cmd`` shows per node (``--max-lines``).
MAX_LINES = 200
#: Seconds between two looks at new log lines with ``logs -f``.
FOLLOW_INTERVAL = 1.0
#: Seconds ``logs -f`` takes a refusal of its credentials for a server still
#: coming back: Apache CouchDB answers 401 for a moment after it starts,
#: before it has read its admins.  A refusal that lasts is reported.
REFUSAL_GRACE = 30.0

Handler = Callable[[argparse.Namespace, Fleet], int]


def open_fleet(args: argparse.Namespace) -> Fleet:
    config = settings(args, os.environ)
    fleet = Fleet(config.server or "", config.database, config.status_db)
    fleet.require_databases()  # one clear line for unreachable, credentials, no setup
    return fleet


def emit(args: argparse.Namespace, payload: Any) -> None:
    """Print ``payload`` as one JSON object (``--json``)."""
    if isinstance(payload, dict):
        payload = dict(payload)
        payload.setdefault("ok", True)
    print(json.dumps(payload, sort_keys=True, default=str))


# -- formatting --------------------------------------------------------------------------
def node_label(node: int, name: Optional[str]) -> str:
    return f"{name} ({node})" if name else str(node)


def _num(value: Any, fmt: str = "{:g}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _programs_summary(node: dict[str, Any]) -> str:
    parts = [f"{node['running']} running"]
    if node["crashed"]:
        parts.append(f"{node['crashed']} crashed")
    others = len(node["programs"]) - node["running"] - node["crashed"]
    if others:
        parts.append(f"{others} other")
    return ", ".join(parts)


def _first_line(result: Optional[dict[str, Any]]) -> str:
    if not result:
        return ""
    ret = result.get("ret") or ["", ""]
    for text in (ret[0] if ret else "", ret[1] if len(ret) > 1 else "", result.get("error")):
        if text and str(text).strip():
            line = str(text).strip().splitlines()[0]
            return line if len(line) <= 60 else line[:57] + "..."
    return ""


# -- nodes and status --------------------------------------------------------------------
def cmd_nodes(args: argparse.Namespace, fleet: Fleet) -> int:
    """A table of every node: name, MAC id, IP, state, heartbeat age, load, temperature,
    programs running or crashed, the CouchDB server it uses now and its daemon version."""
    nodes = ops.list_nodes(fleet)
    if args.json:
        emit(args, {"nodes": nodes})
        return 0
    if not nodes:
        print(f"no nodes yet: none has sent a heartbeat to {fleet.server}")
        return 0
    rows = [[n["name"] or "-", str(n["node"]), n["ip"] or "-",
             n.get("state_text") or n["state"],
             _age(n["heartbeat_age"]),
             _num(n["load"][0] if n["load"] else None, "{:.2f}"),
             _num(n["temperature"], "{:.1f}°C"), _programs_summary(n),
             n["server"] or "-", n["daemon_version"] or "-"] for n in nodes]
    print("\n".join(table(["NAME", "MAC ID", "IP", "STATE", "AGE", "LOAD", "TEMP",
                           "PROGRAMS", "SERVER", "VERSION"], rows)))
    return 0


def cmd_status(args: argparse.Namespace, fleet: Fleet) -> int:
    """One node in detail: health, each program's state, restarts and last error
    with its traceback, and its latest fleet commands."""
    detail = ops.node_detail(fleet, args.node)
    if args.json:
        emit(args, detail)
        return 0
    print("\n".join(format_detail(detail)))
    return 0


def _kind(program: dict[str, Any]) -> str:
    """`` (placed)``, `` (targets room=lab)`` for a program for many nodes, else ""."""
    if program.get("placed"):
        return " (placed)"
    if program.get("targets") is not None:
        return f" (targets {targets_text(program['targets'])})"
    return ""


def format_detail(d: dict[str, Any]) -> list[str]:
    memory, disk = d["memory"], d["disk"]
    state = d.get("state_text") or d["state"]
    lines = [
        f"node {node_label(d['node'], d['name'])}: {state}, last heartbeat "
        f"{_age(d['heartbeat_age'])} ago" if d["heartbeat_age"] is not None
        else f"node {node_label(d['node'], d['name'])}: {state}, no heartbeat yet",
        f"  ip {d['ip'] or '-'}  host {d['hostname'] or '-'}  server {d['server'] or '-'}  daemon "
        f"{d['daemon_version'] or '-'}  python {d['python'] or '-'}  uptime "
        f"{_age(d['uptime'])}",
        f"  load {' '.join(str(x) for x in d['load']) if d['load'] else '-'}  cpu "
        f"{_num(d['cpu_percent'], '{:g}%')}  temperature {_num(d['temperature'], '{:g}°C')}  "
        f"memory {_num(memory['used_mb'], '{:.0f}')}/{_num(memory['total_mb'], '{:.0f}')} MB  "
        f"disk free {_num(disk['free_mb'], '{:.0f}')} MB",
    ]
    throttled = d.get("throttled") or {}
    if throttled.get("flags"):
        lines.append(f"  throttled: {', '.join(throttled['flags'])}")
    if d["labels"]:
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())))
    programs = d["programs"]
    if not programs:
        lines.append("programs: none")
    else:
        lines.append("programs:")
        rows = []
        for doc_id, p in sorted(programs.items()):
            enabled = p.get("enabled", True)
            rows.append([str(p.get("name") or doc_id) + _kind(p),
                         doc_id,
                         str(p.get("state") or ("not running" if enabled else "-")),
                         str(p.get("restarts", 0) or 0), "yes" if enabled else "no",
                         str(p.get("rev") or "-")[:12], str(p.get("release") or "-")])
        lines += ["  " + line for line in table(
            ["PROGRAM", "ID", "STATE", "RESTARTS", "ENABLED", "REV", "RELEASE"], rows)]
    for doc_id, p in sorted(programs.items()):
        if p.get("runs_again"):  # a restart: never program that ended (himbeere/oneshot.py)
            lines.append(f"{p.get('name') or doc_id} ({doc_id}) {p.get('state')} at "
                         f"{p.get('ended') or '?'}; runs again {p['runs_again']}")
    for doc_id, p in sorted(programs.items()):
        if p.get("last_error"):
            lines.append(f"last error of {p.get('name') or doc_id} ({doc_id}):")
            lines += ["  " + line for line in str(p["last_error"]).rstrip().splitlines()]
    if d.get("commands"):
        lines.append("latest commands:")
        rows = []
        for c in d["commands"]:
            r = c["result"]
            state = r.get("state", "-") if r else (
                JOINED_LATER if c.get("joined_later") else "no answer")
            rows.append([c["command"], " ".join(c["cmd"] or [])[:40], state,
                         _num(r.get("returncode") if r else None), _first_line(r)])
        lines += ["  " + line for line in table(["ID", "CMD", "STATE", "EXIT", "OUTPUT"], rows)]
    return lines


# -- logs --------------------------------------------------------------------------------
def cmd_logs(args: argparse.Namespace, fleet: Fleet) -> int:
    """What a node's programs printed (the last lines; -f follows live)."""
    docs = ops.logs(fleet, args.node, args.program)
    if args.program and not docs and not args.follow:
        mac = ops.node_id(fleet, args.node)
        ops.program_doc(fleet, mac, args.program)  # says so if there is no such program
    lines = ops.log_lines(docs)
    if args.json:
        emit(args, {"logs": docs})
        return 0
    shown = lines[-args.lines:] if args.lines else lines
    if not shown and not args.follow:
        what = f"program {args.program}" if args.program else "its programs"
        print(f"no log lines of {what} on node {args.node} yet", file=sys.stderr)
    _print_lines(shown, sys.stdout)
    if not args.follow:
        return 0
    follow(fleet, ops.node_id(fleet, args.node), args.program, lines)
    return 0


def follow(fleet: Fleet, node: int, program: Optional[str],
           shown: list[tuple[float, str, str]]) -> None:
    """Print new log lines until Ctrl-C; ``shown`` are the lines printed already.

    A server that goes away (restarted, network down) is retried with the
    daemon's capped, jittered backoff, with one line on stderr each way.
    """
    seen = _Seen(shown)
    backoff = Backoff()
    down = False
    refused_since: Optional[float] = None
    try:
        while True:
            time.sleep(backoff.next() if down else FOLLOW_INTERVAL)
            try:
                docs = ops.logs(fleet, node, program)
            except Unreachable:
                if not down:
                    print("server unreachable; reconnecting...", file=sys.stderr, flush=True)
                    down = True
                continue
            except Unauthorized:
                if not down:
                    raise
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > REFUSAL_GRACE:
                    raise
                continue  # the server is back, but has not read its admins yet
            refused_since = None
            if down:
                print("server reachable again", file=sys.stderr, flush=True)
                down = False
                backoff.reset()
            _print_lines(seen.fresh(ops.log_lines(docs)), sys.stdout)
    except KeyboardInterrupt:
        return


class _Seen:
    """Which log lines were printed: the latest stamp, and the lines that carry it.

    Lines that share a stamp may arrive in two looks (two programs, or a fast
    printer): comparing stamps alone would lose the second half, so the lines
    at the latest stamp are counted and only the rest of them is new.
    """

    def __init__(self, shown: list[tuple[float, str, str]]) -> None:
        self.last: Optional[float] = None
        self.at_last: Counter[tuple[str, str]] = Counter()
        self.fresh(shown)

    def fresh(self, lines: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
        """The lines of ``lines`` (sorted by stamp) not printed yet; notes them as printed."""
        printed = Counter(self.at_last)
        new = []
        for stamp, name, text in lines:
            if self.last is not None and stamp < self.last:
                continue
            if stamp == self.last and printed[(name, text)] > 0:
                printed[(name, text)] -= 1  # printed in an earlier look
                continue
            new.append((stamp, name, text))
        for stamp, name, text in new:
            if self.last is None or stamp > self.last:
                self.last, self.at_last = stamp, Counter()
            self.at_last[(name, text)] += 1
        return new


def _print_lines(lines: list[tuple[float, str, str]], out: IO[str]) -> None:
    for stamp, name, text in lines:
        clock = time.strftime("%H:%M:%S", time.localtime(stamp))
        out.write(f"{clock} [{name}] {text}\n")
    out.flush()


# -- commands ----------------------------------------------------------------------------
def cmd_cmd(args: argparse.Namespace, fleet: Fleet) -> int:
    """Run a command on many nodes with ONE command document, wait for the answers
    and print each node's output under a header line (--brief: a table, one row
    per node).  Exits 1 if any node failed or did not answer.

    himbeere cmd --all -- uname -a
    himbeere cmd --node kitchen --node 202481596941066 --timeout 10 -- df -h
    himbeere cmd --label room=lab -- sh -c 'echo $HOSTNAME'
    himbeere cmd --result ID      (the results of an earlier command)
    himbeere cmd --list           (the latest commands)
    """
    if args.list:
        listing = ops.list_commands(fleet, args.limit)
        if args.json:
            emit(args, {"commands": listing})
        else:
            rows = [[c["id"], " ".join(c["cmd"] or [])[:40],
                     "all" if c["targets"] == "all" else str(len(c["targets"] or [])),
                     f"{c['answered']}/{c['expected']}", str(c["failed"])] for c in listing]
            print("\n".join(table(["ID", "CMD", "TARGETS", "ANSWERED", "FAILED"], rows))
                  if rows else "no commands yet")
        return 0
    if args.result:
        return report(args, fleet, ops.command_results(fleet, args.result))
    if not args.argv:
        raise HimbeereError("no command to run: put it after --, "
                            "e.g. himbeere cmd --all -- uname -a")
    targets = ops.resolve_targets(fleet, all=args.all, nodes=args.node or (),
                                  labels=args.label or ())
    command_id = ops.create_command(fleet, list(args.argv), targets, args.timeout,
                                    signing_key=keys.find(args.signing_key, os.environ))
    wait = args.wait if args.wait is not None else (
        args.timeout + WAIT_MARGIN if args.timeout else DEFAULT_WAIT)
    err = sys.stderr
    err.write(f"command {command_id}\n")
    # On a terminal the progress line is rewritten in place; in a log, one line each.
    start, end = ("\r", "") if err.isatty() else ("", "\n")
    answer: dict[str, Any] = {}
    try:
        for answer in ops.wait_for_results(fleet, command_id, wait):
            expected = len(answer["pending"]) + _final_count(answer)
            err.write(f"{start}{_final_count(answer)}/{expected} answered{end}")
            err.flush()
    except KeyboardInterrupt:
        if start:
            err.write("\n")
        err.write(f"stopped waiting; the nodes go on: himbeere cmd --result {command_id}\n")
        return 130
    if start:
        err.write("\n")
    return report(args, fleet, answer)


def _final_count(answer: dict[str, Any]) -> int:
    pending = set(answer["pending"])
    return sum(1 for mac, r in answer["results"].items()
               if mac not in pending and r.get("state") in ops.FINAL_STATES)


#: What a node that joined after an ``--all`` command shows for it (:func:`ops.joined_later`).
JOINED_LATER = "not targeted (joined later)"

#: A node's label, its final result (None: none yet), what to say instead.
NodeAnswer = tuple[str, Optional[dict[str, Any]], str]


def report(args: argparse.Namespace, fleet: Fleet, answer: dict[str, Any]) -> int:
    """Print a command's results; 1 if any node failed or has not answered.

    By default each node's whole output under a header line; ``--brief``: one
    table row per node with the first line of output.
    """
    results, pending = answer["results"], answer["pending"]
    not_targeted = answer.get("not_targeted") or []
    bad = bool(pending) or any(ops.failed(r) for r in results.values())
    if args.json:
        emit(args, {"ok": not bad, "command": answer["command"],
                    "results": {str(k): v for k, v in results.items()},
                    "pending": pending, "not_targeted": not_targeted})
        return 1 if bad else 0
    names = fleet.names()
    states = {n["node"]: n["state"] for n in ops.list_nodes(fleet)} if pending else {}
    nodes: list[NodeAnswer] = []
    for mac in sorted(set(results) | set(pending) | set(not_targeted)):
        result = results.get(mac)
        label = node_label(mac, names.get(mac))
        if mac in not_targeted:
            nodes.append((label, None, JOINED_LATER))
        elif result is None or result.get("state") not in ops.FINAL_STATES:
            what = "still running" if result else f"no answer (node {states.get(mac, 'unknown')})"
            nodes.append((label, None, what))
        else:
            nodes.append((label, result, ""))
    command = answer["command"]
    print(f"command {command['_id']}: {shlex.join(str(a) for a in command.get('cmd') or [])}")
    if not nodes:
        print("no node was expected to answer, and none did")
    elif args.brief:
        print("\n".join(format_brief(nodes)))
    else:
        print("\n".join(format_full(nodes, args.max_lines)))
    failed = sum(1 for r in results.values() if r.get("state") in ops.FINAL_STATES
                 and ops.failed(r))
    if pending:
        print(f"{len(pending)} node(s) did not answer in time; later: "
              f"himbeere cmd --result {command['_id']}", file=sys.stderr)
    if failed:
        print(f"{failed} node(s) failed", file=sys.stderr)
    return 1 if bad else 0


def format_brief(nodes: list[NodeAnswer]) -> list[str]:
    """``--brief``: a table, one row per node, with the first line of its output."""
    rows = []
    for label, result, what in nodes:
        if result is None:
            rows.append([label, "-", what, "-", ""])
        else:
            rows.append([label, _num(result.get("returncode")), str(result.get("state")),
                         _num(result.get("duration"), "{:.2f}s"), _first_line(result)])
    return table(["NODE", "EXIT", "STATE", "DURATION", "OUTPUT"], rows)


def format_full(nodes: list[NodeAnswer], max_lines: int) -> list[str]:
    """Each node's header line, then its stdout and stderr, up to ``max_lines`` each."""
    lines = []
    for label, result, what in nodes:
        if result is None:
            lines.append(f"=== {label}: {what}")
            continue
        lines.append(f"=== {label}: {result.get('state')}, exit "
                     f"{_num(result.get('returncode'))}, "
                     f"{_num(result.get('duration'), '{:.2f}s')}")
        ret = result.get("ret") or []
        streams = [(name, str(ret[i] or "")) for i, name in enumerate(("stdout", "stderr"))
                   if i < len(ret) and ret[i]]
        for name, text in streams:
            lines.append(f"--- {name}")
            lines += _cut(text.splitlines(), max_lines)
        if result.get("error") and not any(str(result["error"]) in t for _, t in streams):
            lines.append(f"--- error: {result['error']}")
        if result.get("truncated"):
            cut = ", ".join(f"{n} {b} bytes" for n, b in sorted(result["truncated"].items()))
            lines.append(f"--- the node kept only part of the output (cut: {cut})")
        if not streams and not result.get("error"):
            lines.append("(no output)")
    return lines


def _cut(lines: list[str], limit: int) -> list[str]:
    """The first ``limit`` lines (0: all), and how many more there were."""
    if not limit or len(lines) <= limit:
        return lines
    return lines[:limit] + [f"... +{len(lines) - limit} more lines (--max-lines 0 shows all)"]


# -- programs and labels -----------------------------------------------------------------
def cmd_stop(args: argparse.Namespace, fleet: Fleet) -> int:
    """Stop a program on a node (sets "enabled": false in its code document).

    Without --node, PROGRAM is a placed program (it stops wherever it is
    placed) or a program for many nodes (it stops on every node it targets);
    --placed or --targeted says which, when a name is both.
    """
    return _program_action(args, fleet, "stop")


def cmd_start(args: argparse.Namespace, fleet: Fleet) -> int:
    """Start a stopped program on a node (sets "enabled": true in its code document).

    Without --node, PROGRAM is a placed program or a program for many nodes
    (--placed or --targeted says which, when a name is both).
    """
    return _program_action(args, fleet, "start")


def cmd_restart(args: argparse.Namespace, fleet: Fleet) -> int:
    """Restart a program on a node (increments "restart_count" in its code document).

    Without --node, PROGRAM is a placed program (it restarts wherever it is
    placed) or a program for many nodes (it restarts on every node it
    targets); --placed or --targeted says which, when a name is both.
    """
    return _program_action(args, fleet, "restart")


def _program_action(args: argparse.Namespace, fleet: Fleet, action: str) -> int:
    if args.placed and args.targeted:
        raise ConfigError("a program is placed or for many nodes, not both: drop --placed "
                          "or --targeted")
    if args.placed and args.node:
        raise ConfigError("a placed program runs where the fleet puts it: --placed "
                          "acts wherever it is placed; drop --node")
    if args.targeted and args.node:
        raise ConfigError("a program for many nodes has one document for all of them: "
                          "--targeted acts on every node it targets; drop --node")
    kind = {"placed": args.placed, "targeted": args.targeted}
    if action == "restart":
        result = ops.restart_program(fleet, args.node, args.program, **kind)
        line = f"restart requested for {result['id']} (restart_count {result['restart_count']})"
    else:
        result = ops.set_enabled(fleet, args.node, args.program, action == "start", **kind)
        verb = "started" if action == "start" else "stopped"
        line = (f"{verb} {result['id']} (enabled: {str(result['enabled']).lower()})"
                if result["changed"] else f"{result['id']} was {verb} already")
    line += _reach(result)
    if args.json:
        emit(args, result)
    else:
        print(line)
    return 0


def _reach(result: dict[str, Any]) -> str:
    """Which nodes an action on a placed program (a program for many nodes) reaches."""
    nodes = ", ".join(str(mac) for mac in result.get("nodes") or [])
    if result["placed"]:
        return (f"; placed program, now placed on {nodes}" if nodes
                else "; placed program, placed on no node now")
    if result.get("targeted"):
        count = len(result["nodes"])
        return (f"; program for many nodes (targets {targets_text(result['targets'])}): "
                + (f"{count} node{'s' if count != 1 else ''} now ({nodes})" if count
                   else "no node now"))
    return ""


def cmd_label(args: argparse.Namespace, fleet: Fleet) -> int:
    """Set labels of a node (key=value; key= removes one); without any, show them.
    Labels select nodes for `himbeere cmd --label key=value`."""
    labels = ops.parse_labels(args.labels)
    if labels:
        after = ops.set_labels(fleet, args.node, **labels)
    else:
        mac = ops.node_id(fleet, args.node)
        after = next((n["labels"] for n in ops.list_nodes(fleet) if n["node"] == mac), {})
    if args.json:
        emit(args, {"node": ops.node_id(fleet, args.node), "labels": after})
    else:
        text = ", ".join(f"{k}={v}" for k, v in sorted(after.items())) or "none"
        print(f"labels of {args.node}: {text}")
    return 0


def cmd_state(args: argparse.Namespace, fleet: Fleet) -> int:
    """Show a program's persistent state (the `state` dict its code sees), or clear
    it with --reset, so that the program starts from {} next time.

    himbeere state counter
    himbeere state counter --node kitchen      (when several nodes have a "counter")
    himbeere state 1001:counter --reset
    """
    if args.reset:
        result = ops.reset_state(fleet, args.program, args.node)
    else:
        result = ops.program_state(fleet, args.program, args.node)
    if args.json:
        emit(args, result)
        return 0
    what = (f"{result['name']} ({result['id']})" if result["name"] != result["id"]
            else result["id"])
    if args.reset:
        print(f"cleared the state of {what}" if result["cleared"]
              else f"{what} had no state; nothing to clear")
        if result["cleared"] and result["running_on"]:
            nodes = ", ".join(str(mac) for mac in result["running_on"])
            print(f"note: it runs on node {nodes}, keeps the old values in memory and writes "
                  f"back the keys it changes; for a clean start stop it first "
                  f"(himbeere stop {result['id']} --node NODE)", file=sys.stderr)
        return 0
    if not result["exists"]:
        running = ""
        if result["running_on"]:
            nodes = ", ".join(str(mac) for mac in result["running_on"])
            running = (f" (it runs on node {nodes}; a program's state is saved every "
                       f"{result['save_interval']:g} s once it changes)")
        print(f"{what} has no state yet{running}")
        return 0
    by = f" by node {result['node']}" if result["node"] is not None else ""
    ago = f" ({_age(result['saved_ago'])} ago)" if result["saved_ago"] is not None else ""
    print(f"state of {what}, saved at {result['saved'] or '-'}{ago}{by}:")
    print(json.dumps(result["values"], indent=2, sort_keys=True, ensure_ascii=False))
    return 0



# -- placements --------------------------------------------------------------------------
def cmd_placements(args: argparse.Namespace, fleet: Fleet) -> int:
    """What runs where, and why: each placed program (type "himbeere-placed"), the
    nodes the scheduler assigned it to, their state and the reason for the choice."""
    answer = ops.placements(fleet)
    if args.json:
        emit(args, answer)
        return 0
    print("\n".join(format_placements(answer)))
    return 0


def _wants(p: dict[str, Any]) -> str:
    parts = [f"{p['replicas']}x" if p.get("replicas") is not None else "?x"]
    parts += [f"{k}={v}" for k, v in sorted((p.get("labels") or {}).items())]
    requires = p.get("requires") or {}
    if requires.get("ram_mb"):
        parts.append(f"ram {requires['ram_mb']:g}MB")
    if requires.get("disk_mb"):
        parts.append(f"disk {requires['disk_mb']:g}MB")
    return " ".join(parts)


def format_placements(answer: dict[str, Any]) -> list[str]:
    scheduler = answer["scheduler"]
    if scheduler:
        lines = [f"scheduler: node {node_label(scheduler['node'], scheduler['name'])} "
                 f"({scheduler['node_state']}), lease epoch {scheduler['epoch']}, expires in "
                 f"{scheduler['expires_in']:g}s"]
    else:
        lines = ["scheduler: none (no node holds lease:scheduler; a running daemon takes it "
                 "within a heartbeat)"]
    placements = answer["placements"]
    if not placements:
        return lines + ['no placed programs (documents with "type": "himbeere-placed")']
    rows = []
    for p in placements:
        name = str(p["name"]) if p["name"] == p["id"] else f"{p['name']} ({p['id']})"
        if not p["enabled"]:
            name += " [disabled]"
        first = [name, _wants(p)]
        if not p["nodes"]:
            why = p["problem"] or ("not assigned yet" if not p["assigned"] else "-")
            rows.append(first + ["-", "-", "-", why])
        for i, n in enumerate(p["nodes"]):
            rows.append((first if i == 0 else ["", ""]) + [
                node_label(n["node"], n["name"]), n["node_state"], str(n["state"] or "-"),
                str(n["why"] or "-")])
        if p["nodes"] and p["problem"]:
            rows.append(["", "", "-", "-", "-", p["problem"]])
        for mac in p["draining"]:
            rows.append(["", "", str(mac), "-", "stopping", "leaving: no longer placed here"])
    return lines + table(["PROGRAM", "WANTS", "NODE", "NODE STATE", "STATE", "WHY"], rows)


# -- parser ------------------------------------------------------------------------------
def _lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a number of "
                                         "lines >= 0 (0: all)")
    return value



def register(sub: Any) -> None:
    """Add the fleet subcommands to ``himbeere``'s ``add_subparsers()`` object."""
    common = common_flags()

    def add(name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(handler.__doc__ or "")
        parser: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=" ".join(doc.split("\n\n")[0].split()),
            description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        parser.set_defaults(func=lambda args: run(args, handler))
        return parser

    add("nodes", cmd_nodes)

    status = add("status", cmd_status)
    status.add_argument("node", metavar="NODE", help="MAC id, MAC address or name")

    logs = add("logs", cmd_logs)
    logs.add_argument("node", metavar="NODE", help="MAC id, MAC address or name")
    logs.add_argument("program", metavar="PROGRAM", nargs="?",
                      help="only this program (name or id)")
    logs.add_argument("-f", "--follow", action="store_true", help="follow live (Ctrl-C ends)")
    logs.add_argument("-n", "--lines", metavar="N", type=int, default=100,
                      help="show the last N lines (default 100, 0: all)")

    cmd = add("cmd", cmd_cmd)
    where = cmd.add_argument_group("where (--node and --label add up)")
    where.add_argument("--all", action="store_true", help="every node")
    where.add_argument("--node", metavar="NODE", action="append",
                       help="MAC id, MAC address or name; repeat for more")
    where.add_argument("--label", metavar="KEY=VALUE", action="append",
                       help="nodes with this label (repeated: with all of them)")
    cmd.add_argument("--timeout", metavar="S", type=float,
                     help="seconds the command may run on each node (default: the node's, "
                          "300)")
    cmd.add_argument("--wait", metavar="S", type=float,
                     help=f"seconds to wait for answers (default: timeout + {WAIT_MARGIN:g}, "
                          f"or {DEFAULT_WAIT:g} without --timeout)")
    cmd.add_argument("--signing-key", metavar="FILE",
                     help=f"sign the command with this key ({keys.ENV}, default "
                          f"{keys.DEFAULT_KEY} if it exists)")
    cmd.add_argument("--result", metavar="ID", help="show the results of command ID again")
    cmd.add_argument("--list", action="store_true", help="list the latest commands")
    cmd.add_argument("--limit", metavar="N", type=int, default=20,
                     help="how many --list shows (default 20)")
    shown = cmd.add_argument_group("output (--json: one JSON object)")
    shown.add_argument("--brief", action="store_true",
                       help="one table row per node, with the first line of its output")
    shown.add_argument("--max-lines", metavar="N", type=_lines, default=MAX_LINES,
                       help=f"lines of stdout and of stderr shown per node (default "
                            f"{MAX_LINES}, 0: all); the rest is counted as \"+N more lines\"")
    cmd.add_argument("argv", metavar="ARGV", nargs="*", help="the command, after --")

    for name, handler in (("stop", cmd_stop), ("start", cmd_start), ("restart", cmd_restart)):
        program = add(name, handler)
        program.add_argument("program", metavar="PROGRAM", help="program name or id")
        program.add_argument("--node", metavar="NODE",
                             help="MAC id, MAC address or name (none: a placed program or "
                                  "a program for many nodes)")
        program.add_argument("--placed", action="store_true",
                             help="a placed program, wherever it runs")
        program.add_argument("--targeted", action="store_true",
                             help="a program for many nodes (program:NAME), on every node it "
                                  "targets")

    add("placements", cmd_placements)

    label = add("label", cmd_label)
    label.add_argument("node", metavar="NODE", help="MAC id, MAC address or name")
    label.add_argument("labels", metavar="KEY=VALUE", nargs="*",
                       help="labels to set (key= removes one)")

    state = add("state", cmd_state)
    state.add_argument("program", metavar="PROGRAM", help="program name or id")
    state.add_argument("--node", metavar="NODE",
                       help="the node whose program it is (MAC id, MAC address or name), "
                            "when several nodes have a program of that name")
    state.add_argument("--reset", action="store_true",
                       help="delete the state: the program starts from {} next time")

    rolloutscli.register(add)


def run(args: argparse.Namespace, handler: Handler) -> int:
    """Open the fleet and run ``handler``; with ``--json`` an error is JSON too."""
    try:
        return handler(args, open_fleet(args))
    except HimbeereError as exc:
        if args.json and not getattr(args, "debug", False):
            emit(args, {"ok": False, "error": str(exc)})
            return 1
        raise  # himbeere.cli.run prints it as one line


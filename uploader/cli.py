"""The ``himbeere-upload`` command (also ``himbeere upload``).

Where the server comes from: ``setup URL`` takes it as an argument; every
subcommand also takes ``--server URL`` or the ``HIMBEERE_SERVER`` variable,
``--database`` (``HIMBEERE_DATABASE``, default ``raspberries``) and
``--status-database`` (``HIMBEERE_STATUS_DATABASE``, default
``<database>_status``): the daemon's setting names.  Credentials go in the
URL, ``http://USER:PASSWORD@host:5984``; they are never printed.
``setup``, ``provision`` and ``discover`` need a server admin; ``push``,
``pull``, ``ls``, ``rm``, ``history`` and ``rollback`` an admin or a user with role
``himbeere-deployer`` (see :mod:`himbeere.security`).

Every subcommand prints one clear line for an error and exits 1 (``--debug``
shows the traceback); ``--json`` prints one JSON object instead, errors
included (``{"ok": false, "error": "..."}``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from himbeere import __version__, defaults
from himbeere import config as configuration
from himbeere.couch import Doc, security
from himbeere.exceptions import ConfigError, HimbeereError

from . import discover as discovery
from . import install, keys, push, releases, rollouts, sites, upgrade, users
from .fleet import Fleet, parse_labels, parse_mac

PROG = "himbeere-upload"

Output = tuple[Any, list[str]]


def settings(args: argparse.Namespace, environ: Mapping[str, str]) -> configuration.Config:
    """Server and database names from flags, then ``HIMBEERE_*`` variables."""
    server = getattr(args, "url", None) or args.server or environ.get("HIMBEERE_SERVER")
    if not server:
        raise ConfigError("server: not set; give --server URL or set HIMBEERE_SERVER, "
                          "http://USER:PASSWORD@host:5984")
    database = args.database or environ.get("HIMBEERE_DATABASE") or defaults.DATABASE
    status = args.status_database or environ.get("HIMBEERE_STATUS_DATABASE") or None
    return configuration.Config(server=server, database=database,
                                status_database=status).validate()


def open_fleet(args: argparse.Namespace) -> Fleet:
    config = settings(args, args.environ)
    return Fleet(config.server or "", config.database, config.status_db)


# -- subcommands -----------------------------------------------------------------------
def cmd_setup(args: argparse.Namespace) -> Output:
    """Set up the databases, design documents and _security.

    Creates the databases, installs the design documents and sets _security.
    Safe to run again: a second run changes nothing and says so.
    """
    report = install.setup(open_fleet(args))
    if report["admin_party"]:
        warn_admin_party(report["server"])
    where = f"{report['server']} ({', '.join(report['databases'])})"
    if report["changed"]:
        lines = [f"set up {where}:"] + [f"  {change}" for change in report["changes"]]
    else:
        lines = [f"already set up: nothing changed on {where}"]
    return report, lines + [f"note: {note}" for note in report["notes"]]


def warn_admin_party(server: str) -> None:
    """Say on stderr, loud enough to be seen in a wall of output, that anyone is admin."""
    rule = "!" * 78
    sys.stderr.write(
        f"{rule}\n"
        f"WARNING: {server} is in admin party: it has no admin at all.\n"
        "Anyone who reaches it is an admin, without a password, and may read or\n"
        "change every program and node user.  Create an admin (CouchDB: PUT\n"
        "/_node/_local/_config/admins/NAME; pouchdb-server: PUT /_config/admins/NAME)\n"
        "and put its name and password in the URL.\n"
        f"{rule}\n")


def cmd_push(args: argparse.Namespace) -> Output:
    """Push a program, or global modules.

    A .py file (its code) or a folder (main.py and modules) goes to a node;
    --all or --label pushes one program that every node (with these labels)
    runs; --global pushes global_modules; --placed a placed program, which the
    fleet runs on the nodes it picks (within --replicas, --label and --requires).
    """
    if args.is_global and args.node:
        raise ConfigError("--global modules are shared by every node; drop --node")
    if args.placed and (args.node or args.is_global or args.all):
        raise ConfigError("a --placed program runs where the fleet puts it; drop "
                          + ("--node" if args.node else "--global" if args.is_global
                             else "--all"))
    if not args.placed and (args.replicas is not None or args.requires):
        raise ConfigError("--replicas and --requires are for placed programs; add --placed")
    targets = _push_targets(args)
    if not (args.is_global or args.node or args.placed or targets):
        raise ConfigError("--node NODE is missing (a MAC id or a name), or use --all, "
                          "--label key=value, --global or --placed")
    placed = (push.Placed.parse(args.replicas, args.label or (), args.requires or ())
              if args.placed else None)
    plan = rollouts.plan_of(args)
    fleet = open_fleet(args)
    node = fleet.resolve_node(args.node) if args.node else None
    signing_key = keys.find(args.signing_key, args.environ)
    result = push.push(fleet, Path(args.path), node, args.name, placed, targets,
                       rollout=plan, signing_key=signing_key)
    if result["action"] == "unchanged":
        lines = [f"unchanged: {result['id']} (rev {result['rev']})"]
    else:
        lines = [f"{result['action']} {result['id']} (rev {result['rev']}), "
                 f"release {result['release']}"]
        if signing_key is not None:
            lines[0] += f", signed by {signing_key.key_id}"
        lines += [f"  {change}" for change in result["changes"]]
    if result["ignored"]:
        lines.append(f"ignored: {', '.join(result['ignored'])}")
    if plan is not None and result.get("rollout"):
        lines = rollouts.started(fleet, result, plan, lines, args.wait, args.json)
    return result, lines


def _push_targets(args: argparse.Namespace) -> Any:
    """``"all"`` for --all, ``{"labels": {...}}`` for --label (not --placed), else None."""
    if args.placed or not (args.all or args.label):
        return None
    if args.node or args.is_global:
        given = "--all" if args.all else "--label"
        raise ConfigError(f"{given} pushes one program for many nodes; drop "
                          + ("--node" if args.node else "--global"))
    if args.all and args.label:
        raise ConfigError("--all runs it on every node: drop --label (or drop --all)")
    if args.all:
        return "all"
    labels = parse_labels(args.label)
    empty = sorted(key for key, value in labels.items() if not value)
    if empty:
        raise ConfigError(f"--label {empty[0]}= has no value; a program for many nodes "
                          "runs where every label has its value: key=value")
    return {"labels": labels}


def cmd_pull(args: argparse.Namespace) -> Output:
    """Write a program's code out as files in DIR."""
    if sum((bool(args.node), args.is_global, args.placed, args.targeted)) > 1:
        raise ConfigError("say where the program is with one of --node, --global, --placed, "
                          "--targeted")
    fleet = open_fleet(args)
    node = fleet.resolve_node(args.node) if args.node else None
    result = push.pull(fleet, args.name, Path(args.dir), node, args.is_global, args.force,
                       args.placed, args.targeted)
    files = ", ".join(f"{file} {state}" for file, state in sorted(result["files"].items()))
    return result, [f"pulled {result['id']} into {result['dir']}: {files}"]


def cmd_ls(args: argparse.Namespace) -> Output:
    """List the programs and their releases.

    With --node, the programs for many nodes that the node reports running
    are listed too.
    """
    fleet = open_fleet(args)
    node = fleet.resolve_node(args.node) if args.node else None
    listing = push.ls(fleet, node)
    rows = [[_node_label(p["node"], p["node_name"]), p["name"], p["id"],
             "-" if p["release"] is None else str(p["release"]),
             ", ".join(p["modules"] + [f"{m} (global)" for m in p["global_modules"]]),
             ("" if p["enabled"] else "disabled ") + _state(p)]
            for p in listing]
    if not rows:
        return {"programs": []}, ["no programs" + (f" on node {node}" if node else "")]
    return {"programs": listing}, table(["NODE", "PROGRAM", "ID", "RELEASE", "MODULES", "STATE"],
                                        rows)


def cmd_rm(args: argparse.Namespace) -> Output:
    """Remove a program (a node's, placed, or for many nodes).

    The daemons that run it stop it.
    """
    if sum((bool(args.node), args.is_global, args.placed, args.targeted)) != 1:
        raise ConfigError("say where the program is: --node NODE, --global, --placed or "
                          "--targeted")
    fleet = open_fleet(args)
    node = fleet.resolve_node(args.node) if args.node else None
    result = push.rm(fleet, args.name, node, args.placed, args.targeted)
    return result, [f"removed {result['id']}"]


def cmd_history(args: argparse.Namespace) -> Output:
    """List a program's releases, newest first.

    Each push that changed something is a release: its number, when, who,
    the signing key id, the documents it wrote and what changed.
    """
    entries = releases.history(open_fleet(args), args.name)
    return ({"name": args.name, "releases": entries},
            table(releases.HISTORY_HEADER, releases.history_table(entries)))


def cmd_rollback(args: argparse.Namespace) -> Output:
    """Deploy an earlier release again, as a new release.

    Release N (default: the one before the newest) is written again to the
    same documents; its release number is the next one, so it keeps growing.
    With --rollout it goes out in waves, as a push does.
    """
    plan = rollouts.plan_of(args)
    fleet = open_fleet(args)
    signing_key = keys.find(args.signing_key, args.environ)
    result: Doc = {}
    gated: list[str] = []  # the document the rollout gates

    def finish(doc: Doc) -> None:
        """As push's: the rollout's fields, then the signature, the last step."""
        if plan is not None:
            if gated and gated[0] != doc["_id"]:
                raise ConfigError(f"--rollout rolls back one document at a time; this "
                                  f"release of {args.name} has several ({gated[0]}, "
                                  f"{doc['_id']}): roll it back without --rollout")
            current = fleet.code.get(doc["_id"])
            rollouts.keep_previous(fleet, args.name, current)
            gated[:] = [doc["_id"]]
            made = result.get("rollout")
            result["rollout"] = rollouts.prepare(fleet, args.name, doc,
                                                 rollouts.previous_release(current), plan)
            if made != result["rollout"]:
                rollouts.discard(fleet, made)  # a retry: another push took that number
        if signing_key is not None:
            keys.sign(doc, signing_key)

    try:
        record = releases.rollback(fleet, args.name, args.to, finish=finish)
    except Exception:
        rollouts.discard(fleet, result.get("rollout"))  # no document refers to it
        raise
    entry = releases.entry(record)
    signed = f", signed by {signing_key.key_id}" if signing_key is not None else ""
    lines = [f"release {entry['release']} of {args.name}: {entry['what']} "
             f"({', '.join(entry['docs'])}){signed}"]
    result.update(name=args.name, release=entry)
    if plan is not None and result.get("rollout"):
        lines = rollouts.started(fleet, result, plan, lines, args.wait, args.json)
    return result, lines


def cmd_provision(args: argparse.Namespace) -> Output:
    """Create or update a node's CouchDB user and name.

    The user has role himbeere-node; its name is the node's MAC id.
    """
    node = parse_mac(args.macid)
    if node is None:
        raise ConfigError(f"MAC id {args.macid!r} is not allowed; allowed: digits, or a MAC "
                          "address like b8:27:eb:12:34:56")
    result = users.provision(open_fleet(args), node, args.name, args.password)
    lines = [_provision_line(result)]
    if "password" in result:
        lines.append(f"  generated password: {result['password']} (the Pi needs it in its "
                     "state directory's password file)")
    return result, lines


def _provision_line(result: Doc) -> str:
    node = result["node"]
    if result["action"] == "created":
        source = result["password_source"]
        line = f"created user {node} (role {security.NODE_ROLE}, password {source})"
    elif result["action"] == "updated":
        line = f"updated user {node}: {', '.join(result['changed'])}"
    else:
        line = f"user {node} unchanged"
    if result.get("name_action") in ("named", "renamed"):
        line += f"; {result['name_action']} {result['name']}"
    elif result.get("name"):
        line += f"; name {result['name']}"
    return line


def cmd_discover(args: argparse.Namespace) -> Output:
    """Find the Pis on the network and provision each.

    Broadcasts the server's URL (without credentials) and provisions every Pi
    that answers with its password.
    """
    fleet = open_fleet(args)
    stderr = sys.stderr

    def progress(waited: float, timeout: float) -> None:
        stderr.write(f"\rwaiting for Pis to answer: {min(waited, timeout):.0f}/{timeout:g} s")
        stderr.flush()

    def answered(address: tuple[str, int], reply: dict[str, Any]) -> None:
        stderr.write(f"\ranswer from {address[0]}: MAC id {reply.get('MacID')}\n")
        stderr.flush()

    fleet_key_file = args.fleet_key_file or args.environ.get("HIMBEERE_FLEET_KEY_FILE")
    port = args.port or args.environ.get("HIMBEERE_DISCOVERY_PORT")
    stderr.write(f"broadcasting {args.node_server or fleet.server} for {args.timeout:g} s\n")
    fleet_key = _fleet_key(fleet_key_file) if fleet_key_file else None
    rows = discovery.discover(
        fleet, args.timeout, args.node_server, args.broadcast, progress, answered,
        port=int(port) if port else None, broadcast_address=args.broadcast_address,
        fleet_key=fleet_key, trusted_keys=_handed_keys(args, fleet_key))
    stderr.write("\n")
    if not rows:
        return {"nodes": []}, [f"no Pi answered within {args.timeout:g} s"]
    return {"nodes": rows}, table(
        ["MAC ID", "NAME", "IP", "STATE"],
        [[str(r["node"] or "?"), r["name"] or "-", str(r["ip"]), r["state"]] for r in rows])


def cmd_keygen(args: argparse.Namespace) -> Output:
    """Make an Ed25519 signing key for a deployer.

    Writes the private key (mode 0600) and FILE.pub beside it; push, cmd and
    the dashboard sign with it from then on.  Nodes trust it through
    trusted_keys, or at pairing (discover --trusted-key FILE.pub).
    """
    made = keys.keygen(args.out, args.force)
    return made, [f"private key: {made['key']} (mode 0600; keep it secret)",
                  f"public key:  {made['public']}",
                  f"key id:      {made['key_id']}",
                  "on each node, in [himbeere] of /etc/himbeere/himbeere.conf:",
                  f"trusted_keys = {made['trusted_keys']}"]


def cmd_site_add(args: argparse.Namespace) -> Output:
    """Set up a relay for nodes at an edge site, or update one.

    Makes a CouchDB near some nodes their site's relay, or brings a site up to date.

    Sets the relay up (databases, design documents, _security), copies the
    nodes' users with their password hashes, labels the nodes site=NAME and
    writes four continuous replications into the relay's _replicator.  Again
    with the same NAME: resolves the nodes again (without --nodes: as given
    before) and changes only what differs.  --server is the central server,
    --relay the relay, each with an admin's credentials.
    """
    result = sites.add_site(open_fleet(args), args.name, args.relay, args.nodes,
                            args.central_url)
    nodes = ", ".join(str(mac) for mac in result["nodes"])
    if result["changed"]:
        lines = [f"site {result['name']}: relay {result['relay']}, nodes {nodes}"]
        lines += [f"  {change}" for change in result["changes"]]
    else:
        lines = [f"site {result['name']} unchanged: relay {result['relay']}, nodes {nodes}"]
    lines += ["each site node's configuration (/etc/himbeere/himbeere.conf) needs the relay "
              "first, the central server as the fallback (its own MAC id and password in the "
              "first URL; the second inherits them):",
              f"  {result['server_line']}"]
    return result, lines


def cmd_site_ls(args: argparse.Namespace) -> Output:
    """List the sites: relays, nodes, replications."""
    found = sites.list_sites(open_fleet(args))
    if not found:
        return {"sites": []}, ["no sites (himbeere-upload site add NAME --relay URL --nodes "
                               "... makes one)"]
    rows = [[s["name"], s["relay"], str(len(s["nodes"])), s["state"]] for s in found]
    return {"sites": found}, table(["SITE", "RELAY", "NODES", "REPLICATIONS"], rows)


def cmd_site_status(args: argparse.Namespace) -> Output:
    """Show a site's replications (state, sync, lag) and nodes.

    The lag is the changes the relay's scheduler knows are still to copy.
    """
    shown = sites.site_status(open_fleet(args), args.name, args.relay)
    lines = [f"site {shown['name']}: relay {shown['relay']}, created {shown['created']}"
             + (f", nodes {shown['selector']}" if shown["selector"] else "")]
    if shown["relay_error"]:
        lines.append(f"relay unreachable: {shown['relay_error']}")
    else:
        lines += table(["REPLICATION", "STATE", "LAST SYNC", "LAG", "ERROR"],
                       [[r["id"], r["state"], str(r["last_sync"] or "-"),
                         "-" if r["lag"] is None else str(r["lag"]), str(r["error"] or "-")]
                        for r in shown["replications"]])
    rows = [[str(n["node"]), n["name"] or "-", n.get("state_text") or n["state"],
             str(n["heartbeat"] or "-"), n["server"] or "-"] for n in shown["node_list"]]
    lines += table(["NODE", "NAME", "STATE", "HEARTBEAT", "SERVER"], rows) if rows else [
        "no node of the site has sent a heartbeat yet"]
    return shown, lines


def cmd_site_rm(args: argparse.Namespace) -> Output:
    """Remove a site: replications, registry, node labels.

    The relay's databases and users stay (delete them on the relay if wanted);
    the nodes keep the relay in their configuration until it is changed.
    """
    result = sites.remove_site(open_fleet(args), args.name, args.relay)
    lines = [f"removed site {result['name']}:"] + [f"  {c}" for c in result["changes"]]
    lines.append(f"left on the relay {result['relay']}: its databases and users")
    return result, lines


def _no_site_command(args: argparse.Namespace) -> Output:
    raise ConfigError("site: say what to do: add, ls, status or rm "
                      "(himbeere-upload site --help)")


def _handed_keys(args: argparse.Namespace, fleet_key: Optional[bytes]) -> Optional[list[str]]:
    """The public keys discover hands to the nodes: --trusted-key, or the signing key's."""
    from himbeere import signing

    given = [base64.b64encode(signing.parse_key(entry)).decode() for entry in
             args.trusted_key or ()]
    if given or fleet_key is None:
        return given or None
    key = keys.find(None, args.environ)  # only with the fleet key: it protects them
    return [key.public_b64] if key is not None else None


def _fleet_key(path: str) -> bytes:
    from himbeere.fleetkey import read_fleet_key  # needs the cryptography package

    return read_fleet_key(path)


def _node_label(node: Any, name: Optional[str]) -> str:
    if node is None:
        return "global"
    return f"{node} ({name})" if name else str(node)


def _state(program: Doc) -> str:
    """``running``; a placed (targeted) program's with its nodes: ``running on 1002 (kitchen)``."""
    if not (program.get("placed") or program.get("targeted")):
        return program["state"] or "-"
    nodes = program.get("nodes") or []
    if not nodes:
        return "runs on no node yet" if program.get("targeted") else "not placed yet"
    if program["state"]:
        return f"{program['state']} on " + ", ".join(
            _node_label(n["node"], n["name"]) for n in nodes)
    return ", ".join(f"{n['state'] or '-'} on {_node_label(n['node'], n['name'])}"
                     for n in nodes)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header] + rows]


# -- parser -----------------------------------------------------------------------------
def common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server (flags win over HIMBEERE_* variables)")
    group.add_argument("--server", metavar="URL",
                       help="http://USER:PASSWORD@host:5984 (or HIMBEERE_SERVER)")
    group.add_argument("--database", metavar="NAME",
                       help=f"code database (HIMBEERE_DATABASE, default {defaults.DATABASE})")
    group.add_argument("--status-database", metavar="NAME",
                       help="status database (HIMBEERE_STATUS_DATABASE, default "
                            "<database>_status)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    return common


def summary(doc: Optional[str]) -> str:
    """A command's one-line help: its docstring's first line, without the full stop."""
    return (doc or "").strip().splitlines()[0].rstrip(".")


def build_parser() -> argparse.ArgumentParser:
    common = common_flags()
    # SUPPRESS: without it here, the command's False would undo `himbeere-upload --debug ls`.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Set up a CouchDB server for himbeere, provision Pis and "
                               "push code to them.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], Output]) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").strip()
        command = sub.add_parser(name, parents=[common], help=summary(doc),
                                 description=doc)
        command.set_defaults(func=func)
        return command

    setup = add("setup", cmd_setup)
    setup.add_argument("url", nargs="?", metavar="URL",
                       help="the server, with an admin's credentials (or --server)")

    push_cmd = add("push", cmd_push)
    push_cmd.add_argument("path", metavar="PATH", help="a .py file or a folder with main.py")
    push_cmd.add_argument("--node", metavar="NODE", help="MAC id or friendly name")
    push_cmd.add_argument("--name", metavar="NAME",
                          help="program name (default: the file's or folder's name)")
    push_cmd.add_argument("--global", dest="is_global", action="store_true",
                          help="push as global_modules, exported to every program")
    many = push_cmd.add_argument_group(
        "one program for many nodes (id program:NAME; without --placed)")
    many.add_argument("--all", action="store_true", help="every node runs it")
    many.add_argument("--label", metavar="KEY=VALUE", action="append",
                      help="nodes with this label run it (repeat: all of them); with "
                           "--placed: it runs only on nodes with this label (key= removes "
                           "one)")
    placed = push_cmd.add_argument_group(
        "placed programs (the fleet picks the nodes; flags left out keep the document's)")
    placed.add_argument("--placed", action="store_true",
                        help='a placed program ("type": "himbeere-placed"), id placed:NAME')
    placed.add_argument("--replicas", metavar="N",
                        help="how many nodes run it (new: 1; 0 runs it nowhere)")
    rollouts.add_push_flags(push_cmd)
    placed.add_argument("--requires", metavar="KEY=MB", action="append",
                        help="free RAM or disk a node needs: ram_mb=200, disk_mb=100 "
                             "(repeat; ram_mb= removes it)")

    push_cmd.add_argument("--signing-key", metavar="FILE",
                          help=f"sign with this key ({keys.ENV}; default {keys.DEFAULT_KEY} "
                               "if it exists)")

    pull = add("pull", cmd_pull)
    pull.add_argument("name", metavar="NAME", help="program name")
    pull.add_argument("dir", metavar="DIR", help="folder to write the files into")
    pull.add_argument("--node", metavar="NODE", help="when the name is on several nodes")
    pull.add_argument("--global", dest="is_global", action="store_true",
                      help="a global modules document")
    pull.add_argument("--placed", action="store_true", help="a placed program")
    pull.add_argument("--targeted", action="store_true",
                      help="a program for many nodes (program:NAME)")
    pull.add_argument("--force", action="store_true", help="overwrite files that differ")

    ls = add("ls", cmd_ls)
    ls.add_argument("--node", metavar="NODE", help="only this node (MAC id or name)")

    rm = add("rm", cmd_rm)
    rm.add_argument("name", metavar="NAME", help="program name")
    rm.add_argument("--node", metavar="NODE", help="MAC id or friendly name")
    rm.add_argument("--global", dest="is_global", action="store_true",
                    help="a global modules document")
    rm.add_argument("--placed", action="store_true", help="a placed program")
    rm.add_argument("--targeted", action="store_true",
                    help="a program for many nodes (program:NAME)")

    history = add("history", cmd_history)
    history.add_argument("name", metavar="NAME", help="program name")

    rollback = add("rollback", cmd_rollback)
    rollback.add_argument("name", metavar="NAME", help="program name")
    rollback.add_argument("--to", metavar="N", type=int,
                          help="the release to deploy again (default: the one before the "
                               "newest)")
    rollback.add_argument("--signing-key", metavar="FILE",
                          help=f"sign with this key ({keys.ENV}; default {keys.DEFAULT_KEY} "
                               "if it exists)")
    rollouts.add_push_flags(rollback)
    rollback.set_defaults(is_global=False)  # rollouts.plan_of asks

    provision = add("provision", cmd_provision)
    provision.add_argument("macid", metavar="MACID", help="decimal MAC id or MAC address")
    provision.add_argument("--name", metavar="NAME", help="friendly name, e.g. kitchen")
    provision.add_argument("--password", metavar="PW",
                           help="the Pi's password (default: keep it, or generate one)")

    disc = add("discover", cmd_discover)
    disc.add_argument("--timeout", metavar="S", type=float, default=10.0,
                      help="seconds to wait for answers (default 10)")
    disc.add_argument("--port", "--discovery-port", metavar="PORT", type=int, dest="port",
                      help="UDP port of the nodes (HIMBEERE_DISCOVERY_PORT, default "
                           f"{defaults.DISCOVERY_PORT})")
    disc.add_argument("--broadcast-address", metavar="ADDR",
                      help="where to send it (default 255.255.255.255; a subnet's broadcast "
                           "or one Pi's address)")
    disc.add_argument("--fleet-key-file", metavar="FILE",
                      help="the fleet key the nodes have (HIMBEERE_FLEET_KEY_FILE)")
    disc.add_argument("--trusted-key", metavar="KEY", action="append",
                      help="a public key (base64, or a .pub file) the nodes are to trust; "
                           "repeat for more (default: the signing key's, with a fleet key)")
    disc.add_argument("--node-server", metavar="URL",
                      help="URL the Pis should use, without credentials (default: the "
                           "server's)")
    _add_site_commands(sub, common)
    # A new daemon for the nodes (uploader/upgrade.py, docs/upgrading.rst).
    upgrade.add_flags(add("upgrade", upgrade.cmd_upgrade), open_fleet)

    keygen = add("keygen", cmd_keygen)
    keygen.add_argument("--out", metavar="FILE",
                        help=f"where to write the private key (default {keys.DEFAULT_KEY})")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")
    return parser


def _add_site_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``site add|ls|status|rm``: flags go after the subcommand."""
    site = sub.add_parser("site", help="Manage edge sites and their relays",
                          description="Site relays (see docs/edge-sites.rst).")
    site.set_defaults(func=_no_site_command, json=False, debug=False)
    commands = site.add_subparsers(dest="site_command", metavar="SUBCOMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], Output]) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").strip()
        command = commands.add_parser(name, parents=[common], help=summary(doc),
                                      description=doc)
        command.set_defaults(func=func)
        return command

    add_cmd = add("add", cmd_site_add)
    add_cmd.add_argument("name", metavar="NAME", help="the site's name, e.g. greenhouse")
    add_cmd.add_argument("--relay", metavar="URL", required=True,
                         help="the relay, http://ADMIN:PASSWORD@relay:5984 (Apache CouchDB)")
    add_cmd.add_argument("--nodes", metavar="SEL",
                         help="MAC ids or names, or labels key=value (a node needs all), "
                              "separated by commas (default: as given before)")
    add_cmd.add_argument("--central-url", metavar="URL",
                         help="the central server as the relay reaches it (default: "
                              "--server; without credentials it takes --server's)")
    add("ls", cmd_site_ls)
    for name, func in (("status", cmd_site_status), ("rm", cmd_site_rm)):
        one = add(name, func)
        one.add_argument("name", metavar="NAME", help="the site's name")
        one.add_argument("--relay", metavar="URL",
                         help="the relay with an admin's credentials (default: the "
                              "registry's URL with --server's credentials)")


def main(argv: Optional[Sequence[str]] = None, *,
         broadcast: Optional[discovery.Broadcast] = None,
         environ: Optional[Mapping[str, str]] = None) -> int:
    """Run ``himbeere-upload``; returns the exit code.

    ``broadcast`` replaces :func:`himbeere.discovery.broadcast_message` and
    ``environ`` the environment (tests).  A reader that closes the pipe early
    (``himbeere-upload ls | head -1``) ends it quietly, as it does Unix tools.
    """
    from himbeere.cli import quiet_broken_pipe

    return quiet_broken_pipe(lambda: _main(argv, broadcast, environ))


def _main(argv: Optional[Sequence[str]], broadcast: Optional[discovery.Broadcast],
          environ: Optional[Mapping[str, str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    args.broadcast = broadcast
    args.environ = os.environ if environ is None else environ
    try:
        result, lines = args.func(args)
    except BrokenPipeError:
        raise  # not an error of ours: main() ends quietly
    except (HimbeereError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        if args.json:
            print(json.dumps({"ok": False, "error": message}))
        else:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        payload = dict(result) if isinstance(result, dict) else {"result": result}
        payload.setdefault("ok", True)
        print(json.dumps(payload, sort_keys=True))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

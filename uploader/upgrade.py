"""``himbeere-upload upgrade``: a new daemon for the fleet, and where each node is with it.

``upgrade --wheel dist/himbeerecouch-X-py3-none-any.whl`` stores the wheel
as the attachment of the daemon release ``daemon:X`` (code database), with
its ``version``, ``sha256`` and ``targets``, signed like a program when a
signing key is found (the signature covers the version and the SHA-256),
and points ``daemon:current`` at it.  Each node's feed hands it the pointer;
the node installs the release beside its running daemon and restarts into
it through the launcher, which reverts it if it does not come up
(:mod:`himbeere.upgrade`, :mod:`himbeere.launch`, docs/upgrading.rst).

``upgrade --status`` shows, per node, its daemon version and where it is
with the current release: ``upgraded``, ``pending``, ``reverted`` (and
why), ``not yet``, or ``not targeted``.

``upgrade --wheel W --rollout 1,25%,100% [--healthy-for 60s]`` goes out
in waves: it creates the daemon rollout ``rollout:daemon:<version>``
(status database; the program rollouts' document with ``"kind":
"daemon"``, :func:`himbeere.fleet.rollout.daemon_rollout`) before it points
``daemon:current`` at the release with ``"rollout": <its id>``.  The
scheduler's leader drives it like a program's; each node installs the
release only once admitted, and goes back when it is rolled back
(:mod:`himbeere.upgrade`).  ``himbeere rollouts`` lists it.  A new
upgrade supersedes a daemon rollout still under way: it is aborted.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

from himbeere import launch, schema
from himbeere.couch import Doc
from himbeere.exceptions import ConfigError, HimbeereError
from himbeere.fleet.rollout import daemon_rollout, daemon_rollout_id, is_daemon, is_final

from . import keys, ops, rollouts
from .fleet import Fleet, parse_labels

#: ``__version__ = "..."`` in himbeere/__init__.py of the wheel.
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)
DISTRIBUTION = "himbeerecouch"
Output = tuple[Any, list[str]]


def cmd_upgrade(args: argparse.Namespace) -> Output:
    """Upgrade the nodes' daemon from a himbeerecouch wheel.

    The wheel goes into the code database as daemon release daemon:VERSION,
    signed when a signing key is found; every targeted node installs it
    beside its running daemon and restarts into it through its launcher,
    which takes it back if it does not come up.  --status shows each node's
    daemon version and its state: upgraded, pending, reverted or not yet.
    """
    fleet: Fleet = args.open_fleet(args)
    if args.status:
        return status_output(fleet)
    if not args.wheel:
        raise ConfigError("--wheel FILE is missing: a wheel of himbeerecouch (pip wheel "
                          "--no-deps -w dist .); or --status")
    plan = None
    if args.rollout:
        plan = rollouts.Plan.parse(args.rollout, args.healthy_for)
    elif args.healthy_for:
        raise ConfigError("--healthy-for is for staged upgrades; add --rollout WAVES, "
                          "e.g. --rollout 1,25%,100%")
    targets: Any = "all"
    if args.label:
        targets = {"labels": parse_labels(args.label)}
    signing_key = keys.find(args.signing_key, args.environ)
    result = publish(fleet, Path(args.wheel), targets, signing_key, plan)
    line = (f"{result['action']} {result['id']} ({result['size']} bytes, sha256 "
            f"{result['sha256'][:16]}), daemon:current -> {result['version']}, targets "
            f"{schema.targets_text(targets)}")
    if signing_key is not None:
        line += f", signed by {signing_key.key_id}"
    lines = [line]
    if plan is not None:
        lines.append(f"rollout {result['rollout']}: waves {','.join(plan.waves)}, healthy "
                     f"for {plan.healthy_for:g} s; `himbeere rollout {result['rollout']}` "
                     "follows it")
    return result, lines + ["follow it with: himbeere-upload upgrade --status"]


def add_flags(command: argparse.ArgumentParser, open_fleet: Callable[..., Fleet]) -> None:
    """The flags of ``upgrade``; ``open_fleet(args)`` is the CLI's."""
    command.set_defaults(open_fleet=open_fleet)
    command.add_argument("--wheel", metavar="FILE",
                         help="a wheel of himbeerecouch: dist/himbeerecouch-X-py3-none-any.whl")
    command.add_argument("--label", metavar="KEY=VALUE", action="append",
                         help="only nodes with this label upgrade (repeat: all of them; "
                              "default: every node)")
    command.add_argument("--rollout", metavar="WAVES",
                         help="go out in waves, e.g. 1,25%%,100%% (cumulative node counts or "
                              "percentages); a failure rolls the reached nodes back")
    command.add_argument("--healthy-for", metavar="DURATION",
                         help="with --rollout: how long each wave must run the new daemon "
                              f"cleanly (default {rollouts.DEFAULT_HEALTHY_FOR}; s, m, h)")
    command.add_argument("--signing-key", metavar="FILE",
                         help=f"sign with this key ({keys.ENV}; default {keys.DEFAULT_KEY} "
                              "if it exists)")
    command.add_argument("--status", action="store_true",
                         help="show each node's daemon version and upgrade state")


# -- publishing ---------------------------------------------------------------------------
def wheel_version(path: Path, data: bytes) -> str:
    """The ``__version__`` inside the wheel ``data``, checked against its file name."""
    name = path.name
    parts = name[:-len(".whl")].split("-") if name.endswith(".whl") else []
    if len(parts) < 5 or parts[0] != DISTRIBUTION:
        raise ConfigError(f"{name}: not a wheel of {DISTRIBUTION} "
                          f"({DISTRIBUTION}-VERSION-py3-none-any.whl)")
    try:
        import io

        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            init = wheel.read("himbeere/__init__.py").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: not a wheel holding himbeere/__init__.py ({exc})") from None
    match = _VERSION_LINE.search(init)
    if match is None:
        raise ConfigError(f"{name}: himbeere/__init__.py has no __version__ line")
    version = match.group(1)
    if not launch.valid_version(version):
        raise ConfigError(f"{name}: version {version!r} cannot name a version directory; "
                          "allowed: letters, digits, '.+-_'")
    return version


def publish(fleet: Fleet, wheel: Path, targets: Any,
            signing_key: Optional[keys.SigningKey] = None,
            plan: Optional[rollouts.Plan] = None) -> Doc:
    """Write the release of ``wheel`` and point ``daemon:current`` at it; with a
    ``plan``, through a staged rollout (created before the pointer names it)."""
    data = wheel.read_bytes()
    version = wheel_version(wheel, data)
    digest = hashlib.sha256(data).hexdigest()
    fleet.require_database(fleet.code)
    release_id = schema.daemon_release_id(version)
    doc: Doc = fleet.code.get(release_id) or {"_id": release_id}
    if doc.get("sha256") not in (None, digest):
        raise HimbeereError(f"{release_id} exists with another wheel (sha256 "
                            f"{str(doc.get('sha256'))[:16]}); nodes that installed it would "
                            "not install this one: give the new wheel a new version")
    action = "updated" if "_rev" in doc else "stored"
    doc.update({"type": schema.DAEMON_RELEASE_TYPE, "version": version, "sha256": digest,
                "wheel": wheel.name, "size": len(data), "targets": targets,
                "created": doc.get("created") or schema.iso(), "created_by": fleet.user})
    doc.pop("signature", None)
    if signing_key is not None:
        keys.sign(doc, signing_key)  # the last step: it covers every field set before
    doc.pop("_attachments", None)
    saved = fleet.code.save_with_attachment(doc, schema.DAEMON_WHEEL, data,
                                            "application/zip")
    pointer = fleet.code.get(schema.DAEMON_CURRENT_ID) or {"_id": schema.DAEMON_CURRENT_ID}
    previous = pointer.get("version")
    previous = previous if previous != version else pointer.get("previous")
    supersede(fleet, pointer.get("rollout"), version)
    rid = None
    if plan is not None:
        rid = start_rollout(fleet, version, previous, plan)
    pointer.update({"type": schema.DAEMON_CURRENT_TYPE, "version": version,
                    "previous": previous, "rollout": rid,
                    "updated": schema.iso(), "updated_by": fleet.user})
    fleet.code.save(pointer)
    return {"action": action, "id": release_id, "rev": saved["_rev"], "version": version,
            "sha256": digest, "size": len(data), "targets": targets, "rollout": rid,
            "key": signing_key.key_id if signing_key is not None else None}


def start_rollout(fleet: Fleet, version: str, previous: Optional[str],
                  plan: rollouts.Plan) -> str:
    """Create the daemon rollout of ``version`` (afresh if one exists); its id."""
    rollout = daemon_rollout(version, previous if isinstance(previous, str) else None,
                             plan.waves, plan.healthy_for, fleet.user, schema.iso())
    old = fleet.status.get(rollout["_id"])
    if old is not None:  # the same version again: its rollout starts over
        rollout["_rev"] = old["_rev"]
    fleet.status.save(rollout)
    return str(rollout["_id"])


def supersede(fleet: Fleet, rid: Any, version: str) -> None:
    """Abort the daemon rollout ``rid`` (the pointer's before this upgrade) if it is
    still under way: nodes follow the new pointer, and no leader should drive it on."""
    old = fleet.status.get(rid) if isinstance(rid, str) else None
    if old is None or not is_daemon(old) or is_final(old) or old.get("release") == version:
        return
    now = schema.iso()
    why = f"superseded by {schema.daemon_release_id(version)}"
    fleet.status.save(dict(old, state=schema.RolloutState.ABORTED.value, updated=now,
                           finished=now, requested={"action": "abort", "by": fleet.user,
                                                    "at": now},
                           failure={"mac": None, "doc": None, "state": "aborted",
                                    "error": None, "why": why, "at": now}))


# -- following it -------------------------------------------------------------------------
def node_state(node: Doc, version: Optional[str], targeted: bool) -> tuple[str, str]:
    """``(state, detail)`` of one node (an :func:`uploader.ops.list_nodes` entry)."""
    upgrade = node.get("upgrade") if isinstance(node.get("upgrade"), dict) else {}
    assert isinstance(upgrade, dict)
    if version is None:
        return "-", ""
    if upgrade.get("version") == version and upgrade.get("state") == "reverted":
        return "reverted", str(upgrade.get("reason") or "")
    if node.get("daemon_version") == version:
        return "upgraded", ""
    if upgrade.get("version") == version and upgrade.get("state") == "pending":
        return "pending", ""
    if upgrade.get("waiting") and upgrade.get("rollout") == daemon_rollout_id(version):
        return "waiting", str(upgrade["waiting"])
    if not targeted:
        return "not targeted", ""
    return "not yet", str(upgrade.get("error") or "") if upgrade else ""


def status(fleet: Fleet) -> Doc:
    """The current release, and per node: version and state."""
    pointer = fleet.code.get(schema.DAEMON_CURRENT_ID) or {}
    version = pointer.get("version") if isinstance(pointer.get("version"), str) else None
    release = fleet.code.get(schema.daemon_release_id(version)) if version else None
    targets = (release or {}).get("targets", "all")
    rows = []
    for node in ops.list_nodes(fleet):
        targeted = schema.targets_labels(targets, node["node"], node.get("labels") or {})
        state, detail = node_state(node, version, targeted)
        rows.append({"node": node["node"], "name": node.get("name"),
                     "daemon_version": node.get("daemon_version"), "state": state,
                     "detail": detail, "node_state": node.get("state")})
    rid = pointer.get("rollout")
    rollout = fleet.status.get(rid) if isinstance(rid, str) else None
    return {"version": version, "targets": targets, "nodes": rows,
            "rollout": rollouts.summary(rollout) if rollout else None,
            "rollout_line": rollouts.progress_line(rollout) if rollout else None}


def status_output(fleet: Fleet) -> Output:
    result = status(fleet)
    if result["version"] is None:
        return result, ["no daemon release yet: himbeere-upload upgrade --wheel FILE"]
    counts: dict[str, int] = {}
    for row in result["nodes"]:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    head = (f"daemon:current -> {result['version']} (targets "
            f"{schema.targets_text(result['targets'])}): "
            + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no nodes"))
    rows = [[str(r["node"]), r["name"] or "-", r["daemon_version"] or "-", r["state"],
             r["node_state"] or "-", r["detail"]] for r in result["nodes"]]
    if result["rollout_line"]:
        head += f"\nrollout {result['rollout_line']}"
    return result, [head, *_table(["MAC ID", "NAME", "VERSION", "STATE", "NODE", "DETAIL"],
                                  rows)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns as the CLI's tables have them (uploader.cli imports this module)."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header] + rows]

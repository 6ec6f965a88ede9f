"""``himbeere rollouts`` and ``himbeere rollout ID [--pause|--resume|--abort]``.

The commands' own module, registered by :func:`uploader.opscli.register`;
the work is :mod:`uploader.rollouts`'.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from himbeere.exceptions import ConfigError

from . import rollouts
from .cli import table
from .fleet import Fleet

Add = Callable[..., argparse.ArgumentParser]


def cmd_rollouts(args: argparse.Namespace, fleet: Fleet) -> int:
    """Staged rollouts, newest first: program (or daemon), release, state, wave, nodes."""
    found = rollouts.listing(fleet)
    if args.json:
        print(json.dumps({"ok": True, "rollouts": found}, sort_keys=True))
        return 0
    if not found:
        print("no rollouts (himbeere-upload push PATH --rollout 1,25%,100% starts one; "
              "upgrade --wheel W --rollout ... one of the daemon)")
        return 0
    rows = [[r["id"], str(r["name"]), str(r["release"]), str(r["state"]),
             f"{r['wave']}/{r['waves']}", f"{r['ok']}/{r['admitted']}",
             ",".join(str(m) for m in r["failed"]) or "-", str(r["nodes"]),
             str(r["updated"] or "-")] for r in found]
    print("\n".join(table(["ROLLOUT", "PROGRAM", "RELEASE", "STATE", "WAVE", "OK",
                           "FAILED", "NODES", "UPDATED"], rows)))
    return 0


def cmd_rollout(args: argparse.Namespace, fleet: Fleet) -> int:
    """One staged rollout: its waves, each node's release and health, and why it failed.

    --pause stops new waves (failures still roll back), --resume goes on,
    --abort sends every node back to the previous release.
    """
    actions = [a for a in ("pause", "resume", "abort") if getattr(args, a)]
    if len(actions) > 1:
        raise ConfigError("--pause, --resume and --abort: one at a time")
    if actions:
        changed = rollouts.steer(fleet, args.id, actions[0])
        if args.json:
            print(json.dumps(dict(changed, ok=True), sort_keys=True))
        else:
            print(f"{changed['id']}: {changed['state']}")
        return 0
    shown = rollouts.show(fleet, args.id)
    if args.json:
        print(json.dumps(dict(shown, ok=True), sort_keys=True, default=str))
        return 0
    print("\n".join(format_rollout(shown)))
    return 0


def format_rollout(shown: dict[str, Any]) -> list[str]:
    what = "daemon version" if shown.get("kind") == "daemon" else f"{shown['name']} release"
    lines = [f"{shown['id']}: {what} {shown['release']} "
             f"(previous {shown['previous_release']}), {shown['state']}, wave "
             f"{shown['wave']}/{shown['waves']}, healthy for {shown['healthy_for']:g} s"]
    failure = shown.get("failure") or {}
    if failure.get("why"):
        lines.append(f"failure: {failure['why']}")
        for line in str(failure.get("error") or "").rstrip().splitlines():
            lines.append(f"  {line}")
    if shown.get("requested"):
        req = shown["requested"]
        lines.append(f"requested: {req.get('action')} by {req.get('by')} at {req.get('at')}")
    lines += table(["WAVE", "SIZE", "NODES", "STARTED"],
                   [[str(w["wave"]), str(w["size"]), str(w["nodes"] or "-"),
                     str(w["started"] or "-")] for w in shown["wave_list"]])
    rows = [[str(n["node"]), str(n["admitted"] or "-"), str(n["release"]),
             str(n["program"] or "-"), str(n["restarts"]), n["health"],
             "yes" if n["healthy"] else "no"] for n in shown["node_list"]]
    if rows:
        lines += table(["NODE", "ADMITTED", "RELEASE", "STATE", "RESTARTS", "NODE STATE",
                        "HEALTHY"], rows)
    else:
        lines.append("no node wants the daemon version yet" if shown.get("kind") == "daemon"
                     else "no node runs the program yet")
    return lines


def register(add: Add) -> None:
    """Add the two commands with opscli's ``add`` (its common flags and error handling)."""
    add("rollouts", cmd_rollouts)
    one = add("rollout", cmd_rollout)
    one.add_argument("id", metavar="ID", help="rollout id (rollout:NAME:N, or NAME:N)")
    steer = one.add_mutually_exclusive_group()
    steer.add_argument("--pause", action="store_true", help="start no new wave")
    steer.add_argument("--resume", action="store_true", help="go on with the waves")
    steer.add_argument("--abort", action="store_true",
                       help="stop it; every node goes back to the previous release")

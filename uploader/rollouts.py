"""Staged rollouts from the laptop: start one with a push, follow it, steer it.

``push --rollout 1,25%,100% --healthy-for 60s`` calls :func:`prepare`
as the last step before it writes the program document; the
fleet's scheduler drives the rollout from there (:mod:`himbeere.fleet.rollout`).
:func:`listing`, :func:`show`, :func:`steer` and :func:`wait` serve
``himbeere rollouts``, ``himbeere rollout ID`` and ``push --wait``.
They show daemon rollouts (``himbeere-upload upgrade --rollout``, ``kind``
``daemon``) too: a node's release is its ``daemon_version`` there, and its
state the upgrader's (``upgrade`` in its status).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any, Optional

from himbeere import health
from himbeere.couch import Doc
from himbeere.exceptions import ConfigError, HimbeereError, NotFound
from himbeere.fleet.rollout import FINAL, entry_of, is_daemon, upgrade_of, wave_size
from himbeere.schema import (
    RELEASE_TYPE,
    ROLLOUT_PREFIX,
    ROLLOUT_TYPE,
    STATUS_PREFIX,
    RolloutState,
    iso,
    mac_of,
    release_id,
    rollout_id,
)

from .fleet import Fleet

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DEFAULT_HEALTHY_FOR = "60s"


class RolloutFailed(HimbeereError, RuntimeError):
    """A rollout that ``--wait`` followed ended rolled back or aborted."""


# -- parsing the flags -------------------------------------------------------------------
def parse_waves(text: str) -> list[str]:
    """``"1,25%,100%"`` as ``["1", "25%", "100%"]``; one-line errors otherwise."""
    allowed = ("allowed: node counts or percentages, cumulative and growing, separated by "
               "commas, the last one 100%, e.g. 1,25%,100%")
    waves = [part.strip() for part in str(text).split(",")]
    if not waves or any(not w for w in waves):
        raise ConfigError(f"--rollout {text!r} has an empty wave; {allowed}")
    last_percent, last_count = 0.0, 0
    for wave in waves:
        try:
            if wave.endswith("%"):
                value = float(wave[:-1])
                ok = 0 < value <= 100 and value > last_percent
                last_percent = value
            else:
                count = int(wave)
                ok = count > last_count
                last_count = count
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--rollout {text!r}: wave {wave!r} is not allowed; {allowed}")
    if waves[-1] != "100%" and not (waves[-1].endswith("%") and float(waves[-1][:-1]) == 100):
        raise ConfigError(f"--rollout {text!r}: the last wave must be 100% (every node); "
                          f"{allowed}")
    return waves[:-1] + ["100%"]


def parse_duration(text: str, flag: str = "--healthy-for") -> float:
    """``"60s"``, ``"2m"``, ``"1h"``, ``"500ms"`` or plain seconds, as seconds."""
    match = DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{flag} {text!r} is not allowed; allowed: a number with s, m, h "
                          "or ms, e.g. 60s, 2m, 1h")
    return float(match.group(1)) * UNITS[match.group(2)]


@dataclasses.dataclass
class Plan:
    """What ``push --rollout`` asked for."""

    waves: list[str]
    healthy_for: float

    @classmethod
    def parse(cls, waves: str, healthy_for: Optional[str]) -> Plan:
        return cls(parse_waves(waves), parse_duration(healthy_for or DEFAULT_HEALTHY_FOR))


# -- starting one with a push ------------------------------------------------------------
def previous_release(existing: Optional[Doc]) -> Optional[int]:
    """The release the nodes run now: the current document's (0 for one pushed before
    releases were numbered), None for a new program."""
    if existing is None:
        return None
    number = existing.get("release", 0)
    return number if isinstance(number, int) and not isinstance(number, bool) else 0


def keep_previous(fleet: Fleet, name: str, existing: Optional[Doc]) -> None:
    """Make sure the nodes not yet reached find the release they run now.

    Every push writes its release record (:mod:`uploader.releases`); a
    document written before releases existed (or by hand) has none, so it
    is recorded here as release 0, as it is.
    """
    number = previous_release(existing)
    if existing is None or number is None or fleet.code.get(release_id(name, number)):
        return
    body = {k: v for k, v in existing.items() if k == "_id" or not k.startswith("_")}
    fleet.code.save({"_id": release_id(name, number), "type": RELEASE_TYPE, "name": name,
                     "release": number, "pushed_by": None, "pushed_at": None,
                     "key": (existing.get("signature") or {}).get("key"),
                     "docs": {existing["_id"]: body}, "rollout": None,
                     "source": "written before releases were numbered", "changes": []})


def prepare(fleet: Fleet, name: str, wanted: Doc, previous: Optional[int], plan: Plan) -> str:
    """Mark ``wanted`` (its release already numbered) as rolled out, and create its rollout.

    Called from the push's last step before the document is written, so that
    a node that gets the program document always finds its rollout.  Returns
    the rollout's id.
    """
    rid = rollout_id(name, int(wanted["release"]))
    wanted["rollout"] = rid
    wanted["previous_release"] = previous
    now = iso()
    rollout: Doc = {
        "_id": rid, "type": ROLLOUT_TYPE, "name": name, "release": wanted["release"],
        "previous_release": previous, "docs": [wanted["_id"]],
        "waves": plan.waves, "healthy_for": plan.healthy_for,
        "state": RolloutState.RUNNING.value, "nodes": [], "wave": -1, "wave_started": [],
        "admitted": {}, "health": {}, "failure": None, "requested": None,
        "created": now, "created_by": fleet.user, "updated": now, "finished": None,
        "driver": None}
    old = fleet.status.get(rid)
    if old is not None:  # a push that failed after creating it: start afresh
        rollout["_rev"] = old["_rev"]
    fleet.status.save(rollout)
    return rid


def discard(fleet: Fleet, rid: Optional[str]) -> None:
    """Delete rollout ``rid`` that a push created but did not use (its release number
    was taken by another push, or the push failed after it)."""
    doc = fleet.status.get(rid) if rid else None
    if doc is not None:
        fleet.status.delete(doc)


# -- following and steering --------------------------------------------------------------
def get(fleet: Fleet, rid: str) -> Doc:
    rid = rid if rid.startswith(ROLLOUT_PREFIX) else ROLLOUT_PREFIX + rid
    doc = fleet.status.get(rid)
    if doc is None:
        raise NotFound(f"no rollout {rid}; `himbeere rollouts` lists them")
    return doc


def listing(fleet: Fleet) -> list[Doc]:
    """Every rollout, newest first, summed up."""
    rows = fleet.status.all_docs(startkey=ROLLOUT_PREFIX, endkey=ROLLOUT_PREFIX + "\ufff0",
                                 include_docs=True)
    docs = [row["doc"] for row in rows if row.get("doc")]
    docs.sort(key=lambda d: str(d.get("created") or ""), reverse=True)
    return [summary(doc) for doc in docs]


def summary(doc: Doc) -> Doc:
    health_of = doc.get("health") or {}
    admitted = doc.get("admitted") or {}
    failure = doc.get("failure") or {}
    return {"id": doc["_id"], "kind": doc.get("kind") or "program", "name": doc.get("name"),
            "release": doc.get("release"),
            "previous_release": doc.get("previous_release"), "state": doc.get("state"),
            "wave": int(doc.get("wave", -1)) + 1, "waves": len(doc.get("waves") or []),
            "nodes": len(doc.get("nodes") or []), "admitted": len(admitted),
            "ok": sum(1 for k in admitted if (health_of.get(k) or {}).get("healthy")),
            "failed": [failure["mac"]] if failure.get("mac") is not None else [],
            "created": doc.get("created"), "updated": doc.get("updated"),
            "finished": doc.get("finished")}


def show(fleet: Fleet, rid: str) -> Doc:
    """One rollout: its document, its waves and each node's release and health."""
    doc = get(fleet, rid)
    statuses = _statuses(fleet)
    docs = [str(d) for d in doc.get("docs") or []]
    nodes = []
    for mac in doc.get("nodes") or []:
        status = statuses.get(int(mac))
        if is_daemon(doc):
            entry = _daemon_entry(status, doc)
        else:
            found = entry_of(status, docs)
            entry = found[1] if found else {}
        seen = (doc.get("health") or {}).get(str(mac)) or {}
        nodes.append({"node": int(mac), "admitted": (doc.get("admitted") or {}).get(str(mac)),
                      "release": entry.get("release"), "program": entry.get("state"),
                      "restarts": entry.get("restarts"),
                      "health": health.node_state(status), "healthy": bool(seen.get("healthy")),
                      "since": seen.get("since"), "why": entry.get("rollout")})
    waves = []
    for index, wave in enumerate(doc.get("waves") or []):
        started = doc.get("wave_started") or []
        waves.append({"wave": index + 1, "size": wave,
                      "nodes": wave_size(wave, len(nodes)) if nodes else None,
                      "started": started[index] if index < len(started) else None})
    return dict(summary(doc), rollout=doc, node_list=nodes, wave_list=waves,
                healthy_for=doc.get("healthy_for"), failure=doc.get("failure"),
                requested=doc.get("requested"))


def _daemon_entry(status: Optional[Doc], doc: Doc) -> Doc:
    """A node of a daemon rollout, as a program's status entry would show it."""
    upgrade = upgrade_of(status)
    state = (status or {}).get("state")
    if upgrade.get("version") == doc.get("release") and upgrade.get("state") == "reverted":
        state = "reverted"
    elif upgrade.get("waiting"):
        state = "waiting"
    return {"release": (status or {}).get("daemon_version"), "state": state,
            "restarts": None, "rollout": upgrade.get("waiting") or upgrade.get("reason")}


def _statuses(fleet: Fleet) -> dict[int, Doc]:
    rows = fleet.status.all_docs(startkey=STATUS_PREFIX, endkey=STATUS_PREFIX + "\ufff0",
                                 include_docs=True)
    found = {}
    for row in rows:
        doc = row.get("doc") or {}
        mac = mac_of(str(doc.get("_id")), STATUS_PREFIX)
        if mac is not None:
            found[mac] = doc
    return found


STEER = {"pause": (RolloutState.RUNNING, RolloutState.PAUSED),
         "resume": (RolloutState.PAUSED, RolloutState.RUNNING),
         "abort": (None, RolloutState.ABORTED)}


def steer(fleet: Fleet, rid: str, action: str) -> Doc:
    """Pause, resume or abort a rollout; the state changes at once (compare-and-swap)."""
    doc = get(fleet, rid)
    needs, becomes = STEER[action]

    def change(current: Doc) -> bool:
        state = str(current.get("state"))
        if state in FINAL:
            raise ConfigError(f"{current['_id']} is {state} already; only a running or "
                              "paused rollout can be paused, resumed or aborted")
        if needs is not None and state != needs.value:
            raise ConfigError(f"{current['_id']} is {state}; --{action} needs it {needs.value}")
        now = iso()
        current.update(state=becomes.value, updated=now,
                       requested={"action": action, "by": fleet.user, "at": now})
        if becomes is RolloutState.ABORTED:
            current["finished"] = now
            current["failure"] = {"mac": None, "doc": None, "state": "aborted", "error": None,
                                  "why": f"aborted by {fleet.user or 'an admin'}", "at": now}
        return True

    saved = fleet.status.update(doc["_id"], change)
    outcome(fleet, saved or doc)
    return summary(saved or doc)


def outcome(fleet: Fleet, doc: Doc) -> None:
    """Write a final rollout's state into its release record (``outcome``), once."""
    state = str(doc.get("state"))
    if state not in FINAL or is_daemon(doc):
        return  # a daemon release has no release record: its rollout document says it
    rid = release_id(str(doc.get("name")), int(doc.get("release") or 0))

    def change(record: Doc) -> bool:
        if record.get("type") != RELEASE_TYPE or record.get("outcome") == state:
            return False
        record["outcome"] = state
        return True

    try:
        fleet.code.update(rid, change)
    except HimbeereError:
        pass  # a reader without write rights: the rollout document says it anyway


def progress_line(doc: Doc) -> str:
    s = summary(doc)
    line = (f"{s['id']}: {s['state']}, wave {s['wave']}/{s['waves']}, "
            f"{s['ok']}/{s['admitted']} admitted healthy, {s['nodes']} nodes")
    failure = doc.get("failure") or {}
    if failure.get("why"):
        line += f"; {failure['why']}"
    return line


def wait(fleet: Fleet, rid: str, say: Callable[[str], None], poll: float = 1.0,
         timeout: Optional[float] = None) -> Doc:
    """Until the rollout is final; ``say`` each change.  Raises on rolled-back/aborted."""
    last = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        doc = get(fleet, rid)
        line = progress_line(doc)
        if line != last:
            say(line)
            last = line
        if str(doc.get("state")) in FINAL:
            outcome(fleet, doc)
            if doc.get("state") != RolloutState.DONE.value:
                failure = doc.get("failure") or {}
                error = (failure.get("error") or "").strip().splitlines()
                raise RolloutFailed(f"{rid} {doc.get('state')}: {failure.get('why')}"
                                    + (f": {error[-1]}" if error else ""))
            return doc
        if deadline is not None and time.monotonic() > deadline:
            raise RolloutFailed(f"{rid}: still {doc.get('state')} after {timeout:g} s")
        time.sleep(poll)


# -- the push command's side -------------------------------------------------------------
def add_push_flags(parser: Any) -> None:
    group = parser.add_argument_group("staged rollout (docs: Staged rollouts)")
    group.add_argument("--rollout", metavar="WAVES",
                       help="go out in waves, e.g. 1,25%%,100%% (cumulative node counts or "
                            "percentages); a failure rolls the reached nodes back")
    group.add_argument("--healthy-for", metavar="DURATION",
                       help="how long each wave must run cleanly before the next "
                            f"(default {DEFAULT_HEALTHY_FOR}; s, m, h)")
    group.add_argument("--wait", action="store_true",
                       help="wait until the rollout is over; exit 1 if it was rolled back")


def plan_of(args: Any) -> Optional[Plan]:
    """The rollout ``push``'s flags ask for, or None; one-line errors."""
    if args.rollout is None:
        if args.healthy_for is not None or args.wait:
            raise ConfigError("--healthy-for and --wait are for staged rollouts; add "
                              "--rollout WAVES, e.g. --rollout 1,25%,100%")
        return None
    if args.is_global:
        raise ConfigError("--rollout is for programs, not --global modules")
    return Plan.parse(args.rollout, args.healthy_for)


def started(fleet: Fleet, result: Doc, plan: Plan, lines: list[str], wait_for: bool,
            as_json: bool) -> list[str]:
    """The push's lines about its rollout; with ``wait_for``, follow it to its end."""
    rid = str(result["rollout"])
    lines = lines + [f"rollout {rid}: waves {','.join(plan.waves)}, healthy for "
                     f"{plan.healthy_for:g} s; `himbeere rollout {rid}` follows it"]
    if not wait_for:
        return lines
    say: Callable[[str], None] = (lambda line: None) if as_json else (
        lambda line: print(line, flush=True))
    for line in lines:
        say(line)
    final = wait(fleet, rid, say)
    result["rollout_state"] = final.get("state")
    return [f"{rid}: done"] if not as_json else lines

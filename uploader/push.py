"""Code documents from files and back: ``push``, ``pull``, ``ls`` and ``rm``.

``push PATH --node NODE`` turns a ``.py`` file into ``code``; a folder's
``main.py`` into ``code`` and its other top-level ``.py`` files into
``modules``.  ``--global`` turns the file or every ``.py`` file of the
folder into ``global_modules``, exported to every program.  ``--placed`` makes a
placed program (``type: "himbeere-placed"``, see :mod:`himbeere.fleet.placement`):
the fleet picks its nodes, within its ``replicas``, ``labels`` and
``requires`` (:class:`Placed`).  ``--all`` or ``--label key=value``
(without ``--placed``) makes one program for many nodes (``type:
"himbeere-program"``, see :mod:`himbeere.fleet.targeting`): every node
whose labels match its ``targets`` runs it.

A program's document id is ``<macid>:<name>``; a global one's is
``global:<name>``, a placed one's ``placed:<name>``, one for many nodes
``program:<name>``.  Push first looks the
program up by node and name (the ``programs`` view, where a placed program's
node is ``"himbeere-placed"``), so a document written by HimbeereCouch or by
hand, with another id, is updated rather than doubled.  A push that changes
nothing writes nothing, so the program does not restart.  Every push that
writes is a numbered release of the program (:mod:`uploader.releases`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from himbeere import defaults
from himbeere.codedoc import MAIN, PLACED_TYPE
from himbeere.couch import Doc
from himbeere.exceptions import ConfigError, NotFound, ProgramError
from himbeere.fleet import placement, scheduler
from himbeere.schema import (
    PROGRAM_TYPE,
    STATUS_PREFIX,
    global_id,
    lease_id,
    mac_of,
    placed_id,
    program_id,
    status_id,
    targeted_id,
    targets_text,
)

from . import releases, rollouts
from .fleet import Fleet, parse_labels
from .keys import SigningKey, sign

SUFFIX = ".py"
#: The function the node calls in a program's main module.
ENTRY = "main"
PROGRAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: Fields a program push owns; a global push owns ``global_modules``.
PROGRAM_FIELDS = ("code", "modules")
#: What ``requires`` of a placed program may hold (megabytes).
REQUIRES = ("ram_mb", "disk_mb")
#: The node column of a placed program in ``ls``.
PLACED = "placed"
#: What a program for many nodes may target (``targets``), as push writes it.
Targets = Any


@dataclasses.dataclass
class Source:
    """Modules read from a file or folder, ready to become a document."""

    name: str
    modules: dict[str, str]
    is_global: bool
    ignored: list[str] = dataclasses.field(default_factory=list)

    def fields(self) -> Doc:
        if self.is_global:
            return {"global_modules": dict(self.modules)}
        fields: Doc = {"code": self.modules[MAIN]}
        others = {k: v for k, v in self.modules.items() if k != MAIN}
        if others:
            fields["modules"] = others
        return fields


@dataclasses.dataclass(frozen=True)
class Placed:
    """Where a placed program may run, as ``push --placed`` was told.

    ``replicas`` None keeps the document's (a new one gets 1).  ``labels``
    and ``requires`` change only the keys given; an empty label value or a
    None requirement removes that key.
    """

    replicas: Optional[int] = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    requires: dict[str, Optional[float]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, replicas: Optional[str] = None, labels: Iterable[str] = (),
              requires: Iterable[str] = ()) -> Placed:
        """From the command line: ``"2"``, ``["room=lab1"]``, ``["ram_mb=200"]``."""
        return cls(replicas=None if replicas is None else parse_replicas(replicas),
                   labels=parse_labels(list(labels)), requires=parse_requires(requires))

    def apply(self, doc: Doc, new: bool) -> None:
        """Set ``replicas``, ``labels`` and ``requires`` of ``doc`` in place."""
        if self.replicas is not None:
            doc["replicas"] = self.replicas
        elif new:
            doc["replicas"] = 1
        for key, given in (("labels", self.labels), ("requires", self.requires)):
            if not given:
                continue  # a document written by hand keeps its field as it is
            current = doc.get(key)
            merged = dict(current) if isinstance(current, dict) else {}
            for name, value in given.items():
                if value is None or value == "":
                    merged.pop(name, None)
                else:
                    merged[name] = value
            if merged:
                doc[key] = merged
            else:
                doc.pop(key, None)


def parse_replicas(text: str) -> int:
    if not text.strip().isdigit():
        raise ConfigError(f"--replicas {text!r} is not allowed; allowed: a whole number >= 0 "
                          "(0 runs it nowhere)")
    return int(text)


def parse_requires(items: Iterable[str]) -> dict[str, Optional[float]]:
    """``["ram_mb=200", "disk_mb="]`` as ``{"ram_mb": 200, "disk_mb": None}``."""
    result: dict[str, Optional[float]] = {}
    for text in items:
        key, sep, value = str(text).partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"--requires {text!r} is not allowed; allowed: ram_mb=MB or "
                              "disk_mb=MB (ram_mb= removes it)")
        if key not in REQUIRES:
            raise ConfigError(f"--requires {key!r} is not allowed; allowed: "
                              + ", ".join(REQUIRES))
        if not value:
            result[key] = None
            continue
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"--requires {key}={value} is not allowed; allowed: megabytes, "
                              "a number >= 0")
        result[key] = int(number) if number.is_integer() else number
    return result


def doc_id(node: Optional[int], name: str, placed: bool = False,
           targeted: bool = False) -> str:
    if targeted:
        return targeted_id(name)
    if placed:
        return placed_id(name)
    return global_id(name) if node is None else program_id(node, name)


def check_program_name(name: str) -> str:
    if not PROGRAM_NAME.match(name):
        raise ConfigError(
            f"program name {name!r} is not allowed; allowed: a letter or digit, then letters, "
            "digits, '.', '_' or '-', at most 100 characters (use --name)"
        )
    return name


# -- reading files -------------------------------------------------------------------
def read_source(path: Path, is_global: bool = False, name: Optional[str] = None) -> Source:
    """Read ``path`` (a ``.py`` file or a folder); raises for anything that is not Python.

    A program's file needs no module name when ``name`` names the program:
    it is stored as ``main``.
    """
    if not path.exists():
        raise NotFound(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path, is_global)
    if is_global or name is None:
        module = _module_name(path, hint=not is_global)
    else:
        module = _python_file(path)
    source = _read_python(path)
    if not is_global:
        _require_main(path, source)
    return Source(name=module, modules={module if is_global else MAIN: source},
                  is_global=is_global)


def _read_folder(folder: Path, is_global: bool) -> Source:
    modules: dict[str, str] = {}
    ignored: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_file() and entry.suffix == SUFFIX:
            modules[_module_name(entry)] = _read_python(entry)
        else:
            ignored.append(entry.name)
    name = folder.resolve().name
    if is_global:
        if not modules:
            raise ProgramError(f"{folder}: no .py files to push as global modules")
    elif MAIN not in modules:
        raise ProgramError(
            f"{folder}: no main.py; a program folder needs main.py with def main() "
            f"(found: {', '.join(sorted(modules)) or 'no .py files'})"
        )
    else:
        _require_main(folder / f"{MAIN}{SUFFIX}", modules[MAIN])
    return Source(name=name, modules=modules, is_global=is_global, ignored=ignored)


def _module_name(path: Path, hint: bool = False) -> str:
    """The module name of ``path``; ``hint``: a program's file, which --name also fixes."""
    stem = _python_file(path)
    if not stem or not all(part.isidentifier() for part in stem.split(".")):
        fix = "rename the file"
        if hint:
            fix += f", or give --name {re.sub(r'[^A-Za-z0-9_]', '_', stem) or 'NAME'}"
        raise ProgramError(f"{path}: {stem!r} is not a Python module name; {fix}")
    return stem


def _python_file(path: Path) -> str:
    """``path``'s name without ``.py``; raises unless it ends in ``.py``."""
    if path.suffix != SUFFIX:
        raise ProgramError(
            f"{path} is not a Python file; allowed: a .py file or a folder with main.py"
        )
    return path.name[: -len(SUFFIX)]


def _require_main(path: Path, source: str) -> None:
    """Raise unless ``source`` binds ``main`` at its top level: the node calls ``main()``.

    Any top-level binding counts (``def``, ``main = ...``, ``from x import
    main``, inside an ``if`` or ``try``); ``from x import *`` might bind it.
    Checked here so the push is refused on the laptop, as a syntax error is,
    instead of the program turning up ``invalid`` on the node.
    """
    if ENTRY not in _top_level_names(ast.parse(source, str(path)).body):
        raise ProgramError(f"{path} defines no {ENTRY}(); a program needs def {ENTRY}(): ... "
                           "(the node calls it)")


def _top_level_names(body: list[ast.stmt]) -> set[str]:
    """Names bound by ``body`` outside functions and classes (``*``: a star import)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] if alias.name != "*"
                         else ENTRY for alias in node.names)
            continue
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                names.add(child.id)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                names |= _top_level_names([n for n in inner if isinstance(n, ast.stmt)])
                for handler in inner:
                    if isinstance(handler, ast.ExceptHandler):
                        names |= _top_level_names(handler.body)
    return names


def _read_python(path: Path) -> str:
    try:
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProgramError(f"{path} is not Python: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ProgramError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise ProgramError(f"{path} is not Python: line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # null bytes
        raise ProgramError(f"{path} is not Python: {exc}") from None
    return source


# -- finding documents -----------------------------------------------------------------
def _programs(fleet: Fleet, **params: Any) -> list[Doc]:
    try:
        return fleet.code.view(defaults.DESIGN, "programs", **params)
    except NotFound:
        raise NotFound(
            f"database {fleet.code.name!r} has no programs view: run "
            f"`himbeere-upload setup {fleet.server}`"
        ) from None


def _view_node(node: Optional[int], placed: bool, targeted: bool = False) -> Optional[str]:
    """The node part of a ``programs`` view key: a placed (targeted) program's ``type``."""
    if targeted:
        return PROGRAM_TYPE
    if placed:
        return PLACED_TYPE
    return None if node is None else str(node)


def _where(key_node: Any) -> str:
    """A ``programs`` view key's node, as the user says it."""
    if key_node == PLACED_TYPE:
        return PLACED
    if key_node == PROGRAM_TYPE:
        return "for many nodes"
    return "global" if key_node is None else str(key_node)


def find(fleet: Fleet, node: Optional[int], name: str, placed: bool = False,
         targeted: bool = False) -> Optional[Doc]:
    """The document of program ``name`` on ``node`` (None: global; ``placed``;
    ``targeted``: for many nodes), or None."""
    key = [_view_node(node, placed, targeted), name]
    rows = _programs(fleet, key=key, include_docs=True)
    for row in rows:
        if row["id"] == doc_id(node, name, placed, targeted):
            return row["doc"]
    return rows[0]["doc"] if rows else None


def _missing(fleet: Fleet, node: Optional[int], name: str, placed: bool = False,
             targeted: bool = False) -> NotFound:
    if targeted:
        rows = _programs(fleet, startkey=[PROGRAM_TYPE], endkey=[PROGRAM_TYPE, {}])
        where = "among the programs for many nodes"
    elif placed:
        rows = _programs(fleet, startkey=[PLACED_TYPE], endkey=[PLACED_TYPE, {}])
        where = "among the placed programs"
    elif node is None:
        rows = _programs(fleet, startkey=[None], endkey=[None, {}])
        where = "among the global modules documents"
    else:
        rows = _programs(fleet, startkey=[str(node)], endkey=[str(node), {}])
        label = fleet.name_of(node)
        where = f"on node {node}" + (f" ({label})" if label else "")
    there = ", ".join(str(row["key"][1]) for row in rows) or "none"
    return NotFound(f"no program {name!r} {where}; there are: {there}")


def _modules_of(doc: Doc, is_global: bool) -> dict[str, str]:
    if is_global:
        return dict(doc.get("global_modules") or {})
    modules = dict(doc.get("modules") or {})
    if isinstance(doc.get("code"), str):
        modules[MAIN] = doc["code"]
    return modules


# -- the commands ------------------------------------------------------------------------
def push(fleet: Fleet, path: Path, node: Optional[int], name: Optional[str] = None,
         placed: Optional[Placed] = None, targets: Optional[Targets] = None,
         rollout: Optional[rollouts.Plan] = None,
         signing_key: Optional[SigningKey] = None) -> Doc:
    """Push ``path`` to ``node`` (None: as global modules, ``placed``, or to ``targets``).

    ``targets`` makes one program for many nodes (``program:<name>``):
    ``"all"``, ``{"labels": {...}}`` or a list of MAC ids
    (:mod:`himbeere.fleet.targeting`).

    ``rollout``: go out in waves (:mod:`uploader.rollouts`).  With
    ``signing_key`` every document written is signed (:mod:`uploader.keys`).

    Returns what happened: ``action`` (created, updated, unchanged),
    ``changes`` (one line each), ``id``, ``rev``...
    """
    if placed is not None and node is not None:
        raise ConfigError("a placed program runs where the fleet puts it; drop --node")
    targeted = targets is not None
    if targeted and (node is not None or placed is not None):
        raise ConfigError("a program for many nodes runs where its targets say; drop "
                          + ("--node" if node is not None else "--placed"))
    source = read_source(path, is_global=node is None and placed is None and not targeted,
                         name=name)
    name = check_program_name(name or source.name)
    fleet.require_database(fleet.code)
    existing = find(fleet, node, name, placed is not None, targeted)
    doc: Doc = dict(existing) if existing else {
        "_id": doc_id(node, name, placed is not None, targeted)}
    old = _modules_of(doc, source.is_global)
    new_fields = source.fields()
    owned = ("global_modules",) if source.is_global else PROGRAM_FIELDS
    result: Doc = {"node": node, "placed": placed is not None, "name": name, "id": doc["_id"],
                   "ignored": source.ignored, "targets": targets}
    wanted = dict(doc)
    for key in owned:
        wanted.pop(key, None)
    wanted.update(new_fields, name=name)
    if rollout is None:
        wanted.pop("rollout", None)  # a plain push is not gated by an earlier rollout
    if node is not None and str(doc.get("type")) != str(node):
        wanted["type"] = node
    if placed is not None:
        wanted["type"] = PLACED_TYPE
        placed.apply(wanted, new=existing is None)
        try:
            scheduler.wanted(wanted)  # the scheduler's own check
        except ProgramError as exc:
            raise ConfigError(f"{doc['_id']}: {exc}") from None
    if targeted:
        wanted.update(type=PROGRAM_TYPE, targets=targets)
    signed_by = (doc.get("signature") or {}).get("key") if isinstance(
        doc.get("signature"), dict) else None
    if existing is not None and wanted == doc and (
            signing_key is None or signed_by == signing_key.key_id):
        result.update(action="unchanged", rev=doc["_rev"], changes=[],
                      release=doc.get("release"))
        return result
    if rollout is not None:
        if source.is_global:
            raise ConfigError("--rollout is for programs, not --global modules")
        rollouts.keep_previous(fleet, name, existing)
    changes = describe_changes(old, source.modules)
    if placed is not None:
        changes += describe_placement(existing, wanted)
    if targeted and (existing is None or existing.get("targets") != targets):
        before = "" if existing is None else f"{targets_text(existing.get('targets'))} -> "
        changes.append(f"targets {before}{targets_text(targets)}")

    def finish(doc: Doc) -> None:
        """``doc`` is complete here (its release numbered), just before it is written:
        whatever must come last goes here, the signature last of all."""
        if rollout is not None:
            made = result.get("rollout")
            result["rollout"] = rollouts.prepare(fleet, name, doc, rollouts.previous_release(
                existing), rollout)
            if made != result["rollout"]:
                rollouts.discard(fleet, made)  # a retry: another push took that number
        if signing_key is not None:
            sign(doc, signing_key)  # the last step: it covers every field set before
            result["key"] = signing_key.key_id

    try:
        record = releases.publish(fleet, name, [wanted], str(path.resolve()), changes, finish)
    except Exception:
        rollouts.discard(fleet, result.get("rollout"))  # no document refers to it
        raise
    result.update(action="updated" if existing else "created", rev=wanted["_rev"],
                  changes=changes, release=record["release"])
    return result


def describe_placement(old: Optional[Doc], new: Doc) -> list[str]:
    """One line per change of ``replicas``, a label or a requirement (all of them when
    ``old`` is None: a new document)."""
    if old is None:
        lines = [f"replicas {new.get('replicas', 1)}"]
        lines += [f"label {k}={v}" for k, v in sorted(_dict(new, "labels").items())]
        lines += [f"requires {k}={v}" for k, v in sorted(_dict(new, "requires").items())]
        return lines
    lines = []
    if old.get("replicas", 1) != new.get("replicas", 1):
        lines.append(f"replicas {old.get('replicas', 1)} -> {new.get('replicas', 1)}")
    for field, what in (("labels", "label"), ("requires", "requires")):
        before, after = _dict(old, field), _dict(new, field)
        for key in sorted(set(before) | set(after)):
            if key not in before:
                lines.append(f"added {what} {key}={after[key]}")
            elif key not in after:
                lines.append(f"removed {what} {key}={before[key]}")
            elif before[key] != after[key]:
                lines.append(f"changed {what} {key}: {before[key]} -> {after[key]}")
    return lines


def _dict(doc: Doc, key: str) -> dict[str, Any]:
    value = doc.get(key)
    return dict(value) if isinstance(value, dict) else {}


def describe_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per module that was added, removed or changed."""
    lines = []
    for module in sorted(set(old) | set(new)):
        file = f"{module}{SUFFIX}"
        if module not in old:
            lines.append(f"added {file} ({plural(_count(new[module]), 'line')})")
        elif module not in new:
            lines.append(f"removed {file}")
        elif old[module] != new[module]:
            plus = minus = 0
            for line in difflib.unified_diff(old[module].splitlines(),
                                             new[module].splitlines(), lineterm="", n=0):
                if line.startswith("+") and not line.startswith("+++"):
                    plus += 1
                elif line.startswith("-") and not line.startswith("---"):
                    minus += 1
            lines.append(f"changed {file} (+{plus} -{minus} lines)")
    return lines


def plural(count: int, noun: str) -> str:
    """``1 line``, ``2 lines``: the count with its noun, in the right number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _count(text: str) -> int:
    return len(text.splitlines())


def pull(fleet: Fleet, name: str, directory: Path, node: Optional[int] = None,
         is_global: bool = False, force: bool = False, placed: bool = False,
         targeted: bool = False) -> Doc:
    """Write program ``name`` out as files in ``directory``."""
    fleet.require_database(fleet.code)
    if node is not None or is_global or placed or targeted:
        doc = find(fleet, node, name, placed, targeted)
        if doc is None:
            raise _missing(fleet, node, name, placed, targeted)
    else:
        rows = [row for row in _programs(fleet) if row["key"][1] == name]
        if not rows:
            every = sorted({str(row["key"][1]) for row in _programs(fleet)})
            raise NotFound(f"no program named {name!r}; there are: {', '.join(every) or 'none'}")
        if len({row["id"] for row in rows}) > 1:
            where = ", ".join(_where(row["key"][0]) for row in rows)
            raise ConfigError(f"program {name!r} is on several nodes ({where}); "
                              "say which with --node (or --global, --placed, --targeted)")
        doc = fleet.code.get(rows[0]["id"])
        if doc is None:
            raise NotFound(f"program {name!r} was removed just now")
    files: dict[str, str] = {}
    for module, source in (doc.get("global_modules") or {}).items():
        files[f"{module}{SUFFIX}"] = source
    for module, source in _modules_of(doc, is_global=False).items():
        files[f"{module}{SUFFIX}"] = source
    if not files:
        raise ProgramError(f"document {doc['_id']} holds no code to pull")
    outcome: dict[str, str] = {}
    for file, source in files.items():
        target = directory / file
        if target.exists():
            if target.read_text(encoding="utf-8", errors="replace") == source:
                outcome[file] = "unchanged"
                continue
            if not force:
                raise ConfigError(f"{target} exists and differs; use --force to overwrite it")
            outcome[file] = "overwritten"
        else:
            outcome[file] = "written"
    directory.mkdir(parents=True, exist_ok=True)
    for file, state in outcome.items():
        if state != "unchanged":
            (directory / file).write_text(files[file], encoding="utf-8")
    return {"id": doc["_id"], "name": name, "dir": str(directory), "files": outcome}


def ls(fleet: Fleet, node: Optional[int] = None) -> list[Doc]:
    """Programs per node, with the state each node reports.

    A placed program's ``node`` is ``"placed"``; its ``nodes`` are where the
    scheduler placed it, each ``{"node", "name", "state"}``, and its
    ``state`` is theirs when they agree.  A program for many nodes is
    listed by what it ``targets``, with the ``nodes`` that report running
    it; with ``node``, those of its programs that this node reports.
    ``release`` is the number the last push gave the document (None before
    releases were numbered).
    """
    fleet.require_databases()
    # The documents too, for their "release" (the programs view does not give it).
    if node is None:
        rows = _programs(fleet, include_docs=True)
    else:
        rows = _programs(fleet, startkey=[str(node)], endkey=[str(node), {}],
                         include_docs=True)
        reported = (fleet.status.get(status_id(node)) or {}).get("programs") or {}
        rows += [row for row in _programs(fleet, startkey=[PROGRAM_TYPE],
                                          endkey=[PROGRAM_TYPE, {}], include_docs=True)
                 if row["id"] in reported]
    names = fleet.names()
    states: dict[int, dict[str, Any]] = {}

    def state(mac: int, program_id: str) -> Optional[str]:
        if mac not in states:
            status = fleet.status.get(status_id(mac)) or {}
            states[mac] = status.get("programs") or {}
        return (states[mac].get(program_id) or {}).get("state")

    assignments: Optional[dict[str, Any]] = None
    running: Optional[dict[int, dict[str, Any]]] = None
    listing = []
    for row in rows:
        key_node = row["key"][0]
        mac = int(key_node) if isinstance(key_node, str) and key_node.isdigit() else None
        value = row.get("value") or {}
        entry = {
            "node": mac if mac is not None else key_node,
            "node_name": names.get(mac) if mac is not None else None,
            "name": row["key"][1],
            "id": row["id"],
            "modules": value.get("modules", []),
            "global_modules": value.get("global_modules", []),
            "enabled": value.get("enabled", True),
            "release": _release(row.get("doc")),
            "state": state(mac, row["id"]) if mac is not None else None,
            "placed": key_node == PLACED_TYPE,
        }
        if entry["placed"]:
            if assignments is None:
                lease = fleet.status.get(lease_id(placement.LEASE_NAME)) or {}
                found = lease.get("assignments")
                assignments = found if isinstance(found, dict) else {}
            where = assignments.get(row["id"])
            macs = where.get("nodes") if isinstance(where, dict) else None
            nodes = [{"node": int(m), "name": names.get(int(m)), "state": state(int(m), row["id"])}
                     for m in macs or [] if str(m).isdigit()]
            shown = {n["state"] for n in nodes}
            entry.update(node=PLACED, nodes=nodes,
                         state=shown.pop() if len(shown) == 1 else None)
        elif key_node == PROGRAM_TYPE:
            if running is None:
                running = _programs_by_node(fleet)
            nodes = [{"node": m, "name": names.get(m),
                      "state": (programs.get(row["id"]) or {}).get("state")}
                     for m, programs in sorted(running.items()) if row["id"] in programs]
            shown = {n["state"] for n in nodes}
            entry.update(node=targets_text(value.get("targets")), targets=value.get("targets"),
                         targeted=True, nodes=nodes,
                         state=shown.pop() if len(shown) == 1 else None)
        listing.append(entry)
    return listing


def _release(doc: Optional[Doc]) -> Optional[int]:
    """A program document's release number, None when it has none (pushed before numbers)."""
    release = (doc or {}).get("release")
    return release if isinstance(release, int) and not isinstance(release, bool) else None


def _programs_by_node(fleet: Fleet) -> dict[int, dict[str, Any]]:
    """Every node's ``programs`` as its status document reports them (one request)."""
    rows = fleet.status.all_docs(startkey=STATUS_PREFIX, endkey=STATUS_PREFIX + "\ufff0",
                                 include_docs=True)
    found = {}
    for row in rows:
        mac = mac_of(str(row["id"]), STATUS_PREFIX)
        programs = (row.get("doc") or {}).get("programs")
        if mac is not None and isinstance(programs, dict):
            found[mac] = programs
    return found


def rm(fleet: Fleet, name: str, node: Optional[int], placed: bool = False,
       targeted: bool = False) -> Doc:
    """Delete program ``name`` of ``node`` (None: a global modules document, ``placed``,
    or ``targeted``: the program for many nodes)."""
    fleet.require_database(fleet.code)
    doc = find(fleet, node, name, placed, targeted)
    if doc is None:
        raise _missing(fleet, node, name, placed, targeted)
    fleet.code.delete(doc)
    return {"id": doc["_id"], "node": node, "placed": placed, "targeted": targeted,
            "name": name, "action": "removed"}

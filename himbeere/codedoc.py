"""Reading code documents: which are programs, and what they need.

A code document is HimbeereCouch's format::

    {"type": 1234567, "name": "blink", "code": "def main(): ..."}
    {"type": 1234567, "name": "multi", "modules": {"main": "...", "util": "..."}}
    {"global_modules": {"shared": "..."}}      # exported to every program

``type`` is the node's MAC id (an integer, or the same digits as a string),
or ``"himbeere-placed"`` for a program the fleet places on nodes of its
choosing (see :mod:`himbeere.fleet.placement`), or ``"himbeere-program"`` for
one document that runs on every node its ``targets`` names (see
:mod:`himbeere.fleet.targeting`).  Optional fields: ``restart``
(on-failure, always, never), ``enabled`` (false stops the program without
deleting it) and ``restart_count`` (raising it restarts the program: that is
what ``himbeere restart`` does).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any, Optional

from . import defaults, gitsource
from .exceptions import ProgramError
from .schema import PLACED_TYPE, PROGRAM_TYPE, names_node

MAIN = "main"


@dataclasses.dataclass(frozen=True)
class CodeDoc:
    """What the daemon keeps of one code document."""

    doc_id: str
    rev: str
    name: str
    modules: dict[str, str]
    global_modules: dict[str, str]
    restart: str
    enabled: bool
    error: Optional[str] = None
    restart_count: int = 0
    git: Optional[gitsource.GitSource] = None
    #: A placed program (``type: "himbeere-placed"``): runs where it is assigned.
    placed: bool = False
    #: The release this node runs (a staged rollout may pick an earlier one than
    #: the document's, see :mod:`himbeere.fleet.gate`), and why, if a rollout chose.
    release: Optional[int] = None
    rollout_why: Optional[str] = None
    #: A program for many nodes (``type: "himbeere-program"``): its ``targets``.
    targets: Any = None

    @property
    def is_program(self) -> bool:
        """False for a document that only exports ``global_modules``."""
        return bool(self.modules) or self.error is not None or self.git is not None

    def fingerprint(self, global_sources: dict[str, str]) -> str:
        """Changes exactly when the program must restart.

        The whole text, not a hash of it: comparing is exact, and the daemon
        skips importing hashlib (and OpenSSL's digests) for it.
        """
        used = {name: global_sources[name] for name in self.uses(global_sources)}
        git = dataclasses.astuple(self.git) if self.git else None
        return json.dumps([self.modules, used, self.restart, self.error, self.restart_count, git],
                          sort_keys=True)

    def uses(self, global_sources: dict[str, str]) -> set[str]:
        """Global modules this program imports, directly or through each other."""
        seen: set[str] = set()
        todo = [src for src in self.modules.values()]
        while todo:
            for name in imported_names(todo.pop()):
                if name in global_sources and name not in self.modules and name not in seen:
                    seen.add(name)
                    todo.append(global_sources[name])
        return seen


def imported_names(source: str) -> set[str]:
    """Top-level names of the modules ``source`` imports (best effort)."""
    try:
        tree = ast.parse(source)
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError, MemoryError, RecursionError...
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def matches_node(doc: dict[str, Any], node: int) -> bool:
    """True when ``doc['type']`` names this node (see :func:`~himbeere.schema.names_node`)."""
    return names_node(doc.get("type"), node)


def is_placed(doc: dict[str, Any]) -> bool:
    """True for a placed program's document (``type: "himbeere-placed"``)."""
    return doc.get("type") == PLACED_TYPE and not doc.get("_deleted")


def is_targeted(doc: dict[str, Any]) -> bool:
    """True for a program for many nodes (``type: "himbeere-program"``, ``targets``)."""
    return doc.get("type") == PROGRAM_TYPE and not doc.get("_deleted")


def parse(doc: dict[str, Any], default_restart: str = defaults.RESTART_POLICY) -> CodeDoc:
    """Turn a code document into a :class:`CodeDoc`.

    Never raises for bad content: a document that cannot run gets ``error``
    set, so the node can show it in its status and keep going.
    """
    base = _base(doc, default_restart)
    enabled = doc.get("enabled", True)
    restart = doc.get("restart", default_restart)
    try:
        global_modules = _modules_field(doc, "global_modules")
        _check_size(global_modules)
    except ProgramError as exc:
        return CodeDoc(modules={}, global_modules={}, error=str(exc), **base)
    git = None
    try:
        if "git" in doc:
            if "code" in doc or "modules" in doc:
                raise ProgramError("git: a document holds either git or code/modules, not both")
            git = gitsource.parse(doc["git"])
        modules = _program_modules(doc)
        if not isinstance(enabled, bool):
            # The string "false" would otherwise run what the user meant to stop.
            raise ProgramError(
                f"enabled: is a {type(enabled).__name__} ({enabled!r}); allowed: true or false"
            )
        if restart not in defaults.RESTART_POLICIES:
            raise ProgramError(
                f"restart: {restart!r} is not allowed; allowed: "
                + ", ".join(defaults.RESTART_POLICIES)
            )
        _check_size(modules, global_modules)
        _check_syntax(modules)
    except ProgramError as exc:
        # The program cannot run, but the modules it exports are fine: other
        # programs, on every node, may import them.
        return CodeDoc(modules={}, global_modules=global_modules, error=str(exc), **base)
    if git is not None:
        return CodeDoc(modules={}, global_modules=global_modules, git=git, **base)
    if not modules and not global_modules:
        error = "nothing to run: the document has no code, modules or global_modules"
        return CodeDoc(modules={}, global_modules={}, error=error, **base)
    return CodeDoc(modules=modules, global_modules=global_modules, **base)


def failed(doc: dict[str, Any], error: str,
           default_restart: str = defaults.RESTART_POLICY) -> CodeDoc:
    """The :class:`CodeDoc` of a document whose handling failed with ``error``.

    It is ``invalid`` in the node's status, like any document that cannot
    run; the daemon goes on with the others.
    """
    return CodeDoc(modules={}, global_modules={}, error=error, **_base(doc, default_restart))


def _base(doc: dict[str, Any], default_restart: str) -> dict[str, Any]:
    """The fields every :class:`CodeDoc` of ``doc`` has, whatever its code."""
    doc_id = str(doc.get("_id", "?"))
    name = doc.get("name")
    enabled = doc.get("enabled", True)
    restart = doc.get("restart", default_restart)
    count = doc.get("restart_count", 0)
    return dict(
        doc_id=doc_id, rev=str(doc.get("_rev", "?")),
        name=name if isinstance(name, str) and name.strip() else doc_id,
        enabled=enabled is not False, placed=is_placed(doc),
        targets=doc.get("targets") if is_targeted(doc) else None,
        restart=restart if isinstance(restart, str) else default_restart,
        restart_count=count if isinstance(count, int) and not isinstance(count, bool) else 0,
        **_release(doc))


def _release(doc: dict[str, Any]) -> dict[str, Any]:
    """``release`` and ``rollout_why`` of a document (the rollout gate's note wins)."""
    gate = doc.get("rollout_gate")
    release = gate.get("release") if isinstance(gate, dict) else doc.get("release")
    if isinstance(release, bool) or not isinstance(release, int):
        release = None
    why = gate.get("why") if isinstance(gate, dict) else None
    return {"release": release, "rollout_why": why if isinstance(why, str) else None}


def _modules_field(doc: dict[str, Any], key: str) -> dict[str, str]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProgramError(
            f"{key}: is a {type(value).__name__}; allowed: an object of module name -> source"
        )
    for module, source in value.items():
        if not isinstance(source, str):
            raise ProgramError(
                f"{key}.{module}: is a {type(source).__name__}; allowed: Python source as a string"
            )
        if not all(part.isidentifier() for part in module.split(".")) or not module:
            raise ProgramError(f"{key}: {module!r} is not a module name")
    return dict(value)


def _program_modules(doc: dict[str, Any]) -> dict[str, str]:
    modules = _modules_field(doc, "modules")
    code = doc.get("code")
    if code is not None:
        if not isinstance(code, str):
            raise ProgramError(
                f"code: is a {type(code).__name__}; allowed: Python source as a string"
            )
        modules[MAIN] = code
    if modules and MAIN not in modules:
        raise ProgramError(
            "modules: no 'main' module and no 'code'; one of them must hold def main()"
        )
    return modules


def _check_size(*groups: dict[str, str]) -> None:
    size = sum(len(source.encode("utf-8", "replace")) for g in groups for source in g.values())
    if size > defaults.MAX_CODE_BYTES:
        raise ProgramError(
            f"code is {size} bytes; allowed: at most {defaults.MAX_CODE_BYTES} bytes"
        )


def _check_syntax(modules: dict[str, str]) -> None:
    for module, source in modules.items():
        try:
            compile(source, f"<{module}>", "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise ProgramError(
                f"syntax error in module {module!r}, line {exc.lineno}: {exc.msg}"
            ) from None
        except ValueError as exc:
            raise ProgramError(f"module {module!r} cannot be compiled: {exc}") from None
        except (MemoryError, RecursionError) as exc:
            # Nesting too deep for the compiler: "x = " + "-" * 100000 + "1".
            # It would fail the same way in the program's own process.
            detail = f": {exc}" if str(exc) else ""
            raise ProgramError(f"module {module!r} cannot be compiled: {type(exc).__name__}"
                               f"{detail} (nested too deeply?)") from None

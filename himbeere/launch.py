"""The launcher: what systemd, rspby and supervisord start.  It runs the daemon
of the active version and takes a new version back when that fails to start.

Not :mod:`himbeere.launcher`, which starts command runners: this one starts
the daemon.  It stays small and imports nothing heavy, because it is the one
piece a node cannot upgrade without someone logging in: it always runs from
the installed package ("base"), whichever daemon version it starts.

``himbeere launch [daemon flags]`` (``python -m himbeere launch``, its
command in :mod:`himbeere.cli`) runs ``python -m himbeere daemon [flags]``
as its child.  The versions live in
the state directory::

    <state_dir>/versions/<version>/  a daemon installed from its wheel (pip --target)
    <state_dir>/versions/current     the active version's name; no file: "base",
                                     the package the launcher itself comes from
    <state_dir>/versions/previous    the version before it, what a revert goes back to
    <state_dir>/versions/pending     written by the daemon: installed, start it next
    <state_dir>/versions/heartbeat   written by the daemon after its first heartbeat
    <state_dir>/versions/rollback    written by the daemon: go back from this version
    <state_dir>/upgrade.json         the outcome of the last upgrade (see below)

**An upgrade.**  The daemon installs a new version beside itself
(:mod:`himbeere.upgrade`), writes ``pending`` and exits with
:data:`EXIT_UPGRADE` through its normal clean shutdown.  The launcher makes
the pending version ``current`` (the old one ``previous``) and starts it *on
probation*: the new daemon must write its first heartbeat within
``heartbeat_timeout`` seconds and live at least :data:`SETTLE` seconds.  If it
exits first (it crashes on start), or no heartbeat comes in time (it is
stopped), the launcher reverts: ``previous`` becomes ``current`` again and
the bad version goes on the ``reverted`` list, which the daemon never
installs again.  A version that passes is ``upgraded``.

``upgrade.json`` (which the daemon copies into its status document as
``upgrade``)::

    {"state": "pending" | "upgraded" | "reverted", "version": "0.2.0",
     "from": "base", "reason": null, "at": "2026-...Z", "reverted": ["0.3.0"]}

**A rollback.**  A version that came up, but whose staged rollout was
rolled back or aborted (:mod:`himbeere.fleet.rollout`), goes back too: the
daemon writes ``rollback`` (``{"version": ..., "reason": ...}``, see
:func:`request_rollback`) and exits with :data:`EXIT_UPGRADE`; the launcher
reverts that version as it reverts one that failed its probation.

A launcher killed during a probation (a power cut) finds ``state`` still
``pending`` for the current version and goes on with the probation.  The
daemon upgrades only under a launcher: it learns so, and its version's name,
from :data:`ENV_VERSION`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .schema import iso

log = logging.getLogger(__name__)

#: The daemon's exit code for "a new version is installed and pending: start it".
EXIT_UPGRADE = 75
#: The name of the version the launcher comes from (the installed package).
BASE = "base"
#: Set in the daemon's environment: the name of the version it runs as.
ENV_VERSION = "HIMBEERE_LAUNCHED_VERSION"
VERSIONS = "versions"
CURRENT = "current"
PREVIOUS = "previous"
PENDING = "pending"
HEARTBEAT = "heartbeat"
ROLLBACK = "rollback"
OUTCOME = "upgrade.json"
#: Seconds a new version has to write its first heartbeat (default).
HEARTBEAT_TIMEOUT = 120.0
#: Seconds a new version must live before it counts as upgraded, even when it
#: heartbeats at once: a daemon that dies right after its first heartbeat is broken too.
SETTLE = 5.0
#: Names a version can never have: the files beside the version directories.
RESERVED = frozenset({BASE, CURRENT, PREVIOUS, PENDING, HEARTBEAT, ROLLBACK})


def valid_version(name: Any) -> bool:
    """True if ``name`` can name a version directory: a version string, no path."""
    return (isinstance(name, str) and 0 < len(name) <= 64 and name not in RESERVED
            and not name.startswith(".")
            and all(c.isalnum() or c in ".+-_" for c in name))


# -- the files ---------------------------------------------------------------------------
def versions_dir(state_dir: Path) -> Path:
    return Path(state_dir) / VERSIONS


def read_name(path: Path) -> Optional[str]:
    """The version named in ``path``, or None (no file, or no valid name in it)."""
    try:
        name = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if valid_version(name) or name == BASE else None


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a power cut leaves the old or the new text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_outcome(state_dir: Path) -> dict[str, Any]:
    """``upgrade.json``; empty when there is none (or it cannot be read)."""
    try:
        loaded = json.loads((Path(state_dir) / OUTCOME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_outcome(state_dir: Path, state: str, version: str, previous: str,
                  reason: Optional[str] = None) -> dict[str, Any]:
    old = read_outcome(state_dir)
    reverted = [v for v in old.get("reverted") or [] if isinstance(v, str)]
    if state == "reverted" and version not in reverted:
        reverted.append(version)
    outcome = {"state": state, "version": version, "from": previous, "reason": reason,
               "at": iso(), "reverted": reverted[-20:]}
    write_text(Path(state_dir) / OUTCOME, json.dumps(outcome, sort_keys=True))
    return outcome


def request_rollback(state_dir: Path, version: str, reason: str) -> None:
    """Ask the launcher to go back from ``version`` when the daemon exits next."""
    write_text(versions_dir(state_dir) / ROLLBACK,
               json.dumps({"version": version, "reason": reason}, sort_keys=True))


def active(state_dir: Path) -> str:
    """The version to run: ``current``, if installed; else :data:`BASE`."""
    name = read_name(versions_dir(state_dir) / CURRENT)
    if name is None or name == BASE:
        return BASE
    if not (versions_dir(state_dir) / name / "himbeere" / "__init__.py").exists():
        log.error("launch: version %s is current but not installed (%s); running %s",
                  name, versions_dir(state_dir) / name, BASE)
        return BASE
    return name


# -- the launcher ------------------------------------------------------------------------
class Launcher:
    """Runs the daemon of the active version until stopped; reverts a failed upgrade."""

    def __init__(self, state_dir: Path, daemon_args: Sequence[str],
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT, settle: float = SETTLE,
                 python: str = sys.executable) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.versions = versions_dir(self.state_dir)
        self.daemon_args = list(daemon_args)
        self.heartbeat_timeout = heartbeat_timeout
        self.settle = settle
        self.python = python
        self.child: Optional[subprocess.Popen[bytes]] = None
        self.stop_requested = 0

    # -- signals: forwarded to the daemon, which does the graceful or forced stop
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._forward)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1
        self._forward(signal.SIGTERM, frame)

    def _forward(self, signum: int, frame: Any) -> None:
        child = self.child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    # -- running
    def run(self) -> int:
        """Run daemons until one exits for another reason than an upgrade: its exit code."""
        outcome = read_outcome(self.state_dir)
        version = active(self.state_dir)
        # A launcher stopped (or killed) during a probation goes on with it.
        probation = outcome.get("state") == "pending" and outcome.get("version") == version
        while True:
            code, failure = self._run_version(version, probation)
            if self.stop_requested:
                return code
            if failure is not None:
                version = self.revert(version, failure)
                probation = False
                continue
            if code != EXIT_UPGRADE:
                return code  # the init system's restart policy takes over, as ever
            why = self.take_rollback(version)
            if why is not None:
                version = self.revert(version, why)
                probation = False
                continue
            pending = self.take_pending()
            probation = pending is not None
            version = pending or active(self.state_dir)

    def _run_version(self, version: str, probation: bool) -> tuple[int, Optional[str]]:
        """Start ``version``, wait for it to exit: its exit code, and why it failed its
        probation (None if it passed, had none, or was stopped by us)."""
        marker = self.versions / HEARTBEAT
        if probation:
            marker.unlink(missing_ok=True)
        child = self.start(version)
        started = time.monotonic()
        while True:
            try:
                code = child.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if not probation or self.stop_requested:
                continue
            age = time.monotonic() - started
            if read_name(marker) == version and age >= self.settle:
                self.confirm(version)
                probation = False
            elif age > self.heartbeat_timeout:
                log.error("launch: version %s wrote no heartbeat within %g s; stopping it",
                          version, self.heartbeat_timeout)
                child.terminate()
                child.wait()
                self.child = None
                return -1, f"no heartbeat within {self.heartbeat_timeout:g} s"
        self.child = None
        log.info("launch: daemon %s (pid %s) exited with %s", version, child.pid, code)
        if probation and not self.stop_requested:
            if code == EXIT_UPGRADE and read_name(marker) == version:
                self.confirm(version)  # it heartbeats, and found a newer version at once
                return code, None
            return code, f"the daemon exited with code {code} {time.monotonic() - started:.1f} " \
                         "s after it started, before it was up"
        return code, None

    def start(self, version: str) -> subprocess.Popen[bytes]:
        """``python -m himbeere daemon ...`` of ``version``."""
        env = dict(os.environ)
        env[ENV_VERSION] = version
        cwd = None
        if version != BASE:
            # Run in the version's directory, first on the path: "-m" puts the
            # working directory first, and it must be this version's package.
            cwd = str(self.versions / version)
            env["PYTHONPATH"] = os.pathsep.join(
                [cwd] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        command = [self.python, "-m", "himbeere", "daemon", *self.daemon_args]
        self.child = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
        log.info("launch: started daemon %s (pid %s)", version, self.child.pid)
        return self.child

    def take_pending(self) -> Optional[str]:
        """The daemon's pending version becomes current, the current one previous."""
        pending_file = self.versions / PENDING
        pending = read_name(pending_file)
        pending_file.unlink(missing_ok=True)
        if pending is None or pending == BASE or not (self.versions / pending).is_dir():
            log.error("launch: the daemon asked for an upgrade, but no installed version is "
                      "pending (%s); starting the current one again", pending_file)
            return None
        current = active(self.state_dir)
        write_text(self.versions / PREVIOUS, current + "\n")
        write_text(self.versions / CURRENT, pending + "\n")
        write_outcome(self.state_dir, "pending", pending, current)
        log.info("launch: upgrading from %s to %s", current, pending)
        return pending

    def take_rollback(self, version: str) -> Optional[str]:
        """Why the daemon asked to go back from ``version`` (its ``rollback`` file), or None."""
        path = self.versions / ROLLBACK
        try:
            asked = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        path.unlink(missing_ok=True)
        if not isinstance(asked, dict) or asked.get("version") != version or version == BASE:
            log.error("launch: a rollback of %s asked for, but %s runs; ignored",
                      asked.get("version") if isinstance(asked, dict) else asked, version)
            return None
        return str(asked.get("reason") or "rolled back")

    def confirm(self, version: str) -> None:
        outcome = read_outcome(self.state_dir)
        previous = str(outcome.get("from") or BASE)
        write_outcome(self.state_dir, "upgraded", version, previous)
        log.info("launch: version %s is up; upgrade from %s done", version, previous)

    def revert(self, version: str, why: str) -> str:
        """Go back from ``version`` to ``previous``; return the version to run."""
        previous = read_name(self.versions / PREVIOUS) or BASE
        if previous == version:
            previous = BASE
        write_text(self.versions / CURRENT, previous + "\n")
        (self.versions / PREVIOUS).unlink(missing_ok=True)
        write_outcome(self.state_dir, "reverted", version, previous, why)
        shutil.rmtree(self.versions / version, ignore_errors=True)
        log.error("launch: reverted version %s to %s: %s", version, previous, why)
        return active(self.state_dir)

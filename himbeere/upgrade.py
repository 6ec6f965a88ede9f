"""The daemon's half of a self-upgrade: install the release ``daemon:current`` names.

``himbeere-upload upgrade --wheel W`` (:mod:`uploader.upgrade`) writes, in
the code database::

    {"_id": "daemon:0.2.0", "type": "himbeere-daemon-release", "version": "0.2.0",
     "sha256": "<hex of the wheel>", "wheel": "himbeerecouch-0.2.0-py3-none-any.whl",
     "targets": "all" | {"labels": {"room": "lab"}},
     "_attachments": {"wheel": ...}, "signature": {...}}   # signed when signing is on
    {"_id": "daemon:current", "type": "himbeere-daemon-current", "version": "0.2.0"}

The feed hands every node ``daemon:current`` (at each start too: the
catch-up).  The :class:`Upgrader`, in a thread of its own (a download and a
``pip install`` take seconds, the feed must not wait), installs the release
when all of these hold:

* the daemon runs under the launcher (:mod:`himbeere.launch`), which sets
  :data:`~himbeere.launch.ENV_VERSION`: a daemon started alone could not
  come back as the new version, nor revert;
* the version is not the one running, and was never reverted on this node;
* ``targets`` names this node (``"all"``, MAC ids, or its labels);
* with trusted keys (``trusted_keys``, or those pairing wrote) the release
  carries a valid signature of one of them, which covers the version and
  the SHA-256 of the wheel (:data:`himbeere.signing.DAEMON_SIGNED_FIELDS`);
* the attachment's SHA-256 is the release's ``sha256``.

It installs the wheel with ``pip install --no-deps --no-index --target``
into ``<state_dir>/versions/<version>`` (the dependencies are those of the
running environment: a Pi may be offline from PyPI), writes ``pending`` and
calls ``on_installed``: the daemon stops through its normal clean shutdown
(programs stopped, results written, the journal closed) and exits with
:data:`~himbeere.launch.EXIT_UPGRADE`; the launcher starts the new version.

**Under a staged rollout** (the pointer has ``"rollout": "rollout:daemon:<version>"``,
:mod:`himbeere.fleet.rollout`) a node installs the release only once the
rollout admits it (:func:`himbeere.fleet.gate.admits`, the rules of a
program's gate).  Until then it stays on its version, and its status
``upgrade`` field says so: ``"wants": "<version>"`` (the scheduler's leader
finds the rollout's nodes by it) and ``"waiting": "not yet admitted by
rollout:..."``; it looks again at each heartbeat.  A node that runs the
release and sees its rollout ``rolled-back`` or ``aborted`` goes back: it
asks the launcher (:func:`himbeere.launch.request_rollback`) and stops as
for an upgrade; the launcher reverts the version.

After the first heartbeat the upgrader writes ``versions/heartbeat``, the
launcher's sign that the new version is up.  :meth:`Upgrader.describe`
puts the launcher's ``upgrade.json`` into the status document.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__, launch, signing
from .component import Component
from .couch import Database, Doc
from .exceptions import CouchError, HimbeereError
from .fleet.gate import admits
from .fleet.rollout import is_final
from .fleet.targeting import labels_of
from .schema import (
    DAEMON_CURRENT_ID,
    DAEMON_RELEASE_TYPE,
    DAEMON_WHEEL,
    RolloutState,
    daemon_release_id,
    node_id,
    targets_labels,
)

log = logging.getLogger(__name__)

#: Seconds ``pip install`` may take (a Pi Zero compiles the .pyc files slowly).
PIP_TIMEOUT = 600.0


class UpgradeError(HimbeereError, RuntimeError):
    """A daemon release cannot be installed here (bad signature, checksum, pip failed)."""


class Upgrader(Component):
    """Installs the daemon release ``daemon:current`` names; marks the first heartbeat."""

    name = "upgrade"
    stop_timeout = 2.0

    def __init__(self, db: Database, status_db: Database, node: int, state_dir: Path,
                 on_installed: Callable[[str], None], heartbeats: Callable[[], int]) -> None:
        super().__init__()
        self.db = db
        self.status_db = status_db
        self.node = node
        self.state_dir = Path(state_dir)
        self.on_installed = on_installed
        self.heartbeats = heartbeats
        #: The keys a release must be signed by; empty: none needed.
        self.trusted: Mapping[str, bytes] = {}
        #: The launcher's name of the running version; None: not under a launcher.
        self.launched = os.environ.get(launch.ENV_VERSION)
        self.last_error: Optional[str] = None
        #: ``{"wants", "rollout", "waiting"}`` while a rollout holds a release back.
        self.waiting: Optional[dict[str, Any]] = None
        self._wanted: Optional[Doc] = None
        self._release: Optional[tuple[tuple[str, str], Doc]] = None
        self._fresh = False  # a pointer came that was not looked at yet
        self._again = False  # look at the pointer again at the next heartbeat (a rollout)
        self._looked_at = 0  # the heartbeat count at the last look
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._marked = False
        self._told: set[str] = set()  # versions whose skipping was logged

    # -- from the feed thread
    def note(self, doc: Doc) -> bool:
        """Take ``daemon:current`` from the feed (True); any other document: False."""
        if doc.get("_id") != DAEMON_CURRENT_ID:
            return False
        if not doc.get("_deleted"):
            with self._lock:
                self._wanted, self._fresh = doc, True
            self._poke.set()
        return True

    def describe(self) -> dict[str, Any]:
        """The status document's ``upgrade`` field: the last upgrade's outcome, or None."""
        outcome = launch.read_outcome(self.state_dir)
        if self.last_error is not None:
            outcome = dict(outcome, error=self.last_error)
        if self.waiting is not None:
            outcome = dict(outcome, **self.waiting)
        return {"upgrade": outcome or None}

    # -- the thread
    def wake(self) -> None:
        self._poke.set()

    def loop(self) -> None:
        self._mark_heartbeat()
        beats = self.heartbeats()
        with self._lock:
            # Not before this daemon's first heartbeat: on probation, an exit before
            # it would count as a failed start, and the launcher would revert it.
            # Under a rollout: again at each heartbeat, until the rollout decides.
            due = bool(beats) and self._wanted is not None and (
                self._fresh or (self._again and beats != self._looked_at))
            wanted = self._wanted if due else None
            if due:
                self._fresh, self._looked_at = False, beats
        if wanted is not None:
            again = False
            try:
                again = self.consider(wanted)
            except (UpgradeError, CouchError, OSError) as exc:
                self.last_error = f"{wanted.get('version')}: {exc}"
                log.error("upgrade: cannot install daemon version %s: %s",
                          wanted.get("version"), exc)
            with self._lock:
                self._again = again
        self._poke.wait(1.0)
        self._poke.clear()

    def _mark_heartbeat(self) -> None:
        """Tell the launcher this version is up, once its first heartbeat is written."""
        if self._marked or self.launched is None or not self.heartbeats():
            return
        launch.write_text(launch.versions_dir(self.state_dir) / launch.HEARTBEAT,
                          self.launched + "\n")
        self._marked = True

    def consider(self, pointer: Doc) -> bool:
        """Install the release ``pointer`` names, if it is for this node (and its
        rollout admits it).  True: look again at the next heartbeat (a rollout)."""
        version = pointer.get("version")
        rid = pointer.get("rollout") if isinstance(pointer.get("rollout"), str) else None
        self.waiting = None
        if rid is not None and version == __version__:
            return self.follow(rid, version)
        why = self.skip_reason(version)
        if why is not None:
            if str(version) not in self._told:
                self._told.add(str(version))
                log.info("upgrade: not installing daemon version %s: %s", version, why)
            return False
        assert isinstance(version, str)
        release = self.release(version, pointer)
        if not self.for_this_node(release):
            log.info("upgrade: daemon version %s is not for this node (targets %s)",
                     version, release.get("targets"))
            return False
        self.check(release, version)
        if rid is not None:
            rollout = self.status_db.get(rid)
            go, why = admits(rid, rollout, self.node)
            if not go:
                final = rollout is not None and is_final(rollout)
                # "wants" only while the rollout may still admit it: its leader
                # finds the rollout's nodes by it.
                self.waiting = dict({"rollout": rid, "waiting": why},
                                    **({} if final else {"wants": version}))
                if why not in self._told:
                    self._told.add(why)
                    log.info("upgrade: not installing daemon version %s yet: %s", version, why)
                return not final
            log.info("upgrade: daemon version %s: %s", version, why)
        self.install_release(release, version)
        return False

    def release(self, version: str, pointer: Doc) -> Doc:
        """The release document of ``version``; read once per pointer revision (a node
        waiting for a rollout looks at the pointer at each heartbeat)."""
        key = (version, str(pointer.get("_rev")))
        if self._release is None or self._release[0] != key:
            release = self.db.get(daemon_release_id(version))
            if release is None:
                raise UpgradeError(f"{daemon_release_id(version)} does not exist")
            self._release = (key, release)
        return self._release[1]

    def follow(self, rid: str, version: str) -> bool:
        """This daemon is ``version``, under rollout ``rid``: go back if it was rolled
        back or aborted.  True while the rollout is not final (look again)."""
        if self.launched in (None, launch.BASE):
            return False  # the installed package itself: there is nothing to go back to
        rollout = self.status_db.get(rid)
        if rollout is None or not is_final(rollout):
            return True
        state = str(rollout.get("state"))
        if state not in (RolloutState.ROLLED_BACK.value, RolloutState.ABORTED.value):
            return False  # done
        failure = (rollout.get("failure") or {}).get("why")
        reason = f"{rid} was {state}" + (f" ({failure})" if failure else "")
        log.warning("upgrade: daemon version %s goes back to the previous version: %s",
                    version, reason)
        launch.request_rollback(self.state_dir, version, reason)
        self.on_installed(version)  # stop cleanly for the launcher, as for an upgrade
        return False

    def install_release(self, release: Doc, version: str) -> None:
        """Download, check and install the wheel of ``release``; stop for the launcher."""
        data = self.db.attachment(daemon_release_id(version), DAEMON_WHEEL)
        if data is None:
            raise UpgradeError(f"{daemon_release_id(version)} has no wheel attachment")
        import hashlib  # here: it loads OpenSSL, a Pi's RAM a daemon never upgrading keeps

        digest = hashlib.sha256(data).hexdigest()
        if digest != release.get("sha256"):
            raise UpgradeError(f"the wheel's SHA-256 is {digest}, the release says "
                               f"{release.get('sha256')}")
        log.info("upgrade: installing daemon version %s (%d bytes, sha256 %s)", version,
                 len(data), digest[:16])
        install(self.state_dir, version, str(release.get("wheel")), data)
        self.last_error = None
        log.info("upgrade: daemon version %s installed; stopping for the launcher to start it",
                 version)
        self.on_installed(version)

    def skip_reason(self, version: Any) -> Optional[str]:
        """Why the release ``version`` is not for installing here, or None."""
        if not launch.valid_version(version):
            return f"{version!r} is not a version (letters, digits, '.+-_')"
        if version == __version__:
            return "it runs already"
        if version in (launch.read_outcome(self.state_dir).get("reverted") or []):
            return "it was reverted on this node (it did not come up); push a newer one"
        if self.launched is None:
            return ("this daemon was not started by the launcher (`himbeere launch`), which "
                    "alone can start a new version and revert it")
        return None

    def for_this_node(self, release: Doc) -> bool:
        targets = release.get("targets", "all")
        labels = None
        if isinstance(targets, dict):
            labels = labels_of(self.status_db.get(node_id(self.node)))
        return targets_labels(targets, self.node, labels)

    def check(self, release: Doc, version: str) -> None:
        """Raise :class:`UpgradeError` unless ``release`` is a sound, trusted release."""
        if release.get("type") != DAEMON_RELEASE_TYPE or release.get("version") != version:
            raise UpgradeError(f"{release.get('_id')} is no daemon release of version {version}")
        if self.trusted:
            why = signing.verify(release, self.trusted)
            if why is not None:
                raise UpgradeError(f"refused, {why} (this node has trusted keys)")


def install(state_dir: Path, version: str, wheel_name: str, data: bytes) -> Path:
    """``pip install`` the wheel ``data`` into ``versions/<version>``; mark it pending."""
    versions = launch.versions_dir(state_dir)
    versions.mkdir(parents=True, exist_ok=True)
    _clean(versions, keep={version})
    if not (wheel_name.endswith(".whl") and os.path.basename(wheel_name) == wheel_name):
        raise UpgradeError(f"wheel name {wheel_name!r} is no wheel file name")
    staging = versions / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    wheel = staging / wheel_name
    wheel.write_bytes(data)
    target = staging / "install"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
               "--disable-pip-version-check", "--no-warn-script-location",
               "--target", str(target), str(wheel)]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=PIP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise UpgradeError(f"pip install took more than {PIP_TIMEOUT:g} s") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
        raise UpgradeError(f"pip install failed ({done.returncode}): {lines[-1]}")
    if not (target / "himbeere" / "__init__.py").exists():
        raise UpgradeError(f"{wheel_name} holds no himbeere package")
    final = versions / version
    shutil.rmtree(final, ignore_errors=True)
    os.replace(target, final)
    shutil.rmtree(staging, ignore_errors=True)
    launch.write_text(versions / launch.PENDING, version + "\n")
    return final


def _clean(versions: Path, keep: set[str]) -> None:
    """Remove installed versions that are neither current, previous nor in ``keep``."""
    keep = keep | {name for name in (launch.read_name(versions / launch.CURRENT),
                                     launch.read_name(versions / launch.PREVIOUS)) if name}
    for entry in versions.iterdir():
        if entry.is_dir() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)

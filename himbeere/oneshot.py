"""``restart: never`` programs that ended stay ended until the next boot.

Like a systemd oneshot unit, which runs at boot but not again on a reload,
a ``restart: never`` program that finished (or crashed) does not run again
when the daemon restarts or reloads.  It runs again after a reboot of the
machine, or when its document's code changes (``himbeere restart`` counts:
it changes ``restart_count``).  Programs with ``on-failure`` or ``always``
start at every daemon start, as before.

The record is ``<state_dir>/ended.json``, written only when such a program
ends or starts again::

    {"boot_id": "<the kernel's boot id>",
     "programs": {"<doc id>": {"code": "<fingerprint>", "state": "finished",
                               "ended": "2026-11-29T06:00:00.000Z", "exit_code": 0,
                               "error": null}}}

A different boot id (``/proc/sys/kernel/random/boot_id``) means the machine
rebooted: the record is void.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from . import defaults

log = logging.getLogger(__name__)

#: What the status shows in ``runs_again`` for such a program.
RUNS_AGAIN = "at next boot or code change"


def boot_id(path: str = defaults.BOOT_ID_FILE) -> str:
    """The kernel's id of this boot; "" where there is none (not Linux)."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


class EndedPrograms:
    """The ``restart: never`` programs that ended since this machine booted."""

    def __init__(self, state_dir: Path, boot: Optional[str] = None) -> None:
        self.path = state_dir / "ended.json"
        self.boot = boot_id() if boot is None else boot
        self.programs: dict[str, dict[str, Any]] = {}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(saved, dict) and self.boot and saved.get("boot_id") == self.boot \
                and isinstance(saved.get("programs"), dict):
            self.programs = saved["programs"]

    def get(self, doc_id: str, code: str) -> Optional[dict[str, Any]]:
        """How ``doc_id`` ended in this boot, if it ended with this ``code``."""
        entry = self.programs.get(doc_id)
        return entry if isinstance(entry, dict) and entry.get("code") == code else None

    def ended(self, doc_id: str, code: str, state: str, when: Optional[str],
              exit_code: Optional[int], error: Optional[str]) -> None:
        self.programs[doc_id] = {"code": code, "state": state, "ended": when,
                                 "exit_code": exit_code, "error": error}
        self._save()

    def forget(self, doc_id: str) -> None:
        if self.programs.pop(doc_id, None) is not None:
            self._save()

    def _save(self) -> None:
        if not self.boot:
            return  # no boot id: nothing could tell a reboot from a restart
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"boot_id": self.boot, "programs": self.programs}),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot record ended programs in %s: %s", self.path, exc)

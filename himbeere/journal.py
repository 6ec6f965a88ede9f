"""The command journal: commands taken on whose result is not written yet.

It makes commands run exactly once across crashes (see
:mod:`himbeere.commands`, which follows, runs and settles them): a command
is ``queued`` in ``commands.json`` in the state directory when the daemon
takes it on, ``started`` just before its process starts, and removed once
its result is written.  The next daemon runs a ``queued`` command and never
runs a ``started`` one again.

The :class:`Ledger` (``finished.json``) remembers the commands whose result
was written, with the result, so that a node that moves to another server
(a site's relay and the central server, see ``docs/architecture.rst``) and finds a
command there without its result writes the kept result instead of running
it again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

#: Journal phases of a command.
QUEUED, STARTED = "queued", "started"

#: ``fdatasync`` where there is one (Linux); macOS has only ``fsync``.
_fdatasync = getattr(os, "fdatasync", os.fsync)


class Journal:
    """Commands taken on whose result is not written yet: id -> phase.

    The file holds JSON lines, each ``{id: phase}`` or ``{id: null}`` (the
    result is written); read in order they give the commands open now.
    A change is one appended line made durable with ``fdatasync``, about a
    third of the cost of writing a new file, ``fsync`` and rename (measured
    0.25 against 0.7 ms, 0.6 against 1.4 ms after a pause), and the
    ``queued`` and ``started`` lines are on the way of every command.
    The file is rewritten that way when it has grown to
    :attr:`COMPACT_AFTER` lines (on a removal, which comes after the result
    is written), when it is missing, and when its last line is incomplete
    (a power cut mid-append) or it is in the format of earlier versions
    (one JSON object, no newline), which reads as one line.
    """

    #: Lines from which a removal rewrites the file (any change at four times as many).
    COMPACT_AFTER = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, str]:
        return self._load()[0]

    def _load(self) -> tuple[dict[str, str], int, bool]:
        """The open commands, the number of lines, and whether appending is safe."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return {}, 0, False
        data: dict[str, str] = {}
        lines = text.split("\n")
        for line in lines:
            try:
                entry = json.loads(line) if line.strip() else {}
            except ValueError:
                continue  # torn by a power cut: that change never completed
            if not isinstance(entry, dict):
                continue
            for key, phase in entry.items():
                if phase is None:
                    data.pop(str(key), None)
                else:
                    data[str(key)] = phase if phase in (QUEUED, STARTED) else STARTED
        return data, len(lines) - 1, text == "" or text.endswith("\n")

    def set(self, doc_id: str, phase: str) -> None:
        self._change(doc_id, phase)

    def remove(self, doc_id: str) -> None:
        self._change(doc_id, None)

    def _change(self, doc_id: str, phase: Optional[str]) -> None:
        with self._lock:
            data, lines, appendable = self._load()
            if data.get(doc_id) == phase:
                return
            if phase is None:
                data.pop(doc_id)
            else:
                data[doc_id] = phase
            limit = self.COMPACT_AFTER if phase is None else 4 * self.COMPACT_AFTER
            if appendable and lines < limit:
                # "started" must be on disk before the process is.
                with open(self.path, "ab") as handle:
                    handle.write(json.dumps({doc_id: phase}).encode() + b"\n")
                    handle.flush()
                    _fdatasync(handle.fileno())
            else:
                self._rewrite(data)

    def _rewrite(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data) + "\n" if data else "")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        # Lines appended from now on go to the new file: its name must be on
        # disk before them, or a power cut could bring back the old one alone.
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


#: How long the ledger keeps a finished command: a site's relay and the
#: central server converge within minutes of the WAN's return, so a command
#: still without its result a month later means servers that no longer
#: replicate; older entries only cost disk.
LEDGER_DAYS = 30
#: At most this many entries (the newest): a day of one command a minute, far
#: more than an outage leaves pending.  With :data:`LEDGER_OUTPUT` per stream
#: the file stays under about 2000 * 8.5 KB = 17 MB even when every command
#: prints a lot (a Pi's SD card has room), and a few hundred KB typically.
LEDGER_SIZE = 2000
#: Bytes of each output stream kept in the ledger (the rest is counted in
#: ``truncated``): the full result is on the server that took it, and the
#: owner's conflict resolution prefers it once replication brings it over.
LEDGER_OUTPUT = 4096


class Ledger:
    """Commands whose result was written: id -> the result, for the last
    :data:`LEDGER_DAYS` days and at most :data:`LEDGER_SIZE` commands.

    JSON lines, each ``{"id": key, "at": epoch seconds, "result": {...}}``,
    appended with ``fdatasync`` before the journal forgets the command (a
    power cut in between leaves the journal entry, and the result is written
    and recorded again).  Only the ids and times stay in memory (a Pi's RAM);
    a result is read from the file when a command comes back without it,
    which is rare.  The file is rewritten without the oldest entries when it
    holds half as many lines again as it may keep.
    """

    def __init__(self, path: Path, days: float = LEDGER_DAYS, size: int = LEDGER_SIZE) -> None:
        self.path = path
        self.max_age = days * 86400.0
        self.size = size
        self._lock = threading.Lock()
        #: id -> when it was recorded, oldest first.
        self._index: dict[str, float] = {}
        self._lines = 0
        self._appendable = True
        self._load()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            at = self._index.get(key)
        return at is not None and at >= time.time() - self.max_age

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The result kept for ``key`` (None: not kept)."""
        if key not in self:
            return None
        found = None
        for entry in self._entries():
            if entry["id"] == key:
                found = entry["result"]  # the last line of a key wins
        return found

    def record(self, key: str, result: dict[str, Any]) -> None:
        """Keep ``result`` (a command's final fields) for ``key``; durable on return."""
        line = json.dumps({"id": key, "at": time.time(), "result": _kept(result)})
        with self._lock:
            self._index.pop(key, None)
            self._index[key] = time.time()
            self._trim()
            if self._appendable and self._lines < self.size + self.size // 2:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as handle:
                    handle.write(line.encode() + b"\n")
                    handle.flush()
                    _fdatasync(handle.fileno())
                self._lines += 1
            else:
                self._rewrite(extra=line)

    def _trim(self) -> None:
        """Drop the oldest entries from the index: past the age, or beyond the size."""
        cutoff = time.time() - self.max_age
        for key, at in list(self._index.items()):
            if at >= cutoff and len(self._index) <= self.size:
                break
            del self._index[key]

    def _entries(self) -> list[dict[str, Any]]:
        """Every well-formed line of the file, in order."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return []
        entries = []
        for line in text.split("\n"):
            try:
                entry = json.loads(line) if line.strip() else None
            except ValueError:
                continue  # torn by a power cut: that record never completed
            if (isinstance(entry, dict) and isinstance(entry.get("id"), str)
                    and isinstance(entry.get("result"), dict)
                    and isinstance(entry.get("at"), (int, float))):
                entries.append(entry)
        return entries

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, ValueError):
            text = ""
        self._lines = text.count("\n")
        self._appendable = text == "" or text.endswith("\n")
        for entry in self._entries():
            self._index.pop(entry["id"], None)
            self._index[entry["id"]] = float(entry["at"])
        self._trim()

    def _rewrite(self, extra: str) -> None:
        """Write the kept entries (and ``extra``, the newest line) to a new file."""
        keep = self._index
        latest: dict[str, str] = {}
        for entry in self._entries():
            if entry["id"] in keep:
                latest[entry["id"]] = json.dumps(entry)
        newest = json.loads(extra)["id"]
        latest.pop(newest, None)
        lines = [latest[key] for key in keep if key in latest] + [extra]
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_directory(self.path.parent)
        self._lines = len(lines)
        self._appendable = True


def _kept(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with each output stream cut to :data:`LEDGER_OUTPUT` bytes."""
    ret = result.get("ret")
    if not isinstance(ret, list):
        return dict(result)
    kept = dict(result)
    truncated = dict(result.get("truncated") or {})
    texts = []
    for name, text in zip(("stdout", "stderr"), ret):
        data = str(text).encode("utf-8")
        if len(data) > LEDGER_OUTPUT:
            # "ignore" drops a character the cut split in two.
            text = data[:LEDGER_OUTPUT].decode("utf-8", "ignore")
            truncated[name] = truncated.get(name, 0) + len(data) - len(text.encode("utf-8"))
        texts.append(text)
    kept["ret"] = texts
    if truncated:
        kept["truncated"] = truncated
    return kept


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

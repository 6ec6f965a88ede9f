"""A node's health over the last day: a ring of 5-minute samples in ``history:<mac>``.

The status writer hands every heartbeat to :class:`History`, which folds
its figures (CPU, memory, temperature, load, free disk) into the bucket of
``interval`` seconds (5 minutes) it falls in.  When a heartbeat falls into
the next bucket, the finished bucket's means become one sample, and the
whole ring is written.  So a node writes its history once per bucket, not
once per heartbeat: with 200 nodes that is 0.7 writes a second of about
15 KB each, beside 20 heartbeats a second.  Inside the status document the
same ring would travel with every heartbeat (measured in
``tests/test_history.py``).

The document::

    {"_id": "history:1000", "type": "himbeere-history", "node": 1000,
     "interval": 300, "columns": ["time", "cpu_percent", ...],
     "samples": [[1764400200, 12.5, 512.3, 48.1, 0.52, 10240.0, {"1000:blink": 2}],
                 ...]}

A sample is a row, so no key is repeated 288 times: the bucket's start (on
the server's clock, a multiple of ``interval``), the means of the figures
(null when the node could not measure one), then how often each program
restarted during the bucket (program id -> count; null for none).  The
restarts come from the ``restarts`` counters of the heartbeats, so a
restart mark costs nothing extra.

A bucket with no heartbeat (the node was off, or the daemon stopped) has
no sample; :func:`series` turns it into a gap.  A sample that could not be
written stays in memory and goes out with the next one.  The ring keeps
``length`` samples (a day) and none older than ``length`` buckets before
the newest.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from . import defaults
from .couch import Database, Doc
from .exceptions import Conflict
from .schema import HISTORY_TYPE, history_id, iso

log = logging.getLogger(__name__)

#: The figures of a heartbeat a sample keeps, in the order of its columns.
FIGURES = ("cpu_percent", "memory_used_mb", "temperature", "load", "disk_free_mb")
COLUMNS = ("time",) + FIGURES + ("restarts",)
#: Digits kept of a mean: enough for a chart, and the document stays small.
DIGITS = 2

Sample = list[Any]


class History:
    """The ring of one node's samples; fed by the status writer's thread."""

    def __init__(self, db: Database, node: int, interval: float = defaults.HISTORY_INTERVAL,
                 length: int = defaults.HISTORY_LENGTH) -> None:
        self.db = db
        self.node = node
        self.interval = interval
        self.length = length
        self.samples: list[Sample] = []
        self.writes = 0
        self._loaded = False
        self._rev: Optional[str] = None
        self._unsaved = False
        self._bucket: Optional[float] = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._restarts: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # each program's restart counter at the last heartbeat

    # -- feeding ------------------------------------------------------------------
    def add(self, status: Doc) -> bool:
        """Fold one heartbeat into its bucket; True if a finished bucket was written."""
        when = status.get("heartbeat_server_time", status.get("heartbeat_time"))
        if not isinstance(when, (int, float)):
            return False
        bucket = self.bucket(float(when))
        if self._bucket is not None and bucket != self._bucket:
            self._close()
        self._bucket = bucket
        self._fold(status)
        if self._unsaved:
            self.save()
            return True
        return False

    def flush(self) -> None:
        """Close the bucket now, unfinished (the daemon stops), and write the ring."""
        if self._bucket is not None:
            self._close()
        if self._unsaved:
            self.save()

    def bucket(self, when: float) -> float:
        """The start of the bucket ``when`` falls in."""
        return math.floor(when / self.interval) * self.interval

    def _fold(self, status: Doc) -> None:
        for figure in FIGURES:
            value = status.get(figure)
            if figure == "load" and isinstance(value, list):
                value = value[0] if value else None  # the 1-minute load average
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._sums[figure] = self._sums.get(figure, 0.0) + float(value)
                self._counts[figure] = self._counts.get(figure, 0) + 1
        programs = status.get("programs") or {}
        for program, entry in programs.items():
            count = entry.get("restarts") if isinstance(entry, dict) else None
            if not isinstance(count, int):
                continue
            before = self._seen.get(program)
            # A counter that went down was reset (a new revision, a restart by
            # hand): everything it counts now happened since.
            new = 0 if before is None else count - before if count >= before else count
            if new > 0:
                self._restarts[program] = self._restarts.get(program, 0) + new
            self._seen[program] = count
        for gone in set(self._seen) - set(programs):
            del self._seen[gone]

    def _close(self) -> None:
        """The current bucket's means become a sample."""
        assert self._bucket is not None
        sample: Sample = [int(self._bucket)]
        for figure in FIGURES:
            count = self._counts.get(figure)
            sample.append(round(self._sums[figure] / count, DIGITS) if count else None)
        sample.append(dict(self._restarts) or None)
        self._bucket = None
        self._sums, self._counts, self._restarts = {}, {}, {}
        self.samples = merge(self.samples, [sample], self.length, self.interval)
        self._unsaved = True

    # -- the document -------------------------------------------------------------
    def document(self) -> Doc:
        doc: Doc = {
            "_id": history_id(self.node),
            "type": HISTORY_TYPE,
            "node": self.node,
            "interval": self.interval,
            "columns": list(COLUMNS),
            "samples": self.samples,
            "updated": iso(),
        }
        if self._rev is not None:
            doc["_rev"] = self._rev
        return doc

    def save(self) -> None:
        """Write the ring (raises :class:`~himbeere.exceptions.CouchError`; kept if so)."""
        if not self._loaded:
            self._load()
        try:
            saved = self.db.save(self.document())
        except Conflict:  # someone else wrote it (an admin, a second daemon): take its rev
            current = self.db.get(history_id(self.node))
            self._rev = current["_rev"] if current else None
            saved = self.db.save(self.document())
        self._rev = saved["_rev"]
        self._unsaved = False
        self.writes += 1

    def _load(self) -> None:
        """Take over the samples of the day from before this daemon started."""
        self.take_over(self.db.get(history_id(self.node)))

    def take_over(self, current: Optional[Doc]) -> None:
        """Merge the stored document (None: there is none) into the ring, before the
        first write (the fleet simulator reads it with a client of its own)."""
        self._loaded = True
        if current is None:
            return
        self._rev = current["_rev"]
        if current.get("interval") == self.interval and current.get("columns") == list(COLUMNS):
            self.samples = merge(valid(current.get("samples")), self.samples, self.length,
                                 self.interval)


def valid(samples: Any) -> list[Sample]:
    """The well-formed rows of a stored ``samples`` field."""
    if not isinstance(samples, list):
        return []
    return [s for s in samples if isinstance(s, list) and len(s) == len(COLUMNS)
            and isinstance(s[0], (int, float)) and not isinstance(s[0], bool)]


def merge(old: list[Sample], new: list[Sample], length: int, interval: float) -> list[Sample]:
    """``old`` and ``new`` by time, at most ``length``, none older than ``length`` buckets.

    Two samples of one bucket (the daemon restarted within it) become one:
    the newer figures where it has them, the restarts added up.
    """
    by_time: dict[float, Sample] = {}
    for sample in list(old) + list(new):
        have = by_time.get(sample[0])
        by_time[sample[0]] = sample if have is None else _combine(have, sample)
    ordered = [by_time[t] for t in sorted(by_time)]
    if ordered:
        oldest = ordered[-1][0] - (length - 1) * interval
        ordered = [s for s in ordered if s[0] >= oldest]
    return ordered[-length:]


def _combine(older: Sample, newer: Sample) -> Sample:
    figures = [n if n is not None else o for o, n in zip(older[1:-1], newer[1:-1])]
    restarts = dict(older[-1] or {})
    for program, count in (newer[-1] or {}).items():
        restarts[program] = restarts.get(program, 0) + count
    return [newer[0], *figures, restarts or None]


def series(doc: Optional[Doc], until: Optional[float] = None) -> dict[str, Any]:
    """A history document as columns for a chart, a null in every missed bucket.

    ``{"interval", "time": [...], "<figure>": [...] for each figure,
    "restarts": [[time, program id, count], ...]}``, covering the ``length``
    buckets up to ``until`` (default: the newest sample).
    """
    interval = float((doc or {}).get("interval") or defaults.HISTORY_INTERVAL)
    columns = (doc or {}).get("columns")
    samples = valid((doc or {}).get("samples")) if columns == list(COLUMNS) else []
    out: dict[str, Any] = {"interval": interval, "time": []}
    out.update({figure: [] for figure in FIGURES})
    out["restarts"] = []
    if not samples:
        return out
    last = samples[-1][0] if until is None else math.floor(until / interval) * interval
    first = last - (defaults.HISTORY_LENGTH - 1) * interval
    by_time = {s[0]: s for s in samples if first <= s[0] <= last}
    if not by_time:
        return out
    start = min(by_time)
    for step in range(int(round((last - start) / interval)) + 1):
        when = start + step * interval
        sample = by_time.get(when) or [when] + [None] * (len(COLUMNS) - 1)
        out["time"].append(int(when) if float(when).is_integer() else when)
        for index, figure in enumerate(FIGURES, start=1):
            out[figure].append(sample[index])
        for program, count in sorted((sample[-1] or {}).items()):
            out["restarts"].append([out["time"][-1], program, count])
    return out

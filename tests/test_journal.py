"""The command journal alone (:class:`himbeere.journal.Journal`), no server.

What a node has taken on and started is kept on disk until the result is
written: these are the rules that make a command run exactly once across a
crash (tests/test_command_survival.py kills real daemons).
"""

from __future__ import annotations

import json
from pathlib import Path

from himbeere.journal import Journal


def test_journal_appends_and_replays_lines(tmp_path: Path) -> None:
    path = tmp_path / "state" / "commands.json"
    journal = Journal(path)
    journal.set("a", "queued")
    journal.set("b", "queued")
    journal.set("a", "started")
    journal.set("a", "started")  # no change, no line
    journal.remove("b")
    journal.remove("nothing")
    assert Journal(path).read() == {"a": "started"}
    assert path.read_text().count("\n") == 4  # the first wrote the file, the rest appended
    journal.remove("a")
    assert Journal(path).read() == {}


def test_journal_reads_the_old_format_and_a_torn_last_line(tmp_path: Path) -> None:
    """Earlier versions wrote one JSON object; a power cut can tear the last append."""
    path = tmp_path / "commands.json"
    path.write_text(json.dumps({"old": "started", "odd": "weird"}))
    assert Journal(path).read() == {"old": "started", "odd": "started"}
    Journal(path).set("new", "queued")
    assert path.read_text().endswith("\n")
    with open(path, "a") as handle:
        handle.write('{"new": "sta')
    assert Journal(path).read() == {"old": "started", "odd": "started", "new": "queued"}
    Journal(path).set("next", "queued")  # rewritten, not glued to the torn line
    assert Journal(path).read() == {"old": "started", "odd": "started", "new": "queued",
                                    "next": "queued"}


def test_journal_is_compacted_once_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    journal = Journal(path)
    journal.set("kept", "queued")
    for i in range(Journal.COMPACT_AFTER):
        journal.set(f"c{i}", "started")
        journal.remove(f"c{i}")
    assert path.read_text().count("\n") < Journal.COMPACT_AFTER
    assert journal.read() == {"kept": "queued"}

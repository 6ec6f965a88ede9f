"""Running ``<macid>_cmd`` documents, exactly once each.

A command document, as in HimbeereCouch::

    {"type": "1234567_cmd", "cmd": ["uname", "-a"], "timeout": 30}

runs without a shell.  The node writes back into the same document::

    "ret": [stdout, stderr], "returncode": 0, "state": "done",
    "started": "...", "finished": "...", "duration": 0.004, "node": 1234567

``state`` is ``done``, ``timeout``, ``error`` (it could not run: a missing
binary, a ``cmd`` that is not a list of strings) or ``interrupted`` (the
daemon died while it ran; it is not run again).  A command still running
after a second is marked ``"state": "running"``.

Exactly once: a document that has a result is never run again, and before a
command starts its id goes into a journal in the state directory.  After a
crash, :meth:`Commands.recover` marks every command still in the journal
``interrupted``.  Write-back conflicts (409) are resolved by re-reading the
document, never by dropping the result.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from . import defaults
from .couch import Database, Doc
from .exceptions import CommandError, CouchError, Unreachable

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "timeout", "error", "interrupted")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def has_result(doc: Doc) -> bool:
    """True for a command that ran (or was settled) already."""
    return "finished" in doc or "ret" in doc or doc.get("state") in FINAL_STATES


def parse_command(doc: Doc, default_timeout: float) -> tuple[list[str], float]:
    """``cmd`` and ``timeout`` of a command document, or :class:`CommandError`."""
    cmd = doc.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise CommandError(
            f"cmd: {_preview(cmd)} is not allowed; allowed: a non-empty list of strings, "
            'for example ["uname", "-a"]'
        )
    timeout = doc.get("timeout", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise CommandError(f"timeout: {_preview(timeout)} is not allowed; allowed: seconds > 0")
    return cmd, float(timeout)


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Journal:
    """Ids of commands that started and have no result written yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def add(self, doc_id: str, rev: str) -> None:
        with self._lock:
            data = self.read()
            data[doc_id] = rev
            self._write(data)

    def remove(self, doc_id: str) -> None:
        with self._lock:
            data = self.read()
            if data.pop(doc_id, None) is not None:
                self._write(data)


class Commands:
    """Runs a node's commands in a thread pool and writes the results back."""

    def __init__(
        self,
        db: Database,
        node: int,
        state_dir: Path,
        default_timeout: float = defaults.COMMAND_TIMEOUT,
        output_limit: int = defaults.COMMAND_OUTPUT_LIMIT,
        running_mark: float = defaults.COMMAND_RUNNING_MARK,
        max_workers: int = defaults.MAX_COMMANDS,
        on_result: Optional[Callable[[str, Doc], None]] = None,
    ) -> None:
        self.db = db
        self.node = node
        self.default_timeout = default_timeout
        self.output_limit = output_limit
        self.running_mark = running_mark
        self.journal = Journal(state_dir / "commands.json")
        self.on_result = on_result or (lambda doc_id, result: None)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="command")
        self.inflight: set[str] = set()
        self._lock = threading.Lock()
        self.stop = threading.Event()

    # -- entry points ----------------------------------------------------------
    def recover(self) -> int:
        """Mark commands a crashed daemon left half-done ``interrupted``."""
        journal = self.journal.read()
        for doc_id in journal:
            self._settle(doc_id, {
                "state": "interrupted",
                "error": "the daemon stopped while this command ran; it is not run again",
            })
            self.journal.remove(doc_id)
        return len(journal)

    def submit(self, doc: Doc) -> None:
        """Handle a command document from the feed; never blocks on the command."""
        doc_id = doc["_id"]
        with self._lock:
            if doc_id in self.inflight or has_result(doc):
                return
            self.inflight.add(doc_id)
        if "started" in doc:
            # Claimed by an earlier run of this daemon that did not finish it.
            self.pool.submit(self._finish_without_running, doc_id, {
                "state": "interrupted",
                "error": "the daemon stopped while this command ran; it is not run again",
            })
            return
        try:
            cmd, timeout = parse_command(doc, self.default_timeout)
        except CommandError as exc:
            log.error("command %s: %s", doc_id, exc)
            self.pool.submit(self._finish_without_running, doc_id, {
                "state": "error", "error": str(exc), "ret": ["", str(exc)],
                "returncode": None,
            })
            return
        self.journal.add(doc_id, doc.get("_rev", ""))
        self.pool.submit(self._run, doc_id, cmd, timeout)

    def shutdown(self, wait: bool = True) -> None:
        if not wait:
            self.stop.set()
        self.pool.shutdown(wait=wait, cancel_futures=not wait)

    # -- running ----------------------------------------------------------------
    def _finish_without_running(self, doc_id: str, fields: Doc) -> None:
        try:
            self._settle(doc_id, fields)
        finally:
            with self._lock:
                self.inflight.discard(doc_id)

    def _run(self, doc_id: str, cmd: list[str], timeout: float) -> None:
        try:
            result = self.execute(cmd, timeout, on_slow=lambda: self._mark_running(doc_id))
            log.info("command %s: %s -> %s", doc_id, cmd[0], result.get("returncode"))
            self._settle(doc_id, result)
            self.journal.remove(doc_id)
        except Exception:
            log.exception("command %s failed", doc_id)
        finally:
            with self._lock:
                self.inflight.discard(doc_id)

    def execute(self, cmd: list[str], timeout: float,
                on_slow: Optional[Callable[[], None]] = None) -> Doc:
        """Run ``cmd`` and return the result fields (no database involved)."""
        started_at, started = time.monotonic(), now_iso()
        base = {"started": started, "node": self.node}
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except FileNotFoundError:
            error = f"cmd: no such program: {cmd[0]!r}"
            return dict(base, state="error", error=error, ret=["", error], returncode=None,
                        finished=now_iso(), duration=round(time.monotonic() - started_at, 6))
        except OSError as exc:
            error = f"cmd: cannot run {cmd[0]!r}: {exc.strerror or exc}"
            return dict(base, state="error", error=error, ret=["", error], returncode=None,
                        finished=now_iso(), duration=round(time.monotonic() - started_at, 6))
        outputs, dropped, timed_out = self._collect(process, started_at + timeout,
                                                    started_at + self.running_mark, on_slow)
        returncode = process.wait()
        result: Doc = dict(base, state="timeout" if timed_out else "done",
                           returncode=returncode)
        texts = []
        for name, data in zip(("stdout", "stderr"), outputs):
            text = data.decode("utf-8", "replace")
            if "\ufffd" in text and text.encode("utf-8") != data:
                result.setdefault("not_utf8", []).append(name)
                text = data.decode("utf-8", "backslashreplace")
            texts.append(text)
        result["ret"] = texts
        if any(dropped):
            result["truncated"] = {name: count for name, count
                                   in zip(("stdout", "stderr"), dropped) if count}
        if timed_out:
            result["error"] = f"timed out after {timeout:g} s and was killed"
        result["finished"] = now_iso()
        result["duration"] = round(time.monotonic() - started_at, 6)
        return result

    def _collect(self, process: subprocess.Popen[bytes], deadline: float, slow_at: float,
                 on_slow: Optional[Callable[[], None]]) -> tuple[list[bytes], list[int], bool]:
        """Read stdout and stderr up to the cap until both close or time runs out."""
        assert process.stdout is not None and process.stderr is not None
        buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
        dropped = {fd: 0 for fd in buffers}
        order = list(buffers)
        timed_out = False
        with selectors.DefaultSelector() as selector:
            for stream in (process.stdout, process.stderr):
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                if on_slow is not None and now >= slow_at:
                    on_slow()
                    on_slow = None
                if now >= deadline:
                    timed_out = True
                    _kill_group(process.pid)
                    break
                wait = deadline - now
                if on_slow is not None:
                    wait = min(wait, slow_at - now)
                for key, _ in selector.select(max(0.0, wait)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer = buffers[key.fd]
                    room = self.output_limit - len(buffer)
                    buffer += chunk[:max(0, room)]
                    dropped[key.fd] += max(0, len(chunk) - max(0, room))
        if timed_out:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        process.stdout.close()
        process.stderr.close()
        return [bytes(buffers[fd]) for fd in order], [dropped[fd] for fd in order], timed_out

    # -- writing back -----------------------------------------------------------
    def _mark_running(self, doc_id: str) -> None:
        self._settle(doc_id, {"state": "running", "started": now_iso(), "node": self.node},
                     final=False)

    def _settle(self, doc_id: str, fields: Doc, final: bool = True) -> None:
        """Merge ``fields`` into the command document, retrying on 409."""
        if final:
            fields.setdefault("finished", now_iso())
            fields.setdefault("node", self.node)

        def change(doc: Doc) -> bool:
            if "_rev" not in doc:
                log.warning("command %s was deleted; result not written", doc_id)
                return False
            if final and has_result(doc):
                return False  # settled already (an earlier attempt got through)
            if not final and has_result(doc):
                return False
            doc.update(fields)
            return True

        delay = 0.5
        while True:
            try:
                saved = self.db.update(doc_id, change)
                break
            except Unreachable as exc:
                # Keep the result until the server is back: it must not be lost.
                if not final or self.stop.is_set():
                    raise
                log.warning("command %s: server unreachable (%s); retrying in %.1f s",
                            doc_id, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
            except CouchError as exc:
                log.error("command %s: cannot write the result: %s", doc_id, exc)
                raise
        if saved is not None and final:
            self.on_result(doc_id, fields)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

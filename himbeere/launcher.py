"""Starting command runners, and what a runner's directory tells about it.

The runners (:mod:`himbeere.runner`) are forked by a warm runner server,
which :class:`Launcher` starts on demand.  Each runner works in a directory
of its own, ``<state_dir>/commands/<id>/``; the functions here read it:
whether its runner still works (:func:`runner_alive`: it holds the lock),
ask it to stop (:func:`signal_runner`) and remove it (:func:`remove_dir`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

#: Seconds to wait for the runner server to end once its stdin is closed.
SERVER_WAIT = 5.0

#: How the runner server starts (see :class:`Launcher`): ``-I -S`` skip the
#: site packages, which would double its start-up time; imported (not run
#: as a script) so that its compiled bytecode is cached.
RUNNER_SERVER = ["-I", "-S", "-c", "import sys; sys.path.append(sys.argv[1]); import runner; "
                 "sys.exit(runner.serve(sys.argv[1:]))", str(Path(__file__).parent)]
#: Seconds without a command after which the runner server ends (started again on demand).
RUNNER_IDLE = 120.0
#: Files a runner leaves in its directory (``commands/<id>/``).
RUNNER_FILES = ("stdout", "stderr", "exit.json", "exit.json.tmp", "lock", "pid", "runner.log",
                "boot")


class Launcher:
    """The runner server (:func:`himbeere.runner.serve`), started on demand.

    Forking it costs about a millisecond where a new interpreter for each
    runner costs ten (on a laptop; far more on a Pi), and a command's round
    trip is about twenty.  It runs in a session of its own, and so do the
    runners it forks: they outlive it and the daemon.  It ends when the
    daemon does (EOF on its stdin) or after :data:`RUNNER_IDLE` idle seconds.
    """

    def __init__(self, idle: float = RUNNER_IDLE) -> None:
        self.idle = idle
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._lock = threading.Lock()

    def start(self, directory: Path, timeout: float, limit: int,
              cmd: list[str]) -> Optional[int]:
        """Have a runner start ``cmd`` in ``directory``; its pid (None: started, pid unknown).

        Raises OSError if no runner could be started.
        """
        request = (json.dumps([str(directory), timeout, limit, cmd]) + "\n").encode()
        with self._lock:
            for _ in range(2):
                if self.process is None or self.process.poll() is not None:
                    self._launch()
                assert self.process is not None and self.process.stdin is not None
                assert self.process.stdout is not None
                try:
                    self.process.stdin.write(request)
                    self.process.stdin.flush()
                    answer = self.process.stdout.readline()
                except OSError:
                    answer = b""
                if answer.strip().isdigit():
                    return int(answer)
                # It ended (idle, or killed) before it answered.
                self._close()
                if runner_alive(directory) or (directory / "exit.json").exists():
                    return None  # it forked the runner first: never start a second one
            raise OSError(f"the runner server does not start runners: {answer!r}")

    def _launch(self) -> None:
        self._close()
        self.process = subprocess.Popen(
            [sys.executable, *RUNNER_SERVER, repr(self.idle)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )

    def _close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            process.wait(SERVER_WAIT)  # EOF on its stdin ends it
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        with self._lock:
            self._close()


def boot_id() -> Optional[str]:
    """This boot's id (Linux), to tell a daemon restart from a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
    except OSError:
        return None


def runner_alive(directory: Path) -> bool:
    """True while a runner holds the lock in ``directory``."""
    try:
        fd = os.open(directory / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def signal_runner(directory: Path) -> None:
    """Ask a runner to kill its command (SIGTERM), if it still runs."""
    try:
        pid = int((directory / "pid").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if pid > 0 and runner_alive(directory):  # the lock is held: the pid is the runner's
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def remove_dir(directory: Path) -> None:
    """Remove a runner directory (only the files a runner writes there)."""
    for name in RUNNER_FILES:
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", directory, exc)

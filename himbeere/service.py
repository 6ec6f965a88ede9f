"""Run the daemon in the background and control it: start, stop, reload...

This is the sysvinit way of the original HimbeereCouch (``rspby start``).
Under systemd or supervisord run ``himbeere daemon`` in the foreground
instead; they do the daemonising, logging and restarting themselves.

``start`` forks, detaches with :class:`daemon.DaemonContext` (python-daemon)
and writes ``<state_dir>/himbeere.pid``; stdout and stderr go to
``<state_dir>/himbeere.log``.  The detached process tells the starting one
through a pipe whether it got the pidfile, so a failed start is reported by
``start`` itself rather than found later in the log.  Exit codes follow the
LSB init script conventions.
"""

from __future__ import annotations

import dataclasses
import io
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, TextIO

from . import statelock
from .config import Config
from .exceptions import AlreadyRunning, HimbeereError

Run = Callable[[Config], int]

ACTIONS = ("start", "stop", "restart", "reload", "status")

#: Seconds ``start`` waits for the detached daemon to report its pidfile.
START_TIMEOUT = 15.0
#: Seconds ``start`` watches a fresh daemon; one that dies this soon (bad
#: server URL, missing module) is reported as a failed start.
START_CHECK = 1.0
#: Seconds ``stop`` waits after SIGTERM; the daemon itself gives its programs
#: ``grace_period`` plus ``KILL_GRACE`` seconds, well below this.
STOP_TIMEOUT = 30.0

# LSB exit codes: https://refspecs.linuxbase.org/LSB_5.0.0/LSB-Core-generic/
# LSB-Core-generic/iniscrptact.html
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENT = 2
EXIT_NO_PRIVILEGE = 4
EXIT_NOT_RUNNING = 7
STATUS_DEAD_WITH_PIDFILE = 1
STATUS_NOT_RUNNING = 3


def pid_path(config: Config) -> Path:
    return Path(config.pid_file or Path(config.state_dir) / "himbeere.pid").absolute()


def log_path(config: Config) -> Path:
    return Path(config.log_file or Path(config.state_dir) / "himbeere.log").absolute()


def control(action: str, config: Config, run: Optional[Run] = None) -> int:
    """Do ``action`` (start, stop, restart, reload, status); return the exit code.

    ``run(config)`` runs the daemon in the foreground; it defaults to
    :func:`himbeere.daemon.run` and is a parameter so tests can start a
    stand-in.  Messages go to stdout, errors as one line to stderr.
    """
    try:
        if action == "start":
            return start(config, run)
        if action == "stop":
            return stop(config)
        if action == "restart":
            code = stop(config)
            return code if code != EXIT_OK else start(config, run)
        if action == "reload":
            return reload(config)
        if action == "status":
            return status(config)
    except PermissionError as exc:
        _error(f"{exc}; run as the daemon's user or as root")
        return EXIT_NO_PRIVILEGE
    except (HimbeereError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAILED
    _error(f"unknown action {action!r}; allowed: {', '.join(ACTIONS)}")
    return EXIT_BAD_ARGUMENT


def _error(message: str) -> None:
    print(f"himbeere: {message}", file=sys.stderr)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to another user
    try:
        # A detached daemon is reparented; in a container whose init does not
        # reap, a dead daemon lingers as a zombie that still answers kill(0).
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (not Linux): trust kill(0)
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def read_pid(path: Path) -> Optional[int]:
    """The pid in pidfile ``path``; ``None`` if there is none; -1 if garbage."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return -1
    return pid if pid > 0 else -1


def running_pid(config: Config) -> Optional[int]:
    """The pid of the running daemon, or ``None``."""
    pid = read_pid(pid_path(config))
    return pid if pid is not None and pid > 0 and alive(pid) else None


def _remove_stale(path: Path, pid: Optional[int]) -> None:
    """Remove ``path`` if it still names ``pid`` (a dead daemon's)."""
    if read_pid(path) == pid:
        path.unlink(missing_ok=True)


def status(config: Config) -> int:
    path = pid_path(config)
    pid = read_pid(path)
    if pid is None:
        print("not running")
        return STATUS_NOT_RUNNING
    if pid > 0 and alive(pid):
        print(f"running (pid {pid})")
        return EXIT_OK
    print(f"not running (stale pidfile {path})")
    return STATUS_DEAD_WITH_PIDFILE


def reload(config: Config) -> int:
    pid = running_pid(config)
    if pid is None:
        _error("not running; nothing to reload")
        return EXIT_NOT_RUNNING
    os.kill(pid, signal.SIGHUP)
    print(f"reloading (pid {pid})")
    return EXIT_OK


def stop(config: Config) -> int:
    path = pid_path(config)
    pid = read_pid(path)
    if pid is None:
        print("not running")
        return EXIT_OK
    if pid < 0 or not alive(pid):
        _remove_stale(path, pid)
        print(f"not running (removed stale pidfile {path})")
        return EXIT_OK
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while alive(pid):
        if time.monotonic() > deadline:
            _error(
                f"pid {pid} still running {STOP_TIMEOUT:g} s after SIGTERM; "
                f"see {log_path(config)}, or kill -KILL {pid}"
            )
            return EXIT_FAILED
        time.sleep(0.1)
    _remove_stale(path, pid)
    print(f"stopped (pid {pid})")
    return EXIT_OK


def _default_run() -> Run:
    # Imported late: himbeere.daemon imports much more than start/stop need.
    try:
        from .daemon import run
    except ImportError as exc:
        raise HimbeereError(f"cannot import the daemon: {exc}") from None
    return run


def start(config: Config, run: Optional[Run] = None) -> int:
    runner = run if run is not None else _default_run()
    pidfile = pid_path(config)
    pid = read_pid(pidfile)
    if pid is not None:
        if pid > 0 and alive(pid):
            print(f"already running (pid {pid})")
            return EXIT_OK
        _remove_stale(pidfile, pid)
        print(f"removed stale pidfile {pidfile}")
    state_dir = Path(config.state_dir).absolute()
    logfile = log_path(config)
    # The daemon works in / (so it holds no mount busy): every path absolute.
    config = dataclasses.replace(
        config, state_dir=str(state_dir), pid_file=str(pidfile), log_file=str(logfile)
    )
    for directory in {state_dir, pidfile.parent, logfile.parent}:
        directory.mkdir(parents=True, exist_ok=True)
    # Opened here so that a log file we may not write is this command's error.
    log = open(logfile, "a", encoding="utf-8")
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        code = EXIT_FAILED
        try:
            os.close(read_end)
            code = _detach_and_run(config, runner, log, write_end)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    log.close()
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        report = _read_report(pipe.fileno())
    if report is None:
        _error(f"no word from the daemon within {START_TIMEOUT:g} s; see {logfile}")
        return EXIT_FAILED
    if not report.startswith("ok "):
        _error(report or f"the daemon exited while starting: {_last_line(logfile)}")
        return EXIT_FAILED
    pid = int(report.split()[1])
    deadline = time.monotonic() + START_CHECK
    while time.monotonic() < deadline:
        if not alive(pid):
            _error(f"the daemon exited right after starting: {_last_line(logfile)}")
            return EXIT_FAILED
        time.sleep(0.05)
    print(f"started (pid {pid}), log in {logfile}")
    return EXIT_OK


def _read_report(fd: int) -> Optional[str]:
    """The daemon's one-line report; "" if it closed the pipe without one."""
    data = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        poller = select.poll()  # not select(): safe for fd >= 1024
        poller.register(fd, select.POLLIN)
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{lines[-1].strip()} (see {path})" if lines else f"see {path}"


def _detach_and_run(config: Config, run: Run, log: TextIO, report_fd: int) -> int:
    """In the forked child: become a daemon, take the pidfile, run.

    Never returns to the caller's code; :func:`start` ``os._exit``\\ s with
    the result.
    """
    import daemon

    def report(message: str) -> None:
        os.write(report_fd, message.encode("utf-8") + b"\n")
        os.close(report_fd)

    # DaemonContext points fds 0-2 at /dev/null and the log file; the
    # sys.std* objects must be the ones on those fds (pytest and others
    # replace them).
    for name in ("stdin", "stdout", "stderr"):
        original = getattr(sys, f"__{name}__")
        if original is None:
            original = open(os.devnull, "r" if name == "stdin" else "w")
        setattr(sys, name, original)
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        stdout=log,
        stderr=log,
        files_preserve=[report_fd],
        # Until run() installs its own handlers (it should), SIGTERM and
        # SIGHUP end the process through SystemExit, so the pidfile goes away
        # instead of going stale.
        signal_map={
            signal.SIGTSTP: None,
            signal.SIGTTIN: None,
            signal.SIGTTOU: None,
            signal.SIGTERM: "terminate",
            signal.SIGHUP: "terminate",
        },
    )
    context.open()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    pidfile = Path(config.pid_file or "")
    try:
        # A daemon in the foreground on the same node has no pidfile.
        statelock.acquire(config.state_dir)
    except (AlreadyRunning, OSError) as exc:
        report(str(exc))
        return EXIT_FAILED
    try:
        write_pidfile(pidfile)
    except FileExistsError:
        report(f"pidfile {pidfile} appeared meanwhile: another start is under way")
        return EXIT_FAILED
    except OSError as exc:
        report(f"cannot write pidfile {pidfile}: {exc.strerror or exc}")
        return EXIT_FAILED
    try:
        report(f"ok {os.getpid()}")
        try:
            return int(run(config) or 0)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            return EXIT_FAILED
        except BaseException:
            traceback.print_exc()
            return EXIT_FAILED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _remove_stale(pidfile, os.getpid())


def write_pidfile(path: Path) -> None:
    """Write this process's pid to ``path``; FileExistsError if it exists.

    Written aside and hard-linked into place: two concurrent starts race for
    the name instead of overwriting each other, and ``stop`` never reads a
    half-written (empty, so "stale") pidfile.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()

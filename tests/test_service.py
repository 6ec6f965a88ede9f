"""Background daemon control with real processes and real signals.

A stand-in ``run`` records what happens to it in ``<state_dir>/events``; the
tests start it with ``control("start")`` exactly as ``rspby start`` would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from himbeere import service
from himbeere.config import Config
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
RSPBY = REPO / "init_scripts" / "rspby"


def recording_run(config: Config) -> int:
    """Runs until SIGTERM, writing "HUP" to the events file on each SIGHUP."""
    events = Path(config.state_dir) / "events"
    flags = {"hup": 0, "term": False}

    def on_hup(signum: int, frame: object) -> None:
        flags["hup"] += 1

    def on_term(signum: int, frame: object) -> None:
        flags["term"] = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)

    def record(event: str) -> None:
        with open(events, "a") as handle:
            handle.write(event + "\n")

    print("hello from run in", os.getcwd())
    record("started")
    seen = 0
    while not flags["term"]:
        if flags["hup"] != seen:
            seen = flags["hup"]
            record("HUP")
        time.sleep(0.02)
    record("stopped")
    return 0


def failing_run(config: Config) -> int:
    raise RuntimeError("server: not set and no server file")


def events(config: Config) -> list[str]:
    path = Path(config.state_dir) / "events"
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    settings = Config(state_dir=str(tmp_path / "state"))
    yield settings
    # Never leave a daemon behind, whatever the test did.
    pid = service.read_pid(service.pid_path(settings))
    if pid is not None and pid > 0 and service.alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_start_status_reload_stop(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.control("start", config, recording_run) == 0
    out = capsys.readouterr().out
    assert "started (pid" in out
    pid = service.read_pid(service.pid_path(config))
    assert pid is not None and pid != os.getpid() and service.alive(pid)
    wait_for(lambda: "started" in events(config), message=lambda: str(events(config)))

    assert service.control("status", config) == 0
    assert capsys.readouterr().out.strip() == f"running (pid {pid})"

    assert service.control("reload", config) == 0
    wait_for(lambda: "HUP" in events(config), message=lambda: str(events(config)))
    assert service.alive(pid)

    assert service.control("stop", config) == 0
    assert f"stopped (pid {pid})" in capsys.readouterr().out
    assert events(config) == ["started", "HUP", "stopped"]
    assert not service.pid_path(config).exists()

    assert service.control("status", config) == 3
    assert capsys.readouterr().out.strip() == "not running"
    log = service.log_path(config).read_text()
    assert "hello from run in /" in log


def test_start_when_running_says_so(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.control("start", config, recording_run) == 0
    pid = service.read_pid(service.pid_path(config))
    assert service.control("start", config, recording_run) == 0
    assert f"already running (pid {pid})" in capsys.readouterr().out
    assert service.control("restart", config, recording_run) == 0
    new_pid = service.read_pid(service.pid_path(config))
    assert new_pid != pid and not service.alive(pid or 0)
    assert service.control("stop", config) == 0


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_pidfile_is_reported_and_replaced(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    pidfile = service.pid_path(config)
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{dead_pid()}\n")
    assert service.control("status", config) == 1
    assert "stale pidfile" in capsys.readouterr().out
    assert service.control("reload", config) == 7

    assert service.control("start", config, recording_run) == 0
    assert "removed stale pidfile" in capsys.readouterr().out
    assert service.control("status", config) == 0
    assert service.control("stop", config) == 0


def test_stop_removes_garbage_pidfile(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    pidfile = service.pid_path(config)
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text("not a pid")
    assert service.control("stop", config) == 0
    assert "removed stale pidfile" in capsys.readouterr().out
    assert not pidfile.exists()


def test_failing_daemon_is_a_failed_start(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.control("start", config, failing_run) == 1
    err = capsys.readouterr().err
    assert "exited right after starting" in err
    assert "server: not set and no server file" in err
    assert len(err.strip().splitlines()) == 1
    assert not service.pid_path(config).exists()


def test_not_running(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.control("stop", config) == 0
    assert service.control("reload", config) == 7
    assert service.control("status", config) == 3
    assert "not running" in capsys.readouterr().out


def test_unknown_action(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.control("explode", config) == 2
    assert "allowed: start, stop, restart, reload, status" in capsys.readouterr().err


def test_pid_and_log_file_from_config(tmp_path: Path) -> None:
    config = Config(state_dir=str(tmp_path), pid_file="/run/h.pid", log_file="/var/log/h.log")
    assert service.pid_path(config) == Path("/run/h.pid")
    assert service.log_path(config) == Path("/var/log/h.log")
    default = Config(state_dir=str(tmp_path))
    assert service.pid_path(default) == tmp_path / "himbeere.pid"
    assert service.log_path(default) == tmp_path / "himbeere.log"


def rspby(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # HIMBEERE_SYSTEMD_DIR empty: install leaves the machine's systemd alone.
        ["bash", str(RSPBY), *args], env={**os.environ, "HIMBEERE_SYSTEMD_DIR": "", **env},
        capture_output=True, text=True, timeout=900,
    )


def test_rspby_without_action_prints_usage(tmp_path: Path) -> None:
    result = rspby(env={"HIMBEERE_VENV": str(tmp_path / "venv")})
    assert result.returncode != 0
    assert "Usage:" in result.stderr and "install|start|stop" in result.stderr


def test_rspby_start_before_install(tmp_path: Path) -> None:
    result = rspby("start", env={"HIMBEERE_VENV": str(tmp_path / "venv")})
    assert result.returncode == 5
    assert "not installed" in result.stderr and "install" in result.stderr


@pytest.mark.slow
def test_rspby_install_from_checkout(tmp_path: Path) -> None:
    if not (REPO / "setup.py").exists() or not (REPO / "himbeere" / "__init__.py").exists():
        pytest.skip("the checkout is not installable yet (setup.py, himbeere/__init__.py)")
    # Copy the checkout so the build leaves no egg-info or build/ behind in it.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".cache", "*.egg-info", "build", "__pycache__", ".*_cache"))
    venv = tmp_path / "venv"
    env = {"HIMBEERE_VENV": str(venv), "HIMBEERE_SOURCE": str(source),
           "HIMBEERE_PYTHON": sys.executable}
    result = rspby("install", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import himbeerecouch, himbeere.identity, himbeere.service"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert (venv / "bin" / "himbeere").exists()
    # A second install upgrades the existing virtualenv in place.
    again = rspby("install", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Upgrading virtualenv" in again.stdout

"""The components' one lifecycle (himbeere/component.py); no server needed."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from himbeere import statelock
from himbeere.component import Component
from himbeere.config import Config
from himbeere.daemon import Daemon
from himbeere.fleet.placement import CHILD_FENCE, LEASE_TTL


class Ticker(Component):
    name = "ticker"

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.finished = 0

    def loop(self) -> None:
        self.steps += 1
        self.stopping.wait(0.01)

    def after_stop(self) -> None:
        self.finished += 1


class Stubborn(Component):
    """Ignores ``stopping`` until ``release`` is set."""

    name = "stubborn"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self) -> None:
        self.release.wait(10)


def test_stop_joins_the_thread_and_is_idempotent() -> None:
    ticker = Ticker().start()
    assert ticker.thread is not None and ticker.thread.is_alive()
    while ticker.steps < 2:
        time.sleep(0.01)
    assert ticker.stop(1.0) is True
    assert not ticker.thread.is_alive()
    assert ticker.stopping.is_set()
    assert ticker.stop(1.0) is True  # a second stop: nothing more happens
    assert ticker.finished == 1


def test_start_again_after_stop() -> None:
    ticker = Ticker().start()
    ticker.stop(1.0)
    first = ticker.thread
    ticker.start()
    assert ticker.thread is not first and not ticker.stopping.is_set()
    assert ticker.stop(1.0) is True
    assert ticker.finished == 2


def test_stop_before_start_runs_after_stop_once() -> None:
    ticker = Ticker()
    assert ticker.stop() is True
    assert ticker.stop() is True
    assert ticker.finished == 1


def test_a_thread_that_ignores_stopping_is_reported_after_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    stubborn = Stubborn().start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="himbeere.component"):
        assert stubborn.stop(0.2) is False
    assert 0.2 <= time.monotonic() - started < 2.0
    assert "stubborn: thread still running 0.2 s after stop" in caplog.text
    stubborn.release.set()
    assert stubborn.stop(2.0) is True


def test_a_failing_step_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    class Flaky(Component):
        name = "flaky"
        stop_timeout = 3.0

        def loop(self) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("first step fails")
            self.stopping.wait(0.01)

    with caplog.at_level(logging.ERROR, logger="himbeere.component"):
        flaky = Flaky().start()
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flaky.stop() is True
    assert len(calls) >= 2
    assert "flaky: step failed" in caplog.text


# -- the daemon's components: one list, stopped in reverse ---------------------------------
@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon set up but not run: no server is asked (port 9 has none)."""
    node = Daemon(Config(server="http://127.0.0.1:9", state_dir=str(tmp_path), mac_id=7))
    yield node
    node.supervisor.close()
    statelock.release(tmp_path)


def test_daemon_stops_its_components_in_reverse_order(daemon: Daemon,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    for component in daemon.components:
        monkeypatch.setattr(component, "stop",
                            lambda timeout=None, name=component.name: events.append(name))
    monkeypatch.setattr(daemon.supervisor, "stop_all",
                        lambda force=False: events.append("programs"))
    daemon.shutdown()
    assert [c.name for c in daemon.components] == [
        "status", "logs", "commands", "placement", "rollouts", "feed", "recheck", "upgrade",
        "himbeere-pairing"]
    # What brings work in stops first; programs stop before the commands get their grace.
    assert events == ["himbeere-pairing", "upgrade", "recheck", "feed", "rollouts", "placement",
                      "programs", "commands", "logs", "status"]


def test_daemon_applies_settings_at_setup_and_at_reload(daemon: Daemon) -> None:
    def settings() -> tuple[Any, ...]:
        return (daemon.supervisor.grace_period, daemon.supervisor.default_restart,
                daemon.supervisor.fence, daemon.supervisor.max_programs,
                daemon.status.interval, daemon.placement.interval, daemon.placement.lease.ttl,
                daemon.commands.default_timeout, daemon.commands.grace_period,
                daemon.output.rate)

    config = daemon.config
    assert settings() == (config.grace_period, config.restart_policy,
                          CHILD_FENCE * config.heartbeat_interval, config.max_programs,
                          config.heartbeat_interval, config.heartbeat_interval,
                          LEASE_TTL * config.heartbeat_interval, config.command_timeout,
                          config.grace_period, config.program_log_rate)
    new = dataclasses.replace(config, grace_period=3.0, restart_policy="never",
                              heartbeat_interval=2.0, max_programs=4, command_timeout=9.0,
                              program_log_rate=5.0)
    daemon.apply(new)
    assert daemon.config is new
    assert settings() == (3.0, "never", CHILD_FENCE * 2.0, 4, 2.0, 2.0, LEASE_TTL * 2.0, 9.0,
                          3.0, 5.0)

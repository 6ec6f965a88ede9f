"""The components' one lifecycle (himbeere/component.py); no server needed."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from himbeere.component import Component


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

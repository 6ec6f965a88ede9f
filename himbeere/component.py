"""One lifecycle for the daemon's background components (feed, status, placement ...).

``start()`` runs :meth:`Component.run` in a daemon thread; ``stop(timeout)``
sets ``stopping``, wakes the thread, joins it for at most ``timeout``
seconds (a thread that lives on is logged, never waited for forever) and
then calls :meth:`Component.after_stop` once.  Calling ``stop`` again is
harmless.  Models: gpiozero's ``GPIOThread``, huey's ``BaseProcess``.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Optional, TypeVar

from . import defaults

log = logging.getLogger(__name__)

C = TypeVar("C", bound="Component")


class Component:
    """A background thread with ``start()``, ``stop(timeout)`` and a ``stopping`` event."""

    #: The thread's name, and the component's in log lines.
    name = "component"
    #: Seconds ``stop()`` waits for the thread when given no timeout.
    stop_timeout = 5.0

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self._stopped = False

    def start(self: C) -> C:
        if self.thread is None or not self.thread.is_alive():
            self.stopping.clear()
            self._stopped = False
            self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
            self.thread.start()
        return self

    def run(self) -> None:
        """The thread: :meth:`loop` until stopping; a step that fails is logged."""
        while not self.stopping.is_set():
            try:
                self.loop()
            except Exception:
                log.exception("%s: step failed", self.name)
                self.stopping.wait(1.0)  # a step that keeps failing must not spin

    def loop(self) -> None:
        """One step of :meth:`run`; tests call it directly."""
        raise NotImplementedError

    def wake(self) -> None:
        """Interrupt what the thread waits on besides ``stopping`` (a poke, a socket)."""

    def after_stop(self) -> None:
        """Once, when the thread has ended (or ``stop``'s timeout passed)."""

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop the thread; False if it still runs ``timeout`` seconds later."""
        self.stopping.set()
        self.wake()
        timeout = self.stop_timeout if timeout is None else timeout
        thread, ended = self.thread, True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            ended = not thread.is_alive()
            if not ended:
                # 0 s: a thread that may end late, on purpose (the feed between heartbeats).
                log.log(logging.WARNING if timeout else logging.DEBUG,
                        "%s: thread still running %.1f s after stop", self.name, timeout)
        if not self._stopped:
            self._stopped = True
            self.after_stop()
        return ended


class Backoff:
    """Capped, jittered exponential delays: 0.5 s, 1 s, 2 s ... up to the cap.

    Each delay is drawn from the upper half of its step, so a fleet of nodes
    that lost the server together does not come back in one wave.
    """

    def __init__(self, first: float = defaults.RECONNECT_MIN,
                 cap: float = defaults.RECONNECT_MAX) -> None:
        self.first, self.cap = first, cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.attempt))
        if delay < self.cap:
            # Stop counting at the cap: 2 ** 1024 does not fit a float, and
            # a server gone for a night used to end the feed for good.
            self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0

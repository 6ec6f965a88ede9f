"""The node's LED: blinking while the node waits to be paired.

RPi.GPIO is imported only when an LED is about to blink.  Anywhere but on a
Pi that import fails (``ImportError`` when the package is missing,
``RuntimeError`` from RPi.GPIO itself on other hardware) and the LED is a
no-op, so the daemon runs the same on a laptop.

The backend is injectable, as in gpiozero: pass any object with RPi.GPIO's
``setwarnings``, ``setmode``, ``setup``, ``output``, ``cleanup`` and its
``BCM``, ``OUT``, ``HIGH``, ``LOW`` constants.  That is how the tests watch
an LED blink without a Pi.
"""

from __future__ import annotations

import importlib
import logging
from types import TracebackType
from typing import Any, Optional

from .component import Component

log = logging.getLogger(__name__)

#: Seconds the LED stays on, then off (the original's rhythm).
BLINK_INTERVAL = 0.4


def load_backend() -> Optional[Any]:
    """The ``RPi.GPIO`` module, or ``None`` where it cannot drive a pin."""
    try:
        return importlib.import_module("RPi.GPIO")
    except (ImportError, RuntimeError) as exc:
        # RuntimeError: "This module can only be run on a Raspberry Pi!"
        log.debug("no LED: RPi.GPIO cannot be used here (%s)", exc)
        return None


class Blinker(Component):
    """Blink the LED on BCM pin ``pin`` from a thread until :meth:`stop`.

    ``pin=None`` means no LED.  ``backend=None`` loads RPi.GPIO when
    :meth:`start` is called.  Use it as a context manager::

        with Blinker(16):
            wait_for_something()
    """

    name = "himbeere-led"
    stop_timeout = 2.0

    def __init__(self, pin: Optional[int], backend: Any = None,
                 interval: float = BLINK_INTERVAL) -> None:
        super().__init__()
        self.pin = pin
        self.backend = backend
        self.interval = interval

    @property
    def blinking(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> Blinker:
        if self.pin is None or self.blinking:
            return self
        if self.backend is None:
            self.backend = load_backend()
            if self.backend is None:
                return self
        return super().start()

    def run(self) -> None:
        gpio, pin = self.backend, self.pin
        try:
            gpio.setwarnings(False)
            gpio.setmode(gpio.BCM)
            gpio.setup(pin, gpio.OUT)
        except Exception as exc:  # bad pin, no access to /dev/gpiomem...
            log.warning("cannot blink the LED on GPIO %s: %s", pin, exc)
            return
        try:
            state = False
            while not self.stopping.is_set():
                state = not state
                gpio.output(pin, gpio.HIGH if state else gpio.LOW)
                self.stopping.wait(self.interval)
            gpio.output(pin, gpio.LOW)
        except Exception as exc:
            log.warning("LED on GPIO %s stopped blinking: %s", pin, exc)
        finally:
            # Hand the pin back: the node's programs may want it.
            try:
                gpio.cleanup(pin)
            except Exception as exc:
                log.debug("GPIO cleanup of pin %s failed: %s", pin, exc)

    def __enter__(self) -> Blinker:
        return self.start()

    def __exit__(self, kind: Optional[type[BaseException]], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.stop()

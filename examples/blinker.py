"""A GPIO blinker that still runs where there is no GPIO.

On a Pi it blinks an LED on BCM pin 17 (with a resistor to ground).  Where
RPi.GPIO cannot drive a pin (a laptop, a test machine, a Pi without the
``himbeerecouch[gpio]`` extra) it logs what the LED would do instead, so
the same program can be tried anywhere.  RPi.GPIO raises ``ImportError``
when it is missing and ``RuntimeError`` on hardware that is not a Pi;
both mean "no GPIO here".
"""

import time

PIN = 17
#: Seconds the LED stays on, then off.
HALF_PERIOD = 0.5
#: Without GPIO, log one blink in this many (the log is not an LED).
LOG_EVERY = 10


class LoggedLED:
    """Stands in for the LED: counts the blinks and logs some of them."""

    def __init__(self, reason):
        self.blinks = 0
        log(f"no GPIO here ({reason}): blinking in the log instead")

    def set(self, on):
        if on:
            self.blinks += 1
            if self.blinks == 1 or self.blinks % LOG_EVERY == 0:
                log(f"blink {self.blinks}")

    def close(self):
        log(f"stopped after {self.blinks} blinks")


class GpioLED:
    """The LED on ``pin``, through RPi.GPIO."""

    def __init__(self, gpio, pin):
        self.gpio, self.pin = gpio, pin
        gpio.setwarnings(False)
        gpio.setmode(gpio.BCM)
        gpio.setup(pin, gpio.OUT)
        log(f"blinking the LED on BCM pin {pin}")

    def set(self, on):
        self.gpio.output(self.pin, self.gpio.HIGH if on else self.gpio.LOW)

    def close(self):
        self.gpio.output(self.pin, self.gpio.LOW)
        self.gpio.cleanup(self.pin)


def open_led(pin):
    """The real LED when RPi.GPIO can drive ``pin``, else one that logs."""
    try:
        import RPi.GPIO as gpio
    except (ImportError, RuntimeError) as exc:
        return LoggedLED(exc)
    return GpioLED(gpio, pin)


def main():
    led = open_led(PIN)
    on = False
    try:
        while not should_quit():
            on = not on
            led.set(on)
            time.sleep(HALF_PERIOD)
    finally:
        led.close()

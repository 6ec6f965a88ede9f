"""The example program: greets, ticks once a second, and says goodbye.

Push it to a node with ``himbeere-upload push examples/hello.py --node NODE``.
``log``, ``should_quit``, ``register_quit_notification`` and ``node`` are
given to every program by the daemon; they need no import.
"""

import time


def goodbye():
    log("asked to quit: goodbye")


def main():
    register_quit_notification(goodbye)
    log("hello from node", node)
    ticks = 0
    while not should_quit():
        ticks += 1
        log("tick", ticks)
        for _ in range(10):
            if should_quit():
                break
            time.sleep(0.1)

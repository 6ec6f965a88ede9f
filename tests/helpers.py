"""Small helpers shared by the tests.

Tests never assert on how long something took: they wait for a condition up
to a generous deadline with :func:`wait_for` and fail only when it never holds.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any, Callable, TypeVar, Union

import pytest

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    interval: float = 0.05,
    message: Union[str, Callable[[], str]] = "condition never became true",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError with ``message`` (a string, or a callable for a
    message that shows the state at the deadline) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout:g} s)")
        time.sleep(interval)


#: Set to run every daemon of ``node_factory`` with a node user's credentials
#: on databases set up by ``himbeere-upload setup``; CI runs the daemon tests
#: again this way, because the daemon must never need admin rights.
AS_NODE_ENV = "HIMBEERE_TEST_AS_NODE"


def needs_admin_daemon(reason: str) -> Any:
    """Skip a test in the node-credentials run: it tests what only an admin may do."""
    return pytest.mark.skipif(AS_NODE_ENV in os.environ,
                              reason=f"{AS_NODE_ENV} is set (daemons run as node users): "
                                     f"{reason}")


#: The password of users made by the ``make_user`` fixture unless a test gives one.
USER_PASSWORD = "correct horse battery"


def random_mac() -> int:
    """A MAC id no other test uses: users are server-wide, databases are not."""
    return 10**14 + secrets.randbelow(10**14)


def himbeere(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """Run ``himbeere ARGV`` in-process: exit code, stdout, stderr."""
    from uploader.main import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err

"""The dashboard, in Chromium, for a node that joined after an ``--all`` command.

It showed the command as "waiting" forever on the command page and the
node page (issue 12, item 11); it shows "not targeted (joined later)".
Heartbeats and results are written the way daemons write them: no daemon
is needed to show them.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_cli_output import answer, heartbeat
from tests.test_dashboard_browser import (  # noqa: F401 (fixtures)
    browser,
    dashboard_url,
    shot,
    sign_in,
    text_of,
    unstale,
    wait_until,
)
from uploader import ops
from uploader.fleet import Fleet

pytestmark = pytest.mark.slow

By = pytest.importorskip("selenium.webdriver.common.by").By


def test_the_command_and_node_pages_show_not_targeted_joined_later(
        browser: Any, dashboard_url: str, fleet: Fleet,  # noqa: F811
        deployer: tuple[str, str]) -> None:
    heartbeat(fleet, 1001)
    command_id = ops.create_command(fleet, ["uname"], "all")
    answer(fleet, command_id, 1001, "Linux\n")
    heartbeat(fleet, 1002)  # joined later: its daemon skips the command
    sign_in(browser, dashboard_url, deployer)

    browser.get(f"{dashboard_url}/commands/{command_id}")
    wait_until(browser, lambda: "1/1 answered" in text_of(browser, "progress"), "the results")

    def row(mac: int) -> str:
        return str(unstale(lambda: browser.find_element(
            By.CSS_SELECTOR, f'#results tr[data-node="{mac}"]').text))

    wait_until(browser, lambda: "not targeted (joined later)" in row(1002), "the late node")
    assert "waiting" not in row(1002) and "Linux" in row(1001)
    shot(browser, "command-joined-later")

    browser.get(f"{dashboard_url}/nodes/1002")
    wait_until(browser, lambda: "not targeted (joined later)" in text_of(browser, "history"),
               "the command in the late node's history")
    assert "waiting" not in text_of(browser, "history")
    browser.get(f"{dashboard_url}/nodes/1001")
    wait_until(browser, lambda: "Linux" in text_of(browser, "history"), "the answer")
    assert "not targeted" not in text_of(browser, "history")

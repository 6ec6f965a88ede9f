"""The dashboard in a real headless Chromium, with real node daemons.

Debian's ``chromium`` and ``chromium-driver`` packages, driven by Selenium
(``/usr/bin/chromium``, ``/usr/bin/chromedriver``; no browser is
downloaded).  The tests skip, saying why, when either is missing.  The
dashboard runs in a thread on a free loopback port; screenshots go to
``artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("flask", reason="the dashboard needs Flask (pip install '.[dashboard]')")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="browser tests need selenium (pip install '.[test]')")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from himbeere.couch import Couch, security  # noqa: E402
from tests.helpers import USER_PASSWORD as PASSWORD  # noqa: E402
from tests.nodes import ROOT, Node  # noqa: E402
from tests.servers import free_port  # noqa: E402
from uploader import ops  # noqa: E402
from uploader.dashboard import create_app  # noqa: E402
from uploader.fleet import Fleet  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("HIMBEERE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HIMBEERE_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = ROOT / "artifacts"
WAIT = 40.0

NODE_A = 202481596941066
NODE_B = 202481596941067

CRASHING = '''\
def main():
    log("about to divide")
    ratio = 1 / 0
'''
CHATTY = '''\
import time

def main():
    n = 0
    while not should_quit():
        n += 1
        log("tick", n)
        time.sleep(0.5)
'''


def _find(path: str, *alternatives: str) -> str:
    for candidate in (path, *alternatives):
        if candidate and os.path.exists(candidate):
            return candidate
    return ""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium with a fresh profile."""
    chromium = _find(CHROMIUM, shutil.which("chromium") or "",
                     shutil.which("chromium-browser") or "")
    driver_path = _find(CHROMEDRIVER, shutil.which("chromedriver") or "")
    if not chromium or not driver_path:
        pytest.skip(f"Chromium not installed (looked for {CHROMIUM} and {CHROMEDRIVER}; "
                    "apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard_url(couch: Couch, fleet: Fleet) -> Iterator[str]:
    """The dashboard served by a real HTTP server in a thread, on a free loopback port."""
    app = create_app(couch.base, fleet.code.name, secret_key="browser test")
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        app.extensions["himbeere"].hub.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


def wait_until(browser: Any, condition: Callable[[], Any], what: str,
               timeout: float = WAIT) -> Any:
    """Wait for ``condition()`` (retried on stale elements); fail with a screenshot."""
    def check(_: Any) -> Any:
        try:
            return condition()
        except StaleElementReferenceException:
            return None

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(check)
    except Exception:
        shot(browser, "failure")
        raise AssertionError(f"{what} never happened on {browser.current_url}; page text:\n"
                             f"{browser.find_element(By.TAG_NAME, 'body').text[:3000]}"
                             ) from None


def unstale(action: Callable[[], Any], attempts: int = 50) -> Any:
    """``action()``, again on a fresh lookup while live updates replace the element."""
    for _ in range(attempts - 1):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.1)
    return action()


def text_of(browser: Any, element_id: str) -> str:
    """The text of the element with ``element_id``, looked up afresh (no stale element)."""
    return str(unstale(lambda: browser.find_element(By.ID, element_id).text))


def shot(browser: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    browser.save_screenshot(str(path))
    return path


def node_state(browser: Any, mac: int) -> str:
    def look() -> str:
        cells = browser.find_elements(By.CSS_SELECTOR, f'tr[data-node="{mac}"] td.state-cell')
        return str(cells[0].text) if cells else ""
    return str(unstale(look))


def sign_in(browser: Any, url: str, user: tuple[str, str]) -> None:
    browser.get(url + "/")
    wait_until(browser, lambda: "/login" in browser.current_url, "the redirect to sign in")
    browser.find_element(By.ID, "name").send_keys(user[0])
    browser.find_element(By.ID, "password").send_keys(user[1])
    browser.find_element(By.ID, "signin").click()
    wait_until(browser, lambda: browser.find_elements(By.ID, "nodes"), "the fleet page")


@pytest.fixture
def two_nodes(browser: Any, dashboard_url: str, fleet: Fleet, deployer: tuple[str, str],
              node_factory: Callable[..., Node]) -> list[Node]:
    """Node A runs a program that crashes, node B ("garden") one that logs; signed in."""
    fleet.code.save({"_id": f"{NODE_A}:crasher", "type": NODE_A, "name": "crasher",
                     "code": CRASHING})
    fleet.code.save({"_id": f"{NODE_B}:ticker", "type": NODE_B, "name": "ticker",
                     "code": CHATTY})
    nodes = [node_factory(mac_id=NODE_A), node_factory(mac_id=NODE_B)]
    nodes[0].wait_program(f"{NODE_A}:crasher", 40, restarts=1)
    nodes[1].wait_program(f"{NODE_B}:ticker", 40, state="running")
    fleet.set_name(NODE_B, "garden")
    sign_in(browser, dashboard_url, deployer)
    for mac in (NODE_A, NODE_B):
        wait_until(browser, lambda m=mac: node_state(browser, m) == "alive", f"node {mac} alive")
    return nodes


def test_the_fleet_page_shows_nodes_names_and_programs(browser: Any,
                                                       two_nodes: list[Node]) -> None:
    wait_until(browser, lambda: "garden" in text_of(browser, "nodes"), "the node's name")
    wait_until(browser, lambda: "crasher" in text_of(browser, "nodes"),
               "the crashing program in the fleet table")
    shot(browser, "fleet")


def test_a_fleet_command_from_the_browser(browser: Any, dashboard_url: str, fleet: Fleet,
                                          deployer: tuple[str, str],
                                          two_nodes: list[Node]) -> None:
    # One command document for both nodes; both results arrive live.
    for mac in (NODE_A, NODE_B):
        unstale(lambda m=mac: browser.find_element(
            By.CSS_SELECTOR, f'tr[data-node="{m}"] input.select').click())
    assert text_of(browser, "selected-count") == "2"
    browser.find_element(By.ID, "cmd").send_keys("echo 'hello from' a pi")
    browser.find_element(By.ID, "run-button").click()
    wait_until(browser, lambda: "/commands/cmd-" in browser.current_url, "the command page")
    wait_until(browser, lambda: "2/2 answered" in text_of(browser, "progress"), "both results")
    outputs = unstale(lambda: [o.text for o in browser.find_elements(
        By.CSS_SELECTOR, "#results pre.stdout")])
    assert outputs == ["hello from a pi", "hello from a pi"]
    codes = unstale(lambda: [c.text for c in browser.find_elements(
        By.CSS_SELECTOR, "#results td.returncode")])
    assert codes == ["0", "0"]
    shot(browser, "command")
    commands = ops.list_commands(fleet)
    assert len(commands) == 1 and commands[0]["created_by"] == deployer[0]
    browser.get(f"{dashboard_url}/commands")
    wait_until(browser, lambda: "2/2" in text_of(browser, "commands"), "the command in the list")
    shot(browser, "commands")

    # The node page lists it in the node's history.
    browser.get(f"{dashboard_url}/nodes/{NODE_A}")
    wait_until(browser, lambda: "hello from a pi" in text_of(browser, "history"),
               "the command in the node's history")


def test_a_traceback_and_a_live_log_in_the_browser(browser: Any, dashboard_url: str,
                                                   two_nodes: list[Node]) -> None:
    browser.get(f"{dashboard_url}/nodes/{NODE_A}")
    traceback = wait_until(
        browser, lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, "pre.traceback")
                          if "ZeroDivisionError" in e.text],
        "the traceback")[0]
    assert "ratio = 1 / 0" in traceback or "line 3" in traceback
    wait_until(browser, lambda: "about to divide" in text_of(browser, "log"),
               "the crasher's log line")
    shot(browser, "node")

    browser.get(f"{dashboard_url}/nodes/garden")
    wait_until(browser, lambda: "tick 2" in text_of(browser, "log"), "the ticker's log")
    seen = text_of(browser, "log").count("tick")
    wait_until(browser, lambda: text_of(browser, "log").count("tick") > seen + 1,
               "new log lines without a reload")


def test_a_node_that_stops_turns_stopped_live(browser: Any, two_nodes: list[Node]) -> None:
    page_id = browser.execute_script("return window.__pageId = Math.random();")
    two_nodes[1].stop()
    wait_until(browser, lambda: node_state(browser, NODE_B) == "stopped", "node B stopped")
    assert browser.execute_script("return window.__pageId;") == page_id  # no reload
    assert node_state(browser, NODE_A) == "alive"
    shot(browser, "fleet-stopped")


def test_the_fleet_table_at_1024_px_as_a_node(browser: Any, dashboard_url: str, fleet: Fleet,
                                              make_user: Callable[..., tuple[str, str]]) -> None:
    """Figures on one line at a laptop's width; a node user gets no Run, stop or restart."""
    from tests.test_dashboard import crashed_program, status_doc

    for mac, name, used, total in ((NODE_A, "kitchen", 812.4, 3792.0),
                                   (NODE_B, "garden-shed-by-the-pond", 211.0, 926.0)):
        doc = status_doc(mac, programs=crashed_program(mac))
        doc.update(memory_used_mb=used, memory_total_mb=total, load=[1.25, 0.5, 12.0])
        fleet.status.save(doc)
        fleet.set_name(mac, name)
        fleet.code.save({"_id": f"{mac}:blink", "type": mac, "name": "blink",
                         "code": "def main():\n    pass\n"})
    node = make_user([security.NODE_ROLE], str(10**14 + secrets.randbelow(10**14)))
    browser.set_window_size(1024, 800)
    sign_in(browser, dashboard_url, node)
    wait_until(browser, lambda: "812 / 3792 MB" in text_of(browser, "nodes"), "the memory column")
    lines = unstale(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('#nodes .figure, #nodes th'))"
        ".map((e) => [e.textContent, e.getClientRects().length]);"))
    assert len(lines) > 10 and all(n == 1 for _, n in lines), lines  # 2+ rects: it wrapped
    assert "1.25 0.50 12.00" in text_of(browser, "nodes")
    assert not browser.find_elements(By.ID, "run")
    shot(browser, "fleet-table")

    browser.get(f"{dashboard_url}/nodes/{NODE_A}")
    wait_until(browser, lambda: "blink" in text_of(browser, "programs"), "the program row")
    assert not browser.find_elements(By.CSS_SELECTOR, "#programs button")
    assert not browser.find_elements(By.ID, "run-button")


def test_signing_in_wrong_and_out(browser: Any, dashboard_url: str,
                                  deployer: tuple[str, str]) -> None:
    browser.get(dashboard_url + "/")
    browser.find_element(By.ID, "name").send_keys(deployer[0])
    browser.find_element(By.ID, "password").send_keys("not " + PASSWORD)
    browser.find_element(By.ID, "signin").click()
    wait_until(browser, lambda: "Wrong name or password" in browser.page_source, "the refusal")
    shot(browser, "login")
    sign_in(browser, dashboard_url, deployer)
    wait_until(browser, lambda: browser.find_element(By.ID, "live").text == "live",
               "the live indicator")
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait_until(browser, lambda: "/login" in browser.current_url, "the sign-in page")
    browser.get(dashboard_url + "/api/nodes")
    assert "sign in first" in browser.page_source

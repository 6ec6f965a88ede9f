"""The dashboard's page per program: where it runs, each node's release, its
history and its rollouts (issue 13, part 3), through Flask's test client and
in a real headless Chromium with a real daemon.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("flask", reason="the dashboard needs Flask (pip install '.[dashboard]')")

from flask.testing import FlaskClient  # noqa: E402

from tests.nodes import Node  # noqa: E402
from tests.test_dashboard import app, client, login, status_doc  # noqa: E402,F401
from uploader.fleet import Fleet  # noqa: E402
from uploader.push import push  # noqa: E402

try:  # the browser fixtures; without selenium only the browser test skips
    from tests.test_dashboard_browser import browser, dashboard_url  # noqa: F401
except (ImportError, pytest.skip.Exception):
    pass

MAC = 202481596941068


def two_releases(fleet: Fleet, tmp_path: Path) -> None:
    source = tmp_path / "blink.py"
    for text in ("one", "two"):
        source.write_text(f"import time\ndef main():\n    log({text!r})\n    time.sleep(3600)\n")
        push(fleet, source, MAC)


def test_the_program_api_and_page(client: FlaskClient, fleet: Fleet,  # noqa: F811
                                  tmp_path: Path,
                                  deployer: tuple[str, str]) -> None:
    two_releases(fleet, tmp_path)
    fleet.status.save(status_doc(MAC, programs={f"{MAC}:blink": {
        "name": "blink", "rev": "2-abc", "state": "running", "restarts": 0, "release": 1}}))
    fleet.status.save({"_id": "rollout:blink:000002", "type": "himbeere-rollout",
                       "state": "running", "waves": [1, "100%"]})
    login(client, *deployer)

    answer = client.get("/api/programs/blink").get_json()
    assert answer["name"] == "blink" and answer["latest"] == 2
    assert answer["docs"] == [{"id": f"{MAC}:blink", "where": str(MAC), "release": 2,
                               "enabled": True}]
    assert [(n["node"], n["id"], n["state"], n["release"]) for n in answer["nodes"]] == [
        (MAC, f"{MAC}:blink", "running", 1)]
    assert [r["release"] for r in answer["releases"]] == [2, 1]
    assert answer["releases"][0]["pushed_by"] == (fleet.user or "admin")  # the pusher
    assert answer["rollouts"] == [{"id": "rollout:blink:000002", "state": "running",
                                   "waves": [1, "100%"]}]

    page = client.get("/programs/blink")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for section in ("Where it runs", "Releases", "Rollouts"):
        assert f"<h2>{section}</h2>" in html
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', html)
    assert match and json.loads(match.group(1))["latest"] == 2

    missing = client.get("/api/programs/nothing")
    assert missing.status_code == 404
    assert missing.get_json()["error"] == ("no program named 'nothing': no documents, "
                                           "releases or nodes run it")


@pytest.mark.slow
def test_the_program_page_in_the_browser(tmp_path: Path, fleet: Fleet,
                                         deployer: tuple[str, str],
                                         node_factory: Callable[..., Node],
                                         request: pytest.FixtureRequest) -> None:
    """A real node runs release 2; the page shows it, links from the node page, and
    follows a rollback live (release 3 on the node) without a reload."""
    from tests import test_dashboard_browser as ui

    browser: Any = request.getfixturevalue("browser")  # skips without Chromium
    url: str = request.getfixturevalue("dashboard_url")
    from selenium.webdriver.common.by import By

    two_releases(fleet, tmp_path)
    node = node_factory(mac_id=MAC)
    node.wait_program(f"{MAC}:blink", 40, state="running", release=2)
    ui.sign_in(browser, url, deployer)
    browser.get(f"{url}/nodes/{MAC}")
    link = "#programs a[href='/programs/blink']"
    ui.wait_until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, link),
                  "the link to the program page")
    # Looked up afresh at each try: the live feed redraws the table under it.
    ui.unstale(lambda: browser.find_element(By.CSS_SELECTOR, link).click())
    ui.wait_until(browser, lambda: "/programs/blink" in browser.current_url, "the program page")

    def node_release() -> str:
        cells = browser.find_elements(By.CSS_SELECTOR,
                                      f'#program-nodes tr[data-node="{MAC}"] td.release')
        return str(cells[0].text) if cells else ""

    ui.wait_until(browser, lambda: ui.unstale(node_release) == "2", "node runs release 2")
    rows = ui.unstale(lambda: [r.get_attribute("data-release") for r in
                               browser.find_elements(By.CSS_SELECTOR, "#releases tbody tr")])
    assert rows == ["2", "1"]
    page_id = browser.execute_script("return window.__pageId = Math.random();")

    from uploader.releases import rollback

    rollback(fleet, "blink", 1)
    ui.wait_until(browser, lambda: ui.unstale(node_release) == "3", "node runs release 3")
    ui.wait_until(browser, lambda: "rollback to release 1" in ui.text_of(browser, "releases"),
                  "the rollback in the history")
    assert browser.execute_script("return window.__pageId;") == page_id  # no reload
    ui.shot(browser, "program")

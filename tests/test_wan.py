"""The WAN link the edge-site tests cut: it forwards while up, resets while cut."""

from __future__ import annotations

import pytest
import requests

from tests.wan import WanLink


def test_a_cut_link_resets_open_and_new_connections_and_a_restored_one_forwards(
        couch_url: str) -> None:
    port = int(couch_url.rsplit(":", 1)[1].strip("/"))
    link = WanLink(port)
    try:
        through = link.url(couch_url)
        session = requests.Session()
        assert session.get(through, timeout=10).json().get("version")
        link.cut()
        with pytest.raises(requests.ConnectionError):
            session.get(through, timeout=10)  # the kept-alive connection was reset
        with pytest.raises(requests.ConnectionError):
            requests.get(through, timeout=10)  # and a new one is refused
        link.restore()
        assert requests.get(through, timeout=10).json().get("version")
        assert link.cuts == 1
    finally:
        link.close()

"""The original ``himbeerecouch`` calls keep working on top of himbeere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import himbeerecouch
from himbeere import identity


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node with a fixed MAC id, its state in ``tmp_path``, no config file."""
    monkeypatch.setenv("HIMBEERE_MAC_ID", "0xb827eb123456")
    monkeypatch.setenv("HIMBEERE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HIMBEERE_CONFIG", str(tmp_path / "himbeere.conf"))
    (tmp_path / "himbeere.conf").write_text("[himbeere]\n")
    monkeypatch.setenv("HIMBEERE_SERVER_FILE", str(tmp_path / "no-server-file"))
    return tmp_path


def test_original_names_exist() -> None:
    assert callable(himbeerecouch.broadcast_message)
    assert callable(himbeerecouch.run_daemon)
    for name in ("getmacid", "getpassword", "getipaddr", "getserial"):
        assert callable(getattr(himbeerecouch.util, name))


def test_getmacid_uses_the_configured_id(node: Path) -> None:
    assert himbeerecouch.util.getmacid() == 0xB827EB123456


def test_getpassword_is_the_daemons_stored_password(node: Path) -> None:
    password = himbeerecouch.util.getpassword()
    assert isinstance(password, str) and password
    assert password == identity.getpassword(node)
    assert (node / identity.PASSWORD_FILE).exists()


def test_legacy_password_from_config(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIMBEERE_LEGACY_PASSWORD", "yes")
    expected = identity.legacy_password(0xB827EB123456, identity.getserial())
    assert himbeerecouch.util.getpassword() == expected


def test_broken_config_falls_back_to_defaults(
    node: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HIMBEERE_HEARTBEAT_INTERVAL", "often")
    settings = himbeerecouch.util.settings()
    assert settings.mac_id is None and settings.heartbeat_interval > 0
    assert "using default settings" in caplog.text


def test_getserial_and_getipaddr_types(node: Path) -> None:
    assert isinstance(himbeerecouch.util.getserial(), str)
    if importlib.util.find_spec("netifaces") is None:
        pytest.skip("netifaces is not installed")
    address = himbeerecouch.util.getipaddr()
    assert address is None or isinstance(address, str)


def test_broadcast_message_without_discovery_is_not_implemented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if importlib.util.find_spec("himbeere.discovery") is not None:
        pytest.skip("himbeere.discovery exists; forwarding is tested with it")
    with pytest.raises(NotImplementedError, match="himbeere.discovery"):
        himbeerecouch.broadcast_message("http://server.name:5984", timeout=0.1)


def test_run_daemon_status_of_a_stopped_daemon(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = himbeerecouch.run_daemon("status", str(node / "server"), str(node / "rspby"))
    assert code == 3
    assert "not running" in capsys.readouterr().out


def test_run_daemon_unknown_command(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = himbeerecouch.run_daemon("jump", str(node / "server"), str(node))
    assert code == 2
    assert "allowed: start, stop, restart, reload, status" in capsys.readouterr().err

"""Settings: INI file, then HIMBEERE_* variables, then flags; clear errors."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from himbeere import config, defaults
from himbeere.exceptions import ConfigError


def write_ini(path: Path, **values: str) -> Path:
    lines = ["[himbeere]"] + [f"{key} = {value}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    cfg = config.load({}, environ={}, config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.database == defaults.DATABASE == "raspberries"
    assert cfg.status_db == "raspberries_status"
    assert cfg.heartbeat_interval == 10.0
    assert cfg.interface == "eth0"
    assert cfg.mac_id is None


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", server="http://file:5984", database="fromfile",
                    mac_id="1", heartbeat_interval="7", state_dir="/tmp/file")
    environ = {"HIMBEERE_DATABASE": "fromenv", "HIMBEERE_MAC_ID": "2",
               "HIMBEERE_CONFIG": str(ini)}
    cfg = config.load({"mac_id": "3"}, environ=environ)
    assert cfg.server == "http://file:5984"  # only in the file
    assert cfg.heartbeat_interval == 7.0
    assert cfg.database == "fromenv"  # env beats file
    assert cfg.mac_id == 3  # flag beats env
    assert cfg.state_dir == "/tmp/file"


def test_every_documented_name_is_read(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", server="http://h:1", database="a",
                    status_database="b", state_dir="/s", interface="wlan0", mac_id="0x10",
                    heartbeat_interval="2.5")
    cfg = config.load({}, environ={}, config_file=str(ini))
    assert (cfg.server, cfg.database, cfg.status_db, cfg.state_dir, cfg.interface,
            cfg.mac_id, cfg.heartbeat_interval) == (
        "http://h:1", "a", "b", "/s", "wlan0", 16, 2.5)
    environ = {"HIMBEERE_SERVER": "http://e:2", "HIMBEERE_DATABASE": "e",
               "HIMBEERE_STATE_DIR": "/e", "HIMBEERE_INTERFACE": "e0",
               "HIMBEERE_MAC_ID": "5"}
    cfg = config.load({}, environ=environ, config_file=str(ini))
    assert (cfg.server, cfg.database, cfg.state_dir, cfg.interface, cfg.mac_id) == (
        "http://e:2", "e", "/e", "e0", 5)


def test_database_name_with_a_slash_is_allowed(tmp_path: Path) -> None:
    cfg = config.load({"database": "nedm/raspberries"}, environ={},
                      config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.database == "nedm/raspberries"
    assert cfg.status_db == "nedm/raspberries_status"


@pytest.mark.parametrize("key, value, words", [
    ("mac_id", "abc", ["mac_id", "'abc'", "whole number"]),
    ("heartbeat_interval", "-1", ["heartbeat_interval", "> 0"]),
    ("heartbeat_interval", "often", ["heartbeat_interval", "'often'", "number"]),
    ("restart_policy", "sometimes", ["restart_policy", "'sometimes'", "on-failure"]),
    ("server", "couch.local:5984", ["server", "not a URL", "http"]),
    ("database", "Raspberries", ["database", "'Raspberries'", "lower-case"]),
    ("legacy_password", "maybe", ["legacy_password", "'maybe'", "yes"]),
    ("max_programs", "0", ["max_programs", "0", ">= 1"]),
    ("max_programs", "many", ["max_programs", "'many'", "whole number"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(
        tmp_path: Path, key: str, value: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config.load({key: value}, environ={}, config_file=str(write_ini(tmp_path / "c.ini")))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_ini_key_is_an_error(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", hearbeat_interval="3")
    with pytest.raises(ConfigError, match="hearbeat_interval: unknown key"):
        config.load({}, environ={}, config_file=str(ini))


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load({}, environ={"HIMBEERE_CONFIG": str(tmp_path / "nope.conf")})


def test_password_is_redacted_in_errors_and_logs() -> None:
    assert config.redact("http://pi:secret@host:5984/x") == "http://pi:***@host:5984/x"
    with pytest.raises(ConfigError) as info:
        config.Config(server="ftp://pi:secret@host").validate()
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url, shown", [
    # Regression: the host was rebuilt from hostname and port, which lost an
    # IPv6 address's brackets: "http://u:p@[::1]:5984" was shown as "::1:5984".
    ("http://u:p@[::1]:5984", "http://u:***@[::1]:5984"),
    ("http://u:p@[::1]", "http://u:***@[::1]"),
    ("https://u:p@[fe80::1%25eth0]:6984/db", "https://u:***@[fe80::1%25eth0]:6984/db"),
    ("http://[::1]:5984", "http://[::1]:5984"),
    ("http://[2001:db8::7]", "http://[2001:db8::7]"),
    ("http://u:p@192.168.1.5:5984", "http://u:***@192.168.1.5:5984"),
    ("http://192.168.1.5", "http://192.168.1.5"),
    ("http://u:p@couch.example", "http://u:***@couch.example"),
    ("http://couch.example:5984/x", "http://couch.example:5984/x"),
    ("http://u@couch.example", "http://u@couch.example"),  # a user, no password
    ("http://u:p@ss@couch.example", "http://u:***@couch.example"),  # "@" in the password
    ("http://u:p@host:99999", "http://u:***@host:99999"),  # a bad port: still no password
    ("http://u:p@[::1", "[::1"),  # no URL at all: no password either
    # A list: the later URLs inherit the first one's credentials.
    ("http://u:p@[::1]:5984,http://10.0.0.2:5984,http://n3",
     "http://u:***@[::1]:5984,http://u:***@10.0.0.2:5984,http://u:***@n3"),
    ("http://[::1]:5984,http://[::2]:5984", "http://[::1]:5984,http://[::2]:5984"),
])
def test_redact_keeps_the_host_as_written(url: str, shown: str) -> None:
    assert config.redact(url) == shown
    assert ":p@" not in shown


def test_original_server_file_is_honoured(tmp_path: Path) -> None:
    server_file = tmp_path / "server"
    server_file.write_text("http://legacy.example:5984\n")
    cfg = config.load({"server_file": str(server_file)}, environ={},
                      config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.server == "http://legacy.example:5984"
    # An explicit server wins over the file.
    cfg = config.load({"server_file": str(server_file), "server": "http://new:1"},
                      environ={}, config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.server == "http://new:1"


def test_server_saved_by_pairing_is_used(tmp_path: Path) -> None:
    cfg = config.load({"state_dir": str(tmp_path), "server_file": str(tmp_path / "none")},
                      environ={}, config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.server is None
    config.save_server(cfg, "http://paired:5984")
    assert (tmp_path / "server").stat().st_mode & 0o777 == 0o600
    cfg = config.load({"state_dir": str(tmp_path), "server_file": str(tmp_path / "none")},
                      environ={}, config_file=str(write_ini(tmp_path / "c.ini")))
    assert cfg.server == "http://paired:5984"


def test_cli_prints_one_clear_error_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "himbeere", "daemon", "--server", "nonsense",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
        env={"HIMBEERE_CONFIG": str(write_ini(tmp_path / "c.ini")), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "himbeere: error: server: 'nonsense' is not a URL; "
        "allowed: http(s)://[user:password@]host[:port]"]


def test_max_programs_from_file_environment_and_flag(tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "c.ini", max_programs="10")
    empty = str(write_ini(tmp_path / "empty.ini"))
    assert config.load({}, environ={}, config_file=empty).max_programs == 64
    assert config.load({}, environ={}, config_file=str(ini)).max_programs == 10
    environ = {"HIMBEERE_MAX_PROGRAMS": "20"}
    assert config.load({}, environ=environ, config_file=str(ini)).max_programs == 20
    assert config.load({"max_programs": "3"}, environ=environ,
                       config_file=str(ini)).max_programs == 3


# -- every setting has a flag; the CLIs' consistency (issue 12, item 9) ----------------
#: Values a setting's validate() accepts, where "a number" or "a path" would not do.
FLAG_VALUES = {"server": "http://h:5984", "database": "db", "status_database": "db2",
               "restart_policy": "always", "legacy_password": "yes", "require_signed": "yes",
               # a base64 public key (a path must exist)
               "trusted_keys": "ESMxXi8PoJhqSgSh8Ng2vA+oKXJmz5lwvd4UUQX3A+I="}


def flag_value(key: str) -> str:
    kind = str(config.FIELDS[key].type)
    if key in FLAG_VALUES:
        return FLAG_VALUES[key]
    if "float" in kind:
        return "7.5"
    if "int" in kind:
        return "4096"  # a whole number every int setting allows
    return f"/flag/{key}"  # absolute: paths stay as given


@pytest.mark.parametrize("key", sorted(config.FIELDS))
def test_every_setting_has_a_working_flag(key: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: --fleet-key-file and --command-timeout were refused by argparse."""
    from himbeere import cli

    for name in list(os.environ):
        if name.startswith("HIMBEERE_"):
            monkeypatch.delenv(name)
    flag = "--" + key.replace("_", "-")
    raw = flag_value(key)
    args = cli.build_parser().parse_args(
        ["daemon", flag, raw, "--config", str(write_ini(tmp_path / "c.ini"))])
    loaded = cli.load_config(args)()
    assert getattr(loaded, key) == config._convert(key, raw)
    assert getattr(loaded, key) != getattr(config.Config(), key), "the flag changed nothing"


def test_legacy_password_flag_alone_means_yes(tmp_path: Path) -> None:
    from himbeere import cli

    ini = str(write_ini(tmp_path / "c.ini", legacy_password="yes"))
    parser = cli.build_parser()
    assert cli.load_config(parser.parse_args(["daemon", "--config", ini,
                                              "--legacy-password"]))().legacy_password
    assert not cli.load_config(parser.parse_args(
        ["daemon", "--config", ini, "--legacy-password", "no"]))().legacy_password


def test_pair_help_shows_only_what_pairing_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from himbeere import cli

    with pytest.raises(SystemExit):
        cli.main(["pair", "--help"])
    flags = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
    assert flags == {"--help", "--close", "--config", "--state-dir", "--debug"}


NOT_SET = "server: not set"


@pytest.mark.parametrize("tool, argv, error", [
    ("himbeere", ["--debug", "nodes"], NOT_SET), ("himbeere", ["nodes", "--debug"], NOT_SET),
    ("himbeere", ["--debug", "daemon", "--server", "nonsense"], "server: 'nonsense'"),
    ("himbeere", ["daemon", "--server", "nonsense", "--debug"], "server: 'nonsense'"),
    ("himbeere", ["--debug", "upload", "ls"], NOT_SET),
    ("himbeere", ["upload", "ls", "--debug"], NOT_SET),
    ("himbeere-upload", ["--debug", "ls"], NOT_SET),
    ("himbeere-upload", ["ls", "--debug"], NOT_SET),
])
def test_debug_works_before_and_after_the_command(
        tool: str, argv: list[str], error: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad setting: one error line, and with --debug anywhere its traceback."""
    from uploader import cli as upload_cli
    from uploader import main as himbeere_main

    monkeypatch.delenv("HIMBEERE_SERVER", raising=False)
    monkeypatch.setenv("HIMBEERE_CONFIG", str(write_ini(tmp_path / "c.ini")))
    run = himbeere_main.main if tool == "himbeere" else upload_cli.main
    without = [word for word in argv if word != "--debug"]
    assert run(without) == 1
    err = capsys.readouterr().err
    prefix = "himbeere-upload" if "upload" in argv else tool
    assert err.startswith(f"{prefix}: error: {error}") and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match=re.escape(error)):
        run(argv)


@pytest.mark.parametrize("tool", ["himbeere", "himbeere-upload"])
def test_both_tools_have_version(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    from himbeere import __version__
    from uploader import cli as upload_cli
    from uploader import main as himbeere_main

    run = himbeere_main.main if tool == "himbeere" else upload_cli.main
    with pytest.raises(SystemExit) as exit:
        run(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"{tool} {__version__}\n"


def summaries(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, str]]:
    """(command, its one-line help) of every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{prefix} {choice.dest}", str(choice.help)
            for name, sub in action.choices.items():
                yield from summaries(sub, f"{prefix} {name}")


def test_command_summaries_follow_one_style() -> None:
    """Imperative, capital first, no full stop, short enough for one help line."""
    from uploader import cli as upload_cli
    from uploader import main as himbeere_main

    found = list(summaries(himbeere_main.build_parser(), "himbeere"))
    found += summaries(upload_cli.build_parser(), "himbeere-upload")
    assert len(found) > 20
    bad = []
    for command, help in found:
        first = help.split()[0]
        if (not first[0].isupper() or help.endswith(".") or len(help) > 55
                or first in ("A", "An", "The", "One", "What", "This")
                or (first.endswith("s") and first != "Press")):
            bad.append(f"{command}: {help!r}")
    assert bad == []

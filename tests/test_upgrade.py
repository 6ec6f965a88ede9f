"""The daemon upgrades itself: ``himbeere-upload upgrade --wheel`` and the launcher.

Real nodes (``himbeere launch`` subprocesses, each with its state directory
under tmp_path) on the session's server.  The wheels are built in the test
from a copy of this source tree with another ``__version__``, once per
session: a good 0.2.0 and 0.3.0, and a 0.4.0 whose ``himbeere/__main__.py``
raises at once (its daemon exits at start).

Why the wheels are zipped here rather than by ``pip wheel
--no-build-isolation``: the development virtualenv's setuptools may predate
70.1 (no ``bdist_wheel`` without the ``wheel`` package, which is not
installed), and with build isolation pip would have to download setuptools.
A wheel is a zip of the package and a ``.dist-info`` (PEP 427); the node
installs it with ``pip install --no-deps --target`` as it would a built one.

What a user would see is what is waited for: the status document's
``daemon_version`` and ``upgrade`` fields, a command's ledger line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from himbeere import __version__, launch, schema, signing
from himbeere.couch import Couch, Database
from tests.helpers import himbeere, wait_for
from tests.nodes import ROOT, Node, free_udp_port, pid_alive
from uploader import install, keys
from uploader.cli import main as upload_main
from uploader.fleet import Fleet

pytestmark = pytest.mark.slow

PY = sys.executable
PACKAGES = ("himbeere", "himbeerecouch", "uploader")
BROKEN_MAIN = 'raise SystemExit("this daemon is broken on purpose (tests/test_upgrade.py)")\n'


# -- wheels -------------------------------------------------------------------------------
def make_wheel(out: Path, version: str, broken: bool = False) -> Path:
    """A wheel of this source tree with ``__version__ = version`` (see the docstring)."""
    src = out / f"src-{version}"
    shutil.rmtree(src, ignore_errors=True)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = src / "himbeere" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"'))
    if broken:
        (src / "himbeere" / "__main__.py").write_text(BROKEN_MAIN)
    info = f"himbeerecouch-{version}.dist-info"
    files = {str(path.relative_to(src)): path.read_bytes()
             for path in sorted(src.rglob("*")) if path.is_file()}
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: himbeerecouch\n"
                                 f"Version: {version}\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: tests/test_upgrade.py\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    wheel = out / f"himbeerecouch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    shutil.rmtree(src)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {"0.2.0": make_wheel(out, "0.2.0"), "0.3.0": make_wheel(out, "0.3.0"),
            "0.4.0": make_wheel(out, "0.4.0", broken=True)}


# -- helpers ------------------------------------------------------------------------------
def upload(couch_url: str, dbname: str, *argv: str) -> tuple[int, dict[str, Any]]:
    """``himbeere-upload ARGV --json`` in-process: exit code and its JSON answer."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = upload_main([*argv, "--server", couch_url, "--database", dbname, "--json"],
                           environ={})
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def launched(node_factory: Callable[..., Node], mac: int, state_dir: Optional[Path] = None,
             start: bool = True) -> Node:
    node = node_factory(mac_id=mac, start=False, state_dir=state_dir,
                        env={"HIMBEERE_UPGRADE_TIMEOUT": "60"})
    node.launch = True
    return node.start() if start else node


def wait_status(node: Node, what: str, check: Callable[[dict[str, Any]], bool],
                timeout: float = 90.0) -> dict[str, Any]:
    def found() -> Optional[dict[str, Any]]:
        status = node.status()
        return status if status and check(status) else None

    return wait_for(found, timeout, message=lambda: (
        f"node {node.mac_id} never showed {what}; status upgrade "
        f"{(node.status() or {}).get('upgrade')}, version "
        f"{(node.status() or {}).get('daemon_version')}\nlog:\n{node.log()[-4000:]}"))


def runs_version(node: Node, version: str) -> dict[str, Any]:
    """Wait until ``node`` heartbeats as ``version`` (a heartbeat of the new daemon)."""
    return wait_status(node, f"daemon_version {version}", lambda s: (
        s.get("daemon_version") == version and s.get("state") == "running"))


def run_once(db: Database, node: Node, ledger: Path, mark: str) -> None:
    """A command (written by the deployer, into ``db``) that appends ``mark`` to
    ``ledger``; wait for its result."""
    doc_id = f"{node.mac_id}-{mark}"
    db.save({"_id": doc_id, "type": schema.commands_id(node.mac_id),
             "cmd": [PY, "-c", f"open({str(ledger)!r}, 'a').write({mark!r} + '\\n')"]})
    wait_for(lambda: (db.get(doc_id) or {}).get("state") == "done", 60,
             message=lambda: f"command {mark} never finished: {db.get(doc_id)}\n"
                             f"{node.log()[-3000:]}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- tests --------------------------------------------------------------------------------
def test_nodes_upgrade_and_revert_a_broken_version(
        node_factory: Callable[..., Node], couch_url: str, dbname: str, tmp_path: Path,
        wheels: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    nodes = [launched(node_factory, 7101), launched(node_factory, 7104)]
    code_db = Couch(couch_url).database(dbname)
    ledgers = {node.mac_id: tmp_path / f"ledger-{node.mac_id}" for node in nodes}

    def everywhere(mark: str) -> None:
        for node in nodes:
            run_once(code_db, node, ledgers[node.mac_id], mark)

    for node in nodes:
        runs_version(node, __version__)
    everywhere("before")

    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]))
    assert code == 0, answer
    assert answer["version"] == "0.2.0" and answer["id"] == "daemon:0.2.0"
    for node in nodes:
        runs_version(node, "0.2.0")
        upgrade = wait_status(node, "upgraded 0.2.0", lambda s: (s.get("upgrade") or {}).get(
            "state") == "upgraded")["upgrade"]
        assert upgrade["version"] == "0.2.0" and upgrade["from"] == launch.BASE, upgrade
    everywhere("on-0.2.0")

    # From one installed version to the next: 0.2.0 becomes the previous one.
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.3.0"]))[0] == 0
    for node in nodes:
        runs_version(node, "0.3.0")
        upgrade = wait_status(node, "upgraded 0.3.0", lambda s: (s.get("upgrade") or {}).get(
            "version") == "0.3.0" and s["upgrade"]["state"] == "upgraded")["upgrade"]
        assert upgrade["from"] == "0.2.0", upgrade

    # A version whose daemon exits at start is taken back by every node's launcher.
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.4.0"]))[0] == 0
    for node in nodes:
        status = wait_status(node, "reverted 0.4.0", lambda s: (s.get("upgrade") or {}).get(
            "state") == "reverted" and s.get("daemon_version") == "0.3.0")
        assert status["upgrade"]["version"] == "0.4.0"
        assert status["upgrade"]["from"] == "0.3.0"
        assert "exited with code 1" in status["upgrade"]["reason"], status["upgrade"]
        assert status["upgrade"]["reverted"] == ["0.4.0"]
        assert not (node.state_dir / "versions" / "0.4.0").exists()
    everywhere("after-revert")
    # The nodes keep heartbeating, and never try 0.4.0 again.
    for node in nodes:
        beats = node.status()["heartbeat"]  # type: ignore[index]
        wait_status(node, "a later heartbeat", lambda s, b=beats: s["heartbeat"] > b)
        node.wait_log("not installing daemon version 0.4.0: it was reverted on this node")
        assert node.alive()
        assert lines(ledgers[node.mac_id]) == ["before", "on-0.2.0", "after-revert"]

    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    assert code == 0 and answer["version"] == "0.4.0"
    for node in nodes:
        row = next(r for r in answer["nodes"] if r["node"] == node.mac_id)
        assert row["state"] == "reverted" and row["daemon_version"] == "0.3.0", row
        assert "exited with code 1" in row["detail"]

    code, out, _ = himbeere(capsys, "nodes", "--server", couch_url, "--database", dbname)
    assert code == 0 and "VERSION" in out.splitlines()[0]
    for node in nodes:
        assert "0.3.0" in next(line for line in out.splitlines() if str(node.mac_id) in line)


def test_a_node_that_was_off_upgrades_when_it_comes_back(
        node_factory: Callable[..., Node], couch_url: str, dbname: str, tmp_path: Path,
        wheels: dict[str, Path]) -> None:
    node = launched(node_factory, 7102)
    runs_version(node, __version__)
    assert node.stop() == 0
    wait_status(node, "stopped", lambda s: s.get("state") == "stopped")

    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    assert code == 0 and answer["version"] is None

    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]))[0] == 0
    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    row = next(r for r in answer["nodes"] if r["node"] == node.mac_id)
    assert row["state"] == "not yet" and row["daemon_version"] == __version__, row

    node.start()
    runs_version(node, "0.2.0")
    wait_status(node, "upgraded", lambda s: (s.get("upgrade") or {}).get("state") == "upgraded")
    ledger = tmp_path / "ledger"
    run_once(Couch(couch_url).database(dbname), node, ledger, "back")
    assert lines(ledger) == ["back"]


def test_a_node_with_trusted_keys_installs_only_a_signed_release(
        node_factory: Callable[..., Node], couch_url: str, dbname: str, tmp_path: Path,
        wheels: dict[str, Path]) -> None:
    made = keys.keygen(str(tmp_path / "signing.key"))
    node = node_factory(mac_id=7104, start=False,
                        flags=["--trusted-keys", made["trusted_keys"]])
    node.launch = True
    node.start()
    runs_version(node, __version__)

    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]))[0] == 0
    status = wait_status(node, "the refusal", lambda s: "no signature" in str(
        (s.get("upgrade") or {}).get("error")))
    assert status["daemon_version"] == __version__
    code, answer = upload(couch_url, dbname, "upgrade", "--status")
    row = next(r for r in answer["nodes"] if r["node"] == node.mac_id)
    assert row["state"] == "not yet" and "no signature" in row["detail"], row

    # The same wheel again, signed: the release is updated, and the node takes it.
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                          "--signing-key", made["key"])
    assert code == 0 and answer["action"] == "updated" and answer["key"] == made["key_id"]
    runs_version(node, "0.2.0")
    release = Couch(couch_url).database(dbname).get("daemon:0.2.0")
    assert release is not None
    assert signing.verify(release, signing.parse_trusted(made["trusted_keys"])) is None
    # The signature covers the SHA-256: a changed one no longer verifies.
    assert signing.verify(dict(release, sha256="0" * 64),
                          signing.parse_trusted(made["trusted_keys"])) is not None


def test_upgrade_refuses_what_it_cannot_do(couch_url: str, dbname: str, tmp_path: Path,
                                           wheels: dict[str, Path]) -> None:
    install.setup(Fleet(couch_url, dbname))
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]),
                          "--rollout", "1,x,100%")
    assert code == 1 and "wave 'x' is not allowed" in answer["error"]
    not_ours = tmp_path / "other-1.0-py3-none-any.whl"
    not_ours.write_bytes(b"PK")
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(not_ours))
    assert code == 1 and "not a wheel of himbeerecouch" in answer["error"]
    assert upload(couch_url, dbname, "upgrade", "--wheel", str(wheels["0.2.0"]))[0] == 0
    # Another wheel under a version that exists: the nodes would never install it.
    other = tmp_path / "elsewhere"
    other.mkdir()
    same_version = make_wheel(other, "0.2.0")
    with zipfile.ZipFile(same_version, "a") as archive:
        archive.writestr("extra.txt", "different bytes")
    code, answer = upload(couch_url, dbname, "upgrade", "--wheel", str(same_version))
    assert code == 1 and "exists with another wheel" in answer["error"]


def test_the_launcher_in_the_background_for_sysvinit(
        couch_url: str, dbname: str, tmp_path: Path) -> None:
    """``rspby start`` runs ``himbeere launch start``: the launcher takes the pidfile and
    gives the state lock to its daemon, which heartbeats; ``stop`` ends both."""
    install.setup(Fleet(couch_url, dbname))
    state, mac = tmp_path / "state", 7103
    (tmp_path / "empty.conf").touch()
    env = dict(os.environ, HIMBEERE_CONFIG=str(tmp_path / "empty.conf"), PYTHONPATH=str(ROOT))
    flags = ["--server", couch_url, "--database", dbname, "--state-dir", str(state),
             "--mac-id", str(mac), "--heartbeat-interval", "1",
             "--discovery-address", "127.255.255.255",
             "--discovery-port", str(free_udp_port())]

    def launch_cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "himbeere", "launch", action, *flags], env=env,
                              cwd=str(ROOT), capture_output=True, text=True, timeout=60)

    started = launch_cli("start")
    assert started.returncode == 0, started.stderr
    pid = int((state / "himbeere.pid").read_text())
    status_db = Couch(couch_url).database(f"{dbname}_status")
    try:
        wait_for(lambda: (status_db.get(f"status:{mac}") or {}).get("state") == "running", 60,
                 message=lambda: (state / "himbeere.log").read_text()[-3000:])
        assert launch_cli("status").stdout.strip() == f"running (pid {pid})"
    finally:
        stopped = launch_cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(pid)
    assert (status_db.get(f"status:{mac}") or {}).get("state") == "stopped"
    log = (state / "himbeere.log").read_text()
    assert "launch: started daemon base" in log


def test_the_launcher_reverts_a_version_that_sends_no_heartbeat(tmp_path: Path) -> None:
    """A daemon that runs but never heartbeats (hung on start) is stopped and reverted."""
    state = tmp_path / "state"
    hung = launch.versions_dir(state) / "9.9.9" / "himbeere"
    hung.mkdir(parents=True)
    (hung / "__init__.py").write_text('__version__ = "9.9.9"\n')
    (hung / "__main__.py").write_text("import time\ntime.sleep(600)\n")
    launch.write_text(launch.versions_dir(state) / launch.CURRENT, "9.9.9\n")
    launch.write_text(launch.versions_dir(state) / launch.PREVIOUS, "base\n")
    launch.write_outcome(state, "pending", "9.9.9", launch.BASE)
    # The base daemon it goes back to fails at once on a bad flag: run() returns its code.
    launcher = launch.Launcher(state, ["--heartbeat-interval", "soon"], heartbeat_timeout=2.0)
    code = launcher.run()
    assert code == 1  # "heartbeat_interval: 'soon' is not a number", from base
    outcome = launch.read_outcome(state)
    assert outcome["state"] == "reverted" and outcome["version"] == "9.9.9", outcome
    assert outcome["reason"] == "no heartbeat within 2 s" and outcome["reverted"] == ["9.9.9"]
    assert launch.active(state) == launch.BASE
    assert not (launch.versions_dir(state) / "9.9.9").exists()

"""Installing himbeere the way the docs say (issue 12, items 1 and 4).

A wheel built from this checkout goes through ``rspby install`` with
``HIMBEERE_SOURCE`` into a virtualenv of its own; the installed ``himbeere``
must run from there, and ``install`` must put the systemd unit where it is
told, with ``ExecStart`` in that virtualenv.  Before issue 12 nothing
installed ``himbeere.service``, though the docs said ``systemctl enable --now
himbeere`` right after ``rspby install``; and ``rspby install`` without
``HIMBEERE_SOURCE`` ended in a raw pip error, as himbeerecouch is not on PyPI.

pip fetches the wheel's dependencies (from its cache once they are there);
the build and the error cases use no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from himbeere import __version__

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RSPBY = REPO / "init_scripts" / "rspby"


def run(argv: list[str], env: Optional[dict[str, str]] = None,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    """``argv`` with this environment plus ``env``, minus PYTHONPATH (the
    installed package must be found in its virtualenv, not in the checkout)
    and HIMBEERE_SOURCE (a test sets it, or means the default)."""
    full = {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "HIMBEERE_SOURCE")}
    full.update(env or {})
    return subprocess.run(argv, env=full, cwd=cwd, capture_output=True, text=True, timeout=900)


def rspby(action: str, venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``init_scripts/rspby ACTION`` on ``venv``, with no unit unless asked for."""
    defaults = {"HIMBEERE_VENV": str(venv), "HIMBEERE_PYTHON": sys.executable,
                "HIMBEERE_SYSTEMD_DIR": ""}
    return run(["bash", str(RSPBY), action], env={**defaults, **env}, cwd=venv.parent)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``python -m build`` makes of a copy of this checkout."""
    base = tmp_path_factory.mktemp("wheel")
    # A copy, so that the build leaves no build/ or egg-info in the checkout.
    source = base / "src"
    for part in ("himbeere", "himbeerecouch", "uploader"):
        shutil.copytree(REPO / part, source / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.py", "pyproject.toml", "README.rst"):
        shutil.copy(REPO / name, source / name)
    dist = base / "dist"
    built = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (found,) = dist.glob("himbeerecouch-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """``rspby install`` of the wheel: the virtualenv, the unit directory and its output."""
    base = tmp_path_factory.mktemp("pi")
    venv, systemd = base / "opt-himbeere", base / "systemd"
    systemd.mkdir()
    result = rspby("install", venv, HIMBEERE_SOURCE=str(wheel),
                   HIMBEERE_SYSTEMD_DIR=str(systemd))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv, systemd, result


def test_rspby_installs_the_wheel(
        installed: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    venv, _, result = installed
    himbeere = venv / "bin" / "himbeere"
    assert f"Installed himbeere {__version__}: {himbeere}" in result.stdout
    shown = run([str(himbeere), "daemon", "--help"], cwd=venv.parent)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: himbeere daemon")
    # The package and its data come from the virtualenv, not from the checkout.
    where = run([str(venv / "bin" / "python"), "-c",
                 "import himbeere.couch.design as d; print(d.__file__)"], cwd=venv.parent)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv))


def test_rspby_installs_the_systemd_unit(
        installed: tuple[Path, Path, subprocess.CompletedProcess[str]]) -> None:
    venv, systemd, result = installed
    unit = systemd / "himbeere.service"
    assert f"Installed the systemd unit {unit}" in result.stdout
    assert "Next: systemctl enable --now himbeere" in result.stdout
    lines = unit.read_text().splitlines()
    assert [line for line in lines if line.startswith("ExecStart=")] == [
        f"ExecStart={venv}/bin/himbeere launch"]
    # The rest is the unit of the package, as it is in the checkout.
    shipped = (REPO / "himbeere" / "himbeere.service").read_text().splitlines()
    assert [line for line in lines if not line.startswith("ExecStart=")] == [
        line for line in shipped if not line.startswith("ExecStart=")]
    assert "KillMode=process" in lines and "KillMode=mixed" not in lines
    if shutil.which("systemd-analyze"):
        # systemd's own reading of the unit: it once had a line without '='.
        verified = run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       env={"SYSTEMD_UNIT_PATH": f"{systemd}:"}, cwd=systemd)
        assert f"{unit}:" not in verified.stdout + verified.stderr


def test_unit_of_the_checkout_is_the_shipped_one() -> None:
    # init_scripts/himbeere.service, which the docs name, links to the package's.
    assert (REPO / "init_scripts" / "himbeere.service").resolve() == (
        REPO / "himbeere" / "himbeere.service")


def test_rspby_without_systemd_points_to_sysvinit(
        installed: tuple[Path, Path, subprocess.CompletedProcess[str]], wheel: Path,
        tmp_path: Path) -> None:
    venv, _, _ = installed
    missing = tmp_path / "no-systemd"
    again = rspby("install", venv, HIMBEERE_SOURCE=str(wheel), HIMBEERE_SYSTEMD_DIR=str(missing))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"Upgrading virtualenv {venv}" in again.stdout
    assert f"No systemd here (no {missing}), so no unit" in again.stdout
    assert "Copy this script to /etc/init.d/rspby, then:" in again.stdout
    assert again.stdout.rstrip().endswith(
        "Next: update-rc.d rspby defaults && /etc/init.d/rspby start")
    assert not missing.exists()
    # /etc/init.d/rspby still controls the daemon it installed.
    status = rspby("status", venv, HIMBEERE_STATE_DIR=str(tmp_path),
                   HIMBEERE_CONFIG_FILE=str(tmp_path / "none.conf"),
                   HIMBEERE_SERVER_FILE=str(tmp_path / "none"))
    assert (status.returncode, status.stdout.strip()) == (3, "not running"), status.stderr


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the failing installs go: the first creates a virtualenv there,
    with nothing in it, which the next one upgrades (a new one takes 20 s)."""
    return tmp_path_factory.mktemp("bare") / "venv"


def test_rspby_says_himbeerecouch_is_not_on_pypi(bare_venv: Path, tmp_path: Path) -> None:
    # An index without himbeerecouch, as PyPI is today, without the network.
    empty = tmp_path / "index"
    empty.mkdir()
    result = rspby("install", bare_venv, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{RSPBY}: himbeerecouch is not on PyPI yet (or no package index is reachable); "
        "install a wheel, sdist or checkout instead: "
        f"HIMBEERE_SOURCE=/path/to/himbeerecouch-VERSION-py3-none-any.whl {RSPBY} install")


def test_rspby_shows_pip_errors_for_a_source_given(bare_venv: Path, tmp_path: Path) -> None:
    missing = tmp_path / "himbeerecouch-9.9.9-py3-none-any.whl"
    result = rspby("install", bare_venv, HIMBEERE_SOURCE=str(missing), PIP_NO_INDEX="1")
    assert result.returncode == 1
    assert "not on PyPI" not in result.stderr
    assert str(missing) in result.stderr and "ERROR" in result.stderr

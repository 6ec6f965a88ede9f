"""scripts/demo: the one-shot demo tears everything down; ``--keep`` leaves a fleet of one
running whose printed next steps work as printed, and ``--stop`` ends exactly it.

Each test runs ``scripts/demo.py`` with this virtualenv's Python (the
``scripts/demo`` wrapper would build ``.venv-demo`` first), in a demo
directory of its own (``HIMBEERE_DEMO_DIR``) and on a free dashboard port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import wait_for
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.py"

pytestmark = pytest.mark.slow


def demo_env(tmp_path: Path) -> dict[str, str]:
    """This shell's environment without HIMBEERE_* (as a new user's), plus the demo's dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIMBEERE_")}
    env.update(HIMBEERE_DEMO_DIR=str(tmp_path / "demo"), TMPDIR=str(tmp_path))
    return env


def demo(env: dict[str, str], cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(DEMO), *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def next_steps(output: str) -> list[str]:
    """The command lines under "Next steps", as printed (comments and all)."""
    block = output.split("Next steps (copy them into a shell):\n", 1)[1].split("\nDashboard:")[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def shell(steps: list[str], command: str, cwd: Path, env: dict[str, str]) -> str:
    """Run ``command`` in bash after the printed ``source`` and ``export`` lines."""
    setup = [s for s in steps if s.startswith(("source ", "export "))]
    result = subprocess.run(["bash", "-c", "\n".join(["set -e", *setup, command])],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}:\n{result.stdout}{result.stderr}"
    return result.stdout


def step(steps: list[str], prefix: str) -> str:
    found = [s for s in steps if s.startswith(prefix)]
    assert len(found) == 1, (prefix, steps)
    return found[0]


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for whoever inherited it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def program_pids(log: Path) -> set[int]:
    """The programs the daemon started, from its log ("NAME: started (pid N, ...")."""
    return {int(pid) for pid in re.findall(r": started \(pid (\d+)", log.read_text())}


def sign_in(url: str, name: str, password: str) -> requests.Session:
    """The dashboard's login form, as a browser fills it in."""
    session = requests.Session()
    form = session.get(f"{url}login", timeout=30)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf, form.text[:2000]
    answer = session.post(f"{url}login", timeout=30, allow_redirects=False,
                          data={"name": name, "password": password,
                                "csrf_token": csrf.group(1), "next": "/"})
    assert answer.status_code == 302, answer.text[:2000]
    return session


def test_demo_tears_everything_down(tmp_path: Path) -> None:
    output = demo(demo_env(tmp_path), tmp_path, "--seconds", "2")
    assert re.search(r"\[hello\] hello from node \d+", output), output
    assert "returncode 0: " in output
    server = re.search(r"server at (http://\S+);", output)
    assert server, output
    with pytest.raises(requests.ConnectionError):
        requests.get(server.group(1), timeout=10)
    (work,) = tmp_path.glob("himbeere-demo-*")
    daemon = int((work / "state" / "himbeere.lock").read_text())
    pids = {daemon} | program_pids(work / "daemon.log")
    assert len(pids) == 2 and all(gone(pid) for pid in pids), pids


def test_keep_then_the_next_steps_as_printed_then_stop(tmp_path: Path) -> None:
    env = demo_env(tmp_path)
    demo_dir = Path(env["HIMBEERE_DEMO_DIR"])
    dashboard_port = str(free_port())
    stopped = ""
    try:
        output = demo(env, tmp_path, "--keep", "--dashboard-port", dashboard_port)
        state: dict[str, Any] = json.loads((demo_dir / "state.json").read_text())
        steps = next_steps(output)
        mac = state["node"]
        assert step(steps, "source ") == f"source {Path(sys.prefix) / 'bin' / 'activate'}"
        assert re.fullmatch(r"export HIMBEERE_SERVER=http://demo:\S+@127\.0\.0\.1:\d+",
                            step(steps, "export "))
        work = tmp_path / "mine"
        work.mkdir()
        shell(steps, step(steps, "cp "), work, env)
        pushed = shell(steps, step(steps, "himbeere-upload push "), work, env)
        assert f"created {mac}:my_program" in pushed
        logs = step(steps, f"himbeere logs {mac} my_program")
        wait_for(lambda: f"[my_program] hello from node {mac}" in shell(steps, logs, work, env),
                 timeout=60, interval=1, message=lambda: shell(steps, logs, work, env))
        assert str(mac) in shell(steps, step(steps, "himbeere nodes"), work, env)

        login = re.search(r"Dashboard: (\S+)\n  sign in as (\S+) with password (\S+)\n", output)
        assert login, output
        assert login.group(1) == f"http://127.0.0.1:{dashboard_port}/"
        session = sign_in(*login.groups())
        nodes = session.get(f"{login.group(1)}api/nodes", timeout=30).json()["nodes"]
        assert [n["node"] for n in nodes] == [mac]

        again = demo(env, tmp_path, "--keep", "--dashboard-port", dashboard_port)
        assert "is still running" in again
        assert next_steps(again) == steps
        assert json.loads((demo_dir / "state.json").read_text()) == state

        stop_line = output.split("Stop everything:\n", 1)[1].strip().splitlines()[0]
        assert stop_line == f"HIMBEERE_DEMO_DIR={demo_dir} {ROOT / 'scripts' / 'demo'} --stop"
    finally:
        if (demo_dir / "state.json").exists():
            stopped = demo(env, tmp_path, "--stop")
    pids = [p["pid"] for p in state["processes"]]
    assert [p["name"] for p in state["processes"]] == ["pouchdb-server", "daemon", "dashboard"]
    pids += program_pids(demo_dir / "daemon.log")
    assert all(gone(pid) for pid in pids), (pids, stopped)
    assert not (demo_dir / "state.json").exists()
    assert "no kept demo is running" in demo(env, tmp_path, "--stop")


def test_keep_after_stop_has_the_data_of_before(tmp_path: Path) -> None:
    """The server's data is on disk in the demo dir: a second --keep has the first's programs.

    And a --keep that finds part of the demo gone stops the rest and starts it all again.
    """
    env = demo_env(tmp_path)
    demo_dir = Path(env["HIMBEERE_DEMO_DIR"])
    try:
        first = next_steps(demo(env, tmp_path, "--keep", "--dashboard-port", str(free_port())))
        (tmp_path / "kept.py").write_text("def main():\n    log('kept')\n")
        mac = json.loads((demo_dir / "state.json").read_text())["node"]
        shell(first, f"himbeere-upload push kept.py --node {mac}", tmp_path, env)
        demo(env, tmp_path, "--stop")
        second = next_steps(demo(env, tmp_path, "--keep", "--dashboard-port", str(free_port())))
        assert step(second, "export ") == step(first, "export ")  # same password, same port
        assert re.search(r"\bkept\b", shell(second, "himbeere-upload ls", tmp_path, env))

        state = json.loads((demo_dir / "state.json").read_text())
        dashboard = next(p for p in state["processes"] if p["name"] == "dashboard")
        os.kill(dashboard["pid"], signal.SIGTERM)
        wait_for(lambda: gone(dashboard["pid"]))
        third = demo(env, tmp_path, "--keep")
        assert "is partly down (dashboard;" in third
        assert f"stopping daemon (pid {state['processes'][1]['pid']})" in third
        restarted = json.loads((demo_dir / "state.json").read_text())["processes"]
        assert not any(gone(p["pid"]) for p in restarted)
        assert not {p["pid"] for p in restarted} & {p["pid"] for p in state["processes"]}
    finally:
        if (demo_dir / "state.json").exists():
            demo(env, tmp_path, "--stop")

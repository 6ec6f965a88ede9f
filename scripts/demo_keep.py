"""``scripts/demo --keep`` and ``--stop``: a fleet of one that stays up to play with.

``--keep`` starts pouchdb-server (its data in ``DIR/server``), a himbeere
daemon for this machine and the dashboard, each in a session of its own so
they outlive the script and a Ctrl-C in its terminal; pushes
``examples/hello.py``, and prints the next steps to copy into a shell.  Their
PIDs and URLs go to ``DIR/state.json``; the passwords and ports, which a
later ``--keep`` reuses, to ``DIR/settings.json``.  ``--stop`` ends exactly
the recorded processes and removes ``state.json``; the data stays.

``DIR`` is ``.cache/demo`` of the checkout, or ``HIMBEERE_DEMO_DIR``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import requests

from himbeere import defaults, identity, schema
from himbeere.couch import Couch, security
from tests.servers import POUCHDB_SERVER, PouchServer, free_port, port_free

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR_ENV = "HIMBEERE_DEMO_DIR"
DATABASE = defaults.DATABASE
DEPLOYER = "demo"
DASHBOARD_PORT = 8080
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def demo_dir() -> Path:
    return Path(os.environ.get(DEMO_DIR_ENV) or ROOT / ".cache" / "demo").resolve()


def keep(dashboard_port: Optional[int]) -> int:
    """Start the kept demo, or say that it runs; print the next steps either way."""
    root = demo_dir()
    state = read_json(root / "state.json")
    if state is not None:
        down = [p["name"] for p in state["processes"] if not alive(p)]
        if not down:
            print(f"* the demo started {state['started']} is still running "
                  f"(pids in {root / 'state.json'})")
            print_next_steps(state, read_json(root / "settings.json") or {})
            return 0
        print(f"* the demo started {state['started']} is partly down ({', '.join(down)}; "
              f"logs in {root}); stopping the rest and starting it again")
        stop_processes(state)
        (root / "state.json").unlink()
    settings = load_settings(root, dashboard_port)
    processes: list[dict[str, Any]] = []
    try:
        state = start_all(root, settings, processes)
    except BaseException:
        if processes:
            print("* stopping what was started")
            stop_processes({"processes": processes})
        raise
    write_json(root / "state.json", state)
    print_next_steps(state, settings)
    return 0


def stop() -> int:
    """End the processes ``state.json`` lists (and only those); remove it."""
    root = demo_dir()
    state = read_json(root / "state.json")
    if state is None:
        print(f"* no kept demo is running (no {root / 'state.json'})")
        return 0
    stop_processes(state)
    (root / "state.json").unlink()
    print(f"* stopped; the server's data stays in {root} (scripts/demo --keep starts it "
          f"again, rm -r {root} forgets it)")
    return 0


# -- starting ----------------------------------------------------------------------------
def start_all(root: Path, settings: dict[str, Any],
              processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Server, databases, deployer, daemon, example, dashboard; the state to record."""
    server = DetachedPouchServer(root / "server", password=settings["admin_password"])
    if port_free(settings["server_port"]):
        server.port = settings["server_port"]  # the URL in your shell stays valid
    print(f"* starting pouchdb-server (a local CouchDB-compatible server), data in "
          f"{server.workdir}")
    try:
        server.start()
    except BaseException:
        server.stop()  # started but, say, without its admin
        raise
    processes.append(record("pouchdb-server", server.pid, server.plain_url))
    settings["server_port"] = server.port
    write_json(root / "settings.json", settings, private=True)
    upload = [sys.executable, "-m", "uploader"]
    run([*upload, "setup", server.url])
    print(f"* making the deployer user {DEPLOYER!r} (role {security.DEPLOYER_ROLE}) for you "
          "and the dashboard")
    save_user(Couch(server.url), DEPLOYER, settings["deployer_password"])
    mac = identity.getmacid()
    print(f"* starting the himbeere daemon for this machine, node {mac} "
          f"(log: {root / 'daemon.log'})")
    daemon = spawn([sys.executable, "-m", "himbeere", "daemon", "--server", server.url,
                    "--database", DATABASE, "--state-dir", str(root / "node"),
                    "--mac-id", str(mac), "--heartbeat-interval", "5"],
                   root, "daemon.log")
    processes.append(record("daemon", daemon.pid, None))
    run([*upload, "push", str(ROOT / "examples" / "hello.py"), "--node", str(mac),
         "--server", server.url])
    port = settings["dashboard_port"] if port_free(settings["dashboard_port"]) else free_port()
    dashboard_url = f"http://127.0.0.1:{port}/"
    print(f"* starting the dashboard on {dashboard_url} (log: {root / 'dashboard.log'})")
    dashboard = spawn([sys.executable, "-m", "uploader.main", "dashboard", "--server",
                       server.plain_url, "--database", DATABASE, "--port", str(port)],
                      root, "dashboard.log")
    processes.append(record("dashboard", dashboard.pid, dashboard_url))
    wait_for_page(dashboard, f"{dashboard_url}login", root / "dashboard.log")
    print(f"* all three keep running in the background (pids in {root / 'state.json'})")
    return {"started": schema.iso(), "dir": str(root), "venv": sys.prefix, "node": mac,
            "server": server.plain_url, "database": DATABASE, "dashboard": dashboard_url,
            "deployer": DEPLOYER, "processes": processes}


class DetachedPouchServer(PouchServer):
    """A pouchdb-server that outlives this script: its own session, on disk.

    The tests' server dies with its parent (PR_SET_PDEATHSIG); this one must not.
    """

    def __init__(self, workdir: Path, *, password: str) -> None:
        super().__init__(workdir, in_memory=False, password=password)

    def _spawn(self) -> None:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self._output = open(self.workdir / "server.out", "ab")
        # cwd: pouchdb-server keeps the admin (hashed) in config.json there.
        self.process = subprocess.Popen(
            [str(POUCHDB_SERVER), "--port", str(self.port), "--host", "127.0.0.1",
             "--no-color", "--dir", str(data)],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT, start_new_session=True)


def spawn(argv: list[str], root: Path, log_name: str) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, its output appended to ``root/log_name``."""
    # No HIMBEERE_* from this shell (an exported server or database of an
    # earlier demo) and no INI file: the flags say everything.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIMBEERE_")}
    config = root / "himbeere.conf"
    config.write_text("[himbeere]\n")
    env.update(HIMBEERE_CONFIG=str(config), PYTHONUNBUFFERED="1")
    with open(root / log_name, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)


def wait_for_page(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:]
    raise SystemExit(f"demo: the dashboard did not answer on {url}; its log:\n{tail}")


def run(argv: list[str]) -> None:
    """Run a ``himbeere-upload`` command, shown without the URL's password."""
    print("$ himbeere-upload", " ".join(a if "@" not in a else "URL" for a in argv[3:]))
    if subprocess.run(argv, cwd=ROOT).returncode != 0:
        raise SystemExit(f"demo: himbeere-upload {' '.join(argv[3:5])} failed")


def save_user(couch: Couch, name: str, password: str) -> None:
    """Create the deployer, or set its password again (the same one, kept in settings)."""
    users = couch.database("_users")
    doc_id = security.USER_PREFIX + name
    doc = {"_id": doc_id, "name": name, "type": "user", "roles": [security.DEPLOYER_ROLE],
           "password": password}
    old = users.get(doc_id)
    if old:
        doc["_rev"] = old["_rev"]
    users.save(doc)


def load_settings(root: Path, dashboard_port: Optional[int]) -> dict[str, Any]:
    """Passwords and ports of earlier runs (the server's data knows the passwords)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = read_json(root / "settings.json") or {
        "admin_password": secrets.token_urlsafe(12),
        "deployer_password": secrets.token_urlsafe(12),
        "server_port": free_port(),
        "dashboard_port": DASHBOARD_PORT,
    }
    if dashboard_port is not None:
        settings["dashboard_port"] = dashboard_port
    write_json(root / "settings.json", settings, private=True)
    return settings


# -- next steps --------------------------------------------------------------------------
def print_next_steps(state: dict[str, Any], settings: dict[str, Any]) -> None:
    """What to paste into a shell: the venv, the server, a push, the logs; then the rest."""
    server = urllib.parse.urlsplit(state["server"])
    password = urllib.parse.quote(settings.get("deployer_password", "PASSWORD"), safe="")
    mac = state["node"]
    steps = [
        f"source {Path(state['venv']) / 'bin' / 'activate'}",
        f"export HIMBEERE_SERVER=http://{state['deployer']}:{password}@{server.netloc}",
    ]
    if state["database"] != defaults.DATABASE:
        steps.append(f"export HIMBEERE_DATABASE={state['database']}")
    steps += [
        ("himbeere nodes", f"this machine is node {mac}"),
        (f"himbeere logs {mac} hello", "what examples/hello.py printed; -f follows it"),
        (f"cp {ROOT / 'examples' / 'hello.py'} my_program.py",
         "your program: a module with main(); edit it"),
        f"himbeere-upload push my_program.py --node {mac}",
        (f"himbeere logs {mac} my_program", "add -f to follow it live"),
    ]
    # Comments line up, except behind a command too long for it (a long path).
    width = max(len(s[0]) for s in steps if isinstance(s, tuple) and len(s[0]) <= 40)
    print("\nNext steps (copy them into a shell):\n")
    for step in steps:
        line = step if isinstance(step, str) else f"{step[0]:<{width}}  # {step[1]}"
        print(f"  {line}")
    admin = settings.get("admin_password", "?")
    print(f"\nDashboard: {state['dashboard']}\n"
          f"  sign in as {state['deployer']} with password {settings.get('deployer_password')}"
          f"\n  (a deployer user the demo made; the server admin is admin / {admin})")
    print(f"\nStop everything:\n\n  {stop_command()}\n")


def stop_command() -> str:
    script = ROOT / "scripts" / "demo"
    shown = "scripts/demo" if Path.cwd().resolve() == ROOT else str(script)
    prefix = f"{DEMO_DIR_ENV}={os.environ[DEMO_DIR_ENV]} " if os.environ.get(DEMO_DIR_ENV) else ""
    return f"{prefix}{shown} --stop"


# -- processes ---------------------------------------------------------------------------
def record(name: str, pid: Optional[int], url: Optional[str]) -> dict[str, Any]:
    """A process as state.json keeps it: its start time tells a reused PID apart."""
    assert pid is not None
    return {"name": name, "pid": pid, "start_time": start_time(pid), "url": url}


def start_time(pid: int) -> Optional[int]:
    """The process's start (clock ticks since boot); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(process: dict[str, Any]) -> bool:
    ticks = start_time(process["pid"])
    return ticks is not None and ticks == process["start_time"]


def stop_processes(state: dict[str, Any]) -> None:
    """SIGTERM each recorded process, newest first, and wait; SIGKILL after 30 s."""
    for process in reversed(state["processes"]):
        if not alive(process):
            print(f"* {process['name']} (pid {process['pid']}) had already exited")
            continue
        print(f"* stopping {process['name']} (pid {process['pid']})")
        end(process, signal.SIGTERM, STOP_TIMEOUT)
        if alive(process):
            print(f"  it did not exit within {STOP_TIMEOUT:g} s; killing it")
            end(process, signal.SIGKILL, STOP_TIMEOUT)


def end(process: dict[str, Any], sig: signal.Signals, timeout: float) -> None:
    try:
        os.kill(process["pid"], sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(process) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- files -------------------------------------------------------------------------------
def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise SystemExit(f"demo: {path} is not JSON ({error}); remove it") from None


def write_json(path: Path, data: dict[str, Any], private: bool = False) -> None:
    """Write ``data`` whole (a temporary file renamed); ``private``: readable by you only."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    if private:
        scratch.chmod(0o600)
    scratch.replace(path)

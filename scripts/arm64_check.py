"""The daemon in an arm64 tree against a server on the host: called by scripts/arm64-check.

Starts pouchdb-server on the host's loopback (shared with the chroot), runs
``/opt/himbeere/bin/himbeere daemon`` inside the tree, pushes a program that
logs ``platform.machine()`` and waits until ``himbeere logs`` shows
``aarch64``; then ``himbeere cmd -- uname -m`` must answer ``aarch64`` too.
The daemon finds its MAC id itself, through /sys (the standard-library
lookup of himbeere.identity, as netifaces is not installed there).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from himbeere import identity  # noqa: E402
from tests.servers import PouchServer  # noqa: E402

DATABASE = "raspberries"
#: The ``himbeere`` console script of the venv this runs in.
HIMBEERE = Path(sys.executable).parent / "himbeere"
PROGRAM = "arch_report"
PROGRAM_CODE = '''\
import platform
import time


def main():
    log("machine", platform.machine())
    while not should_quit():
        time.sleep(0.2)
'''
#: Emulated Python starts slowly (seconds per interpreter); generous, not timed.
WAIT = 300.0
TREE_ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
            "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "HIMBEERE_CONFIG=/etc/himbeere-check.conf"]


class CheckFailed(Exception):
    """The daemon in the tree did not do what it should."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", type=Path, required=True, help="the arm64 root directory")
    parser.add_argument("--work", type=Path, required=True, help="a scratch directory")
    args = parser.parse_args()
    tree = args.tree.resolve()
    started = time.monotonic()
    server = PouchServer(args.work / "pouchdb", in_memory=True)
    server.start()
    daemon: Optional[subprocess.Popen[bytes]] = None
    log_path = args.work / "daemon.log"
    try:
        mac = identity.getmacid()
        print(f"server {server.plain_url}; this machine's MAC id {mac}")
        himbeere(["upload", "setup", server.url])
        (tree / "etc" / "himbeere-check.conf").write_text("[himbeere]\n")
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                ["chroot", str(tree), *TREE_ENV, "/opt/himbeere/bin/himbeere", "daemon",
                 "--server", server.url, "--database", DATABASE,
                 "--state-dir", "/var/lib/himbeere-check", "--heartbeat-interval", "2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"daemon in the tree: pid {daemon.pid}")
        program = args.work / f"{PROGRAM}.py"
        program.write_text(PROGRAM_CODE)
        himbeere(["upload", "push", str(program), "--node", str(mac), "--server", server.url])
        logs = wait_until(
            lambda: himbeere(["logs", str(mac), PROGRAM, "--server", server.url], check=False),
            lambda out: "machine aarch64" in out, daemon,
            f"the program's log shows 'machine aarch64' (node {mac})")
        print(f"{elapsed(started)} pushed program logged: "
              f"{next(line for line in logs.splitlines() if 'machine' in line).strip()}")
        answer = himbeere(["cmd", "--node", str(mac), "--timeout", "120", "--wait", str(WAIT),
                           "--server", server.url, "--", "uname", "-m"], check=False)
        if "aarch64" not in answer:
            raise CheckFailed(f"himbeere cmd -- uname -m did not answer aarch64:\n{answer}")
        print(f"{elapsed(started)} himbeere cmd -- uname -m:\n{indent(answer)}")
        return 0
    except CheckFailed as exc:
        print(f"arm64-check: {exc}", file=sys.stderr)
        print(f"daemon log (end):\n{indent(tail(log_path))}", file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            stop(daemon)
        stop_leftovers(tree)
        server.stop()


def himbeere(argv: list[str], check: bool = True) -> str:
    """Run the host's ``himbeere`` CLI; its output (stdout and stderr)."""
    result = subprocess.run([str(HIMBEERE), *argv], cwd=ROOT,
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise CheckFailed(f"himbeere {argv[0]} {argv[1]} failed:\n{output}")
    return output


def wait_until(read: Callable[[], str], done: Callable[[str], bool],
               daemon: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        output = read()
        if done(output):
            return output
        if daemon.poll() is not None:
            raise CheckFailed(f"the daemon exited ({daemon.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"not within {WAIT:.0f} s: {what}; last output:\n{output}")
        time.sleep(2)


def stop(daemon: subprocess.Popen[bytes]) -> None:
    """TERM (the daemon stops its programs), KILL after a minute; then its group."""
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
    try:
        os.killpg(daemon.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_leftovers(tree: Path) -> None:
    """Kill, by PID, any process still rooted in ``tree``: only this check starts them."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "root")).resolve() != tree:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            print(f"killed leftover process {entry.name} in the tree")
        except (OSError, ValueError):
            continue


def elapsed(started: float) -> str:
    return f"[{time.monotonic() - started:5.1f} s]"


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def indent(text: str) -> str:
    return "  " + text.rstrip("\n").replace("\n", "\n  ")


if __name__ == "__main__":
    sys.exit(main())

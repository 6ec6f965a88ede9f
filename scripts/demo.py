"""Run the whole chain on this machine: server, daemon, push, output, command.

Called by ``scripts/demo``; see there.  ``--keep`` and ``--stop`` are in
``demo_keep.py`` beside this file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo_keep  # noqa: E402  (beside this file)

from himbeere import identity  # noqa: E402
from himbeere.couch import Couch  # noqa: E402
from tests.servers import PouchServer  # noqa: E402

DATABASE = "raspberries"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="how long to let the program run before the command")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true",
                      help="leave server, daemon and dashboard running and print the next "
                           "steps (data in .cache/demo, or $HIMBEERE_DEMO_DIR)")
    mode.add_argument("--stop", action="store_true",
                      help="stop what --keep left running")
    parser.add_argument("--dashboard-port", type=int, metavar="PORT",
                        help="the dashboard's port with --keep (default 8080, or a free one)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  # before stderr
    if args.dashboard_port is not None and not 0 < args.dashboard_port < 65536:
        parser.error(f"--dashboard-port {args.dashboard_port}: allowed: 1 to 65535")
    if args.keep:
        return demo_keep.keep(args.dashboard_port)
    if args.stop:
        return demo_keep.stop()
    work = Path(tempfile.mkdtemp(prefix="himbeere-demo-"))
    server = PouchServer(work / "pouchdb", in_memory=True)
    print(f"* starting pouchdb-server (a local CouchDB-compatible server) in {work}")
    server.start()
    daemon = None
    shown = 0
    try:
        couch = Couch(server.url)
        mac = identity.getmacid()
        print(f"* server at {server.plain_url}; this machine's MAC id is {mac}")
        upload = [sys.executable, "-m", "uploader"]
        run([*upload, "setup", server.url])
        log_path = work / "daemon.log"
        print(f"* starting the himbeere daemon for node {mac}")
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "himbeere", "daemon", "--server", server.url,
                 "--database", DATABASE, "--state-dir", str(work / "state"),
                 "--mac-id", str(mac), "--heartbeat-interval", "2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env=dict(os.environ, HIMBEERE_CONFIG=str(empty_config(work)),
                         PYTHONUNBUFFERED="1"))
        run([*upload, "push", str(ROOT / "examples" / "hello.py"), "--node", str(mac),
             "--server", server.url])
        shown = follow(log_path, args.seconds, 0)
        print(f"* running a command on node {mac}: uname -a")
        legacy_command(couch, mac)
        shown = follow(log_path, 0.5, shown)
        return 0
    finally:
        if daemon is not None:
            print("* stopping the daemon (the program gets should_quit() first)")
            daemon.terminate()
            daemon.wait(30)
            follow(work / "daemon.log", 0, shown)
        server.stop()
        print(f"* done; logs are in {work}")


def empty_config(work: Path) -> Path:
    path = work / "himbeere.conf"
    path.write_text("[himbeere]\n")
    return path


def run(argv: list[str]) -> None:
    print("$ himbeere-upload", " ".join(a if "@" not in a else "URL" for a in argv[3:]))
    result = subprocess.run(argv, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv[3:5])} failed")


def legacy_command(couch: Couch, mac: int) -> None:
    """A command in HimbeereCouch's format: one ``<macid>_cmd`` document."""
    db = couch.database(DATABASE)
    doc = db.save({"type": f"{mac}_cmd", "cmd": ["uname", "-a"]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = db.get(doc["_id"]) or {}
        if "finished" in current:
            print(f"  returncode {current.get('returncode')}: {current['ret'][0].strip()}")
            return
        time.sleep(0.05)
    print("  no result within 30 s")


def follow(path: Path, seconds: float, start: int) -> int:
    """Print the daemon log's new lines for ``seconds``; return the offset."""
    deadline = time.monotonic() + seconds
    offset = start
    while True:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if len(text) > offset:
            sys.stdout.write("  " + text[offset:].rstrip("\n").replace("\n", "\n  ") + "\n")
            sys.stdout.flush()
            offset = len(text)
        if time.monotonic() >= deadline:
            return offset
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())

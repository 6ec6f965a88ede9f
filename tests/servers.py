"""pouchdb-server processes for the tests, each with a server admin.

pouchdb-server (https://github.com/pouchdb/pouchdb-server) is installed into
``.cache/pouchdb`` by scripts/install-pouchdb-server.  Quirks the tests and
fixtures rely on, all seen with version 4.2.0:

* It starts in "admin party" (everyone is admin) until ``PUT
  /_config/admins/<name>`` with the JSON string password creates an admin;
  the admin is hashed into ``config.json`` in the server's *working
  directory* (not ``--dir``), so it survives a restart from the same
  directory.
* A body without ``Content-Type: application/json`` is silently taken as an
  empty document.
* The whole process crashes on ``_changes?filter=_selector``, on a
  ``_changes`` filter whose design document is missing or that throws, and,
  once admin party is over, on an anonymous ``PUT /newdb`` ("db.info is not
  a function") and on any request to a database after an anonymous ``DELETE``
  of it was refused with 401 (an unhandled rejection from pouchdb-security).
* Query parameters reach filter functions JSON-parsed: ``?mac=1000`` is the
  number 1000.
* A ``/`` in a database name (sent as %2F) is dropped from the stored name
  (express-pouchdb's clean-filename.js): ``a/b`` is listed as ``ab``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any, Optional

import requests

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_SERVER = ROOT / ".cache" / "pouchdb" / "node_modules" / ".bin" / "pouchdb-server"
START_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """A test pouchdb-server did not start, or would not make its admin."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM the server should pytest itself be killed.

    Runs in the child before exec.  PR_SET_PDEATHSIG fires when the *thread*
    that started the child exits; fixtures start servers on the main thread.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def db_url(server_url: str, name: str) -> str:
    """URL of database ``name``: a slash in the name must be sent as %2F."""
    return f"{server_url}/{urllib.parse.quote(name, safe='')}"


def create_database(server_url: str, name: str) -> None:
    response = requests.put(db_url(server_url, name), timeout=30)
    if response.status_code not in (201, 202):
        raise ServerError(f"PUT {name}: {response.status_code} {response.text}")


def delete_database(server_url: str, name: str) -> None:
    response = requests.delete(db_url(server_url, name), timeout=30)
    if response.status_code not in (200, 202, 404):
        raise ServerError(f"DELETE {name}: {response.status_code} {response.text}")


class PouchServer:
    """One pouchdb-server process on 127.0.0.1 with server admin ``user``.

    ``in_memory`` servers forget their databases when stopped; the others keep
    them in ``workdir/data``, so :meth:`stop` then :meth:`start` (same port,
    same directory) is a server restart as a Pi would see it.
    """

    def __init__(self, workdir: Path, *, in_memory: bool, user: str = "admin",
                 password: str = "pw") -> None:
        self.workdir = Path(workdir)
        self.in_memory = in_memory
        self.user = user
        self.password = password
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._output: Optional[IO[bytes]] = None
        self._paused = False

    def __repr__(self) -> str:
        return f"<PouchServer {self.plain_url} pid={self.pid} dir={self.workdir}>"

    @property
    def plain_url(self) -> str:
        """The server's URL without credentials (an anonymous client)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The server's URL with the admin's credentials."""
        user, password = (urllib.parse.quote(part, safe="") for part in (self.user, self.password))
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, limit: int = 6000) -> str:
        """The end of what the server printed (its log and any crash trace)."""
        path = self.workdir / "server.out"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return text[-limit:]

    # -- life cycle -------------------------------------------------------
    def start(self) -> None:
        """Start the server (on its old port after a stop) and make the admin."""
        if self.running:
            raise ServerError(f"{self!r} is already running")
        if not POUCHDB_SERVER.exists():
            raise ServerError(
                f"{POUCHDB_SERVER} is missing; run scripts/install-pouchdb-server "
                "(scripts/test does)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A fresh port can be taken between free_port() and the server's
        # bind; then try another.  A restart must keep its port.
        fresh = self.port is None
        for _ in range(3 if fresh else 1):
            if fresh:
                self.port = free_port()
            self._spawn()
            if self._wait_until_up():
                break
            self._kill()
            if "EADDRINUSE" not in self.log():
                break
        if not self.running:
            raise ServerError(f"pouchdb-server did not answer on port {self.port} within "
                              f"{START_TIMEOUT:g} s; its output:\n{self.log()}")
        self._ensure_admin()

    def stop(self) -> None:
        """Terminate the server (by its PID) and wait for it to exit."""
        self._kill()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but fall silent."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    # -- internals --------------------------------------------------------
    def _spawn(self) -> None:
        args = [str(POUCHDB_SERVER), "--port", str(self.port), "--host", "127.0.0.1",
                "--no-color"]
        if self.in_memory:
            args.append("--in-memory")
        else:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            args += ["--dir", str(data)]
        self._output = open(self.workdir / "server.out", "ab")
        # cwd: pouchdb-server writes config.json and log.txt into it.
        self.process = subprocess.Popen(
            args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                if requests.get(self.plain_url, timeout=2).ok:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.1)
        return False

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            try:
                if self._paused:
                    os.kill(process.pid, signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._paused = False
        if self._output is not None:
            self._output.close()
            self._output = None

    def _is_admin(self) -> bool:
        try:
            response = requests.get(f"{self.url}/_session", timeout=10)
        except requests.RequestException:
            return False
        roles: Any = response.json().get("userCtx", {}).get("roles", []) if response.ok else []
        return "_admin" in roles

    def _ensure_admin(self) -> None:
        """Create the server admin unless it exists (restart from config.json).

        Creating the first admin ends admin party: anonymous requests lose
        their admin rights from then on.
        """
        if self._is_admin():
            return
        response = requests.put(
            f"{self.plain_url}/_config/admins/{urllib.parse.quote(self.user, safe='')}",
            json=self.password, timeout=10,
        )
        if not response.ok or not self._is_admin():
            raise ServerError(
                f"cannot make server admin {self.user!r}: PUT /_config/admins answered "
                f"{response.status_code} {response.text}; server output:\n{self.log()}"
            )

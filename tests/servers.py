"""Test servers: pouchdb-server or Apache CouchDB processes, each with a server admin.

``HIMBEERE_TEST_SERVER`` picks the kind (:func:`selected_kind`): ``pouchdb``
(the default, :class:`PouchServer`) or ``couchdb`` (:class:`CouchServer`,
Apache CouchDB 3.5.2 unpacked from ``../shared/couchdb`` into ``.cache/``).
Both classes have the same interface: start/stop/kill/pause/resume, url,
plain_url, log(), running, pid.

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any, Optional, Union

import requests

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_SERVER = ROOT / ".cache" / "pouchdb" / "node_modules" / ".bin" / "pouchdb-server"
START_TIMEOUT = 30.0

#: Which server the test session starts: ``pouchdb`` (default) or ``couchdb``.
SERVER_ENV = "HIMBEERE_TEST_SERVER"
SERVER_KINDS = ("pouchdb", "couchdb")

COUCHDB_VERSION = "3.5.2"
#: The shared folder with the relocatable CouchDB release, beside the clone (read-only in CI).
COUCHDB_RELEASES = ROOT.parent / "shared" / "couchdb"
COUCHDB_TARBALL = (COUCHDB_RELEASES
                   / f"apache-couchdb-{COUCHDB_VERSION}-quickjs-bookworm-amd64.tar.gz")
#: Where the tarball is unpacked (git-ignored); holds start.sh, stop.sh, release/.
COUCHDB_HOME = ROOT / ".cache" / f"couchdb-{COUCHDB_VERSION}"
COUCHDB_START_TIMEOUT = 120.0

#: The fixture admin's password on both servers: not an English word, long
#: enough that a test can assert it never shows up in output.
ADMIN_PASSWORD = "pw-q7x2vk"


class ServerError(RuntimeError):
    """A test server did not start, or would not make its admin."""


def selected_kind() -> str:
    """``pouchdb`` or ``couchdb`` from ``HIMBEERE_TEST_SERVER``; ServerError otherwise."""
    kind = os.environ.get(SERVER_ENV, "").strip().lower() or "pouchdb"
    if kind not in SERVER_KINDS:
        raise ServerError(f"{SERVER_ENV}={os.environ[SERVER_ENV]!r}: must be one of "
                          f"{', '.join(SERVER_KINDS)}")
    return kind


def ensure_couchdb() -> Path:
    """The unpacked CouchDB release (``.cache/couchdb-3.5.2``), unpacking it if needed.

    Safe when several processes (xdist workers) race: each unpacks into a
    temporary directory beside the target and renames it into place; the
    losers throw theirs away.
    """
    if (COUCHDB_HOME / "start.sh").exists():
        return COUCHDB_HOME
    if not COUCHDB_TARBALL.exists():
        raise ServerError(f"no CouchDB release: {COUCHDB_TARBALL} is missing")
    COUCHDB_HOME.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-couchdb-", dir=COUCHDB_HOME.parent))
    try:
        subprocess.run(["tar", "xzf", str(COUCHDB_TARBALL), "-C", str(scratch)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        try:
            os.rename(scratch / COUCHDB_HOME.name, COUCHDB_HOME)
        except OSError:
            if not (COUCHDB_HOME / "start.sh").exists():
                raise
    except subprocess.CalledProcessError as error:
        raise ServerError(f"cannot unpack {COUCHDB_TARBALL}: "
                          f"{error.stderr.decode(errors='replace').strip()}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return COUCHDB_HOME


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Nothing listens on TCP ``port`` of the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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


class _LoopbackServer:
    """What both test servers share: a port on loopback and an admin."""

    port: Optional[int]
    user: str
    password: str
    workdir: Path

    @property
    def pid(self) -> Optional[int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.plain_url} pid={self.pid} dir={self.workdir}>"

    @property
    def plain_url(self) -> str:
        """The server's URL without credentials (an anonymous client)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The server's URL with the admin's credentials."""
        user, password = (urllib.parse.quote(part, safe="") for part in (self.user, self.password))
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def _is_admin(self) -> bool:
        try:
            response = requests.get(f"{self.url}/_session", timeout=10)
        except requests.RequestException:
            return False
        roles: Any = response.json().get("userCtx", {}).get("roles", []) if response.ok else []
        return "_admin" in roles


class PouchServer(_LoopbackServer):
    """One pouchdb-server process on 127.0.0.1 with server admin ``user``.

    ``in_memory`` servers forget their databases when stopped; the others keep
    them in ``workdir/data``, so :meth:`stop` then :meth:`start` (same port,
    same directory) is a server restart as a Pi would see it.
    """

    kind = "pouchdb"

    def __init__(self, workdir: Path, *, in_memory: bool, user: str = "admin",
                 password: str = ADMIN_PASSWORD) -> None:
        self.workdir = Path(workdir)
        self.in_memory = in_memory
        self.user = user
        self.password = password
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._output: Optional[IO[bytes]] = None
        self._paused = False

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

    def kill(self) -> None:
        """``kill -9`` the server, as a power cut would; :meth:`start` brings it back."""
        if self.process is not None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
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


def _process_state(pid: int) -> Optional[tuple[str, int]]:
    """(state letter, start time in clock ticks) of ``pid``; None if there is no such process.

    A zombie is as good as gone: a server started through ``start.sh`` is not
    our child, and whoever inherits it may be slow to reap it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (fields[0], int(fields[19])) if fields[0] not in ("Z", "X") else None


class CouchServer(_LoopbackServer):
    """One Apache CouchDB 3.5.2 single-node server on 127.0.0.1 with data in ``workdir``.

    Started by the release's ``start.sh PORT DATADIR`` (which makes admin
    ``admin``/``password``, waits until it answers and prints the PID);
    :meth:`start` after :meth:`stop` or :meth:`kill` runs it again on the same
    port and data directory: a server restart as a Pi would see it.  The
    fixture's own admin ``user`` (a password that is no English word) is
    added through ``/_node/_local/_config/admins`` after every start, since
    ``start.sh`` rewrites ``local.ini``.
    """

    kind = "couchdb"

    def __init__(self, workdir: Path, *, user: str = "tester",
                 password: str = ADMIN_PASSWORD) -> None:
        self.workdir = Path(workdir)
        self.user = user
        self.password = password
        self.port: Optional[int] = None
        self._pid: Optional[int] = None
        self._started: Optional[int] = None  # the PID's start time: PIDs get reused
        self._watchdog: Optional[subprocess.Popen[bytes]] = None
        self._paused = False

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def pid(self) -> Optional[int]:
        return self._pid if self.running else None

    @property
    def running(self) -> bool:
        if self._pid is None:
            return False
        state = _process_state(self._pid)
        return state is not None and state[1] == self._started

    def log(self, limit: int = 6000) -> str:
        """The end of the server's log (``DATADIR/couch.log``) and of start.sh's output."""
        parts = []
        for path in (self.datadir / "couch.log", self.workdir / "start.out"):
            try:
                parts.append(path.read_text(encoding="utf-8", errors="replace")[-limit:])
            except FileNotFoundError:
                pass
        return "\n".join(parts) or "(no output)"

    # -- life cycle -------------------------------------------------------
    def start(self) -> None:
        """Start the server (on its old port and data after a stop) and add the admin."""
        if self.running:
            raise ServerError(f"{self!r} is already running")
        home = ensure_couchdb()
        self.workdir.mkdir(parents=True, exist_ok=True)
        fresh = self.port is None
        result: Optional[subprocess.CompletedProcess[str]] = None
        for _ in range(3 if fresh else 1):
            if fresh:
                self.port = free_port()
            result = subprocess.run(
                [str(home / "start.sh"), str(self.port), str(self.datadir)],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=COUCHDB_START_TIMEOUT + 30,
                env=dict(os.environ, COUCHDB_START_TIMEOUT=str(int(COUCHDB_START_TIMEOUT))),
            )
            with open(self.workdir / "start.out", "a", encoding="utf-8") as out:
                out.write(result.stdout + result.stderr)
            if result.returncode == 0 or "already in use" not in result.stderr:
                break
        assert result is not None
        if result.returncode != 0:
            self._forget_pidfile()
            raise ServerError(f"CouchDB start.sh {self.port} {self.datadir} failed "
                              f"({result.returncode}): {result.stderr.strip()}\n{self.log()}")
        self._pid = int(result.stdout.split()[-1])
        state = _process_state(self._pid)
        self._started = state[1] if state else None
        self._guard()
        self._ensure_admin()

    def stop(self) -> None:
        """Terminate the server (SIGTERM by its PID, SIGKILL after 30 s) and wait for it."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """``kill -9`` the server, as a power cut would; :meth:`start` brings it back."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but fall silent."""
        assert self._pid is not None
        os.kill(self._pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._pid is not None
        os.kill(self._pid, signal.SIGCONT)
        self._paused = False

    # -- internals --------------------------------------------------------
    def _guard(self) -> None:
        """A watchdog that ``kill -9``s the server should pytest itself die.

        ``start.sh`` detaches CouchDB (setsid), so the server would outlive
        an interrupted test run; the watchdog is our child and gets SIGTERM
        when we die (PR_SET_PDEATHSIG).
        """
        if not sys.platform.startswith("linux"):
            return
        self._watchdog = subprocess.Popen(
            ["sh", "-c", 'trap \'kill -KILL "$0" 2>/dev/null; exit 0\' TERM; '
                         'tail --pid="$0" -f /dev/null & wait', str(self._pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def _end(self, sig: Union[int, signal.Signals]) -> None:
        pid = self._pid
        if pid is not None and self.running:
            try:
                os.kill(pid, sig)
                if self._paused:
                    os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.running:
                os.kill(pid, signal.SIGKILL)
                while self.running:
                    time.sleep(0.05)
        self._pid = self._started = None
        self._paused = False
        self._forget_pidfile()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            try:
                watchdog.kill()  # not TERM: its trap would kill -9 a reused PID
            except ProcessLookupError:
                pass
            watchdog.wait(timeout=10)

    def _forget_pidfile(self) -> None:
        try:
            (self.datadir / "couchdb.pid").unlink()
        except FileNotFoundError:
            pass

    def _ensure_admin(self) -> None:
        """Add the fixture admin (start.sh made only admin/password)."""
        if self._is_admin():
            return
        response = requests.put(
            f"{self.plain_url}/_node/_local/_config/admins/"
            f"{urllib.parse.quote(self.user, safe='')}",
            json=self.password, auth=("admin", "password"), timeout=30,
        )
        # The password is hashed asynchronously; wait until the login works.
        deadline = time.monotonic() + 30
        while response.ok and not self._is_admin() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not response.ok or not self._is_admin():
            raise ServerError(
                f"cannot make server admin {self.user!r}: PUT /_node/_local/_config/admins "
                f"answered {response.status_code} {response.text}; server log:\n{self.log()}"
            )


#: Either kind of test server.
Server = Union[PouchServer, CouchServer]


def make_server(kind: str, workdir: Path, *, in_memory: bool = False) -> Server:
    """A (not yet started) server of ``kind``; CouchDB always keeps its data on disk."""
    if kind == "couchdb":
        return CouchServer(workdir)
    return PouchServer(workdir, in_memory=in_memory)

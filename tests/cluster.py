"""A 3-node Apache CouchDB 3.5.2 cluster on loopback, for the cluster tests.

The release comes from the shared tarball (``../shared/couchdb``, see its
README), unpacked once into the git-ignored ``.cache/couchdb-3.5.2``; its
``start-cluster.sh`` starts the nodes, ``start.sh PORT DATAROOT/node<i>``
brings one back after a ``kill -9``, and every node is stopped by its PID at
the end.  They run with ``HIMBEERE_TEST_SERVER=couchdb``; without the
release they skip with "skipped: no CouchDB release".

Each node listens on its own HTTP port and on an Erlang distribution port
10000 below it; :func:`free_base_port` finds a base where all of them are
free.  The admin is ``admin``/``password`` on every node.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Optional

import requests

from tests.servers import port_free

#: The Erlang distribution port of a node is its HTTP port minus this.
DIST_OFFSET = 10000
ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / ".cache" / "couchdb-3.5.2"
TARBALL = (ROOT.parent / "shared" / "couchdb"
           / "apache-couchdb-3.5.2-quickjs-bookworm-amd64.tar.gz")
ADMIN = ("admin", "password")
NO_RELEASE = "skipped: no CouchDB release"
SERVER_ENV = "HIMBEERE_TEST_SERVER"
#: Seconds for the whole cluster to start (three nodes, one after the other).
START_TIMEOUT = 300.0


def skip_reason() -> Optional[str]:
    """Why the cluster tests cannot run now, or None.

    They start three CouchDB nodes, so they run with
    ``HIMBEERE_TEST_SERVER=couchdb`` only (CI's cluster step), not in every
    pouchdb-server run of the suite.
    """
    if os.environ.get(SERVER_ENV) != "couchdb":
        return f"cluster tests run with {SERVER_ENV}=couchdb"
    if release() is None:
        return NO_RELEASE
    return None


class ClusterError(RuntimeError):
    """The cluster did not start, or a node would not come back."""


def release() -> Optional[Path]:
    """The unpacked CouchDB release, unpacking the shared tarball if need be."""
    if (RELEASE / "start-cluster.sh").exists():
        return RELEASE
    if not TARBALL.exists():
        return None
    RELEASE.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL) as archive:
        archive.extractall(RELEASE.parent)  # noqa: S202  # our own release tarball
    return RELEASE if (RELEASE / "start-cluster.sh").exists() else None


def free_base_port(size: int = 3) -> int:
    """A base port B such that B..B+size-1 and B-10000.. (Erlang) are all free.

    Both ranges stay below Linux's ephemeral ports (32768 up), which any
    outgoing connection may take between this check and the node's start.
    """
    for _ in range(200):
        base = random.randrange(23000, 28000 - size)
        ports = [base + i for i in range(size)] + [base - DIST_OFFSET + i for i in range(size)]
        if all(port_free(port) for port in ports):
            return base
    raise ClusterError("no free ports for a cluster")


class CouchCluster:
    """``size`` CouchDB nodes in one cluster under ``root``, from port ``base_port``."""

    def __init__(self, release_dir: Path, root: Path, base_port: int, size: int = 3) -> None:
        self.release = release_dir
        self.root = root
        self.base_port = base_port
        self.size = size

    def __repr__(self) -> str:
        return f"<CouchCluster {self.size} nodes from port {self.base_port} in {self.root}>"

    # -- addresses ---------------------------------------------------------------------
    def port(self, index: int) -> int:
        """The HTTP port of node ``index`` (1 to size)."""
        return self.base_port + index - 1

    def plain_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port(index)}"

    def url(self, index: int) -> str:
        """Node ``index``'s URL with the admin's credentials."""
        return f"http://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{self.port(index)}"

    def server_list(self, first: int = 1) -> str:
        """Every node, ``first`` first: the admin URL, then the plain ones.

        The plain ones inherit the admin's credentials (the ``server`` setting).
        """
        order = [first] + [i for i in range(1, self.size + 1) if i != first]
        return ",".join([self.url(order[0])] + [self.plain_url(i) for i in order[1:]])

    def node_dir(self, index: int) -> Path:
        return self.root / f"node{index}"

    def pid(self, index: int) -> Optional[int]:
        try:
            return int((self.node_dir(index) / "couchdb.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start every node (or the ones that are down) and wait for the cluster."""
        self.root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [str(self.release / "start-cluster.sh"), str(self.size), str(self.base_port),
             str(self.root)],
            capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
            env=dict(os.environ, COUCHDB_DIST_BASEPORT=str(self.base_port - DIST_OFFSET)))
        if result.returncode != 0:
            raise ClusterError(f"start-cluster.sh failed ({result.returncode}):\n"
                               f"{result.stderr[-3000:]}")

    def kill(self, index: int) -> None:
        """``kill -9`` node ``index`` and wait until it is gone."""
        pid = self.pid(index)
        if pid is None:
            return
        _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)

    def freeze(self, index: int) -> None:
        """SIGSTOP node ``index``: its connections stay open but fall silent."""
        pid = self.pid(index)
        if pid is not None:
            _signal(pid, signal.SIGSTOP)

    def thaw(self, index: int) -> None:
        pid = self.pid(index)
        if pid is not None:
            _signal(pid, signal.SIGCONT)

    def restart(self, index: int) -> None:
        """Bring node ``index`` back with its data: ``start.sh PORT DATAROOT/node<i>``."""
        pid = self.pid(index)
        if pid is not None and not _alive(pid):
            # A killed node nobody reaped yet is a zombie, which start.sh's
            # ``kill -0`` takes for a running server.
            (self.node_dir(index) / "couchdb.pid").unlink(missing_ok=True)
        result = subprocess.run(
            [str(self.release / "start.sh"), str(self.port(index)), str(self.node_dir(index))],
            capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        if result.returncode != 0:
            raise ClusterError(f"start.sh for node{index} failed ({result.returncode}):\n"
                               f"{result.stderr[-3000:]}")

    def up(self, index: int) -> bool:
        try:
            return requests.get(f"{self.plain_url(index)}/_up", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop every node by its PID: SIGTERM, then SIGKILL after 30 s."""
        pids = [pid for pid in (self.pid(i) for i in range(1, self.size + 1))
                if pid is not None and _alive(pid)]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)


def open_cluster(release_dir: Path, workdir: Path, size: int = 3,
                 attempts: int = 2) -> CouchCluster:
    """Start a cluster under ``workdir`` on free ports; once more on new ports if it fails.

    A node that cannot join in time (ports taken meanwhile, a loaded
    machine) fails the start; the nodes that did start are stopped.
    """
    error: Optional[ClusterError] = None
    for attempt in range(attempts):
        cluster = CouchCluster(release_dir, workdir / f"cluster{attempt}", free_base_port(size),
                               size)
        try:
            cluster.start()
            return cluster
        except (ClusterError, subprocess.TimeoutExpired) as exc:
            cluster.stop()
            error = ClusterError(str(exc))
    assert error is not None
    raise error


def _signal(pid: int, sig: int) -> None:
    """Signal a node: its whole process group (beam and its helpers), which it leads."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

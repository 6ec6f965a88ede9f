"""The node daemon: feed, programs, commands and heartbeat in one process.

How a change travels::

    CouchDB _changes (filtered to this node)
      -> Feed thread                      (feed.py, saves seq after each change)
         -> code document  -> Supervisor  (programs.py, main thread)
                              -> ForkServer forks a child (forkserver.py, child.py)
         -> _cmd document  -> Commands    (commands.py, thread pool)
      Supervisor state changes -> Status  (status.py, status database)
      lease:scheduler (status database) -> Placement: which placed programs
                                 run here; the leader assigns them (placement.py)
      node:<mac> (status database) -> NodeLabels: which programs for many
                                 nodes run here, refreshed each beat (targeting.py)
      With several servers: conflicts of the node's own documents -> Conflicts,
                                 every 30 beats (conflicts.py)

Signals only set flags (logging in a handler is unsafe): TERM/INT stop
gracefully, a second one forces; HUP reloads the configuration and restarts
all programs; USR1 writes the stacks of the daemon and its programs to the log.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import discovery, identity, launch, signing, statelock
from .commands import Commands
from .component import Component
from .config import Config, redact
from .conflicts import CONFLICT_HEARTBEATS, Conflicts
from .couch import Couch, Doc, split_servers, transport
from .exceptions import ConfigError, CouchError, HimbeereError
from .feed import Feed, SeqStore
from .fleet.gate import Gate
from .fleet.placement import CHILD_FENCE, LEASE_TTL, Placement
from .fleet.rollout import Driver
from .fleet.targeting import NodeLabels
from .health import Health
from .logship import EVENT, LogShipper, OutputLog
from .programs import Supervisor
from .recheck import RECHECK_HEARTBEATS, Recheck
from .schema import COMMAND_TYPE, commands_id
from .status import Status
from .upgrade import Upgrader

log = logging.getLogger(__name__)

#: Settings whose change needs the whole daemon rebuilt, not just programs.
CORE = ("server", "database", "status_database", "mac_id", "interface", "state_dir")


class Daemon:
    """One node.  ``run()`` blocks until a stop signal or :meth:`request_stop`."""

    def __init__(self, config: Config,
                 reload_config: Optional[Callable[[], Config]] = None) -> None:
        if not config.server:
            raise ConfigError(
                "server: not set; set it in the config file, HIMBEERE_SERVER, --server, "
                "or pair the node with `himbeere-upload discover`"
            )
        self.config = config
        self.reload_config = reload_config
        self.stop_requested = 0  # 1: graceful, 2: forced
        #: What run() returns: launch.EXIT_UPGRADE once a new version is installed.
        self.exit_code = 0
        self.reload_requested = False
        self.dump_requested = False
        self._stopped = threading.Event()
        self._recovered = False
        self._locked: Optional[str] = None
        self._setup()

    def _setup(self) -> None:
        config = self.config
        self._recovered = False
        config.state_path.mkdir(parents=True, exist_ok=True)
        # Before anything runs: a second daemon on one node would run every
        # command twice and kill the first one's programs.
        statelock.acquire(config.state_path)
        if self._locked is not None and self._locked != config.state_dir:
            statelock.release(self._locked)  # a reload moved the state directory
        self._locked = config.state_dir
        self.node = identity.getmacid(config.interface, config.mac_id)
        self.couch = Couch(config.server or "")
        self.db = self.couch.database(config.database)
        self.status_db = self.couch.database(config.status_db)
        self.supervisor = Supervisor(
            node=self.node, couch_url=self.couch.rotated_url, database=config.database,
            state_dir=config.state_path, on_change=self._program_changed,
            on_log=self._program_output, status_database=config.status_db,
        )
        self.logs = LogShipper(self.status_db, self.node)
        self.output = OutputLog()
        self.commands = Commands(self.db, self.node, config.state_path,
                                 status_db=self.status_db,
                                 server_time=self.couch.server_time)
        self.feed = Feed(
            self.couch, self.db, self.node,
            # Keyed by the whole list, in any order: a cluster's seq is valid
            # on each of its nodes.  With one server the key is its URL, as ever.
            SeqStore(config.state_path / "seq.json", config.database,
                     ",".join(sorted(self.couch.bases))),
            on_change=self.dispatch, timeout=config.feed_timeout,
            on_connect=self._connected,
        )
        self.pairing = discovery.Listener(config)
        self.health = Health(config.state_dir)
        self.labels = NodeLabels(self.status_db, self.node, on_change=self.supervisor.relabel)
        self.placement = Placement(
            self.status_db, self.db, self.node, config.heartbeat_interval,
            on_assigned=self.supervisor.assign,
            clock=self.couch.server_time,
            last_heartbeat=lambda: self.status.last_write,
            resources=self._resources, labels=self.labels,
            on_lead=Driver(self.status_db, str(self.node), clock=self.couch.server_time).drive,
            busy=lambda: self.gate.busy())
        # Documents under a staged rollout: the gate picks the release to run.
        self.gate = Gate(self.status_db, self.db, self.node, config.heartbeat_interval,
                         submit=self.supervisor.submit, on_event=self._program_event)
        self.upgrader = Upgrader(self.db, self.status_db, self.node, config.state_path,
                                 on_installed=self._upgrade_installed,
                                 heartbeats=lambda: self.status.writes)
        self.status = Status(self.status_db, self.node, config.heartbeat_interval,
                             programs=self.supervisor.snapshot, interface=config.interface,
                             extra=lambda: dict(self.health.collect(),
                                                **self.placement.describe(),
                                                **self.upgrader.describe()),
                             clock_offset=lambda: self.couch.clock_offset,
                             history_interval=config.history_interval)
        self.recheck = Recheck(self.db, self.node,
                               RECHECK_HEARTBEATS * config.heartbeat_interval,
                               programs=self.supervisor.snapshot,
                               on_change=self._program_doc)
        #: Started in this order, stopped in reverse: what writes results out
        #: starts first; what brings work in (placement, feed, pairing) stops first.
        self.components: list[Component] = [self.status, self.logs, self.commands,
                                             self.placement, self.gate, self.feed,
                                             self.recheck, self.upgrader,
                                             self.pairing]
        # Only a node with several servers (a site's relay and the central
        # server) writes a document on two sides that replicate into a conflict.
        self.conflicts = Conflicts(self.status_db, self.db, self.node,
                                   CONFLICT_HEARTBEATS * config.heartbeat_interval)
        if len(self.couch.servers) > 1:
            self.components.append(self.conflicts)
        self.apply(config)
        self.couch.on_move = self._server_moved

    def apply(self, config: Config) -> None:
        """Hand the settings a reload may change to the components (at setup, too)."""
        self.config = config
        self.supervisor.grace_period = config.grace_period
        self.supervisor.default_restart = config.restart_policy
        self.supervisor.fence = CHILD_FENCE * config.heartbeat_interval
        self.supervisor.max_programs = config.max_programs  # a higher one admits at once
        self.status.interval = config.heartbeat_interval
        self.status.set_history_interval(config.history_interval)
        self.placement.interval = config.heartbeat_interval
        self.gate.interval = config.heartbeat_interval
        self.placement.lease.ttl = LEASE_TTL * config.heartbeat_interval
        self.recheck.interval = RECHECK_HEARTBEATS * config.heartbeat_interval
        self.conflicts.interval = CONFLICT_HEARTBEATS * config.heartbeat_interval
        self.commands.default_timeout = config.command_timeout
        self.commands.grace_period = config.grace_period
        self.output.rate = config.program_log_rate
        # Read here, at every reload too: a key removed from trusted_keys is revoked.
        policy = signing.policy(config.trusted_keys, config.require_signed, config.state_path)
        self.supervisor.signatures = self.commands.signatures = policy
        trusted = signing.parse_trusted(config.trusted_keys)
        trusted.update(signing.read_keys_file(config.state_path))
        self.upgrader.trusted = trusted  # a daemon release is checked whenever keys are set

    def _server_moved(self) -> None:
        """Every component follows the shared :class:`Couch`; programs start there too."""
        self.supervisor.couch_url = self.couch.rotated_url
        self.status.poke()  # say soon which server the node uses now

    def _resources(self) -> dict[str, Optional[float]]:
        """Free RAM and disk, for placement to check what it is assigned."""
        used, total = self.health.memory()
        return {"memory_used_mb": used, "memory_total_mb": total,
                "disk_free_mb": self.health.disk_free()}

    # -- wiring ------------------------------------------------------------------
    def dispatch(self, doc: Doc) -> None:
        """Route a document from the feed to the programs or the commands."""
        kind = str(doc.get("type"))
        if self.upgrader.note(doc):
            return
        if kind in (commands_id(self.node), COMMAND_TYPE) and not doc.get("_deleted"):
            self.commands.submit(doc)
        else:
            self.placement.note(doc)
            self.labels.note(doc)  # first: the program finds the labels known
            self._program_doc(doc)

    def _program_doc(self, doc: Doc) -> None:
        """A code document to the supervisor, unless a staged rollout gates it.

        With ``require_signed`` a document picks the release to run (its
        ``rollout`` and ``previous_release``) only if its own signature holds:
        else an admin could edit them and the node would run another release
        than the deployer signed for.  Such a document goes straight to the
        supervisor, which refuses it (``rejected``) and runs nothing of it.
        """
        policy = self.supervisor.signatures
        if (policy is not None and doc.get("rollout") and not doc.get("_deleted")
                and signing.verify(doc, policy.trusted) is not None):
            self.gate.forget(str(doc.get("_id")))
            self.supervisor.submit(doc)
        elif not self.gate.take(doc):
            self.supervisor.submit(doc)

    def _program_event(self, doc_id: str, name: str, text: str) -> None:
        self._program_output(doc_id, name, [(time.time(), text, EVENT)], 0)

    def _program_output(self, doc_id: str, name: str, lines: list[Any], dropped: int) -> None:
        self.logs.add(doc_id, name, [tuple(line) for line in lines], dropped)
        # The daemon's own lines (time, text, kind) are in its log already.
        self.output.add(doc_id, name, [line[1] for line in lines if len(line) == 2], dropped)

    def _upgrade_installed(self, version: str) -> None:
        """A new version waits: stop cleanly, and tell the launcher to start it.

        The normal shutdown: programs stop, running commands end and write
        their results (the journal makes a restart safe), the final status is
        written.  Then run() returns :data:`~himbeere.launch.EXIT_UPGRADE`.
        """
        self.exit_code = launch.EXIT_UPGRADE
        self.request_stop()

    def _program_changed(self) -> None:
        self.status.poke()

    def _connected(self) -> None:
        if self._recovered:
            return
        try:
            if not self.status_db.exists():
                # Only an admin may create it; on pouchdb-server a non-admin
                # PUT /db even crashes the whole server.
                roles = self.couch.session_info().get("userCtx", {}).get("roles", [])
                if "_admin" in roles:
                    self.couch.create_database(self.status_db.name)
                    log.info("created status database %s", self.status_db.name)
                else:
                    log.error("status database %s does not exist, and only an admin may "
                              "create it: run `himbeere-upload setup URL`", self.status_db.name)
            count = self.commands.recover()
            if count:
                log.warning("marked %d command(s) interrupted by the last crash", count)
            self._recovered = True
        except CouchError as exc:
            log.warning("could not recover commands yet: %s", exc)

    # -- running -----------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self._install_signals()
        try:
            while True:
                self._run_once()
                if not self.reload_requested:
                    return self.exit_code
                self.reload_requested = False
                self.stop_requested = 0
                self._setup()
                log.info("restarted with the new configuration")
        finally:
            if self._locked is not None:
                statelock.release(self._locked)

    def _run_once(self) -> None:
        log.info("himbeere node %s: server %s, database %s, state %s", self.node,
                 redact(self.config.server), self.config.database, self.config.state_dir)
        killed = self.supervisor.kill_orphans()
        if killed:
            log.warning("killed %d program(s) left running by a previous daemon", killed)
        self.supervisor.fork_server.start()  # before any thread exists
        for component in self.components:
            component.start()
        try:
            while not self.stop_requested:
                self.placement.check_fence()
                self.supervisor.loop(1.0)
                self.output.tick()
                self._handle_flags()
        finally:
            self.shutdown(force=self.stop_requested >= 2)

    def _handle_flags(self) -> None:
        if self.dump_requested:
            self.dump_requested = False
            self.dump_stacks()
        if self.reload_requested:
            self._reload()

    def _reload(self) -> None:
        if self.reload_config is None:
            self.reload_requested = False
            self.supervisor.restart_all()
            return
        try:
            new = self.reload_config()
        except (HimbeereError, OSError) as exc:
            log.error("reload: %s; keeping the old configuration", exc)
            self.reload_requested = False
            return
        core_changed = any(getattr(new, key) != getattr(self.config, key) for key in CORE)
        if core_changed:
            self.config = new
            log.info("reload: server, database or identity changed; restarting the daemon")
            self.stop_requested = 1  # run() sees reload_requested and starts again
            return
        self.reload_requested = False
        log.info("reload: restarting all programs")
        self.apply(new)
        self.supervisor.restart_all()

    def dump_stacks(self) -> None:
        """Write every thread's stack, then ask every program for its own."""
        sys.stderr.write(f"--- himbeere daemon {os.getpid()} stacks ---\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for program in self.supervisor.programs.values():
            if program.pid:
                log.info("stack of %s (pid %s) follows", program.name, program.pid)
                try:
                    os.kill(program.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def shutdown(self, force: bool = False) -> None:
        """Stop the components in reverse order; programs stop before the commands do."""
        log.info("stopping%s", " now" if force else "")
        for component in reversed(self.components):
            if component is self.commands:
                # Placement stopped first: another node schedules from now on,
                # and ours move once "stopped" is written.
                force = self._stop_programs(force)
                component.stop(0.0 if force else None)  # forced: no grace for commands
            else:
                component.stop()
        self.supervisor.close()
        self._stopped.set()

    def _stop_programs(self, force: bool) -> bool:
        """Stop every program; a second stop signal forces.  True if forced."""
        self.supervisor.stop_all(force=force)
        deadline = time.monotonic() + self.config.grace_period + 30
        while self.supervisor.busy() and time.monotonic() < deadline:
            if self.stop_requested >= 2 and not force:
                force = True
                self.supervisor.stop_all(force=True)
            self.supervisor.loop(0.2)
        self.output.flush()
        return force

    # -- signals -----------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_dump)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1
        self.supervisor.wake()

    def _on_reload(self, signum: int, frame: Any) -> None:
        self.reload_requested = True
        self.supervisor.wake()

    def _on_dump(self, signum: int, frame: Any) -> None:
        self.dump_requested = True
        self.supervisor.wake()

    def request_stop(self, force: bool = False) -> None:
        """Stop from another thread (tests, embedding)."""
        self.stop_requested = 2 if force else max(1, self.stop_requested)
        self.supervisor.wake()


def run(config: Config, reload_config: Optional[Callable[[], Config]] = None) -> int:
    """Run a daemon in the foreground until it is stopped."""
    statelock.acquire(config.state_dir)  # before pairing, too: one daemon per node
    if not config.server:
        config = discovery.wait_for_server(config, reload_config)
        if not config.server:
            return 0  # stopped while waiting to be paired
    # No OpenSSL for a plain http:// server: 4 MB of a Pi's RAM (transport.py).
    transport.load_http_client(
        tls=any(url.startswith("https:") for url in split_servers(config.server)))
    return Daemon(config, reload_config).run()

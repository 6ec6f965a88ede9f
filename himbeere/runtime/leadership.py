"""Leader election for programs: ``leader(group)``, ``is_leader(group)``, ``on_leadership``.

Copies of a program on several nodes (or different programs) that call
``leader("jobs")`` contend for one lease of :mod:`himbeere.fleet.lease`: the
document ``lease:group:jobs`` of the status database, taken in the name
``<mac id>:<program doc id>`` (the status database lets a node take a lease
only in its own name or one starting with ``<mac id>:``).  Whoever holds it
leads; the others try again every :data:`~himbeere.defaults.LEADER_RETRY`
seconds (or a third of the ttl, if shorter) and take over once the leader
stops renewing and the lease expires, or at once when the leader releases
it as its program stops.

A helper thread of the program renews the lease every third of its ttl.
Leadership ends when a renewal finds someone else holding the lease, or
when the lease would expire without a successful renewal (the server is
unreachable).  Expiry is judged on the server's clock (ours corrected by
:attr:`himbeere.couch.Couch.clock_offset`), and a leader counts itself out
:func:`margin` seconds early, so that two nodes whose clock estimates
differ a little never lead at once.

``on_leadership(group, gained, lost)`` callbacks run in that helper thread:
``gained()`` when this program becomes the leader (at once if it leads
already), ``lost()`` when it stops leading while it runs.  Once the program
is asked to quit it keeps what it leads but takes no new leadership; when
``main()`` has returned (or raised) every lease it holds is released, with
no ``lost()`` call.
"""

from __future__ import annotations

import dataclasses
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import defaults
from ..schema import group_lease_name

if TYPE_CHECKING:  # lease.py imports http.client: a program that never elects skips it
    from ..couch import Database
    from ..fleet.lease import Lease

#: Shortest wait between two tries, so an unreachable server is not hammered.
MIN_WAIT = 0.2
#: Seconds a helper thread gets to finish its current try at the end.
JOIN_TIMEOUT = 5.0


#: The old name of :func:`~himbeere.schema.group_lease_name`; tests use it.
lease_name = group_lease_name


def margin(ttl: float) -> float:
    """Seconds before expiry at which a leader counts itself out."""
    return min(2.0, ttl / 5)


def _check_group(group: Any) -> str:
    if not isinstance(group, str) or not group or len(group) > 200:
        raise ValueError(f"group {group!r} is not allowed; allowed: a non-empty string "
                         "of at most 200 characters, e.g. 'jobs'")
    return group


def _check_ttl(ttl: Any) -> Optional[float]:
    if ttl is None:
        return None
    if (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
            or not 0 < ttl <= defaults.LEASE_MAX_TTL):
        raise ValueError(f"ttl {ttl!r} is not allowed; allowed: seconds > 0 and at most "
                         f"{defaults.LEASE_MAX_TTL:g} (the server refuses longer leases), "
                         "e.g. 15")
    return float(ttl)


def _expires(doc: dict[str, Any]) -> float:
    """As :func:`himbeere.fleet.lease.expires` (not imported: see above)."""
    value = doc.get("expires")
    return 0.0 if isinstance(value, bool) or not isinstance(value, (int, float)) else value


@dataclasses.dataclass
class Callbacks:
    gained: Optional[Callable[[], Any]]
    lost: Optional[Callable[[], Any]]
    #: Whether these callbacks were last told "gained" (True) or nothing/"lost".
    told: bool = False


class Election:
    """This program's part in the election of one group."""

    def __init__(self, group: str, lease: Lease) -> None:
        self.group = group
        self.lease = lease
        #: Server-clock time until which we count as the leader (0: we do not).
        self.until = 0.0
        #: The first try is the joining call's, not the helper thread's.
        self.next_try = float("inf")
        self.callbacks: list[Callbacks] = []
        #: Serializes tries: the helper thread and a first leader() call.
        self.lock = threading.Lock()


class Leadership:
    """Every group one program takes part in, and the thread that renews them."""

    def __init__(self, db: Callable[[], Database], holder: str, node: int, program: str,
                 clock: Callable[[], float], report: Callable[[str], None],
                 ttl: float = defaults.LEADER_TTL,
                 retry: float = defaults.LEADER_RETRY) -> None:
        #: Gives the status database; called when the first group is joined.
        self._db = db
        self.holder = holder
        self.node = node
        self.program = program
        self.clock = clock
        self.report = report
        self.ttl = ttl
        self.retry = retry
        self.elections: dict[str, Election] = {}
        #: Set once the program is asked to quit: renew, but take nothing new.
        self.quitting = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the helpers programs call -------------------------------------------------
    def leader(self, group: str, ttl: Optional[float] = None) -> bool:
        """Take part in the election of ``group``; True while this program leads it.

        The first call for a group tries to take the lease at once (one
        request); later calls answer from memory.  ``ttl`` (seconds, default
        :data:`~himbeere.defaults.LEADER_TTL`, at most
        :data:`~himbeere.defaults.LEASE_MAX_TTL`) is how long a lease outlives
        its last renewal, i.e. how long the others wait for a dead leader.
        """
        election = self._join(_check_group(group), _check_ttl(ttl))
        return self._leading(election)

    def is_leader(self, group: str) -> bool:
        """True while this program leads ``group``; never joins the election."""
        election = self.elections.get(_check_group(group))
        return election is not None and self._leading(election)

    def on_leadership(self, group: str, gained: Optional[Callable[[], Any]] = None,
                      lost: Optional[Callable[[], Any]] = None,
                      ttl: Optional[float] = None) -> None:
        """Call ``gained()`` when this program becomes leader of ``group``, and
        ``lost()`` when it stops leading; joins the election like :meth:`leader`."""
        for what, func in (("gained", gained), ("lost", lost)):
            if func is not None and not callable(func):
                raise TypeError(f"{what} must be a function or None, not {func!r}")
        election = self._join(_check_group(group), _check_ttl(ttl))
        with self._lock:
            election.callbacks.append(Callbacks(gained, lost))
        self._wake.set()  # the helper thread calls gained() if we lead already

    # -- joining -------------------------------------------------------------------
    def _join(self, group: str, ttl: Optional[float]) -> Election:
        with self._lock:
            election = self.elections.get(group)
            new = election is None
            if election is None:
                from ..fleet.lease import Lease

                lease = Lease(self._db(), group_lease_name(group), self.holder,
                              ttl or self.ttl, clock=self.clock)
                election = self.elections[group] = Election(group, lease)
            elif ttl is not None:
                election.lease.ttl = ttl
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="leadership",
                                                daemon=True)
                self._thread.start()
        if new:
            try:
                self._try(election)
            finally:
                if election.next_try == float("inf"):
                    election.next_try = self.clock()
                self._wake.set()
        return election

    def _leading(self, election: Election) -> bool:
        return election.until > self.clock()

    # -- trying and renewing ---------------------------------------------------------
    def _try(self, election: Election) -> None:
        """Take or renew the lease once; say until when we lead, and when to try next."""
        with election.lock:
            if self._closed.is_set():
                return
            lease = election.lease
            if self.quitting and not self._leading(election):
                election.next_try = self.clock() + self.retry
                return
            ok = lease.acquire(node=self.node, program=self.program)
            now = self.clock()
            ttl = lease.ttl
            doc = lease.doc or {}
            if ok:
                election.until = _expires(doc) - margin(ttl)
                election.next_try = now + ttl / 3
                return
            if lease.doc is None or doc.get("holder") != self.holder:
                election.until = 0.0  # someone else holds it (or won the race)
            # else: the server did not answer; we lead until our lease runs out
            wait = min(self.retry, ttl / 3)
            expires = _expires(doc)
            if doc.get("holder") not in (None, self.holder) and expires > now:
                wait = min(wait, expires - now + 0.05)  # be there when it expires
            election.next_try = now + max(MIN_WAIT, wait)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()  # before looking: a wake-up from now on is not lost
            with self._lock:
                elections = list(self.elections.values())
            for election in elections:
                if self._closed.is_set():
                    return
                if self.clock() >= election.next_try:
                    try:
                        self._try(election)
                    except Exception as exc:  # noqa: BLE001 - the thread must go on
                        self.report(f"leadership of {election.group}: {exc}")
                        election.next_try = self.clock() + self.retry
                self._tell(election)
            now = self.clock()
            times = [e.next_try for e in elections if e.next_try != float("inf")]
            times += [e.until for e in elections if e.until > now]
            wait = max(0.0, min(times) - now) if times else None
            self._wake.wait(wait)

    def _tell(self, election: Election) -> None:
        """Call the callbacks whose view of our leadership is out of date."""
        leading = self._leading(election)
        with self._lock:
            due = [c for c in election.callbacks if c.told != leading]
            for callbacks in due:
                callbacks.told = leading
        for callbacks in due:
            func = callbacks.gained if leading else callbacks.lost
            if func is None or self._closed.is_set():
                continue
            try:
                func()
            except Exception as exc:  # noqa: BLE001 - a program's bug, reported
                what = "gained" if leading else "lost"
                self.report(f"{what}() of leadership {election.group} failed: {exc}\n"
                            + traceback.format_exc().rstrip())

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop renewing and release every lease we hold (after main() ended)."""
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
        for election in list(self.elections.values()):
            with election.lock:
                if (election.lease.doc or {}).get("holder") == self.holder:
                    election.lease.release()
                election.until = 0.0

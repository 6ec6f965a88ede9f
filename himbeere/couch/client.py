"""All CouchDB access: the only module that builds a URL.

Everything else talks to :class:`Couch` (a server) and :class:`Database`.
The bytes travel through :mod:`himbeere.couch.transport` (``http.client`` on the
Pi, ``requests`` in the laptop tools); programs get a CouchDB-Python
``couchdb.Database`` handle from :meth:`Database.client_handle`, because that
is the API HimbeereCouch programs were written against.

Two server quirks shape this module:

* pouchdb-server gzips a response when the client accepts gzip, and its
  compressor buffers a continuous ``_changes`` feed until the buffer fills;
  so feeds ask for ``Accept-Encoding: identity``.
* pouchdb-server crashes on ``filter=_selector`` and on a filter whose design
  document is missing, so :meth:`Couch.supports_selector` decides from the
  server's root document, never by trying.
"""

from __future__ import annotations

import base64
import binascii
import copy
import email.utils
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple, Optional, Union

from ..exceptions import (
    ConfigError,
    Conflict,
    CouchError,
    NotFound,
    Unauthorized,
    Unreachable,
)
from . import transport as transports

log = logging.getLogger(__name__)

Doc = dict[str, Any]
Seq = Union[int, str]

#: Seconds to wait for an ordinary answer.
REQUEST_TIMEOUT = 30.0


def quote(name: str) -> str:
    """One URL path segment: ``nedm/raspberries`` becomes ``nedm%2Fraspberries``."""
    return urllib.parse.quote(name, safe="")


def doc_path(doc_id: str) -> str:
    """The path of a document: design documents keep their slash."""
    for prefix in ("_design/", "_local/"):
        if doc_id.startswith(prefix):
            return prefix + quote(doc_id[len(prefix):])
    return quote(doc_id)


class Server:
    """One server of a :class:`Couch`'s list: its URL, credentials and transport."""

    def __init__(self, url: str, transport: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.auth: Optional[tuple[str, str]] = None
        if parts.username is not None:
            self.auth = (
                urllib.parse.unquote(parts.username),
                urllib.parse.unquote(parts.password or ""),
            )
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"  # IPv6 literal
        if parts.port:
            netloc += f":{parts.port}"
        path = parts.path.rstrip("/")
        #: The URL without credentials: safe to print.
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
        self.http = transports.make(transport, self.base, self.auth)

    def __repr__(self) -> str:
        return f"<Server {self.base}>"


class Couch:
    """A CouchDB-compatible server at ``url`` (credentials in the URL).

    ``url`` may list several servers separated by commas, the nodes of one
    CouchDB cluster (see :func:`server_urls`).  Requests go to one of them,
    the *current* server, first the first; when it stops answering
    (:class:`Unreachable`), the current server moves on to the next in the
    list for every user of this object, and the request is sent there when
    that is safe (:func:`_may_resend`).  Every component of the daemon
    shares one :class:`Couch`, so they all fail over together.

    ``transport`` is ``"stdlib"`` (``http.client``, light enough for the
    daemon) or ``"requests"`` (proxies and certifi, for the laptop tools).
    """

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT,
                 transport: str = "stdlib") -> None:
        self.url = url
        self.timeout = timeout
        self.servers = [Server(one, transport) for one in split_servers(url)]
        self._current = 0
        self._lock = threading.Lock()
        #: Moves logged since the last answer: a long outage logs each once.
        self._moves: set[tuple[str, str]] = set()
        #: Called with no arguments after the current server moved on.
        self.on_move: Optional[Callable[[], None]] = None
        self._info: Optional[Doc] = None
        #: (round trip, offset) of the last answers with a ``Date`` header.
        self._offsets: list[tuple[float, float]] = []

    @property
    def current(self) -> Server:
        """The server requests go to now."""
        return self.servers[self._current]

    @property
    def base(self) -> str:
        """The current server's URL without credentials: safe to print."""
        return self.current.base

    @property
    def bases(self) -> list[str]:
        """Every server's URL without credentials, in the order given."""
        return [server.base for server in self.servers]

    @property
    def auth(self) -> Optional[tuple[str, str]]:
        return self.current.auth

    @property
    def http(self) -> transports.Transport:
        return self.current.http

    @property
    def current_url(self) -> str:
        """The current server's URL, credentials included."""
        return self.current.url

    @property
    def rotated_url(self) -> str:
        """Every server's URL (credentials included), the current one first.

        For a program's own connection: it starts where the daemon is now.
        """
        servers = self.servers[self._current:] + self.servers[:self._current]
        return ",".join(server.url for server in servers)

    def return_to_first(self, timeout: float = 5.0) -> bool:
        """Make the first server current again if it answers; True if it moved.

        The list is an order of preference (an edge site's relay before the
        central server): after a failover the daemon asks now and then
        whether the first is back, rather than staying on the fallback
        until that fails too.
        """
        with self._lock:
            if self._current == 0:
                return False
            first = self.servers[0]
        try:
            answer = first.http.send("GET", "/", None, {}, timeout)
        except Unreachable:
            return False
        if answer.status >= 500:
            return False
        with self._lock:
            self._current = 0
            self._moves.clear()
        log.warning("server %s answers again: using it now", first.base)
        if self.on_move is not None:
            self.on_move()
        return True

    def move_on(self, failed: Server, error: BaseException) -> None:
        """``failed`` stopped answering: make the next server the current one.

        Does nothing when another thread has moved on already, so threads
        that fail together skip one server, not one each.
        """
        if len(self.servers) < 2:
            return
        with self._lock:
            if self.servers[self._current] is not failed:
                return
            self._current = (self._current + 1) % len(self.servers)
            following = self.servers[self._current]
            move = (failed.base, following.base)
            first = move not in self._moves
            self._moves.add(move)
        log.log(logging.WARNING if first else logging.DEBUG,
                "server %s stopped answering (%s): using %s now", failed.base,
                transports.short(error), following.base)
        if self.on_move is not None:
            self.on_move()

    def __repr__(self) -> str:
        user = f"{self.auth[0]}@" if self.auth else ""
        return f"<Couch {user}{','.join(self.bases)}>"

    # -- plumbing ---------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        body: Any = None,
        timeout: Optional[float] = None,
        ok404: bool = False,
    ) -> Any:
        """Send one request and return the decoded JSON answer.

        Raises :class:`Unreachable`, :class:`Unauthorized`, :class:`NotFound`
        (or returns ``None`` with ``ok404``), :class:`Conflict` or
        :class:`CouchError`.
        """
        _, target, data, headers = self.prepare(method, path, params=params, body=body)
        tried: list[Server] = []
        errors: list[Unreachable] = []
        while True:
            server = self._untried(tried)
            tried.append(server)
            sent = time.time()
            try:
                answer = server.http.send(method, target, data, headers,
                                          timeout or self.timeout)
                break
            except Unreachable as exc:
                self.move_on(server, exc)
                errors.append(exc)
                if len(self.servers) == 1:
                    raise
                if len(tried) == len(self.servers) or not _may_resend(method, path, exc):
                    raise _all_failed(errors) from exc
        if self._moves:
            self._moves.clear()
        self._note_clock(answer.date, sent, time.time())
        if answer.status == 404 and ok404:
            return None
        if answer.status >= 400:
            raise _error(method, path, answer)
        if not answer.body:
            return None
        try:
            return json.loads(answer.body)
        except ValueError:
            raise CouchError(f"{method} /{path}: answer is not JSON") from None

    @staticmethod
    def prepare(method: str, path: str, *, params: Optional[Mapping[str, Any]] = None,
                body: Any = None) -> Prepared:
        """The request :meth:`request` sends, as bytes: for an HTTP client of another kind.

        ``benchmarks/simulate.py`` sends these with asyncio, so the thousands
        of nodes it plays make exactly the requests a daemon makes.
        """
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return Prepared(method, _target(path, params), data, headers)

    def _untried(self, tried: list[Server]) -> Server:
        """The current server, or the first after it not yet tried."""
        start = self._current
        for step in range(len(self.servers)):
            server = self.servers[(start + step) % len(self.servers)]
            if server not in tried:
                return server
        return self.current

    def _note_clock(self, date: Optional[str], sent: float, received: float) -> None:
        """Estimate the server's clock offset from an HTTP ``Date`` header.

        ``Date`` has whole seconds, so one reading is good to about half a
        second; the median of the last readings smooths that out.
        """
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # The header is truncated to the second: its true value is ~0.5 s later.
        self._offsets.append((received - sent, server + 0.5 - (sent + received) / 2))
        del self._offsets[:-9]

    @property
    def clock_offset(self) -> Optional[float]:
        """Seconds the server's clock is ahead of ours (None before any answer)."""
        if not self._offsets:
            return None
        # A request that waited in a busy server's queue (pouchdb-server has
        # one thread) carries a Date from near its end: its reading is off by
        # up to half its round trip, seconds under load.  Like NTP's clock
        # filter, trust only the quickest answers; leases depend on it, since
        # the server refuses a lease taken before it expired on its clock.
        quickest = min(trip for trip, _ in self._offsets)
        offsets = sorted(offset for trip, offset in self._offsets if trip <= quickest + 0.25)
        middle = len(offsets) // 2
        median = offsets[middle] if len(offsets) % 2 else sum(offsets[middle - 1:middle + 1]) / 2
        return round(median, 3)

    def server_time(self) -> float:
        """Now on the server's clock, as far as the answers' ``Date`` headers tell."""
        return time.time() + (self.clock_offset or 0.0)

    # -- server -----------------------------------------------------------
    def info(self, refresh: bool = False) -> Doc:
        """The server's root document (vendor and version), cached."""
        if self._info is None or refresh:
            self._info = self.request("GET", "")
        assert self._info is not None
        return self._info

    def supports_selector(self) -> bool:
        """True on Apache CouchDB >= 2, whose ``_changes`` takes ``_selector``.

        Decided from the root document: pouchdb-server crashes when asked.
        """
        info = self.info()
        if info.get("couchdb") != "Welcome" or "express-pouchdb" in info:
            return False
        try:
            major = int(str(info.get("version", "0")).split(".")[0])
        except ValueError:
            return False
        return major >= 2

    def as_user(self, name: str, password: str) -> Couch:
        """The same servers, with other credentials (a node's, to check them)."""
        urls = []
        for base in self.bases:
            parts = urllib.parse.urlsplit(base)
            netloc = f"{quote(name)}:{quote(password)}@{parts.netloc}"
            urls.append(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
        couch = Couch(",".join(urls), self.timeout, self.http.name)
        couch._current = self._current  # start where this one is now
        return couch

    def session_info(self) -> Doc:
        """``GET /_session``: who the server thinks we are."""
        return self.request("GET", "_session")

    def all_dbs(self) -> list[str]:
        return self.request("GET", "_all_dbs")

    def database(self, name: str) -> Database:
        return Database(self, name)

    def database_url(self, name: str) -> str:
        """Database ``name``'s URL on the current server, without credentials.

        For what another server must reach it by: a replication's ``source``
        or ``target`` (the credentials go beside it, in ``auth``).
        """
        return f"{self.base}/{quote(name)}"

    def configure(self, section: str, key: str, value: str) -> Optional[str]:
        """Set ``[section] key = value`` on the server reached (CouchDB's
        ``_node/_local/_config``; admin only); returns the value before."""
        before = self.request("PUT", f"_node/_local/_config/{quote(section)}/{quote(key)}",
                              body=value)
        return str(before) if before else None

    def create_database(self, name: str) -> bool:
        """Create ``name``; False if it already existed."""
        try:
            self.request("PUT", quote(name))
        except CouchError as exc:
            if exc.status == 412:  # file_exists
                return False
            raise
        return True

    def delete_database(self, name: str) -> None:
        self.request("DELETE", quote(name), ok404=True)


class Database:
    """One database on a :class:`Couch` server."""

    def __init__(self, couch: Couch, name: str) -> None:
        self.couch = couch
        self.name = name
        self.path = quote(name)

    def __repr__(self) -> str:
        return f"<Database {self.name!r} on {self.couch!r}>"

    def _request(self, method: str, path: str = "", **kwargs: Any) -> Any:
        full = f"{self.path}/{path}" if path else self.path
        return self.couch.request(method, full, **kwargs)

    def prepare(self, method: str, path: str = "", **kwargs: Any) -> Prepared:
        """What :meth:`_request` would send (see :meth:`Couch.prepare`)."""
        return self.couch.prepare(method, f"{self.path}/{path}" if path else self.path,
                                  **kwargs)

    def info(self) -> Doc:
        return self._request("GET")

    def exists(self) -> bool:
        return self.couch.request("GET", self.path, ok404=True) is not None

    def get(self, doc_id: str, **params: Any) -> Optional[Doc]:
        """The document, or None if it does not exist (or was deleted)."""
        return self._request("GET", doc_path(doc_id), params=params, ok404=True)

    def save(self, doc: Doc) -> Doc:
        """Create or update ``doc`` (by ``_id``/``_rev``); sets its new ``_rev``.

        Raises :class:`Conflict` when ``_rev`` is stale.
        """
        if "_id" in doc:
            answer = self._request("PUT", doc_path(doc["_id"]), body=doc)
        else:
            answer = self._request("POST", body=doc)
        doc["_id"], doc["_rev"] = answer["id"], answer["rev"]
        return doc

    def save_with_attachment(self, doc: Doc, name: str, data: bytes,
                             content_type: str = "application/octet-stream") -> Doc:
        """:meth:`save` ``doc`` with the attachment ``name`` holding ``data``, in one request.

        Inline (base64 in the JSON body), so one revision carries both: a
        reader never sees the document without its attachment.
        """
        attachments = dict(doc.get("_attachments") or {})
        attachments[name] = {"content_type": content_type,
                             "data": base64.b64encode(data).decode("ascii")}
        return self.save(dict(doc, _attachments=attachments))

    def attachment(self, doc_id: str, name: str) -> Optional[bytes]:
        """The bytes of attachment ``name`` of ``doc_id``; None if either is missing.

        Fetched inline (``attachments=true``, base64 in the JSON answer)
        through :meth:`Couch.request`, so the node's one HTTP path (failover,
        credentials, JSON errors) serves it too.
        """
        doc = self.get(doc_id, attachments=True)
        stub = ((doc or {}).get("_attachments") or {}).get(name)
        if not isinstance(stub, dict) or not isinstance(stub.get("data"), str):
            return None
        try:
            return base64.b64decode(stub["data"], validate=True)
        except (binascii.Error, ValueError):
            raise CouchError(f"attachment {name!r} of {doc_id}: not base64") from None

    def delete(self, doc: Doc) -> None:
        self._request("DELETE", doc_path(doc["_id"]), params={"rev": doc["_rev"]})

    def update(self, doc_id: str, change: Any, retries: int = 20,
               known: Optional[Doc] = None) -> Optional[Doc]:
        """Read-modify-write ``doc_id`` until it sticks; never drops a write.

        ``change(doc)`` edits the document in place (``doc`` is just
        ``{"_id": doc_id}`` for a new one) and returns False to leave it as
        it is.  A 409 re-reads and applies ``change`` again.  Returns the
        saved document, or None.

        ``known`` is the document as the caller last saw it (from a feed,
        say; ``{}`` for one it saw missing): the first try starts from a copy
        of it instead of a GET, which saves a round trip.  Should it be out
        of date, the write gets a 409 and the next try reads the document.
        """
        for attempt in range(retries):
            if attempt == 0 and known is not None:
                doc = copy.deepcopy(known)  # change() must not edit the caller's copy
                doc["_id"] = doc_id
            else:
                doc = self.get(doc_id) or {"_id": doc_id}
            if change(doc) is False:
                return None
            try:
                return self.save(doc)
            except Conflict:
                continue
            except Unauthorized:
                # Validation runs against the stored document before the _rev
                # check: a stale ``known`` copy that drops someone else's
                # field is refused (403) where it would have been a 409.
                if attempt == 0 and known is not None:
                    continue
                raise
        raise Conflict(f"{doc_id}: still conflicting after {retries} tries")

    def bulk_docs(self, docs: list[Doc], new_edits: bool = True) -> list[Doc]:
        """Write ``docs`` in one request; one answer per document, in order.

        Each answer is ``{"id", "rev"}`` or ``{"id", "error", "reason"}``
        (``conflict`` for a stale ``_rev``): the writes are independent.
        ``new_edits=False`` stores the revisions as given, as replication
        does (the answer is then empty on CouchDB).
        """
        body: Doc = {"docs": docs}
        if not new_edits:
            body["new_edits"] = False
        return self._request("POST", "_bulk_docs", body=body) or []

    def all_docs(self, **params: Any) -> list[Doc]:
        answer = self._request("GET", "_all_docs", params=params)
        return answer["rows"]

    def security(self) -> Doc:
        return self._request("GET", "_security") or {}

    def revs_limit(self) -> Optional[int]:
        """How many revisions of a document the server keeps; None if it cannot say.

        pouchdb-server has no ``_revs_limit`` endpoint (it answers 404).
        """
        answer = self._request("GET", "_revs_limit", ok404=True)
        return answer if isinstance(answer, int) else None

    def set_revs_limit(self, limit: int) -> None:
        self._request("PUT", "_revs_limit", body=limit)

    def set_security(self, security: Doc) -> None:
        self._request("PUT", "_security", body=security)

    def view(self, design: str, name: str, **params: Any) -> list[Doc]:
        answer = self._request("GET", f"_design/{quote(design)}/_view/{quote(name)}",
                               params=params)
        return answer["rows"]

    def changes(self, since: Seq = 0, feed_filter: Optional[FeedFilter] = None,
                **params: Any) -> Doc:
        """One normal (non-continuous) ``_changes`` answer."""
        query = dict(params, since=since)
        body = None
        method = "GET"
        if feed_filter is not None:
            query.update(feed_filter.params)
            if feed_filter.selector is not None:
                method, body = "POST", {"selector": feed_filter.selector}
        return self._request(method, "_changes", params=query, body=body)

    def follow(
        self,
        since: Seq,
        feed_filter: Optional[FeedFilter] = None,
        timeout: float = 30.0,
        include_docs: bool = True,
        stop: Optional[threading.Event] = None,
        on_open: Optional[Callable[[], None]] = None,
    ) -> Iterator[Doc]:
        """Yield changes from a continuous ``_changes`` feed, forever.

        The server sends a heartbeat (an empty line) every ``timeout / 3``
        seconds; a connection silent for ``timeout`` seconds is dead and
        raises :class:`Unreachable`, as does any break of the connection.
        """
        method, target, body, headers = self.follow_request(since, feed_filter, timeout,
                                                            include_docs)
        path = f"{self.path}/_changes"
        # A continuous feed is served by the node it is connected to: when
        # that node dies, the feed breaks and the current server moves on,
        # and the caller reconnects to the next with its last seq (cluster
        # sequences are valid on every node of the cluster).
        server = self.couch.current
        try:
            answer = server.http.stream(method, target, body, headers, timeout)
        except Unreachable as exc:
            self.couch.move_on(server, exc)
            raise
        if answer.status >= 400:
            raise _error(method, path, answer)
        if on_open is not None:
            on_open()
        lines = answer.lines
        try:
            for line in lines:
                if stop is not None and stop.is_set():
                    return
                if self.couch.current is not server:
                    return  # moved back to a preferred server: follow it there
                if not line.strip():
                    continue
                try:
                    change = json.loads(line)
                except ValueError as exc:
                    raise Unreachable(f"feed from {server.base} broke: "
                                      f"{transports.short(exc)}") from exc
                if "last_seq" in change and "id" not in change:
                    raise Unreachable(f"{server.base} ended the feed")
                yield change
            raise Unreachable(f"{server.base} closed the feed")
        except Unreachable as exc:
            self.couch.move_on(server, exc)
            raise
        finally:
            close = getattr(lines, "close", None)
            if close is not None:
                close()  # the connection, at once: not when the generator is collected

    def follow_request(self, since: Seq, feed_filter: Optional[FeedFilter] = None,
                       timeout: float = 30.0, include_docs: bool = True) -> Prepared:
        """The request that opens :meth:`follow`'s continuous feed."""
        heartbeat_ms = max(100, int(timeout * 1000 / 3))
        query: dict[str, Any] = {
            "feed": "continuous", "since": since, "heartbeat": heartbeat_ms,
            "include_docs": include_docs,
        }
        body = None
        method = "GET"
        if feed_filter is not None:
            query.update(feed_filter.params)
            if feed_filter.selector is not None:
                method, body = "POST", json.dumps({"selector": feed_filter.selector}).encode()
        # identity: pouchdb-server gzips a continuous feed otherwise, which stalls it.
        headers = {"Accept-Encoding": "identity", "Content-Type": "application/json"}
        return Prepared(method, _target(f"{self.path}/_changes", query), body, headers)

    def client_handle(self) -> Any:
        """A CouchDB-Python ``couchdb.Database`` for this database.

        Programs get this as ``db``: HimbeereCouch programs used that API.
        """
        import couchdb  # imported here: only programs need it

        server = couchdb.Server(self.couch.current_url)
        return server[self.name]


class Prepared(NamedTuple):
    """One request as bytes: method, target (path and query, under the server's URL),
    body and headers (without the credentials, which the transport adds)."""

    method: str
    target: str
    body: Optional[bytes]
    headers: dict[str, str]


class FeedFilter:
    """How a ``_changes`` request is filtered: a selector or a JS filter."""

    def __init__(self, params: Optional[Mapping[str, Any]] = None,
                 selector: Optional[Doc] = None) -> None:
        self.params = dict(params or {})
        self.selector = selector
        if selector is not None:
            self.params["filter"] = "_selector"

    def __repr__(self) -> str:
        return f"<FeedFilter {self.params} {self.selector}>"


def split_servers(text: str) -> list[str]:
    """The URLs of a ``server`` setting, credentials inherited; not checked.

    See :func:`server_urls`.  A comma in a password stays in it: a piece
    without ``://`` whose host part holds an ``@`` belongs to the URL before.
    """
    urls: list[str] = []
    for piece in text.strip().split(","):
        if (urls and "://" not in piece and "@" in piece.split("/", 1)[0]
                and "@" not in urls[-1].split("://", 1)[-1]):
            urls[-1] += "," + piece
        else:
            urls.append(piece)
    urls = [url.strip() for url in urls]
    first = urllib.parse.urlsplit(urls[0])
    inherited = first.netloc.rpartition("@")[0] if "@" in first.netloc else ""
    for index, url in enumerate(urls[1:], 1):
        parts = urllib.parse.urlsplit(url)
        if inherited and "@" not in parts.netloc and parts.netloc:
            urls[index] = urllib.parse.urlunsplit(
                parts._replace(netloc=f"{inherited}@{parts.netloc}"))
    return urls


def server_urls(text: str) -> list[str]:
    """The URLs of a ``server`` setting: one URL, or several separated by commas.

    ``http://admin:pw@n1:5984,http://n2:5984,http://n3:5984`` lists the
    nodes of one cluster; a URL without credentials gets the first URL's.
    Raises :class:`ConfigError` naming the first entry that is not an
    ``http(s)://[user:password@]host[:port]`` URL.
    """
    urls = split_servers(text)
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        try:
            _ = parts.port  # raises ValueError for a bad port
            port_ok = True
        except ValueError:
            port_ok = False
        host = parts.hostname or ""
        if not (port_ok and parts.scheme in ("http", "https") and host and "," not in host):
            several = ", several separated by commas" if "," in text else ""
            raise ConfigError(f"server: {_redacted(url)!r} is not a URL; allowed: "
                              f"http(s)://[user:password@]host[:port]{several}")
    return urls


#: POST requests that only read, which another server may answer instead.
_READING_POSTS = ("_changes", "_all_docs", "_find", "_bulk_get", "_explain", "_session")


def _may_resend(method: str, path: str, error: Unreachable) -> bool:
    """Whether a request that failed on one server may go to the next.

    GET, PUT and DELETE may: a PUT or DELETE that did reach the dead node
    comes back as a 409 from the next, which the callers handle like any
    lost race.  A POST that creates a document must not be sent twice, so
    only reading POSTs go again, and any request that never left (no
    connection was made).
    """
    if method != "POST" or not error.sent:
        return True
    return path.rsplit("/", 1)[-1] in _READING_POSTS


def _all_failed(errors: list[Unreachable]) -> Unreachable:
    if len(errors) == 1:
        return errors[0]
    error = Unreachable("no server answered: " + "; ".join(str(e) for e in errors))
    error.sent = any(e.sent for e in errors)
    return error


def _redacted(url: str) -> str:
    """``url`` with its password as ``***``, for errors."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _target(path: str, params: Optional[Mapping[str, Any]]) -> str:
    """``path`` with its query string.

    CouchDB wants JSON for keys and booleans in query strings.
    """
    if not params:
        return path
    encoded = {}
    for key, value in params.items():
        if isinstance(value, bool) or key in ("key", "startkey", "endkey", "keys"):
            encoded[key] = json.dumps(value)
        else:
            encoded[key] = str(value)
    return f"{path}?{urllib.parse.urlencode(encoded)}"


def _error(method: str, path: str, answer: transports.Answer) -> CouchError:
    try:
        body = json.loads(answer.body)
        reason = f"{body.get('error')}: {body.get('reason')}"
    except (ValueError, AttributeError):
        reason = answer.body.decode("utf-8", "replace")[:200]
    text = f"{method} /{path}: {answer.status} {reason}"
    status = answer.status
    kind = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict}.get(
        status, CouchError)
    error = kind(text)
    error.status = status
    return error

"""All CouchDB access: the only module that builds a URL.

Everything else talks to :class:`Couch` (a server) and :class:`Database`.
The bytes travel through :mod:`himbeere.transport` (``http.client`` on the
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

import copy
import email.utils
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, Union

from . import transport as transports
from .exceptions import Conflict, CouchError, NotFound, Unauthorized, Unreachable

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


class Couch:
    """A CouchDB-compatible server at ``url`` (credentials in the URL).

    ``transport`` is ``"stdlib"`` (``http.client``, light enough for the
    daemon) or ``"requests"`` (proxies and certifi, for the laptop tools).
    """

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT,
                 transport: str = "stdlib") -> None:
        parts = urllib.parse.urlsplit(url)
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
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
        self.url = url
        self.timeout = timeout
        self.http = transports.make(transport, self.base, self.auth)
        self._info: Optional[Doc] = None
        #: (round trip, offset) of the last answers with a ``Date`` header.
        self._offsets: list[tuple[float, float]] = []

    def __repr__(self) -> str:
        user = f"{self.auth[0]}@" if self.auth else ""
        return f"<Couch {user}{self.base}>"

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
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        sent = time.time()
        answer = self.http.send(method, _target(path, params), data, headers,
                                timeout or self.timeout)
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
        """The same server, with other credentials (a node's, to check them)."""
        parts = urllib.parse.urlsplit(self.base)
        netloc = f"{quote(name)}:{quote(password)}@{parts.netloc}"
        return Couch(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), self.timeout,
                     self.http.name)

    def session_info(self) -> Doc:
        """``GET /_session``: who the server thinks we are."""
        return self.request("GET", "_session")

    def all_dbs(self) -> list[str]:
        return self.request("GET", "_all_dbs")

    def database(self, name: str) -> Database:
        return Database(self, name)

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

    def all_docs(self, **params: Any) -> list[Doc]:
        answer = self._request("GET", "_all_docs", params=params)
        return answer["rows"]

    def security(self) -> Doc:
        return self._request("GET", "_security") or {}

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
        headers = {"Accept-Encoding": "identity", "Content-Type": "application/json"}
        path = f"{self.path}/_changes"
        answer = self.couch.http.stream(method, _target(path, query), body, headers, timeout)
        if answer.status >= 400:
            raise _error(method, path, answer)
        if on_open is not None:
            on_open()
        lines = answer.lines
        try:
            for line in lines:
                if stop is not None and stop.is_set():
                    return
                if not line.strip():
                    continue
                try:
                    change = json.loads(line)
                except ValueError as exc:
                    raise Unreachable(f"feed from {self.couch.base} broke: "
                                      f"{transports.short(exc)}") from exc
                if "last_seq" in change and "id" not in change:
                    raise Unreachable("the server ended the feed")
                yield change
        finally:
            close = getattr(lines, "close", None)
            if close is not None:
                close()  # the connection, at once: not when the generator is collected
        raise Unreachable("the server closed the feed")

    def client_handle(self) -> Any:
        """A CouchDB-Python ``couchdb.Database`` for this database.

        Programs get this as ``db``: HimbeereCouch programs used that API.
        """
        import couchdb  # imported here: only programs need it

        server = couchdb.Server(self.couch.url)
        return server[self.name]


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

"""HTTP for :mod:`himbeere.couch`: the standard library's, or requests'.

:mod:`himbeere.couch` builds every CouchDB URL and decodes every answer; a
transport only moves bytes.  There are two, with one interface:

:class:`StdlibTransport` (the default, used on the Pi)
    ``http.client`` with one keep-alive connection per thread.  The daemon
    runs on Pis with 512 MB to 1 GB of RAM next to the user's programs, and
    ``import requests`` alone costs about 17 MB of RSS (urllib3,
    charset_normalizer, idna and certifi; measured in
    ``benchmarks/bench_daemon.py``), more than half of the daemon's budget.
:class:`RequestsTransport` (the laptop tools: uploader, CLI, dashboard)
    ``requests``, which honours ``HTTPS_PROXY``/``NO_PROXY`` and brings
    certifi's CA bundle, for laptops whose Python has no CA store (the
    python.org builds on macOS).

Both raise :class:`~himbeere.exceptions.Unreachable` when the server cannot
be reached or a connection breaks, and nothing else for transport errors.

TLS only when used: ``http.client`` imports ``ssl`` when it is imported,
just to define ``HTTPSConnection``, and ``ssl`` maps OpenSSL's libssl and
libcrypto: 4 MB of RSS.  A node that talks plain ``http://`` to a CouchDB on
its LAN never needs them, so the daemon calls :func:`load_http_client` with
``tls=False`` first, and :class:`StdlibTransport` wraps its sockets itself
with an ``ssl`` context made when an ``https://`` URL comes up.
"""

from __future__ import annotations

import base64
import re
import select
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

from ..exceptions import Unreachable

if TYPE_CHECKING:
    import http.client

#: Seconds to wait for a connection to open.
CONNECT_TIMEOUT = 5.0


class Answer:
    """One HTTP answer: status, ``Date`` header and (unless streamed) body."""

    def __init__(self, status: int, date: Optional[str], body: bytes = b"",
                 lines: Optional[Iterator[bytes]] = None) -> None:
        self.status = status
        self.date = date
        self.body = body
        #: The body line by line, for a streamed answer.
        self.lines: Iterator[bytes] = lines if lines is not None else iter(())


class StdlibTransport:
    """``http.client``: one keep-alive connection per thread, no extra imports."""

    name = "stdlib"

    def __init__(self, base: str, auth: Optional[tuple[str, str]]) -> None:
        parts = urllib.parse.urlsplit(base)
        import http.client  # here, after the daemon's load_http_client()

        self.client = http.client
        self.tls: Any = None  # an ssl.SSLContext for https://
        if parts.scheme == "https":
            import ssl

            self.tls = ssl.create_default_context()
            self.tls.set_alpn_protocols(["http/1.1"])
        self.host = parts.hostname or ""
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.base = base
        self.headers = {"Accept": "application/json"}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self.headers["Authorization"] = f"Basic {token}"
        self._local = threading.local()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        port = self.port or (443 if self.tls is not None else 80)
        return self.client.HTTPConnection(self.host, port, timeout=timeout)

    def _open(self, method: str, target: str, body: Optional[bytes],
              headers: Mapping[str, str], timeout: float,
              conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """Send the request on ``conn`` and read the answer's head."""
        conn.timeout = CONNECT_TIMEOUT
        if conn.sock is None:
            conn.connect()
            if self.tls is not None:  # what HTTPSConnection.connect() does
                conn.sock = self.tls.wrap_socket(conn.sock, server_hostname=self.host)
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.request(method, f"{self.prefix}/{target}", body=body,
                     headers={**self.headers, **headers})
        return conn.getresponse()

    def send(self, method: str, target: str, body: Optional[bytes],
             headers: Mapping[str, str], timeout: float) -> Answer:
        """Send one request and read the whole answer."""
        conn: Optional[http.client.HTTPConnection] = getattr(self._local, "conn", None)
        reused = conn is not None and _still_open(conn)
        if conn is None or not reused:
            if conn is not None:
                conn.close()
            conn = self._local.conn = self._connect(timeout)
        try:
            try:
                response = self._open(method, target, body, headers, timeout, conn)
            except (self.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed the idle keep-alive connection just as we
                # sent: nothing reached it, so sending once more is safe.
                # A POST is not retried: it may create a second document.
                if not reused or method == "POST":
                    raise
                conn.close()
                response = self._open(method, target, body, headers, timeout, conn)
            data = response.read()
        except socket.timeout as exc:
            connected = conn.sock is not None
            conn.close()
            if not connected:
                raise _unsent(f"cannot reach {self.base}: no connection within "
                              f"{CONNECT_TIMEOUT:g} s") from exc
            raise Unreachable(f"{self.base} did not answer within {timeout:g} s") from exc
        except (OSError, self.client.HTTPException) as exc:
            connected = conn.sock is not None
            conn.close()
            if not connected:
                raise _unsent(f"cannot reach {self.base}: {short(exc)}") from exc
            raise Unreachable(f"cannot reach {self.base}: {short(exc)}") from exc
        if response.will_close:
            conn.close()
        return Answer(response.status, response.getheader("Date"), data)

    def stream(self, method: str, target: str, body: Optional[bytes],
               headers: Mapping[str, str], timeout: float) -> Answer:
        """Send a request on a connection of its own; the body comes as lines.

        A line that does not arrive within ``timeout`` seconds raises
        :class:`Unreachable`; so does a broken connection.
        """
        conn = self._connect(timeout)
        try:
            response = self._open(method, target, body, headers, timeout, conn)
        except (OSError, self.client.HTTPException) as exc:
            conn.close()
            raise Unreachable(f"cannot reach {self.base}: {short(exc)}") from exc
        if response.status >= 400:
            try:
                data = response.read()
            except (OSError, self.client.HTTPException):
                data = b""
            conn.close()
            return Answer(response.status, response.getheader("Date"), data)
        return Answer(response.status, response.getheader("Date"),
                      lines=self._lines(conn, response, timeout))

    def _lines(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
               timeout: float) -> Iterator[bytes]:
        try:
            while True:
                line = response.readline()
                if not line:
                    return
                yield line
        except socket.timeout as exc:  # TimeoutError since Python 3.10
            raise Unreachable(f"feed from {self.base}: silent for {timeout:g} s, "
                              "no heartbeat") from exc
        except (OSError, self.client.HTTPException) as exc:
            raise Unreachable(f"feed from {self.base} broke: {short(exc)}") from exc
        finally:
            conn.close()


class RequestsTransport:
    """``requests``: proxies from the environment and certifi's CA bundle."""

    name = "requests"

    def __init__(self, base: str, auth: Optional[tuple[str, str]]) -> None:
        import requests  # here: the daemon never pays for importing it

        self.requests = requests
        self.base = base
        self.auth = auth
        self._local = threading.local()

    @property
    def session(self) -> Any:
        """One ``requests.Session`` per thread: sessions are not thread-safe."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self.requests.Session()
            session.auth = self.auth
            session.headers["Accept"] = "application/json"
            self._local.session = session
        return session

    def _open(self, method: str, target: str, body: Optional[bytes],
              headers: Mapping[str, str], timeout: float, stream: bool) -> Any:
        try:
            return self.session.request(
                method, f"{self.base}/{target}", data=body, headers=dict(headers),
                timeout=(CONNECT_TIMEOUT, timeout), stream=stream)
        except self.requests.RequestException as exc:
            reason = getattr(exc.args[0], "reason", None) if exc.args else None
            if isinstance(exc, self.requests.ConnectTimeout) or type(reason).__name__ in (
                    "NewConnectionError", "ConnectTimeoutError"):
                raise _unsent(f"cannot reach {self.base}: {short(exc)}") from exc
            raise Unreachable(f"cannot reach {self.base}: {short(exc)}") from exc

    def send(self, method: str, target: str, body: Optional[bytes],
             headers: Mapping[str, str], timeout: float) -> Answer:
        response = self._open(method, target, body, headers, timeout, stream=False)
        return Answer(response.status_code, response.headers.get("Date"), response.content)

    def stream(self, method: str, target: str, body: Optional[bytes],
               headers: Mapping[str, str], timeout: float) -> Answer:
        response = self._open(method, target, body, headers, timeout, stream=True)
        if response.status_code >= 400:
            with response:
                return Answer(response.status_code, response.headers.get("Date"),
                              response.content)
        return Answer(response.status_code, response.headers.get("Date"),
                      lines=self._lines(response))

    def _lines(self, response: Any) -> Iterator[bytes]:
        with response:
            try:
                # iter_lines splits on the newlines and drops them; put them
                # back so both transports yield the same lines.
                for line in response.iter_lines(chunk_size=1 << 16):
                    yield line + b"\n"
            except self.requests.RequestException as exc:
                raise Unreachable(f"feed from {self.base} broke: {short(exc)}") from exc


Transport = Any  # StdlibTransport or RequestsTransport: send() and stream()

TRANSPORTS = {"stdlib": StdlibTransport, "requests": RequestsTransport}


def make(name: str, base: str, auth: Optional[tuple[str, str]]) -> Transport:
    """The transport called ``name`` (``stdlib`` or ``requests``) for ``base``."""
    try:
        kind = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown HTTP transport {name!r}: use one of "
                         f"{', '.join(sorted(TRANSPORTS))}") from None
    return kind(base, auth)


def load_http_client(tls: bool = True) -> None:
    """Import ``http.client``; with ``tls=False``, without loading OpenSSL.

    For the daemon, before its first request, when its server is
    ``http://``: the module then has no ``HTTPSConnection``, which nothing in
    the daemon uses (:class:`StdlibTransport` makes TLS connections itself,
    should the server become ``https://`` on a reload).  Programs run in
    other processes and get the whole module.  Does nothing once
    ``http.client`` or ``ssl`` is loaded.
    """
    if tls or "http.client" in sys.modules or "ssl" in sys.modules:
        import http.client  # noqa: F401
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl raises ImportError
    try:
        import http.client  # noqa: F401,F811
    finally:
        del sys.modules["ssl"]


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """False when the server closed this idle keep-alive connection.

    An idle connection has nothing to read: if its socket is readable the
    server sent EOF (or garbage), and a request on it would fail.  urllib3
    checks the same way before it reuses a pooled connection.
    """
    sock: Optional[socket.socket] = conn.sock
    if sock is None:
        return False
    try:
        poller = select.poll()  # not select(): safe for fd >= 1024
        poller.register(sock, select.POLLIN)
        readable = poller.poll(0)
    except (OSError, ValueError):
        return False
    return not readable


def _unsent(message: str) -> Unreachable:
    """An :class:`Unreachable` for a request that never left: no connection."""
    error = Unreachable(message)
    error.sent = False
    return error


#: OpenSSL's reason in an ssl.SSLError, also inside the text of requests' wrapper.
_TLS_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\] ([^(')\"]+)")
#: What OpenSSL says when an https:// client gets a plain HTTP answer (3.2 and later:
#: record layer failure).
_PLAIN_HTTP = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST")
LIMIT = 200


def short(exc: BaseException) -> str:
    """The first line of an error, at most :data:`LIMIT` characters, cut between words.

    A TLS error says what it means: requests' wrapping of an https:// URL
    that reached a plain HTTP server was 300 characters long and was cut
    off in the middle of OpenSSL's reason.
    """
    text = str(exc) or type(exc).__name__
    tls = _TLS_REASON.search(text)
    if tls:
        code, reason = tls.group(1), tls.group(2).strip()
        if code in _PLAIN_HTTP:
            return (f"TLS failed ({reason}): the server speaks plain HTTP there; "
                    "use http:// instead of https://")
        return f"TLS failed: {reason}"
    first = text.splitlines()[0]
    if len(first) <= LIMIT:
        return first
    return first[:LIMIT].rsplit(" ", 1)[0] + " ..."

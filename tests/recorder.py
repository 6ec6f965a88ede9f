"""A plain HTTP proxy on loopback that records every request passing through.

The simulator test puts one in front of a real daemon and another in front
of a simulated node, and compares what each sent: request lines and bodies.
Requests are parsed (head, then ``Content-Length`` bytes of body) and
forwarded as they came; answers are piped back untouched, so a continuous
``_changes`` feed streams through as it would without the proxy.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Recorded:
    """One request: method, path (no query), query parameters and JSON body."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: ``time.monotonic()`` when the proxy had read the request.
    at: float = field(default_factory=time.monotonic)


class RecordingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port`` and keeps every request."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def taken(self) -> list[Recorded]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=_pipe, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                request = _read_request(reader)
                if request is None:
                    break
                raw, recorded = request
                with self._lock:
                    self.requests.append(recorded)
                server.sendall(raw)
        except OSError:
            pass
        finally:
            _shut(server)


def _read_request(reader: Any) -> Optional[tuple[bytes, Recorded]]:
    line = reader.readline()
    if not line:
        return None
    raw = [line]
    headers: dict[str, str] = {}
    while True:
        header = reader.readline()
        raw.append(header)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0") or 0))
    method, target, _ = line.decode("latin-1").split(" ", 2)
    parts = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(parts.query))
    decoded = json.loads(body) if body else None
    recorded = Recorded(method, urllib.parse.unquote(parts.path), query, decoded, headers)
    return b"".join(raw) + body, recorded


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass

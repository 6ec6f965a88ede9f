"""A WAN link on loopback that a test can cut and restore.

The edge-site tests put one between a site (its relay and its nodes) and
the central server.  :meth:`WanLink.cut` resets every connection through it
and refuses new ones, the way a router that lost its uplink answers;
:meth:`WanLink.restore` lets connections through again.  Bytes are piped
untouched both ways, so continuous feeds and replications stream through
as they would without it.
"""

from __future__ import annotations

import socket
import struct
import threading
import urllib.parse


class WanLink:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` while up."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = True
        self.cuts = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (with its credentials) with host and port swapped for this link's."""
        parts = urllib.parse.urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        """Reset every connection through the link; refuse new ones until restored."""
        with self._lock:
            self.up = False
            self.cuts += 1
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        with self._lock:
            self.up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self.up
            if not up:
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with self._lock:
                self._open.discard(source)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a link that went away does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()

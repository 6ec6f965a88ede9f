"""A TLS front for the test server, with a self-signed certificate.

pouchdb-server speaks plain HTTP only; :class:`TLSProxy` listens on
loopback, does the TLS handshake and copies bytes to and from the server,
which is how a CouchDB behind nginx or haproxy looks to a node.  Clients
trust the certificate through ``SSL_CERT_FILE`` (the standard library) or
``REQUESTS_CA_BUNDLE`` (requests).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key: (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "himbeere test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = workdir / "cert.pem", workdir / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class TLSProxy:
    """``https://127.0.0.1:<port>`` in front of a plain HTTP server."""

    def __init__(self, upstream: tuple[str, int], workdir: Path) -> None:
        self.upstream = upstream
        self.cert_file, key_file = self_signed(workdir)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert_file, key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="tls-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()  # a client that gave up, or refused our certificate
            return
        with self._lock:
            if self._closed:
                tls.close()
                server.close()
                return
            self._sockets += [tls, server]
        threading.Thread(target=_pump, args=(server, tls), daemon=True).start()
        _pump(tls, server)

    def url(self, plain_url: str) -> str:
        """``plain_url`` (credentials kept) through this proxy, as https."""
        parts = urllib.parse.urlsplit(plain_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(scheme="https", netloc=netloc))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for sock in [self.listener, *sockets]:
            # shutdown() first: close() alone neither wakes a thread blocked in
            # recv() or accept() on it nor sends the client a FIN, so a daemon
            # in the middle of a request would wait out its 30 s timeout.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Copy until either side closes; then close both."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

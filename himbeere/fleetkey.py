"""The fleet key: a secret shared by the laptop and the nodes, for pairing.

From it come two independent 256-bit keys (HKDF-SHA256): one signs pairing
requests (HMAC-SHA256), one encrypts the password in a node's reply
(AES-256-GCM).  The ciphertext is bound to the request's nonce and the
node's MAC id as associated data, so a captured reply is of no use for any
other request.  All primitives come from :mod:`hmac` and :mod:`cryptography`,
imported by the functions that use them: a node without a fleet key never
loads them (with hashlib and OpenSSL's digests, about 7 MB of its RAM).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path
from typing import Union

from .exceptions import ConfigError, HimbeereError

log = logging.getLogger(__name__)

#: Names the scheme; part of everything signed or encrypted.
PROTOCOL = "himbeere-pair-v1"
MIN_KEY_BYTES = 16


def read_fleet_key(path: Union[str, os.PathLike[str]]) -> bytes:
    """The fleet key in ``path`` (surrounding white space removed)."""
    try:
        mode = os.stat(path).st_mode
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"fleet_key_file: {str(path)!r}: {exc.strerror or exc}") from None
    if mode & 0o077:
        log.warning("fleet key file %s is readable by other users; chmod 600 it", path)
    return as_key(key, f"fleet key in {path}")


def as_key(key: Union[str, bytes], what: str = "fleet key") -> bytes:
    """``key`` as bytes, refused if too short to be a secret."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{what}: {len(raw)} bytes is too short, at least {MIN_KEY_BYTES} are needed; make "
            "one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return raw


def _subkey(key: bytes, purpose: str) -> bytes:
    """An independent 256-bit key for ``purpose``, derived from the fleet key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=PROTOCOL.encode(),
                info=purpose.encode())
    return hkdf.derive(key)


def sign(key: bytes, server: str, ts: int, nonce: str, extra: str = "") -> str:
    """The HMAC-SHA256 of a request, as hex; ``extra``: more of it to cover (keys)."""
    import hashlib
    import hmac

    message = f"{PROTOCOL}\n{ts}\n{nonce}\n{server}".encode()
    if extra:  # empty: the message of a request without it, as before
        message += f"\n{extra}".encode()
    return hmac.new(_subkey(key, "request hmac"), message, hashlib.sha256).hexdigest()


def verify(key: bytes, mac: str, server: str, ts: int, nonce: str, extra: str = "") -> bool:
    """Whether ``mac`` is the request's HMAC (compared in constant time)."""
    import hmac

    # Bytes: compare_digest refuses str with characters beyond ASCII.
    return hmac.compare_digest(mac.encode("utf-8", "surrogatepass"),
                               sign(key, server, ts, nonce, extra).encode())


def _associated_data(nonce: str, macid: int) -> bytes:
    return f"{PROTOCOL}\n{nonce}\n{macid}".encode()


def encrypt_password(key: bytes, password: str, nonce: str, macid: int) -> str:
    """``password`` encrypted for the laptop that sent request ``nonce``."""
    import secrets

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    iv = secrets.token_bytes(12)
    sealed = AESGCM(_subkey(key, "password aes-gcm")).encrypt(
        iv, password.encode(), _associated_data(nonce, macid))
    return base64.b64encode(iv + sealed).decode("ascii")


def decrypt_password(key: bytes, token: str, nonce: str, macid: int) -> str:
    """The password in ``token``; :class:`HimbeereError` if the key or data is wrong."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.b64decode(token, validate=True)
        plain = AESGCM(_subkey(key, "password aes-gcm")).decrypt(
            raw[:12], raw[12:], _associated_data(nonce, macid))
        return plain.decode("utf-8")
    except (InvalidTag, ValueError, binascii.Error):
        raise HimbeereError(
            "the password does not decrypt: the node has another fleet key, "
            "or the reply was not made for this request"
        ) from None

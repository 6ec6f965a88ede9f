"""A deployer's signing key: ``keygen``, finding the key, and ``sign``.

``himbeere-upload keygen`` writes an Ed25519 private key (PEM, mode 0600)
and, beside it, ``<file>.pub``: the raw 32-byte public key in base64, which
is what a node's ``trusted_keys`` takes (the line itself, or the file's
path).  The key is found, in this order, by ``--signing-key FILE``,
``HIMBEERE_SIGNING_KEY`` or :data:`DEFAULT_KEY` if that file exists; with
one, ``push``, ``himbeere cmd`` and the dashboard's command form sign what
they write (:func:`sign`, always the last step: after release numbers).
What is signed, and how a node checks it: :mod:`himbeere.signing`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from himbeere import schema, signing
from himbeere.exceptions import ConfigError

#: Where the key is looked for when neither the flag nor the variable names one.
DEFAULT_KEY = "~/.config/himbeere/signing.key"
ENV = "HIMBEERE_SIGNING_KEY"
PUB_SUFFIX = ".pub"


class SigningKey:
    """A loaded private key and its public key's id."""

    def __init__(self, private: Any, path: str) -> None:
        self.private = private
        self.path = path
        self.public = public_bytes(private)
        self.key_id = signing.key_id(self.public)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode("ascii")


def public_bytes(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw))


def keygen(out: Optional[str] = None, force: bool = False) -> dict[str, str]:
    """Write a new key to ``out`` (default :data:`DEFAULT_KEY`) and ``out.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(os.path.expanduser(out or DEFAULT_KEY))
    pub = Path(str(path) + PUB_SUFFIX)
    for target in (path, pub):
        if target.exists() and not force:
            raise ConfigError(f"{target} exists; use --force to overwrite it (a node trusting "
                              "the old key then refuses what the new one signs)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, pem, 0o600)
    key = SigningKey(private, str(path))
    _write(pub, f"{key.public_b64}\n".encode(), 0o644)
    return {"key": str(path), "public": str(pub), "key_id": key.key_id,
            "trusted_keys": key.public_b64}


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: str) -> SigningKey:
    """The private key in ``path``; a clear error if it is missing or not Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    expanded = os.path.expanduser(path)
    try:
        data = Path(expanded).read_bytes()
    except OSError as exc:
        raise ConfigError(f"signing key {path!r}: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography's text points at its FAQ; the first sentence is what matters.
        why = str(exc).split(". ")[0]
        raise ConfigError(f"signing key {path!r} is not a PEM private key without a "
                          f"password ({why}); make one with `himbeere-upload keygen`") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path!r} is not an Ed25519 key; make one with "
                          "himbeere-upload keygen")
    return SigningKey(private, expanded)


def find(given: Optional[str], environ: Mapping[str, str]) -> Optional[SigningKey]:
    """The deployer's key: ``given`` (--signing-key), ``HIMBEERE_SIGNING_KEY``, the default."""
    path = given or environ.get(ENV)
    if path:
        return load(path)
    default = os.path.expanduser(DEFAULT_KEY)
    return load(default) if os.path.exists(default) else None


def sign(doc: dict[str, Any], key: SigningKey, now: Optional[float] = None) -> dict[str, Any]:
    """Set ``doc["signature"]`` over its signed fields (call it after every other field)."""
    signed_at = schema.iso(now)
    sig = key.private.sign(signing.payload(doc, signed_at))
    doc[signing.SIGNATURE] = {"key": key.key_id, "sig": base64.b64encode(sig).decode("ascii"),
                              "signed_at": signed_at}
    return doc

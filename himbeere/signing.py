"""Signed code and commands: what a node checks before it runs anything.

A deployer signs each document it writes with an Ed25519 key
(``himbeere-upload keygen``, :mod:`uploader.keys`).  The document carries::

    "signature": {"key": "<key id>", "sig": "<base64>", "signed_at": "<schema.iso()>"}

The signed bytes are the canonical JSON (:func:`payload`) of the fields in
:data:`SIGNED_FIELDS` that the document has, plus ``signed_at``: everything
that decides what runs and where.  ``enabled``, ``restart`` and
``restart_count`` are not signed: whoever may write the database may stop or
restart a program, never change what it runs.

A node with ``require_signed`` runs a code document or a command only with a
valid signature of a key in its ``trusted_keys`` (its config, and
``<state_dir>/trusted_keys``, written at pairing: the node's own disk, never
CouchDB), and never a ``release`` lower than the highest it ran for that
document id (``<state_dir>/releases.json``), except the ``previous_release``
that the signed document it ran last names (a rollout's fallback).

``cryptography`` is imported only when a signature is checked: a node that
requires no signatures never loads it (several MB of a Pi's RAM).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .exceptions import ConfigError

log = logging.getLogger(__name__)

#: Every field that decides what runs, and where; moving a signed document to
#: another node, program or release invalidates its signature.
SIGNED_FIELDS = ("_id", "type", "targets", "name", "code", "modules", "global_modules", "git",
                 "cmd", "timeout", "release", "previous_release", "rollout", "labels",
                 "replicas", "requires")
#: Signed as well in a daemon release (``type`` :data:`~himbeere.schema.DAEMON_RELEASE_TYPE`):
#: its version and the SHA-256 of its wheel.  Only there: a program document
#: signed before may carry fields of these names, and its signature must hold.
DAEMON_SIGNED_FIELDS = ("version", "sha256")
SIGNATURE = "signature"
#: File in the state directory with the keys handed over at pairing, one a line.
KEYS_FILE = "trusted_keys"
#: File in the state directory with the highest release this node ran per document.
RELEASES_FILE = "releases.json"
#: File in the state directory with the signed commands this node took on.
COMMANDS_FILE = "signed_commands.json"
#: A signed command older than this many days is refused: the node forgets,
#: after as long, which commands it ran (so that the file stays small).
COMMAND_MAX_AGE_DAYS = 30
#: Bytes of an Ed25519 public key.
PUBLIC_KEY_BYTES = 32
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# -- what is signed --------------------------------------------------------------------
def _normal(value: Any) -> Any:
    """``value`` with whole floats as ints: a JavaScript server keeps 30.0 as 30."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def payload(doc: Mapping[str, Any], signed_at: str) -> bytes:
    """The bytes a signature of ``doc`` covers (canonical JSON, UTF-8)."""
    from .schema import DAEMON_RELEASE_TYPE

    names: tuple[str, ...] = SIGNED_FIELDS
    if doc.get("type") == DAEMON_RELEASE_TYPE:
        names += DAEMON_SIGNED_FIELDS
    fields = {field: doc[field] for field in names if field in doc}
    fields["signed_at"] = signed_at
    return json.dumps(_normal(fields), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def key_id(public_bytes: bytes) -> str:
    """The short id of a public key: the first 16 hex digits of its SHA-256."""
    import hashlib  # here: a node that checks nothing never needs it

    return hashlib.sha256(bytes(public_bytes)).hexdigest()[:16]


# -- trusted keys ------------------------------------------------------------------------
def parse_key(entry: str) -> bytes:
    """One ``trusted_keys`` entry: a base64 raw public key, or the path of a ``.pub`` file."""
    text = entry.strip()
    raw = _b64_key(text)
    if raw is not None:
        return raw
    try:
        content = Path(text).read_text(encoding="utf-8").split()
    except OSError as exc:
        raise ConfigError(f"trusted_keys: {text!r} is neither a base64 public key (32 bytes) "
                          f"nor a readable .pub file: {exc.strerror or exc}") from None
    raw = _b64_key(content[0]) if content else None
    if raw is None:
        raise ConfigError(f"trusted_keys: {text!r} holds no base64 public key (32 bytes); "
                          "allowed: a .pub file written by himbeere-upload keygen")
    return raw


def _b64_key(text: str) -> Optional[bytes]:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == PUBLIC_KEY_BYTES else None


def parse_trusted(value: Optional[str]) -> dict[str, bytes]:
    """``trusted_keys`` (entries separated by commas or white space) by key id."""
    keys: dict[str, bytes] = {}
    for entry in re.split(r"[,\s]+", value or ""):
        if entry:
            raw = parse_key(entry)
            keys[key_id(raw)] = raw
    return keys


def read_keys_file(state_dir: Path) -> dict[str, bytes]:
    """The keys pairing wrote into ``<state_dir>/trusted_keys`` (none if no file)."""
    try:
        text = (state_dir / KEYS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"trusted_keys: cannot read {state_dir / KEYS_FILE}: "
                          f"{exc.strerror or exc}") from None
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    return parse_trusted(" ".join(lines))


def add_keys(state_dir: Path, keys: list[str]) -> list[str]:
    """Add base64 public ``keys`` to ``<state_dir>/trusted_keys``; return the new key ids.

    Written atomically, mode 0600; a key already there is kept once.
    """
    raws = [parse_key(key) for key in keys if _b64_key(key.strip()) is not None]
    known = read_keys_file(state_dir)
    added = [raw for raw in raws if key_id(raw) not in known]
    if not added:
        return []
    path = state_dir / KEYS_FILE
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    lines = [old.rstrip("\n")] if old.strip() else []
    lines += [f"{base64.b64encode(raw).decode()}  # {key_id(raw)}" for raw in added]
    _write_atomically(path, "\n".join(lines) + "\n")
    return [key_id(raw) for raw in added]


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -- checking --------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _public_key(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def verify(doc: Mapping[str, Any], trusted: Mapping[str, bytes]) -> Optional[str]:
    """None if ``doc`` carries a valid signature of a ``trusted`` key; else why not."""
    signature = doc.get(SIGNATURE)
    if not isinstance(signature, dict) or not signature:
        return "no signature"
    key, sig, signed_at = (signature.get("key"), signature.get("sig"),
                           signature.get("signed_at"))
    if not isinstance(key, str) or not isinstance(sig, str) or not isinstance(signed_at, str):
        return "signature: needs key, sig and signed_at (strings)"
    if key not in trusted:
        return f"signed by unknown key {key[:32]}"
    from cryptography.exceptions import InvalidSignature

    try:
        _public_key(trusted[key]).verify(base64.b64decode(sig, validate=True),
                                         payload(doc, signed_at))
    except (InvalidSignature, binascii.Error, ValueError):
        return "signature does not match the document (edited?)"
    return None


def pinned_commit(git: Any) -> Optional[str]:
    """The commit a signed ``git`` field pins (``commit``, or a ``ref`` that is one)."""
    if not isinstance(git, dict):
        return None
    for value in (git.get("commit"), git.get("ref")):
        if isinstance(value, str) and _COMMIT.match(value):
            return value
    return None


class Releases:
    """The highest ``release`` this node ran per document id, kept on its disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ran: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self.ran = {str(k): v for k, v in loaded.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            # Refusing everything would be safer still, but would stop the node
            # for good; a damaged file is loud in the log instead.
            log.error("cannot read %s (%s); downgrades are not detected until it is rewritten",
                      path, exc)

    def refusal(self, doc: Mapping[str, Any]) -> Optional[str]:
        """Why ``doc`` is a downgrade, or None."""
        seen = self.ran.get(str(doc.get("_id")))
        if seen is None:
            return None
        release, highest = _release(doc), seen.get("release", 0)
        if release >= highest or release == seen.get("previous"):
            return None
        allowed = seen.get("previous")
        also = f" (or its signed previous_release {allowed})" if allowed is not None else ""
        return (f"release {release} is older than release {highest}, which this node ran "
                f"already{also}: a downgrade")

    def record(self, doc: Mapping[str, Any]) -> None:
        """``doc`` runs now: remember its release, if it is the highest."""
        doc_id, release = str(doc.get("_id")), _release(doc)
        seen = self.ran.get(doc_id)
        if seen is not None and release < seen.get("release", 0):
            return  # a signed fallback runs; the newer release still counts
        previous = doc.get("previous_release")
        entry = {"release": release,
                 "previous": previous if isinstance(previous, int) else None}
        if seen == entry:
            return
        self.ran[doc_id] = entry
        try:
            _write_atomically(self.path, json.dumps(self.ran, sort_keys=True))
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)


def _release(doc: Mapping[str, Any]) -> int:
    value = doc.get("release")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class TakenCommands:
    """The signed commands this node took on, so that none runs twice (a replay).

    Deleting a result, or the result fields of a ``<macid>_cmd`` document,
    would otherwise make the node run a signed command again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self.taken: dict[str, str] = dict(loaded) if isinstance(loaded, dict) else {}
        except FileNotFoundError:
            self.taken = {}
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s); starting it afresh", path, exc)
            self.taken = {}

    def take(self, key: str, signed_at: str, now: float) -> Optional[str]:
        """Record command ``key`` (journal key) as taken on; or why it must not run."""
        from .schema import parse_iso

        oldest = now - COMMAND_MAX_AGE_DAYS * 86400
        try:
            signed = parse_iso(signed_at)
        except ValueError:
            return f"signature: signed_at {signed_at[:40]!r} is not a time"
        if signed < oldest:
            return f"signed more than {COMMAND_MAX_AGE_DAYS} days ago ({signed_at})"
        if key in self.taken:
            return "this signed command was taken on here before (a replay?)"
        kept = {k: v for k, v in self.taken.items() if _parse_or_zero(v) >= oldest}
        kept[key] = signed_at
        _write_atomically(self.path, json.dumps(kept, sort_keys=True))
        self.taken = kept
        return None


def _parse_or_zero(text: str) -> float:
    from .schema import parse_iso

    try:
        return parse_iso(text)
    except (TypeError, ValueError):
        return 0.0


class Policy:
    """What a node with ``require_signed`` accepts: its trusted keys and its releases."""

    def __init__(self, trusted: Mapping[str, bytes], state_dir: Path) -> None:
        self.trusted = dict(trusted)
        self.releases = Releases(state_dir / RELEASES_FILE)
        self.commands = TakenCommands(state_dir / COMMANDS_FILE)

    def refusal(self, doc: Mapping[str, Any]) -> Optional[str]:
        """Why ``doc`` must not run here, or None."""
        reason = verify(doc, self.trusted) or self.releases.refusal(doc)
        if reason is None and "git" in doc and pinned_commit(doc.get("git")) is None:
            reason = ("git: names no commit (git.commit, or a commit as git.ref); a branch "
                      "or tag may move after it was signed")
        return reason

    def ran(self, doc: Mapping[str, Any]) -> None:
        self.releases.record(doc)


def policy(trusted_keys: Optional[str], require_signed: bool,
           state_dir: Path) -> Optional[Policy]:
    """The node's :class:`Policy`, or None when it requires no signatures."""
    if not require_signed:
        return None
    trusted = parse_trusted(trusted_keys)
    trusted.update(read_keys_file(state_dir))
    if not trusted:
        log.warning("require_signed is on and no trusted_keys are set: nothing will run "
                    "(pair the node, or set trusted_keys)")
    else:
        log.info("require_signed: trusting key(s) %s", ", ".join(sorted(trusted)))
    return Policy(trusted, state_dir)

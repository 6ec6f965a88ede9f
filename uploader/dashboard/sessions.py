"""Who is signed in: server-side sessions and CSRF tokens.

A user signs in with CouchDB credentials, checked against ``_session``.  The
password then stays in this process's memory, in a :class:`Login` keyed by a
random session id; the browser's cookie (Flask's session: signed, *not*
encrypted, so readable by its holder) carries only that id and the CSRF
token.  A stolen cookie is worthless once the user signs out or the
dashboard restarts, and the password never leaves the server.

Why not CouchDB's ``AuthSession`` cookie: it expires after ten idle minutes
unless every answer's refreshed cookie is carried back, and it would need a
second way of authenticating in :mod:`himbeere.couch`; basic auth with the
user's own name and password keeps every request simple and lets CouchDB
apply that user's rules.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from himbeere.couch import Couch, Doc
from himbeere.exceptions import Unauthorized

from ..fleet import Fleet

#: Seconds a session may sit unused before it is forgotten.
IDLE_TIMEOUT = 12 * 3600.0
#: Seconds a session lives at most, used or not.
MAX_AGE = 7 * 24 * 3600.0


@dataclass
class Login:
    """One signed-in user: their name and roles, and the fleet as they see it."""

    name: str
    fleet: Fleet
    roles: list[str]
    created: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the credentials (for sharing one live feed)."""
        assert self.fleet.couch.auth is not None
        return self.fleet.couch.auth


class SessionStore:
    """Session id -> :class:`Login`, in memory, with idle and absolute expiry."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, max_age: float = MAX_AGE) -> None:
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self._logins: dict[str, Login] = {}
        self._lock = threading.Lock()

    def add(self, login: Login) -> str:
        """Remember ``login``; returns its new random session id."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._purge(time.monotonic())
            self._logins[sid] = login
        return sid

    def get(self, sid: Optional[str]) -> Optional[Login]:
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            login = self._logins.get(sid)
            if login is None:
                return None
            if self._expired(login, now):
                del self._logins[sid]
                return None
            login.used = now
            return login

    def remove(self, sid: Optional[str]) -> None:
        with self._lock:
            self._logins.pop(sid or "", None)

    def __len__(self) -> int:
        return len(self._logins)

    def _expired(self, login: Login, now: float) -> bool:
        return now - login.used > self.idle_timeout or now - login.created > self.max_age

    def _purge(self, now: float) -> None:
        for sid in [s for s, login in self._logins.items() if self._expired(login, now)]:
            del self._logins[sid]


def sign_in(server: Couch, database: str, status_database: str, name: str,
            password: str) -> Login:
    """Check ``name``/``password`` with the server's ``_session``; a :class:`Login`.

    Raises :class:`Unauthorized` for wrong credentials (and for a server in
    "admin party", which takes any basic auth as anonymous).
    """
    if not name or not password:
        raise Unauthorized("give a name and a password")
    couch = server.as_user(name, password)
    answer: Doc = couch.session_info() or {}
    context = answer.get("userCtx") or {}
    if context.get("name") != name:
        raise Unauthorized(f"the server did not accept user {name!r}")
    fleet = Fleet(couch.url, database, status_database)
    return Login(name=name, fleet=fleet, roles=list(context.get("roles") or []))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: Optional[str], given: Optional[str]) -> bool:
    """Constant-time comparison; False when either is missing."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())

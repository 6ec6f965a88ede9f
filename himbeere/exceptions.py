"""The exceptions himbeere raises: one root, each also a matching builtin."""

from __future__ import annotations


class HimbeereError(Exception):
    """Base class of every error himbeere raises on purpose."""


class ConfigError(HimbeereError, ValueError):
    """A setting is missing or has a value that is not allowed."""


class CouchError(HimbeereError, RuntimeError):
    """The CouchDB server answered with an error, or could not be reached."""

    #: The HTTP status of the answer; None when there was no answer.
    status: int | None = None


class Unreachable(CouchError, ConnectionError):
    """The CouchDB server could not be reached."""

    #: False when the request never left: no connection could be made.
    sent: bool = True


class Unauthorized(CouchError, PermissionError):
    """The server refused the credentials (401) or the action (403)."""


class NotFound(CouchError, LookupError):
    """A database or document does not exist."""


class Conflict(CouchError):
    """A write lost a race: the document's ``_rev`` has moved on (409)."""


class ProgramError(HimbeereError, ValueError):
    """A code document cannot become a program (bad fields, syntax, no main)."""


class CommandError(HimbeereError, ValueError):
    """A command document is malformed (``cmd`` not a list of strings...)."""


class AlreadyRunning(HimbeereError, RuntimeError):
    """Another daemon already runs on this state directory."""

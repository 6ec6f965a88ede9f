"""Text from documents, made safe to put into a log line.

A program named ``"a\\nFAKE LOG LINE"`` would otherwise write what looks like
an entry of the daemon's own log.  Every name, document id or error that
comes from a document goes through :func:`printable` on its way into a log
line: control characters (newlines, carriage returns, escape sequences that
move a terminal's cursor) are escaped the way ``repr()`` writes them.
"""

from __future__ import annotations

import logging

#: What a continuation line of a multi-line text starts with in the log.
INDENT = "    "


def printable(text: object, multiline: bool = False) -> str:
    """``str(text)`` with every control character escaped as ``repr()`` does.

    ``multiline`` keeps the newlines of a long text (a traceback) but
    indents every line after the first, so that none of them can pass for
    an entry of the log.
    """
    value = str(text)
    if value.isprintable():
        return value
    if multiline:
        return ("\n" + INDENT).join(printable(line) for line in value.split("\n"))
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in value)


class EscapedArguments(logging.Filter):
    """Escape the string arguments of every record of a logger.

    For the modules that put document ids into many log lines (commands,
    placement): one filter on their logger instead of :func:`printable` at
    each call.  The message itself is the module's own text; a traceback
    (``exc_info``) keeps its lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True

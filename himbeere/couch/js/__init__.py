"""The JavaScript of the design documents, kept as ``.js`` files of this package.

Each file is the exact text installed on the server (its final newline
aside): :func:`himbeere.couch.design.ensure_design` compares the installed
design document by content, so a change here reinstalls it on every node;
bump :data:`himbeere.couch.design.VERSION` with it.  A value from Python
goes in through a placeholder ``__NAME__`` (a valid JavaScript identifier,
so a template still parses), replaced by :func:`load`.
"""

from __future__ import annotations

import importlib.resources
import re

_PLACEHOLDER = re.compile(r"__[A-Z][A-Z_]*__")


def load(name: str, **values: str) -> str:
    """The text of ``name`` (``node_filter.js``) with ``__KEY__`` replaced by ``values[KEY]``.

    The values are inserted as they are: pass JSON (``json.dumps``) for data.
    Raises ValueError when a placeholder is left without a value, or a
    value has no placeholder, so a typo cannot reach the server.
    """
    text = importlib.resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    wanted = set(_PLACEHOLDER.findall(text))
    given = {f"__{key}__" for key in values}
    if wanted != given:
        raise ValueError(f"{name} has placeholders {sorted(wanted)}, given {sorted(given)}")
    # One pass: a value that happens to contain __X__ is not replaced again.
    return _PLACEHOLDER.sub(lambda match: values[match.group()[2:-2]], text)

"""The CouchDB access layer, shared by the node and the laptop tools.

``client``     :class:`Couch` and :class:`Database`: the only module that builds a URL
``transport``  HTTP: ``http.client`` on the Pi, ``requests`` in the laptop tools
``design``     the design documents and the node's ``_changes`` filter
``security``   roles, ``_security`` objects and ``validate_doc_update`` rules
``js/``        the JavaScript of the design documents, as package files

The client's names are re-exported here, so ``from himbeere.couch import
Couch`` works.  Importing this package loads only the client and the
standard-library transport (no ``requests``, no ``couchdb``): the daemon on
a Pi imports it.
"""

from __future__ import annotations

from .client import (
    REQUEST_TIMEOUT,
    Couch,
    Database,
    Doc,
    FeedFilter,
    Prepared,
    Seq,
    Server,
    doc_path,
    quote,
    server_urls,
    split_servers,
)

__all__ = [
    "REQUEST_TIMEOUT", "Couch", "Database", "Doc", "FeedFilter", "Prepared", "Seq", "Server",
    "doc_path", "quote", "server_urls", "split_servers",
]

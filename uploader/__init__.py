"""himbeere-upload: the laptop side that takes a fleet from nothing to running code.

============= ==============================================================
``main``      the ``himbeere`` command: the node's (himbeere.cli) and the laptop's
``cli``       the ``himbeere-upload`` command (also ``himbeere upload``)
``fleet``     the server and its two databases; node MAC ids and names
``install``   ``setup``: databases, design documents, ``_security``
``users``     ``provision``: a node's CouchDB user and friendly name
``push``      ``push``, ``pull``, ``ls``, ``rm``: code documents from files
``discover``  ``discover``: broadcast, then provision every Pi that answers
``ops``       fleet operations: nodes, logs, fleet commands, stop/start, labels
``opscli``    ``himbeere nodes|status|logs|cmd|stop|start|restart|label``
============= ==============================================================

Who may do what is in :mod:`himbeere.security`; every CouchDB request goes
through :mod:`himbeere.couch`.
"""

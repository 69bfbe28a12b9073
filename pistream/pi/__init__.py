"""The PI Web API side: the tags file, WebIDs, authentication, TLS, the REST client, the WebSocket client,
the channel readers, the wire types and the gap reads. What leaves this folder is ``flow``'s messages.

Imports only the top-level helpers (``errors``, ``backoff``, ``timeutil``); never ``stream`` or ``lake``.
"""

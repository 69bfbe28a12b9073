"""Between the socket and the table: frames into Arrow columns (``columns`` and its C codec), the bounded
buffer, the exactly-once floors and recent events, the flusher, and the local state file.

Imports ``pi`` (what it receives) and the top-level helpers; never ``lake``, and never deltalake.
"""

"""``python -m pistream`` is the ``pistream`` command."""

from pistream.cli import entry

entry()

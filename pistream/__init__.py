"""pistream: PI Web API channels into Delta Lake tables, exactly once."""

__version__ = "0.1.0"

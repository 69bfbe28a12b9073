"""structlog configuration, done once by the CLI: a console renderer on a terminal, JSON lines otherwise;
with a log file (a service has no terminal), JSON lines to a file that rotates by size."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")
_file_handler: logging.Handler | None = None  # the open log file, if any


def configure_logging(fmt: str = "auto", level: str = "info", stream=None, *, log_file: str | None = None,
                      max_bytes: int = 10 << 20, backups: int = 5) -> None:
    """Route structlog to ``stream`` (stderr by default), or to ``log_file`` rotated at ``max_bytes`` with
    ``backups`` older files kept (``FILE.1`` the newest); ``fmt`` is auto, console or json."""
    stream = stream or sys.stderr
    on_terminal = log_file is None and getattr(stream, "isatty", lambda: False)()
    if fmt == "auto":
        fmt = "console" if on_terminal else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=on_terminal)
    factory: Callable[..., Any]
    global _file_handler
    if _file_handler is not None:  # configured again (tests, table commands): the old file is let go
        _file_handler.close()
        _file_handler = None
    if log_file is None:
        factory = structlog.PrintLoggerFactory(file=stream)
    else:
        factory = _rotating_file_factory(log_file, max_bytes, backups)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


class RotatingFileLogger:
    """A structlog logger writing each rendered line through a ``RotatingFileHandler``: it rotates by size,
    and its lock keeps lines whole when the commit thread logs too."""

    def __init__(self, handler: logging.Handler):
        self._handler = handler

    def msg(self, message: str) -> None:
        self._handler.handle(logging.makeLogRecord({"msg": message, "levelno": logging.INFO}))

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _rotating_file_factory(log_file: str, max_bytes: int, backups: int) -> Callable[..., RotatingFileLogger]:
    """One handler for all loggers; the folder is made, and a file that cannot be opened fails here, at
    the start, not at the first line."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    global _file_handler
    _file_handler = handler
    logger = RotatingFileLogger(handler)
    return lambda *args: logger

"""The one exception tree of pistream; each class carries the process exit code it maps to.

    PistreamError                  exit 1  runtime failure
    ├── ConfigError                exit 2  bad option, config file or environment value
    │   └── TagsFileError          exit 2  missing, empty or unreadable tags file
    ├── ConnectError               exit 2  not a PI Web API (wrong URL), TLS certificate not trusted
    │   └── UnreachableError       exit 1  no answer (refused, DNS, timeout): retried at start, then exit 1
    ├── AuthError                  exit 2  credentials refused (401/403)
    ├── UnknownTagsError           exit 2  tags the server does not know
    ├── ServerError                exit 1  PI Web API answered with an error at run time
    ├── ChannelError               exit 1  a channel closed or failed
    │   └── ChannelRefusedError    exit 2  the server refuses channels (disabled, URL too long)
    ├── SinkError                  exit 1  the Delta table could not be opened or written
    │   ├── TableConflictError     exit 2  the table does not fit (schema), or a live writer holds the app id
    │   ├── ForeignWriterError     exit 1  another process took over this writer's app id while it ran
    │   └── StopTimeoutError       exit 1  the last commit did not land within --stop-timeout
    └── MaintenanceError           exit 1  optimize/vacuum failed or lost its lease
        └── MaintenanceBusyError   exit 75  another maintainer holds the lease: nothing failed, try again

Foreign exceptions are translated once, where they enter (piwebapi, channel, sink, maintenance), with
``raise ... from``.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``: messages name the cause and the fix.
"""

from __future__ import annotations

from datetime import datetime


class PistreamError(Exception):
    """Base of every error pistream reports to its user."""

    exit_code = 1


class ConfigError(PistreamError):
    exit_code = 2


class TagsFileError(ConfigError):
    pass


class ConnectError(PistreamError):
    exit_code = 2


class UnreachableError(ConnectError):
    """The server did not answer (refused, name not resolved, timeout): it may answer later, so pistream
    retries at start (a boot-order race) and exits 1, not 2, if it gives up (a service manager restarts it)."""

    exit_code = 1


class AuthError(PistreamError):
    exit_code = 2


class UnknownTagsError(PistreamError):
    exit_code = 2

    def __init__(self, message: str, unknown: list[str]):
        super().__init__(message)
        self.unknown = unknown


class ServerError(PistreamError):
    exit_code = 1


class ChannelError(PistreamError):
    exit_code = 1


class ChannelRefusedError(ChannelError):
    """Refused for good (EnableChannels false, URL too long): retrying cannot help, the setup must change."""

    exit_code = 2


class SinkError(PistreamError):
    exit_code = 1


class TableConflictError(SinkError):
    exit_code = 2


class ForeignWriterError(SinkError):
    """Another process committed with this writer's app id, or took its claim, while it ran: fatal, never
    retried (a retry would skip values as already written)."""

    exit_code = 1


class StopTimeoutError(SinkError):
    """A stop whose last commit did not land within ``--stop-timeout``; ``uncommitted`` values were left to
    the next start, which reads them back from PI Web API (the state folder says from where)."""

    def __init__(self, message: str, uncommitted: int):
        super().__init__(message)
        self.uncommitted = uncommitted


class MaintenanceError(PistreamError):
    """Table maintenance failed or could not start."""

    exit_code = 1


class MaintenanceBusyError(MaintenanceError):
    """Another maintainer holds the table's maintenance lease until ``held_until``: busy, not failed. Exit 75
    is EX_TEMPFAIL of sysexits.h, which schedulers (cron wrappers, systemd, CI) read as "try again later"."""

    exit_code = 75

    def __init__(self, message: str, *, held_until: datetime, holder: str):
        super().__init__(message)
        self.held_until = held_until
        self.holder = holder

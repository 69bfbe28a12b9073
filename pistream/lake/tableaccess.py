"""Opening a table for a maintenance step: the options to reach it now, and deltalake's errors as pistream's."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from ..errors import ConfigError, MaintenanceError, PistreamError
from .storage import effective_storage_options, redact_text, redact_uri, secret_values

StorageOptions = Mapping[str, str] | Callable[[], Mapping[str, str]]


def current_options(uri: str, storage_options: StorageOptions | None) -> dict[str, str]:
    """The options to reach the table now: a callable is asked each time (credentials are refreshed
    elsewhere), with pistream's timeouts for object stores."""
    options = storage_options() if callable(storage_options) else storage_options
    return effective_storage_options(uri, options)


def open_table(uri: str, options: Mapping[str, str], version: int | None = None) -> DeltaTable:
    return DeltaTable(uri, version=version, storage_options=dict(options) or None)


@contextmanager
def translated(action: str, uri: str, options: Mapping[str, str]) -> Iterator[None]:
    """deltalake's and Arrow's errors as pistream's, on one line, with option values masked."""
    try:
        yield
    except PistreamError:
        raise
    except TableNotFoundError:
        raise ConfigError(f"no Delta table at {redact_uri(uri)}: check --table and the storage options") from None
    except (DeltaError, OSError, pa.ArrowException) as exc:
        raw = " ".join(str(exc).split())
        text = redact_text(raw, secret_values(options))
        raise MaintenanceError(
            f"{action} of {redact_uri(uri)} failed: {text}; check that the storage is reachable and the "
            "credentials may write, then run it again") from (exc if text == raw else None)


def iso_ms(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")

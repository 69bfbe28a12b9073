"""Vacuum is always ``full`` (a lite vacuum misses tombstones dropped from checkpoints). A full vacuum also
deletes files no commit references yet by their age, and pistream writes a big batch's spilled parts to
data files before the commit that adds them (a storage outage can delay that commit): the retention must
exceed any such delay. It defaults to the table's ``delta.deletedFileRetentionDuration`` (7 days) and is
refused under 24 hours without ``force``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from deltalake import DeltaTable

from ..errors import ConfigError
from .lease import Lease, leased, no_lease
from .storage import redact_uri
from .tableaccess import StorageOptions, current_options, open_table, translated

log = structlog.get_logger(__name__)


RETENTION_FLOOR_HOURS = 24


DEFAULT_RETENTION_HOURS = 7 * 24  # Delta's default delta.deletedFileRetentionDuration


_INTERVAL = re.compile(r"^\s*(?:interval\s+)?(\d+(?:\.\d+)?)\s*(week|day|hour|minute|second)s?\s*$", re.I)


_UNIT_HOURS = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600}


@dataclass(frozen=True)
class VacuumResult:
    files: list[str]  # deleted, or that would be deleted with dry_run
    retention_hours: int
    dry_run: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files_deleted": 0 if self.dry_run else len(self.files)}


def retention_of(table: DeltaTable) -> int:
    """The table's ``delta.deletedFileRetentionDuration`` in whole hours (rounded up)."""
    text = table.metadata().configuration.get("delta.deletedFileRetentionDuration")
    match = _INTERVAL.match(text or "")
    if not match:
        if text:
            log.warning("retention_unreadable", value=text, assumed_hours=DEFAULT_RETENTION_HOURS)
        return DEFAULT_RETENTION_HOURS
    return math.ceil(float(match.group(1)) * _UNIT_HOURS[match.group(2).lower()])


def vacuum(uri: str, storage_options: StorageOptions | None = None, retention_hours: int | None = None,
           dry_run: bool = False, force: bool = False, *, lease: Lease | None = None,
           wait: float = 0.0) -> VacuumResult:
    """Delete the files no current table version references that are older than the retention (a full
    vacuum). ``dry_run`` lists them. Under 24 hours only with ``force`` or as a dry run (see the module
    docstring); the table's own retention property is held to the same floor. Without a ``lease``, one is
    taken for the call (waiting up to ``wait`` seconds for another maintainer's)."""
    started = time.perf_counter()
    options = current_options(uri, storage_options)
    if retention_hours is not None and retention_hours < 0:
        raise ConfigError(f"--retention-hours {retention_hours} is negative")
    if retention_hours is not None and not (dry_run or force):
        _check_retention(retention_hours, "--retention-hours")
    holding = no_lease() if dry_run else leased(lease, uri, storage_options, "vacuum", wait)  # a dry run deletes nothing
    with holding as held, translated("vacuum", uri, options):
        table = held.open_table() if held is not None else open_table(uri, options)
        hours = retention_hours if retention_hours is not None else retention_of(table)
        if not (dry_run or force):
            _check_retention(hours, "the table's delta.deletedFileRetentionDuration")
        files = table.vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
        if held is not None:
            held.record("vacuum")  # when it last ran, for the scheduler's daily vacuum across restarts
    result = VacuumResult(sorted(files), hours, dry_run, round(time.perf_counter() - started, 3))
    log.info("table_vacuumed", table=redact_uri(uri), files=len(files), retention_hours=hours, dry_run=dry_run,
             seconds=result.seconds)
    return result


def _check_retention(hours: int, source: str) -> None:
    if hours < RETENTION_FLOOR_HOURS:
        raise ConfigError(
            f"{source} {hours} h is under {RETENTION_FLOOR_HOURS} h: a full vacuum deletes data files pistream "
            "wrote ahead of a commit still to come (a big batch's spilled parts wait for their commit through a "
            "storage outage), and that commit then breaks every read of the table; keep "
            f"{RETENTION_FLOOR_HOURS} hours or more, or pass --force when no pistream writer can be behind")

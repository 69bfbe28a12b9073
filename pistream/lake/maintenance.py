"""The maintenance scheduler beside the appenders: under the lease, compact today's partition, Z-order the
closed ones that need it and vacuum daily (by the table's record of its last vacuum, so a restart does not
vacuum again). Each step runs in a worker thread; nothing here stops the pipeline."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import structlog
import trio

from ..errors import ConfigError, MaintenanceBusyError, PistreamError
from .holder import Holder, this_process
from .lease import LEASE_TTL, Lease
from .optimize import MAX_SPILL_SIZE, compact, z_order, zorder_candidates
from .tableaccess import StorageOptions
from .vacuum import RETENTION_FLOOR_HOURS, vacuum

log = structlog.get_logger(__name__)


def utc_today() -> date:
    return datetime.now(UTC).date()


@dataclass
class SchedulerStats:
    passes: int = 0  # passes that held the lease and ran their steps
    skipped: int = 0  # passes that could not take the lease (another maintainer holds it, storage failed)
    busy: int = 0  # of those, passes that found another maintainer holding it
    failed_steps: int = 0
    compactions: int = 0
    zorders: int = 0
    vacuums: int = 0


class MaintenanceScheduler:
    """Every ``interval`` seconds, under the lease: compact today's (UTC) partition, Z-order each closed
    partition that needs it (``zorder_candidates``), and vacuum when the table's last vacuum (by anyone, as
    the lease records it) is ``vacuum_interval`` old. Today's compaction is tiered (``optimize.tiered_target``):
    it leaves the day's grown files alone until enough new ones outweigh them. Each step runs in a worker thread, beside the appends, which it never blocks. A failing
    step is logged and the pass goes on (the next pass retries it); nothing here stops the pipeline.

    Cancellation (the pipeline's shutdown) takes effect between steps: a step in progress (one compaction,
    one partition's Z-order, the vacuum) runs to its end and commits, since delta-rs cannot stop an
    optimize midway and an abandoned thread would commit after the pipeline believed it had stopped (or be
    cut off by the process exit). A shutdown during a big partition's Z-order therefore waits for it
    (minutes, at worst); then the lease is released (shielded) and ``run`` returns."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, *, interval: float = 600.0,
                 vacuum_interval: float = 86_400.0, retention_hours: int | None = None,
                 target_size: int | None = None, max_spill_size: int = MAX_SPILL_SIZE,
                 lease_ttl: float = LEASE_TTL, max_concurrent_tasks: int | None = None,
                 today: Callable[[], date] = utc_today, holder: Holder | None = None,
                 clock: Callable[[], float] = time.time):
        if interval <= 0 or vacuum_interval <= 0:
            raise ConfigError("maintenance intervals must be positive")
        if retention_hours is not None and retention_hours < RETENTION_FLOOR_HOURS:
            raise ConfigError(f"scheduled vacuum keeps at least {RETENTION_FLOOR_HOURS} hours of removed files")
        self.uri = uri
        self.storage_options = storage_options
        self.interval = interval
        self.vacuum_interval = vacuum_interval
        self.retention_hours = retention_hours
        self.target_size = target_size
        self.max_spill_size = max_spill_size
        self.lease_ttl = lease_ttl
        self.max_concurrent_tasks = max_concurrent_tasks
        self.today = today
        self.holder = holder or this_process("scheduler")
        self.clock = clock  # wall time: the lease's expiry and the last vacuum are times in the table
        self.stats = SchedulerStats()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.run_once()

    async def run_once(self) -> None:
        """One pass; never raises but Cancelled."""
        started = trio.current_time()
        lease = Lease(self.uri, self.storage_options, holder=self.holder, ttl=self.lease_ttl, clock=self.clock)
        try:
            await trio.to_thread.run_sync(lease.acquire)
        except Exception as exc:  # noqa: BLE001 - maintenance never stops the pipeline
            self.stats.skipped += 1
            if isinstance(exc, MaintenanceBusyError):
                self.stats.busy += 1
                log.info("maintenance_skipped", table=lease.display, reason=str(exc))
            else:
                self._failed("lease", lease, exc)
            return
        failed = self.stats.failed_steps
        try:
            await self._steps(lease)
        finally:
            with trio.CancelScope(shield=True):  # an empty commit; a lease left behind would block for a TTL
                await trio.to_thread.run_sync(lease.release)
        self.stats.passes += 1
        log.info("maintenance_finished", table=lease.display, failed_steps=self.stats.failed_steps - failed,
                 seconds=round(trio.current_time() - started, 3))

    async def _steps(self, lease: Lease) -> None:
        today = self.today()
        common: dict[str, Any] = {"lease": lease, "target_size": self.target_size,
                                  "max_concurrent_tasks": self.max_concurrent_tasks}
        if await self._step("compact", lease, compact, self.uri, self.storage_options, today, tiered=True,
                            **common):
            self.stats.compactions += 1
        closed = await self._step("plan", lease, zorder_candidates, self.uri, self.storage_options, before=today)
        for partition in closed or ():
            if lease.lost is not None:
                return
            if await self._step("z_order", lease, z_order, self.uri, self.storage_options, partition,
                                max_spill_size=self.max_spill_size, **common):
                self.stats.zorders += 1
        if lease.lost is None and self._vacuum_due(lease):
            if await self._step("vacuum", lease, vacuum, self.uri, self.storage_options, self.retention_hours,
                                lease=lease):
                self.stats.vacuums += 1

    def _vacuum_due(self, lease: Lease) -> bool:
        last = lease.state.last_runs.get("vacuum") if lease.state is not None else None
        if last is not None and self.clock() - last / 1000 < self.vacuum_interval:
            log.debug("vacuum_not_due", table=lease.display, last=last)
            return False
        return True

    async def _step(self, name: str, held: Lease, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking step in a thread (not abandoned on cancel: see the class docstring); its result,
        or None if it failed (logged)."""
        try:
            return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - maintenance never stops the pipeline
            self.stats.failed_steps += 1
            self._failed(name, held, exc)
            return None

    def _failed(self, step: str, held: Lease, exc: Exception) -> None:
        fields: dict[str, Any] = {"table": held.display, "step": step, "error": str(exc), "retry_in": self.interval}
        if isinstance(exc, PistreamError):
            log.warning("maintenance_failed", **fields)
        else:  # a bug: with its traceback
            log.error("maintenance_failed", **fields, exc_info=exc)

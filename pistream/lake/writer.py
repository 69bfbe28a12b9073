"""The commit writer: takes batches from the flusher and commits them to the sink in a worker thread,
one Delta transaction version per batch, retrying a failed commit with backoff until it lands. The parts
of a large batch that the flusher spills ahead are written to data files as they come, and the batch's
commit adds them with its own.

The sink is a ``DeltaSink`` (a Delta table pistream commits to itself) or a ``copyinto.CopyIntoSink`` (a
Unity Catalog MANAGED table loaded through a SQL warehouse): only the commit step differs. Once the state
file holds a version, ``sink.state_saved(version)`` lets the sink drop what it kept for a restart until then
(the COPY INTO path's staged files).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

import structlog
import trio

from ..backoff import Backoff
from ..errors import ForeignWriterError, SinkError, TableConflictError
from ..pi.flow import GapRequest
from ..stream.buffer import Flush, Spill
from ..stream.dedup import EventFilter
from ..stream.heap import release_free_memory
from ..stream.opengaps import OpenGaps
from ..stream.state import StateStore
from .sink import CommitResult

log = structlog.get_logger(__name__)


class Sink(Protocol):
    """What the commit writer and the pipeline's recovery need of a sink."""

    @property
    def display_uri(self) -> str: ...

    def open(self) -> None: ...

    def last_txn_version(self) -> int: ...

    def read_event_keys(self, since: date | None = None, until: date | None = None,
                        webids: Collection[str] | None = None) -> Any: ...

    def write_ahead(self, rows: Any) -> list[Any]: ...

    def commit(self, batch: Any, txn_version: int, written_ahead: Sequence[Any] = ()) -> CommitResult: ...

    def state_saved(self, txn_version: int) -> None: ...


@dataclass
class WriteStats:
    values_written: int = 0
    commits: int = 0
    failed_attempts: int = 0
    last_commit_at: float | None = None  # trio time of the last commit that landed
    commit_seconds: float = 0.0  # summed over the commits


class CommitWriter:
    """Commits in order; while a commit is in flight or retrying, the flusher waits (backpressure)."""

    def __init__(self, sink: Sink, receive_channel: trio.MemoryReceiveChannel[Flush | Spill], *,
                 txn_version: int, committed: EventFilter, state: StateStore | None = None,
                 save_interval: float = 10.0, open_gaps: Collection[GapRequest] = (),
                 before_commit: Callable[[Flush, int], None] | None = None):
        self.sink = sink
        self.receive_channel = receive_channel
        self.stats = WriteStats()
        self.backoff = Backoff(initial=1.0, maximum=30.0)
        self.txn_version = txn_version
        self.committed = committed  # floors of what is in the table, saved after commits
        self.state = state
        self.save_interval = save_interval
        self._next_save = 0.0
        self._unsaved: int | None = None  # the txn version the saved file lags behind
        # The gaps open at the last commit (at start: those restored, under tag ids of their own: some may be
        # of tags no longer listed, which must not get an id in the live registry)
        self.open_gaps = OpenGaps.of(open_gaps)
        self._gaps_saved = self.open_gaps  # what the open-gaps file holds
        self._written_ahead: list[Any] = []  # data files of the batch being gathered (its Spills)
        self.on_commit: Callable[[float], None] | None = None  # e.g. the metrics' commit duration histogram
        # Trio time since which a batch has been in flight (its files written, its commit), retries included;
        # None when the writer waits for a batch. A hung storage shows here before any request fails.
        self.in_flight_since: float | None = None
        # Called in the worker thread before each commit attempt with the batch and its transaction version
        # (a backfill writes its per-tag progress for that version there: ``stream.progress``).
        self.before_commit = before_commit

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self.receive_channel:
            async for item in self.receive_channel:
                if isinstance(item, Spill):
                    await self._write_ahead(item)
                else:
                    await self._commit(item)
                del item  # not held while the next rows gather: it can be the size of a whole batch
        await trio.to_thread.run_sync(self.save_state)  # a clean stop leaves up-to-date files
        await trio.to_thread.run_sync(self._save_gaps, self.open_gaps)

    def in_flight_seconds(self, now: float) -> float:
        """How long the batch being written or committed has been at it (0 when none is)."""
        return max(0.0, now - self.in_flight_since) if self.in_flight_since is not None else 0.0

    async def _write_ahead(self, spill: Spill) -> None:
        """Data files for a spilled part of the next batch; retried like a commit (the rows stay in ``spill``
        until their files are whole)."""
        self.in_flight_since = trio.current_time()
        while True:
            try:
                # Abandoned when cancelled (a stop that timed out): a hung storage call must not hold the exit.
                actions = await trio.to_thread.run_sync(self._write_and_trim, spill, abandon_on_cancel=True)
            except SinkError as exc:
                self.stats.failed_attempts += 1
                delay = self.backoff.next_delay()
                log.warning("write_ahead_failed", error=str(exc), rows=spill.rows.num_rows, retry_in=round(delay, 2))
                await trio.sleep(delay)
                continue
            break
        self.in_flight_since = None
        self.backoff.reset()
        self._written_ahead += actions

    def _write_and_trim(self, spill: Spill) -> list[Any]:
        actions = self.sink.write_ahead(spill.rows)
        release_free_memory()
        return actions

    async def _commit(self, flush: Flush) -> None:
        version = self.txn_version + 1
        self.in_flight_since = trio.current_time()
        while True:
            started = time.perf_counter()
            try:
                result = await trio.to_thread.run_sync(self._commit_and_save, flush, version, abandon_on_cancel=True)
            except (TableConflictError, ForeignWriterError):  # retrying cannot help (or would skip values)
                raise
            except SinkError as exc:
                self.stats.failed_attempts += 1
                delay = self.backoff.next_delay()
                log.warning("commit_failed", error=str(exc), txn_version=version, retry_in=round(delay, 2))
                await trio.sleep(delay)
                continue
            break
        self.in_flight_since = None
        self.backoff.reset()
        self.txn_version = version
        self.stats.commits += 1
        self.stats.last_commit_at = trio.current_time()
        seconds = time.perf_counter() - started
        self.stats.commit_seconds += seconds
        if self.on_commit is not None:
            self.on_commit(seconds)
        rows = result.rows + (0 if result.skipped else flush.spilled_rows)
        self.stats.values_written += rows
        log.info(
            "batch_committed",
            skipped=result.skipped,
            rows=rows,
            table_version=result.table_version,
            txn_version=version,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _commit_and_save(self, flush: Flush, version: int):
        """In the worker thread: commit, then record the new floors — at most every ``save_interval``
        seconds, as the file holds every tag's recent events. A file older than the table (a crash in
        between) is detected on start by the version mismatch; the floors are then rebuilt from it and
        the table's newer partitions. The open gaps, which the table cannot tell, are saved first: those
        of the last commit and of this one, as the commit may or may not land."""
        self._save_gaps(self.open_gaps | flush.open_gaps)
        if self.before_commit is not None:
            self.before_commit(flush, version)
        result = self.sink.commit(flush.batch, version, self._written_ahead)
        self._written_ahead = []  # committed (or, if the table had this version already, orphans)
        self.committed.merge(flush.floors, flush.recent)
        self.open_gaps = flush.open_gaps
        release_free_memory()  # the commit's Parquet pages are freed by now
        self._unsaved = version
        if time.monotonic() >= self._next_save:
            self.save_state()
        return result

    def _save_gaps(self, gaps: OpenGaps) -> None:
        """Rewrite the open-gaps file if it does not hold ``gaps`` (it changes only when gaps open or close)."""
        if self.state is None or gaps == self._gaps_saved:
            return
        try:
            self.state.save_gaps(gaps)
        except OSError as exc:
            log.error("gaps_not_saved", path=str(self.state.gaps_path), error=str(exc), gaps=len(gaps),
                      note="gaps still open at a stop or crash would not be read back")
            return
        self._gaps_saved = gaps

    def save_state(self) -> None:
        """Write the committed floors now (also called once at a clean stop)."""
        if self.state is None or self._unsaved is None:
            return
        try:
            self.state.save(self.committed, self._unsaved)
        except OSError as exc:
            log.warning("state_not_saved", path=str(self.state.path), error=str(exc))
            return
        saved, self._unsaved = self._unsaved, None
        self._next_save = time.monotonic() + self.save_interval
        self.sink.state_saved(saved)

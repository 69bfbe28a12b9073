"""``pistream --backfill DURATION``: the history before each tag's first live value, read behind the live
stream, exactly once -- the ``pistream backfill`` machinery (``pi.history`` -> ``stream.historyflush`` ->
commit writer) run as one more task of the live pipeline.

- Its own Delta app id (``<live app id>-history``) and progress file in ``--state-dir`` (``stream.progress``,
  written before each of its commits): a restart resumes every tag where the table stands for that app id,
  a stop commits what was read.
- A tag joins the plan when the live pipeline subscribes it (at the first start, or later: rediscovery, a
  tags file changed between runs), starting ``DURATION`` before that moment: at the first start every tag
  from (first start - DURATION). Its range end is found once the live writer has committed a value of it:
  just before its first value in the table (the live stream is complete from its first value on: its gap
  reads fill its own outages), so history and live meet without a value twice or missing.
- Gentle: one recorded-values call at a time (``CONCURRENCY``), its own commits (every ``--flush-rows``
  values or ``--flush-seconds`` after a batch began), tags planned in rounds: tags that get their first live value while a round
  reads join the next one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Container
from dataclasses import dataclass

import structlog
import trio

from .errors import ConfigError
from .lake.sink import DeltaSink
from .lake.writer import CommitWriter
from .pi.history import HistoryPage, HistoryReader, TagRange
from .pi.piwebapi import PiWebApi, ResolvedTags
from .stream.buffer import ColumnBuffer, Flush, Spill
from .stream.columns import page_decoder
from .stream.dedup import EventFilter
from .stream.floors import Floors, TagIds
from .stream.historyflush import HistoryFlusher
from .stream.progress import UNPLANNED, Plan, ProgressStore
from .timeutil import format_iso

log = structlog.get_logger(__name__)

CONCURRENCY = 1  # recorded-values calls at a time: the live stream's reads and commits come first
PLAN_SECONDS = 2.0  # how often tags waiting for their first committed live value are looked at
PAGE_QUEUE = 1
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_INSTEAD = ("or run without --backfill and read the history still missing with pistream backfill --start ... "
            "(it reads before each tag's first value in the table, not into holes after it)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds, in microseconds; ConfigError otherwise."""
    m = _DURATION.fullmatch(text)
    us = round(float(m[1]) * _UNIT_S[m[2].lower()] * 1_000_000) if m else 0
    if us <= 0:
        raise ConfigError(f"--backfill {text!r}: give a duration like 30d, 12h, 90m or a number of seconds "
                          "(how far before its first live value each tag's history is read)")
    return us


def history_app_id(live_app_id: str) -> str:
    return f"{live_app_id}-history"


@dataclass
class LiveBackfillStats:
    rounds: int = 0
    values_read: int = 0  # in this run
    failed: int = 0  # tags whose read failed in this run (the next start resumes them)


class LiveBackfill:
    """Reads the history of the tags ``want`` names, once ``live_floors`` (the live writer's committed floors)
    holds them. ``sink`` commits (its app id is this backfill's), ``planner`` (another sink of the same
    table, only read) finds each tag's first value in the table; ``store`` keeps plan and progress. ``tags``:
    the live pipeline's tag ids, for the history's buffer too: the C codec keeps one webId table, for one
    dict, and two dicts taking turns would rebuild it at every switch (6 ms at 100,000 tags)."""

    def __init__(self, api: PiWebApi, sink: DeltaSink, planner: DeltaSink, store: ProgressStore,
                 live_floors: Container[str], duration: str, *, flush_rows: int, flush_bytes: int,
                 flush_seconds: float = 60.0, concurrency: int = CONCURRENCY, plan_seconds: float = PLAN_SECONDS,
                 tags: TagIds | None = None):
        self.api = api
        self.tags = tags
        self.sink = sink
        self.planner = planner
        self.store = store
        self.live_floors = live_floors
        self.duration = duration
        self.duration_us = parse_duration(duration)
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.concurrency = concurrency
        self.plan_seconds = plan_seconds
        self.txn_version = 0
        self.stats = LiveBackfillStats()
        self.writer: CommitWriter | None = None
        self._first_start: int | None = None  # the plan's start, while the first start's tags are added
        self._described: dict[str, tuple[str, str | None]] = {}  # webid -> (path, uom), subscribed by this run
        self._joining: dict[str, str] = {}  # webid -> path: to add to the plan
        self._joining_start: dict[str, int] = {}
        self._taken: set[str] = set()  # given to a round in this run
        self._reader: HistoryReader | None = None
        self._changed = trio.Event()

    # -- start (in a worker thread)

    def open(self) -> None:
        self.sink.open()
        self.planner.open()

    def prepare(self) -> None:
        """The progress to resume from (the one recorded for the table's version of the history app id), or
        a new plan starting ``duration`` before now. After ``open`` and the writer claim on the app id."""
        store = self.store
        txn_version = self.sink.last_txn_version()
        if store.load():
            plan = store.plan
            assert plan is not None
            progress = store.at(txn_version)
            if progress is None:
                raise ConfigError(
                    f"the table holds version {txn_version} of the history app id {store.app_id} but its progress "
                    f"file {store.path} is for versions {sorted(store.versions)}: restore the state dir it used "
                    f"(--state-dir); {_INSTEAD}")
            store.versions = {txn_version: progress}
            if plan.start != self.duration:
                log.warning("backfill_duration_changed", was=plan.start, now=self.duration,
                            note="tags already planned keep their ranges; tags added from now on get the new one")
            log.info("backfill_resumed", app_id=store.app_id, txn_version=txn_version, tags=len(plan.ends),
                     tags_done=sum(p.done for p in progress.values()), values=sum(p.values for p in progress.values()))
        else:
            if txn_version > 0:
                raise ConfigError(
                    f"the table holds {txn_version} commits of the history app id {store.app_id} but its progress "
                    f"file {store.path} is missing: restore the state dir it used (--state-dir); {_INSTEAD}")
            now = time.time_ns() // 1000
            store.start(Plan(self.duration, "first live value", now - self.duration_us, now, {}, {}))
            self._first_start = now - self.duration_us
        self.txn_version = txn_version

    # -- tags (in the trio thread)

    def want(self, tags: ResolvedTags) -> None:
        """Tags the live pipeline subscribes (at the start, and those rediscovery adds): those new to the plan
        join it, starting ``duration`` before now (at the first start: before the first start)."""
        plan = self.store.plan
        assert plan is not None
        start = self._first_start if self._first_start is not None else time.time_ns() // 1000 - self.duration_us
        for path, webid, uom in zip(tags.paths, tags.webids, tags.uoms, strict=True):
            self._described[webid] = (path, uom)
            if webid not in plan.ends and webid not in self._joining:
                self._joining[webid] = path
                self._joining_start[webid] = start
        self._first_start = None
        self._changed.set()

    # -- run

    async def run(self, stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read in rounds until ``stop``; then commit what was read (the progress file resumes the rest)."""
        # This task's context (its children's copies): the history's log lines (batch_committed, ...) say so.
        structlog.contextvars.bind_contextvars(part="history")
        page_send, page_recv = trio.open_memory_channel[HistoryPage](PAGE_QUEUE)
        flush_send, flush_recv = trio.open_memory_channel[Flush | Spill](1)
        buffer = ColumnBuffer({}, EventFilter(floors=Floors(self.tags)))
        flusher = HistoryFlusher(buffer, page_recv, flush_send, max_rows=self.flush_rows, max_bytes=self.flush_bytes,
                                 max_age=self.flush_seconds)
        self.writer = writer = CommitWriter(self.sink, flush_recv, txn_version=self.txn_version,
                                            committed=EventFilter(), before_commit=self.store.before_commit)
        async with trio.open_nursery() as flow:
            await flow.start(writer.run)
            await flow.start(flusher.run)
            task_status.started()
            async with page_send, trio.open_nursery() as reading:
                reading.start_soon(_cancel_on, stop, reading.cancel_scope)
                await self._rounds(page_send, buffer)
        snap = self.snapshot()
        log.info("backfill_stopped", tags=snap["backfill_tags"], tags_done=snap["backfill_tags_done"],
                 values_read=self.stats.values_read, values_written=writer.stats.values_written,
                 commits=writer.stats.commits)

    async def _rounds(self, page_send: trio.MemorySendChannel[HistoryPage], buffer: ColumnBuffer) -> None:
        while True:
            ranges = await self._ready()
            if not ranges:
                with trio.move_on_after(self.plan_seconds):
                    await self._changed.wait()
                self._changed = trio.Event()
                continue
            webids = [r.webid for r in ranges]
            buffer.describe(webids, [self._described[w][0] for w in webids], [self._described[w][1] for w in webids])
            reader = HistoryReader(self.api, ranges, page_send.clone(), concurrency=self.concurrency,
                                   decode=page_decoder(buffer.index))
            self._reader = reader
            log.info("backfill_round_started", tags=len(ranges), first=format_iso(min(r.progress.cursor_us
                                                                                       for r in ranges)))
            await reader.run()
            self._reader = None
            self.stats.rounds += 1
            self.stats.values_read += reader.stats.values
            self.stats.failed += len(reader.stats.failed)
            log.info("backfill_round_finished", tags=len(ranges), tags_done=reader.stats.tags_done,
                     values=reader.stats.values, failed=len(reader.stats.failed))

    async def _ready(self) -> list[TagRange]:
        """Tags joining go into the plan; tags with a committed live value get their range end; the ranges of
        the subscribed tags not read yet by this run."""
        store = self.store
        plan = store.plan
        assert plan is not None
        if self._joining:
            joining, starts = self._joining, self._joining_start
            self._joining, self._joining_start = {}, {}
            by_start: dict[int, dict[str, str]] = {}
            for webid, path in joining.items():
                by_start.setdefault(starts[webid], {})[webid] = path
            for start, paths in by_start.items():
                await trio.to_thread.run_sync(store.add_tags, paths, start, UNPLANNED)
            log.info("backfill_tags_added", tags=len(joining), start=format_iso(min(by_start)))
        latest = store.latest()
        waiting: dict[int, list[str]] = {}
        for webid in self._described:
            if plan.ends.get(webid) == UNPLANNED and webid in self.live_floors:
                waiting.setdefault(latest[webid].cursor_us, []).append(webid)
        for start, webids in waiting.items():
            now = time.time_ns() // 1000
            firsts = await trio.to_thread.run_sync(self.planner.first_event_times, webids, start, now)
            # No value in the range although the live writer committed one: its first is before the range.
            ends = {w: firsts[w] - 1 if w in firsts else start - 1 for w in webids}
            await trio.to_thread.run_sync(store.set_ends, ends)
            log.info("backfill_planned", tags=len(webids), start=format_iso(start),
                     first_end=format_iso(min(ends.values())), last_end=format_iso(max(ends.values())))
        latest = store.latest()
        ranges = []
        for webid in self._described:
            end = plan.ends.get(webid)
            if end is not None and end != UNPLANNED and webid not in self._taken and not latest[webid].done:
                self._taken.add(webid)
                ranges.append(TagRange(webid, end, latest[webid]))
        return ranges

    def snapshot(self) -> dict[str, object]:
        """For ``stream_stats`` and ``/metrics``: the subscribed tags' history as committed (all runs), and
        this run's commits."""
        latest = self.store.latest()  # replaced, never changed in place, by the writer's thread
        tags = done = values = 0
        for webid in list(self._described):
            p = latest.get(webid)
            if p is not None:
                tags += 1
                done += p.done
                values += p.values
        writer = self.writer
        return {
            "backfill_tags": tags,
            "backfill_tags_done": done,
            "backfill_values_read": values,
            "backfill_values_written": writer.stats.values_written if writer is not None else 0,
            "backfill_commits": writer.stats.commits if writer is not None else 0,
            "backfill_failed_tags": self.stats.failed,
        }


async def _cancel_on(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    log.info("backfill_stopping", note="committing what was read; the next start resumes")
    scope.cancel()


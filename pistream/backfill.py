"""``pistream backfill``: the recorded history of the listed tags over a time range into the table, exactly
once, resumable after any stop. The composition root of the history path (pipeline.py's is the live one):
history reader (``pi.history``) -> flusher (``stream.historyflush``) -> commit writer -> Delta sink.

Exactly once, and how a backfill meets what the table holds already:

- Its own Delta app id (derived from ``--start``/``--end`` as written and the tags, or ``--app-id``), and a
  progress file in ``--state-dir`` written before each of its commits (``stream.progress``): a re-run resumes
  every tag from where the table stands for that app id, and a finished backfill run again adds nothing.
- Each tag's range ends just before the tag's first value in the table within the range (found once, at
  the first start, and kept in the plan): values from that one on are already there, written by a live
  ``pistream`` (whose stream is complete from its first value per tag: its gap reads fill the rest) or by
  an earlier backfill. So a backfill beside a live writer stops where the live stream begins, and a
  backfill of an earlier range extends each tag's history backwards. What it does not do: fill a hole
  after a tag's first value in the range (the live stream's gap reads do that for its own outages).
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from .config import Settings, auth_kind
from .errors import ConfigError
from .lake.claim import WriterClaim, hold
from .lake.sink import DeltaSink
from .lake.target import CatalogTarget, make_target
from .lake.writer import CommitWriter
from .metrics import StartupStatus
from .pi.history import HistoryPage, HistoryReader, TagProgress, TagRange
from .pi.piwebapi import PiWebApi, ResolvedTags
from .pi.tags import read_tags_file
from .pi.tls import client_context
from .pipeline import (
    AUTH_HINTS,
    StartUp,
    _start_simulator,
    delta_sink,
    make_auth,
    resolve_tags,
    watch_signals,
)
from .progressview import ProgressView, Snapshot
from .stream.buffer import ColumnBuffer, Flush, Spill
from .stream.columns import page_decoder
from .stream.dedup import EventFilter
from .stream.heap import use_returning_arrow_pool
from .stream.historyflush import HistoryFlusher
from .stream.progress import Plan, ProgressStore, progress_path
from .timeutil import format_iso, parse_pi_time

log = structlog.get_logger(__name__)

PAGE_QUEUE = 1  # pages in flight between the reader and the flusher (bounds memory with the page size)


@dataclass
class BackfillSummary:
    app_id: str
    start: str
    end: str
    tags: int
    tags_done: int
    values_read: int  # in all runs of this backfill
    values_written: int  # by this run
    commits: int
    first: str | None
    last: str | None
    empty_tags: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # tag path -> why
    complete: bool = False
    summary_file: str | None = None
    elapsed: float = 0.0


def backfill_app_id(start: str, end: str, paths: list[str]) -> str:
    """Stable for the same range as written and the same tags (in any order or case)."""
    text = "\n".join([start.strip(), end.strip(), *sorted(p.upper() for p in paths)])
    return f"pistream-backfill-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def resolve_range(start: str | None, end: str, now_us: int) -> tuple[int, int]:
    if not start:
        raise ConfigError("backfill needs --start: PI time like *-30d, t or y, or ISO 8601 like 2024-01-01")
    try:
        start_us, end_us = parse_pi_time(start, now_us), parse_pi_time(end, now_us)
    except ValueError as exc:
        raise ConfigError(f"--start/--end: {exc}; use PI time (*, *-30d, t, y-2h) or ISO 8601 "
                          "(2024-01-01, 2024-01-01T06:00:00Z)") from None
    if start_us > end_us:
        raise ConfigError(f"--start {start} ({format_iso(start_us)}) is after --end {end} ({format_iso(end_us)})")
    return start_us, end_us


def prepare_progress(store: ProgressStore, sink: DeltaSink, resolved: ResolvedTags, start: str, end: str,
                     start_us: int, end_us: int) -> dict[str, TagProgress]:
    """The progress to resume from (the one recorded for the table's version of this app id), or a new
    plan: each tag's range up to its first value in the table (see the module docstring)."""
    txn_version = sink.last_txn_version()
    if store.load():
        plan = store.plan
        assert plan is not None
        if (plan.start, plan.end) != (start, end) or set(plan.ends) != set(resolved.webids):
            raise ConfigError(f"{store.path} is the progress of a backfill of other tags or another range "
                              f"(--start {plan.start} --end {plan.end}, {len(plan.ends)} tags) under app id "
                              f"{store.app_id}: give --app-id a new value for this one")
        progress = store.at(txn_version)
        if progress is None:
            raise ConfigError(
                f"the table holds version {txn_version} of backfill {store.app_id} but its progress file "
                f"{store.path} is for versions {sorted(store.versions)}: restore the state dir it used "
                "(--state-dir), or give --app-id a new value (a new backfill reads only before each tag's "
                "first value in the table)")
        store.versions = {txn_version: progress}
        log.info("backfill_resumed", app_id=store.app_id, txn_version=txn_version, start=format_iso(plan.start_us),
                 end=format_iso(plan.end_us), tags_done=sum(p.done for p in progress.values()),
                 values=sum(p.values for p in progress.values()))
        return progress
    if txn_version > 0:
        raise ConfigError(
            f"the table holds {txn_version} commits of backfill {store.app_id} but its progress file "
            f"{store.path} is missing: restore the state dir it used (--state-dir), or give --app-id a new "
            "value (a new backfill reads only before each tag's first value in the table)")
    started = time.monotonic()
    firsts = sink.first_event_times(resolved.webids, start_us, end_us)
    ends = {webid: min(end_us, firsts[webid] - 1) if webid in firsts else end_us for webid in resolved.webids}
    store.start(Plan(start, end, start_us, end_us, dict(zip(resolved.webids, resolved.paths, strict=True)), ends))
    met = [w for w in resolved.webids if w in firsts]
    log.info("backfill_planned", app_id=store.app_id, start=format_iso(start_us), end=format_iso(end_us),
             tags=len(ends), tags_ending_at_table_values=len(met), seconds=round(time.monotonic() - started, 3))
    if len(met) < len(ends):
        log.info("backfill_reads_to_end", tags=len(ends) - len(met), end=format_iso(end_us),
                 note="these tags have no value in the table in the range; a live pistream starting on them "
                      "before this backfill ends would overlap it (start the backfill after the live stream)")
    return store.latest()


def fraction_read(ranges: list[TagRange], start_us: int) -> float:
    """The share of every tag's range read so far (done tags count whole)."""
    if not ranges:
        return 1.0
    total = 0.0
    for r in ranges:
        p = r.progress
        if p.done or r.end_us <= start_us:
            total += 1.0
        else:
            total += min(1.0, max(0.0, (p.cursor_us - start_us) / (r.end_us - start_us)))
    return total / len(ranges)


async def run_backfill(settings: Settings, stop: trio.Event | None = None, *, handle_signals: bool = True,
                       sink: DeltaSink | None = None, progress_bar: bool | None = None) -> BackfillSummary:
    """Read the range into the table until done or ``stop`` is set (then commit what was read and return:
    a re-run resumes). ``sink`` replaces the one the settings describe (tests inject faults with it)."""
    started = time.monotonic()
    use_returning_arrow_pool()
    stop = stop if stop is not None else trio.Event()
    end_text = settings.end or "*"
    start_us, end_us = resolve_range(settings.start, end_text, time.time_ns() // 1000)
    assert settings.tags is not None and settings.start is not None
    tag_list = read_tags_file(settings.tags, settings.server)
    paths = tag_list.paths
    app_id = settings.app_id or backfill_app_id(settings.start, end_text, [*paths, *tag_list.masks])
    target = make_target(settings.table, storage_options=settings.storage_options,
                         databricks_profile=settings.databricks_profile, warehouse_id=settings.warehouse_id,
                         location=settings.location, warehouse_wait=settings.warehouse_wait) if sink is None else None
    try:
        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(watch_signals, stop)
            url = await _start_simulator(root, paths, settings) if settings.simulate else settings.url
            assert url is not None
            tls = client_context(settings.ca_bundle, settings.insecure) if url.startswith("https") else None
            api = PiWebApi(url, auth=make_auth(settings, url, tls), verify=tls or True,
                           max_url_length=settings.max_url_length, auth_hint=AUTH_HINTS[auth_kind(settings)])
            async with api:
                # PI Web API busy (429), starting or unreachable: waited for, as the main command does.
                resolved = await StartUp(StartupStatus()).step(
                    f"PI Web API at {url}", "pi_web_api_unreachable", resolve_tags, api, tag_list,
                    settings.skip_unknown, settings.state_dir)
                if target is not None:
                    await target.open()
                    if isinstance(target, CatalogTarget) and target.managed:
                        raise ConfigError(f"pistream backfill writes Delta tables it commits to itself (a folder, "
                                          f"cloud storage, a Unity Catalog EXTERNAL table); {target.display} is "
                                          "MANAGED: backfill into an external table and INSERT INTO from it, or "
                                          "use the live stream's --managed-write")
                    sink = delta_sink(target, app_id)
                assert sink is not None
                await trio.to_thread.run_sync(sink.open)
                # One live process per backfill app id (the same range run twice at once): released at the end.
                await root.start(hold, sink, WriterClaim(sink.app_id))
                table_name = target.catalog_name or sink.display_uri if target else sink.display_uri
                store = ProgressStore(progress_path(settings.state_dir, table_name, app_id), table_name, app_id)
                progress = await trio.to_thread.run_sync(prepare_progress, store, sink, resolved, settings.start,
                                                         end_text, start_us, end_us)
                plan = store.plan
                assert plan is not None
                txn_version = max(store.versions)
                ranges = [TagRange(webid, plan.ends[webid], progress[webid]) for webid in resolved.webids]
                log.info("backfill_started", app_id=app_id, table=sink.display_uri, tags=len(ranges),
                         start=format_iso(plan.start_us), end=format_iso(plan.end_us),
                         concurrency=settings.concurrency, state=str(store.path))

                page_send, page_recv = trio.open_memory_channel[HistoryPage](PAGE_QUEUE)
                flush_send, flush_recv = trio.open_memory_channel[Flush | Spill](1)
                buffer = ColumnBuffer({}, EventFilter())
                buffer.describe(resolved.webids, resolved.paths, resolved.uoms)
                flusher = HistoryFlusher(buffer, page_recv, flush_send, max_rows=settings.flush_rows,
                                         max_bytes=settings.flush_bytes)
                writer = CommitWriter(sink, flush_recv, txn_version=txn_version, committed=EventFilter(),
                                      before_commit=store.before_commit)
                reader = HistoryReader(api, ranges, page_send, concurrency=settings.concurrency,
                                       decode=page_decoder(buffer.index))
                resumed_values = sum(p.values for p in progress.values())
                view = ProgressView(lambda: Snapshot(fraction_read(ranges, plan.start_us), reader.stats.tags_done,
                                                     reader.tags, resumed_values + reader.stats.values),
                                    bar=progress_bar)
                async with trio.open_nursery() as background:
                    await background.start(view.run)
                    async with trio.open_nursery() as flow:
                        await flow.start(writer.run)
                        await flow.start(flusher.run)
                        flow.start_soon(_read_until_stop, reader, stop)
                    background.cancel_scope.cancel()
            root.cancel_scope.cancel()
    finally:
        if target is not None:
            target.close()

    summary = summarize(store, reader, writer, app_id, time.monotonic() - started)
    log.info("backfill_finished", **{k: v for k, v in summary.__dict__.items() if k not in ("empty_tags", "failed")},
             empty_tags=len(summary.empty_tags), first_empty=summary.empty_tags[:10], failed_tags=len(summary.failed),
             first_failed=dict(list(summary.failed.items())[:5]))
    return summary


async def _read_until_stop(reader: HistoryReader, stop: trio.Event) -> None:
    """The reader to its end, or until ``stop``: either way it closes its channel end, so the flusher
    commits what was read and the writer records the progress."""
    async with trio.open_nursery() as nursery:
        async def watch() -> None:
            await stop.wait()
            log.info("backfill_stopping", note="committing what was read; run the same command to resume")
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await reader.run()
        nursery.cancel_scope.cancel()


def summarize(store: ProgressStore, reader: HistoryReader, writer: CommitWriter, app_id: str,
              elapsed: float) -> BackfillSummary:
    """The backfill as committed (all its runs), and a per-tag CSV (tag, values, first, last, status) beside
    its progress file."""
    plan = store.plan
    assert plan is not None
    progress = store.latest()
    failed = {plan.paths[w]: why for w, why in reader.stats.failed.items()}
    firsts = [p.first_us for p in progress.values() if p.first_us is not None]
    lasts = [p.last_us for p in progress.values() if p.last_us is not None]
    summary = BackfillSummary(
        app_id=app_id, start=format_iso(plan.start_us), end=format_iso(plan.end_us), tags=len(progress),
        tags_done=sum(p.done for p in progress.values()), values_read=sum(p.values for p in progress.values()),
        values_written=writer.stats.values_written, commits=writer.stats.commits,
        first=format_iso(min(firsts)) if firsts else None, last=format_iso(max(lasts)) if lasts else None,
        empty_tags=sorted(plan.paths[w] for w, p in progress.items() if p.done and not p.values),
        failed=failed, elapsed=round(elapsed, 3))
    summary.complete = summary.tags_done == summary.tags
    path = store.path.with_name(store.path.name.removesuffix(".backfill.arrow") + ".summary.csv")
    try:
        with open(path, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["tag", "values", "first", "last", "range_end", "status"])
            for webid, p in sorted(progress.items(), key=lambda kv: plan.paths[kv[0]]):
                status = "done" if p.done else ("failed" if plan.paths[webid] in failed else "to resume")
                out.writerow([plan.paths[webid], p.values, format_iso(p.first_us) if p.first_us is not None else "",
                              format_iso(p.last_us) if p.last_us is not None else "",
                              format_iso(plan.ends[webid]), status])
        summary.summary_file = str(path)
    except OSError as exc:
        log.warning("backfill_summary_not_written", path=str(path), error=str(exc))
    return summary


def summary_text(s: BackfillSummary) -> str:
    """The summary for a person, a few lines."""
    state = "complete" if s.complete else f"{s.tags - s.tags_done} of {s.tags} tags to resume (run it again)"
    lines = [f"backfill {s.app_id}: {s.start} .. {s.end}, {state}",
             f"  tags {s.tags_done}/{s.tags} done, {s.values_read:,} values read in all runs, "
             f"{s.values_written:,} written now in {s.commits} commits, {s.elapsed:.1f} s",
             f"  values from {s.first or '-'} to {s.last or '-'}"]
    if s.empty_tags:
        lines.append(f"  {len(s.empty_tags)} tags without values in the range: {', '.join(s.empty_tags[:5])}"
                     + (" ..." if len(s.empty_tags) > 5 else ""))
    for tag, why in list(s.failed.items())[:5]:
        lines.append(f"  not read: {tag}: {why}")
    if s.summary_file:
        lines.append(f"  per tag: {Path(s.summary_file)}")
    return "\n".join(lines)

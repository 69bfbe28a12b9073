"""The composition root: resolve tags, then run channel readers -> flusher -> commit writer in one
nursery until stopped, and shut down in order (readers first, then flush, then the last commit). While it
runs, the tag set follows the tags file and the server (``pi.discovery``): readers come and go under
``pi.subscriptions``.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
import trio

from .backoff import Backoff
from .config import Settings, auth_kind, default_app_id, legacy_app_id, shard_of
from .errors import ConfigError, PistreamError, SinkError, StopTimeoutError, UnreachableError
from .lake.claim import WriterClaim, hold
from .lake.maintenance import MaintenanceScheduler
from .lake.sink import DeltaSink
from .lake.tablestats import table_stats
from .lake.target import CatalogTarget, TableTarget, make_target
from .lake.writer import CommitWriter, Sink
from .livebackfill import LiveBackfill, history_app_id, parse_duration
from .metrics import MetricsServer, StartupStatus
from .pi.auth import AuthProvider, BasicAuth, BearerToken, NegotiateAuth, NoAuth, OidcClientCredentials
from .pi.channel import ChannelReader, receive_buffer_size, shard_webids
from .pi.discovery import Rediscovery, TagsFileWatch, discover
from .pi.flow import GapRequest, Incoming
from .pi.gapfill import GapFiller, GapQueue
from .pi.piwebapi import PiWebApi, ResolvedTags, RetryableError, unknown_tags_error
from .pi.subscriptions import Subscriptions
from .pi.tags import TagList, fleet_shard
from .pi.tls import client_context
from .stream.buffer import ColumnBuffer, Flush, Spill
from .stream.columns import DECODER, FRAME_CODEC, page_decoder
from .stream.dedup import EventFilter, EventKey, advance_from_rows, row_keys
from .stream.flusher import Flusher
from .stream.heap import use_returning_arrow_pool
from .stream.progress import ProgressStore, progress_path
from .stream.state import StateStore, state_path
from .streamstats import StatsReporter, frames_malformed
from .timeutil import EPOCH, format_iso

log = structlog.get_logger(__name__)

READER_QUEUE = 8  # decoded messages in flight between the producers and the flusher (bounds memory)
COMMIT_IN_FLIGHT_FLOOR = 30.0  # /healthz fails when a batch is in flight longer than 2 x --flush-seconds, or this
WATCHDOG_GRACE = 10.0  # seconds past --stop-timeout after which the CLI's process exits, whatever still runs
T = TypeVar("T")


@dataclass
class RunSummary:
    tags: int
    channels: int
    values_received: int
    values_written: int
    repeats_dropped: int
    rejected: int  # values without a usable timestamp
    frames_malformed: int
    values_unsubscribed: int  # values under WebIds no channel of this process subscribed to
    commits: int
    failed_commits: int
    channel_pauses: int
    gaps_filled: int
    gap_values: int
    gaps_lost: int
    elapsed: float


def writer_app_id(settings: Settings) -> str:
    """``--app-id``, else the default (``config.default_app_id``), except on a site upgraded from a version whose
    default was ``pistream-HOSTNAME``: a state file of that id for this table in ``--state-dir`` keeps it, so the
    floors and the gaps being read carry over (a shard never had it)."""
    if settings.app_id:
        return settings.app_id
    legacy = legacy_app_id()
    if shard_of(settings) is None:
        store = StateStore(state_path(settings.state_dir, settings.table, legacy), settings.table, legacy)
        if any(path.exists() for path in (store.path, store.legacy_path, store.gaps_path)):
            log.info("app_id_kept", app_id=legacy, state=str(store.path),
                     note="the default of earlier versions, kept for this state dir; pass --app-id to choose")
            return legacy
    return default_app_id(settings)


async def resolve_tags(api: PiWebApi, tag_list: TagList, skip_unknown: bool, state_dir: str,
                       keep: Callable[[str], bool] | None = None) -> ResolvedTags:
    """The tags to start with: exact lines and masks' matches (those ``keep`` takes: ``--shard``). Unknown
    exact tags stop the start (unless ``skip_unknown``); masks that match nothing are only a warning
    (``discover``)."""
    await api.check_root()
    paths = tag_list.paths if keep is None else [p for p in tag_list.paths if keep(p)]
    found = await discover(api, tag_list, keep=keep)
    resolved, unknown = found.resolved, found.unknown
    if unknown:
        listing = Path(state_dir) / "unknown-tags.txt"
        try:
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(unknown) + "\n", encoding="utf-8")
        except OSError:
            listing = None  # type: ignore[assignment]
        error = unknown_tags_error(unknown, len(paths), str(listing) if listing else None)
        if not skip_unknown or not (len(resolved) or tag_list.masks):
            raise error
        log.warning("tags_skipped", count=len(unknown), first=unknown[:5], listing=str(listing))
    if not len(resolved):
        log.warning("no_tags_yet", masks=len(tag_list.masks),
                    note="no listed tag exists yet: pistream waits for rediscovery to find some")
    return resolved


AUTH_HINTS = {
    "none": "the server wants credentials: pass --username (Basic), --auth kerberos, or set PISTREAM_TOKEN",
    "basic": "check --username and the PISTREAM_PASSWORD variable",
    "bearer": "the token in PISTREAM_TOKEN was refused (expired?): get a new one, or use --auth oidc",
    "oidc": "the OIDC token was refused: check that --oidc-client-id may use PI Web API",
    "kerberos": "Kerberos was refused: check the SPN HTTP/<host> and that the account may use PI Web API",
}


def make_auth(settings: Settings, url: str, tls: object) -> AuthProvider:
    """The credentials provider the settings ask for (secrets come from the environment or the file)."""
    kind = auth_kind(settings)
    if kind == "basic":
        password = settings.password
        if password is None:
            if not sys.stdin.isatty():
                raise ConfigError("--username given without a password: set PISTREAM_PASSWORD "
                                  "(or password in the config file)")
            password = getpass.getpass(f"PI Web API password for {settings.username}: ")
        assert settings.username is not None
        return BasicAuth(settings.username, password)
    if kind == "bearer":
        assert settings.token is not None
        return BearerToken(settings.token)
    if kind == "oidc":
        assert settings.oidc_client_id and settings.oidc_client_secret
        issuer = settings.oidc_issuer or _origin(url)
        return OidcClientCredentials(issuer, settings.oidc_client_id, settings.oidc_client_secret,
                                     scope=settings.oidc_scope, verify=tls or True)
    if kind == "kerberos":
        return NegotiateAuth()
    return NoAuth()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def recover_floors(sink: Sink, store: StateStore, lookback_us: int) -> tuple[EventFilter, int]:
    """Where each tag stopped in the table, and this writer's last transaction version.

    From the state file when it matches the table; otherwise from the table itself (only the partitions
    since the oldest saved floor, when a stale file says where to start).
    """
    started = time.monotonic()
    txn_version = sink.last_txn_version()
    loaded = store.load(lookback_us)
    if loaded is not None and loaded[1] == txn_version:
        log.info("floors_loaded", source="state", tags=len(loaded[0].floors), txn_version=txn_version)
        return loaded[0], txn_version
    base = EventFilter(lookback_us)
    since = None
    lowest = loaded[0].floors.lowest() if loaded is not None else None
    if loaded is not None and loaded[1] < txn_version and lowest is not None:
        base = loaded[0]
        since = (EPOCH + timedelta(microseconds=lowest - lookback_us)).date()
    if txn_version == 0 and (not isinstance(sink, DeltaSink) or sink.table.version() == 0):
        return base, txn_version  # a new table (or, managed, nothing staged and no state): nothing to read
    advance_from_rows(base, sink.read_event_keys(since))
    log.info("floors_loaded", source="table", since=str(since) if since else "all", tags=len(base.floors),
             txn_version=txn_version, seconds=round(time.monotonic() - started, 3))
    return base, txn_version


def recover_open_gaps(sink: Sink, store: StateStore) -> dict[GapRequest, list[EventKey]]:
    """The gaps an earlier run was still reading back when it stopped, each with the events the table
    already holds in it (pages read before the stop, the live value at its end): they are read again."""
    gaps = store.load_gaps()
    if not gaps:
        return {}
    started = time.monotonic()
    since = (EPOCH + timedelta(microseconds=min(g.start_us for g in gaps))).date()
    until = (EPOCH + timedelta(microseconds=max(g.end_us for g in gaps))).date()
    by_tag: dict[str, list[EventKey]] = {}
    for webid, key in row_keys(sink.read_event_keys(since, until, {g.webid for g in gaps})):
        by_tag.setdefault(webid, []).append(key)
    known = {g: [k for k in by_tag.get(g.webid, ()) if g.start_us <= k[0] <= g.end_us] for g in gaps}
    log.info("open_gaps_loaded", gaps=len(gaps), tags=len({g.webid for g in gaps}),
             known_events=sum(map(len, known.values())), start=format_iso(min(g.start_us for g in gaps)),
             seconds=round(time.monotonic() - started, 3))
    return known


def open_sink(target: TableTarget, app_id: str, settings: Settings, store: StateStore) -> Sink:
    """The sink for a prepared target: a Unity Catalog table's storage options follow its vended credentials;
    a MANAGED one is written through the warehouse (``--managed-write``)."""
    if isinstance(target, CatalogTarget) and target.managed:
        if settings.managed_write == "zerobus":
            from .lake.zerobus import zerobus_sink

            return zerobus_sink(target, app_id, settings.zerobus_endpoint, store)
        from .lake.copyinto import copy_into_sink

        return copy_into_sink(target, app_id, store, settings.staging_volume)
    return delta_sink(target, app_id)


def delta_sink(target: TableTarget, app_id: str) -> DeltaSink:
    """The Delta sink of a prepared target that is a Delta table pistream commits to itself (local, cloud, a
    Unity Catalog EXTERNAL table whose storage options follow its vended credentials)."""
    if target.catalog_name is not None:
        return DeltaSink(target.uri, app_id, credentials=target, name=target.catalog_name)
    return DeltaSink(target.uri, app_id, target.base_options)


def credential_expiry(sink: Sink) -> float | None:
    """When the table's vended credentials expire (epoch seconds), for the metrics; None if not vended."""
    vended = getattr(getattr(sink, "credentials", None), "credentials", None)  # CatalogTarget -> VendedCredentials
    return vended.expires_at if vended is not None and vended.expires_at > 0 else None


def log_table_summary(sink: Sink) -> None:
    """The table as the run leaves it, from its log (milliseconds): rows, files, partitions, checkpoint."""
    if not isinstance(sink, DeltaSink):
        return  # a MANAGED table's log is Unity Catalog's
    try:
        stats = table_stats(sink.uri, sink.current_storage_options)
    except PistreamError as exc:
        log.warning("table_summary_unread", error=str(exc))
        return
    log.info("table_summary", table=sink.display_uri, version=stats.version, rows=stats.rows, files=stats.files,
             small_files=stats.small_files, bytes=stats.bytes, partitions=len(stats.partitions),
             last_checkpoint=stats.last_checkpoint, commits_since_checkpoint=stats.commits_since_checkpoint)


async def watch_signals(stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """First Ctrl+C/SIGTERM: stop cleanly (flush and commit). A second one: give up at once."""
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
    with trio.open_signal_receiver(*signals) as receiver:
        task_status.started()
        async for signum in receiver:
            if stop.is_set():
                log.error("stop_forced", signal=signal.Signals(signum).name,
                          note="buffered values not committed")
                raise KeyboardInterrupt
            log.info("stop_requested", signal=signal.Signals(signum).name)
            stop.set()


async def _stop_at(deadline: float, stop: trio.Event) -> None:
    """``--duration``: the same stop as a signal's, at the deadline."""
    await trio.sleep_until(deadline)
    if not stop.is_set():
        log.info("stop_requested", reason="duration")
        stop.set()


async def _cancel_on_stop(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


async def _cancel_after_stop(stop: trio.Event, seconds: float, scope: trio.CancelScope) -> None:
    """``--stop-timeout``: the last flush and commit get ``seconds`` from the stop; then they are abandoned."""
    await stop.wait()
    await trio.sleep(seconds)
    scope.cancel()


async def _watchdog(stop: trio.Event, seconds: float, *, task_status: trio.TaskStatus[threading.Timer]
                    = trio.TASK_STATUS_IGNORED) -> None:
    """The last resort of a stop that must end: ``seconds`` after the stop, whatever still runs (a maintenance
    step that cannot be abandoned, a storage call in a thread), the process exits 1 (the CLI's only)."""
    timer = threading.Timer(seconds, _exit_stuck, (seconds,))
    timer.daemon = True
    task_status.started(timer)
    await stop.wait()
    timer.start()


def _exit_stuck(seconds: float) -> None:
    print(f"pistream: error: the stop did not end within {seconds:g} s (a maintenance step or a storage call "
          "still running): exiting; values not committed are read back at the next start", file=sys.stderr,
          flush=True)
    os._exit(StopTimeoutError.exit_code)


# A start-up failure a person must fix, though it comes as a storage error: retrying cannot help.
_STORAGE_REFUSED = re.compile(
    r"(?i)permission denied|access ?denied|forbidden|InvalidAccessKeyId|SignatureDoesNotMatch|"
    r"AuthenticationFailed|AuthorizationFailure|Unauthorized|NoSuchBucket|ContainerNotFound|bucket does not exist")


def storage_refused(exc: PistreamError) -> bool:
    """A storage error that says the access was refused (permissions, credentials, no such bucket)."""
    return isinstance(exc, SinkError) and exc.exit_code == 1 and bool(_STORAGE_REFUSED.search(str(exc)))


def retried_at_start(exc: PistreamError) -> bool:
    """Whether waiting can fix a start-up failure: PI Web API or the table's storage not answering (refused,
    no name, timeout, 5xx/429) -- a boot-order race, a server restarting. Never what a person must fix (exit 2:
    credentials, unknown tags, settings, a certificate not trusted, a table that does not fit, storage that
    refuses the access)."""
    if exc.exit_code == ConfigError.exit_code or storage_refused(exc):
        return False
    return isinstance(exc, UnreachableError | RetryableError | SinkError)


@dataclass
class StartUp:
    """The start-up's steps: each retried with backoff while what it waits for does not answer (logged, and
    shown by ``/healthz``), ended at once by a stop (the caller's cancel scope) or by a failure retrying cannot
    fix."""

    status: StartupStatus
    last_error: PistreamError | None = None

    async def step(self, name: str, event: str, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        backoff = Backoff(initial=1.0, maximum=30.0)
        self.status.step, self.status.attempts, self.status.error, self.status.retry_in = name, 0, None, None
        while True:
            try:
                result = await function(*args)
            except PistreamError as exc:
                if storage_refused(exc):  # exit 2: a person must fix the storage options or permissions
                    raise ConfigError(str(exc)) from exc
                if not retried_at_start(exc):
                    raise
                self.last_error = exc
                delay = backoff.next_delay()
                self.status.attempts += 1
                self.status.error, self.status.retry_in = str(exc), delay
                log.warning(event, error=str(exc), attempt=self.status.attempts, retry_in=round(delay, 1))
                await trio.sleep(delay)
                continue
            self.last_error = None
            return result


@dataclass
class TableReady:
    """The table opened at start, and where this writer stopped in it."""

    sink: Sink
    store: StateStore
    committed: EventFilter
    txn_version: int
    open_gaps: dict[GapRequest, list[EventKey]]


@dataclass
class OpenedTable:
    sink: Sink
    store: StateStore


async def open_table(target: TableTarget | None, sink: Sink | None, app_id: str,
                     settings: Settings) -> OpenedTable:
    """Find the table (a Unity Catalog one: its location and credentials; created if missing once the warehouse
    answers) and open it (created if missing). A stop ends the wait: the blocking open is abandoned."""
    if target is not None:
        await target.open()
        store = StateStore(state_path(settings.state_dir, settings.table, app_id),
                           target.catalog_name or target.display, app_id)
        sink = open_sink(target, app_id, settings, store)
    else:
        assert sink is not None
        store = StateStore(state_path(settings.state_dir, settings.table, app_id), sink.display_uri, app_id)
    await trio.to_thread.run_sync(sink.open, abandon_on_cancel=True)
    return OpenedTable(sink, store)


def recover_table(opened: OpenedTable, settings: Settings) -> TableReady:
    """Blocking: where this writer stopped in the table (floors, transaction version, gaps still open)."""
    sink, store = opened.sink, opened.store
    committed, txn_version = recover_floors(sink, store, int(settings.reread_seconds * 1_000_000))
    return TableReady(sink, store, committed, txn_version, recover_open_gaps(sink, store))


def uncommitted_values(flusher: Flusher, writer: CommitWriter) -> int:
    """Values taken in and neither committed nor dropped (repeats, rejected): what a stop leaves behind."""
    stats = flusher.stats
    return max(0, stats.values_received - stats.repeats_dropped - stats.rejected - writer.stats.values_written)


async def run_pipeline(settings: Settings, stop: trio.Event | None = None, *, handle_signals: bool = True,
                       sink: Sink | None = None, stop_watchdog: bool = False) -> RunSummary:
    """Run until ``stop`` is set, a signal arrives or ``settings.duration`` elapses.

    The start-up waits for PI Web API and the table's storage to answer (retried); every wait ends at a stop.
    The last flush and commit after a stop get ``settings.stop_timeout``; past it, ``StopTimeoutError``.
    ``sink`` replaces the Delta sink the settings describe (tests inject storage faults with it);
    ``stop_watchdog`` (the CLI's) ends the process should a stop still not end 10 s after the stop timeout.
    """
    started = time.monotonic()
    use_returning_arrow_pool()
    stop = stop if stop is not None else trio.Event()  # an Event has no truth value
    assert settings.tags is not None
    watch = TagsFileWatch(settings.tags, settings.server)
    tag_list = watch.read()
    if tag_list.duplicates:
        log.warning("tags_duplicated", count=len(tag_list.duplicates),
                    first=[f"line {line}: {path}" for line, path in tag_list.duplicates[:5]])
    paths = tag_list.paths
    keep = fleet_member(shard_of(settings))
    if keep is not None:
        paths = [p for p in paths if keep(p)]
        log.info("shard_selected", shard=settings.shard, tags=len(paths), listed=len(tag_list.paths),
                 masks=len(tag_list.masks))
        if not paths and not tag_list.masks:
            raise ConfigError(f"--shard {settings.shard} holds none of the {len(tag_list.paths)} tags of "
                              f"{settings.tags}: use fewer shards than tags")
    kind = auth_kind(settings)

    app_id = writer_app_id(settings)
    backfill_us = parse_duration(settings.backfill) if settings.backfill is not None else None  # bad: exit 2
    target = make_target(settings.table, storage_options=settings.storage_options,
                         databricks_profile=settings.databricks_profile, warehouse_id=settings.warehouse_id,
                         location=settings.location, warehouse_wait=settings.warehouse_wait,
                         managed_write=settings.managed_write) if sink is None else None
    startup = StartUp(StartupStatus())
    timer: threading.Timer | None = None
    try:
        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(watch_signals, stop)
            if settings.duration is not None:  # counts from the process start
                root.start_soon(_stop_at, trio.current_time() + settings.duration - (time.monotonic() - started),
                                stop)
            if stop_watchdog:
                timer = await root.start(_watchdog, stop, settings.stop_timeout + WATCHDOG_GRACE)
            metrics = None
            if settings.metrics_port is not None:  # up during the start-up: /healthz says what it waits for
                metrics = MetricsServer(port=settings.metrics_port, host=settings.metrics_host,
                                        stale_after=max(3 * settings.flush_seconds, 60.0),
                                        in_flight_limit=max(2 * settings.flush_seconds, COMMIT_IN_FLIGHT_FLOOR))
                metrics.startup = startup.status
                await root.start(metrics.run)
            url = settings.url
            if settings.simulate:
                url = await _start_simulator(root, paths, settings)
            assert url is not None
            tls = client_context(settings.ca_bundle, settings.insecure) if url.startswith("https") else None
            auth = make_auth(settings, url, tls)
            hint = AUTH_HINTS[kind]
            api = PiWebApi(url, auth=auth, verify=tls or True, max_url_length=settings.max_url_length,
                           auth_hint=hint)
            async with api:
                ready: TableReady | None = None
                with trio.CancelScope() as starting:  # a stop ends every wait of the start-up
                    root.start_soon(_cancel_on_stop, stop, starting)
                    # PI Web API first: a wrong URL or password must not leave an empty table behind.
                    resolved = await startup.step(f"PI Web API at {url}", "pi_web_api_unreachable", resolve_tags,
                                                  api, tag_list, settings.skip_unknown, settings.state_dir, keep)
                    table_step = f"table {target.display if target is not None else settings.table}"
                    opened = await startup.step(table_step, "storage_unreachable", open_table, target, sink, app_id,
                                                settings)
                    if isinstance(opened.sink, DeltaSink):
                        # One live writer per app id, until the root nursery ends (after the last commit):
                        # released then. Taken before reading where this writer stopped, so that no other writer
                        # moves it. (A MANAGED table's log is Unity Catalog's: no claim there.)
                        await root.start(hold, opened.sink, WriterClaim(opened.sink.app_id))
                    ready = await startup.step(table_step, "storage_unreachable",
                                               partial(trio.to_thread.run_sync, abandon_on_cancel=True),
                                               recover_table, opened, settings)
                if ready is None:
                    if startup.last_error is not None:  # stopped while waiting: the reason it waited is the error
                        log.warning("start_abandoned", step=startup.status.step, attempts=startup.status.attempts)
                        raise startup.last_error
                    log.info("pistream_stopped", note="stopped during the start-up",
                             elapsed=round(time.monotonic() - started, 3))
                    root.cancel_scope.cancel()  # the signal watcher, the metrics server, the simulator
                    return RunSummary(len(paths), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                      round(time.monotonic() - started, 3))
                sink, store, committed = ready.sink, ready.store, ready.committed
                history: LiveBackfill | None = None
                if backfill_us is not None:
                    history = await start_history(root, api, sink, target, committed, settings)
                    history.want(resolved)
                if not isinstance(sink, DeltaSink):
                    log.info("maintenance_skipped", table=sink.display_uri, reason="a MANAGED table: Databricks "
                             "maintains it (predictive optimization, or OPTIMIZE on a schedule)")
                elif settings.maintenance_interval:  # in the root nursery: cancelled after the last commit
                    await root.start(MaintenanceScheduler(
                        sink.uri, target.storage_options if target is not None else sink.current_storage_options,
                        interval=settings.maintenance_interval).run)
                shard = partial(shard_webids, url, max_url_length=settings.max_url_length)
                shards = shard(resolved.webids)
                log.info("decoder_selected", decoder=DECODER)
                log.info("tags_resolved", tags=len(resolved), channels=len(shards), table=sink.display_uri,
                         seconds=round(time.monotonic() - started, 3))

                message_send, message_recv = trio.open_memory_channel[Incoming](READER_QUEUE)
                flush_send, flush_recv = trio.open_memory_channel[Flush | Spill](1)
                gap_queue = GapQueue()
                event_filter = committed.copy()
                listed = set(resolved.webids)
                for gap, known in ready.open_gaps.items():  # read again before the channels bring newer gaps
                    if gap.webid in listed:  # a tag no longer listed: its values would be dropped as unsubscribed
                        event_filter.reopen(gap, known)
                        gap_queue.put(gap)
                del listed
                buffer = ColumnBuffer({}, event_filter)
                buffer.describe(resolved.webids, resolved.paths, resolved.uoms)
                webids = resolved.webids
                del tag_list, paths, resolved  # the buffer's tag index keeps what is needed
                flusher = Flusher(buffer, message_recv, flush_send,
                                  max_rows=settings.flush_rows, max_bytes=settings.flush_bytes,
                                  max_age=settings.flush_seconds, gap_queue=gap_queue,
                                  idle_seconds=settings.flush_idle_seconds)
                writer = CommitWriter(sink, flush_recv, txn_version=ready.txn_version, committed=committed,
                                      state=store, open_gaps=ready.open_gaps.keys())
                del buffer, ready  # the flusher and the filter's windows have them now
                gap_filler = GapFiller(api, gap_queue, message_send.clone(), decode=page_decoder(flusher.buffer.index))
                message_size = int(settings.max_message_mb * (1 << 20)) if settings.max_message_mb else None

                def make_reader(name: str, shard: list[str], send: trio.MemorySendChannel[Incoming]) -> ChannelReader:
                    return ChannelReader(name, url, shard, send, auth=auth, ssl_context=tls, auth_hint=hint,
                                         heartbeat_rate=settings.heartbeat_rate, read_timeout=settings.silence_seconds,
                                         stall_timeout=settings.stall_seconds,
                                         receive_buffer=receive_buffer_size(len(shards)),
                                         max_message_size=message_size, raw_frames=FRAME_CODEC)

                # It owns message_send and a clone per reader; the flusher ends when the last producer closes.
                subscriptions = Subscriptions(message_send, make_reader, shard)
                def describe(tags: ResolvedTags) -> None:
                    flusher.buffer.describe(tags.webids, tags.paths, tags.uoms)
                    if history is not None:
                        history.want(tags)

                rediscovery = Rediscovery(
                    api, watch, subscriptions, describe, interval=settings.rediscover_interval, sighup=handle_signals, keep=keep)
                finishing = trio.CancelScope()  # the flow, cancelled --stop-timeout after a stop
                async with trio.open_nursery() as background:  # cancelled once the last commit has landed
                    reporter = StatsReporter(settings.stats_interval, flusher, writer, subscriptions.readers, gap_filler,
                                             subscriptions=subscriptions, backfill=history)
                    if settings.stats_interval:
                        background.start_soon(reporter.run)
                    if metrics is not None:
                        metrics.attach(reporter, storage=sink.display_uri,
                                       credential_expiry=partial(credential_expiry, sink))
                        writer.on_commit = metrics.observe_commit
                    background.start_soon(_cancel_after_stop, stop, settings.stop_timeout, finishing)
                    with finishing:
                        async with trio.open_nursery() as flow:
                            await flow.start(writer.run)
                            await flow.start(flusher.run)
                            flow.start_soon(_run_producers, subscriptions, webids, rediscovery, gap_filler, stop)
                            if history is not None:  # behind the live stream; a stop commits what it read
                                await flow.start(history.run, stop)
                            del webids
                    background.cancel_scope.cancel()
                if finishing.cancelled_caught:
                    uncommitted = uncommitted_values(flusher, writer)
                    log.error("stop_timed_out", stop_timeout=settings.stop_timeout, values_not_committed=uncommitted,
                              table=sink.display_uri)
                else:
                    uncommitted = 0
                    with trio.move_on_after(min(settings.stop_timeout, 10.0)):  # only a summary: never holds a stop
                        await trio.to_thread.run_sync(log_table_summary, sink, abandon_on_cancel=True)
            root.cancel_scope.cancel()  # the simulator, the metrics server, the signal watcher
    finally:
        if timer is not None:
            timer.cancel()
        if target is not None:
            target.close()  # the Databricks workspace's connections

    summary = RunSummary(
        tags=subscriptions.tag_count,
        channels=len(subscriptions.readers),
        values_received=flusher.stats.values_received,
        values_written=writer.stats.values_written,
        repeats_dropped=flusher.stats.repeats_dropped,
        rejected=flusher.stats.rejected,
        frames_malformed=frames_malformed(flusher, subscriptions.readers),
        values_unsubscribed=flusher.buffer.unsubscribed.values,
        commits=writer.stats.commits,
        failed_commits=writer.stats.failed_attempts,
        channel_pauses=subscriptions.pauses,
        gaps_filled=gap_filler.stats.gaps,
        gap_values=gap_filler.stats.values_read,
        gaps_lost=gap_filler.stats.lost_gaps,
        elapsed=round(time.monotonic() - started, 3),
    )
    log.info("pistream_stopped", **summary.__dict__)
    if uncommitted:
        raise StopTimeoutError(
            f"the last commit did not land within --stop-timeout {settings.stop_timeout:g} s ({sink.display_uri} "
            f"not answering?): {uncommitted:,} values were not committed; the next start reads them back from "
            f"PI Web API (the state in {settings.state_dir} says from where)", uncommitted)
    return summary


async def start_history(root: trio.Nursery, api: PiWebApi, sink: Sink, target: TableTarget | None,
                        committed: EventFilter, settings: Settings) -> LiveBackfill:
    """``--backfill``: the history task's own sinks (app id ``<live app id>-history``) under a writer claim of
    their own, and its plan and progress from its file in the state dir (``livebackfill``)."""
    if not isinstance(sink, DeltaSink):
        raise ConfigError(f"--backfill writes the history itself with Delta commits; {sink.display_uri} is a "
                          "MANAGED table: backfill into an external table (pistream backfill) and INSERT INTO from it")
    app_id = history_app_id(sink.app_id)
    if target is not None:
        history_sink, planner = delta_sink(target, app_id), delta_sink(target, app_id)
    else:  # a sink given by the caller (tests)
        history_sink = DeltaSink(sink.uri, app_id, sink.current_storage_options())
        planner = DeltaSink(sink.uri, app_id, sink.current_storage_options())
    table_name = target.catalog_name or sink.display_uri if target is not None else sink.display_uri
    store = ProgressStore(progress_path(settings.state_dir, table_name, app_id), table_name, app_id)
    assert settings.backfill is not None
    history = LiveBackfill(api, history_sink, planner, store, committed.floors, settings.backfill,
                           flush_rows=settings.flush_rows, flush_bytes=settings.flush_bytes,
                           flush_seconds=settings.flush_seconds, tags=committed.floors.tags)
    await trio.to_thread.run_sync(history.open)
    # Taken before reading where the history stopped, so that no other writer moves it (released at the end).
    await root.start(hold, history_sink, WriterClaim(app_id))
    await trio.to_thread.run_sync(history.prepare)
    return history


def fleet_member(shard: tuple[int, int] | None) -> Callable[[str], bool] | None:
    """``--shard K/N`` as a test of a tag path (for exact lines and masks' matches alike), or None."""
    if shard is None:
        return None
    k, n = shard
    return lambda path: fleet_shard(path, n) == k


async def _run_producers(subscriptions: Subscriptions, webids: list[str], rediscovery: Rediscovery,
                         gap_filler: GapFiller, stop: trio.Event) -> None:
    """Run the readers (of ``webids``, then of what rediscovery finds), rediscovery and the gap filler until
    stop (a signal, ``--duration``); when they close their channel
    ends, the flusher flushes what is left. Gaps still being read then are in the open-gaps file the commit
    writer keeps, and are read again on the next start."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gap_filler.run)
        await nursery.start(subscriptions.run, webids)
        del webids
        await nursery.start(rediscovery.run)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def _start_simulator(nursery: trio.Nursery, paths: list[str], settings: Settings) -> str:
    """Serve the listed tags from the built-in simulator on a loopback port; returns its base URL."""
    from .sim.model import SimModel
    from .sim.server import Simulator

    basic = (settings.username, settings.password) if settings.username and settings.password else None
    simulator = Simulator(SimModel.from_paths(paths, rate=settings.sim_rate), basic_auth=basic)
    await nursery.start(simulator.run)
    log.info("simulator_started", url=simulator.url, tags=len(paths), rate=settings.sim_rate)
    return simulator.url

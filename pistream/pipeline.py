"""The composition root: resolve tags, then run channel readers -> flusher -> commit writer in one
nursery until stopped, and shut down in order (readers first, then flush, then the last commit). While it
runs, the tag set follows the tags file and the server (``pi.discovery``): readers come and go under
``pi.subscriptions``.
"""

from __future__ import annotations

import getpass
import math
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import structlog
import trio

from .config import Settings, auth_kind
from .errors import ConfigError, PistreamError
from .lake.maintenance import MaintenanceScheduler
from .lake.sink import DeltaSink
from .lake.tablestats import table_stats
from .lake.target import TableTarget, make_target
from .lake.writer import CommitWriter
from .metrics import MetricsServer
from .pi.auth import AuthProvider, BasicAuth, BearerToken, NegotiateAuth, NoAuth, OidcClientCredentials
from .pi.channel import ChannelReader, receive_buffer_size, shard_webids
from .pi.discovery import Rediscovery, TagsFileWatch, discover
from .pi.flow import GapRequest, Incoming
from .pi.gapfill import GapFiller, GapQueue
from .pi.piwebapi import PiWebApi, ResolvedTags, unknown_tags_error
from .pi.subscriptions import Subscriptions
from .pi.tags import TagList
from .pi.tls import client_context
from .stream.buffer import ColumnBuffer, Flush, Spill
from .stream.columns import DECODER, FRAME_CODEC
from .stream.dedup import EventFilter, EventKey, advance_from_rows, row_keys
from .stream.flusher import Flusher
from .stream.heap import use_returning_arrow_pool
from .stream.state import StateStore, state_path
from .streamstats import StatsReporter
from .timeutil import EPOCH, format_iso

log = structlog.get_logger(__name__)

READER_QUEUE = 8  # decoded messages in flight between the producers and the flusher (bounds memory)


@dataclass
class RunSummary:
    tags: int
    channels: int
    values_received: int
    values_written: int
    repeats_dropped: int
    rejected: int
    commits: int
    failed_commits: int
    channel_pauses: int
    gaps_filled: int
    gap_values: int
    gaps_lost: int
    elapsed: float


def default_app_id() -> str:
    """One app id per writer: stable across restarts of the same host's pistream."""
    return f"pistream-{socket.gethostname()}"


async def resolve_tags(api: PiWebApi, tag_list: TagList, skip_unknown: bool, state_dir: str
                       ) -> ResolvedTags:
    """The tags to start with: exact lines and masks' matches. Unknown exact tags stop the start (unless
    ``skip_unknown``); masks that match nothing are only a warning (``discover``)."""
    await api.check_root()
    paths = tag_list.paths
    found = await discover(api, tag_list)
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


def recover_floors(sink: DeltaSink, store: StateStore, lookback_us: int) -> tuple[EventFilter, int]:
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
    if txn_version == 0 and sink.table.version() == 0:
        return base, txn_version  # a new table: nothing to read
    advance_from_rows(base, sink.read_event_keys(since))
    log.info("floors_loaded", source="table", since=str(since) if since else "all", tags=len(base.floors),
             txn_version=txn_version, seconds=round(time.monotonic() - started, 3))
    return base, txn_version


def recover_open_gaps(sink: DeltaSink, store: StateStore) -> dict[GapRequest, list[EventKey]]:
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


def open_sink(target: TableTarget, app_id: str) -> DeltaSink:
    """The sink for a prepared target: a Unity Catalog table's storage options follow its vended credentials."""
    if target.catalog_name is not None:
        return DeltaSink(target.uri, app_id, credentials=target, name=target.catalog_name)
    return DeltaSink(target.uri, app_id, target.base_options)


def credential_expiry(sink: DeltaSink) -> float | None:
    """When the table's vended credentials expire (epoch seconds), for the metrics; None if not vended."""
    vended = getattr(sink.credentials, "credentials", None)  # CatalogTarget -> VendedCredentials
    return vended.expires_at if vended is not None and vended.expires_at > 0 else None


def log_table_summary(sink: DeltaSink) -> None:
    """The table as the run leaves it, from its log (milliseconds): rows, files, partitions, checkpoint."""
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


async def run_pipeline(settings: Settings, stop: trio.Event | None = None,
                       *, handle_signals: bool = True, sink: DeltaSink | None = None) -> RunSummary:
    """Run until ``stop`` is set, a signal arrives or ``settings.duration`` elapses.

    ``sink`` replaces the Delta sink the settings describe (tests inject storage faults with it).
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
    kind = auth_kind(settings)

    app_id = settings.app_id or default_app_id()
    target = make_target(settings.table, storage_options=settings.storage_options,
                         databricks_profile=settings.databricks_profile, warehouse_id=settings.warehouse_id,
                         location=settings.location, warehouse_wait=settings.warehouse_wait) if sink is None else None
    try:
        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(watch_signals, stop)
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
                # PI Web API first: a wrong URL or password must not leave an empty table behind.
                resolved = await resolve_tags(api, tag_list, settings.skip_unknown, settings.state_dir)
                if target is not None:
                    await target.open()
                    sink = open_sink(target, app_id)
                assert sink is not None
                store = StateStore(state_path(settings.state_dir, settings.table, app_id),
                                   target.catalog_name or sink.display_uri if target else sink.display_uri, app_id)
                await trio.to_thread.run_sync(sink.open)
                if settings.maintenance_interval:  # in the root nursery: cancelled after the last commit
                    await root.start(MaintenanceScheduler(
                        sink.uri, target.storage_options if target is not None else sink.current_storage_options,
                        interval=settings.maintenance_interval).run)
                committed, txn_version = await trio.to_thread.run_sync(
                    recover_floors, sink, store, int(settings.reread_seconds * 1_000_000))
                open_gaps = await trio.to_thread.run_sync(recover_open_gaps, sink, store)
                shard = partial(shard_webids, url, max_url_length=settings.max_url_length)
                shards = shard(resolved.webids)
                log.info("decoder_selected", decoder=DECODER)
                log.info("tags_resolved", tags=len(resolved), channels=len(shards), table=sink.display_uri,
                         seconds=round(time.monotonic() - started, 3))

                message_send, message_recv = trio.open_memory_channel[Incoming](READER_QUEUE)
                flush_send, flush_recv = trio.open_memory_channel[Flush | Spill](1)
                gap_queue = GapQueue()
                event_filter = committed.copy()
                for gap, known in open_gaps.items():  # read again before the channels bring newer gaps
                    event_filter.reopen(gap, known)
                    gap_queue.put(gap)
                buffer = ColumnBuffer({}, event_filter)
                buffer.describe(resolved.webids, resolved.paths, resolved.uoms)
                webids = resolved.webids
                del tag_list, paths, resolved  # the buffer's tag index keeps what is needed
                flusher = Flusher(buffer, message_recv, flush_send,
                                  max_rows=settings.flush_rows, max_bytes=settings.flush_bytes,
                                  max_age=settings.flush_seconds, gap_queue=gap_queue,
                                  idle_seconds=settings.flush_idle_seconds)
                writer = CommitWriter(sink, flush_recv, txn_version=txn_version, committed=committed, state=store,
                                      open_gaps=open_gaps.keys())
                del buffer, open_gaps  # the flusher and the filter's windows have them now
                gap_filler = GapFiller(api, gap_queue, message_send.clone())
                message_size = int(settings.max_message_mb * (1 << 20)) if settings.max_message_mb else None

                def make_reader(name: str, shard: list[str], send: trio.MemorySendChannel[Incoming]) -> ChannelReader:
                    return ChannelReader(name, url, shard, send, auth=auth, ssl_context=tls, auth_hint=hint,
                                         heartbeat_rate=settings.heartbeat_rate, read_timeout=settings.silence_seconds,
                                         stall_timeout=settings.stall_seconds,
                                         receive_buffer=receive_buffer_size(len(shards)),
                                         max_message_size=message_size, raw_frames=FRAME_CODEC)

                # It owns message_send and a clone per reader; the flusher ends when the last producer closes.
                subscriptions = Subscriptions(message_send, make_reader, shard)
                rediscovery = Rediscovery(
                    api, watch, subscriptions, lambda tags: flusher.buffer.describe(tags.webids, tags.paths, tags.uoms),
                    interval=settings.rediscover_interval, sighup=handle_signals)
                async with trio.open_nursery() as background:  # cancelled once the last commit has landed
                    reporter = StatsReporter(settings.stats_interval, flusher, writer, subscriptions.readers, gap_filler,
                                             subscriptions=subscriptions)
                    if settings.stats_interval:
                        background.start_soon(reporter.run)
                    if settings.metrics_port is not None:
                        metrics = MetricsServer(reporter, port=settings.metrics_port, host=settings.metrics_host,
                                                stale_after=max(3 * settings.flush_seconds, 60.0),
                                                credential_expiry=partial(credential_expiry, sink))
                        writer.on_commit = metrics.observe_commit
                        await background.start(metrics.run)
                    async with trio.open_nursery() as flow:
                        await flow.start(writer.run)
                        await flow.start(flusher.run)
                        deadline = trio.current_time() + (settings.duration - (time.monotonic() - started)
                                                          if settings.duration is not None else math.inf)
                        flow.start_soon(_run_producers, subscriptions, webids, rediscovery, gap_filler, stop,
                                        deadline)
                        del webids
                    background.cancel_scope.cancel()
                await trio.to_thread.run_sync(log_table_summary, sink)
            root.cancel_scope.cancel()  # the simulator and the signal watcher
    finally:
        if target is not None:
            target.close()  # the Databricks workspace's connections

    summary = RunSummary(
        tags=subscriptions.tag_count,
        channels=len(subscriptions.readers),
        values_received=flusher.stats.values_received,
        values_written=writer.stats.values_written,
        repeats_dropped=flusher.stats.repeats_dropped,
        rejected=flusher.stats.rejected,
        commits=writer.stats.commits,
        failed_commits=writer.stats.failed_attempts,
        channel_pauses=subscriptions.pauses,
        gaps_filled=gap_filler.stats.gaps,
        gap_values=gap_filler.stats.values_read,
        gaps_lost=gap_filler.stats.lost_gaps,
        elapsed=round(time.monotonic() - started, 3),
    )
    log.info("pistream_stopped", **summary.__dict__)
    return summary


async def _run_producers(subscriptions: Subscriptions, webids: list[str], rediscovery: Rediscovery,
                         gap_filler: GapFiller, stop: trio.Event, deadline: float) -> None:
    """Run the readers (of ``webids``, then of what rediscovery finds), rediscovery and the gap filler until
    stop or the deadline (``--duration`` counts from the process start); when they close their channel
    ends, the flusher flushes what is left. Gaps still being read then are in the open-gaps file the commit
    writer keeps, and are read again on the next start."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gap_filler.run)
        await nursery.start(subscriptions.run, webids)
        del webids
        await nursery.start(rediscovery.run)
        with trio.move_on_at(deadline):
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

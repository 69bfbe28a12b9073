"""The composition root: resolve tags, then run channel readers -> flusher -> commit writer in one
nursery until stopped, and shut down in order (readers first, then flush, then the last commit).
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass

import structlog
import trio

from .auth import basic_header
from .buffer import ColumnBuffer, Flush, StreamInfo
from .channel import ChannelReader, shard_webids
from .config import Settings
from .errors import ConfigError
from .flusher import Flusher
from .messages import StreamSetMessage
from .piwebapi import PiWebApi, ResolvedTag, unknown_tags_error
from .sink import DeltaSink
from .tags import read_tags_file
from .writer import CommitWriter

log = structlog.get_logger(__name__)

READER_QUEUE = 64  # decoded messages in flight between the readers and the flusher


@dataclass
class RunSummary:
    tags: int
    channels: int
    values_received: int
    values_written: int
    repeats_dropped: int
    rejected: int
    commits: int
    elapsed: float


def default_app_id() -> str:
    """One app id per writer: stable across restarts of the same host's pistream."""
    return f"pistream-{socket.gethostname()}"


async def resolve_tags(api: PiWebApi, paths: list[str], skip_unknown: bool) -> list[ResolvedTag]:
    await api.check_root()
    resolved, unknown = await api.resolve_points(paths)
    if unknown:
        error = unknown_tags_error(unknown, len(paths))
        if not skip_unknown or not resolved:
            raise error
        log.warning("tags_skipped", count=len(unknown), first=unknown[:5])
    return resolved


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
                       *, handle_signals: bool = True) -> RunSummary:
    """Run until ``stop`` is set, a signal arrives or ``settings.duration`` elapses."""
    started = time.monotonic()
    stop = stop or trio.Event()
    assert settings.tags is not None
    tag_list = read_tags_file(settings.tags, settings.server)
    if tag_list.duplicates:
        log.warning("tags_duplicated", count=len(tag_list.duplicates),
                    first=[f"line {d.line}: {d.path}" for d in tag_list.duplicates[:5]])
    paths = [t.path for t in tag_list.tags]
    headers: dict[str, str] = {}
    if settings.username:
        if settings.password is None:
            raise ConfigError("--username given without a password: set PISTREAM_PASSWORD "
                              "(or password in the config file)")
        headers.update(basic_header(settings.username, settings.password))

    sink = DeltaSink(settings.table, settings.app_id or default_app_id(), settings.storage_options)
    async with trio.open_nursery() as root:
        if handle_signals:
            await root.start(watch_signals, stop)
        url = settings.url
        if settings.simulate:
            url = await _start_simulator(root, paths, settings)
        assert url is not None
        await trio.to_thread.run_sync(sink.open)
        async with PiWebApi(url, headers=headers, max_url_length=settings.max_url_length) as api:
            resolved = await resolve_tags(api, paths, settings.skip_unknown)
        streams = {t.webid: StreamInfo(t.path, t.webid, t.uom) for t in resolved}
        shards = shard_webids(url, list(streams), settings.max_url_length)
        log.info("tags_resolved", tags=len(resolved), channels=len(shards), table=sink.display_uri,
                 seconds=round(time.monotonic() - started, 3))

        message_send, message_recv = trio.open_memory_channel[tuple[int, StreamSetMessage]](READER_QUEUE)
        flush_send, flush_recv = trio.open_memory_channel[Flush](1)
        flusher = Flusher(ColumnBuffer(streams), message_recv, flush_send,
                          max_rows=settings.flush_rows, max_age=settings.flush_seconds)
        writer = CommitWriter(sink, flush_recv)
        readers = [
            ChannelReader(f"channel-{i}", url, shard, message_send.clone(), headers=headers,
                          heartbeat_rate=settings.heartbeat_rate,
                          include_initial_values=settings.include_initial_values)
            for i, shard in enumerate(shards)
        ]
        message_send.close()  # each reader owns a clone; the flusher ends when the last one closes
        async with trio.open_nursery() as flow:
            await flow.start(writer.run)
            await flow.start(flusher.run)
            flow.start_soon(_run_readers, readers, stop, settings.duration)
        root.cancel_scope.cancel()  # the simulator and the signal watcher

    summary = RunSummary(
        tags=len(resolved),
        channels=len(shards),
        values_received=flusher.stats.values_received,
        values_written=writer.stats.values_written,
        repeats_dropped=flusher.stats.repeats_dropped,
        rejected=flusher.stats.rejected,
        commits=writer.stats.commits,
        elapsed=round(time.monotonic() - started, 3),
    )
    log.info("pistream_stopped", **summary.__dict__)
    return summary


async def _run_readers(readers: list[ChannelReader], stop: trio.Event, duration: float | None) -> None:
    """Run every reader until stop or duration; closing their channel ends lets the flusher finish."""
    async with trio.open_nursery() as nursery:
        for reader in readers:
            await nursery.start(reader.run)
        if duration is not None:
            with trio.move_on_after(duration):
                await stop.wait()
        else:
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

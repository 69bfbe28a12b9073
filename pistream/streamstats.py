"""One ``stream_stats`` log line every ``interval`` seconds: how fast values arrive and land, what waits in
memory, how far the table is behind, how the channels fare. An operator tailing the log of a process that
runs for weeks sees at a glance whether it keeps up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog
import trio

from .lake.writer import CommitWriter
from .pi.channel import ChannelReader
from .pi.gapfill import GapFiller
from .pi.subscriptions import Subscriptions
from .stream.flusher import Flusher

log = structlog.get_logger(__name__)


class BackfillView(Protocol):
    """The history read behind the live stream (``--backfill``): its counters, by their stats names."""

    def snapshot(self) -> dict[str, object]: ...


class StatsReporter:
    """Reads the counters the pipeline's parts keep; never blocks them."""

    def __init__(self, interval: float, flusher: Flusher, writer: CommitWriter, readers: Sequence[ChannelReader],
                 gap_filler: GapFiller, *, subscriptions: Subscriptions | None = None,
                 backfill: BackfillView | None = None):
        self.interval = interval
        self.flusher = flusher
        self.writer = writer
        self.readers = readers  # live: ``subscriptions`` changes the list in place
        self.gap_filler = gap_filler
        self.subscriptions = subscriptions  # for the counters of readers closed by tag set changes
        self.backfill = backfill
        self.started_at: float | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last_at = self.started_at = trio.current_time()
        last_received = self.flusher.stats.values_received
        last_written = self.writer.stats.values_written
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            received = self.flusher.stats.values_received
            written = self.writer.stats.values_written
            log.info("stream_stats", **self.snapshot(now, (received - last_received) / (now - last_at),
                                                     (written - last_written) / (now - last_at)))
            last_at, last_received, last_written = now, received, written

    def snapshot(self, now: float, received_per_s: float, written_per_s: float) -> dict[str, object]:
        writer = self.writer.stats
        buffered = len(self.flusher.buffer)
        waiting = buffered > 0 or self.flusher.stats.flushes > writer.commits  # a batch is being committed
        caught_up = writer.last_commit_at if writer.last_commit_at is not None else self.started_at
        since_commit = now - caught_up if caught_up is not None else None
        return {
            **(self.backfill.snapshot() if self.backfill is not None else {}),
            "values_per_s": round(received_per_s, 1),
            "written_per_s": round(written_per_s, 1),
            "values_received": self.flusher.stats.values_received,
            "values_written": writer.values_written,
            "buffer_rows": buffered,
            "buffer_bytes": self.flusher.buffer.nbytes,
            # Seconds since the table last caught up, while values wait for a commit (0 when none wait).
            "lag_s": round(since_commit, 1) if waiting and since_commit is not None else 0.0,
            "commits": writer.commits,
            "failed_commits": writer.failed_attempts,
            # Seconds the batch being committed has been at it, retries included: a hung storage shows here.
            "commit_in_flight_s": round(self.writer.in_flight_seconds(now), 1),
            "mean_commit_s": round(writer.commit_seconds / writer.commits, 3) if writer.commits else None,
            "tags": sum(len(r.webids) for r in self.readers),
            "channels_live": sum(r.connected for r in self.readers),
            "channels": len(self.readers),
            "reconnects": self.subscriptions.reconnects if self.subscriptions is not None else
            sum(max(r.stats.connects - 1, 0) for r in self.readers),
            "gaps_filled": self.gap_filler.stats.gaps,
            "gaps_lost": self.gap_filler.stats.lost_gaps,
            # Bad input, skipped and counted (each also logged): frames that did not decode, values without
            # a usable timestamp (counted as their batch is taken), values of WebIds no channel subscribed to.
            "frames_malformed": frames_malformed(self.flusher, self.readers),
            "values_rejected": self.flusher.stats.rejected,
            "values_unsubscribed": self.flusher.buffer.unsubscribed.values,
        }


def frames_malformed(flusher: Flusher, readers: Sequence[ChannelReader]) -> int:
    """Channel frames that did not decode: small ones in the readers, raw ones in the buffer or flusher."""
    return flusher.buffer.malformed + sum(r.stats.malformed for r in readers)

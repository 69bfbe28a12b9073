"""What a person sees while a backfill runs: on a terminal a tqdm progress bar (share of the tags' time
ranges read, with ETA; tags done, values and values/s beside it), otherwise a JSON progress line (a log
event) every ``interval`` seconds, for a service's log or a CI job.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import structlog
import trio

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Snapshot:
    fraction: float  # of every tag's time range read, 0..1
    tags_done: int
    tags: int
    values: int


class ProgressView:
    """Polls ``snapshot`` and shows it until cancelled; ``close`` leaves the bar at its last state."""

    def __init__(self, snapshot: Callable[[], Snapshot], *, stream: TextIO | None = None,
                 interval: float = 5.0, bar: bool | None = None):
        self.snapshot = snapshot
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.interval = interval
        self._started = time.monotonic()
        self._values_at_start: int | None = None
        self._tqdm: Any = None  # a tqdm bar, made at the first show

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                self.show()
                await trio.sleep(0.5 if self.bar else self.interval)
        finally:
            self.close()

    def show(self) -> None:
        snap = self.snapshot()
        if self._values_at_start is None:
            self._values_at_start = snap.values  # values of an earlier run (a resume) do not count for the rate
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (snap.values - self._values_at_start) / elapsed
        if self.bar:
            self._show_bar(snap, rate)
            return
        eta = None
        if 0 < snap.fraction < 1:
            eta = round(elapsed * (1 - snap.fraction) / snap.fraction)  # rough: from this run's share
        log.info("backfill_progress", percent=round(100 * snap.fraction, 2), tags_done=snap.tags_done,
                 tags=snap.tags, values=snap.values, values_per_s=round(rate), eta_seconds=eta)

    def _show_bar(self, snap: Snapshot, rate: float) -> None:
        if self._tqdm is None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=100.0, unit="%", file=self.stream, dynamic_ncols=True, desc="backfill",
                              bar_format="{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
        bar = self._tqdm
        bar.n = round(100 * snap.fraction, 3)
        bar.set_postfix_str(f"tags {snap.tags_done}/{snap.tags}, {snap.values:,} values, {rate:,.0f} values/s",
                            refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._tqdm is not None:
            self.show()
            self._tqdm.close()
            self._tqdm = None

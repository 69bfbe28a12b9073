"""Prometheus ``/metrics`` and ``/healthz`` on a loopback port, for the operator's scraper and probe.

The numbers come from :meth:`StatsReporter.snapshot` (the counters the pipeline's parts keep); the text
exposition format 0.0.4 is rendered here (no prometheus-client dependency). One HTTP/1.1 request per
connection over h11, answered with ``Connection: close``; every request is bounded in size and time, and a
bad client never reaches the pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import h11
import structlog
import trio

from .streamstats import StatsReporter

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COMMIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 32


class Histogram:
    """Cumulative fixed-bucket histogram (Prometheus semantics: ``le`` buckets, ``_sum``, ``_count``)."""

    def __init__(self, buckets: Sequence[float] = COMMIT_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.sum)}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# (snapshot key, metric name, type, help)
_FROM_SNAPSHOT = (
    ("values_received", "pistream_values_received_total", "counter", "PI values received from the channels."),
    ("values_written", "pistream_values_written_total", "counter", "Values committed to the Delta table."),
    ("commits", "pistream_commits_total", "counter", "Delta commits that landed."),
    ("failed_commits", "pistream_commit_failures_total", "counter", "Commit attempts that failed (retried)."),
    ("commit_in_flight_s", "pistream_commit_in_flight_seconds", "gauge",
     "Seconds the batch being committed has been in flight, retries included (0 when none is)."),
    ("buffer_rows", "pistream_buffer_rows", "gauge", "Rows waiting in the in-memory buffer."),
    ("buffer_bytes", "pistream_buffer_bytes", "gauge", "Bytes held by the in-memory buffer."),
    ("lag_s", "pistream_lag_seconds", "gauge",
     "Seconds since the table last caught up, while values wait for a commit (0 when none wait)."),
    ("tags", "pistream_tags", "gauge", "Tags subscribed now (listed or matched by a mask, and found)."),
    ("channels", "pistream_channels", "gauge", "WebSocket channels the tags are sharded over."),
    ("channels_live", "pistream_channels_live", "gauge", "Channels connected and being read."),
    ("reconnects", "pistream_reconnects_total", "counter", "Channel reconnects."),
    ("gaps_filled", "pistream_gaps_filled_total", "counter", "Gaps read back from the PI archive."),
    ("gaps_lost", "pistream_gaps_lost_total", "counter", "Gaps that could not be read back (data loss)."),
    ("frames_malformed", "pistream_frames_malformed_total", "counter",
     "Channel frames that could not be decoded: skipped and logged (frame_malformed)."),
    ("values_rejected", "pistream_values_rejected_total", "counter",
     "Values without a usable timestamp: not written, logged (value_rejected)."),
    ("values_unsubscribed", "pistream_values_unsubscribed_total", "counter",
     "Values under a WebId no channel of this process subscribed to: not written (values_unsubscribed)."),
    # --backfill only: the history read behind the live stream
    ("backfill_tags", "pistream_backfill_tags", "gauge", "Subscribed tags whose history --backfill reads."),
    ("backfill_tags_done", "pistream_backfill_tags_done", "gauge",
     "Of those, tags whose history is read to their first live value and committed."),
    ("backfill_values_read", "pistream_backfill_values_read", "gauge",
     "History values committed by --backfill for the subscribed tags, in all runs."),
    ("backfill_values_written", "pistream_backfill_values_total", "counter",
     "History values committed by --backfill in this run."),
    ("backfill_failed_tags", "pistream_backfill_failed_tags", "gauge",
     "Tags whose history read failed in this run (the next start resumes them)."),
)


@dataclass
class StartupStatus:
    """What the start-up is doing, for ``/healthz`` and ``/metrics`` before the pipeline runs: the step, and
    the failure it retries (PI Web API or the table's storage not answering yet), if any."""

    step: str = "starting"
    error: str | None = None  # the last failure, retried
    attempts: int = 0  # failed attempts of this step
    retry_in: float | None = None

    def describe(self) -> str:
        if self.error is None:
            return f"starting: {self.step}"
        retry = f", next try in {self.retry_in:.0f} s" if self.retry_in is not None else ""
        return f"starting: {self.step} failed {self.attempts} times ({self.error}){retry}"


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` from a :class:`StatsReporter`'s view of the pipeline.

    Started before the pipeline's parts exist (``stats`` None): until ``attach`` it reports the ``startup``
    status, and ``/healthz`` answers 503 "starting: ...". ``stale_after``: seconds values may wait for a commit
    before ``/healthz`` fails (a quiet stream with nothing to commit stays healthy); ``startup_grace``: seconds
    after start before the first commit is required; ``in_flight_limit``: seconds one batch may be in flight
    (a commit that hangs) before ``/healthz`` fails, naming ``storage``; ``credential_expiry``: returns the
    epoch seconds at which the table's vended credentials expire, or None when unknown.
    """

    def __init__(self, stats: StatsReporter | None = None, *, port: int = 0, host: str = "127.0.0.1",
                 stale_after: float = 60.0, startup_grace: float | None = None, in_flight_limit: float = 30.0,
                 storage: str = "the table's storage",
                 credential_expiry: Callable[[], float | None] | None = None,
                 read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        self.stats = stats
        self.startup = StartupStatus()
        self.host = host
        self.port = port  # the bound port once started (port 0 picks a free one)
        self.stale_after = stale_after
        self.startup_grace = stale_after if startup_grace is None else startup_grace
        self.in_flight_limit = in_flight_limit
        self.storage = storage
        self.credential_expiry = credential_expiry
        self.read_timeout = read_timeout
        self.commit_duration = Histogram()
        self._limiter = trio.CapacityLimiter(max_connections)
        self._started_at: float | None = None

    def attach(self, stats: StatsReporter, *, storage: str | None = None,
               credential_expiry: Callable[[], float | None] | None = None) -> None:
        """The pipeline runs: report its parts from now on (the start-up grace counts from here)."""
        self.stats = stats
        if stats.started_at is None:  # the periodic stats line may be off
            stats.started_at = trio.current_time()
        if storage is not None:
            self.storage = storage
        if credential_expiry is not None:
            self.credential_expiry = credential_expiry

    def observe_commit(self, seconds: float) -> None:
        """Hook for the commit writer: one call per commit that landed, with its duration."""
        self.commit_duration.observe(seconds)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        self._started_at = trio.current_time()
        if self.stats is not None and self.stats.started_at is None:  # the periodic stats line may be off
            self.stats.started_at = self._started_at
        log.info("metrics_served", url=f"http://{self.host}:{self.port}/metrics")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    # -- content

    def render_metrics(self) -> str:
        now = trio.current_time()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples))

        metric("pistream_up", "gauge", "1 while the process runs.", ["pistream_up 1"])
        metric("pistream_starting", "gauge", "1 while the start-up (tags, table) is not done, e.g. retrying.",
               [f"pistream_starting {0 if self.stats is not None else 1}"])
        if self.stats is None:
            metric("pistream_start_failures", "gauge", "Failed attempts of the start-up step being retried.",
                   [f"pistream_start_failures {self.startup.attempts}"])
            return "\n".join(lines) + "\n"
        snap = self.stats.snapshot(now, 0.0, 0.0)
        for key, name, kind, help_ in _FROM_SNAPSHOT:
            value = snap.get(key)
            if isinstance(value, int | float):
                metric(name, kind, help_, [f"{name} {_number(value)}"])
        metric("pistream_commit_duration_seconds", "histogram", "Duration of commits that landed.",
               self.commit_duration.render("pistream_commit_duration_seconds"))
        last = self.stats.writer.stats.last_commit_at
        if last is not None:
            metric("pistream_last_commit_age_seconds", "gauge", "Seconds since the last commit landed.",
                   [f"pistream_last_commit_age_seconds {_number(round(now - last, 3))}"])
        expires = self.credential_expiry() if self.credential_expiry is not None else None
        if expires is not None:
            metric("pistream_credential_expiry_seconds", "gauge",
                   "Seconds until the table's vended cloud credentials expire.",
                   [f"pistream_credential_expiry_seconds {_number(round(expires - time.time(), 3))}"])
        return "\n".join(lines) + "\n"

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): every channel live, and values that wait are committed within ``stale_after``
        (``startup_grace`` before the first commit)."""
        if self.stats is None:
            return (False, self.startup.describe())
        now = trio.current_time()
        snap = self.stats.snapshot(now, 0.0, 0.0)
        problems = []
        in_flight = self.stats.writer.in_flight_seconds(now)
        if in_flight > self.in_flight_limit:
            problems.append(f"commit to {self.storage} in flight for {in_flight:.0f} s (storage not answering?)")
        channels, live = int(snap["channels"]), int(snap["channels_live"])  # type: ignore[call-overload]
        if live < channels:
            problems.append(f"{channels - live} of {channels} channels down")
        # A quiet stream (nothing buffered, nothing being committed) needs no commit: only waiting values count.
        waiting = float(snap["lag_s"])  # type: ignore[arg-type]
        last = self.stats.writer.stats.last_commit_at
        if last is None and waiting > self.startup_grace:
            problems.append(f"no commit in {waiting:.0f} s since start (storage stalled?)")
        elif last is not None and waiting > self.stale_after:
            problems.append(f"no commit for {now - last:.0f} s (storage stalled?)")
        return (not problems, "; ".join(problems) or "ok")

    # -- HTTP

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with self._limiter:
            try:
                await self._serve_one(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
                pass
            except Exception as exc:  # a bad client must never take the pipeline down
                log.warning("metrics_request_failed", error=repr(exc))
            finally:
                await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        with trio.fail_after(self.read_timeout):
            try:
                request = await self._read_request(stream, conn)
            except h11.RemoteProtocolError:
                await self._send_raw(stream, 400, "bad request\n")
                return
        if request is None:
            return
        if request.method not in (b"GET", b"HEAD"):
            status, body, ctype = 405, "method not allowed\n", "text/plain; charset=utf-8"
        elif request.target.split(b"?", 1)[0] == b"/metrics":
            status, body, ctype = 200, self.render_metrics(), CONTENT_TYPE
        elif request.target.split(b"?", 1)[0] == b"/healthz":
            healthy, reason = self.health()
            status, body, ctype = (200 if healthy else 503), reason + "\n", "text/plain; charset=utf-8"
        else:
            status, body, ctype = 404, "not found\n", "text/plain; charset=utf-8"
        payload = body.encode()
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))), ("Connection", "close")]
        with trio.fail_after(self.read_timeout):
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if request.method != b"HEAD":
                out = (out or b"") + (conn.send(h11.Data(data=payload)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(out)

    @staticmethod
    async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
        received = 0
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                received += len(data)
                if received > MAX_REQUEST_BYTES:  # h11 bounds only an incomplete head; this bounds any
                    raise h11.RemoteProtocolError("request too large", error_status_hint=431)
                conn.receive_data(data)
                if not data:
                    if conn.their_state is h11.IDLE:
                        return None  # connected and closed without a request
                continue
            return None  # ConnectionClosed or anything unexpected

    async def _send_raw(self, stream: trio.SocketStream, status: int, body: str) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")  # lets h11 answer a request it could not parse
        conn.next_event()
        payload = body.encode()
        out = conn.send(h11.Response(status_code=status, headers=[
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(payload))),
            ("Connection", "close")])) or b""
        out += conn.send(h11.Data(data=payload)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)

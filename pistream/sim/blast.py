r"""A load generator for benchmarks: the simulator's REST API plus channels that push pre-encoded frames.

    python -m pistream.sim.blast --tags 10000 --frames 200 --port 0          # as fast as the client reads
    python -m pistream.sim.blast --tags 100000 --frames 600 --interval 1.0   # one frame per second

The first line on stdout is the base URL (``http://127.0.0.1:PORT/piwebapi``); on SIGINT/SIGTERM (or after
``--max-seconds``) the server stops and prints one JSON line of statistics (frames and values sent,
connections, its own CPU seconds), so a benchmark can show that the server was not the bottleneck.

REST (landing page, ``points/multiple``, ``streamsets/recorded``, ...) is the regular simulator's
``RestApi`` over ``SimModel.generated(tags)``, so tag resolution and gap fills work as usual. Channels are
different: each ``streamsets/channel`` connection sends exactly ``--frames`` messages, each holding one
value for every subscribed stream (the first doubles as the initial value), then only a heartbeat per
second until the client leaves. A frame costs the server one ``bytes.replace`` of a timestamp placeholder
in a template built once per connection (a few variants, so values differ from frame to frame), so the
client, not the server, sets the pace. Timestamps rise by ``--period-us`` per frame (blast mode, ending
about now) or are the wall-clock time of the send (paced mode, ``--interval``), so no value repeats
another and the exactly-once filter drops nothing. ``--late`` (blast mode) sends the newest frame first, as
a channel's current value, and then the others in time order: every value after the first frame is older
than what the channel already delivered for its tag (a late burst: a recalculation, a buffer flushed after
an outage), the same values as without it.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import trio

from pistream.sim.channel import ChannelSpec
from pistream.sim.connection import HttpRequest, HttpResponse, serve_connection
from pistream.sim.model import SimModel, SimTag
from pistream.sim.payloads import ENCODER, StreamValues, TimedValue
from pistream.sim.rest import Reply, RestApi
from pistream.sim.server import _bind, is_loopback
from pistream.sim.websocket import HandshakeError, ServerWebSocket, WebSocketClosed, text_frame

# A fixed-width stand-in for "YYYY-MM-DDTHH:MM:SS.ffffffZ", replaced in every frame.
PLACEHOLDER = "#" * 27
_PLACEHOLDER_BYTES = PLACEHOLDER.encode()
_HEARTBEAT = text_frame(b'{"Links":{},"Items":[]}')
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
VARIANTS = 8  # value variants per stream: frame k carries variant k % VARIANTS
IDLE_HEARTBEAT = 1.0  # seconds between heartbeats once the frames are sent
MAX_LIFETIME = 3600.0


def wire_timestamp(us: int) -> str:
    """Always 6 fractional digits, so that it fits the placeholder."""
    text = (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(text) == len(PLACEHOLDER)
    return text


def stream_fragment(model: SimModel, tag: SimTag, variant: int) -> bytes:
    """One stream of a channel message with one value whose timestamp is the placeholder."""
    event = model.event(tag, variant)
    units = tag.units
    value = TimedValue(PLACEHOLDER, event.value, units, event.good, event.questionable, event.substituted,
                       event.annotated)
    return ENCODER.encode(StreamValues(tag.webid, tag.name, tag.path, {}, units, [value]))


def frame_templates(model: SimModel, tags: tuple[SimTag, ...], variants: int = VARIANTS) -> list[bytes]:
    """Whole channel messages, one per value variant, with placeholders for the timestamp."""
    return [
        b'{"Links":{},"Items":[' + b",".join(stream_fragment(model, t, v) for t in tags) + b"]}"
        for v in range(variants)
    ]


@dataclass
class BlastStats:
    connections: int = 0
    frames_sent: int = 0
    values_sent: int = 0
    heartbeats_sent: int = 0
    connections_finished: int = 0  # sent all their frames


class BlastServer:
    """The ``HttpApp`` of the blast server: REST from ``RestApi``, channels from templates."""

    def __init__(self, model: SimModel, *, frames: int, interval: float | None = None,
                 period_us: int = 1_000_000, host: str = "127.0.0.1", port: int = 0, late: bool = False) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if late and interval is not None:
            raise ValueError("late applies to blast mode (no interval)")
        self.late = late
        self.model = model
        self.frames = frames
        self.interval = interval
        self.period_us = period_us
        self.host = host
        self.port = port
        self.api = RestApi(model, self.now_us)
        self.stats = BlastStats()
        # Blast mode: frame k is at base + k * period, the last one about now (within today, so that
        # one commit writes one partition).
        now = self.now_us()
        midnight = now - now % 86_400_000_000
        self.base_us = max(midnight, now - frames * period_us)

    @staticmethod
    def now_us() -> int:
        return time.time_ns() // 1000

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/piwebapi"

    async def run(self, *, task_status: trio.TaskStatus[BlastServer] = trio.TASK_STATUS_IGNORED) -> None:
        listener = await _bind(self.host, self.port)
        self.port = listener.socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve_stream, [listener])

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream, self)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    def _encode(reply: Reply) -> HttpResponse:
        return HttpResponse(reply.status, ENCODER.encode(reply.content), list(reply.headers))

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        base = f"http://{request.headers.get('host') or f'{self.host}:{self.port}'}/piwebapi"
        return self._encode(self.api.handle(request.method, request.target, request.body, request.headers, base))

    async def handle_upgrade(self, request: HttpRequest, stream: trio.abc.Stream, trailing: bytes
                             ) -> HttpResponse | None:
        spec = self.api.channel_spec(request.target)
        if isinstance(spec, Reply):
            return self._encode(spec)
        ws = ServerWebSocket(stream)
        try:
            await ws.accept(request.head, trailing)
        except HandshakeError as exc:
            return HttpResponse.error(400, f"Invalid WebSocket handshake: {exc}")
        self.stats.connections += 1
        try:
            async with trio.open_nursery() as nursery:

                async def read_then_stop() -> None:
                    await ws.run_reader()  # answers pings and the close handshake
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read_then_stop)
                try:
                    await self._pump(spec, ws)
                except WebSocketClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            await ws.aclose(1001)
        return None

    async def _pump(self, spec: ChannelSpec, ws: ServerWebSocket) -> None:
        templates = frame_templates(self.model, spec.tags, min(VARIANTS, self.frames))
        streams = len(spec.tags)
        next_tick = trio.current_time()
        order = [self.frames - 1, *range(self.frames - 1)] if self.late else range(self.frames)
        for k in order:
            if self.interval is not None:
                await trio.sleep_until(next_tick)
                next_tick = max(next_tick + self.interval, trio.current_time())
                ts_us = self.now_us()
            else:
                ts_us = self.base_us + k * self.period_us
            frame = text_frame(templates[k % len(templates)].replace(_PLACEHOLDER_BYTES,
                                                                     wire_timestamp(ts_us).encode()))
            await ws.send_frame(frame)
            self.stats.frames_sent += 1
            self.stats.values_sent += streams
        self.stats.connections_finished += 1
        while True:  # keep the channel alive (the client's read timeout) until the client leaves
            await trio.sleep(IDLE_HEARTBEAT)
            await ws.send_frame(_HEARTBEAT)
            self.stats.heartbeats_sent += 1


async def serve(args: argparse.Namespace) -> BlastStats:
    model = SimModel.generated(args.tags, rate=1.0)
    server = BlastServer(model, frames=args.frames, interval=args.interval, period_us=args.period_us,
                         host=args.host, port=args.port, late=args.late)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            print(server.url, flush=True)
            with trio.move_on_after(args.max_seconds):
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
    return server.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pistream.sim.blast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=1000, help="generated tags \\\\SIMSRV\\SIM000000...")
    parser.add_argument("--frames", type=int, default=100, help="messages per channel connection")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between frames (paced); default: as fast as the client reads")
    parser.add_argument("--period-us", type=int, default=1_000_000, help="event spacing in blast mode")
    parser.add_argument("--late", action="store_true",
                        help="the newest frame first, then the rest in time order: a late burst")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=MAX_LIFETIME, help="stop after this long")
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        parser.error(f"{args.host} is not a loopback address")
    if args.late and args.interval is not None:
        parser.error("--late sends as fast as the client reads: leave out --interval")
    if args.tags < 1 or args.frames < 1:
        parser.error("--tags and --frames must be >= 1")
    started = time.monotonic()
    stats = trio.run(serve, args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {**asdict(stats), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
              "wall_s": round(time.monotonic() - started, 3), "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    try:
        print(json.dumps(report), flush=True)
    except BrokenPipeError:  # nobody reads the statistics any more
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

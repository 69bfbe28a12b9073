"""The benchmark scenarios. Each runs in a fresh worker process (``python -m benchmarks.worker NAME``) so that
its peak RSS and CPU are its own, starts the blast server (``pistream.sim.blast``) in another process, and
returns a flat dict of figures. Heavy imports happen inside the functions.

Figure names end in their unit; ``benchmarks.run`` knows which direction is better from the suffix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    LogCapture,
    Sampler,
    blast_server,
    commit_rows,
    peak_rss_mb,
    percentile,
    received_span,
    round_figures,
    slope_per_minute,
    tag_paths,
    write_tags_file,
)

# Sizes: (full, quick). Quick runs every scenario small enough for a smoke test well under 2 minutes.
SIZES: dict[str, dict[str, tuple[Any, Any]]] = {
    "ceiling": {"tags": (10_000, 10_000), "frames": (500, 10)},
    "throughput": {"tags": (10_000, 10_000), "frames": (500, 10)},
    "naive": {"tags": (10_000, 10_000), "frames": (500, 10)},
    "latency": {"tags": (10_000, 10_000), "interval": (0.2, 0.2), "duration": (60.0, 6.0)},
    # each of its two runs (plain, then with --backfill); the history (10,000 tags x DURATION at 1 value/s:
    # 72 M values in 2 h) is more than either run reads, so the backfill runs behind the live stream throughout
    "latency_backfill": {"tags": (10_000, 10_000), "interval": (0.2, 0.2), "duration": (60.0, 3.0),
                         "backfill": ("2h", "2h")},
    "memory": {"tags": (100_000, 20_000), "interval": (1.0, 1.0), "duration": (180.0, 20.0)},
    "startup": {"tags": (100_000, 20_000)},
    "restart": {"tags": (100_000, 20_000), "first": (20.0, 6.0), "downtime": (5.0, 1.0), "duration": (90.0, 20.0)},
    "backfill": {"tags": (1_000, 200), "minutes": (30, 10)},
    # 10,000 tags x 864 s at 1 value/s = 8.64 M values: the 10,000 tags x 1 day at one value per 10 s
    # in count and in values per tag per call (the blast server's model ticks once a second). The naive
    # backfill (a commit per tag) runs on the first ``naive_tags`` only: its rate is per value.
    "history": {"tags": (10_000, 1_000), "seconds": (864, 300), "naive_tags": (300, 50)},
    "firehose": {"tags": (1_000, 200), "frames": (1_000, 1_000), "paced_interval": (0.007, 0.007)},
    "late": {"tags": (1_000, 200), "frames": (500, 500)},
}
# Bounds the wait for the last partial batch: at most ~4 % of a full run (5 M values, ~6 s); at 200 frames
# and 0.5 s, the tail was up to 20 % of the window once runs took 2.5 s.
THROUGHPUT_FLUSH_SECONDS = 0.25
RUN_TIMEOUT = 300.0  # no scenario waits longer than this for its values


def size(name: str, quick: bool) -> dict[str, Any]:
    return {key: pair[1 if quick else 0] for key, pair in SIZES[name].items()}


def _settings(workdir: Path, url: str, tags: int, **extra: Any):
    from pistream.config import build_settings

    tags_file = write_tags_file(workdir / "tags.txt", tags)
    values = {"tags": str(tags_file), "url": url, "table": str(workdir / "table"),
              "state_dir": str(workdir / "state"), "app_id": "bench", "log_level": "info", **extra}
    return build_settings({}, values)


def _per_million(cpu_s: float, values: int) -> float | None:
    return cpu_s / values * 1e6 if values else None


# -- ceiling -----------------------------------------------------------------------------------------------

def ceiling(quick: bool) -> dict[str, Any]:
    """Receive + decode only: pistream's WebSocket client with its buffer sizes and ``channel_decoder``
    (msgspec), on the same channel URLs (shards) the pipeline opens. The practical limit of any pipeline
    here that decodes the messages."""
    from urllib.parse import urlsplit

    import trio

    from pistream.pi.channel import RECEIVE_BUFFER_SIZE, channel_url, message_limit, shard_webids
    from pistream.pi.messages import channel_decoder
    from pistream.pi.webid import path_webid
    from pistream.pi.websocket import connect

    p = size("ceiling", quick)
    webids = [path_webid(path) for path in tag_paths(p["tags"])]
    received = {"values": 0, "frames": 0, "first": 0.0, "last": 0.0}

    async def read(url: str, frames: int, tags: int) -> None:
        parts = urlsplit(url)
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            ws = await connect(stream, parts.netloc, f"{parts.path}?{parts.query}", [],
                               max_message_size=message_limit(tags), receive_buffer_size=RECEIVE_BUFFER_SIZE)
            for _ in range(frames):
                with trio.fail_after(60):
                    frame = await ws.get_message()
                if not received["first"]:
                    received["first"] = time.time()
                message = channel_decoder.decode(frame)
                received["values"] += sum(len(s.timed_values()) for s in message.items or ())
                received["frames"] += 1
            received["last"] = time.time()

    with blast_server(p["tags"], p["frames"]) as blast, Sampler(other_pid=blast.process.pid) as sampler:
        shards = shard_webids(blast.url, webids, 6000)
        urls = [(channel_url(blast.url, s, include_initial_values=True, heartbeat_rate=5), len(s)) for s in shards]

        async def main() -> None:
            with trio.fail_after(RUN_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for url, tags in urls:
                        nursery.start_soon(read, url, p["frames"], tags)

        trio.run(main)
    window = received["last"] - received["first"]
    values = received["values"]
    return round_figures({
        "tags": p["tags"], "channels": len(urls), "values": values,
        "values_per_s": values / window,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(received["first"], received["last"]), values),
        "peak_rss_MB": peak_rss_mb(),
        "server_cpu_share": sampler.other_share(received["first"], received["last"]),
        "complete": values == p["tags"] * p["frames"],
    })


# -- throughput (the real pipeline) -----------------------------------------------------------------------

class _StopEvent:
    """A ``trio.Event`` that is truthy. Up to 3bab1ca ``run_pipeline`` did ``stop = stop or trio.Event()``,
    and a Trio Event refuses ``bool()``; the wrapper keeps older commits measurable."""

    def __init__(self) -> None:
        import trio

        self._event = trio.Event()

    def __bool__(self) -> bool:
        return True

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


def _run_pipeline(settings: Any, capture: LogCapture, *, until_rows: int | None, timeout: float,
                  on_started: Callable[[], None] | None = None) -> tuple[Any, float]:
    """``run_pipeline`` in this process until ``until_rows`` are committed (or its duration ends). Returns
    its summary and the process's peak RSS when it ended: reading the table back afterwards (the scenario's
    own analysis, in this process) would otherwise count as pistream's memory."""
    import trio

    from pistream.pipeline import run_pipeline

    async def main() -> Any:
        stop = _StopEvent()
        async with trio.open_nursery() as nursery:
            if until_rows is not None:
                async def watch() -> None:
                    with trio.move_on_after(timeout):
                        while capture.committed_rows() < until_rows:  # noqa: ASYNC110 - a counter of logs
                            await trio.sleep(0.02)
                    stop.set()
                nursery.start_soon(watch)
            summary = await run_pipeline(settings, stop, handle_signals=False)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
        return summary

    summary = trio.run(main)
    return summary, peak_rss_mb()


def throughput(quick: bool) -> dict[str, Any]:
    """10,000 tags, the blast server sending as fast as pistream reads, through ``run_pipeline`` into a
    local table: values committed / (last commit - first value received)."""
    p = size("throughput", quick)
    expected = p["tags"] * p["frames"]
    capture = LogCapture().install()
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        with blast_server(p["tags"], p["frames"]) as blast, \
                Sampler(other_pid=blast.process.pid) as sampler:
            settings = _settings(workdir, blast.url, p["tags"], flush_seconds=THROUGHPUT_FLUSH_SECONDS)
            summary, peak_rss = _run_pipeline(settings, capture, until_rows=expected, timeout=RUN_TIMEOUT)
        rows, first, _, last_commit = received_span(workdir / "table")
    window = last_commit - first
    commits = capture.named("batch_committed")
    resolved = capture.named("tags_resolved")
    return round_figures({
        "tags": p["tags"], "channels": summary.channels, "values": rows,
        "values_per_s": rows / window,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(first, last_commit), rows),
        "peak_rss_MB": peak_rss,
        "commits": len(commits),
        "mean_commit_s": sum(e["seconds"] for _, e in commits) / len(commits) if commits else None,
        "resolve_s": resolved[0][1]["seconds"] if resolved else None,
        "server_cpu_share": sampler.other_share(last_commit - window, last_commit),
        "complete": rows == expected,
    })


# -- naive ------------------------------------------------------------------------------------------------

NAIVE_FLUSH_ROWS = 100_000


def naive(quick: bool) -> dict[str, Any]:
    """What a user would write: asyncio + websockets (default buffers), ``json.loads``, a dict per value,
    ``pa.Table.from_pylist`` and ``write_deltalake`` to a path per flush, on the event loop."""
    import asyncio
    import json
    from datetime import UTC, datetime

    import pyarrow as pa
    import websockets
    from deltalake import write_deltalake

    from pistream.pi.channel import channel_url, shard_webids
    from pistream.pi.webid import path_webid

    p = size("naive", quick)
    expected = p["tags"] * p["frames"]
    webids = [path_webid(path) for path in tag_paths(p["tags"])]
    paths = dict(zip(webids, tag_paths(p["tags"]), strict=True))
    state: dict[str, Any] = {"first": 0.0, "last_commit": 0.0, "written": 0, "commits": 0}
    rows: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        table = os.path.join(tmp, "table")

        def flush() -> None:
            if not rows:
                return
            data = pa.Table.from_pylist(rows)
            write_deltalake(table, data, mode="append", partition_by=["partition_date"])
            state["written"] += len(rows)
            state["commits"] += 1
            state["last_commit"] = time.time()
            rows.clear()

        async def read(url: str, frames: int) -> None:
            async with websockets.connect(url, max_size=2**29) as ws:
                for _ in range(frames):
                    message = await asyncio.wait_for(ws.recv(), 60)
                    received = datetime.now(UTC)
                    if not state["first"]:
                        state["first"] = time.time()
                    for stream in json.loads(message)["Items"]:
                        for item in stream["Items"]:
                            value = item["Value"]
                            ts = datetime.fromisoformat(item["Timestamp"])
                            row = {
                                "tag": paths.get(stream["WebId"], stream.get("Path")),
                                "tag_webid": stream["WebId"],
                                "timestamp": ts,
                                "value": float(value) if isinstance(value, int | float) else None,
                                "value_text": value["Name"] if isinstance(value, dict)
                                else value if isinstance(value, str) else None,
                                "uom": item.get("UnitsAbbreviation"),
                                "good": item.get("Good"),
                                "questionable": item.get("Questionable"),
                                "substituted": item.get("Substituted"),
                                "annotated": item.get("Annotated"),
                                "received_timestamp": received,
                                "partition_date": ts.date(),
                            }
                            rows.append(row)
                    if len(rows) >= NAIVE_FLUSH_ROWS:
                        flush()

        with blast_server(p["tags"], p["frames"]) as blast, \
                Sampler(other_pid=blast.process.pid) as sampler:
            shards = shard_webids(blast.url, webids, 6000)
            urls = [channel_url(blast.url, s, include_initial_values=True, heartbeat_rate=5) for s in shards]

            async def main() -> None:
                async with asyncio.timeout(RUN_TIMEOUT):
                    await asyncio.gather(*(read(u, p["frames"]) for u in urls))
                flush()

            asyncio.run(main())
    window = state["last_commit"] - state["first"]
    values = state["written"]
    return round_figures({
        "tags": p["tags"], "channels": len(urls), "values": values,
        "values_per_s": values / window,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(state["first"], state["last_commit"]), values),
        "peak_rss_MB": peak_rss_mb(),
        "commits": state["commits"],
        "server_cpu_share": sampler.other_share(state["first"], state["last_commit"]),
        "complete": values == expected,
    })


# -- latency ----------------------------------------------------------------------------------------------

LATENCY_FLUSH_SECONDS = 1.0


def latency(quick: bool) -> dict[str, Any]:
    """50,000 values/s (10,000 tags, a frame every 0.2 s) with a 1 s flush: commit time (the Delta log
    file's mtime, when readers can see the rows) minus each row's received_timestamp."""
    return _latency_run(size("latency", quick))


def latency_backfill(quick: bool) -> dict[str, Any]:
    """The latency scenario twice in this worker, one right after the other on the same machine: with
    ``--backfill DURATION`` reading each tag's history behind the live stream (from the same blast server,
    which serves the recorded values of its model), then as it is. The issue's goal: the live p99
    receive-to-commit stays within the flush interval + 1 s while the backfill runs, and the backfill makes
    progress. Peak RSS is the backfill run's (it runs first)."""
    p = size("latency_backfill", quick)
    result = _latency_run(p, backfill=p["backfill"])  # first: its peak RSS is its own (ru_maxrss only grows)
    plain = _latency_run(p)
    goal_ms = LATENCY_FLUSH_SECONDS * 1000 + 1000
    result.update({
        "backfill": p["backfill"], "flush_seconds": LATENCY_FLUSH_SECONDS, "p99_goal_ms": goal_ms,
        "p99_within_goal": result["p99_receive_to_commit_ms"] <= goal_ms,
        "plain_p50_receive_to_commit_ms": plain["p50_receive_to_commit_ms"],
        "plain_p99_receive_to_commit_ms": plain["p99_receive_to_commit_ms"],
        "plain_max_receive_to_commit_ms": plain["max_receive_to_commit_ms"],
        "plain_cpu_s_per_M_values": plain["cpu_s_per_M_values"],
        "p99_over_plain": result["p99_receive_to_commit_ms"] / plain["p99_receive_to_commit_ms"],
        "complete": bool(result.get("backfill_values")),  # the backfill made progress
    })
    return round_figures(result)


def _latency_run(p: dict[str, Any], backfill: str | None = None) -> dict[str, Any]:
    """The pipeline at ``p``'s rate with a 1 s flush for its duration (with ``--backfill`` if given); the
    live writer's rows (app id ``bench``) only: commit time minus received_timestamp (and event time)."""
    rate = p["tags"] / p["interval"]
    frames = int(p["duration"] / p["interval"]) + 50  # never runs out before the pipeline stops
    capture = LogCapture().install()
    extra = {"backfill": backfill} if backfill else {}
    history: list[tuple[Any, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        with blast_server(p["tags"], frames, interval=p["interval"]) as blast, \
                Sampler(0.25, other_pid=blast.process.pid) as sampler:
            settings = _settings(workdir, blast.url, p["tags"], flush_seconds=LATENCY_FLUSH_SECONDS,
                                 duration=p["duration"], **extra)
            _, peak_rss = _run_pipeline(settings, capture, until_rows=None, timeout=RUN_TIMEOUT)
        receive_ms: list[float] = []
        event_ms: list[float] = []
        rows = 0
        first = float("inf")
        last_commit = 0.0
        data_commits = commit_rows(workdir / "table", ["received_timestamp", "timestamp"], app_id="bench")
        if backfill:
            history = commit_rows(workdir / "table", ["received_timestamp"], app_id="bench-history")
        for i, (commit, data) in enumerate(data_commits):
            received = data["received_timestamp"].cast("int64").to_pylist()
            rows += len(received)
            first = min(first, min(received) / 1e6)
            last_commit = max(last_commit, commit.visible_at)
            if i == 0:
                continue  # the initial values and connection set-up
            visible_us = commit.visible_at * 1e6
            receive_ms.extend((visible_us - r) / 1000 for r in received)
            event_ms.extend((visible_us - t) / 1000 for t in data["timestamp"].cast("int64").to_pylist())
    window = last_commit - first
    history_values = sum(data.num_rows for _, data in history)
    result = {
        "tags": p["tags"], "offered_values_per_s": rate, "values": rows,
        "values_per_s": rows / window,
        # per value committed in the window, the history's too
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(first, last_commit), rows + history_values),
        "peak_rss_MB": peak_rss,
        "commits": len(data_commits),
        "p50_receive_to_commit_ms": percentile(receive_ms, 50),
        "p99_receive_to_commit_ms": percentile(receive_ms, 99),
        "max_receive_to_commit_ms": max(receive_ms),
        "p50_event_to_commit_ms": percentile(event_ms, 50),
        "p99_event_to_commit_ms": percentile(event_ms, 99),
        "server_cpu_share": sampler.other_share(last_commit - window, last_commit),
    }
    if backfill:
        started = capture.named("backfill_round_started")
        history_end = max((c.visible_at for c, _ in history), default=0.0)
        result.update({
            "backfill_values": history_values, "backfill_commits": len(history),
            "backfill_values_per_s": history_values / (history_end - started[0][0])
            if started and history_end > started[0][0] else 0.0,
            "start_to_backfill_s": started[0][0] - first if started else None,
        })
    return round_figures(result)


# -- memory -----------------------------------------------------------------------------------------------

def memory(quick: bool) -> dict[str, Any]:
    """100,000 tags at 1 Hz with a 10 s flush for a few minutes: RSS over time. Warm-up is the first third
    of the run (at least until the second commit): warm-up RSS is the highest RSS in it, the slope is fitted
    to the samples after it, end RSS is the mean of the last 10 s."""
    p = size("memory", quick)
    frames = int(p["duration"]) + 600
    capture = LogCapture().install()
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        started = time.time()
        with blast_server(p["tags"], frames, interval=p["interval"]) as blast, \
                Sampler(0.5, other_pid=blast.process.pid) as sampler:
            settings = _settings(workdir, blast.url, p["tags"], flush_seconds=10.0,
                                 flush_rows=4 * int(p["tags"] * 10 / p["interval"]), duration=p["duration"])
            summary, peak_rss = _run_pipeline(settings, capture, until_rows=None, timeout=RUN_TIMEOUT)
        rows, first, _, last_commit = received_span(workdir / "table")
    commits = capture.named("batch_committed")
    second_commit = commits[1][0] if len(commits) > 1 else (commits[0][0] if commits else first)
    warm_end = max(second_commit, started + p["duration"] / 3)
    samples = [s for s in sampler.samples if s.wall >= started]
    warm = [s.rss_mb for s in samples if s.wall <= warm_end] or [samples[0].rss_mb]
    after = [(s.wall - started, s.rss_mb) for s in samples if s.wall > warm_end]
    end = [s.rss_mb for s in samples if s.wall >= samples[-1].wall - 10]
    window = last_commit - first
    return round_figures({
        "tags": p["tags"], "offered_values_per_s": p["tags"] / p["interval"], "duration_s": p["duration"],
        "values": rows, "values_per_s": rows / window,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(first, last_commit), rows),
        "peak_rss_MB": peak_rss,
        "warmup_rss_MB": max(warm),
        "end_rss_MB": sum(end) / len(end),
        "rss_slope_MB_per_min": slope_per_minute(after),
        "commits": len(commits),
        "channels": summary.channels,
        "server_cpu_share": sampler.other_share(last_commit - window, last_commit),
        "rss_series_MB": [round(s.rss_mb, 1) for s in samples[::4]],  # every 2 s
    })


# -- startup ----------------------------------------------------------------------------------------------

def startup(quick: bool) -> dict[str, Any]:
    """``pistream`` as a subprocess (JSON logs on stderr) against the blast server in its own process:
    process start -> tags resolved -> first commit. ``--flush-rows`` = tags, so the initial values make
    the first batch and the figure is not the flush age. Run twice: with every tag listed, and with one
    name mask (``\\\\SIMSRV\\SIM*``) that matches them all, resolved by paging ``dataservers/{webId}/points``
    (figures ``mask_...``; the target is resolving 100,000 points within 30 s)."""
    p = size("startup", quick)
    tags = p["tags"]
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        for run in ("listed", "mask"):
            (workdir / run).mkdir()
        listed = _startup_run(tags, write_tags_file(workdir / "listed" / "tags.txt", tags))
        mask_file = workdir / "mask" / "tags.txt"
        mask_file.write_text("\\\\SIMSRV\\SIM*\n", encoding="utf-8")
        masked = _startup_run(tags, mask_file)
    return round_figures({**listed, **{f"mask_{name}": value for name, value in masked.items()
                                       if name not in ("tags", "server_cpu_s")}})


def _startup_run(tags: int, tags_file: Path) -> dict[str, Any]:
    """One start of ``pistream`` (tables and state beside the tags file) until its first commit."""
    import json

    workdir = tags_file.parent
    with blast_server(tags, 100_000, interval=1.0) as blast:
        cmd = [sys.executable, "-m", "pistream", "--tags", str(tags_file), "--url", blast.url,
               "--table", str(workdir / "table"), "--state-dir", str(workdir / "state"),
               "--app-id", "bench", "--flush-rows", str(tags), "--flush-seconds", "60",
               "--log-format", "json", "--log-level", "info", "--duration", str(RUN_TIMEOUT)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.time()
        process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   cwd=REPO, env=env)
        events: dict[str, float] = {}
        fields: dict[str, dict[str, Any]] = {}
        first_commit = threading.Event()
        channels = [0]

        def read_logs() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                now = time.time()
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    print(line, end="", file=sys.stderr)
                    continue
                name = event.get("event", "")
                if name == "channel_connected":
                    channels[0] += 1
                    events["last_channel_connected"] = now
                events.setdefault(name, now)
                fields.setdefault(name, event)
                if name == "batch_committed":
                    first_commit.set()
                if event.get("level") in ("warning", "error"):
                    print(f"[pistream] {line}", end="", file=sys.stderr)

        reader = threading.Thread(target=read_logs, daemon=True)
        reader.start()
        usage = None
        try:
            first_commit.wait(timeout=RUN_TIMEOUT)
            process.send_signal(signal.SIGINT)  # a clean stop: flush, commit, exit 0
            deadline = time.time() + 60
            while time.time() < deadline:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.05)
        finally:
            if process.returncode is None:
                process.kill()
                process.wait(timeout=30)
            reader.join(timeout=5)

    def since_start(name: str) -> float | None:
        return events[name] - started if name in events else None

    figures = {
        "tags": tags,
        "channels": channels[0],
        "start_to_tags_resolved_s": since_start("tags_resolved"),
        "start_to_channels_connected_s": since_start("last_channel_connected"),
        "start_to_first_commit_s": since_start("batch_committed"),
        "cpu_s_total": usage.ru_utime + usage.ru_stime if usage else None,
        "peak_rss_MB": usage.ru_maxrss / 1024 if usage else None,
        "exit_code": process.returncode,
        "server_cpu_s": blast.stats.get("cpu_s"),
    }
    if "masks_resolved" in fields:  # the mask search alone, as pistream measured it, and what it found
        figures["resolve_s"] = fields["masks_resolved"].get("seconds")
        figures["tags_resolved"] = fields["masks_resolved"].get("points")
    return figures


# -- firehose ---------------------------------------------------------------------------------------------

def _until_committed(cmd: list[str], expected: int) -> dict[str, float]:
    """Run ``pistream`` (JSON logs on stderr) until ``batch_committed`` lines add up to ``expected`` rows,
    then stop it with SIGINT; seconds from ``Popen`` to the first line of each event, and to all rows."""
    import json

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                               env=env)
    events: dict[str, float] = {}
    done = threading.Event()

    def read_logs() -> None:
        assert process.stderr is not None
        rows = 0
        for line in process.stderr:
            now = time.time() - started
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                print(line, end="", file=sys.stderr)
                continue
            events.setdefault(event.get("event", ""), now)
            if event.get("event") == "batch_committed":
                rows += event.get("rows", 0)
                if rows >= expected:
                    events["all_committed"] = now
                    done.set()
            if event.get("level") in ("warning", "error"):
                print(f"[pistream] {line}", end="", file=sys.stderr)

    reader = threading.Thread(target=read_logs, daemon=True)
    reader.start()
    try:
        done.wait(timeout=RUN_TIMEOUT)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=5)
    events["exit_code"] = process.returncode
    return events


def firehose(quick: bool) -> dict[str, Any]:
    """A user's first impression: a fixed 1 M values (1,000 tags x 1,000 frames) from process start until
    every value is committed, with the default flush flags. Twice: sent as fast as pistream reads, and
    paced over ~7 s (a source slower than pistream, so the batch is not simply full at 1 M). The paced run
    again with ``--flush-idle-seconds 0`` (commits on size and age only) is the baseline. Each process gets
    its own blast server, so every run reads the same values."""
    p = size("firehose", quick)
    expected = p["tags"] * p["frames"]
    runs: dict[str, dict[str, Any]] = {}
    cases: tuple[tuple[str, float | None, list[str]], ...] = (
        ("fast", None, []), ("paced", p["paced_interval"], []),
        ("paced_size_and_age_only", p["paced_interval"], ["--flush-idle-seconds", "0"]))
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        tags_file = write_tags_file(workdir / "tags.txt", p["tags"])
        for name, interval, extra in cases:
            with blast_server(p["tags"], p["frames"], interval=interval) as blast:
                cmd = [sys.executable, "-m", "pistream", "--tags", str(tags_file), "--url", blast.url,
                       "--table", str(workdir / name / "table"), "--state-dir", str(workdir / name / "state"),
                       "--log-format", "json", "--duration", str(RUN_TIMEOUT), *extra]
                runs[name] = _until_committed(cmd, expected)
            rows, _, last, last_commit = received_span(workdir / name / "table")
            runs[name].update(rows=rows, last_value_to_committed_s=last_commit - last)
    fast, paced, baseline = runs["fast"], runs["paced"], runs["paced_size_and_age_only"]
    speedup = None
    if "all_committed" in paced and "all_committed" in baseline:
        speedup = baseline["all_committed"] / paced["all_committed"]
    return round_figures({
        "tags": p["tags"], "values": fast["rows"],
        "start_to_tags_resolved_s": fast.get("tags_resolved"),
        "start_to_all_committed_s": fast.get("all_committed"),
        "paced_start_to_all_committed_s": paced.get("all_committed"),
        "paced_last_value_to_committed_s": paced["last_value_to_committed_s"],
        "size_and_age_only_start_to_all_committed_s": baseline.get("all_committed"),
        "size_and_age_only_last_value_to_committed_s": baseline["last_value_to_committed_s"],
        "idle_flush_speedup": speedup,
        "exit_codes": ",".join(str(run["exit_code"]) for run in runs.values()),
        "complete": all(run["rows"] == expected for run in runs.values()),
    })


def late(quick: bool) -> dict[str, Any]:
    """A late burst at full speed: the same values (1,000 tags x 500) from process start until all are
    committed, default flags, sent in time order after the channel opens (the baseline, same run), and with
    each channel's newest value first, so that every other value is older than what the channel already
    delivered for its tag. Reported as the ratio late / in order (goal <= 1.5)."""
    p = size("late", quick)
    expected = p["tags"] * p["frames"]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        tags_file = write_tags_file(workdir / "tags.txt", p["tags"])
        for name, is_late in (("in_order", False), ("late", True)):
            with blast_server(p["tags"], p["frames"], late=is_late) as blast:
                cmd = [sys.executable, "-m", "pistream", "--tags", str(tags_file), "--url", blast.url,
                       "--table", str(workdir / name / "table"), "--state-dir", str(workdir / name / "state"),
                       "--log-format", "json", "--duration", str(RUN_TIMEOUT)]
                runs[name] = _until_committed(cmd, expected)
            runs[name]["rows"] = received_span(workdir / name / "table")[0]
    in_order, burst = runs["in_order"], runs["late"]
    ratio = None
    if "all_committed" in in_order and "all_committed" in burst:
        ratio = burst["all_committed"] / in_order["all_committed"]
    return round_figures({
        "tags": p["tags"], "values": burst["rows"],
        "in_order_start_to_all_committed_s": in_order.get("all_committed"),
        "late_start_to_all_committed_s": burst.get("all_committed"),
        "late_over_in_order": ratio,
        "exit_codes": ",".join(str(run["exit_code"]) for run in runs.values()),
        "complete": all(run["rows"] == expected for run in runs.values()),
    })


# -- restart ----------------------------------------------------------------------------------------------

def restart(quick: bool) -> dict[str, Any]:
    """100,000 tags at 1 Hz: a first ``pistream`` process fills the table and its state file and stops; after
    a few seconds' downtime the scenario starts it again in this process, where every tag reads back what it
    missed (its floor minus the look-back up to its first live value) beside the live values. Peak RSS, the
    time until the last gap was read, the values read back. The blast server's recorded values come from the
    simulator's model, not from its frames: this measures the work and the memory of a restart; the tests
    check that a restart loses and repeats nothing, against the simulator."""
    p = size("restart", quick)
    tags = p["tags"]
    capture = LogCapture().install()
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        workdir = Path(tmp)
        frames = int(p["first"] + p["downtime"] + p["duration"]) + 600
        with blast_server(tags, frames, interval=1.0) as blast:
            settings = _settings(workdir, blast.url, tags, flush_seconds=10.0, flush_rows=4 * tags * 10,
                                 duration=p["duration"])
            first = subprocess.run(
                [sys.executable, "-m", "pistream", "--tags", str(settings.tags), "--url", blast.url,
                 "--table", str(settings.table), "--state-dir", str(settings.state_dir), "--app-id", "bench",
                 "--flush-seconds", "10", "--duration", str(p["first"]), "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=RUN_TIMEOUT)
            if first.returncode != 0:
                raise RuntimeError(f"the first run failed ({first.returncode}): {first.stderr[-2000:]}")
            time.sleep(p["downtime"])
            started = time.time()
            with Sampler(0.5, other_pid=blast.process.pid) as sampler:
                summary, peak_rss = _run_pipeline(settings, capture, until_rows=None, timeout=RUN_TIMEOUT)
    filled = capture.named("gap_filled")
    all_read = summary.gaps_filled >= tags and summary.gaps_lost == 0
    samples = [s for s in sampler.samples if s.wall >= started]
    end = [s.rss_mb for s in samples if s.wall >= samples[-1].wall - 10]
    return round_figures({
        "tags": tags, "downtime_s": p["downtime"], "duration_s": p["duration"],
        "gaps": summary.gaps_filled, "gaps_lost": summary.gaps_lost, "gap_values": summary.gap_values,
        "start_to_gaps_read_s": filled[-1][0] - started if all_read and filled else None,
        "values_written": summary.values_written,
        "cpu_s_total": sampler.cpu_between(started, samples[-1].wall),
        "peak_rss_MB": peak_rss,
        "end_rss_MB": sum(end) / len(end),
        "complete": all_read,
        "rss_series_MB": [round(s.rss_mb, 1) for s in samples[::4]],  # every 2 s
    })


# -- backfill ---------------------------------------------------------------------------------------------

def backfill(quick: bool) -> dict[str, Any]:
    """Recorded values over REST into a table, on pistream's gap-fill path: ``GapFiller`` (paged
    ``streamsets/recorded``, pages into columns by the codec where it is built) -> ``Flusher``/
    ``ColumnBuffer.add_gap_columns`` (exactly-once windows) -> ``CommitWriter``/``DeltaSink``. One gap window
    per tag covers the whole range, closed as the bulk path closes it after a reconnect."""
    import numpy as np
    import pyarrow as pa
    import trio

    from pistream.lake.sink import DeltaSink
    from pistream.lake.writer import CommitWriter
    from pistream.pi.flow import Incoming
    from pistream.pi.gapfill import GapFiller, GapQueue, group_requests
    from pistream.pi.piwebapi import PiWebApi
    from pistream.pi.webid import path_webid
    from pistream.stream.buffer import ColumnBuffer, Flush, Spill, StreamInfo
    from pistream.stream.columns import page_decoder
    from pistream.stream.dedup import KNOWN_SCHEMA, EventFilter, KnownRows
    from pistream.stream.flusher import Flusher

    p = size("backfill", quick)
    LogCapture().install("warning")
    end_us = (time.time_ns() // 1000 // 1_000_000 - 120) * 1_000_000  # two minutes ago, whole second
    start_us = end_us - p["minutes"] * 60_000_000
    paths = tag_paths(p["tags"])
    webids = [path_webid(x) for x in paths]
    expected = p["tags"] * p["minutes"] * 60  # 1 event/s per tag (plus a boundary event for some)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp:
        table = Path(tmp) / "table"
        sink = DeltaSink(str(table), "bench-backfill")
        sink.open()
        with blast_server(p["tags"], 1) as blast, Sampler(other_pid=blast.process.pid) as sampler:
            event_filter = EventFilter()
            for w in webids:  # a floor at the start, then a reconnect: each tag waits for its gap's end
                event_filter.floors[w] = start_us
            event_filter.connected(webids)
            # Each gap's end, as the bulk path closes windows after a reconnect (one first value per tag)
            tag_ids = np.array(sorted(event_filter.floors.tags.ids[w] for w in webids), np.int64)
            firsts = pa.Table.from_pylist([{"value": None, "value_text": None, "state_code": None, "good": False,
                                            "questionable": False, "substituted": False, "annotated": False}]
                                          * len(tag_ids), schema=KNOWN_SCHEMA)
            requests = list(event_filter.first_values(KnownRows(tag_ids, np.full(len(tag_ids), end_us), firsts)))
            streams = {w: StreamInfo(x, w) for x, w in zip(paths, webids, strict=True)}
            buffer = ColumnBuffer(streams, event_filter)

            async def main() -> tuple[Any, Any]:
                message_send, message_recv = trio.open_memory_channel[Incoming](64)
                flush_send, flush_recv = trio.open_memory_channel[Flush | Spill](1)
                flusher = Flusher(buffer, message_recv, flush_send, max_rows=100_000, max_age=5.0)
                writer = CommitWriter(sink, flush_recv, txn_version=0, committed=EventFilter())
                async with PiWebApi(blast.url) as api:
                    filler = GapFiller(api, GapQueue(), message_send, decode=page_decoder(buffer.index))
                    with trio.fail_after(RUN_TIMEOUT):
                        async with trio.open_nursery() as nursery:
                            await nursery.start(writer.run)
                            await nursery.start(flusher.run)
                            result["first"] = time.time()
                            async with message_send:
                                groups = group_requests([r for r in requests if r], filler.max_streams,
                                                        api.max_url_length,
                                                        len(api.base_url) + len("/streamsets/recorded?"))
                                for group in groups:
                                    await filler.fill(group)
                return filler.stats, writer.stats

            fill_stats, write_stats = trio.run(main)
            result["last"] = time.time()
    window = result["last"] - result["first"]
    values = write_stats.values_written
    return round_figures({
        "tags": p["tags"], "minutes": p["minutes"], "values": values,
        "values_per_s": values / window,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(result["first"], result["last"]), values),
        "peak_rss_MB": peak_rss_mb(),
        "rest_calls": fill_stats.calls,
        "commits": write_stats.commits,
        "server_cpu_share": sampler.other_share(result["first"], result["last"]),
        "complete": values >= expected,
    })


# -- history (pistream backfill) ---------------------------------------------------------------------------

def history(quick: bool) -> dict[str, Any]:
    """``pistream backfill``'s path (``run_backfill``: paged ``streamsets/recorded`` -> history flusher ->
    commit writer) against references in the same run, on the same server process: the REST ceiling (the
    same pages at the same concurrency, read, decoded by msgspec and dropped), the same with the decoder the
    backfill reads pages with (``rest_ceiling_columns``: the C codec into columns where it is built: the
    reader alone at pistream's own cost), and a naive backfill (one ``streams/{webId}/recorded`` call per
    tag, one after another, ``write_deltalake`` per tag)."""
    import httpx
    import pyarrow as pa
    import trio
    from deltalake import write_deltalake

    from pistream.backfill import run_backfill
    from pistream.pi.history import HistoryPage, HistoryReader, TagProgress, TagRange
    from pistream.pi.piwebapi import PiWebApi
    from pistream.pi.webid import path_webid
    from pistream.stream.columns import TagIndex, page_decoder
    from pistream.timeutil import format_iso

    p = size("history", quick)
    LogCapture().install("warning")
    end_us = (time.time_ns() // 1000 // 1_000_000 - 120) * 1_000_000  # two minutes ago, whole second
    start_us = end_us - p["seconds"] * 1_000_000 + 1
    paths = tag_paths(p["tags"])
    webids = [path_webid(x) for x in paths]
    with tempfile.TemporaryDirectory(prefix="pistream-bench-") as tmp, \
            blast_server(p["tags"], 1) as blast, Sampler(other_pid=blast.process.pid) as sampler:
        # 1. the REST ceiling: the reader alone, pages dropped; as defined (msgspec), then with the decoder
        # pistream's backfill reads pages with (the C codec, into columns)
        async def ceiling_run(columns: bool) -> int:
            ranges = [TagRange(w, end_us, TagProgress(start_us)) for w in webids]
            index = TagIndex()
            for webid, path in zip(webids, paths, strict=True):
                index.add(webid, path, None)
            decode = page_decoder(index) if columns else None
            send, recv = trio.open_memory_channel[HistoryPage](4)
            count = 0
            async with PiWebApi(blast.url) as api, trio.open_nursery() as nursery:
                nursery.start_soon(HistoryReader(api, ranges, send, concurrency=4, decode=decode).run)
                async with recv:
                    async for page in recv:
                        count += page.values
            return count

        t0 = time.time()
        ceiling_values = trio.run(ceiling_run, False)
        t1 = time.time()
        columns_values = trio.run(ceiling_run, True)
        t1c = time.time()
        # 2. pistream backfill, into a new table
        settings = _settings(Path(tmp), blast.url, p["tags"], start=format_iso(start_us), end=format_iso(end_us),
                             app_id=None, log_level="warning", log_format="json")
        t2 = time.time()
        summary = trio.run(lambda: run_backfill(settings, handle_signals=False, progress_bar=False))
        t3 = time.time()
        rss = peak_rss_mb()
        # 3. naive: a call per tag, in turn, a write_deltalake per tag
        naive_values = 0
        t4 = time.time()
        with httpx.Client(base_url=blast.url + "/", timeout=60) as client:
            for webid in webids[:p["naive_tags"]]:
                r = client.get(f"streams/{webid}/recorded", params={
                    "startTime": format_iso(start_us), "endTime": format_iso(end_us), "maxCount": "150000"})
                items = r.json()["Items"]
                rows = [{"tag_webid": webid, "timestamp": i["Timestamp"], "value": i["Value"]
                         if isinstance(i["Value"], int | float) else None, "good": i["Good"]} for i in items]
                write_deltalake(str(Path(tmp) / "naive"), pa.Table.from_pylist(rows), mode="append")
                naive_values += len(rows)
        t5 = time.time()
    rest_rate = ceiling_values / (t1 - t0)
    columns_rate = columns_values / (t1c - t1)
    backfill_rate = summary.values_written / (t3 - t2)
    naive_rate = naive_values / (t5 - t4)
    return round_figures({
        "tags": p["tags"], "seconds": p["seconds"], "values": summary.values_written,
        "values_per_s": backfill_rate,
        "cpu_s_per_M_values": _per_million(sampler.cpu_between(t2, t3), summary.values_written),
        "peak_rss_MB": rss,
        "rest_ceiling_values_per_s": rest_rate, "naive_values_per_s": naive_rate,
        "rest_ceiling_columns_values_per_s": columns_rate,
        "rest_ceiling_cpu_s_per_M_values": _per_million(sampler.cpu_between(t0, t1), ceiling_values),
        "rest_ceiling_columns_cpu_s_per_M_values": _per_million(sampler.cpu_between(t1, t1c), columns_values),
        "backfill_over_rest_ceiling": backfill_rate / rest_rate,
        "backfill_over_rest_ceiling_columns": backfill_rate / columns_rate,
        "backfill_over_naive": backfill_rate / naive_rate,
        "commits": summary.commits, "naive_tags": p["naive_tags"],
        "server_cpu_share": sampler.other_share(t2, t3),
        "complete": summary.complete and summary.values_written == ceiling_values == columns_values,
    })


SCENARIOS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "ceiling": ceiling,
    "throughput": throughput,
    "naive": naive,
    "latency": latency,
    "latency_backfill": latency_backfill,
    "memory": memory,
    "startup": startup,
    "restart": restart,
    "backfill": backfill,
    "history": history,
    "firehose": firehose,
    "late": late,
}

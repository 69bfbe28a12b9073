"""Shared pieces of the benchmark scenarios: the blast server as a subprocess, CPU/RSS sampling, log
capture, reading commit times back from a Delta log, percentiles. Light imports only (no pyarrow here), so
the ceiling scenario's peak RSS is not inflated by libraries it does not use.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# -- process resources -----------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU of this process, all threads (delta-rs and Arrow pools included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb(pid: int | None = None) -> float:
    """Current resident set size in MB (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process (Linux /proc; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        try:
            import psutil

            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
        except Exception:  # noqa: BLE001 - the process may be gone
            return 0.0


@dataclass
class Sample:
    wall: float  # time.time()
    cpu: float
    rss_mb: float
    other_cpu: float = 0.0  # CPU of the watched other process (the server), if any


class Sampler:
    """A daemon thread recording (wall time, process CPU, RSS) every ``interval`` seconds, so that CPU can
    be read for any window afterwards and memory can be plotted over time, even while Trio is busy."""

    def __init__(self, interval: float = 0.05, other_pid: int | None = None):
        self.interval = interval
        self.other_pid = other_pid
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval)

    def _sample(self) -> Sample:
        other = process_cpu_seconds(self.other_pid) if self.other_pid else 0.0
        return Sample(time.time(), cpu_seconds(), rss_mb(), other)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(self._sample())

    def cpu_between(self, start: float, end: float) -> float:
        """Process CPU seconds spent between two wall times (nearest samples)."""
        return self._at(end).cpu - self._at(start).cpu

    def other_share(self, start: float, end: float) -> float | None:
        """The watched process's CPU seconds per wall second in the window: near 1.0 means it was busy
        all the time (the blast server setting the pace)."""
        if not self.other_pid or end <= start:
            return None
        return (self._at(end).other_cpu - self._at(start).other_cpu) / (end - start)

    def _at(self, wall: float) -> Sample:
        return min(self.samples, key=lambda s: abs(s.wall - wall))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


# -- the blast server --------------------------------------------------------------------------------------

@dataclass
class BlastProcess:
    url: str
    process: subprocess.Popen[str]
    stats: dict[str, Any] = field(default_factory=dict)


def _read_lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@contextmanager
def blast_server(tags: int, frames: int, *, interval: float | None = None, max_seconds: float = 1800,
                 start_timeout: float = 60, late: bool = False) -> Iterator[BlastProcess]:
    """``python -m pistream.sim.blast`` in its own process; always stopped (SIGTERM, then kill) on exit.
    After the block, ``.stats`` holds what the server reported (frames, values, its CPU seconds)."""
    cmd = [sys.executable, "-m", "pistream.sim.blast", "--tags", str(tags), "--frames", str(frames),
           "--port", "0", "--max-seconds", str(max_seconds)]
    if interval is not None:
        cmd += ["--interval", str(interval)]
    if late:
        cmd.append("--late")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        try:
            first = lines.get(timeout=start_timeout)
        except queue.Empty:
            first = None
        if not first or not first.startswith("http://"):
            raise RuntimeError(f"blast server did not start (first line {first!r})")
        blast = BlastProcess(first.strip(), process)
        yield blast
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        reader.join(timeout=5)
    rest = []
    while not lines.empty():
        line = lines.get_nowait()
        if line:
            rest.append(line)
    for line in reversed(rest):
        try:
            blast.stats = json.loads(line)
            break
        except json.JSONDecodeError:
            continue


# -- inputs and outputs ------------------------------------------------------------------------------------

def tag_paths(n: int) -> list[str]:
    """The paths ``SimModel.generated(n)`` serves."""
    return [f"\\\\SIMSRV\\SIM{i:06d}" for i in range(n)]


def write_tags_file(path: Path, n: int) -> Path:
    path.write_text("\n".join(tag_paths(n)) + "\n", encoding="utf-8")
    return path


class LogCapture:
    """structlog configured to keep events in memory (wall time + event dict) instead of printing them;
    warnings and errors still go to stderr."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []

    def install(self, level: str = "info") -> LogCapture:
        import logging

        import structlog

        def capture(logger: Any, method: str, event_dict: Any) -> Any:
            self.events.append((time.time(), dict(event_dict)))
            if method in ("warning", "error", "critical", "exception"):
                print(f"[pistream {method}] {dict(event_dict)}", file=sys.stderr)
            raise structlog.DropEvent

        structlog.configure(
            processors=[structlog.processors.add_log_level, capture],
            wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
            cache_logger_on_first_use=False,
        )
        return self

    def named(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in list(self.events) if e.get("event") == event]

    def committed_rows(self) -> int:
        return sum(int(e.get("rows", 0)) for _, e in self.named("batch_committed"))


@dataclass
class Commit:
    version: int
    visible_at: float  # mtime of the _delta_log JSON: when readers could see it (wall seconds)
    info_ts: float | None  # commitInfo.timestamp (ms precision), seconds
    files: list[str]
    app_ids: frozenset[str] = frozenset()  # of its app transactions (``txn``): which writer made it


def delta_commits(table: Path) -> list[Commit]:
    """Every version of a local Delta table with its commit time and data files, from the log itself."""
    commits = []
    for log_file in sorted((table / "_delta_log").glob("*.json")):
        version = int(log_file.stem)
        info_ts = None
        app_ids = set()
        files = []
        for line in log_file.read_text(encoding="utf-8").splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                ts = action["commitInfo"].get("timestamp")
                info_ts = ts / 1000 if ts else None
            elif "add" in action:
                files.append(action["add"]["path"])
            elif "txn" in action:
                app_ids.add(action["txn"].get("appId"))
        commits.append(Commit(version, log_file.stat().st_mtime_ns / 1e9, info_ts, files, frozenset(app_ids)))
    return commits


def commit_rows(table: Path, columns: list[str], app_id: str | None = None) -> list[tuple[Commit, Any]]:
    """Per data commit (of ``app_id``'s writer only, if given): the commit and the listed columns of its rows
    (a pyarrow Table)."""
    from urllib.parse import unquote

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for commit in delta_commits(table):
        if not commit.files or app_id is not None and app_id not in commit.app_ids:
            continue
        parts = [pq.read_table(table / unquote(f), columns=columns) for f in commit.files]
        out.append((commit, pa.concat_tables(parts)))
    return out


def received_span(table: Path) -> tuple[int, float, float, float]:
    """(rows, first received, last received, last commit visible) of a local pistream table, in wall
    seconds: the throughput window is first received -> last commit."""
    import pyarrow.compute as pc

    rows = 0
    first = float("inf")
    last = 0.0
    last_commit = 0.0
    for commit, data in commit_rows(table, ["received_timestamp"]):
        received = data["received_timestamp"].cast("int64")
        rows += data.num_rows
        first = min(first, pc.min(received).as_py() / 1e6)
        last = max(last, pc.max(received).as_py() / 1e6)
        last_commit = max(last_commit, commit.visible_at)
    return rows, first, last, last_commit


def round_figures(result: dict[str, Any], digits: int = 3) -> dict[str, Any]:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in result.items()}

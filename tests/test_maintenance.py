"""Table maintenance on real Delta tables beside a committing writer: every row stays exactly once (read back
with delta-rs and with DuckDB's delta-kernel), files get fewer, the lease keeps maintainers from racing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import structlog
import trio
from click.testing import CliRunner
from conftest import duckdb_rows
from deltalake import DeltaTable

import pistream.lake.maintenance as maintenance
from pistream.errors import ConfigError, MaintenanceBusyError, MaintenanceError, SinkError
from pistream.lake.holder import Holder
from pistream.lake.lease import Lease, lease_holder
from pistream.lake.maintenance import MaintenanceScheduler
from pistream.lake.optimize import compact, z_order, zorder_candidates
from pistream.lake.sink import DeltaSink
from pistream.lake.tablestats import table_stats
from pistream.lake.vacuum import vacuum
from pistream.stream.schema import PARTITION_COLUMN, TABLE_SCHEMA

TODAY = date(2026, 3, 10)
CLOSED = [TODAY - timedelta(days=2), TODAY - timedelta(days=1)]
TAGS = 40


def events(day: date, first: int, rows: int) -> pa.Table:
    """``rows`` distinct events of one day: event ``n`` is tag ``n % TAGS`` at ``n`` ms after midnight."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    numbers = range(first, first + rows)
    times = [start + timedelta(milliseconds=n) for n in numbers]
    return pa.table({
        "tag": [f"\\\\SRV\\T{n % TAGS:03d}" for n in numbers], "tag_webid": [f"W{n % TAGS:03d}" for n in numbers],
        "timestamp": times, "value": [float(n) for n in numbers], "value_text": pa.nulls(rows, pa.string()),
        "state_code": pa.nulls(rows, pa.int32()), "system_state": [False] * rows, "uom": ["degC"] * rows,
        "good": [n % 4 != 0 for n in numbers], "questionable": [False] * rows, "substituted": [False] * rows,
        "annotated": [False] * rows, "received_timestamp": times, PARTITION_COLUMN: [day] * rows,
    }, schema=TABLE_SCHEMA)


class Writer:
    """An appender: one app id, one commit per batch, each batch of new events. A failed commit is tried
    again with the same transaction version, as the pipeline's commit writer does (on a busy machine delta-rs
    can give up after its own 15 retries while maintenance commits keep winning)."""

    RETRIES = 20

    def __init__(self, uri: str, app_id: str, first: int = 0):
        self.sink = DeltaSink(uri, app_id)
        self.sink.open()
        self.version = 0
        self.next_event = first
        self.rows = 0
        self.retries = 0

    def commit(self, day: date, rows: int = 50) -> None:
        batch = events(day, self.next_event, rows)
        for attempt in range(self.RETRIES + 1):
            try:
                self.sink.commit(batch, self.version + 1)
                break
            except SinkError:
                if attempt == self.RETRIES:
                    raise
                self.retries += 1
        self.version += 1
        self.next_event += rows
        self.rows += rows


def files_of(uri: str, day: date) -> int:
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    return adds.column(f"partition.{PARTITION_COLUMN}").to_pylist().count(day)


def assert_rows_once(uri: str, expected: int) -> None:
    """Both readers see exactly ``expected`` rows, each event once."""
    data = DeltaTable(uri).to_pyarrow_table(columns=["tag_webid", "timestamp"])
    assert data.num_rows == expected
    assert data.group_by(["tag_webid", "timestamp"]).aggregate([]).num_rows == expected
    [(rows, distinct)] = duckdb_rows(uri, "count(*), count(DISTINCT (tag_webid, timestamp))")
    assert rows == distinct == expected


def elsewhere(name: str) -> Holder:
    """A maintainer on another host: only its lease's expiry frees it."""
    return Holder(f"{name}.example", 4242, None, "scheduler")


class NoLease:
    """What a maintainer that ignores the lease does: opens the table and optimizes."""

    holder = elsewhere("no-lease")

    def __init__(self, uri: str):
        self.uri = uri

    def open_table(self) -> DeltaTable:
        return DeltaTable(self.uri)

    def record(self, step: str) -> None:
        pass


@pytest.fixture
def uri(tmp_path) -> str:
    return str(tmp_path / "table")


def test_compaction_keeps_every_row_once_and_merges_files(uri):
    writer = Writer(uri, "writer-1")
    for i in range(24):
        writer.commit(CLOSED[i % 2] if i % 3 else TODAY)
    before = [files_of(uri, day) for day in (*CLOSED, TODAY)]

    today = compact(uri, {}, TODAY)
    rest = compact(uri, lambda: {})  # the whole table; options may come from a callable

    assert today.partition == TODAY and today.files_removed == before[2] and today.files_added == 1
    assert today.rows == 8 * 50
    assert rest.files_removed == before[0] + before[1] and rest.files_added == 2
    assert [files_of(uri, day) for day in (*CLOSED, TODAY)] == [1, 1, 1]
    assert_rows_once(uri, writer.rows)
    assert compact(uri, {}).table_version is None  # nothing left to merge: no commit


def test_zorder_clusters_a_closed_partition_and_runs_again_only_after_a_late_file(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(12):
        writer.commit(CLOSED[0], rows=400)
    writer.commit(TODAY)
    assert zorder_candidates(uri, before=TODAY) == [CLOSED[0]]

    result = z_order(uri, {}, CLOSED[0], target_size=32 << 10)  # small files, to see the clustering

    assert result.files_removed == 12 and result.files_added > 1 and result.rows == 12 * 400
    assert_rows_once(uri, writer.rows)
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    ranges = [(a["min.tag_webid"], a["max.tag_webid"]) for a in adds if a[f"partition.{PARTITION_COLUMN}"] == CLOSED[0]]
    assert any(low != "W000" or high != f"W{TAGS - 1:03d}" for low, high in ranges)  # not every file holds every tag
    assert zorder_candidates(uri, before=TODAY) == []  # one Z-order's files: done
    writer.commit(CLOSED[0], rows=5)  # a late value
    assert zorder_candidates(uri, before=TODAY) == [CLOSED[0]]


def test_zorder_refuses_to_run_without_a_memory_bound(uri):
    Writer(uri, "writer-1").commit(CLOSED[0])
    with pytest.raises(ConfigError, match="memory bound"):
        z_order(uri, {}, CLOSED[0], max_spill_size=0)


def test_vacuum_deletes_old_unreferenced_files_and_keeps_files_written_ahead(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(6):
        writer.commit(CLOSED[0])
    compact(uri, {}, CLOSED[0])
    folder = Path(uri) / f"{PARTITION_COLUMN}={CLOSED[0].isoformat()}"
    assert len(list(folder.glob("*.parquet"))) == 7  # 6 removed by the compaction, 1 live

    kept = vacuum(uri, {})  # default: the table's 7 days
    assert kept.retention_hours == 168 and kept.files == []
    listed = vacuum(uri, {}, retention_hours=0, force=True, dry_run=True)
    assert len(listed.files) == 6 and len(list(folder.glob("*.parquet"))) == 7

    # A batch's spilled rows written ahead of its commit, which a storage outage delays: a vacuum with the
    # default retention leaves the file alone, and the commit that adds it later reads back whole.
    ahead = writer.sink.write_ahead(events(TODAY, 10_000, 30))
    vacuum(uri, {}, retention_hours=24)
    writer.sink.commit(events(TODAY, 20_000, 0), writer.version + 1, ahead)
    writer.rows += 30

    done = vacuum(uri, {}, retention_hours=0, force=True)
    assert len(done.files) == 6 and len(list(folder.glob("*.parquet"))) == 1
    assert_rows_once(uri, writer.rows)


def test_vacuum_under_24_hours_needs_force_and_says_why(uri):
    writer = Writer(uri, "writer-1")
    writer.commit(CLOSED[0])
    writer.commit(CLOSED[0])
    compact(uri, {})
    with pytest.raises(ConfigError, match="wrote ahead of a commit.*--force"):
        vacuum(uri, {}, retention_hours=23)
    DeltaTable(uri).alter.set_table_properties({"delta.deletedFileRetentionDuration": "interval 2 hours"})
    with pytest.raises(ConfigError, match="deletedFileRetentionDuration 2 h is under 24 h"):
        vacuum(uri, {})  # the table's own setting is held to the same floor
    assert len(list(Path(uri).rglob("*.parquet"))) == 3  # nothing deleted
    assert vacuum(uri, {}, dry_run=True).retention_hours == 2  # listing is harmless


def test_two_racing_lease_takers_never_both_win(uri):
    Writer(uri, "writer-1").commit(TODAY)

    def take(name: str, barrier: threading.Barrier, outcomes: list[object]) -> None:
        lease = Lease(uri, {}, holder=elsewhere(name))
        barrier.wait()  # all three have opened nothing yet; each reads the lease free, then commits
        try:
            lease.acquire()
            outcomes.append(lease)
        except MaintenanceError as exc:
            outcomes.append(exc)

    for _ in range(20):
        barrier = threading.Barrier(3)
        outcomes: list[object] = []
        threads = [threading.Thread(target=take, args=(f"maintainer-{k}", barrier, outcomes)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if isinstance(o, Lease)]
        losers = [o for o in outcomes if isinstance(o, MaintenanceBusyError)]
        assert len(winners) == 1 and len(losers) == 2
        assert all(winners[0].holder.text() in str(e) for e in losers)
        assert lease_holder(DeltaTable(uri), uri) == winners[0].holder.text()
        winners[0].release()
    assert DeltaTable(uri).transaction_version("writer-1") == 1  # the writer's own app id untouched


def test_a_crashed_holders_lease_expires_and_the_old_holder_then_stops(uri):
    Writer(uri, "writer-1").commit(TODAY)
    now = [1_000_000.0]
    crashed = Lease(uri, {}, holder=elsewhere("crashed"), ttl=60, clock=lambda: now[0])
    crashed.acquire()
    with pytest.raises(MaintenanceBusyError, match="crashed.example:4242:scheduler holds the maintenance lease") as busy:
        Lease(uri, {}, holder=elsewhere("next"), clock=lambda: now[0]).acquire()
    assert busy.value.held_until == datetime.fromtimestamp(now[0] + 60, UTC) and busy.value.exit_code == 75

    now[0] += 61  # the holder stopped renewing: its lease ran out
    successor = Lease(uri, {}, holder=elsewhere("next"), ttl=60, clock=lambda: now[0])
    successor.acquire()
    with pytest.raises(MaintenanceError, match="lost the maintenance lease"):
        compact(uri, {}, lease=crashed)  # woken up: it must not optimize any more
    successor.release()
    crashed.release()  # no error: it is not the holder
    Lease(uri, {}, holder=elsewhere("third")).acquire()


def test_racing_maintainers_beside_an_appender_never_duplicate_rows(uri):
    seeder = Writer(uri, "seeder", first=0)
    appender = Writer(uri, "appender", first=10_000_000)
    stop = threading.Event()
    failures: list[BaseException] = []

    def append() -> None:
        try:
            while not stop.is_set():
                appender.commit(TODAY, rows=20)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    outcomes: list[object] = []

    def maintain(operation, day: date, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            outcomes.append(operation(uri, {}, day))
        except MaintenanceError as exc:
            outcomes.append(exc)

    def lost_races() -> int:
        return sum(isinstance(o, MaintenanceBusyError) for o in outcomes)

    background = threading.Thread(target=append)
    background.start()
    rounds = 0
    try:
        # 16 rounds, and more (64 at most) until the racers did overlap once: on a busy machine one may finish
        # before the other starts.
        while rounds < 16 or (lost_races() == 0 and rounds < 64):
            i, rounds = rounds, rounds + 1
            day = CLOSED[i % 2]
            for _ in range(4):
                seeder.commit(day, rows=30)
            barrier = threading.Barrier(2)
            operation = z_order if i % 2 else compact
            racers = [threading.Thread(target=maintain, args=(operation, day, barrier)) for _ in range(2)]
            for t in racers:
                t.start()
            for t in racers:
                t.join()
    finally:
        stop.set()
        background.join()

    assert not failures, failures
    errors = [o for o in outcomes if isinstance(o, MaintenanceError)]
    assert all(isinstance(e, MaintenanceBusyError) for e in errors), errors  # only lost races, no failures
    assert errors  # they did race: some found the other's lease (all 16 rounds, when measured)
    assert len(outcomes) - len(errors) >= rounds  # at least one optimize per round
    assert appender.rows > 0
    print(f"rounds={rounds} lost_races={len(errors)} appender_commits={appender.version} "
          f"appender_retries={appender.retries} seeder_retries={seeder.retries}")
    assert_rows_once(uri, seeder.rows + appender.rows)


def test_an_optimize_that_ignores_the_lease_is_never_silent(uri):
    """Two optimizes at once without the lease: on deltalake 1.6.6 both commit and rows are duplicated; the
    check after each optimize reports it (with a later delta-rs the second may fail instead)."""
    writer = Writer(uri, "writer-1")
    for _ in range(10):
        writer.commit(CLOSED[0])
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def optimize() -> None:
        barrier.wait()
        try:
            outcomes.append(compact(uri, {}, CLOSED[0], lease=NoLease(uri)))  # type: ignore[arg-type]
        except MaintenanceError as exc:
            outcomes.append(exc)

    racers = [threading.Thread(target=optimize) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    rows = DeltaTable(uri).to_pyarrow_table(columns=["timestamp"]).num_rows
    reported = [o for o in outcomes if isinstance(o, MaintenanceError)]
    if rows != writer.rows:
        assert len(reported) == 1 and f"rows {writer.rows} -> {rows}" in str(reported[0])
    else:
        assert len(reported) <= 1


def test_stats_from_the_log_equal_the_data(uri):
    writer = Writer(uri, "writer-1")
    for i in range(105):  # past the checkpoint at 100 commits
        writer.commit([*CLOSED, TODAY][i % 3], rows=7 + i % 5)
    compact(uri, {}, CLOSED[0])

    stats = table_stats(uri, {}, scan=True)

    table = DeltaTable(uri)
    checkpoints = sorted(int(f.name.split(".")[0]) for f in Path(uri, "_delta_log").glob("*.checkpoint.parquet"))
    assert stats.version == table.version() and [stats.last_checkpoint] == checkpoints
    assert stats.commits_since_checkpoint == stats.version - checkpoints[0] > 0
    assert stats.files == len(table.file_uris()) and stats.rows == writer.rows
    by_day = {row[0]: row[1:] for row in duckdb_rows(
        uri, "partition_date, count(*), min(epoch_ms(timestamp)), max(epoch_ms(timestamp)), "
             "count(DISTINCT tag_webid), avg(good::int)", "GROUP BY partition_date")}
    assert [p.partition for p in stats.partitions] == sorted(by_day)
    for p in stats.partitions:
        rows, first_ms, last_ms, tags, good = by_day[p.partition]
        assert (p.rows, p.distinct_tags) == (rows, tags)
        assert (p.first_timestamp, p.last_timestamp) == (
            datetime.fromtimestamp(first_ms / 1000, UTC), datetime.fromtimestamp(last_ms / 1000, UTC))
        assert p.good_share == pytest.approx(good, abs=1e-6)
        assert p.files == (1 if p.partition == CLOSED[0] else 35) and p.small_files == p.files
    [(tags, good)] = duckdb_rows(uri, "count(DISTINCT tag_webid), avg(good::int)")
    assert stats.distinct_tags == tags == TAGS and stats.good_share == pytest.approx(good, abs=1e-6)
    assert table_stats(uri, {}).distinct_tags is None  # without scan: the log only


class ObservedScheduler(MaintenanceScheduler):
    """The scheduler, with a way to wait for the end of its next pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pass_ended = trio.Event()

    async def run_once(self) -> None:
        await super().run_once()
        self._pass_ended.set()
        self._pass_ended = trio.Event()

    async def next_pass(self) -> None:
        await self._pass_ended.wait()


async def test_scheduler_compacts_zorders_and_vacuums_beside_an_appender(uri):
    writer = Writer(uri, "writer-1")
    writer.commit(TODAY)
    scheduler = ObservedScheduler(uri, lambda: {}, interval=0.05, today=lambda: TODAY)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            for i in range(60):  # mostly today's partition; late values for the closed days now and then
                await trio.to_thread.run_sync(writer.commit, CLOSED[i % 2] if i % 4 == 0 else TODAY)
            await scheduler.next_pass()  # perhaps begun before the last commit
            await scheduler.next_pass()  # a whole pass after it
            nursery.cancel_scope.cancel()

    assert scheduler.stats.failed_steps == 0 and scheduler.stats.vacuums == 1  # daily: once
    # Today's compaction is tiered (a binary counter of file sizes): a few files, not the 45 commits' worth.
    assert files_of(uri, TODAY) <= 7
    assert zorder_candidates(uri, before=TODAY) == [] and scheduler.stats.zorders >= 2
    assert_rows_once(uri, writer.rows)


async def test_scheduler_logs_a_failing_pass_and_tries_again(tmp_path):
    uri = str(tmp_path / "not-yet")  # no table yet: every pass fails until the writer creates it
    scheduler = ObservedScheduler(uri, {}, interval=0.05, today=lambda: TODAY)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            await scheduler.next_pass()
            await scheduler.next_pass()
            assert scheduler.stats.skipped == 2 and scheduler.stats.passes == 0
            writer = Writer(uri, "writer-1")
            writer.commit(TODAY)
            writer.commit(TODAY)
            await scheduler.next_pass()  # perhaps begun before the table existed
            await scheduler.next_pass()
            nursery.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "maintenance_failed"]
    assert failed and all("no Delta table" in e["error"] for e in failed)
    assert files_of(uri, TODAY) == 1
    assert_rows_once(uri, writer.rows)


async def test_cancelling_the_scheduler_lets_the_step_in_progress_finish_and_frees_the_lease(uri, monkeypatch):
    writer = Writer(uri, "writer-1")
    for _ in range(5):
        writer.commit(TODAY)
        writer.commit(CLOSED[0])
    started, go = threading.Event(), threading.Event()
    real_compact = maintenance.compact

    def held_compact(*args, **kwargs):
        started.set()
        go.wait()
        return real_compact(*args, **kwargs)

    monkeypatch.setattr(maintenance, "compact", held_compact)
    scheduler = MaintenanceScheduler(uri, {}, interval=0.05, today=lambda: TODAY)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()  # the pipeline shuts down while the compaction runs
            go.set()

    assert files_of(uri, TODAY) == 1  # the compaction in progress finished and committed
    assert files_of(uri, CLOSED[0]) == 5 and scheduler.stats.zorders == 0  # no later step started
    with Lease(uri, {}, holder=elsewhere("after")) as lease:  # released, not left to expire
        assert lease.expires_ms is not None
    assert_rows_once(uri, writer.rows)


def command_group():
    import click

    from pistream.lake.tablecmds import register

    group = click.Group("pistream")
    register(group)
    return group


def test_commands_print_tables_and_json(uri):
    writer = Writer(uri, "writer-1")
    for i in range(8):
        writer.commit(CLOSED[i % 2])
    runner = CliRunner()

    result = runner.invoke(command_group(), ["optimize", "--table", uri, "--zorder"])
    assert result.exit_code == 0, result.output
    assert CLOSED[0].isoformat() in result.stdout and "z_order" in result.stdout

    result = runner.invoke(command_group(), ["stats", "--table", uri, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == writer.rows and data["files"] == 2
    assert [p["partition"] for p in data["partitions"]] == [d.isoformat() for d in CLOSED]

    result = runner.invoke(command_group(), ["vacuum", "--table", uri, "--retention-hours", "0", "--force",
                                             "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would delete 8 files older than 0 h" in result.stdout
    assert_rows_once(uri, writer.rows)


def test_command_errors_are_one_line_with_the_exit_code(uri):
    Writer(uri, "writer-1").commit(TODAY)
    runner = CliRunner()
    result = runner.invoke(command_group(), ["vacuum", "--table", uri, "--retention-hours", "1"])
    assert result.exit_code == 2
    assert result.stderr.startswith("pistream: error: --retention-hours 1 h is under 24 h")
    assert "Traceback" not in result.output

    with Lease(uri, {}, holder=elsewhere("nightly-job")):
        result = runner.invoke(command_group(), ["optimize", "--table", uri])
    assert result.exit_code == 75  # busy, not failed
    assert "pistream: error: nightly-job.example:4242:scheduler holds the maintenance lease" in result.stderr

    result = runner.invoke(command_group(), ["stats", "--table", uri + "-missing"])
    assert result.exit_code == 2 and "no Delta table at" in result.stderr


STATS_COMMAND = """
import os, sys, click
from pistream.lake.tablecmds import register
group = click.Group("pistream")
register(group)
try:
    group(prog_name="pistream")
except SystemExit as exc:
    sys.stdout.flush()
    os._exit(exc.code or 0)
"""


def test_stats_command_as_a_real_process(uri):
    writer = Writer(uri, "writer-1")
    for i in range(3):
        writer.commit(CLOSED[i % 2])
    proc = subprocess.run([sys.executable, "-c", STATS_COMMAND, "stats", "--table", uri, "--scan"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"rows        {writer.rows:,} in 3 files" in proc.stdout
    assert f"tags        {TAGS}" in proc.stdout
    assert json.loads(proc.stderr.splitlines()[-1])["event"] == "table_stats_read"  # logs: JSON on stderr

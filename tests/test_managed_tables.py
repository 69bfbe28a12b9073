"""Unity Catalog MANAGED tables (``--managed-write``), against the loopback workspace of tests/databricks_fake.py:
pistream stages each batch as Parquet in a volume with the Files API and loads it with one COPY INTO through the
SQL warehouse, which the fake runs for real (file-level idempotency by path, appends to its local Delta table).
Exactly once across kill -9 and a warehouse that takes a minute to start; staged files cleaned."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter

import pytest
import structlog
import trio
from conftest import compare_with_model
from test_end_to_end import PATHS, served, windows_of

from pistream.cli import _first_pistream_error
from pistream.errors import AuthError, ConfigError, TableConflictError
from pistream.lake.unitycatalog import uc_columns
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

TABLE = "main.bronze.pi_streaming_timeseries"
VOLUME = "main.bronze.pistream_staging"
TAIL_US = 1_000_000


@pytest.fixture(autouse=True)
def every_log_line():
    """structlog as it comes (a CLI test run before may have left it filtering out all but errors), so
    ``capture_logs`` sees the lines these tests look for."""
    structlog.reset_defaults()


@pytest.fixture
def workspace(uc_workspace, tmp_path, monkeypatch):
    """The fake workspace with a PAT profile ``DEFAULT``; statements go on without polls, as on a real
    warehouse (a COPY INTO sent just before a kill -9 still runs)."""
    path = uc_workspace.databrickscfg(tmp_path, "DEFAULT", "pat")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    uc_workspace.statements_run_unpolled = True
    return uc_workspace


async def wait_until(condition, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - the fake workspace is polled from outside
            await trio.sleep(0.2)


def check_copy_log(workspace, table: str = TABLE) -> Counter[str]:
    """Every staged file loaded once; every batch folder loaded by one COPY INTO (more only for a batch
    sent again after a crash, which then loads nothing). The COPY INTO runs per batch folder."""
    log = [entry for entry in workspace.copy_log if entry["table"] == table]
    loaded = [f"{entry['source']}/{name}" for entry in log for name in entry["loaded"]]
    assert loaded and len(loaded) == len(set(loaded)), "a staged file was loaded twice"
    runs = Counter(entry["source"] for entry in log)
    for source in runs:
        assert sum(1 for e in log if e["source"] == source and e["inserted"]) == 1, source
    return runs


async def test_kill_9_and_a_slow_warehouse_exactly_once(workspace, tmp_path):
    """A MANAGED table created through the warehouse; pistream killed with SIGKILL mid-stream, the warehouse
    stopped meanwhile and 60 s to start again: the restart's first load waits for it (a pause: channels stall
    and their gap is read back later), then every value is in the table once, one COPY INTO per batch, no staged
    file left. Real processes; the fake's local Delta table read back with DuckDB."""
    workspace.warehouse_start_seconds = 2
    model = SimModel.from_paths(PATHS, rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    log_path = tmp_path / "pistream.log"
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            command = [sys.executable, "-m", "pistream", "--tags", str(tags), "--url", simulator.url,
                       "--table", TABLE, "--warehouse-id", workspace.warehouse_id, "--state-dir",
                       str(tmp_path / "state"), "--flush-seconds", "1", "--stall-seconds", "5",
                       "--log-format", "json", "--app-id", "managed-test"]
            log_file = await trio.to_thread.run_sync(open, log_path, "ab")
            with log_file:
                first = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=log_file)
                try:
                    # the table is created, then batches are loaded
                    await wait_until(lambda: len([e for e in workspace.copy_log if e["inserted"]]) >= 3, 120)
                    await trio.sleep(0.7)  # somewhere inside a batch's staging or load
                finally:
                    first.kill()  # SIGKILL: no flush, no state save, staged files left behind
                    await first.wait()
                staged_at_kill = workspace.volume_files(VOLUME)
                workspace.stop_warehouse()
                workspace.warehouse_start_seconds = 60
                await trio.sleep(1)
                second = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=log_file)
                try:
                    before = len(workspace.copy_log)  # the warehouse starts (60 s), then the backlog is loaded
                    await wait_until(lambda: len(workspace.copy_log) >= before + 3, 150)
                    await trio.sleep(3)
                    second.send_signal(signal.SIGINT)
                    with trio.fail_after(90):
                        code = await second.wait()
                finally:
                    if second.returncode is None:
                        second.kill()
                        await second.wait()
            nursery.cancel_scope.cancel()
    text = log_path.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert code == 0, text[-3000:]
    info = workspace.table(TABLE)
    assert info is not None and info["table_type"] == "MANAGED"
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(workspace.managed_table_path(TABLE), model, windows)
    print(result.summary(), f"staged at kill: {len(staged_at_kill)} files")
    assert result.tags_with_rows == len(PATHS)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    runs = check_copy_log(workspace)
    committed = [e for e in events if e["event"] == "batch_committed" and e.get("rows")]
    assert len(runs) >= len(committed) >= 6
    # one COPY INTO per batch: a restart waits for the statement an earlier run sent (its id is kept in the
    # state dir); only one sent in the instant between its POST and keeping the id would be sent again
    assert sum(runs.values()) - len(runs) <= 1
    assert workspace.volume_files(VOLUME) == []  # staged files cleaned after their load
    assert any(e["event"] == "warehouse_starting" for e in events)  # the 60 s start was waited for
    assert not [e for e in events if e["event"] in ("pistream_failed",)]
    assert workspace.pat not in text


async def test_existing_managed_table_in_process(workspace, tmp_path):
    """A MANAGED table someone created in Databricks (pistream's columns): the volume is created, each batch
    loaded by one COPY INTO, the staged files deleted, every value once; the run says how it writes."""
    workspace.register_table(TABLE, table_type="MANAGED", columns=uc_columns())
    model = SimModel.from_paths(PATHS[:3], rate=10)
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with served(tmp_path, model, table=TABLE, warehouse_id=workspace.warehouse_id, duration=4,
                          flush_seconds=0.5) as (simulator, settings):
            summary = await run_pipeline(settings, handle_signals=False)
    result = compare_with_model(workspace.managed_table_path(TABLE), model, windows_of(simulator))
    print(result.summary())
    assert result.tags_with_rows == 3 and result.missing == [] and result.duplicates == []
    assert result.unexpected == [] and summary.values_written == result.found
    runs = check_copy_log(workspace)
    assert sum(runs.values()) == len(runs) == summary.commits - sum(
        1 for e in logs if e["event"] == "batch_committed" and not e["rows"])
    assert workspace.volume(VOLUME) is not None and workspace.volume_files(VOLUME) == []
    events = [e["event"] for e in logs]
    assert "staging_volume_created" in events and "maintenance_skipped" in events


async def run_briefly(tmp_path, **options):
    """A 2 s run; the error that stops it as the CLI reports it (out of trio's exception groups)."""
    model = SimModel.from_paths(PATHS[:2], rate=10)
    try:
        with trio.fail_after(60):
            async with served(tmp_path, model, table=TABLE, duration=2, flush_seconds=0.5, **options
                              ) as (simulator, settings):
                return await run_pipeline(settings, handle_signals=False), simulator, model
    except BaseExceptionGroup as group:
        error = _first_pistream_error(group)
        if error is None:
            raise
        raise error from None


async def test_what_is_missing_is_named(workspace, tmp_path):
    """No warehouse: exit 2 naming --warehouse-id; a volume pistream may not create: the privileges; no managed
    table and no --location: how to create one. Nothing staged, nothing loaded."""
    with pytest.raises(ConfigError, match="or only --warehouse-id to create it as a MANAGED table"):
        await run_briefly(tmp_path)
    workspace.register_table(TABLE, table_type="MANAGED", columns=uc_columns())
    with pytest.raises(ConfigError, match="is a MANAGED table, which pistream loads with COPY INTO through a SQL "
                                          "warehouse: pass --warehouse-id"):
        await run_briefly(tmp_path)
    workspace.create_volume_allowed = False
    with pytest.raises(AuthError, match=r"CREATE VOLUME main\.bronze\.pistream_staging\) and GRANT READ VOLUME, "
                                        r"WRITE VOLUME ON VOLUME main\.bronze\.pistream_staging .* or grant CREATE "
                                        r"VOLUME ON SCHEMA main\.bronze"):
        await run_briefly(tmp_path, warehouse_id=workspace.warehouse_id)
    assert workspace.volume(VOLUME) is None and workspace.copy_log == []
    workspace.add_volume("main.bronze.staging2")  # made by an admin: found, not created
    await run_briefly(tmp_path, warehouse_id=workspace.warehouse_id, staging_volume="main.bronze.staging2")
    assert workspace.copy_log and workspace.volume_files("main.bronze.staging2") == []


async def test_a_lost_state_dir_stops_the_stream(workspace, tmp_path):
    """The state dir is what tells a restart which batch names the table has loaded: started without it, the
    first batch's files have names the table took before, COPY INTO skips them, and pistream stops (exit 2)
    saying so rather than drop the batch."""
    workspace.register_table(TABLE, table_type="MANAGED", columns=uc_columns())
    summary, _, _ = await run_briefly(tmp_path, warehouse_id=workspace.warehouse_id)
    assert summary.values_written > 0
    for path in sorted((tmp_path / "state").iterdir(), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(TableConflictError, match="is not the one this writer .* restore it, or start with a new "
                                                 "--app-id"):
        await run_briefly(tmp_path, warehouse_id=workspace.warehouse_id)


@pytest.fixture
def zerobus_server():
    pytest.importorskip("grpc", reason="pip install grpcio (pistream[test])")
    pytest.importorskip("zerobus", reason="pip install databricks-zerobus-ingest-sdk (pistream[zerobus])")
    from zerobus_fake import FakeZerobus

    server = FakeZerobus()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_zerobus_at_least_once(workspace, tmp_path, zerobus_server, monkeypatch):
    """--managed-write zerobus with the real SDK against a Zerobus server on loopback (plain gRPC), OAuth M2M
    from the profile (the SDK gets its token from the fake workspace): every value arrives, as the bronze
    protobuf record; a stream broken mid-run is recovered by the SDK (repeats allowed: at-least-once, said at the
    start with the query that removes them)."""
    workspace.register_table(TABLE, table_type="MANAGED", columns=uc_columns())
    path = workspace.databrickscfg(tmp_path, "sp", "oauth-m2m")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    zerobus_server.drop_after = 40
    model = SimModel.from_paths(PATHS[:3], rate=10)
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with served(tmp_path, model, table=TABLE, databricks_profile="sp", managed_write="zerobus",
                          zerobus_endpoint=zerobus_server.endpoint, duration=4, flush_seconds=0.5
                          ) as (simulator, settings):
            summary = await run_pipeline(settings, handle_signals=False)
    rows = [(r["tag_webid"], int(r["timestamp"]), r.get("value"), r.get("value_text"), r.get("state_code"),
             r.get("system_state", False), r.get("good", False), r.get("questionable", False),
             r.get("substituted", False), r.get("annotated", False)) for r in zerobus_server.rows]
    result = compare_rows(rows, model, windows_of(simulator))
    print(result.summary())
    assert result.tags_with_rows == 3 and summary.values_written > 0
    assert result.missing == [] and result.unexpected == []  # repeats allowed: at-least-once
    row = zerobus_server.rows[0]
    assert {"tag", "tag_webid", "timestamp", "partition_date", "received_timestamp"} <= set(row)
    assert zerobus_server.streams >= 2  # the broken stream was opened again
    assert all(h.get("x-databricks-zerobus-table-name") == TABLE for h in zerobus_server.headers)
    start = [e for e in logs if e["event"] == "zerobus_at_least_once"]
    assert start and "AT-LEAST-ONCE" in start[0]["guarantee"] and "ROW_NUMBER()" in start[0]["dedup_query"]
    assert workspace.client_secret not in repr(logs)


def test_help_states_each_guarantee():
    """``pistream --help`` says which MANAGED path is exactly once and which is at-least-once."""
    from click.testing import CliRunner

    from pistream.cli import main

    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "--managed-write [copy-into|zerobus]" in text
    assert "(exactly once;" in text and "(AT-LEAST-ONCE:" in text and "--staging-volume" in text

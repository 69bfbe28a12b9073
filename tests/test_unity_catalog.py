"""Streaming into a Unity Catalog external table, against the loopback workspace of tests/databricks_fake.py:
the table is found (or created) by its three-part name, pistream writes its S3 location with the credentials
UC vends, which moto really enforces (scoped to the table's prefix, refused once expired), and re-vends them
as they near expiry. Every emitted event lands once across many expirations and through a UC outage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import trio
from deltalake import DeltaTable
from test_end_to_end import PATHS, served, windows_of

import pistream.lake.unitycatalog as unitycatalog
from pistream.errors import AuthError, ConfigError, TableConflictError
from pistream.lake.target import CatalogTarget
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import arrow_rows, compare_rows
from pistream.sim.model import SimModel

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(uc_workspace, tmp_path, monkeypatch):
    """The fake workspace with a PAT profile ``DEFAULT`` and an OAuth M2M profile ``sp`` in a config file."""
    uc_workspace.databrickscfg(tmp_path, "DEFAULT", "pat")
    path = uc_workspace.databrickscfg(tmp_path, "sp", "oauth-m2m")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    return uc_workspace


@pytest.fixture
def vended_secrets(monkeypatch):
    """Every credential value pistream was vended (to check that none reaches a log line)."""
    seen: list[str] = []
    original = unitycatalog.vended_storage_options

    def spy(answer, location):
        options = original(answer, location)
        seen.extend(options.values())
        return options

    monkeypatch.setattr(unitycatalog, "vended_storage_options", spy)
    return seen


def check_exactly_once(workspace, location: str, model: SimModel, simulator) -> None:
    data = DeltaTable(location, storage_options=workspace.admin_storage_options).to_pyarrow_table()
    result = compare_rows(arrow_rows(data), model, windows_of(simulator))
    print(result.summary())
    assert result.expected > 0 and result.tags_with_rows == len(model.tags)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []


async def until_logged(logs: list[dict], stop: trio.Event, at_least: float, wanted: dict[str, int]) -> None:
    """Set ``stop`` once ``at_least`` seconds have passed and each event in ``wanted`` was logged that often:
    a busy machine makes the run longer, never the test fail for want of time (``fail_after`` bounds it)."""
    started = trio.current_time()
    while True:
        events = [entry["event"] for entry in logs]
        if trio.current_time() - started >= at_least and all(events.count(e) >= n for e, n in wanted.items()):
            stop.set()
            return
        await trio.sleep(0.25)


async def test_stream_across_credential_expirations(workspace, tmp_path, vended_secrets):
    """Credentials that last 4 s, 0.5 s flushes and maintenance every 10 s, for 22 s or until maintenance has
    compacted and 20 batches were committed: pistream re-vends every ~2 s and swaps them between commits; no
    commit fails, nothing is lost or doubled, no secret is logged."""
    workspace.credential_lifetime = 4
    location = workspace.location("expiring")
    workspace.register_table("main.bronze.pi_streaming_timeseries", location)
    model = SimModel.from_paths(PATHS, rate=10)
    stop = trio.Event()
    wanted = {"batch_committed": 20, "credentials_swapped": 5, "table_compacted": 1}
    with structlog.testing.capture_logs() as logs, trio.fail_after(300):
        async with served(tmp_path, model, table="main.bronze.pi_streaming_timeseries",
                          flush_seconds=0.5, maintenance_interval=10,
                          storage_options=workspace.base_storage_options) as (simulator, settings):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_logged, logs, stop, 22, wanted)
                summary = await run_pipeline(settings, stop, handle_signals=False)
    check_exactly_once(workspace, location, model, simulator)
    print(f"commits={summary.commits} failed={summary.failed_commits} vends={workspace.credential_vends}")
    assert summary.failed_commits == 0 and summary.commits >= 20
    assert workspace.credential_vends >= 6  # ~22 s / 2 s, and the check above was made with admin keys
    events = [entry["event"] for entry in logs]
    assert events.count("credentials_swapped") >= 5
    assert "commit_failed" not in events and "write_ahead_failed" not in events
    assert "table_compacted" in events and "maintenance_failed" not in events  # with vended credentials too
    text = repr(logs)
    assert vended_secrets and not [s for s in vended_secrets if len(s) >= 8 and s in text]
    assert workspace.pat not in text


async def test_uc_outage_is_a_storage_outage(workspace, tmp_path):
    """UC answers 503 for 9 s, longer than the credentials last: commits fail and are retried with backoff;
    when UC is back, every event lands once."""
    workspace.credential_lifetime = 4
    location = workspace.location("outage")
    workspace.register_table("main.bronze.outage", location)
    model = SimModel.from_paths(PATHS, rate=10)

    async def outage():
        await trio.sleep(4)
        workspace.outage = True
        await trio.sleep(9)
        workspace.outage = False

    with trio.fail_after(120):
        async with served(tmp_path, model, table="main.bronze.outage", duration=30, flush_seconds=0.5,
                          maintenance_interval=0, storage_options=workspace.base_storage_options
                          ) as (simulator, settings):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outage)
                summary = await run_pipeline(settings, handle_signals=False)
    check_exactly_once(workspace, location, model, simulator)
    print(f"commits={summary.commits} failed={summary.failed_commits} vends={workspace.credential_vends}")
    assert summary.failed_commits >= 1  # the credentials did run out during the outage


@pytest.mark.parametrize("via", ["sql warehouse", "unity catalog api"])
async def test_missing_table_is_created_external(workspace, tmp_path, via):
    """``--location`` creates the table (OAuth M2M profile ``sp``): through a SQL warehouse's CREATE TABLE,
    or through the UC tables API; then pistream writes it."""
    location = workspace.location("created")
    options = {"warehouse_id": workspace.warehouse_id} if via == "sql warehouse" else {}
    model = SimModel.from_paths(PATHS[:3], rate=10)
    with trio.fail_after(60):
        async with served(tmp_path, model, table="main.bronze.created", location=location, duration=3,
                          flush_seconds=0.5, databricks_profile="sp", maintenance_interval=0,
                          storage_options=workspace.base_storage_options, **options) as (simulator, settings):
            await run_pipeline(settings, handle_signals=False)
    info = workspace.table("main.bronze.created")
    assert info is not None and info["table_type"] == "EXTERNAL" and info["data_source_format"] == "DELTA"
    assert info["storage_location"].rstrip("/") == location
    assert workspace.token_requests >= 1 and workspace.calls["execute_statement"] >= (1 if options else 0)
    check_exactly_once(workspace, location, model, simulator)
    table = DeltaTable(location, storage_options=workspace.admin_storage_options)
    assert table.metadata().configuration["delta.checkpointInterval"] == "100"


def prepare(workspace, name: str, **kwargs) -> None:
    target = CatalogTarget(name, storage_options=workspace.base_storage_options, **kwargs)
    try:
        target.prepare()
    finally:
        target.close()


def test_refusals_name_the_fix(workspace):
    workspace.register_table("main.bronze.managed", workspace.location("m"), table_type="MANAGED")
    workspace.register_table("main.bronze.view", table_type="VIEW")
    workspace.register_table("main.bronze.ext", workspace.location("e"))
    with pytest.raises(TableConflictError, match="MANAGED.*EXTERNAL Delta tables only"):
        prepare(workspace, "main.bronze.managed")
    with pytest.raises(TableConflictError, match="a view"):
        prepare(workspace, "main.bronze.view")
    with pytest.raises(ConfigError, match="does not exist: pass --location"):
        prepare(workspace, "main.bronze.missing")
    with pytest.raises(ConfigError, match="CREATE SCHEMA main.silver"):
        prepare(workspace, "main.silver.t")
    with pytest.raises(ConfigError, match="CREATE CATALOG nocat"):
        prepare(workspace, "nocat.bronze.t")
    workspace.external_use_schema = False
    with pytest.raises(AuthError, match="GRANT EXTERNAL USE SCHEMA ON SCHEMA main.bronze"):
        prepare(workspace, "main.bronze.ext")
    workspace.external_use_schema = True
    workspace.external_data_access = False
    with pytest.raises(AuthError, match="enable External data access on the metastore"):
        prepare(workspace, "main.bronze.ext")


def test_bad_token_and_bad_client_secret(workspace, tmp_path, monkeypatch):
    workspace.register_table("main.bronze.ext", workspace.location("e"))
    (tmp_path / "other").mkdir()
    path = workspace.databrickscfg(tmp_path / "other", "DEFAULT", "pat", token="dapi-wrong")
    workspace.databrickscfg(tmp_path / "other", "sp", "oauth-m2m", client_secret="wrong-secret")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    with pytest.raises(AuthError, match="create a new personal access token") as info:
        prepare(workspace, "main.bronze.ext")
    assert "dapi-wrong" not in str(info.value)
    with pytest.raises(AuthError, match="check client_id and client_secret") as info:
        prepare(workspace, "main.bronze.ext", profile="sp")
    assert "wrong-secret" not in str(info.value)


def test_cli_managed_table_exit_2(workspace, tmp_path):
    """As a user runs it: one error line naming the fix, exit code 2, no token in the output."""
    workspace.register_table("main.bronze.managed", workspace.location("m"), table_type="MANAGED")
    tags = tmp_path / "tags.txt"
    tags.write_text("\\\\SIMSRV\\SINUSOID\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PISTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "pistream", "--tags", str(tags), "--simulate", "--duration", "5",
         "--table", "main.bronze.managed", "--state-dir", str(tmp_path / "state"), "--log-format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    # a MANAGED table is written through a SQL warehouse (tests/test_managed_tables.py): without one, exit 2
    assert ("pistream: error: --table main.bronze.managed is a MANAGED table, which pistream loads with COPY INTO "
            "through a SQL warehouse: pass --warehouse-id") in result.stderr
    assert workspace.pat not in result.stderr + result.stdout
    assert not (tmp_path / "pistream-data").exists()


async def test_maintenance_commands_on_a_catalog_table(workspace, tmp_path):
    """``pistream optimize`` and ``pistream stats`` reach a Unity Catalog table by its name, with vended
    credentials and the config file's non-secret storage options."""
    import json

    from click.testing import CliRunner

    from pistream.cli import main

    location = workspace.location("commands")
    workspace.register_table("main.bronze.commands", location)
    model = SimModel.from_paths(PATHS[:3], rate=10)
    with trio.fail_after(60):
        async with served(tmp_path, model, table="main.bronze.commands", duration=3, flush_seconds=0.3,
                          maintenance_interval=0, storage_options=workspace.base_storage_options
                          ) as (simulator, settings):
            summary = await run_pipeline(settings, handle_signals=False)
    config = tmp_path / "pistream.toml"
    config.write_text("[pistream.storage_options]\n" + "".join(
        f'{key} = "{value}"\n' for key, value in workspace.base_storage_options.items()))
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [*args, "--table", "main.bronze.commands", "--config", str(config)])

    files_before = len(DeltaTable(location, storage_options=workspace.admin_storage_options).file_uris())
    optimized = run("optimize", "--json")
    assert optimized.exit_code == 0, optimized.output
    stats = run("stats", "--json")
    assert stats.exit_code == 0, stats.output
    report = json.loads(stats.stdout)
    assert report["rows"] == summary.values_written and report["files"] < files_before
    assert "main.bronze.commands" in report["table"]
    check_exactly_once(workspace, location, model, simulator)

"""Delta tables in real object storage on loopback: S3 (moto_server) and Azure Blob (Azurite).

The servers are session fixtures from tests/storage_servers.py. Rows are read back with deltalake (DuckDB's
delta extension would need its httpfs extension, a download, to read object storage).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
import structlog
import trio
from deltalake import DeltaTable

import pistream.stream.flusher as flusher_module
from pistream.config import build_settings
from pistream.errors import SinkError
from pistream.lake.sink import DeltaSink
from pistream.lake.storage import redact_text, secret_values
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import arrow_rows, compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.schema import TABLE_SCHEMA

PATHS = [
    "\\\\SIMSRV\\SINUSOID", "\\\\SIMSRV\\CDT158", "\\\\SIMSRV\\PUMP01.MODE", "\\\\SIMSRV\\BATCH.ID",
    "\\\\SIMSRV\\REACTOR.STATE", "\\\\SIMSRV\\OPERATOR.TEXT",
]
TAIL_US = 500_000  # values sent in the last moments before the stop may still be on the wire
APP_ID = "cloud-test-writer"


@pytest.fixture(params=["s3", "azure"])
def cloud(request: pytest.FixtureRequest):
    return request.getfixturevalue("s3_server" if request.param == "s3" else "azurite_server")


async def blocking(fn, *args, seconds: float = 30):
    """A blocking storage call in a worker thread, bounded in time."""
    with trio.fail_after(seconds):
        return await trio.to_thread.run_sync(fn, *args)


def make_batch(first: datetime, n: int, webid: str = "P1") -> pa.Table:
    times = [first + timedelta(seconds=i) for i in range(n)]
    return pa.table({
        "tag": [f"\\\\SRV\\{webid}"] * n,
        "tag_webid": [webid] * n,
        "timestamp": times,
        "value": [float(i) for i in range(n)],
        "value_text": [None] * n,
        "state_code": [None] * n,
        "system_state": [False] * n,
        "uom": ["degC"] * n,
        "good": [True] * n,
        "questionable": [False] * n,
        "substituted": [False] * n,
        "annotated": [False] * n,
        "received_timestamp": times,
        "partition_date": [t.date() for t in times],
    }, schema=TABLE_SCHEMA)


def read_sorted(uri: str, storage_options: dict[str, str]) -> list[dict]:
    data = DeltaTable(uri, storage_options=storage_options).to_pyarrow_table()
    return data.sort_by([("tag_webid", "ascending"), ("timestamp", "ascending")]).to_pylist()


def table_rows(uri: str, storage_options: dict[str, str]) -> list[tuple]:
    """Rows as ``compare_rows`` wants them, read by deltalake."""
    return arrow_rows(DeltaTable(uri, storage_options=storage_options).to_pyarrow_table())


@contextmanager
def captured_logs() -> Iterator[list[dict]]:
    """Every structlog event, whatever level an earlier test configured; the config is restored after."""
    old = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        cache_logger_on_first_use=False)
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)


# -- the sink on each store ------------------------------------------------------------------------------

async def test_sink_commits_each_txn_version_once(cloud):
    uri = cloud.table_uri("sink")
    first = datetime(2024, 5, 1, 23, 59, 58, tzinfo=UTC)  # crosses midnight: two partitions
    batch1, batch2, batch3 = make_batch(first, 5), make_batch(first + timedelta(minutes=1), 4), \
        make_batch(first + timedelta(minutes=2), 3, webid="P2")

    sink = DeltaSink(uri, APP_ID, cloud.storage_options)
    await blocking(sink.open)  # creates the table
    assert await blocking(sink.last_txn_version) == 0
    one = await blocking(sink.commit, batch1, 1)
    two = await blocking(sink.commit, batch2, 2)
    assert (one.rows, one.skipped, two.rows, two.skipped) == (5, False, 4, False)
    assert two.table_version == one.table_version + 1

    # A retried commit whose version is already in the log writes nothing: not the same batch again...
    again = await blocking(sink.commit, batch2, 2)
    older = await blocking(sink.commit, batch1, 1)
    assert again.skipped and older.skipped and again.rows == older.rows == 0
    assert again.table_version == two.table_version
    # ...not from another handle on the same table either (a restarted process)
    restarted = DeltaSink(uri, APP_ID, cloud.storage_options)
    assert await blocking(restarted.last_txn_version) == 2
    assert (await blocking(restarted.commit, batch2, 2)).skipped

    # Refreshed credentials: reopen with new options; the transaction state lives in the table.
    await blocking(sink.reopen, {**cloud.storage_options, "timeout": "20s"})
    assert sink.storage_options["timeout"] == "20s"
    three = await blocking(sink.commit, batch3, 3)
    assert three.rows == 3 and not three.skipped

    dt = await blocking(DeltaTable, uri, None, cloud.storage_options)
    assert dt.version() == three.table_version
    assert dt.transaction_version(APP_ID) == 3
    assert dt.metadata().partition_columns == ["partition_date"]
    written = pa.concat_tables([batch1, batch2, batch3]).sort_by(
        [("tag_webid", "ascending"), ("timestamp", "ascending")]).to_pylist()
    assert await blocking(read_sorted, uri, cloud.storage_options) == written


async def test_abfss_and_az_uris_name_the_same_azure_table(azurite_server):
    path = azurite_server.table_uri("both", prefix="").lstrip("/")
    abfss = f"{azurite_server.extra_prefixes['abfss']}/{path}"
    az = f"{azurite_server.uri_prefix}/{path}"
    batch = make_batch(datetime(2024, 6, 1, tzinfo=UTC), 3)
    sink = DeltaSink(abfss, APP_ID, azurite_server.storage_options)
    assert (await blocking(sink.commit, batch, 1)).rows == 3
    assert await blocking(read_sorted, az, azurite_server.storage_options) == batch.to_pylist()
    assert await blocking(DeltaSink(az, APP_ID, azurite_server.storage_options).last_txn_version) == 1


# -- the whole pipeline on each store --------------------------------------------------------------------

async def run_cloud_pipeline(tmp_path, model: SimModel, table: str, storage_options: dict[str, str],
                             during=None, **options):
    """Simulator -> pipeline -> ``table``; ``during(nursery)`` runs alongside (e.g. a storage outage)."""
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    simulator = Simulator(model, poll_interval=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "table": table,
                                       "state_dir": str(tmp_path / "state"), "app_id": APP_ID,
                                       "storage_options": storage_options, **options})
        if during is not None:
            nursery.start_soon(during)
        summary = await run_pipeline(settings, handle_signals=False)
        nursery.cancel_scope.cancel()
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    return summary, windows


async def test_pipeline_writes_every_event_once_to_cloud_table(cloud, tmp_path):
    # Azure through its abfss:// form (the one Unity Catalog hands out), S3 through s3://
    prefix = cloud.extra_prefixes.get("abfss")
    table = cloud.table_uri("pipeline", prefix=prefix)
    model = SimModel.from_paths(PATHS, rate=20)
    with trio.fail_after(45):
        summary, windows = await run_cloud_pipeline(tmp_path, model, table, cloud.storage_options,
                                                    duration=2.5, flush_seconds=0.5)
        rows = await blocking(table_rows, table, cloud.storage_options)
    result = compare_rows(rows, model, windows)
    print(result.summary(), summary)
    assert len(windows) == len(PATHS) and result.expected >= len(PATHS) * 20
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert result.tags_with_rows == len(PATHS)
    assert summary.values_written == result.found
    assert summary.commits >= 2


async def test_spilled_parts_land_with_their_commit_in_cloud_tables(cloud, tmp_path, monkeypatch):
    """Parts of a batch written ahead to object storage (``buffer.Spill``) are committed with it, once."""
    monkeypatch.setattr(flusher_module, "SPILL_ROWS", 25)
    table = cloud.table_uri("spilled")
    model = SimModel.from_paths(PATHS, rate=20)
    with trio.fail_after(45):
        summary, windows = await run_cloud_pipeline(tmp_path, model, table, cloud.storage_options,
                                                    duration=2.5, flush_seconds=1.0, flush_rows=100_000)
        rows = await blocking(table_rows, table, cloud.storage_options)
        files = await blocking(lambda: DeltaTable(table, storage_options=cloud.storage_options)
                               .get_add_actions(flatten=True).num_rows)
    result = compare_rows(rows, model, windows)
    print(result.summary(), summary, files)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summary.values_written == result.found >= len(PATHS) * 20
    assert files >= 2 * summary.commits  # several parts per commit


async def test_pipeline_survives_frozen_s3(s3_server, tmp_path, monkeypatch):
    """moto_server stopped (SIGSTOP) for 4 s mid-run: commits fail, the commit writer retries them, and
    the table ends with every event exactly once, including commits that landed while reported failed."""
    secret = "outage-test-secret-access-key"
    options = {**s3_server.storage_options, "AWS_SECRET_ACCESS_KEY": secret,
               "timeout": "1s", "max_retries": "1"}  # fail fast while frozen (defaults: 30 s, 60 s)
    table = s3_server.table_uri("outage")
    model = SimModel.from_paths(PATHS, rate=20)

    failures: list[str] = []
    skipped: list[int] = []
    commit = DeltaSink.commit

    def counting_commit(self, batch, txn_version, written_ahead=()):
        try:
            result = commit(self, batch, txn_version, written_ahead)
        except SinkError as exc:
            failures.append(str(exc))
            raise
        if result.skipped:
            skipped.append(txn_version)
        return result

    monkeypatch.setattr(DeltaSink, "commit", counting_commit)

    async def outage():
        await trio.sleep(1.5)
        s3_server.freeze()
        try:
            await trio.sleep(4)
        finally:
            s3_server.thaw()

    try:
        with captured_logs() as logs, trio.fail_after(50):
            summary, windows = await run_cloud_pipeline(tmp_path, model, table, options, during=outage,
                                                        duration=7, flush_seconds=0.5)
            rows = await blocking(table_rows, table, options)
    finally:
        s3_server.thaw()
    result = compare_rows(rows, model, windows)
    print(result.summary(), summary, f"failed attempts={len(failures)} skipped={skipped}")
    assert failures, "the freeze made no commit fail: the outage was not exercised"
    assert any(e["event"] == "commit_failed" for e in logs)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert result.tags_with_rows == len(PATHS)
    # neither the sink's messages nor any log line carries the secret
    assert not [m for m in failures if secret in m]
    assert secret not in json.dumps(logs, default=str)


# -- secrets ---------------------------------------------------------------------------------------------

def assert_hidden(error: BaseException, *secrets: str) -> None:
    shown = "".join(traceback.format_exception(error))  # the message and every chained cause
    for secret in secrets:
        assert secret not in shown, shown


async def test_storage_option_values_never_reach_error_messages(s3_server, azurite_server):
    # delta-rs echoes values it cannot parse: a mistyped option must not print the credentials next to it
    key = "aws-SECRET-0123456789abcdef"
    options = {**s3_server.storage_options, "AWS_SECRET_ACCESS_KEY": key, "aws_conditional_put": "SECRET-x"}
    with pytest.raises(SinkError) as info:
        await blocking(DeltaSink(s3_server.table_uri("secret"), APP_ID, options).open)
    message = str(info.value)
    assert "cannot open Delta table s3://" in message and "check --table and the storage options" in message
    assert "***" in message and "\x1b[" not in message and "\n" not in message
    assert_hidden(info.value, key, "SECRET-x")

    bad_timeout = {**azurite_server.storage_options, "timeout": "SECRET-timeout"}
    with pytest.raises(SinkError) as info:
        await blocking(DeltaSink(azurite_server.table_uri("secret"), APP_ID, bad_timeout).open)
    assert_hidden(info.value, "SECRET-timeout", azurite_server.storage_options["azure_storage_account_key"])
    assert "as Duration" in str(info.value)  # the cause is still named

    # a wrong account key is refused (403) without echoing it; the endpoint stays visible for diagnosis
    wrong = {**azurite_server.storage_options, "azure_storage_account_key": "V3JvbmdTZWNyZXRLZXlWYWx1ZQ=="}
    with pytest.raises(SinkError) as info:
        await blocking(DeltaSink(azurite_server.table_uri("secret"), APP_ID, wrong).open)
    assert_hidden(info.value, wrong["azure_storage_account_key"])
    assert "403" in str(info.value) and f"127.0.0.1:{azurite_server.port}" in str(info.value)


def test_remote_tables_get_bounded_request_defaults_the_user_can_override():
    sink = DeltaSink("s3://bucket/table", APP_ID, {"TIMEOUT": "5s", "AWS_REGION": "eu-west-1"})
    assert sink.storage_options == {"TIMEOUT": "5s", "AWS_REGION": "eu-west-1",  # the user's own, kept
                                    "connect_timeout": "10s", "retry_timeout": "60s"}
    assert DeltaSink("abfss://c@acct.dfs.core.windows.net/t", APP_ID).storage_options["timeout"] == "30s"
    for local in ("pistream-data/table", "/data/table", "file:///data/table", "C:\\data\\table"):
        assert DeltaSink(local, APP_ID).storage_options == {}


def test_redaction_keeps_configuration_and_masks_credentials():
    options = {
        "azure_storage_sas_token": "sv=2022-11-02&sig=abc%2Bdef%3D",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true",
        "aws_region": "eu-west-1",
        "timeout": "30s",
        "max_retries": "not-a-number",
    }
    secrets = secret_values(options, environ={"AWS_SESSION_TOKEN": "env-session-token", "HOME": "/root"})
    text = ("\x1b[31mError\x1b[0m GET http://127.0.0.1:9000/b?sv=2022-11-02&sig=abc%2Bdef%3D in eu-west-1\n"
            "   failed to parse \"not-a-number\" as usize; token env-session-token; allow true, 30s")
    assert redact_text(text, secrets) == (
        "Error GET http://127.0.0.1:9000/b?*** in eu-west-1 failed to parse \"***\" as usize; "
        "token ***; allow true, 30s")

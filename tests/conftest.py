"""Shared test helpers: an independent Delta reader (DuckDB's delta extension, loaded from its pip
package, no download) and a clean process exit after the session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import duckdb
import duckdb_extension_delta
import pytest
import structlog
import trio

# Session-scoped S3 (moto_server) and Azure (Azurite) servers on loopback: tests/storage_servers.py
pytest_plugins = ["storage_servers", "databricks_fake"]

_exit_status = 0


@pytest.fixture(autouse=True)
def default_logging():
    """Every test starts from structlog's defaults: a CLI test that configured logging (level error, a log
    file) must not hide the info and warning lines a later test captures with ``capture_logs``."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def duckdb_delta_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the delta extension loaded from the installed package's file."""
    package_dir = Path(duckdb_extension_delta.__file__).parent
    candidates = sorted(package_dir.glob(f"extensions/v{duckdb.__version__}/delta.duckdb_extension"))
    if not candidates:
        raise RuntimeError(f"no delta extension for duckdb {duckdb.__version__} in {package_dir}: "
                           "install duckdb-extension-delta of the same version")
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{candidates[0]}'")
    return con


def duckdb_rows(table_path: str | Path, columns: str = "*", where: str = "") -> list[tuple]:
    """Rows of a Delta table read by delta-kernel through DuckDB, not by delta-rs."""
    con = duckdb_delta_connection()
    try:
        query = f"SELECT {columns} FROM delta_scan('{table_path}') {where}"
        return con.execute(query).fetchall()
    finally:
        con.close()


GROUND_TRUTH_SQL = ("tag_webid, epoch_us(timestamp), value, value_text, state_code, system_state, good, "
                    "questionable, substituted, annotated")


def deltalake_rows(table_uri: str, storage_options: dict[str, str] | None = None) -> list[tuple]:
    """Ground-truth columns of a table read with delta-rs (for object storage, where DuckDB would need
    extensions downloaded at run time)."""
    from deltalake import DeltaTable

    from pistream.sim.groundtruth import arrow_rows

    return arrow_rows(DeltaTable(table_uri, storage_options=storage_options).to_pyarrow_table())


def compare_with_model(table_path, model, windows):
    """The simulator's ground truth against the table as DuckDB (delta-kernel) reads it."""
    from pistream.sim.groundtruth import compare_rows

    return compare_rows(duckdb_rows(table_path, GROUND_TRUTH_SQL), model, windows)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter teardown: Arrow's and delta-rs's native thread pools can abort the
    process there ("terminate called without an active exception") after every test has passed."""
    if os.environ.get("PISTREAM_TEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


async def streamed_for(simulator, tags: int, seconds: float, stop: trio.Event) -> None:
    """Set ``stop`` once every tag has been streamed for ``seconds`` (however slowly the pipeline started)."""
    span_us = int(seconds * 1_000_000)
    for _ in range(1200):  # the test's own deadline bounds it too
        spans = [r.last_us - r.first_us for r in simulator.emitted.values()]
        if len(spans) == tags and min(spans) >= span_us:
            break
        await trio.sleep(0.05)
    stop.set()

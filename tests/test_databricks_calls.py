"""Databricks calls at start, against the loopback workspace of tests/databricks_fake.py (issue 22 §4, issue 27
§1): a statement or a table creation is never sent twice, whatever the warehouse and the network do; a
workspace that is unreachable, answers 5xx or times out at start is waited for; what a person must fix ends
the start at once, with one clear line.

The 40-60 s warehouse starts against a 30 s read timeout that were seen are scaled down here: the client's
read timeout is 1 s and the warehouse takes 4 s (or never starts, for the stop and the --warehouse-wait)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
import structlog
import trio
from test_end_to_end import PATHS, served
from test_unity_catalog import check_exactly_once

from pistream import __version__
from pistream.errors import AuthError, ConfigError, PistreamError, SinkError, TableConflictError
from pistream.lake.databricks import Workspace, load_workspace_config
from pistream.lake.target import CatalogTarget
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel

READ_TIMEOUT = 1.0  # the client's, in these tests; the fake's slow parts take longer


@pytest.fixture
def workspace(uc_workspace, tmp_path, monkeypatch):
    """The fake workspace with a PAT profile ``DEFAULT`` and an OAuth M2M profile ``sp`` in a config file."""
    uc_workspace.databrickscfg(tmp_path, "DEFAULT", "pat")
    path = uc_workspace.databrickscfg(tmp_path, "sp", "oauth-m2m")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    return uc_workspace


@pytest.fixture(autouse=True)
def every_log_line():
    """structlog as it comes (a CLI test run before may have left it filtering out all but errors), so
    ``capture_logs`` sees the warnings and infos these tests look for."""
    structlog.reset_defaults()


def target_for(workspace, name: str, profile: str | None = None, **kwargs) -> CatalogTarget:
    """A Unity Catalog target whose workspace client gives up reading an answer after READ_TIMEOUT."""
    client = Workspace(load_workspace_config(profile), timeout=httpx.Timeout(READ_TIMEOUT, connect=5.0))
    return CatalogTarget(name, storage_options=workspace.base_storage_options, workspace=client, **kwargs)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Until the condition holds (the caller's trio.fail_after bounds it)."""
    while not condition():  # noqa: ASYNC110 - the fake workspace and the log are polled from outside
        await trio.sleep(0.05)


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def calls_to(workspace, *endpoints: str) -> list[tuple[str, int]]:
    return [(e["endpoint"], e["status"]) for e in workspace.request_log if e["endpoint"] in endpoints]


# -- never sent twice ---------------------------------------------------------------------------------------

async def test_a_cold_warehouse_gets_one_statement(workspace):
    """The warehouse starts 4 s after the CREATE TABLE arrives, longer than the 1 s read timeout: one statement
    is submitted, polled by id while `warehouse_starting` is logged, and the table is created and used. Every
    call (the OAuth token's too) says User-Agent pistream/<version>."""
    workspace.warehouse_start_seconds = 4
    location = workspace.location("cold")
    target = target_for(workspace, "main.bronze.cold", profile="sp", location=location,
                        warehouse_id=workspace.warehouse_id)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60), target:
        await target.open()
    assert [s["state"] for s in workspace.statements] == ["SUCCEEDED"]
    assert workspace.calls["execute_statement"] == 1 and workspace.calls["cancel_statement"] == 0
    assert workspace.calls["get_statement"] >= 2  # polled while PENDING, then done
    assert workspace.table("main.bronze.cold")["storage_location"] == location and target.uri == location
    starting = events(logs, "warehouse_starting")
    assert starting and {e["warehouse_id"] for e in starting} == {workspace.warehouse_id}
    assert [e["elapsed"] for e in starting] == sorted(e["elapsed"] for e in starting)
    assert not events(logs, "workspace_unreachable")
    assert {e["user_agent"] for e in workspace.request_log} == {f"pistream/{__version__}"}
    assert workspace.calls["oidc_token"] == 1


async def test_stop_cancels_the_statement(workspace):
    """Cancelled (the stop) while the warehouse starts: the statement is cancelled on the warehouse, once."""
    workspace.warehouse_start_seconds = 3600
    target = target_for(workspace, "main.bronze.stopped", location=workspace.location("stopped"),
                        warehouse_id=workspace.warehouse_id)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60), target:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target.open)
            await wait_until(lambda: bool(events(logs, "warehouse_starting")))
            nursery.cancel_scope.cancel()
    assert [s["state"] for s in workspace.statements] == ["CANCELED"]
    assert workspace.calls["execute_statement"] == 1 and workspace.calls["cancel_statement"] == 1
    assert len(events(logs, "statement_cancelled")) == 1
    assert workspace.table("main.bronze.stopped") is None


async def test_warehouse_wait_runs_out(workspace):
    """A warehouse that does not start within --warehouse-wait: one error naming the fix (exit 1), and the
    statement is cancelled rather than left to run later."""
    workspace.warehouse_start_seconds = 3600
    target = target_for(workspace, "main.bronze.late", location=workspace.location("late"),
                        warehouse_id=workspace.warehouse_id, warehouse_wait=1.5)
    with trio.fail_after(60), target, pytest.raises(SinkError) as info:
        await target.open()
    message = str(info.value)
    assert f"CREATE TABLE main.bronze.late on SQL warehouse {workspace.warehouse_id} still PENDING" in message
    assert "start the warehouse" in message and "--warehouse-wait (now 1.5 s)" in message
    assert info.value.exit_code == 1
    assert [s["state"] for s in workspace.statements] == ["CANCELED"]
    assert workspace.calls["execute_statement"] == 1 and workspace.calls["cancel_statement"] == 1


async def test_an_unanswered_table_creation_is_looked_up_not_sent_again(workspace):
    """UC creates the table but answers after the read timeout: pistream GETs the table, finds it, uses it."""
    workspace.slow_answers = {"create_table": 3 * READ_TIMEOUT}
    location = workspace.location("late_answer")
    target = target_for(workspace, "main.bronze.late_answer", location=location)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60), target:
        await target.open()
    assert calls_to(workspace, "get_table", "create_table") == [
        ("get_table", 404), ("create_table", 200), ("get_table", 200)]
    assert target.uri == location and workspace.calls["temporary_table_credentials"] == 1
    [retried] = events(logs, "workspace_unreachable")
    assert "POST /api/2.1/unity-catalog/tables" in retried["error"] and "not sent again" in retried["error"]
    assert f"ReadTimeout after {READ_TIMEOUT} s" in retried["error"]


@pytest.mark.parametrize("endpoint", ["create_table", "execute_statement"])
@pytest.mark.parametrize("status", [503, 504])
async def test_a_failed_creation_is_sent_again_only_when_it_surely_did_not_arrive(workspace, endpoint, status):
    """503 (refused before any work) is sent again at once; 504 (a gateway gave up: it may have run) is sent
    again only after a GET finds no table. Either way the table is created once, by one successful call."""
    warehouse = {"warehouse_id": workspace.warehouse_id} if endpoint == "execute_statement" else {}
    workspace.statement_seconds = 0
    workspace.fail_next(1, status, endpoint=endpoint)
    target = target_for(workspace, "main.bronze.flaky", location=workspace.location("flaky"), **warehouse)
    with trio.fail_after(60), target:
        await target.open()
    calls = calls_to(workspace, "get_table", endpoint)
    if status == 503:
        assert calls == [("get_table", 404), (endpoint, 503), (endpoint, 200), ("get_table", 200)]
    else:
        assert calls == [("get_table", 404), (endpoint, 504), ("get_table", 404), (endpoint, 200),
                         ("get_table", 200)]
    assert workspace.table("main.bronze.flaky") is not None
    assert len(workspace.statements) == (1 if warehouse else 0)


# -- at start: wait for the workspace, or stop at once for what a person must fix ---------------------------

async def test_an_unreachable_workspace_at_start_is_waited_for(workspace):
    """The workspace refuses connections (a boot-order race): `workspace_unreachable` with the attempt and the
    next delay, again until it answers; then the table is found and used."""
    workspace.register_table("main.bronze.waited", workspace.location("waited"))
    workspace.down()
    target = target_for(workspace, "main.bronze.waited")
    with structlog.testing.capture_logs() as logs, trio.fail_after(90), target:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target.open)
            await wait_until(lambda: bool(events(logs, "workspace_unreachable")))
            assert target.credentials is None
            workspace.up()
    assert target.credentials is not None and target.uri == workspace.table("main.bronze.waited")["storage_location"]
    unreachable = events(logs, "workspace_unreachable")
    assert [e["attempt"] for e in unreachable] == list(range(1, len(unreachable) + 1))
    assert all(e["next_delay"] > 0 and e["host"] == workspace.host for e in unreachable)
    assert "ConnectError" in unreachable[0]["error"] and "check the workspace status" in unreachable[0]["error"]
    assert workspace.pat not in repr(logs)


async def test_a_workspace_answering_503_at_start_does_not_end_the_stream(workspace, tmp_path):
    """The whole stream: the first 6 workspace calls answer 503 (more than one call's own retries); pistream
    waits, then streams, and every value lands once."""
    location = workspace.location("busy")
    workspace.register_table("main.bronze.busy", location)
    workspace.fail_next(6, 503)
    model = SimModel.from_paths(PATHS[:3], rate=10)
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with served(tmp_path, model, table="main.bronze.busy", duration=10, flush_seconds=0.5,
                          maintenance_interval=0, storage_options=workspace.base_storage_options
                          ) as (simulator, settings):
            summary = await run_pipeline(settings, handle_signals=False)
    assert events(logs, "workspace_unreachable") and summary.commits >= 1
    check_exactly_once(workspace, location, model, simulator)


@pytest.mark.parametrize("case", ["bad token", "no such catalog", "managed table", "no such warehouse"])
async def test_what_a_person_must_fix_ends_the_start_at_once(workspace, tmp_path, monkeypatch, case):
    """Refused credentials, a wrong name, a table pistream may not write, an unknown warehouse: exit 2 at the
    first answer, no retry; a workspace error's code shows once."""
    name, options = "main.bronze.t", {}
    expected: type[PistreamError] = ConfigError
    if case == "bad token":
        (tmp_path / "other").mkdir()
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(
            workspace.databrickscfg(tmp_path / "other", "DEFAULT", "pat", token="dapi-wrong")))
        expected = AuthError
    elif case == "no such catalog":
        name = "nocat.bronze.t"
    elif case == "managed table":
        workspace.register_table(name, table_type="MANAGED")
        expected = TableConflictError
    else:
        options = {"location": workspace.location("t"), "warehouse_id": "0123456789abcdef"}
    target = target_for(workspace, name, **options)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30), target, pytest.raises(expected) as info:
        await target.open()
    assert info.value.exit_code == 2 and not events(logs, "workspace_unreachable")
    assert sum(workspace.calls.values()) == (2 if case == "no such warehouse" else 1)  # get_table (+ the statement)
    message = str(info.value)
    if case == "bad token":
        assert "answered 403: Invalid access token; the credentials" in message and message.count("403") == 1
        assert "dapi-wrong" not in message
    if case == "no such warehouse":
        assert "answered 404 RESOURCE_DOES_NOT_EXIST" in message and "check --warehouse-id" in message


def test_cli_bad_token_exit_2_with_one_line(workspace, tmp_path):
    """As a service runs it: a refused token ends the start with exit 2 and one line naming the fix; the
    workspace's code shows once, the token never."""
    workspace.register_table("main.bronze.t", workspace.location("t"))
    tags = tmp_path / "tags.txt"
    tags.write_text("\\\\SIMSRV\\SINUSOID\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PISTREAM_", "DATABRICKS_"))}
    env.update(DATABRICKS_HOST=workspace.host, DATABRICKS_TOKEN="dapi-wrong-token",
               DATABRICKS_CONFIG_FILE=str(tmp_path / "no.databrickscfg"))
    result = subprocess.run(
        [sys.executable, "-m", "pistream", "--tags", str(tags), "--simulate", "--duration", "5",
         "--table", "main.bronze.t", "--state-dir", str(tmp_path / "state"), "--log-format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("pistream: error:")]
    assert "answered 403: Invalid access token; the credentials of the environment were refused" in line
    assert line.count("403") == 1
    assert "dapi-wrong-token" not in result.stderr + result.stdout
    assert "workspace_unreachable" not in result.stderr

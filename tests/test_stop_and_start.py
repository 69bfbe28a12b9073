"""A stop that always ends, a hung storage that shows, and a start-up that waits for what is not there yet.

- SIGINT with the storage frozen (moto_server under SIGSTOP): the last commit gets ``--stop-timeout``, then the
  process exits 1 with one line saying how many values were not committed; a restart with the storage back
  reads them back, and every event is in the table once.
- A commit that hangs shows in ``/metrics`` (``pistream_commit_in_flight_seconds``) and ``/healthz`` (503 naming
  the storage) while it runs, before any request fails.
- At start, PI Web API or the storage not answering (refused, 5xx, frozen) is retried with backoff, logged and
  shown by ``/healthz``; a stop ends those waits at once. What retrying cannot fix (401, a bucket that does
  not exist) still exits 2 at once.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
import structlog
import trio
from conftest import compare_with_model, deltalake_rows
from test_end_to_end import PATHS, served, windows_of
from test_metrics import parse

import pistream.pipeline as pipeline_module
from pistream.config import build_settings
from pistream.errors import AuthError, ConfigError
from pistream.lake.sink import DeltaSink
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

TAIL_US = 1_000_000
NOT_COMMITTED = re.compile(r"pistream: error: the last commit did not land within --stop-timeout 5 s \(.+ not "
                           r"answering\?\): ([\d,]+) values were not committed; the next start reads them back")


# -- helpers: pistream as a real process, its JSON log in a file --------------------------------------------

def events(log_path: Path) -> list[dict]:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def wait_for_event(log_path: Path, name: str, process: trio.Process) -> dict:
    """The first log event ``name`` (polled; callers bound the wait generously: the machine may be busy)."""
    while True:
        found = [e for e in events(log_path) if e.get("event") == name]
        if found:
            return found[0]
        assert process.returncode is None, f"pistream exited {process.returncode}:\n{tail(log_path)}"
        await trio.sleep(0.1)


async def logged(logs: list[dict], predicate) -> dict:
    """The first captured event for which ``predicate`` holds (polled: the pipeline logs it in this loop)."""
    while not any(map(predicate, logs)):  # noqa: ASYNC110 - no event to wait on: the log is the signal
        await trio.sleep(0.05)
    return next(filter(predicate, logs))


def tail(log_path: Path) -> str:
    return log_path.read_text(encoding="utf-8", errors="replace")[-3000:]


async def poll(client: httpx.AsyncClient, path: str, until) -> httpx.Response:
    """GET ``path`` until ``until(response)`` holds (callers bound the wait)."""
    while True:
        response = await client.get(path)
        if until(response):
            return response
        await trio.sleep(0.2)


def command(tmp_path: Path, url: str, table: str, *extra: str, storage_options: dict[str, str] | None = None
            ) -> list[str]:
    config = tmp_path / "pistream.toml"
    config.write_text("[pistream.storage_options]\n" + "".join(
        f'{k} = "{v}"\n' for k, v in (storage_options or {}).items()), encoding="utf-8")
    return [sys.executable, "-m", "pistream", "--tags", str(tmp_path / "tags.txt"), "--url", url, "--table", table,
            "--state-dir", str(tmp_path / "state"), "--app-id", "stop-test", "--log-format", "json",
            "--maintenance-interval", "0", "--config", str(config), *extra]


async def start(argv: list[str], log_path: Path) -> trio.Process:
    log_file = await trio.to_thread.run_sync(open, log_path, "ab")
    with log_file:  # the child keeps its own descriptor
        return await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=log_file)


async def exit_code(process: trio.Process) -> int:
    """The process's exit code (callers bound the wait); killed if the wait is cancelled."""
    try:
        return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()


def first_error(error: BaseException) -> BaseException:
    """The error inside Trio's exception groups (the CLI reports that one)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tags(tmp_path: Path, model: SimModel) -> None:
    (tmp_path / "tags.txt").write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")


# -- the stop ------------------------------------------------------------------------------------------------

async def test_sigint_with_storage_frozen_ends_at_the_stop_timeout_and_a_restart_loses_nothing(tmp_path, s3_server):
    model = SimModel.generated(20, rate=5)
    write_tags(tmp_path, model)
    simulator = Simulator(model, poll_interval=0.2)
    table = s3_server.table_uri("stop-timeout")
    log_path = tmp_path / "pistream.log"
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        argv = command(tmp_path, simulator.url, table, "--flush-seconds", "1", "--stop-timeout", "5",
                       "--metrics-port", "0", storage_options=s3_server.storage_options)
        process = await start(argv, log_path)
        try:
            with trio.fail_after(60):
                await wait_for_event(log_path, "batch_committed", process)
                metrics_url = (await wait_for_event(log_path, "metrics_served", process))["url"]
            s3_server.freeze()
            async with httpx.AsyncClient(timeout=10) as client:
                # the next commit hangs (requests wait for their 30 s timeout): the gauge shows it while it runs
                with trio.fail_after(25):
                    response = await poll(client, metrics_url, lambda r: parse(r.text).get(
                        "pistream_commit_in_flight_seconds", 0) >= 2)
            metrics = parse(response.text)
            process.send_signal(signal.SIGINT)
            # The stop ends by itself at --stop-timeout 5 s; without it the commit is retried for as long as the
            # storage is down. This bound is slack for a busy machine: the exit code and the line are the proof.
            with trio.fail_after(5 + 55):
                code = await exit_code(process)
        finally:
            s3_server.thaw()
            if process.returncode is None:
                process.kill()
        first_run = tail(log_path)
        # the storage is back: a restart reads what was not committed back from PI Web API
        restart = await start([*argv, "--duration", "8"], log_path)
        with trio.fail_after(90):
            restart_code = await exit_code(restart)
        nursery.cancel_scope.cancel()
    assert code == 1, first_run
    [line] = list(NOT_COMMITTED.finditer(first_run))
    assert int(line.group(1).replace(",", "")) > 0
    assert '"event": "stop_timed_out"' in first_run and "Traceback" not in first_run
    assert metrics["pistream_commit_failures_total"] == 0  # hung, not failed: only the gauge showed it
    assert restart_code == 0, tail(log_path)
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    rows = await trio.to_thread.run_sync(deltalake_rows, table, s3_server.storage_options)
    result = compare_rows(rows, model, windows)
    print(result.summary())
    assert result.tags_with_rows == len(model.tags)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


async def test_sigint_during_a_unity_catalog_outage_ends_at_the_stop_timeout(uc_workspace, tmp_path, monkeypatch):
    """Seen: SIGINT during an outage of Unity Catalog's credential service was still retrying 60 s later. Here
    the credentials last 4 s, UC answers 503 from mid-run on: the commits fail once the credentials ran out;
    the stop ends at --stop-timeout, and the restart (UC back) reads back what was not committed."""
    workspace = uc_workspace
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(workspace.databrickscfg(tmp_path, "DEFAULT", "pat")))
    workspace.credential_lifetime = 4
    location = workspace.location("uc-stop")
    workspace.register_table("main.bronze.uc_stop", location)
    model = SimModel.generated(10, rate=5)
    write_tags(tmp_path, model)
    simulator = Simulator(model, poll_interval=0.2)
    log_path = tmp_path / "pistream.log"
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        argv = command(tmp_path, simulator.url, "main.bronze.uc_stop", "--flush-seconds", "0.5",
                       "--stop-timeout", "5", storage_options=workspace.base_storage_options)
        process = await start(argv, log_path)
        try:
            with trio.fail_after(60):
                await wait_for_event(log_path, "batch_committed", process)
                workspace.outage = True
                await wait_for_event(log_path, "commit_failed", process)  # the credentials ran out
            process.send_signal(signal.SIGINT)
            with trio.fail_after(5 + 55):  # slack for a busy machine: the exit code and line are the proof
                code = await exit_code(process)
        finally:
            workspace.outage = False
            if process.returncode is None:
                process.kill()
        first_run = tail(log_path)
        restart = await start([*argv, "--duration", "6"], log_path)
        with trio.fail_after(90):
            restart_code = await exit_code(restart)
        nursery.cancel_scope.cancel()
    assert code == 1, first_run
    [line] = list(NOT_COMMITTED.finditer(first_run))
    assert int(line.group(1).replace(",", "")) > 0
    assert restart_code == 0, tail(log_path)
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    rows = await trio.to_thread.run_sync(deltalake_rows, location, workspace.admin_storage_options)
    result = compare_rows(rows, model, windows)
    assert result.tags_with_rows == len(model.tags)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


class HangingSink(DeltaSink):
    """Injects a hung storage: once ``hang`` is set, a commit waits (bounded) until ``release`` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hang = threading.Event()
        self.release = threading.Event()

    def commit(self, batch, txn_version, written_ahead=()):
        if self.hang.is_set():
            self.release.wait(60)
        return super().commit(batch, txn_version, written_ahead)


async def test_a_hung_commit_shows_in_metrics_and_healthz_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "COMMIT_IN_FLIGHT_FLOOR", 1.0)  # the bound: max(2 x 0.3 s, 1 s)
    model = SimModel.from_paths(PATHS, rate=20)
    sink = HangingSink(str(tmp_path / "table"), "hang-test")
    stop = trio.Event()
    seen: dict[str, object] = {}
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with served(tmp_path, model, flush_seconds=0.3, metrics_port=0) as (simulator, settings):

            async def probe():
                served_at = await logged(logs, lambda e: e["event"] == "metrics_served")
                try:
                    async with httpx.AsyncClient(base_url=served_at["url"].removesuffix("/metrics"),
                                                 timeout=10) as client:
                        await poll(client, "/metrics", lambda r: parse(r.text).get("pistream_commits_total", 0) >= 1)
                        seen["before"] = (await client.get("/healthz")).status_code
                        sink.hang.set()
                        seen["health"] = (await poll(client, "/healthz", lambda r: r.status_code == 503)).text
                        seen["metrics"] = parse((await client.get("/metrics")).text)
                finally:
                    sink.hang.clear()
                    sink.release.set()
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                summary = await run_pipeline(settings, stop, handle_signals=False, sink=sink)
            windows = windows_of(simulator)
    assert seen["before"] == 200
    assert re.match(rf"commit to {re.escape(sink.display_uri)} in flight for \d+ s \(storage not answering\?\)",
                    str(seen["health"])), seen["health"]
    metrics = seen["metrics"]
    assert isinstance(metrics, dict) and metrics["pistream_commit_in_flight_seconds"] >= 1
    assert metrics["pistream_commit_failures_total"] == 0  # nothing failed: it hung
    # released: the commit landed, the stop was clean, every event is in the table once
    result = compare_with_model(settings.table, model, windows)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()
    assert summary.values_written == result.found


def test_a_stop_that_cannot_end_still_ends_the_process():
    """The CLI's last resort: a task that cannot be abandoned (a maintenance step in a worker thread, here a
    shielded sleep) still lets the process end, exit 1 with one line, the given time after the stop."""
    program = textwrap.dedent("""
        import trio
        from pistream.pipeline import _watchdog

        async def main():
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(_watchdog, stop, 0.5)
                stop.set()
                with trio.CancelScope(shield=True):
                    await trio.sleep(120)

        trio.run(main)
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("pistream: error: the stop did not end within 0.5 s (a maintenance step or a "
                                  "storage call still running): exiting; values not committed are read back at "
                                  "the next start")


# -- the start-up ----------------------------------------------------------------------------------------------

async def test_sigint_while_pi_web_api_is_unreachable_at_start_ends_promptly(tmp_path):
    """Refused at start: retried (logged, /healthz 503 'starting'), never exit 2; Ctrl+C ends the wait."""
    write_tags(tmp_path, SimModel.from_paths(PATHS))
    port = free_port()  # nothing listens there
    log_path = tmp_path / "pistream.log"
    process = await start(command(tmp_path, f"http://127.0.0.1:{port}/piwebapi", str(tmp_path / "table"),
                                  "--metrics-port", "0"), log_path)
    try:
        with trio.fail_after(60):
            metrics_url = (await wait_for_event(log_path, "metrics_served", process))["url"]
            retry = await wait_for_event(log_path, "pi_web_api_unreachable", process)
        async with httpx.AsyncClient(timeout=10) as client:
            health = await client.get(metrics_url.removesuffix("/metrics") + "/healthz")
            metrics = parse((await client.get(metrics_url)).text)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):  # the backoff sleep is cut short, not waited out
            code = await exit_code(process)
    finally:
        if process.returncode is None:
            process.kill()
    out = tail(log_path)
    assert retry["attempt"] == 1 and retry["retry_in"] > 0
    assert f"connection to http://127.0.0.1:{port} refused" in retry["error"]
    assert health.status_code == 503
    assert health.text.startswith(f"starting: PI Web API at http://127.0.0.1:{port}/piwebapi failed ")
    assert metrics["pistream_starting"] == 1 and metrics["pistream_start_failures"] >= 1
    # stopped while waiting: exit 1 (restartable, not a configuration error) with the reason it waited
    assert code == 1, out
    assert (f"pistream: error: connection to http://127.0.0.1:{port} refused: is PI Web API running there? "
            "check --url") in out
    assert '"event": "start_abandoned"' in out and "Traceback" not in out


async def test_sigint_while_the_storage_hangs_at_start_ends_promptly(tmp_path, s3_server):
    """Opening (creating) the table on a frozen S3 hangs in a worker thread; Ctrl+C does not wait for it."""
    model = SimModel.from_paths(PATHS)
    write_tags(tmp_path, model)
    log_path = tmp_path / "pistream.log"
    table = s3_server.table_uri("frozen-at-start")
    async with trio.open_nursery() as nursery:
        simulator = Simulator(model, poll_interval=0.2)
        await nursery.start(simulator.run)
        s3_server.freeze()
        try:
            process = await start(command(tmp_path, simulator.url, table, "--metrics-port", "0",
                                          storage_options=s3_server.storage_options), log_path)
            try:
                with trio.fail_after(60):
                    metrics_url = (await wait_for_event(log_path, "metrics_served", process))["url"]
                    async with httpx.AsyncClient(timeout=10) as client:
                        health = await poll(client, metrics_url.removesuffix("/metrics") + "/healthz",
                                            lambda r: r.text.startswith("starting: table"))
                process.send_signal(signal.SIGINT)
                with trio.fail_after(25):  # less than one storage request's own timeout (30 s)
                    code = await exit_code(process)
            finally:
                if process.returncode is None:
                    process.kill()
        finally:
            s3_server.thaw()
        nursery.cancel_scope.cancel()
    out = tail(log_path)
    assert health.status_code == 503 and s3_server.uri_prefix in health.text
    assert code == 0, out  # nothing had failed yet, nothing was buffered: a clean stop
    assert "stopped during the start-up" in out


async def test_pi_web_api_started_late_is_waited_for(tmp_path):
    """A boot-order race: pistream starts first, PI Web API a moment later; the stream then runs as usual."""
    model = SimModel.from_paths(PATHS, rate=20)
    port = free_port()
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(PATHS) + "\n", encoding="utf-8")
    settings = build_settings({}, {"tags": str(tags), "url": f"http://127.0.0.1:{port}/piwebapi",
                                   "table": str(tmp_path / "table"), "state_dir": str(tmp_path / "state"),
                                   "flush_seconds": 0.5})
    simulator = Simulator(model, port=port, poll_interval=0.1)
    stop = trio.Event()
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def late_server():
                await logged(logs, lambda e: e["event"] == "pi_web_api_unreachable")
                await nursery.start(simulator.run)
                await logged(logs, lambda e: e["event"] == "batch_committed" and e["rows"] > 0)
                stop.set()

            nursery.start_soon(late_server)
            summary = await run_pipeline(settings, stop, handle_signals=False)
            nursery.cancel_scope.cancel()
    retries = [e for e in logs if e["event"] == "pi_web_api_unreachable"]
    assert retries and all("refused" in e["error"] for e in retries)
    result = compare_with_model(settings.table, model, windows_of(simulator))
    assert summary.values_written == result.found > 0
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


async def test_pi_web_api_answering_503_at_start_is_waited_for(tmp_path):
    model = SimModel.from_paths(PATHS, rate=20)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with served(tmp_path, model, duration=4, flush_seconds=0.5) as (simulator, settings):
            simulator.faults.fail_rest(503, count=2, retry_after=None)  # PI Web API still starting
            summary = await run_pipeline(settings, handle_signals=False)
    retries = [e for e in logs if e["event"] == "pi_web_api_unreachable"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "answered 503" in retries[0]["error"]
    assert summary.values_written > 0 and summary.tags == len(PATHS)


async def test_refused_credentials_at_start_are_not_retried(tmp_path):
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(PATHS) + "\n", encoding="utf-8")
    simulator = Simulator(SimModel.from_paths(PATHS), basic_auth=("pistream", "right-password"))
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "username": "pistream",
                                           "password": "wrong-password", "table": str(tmp_path / "table"),
                                           "state_dir": str(tmp_path / "state")})
            with pytest.raises(BaseException) as raised:
                await run_pipeline(settings, handle_signals=False)
            nursery.cancel_scope.cancel()
    refused = first_error(raised.value)
    assert isinstance(refused, AuthError) and refused.exit_code == 2
    assert "refused the credentials (401" in str(refused)
    assert not [e for e in logs if e["event"].endswith("_unreachable")]
    assert not (tmp_path / "table").exists()  # PI Web API first: no empty table left behind


async def test_a_bucket_that_does_not_exist_is_not_retried(tmp_path, s3_server):
    model = SimModel.from_paths(PATHS)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with served(tmp_path, model, table="s3://no-such-bucket/pi_events",
                          storage_options=s3_server.storage_options) as (_, settings):
            with pytest.raises(BaseException) as raised:
                await run_pipeline(settings, handle_signals=False)
    refused = first_error(raised.value)
    assert isinstance(refused, ConfigError) and refused.exit_code == 2
    assert "NoSuchBucket" in str(refused) and "check --table and the storage options" in str(refused)
    assert not [e for e in logs if e["event"] == "storage_unreachable"]

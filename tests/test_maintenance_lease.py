"""Maintenance that survives a crash, on real tables: a holder killed on this host is taken over at once, an
expired one elsewhere is fenced (its optimize cannot commit), the operator sees and breaks the lease, a busy
lease exits 75 (or is waited for), the daily vacuum survives a restart, and today's compaction leaves grown
files alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import structlog
import trio
from click.testing import CliRunner
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from test_maintenance import (
    TODAY,
    ObservedScheduler,
    Writer,
    assert_rows_once,
    command_group,
    elsewhere,
    files_of,
)

from pistream.errors import MaintenanceBusyError, MaintenanceError
from pistream.lake.holder import this_process
from pistream.lake.lease import FENCE_PROPERTY, Lease, read_state
from pistream.lake.maintenance import MaintenanceScheduler
from pistream.lake.optimize import compact, tiered_target
from pistream.stream.schema import PARTITION_COLUMN


@pytest.fixture
def uri(tmp_path) -> str:
    return str(tmp_path / "table")


def abandon(lease: Lease) -> None:
    """What a crash does to a held lease: it is neither renewed nor released any more."""
    lease._stop.set()
    if lease._keeper is not None:
        lease._keeper.join()
    lease.expires_ms = None


def fenced(uri: str) -> bool:
    return FENCE_PROPERTY in DeltaTable(uri).metadata().configuration


def live_paths(uri: str, day) -> set[str]:
    adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    return {a["path"] for a in adds if a[f"partition.{PARTITION_COLUMN}"] == day}


# The scheduler of a writer on this host, killed (kill -9) in the middle of its compaction: the step is held
# (fault injected) until the kill, so the lease is certainly held when it dies.
KILLED_DURING_A_STEP = """
import sys, threading
from datetime import date
import trio
import pistream.lake.maintenance as maintenance
from pistream.logsetup import configure_logging

def held_compact(*args, **kwargs):
    print("step started", flush=True)
    threading.Event().wait()

configure_logging("json", "warning")
maintenance.compact = held_compact
scheduler = maintenance.MaintenanceScheduler(sys.argv[1], {}, interval=3600, today=lambda: date(2026, 3, 10))
trio.run(scheduler.run_once)
"""


async def test_kill_9_during_a_step_another_writers_scheduler_resumes_at_its_next_pass(uri):
    writer = Writer(uri, "writer-2")
    for _ in range(8):
        writer.commit(TODAY)
    victim = await trio.lowlevel.open_process([sys.executable, "-c", KILLED_DURING_A_STEP, uri],
                                              stdout=subprocess.PIPE)
    try:
        output = b""
        with trio.fail_after(120):
            while b"\n" not in output:
                chunk = await victim.stdout.receive_some()
                assert chunk, "the holder ended before its step started"
                output += chunk
        assert output == b"step started\n"
        state = read_state(uri, {})
        assert state.holder is not None and state.holder.pid == victim.pid and state.held(int(time.time() * 1000))
    finally:
        victim.kill()  # SIGKILL: no release, no clean-up
        with trio.fail_after(60):
            await victim.wait()
        await victim.stdout.aclose()

    scheduler = ObservedScheduler(uri, {}, interval=0.5, today=lambda: TODAY)  # the other writer's scheduler
    with structlog.testing.capture_logs() as logs, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            await trio.to_thread.run_sync(writer.commit, TODAY)
            await scheduler.next_pass()
            nursery.cancel_scope.cancel()

    # Its first pass took the lease over (the 2-minute lease had not expired) and compacted.
    assert scheduler.stats.passes >= 1 and scheduler.stats.busy == 0 and scheduler.stats.failed_steps == 0
    [takeover] = [e for e in logs if e["event"] == "lease_taken_over"]
    assert takeover["previous"] == f"{socket.gethostname()}:{victim.pid}:scheduler"
    assert takeover["reason"] == "its process has ended"
    assert not fenced(uri)  # a dead process needs no fence: appenders were not disturbed
    assert files_of(uri, TODAY) < 9
    assert_rows_once(uri, writer.rows)


def test_a_live_holder_on_this_host_is_not_taken_over_and_a_dead_ones_lease_is(uri):
    Writer(uri, "writer-1").commit(TODAY)
    with Lease(uri, {}, holder=this_process("other-scheduler")):  # this process: alive
        with pytest.raises(MaintenanceBusyError, match=f"{os.getpid()}:other-scheduler holds"):
            Lease(uri, {}, role="optimize").acquire()

    crashed = subprocess.run(  # takes the lease and dies without releasing it
        [sys.executable, "-c", "import os, sys; from pistream.lake.lease import Lease; "
                               "Lease(sys.argv[1], {}, role='crasher').acquire(); os._exit(9)", uri],
        capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr
    state = read_state(uri, {})
    assert state.holder is not None and state.holder.role == "crasher" and state.held(int(time.time() * 1000))

    with Lease(uri, {}, role="optimize") as successor:  # at once: its process has ended
        assert successor.state is not None and successor.state.holder == state.holder
    assert not fenced(uri)


def test_an_expired_holder_elsewhere_is_fenced_its_optimize_in_flight_cannot_commit(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(6):
        writer.commit(TODAY)
    before = live_paths(uri, TODAY)
    now = time.time()
    successor = Lease(uri, {}, holder=elsewhere("next"), ttl=60, clock=lambda: now + 61)

    class FrozenDuringItsStep(Lease):
        """A holder on another host that plans its optimize, then stalls past its lease's expiry."""

        def open_table(self) -> DeltaTable:
            planned = super().open_table()
            successor.acquire()  # meanwhile, the lease expired and another maintainer took it
            return planned

    frozen = FrozenDuringItsStep(uri, {}, holder=elsewhere("frozen"), ttl=60, clock=lambda: now)
    frozen.acquire()
    with pytest.raises(MaintenanceError, match="was not committed: the table's metadata changed"):
        compact(uri, {}, TODAY, lease=frozen)

    assert fenced(uri) and live_paths(uri, TODAY) == before  # nothing rewritten by the old holder
    with pytest.raises(MaintenanceError, match="lost the maintenance lease"):
        frozen.open_table()
    frozen.release()  # not the holder any more: releases nothing
    assert read_state(uri, {}).holder == successor.holder
    result = compact(uri, {}, TODAY, lease=successor)  # the new holder compacts, once
    successor.release()
    assert result.files_removed == 6 and files_of(uri, TODAY) == 1
    assert_rows_once(uri, writer.rows)


def test_the_fence_refuses_any_commit_planned_before_it(uri):
    """The delta-rs behaviour the fence relies on (deltalake 1.6.6): a metadata change fails the optimize
    commit of an older snapshot."""
    writer = Writer(uri, "writer-1")
    for _ in range(3):
        writer.commit(TODAY)
    planned = DeltaTable(uri)
    now = time.time()
    old = Lease(uri, {}, holder=elsewhere("old"), ttl=3, clock=lambda: now - 10)
    old.acquire()
    abandon(old)
    Lease(uri, {}, holder=elsewhere("new")).acquire()  # expired: taken over with the fence
    with pytest.raises(CommitFailedError, match="Metadata changed"):
        planned.optimize.compact()
    assert files_of(uri, TODAY) == 3


def test_status_and_break_lease(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(4):
        writer.commit(TODAY)
    runner = CliRunner()

    def run(*args: str, **kwargs):
        return runner.invoke(command_group(), [*args, "--table", uri], **kwargs)

    fresh = run("maintenance", "status")
    assert fresh.exit_code == 0, fresh.output
    assert "free (never taken)" in fresh.stdout and "vacuum       never" in fresh.stdout

    assert run("optimize").exit_code == 0
    assert run("vacuum").exit_code == 0
    done = json.loads(run("maintenance", "status", "--json").stdout)
    assert done["state"] == "released" and done["holder"].endswith(":vacuum")
    assert done["last_runs"]["compact"] and done["last_runs"]["vacuum"] and done["last_runs"]["z_order"] is None

    stuck = Lease(uri, {}, holder=elsewhere("stuck"))
    stuck.acquire()
    held = run("maintenance", "status")
    assert held.exit_code == 0, held.output
    assert "held by stuck.example:4242:scheduler" in held.stdout and "expires" in held.stdout
    data = json.loads(run("maintenance", "status", "--json").stdout)
    assert data["state"] == "held" and data["holder_gone"] is False and data["since"] and data["renewed"]

    declined = run("maintenance", "break-lease", input="n\n")
    assert declined.exit_code == 1 and "Break it?" in declined.output
    assert json.loads(run("maintenance", "status", "--json").stdout)["state"] == "held"

    broken = run("maintenance", "break-lease", "--yes")
    assert broken.exit_code == 0, broken.output
    assert "broke the maintenance lease held by stuck.example:4242:scheduler" in broken.stdout
    assert json.loads(run("maintenance", "status", "--json").stdout)["state"] == "released"
    with pytest.raises(MaintenanceError, match="lost the maintenance lease"):
        stuck.open_table()  # the old holder starts nothing more
    stuck.release()
    assert run("maintenance", "break-lease").stdout.startswith("the maintenance lease is free")
    assert run("optimize").exit_code == 0
    assert_rows_once(uri, writer.rows)


def test_busy_exits_75_or_waits_for_the_lease(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(4):
        writer.commit(TODAY)
    runner = CliRunner()
    with Lease(uri, {}, holder=elsewhere("nightly")):
        for command in (["optimize"], ["vacuum"], ["optimize", "--wait", "0.5"]):
            busy = runner.invoke(command_group(), [*command, "--table", uri])
            assert busy.exit_code == 75, busy.output
            assert "nightly.example:4242:scheduler holds the maintenance lease" in busy.stderr
            assert "nothing failed" in busy.stderr

    # A holder on another host that crashed: its lease runs out in 3 s and the waiting command takes it.
    crashed = Lease(uri, {}, holder=elsewhere("crashed"), ttl=120, clock=lambda: time.time() - 117)
    crashed.acquire()
    abandon(crashed)
    waited = runner.invoke(command_group(), ["optimize", "--table", uri, "--wait", "120", "--json"])
    assert waited.exit_code == 0, waited.output
    assert json.loads(waited.stdout)[0]["files_removed"] == 4
    assert "lease_waiting" in waited.stderr and "lease_taken_over" in waited.stderr  # the logs
    assert_rows_once(uri, writer.rows)


async def test_the_daily_vacuum_is_not_repeated_after_a_restart(uri):
    Writer(uri, "writer-1").commit(TODAY)

    async def one_pass(**kwargs) -> MaintenanceScheduler:
        scheduler = MaintenanceScheduler(uri, {}, today=lambda: TODAY, vacuum_interval=86_400, **kwargs)
        with trio.fail_after(120):
            await scheduler.run_once()
        assert scheduler.stats.passes == 1 and scheduler.stats.failed_steps == 0
        return scheduler

    assert (await one_pass()).stats.vacuums == 1
    first = read_state(uri, {}).last_runs["vacuum"]
    assert (await one_pass()).stats.vacuums == 0  # a restart: the table says it vacuumed today
    assert read_state(uri, {}).last_runs["vacuum"] == first
    assert (await one_pass(clock=lambda: time.time() + 86_400 + 60)).stats.vacuums == 1  # a day later
    assert read_state(uri, {}).last_runs["vacuum"] > first + 86_400_000


def test_todays_compaction_leaves_grown_files_alone(uri):
    writer = Writer(uri, "writer-1")
    for _ in range(8):
        writer.commit(TODAY, rows=400)
    compact(uri, {}, TODAY, tiered=True)
    [grown] = live_paths(uri, TODAY)

    for _ in range(2):  # newcomers that weigh much less than the grown file: it is not rewritten
        writer.commit(TODAY, rows=50)
    result = compact(uri, {}, TODAY, tiered=True)
    assert grown in live_paths(uri, TODAY) and result.files_removed == 2 and files_of(uri, TODAY) == 2

    for _ in range(10):  # now they outweigh half of it: merged with it
        writer.commit(TODAY, rows=400)
    compact(uri, {}, TODAY, tiered=True)
    assert grown not in live_paths(uri, TODAY) and files_of(uri, TODAY) == 1

    [settled] = live_paths(uri, TODAY)  # a file past the target size is never rewritten, even untiered
    writer.commit(TODAY)
    writer.commit(TODAY)
    size = Path(uri, settled).stat().st_size
    compact(uri, {}, TODAY, target_size=size - 1)
    assert settled in live_paths(uri, TODAY) and files_of(uri, TODAY) == 2
    assert_rows_once(uri, writer.rows)


def test_tiered_compaction_rewrites_each_byte_a_few_times_not_once_per_pass():
    """The plan alone, as delta-rs carries it out (files not over the target merged into one): 500 passes of
    20 new files each. Merging all small files every pass rewrites the whole day each time."""
    settled = 1 << 40
    files: list[int] = []
    rewritten = appended = most = 0
    for _ in range(500):
        files += [1000] * 20
        appended += 20_000
        target = tiered_target(files, settled)
        if target is not None:
            merged = [f for f in files if f <= target]
            files = [f for f in files if f > target] + [sum(merged)]
            rewritten += sum(merged)
        most = max(most, len(files))
    assert rewritten / appended < 12  # 7.9 measured (log base 1.5 of 500 passes is 15.3); merging all: 250
    assert most <= 8  # files after a pass: 5 at most, measured

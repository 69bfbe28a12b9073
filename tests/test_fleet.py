"""pistream processes sharing one table, as a fleet runs them: one app id has one live writer (a second
process exits 2 naming the first; a killed one's claim is taken over at once on its host; a foreign commit with
the app id stops the writer with exit 1), and four ``--shard K/4`` processes of one tags file append to one S3
table with maintenance on, one of them killed and restarted: every value once, no failed commit.

Real processes (``python -m pistream``) against one simulator in the test's Trio loop; the table on local disk
or in moto_server; rows compared with the simulator's ground truth."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import trio
from conftest import compare_with_model, deltalake_rows

from pistream.lake.sink import DeltaSink
from pistream.sim.groundtruth import compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.schema import TABLE_SCHEMA

TAIL_US = 1_000_000  # values sent in the last moments before the stop may still be on the wire
HOST = socket.gethostname()


class Pistream:
    """One ``python -m pistream`` process, its JSON log in a file."""

    def __init__(self, log_path: Path, process: trio.Process):
        self.log_path = log_path
        self.process = process

    @classmethod
    async def start(cls, tmp_path: Path, name: str, *args: str) -> Pistream:
        log_path = tmp_path / f"{name}.log"
        log_file = await trio.to_thread.run_sync(open, log_path, "ab")
        with log_file:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "pistream", "--log-format", "json", *args],
                stdout=subprocess.DEVNULL, stderr=log_file, cwd=tmp_path)
        return cls(log_path, process)

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict]:
        found = [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]
        return [e for e in found if name is None or e["event"] == name]

    async def wait_for(self, event: str, count: int = 1) -> list[dict]:
        """Until the log holds ``count`` such events; fails at once if the process ends first."""
        while len(found := self.events(event)) < count:
            assert self.process.returncode is None, f"{self.log_path.name} ended early:\n{self.text()[-3000:]}"
            await trio.sleep(0.1)
        return found

    async def wait(self) -> int:
        with trio.fail_after(60):
            return await self.process.wait()

    async def kill(self) -> None:
        self.process.kill()  # SIGKILL: no flush, no claim released
        await self.process.wait()

    async def stop(self) -> None:
        """Ctrl+C: flush, commit, release, exit 0."""
        self.process.send_signal(signal.SIGINT)
        code = await self.wait()
        assert code == 0, self.text()[-3000:]


def write_tags(tmp_path: Path, model: SimModel) -> Path:
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    return tags


def windows_of(simulator: Simulator) -> dict[str, tuple[int, int]]:
    return {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}


async def test_one_app_id_one_live_writer_and_a_killed_holder_is_taken_over_at_once(tmp_path):
    model = SimModel.generated(12, rate=5)
    tags, table = write_tags(tmp_path, model), str(tmp_path / "table")
    simulator = Simulator(model, poll_interval=0.2)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            args = ("--tags", str(tags), "--url", simulator.url, "--table", table, "--app-id", "plant-a",
                    "--flush-seconds", "0.5", "--maintenance-interval", "0")
            first = await Pistream.start(tmp_path, "first", *args)
            await first.wait_for("batch_committed")

            second = await Pistream.start(tmp_path, "second", *args, "--state-dir", str(tmp_path / "other"))
            assert await second.wait() == 2
            [error] = [line for line in second.text().splitlines() if line.startswith("pistream: error:")]
            assert f"pistream: error: app id plant-a of {table} is held by {HOST}:{first.process.pid}:writer" \
                in error, error
            assert "give this one its own --app-id (or its own --shard K/N of the tags file)" in error
            assert first.process.returncode is None  # the holder writes on

            await first.kill()
            third = await Pistream.start(tmp_path, "third", *args)  # the same service, restarted
            [taken] = await third.wait_for("claim_taken")
            assert (taken["previous"], taken["reason"]) == (f"{HOST}:{first.process.pid}:writer", "ended")
            await third.wait_for("batch_committed", 2)
            await third.stop()
            nursery.cancel_scope.cancel()
    result = compare_with_model(table, model, windows_of(simulator))
    print(result.summary())
    assert result.tags_with_rows == 12
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


async def test_a_foreign_commit_with_the_app_id_mid_run_stops_the_writer_with_exit_1(tmp_path):
    model = SimModel.generated(4, rate=5)
    tags, table = write_tags(tmp_path, model), str(tmp_path / "table")
    simulator = Simulator(model, poll_interval=0.2)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            writer = await Pistream.start(tmp_path, "writer", "--tags", str(tags), "--url", simulator.url,
                                          "--table", table, "--app-id", "plant-a", "--flush-seconds", "0.3",
                                          "--maintenance-interval", "0")
            await writer.wait_for("batch_committed")
            # e.g. an older pistream, which knows no claim, started by hand with the same app id
            rogue = DeltaSink(table, "plant-a")
            await trio.to_thread.run_sync(rogue.open)
            result = await trio.to_thread.run_sync(rogue.commit, TABLE_SCHEMA.empty_table(), 1000)
            assert not result.skipped
            assert await writer.wait() == 1
            nursery.cancel_scope.cancel()
    [error] = [line for line in writer.text().splitlines() if line.startswith("pistream: error:")]
    assert (f"pistream: error: another process commits to {table} with this writer's app id plant-a: transaction "
            f"version 1000 was written at table version {result.table_version} by a writer without a claim") \
        in error, error
    assert "It stops rather than skip values as already written: give each process its own --app-id" in error
    assert "Traceback" not in writer.text()


@pytest.mark.slow  # 115-156 s on this 2-core machine under load (4 writers, moto_server, maintenance)
async def test_four_shards_of_one_tags_file_share_an_s3_table_with_maintenance_and_a_kill(tmp_path, s3_server):
    model = SimModel.generated(40, rate=2)
    tags, table = write_tags(tmp_path, model), s3_server.table_uri("fleet")
    config = tmp_path / "pistream.toml"
    config.write_text("[pistream.storage_options]\n"
                      + "".join(f'{k} = "{v}"\n' for k, v in s3_server.storage_options.items()))
    simulator = Simulator(model, poll_interval=0.2)
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)

            async def shard(k: int, name: str) -> Pistream:
                # default app id and state dir: both carry the shard
                return await Pistream.start(tmp_path, name, "--tags", str(tags), "--url", simulator.url,
                                            "--table", table, "--config", str(config), "--shard", f"{k}/4",
                                            "--flush-seconds", "1", "--maintenance-interval", "10")

            fleet = {k: await shard(k, f"shard-{k}") for k in range(1, 5)}
            for process in fleet.values():
                await process.wait_for("batch_committed")
            killed = fleet[2]
            await killed.kill()  # before its first maintenance pass (10 s after its start)
            fleet[2] = await shard(2, "shard-2-restarted")
            [taken] = await fleet[2].wait_for("claim_taken")
            assert taken["reason"] == "ended"
            await fleet[2].wait_for("batch_committed", 3)
            while not any(p.events("maintenance_finished") for p in fleet.values()):  # noqa: ASYNC110
                await trio.sleep(0.2)
            async with trio.open_nursery() as stopping:  # a fleet stops together
                for process in fleet.values():
                    stopping.start_soon(process.stop)
            nursery.cancel_scope.cancel()

    selected = [p.events("shard_selected")[0] for p in fleet.values()]
    assert sorted(e["shard"] for e in selected) == ["1/4", "2/4", "3/4", "4/4"]
    assert sum(e["tags"] for e in selected) == 40
    app_ids = {p.events("claim_taken")[0]["app_id"] for p in fleet.values()}
    assert len(app_ids) == 4 and all(a.startswith(f"pistream-{HOST}-") for a in app_ids)
    logs = [killed, *fleet.values()]
    assert not [e for p in logs for e in p.events("commit_failed")]
    summaries = [p.events("pistream_stopped")[0] for p in fleet.values()]
    assert all(s["failed_commits"] == 0 for s in summaries)
    rows = await trio.to_thread.run_sync(deltalake_rows, table, s3_server.storage_options)
    # Values a shard had not taken off its socket when it was stopped are read back by its next start, not
    # part of this test: each tag's window ends at its newest row, which must lie past the kill.
    newest: dict[str, int] = {}
    for webid, timestamp_us, *_ in rows:
        newest[webid] = max(timestamp_us, newest.get(webid, 0))
    restarted_us = int(datetime.fromisoformat(taken["timestamp"]).timestamp() * 1_000_000)
    assert min(newest.values()) > restarted_us
    windows = {w: (first, min(last, newest[w])) for w, (first, last) in windows_of(simulator).items()}
    result = compare_rows(rows, model, windows)
    print(result.summary(), [p.events("maintenance_finished") for p in fleet.values()])
    assert result.tags_with_rows == 40
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()

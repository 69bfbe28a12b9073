"""The writer claim on real local Delta tables: one live writer per app id, a second one refused naming the
first, a claim taken over after its expiry, another writer's commit found mid-run never skipped, a commit
that landed but was reported failed skipped, and a commit whose log version keeps being taken retried with
its own files. Processes: tests/test_fleet.py."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pytest
import trio
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from pistream.errors import ForeignWriterError, SinkError, TableConflictError
from pistream.lake import datafiles
from pistream.lake.claim import RECORD_KEY, ClaimRecord, WriterClaim, claim_txn_id, hold
from pistream.lake.holder import Holder, this_process
from pistream.lake.sink import DeltaSink
from pistream.stream.schema import PARTITION_COLUMN, TABLE_SCHEMA

DAY = date(2026, 3, 10)


def events(first: int, rows: int = 10) -> pa.Table:
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
    times = [start + timedelta(milliseconds=n) for n in range(first, first + rows)]
    return pa.table({
        "tag": ["\\\\SRV\\T"] * rows, "tag_webid": ["W"] * rows, "timestamp": times,
        "value": [float(n) for n in range(rows)], "value_text": pa.nulls(rows, pa.string()),
        "state_code": pa.nulls(rows, pa.int32()), "system_state": [False] * rows, "uom": ["degC"] * rows,
        "good": [True] * rows, "questionable": [False] * rows, "substituted": [False] * rows,
        "annotated": [False] * rows, "received_timestamp": times, PARTITION_COLUMN: [DAY] * rows,
    }, schema=TABLE_SCHEMA)


class Clock:
    """Wall time that a test can move forward (claims compare expiries in epoch milliseconds)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def claimed(uri: str, app_id: str = "writer", **claim_options) -> tuple[DeltaSink, WriterClaim]:
    sink = DeltaSink(uri, app_id)
    sink.open()
    claim = WriterClaim(app_id, **claim_options)
    sink.take_claim(claim)
    return sink, claim


def rows_in(uri: str) -> int:
    return DeltaTable(uri).to_pyarrow_table(columns=["timestamp"]).num_rows


def test_a_second_writer_with_the_same_app_id_is_refused_naming_the_first(tmp_path):
    uri = str(tmp_path / "table")
    first, claim = claimed(uri)
    assert first.commit(events(0), 1).rows == 10

    second = DeltaSink(uri, "writer")
    with pytest.raises(TableConflictError) as refused:
        second.take_claim(WriterClaim("writer"))
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert f"app id writer of {uri} is held by {this_process('writer').text()} (run {claim.instance}" in message
    assert "give this one its own --app-id (or its own --shard K/N" in message
    # another app id on the same table is another writer: fine
    claimed(uri, "other")[0].commit(events(100), 1)
    assert first.commit(events(200), 2).rows == 10 and rows_in(uri) == 30


def test_a_claim_of_another_host_is_taken_over_after_it_expires_and_its_writer_then_stops(tmp_path):
    uri = str(tmp_path / "table")
    clock = Clock()
    elsewhere = Holder("plant-b.example", 4242, None, "writer")
    old, old_claim = claimed(uri, clock=clock, ttl=30, holder=elsewhere)
    old.commit(events(0), 1)  # a data commit renews the claim: 30 s from now

    clock.now += 25  # not expired yet: refused, naming the other host's process
    with pytest.raises(TableConflictError, match="held by plant-b.example:4242:writer"):
        claimed(uri, clock=clock, ttl=30)
    clock.now += 10  # expired (its host stopped renewing): taken over
    new, new_claim = claimed(uri, clock=clock, ttl=30)
    assert new_claim.txn_version == 1  # the new run goes on from the table's transaction version
    assert new.commit(events(100), 2).rows == 10

    with pytest.raises(ForeignWriterError) as stopped:  # the old writer comes back: it stops, loudly
        old.commit(events(200), 2)
    assert stopped.value.exit_code == 1
    assert "took it over" in str(stopped.value) and f"run {new_claim.instance}" in str(stopped.value)
    assert rows_in(uri) == 20


def test_a_foreign_commit_with_the_app_id_mid_run_stops_the_writer_naming_it(tmp_path):
    uri = str(tmp_path / "table")
    sink, claim = claimed(uri)
    sink.commit(events(0), 1)
    rogue = DeltaSink(uri, "writer")  # e.g. an older pistream, which knows no claim, with the same app id
    rogue.commit(events(500), 7)
    with pytest.raises(ForeignWriterError) as stopped:
        sink.commit(events(100), 2)
    text = str(stopped.value)
    assert "transaction version 7 was written at table version 3 by a writer without a claim" in text
    assert "expected 1" in text and "--app-id" in text
    with pytest.raises(ForeignWriterError):  # and it stays stopped
        sink.commit(events(100), 2)
    assert rows_in(uri) == 20


def test_a_commit_that_landed_but_was_reported_failed_is_skipped_as_this_runs_own(tmp_path, monkeypatch):
    uri = str(tmp_path / "table")
    sink, claim = claimed(uri)
    landed_then_failed = [True]
    commit_actions = DeltaSink._commit_actions

    def flaky(self, table, actions, txn_version):
        commit_actions(self, table, actions, txn_version)
        if landed_then_failed.pop() if landed_then_failed else False:
            raise OSError("connection reset after the commit (injected)")

    monkeypatch.setattr(DeltaSink, "_commit_actions", flaky)
    with pytest.raises(SinkError, match="connection reset"):
        sink.commit(events(0), 1)
    again = sink.commit(events(0), 1)
    assert again.skipped and rows_in(uri) == 10
    assert not sink.commit(events(10), 2).skipped and rows_in(uri) == 20


def test_every_commit_records_its_writer_and_renews_the_claim(tmp_path):
    uri = str(tmp_path / "table")
    sink, claim = claimed(uri)
    table = DeltaTable(uri)
    before = table.transaction_version(claim_txn_id("writer"))
    sink.commit(events(0), 1)
    table.update_incremental()
    assert table.transaction_version(claim_txn_id("writer")) > before
    [commit] = table.history(1)
    record = ClaimRecord.from_commit(commit)
    assert commit["pistream.txn_version"] == "1" and commit["pistream.app_id"] == "writer"
    assert record is not None and record.instance == claim.instance and record.holder == this_process("writer")
    assert json.loads(commit[RECORD_KEY])["action"] == "commit"


async def test_an_idle_writer_renews_its_claim_and_releases_it_at_the_end(tmp_path):
    uri = str(tmp_path / "table")
    sink = DeltaSink(uri, "idle")
    await trio.to_thread.run_sync(sink.open)
    claim = WriterClaim("idle", ttl=3)  # renewed after 1 s without a data commit
    table = DeltaTable(uri)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(hold, sink, claim)
            actions: list[str] = []
            while "renewed" not in actions:
                await trio.sleep(0.2)
                table.update_incremental()
                actions = [json.loads(c[RECORD_KEY])["action"] for c in table.history() if RECORD_KEY in c]
            nursery.cancel_scope.cancel()
    table.update_incremental()
    [last] = table.history(1)
    assert json.loads(last[RECORD_KEY])["action"] == "released"
    DeltaSink(uri, "idle").take_claim(WriterClaim("idle"))  # free at once, on any host


def test_a_commit_whose_log_version_keeps_being_taken_is_retried_with_the_same_files(tmp_path, monkeypatch):
    """delta-rs gives up after 15 lost races (maintenance and lease commits winning): the sink tries the same
    transaction version again, with the files it wrote once, instead of failing the batch."""
    uri = str(tmp_path / "table")
    sink, claim = claimed(uri)
    monkeypatch.setattr("pistream.lake.sink.time.sleep", lambda seconds: None)
    written: list[int] = []
    write_partitions = datafiles.write_partitions

    def counting(files, batch):
        written.append(batch.num_rows)
        return write_partitions(files, batch)

    monkeypatch.setattr("pistream.lake.sink.write_partitions", counting)
    lost = [3]
    commit_actions = DeltaSink._commit_actions

    def losing(self, table, actions, txn_version):
        if lost[0]:
            lost[0] -= 1
            raise CommitFailedError("Failed to commit transaction: 15")
        commit_actions(self, table, actions, txn_version)

    monkeypatch.setattr(DeltaSink, "_commit_actions", losing)
    result = sink.commit(events(0), 1)
    assert (result.rows, result.skipped, written) == (10, False, [10])
    assert rows_in(uri) == 10 and DeltaTable(uri).transaction_version("writer") == 1

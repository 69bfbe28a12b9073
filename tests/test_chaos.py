"""Chaos: pistream as a real process against a misbehaving simulator (values shuffled, late, repeated),
its channels closed, killed without a close frame or gone silent every few seconds, the process killed
with SIGKILL and restarted several times, then stopped with SIGINT; on S3 and Azure, the storage also
freezes under the last process. At the end every event is in the table exactly once."""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import trio
from conftest import compare_with_model, deltalake_rows

from pistream.sim.faults import Faults
from pistream.sim.groundtruth import compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

TAIL_US = 1_000_000


async def run_chaos(tmp_path, table: str, storage_options: dict[str, str] | None = None, *, kills: int = 3,
                    storage_fault=None):
    model = SimModel.generated(200, rate=5)  # 1,000 events/s
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    # The server misbehaves like real ones: values shuffled, some sent late, some sent twice.
    simulator = Simulator(model, poll_interval=0.2,
                          faults=Faults(shuffle=True, late_fraction=0.05, repeat_last=0.05, seed=7))
    rng = random.Random(7)
    log_path = tmp_path / "pistream.log"
    log_file = await trio.to_thread.run_sync(open, log_path, "ab")
    with trio.fail_after(120), log_file:
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)

            async def break_channels():
                """Clean closes, sockets killed without a close frame, and channels gone silent."""
                while True:
                    await trio.sleep(rng.uniform(2, 4))
                    fault = rng.choice(["drop", "kill", "silence"])
                    if fault == "drop":
                        await simulator.drop_channels()
                    elif fault == "kill":
                        simulator.faults.kill_channels()
                    else:
                        simulator.faults.silence(4)

            nursery.start_soon(break_channels)
            config = tmp_path / "pistream.toml"
            options = "".join(f'{k} = "{v}"\n' for k, v in (storage_options or {}).items())
            await trio.Path(config).write_text(f"[pistream.storage_options]\n{options}")
            command = [sys.executable, "-m", "pistream", "--tags", str(tags), "--url", simulator.url,
                       "--table", table, "--state-dir", str(tmp_path / "state"), "--flush-seconds", "1",
                       "--stall-seconds", "2", "--heartbeat-rate", "1", "--silence-seconds", "2",
                       "--log-format", "json", "--app-id", "chaos",
                       "--config", str(config)]
            for round_no in range(kills + 1):
                last_with_outage = round_no == kills and storage_fault is not None
                log_start = log_path.stat().st_size
                process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=log_file)
                outage_over = trio.Event()
                if last_with_outage:  # the storage goes away under the last process, once it streams
                    nursery.start_soon(storage_fault, log_path, log_start, outage_over)
                try:
                    if last_with_outage:  # it outlives the outage, then has a while to catch up
                        await outage_over.wait()
                        await trio.sleep(4)
                    else:
                        await trio.sleep(rng.uniform(4, 7))
                    if round_no < kills:
                        process.kill()  # SIGKILL: no flush, no state save
                        await process.wait()
                        await trio.sleep(rng.uniform(0.5, 2))  # downtime
                    else:
                        process.send_signal(signal.SIGINT)
                        with trio.fail_after(60):
                            code = await process.wait()
                        assert code == 0, log_path.read_text()[-3000:]
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            nursery.cancel_scope.cancel()
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    return model, windows, log_path


async def test_chaos_on_local_disk(tmp_path):
    table = str(tmp_path / "table")
    model, windows, log_path = await run_chaos(tmp_path, table)
    result = compare_with_model(table, model, windows)
    print("chaos local:", result.summary())
    log_text = log_path.read_text()
    assert log_text.count('"event": "gap_filled"') >= 3
    assert result.tags_with_rows == 200
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


def frozen_for_a_while(server, seconds: float):
    """A storage outage: the server process stopped (SIGSTOP) once the process has committed (so that the
    outage falls on a running stream, not on its start-up, however busy the machine), then resumed."""

    async def fault(log_path, log_start: int, over: trio.Event):
        for _ in range(300):  # the run's own deadline bounds it too
            if '"event": "batch_committed"' in log_path.read_text()[log_start:]:
                break
            await trio.sleep(0.2)
        else:
            raise AssertionError("the last process committed nothing within 60 s")
        server.freeze()
        try:
            await trio.sleep(seconds)
        finally:
            server.thaw()
            over.set()

    return fault


async def check_cloud_chaos(tmp_path, server, label: str) -> None:
    table = server.table_uri("chaos")
    model, windows, log_path = await run_chaos(tmp_path, table, server.storage_options,
                                               storage_fault=frozen_for_a_while(server, 10))
    result = compare_rows(deltalake_rows(table, server.storage_options), model, windows)
    log_text = log_path.read_text()
    stalls = log_text.count('"event": "channel_paused"') + log_text.count('"event": "commit_failed"')
    print(f"chaos {label}:", result.summary(), f"stalls={stalls}")
    assert stalls >= 1  # the outage was felt: channels paused or commits failed, and nothing was lost
    assert result.tags_with_rows == 200
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


async def test_chaos_on_s3(tmp_path, s3_server):
    await check_cloud_chaos(tmp_path, s3_server, "s3")


async def test_chaos_on_azure(tmp_path, azurite_server):
    await check_cloud_chaos(tmp_path, azurite_server, "azure")

"""Issue 23: the value shapes the README documents are the ones in the table, with either decoder. A
loopback WebSocket server sends odd states and flags on a real channel; the real reader and flusher take
them, a real Delta table is committed and read back by DuckDB (delta-kernel)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from conftest import duckdb_rows
from trio_websocket import serve_websocket

import pistream.stream.columns as columns_module
from pistream.lake.sink import DeltaSink
from pistream.pi.channel import ChannelReader
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC
from pistream.stream.flusher import Flusher

T0 = 1_709_251_200_000_000  # 2024-03-01T00:00:00Z in us

# (Value, extra fields) -> (value, value_text, state_code, system_state, good, questionable)
STATES = [  # one frame the codec reads itself (its odd states go to Python whole)
    ({"Name": "Big", "Value": 99999999999, "IsSystem": False}, {},
     (None, '{"Name":"Big","Value":99999999999,"IsSystem":false}', None, False, True, False)),
    ({"Name": "Neg", "Value": -2147483649}, {}, (None, '{"Name":"Neg","Value":-2147483649}', None, False, True, False)),
    ({"Name": None, "Value": 5, "IsSystem": True}, {}, (None, None, 5, True, False, False)),
    ({"Name": "S", "Value": 7, "IsSystem": "yes"}, {}, (None, "S", 7, False, True, False)),
    ({"Name": "S", "Value": 8, "IsSystem": 1}, {}, (None, "S", 8, False, True, False)),
    ({"Name": "S", "Value": 9, "IsSystem": "TRUE"}, {}, (None, "S", 9, True, False, False)),
    ({"Name": "Shutdown", "Value": 254, "IsSystem": True}, {}, (None, "Shutdown", 254, True, False, False)),
    ({"Name": 5, "Value": 1}, {}, (None, '{"Name":5,"Value":1}', None, False, True, False)),
]
FLAGS = [  # quality flags of other types: the codec leaves the frame to msgspec
    (1.5, {"Good": 1, "Questionable": "yes"}, (1.5, None, None, False, True, False)),
    (2.5, {"Good": "False", "Questionable": " true"}, (2.5, None, None, False, False, True)),
    (3.5, {"Good": None, "Questionable": 0}, (3.5, None, None, False, True, False)),
    (4.5, {"Good": {"a": 1}, "Questionable": [True]}, (4.5, None, None, False, True, False)),
]


def frame(cases: list, first: int) -> bytes:
    items = [{"Timestamp": f"2024-03-01T00:00:{first + i:02d}Z", "Value": value, **extra}
             for i, (value, extra, _) in enumerate(cases)]
    return json.dumps({"Links": {}, "Items": [{"WebId": "W1", "Path": "\\\\X\\Y", "Items": items}]}).encode()


@pytest.mark.parametrize("codec", [
    pytest.param(True, id="C codec", marks=pytest.mark.skipif(not FRAME_CODEC, reason="the C codec is not built")),
    pytest.param(False, id="msgspec"),
])
async def test_odd_states_and_flags_land_as_documented(tmp_path, monkeypatch, codec):
    if not codec:
        monkeypatch.setattr(columns_module, "_framecodec", None)
    last = [(99.0, {}, (99.0, None, None, False, True, False))]  # the last frame: all the others were read
    frames = [frame(STATES, 0), frame(FLAGS, 30), frame(last, 59)]
    assert all(len(f) >= 256 for f in frames[:2])  # read raw by the codec, not decoded by the reader

    async def handler(request):
        ws = await request.accept()
        for f in frames:
            await ws.send_message(f)
        await trio.sleep_forever()

    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1", "m")})
    incoming_send, incoming_receive = trio.open_memory_channel(100)
    out_send, out_receive = trio.open_memory_channel(100)
    flusher = Flusher(buffer, incoming_receive, out_send, max_rows=1000, max_age=0.2)
    sink = DeltaSink(str(tmp_path / "table"), "app")
    sink.open()
    done = False
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            await nursery.start(flusher.run)
            reader = ChannelReader("ch-1", f"http://127.0.0.1:{server.port}/piwebapi", ["W1"], incoming_send,
                                   heartbeat_rate=0, raw_frames=codec)
            nursery.start_soon(reader.run)
            version = 0
            while not done:
                batch = (await out_receive.receive()).batch
                version += 1
                await trio.to_thread.run_sync(sink.commit, batch, version)
                done = 99.0 in batch.column("value").to_pylist()
            nursery.cancel_scope.cancel()
    assert buffer.malformed == reader.stats.malformed == 0
    table: list[tuple[Any, ...]] = duckdb_rows(
        tmp_path / "table", "tag, value, value_text, state_code, system_state, good, questionable",
        "ORDER BY timestamp")
    assert [r[1:] for r in table] == [expected for _, _, expected in STATES + FLAGS + last]
    assert {r[0] for r in table} == {"\\\\S\\T1"}  # the resolved path, not the message's

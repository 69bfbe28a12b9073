"""Issue 23 over the real pipeline (simulator REST and channels on loopback, a real Delta table read back
by DuckDB), with either decoder: a server or proxy that sends values under WebIds nobody subscribed to (one
of them carrying a listed tag's Path), rewrites every stream's Path, and mixes in malformed frames and a
value without a usable timestamp. The table holds exactly the model's events, under the paths tag
resolution gave; what was dropped is counted in ``stream_stats``, ``/metrics`` and ``pistream_stopped``,
and each foreign WebId is logged once."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
import structlog
import trio
from conftest import compare_with_model, duckdb_rows
from test_end_to_end import PATHS, served, windows_of
from test_metrics import parse

import pistream.pipeline as pipeline_module
import pistream.sim.server as server_module
import pistream.stream.buffer as buffer_module
import pistream.stream.columns as columns_module
from pistream.pi.flow import Live
from pistream.pipeline import run_pipeline
from pistream.sim.channel import ChannelSession
from pistream.sim.model import SimModel
from pistream.sim.payloads import Wire
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC, LOGGED_WEBID_CHARS, MAX_LOGGED_WEBIDS

FOREIGN = ["P1DPRk9SRUlHTjE", "P1DPRk9SRUlHTjI"]


@pytest.fixture(params=["C codec", "msgspec"])
def decoder(request, monkeypatch):
    """The C frame codec where built, or the msgspec path as where it is not."""
    if request.param == "C codec":
        if not FRAME_CODEC:
            pytest.skip("the C frame codec is not built here")
    else:
        monkeypatch.setattr(columns_module, "_framecodec", None)
        monkeypatch.setattr(buffer_module, "FRAME_CODEC", False)
        monkeypatch.setattr(pipeline_module, "FRAME_CODEC", False)
    return request.param


def _value(second: int, value: Any) -> dict[str, Any]:
    return {"Timestamp": f"2024-03-01T00:00:{second:02d}Z", "Value": value, "Good": True}


class Hostile:
    """Frames the first channel session sends once, right after its first message."""

    def __init__(self, model: SimModel) -> None:
        listed = model.tags[0]
        self.frames = [
            # Large (the codec reads it raw): two foreign WebIds, the first with a listed tag's Path, beside
            # a padding field. 5 values.
            {"Links": {"pad": "x" * 300}, "Items": [
                {"WebId": FOREIGN[0], "Path": listed.path, "Items": [_value(1, 1.0), _value(2, "on"), _value(3, 3)]},
                {"WebId": FOREIGN[1], "Items": [_value(4, 4.5), _value(5, {"Name": "On", "Value": 1})]},
            ]},
            # Small (the reader decodes it): the first foreign WebId again. 1 value, no second log line.
            {"Items": [{"WebId": FOREIGN[0], "Path": listed.path, "Items": [_value(6, 6.0)]}]},
            # A listed tag's value without a usable timestamp: rejected.
            {"Items": [{"WebId": listed.webid, "Items": [{"Timestamp": "yesterday", "Value": 1.0}]}]},
        ]
        self.texts = [json.dumps(f).encode() for f in self.frames] + [
            b'{"Items":[{"WebId":"' + b"x" * 300 + b'","Items":[',  # malformed, large
            b'{"Items":[1,',  # malformed, small
        ]
        self.unsubscribed, self.rejected, self.malformed = 6, 1, 2
        self.armed = True
        self.sent = trio.Event()


class RewritingWire(Wire):
    """A proxy that rewrites every channel stream's Path: the table must keep the resolved path."""

    def stream_values(self, tag, events, *, channel=False):
        out = super().stream_values(tag, events, channel=channel)
        if not channel:
            return out
        evil = "\\\\EVIL\\" + tag.path.rsplit("\\", 1)[-1]
        return msgspec.structs.replace(out, Path=evil) if not isinstance(out, dict) else {**out, "Path": evil}


@pytest.fixture
def hostile_server(monkeypatch):
    box: dict[str, Hostile] = {}

    class Injecting(ChannelSession):
        async def _send(self, batch):
            sent = await super()._send(batch)
            hostile = box.get("hostile")
            if sent and hostile is not None and hostile.armed:
                hostile.armed = False
                for text in hostile.texts:
                    await self._ws.send_text(text)
                hostile.sent.set()
            return sent

    monkeypatch.setattr(server_module, "ChannelSession", Injecting)
    return box


async def test_only_subscribed_values_land_and_the_dropped_ones_are_counted(tmp_path, decoder, hostile_server):
    model = SimModel.from_paths(PATHS, rate=20)
    hostile = hostile_server["hostile"] = Hostile(model)
    stop = trio.Event()
    seen: dict[str, Any] = {}
    expected = {"frames_malformed": hostile.malformed, "values_rejected": hostile.rejected,
                "values_unsubscribed": hostile.unsubscribed}
    metric_names = {f"pistream_{k}_total": v for k, v in expected.items()}
    with structlog.testing.capture_logs() as logs, trio.fail_after(90):
        async with served(tmp_path, model, flush_seconds=0.3, stats_interval=0.2, metrics_port=0) as (
                simulator, settings):
            simulator.wire = RewritingWire()  # channels only: REST (tag resolution) keeps the true paths

            async def watch() -> None:
                """Until /metrics and a stream_stats line show every count (bounded by fail_after)."""
                await hostile.sent.wait()  # the channels are up, so /metrics is served (started before them)
                url = next(e["url"] for e in logs if e["event"] == "metrics_served")
                async with httpx.AsyncClient(timeout=10) as client:
                    while True:
                        response = await client.get(url)
                        metrics = parse(response.text)
                        stats = [e for e in logs if e["event"] == "stream_stats"]
                        if all(metrics.get(n) == v for n, v in metric_names.items()) and stats and all(
                                stats[-1][k] == v for k, v in expected.items()):
                            seen["metrics_text"], seen["metrics"], seen["stats"] = response.text, metrics, stats[-1]
                            break
                        await trio.sleep(0.1)
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                summary = await run_pipeline(settings, stop, handle_signals=False)
    print(decoder, summary)

    # The counts, in all three places.
    assert (summary.frames_malformed, summary.rejected, summary.values_unsubscribed) == (
        hostile.malformed, hostile.rejected, hostile.unsubscribed)
    [stopped] = [e for e in logs if e["event"] == "pistream_stopped"]
    assert stopped["values_unsubscribed"] == hostile.unsubscribed and stopped["frames_malformed"] == hostile.malformed
    for name in metric_names:
        assert f"# HELP {name} " in seen["metrics_text"] and f"# TYPE {name} counter" in seen["metrics_text"]
    # Each foreign WebId logged once, however often it came.
    assert sorted(e["webid"] for e in logs if e["event"] == "values_unsubscribed") == FOREIGN
    assert len([e for e in logs if e["event"] == "frame_malformed"]) == hostile.malformed

    # The table: every emitted event once, nothing else; tags as resolved, never the message's Path.
    table = settings.table
    result = compare_with_model(table, model, windows_of(simulator))
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()
    assert summary.values_written == result.found > len(PATHS)
    assert set(duckdb_rows(table, "DISTINCT tag, tag_webid")) == {(t.path, t.webid) for t in model.tags}


def test_foreign_webids_are_logged_once_and_remembered_up_to_a_bound(decoder):
    """A server sending ever new WebIds (some megabytes long) cannot grow memory: the first
    MAX_LOGGED_WEBIDS are logged once each (cut to LOGGED_WEBID_CHARS), then one line says the rest are
    only counted; every value is counted."""
    value = _value(1, 1.0)
    long_webid = "L" * 5000
    streams = [{"WebId": long_webid, "Items": [value, value]}] + [
        {"WebId": f"F{i}", "Items": [value]} for i in range(MAX_LOGGED_WEBIDS + 100)]
    frame = json.dumps({"Items": [{"WebId": "W1", "Items": [value]}, *streams]}).encode()
    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1")})
    with structlog.testing.capture_logs() as logs:
        for i in range(3):
            received, _ = buffer.add_live_batch([Live(i, None, frame, "ch-1")])
            assert received == 2 + MAX_LOGGED_WEBIDS + 100 + 1
    assert buffer.unsubscribed.values == 3 * (2 + MAX_LOGGED_WEBIDS + 100)
    lines = [e for e in logs if e["event"] == "values_unsubscribed"]
    assert len(lines) == MAX_LOGGED_WEBIDS and len({e["webid"] for e in lines}) == MAX_LOGGED_WEBIDS
    assert lines[0]["webid"] == "L" * LOGGED_WEBID_CHARS and lines[0]["cut"] and lines[0]["values"] == 2
    assert len([e for e in logs if e["event"] == "values_unsubscribed_many"]) == 1
    taken = buffer.take()
    assert taken is not None and taken.batch.column("tag_webid").to_pylist() == ["W1"]  # once: repeats dropped

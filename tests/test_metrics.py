"""/metrics and /healthz against a running pipeline (the built-in simulator, a real Delta table on tmp_path)."""

from __future__ import annotations

import time

import httpx
import pytest
import trio
from test_end_to_end import PATHS, served

import pistream.pipeline as pipeline_module
from pistream.errors import SinkError
from pistream.lake.sink import DeltaSink
from pistream.metrics import Histogram, MetricsServer
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel
from pistream.streamstats import StatsReporter


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition (name{labels} -> value); comment lines checked for shape."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split(" ", 2)[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


@pytest.fixture
def metrics_beside_pipeline(monkeypatch):
    """Starts a MetricsServer next to the pipeline's StatsReporter (the wiring pipeline.py will get)."""
    box: dict[str, MetricsServer] = {}
    ready = trio.Event()

    class WithMetrics(StatsReporter):
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            async with trio.open_nursery() as nursery:
                server = MetricsServer(self, port=0, stale_after=1.5, startup_grace=3,
                                       credential_expiry=lambda: time.time() + 3600)
                await nursery.start(server.run)
                box["server"] = server
                ready.set()
                await super().run(task_status=task_status)

    monkeypatch.setattr(pipeline_module, "StatsReporter", WithMetrics)
    return box, ready


async def test_metrics_and_health_while_streaming(tmp_path, metrics_beside_pipeline):
    box, ready = metrics_beside_pipeline
    model = SimModel.from_paths(PATHS, rate=50)
    seen: dict[str, object] = {}
    with trio.fail_after(30):
        async with served(tmp_path, model, duration=4, flush_seconds=0.3) as (simulator, settings):

            async def scrape():
                await ready.wait()
                base = f"http://127.0.0.1:{box['server'].port}"
                async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                    await trio.sleep(1.5)
                    first = parse((await client.get("/metrics")).text)
                    await trio.sleep(1)
                    response = await client.get("/metrics")
                    seen["content_type"] = response.headers["content-type"]
                    seen["second"] = parse(response.text)
                    seen["first"] = first
                    health = await client.get("/healthz")
                    seen["health"] = (health.status_code, health.text)
                    seen["404"] = (await client.get("/nope")).status_code
                    # a malformed request gets 400 and the server keeps serving
                    stream = await trio.open_tcp_stream("127.0.0.1", box["server"].port)
                    async with stream:
                        await stream.send_all(b"\x00garbage\r\n\r\n")
                        seen["malformed"] = await stream.receive_some(1024)
                    # an oversized request line is refused too
                    seen["oversized"] = (await client.get("/metrics?" + "x" * 10_000)).status_code
                    seen["after"] = (await client.get("/healthz")).status_code

            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrape)
                await run_pipeline(settings, handle_signals=False)
    first, second = seen["first"], seen["second"]
    assert isinstance(first, dict) and isinstance(second, dict)
    assert seen["content_type"].startswith("text/plain; version=0.0.4")
    assert second["pistream_up"] == 1
    assert second["pistream_values_received_total"] > first["pistream_values_received_total"] > 0
    assert second["pistream_commits_total"] >= 1 and second["pistream_values_written_total"] > 0
    assert second["pistream_channels"] == second["pistream_channels_live"] >= 1
    assert second["pistream_gaps_lost_total"] == 0
    assert 3500 < second["pistream_credential_expiry_seconds"] <= 3600
    assert 'pistream_commit_duration_seconds_bucket{le="+Inf"}' in second
    assert second["pistream_last_commit_age_seconds"] < 1.5
    assert seen["health"] == (200, "ok\n")
    assert seen["404"] == 404
    assert isinstance(seen["malformed"], bytes) and seen["malformed"].startswith(b"HTTP/1.1 400")
    assert seen["oversized"] == 400 and seen["after"] == 200


class StalledSink(DeltaSink):
    """Storage that stops accepting commits after a moment (each attempt fails)."""

    def __init__(self, *args, down_from: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.down_from = down_from

    def commit(self, batch, txn_version, written_ahead=()):
        if time.monotonic() >= self.down_from:
            raise SinkError("storage unavailable (injected)")
        return super().commit(batch, txn_version, written_ahead)


async def test_healthz_is_503_when_storage_stalls(tmp_path, metrics_beside_pipeline):
    box, ready = metrics_beside_pipeline
    model = SimModel.from_paths(PATHS, rate=50)
    stop = trio.Event()
    seen = {}
    sink = StalledSink(str(tmp_path / "table"), "stall-test", down_from=time.monotonic() + 1.0)
    with trio.fail_after(30):
        async with served(tmp_path, model, flush_seconds=0.2, stall_seconds=1) as (simulator, settings):

            async def probe():
                await ready.wait()
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{box['server'].port}", timeout=5) as c:
                    await trio.sleep(0.8)
                    seen["before"] = (await c.get("/healthz")).status_code
                    await trio.sleep(2.5)
                    response = await c.get("/healthz")
                    seen["stalled"] = (response.status_code, response.text)
                    seen["metrics"] = parse((await c.get("/metrics")).text)
                sink.down_from = float("inf")  # storage back: the pipeline drains and stops
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                await run_pipeline(settings, stop, handle_signals=False, sink=sink)
    assert seen["before"] == 200
    status, reason = seen["stalled"]
    assert status == 503 and "no commit for" in reason and "storage stalled" in reason
    assert seen["metrics"]["pistream_commit_failures_total"] >= 1
    assert seen["metrics"]["pistream_lag_seconds"] > 1


async def test_healthz_is_503_when_channels_are_down(tmp_path, metrics_beside_pipeline):
    box, ready = metrics_beside_pipeline
    model = SimModel.from_paths(PATHS, rate=20)
    seen = {}
    with trio.fail_after(30):
        async with served(tmp_path, model, duration=3, flush_seconds=0.2) as (simulator, settings):

            async def probe():
                await ready.wait()
                server = box["server"]
                await trio.sleep(1)
                # the server drops every channel and refuses the reconnects for a while
                simulator.faults.reject_channels(503, count=1000, retry_after=1)
                await simulator.drop_channels()
                await trio.sleep(0.5)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as c:
                    response = await c.get("/healthz")
                simulator.faults.channel_rejections.clear()
                seen["down"] = (response.status_code, response.text)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                await run_pipeline(settings, handle_signals=False)
    status, reason = seen["down"]
    assert status == 503 and f"of {len(box['server'].stats.readers)} channels down" in reason


def test_histogram_is_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 2.0):
        h.observe(v)
    assert h.render("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1.0"} 2', 'x_bucket{le="+Inf"} 3',
                             "x_sum 2.55", "x_count 3"]


async def test_metrics_port_setting_serves_the_running_pipeline(tmp_path):
    """``--metrics-port`` as a user sets it: the pipeline serves /metrics itself, with each commit in the
    commit-duration histogram."""
    import structlog

    model = SimModel.from_paths(PATHS, rate=20)
    seen: dict[str, object] = {}
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with served(tmp_path, model, duration=3, flush_seconds=0.3, metrics_port=0) as (_, settings):

            async def scrape():
                await trio.sleep(2)  # the server started within the first moments; a few commits landed
                url = next(e["url"] for e in logs if e["event"] == "metrics_served")
                async with httpx.AsyncClient(timeout=5) as client:
                    seen["metrics"] = parse((await client.get(url)).text)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrape)
                await run_pipeline(settings, handle_signals=False)
    metrics = seen["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["pistream_commit_duration_seconds_count"] == metrics["pistream_commits_total"] >= 2

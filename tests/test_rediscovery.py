"""The tag set follows the site without a restart: masks in the tags file, points created and deleted on the
server, the file edited, a resolution failure, all during one run against the simulator on loopback. Every
value of every tag lands exactly once for the time it was subscribed (DuckDB reads the Delta table back), and
channels that held no removed tag were never reopened."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import trio
from conftest import compare_with_model, duckdb_rows
from structlog.testing import capture_logs
from test_metrics import parse

import pistream.pi.discovery as discovery_module
import pistream.pipeline as pipeline_module
from pistream.config import build_settings
from pistream.metrics import MetricsServer
from pistream.pi.webid import path_webid
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.streamstats import StatsReporter

TAIL_US = 500_000  # values sent in the last moments before the stop may still be on the wire
STEADY = [f"\\\\SIMSRV\\STEADY{i:02d}" for i in range(20)]  # listed and never touched
SITE = [*STEADY, "\\\\SIMSRV\\CDT158", *(f"\\\\SIMSRV\\FIC{i:03d}" for i in range(1, 7)),
        "\\\\SIMSRV\\TI-101-PV", "\\\\SIMSRV\\TI-102-PV", "\\\\SIMSRV\\TI-201-PV", "\\\\SIMSRV\\NEWTAG"]
FIRST_FILE = [*STEADY, "\\\\SIMSRV\\CDT158", "\\\\SIMSRV\\FIC*", "\\\\SIMSRV\\TI-1??-PV"]
# The edit: CDT158 and the TI mask go, TI-101-PV comes back as an exact line, NEWTAG is added.
EDITED_FILE = [*STEADY, "\\\\SIMSRV\\FIC*", "\\\\SIMSRV\\TI-101-PV", "\\\\SIMSRV\\NEWTAG"]
HEADERS = {"X-Requested-With": "pistream-tests"}
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.05


def webid(name: str) -> str:
    return path_webid(f"\\\\SIMSRV\\{name}")


def write_tags(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def until(condition, what: str) -> None:
    """Wait (bounded: WAIT_SECONDS) for something the pipeline does; no fixed sleep the work must beat."""
    for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
        if condition():
            return
        await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what}")


def logged(logs: list[dict], event: str, **fields) -> list[dict]:
    return [e for e in logs if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]


def names_in(logs: list[dict], event: str, name: str) -> bool:
    return any(name in path for e in logged(logs, event) for path in e["first"])


async def test_points_appear_and_disappear_masks_and_file_edits_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery_module, "FILE_CHECK_SECONDS", 0.3)
    monkeypatch.setattr(discovery_module, "RETRY_SECONDS", 0.3)
    monkeypatch.setattr(discovery_module, "MAX_RETRY_SECONDS", 1.0)
    metrics: dict[str, MetricsServer] = {}

    class WithMetrics(StatsReporter):  # the /metrics endpoint beside the pipeline's own reporter
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            async with trio.open_nursery() as nursery:
                metrics["server"] = MetricsServer(self, port=0)
                await nursery.start(metrics["server"].run)
                await super().run(task_status=task_status)

    monkeypatch.setattr(pipeline_module, "StatsReporter", WithMetrics)

    model = SimModel.from_paths(SITE, rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = tmp_path / "tags.txt"
    write_tags(tags, FIRST_FILE)
    options = {"tags": str(tags), "table": str(tmp_path / "table"), "state_dir": str(tmp_path / "state"),
               "flush_seconds": 0.5, "rediscover_interval": 1.0, "max_url_length": 512}
    stop = trio.Event()
    marks: dict[str, int] = {}
    scraped: list[dict[str, float]] = []

    async def scrape() -> dict[str, float]:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{metrics['server'].port}/metrics")
        return parse(answer.text)

    async def site_changes(logs: list[dict]) -> None:
        initial = [webid(n) for n in ["CDT158", "FIC001", "TI-101-PV", "TI-102-PV", *(s[9:] for s in STEADY)]]
        await until(lambda: all(w in simulator.emitted for w in initial), "the first values of every tag")
        await until(lambda: "server" in metrics, "/metrics")
        scraped.append(await scrape())
        await trio.sleep(1.0)
        async with httpx.AsyncClient(base_url=simulator.url + "/", headers=HEADERS) as http:
            server = (await http.get("dataservers", params={"path": "\\\\SIMSRV"})).json()["WebId"]
            # A point created on the server: the FIC* mask picks it up at the next interval.
            created = await http.post(f"dataservers/{server}/points", json={"Name": "FIC007", "PointType": "Float32"})
            assert created.status_code == 201
            await until(lambda: names_in(logs, "tags_added", "FIC007"), "tags_added FIC007")
            await until(lambda: webid("FIC007") in simulator.emitted, "FIC007 streaming")
            # A point deleted on the server: unsubscribed at the next interval.
            assert (await http.delete(f"points/{webid('FIC002')}")).status_code == 204
            await until(lambda: names_in(logs, "tags_removed", "FIC002"), "tags_removed FIC002")
        # PI Web API fails for a while: the tags keep streaming, rediscovery retries.
        simulator.faults.fail_rest(500, count=1_000_000, prefix="points/multiple")
        await until(lambda: len(logged(logs, "rediscovery_failed")) >= 3, "three failed rediscoveries")
        simulator.faults.reset()
        done = len(logged(logs, "tags_rediscovered"))
        await until(lambda: len(logged(logs, "tags_rediscovered")) > done, "a rediscovery after the failures")
        await trio.sleep(1.0)
        # The file edited: CDT158 and TI-102-PV go, NEWTAG comes.
        marks["edited_us"] = time.time_ns() // 1000
        write_tags(tags, EDITED_FILE)
        await until(lambda: names_in(logs, "tags_removed", "CDT158"), "tags_removed CDT158")
        await until(lambda: names_in(logs, "tags_added", "NEWTAG"), "tags_added NEWTAG")
        # One rediscovery (the file watch's, or the interval's if it came first) took both out.
        assert next(e for e in logged(logs, "tags_removed") if "CDT158" in str(e["first"]))["count"] == 2
        await until(lambda: webid("NEWTAG") in simulator.emitted, "NEWTAG streaming")
        await trio.sleep(1.0)
        # CDT158 listed again: read back from where it stopped, so its values are whole.
        write_tags(tags, [*EDITED_FILE, "\\\\SIMSRV\\CDT158"])
        await until(lambda: names_in(logs, "tags_added", "CDT158"), "tags_added CDT158")
        await trio.sleep(1.5)
        scraped.append(await scrape())
        stop.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {**options, "url": simulator.url})
        with trio.fail_after(180), capture_logs() as logs:
            nursery.start_soon(site_changes, logs)
            summary = await run_pipeline(settings, stop, handle_signals=False)
        nursery.cancel_scope.cancel()

    removed_by_file = {webid("TI-102-PV")}
    windows = {}
    for w, emitted in simulator.emitted.items():
        end = marks["edited_us"] if w in removed_by_file else emitted.last_us - TAIL_US
        windows[w] = (emitted.first_us, end)
    result = compare_with_model(settings.table, model, windows)
    print(result.summary(), summary)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert result.expected >= 20 * 10 * 5
    assert webid("TI-201-PV") not in simulator.emitted  # never listed nor matched

    # New tags start at their first value: no history read before it.
    first_rows = dict(duckdb_rows(settings.table, "tag_webid, min(epoch_us(timestamp))", "GROUP BY tag_webid"))
    for name in ("FIC007", "NEWTAG"):
        assert first_rows[webid(name)] == simulator.emitted[webid(name)].first_us
    # CDT158 was unsubscribed for a while and listed again: whole from its first value to the stop.
    cdt = webid("CDT158")
    assert windows[cdt][1] - windows[cdt][0] > 5_000_000

    # Channels that held no removed tag were opened once and never again: no reconnect, no gap.
    removed = {webid("FIC002"), webid("TI-102-PV"), cdt}
    untouched = [w for w in map(path_webid, STEADY)
                 if not any(w in opened and removed & set(opened) for opened in simulator.channels_opened)]
    assert len(untouched) >= 8
    for w in untouched:
        assert sum(w in opened for opened in simulator.channels_opened) == 1

    final = {*map(path_webid, STEADY), *(webid(f"FIC00{i}") for i in (1, 3, 4, 5, 6, 7)), webid("TI-101-PV"),
             webid("NEWTAG"), cdt}
    assert summary.tags == len(final) == scraped[-1]["pistream_tags"]
    assert scraped[0]["pistream_tags"] == 20 + 1 + 6 + 2
    assert logged(logs, "tags_added", reason="interval")[0]["count"] == 1


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_without_the_interval_a_file_edit_and_sighup_still_rediscover(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery_module, "FILE_CHECK_SECONDS", 0.3)
    model = SimModel.from_paths(["\\\\SIMSRV\\A1", "\\\\SIMSRV\\B1"], rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = tmp_path / "tags.txt"
    write_tags(tags, ["\\\\SIMSRV\\A*"])
    stop = trio.Event()

    async def changes(logs: list[dict]) -> None:
        await until(lambda: webid("A1") in simulator.emitted, "A1 streaming")
        write_tags(tags, ["\\\\SIMSRV\\A*", "\\\\SIMSRV\\B1"])
        await until(lambda: names_in(logs, "tags_added", "B1"), "tags_added B1")
        model.add("\\\\SIMSRV\\A2")  # created on the server: only SIGHUP looks now
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: names_in(logs, "tags_added", "A2"), "tags_added A2")
        await until(lambda: webid("A2") in simulator.emitted, "A2 streaming")
        await trio.sleep(1.0)
        stop.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "table": str(tmp_path / "table"),
                                       "state_dir": str(tmp_path / "state"), "flush_seconds": 0.5,
                                       "rediscover_interval": 0})
        with trio.fail_after(120), capture_logs() as logs:
            nursery.start_soon(changes, logs)
            summary = await run_pipeline(settings, stop, handle_signals=True)
        nursery.cancel_scope.cancel()

    assert [e["reason"] for e in logged(logs, "tags_added")] == ["tags_file", "sighup"]
    assert not logged(logs, "tags_rediscovered", reason="interval")
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(settings.table, model, windows)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert len(windows) == summary.tags == 3


async def test_a_channel_refused_after_a_point_was_deleted_drops_that_point_and_streams_on(tmp_path):
    """A point deleted on the server, then the channel holding it reconnects before any rediscovery: the
    server refuses the channel (404 for the unknown WebID). pistream rediscovers, unsubscribes the deleted
    point and reopens the channel with the others, instead of stopping."""
    model = SimModel.from_paths(["\\\\SIMSRV\\A1", "\\\\SIMSRV\\A2", "\\\\SIMSRV\\A3"], rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = tmp_path / "tags.txt"
    write_tags(tags, ["\\\\SIMSRV\\A1", "\\\\SIMSRV\\A2", "\\\\SIMSRV\\A3"])
    stop = trio.Event()

    async def delete_then_cut(logs: list[dict]) -> None:
        await until(lambda: all(webid(n) in simulator.emitted for n in ("A1", "A2", "A3")), "first values")
        await trio.sleep(0.5)
        model.remove(webid("A2"))
        simulator.faults.kill_channels()
        await until(lambda: names_in(logs, "tags_removed", "A2"), "tags_removed A2")
        await until(lambda: simulator.channels_opened[-1] == (webid("A1"), webid("A3")), "the channel reopened")
        await trio.sleep(1.0)
        stop.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "table": str(tmp_path / "table"),
                                       "state_dir": str(tmp_path / "state"), "flush_seconds": 0.5,
                                       "rediscover_interval": 0})
        with trio.fail_after(120), capture_logs() as logs:
            nursery.start_soon(delete_then_cut, logs)
            summary = await run_pipeline(settings, stop, handle_signals=False)
        nursery.cancel_scope.cancel()

    assert logged(logs, "channel_refused") and logged(logs, "tags_removed", reason="channel_refused")
    assert simulator.channels_opened[-1] == (webid("A1"), webid("A3"))
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    windows[webid("A2")] = (simulator.emitted[webid("A2")].first_us, simulator.emitted[webid("A2")].last_us)
    result = compare_with_model(settings.table, model, windows)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summary.tags == 2 and summary.gaps_lost == 0


async def test_a_mask_that_matches_nothing_yet_starts_empty_and_picks_the_points_up_later(tmp_path):
    model = SimModel.from_paths(["\\\\SIMSRV\\OTHER"], rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = tmp_path / "tags.txt"
    write_tags(tags, ["\\\\SIMSRV\\LATER*"])
    stop = trio.Event()

    async def create_later(logs: list[dict]) -> None:
        await until(lambda: logged(logs, "no_tags_yet"), "no_tags_yet")
        assert logged(logs, "mask_matched_nothing")[0]["masks"] == ["\\\\SIMSRV\\LATER*"]
        model.add("\\\\SIMSRV\\LATER1")
        await until(lambda: webid("LATER1") in simulator.emitted, "LATER1 streaming")
        await trio.sleep(1.0)
        stop.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "table": str(tmp_path / "table"),
                                       "state_dir": str(tmp_path / "state"), "flush_seconds": 0.5,
                                       "rediscover_interval": 0.5})
        with trio.fail_after(120), capture_logs() as logs:
            nursery.start_soon(create_later, logs)
            summary = await run_pipeline(settings, stop, handle_signals=False)
        nursery.cancel_scope.cancel()

    assert logged(logs, "tags_resolved")[0]["tags"] == 0 and summary.tags == 1
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(settings.table, model, windows)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert result.expected >= 5 and list(windows) == [webid("LATER1")]

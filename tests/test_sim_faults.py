"""Simulator fault injection: cut, silent and slow channels, failing REST calls, and shuffled, late and
repeated channel delivery that leaves the ground truth (model, ``emitted``) exact."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from test_sim import StartSim, channel_path, client, open_channel, upgrade, wire, ws_url

from pistream.sim.faults import Faults
from pistream.sim.model import SimModel, SimTag, format_timestamp, parse_time
from pistream.sim.server import Simulator

US = 1_000_000


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> StartSim:
    async def start(model: SimModel | None = None, **kwargs: Any) -> Simulator:
        simulator = Simulator(model or SimModel.generated(8, rate=10), **kwargs)
        return await nursery.start(simulator.run)

    return start


async def wait_until(condition: Callable[[], bool], seconds: float = 2) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - polling server state from the outside
            await trio.sleep(0.01)


def stamps_of(message: dict[str, Any], webid: str) -> list[int]:
    return [
        parse_time(v["Timestamp"], 0)
        for item in message["Items"]
        if item["WebId"] == webid
        for v in item["Items"]
    ]


# -- channels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
async def test_kill_channels_cuts_the_socket_without_close_frame(start_sim: StartSim, reset: bool) -> None:
    with trio.fail_after(10):
        sim = await start_sim(poll_interval=0.05)
        url = ws_url(sim, channel_path(sim.model.tags[:2], includeInitialValues="true"))
        async with open_channel(url) as ws:
            await ws.get_message()
            assert sim.faults.kill_channels(reset=reset) == 1
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            reason = closed.value.reason
            assert reason is not None and reason.code == 1006  # abnormal closure: no close frame was received
        await wait_until(lambda: not sim.sessions)
        assert sim.faults.channels_killed == 1
        async with client(sim) as http:  # the server itself is fine
            assert (await http.get("dataservers")).status_code == 200


async def test_silence_sends_nothing_then_the_whole_silent_time(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(SimModel.generated(2, rate=20), poll_interval=0.05)
        tag = sim.model.tags[0]
        received: list[int] = []
        async with open_channel(ws_url(sim, f"streams/{tag.webid}/channel?heartbeatRate=1")) as ws:
            while not received:
                received += stamps_of(json.loads(await ws.get_message()), tag.webid)
            assert sim.faults.silence(0.6) == 1
            silent_from, silent_from_us = trio.current_time(), sim.now_us()
            with trio.move_on_after(0.3) as no_pong:
                await ws.ping()  # not answered while silent
            assert no_pong.cancelled_caught
            while True:  # what was on the wire before the silence, then one catch-up message
                message = json.loads(await ws.get_message())
                stamps = stamps_of(message, tag.webid)
                received += stamps
                if stamps and max(stamps) > silent_from_us:
                    break
            assert trio.current_time() - silent_from >= 0.55
            assert max(stamps) - min(stamps) >= 0.5 * US  # the values of the silent time, in one message

            async def drain() -> None:  # keep reading, or a full message queue would hide the pong
                nonlocal received
                while True:
                    received += stamps_of(json.loads(await ws.get_message()), tag.webid)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                with trio.fail_after(2):
                    await ws.ping()  # answered again
                nursery.cancel_scope.cancel()
        assert received == [e.timestamp_us for e in sim.model.events(tag, received[0], received[-1])]


async def test_slow_spaces_messages_without_losing_values(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(SimModel.generated(1, rate=50), poll_interval=0.02)
        tag = sim.model.tags[0]
        sim.faults.slow(0.25)
        messages: list[list[int]] = []
        connected = trio.current_time()
        async with open_channel(ws_url(sim, f"streams/{tag.webid}/channel")) as ws:
            for _ in range(4):
                messages.append(stamps_of(json.loads(await ws.get_message()), tag.webid))
            assert trio.current_time() - connected >= 0.7  # three gaps of at least 0.25 s
            sim.faults.slow(0)
            for _ in range(6):
                messages.append(stamps_of(json.loads(await ws.get_message()), tag.webid))
        # 50 values/s: a slow message carries 0.25 s of them, a normal one those of one 20 ms poll
        assert all(len(stamps) >= 11 for stamps in messages[1:4]), [len(m) for m in messages]
        assert min(len(stamps) for stamps in messages[5:]) <= 3, [len(m) for m in messages]
        received = [ts for stamps in messages for ts in stamps]
        assert received == [e.timestamp_us for e in sim.model.events(tag, received[0], received[-1])]


async def _read_until_closed(sim: Simulator, url: str, seconds: float) -> list[dict[str, list[int]]]:
    """Per message, per WebID the timestamps in message order; each value is checked against the model."""
    messages: list[dict[str, list[int]]] = []

    def take(message: dict[str, Any]) -> None:
        stamps: dict[str, list[int]] = {}
        for item in message["Items"]:
            tag = sim.model.lookup(item["WebId"])
            assert tag is not None and tag.webid not in stamps
            stamps[tag.webid] = []
            for value in item["Items"]:
                ts = parse_time(value["Timestamp"], 0)
                assert value == wire(sim.model.latest(tag, ts), tag) and sim.model.count(tag, ts, ts) == 1
                stamps[tag.webid].append(ts)
        messages.append(stamps)

    async with open_channel(url) as ws:
        with trio.move_on_after(seconds):
            while True:
                take(json.loads(await ws.get_message()))
        await sim.drop_channels()
        with pytest.raises(trio_websocket.ConnectionClosed):
            while True:
                take(json.loads(await ws.get_message()))
    await wait_until(lambda: not sim.sessions)
    return messages


def in_arrival_order(messages: list[dict[str, list[int]]], webid: str) -> list[int]:
    return [ts for message in messages for ts in message.get(webid, [])]


def _check_ground_truth(sim: Simulator, tag: SimTag, stamps: list[int]) -> set[int]:
    """Each event was emitted once; ``emitted`` agrees; only late events of the final poll are missing."""
    unique = set(stamps)
    emitted = sim.emitted[tag.webid]
    assert (emitted.first_us, emitted.last_us, emitted.count) == (min(unique), max(unique), len(unique))
    lost = {ts for webid, ts in sim.faults.late_lost if webid == tag.webid}
    assert not lost & unique
    expected = {e.timestamp_us for e in sim.model.events(tag, emitted.first_us, emitted.last_us)}
    assert unique <= expected
    assert expected - unique <= lost
    return unique


async def test_late_delivery_sends_some_events_one_poll_late(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        faults = Faults(late_fraction=0.3, seed=11)
        sim = await start_sim(SimModel.generated(3, rate=50), poll_interval=0.05, faults=faults)
        messages = await _read_until_closed(sim, ws_url(sim, channel_path(sim.model.tags)), 0.8)
        for tag in sim.model.tags:
            stamps = in_arrival_order(messages, tag.webid)
            unique = _check_ground_truth(sim, tag, stamps)
            assert len(stamps) == len(unique)  # no repeats

            def is_late(ts: int, tag: SimTag = tag) -> bool:
                event = sim.model.latest(tag, ts)
                assert event is not None
                return faults.is_late(tag, event)

            late = [ts for ts in stamps if is_late(ts)]
            assert late and len(late) / len(stamps) < 0.6  # ~30 % by a hash of the event time: 3 of 39 was seen
            for message in messages:  # late ones follow the message's own events, which are newer
                listed = message.get(tag.webid, [])
                on_time = [ts for ts in listed if not is_late(ts)]
                assert listed == on_time + sorted(ts for ts in listed if is_late(ts))
                assert all(ts < min(on_time) for ts in listed if is_late(ts)) if on_time else True
            on_time = [ts for ts in stamps if not is_late(ts)]
            assert on_time == sorted(on_time)
            assert sum(max(stamps[:i], default=0) > ts for i, ts in enumerate(stamps)) > 3  # out of order


async def test_shuffled_and_repeated_delivery_keeps_the_ground_truth(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        faults = Faults(shuffle=True, late_fraction=0.2, repeat_last=True, seed=5)
        sim = await start_sim(SimModel.generated(4, rate=50), poll_interval=0.05, faults=faults)
        url = ws_url(sim, channel_path(sim.model.tags, includeInitialValues="true"))
        messages = await _read_until_closed(sim, url, 0.8)
        assert any(list(m) != [t.webid for t in sim.model.tags if t.webid in m] for m in messages)
        for tag in sim.model.tags:
            stamps = in_arrival_order(messages, tag.webid)
            _check_ground_truth(sim, tag, stamps)
            assert any(b < a for a, b in zip(stamps, stamps[1:], strict=False))  # out of order
            # the newest new event of a message is sent again in the stream's next message
            with_values = [m[tag.webid] for m in messages if tag.webid in m]
            seen: set[int] = set()
            repeated = 0
            for previous, current in zip(with_values, with_values[1:], strict=False):
                new = set(previous) - seen
                seen |= new
                if new:
                    assert max(new) in current
                    repeated += 1
            assert repeated >= len(with_values) // 2


def test_faults_are_deterministic_and_validated() -> None:
    tag = SimModel.generated(1).tags[0]
    model = SimModel.generated(1, rate=1000)
    events = model.events(tag, 0, 10 * US)
    picks = [Faults(late_fraction=0.25, seed=1).is_late(tag, e) for e in events]
    assert picks == [Faults(late_fraction=0.25, seed=1).is_late(tag, e) for e in events]
    assert picks != [Faults(late_fraction=0.25, seed=2).is_late(tag, e) for e in events]
    assert 0.23 < sum(picks) / len(picks) < 0.27
    assert not any(Faults().is_late(tag, e) or Faults().repeats(tag, e) for e in events[:100])
    assert all(Faults(repeat_last=True).repeats(tag, e) for e in events[:100])
    with pytest.raises(ValueError):
        Faults(late_fraction=1.5)
    with pytest.raises(ValueError):
        Faults(repeat_last=-0.1)
    faults = Faults()
    with pytest.raises(ValueError):
        faults.fail_rest(404)
    with pytest.raises(ValueError):
        faults.fail_rest(503, count=0)
    with pytest.raises(ValueError):
        faults.slow(-1)
    with pytest.raises(ValueError):
        faults.silence(-1)


# -- REST ----------------------------------------------------------------------------------------------------


async def test_fail_rest_by_count_and_prefix(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        tag = sim.model.tags[0]
        recorded: list[tuple[str, Any]] = [("webId", tag.webid), ("startTime", "*-5s")]
        sim.faults.fail_rest(503, count=2, prefix="StreamSets/Recorded", retry_after=3)
        async with client(sim) as http:
            assert (await http.get("dataservers")).status_code == 200  # other paths pass
            for _ in range(2):
                failed = await http.get("streamsets/recorded", params=recorded)
                assert failed.status_code == 503
                assert failed.headers["retry-after"] == "3"
                assert failed.json()["Errors"]
            assert (await http.get("streamsets/recorded", params=recorded)).status_code == 200
            sim.faults.fail_rest(429, count=1)
            sim.faults.fail_rest(500, count=1, retry_after=None)
            throttled = await http.get("dataservers")
            assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "1")
            broken = await http.get(f"points/{tag.webid}")
            assert broken.status_code == 500 and "retry-after" not in broken.headers
            assert broken.json()["Errors"]
            assert (await http.get("dataservers")).status_code == 200
        assert sim.faults.rest_faults_served == 4
        assert not sim.faults.rest_faults


async def test_cut_short_answers_carry_a_web_exception(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        tags = sim.model.tags[:2]
        end = sim.now_us() - US
        times = {"startTime": format_timestamp(end - 3 * US), "endTime": format_timestamp(end)}
        sim.faults.cut_short(count=1, prefix="streamsets/recorded")
        sim.faults.cut_short(count=1, prefix="streams")
        async with client(sim) as http:
            params: list[tuple[str, Any]] = [("webId", t.webid) for t in tags] + list(times.items())
            assert (await http.get("dataservers")).status_code == 200  # no Items under this prefix
            cut = (await http.get("streamsets/recorded", params=params)).json()
            full = (await http.get("streamsets/recorded", params=params)).json()
            assert cut["WebException"]["StatusCode"] == 500 and cut["WebException"]["Errors"]
            assert "WebException" not in full
            for short, whole in zip(cut["Items"], full["Items"], strict=True):
                assert short["Items"] == whole["Items"][: len(whole["Items"]) // 2]
            one = await http.get(f"streams/{tags[0].webid}/recorded", params=times)
            assert one.status_code == 200 and one.json()["WebException"] is not None
            assert (
                "WebException"
                not in (await http.get(f"streams/{tags[0].webid}/recorded", params=times)).json()
            )


async def test_reject_channels(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(poll_interval=0.05)
        path = channel_path(sim.model.tags[:1], includeInitialValues="true")
        sim.faults.reject_channels(503, count=1, retry_after=2)
        async with client(sim) as http:
            rejected = await upgrade(http, path)
        assert (rejected.status_code, rejected.headers["retry-after"]) == (503, "2")
        assert rejected.json()["Errors"]
        async with open_channel(ws_url(sim, path)) as ws:  # the next one is served
            assert json.loads(await ws.get_message())["Items"]


async def test_reset_disarms_everything(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(faults=Faults(shuffle=True, late_fraction=0.5, repeat_last=0.5))
        sim.faults.fail_rest(503, count=5)
        sim.faults.reject_channels(503, count=5)
        sim.faults.slow(3)
        sim.faults.reset()
        assert not sim.faults.reorders and sim.faults.message_delay == 0
        async with client(sim) as http:
            response = await http.get("dataservers")
        assert isinstance(response, httpx.Response) and response.status_code == 200

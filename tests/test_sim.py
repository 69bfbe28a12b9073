"""The PI Web API simulator over real sockets: REST shapes, Basic auth, and channel contents vs the model."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from click.testing import CliRunner

from pistream.pi.webid import dataserver_webid, point_webid
from pistream.sim.command import simulate
from pistream.sim.model import SimModel, SimTag, format_timestamp, parse_time
from pistream.sim.server import Simulator

US = 1_000_000
StartSim = Callable[..., Awaitable[Simulator]]


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> StartSim:
    """Start a Simulator on 127.0.0.1, port 0; it stops with the test's nursery."""

    async def start(model: SimModel | None = None, **kwargs: Any) -> Simulator:
        simulator = Simulator(model or SimModel.generated(8, rate=10), **kwargs)
        return await nursery.start(simulator.run)

    return start


def client(sim: Simulator, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=sim.url + "/", timeout=5, **kwargs)


def wire(event: Any, tag: SimTag) -> dict[str, Any]:
    """A model event as a TimedValue on the wire."""
    return {
        "Timestamp": format_timestamp(event.timestamp_us),
        "Value": event.value,
        "UnitsAbbreviation": tag.units,
        "Good": event.good,
        "Questionable": event.questionable,
        "Substituted": event.substituted,
        "Annotated": event.annotated,
    }


def ws_url(sim: Simulator, path: str) -> str:
    return sim.url.replace("http://", "ws://", 1) + "/" + path


def channel_path(tags: list[SimTag], **params: Any) -> str:
    query = "&".join([f"webId={t.webid}" for t in tags] + [f"{k}={v}" for k, v in params.items()])
    return "streamsets/channel?" + query


@asynccontextmanager
async def open_channel(url: str, **kwargs: Any) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """``open_websocket_url`` that also closes the socket: trio-websocket 0.12 leaves it open when the
    server starts the close handshake (``aclose`` returns early once a close reason is set)."""
    async with trio_websocket.open_websocket_url(url, **kwargs) as ws:
        try:
            yield ws
        finally:
            await trio.aclose_forcefully(ws._stream)  # noqa: SLF001 - see docstring


async def upgrade(http: httpx.AsyncClient, path: str, **headers: str) -> httpx.Response:
    """Send a WebSocket upgrade request and return the answer (to check rejections without a WS client,
    which in trio-websocket 0.12 leaks its socket on a rejected handshake)."""
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade_headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": key}
    return await http.get(path, headers={**upgrade_headers, "Sec-WebSocket-Version": "13", **headers})


# -- REST ----------------------------------------------------------------------------------------------------


async def test_landing_and_dataservers(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        async with client(sim) as http:
            landing = (await http.get("")).json()
            assert landing["Links"]["DataServers"] == sim.url + "/dataservers"
            response = await http.get("dataservers")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/json")
            [server] = response.json()["Items"]
            assert server["WebId"] == dataserver_webid("\\\\SIMSRV")
            assert (server["Name"], server["IsConnected"]) == ("SIMSRV", True)
            uuid.UUID(server["Id"])
            one = await http.get(f"dataservers/{server['WebId']}")
            assert one.json()["Id"] == server["Id"]
            by_name = await http.get("dataservers", params={"path": "\\\\SIMSRV"})
            assert by_name.json()["WebId"] == server["WebId"]
            points = await http.get(
                f"dataservers/{server['WebId']}/points", params={"nameFilter": "sim00000?"}
            )
            assert [p["Name"] for p in points.json()["Items"]] == [f"SIM{i:06d}" for i in range(8)]
            # IIS matches paths case-insensitively
            assert (
                await http.get(sim.url.replace("/piwebapi", "/PIWebAPI") + "/DataServers")
            ).status_code == 200
            missing = await http.get("nothing/here")
            assert missing.status_code == 404 and missing.json()["Errors"]


async def test_points_found_and_not_found(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        model = SimModel.from_paths(["\\\\SIMSRV\\Sinusoid", "\\\\SIMSRV\\Pump.Mode", "\\\\SIMSRV\\Counter"])
        sim = await start_sim(model)
        async with client(sim) as http:
            response = await http.get("points", params={"path": "\\\\simsrv\\SINUSOID"})
            assert response.status_code == 200
            body = response.json()
            assert body["WebId"] == point_webid("\\\\SIMSRV\\Sinusoid")
            assert {
                k: body[k] for k in ("Id", "Name", "Path", "PointClass", "PointType", "EngineeringUnits")
            } == {
                "Id": 1,
                "Name": "Sinusoid",
                "Path": "\\\\SIMSRV\\Sinusoid",
                "PointClass": "classic",
                "PointType": "Float32",
                "EngineeringUnits": "degC",
            }
            assert {"Descriptor", "DigitalSetName", "Step", "Future"} <= body.keys()
            assert body["Links"]["RecordedData"].endswith(f"/streams/{body['WebId']}/recorded")
            mode = (await http.get(f"points/{model.tags[1].webid}")).json()
            assert (mode["PointType"], mode["DigitalSetName"]) == ("Digital", "Modes")
            missing = await http.get("points", params={"path": "\\\\SIMSRV\\NoSuchTag"})
            assert missing.status_code == 404
            assert missing.json() == {"Errors": ["PI Point not found '\\\\SIMSRV\\NoSuchTag'."]}
            assert (await http.get("points/" + point_webid("\\\\SIMSRV\\Other"))).status_code == 404
            assert (await http.get("points/not-a-webid")).status_code == 400
            assert (await http.get("points")).status_code == 400


async def test_points_multiple(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        tags = sim.model.tags
        async with client(sim) as http:
            params: list[tuple[str, Any]] = [
                ("path", tags[0].path),
                ("path", "\\\\SIMSRV\\Missing"),
                ("webId", tags[1].webid),
            ]
            response = await http.get("points/multiple", params=params)
            assert response.status_code == 207
            items = response.json()["Items"]
            assert [(i["Identifier"], i["IdentifierType"]) for i in items] == [
                (tags[0].path, "Path"),
                ("\\\\SIMSRV\\Missing", "Path"),
                (tags[1].webid, "WebId"),
            ]
            assert items[0]["Object"]["WebId"] == tags[0].webid and items[0]["Exception"] is None
            assert items[1]["Object"] is None and items[1]["Exception"]["Errors"]
            assert items[2]["Object"]["Name"] == tags[1].name
            ok = await http.get("points/multiple", params=[("path", t.path) for t in tags])
            assert ok.status_code == 200
            assert [i["Object"]["WebId"] for i in ok.json()["Items"]] == [t.webid for t in tags]


async def test_batch(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        tag = sim.model.tags[2]
        body = {
            "point": {"Method": "GET", "Resource": f"{sim.url}/points?path={tag.path}"},
            "missing": {"Method": "GET", "Resource": "points?path=\\\\SIMSRV\\Missing"},
            "values": {
                "Method": "GET",
                "Resource": sim.url + "/streams/{0}/recorded?maxCount=3",
                "Parameters": ["$.point.Content.WebId"],
                "ParentIds": ["point"],
            },
            "child_of_missing": {"Resource": "dataservers", "ParentIds": ["missing"]},
        }
        async with client(sim) as http:
            refused = await http.post("batch", json=body)
            assert refused.status_code == 403 and refused.json()["Errors"]
            response = await http.post("batch", json=body, headers={"X-Requested-With": "pistream"})
            assert response.status_code == 207
            results = response.json()
            assert list(results) == list(body)
            assert results["point"]["Status"] == 200 and results["point"]["Content"]["WebId"] == tag.webid
            assert results["missing"]["Status"] == 404 and results["missing"]["Content"]["Errors"]
            assert results["values"]["Status"] == 200 and len(results["values"]["Content"]["Items"]) == 3
            assert results["child_of_missing"]["Status"] == 409
            bad = await http.post("batch", content=b"{not json", headers={"X-Requested-With": "x"})
            assert bad.status_code == 400


async def test_recorded_cut_at_max_count_and_paging(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(SimModel.generated(4, rate=20))
        tag = sim.model.tags[0]
        end = sim.now_us() - 2 * US
        start = end - 10 * US
        expected = [wire(e, tag) for e in sim.model.events(tag, start, end)]
        assert len(expected) >= 199
        async with client(sim) as http:
            url = f"streams/{tag.webid}/recorded"
            pages: list[dict[str, Any]] = []
            page_start = format_timestamp(start)
            while True:
                params: dict[str, Any] = {
                    "startTime": page_start,
                    "endTime": format_timestamp(end),
                    "maxCount": 50,
                }
                response = await http.get(url, params=params)
                assert response.status_code == 200
                body = response.json()
                assert body["UnitsAbbreviation"] == "degC"
                items = body["Items"]
                assert len(items) <= 50  # cut silently, no warning
                # re-asking from the last timestamp returns it again: drop what we already have
                known = parse_time(pages[-1]["Timestamp"], 0) if pages else -1
                pages.extend(i for i in items if parse_time(i["Timestamp"], 0) > known)
                if len(items) < 50:
                    break
                page_start = items[-1]["Timestamp"]
            assert pages == expected
            default = (await http.get(url, params={"startTime": "*-2h"})).json()["Items"]
            assert len(default) == 1000  # default maxCount
            assert parse_time(default[0]["Timestamp"], 0) >= sim.now_us() - 2 * 3600 * US - US
            future = (await http.get(url, params={"startTime": "*-1s", "endTime": "*+1h"})).json()["Items"]
            assert all(parse_time(i["Timestamp"], 0) <= sim.now_us() for i in future)
            backwards = await http.get(
                url,
                params={
                    "startTime": format_timestamp(end),
                    "endTime": format_timestamp(start),
                    "maxCount": 5,
                },
            )
            assert backwards.json()["Items"] == expected[::-1][:5]
            selected = await http.get(
                url,
                params={
                    "startTime": format_timestamp(start),
                    "maxCount": 2,
                    "selectedFields": "Items.Timestamp",
                },
            )
            assert selected.json() == {"Items": [{"Timestamp": e["Timestamp"]} for e in expected[:2]]}
            bad_params: list[dict[str, Any]] = [
                {"maxCount": 150001},
                {"maxCount": "x"},
                {"startTime": "yesterday-ish"},
            ]
            for bad in bad_params:
                error = await http.get(url, params=bad)
                assert error.status_code == 400 and error.json()["Errors"], bad
            unknown = point_webid("\\\\SIMSRV\\NOPE")
            assert (await http.get(f"streams/{unknown}/recorded")).status_code == 404


async def test_streamset_recorded(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        tags = sim.model.tags[:4]
        end = sim.now_us() - US
        start = end - 3 * US
        async with client(sim) as http:
            times = [("startTime", format_timestamp(start)), ("endTime", format_timestamp(end))]
            params: list[tuple[str, Any]] = [("webId", t.webid) for t in tags] + times
            response = await http.get("streamsets/recorded", params=params)
            assert response.status_code == 200
            items = response.json()["Items"]
            assert [(i["WebId"], i["Name"], i["Path"], i["UnitsAbbreviation"]) for i in items] == [
                (t.webid, t.name, t.path, t.units) for t in tags
            ]
            for item, tag in zip(items, tags, strict=True):
                assert item["Items"] == [wire(e, tag) for e in sim.model.events(tag, start, end)]
            assert (await http.get("streamsets/recorded")).status_code == 400


async def test_basic_auth_rest_and_channel(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(basic_auth=("piuser", "s3cret"))
        async with client(sim) as http:
            denied = await http.get("dataservers")
            assert denied.status_code == 401
            assert denied.headers["www-authenticate"] == 'Basic realm="PI Web API"'
            assert (await http.get("dataservers", auth=("piuser", "wrong"))).status_code == 401
            assert (await http.get("dataservers", auth=("piuser", "s3cret"))).status_code == 200
            path = channel_path(sim.model.tags[:1], includeInitialValues="true")
            rejected = await upgrade(http, path)
            assert rejected.status_code == 401
            assert rejected.headers["www-authenticate"] == 'Basic realm="PI Web API"'
        token = base64.b64encode(b"piuser:s3cret")
        async with open_channel(
            ws_url(sim, path), extra_headers=[(b"Authorization", b"Basic " + token)]
        ) as ws:
            message = json.loads(await ws.get_message())
            assert message["Items"][0]["WebId"] == sim.model.tags[0].webid


async def test_request_head_limit(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        async with client(sim) as http:
            response = await http.get("streamsets/recorded", params=[("webId", "P1DP" + "A" * 40)] * 500)
            assert response.status_code == 400
            assert response.json()["Errors"]


# -- channels ------------------------------------------------------------------------------------------------


async def test_channel_initial_values(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(poll_interval=0.05)
        tags = sim.model.tags
        before = sim.now_us()
        async with open_channel(ws_url(sim, channel_path(tags, includeInitialValues="true"))) as ws:
            first = json.loads(await ws.get_message())
        after = sim.now_us()
        assert first["Links"] == {}
        assert [i["WebId"] for i in first["Items"]] == [t.webid for t in tags]
        for item, tag in zip(first["Items"], tags, strict=True):
            assert (item["Name"], item["Path"], item["UnitsAbbreviation"], item["Links"]) == (
                tag.name,
                tag.path,
                tag.units,
                {},
            )
            [value] = item["Items"]
            ts = parse_time(value["Timestamp"], 0)
            assert value == wire(sim.model.latest(tag, ts), tag)
            # the current value at connect time: no later event had happened before we connected
            current = sim.model.latest(tag, before)
            assert current is not None and current.timestamp_us <= ts <= after


async def test_channel_sends_exactly_the_model_events(start_sim: StartSim) -> None:
    """20 events/s per stream, polled every 50 ms: no gaps, no duplicates, and ``emitted`` agrees."""
    with trio.fail_after(10):
        sim = await start_sim(SimModel.generated(6, rate=20), poll_interval=0.05)
        tags = sim.model.tags[:4]  # one of each kind
        received: dict[str, list[dict[str, Any]]] = {t.webid: [] for t in tags}
        messages = 0
        connected_at = sim.now_us()
        async with open_channel(ws_url(sim, channel_path(tags))) as ws:
            with trio.move_on_after(1.5):
                while True:
                    message = json.loads(await ws.get_message())
                    messages += 1
                    for item in message["Items"]:
                        assert item["Items"], "streams without change must be left out"
                        received[item["WebId"]].extend(item["Items"])
                    if messages == 5:
                        await trio.sleep(0.3)  # a slow reader gets a bigger message later, not a gap
            await sim.drop_channels()  # server-side close: everything sent is still readable
            with pytest.raises(trio_websocket.ConnectionClosed):
                while True:
                    for item in json.loads(await ws.get_message())["Items"]:
                        received[item["WebId"]].extend(item["Items"])
        assert messages >= 5
        for tag in tags:
            values = received[tag.webid]
            assert len(values) >= 25
            first = parse_time(values[0]["Timestamp"], 0)
            last = parse_time(values[-1]["Timestamp"], 0)
            assert first > connected_at  # without initial values, only events after connecting
            assert first - connected_at <= US  # the first poll after connecting
            assert values == [wire(e, tag) for e in sim.model.events(tag, first, last)]
            emitted = sim.emitted[tag.webid]
            assert (emitted.first_us, emitted.last_us, emitted.count) == (first, last, len(values))
        assert set(sim.emitted) == {t.webid for t in tags}
        assert not sim.sessions


async def test_single_stream_channel_and_client_close(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(poll_interval=0.05)
        tag = sim.model.tags[3]
        url = ws_url(sim, f"streams/{tag.webid}/channel?includeInitialValues=true")
        async with open_channel(url) as ws:
            for _ in range(3):
                message = json.loads(await ws.get_message())
                assert [i["WebId"] for i in message["Items"]] == [tag.webid]
            await ws.ping()  # answered by the server
        with trio.fail_after(2):  # the session ends when the client goes away
            while sim.sessions:  # noqa: ASYNC110 - polling server state from the outside
                await trio.sleep(0.01)


async def test_channel_heartbeat(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim(SimModel.generated(3, rate=0.001), poll_interval=0.05)  # one event per 1000 s
        url = ws_url(sim, channel_path(sim.model.tags, heartbeatRate=1))
        async with open_channel(url) as ws:
            with trio.fail_after(2):
                while (message := json.loads(await ws.get_message()))["Items"]:
                    pass
        assert message == {"Links": {}, "Items": []}


async def test_channel_rejects_unknown_webid(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        sim = await start_sim()
        unknown = point_webid("\\\\SIMSRV\\NOPE")
        cases = [
            (f"streamsets/channel?webId={sim.model.tags[0].webid}&webId={unknown}", 404),
            (f"streams/{unknown}/channel", 404),
            ("streamsets/channel?webId=garbage", 400),
            ("streamsets/channel", 400),
            (f"streamsets/channel?webId={sim.model.tags[0].webid}&heartbeatRate=soon", 400),
        ]
        async with client(sim) as http:
            for path, status in cases:
                rejected = await upgrade(http, path)
                assert rejected.status_code == status, path
                assert rejected.json()["Errors"], path
            not_ws = await http.get(channel_path(sim.model.tags[:1]))  # no Upgrade header
            assert not_ws.status_code == 400
        assert not sim.emitted


# -- command -------------------------------------------------------------------------------------------------


def test_simulate_refuses_remote_host() -> None:
    result = CliRunner().invoke(simulate, ["--host", "0.0.0.0", "--tag-count", "2"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output
    result = CliRunner().invoke(simulate, ["--tags", "2", "--basic-user", "u"])
    assert result.exit_code == 2


async def test_simulate_subprocess_serves_until_ctrl_c(tmp_path: Any) -> None:
    tags_file = tmp_path / "tags.txt"
    tags_file.write_text("# plant\n\\\\PLANT\\Reactor.Temp\nPump.Mode\n\n")
    code = "import sys; from pistream.sim.command import simulate; simulate(sys.argv[1:])"
    args = [sys.executable, "-c", code, "--tags-file", str(tags_file), "--server", "PLANT", "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with trio.fail_after(15):
        process = await trio.lowlevel.open_process(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        assert process.stdout is not None
        try:
            output = b""
            while b"Ctrl+C" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output
                output += chunk
            text = output.decode()
            url = next(word for word in text.split() if word.startswith("http://127.0.0.1:"))
            assert "\\\\PLANT\\Reactor.Temp" in text and "\\\\PLANT\\Pump.Mode" in text
            async with httpx.AsyncClient(timeout=5) as http:
                point = (await http.get(url + "/points", params={"path": "\\\\PLANT\\Pump.Mode"})).json()
            assert point["PointType"] == "Digital"
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()

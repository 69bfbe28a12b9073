"""Credentials on REST and on the channel upgrade alike, and refusals that name the fix."""

from __future__ import annotations

import base64

import pytest
import structlog
import trio
from conftest import compare_with_model

from pistream.config import build_settings
from pistream.errors import AuthError, ConfigError, UnreachableError
from pistream.pi.auth import BasicAuth, NegotiateAuth
from pistream.pi.channel import ChannelReader
from pistream.pi.flow import Live, LiveBatch
from pistream.pi.piwebapi import PiWebApi
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

PATHS = ["\\\\SIMSRV\\SINUSOID", "\\\\SIMSRV\\PUMP.MODE"]


async def serve_and_capture(requests: list[bytes], *, task_status=trio.TASK_STATUS_IGNORED):
    """A loopback socket that records each request head and answers REST with 200 and upgrades with 401:
    only to see which headers a client sends."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            requests.append(data)
            if b"upgrade: websocket" in data.lower():
                await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def header(request: bytes, name: bytes) -> bytes | None:
    for line in request.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_negotiate_token_rides_on_rest_and_on_the_upgrade():
    hosts: list[str] = []

    def fake_kerberos(host: str) -> str:  # swapped in for pyspnego: no KDC here
        hosts.append(host)
        return base64.b64encode(f"token-{len(hosts)}".encode()).decode()

    auth = NegotiateAuth(fake_kerberos)
    requests: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_and_capture, requests)
            url = f"http://127.0.0.1:{port}/piwebapi"
            async with PiWebApi(url, auth=auth) as api:
                await api.check_root()
            send, receive = trio.open_memory_channel(10)
            reader = ChannelReader("c", url, ["P1DPX"], send, auth=auth, auth_hint="kerberos hint")
            with pytest.raises(AuthError, match="refused the channel's credentials \\(401\\): kerberos hint"):
                await reader.run()
            receive.close()
            nursery.cancel_scope.cancel()
    rest, upgrade = requests
    assert rest.startswith(b"GET /piwebapi/ ")
    assert header(rest, b"authorization") == b"Negotiate " + base64.b64encode(b"token-1")
    assert upgrade.startswith(b"GET /piwebapi/streamsets/channel?webId=P1DPX")
    # a fresh token per connection: Negotiate tokens are single-use
    assert header(upgrade, b"authorization") == b"Negotiate " + base64.b64encode(b"token-2")
    assert hosts == ["127.0.0.1", "127.0.0.1"]


async def run_basic(tmp_path, username: str, password: str):
    model = SimModel.from_paths(PATHS, rate=10)
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(PATHS) + "\n")
    simulator = Simulator(model, poll_interval=0.1, basic_auth=("pistream", "s3cret-pw"))
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({"password": password}, {
            "tags": str(tags), "url": simulator.url, "table": str(tmp_path / "t"), "username": username,
            "state_dir": str(tmp_path / "state"), "duration": 1.5})
        try:
            return model, simulator, await run_pipeline(settings, handle_signals=False)
        finally:
            nursery.cancel_scope.cancel()


async def test_basic_auth_against_an_enforcing_server(tmp_path):
    with trio.fail_after(30):
        model, simulator, summary = await run_basic(tmp_path, "pistream", "s3cret-pw")
    windows = {w: (r.first_us, r.last_us - 300_000) for w, r in simulator.emitted.items()}
    result = compare_with_model(str(tmp_path / "t"), model, windows)
    assert summary.values_written > 0 and result.missing == [] and result.duplicates == []


async def test_wrong_password_is_one_clear_error_without_the_secret(tmp_path):
    with trio.fail_after(30), pytest.raises(BaseException) as info:
        await run_basic(tmp_path, "pistream", "wrong-pw")
    error = info.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, AuthError) and error.exit_code == 2
    assert "PI Web API refused the credentials (401" in str(error)
    assert "check --username and the PISTREAM_PASSWORD variable" in str(error)
    assert "wrong-pw" not in str(error)


def test_basic_repr_hides_the_secret():
    assert "pw" not in repr(BasicAuth("u", "pw")) and "***" in repr(BasicAuth("u", "pw"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth": "bearer"}, "--auth bearer needs a token: set PISTREAM_TOKEN"),
        ({"oidc_client_id": "pistream"}, "OIDC needs a client: pass --oidc-client-id and set "
                                         "PISTREAM_OIDC_CLIENT_SECRET"),
        ({"auth": "basic"}, "--auth basic needs --username"),
    ],
)
def test_incomplete_credentials_are_configuration_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        build_settings({}, {"tags": "t", "simulate": True, **values})


async def test_an_identity_provider_not_answering_at_a_reconnect_is_retried_by_the_channel():
    """An OIDC issuer that cannot be reached (UnreachableError) while a channel connects is a disconnect
    retried with backoff, not the end of the run: the channel opens once the issuer answers again."""

    class IssuerDownTwice:
        calls = 0

        async def headers(self, url: str) -> dict[str, str]:
            self.calls += 1
            if self.calls <= 2:
                raise UnreachableError("the identity provider at https://127.0.0.1:9/token did not answer")
            return {}

    model = SimModel.from_paths(PATHS, rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    auth = IssuerDownTwice()
    send, receive = trio.open_memory_channel(100)
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            reader = ChannelReader("c", simulator.url, [t.webid for t in model.tags], send, auth=auth)
            nursery.start_soon(reader.run)
            while not isinstance(await receive.receive(), Live | LiveBatch):
                pass
            nursery.cancel_scope.cancel()
    retried = [e for e in logs if e["event"] == "channel_disconnected"]
    assert auth.calls == 3 and len(retried) == 2
    assert "did not answer" in retried[0]["reason"]

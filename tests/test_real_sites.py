"""What goes wrong on real PI Web API sites, through the CLI: each failure is one line that names the cause
and the option that fixes it, with exit code 2 (configuration, credentials) or 1 (runtime), and no secret
in any output. And what must work there: TLS with a private CA, Basic, Bearer and OIDC end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio
from click.testing import CliRunner
from conftest import compare_with_model
from sim_thread import Site, simulator_thread

from pistream.cli import main
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

PATHS = ["\\\\SIMSRV\\SINUSOID", "\\\\SIMSRV\\PUMP.MODE"]
PASSWORD = "pw-Sup3r-s3cret"
TOKEN = "tok-9f8e7d6c5b4a"
CLIENT_SECRET = "oidc-cl13nt-s3cret"
SECRETS = (PASSWORD, TOKEN, CLIENT_SECRET)
TAIL_US = 500_000


@pytest.fixture
def tags_file(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("\n".join(PATHS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def run_cli(tmp_path, tags_file, *args: str, env: dict[str, str] | None = None, duration: float = 1.5):
    """pistream in-process; returns (exit code, everything it printed: the JSON log and the error line)."""
    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["--tags", str(tags_file), "--table", str(tmp_path / "table"), "--state-dir", str(tmp_path / "state"),
               "--duration", str(duration), "--flush-seconds", "0.5", "--log-format", "json", *args],
        env={"PISTREAM_PASSWORD": None, "PISTREAM_TOKEN": None, "PISTREAM_OIDC_CLIENT_SECRET": None,
             **(env or {})},
        catch_exceptions=False)
    assert time.monotonic() - started < 20, "pistream took too long to give up"
    for secret in SECRETS:
        assert secret not in result.output
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def error_line(output: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith("pistream: error: ")]
    return line.removeprefix("pistream: error: ")


def model_for(paths=PATHS, rate: float = 10) -> SimModel:
    return SimModel.from_paths(paths, rate=rate)


# -- failures -------------------------------------------------------------------------------------------


def test_wrong_password(tmp_path, tags_file):
    simulator = Simulator(model_for(), basic_auth=("pistream", PASSWORD))
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, "--username", "pistream",
                            env={"PISTREAM_PASSWORD": "wrong-" + PASSWORD[:-3]})
    assert code == 2
    assert error_line(out) == ("PI Web API refused the credentials (401: Authorization has been denied for this "
                               "request.; the server asks for Basic): check --username and the PISTREAM_PASSWORD "
                               "variable")
    assert "wrong-pw-Sup3r" not in out


def test_expired_bearer_token(tmp_path, tags_file):
    simulator = Simulator(model_for(), bearer_tokens=set(), token_lifetime=0.2)
    with simulator_thread(simulator):
        token = simulator.auth.issue_token()  # issued by the server's own token endpoint, then left to expire
        time.sleep(0.3)
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, env={"PISTREAM_TOKEN": token})
    assert token not in out
    assert code == 2
    assert error_line(out) == (
        "PI Web API refused the credentials (401: Authorization has been denied for this request.; the server "
        "asks for Bearer and says: The access token expired): the token in PISTREAM_TOKEN was refused "
        "(expired?): get a new one, or use --auth oidc")


def test_bearer_token_expiring_mid_run_stops_at_the_next_reconnect(tmp_path, tags_file):
    """A static token works until it expires; the channel's next upgrade is refused: exit 2, not a retry loop."""

    async def drop_after_expiry(sim: Simulator) -> None:
        await trio.sleep(1.5)
        await sim.drop_channels()

    simulator = Simulator(model_for(), bearer_tokens=set(), token_lifetime=1.0, poll_interval=0.1)
    with simulator_thread(simulator, drop_after_expiry):
        token = simulator.auth.issue_token()
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, env={"PISTREAM_TOKEN": token},
                            duration=10)
    assert token not in out
    assert '"channel_connected"' in out and code == 2
    assert error_line(out) == (
        "PI Web API refused the channel's credentials (401: Authorization has been denied for this request.; "
        "the server says: The access token expired): the token in PISTREAM_TOKEN was refused (expired?): get a "
        "new one, or use --auth oidc")


def test_wrong_oidc_client_secret(tmp_path, tags_file):
    simulator = Simulator(model_for(), oidc_clients={"pistream": CLIENT_SECRET})
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, "--auth", "oidc",
                            "--oidc-client-id", "pistream", env={"PISTREAM_OIDC_CLIENT_SECRET": "not-it"})
    assert code == 2
    assert error_line(out) == ("the OIDC issuer refused client 'pistream' (401): check --oidc-client-id and "
                               "PISTREAM_OIDC_CLIENT_SECRET")


def test_no_kerberos_ticket(tmp_path, tags_file):
    """No ticket here (and no GSSAPI): pyspnego fails before any request is sent."""
    simulator = Simulator(model_for())
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, "--auth", "kerberos",
                            env={"KRB5CCNAME": f"FILE:{tmp_path / 'no-such-ccache'}"})
    assert code == 2
    message = error_line(out)
    assert message.startswith("no Kerberos credentials for HTTP/127.0.0.1 (")
    assert message.endswith("): run kinit (Linux) or log on as the service account (Windows), or choose "
                            "another --auth")
    assert "SpnegoError" not in message  # pyspnego's nested error text is reduced to its reason
    assert simulator.requests_served == 0


def test_untrusted_certificate_names_the_issuer(tmp_path, tags_file, site):
    simulator = Simulator(model_for(), ssl_context=site.server_context)
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url)
    assert code == 2
    message = error_line(out)
    assert re.fullmatch(
        rf"TLS certificate of https://127\.0\.0\.1:{simulator.port} is not trusted \(issued by "
        r"organizationName=Example Plant Root CA, organizationalUnitName=Testing CA #[\w-]+; unable to get "
        r"local issuer certificate\): pass --ca-bundle PATH with that CA's certificate \(PEM\), or add the CA "
        r"to the operating system's trust store", message), message


def test_unknown_host(tmp_path, tags_file):
    """Retried at start (DNS may not be up yet at boot), then, as --duration ends, exit 1: restartable."""
    code, out = run_cli(tmp_path, tags_file, "--url", "https://pi.invalid/piwebapi")
    assert code == 1
    assert re.fullmatch(r"cannot resolve the host of https://pi\.invalid \(.+\): check the host name in --url",
                        error_line(out)), error_line(out)


def test_connection_refused(tmp_path, tags_file):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = run_cli(tmp_path, tags_file, "--url", f"http://127.0.0.1:{port}/piwebapi")
    assert code == 1  # retried at start until --duration ended
    assert error_line(out) == (f"connection to http://127.0.0.1:{port} refused: is PI Web API running there? "
                               "check --url")


def test_url_without_piwebapi(tmp_path, tags_file):
    simulator = Simulator(model_for())
    with simulator_thread(simulator):
        url = f"{simulator.origin}/wrongbase"
        code, out = run_cli(tmp_path, tags_file, "--url", url)
    assert code == 2
    assert error_line(out) == f"{url} is not a PI Web API root (404): --url must end in /piwebapi"


def test_channels_disabled(tmp_path, tags_file):
    simulator = Simulator(model_for(), channels_enabled=False)
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, "--max-url-length", "600",
                            duration=30)
    assert code == 2
    assert error_line(out) == (
        "PI Web API refused the channel (403: Channels are disabled on this PI Web API instance (configuration "
        "item EnableChannels is false).): channels are disabled on this server or for this account; set "
        "EnableChannels to true in the PI Web API configuration (System Configuration) and restart PI Web API")
    assert '"channel_disconnected"' not in out  # refused for good: no retry loop


def test_channels_disabled_as_real_processes(tmp_path, tags_file):
    """The same through ``python -m pistream`` against ``pistream simulate``, Basic auth on both: the exit
    code the shell sees, and the password in neither process's output."""
    env = {**os.environ, "SIM_PW": PASSWORD, "PISTREAM_PASSWORD": PASSWORD}
    with subprocess.Popen([sys.executable, "-m", "pistream", "simulate", "--tags-file", str(tags_file),
                           "--disable-channels", "--basic-user", "pistream", "--basic-password-env", "SIM_PW"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env) as sim:
        try:
            assert sim.stdout is not None
            banner = sim.stdout.readline()
            url = re.search(r"http://127\.0\.0\.1:\d+/piwebapi", banner).group(0)
            proc = subprocess.run(
                [sys.executable, "-m", "pistream", "--tags", str(tags_file), "--url", url, "--username", "pistream",
                 "--table", str(tmp_path / "t")],
                capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
        finally:
            sim.send_signal(signal.SIGINT)
            sim_out, _ = sim.communicate(timeout=10)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("pistream: error: PI Web API refused the channel (403: ")
    assert "set EnableChannels to true" in proc.stderr
    for text in (banner, sim_out, proc.stdout, proc.stderr):
        assert PASSWORD not in text


# -- working sites ----------------------------------------------------------------------------------------


def test_tls_with_a_private_ca_and_basic_auth_over_several_channels(tmp_path, site):
    """Untrusted without --ca-bundle; with it, a few hundred tags over several channels all land."""
    model = SimModel.generated(300, rate=4)
    tags = tmp_path / "many.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    simulator = Simulator(model, ssl_context=site.server_context, basic_auth=("pistream", PASSWORD),
                          poll_interval=0.1)
    with simulator_thread(simulator):
        args = ["--url", simulator.url, "--username", "pistream", "--max-url-length", "2000"]
        code, out = run_cli(tmp_path, tags, *args, env={"PISTREAM_PASSWORD": PASSWORD})
        assert code == 2 and "--ca-bundle" in error_line(out)
        code, out = run_cli(tmp_path, tags, *args, "--ca-bundle", str(site.ca_pem),
                            env={"PISTREAM_PASSWORD": PASSWORD}, duration=2.5)
    assert code == 0, out[-3000:]
    assert "tls_verification_disabled" not in out
    assert len(re.findall(r'"event": "channel_connected"', out)) >= 5  # the URL limit split the tags
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(str(tmp_path / "table"), model, windows)
    assert len(windows) == 300 and result.tags_with_rows == 300, result.summary()
    assert result.expected >= 300 * 4
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


def test_oidc_client_credentials_end_to_end(tmp_path, tags_file, site):
    """Token from the issuer at the PI Web API origin (the default), over TLS; tokens live 2 s, the channels
    are dropped after they expired and come back with a fresh one."""

    async def drop_later(sim: Simulator) -> None:
        await trio.sleep(2.5)
        await sim.drop_channels()

    model = model_for()
    simulator = Simulator(model, ssl_context=site.server_context, oidc_clients={"pistream": CLIENT_SECRET},
                          token_lifetime=2, poll_interval=0.1)
    with simulator_thread(simulator, drop_later):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, "--auth", "oidc",
                            "--oidc-client-id", "pistream", "--ca-bundle", str(site.ca_pem),
                            env={"PISTREAM_OIDC_CLIENT_SECRET": CLIENT_SECRET}, duration=4)
    assert code == 0, out[-3000:]
    assert simulator.auth.tokens_issued >= 2  # refreshed before expiry, not reused after it
    assert out.count('"event": "channel_connected"') >= 2  # the first connection and the one after the drop
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(str(tmp_path / "table"), model, windows)
    assert result.tags_with_rows == len(PATHS) and result.expected >= len(PATHS) * 30
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


def test_bearer_token_from_the_environment(tmp_path, tags_file):
    model = model_for()
    simulator = Simulator(model, bearer_tokens={TOKEN}, poll_interval=0.1)
    with simulator_thread(simulator):
        code, out = run_cli(tmp_path, tags_file, "--url", simulator.url, env={"PISTREAM_TOKEN": TOKEN})
    assert code == 0, out[-3000:]
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(str(tmp_path / "table"), model, windows)
    assert result.tags_with_rows == len(PATHS) and result.expected >= len(PATHS) * 10
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()


async def test_untrusted_certificate_of_a_server_on_the_same_event_loop(site):
    """The issuer is fetched in a thread: a blocking fetch in the event loop would stall every other task
    (here the server itself, so the message would say "issuer unknown")."""
    from pistream.errors import ConnectError
    from pistream.pi.piwebapi import PiWebApi
    from pistream.pi.tls import client_context

    simulator = Simulator(model_for(), ssl_context=site.server_context)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            async with PiWebApi(simulator.url, verify=client_context()) as api:
                with pytest.raises(ConnectError, match="issued by organizationName=Example Plant Root CA"):
                    await api.check_root()
            nursery.cancel_scope.cancel()

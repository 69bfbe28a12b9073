"""``pistream simulate``: the tags file as the client reads it, and the site options as flags."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from click.testing import CliRunner
from test_sim import upgrade

from pistream.pi.webid import attribute_webid
from pistream.sim.command import CHURN_KEPT, CHURN_PREFIX, build_model, churn_points, simulate
from pistream.sim.model import SimModel


def test_tags_file_is_read_like_the_client_reads_it(tmp_path: Path) -> None:
    tags = tmp_path / "tags.txt"
    tags.write_bytes(
        "\ufeff# plant\r\n\\\\PLANT\\Reactor.Temp\r\nPump.Mode\r\n\\\\AF\\DB\\Pump1|Run Flag\r\npump.mode\r\n".encode()
    )
    model = build_model(None, tags, 1.0, "PLANT")
    assert [(t.path, t.kind) for t in model.tags] == [
        ("\\\\PLANT\\Reactor.Temp", "float"),
        ("\\\\PLANT\\Pump.Mode", "digital"),
        ("\\\\AF\\DB\\Pump1|Run Flag", "bool"),
    ]  # the BOM, CRLF, comment and the case-insensitive duplicate are handled by pistream.pi.tags
    assert model.tags[2].webid == attribute_webid("\\\\AF\\DB\\Pump1|Run Flag")


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("# nothing\n", [], "lists no tags"),
        ("\\single\n", [], "single backslash"),
        ("\\\\AF\\Element|Attr\n", [], "AF attribute path"),
        (None, ["--oidc-client-id", "pistream"], "--oidc-secret-env"),
        (None, ["--bearer-token-env", "PISTREAM_TEST_UNSET_VARIABLE"], "PISTREAM_TEST_UNSET_VARIABLE"),
        (None, ["--quirk", "sideways"], "sideways"),
        (None, ["--late-fraction", "2"], "late-fraction"),
    ],
)
def test_simulate_usage_errors(tmp_path: Path, content: str | None, args: list[str], message: str) -> None:
    if content is not None:
        tags = tmp_path / "tags.txt"
        tags.write_text(content, encoding="utf-8")
        args = ["--tags-file", str(tags), *args]
    else:
        args = ["--tag-count", "2", *args]
    result = CliRunner().invoke(simulate, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


async def test_simulate_subprocess_with_tls_bearer_and_disabled_channels(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    code = "import sys; from pistream.sim.command import simulate; simulate(sys.argv[1:])"
    args = [
        sys.executable, "-c", code, "--tag-count", "3", "--all-kinds", "--tls-cert", str(cert_file),
        "--tls-key", str(key_file), "--bearer-token-env", "SIM_TOKEN", "--disable-channels",
        "--quirk", "string-flags", "--quirk", "utc-offset",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SIM_TOKEN": "t0ken"}
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
            url = next(word for word in output.decode().split() if word.startswith("https://127.0.0.1:"))
            verify = ssl.create_default_context(cafile=str(ca_file))
            headers = {"Authorization": "Bearer t0ken"}
            async with httpx.AsyncClient(base_url=url + "/", verify=verify, timeout=5) as http:
                assert (await http.get("dataservers")).status_code == 401
                points = (await http.get("dataservers", headers=headers)).json()["Items"]
                webid = points[0]["WebId"]
                listed = (await http.get(f"dataservers/{webid}/points", headers=headers)).json()["Items"]
                assert [p["PointType"] for p in listed] == ["Float32", "Int32", "Digital"]
                value = (await http.get(f"streams/{listed[0]['WebId']}/value", headers=headers)).json()
                assert value["Good"] in ("true", "false") and value["Timestamp"].endswith("+00:00")
                refused = await upgrade(http, f"streams/{listed[0]['WebId']}/channel", **headers)
                assert refused.status_code == 403 and json.loads(refused.content)["Errors"]
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()


async def test_churn_creates_a_point_each_round_and_deletes_the_one_three_rounds_older(autojump_clock) -> None:
    model = SimModel.generated(2, server="SIMSRV")
    with trio.move_on_after(5 * 60 + 1):
        await churn_points(model, "SIMSRV", 60)
    live = sorted(t.name for t in model.tags if t.name.startswith(CHURN_PREFIX))
    assert live == ["CHURN000002", "CHURN000003", "CHURN000004"]
    assert sorted(t.name for t in model.retired.values()) == ["CHURN000000", "CHURN000001"]
    assert len(model.tags) == 2 + CHURN_KEPT

"""docs/unity-catalog.md, followed as an operator would, against the stand-in workspace (tests/databricks_fake.py),
the simulator and moto: its pistream.toml and .databrickscfg as printed (only the site's names swapped for the
stand-in's), `pistream check` before the first start, a first start that creates the table, data in the table,
and `pistream check` again with the storage check passing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner
from deltalake import DeltaTable

from pistream.cli import main
from pistream.config import build_settings, load_config_file

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "unity-catalog.md").read_text(encoding="utf-8")


def block(language: str) -> str:
    [text] = re.findall(rf"```{language}\n(.*?)```", GUIDE, re.S)
    return text


def test_the_guide_settings_are_valid_settings(tmp_path):
    config = tmp_path / "pistream.toml"
    config.write_text(block("toml"), encoding="utf-8")
    settings = build_settings(load_config_file(config), {}, source=str(config))
    assert settings.table == "main.bronze.pi_events" and settings.databricks_profile == "pistream"
    assert settings.location == "s3://corp-lakehouse-bronze/pistream/pi_events"
    assert settings.auth == "kerberos" and settings.metrics_port == 9464
    assert settings.log_file == "C:\\ProgramData\\pistream\\logs\\pistream.log"
    assert settings.storage_options == {"AWS_REGION": "eu-west-1"}


def test_the_guide_from_check_to_data_in_the_table(uc_workspace, tmp_path):
    workspace = uc_workspace
    # The operator's files, as the guide prints them, with this site's names: the stand-in's host and OAuth
    # client, a location under its bucket, its S3 endpoint (moto) instead of the AWS region.
    cfg = block("ini")
    for key, value in (("host", workspace.host), ("client_id", workspace.client_id),
                       ("client_secret", workspace.client_secret)):
        cfg = re.sub(rf"^{key}\s*=.*$", f"{key} = {value}", cfg, flags=re.M)
    (tmp_path / "databrickscfg").write_text(cfg, encoding="utf-8")
    location = workspace.location("pi_events")
    toml = block("toml").split("[storage_options]")[0]
    toml = toml.replace("s3://corp-lakehouse-bronze/pistream/pi_events", location)
    toml += "[storage_options]\n" + "".join(f"{k} = '{v}'\n" for k, v in workspace.base_storage_options.items())
    config = tmp_path / "pistream.toml"
    config.write_text(toml, encoding="utf-8")
    tags = tmp_path / "tags.txt"
    tags.write_text("\\\\PISRV01\\SINUSOID\n\\\\PISRV01\\CDT158\n", encoding="utf-8")
    log_file = tmp_path / "pistream.log"
    # The PI host's own paths and PI Web API (here: the simulator, without Kerberos) from the command line.
    site = ["--config", str(config), "--tags", str(tags), "--simulate", "--auth", "none", "--state-dir",
            str(tmp_path / "state"), "--metrics-port", "0"]
    env = {"DATABRICKS_CONFIG_FILE": str(tmp_path / "databrickscfg")}

    first = CliRunner().invoke(main, ["check", *site], env=env, catch_exceptions=False)
    print(first.stdout)
    assert first.exit_code == 0
    assert "main.bronze.pi_events does not exist yet: the first start creates it at" in first.stdout
    assert "– storage: not checked: the table does not exist yet" in first.stdout
    assert workspace.table("main.bronze.pi_events") is None

    run = CliRunner().invoke(main, [*site, "--log-file", str(log_file), "--duration", "4", "--flush-seconds", "1"],
                             env=env, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    events = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    print("\n".join(json.dumps(e) for e in events))
    names = [e["event"] for e in events]
    for healthy in ("catalog_table_created", "credentials_vended", "catalog_table_resolved", "table_created",
                    "channel_connected", "tags_resolved", "metrics_served", "pistream_stopped"):
        assert healthy in names, healthy
    assert not [e for e in events if e["level"] in ("warning", "error")]
    assert workspace.table("main.bronze.pi_events")["table_type"] == "EXTERNAL"
    rows = DeltaTable(location, storage_options=workspace.admin_storage_options).to_pyarrow_table()
    assert rows.num_rows > 0 and set(rows.column("tag").to_pylist()) == {r"\\PISRV01\SINUSOID", r"\\PISRV01\CDT158"}
    assert workspace.client_secret not in log_file.read_text(encoding="utf-8")

    again = CliRunner().invoke(main, ["check", *site], env=env, catch_exceptions=False)
    print(again.stdout)
    assert again.exit_code == 0
    assert f"main.bronze.pi_events: EXTERNAL DELTA at {location}; READ_WRITE credentials vended" in again.stdout
    assert f"✓ storage: a test object was written and deleted in {location}" in again.stdout

"""``pistream check``: each check passing and failing, for real, against the simulator (PI Web API), moto
(S3) and the workspace stand-in (Unity Catalog with credentials that moto enforces). The command runs in
process (``CliRunner``) while the simulator serves from its own thread."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from sim_thread import simulator_thread

from pistream.cli import main
from pistream.lake.storage import table_files
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

PATHS = [r"\\SIMSRV\SINUSOID", r"\\SIMSRV\CDT158", r"\\SIMSRV\BA:TEMP.1"]
PASSWORD = "check-pw-Sup3r"
ALL = ["config", "tags file", "PI Web API", "tags", "channels", "table", "storage", "state folder", "metrics port"]


def tags_file(directory: Path, paths=PATHS, name: str = "tags.txt") -> Path:
    path = directory / name
    path.write_text("\n".join(paths) + "\n", encoding="utf-8")
    return path


def check(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict]]:
    """Run ``pistream check --json``; the exit code and the results by check name, in order."""
    result = CliRunner().invoke(main, ["check", "--json", *args], env=env or {}, catch_exceptions=False)
    start = result.stdout.index("{")
    answer = json.loads(result.stdout[start:])
    checks = {c["check"]: c for c in answer["checks"]}
    assert list(checks) == ALL  # one line per check, always all of them, in order
    assert answer["ok"] == (result.exit_code == 0)
    return result.exit_code, checks


def statuses(checks: dict[str, dict]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


def local_args(tmp_path: Path, *more: str) -> list[str]:
    return ["--tags", str(tags_file(tmp_path)), "--table", str(tmp_path / "lake" / "pi_events"),
            "--state-dir", str(tmp_path / "state"), *more]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PI Web API side: the simulator -------------------------------------------------------------------------


def test_everything_passes_and_nothing_is_left_behind(tmp_path):
    simulator = Simulator(SimModel.from_paths(PATHS), basic_auth=("pistream", PASSWORD))
    port = free_port()
    with simulator_thread(simulator):
        code, checks = check(*local_args(tmp_path, "--url", simulator.url, "--username", "pistream",
                                         "--metrics-port", str(port)), env={"PISTREAM_PASSWORD": PASSWORD})
        text = CliRunner().invoke(main, ["check", *local_args(tmp_path, "--url", simulator.url, "--username",
                                                                    "pistream")],
                                  env={"PISTREAM_PASSWORD": PASSWORD})
    assert code == 0, [c for c in checks.values() if c["status"] != "pass"]
    assert set(statuses(checks).values()) == {"pass"}
    assert checks["tags"]["detail"] == "all 3 tags resolve"
    assert checks["metrics port"]["detail"] == f"127.0.0.1:{port} is free"
    assert "tmp" in checks["storage"]["detail"] and "writable" in checks["storage"]["detail"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.txt"]  # no table, no state, no test file
    lines = text.stdout.splitlines()
    assert text.exit_code == 0 and len(lines) == len(ALL) + 1
    assert all(line.startswith("✓ ") for line in lines[:-1]) and lines[-1].endswith("pistream can start")
    assert PASSWORD not in text.stdout


def test_the_options_may_also_come_before_check_and_from_the_config_file(tmp_path):
    config = tmp_path / "pistream.toml"
    config.write_text(f"simulate = true\ntags = '{tags_file(tmp_path)}'\nstate_dir = '{tmp_path / 'state'}'\n",
                      encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(config), "check", "--table", str(tmp_path / "t")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"✓ config: {config}: settings parse"


def test_wrong_password_fails_pi_web_api_and_skips_what_needs_it(tmp_path):
    simulator = Simulator(SimModel.from_paths(PATHS), basic_auth=("pistream", PASSWORD))
    with simulator_thread(simulator):
        code, checks = check(*local_args(tmp_path, "--url", simulator.url, "--username", "pistream"),
                             env={"PISTREAM_PASSWORD": "wrong-" + PASSWORD})
    assert code == 1
    assert statuses(checks) == {**dict.fromkeys(ALL, "pass"), "PI Web API": "fail", "tags": "skip",
                                "channels": "skip"}
    assert checks["PI Web API"]["detail"].startswith("PI Web API refused the credentials (401")
    assert checks["PI Web API"]["detail"].endswith("check --username and the PISTREAM_PASSWORD variable")
    assert PASSWORD not in json.dumps(checks)


def test_unreachable_pi_web_api(tmp_path):
    port = free_port()
    code, checks = check(*local_args(tmp_path, "--url", f"http://127.0.0.1:{port}/piwebapi"))
    assert code == 1 and checks["PI Web API"]["status"] == "fail"
    assert checks["PI Web API"]["detail"] == (f"connection to http://127.0.0.1:{port} refused: is PI Web API "
                                              "running there? check --url")


def test_unknown_tags_are_listed(tmp_path):
    simulator = Simulator(SimModel.from_paths(PATHS))
    unknown = [r"\\SIMSRV\TYPO1", r"\\SIMSRV\GONE"]
    tags = tags_file(tmp_path, PATHS + unknown, "with-unknown.txt")
    with simulator_thread(simulator):
        code, checks = check(*local_args(tmp_path, "--url", simulator.url), "--tags", str(tags))
        skip_code, skipping = check(*local_args(tmp_path, "--url", simulator.url), "--tags", str(tags),
                                    "--skip-unknown")
    assert code == 1 and checks["tags"]["status"] == "fail"
    assert checks["tags"]["unknown_tags"] == unknown
    assert checks["tags"]["detail"].startswith(r"2 of 5 tags are not known to PI Web API: \\SIMSRV\TYPO1, "
                                               r"\\SIMSRV\GONE; fix or remove them in the tags file")
    assert checks["channels"]["status"] == "pass"  # the known tags still open a channel
    assert skip_code == 0 and skipping["tags"]["status"] == "pass"
    assert "--skip-unknown: a run goes on without them" in skipping["tags"]["detail"]


def test_masks_are_resolved_and_one_that_matches_nothing_is_named(tmp_path):
    simulator = Simulator(SimModel.from_paths(PATHS))
    tags = tags_file(tmp_path, [r"\\SIMSRV\SINUSOID", r"\\SIMSRV\*", r"\\SIMSRV\NOPE*"], "masks.txt")
    with simulator_thread(simulator):
        code, checks = check(*local_args(tmp_path, "--url", simulator.url), "--tags", str(tags))
    assert code == 0, checks
    assert checks["tags file"]["detail"].startswith("1 tags and 2 name masks in ")
    assert checks["tags"]["detail"] == r"all 3 tags resolve (2 masks; 1 match nothing yet: \\SIMSRV\NOPE*)"


def test_channels_disabled(tmp_path):
    simulator = Simulator(SimModel.from_paths(PATHS), channels_enabled=False)
    with simulator_thread(simulator):
        code, checks = check(*local_args(tmp_path, "--url", simulator.url))
    assert code == 1
    assert statuses(checks) == {**dict.fromkeys(ALL, "pass"), "channels": "fail"}
    assert "set EnableChannels to true in the PI Web API configuration" in checks["channels"]["detail"]


def test_missing_tags_file_and_bad_config(tmp_path):
    code, checks = check("--simulate", "--tags", str(tmp_path / "none.txt"), "--table", str(tmp_path / "t"),
                         "--state-dir", str(tmp_path / "state"))
    assert code == 1 and checks["tags file"]["status"] == "fail"
    assert "not found: pass --tags PATH" in checks["tags file"]["detail"]
    assert [checks[c]["status"] for c in ("PI Web API", "tags", "channels")] == ["skip"] * 3
    assert checks["table"]["status"] == "pass"  # the table does not depend on the tags

    config = tmp_path / "pistream.toml"
    config.write_text("flush_secnds = 3\n", encoding="utf-8")
    code, checks = check("--config", str(config), "--simulate", "--tags", str(tags_file(tmp_path)))
    assert code == 2
    assert statuses(checks) == {**dict.fromkeys(ALL, "skip"), "config": "fail"}
    assert "unknown setting flush_secnds (did you mean `flush_seconds`?)" in checks["config"]["detail"]


# -- the local side: folders and the port -------------------------------------------------------------------


def test_table_state_folder_and_port_that_cannot_be_used(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, checks = check("--simulate", "--tags", str(tags_file(tmp_path)), "--table", str(blocker / "t"),
                             "--state-dir", str(blocker / "state"), "--metrics-port", str(port))
    assert code == 1
    assert statuses(checks) == {**dict.fromkeys(ALL, "pass"), "storage": "fail", "state folder": "fail",
                                "metrics port": "fail"}
    assert checks["storage"]["detail"].startswith(f"{blocker} is a file, not a folder")
    assert checks["metrics port"]["detail"].startswith(f"cannot listen on 127.0.0.1:{port}")
    assert "choose another --metrics-port" in checks["metrics port"]["detail"]


def test_a_dotted_local_name_is_noted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, checks = check("--simulate", "--tags", str(tags_file(tmp_path)), "--table", "bronze.pi_events")
    assert code == 0
    assert "read as the local folder ./bronze.pi_events: a Unity Catalog table has three parts" in \
        checks["table"]["detail"]


# -- object storage: moto ----------------------------------------------------------------------------------


def storage_config(directory: Path, options: dict[str, str], **settings: str) -> Path:
    config = directory / "pistream.toml"
    lines = [f"{key} = '{value}'" for key, value in settings.items()]
    lines += ["[storage_options]"] + [f"{key} = '{value}'" for key, value in options.items()]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def objects_under(uri: str, options: dict[str, str]) -> list[str]:
    files = table_files(uri, options)
    return [info.path for info in files.get_file_info(pafs.FileSelector("", recursive=True, allow_not_found=True))]


def test_s3_table_takes_a_test_object_and_it_is_deleted(s3_server, tmp_path):
    uri = s3_server.table_uri("check")
    config = storage_config(tmp_path, s3_server.storage_options)
    code, checks = check("--config", str(config), "--simulate", "--tags", str(tags_file(tmp_path)), "--table", uri,
                         "--state-dir", str(tmp_path / "state"))
    assert code == 0, [c for c in checks.values() if c["status"] != "pass"]
    assert checks["table"]["detail"] == f"{uri}: in object storage"
    assert checks["storage"]["detail"] == f"a test object was written and deleted in {uri}"
    assert objects_under(uri, s3_server.storage_options) == []
    assert "testing" not in json.dumps(checks)


def test_s3_bucket_that_does_not_exist(s3_server, tmp_path):
    uri = "s3://no-such-bucket-pistream/check"
    config = storage_config(tmp_path, s3_server.storage_options)
    code, checks = check("--config", str(config), "--simulate", "--tags", str(tags_file(tmp_path)), "--table", uri,
                         "--state-dir", str(tmp_path / "state"))
    assert code == 1 and checks["storage"]["status"] == "fail"
    detail = checks["storage"]["detail"]
    assert detail.startswith(f"cannot write a test object in {uri}: ")
    assert detail.endswith("check the storage credentials and that they may write and delete objects under this "
                           "prefix")
    assert "testing" not in detail  # the access key and secret are masked


# -- Unity Catalog: the workspace stand-in ------------------------------------------------------------------


@pytest.fixture
def uc(uc_workspace, tmp_path):
    """The stand-in workspace with a PAT profile, and the config file a site would have (S3 endpoint)."""
    cfg = uc_workspace.databrickscfg(tmp_path, "DEFAULT", "pat")
    config = storage_config(tmp_path, uc_workspace.base_storage_options)
    env = {"DATABRICKS_CONFIG_FILE": str(cfg)}
    args = ["--config", str(config), "--simulate", "--tags", str(tags_file(tmp_path)), "--state-dir",
            str(tmp_path / "state")]
    return uc_workspace, args, env


def test_uc_table_found_credentials_vended_object_written_and_deleted(uc):
    workspace, args, env = uc
    location = workspace.location("check")
    workspace.register_table("main.bronze.pi_events", location)
    code, checks = check(*args, "--table", "main.bronze.pi_events", env=env)
    assert code == 0, [c for c in checks.values() if c["status"] != "pass"]
    table = checks["table"]["detail"]
    assert table.startswith(f"{workspace.host} accepted the pat credentials of profile DEFAULT in ")
    assert f"main.bronze.pi_events: EXTERNAL DELTA at {location}" in table
    assert "READ_WRITE credentials vended (valid 60 min)" in table
    assert checks["storage"]["detail"] == f"a test object was written and deleted in {location}"
    assert workspace.credential_vends == 1 and workspace.vends[0].operation == "READ_WRITE"
    assert objects_under(location, workspace.admin_storage_options) == []  # the object is gone, no commit
    assert workspace.pat not in json.dumps(checks)


def test_uc_table_to_be_created_at_location(uc):
    workspace, args, env = uc
    location = workspace.location("new")
    code, checks = check(*args, "--table", "main.bronze.new_table", "--location", location, env=env)
    assert code == 0, [c for c in checks.values() if c["status"] != "pass"]
    assert f"main.bronze.new_table does not exist yet: the first start creates it at {location}" in \
        checks["table"]["detail"]
    assert checks["storage"]["status"] == "skip"
    assert workspace.table("main.bronze.new_table") is None  # check creates nothing


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "Unity Catalog table main.bronze.pi_events does not exist: pass --location s3://BUCKET/PATH"),
    ("no schema", "check the schema in --table main.nope.pi_events (or create it: CREATE SCHEMA main.nope)"),
    ("managed", "is a MANAGED table (Unity Catalog owns its files; outside writers may not write them)"),
    ("wrong token", "the credentials of profile DEFAULT in"),
    ("no external data access", "a metastore admin must enable External data access on the metastore"),
])
def test_uc_failures_name_the_fix(uc, case, expected):
    workspace, args, env = uc
    name = "main.nope.pi_events" if case == "no schema" else "main.bronze.pi_events"
    extra = ["--location", workspace.location("x")] if case == "no schema" else []
    if case == "managed":
        workspace.register_table(name, table_type="MANAGED")
    elif case in ("wrong token", "no external data access"):
        workspace.register_table(name)
    if case == "wrong token":
        env = {"DATABRICKS_CONFIG_FILE": env["DATABRICKS_CONFIG_FILE"], "DATABRICKS_TOKEN": "dapi-not-valid"}
    workspace.external_data_access = case != "no external data access"
    code, checks = check(*args, "--table", name, *extra, env=env)
    assert code == 1
    assert checks["table"]["status"] == "fail" and checks["storage"]["status"] == "skip"
    assert expected in checks["table"]["detail"]
    assert workspace.pat not in json.dumps(checks)


def test_uc_name_without_any_workspace_config(uc_workspace, tmp_path):
    missing = tmp_path / "no-databrickscfg"
    code, checks = check("--simulate", "--tags", str(tags_file(tmp_path)), "--table", "main.bronze.x",
                         env={"DATABRICKS_CONFIG_FILE": str(missing)})
    assert code == 1
    detail = checks["table"]["detail"]
    assert detail.startswith("--table main.bronze.x was read as a Unity Catalog table (catalog.schema.table), but "
                             "no Databricks workspace host")
    assert f"profile DEFAULT in {missing} (no such file; DATABRICKS_CONFIG_FILE names another)" in detail
    assert "host = https://<workspace> and client_id and client_secret" in detail
    assert "write --table ./main.bronze.x" in detail

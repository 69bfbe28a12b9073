"""The mistakes a person makes on the first day, each answered with one line that names the cause and the fix
(exit 2), never a traceback: a UTF-16 config file, a misspelt setting, a Windows path in double quotes, a unit
after a number, a Unity Catalog name without a workspace, a dotted local table name, a misspelt PISTREAM_*
variable; and every error printed once on a console."""

from __future__ import annotations

import json

import pytest
import structlog
from click.testing import CliRunner

from pistream.cli import main
from pistream.lake.target import make_target


@pytest.fixture
def tags_file(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("\\\\SIMSRV\\SINUSOID\n", encoding="utf-8")
    return path


def run(args, env=None):
    result = CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)
    return result.exit_code, result.output


def error_lines(output: str) -> list[str]:
    return [line.removeprefix("pistream: error: ") for line in output.splitlines()
            if line.startswith("pistream: error: ")]


def run_with_config(tmp_path, tags_file, text: str, encoding: str = "utf-8") -> tuple[int, str]:
    config = tmp_path / "pistream.toml"
    config.write_text(text, encoding=encoding)
    code, out = run(["--config", str(config), "--tags", str(tags_file), "--simulate"])
    assert "Traceback" not in out
    return code, out


def test_a_utf16_config_file_from_powershell(tmp_path, tags_file):
    # Windows PowerShell 5: 'flush_seconds = 10' > pistream.toml writes UTF-16 LE with a BOM
    code, out = run_with_config(tmp_path, tags_file, "flush_seconds = 10\r\n", encoding="utf-16")
    assert code == 2
    [line] = error_lines(out)
    assert line.startswith(f"config file '{tmp_path / 'pistream.toml'}' is UTF-16 (what Windows PowerShell 5 "
                           "writes with > or Out-File): save it as UTF-8")
    assert "Set-Content -Encoding utf8" in line
    assert out.count("\n") == 1  # one line in all


def test_other_encodings_name_the_line(tmp_path, tags_file):
    code, out = run_with_config(tmp_path, tags_file, "# Température\nflush_seconds = 10\n", encoding="latin-1")
    assert code == 2
    assert error_lines(out) == [f"config file '{tmp_path / 'pistream.toml'}' is not UTF-8 (line 1, byte 6): "
                                "save it as UTF-8"]


def test_a_misspelt_setting_gets_a_suggestion_with_file_and_line(tmp_path, tags_file):
    code, out = run_with_config(tmp_path, tags_file, "# site settings\nflush_rows = 10\nflush_second = 3\n")
    assert code == 2
    assert error_lines(out) == [f"config file '{tmp_path / 'pistream.toml'}' line 3: unknown setting flush_second "
                                "(did you mean `flush_seconds`?); the settings are the long options with "
                                "underscores (pistream --help)"]
    assert "log_file_backups" not in out  # not the list of all names


def test_a_windows_path_in_double_quotes(tmp_path, tags_file):
    code, out = run_with_config(tmp_path, tags_file, 'state_dir = "C:\\ProgramData\\pistream\\state"\n')
    assert code == 2
    [line] = error_lines(out)
    assert line.startswith("config file")
    assert "Unescaped '\\' in a string (at line 1, column" in line
    assert line.endswith("a backslash in a double-quoted string starts an escape: write Windows paths in single "
                         "quotes, which TOML keeps as they are, e.g. tags = 'C:\\ProgramData\\pistream\\tags.txt' "
                         "(or double each backslash)")


def test_a_windows_path_whose_backslashes_became_tabs(tmp_path, tags_file):
    # "C:\temp\tags.txt" is valid TOML: \t is a tab. Caught, since no path holds a tab.
    code, out = run_with_config(tmp_path, tags_file, 'tags = "C:\\temp\\tags.txt"\n')
    assert code == 2
    [line] = error_lines(out)
    assert line.startswith(f"config file '{tmp_path / 'pistream.toml'}' line 1: tags holds a tab or line break "
                           "where the path probably had a backslash")
    assert "write Windows paths in single quotes" in line


@pytest.mark.parametrize(("text", "expected"), [
    ("flush_seconds = '10s'\n",
     "--flush-seconds: Expected `float`, got `str` ('10s' is text: write a plain number of seconds, without unit "
     "or quotes, e.g. flush_seconds = 10) (config file '{config}' line 1)"),
    ("log_file_max_mb = \"10MB\"\n",
     "--log-file-max-mb: Expected `float`, got `str` ('10MB' is text: write a plain number of megabytes (MB), "
     "without unit or quotes, e.g. log_file_max_mb = 10) (config file '{config}' line 1)"),
])
def test_a_number_given_with_a_unit_as_text(tmp_path, tags_file, text, expected):
    code, out = run_with_config(tmp_path, tags_file, text)
    assert code == 2
    assert error_lines(out) == ["invalid setting: " + expected.format(config=tmp_path / "pistream.toml")]


def test_a_number_given_with_a_unit_bare(tmp_path, tags_file):
    code, out = run_with_config(tmp_path, tags_file, "flush_seconds = 10s\n")
    assert code == 2
    [line] = error_lines(out)
    assert line.endswith("numbers take no unit: write flush_seconds = <number>, in seconds (no quotes)")


def test_a_unity_catalog_name_without_a_workspace(tmp_path, tags_file, monkeypatch):
    for name in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET",
                 "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_AUTH_TYPE"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "home" / ".databrickscfg"
    code, out = run(["--tags", str(tags_file), "--simulate", "--table", "main.bronze.x", "--state-dir",
                     str(tmp_path / "state")], env={"DATABRICKS_CONFIG_FILE": str(missing)})
    assert code == 2
    [line] = error_lines(out)
    assert line.startswith("--table main.bronze.x was read as a Unity Catalog table (catalog.schema.table), but "
                           "no Databricks workspace host in the environment")
    assert (f"looked for DATABRICKS_HOST, DATABRICKS_TOKEN, DATABRICKS_CLIENT_ID/_SECRET and profile DEFAULT in "
            f"{missing} (no such file; DATABRICKS_CONFIG_FILE names another)") in line
    assert (f"the least that works: a [DEFAULT] profile in {missing} with host = https://<workspace> and client_id "
            "and client_secret of a service principal (or token)") in line
    assert line.endswith("for a local folder of that name write --table ./main.bronze.x (docs/unity-catalog.md)")


def test_a_dotted_local_name_warns(tmp_path):
    with structlog.testing.capture_logs() as logs:
        target = make_target("bronze.pi_events")
        make_target("./bronze.pi_events")
        make_target(str(tmp_path / "pi_events"))
    assert target.uri == "bronze.pi_events"  # still a local folder: a warning, not an error
    assert [(e["event"], e["table"]) for e in logs] == [("table_name_dotted", "bronze.pi_events")]
    assert logs[0]["note"] == ("read as the local folder ./bronze.pi_events: a Unity Catalog table has three parts, "
                               "catalog.schema.table; write --table ./bronze.pi_events if the folder is meant")


def test_misspelt_environment_variables_are_named_at_the_start(tmp_path):
    code, out = run(["--tags", str(tmp_path / "none.txt"), "--simulate"],
                    env={"PISTREAM_FLUSH_SECOND": "3", "PISTREAM_PASWORD": "x-secret-x", "PISTREAM_TOKEN": "t0ken",
                         "PISTREAM_LOG_LEVEL": "info"})
    assert code == 2  # the tags file is missing; the warning came first
    [warning] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert warning["event"] == "environment_unknown" and warning["level"] == "warning"
    assert warning["variables"] == ["PISTREAM_FLUSH_SECOND (did you mean `PISTREAM_FLUSH_SECONDS`?)",
                                    "PISTREAM_PASWORD (did you mean `PISTREAM_PASSWORD`?)"]
    assert "x-secret-x" not in out  # names only, never values


def test_an_error_is_printed_once_on_a_console_and_logged_to_a_log_file(tmp_path, tags_file):
    code, out = run(["--tags", str(tmp_path / "none.txt"), "--simulate"])
    assert code == 2
    assert out.count("not found: pass --tags PATH") == 1 and len(error_lines(out)) == 1

    log_file = tmp_path / "pistream.log"
    code, out = run(["--tags", str(tmp_path / "none.txt"), "--simulate", "--log-file", str(log_file)])
    assert code == 2 and len(error_lines(out)) == 1
    events = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert [e["error_type"] for e in events if e["event"] == "pistream_failed"] == ["TagsFileError"]

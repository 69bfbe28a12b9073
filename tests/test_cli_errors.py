"""User mistakes get one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from pistream.cli import main


@pytest.fixture
def tags_file(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("\\\\SIMSRV\\SINUSOID\n", encoding="utf-8")
    return path


def run_cli(args, env=None):
    result = CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)
    return result.exit_code, result.output


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_tags_file(tmp_path):
    code, out = run_cli(["--tags", str(tmp_path / "none.txt"), "--simulate"])
    assert code == 2
    assert "not found: pass --tags PATH" in out
    assert "Traceback" not in out


def test_empty_tags_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    code, out = run_cli(["--tags", str(empty), "--simulate", "--table", str(tmp_path / "t")])
    assert code == 2 and "lists no tags" in out


def test_no_url_and_no_simulator(tags_file):
    code, out = run_cli(["--tags", str(tags_file)])
    assert code == 2 and "pass --url https://HOST/piwebapi" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flush-rows", "0"], "--flush-rows: Expected `int` >= 1"),
        (["--flush-seconds", "-1"], "--flush-seconds: Expected `float` > 0"),
        (["--max-url-length", "10"], "--max-url-length: Expected `int` >= 512"),
    ],
)
def test_bad_option_values_name_the_option(tags_file, args, message):
    code, out = run_cli(["--tags", str(tags_file), "--simulate", *args])
    assert code == 2 and message in out


def test_option_type_errors_come_from_click(tags_file):
    code, out = run_cli(["--tags", str(tags_file), "--simulate", "--flush-rows", "many"])
    assert code == 2 and "'many' is not a valid integer" in out


def test_unknown_config_key_and_environment_override(tmp_path, tags_file):
    config = tmp_path / "pistream.toml"
    config.write_text('flush_rows = 10\nflsh_seconds = 3\n')
    code, out = run_cli(["--config", str(config), "--tags", str(tags_file), "--simulate"])
    assert code == 2 and "unknown setting flsh_seconds" in out

    config.write_text('flush_rows = 0\n')
    code, out = run_cli(["--config", str(config), "--tags", str(tags_file), "--simulate"])
    assert code == 2 and "--flush-rows: Expected `int` >= 1" in out
    # the environment (like the command line) wins over the file
    code, out = run_cli(["--config", str(config), "--tags", str(tags_file), "--simulate"],
                        env={"PISTREAM_FLUSH_ROWS": "-5"})
    assert code == 2 and "--flush-rows: Expected `int` >= 1" in out


def test_unreadable_config(tmp_path, tags_file):
    config = tmp_path / "bad.toml"
    config.write_text("flush_rows = = 3\n")
    code, out = run_cli(["--config", str(config), "--tags", str(tags_file)])
    assert code == 2 and "is not valid TOML" in out


def test_connection_refused_names_the_url_option(tmp_path, tags_file):
    """Refused is retried at start (a boot-order race); when --duration ends first, exit 1 (not 2: a service
    manager restarts it) with the line naming the option."""
    port = closed_port()
    url = f"http://127.0.0.1:{port}/piwebapi"
    code, out = run_cli(["--tags", str(tags_file), "--url", url, "--table", str(tmp_path / "t"),
                         "--duration", "2", "--log-format", "json"])
    assert code == 1
    assert '"event": "pi_web_api_unreachable"' in out
    # the whole line: this test's tmp_path holds the word "refused" too
    assert (f"pistream: error: connection to http://127.0.0.1:{port} refused: is PI Web API running there? "
            "check --url") in out
    assert "Traceback" not in out


def test_password_never_on_the_command_line(tags_file):
    code, out = run_cli(["--tags", str(tags_file), "--simulate", "--password", "x"])
    assert code == 2 and "No such option '--password'" in out

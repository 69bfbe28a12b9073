"""Running as a Windows service: --log-file (JSON lines, rotated by size, no secret in it) and the settings
the Windows guide tells users to copy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import structlog

from pistream.config import build_settings, load_config_file
from pistream.logsetup import configure_logging

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-never-logged"


def pistream(*args: str) -> list[str]:
    return [sys.executable, "-m", "pistream", *args]


def test_the_job_logs_to_the_file_not_stderr_and_no_secret(tmp_path):
    log_file = tmp_path / "logs" / "pistream.log"  # the folder is made
    proc = subprocess.run(
        pistream("--tags", str(ROOT / "examples" / "tags.txt"), "--simulate", "--duration", "3",
                 "--table", str(tmp_path / "table"), "--state-dir", str(tmp_path / "state"),
                 "--log-file", str(log_file)),
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PISTREAM_TOKEN": SECRET},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    text = log_file.read_text(encoding="utf-8")
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON, even on a terminal
    [summary] = [e for e in events if e["event"] == "pistream_stopped"]
    assert summary["values_written"] == summary["values_received"] > 0
    assert SECRET not in text


def test_the_file_rotates_by_size_and_keeps_the_backups_asked_for(tmp_path):
    log_file = tmp_path / "pistream.log"
    configure_logging("auto", "info", log_file=str(log_file), max_bytes=2_000, backups=2)
    try:
        log = structlog.get_logger("test")
        for seq in range(200):
            log.info("tick", seq=seq)
    finally:
        configure_logging("auto", "info")  # back to stderr for the other tests
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["pistream.log", "pistream.log.1", "pistream.log.2"]
    assert all(f.stat().st_size <= 2_000 for f in files)
    seqs = [[json.loads(line)["seq"] for line in f.read_text().splitlines()] for f in reversed(files)]
    flat = [s for chunk in seqs for s in chunk]  # oldest kept file first: whole lines, in order, the newest last
    assert flat == list(range(flat[0], 200))
    assert flat[0] > 0  # the oldest lines rotated away


def test_a_log_file_that_cannot_be_written_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        pistream("--tags", str(ROOT / "examples" / "tags.txt"), "--simulate", "--log-file", str(tmp_path)),
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()  # "Is a directory" here, "Permission denied" on Windows
    assert re.fullmatch(rf"pistream: error: cannot write the log file {re.escape(str(tmp_path))}: "
                        r"(Is a directory|Permission denied); "
                        r"--log-file must name a file this account may create and write", line), line


def test_the_windows_guide_settings_are_valid_settings(tmp_path):
    """docs/windows.md's pistream.toml, as a user would copy it: every name known, every value valid."""
    guide = (ROOT / "docs" / "windows.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```toml\n(.*?)```", guide, re.S)
    config = tmp_path / "pistream.toml"
    config.write_text(block, encoding="utf-8")
    settings = build_settings(load_config_file(config), {}, source=str(config))
    assert settings.auth == "kerberos"
    assert settings.log_file == "C:\\ProgramData\\pistream\\logs\\pistream.log"
    assert settings.state_dir == "C:\\ProgramData\\pistream\\state"
    assert settings.metrics_port == 9464

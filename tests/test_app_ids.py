"""Which app id and which tags a process takes: ``--shard K/N`` splits one tags file by a stable hash of each
path (every tag in exactly one shard, the same on every platform and Python version); the default app id
differs between tags files and shards; a site upgraded from the ``pistream-HOSTNAME`` default keeps it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pistream.cli import main
from pistream.config import DEFAULT_STATE_DIR, build_settings, default_app_id
from pistream.errors import ConfigError
from pistream.pi.tags import fleet_shard, shard_paths
from pistream.pipeline import writer_app_id
from pistream.stream.state import state_path

PATHS = [f"\\\\PISRV{n % 3:02d}\\UNIT{n // 7}.TAG{n:05d}" for n in range(2000)]


def settings(tags, **options):
    return build_settings({}, {"tags": str(tags), "simulate": True, **options})


def test_every_tag_is_in_exactly_one_shard_and_the_shards_are_even():
    for count in (1, 2, 4, 8):
        shards = [shard_paths(PATHS, k, count) for k in range(1, count + 1)]
        assert sorted(p for shard in shards for p in shard) == sorted(PATHS)
        assert min(map(len, shards)) > len(PATHS) / count * 0.8  # SHA-256 spreads them


def test_the_shard_of_a_path_is_fixed_by_its_text_not_by_the_process():
    # SHA-256 of the NFC, case-folded path: these values hold on any platform, Python version or hash seed
    assert [fleet_shard(p, 8) for p in ("\\\\PISRV01\\SINUSOID", "\\\\PISRV01\\CDT158", "\\\\AF\\DB\\Pump|Flow")] \
        == [fleet_shard(p, 8) for p in ("\\\\pisrv01\\sinusoid", "\\\\PISRV01\\cdt158", "\\\\af\\db\\PUMP|FLOW")]
    code = ("from pistream.pi.tags import fleet_shard; import sys; "
            "print([fleet_shard(p, 8) for p in sys.argv[1:]])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code, *PATHS[:50]], capture_output=True, text=True, env=env,
                           timeout=60, check=True)
    assert other.stdout.strip() == str([fleet_shard(p, 8) for p in PATHS[:50]])
    assert [fleet_shard(p, 8) for p in ("\\\\PISRV01\\SINUSOID", "\\\\PISRV01\\CDT158", "\\\\SIMSRV\\SIM000000")] \
        == [3, 5, 8]  # golden values: a change here re-shards every fleet


@pytest.mark.parametrize("shard", ["0/8", "9/8", "x", "3", "3/0", "-1/4", "1/2000"])
def test_a_wrong_shard_is_one_clear_error_with_exit_2(tmp_path, shard):
    tags = tmp_path / "tags.txt"
    tags.write_text("\\\\SIMSRV\\SINUSOID\n")
    result = CliRunner().invoke(main, ["--tags", str(tags), "--simulate", "--shard", shard], env={},
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert f"pistream: error: --shard {shard!r}: write K/N with 1 <= K <= N <= 1024, shards counted from 1" \
        in result.output
    assert "Traceback" not in result.output


def test_a_shard_gets_its_own_state_dir_unless_one_is_given(tmp_path):
    assert settings(tmp_path / "t.txt").state_dir == DEFAULT_STATE_DIR
    assert settings(tmp_path / "t.txt", shard="3/8").state_dir == f"{DEFAULT_STATE_DIR}/shard-3-of-8"
    assert settings(tmp_path / "t.txt", shard="3/8", state_dir="here").state_dir == "here"


def test_default_app_ids_differ_between_tags_files_and_shards_and_stay_put(tmp_path):
    host = socket.gethostname()
    one, two = settings(tmp_path / "a" / "tags.txt"), settings(tmp_path / "b" / "tags.txt")
    assert writer_app_id(one) != writer_app_id(two)
    assert writer_app_id(one).startswith(f"pistream-{host}-") and len(writer_app_id(one)) == len(host) + 18
    assert writer_app_id(one) == default_app_id(settings(tmp_path / "a" / "tags.txt"))  # stable across runs
    shards = {writer_app_id(settings(tmp_path / "a" / "tags.txt", shard=f"{k}/4")) for k in range(1, 5)}
    assert len(shards) == 4 and f"{writer_app_id(one)}-s2-of-4" in shards
    assert writer_app_id(settings(tmp_path / "a" / "tags.txt", app_id="mine")) == "mine"


def test_a_site_upgraded_from_the_hostname_default_keeps_its_app_id_and_history(tmp_path):
    legacy = f"pistream-{socket.gethostname()}"
    site = settings(tmp_path / "tags.txt", state_dir=str(tmp_path / "state"), table=str(tmp_path / "table"))
    assert writer_app_id(site) != legacy  # a new site
    state = state_path(site.state_dir, site.table, legacy)
    state.parent.mkdir(parents=True)
    state.write_bytes(b"floors of the earlier version")
    assert writer_app_id(site) == legacy  # its floors, open gaps and transaction versions carry over
    assert writer_app_id(settings(tmp_path / "tags.txt", state_dir=str(tmp_path / "state"),
                                  table=str(tmp_path / "other-table"))) != legacy
    assert writer_app_id(settings(tmp_path / "tags.txt", state_dir=str(tmp_path / "state"),
                                  table=str(tmp_path / "table"), app_id="pinned")) == "pinned"


@pytest.mark.parametrize("app_id", ["pistream:maintenance", "pistream:claim:x", " "])
def test_app_ids_of_pistreams_own_records_are_refused(tmp_path, app_id):
    with pytest.raises(ConfigError, match="must not be empty or start with 'pistream:'"):
        settings(tmp_path / "t.txt", app_id=app_id)

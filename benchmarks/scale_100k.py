r"""A large site: 100,000 tags over TLS (private CA) with Basic auth, both sides as real processes.

    python benchmarks/scale_100k.py [--tags 100000] [--rate 0.05] [--duration 40] [--json out.json]

The simulator (``pistream simulate --tls-cert/--tls-key --basic-user``) serves ``\\SIMSRV\SIM000000``...;
pistream runs against it with ``--ca-bundle`` for ``--duration`` seconds. Its JSON log (stderr) gives the
times from process start to ``tags_resolved``, to the last ``channel_connected`` (every channel open) and
to the first ``batch_committed``; the table, read back with deltalake, gives the tags that have rows.
Goal: resolution + subscription (start to all channels connected) under 30 s.

The default rate, 0.05 events/s per tag (5,000 events/s in all), is a typical PI interface load (about 50
events/s per 1,000 tags). Needs the test extra (trustme).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import trustme

REPO = Path(__file__).resolve().parent.parent
USER = "pistream"
PASSWORD = "scale-benchmark-password"  # a loopback simulator's throwaway credential


def _pistream(*args: str) -> list[str]:
    return [sys.executable, "-m", "pistream", *args]


def write_site(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA (ca.pem, for --ca-bundle) and a server certificate for 127.0.0.1 signed by it."""
    ca = trustme.CA(organization_name="Scale Benchmark Root CA")
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(cert_pem), append=i > 0)
    server.private_key_pem.write_to_path(str(key_pem))
    return ca_pem, cert_pem, key_pem


def start_simulator(directory: Path, tags: int, rate: float, cert: Path, key: Path, timeout: float = 300
                    ) -> tuple[subprocess.Popen[str], str, float]:
    """The simulator process and its base URL, once it serves (and how long that took)."""
    started = time.monotonic()
    with open(directory / "simulator.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            _pistream("simulate", "--tag-count", str(tags), "--rate", str(rate), "--tls-cert", str(cert),
                      "--tls-key", str(key), "--basic-user", USER, "--basic-password-env", "SCALE_SIM_PASSWORD"),
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=directory,
            env={**os.environ, "SCALE_SIM_PASSWORD": PASSWORD})
    assert process.stdout is not None
    found: list[str] = []

    def read_banner() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            match = re.search(r"https://127\.0\.0\.1:\d+/piwebapi", line)
            if match and not found:
                found.append(match.group(0))
        # keep draining so the simulator never blocks on a full pipe

    reader = threading.Thread(target=read_banner, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the simulator did not start: see {directory / 'simulator.log'}")
        time.sleep(0.05)
    return process, found[0], time.monotonic() - started


def run_pistream(directory: Path, url: str, tags_file: Path, ca_pem: Path, duration: float
                 ) -> tuple[int, list[dict], float]:
    """Run pistream to the end of --duration; (exit code, its JSON log events, wall-clock start)."""
    stderr_path = directory / "pistream.log"
    with open(stderr_path, "w") as stderr:
        wall_start = time.time()
        process = subprocess.run(
            _pistream("--tags", str(tags_file), "--url", url, "--ca-bundle", str(ca_pem), "--username", USER,
                      "--duration", str(duration), "--table", str(directory / "table"),
                      "--state-dir", str(directory / "state"), "--log-format", "json"),
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=directory, timeout=duration + 600,
            env={**os.environ, "PISTREAM_PASSWORD": PASSWORD})
    text = stderr_path.read_text()
    assert PASSWORD not in text, "the password leaked into the log"
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return process.returncode, events, wall_start


def since(start: float, event: dict | None) -> float | None:
    if event is None:
        return None
    stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    return round(stamp - start, 3)


def tags_with_rows(table: Path) -> tuple[int, int]:
    """(distinct tags with at least one row, rows) as delta-rs reads the table."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    data = DeltaTable(str(table)).to_pyarrow_table(columns=["tag_webid"])
    return pc.count_distinct(data["tag_webid"]).as_py(), data.num_rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tags", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.05, help="events/s per tag")
    parser.add_argument("--duration", type=float, default=40.0, help="pistream --duration")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, table)")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="pistream-scale-"))
    ca_pem, cert_pem, key_pem = write_site(directory)
    tags_file = directory / "tags.txt"
    tags_file.write_text("".join(f"\\\\SIMSRV\\SIM{i:06d}\n" for i in range(args.tags)), encoding="utf-8")
    simulator, url, sim_startup = start_simulator(directory, args.tags, args.rate, cert_pem, key_pem)
    try:
        code, events, start = run_pistream(directory, url, tags_file, ca_pem, args.duration)
    finally:
        simulator.terminate()
        try:
            simulator.wait(timeout=15)
        except subprocess.TimeoutExpired:
            simulator.kill()
            simulator.wait()

    def first(name: str) -> dict | None:
        return next((e for e in events if e.get("event") == name), None)

    resolved = first("tags_resolved")
    channels = resolved["channels"] if resolved else 0
    connected: dict[str, dict] = {}
    for event in events:
        if event.get("event") == "channel_connected":
            connected.setdefault(event["channel"], event)
    all_connected = max(connected.values(), key=lambda e: e["timestamp"]) \
        if channels and len(connected) == channels else None
    stopped = first("pistream_stopped") or {}
    failed = first("pistream_failed")
    distinct, rows = tags_with_rows(directory / "table") if (directory / "table" / "_delta_log").exists() \
        else (0, 0)
    report = {
        "tags": args.tags,
        "rate_per_tag": args.rate,
        "duration": args.duration,
        "simulator_startup_s": round(sim_startup, 3),
        "exit_code": code,
        "error": failed["error"] if failed else None,
        "to_tags_resolved_s": since(start, resolved),
        "to_all_channels_connected_s": since(start, all_connected),
        "to_first_batch_committed_s": since(start, first("batch_committed")),
        "channels": channels,
        "channels_connected": len(connected),
        "channel_disconnects": sum(1 for e in events if e.get("event") == "channel_disconnected"),
        "values_written": stopped.get("values_written"),
        "commits": stopped.get("commits"),
        "table_rows": rows,
        "tags_with_rows": distinct,
        "goal_subscribed_under_30s": (since(start, all_connected) or 1e9) < 30,
        "folder": str(directory) if args.keep else None,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["exit_code"] == 0 and result["goal_subscribed_under_30s"] else 1)

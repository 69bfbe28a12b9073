"""Build the one-file pistream executable with PyInstaller, then smoke-test it. CI calls this.

    python packaging/build_exe.py               # build dist/pistream (dist/pistream.exe), then smoke-test it
    python packaging/build_exe.py --smoke-only  # smoke-test the executable already in dist/
    python packaging/build_exe.py --build-only  # build, no smoke test

Run it with the interpreter of the environment pistream is installed in (editable is fine) with PyInstaller
and the C frame codec built. The build is ``pyinstaller --noconfirm --clean`` with packaging/pistream.spec,
the executable goes to dist/, PyInstaller's work files to build/.

The smoke test runs the executable (never the venv's pistream) and fails on any functional check:
  * ``--version``: exit 0, the version and the frame decoder, which must be the C codec and the same line as
    ``python -m pistream --version``;
  * ``--help``, ``simulate --help``, ``optimize --help``: exit 0;
  * a 10 s run against the built-in simulator (loopback only; metrics on a loopback port too) into a
    temporary table, exit 0; the table is then read back with the deltalake package of this interpreter:
    rows > 0 and rows for every tag listed;
  * ``stats --table ... --json`` on that table: exit 0 and the same row count; ``optimize --zorder``: exit 0;
  * the bundle lists every pistream module, the codec, truststore, pyspnego (+ sspilib on Windows), which
    no smoke run imports;
  * cold start, three times: from starting the process to its ``tags_resolved`` log line (then SIGINT, or
    CTRL_BREAK on Windows; it must stop cleanly).
Size and the median cold start are compared with goals (SIZE_GOAL_MB, COLD_START_GOAL_S) and reported "over
goal" when above them, without failing. Prints one line ``exe_smoke: size_MB=... cold_start_s=... rows=...
decoder=...`` and writes the results to dist/exe-smoke.json. Every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "pistream.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build"
EXE = DIST / ("pistream.exe" if os.name == "nt" else "pistream")
TAGS_EXAMPLE = ROOT / "examples" / "tags.txt"
RESULT = DIST / "exe-smoke.json"

SIZE_GOAL_MB = 120.0
COLD_START_GOAL_S = 1.5
C_DECODER = "C frame codec"
RUN_SECONDS = 10
COLD_RUNS = 3

BUILD_TIMEOUT = 1800
QUICK_TIMEOUT = 120  # a one-file start extracts the bundle first: generous for a slow CI disk
RUN_TIMEOUT = RUN_SECONDS + 120
COLD_TIMEOUT = 60
STOP_TIMEOUT = 60


class Checks:
    """Functional checks, in order; any failure fails the script."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results[name] = {"ok": ok, "detail": detail}
        print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.results.values())


def _env() -> dict[str, str]:
    """The caller's environment without PISTREAM_* settings, which would change what the runs do."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PISTREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(),
                              cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(args, -999, out, err + f"\n(timed out after {timeout:.0f} s)")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build() -> bool:
    print(f"build: pyinstaller {SPEC.relative_to(ROOT)} -> {EXE.relative_to(ROOT)}", flush=True)
    started = time.monotonic()
    args = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--distpath", str(DIST),
            "--workpath", str(WORK), str(SPEC)]
    try:
        done = subprocess.run(args, cwd=ROOT, timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"build: FAILED, timed out after {BUILD_TIMEOUT} s", flush=True)
        return False
    if done.returncode != 0 or not EXE.is_file():
        print(f"build: FAILED (exit {done.returncode})", flush=True)
        return False
    print(f"build: done in {time.monotonic() - started:.0f} s, {EXE.stat().st_size / 1e6:.1f} MB", flush=True)
    return True


# Modules no smoke run imports (TLS to a real server, Kerberos/NTLM, Unity Catalog) that must be in the
# bundle all the same; every pistream module is required too (listed from the package itself).
REQUIRED_MODULES = ["pistream.stream._framecodec", "truststore", "spnego", "spnego._ntlm", "spnego._gss",
                    "spnego._sspi", "cryptography.hazmat.bindings._rust", "zoneinfo", "deltalake._internal",
                    "certifi"] + (["sspilib"] if os.name == "nt" else [])


def _bundled_modules() -> set[str]:
    """Module names in the executable: its archive's extension files and the PYZ's modules."""
    listing = _run([sys.executable, "-m", "PyInstaller.utils.cliutils.archive_viewer", "-r", "-b", str(EXE)],
                   QUICK_TIMEOUT)
    names = set()
    for line in listing.stdout.splitlines():
        name = line.strip().replace("\\", "/")
        if name.endswith((".so", ".pyd")) and "/" in name:
            folder, _, file = name.rpartition("/")
            name = f"{folder.replace('/', '.')}.{file.split('.')[0]}"
        names.add(name)
    return names


def _pistream_modules() -> list[str]:
    import pkgutil

    import pistream

    return ["pistream"] + [m.name for m in pkgutil.walk_packages(pistream.__path__, "pistream.")
                           if m.name != "pistream.__main__"]


def _read_tags(path: Path) -> list[str]:
    """The tags file's tags, as pistream reads them (it dedups case-insensitively)."""
    from pistream.pi.tags import read_tags_file

    return list(read_tags_file(path).paths)


def _table_rows(table: Path) -> tuple[int, dict[str, int]]:
    """Rows in the Delta table and per tag, read with this interpreter's deltalake (not the executable)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    data = DeltaTable(str(table)).to_pyarrow_table(columns=["tag"])
    counts = pc.value_counts(data.column("tag").combine_chunks())
    return data.num_rows, {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()}


def _cold_start(tags: Path, work: Path, run: int) -> tuple[float | None, str]:
    """Seconds from starting the executable to its tags_resolved log line; then stop it and wait."""
    args = [str(EXE), "--tags", str(tags), "--simulate", "--table", str(work / f"cold{run}" / "table"),
            "--state-dir", str(work / f"cold{run}" / "state"), "--log-format", "json",
            "--maintenance-interval", "0"]
    flags = subprocess.CREATE_NEW_PROCESS_GROUP if os.name == "nt" else 0  # type: ignore[attr-defined]
    lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env(), creationflags=flags)

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put((time.perf_counter(), line))
        lines.put((time.perf_counter(), None))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seconds: float | None = None
    seen: list[str] = []
    deadline = started + COLD_TIMEOUT
    while seconds is None:
        try:
            at, line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        try:
            event = json.loads(line).get("event")
        except (ValueError, AttributeError):
            continue
        if event == "tags_resolved":
            seconds = at - started
    if proc.poll() is None:
        proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)  # type: ignore[attr-defined]
    try:
        code = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        return None, f"did not stop within {STOP_TIMEOUT} s of the interrupt"
    reader.join(timeout=10)
    if seconds is None:
        return None, f"no tags_resolved line (exit {code}): {_tail(''.join(seen), 8)}"
    if code not in (0, 130):
        return seconds, f"stopped with exit {code} after the interrupt"
    return seconds, ""


def smoke() -> bool:
    checks = Checks()
    result: dict[str, Any] = {"exe": str(EXE.relative_to(ROOT)), "platform": sys.platform,
                              "size_goal_MB": SIZE_GOAL_MB, "cold_start_goal_s": COLD_START_GOAL_S}
    print(f"smoke: {EXE.relative_to(ROOT)}", flush=True)
    if not checks.record("exe exists", EXE.is_file(), str(EXE)):
        return _finish(checks, result)
    size_mb = round(EXE.stat().st_size / 1e6, 1)
    result["size_MB"] = size_mb

    # --version: the decoder must be the C codec, as in the Python package the executable was built from.
    version = _run([str(EXE), "--version"], QUICK_TIMEOUT)
    reference = _run([sys.executable, "-m", "pistream", "--version"], QUICK_TIMEOUT)
    line = version.stdout.strip()
    result["version"] = line
    decoder = line.partition("frame decoder: ")[2].rstrip(")") or "unknown"
    result["decoder"] = decoder
    checks.record("--version", version.returncode == 0 and line.startswith("pistream "),
                  line or _tail(version.stderr))
    checks.record("decoder is the C codec", decoder == C_DECODER, decoder)
    checks.record("--version as python -m pistream", line == reference.stdout.strip(),
                  f"python -m pistream: {reference.stdout.strip() or _tail(reference.stderr)}")

    bundled = _bundled_modules()
    missing = [m for m in REQUIRED_MODULES + _pistream_modules() if m not in bundled]
    checks.record("bundle holds every pistream module, the codec, truststore, pyspnego",
                  not missing, f"missing: {', '.join(missing)}" if missing else f"{len(bundled)} entries")

    for args in (["--help"], ["simulate", "--help"], ["optimize", "--help"]):
        done = _run([str(EXE), *args], QUICK_TIMEOUT)
        checks.record(" ".join(args), done.returncode == 0 and "Usage:" in done.stdout,
                      "" if done.returncode == 0 else _tail(done.stderr))

    rows = 0
    with tempfile.TemporaryDirectory(prefix="pistream-exe-smoke-") as tmp:
        work = Path(tmp)
        tags_file = work / "tags.txt"
        tags_file.write_bytes(TAGS_EXAMPLE.read_bytes())
        tags = _read_tags(tags_file)
        table = work / "table"
        run = _run([str(EXE), "--tags", str(tags_file), "--simulate", "--duration", str(RUN_SECONDS),
                    "--table", str(table), "--state-dir", str(work / "state"), "--log-format", "json",
                    "--flush-seconds", "1", "--metrics-port", "0"], RUN_TIMEOUT, cwd=work)
        if checks.record(f"{RUN_SECONDS} s --simulate run", run.returncode == 0,
                         f"exit {run.returncode}" + ("" if run.returncode == 0 else "\n" + _tail(run.stderr))):
            checks.record("metrics served (loopback)", '"metrics_served"' in run.stderr)
            try:
                rows, per_tag = _table_rows(table)
            except Exception as exc:  # noqa: BLE001 - any failure to read the table is a failed check
                checks.record("table read back", False, f"{type(exc).__name__}: {exc}")
            else:
                result["rows"] = rows
                written = {t.upper() for t in per_tag}
                missing = [t for t in tags if t.upper() not in written]
                checks.record("table read back", rows > 0, f"{rows} rows, {len(per_tag)} tags")
                checks.record("rows for every tag", not missing and bool(tags),
                              f"{len(tags)} tags" + (f"; none for {', '.join(missing)}" if missing else ""))
                stats = _run([str(EXE), "stats", "--table", str(table), "--json"], QUICK_TIMEOUT)
                try:
                    stats_rows = json.loads(stats.stdout).get("rows")
                except (ValueError, AttributeError):
                    stats_rows = None
                checks.record("stats --json", stats.returncode == 0 and stats_rows == rows,
                              f"rows={stats_rows}" if stats.returncode == 0 else _tail(stats.stderr))
                optimize = _run([str(EXE), "optimize", "--table", str(table), "--zorder", "--json"], QUICK_TIMEOUT)
                checks.record("optimize --zorder --json", optimize.returncode == 0,
                              "" if optimize.returncode == 0 else _tail(optimize.stderr))

        samples: list[float] = []
        for i in range(COLD_RUNS):
            seconds, problem = _cold_start(tags_file, work, i)
            if seconds is not None:
                samples.append(round(seconds, 3))
            checks.record(f"cold start {i + 1}", seconds is not None and not problem,
                          problem or f"{seconds:.3f} s to tags_resolved, stopped cleanly")
    result["rows"] = rows
    result["cold_start_samples_s"] = samples
    result["cold_start_s"] = round(statistics.median(samples), 3) if samples else None
    return _finish(checks, result)


def _finish(checks: Checks, result: dict[str, Any]) -> bool:
    result["checks"] = checks.results
    result["ok"] = checks.ok
    size = result.get("size_MB")
    cold = result.get("cold_start_s")
    result["size_over_goal"] = size is not None and size > SIZE_GOAL_MB
    result["cold_start_over_goal"] = cold is not None and cold > COLD_START_GOAL_S
    DIST.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    notes = []
    if result["size_over_goal"]:
        notes.append(f"size over goal ({SIZE_GOAL_MB:g} MB)")
    if result["cold_start_over_goal"]:
        notes.append(f"cold start over goal ({COLD_START_GOAL_S:g} s)")
    print(f"exe_smoke: size_MB={size} cold_start_s={cold} rows={result.get('rows', 0)} "
          f"decoder={json.dumps(result.get('decoder', 'unknown'))} ok={str(checks.ok).lower()}"
          + (f"  ({'; '.join(notes)})" if notes else ""), flush=True)
    if result.get("cold_start_samples_s"):
        print(f"  cold start samples (s): {result['cold_start_samples_s']}; results in "
              f"{RESULT.relative_to(ROOT)}", flush=True)
    return checks.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke-only", action="store_true", help="smoke-test the executable in dist/")
    group.add_argument("--build-only", action="store_true", help="build without the smoke test")
    options = parser.parse_args()
    if not options.smoke_only and not build():
        return 1
    if options.build_only:
        return 0
    return 0 if smoke() else 1


if __name__ == "__main__":
    sys.exit(main())

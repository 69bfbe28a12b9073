"""Build the pistream executables with PyInstaller, then smoke-test them. CI calls this.

    python packaging/build_exe.py               # build both layouts, then smoke-test them
    python packaging/build_exe.py --smoke-only  # smoke-test the executables already in dist/
    python packaging/build_exe.py --build-only  # build, no smoke test

Two layouts of the same bundle (packaging/pistream.spec):
  * folder: dist/folder/pistream/pistream(.exe) with its libraries beside it, zipped to
    dist/pistream-<version>-<platform>-x64.zip - the download a Windows PI host is told to use: nothing to
    unpack at start, so it starts as fast as a venv;
  * onefile: dist/pistream(.exe), one file to copy, which unpacks ~300 MB to a temp folder at every start.

Run it with the interpreter of the environment pistream is installed in (editable is fine) with PyInstaller
and the C frame codec built. The build is ``pyinstaller --noconfirm --clean`` with packaging/pistream.spec,
the executable goes to dist/, PyInstaller's work files to build/.

The smoke test runs the folder build's executable (never the venv's pistream) and fails on any functional
check:
  * ``--version``: exit 0, the version and the frame decoder, which must be the C codec and the same line as
    ``python -m pistream --version``;
  * ``--help``, ``simulate --help``, ``optimize --help``: exit 0;
  * a 10 s run against the built-in simulator (loopback only; metrics on a loopback port too) into a
    temporary table, exit 0; the table is then read back with the deltalake package of this interpreter:
    rows > 0 and rows for every tag listed;
  * ``stats --table ... --json`` on that table: exit 0 and the same row count; ``optimize --zorder``: exit 0;
  * the bundle lists every pistream module, the codec, truststore, pyspnego (+ sspilib on Windows), which
    no smoke run imports (read from the one-file archive: both layouts come from one analysis);
  * the one file: ``--version`` as above;
  * cold start, three times each for the folder build, the one file and ``python -m pistream`` of this venv
    (the baseline, same machine, same minute): from starting the process to its ``tags_resolved`` log line
    (then SIGINT, or CTRL_BREAK on Windows; it must stop cleanly).
The folder build's median cold start must be within COLD_START_GOAL_S, or within VENV_RATIO of the venv's
median on a machine too busy for that (a check that fails). The one file's cold start and the download
sizes (the zip, the one file) are compared with their goals and reported "over goal" without failing.
Prints one line ``exe_smoke: ...`` and writes the results to dist/exe-smoke.json. Every subprocess has a
timeout.
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
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "pistream.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build"
EXE_NAME = "pistream.exe" if os.name == "nt" else "pistream"
EXE = DIST / EXE_NAME  # the one file
FOLDER_DIST = DIST / "folder"
FOLDER_EXE = FOLDER_DIST / "pistream" / EXE_NAME
TAGS_EXAMPLE = ROOT / "examples" / "tags.txt"
RESULT = DIST / "exe-smoke.json"

SIZE_GOAL_MB = 120.0
COLD_START_GOAL_S = 1.5
VENV_RATIO = 1.25  # the folder build may start this much slower than the venv when the machine is slow
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


def build(layout: str) -> bool:
    """One layout ("onefile" or "folder") with the spec; the folder is then zipped for download."""
    distpath = DIST if layout == "onefile" else FOLDER_DIST
    target = EXE if layout == "onefile" else FOLDER_EXE
    print(f"build: pyinstaller {SPEC.relative_to(ROOT)} ({layout}) -> {target.relative_to(ROOT)}", flush=True)
    started = time.monotonic()
    args = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--distpath", str(distpath),
            "--workpath", str(WORK / layout), str(SPEC)]
    env = {**os.environ, "PISTREAM_EXE_LAYOUT": layout}
    try:
        done = subprocess.run(args, cwd=ROOT, timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
                              env=env)
    except subprocess.TimeoutExpired:
        print(f"build: FAILED, timed out after {BUILD_TIMEOUT} s", flush=True)
        return False
    if done.returncode != 0 or not target.is_file():
        print(f"build: FAILED (exit {done.returncode})", flush=True)
        return False
    if layout == "folder":
        archive = zip_folder()
        print(f"build: done in {time.monotonic() - started:.0f} s, folder {_folder_mb():.1f} MB, "
              f"{archive.name} {archive.stat().st_size / 1e6:.1f} MB", flush=True)
    else:
        print(f"build: done in {time.monotonic() - started:.0f} s, {EXE.stat().st_size / 1e6:.1f} MB", flush=True)
    return True


def zip_name() -> Path:
    from pistream import __version__

    platform = {"win32": "windows", "linux": "linux", "darwin": "macos"}.get(sys.platform, sys.platform)
    return DIST / f"pistream-{__version__}-{platform}-x64.zip"


def zip_folder() -> Path:
    """dist/pistream-<version>-<platform>-x64.zip holding the folder ``pistream/``."""
    archive = zip_name()
    archive.unlink(missing_ok=True)
    root = FOLDER_EXE.parent
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as out:
        for path in sorted(root.rglob("*")):
            name = (Path("pistream") / path.relative_to(root)).as_posix()
            if path.is_symlink():  # PyInstaller links libraries on Linux/macOS: kept a link, not a copy
                link = zipfile.ZipInfo(name)
                link.external_attr = 0o120777 << 16
                out.writestr(link, os.readlink(path))
            elif path.is_file():
                out.write(path, name)
    return archive


def _folder_mb() -> float:
    return sum(p.stat().st_size for p in FOLDER_EXE.parent.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


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


def _cold_start(command: list[str], tags: Path, work: Path, run: str) -> tuple[float | None, str]:
    """Seconds from starting ``command`` (an executable, or this venv's python -m pistream) to its
    tags_resolved log line; then stop it and wait."""
    args = [*command, "--tags", str(tags), "--simulate", "--table", str(work / f"cold{run}" / "table"),
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
    result: dict[str, Any] = {"exe": str(FOLDER_EXE.relative_to(ROOT)), "onefile": str(EXE.relative_to(ROOT)),
                              "zip": str(zip_name().relative_to(ROOT)), "platform": sys.platform,
                              "size_goal_MB": SIZE_GOAL_MB, "cold_start_goal_s": COLD_START_GOAL_S,
                              "venv_ratio_allowed": VENV_RATIO}
    print(f"smoke: {FOLDER_EXE.relative_to(ROOT)} (and the one file {EXE.relative_to(ROOT)})", flush=True)
    exists = [checks.record(f"{name} exists", path.is_file(), str(path))
              for name, path in (("folder build", FOLDER_EXE), ("zip", zip_name()), ("one file", EXE))]
    if not all(exists):
        return _finish(checks, result)
    result["size_MB"] = round(zip_name().stat().st_size / 1e6, 1)  # the download
    result["folder_MB"] = round(_folder_mb(), 1)
    result["onefile_size_MB"] = round(EXE.stat().st_size / 1e6, 1)
    exe = FOLDER_EXE

    # --version: the decoder must be the C codec, as in the Python package the executable was built from.
    version = _run([str(exe), "--version"], QUICK_TIMEOUT)
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
    onefile_version = _run([str(EXE), "--version"], QUICK_TIMEOUT)
    checks.record("one file --version as python -m pistream", onefile_version.returncode == 0
                  and onefile_version.stdout.strip() == reference.stdout.strip(),
                  onefile_version.stdout.strip() or _tail(onefile_version.stderr))

    bundled = _bundled_modules()
    missing = [m for m in REQUIRED_MODULES + _pistream_modules() if m not in bundled]
    checks.record("bundle holds every pistream module, the codec, truststore, pyspnego",
                  not missing, f"missing: {', '.join(missing)}" if missing else f"{len(bundled)} entries")

    for args in (["--help"], ["simulate", "--help"], ["optimize", "--help"]):
        done = _run([str(exe), *args], QUICK_TIMEOUT)
        checks.record(" ".join(args), done.returncode == 0 and "Usage:" in done.stdout,
                      "" if done.returncode == 0 else _tail(done.stderr))

    rows = 0
    with tempfile.TemporaryDirectory(prefix="pistream-exe-smoke-") as tmp:
        work = Path(tmp)
        tags_file = work / "tags.txt"
        tags_file.write_bytes(TAGS_EXAMPLE.read_bytes())
        tags = _read_tags(tags_file)
        table = work / "table"
        run = _run([str(exe), "--tags", str(tags_file), "--simulate", "--duration", str(RUN_SECONDS),
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
                stats = _run([str(exe), "stats", "--table", str(table), "--json"], QUICK_TIMEOUT)
                try:
                    stats_rows = json.loads(stats.stdout).get("rows")
                except (ValueError, AttributeError):
                    stats_rows = None
                checks.record("stats --json", stats.returncode == 0 and stats_rows == rows,
                              f"rows={stats_rows}" if stats.returncode == 0 else _tail(stats.stderr))
                optimize = _run([str(exe), "optimize", "--table", str(table), "--zorder", "--json"], QUICK_TIMEOUT)
                checks.record("optimize --zorder --json", optimize.returncode == 0,
                              "" if optimize.returncode == 0 else _tail(optimize.stderr))

        # Interleaved, so that a busy minute slows each of them alike.
        commands = {"folder": [str(exe)], "onefile": [str(EXE)], "venv": [sys.executable, "-m", "pistream"]}
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(COLD_RUNS):
            for name, command in commands.items():
                seconds, problem = _cold_start(command, tags_file, work, f"{name}{i}")
                if seconds is not None:
                    samples[name].append(round(seconds, 3))
                checks.record(f"cold start {name} {i + 1}", seconds is not None and not problem,
                              problem or f"{seconds:.3f} s to tags_resolved, stopped cleanly")
    result["rows"] = rows
    medians = {name: round(statistics.median(s), 3) if s else None for name, s in samples.items()}
    result["cold_start_samples_s"] = samples["folder"]
    result["cold_start_s"] = medians["folder"]
    result["onefile_cold_start_s"] = medians["onefile"]
    result["venv_cold_start_s"] = medians["venv"]
    folder, venv = medians["folder"], medians["venv"]
    if folder is not None and venv is not None:
        checks.record("folder build starts within the goal", folder <= max(COLD_START_GOAL_S, VENV_RATIO * venv),
                      f"median {folder} s; goal {COLD_START_GOAL_S} s, or {VENV_RATIO} x the venv's {venv} s")
    return _finish(checks, result)


def _finish(checks: Checks, result: dict[str, Any]) -> bool:
    result["checks"] = checks.results
    result["ok"] = checks.ok
    size = result.get("size_MB")
    cold = result.get("cold_start_s")
    result["size_over_goal"] = size is not None and size > SIZE_GOAL_MB
    result["cold_start_over_goal"] = cold is not None and cold > COLD_START_GOAL_S
    onefile_cold = result.get("onefile_cold_start_s")
    DIST.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    notes = []
    if result["size_over_goal"]:
        notes.append(f"size over goal ({SIZE_GOAL_MB:g} MB)")
    if result["cold_start_over_goal"]:
        notes.append(f"cold start over goal ({COLD_START_GOAL_S:g} s)")
    if onefile_cold is not None and onefile_cold > COLD_START_GOAL_S:
        notes.append(f"the one file's cold start is over goal ({COLD_START_GOAL_S:g} s): use the zip")
    print(f"exe_smoke: zip_MB={size} folder_MB={result.get('folder_MB')} onefile_MB={result.get('onefile_size_MB')} "
          f"cold_start_s={cold} onefile_cold_start_s={onefile_cold} venv_cold_start_s="
          f"{result.get('venv_cold_start_s')} rows={result.get('rows', 0)} "
          f"decoder={json.dumps(result.get('decoder', 'unknown'))} ok={str(checks.ok).lower()}"
          + (f"  ({'; '.join(notes)})" if notes else ""), flush=True)
    if result.get("cold_start_samples_s"):
        print(f"  folder cold start samples (s): {result['cold_start_samples_s']}; results in "
              f"{RESULT.relative_to(ROOT)}", flush=True)
    return checks.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke-only", action="store_true", help="smoke-test the executable in dist/")
    group.add_argument("--build-only", action="store_true", help="build without the smoke test")
    options = parser.parse_args()
    if not options.smoke_only and not (build("folder") and build("onefile")):
        return 1
    if options.build_only:
        return 0
    return 0 if smoke() else 1


if __name__ == "__main__":
    sys.exit(main())

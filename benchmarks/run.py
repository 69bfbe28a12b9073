"""The pistream benchmark suite: one command runs every scenario, prints a table and writes a JSON result.

    python -m benchmarks                       # full suite (~10 minutes on 2 cores)
    python -m benchmarks --quick               # every scenario, small (well under 2 minutes): a smoke test
    python -m benchmarks --only throughput,ceiling
    python -m benchmarks --compare benchmarks/results/OLD.json --threshold 0.2   # exit 1 on a regression

Each scenario runs in a fresh worker process (its own peak RSS and CPU) against the blast server
(``python -m pistream.sim.blast``) in another process. Ratios between scenarios (throughput/ceiling,
throughput/naive) come from the same run: on a shared, noisy machine compare ratios, not absolutes.
Exit codes: 0 fine, 1 a regression beyond the threshold (with --compare), 2 a scenario failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO  # noqa: E402
from benchmarks.scenarios import SCENARIOS  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
SCENARIO_TIMEOUT = {False: 900.0, True: 120.0}  # seconds per worker (full, quick)
LIBRARIES = ("pistream", "trio", "trio-websocket", "wsproto", "httpx", "msgspec", "pyarrow", "deltalake",
             "structlog", "websockets", "psutil")

# Figures compared by --compare: name -> True if higher is better. Anything else is shown, not judged.
HIGHER_IS_BETTER = {"values_per_s": True, "cpu_s_per_M_values": False, "peak_rss_MB": False,
                    "p50_receive_to_commit_ms": False, "p99_receive_to_commit_ms": False,
                    "end_rss_MB": False, "warmup_rss_MB": False, "start_to_first_commit_s": False,
                    "start_to_tags_resolved_s": False, "start_to_gaps_read_s": False,
                    "throughput_over_ceiling": True,
                    "throughput_over_naive": True, "start_to_all_committed_s": False,
                    "paced_start_to_all_committed_s": False, "idle_flush_speedup": True,
                    "backfill_over_rest_ceiling": True, "backfill_over_naive": True,
                    "backfill_over_rest_ceiling_columns": True, "late_over_in_order": False,
                    "backfill_values_per_s": True, "p99_over_plain": False}
# Columns of the printed table: (figure, heading, format).
COLUMNS = (("values_per_s", "values/s", "{:,.0f}"), ("cpu_s_per_M_values", "CPU s/M values", "{:.2f}"),
           ("peak_rss_MB", "peak RSS MB", "{:,.0f}"), ("p50_receive_to_commit_ms", "p50 ms", "{:,.0f}"),
           ("p99_receive_to_commit_ms", "p99 ms", "{:,.0f}"))
EXTRA = {"memory": ("warmup_rss_MB", "end_rss_MB", "rss_slope_MB_per_min"),
         "startup": ("start_to_tags_resolved_s", "start_to_first_commit_s"),
         "restart": ("start_to_gaps_read_s", "gap_values", "end_rss_MB"),
         "throughput": ("commits", "mean_commit_s"), "backfill": ("rest_calls", "commits"),
         "history": ("backfill_over_rest_ceiling", "backfill_over_rest_ceiling_columns", "backfill_over_naive",
                     "commits"),
         "latency_backfill": ("plain_p99_receive_to_commit_ms", "p99_goal_ms", "p99_within_goal",
                              "backfill_values_per_s"),
         "firehose": ("start_to_all_committed_s", "paced_start_to_all_committed_s", "idle_flush_speedup"),
         "late": ("late_over_in_order", "in_order_start_to_all_committed_s")}


def machine_facts() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_MB": _memory_mb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "libraries": versions,
        # BENCH_GIT_COMMIT: for a copy of the tree outside git (e.g. ``git archive`` of a commit)
        "git_commit": os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": False if os.environ.get("BENCH_GIT_COMMIT") else
        bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return facts


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def run_scenario(name: str, quick: bool) -> dict[str, Any]:
    """One scenario in a fresh worker process; a failure or timeout becomes ``{"error": ...}``."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix=f"bench-{name}-") as out:
        cmd = [sys.executable, "-m", "benchmarks.worker", name, "--out", out.name] + (["--quick"] if quick else [])
        # Its own process group: on a timeout the worker, its server and any pistream it started go too.
        worker = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            code = worker.wait(timeout=SCENARIO_TIMEOUT[quick])
        except subprocess.TimeoutExpired:
            _stop_group(worker)
            return {"error": f"timed out after {SCENARIO_TIMEOUT[quick]:.0f} s"}
        except BaseException:
            _stop_group(worker)
            raise
        text = Path(out.name).read_text(encoding="utf-8")
    if code != 0 or not text:
        return {"error": f"worker exited with {code}"}
    return json.loads(text)


def _stop_group(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the worker's process group (its finally blocks stop the servers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(worker.pid, sig)
        except ProcessLookupError:
            return
        try:
            worker.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the worker is gone; its children may not be
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def derived(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios from the same run."""
    out = {}
    rate = {name: r.get("values_per_s") for name, r in results.items()}
    if rate.get("throughput") and rate.get("ceiling"):
        out["throughput_over_ceiling"] = round(rate["throughput"] / rate["ceiling"], 3)
    if rate.get("throughput") and rate.get("naive"):
        out["throughput_over_naive"] = round(rate["throughput"] / rate["naive"], 3)
    return out


def _fmt(value: Any, pattern: str) -> str:
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (also readable in a terminal)."""
    headings = ["scenario", *(h for _, h, _ in COLUMNS), "other"]
    rows = []
    for name, result in report["scenarios"].items():
        if "error" in result:
            rows.append([name, *["-"] * len(COLUMNS), f"ERROR: {result['error']}"])
            continue
        other = [f"{key}={_fmt(result.get(key), '{:g}')}" for key in EXTRA.get(name, ()) if key in result]
        if result.get("complete") is False:
            other.append("INCOMPLETE")
        rows.append([name, *(_fmt(result.get(key), fmt) for key, fmt, *_ in
                             ((k, f) for k, _, f in COLUMNS)), " ".join(other)])
    widths = [max(len(str(r[i])) for r in [headings, *rows]) for i in range(len(headings))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    for key, value in report.get("ratios", {}).items():
        lines.append(f"{key}: {value:.3f}")
    return "\n".join(lines)


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[str, list[str]]:
    """Change per figure (new vs old) and the regressions beyond ``threshold`` (a fraction)."""
    lines = [f"{'figure':<48} {'old':>12} {'new':>12} {'change':>8}"]
    regressions = []
    if old.get("quick") != new.get("quick"):
        lines.append("WARNING: comparing a quick run with a full one")
    pairs = [(f"{s}.{k}", old["scenarios"].get(s, {}).get(k), v)
             for s, result in new["scenarios"].items() for k, v in result.items()]
    pairs += [(f"ratios.{k}", old.get("ratios", {}).get(k), v) for k, v in new.get("ratios", {}).items()]
    for label, before, after in pairs:
        key = label.split(".", 1)[1]
        if key not in HIGHER_IS_BETTER or not isinstance(before, int | float) or not isinstance(after, int | float):
            continue
        if before == 0:
            continue
        change = (after - before) / abs(before)
        worse = -change if HIGHER_IS_BETTER[key] else change
        flag = ""
        if worse > threshold:
            flag = "  REGRESSION"
            regressions.append(f"{label}: {before:g} -> {after:g} ({change:+.1%})")
        lines.append(f"{label:<48} {before:>12.4g} {after:>12.4g} {change:>+8.1%}{flag}")
    return "\n".join(lines), regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small versions of every scenario (smoke test)")
    parser.add_argument("--only", help=f"comma-separated scenarios out of {','.join(SCENARIOS)}")
    parser.add_argument("--compare", metavar="OLD.json", help="compare with an earlier result file")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="relative change counted as a regression (default 0.2 = 20%%)")
    parser.add_argument("--output", metavar="FILE", help="result file (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    old = None
    if args.compare:  # read before the suite runs: a wrong path fails now, not after ten minutes
        try:
            old = json.loads(Path(args.compare).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {args.compare}: cannot read it as a result file ({exc}); "
                         "give a JSON file written by python -m benchmarks (see benchmarks/results/)")
        if not isinstance(old, dict) or "scenarios" not in old:
            parser.error(f"--compare {args.compare}: not a suite result (no \"scenarios\"); "
                         "give a JSON file written by python -m benchmarks")

    started = time.monotonic()
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "quick": args.quick, "machine": machine_facts(), "scenarios": {}}
    for name in names:
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        result = run_scenario(name, args.quick)
        report["scenarios"][name] = result
        print(f"  {json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})}",
              file=sys.stderr, flush=True)
    report["ratios"] = derived(report["scenarios"])
    report["suite_wall_s"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    output = Path(args.output) if args.output else RESULTS_DIR / (
        f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{(report['machine']['git_commit'] or 'nogit')[:10]}"
        f"{'-quick' if args.quick else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    m = report["machine"]
    print(f"\n{m['cpu_model']}, {m['cores']} cores, Python {m['python']}, commit {(m['git_commit'] or '?')[:10]}"
          f"{' (dirty)' if m['git_dirty'] else ''}; suite {report['suite_wall_s']} s")
    print(table(report))
    print(f"\nwritten to {output}")
    failed = [n for n, r in report["scenarios"].items() if "error" in r]
    if old is not None:
        text, regressions = compare(old, report, args.threshold)
        print(f"\ncompared with {args.compare} (threshold {args.threshold:.0%}):\n{text}")
        if regressions:
            print(f"\n{len(regressions)} regression(s) beyond {args.threshold:.0%}:\n  " + "\n  ".join(regressions))
            return 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

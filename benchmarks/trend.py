"""Trend of the benchmark suite across results: one panel per measure (values/s, CPU s per million values,
peak RSS, p99 receive-to-commit), one line per scenario, results in time order labelled by commit.

    python -m benchmarks.trend benchmarks/results/*.json -o trend.png

Files that are not suite results (no ``scenarios``) are skipped with a note. Quick and full runs are marked
(hollow markers for ``--quick``): their numbers are not comparable one to one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

MEASURES = (  # (key in a scenario, panel title)
    ("values_per_s", "values/s"),
    ("cpu_s_per_M_values", "CPU s per million values"),
    ("peak_rss_MB", "peak RSS (MB)"),
    ("p99_receive_to_commit_ms", "p99 receive to commit (ms)"),
)


@dataclass
class Result:
    started: str
    commit: str
    quick: bool
    scenarios: dict[str, dict[str, float]]


def load(paths: list[str]) -> list[Result]:
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"trend: skipped {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "scenarios" not in data:
            print(f"trend: skipped {path}: not a suite result", file=sys.stderr)
            continue
        machine = data.get("machine") or {}
        commit = str(machine.get("git_commit") or Path(path).stem)[:7] + ("+" if machine.get("git_dirty") else "")
        results.append(Result(str(data.get("started", "")), commit, bool(data.get("quick")), data["scenarios"]))
    return sorted(results, key=lambda r: r.started)


def plot(results: list[Result], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({name for r in results for name in r.scenarios})
    figure, axes = plt.subplots(len(MEASURES), 1, figsize=(max(8.0, 0.6 * len(results) + 4), 3.2 * len(MEASURES)),
                                sharex=True)
    labels = [f"{r.started[:10]}\n{r.commit}" for r in results]
    for axis, (key, title) in zip(axes, MEASURES, strict=True):
        for index, name in enumerate(scenarios):
            points = [(i, r.scenarios[name][key], r.quick) for i, r in enumerate(results)
                      if isinstance(r.scenarios.get(name, {}).get(key), int | float)]
            if not points:
                continue
            color = f"C{index % 10}"
            axis.plot([p[0] for p in points], [p[1] for p in points], color=color, label=name, linewidth=1)
            for x, y, quick in points:
                axis.plot(x, y, "o", color=color, markerfacecolor="none" if quick else color, markersize=5)
        axis.set_title(title, loc="left", fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, ncol=4, loc="best")
    axes[-1].set_xticks(range(len(results)))
    axes[-1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlabel("result (date, commit); hollow markers: --quick runs")
    figure.suptitle("pistream benchmarks across results", fontsize=12)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result JSON files of python -m benchmarks")
    parser.add_argument("-o", "--output", default="trend.png", help="image to write (.png or .svg)")
    args = parser.parse_args(argv)
    results = load(args.results)
    if not results:
        print("trend: no suite results among the files given", file=sys.stderr)
        return 2
    plot(results, args.output)
    print(f"trend: {len(results)} results -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

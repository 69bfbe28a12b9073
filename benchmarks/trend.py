"""Trend of the benchmark suite across results: one panel per measure (values/s, CPU s per million values,
peak RSS, p99 receive-to-commit), one line per scenario, and a panel of a user's first impression (seconds
from process start: startup, the 1 M-value firehose); results in time order labelled by commit.

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
FROM_START = (  # (scenario, key, line label): seconds from process start, as a user first sees pistream
    ("startup", "start_to_tags_resolved_s", "startup: tags resolved"),
    ("startup", "start_to_first_commit_s", "startup: first commit"),
    ("firehose", "start_to_all_committed_s", "firehose: 1 M values committed"),
)
FROM_START_TITLE = "seconds from process start"


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


Series = list[tuple[int, float, bool]]  # (result index, value, quick run)


def series(results: list[Result], scenario: str, key: str) -> Series:
    return [(i, r.scenarios[scenario][key], r.quick) for i, r in enumerate(results)
            if isinstance(r.scenarios.get(scenario, {}).get(key), int | float)]


Line = tuple[str, str, Series]  # (scenario, label, points)


def panels(results: list[Result]) -> list[tuple[str, list[Line]]]:
    """(title, lines) for each panel, lines without a point left out."""
    scenarios = sorted({name for r in results for name in r.scenarios})
    out = [(title, [(name, name, series(results, name, key)) for name in scenarios]) for key, title in MEASURES]
    out.append((FROM_START_TITLE, [(name, label, series(results, name, key)) for name, key, label in FROM_START]))
    return [(title, [line for line in lines if line[2]]) for title, lines in out]


def plot(results: list[Result], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(results)
    # a scenario has one colour in every panel; a second line of it in one panel is dashed
    colors = {name: f"C{i % 10}" for i, name in enumerate(sorted({name for r in results for name in r.scenarios}))}
    figure, axes = plt.subplots(len(drawn), 1, figsize=(max(8.0, 0.6 * len(results) + 4), 3.2 * len(drawn)),
                                sharex=True)
    labels = [f"{r.started[:10]}\n{r.commit}" for r in results]
    for axis, (title, lines) in zip(axes, drawn, strict=True):
        seen: set[str] = set()
        for name, label, points in lines:
            style = "--" if name in seen else "-"
            seen.add(name)
            color = colors.get(name, "k")
            axis.plot([p[0] for p in points], [p[1] for p in points], style, color=color, label=label, linewidth=1)
            for x, y, quick in points:
                axis.plot(x, y, "o", color=color, markerfacecolor="none" if quick else color, markersize=5)
        axis.set_title(title, loc="left", fontsize=10)
        axis.grid(True, alpha=0.3)
        if lines:
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

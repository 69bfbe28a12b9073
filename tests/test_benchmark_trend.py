"""The trend plot drawn from the suite results kept in benchmarks/results/ (what the scheduled workflow does)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import trend

RESULTS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json"))


def test_the_panels_carry_each_results_numbers_in_time_order():
    results = trend.load(RESULTS)
    assert len(results) >= 10
    assert [r.started for r in results] == sorted(r.started for r in results)
    drawn = dict(trend.panels(results))
    assert list(drawn) == [title for _, title in trend.MEASURES] + [trend.FROM_START_TITLE]
    newest = max(RESULTS, key=lambda p: json.loads(Path(p).read_text())["started"])
    throughput = json.loads(Path(newest).read_text())["scenarios"]["throughput"]["values_per_s"]
    [(_, _, points)] = [line for line in drawn["values/s"] if line[0] == "throughput"]
    assert points[-1][:2] == (len(results) - 1, throughput)
    assert {label for _, label, _ in drawn[trend.FROM_START_TITLE]} >= {"startup: tags resolved"}


def test_the_plot_is_written(tmp_path):
    output = tmp_path / "trend.png"
    assert trend.main([*RESULTS, str(tmp_path / "not-a-result.json"), "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.stat().st_size > 50_000  # five panels of lines, not an empty canvas

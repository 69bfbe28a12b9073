"""Compare a table's rows with the simulator's ground truth: every event in a window, exactly once.

Used by the tests (rows read by DuckDB) and the acceptance benchmarks (rows read by delta-rs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .model import SimEvent, SimModel, table_columns

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class Comparison:
    expected: int = 0
    found: int = 0
    missing: list[tuple[str, int]] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    unexpected: list[tuple[str, tuple]] = field(default_factory=list)
    tags_with_rows: int = 0

    def summary(self) -> str:
        return (f"expected={self.expected} found={self.found} missing={len(self.missing)} "
                f"duplicates={len(self.duplicates)} unexpected={len(self.unexpected)} "
                f"tags_with_rows={self.tags_with_rows}")


def expected_row(event: SimEvent) -> tuple:
    """The table columns a simulator event must produce (``model.table_columns``, the documented mapping,
    written independently of pistream's decoder)."""
    value, text, code, system = table_columns(event.value)
    return (event.timestamp_us, value, text, code, system, event.good, event.questionable,
            event.substituted, event.annotated)


# The columns compared, in the order ``compare_rows`` expects them (timestamp as epoch microseconds).
COLUMNS = ("tag_webid", "timestamp_us", "value", "value_text", "state_code", "system_state", "good",
           "questionable", "substituted", "annotated")


def arrow_rows(data: pa.Table) -> list[tuple]:
    """A table's rows (as any Delta reader returns them in Arrow) as tuples of ``COLUMNS``."""
    import pyarrow as pa

    timestamps = data["timestamp"].cast(pa.int64())
    columns = [timestamps if c == "timestamp_us" else data[c] for c in COLUMNS]
    return list(zip(*(c.to_pylist() for c in columns), strict=True))


def compare_rows(rows: Iterable[tuple], model: SimModel, windows: dict[str, tuple[int, int]]) -> Comparison:
    """``windows``: per webid, the [first, last] timestamps (us) that must be present exactly once;
    ``rows``: tuples of ``COLUMNS``. Also reports rows the model never produced, and repeats anywhere.
    """
    rows = list(rows)
    by_webid: dict[str, Counter] = {}
    for webid, *rest in rows:
        by_webid.setdefault(webid, Counter())[tuple(rest)] += 1
    result = Comparison(found=len(rows), tags_with_rows=len(by_webid))
    for webid, (first_us, last_us) in windows.items():
        tag = model.find(webid)
        assert tag is not None, webid
        seen = by_webid.get(webid, Counter())
        for event in model.events(tag, first_us, last_us):
            result.expected += 1
            n = seen.get(expected_row(event), 0)
            if n == 0:
                result.missing.append((tag.path, event.timestamp_us))
            elif n > 1:
                result.duplicates.append((tag.path, event.timestamp_us))
    for webid, seen in by_webid.items():
        tag = model.find(webid)
        all_events = {expected_row(e) for e in model.events(tag, min(r[0] for r in seen), max(r[0] for r in seen))} \
            if tag else set()
        for row, n in seen.items():
            if row not in all_events:
                result.unexpected.append((webid, row))
            elif n > 1 and webid not in windows:
                result.duplicates.append((webid, row[0]))
    return result

"""Every value kind and every wire quirk of real servers, from the simulator through the pipeline into the
table, read back by DuckDB (delta-kernel): the columns equal the model's ground truth (``table_columns``),
nothing dropped, nothing duplicated.

Each run serves 50 tags: event ``k`` of tag ``i`` takes its special cases from ``(k + i) % 50``, so every
poll carries every case (I/O Timeout, Shutdown, Questionable, ``{"Errors": [...]}``) on some tag.
"""

from __future__ import annotations

import pytest
import trio
from conftest import compare_with_model, duckdb_rows, streamed_for

import pistream.pipeline
from pistream.config import build_settings
from pistream.pi.channel import ChannelReader
from pistream.pipeline import run_pipeline
from pistream.sim.faults import Faults
from pistream.sim.model import ALL_KINDS, ERROR_VALUE, IO_TIMEOUT, SHUTDOWN, SimModel
from pistream.sim.payloads import Quirks
from pistream.sim.server import Simulator

TAGS = 50
TAIL_US = 500_000  # values sent in the last moments before stop may still be on the wire

# name: (kinds, model options, simulator options, pipeline options)
CASES = {
    "float": (("float",), {}, {}, {}),
    "int": (("int",), {}, {}, {}),
    "digital": (("digital",), {}, {}, {}),
    "string": (("string",), {}, {}, {}),
    "bool": (("bool",), {}, {}, {}),
    "array": (("array",), {}, {}, {}),
    "timestamp-string": (("timestamp",), {}, {}, {}),
    "error-values": (ALL_KINDS, {"error_values": True}, {}, {}),
    "string-flags": (ALL_KINDS, {"error_values": True}, {"quirks": Quirks(string_flags=True)}, {}),
    # about one value per poll: most streams of most messages carry a single "Value" object
    "value-object": (ALL_KINDS, {"error_values": True, "rate": 8}, {"quirks": Quirks(value_object=True)}, {}),
    "ticks": (ALL_KINDS, {"error_values": True}, {"quirks": Quirks(ticks=True)}, {}),
    "utc-offset": (ALL_KINDS, {"error_values": True}, {"quirks": Quirks(utc_offset=True)}, {}),
    "all-quirks": (ALL_KINDS, {"error_values": True},
                   {"quirks": Quirks(string_flags=True, value_object=True, ticks=True, utc_offset=True)}, {}),
    "shuffled-and-late": (ALL_KINDS, {}, {"faults": Faults(shuffle=True, late_fraction=0.2, seed=3)}, {}),
    "repeated": (ALL_KINDS, {}, {"faults": Faults(repeat_last=1.0)}, {}),
    # one value per tag every 2 s: many quiet polls, each followed by a heartbeat
    "heartbeats": (("float",), {"rate": 0.5}, {}, {"heartbeat_rate": 1}),
}


@pytest.fixture
def readers(monkeypatch):
    """The pipeline's channel readers, to look at their counters afterwards."""
    made: list[ChannelReader] = []

    class Recorded(ChannelReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pistream.pipeline, "ChannelReader", Recorded)
    return made


@pytest.mark.parametrize("case", list(CASES))
async def test_values_land_as_the_model_says(tmp_path, readers, case):
    kinds, model_options, sim_options, options = CASES[case]
    model = SimModel.generated(TAGS, kinds=kinds, **{"rate": 20, **model_options})
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    table = str(tmp_path / "table")
    simulator = Simulator(model, poll_interval=0.1, **sim_options)
    duration = 2.5 if case == "heartbeats" else 1.0
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            settings = build_settings({}, {"tags": str(tags), "url": simulator.url, "table": table,
                                           "state_dir": str(tmp_path / "state"), "flush_seconds": 0.5, **options})
            nursery.start_soon(streamed_for, simulator, TAGS, duration, stop)  # however slowly it started
            summary = await run_pipeline(settings, stop, handle_signals=False)
            nursery.cancel_scope.cancel()
    windows = {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}
    result = compare_with_model(table, model, windows)
    print(case, result.summary(), summary)
    assert len(windows) == TAGS and result.tags_with_rows == TAGS
    assert result.expected >= TAGS * max(1.0, model.rate * (duration - 0.5) / 2)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()
    assert summary.values_written == result.found and summary.rejected == 0

    # What the case is about is really in the table (and so was compared above).
    def count(where: str) -> int:
        [(n,)] = duckdb_rows(table, "count(*)", f"WHERE {where}")
        return n

    assert count(f"system_state AND state_code = {IO_TIMEOUT['Value']} AND value_text = 'I/O Timeout' "
                 "AND value IS NULL AND NOT good") > 0
    assert count(f"system_state AND state_code = {SHUTDOWN['Value']} AND value IS NULL") > 0
    assert count("questionable AND good") > 0
    by_kind = {
        "float": "value IS NOT NULL AND value <> round(value) AND value_text IS NULL",
        "int": "value IS NOT NULL AND value = round(value) AND value_text IS NULL AND state_code IS NULL",
        "digital": "NOT system_state AND state_code BETWEEN 0 AND 3 AND value IS NULL "
                   "AND value_text IN ('Off', 'On', 'Auto', 'Manual')",
        "string": "value_text LIKE 'batch-%' AND value IS NULL",
        "bool": "value_text IN ('true', 'false') AND value IN (0, 1)",
        "array": "value_text LIKE '[%,%,%]' AND value IS NULL",
        "timestamp": "regexp_matches(value_text, '^\\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z$') AND value IS NULL",
    }
    for kind in kinds:
        assert count(by_kind[kind]) > 0, kind
    if model.error_values:
        assert count(f"value_text = '{ERROR_VALUE['Errors'][0]}' AND value IS NULL AND state_code IS NULL "
                     "AND NOT good") > 0
    if case == "repeated":
        assert summary.repeats_dropped > 0
    if case == "heartbeats":
        assert sum(r.stats.heartbeats for r in readers) >= 3

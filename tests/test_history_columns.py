"""The history reader moves each tag's cursor with array operations when a page was read into columns by the
C codec (``HistoryReader._advance_columns``); msgspec's value-by-value path (``_advance_streams``) is the
reference. Both read the same page bodies here and must agree on every tag's progress, the values kept, the
tags queued again and how, and what is left to msgspec (None). The end-to-end runs against the simulator are
in ``test_backfill.py`` (both paths there too)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from pistream.pi.history import HistoryPage, HistoryReader, TagProgress, TagRange
from pistream.pi.messages import channel_decoder
from pistream.pi.piwebapi import PiWebApi
from pistream.stream.columns import FRAME_CODEC, LiveColumns, TagIndex, page_decoder
from pistream.timeutil import format_iso, to_us

pytestmark = pytest.mark.skipif(not FRAME_CODEC, reason="the C frame codec is not built here")

T = 1_772_323_200_000_000  # 2026-03-01T00:00:00Z
S = 1_000_000
WEBIDS = [f"P1DPTAG{i:02d}" for i in range(8)]


def body(streams: dict[str, list[tuple[int, Any]]]) -> bytes:
    """A ``streamsets/recorded`` answer: per webid its (time, value) items, in the given order."""
    return json.dumps({"Links": {}, "Items": [
        {"WebId": w, "Name": w[-5:], "Path": f"\\\\SRV\\{w}", "Links": {}, "UnitsAbbreviation": "m",
         "Items": [{"Timestamp": format_iso(ts), "Value": v, "UnitsAbbreviation": "m", "Good": True,
                    "Questionable": False, "Substituted": False, "Annotated": False} for ts, v in items]}
        for w, items in streams.items()]}).encode()


def reader(ranges: list[TagRange]) -> HistoryReader:
    send, _ = trio.open_memory_channel[HistoryPage](1)
    return HistoryReader(PiWebApi("http://127.0.0.1:9/piwebapi"), ranges, send)


def both_ways(specs: dict[str, tuple[TagProgress, int]], page: bytes, per_stream: int
              ) -> tuple[tuple[Any, ...] | None, tuple[Any, ...]]:
    """The page through each path, from the same starting ranges; what each decided."""
    index = TagIndex()
    for w in WEBIDS:
        index.add(w, f"\\\\SRV\\{w}", "m")
    results: list[tuple[Any, ...] | None] = []
    for columns in (True, False):
        ranges = [TagRange(w, end, progress) for w, (progress, end) in specs.items()]
        r = reader([])  # an empty queue: only what this page queues again is in it
        start_us = min(x.progress.cursor_us for x in ranges)
        end_us = max(x.end_us for x in ranges)
        if columns:
            decoded = page_decoder(index)(page)
            assert decoded is not None
            out = r._advance_columns(ranges, decoded, per_stream, start_us, end_us)
            if out is None:
                results.append(None)
                continue
            assert isinstance(out.columns, LiveColumns) and not out.streams
            kept = sorted(zip((index.webids[i] for i in out.columns.ids.tolist()), out.columns.ts.tolist(),
                              out.columns.batch.column("value").to_pylist(), strict=True))
        else:
            out = r._advance_streams(ranges, channel_decoder.decode(page), per_stream, start_us, end_us)
            assert out.columns is None
            kept = sorted((s.web_id, to_us(tv.timestamp), tv.value) for s in out.streams for tv in s.items or ())
        queued = sorted((x.webid, x.progress.cursor_us, x.progress.seen, x.alone, x.max_count, x.span_us)
                        for _, _, x in r._queue)
        results.append((out.progress, kept, queued, r.stats.values, r.stats.tags_done, dict(r.stats.failed)))
    fallback = results[1]
    assert fallback is not None
    return results[0], fallback


def test_cursors_page_edges_ends_and_empty_tags_move_alike():
    at_t = [(T, 1.0), (T, 2.0), (T, 3.0), (T + S, 4.0)]
    specs = {
        WEBIDS[0]: (TagProgress(T), T + 100 * S),  # a full page from its cursor: queued again at its last
        WEBIDS[1]: (TagProgress(T, seen=2, values=9, first_us=T - 50 * S, last_us=T), T + 100 * S),  # cut in a run
        WEBIDS[2]: (TagProgress(T), T + 2 * S),  # its range ends inside the page
        WEBIDS[3]: (TagProgress(T), T + 100 * S),  # no value: done
        WEBIDS[4]: (TagProgress(T), T + 100 * S),  # a short page: done
        WEBIDS[5]: (TagProgress(T, seen=3), T + 100 * S),  # every value already read at its cursor
        WEBIDS[6]: (TagProgress(T, seen=1), T + 100 * S),  # ends at its cursor: seen adds up
        WEBIDS[7]: (TagProgress(T), T + 100 * S),  # left out of the answer: failed
    }
    page = body({
        WEBIDS[0]: [(T + i * S, float(i)) for i in range(4)],
        WEBIDS[1]: at_t,
        WEBIDS[2]: [(T + i * S, float(i)) for i in range(4)],
        WEBIDS[3]: [],
        WEBIDS[4]: [(T + S, 1.5), (T + 2 * S, 2.5)],
        WEBIDS[5]: [(T, 1.0), (T, 2.0), (T, 3.0), (T, 4.0)][:4],
        WEBIDS[6]: [(T, 1.0), (T, 2.0), (T, 3.0), (T, 3.5)],
    })
    columns, streams = both_ways(specs, page, per_stream=4)
    assert columns == streams
    progress, kept, queued, values, done, failed = streams
    assert progress[WEBIDS[0]] == TagProgress(T + 3 * S, 1, False, 4, T, T + 3 * S)
    assert progress[WEBIDS[1]] == TagProgress(T + S, 1, False, 11, T - 50 * S, T + S)
    assert progress[WEBIDS[2]].done and progress[WEBIDS[2]].last_us == T + 2 * S
    assert progress[WEBIDS[3]].done and progress[WEBIDS[4]].done
    assert progress[WEBIDS[6]] == TagProgress(T, 4, False, 3, T, T)
    assert WEBIDS[7] in failed and WEBIDS[7] not in progress
    assert [q[0] for q in queued] == [WEBIDS[0], WEBIDS[1], WEBIDS[5], WEBIDS[6]]
    assert values == len(kept)


@pytest.mark.parametrize("seen", [0, 1, 2, 3])
def test_a_run_of_events_at_one_time_cut_anywhere(seen):
    specs = {WEBIDS[0]: (TagProgress(T, seen=seen), T + 100 * S), WEBIDS[1]: (TagProgress(T), T + 100 * S)}
    page = body({WEBIDS[0]: [(T, 1.0), (T, 2.0), (T, 3.0), (T + S, 4.0), (T + S, 5.0)],
                 WEBIDS[1]: [(T + S, 1.0)] * 5})
    columns, streams = both_ways(specs, page, per_stream=5)
    assert columns == streams


def test_pages_the_columns_do_not_fit_go_to_msgspec():
    specs = {WEBIDS[0]: (TagProgress(T), T + 100 * S), WEBIDS[1]: (TagProgress(T), T + 100 * S)}
    out_of_order = body({WEBIDS[0]: [(T + 2 * S, 1.0), (T + S, 2.0)], WEBIDS[1]: [(T, 1.0)]})
    not_asked = body({WEBIDS[0]: [(T, 1.0)], WEBIDS[1]: [(T, 1.0)], WEBIDS[2]: [(T, 1.0)]})
    twice = json.loads(body({WEBIDS[0]: [(T, 1.0)], WEBIDS[1]: [(T, 1.0)]}))
    twice["Items"].append(twice["Items"][0])
    for page in (out_of_order, not_asked, json.dumps(twice).encode()):
        columns, streams = both_ways(specs, page, per_stream=5)
        assert columns is None  # nothing moved; the reader decodes the same body with msgspec


def test_a_page_the_codec_leaves_alone_is_none():
    index = TagIndex()
    index.add(WEBIDS[0], "\\\\SRV\\A", None)
    decode = page_decoder(index)
    assert decode(body({WEBIDS[0]: [(T, 1.0)], "P1DPNOTDESCRIBED": [(T, 1.0)]})) is None  # msgspec reports it
    assert decode(b'{"Items": [{"WebId": "%s", "Items": [{"Timestamp": "x", "Value": 1}]}]}' % WEBIDS[0].encode()) is None
    assert decode(b'{"Errors": ["Bad Request"]}') is None
    empty = decode(body({WEBIDS[0]: []}))
    assert empty is not None and empty.webids == [WEBIDS[0]] and empty.counts.tolist() == [0] and not len(empty.ts)


def test_a_full_page_of_events_already_read_is_read_again_alone_with_bigger_pages():
    specs = {WEBIDS[0]: (TagProgress(T, seen=4, values=4, first_us=T, last_us=T), T + 100 * S),
             WEBIDS[1]: (TagProgress(T), T + 100 * S)}
    page = body({WEBIDS[0]: [(T, float(i)) for i in range(4)], WEBIDS[1]: [(T + S, 1.0)] * 4})
    columns, streams = both_ways(specs, page, per_stream=4)
    assert columns == streams
    progress, kept, queued, values, done, failed = streams
    assert not progress[WEBIDS[0]].done and not failed and done == 0  # not taken for the tag's end
    assert (WEBIDS[0], T, 4, True, 8, 0) in queued  # alone, maxCount doubled

"""The optional C frame codec (``_framecodec.c``); see ``columns.extract_frames``."""

def parse(
    frames: list[str | bytes], received_us: list[int], ids: dict[str, int]
) -> tuple[int, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes,
           bytes, list[str], list[str], list[tuple[int, bytes]], list[tuple[str, int]], bytes] | None:
    """(rows, ids, ts, received, value, value_null, text, code, code_null, system, good, questionable,
    substituted, annotated, uom, stream_uom, units, texts, raw, unknown, streams), or None for the decoding
    path. ``unknown``: (webid, rows) of each stream whose webid is not in ``ids``; its rows have id -1.
    ``streams``: int32 (id, rows) of every stream in order, empty ones too."""

"""The optional C frame codec (``_framecodec.c``); see ``columns.extract_frames``."""

def parse(
    frames: list[str | bytes], received_us: list[int], ids: dict[str, int]
) -> tuple[int, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes,
           bytes, list[str], list[str], list[tuple[int, bytes]]] | None:
    """(rows, ids, ts, received, value, value_null, text, code, code_null, system, good, questionable,
    substituted, annotated, uom, stream_uom, units, texts, raw), or None for the decoding path."""

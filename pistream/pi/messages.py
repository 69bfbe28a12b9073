"""PI Web API wire types (msgspec) and how a PI value maps onto the table's value columns.

Parsing is lenient, as real servers demand: unknown fields are ignored, quality flags may come as strings
(and a flag of any other JSON type takes its default rather than failing the frame), a stream may carry one
``Value`` object instead of an ``Items`` array, a value may be a number, string, bool, timestamp, array,
enumeration/system state or ``{"Errors": [...]}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_EXACT_INT = 2**53
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # the state_code column's range


class TimedValue(msgspec.Struct, rename="pascal", gc=False):
    timestamp: str | None = None
    value: Any = None
    units_abbreviation: str | None = None
    # Flags: a JSON bool, or text as one vendor sample writes them; anything else takes the default (``flag``).
    good: Any = None
    questionable: Any = None
    substituted: Any = None
    annotated: Any = None
    errors: list[Any] | None = None


class StreamValues(msgspec.Struct, rename="pascal", gc=False):
    web_id: str | None = None
    name: str | None = None
    path: str | None = None
    units_abbreviation: str | None = None
    items: list[TimedValue] | None = None
    value: TimedValue | None = None

    def timed_values(self) -> list[TimedValue]:
        """The stream's values, whichever of ``Items`` or ``Value`` the server used."""
        if self.items is not None:
            return self.items
        return [self.value] if self.value is not None else []


class StreamSetMessage(msgspec.Struct, rename="pascal", gc=False):
    """A channel message or a ``streamsets/recorded`` answer; empty ``Items`` is a heartbeat."""

    items: list[StreamValues] | None = None
    web_exception: Any = None


channel_decoder = msgspec.json.Decoder(StreamSetMessage)
# What decoding one frame may raise: msgspec raises RecursionError, not DecodeError, for nesting deeper
# than the recursion limit (``[[[[...``): a frame, not the reader, is what is wrong.
FRAME_ERRORS = (msgspec.DecodeError, RecursionError)
_json_encoder = msgspec.json.Encoder()


def flag(raw: Any, default: bool) -> bool:
    """A PI flag (``Good``, ``Questionable``, ``Substituted``, ``Annotated``, a state's ``IsSystem``): a JSON
    bool, or the text ``"true"``/``"false"`` in any case (one vendor sample writes flags so). Anything else
    (null or absent, a number, other text such as ``"yes"``, an object) takes the default."""
    if raw is True or raw is False:
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text == "true":
            return True
        if text == "false":
            return False
    return default


def _error_text(errors: Any) -> str:
    if isinstance(errors, list):
        return "; ".join(str(e) for e in errors)
    return str(errors)


def _int_text(raw: int) -> str:
    """An integer's digits, also past Python's int-to-str digit limit (kept as JSON writes it)."""
    try:
        return str(raw)
    except ValueError:
        return _json_encoder.encode(raw).decode("utf-8")


def classify_value(raw: Any) -> tuple[float | None, str | None, int | None, bool, bool]:
    """Map a PI value to ``(value, value_text, state_code, system_state, is_error)``.

    State codes never go into the numeric column: a digital or system state keeps its name and code in
    their own columns. Anything without a number is kept as text, so nothing is lost.

    A state is an object with ``Name`` and ``Value``; ``system_state`` is its ``IsSystem`` flag (``flag``:
    default false). When ``Name`` is text or null and ``Value`` an integer within int32, ``value_text`` is
    the name (null for null) and ``state_code`` the code. Otherwise (a code outside int32 or not an integer,
    a name of another type) there is no column for it: ``value_text`` is the whole object as JSON text, the
    code's digits and the name as sent, and ``state_code`` is null.
    """
    if isinstance(raw, bool):
        return (1.0 if raw else 0.0), ("true" if raw else "false"), None, False, False
    if isinstance(raw, int):
        if abs(raw) <= MAX_EXACT_INT:
            return float(raw), None, None, False, False
        try:
            number: float | None = float(raw)
        except OverflowError:  # 310 digits or more: kept as text only
            number = None
        return number, _int_text(raw), None, False, False
    if isinstance(raw, float):
        return raw, None, None, False, False
    if isinstance(raw, str):
        return None, raw, None, False, False
    if raw is None:
        return None, None, None, False, False
    if isinstance(raw, dict):
        if "Errors" in raw:
            return None, _error_text(raw["Errors"]), None, False, True
        if "Name" in raw and "Value" in raw:
            name, code = raw["Name"], raw["Value"]
            system = flag(raw.get("IsSystem"), False)
            if (name is None or isinstance(name, str)) and isinstance(code, int) and not isinstance(code, bool) \
                    and INT32_MIN <= code <= INT32_MAX:
                return None, name, code, system, False
            return None, _json_text(raw), None, system, False
    return None, _json_text(raw), None, False, False


def _json_text(raw: Any) -> str:
    """A value as JSON text, as compact as the server's (integers of any length keep their digits)."""
    return _json_encoder.encode(raw).decode("utf-8")

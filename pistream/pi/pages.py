"""A ``streamsets/recorded`` answer read straight into table columns, as the readers of recorded values
(history, gap fills) see it: the decoder lives on the stream side (``stream.columns.page_decoder``)."""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Protocol

import numpy as np


class PageColumns(Protocol):
    """A call's answer read straight into table columns. A reader needs only each stream's webid and
    number of values, in the answer's order, and each value's time (the streams' values one after another);
    ``take`` gives the rows it keeps, as the stream side's columns (opaque here)."""

    webids: list[str]
    counts: np.ndarray
    ts: np.ndarray
    body: bytes  # the answer itself: for msgspec, where the columns cannot be used

    def take(self, keep: np.ndarray) -> Sized: ...


PageDecoder = Callable[[bytes], PageColumns | None]

"""The bronze table: one row per PI event (see DESIGN.md). Timestamps are always tz-aware UTC."""

from __future__ import annotations

import pyarrow as pa

from .timeutil import TIMESTAMP_US

PARTITION_COLUMN = "partition_date"

TABLE_SCHEMA = pa.schema(
    [
        pa.field("tag", pa.string(), nullable=False),
        pa.field("tag_webid", pa.string(), nullable=False),
        pa.field("timestamp", TIMESTAMP_US, nullable=False),
        pa.field("value", pa.float64()),
        pa.field("value_text", pa.string()),
        pa.field("state_code", pa.int32()),
        pa.field("system_state", pa.bool_(), nullable=False),
        pa.field("uom", pa.string()),
        pa.field("good", pa.bool_(), nullable=False),
        pa.field("questionable", pa.bool_(), nullable=False),
        pa.field("substituted", pa.bool_(), nullable=False),
        pa.field("annotated", pa.bool_(), nullable=False),
        pa.field("received_timestamp", TIMESTAMP_US, nullable=False),
        pa.field(PARTITION_COLUMN, pa.date32(), nullable=False),
    ]
)

# The columns that identify one PI event: a repeat of all of them is the same event sent again.
EVENT_KEY = (
    "tag_webid", "timestamp", "value", "value_text", "state_code",
    "good", "questionable", "substituted", "annotated",
)

# The buffer's layout of the same columns: tag and tag_webid as ids into the resolved tags (dictionary
# encoded), so a buffered row holds 8 bytes for them instead of their text; Parquet stores them as strings.
TAG_IDS = pa.dictionary(pa.int32(), pa.string())
BUFFER_SCHEMA = pa.schema([
    field.with_type(TAG_IDS) if field.name in ("tag", "tag_webid") else field for field in TABLE_SCHEMA
])

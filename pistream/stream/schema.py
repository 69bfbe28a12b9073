"""The bronze table: one row per PI event (see DESIGN.md). Timestamps are always tz-aware UTC."""

from __future__ import annotations

import pyarrow as pa

from ..timeutil import TIMESTAMP_US

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

TABLE_COMMENT = "PI System events written by pistream (PI Web API channels -> Delta), one row per event"

# Table properties set when pistream creates a table (delta-rs or a Unity Catalog CREATE TABLE): a week of log
# history and of removed files before vacuum may delete them; checkpoints every 100 commits (a 1 s flush
# makes 86,400 commits a day, and opening a table without checkpoints replays every one); statistics only
# for the columns queries filter on. No transaction retention: app ids must never expire (exactly once).
# Deletion vectors off: delta-rs cannot write a table that has them (Databricks turns them on for new tables
# in some workspaces). Not ``delta.enableRowTracking = false``: delta-rs 1.6.6 cannot open a table that has it.
TABLE_PROPERTIES = {
    "delta.logRetentionDuration": "interval 7 days",
    "delta.deletedFileRetentionDuration": "interval 7 days",
    "delta.checkpointInterval": "100",
    "delta.dataSkippingStatsColumns": "tag,tag_webid,timestamp,value,state_code,good,received_timestamp",
    "delta.enableDeletionVectors": "false",
}

"""Unity Catalog MANAGED tables through Zerobus Ingest (``--managed-write zerobus``): AT-LEAST-ONCE.

Each batch is sent as protobuf records (a message generated from the bronze schema: timestamps as int64
microseconds, the date as int32 days, as Zerobus maps Delta types) over the streams of the Databricks SDK
``databricks-zerobus-ingest-sdk`` (``pip install 'pistream[zerobus]'``; gRPC, a Rust core), authenticated with
the OAuth M2M service principal of the Databricks profile. ``commit`` returns only when every record of the
batch is acknowledged as durable, so the state dir's floors never pass a value that may be lost. The SDK
recovers a broken stream by itself (``recovery``) and sends its unacknowledged records again; a stream that
cannot recover fails the commit, and the commit writer sends the whole batch again on a new stream.

Why at-least-once: Zerobus acknowledges offsets of one stream and keeps no writer identity across streams (its
exactly-once persistent streams are still "in development" in the protocol), so records whose acknowledgement
was lost are written again when sent again. Remove repeats downstream with ``DEDUP_QUERY``.

Streams: Zerobus takes ~15,000 records/s per stream; a batch is spread over as many streams as its rate needs
(rows over the seconds since the last commit, up to ``MAX_STREAMS``), opened as needed and kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Sequence
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from ..errors import ConfigError, SinkError
from ..stream.schema import EVENT_KEY, TABLE_SCHEMA
from ..stream.state import StateStore
from .sink import CommitResult

log = structlog.get_logger(__name__)

RECORDS_PER_STREAM = 15_000  # per second, Zerobus's figure for one stream
MAX_STREAMS = 16
ACK_TIMEOUT = 300.0  # seconds a batch may wait for its acknowledgements (the SDK's flush timeout)
EVENT_KEY_SCHEMA = pa.schema([TABLE_SCHEMA.field(name) for name in EVENT_KEY])
DEDUP_QUERY = (
    "CREATE OR REPLACE TABLE {table}_dedup AS SELECT * FROM {table} "
    "QUALIFY ROW_NUMBER() OVER (PARTITION BY tag_webid, timestamp, value, value_text, state_code, good, "
    "questionable, substituted, annotated ORDER BY received_timestamp) = 1"
)
GUARANTEE = ("AT-LEAST-ONCE: a batch whose acknowledgement is lost (stream broken, process killed) is sent "
             "again and its rows land twice; remove repeats downstream (README: Zerobus)")


def record_descriptor(name: str = "PistreamEvent") -> Any:
    """The protobuf message of one table row (``DescriptorProto``): proto2, every column optional, in table
    order; Zerobus maps TIMESTAMP to int64 microseconds and DATE to int32 days since 1970-01-01."""
    from google.protobuf import descriptor_pb2

    kinds = {pa.string(): "TYPE_STRING", pa.float64(): "TYPE_DOUBLE", pa.int32(): "TYPE_INT32",
             pa.bool_(): "TYPE_BOOL", pa.date32(): "TYPE_INT32"}
    message = descriptor_pb2.DescriptorProto(name=name)
    for number, field in enumerate(TABLE_SCHEMA, start=1):
        kind = "TYPE_INT64" if pa.types.is_timestamp(field.type) else kinds[field.type]
        message.field.add(name=field.name, number=number, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                          type=getattr(descriptor_pb2.FieldDescriptorProto, kind))
    return message


def record_class() -> Any:
    """A Python class for ``record_descriptor`` (its ``DESCRIPTOR`` goes to the SDK's TableProperties)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="pistream_event.proto", package="pistream", syntax="proto2")
    file.message_type.add().CopyFrom(record_descriptor())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pistream.PistreamEvent"))


def encode_records(rows: pa.Table | pa.RecordBatch, message: Any) -> list[bytes]:
    """Each row as a serialized ``message`` (nulls left unset); timestamps in microseconds, dates in days."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
    columns = {}
    for field in TABLE_SCHEMA:
        column = table.column(field.name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_timestamp(field.type):
            column = pc.cast(column, pa.int64())
        elif pa.types.is_date(field.type):
            column = pc.cast(column, pa.int32())
        columns[field.name] = column.to_pylist()
    names = list(columns)
    out = []
    for values in zip(*(columns[n] for n in names), strict=True):
        record = message(**{n: v for n, v in zip(names, values, strict=True) if v is not None})
        out.append(record.SerializeToString())
    return out


class ZerobusSink:
    """The sink of a MANAGED table through Zerobus Ingest (see the module docstring). ``sdk`` is the SDK's
    ``ZerobusSdk``, made by ``zerobus_sink``."""

    credentials = None

    def __init__(self, sdk: Any, full_name: str, client_id: str, client_secret: str, state: StateStore):
        self.sdk = sdk
        self.full_name = full_name
        self.display_uri = f"{full_name} (MANAGED, via Zerobus, at-least-once)"
        self.uri = full_name
        self._client_id = client_id
        self._client_secret = client_secret
        self.state = state
        self.message = record_class()
        self.streams: list[Any] = []
        self._version = 0
        self._last_commit = time.monotonic()

    def open(self) -> None:
        self._version = self.state.saved_version()
        self._stream(0)  # refused credentials or a wrong table show at the start
        log.warning("zerobus_at_least_once", table=self.full_name, guarantee=GUARANTEE,
                    dedup_query=DEDUP_QUERY.format(table=self.full_name))

    def last_txn_version(self) -> int:
        return self._version

    def read_event_keys(self, since: date | None = None, until: date | None = None,
                        webids: Collection[str] | None = None) -> pa.Table:
        """Nothing to read back: the state dir's floors are all there is (values after them are sent again)."""
        return EVENT_KEY_SCHEMA.empty_table()

    def write_ahead(self, rows: pa.Table) -> list[int]:
        """A spilled part of the next batch: sent now; its acknowledgement is awaited by the batch's commit."""
        return self._send(rows)

    def commit(self, batch: pa.RecordBatch | pa.Table, txn_version: int, written_ahead: Sequence[Any] = ()
               ) -> CommitResult:
        """Send the batch and wait until Zerobus acknowledged it and its parts sent ahead as durable."""
        now = time.monotonic()
        rate = batch.num_rows / max(now - self._last_commit, 1.0)
        self._last_commit = now
        wanted = min(MAX_STREAMS, max(1, math.ceil(rate / RECORDS_PER_STREAM)))
        offsets = list(written_ahead) + self._send(batch, wanted)
        try:
            for stream in self.streams:
                stream.flush()
        except Exception as exc:  # noqa: BLE001 - the SDK's ZerobusException and its Rust errors
            self._drop_streams()
            raise SinkError(f"Zerobus did not acknowledge batch {txn_version} of {self.full_name}: {exc}; sent "
                            "again (at-least-once)") from None
        self._version = txn_version
        log.debug("zerobus_acknowledged", txn_version=txn_version, offsets=len(offsets), streams=len(self.streams))
        return CommitResult(-1, txn_version, batch.num_rows, skipped=False)

    def state_saved(self, txn_version: int) -> None:
        pass

    def close(self) -> None:
        self._drop_streams()

    def _send(self, rows: pa.Table | pa.RecordBatch, streams: int = 1) -> list[int]:
        payloads = encode_records(rows, self.message)
        if not payloads:
            return []
        size = math.ceil(len(payloads) / streams)
        offsets = []
        try:
            for index in range(streams):
                part = payloads[index * size:(index + 1) * size]
                if part:
                    offset = self._stream(index).ingest_records_offset(part)
                    if offset is not None:
                        offsets.append(int(offset))
        except Exception as exc:  # noqa: BLE001 - the SDK's ZerobusException and its Rust errors
            self._drop_streams()
            raise SinkError(f"Zerobus refused records for {self.full_name}: {exc}") from None
        return offsets

    def _stream(self, index: int) -> Any:
        from zerobus import StreamConfigurationOptions, TableProperties

        while len(self.streams) <= index:
            try:
                self.streams.append(self.sdk.create_stream(
                    client_id=self._client_id, client_secret=self._client_secret,
                    table_properties=TableProperties(self.full_name, self.message.DESCRIPTOR),
                    options=StreamConfigurationOptions(recovery=True, flush_timeout_ms=int(ACK_TIMEOUT * 1000))))
            except Exception as exc:  # noqa: BLE001 - the SDK's ZerobusException and its Rust errors
                raise SinkError(f"cannot open a Zerobus stream to {self.full_name}: {exc}; check "
                                "--zerobus-endpoint and that the service principal may MODIFY and SELECT the "
                                "table") from None
            log.info("zerobus_stream_opened", table=self.full_name, streams=len(self.streams))
        return self.streams[index]

    def _drop_streams(self) -> None:
        streams, self.streams = self.streams, []
        for stream in streams:
            try:
                stream.close()
            except Exception:  # noqa: BLE001,S110 - a broken stream may not close cleanly
                pass


def zerobus_sink(target: Any, app_id: str, endpoint: str | None, state: StateStore) -> ZerobusSink:
    """The Zerobus sink of a resolved MANAGED ``target.CatalogTarget``; what is missing as a ConfigError."""
    config = target.workspace.config
    name = target.catalog_name
    if not endpoint:
        raise ConfigError(f"--managed-write zerobus needs --zerobus-endpoint (https://<workspace-id>.zerobus."
                          f"<region>.cloud.databricks.com, in the workspace's Zerobus settings) for {name}")
    if not (config.client_id and config.client_secret):
        raise ConfigError(f"--managed-write zerobus authenticates as a service principal (OAuth M2M): put "
                          f"client_id and client_secret in the Databricks profile ({config.source}); a personal "
                          "access token is not taken by Zerobus")
    try:
        from zerobus import ZerobusSdk
    except ImportError:
        raise ConfigError("--managed-write zerobus needs the Databricks Zerobus SDK: pip install "
                          "'pistream[zerobus]' (databricks-zerobus-ingest-sdk), or use --managed-write "
                          "copy-into") from None
    if endpoint.startswith("http://"):  # the SDK speaks plain gRPC to an http:// endpoint (tests, proxies)
        from urllib.parse import urlsplit

        from .databricks import is_loopback

        if not is_loopback(urlsplit(endpoint).hostname):
            raise ConfigError(f"--zerobus-endpoint {endpoint} uses plain http: records and tokens would travel "
                              "unencrypted; use https://")
    sdk = ZerobusSdk(host=endpoint, unity_catalog_url=config.host, application_name=f"pistream/{app_id}")
    return ZerobusSink(sdk, name, config.client_id, config.client_secret, state)

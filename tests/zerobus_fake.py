"""A Zerobus Ingest server on loopback for the tests: the ``databricks.zerobus.Zerobus/EphemeralStream``
bidirectional gRPC stream of the SDK's ``zerobus_service.proto`` (v1), served by grpcio without TLS (the SDK's
``set_use_tls(False)``). The messages are built from a descriptor written here (no generated code, no
grpc-tools): create_stream -> a stream id; ingest_record / ingest_record_batch -> each record decoded with the
stream's descriptor_proto, kept, and acknowledged (``durability_ack_up_to_offset``).

Knobs: ``drop_after`` (close the stream with UNAVAILABLE after that many records, once: the SDK recovers and
sends the unacknowledged records again), ``unauthenticated`` (refuse every stream). Records: ``rows`` (dicts,
as decoded), ``headers`` (the metadata of each stream, tokens masked), ``streams`` (count).
"""

from __future__ import annotations

import threading
import uuid
from concurrent import futures
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _service_pool() -> descriptor_pool.DescriptorPool:
    """The v1 messages pistream's SDK sends and reads (field numbers as in zerobus_service.proto)."""
    file = descriptor_pb2.FileDescriptorProto(name="zerobus_fake.proto", package="databricks.zerobus",
                                              syntax="proto2")

    def message(name: str, *fields: tuple[str, int, int, str | None, bool, int | None]) -> None:
        proto = file.message_type.add(name=name)
        oneofs: dict[int, int] = {}
        for field_name, number, kind, type_name, repeated, oneof in fields:
            field = proto.field.add(name=field_name, number=number, type=kind,
                                    label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = f".databricks.zerobus.{type_name}"
            if oneof is not None:
                if oneof not in oneofs:
                    oneofs[oneof] = len(proto.oneof_decl)
                    proto.oneof_decl.add(name=f"choice{oneof}")
                field.oneof_index = oneofs[oneof]

    message("JsonRecordBatch", ("records", 1, _F.TYPE_STRING, None, True, None))
    message("ProtoEncodedRecordBatch", ("records", 1, _F.TYPE_BYTES, None, True, None))
    message("CreateIngestStreamRequest", ("table_name", 1, _F.TYPE_STRING, None, False, None),
            ("descriptor_proto", 3, _F.TYPE_BYTES, None, False, None),
            ("record_type", 4, _F.TYPE_INT32, None, False, None))
    message("CreateIngestStreamResponse", ("stream_id", 1, _F.TYPE_STRING, None, False, None))
    message("IngestRecordRequest", ("offset_id", 1, _F.TYPE_INT64, None, False, None),
            ("proto_encoded_record", 2, _F.TYPE_BYTES, None, False, 0),
            ("json_record", 3, _F.TYPE_STRING, None, False, 0))
    message("IngestRecordBatchRequest", ("offset_id", 1, _F.TYPE_INT64, None, False, None),
            ("proto_encoded_batch", 2, _F.TYPE_MESSAGE, "ProtoEncodedRecordBatch", False, 0),
            ("json_batch", 3, _F.TYPE_MESSAGE, "JsonRecordBatch", False, 0))
    message("EphemeralStreamRequest",
            ("create_stream", 1, _F.TYPE_MESSAGE, "CreateIngestStreamRequest", False, 0),
            ("ingest_record", 2, _F.TYPE_MESSAGE, "IngestRecordRequest", False, 0),
            ("ingest_record_batch", 3, _F.TYPE_MESSAGE, "IngestRecordBatchRequest", False, 0))
    message("IngestRecordResponse", ("durability_ack_up_to_offset", 1, _F.TYPE_INT64, None, False, None))
    message("EphemeralStreamResponse",
            ("create_stream_response", 1, _F.TYPE_MESSAGE, "CreateIngestStreamResponse", False, 0),
            ("ingest_record_response", 2, _F.TYPE_MESSAGE, "IngestRecordResponse", False, 0))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


_POOL = _service_pool()
Request = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("databricks.zerobus.EphemeralStreamRequest"))
Response = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("databricks.zerobus.EphemeralStreamResponse"))


def _record_class(descriptor_bytes: bytes):
    """The record message of a stream, from the DescriptorProto the SDK sends (one message, no imports)."""
    proto = descriptor_pb2.DescriptorProto.FromString(descriptor_bytes)
    file = descriptor_pb2.FileDescriptorProto(name=f"record_{uuid.uuid4().hex}.proto", package="record",
                                              syntax="proto2")
    file.message_type.add().CopyFrom(proto)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"record.{proto.name}"))


class FakeZerobus:
    """The server (``start``/``stop``), its knobs and what it received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.rows: list[dict[str, Any]] = []
            self.headers: list[dict[str, str]] = []
            self.streams = 0
            self.drop_after: int | None = None
            self.unauthenticated = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import grpc

        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=Request.FromString, response_serializer=Response.SerializeToString)
        service = grpc.method_handlers_generic_handler("databricks.zerobus.Zerobus", {"EphemeralStream": handler})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[service])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(5)
            self._server = None

    def _stream(self, requests, context):
        import grpc

        metadata = {k: ("***" if k == "authorization" else v) for k, v in context.invocation_metadata()}
        with self._lock:
            self.streams += 1
            self.headers.append(metadata)
            refuse = self.unauthenticated
        if refuse:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Invalid token")
        context.send_initial_metadata(())  # the SDK (tonic) waits for the response headers before it sends
        record_class = None
        for request in requests:
            kind = request.WhichOneof("choice0")
            if kind == "create_stream":
                record_class = _record_class(request.create_stream.descriptor_proto)
                yield Response(create_stream_response={"stream_id": str(uuid.uuid4())})
                continue
            assert record_class is not None, "records before create_stream"
            if kind == "ingest_record":
                offset, payloads = request.ingest_record.offset_id, [request.ingest_record.proto_encoded_record]
            else:
                offset, payloads = (request.ingest_record_batch.offset_id,
                                    list(request.ingest_record_batch.proto_encoded_batch.records))
            with self._lock:
                if self.drop_after is not None and len(self.rows) + len(payloads) > self.drop_after:
                    self.drop_after = None
                    drop = True
                else:
                    drop = False
                    self.rows.extend(json_format.MessageToDict(record_class.FromString(p),
                                                               preserving_proto_field_name=True) for p in payloads)
            if drop:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stream closed by the fake (drop_after)")
            yield Response(ingest_record_response={"durability_ack_up_to_offset": offset})

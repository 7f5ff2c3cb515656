"""
fedhub's AMQP 0-9-1 transport, built on txamqp and aimed at RabbitMQ.

This package is the only place in fedhub that imports txamqp.  Its base is
the protocol definition (L{fedhub.amqp.spec}) and a complete field-table
codec (L{fedhub.amqp.codec}) that txamqp's own codec lacks.
"""

from fedhub.amqp.codec import (
    FieldTableClient,
    FieldTableCodec,
    FieldTableDecodeError,
    FieldTableEncodeError,
    FieldTableError,
    FieldTableFrameMixin,
    FieldValue,
    FrameError,
    body_frame,
    content_header_frame,
    decode_table,
    encode_table,
    encode_value,
    method_frame,
    pack_frame,
    unpack_frame,
)
from fedhub.amqp.spec import load_spec

__all__ = [
    "FieldTableClient",
    "FieldTableCodec",
    "FieldTableDecodeError",
    "FieldTableEncodeError",
    "FieldTableError",
    "FieldTableFrameMixin",
    "FieldValue",
    "FrameError",
    "body_frame",
    "content_header_frame",
    "decode_table",
    "encode_table",
    "encode_value",
    "load_spec",
    "method_frame",
    "pack_frame",
    "unpack_frame",
]

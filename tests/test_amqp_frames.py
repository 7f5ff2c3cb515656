"""
Tests for L{fedhub.amqp.frames}: the fast frames of the hot paths give
byte for byte, and value for value, what the generic codec
(L{fedhub.amqp.codec}) and txamqp's dispatch give, also when the stream is
cut into arbitrary pieces.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from txamqp.connection import Frame, Method
from zope.interface import implementer

from fedhub.amqp.codec import (
    FieldTableDecodeError,
    FieldTableEncodeError,
    FieldValue,
    FrameError,
    body_frame,
    content_header_frame,
    decode_table,
    encode_table,
    method_frame,
    pack_frame,
    unpack_frame,
)
from fedhub.amqp.frames import (
    ContentDecoder,
    Deliver,
    FrameEncodeError,
    HeaderDecoder,
    PublishEncoder,
    Return,
    basic_properties,
    decode_deliver,
    decode_headers,
    decode_properties,
    decode_return,
    decode_tag_bits,
    encode_ack,
    encode_headers,
    encode_nack,
    encode_properties,
    encode_reject,
    encode_shortstr,
)
from fedhub.amqp.protocol import HEARTBEAT_FRAME, AMQPClient, NullConnectionEvents
from fedhub.amqp.spec import load_spec
from fedhub.errors import FedhubError
from fedhub.message import Message

SPEC = load_spec()

EVERY_PROPERTY: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "headers": {"fedora_messaging_schema": "base.message", "n\u00e4me": "v\u00e4lue \u2603"},
    "delivery_mode": 2,
    "priority": 9,
    "correlation_id": "corr-1",
    "reply_to": "amq.rabbitmq.reply-to",
    "expiration": "60000",
    "message_id": "5b1c1b4e-3c1e-4e59-9f0a-2f3c5c8e6a10",
    "timestamp": 1795845600,
    "type": "bug.update",
    "user_id": "guest",
    "app_id": "fedhub",
    "reserved": "cluster",
}
"""A value for every property of C{basic}, by Python name."""

WIRE_NAMES = {p.name: p.wire for p in basic_properties(SPEC)}


def wire(properties: dict[str, Any]) -> dict[str, Any]:
    """Properties by spec name, as txamqp's header frame wants them."""
    return {WIRE_NAMES[name]: value for name, value in properties.items()}


def generic_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: dict[str, Any],
    frame_max: int,
    mandatory: bool = False,
    immediate: bool = False,
) -> bytes:
    """
    The bytes of a publish through the generic codec: method, header and body
    frames of at most C{frame_max} bytes.
    """
    frames = [
        method_frame(SPEC, channel, "basic.publish", 0, exchange, routing_key, mandatory, immediate),
        content_header_frame(
            SPEC, channel, len(body), {k: v for k, v in wire(properties).items() if v is not None}
        ),
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        frames.append(body_frame(channel, body[start : start + chunk]))
    return b"".join(pack_frame(SPEC, f) for f in frames)


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream into its frames."""
    frames = []
    while data:
        (size,) = struct.unpack_from("!I", data, 3)
        frames.append(data[: size + 8])
        data = data[size + 8 :]
    return frames


# --- strategies -----------------------------------------------------------

ascii_short = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
header_keys = st.text(max_size=12)
simple_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
nested_values = st.one_of(
    simple_values,
    st.binary(max_size=10),
    st.lists(simple_values, max_size=3),
    st.dictionaries(header_keys, simple_values, max_size=3),
    st.builds(lambda n: FieldValue("l", n), st.integers(-5, 5)),
    st.builds(lambda n: FieldValue("u", n), st.integers(0, 65535)),
    st.just(Decimal("12.34")),
    st.just(datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)),
)
simple_tables = st.dictionaries(header_keys, simple_values, max_size=6)
any_tables = st.dictionaries(header_keys, nested_values, max_size=6)

# Wire values of every table type letter, for decoding.
typed_entries = st.one_of(
    st.builds(lambda n: FieldValue("b", n), st.integers(-128, 127)),
    st.builds(lambda n: FieldValue("B", n), st.integers(0, 255)),
    st.builds(lambda n: FieldValue("s", n), st.integers(-(2**15), 2**15 - 1)),
    st.builds(lambda n: FieldValue("u", n), st.integers(0, 2**16 - 1)),
    st.builds(lambda n: FieldValue("i", n), st.integers(0, 2**32 - 1)),
    st.builds(lambda n: FieldValue("L", n), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda n: FieldValue("f", n), st.floats(width=32, allow_nan=False)),
    st.builds(lambda n: FieldValue("t", n), st.integers(0, 255)),
    st.builds(lambda b: FieldValue("S", b), st.binary(max_size=8)),
    st.builds(lambda b: FieldValue("x", b), st.binary(max_size=8)),
    nested_values,
)
typed_tables = st.dictionaries(header_keys, typed_entries, max_size=6)

properties_strategy = st.fixed_dictionaries(
    {},
    optional={
        "content_type": ascii_short,
        "content_encoding": ascii_short,
        "headers": any_tables,
        "delivery_mode": st.integers(0, 255),
        "priority": st.integers(0, 255),
        "correlation_id": ascii_short,
        "reply_to": ascii_short,
        "expiration": ascii_short,
        "message_id": ascii_short,
        "timestamp": st.integers(0, 2**64 - 1),
        "type": ascii_short,
        "user_id": ascii_short,
        "app_id": ascii_short,
        "reserved": ascii_short,
    },
)


# --- encoding -------------------------------------------------------------


class PublishEncoderTests(SynchronousTestCase):
    """
    L{PublishEncoder} writes what the generic codec writes.
    """

    def assertSameAsGeneric(
        self, body: bytes, properties: dict[str, Any], frame_max: int = 131072, **kwargs: Any
    ) -> None:
        fast = PublishEncoder(SPEC, frame_max).publish(5, "amq.topic", "a.b.c", body, properties, **kwargs)
        generic = generic_publish(5, "amq.topic", "a.b.c", body, properties, frame_max, **kwargs)
        self.assertEqual(fast, generic)

    def test_every_property(self) -> None:
        """Every property of basic, unicode headers included, encodes byte for byte as the codec does."""
        self.assertSameAsGeneric(b'{"a":1}', EVERY_PROPERTY, mandatory=True)

    def test_no_property(self) -> None:
        """A message without properties has an all-zero flag word."""
        self.assertSameAsGeneric(b"x", {})

    def test_none_is_absent(self) -> None:
        """A property set to None is left out, flag and value."""
        encoder = PublishEncoder(SPEC, 131072)
        self.assertEqual(
            encoder.publish(1, "", "q", b"x", {"content_type": None, "priority": 1}),
            encoder.publish(1, "", "q", b"x", {"priority": 1}),
        )
        self.assertSameAsGeneric(b"x", {"content_type": None, "priority": 1})

    def test_empty_body(self) -> None:
        """An empty body is a method and a header frame, no body frame."""
        data = PublishEncoder(SPEC, 4096).publish(1, "", "q", b"", {"delivery_mode": 2})
        self.assertEqual([f[0] for f in split_frames(data)], [1, 2])
        self.assertSameAsGeneric(b"", {"delivery_mode": 2}, frame_max=4096)

    def test_body_split(self) -> None:
        """A body larger than a frame is split into frames of frame_max - 8 bytes."""
        body = bytes(range(256)) * 40
        data = PublishEncoder(SPEC, 4096).publish(1, "", "q", body, {})
        sizes = [len(f) - 8 for f in split_frames(data)[2:]]
        self.assertEqual(sizes, [4088, 4088, 2064])
        self.assertSameAsGeneric(body, {}, frame_max=4096)

    def test_body_exactly_one_frame(self) -> None:
        """A body of exactly frame_max - 8 bytes fits one frame; one byte more needs two."""
        self.assertSameAsGeneric(b"x" * 4088, {}, frame_max=4096)
        self.assertSameAsGeneric(b"x" * 4089, {}, frame_max=4096)

    def test_fedhub_message(self) -> None:
        """A fedhub message's own properties encode as the codec encodes them."""
        message = Message.create(
            "org.fedoraproject.prod.bugzilla.bug.update",
            {"bug": {"id": 1, "summary": "\u00e9t\u00e9"}},
            headers={"fedora_messaging_user_jdoe": True, "fedora_messaging_rpm_k\u00e9rnel": True},
        )
        self.assertSameAsGeneric(message.body_bytes, message.amqp_properties(), mandatory=True)

    def test_cached_frames_stay_right(self) -> None:
        """Method frames and repeated short strings come from caches without mixing up places."""
        encoder = PublishEncoder(SPEC, 131072)
        for round in range(3):
            for n in range(PublishEncoder.CACHE_SIZE + 10):
                key = f"topic.{n % 1100}"
                props = {"content_type": f"type/{n % 70}", "message_id": str(n)}
                self.assertEqual(
                    encoder.publish(n % 3 + 1, "ex", key, b"b", props, mandatory=bool(n % 2)),
                    generic_publish(n % 3 + 1, "ex", key, b"b", props, 131072, mandatory=bool(n % 2)),
                )

    @settings(max_examples=150, deadline=None)
    @given(
        properties=properties_strategy,
        body=st.binary(max_size=700),
        frame_max=st.integers(9, 300),
        mandatory=st.booleans(),
        immediate=st.booleans(),
        channel=st.integers(1, 65535),
        exchange=ascii_short,
        routing_key=ascii_short,
    )
    def test_matches_generic(
        self,
        properties: dict[str, Any],
        body: bytes,
        frame_max: int,
        mandatory: bool,
        immediate: bool,
        channel: int,
        exchange: str,
        routing_key: str,
    ) -> None:
        """
        Any properties, body and frame size give the generic codec's bytes,
        or are refused when the content header does not fit in a frame.
        """
        generic = generic_publish(
            channel, exchange, routing_key, body, properties, frame_max, mandatory, immediate
        )
        encoder = PublishEncoder(SPEC, frame_max)
        if len(split_frames(generic)[1]) > frame_max:
            self.assertRaises(
                FrameEncodeError, encoder.publish,
                channel, exchange, routing_key, body, properties, mandatory, immediate,
            )
            return
        fast = encoder.publish(channel, exchange, routing_key, body, properties, mandatory, immediate)
        self.assertEqual(fast, generic)

    def test_non_ascii_short_strings_counted_in_bytes(self) -> None:
        """
        A non-ASCII routing key or message id is sent with its length in
        bytes (txamqp's encoder counts characters), and decodes back.
        """
        data = PublishEncoder(SPEC, 131072).publish(
            1, "amq.topic", "b\u00fcg.\u2603", b"x", {"message_id": "\u00e9t\u00e9"}
        )
        method, header, _ = (unpack_frame(SPEC, f) for f in split_frames(data))
        self.assertEqual(method.payload.args[2], "b\u00fcg.\u2603")
        self.assertEqual(header.payload.properties["message-id"], "\u00e9t\u00e9")

    def test_short_string_too_long(self) -> None:
        """A routing key or property over 255 bytes raises FrameEncodeError, a ValueError."""
        encoder = PublishEncoder(SPEC, 131072)
        error = self.assertRaises(
            FrameEncodeError, encoder.publish, 1, "", "k" * 256, b"", {}
        )
        self.assertEqual(error.field, "routing_key")
        self.assertIsInstance(error, ValueError)
        self.assertIsInstance(error, FedhubError)
        error = self.assertRaises(
            FrameEncodeError, encoder.publish, 1, "", "q", b"", {"message_id": "\u00e9" * 128}
        )
        self.assertEqual(error.field, "message_id")
        encoder.publish(1, "", "k" * 255, b"", {"message_id": "m" * 255})

    def test_bad_values(self) -> None:
        """Values of the wrong type or range raise FrameEncodeError."""
        encoder = PublishEncoder(SPEC, 131072)
        for props in ({"priority": 256}, {"priority": "high"}, {"content_type": 5},
                      {"timestamp": -1}, {"app_id": "\ud800"}):
            self.assertRaises(FrameEncodeError, encoder.publish, 1, "", "q", b"", props)

    def test_unknown_property(self) -> None:
        """An unknown property name raises KeyError, even with a None value."""
        encoder = PublishEncoder(SPEC, 131072)
        self.assertRaises(KeyError, encoder.publish, 1, "", "q", b"", {"colour": "red"})
        self.assertRaises(KeyError, encoder.publish, 1, "", "q", b"", {"colour": None})
        self.assertRaises(KeyError, encoder.publish, 1, "", "q", b"", {"content-type": "x"})

    def test_unencodable_headers(self) -> None:
        """Headers the table codec refuses raise its FieldTableEncodeError."""
        encoder = PublishEncoder(SPEC, 131072)
        self.assertRaises(
            FieldTableEncodeError, encoder.publish, 1, "", "q", b"", {"headers": {"k": object()}}
        )

    def test_shortstr(self) -> None:
        """Short strings: length octet then bytes; str as UTF-8."""
        self.assertEqual(encode_shortstr("ab"), b"\x02ab")
        self.assertEqual(encode_shortstr(b"\xff"), b"\x01\xff")
        self.assertEqual(encode_shortstr("\u00e9"), b"\x02\xc3\xa9")
        self.assertRaises(FrameEncodeError, encode_shortstr, 3)


class AckEncoderTests(SynchronousTestCase):
    """
    Acknowledgement frames equal the generic codec's.
    """

    @settings(max_examples=50, deadline=None)
    @given(st.integers(0, 65535), st.integers(0, 2**64 - 1), st.booleans(), st.booleans())
    def test_matches_generic(self, channel: int, tag: int, first: bool, second: bool) -> None:
        """basic.ack, basic.reject and basic.nack give the generic codec's bytes."""
        self.assertEqual(
            encode_ack(channel, tag, first),
            pack_frame(SPEC, method_frame(SPEC, channel, "basic.ack", tag, first)),
        )
        self.assertEqual(
            encode_reject(channel, tag, first),
            pack_frame(SPEC, method_frame(SPEC, channel, "basic.reject", tag, first)),
        )
        self.assertEqual(
            encode_nack(channel, tag, first, second),
            pack_frame(SPEC, method_frame(SPEC, channel, "basic.nack", tag, first, second)),
        )


class TableTests(SynchronousTestCase):
    """
    The fast table encoder and decoder agree with the table codec.
    """

    def setUp(self) -> None:
        # Shared by the examples of test_encode_with_cache on purpose.
        self.cache: dict[Any, bytes] = {}

    @settings(max_examples=200, deadline=None)
    @given(any_tables)
    def test_encode_matches_codec(self, table: dict[str, Any]) -> None:
        """Any table encodes to the codec's bytes (simple ones here, others through it)."""
        self.assertEqual(encode_headers(table), encode_table(table))

    @settings(max_examples=200, deadline=None)
    @given(simple_tables)
    def test_encode_simple(self, table: dict[str, Any]) -> None:
        """Tables of plain values encode to the codec's bytes."""
        self.assertEqual(encode_headers(table), encode_table(table))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(any_tables, min_size=1, max_size=4))
    def test_encode_with_cache(self, tables: list[dict[str, Any]]) -> None:
        """Entries reused from the cache give the codec's bytes, table after table."""
        for table in tables:
            self.assertEqual(encode_headers(table, self.cache), encode_table(table))

    def test_large_entries_not_kept(self) -> None:
        """A large header value encodes right and is not kept; a small one is."""
        cache: dict[Any, bytes] = {}
        for _ in range(2):
            table = {"big": "x" * 5000, "small": "y"}
            self.assertEqual(encode_headers(table, cache), encode_table(table))
        self.assertEqual(list(cache), [("small", str, "y")])

    def test_cache_keeps_equal_values_apart(self) -> None:
        """True and 1, 0.0 and -0.0, equal as Python values, keep their own encodings."""
        cache: dict[Any, bytes] = {}
        for table in ({"a": 1}, {"a": True}, {"a": 1}, {"a": 0.0}, {"a": -0.0}, {"a": False},
                      {"a": 0}, {"a": None}, {"a": ""}):
            self.assertEqual(encode_headers(table, cache), encode_table(table), table)

    def test_encode_edges(self) -> None:
        """Integer limits, odd keys and subclasses encode as the codec does."""

        class Text(str):
            pass

        for table in (
            {"a": 2**31 - 1, "b": -(2**31), "c": 2**31, "d": -(2**31) - 1},
            {"a": 2**63 - 1, "b": -(2**63)},
            {"k" * 255: 1},
            {"\udcff": "surrogate-escaped key"},
            {"a": Text("sub")},
            {"a": float("inf"), "b": -0.0},
            {},
        ):
            self.assertEqual(encode_headers(table), encode_table(table), table)

    def test_encode_errors_are_the_codecs(self) -> None:
        """What the codec refuses, the fast encoder refuses the same way."""
        for table in ({"a": 2**64}, {"k" * 256: 1}, {"a": "\ud800"}, {1: "x"}, {"a": object()}):
            fast = self.assertRaises(FieldTableEncodeError, encode_headers, table)
            generic = self.assertRaises(FieldTableEncodeError, encode_table, table)
            self.assertEqual(str(fast), str(generic))

    @settings(max_examples=200, deadline=None)
    @given(typed_tables)
    def test_decode_matches_codec(self, table: dict[str, Any]) -> None:
        """Any well-formed table decodes to what the codec gives."""
        data = b"pad" + encode_table(table)
        self.assertEqual(decode_headers(data, 3, len(data)), decode_table(data, 3)[0])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40))
    def test_decode_garbage_like_codec(self, junk: bytes) -> None:
        """Arbitrary bytes decode, or fail with FieldTableDecodeError, as in the codec."""
        data = struct.pack("!I", len(junk)) + junk
        try:
            expected = decode_table(data)
        except FieldTableDecodeError:
            self.assertRaises(FieldTableDecodeError, decode_headers, data, 0, len(data))
        else:
            if expected[1] == len(data):
                self.assertEqual(decode_headers(data, 0, len(data)), expected[0])

    def test_decode_non_utf8_string(self) -> None:
        """A long string that is not UTF-8 stays bytes; a non-canonical boolean is True."""
        data = encode_table({"a": FieldValue("S", b"\xff"), "b": FieldValue("t", 7)})
        self.assertEqual(decode_headers(data, 0, len(data)), {"a": b"\xff", "b": True})


# --- decoding -------------------------------------------------------------


def frame_args(data: bytes) -> tuple[Any, ...]:
    """The arguments of a method frame, through the generic decoder."""
    return tuple(unpack_frame(SPEC, data).payload.args)


class MethodDecoderTests(SynchronousTestCase):
    """
    Method arguments decode as the generic decoder decodes them.
    """

    @settings(max_examples=100, deadline=None)
    @given(
        st.text(max_size=20) | st.binary(max_size=20),
        st.integers(0, 2**64 - 1),
        st.booleans(),
        st.text(max_size=20) | st.binary(max_size=20),
        st.text(max_size=20) | st.binary(max_size=20),
    )
    def test_deliver(self, tag: Any, dtag: int, redelivered: bool, exchange: Any, key: Any) -> None:
        """basic.deliver: str where UTF-8, bytes where not, like txamqp."""
        raw = [encode_shortstr(v)[1:] for v in (tag, exchange, key)]
        data = pack_frame(
            SPEC, method_frame(SPEC, 3, "basic.deliver", raw[0], dtag, redelivered, raw[1], raw[2])
        )
        fast = decode_deliver(data, 11, len(data) - 1, 3)
        self.assertEqual(
            (fast.consumer_tag, fast.delivery_tag, fast.redelivered, fast.exchange, fast.routing_key),
            frame_args(data),
        )

    def test_return(self) -> None:
        """basic.return decodes as the generic decoder decodes it."""
        data = pack_frame(
            SPEC, method_frame(SPEC, 2, "basic.return", 312, "NO_ROUTE", "amq.topic", b"k\xff")
        )
        fast = decode_return(data, 11, len(data) - 1, 2)
        self.assertEqual(fast, Return(312, "NO_ROUTE", "amq.topic", b"k\xff"))
        self.assertEqual(
            (fast.reply_code, fast.reply_text, fast.exchange, fast.routing_key), frame_args(data)
        )

    def test_ack_nack(self) -> None:
        """The tag and bits of basic.ack and basic.nack."""
        data = pack_frame(SPEC, method_frame(SPEC, 1, "basic.nack", 2**40, True, True))
        self.assertEqual(decode_tag_bits(data, 11, len(data) - 1, 1), (2**40, 3))

    def test_truncated_and_trailing(self) -> None:
        """Short or overlong arguments are FrameErrors, never wrong values."""
        data = pack_frame(SPEC, method_frame(SPEC, 3, "basic.deliver", "ctag", 1, False, "ex", "rk"))
        end = len(data) - 1
        for cut in range(11, end):
            self.assertRaises(FrameError, decode_deliver, data, 11, cut, 3)
        padded = data[:-1] + b"\x00"
        self.assertEqual(self.assertRaises(FrameError, decode_deliver, padded + b"\xce", 11, end + 1, 3).reason,
                         "bad-length")
        self.assertRaises(FrameError, decode_return, data, 11, 12, 3)
        self.assertRaises(FrameError, decode_tag_bits, data, 11, 15, 3)
        self.assertRaises(FrameError, decode_tag_bits, data, 11, 25, 3)


class HeaderDecoderTests(SynchronousTestCase):
    """
    Content headers decode to the generic decoder's properties.
    """

    def generic(self, data: bytes) -> tuple[int, dict[str, Any]]:
        header = unpack_frame(SPEC, data).payload
        python = {p.wire: p.name for p in basic_properties(SPEC)}
        return header.size, {python[k]: v for k, v in header.properties.items()}

    def encode(self, size: int, properties: dict[str, Any]) -> bytes:
        return pack_frame(SPEC, content_header_frame(SPEC, 1, size, wire(properties)))  # type: ignore[no-any-return]

    def test_every_property(self) -> None:
        """Every property of basic decodes, by Python name."""
        data = self.encode(77, EVERY_PROPERTY)
        decoded = HeaderDecoder(SPEC).decode(data, 7, len(data) - 1, 1)
        self.assertEqual(decoded, self.generic(data))
        self.assertEqual(decoded, (77, EVERY_PROPERTY))

    @settings(max_examples=150, deadline=None)
    @given(properties_strategy, st.integers(0, 2**63))
    def test_matches_generic(self, properties: dict[str, Any], size: int) -> None:
        """Any properties decode to what the generic decoder gives."""
        data = self.encode(size, properties)
        self.assertEqual(HeaderDecoder(SPEC).decode(data, 7, len(data) - 1, 1), self.generic(data))

    def test_second_flag_word(self) -> None:
        """A continuation flag word (bits past the known properties) is read and its bits ignored."""
        data = self.encode(3, {"content_type": "a/b", "app_id": "x"})
        payload = bytearray(data[7:-1])
        # Set the continuation bit, then add a second word with a stray bit.
        flags = struct.unpack_from("!H", payload, 12)[0] | 1
        struct.pack_into("!H", payload, 12, flags)
        payload[14:14] = b"\x80\x00"
        frame = struct.pack("!BHI", 2, 1, len(payload)) + bytes(payload) + b"\xce"
        decoded = HeaderDecoder(SPEC).decode(frame, 7, len(frame) - 1, 1)
        self.assertEqual(decoded, self.generic(frame))
        self.assertEqual(decoded, (3, {"content_type": "a/b", "app_id": "x"}))

    def test_kept_tables_are_fresh_copies(self) -> None:
        """A header table decoded again from the cache is a new dictionary; changing one changes no other."""
        decoder = HeaderDecoder(SPEC)
        data = self.encode(1, {"headers": {"a": "x", "b": 2}})
        first = decoder.decode(data, 7, len(data) - 1, 1)[1]["headers"]
        first["a"] = "changed"
        second = decoder.decode(data, 7, len(data) - 1, 1)[1]["headers"]
        self.assertEqual(second, {"a": "x", "b": 2})
        self.assertIsNot(first, second)

    def test_large_tables_not_kept(self) -> None:
        """A large header table decodes right every time and is not kept."""
        decoder = HeaderDecoder(SPEC)
        data = self.encode(1, {"headers": {"big": "x" * 5000}})
        for _ in range(2):
            self.assertEqual(decoder.decode(data, 7, len(data) - 1, 1), self.generic(data))
        self.assertEqual(decoder._tables, {})

    def test_nested_tables_not_shared(self) -> None:
        """Tables holding tables or lists are decoded every time, never shared."""
        decoder = HeaderDecoder(SPEC)
        data = self.encode(1, {"headers": {"x-death": [{"count": 1}]}})
        first = decoder.decode(data, 7, len(data) - 1, 1)[1]["headers"]
        first["x-death"][0]["count"] = 99
        second = decoder.decode(data, 7, len(data) - 1, 1)[1]["headers"]
        self.assertEqual(second, {"x-death": [{"count": 1}]})

    def test_many_flag_words_and_tables(self) -> None:
        """More distinct headers and flag words than the caches hold still decode right."""
        decoder = HeaderDecoder(SPEC)
        names = sorted(EVERY_PROPERTY)
        for n in range(HeaderDecoder.TABLES + 40):
            props = {name: EVERY_PROPERTY[name] for i, name in enumerate(names) if n >> i & 1}
            props["headers"] = {"n": n}
            data = self.encode(n, props)
            self.assertEqual(decoder.decode(data, 7, len(data) - 1, 1), (n, props))

    def test_errors(self) -> None:
        """Truncated headers, bad tables, foreign classes and stray bytes are FrameErrors."""
        decoder = HeaderDecoder(SPEC)
        data = self.encode(5, EVERY_PROPERTY)
        for cut in range(7, len(data) - 1):
            self.assertRaises(FrameError, decoder.decode, data, 7, cut, 1)
        longer = data[:-1] + b"\x00\xce"
        self.assertEqual(self.assertRaises(FrameError, decoder.decode, longer, 7, len(longer) - 1, 1).reason,
                         "bad-length")
        foreign = bytearray(data)
        struct.pack_into("!H", foreign, 7, 50)
        self.assertEqual(
            self.assertRaises(FrameError, decoder.decode, bytes(foreign), 7, len(data) - 1, 1).reason,
            "unknown-class",
        )
        bad_table = self.encode(1, {"headers": {"a": 1}})
        broken = bytearray(bad_table)
        broken[bad_table.index(b"I")] = ord("?")
        error = self.assertRaises(FrameError, decoder.decode, bytes(broken), 7, len(broken) - 1, 1)
        self.assertEqual(error.reason, "bad-table")


class ContentDecoderTests(SynchronousTestCase):
    """
    L{ContentDecoder} assembles messages and refuses frames out of order.
    """

    def test_body_in_pieces(self) -> None:
        """Body frames are joined; the message is complete with the last byte."""
        decoder = ContentDecoder(SPEC)
        decoder.method(1, Deliver("t", 1, False, "e", "k"), "target")
        header = pack_frame(SPEC, content_header_frame(SPEC, 1, 5, {}))
        self.assertIsNone(decoder.header(header, 7, len(header) - 1, 1))
        self.assertIsNone(decoder.body(b"xxab", 2, 4, 1))
        content = decoder.body(b"cde", 0, 3, 1)
        assert content is not None
        self.assertEqual((content.body, content.target), (b"abcde", "target"))
        self.assertFalse(decoder.expects(1))

    def test_out_of_order(self) -> None:
        """A second method, a body before the header, a second header, or a body too long is an error."""
        decoder = ContentDecoder(SPEC)
        decoder.method(1, Deliver("t", 1, False, "e", "k"), None)
        self.assertRaises(FrameError, decoder.method, 1, Deliver("t", 2, False, "e", "k"), None)
        self.assertRaises(FrameError, decoder.body, b"ab", 0, 2, 1)
        header = pack_frame(SPEC, content_header_frame(SPEC, 1, 1, {}))
        decoder.header(header, 7, len(header) - 1, 1)
        self.assertRaises(FrameError, decoder.header, header, 7, len(header) - 1, 1)
        self.assertEqual(self.assertRaises(FrameError, decoder.body, b"ab", 0, 2, 1).reason, "bad-length")
        decoder.forget(1)
        self.assertFalse(decoder.expects(1))


# --- the client: fast and generic paths side by side ----------------------


@implementer(ITCPTransport)
class FakeTCP(StringTransport):
    """A StringTransport that counts writes and records aborts."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Recorder(NullConnectionEvents):
    """Records every event as a tuple."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def basic_deliver(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("deliver", *args))

    def basic_return(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("return", *args))

    def basic_ack(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("ack", *args))

    def basic_nack(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("nack", *args))

    def consumer_cancelled(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("cancelled", *args))

    def channel_closed(self, *args: Any) -> None:  # type: ignore[override]
        self.seen.append(("channel_closed", args[0], type(args[1]).__name__))


def frame(channel: int, name: str, *args: Any) -> bytes:
    """A method frame through the generic codec."""
    return pack_frame(SPEC, Frame(channel, Method(SPEC.parse_method(name), *args)))  # type: ignore[no-any-return]


def content(channel: int, body: bytes, frame_max: int = 4096, **properties: Any) -> bytes:
    """A content header and the body frames of a message."""
    data = pack_frame(SPEC, content_header_frame(SPEC, channel, len(body), wire(properties)))
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        data += pack_frame(SPEC, body_frame(channel, body[start : start + chunk]))
    return data  # type: ignore[no-any-return]


class Connection:
    """An open client with channels 1 and 2, fast frames on or off."""

    def __init__(self, fast: bool) -> None:
        self.clock = Clock()
        self.client = AMQPClient(SPEC, clock=self.clock, frame_max=4096)
        self.client.fast_frames = fast
        self.events = Recorder()
        self.client.events = self.events
        self.transport = FakeTCP()
        self.client.makeConnection(self.transport)
        self.client.dataReceived(
            frame(0, "connection.start", 0, 9, {"product": "RabbitMQ"}, b"PLAIN", b"en_US")
            + frame(0, "connection.tune", 2047, 4096, 60)
        )
        self.client.open()
        self.client.dataReceived(frame(0, "connection.open-ok", ""))
        for channel_id in (1, 2):
            self.client.open_channel()
            self.client.dataReceived(frame(channel_id, "channel.open-ok", b""))
        self.transport.clear()
        self.writes = self.transport.writes

    def feed(self, data: bytes, cuts: list[int]) -> None:
        """Hand C{data} over in pieces cut at C{cuts}."""
        start = 0
        for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
            if cut > start:
                self.client.dataReceived(data[start:cut])
                start = cut


STREAM = b"".join(
    [
        frame(1, "basic.deliver", "ctag", 1, False, "amq.topic", "a.b"),
        content(1, b'{"n":1}', **EVERY_PROPERTY),
        HEARTBEAT_FRAME,
        frame(2, "basic.ack", 7, True),
        # txamqp's encoder miscounts non-ASCII str: give it the UTF-8 bytes.
        frame(2, "basic.nack", 8, False, True),
        frame(1, "basic.deliver", b"c\xfftag", 2, True, b"ex\xff", "k\u00e9y".encode()),
        content(1, bytes(range(256)) * 12, delivery_mode=2),
        frame(2, "basic.return", 312, "NO_ROUTE", "amq.topic", "nowhere"),
        content(2, b"", message_id="m-1", headers={"x-death": [{"count": 1, "queue": "q"}]}),
        frame(9, "basic.deliver", "ghost", 3, False, "", "q"),
        content(9, b"dropped: channel 9 is not open"),
        frame(1, "basic.deliver", "ctag", 4, False, "", "q"),
        content(1, b"", headers={"k": "v"}),
        frame(1, "basic.cancel", "ctag", False),
        frame(2, "channel.close", 404, "NOT_FOUND", 60, 40),
        frame(2, "basic.ack", 9, False),
    ]
)
"""A stream of everything the fast path handles, and frames it leaves to the generic path."""


class ClientTests(SynchronousTestCase):
    """
    The client tells its listener the same things with fast frames as
    without, however the stream is cut.
    """

    def test_same_events(self) -> None:
        """Deliveries, returns, acks, nacks, cancels and closes come out the same on both paths."""
        fast, generic = Connection(True), Connection(False)
        fast.feed(STREAM, [])
        generic.feed(STREAM, [])
        self.assertEqual(fast.events.seen, generic.events.seen)
        self.assertEqual(
            [event[0] for event in fast.events.seen],
            ["deliver", "ack", "nack", "deliver", "return", "deliver", "cancelled", "channel_closed"],
        )
        first = fast.events.seen[0]
        self.assertEqual(first[1:7], (1, "ctag", 1, False, "amq.topic", "a.b"))
        self.assertEqual((first[7], first[8]), (EVERY_PROPERTY, b'{"n":1}'))
        odd = fast.events.seen[3]
        self.assertEqual(odd[2], "c\ufffdtag")
        self.assertEqual(odd[8], bytes(range(256)) * 12)
        self.assertFalse(fast.transport.aborted)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.integers(0, len(STREAM)), max_size=40))
    def test_any_cuts(self, cuts: list[int]) -> None:
        """Cutting the stream anywhere changes nothing on either path."""
        whole = Connection(False)
        whole.feed(STREAM, [])
        fast, generic = Connection(True), Connection(False)
        fast.feed(STREAM, cuts)
        generic.feed(STREAM, cuts)
        self.assertEqual(fast.events.seen, whole.events.seen)
        self.assertEqual(generic.events.seen, whole.events.seen)

    def test_byte_by_byte(self) -> None:
        """Even one byte at a time."""
        fast, generic = Connection(True), Connection(False)
        fast.feed(STREAM, list(range(len(STREAM))))
        generic.feed(STREAM, [])
        self.assertEqual(fast.events.seen, generic.events.seen)

    def test_interleaved_channels(self) -> None:
        """
        Frames of another channel between a method and its content are
        handled as they arrive; the message is reported once complete.
        """
        fast = Connection(True)
        fast.feed(
            frame(1, "basic.deliver", "ctag", 1, False, "", "q")
            + frame(2, "basic.ack", 4, False)
            + pack_frame(SPEC, content_header_frame(SPEC, 1, 6, {}))
            + frame(2, "basic.return", 312, "NO_ROUTE", "", "r")
            + pack_frame(SPEC, body_frame(1, b"abc"))
            + content(2, b"r")
            + pack_frame(SPEC, body_frame(1, b"def")),
            [],
        )
        self.assertEqual(
            fast.events.seen,
            [
                ("ack", 2, 4, False),
                ("return", 2, 312, "NO_ROUTE", "", "r", {}, b"r"),
                ("deliver", 1, "ctag", 1, False, "", "q", {}, b"abcdef"),
            ],
        )

    def test_channel_closed_mid_message(self) -> None:
        """A message whose channel is closed before its body arrives is dropped."""
        fast = Connection(True)
        fast.feed(frame(1, "basic.deliver", "ctag", 1, False, "", "q"), [])
        fast.client.channels[1].close(Exception("closed"))
        fast.feed(content(1, b"late"), [])
        self.assertEqual(fast.events.seen, [])
        self.assertFalse(fast.transport.aborted)

    def test_forgotten_channel_drops_half_message(self) -> None:
        """Forgetting a channel drops its half-received message; a new one on the id starts clean."""
        fast = Connection(True)
        fast.feed(frame(1, "basic.deliver", "ctag", 1, False, "", "q"), [])
        fast.client._forget_channel(fast.client.channels[1])
        self.assertFalse(fast.client._contents.expects(1))

    def test_protocol_errors_abort(self) -> None:
        """Frames out of order, overlong bodies and bad frame ends drop the connection."""
        deliver = frame(1, "basic.deliver", "ctag", 1, False, "", "q")
        header = pack_frame(SPEC, content_header_frame(SPEC, 1, 2, {}))
        for stream in (
            deliver + deliver,
            deliver + pack_frame(SPEC, body_frame(1, b"ab")),
            deliver + header + pack_frame(SPEC, body_frame(1, b"abc")),
            deliver + header + header,
            frame(1, "basic.ack", 1, False)[:-1] + b"\x00",
            deliver[:3] + struct.pack("!I", len(deliver) - 9) + deliver[7:-2] + b"\xce",
        ):
            connection = Connection(True)
            connection.feed(stream, [])
            self.assertTrue(connection.transport.aborted, stream)
            self.assertEqual(connection.events.seen, [])

    def test_frame_over_frame_max_aborts(self) -> None:
        """A frame larger than the negotiated frame-max drops the connection, whole or in pieces."""
        big = pack_frame(SPEC, body_frame(1, b"x" * 5000))
        for cuts in ([], [3, 100, 4000]):
            connection = Connection(True)
            connection.feed(big, cuts)
            self.assertTrue(connection.transport.aborted)

    def test_frames_after_close_kept(self) -> None:
        """Once the connection is closing, the rest of a read is not handled."""
        connection = Connection(True)
        connection.feed(
            frame(1, "basic.ack", 1, False)
            + frame(0, "connection.close", 320, "CONNECTION_FORCED", 0, 0)
            + frame(1, "basic.ack", 2, False),
            [],
        )
        self.assertTrue(connection.transport.disconnecting)
        connection.feed(frame(1, "basic.ack", 3, False), [])
        self.assertEqual(connection.events.seen, [("ack", 1, 1, False)])

    def test_ack_is_one_write(self) -> None:
        """basic.ack, reject and nack each go out as one write of the generic codec's bytes."""
        fast = Connection(True)
        self.assertTrue(fast.client.send_method(1, "basic.ack", 5, False))
        self.assertTrue(fast.client.send_method(1, "basic.reject", 6, True))
        self.assertTrue(fast.client.send_method(1, "basic.nack", 7, True, False))
        self.assertEqual(fast.transport.writes, fast.writes + 3)
        self.assertEqual(
            fast.transport.value(),
            frame(1, "basic.ack", 5, False) + frame(1, "basic.reject", 6, True)
            + frame(1, "basic.nack", 7, True, False),
        )
        self.assertFalse(fast.client.send_method(3, "basic.ack", 5, False))

    def test_publish_one_write_same_bytes(self) -> None:
        """A publish is one write, the same bytes on both paths, split by the negotiated frame_max."""
        fast, generic = Connection(True), Connection(False)
        body = b"y" * 9000
        for connection in (fast, generic):
            self.assertTrue(
                connection.client.basic_publish(2, "amq.topic", "a.b", body, EVERY_PROPERTY)
            )
            self.assertEqual(connection.transport.writes, connection.writes + 1)
        self.assertEqual(fast.transport.value(), generic.transport.value())
        self.assertEqual(len(split_frames(fast.transport.value())), 5)

    def test_publish_encoded_properties(self) -> None:
        """Properties given encoded publish the bytes they publish given by name, on both paths."""
        by_name = Connection(True)
        by_name.client.basic_publish(2, "amq.topic", "a.b", b"{}", EVERY_PROPERTY)
        encoded = encode_properties(EVERY_PROPERTY)
        self.assertEqual(decode_properties(encoded), EVERY_PROPERTY)
        for fast in (True, False):
            connection = Connection(fast)
            self.assertTrue(connection.client.basic_publish(2, "amq.topic", "a.b", b"{}", encoded))
            self.assertEqual(connection.transport.value(), by_name.transport.value())

    def test_decode_properties_damaged(self) -> None:
        """Encoded properties cut short or running on are a FrameError."""
        encoded = encode_properties(EVERY_PROPERTY)
        for damaged in (b"", encoded[:1], encoded[:-1], encoded + b"x", encoded[:2] + b"\xff" + encoded[3:]):
            self.assertRaises(FrameError, decode_properties, damaged)

    def test_header_larger_than_a_frame_refused(self) -> None:
        """
        A content header is never split: one that does not fit in a frame
        of the negotiated frame_max is refused, on both paths, before
        anything is written (a broker would close the connection).
        """
        encoder = PublishEncoder(SPEC, 4096)
        # The header frame's payload: 14 bytes before the flags, 2 of flags,
        # then the table: 4 of length, the name (2), the type (1), 4 of
        # string length and the string: 25 bytes and the string.
        fits = {"headers": {"x": "a" * (4088 - 25)}}
        data = encoder.publish(1, "", "q", b"{}", fits)
        self.assertEqual(max(len(f) for f in split_frames(data)), 4096)
        too_big = {"headers": {"x": "a" * (4088 - 24)}}
        with self.assertRaises(FrameEncodeError) as raised:
            encoder.publish(1, "", "q", b"{}", too_big)
        self.assertIn("4097 bytes, more than the connection's frame_max of 4096", str(raised.exception))
        for fast in (True, False):
            connection = Connection(fast)
            self.assertRaises(
                FrameEncodeError, connection.client.basic_publish, 1, "", "q", b"{}",
                {"headers": {f"user_{i}": True for i in range(1000)}},
            )
            self.assertEqual(connection.transport.value(), b"")

    def test_publish_refused_writes_nothing(self) -> None:
        """An unencodable publish raises before anything is written."""
        fast = Connection(True)
        self.assertRaises(
            FrameEncodeError, fast.client.basic_publish, 1, "", "q" * 300, b"", {}
        )
        self.assertRaises(KeyError, fast.client.basic_publish, 1, "", "q", b"", {"colour": "red"})
        self.assertEqual(fast.transport.value(), b"")

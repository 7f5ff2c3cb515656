"""
Fast AMQP 0-9-1 frames for the hot paths: publishing, acknowledging, and the
messages and confirms the broker sends.

txamqp encodes and decodes every frame through a generic, field-by-field
codec and hands each incoming frame through a queue of Deferreds: about half
of the CPU a publish costs, and most of what a delivery costs.  This module
does the few frames that come once or more per message directly with
C{struct}:

  - L{PublishEncoder}: a C{basic.publish} method frame, its content header
    and its body frames as one C{bytes}, ready for a single write.  The
    method frame's constant prefix and short strings that repeat (exchange,
    content type) are encoded once and kept; the properties are encoded once
    per message, the C{headers} table with fedhub's field-table codec;
  - L{encode_ack}, L{encode_reject}, L{encode_nack}: the acknowledgements;
  - L{ContentDecoder}: C{basic.deliver}, C{basic.return}, C{basic.ack} and
    C{basic.nack} straight from the received bytes, with the content header
    and body frames that follow a delivery or return assembled into one
    L{Content}.

The results are exactly those of the generic path: the frames
L{PublishEncoder} writes are byte for byte what L{fedhub.amqp.codec.pack_frame}
produces for the same method and properties (except where txamqp's encoder
is wrong: it writes the length of a non-ASCII short string in characters, not
bytes; here it is in bytes), and the values L{ContentDecoder} gives are those
of L{fedhub.amqp.codec.unpack_frame} and txamqp's content reader (short
strings are C{str} when they are valid UTF-8, else C{bytes}).  The tests in
C{tests/test_amqp_frames.py} pin both.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, NamedTuple

from fedhub.amqp.codec import (
    BAD_LENGTH,
    FieldTableDecodeError,
    FrameEncodeError,
    FrameError,
    decode_table,
    encode_table,
)
from fedhub.amqp.spec import load_spec

FRAME_METHOD: Final = 1
"""The frame type of a method."""
FRAME_HEADER: Final = 2
"""The frame type of a content header."""
FRAME_BODY: Final = 3
"""The frame type of a content body."""
FRAME_HEARTBEAT: Final = 8
"""The frame type of a heartbeat."""
FRAME_END: Final = 0xCE
"""The octet that ends every frame."""

BASIC: Final = 60
"""The class id of C{basic}."""
PUBLISH: Final = 40
"""C{basic.publish}."""
RETURN: Final = 50
"""C{basic.return}."""
DELIVER: Final = 60
"""C{basic.deliver}."""
ACK: Final = 80
"""C{basic.ack}."""
REJECT: Final = 90
"""C{basic.reject}."""
NACK: Final = 120
"""C{basic.nack}."""

FRAME_OVERHEAD: Final = 8
"""Type, channel, size and the end octet around every payload."""

MAX_BODY_SIZE: Final = 512 * 1024 * 1024
"""
The largest message body a content header may announce: RabbitMQ refuses
larger messages whatever its C{max_message_size}, so a header announcing
more comes from a broken peer, and its body is never buffered.
"""

_HEAD = struct.Struct("!BHI")
_CLASS_METHOD = struct.Struct("!HH")
_HEADER_FIXED = struct.Struct("!HHQ")
_SHORT = struct.Struct("!H")
_LONG = struct.Struct("!I")
_LONGLONG = struct.Struct("!Q")
_OCTET = struct.Struct("!B")
# A whole basic.ack / basic.reject / basic.nack frame: header, class, method,
# delivery tag, bits, end.
_TAG_FRAME = struct.Struct("!BHIHHQBB")
_TAG_PAYLOAD_SIZE = 13
_DELIVER_TAIL = struct.Struct("!QB")
_RETURN_CODE = struct.Struct("!H")


# --- encoding ---------------------------------------------------------------------


def encode_shortstr(value: str | bytes, what: str = "short string") -> bytes:
    """
    A short string with its length octet; C{str} is sent as UTF-8.

    @raise FrameEncodeError: It is longer than 255 bytes or not a string.
    """
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise FrameEncodeError(what, "not encodable as UTF-8") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise FrameEncodeError(what, f"a short string, not {type(value).__name__}")
    if len(raw) > 255:
        raise FrameEncodeError(what, f"{len(raw)} bytes; a short string holds at most 255")
    return _OCTET.pack(len(raw)) + raw


def _fixed(packer: struct.Struct, what: str) -> Callable[[Any], bytes]:
    def encode(value: Any) -> bytes:
        try:
            return packer.pack(value)
        except struct.error as e:
            raise FrameEncodeError(what, str(e)) from None

    return encode


_INT32_MIN: Final = -(2**31)
_INT32_LIMIT: Final = 2**31
_INT64_MIN: Final = -(2**63)
_INT64_LIMIT: Final = 2**63
_CACHEABLE: Final = frozenset((str, bool, int, type(None)))
#: Header entries (and decoded tables) longer than this are not kept, so the
#: caches stay small whatever size of headers messages carry.
_CACHED_ENTRY_BYTES: Final = 1024
_CACHED_TABLE_BYTES: Final = 4096
_SIGNED_LONG = struct.Struct("!i")
_SIGNED_LONGLONG = struct.Struct("!q")
_DOUBLE = struct.Struct("!d")


def encode_headers(table: Mapping[str, Any], cache: dict[Any, bytes] | None = None) -> bytes:
    """
    A field table, length prefix included, exactly as
    L{fedhub.amqp.codec.encode_table} writes it.

    Tables of plain values (C{str}, C{bool}, C{int}, C{float}, C{None}) under
    C{str} keys, which is what message headers nearly always are, are
    written here in one pass; any other table (nested tables, arrays,
    L{fedhub.amqp.codec.FieldValue}s, bytes, times, subclasses, odd keys) is
    handed to L{fedhub.amqp.codec.encode_table}, which also raises its
    errors.

    @param cache: Encoded entries to reuse and to add to (the caller bounds
        its size); entries whose value is a C{str}, C{bool}, C{int} or
        C{None} are kept.
    @raise fedhub.amqp.codec.FieldTableEncodeError: The table can not be
        encoded.
    """
    parts: list[bytes] = []
    append = parts.append
    try:
        for key, value in table.items():
            if key.__class__ is not str:
                return encode_table(table)
            cls = value.__class__
            cacheable = cache is not None and cls in _CACHEABLE
            if cacheable:
                assert cache is not None
                # The class is part of the key: True == 1, yet they encode apart.
                entry = cache.get((key, cls, value))
                if entry is not None:
                    append(entry)
                    continue
            raw_key = key.encode("utf-8", "surrogateescape")
            if len(raw_key) > 255:
                return encode_table(table)
            if cls is str:
                raw = value.encode("utf-8")
                entry = b"".join((_OCTET.pack(len(raw_key)), raw_key, b"S", _LONG.pack(len(raw)), raw))
            elif cls is bool:
                entry = _OCTET.pack(len(raw_key)) + raw_key + (b"t\x01" if value else b"t\x00")
            elif cls is int:
                if _INT32_MIN <= value < _INT32_LIMIT:
                    entry = _OCTET.pack(len(raw_key)) + raw_key + b"I" + _SIGNED_LONG.pack(value)
                elif _INT64_MIN <= value < _INT64_LIMIT:
                    entry = _OCTET.pack(len(raw_key)) + raw_key + b"l" + _SIGNED_LONGLONG.pack(value)
                else:
                    return encode_table(table)
            elif value is None:
                entry = _OCTET.pack(len(raw_key)) + raw_key + b"V"
            elif cls is float:
                entry = _OCTET.pack(len(raw_key)) + raw_key + b"d" + _DOUBLE.pack(value)
            else:
                return encode_table(table)
            if cacheable and len(entry) <= _CACHED_ENTRY_BYTES:
                assert cache is not None
                cache[(key, cls, value)] = entry
            append(entry)
    except (UnicodeEncodeError, AttributeError):
        return encode_table(table)
    body = b"".join(parts)
    if len(body) > 0xFFFFFFFF:
        return encode_table(table)
    return _LONG.pack(len(body)) + body


def _property_encoder(domain: str, what: str) -> Callable[[Any], bytes]:
    if domain == "shortstr":
        return lambda value: encode_shortstr(value, what)
    if domain == "table":
        return encode_headers
    if domain == "octet":
        return _fixed(_OCTET, what)
    if domain == "short":
        return _fixed(_SHORT, what)
    if domain == "long":
        return _fixed(_LONG, what)
    if domain in ("longlong", "timestamp"):
        return _fixed(_LONGLONG, what)
    if domain == "longstr":

        def longstr(value: Any) -> bytes:
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            return _LONG.pack(len(raw)) + raw

        return longstr
    raise ValueError(f"no encoder for property type {domain!r}")


def python_name(name: str) -> str:
    """A spec name as Python spells it: C{content-type} is C{content_type}."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class Property:
    """
    One content property of a class, in the order of the specification.

    @ivar name: The Python name (C{content_type}).
    @ivar wire: The spec name (C{content-type}).
    @ivar domain: Its type (C{shortstr}, C{octet}, C{table}, C{timestamp}, ...).
    @ivar index: Its position, which decides its flag bit.
    """

    name: str
    wire: str
    domain: str
    index: int


def basic_properties(spec: Any) -> tuple[Property, ...]:
    """
    The properties of the C{basic} class as the specification lists them.
    """
    klass = spec.classes.byname["basic"]
    return tuple(
        Property(python_name(f.name), f.name, f.type, index) for index, f in enumerate(klass.fields)
    )


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return _HEAD.pack(frame_type, channel, len(payload)) + payload + b"\xce"


def check_header_size(payload_size: int, frame_max: int) -> None:
    """
    Refuse a content header of C{payload_size} bytes that does not fit in
    one frame of at most C{frame_max} bytes: a header is never split, and a
    broker answers a frame over its C{frame_max} by closing the connection.

    @raise FrameEncodeError: It does not fit.
    """
    if payload_size + FRAME_OVERHEAD > frame_max:
        raise FrameEncodeError(
            "properties",
            f"the content header takes {payload_size + FRAME_OVERHEAD} bytes, more than the "
            f"connection's frame_max of {frame_max} (too many or too large headers)",
        )


class PublishEncoder:
    """
    Encodes whole C{basic.publish} messages for one connection.

    @ivar frame_max: The negotiated largest frame, header and end included;
        bodies are split into frames of at most C{frame_max - 8} bytes.
    """

    CACHE_SIZE: Final = 1024
    """Pre-encoded method frames, and header entries, kept at most."""

    REPEATING: Final = frozenset(
        ("content_type", "content_encoding", "type", "user_id", "app_id", "reply_to")
    )
    """Short-string properties whose encodings are kept (their values repeat)."""

    def __init__(self, spec: Any, frame_max: int) -> None:
        self.frame_max = frame_max
        self._properties = basic_properties(spec)
        self._encoders: dict[str, Callable[[Any], bytes]] = {}
        self._bits: dict[str, int] = {}
        self._entries: dict[Any, bytes] = {}
        for prop in self._properties:
            encoder = _property_encoder(prop.domain, prop.name)
            if prop.name in self.REPEATING:
                encoder = self._cached_shortstr(encoder)
            elif prop.domain == "table":
                encoder = self._headers
            self._encoders[prop.name] = encoder
        self._order = [(p.name, p.index) for p in self._properties]
        self._methods: dict[tuple[int, str, str, bool, bool], bytes] = {}
        # For each set of property names given (a publisher gives the same
        # one every time): (name, flag bit, encoder) in the protocol's order.
        self._plans: dict[tuple[str, ...], tuple[tuple[str, int, Callable[[Any], bytes]], ...]] = {}

    def _headers(self, table: Mapping[str, Any]) -> bytes:
        """
        Encode a headers table, reusing the encodings of entries seen before.
        """
        if len(self._entries) >= self.CACHE_SIZE:
            self._entries.clear()
        return encode_headers(table, self._entries)

    def _cached_shortstr(self, encoder: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        """
        Remember the encodings of a property whose values repeat (a few
        dozen at most; the cache is emptied when it grows past that).
        """
        cache: dict[Any, bytes] = {}

        def encode(value: Any) -> bytes:
            try:
                return cache[value]
            except KeyError:
                pass
            except TypeError:
                return encoder(value)
            raw = encoder(value)
            if len(cache) >= 64:
                cache.clear()
            cache[value] = raw
            return raw

        return encode

    def method_frame(
        self, channel: int, exchange: str, routing_key: str, mandatory: bool, immediate: bool = False
    ) -> bytes:
        """
        The C{basic.publish} method frame (kept for the next message to the
        same place).

        @raise FrameEncodeError: The exchange or routing key is longer than
            255 bytes.
        """
        key = (channel, exchange, routing_key, bool(mandatory), bool(immediate))
        frame = self._methods.get(key)
        if frame is None:
            payload = b"".join(
                (
                    _CLASS_METHOD.pack(BASIC, PUBLISH),
                    b"\0\0",  # reserved-1 (ticket)
                    encode_shortstr(exchange, "exchange"),
                    encode_shortstr(routing_key, "routing_key"),
                    _OCTET.pack((1 if mandatory else 0) | (2 if immediate else 0)),
                )
            )
            frame = _frame(FRAME_METHOD, channel, payload)
            if len(self._methods) >= self.CACHE_SIZE:
                self._methods.clear()
            self._methods[key] = frame
        return frame

    def properties(self, properties: Mapping[str, Any]) -> tuple[int, bytes]:
        """
        The property flags and the encoded property list.

        C{None} values count as absent.

        @param properties: Values by Python name (C{content_type}, ...).
        @raise KeyError: A name is not a property of C{basic}.
        @raise FrameEncodeError: A value does not fit its property's type.
        @raise fedhub.amqp.codec.FieldTableEncodeError: The C{headers} table
            can not be encoded.
        """
        names = tuple(properties)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plan(names)
        flags = 0
        parts: list[bytes] = []
        for name, bit, encode in plan:
            value = properties[name]
            if value is None:
                continue
            flags |= bit
            parts.append(encode(value))
        return flags, b"".join(parts)

    def _plan(self, names: tuple[str, ...]) -> tuple[tuple[str, int, Callable[[Any], bytes]], ...]:
        """
        What L{properties} does for properties given under C{names}: kept.

        @raise KeyError: A name is not a property of C{basic}.
        """
        for name in names:
            if name not in self._encoders:
                raise KeyError(name)
        given = set(names)
        plan = tuple(
            (name, 1 << (15 - index), self._encoders[name])
            for name, index in self._order
            if name in given
        )
        if len(self._plans) >= self.CACHE_SIZE:
            self._plans.clear()
        self._plans[names] = plan
        return plan

    def property_bytes(self, properties: Mapping[str, Any]) -> bytes:
        """
        The properties as a content header carries them after its body
        size: the flag word, then the property list.  L{publish} takes
        them in this form too, so a message published more than once (or
        kept on disk) is encoded once.

        @raise KeyError: A name is not a property of C{basic}.
        @raise FrameEncodeError: A value does not fit its property's type.
        @raise fedhub.amqp.codec.FieldTableEncodeError: The C{headers} table
            can not be encoded.
        """
        if len(self._properties) > 15:  # pragma: no cover - not so in 0-9-1
            raise FrameEncodeError("properties", "more than one flag word")
        flags, encoded = self.properties(properties)
        return _SHORT.pack(flags) + encoded

    def publish(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Mapping[str, Any] | bytes,
        mandatory: bool = False,
        immediate: bool = False,
    ) -> bytes:
        """
        One message as wire bytes: the method frame, the content header and
        as many body frames as the body needs (none for an empty body).

        @param properties: Values by Python name, or already encoded (what
            L{property_bytes} returns).
        @raise KeyError: A property name is unknown.
        @raise FrameEncodeError: A name or property value can not be encoded,
            or the content header is larger than a frame (AMQP sends it in
            one, and a broker closes the connection on a larger frame).
        @raise fedhub.amqp.codec.FieldTableEncodeError: The headers can not be
            encoded.
        """
        if not isinstance(properties, bytes):
            properties = self.property_bytes(properties)
        size = len(body)
        header_payload = _HEADER_FIXED.pack(BASIC, 0, size) + properties
        check_header_size(len(header_payload), self.frame_max)
        parts: list[bytes | memoryview] = [
            self.method_frame(channel, exchange, routing_key, mandatory, immediate),
            _HEAD.pack(FRAME_HEADER, channel, len(header_payload)),
            header_payload,
            b"\xce",
        ]
        chunk = self.frame_max - FRAME_OVERHEAD
        if size <= chunk:
            if size:
                parts += (_HEAD.pack(FRAME_BODY, channel, size), body, b"\xce")
        else:
            view = memoryview(body)
            for start in range(0, size, chunk):
                piece = view[start : start + chunk]
                parts += (_HEAD.pack(FRAME_BODY, channel, len(piece)), piece, b"\xce")
        return b"".join(parts)


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """A C{basic.ack} frame."""
    return _TAG_FRAME.pack(
        FRAME_METHOD, channel, _TAG_PAYLOAD_SIZE, BASIC, ACK, delivery_tag, 1 if multiple else 0, FRAME_END
    )


def encode_reject(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """A C{basic.reject} frame."""
    return _TAG_FRAME.pack(
        FRAME_METHOD, channel, _TAG_PAYLOAD_SIZE, BASIC, REJECT, delivery_tag, 1 if requeue else 0, FRAME_END
    )


def encode_nack(channel: int, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> bytes:
    """A C{basic.nack} frame."""
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _TAG_FRAME.pack(
        FRAME_METHOD, channel, _TAG_PAYLOAD_SIZE, BASIC, NACK, delivery_tag, bits, FRAME_END
    )


# --- decoding ---------------------------------------------------------------------


def _shortstr_at(data: bytes, pos: int, end: int, channel: int) -> tuple[str | bytes, int]:
    """
    A short string at C{pos}: C{str} when it is valid UTF-8, else C{bytes}
    (as txamqp decodes it).
    """
    if pos >= end:
        raise FrameError("truncated", channel, "short string length missing")
    size = data[pos]
    stop = pos + 1 + size
    if stop > end:
        raise FrameError("truncated", channel, "short string runs past the frame")
    raw = data[pos + 1 : stop]
    try:
        return raw.decode("utf-8"), stop
    except UnicodeDecodeError:
        return raw, stop


_SIMPLE_INTS: Final = {
    ord("b"): struct.Struct("!b"),
    ord("B"): struct.Struct("!B"),
    ord("s"): struct.Struct("!h"),
    ord("u"): struct.Struct("!H"),
    ord("I"): struct.Struct("!i"),
    ord("i"): struct.Struct("!I"),
    ord("l"): struct.Struct("!q"),
    ord("L"): struct.Struct("!q"),
    ord("d"): struct.Struct("!d"),
    ord("f"): struct.Struct("!f"),
}
_IMMUTABLE: Final = frozenset((str, bytes, int, bool, float))
_S = ord("S")
_T_BOOL = ord("t")
_V = ord("V")
_X = ord("x")


def decode_headers(data: bytes, pos: int, end: int) -> dict[str, Any]:
    """
    The field table (length prefix included) that runs from C{pos} to exactly
    C{end} in C{data}, decoded as L{fedhub.amqp.codec.decode_table} decodes
    it (not in exact mode).

    Tables of numbers, booleans, strings, byte arrays and voids are read here
    in one pass; anything else (nested tables, arrays, timestamps, decimals,
    or anything malformed) is handed to L{fedhub.amqp.codec.decode_table},
    which also raises its errors.

    @raise FieldTableDecodeError: The table is malformed.
    """
    result: dict[str, Any] = {}
    (size,) = _LONG.unpack_from(data, pos)
    if pos + 4 + size != end:
        return _generic_table(data, pos, end)
    i = pos + 4
    while i < end:
        length = data[i]
        start = i + 1
        i = start + length
        if i >= end:
            return _generic_table(data, pos, end)
        key = data[start:i].decode("utf-8", "surrogateescape")
        letter = data[i]
        i += 1
        if letter == _S or letter == _X:
            if i + 4 > end:
                return _generic_table(data, pos, end)
            (length,) = _LONG.unpack_from(data, i)
            start = i + 4
            i = start + length
            if i > end:
                return _generic_table(data, pos, end)
            raw = data[start:i]
            if letter == _S:
                try:
                    result[key] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    result[key] = raw
            else:
                result[key] = raw
        elif letter == _T_BOOL:
            if i >= end:
                return _generic_table(data, pos, end)
            result[key] = data[i] != 0
            i += 1
        elif letter == _V:
            result[key] = None
        else:
            packer = _SIMPLE_INTS.get(letter)
            if packer is None or i + packer.size > end:
                return _generic_table(data, pos, end)
            (result[key],) = packer.unpack_from(data, i)
            i += packer.size
    return result


def _generic_table(data: bytes, pos: int, end: int) -> dict[str, Any]:
    table, stop = decode_table(data[pos:end])
    if stop != end - pos:
        raise FieldTableDecodeError(BAD_LENGTH, stop, "bytes left after the table")
    return table


def _check_end(pos: int, end: int, channel: int) -> None:
    if pos != end:
        raise FrameError("bad-length", channel, f"{end - pos} bytes left after the last field")


class Deliver(NamedTuple):
    """
    The fields of a C{basic.deliver} method.
    """

    consumer_tag: str | bytes
    delivery_tag: int
    redelivered: bool
    exchange: str | bytes
    routing_key: str | bytes


class Return(NamedTuple):
    """
    The fields of a C{basic.return} method.
    """

    reply_code: int
    reply_text: str | bytes
    exchange: str | bytes
    routing_key: str | bytes


def decode_deliver(data: bytes, pos: int, end: int, channel: int) -> Deliver:
    """
    The arguments of a C{basic.deliver} whose arguments run from C{pos} (after
    the class and method ids) to C{end} (before the frame end).

    @raise FrameError: They are truncated or followed by stray bytes.
    """
    consumer_tag, pos = _shortstr_at(data, pos, end, channel)
    if pos + 9 > end:
        raise FrameError("truncated", channel, "basic.deliver ends early")
    delivery_tag, bits = _DELIVER_TAIL.unpack_from(data, pos)
    exchange, pos = _shortstr_at(data, pos + 9, end, channel)
    routing_key, pos = _shortstr_at(data, pos, end, channel)
    _check_end(pos, end, channel)
    return Deliver(consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)


def decode_return(data: bytes, pos: int, end: int, channel: int) -> Return:
    """
    The arguments of a C{basic.return}.

    @raise FrameError: They are truncated or followed by stray bytes.
    """
    if pos + 2 > end:
        raise FrameError("truncated", channel, "basic.return ends early")
    (reply_code,) = _RETURN_CODE.unpack_from(data, pos)
    reply_text, pos = _shortstr_at(data, pos + 2, end, channel)
    exchange, pos = _shortstr_at(data, pos, end, channel)
    routing_key, pos = _shortstr_at(data, pos, end, channel)
    _check_end(pos, end, channel)
    return Return(reply_code, reply_text, exchange, routing_key)


def decode_tag_bits(data: bytes, pos: int, end: int, channel: int) -> tuple[int, int]:
    """
    The delivery tag and the bits octet of a C{basic.ack} or C{basic.nack}.

    @raise FrameError: They are truncated or followed by stray bytes.
    """
    if pos + 9 > end:
        raise FrameError("truncated", channel, "acknowledgement ends early")
    _check_end(pos + 9, end, channel)
    tag, bits = _DELIVER_TAIL.unpack_from(data, pos)
    return tag, bits


_SHORTSTR, _OCTET_KIND, _TABLE, _LONGLONG_KIND = range(4)
_KINDS: Final = {
    "shortstr": _SHORTSTR,
    "octet": _OCTET_KIND,
    "table": _TABLE,
    "timestamp": _LONGLONG_KIND,
    "longlong": _LONGLONG_KIND,
}


class HeaderDecoder:
    """
    Decodes C{basic} content headers to properties by Python name.

    Which properties a header carries is decided by its flag word; the
    list of (name, type) to read for a flag word is worked out once and
    kept.  Header tables seen recently are kept decoded, keyed by their
    bytes (a publisher's headers repeat from message to message).
    """

    PLANS: Final = 256
    """Flag words whose reading plan is kept, at most."""

    TABLES: Final = 256
    """Decoded header tables kept, at most."""

    def __init__(self, spec: Any) -> None:
        self._properties = basic_properties(spec)
        for prop in self._properties:
            if prop.domain not in _KINDS:  # pragma: no cover - not so in 0-9-1
                raise ValueError(f"no decoder for property type {prop.domain!r}")
        self._plans: dict[tuple[int, int], tuple[tuple[str, int], ...]] = {}
        self._tables: dict[bytes, dict[str, Any]] = {}

    def _plan(self, flags: int, words: int) -> tuple[tuple[str, int], ...]:
        key = (flags, words)
        plan = self._plans.get(key)
        if plan is None:
            top = 15 * words - 1
            plan = tuple(
                (prop.name, _KINDS[prop.domain])
                for prop in self._properties
                if prop.index <= top and flags >> (top - prop.index) & 1
            )
            if len(self._plans) >= self.PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _table(self, data: bytes, pos: int, end: int, channel: int) -> dict[str, Any]:
        raw = data[pos:end]
        known = self._tables.get(raw)
        if known is not None:
            return dict(known)
        try:
            table = decode_headers(data, pos, end)
        except FieldTableDecodeError as exc:
            raise FrameError("bad-table", channel, str(exc)) from exc
        # Only tables of immutable values are kept, so a copy of the
        # outer dictionary is a fresh, independent table.
        if len(raw) <= _CACHED_TABLE_BYTES and all(
            value is None or value.__class__ in _IMMUTABLE for value in table.values()
        ):
            if len(self._tables) >= self.TABLES:
                self._tables.clear()
            self._tables[raw] = table
            return dict(table)
        return table

    def decode(self, data: bytes, pos: int, end: int, channel: int) -> tuple[int, dict[str, Any]]:
        """
        The body size and the properties of a content header payload
        running from C{pos} to C{end}.

        @raise FrameError: The header is not C{basic}'s, has content
            children, or is truncated or malformed.
        """
        if pos + 14 > end:
            raise FrameError("truncated", channel, "content header ends early")
        class_id, weight, size = _HEADER_FIXED.unpack_from(data, pos)
        if class_id != BASIC:
            raise FrameError("unknown-class", channel, f"content class {class_id}")
        if weight != 0:
            raise FrameError("bad-length", channel, f"content weight {weight}")
        return size, self.properties(data, pos + 12, end, channel)

    def properties(self, data: bytes, pos: int, end: int, channel: int = 0) -> dict[str, Any]:
        """
        The properties of a content header: its flag words and property
        list, running from C{pos} to C{end} (what
        L{PublishEncoder.property_bytes} writes).

        @raise FrameError: They are truncated or malformed.
        """
        # Up to 15 property bits per flag word, high bit first; the lowest
        # bit says another word follows.
        flags = 0
        words = 0
        while True:
            if pos + 2 > end:
                raise FrameError("truncated", channel, "property flags end early")
            (word,) = _SHORT.unpack_from(data, pos)
            pos += 2
            flags = (flags << 15) | (word >> 1)
            words += 1
            if not word & 1:
                break
        properties: dict[str, Any] = {}
        for name, kind in self._plan(flags, words):
            if kind == _SHORTSTR:
                properties[name], pos = _shortstr_at(data, pos, end, channel)
            elif kind == _TABLE:
                if pos + 4 > end:
                    raise FrameError("truncated", channel, "headers table length missing")
                (table_size,) = _LONG.unpack_from(data, pos)
                stop = pos + 4 + table_size
                if stop > end:
                    raise FrameError("truncated", channel, "headers table runs past the frame")
                properties[name] = self._table(data, pos, stop, channel)
                pos = stop
            elif kind == _OCTET_KIND:
                if pos + 1 > end:
                    raise FrameError("truncated", channel, f"{name} missing")
                properties[name] = data[pos]
                pos += 1
            else:
                if pos + 8 > end:
                    raise FrameError("truncated", channel, f"{name} missing")
                (properties[name],) = _LONGLONG.unpack_from(data, pos)
                pos += 8
        _check_end(pos, end, channel)
        return properties


@lru_cache(maxsize=1)
def _basic() -> tuple[PublishEncoder, HeaderDecoder]:
    spec = load_spec()
    return PublishEncoder(spec, 4096), HeaderDecoder(spec)


def encode_properties(properties: Mapping[str, Any]) -> bytes:
    """
    C{basic} properties encoded as a content header carries them (see
    L{PublishEncoder.property_bytes}), outside any connection: every
    connection speaks the same AMQP 0-9-1.

    @param properties: Values by Python name; C{None} counts as absent.
    @raise KeyError: A name is not a property of C{basic}.
    @raise FrameEncodeError: A value does not fit its property's type.
    @raise fedhub.amqp.codec.FieldTableEncodeError: The C{headers} table
        can not be encoded.
    """
    return _basic()[0].property_bytes(properties)


def decode_properties(data: bytes) -> dict[str, Any]:
    """
    C{basic} properties by Python name from what L{encode_properties}
    wrote.

    @raise FrameError: C{data} is truncated or malformed.
    """
    return _basic()[1].properties(data, 0, len(data))


class Content:
    """
    A message arriving in frames: the method that announced it, then its
    header, then its body.

    @ivar channel: The channel it arrives on.
    @ivar method: L{Deliver} or L{Return}.
    @ivar target: The channel object it is for, or C{None} to drop it.
    @ivar size: The body size the header announced (C{-1} before the header).
    @ivar properties: The properties by Python name, once the header came.
    @ivar chunks: The body frames so far.
    @ivar received: Their total size.
    """

    __slots__ = ("channel", "method", "target", "size", "properties", "chunks", "received")

    def __init__(self, channel: int, method: Deliver | Return, target: Any) -> None:
        self.channel = channel
        self.method = method
        self.target = target
        self.size = -1
        self.properties: dict[str, Any] = {}
        self.chunks: list[bytes] = []
        self.received = 0

    @property
    def body(self) -> bytes:
        """The body, all frames joined."""
        if len(self.chunks) == 1:
            return self.chunks[0]
        return b"".join(self.chunks)


class ContentDecoder:
    """
    Assembles C{basic.deliver} and C{basic.return} messages from their
    method, header and body frames, one per channel at a time.

    The caller feeds it whole frames (L{method}, L{header}, L{body}); a
    message is complete when L{header} or L{body} returns it.
    """

    def __init__(self, spec: Any) -> None:
        self._headers = HeaderDecoder(spec)
        self.pending: dict[int, Content] = {}

    def method(self, channel: int, method: Deliver | Return, target: Any) -> None:
        """
        A content-bearing method arrived: its header and body follow.

        @param target: Whatever the message is for (given back with it), or
            C{None} to drop it once complete.
        @raise FrameError: The channel is still in the middle of a message.
        """
        if channel in self.pending:
            raise FrameError("unexpected-frame", channel, "a method in the middle of a message")
        self.pending[channel] = Content(channel, method, target)

    def expects(self, channel: int) -> bool:
        """Whether a message on C{channel} waits for its header or body."""
        return channel in self.pending

    def header(self, data: bytes, pos: int, end: int, channel: int) -> Content | None:
        """
        The content header of the message on C{channel}.

        @return: The message when its body is empty, else C{None}.
        @raise FrameError: No header was expected, it is malformed, or it
            announces a body larger than L{MAX_BODY_SIZE}.
        """
        content = self.pending[channel]
        if content.size != -1:
            raise FrameError("unexpected-frame", channel, "a second content header")
        size, properties = self._headers.decode(data, pos, end, channel)
        if size > MAX_BODY_SIZE:
            raise FrameError(
                "bad-length", channel, f"body of {size} bytes announced, at most {MAX_BODY_SIZE} allowed"
            )
        content.size, content.properties = size, properties
        if content.size == 0:
            del self.pending[channel]
            content.chunks.append(b"")
            return content
        return None

    def body(self, data: bytes, pos: int, end: int, channel: int) -> Content | None:
        """
        A body frame of the message on C{channel}.

        @return: The message when this was its last body frame, else C{None}.
        @raise FrameError: No body was expected, or it runs past the size the
            header announced.
        """
        content = self.pending[channel]
        if content.size == -1:
            raise FrameError("unexpected-frame", channel, "a body frame before the content header")
        content.received += end - pos
        if content.received > content.size:
            raise FrameError(
                "bad-length", channel, f"body of {content.received} bytes, {content.size} announced"
            )
        content.chunks.append(data[pos:end])
        if content.received == content.size:
            del self.pending[channel]
            return content
        return None

    def forget(self, channel: int) -> None:
        """Drop a half-received message (its channel is gone)."""
        self.pending.pop(channel, None)

    def clear(self) -> None:
        """Drop every half-received message."""
        self.pending.clear()

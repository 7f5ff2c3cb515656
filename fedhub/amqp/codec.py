"""
AMQP 0-9-1 field tables as RabbitMQ encodes them, and frames that use them.

Field tables carry message headers, queue and exchange arguments and the
peer properties of the connection handshake.  txamqp's own codec knows only
four value types and raises on the rest, so RabbitMQ's C{x-death} header
(arrays of tables holding timestamps and 64-bit integers) breaks it.  This
module is the complete codec, with RabbitMQ's type letters (which differ from
the 0-9-1 specification's table in places):

    =====  ==========================  ========================
    letter wire value                  Python value
    =====  ==========================  ========================
    t      octet, non-zero is true     C{bool}
    b / B  signed / unsigned 8 bits    C{int}
    s / u  signed / unsigned 16 bits   C{int}
    I / i  signed / unsigned 32 bits   C{int}
    l / L  signed 64 bits              C{int}
    f / d  IEEE 754 single / double    C{float}
    D      scale octet + uint32        C{decimal.Decimal}
    S      long string                 C{str} (C{bytes} if not UTF-8)
    x      long byte array             C{bytes}
    A      array of typed values       C{list}
    T      uint64 seconds since epoch  aware UTC C{datetime}
    F      nested field table          C{dict}
    V      nothing                     C{None}
    =====  ==========================  ========================

Encoding picks the letter from the Python type: C{bool} C{t}; C{int} C{I} when
it fits in signed 32 bits, else C{l}; C{float} C{d}; C{Decimal} C{D}; C{str}
C{S} (UTF-8); C{bytes}, C{bytearray} and C{memoryview} C{x}; C{list} and
C{tuple} C{A}; any mapping C{F}; C{None} C{V}; an aware C{datetime} C{T}.
A L{FieldValue} forces a letter, so a value can be sent exactly as another
peer expects it.  Decoding with C{exact=True} returns L{FieldValue}s wherever
the plain Python value would re-encode differently, so that a decoded table
encodes back to the very same bytes (for forwarding messages untouched).

Nesting of tables and arrays is capped at L{MAX_DEPTH} levels in both
directions: a table that came off the network must not exhaust the stack, and
a mapping that contains itself must fail cleanly.

L{FieldTableCodec} plugs this codec into txamqp, and L{pack_frame},
L{unpack_frame} and L{FieldTableFrameMixin} give txamqp's protocol a frame
path that uses it for method arguments and content-header properties;
L{FieldTableClient} is txamqp's client with that mixin applied.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from io import BytesIO
from typing import Any, Final

from txamqp.codec import EOF as _TxEOF
from txamqp.codec import Codec as _TxCodec
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.protocol import AMQClient as _TxAMQClient

from fedhub.errors import FedhubError

MAX_DEPTH: Final = 64
"""How many tables and arrays may nest, the outermost table counting as one."""

# Reasons carried by FieldTableError.reason.
TRUNCATED: Final = "truncated"
"""The input ends before the table it announces."""
BAD_LENGTH: Final = "bad-length"
"""A length or a fixed-width value overruns the table or array holding it."""
UNKNOWN_TYPE: Final = "unknown-type"
"""A value carries a type letter that RabbitMQ does not define."""
TOO_DEEP: Final = "too-deep"
"""Tables and arrays nest deeper than L{MAX_DEPTH}."""
UNSUPPORTED_TYPE: Final = "unsupported-type"
"""A Python value has no field-table representation."""
OUT_OF_RANGE: Final = "out-of-range"
"""A number, length or instant does not fit the wire type chosen for it."""
BAD_VALUE: Final = "bad-value"
"""A value is of the right Python type but can not be encoded (naive datetime, bad key)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)

_INT_RANGES: Final[dict[str, tuple[str, int, int]]] = {
    "b": ("!b", -(2**7), 2**7 - 1),
    "B": ("!B", 0, 2**8 - 1),
    "s": ("!h", -(2**15), 2**15 - 1),
    "u": ("!H", 0, 2**16 - 1),
    "I": ("!i", -(2**31), 2**31 - 1),
    "i": ("!I", 0, 2**32 - 1),
    "l": ("!q", -(2**63), 2**63 - 1),
    "L": ("!q", -(2**63), 2**63 - 1),
}

_UINT32_MAX: Final = 2**32 - 1
_UINT64_MAX: Final = 2**64 - 1

TYPE_LETTERS: Final = frozenset("tbBsuIilLfdDSxATFV")
"""Every type letter this codec reads and writes."""


class FieldTableError(FedhubError):
    """
    A field table could not be encoded or decoded.

    @ivar reason: One of the module's reason constants (L{TRUNCATED},
        L{BAD_LENGTH}, L{UNKNOWN_TYPE}, L{TOO_DEEP}, L{UNSUPPORTED_TYPE},
        L{OUT_OF_RANGE}, L{BAD_VALUE}).
    @ivar offset: The byte offset where the problem is: into the input when
        decoding, into the output built so far when encoding.
    @ivar detail: A human-readable explanation.
    """

    def __init__(self, reason: str, offset: int, detail: str = "") -> None:
        self.reason = reason
        self.offset = offset
        self.detail = detail
        text = f"field table {reason} at byte {offset}"
        super().__init__(f"{text}: {detail}" if detail else text)


class FieldTableDecodeError(FieldTableError):
    """
    Bytes that claim to be a field table are malformed.
    """


class FieldTableEncodeError(FieldTableError):
    """
    A Python value can not be written as a field table.

    @ivar path: Where the value sits, for example C{x-death[0].count}.
    """

    def __init__(self, reason: str, offset: int, path: str, detail: str = "") -> None:
        self.path = path
        super().__init__(reason, offset, f"{path or '<table>'}: {detail}")


class FrameEncodeError(FedhubError, ValueError):
    """
    A value can not be put in a frame (for example a short string longer
    than 255 bytes, or a property of the wrong type).

    @ivar field: The method field or property concerned.
    @ivar detail: What is wrong with it.
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}")


class FrameError(FedhubError):
    """
    An AMQP frame could not be decoded.

    @ivar reason: C{"truncated"}, C{"bad-length"}, C{"bad-frame-end"},
        C{"unknown-frame-type"}, C{"unknown-method"}, C{"unknown-class"} or
        C{"bad-table"}.
    @ivar channel: The channel the frame was for, when it could be read.
    @ivar detail: A human-readable explanation.
    """

    def __init__(self, reason: str, channel: int | None = None, detail: str = "") -> None:
        self.reason = reason
        self.channel = channel
        self.detail = detail
        where = f" on channel {channel}" if channel is not None else ""
        text = f"bad AMQP frame{where}: {reason}"
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass(frozen=True)
class FieldValue:
    """
    A field-table value with an explicit type letter.

    Use it to send a value in a wire type other than the one fedhub would
    pick, e.g. C{FieldValue("l", 1)} for a 64-bit integer or
    C{FieldValue("f", 0.5)} for a single-precision float.  Decoding with
    C{exact=True} produces these for values whose plain Python form would not
    encode back to the same bytes.

    @ivar type: One of L{TYPE_LETTERS}.
    @ivar value: The value; its Python type must suit the letter.
    """

    type: str
    value: Any

    def __post_init__(self) -> None:
        if self.type not in TYPE_LETTERS:
            raise ValueError(f"unknown field type letter {self.type!r}")


# --- encoding -------------------------------------------------------------


def encode_table(table: Mapping[str, Any]) -> bytes:
    """
    Encode a mapping as an AMQP field table, length prefix included.

    @param table: Keys are C{str} of at most 255 UTF-8 bytes; values as in
        the module table, or L{FieldValue}s.
    @return: The wire bytes: a 32-bit length, then the fields.
    @raise FieldTableEncodeError: A key or value can not be represented.
    """
    out = bytearray()
    _put_table(out, table, 1, "")
    return bytes(out)


def encode_value(value: Any) -> bytes:
    """
    Encode one value as it appears inside a table or array: type letter, then data.

    @raise FieldTableEncodeError: The value can not be represented.
    """
    out = bytearray()
    _put_value(out, value, 1, "")
    return bytes(out)


def _fail(reason: str, out: bytearray, path: str, detail: str) -> FieldTableEncodeError:
    return FieldTableEncodeError(reason, len(out), path, detail)


def _put_table(out: bytearray, table: Mapping[Any, Any], depth: int, path: str) -> None:
    if depth > MAX_DEPTH:
        raise _fail(TOO_DEEP, out, path, f"nesting deeper than {MAX_DEPTH}")
    start = len(out)
    out += b"\0\0\0\0"
    for key, value in table.items():
        if not isinstance(key, str):
            raise _fail(BAD_VALUE, out, path, f"field name {key!r} is not a str")
        subpath = f"{path}.{key}" if path else key
        try:
            raw = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise _fail(BAD_VALUE, out, subpath, "field name is not encodable as UTF-8") from None
        if len(raw) > 255:
            raise _fail(BAD_VALUE, out, subpath, "field name longer than 255 bytes")
        out.append(len(raw))
        out += raw
        _put_value(out, value, depth, subpath)
    _patch_length(out, start, path)


def _put_array(out: bytearray, items: Sequence[Any], depth: int, path: str) -> None:
    if depth > MAX_DEPTH:
        raise _fail(TOO_DEEP, out, path, f"nesting deeper than {MAX_DEPTH}")
    start = len(out)
    out += b"\0\0\0\0"
    for index, item in enumerate(items):
        _put_value(out, item, depth, f"{path}[{index}]")
    _patch_length(out, start, path)


def _patch_length(out: bytearray, start: int, path: str) -> None:
    size = len(out) - start - 4
    if size > _UINT32_MAX:
        raise FieldTableEncodeError(BAD_LENGTH, start, path, "longer than 4 GiB")
    struct.pack_into("!I", out, start, size)


def _letter_for(value: Any) -> str | None:
    # bool before int: bool is a subclass of int.
    if value is None:
        return "V"
    if isinstance(value, bool):
        return "t"
    if isinstance(value, int):
        return "I" if -(2**31) <= value < 2**31 else "l"
    if isinstance(value, float):
        return "d"
    if isinstance(value, Decimal):
        return "D"
    if isinstance(value, str):
        return "S"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x"
    if isinstance(value, datetime):
        return "T"
    if isinstance(value, Mapping):
        return "F"
    if isinstance(value, (list, tuple)):
        return "A"
    return None


class _Misfit(Exception):
    """
    Raised by the value writers for a value that does not suit its letter;
    L{_put_value} turns it into a L{FieldTableEncodeError} at the value's offset.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _put_value(out: bytearray, value: Any, depth: int, path: str) -> None:
    if isinstance(value, FieldValue):
        letter, value = value.type, value.value
    else:
        found = _letter_for(value)
        if found is None:
            raise _fail(UNSUPPORTED_TYPE, out, path, f"no field type for {type(value).__name__}")
        letter = found
    mark = len(out)
    out += letter.encode("ascii")
    try:
        _put_typed(out, letter, value, depth, path)
    except _Misfit as exc:
        del out[mark:]
        raise _fail(exc.reason, out, path, exc.detail) from None


def _put_typed(out: bytearray, letter: str, value: Any, depth: int, path: str) -> None:
    if letter in _INT_RANGES:
        fmt, low, high = _INT_RANGES[letter]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Misfit(BAD_VALUE, f"type {letter!r} needs an int, not {type(value).__name__}")
        if not low <= value <= high:
            raise _Misfit(OUT_OF_RANGE, f"{value} outside [{low}, {high}] of type {letter!r}")
        out += struct.pack(fmt, value)
    elif letter == "t":
        # An int is allowed so that exact decoding of a non-canonical
        # boolean octet can be written back unchanged.
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise _Misfit(BAD_VALUE, f"type 't' needs a bool, not {value!r}")
        out.append(int(value))
    elif letter in "df":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Misfit(BAD_VALUE, f"type {letter!r} needs a float, not {type(value).__name__}")
        try:
            out += struct.pack("!" + letter, float(value))
        except OverflowError:
            raise _Misfit(OUT_OF_RANGE, f"{value} too large for type {letter!r}") from None
    elif letter == "D":
        _put_decimal(out, value)
    elif letter == "S":
        if isinstance(value, str):
            try:
                raw = value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Misfit(BAD_VALUE, "string holds lone surrogates") from None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        else:
            raise _Misfit(BAD_VALUE, f"type 'S' needs a str, not {type(value).__name__}")
        _put_long_bytes(out, raw)
    elif letter == "x":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _Misfit(BAD_VALUE, f"type 'x' needs bytes, not {type(value).__name__}")
        _put_long_bytes(out, bytes(value))
    elif letter == "T":
        _put_timestamp(out, value)
    elif letter == "F":
        if not isinstance(value, Mapping):
            raise _Misfit(BAD_VALUE, f"type 'F' needs a mapping, not {type(value).__name__}")
        _put_table(out, value, depth + 1, path)
    elif letter == "A":
        if not isinstance(value, (list, tuple)):
            raise _Misfit(BAD_VALUE, f"type 'A' needs a list, not {type(value).__name__}")
        _put_array(out, value, depth + 1, path)
    elif value is not None:  # "V"
        raise _Misfit(BAD_VALUE, f"type 'V' holds only None, not {value!r}")


def _put_long_bytes(out: bytearray, raw: bytes) -> None:
    if len(raw) > _UINT32_MAX:
        raise _Misfit(OUT_OF_RANGE, "longer than 4 GiB")
    out += struct.pack("!I", len(raw))
    out += raw


def _put_decimal(out: bytearray, value: Any) -> None:
    if not isinstance(value, Decimal):
        raise _Misfit(BAD_VALUE, f"type 'D' needs a Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise _Misfit(OUT_OF_RANGE, f"{value} is not finite")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    unscaled = int("".join(map(str, digits)) or "0")
    if exponent > 0:
        unscaled *= 10**exponent
        exponent = 0
    if sign and unscaled:
        # RabbitMQ (and the specification) read the unscaled value unsigned.
        raise _Misfit(OUT_OF_RANGE, f"{value} is negative")
    if -exponent > 255:
        raise _Misfit(OUT_OF_RANGE, f"{value} has more than 255 decimal places")
    if unscaled > _UINT32_MAX:
        raise _Misfit(OUT_OF_RANGE, f"{value} has more than 32 bits of digits")
    out += struct.pack("!BI", -exponent, unscaled)


def _put_timestamp(out: bytearray, value: Any) -> None:
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise _Misfit(BAD_VALUE, "a naive datetime is ambiguous; give it a timezone")
        delta = value - _EPOCH
        # Whole seconds, rounded down: the wire has no sub-second part.
        seconds = delta.days * 86400 + delta.seconds
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        raise _Misfit(BAD_VALUE, f"type 'T' needs an aware datetime, not {type(value).__name__}")
    if not 0 <= seconds <= _UINT64_MAX:
        raise _Misfit(OUT_OF_RANGE, "instant before 1970 or past 64 bits")
    out += struct.pack("!Q", seconds)


# --- decoding -------------------------------------------------------------


def decode_table(
    data: bytes | bytearray | memoryview, offset: int = 0, *, exact: bool = False
) -> tuple[dict[str, Any], int]:
    """
    Decode the field table that starts at C{offset} in C{data}.

    Long strings become C{str} when they are valid UTF-8 and stay C{bytes}
    otherwise.  Field names that are not valid UTF-8 are decoded with the
    C{surrogateescape} handler (and encode back to the same bytes).  Of
    repeated field names the last one wins.  A timestamp past the year 9999
    decodes to C{FieldValue("T", seconds)}.

    @param data: The buffer holding the table; it is not copied.
    @param offset: Where the table's 32-bit length starts.
    @param exact: Return L{FieldValue}s for values that would not encode back
        to the same bytes (e.g. C{b}, C{u}, C{f}, a C{l} that fits in 32
        bits, a C{S} that is not UTF-8).
    @return: The table, and the offset just past it.
    @raise FieldTableDecodeError: The bytes are not a well-formed table.
    """
    view = memoryview(data).cast("B")
    if offset < 0 or offset + 4 > len(view):
        raise FieldTableDecodeError(TRUNCATED, offset, "no room for the table length")
    (size,) = struct.unpack_from("!I", view, offset)
    end = offset + 4 + size
    if end > len(view):
        raise FieldTableDecodeError(
            TRUNCATED, offset, f"table of {size} bytes, only {len(view) - offset - 4} present"
        )
    return _Reader(view, exact).table(offset + 4, end, 1), end


class _Reader:
    """
    Decodes values from one buffer; every read is bounded by the end of the
    table or array that holds it.
    """

    def __init__(self, view: memoryview, exact: bool) -> None:
        self.view = view
        self.exact = exact

    def _need(self, pos: int, count: int, end: int, what: str) -> None:
        if pos + count > end:
            raise FieldTableDecodeError(
                BAD_LENGTH, pos, f"{what} of {count} bytes runs past its container"
            )

    def _fixed(self, fmt: str, pos: int, end: int, what: str) -> tuple[Any, int]:
        size = struct.calcsize(fmt)
        self._need(pos, size, end, what)
        return struct.unpack_from(fmt, self.view, pos)[0], pos + size

    def _long_bytes(self, pos: int, end: int, what: str) -> tuple[bytes, int]:
        length, pos = self._fixed("!I", pos, end, f"{what} length")
        self._need(pos, length, end, what)
        return bytes(self.view[pos : pos + length]), pos + length

    def _container(self, pos: int, end: int, depth: int, what: str) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise FieldTableDecodeError(TOO_DEEP, pos, f"nesting deeper than {MAX_DEPTH}")
        length, pos = self._fixed("!I", pos, end, f"{what} length")
        self._need(pos, length, end, what)
        return pos, pos + length

    def table(self, pos: int, end: int, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while pos < end:
            length, pos = self._fixed("!B", pos, end, "field name length")
            self._need(pos, length, end, "field name")
            key = bytes(self.view[pos : pos + length]).decode("utf-8", "surrogateescape")
            pos += length
            result[key], pos = self.value(pos, end, depth)
        return result

    def array(self, pos: int, end: int, depth: int) -> list[Any]:
        result: list[Any] = []
        while pos < end:
            item, pos = self.value(pos, end, depth)
            result.append(item)
        return result

    def value(self, pos: int, end: int, depth: int) -> tuple[Any, int]:
        self._need(pos, 1, end, "type letter")
        letter = chr(self.view[pos])
        start = pos
        pos += 1
        if letter in _INT_RANGES:
            number, pos = self._fixed(_INT_RANGES[letter][0], pos, end, f"{letter!r} value")
            if letter == "I" or (letter == "l" and not -(2**31) <= number < 2**31):
                return number, pos
            return self._wrap(letter, number), pos
        if letter == "S":
            raw, pos = self._long_bytes(pos, end, "long string")
            try:
                return raw.decode("utf-8"), pos
            except UnicodeDecodeError:
                return self._wrap("S", raw, raw), pos
        if letter == "F":
            inner, pos = self._container(pos, end, depth + 1, "table")
            return self.table(inner, pos, depth + 1), pos
        if letter == "A":
            inner, pos = self._container(pos, end, depth + 1, "array")
            return self.array(inner, pos, depth + 1), pos
        if letter == "T":
            seconds, pos = self._fixed("!Q", pos, end, "timestamp")
            try:
                return _EPOCH + timedelta(seconds=seconds), pos
            except OverflowError:
                return FieldValue("T", seconds), pos
        if letter == "t":
            octet, pos = self._fixed("!B", pos, end, "boolean")
            if octet > 1:
                return self._wrap("t", octet, True), pos
            return octet == 1, pos
        if letter == "d":
            return self._fixed("!d", pos, end, "double")
        if letter == "f":
            single, pos = self._fixed("!f", pos, end, "float")
            return self._wrap("f", single), pos
        if letter == "D":
            self._need(pos, 5, end, "decimal")
            scale, unscaled = struct.unpack_from("!BI", self.view, pos)
            digits = tuple(int(c) for c in str(unscaled))
            return Decimal((0, digits, -scale)), pos + 5
        if letter == "x":
            return self._long_bytes(pos, end, "byte array")
        if letter == "V":
            return None, pos
        raise FieldTableDecodeError(UNKNOWN_TYPE, start, f"type letter {letter!r}")

    def _wrap(self, letter: str, wire: Any, plain: Any = None) -> Any:
        """
        Return the wire value tagged with its letter in exact mode, the plain
        Python value (the wire value itself unless given) otherwise.
        """
        if self.exact:
            return FieldValue(letter, wire)
        return wire if plain is None else plain


# --- txamqp integration ---------------------------------------------------


class FieldTableCodec(_TxCodec):  # type: ignore[misc]
    """
    txamqp's codec with fedhub's complete field tables.

    C{encode_table} and C{decode_table} use this module's codec, and C{read}
    raises txamqp's C{EOF} on a short read (txamqp's returns the short data,
    so a truncated string went unnoticed).  Everything else is txamqp's.

    @ivar exact: Decode tables as L{decode_table} does with C{exact=True}.
    """

    def __init__(self, stream: Any, exact: bool = False) -> None:
        super().__init__(stream)
        self.exact = exact

    def read(self, n: int) -> bytes:
        """
        Read exactly C{n} bytes.

        @raise txamqp.codec.EOF: Fewer than C{n} bytes are left.
        """
        data: bytes = super().read(n)
        if len(data) < n:
            raise _TxEOF(f"wanted {n} bytes, {len(data)} left")
        return data

    def enc_str(self, fmt: str, s: str | bytes) -> None:
        """
        Write a short (C{fmt} C{"!B"}) or long (C{"!L"}) string: its length
        in bytes, then its UTF-8 bytes.  txamqp's wrote the length in
        characters, so a name with a non-ASCII character put the rest of
        the frame out of step.

        @raise FrameEncodeError: The string is too long for its length field.
        """
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        limit = 0xFF if fmt == "!B" else 0xFFFFFFFF
        if len(data) > limit:
            kind = "short" if fmt == "!B" else "long"
            raise FrameEncodeError(
                f"{kind} string", f"{len(data)} bytes in UTF-8, more than the {limit} it may hold"
            )
        self.pack(fmt, len(data))
        self.write(data)

    def encode_table(self, tbl: Mapping[str, Any]) -> None:
        """
        Write C{tbl} as a field table.

        @raise FieldTableEncodeError: A key or value can not be represented.
        """
        self.write(encode_table(tbl))

    def decode_table(self) -> dict[str, Any]:
        """
        Read one field table from the stream.

        @raise FieldTableDecodeError: The table is truncated or malformed;
            offsets count from the table's length prefix.
        """
        try:
            head = self.read(4)
        except _TxEOF:
            raise FieldTableDecodeError(TRUNCATED, 0, "no room for the table length") from None
        (size,) = struct.unpack("!I", head)
        try:
            body = self.read(size)
        except _TxEOF:
            raise FieldTableDecodeError(
                TRUNCATED, 0, f"table of {size} bytes runs past the frame"
            ) from None
        table, _ = decode_table(head + body, exact=self.exact)
        return table


def _frame_types(spec: Any) -> dict[str, int]:
    by_name = spec.constants.byname
    return {
        Frame.METHOD: by_name["frame-method"].id,
        Frame.HEADER: by_name["frame-header"].id,
        Frame.BODY: by_name["frame-body"].id,
        Frame.HEARTBEAT: by_name["frame-heartbeat"].id,
    }


def method_frame(spec: Any, channel: int, name: str, *args: Any) -> Any:
    """
    Build a txamqp method C{Frame}.

    @param name: C{"class.method"}, e.g. C{"basic.nack"}.
    @param args: The method's fields in spec order.
    @raise KeyError: The spec has no such method.
    @raise TypeError: The number of arguments is wrong.
    """
    return Frame(channel, Method(spec.parse_method(name), *args))


def content_header_frame(
    spec: Any, channel: int, body_size: int, properties: Mapping[str, Any], class_name: str = "basic"
) -> Any:
    """
    Build a txamqp content-header C{Frame}.

    @param properties: Property values by spec name (C{"content-type"},
        C{"headers"}, ...); C{None} values are left out.
    """
    return Frame(channel, Header(spec.classes.byname[class_name], 0, body_size, **properties))


def body_frame(channel: int, data: bytes) -> Any:
    """
    Build a txamqp content-body C{Frame}.
    """
    return Frame(channel, Body(data))


def pack_frame(spec: Any, frame: Any) -> bytes:
    """
    Encode a txamqp C{Frame} (method, content header, body or heartbeat) to
    wire bytes, field tables through L{FieldTableCodec}.

    A C{str} body is sent as UTF-8.

    @param spec: The txamqp spec the frame's methods come from.
    @raise FieldTableEncodeError: A table argument or the C{headers}
        property can not be represented.
    """
    payload = frame.payload
    if isinstance(payload, Method):
        body = _encode_method(payload)
    elif isinstance(payload, Header):
        body = _encode_header(payload)
    elif isinstance(payload, Body):
        content = payload.content
        body = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    elif isinstance(payload, Heartbeat):
        body = b""
    else:
        raise TypeError(f"cannot encode frame payload {payload!r}")
    frame_type = _frame_types(spec)[payload.type]
    frame_end = spec.constants.byname["frame-end"].id
    return struct.pack("!BHI", frame_type, frame.channel, len(body)) + body + bytes([frame_end])


def _encode_method(payload: Any) -> bytes:
    buf = BytesIO()
    codec = FieldTableCodec(buf)
    codec.encode_short(payload.method.klass.id)
    codec.encode_short(payload.method.id)
    for field, arg in zip(payload.method.fields, payload.args):
        codec.encode(field.type, arg)
    codec.flush()
    return buf.getvalue()


def _encode_header(payload: Any) -> bytes:
    buf = BytesIO()
    codec = FieldTableCodec(buf)
    codec.encode_short(payload.klass.id)
    codec.encode_short(payload.weight)
    codec.encode_longlong(payload.size)
    fields = list(payload.klass.fields)
    present = [payload.properties.get(f.name) is not None for f in fields]
    # 15 property bits per 16-bit word, high bit first; the lowest bit says
    # another flag word follows.
    groups = [present[i : i + 15] for i in range(0, len(present), 15)] or [[]]
    for index, group in enumerate(groups):
        word = 0
        for position, flag in enumerate(group):
            if flag:
                word |= 1 << (15 - position)
        if index + 1 < len(groups):
            word |= 1
        codec.encode_short(word)
    for field, flag in zip(fields, present):
        if flag:
            codec.encode(field.type, payload.properties[field.name])
    codec.flush()
    return buf.getvalue()


def unpack_frame(spec: Any, data: bytes | bytearray | memoryview, *, exact: bool = False) -> Any:
    """
    Decode one complete frame (header, payload and end octet) to a txamqp
    C{Frame} with txamqp's own payload classes.

    Unlike txamqp, body frames always decode to C{bytes}: a message body is
    never guessed to be text.

    @param spec: The txamqp spec to look classes and methods up in.
    @param exact: Decode field tables with C{exact=True} (see
        L{decode_table}), so that L{pack_frame} gives back the same bytes.
    @raise FrameError: The frame is malformed, of an unknown type, or names
        a class or method the spec lacks; a malformed field table in it is
        reported with reason C{"bad-table"} and the L{FieldTableDecodeError}
        as its cause.
    """
    raw = bytes(data)
    if len(raw) < 8:
        raise FrameError("truncated", None, f"{len(raw)} bytes is shorter than any frame")
    frame_type, channel, size = struct.unpack_from("!BHI", raw, 0)
    if len(raw) != 8 + size:
        raise FrameError("bad-length", channel, f"payload size {size}, frame of {len(raw)} bytes")
    frame_end = spec.constants.byname["frame-end"].id
    if raw[-1] != frame_end:
        raise FrameError("bad-frame-end", channel, f"expected {frame_end}, got {raw[-1]}")
    body = raw[7:-1]
    types = {number: name for name, number in _frame_types(spec).items()}
    kind = types.get(frame_type)
    try:
        if kind == Frame.METHOD:
            payload: Any = _decode_method(spec, body, channel, exact)
        elif kind == Frame.HEADER:
            payload = _decode_header(spec, body, channel, exact)
        elif kind == Frame.BODY:
            payload = Body(body)
        elif kind == Frame.HEARTBEAT:
            payload = Heartbeat()
        else:
            raise FrameError("unknown-frame-type", channel, f"frame type {frame_type}")
    except FieldTableDecodeError as exc:
        raise FrameError("bad-table", channel, str(exc)) from exc
    except (_TxEOF, struct.error) as exc:
        raise FrameError("truncated", channel, f"payload ends early ({exc!r})") from exc
    return Frame(channel, payload)


def _lookup_method(spec: Any, class_id: int, method_id: int, channel: int) -> Any:
    klass = spec.classes.byid.get(class_id)
    if klass is None:
        raise FrameError("unknown-class", channel, f"class {class_id}")
    method = klass.methods.byid.get(method_id)
    if method is None:
        raise FrameError("unknown-method", channel, f"method {class_id}/{method_id}")
    return method


def _decode_method(spec: Any, body: bytes, channel: int, exact: bool) -> Any:
    codec = FieldTableCodec(BytesIO(body), exact)
    class_id = codec.decode_short()
    method = _lookup_method(spec, class_id, codec.decode_short(), channel)
    args = tuple(codec.decode(field.type) for field in method.fields)
    _check_consumed(codec, body, channel)
    return Method(method, *args)


def _check_consumed(codec: FieldTableCodec, body: bytes, channel: int) -> None:
    if codec.nread != len(body):
        raise FrameError(
            "bad-length", channel, f"{len(body) - codec.nread} bytes left after the last field"
        )


def _decode_header(spec: Any, body: bytes, channel: int, exact: bool) -> Any:
    codec = FieldTableCodec(BytesIO(body), exact)
    class_id = codec.decode_short()
    klass = spec.classes.byid.get(class_id)
    if klass is None:
        raise FrameError("unknown-class", channel, f"content class {class_id}")
    weight = codec.decode_short()
    size = codec.decode_longlong()
    present: list[bool] = []
    while True:
        word = codec.decode_short()
        present.extend(bool(word & (1 << bit)) for bit in range(15, 0, -1))
        if not word & 1:
            break
    properties: dict[str, Any] = {}
    for field, flag in zip(klass.fields, present):
        if flag:
            properties[str(field.name)] = codec.decode(field.type)
    _check_consumed(codec, body, channel)
    return Header(klass, weight, size, **properties)


class FieldTableFrameMixin:
    """
    Mix into a txamqp C{AMQClient} subclass (before it) so that every frame
    goes through L{pack_frame} and L{unpack_frame}: field tables of any type
    in both directions, and bytes bodies.

    These override txamqp's C{FrameReceiver._pack_frame} and
    C{_unpack_frame}, the one place where frames become bytes.
    """

    spec: Any

    def _pack_frame(self, frame: Any) -> bytes:
        return pack_frame(self.spec, frame)

    def _unpack_frame(self, data: bytes) -> Any:
        return unpack_frame(self.spec, data)


class FieldTableClient(FieldTableFrameMixin, _TxAMQClient):  # type: ignore[misc]
    """
    txamqp's C{AMQClient} with fedhub's frame codec: same constructor
    (C{delegate, vhost, spec, heartbeat=0, clock=None}), same behaviour,
    except that field tables of every type and bytes bodies work.
    """

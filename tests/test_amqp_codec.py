"""
Tests for L{fedhub.amqp.codec}: field tables of every RabbitMQ type, the
errors for malformed input, frames captured from a real RabbitMQ, and the
txamqp integration.
"""

# twisted.trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import math
import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.codec import (
    BAD_LENGTH,
    BAD_VALUE,
    MAX_DEPTH,
    OUT_OF_RANGE,
    TOO_DEEP,
    TRUNCATED,
    UNKNOWN_TYPE,
    UNSUPPORTED_TYPE,
    FieldTableClient,
    FieldTableCodec,
    FieldTableDecodeError,
    FieldTableEncodeError,
    FieldTableError,
    FieldTableFrameMixin,
    FieldValue,
    FrameEncodeError,
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
from fedhub.errors import FedhubError

UTC = timezone.utc
DATA = Path(__file__).parent / "data" / "amqp"

# Where the headers table starts in the captured content header frame:
# 7 bytes of frame header, then class, weight, body size and one flag word
# (14 bytes), then content-type as a short string (1 + 16 bytes).
HEADERS_OFFSET = 7 + 14 + 17

# The instant RabbitMQ dead-lettered the captured message.
CAPTURED_DEATH = datetime(2026, 11, 28, 7, 17, 52, tzinfo=UTC)

HYPOTHESIS = settings(max_examples=150, deadline=None, database=None)


def _frame(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _in_table(entry: bytes) -> bytes:
    """
    Wrap one encoded C{key + letter + value} entry in a table length prefix.
    """
    return struct.pack("!I", len(entry)) + entry


def _decode_error(data: bytes) -> FieldTableDecodeError:
    try:
        decode_table(data)
    except FieldTableDecodeError as exc:
        return exc
    raise AssertionError(f"{data!r} decoded without error")


def _encode_error(table: Any) -> FieldTableEncodeError:
    try:
        encode_table(table)
    except FieldTableEncodeError as exc:
        return exc
    raise AssertionError(f"{table!r} encoded without error")


# --- strategies -----------------------------------------------------------

keys = st.text(max_size=12)
raw_keys = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
decimals = st.builds(
    lambda unscaled, scale: Decimal((0, tuple(int(c) for c in str(unscaled)), -scale)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
)
offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)
)
instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(9998, 12, 31), timezones=offsets
).map(lambda d: d.replace(microsecond=0))

plain_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    decimals,
    st.text(),
    st.binary(),
    instants,
)
plain_values = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25,
)
plain_tables = st.dictionaries(keys, plain_values, max_size=6)


def _typed(letter: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[FieldValue]:
    return values.map(lambda v: FieldValue(letter, v))


typed_scalars = st.one_of(
    _typed("t", st.booleans() | st.integers(0, 255)),
    _typed("b", st.integers(-(2**7), 2**7 - 1)),
    _typed("B", st.integers(0, 2**8 - 1)),
    _typed("s", st.integers(-(2**15), 2**15 - 1)),
    _typed("u", st.integers(0, 2**16 - 1)),
    _typed("I", st.integers(-(2**31), 2**31 - 1)),
    _typed("i", st.integers(0, 2**32 - 1)),
    _typed("l", st.integers(-(2**63), 2**63 - 1)),
    _typed("L", st.integers(-(2**63), 2**63 - 1)),
    _typed("f", st.floats(width=32, allow_nan=False)),
    _typed("d", st.floats(allow_nan=False)),
    _typed("D", decimals),
    _typed("S", st.text() | st.binary()),
    _typed("x", st.binary()),
    _typed("T", instants | st.integers(0, 2**64 - 1)),
    _typed("V", st.none()),
)
typed_values = st.recursive(
    typed_scalars,
    lambda inner: _typed("A", st.lists(inner, max_size=4))
    | _typed("F", st.dictionaries(keys | raw_keys, inner, max_size=4)),
    max_leaves=25,
)
typed_tables = st.dictionaries(keys | raw_keys, typed_values, max_size=6)


# --- wire format ----------------------------------------------------------

# (letter, encoded value, Python value) for every type RabbitMQ defines.
VECTORS: list[tuple[str, bytes, Any]] = [
    ("t", b"t\x01", True),
    ("t", b"t\x00", False),
    ("b", b"b\xfb", -5),
    ("B", b"B\xfa", 250),
    ("s", b"s\xfe\xd4", -300),
    ("u", b"u\xfd\xe8", 65000),
    ("I", b"I\xff\xfe\xee\x90", -70000),
    ("i", b"i\xee\x6b\x28\x00", 4000000000),
    ("l", b"l\x00\x00\x01\x00\x00\x00\x00\x00", 2**40),
    ("L", b"L\xff\xff\xff\xff\xff\xff\xff\xff", -1),
    ("f", b"f\x3e\x80\x00\x00", 0.25),
    ("d", b"d\x40\x0c\x00\x00\x00\x00\x00\x00", 3.5),
    ("D", b"D\x02\x00\x00\x04\xd2", Decimal("12.34")),
    ("S", b"S\x00\x00\x00\x06h\xc3\xa9llo", "h\u00e9llo"),
    ("x", b"x\x00\x00\x00\x02\x00\xff", b"\x00\xff"),
    ("A", b"A\x00\x00\x00\x0aI\x00\x00\x00\x01S\x00\x00\x00\x00", [1, ""]),
    ("T", b"T\x00\x00\x00\x00\x6b\x0a\x6d\xe0", datetime(2026, 11, 28, 6, 0, tzinfo=UTC)),
    ("F", b"F\x00\x00\x00\x03\x01aV", {"a": None}),
    ("V", b"V", None),
]


class WireFormatTests(SynchronousTestCase):
    """
    Byte-exact encodings of each field type and of the width choices.
    """

    def test_decode_every_type(self) -> None:
        """
        Each RabbitMQ type letter decodes to its documented Python value.
        """
        for letter, wire, value in VECTORS:
            table, end = decode_table(_in_table(b"\x01k" + wire))
            self.assertEqual(table, {"k": value}, letter)
            self.assertIs(type(table["k"]), type(value), letter)
            self.assertEqual(end, len(wire) + 6, letter)

    def test_encode_every_type(self) -> None:
        """
        Each value, tagged with its letter, encodes to exactly the vector bytes.
        """
        for letter, wire, value in VECTORS:
            self.assertEqual(encode_value(FieldValue(letter, value)), wire, letter)

    def test_default_letters(self) -> None:
        """
        Plain Python values pick t, I, l, d, D, S, x, A, F, V and T.
        """
        samples = [
            (True, "t"),
            (2**31 - 1, "I"),
            (-(2**31), "I"),
            (2**31, "l"),
            (-(2**31) - 1, "l"),
            (2**63 - 1, "l"),
            (-(2**63), "l"),
            (1.5, "d"),
            (Decimal("1"), "D"),
            ("s", "S"),
            (b"b", "x"),
            (bytearray(b"b"), "x"),
            (memoryview(b"b"), "x"),
            ([1], "A"),
            ((1,), "A"),
            ({"k": 1}, "F"),
            (None, "V"),
            (datetime(2000, 1, 1, tzinfo=UTC), "T"),
        ]
        for value, letter in samples:
            self.assertEqual(encode_value(value)[:1], letter.encode(), repr(value))

    def test_empty_table(self) -> None:
        """
        An empty mapping is four zero bytes, and decodes back to an empty dict.
        """
        self.assertEqual(encode_table({}), b"\x00\x00\x00\x00")
        self.assertEqual(decode_table(b"\x00\x00\x00\x00"), ({}, 4))

    def test_offset_and_trailing_data(self) -> None:
        """
        Decoding starts at the given offset and reports where the table ends.
        """
        encoded = encode_table({"a": 1})
        table, end = decode_table(b"xyz" + encoded + b"rest", 3)
        self.assertEqual((table, end), ({"a": 1}, 3 + len(encoded)))

    def test_memoryview_input(self) -> None:
        """
        A memoryview decodes like the bytes it shows.
        """
        encoded = encode_table({"a": [1, "b"]})
        self.assertEqual(decode_table(memoryview(encoded))[0], {"a": [1, "b"]})

    def test_invalid_utf8_string_stays_bytes(self) -> None:
        """
        A long string that is not UTF-8 decodes to bytes, and exactly to a tagged S.
        """
        wire = _in_table(b"\x01kS\x00\x00\x00\x02\xff\xfe")
        self.assertEqual(decode_table(wire)[0], {"k": b"\xff\xfe"})
        exact = decode_table(wire, exact=True)[0]
        self.assertEqual(exact, {"k": FieldValue("S", b"\xff\xfe")})
        self.assertEqual(encode_table(exact), wire)

    def test_invalid_utf8_key(self) -> None:
        """
        A field name that is not UTF-8 survives decoding and re-encodes to the same bytes.
        """
        wire = _in_table(b"\x02\xc3\x28V")
        table = decode_table(wire)[0]
        self.assertEqual(list(table), ["\udcc3("])
        self.assertEqual(encode_table(table), wire)

    def test_nonzero_boolean_octet(self) -> None:
        """
        Any non-zero boolean octet is true; exact decoding keeps the octet.
        """
        wire = _in_table(b"\x01kt\x07")
        self.assertEqual(decode_table(wire)[0], {"k": True})
        self.assertEqual(encode_table(decode_table(wire, exact=True)[0]), wire)

    def test_timestamp_decodes_aware_utc(self) -> None:
        """
        Timestamps decode to datetimes whose timezone is UTC.
        """
        value = decode_table(_in_table(b"\x01kT" + struct.pack("!Q", 86400)))[0]["k"]
        self.assertEqual(value, datetime(1970, 1, 2, tzinfo=UTC))
        self.assertIs(value.tzinfo, UTC)

    def test_timestamp_past_year_9999(self) -> None:
        """
        A timestamp past what datetime holds decodes to a tagged T and re-encodes.
        """
        wire = _in_table(b"\x01kT\xff\xff\xff\xff\xff\xff\xff\xff")
        table = decode_table(wire)[0]
        self.assertEqual(table, {"k": FieldValue("T", 2**64 - 1)})
        self.assertEqual(encode_table(table), wire)

    def test_timestamp_encoding_other_zones_and_fractions(self) -> None:
        """
        Aware datetimes in any zone encode as the UTC instant, sub-seconds dropped.
        """
        paris = timezone(timedelta(hours=1))
        value = datetime(1970, 1, 1, 1, 0, 10, 999999, tzinfo=paris)
        self.assertEqual(encode_value(value), b"T" + struct.pack("!Q", 10))

    def test_decimal_forms(self) -> None:
        """
        Decimals keep their scale; positive exponents are multiplied out.
        """
        self.assertEqual(encode_value(Decimal("1.20")), b"D\x02\x00\x00\x00\x78")
        self.assertEqual(encode_value(Decimal("1E+2")), b"D\x00\x00\x00\x00\x64")
        self.assertEqual(encode_value(Decimal("-0")), b"D\x00\x00\x00\x00\x00")
        decoded = decode_table(_in_table(b"\x01kD\x02\x00\x00\x00\x78"))[0]["k"]
        self.assertEqual(decoded.as_tuple(), Decimal("1.20").as_tuple())

    def test_nan_double(self) -> None:
        """
        A NaN double survives the round trip.
        """
        table = decode_table(encode_table({"k": math.nan}))[0]
        self.assertTrue(math.isnan(table["k"]))

    def test_exact_letters(self) -> None:
        """
        Exact decoding tags the types a plain value would re-encode differently, and only those.
        """
        wire = _in_table(b"".join(b"\x01" + letter.encode() + vector for letter, vector, _ in VECTORS[1:]))
        exact = decode_table(wire, exact=True)[0]
        tagged = {key for key, value in exact.items() if isinstance(value, FieldValue)}
        self.assertEqual(tagged, set("bBsuiLf"))
        self.assertEqual(encode_table(exact), wire)

    def test_exact_l_outside_32_bits_is_plain(self) -> None:
        """
        A 64-bit integer too wide for 32 bits is already canonical, so it is not tagged.
        """
        wire = _in_table(b"\x01kl" + struct.pack("!q", 2**40))
        self.assertEqual(decode_table(wire, exact=True)[0], {"k": 2**40})

    def test_last_duplicate_key_wins(self) -> None:
        """
        Of two fields with one name, the later one is kept.
        """
        wire = _in_table(b"\x01kI\x00\x00\x00\x01\x01kI\x00\x00\x00\x02")
        self.assertEqual(decode_table(wire)[0], {"k": 2})


class PropertyTests(SynchronousTestCase):
    """
    Round trips over generated nested structures of every type.
    """

    @HYPOTHESIS
    @given(plain_tables)
    def test_plain_round_trip(self, table: dict[str, Any]) -> None:
        """
        Plain Python tables decode back equal, and re-encode to the same bytes.
        """
        encoded = encode_table(table)
        decoded, end = decode_table(encoded)
        self.assertEqual(decoded, table)
        self.assertEqual(end, len(encoded))
        self.assertEqual(encode_table(decoded), encoded)

    @HYPOTHESIS
    @given(typed_tables)
    def test_exact_round_trip(self, table: dict[str, Any]) -> None:
        """
        Tables with every type letter re-encode byte for byte after exact decoding.
        """
        encoded = encode_table(table)
        decoded, end = decode_table(encoded, exact=True)
        self.assertEqual(end, len(encoded))
        self.assertEqual(encode_table(decoded), encoded)

    @HYPOTHESIS
    @given(typed_tables)
    def test_plain_decoding_of_typed_tables(self, table: dict[str, Any]) -> None:
        """
        Plain decoding of any type letter gives only plain Python values (or
        a tagged timestamp beyond datetime's range).
        """
        decoded, _ = decode_table(encode_table(table))

        def check(value: Any) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    check(item)
            elif isinstance(value, list):
                for item in value:
                    check(item)
            elif isinstance(value, FieldValue):
                self.assertEqual(value.type, "T")
            else:
                self.assertIsInstance(
                    value, (type(None), bool, int, float, Decimal, str, bytes, datetime)
                )

        check(decoded)

    @HYPOTHESIS
    @given(st.binary(max_size=64))
    def test_arbitrary_bytes(self, body: bytes) -> None:
        """
        Any bytes behind a matching length either decode or raise FieldTableDecodeError.
        """
        try:
            decode_table(_in_table(body))
        except FieldTableDecodeError:
            pass

    @HYPOTHESIS
    @given(typed_tables, st.data())
    def test_corrupted_tables(self, table: dict[str, Any], data: st.DataObject) -> None:
        """
        A valid table with one byte changed decodes or raises FieldTableDecodeError, nothing else.
        """
        encoded = bytearray(encode_table(table))
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
        try:
            decode_table(bytes(encoded))
        except FieldTableDecodeError:
            pass


def _nested_tables(levels: int) -> bytes:
    """
    A table nesting C{levels} tables in all (itself included), built inside out.
    """
    table = b"\x00\x00\x00\x00"
    for _ in range(levels - 1):
        table = _in_table(b"\x01kF" + table)
    return table


def _nested_arrays(levels: int) -> bytes:
    """
    A table holding C{levels - 1} nested arrays, without quadratic copying.
    """
    parts = [b"A" + struct.pack("!I", 5 * j) for j in range(levels - 2, -1, -1)]
    return _in_table(b"\x01k" + b"".join(parts))


class DecodeErrorTests(SynchronousTestCase):
    """
    Malformed input raises FieldTableDecodeError with a reason and an offset.
    """

    def test_error_type(self) -> None:
        """
        Decode errors are FieldTableErrors and FedhubErrors carrying reason and offset.
        """
        error = _decode_error(b"")
        self.assertIsInstance(error, FieldTableError)
        self.assertIsInstance(error, FedhubError)
        self.assertEqual((error.reason, error.offset), (TRUNCATED, 0))
        self.assertIn(TRUNCATED, str(error))

    def test_truncated_length(self) -> None:
        """
        Fewer than four bytes can not hold a table length.
        """
        self.assertEqual(_decode_error(b"\x00\x00\x00").reason, TRUNCATED)

    def test_truncated_offset(self) -> None:
        """
        An offset past the end is truncated input.
        """
        with self.assertRaises(FieldTableDecodeError) as caught:
            decode_table(b"\x00\x00\x00\x00", 2)
        self.assertEqual((caught.exception.reason, caught.exception.offset), (TRUNCATED, 2))

    def test_truncated_body(self) -> None:
        """
        A table announcing more bytes than the input holds is truncated.
        """
        error = _decode_error(b"\x00\x00\x00\x0a\x01kV")
        self.assertEqual((error.reason, error.offset), (TRUNCATED, 0))

    def test_truncated_capture(self) -> None:
        """
        The captured x-death headers cut anywhere short are reported as truncated.
        """
        raw = _frame("dead-letter-header.bin")
        (size,) = struct.unpack_from("!I", raw, HEADERS_OFFSET)
        table = raw[HEADERS_OFFSET : HEADERS_OFFSET + 4 + size]
        for cut in (0, 3, 4, 100, len(table) - 1):
            self.assertEqual(_decode_error(table[:cut]).reason, TRUNCATED, cut)

    def test_unknown_type_letter(self) -> None:
        """
        A letter RabbitMQ does not define is refused, at the letter's offset.
        """
        error = _decode_error(_in_table(b"\x01aV\x01kZ"))
        self.assertEqual((error.reason, error.offset), (UNKNOWN_TYPE, 9))
        self.assertIn("'Z'", str(error))

    def test_specification_only_letter(self) -> None:
        """
        The 0-9-1 specification's U (unknown to RabbitMQ) is refused too.
        """
        error = _decode_error(_in_table(b"\x01kU\x00\x00\x00\x00\x00\x00\x00\x01"))
        self.assertEqual(error.reason, UNKNOWN_TYPE)

    def test_oversize_string_length(self) -> None:
        """
        A long string claiming 4 GiB inside a small table is a bad length.
        """
        error = _decode_error(_in_table(b"\x01kS\xff\xff\xff\xffabc"))
        self.assertEqual((error.reason, error.offset), (BAD_LENGTH, 11))

    def test_oversize_nested_table(self) -> None:
        """
        A nested table longer than its parent's remaining bytes is a bad length.
        """
        error = _decode_error(_in_table(b"\x01kF\x00\x00\x00\x09\x01aV"))
        self.assertEqual(error.reason, BAD_LENGTH)

    def test_oversize_array(self) -> None:
        """
        An array longer than its parent's remaining bytes is a bad length.
        """
        self.assertEqual(_decode_error(_in_table(b"\x01kA\x00\x01\x00\x00V")).reason, BAD_LENGTH)

    def test_value_across_table_end(self) -> None:
        """
        A fixed-width value running past its table's end is a bad length, even
        when the input continues.
        """
        wire = b"\x00\x00\x00\x05\x01kI\x00\x00" + b"\x00\x00"
        self.assertEqual(_decode_error(wire).reason, BAD_LENGTH)

    def test_value_across_array_end(self) -> None:
        """
        An array element running past the array's end is a bad length.
        """
        wire = _in_table(b"\x01kA\x00\x00\x00\x02I\x00\x00\x00\x00")
        self.assertEqual(_decode_error(wire).reason, BAD_LENGTH)

    def test_key_across_table_end(self) -> None:
        """
        A field name longer than what is left of the table is a bad length.
        """
        self.assertEqual(_decode_error(_in_table(b"\x09key")).reason, BAD_LENGTH)

    def test_missing_type_letter(self) -> None:
        """
        A field name with no value after it is a bad length.
        """
        self.assertEqual(_decode_error(_in_table(b"\x01k")).reason, BAD_LENGTH)

    def test_depth_limit_tables(self) -> None:
        """
        Tables nest up to MAX_DEPTH levels; one more is refused as too deep.
        """
        decode_table(_nested_tables(MAX_DEPTH))
        self.assertEqual(_decode_error(_nested_tables(MAX_DEPTH + 1)).reason, TOO_DEEP)

    def test_depth_limit_arrays(self) -> None:
        """
        Arrays count towards the same nesting limit.
        """
        decode_table(_nested_arrays(MAX_DEPTH))
        self.assertEqual(_decode_error(_nested_arrays(MAX_DEPTH + 1)).reason, TOO_DEEP)

    def test_hostile_depth(self) -> None:
        """
        Ten thousand nested arrays are refused cleanly, not with a RecursionError.
        """
        self.assertEqual(_decode_error(_nested_arrays(10000)).reason, TOO_DEEP)


class EncodeErrorTests(SynchronousTestCase):
    """
    Values without a field-table form raise FieldTableEncodeError naming where they are.
    """

    def test_unsupported_type(self) -> None:
        """
        An object of no supported type is refused with its path.
        """
        error = _encode_error({"a": [1, {"b": object()}]})
        self.assertIsInstance(error, FedhubError)
        self.assertEqual((error.reason, error.path), (UNSUPPORTED_TYPE, "a[1].b"))
        self.assertIn("a[1].b", str(error))

    def test_set_unsupported(self) -> None:
        """
        Sets have no field type (their order is not defined).
        """
        self.assertEqual(_encode_error({"a": {1}}).reason, UNSUPPORTED_TYPE)

    def test_int_out_of_range(self) -> None:
        """
        Integers beyond signed 64 bits are refused.
        """
        self.assertEqual(_encode_error({"a": 2**63}).reason, OUT_OF_RANGE)
        self.assertEqual(_encode_error({"a": -(2**63) - 1}).reason, OUT_OF_RANGE)

    def test_typed_int_out_of_range(self) -> None:
        """
        A tagged integer must fit its letter's width and sign.
        """
        for letter, value in [("b", 128), ("B", -1), ("s", 2**15), ("u", 2**16), ("I", 2**31), ("i", -1)]:
            error = _encode_error({"a": FieldValue(letter, value)})
            self.assertEqual((error.reason, error.path, error.offset), (OUT_OF_RANGE, "a", 6), letter)

    def test_typed_wrong_python_type(self) -> None:
        """
        A tagged value of the wrong Python type is a bad value.
        """
        for letter, value in [("I", "1"), ("I", True), ("x", "text"), ("F", [1]), ("A", {}), ("V", 0), ("d", "1"), ("D", 1.5), ("T", "now"), ("t", "yes")]:
            self.assertEqual(_encode_error({"a": FieldValue(letter, value)}).reason, BAD_VALUE, letter)

    def test_single_float_overflow(self) -> None:
        """
        A double too large for single precision is out of range for f.
        """
        self.assertEqual(_encode_error({"a": FieldValue("f", 1e300)}).reason, OUT_OF_RANGE)

    def test_unknown_letter(self) -> None:
        """
        FieldValue refuses a letter the codec does not know.
        """
        self.assertRaises(ValueError, FieldValue, "U", 1)

    def test_key_not_str(self) -> None:
        """
        Field names must be str.
        """
        self.assertEqual(_encode_error({1: "a"}).reason, BAD_VALUE)

    def test_key_too_long(self) -> None:
        """
        Field names longer than 255 UTF-8 bytes are refused; 255 is fine.
        """
        encode_table({"k" * 255: None})
        self.assertEqual(_encode_error({"\u00e9" * 128: None}).reason, BAD_VALUE)

    def test_lone_surrogate_string(self) -> None:
        """
        A string value that is not encodable as UTF-8 is a bad value.
        """
        self.assertEqual(_encode_error({"a": "\ud800"}).reason, BAD_VALUE)

    def test_naive_datetime(self) -> None:
        """
        A datetime without timezone is ambiguous and refused.
        """
        self.assertEqual(_encode_error({"a": datetime(2020, 1, 1)}).reason, BAD_VALUE)

    def test_datetime_before_epoch(self) -> None:
        """
        Instants before 1970 do not fit the unsigned timestamp.
        """
        self.assertEqual(_encode_error({"a": datetime(1969, 12, 31, tzinfo=UTC)}).reason, OUT_OF_RANGE)

    def test_bad_decimals(self) -> None:
        """
        Negative, non-finite, too precise or too wide decimals are out of range.
        """
        for value in ["-1.5", "NaN", "Infinity", "1E-256", "4294967296"]:
            self.assertEqual(_encode_error({"a": Decimal(value)}).reason, OUT_OF_RANGE, value)

    def test_depth_limit(self) -> None:
        """
        Mappings nest up to MAX_DEPTH levels; one more is refused.
        """
        table: dict[str, Any] = {}
        for _ in range(MAX_DEPTH - 1):
            table = {"k": table}
        encode_table(table)
        self.assertEqual(_encode_error({"k": table}).reason, TOO_DEEP)

    def test_self_reference(self) -> None:
        """
        A mapping or list containing itself fails cleanly as too deep.
        """
        table: dict[str, Any] = {}
        table["self"] = table
        self.assertEqual(_encode_error(table).reason, TOO_DEEP)
        items: list[Any] = []
        items.append(items)
        self.assertEqual(_encode_error({"a": items}).reason, TOO_DEEP)


class CapturedFrameTests(SynchronousTestCase):
    """
    Frames captured from RabbitMQ 3.10 (see tests/data/amqp/README.md).
    """

    def setUp(self) -> None:
        self.spec = load_spec()

    def _headers(self) -> dict[str, Any]:
        header = unpack_frame(self.spec, _frame("dead-letter-header.bin")).payload
        headers: dict[str, Any] = header.properties["headers"]
        return headers

    def test_x_death(self) -> None:
        """
        The x-death header decodes to a list with one death record of the right types.
        """
        deaths = self._headers()["x-death"]
        self.assertEqual(
            deaths,
            [
                {
                    "count": 1,
                    "reason": "expired",
                    "queue": "fedhub.capture.expiring",
                    "time": CAPTURED_DEATH,
                    "exchange": "",
                    "routing-keys": ["fedhub.capture.expiring"],
                }
            ],
        )
        self.assertIs(deaths[0]["time"].tzinfo, UTC)

    def test_first_death_headers(self) -> None:
        """
        RabbitMQ's x-first-death-* headers decode as strings.
        """
        headers = self._headers()
        self.assertEqual(
            {k: v for k, v in headers.items() if k.startswith("x-first-death")},
            {
                "x-first-death-exchange": "",
                "x-first-death-queue": "fedhub.capture.expiring",
                "x-first-death-reason": "expired",
            },
        )

    def test_every_type_from_broker(self) -> None:
        """
        The header of every type, as RabbitMQ re-encoded it, decodes to the sent values.
        """
        headers = self._headers()
        sent = {k: v for k, v in headers.items() if k.startswith("fedhub-")}
        self.assertEqual(
            sent,
            {
                "fedhub-bool": True,
                "fedhub-int8": -5,
                "fedhub-uint8": 250,
                "fedhub-int16": -300,
                "fedhub-uint16": 65000,
                "fedhub-int32": -70000,
                "fedhub-uint32": 4000000000,
                "fedhub-int64": 2**40,
                "fedhub-int64-L": 7,
                "fedhub-float": 0.25,
                "fedhub-double": 3.5,
                "fedhub-decimal": Decimal("12.34"),
                "fedhub-string": "h\u00e9llo",
                "fedhub-bytes": b"\x00\xff",
                "fedhub-array": [1, "two", [3]],
                "fedhub-time": datetime(2026, 11, 28, 6, 0, tzinfo=UTC),
                "fedhub-table": {"nested": {"deeper": True}},
                "fedhub-void": None,
            },
        )

    def test_broker_type_letters(self) -> None:
        """
        Exact decoding shows RabbitMQ's letters: 64-bit count, L rewritten to l,
        narrow integers and the single float kept.
        """
        headers, _ = decode_table(_frame("dead-letter-header.bin"), HEADERS_OFFSET, exact=True)
        self.assertEqual(headers["x-death"][0]["count"], FieldValue("l", 1))
        self.assertEqual(headers["fedhub-int64-L"], FieldValue("l", 7))
        self.assertEqual(
            [headers[f"fedhub-{n}"] for n in ("int8", "uint8", "int16", "uint16", "uint32", "float")],
            [
                FieldValue("b", -5),
                FieldValue("B", 250),
                FieldValue("s", -300),
                FieldValue("u", 65000),
                FieldValue("i", 4000000000),
                FieldValue("f", 0.25),
            ],
        )

    def test_header_properties(self) -> None:
        """
        The other content properties of the dead-lettered message decode too.
        """
        header = unpack_frame(self.spec, _frame("dead-letter-header.bin")).payload
        self.assertEqual((header.klass.name, header.weight, header.size), ("basic", 0, 18))
        self.assertEqual(
            {k: v for k, v in header.properties.items() if k != "headers"},
            {
                "content-type": "application/json",
                "delivery-mode": 2,
                "message-id": "6f1a2b3c-0000-4000-8000-000000000001",
            },
        )

    def test_exact_reencoding_of_every_frame(self) -> None:
        """
        Every captured frame, decoded exactly, packs back to the identical bytes.
        """
        for name in sorted(p.name for p in DATA.glob("*.bin")):
            raw = _frame(name)
            self.assertEqual(pack_frame(self.spec, unpack_frame(self.spec, raw, exact=True)), raw, name)

    def test_plain_reencoding_of_canonical_frames(self) -> None:
        """
        Frames whose tables use only canonical letters pack back identically from plain decoding.
        """
        for name in ("connection-start.bin", "confirm-ack.bin", "dead-letter-get-ok.bin", "dead-letter-body.bin"):
            raw = _frame(name)
            self.assertEqual(pack_frame(self.spec, unpack_frame(self.spec, raw)), raw, name)

    def test_plain_reencoding_of_header_differs(self) -> None:
        """
        Plain decoding loses the header's non-canonical letters (x-death's
        64-bit count among them), so its re-encoding differs from the capture.
        """
        raw = _frame("dead-letter-header.bin")
        self.assertNotEqual(pack_frame(self.spec, unpack_frame(self.spec, raw)), raw)

    def test_server_properties(self) -> None:
        """
        connection.start's server properties decode, capabilities included, and
        re-encode to the same table bytes.
        """
        frame = unpack_frame(self.spec, _frame("connection-start.bin"))
        major, minor, properties, mechanisms, locales = frame.payload.args
        self.assertEqual((frame.channel, major, minor), (0, 0, 9))
        self.assertEqual(properties["product"], "RabbitMQ")
        self.assertIs(properties["capabilities"]["basic.nack"], True)
        self.assertIs(properties["capabilities"]["connection.blocked"], True)
        self.assertIs(properties["capabilities"]["publisher_confirms"], True)
        self.assertIn("PLAIN", mechanisms)
        encoded = encode_table(properties)
        # 7 bytes of frame header, class and method ids, then the two version octets.
        self.assertEqual(encoded, _frame("connection-start.bin")[13 : 13 + len(encoded)])

    def test_confirm_ack(self) -> None:
        """
        The broker's publisher confirm is basic.ack for tag 1, not multiple.
        """
        frame = unpack_frame(self.spec, _frame("confirm-ack.bin"))
        self.assertEqual((frame.channel, frame.payload.method.name, frame.payload.args), (1, "ack", (1, False)))

    def test_body_is_bytes(self) -> None:
        """
        Body frames decode to bytes even when they are valid UTF-8.
        """
        body = unpack_frame(self.spec, _frame("dead-letter-body.bin")).payload.content
        self.assertEqual(body, b'{"hello": "world"}')


class FrameTests(SynchronousTestCase):
    """
    L{pack_frame} and L{unpack_frame} outside the captured data, errors included.
    """

    def setUp(self) -> None:
        self.spec = load_spec()

    def _error(self, raw: bytes) -> FrameError:
        try:
            unpack_frame(self.spec, raw)
        except FrameError as exc:
            return exc
        raise AssertionError(f"{raw!r} unpacked without error")

    def _method_bytes(self, channel: int, payload: bytes) -> bytes:
        return struct.pack("!BHI", 1, channel, len(payload)) + payload + b"\xce"

    def test_method_with_every_type_of_argument(self) -> None:
        """
        Table arguments of every type survive a packed and unpacked method frame.
        """
        arguments = {
            "x-max-length": FieldValue("l", 10),
            "x-list": [1, {"a": True}, None],
            "x-when": datetime(2020, 5, 1, tzinfo=UTC),
        }
        frame = method_frame(self.spec, 3, "queue.declare", 0, "q", False, True, False, False, False, arguments)
        back = unpack_frame(self.spec, pack_frame(self.spec, frame), exact=True)
        self.assertEqual(back.channel, 3)
        self.assertEqual(back.payload.method, self.spec.parse_method("queue.declare"))
        self.assertEqual(back.payload.args, (0, "q", False, True, False, False, False, arguments))

    def test_non_ascii_names(self) -> None:
        """
        Short and long strings are written with their length in bytes, so
        non-ASCII names (queue, routing key, consumer tag) survive a packed
        and unpacked frame, and so does what follows them.
        """
        frame = method_frame(
            self.spec, 2, "queue.bind", 0, "fil\u00e9-\u2603", "amq.topic", "org.\u00e9.#", False, {"k": 1}
        )
        raw = pack_frame(self.spec, frame)
        self.assertIn(b"\x09fil\xc3\xa9-\xe2\x98\x83\x09amq.topic\x08org.\xc3\xa9.#", raw)
        back = unpack_frame(self.spec, raw, exact=False)
        self.assertEqual(back.payload.args, (0, "fil\u00e9-\u2603", "amq.topic", "org.\u00e9.#", False, {"k": 1}))
        reason = method_frame(self.spec, 0, "connection.close", 320, "arr\u00eat", 0, 0)
        self.assertEqual(unpack_frame(self.spec, pack_frame(self.spec, reason)).payload.args[1], "arr\u00eat")

    def test_short_string_too_long_in_bytes(self) -> None:
        """
        A short string of at most 255 characters but more than 255 bytes is
        refused with FrameEncodeError (a ValueError), not written wrong.
        """
        frame = method_frame(self.spec, 1, "queue.declare", 0, "\u00e9" * 200, False, True, False, False, False, {})
        with self.assertRaises(FrameEncodeError) as caught:
            pack_frame(self.spec, frame)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("400 bytes", str(caught.exception))
        ok = method_frame(self.spec, 1, "queue.declare", 0, "\u00e9" * 127, False, True, False, False, False, {})
        self.assertEqual(unpack_frame(self.spec, pack_frame(self.spec, ok)).payload.args[1], "\u00e9" * 127)

    def test_header_with_headers(self) -> None:
        """
        A content header with a headers table and a timestamp packs and unpacks.
        """
        properties = {"headers": {"x-death": [{"count": 2**40}]}, "timestamp": 1700000000, "priority": 5}
        frame = content_header_frame(self.spec, 1, 42, properties)
        back = unpack_frame(self.spec, pack_frame(self.spec, frame)).payload
        self.assertEqual((back.size, back.properties), (42, properties))

    def test_header_flag_continuation(self) -> None:
        """
        A header whose flag word announces another flag word decodes.
        """
        payload = struct.pack("!HHQHH", 60, 0, 0, 0x8001, 0) + b"\x04text"
        raw = struct.pack("!BHI", 2, 1, len(payload)) + payload + b"\xce"
        self.assertEqual(unpack_frame(self.spec, raw).payload.properties, {"content-type": "text"})

    def test_str_body_is_utf8(self) -> None:
        """
        A str body is sent as UTF-8 with its byte length.
        """
        raw = pack_frame(self.spec, body_frame(1, "\u00e9"))  # type: ignore[arg-type]
        self.assertEqual(raw, b"\x03\x00\x01\x00\x00\x00\x02\xc3\xa9\xce")

    def test_heartbeat(self) -> None:
        """
        A heartbeat is an empty frame of type 8 on channel 0, both ways.
        """
        raw = b"\x08\x00\x00\x00\x00\x00\x00\xce"
        frame = unpack_frame(self.spec, raw)
        self.assertEqual(frame.payload.type, "frame_heartbeat")
        self.assertEqual(pack_frame(self.spec, frame), raw)

    def test_wrong_argument_count(self) -> None:
        """
        Building a method frame with the wrong number of fields is a TypeError.
        """
        self.assertRaises(TypeError, method_frame, self.spec, 1, "basic.nack", 1)

    def test_truncated(self) -> None:
        """
        Fewer than eight bytes are no frame.
        """
        self.assertEqual(self._error(b"\x01\x00\x00").reason, "truncated")

    def test_bad_length(self) -> None:
        """
        A payload size that does not match the frame is refused.
        """
        error = self._error(b"\x01\x00\x01\x00\x00\x00\x09\x00\xce")
        self.assertEqual((error.reason, error.channel), ("bad-length", 1))

    def test_bad_frame_end(self) -> None:
        """
        A frame not ending in 0xCE is refused.
        """
        self.assertEqual(self._error(b"\x08\x00\x00\x00\x00\x00\x00\x00").reason, "bad-frame-end")

    def test_unknown_frame_type(self) -> None:
        """
        A frame type other than method, header, body or heartbeat is refused.
        """
        self.assertEqual(self._error(b"\x09\x00\x00\x00\x00\x00\x00\xce").reason, "unknown-frame-type")

    def test_unknown_class_and_method(self) -> None:
        """
        Method frames naming a class or method the spec lacks are refused.
        """
        self.assertEqual(self._error(self._method_bytes(1, struct.pack("!HH", 99, 10))).reason, "unknown-class")
        self.assertEqual(self._error(self._method_bytes(1, struct.pack("!HH", 60, 99))).reason, "unknown-method")

    def test_trailing_bytes(self) -> None:
        """
        Bytes left after a method's last field are refused.
        """
        payload = struct.pack("!HHQB", 60, 80, 1, 0) + b"junk"
        self.assertEqual(self._error(self._method_bytes(1, payload)).reason, "bad-length")

    def test_truncated_argument(self) -> None:
        """
        A short string running past the method payload is truncated.
        """
        payload = struct.pack("!HH", 60, 21) + b"\x10tag"
        self.assertEqual(self._error(self._method_bytes(1, payload)).reason, "truncated")

    def test_bad_table_argument(self) -> None:
        """
        A malformed table argument is reported as bad-table, caused by the table error.
        """
        payload = struct.pack("!HHBB", 10, 10, 0, 9) + _in_table(b"\x01kZ") + b"\x00\x00\x00\x00" * 2
        error = self._error(self._method_bytes(0, payload))
        self.assertEqual(error.reason, "bad-table")
        cause = error.__cause__
        assert isinstance(cause, FieldTableDecodeError)
        self.assertEqual(cause.reason, UNKNOWN_TYPE)


class CodecClassTests(SynchronousTestCase):
    """
    L{FieldTableCodec} as a drop-in for txamqp's codec.
    """

    def test_encode_table(self) -> None:
        """
        encode_table writes this module's encoding to the stream.
        """
        stream = BytesIO()
        FieldTableCodec(stream).encode_table({"a": [1.5]})
        self.assertEqual(stream.getvalue(), encode_table({"a": [1.5]}))

    def test_amqplain_response(self) -> None:
        """
        txamqp's long-string encoding of a dict (AMQPLAIN) goes through the table codec.
        """
        stream = BytesIO()
        FieldTableCodec(stream).encode_longstr({"LOGIN": "guest"})
        self.assertEqual(stream.getvalue(), encode_table({"LOGIN": "guest"}))

    def test_decode_table_then_more(self) -> None:
        """
        decode_table consumes exactly the table, leaving the stream at what follows.
        """
        codec = FieldTableCodec(BytesIO(encode_table({"d": datetime(2001, 1, 1, tzinfo=UTC)}) + b"\x07"))
        self.assertEqual(codec.decode_table(), {"d": datetime(2001, 1, 1, tzinfo=UTC)})
        self.assertEqual(codec.decode_octet(), 7)

    def test_exact_codec(self) -> None:
        """
        A codec made with exact=True decodes tables exactly.
        """
        wire = encode_table({"n": FieldValue("u", 5)})
        self.assertEqual(FieldTableCodec(BytesIO(wire), exact=True).decode_table(), {"n": FieldValue("u", 5)})

    def test_truncated_stream(self) -> None:
        """
        A table cut short in the stream is a truncated FieldTableDecodeError.
        """
        for wire in (b"", b"\x00\x00", b"\x00\x00\x00\x09\x01kV"):
            with self.assertRaises(FieldTableDecodeError) as caught:
                FieldTableCodec(BytesIO(wire)).decode_table()
            self.assertEqual(caught.exception.reason, TRUNCATED, wire)


class RecordingDelegate:
    """
    A txamqp delegate that records what the client dispatches to it.
    """

    def __init__(self) -> None:
        self.client: Any = None
        self.dispatched: list[Any] = []
        self.closed: list[Any] = []

    def dispatch(self, channel: Any, message: Any) -> None:
        self.dispatched.append((channel, message))

    def close(self, reason: Any) -> None:
        self.closed.append(reason)


class ClientTests(SynchronousTestCase):
    """
    L{FieldTableClient}: txamqp's client speaking through the field-table codec.
    """

    def setUp(self) -> None:
        self.spec = load_spec()
        self.delegate = RecordingDelegate()
        self.client = FieldTableClient(self.delegate, "/", self.spec, clock=Clock())
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def test_mixin_hooks_used(self) -> None:
        """
        The client's frame hooks are the mixin's.
        """
        self.assertIsInstance(self.client, FieldTableFrameMixin)
        self.assertIs(type(self.client)._unpack_frame, FieldTableFrameMixin._unpack_frame)
        self.assertIs(type(self.client)._pack_frame, FieldTableFrameMixin._pack_frame)

    def test_connection_start_reaches_delegate(self) -> None:
        """
        The captured connection.start, fed to the client, reaches the delegate decoded.
        """
        self.assertTrue(self.transport.value().startswith(b"AMQP"))
        self.client.dataReceived(_frame("connection-start.bin"))
        [(channel, message)] = self.delegate.dispatched
        self.assertEqual((channel.id, message.method.name), (0, "start"))
        self.assertIs(message.fields[2]["capabilities"]["consumer_cancel_notify"], True)

    def test_basic_get_with_x_death(self) -> None:
        """
        basic.get answered by the captured dead-lettered message yields its
        x-death header and bytes body.
        """
        channel = self.successResultOf(self.client.channel(1))
        self.transport.clear()
        result = channel.basic_get(queue="fedhub.capture.dead", no_ack=True)
        sent = unpack_frame(self.spec, self.transport.value())
        self.assertEqual(sent.payload.method, self.spec.parse_method("basic.get"))
        self.assertNoResult(result)
        self.client.dataReceived(
            _frame("dead-letter-get-ok.bin") + _frame("dead-letter-header.bin") + _frame("dead-letter-body.bin")
        )
        message = self.successResultOf(result)
        self.assertEqual(message.method.name, "get-ok")
        self.assertEqual(message.content.body, b'{"hello": "world"}')
        death = message.content.properties["headers"]["x-death"][0]
        self.assertEqual((death["count"], death["time"]), (1, CAPTURED_DEATH))

    def test_declare_with_arguments(self) -> None:
        """
        A queue declared through the client sends its arguments table with every type intact.
        """
        channel = self.successResultOf(self.client.channel(1))
        self.transport.clear()
        arguments = {"x-dead-letter-exchange": "dlx", "x-max-length": FieldValue("l", 10), "x-tags": [Decimal("1.5"), b"\x00"]}
        result = channel.queue_declare(queue="q", durable=True, arguments=arguments)
        sent = unpack_frame(self.spec, self.transport.value(), exact=True)
        self.assertEqual(sent.payload.args[-1], arguments)
        self.assertNoResult(result)

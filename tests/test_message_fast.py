"""
The short cuts of L{fedhub.message} give what the long ways give: a body
frozen without a JSON round trip, and a delivery's copy of a message made
without checking its unchanged fields again.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from unittest import mock
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import MessageError
from fedhub.message import (
    FrozenDict,
    FrozenList,
    Message,
    _encode_json,
    _frozen_body,
    _json_object,
    new_message_id,
    utc_now,
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)
_bodies = st.dictionaries(st.text(max_size=8), _json, max_size=8)


def _shape(value: Any) -> Any:
    """
    A value with the class of every container and scalar spelled out, so
    two values compare equal only when their classes match too.
    """
    if isinstance(value, dict):
        return (type(value), [(k, _shape(v)) for k, v in value.items()])
    if isinstance(value, list):
        return (type(value), [_shape(v) for v in value])
    return (type(value), value)


class FrozenBodyTests(SynchronousTestCase):
    """
    L{_frozen_body} equals decoding the body's JSON.
    """

    @settings(max_examples=300, deadline=None)
    @given(_bodies)
    def test_same_as_round_trip(self, body: dict[str, Any]) -> None:
        """Plain JSON data freezes to exactly what its JSON decodes to: values, order, classes."""
        encoded = _encode_json(body)
        self.assertEqual(_shape(_frozen_body(body, encoded)), _shape(_json_object(encoded)))

    def test_not_plain(self) -> None:
        """Tuples, keys that are not strings, subclasses and mappings of other classes come out as their JSON decodes."""

        class Text(str):
            pass

        class Number(int):
            pass

        bodies: list[dict[Any, Any]] = [
            {"a": (1, 2, [3, (4,)])},
            {"a": {1: "one", None: "none", 2.5: "x"}},
            {"a": {True: "yes"}},
            {"a": [Text("t"), Number(3)]},
            {"a": OrderedDict([("b", 1)])},
            {"a": [{"b": FrozenDict({"c": FrozenList([1])})}]},
        ]
        for body in bodies:
            encoded = _encode_json(body)
            self.assertEqual(_shape(_frozen_body(body, encoded)), _shape(_json_object(encoded)))

    def test_deep(self) -> None:
        """A deeply nested body freezes as its JSON decodes."""
        body: dict[str, Any] = {}
        inner = body
        for _ in range(200):
            inner["a"] = {}
            inner = inner["a"]
        encoded = _encode_json(body)
        self.assertEqual(_shape(Message("a.b", body).body), _shape(_json_object(encoded)))

    def test_not_shared(self) -> None:
        """The message's body shares no container with the dict it was built from."""
        body = {"a": [1, {"b": [2]}], "c": {"d": []}}
        message = Message("a.b", body)
        body["a"][1]["b"].append(3)  # type: ignore[index]
        body["c"]["d"].append(4)  # type: ignore[index]
        self.assertEqual(message.body, {"a": [1, {"b": [2]}], "c": {"d": []}})
        self.assertRaises(TypeError, message.body["a"].append, 5)
        self.assertRaises(TypeError, message.body["a"][1].__setitem__, "x", 1)

    def test_invalid(self) -> None:
        """What can not be encoded is still refused."""
        self.assertRaises(MessageError, Message, "a.b", {"a": float("nan")})
        self.assertRaises(MessageError, Message, "a.b", {"a": "\ud800"})
        self.assertRaises(MessageError, Message, "a.b", {"a": object()})


def _slow_evolve(message: Message, **changes: Any) -> Message:
    """
    A copy made through the constructor with every field, checked again.
    """
    fields = {
        "topic": message.topic,
        "body": message.body,
        "headers": message.headers,
        "id": message.id,
        "severity": message.severity,
        "priority": message.priority,
        "sent_at": message.sent_at,
        "schema": message.schema,
        "queue": message.queue,
        "redelivered": message.redelivered,
        "_body_bytes": message.body_bytes,
    }
    fields.update(changes)
    return Message(**fields)


class DeliveredCopyTests(SynchronousTestCase):
    """
    L{Message.evolve} of the queue, redelivered flag and topic gives what the
    constructor gives.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from([None, "q", "a.queue"]),
        st.booleans(),
        st.sampled_from([None, "org.example.other", "x", "bad topic", ""]),
        st.booleans(),
    )
    def test_same_as_constructor(self, queue: str | None, redelivered: bool, topic: str | None,
                                 wire_first: bool) -> None:
        """Same fields, same equality, same wire headers and body bytes; the same refusals."""
        message = Message(
            "org.example.topic",
            {"a": [1, 2]},
            headers={"fedora_messaging_user_jdoe": True},
            id="id-1",
            sent_at=datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc),
            schema="s.v1",
        )
        if wire_first:
            message.encoded_properties()
        changes: dict[str, Any] = {"queue": queue, "redelivered": redelivered}
        if topic is not None:
            changes["topic"] = topic
        try:
            expected = _slow_evolve(message, **changes)
        except MessageError as e:
            with self.assertRaises(MessageError) as caught:
                message.evolve(**changes)
            self.assertEqual(str(caught.exception), str(e))
            return
        copy = message.evolve(**changes)
        self.assertIs(type(copy), Message)
        self.assertEqual(copy, expected)
        for name in ("topic", "queue", "redelivered", "body_bytes", "headers", "sent_at", "schema"):
            self.assertEqual(getattr(copy, name), getattr(expected, name))
        self.assertEqual(copy.wire_headers(), expected.wire_headers())
        self.assertEqual(copy.amqp_properties(), expected.amqp_properties())
        self.assertEqual(copy.encoded_properties(), expected.encoded_properties())

    def test_bad_queue(self) -> None:
        """A queue that is not a string is refused as the constructor refuses it."""
        message = Message("a.b", {})
        self.assertRaises(MessageError, message.evolve, queue=3)


def _fresh_properties(message: Message) -> bytes:
    """The encoded properties from an encoder that has seen no other message."""
    from fedhub.amqp.frames import PublishEncoder
    from fedhub.amqp.spec import load_spec

    return PublishEncoder(load_spec(), 4096).property_bytes(message.amqp_properties())


_header_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
    | st.lists(st.integers(min_value=-5, max_value=5) | st.booleans(), max_size=3)
)


class EncodedPropertiesTests(SynchronousTestCase):
    """
    L{Message.encoded_properties}, which keeps the encodings of properties
    that messages share, gives what an encoder without caches gives.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.dictionaries(st.sampled_from(["a", "b", "x_user"]), _header_values, max_size=3),
                st.sampled_from([0, 3, 255]),
                st.sampled_from(["id-1", "\u00e9t\u00e9-2", "x" * 255]),
                st.sampled_from([None, datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    def test_same_as_uncached(self, made: list[tuple[dict[str, Any], int, str, datetime | None]]) -> None:
        """Messages made one after another, alike or not, each encode as they would alone."""
        for headers, priority, message_id, sent_at in made:
            message = Message("a.b", {}, headers=headers, priority=priority, id=message_id, sent_at=sent_at)
            self.assertEqual(message.encoded_properties(), _fresh_properties(message))
            self.assertIs(message.encoded_properties(), message.encoded_properties())

    def test_alike_values(self) -> None:
        """True and 1, 0.0 and -0.0, and headers in another order encode apart."""
        seen = set()
        for headers in ({"x": True}, {"x": 1}, {"x": 0.0}, {"x": -0.0}, {"x": 1, "y": 2}, {"y": 2, "x": 1}):
            for _ in range(2):
                message = Message("a.b", {}, headers=headers, id="same")
                self.assertEqual(message.encoded_properties(), _fresh_properties(message))
            seen.add(message.encoded_properties())
        self.assertEqual(len(seen), 6)

    def test_changed_copy(self) -> None:
        """A copy with another priority or other headers encodes its own properties."""
        message = Message("a.b", {}, id="m", sent_at=None)
        message.encoded_properties()
        for copy in (message.evolve(priority=9), message.evolve(headers={"z": 1}), message.evolve(id="n")):
            self.assertEqual(copy.encoded_properties(), _fresh_properties(copy))
            self.assertNotEqual(copy.encoded_properties(), message.encoded_properties())

    def test_cache_bounded(self) -> None:
        """The cache of shared encodings stays bounded."""
        import fedhub.message as module

        for n in range(module._PROPERTIES_CACHE_SIZE * 2 + 3):
            Message("a.b", {}, headers={f"h{n}": n}).encoded_properties()
            self.assertLessEqual(len(module._properties_cache), module._PROPERTIES_CACHE_SIZE)

    def test_large_headers_not_kept(self) -> None:
        """Messages with large headers are encoded right without their encodings being kept."""
        import fedhub.message as module

        module._properties_cache.clear()
        for n in range(3):
            message = Message("a.b", {}, headers={"big": "x" * 5000}, id=f"m{n}")
            self.assertEqual(message.encoded_properties(), _fresh_properties(message))
        self.assertEqual(module._properties_cache, {})
        small = Message("a.b", {}, headers={"small": "x"})
        small.encoded_properties()
        self.assertEqual(len(module._properties_cache), 1)

    def test_not_encodable(self) -> None:
        """An id longer than a short string, or a header AMQP can not carry, is a MessageError that names the message."""
        too_long = Message("a.b", {}, id="x" * 256)
        huge = Message("a.b", {}, id="huge", headers={"n": 2**64})
        for message in (too_long, huge, too_long):
            with self.assertRaises(MessageError) as caught:
                message.encoded_properties()
            self.assertIn(message.id[:20], str(caught.exception))


class SentAtTextTests(SynchronousTestCase):
    """
    The sent-at header is the time's ISO 8601 text, however the last one
    formatted is remembered.
    """

    def test_same_instant_other_zone(self) -> None:
        """
        The same instant in another time zone keeps its own offset in the header.
        """
        utc = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc)
        plus_one = utc.astimezone(timezone(timedelta(hours=1)))
        self.assertEqual(utc, plus_one)
        first = Message.create("a.b", {}, sent_at=utc)
        second = Message.create("a.b", {}, sent_at=plus_one)
        self.assertEqual(first.wire_headers()["sent-at"], "2026-11-28T10:00:00+00:00")
        self.assertEqual(second.wire_headers()["sent-at"], "2026-11-28T11:00:00+01:00")

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.datetimes(
                    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30),
                ),
                st.sampled_from([0, 0, 60, -330, 14 * 60]),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def test_any_sequence(self, times: list[tuple[datetime, int]]) -> None:
        """
        For any sequence of times (repeats included), the header is isoformat().
        """
        for naive, minutes in times:
            zone = timezone.utc if minutes == 0 else timezone(timedelta(minutes=minutes))
            when = naive.replace(microsecond=0, tzinfo=zone)
            for _ in range(2):
                message = Message.create("a.b", {}, sent_at=when)
                self.assertEqual(message.wire_headers()["sent-at"], when.isoformat())


class NewIdTests(SynchronousTestCase):
    """
    A fresh message id is what str(uuid.uuid4()) would give.
    """

    def test_version_4_text(self) -> None:
        """Every id is the canonical text of a random (version 4, RFC 4122) UUID."""
        for _ in range(2000):
            text = new_message_id()
            parsed = uuid.UUID(text)
            self.assertEqual(str(parsed), text)
            self.assertEqual(parsed.version, 4)
            self.assertEqual(parsed.variant, uuid.RFC_4122)
            self.assertRegex(text, r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")

    def test_random(self) -> None:
        """Ids do not repeat, and every random digit takes every value."""
        ids = [new_message_id() for _ in range(5000)]
        self.assertEqual(len(set(ids)), len(ids))
        # The 30 digits that are not version or variant bits.
        digits = [re.sub("-", "", i) for i in ids]
        for position in (0, 7, 13, 20, 31):
            self.assertEqual({d[position] for d in digits}, set("0123456789abcdef"))

    def test_messages_use_it(self) -> None:
        """Message.create and the constructor give each message such an id of its own."""
        first = Message.create("a.b", {})
        second = Message("a.b", {})
        self.assertNotEqual(first.id, second.id)
        for message in (first, second):
            self.assertEqual(uuid.UUID(message.id).version, 4)


class UtcNowTests(SynchronousTestCase):
    """
    utc_now is the current second in UTC, however the last one is remembered.
    """

    def test_now(self) -> None:
        """It is the present second, in UTC, without microseconds."""
        before = datetime.now(timezone.utc).replace(microsecond=0)
        now = utc_now()
        after = datetime.now(timezone.utc).replace(microsecond=0)
        self.assertTrue(before <= now <= after)
        self.assertIs(now.tzinfo, timezone.utc)
        self.assertEqual(now.microsecond, 0)

    def test_follows_the_clock(self) -> None:
        """Within a second it is the same; the next second it is the next one, and going back too."""
        with mock.patch("fedhub.message.time.time", return_value=1_800_000_000.25):
            first = utc_now()
            self.assertIs(utc_now(), first)
        with mock.patch("fedhub.message.time.time", return_value=1_800_000_000.99):
            self.assertEqual(utc_now(), first)
        with mock.patch("fedhub.message.time.time", return_value=1_800_000_001.0):
            self.assertEqual(utc_now(), datetime(2027, 1, 15, 8, 0, 1, tzinfo=timezone.utc))
        with mock.patch("fedhub.message.time.time", return_value=1_799_999_999.5):
            self.assertEqual(utc_now(), datetime(2027, 1, 15, 7, 59, 59, tzinfo=timezone.utc))
        self.assertEqual(first, datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc))

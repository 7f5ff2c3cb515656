"""
Tests for L{fedhub.message}: validation, immutability and the exact
fedora-messaging wire format.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import DecodeError, MessageError
from fedhub.message import (
    BASE_SCHEMA,
    DEBUG,
    ERROR,
    INFO,
    SEVERITIES,
    WARNING,
    Message,
    dump_line,
    dumps,
    from_amqp,
    iter_loads,
    load_message,
    loads,
)

SENT = datetime(2026, 11, 28, 6, 0, 0, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def sample(**changes: object) -> Message:
    fields: dict[str, object] = {
        "topic": "org.fedoraproject.prod.bugzilla.bug.update",
        "body": {"bug": {"id": 218297, "keywords": ["Regression"]}, "who": "jdoe"},
        "headers": {"fedora_messaging_user_jdoe": True, "fedora_messaging_rpm_kernel": True},
        "id": "5c2d6ab0-8b8c-4c8b-9a43-1c3fd3a4a111",
        "severity": WARNING,
        "priority": 3,
        "sent_at": SENT,
        "schema": "bugzilla2fedmsg.messageV1",
    }
    fields.update(changes)
    return Message(**fields)  # type: ignore[arg-type]


class CreateTests(SynchronousTestCase):
    """
    Building messages.
    """

    def test_defaults(self) -> None:
        """create() gives a UUID4 id, INFO severity, priority 0, base schema and a UTC time without microseconds."""
        message = Message.create("a.b", {"x": 1})
        self.assertEqual(uuid.UUID(message.id).version, 4)
        self.assertEqual(message.severity, INFO)
        self.assertEqual(message.priority, 0)
        self.assertEqual(message.schema, BASE_SCHEMA)
        assert message.sent_at is not None
        self.assertEqual(message.sent_at.microsecond, 0)
        self.assertEqual(message.sent_at.utcoffset(), timedelta(0))
        self.assertEqual(dict(message.headers), {})

    def test_severities(self) -> None:
        """The severities are fedora-messaging's 10/20/30/40."""
        self.assertEqual((DEBUG, INFO, WARNING, ERROR), (10, 20, 30, 40))
        self.assertEqual(SEVERITIES, (10, 20, 30, 40))

    def test_topic_limit(self) -> None:
        """A topic of 255 bytes is accepted, 256 bytes (counted in UTF-8) is refused."""
        Message.create("a" * 255, {})
        self.assertRaises(MessageError, Message.create, "a" * 256, {})
        self.assertRaises(MessageError, Message.create, "é" * 128, {})

    def test_bad_topics(self) -> None:
        """Empty, non-string and whitespace-holding topics are refused."""
        for topic in ("", None, 42, "a b", "a\nb", "a\x00b"):
            self.assertRaises(MessageError, Message.create, topic, {})

    def test_topics_amqp_routes(self) -> None:
        """Empty words and literal * or # (routed by the broker, sent by fedora-messaging) are accepted on every path."""
        for topic in ("a..b", ".a", "a.", "org.fedoraproject.", "a.*.b", "a.#"):
            with self.subTest(topic=topic):
                message = Message.create(topic, {"n": 1})
                self.assertEqual(list(iter_loads([dump_line(message)])), [message])
                self.assertEqual(from_amqp(topic, {}, b"{}").topic, topic)
                self.assertEqual(sample().evolve(topic=topic).topic, topic)

    def test_body_must_be_object(self) -> None:
        """A body that is not a JSON object is refused with a typed error."""
        for body in ([], "text", 1, None):
            self.assertRaises(MessageError, Message.create, "a", body)

    def test_body_must_be_json(self) -> None:
        """A body with values JSON can not carry (sets, NaN, bytes) is refused."""
        for body in ({"s": {1}}, {"n": float("nan")}, {"b": b"x"}):
            self.assertRaises(MessageError, Message.create, "a", body)

    def test_deep_body_refused(self) -> None:
        """A body nested 100k deep is refused with MessageError, not RecursionError."""
        body: dict[str, object] = {}
        node = body
        for _ in range(100_000):
            child: dict[str, object] = {}
            node["a"] = child
            node = child
        self.assertRaises(MessageError, Message.create, "a", body)

    def test_severity_checked(self) -> None:
        """Severity must be one of the four levels, and an int (not a bool)."""
        for severity in (0, 15, 50, True, "20"):
            self.assertRaises(MessageError, Message.create, "a", {}, severity=severity)

    def test_priority_checked(self) -> None:
        """Priority must be an integer 0..255."""
        for priority in (-1, 256, 1.5, "1"):
            self.assertRaises(MessageError, Message.create, "a", {}, priority=priority)

    def test_naive_time_refused(self) -> None:
        """sent_at must be timezone-aware."""
        self.assertRaises(MessageError, Message.create, "a", {}, sent_at=datetime(2026, 1, 1))

    def test_managed_headers_refused(self) -> None:
        """Headers the model manages can not be set as extra headers."""
        for name in ("fedora_messaging_schema", "fedora_messaging_severity", "sent-at", "priority"):
            self.assertRaises(MessageError, Message.create, "a", {}, headers={name: 1})

    def test_immutable(self) -> None:
        """Fields, body (nested too) and headers can not be changed."""
        message = sample()
        with self.assertRaises(AttributeError):
            message.topic = "x"  # type: ignore[misc]
        with self.assertRaises(TypeError):
            message.body["who"] = "x"  # type: ignore[index]
        with self.assertRaises(TypeError):
            message.body["bug"]["keywords"].append("x")
        with self.assertRaises(TypeError):
            message.headers["x"] = 1  # type: ignore[index]

    def test_caller_dict_copied(self) -> None:
        """Changing the dict a message was built from does not change the message."""
        body = {"a": [1]}
        message = Message.create("a", body)
        body["a"].append(2)
        self.assertEqual(message.body, {"a": [1]})

    def test_evolve(self) -> None:
        """evolve() changes one field and keeps the rest, validating again."""
        message = sample()
        other = message.evolve(queue="q")
        self.assertEqual(other.queue, "q")
        self.assertEqual(other.id, message.id)
        self.assertEqual(other.body_bytes, message.body_bytes)
        self.assertRaises(MessageError, message.evolve, severity=11)

    def test_hashable(self) -> None:
        """Messages can be kept in sets."""
        self.assertEqual(len({sample(), sample()}), 1)


class AMQPWireTests(SynchronousTestCase):
    """
    The mapping to and from AMQP properties, headers and body bytes.
    """

    def test_properties(self) -> None:
        """Every property fedora-messaging sets has its exact value."""
        self.assertEqual(
            sample().amqp_properties(),
            {
                "content_type": "application/json",
                "content_encoding": "utf-8",
                "delivery_mode": 2,
                "message_id": "5c2d6ab0-8b8c-4c8b-9a43-1c3fd3a4a111",
                "priority": 3,
                "headers": {
                    "fedora_messaging_schema": "bugzilla2fedmsg.messageV1",
                    "fedora_messaging_severity": 30,
                    "sent-at": "2026-11-28T06:00:00+00:00",
                    "priority": 3,
                    "fedora_messaging_user_jdoe": True,
                    "fedora_messaging_rpm_kernel": True,
                },
            },
        )

    def test_sent_at_format(self) -> None:
        """sent-at is ISO 8601 with its UTC offset kept and microseconds dropped."""
        tz = timezone(timedelta(hours=2))
        message = sample(sent_at=datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=tz))
        self.assertEqual(message.wire_headers()["sent-at"], "2026-01-02T03:04:05+02:00")

    def test_body_bytes(self) -> None:
        """The body goes on the wire as UTF-8 JSON that decodes to the same object."""
        message = sample(body={"name": "Nützel", "n": [1, 2]})
        self.assertEqual(json.loads(message.body_bytes.decode("utf-8")), {"name": "Nützel", "n": [1, 2]})
        self.assertIn("Nützel".encode(), message.body_bytes)

    def test_round_trip(self) -> None:
        """from_amqp(topic, properties, body) gives back an equal message."""
        message = sample()
        back = from_amqp(message.topic, message.amqp_properties(), message.body_bytes)
        self.assertEqual(back, message)
        self.assertEqual(back.queue, None)
        self.assertEqual(from_amqp(message.topic, message.amqp_properties(), message.body_bytes, "q").queue, "q")

    def test_minimal_delivery(self) -> None:
        """A delivery with no properties at all decodes with fedora-messaging's defaults."""
        message = from_amqp("a.b", {}, b'{"x": 1}')
        self.assertEqual(message.severity, INFO)
        self.assertEqual(message.schema, BASE_SCHEMA)
        self.assertEqual(message.priority, 0)
        self.assertIsNone(message.sent_at)
        self.assertEqual(uuid.UUID(message.id).version, 4)
        self.assertEqual(message.body, {"x": 1})

    def test_other_encoding(self) -> None:
        """A body in a declared non-UTF-8 encoding is decoded by it."""
        body = '{"name": "Nützel"}'.encode("latin-1")
        message = from_amqp("a", {"content_encoding": "iso-8859-1"}, body)
        self.assertEqual(message.body, {"name": "Nützel"})

    def test_bad_bodies(self) -> None:
        """Invalid UTF-8, non-JSON, non-object bodies, NaN and 100k-deep nesting give DecodeError."""
        for body in (b"\xff\xfe{}", b"not json", b"[1, 2]", b'"x"', b'{"a": NaN}',
                     b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000):
            with self.subTest(body=body[:20]):
                self.assertRaises(DecodeError, from_amqp, "a", {}, body)

    def test_unknown_encoding(self) -> None:
        """An unknown content encoding, or a name no codec can have, is a DecodeError."""
        for name in ("klingon", "utf\x00-8", "utf-8\udc80", b"utf\x00-8", "x" * 100_000):
            with self.subTest(name=name[:20]):
                with self.assertRaises(DecodeError) as raised:
                    from_amqp("a", {"content_encoding": name}, b"{}")
                self.assertLess(len(str(raised.exception)), 200)

    def test_bad_headers(self) -> None:
        """Managed headers of the wrong type or value give DecodeError."""
        for headers in (
            {"fedora_messaging_severity": "20"},
            {"fedora_messaging_severity": 25},
            {"fedora_messaging_severity": True},
            {"fedora_messaging_schema": 5},
            {"fedora_messaging_schema": ""},
            {"sent-at": 12},
            {"sent-at": "yesterday"},
            {"priority": "high"},
            {"priority": 300},
            "not a table",
        ):
            with self.subTest(headers=headers):
                self.assertRaises(DecodeError, from_amqp, "a", {"headers": headers}, b"{}")

    def test_bad_topic_on_wire(self) -> None:
        """An over-long routing key is a DecodeError."""
        self.assertRaises(DecodeError, from_amqp, "a" * 300, {}, b"{}")

    def test_naive_sent_at_is_utc(self) -> None:
        """A sent-at without offset is read as UTC."""
        message = from_amqp("a", {"headers": {"sent-at": "2026-11-28T06:00:00"}}, b"{}")
        self.assertEqual(message.sent_at, SENT)

    def test_extra_headers_kept(self) -> None:
        """Unknown headers of every type survive decoding as extra headers."""
        headers = {"x-death": [{"count": 1, "queue": "q"}], "flag": True, "n": 5, "s": "t"}
        message = from_amqp("a", {"headers": headers}, b"{}")
        self.assertEqual(message.headers, headers)


class SerializedFormTests(SynchronousTestCase):
    """
    The one-JSON-object-per-line form used by files and the command line.
    """

    def test_record(self) -> None:
        """A record has exactly topic, headers, id, body, queue, priority, with sorted keys."""
        line = dumps(sample())
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(
            record,
            {
                "topic": "org.fedoraproject.prod.bugzilla.bug.update",
                "headers": {
                    "fedora_messaging_schema": "bugzilla2fedmsg.messageV1",
                    "fedora_messaging_severity": 30,
                    "sent-at": "2026-11-28T06:00:00+00:00",
                    "priority": 3,
                    "fedora_messaging_user_jdoe": True,
                    "fedora_messaging_rpm_kernel": True,
                },
                "id": "5c2d6ab0-8b8c-4c8b-9a43-1c3fd3a4a111",
                "body": {"bug": {"id": 218297, "keywords": ["Regression"]}, "who": "jdoe"},
                "queue": None,
                "priority": 3,
            },
        )
        self.assertEqual(list(record), sorted(record))

    def test_round_trip(self) -> None:
        """loads(dumps(messages)) gives the same messages in order."""
        messages = [sample(), sample(id="other", queue="q", severity=DEBUG), Message.create("x", {})]
        self.assertEqual(loads(dumps(messages)), messages)
        self.assertEqual(loads(dumps(messages).encode("utf-8")), messages)

    def test_fedora_messaging_record(self) -> None:
        """A record as fedora-messaging's dumps writes it loads with every field."""
        line = (
            '{"body": {"a": 1}, "headers": {"fedora_messaging_schema": "base.message", '
            '"fedora_messaging_severity": 20, "priority": 0, "sent-at": "2026-11-28T06:00:00+00:00", '
            '"fedora_messaging_user_jdoe": true}, "id": "abc", "priority": null, "queue": null, '
            '"topic": "t.x"}\n'
        )
        (message,) = loads(line)
        self.assertEqual(message.id, "abc")
        self.assertEqual(message.priority, 0)
        self.assertEqual(message.sent_at, SENT)
        self.assertEqual(dict(message.headers), {"fedora_messaging_user_jdoe": True})

    def test_minimal_record(self) -> None:
        """Only topic and body are required."""
        (message,) = loads('{"topic": "a", "body": {}}')
        self.assertEqual(message.topic, "a")

    def test_blank_lines_skipped(self) -> None:
        """Blank lines between records are ignored."""
        self.assertEqual(len(loads('\n{"topic": "a", "body": {}}\n\n{"topic": "b", "body": {}}\n')), 2)

    def test_errors_name_the_line(self) -> None:
        """A bad record fails with DecodeError naming its 1-based line."""
        good = '{"topic": "a", "body": {}}'
        cases = {
            "not json": "not valid JSON",
            "[1]": "not an object",
            '{"body": {}}': "no 'topic'",
            '{"topic": "a"}': "no 'body'",
            '{"topic": "a", "body": []}': "body is a JSON array, not an object",
            '{"topic": "a", "body": {}, "extra": 1}': "unknown keys",
            '{"topic": "a", "body": {}, "headers": {"fedora_messaging_severity": 7}}': "fedora_messaging_severity",
            '{"topic": "", "body": {}}': "topic",
            "[" * 100_000: "nested too deeply",
        }
        for bad, reason in cases.items():
            with self.subTest(bad=bad[:30]):
                error = self.assertRaises(DecodeError, loads, f"{good}\n{good}\n{bad}\n")
                self.assertEqual(error.line, 3)
                self.assertIn(reason, str(error))

    def test_invalid_utf8_line(self) -> None:
        """A line of invalid UTF-8 is a DecodeError with its line number."""
        error = self.assertRaises(DecodeError, list, iter_loads([b'{"topic": "a", "body": {}}', b"\xff{}"]))
        self.assertEqual(error.line, 2)

    def test_amqp_only_header_values(self) -> None:
        """Header values JSON lacks (x-death timestamps, decimals, bytes) serialize as strings."""
        death = {"count": 1, "time": SENT, "queue": "q", "routing-keys": ["a"]}
        message = sample(headers={"x-death": [death], "d": Decimal("1.5"), "b": b"raw"})
        (back,) = loads(dumps(message))
        self.assertEqual(back.headers["x-death"][0]["time"], "2026-11-28T06:00:00+00:00")
        self.assertEqual(back.headers["d"], "1.5")
        self.assertEqual(back.headers["b"], "raw")

    def test_far_timestamp_header(self) -> None:
        """A timestamp past year 9999 (a FieldValue off the wire) serializes as ISO 8601 text with an expanded year, which loads and publishes."""
        from fedhub.amqp.codec import FieldValue, decode_table, encode_table

        year_10000 = int((datetime(9999, 12, 31, tzinfo=timezone.utc) - EPOCH).total_seconds()) + 86400
        later = year_10000 + 146097 * 86400 + 3661
        raw = encode_table({
            "far": FieldValue("T", year_10000),
            "x-death": [{"count": 1, "time": FieldValue("T", later), "queue": "q"}],
            "end": FieldValue("T", 2**64 - 1),
        })
        headers, _ = decode_table(raw)
        message = from_amqp("a.b", {"headers": headers}, b"{}")
        (back,) = loads(dump_line(message))
        self.assertEqual(back.headers["far"], "+10000-01-01T00:00:00+00:00")
        self.assertEqual(back.headers["x-death"][0]["time"], "+10400-01-01T01:01:01+00:00")
        self.assertEqual(back.headers["end"], "+584554051223-11-09T07:00:15+00:00")
        self.assertTrue(back.encoded_properties)

    def test_typed_header_values(self) -> None:
        """A header value carrying an explicit AMQP type serializes as its value."""
        from fedhub.amqp.codec import FieldValue

        message = sample(headers={"n": FieldValue("l", 5), "f": FieldValue("f", 0.5), "s": FieldValue("S", b"\xff")})
        (back,) = loads(dumps(message))
        self.assertEqual(
            (back.headers["n"], back.headers["f"], back.headers["s"]), (5, 0.5, "\ufffd")
        )

    def test_lone_surrogates_escaped(self) -> None:
        """Lone surrogates (header names not UTF-8 on the wire, unpaired escapes in a body) are written as JSON escapes."""
        message = from_amqp("a.b", {"headers": {"\udcffname": "v\u00fc"}}, b'{"x": "\u00fc"}')
        line = dump_line(message)
        data = line.encode("utf-8")
        self.assertIn(b'"\\udcffname": "v\xc3\xbc"', data)
        self.assertEqual(loads(data), [message])
        self.assertEqual(loads(dumps([message, sample()])), [message, sample()])
        odd_body = from_amqp("a.b", {}, b'{"x": "\\ud800 and \\udfff", "\\udbff": 1}')
        self.assertEqual(odd_body.body, {"x": "\ud800 and \udfff", "\udbff": 1})
        record = json.loads(dump_line(odd_body).encode("utf-8"))
        self.assertEqual(record["body"], odd_body.body)

    def test_line_breaks_of_splitlines_escaped(self) -> None:
        """
        U+0085, U+2028 and U+2029, which str.splitlines (and so
        fedora-messaging's loads) takes for line ends, are written as escapes:
        the line stays one line for both, with the same value.
        """
        from fedora_messaging import message as fm_message

        message = sample(body={"s": "a\u2028b\u2029c\x85d\u00e9"},
                         headers={"note\u2028": "x\u2029"})
        line = dump_line(message)
        self.assertEqual(line.splitlines(), [line[:-1]])
        self.assertIn("\\u2028b\\u2029c\\u0085d\u00e9", line)
        self.assertEqual(loads(line.encode("utf-8")), [message])
        (theirs,) = fm_message.loads(line)
        self.assertEqual((theirs.id, theirs.body), (message.id, dict(message.body)))

    def test_load_message_not_mapping(self) -> None:
        """load_message refuses what is not an object."""
        self.assertRaises(DecodeError, load_message, ["topic"])

    def test_decoded_body_deeply_immutable(self) -> None:
        """Lists in lists, objects in lists and lists in objects of a delivery are all frozen."""
        body = b'{"a": [[1, [2]], {"b": [3]}], "c": {"d": [[]]}}'
        for message in (from_amqp("a", {}, body), loads(dumps(from_amqp("a", {}, body)))[0]):
            with self.subTest(message=message):
                self.assertEqual(message.body, json.loads(body))
                for target in (message.body["a"], message.body["a"][0], message.body["a"][0][1],
                               message.body["a"][1]["b"], message.body["c"]["d"][0]):
                    self.assertRaises(TypeError, target.append, 9)
                self.assertRaises(TypeError, message.body["a"][1].update, {"x": 1})
        without_arrays = from_amqp("a", {}, b'{"a": {"b": {"c": 1}}}')
        self.assertRaises(TypeError, without_arrays.body["a"]["b"].update, {"x": 1})
        self.assertEqual(without_arrays.body, {"a": {"b": {"c": 1}}})

    def test_decoded_message_behaves_like_a_built_one(self) -> None:
        """A delivered message hashes, compares, evolves and re-encodes like one built locally."""
        message = sample(sent_at=SENT)
        back = from_amqp(message.topic, message.amqp_properties(), message.body_bytes, "q", True)
        self.assertTrue(back.redelivered)
        self.assertEqual(hash(back), hash(message))
        self.assertEqual(back.body_bytes, message.body_bytes)
        self.assertEqual(back.amqp_properties(), message.amqp_properties())
        self.assertEqual(back.evolve(queue=None), message)
        self.assertRaises(MessageError, back.evolve, priority=256)
        with self.assertRaises(AttributeError):
            back.topic = "x"  # type: ignore[misc]

    def test_delivery_fields_checked(self) -> None:
        """An out-of-range priority property is a DecodeError; microseconds of sent-at are dropped."""
        self.assertRaises(DecodeError, from_amqp, "a", {"priority": 256}, b"{}")
        self.assertRaises(DecodeError, from_amqp, "a b", {}, b"{}")
        message = from_amqp("a", {"headers": {"sent-at": "2026-11-28T06:00:00.123456+00:00"}}, b"{}")
        self.assertEqual(message.sent_at, SENT)

    def test_json_text_forms(self) -> None:
        """Leading whitespace and other Unicode encodings JSON allows decode; lone surrogates do not."""
        self.assertEqual(from_amqp("a", {}, b' \n{"x": 1}').body, {"x": 1})
        self.assertEqual(from_amqp("a", {}, '{"x": "\u00fc"}'.encode("utf-16")).body, {"x": "\u00fc"})
        self.assertRaises(DecodeError, from_amqp, "a", {}, b' {"x": "\xed\xa0\x80"}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


class PropertyTests(SynchronousTestCase):
    """
    Round trips over generated messages.
    """

    @settings(max_examples=150, deadline=None)
    @given(
        body=st.dictionaries(st.text(), json_values, max_size=6),
        severity=st.sampled_from(SEVERITIES),
        priority=st.integers(0, 255),
        topic=st.from_regex(r"[a-z0-9_\-]{1,20}(\.[a-z0-9_\-*#]{1,20}){0,8}", fullmatch=True),
    )
    def test_wire_round_trip(self, body: dict[str, object], severity: int, priority: int, topic: str) -> None:
        """Any valid message survives both the AMQP mapping and the serialized form."""
        message = Message.create(topic, body, severity=severity, priority=priority)
        self.assertEqual(from_amqp(topic, message.amqp_properties(), message.body_bytes), message)
        self.assertEqual(loads(dumps(message)), [message])

    @settings(max_examples=200, deadline=None)
    @given(data=st.binary(max_size=200), headers=st.dictionaries(st.text(max_size=30), json_values, max_size=4))
    def test_decoding_never_crashes(self, data: bytes, headers: dict[str, object]) -> None:
        """Arbitrary bytes and headers decode or raise DecodeError, nothing else."""
        try:
            from_amqp("a.b", {"headers": headers}, data)
        except DecodeError:
            pass

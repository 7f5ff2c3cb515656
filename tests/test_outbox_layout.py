"""
Tests for the stored form of outbox messages: the AMQP form that layout 3
writes (L{fedhub.outbox.store.encode}), the cheap read-back for publishing
(L{fedhub.outbox.store.decode_for_publish}, L{StoredMessage}), and stores
written by layouts 1 and 2, which must still open and drain.

C{tests/data/outbox/layout1.sqlite3} was written by the store of layout 1
(fedhub at commit 33c46f0) with the messages of L{layout1_messages}: all
five handed over at times 1000.0 to 1004.0, then the second moved to the
failed area as returned at 2000.0.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
from datetime import datetime, timezone
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.frames import PublishEncoder
from fedhub.amqp.spec import load_spec
from fedhub.errors import DecodeError
from fedhub.message import WARNING, Message, from_amqp
from fedhub.outbox import RETURNED, Store, SynchronousExecutor
from fedhub.outbox import store as store_module
from fedhub.outbox.store import (
    AMQP_FORM,
    DATABASE_NAME,
    PUBLISH_FORM,
    SCHEMA_VERSION,
    StoredMessage,
    decode,
    decode_for_publish,
    encode,
)
from tests.test_outbox import FakeBus, OutboxTestCase

LAYOUT1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "outbox", "layout1.sqlite3")

SENT_AT = datetime(2026, 11, 28, 6, 0, 0, tzinfo=timezone.utc)


def layout1_messages() -> list[Message]:
    """
    The messages in the layout 1 database, in hand-over order.
    """
    return [
        Message.create(
            "org.example.dev.layout.one",
            {"n": 1, "text": "h\u00e9llo", "list": [1, [2, 3], {"x": None}]},
            headers={"fedora_messaging_user_jdoe": True},
            id="00000000-0000-4000-8000-000000000001",
            sent_at=SENT_AT,
        ),
        Message(
            "org.example.dev.layout.two",
            {"n": 2},
            id="00000000-0000-4000-8000-000000000002",
            sent_at=None,
            severity=WARNING,
            priority=5,
            schema="example.schema",
        ),
        from_amqp(
            "org.example.dev.layout.three",
            {
                "message_id": "00000000-0000-4000-8000-000000000003",
                "headers": {"x": 1, "fedora_messaging_severity": 30, "sent-at": "2026-11-28T06:00:00+00:00"},
            },
            b'\xef\xbb\xbf{"n": 3}',
            queue="some.queue",
        ),
        Message.create(
            "org.example.dev.layout.four",
            {"n": 4},
            headers={"fedora_messaging_rpm_kernel": True, "tags": ["a", "b"]},
            id="00000000-0000-4000-8000-000000000004",
            sent_at=SENT_AT,
        ),
        Message.create(
            "org.example.dev.layout.five",
            {"n": 5},
            id="00000000-0000-4000-8000-000000000005",
            sent_at=SENT_AT,
        ),
    ]


def varied_messages() -> list[Message]:
    """
    Messages that exercise every part of the stored form.
    """
    return layout1_messages() + [
        from_amqp("org.example.t", {"message_id": "m1", "headers": {"x": 1}}, raw)
        for raw in (b'  {"a": [1, 2]}', b'{\n  "a": "x\\ny"\n}\n', b'\xef\xbb\xbf{"a": 1}')
    ]


def stored_version(directory: str) -> Any:
    """
    The layout version a closed store in C{directory} says it has.
    """
    conn = sqlite3.connect(os.path.join(directory, DATABASE_NAME))
    try:
        return conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    finally:
        conn.close()

class PublishFormTests(SynchronousTestCase):
    """
    The stored form is what publishing needs, and reads back unchanged.
    """

    def test_layout(self) -> None:
        """
        A record is the form byte, four lengths, the topic, id and queue, the properties as published, and the body bytes as published.
        """
        message = layout1_messages()[2]
        data = encode(message)
        self.assertEqual(data[:1], AMQP_FORM)
        sizes = struct.unpack_from("!HHHI", data, 1)
        topic = b"org.example.dev.layout.three"
        message_id = b"00000000-0000-4000-8000-000000000003"
        properties = fresh_properties(message)
        self.assertEqual(sizes, (len(topic), len(message_id), len(b"some.queue"), len(properties)))
        self.assertEqual(data[11:], topic + message_id + b"some.queue" + properties + b'\xef\xbb\xbf{"n": 3}')
        # No queue: its length is 0xFFFF and it takes no bytes.
        plain = layout1_messages()[4]
        data = encode(plain)
        self.assertEqual(struct.unpack_from("!HHHI", data, 1)[2], 0xFFFF)
        self.assertTrue(data.endswith(fresh_properties(plain) + plain.body_bytes))
        self.assertIsNone(decode(data).queue)
        self.assertIsNone(decode_for_publish(data).queue)
        # An empty queue name is not none.
        empty = plain.evolve(queue="")
        self.assertEqual(decode(encode(empty)).queue, "")
        self.assertEqual(decode_for_publish(encode(empty)).queue, "")

    def test_properties_published_as_stored(self) -> None:
        """
        A message read back carries the stored properties, which are what an encoder without caches makes of it.
        """
        for message in varied_messages():
            data = encode(message)
            stored = decode_for_publish(data)
            self.assertEqual(stored.encoded_properties(), fresh_properties(message))
            self.assertIn(stored.encoded_properties(), data)

    def test_stored_message_equal(self) -> None:
        """
        A message read back for publishing equals the original both ways, and publishes the same bytes and properties.
        """
        for message in varied_messages():
            stored = decode_for_publish(encode(message))
            self.assertIsInstance(stored, StoredMessage)
            self.assertEqual(stored, message)
            self.assertEqual(message, stored)
            self.assertEqual(hash(stored), hash(message))
            self.assertEqual(stored.body_bytes, message.body_bytes)
            self.assertEqual(stored.amqp_properties(), message.amqp_properties())
            self.assertEqual(stored.wire_headers(), message.wire_headers())
            self.assertEqual(
                (stored.topic, stored.id, stored.sent_at, stored.schema, stored.severity, stored.queue),
                (message.topic, message.id, message.sent_at, message.schema, message.severity, message.queue),
            )
            self.assertEqual(stored.to_serialized(), message.to_serialized())

    def test_body_decoded_on_demand(self) -> None:
        """
        Reading a message back for publishing leaves its body undecoded until something reads it.
        """
        message = layout1_messages()[0]
        stored = decode_for_publish(encode(message))
        self.assertNotIn("body", vars(stored))
        stored.amqp_properties()
        self.assertNotIn("body", vars(stored))
        self.assertEqual(stored.body, message.body)
        self.assertIn("body", vars(stored))
        self.assertRaises(TypeError, stored.body["list"].append, 4)

    def test_stored_message_immutable(self) -> None:
        """
        A message read back is as immutable as any other, headers included.
        """
        stored = decode_for_publish(encode(layout1_messages()[3]))
        self.assertRaises(AttributeError, setattr, stored, "topic", "x")
        self.assertRaises(TypeError, stored.headers.__setitem__, "x", 1)
        self.assertRaises(TypeError, stored.headers["tags"].append, "c")
        self.assertRaises(TypeError, stored.wire_headers()["tags"].append, "c")

    def test_evolve(self) -> None:
        """
        Changing a message read back makes a plain, validated message.
        """
        stored = decode_for_publish(encode(layout1_messages()[0]))
        changed = stored.evolve(priority=7, headers={"y": 1})
        self.assertIs(type(changed), Message)
        self.assertEqual(changed.amqp_properties()["headers"]["y"], 1)
        self.assertNotIn("fedora_messaging_user_jdoe", changed.wire_headers())
        self.assertEqual(changed.body, stored.body)

    def test_full_decode(self) -> None:
        """
        decode() of the publish form builds a plain message, body decoded and validated.
        """
        for message in varied_messages():
            decoded = decode(encode(message))
            self.assertIs(type(decoded), Message)
            self.assertEqual(decoded, message)
            self.assertEqual(decoded.body_bytes, message.body_bytes)

    def test_sent_at_time_zones(self) -> None:
        """
        The same instant in two time zones is stored as each message says it, one after the other.
        """
        from datetime import timedelta

        utc = Message.create("org.example.t", {}, sent_at=SENT_AT)
        shifted = Message.create(
            "org.example.t", {}, sent_at=SENT_AT.astimezone(timezone(timedelta(hours=2)))
        )
        for message in (utc, shifted, utc):
            stored = decode_for_publish(encode(message))
            self.assertEqual(stored.wire_headers(), message.wire_headers())
        self.assertEqual(
            decode_for_publish(encode(shifted)).wire_headers()["sent-at"], "2026-11-28T08:00:00+02:00"
        )

    def test_headers_cache(self) -> None:
        """
        Messages stored with the same headers share their decoded headers, and the cache of them stays bounded.
        """
        a, b = (Message.create("org.example.t", {"n": n}, headers={"u": True}, sent_at=SENT_AT) for n in (1, 2))
        first, second = (decode_for_publish(encode(m)) for m in (a, b))
        self.assertIs(first.headers, second.headers)
        self.assertEqual(first.wire_headers(), a.wire_headers())
        for n in range(store_module._HEADERS_CACHE_SIZE * 2 + 5):
            message = Message.create("org.example.t", {}, headers={f"u{n}": True})
            self.assertEqual(decode_for_publish(encode(message)).headers, {f"u{n}": True})
            self.assertLessEqual(len(store_module._headers_cache), store_module._HEADERS_CACHE_SIZE)

    def test_headers_alike(self) -> None:
        """
        Stored headers come out as each message's own, however alike: true is not 1, -0.0 is not 0.0, order counts.
        """
        cases = [
            {"x": True},
            {"x": 1},
            {"x": 1, "y": "a"},
            {"y": "a", "x": 1},
            {"x": 0.0},
            {"x": -0.0},
            {"x": None},
            {"x": [1]},
            {"x": {"y": True}},
            {"x": {"y": 1}},
        ]
        for _ in range(2):
            for headers in cases:
                message = Message.create("org.example.t", {}, headers=headers, sent_at=SENT_AT)
                data = encode(message)
                self.assertTrue(data.endswith(fresh_properties(message) + b"{}"))
                for decoded in (decode_for_publish(data), decode(data)):
                    self.assertEqual(decoded.wire_headers(), message.wire_headers())
                    self.assertEqual(
                        [(k, type(v), repr(v)) for k, v in decoded.wire_headers().items()],
                        [(k, type(v), repr(v)) for k, v in message.wire_headers().items()],
                    )

    def test_large_headers_not_kept(self) -> None:
        """Records with large headers read back right without their decoded headers being kept."""
        store_module._headers_cache.clear()
        for n in range(3):
            message = Message.create("org.example.t", {"n": n}, headers={"big": "x" * 5000}, sent_at=SENT_AT)
            stored = decode_for_publish(encode(message))
            self.assertEqual(stored, message)
            self.assertEqual(stored.encoded_properties(), fresh_properties(message))
        self.assertEqual(store_module._headers_cache, {})

    def test_model_fits(self) -> None:
        """
        The message model still has the fields the cheap read-back sets, so the outbox uses it.
        """
        self.assertTrue(store_module._fast_path_works())
        self.assertTrue(store_module._FAST)

    def test_fallback(self) -> None:
        """
        Where the cheap read-back does not fit the message model, stored messages are decoded completely.
        """
        self.patch(store_module, "_FAST", False)
        message = layout1_messages()[0]
        stored = decode_for_publish(encode(message))
        self.assertIs(type(stored), Message)
        self.assertEqual(stored, message)

    def test_damaged(self) -> None:
        """
        A damaged record in the AMQP form is a DecodeError, for the cheap read-back and the full one.
        """
        message = Message.create("org.example.t", {"a": 1}, id="i", sent_at=SENT_AT)
        good = encode(message)
        properties = fresh_properties(message)

        def record(topic: bytes, message_id: bytes, queue: bytes | None, props: bytes) -> bytes:
            sizes = struct.pack("!HHHI", len(topic), len(message_id), 0xFFFF if queue is None else len(queue), len(props))
            return AMQP_FORM + sizes + topic + message_id + (queue or b"") + props + b'{"a":1}'

        self.assertEqual(record(b"org.example.t", b"i", None, properties), good)
        for data in (
            AMQP_FORM,
            good[:8],
            good[:40],
            record(b"org.example.t", b"", None, properties),
            record(b"org.example.\xff", b"i", None, properties),
            record(b"org.example.t", b"i", b"\xff", properties),
            record(b"org.example.t", b"j", None, properties),
            record(b"org.example.t", b"i", None, properties[:-2] + b"\x02ii"),
            record(b"org.example.t", b"i", None, b"\xff\xff" + properties[2:]),
            record(b"org.example.t", b"i", None, properties[:2] + b"\x00\x00\x00\x00" + properties[2:]),
        ):
            store_module._headers_cache.clear()
            self.assertRaises(DecodeError, decode_for_publish, data)
            self.assertRaises(DecodeError, decode, data)

    def test_damaged_body(self) -> None:
        """
        A stored body that is not JSON is published as stored, and reading it is a DecodeError.
        """
        message = Message.create("org.example.t", {"a": 1}, id="i", sent_at=SENT_AT)
        good = encode(message)
        data = good[: -len(message.body_bytes)] + b"{oops"
        stored = decode_for_publish(data)
        self.assertEqual(stored.body_bytes, b"{oops")
        self.assertRaises(DecodeError, getattr, stored, "body")
        self.assertRaises(DecodeError, decode, data)

    def test_serialized_form_still_read(self) -> None:
        """
        Records of layout 1 (one line of the serialized form) are read by both decoders.
        """
        from fedhub.message import dump_line

        for message in varied_messages():
            data = dump_line(message).encode("utf-8")
            self.assertEqual(decode(data), message)
            self.assertEqual(decode_for_publish(data), message)


def layout2_record(message: Message) -> bytes:
    """
    A record as layout 2 wrote it: the publish form.
    """
    head = json.dumps([message.topic, message.id, message.queue], ensure_ascii=False, separators=(",", ":"))
    headers = json.dumps(message.wire_headers(), ensure_ascii=False, separators=(",", ":"))
    return PUBLISH_FORM + head.encode() + b"\n" + headers.encode() + b"\n" + message.body_bytes


def fresh_properties(message: Message) -> bytes:
    """
    The encoded properties of a message, from an encoder that has seen no other.
    """
    return PublishEncoder(load_spec(), 4096).property_bytes(message.amqp_properties())


class Layout2FormTests(SynchronousTestCase):
    """
    Records of layout 2 (the publish form) are still read, cheaply and completely.
    """

    def test_read(self) -> None:
        """
        Both decoders read a record of the publish form as the message it was.
        """
        for message in varied_messages():
            data = layout2_record(message)
            stored = decode_for_publish(data)
            self.assertIsInstance(stored, StoredMessage)
            for decoded in (stored, decode(data)):
                self.assertEqual(decoded, message)
                self.assertEqual(decoded.body_bytes, message.body_bytes)
                self.assertEqual(decoded.encoded_properties(), fresh_properties(message))

    def test_headers_cache(self) -> None:
        """
        Records with the same headers share their decoded headers.
        """
        a, b = (Message.create("org.example.t", {"n": n}, headers={"u": True}, sent_at=SENT_AT) for n in (1, 2))
        first, second = (decode_for_publish(layout2_record(m)) for m in (a, b))
        self.assertIs(first.headers, second.headers)

    def test_damaged(self) -> None:
        """
        A damaged record in the publish form is a DecodeError, for the cheap read-back and the full one.
        """
        head = b'["t","i",null]'
        headers = b"{}"
        body = b'{"a":1}'
        for data in (
            PUBLISH_FORM,
            PUBLISH_FORM + head,
            PUBLISH_FORM + head + b"\n" + headers,
            PUBLISH_FORM + b"{not json\n" + headers + b"\n" + body,
            PUBLISH_FORM + b'{"topic":"t"}\n' + headers + b"\n" + body,
            PUBLISH_FORM + b'["t","i"]\n' + headers + b"\n" + body,
            PUBLISH_FORM + b'[5,"i",null]\n' + headers + b"\n" + body,
            PUBLISH_FORM + b'["t","",null]\n' + headers + b"\n" + body,
            PUBLISH_FORM + b'["t","i",5]\n' + headers + b"\n" + body,
            PUBLISH_FORM + b'["t","\xff",null]\n' + headers + b"\n" + body,
            PUBLISH_FORM + head + b"\n[]\n" + body,
            PUBLISH_FORM + head + b"\n{oops\n" + body,
            PUBLISH_FORM + head + b'\n{"sent-at":5}\n' + body,
            PUBLISH_FORM + head + b'\n{"sent-at":"yesterday"}\n' + body,
            PUBLISH_FORM + head + b'\n{"priority":"high"}\n' + body,
            PUBLISH_FORM + head + b'\n{"fedora_messaging_severity":true}\n' + body,
            PUBLISH_FORM + head + b'\n{"fedora_messaging_schema":null}\n' + body,
        ):
            self.assertRaises(DecodeError, decode_for_publish, data)
            self.assertRaises(DecodeError, decode, data)

    def test_damaged_body(self) -> None:
        """
        A stored body that is not JSON is published as stored, and reading it is a DecodeError.
        """
        data = PUBLISH_FORM + b'["t","i",null]\n{}\n{oops'
        stored = decode_for_publish(data)
        self.assertEqual(stored.body_bytes, b"{oops")
        self.assertRaises(DecodeError, getattr, stored, "body")
        self.assertRaises(DecodeError, decode, data)


class Layout2StoreTests(OutboxTestCase):
    """
    A store written by layout 2 opens, is upgraded and drains.
    """

    def test_upgrade_and_drain(self) -> None:
        """
        A layout 2 store becomes the current layout and publishes its records, then new ones, in order.
        """
        old = [Message.create("org.example.dev.layout.old", {"n": n}, sent_at=SENT_AT) for n in range(3)]
        os.makedirs(self.directory)
        conn = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME))
        try:
            for statement in store_module._SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '2')")
            for n, message in enumerate(old):
                conn.execute(
                    "INSERT INTO pending (message_id, created, data) VALUES (?, ?, ?)",
                    (message.id, 1000.0 + n, layout2_record(message)),
                )
            conn.commit()
        finally:
            conn.close()
        outbox, bus = self.make(FakeBus())
        later = Message.create("org.example.dev.layout.later", {"n": 9})
        self.successResultOf(outbox.publish(later))
        bus.ack_all()
        self.assertEqual(bus.published, old + [later])
        self.assertEqual([p.encoded_properties() for p in bus.published], [fresh_properties(m) for m in old + [later]])
        self.assertEqual(outbox.store.pending_count, 0)
        conn = outbox.store._db.conn
        assert conn is not None
        self.assertEqual(conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone(), ("3",))


class Layout1Tests(OutboxTestCase):
    """
    A store written by layout 1 opens, is upgraded and drains.
    """

    def copy_layout1(self) -> str:
        os.makedirs(self.directory)
        shutil.copy(LAYOUT1, os.path.join(self.directory, DATABASE_NAME))
        return self.directory

    def test_upgrade(self) -> None:
        """
        A layout 1 store is read as it is; opening it (as fedhub outbox list
        does) leaves its version, so an older fedhub can still open it; the
        first record written in the current layout marks it as such, and a
        store left empty is marked as the oldest layout again when closed.
        """
        directory = self.copy_layout1()
        self.assertEqual(stored_version(directory), ("1",))
        store = Store(directory, SynchronousExecutor())
        summary = self.successResultOf(store.open())
        self.addCleanup(store.close)
        messages = layout1_messages()
        self.assertEqual((summary.pending, summary.failed, summary.oldest_created), (4, 1, 1000.0))
        rows = self.successResultOf(store.load(0, 100))
        self.assertEqual([row.message() for row in rows], [messages[0]] + messages[2:])
        self.assertEqual([decode_for_publish(row.data) for row in rows], [messages[0]] + messages[2:])
        self.assertEqual([row.created for row in rows], [1000.0, 1002.0, 1003.0, 1004.0])
        [record] = self.successResultOf(store.failed())
        self.assertEqual((record.kind, record.attempts, record.failed_at), (RETURNED, 1, 2000.0))
        self.assertEqual(record.message(), messages[1])
        conn = store._db.conn
        assert conn is not None

        def version() -> Any:
            return conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()

        self.assertEqual(version(), ("1",))
        self.successResultOf(store.close())
        self.assertEqual(stored_version(directory), ("1",))
        store = Store(directory, SynchronousExecutor())
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        conn = store._db.conn
        assert conn is not None
        self.successResultOf(store.commit([(messages[0].id, 5.0, encode(messages[0]))]))
        self.assertEqual(version(), (str(SCHEMA_VERSION),))
        pending = self.successResultOf(store.load(0, 100))
        self.successResultOf(store.commit([], [(row.seq, len(row.data)) for row in pending]))
        self.successResultOf(store.drop_failed())
        self.successResultOf(store.close())
        self.assertEqual(stored_version(directory), ("1",))

    def test_drains(self) -> None:
        """
        An outbox on a layout 1 store publishes its messages in order, then those handed over since, and empties it.
        """
        self.copy_layout1()
        messages = layout1_messages()
        outbox, bus = self.make(FakeBus(), window=2, read_batch=2)
        later = Message.create("org.example.dev.layout.later", {"n": 6})
        self.successResultOf(outbox.publish(later))
        while bus.outstanding:
            bus.ack()
        self.assertEqual(bus.published, [messages[0]] + messages[2:] + [later])
        self.assertEqual(outbox.store.pending_count, 0)
        # The failed one is still there and retries in the new form.
        self.assertEqual(self.successResultOf(outbox.retry_failed()), 1)
        bus.ack_all()
        self.assertEqual(bus.published[-1], messages[1])
        self.assertEqual(outbox.store.pending_count, 0)

    def test_mixed_forms(self) -> None:
        """
        A store holding records of both forms publishes them all in hand-over order after a restart.
        """
        self.copy_layout1()
        messages = layout1_messages()
        bus = FakeBus()
        bus.connected = False
        first, _ = self.make(bus)
        more = [Message.create("org.example.dev.layout.more", {"n": n}) for n in range(3)]
        for message in more:
            self.successResultOf(first.publish(message))
        self.successResultOf(first.stopService())
        second, bus2 = self.make(FakeBus())
        bus2.ack_all()
        self.assertEqual(bus2.published, [messages[0]] + messages[2:] + more)
        self.assertEqual([type(m) for m in bus2.published[4:]], [StoredMessage] * 3)
        self.assertEqual(second.store.pending_count, 0)

"""
Tests for C{fedhub dead-letters list|requeue|drop} (L{fedhub.cli.dead_letters}).

The first part needs no broker: what a dead-lettered message says and what
its requeued copy keeps, the problems found before connecting, and the
requeue and drop loop against a fake queue and a fake bus (confirms before
acknowledgements, the bound on unacknowledged messages, failures and
interrupts), plus the client's exact decoding of C{basic.get-ok} content.
The second part runs the command as a subprocess against the shared
RabbitMQ at 127.0.0.1:5672, on a consumer topology the consumer runner
declares, filled by a real consumer that dead-letters (and by the broker,
for a body fedhub can not decode).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.amqp.codec import FieldValue
from fedhub.amqp.frames import encode_properties
from fedhub.amqp.transport import AMQPBus
from fedhub.cli.dead_letters import (
    ConsumerQueues,
    DeadMessage,
    Row,
    act,
    as_json,
    consumer_of,
    table,
    warn_quorum,
)
from fedhub.cli.main import build_parser, parse_arguments
from fedhub.cli.runner import Runtime
from fedhub.config import DomainConfig, load_config
from fedhub.consumers.runner import ConsumerService, attempts_from
from fedhub.errors import DeadLetter, MessageReturned, NotConnected, Retry
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from tests.broker import delete_declared
from tests.test_amqp_bus import LiveCase
from tests.test_amqp_protocol import Broker
from tests.test_cli_publish import run_cli, spawn, write_config

REASON = "fedhub_dead_letter_reason"
WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def dead(
    position: int = 1,
    message_id: str | None = "m1",
    headers: dict[str, Any] | None = None,
    body: bytes = b'{"a": 1}',
    routing_key: str = "org.example.prod.a",
) -> DeadMessage:
    properties: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
    if message_id is not None:
        properties["message_id"] = message_id
    if headers is not None:
        properties["headers"] = headers
    return DeadMessage(position, position, routing_key, properties, body)


def death(queue: str, reason: str, count: int = 1) -> dict[str, Any]:
    return {"queue": queue, "reason": reason, "count": FieldValue("l", count), "time": WHEN,
            "exchange": "", "routing-keys": ["org.example.prod.a"]}


class DeadMessageTests(SynchronousTestCase):
    """
    What a dead-lettered message says, and what its requeued copy keeps.
    """

    def test_reason_from_fedhub(self) -> None:
        """The reason fedhub gave wins over the broker's records; no time without the queue's record."""
        message = dead(headers={REASON: "gave up", "x-death": [death("q.retry.1", "expired")]})
        self.assertEqual(message.reason("q"), "gave up")
        self.assertIsNone(message.dead_lettered_at("q"))

    def test_reason_from_x_death(self) -> None:
        """Without fedhub's reason, the broker's record for the consumer's queue says why and when."""
        message = dead(headers={"x-death": [death("other", "expired"), death("q", "rejected")]})
        self.assertEqual(message.reason("q"), "rejected in queue q (x-death)")
        self.assertEqual(message.dead_lettered_at("q"), WHEN)
        self.assertEqual(dead(headers={"x-first-death-reason": "maxlen"}).reason("q"),
                         "maxlen (x-first-death-reason)")
        self.assertEqual(dead().reason("q"), "-")
        self.assertEqual(dead(headers={"x-death": "junk"}).reason("q"), "-")

    def test_id(self) -> None:
        """The message id, or None; one that is not UTF-8 is shown replaced."""
        self.assertEqual(dead().id, "m1")
        self.assertIsNone(dead(message_id=None).id)
        self.assertIsNone(dead(message_id="").id)

    def test_copy_strips_death_headers_only(self) -> None:
        """The copy keeps body bytes and every property and header, exactly, but the death records."""
        headers = {
            REASON: "why", "x-death": [death("q", "rejected")], "x-first-death-queue": "q",
            "x-first-death-reason": "rejected", "x-last-death-exchange": "",
            "custom": FieldValue("b", 5), "text": FieldValue("S", b"\xff"), "n": 7, "x-other": "kept",
        }
        message = dead(message_id="m\u00e9", headers=headers, body=b"\xff\x00not json")
        message.properties.update(priority=4, timestamp=1700000000, content_encoding="binary")
        copy = message.copy()
        self.assertEqual(copy.body_bytes, b"\xff\x00not json")
        self.assertEqual(copy.id, "m\u00e9")
        expected = dict(message.properties)
        expected["headers"] = {"custom": FieldValue("b", 5), "text": FieldValue("S", b"\xff"),
                               "n": 7, "x-other": "kept"}
        self.assertEqual(copy.encoded_properties(), encode_properties(expected))

    def test_copy_strips_quorum_delivery_count(self) -> None:
        """A quorum queue's count of deliveries (every list adds one) does not go with the copy."""
        message = dead(headers={"x-delivery-count": 7, "kept": 1})
        expected = dict(message.properties)
        expected["headers"] = {"kept": 1}
        self.assertEqual(message.copy().encoded_properties(), encode_properties(expected))

    def test_copy_without_headers(self) -> None:
        """A message without headers gets none."""
        message = dead()
        self.assertEqual(message.copy().encoded_properties(), encode_properties(message.properties))

    def test_table_and_json(self) -> None:
        """Rows are aligned, control characters escaped; JSON is one object per row."""
        rows = [Row(1, "m1", "a.b\x1b[31m", WHEN, "bad\nline", 3), Row(2, None, "c", None, "-", 0)]
        lines = table(rows)
        self.assertEqual(lines[0].split()[:2], ["#", "ID"])
        self.assertEqual(lines[1].split()[:4], ["1", "m1", "a.b\\x1b[31m", "2026-03-01T12:00:00+00:00"])
        self.assertTrue(lines[1].endswith("bad\\nline"))
        self.assertEqual(lines[2].split()[:4], ["2", "-", "c", "-"])
        self.assertNotIn("\x1b", "".join(lines))
        record = json.loads(as_json(rows[0]))
        self.assertEqual(record, {"position": 1, "id": "m1", "topic": "a.b\x1b[31m",
                                  "dead_lettered_at": "2026-03-01T12:00:00+00:00",
                                  "reason": "bad\nline", "size": 3})
        self.assertNotIn("\x1b", as_json(rows[0]))


class UsageTests(SynchronousTestCase):
    """
    Problems found before connecting.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.directory = Path(self.mktemp()).absolute()

    def run_command(self, *argv: str) -> int:
        args = build_parser().parse_args(["dead-letters", *argv])
        return int(args.run(args))

    def consumers(self, broker: str = "amqp://guest:guest@127.0.0.1:1/%2F") -> str:
        more = "".join(
            f'\n[[consumers]]\nname = "{name}"\nplugin = "log"\ndomain = "test"\n' for name in ("one", "two")
        )
        return write_config(self.directory, broker=broker, more=more)

    def test_unknown_consumer(self) -> None:
        """An unknown consumer: one line listing the configured ones, 78."""
        config = self.consumers()
        self.assertEqual(self.run_command("list", "-c", config, "nope\x1b"), 78)
        self.assertEqual(self.stderr.getvalue(),
                         "fedhub dead-letters: the configuration has no consumer 'nope\\\\x1b' (it has: one, two)\n")

    def test_memory_domain_refused(self) -> None:
        """A consumer on the in-process bus is refused like the other broker commands (78)."""
        config = self.consumers(broker="memory")
        self.assertEqual(self.run_command("requeue", "-c", config, "one", "--all"), 78)
        self.assertIn("in-process bus", self.stderr.getvalue())

    def test_names_or_all(self) -> None:
        """requeue and drop need names or --all, not both and not neither: 64."""
        config = self.consumers()
        for action in ("requeue", "drop"):
            self.assertEqual(self.run_command(action, "-c", config, "one"), 64)
            self.assertEqual(self.run_command(action, "-c", config, "one", "m1", "--all"), 64)
        self.assertIn("name the messages (ID ...) or give --all", self.stderr.getvalue())

    def test_quorum_queues_warned_about(self) -> None:
        """
        A consumer on quorum queues: reading its dead letters and putting
        them back counts deliveries, and the command says so before it
        reads (list, or requeue and drop by name).
        """
        more = ('\n[[consumers]]\nname = "q"\nplugin = "log"\ndomain = "test"\n'
                'queue_arguments = { "x-queue-type" = "quorum" }\n'
                '\n[[consumers]]\nname = "c"\nplugin = "log"\ndomain = "test"\n')
        config = load_config(write_config(self.directory, more=more))
        self.assertEqual((consumer_of(config, "q").quorum, consumer_of(config, "c").quorum),
                         (True, False))
        warn_quorum(consumer_of(config, "c"))
        self.assertEqual(self.stderr.getvalue(), "")
        warn_quorum(consumer_of(config, "q"))
        [line] = self.stderr.getvalue().splitlines()
        self.assertTrue(line.startswith("fedhub dead-letters: warning: fedhub.q.dead is a quorum queue"))
        self.assertIn("x-delivery-count", line)

    def test_names_after_options(self) -> None:
        """Names may follow options (--limit, -c) after the consumer; an unknown option is still refused."""
        args = parse_arguments(build_parser(), ["dead-letters", "requeue", "one", "-c", "a.toml", "--limit", "50", "m1", "m2"])
        self.assertEqual((args.ids, args.limit, args.config), (["m1", "m2"], 50, "a.toml"))
        args = parse_arguments(build_parser(), ["outbox", "retry", "1", "-c", "a.toml", "2"])
        self.assertEqual(args.ids, ["1", "2"])
        with self.assertRaises(SystemExit) as raised:
            parse_arguments(build_parser(), ["dead-letters", "requeue", "one", "--all", "--bogus", "m1"])
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("unrecognized arguments: --bogus m1", self.stderr.getvalue())

    def test_options_before_the_action(self) -> None:
        """-c, -t and -v may come before the action; after it, they win."""
        parser = build_parser()
        args = parser.parse_args(["dead-letters", "-c", "a.toml", "-t", "5", "list", "one"])
        self.assertEqual((args.config, args.timeout, args.verbose, args.limit), ("a.toml", 5.0, False, 100))
        args = parser.parse_args(["dead-letters", "-c", "a.toml", "drop", "one", "--all", "-c", "b.toml", "-v"])
        self.assertEqual((args.config, args.timeout, args.verbose, args.limit), ("b.toml", 30.0, True, 10_000))
        self.assertFalse(hasattr(args, "domain"))


# --- the requeue and drop loop on fakes -------------------------------------------


@dataclass
class _Got:
    method: Any
    delivery_tag: int
    routing_key: str
    content: Any


@dataclass
class _Name:
    name: str


@dataclass
class _Content:
    properties: dict[str, Any]
    body: bytes


class FakeClient:
    """
    The client side of a L{FakeChannel}: acknowledgements and closing.
    """

    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel

    def python_properties(self, properties: dict[str, Any]) -> dict[str, Any]:
        return dict(properties)

    def send_method(self, channel_id: int, name: str, tag: int, multiple: bool) -> bool:
        assert name == "basic.ack" and not multiple
        channel = self.channel
        if channel.closed:
            return False
        channel.acked.append(channel.unacked.pop(tag))
        return True

    def close_channel(self, channel: FakeChannel) -> Deferred[None]:
        channel.close()
        return succeed(None)


class FakeChannel:
    """
    A queue on a channel: C{basic.get} hands messages out unacknowledged,
    closing puts those back in front, in their order.

    @ivar most_unacked: The most messages unacknowledged at once.
    """

    id = 1

    def __init__(self, queue: str, messages: list[tuple[str | None, str]]) -> None:
        self.name = queue
        self.ready: deque[tuple[str | None, str]] = deque(messages)
        self.unacked: dict[int, tuple[str | None, str]] = {}
        self.acked: list[tuple[str | None, str]] = []
        self.tags = 0
        self.most_unacked = 0
        self.closed = False
        self.on_get: Any = None
        self.client = FakeClient(self)

    def queue_declare(self, queue: str, passive: bool) -> Deferred[Any]:
        return succeed(type("DeclareOk", (), {"message_count": len(self.ready)})())

    def basic_get(self, queue: str, no_ack: bool) -> Deferred[_Got]:
        assert queue == self.name and not no_ack
        if self.on_get is not None:
            self.on_get(self)
        if not self.ready:
            return succeed(_Got(_Name("get-empty"), 0, "", None))
        message_id, topic = self.ready.popleft()
        self.tags += 1
        self.unacked[self.tags] = (message_id, topic)
        self.most_unacked = max(self.most_unacked, len(self.unacked))
        properties = {"message_id": message_id} if message_id is not None else {}
        return succeed(_Got(_Name("get-ok"), self.tags, topic, _Content(properties, b"\xff")))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ready.extendleft(reversed([self.unacked[tag] for tag in sorted(self.unacked)]))
            self.unacked.clear()

    @property
    def state(self) -> list[str | None]:
        return [message_id for message_id, _ in self.ready]


class ConfirmingBus:
    """
    A bus whose publishes wait for the test to confirm or fail them.
    """

    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel
        self.published: list[tuple[Message, str, str]] = []
        self.outstanding: deque[Deferred[None]] = deque()
        self.auto = False

    def open_channel(self, *, exact_content: bool = False) -> Deferred[FakeChannel]:
        assert exact_content
        return succeed(self.channel)

    def publish(self, message: Message, exchange: str, routing_key: str) -> Deferred[None]:
        self.published.append((message, exchange, routing_key))
        if self.auto:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.outstanding.append(d)
        return d

    def confirm(self) -> None:
        self.outstanding.popleft().callback(None)


def _queues() -> ConsumerQueues:
    domain = DomainConfig(name="test", broker="amqp://127.0.0.1/")
    return ConsumerQueues("c", domain, "q", "q.dead", "q.return")


class ActTests(SynchronousTestCase):
    """
    L{act}: originals acknowledged only after their copies' confirms, at most
    C{limit} unacknowledged, failures and interrupts leave the rest in place.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.out = io.StringIO()
        self.runtime = Runtime(None)

    def start(
        self, action: str, names: list[str] | None, ids: list[str | None], limit: int = 100
    ) -> tuple[FakeChannel, ConfirmingBus, Deferred[int]]:
        channel = FakeChannel("q.dead", [(i, f"topic.{i}") for i in ids])
        bus = ConfirmingBus(channel)
        d = Deferred.fromCoroutine(act(bus, self.runtime, _queues(), action, names, limit, self.out))
        return channel, bus, d

    def test_ack_after_confirm(self) -> None:
        """A copy goes to the return exchange with its topic; its original is acknowledged on its confirm."""
        channel, bus, d = self.start("requeue", None, ["a", "b"])
        self.assertEqual([(m.id, e, k) for m, e, k in bus.published],
                         [("a", "q.return", "topic.a"), ("b", "q.return", "topic.b")])
        self.assertEqual(channel.acked, [])
        bus.confirm()
        self.assertEqual(channel.acked, [("a", "topic.a")])
        self.assertNoResult(d)
        bus.confirm()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.out.getvalue(), "2 message(s) moved from q.dead to q\n")
        self.assertTrue(channel.closed)
        self.assertEqual(channel.state, [])

    def test_limit_bounds_unacknowledged(self) -> None:
        """Never more than --limit messages unacknowledged: the next get waits for a confirm."""
        channel, bus, d = self.start("requeue", None, [str(n) for n in range(5)], limit=2)
        self.assertEqual(len(bus.published), 2)
        for _ in range(5):
            bus.confirm()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(channel.most_unacked, 2)
        self.assertEqual(len(channel.acked), 5)

    def test_only_the_queue_as_it_was(self) -> None:
        """--all acts on the messages there at the start, not on those dead-lettered meanwhile."""
        channel = FakeChannel("q.dead", [("a", "t"), ("b", "t")])

        def more(queue: FakeChannel) -> None:
            queue.ready.append(("late", "t"))

        channel.on_get = more
        d = Deferred.fromCoroutine(act(ConfirmingBus(channel), self.runtime, _queues(), "drop", None, 10, self.out))
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(channel.state, ["late", "late"])
        self.assertEqual(self.out.getvalue(), "2 message(s) dropped from q.dead\n")

    def test_by_name_keeps_the_others_in_order(self) -> None:
        """Named messages are acted on (every copy of an id); the others stay in their order."""
        channel, bus, d = self.start("drop", ["b", "d"], ["a", "b", "c", "b", "d", "e"])
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(channel.state, ["a", "c", "e"])
        self.assertEqual(self.out.getvalue(), "3 message(s) dropped from q.dead\n")

    def test_not_found(self) -> None:
        """Names that match nothing: the others are acted on, the missing named, status 1."""
        channel, bus, d = self.start("requeue", ["b", "zz\x1b"], ["a", "b"])
        bus.confirm()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(channel.state, ["a"])
        self.assertEqual(self.stderr.getvalue(), "fedhub dead-letters: not found: zz\\x1b\n")

    def test_limit_reached_while_looking(self) -> None:
        """Looking for names stops once --limit messages are held; what was not reached is not found."""
        channel, bus, d = self.start("drop", ["a", "z"], ["x", "y", "a", "z"], limit=2)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(channel.state, ["x", "y", "a", "z"])
        self.assertIn("not found among the first 2 message(s) (--limit 2 are held at most): a, z",
                      self.stderr.getvalue())

    def test_without_id_left_in_place(self) -> None:
        """A message without an id is not requeued (its return could not be matched): status 1."""
        channel, bus, d = self.start("requeue", None, ["a", None])
        bus.confirm()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(channel.state, [None])
        self.assertIn("1 message(s) without a message id left in q.dead", self.stderr.getvalue())

    def test_refused_copy(self) -> None:
        """A copy the broker returns stops the command (69); its original and the rest stay."""
        channel, bus, d = self.start("requeue", None, ["a", "b", "c"])
        bus.confirm()
        bus.outstanding.popleft().errback(MessageReturned("no queue is bound", "b", 312))
        bus.confirm()
        self.assertEqual(self.successResultOf(d), 69)
        self.assertEqual(channel.state, ["b"])
        self.assertEqual(
            self.stderr.getvalue(),
            "fedhub dead-letters: message b (topic.b): returned by the broker: no queue is bound; "
            "2 message(s) moved from q.dead to q\n",
        )

    def test_connection_lost(self) -> None:
        """Copies failing with a lost connection: 75, nothing acknowledged that was not confirmed."""
        channel, bus, d = self.start("requeue", None, ["a", "b"])
        bus.outstanding.popleft().errback(NotConnected("the connection to the broker was lost"))
        bus.outstanding.popleft().errback(NotConnected("the connection to the broker was lost"))
        self.assertEqual(self.successResultOf(d), 75)
        self.assertEqual(channel.state, ["a", "b"])

    def test_interrupted(self) -> None:
        """SIGTERM mid-way: no more gets, confirms awaited, the rest stays; 143 and how far it got."""
        channel, bus, d = self.start("requeue", None, ["a", "b", "c"], limit=1)
        self.runtime.interrupt(signal.SIGTERM)
        self.assertNoResult(d)
        bus.confirm()
        self.assertEqual(self.successResultOf(d), 143)
        self.assertEqual(channel.state, ["b", "c"])
        self.assertEqual(self.stderr.getvalue(),
                         "fedhub dead-letters: interrupted; 1 message(s) moved from q.dead to q\n")


class ExactContentTests(SynchronousTestCase):
    """
    L{fedhub.amqp.protocol.AMQPClient.exact_content}: the content of
    C{basic.get-ok} keeps its wire types on the channels that ask.
    """

    def test_exact_on_asking_channel_only(self) -> None:
        """Header values decode to FieldValues on an exact channel, plain elsewhere; forgotten on close."""
        broker = Broker()
        broker.handshake()
        exact = self.successResultOf(broker.open_channel())
        plain = self.successResultOf(broker.open_channel())
        broker.client.exact_content(exact.id)
        results = []
        for channel in (exact, plain):
            getting = channel.basic_get(queue="q", no_ack=False)
            broker.methods()
            broker.send(
                broker.frame(channel.id, "basic.get-ok", delivery_tag=1, routing_key="k", message_count=0),
                broker.content(channel.id, b"xy", headers={"b": FieldValue("b", 5), "s": FieldValue("S", b"\xff")}),
            )
            results.append(self.successResultOf(getting).content)
        self.assertEqual(results[0].properties["headers"], {"b": FieldValue("b", 5), "s": FieldValue("S", b"\xff")})
        self.assertEqual(results[1].properties["headers"], {"b": 5, "s": b"\xff"})
        self.assertEqual(results[0].body, b"xy")
        closing = broker.client.close_channel(exact)
        broker.methods()
        broker.send(broker.frame(exact.id, "channel.close-ok"))
        self.successResultOf(closing)
        self.assertEqual(broker.client._exact_channels, set())

    def test_closed_channel_not_marked(self) -> None:
        """A channel that is not open is not remembered."""
        broker = Broker()
        broker.handshake()
        broker.client.exact_content(9)
        self.assertEqual(broker.client._exact_channels, set())


# --- on the shared broker -----------------------------------------------------------


@implementer(IMessageHandler)
class Verdicts:
    """
    A handler that retries messages whose body says C{retry} and
    dead-letters the others (with control characters in the reason), or
    with C{record} set, records each message and its attempts.
    """

    topics = ("#",)

    def __init__(self, retry_prefix: str = "", record: bool = False) -> None:
        self.retry_prefix = retry_prefix
        self.record = record
        self.seen: list[tuple[Message, int]] = []

    def handle(self, message: Message) -> None:
        if self.record:
            self.seen.append((message, attempts_from(message, self.retry_prefix)))
            return
        if message.body.get("retry"):
            raise Retry("again")
        raise DeadLetter("refused\x1b[31m")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


INVALID_BODY = b"\xff\xfe{not json"


class LiveDeadLetterTests(LiveCase):
    """
    C{fedhub dead-letters} against the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        token = uuid.uuid4().hex
        self.prefix = f"fedhubtest.dl.{token}"
        self.name = f"dl-{token}"
        self.directory = Path(self.mktemp()).absolute()
        self.more = (
            f'\n[[consumers]]\nname = "{self.name}"\nplugin = "log"\ndomain = "test"\n'
            f'queue = "{self.prefix}"\ntopics = ["{self.prefix}.#"]\nretry_delay = 0.2\nmax_retries = 1\n'
            'queue_arguments = { "x-expires" = 120000 }\n'
        )
        self.config = write_config(self.directory, more=self.more)
        self.component = load_config(self.config).consumers[0]
        self.main_queue = self.prefix
        self.dead = f"{self.prefix}.dead"

    async def consumer(self, bus: AMQPBus, handler: Verdicts) -> ConsumerService:
        service = ConsumerService(self.component, handler, bus, reactor)
        topology = service.topology()
        self.addCleanup(
            deferToThread, delete_declared,
            [queue.name for queue in topology.queues], [exchange.name for exchange in topology.exchanges],
        )
        service.startService()
        self.addCleanup(service.stopService)
        await self.wait_for(lambda: service.consuming, "the consumer to consume", 15)
        return service

    async def count(self, bus: AMQPBus, queue: str) -> int:
        channel = await bus.open_channel()
        try:
            return int((await channel.queue_declare(queue=queue, passive=True)).message_count)
        finally:
            await channel.client.close_channel(channel)

    async def peek(self, bus: AMQPBus, queue: str) -> list[tuple[str, dict[str, Any], bytes]]:
        """
        Every message of a queue (routing key, exact properties, body),
        left in place.
        """
        channel = await bus.open_channel(exact_content=True)
        found: list[tuple[str, dict[str, Any], bytes]] = []
        try:
            while True:
                got = await channel.basic_get(queue=queue, no_ack=False)
                if got.method.name != "get-ok":
                    return found
                properties = channel.client.python_properties(got.content.properties)
                found.append((got.routing_key, properties, got.content.body))
        finally:
            await channel.client.close_channel(channel)

    async def fill(self) -> tuple[AMQPBus, list[str]]:
        """
        Declare the consumer's topology and have three messages
        dead-lettered, in this order: one the consumer gave up on after a
        retry, one the broker dead-lettered because fedhub could not decode
        it (a body that is not UTF-8, custom headers of several wire types),
        one the consumer dead-lettered at once.  The consumer is stopped.
        """
        bus = await self.start_bus()
        service = await self.consumer(bus, Verdicts())
        retried = Message.create(f"{self.prefix}.retried", {"retry": True})
        await bus.publish(retried)
        await self.wait_until_count(bus, self.dead, 1)
        channel = await bus.open_channel()
        self.addCleanup(channel.client.close_channel, channel)
        headers = {"custom": FieldValue("b", -3), "text": FieldValue("S", b"\xff\xfe"), "n": 7,
                   "when": WHEN, "nested": {"list": [1, "two", FieldValue("u", 3)]}}
        channel.client.basic_publish(
            channel.id, "amq.topic", f"{self.prefix}.raw", INVALID_BODY,
            {"content_type": "application/x-garbage", "content_encoding": "binary", "message_id": "raw-1",
             "priority": 7, "timestamp": 1700000000, "delivery_mode": 2, "headers": headers,
             "app_id": "tests", "correlation_id": "corr"},
            mandatory=False,
        )
        await self.wait_until_count(bus, self.dead, 2)
        refused = Message.create(f"{self.prefix}.refused", {"n": 2})
        await bus.publish(refused)
        await self.wait_until_count(bus, self.dead, 3)
        await service.stopService()
        return bus, [retried.id, "raw-1", refused.id]

    async def wait_until_count(self, bus: AMQPBus, queue: str, wanted: int) -> None:
        for _ in range(200):
            if await self.count(bus, queue) == wanted:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{queue} never held {wanted} message(s)")

    async def test_list(self) -> None:
        """list shows each message, oldest first, with its reason, and removes nothing."""
        bus, ids = await self.fill()
        before = await self.peek(bus, self.dead)
        process = await run_cli("dead-letters", "list", "-c", self.config, self.name)
        self.assertEqual(await process.ended, 0, process.stderr)
        lines = process.stdout.splitlines()
        self.assertEqual(lines[0], f"{self.dead} (consumer {self.name}, domain test) holds 3 message(s)")
        self.assertEqual(lines[1].split()[:2], ["#", "ID"])
        self.assertEqual([line.split()[1] for line in lines[2:]], ids)
        self.assertTrue(lines[2].endswith("gave up after 1 retries; last: again"), lines[2])
        self.assertTrue(lines[3].endswith(f"rejected in queue {self.main_queue} (x-death)"), lines[3])
        self.assertEqual(lines[3].split()[2:4], [f"{self.prefix}.raw", lines[3].split()[3]])
        self.assertIsNotNone(datetime.fromisoformat(lines[3].split()[3]))
        self.assertEqual(lines[2].split()[3], "-")
        self.assertTrue(lines[4].endswith("refused\\x1b[31m"), lines[4])
        self.assertNotIn("\x1b", process.stdout)
        self.assertEqual(await self.peek(bus, self.dead), before)

        process = await run_cli("dead-letters", "list", "-c", self.config, self.name, "--json", "--limit", "2")
        self.assertEqual(await process.ended, 0, process.stderr)
        records = [json.loads(line) for line in process.stdout.splitlines()]
        self.assertEqual([(r["position"], r["id"]) for r in records], [(1, ids[0]), (2, ids[1])])
        self.assertEqual(records[1]["size"], len(INVALID_BODY))
        self.assertIn("holds 3 message(s); the first 2 are shown", process.stderr)
        self.assertEqual(await self.peek(bus, self.dead), before)

    async def test_list_reader_gone(self) -> None:
        """list | head: a reader of standard output that went away ends the command quietly with 0."""
        await self.fill()
        read, write = os.pipe()
        os.close(read)
        root = str(Path(__file__).parent.parent)
        with os.fdopen(write, "w") as closed:
            done = await deferToThread(
                subprocess.run,
                [sys.executable, "-m", "fedhub.cli", "dead-letters", "list", "-c", self.config, self.name],
                stdout=closed, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root},
                timeout=120, check=False,
            )
        self.assertEqual((done.returncode, done.stderr), (0, b""))

    async def test_requeue_all(self) -> None:
        """requeue --all moves everything intact but the death headers; the consumer starts afresh."""
        bus, ids = await self.fill()
        before = await self.peek(bus, self.dead)
        self.assertTrue(any("x-death" in p.get("headers", {}) for _, p, _ in before))
        process = await run_cli("dead-letters", "requeue", "-c", self.config, self.name, "--all")
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual(process.stdout, f"3 message(s) moved from {self.dead} to {self.main_queue}\n")
        self.assertEqual(await self.count(bus, self.dead), 0)
        after = await self.peek(bus, self.main_queue)
        self.assertEqual(len(after), 3)
        for (key, properties, body), (old_key, old_properties, old_body) in zip(after, before):
            self.assertEqual((key, body), (old_key, old_body))
            expected = dict(old_properties)
            expected["headers"] = {
                name: value for name, value in old_properties["headers"].items()
                if name != REASON and name != "x-death" and not name.startswith(("x-first-death-", "x-last-death-"))
            }
            self.assertEqual(properties, expected)
        raw = after[1]
        self.assertEqual(raw[2], INVALID_BODY)
        self.assertEqual(raw[1]["headers"], {"custom": FieldValue("b", -3), "text": FieldValue("S", b"\xff\xfe"),
                                             "n": 7, "when": WHEN, "nested": {"list": [1, "two", FieldValue("u", 3)]}})
        self.assertEqual((raw[1]["content_type"], raw[1]["priority"], raw[1]["timestamp"], raw[1]["app_id"]),
                         ("application/x-garbage", 7, 1700000000, "tests"))

        recorder = Verdicts(f"{self.main_queue}.retry.", record=True)
        await self.consumer(bus, recorder)
        await self.wait_for(lambda: len(recorder.seen) == 2, "the requeued messages to be handled", 15)
        handled = {message.id: (message, attempts) for message, attempts in recorder.seen}
        message, attempts = handled[ids[0]]
        self.assertEqual(attempts, 0)
        self.assertNotIn(REASON, message.headers)
        self.assertNotIn("x-death", message.headers)
        self.assertEqual(message.body, {"retry": True})

    async def test_requeue_by_id(self) -> None:
        """requeue ID moves that message alone, a body fedhub can not decode too; the others keep their order."""
        bus, ids = await self.fill()
        process = await run_cli("dead-letters", "requeue", "-c", self.config, self.name, ids[1])
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual(process.stdout, f"1 message(s) moved from {self.dead} to {self.main_queue}\n")
        self.assertEqual([p["message_id"] for _, p, _ in await self.peek(bus, self.dead)], [ids[0], ids[2]])
        [(key, properties, body)] = await self.peek(bus, self.main_queue)
        self.assertEqual((key, properties["message_id"], body), (f"{self.prefix}.raw", ids[1], INVALID_BODY))

    async def test_unknown_ids(self) -> None:
        """Names that match nothing are reported (status 1); the named ones that match are moved."""
        bus, ids = await self.fill()
        process = await run_cli("dead-letters", "requeue", "-c", self.config, self.name, ids[2], "nope")
        self.assertEqual(await process.ended, 1, process.stderr)
        self.assertEqual(process.stderr, "fedhub dead-letters: not found: nope\n")
        self.assertEqual(process.stdout, f"1 message(s) moved from {self.dead} to {self.main_queue}\n")
        self.assertEqual([p["message_id"] for _, p, _ in await self.peek(bus, self.dead)], ids[:2])
        process = await run_cli("dead-letters", "drop", "-c", self.config, self.name, "nope")
        self.assertEqual(await process.ended, 1, process.stderr)
        self.assertEqual(await self.count(bus, self.dead), 2)

    async def test_drop(self) -> None:
        """drop ID deletes that one; drop --all the rest; nothing reaches the consumer's queue."""
        bus, ids = await self.fill()
        process = await run_cli("dead-letters", "drop", "-c", self.config, self.name, ids[0])
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual(process.stdout, f"1 message(s) dropped from {self.dead}\n")
        self.assertEqual([p["message_id"] for _, p, _ in await self.peek(bus, self.dead)], ids[1:])
        process = await run_cli("dead-letters", "drop", "-c", self.config, self.name, "--all")
        self.assertEqual(await process.ended, 0, process.stderr)
        self.assertEqual(process.stdout, f"2 message(s) dropped from {self.dead}\n")
        self.assertEqual(await self.count(bus, self.dead), 0)
        self.assertEqual(await self.count(bus, self.main_queue), 0)

    async def test_queue_missing(self) -> None:
        """A consumer whose queues were never declared: one line naming the queue, 69."""
        for action in (["list"], ["requeue", "--all"], ["drop", "x"]):
            process = await run_cli("dead-letters", action[0], "-c", self.config, self.name, *action[1:])
            self.assertEqual(await process.ended, 69, process.stderr)
            self.assertEqual(len(process.stderr.splitlines()), 1)
            self.assertIn(f"queue {self.dead} of consumer {self.name} does not exist", process.stderr)
            self.assertIn("404", process.stderr)

    async def test_unreachable(self) -> None:
        """A broker that can not be reached: 75 after the timeout."""
        config = write_config(self.directory / "closed", broker="amqp://guest:guest@127.0.0.1:1/%2F",
                              more=self.more)
        process = await run_cli("dead-letters", "list", "-c", config, self.name, "--timeout", "1")
        self.assertEqual(await process.ended, 75, process.stderr)
        self.assertIn("could not connect", process.stderr)

    async def test_login_refused(self) -> None:
        """A refused login: 77."""
        config = write_config(self.directory / "login", broker="amqp://guest:wrong@127.0.0.1:5672/%2F",
                              more=self.more)
        process = await run_cli("dead-letters", "requeue", "-c", config, self.name, "--all")
        self.assertEqual(await process.ended, 77, process.stderr)

    async def test_sigterm_midway(self) -> None:
        """SIGTERM while moving: 143, how far it got; every message in exactly one of the two queues."""
        bus = await self.start_bus()
        service = ConsumerService(self.component, Verdicts(), bus, reactor)
        topology = service.topology()
        self.addCleanup(
            deferToThread, delete_declared,
            [queue.name for queue in topology.queues], [exchange.name for exchange in topology.exchanges],
        )
        await bus.declare(topology)
        channel = await bus.open_channel()
        self.addCleanup(channel.client.close_channel, channel)
        total = 3000
        for n in range(total):
            channel.client.basic_publish(
                channel.id, self.dead, f"{self.prefix}.n", b"{}",
                {"message_id": f"n{n}", "delivery_mode": 2, "headers": {REASON: "test"}}, mandatory=False,
            )
        await self.wait_until_count(bus, self.dead, total)
        process = spawn("dead-letters", "requeue", "-c", self.config, self.name, "--all", "--limit", "1")
        self.addCleanup(process.kill)
        await self.wait_until_moving(bus, total)
        self.assertFalse(process.ended.called, process.stderr)
        process.signal(signal.SIGTERM)
        self.assertEqual(await process.ended, 143, process.stderr)
        [line] = process.stderr.splitlines()
        self.assertRegex(line, rf"^fedhub dead-letters: interrupted; (\d+) message\(s\) moved from {self.dead} to "
                               rf"{self.main_queue}$")
        moved = int(line.split("; ")[1].split()[0])
        self.assertGreater(moved, 0)
        self.assertLess(moved, total)
        self.assertEqual(await self.count(bus, self.main_queue), moved)
        self.assertEqual(await self.count(bus, self.dead), total - moved)
        left = [p["message_id"] for _, p, _ in await self.peek(bus, self.dead)]
        self.assertEqual(left, [f"n{n}" for n in range(moved, total)])

    async def wait_until_moving(self, bus: AMQPBus, total: int) -> None:
        for _ in range(600):
            if await self.count(bus, self.main_queue) > 0:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("nothing was moved")

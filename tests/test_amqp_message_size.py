"""
Tests for messages larger than the broker takes (RabbitMQ's
C{max_message_size}): the broker closes the publish channel with C{406
PRECONDITION_FAILED}, and the bus fails the oversized messages for good
instead of having them sent again and again.

The first part drives L{fedhub.amqp.transport.AMQPBus} over a scripted
broker with a fake clock; the second runs an L{fedhub.outbox.Outbox} against
a private RabbitMQ node (L{tests.broker}) configured with a small limit.
Without RabbitMQ installed that part is skipped, except in CI (C{CI=true}).
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fedhub.amqp.transport import AMQPBus, MessageTooLarge, _size_limit
from fedhub.amqp.url import parse_url
from fedhub.errors import ChannelError, NotConnected, PreconditionFailed, PublishError
from fedhub.message import Message
from fedhub.outbox import REJECTED, Outbox
from fedhub.topology import BindingSpec, QueueSpec, Topology
from tests.broker import PrivateBrokerCase, User, reactor, sleep, wait_until
from tests.test_amqp_bus import BusCase

LIMIT = 1024
"""The broker's C{max_message_size} in these tests."""


def size_text(size: int, limit: int = LIMIT) -> str:
    """What RabbitMQ says when it refuses a message of C{size} bytes."""
    return f"PRECONDITION_FAILED - message size {size} is larger than configured max size {limit}"


def sized(topic: str, size: int) -> Message:
    """A message whose body is exactly C{size} bytes."""
    message = Message.create(topic, {"pad": ""})
    padding = size - len(message.body_bytes)
    assert padding >= 0
    message = Message.create(topic, {"pad": "x" * padding})
    assert len(message.body_bytes) == size
    return message


class SizeLimitTextTests(SynchronousTestCase):
    """
    Reading the broker's limit from the reply that closed the channel.
    """

    def test_configured_limit(self) -> None:
        """The limit of a C{max_message_size} the operator configured is read."""
        self.assertEqual(_size_limit(PreconditionFailed(406, size_text(2000, 1024))), 1024)

    def test_default_limit(self) -> None:
        """RabbitMQ's text for its built-in maximum is read too."""
        text = "PRECONDITION_FAILED - message size 600000000 is larger than max size 536870912"
        self.assertEqual(_size_limit(PreconditionFailed(406, text)), 536870912)

    def test_other_replies(self) -> None:
        """Other 406 replies, and the text under another code, name no limit."""
        self.assertIsNone(_size_limit(PreconditionFailed(406, "PRECONDITION_FAILED - boom")))
        self.assertIsNone(_size_limit(ChannelError(403, size_text(2000))))


class OversizedPublishTests(BusCase):
    """
    The bus on a scripted broker that refuses a message as too large.
    """

    def refuse(self, size: int, limit: int = LIMIT) -> None:
        """The broker closes the publish channel for a message of C{size} bytes."""
        broker = self.broker
        channel = broker.publish_channel()
        broker.send(
            broker.frame(
                channel,
                "channel.close",
                reply_code=406,
                reply_text=size_text(size, limit),
                class_id=60,
                method_id=40,
            )
        )
        new_channel = broker.methods("confirm.select")[-1][0]
        self.assertNotEqual(new_channel, channel)
        broker.confirm_seq = {new_channel: 0}

    def send(self, message: Message) -> Deferred[None]:
        d = self.bus.publish(message)
        self.broker.pump()
        return d

    def test_oversized_message_fails_for_good(self) -> None:
        """
        The message larger than the limit fails with MessageTooLarge (not
        NotConnected, which would have it sent again); the others in flight
        fail with NotConnected, to be sent again.
        """
        before = sized("a.b", 100)
        big = sized("a.b", LIMIT + 1)
        after = sized("a.b", LIMIT)
        results = [self.send(m) for m in (before, big, after)]
        self.refuse(LIMIT + 1)
        error = self.failureResultOf(results[1], MessageTooLarge).value
        self.assertIsInstance(error, PublishError)
        self.assertNotIsInstance(error, NotConnected)
        self.assertEqual((error.message_id, error.size, error.limit), (big.id, LIMIT + 1, LIMIT))
        self.assertIn(str(LIMIT), str(error))
        self.assertIn("max_message_size", str(error))
        self.failureResultOf(results[0], NotConnected)
        self.failureResultOf(results[2], NotConnected)
        self.assertTrue(self.bus.connected)

    def test_every_oversized_message_in_flight_fails(self) -> None:
        """
        Oversized messages behind the one the broker named (which it
        discarded with the channel) fail the same way.
        """
        first = self.send(sized("a.b", 5000))
        second = self.send(sized("a.b", 3000))
        self.refuse(5000)
        self.assertEqual(self.failureResultOf(first, MessageTooLarge).value.size, 5000)
        self.assertEqual(self.failureResultOf(second, MessageTooLarge).value.size, 3000)

    def test_later_oversized_message_not_sent(self) -> None:
        """
        Once the broker named its limit, a larger message fails at once,
        without being sent (which would close the channel again); smaller
        ones go out.
        """
        refused = self.send(sized("a.b", 2000))
        self.refuse(2000)
        self.failureResultOf(refused, MessageTooLarge)
        published = len(self.broker.published)
        big = self.send(sized("a.b", LIMIT + 1))
        error = self.failureResultOf(big, MessageTooLarge).value
        self.assertEqual((error.size, error.limit), (LIMIT + 1, LIMIT))
        self.assertEqual(len(self.broker.published), published)
        small = self.send(sized("a.b", LIMIT))
        self.assertEqual(len(self.broker.published), published + 1)
        self.broker.ack(1)
        self.successResultOf(small)

    def test_waiting_oversized_message_not_sent(self) -> None:
        """
        A message that waited for the confirm window while the channel was
        refused is checked against the limit before it goes out.
        """
        self.make_bus(max_in_flight=1)
        first = self.send(sized("a.b", 2000))
        waiting = self.send(sized("a.b", 3000))
        self.assertEqual(len(self.broker.published), 1)
        self.refuse(2000)
        self.failureResultOf(first, MessageTooLarge)
        self.failureResultOf(waiting, MessageTooLarge)
        self.assertEqual(len(self.broker.published), 1)

    def test_limit_forgotten_on_a_new_connection(self) -> None:
        """
        The limit holds for the connection it was learned on: after a
        reconnect (the broker may have been reconfigured) a large message is
        sent again.
        """
        refused = self.send(sized("a.b", 2000))
        self.refuse(2000)
        self.failureResultOf(refused, MessageTooLarge)
        self.lose()
        self.reconnect()
        d = self.send(sized("a.b", 2000))
        self.assertEqual(len(self.broker.published), 1)
        self.broker.ack(1)
        self.successResultOf(d)

    def test_other_precondition_failure_stays_transient(self) -> None:
        """
        A 406 that names no size limit fails every message in flight with
        NotConnected, as before.
        """
        d = self.send(sized("a.b", 5000))
        broker = self.broker
        broker.send(
            broker.frame(
                broker.publish_channel(),
                "channel.close",
                reply_code=406,
                reply_text="PRECONDITION_FAILED - invalid expiration",
            )
        )
        self.failureResultOf(d, NotConnected)


class OversizedOutboxTests(PrivateBrokerCase):
    """
    An outbox publishing to a RabbitMQ node with a small
    C{max_message_size}.
    """

    timeout = 60
    tls = False
    extra_config = (f"max_message_size = {LIMIT}",)
    users = (User("hub", "hub-secret", permissions={"/": (".*", ".*", ".*")}),)

    def make_bus(self, domain: str) -> AMQPBus:
        url = f"{self.broker.url('/', 'hub', 'hub-secret')}?heartbeat=10"
        bus = AMQPBus(
            domain, parse_url(url), reactor=reactor(), reconnect_initial=0.1, reconnect_max=0.5
        )
        self.addCleanup(lambda: bus.stopService() if bus.running else None)
        return bus

    async def test_oversized_message_set_aside(self) -> None:
        """
        A message above the broker's limit goes to the outbox's failed area
        with the limit in its reason, sent at most twice; the messages
        around it are delivered and the domain keeps publishing.
        """
        run = uuid.uuid4().hex
        bus = self.make_bus("sized")
        outbox = Outbox("sized", self.mktemp(), bus, reactor(), retry_initial=0.05, retry_max=0.5)
        bus.startService()
        outbox.startService()
        self.addCleanup(lambda: outbox.stopService() if outbox.running else None)
        waiting = bus.when_connected()
        waiting.addTimeout(30, reactor())
        await waiting
        queue = f"fedhub.test.size.{run}"
        await bus.declare(
            Topology(
                queues=(QueueSpec(queue),),
                bindings=(BindingSpec(queue, "amq.topic", f"fedhubtest.{run}.#"),),
            )
        )
        topic = f"fedhubtest.{run}.sized"
        messages = [sized(topic, 100) for _ in range(5)]
        messages.insert(2, sized(topic, LIMIT + 1))
        messages.append(sized(topic, 4 * LIMIT))
        for message in messages:
            await outbox.publish(message)
        await wait_until(
            lambda: outbox.stats().failed == 2 and outbox.stats().depth == 0,
            20,
            "the oversized messages to be set aside and the others confirmed",
        )
        failed = await outbox.failed(limit=10)
        self.assertEqual({record.kind for record in failed}, {REJECTED})
        self.assertTrue(all(str(LIMIT) in record.reason for record in failed), failed)
        self.assertTrue(all("max_message_size" in record.reason for record in failed), failed)
        # Nothing is sent again: the broker's close taught the bus the limit.
        attempts = bus.stats.published
        await sleep(0.5)
        self.assertEqual(bus.stats.published, attempts)
        session = bus._session
        assert session is not None
        reply = await session.run_declaring(
            lambda channel: channel.queue_declare(queue=queue, passive=True)
        )
        self.assertGreaterEqual(int(reply.message_count), 5)
        results: list[Any] = await DeferredList(
            [bus.publish(sized(topic, 10 * LIMIT))], consumeErrors=True
        )
        ((ok, outcome),) = results
        self.assertFalse(ok)
        assert isinstance(outcome, Failure)
        self.assertIsInstance(outcome.value, MessageTooLarge)

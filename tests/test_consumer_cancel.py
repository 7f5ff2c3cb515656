"""
A consumer that stops or halts on a real broker (the shared RabbitMQ at
127.0.0.1:5672) cancels its AMQP consumer first: the messages it held but had
not begun go to the queue's other consumers at once, while the calls in hand
still settle on its open channel.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from fedhub.amqp.transport import AMQPBus
from fedhub.config import ComponentConfig
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import Halt
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from tests.broker import delete_declared, start_live_bus
from tests.test_amqp_bus import Collector, LiveCase
from tests.test_consumer_resume import CuttingProxy


@implementer(IMessageHandler)
class Holding:
    """
    A handler that holds every message until the test releases it, and
    halts on a message whose body says C{halt}.
    """

    topics = ("#",)

    def __init__(self) -> None:
        self.calls: list[Message] = []
        self.pending: dict[str, Deferred[None]] = {}

    def handle(self, message: Message) -> Any:
        self.calls.append(message)
        if message.body.get("halt"):
            raise Halt("the message says so")
        d: Deferred[None] = Deferred()
        self.pending[message.id] = d
        return d

    def release(self, message_id: str) -> None:
        self.pending.pop(message_id).callback(None)

    def release_all(self) -> None:
        for message_id in list(self.pending):
            self.release(message_id)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class CancelTests(LiveCase):
    """
    Stopping and halting hand the waiting messages to other consumers at
    once, and settle the calls in hand on the open channel.
    """

    timeout = 120

    async def bus(self, endpoint: Any = None) -> AMQPBus:
        return await start_live_bus(self, "live", 15, label="cancel", endpoint=endpoint)

    async def consumer(
        self, bus: AMQPBus, topic: str, concurrency: int, prefetch: int
    ) -> tuple[ConsumerService, Holding]:
        name = f"cancel-{uuid.uuid4().hex}"
        component = ComponentConfig(
            kind="consumer", index=0, name=name, plugin="test", domain="live", options={},
            topics=(topic,), queue=f"fedhub.test.{name}", concurrency=concurrency,
            prefetch=prefetch, drain_timeout=60.0, queue_arguments={"x-expires": 120_000},
        )
        handler = Holding()
        service = ConsumerService(component, handler, bus, reactor)
        topology = service.topology()
        # Cleanups run last first: the held calls end, the service stops,
        # then what it declared goes.
        self.addCleanup(
            deferToThread,
            delete_declared,
            [queue.name for queue in topology.queues],
            [exchange.name for exchange in topology.exchanges],
        )
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        self.addCleanup(handler.release_all)
        await self.wait_for(lambda: service.consuming, "the consumer to consume", 15)
        return service, handler

    async def depth(self, bus: AMQPBus, queue: str) -> tuple[int, int]:
        """
        The messages ready in a queue, and its consumers.
        """
        channel = await bus.open_channel()
        try:
            reply = await channel.queue_declare(queue=queue, passive=True)
            return int(reply.message_count), int(reply.consumer_count)
        finally:
            await channel.client.close_channel(channel)

    async def test_stop_hands_waiting_messages_to_others_at_once(self) -> None:
        """
        A consumer that stops with one call in hand and three deliveries
        waiting: another consumer of the queue gets the three while the
        call is still in hand; the call's message is acknowledged once it
        ends, and nothing is lost or handled twice.
        """
        bus, other_bus = await self.bus(), await self.bus()
        topic = f"org.fedhub.test.cancel.{uuid.uuid4().hex}"
        service, handler = await self.consumer(bus, topic, concurrency=1, prefetch=4)
        messages = [Message.create(topic, {"n": n}) for n in range(7)]
        for message in messages:
            await other_bus.publish(message)
        await self.wait_for(
            lambda: len(handler.calls) == 1 and service.waiting == 3, "a full prefetch"
        )
        (in_hand,) = handler.calls
        others = Collector()
        await other_bus.subscribe(service.queue, others, 20)
        # What the first consumer never got.
        await self.wait_for(lambda: len(others.deliveries) == 3, "the ready messages")
        stopping = service.stopService()
        await self.wait_for(
            lambda: len(others.deliveries) == 6, "the waiting messages at the other consumer", 5
        )
        # Still draining: the call in hand goes on.
        self.assertFalse(stopping.called)
        self.assertFalse(service.consuming)
        self.assertNotIn(in_hand.id, others.ids)
        handler.release(in_hand.id)
        await stopping
        self.assertEqual(service.stats["acked"], 1)
        self.assertEqual(service.stats["requeued"], 3)
        self.assertEqual(service.stats["unsettled"], 0)
        self.assertEqual([m.id for m in handler.calls], [in_hand.id])
        self.assertEqual(sorted(others.ids + [in_hand.id]), sorted(m.id for m in messages))
        self.assertEqual(await self.depth(other_bus, service.queue), (0, 1))

    async def test_halt_hands_waiting_messages_to_others_at_once(self) -> None:
        """
        A consumer that halts with another call in hand: the halting message
        and those waiting go to another consumer of the queue while that
        call is still in hand, whose message is acknowledged once it ends.
        """
        bus, other_bus = await self.bus(), await self.bus()
        topic = f"org.fedhub.test.cancel.{uuid.uuid4().hex}"
        service, handler = await self.consumer(bus, topic, concurrency=2, prefetch=5)
        first = Message.create(topic, {"n": 0})
        halting = Message.create(topic, {"halt": True})
        rest = [Message.create(topic, {"n": n}) for n in range(2, 8)]
        for message in [first, halting, *rest]:
            await other_bus.publish(message)
        await self.wait_for(lambda: service.halted, "the halt")
        others = Collector()
        await other_bus.subscribe(service.queue, others, 20)
        await self.wait_for(
            lambda: len(others.deliveries) == 7, "the halted consumer's messages elsewhere", 5
        )
        self.assertEqual([m.id for m in handler.calls], [first.id, halting.id])
        self.assertIn(first.id, handler.pending)
        self.assertNotIn(first.id, others.ids)
        self.assertEqual(sorted(others.ids), sorted(m.id for m in [halting, *rest]))
        handler.release(first.id)
        await self.wait_for(lambda: service.stats["acked"] == 1, "the call in hand to settle")
        await service.stopService()
        self.assertEqual(service.stats["unsettled"], 0)
        self.assertEqual(len(others.deliveries), 7)
        self.assertEqual(await self.depth(other_bus, service.queue), (0, 1))

    async def test_connection_lost_while_draining(self) -> None:
        """
        A connection lost while a stopping consumer waits for its call in
        hand: the stop ends once the call does, the consumer does not
        consume again after the reconnect, and the message in hand, whose
        acknowledgement could not be sent, reaches the other consumer.
        """
        proxy = CuttingProxy()
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        bus = await self.bus(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        other_bus = await self.bus()
        topic = f"org.fedhub.test.cancel.{uuid.uuid4().hex}"
        service, handler = await self.consumer(bus, topic, concurrency=1, prefetch=3)
        messages = [Message.create(topic, {"n": n}) for n in range(5)]
        for message in messages:
            await other_bus.publish(message)
        await self.wait_for(
            lambda: len(handler.calls) == 1 and service.waiting == 2, "a full prefetch"
        )
        (in_hand,) = handler.calls
        others = Collector()
        await other_bus.subscribe(service.queue, others, 20)
        stopping = service.stopService()
        await self.wait_for(lambda: len(others.deliveries) == 4, "the messages not in hand", 5)
        losses = bus.stats.connection_losses
        self.assertEqual(proxy.cut(), 1)
        await self.wait_for(
            lambda: bus.stats.connection_losses > losses and bus.connected, "the reconnect"
        )
        self.assertFalse(stopping.called)
        handler.release(in_hand.id)
        await stopping
        self.assertEqual(service.stats["acked"], 0)
        self.assertEqual(service.stats["unsettled"], 1)
        await self.wait_for(lambda: len(others.deliveries) == 5, "the message that was in hand")
        self.assertTrue(others.deliveries[-1].redelivered)
        self.assertEqual(sorted(others.ids), sorted(m.id for m in messages))
        self.assertEqual([m.id for m in handler.calls], [in_hand.id])
        self.assertEqual(await self.depth(other_bus, service.queue), (0, 1))

"""
Consumers on a real broker (the shared RabbitMQ at 127.0.0.1:5672) under
connection loss and slow plugins: consuming resumes after every forced
disconnect, and a plugin blocking in a thread stalls neither the heartbeats
nor other consumers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from zope.interface import implementer

from fedhub.amqp.transport import AMQPBus
from fedhub.config import ComponentConfig
from fedhub.consumers.runner import ConsumerService, Settled
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from tests.broker import delete_declared, start_live_bus
from tests.test_amqp_bus import LiveCase


class _Forwarder(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.live.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.live.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class CuttingProxy(portforward.ProxyFactory):
    """
    A TCP forwarder to the broker whose connections the test can cut at once.
    """

    protocol = _Forwarder

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 5672)
        self.live: set[_Forwarder] = set()

    def cut(self) -> int:
        """Drop every forwarded connection; return how many there were."""
        cut = list(self.live)
        for forwarder in cut:
            forwarder.transport.abortConnection()
        return len(cut)


@implementer(IMessageHandler)
class Recorder:
    """
    A handler that records when each message arrived; one that sleeps in a
    thread when the body asks.
    """

    topics = ("#",)

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.waiters: dict[str, Deferred[None]] = {}
        self.calls: list[tuple[str, bool]] = []
        # Ids of the messages whose sleep in a thread has ended.
        self.slept: set[str] = set()

    def handle(self, message: Message) -> Any:
        self.calls.append((message.id, message.redelivered))
        self.arrivals.setdefault(message.id, time.monotonic())
        sleep = message.body.get("sleep")
        if isinstance(sleep, (int, float)):
            # Blocking work goes to a thread, never the reactor.
            d = deferToThread(time.sleep, sleep)
            d.addCallback(lambda _: self.slept.add(message.id))
            return d
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def settled(self, event: Settled) -> None:
        """
        The consumer's observer: the message is handled and acknowledged.
        """
        waiter = self.waiters.pop(event.message.id, None)
        if waiter is not None and event.outcome == "acked":
            waiter.callback(None)

    def arrival(self, message_id: str, timeout: float) -> Deferred[None]:
        """
        Fires once the message was handled and acknowledged (not merely
        started: the next forced disconnect must not overtake the ack).
        """
        d: Deferred[None] = Deferred()
        self.waiters[message_id] = d
        d.addTimeout(timeout, reactor)
        return d


def component(name: str, topic: str, concurrency: int = 1) -> ComponentConfig:
    return ComponentConfig(
        kind="consumer", index=0, name=name, plugin="test", domain="live",
        options={}, topics=(topic,), queue=f"fedhub.test.{name}", concurrency=concurrency,
        queue_arguments={"x-expires": 120_000},
    )


class ResumeTests(LiveCase):
    """
    Consuming comes back by itself.
    """

    timeout = 400

    async def bus(self, endpoint: Any = None, heartbeat: int = 10) -> AMQPBus:
        return await start_live_bus(
            self, "live", 15, label="resume", heartbeat=heartbeat, endpoint=endpoint
        )

    async def consumer(self, bus: AMQPBus, name: str, topic: str, concurrency: int = 1) -> tuple[ConsumerService, Recorder]:
        handler = Recorder()
        service = ConsumerService(component(name, topic, concurrency), handler, bus, reactor)
        service.add_observer(handler.settled)
        topology = service.topology()
        # Cleanups run last first: the service stops, then what it declared
        # goes (the retry and dead-letter queues and exchanges do not
        # expire by themselves).
        self.addCleanup(
            deferToThread,
            delete_declared,
            [queue.name for queue in topology.queues],
            [exchange.name for exchange in topology.exchanges],
        )
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(150):
            if service.consuming:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(service.consuming)
        return service, handler

    async def test_hundred_forced_disconnects(self) -> None:
        """100 disconnects in a row: each time a message published 1 s later is handled within 5 s."""
        proxy = CuttingProxy()
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        consuming_bus = await self.bus(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        publishing_bus = await self.bus()
        token = uuid.uuid4().hex
        topic = f"org.fedhub.test.resume.{token}"
        service, handler = await self.consumer(consuming_bus, f"resume-{token}", topic)
        for round_ in range(100):
            self.assertEqual(proxy.cut(), 1, f"round {round_}: one connection to cut")
            await deferLater(reactor, 1.0, lambda: None)
            message = Message.create(topic, {"round": round_})
            # Handled and acknowledged within 5 s of its publication, or
            # the wait times out and the test fails.
            processed = handler.arrival(message.id, 5.0)
            await publishing_bus.publish(message)
            await processed
            # Let the ack leave before the next cut: an ack still in a socket
            # buffer when the connection goes means a (correct) redelivery.
            await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(handler.arrivals), 100)
        self.assertGreaterEqual(consuming_bus.stats.connection_losses, 100)
        # A cut can still overtake an ack in flight: the broker then delivers
        # the message again (at least once), flagged as redelivered.
        seen: set[str] = set()
        for message_id, redelivered in handler.calls:
            if message_id in seen:
                self.assertTrue(redelivered, f"{message_id} handled twice without the redelivered flag")
            seen.add(message_id)
        self.assertEqual(len(seen), 100)
        self.assertLessEqual(len(handler.calls) - 100, 10)
        self.assertEqual(service.stats["acked"], len(handler.calls))

    async def test_blocking_plugin_in_thread(self) -> None:
        """A plugin sleeping 2 s in a thread leaves heartbeats (1 s) and another consumer unaffected."""
        bus = await self.bus(heartbeat=1)
        token = uuid.uuid4().hex
        slow_topic, fast_topic = f"org.fedhub.test.slow.{token}", f"org.fedhub.test.fast.{token}"
        _, slow = await self.consumer(bus, f"slow-{token}", slow_topic)
        fast_service, fast = await self.consumer(bus, f"fast-{token}", fast_topic)
        losses = bus.stats.connection_losses
        sleeper = Message.create(slow_topic, {"sleep": 2.0})
        slept = slow.arrival(sleeper.id, 10.0)
        await bus.publish(sleeper)
        while sleeper.id not in slow.arrivals:
            await deferLater(reactor, 0.02, lambda: None)
        for n in range(10):
            message = Message.create(fast_topic, {"n": n})
            handled = fast.arrival(message.id, 5.0)
            await bus.publish(message)
            await handled
            # Handled and acknowledged while the slow plugin still sleeps.
            self.assertNotIn(sleeper.id, slow.slept, f"message {n} waited for the sleeping plugin")
            await deferLater(reactor, 0.05, lambda: None)
        await slept
        self.assertIn(sleeper.id, slow.slept)
        self.assertEqual(bus.stats.connection_losses, losses)
        self.assertTrue(bus.connected)
        self.assertEqual(fast_service.stats["acked"], 10)

"""
How long a consumer's stop may take when its broker never answers the
C{basic.cancel} the stop begins with: the consumer waits for the
C{basic.cancel-ok} at most L{CANCEL_TIMEOUT} seconds, and the hub counts that
wait in the time it gives a consumer to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.consumers.runner import CANCEL_TIMEOUT, ConsumerService
from fedhub.errors import Halt
from fedhub.hub import STOP_TIMEOUT, SequentialMultiService, stop_timeout
from fedhub.interfaces import IDelivery, IMessageHandler, ISubscription
from fedhub.message import Message
from tests.test_amqp_bus import BusCase
from tests.test_consumer_runner import component
from tests.test_hub import Step

#: The consumers' drain_timeout in these tests.
DRAIN = 10.0


@implementer(IMessageHandler)
class Stuck:
    """
    A handler that never finishes a message, and whose C{stop()} never
    finishes either: the longest a consumer's stop can take.
    """

    topics = ("#",)

    def __init__(self) -> None:
        self.seen: list[Message] = []
        self.stopping = 0

    def handle(self, message: Message) -> Deferred[None]:
        self.seen.append(message)
        return Deferred()

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        self.stopping += 1
        return Deferred()


@implementer(IMessageHandler)
class Quick:
    """
    A handler that acknowledges every message and stops at once.
    """

    topics = ("#",)

    def handle(self, message: Message) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Halting(Quick):
    """
    A handler that halts its consumer on every message.
    """

    def handle(self, message: Message) -> None:
        raise Halt("the message says so")


@implementer(ISubscription)
class Unanswered:
    """
    A memory bus subscription that can stop delivering, as an AMQP one does
    with C{basic.cancel}, but whose C{stop_consuming} never fires: a broker
    that never answers with C{basic.cancel-ok}, on a bus that does not bound
    the wait itself.
    """

    def __init__(self) -> None:
        self.inner: ISubscription | None = None
        self.queue = ""
        self.asked = 0
        self.cancelled = False
        self.held: list[IDelivery] = []

    @property
    def consuming(self) -> bool:
        return self.inner is not None and bool(self.inner.consuming) and not self.asked

    def wrap(self, on_delivery: Callable[[IDelivery], object]) -> Callable[[IDelivery], object]:
        """
        The consumer's C{on_delivery}, as the memory bus calls it: once
        asked to stop delivering, a delivery is held here (unacknowledged,
        so it goes back to its queue when the subscription ends) instead,
        as a broker that had the C{basic.cancel} would not send it.
        """

        def deliver(delivery: IDelivery) -> object:
            if self.asked:
                self.held.append(delivery)
                return None
            return on_delivery(delivery)

        return deliver

    def stop_consuming(self) -> Deferred[None]:
        self.asked += 1
        return Deferred()

    def cancel(self) -> Deferred[None]:
        assert self.inner is not None
        self.cancelled = True
        return self.inner.cancel()


class UnansweredBus(MemoryBus):
    """
    A memory bus whose subscriptions are L{Unanswered}.
    """

    def __init__(self, domain: str, clock: Clock) -> None:
        super().__init__(domain, clock=clock)
        self.subscriptions: list[Unanswered] = []

    def subscribe(
        self, queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> Deferred[ISubscription]:
        subscription = Unanswered()

        def subscribed(inner: ISubscription) -> ISubscription:
            subscription.inner, subscription.queue = inner, inner.queue
            self.subscriptions.append(subscription)
            return subscription

        subscribing = super().subscribe(queue, subscription.wrap(on_delivery), prefetch)
        return subscribing.addCallback(subscribed)


def unanswered_events(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """
    The consumers' log events saying the bus did not answer in time,
    collected for the duration of C{case}.
    """
    events: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "deliveries stopped" in event.get("log_format", ""):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class UnansweredCancelTests(SynchronousTestCase):
    """
    A consumer whose bus never says that deliveries stopped.
    """

    def consumer(self, handler: IMessageHandler) -> tuple[ConsumerService, UnansweredBus, Clock]:
        clock = Clock()
        bus = UnansweredBus("d", clock)
        bus.startService()
        service = ConsumerService(component(drain_timeout=DRAIN), handler, bus, clock)
        service.setName("consumer:c")
        service.startService()
        for _ in range(3):
            clock.advance(0)
        self.assertTrue(service.consuming)
        return service, bus, clock

    def publish(self, bus: MemoryBus, clock: Clock) -> None:
        self.successResultOf(bus.publish(Message.create("t.x", {"n": 1})))
        for _ in range(3):
            clock.advance(0)

    def test_stop_ends_the_subscription_after_the_cancel_timeout(self) -> None:
        """
        With nothing in hand, the stop waits CANCEL_TIMEOUT for the answer,
        says so, then ends the subscription and stops the plugin.
        """
        events = unanswered_events(self)
        service, bus, clock = self.consumer(Quick())
        stopped = service.stopService()
        (subscription,) = bus.subscriptions
        self.assertEqual(subscription.asked, 1)
        clock.advance(CANCEL_TIMEOUT - 0.5)
        self.assertNoResult(stopped)
        self.assertFalse(subscription.cancelled)
        self.assertEqual(events, [])
        clock.advance(0.5)
        self.successResultOf(stopped)
        self.assertTrue(subscription.cancelled)
        self.assertEqual([(e["consumer"], e["timeout"]) for e in events], [("c", CANCEL_TIMEOUT)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_longest_stop_is_the_consumer_allowance(self) -> None:
        """
        A message in hand that never ends, no answer to the cancel and a
        plugin stop() that never ends: the stop still finishes, after
        drain_timeout, CANCEL_TIMEOUT and drain_timeout, which is what the
        hub gives a consumer on top of STOP_TIMEOUT.
        """
        handler = Stuck()
        service, bus, clock = self.consumer(handler)
        self.publish(bus, clock)
        self.assertEqual(len(handler.seen), 1)
        stopped = service.stopService()
        (subscription,) = bus.subscriptions
        clock.advance(DRAIN)
        self.assertFalse(subscription.cancelled)
        self.assertEqual(handler.stopping, 0)
        clock.advance(CANCEL_TIMEOUT)
        self.assertTrue(subscription.cancelled)
        self.assertEqual(handler.stopping, 1)
        longest = 2 * DRAIN + CANCEL_TIMEOUT
        clock.advance(DRAIN - 0.5)
        self.assertNoResult(stopped)
        clock.advance(0.5)
        self.successResultOf(stopped)
        self.assertEqual(clock.seconds(), longest)
        self.assertEqual(stop_timeout(service), STOP_TIMEOUT + longest)
        # The message in hand went back with the subscription.
        self.assertEqual(bus.queue_depth("fedhub.c"), 1)
        self.flushLoggedErrors()

    def test_halt_ends_the_subscription_after_the_cancel_timeout(self) -> None:
        """
        A halting consumer ends its subscription CANCEL_TIMEOUT after its
        calls in hand settled when the bus never answers; a stop then
        finishes at once.
        """
        service, bus, clock = self.consumer(Halting())
        self.publish(bus, clock)
        self.assertTrue(service.halted)
        (subscription,) = bus.subscriptions
        self.assertEqual(subscription.asked, 1)
        clock.advance(CANCEL_TIMEOUT - 0.5)
        self.assertFalse(subscription.cancelled)
        clock.advance(0.5)
        self.assertTrue(subscription.cancelled)
        self.assertEqual(bus.queue_depth("fedhub.c"), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_hub_waits_for_the_longest_stop(self) -> None:
        """
        In the hub's staged stop, such a consumer finishes its own stop
        within the hub's bound: it is not logged as unfinished, and the
        stage before it stops once it has.
        """
        hub_events: list[dict[str, Any]] = []

        @implementer(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if "service" in event and "did not stop within" in event.get("log_format", ""):
                hub_events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        clock = Clock()
        bus = UnansweredBus("d", clock)
        bus.startService()
        order: list[str] = []
        parent = SequentialMultiService(clock=clock)
        outbox = Step("outbox:d", order)
        outbox.setServiceParent(parent)
        handler = Stuck()
        service = ConsumerService(component(drain_timeout=DRAIN), handler, bus, clock)
        service.setName("consumer:c")
        service.setServiceParent(parent)
        parent.startService()
        for _ in range(3):
            clock.advance(0)
        self.publish(bus, clock)
        stopped = parent.stopService()
        clock.advance(DRAIN)
        clock.advance(CANCEL_TIMEOUT)
        clock.advance(DRAIN - 0.5)
        self.assertEqual(order, [])
        clock.advance(0.5)
        self.assertEqual(order, ["outbox:d"])
        outbox.release.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(hub_events, [])
        self.successResultOf(bus.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
        self.flushLoggedErrors()


class AMQPUnansweredCancelTests(BusCase):
    """
    A consumer on an AMQP bus whose scripted broker never answers the
    C{basic.cancel}.
    """

    def stop_unanswered(self, close_timeout: float) -> None:
        """
        Stop a consumer with nothing in hand on a bus whose own wait for
        C{basic.cancel-ok} is C{close_timeout}: CANCEL_TIMEOUT after the
        basic.cancel (the earlier of the two bounds, with the default
        close_timeout both), the consumer's channel closes and the stop
        finishes.
        """
        self.make_bus(close_timeout=close_timeout)
        self.broker.answer_cancel = False
        service = ConsumerService(component(drain_timeout=DRAIN), Quick(), self.bus, self.clock)
        service.startService()
        for _ in range(5):
            self.broker.pump()
            self.clock.advance(0)
        self.assertTrue(service.consuming)
        (channel, _, consume) = self.broker.methods("basic.consume")[-1]
        stopped = service.stopService()
        self.broker.pump()
        self.assertEqual(
            [m[2]["consumer_tag"] for m in self.broker.methods("basic.cancel")],
            [consume["consumer_tag"]],
        )
        self.clock.advance(CANCEL_TIMEOUT - 0.5)
        self.broker.pump()
        self.assertNoResult(stopped)
        self.assertEqual(self.broker.methods("channel.close"), [])
        self.clock.advance(0.5)
        self.broker.pump()
        self.assertEqual([m[0] for m in self.broker.methods("channel.close")], [channel])
        self.successResultOf(stopped)
        self.assertTrue(self.bus.connected)
        # Nothing is left waiting: the bus stops, and no timer is left.
        closing = self.bus.stopService()
        self.broker.pump()
        self.lose()
        self.successResultOf(closing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_close_timeout(self) -> None:
        """
        On a bus with the default close_timeout: the broker's close-ok for
        the channel ends the stop though the cancel-ok never came.
        """
        self.stop_unanswered(5.0)

    def test_longer_close_timeout(self) -> None:
        """
        On a bus that would wait longer for the cancel-ok than
        CANCEL_TIMEOUT, the consumer does not wait for the bus.
        """
        self.stop_unanswered(60.0)

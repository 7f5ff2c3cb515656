"""
Tests for L{fedhub.consumers.runner} at its edges: malformed C{x-death}
headers, verdicts that come after the delivery's channel closed, a plugin
whose C{stop()} hangs, and a subscription that starts after stopping began.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus, MemorySubscription
from fedhub.consumers.runner import (
    DEAD_LETTER_REASON_HEADER,
    TRANSIENT_REQUEUE_DELAY,
    ConsumerService,
    Settled,
    attempts_from,
)
from fedhub.errors import DeadLetter, Halt, NotConnected, Retry
from fedhub.interfaces import IDelivery, ISubscription
from fedhub.message import Message
from fedhub.schema import SchemaRegistry
from tests.test_consumer_runner import ConsumerCase, FakeDelivery, ScriptedHandler, component


class Handler(ScriptedHandler):
    """
    A L{ScriptedHandler} whose C{stop()} returns C{stop_result} and counts
    its calls.
    """

    def __init__(self, *outcomes: Any) -> None:
        super().__init__(*outcomes)
        self.stop_result: Any = None
        self.stops = 0

    def stop(self) -> Any:  # type: ignore[override]
        self.stops += 1
        return self.stop_result


class LateSubscribingBus(MemoryBus):
    """
    A memory bus whose subscriptions start only when the test says so, as
    an AMQP bus's do once its connection is up.
    """

    def __init__(self, domain: str, clock: Clock) -> None:
        super().__init__(domain, clock=clock)
        self.held: list[tuple[Deferred[ISubscription], Deferred[ISubscription]]] = []

    def subscribe(
        self, queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> Deferred[ISubscription]:
        later: Deferred[ISubscription] = Deferred()
        self.held.append((super().subscribe(queue, on_delivery, prefetch), later))
        return later

    def connect(self) -> list[ISubscription]:
        """Let every held subscription start; return them."""
        started: list[ISubscription] = []
        for subscribed, later in self.held:
            subscribed.addCallback(lambda s: (started.append(s), s)[1]).chainDeferred(later)
        self.held = []
        return started


def retried(count: Any, queue: str = "fedhub.c.retry.1", reason: str = "expired") -> dict[str, Any]:
    """An C{x-death} entry as RabbitMQ writes it for a message that left C{queue}."""
    return {
        "count": count,
        "reason": reason,
        "queue": queue,
        "exchange": queue,
        "routing-keys": ["t.x"],
    }


class EdgeTests(ConsumerCase):
    """
    A consumer on a memory bus whose time is a L{Clock}.
    """

    def start(  # type: ignore[override]
        self, handler: Handler, bus: MemoryBus | None = None, **settings: Any
    ) -> ConsumerService:
        """
        A started consumer of C{handler} on C{bus} (the test's own by
        default), consuming or not: a L{LateSubscribingBus}'s consumer
        does not consume yet.
        """
        service = ConsumerService(component(), handler, bus or self.bus, self.clock, **settings)
        service.startService()
        self.flush()
        return service

    def depths(self, *queues: str) -> list[int]:
        """Ready plus unacknowledged messages of each queue."""
        return [self.bus.queue_depth(q) + self.bus.unacked(q) for q in queues]

    # -- x-death -------------------------------------------------------------

    def test_negative_death_count_is_no_credit(self) -> None:
        """
        An x-death count below zero (a forged or broken header) gives a
        message no extra retries and does not leave it unsettled: a Retry
        sends it to the first retry queue and its delivery is acknowledged.
        """
        handler = Handler(Retry("later"))
        service = self.start(handler, max_retries=3)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        message = self.publish(headers={"x-death": [retried(-10), retried(2, "fedhub.c.retry.2")]})
        self.assertEqual(attempts_from(message, "fedhub.c.retry."), 2)
        self.assertEqual(
            self.depths("fedhub.c", "fedhub.c.retry.1", "fedhub.c.retry.2", "fedhub.c.retry.3"),
            [0, 0, 0, 1],
        )
        self.assertEqual([s.outcome for s in settled], ["retried"])

    def test_negative_death_count_alone(self) -> None:
        """A message whose only x-death count is negative is retried from the first level."""
        handler = Handler(Retry("later"))
        service = self.start(handler, max_retries=3)
        message = self.publish(headers={"x-death": [retried(-1)]})
        self.assertEqual(attempts_from(message, "fedhub.c.retry."), 0)
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.retry.1", "fedhub.c.dead"), [0, 1, 0])
        self.assertEqual(service.stats["retried"], 1)

    def test_other_queues_deaths_do_not_count(self) -> None:
        """
        Only deaths in this consumer's own retry queues count: not those of
        a queue whose name merely starts like them (another consumer's
        retry queues), nor rejections from them.
        """
        message = Message.create(
            "t.x",
            {"n": 1},
            headers={
                "x-death": [
                    retried(4, "fedhub.c.retry.x.retry.1"),
                    retried(3, "fedhub.c.retry.later"),
                    retried(2, "fedhub.c.retry.1", reason="rejected"),
                    retried(5, "fedhub.other.retry.1"),
                    retried(1, "fedhub.c.retry.2"),
                ]
            },
        )
        self.assertEqual(attempts_from(message, "fedhub.c.retry."), 1)

    def test_enormous_death_header(self) -> None:
        """
        A message whose x-death holds thousands of entries and a huge count
        is dead-lettered at its first Retry, not handled again.
        """
        deaths = [retried(1, f"fedhub.other{n}.retry.1") for n in range(5000)]
        deaths.append(retried(10**30))
        handler = Handler(Retry("later"))
        self.start(handler, max_retries=3)
        self.publish(headers={"x-death": deaths})
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.retry.1", "fedhub.c.dead"), [0, 0, 1])

    # -- late verdicts ---------------------------------------------------------

    def late_verdict(self, verdict: Exception) -> tuple[ConsumerService, list[Settled]]:
        """
        A handler's verdict comes after its delivery's channel closed (the
        subscription was cancelled, as when the broker's consumer timeout
        closes a channel).
        """
        pending: Deferred[None] = Deferred()
        service = self.start(Handler(pending), max_retries=2)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        self.publish()
        subscription = service._subscription
        assert subscription is not None
        self.successResultOf(subscription.cancel())
        pending.errback(verdict)
        self.flush()
        return service, settled

    def test_late_dead_letter_publishes_no_copy(self) -> None:
        """
        A DeadLetter verdict on a delivery whose channel closed publishes no
        dead-letter copy: the broker has put the message back, and it is
        handled again.
        """
        service, settled = self.late_verdict(DeadLetter("bad"))
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.dead"), [1, 0])
        self.assertEqual([s.outcome for s in settled], ["requeued"])
        self.assertEqual((service.stats["dead_lettered"], service.stats["unsettled"]), (0, 1))

    def test_late_retry_publishes_no_copy(self) -> None:
        """
        A Retry verdict on a delivery whose channel closed publishes no
        retry copy, which would be handled besides the message the broker
        put back.
        """
        service, settled = self.late_verdict(Retry("later"))
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.retry.1"), [1, 0])
        self.assertEqual([s.outcome for s in settled], ["requeued"])
        self.assertEqual((service.stats["retried"], service.stats["unsettled"]), (0, 1))

    def test_late_halt_is_unsettled(self) -> None:
        """
        A Halt verdict on a delivery whose channel closed halts the consumer
        but is counted as unsettled, not requeued: the rejection never
        reached the broker, which put the message back by itself.
        """
        service, settled = self.late_verdict(Halt("enough"))
        self.assertTrue(service.halted)
        self.assertEqual(self.depths("fedhub.c"), [1])
        self.assertEqual([s.outcome for s in settled], ["requeued"])
        self.assertIn("channel closed", settled[0].reason or "")
        self.assertEqual((service.stats["requeued"], service.stats["unsettled"]), (0, 1))

    def verdict_after_drain_timeout(self, verdict: Exception) -> ConsumerService:
        """
        A handler's verdict comes only after stopping gave up waiting for
        it (drain_timeout 5 s) and the stop finished.
        """
        pending: Deferred[None] = Deferred()
        service = self.start(Handler(pending), drain_timeout=5)
        self.publish()
        stopped = service.stopService()
        self.flush(5)
        self.successResultOf(stopped)
        pending.errback(verdict)
        self.flush()
        return service

    def test_halt_after_drain_timeout(self) -> None:
        """
        A handler that halts only after stopping gave up on it: the message
        is left to its queue and counted as unsettled.
        """
        service = self.verdict_after_drain_timeout(Halt("too late"))
        self.assertEqual(self.depths("fedhub.c"), [1])
        self.assertEqual((service.stats["requeued"], service.stats["unsettled"]), (0, 1))

    def test_verdict_after_drain_timeout(self) -> None:
        """
        A handler that finishes with a DeadLetter only after stopping gave
        up on it leaves the message in its queue alone: no copy is published.
        """
        service = self.verdict_after_drain_timeout(DeadLetter("too late"))
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.dead"), [1, 0])
        self.assertEqual(service.stats["unsettled"], 1)

    # -- stopping ----------------------------------------------------------------

    def test_plugin_stop_hanging(self) -> None:
        """
        A plugin whose stop() never finishes delays stopping the consumer by
        drain_timeout at most; the hang is logged.
        """
        handler = Handler(None)
        never: Deferred[None] = Deferred()
        handler.stop_result = never
        service = self.start(handler, drain_timeout=5)
        stopped = service.stopService()
        self.flush(4.9)
        self.assertNoResult(stopped)
        self.flush(0.1)
        self.successResultOf(stopped)
        self.assertEqual(handler.stops, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_plugin_stop_after_drain(self) -> None:
        """
        The plugin's stop() gets its own drain_timeout after the messages in
        hand were waited for; a stop() that finishes in time is waited for.
        """
        pending: Deferred[None] = Deferred()
        handler = Handler(pending)
        slow: Deferred[None] = Deferred()
        handler.stop_result = slow
        service = self.start(handler, drain_timeout=5)
        self.publish()
        stopped = service.stopService()
        self.flush(4)
        pending.callback(None)
        self.flush(4)
        self.assertNoResult(stopped)
        slow.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(service.stats["acked"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_subscription_after_stop_began(self) -> None:
        """
        A subscription that starts only after stopping began (the broker
        was unreachable until then) is cancelled at once: the consumer does
        not consume, and messages stay in the queue untouched.
        """
        bus = LateSubscribingBus("d", self.clock)
        bus.startService()
        handler = Handler(None)
        service = self.start(handler, bus=bus)
        self.assertFalse(service.consuming)
        self.successResultOf(service.stopService())
        self.successResultOf(bus.publish(Message.create("t.x", {"n": 1})))
        (subscription,) = bus.connect()
        # Before any delivery: one would be put back and delivered again
        # at once, for as long as the subscription lives.
        self.assertFalse(service.consuming)
        self.assertFalse(cast(MemorySubscription, subscription).active)
        self.flush()
        self.assertEqual(service.stats["requeued"], 0)
        self.assertEqual((bus.queue_depth("fedhub.c"), bus.unacked("fedhub.c")), (1, 0))
        self.assertEqual(handler.seen, [])

    # -- verdicts as plugins write them ----------------------------------------

    def test_verdict_reason_not_a_string(self) -> None:
        """
        A verdict given an exception rather than a string as its reason
        (C{DeadLetter(error)}) still dead-letters the message, with the
        exception's text as the reason, instead of leaving it unsettled.
        """
        handler = Handler(DeadLetter(KeyError("build_id")))  # type: ignore[arg-type]
        service = self.start(handler)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        self.publish()
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.dead"), [0, 1])
        dead: list[Message] = []
        self.successResultOf(
            self.bus.subscribe("fedhub.c.dead", lambda d: (dead.append(d.message), d.ack()), 10)
        )
        self.flush()
        self.assertEqual(dead[0].headers[DEAD_LETTER_REASON_HEADER], "'build_id'")
        self.assertEqual([(s.outcome, s.reason) for s in settled], [("dead_lettered", "'build_id'")])

    def test_retry_delay_not_a_number(self) -> None:
        """
        A Retry whose delay is no number (a Retry-After header passed on as
        text) retries with the consumer's backoff instead of leaving the
        message unsettled.
        """
        handler = Handler(Retry("busy", delay="30"))  # type: ignore[arg-type]
        service = self.start(handler, retry_delay=1.0, max_retries=3)
        self.publish()
        self.assertEqual(self.depths("fedhub.c", "fedhub.c.retry.1"), [0, 1])
        self.assertEqual(service.stats["retried"], 1)


class RecordingDelivery(FakeDelivery):
    """
    A L{FakeDelivery} whose C{ack} raises C{ack_error} when one is set, and
    whose C{reject} after a verdict does nothing.
    """

    def __init__(self, message: Message, ack_error: Exception | None = None) -> None:
        super().__init__(message)
        self.ack_error = ack_error

    def ack(self) -> bool:
        if self.ack_error is not None:
            raise self.ack_error
        return super().ack()

    def reject(self, requeue: bool) -> bool:
        if self.verdicts:
            return False
        return super().reject(requeue)


class BrokenPublishBus(MemoryBus):
    """
    A memory bus whose C{publish} raises at once: a defect below the runner
    (or in a bus of a plugin's own) that the runner must survive.
    """

    def publish(self, message: Message, exchange: str | None = None,
                routing_key: str | None = None) -> Deferred[None]:
        raise RuntimeError("publishing is broken")


class AwayPublishBus(MemoryBus):
    """
    A memory bus whose publishes fail as the AMQP bus's do when its publish
    channel or connection went away: with L{NotConnected}.
    """

    def publish(self, message: Message, exchange: str | None = None,
                routing_key: str | None = None) -> Deferred[None]:
        return fail(NotConnected("the publish channel was closed by the broker"))


class CrashingSchemas(SchemaRegistry):
    """
    A schema registry whose check raises something other than a
    L{SchemaValidationError}, as a schema package's faulty format checker can.
    """

    def validate(self, message: Message) -> bool:
        raise ValueError("the checker crashed")


class SettlingFailureTests(SynchronousTestCase):
    """
    Whatever goes wrong while a delivery is settled, it is settled or given
    back, never left holding a prefetch slot until its channel closes.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def start(self, handler: Handler, bus: MemoryBus | None = None, **settings: Any) -> ConsumerService:
        bus = bus or MemoryBus("d", clock=self.clock)
        bus.startService()
        service = ConsumerService(component(), handler, bus, self.clock, **settings)
        service.startService()
        self.clock.advance(0)
        self.settled: list[Settled] = []
        service.add_observer(self.settled.append)
        return service

    def deliver(self, service: ConsumerService, ack_error: Exception | None = None) -> RecordingDelivery:
        delivery = RecordingDelivery(
            Message.create("t.x", {"n": 1}).evolve(queue=service.queue), ack_error
        )
        service._on_delivery(delivery)
        return delivery

    def test_retry_copy_raises(self) -> None:
        """
        A bus whose publish raises while a Retry's copy is published leaves
        the broker to dead-letter the original, as a refused copy does.
        """
        service = self.start(Handler(Retry("later")), BrokenPublishBus("d", clock=self.clock))
        delivery = self.deliver(service)
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual([s.outcome for s in self.settled], ["rejected"])
        self.flushLoggedErrors(RuntimeError)

    def test_retry_copy_raises_after_a_deferred(self) -> None:
        """
        The same holds for a handler whose verdict comes later, in a Deferred.
        """
        later: Deferred[None] = Deferred()
        service = self.start(Handler(later), BrokenPublishBus("d", clock=self.clock))
        delivery = self.deliver(service)
        later.errback(Retry("later"))
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual([s.outcome for s in self.settled], ["rejected"])
        self.flushLoggedErrors(RuntimeError)

    def test_copy_not_published_for_a_passing_reason(self) -> None:
        """
        A retry or dead-letter copy that could not be published because the
        publish side went away puts the original back in its queue, after a
        pause and without using up a retry; it is not dead-lettered.
        """
        for verdict, outcome in ((Retry("later"), "retried"), (DeadLetter("bad"), "dead_lettered")):
            service = self.start(Handler(verdict), AwayPublishBus("d", clock=self.clock))
            delivery = self.deliver(service)
            self.assertEqual(delivery.verdicts, [])
            self.assertEqual(self.settled, [])
            self.clock.advance(TRANSIENT_REQUEUE_DELAY)
            self.assertEqual(delivery.verdicts, ["requeue"])
            self.assertEqual([s.outcome for s in self.settled], ["requeued"])
            self.assertIn(f"{outcome}, but the copy could not be published", self.settled[0].reason)
            self.assertEqual((service.stats["requeued"], service.stats["rejected"]), (1, 0))
            self.assertFalse(self.flushLoggedErrors())

    def test_ack_raises(self) -> None:
        """
        An acknowledgement that raises puts the message back in its queue,
        logged once with its id, and the consumer goes on with the next one.
        """
        service = self.start(Handler(None))
        broken = self.deliver(service, ack_error=RuntimeError("ack broken"))
        self.assertEqual(broken.verdicts, ["requeue"])
        self.assertEqual([s.outcome for s in self.settled], ["requeued"])
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)
        self.assertEqual(service.in_flight, 0)
        following = self.deliver(service)
        self.assertEqual(following.verdicts, ["ack"])

    def test_ack_raises_after_a_deferred(self) -> None:
        """
        An acknowledgement that raises after a handler's Deferred succeeded
        puts the message back too.
        """
        later: Deferred[None] = Deferred()
        service = self.start(Handler(later))
        broken = self.deliver(service, ack_error=RuntimeError("ack broken"))
        later.callback(None)
        self.assertEqual(broken.verdicts, ["requeue"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_ack_after_copy_raises(self) -> None:
        """
        An acknowledgement that raises once a dead-letter copy is confirmed
        puts the original back rather than leaving it unacknowledged.
        """
        service = self.start(Handler(DeadLetter("bad")))
        broken = self.deliver(service, ack_error=RuntimeError("ack broken"))
        self.clock.advance(0)
        self.assertEqual(broken.verdicts, ["requeue"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_schema_check_crashes(self) -> None:
        """
        A schema check that raises something other than a validation error
        is a failure like a handler's: the consumer's on_error policy
        settles the message (here: dead-letter) instead of leaving it
        unacknowledged.
        """
        service = self.start(Handler(None), schemas=CrashingSchemas(), on_error="dead-letter")
        delivery = self.deliver(service)
        self.clock.advance(0)
        self.assertEqual(delivery.verdicts, ["ack"])
        self.assertEqual([s.outcome for s in self.settled], ["dead_lettered"])
        self.assertIn("ValueError: the checker crashed", self.settled[0].reason or "")
        self.flushLoggedErrors(ValueError)


@implementer(ISubscription)
class EagerSubscription:
    """
    A subscription whose broker, as RabbitMQ may, delivers a message rejected
    with requeue again at once on the same channel, for as long as the
    subscription is not cancelled.
    """

    queue = "fedhub.c"

    def __init__(self, on_delivery: Callable[[IDelivery], object]) -> None:
        self.on_delivery = on_delivery
        self.cancelled = False
        self.consuming = True

    def cancel(self) -> Deferred[None]:
        self.cancelled = True
        self.consuming = False
        return succeed(None)

    def deliver(self, message: Message) -> RecordingDelivery:
        delivery = EagerDelivery(message.evolve(queue=self.queue), self)
        self.on_delivery(delivery)
        return delivery


class EagerDelivery(RecordingDelivery):
    """
    A delivery of an L{EagerSubscription}: requeued, it comes again
    redelivered unless the subscription was cancelled first.
    """

    def __init__(self, message: Message, subscription: EagerSubscription) -> None:
        super().__init__(message)
        self.subscription = subscription

    @property
    def live(self) -> bool:
        return not self.verdicts and not self.subscription.cancelled

    def reject(self, requeue: bool) -> bool:
        if not self.live:
            return False
        self.verdicts.append("requeue" if requeue else "reject")
        if requeue:
            self.subscription.deliver(self.message.evolve(redelivered=True))
        return True


Scripted = TypeVar("Scripted", bound=EagerSubscription)


def consumer_on(
    case: SynchronousTestCase, subscription_type: type[Scripted], handler: Handler,
    concurrency: int = 1,
) -> tuple[ConsumerService, Scripted, Clock]:
    """
    A started consumer of C{handler} on a memory bus, its own subscription
    cancelled and swapped for one of C{subscription_type}, which the test
    drives by hand.
    """
    clock = Clock()
    bus = MemoryBus("d", clock=clock)
    bus.startService()
    service = ConsumerService(component(concurrency=concurrency), handler, bus, clock)
    service.startService()
    clock.advance(0)
    assert service._subscription is not None
    case.successResultOf(service._subscription.cancel())
    subscription = subscription_type(service._on_delivery)
    service._subscription = subscription
    return service, subscription, clock


class HaltTests(SynchronousTestCase):
    """
    A L{Halt} verdict on a subscription whose broker redelivers at once.
    """

    def test_halt_requeues_once(self) -> None:
        """
        A Halt stops consuming before the message goes back, so the broker
        can not hand it to the halting consumer again, and observers hear
        "requeued" once.
        """
        service, subscription, _ = consumer_on(self, EagerSubscription, Handler(Halt("stop")))
        settled: list[Settled] = []
        service.add_observer(settled.append)
        subscription.deliver(Message.create("t.x", {"n": 1}))
        self.assertTrue(service.halted)
        self.assertTrue(subscription.cancelled)
        self.assertEqual([s.outcome for s in settled], ["requeued"])
        self.assertEqual(service.stats["requeued"], 1)


class StoppableSubscription(EagerSubscription):
    """
    An L{EagerSubscription} that can stop delivering (as an AMQP one does
    with C{basic.cancel}): a message rejected with requeue after that goes
    to the queue's other consumers (L{elsewhere}), never back here.

    @ivar events: C{"stop"}, C{"cancel"} and the verdicts, in order.
    """

    def __init__(self, on_delivery: Callable[[IDelivery], object]) -> None:
        super().__init__(on_delivery)
        self.stopped = False
        self.answer: Deferred[None] = Deferred()
        self.events: list[str] = []
        self.elsewhere: list[Message] = []

    def stop_consuming(self) -> Deferred[None]:
        self.events.append("stop")
        self.stopped = True
        self.consuming = False
        d: Deferred[None] = Deferred()
        self.answer.addBoth(lambda _: d.callback(None))
        return d

    def cancel(self) -> Deferred[None]:
        self.events.append("cancel")
        return super().cancel()

    def deliver(self, message: Message) -> RecordingDelivery:
        if self.stopped and message.redelivered:
            self.elsewhere.append(message)
            return RecordingDelivery(message)
        delivery = StoppableDelivery(message.evolve(queue=self.queue), self)
        self.on_delivery(delivery)
        return delivery


class StoppableDelivery(EagerDelivery):
    """
    A delivery of a L{StoppableSubscription}, its verdicts in its events.
    """

    subscription: StoppableSubscription

    def ack(self) -> bool:
        if not self.live:
            return False
        self.subscription.events.append(f"ack {self.message.body['n']}")
        return super().ack()

    def reject(self, requeue: bool) -> bool:
        if self.live:
            self.subscription.events.append(f"requeue {self.message.body['n']}")
        return super().reject(requeue)


class StopDeliveringTests(SynchronousTestCase):
    """
    A consumer that stops or halts on a subscription that can stop
    delivering asks it to first, then puts the waiting deliveries back at
    once; the calls in hand settle before the subscription ends.
    """

    def consumer(self, *outcomes: Any, concurrency: int = 1
                 ) -> tuple[ConsumerService, StoppableSubscription, Clock]:
        return consumer_on(self, StoppableSubscription, Handler(*outcomes), concurrency)

    def test_stop(self) -> None:
        """
        Stopping asks the subscription to stop delivering before it puts
        the waiting deliveries back, and those it gets before the
        subscription answers; the one in hand is acknowledged on the
        subscription still open, which ends only after that and the answer.
        """
        pending: Deferred[None] = Deferred()
        service, subscription, clock = self.consumer(pending)
        for n in range(3):
            subscription.deliver(Message.create("t.x", {"n": n}))
        self.assertEqual(service.waiting, 2)
        stopped = service.stopService()
        self.assertEqual(subscription.events, ["stop", "requeue 1", "requeue 2"])
        self.assertEqual([m.body["n"] for m in subscription.elsewhere], [1, 2])
        # Sent before the subscription had the request.
        subscription.deliver(Message.create("t.x", {"n": 3}))
        self.assertEqual(subscription.events[-1], "requeue 3")
        pending.callback(None)
        clock.advance(0)
        self.assertEqual(subscription.events[-1], "ack 0")
        self.assertNoResult(stopped)
        subscription.answer.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(subscription.events[-1], "cancel")
        self.assertEqual((service.stats["acked"], service.stats["requeued"]), (1, 3))

    def test_halt(self) -> None:
        """
        A Halt asks the subscription to stop delivering, then puts the
        halting message and the waiting ones back at once; the other call in
        hand settles before the subscription ends.
        """
        pending: Deferred[None] = Deferred()
        service, subscription, clock = self.consumer(
            pending, Halt("stop"), concurrency=2
        )
        for n in range(4):
            subscription.deliver(Message.create("t.x", {"n": n}))
        self.assertTrue(service.halted)
        self.assertEqual(subscription.events, ["stop", "requeue 1", "requeue 2", "requeue 3"])
        self.assertEqual([m.body["n"] for m in subscription.elsewhere], [1, 2, 3])
        subscription.answer.callback(None)
        self.assertNotIn("cancel", subscription.events)
        pending.callback(None)
        clock.advance(0)
        self.assertEqual(subscription.events[-2:], ["ack 0", "cancel"])
        self.successResultOf(service.stopService())
        self.assertEqual((service.stats["acked"], service.stats["requeued"]), (1, 3))

    def test_own_put_backs_not_counted_as_deliveries(self) -> None:
        """
        A waiting redelivered message put back while stopping is a verdict
        that reached the broker: it leaves the max_deliveries count.
        """
        pending: Deferred[None] = Deferred()
        service, subscription, _ = self.consumer(pending)
        subscription.deliver(Message.create("t.x", {"n": 0}))
        again = Message.create("t.x", {"n": 1}).evolve(redelivered=True)
        service._deliveries[again.id] = 3
        subscription.on_delivery(StoppableDelivery(again.evolve(queue="fedhub.c"), subscription))
        service.stopService()
        self.assertEqual(subscription.events, ["stop", "requeue 1"])
        self.assertNotIn(again.id, service._deliveries)
        pending.callback(None)

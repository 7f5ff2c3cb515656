"""
Tests for L{fedhub.bus.memory}: the bus contract run against L{MemoryBus}, and
what only the in-process bus shows (its clock, its limits, its log line).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, cast

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider
from zope.interface.verify import verifyObject

from fedhub.bus import MemoryBus, MemoryDelivery, MemorySubscription, record_death
from fedhub.errors import (
    AccessRefused,
    MessageReturned,
    NotConnected,
    NotFound,
    PreconditionFailed,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IBus, IDelivery
from fedhub.message import Message
from fedhub.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology
from tests.bus_contract import BusContractMixin


class MemoryBusContractTests(BusContractMixin, TestCase):
    """
    The bus contract, kept by the in-process bus on the real reactor.
    """

    def make_bus(self) -> Deferred[IBus]:
        from twisted.internet import reactor

        bus = MemoryBus("contract", clock=cast(IReactorTime, reactor))
        bus.startService()
        self.addCleanup(bus.stopService)
        return succeed(bus)


class Recorder:
    """
    An C{on_delivery} that keeps what it gets, and acknowledges on request.
    """

    def __init__(self, ack: bool = False) -> None:
        self.deliveries: list[MemoryDelivery] = []
        self.ack = ack

    def __call__(self, delivery: IDelivery) -> None:
        self.deliveries.append(cast(MemoryDelivery, delivery))
        if self.ack:
            delivery.ack()

    @property
    def ids(self) -> list[str]:
        """
        The ids of the messages received, in order.
        """
        return [d.message.id for d in self.deliveries]


def _message(n: int = 0, topic: str = "org.example.test.event") -> Message:
    return Message.create(topic, {"n": n})


class MemoryBusTestsMixin(SynchronousTestCase):
    """
    Helpers: a started bus on a fake clock, queues, log capture.
    """

    def bus(self, **kwargs: Any) -> tuple[MemoryBus, Clock]:
        clock = Clock()
        bus = MemoryBus("test", clock=clock, **kwargs)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus, clock

    def queue(
        self,
        bus: MemoryBus,
        name: str,
        *patterns: str,
        exchange: str = "amq.topic",
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        spec = QueueSpec(name, arguments=dict(arguments or {}))
        bindings = tuple(BindingSpec(name, exchange, p) for p in patterns)
        self.successResultOf(bus.declare(Topology(queues=(spec,), bindings=bindings)))
        return name

    def subscribe(
        self, bus: MemoryBus, queue: str, recorder: Recorder, prefetch: int = 0
    ) -> MemorySubscription:
        subscription = self.successResultOf(bus.subscribe(queue, recorder, prefetch))
        return cast(MemorySubscription, subscription)

    def logs(self) -> list[LogEvent]:
        events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    def declare_fails(self, bus: MemoryBus, topology: Topology, kind: type[Exception]) -> Any:
        return self.failureResultOf(bus.declare(topology), kind).value


class LifecycleTests(MemoryBusTestsMixin):
    """
    Starting, stopping, and what the bus says about itself.
    """

    def test_interfaces(self) -> None:
        """
        MemoryBus provides IBus and IService.
        """
        bus = MemoryBus("test", clock=Clock())
        self.assertTrue(verifyObject(IBus, bus))
        self.assertTrue(verifyObject(IService, bus))
        self.assertEqual((bus.domain, bus.exchange), ("test", "amq.topic"))

    def test_not_started(self) -> None:
        """
        Before startService the bus is not connected and publishing fails with NotConnected.
        """
        bus = MemoryBus("test", clock=Clock())
        self.queue(bus, "q", "#")
        message = _message()
        self.assertIs(bus.connected, False)
        error = self.failureResultOf(bus.publish(message), NotConnected).value
        self.assertEqual(error.message_id, message.id)
        self.assertIsInstance(error, TemporarilyUnavailable)

    def test_stopped(self) -> None:
        """
        connected is True between startService and stopService; after it, publishing fails.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        self.assertIs(bus.connected, True)
        self.successResultOf(bus.publish(_message()))
        self.successResultOf(bus.stopService())
        self.assertIs(bus.connected, False)
        self.failureResultOf(bus.publish(_message()), NotConnected)
        self.assertEqual(bus.queue_depth("q"), 1)

    def test_start_warns_messages_stay_local(self) -> None:
        """
        startService logs once, at warn level, that messages do not leave the process.
        """
        events = self.logs()
        bus, clock = self.bus()
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["domain"], "test")
        self.assertIn("do not leave this process", formatEvent(warnings[0]))

    def test_delivery_live(self) -> None:
        """
        A delivery is live until its verdict is given or its subscription
        is cancelled.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        subscription = self.subscribe(bus, "q", recorder, prefetch=5)
        for n in range(3):
            self.successResultOf(bus.publish(_message(n)))
        clock.advance(0)
        first, second, third = recorder.deliveries
        self.assertEqual([first.live, second.live, third.live], [True, True, True])
        second.reject(True)
        self.assertEqual([first.live, second.live, third.live], [True, False, True])
        self.successResultOf(subscription.cancel())
        self.assertEqual([first.live, third.live], [False, False])

    def test_stop_leaves_no_timers(self) -> None:
        """
        stopService returns a fired Deferred and leaves no delayed call on the clock.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 5000})
        self.subscribe(bus, "q", Recorder(), prefetch=1)
        for n in range(3):
            bus.publish(_message(n))
        self.assertNotEqual(clock.getDelayedCalls(), [])
        self.successResultOf(bus.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_restart_keeps_queues(self) -> None:
        """
        Queues and their messages survive a stop and start; expiry resumes.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 1000})
        self.successResultOf(bus.publish(_message()))
        bus.stopService()
        clock.advance(5)
        self.assertEqual(bus.queue_depth("q"), 1)
        bus.startService()
        clock.advance(0)
        self.assertEqual(bus.queue_depth("q"), 0)

    def test_subscribe_before_start(self) -> None:
        """
        A subscription made before startService receives once the bus runs.
        """
        clock = Clock()
        bus = MemoryBus("test", clock=clock)
        self.addCleanup(bus.stopService)
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        bus.startService()
        self.successResultOf(bus.publish(_message()))
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 1)

    def test_stop_fails_waiting_publishes_and_requeues(self) -> None:
        """
        stopService fails publishes waiting for room with NotConnected and puts
        unacknowledged deliveries back, marked redelivered: the subscription
        gets them again after the start.
        """
        bus, clock = self.bus(max_queue_length=1)
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        self.successResultOf(bus.publish(_message(0)))
        clock.advance(0)
        waiting = bus.publish(_message(1))
        self.assertNoResult(waiting)
        bus.stopService()
        self.failureResultOf(waiting, NotConnected)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q"), bus.pending()), (1, 0, 0))
        recorder.deliveries[0].ack()
        self.assertEqual(bus.queue_depth("q"), 1)
        bus.startService()
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 2)
        self.assertIs(recorder.deliveries[1].redelivered, True)
        self.assertEqual(recorder.deliveries[1].message.id, recorder.deliveries[0].message.id)


class TopologyTests(MemoryBusTestsMixin):
    """
    Declarations and their errors, as RabbitMQ answers them.
    """

    def test_inspection_of_unknown_queue(self) -> None:
        """
        queue_depth and unacked of an unknown queue raise NotFound.
        """
        bus, clock = self.bus()
        self.assertRaises(NotFound, bus.queue_depth, "nope")
        self.assertRaises(NotFound, bus.unacked, "nope")

    def test_exchange_redeclared_otherwise(self) -> None:
        """
        Declaring an existing exchange with another type or durability fails with 406.
        """
        bus, clock = self.bus()
        self.successResultOf(bus.declare(Topology(exchanges=(ExchangeSpec("x", "topic"),))))
        self.successResultOf(bus.declare(Topology(exchanges=(ExchangeSpec("x", "topic"),))))
        self.successResultOf(bus.declare(Topology(exchanges=(ExchangeSpec("amq.topic"),))))
        for spec in (ExchangeSpec("x", "direct"), ExchangeSpec("x", "topic", durable=False)):
            error = self.declare_fails(bus, Topology(exchanges=(spec,)), PreconditionFailed)
            self.assertEqual(error.reply_code, 406)

    def test_reserved_and_unknown_exchanges(self) -> None:
        """
        New amq.* exchanges and the default exchange are refused (403); unknown types too.
        """
        bus, clock = self.bus()
        for spec in (ExchangeSpec("amq.mine"), ExchangeSpec("", "direct")):
            error = self.declare_fails(bus, Topology(exchanges=(spec,)), AccessRefused)
            self.assertEqual(error.reply_code, 403)
        self.declare_fails(
            bus, Topology(exchanges=(ExchangeSpec("h", "headers"),)), PreconditionFailed
        )

    def test_queue_names(self) -> None:
        """
        An empty queue name and a new amq.* queue are refused.
        """
        bus, clock = self.bus()
        self.declare_fails(bus, Topology(queues=(QueueSpec(""),)), PreconditionFailed)
        error = self.declare_fails(bus, Topology(queues=(QueueSpec("amq.q"),)), AccessRefused)
        self.assertEqual(error.reply_code, 403)

    def test_binding_to_default_exchange(self) -> None:
        """
        Binding to the default exchange is refused with 403, as RabbitMQ does.
        """
        bus, clock = self.bus()
        self.queue(bus, "q")
        self.declare_fails(bus, Topology(bindings=(BindingSpec("q", "", "q"),)), AccessRefused)

    def test_invalid_arguments(self) -> None:
        """
        Arguments RabbitMQ refuses are refused with 406, and no queue is made.
        """
        bus, clock = self.bus()
        for arguments in (
            {"x-message-ttl": -1},
            {"x-message-ttl": "100"},
            {"x-message-ttl": True},
            {"x-max-length": -1},
            {"x-expires": 0},
            {"x-dead-letter-exchange": 5},
            {"x-dead-letter-routing-key": "k"},
        ):
            topology = Topology(queues=(QueueSpec("bad", arguments=arguments),))
            error = self.declare_fails(bus, topology, PreconditionFailed)
            self.assertEqual(error.reply_code, 406)
            self.assertRaises(NotFound, bus.queue_depth, "bad")

    def test_accepted_arguments(self) -> None:
        """
        x-expires, x-queue-type and unknown arguments are accepted.
        """
        bus, clock = self.bus()
        arguments = {"x-expires": 60000, "x-queue-type": "quorum", "x-fancy": [1], "plain": 2}
        self.queue(bus, "q", "#", arguments=arguments)
        self.successResultOf(bus.publish(_message()))
        self.assertEqual(bus.queue_depth("q"), 1)

    def test_redeclare_compares_rabbitmq_arguments(self) -> None:
        """
        Re-declaring compares the flags and RabbitMQ's own arguments, not unknown ones.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", arguments={"x-max-length": 5, "x-fancy": 1})
        self.queue(bus, "q", arguments={"x-max-length": 5, "x-fancy": 2})
        for spec in (
            QueueSpec("q", arguments={"x-max-length": 6}),
            QueueSpec("q", arguments={}),
            QueueSpec("q", exclusive=True, arguments={"x-max-length": 5}),
            QueueSpec("q", auto_delete=True, arguments={"x-max-length": 5}),
        ):
            error = self.declare_fails(bus, Topology(queues=(spec,)), PreconditionFailed)
            self.assertIn("inequivalent", error.reply_text)

    def test_redeclare_classic_queue_type(self) -> None:
        """
        A queue declared with x-queue-type "classic" and again without a
        type, or the other way round, is the same queue, as on RabbitMQ; a
        quorum or stream queue and one without a type are not.
        """
        bus, clock = self.bus()
        classic = {"x-queue-type": "classic"}
        self.queue(bus, "with", arguments=classic)
        self.queue(bus, "with", arguments={})
        self.queue(bus, "without", arguments={})
        self.queue(bus, "without", arguments=classic)
        for queue_type in ("quorum", "stream"):
            typed = {"x-queue-type": queue_type}
            self.queue(bus, queue_type, arguments=typed)
            for name, arguments in ((queue_type, {}), (queue_type, classic), ("without", typed)):
                error = self.declare_fails(
                    bus, Topology(queues=(QueueSpec(name, arguments=arguments),)), PreconditionFailed
                )
                self.assertIn("inequivalent arg 'x-queue-type'", error.reply_text)

    def test_declared_exchange_types(self) -> None:
        """
        Declared direct and fanout exchanges route like RabbitMQ's.
        """
        bus, clock = self.bus()
        exchanges = (ExchangeSpec("d", "direct"), ExchangeSpec("f", "fanout"))
        self.successResultOf(bus.declare(Topology(exchanges=exchanges)))
        self.queue(bus, "dq", "a.b", exchange="d")
        self.queue(bus, "fq", "whatever", exchange="f")
        self.successResultOf(bus.publish(_message(topic="a.b"), exchange="d"))
        self.failureResultOf(bus.publish(_message(topic="a.c"), exchange="d"), MessageReturned)
        self.successResultOf(bus.publish(_message(topic="z.z"), exchange="f"))
        self.assertEqual((bus.queue_depth("dq"), bus.queue_depth("fq")), (1, 1))

    def test_subscribe_errors(self) -> None:
        """
        Subscribing to an unknown queue fails with NotFound; a negative prefetch with ValueError.
        """
        bus, clock = self.bus()
        self.failureResultOf(bus.subscribe("nope", Recorder(), 1), NotFound)
        self.queue(bus, "q")
        self.failureResultOf(bus.subscribe("q", Recorder(), -1), ValueError)


class DeliveryTests(MemoryBusTestsMixin):
    """
    How deliveries are made, settled and contained.
    """

    def test_delivery_is_scheduled(self) -> None:
        """
        Deliveries are made from the clock, never from inside publish or ack.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=1)
        self.successResultOf(bus.publish(_message(0)))
        self.successResultOf(bus.publish(_message(1)))
        self.assertEqual(recorder.deliveries, [])
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 1)
        self.assertTrue(verifyObject(IDelivery, recorder.deliveries[0]))
        recorder.deliveries[0].ack()
        self.assertEqual(len(recorder.deliveries), 1)
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 2)

    def test_counts(self) -> None:
        """
        queue_depth counts ready messages and unacked the delivered, unsettled ones.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=2)
        for n in range(5):
            self.successResultOf(bus.publish(_message(n)))
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (5, 0))
        clock.advance(0)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (3, 2))
        recorder.deliveries[0].ack()
        recorder.deliveries[1].reject(requeue=False)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (3, 0))

    def test_round_robin(self) -> None:
        """
        Competing subscriptions with room are served in turn.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorders = [Recorder(ack=True) for _ in range(3)]
        for recorder in recorders:
            self.subscribe(bus, "q", recorder)
        messages = [_message(n) for n in range(7)]
        for message in messages:
            self.successResultOf(bus.publish(message))
        clock.advance(0)
        self.assertEqual(
            [r.ids for r in recorders],
            [[messages[n].id for n in range(k, 7, 3)] for k in range(3)],
        )

    def test_requeue_goes_to_head(self) -> None:
        """
        A requeued message comes back before the messages that waited behind it.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=1)
        first, second = _message(0), _message(1)
        bus.publish(first)
        bus.publish(second)
        clock.advance(0)
        recorder.deliveries[0].reject(requeue=True)
        clock.advance(0)
        self.assertEqual(recorder.ids, [first.id, first.id])
        self.assertEqual([d.redelivered for d in recorder.deliveries], [False, True])
        self.assertEqual([d.message.redelivered for d in recorder.deliveries], [False, True])
        self.assertEqual(recorder.deliveries[1].message.queue, "q")

    def test_requeue_restores_original_places(self) -> None:
        """
        Messages requeued in any order go back to the places they had, as
        RabbitMQ puts them, and come before the messages behind them.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=3)
        messages = [_message(n) for n in range(5)]
        for message in messages:
            bus.publish(message)
        clock.advance(0)
        held = list(recorder.deliveries)
        for index in (2, 0, 1):
            held[index].reject(requeue=True)
        self.assertEqual(bus.queue_depth("q"), 5)
        clock.advance(0)
        self.assertEqual(recorder.ids[3:], [m.id for m in messages[:3]])

    def test_verdicts_after_the_first_are_ignored(self) -> None:
        """
        A second verdict on a delivery, or one after its subscription was cancelled, changes nothing
        and says so (False).
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorder = Recorder()
        subscription = self.subscribe(bus, "q", recorder)
        for n in range(2):
            bus.publish(_message(n))
        clock.advance(0)
        first, second = recorder.deliveries
        self.assertIs(first.ack(), True)
        self.assertIs(first.reject(requeue=True), False)
        self.assertIs(first.reject(requeue=False), False)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (0, 1))
        self.successResultOf(subscription.cancel())
        self.successResultOf(subscription.cancel())
        self.assertIs(second.ack(), False)
        self.assertIs(second.reject(requeue=False), False)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (1, 0))
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 2)

    def test_cancel_keeps_turns_fair(self) -> None:
        """
        Cancelling one of several subscriptions leaves the others served in turn.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")
        recorders = [Recorder(ack=True) for _ in range(3)]
        subscriptions = [self.subscribe(bus, "q", r) for r in recorders]
        bus.publish(_message(0))
        clock.advance(0)
        subscriptions[0].cancel()
        for n in range(4):
            bus.publish(_message(n))
        clock.advance(0)
        self.assertEqual([len(r.deliveries) for r in recorders], [1, 2, 2])

    def test_subscriber_raising_is_contained(self) -> None:
        """
        A subscriber that raises is logged, its message dead-lettered, and the bus goes on.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-dead-letter-exchange": "amq.direct"})
        self.queue(bus, "dead", "org.example.test.event", exchange="amq.direct")
        calls: list[IDelivery] = []

        def explode(delivery: IDelivery) -> None:
            calls.append(delivery)
            if len(calls) == 1:
                raise ZeroDivisionError("plugin bug")
            delivery.ack()

        self.successResultOf(bus.subscribe("q", explode, 1))
        bus.publish(_message(0))
        bus.publish(_message(1))
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(calls), 2)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (0, 0))
        self.assertEqual(bus.queue_depth("dead"), 1)

    def test_subscriber_failed_deferred_is_logged(self) -> None:
        """
        A Deferred a subscriber returns that fails is logged, not left unhandled.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#")

        def failing(delivery: IDelivery) -> Deferred[None]:
            delivery.ack()
            return fail(ZeroDivisionError("later"))

        self.successResultOf(bus.subscribe("q", failing, 1))
        bus.publish(_message())
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class DeadLetterTests(MemoryBusTestsMixin):
    """
    TTL, length limits and x-death as RabbitMQ shapes them.
    """

    def test_ttl_expires_on_time(self) -> None:
        """
        A message expires exactly x-message-ttl ms after it was queued and is dead-lettered.
        """
        bus, clock = self.bus()
        clock.advance(1_700_000_000)
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 1000, "x-dead-letter-exchange": "amq.direct"})
        self.queue(bus, "dead", "org.example.test.event", exchange="amq.direct")
        message = _message()
        bus.publish(message)
        clock.advance(0.75)
        self.assertEqual((bus.queue_depth("q"), bus.queue_depth("dead")), (1, 0))
        clock.advance(0.25)
        self.assertEqual((bus.queue_depth("q"), bus.queue_depth("dead")), (0, 1))
        recorder = Recorder()
        self.subscribe(bus, "dead", recorder)
        clock.advance(0)
        (death,) = recorder.deliveries[0].message.headers["x-death"]
        self.assertEqual(
            dict(death),
            {
                "count": 1,
                "reason": "expired",
                "queue": "q",
                "time": datetime.fromtimestamp(1_700_000_001, timezone.utc),
                "exchange": "amq.topic",
                "routing-keys": ["org.example.test.event"],
            },
        )

    def test_ttl_without_dead_letter_exchange_drops(self) -> None:
        """
        An expired message of a queue without a dead-letter exchange is dropped.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 1000})
        bus.publish(_message(0))
        clock.advance(0.5)
        bus.publish(_message(1))
        clock.advance(0.5)
        self.assertEqual(bus.queue_depth("q"), 1)
        clock.advance(0.5)
        self.assertEqual(bus.queue_depth("q"), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unacked_messages_do_not_expire(self) -> None:
        """
        A delivered message does not expire; requeued past its time, it expires at once.
        """
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 100})
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        bus.publish(_message())
        clock.advance(0)
        clock.advance(1)
        self.assertEqual(bus.unacked("q"), 1)
        recorder.deliveries[0].reject(requeue=True)
        clock.advance(0)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (0, 0))
        self.assertEqual(len(recorder.deliveries), 1)

    def test_max_length_drops_head(self) -> None:
        """
        Past x-max-length the oldest message is dead-lettered with reason "maxlen".
        """
        bus, clock = self.bus()
        arguments = {"x-max-length": 2, "x-dead-letter-exchange": "amq.direct"}
        self.queue(bus, "q", "#", arguments=arguments)
        self.queue(bus, "dead", "org.example.test.event", exchange="amq.direct")
        messages = [_message(n) for n in range(3)]
        for message in messages:
            self.successResultOf(bus.publish(message))
        recorder, dead = Recorder(), Recorder()
        self.subscribe(bus, "q", recorder)
        self.subscribe(bus, "dead", dead)
        clock.advance(0)
        self.assertEqual(recorder.ids, [messages[1].id, messages[2].id])
        self.assertEqual(dead.ids, [messages[0].id])
        self.assertEqual(dead.deliveries[0].message.headers["x-death"][0]["reason"], "maxlen")
        self.assertEqual(dead.deliveries[0].message.headers["x-first-death-reason"], "maxlen")

    def test_max_length_never_pushes_back(self) -> None:
        """
        A queue with x-max-length at the bus's limit drops its head instead of making publishers wait.
        """
        bus, clock = self.bus(max_queue_length=3)
        self.queue(bus, "q", "#", arguments={"x-max-length": 3})
        for n in range(10):
            self.successResultOf(bus.publish(_message(n)))
        self.assertEqual(bus.queue_depth("q"), 3)

    def test_dead_letter_routing_key(self) -> None:
        """
        x-dead-letter-routing-key replaces the key; x-death keeps the original one.
        """
        bus, clock = self.bus()
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "parking"}
        self.queue(bus, "q", "#", arguments=arguments)
        self.queue(bus, "parking")
        recorder, parked = Recorder(), Recorder()
        self.subscribe(bus, "q", recorder)
        self.subscribe(bus, "parking", parked)
        bus.publish(_message())
        clock.advance(0)
        recorder.deliveries[0].reject(requeue=False)
        clock.advance(0)
        received = parked.deliveries[0].message
        self.assertEqual(received.topic, "parking")
        self.assertEqual(received.headers["x-death"][0]["routing-keys"], ["org.example.test.event"])
        self.assertEqual(received.headers["x-death"][0]["exchange"], "amq.topic")

    def test_retry_loop_counts_deaths(self) -> None:
        """
        A reject/expire loop through a delay queue keeps one x-death entry per
        (queue, reason), most recent first, counting repeats; first-death headers stay.
        """
        bus, clock = self.bus()
        self.queue(
            bus, "work", "#",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "delay"},
        )
        self.queue(
            bus, "delay",
            arguments={
                "x-message-ttl": 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "work",
            },
        )
        recorder = Recorder()
        self.subscribe(bus, "work", recorder)
        bus.publish(_message())
        for _ in range(2):
            clock.advance(0)
            recorder.deliveries[-1].reject(requeue=False)
            self.assertEqual(bus.queue_depth("delay"), 1)
            clock.advance(1)
        clock.advance(0)
        headers = recorder.deliveries[-1].message.headers
        self.assertEqual(
            [(d["queue"], d["reason"], d["count"]) for d in headers["x-death"]],
            [("delay", "expired", 2), ("work", "rejected", 2)],
        )
        self.assertEqual(headers["x-death"][1]["exchange"], "amq.topic")
        self.assertEqual(headers["x-death"][0]["exchange"], "")
        self.assertEqual(headers["x-death"][0]["routing-keys"], ["delay"])
        self.assertEqual(
            (headers["x-first-death-queue"], headers["x-first-death-reason"],
             headers["x-first-death-exchange"]),
            ("work", "rejected", "amq.topic"),
        )

    def test_expiry_cycle_is_dropped(self) -> None:
        """
        A message that would expire round a cycle with no rejection is dropped, with a warning.
        """
        events = self.logs()
        bus, clock = self.bus()
        self.queue(
            bus, "loop", "#",
            arguments={
                "x-message-ttl": 10,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "loop",
            },
        )
        bus.publish(_message())
        clock.advance(0.01)
        self.assertEqual(bus.queue_depth("loop"), 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(any("cycle" in formatEvent(e) for e in events))

    def test_rejection_cycle_is_allowed(self) -> None:
        """
        A message rejected back into its own queue comes back, its count growing.
        """
        bus, clock = self.bus()
        self.queue(
            bus, "q", "#",
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"},
        )
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        bus.publish(_message())
        for _ in range(3):
            clock.advance(0)
            recorder.deliveries[-1].reject(requeue=False)
        clock.advance(0)
        self.assertEqual(len(recorder.deliveries), 4)
        (death,) = recorder.deliveries[-1].message.headers["x-death"]
        self.assertEqual(death["count"], 3)
        self.assertIs(recorder.deliveries[-1].redelivered, False)

    def test_missing_dead_letter_exchange(self) -> None:
        """
        A dead letter whose exchange does not exist is dropped with a warning.
        """
        events = self.logs()
        bus, clock = self.bus()
        self.queue(bus, "q", "#", arguments={"x-dead-letter-exchange": "gone"})
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        bus.publish(_message())
        clock.advance(0)
        recorder.deliveries[0].reject(requeue=False)
        self.assertEqual((bus.queue_depth("q"), bus.unacked("q")), (0, 0))
        self.assertTrue(any("does not exist" in formatEvent(e) for e in events))

    def test_dead_letter_into_full_queue(self) -> None:
        """
        A dead letter that finds its target queue full is dropped with a warning, never waits.
        """
        events = self.logs()
        bus, clock = self.bus(max_queue_length=1)
        self.queue(bus, "q", "a", arguments={"x-dead-letter-exchange": "amq.direct"})
        self.queue(bus, "dead", "a", exchange="amq.direct")
        self.queue(bus, "filler", "b")
        self.successResultOf(bus.declare(Topology(bindings=(BindingSpec("dead", "amq.topic", "b"),))))
        self.successResultOf(bus.publish(_message(topic="b")))
        self.successResultOf(bus.publish(_message(topic="a")))
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        clock.advance(0)
        recorder.deliveries[0].reject(requeue=False)
        self.assertEqual((bus.queue_depth("q"), bus.queue_depth("dead")), (0, 1))
        self.assertEqual(bus.pending(), 0)
        self.assertTrue(any("is full" in formatEvent(e) for e in events))

    def test_record_death_keeps_existing_fields(self) -> None:
        """
        record_death moves a repeated (queue, reason) to the front, counting, and
        keeps its first time; other headers stay.
        """
        t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        t1 = datetime(2026, 1, 2, tzinfo=timezone.utc)
        message = Message.create("a.b", {}, headers={"x-mine": 1})
        once = record_death(message, "q", "rejected", "amq.topic", "a.b", t0)
        other = record_death(once, "r", "expired", "", "r", t1)
        again = record_death(other, "q", "rejected", "", "q", t1)
        deaths = again.headers["x-death"]
        self.assertEqual([(d["queue"], d["count"]) for d in deaths], [("q", 2), ("r", 1)])
        self.assertEqual(deaths[0]["time"], t0)
        self.assertEqual(deaths[0]["exchange"], "amq.topic")
        self.assertEqual(again.headers["x-mine"], 1)
        self.assertEqual(again.headers["x-first-death-queue"], "q")
        self.assertIsNone(again.queue)


class BackpressureTests(MemoryBusTestsMixin):
    """
    Bounded queues: publishes wait for room, and too many waiting fail.
    """

    def test_full_queue_delays_confirm(self) -> None:
        """
        A publish into a full queue waits until an ack makes room, keeping publish order.
        """
        bus, clock = self.bus(max_queue_length=2)
        self.queue(bus, "q", "#")
        messages = [_message(n) for n in range(4)]
        results = [bus.publish(m) for m in messages]
        self.successResultOf(results[0])
        self.successResultOf(results[1])
        self.assertNoResult(results[2])
        self.assertNoResult(results[3])
        self.assertEqual(bus.pending(), 2)
        recorder = Recorder()
        self.subscribe(bus, "q", recorder, prefetch=1)
        clock.advance(0)
        self.assertNoResult(results[2])
        recorder.deliveries[0].ack()
        self.assertNoResult(results[2])
        clock.advance(0)
        self.successResultOf(results[2])
        self.assertNoResult(results[3])
        recorder.ack = True
        recorder.deliveries[1].ack()
        clock.advance(0)
        self.successResultOf(results[3])
        self.assertEqual(recorder.ids, [m.id for m in messages])
        self.assertEqual(bus.pending(), 0)

    def test_room_from_expiry_and_rejection(self) -> None:
        """
        Expiry and dead-lettering make room for waiting publishes too.
        """
        bus, clock = self.bus(max_queue_length=1)
        self.queue(bus, "q", "#", arguments={"x-message-ttl": 100})
        self.successResultOf(bus.publish(_message(0)))
        waiting = bus.publish(_message(1))
        self.assertNoResult(waiting)
        clock.advance(0.1)
        self.successResultOf(waiting)
        recorder = Recorder()
        self.subscribe(bus, "q", recorder)
        clock.advance(0)
        waiting = bus.publish(_message(2))
        self.assertNoResult(waiting)
        recorder.deliveries[0].reject(requeue=False)
        clock.advance(0)
        self.successResultOf(waiting)

    def test_full_queue_does_not_block_others(self) -> None:
        """
        A full queue holds back only the publishes routed to it.
        """
        bus, clock = self.bus(max_queue_length=1)
        self.queue(bus, "a", "a")
        self.queue(bus, "b", "b")
        bus.publish(_message(topic="a"))
        waiting = bus.publish(_message(topic="a"))
        self.successResultOf(bus.publish(_message(topic="b")))
        self.assertNoResult(waiting)
        bus.stopService()
        self.failureResultOf(waiting, NotConnected)

    def test_partial_room(self) -> None:
        """
        A message for a full and a free queue enters the free one now and confirms
        once the full one took it.
        """
        bus, clock = self.bus(max_queue_length=1)
        self.queue(bus, "full", "a.*")
        self.queue(bus, "free", "a.b")
        self.successResultOf(bus.publish(_message(topic="a.x")))
        waiting = bus.publish(_message(topic="a.b"))
        self.assertEqual((bus.queue_depth("free"), bus.pending()), (1, 1))
        recorder = Recorder(ack=True)
        self.subscribe(bus, "full", recorder)
        clock.advance(0)
        self.successResultOf(waiting)
        self.assertEqual(len(recorder.deliveries), 2)

    def test_too_many_waiting(self) -> None:
        """
        Past max_pending waiting publishes, the next one fails at once with
        TemporarilyUnavailable and leaves no copy anywhere.
        """
        bus, clock = self.bus(max_queue_length=1, max_pending=2)
        self.queue(bus, "full", "#")
        self.queue(bus, "latest", "#", arguments={"x-max-length": 1})
        self.successResultOf(bus.publish(_message(0)))
        waiting = [bus.publish(_message(n)) for n in (1, 2)]
        refused = _message(3)
        error = self.failureResultOf(bus.publish(refused), TemporarilyUnavailable).value
        self.assertEqual(error.message_id, refused.id)
        self.assertNotIsInstance(error, NotConnected)
        self.assertEqual((bus.queue_depth("full"), bus.pending()), (1, 2))
        latest = Recorder()
        self.subscribe(bus, "latest", latest)
        clock.advance(0)
        self.assertEqual([d.message.body["n"] for d in latest.deliveries], [2])
        for deferred in waiting:
            self.assertNoResult(deferred)
        bus.stopService()
        for deferred in waiting:
            self.failureResultOf(deferred, NotConnected)

    def test_memory_is_bounded(self) -> None:
        """
        100k publishes into a 100-message queue nobody consumes hold at most
        100 + max_pending messages; the rest are refused.
        """
        bus, clock = self.bus(max_queue_length=100, max_pending=1000)
        self.queue(bus, "q", "#")
        outcomes = {"confirmed": 0, "refused": 0}

        def confirmed(_: object) -> None:
            outcomes["confirmed"] += 1

        def refused(failure: Any) -> None:
            failure.trap(TemporarilyUnavailable)
            outcomes["refused"] += 1

        message = _message()
        for _ in range(100_000):
            bus.publish(message).addCallbacks(confirmed, refused)
        clock.advance(0)
        held = bus.queue_depth("q") + bus.unacked("q") + bus.pending()
        self.assertEqual(held, 1100)
        self.assertEqual(outcomes, {"confirmed": 100, "refused": 98_900})
        bus.stopService()

"""
The behaviour every L{IBus} provider shows, as a mixin of trial tests.

L{BusContractMixin} runs against the in-process bus
(C{tests/test_memory_bus.py}) and against a real RabbitMQ through the AMQP
transport, so the tests use nothing but L{IBus}, L{IDelivery} and
L{ISubscription}, wait on Deferreds with the real reactor (never a fake
clock), and name every queue after a fresh uuid.  Queues carry C{x-expires}
so a broker drops them a minute after a run; the one exchange the suite
declares has a fixed name, so runs do not pile exchanges up on a broker.

A test proves that something did I{not} arrive without sleeping: after the
messages under test it sends a sentinel straight to the queue through the
default exchange, and checks that the sentinel is the next delivery.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from fedhub.errors import MessageReturned, NotFound, PreconditionFailed
from fedhub.interfaces import IBus, IDelivery, ISubscription
from fedhub.message import WARNING, Message
from fedhub.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase

    _Base = TestCase
else:
    _Base = object

_E = TypeVar("_E", bound=BaseException)

#: Every queue the suite declares carries these arguments.
QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-expires": 60000}
#: The topic exchange the routing tests use; not durable, shared by every run.
CONTRACT_EXCHANGE = "fedhub.test.contract"
#: How long a test waits for deliveries before failing.
TIMEOUT = 5.0
#: How long a test lets a bus run to show that nothing more is delivered,
#: where no sentinel can show it (a full prefetch window).
SETTLE = 0.2


def _reactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


class DeliveryRecorder:
    """
    An C{on_delivery} callable that records deliveries and lets a test wait
    until some number of them arrived.

    Waiters are fired from the reactor, never from inside C{on_delivery}, so
    a test resumes only after the bus finished its current dispatch.

    @ivar deliveries: What arrived and was accepted, in order.
    """

    def __init__(
        self,
        *,
        ack: bool = False,
        accept: Callable[[Message], bool] | None = None,
    ) -> None:
        """
        @param ack: Acknowledge every delivery on arrival.
        @param accept: When given, deliveries whose message it refuses are
            acknowledged and not recorded (foreign messages on a shared
            broker).
        """
        self.deliveries: list[IDelivery] = []
        self._ack = ack
        self._accept = accept
        self._waiters: list[tuple[int, Deferred[list[IDelivery]]]] = []

    def __call__(self, delivery: IDelivery) -> None:
        if self._accept is not None and not self._accept(delivery.message):
            delivery.ack()
            return
        self.deliveries.append(delivery)
        if self._ack:
            delivery.ack()
        for waiter in list(self._waiters):
            count, deferred = waiter
            if len(self.deliveries) >= count:
                self._waiters.remove(waiter)
                _reactor().callLater(0, self._fire, deferred)

    def _fire(self, deferred: Deferred[list[IDelivery]]) -> None:
        if not deferred.called:
            deferred.callback(list(self.deliveries))

    @property
    def ids(self) -> list[str]:
        """
        The message ids received, in order.
        """
        return [d.message.id for d in self.deliveries]

    @property
    def topics(self) -> list[str]:
        """
        The topics received, in order.
        """
        return [d.message.topic for d in self.deliveries]

    def wait(self, count: int, timeout: float = TIMEOUT) -> Deferred[list[IDelivery]]:
        """
        A Deferred firing with the deliveries once at least C{count} arrived;
        it fails with an C{AssertionError} after C{timeout} seconds.
        """
        deferred: Deferred[list[IDelivery]] = Deferred()
        if len(self.deliveries) >= count:
            _reactor().callLater(0, self._fire, deferred)
        else:
            self._waiters.append((count, deferred))
        deferred.addTimeout(timeout, _reactor())

        def explain(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                raise AssertionError(
                    f"{len(self.deliveries)} of {count} deliveries arrived within {timeout} s"
                )
            return failure

        deferred.addErrback(explain)
        return deferred


def _unique(what: str) -> str:
    return f"fedhub.test.{what}.{uuid.uuid4().hex}"


class BusContractMixin(_Base):
    """
    Tests of the L{IBus} contract, for a C{twisted.trial.unittest.TestCase}.

    A subclass implements L{make_bus} and registers the bus's cleanup.
    """

    def make_bus(self) -> Deferred[IBus]:
        """
        Build and start a bus for these tests; register its C{stopService}
        with C{addCleanup}.

        @return: A Deferred firing with the started L{IBus} provider.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_bus")

    # --- helpers ----------------------------------------------------------

    async def _queue(
        self,
        bus: IBus,
        *patterns: str,
        exchange: str = "amq.topic",
        arguments: Mapping[str, Any] | None = None,
        what: str = "queue",
    ) -> str:
        """
        Declare a fresh queue bound to C{exchange} with C{patterns}.
        """
        name = _unique(what)
        spec = QueueSpec(name, arguments={**QUEUE_ARGUMENTS, **(arguments or {})})
        bindings = tuple(BindingSpec(name, exchange, p) for p in patterns)
        await bus.declare(Topology(queues=(spec,), bindings=bindings))
        return name

    async def _subscribe(
        self, bus: IBus, queue: str, recorder: DeliveryRecorder, prefetch: int = 10
    ) -> ISubscription:
        subscription = await bus.subscribe(queue, recorder, prefetch)
        self.addCleanup(subscription.cancel)
        return subscription

    async def _sentinel(self, bus: IBus, queue: str, run: str = "") -> str:
        """
        Send a message straight to C{queue}; return its id.
        """
        message = Message.create("fedhub.test.sentinel", {"sentinel": True, "run": run})
        await bus.publish(message, exchange="", routing_key=queue)
        return message.id

    async def _fails(self, deferred: Deferred[Any], kind: type[_E]) -> _E:
        try:
            result = await deferred
        except kind as e:
            return e
        self.fail(f"expected {kind.__name__}, got the result {result!r}")

    async def _usable(self, bus: IBus) -> None:
        """
        Show that C{bus} still routes and delivers.
        """
        queue = await self._queue(bus, what="usable")
        recorder = DeliveryRecorder(ack=True)
        await self._subscribe(bus, queue, recorder)
        sentinel = await self._sentinel(bus, queue)
        await recorder.wait(1)
        self.assertEqual(recorder.ids, [sentinel])

    def _assert_sequence_then(
        self, recorder: DeliveryRecorder, expected: Iterable[str], sentinel: str
    ) -> None:
        expected = list(expected)
        self.assertEqual(recorder.topics[:-1], expected)
        self.assertEqual(recorder.ids[-1], sentinel)

    # --- the contract -----------------------------------------------------

    async def test_provides_ibus(self) -> None:
        """
        The bus provides IBus and says it is connected once started.
        """
        bus = await self.make_bus()
        self.assertTrue(verifyObject(IBus, bus))
        self.assertIs(bus.connected, True)
        self.assertIsInstance(bus.domain, str)
        self.assertIsInstance(bus.exchange, str)

    async def test_topic_routing(self) -> None:
        """
        A topic exchange routes by AMQP patterns: `*` one word, `#` zero or more.
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        await bus.declare(Topology(exchanges=(ExchangeSpec(CONTRACT_EXCHANGE, "topic", False),)))
        patterns = {
            "star": f"{run}.a.*",
            "hash": f"{run}.a.#",
            "exact": f"{run}.a.b",
            "middle": f"{run}.a.#.z",
            "everything": "#",
            "nothing": f"{run}.nothing.*",
        }
        topics = [f"{run}.{t}" for t in ("a", "a.b", "a.b.c", "a.z", "a.b.c.z", "x.y")]
        expected = {
            "star": [f"{run}.a.b", f"{run}.a.z"],
            "hash": [f"{run}.{t}" for t in ("a", "a.b", "a.b.c", "a.z", "a.b.c.z")],
            "exact": [f"{run}.a.b"],
            "middle": [f"{run}.a.z", f"{run}.a.b.c.z"],
            "everything": topics,
            "nothing": [],
        }
        queues: dict[str, str] = {}
        recorders: dict[str, DeliveryRecorder] = {}
        for name, pattern in patterns.items():
            queues[name] = await self._queue(bus, pattern, exchange=CONTRACT_EXCHANGE, what=name)
            recorders[name] = DeliveryRecorder(
                ack=True, accept=lambda m: m.body.get("run") == run
            )
            await self._subscribe(bus, queues[name], recorders[name])
        for topic in topics:
            await bus.publish(Message.create(topic, {"run": run}), exchange=CONTRACT_EXCHANGE)
        for name in patterns:
            sentinel = await self._sentinel(bus, queues[name], run)
            await recorders[name].wait(len(expected[name]) + 1)
            self._assert_sequence_then(recorders[name], expected[name], sentinel)

    async def test_one_copy_per_queue(self) -> None:
        """
        A message goes to every matching queue, once per queue however many of
        its bindings match.
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        overlapping = await self._queue(bus, f"{run}.a.*", f"{run}.#", f"{run}.a.b")
        single = await self._queue(bus, f"{run}.a.b")
        first, second = DeliveryRecorder(ack=True), DeliveryRecorder(ack=True)
        await self._subscribe(bus, overlapping, first)
        await self._subscribe(bus, single, second)
        both = Message.create(f"{run}.a.b", {})
        await bus.publish(both)
        await bus.publish(Message.create(f"{run}.a.c", {}))
        sentinels = [await self._sentinel(bus, overlapping), await self._sentinel(bus, single)]
        await first.wait(3)
        await second.wait(2)
        self._assert_sequence_then(first, [f"{run}.a.b", f"{run}.a.c"], sentinels[0])
        self._assert_sequence_then(second, [f"{run}.a.b"], sentinels[1])
        self.assertEqual(first.ids[0], both.id)
        self.assertEqual(second.ids[0], both.id)

    async def test_direct_and_fanout_exchanges(self) -> None:
        """
        amq.direct routes on the exact key only; amq.fanout ignores the key.
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        direct = await self._queue(bus, f"{run}.key", exchange="amq.direct")
        fanout = await self._queue(bus, "ignored", exchange="amq.fanout")
        to_direct = DeliveryRecorder(ack=True)
        to_fanout = DeliveryRecorder(ack=True, accept=lambda m: m.body.get("run") == run)
        await self._subscribe(bus, direct, to_direct)
        await self._subscribe(bus, fanout, to_fanout)
        await bus.publish(Message.create(f"{run}.key", {"run": run}), exchange="amq.direct")
        returned = Message.create(f"{run}.key.more", {"run": run})
        await self._fails(bus.publish(returned, exchange="amq.direct"), MessageReturned)
        await bus.publish(Message.create(f"{run}.any.thing", {"run": run}), exchange="amq.fanout")
        sentinels = [await self._sentinel(bus, direct), await self._sentinel(bus, fanout, run)]
        await to_direct.wait(2)
        await to_fanout.wait(2)
        self._assert_sequence_then(to_direct, [f"{run}.key"], sentinels[0])
        self._assert_sequence_then(to_fanout, [f"{run}.any.thing"], sentinels[1])

    async def test_unroutable_is_returned(self) -> None:
        """
        A message no queue is bound for fails with MessageReturned naming it.
        """
        bus = await self.make_bus()
        message = Message.create(f"fedhubtest{uuid.uuid4().hex}.nobody.listens", {})
        error = await self._fails(bus.publish(message), MessageReturned)
        self.assertEqual(error.message_id, message.id)
        await self._usable(bus)

    async def test_unknown_exchange(self) -> None:
        """
        Publishing to an exchange that does not exist fails with NotFound (404).
        """
        bus = await self.make_bus()
        message = Message.create(f"fedhubtest{uuid.uuid4().hex}.lost", {})
        error = await self._fails(
            bus.publish(message, exchange=_unique("missing")), NotFound
        )
        self.assertEqual(error.reply_code, 404)
        await self._usable(bus)

    async def test_binding_to_unknown_names(self) -> None:
        """
        Binding to an unknown exchange or an unknown queue fails with NotFound.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        missing = Topology(bindings=(BindingSpec(queue, _unique("missing"), "#"),))
        error = await self._fails(bus.declare(missing), NotFound)
        self.assertEqual(error.reply_code, 404)
        missing = Topology(bindings=(BindingSpec(_unique("missing"), "amq.topic", "x.y"),))
        await self._fails(bus.declare(missing), NotFound)
        await self._usable(bus)

    async def test_round_trip(self) -> None:
        """
        Every field of a message survives the bus, and the delivery names its queue.
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        queue = await self._queue(bus, f"{run}.#")
        recorder = DeliveryRecorder()
        await self._subscribe(bus, queue, recorder)
        original = Message.create(
            f"{run}.round.trip",
            {"text": "h\u00e9llo", "n": 1, "nested": {"list": [1, "two", None, True, 2.5]}},
            headers={
                "fedora_messaging_user_jdoe": True,
                "fedora_messaging_rpm_kernel": True,
                "x-count": 42,
                "x-negative": -7,
                "x-off": False,
                "x-list": ["a", 2, False],
                "x-table": {"inner": {"deep": "yes"}, "flag": False},
            },
            severity=WARNING,
            priority=3,
            schema="fedhub.test.schema",
        )
        await bus.publish(original)
        (delivery,) = await recorder.wait(1)
        self.assertTrue(verifyObject(IDelivery, delivery))
        received = delivery.message
        self.assertEqual(received, original.evolve(queue=queue))
        self.assertEqual(received.topic, original.topic)
        self.assertEqual(received.body, original.body)
        self.assertEqual(received.headers, original.headers)
        self.assertEqual(received.id, original.id)
        self.assertEqual(received.severity, WARNING)
        self.assertEqual(received.priority, 3)
        self.assertEqual(received.sent_at, original.sent_at)
        self.assertEqual(received.schema, "fedhub.test.schema")
        self.assertEqual(received.queue, queue)
        self.assertEqual(delivery.queue, queue)
        self.assertIs(delivery.redelivered, False)
        self.assertIs(received.redelivered, False)
        delivery.ack()

    async def test_routing_key_is_the_delivered_topic(self) -> None:
        """
        A message published with another routing key arrives with that key as
        its topic: the AMQP wire carries no other topic.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        recorder = DeliveryRecorder(ack=True)
        await self._subscribe(bus, queue, recorder)
        message = Message.create("fedhub.test.original.topic", {"k": "v"})
        await bus.publish(message, exchange="", routing_key=queue)
        (delivery,) = await recorder.wait(1)
        self.assertEqual(delivery.message.topic, queue)
        self.assertEqual(delivery.message.id, message.id)
        self.assertEqual(delivery.message.body, {"k": "v"})

    async def test_ack_removes(self) -> None:
        """
        An acknowledged message is gone: a later consumer does not get it.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        first = DeliveryRecorder()
        subscription = await self._subscribe(bus, queue, first)
        self.assertTrue(verifyObject(ISubscription, subscription))
        self.assertEqual(subscription.queue, queue)
        await bus.publish(Message.create("fedhub.test.ack", {}), exchange="", routing_key=queue)
        (delivery,) = await first.wait(1)
        delivery.ack()
        delivery.ack()
        await subscription.cancel()
        second = DeliveryRecorder(ack=True)
        await self._subscribe(bus, queue, second)
        sentinel = await self._sentinel(bus, queue)
        await second.wait(1)
        self.assertEqual(second.ids, [sentinel])
        self.assertEqual(len(first.deliveries), 1)

    async def test_reject_requeue_redelivers(self) -> None:
        """
        A message rejected with requeue comes back first, marked redelivered.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        recorder = DeliveryRecorder()
        await self._subscribe(bus, queue, recorder, prefetch=1)
        one = Message.create("fedhub.test.one", {})
        two = Message.create("fedhub.test.two", {})
        await bus.publish(one, exchange="", routing_key=queue)
        await bus.publish(two, exchange="", routing_key=queue)
        (first,) = await recorder.wait(1)
        self.assertEqual(first.message.id, one.id)
        self.assertIs(first.redelivered, False)
        first.reject(requeue=True)
        first.ack()
        deliveries = await recorder.wait(2)
        self.assertEqual(deliveries[1].message.id, one.id)
        self.assertIs(deliveries[1].redelivered, True)
        self.assertIs(deliveries[1].message.redelivered, True)
        deliveries[1].ack()
        deliveries = await recorder.wait(3)
        self.assertEqual(deliveries[2].message.id, two.id)
        self.assertIs(deliveries[2].redelivered, False)
        deliveries[2].ack()

    async def _dead_letter_setup(
        self, bus: IBus, run: str, arguments: Mapping[str, Any]
    ) -> tuple[str, DeliveryRecorder]:
        """
        A work queue bound on amq.topic that dead-letters to amq.direct, where
        a second queue collects its dead letters.
        """
        topic = f"{run}.dead.letter"
        work = await self._queue(
            bus,
            topic,
            arguments={"x-dead-letter-exchange": "amq.direct", **arguments},
            what="work",
        )
        dead = await self._queue(bus, topic, exchange="amq.direct", what="dead")
        collected = DeliveryRecorder(ack=True)
        await self._subscribe(bus, dead, collected)
        return work, collected

    def _assert_death(self, message: Message, queue: str, reason: str, topic: str) -> None:
        deaths = message.headers["x-death"]
        self.assertEqual(len(deaths), 1)
        death = deaths[0]
        self.assertEqual(death["count"], 1)
        self.assertIsInstance(death["count"], int)
        self.assertEqual(death["reason"], reason)
        self.assertEqual(death["queue"], queue)
        self.assertEqual(death["exchange"], "amq.topic")
        self.assertEqual(list(death["routing-keys"]), [topic])
        self.assertIsInstance(death["time"], datetime)
        self.assertIsNotNone(death["time"].tzinfo)
        self.assertEqual(message.headers["x-first-death-queue"], queue)
        self.assertEqual(message.headers["x-first-death-reason"], reason)
        self.assertEqual(message.headers["x-first-death-exchange"], "amq.topic")

    async def test_reject_dead_letters(self) -> None:
        """
        A message rejected without requeue moves to the dead-letter exchange
        with an x-death record, and leaves its queue.
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        work, collected = await self._dead_letter_setup(bus, run, {})
        recorder = DeliveryRecorder()
        await self._subscribe(bus, work, recorder)
        message = Message.create(f"{run}.dead.letter", {"n": 1}, headers={"x-mine": "kept"})
        await bus.publish(message)
        (delivery,) = await recorder.wait(1)
        delivery.reject(requeue=False)
        (dead,) = await collected.wait(1)
        received = dead.message
        self.assertEqual(received.id, message.id)
        self.assertEqual(received.body, {"n": 1})
        self.assertEqual(received.topic, message.topic)
        self.assertEqual(received.headers["x-mine"], "kept")
        self.assertEqual(received.sent_at, message.sent_at)
        self._assert_death(received, work, "rejected", message.topic)
        sentinel = await self._sentinel(bus, work)
        deliveries = await recorder.wait(2)
        self.assertEqual([d.message.id for d in deliveries], [message.id, sentinel])
        deliveries[1].ack()

    async def test_expired_dead_letters(self) -> None:
        """
        A message left in a queue past its x-message-ttl is dead-lettered as "expired".
        """
        bus = await self.make_bus()
        run = "fedhubtest" + uuid.uuid4().hex
        work, collected = await self._dead_letter_setup(bus, run, {"x-message-ttl": 100})
        message = Message.create(f"{run}.dead.letter", {"n": 2})
        await bus.publish(message)
        (dead,) = await collected.wait(1)
        self.assertEqual(dead.message.id, message.id)
        self._assert_death(dead.message, work, "expired", message.topic)

    async def test_prefetch_limits_unacked(self) -> None:
        """
        With prefetch 2 a subscriber holds at most 2 unacknowledged deliveries.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        messages = [Message.create("fedhub.test.prefetch", {"n": n}) for n in range(5)]
        for message in messages:
            await bus.publish(message, exchange="", routing_key=queue)
        recorder = DeliveryRecorder()
        await self._subscribe(bus, queue, recorder, prefetch=2)
        await recorder.wait(2)
        await deferLater(_reactor(), SETTLE, lambda: None)
        self.assertEqual(len(recorder.deliveries), 2)
        for delivery in recorder.deliveries:
            delivery.ack()
        await recorder.wait(4)
        await deferLater(_reactor(), SETTLE, lambda: None)
        self.assertEqual(len(recorder.deliveries), 4)
        recorder.deliveries[2].ack()
        await recorder.wait(5)
        self.assertEqual(recorder.ids, [m.id for m in messages])
        for delivery in recorder.deliveries[3:]:
            delivery.ack()

    async def test_competing_consumers_share(self) -> None:
        """
        Subscriptions on one queue share its messages; each message goes to one.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        first, second = DeliveryRecorder(), DeliveryRecorder()
        await self._subscribe(bus, queue, first, prefetch=1)
        await self._subscribe(bus, queue, second, prefetch=1)
        messages = [Message.create("fedhub.test.compete", {"n": n}) for n in range(4)]
        await gatherResults(
            [bus.publish(m, exchange="", routing_key=queue) for m in messages]
        )
        await first.wait(1)
        await second.wait(1)
        first.deliveries[0].ack()
        second.deliveries[0].ack()
        await first.wait(2)
        await second.wait(2)
        self.assertEqual(len(first.deliveries), 2)
        self.assertEqual(len(second.deliveries), 2)
        self.assertEqual(sorted(first.ids + second.ids), sorted(m.id for m in messages))
        for delivery in first.deliveries[1:] + second.deliveries[1:]:
            delivery.ack()

    async def test_requeue_keeps_queue_order(self) -> None:
        """
        Deliveries rejected with requeue one after the other, in the order
        they came (as a halted consumer gives back what it holds), return in
        that order, ahead of the messages that waited behind them.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        messages = [Message.create("fedhub.test.requeue.order", {"n": n}) for n in range(5)]
        for message in messages:
            await bus.publish(message, exchange="", routing_key=queue)
        recorder = DeliveryRecorder()
        await self._subscribe(bus, queue, recorder, prefetch=3)
        held = await recorder.wait(3)
        for delivery in held:
            delivery.reject(requeue=True)
        again = (await recorder.wait(6))[3:]
        self.assertEqual([d.message.id for d in again], [m.id for m in messages[:3]])
        self.assertEqual([d.redelivered for d in again], [True, True, True])
        for delivery in again:
            delivery.ack()
        rest = (await recorder.wait(8))[6:]
        self.assertEqual([d.message.id for d in rest], [m.id for m in messages[3:]])
        for delivery in rest:
            delivery.ack()

    async def test_cancel_returns_unacked(self) -> None:
        """
        Cancelling stops deliveries; its unacknowledged messages go back to the
        queue and come again marked redelivered.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        messages = [Message.create("fedhub.test.cancel", {"n": n}) for n in range(5)]
        for message in messages:
            await bus.publish(message, exchange="", routing_key=queue)
        first = DeliveryRecorder()
        subscription = await bus.subscribe(queue, first, 3)
        await first.wait(3)
        await subscription.cancel()
        second = DeliveryRecorder(ack=True)
        await self._subscribe(bus, queue, second)
        await second.wait(5)
        self.assertEqual(sorted(second.ids), sorted(m.id for m in messages))
        held = set(first.ids)
        self.assertEqual(len(held), 3)
        for delivery in second.deliveries:
            self.assertIs(delivery.redelivered, delivery.message.id in held, delivery.message.id)
        self.assertEqual(len(first.deliveries), 3)
        self.assertFalse(subscription.consuming)

    async def test_subscription_consuming(self) -> None:
        """
        A subscription says it consumes once subscribed, and no longer once
        cancelled.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        subscription = await bus.subscribe(queue, DeliveryRecorder(), 1)
        self.assertTrue(subscription.consuming)
        await subscription.cancel()
        self.assertFalse(subscription.consuming)

    async def test_redeclare_with_other_arguments(self) -> None:
        """
        Declaring a queue again the same way is harmless; with other arguments
        or flags it fails with PreconditionFailed (406), and the bus goes on.
        """
        bus = await self.make_bus()
        name = _unique("redeclare")
        same = QueueSpec(name, arguments=dict(QUEUE_ARGUMENTS))
        await bus.declare(Topology(queues=(same,)))
        await bus.declare(Topology(queues=(same,)))
        other = QueueSpec(name, arguments={**QUEUE_ARGUMENTS, "x-message-ttl": 1000})
        error = await self._fails(bus.declare(Topology(queues=(other,))), PreconditionFailed)
        self.assertEqual(error.reply_code, 406)
        transient = QueueSpec(name, durable=False, arguments=dict(QUEUE_ARGUMENTS))
        await self._fails(bus.declare(Topology(queues=(transient,))), PreconditionFailed)
        recorder = DeliveryRecorder(ack=True)
        await self._subscribe(bus, name, recorder)
        sentinel = await self._sentinel(bus, name)
        await recorder.wait(1)
        self.assertEqual(recorder.ids, [sentinel])

    async def test_order_preserved(self) -> None:
        """
        One publisher's messages to one queue arrive in publish order.
        """
        bus = await self.make_bus()
        queue = await self._queue(bus)
        recorder = DeliveryRecorder(ack=True)
        await self._subscribe(bus, queue, recorder, prefetch=20)
        messages = [Message.create("fedhub.test.order", {"n": n}) for n in range(100)]
        await gatherResults(
            [bus.publish(m, exchange="", routing_key=queue) for m in messages]
        )
        await recorder.wait(100)
        self.assertEqual(recorder.ids, [m.id for m in messages])

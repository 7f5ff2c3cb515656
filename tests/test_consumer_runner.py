"""
Tests for L{fedhub.consumers.runner}: how a consumer's outcome settles each
delivery, driven on the in-process bus with a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import ComponentConfig
from fedhub.consumers.runner import (
    DEAD_LETTER_REASON_HEADER,
    DEFAULT_PREFETCH,
    MAIN_QUEUE_ONLY,
    ConsumerService,
    Settled,
    attempts_from,
    prefetch_for,
)
from fedhub.errors import DeadLetter, Drop, Halt, NotHandled, Retry
from fedhub.interfaces import IDelivery, IMessageHandler
from fedhub.message import Message
from fedhub.schema import SchemaRegistry


@implementer(IMessageHandler)
class ScriptedHandler:
    """
    A handler whose outcome per call is scripted: a list of values or
    exceptions consumed in order (the last one repeats), or Deferreds.
    """

    topics = ("#",)

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes) or [None]
        self.seen: list[Message] = []
        self.stopped = False

    def handle(self, message: Message) -> Any:
        self.seen.append(message)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


@implementer(IDelivery)
class FakeDelivery:
    """
    A delivery handed to the runner by hand; it records its verdicts.
    """

    def __init__(self, message: Message) -> None:
        self.message = message
        self.redelivered = message.redelivered
        self.queue = message.queue
        self.verdicts: list[str] = []

    @property
    def live(self) -> bool:
        return not self.verdicts

    def ack(self) -> bool:
        self.verdicts.append("ack")
        return True

    def reject(self, requeue: bool) -> bool:
        self.verdicts.append("requeue" if requeue else "reject")
        return True


def component(name: str = "c", **changes: Any) -> ComponentConfig:
    fields: dict[str, Any] = {
        "kind": "consumer",
        "index": 0,
        "name": name,
        "plugin": "test",
        "domain": "d",
        "options": {},
        "topics": ("t.#",),
    }
    fields.update(changes)
    return ComponentConfig(**fields)


class ConsumerCase(SynchronousTestCase):
    """
    A consumer on a memory bus whose time is a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus("d", clock=self.clock)
        self.bus.startService()

    def start(
        self,
        handler: IMessageHandler,
        concurrency: int = 1,
        prefetch: int = 0,
        bus: MemoryBus | None = None,
        **settings: Any,
    ) -> ConsumerService:
        """A consuming consumer of C{handler} on C{bus} (the test's own by default)."""
        service = ConsumerService(
            component(concurrency=concurrency, prefetch=prefetch), handler, bus or self.bus,
            self.clock, **settings,
        )
        service.startService()
        self.flush()
        self.assertTrue(service.consuming)
        return service

    def flush(self, seconds: float = 0) -> None:
        """Run what is due now (and after C{seconds})."""
        self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
        for _ in range(5):
            self.clock.advance(0)

    def publish(
        self, body: dict[str, Any] | None = None, bus: MemoryBus | None = None, **kw: Any
    ) -> Message:
        """Publish a message to C{bus} (the test's own by default) and run what it sets off."""
        message = Message.create("t.x", body or {"n": 1}, **kw)
        self.successResultOf((bus or self.bus).publish(message))
        self.flush()
        return message


class RunnerTests(ConsumerCase):
    """
    A consumer on a memory bus whose time is a L{Clock}.
    """

    def test_success_acks(self) -> None:
        """A handler that returns acknowledges: the queue is empty and nothing is retried."""
        handler = ScriptedHandler(None)
        service = self.start(handler)
        message = self.publish()
        self.assertEqual([m.id for m in handler.seen], [message.id])
        self.assertEqual(handler.seen[0].queue, "fedhub.c")
        self.assertEqual(self.bus.queue_depth("fedhub.c") + self.bus.unacked("fedhub.c"), 0)
        self.assertEqual(service.stats["acked"], 1)

    def test_deferred_result_waits(self) -> None:
        """The ack waits for the handler's Deferred; while it is pending the message stays unacked."""
        pending: Deferred[None] = Deferred()
        service = self.start(ScriptedHandler(pending))
        self.publish()
        self.assertEqual(self.bus.unacked("fedhub.c"), 1)
        pending.callback(None)
        self.flush()
        self.assertEqual(self.bus.unacked("fedhub.c"), 0)
        self.assertEqual(service.stats["acked"], 1)

    def test_verdict_after_the_subscription_is_gone(self) -> None:
        """
        A handler that finishes after its delivery's subscription went away
        (as a channel closed by the broker's consumer timeout) is not counted
        as acked: the bus dropped the ack, the message is back in its queue,
        and observers hear it was requeued.
        """
        pending: Deferred[None] = Deferred()
        service = self.start(ScriptedHandler(pending))
        settled: list[Settled] = []
        service.add_observer(settled.append)
        message = self.publish()
        subscription = service._subscription
        assert subscription is not None
        self.successResultOf(subscription.cancel())
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 1)
        pending.callback(None)
        self.flush()
        self.assertEqual((service.stats["acked"], service.stats["unsettled"]), (0, 1))
        self.assertEqual([(s.message.id, s.outcome) for s in settled], [(message.id, "requeued")])
        self.assertIn("channel closed", settled[0].reason or "")
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 1)

    def redeliver(self, service: ConsumerService, message: Message) -> "FakeDelivery":
        """
        Hand the consumer a redelivery of C{message}, as after a channel the
        broker closed before the verdict.
        """
        delivery = FakeDelivery(message.evolve(redelivered=True, queue=service.queue))
        service._on_delivery(delivery)
        self.flush()
        return delivery

    def test_max_deliveries(self) -> None:
        """
        A message delivered more than max_deliveries times without a verdict
        reaching the broker is dead-lettered with the reason instead of
        handled again; one that gets a verdict starts counting afresh.
        """
        handler = ScriptedHandler(Deferred())
        # Each redelivery is handled while the earlier calls still run.
        service = self.start(handler, concurrency=10, max_deliveries=3)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        message = self.publish()
        deliveries = [self.redeliver(service, message) for _ in range(2)]
        self.assertEqual(len(handler.seen), 3)
        self.assertEqual([d.verdicts for d in deliveries], [[], []])
        fourth = self.redeliver(service, message)
        self.assertEqual(len(handler.seen), 3)
        self.assertEqual(fourth.verdicts, ["ack"])
        dead_letters: list[Message] = []
        self.successResultOf(
            self.bus.subscribe("fedhub.c.dead", lambda d: (dead_letters.append(d.message), d.ack()), 10)
        )
        self.flush()
        (dead,) = dead_letters
        self.assertEqual(dead.id, message.id)
        reason = dead.headers[DEAD_LETTER_REASON_HEADER]
        self.assertIn("delivered 4 times without a verdict", reason)
        self.assertIn("max_deliveries is 3", reason)
        self.assertEqual([s.outcome for s in settled], ["dead_lettered"])
        self.assertEqual(service.stats["dead_lettered"], 1)
        # Counted afresh after that verdict: two more deliveries are handled.
        for _ in range(2):
            self.redeliver(service, message)
        self.assertEqual(len(handler.seen), 5)

    def test_own_put_backs_not_counted_as_deliveries(self) -> None:
        """
        A message the consumer puts back itself (its handler gives it back,
        or its retry copy could not be published for a passing reason) got a
        verdict that reached the broker: its redeliveries do not count
        towards max_deliveries.
        """
        handler = ScriptedHandler(*[NotHandled("busy")] * 6, None)
        service = self.start(handler, max_deliveries=2)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        self.publish()
        self.flush()
        self.assertEqual(len(handler.seen), 7)
        self.assertTrue(all(m.redelivered for m in handler.seen[1:]))
        self.assertEqual([s.outcome for s in settled], ["requeued"] * 6 + ["acked"])

    def test_max_deliveries_off(self) -> None:
        """
        With max_deliveries 0 a redelivered message is always handled; a
        verdict that reaches the broker clears a message's count.
        """
        handler = ScriptedHandler(Deferred())
        service = self.start(handler, concurrency=30, max_deliveries=0)
        message = self.publish()
        for _ in range(20):
            self.redeliver(service, message)
        self.assertEqual(len(handler.seen), 21)
        counted = self.start(ScriptedHandler(None), max_deliveries=2)
        for _ in range(5):
            delivery = self.redeliver(counted, message)
            self.assertEqual(delivery.verdicts, ["ack"])
        self.assertEqual(counted.stats["acked"], 5)
        self.assertEqual(counted._deliveries, {})

    def test_drain_when_stopping(self) -> None:
        """
        Stopping with messages in hand calls the handler's drain() first, so
        a batching handler can finish them before the drain timeout; a
        drain() that raises is logged and the stop goes on.
        """
        pending: Deferred[None] = Deferred()
        handler = ScriptedHandler(pending)
        calls: list[str] = []

        def drain() -> None:
            calls.append("drain")
            pending.callback(None)

        handler.drain = drain  # type: ignore[attr-defined]
        service = self.start(handler)
        self.publish()
        stopped = service.stopService()
        self.assertEqual(calls, ["drain"])
        self.flush()
        self.successResultOf(stopped)
        self.assertEqual(service.stats["acked"], 1)
        self.assertTrue(handler.stopped)

        broken = ScriptedHandler(Deferred())

        def fails() -> None:
            raise RuntimeError("drain broke")

        broken.drain = fails  # type: ignore[attr-defined]
        other = self.start(broken, drain_timeout=5)
        self.publish()
        stopping = other.stopService()
        self.flush(5)
        self.successResultOf(stopping)
        self.assertTrue(broken.stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_handling_time_and_in_flight(self) -> None:
        """Settled reports how long the handler took (None when it was not called); in_flight counts calls."""
        pending: Deferred[None] = Deferred()
        schemas = SchemaRegistry()
        schemas.register("test.numbered", {"type": "object", "properties": {"n": {"type": "integer"}}})
        service = self.start(ScriptedHandler(pending, DeadLetter("no"), RuntimeError("x")),
                             on_error="drop", schemas=schemas)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        self.publish()
        self.assertEqual(service.in_flight, 1)
        self.clock.advance(2.5)
        pending.callback(None)
        self.flush()
        self.assertEqual(service.in_flight, 0)
        self.publish()
        self.publish()
        self.publish({"n": "not a number"}, schema="test.numbered")
        self.assertEqual([(s.outcome, s.handling) for s in settled],
                         [("acked", 2.5), ("dead_lettered", 0.0), ("dropped", 0.0),
                          ("dead_lettered", None)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_handler_error_logged_as_error(self) -> None:
        """
        A handler's unforeseen exception is logged at error level, with its
        traceback and the message id: the policy handles it, so it is no
        critical event.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = self.start(ScriptedHandler(RuntimeError("boom")), on_error="drop")
        self.publish()
        failed = [e for e in events if "failed on" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["log_level"], LogLevel.error)
        self.assertIsInstance(failed[0]["log_failure"].value, RuntimeError)
        self.assertEqual(service.stats["dropped"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_coroutine_handler(self) -> None:
        """An `async def` handler is awaited."""
        done: Deferred[None] = Deferred()

        async def work() -> None:
            await done

        handler = ScriptedHandler()
        handler.handle = lambda message: work()  # type: ignore[method-assign]
        service = self.start(handler)
        self.publish()
        self.assertEqual(service.stats["acked"], 0)
        done.callback(None)
        self.flush()
        self.assertEqual(service.stats["acked"], 1)

    def test_retry_backoff_then_dead_letter(self) -> None:
        """Retries wait 1, 2, 4 s in turn (counted from x-death), then the message is dead-lettered."""
        handler = ScriptedHandler(RuntimeError("down"))
        service = self.start(handler, retry_delay=1.0, max_retries=3)
        self.publish()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(handler.seen), 1)
        self.assertEqual(self.bus.queue_depth("fedhub.c.retry.1"), 1)
        self.flush(0.999)
        self.assertEqual(len(handler.seen), 1)
        self.flush(0.001)
        self.assertEqual(len(handler.seen), 2)
        self.assertEqual(attempts_from(handler.seen[1], "fedhub.c.retry."), 1)
        self.assertEqual(self.bus.queue_depth("fedhub.c.retry.2"), 1)
        self.flush(1.999)
        self.assertEqual(len(handler.seen), 2)
        self.flush(0.001)
        self.assertEqual(len(handler.seen), 3)
        self.flush(4)
        self.assertEqual(len(handler.seen), 4)
        self.assertEqual(attempts_from(handler.seen[3], "fedhub.c.retry."), 3)
        # Retries used up: dead-lettered with the reason, topic and id kept.
        self.assertEqual(self.bus.queue_depth("fedhub.c.dead"), 1)
        self.assertEqual(service.stats["retried"], 3)
        self.assertEqual(service.stats["dead_lettered"], 1)
        self.assertEqual({m.id for m in handler.seen}, {handler.seen[0].id})
        self.assertEqual({m.topic for m in handler.seen}, {"t.x"})
        self.flushLoggedErrors(RuntimeError)

    def test_dead_letter_copy(self) -> None:
        """DeadLetter puts a copy with the reason header in the dead-letter queue and acks the original."""
        dead: list[Message] = []
        handler = ScriptedHandler(DeadLetter("no such package"))
        service = self.start(handler)
        message = self.publish()
        self.successResultOf(self.bus.subscribe("fedhub.c.dead", lambda d: (dead.append(d.message), d.ack()), 10))
        self.flush()
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0].id, message.id)
        self.assertEqual(dead[0].topic, "t.x")
        self.assertEqual(dead[0].body, message.body)
        self.assertEqual(dead[0].headers[DEAD_LETTER_REASON_HEADER], "no such package")
        self.assertEqual(self.bus.queue_depth("fedhub.c") + self.bus.unacked("fedhub.c"), 0)
        self.assertEqual(service.stats["dead_lettered"], 1)

    def test_retry_with_delay(self) -> None:
        """Retry(delay=d) uses the first retry queue that waits at least d."""
        handler = ScriptedHandler(Retry("later", delay=3), None)
        self.start(handler, retry_delay=1.0, max_retries=4)
        self.publish()
        self.assertEqual(self.bus.queue_depth("fedhub.c.retry.3"), 1)

    def test_drop(self) -> None:
        """Drop acknowledges without dead-lettering."""
        service = self.start(ScriptedHandler(Drop("noise")))
        self.publish()
        self.assertEqual(self.bus.queue_depth("fedhub.c.dead"), 0)
        self.assertEqual(self.bus.queue_depth("fedhub.c") + self.bus.unacked("fedhub.c"), 0)
        self.assertEqual(service.stats["dropped"], 1)

    def test_halt(self) -> None:
        """Halt returns the message to the queue and stops this consumer."""
        handler = ScriptedHandler(Halt("database gone"), None)
        service = self.start(handler)
        self.publish()
        self.publish()
        self.assertTrue(service.halted)
        self.assertFalse(service.consuming)
        self.assertEqual(len(handler.seen), 1)
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 2)

    def test_error_policy_dead_letter(self) -> None:
        """With on_error='dead-letter' an exception dead-letters at once, naming the exception."""
        dead: list[Message] = []
        self.start(ScriptedHandler(KeyError("x")), on_error="dead-letter")
        self.publish()
        self.flushLoggedErrors(KeyError)
        self.successResultOf(self.bus.subscribe("fedhub.c.dead", lambda d: (dead.append(d.message), d.ack()), 10))
        self.flush()
        self.assertIn("KeyError", dead[0].headers[DEAD_LETTER_REASON_HEADER])

    def test_bad_policy_refused(self) -> None:
        """An unknown on_error policy is refused when the consumer is built."""
        self.assertRaises(ValueError, ConsumerService, component(), ScriptedHandler(), self.bus, self.clock, on_error="pray")

    def test_schema_failure_dead_lettered(self) -> None:
        """A body that fails its registered schema is dead-lettered with the reason, never handled."""
        schemas = SchemaRegistry()
        schemas.register("test.v1", {"type": "object", "required": ["name"]})
        handler = ScriptedHandler(None)
        service = self.start(handler, schemas=schemas)
        dead: list[Message] = []
        self.successResultOf(self.bus.subscribe("fedhub.c.dead", lambda d: (dead.append(d.message), d.ack()), 10))
        self.publish({"other": 1}, schema="test.v1")
        self.publish({"name": "ok"}, schema="test.v1")
        self.publish({"anything": 1}, schema="unknown.v9")
        self.assertEqual(len(handler.seen), 2)
        self.assertEqual(service.stats["invalid"], 1)
        self.assertEqual(len(dead), 1)
        self.assertIn("'name' is a required property", dead[0].headers[DEAD_LETTER_REASON_HEADER])

    def test_prefetch_is_concurrency(self) -> None:
        """At most `concurrency` messages are in the handler's hands at once."""
        pending = [Deferred[None]() for _ in range(3)]
        handler = ScriptedHandler(*pending)
        service = ConsumerService(component(concurrency=2), handler, self.bus, self.clock)
        service.startService()
        self.flush()
        for _ in range(3):
            self.publish()
        self.assertEqual(len(handler.seen), 2)
        pending[0].callback(None)
        self.flush()
        self.assertEqual(len(handler.seen), 3)

    def test_prefetch_beyond_concurrency(self) -> None:
        """
        By default a consumer at concurrency 1 holds DEFAULT_PREFETCH
        messages: the handler gets one at a time, in order, the others wait
        unacknowledged in the consumer, and each goes to the handler as the
        call before it ends.
        """
        pending = [Deferred[None]() for _ in range(5)]
        handler = ScriptedHandler(*pending)
        service = self.start(handler)
        self.assertEqual(service.prefetch, DEFAULT_PREFETCH)
        sent = [self.publish({"n": n}) for n in range(DEFAULT_PREFETCH + 2)]
        self.assertEqual([m.id for m in handler.seen], [sent[0].id])
        self.assertEqual(self.bus.unacked("fedhub.c"), DEFAULT_PREFETCH)
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 2)
        for number in range(4):
            pending[number].callback(None)
            self.flush()
            self.assertEqual([m.id for m in handler.seen], [m.id for m in sent[:number + 2]])
        handler.outcomes = [None]
        pending[4].callback(None)
        self.flush()
        self.assertEqual([m.id for m in handler.seen], [m.id for m in sent])
        self.assertEqual(self.bus.unacked("fedhub.c") + self.bus.queue_depth("fedhub.c"), 0)
        self.assertEqual((service.stats["acked"], service.in_flight), (len(sent), 0))

    def test_waiting_burst_handled_in_a_loop(self) -> None:
        """
        A handler that answers at once works through thousands of waiting
        deliveries without recursing once per message.
        """
        handler = ScriptedHandler(None)
        service = self.start(handler, prefetch=5000)
        first: Deferred[None] = Deferred()
        handler.outcomes = [first, None]
        sent = [Message.create("t.x", {"n": n}) for n in range(3000)]
        for message in sent:
            self.successResultOf(self.bus.publish(message))
        self.flush()
        self.assertEqual(len(handler.seen), 1)
        self.assertEqual(len(service._waiting), 2999)
        first.callback(None)
        self.flush()
        self.assertEqual([m.id for m in handler.seen], [m.id for m in sent])
        self.assertEqual(service.stats["acked"], 3000)

    def test_prefetch_for(self) -> None:
        """
        The configured prefetch wins (never below concurrency); otherwise
        concurrency raised to DEFAULT_PREFETCH, unless the handler is
        long_running.
        """
        quick = ScriptedHandler(None)
        slow = ScriptedHandler(None)
        slow.long_running = True  # type: ignore[attr-defined]
        cases = [
            (component(), quick, DEFAULT_PREFETCH),
            (component(concurrency=3), quick, DEFAULT_PREFETCH),
            (component(concurrency=200), quick, 200),
            (component(), slow, 1),
            (component(concurrency=7), slow, 7),
            (component(concurrency=2, prefetch=50), slow, 50),
            (component(concurrency=2, prefetch=50), quick, 50),
            (component(concurrency=8, prefetch=4), quick, 8),
        ]
        for config, handler, expected in cases:
            self.assertEqual(prefetch_for(config, handler), expected, (config, handler))
        service = self.start(slow)
        self.assertEqual(service.prefetch, 1)
        sent = [self.publish({"n": n}) for n in range(3)]
        self.assertEqual(len(slow.seen), 3)
        self.assertEqual([m.id for m in slow.seen], [m.id for m in sent])

    def test_halt_lets_calls_in_progress_settle(self) -> None:
        """
        A Halt while other calls are in progress: their messages stay with
        the open subscription until they settle (acknowledged once, not put
        back to be handled twice); the halting one and the waiting ones are
        held meanwhile, not rejected (which would bring them straight back),
        and go back to the queue when the subscription then ends.
        """
        first: Deferred[None] = Deferred()
        halting: Deferred[None] = Deferred()
        handler = ScriptedHandler(first, halting)
        service = self.start(handler, concurrency=2, prefetch=4)
        for n in range(4):
            self.publish({"n": n})
        self.assertEqual(len(handler.seen), 2)
        halting.errback(Halt("stop here"))
        for _ in range(20):
            self.clock.advance(0)
        self.assertTrue(service.halted)
        self.assertFalse(service.consuming)
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (0, 4))
        self.assertEqual(service.stats["requeued"], 3)
        first.callback(None)
        self.flush()
        self.assertEqual(service.stats["acked"], 1)
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (3, 0))
        self.assertEqual(len(handler.seen), 2)

    def test_halt_waits_for_calls_at_most_drain_timeout(self) -> None:
        """A call that never ends holds a halted consumer's subscription for drain_timeout at most."""
        stuck: Deferred[None] = Deferred()
        handler = ScriptedHandler(stuck, Halt("stop here"))
        service = self.start(handler, concurrency=2, prefetch=4)
        for n in range(3):
            self.publish({"n": n})
        self.flush()
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 0)
        self.clock.advance(service.drain_timeout)
        self.flush()
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (3, 0))

    def test_halt_gives_back_waiting(self) -> None:
        """
        A Halt puts the message in hand and every waiting one back in the
        queue; the handler never sees the waiting ones.
        """
        pending: Deferred[None] = Deferred()
        handler = ScriptedHandler(pending)
        service = self.start(handler)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        for n in range(4):
            self.publish({"n": n})
        self.assertEqual(len(service._waiting), 3)
        pending.errback(Halt("stop here"))
        self.flush()
        self.assertTrue(service.halted)
        self.assertEqual(len(handler.seen), 1)
        self.assertEqual(service._waiting, type(service._waiting)())
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 4)
        self.assertEqual(self.bus.unacked("fedhub.c"), 0)
        self.assertEqual([s.outcome for s in settled], ["requeued"] * 4)
        self.assertEqual(service.stats["requeued"], 4)

    def test_stop_gives_back_waiting(self) -> None:
        """
        Stopping gives up the waiting deliveries at once, finishes the one
        in hand, and never calls the handler again.  The ones given up stay
        with the subscription until it ends after the drain: rejected at
        once, they would free their prefetch slots and the broker would hand
        them straight back, again and again for as long as the drain lasts.
        """
        pending: Deferred[None] = Deferred()
        handler = ScriptedHandler(pending)
        service = self.start(handler)
        for n in range(3):
            self.publish({"n": n})
        stopped = service.stopService()
        self.assertEqual(len(service._waiting), 0)
        self.flush()
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (0, 3))
        self.assertEqual(service.stats["requeued"], 2)
        self.assertNoResult(stopped)
        pending.callback(None)
        self.flush()
        self.successResultOf(stopped)
        self.assertEqual(len(handler.seen), 1)
        self.assertEqual((service.stats["acked"], service.stats["requeued"]), (1, 2))
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (2, 0))

    def test_not_handled_while_stopping_not_redelivered(self) -> None:
        """
        Calls a handler gives back while the consumer stops (exec's waiting
        runs) stay with the subscription until it ends; nothing comes back
        to the stopping consumer meanwhile.
        """
        running: Deferred[None] = Deferred()
        given_back: list[Deferred[None]] = [Deferred(), Deferred()]

        class Draining(ScriptedHandler):
            def drain(self) -> None:
                for d in given_back:
                    d.errback(NotHandled("the consumer is stopping"))

        handler = Draining(running, *given_back)
        service = self.start(handler, concurrency=3, prefetch=3)
        for n in range(3):
            self.publish({"n": n})
        self.assertEqual(len(handler.seen), 3)
        stopped = service.stopService()
        for _ in range(50):
            self.clock.advance(0)
        self.assertEqual(len(handler.seen), 3)
        self.assertEqual(service.stats["requeued"], 2)
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (0, 3))
        running.callback(None)
        self.flush()
        self.successResultOf(stopped)
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c")), (2, 0))

    def test_waiting_delivery_whose_channel_closed(self) -> None:
        """
        A delivery that waited while its channel closed is not handed to the
        handler (the broker delivers it again): observers hear it was
        requeued, and the next waiting one is handled.
        """
        pending: Deferred[None] = Deferred()
        handler = ScriptedHandler(pending, None)
        service = self.start(handler)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        self.publish()
        gone = FakeDelivery(Message.create("t.x", {"gone": 1}).evolve(queue=service.queue))
        kept = FakeDelivery(Message.create("t.x", {"kept": 1}).evolve(queue=service.queue))
        service._on_delivery(gone)
        service._on_delivery(kept)
        gone.verdicts.append("channel closed")
        pending.callback(None)
        self.flush()
        self.assertEqual([m.body for m in handler.seen[1:]], [{"kept": 1}])
        self.assertEqual(kept.verdicts, ["ack"])
        self.assertEqual(gone.verdicts, ["channel closed"])
        outcomes = [(s.message.body, s.outcome) for s in settled]
        self.assertEqual(outcomes[1], ({"gone": 1}, "requeued"))
        self.assertIn("channel closed while it waited", settled[1].reason or "")
        self.assertEqual(service.stats["requeued"], 1)

    def test_orphaned_call_leaves_room(self) -> None:
        """
        A call whose delivery's channel closed (it hangs past the broker's
        consumer timeout) no longer counts towards concurrency: the next
        delivery is handled while it still runs, not left waiting behind it.
        """
        hung: Deferred[None] = Deferred()
        handler = ScriptedHandler(hung, None)
        service = self.start(handler)
        first = FakeDelivery(Message.create("t.x", {"n": 1}).evolve(queue=service.queue))
        service._on_delivery(first)
        second = FakeDelivery(Message.create("t.x", {"n": 2}).evolve(queue=service.queue))
        service._on_delivery(second)
        self.assertEqual((len(handler.seen), len(service._waiting)), (1, 1))
        # The broker timed the first delivery out and closed its channel.
        first.verdicts.append("channel closed")
        third = FakeDelivery(Message.create("t.x", {"n": 3}).evolve(queue=service.queue))
        service._on_delivery(third)
        self.assertEqual([m.body["n"] for m in handler.seen], [1, 2, 3])
        self.assertEqual((second.verdicts, third.verdicts), (["ack"], ["ack"]))
        self.assertEqual(service.in_flight, 1)

    def test_orphaned_call_abandoned(self) -> None:
        """
        A handler with C{abandon} is told of each call the consumer forgets
        because its channel closed, before the delivery after it is handled,
        even below the concurrency limit; the call then failing with
        NotHandled is requeued quietly, with no warning.
        """
        abandoned: list[Message] = []
        given_back: Deferred[None] = Deferred()

        class Abandoning(ScriptedHandler):
            def abandon(self, message: Message) -> None:
                abandoned.append(message)
                given_back.errback(NotHandled("abandoned before its run began"))

        handler = Abandoning(given_back, None)
        service = self.start(handler, concurrency=3)
        settled: list[Settled] = []
        service.add_observer(settled.append)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        first = FakeDelivery(Message.create("t.x", {"n": 1}).evolve(queue=service.queue))
        service._on_delivery(first)
        first.verdicts.append("channel closed")
        second = FakeDelivery(Message.create("t.x", {"n": 2}).evolve(queue=service.queue))
        service._on_delivery(second)
        self.assertEqual(abandoned, [first.message])
        self.assertEqual([(x.message.body["n"], x.outcome) for x in settled],
                         [(1, "requeued"), (2, "acked")])
        self.assertEqual(settled[0].reason, "not handled: abandoned before its run began")
        self.assertEqual(first.verdicts, ["channel closed"])
        self.assertEqual(service.in_flight, 0)
        self.assertEqual([e for e in events if e.get("log_level") in (LogLevel.warn, LogLevel.error)],
                         [])

    def test_not_handled_goes_back(self) -> None:
        """A call failing with NotHandled on an open channel puts its message back at once."""
        handler = ScriptedHandler(NotHandled("the consumer is stopping"))
        service = self.start(handler)
        delivery = FakeDelivery(Message.create("t.x", {"n": 1}).evolve(queue=service.queue))
        service._on_delivery(delivery)
        self.assertEqual(delivery.verdicts, ["requeue"])
        self.assertEqual(service.stats["requeued"], 1)
        self.assertEqual(service.stats["failed"], 0)

    def test_room_looks_at_the_oldest_calls_only(self) -> None:
        """
        At its limit, the consumer asks only the oldest calls whether their
        channel is open, up to the first that is: newer calls came on the
        same channel or a newer one.
        """
        asked: list[int] = []

        class Counted(FakeDelivery):
            @property
            def live(self) -> bool:
                asked.append(self.message.body["n"])
                return not self.verdicts

        handler = ScriptedHandler(Deferred())
        service = self.start(handler, concurrency=3, prefetch=10)
        calls = [Counted(Message.create("t.x", {"n": n}).evolve(queue=service.queue))
                 for n in range(5)]
        for delivery in calls:
            service._on_delivery(delivery)
        self.assertEqual((len(handler.seen), service.waiting), (3, 2))
        asked.clear()
        service._on_delivery(Counted(Message.create("t.x", {"n": 9}).evolve(queue=service.queue)))
        self.assertEqual(asked, [0])
        # The two oldest calls' channel closed: they are dropped from the
        # count, the third stops the look, and two waiting ones are handled.
        calls[0].verdicts.append("channel closed")
        calls[1].verdicts.append("channel closed")
        asked.clear()
        service._pump()
        # The oldest first (to see whether any closed), then each up to the
        # first open one.
        self.assertEqual(asked[:4], [0, 0, 1, 2])
        self.assertEqual([m.body["n"] for m in handler.seen], [0, 1, 2, 3, 4])
        self.assertEqual(service.waiting, 1)

    def test_stop_drains(self) -> None:
        """Stopping waits for the message in hand, acks it, then stops the handler."""
        pending: Deferred[None] = Deferred()
        handler = ScriptedHandler(pending)
        service = self.start(handler)
        self.publish()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(handler.stopped)
        pending.callback(None)
        self.flush()
        self.successResultOf(stopped)
        self.assertTrue(handler.stopped)
        self.assertEqual(service.stats["acked"], 1)

    def test_stop_gives_up_after_drain_timeout(self) -> None:
        """A handler that never finishes delays stopping only by the drain timeout; its message goes back."""
        handler = ScriptedHandler(Deferred())
        service = self.start(handler, drain_timeout=5)
        self.publish()
        stopped = service.stopService()
        self.flush(4.9)
        self.assertNoResult(stopped)
        self.flush(0.1)
        self.successResultOf(stopped)
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 1)

    def test_length_limits_on_the_consumer_queue_only(self) -> None:
        """
        Queue arguments apply to every queue of the consumer, except length
        limits: a full retry queue would send its oldest message straight
        back with no wait and no retry counted (a tight loop), a full
        dead-letter queue drop dead letters.
        """
        arguments = {"x-queue-type": "quorum", "x-max-length": 10, "x-overflow": "reject-publish",
                     "x-max-length-bytes": 1000}
        service = ConsumerService(component(queue_arguments=arguments, max_retries=2),
                                  ScriptedHandler(), self.bus, self.clock)
        queues = {q.name: q.arguments for q in service.topology().queues}
        self.assertEqual({k: queues["fedhub.c"][k] for k in arguments}, arguments)
        for name in ("fedhub.c.dead", "fedhub.c.retry.1", "fedhub.c.retry.2"):
            self.assertEqual(queues[name]["x-queue-type"], "quorum", name)
            self.assertFalse(MAIN_QUEUE_ONLY & set(queues[name]), name)

    def test_topology_declared(self) -> None:
        """The queue, its dead-letter queue and one retry queue per level exist after start."""
        self.start(ScriptedHandler(), max_retries=2)
        for name in ("fedhub.c", "fedhub.c.dead", "fedhub.c.retry.1", "fedhub.c.retry.2"):
            self.assertEqual(self.bus.queue_depth(name), 0)
        self.assertRaises(Exception, self.bus.queue_depth, "fedhub.c.retry.3")


class DelayedConfirmTests(ConsumerCase):
    """
    As on AMQP, where a copy's confirm comes a broker round trip after the
    handler call that asked for it: a halt's wait and a stop's drain last
    until the copy replacing a message is confirmed, not only until the
    calls end, so the message is in one place, not back in its queue and
    in the copy's too.
    """

    def setUp(self) -> None:
        super().setUp()
        publish = self.bus.publish

        def later(message: Message, exchange: str | None = None,
                  routing_key: str | None = None) -> Deferred[None]:
            d = publish(message, exchange=exchange, routing_key=routing_key)
            if exchange is None:
                return d
            delayed: Deferred[None] = Deferred()
            d.addBoth(lambda result: self.clock.callLater(
                0.01, (delayed.errback if isinstance(result, Failure) else delayed.callback), result))
            return delayed

        self.bus.publish = later  # type: ignore[method-assign]

    def depths(self, service: ConsumerService) -> tuple[int, int, int]:
        return (self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c"),
                self.bus.queue_depth(service.retry_prefix + "1"))

    def halt_then_other_call_ends(self, verdict: Exception) -> ConsumerService:
        """
        Two calls in progress; one halts the consumer, then the other ends
        with C{verdict}, and its copy's confirm comes.
        """
        other: Deferred[None] = Deferred()
        halting: Deferred[None] = Deferred()
        service = self.start(ScriptedHandler(other, halting), concurrency=2, prefetch=2)
        self.publish({"n": 0})
        self.publish({"n": 1})
        halting.errback(Halt("stop here"))
        self.flush()
        other.errback(verdict)
        self.flush(0.05)
        return service

    def test_halt_then_a_call_in_progress_retries(self) -> None:
        """After a Halt, another call ending in Retry has its copy confirmed and its original acknowledged."""
        service = self.halt_then_other_call_ends(Retry("later"))
        self.assertEqual(service.stats["unsettled"], 0)
        self.assertEqual(service.stats["retried"], 1)
        self.assertEqual(self.depths(service), (1, 0, 1))

    def test_halt_then_a_call_in_progress_dead_letters(self) -> None:
        """After a Halt, another call ending in DeadLetter has its copy confirmed and its original acknowledged."""
        service = self.halt_then_other_call_ends(DeadLetter("bad"))
        self.assertEqual((service.stats["unsettled"], service.stats["dead_lettered"]), (0, 1))
        self.assertEqual((self.bus.queue_depth("fedhub.c"), self.bus.unacked("fedhub.c"),
                          self.bus.queue_depth("fedhub.c.dead")), (1, 0, 1))

    def test_stop_then_the_call_in_progress_retries(self) -> None:
        """During a stop's drain, a call ending in Retry has its copy confirmed and its original acknowledged."""
        other: Deferred[None] = Deferred()
        service = self.start(ScriptedHandler(other), concurrency=1, prefetch=1)
        self.publish({"n": 0})
        stopped = service.stopService()
        other.errback(Retry("later"))
        self.flush(0.05)
        self.successResultOf(stopped)
        self.assertEqual(service.stats["unsettled"], 0)
        self.assertEqual(self.depths(service), (0, 0, 1))

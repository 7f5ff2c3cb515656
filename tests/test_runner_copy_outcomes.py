"""
Tests for L{fedhub.consumers.runner}: a verdict that replaces a delivery with
a copy (a L{Retry} or L{DeadLetter}) is counted and told to observers by what
became of it, once the broker answered for the copy, never before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.bus.memory import MemoryBus
from fedhub.consumers.runner import TRANSIENT_REQUEUE_DELAY, ConsumerService, Settled
from fedhub.errors import (
    DeadLetter,
    MessageNacked,
    MessageReturned,
    NotConnected,
    Retry,
    SchemaValidationError,
)
from fedhub.message import Message
from fedhub.schema import SchemaRegistry
from tests.test_consumer_runner import FakeDelivery, ScriptedHandler, component
from tests.test_consumer_runner_edge import BrokenPublishBus, RecordingDelivery


class HeldCopiesBus(MemoryBus):
    """
    A memory bus that holds every message published to an exchange other
    than the domain's own (the runner's retry and dead-letter copies) until
    the test confirms or refuses it, as a broker's confirm comes later.
    """

    def __init__(self, domain: str, clock: Clock) -> None:
        super().__init__(domain, clock=clock)
        self.copies: list[tuple[Message, str | None, Deferred[None]]] = []

    def publish(
        self, message: Message, exchange: str | None = None, routing_key: str | None = None
    ) -> Deferred[None]:
        if exchange is None or exchange == self.exchange:
            return super().publish(message, exchange, routing_key)
        held: Deferred[None] = Deferred()
        self.copies.append((message, exchange, held))
        return held

    def confirm(self) -> str | None:
        """Confirm the only copy held; the exchange it went to."""
        ((_, exchange, held),) = self.copies
        self.copies = []
        held.callback(None)
        return exchange

    def refuse(self, error: Exception) -> str | None:
        """Refuse the only copy held with C{error}; the exchange it went to."""
        ((_, exchange, held),) = self.copies
        self.copies = []
        held.errback(error)
        return exchange


class ClosingDelivery(FakeDelivery):
    """
    A delivery whose channel closes (C{close}): from then on every verdict
    on it is dropped.
    """

    def __init__(self, message: Message) -> None:
        super().__init__(message)
        self.closed = False

    @property
    def live(self) -> bool:
        return not self.closed and not self.verdicts

    def close(self) -> None:
        self.closed = True

    def ack(self) -> bool:
        if not self.live:
            return False
        return super().ack()

    def reject(self, requeue: bool) -> bool:
        if not self.live:
            return False
        return super().reject(requeue)


class RejectRaisingDelivery(RecordingDelivery):
    """
    A delivery whose first rejection without requeue raises (a defect in a
    bus); putting it back works.
    """

    def reject(self, requeue: bool) -> bool:
        if not requeue:
            raise RuntimeError("reject broken")
        return super().reject(requeue)


class Invalid(SchemaRegistry):
    """A schema registry that finds every body invalid."""

    def validate(self, message: Message) -> bool:
        raise SchemaValidationError("base.message", "the body is wrong")


class CopyOutcomeTests(SynchronousTestCase):
    """
    A consumer whose retry and dead-letter copies wait for the test to
    confirm or refuse them; deliveries are handed to it directly.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = HeldCopiesBus("d", self.clock)
        self.bus.startService()
        self.settled: list[Settled] = []

    def start(self, handler: ScriptedHandler, bus: MemoryBus | None = None, **settings: Any) -> ConsumerService:
        service = ConsumerService(component(), handler, bus or self.bus, self.clock, **settings)
        service.startService()
        self.clock.advance(0)
        service.add_observer(self.settled.append)
        return service

    def deliver(
        self,
        service: ConsumerService,
        delivery_type: type[FakeDelivery] = FakeDelivery,
        headers: dict[str, Any] | None = None,
    ) -> Any:
        message = Message.create("t.x", {"n": 1}, headers=headers)
        delivery = delivery_type(message.evolve(queue=service.queue))
        service._on_delivery(delivery)
        return delivery

    def counts(self, service: ConsumerService) -> dict[str, int]:
        """The counters of settled outcomes that are not zero."""
        settled = ("acked", "dropped", "retried", "dead_lettered", "rejected", "requeued", "unsettled")
        return {key: service.stats[key] for key in settled if service.stats.get(key)}

    def outcomes(self) -> list[str]:
        return [s.outcome for s in self.settled]

    # -- the copy is confirmed -------------------------------------------------

    def test_retry_counted_once_confirmed(self) -> None:
        """
        A Retry is neither counted nor told while its copy waits for the
        broker's confirm; once confirmed and the original acknowledged, it
        is counted as retried and observers hear "retried".
        """
        service = self.start(ScriptedHandler(Retry("later")))
        delivery = self.deliver(service)
        self.assertEqual(len(self.bus.copies), 1)
        self.assertEqual((self.counts(service), self.outcomes(), delivery.verdicts), ({}, [], []))
        self.assertEqual(self.bus.confirm(), "fedhub.c.retry.1")
        self.assertEqual(delivery.verdicts, ["ack"])
        self.assertEqual(self.counts(service), {"retried": 1})
        self.assertEqual(self.outcomes(), ["retried"])

    def test_dead_letter_counted_once_confirmed(self) -> None:
        """
        A DeadLetter is counted as dead-lettered only once its copy is
        confirmed and the original acknowledged.
        """
        service = self.start(ScriptedHandler(DeadLetter("bad")))
        delivery = self.deliver(service)
        self.assertEqual((self.counts(service), self.outcomes(), delivery.verdicts), ({}, [], []))
        self.assertEqual(self.bus.confirm(), "fedhub.c.dead")
        self.assertEqual(delivery.verdicts, ["ack"])
        self.assertEqual(self.counts(service), {"dead_lettered": 1})
        self.assertEqual([(s.outcome, s.reason) for s in self.settled], [("dead_lettered", "bad")])

    def test_retries_used_up_counted_once_confirmed(self) -> None:
        """
        A Retry past max_retries dead-letters the message: counted as
        dead-lettered, not retried, once that copy is confirmed.
        """
        service = self.start(ScriptedHandler(Retry("later")), max_retries=1)
        deaths = [{"queue": "fedhub.c.retry.1", "reason": "expired", "count": 1}]
        delivery = self.deliver(service, headers={"x-death": deaths})
        self.assertEqual(self.counts(service), {})
        self.assertEqual(self.bus.confirm(), "fedhub.c.dead")
        self.assertEqual(delivery.verdicts, ["ack"])
        self.assertEqual(self.counts(service), {"dead_lettered": 1})
        self.assertEqual(self.outcomes(), ["dead_lettered"])

    # -- the copy is refused ---------------------------------------------------

    def test_retry_copy_nacked(self) -> None:
        """
        A Retry whose copy the broker nacks is not counted as retried: the
        original is rejected (the broker dead-letters it), counted as
        rejected, and observers hear "rejected" only.
        """
        service = self.start(ScriptedHandler(Retry("later")))
        delivery = self.deliver(service)
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.assertEqual(self.outcomes(), ["rejected"])
        self.assertEqual(len(self.flushLoggedErrors(MessageNacked)), 1)

    def test_dead_letter_copy_returned(self) -> None:
        """
        A DeadLetter whose copy the broker returns (no queue bound) is not
        counted as dead-lettered, but as rejected.
        """
        service = self.start(ScriptedHandler(DeadLetter("bad")))
        delivery = self.deliver(service)
        self.bus.refuse(MessageReturned("NO_ROUTE"))
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.assertEqual(self.outcomes(), ["rejected"])
        self.assertEqual(len(self.flushLoggedErrors(MessageReturned)), 1)

    def test_retries_used_up_copy_refused(self) -> None:
        """
        A Retry past max_retries whose dead-letter copy fails is counted as
        rejected, neither retried nor dead-lettered.
        """
        service = self.start(ScriptedHandler(Retry("later")), max_retries=1)
        deaths = [{"queue": "fedhub.c.retry.1", "reason": "expired", "count": 1}]
        self.deliver(service, headers={"x-death": deaths})
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.assertEqual(self.outcomes(), ["rejected"])
        self.flushLoggedErrors(MessageNacked)

    def test_retries_used_up_copy_not_sent(self) -> None:
        """
        A Retry past max_retries whose dead-letter copy could not be
        published for a passing reason puts the original back in its queue
        after a pause: counted as requeued, not rejected.
        """
        service = self.start(ScriptedHandler(Retry("later")), max_retries=1)
        deaths = [{"queue": "fedhub.c.retry.1", "reason": "expired", "count": 1}]
        self.deliver(service, headers={"x-death": deaths})
        self.bus.refuse(NotConnected("gone"))
        self.assertEqual(self.counts(service), {})
        self.clock.advance(TRANSIENT_REQUEUE_DELAY)
        self.assertEqual(self.counts(service), {"requeued": 1})
        self.assertEqual(self.outcomes(), ["requeued"])
        self.assertEqual(self.flushLoggedErrors(NotConnected), [])

    def test_copy_publish_raises(self) -> None:
        """
        A bus whose publish raises counts the Retry as rejected, not retried.
        """
        service = self.start(ScriptedHandler(Retry("later")), BrokenPublishBus("d", clock=self.clock))
        delivery = self.deliver(service, RecordingDelivery)
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.assertEqual(self.outcomes(), ["rejected"])
        self.flushLoggedErrors(RuntimeError)

    def test_invalid_copy_refused(self) -> None:
        """
        A body that fails its schema is counted invalid at once, but as
        dead-lettered only if its copy is confirmed: refused, it is counted
        as rejected.
        """
        service = self.start(ScriptedHandler(None), schemas=Invalid())
        delivery = self.deliver(service)
        self.assertEqual(service.stats["invalid"], 1)
        self.assertEqual(self.counts(service), {})
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.assertEqual(self.outcomes(), ["rejected"])
        self.flushLoggedErrors(MessageNacked)

    def test_max_deliveries_copy_refused(self) -> None:
        """
        A message dead-lettered for too many deliveries whose copy is
        refused is counted as rejected, not dead-lettered.
        """
        handler = ScriptedHandler(None)
        service = self.start(handler, max_deliveries=1)
        message = Message.create("t.x", {"n": 1}).evolve(queue=service.queue, redelivered=True)
        delivery = FakeDelivery(message)
        service._on_delivery(delivery)
        self.assertEqual(handler.seen, [])
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(delivery.verdicts, ["reject"])
        self.assertEqual(self.counts(service), {"rejected": 1})
        self.flushLoggedErrors(MessageNacked)

    # -- the original's verdict does not reach the broker ------------------------

    def test_retry_confirmed_after_channel_closed(self) -> None:
        """
        A Retry copy confirmed after the original's channel closed leaves
        the original to come again: counted as unsettled and told as
        "requeued", not counted as retried.
        """
        service = self.start(ScriptedHandler(Retry("later")))
        delivery = self.deliver(service, ClosingDelivery)
        delivery.close()
        self.bus.confirm()
        self.assertEqual(delivery.verdicts, [])
        self.assertEqual(self.counts(service), {"unsettled": 1})
        self.assertEqual(self.outcomes(), ["requeued"])

    def test_dead_letter_refused_after_channel_closed(self) -> None:
        """
        A DeadLetter copy refused after the original's channel closed is
        counted as unsettled only: the rejection was dropped, the broker
        delivers the message again.
        """
        service = self.start(ScriptedHandler(DeadLetter("bad")))
        delivery = self.deliver(service, ClosingDelivery)
        delivery.close()
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(delivery.verdicts, [])
        self.assertEqual(self.counts(service), {"unsettled": 1})
        self.assertEqual(self.outcomes(), ["requeued"])
        self.flushLoggedErrors(MessageNacked)

    def test_reject_raises_after_copy_refused(self) -> None:
        """
        A copy refused, then a rejection that raises: the settling fallback
        puts the original back; it is counted as requeued, once, and not as
        retried.
        """
        service = self.start(ScriptedHandler(Retry("later")))
        delivery = self.deliver(service, RejectRaisingDelivery)
        self.bus.refuse(MessageNacked("nacked"))
        self.assertEqual(delivery.verdicts, ["requeue"])
        self.assertEqual(self.counts(service), {"requeued": 1})
        self.assertEqual(self.outcomes(), ["requeued"])
        self.flushLoggedErrors(MessageNacked, RuntimeError)

    def test_ack_raises_after_copy_confirmed(self) -> None:
        """
        A dead-letter copy confirmed, then an acknowledgement that raises:
        the original goes back to its queue and is counted as requeued, not
        dead-lettered.
        """
        service = self.start(ScriptedHandler(DeadLetter("bad")))
        delivery = self.deliver(service, RecordingDelivery)
        delivery.ack_error = RuntimeError("ack broken")
        self.bus.confirm()
        self.assertEqual(delivery.verdicts, ["requeue"])
        self.assertEqual(self.counts(service), {"requeued": 1})
        self.assertEqual(self.outcomes(), ["requeued"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_each_delivery_counted_once(self) -> None:
        """
        Over a mix of confirmed and refused copies, every delivery handed to
        the handler is counted under exactly one settled outcome, the one
        observers heard.
        """
        service = self.start(
            ScriptedHandler(Retry("a"), DeadLetter("b"), Retry("c"), DeadLetter("d"), None)
        )
        for n in range(5):
            self.deliver(service)
            if self.bus.copies:
                if n % 2:
                    self.bus.refuse(MessageNacked("nacked"))
                else:
                    self.bus.confirm()
        self.flushLoggedErrors(MessageNacked)
        self.assertEqual(
            self.counts(service), {"acked": 1, "retried": 2, "rejected": 2}
        )
        heard: dict[str, int] = {}
        for outcome in self.outcomes():
            heard[outcome] = heard.get(outcome, 0) + 1
        self.assertEqual(heard, self.counts(service))
        self.assertEqual(sum(self.counts(service).values()), service.stats["consumed"])

"""
Tests for L{fedhub.consumers.runner}: a stopping consumer waits for work whose
Deferred has fired but is paused on another one (a handler's
C{DeferredSemaphore.run}, a callback returning a Deferred), as for work whose
Deferred has not fired yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.consumers.runner import ConsumerService
from fedhub.errors import DeadLetter
from fedhub.interfaces import IMessageHandler
from fedhub.message import Message
from tests.test_consumer_runner import ConsumerCase, ScriptedHandler


def chained_on(inner: Deferred[Any]) -> Deferred[Any]:
    """
    A Deferred that has fired and waits, paused, for C{inner}.
    """
    outer: Deferred[Any] = succeed(None)
    outer.addCallback(lambda _: inner)
    assert outer.called and outer.paused
    return outer


@implementer(IMessageHandler)
class ChainedHandler:
    """
    A handler whose every call returns a fired Deferred paused on a pending
    one, which the test fires (C{inners}, in the order of the calls); it
    records when it is stopped.
    """

    topics = ("#",)

    def __init__(self, semaphore: DeferredSemaphore | None = None) -> None:
        self.semaphore = semaphore
        self.inners: list[Deferred[None]] = []
        self.seen: list[Message] = []
        self.stopped = False

    def handle(self, message: Message) -> Deferred[None]:
        self.seen.append(message)
        inner: Deferred[None] = Deferred()
        self.inners.append(inner)
        if self.semaphore is not None:
            # exec's shape: the semaphore's token is free, so the Deferred
            # has fired and waits on the run.
            return self.semaphore.run(lambda: inner)
        return chained_on(inner)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


class PausedCopiesBus(MemoryBus):
    """
    A memory bus whose publishes (the copies replacing a delivery) return a
    fired Deferred paused until the test opens C{gate}.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate: Deferred[None] = Deferred()

    def publish(
        self, message: Message, exchange: str | None = None, routing_key: str | None = None
    ) -> Deferred[None]:
        if exchange is None:
            return super().publish(message, exchange, routing_key)
        held: Deferred[None] = Deferred()
        self.gate.addCallback(
            lambda _: super(PausedCopiesBus, self).publish(message, exchange, routing_key).chainDeferred(held)
        )
        return chained_on(held)


class ChainedDrainTests(ConsumerCase):
    """
    A consumer on a memory bus whose time is a L{Clock}, its handler
    returning Deferreds paused on others.
    """

    def assert_stop_waits(
        self, service: ConsumerService, handler: Any, seconds: float, release: Callable[[], object]
    ) -> None:
        """
        Stopping C{service} is still waiting, its C{handler} not stopped,
        after C{seconds}; once C{release()} let the work settle, the stop
        ends and the handler is stopped.
        """
        stopped = service.stopService()
        self.flush(seconds)
        self.assertNoResult(stopped)
        self.assertFalse(handler.stopped)
        release()
        self.flush()
        self.successResultOf(stopped)
        self.assertTrue(handler.stopped)

    def test_stop_waits_for_a_paused_result(self) -> None:
        """Stopping waits for a handler's fired-but-paused Deferred, and stops the handler only once it settled."""
        handler = ChainedHandler()
        service = self.start(handler, drain_timeout=30)
        self.publish()
        self.assertEqual(len(handler.inners), 1)
        self.assert_stop_waits(service, handler, 10, lambda: handler.inners[0].callback(None))
        self.assertEqual(service.stats["acked"], 1)
        self.assertEqual(self.bus.queue_depth("fedhub.c") + self.bus.unacked("fedhub.c"), 0)

    def test_stop_waits_for_a_semaphore_run(self) -> None:
        """A handler returning DeferredSemaphore.run (exec's shape) is waited for like any call in hand."""
        handler = ChainedHandler(DeferredSemaphore(1))
        service = self.start(handler, drain_timeout=30)
        self.publish()
        self.assert_stop_waits(service, handler, 29, lambda: handler.inners[0].callback(None))
        self.assertEqual(service.stats["acked"], 1)

    def test_paused_result_bounded_by_drain_timeout(self) -> None:
        """A paused Deferred that never settles holds the stop only for drain_timeout; its message goes back."""
        handler = ChainedHandler()
        service = self.start(handler, drain_timeout=5)
        self.publish()
        stopped = service.stopService()
        self.flush(4.9)
        self.assertNoResult(stopped)
        self.assertFalse(handler.stopped)
        self.flush(0.1)
        self.successResultOf(stopped)
        self.assertTrue(handler.stopped)
        self.assertEqual(self.bus.queue_depth("fedhub.c"), 1)
        self.assertEqual(service.stats["acked"], 0)

    def test_paused_result_counts_in_flight(self) -> None:
        """A paused call counts in in_flight and takes a concurrency slot until it settles."""
        handler = ChainedHandler()
        service = self.start(handler, concurrency=1, prefetch=3)
        self.publish()
        self.publish()
        self.assertEqual(service.in_flight, 1)
        self.assertEqual(service.waiting, 1)
        self.assertEqual(len(handler.seen), 1)
        handler.inners[0].callback(None)
        self.flush()
        self.assertEqual(len(handler.seen), 2)
        self.assertEqual(service.in_flight, 1)
        self.assertEqual(service.waiting, 0)
        handler.inners[1].callback(None)
        self.flush()
        self.assertEqual(service.in_flight, 0)
        self.assertEqual(service.stats["acked"], 2)

    def test_stop_waits_for_a_paused_copy(self) -> None:
        """A dead-letter copy whose publish Deferred is paused is waited for before the handler stops."""
        bus = PausedCopiesBus("d", clock=self.clock)
        bus.startService()
        handler = ScriptedHandler(DeadLetter("not for us"))
        service = self.start(handler, bus=bus, drain_timeout=30)
        self.publish(bus=bus)
        self.assertEqual(service.in_flight, 0)
        self.assert_stop_waits(service, handler, 10, lambda: bus.gate.callback(None))
        self.assertEqual(service.stats["dead_lettered"], 1)
        self.assertEqual(bus.queue_depth("fedhub.c.dead"), 1)
        self.assertEqual(bus.queue_depth("fedhub.c") + bus.unacked("fedhub.c"), 0)

"""
The consumer runner: feeds one consumer plugin from its own queue.

Each consumer has its own durable queue in its domain (default name
C{fedhub.<consumer name>}), bound to the domain's exchange for the consumer's
topics, with a dead-letter queue beside it (C{<queue>.dead}, reached through
the default exchange).  A message is acknowledged only after the plugin's
result succeeded.  What happens otherwise:

  - L{Drop}: acknowledged, gone;
  - L{DeadLetter}, a body that fails its schema, and any other exception:
    rejected without requeue, so the broker moves it to the dead-letter queue;
  - L{Retry}: for now the same as L{DeadLetter} (delayed redelivery through
    retry queues is not built yet);
  - L{Halt}: returned to the queue, and this consumer stops consuming.

A plugin's failure is contained here: it never reaches the bus, the hub or
another consumer.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    fail,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from fedhub.config import ComponentConfig
from fedhub.errors import DeadLetter, Drop, Halt, Retry, SchemaValidationError
from fedhub.interfaces import IBus, IDelivery, IMessageHandler, ISubscription
from fedhub.message import Message
from fedhub.schema import SchemaRegistry, registry
from fedhub.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    DEFAULT_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
)


def call_handler(handler: IMessageHandler, message: Message) -> Deferred[Any]:
    """
    Call a plugin's C{handle} and return a Deferred of its result, whether it
    returned a value, a Deferred or a coroutine, or raised.
    """
    try:
        result = handler.handle(message)
    except BaseException:
        return fail()
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    if isinstance(result, Deferred):
        return result
    return succeed(result)


class ConsumerService(Service):
    """
    Runs one consumer: declares its queues, subscribes, hands each message to
    its handler and settles the delivery by the outcome.

    @ivar stats: Counters by outcome (C{consumed}, C{acked}, C{dropped},
        C{dead_lettered}, C{invalid}, C{failed}, C{requeued}).
    @ivar halted: Whether a L{Halt} verdict stopped it.
    """

    log = Logger()

    def __init__(
        self,
        component: ComponentConfig,
        handler: IMessageHandler,
        bus: IBus,
        clock: Any,
        *,
        schemas: SchemaRegistry = registry,
        drain_timeout: float = 30.0,
    ) -> None:
        self.component = component
        self.handler = handler
        self.bus = bus
        self.clock = clock
        self.schemas = schemas
        self.drain_timeout = drain_timeout
        self.queue = component.queue or f"fedhub.{component.name}"
        self.dead_letter_queue = f"{self.queue}.dead"
        self.topics = tuple(component.topics) or tuple(handler.topics)
        self.halted = False
        self.consuming = False
        self.stats = dict.fromkeys(
            ("consumed", "acked", "dropped", "dead_lettered", "invalid", "failed", "requeued"), 0
        )
        self._in_flight: set[Deferred[None]] = set()
        self._subscription: ISubscription | None = None
        self._starting: Deferred[None] | None = None

    def topology(self) -> Topology:
        """
        The queues and bindings this consumer needs.
        """
        return Topology(
            queues=(
                QueueSpec(self.dead_letter_queue),
                QueueSpec(
                    self.queue,
                    arguments={
                        DEAD_LETTER_EXCHANGE: DEFAULT_EXCHANGE,
                        DEAD_LETTER_ROUTING_KEY: self.dead_letter_queue,
                    },
                ),
            ),
            bindings=tuple(BindingSpec(self.queue, self.bus.exchange, t) for t in self.topics),
        )

    def startService(self) -> None:
        super().startService()
        self._starting = self._start()
        self._starting.addErrback(
            lambda f: self.log.failure(
                "Consumer {consumer} could not start", f, consumer=self.component.name
            )
        )

    @inlineCallbacks
    def _start(self) -> Iterator[Deferred[Any]]:
        yield maybeDeferred(self.handler.start)
        yield self.bus.declare(self.topology())
        if not self.running:
            return
        self._subscription = yield self.bus.subscribe(
            self.queue, self._on_delivery, max(1, self.component.concurrency)
        )
        self.consuming = True
        self.log.info(
            "Consumer {consumer} consumes {queue} for {topics}",
            consumer=self.component.name,
            queue=self.queue,
            topics=",".join(self.topics),
        )

    def _on_delivery(self, delivery: IDelivery) -> None:
        if self.halted or not self.running:
            delivery.reject(True)
            self.stats["requeued"] += 1
            return
        message = delivery.message
        self.stats["consumed"] += 1
        try:
            self.schemas.validate(message)
        except SchemaValidationError as e:
            self.stats["invalid"] += 1
            self.log.warn(
                "Consumer {consumer} dead-letters {msg_id} ({topic}): {reason}",
                consumer=self.component.name,
                msg_id=message.id,
                topic=message.topic,
                reason=str(e),
            )
            delivery.reject(False)
            return
        d = call_handler(self.handler, message)
        d.addCallbacks(self._succeeded, self._failed, (delivery,), None, (delivery,), None)
        d.addErrback(
            lambda f: self.log.failure("Settling {msg_id} failed", f, msg_id=message.id)
        )
        if not d.called:
            self._in_flight.add(d)
            d.addBoth(self._forget, d)

    def _forget(self, result: object, d: Deferred[None]) -> object:
        self._in_flight.discard(d)
        return result

    def _succeeded(self, result: object, delivery: IDelivery) -> None:
        delivery.ack()
        self.stats["acked"] += 1

    def _failed(self, failure: Failure, delivery: IDelivery) -> None:
        message = delivery.message
        fields = {"consumer": self.component.name, "msg_id": message.id, "topic": message.topic}
        verdict = failure.value
        if isinstance(verdict, Drop):
            self.log.info("Consumer {consumer} dropped {msg_id}: {reason}", reason=verdict.reason, **fields)
            delivery.ack()
            self.stats["dropped"] += 1
        elif isinstance(verdict, Halt):
            self.log.error(
                "Consumer {consumer} halts on {msg_id}: {reason}", reason=verdict.reason, **fields
            )
            delivery.reject(True)
            self.stats["requeued"] += 1
            self._halt()
        elif isinstance(verdict, (DeadLetter, Retry)):
            self.log.warn(
                "Consumer {consumer} dead-letters {msg_id}: {reason}", reason=verdict.reason, **fields
            )
            delivery.reject(False)
            self.stats["dead_lettered"] += 1
        else:
            self.log.failure(
                "Consumer {consumer} failed on {msg_id} ({topic}); dead-lettered",
                failure,
                **fields,
            )
            delivery.reject(False)
            self.stats["failed"] += 1
            self.stats["dead_lettered"] += 1

    def _halt(self) -> None:
        if self.halted:
            return
        self.halted = True
        self.consuming = False
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            subscription.cancel().addErrback(
                lambda f: self.log.failure("Cancelling {consumer} failed", f, consumer=self.component.name)
            )

    @inlineCallbacks
    def stopService(self) -> Iterator[Deferred[Any]]:
        super().stopService()
        self.consuming = False
        if self._in_flight:
            # Wait for the plugin's work, but not forever; what is still in
            # hand afterwards goes back to the queue when the channel closes.
            waiter: Deferred[bool] = Deferred()
            drained = DeferredList(list(self._in_flight), consumeErrors=True)
            drained.addBoth(lambda _: None if waiter.called else waiter.callback(True))
            timeout = self.clock.callLater(
                self.drain_timeout, lambda: None if waiter.called else waiter.callback(False)
            )
            finished = yield waiter
            if timeout.active():
                timeout.cancel()
            if not finished:
                self.log.warn(
                    "Consumer {consumer} stopped with {count} message(s) still in hand",
                    consumer=self.component.name,
                    count=len(self._in_flight),
                )
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            try:
                yield subscription.cancel()
            except Exception:
                self.log.failure("Cancelling {consumer} failed", consumer=self.component.name)
        try:
            yield maybeDeferred(self.handler.stop)
        except Exception:
            self.log.failure("Stopping consumer {consumer} failed", consumer=self.component.name)

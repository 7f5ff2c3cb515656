"""
The in-process bus: the transport of a domain that has no broker.

L{MemoryBus} emulates, inside one process, the parts of RabbitMQ that fedhub
relies on, so the hub, its plugins and their tests run on a machine without a
broker and behave as they would against RabbitMQ:

  - the exchanges RabbitMQ has from the start (C{""}, C{amq.topic},
    C{amq.direct}, C{amq.fanout}), declared C{topic}, C{direct} and
    C{fanout} exchanges, queues and bindings, with RabbitMQ's errors for
    inequivalent re-declarations (406), unknown names (404) and reserved
    names (403);
  - mandatory publishing with a confirm: the publish Deferred fires once the
    message is in every queue it routes to, and fails with
    L{MessageReturned} when it routes to none;
  - consumers with a prefetch limit, competing consumers served in turn,
    acknowledgement, requeueing (C{redelivered} set) and dead-lettering with
    RabbitMQ's C{x-death} and C{x-first-death-*} headers;
  - the queue arguments C{x-message-ttl}, C{x-dead-letter-exchange},
    C{x-dead-letter-routing-key} and C{x-max-length} (overflow C{drop-head}).

Memory is bounded: a queue holds at most C{max_queue_length} ready and
unacknowledged messages.  A publish that finds a target queue full waits (its
Deferred fires later, in publish order per queue): that is how this bus
pushes back on publishers.  When C{max_pending} publishes wait already, the
next one fails at once with L{TemporarilyUnavailable}.

What it does not do: messages never leave the process and are lost when it
exits; C{exclusive}, C{auto_delete}, C{x-expires}, C{x-queue-type} and other
arguments are accepted and have no effect; the queue name C{""} (a name
chosen by the broker) is refused; there is no per-message TTL, so C{x-death}
never carries C{original-expiration}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.errors import (
    AccessRefused,
    ChannelError,
    MessageError,
    MessageReturned,
    NotConnected,
    NotFound,
    PreconditionFailed,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IBus, IDelivery, ISubscription
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    DEFAULT_EXCHANGE,
    MAX_LENGTH,
    MESSAGE_TTL,
    QUEUE_TYPE,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Topology,
    topic_matches,
)

#: How many ready and unacknowledged messages one queue holds by default.
DEFAULT_MAX_QUEUE_LENGTH = 10_000
#: How many publishes may wait for room by default.
DEFAULT_MAX_PENDING = 1_000

#: The header RabbitMQ adds to dead-lettered messages, and its companions.
X_DEATH = "x-death"
X_FIRST_DEATH_EXCHANGE = "x-first-death-exchange"
X_FIRST_DEATH_QUEUE = "x-first-death-queue"
X_FIRST_DEATH_REASON = "x-first-death-reason"

#: Dead-letter reasons, as RabbitMQ names them.
REJECTED = "rejected"
EXPIRED = "expired"
MAXLEN = "maxlen"

#: A queue argument accepted for RabbitMQ's sake and ignored here.
EXPIRES = "x-expires"

#: The exchanges every RabbitMQ virtual host has, all durable.
_PREDECLARED = (
    ExchangeSpec(DEFAULT_EXCHANGE, "direct"),
    ExchangeSpec("amq.topic", "topic"),
    ExchangeSpec("amq.direct", "direct"),
    ExchangeSpec("amq.fanout", "fanout"),
)
_EXCHANGE_TYPES = frozenset({"topic", "direct", "fanout"})

#: The queue arguments RabbitMQ compares when a queue is declared again;
#: like RabbitMQ, other arguments are not compared.
_EQUIVALENCE_ARGUMENTS = (
    EXPIRES,
    MESSAGE_TTL,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    MAX_LENGTH,
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    QUEUE_TYPE,
    "x-delivery-limit",
    "x-quorum-initial-group-size",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-dead-letter-strategy",
    "x-max-age",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-queue-master-locator",
)

#: Deliveries made by one dispatch run before giving the reactor back.
_DISPATCH_BATCH = 500

_Verdict = bool | None  # None: ack; True: requeue; False: dead-letter


@dataclass(slots=True)
class _Entry:
    """
    One message held by one queue.

    @ivar exchange: The exchange it came in through.
    @ivar routing_key: The routing key it came in with.
    @ivar expires_at: When it expires (clock seconds), or C{None}.
    @ivar seq: Its place in the order messages entered the bus's queues; a
        requeued message goes back to its place by it.
    """

    message: Message
    exchange: str
    routing_key: str
    expires_at: float | None
    seq: int
    redelivered: bool = False


@dataclass(slots=True, eq=False)
class _Waiting:
    """
    A publish waiting for room in some of its target queues.

    @ivar remaining: How many target queues still have to take it.
    """

    message: Message
    exchange: str
    routing_key: str
    remaining: int
    deferred: Deferred[None]


@dataclass(slots=True, eq=False)
class _Exchange:
    """
    An exchange and its bindings, as (queue, routing key) pairs in binding order.
    """

    name: str
    type: str
    durable: bool
    bindings: dict[tuple[str, str], None]


class _Queue:
    """
    A queue: its settings, its ready messages, its consumers and the publishes
    waiting for room in it.
    """

    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.name = spec.name
        arguments = spec.arguments
        ttl = arguments.get(MESSAGE_TTL)
        self.ttl: float | None = None if ttl is None else ttl / 1000
        self.dead_letter_exchange: str | None = arguments.get(DEAD_LETTER_EXCHANGE)
        self.dead_letter_routing_key: str | None = arguments.get(DEAD_LETTER_ROUTING_KEY)
        self.max_length: int | None = arguments.get(MAX_LENGTH)
        self.ready: deque[_Entry] = deque()
        self.unacked = 0
        self.consumers: list[MemorySubscription] = []
        self.next_consumer = 0
        self.waiting: deque[_Waiting] = deque()
        self.dispatch_call: IDelayedCall | None = None
        self.ttl_call: IDelayedCall | None = None

    def has_room(self, limit: int) -> bool:
        """
        Whether one more message fits: below the bus's limit, or at the queue's
        own C{x-max-length} (which then drops its oldest message).
        """
        if len(self.ready) + self.unacked < limit:
            return True
        return self.max_length is not None and len(self.ready) >= self.max_length

    def next_free_consumer(self) -> MemorySubscription | None:
        """
        The next consumer in turn that may take another delivery, if any.
        """
        count = len(self.consumers)
        for offset in range(count):
            index = (self.next_consumer + offset) % count
            subscription = self.consumers[index]
            if subscription.has_capacity():
                self.next_consumer = index + 1
                return subscription
        return None


@implementer(IDelivery)
class MemoryDelivery:
    """
    A message delivered by a L{MemoryBus}, waiting for its verdict.

    @ivar message: The message, its C{queue} set.
    @ivar redelivered: Whether it was delivered (and requeued) before.
    @ivar queue: The queue it came from.
    """

    def __init__(
        self,
        bus: MemoryBus,
        subscription: MemorySubscription,
        tag: int,
        entry: _Entry,
        message: Message,
    ) -> None:
        self.message = message
        self.redelivered = entry.redelivered
        self.queue = subscription.queue
        self._bus = bus
        self._subscription = subscription
        self._tag = tag
        self._entry = entry

    @property
    def live(self) -> bool:
        """
        Whether a verdict would still count: none was given, the
        subscription is not cancelled and the bus did not stop since the
        delivery.
        """
        return self._subscription.unacked.get(self._tag) is self

    def ack(self) -> bool:
        """
        Remove the message from its queue.  Ignored after a first verdict,
        once its subscription is cancelled or once the bus stopped (then it
        returns C{False}).
        """
        return self._bus._settle(self._subscription, self._tag, None)

    def reject(self, requeue: bool) -> bool:
        """
        Put the message back in its queue at the place it had, ahead of the
        messages that were behind it (C{requeue}), or dead-letter it.
        Ignored after a first verdict, once its subscription is cancelled or
        once the bus stopped (then it returns C{False}).
        """
        return self._bus._settle(self._subscription, self._tag, bool(requeue))


@implementer(ISubscription)
class MemorySubscription:
    """
    A consumer of one queue of a L{MemoryBus}.  Like a subscription of an
    AMQP bus across a reconnect, it outlives a stop of its bus: it consumes
    again when the bus starts again, until cancelled.

    @ivar queue: The queue consumed from.
    @ivar prefetch: At most this many deliveries unacknowledged; 0 for no limit.
    """

    def __init__(
        self,
        bus: MemoryBus,
        queue: str,
        on_delivery: Callable[[IDelivery], object],
        prefetch: int,
    ) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.active = True
        self.unacked: dict[int, MemoryDelivery] = {}
        self._bus = bus

    @property
    def consuming(self) -> bool:
        """
        Whether deliveries can come now: not cancelled, on a running bus.
        """
        return self.active and bool(self._bus.running)

    def has_capacity(self) -> bool:
        """
        Whether it may take one more delivery now.
        """
        return self.active and (self.prefetch == 0 or len(self.unacked) < self.prefetch)

    def cancel(self) -> Deferred[None]:
        """
        Stop consuming; unacknowledged deliveries go back to their places
        in the queue, marked redelivered.

        @return: A Deferred that has fired: no delivery comes after this call.
        """
        self._bus._cancel(self)
        return succeed(None)


@implementer(IBus)
class MemoryBus(Service):
    """
    An in-process message bus for one domain, with RabbitMQ's semantics.

    Deliveries are always made from a call scheduled on the clock, never from
    within L{publish}, an acknowledgement or a rejection.  A subscriber that
    raises is logged and its delivery dead-lettered (rejected without requeue),
    so a faulty handler can neither stop the bus nor loop on one message.

    Queues, exchanges, bindings and subscriptions live as long as this object:
    they survive C{stopService} and C{startService}, as an AMQP bus declares
    and consumes again after a reconnect.  Declaring and subscribing work
    before the service starts and while it is stopped; publishing needs it
    running, and deliveries start with it.

    @ivar domain: The domain served.
    @ivar exchange: The exchange L{publish} uses by default.
    """

    log = HubLogger()

    def __init__(
        self,
        domain: str,
        exchange: str = "amq.topic",
        clock: IReactorTime | None = None,
        max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        """
        @param clock: Schedules deliveries and message expiry; the global
            reactor (imported when first needed) if C{None}.
        @param max_queue_length: At most this many ready and unacknowledged
            messages in one queue; a publish to a full queue waits.
        @param max_pending: At most this many publishes waiting for room; any
            more fail with L{TemporarilyUnavailable}.
        """
        if max_queue_length < 1:
            raise ValueError(f"max_queue_length must be at least 1, not {max_queue_length}")
        if max_pending < 0:
            raise ValueError(f"max_pending must not be negative, not {max_pending}")
        self.domain = domain
        self.exchange = exchange
        self._clock = clock
        self._max_queue_length = max_queue_length
        self._max_pending = max_pending
        self._exchanges: dict[str, _Exchange] = {
            spec.name: _Exchange(spec.name, spec.type, spec.durable, {}) for spec in _PREDECLARED
        }
        self._queues: dict[str, _Queue] = {}
        self._pending = 0
        self._next_tag = 0
        self._next_seq = 0
        self._confirms: list[Deferred[None]] = []
        self._confirm_call: IDelayedCall | None = None

    # --- service ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """
        Whether the bus takes messages: between C{startService} and C{stopService}.
        """
        return bool(self.running)

    def startService(self) -> None:
        """
        Start taking messages and making deliveries, to the subscriptions
        made before too (those not cancelled since).
        """
        Service.startService(self)  # type: ignore[no-untyped-call]
        self.log.warn(
            "Domain {domain} runs on the in-process memory bus: its messages do not "
            "leave this process and are lost when it exits",
            domain=self.domain,
        )
        for queue in self._queues.values():
            self._arm_expiry(queue)
            self._schedule_dispatch(queue)

    def stopService(self) -> Deferred[None]:
        """
        Stop: put every unacknowledged delivery back in its queue, marked
        redelivered (a verdict on it no longer counts, as on a closed AMQP
        channel), fail the publishes still waiting for room with
        L{NotConnected}, and stop every timer.  Queued messages and
        subscriptions stay for a later start: the subscriptions consume again
        then, and are not consuming until then.

        @return: A Deferred that has fired.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        waiting: dict[int, _Waiting] = {}
        for queue in self._queues.values():
            for subscription in queue.consumers:
                self._take_back(queue, subscription)
            for call in (queue.dispatch_call, queue.ttl_call):
                if call is not None and call.active():
                    call.cancel()
            queue.dispatch_call = queue.ttl_call = None
            for item in queue.waiting:
                waiting[id(item)] = item
            queue.waiting.clear()
        self._pending = 0
        if self._confirm_call is not None and self._confirm_call.active():
            self._confirm_call.cancel()
        self._fire_confirms()
        for item in waiting.values():
            item.deferred.errback(
                NotConnected(
                    f"the memory bus of domain {self.domain!r} stopped before the "
                    "message found room",
                    item.message.id,
                )
            )
        return succeed(None)

    # --- IBus -------------------------------------------------------------

    def declare(self, topology: Topology) -> Deferred[None]:
        """
        Create the exchanges, queues and bindings of C{topology} that do not
        exist yet, in that order; stop at the first error as RabbitMQ would.

        @return: A Deferred that has fired with C{None}, or failed with
            L{PreconditionFailed} (an inequivalent re-declaration or an invalid
            argument), L{NotFound} (a binding to an unknown exchange or queue)
            or L{AccessRefused} (a reserved name).
        """
        try:
            for exchange in topology.exchanges:
                self._declare_exchange(exchange)
            for queue in topology.queues:
                self._declare_queue(queue)
            for binding in topology.bindings:
                self._bind(binding)
        except ChannelError as e:
            return fail(e)
        return succeed(None)

    def publish(
        self,
        message: Message,
        exchange: str | None = None,
        routing_key: str | None = None,
    ) -> Deferred[None]:
        """
        Route C{message} to every queue it matches, once per queue.

        @param exchange: The exchange, default L{exchange}.
        @param routing_key: The routing key, default the message's topic.
        @return: A Deferred firing with C{None} once the message is in every
            target queue, which is later when one is full.  It fails with
            L{NotConnected} when the bus is not running, L{NotFound} for an
            unknown exchange, L{MessageReturned} when no queue matches and
            L{TemporarilyUnavailable} when too many publishes wait already.
        """
        if not self.running:
            return fail(
                NotConnected(f"the memory bus of domain {self.domain!r} is not running", message.id)
            )
        exchange_name = self.exchange if exchange is None else exchange
        key = message.topic if routing_key is None else routing_key
        target = self._exchanges.get(exchange_name)
        if target is None:
            return fail(NotFound(404, f"NOT_FOUND - no exchange {exchange_name!r}"))
        queues = self._route(target, key)
        if not queues:
            return fail(
                MessageReturned(
                    f"NO_ROUTE: no queue is bound to exchange {exchange_name!r} for "
                    f"routing key {key!r}",
                    message.id,
                )
            )
        blocked = [q for q in queues if q.waiting or not q.has_room(self._max_queue_length)]
        if not blocked:
            for queue in queues:
                self._enqueue(queue, message, exchange_name, key)
            return succeed(None)
        if self._pending >= self._max_pending:
            return fail(
                TemporarilyUnavailable(
                    f"the memory bus of domain {self.domain!r} has {self._pending} publishes "
                    "waiting for room in full queues",
                    message.id,
                )
            )
        item = _Waiting(message, exchange_name, key, len(blocked), Deferred())
        self._pending += 1
        for queue in queues:
            if any(queue is b for b in blocked):
                queue.waiting.append(item)
            else:
                self._enqueue(queue, message, exchange_name, key)
        return item.deferred

    def subscribe(
        self,
        queue: str,
        on_delivery: Callable[[IDelivery], object],
        prefetch: int,
    ) -> Deferred[ISubscription]:
        """
        Consume from C{queue}; several subscriptions on one queue are served
        in turn.

        @param on_delivery: Called with a L{MemoryDelivery} for each message,
            from a call scheduled on the clock.
        @param prefetch: At most this many deliveries unacknowledged at once;
            0 means no limit, as in AMQP.
        @return: A Deferred firing with a L{MemorySubscription}, or failing
            with L{NotFound} for an unknown queue.
        """
        if prefetch < 0:
            return fail(ValueError(f"prefetch must not be negative, not {prefetch}"))
        found = self._queues.get(queue)
        if found is None:
            return fail(NotFound(404, f"NOT_FOUND - no queue {queue!r}"))
        subscription = MemorySubscription(self, queue, on_delivery, prefetch)
        found.consumers.append(subscription)
        self._schedule_dispatch(found)
        return succeed(subscription)

    # --- inspection -------------------------------------------------------

    def queue_depth(self, name: str) -> int:
        """
        How many messages of queue C{name} are ready for delivery.

        @raise NotFound: for an unknown queue.
        """
        return len(self._queue(name).ready)

    def unacked(self, name: str) -> int:
        """
        How many messages of queue C{name} are delivered and not yet settled.

        @raise NotFound: for an unknown queue.
        """
        return self._queue(name).unacked

    def pending(self) -> int:
        """
        How many publishes are waiting for room in a full queue.
        """
        return self._pending

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound(404, f"NOT_FOUND - no queue {name!r}")
        return queue

    # --- topology ---------------------------------------------------------

    def _declare_exchange(self, spec: ExchangeSpec) -> None:
        existing = self._exchanges.get(spec.name)
        if existing is None:
            if spec.name.startswith("amq."):
                raise AccessRefused(
                    403, f"ACCESS_REFUSED - exchange name {spec.name!r} uses the reserved prefix 'amq.'"
                )
            if spec.type not in _EXCHANGE_TYPES:
                raise PreconditionFailed(
                    406,
                    f"PRECONDITION_FAILED - the memory bus knows no exchange type {spec.type!r} "
                    f"(only {', '.join(sorted(_EXCHANGE_TYPES))})",
                )
            self._exchanges[spec.name] = _Exchange(spec.name, spec.type, spec.durable, {})
            return
        if spec.name == DEFAULT_EXCHANGE:
            raise AccessRefused(403, "ACCESS_REFUSED - operation not permitted on the default exchange")
        for what, received, current in (
            ("type", spec.type, existing.type),
            ("durable", spec.durable, existing.durable),
        ):
            if received != current:
                raise PreconditionFailed(
                    406,
                    f"PRECONDITION_FAILED - inequivalent arg {what!r} for exchange "
                    f"{spec.name!r}: received {received!r} but current is {current!r}",
                )

    def _declare_queue(self, spec: QueueSpec) -> None:
        if not spec.name:
            raise PreconditionFailed(
                406, "PRECONDITION_FAILED - the memory bus does not generate queue names"
            )
        existing = self._queues.get(spec.name)
        if existing is None:
            if spec.name.startswith("amq."):
                raise AccessRefused(
                    403, f"ACCESS_REFUSED - queue name {spec.name!r} uses the reserved prefix 'amq.'"
                )
            _check_arguments(spec)
            self._queues[spec.name] = _Queue(spec)
            return
        problem = _inequivalence(existing.spec, spec)
        if problem is not None:
            raise PreconditionFailed(406, f"PRECONDITION_FAILED - {problem}")

    def _bind(self, spec: BindingSpec) -> None:
        exchange = self._exchanges.get(spec.exchange)
        if exchange is None:
            raise NotFound(404, f"NOT_FOUND - no exchange {spec.exchange!r}")
        if spec.queue not in self._queues:
            raise NotFound(404, f"NOT_FOUND - no queue {spec.queue!r}")
        if exchange.name == DEFAULT_EXCHANGE:
            raise AccessRefused(403, "ACCESS_REFUSED - operation not permitted on the default exchange")
        exchange.bindings[(spec.queue, spec.routing_key)] = None

    def _route(self, exchange: _Exchange, routing_key: str) -> list[_Queue]:
        if exchange.name == DEFAULT_EXCHANGE:
            queue = self._queues.get(routing_key)
            return [] if queue is None else [queue]
        found: dict[str, _Queue] = {}
        for queue_name, pattern in exchange.bindings:
            if queue_name in found:
                continue
            if exchange.type == "topic":
                matched = topic_matches(pattern, routing_key)
            elif exchange.type == "direct":
                matched = pattern == routing_key
            else:
                matched = True
            if matched:
                found[queue_name] = self._queues[queue_name]
        return list(found.values())

    # --- queues -----------------------------------------------------------

    def _reactor(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    def _enqueue(self, queue: _Queue, message: Message, exchange: str, routing_key: str) -> None:
        """
        Append a message to a queue, applying its TTL and length limit.
        """
        expires_at = None
        if queue.ttl is not None:
            expires_at = self._reactor().seconds() + queue.ttl
        self._next_seq += 1
        queue.ready.append(_Entry(message, exchange, routing_key, expires_at, self._next_seq))
        if queue.max_length is not None:
            while len(queue.ready) > queue.max_length:
                self._dead_letter(queue, queue.ready.popleft(), MAXLEN)
        self._arm_expiry(queue)
        self._schedule_dispatch(queue)

    def _admit(self, queue: _Queue) -> None:
        """
        Let waiting publishes into a queue that has room again, oldest first.
        """
        while queue.waiting and queue.has_room(self._max_queue_length):
            item = queue.waiting.popleft()
            self._enqueue(queue, item.message, item.exchange, item.routing_key)
            item.remaining -= 1
            if item.remaining == 0:
                self._pending -= 1
                self._confirm(item.deferred)

    def _confirm(self, deferred: Deferred[None]) -> None:
        # Fired from the clock, so a publisher's callbacks never run inside an
        # acknowledgement made by some consumer.
        self._confirms.append(deferred)
        if self._confirm_call is None:
            self._confirm_call = self._reactor().callLater(0, self._fire_confirms)

    def _fire_confirms(self) -> None:
        self._confirm_call = None
        confirms, self._confirms = self._confirms, []
        for deferred in confirms:
            deferred.callback(None)

    def _arm_expiry(self, queue: _Queue) -> None:
        """
        Make sure a timer runs when the message at the head of a queue with a
        TTL expires.  Like RabbitMQ, only the head expires; with one TTL per
        queue the head is the oldest message anyway.
        """
        if queue.ttl is None or not queue.ready or not self.running:
            return
        expires_at = queue.ready[0].expires_at
        if expires_at is None:
            return
        call = queue.ttl_call
        if call is not None and call.active():
            if call.getTime() <= expires_at:
                return
            call.cancel()
        clock = self._reactor()
        queue.ttl_call = clock.callLater(max(0.0, expires_at - clock.seconds()), self._on_expiry, queue)

    def _on_expiry(self, queue: _Queue) -> None:
        queue.ttl_call = None
        self._expire(queue)
        self._arm_expiry(queue)

    def _expire(self, queue: _Queue) -> None:
        if queue.ttl is None:
            return
        now = self._reactor().seconds()
        expired = False
        while queue.ready:
            expires_at = queue.ready[0].expires_at
            if expires_at is None or expires_at > now:
                break
            self._dead_letter(queue, queue.ready.popleft(), EXPIRED)
            expired = True
        if expired:
            self._admit(queue)

    def _dead_letter(self, queue: _Queue, entry: _Entry, reason: str) -> None:
        """
        Republish a message leaving C{queue} to its dead-letter exchange, with
        C{x-death} updated; without one, the message is dropped.

        Dead letters bypass waiting publishes; one that finds its target queue
        full is dropped with a warning, as RabbitMQ's dead-lettering is
        at-most-once too.  Like RabbitMQ, a message that would go round a
        cycle of queues with no rejection in it is dropped.
        """
        if queue.dead_letter_exchange is None:
            return
        exchange = self._exchanges.get(queue.dead_letter_exchange)
        if exchange is None:
            self.log.warn(
                "Dead letter {msg_id} from queue {queue} dropped: its dead-letter exchange "
                "{exchange} does not exist",
                msg_id=entry.message.id,
                topic=entry.message.topic,
                queue=queue.name,
                exchange=queue.dead_letter_exchange,
                domain=self.domain,
            )
            return
        routing_key = queue.dead_letter_routing_key
        if routing_key is None:
            routing_key = entry.routing_key
        when = datetime.fromtimestamp(int(self._reactor().seconds()), timezone.utc)
        message = record_death(entry.message, queue.name, reason, entry.exchange, entry.routing_key, when)
        deaths = message.headers[X_DEATH]
        for target in self._route(exchange, routing_key):
            if reason != REJECTED and _is_cycle(target.name, deaths):
                self.log.warn(
                    "Dead letter {msg_id} dropped: it would cycle back to queue {queue} "
                    "with no rejection on the way",
                    msg_id=message.id,
                    topic=message.topic,
                    queue=target.name,
                    domain=self.domain,
                )
                continue
            if target.waiting or not target.has_room(self._max_queue_length):
                self.log.warn(
                    "Dead letter {msg_id} dropped: queue {queue} is full",
                    msg_id=message.id,
                    topic=message.topic,
                    queue=target.name,
                    domain=self.domain,
                )
                continue
            self._enqueue(target, message, exchange.name, routing_key)

    # --- consumers --------------------------------------------------------

    def _schedule_dispatch(self, queue: _Queue) -> None:
        if queue.dispatch_call is None and self.running and queue.consumers and queue.ready:
            queue.dispatch_call = self._reactor().callLater(0, self._dispatch, queue)

    def _dispatch(self, queue: _Queue) -> None:
        queue.dispatch_call = None
        self._expire(queue)
        delivered = 0
        while self.running and queue.ready and delivered < _DISPATCH_BATCH:
            subscription = queue.next_free_consumer()
            if subscription is None:
                return
            entry = queue.ready.popleft()
            queue.unacked += 1
            self._next_tag += 1
            delivery = MemoryDelivery(
                self, subscription, self._next_tag, entry, _delivered(entry, queue.name)
            )
            subscription.unacked[self._next_tag] = delivery
            delivered += 1
            self._hand_over(subscription, delivery)
        self._schedule_dispatch(queue)

    def _hand_over(self, subscription: MemorySubscription, delivery: MemoryDelivery) -> None:
        """
        Call a subscriber, containing its failures.
        """
        fields: dict[str, Any] = {
            "msg_id": delivery.message.id,
            "topic": delivery.message.topic,
            "queue": delivery.queue,
            "domain": self.domain,
        }
        try:
            result = subscription.on_delivery(delivery)
        except Exception:
            self.log.failure(
                "Subscriber of queue {queue} raised on message {msg_id}; the message is "
                "dead-lettered (rejected without requeue)",
                level=LogLevel.error,
                **fields,
            )
            delivery.reject(requeue=False)
            return
        if isinstance(result, Deferred):

            def logged(failure: Failure) -> None:
                self.log.failure(
                    "Subscriber of queue {queue} failed asynchronously on message {msg_id}",
                    failure,
                    level=LogLevel.error,
                    **fields,
                )

            result.addErrback(logged)

    def _settle(self, subscription: MemorySubscription, tag: int, verdict: _Verdict) -> bool:
        delivery = subscription.unacked.pop(tag, None)
        if delivery is None:
            return False
        queue = self._queues[subscription.queue]
        queue.unacked -= 1
        entry = delivery._entry
        if verdict is True:
            _put_back(queue, entry)
            self._arm_expiry(queue)
        else:
            if verdict is False:
                self._dead_letter(queue, entry, REJECTED)
            self._admit(queue)
        self._schedule_dispatch(queue)
        return True

    def _cancel(self, subscription: MemorySubscription) -> None:
        if not subscription.active:
            return
        subscription.active = False
        queue = self._queues[subscription.queue]
        index = queue.consumers.index(subscription)
        del queue.consumers[index]
        if queue.next_consumer > index:
            queue.next_consumer -= 1
        self._take_back(queue, subscription)
        self._arm_expiry(queue)
        self._schedule_dispatch(queue)

    @staticmethod
    def _take_back(queue: _Queue, subscription: MemorySubscription) -> None:
        """
        Put the unacknowledged deliveries of C{subscription} back in C{queue},
        marked redelivered; verdicts on them no longer count.
        """
        returned = list(subscription.unacked.values())
        subscription.unacked.clear()
        queue.unacked -= len(returned)
        for delivery in reversed(returned):
            _put_back(queue, delivery._entry)


def _put_back(queue: _Queue, entry: _Entry) -> None:
    """
    Return a delivered message to its queue, marked redelivered, at the place
    it had: like RabbitMQ, several requeued messages come back in their
    original order, whatever the order of their rejections, ahead of the
    messages that were behind them.
    """
    entry.redelivered = True
    ready = queue.ready
    # Requeued messages gather at the head, so the search ends early.
    index = 0
    for index, other in enumerate(ready):
        if other.seq > entry.seq:
            break
    else:
        index = len(ready)
    ready.insert(index, entry)


def _delivered(entry: _Entry, queue: str) -> Message:
    """
    The message as a consumer sees it: from its queue, flagged redelivered or
    not, and with the routing key it came in with as its topic, since that is
    all the AMQP wire carries.
    """
    message = entry.message
    if entry.routing_key != message.topic:
        try:
            return message.evolve(
                queue=queue, topic=entry.routing_key, redelivered=entry.redelivered
            )
        except MessageError:
            pass
    return message.evolve(queue=queue, redelivered=entry.redelivered)


def record_death(
    message: Message,
    queue: str,
    reason: str,
    exchange: str,
    routing_key: str,
    when: datetime,
) -> Message:
    """
    Return C{message} with its dead-lettering recorded as RabbitMQ records it.

    C{x-death} is a list of tables, most recent first, one per (queue,
    reason): C{count}, C{reason}, C{queue}, C{time}, C{exchange} and
    C{routing-keys}.  A repeated (queue, reason) has its count incremented and
    moves to the front, keeping its other fields.  C{x-first-death-exchange},
    C{-queue} and C{-reason} are set on the first death only.

    @param exchange: The exchange the message had come in through.
    @param routing_key: The routing key it had come in with.
    @param when: The time of death (aware, whole seconds).
    """
    headers = dict(message.headers)
    old = headers.get(X_DEATH)
    deaths: list[dict[str, Any]] = []
    if isinstance(old, list):
        deaths = [dict(item) for item in old if isinstance(item, Mapping)]
    for index, death in enumerate(deaths):
        if death.get("queue") == queue and death.get("reason") == reason:
            del deaths[index]
            count = death.get("count")
            death["count"] = count + 1 if isinstance(count, int) else 1
            deaths.insert(0, death)
            break
    else:
        deaths.insert(
            0,
            {
                "count": 1,
                "reason": reason,
                "queue": queue,
                "time": when,
                "exchange": exchange,
                "routing-keys": [routing_key],
            },
        )
    headers[X_DEATH] = deaths
    if X_FIRST_DEATH_REASON not in headers:
        headers[X_FIRST_DEATH_EXCHANGE] = exchange
        headers[X_FIRST_DEATH_QUEUE] = queue
        headers[X_FIRST_DEATH_REASON] = reason
    return message.evolve(headers=headers, queue=None, redelivered=False)


def _is_cycle(queue: str, deaths: list[Mapping[str, Any]]) -> bool:
    """
    Whether a dead letter going to C{queue} would complete a cycle: C{queue}
    is among its deaths with no rejection more recent than that.
    """
    for death in deaths:
        if death.get("reason") == REJECTED:
            return False
        if death.get("queue") == queue:
            return True
    return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(spec: QueueSpec) -> None:
    """
    Refuse queue arguments RabbitMQ would refuse, with a 406 as it does.
    """
    arguments = spec.arguments

    def invalid(name: str, why: str) -> PreconditionFailed:
        return PreconditionFailed(
            406,
            f"PRECONDITION_FAILED - invalid arg {name!r} for queue {spec.name!r}: "
            f"{arguments[name]!r} {why}",
        )

    for name, minimum in ((MESSAGE_TTL, 0), (MAX_LENGTH, 0), (EXPIRES, 1)):
        if name in arguments:
            value = arguments[name]
            if not _is_int(value):
                raise invalid(name, "is not an integer")
            if value < minimum:
                raise invalid(name, f"is below {minimum}")
    for name in (DEAD_LETTER_EXCHANGE, DEAD_LETTER_ROUTING_KEY, QUEUE_TYPE):
        if name in arguments and not isinstance(arguments[name], str):
            raise invalid(name, "is not a string")
    if DEAD_LETTER_ROUTING_KEY in arguments and DEAD_LETTER_EXCHANGE not in arguments:
        raise PreconditionFailed(
            406,
            f"PRECONDITION_FAILED - invalid arg {DEAD_LETTER_ROUTING_KEY!r} for queue "
            f"{spec.name!r}: {DEAD_LETTER_EXCHANGE!r} is not set",
        )


def _same(a: object, b: object) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _inequivalence(current: QueueSpec, received: QueueSpec) -> str | None:
    """
    Why a queue declared again differs from the existing one, or C{None}.
    """
    for flag in ("durable", "exclusive", "auto_delete"):
        then, now = getattr(current, flag), getattr(received, flag)
        if then != now:
            return (
                f"inequivalent arg {flag!r} for queue {received.name!r}: received "
                f"{now!r} but current is {then!r}"
            )
    missing = object()
    for name in _EQUIVALENCE_ARGUMENTS:
        then = current.arguments.get(name, missing)
        now = received.arguments.get(name, missing)
        if then is missing and now is missing:
            continue
        if name == QUEUE_TYPE and all(v is missing or v == "classic" for v in (then, now)):
            # RabbitMQ takes a classic queue declared with the type
            # "classic" and one declared without a type as the same.
            continue
        if then is missing or now is missing or not _same(then, now):
            shown_now = "none" if now is missing else repr(now)
            shown_then = "none" if then is missing else repr(then)
            return (
                f"inequivalent arg {name!r} for queue {received.name!r}: received "
                f"{shown_now} but current is {shown_then}"
            )
    return None

"""
The consumer runner: feeds one consumer plugin from its own queue.

Each consumer C{Q} (default name C{fedhub.<consumer name>}) has this
topology in its domain, all durable, all fanout exchanges so a message keeps
its routing key (its topic) wherever it goes:

  - queue C{Q}, bound to the domain's exchange for the consumer's topics; its
    dead-letter exchange is C{Q.dead};
  - exchange and queue C{Q.dead}: messages that will not be handled;
  - exchange and queue C{Q.retry.N} for N = 1..max_retries: a message waits
    there C{retry_delay * 2**(N-1)} seconds (capped at C{max_retry_delay}),
    then expires into exchange C{Q.return}, which feeds C{Q} again.

A message is acknowledged only after the plugin's result succeeded, or after
the copy that replaces it (in a retry or dead-letter queue) was confirmed by
the broker.  What happens otherwise:

  - L{Retry}: a copy goes to the next retry queue; the number of earlier
    attempts is counted from the C{x-death} header the broker maintains.
    Past C{max_retries} the message is dead-lettered;
  - L{Drop}: acknowledged, gone;
  - L{DeadLetter}: a copy with the reason in header C{fedhub_dead_letter_reason}
    goes to C{Q.dead};
  - L{Halt}: returned to the queue, and this consumer stops consuming;
  - L{NotHandled}: returned to the queue at once (a handler giving back a
    call the consumer abandoned, or one it will not begin while stopping);
  - a body that fails its schema: dead-lettered with the reason;
  - a message delivered more than C{max_deliveries} times without a verdict
    reaching the broker (its channel closed first: the broker's consumer
    timeout, lost connections): dead-lettered with the reason instead of
    handled again;
  - any other exception: the consumer's C{on_error} policy, by default
    C{"retry"} (retry with backoff, then dead-letter).

A plugin's failure is contained here: it never reaches the bus, the hub or
another consumer.
"""

from __future__ import annotations

import inspect
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError as StopTimedOut,
    ensureDeferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from fedhub.config import ComponentConfig
from fedhub.consumers.blocking import BlockingCalls
from fedhub.errors import (
    ConfigError,
    DeadLetter,
    Drop,
    FedhubError,
    Halt,
    NotHandled,
    Retry,
    SchemaValidationError,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IBus, IDelivery, IMessageHandler, ISubscription
from fedhub.latch import Latch
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.schema import SchemaRegistry, registry
from fedhub.text import escape_control
from fedhub.topology import (
    DEAD_LETTER_EXCHANGE,
    MESSAGE_TTL,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Topology,
)
from fedhub.waiting import with_timeout

#: Queue arguments that apply to the consumer's queue alone, not to its
#: retry and dead-letter queues: a full retry queue dead-letters its oldest
#: message straight back to the consumer's queue, with no wait and no
#: retry counted (a tight loop), and a full dead-letter queue drops the
#: oldest dead letter.
MAIN_QUEUE_ONLY = frozenset({"x-max-length", "x-max-length-bytes", "x-overflow"})

#: The header a dead-lettered copy carries its reason in.
DEAD_LETTER_REASON_HEADER = "fedhub_dead_letter_reason"

#: What a consumer does with a message whose handler raised an exception
#: that is no verdict.
ERROR_POLICIES = ("retry", "dead-letter", "drop", "halt")


#: Seconds a delivery is held before it goes back to its queue, when the
#: copy replacing it (for a retry or a dead-letter) could not be published
#: for a passing reason (the publish channel or the connection went away):
#: handled again at once, the message would find the publish side no better.
TRANSIENT_REQUEUE_DELAY = 1.0


#: The level at the end of a retry queue's name.
_LEVEL = re.compile(r"[1-9][0-9]*")


def attempts_from(message: Message, retry_prefix: str) -> int:
    """
    How often a message went through retry queues whose names start with
    C{retry_prefix}, counted from its C{x-death} header.
    """
    deaths = message.headers.get("x-death")
    if not isinstance(deaths, list):
        return 0
    total = 0
    for death in deaths:
        if not isinstance(death, dict):
            continue
        queue, count = death.get("queue"), death.get("count")
        if (
            isinstance(queue, str)
            and queue.startswith(retry_prefix)
            # Only this consumer's retry queues (the prefix and a level):
            # another consumer's queue name may start like them.
            and _LEVEL.fullmatch(queue, len(retry_prefix)) is not None
            and death.get("reason") == "expired"
            and isinstance(count, int)
            and not isinstance(count, bool)
            # The header comes with the message: a count below zero is no
            # death, and must not buy retries.
            and count > 0
        ):
            total += count
    return total


def consumer_queues(component: ComponentConfig) -> tuple[str, str, str]:
    """
    The names of a consumer's queue C{Q} (its C{queue} key, by default
    C{fedhub.<name>}), of its dead-letter queue C{Q.dead} and of its return
    exchange C{Q.return}, which feeds C{Q}.
    """
    queue = component.queue or f"fedhub.{component.name}"
    return queue, f"{queue}.dead", f"{queue}.return"


def retry_delays_for(retry_delay: float, max_retry_delay: float, max_retries: int) -> tuple[float, ...]:
    """
    The wait of each retry queue, in seconds: C{retry_delay} doubling with
    each retry, at most C{max_retry_delay}.
    """
    return tuple(min(max_retry_delay, retry_delay * 2**level) for level in range(max_retries))


def consumer_topology(component: ComponentConfig, retry_delays: Sequence[float] | None = None
                      ) -> Topology:
    """
    A consumer's own exchanges, queues and the bindings between them (not
    those of its topics), as the hub declares them (see the module's
    docstring).

    @param retry_delays: The wait of each retry queue; by default the
        component's (L{retry_delays_for}).
    """
    if retry_delays is None:
        retry_delays = retry_delays_for(
            component.retry_delay, component.max_retry_delay, component.max_retries
        )
    queue, dead, back = consumer_queues(component)
    # The configured arguments (a queue type, say) apply to every queue
    # of the consumer, except length limits: they are the consumer
    # queue's alone (see MAIN_QUEUE_ONLY).  The arguments the retry design
    # needs come on top.
    extra = dict(component.queue_arguments)
    kept = {key: value for key, value in extra.items() if key not in MAIN_QUEUE_ONLY}
    exchanges = [ExchangeSpec(dead, "fanout"), ExchangeSpec(back, "fanout")]
    queues = [
        QueueSpec(dead, arguments=kept),
        QueueSpec(queue, arguments={**extra, DEAD_LETTER_EXCHANGE: dead}),
    ]
    bindings = [BindingSpec(dead, dead, ""), BindingSpec(queue, back, "")]
    for level, delay in enumerate(retry_delays, 1):
        name = f"{queue}.retry.{level}"
        exchanges.append(ExchangeSpec(name, "fanout"))
        queues.append(
            QueueSpec(
                name,
                arguments={**kept, MESSAGE_TTL: int(delay * 1000), DEAD_LETTER_EXCHANGE: back},
            )
        )
        bindings.append(BindingSpec(name, name, ""))
    return Topology(tuple(exchanges), tuple(queues), tuple(bindings))


def gave_up(attempts: int, reason: str) -> str:
    """
    The reason a message whose retries are used up is dead-lettered with.
    """
    return f"gave up after {attempts} retries; last: {reason}"


#: Redelivered messages a consumer counts the deliveries of, at most.
_TRACKED = 10_000

#: The prefetch of a consumer whose configuration leaves it open, unless its
#: handler is C{long_running} or its concurrency is higher: fedora-messaging's
#: default prefetch count, with which it too handles one message at a time.
DEFAULT_PREFETCH = 10


#: Seconds between two looks, while handler calls are in progress, for
#: calls whose delivery's channel closed, so that a handler with an
#: C{abandon} method hears of them soon even when no delivery comes (the
#: connection is still down) and no other call ends.
ORPHAN_CHECK_INTERVAL = 1.0

#: Seconds a consumer whose start failed waits before trying again: this
#: after the first failure, doubling after each further one...
START_RETRY_INITIAL = 1.0
#: ... up to this.
START_RETRY_MAX = 60.0

#: Seconds a plugin's C{start()} may take before the consumer says, in its
#: log and its C{start_error}, that it is still waiting for it.
START_SLOW = 30.0


#: Seconds a stopping or halting consumer waits, once its messages in hand
#: have settled (or its C{drain_timeout} passed), for its bus to say that
#: nothing more will be delivered (on AMQP the C{basic.cancel-ok} answering
#: the C{basic.cancel} it sent first) before it ends its subscription
#: anyway.  The hub counts it in the time it gives a consumer to stop
#: (L{fedhub.hub.stop_timeout}).
CANCEL_TIMEOUT: Final = 5.0


class _Late(Exception):
    """
    What a consumer waited for did not end within its time.
    """


def start_delay(failures: int) -> float:
    """
    How long a consumer waits before it tries to start again after
    C{failures} failed attempts in a row (1 for the first): from
    L{START_RETRY_INITIAL}, doubling, at most L{START_RETRY_MAX}.
    """
    return min(START_RETRY_MAX, START_RETRY_INITIAL * 2.0 ** min(max(0, failures - 1), 32))


def prefetch_for(component: ComponentConfig, handler: object) -> int:
    """
    How many messages a consumer holds unacknowledged: its configured
    C{prefetch}; otherwise its C{concurrency}, raised to L{DEFAULT_PREFETCH}
    unless the handler says its messages may take long (a true
    C{long_running} attribute, as C{exec}'s).

    Holding a few messages beyond those in hand lets a consumer catch up
    after a pause (a busy machine, a slow broker) at the speed of its
    handler rather than at one round trip to the broker per message.  But a
    message waiting behind one that takes minutes would wait that long
    unacknowledged, towards the broker's C{consumer_timeout}; so a
    long-running handler holds only what it handles.
    """
    concurrency = max(1, component.concurrency)
    if component.prefetch:
        return max(concurrency, component.prefetch)
    if getattr(handler, "long_running", False):
        return concurrency
    return max(concurrency, DEFAULT_PREFETCH)


@dataclass(frozen=True)
class Settled:
    """
    What became of one delivery, as told to a consumer's observers.

    @ivar message: The message.
    @ivar outcome: C{"acked"}, C{"dropped"}, C{"retried"}, C{"dead_lettered"},
        C{"requeued"} (a L{Halt}, or the copy replacing it could not be
        published for a passing reason) or C{"rejected"} (the replacing copy
        was refused; the broker dead-letters the original).
    @ivar reason: Why, for every outcome but C{"acked"}.
    @ivar handling: Seconds from the call of the handler until its result
        was known, or C{None} when the handler was not called (an invalid
        message, or one requeued because the consumer was stopping).
    """

    message: Message
    outcome: str
    reason: str | None = None
    handling: float | None = None


class ConsumerService(Service):
    """
    Runs one consumer: declares its queues, subscribes, hands each message to
    its handler and settles the delivery by the outcome.

    @ivar stats: Counters: C{consumed}, C{invalid} and C{failed} as
        deliveries come and handlers end; then each delivery once, by the
        L{Settled} outcome its verdict reached the broker with (C{acked},
        C{dropped}, C{retried}, C{dead_lettered}, C{rejected}, C{requeued}),
        or as C{unsettled}: verdicts the bus dropped because the delivery's
        channel was gone (the broker delivers those messages again).  A
        delivery replaced by a copy counts as C{retried} or
        C{dead_lettered} only once the broker confirmed the copy and the
        original was acknowledged; as C{rejected} when the copy failed.
    @ivar halted: Whether a L{Halt} verdict stopped it.
    @ivar in_flight: Handler calls started and not finished.
    @ivar concurrency: At most this many handler calls at once.
    @ivar prefetch: At most this many messages unacknowledged (L{prefetch_for});
        those beyond C{concurrency} wait in order for a handler call to end.
    @ivar blocking: Times the calls into the plugin, and counts and logs
        those that held the event loop longer than C{blocking_warning}
        (L{fedhub.consumers.blocking}).
    """

    log = HubLogger()

    def __init__(
        self,
        component: ComponentConfig,
        handler: IMessageHandler,
        bus: IBus,
        clock: Any,
        *,
        schemas: SchemaRegistry = registry,
        drain_timeout: float | None = None,
        retry_delay: float | None = None,
        max_retry_delay: float | None = None,
        max_retries: int | None = None,
        on_error: str | None = None,
        max_deliveries: int | None = None,
        blocking_warning: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        The failure-policy settings and C{blocking_warning} default to the
        component's configuration.

        @param monotonic: The clock the calls into the plugin are timed with
            (see L{BlockingCalls}).
        """
        drain_timeout = component.drain_timeout if drain_timeout is None else drain_timeout
        retry_delay = component.retry_delay if retry_delay is None else retry_delay
        max_retry_delay = component.max_retry_delay if max_retry_delay is None else max_retry_delay
        max_retries = component.max_retries if max_retries is None else max_retries
        on_error = component.on_error if on_error is None else on_error
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")
        self.blocking = BlockingCalls(
            component.name,
            component.blocking_warning if blocking_warning is None else blocking_warning,
            clock,
            monotonic,
        )
        self.component = component
        self.handler = handler
        self.bus = bus
        self.clock = clock
        self.schemas = schemas
        self.drain_timeout = drain_timeout
        self.queue, self.dead_letter_queue, self.return_exchange = consumer_queues(component)
        self.retry_prefix = f"{self.queue}.retry."
        self.retry_delays = retry_delays_for(retry_delay, max_retry_delay, max_retries)
        self.on_error = on_error
        self.max_deliveries = component.max_deliveries if max_deliveries is None else max_deliveries
        # Deliveries seen of messages that came back redelivered, by id,
        # until a verdict on them reaches the broker.
        self._deliveries: OrderedDict[str, int] = OrderedDict()
        self.topics = tuple(component.topics) or tuple(handler.topics)
        self.halted = False
        #: Why it halted, once it did.
        self.halt_reason: str | None = None
        # The end of the subscription a halt cancelled (see _halt).
        self._halt_ending: Deferred[Any] | None = None
        # Whether the bus delivers nothing more on the subscription, once
        # the consumer asked it to (see _stop_deliveries).
        self._delivering_ended: Latch | None = None
        # Subscribed, and neither halted nor stopping: see consuming.
        self._consuming = False
        self.in_flight = 0
        # The deliveries of the handler calls in progress, oldest first (a
        # dict for its order).
        self._handling: dict[IDelivery, None] = {}
        # The next look for orphaned calls (see _watch_orphans).
        self._orphan_check: IDelayedCall | None = None
        self.concurrency = max(1, component.concurrency)
        self.prefetch = prefetch_for(component, handler)
        # Deliveries waiting for a handler call to end, oldest first.
        self._waiting: deque[IDelivery] = deque()
        self._pumping = False
        self.stats = dict.fromkeys(
            ("consumed", "acked", "dropped", "dead_lettered", "retried", "invalid", "failed",
             "requeued", "rejected", "unsettled"),
            0,
        )
        self._in_flight: set[Deferred[Any]] = set()
        self._observers: list[Callable[[Settled], None]] = []
        self._subscription: ISubscription | None = None
        # The attempt to start that is going, and the call of the next one
        # after a failed one.
        self._starting: Deferred[None] | None = None
        self._start_retry: IDelayedCall | None = None
        # Failed attempts since the consumer started, or since the last
        # attempt that succeeded.
        self._start_failures = 0
        # The error of these attempts whose traceback was logged last: the
        # same error again is logged on one line.
        self._traced_error: str | None = None
        # Counts the consumer's starts: an attempt made for an earlier one
        # does not consume.
        self._run = 0
        # Whether the plugin's start() succeeded and its stop() was not
        # called since.
        self._handler_started = False
        # The plugin's start() while it runs.
        self._plugin_starting: Deferred[Any] | None = None
        #: Why the last attempt to start failed, while the next is awaited;
        #: C{None} once an attempt succeeds.
        self.start_error: str | None = None

    @property
    def problem(self) -> str | None:
        """
        Why it is not consuming, when it can tell: its last failed start,
        the message it halted on and why, or what the broker said when
        refusing to let its subscription consume again (a queue gone);
        C{None} otherwise.
        """
        if self.start_error is not None:
            return self.start_error
        if self.halted:
            return self.halt_reason
        error = getattr(self._subscription, "last_error", None)
        return error if isinstance(error, str) else None

    @property
    def consuming(self) -> bool:
        """
        Whether messages can come to this consumer now: it subscribed, is
        neither halted nor stopping, and its subscription consumes on the
        bus; not while the subscription waits to consume again after a
        reconnect or a cancel by the broker.
        """
        subscription = self._subscription
        if not self._consuming or subscription is None:
            return False
        # A subscription of a bus that does not tell is taken at its word.
        return bool(getattr(subscription, "consuming", True))

    @property
    def waiting(self) -> int:
        """
        Deliveries held for the handler until a call in progress ends.
        """
        return len(self._waiting)

    def topology(self) -> Topology:
        """
        The exchanges, queues and bindings this consumer needs.
        """
        own = consumer_topology(self.component, self.retry_delays)
        return own + Topology(
            bindings=tuple(BindingSpec(self.queue, self.bus.exchange, t) for t in self.topics)
        )

    def add_observer(self, observer: Callable[[Settled], None]) -> None:
        """
        Call C{observer} with a L{Settled} for every delivery once its fate is
        decided.  An observer must not raise; if it does, it is logged.
        """
        self._observers.append(observer)

    def _tell(
        self, message: Message, outcome: str, reason: str | None = None, handling: float | None = None
    ) -> None:
        if self._deliveries and outcome != "requeued":
            self._deliveries.pop(message.id, None)
        event = Settled(message, outcome, reason, handling)
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                self.log.failure("Observer of consumer {consumer} failed", consumer=self.component.name)

    def startService(self) -> None:
        super().startService()
        # Attempts of an earlier run that are still going see this and end
        # without consuming.
        self._run += 1
        self._start_failures = 0
        self._traced_error = None
        self._try_start()

    def _try_start(self) -> None:
        """
        Make one attempt to start, unless one is going (it tries again for
        this run once it ends) or the consumer is stopped.
        """
        self._start_retry = None
        if not self.running or self._starting is not None:
            return
        run = self._run
        starting = self._start(run)
        self._starting = starting
        starting.addBoth(self._start_ended, run)

    def _start_ended(self, result: object, run: int) -> None:
        """
        An attempt to start ended: if it failed, try again after the backoff
        (L{start_delay}) unless the consumer was stopped meanwhile; if the
        consumer was stopped and started again meanwhile, start afresh now.
        """
        self._starting = None
        if not self.running:
            if isinstance(result, Failure):
                self.log.debug(
                    "Consumer {consumer} stopped while starting: {error}",
                    consumer=self.component.name,
                    error=result.getErrorMessage(),
                )
            return
        if run != self._run:
            self._try_start()
            return
        if not isinstance(result, Failure):
            self._start_failures = 0
            self._traced_error = None
            self.start_error = None
            return
        self._start_failures += 1
        error = result.value
        # A configuration error's problems on one line.
        text = (
            "; ".join(str(problem) for problem in error.problems)
            if isinstance(error, ConfigError) else result.getErrorMessage()
        )
        self.start_error = f"{type(error).__name__}: {text}"
        delay = start_delay(self._start_failures)
        # Error, not critical: the consumer starts by itself once the cause
        # (permissions, a queue's changed arguments, a plugin's file) is gone.
        # fedhub's own errors say what is wrong; a traceback is for the rest,
        # once: an attempt that fails as the one before is logged on one
        # line, so that a plugin failing for hours does not fill the log
        # with the same traceback every minute.
        fields = {"consumer": self.component.name, "attempt": self._start_failures, "delay": delay}
        if isinstance(error, FedhubError) or self.start_error == self._traced_error:
            self.log.error(
                "Consumer {consumer} could not start (attempt {attempt}); trying again in "
                "{delay} s: {error}",
                error=escape_control(self.start_error, 1000),
                **fields,
            )
        else:
            self._traced_error = self.start_error
            self.log.failure(
                "Consumer {consumer} could not start (attempt {attempt}); trying again in {delay} s",
                result,
                level=LogLevel.error,
                **fields,
            )
        self._start_retry = self.clock.callLater(delay, self._try_start)

    def _start_slow(self, run: int) -> None:
        """
        The plugin's C{start()} has not ended after L{START_SLOW} seconds:
        say so, since the consumer does not consume until it has (unless it
        was stopped meanwhile).
        """
        if not self._current(run):
            return
        self.start_error = f"its plugin's start() has not finished after {START_SLOW:g} s"
        self.log.warn(
            "Consumer {consumer}: its plugin's start() has not finished after {seconds} s; "
            "it consumes nothing until it has",
            consumer=self.component.name,
            seconds=START_SLOW,
        )

    def _current(self, run: int) -> bool:
        """
        Whether an attempt to start made for C{run} should go on: the
        consumer was not stopped (nor stopped and started again) since.
        """
        return bool(self.running) and run == self._run

    @inlineCallbacks
    def _start(self, run: int) -> Generator[Deferred[Any], Any, None]:
        """
        Start the plugin, unless it started in an earlier attempt of this
        run; declare the topology and subscribe.

        A plugin whose C{start()} raised or failed has not started: a later
        attempt calls it again, as a restart of the hub would.  Declaring
        again is harmless: a bus remembers a topology declared the same way
        once.
        """
        if not self._handler_started:
            began = self.blocking.now()
            self._plugin_starting = maybeDeferred(self.handler.start)
            self.blocking.ended("start", began)
            slow = self.clock.callLater(START_SLOW, self._start_slow, run)
            try:
                yield self._plugin_starting
            finally:
                self._plugin_starting = None
                if slow.active():
                    slow.cancel()
            if not self._current(run):
                return
            self._handler_started = True
        yield self.bus.declare(self.topology())
        if not self._current(run):
            return
        subscription = yield self.bus.subscribe(self.queue, self._on_delivery, self.prefetch)
        if not self._current(run):
            # Stopping began while the bus was subscribing (its broker was
            # unreachable until now): nothing would cancel this subscription,
            # and every delivery on it would only be put back at once.  After
            # a start since, the attempt of that start subscribes itself.
            yield subscription.cancel()
            return
        self._subscription = subscription
        self._delivering_ended = None
        self._consuming = True
        self.log.info(
            "Consumer {consumer} consumes {queue} for {topics}",
            consumer=self.component.name,
            queue=self.queue,
            topics=",".join(self.topics),
        )

    def _on_delivery(self, delivery: IDelivery) -> None:
        if self.halted or not self.running:
            self._give_back(delivery)
            return
        self._waiting.append(delivery)
        self._pump()

    def _put_back(self, delivery: IDelivery) -> None:
        """
        Return a delivery to its queue by rejecting it, so that the queue's
        consumers (this one, or once it stops or halts, the others) get it
        again.

        A consumer stopping or halting keeps its subscription (whose channel
        the calls in progress settle on) until those calls end, but first
        asks the bus to deliver nothing more to it (L{_stop_deliveries}: an
        AMQP C{basic.cancel}); the rejection reaches the broker after that,
        so the message goes to the other consumers at once.  Only on a
        subscription that can not stop delivering (one without
        C{stop_consuming}) is the delivery held instead: a rejection would
        only free a prefetch slot, and the broker would hand the message
        straight back to this consumer, again and again until the
        subscription ends; held, the message goes back when the
        subscription ends.
        """
        if (
            (self.running and not self.halted)
            or self._subscription is None
            or self._delivering_ended is not None
        ):
            if delivery.reject(True) and self._deliveries:
                # A verdict that reached the broker: the delivery that
                # brings the message back is not one "without a verdict"
                # (max_deliveries).
                self._deliveries.pop(delivery.message.id, None)

    def _stop_deliveries(self) -> Deferred[None]:
        """
        Ask the subscription to deliver nothing more while keeping what it
        delivered open to verdicts (C{stop_consuming}, on AMQP a
        C{basic.cancel} on the channel, which stays open), if it can: what
        the consumer puts back from then on goes to the queue's other
        consumers at once (see L{_put_back}).  Asked once per subscription.

        @return: A Deferred firing once the bus says nothing more will come
            (or could not tell; at once for a subscription that can not
            stop delivering).  It never fails.
        """
        ended = self._delivering_ended
        if ended is None:
            stop = getattr(self._subscription, "stop_consuming", None)
            if not callable(stop):
                return succeed(None)
            try:
                stopping = stop()
            except Exception:
                # Deliveries may still come: what goes back is held.
                self.log.failure(
                    "Consumer {consumer}: stopping its deliveries failed",
                    consumer=self.component.name,
                )
                return succeed(None)
            ended = self._delivering_ended = Latch()
            maybeDeferred(lambda: stopping).addErrback(
                lambda f: self.log.failure(
                    "Consumer {consumer}: stopping its deliveries failed", f,
                    consumer=self.component.name,
                )
            ).addBoth(lambda _: ended.fire())
        return ended.wait()

    def _stopped_delivering(self, stopping: Deferred[None]) -> Deferred[bool]:
        """
        Wait for the answer to L{_stop_deliveries}, at most
        L{CANCEL_TIMEOUT} seconds: an AMQP bus bounds its own wait for
        C{basic.cancel-ok}, but a consumer's stop must not rest on every
        bus doing so.  Whether the answer came.  Without it, deliveries may
        still come until the subscription ends; they are put back as they
        come.
        """

        def answered(came: bool) -> bool:
            if not came:
                self.log.info(
                    "Consumer {consumer}: no word from the bus within {timeout} s that "
                    "deliveries stopped; ending its subscription",
                    consumer=self.component.name,
                    timeout=CANCEL_TIMEOUT,
                )
            return came

        return self._within(stopping, CANCEL_TIMEOUT).addCallback(answered)

    def _give_back(self, delivery: IDelivery) -> None:
        """
        Put a delivery the consumer will not handle back in its queue.
        """
        self._put_back(delivery)
        self.stats["requeued"] += 1
        self._tell(delivery.message, "requeued", "consumer stopping or halted")

    def _pump(self) -> None:
        """
        Hand waiting deliveries to the handler while it has room (in a loop,
        not by recursion: a handler that answers at once frees its room
        before the next is taken).  A delivery whose channel closed while it
        waited is left alone: the broker has put it back and delivers it
        again.  Once the consumer stops or halts, waiting ones go back.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            waiting = self._waiting
            while waiting:
                if self.halted or not self.running:
                    while waiting:
                        self._give_back(waiting.popleft())
                    return
                handling = self._handling
                if handling and not next(iter(handling)).live:
                    self._forget_orphans()
                if self.in_flight >= self.concurrency and len(handling) >= self.concurrency:
                    return
                delivery = waiting.popleft()
                if not delivery.live:
                    self.stats["requeued"] += 1
                    self._tell(delivery.message, "requeued",
                               "its channel closed while it waited; the broker delivers it again")
                    continue
                try:
                    self._handle(delivery)
                except Exception:
                    self._settling_failed(delivery, Failure())
        finally:
            self._pumping = False

    def _forget_orphans(self) -> None:
        """
        Forget the handler calls whose delivery's channel closed (the
        broker's consumer timeout, a lost connection): their messages are
        back in the queue and come again, and a call that hangs must not
        take the handler's room for ever.  A handler with an C{abandon}
        method is told of each (C{exec} then drops a run not yet started,
        which would only run the message twice; C{bridge} a message it holds
        for a target that can not take it, which would only cross twice).

        Only the oldest calls are looked at: a consumer's deliveries come on
        one channel at a time, a new one after the last closed, so once the
        oldest call's channel is open, every newer call's is too.
        """
        handling = self._handling
        orphaned = []
        for delivery in handling:
            if delivery.live:
                break
            orphaned.append(delivery)
        abandon = getattr(self.handler, "abandon", None) if orphaned else None
        # All forgotten before the handler hears of any: a call it ends at
        # once (NotHandled) pumps, which may look for orphans again.
        for delivery in orphaned:
            del handling[delivery]
        if not handling:
            self._unwatch_orphans()
        for delivery in orphaned:
            if callable(abandon):
                began = self.blocking.now()
                try:
                    abandon(delivery.message)
                except Exception:
                    self.log.failure("Consumer {consumer}: abandoning {msg_id} failed",
                                     consumer=self.component.name, msg_id=delivery.message.id)
                finally:
                    self.blocking.ended("abandon", began)

    def _watch_orphans(self) -> None:
        """
        While handler calls are in progress, look for orphaned ones every
        L{ORPHAN_CHECK_INTERVAL} seconds (see L{_forget_orphans}), if the
        handler wants to hear of them (it has C{abandon}), until the
        subscription ends.
        """
        if (
            self._orphan_check is None
            and self._handling
            and self._subscription is not None
            and callable(getattr(self.handler, "abandon", None))
        ):
            self._orphan_check = self.clock.callLater(ORPHAN_CHECK_INTERVAL, self._check_orphans)

    def _unwatch_orphans(self) -> None:
        """
        Stop looking for orphaned calls: none is in progress, or the
        consumer stopped.
        """
        if self._orphan_check is not None:
            self._orphan_check.cancel()
            self._orphan_check = None

    def _check_orphans(self) -> None:
        self._orphan_check = None
        handling = self._handling
        if handling and not next(iter(handling)).live:
            self._forget_orphans()
        self._watch_orphans()

    def _handle(self, delivery: IDelivery) -> None:
        message = delivery.message
        self.stats["consumed"] += 1
        if message.redelivered and self.max_deliveries:
            count = self._count_delivery(message.id)
            if count > self.max_deliveries:
                reason = (
                    f"delivered {count} times without a verdict reaching the broker (a handler "
                    f"slower than the broker's consumer_timeout, or lost connections); "
                    f"max_deliveries is {self.max_deliveries}"
                )
                self._settle(self._dead_letter(delivery, reason), delivery, "dead_lettered", reason)
                return
        try:
            self.schemas.validate(message)
        except SchemaValidationError as e:
            self.stats["invalid"] += 1
            self._settle(self._dead_letter(delivery, str(e)), delivery, "dead_lettered", str(e))
            return
        except Exception:
            # A schema package's own code failed, not the body: a failure
            # like a handler's, which the consumer's policy settles.
            self._settle_now(self._failed, Failure(), delivery, None)
            return
        # Most handlers answer at once: their verdict is acted on without
        # the Deferreds a handler that returns later needs.
        started = self.clock.seconds()
        self.in_flight += 1
        self._handling[delivery] = None
        began = self.blocking.now()
        try:
            result = self.handler.handle(message)
            if inspect.iscoroutine(result):
                # The coroutine runs up to its first await here: the
                # plugin's code too, timed with the call.
                result = ensureDeferred(result)
        except BaseException:
            self.blocking.ended("handle", began)
            self._settle_now(self._failed, Failure(), delivery, self._took(started, delivery))
            return
        self.blocking.ended("handle", began)
        if isinstance(result, Deferred):
            d: Deferred[Any] = result
        else:
            self._settle_now(self._succeeded, result, delivery, self._took(started, delivery))
            return

        def succeeded(result: object) -> None:
            try:
                self._settle_now(self._succeeded, result, delivery, self._took(started, delivery))
            finally:
                self._pump()

        def failed(failure: Failure) -> None:
            try:
                self._settle_now(self._failed, failure, delivery, self._took(started, delivery))
            finally:
                self._pump()

        d.addCallbacks(succeeded, failed)
        d.addErrback(
            lambda f: self.log.failure("Settling {msg_id} failed", f, msg_id=message.id)
        )
        self._track(d)
        self._watch_orphans()

    def _count_delivery(self, message_id: str) -> int:
        """
        Count one more delivery of a redelivered message; how many this is.
        At most L{_TRACKED} messages are counted at once, the least recently
        delivered forgotten first.
        """
        counts = self._deliveries
        # The first delivery was seen here or by an earlier process.
        count = counts.pop(message_id, 1) + 1
        counts[message_id] = count
        if len(counts) > _TRACKED:
            counts.popitem(last=False)
        return count

    def _took(self, started: float, delivery: IDelivery) -> float:
        """
        A handler call that began at C{started} has its result: the seconds it took.
        """
        self.in_flight -= 1
        self._handling.pop(delivery, None)
        if not self._handling:
            self._unwatch_orphans()
        took: float = self.clock.seconds() - started
        return max(0.0, took)

    def _settle_now(
        self,
        settle: Callable[[Any, IDelivery, float | None], None],
        outcome: Any,
        delivery: IDelivery,
        handling: float | None,
    ) -> None:
        try:
            settle(outcome, delivery, handling)
        except Exception:
            self._settling_failed(delivery, Failure())

    def _settling_failed(self, delivery: IDelivery, failure: Failure) -> None:
        """
        Settling a delivery raised unexpectedly (a defect in a bus, say): put
        the message back in its queue rather than leave it unacknowledged,
        holding one of the consumer's prefetch slots until its channel
        closes.  Logged once, with the message's id.
        """
        message = delivery.message
        self.log.failure(
            "Consumer {consumer}: settling {msg_id} failed; putting it back in its queue",
            failure,
            consumer=self.component.name,
            msg_id=message.id,
        )
        try:
            if not delivery.live or delivery.reject(True) is False:
                # A verdict went out before the failure, or the channel is
                # gone and the broker delivers the message again anyway.
                return
        except Exception:
            # Nothing more can be done here: the message comes back when
            # its channel closes.
            return
        self.stats["requeued"] += 1
        self._tell(message, "requeued", f"settling it failed ({type(failure.value).__name__})")

    def _within(self, d: Deferred[Any], seconds: float) -> Deferred[bool]:
        """
        A Deferred firing with C{True} once C{d} has fired (whatever its
        result), or with C{False} after C{seconds} if that comes first.
        """

        def ended(result: object) -> bool:
            return not (isinstance(result, Failure) and result.check(_Late))

        return with_timeout(d, seconds, self.clock, _Late).addBoth(ended)

    def _track(self, d: Deferred[Any]) -> None:
        """
        Count C{d} as work in hand, which a stop waits for, until its
        callbacks have run.  A Deferred that has fired may still be paused
        on another (a handler returning C{DeferredSemaphore.run}, a callback
        that returned a Deferred): it is in hand as much as one that has not
        fired.  One whose callbacks have all run leaves the set at once.
        """
        self._in_flight.add(d)
        d.addBoth(self._forget, d)

    def _forget(self, result: object, d: Deferred[Any]) -> object:
        self._in_flight.discard(d)
        return result

    def _succeeded(self, result: object, delivery: IDelivery, handling: float | None) -> None:
        if delivery.ack() is False:
            self._unsettled(delivery, "acked", handling)
            return
        self.stats["acked"] += 1
        self._tell(delivery.message, "acked", None, handling)

    def _not_handled(self, delivery: IDelivery, verdict: NotHandled, handling: float | None) -> None:
        """
        The handler gave the message back unhandled: back to its queue, by
        rejecting it, or by its channel having closed already.
        """
        reason = f"not handled: {verdict.reason or 'given back'}"
        if delivery.live:
            self._put_back(delivery)
        self.stats["requeued"] += 1
        self.log.debug(
            "Consumer {consumer}: {msg_id} goes back to its queue, {reason}",
            consumer=self.component.name,
            msg_id=delivery.message.id,
            reason=reason,
        )
        self._tell(delivery.message, "requeued", reason, handling)

    def _unsettled(self, delivery: IDelivery, outcome: str, handling: float | None) -> None:
        """
        The bus dropped the verdict on a delivery: its channel closed first
        (the broker's consumer timeout, a lost connection), and the broker
        delivers the message again.
        """
        self.stats["unsettled"] += 1
        reason = f"{outcome}, but its channel closed before the verdict; the broker delivers it again"
        self.log.warn(
            "Consumer {consumer}: {msg_id} was {reason}",
            consumer=self.component.name,
            msg_id=delivery.message.id,
            reason=reason,
        )
        self._tell(delivery.message, "requeued", reason, handling)

    def _failed(self, failure: Failure, delivery: IDelivery, handling: float | None) -> None:
        message = delivery.message
        verdict = failure.value
        if isinstance(verdict, NotHandled):
            self._not_handled(delivery, verdict, handling)
            return
        if not isinstance(verdict, (Drop, Halt, DeadLetter, Retry)):
            self.stats["failed"] += 1
            # Error, not critical: the policy handles it.
            self.log.failure(
                "Consumer {consumer} failed on {msg_id} ({topic}); policy {policy}",
                failure,
                level=LogLevel.error,
                consumer=self.component.name,
                msg_id=message.id,
                topic=message.topic,
                policy=self.on_error,
            )
            reason = f"{type(verdict).__name__}: {verdict}"
            verdict = {
                "retry": Retry(reason),
                "dead-letter": DeadLetter(reason),
                "drop": Drop(reason),
                "halt": Halt(reason),
            }[self.on_error]
        # A plugin may give an exception, or anything, as the reason; the
        # dead-letter header and observers take text.
        why = verdict.reason if isinstance(verdict.reason, str) else str(verdict.reason)
        if isinstance(verdict, Drop):
            self.log.info(
                "Consumer {consumer} dropped {msg_id}: {reason}",
                consumer=self.component.name,
                msg_id=message.id,
                reason=why,
            )
            if delivery.ack() is False:
                self._unsettled(delivery, "dropped", handling)
                return
            self.stats["dropped"] += 1
            self._tell(message, "dropped", why, handling)
        elif isinstance(verdict, Halt):
            self.log.error(
                "Consumer {consumer} halts on {msg_id}: {reason}",
                consumer=self.component.name,
                msg_id=message.id,
                reason=why,
            )
            # Rejected once the subscription delivers nothing more, or held
            # until it ends (see _halt and _put_back).
            # Looked at before the halt, which may end the subscription
            # itself (and so put the message back, as it should).
            closed = not delivery.live
            self._halt(f"halted on {message.id}: {why}")
            if closed:
                # Its channel closed first (the broker's consumer timeout, a
                # stop that gave up on the call): the broker put the message
                # back by itself, and no rejection reaches it.
                self._unsettled(delivery, "requeued", handling)
                return
            self._put_back(delivery)
            self.stats["requeued"] += 1
            self._tell(message, "requeued", why, handling)
        elif not delivery.live:
            # Its channel closed first: the broker has put the message back
            # and delivers it again, so a copy in a retry or dead-letter
            # queue would only be a duplicate of it.
            outcome = "retried" if isinstance(verdict, Retry) else "dead_lettered"
            self._unsettled(delivery, outcome, handling)
        elif isinstance(verdict, Retry):
            attempts = attempts_from(message, self.retry_prefix)
            if attempts < len(self.retry_delays):
                outcome = "retried"
            else:
                # Told as the dead-letter copy's header says it.
                outcome, why = "dead_lettered", gave_up(attempts, why)
            self._settle(
                self._retry(delivery, why, verdict.delay), delivery, outcome, why, handling
            )
        else:
            self._settle(
                self._dead_letter(delivery, why),
                delivery,
                "dead_lettered",
                why,
                handling,
            )

    def _retry(self, delivery: IDelivery, reason: str, delay: object) -> Deferred[None]:
        """
        Put a copy in the next retry queue (or the first one waiting at
        least C{delay} seconds), or dead-letter the message when its retries
        are used up.
        """
        message = delivery.message
        attempts = attempts_from(message, self.retry_prefix)
        if attempts >= len(self.retry_delays):
            # The reason is gave_up's already (see _failed).
            return self._dead_letter(delivery, reason)
        level = attempts + 1
        if delay is not None and (
            isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay != delay
        ):
            self.log.warn(
                "Consumer {consumer}: the Retry delay of {msg_id}, {delay!r}, is no number; "
                "the backoff applies",
                consumer=self.component.name,
                msg_id=message.id,
                delay=delay,
            )
            delay = None
        if isinstance(delay, (int, float)):
            # The first level waiting at least as long as asked, else the last.
            asked = delay
            level = next(
                (n for n, wait in enumerate(self.retry_delays, 1) if n >= level and wait >= asked),
                len(self.retry_delays),
            )
        self.log.info(
            "Consumer {consumer} retries {msg_id} in {delay} s (attempt {attempt}): {reason}",
            consumer=self.component.name,
            msg_id=message.id,
            delay=self.retry_delays[level - 1],
            attempt=attempts + 1,
            reason=reason,
        )
        name = f"{self.retry_prefix}{level}"
        # maybeDeferred: a bus that raises refuses the copy like one that fails.
        return maybeDeferred(
            self.bus.publish, message.evolve(queue=None), exchange=name, routing_key=message.topic
        )

    def _dead_letter(self, delivery: IDelivery, reason: str) -> Deferred[None]:
        """
        Put a copy carrying C{reason} in the dead-letter queue.
        """
        message = delivery.message
        self.log.warn(
            "Consumer {consumer} dead-letters {msg_id} ({topic}): {reason}",
            consumer=self.component.name,
            msg_id=message.id,
            topic=message.topic,
            reason=reason,
        )
        headers = dict(message.headers)
        headers[DEAD_LETTER_REASON_HEADER] = reason[:1000]
        copy = message.evolve(queue=None, headers=headers)
        return maybeDeferred(
            self.bus.publish, copy, exchange=self.dead_letter_queue, routing_key=message.topic
        )

    def _settle(
        self,
        replaced: Deferred[None],
        delivery: IDelivery,
        outcome: str,
        reason: str,
        handling: float | None = None,
    ) -> None:
        """
        Acknowledge a delivery once the copy replacing it is confirmed; if the
        copy is refused, let the broker dead-letter the original; if it could
        not be published for a passing reason (L{TemporarilyUnavailable}),
        put the original back in its queue after L{TRANSIENT_REQUEUE_DELAY}.

        The delivery is counted, and observers told, by what became of it,
        once that is known: C{outcome} only when the copy is confirmed and
        the original acknowledged.
        """

        def confirmed(_: object) -> None:
            if delivery.ack() is False:
                # The copy is out; the original comes again as well.
                self._unsettled(delivery, outcome, handling)
                return
            self.stats[outcome] += 1
            self._tell(delivery.message, outcome, reason, handling)

        def refused(failure: Failure) -> Deferred[None] | None:
            if failure.check(TemporarilyUnavailable):
                # Not the copy's fault: the original goes back to its queue
                # (after a pause) and is handled again, retries not used up.
                self.log.warn(
                    "Consumer {consumer} could not re-publish {msg_id} ({why}); it goes back "
                    "to its queue in {delay:g} s",
                    consumer=self.component.name,
                    msg_id=delivery.message.id,
                    why=failure.getErrorMessage(),
                    delay=TRANSIENT_REQUEUE_DELAY,
                )
                return deferLater(self.clock, TRANSIENT_REQUEUE_DELAY, put_back, failure)
            self.log.failure(
                "Consumer {consumer} could not re-publish {msg_id}; rejecting it",
                failure,
                consumer=self.component.name,
                msg_id=delivery.message.id,
            )
            if delivery.reject(False) is False:
                self._unsettled(delivery, "rejected", handling)
                return None
            self.stats["rejected"] += 1
            self._tell(delivery.message, "rejected", reason, handling)
            return None

        def put_back(failure: Failure) -> None:
            if not delivery.live:
                self._unsettled(delivery, outcome, handling)
                return
            # Rejected, or held while stopping or halting (see _put_back).
            self._put_back(delivery)
            self.stats["requeued"] += 1
            self._tell(
                delivery.message,
                "requeued",
                f"{outcome}, but the copy could not be published: {failure.getErrorMessage()}",
                handling,
            )

        replaced.addCallbacks(confirmed, refused)
        replaced.addErrback(lambda f: self._settling_failed(delivery, f))
        self._track(replaced)

    def _drain(self) -> None:
        """
        Ask a handler with a C{drain()} method to finish what it holds now
        (a batch collecting messages) and give back what it has not begun.
        """
        drain = getattr(self.handler, "drain", None)
        if self._in_flight and callable(drain):
            began = self.blocking.now()
            try:
                drain()
            except Exception:
                self.log.failure("Draining consumer {consumer} failed", consumer=self.component.name)
            finally:
                self.blocking.ended("drain", began)

    @inlineCallbacks
    def _settled(self, seconds: float) -> Generator[Deferred[Any], Any, bool]:
        """
        Wait until no work is in hand, or C{seconds} pass; whether it got
        there.  Work in hand is the handler calls, and what begins as each
        ends: the copy replacing its message (a retry, a dead-letter), whose
        confirm comes later, and a delayed put-back.  A wait for the calls
        alone would end the subscription before those, and the message would
        be both back in its queue and in the copy's.
        """
        deadline = self.clock.seconds() + seconds
        while self._in_flight:
            left = deadline - self.clock.seconds()
            if left <= 0:
                return False
            yield self._within(DeferredList(list(self._in_flight), consumeErrors=True), left)
        return True

    def _halt(self, reason: str) -> None:
        if self.halted:
            return
        self.halted = True
        self.halt_reason = reason
        self._consuming = False
        # Nothing more is delivered; then the waiting deliveries are given
        # back, to the queue's other consumers at once (see _put_back), and
        # so is what the handler has not begun.
        stopping = self._stop_deliveries()
        self._pump()
        self._drain()
        # The work in hand settles on the subscription's open channel,
        # within drain_timeout: ended now, its channel would put those
        # messages back while the plugin still works on them, and they would
        # be handled twice.  Then the subscription ends, and its channel puts
        # back what the consumer still held.
        self._settled(self.drain_timeout).addCallback(
            lambda settled: self._stopped_delivering(stopping).addCallback(lambda _: settled)
        ).addCallback(self._halted_settled)

    def _halted_settled(self, settled: bool) -> None:
        if not settled and self.halted and self._subscription is not None:
            self.log.warn(
                "Consumer {consumer} halted with {count} message(s) still in hand after "
                "{timeout} s; they go back to the queue as its channel closes",
                consumer=self.component.name,
                count=len(self._in_flight),
                timeout=self.drain_timeout,
            )
        self._end_halted_subscription()

    def _end_halted_subscription(self) -> None:
        """
        End a halted consumer's subscription (unless a stop did already); a
        stop waits for it to end (L{_halt_ending}).
        """
        if not self.halted or self._subscription is None:
            return
        subscription, self._subscription = self._subscription, None
        self._halt_ending = subscription.cancel().addErrback(
            lambda f: self.log.failure("Cancelling {consumer} failed", f, consumer=self.component.name)
        )

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        self._consuming = False
        if self._start_retry is not None:
            if self._start_retry.active():
                self._start_retry.cancel()
            self._start_retry = None
        # Nothing more is delivered; then what waits for the handler goes
        # back, to the queue's other consumers at once (see _put_back).
        stopping = self._stop_deliveries()
        self._pump()
        # A handler batching messages finishes them now rather than at the
        # end of its delay, which may be past the drain timeout.
        self._drain()
        if self._in_flight:
            # Wait for the plugin's work, but not forever; what is still in
            # hand afterwards goes back to the queue when the channel closes.
            finished = yield self._settled(self.drain_timeout)
            if not finished:
                self.log.warn(
                    "Consumer {consumer} stopped with {count} message(s) still in hand",
                    consumer=self.component.name,
                    count=len(self._in_flight),
                )
        if self._subscription is not None:
            yield self._stopped_delivering(stopping)
            subscription, self._subscription = self._subscription, None
            try:
                yield subscription.cancel()
            except Exception:
                self.log.failure("Cancelling {consumer} failed", consumer=self.component.name)
        elif self._halt_ending is not None:
            # A halt ended the subscription: its channel closes first.
            yield self._halt_ending
        if self._plugin_starting is not None:
            # A plugin's start() still going gets its stop() after it ends,
            # not before (within the drain timeout).
            self.log.info(
                "Consumer {consumer}: waiting up to {timeout} s for its plugin's start() to end "
                "before stopping it",
                consumer=self.component.name,
                timeout=self.drain_timeout,
            )
            yield self._within(self._plugin_starting, self.drain_timeout)
        self._handler_started = False
        try:
            # A plugin's stop() that never finishes must not hold up the
            # hub, which stops its services one after the other.
            began = self.blocking.now()
            stopping_plugin = maybeDeferred(self.handler.stop)
            self.blocking.ended("stop", began)
            yield stopping_plugin.addTimeout(self.drain_timeout, self.clock)
        except StopTimedOut:
            self.log.error(
                "Consumer {consumer}: its plugin did not stop within {timeout} s; going on",
                consumer=self.component.name,
                timeout=self.drain_timeout,
            )
        except Exception:
            self.log.failure("Stopping consumer {consumer} failed", consumer=self.component.name)
        self._unwatch_orphans()
        self.blocking.stop()

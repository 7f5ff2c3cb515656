"""
Test helpers for plugin authors, used by fedhub's own tests too.

L{ConsumerHarness} runs a consumer plugin exactly as the hub does (its
options checked as a configuration would check them, the same consumer
runner, the in-process bus) with a fake clock, feeds it messages and reports
what became of each::

    from fedhub.testing import ConsumerHarness

    class GreeterTests(SynchronousTestCase):
        def test_greets(self):
            harness = ConsumerHarness(GreeterPlugin(), {"greeting": "hi"})
            harness.start()
            settled = self.successResultOf(harness.deliver("org.example.dev.x", {"a": 1}))
            self.assertEqual(settled.outcome, "acked")
            self.assertEqual(harness.published, [])

Each call of L{ConsumerHarness.deliver} is one delivery with its own
outcome: the same L{Message} delivered twice (to test what a plugin does
with a duplicate, which at-least-once delivery brings) gives two Deferreds,
each firing with what became of its own delivery.  A retried copy coming
back from a retry queue is not a new delivery: its outcome is in
C{harness.settled}.

Like the hub, a harness binds the consumer's queue to the handler's own
C{topics} unless given C{topics} (a configuration's C{topics} key): a message
on a topic the handler does not declare reaches no queue, and its
L{ConsumerHarness.deliver} fails with L{fedhub.errors.MessageReturned}.
So does a delivery while the plugin's C{start()} fails (the queue is not
declared until it succeeds), its error naming that failure (also in
C{harness.service.start_error}); before L{ConsumerHarness.start}, a
delivery fails with L{fedhub.errors.NotConnected}.
A plugin whose C{options} a configuration would refuse (an option named
like one of fedhub's own keys, such as C{queue}) is refused with the same
L{fedhub.errors.ConfigError}.  C{deliver(..., redelivered=True)} delivers a
message flagged redelivered, as the broker flags one it delivered before.

A handler's exception (other than fedhub's verdicts) is settled by the
consumer's C{on_error} policy and logged with C{log.failure}, so a trial
test that expects one must flush it: C{self.flushLoggedErrors(ValueError)}.

With its fake clock a harness runs everything within the calls of the
test; a handler that works in threads (C{deferToThread}) needs a running
reactor: give the harness C{reactor=reactor} in an asynchronous trial
C{TestCase}, wait for the Deferreds of L{ConsumerHarness.deliver} and
L{ConsumerHarness.stop} (yield or return them), and let time pass with
L{twisted.internet.task.deferLater}: L{ConsumerHarness.advance} moves only
the fake clock and raises L{TypeError} with a real reactor.

Unless given a C{hub} whose C{state_dir} it should use, a harness makes a
temporary state directory for the plugin (C{harness.state_dir}) and removes
it when L{ConsumerHarness.stop} has stopped everything; those of harnesses
never stopped are removed when the process exits.  To look at what a plugin
left there after it stopped, pass C{hub=HubSettings(state_dir=...)}.

L{producer_context} is what the hub gives a producer plugin's C{build}, its
options checked as a configuration's, with a L{RecordingPublisher}: an honest
fake L{IPublisher} that records what is handed over and can be told to
refuse (or to hold hand-overs, as a full outbox would).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.bus.memory import MemoryBus
from fedhub.config import DEFAULT_BLOCKING_WARNING, ComponentConfig, HubSettings, check_options, check_plugin
from fedhub.consumers.runner import ConsumerService, Settled
from fedhub.errors import FedhubError, MessageReturned, NotConnected
from fedhub.interfaces import (
    IConsumerPlugin,
    IDelivery,
    IMessageHandler,
    IProducerPlugin,
    IPublisher,
    ISubscription,
)
from fedhub.message import Message
from fedhub.plugins import PluginContext

__all__ = ["ConsumerHarness", "RecordingPublisher", "Settled", "producer_context"]

#: State directories harnesses made and have not removed yet.
_left_behind: set[str] = set()


@atexit.register
def _remove_left_behind() -> None:
    """
    Remove the state directories of harnesses that were never stopped, so
    that a plugin's test suite leaves no temporary directories behind.
    """
    for path in list(_left_behind):
        shutil.rmtree(path, ignore_errors=True)
    _left_behind.clear()


@implementer(IPublisher)
class RecordingPublisher:
    """
    A publisher that keeps every message handed over.

    @ivar published: The messages taken, in order.
    @ivar refuse_with: When set, every hand-over fails with this error (for
        example L{fedhub.errors.TemporarilyUnavailable}) and nothing is kept.
    @ivar hold: When true, hand-overs wait: their Deferreds are in
        L{waiting} for the test to fire.
    @ivar refused: How many hand-overs failed with L{refuse_with}.
    """

    def __init__(self, domain: str = "test") -> None:
        self.domain = domain
        self.published: list[Message] = []
        self.refuse_with: FedhubError | None = None
        self.hold = False
        self.waiting: list[tuple[Message, Deferred[None]]] = []
        self.refused = 0

    def publish(self, message: Message) -> Deferred[None]:
        if not isinstance(message, Message):
            return fail(TypeError(f"expected a Message, not {type(message).__name__}"))
        if self.refuse_with is not None:
            self.refused += 1
            return fail(self.refuse_with)
        if self.hold:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self.published.append(message))
            self.waiting.append((message, d))
            return d
        self.published.append(message)
        return succeed(None)


def producer_context(
    plugin: IProducerPlugin,
    options: Mapping[str, Any] | None = None,
    *,
    name: str = "test",
    domain: str = "test",
    reactor: Any = None,
    hub: HubSettings | None = None,
) -> PluginContext:
    """
    What the hub would give a producer plugin's C{build}: its options
    checked and completed as a configuration's (a
    L{fedhub.errors.ConfigError} names what is wrong), a
    L{RecordingPublisher} as C{context.publisher}, C{reactor} (a L{Clock}
    by default) and C{hub}'s settings, by default with a temporary
    C{state_dir} removed when the test process exits::

        context = producer_context(TickerPlugin(), {"interval": 5})
        service = TickerPlugin().build(context)
        service.startService()
        context.reactor.advance(5)
        self.assertEqual(len(context.publisher.published), 1)
    """
    checked = check_options(check_plugin(plugin), options or {}, plugin=plugin)
    if hub is None:
        state_dir = tempfile.mkdtemp(prefix="fedhub-producer-")
        _left_behind.add(state_dir)
        hub = HubSettings(state_dir=state_dir)
    component = ComponentConfig(
        kind="producer", index=0, name=name, plugin=plugin.name, domain=domain, options=checked
    )
    return PluginContext(
        name=name,
        domain=domain,
        options=checked,
        publisher=RecordingPublisher(domain),
        reactor=reactor if reactor is not None else Clock(),
        hub=hub,
        component=component,
    )


@implementer(IDelivery)
class _Redelivery:
    """
    A delivery of the bus shown to the consumer as one the broker made
    before: its message and C{redelivered} flagged, its verdicts those of
    the delivery it wraps.
    """

    redelivered = True

    def __init__(self, delivery: IDelivery) -> None:
        self._delivery = delivery
        self.message: Message = delivery.message.evolve(redelivered=True)
        self.queue: str = delivery.queue

    @property
    def live(self) -> bool:
        return bool(self._delivery.live)

    def ack(self) -> bool:
        return bool(self._delivery.ack())

    def reject(self, requeue: bool) -> bool:
        return bool(self._delivery.reject(requeue))


class _WatchedBus(MemoryBus):
    """
    The harness's bus: it shows the harness every delivery before the
    consumer gets it, so the harness can tell which of its deliveries a
    settled message was, and hands the consumer the delivery the harness
    returns.
    """

    def __init__(
        self, domain: str, clock: Any, seen: Callable[[IDelivery], IDelivery]
    ) -> None:
        super().__init__(domain, clock=clock)
        self._seen = seen

    def subscribe(
        self,
        queue: str,
        on_delivery: Callable[[IDelivery], object],
        prefetch: int,
    ) -> Deferred[ISubscription]:
        def watched(delivery: IDelivery) -> object:
            return on_delivery(self._seen(delivery))

        return super().subscribe(queue, watched, prefetch)


class ConsumerHarness:
    """
    Runs one consumer plugin on the in-process bus.

    By default everything runs on a fake L{Clock}, within the calls of a
    L{SynchronousTestCase}: L{deliver} and L{advance} turn it.  A handler
    that works in threads (C{deferToThread}, C{deferToThreadPool}) gets its
    thread's result only from a running reactor, so under the fake clock
    the Deferred of its delivery never fires.  Test such a handler in an
    asynchronous trial C{TestCase} with C{reactor=reactor}, yielding (or
    returning) the Deferreds of L{deliver} and of L{stop}, so that no
    timer outlives the test::

        class ThreadedTests(TestCase):
            @inlineCallbacks
            def test_hashes(self):
                harness = ConsumerHarness(HashPlugin(), reactor=reactor)
                harness.start()
                self.addCleanup(harness.stop)
                settled = yield harness.deliver("org.example.dev.x", {"a": 1})
                self.assertEqual(settled.outcome, "acked")

    Time then passes by itself: L{advance} raises L{TypeError}, and a test
    waits for a retry with C{deferLater(reactor, seconds)} (give a short
    C{retry_delay}).

    An exception the handler raises (other than fedhub's verdicts
    L{fedhub.errors.Retry}, C{Drop}, C{DeadLetter} and C{Halt}) is settled
    by C{on_error} and logged with C{log.failure}; trial fails a test that
    leaves a logged failure, so a test expecting one flushes it with
    C{self.flushLoggedErrors(TheError)}.

    @ivar clock: The clock the bus, the runner and the plugin (as its
        C{reactor}) use; a L{Clock} unless a reactor was given.
    @ivar bus: The L{MemoryBus} of the consumer's domain.
    @ivar publisher: The plugin's publisher, a L{RecordingPublisher}.
    @ivar peers: The publishers of the other domains, by name.
    @ivar handler: What the plugin built.
    @ivar service: The consumer runner.
    @ivar settled: Every L{Settled} so far, in order.
    @ivar state_dir: The hub's state directory the plugin was given: the
        C{hub}'s, or a temporary one the harness made and removes (see
        L{stop}).
    """

    def __init__(
        self,
        plugin: IConsumerPlugin,
        options: Mapping[str, Any] | None = None,
        *,
        name: str = "test",
        domain: str = "test",
        topics: tuple[str, ...] = (),
        hub: HubSettings | None = None,
        reactor: Any = None,
        concurrency: int = 1,
        prefetch: int = 0,
        retry_delay: float = 10.0,
        max_retries: int = 5,
        on_error: str = "retry",
        peer_domains: tuple[str, ...] = (),
        max_retry_delay: float = 3600.0,
        drain_timeout: float = 30.0,
        max_deliveries: int = 10,
        blocking_warning: float = DEFAULT_BLOCKING_WARNING,
    ) -> None:
        """
        Build the plugin's handler and its consumer.

        @param options: The plugin's own keys, checked against its
            C{options} (a L{fedhub.errors.ConfigError} names what is wrong,
            as it does for C{options} a configuration would refuse).
        @param topics: The topic patterns the consumer's queue is bound to,
            as the C{topics} key of a configuration gives them (and the
            plugin sees them in C{context.component.topics}).  By default
            none, so the queue is bound to the handler's own C{topics}, as
            the hub binds it: a message on any other topic reaches no queue.
            C{("#",)} binds every topic.
        @param hub: The hub's settings; by default the defaults, with a
            temporary C{state_dir} the harness removes once stopped.
        @param reactor: A real reactor for plugins that do real I/O or
            use threads, in an asynchronous test (see above); by default a
            L{Clock}, advanced by L{deliver} and L{advance}.
        @param concurrency: The consumer's C{concurrency}, and
            C{prefetch} its C{prefetch} (0: the consumer's choice), as in a
            configuration.
        @param peer_domains: Other domains; a plugin that sets
            C{crosses_domains = True} (a bridge) gets a L{RecordingPublisher}
            for each, found in L{peers}.

        C{retry_delay}, C{max_retries}, C{max_retry_delay}, C{on_error},
        C{drain_timeout}, C{max_deliveries} and C{blocking_warning} are the
        consumer's keys of the same names, with a configuration's defaults
        (L{blocking_calls} counts the calls longer than C{blocking_warning}).
        """
        # Deliveries asked for and not yet handed to the consumer, in order
        # (with whether to flag them redelivered), then those handed over,
        # by the identity of the message the consumer got (which every
        # Settled of that delivery carries).
        self._undelivered: list[tuple[Message, Deferred[Settled], bool]] = []
        self._delivered: dict[int, tuple[Message, Deferred[Settled]]] = {}
        self.clock = reactor if reactor is not None else Clock()
        self.bus: MemoryBus = _WatchedBus(domain, self.clock, self._on_delivery)
        self.publisher = RecordingPublisher(domain)
        self.peers = {name: RecordingPublisher(name) for name in peer_domains}
        # A plugin a configuration would refuse never runs in a hub.
        checked = check_options(check_plugin(plugin), options or {}, plugin=plugin)
        self._own_state_dir: str | None = None
        if hub is None:
            self._own_state_dir = tempfile.mkdtemp(prefix="fedhub-harness-")
            _left_behind.add(self._own_state_dir)
            hub = HubSettings(state_dir=self._own_state_dir)
        self.state_dir = hub.state_dir
        component = ComponentConfig(
            kind="consumer",
            index=0,
            name=name,
            plugin=plugin.name,
            domain=domain,
            options=checked,
            topics=topics,
            queue=f"fedhub.{name}",
            concurrency=concurrency,
            prefetch=prefetch,
            on_error=on_error,
            retry_delay=retry_delay,
            max_retries=max_retries,
            max_retry_delay=max_retry_delay,
            drain_timeout=drain_timeout,
            max_deliveries=max_deliveries,
            blocking_warning=blocking_warning,
        )
        context = PluginContext(
            name=name,
            domain=domain,
            options=checked,
            publisher=self.publisher,
            reactor=self.clock,
            hub=hub,
            component=component,
            peer_publishers=(
                dict(self.peers) if getattr(plugin, "crosses_domains", False) is True else {}
            ),
        )
        try:
            self.handler: IMessageHandler = plugin.build(context)
        except BaseException:
            self._remove_state_dir()
            raise
        self.service = ConsumerService(component, self.handler, self.bus, self.clock)
        self.settled: list[Settled] = []
        self.service.add_observer(self._on_settled)

    @property
    def published(self) -> list[Message]:
        """
        What the plugin published through its publisher.
        """
        return self.publisher.published

    @property
    def blocking_calls(self) -> dict[str, int]:
        """
        The plugin's calls (C{start}, C{handle}, C{drain}, C{abandon},
        C{stop}) that held the event loop longer than C{blocking_warning},
        by call, as the hub counts and logs them: timed with a monotonic
        clock, whatever clock the harness runs on.
        """
        return dict(self.service.blocking.counts)

    def _on_delivery(self, delivery: IDelivery) -> IDelivery:
        """
        Pair a delivery with the oldest L{deliver} call it answers, and
        return the delivery to hand to the consumer: flagged redelivered
        when that call asked for it.

        A delivery the broker makes again (a requeued one) or a copy that
        comes back from a retry queue (it carries C{x-death}) answers none:
        the first outcome of that delivery was reported already.
        """
        if delivery.redelivered:
            return delivery
        got = delivery.message
        for index, (sent, waiter, redelivered) in enumerate(self._undelivered):
            if (
                sent.id == got.id
                and sent.topic == got.topic
                and sent.headers == got.headers
                and sent.body == got.body
            ):
                del self._undelivered[index]
                if redelivered:
                    delivery = _Redelivery(delivery)
                    got = delivery.message
                self._delivered[id(got)] = (got, waiter)
                return delivery
        return delivery

    def _on_settled(self, event: Settled) -> None:
        self.settled.append(event)
        found = self._delivered.get(id(event.message))
        if found is not None and found[0] is event.message:
            del self._delivered[id(event.message)]
            found[1].callback(event)

    def _remove_state_dir(self) -> None:
        path = self._own_state_dir
        if path is not None:
            self._own_state_dir = None
            shutil.rmtree(path, ignore_errors=True)
            _left_behind.discard(path)

    def _turn(self) -> None:
        if isinstance(self.clock, Clock):
            for _ in range(10):
                self.clock.advance(0)

    def start(self) -> None:
        """
        Start the bus and the consumer (the plugin's C{start} included).
        """
        self.bus.startService()
        self.service.startService()
        self._turn()

    def stop(self) -> Deferred[None]:
        """
        Stop the consumer (draining, then the plugin's C{stop}) and the bus,
        then remove the temporary state directory the harness made (not one
        given with C{hub}).
        """
        d: Deferred[Any] = self.service.stopService()
        d.addCallback(lambda _: self.bus.stopService())

        def removed(result: object) -> object:
            self._remove_state_dir()
            return result

        d.addBoth(removed)
        self._turn()
        return d

    def deliver(
        self,
        message: Message | str,
        body: Mapping[str, Any] | None = None,
        *,
        redelivered: bool = False,
        **fields: Any,
    ) -> Deferred[Settled]:
        """
        Publish a message to the consumer's queue and return a Deferred that
        fires with its L{Settled} once the consumer decided its fate, or
        fails when the bus refuses the message (with
        L{fedhub.errors.MessageReturned} when the consumer's queue is not
        bound to its topic).

        Every call is one delivery with its own outcome, also when the same
        message (or one with the same id) is delivered again before or after.

        @param message: A L{Message}, or a topic to build one from with
            C{body} and C{fields} (see L{Message.create}).
        @param redelivered: Deliver it flagged redelivered, as the broker
            flags a message it delivered before (after a lost connection, a
            requeue or a consumer timeout), to test how the handler treats
            such a message.  The C{redelivered} flag of C{message} itself
            is not carried: the broker, not the publisher, sets it.
        """
        if not isinstance(message, Message):
            message = Message.create(message, body or {}, **fields)
        waiter: Deferred[Settled] = Deferred()
        entry = (message, waiter, bool(redelivered))
        self._undelivered.append(entry)

        def refused(failure: Any) -> None:
            if entry in self._undelivered:
                self._undelivered.remove(entry)
            if not waiter.called:
                waiter.errback(self._why_refused(failure, message))

        self.bus.publish(message).addErrback(refused)
        self._turn()
        return waiter

    def _why_refused(self, failure: Any, message: Message) -> Any:
        """
        The failure for a delivery the bus refused: when the reason is that
        the consumer is not consuming (the harness was not started, or the
        plugin's C{start()} failed, so the queue is not declared yet), an
        error of the same kind that says so, rather than the bus's word for
        it, which would suggest a topic the queue is not bound to.
        """
        if self.service.consuming:
            return failure
        if failure.check(NotConnected) and not self.service.running:
            return Failure(
                NotConnected(
                    "the harness is not started: call harness.start() before harness.deliver()",
                    message.id,
                )
            )
        error = self.service.start_error
        if failure.check(MessageReturned) and error is not None:
            return Failure(
                MessageReturned(
                    "the consumer is not consuming, so its queue is not declared yet: its "
                    f"plugin's start() failed ({error}); the consumer calls it again 1 s after "
                    "the first failure, the wait doubling",
                    message.id,
                )
            )
        return failure

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass on the fake clock (retry delays, plugin timers).

        @raise TypeError: when the harness was given a real reactor: time
            passes by itself then, and a test waits for it, for example
            with C{deferLater(reactor, seconds)}.
        """
        if not isinstance(self.clock, Clock):
            raise TypeError(
                "advance() moves the harness's fake Clock, and this harness runs on a real "
                f"reactor ({type(self.clock).__name__}): time passes by itself; wait for it, "
                "for example with twisted.internet.task.deferLater(reactor, seconds)"
            )
        self.clock.advance(seconds)
        self._turn()

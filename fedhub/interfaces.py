"""
The roles of fedhub, as small zope interfaces.

Twisted already uses C{IProducer}/C{IConsumer} for flow control, so fedhub's
roles carry other names:

  - L{IPublisher}: where a component hands over messages for its domain;
  - L{IBus}: a transport (in-process or AMQP) for one security domain;
  - L{IDelivery} and L{ISubscription}: what a transport gives a subscriber;
  - L{IConsumerPlugin} builds an L{IMessageHandler} (the code that reacts to
    messages); L{IProducerPlugin} builds a message source (an C{IService}
    that publishes).

Plugins are found with C{twisted.plugin.getPlugins} by these interfaces; see
L{fedhub.plugins}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from fedhub.message import Message
    from fedhub.plugins import PluginContext
    from fedhub.topology import Topology


class IPublisher(Interface):
    """
    Takes messages for one security domain.

    Producers and consumer plugins receive one for their own domain and never
    see the transport behind it.
    """

    domain = Attribute("str: the name of the domain messages go to")

    def publish(message: Message) -> Deferred[None]:
        """
        Hand a message over.

        @param message: a L{fedhub.message.Message}.
        @return: a Deferred that fires with C{None} once the hand-over is done:
            durable in the outbox when the hub has one, accepted by the broker
            for a bare transport.  It fails with
            L{fedhub.errors.TemporarilyUnavailable} when the message can not be
            taken now but may be later, or with L{fedhub.errors.PublishError}
            or L{fedhub.errors.MessageError} when it never will be.
        """


class IDelivery(Interface):
    """
    One message delivered to a subscriber, waiting for its verdict.

    Exactly one of L{ack} and L{reject} is called for each delivery; later
    calls are ignored.  Both say whether their verdict reached the queue:
    once the delivery's channel or subscription is gone, the broker has put
    the message back and delivers it again, and the verdict is dropped.
    """

    message = Attribute("Message: the decoded message (its C{queue} set)")
    redelivered = Attribute("bool: the broker delivered it before")
    queue = Attribute("str: the queue it came from")
    live = Attribute(
        "bool: a verdict would still reach the queue (none was given, and the "
        "channel or subscription it came on is still there)"
    )

    def ack() -> bool:
        """
        The message is handled: remove it from its queue.

        @return: C{True} when the acknowledgement went to the queue;
            C{False} when it was dropped (a verdict was given already, or
            the channel or subscription is gone, so the message is
            delivered again).
        """

    def reject(requeue: bool) -> bool:
        """
        The message is not handled.

        @param requeue: C{True} puts it back in its queue for another
            delivery (on AMQP a C{basic.nack} with requeue: a put-back, not
            a failed delivery, to RabbitMQ 4.3 and later); C{False}
            dead-letters it when the queue has a dead-letter exchange, and
            drops it otherwise (C{basic.reject}).
        @return: Like L{ack}'s.
        """


class ISubscription(Interface):
    """
    A running subscription of a handler to a queue.

    One may also have C{stop_consuming()}, returning a Deferred that never
    fails: the bus delivers nothing more on it (the Deferred fires once
    that is sure), while what it delivered can still be acknowledged or
    rejected, a rejection with requeue going to the queue's other
    consumers; C{cancel()} ends it.  An AMQP subscription has it (a
    C{basic.cancel}); a consumer uses it when there.
    """

    queue = Attribute("str: the queue consumed from")
    consuming = Attribute(
        "bool: whether deliveries can come now; false while it waits to consume "
        "again (after a reconnect, or a cancel by the broker) and once cancelled"
    )

    def cancel() -> Deferred[None]:
        """
        Stop consuming.  Unacknowledged deliveries go back to the queue.

        @return: a Deferred firing when no more deliveries will come.
        """


class IBus(Interface):
    """
    A message transport for one security domain: the in-process bus or a
    broker connection.  Providers are also C{IService}s: work starts in
    C{startService}, and C{stopService} waits for it.
    """

    domain = Attribute("str: the name of the domain this bus serves")
    exchange = Attribute("str: the exchange messages are published to by default")
    connected = Attribute("bool: whether the bus can take messages now")

    def declare(topology: Topology) -> Deferred[None]:
        """
        Make sure exchanges, queues and bindings exist, and remember them so
        they are declared again after a reconnect.

        @param topology: a L{fedhub.topology.Topology}.
        @return: a Deferred firing with C{None} when they exist.
        """

    def publish(
        message: Message, exchange: str | None = None, routing_key: str | None = None
    ) -> Deferred[None]:
        """
        Publish one message persistently with C{mandatory} set.

        @param exchange: the exchange, default L{exchange}.
        @param routing_key: the routing key, default the message's topic.
        @return: a Deferred firing with C{None} when the broker took
            responsibility for the message (its confirm).  It fails with
            L{fedhub.errors.MessageReturned} when no queue is bound for it,
            L{fedhub.errors.MessageNacked} when the broker refused it and
            L{fedhub.errors.NotConnected} when there is no connection.  A bus
            that can not take more for now (a full queue, a blocked broker)
            delays the Deferred: that is how it pushes back on publishers.
        """

    def subscribe(
        queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> Deferred[ISubscription]:
        """
        Consume from a declared queue, and again after every reconnect.

        @param queue: the queue name.
        @param on_delivery: called with an L{IDelivery} for each message;
            whatever it returns is ignored, and it must not raise.
        @param prefetch: at most this many deliveries are unacknowledged at
            once.
        @return: a Deferred firing with an L{ISubscription}.
        """


class IMessageHandler(Interface):
    """
    The code of a consumer: what a consumer plugin builds.

    Its methods run in the hub's event loop and must not block: a call that
    holds it longer than the consumer's C{blocking_warning} is logged and
    counted (L{fedhub.consumers.blocking}), but nothing interrupts it, and
    meanwhile nothing else in the hub runs.

    A handler that holds messages back to work on them together (batches
    written or run after a delay) may also have a C{drain()} method, which
    the consumer calls when it begins to stop, before it waits up to its
    C{drain_timeout} for the messages in hand: the handler should finish
    them now, so that their verdicts reach the broker before the
    subscription ends.  Its result is ignored; it must not raise.

    A handler whose messages may take long (minutes, like C{exec}'s runs)
    may also have a true C{long_running} attribute: its consumer then holds
    only the messages it handles, none waiting behind them (see
    L{fedhub.consumers.runner.prefetch_for}).
    """

    topics = Attribute("tuple[str, ...]: the topic patterns (AMQP C{*}/C{#}) it wants")

    def handle(message: Message) -> Any:
        """
        Handle one message.

        @return: anything, a Deferred or a coroutine.  Success acknowledges
            the message.  Raising (or failing with) a L{fedhub.errors.Verdict}
            decides its fate; any other exception is handled by the consumer's
            failure policy.
        """

    def start() -> Any:
        """
        Called before the first message; may return a Deferred.  One that
        raises or fails has not started: it is called again later (the
        consumer tries its start again), so it should release what it took
        before failing.
        """

    def stop() -> Any:
        """
        Called once after the last message has been handled; may return a
        Deferred.  It is called whenever the consumer stops, also when
        C{start()} never succeeded (it raised at every attempt) or has not
        ended within C{drain_timeout}, so it must cope with a handler that
        did not start, or is still starting.

        Two more methods are optional, asked for with C{getattr}:
        C{drain()}, called when the consumer begins to stop, before it waits
        up to C{drain_timeout} for the calls in progress (a handler can then
        finish early what it holds, or give back with
        L{fedhub.errors.NotHandled} what it has not begun); and
        C{abandon(message)}, called when the consumer forgets a call in
        progress because the message's channel closed (the broker delivers
        the message again): a handler that has not begun on it yet can drop
        it, its call failing with L{fedhub.errors.NotHandled}.
        """


class IConsumerPlugin(Interface):
    """
    A kind of consumer, found by name with C{twisted.plugin.getPlugins}.
    """

    name = Attribute("str: the name a configuration uses in C{plugin = ...}")
    description = Attribute("str: one line saying what it does")
    options = Attribute(
        "Mapping[str, fedhub.config.Option]: its own configuration keys, checked "
        "before it is built"
    )

    def build(context: PluginContext) -> IMessageHandler:
        """
        Build a handler.  Must do no I/O.

        @param context: a L{fedhub.plugins.PluginContext}.
        @return: an L{IMessageHandler}.
        """


class IProducerPlugin(Interface):
    """
    A kind of producer (a message source), found by name with
    C{twisted.plugin.getPlugins}.
    """

    name = Attribute("str: the name a configuration uses in C{plugin = ...}")
    description = Attribute("str: one line saying what it does")
    options = Attribute(
        "Mapping[str, fedhub.config.Option]: its own configuration keys, checked "
        "before it is built"
    )

    def build(context: PluginContext) -> IService:
        """
        Build the producer.  Must do no I/O.

        @param context: a L{fedhub.plugins.PluginContext}.
        @return: a C{twisted.application.service.IService} that publishes
            through C{context.publisher}.
        """

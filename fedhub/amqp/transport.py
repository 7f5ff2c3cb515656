"""
The AMQP transport: L{AMQPBus}, an L{IBus} on one RabbitMQ connection.

One bus serves one security domain and keeps one connection to its broker.

Connecting
==========

A L{Reconnector} (the state machine in L{fedhub.amqp.reconnect}) keeps the
connection: connect, prepare, and after a failure or a loss wait with capped
exponential backoff and jitter before the next attempt.  Preparing a
connection logs in, opens the publish channel in confirm mode, declares every
remembered topology again and resumes every subscription.  A connection whose
preparation fails (or takes longer than C{setup_timeout}) is dropped by the
reconnector itself, and a late close of it never reaches the current one.  A
failed attempt is named L{TLSFailed} or L{fedhub.errors.AccessRefused} where
fedhub has a name for it (L{AMQPBus.last_error}).

Publishing
==========

Every message is published persistently with C{mandatory} set and waits for
its publisher confirm: the Deferred from L{AMQPBus.publish} fires on
C{basic.ack}, fails with L{MessageNacked} on C{basic.nack}, with
L{MessageReturned} when the broker returned the message as unroutable (the
return arrives before the ack of the same message and is matched by message
id) and with L{NotConnected} when the connection is lost first, or when it
is dropped because a confirm took longer than C{confirm_timeout}: the outbox
then sends the message again.  Publishing to an exchange that does not exist
fails with L{NotFound}: each exchange is checked once per connection with a
passive declare before the first message goes to it, so a typo never costs
the publish channel and the messages in flight on it (and checked again
after the broker closed that channel with a C{404}: an exchange deleted
since its check).  In every case below, "in flight" takes in the messages
not written yet, which fail with the others so that the outbox, sending
them all again in order, keeps their order.  A publish the broker's
permissions forbid (C{403}: no write permission on the exchange, or a topic
permission) closes the publish channel: the messages it names fail with
L{PublishRefused}, which is final, later ones like them fail at once for
L{REFUSAL_HOLD} seconds instead of closing the channel again (then one is
sent again: the permissions may have been granted), and the other messages
in flight fail with L{NotConnected} to be sent again.  A message
whose body is larger than the broker takes (RabbitMQ's C{max_message_size})
closes the publish channel with C{406 PRECONDITION_FAILED} in the same way:
the bus reads the limit from the broker's reply, every message in flight
whose body is larger fails with L{MessageTooLarge}, which is final, later
ones like them fail at once for the rest of the connection, and the other
messages in flight fail with L{NotConnected} to be sent again.

Publishes wait (their Deferreds stay unfired, nothing is buffered in the
transport) while the broker has blocked the connection (a resource alarm),
while the transport's write buffer is full, and while C{max_in_flight}
messages wait for their confirms: that is how the bus pushes back.

Consuming
=========

Each subscription has its own channel with C{basic.qos} prefetch.  A message
whose body or headers can not be decoded into a L{Message} never reaches the
subscriber: it is rejected without requeue (so it is dead-lettered when its
queue has a dead-letter exchange, dropped otherwise), logged with the reason
and counted in L{AMQPBusStats.undecodable}.  When the broker cancels a
consumer (its queue was deleted, a node went down) or closes its channel,
the subscription consumes again, at once the first time and then with
backoff, so a queue that is gone for good does not cause a hot loop.

A subscription that stops consuming (L{AMQPSubscription.stop_consuming})
sends C{basic.cancel} and keeps its channel open, so that what it holds can
still be acknowledged, or rejected to go to the queue's other consumers;
L{AMQPSubscription.cancel} then closes the channel.

Channel errors (403, 404, 406) surface as L{AccessRefused}, L{NotFound} and
L{PreconditionFailed}; a topology or subscription that fails the first time
is forgotten, so it does not fail every reconnect.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from fedhub.amqp.codec import FieldTableError
from fedhub.amqp.protocol import (
    AMQPClient,
    ClientFactory,
    Credentials,
    IConnectionEvents,
    map_error,
)
from fedhub.amqp.reconnect import Reconnector, backoff
from fedhub.amqp.spec import load_spec
from fedhub.amqp.tls import ExplainedTLSOptions, RenewableTLSOptions, in_domain
from fedhub.amqp.url import AMQPSettings, endpoint_description, parse_url
from fedhub.errors import (
    ChannelError,
    ConfigError,
    DecodeError,
    MessageError,
    MessageNacked,
    MessageReturned,
    NotConnected,
    PublishError,
    TLSFailed,
)
from fedhub.interfaces import IBus, IDelivery, ISubscription
from fedhub.latch import Latch
from fedhub.logs import HubLogger
from fedhub.message import Message, from_amqp
from fedhub.text import escape_control
from fedhub.topology import Topology
from fedhub.waiting import with_timeout

_T = TypeVar("_T")

MAX_NAME_BYTES = 255
"""Exchange and queue names and routing keys are AMQP short strings."""

ACCESS_REFUSED = 403
"""The reply code of a publish the broker's permissions forbid."""

NOT_FOUND = 404
"""The reply code of a publish to an exchange that does not exist."""

REFUSAL_HOLD = 30.0
"""Seconds a publish the broker's permissions refused (C{403}) makes later
ones like it fail at once, without closing the publish channel again; then
they are sent again: the permissions may have been granted meanwhile."""

PRECONDITION_FAILED = 406
"""The reply code of, among others, a publish larger than the broker takes."""

# RabbitMQ's reply to a body larger than its max_message_size ("configured"
# unless the limit is its built-in maximum).
_SIZE_REFUSED = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")


class PublishRefused(PublishError):
    """
    The broker's permissions forbid this publish (C{403 ACCESS_REFUSED}:
    no write permission on the exchange, or a topic permission refuses the
    routing key).  Sending it again changes nothing until an operator
    changes the permissions.

    @ivar exchange: The exchange published to.
    @ivar routing_key: The routing key published with.
    @ivar reply_code: The broker's reply code (403).
    @ivar reply_text: The broker's explanation.
    """

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        reply_code: int,
        reply_text: str,
        message_id: str | None = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.reply_code = reply_code
        self.reply_text = reply_text
        super().__init__(
            f"the broker refused publishing to exchange {exchange!r}: {reply_code} {reply_text}",
            message_id,
        )


class MessageTooLarge(PublishError):
    """
    The message's body is larger than the broker takes (RabbitMQ's
    C{max_message_size}).  Sending it again changes nothing until an
    operator raises the limit.

    @ivar size: The size of the message's body in bytes.
    @ivar limit: The largest body the broker takes, in bytes.
    @ivar reply_text: The broker's explanation (of this message's refusal,
        or of the one that taught the bus the limit).
    """

    def __init__(
        self, size: int, limit: int, reply_text: str, message_id: str | None = None
    ) -> None:
        self.size = size
        self.limit = limit
        self.reply_text = reply_text
        super().__init__(
            f"the message body ({size} bytes) is larger than the broker takes"
            f" (max_message_size {limit} bytes)",
            message_id,
        )


#: What OpenSSL's alerts and errors say when a certificate was refused: by
#: fedhub (verification), or by the broker (its alert names the reason).
_CERTIFICATE_REFUSALS = ("certificate", "unknown ca", "access denied")


def _expected_names(error: VerificationError) -> str:
    """
    The names a certificate was checked for, as text: C{the name
    'broker.example'} (service-identity's errors name the ids that did not
    match, each with its C{hostname} or C{ip}).
    """
    names = []
    for mismatch in getattr(error, "errors", None) or []:
        wanted = getattr(mismatch, "mismatched_id", None)
        name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name is not None:
            names.append(repr(escape_control(str(name), 100)))
    if not names:
        return "the expected name"
    return f"the name {' or '.join(names)} (server_hostname, or the broker URL's host)"


def _tls_failure(error: object, depth: int = 0, verify_error: str | None = None) -> TLSFailed | None:
    """
    The TLS failure inside what a failed connection attempt raised, if
    there is one (txamqp wraps the transport's reason in its own errors).

    @param verify_error: Why the broker's certificate did not verify (see
        L{fedhub.amqp.tls.ExplainedTLSOptions.explain_refusal}), added to
        OpenSSL's bare "certificate verify failed".
    """
    if depth > 6 or error is None:
        return None
    if isinstance(error, Failure):
        return _tls_failure(error.value, depth + 1, verify_error)
    if isinstance(error, VerificationError):
        return TLSFailed(
            f"the broker's certificate is not for {_expected_names(error)}", certificate=True
        )
    if isinstance(error, CertificateError):
        # No subjectAltName at all (see fedhub.tlsnames): its name can not
        # be checked, so it is refused whatever its common name.
        return TLSFailed(
            f"the broker's certificate names no host: {escape_control(str(error), 200)} (a "
            "server certificate needs its names as subjectAltName)",
            certificate=True,
        )
    if isinstance(error, SSL.Error):
        reasons = []
        if error.args and isinstance(error.args[0], list):
            reasons = [str(item[-1]) for item in error.args[0] if isinstance(item, tuple) and item]
        if verify_error:
            reasons = [
                f"{reason}: {verify_error}" if reason == "certificate verify failed" else reason
                for reason in reasons
            ]
        details = ", ".join(r for r in reasons if r) or str(error) or "SSL error"
        lowered = details.lower()
        return TLSFailed(details, certificate=any(word in lowered for word in _CERTIFICATE_REFUSALS))
    if isinstance(error, BaseException):
        for arg in error.args:
            found = _tls_failure(arg, depth + 1, verify_error)
            if found is not None:
                return found
        # The protocol raises its own error "from None": the original is
        # still the context.
        return _tls_failure(error.__cause__ or error.__context__, depth + 1, verify_error)
    return None


def _attempt_error(
    failure: Failure, options: ExplainedTLSOptions | None = None, client_cert: str | None = None
) -> BaseException:
    """
    Why a connection attempt failed, as fedhub names it: L{TLSFailed} for a
    failed TLS handshake (with why the broker's certificate did not verify,
    when C{options} saw it; with the file of the client certificate
    C{client_cert} when the broker's alert refused it), else what
    L{map_error} makes of it (for example L{fedhub.errors.AccessRefused} for
    a refused login or vhost).
    """
    found = _tls_failure(failure.value)
    if found is None:
        return map_error(failure)
    if options is not None and "certificate verify failed" in found.details:
        found = _tls_failure(failure.value, verify_error=options.explain_refusal()) or found
    elif client_cert and found.certificate and "alert" in found.details.lower():
        # An alert is the broker's verdict on the certificate the hub sent
        # (its own verification of the broker's fails as "verify failed").
        found = TLSFailed(
            f"{found.details} (the broker refused the client certificate {client_cert!r})",
            certificate=True,
        )
    return found


def _refuses(error: ChannelError, exchange: str, routing_key: str) -> bool:
    """
    Whether a 403 that closed the publish channel names this exchange (and,
    for a topic permission, this routing key).  RabbitMQ says e.g. C{access
    to exchange 'x' in vhost 'v' refused for user 'u'} or C{write access to
    topic 'k' in exchange 'x' in vhost 'v' refused ...}.
    """
    if error.reply_code != ACCESS_REFUSED:
        return False
    text = error.reply_text
    if f"exchange '{exchange}' in vhost" not in text:
        return False
    if "access to topic '" in text:
        return f"topic '{routing_key}' in exchange '{exchange}'" in text
    return True


def _size_limit(error: ChannelError) -> int | None:
    """
    The broker's largest message body in bytes, when C{error} (which closed
    the publish channel) refused a message as larger than that.
    """
    if error.reply_code != PRECONDITION_FAILED:
        return None
    found = _SIZE_REFUSED.search(error.reply_text)
    return int(found.group(2)) if found is not None else None


# --- publishing -----------------------------------------------------------------


#: How many exchange names and routing keys a bus remembers as checked.
_GOOD_NAMES = 1024


class PublishOutcome(Protocol):
    """
    What L{AMQPBus.publish_to} reports a message's outcome to; a
    L{Deferred} is one.
    """

    def callback(self, result: None) -> object:
        """The broker confirmed the message."""

    def errback(self, fail: BaseException) -> object:
        """The message failed: the error L{AMQPBus.publish}'s Deferred fails with."""


@dataclass(eq=False)
class _Pending:
    """
    One published message, waiting to be sent or for its confirm.
    """

    message: Message
    exchange: str
    routing_key: str
    outcome: PublishOutcome
    seq: int = 0
    deadline: float = 0.0
    returned: tuple[int, str] | None = None


@dataclass
class AMQPBusStats:
    """
    Counters of one bus, for metrics and the status page.

    @ivar published: Messages written to the broker.
    @ivar confirmed: Messages the broker confirmed (returned ones included).
    @ivar returned: Messages returned as unroutable.
    @ivar nacked: Messages the broker refused.
    @ivar delivered: Deliveries handed to subscribers.
    @ivar acked: Deliveries acknowledged.
    @ivar rejected: Deliveries rejected (undecodable ones included).
    @ivar undecodable: Deliveries rejected because they were not valid messages.
    @ivar connections: Connections that became usable.
    @ivar connection_losses: Usable connections that were lost.
    @ivar confirm_timeouts: Connections dropped because a confirm took too long.
    """

    published: int = 0
    confirmed: int = 0
    returned: int = 0
    nacked: int = 0
    delivered: int = 0
    acked: int = 0
    rejected: int = 0
    undecodable: int = 0
    connections: int = 0
    connection_losses: int = 0
    confirm_timeouts: int = 0


# --- consuming ------------------------------------------------------------------


@implementer(IDelivery)
class AMQPDelivery:
    """
    One message delivered by the broker, waiting for its verdict.

    @ivar message: The decoded message, its C{queue} set.
    @ivar redelivered: Whether the broker delivered it before.
    @ivar queue: The queue it came from.
    @ivar delivery_tag: The broker's tag for it on its channel.
    """

    __slots__ = ("message", "redelivered", "queue", "delivery_tag", "_consumer", "_settled")

    def __init__(
        self,
        message: Message,
        redelivered: bool,
        queue: str,
        consumer: _Consumer,
        delivery_tag: int,
    ) -> None:
        self.message = message
        self.redelivered = redelivered
        self.queue = queue
        self.delivery_tag = delivery_tag
        self._consumer = consumer
        self._settled = False

    @property
    def live(self) -> bool:
        """
        Whether a verdict would still be written: none was given, and the
        channel it came on is open.
        """
        return not self._settled and self._consumer.open

    def ack(self) -> bool:
        """
        The message is handled: remove it from its queue.  Later calls (and
        calls after the channel closed, when the broker has put the message
        back already) do nothing and return C{False}.

        @return: whether the acknowledgement was written.
        """
        if self._settled:
            return False
        self._settled = True
        return self._consumer.settle(self.delivery_tag, True, False)

    def reject(self, requeue: bool) -> bool:
        """
        The message is not handled: requeue it, or dead-letter (or drop) it.

        @return: whether the rejection was written (see L{ack}).
        """
        if self._settled:
            return False
        self._settled = True
        return self._consumer.settle(self.delivery_tag, False, bool(requeue))


#: How many deliveries a coalescing consumer remembers as settled behind
#: one that is not (a handler still at work on it) before it stops
#: coalescing: a delivery never settled must not make it remember forever.
_SETTLED_BEHIND_MAX = 10_000


class _Consumer:
    """
    A subscription's consumer on one connection: its channel and tag.

    Acknowledgements decided while the connection handles the frames of a
    read (a handler that answers at once) are held back until every frame
    of the read is handled, then written as one C{basic.ack} with
    C{multiple} for the run of held-back deliveries at the head of the
    channel's unsettled ones, and one C{basic.ack} each for the rest.  The
    broker then handles one acknowledgement for a read's worth of messages.
    Everything else (rejections, acknowledgements decided later) is written
    at once.

    Only a consumer on a channel it opened coalesces: on a channel it
    consumes from again (after the broker cancelled its consumer there),
    older deliveries of the channel could be under a C{multiple}.

    @ivar unsettled: A coalescing consumer's delivery tags, in delivery
        order, from the first not yet acknowledged or rejected on the wire.
    @ivar written: Tags in L{unsettled} behind its head whose
        acknowledgement or rejection was written.
    @ivar held: Tags whose acknowledgement is held back.
    """

    def __init__(
        self, session: _Session, subscription: AMQPSubscription, tag: str, coalesce: bool = False
    ) -> None:
        self.session = session
        self.subscription = subscription
        self.tag = tag
        self.channel: Any = None
        self.active = False
        self.coalesce = coalesce
        self.unsettled: deque[int] = deque()
        self.written: set[int] = set()
        self.held: set[int] = set()

    @property
    def open(self) -> bool:
        """
        Whether this consumer's channel is open on a live connection.
        """
        # Delivery tags belong to the channel object, not to its number: once
        # the broker closed the channel (a consumer timeout, say) it has put
        # the message back, and a channel opened since may have the same
        # number, where a tag of this one names another delivery.
        channel = self.channel
        if channel is None or channel.closed or not self.session.alive:
            return False
        # Nor may a channel being closed (the subscription was cancelled)
        # carry acknowledgements: the broker puts its messages back.
        client = self.session.client
        return client.channels.get(channel.id) is channel and client.channel_is_open(channel.id)

    def settle(self, delivery_tag: int, ack: bool, requeue: bool) -> bool:
        """
        Write an acknowledgement or rejection, or hold an acknowledgement
        back (see the class); whether it was written or held.
        """
        if not self.open:
            return False
        session = self.session
        channel = self.channel
        client = session.client
        stats = session.bus.stats
        if ack:
            if self.coalesce and client.receiving:
                if not self.held:
                    session.holding.append(self)
                self.held.add(delivery_tag)
                stats.acked += 1
                return True
            sent = client.send_method(channel.id, "basic.ack", delivery_tag, False)
            stats.acked += sent
        elif requeue:
            # A put-back (the consumer stopping, a message given back), not
            # a failure: basic.nack, which RabbitMQ 4.3 and later do not
            # count against a quorum queue's delivery-limit as they count
            # basic.reject.
            sent = client.send_method(channel.id, "basic.nack", delivery_tag, False, True)
            stats.rejected += sent
        else:
            sent = client.send_method(channel.id, "basic.reject", delivery_tag, False)
            stats.rejected += sent
        if sent:
            self._written(delivery_tag)
        return sent

    def _pop_head(self) -> int:
        """
        Drop the first of L{unsettled}, and the written ones right behind
        it (so the head is never one already written); return it.
        """
        unsettled = self.unsettled
        written = self.written
        tag = unsettled.popleft()
        while unsettled and unsettled[0] in written:
            written.discard(unsettled.popleft())
        return tag

    def _written(self, delivery_tag: int) -> None:
        """
        Forget a coalescing consumer's delivery whose acknowledgement or
        rejection was just written, or remember it behind the head.
        """
        if not self.coalesce:
            return
        if self.unsettled and self.unsettled[0] == delivery_tag:
            self._pop_head()
            return
        self.written.add(delivery_tag)
        if len(self.written) > _SETTLED_BEHIND_MAX:
            self.coalesce = False
            self.unsettled.clear()
            self.written.clear()

    def flush(self) -> None:
        """
        Write the acknowledgements held back.
        """
        held = self.held
        if not held:
            return
        self.held = set()
        session = self.session
        channel = self.channel
        if not self.open:
            # The broker has put these messages back with the channel.
            session.bus.stats.acked -= len(held)
            return
        unsettled = self.unsettled
        last = 0
        run = 0
        while unsettled and unsettled[0] in held:
            last = self._pop_head()
            held.discard(last)
            run += 1
        send = session.client.send_method
        if run:
            send(channel.id, "basic.ack", last, run > 1)
        # Behind a delivery not settled yet: one at a time.
        for tag in held:
            send(channel.id, "basic.ack", tag, False)
            self._written(tag)


@implementer(ISubscription)
class AMQPSubscription:
    """
    A subscription of a handler to a queue; it consumes again after every
    reconnect until cancelled.

    @ivar queue: The queue consumed from.
    @ivar prefetch: Deliveries unacknowledged at once, at most.
    @ivar started: Whether it ever consumed.
    @ivar cancelled: Whether L{cancel} was called.
    @ivar last_error: Why the broker refused to let it consume again (its
        queue gone, say), while it retries; C{None} once it consumes.
    """

    @property
    def consuming(self) -> bool:
        """
        Whether the broker has its consumer now: false from a lost
        connection, a consumer cancelled or a channel closed by the broker
        until C{basic.consume} succeeds again (for ever if its queue is
        gone), and once it stopped consuming or was cancelled.
        """
        consumer = self.consumer
        return (
            not self.cancelled
            and not self.stopped
            and consumer is not None
            and consumer.active
            and consumer.open
        )

    def __init__(
        self, bus: AMQPBus, queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.started = False
        self.stopped = False
        self.cancelled = False
        self.last_error: str | None = None
        self.consumer: _Consumer | None = None
        self.retries = 0
        self.retry_call: IDelayedCall | None = None
        self.waiters: list[Deferred[ISubscription]] = []
        self.starting = False
        # The consumer whose basic.consume was sent and awaits its answer.
        self.pending: _Consumer | None = None
        self._bus = bus
        self._gone = Latch()
        # The broker answered stop_consuming's basic.cancel (or could not).
        self._answered = Latch()

    def stop_consuming(self) -> Deferred[None]:
        """
        Ask the broker to deliver nothing more, keeping the channel open:
        C{basic.cancel} for the consumer's tag.  The deliveries it holds
        stay unacknowledged and may still be acknowledged or rejected on the
        channel, and a rejection with requeue now goes to the queue's other
        consumers, never back to this one (the broker handles the methods
        of a channel in order).  Deliveries the broker sent before it had
        the C{basic.cancel} still reach the subscriber.  It does not consume
        again after a reconnect or a cancel by the broker; L{cancel} ends
        it.

        @return: a Deferred firing once the broker answered with
            C{basic.cancel-ok} (no more deliveries will come), or once its
            channel or connection is gone, or after the bus's
            C{close_timeout}; it never fails.
        """
        if not self.stopped:
            self.stopped = True
            self._bus._stop_consuming(self).addBoth(lambda _: self._answered.fire())
        return self._answered.wait()

    def cancel(self) -> Deferred[None]:
        """
        Stop consuming.  The channel is closed, so the broker puts every
        delivery not acknowledged or rejected yet back in the queue.

        @return: a Deferred firing when no more deliveries will come.
        """
        if not self.cancelled:
            self.cancelled = True
            self._bus._cancel(self).addBoth(lambda _: self._gone.fire())
        return self._gone.wait()


@dataclass(eq=False)
class _Declared:
    """
    A topology the bus declares again after every reconnect.
    """

    topology: Topology
    confirmed: bool = False
    waiters: list[Deferred[None]] = field(default_factory=list)
    session: _Session | None = None


# --- one connection ---------------------------------------------------------


@implementer(IConnectionEvents)
class _Session:
    """
    The state of the bus on one connection: the publish channel and its
    confirms, consumers, and the channel declarations run on.
    """

    log = HubLogger()

    def __init__(self, bus: AMQPBus, client: AMQPClient) -> None:
        self.bus = bus
        self.client = client
        self.clock = bus._reactor
        self.alive = True
        self.publish_channel: Any = None
        self.next_seq = 1
        self.unconfirmed: OrderedDict[int, _Pending] = OrderedDict()
        # The sequence numbers of unconfirmed messages by message id (to
        # match a basic.return): one number, or a list for an id sent twice.
        self.by_id: dict[str, int | list[int]] = {}
        self.waiting: deque[_Pending] = deque()
        self.consumers: dict[str, _Consumer] = {}
        # Consumers holding acknowledgements back until the frames of the
        # current read are handled.
        self.holding: list[_Consumer] = []
        self.declare_channel: Any = None
        self.declare_lock = DeferredLock()
        self.known_exchanges: set[str] = {""}
        self.checking: str | None = None
        # The exchanges found missing by their check (404), with the error
        # and when; an exchange leaves once a check finds it.
        self.missing: dict[str, tuple[ChannelError, float]] = {}
        self.confirm_call: IDelayedCall | None = None
        # The broker's 403 refusals of publishes, with when they came (the
        # clock's seconds); each holds for REFUSAL_HOLD seconds.
        self.refusals: list[tuple[ChannelError, float]] = []
        # The largest body the broker takes, once a refusal named it, and
        # that refusal's text.
        self.body_limit: int | None = None
        self.body_limit_text = ""
        self.reopening = False
        self.drained = Latch()
        self.drained.fire()

    # -- channels ---------------------------------------------------------

    async def open_publish_channel(self) -> None:
        channel = await self.client.open_channel()
        try:
            await channel.confirm_select(nowait=False)
        except Exception as e:
            raise map_error(e) from None
        self.publish_channel = channel
        self.next_seq = 1

    async def _declaring_channel(self) -> Any:
        channel = self.declare_channel
        if channel is None or channel.closed:
            channel = self.declare_channel = await self.client.open_channel()
        return channel

    async def run_declaring(self, action: Callable[[Any], Deferred[_T]]) -> _T:
        """
        Run C{action} with the declaration channel, one action at a time; the
        channel is opened again after the broker closed it for an error.
        """
        await self.declare_lock.acquire()
        try:
            if not self.alive:
                raise NotConnected("the connection is gone")
            channel = await self._declaring_channel()
            try:
                return await action(channel)
            except Exception as e:
                raise map_error(e) from None
        finally:
            self.declare_lock.release()

    async def declare(self, topology: Topology, passive: bool) -> None:
        """
        Declare (or with C{passive}, check) the exchanges and queues of a
        topology, then bind (bindings are skipped when passive).
        """

        async def run(channel: Any) -> None:
            for exchange in topology.exchanges:
                if exchange.name == "":
                    continue
                await channel.exchange_declare(
                    exchange=exchange.name,
                    type=exchange.type,
                    passive=passive,
                    durable=exchange.durable,
                    auto_delete=False,
                    internal=False,
                    no_wait=False,
                    arguments={},
                )
                self.known_exchanges.add(exchange.name)
            for queue in topology.queues:
                await channel.queue_declare(
                    queue=queue.name,
                    passive=passive,
                    durable=queue.durable,
                    exclusive=queue.exclusive,
                    auto_delete=queue.auto_delete,
                    no_wait=False,
                    arguments=dict(queue.arguments),
                )
            if passive:
                return
            for binding in topology.bindings:
                await channel.queue_bind(
                    queue=binding.queue,
                    exchange=binding.exchange,
                    routing_key=binding.routing_key,
                    no_wait=False,
                    arguments={},
                )

        await self.run_declaring(lambda channel: Deferred.fromCoroutine(run(channel)))

    # -- publishing -------------------------------------------------------

    def can_send(self) -> bool:
        client = self.client
        return (
            self.alive
            and self.publish_channel is not None
            and not self.publish_channel.closed
            and not client.blocked
            and client.writable
            and len(self.unconfirmed) < self.bus.max_in_flight
        )

    def enqueue(self, pending: _Pending) -> None:
        self.waiting.append(pending)
        self.pump()

    def pump(self) -> None:
        """
        Send waiting messages while the broker, the transport and the confirm
        window allow.
        """
        waiting = self.waiting
        while waiting and self.can_send():
            pending = waiting[0]
            if pending.exchange not in self.known_exchanges:
                self._check_exchange(pending.exchange)
                return
            waiting.popleft()
            refusal = self._refusal(pending) if self.refusing() else None
            if refusal is not None:
                pending.outcome.errback(refusal)
                continue
            self._send(pending)

    def refusing(self) -> bool:
        """
        Whether messages are checked against refusals before they go out:
        once the broker refused a publish on this connection.
        """
        return bool(self.refusals) or self.body_limit is not None

    def _refusal(self, pending: _Pending) -> PublishError | None:
        """
        The error for a message the broker refused on this connection
        already (same exchange, or same exchange and routing key; or a body
        larger than the limit it named), if any: it is not sent again, as
        that would only close the channel again.
        """
        limit = self.body_limit
        if limit is not None:
            size = len(pending.message.body_bytes)
            if size > limit:
                return MessageTooLarge(size, limit, self.body_limit_text, pending.message.id)
        if self.refusals:
            # Permissions may be granted meanwhile: a refusal is trusted for
            # a while, then a message like it is sent again (at the cost of
            # one channel closed, should the broker still refuse it).
            since = self.clock.seconds() - REFUSAL_HOLD
            self.refusals = [(e, when) for e, when in self.refusals if when > since]
        for error, _ in self.refusals:
            if _refuses(error, pending.exchange, pending.routing_key):
                return PublishRefused(
                    pending.exchange,
                    pending.routing_key,
                    error.reply_code,
                    error.reply_text,
                    pending.message.id,
                )
        return None

    def _send(self, pending: _Pending) -> None:
        message = pending.message
        seq = self.next_seq
        try:
            written = self.client.basic_publish(
                self.publish_channel.id,
                pending.exchange,
                pending.routing_key,
                message.body_bytes,
                message.encoded_properties(),
                mandatory=True,
            )
        except MessageError as e:
            pending.outcome.errback(e)
            return
        except (FieldTableError, KeyError, TypeError, ValueError) as e:
            pending.outcome.errback(
                MessageError(f"message {message.id} can not be encoded for AMQP: {e}")
            )
            return
        if not written:
            self.waiting.appendleft(pending)
            return
        self.next_seq += 1
        pending.seq = seq
        pending.deadline = self.clock.seconds() + self.bus.confirm_timeout
        if not self.unconfirmed:
            self.drained = Latch()
        self.unconfirmed[seq] = pending
        sent = self.by_id.get(message.id)
        if sent is None:
            self.by_id[message.id] = seq
        elif isinstance(sent, int):
            self.by_id[message.id] = [sent, seq]
        else:
            sent.append(seq)
        self.bus.stats.published += 1
        self._schedule_confirm_check()

    def _check_exchange(self, name: str) -> None:
        if self.checking is not None:
            return
        self.checking = name

        async def check() -> None:
            try:
                await self.run_declaring(
                    lambda channel: channel.exchange_declare(
                        exchange=name,
                        type="topic",
                        passive=True,
                        durable=False,
                        auto_delete=False,
                        internal=False,
                        no_wait=False,
                        arguments={},
                    )
                )
            except ChannelError as e:
                if name not in self.missing:
                    self.log.warn(
                        "Exchange {exchange} of domain {domain} can not be published to: {error}",
                        exchange=escape_control(name),
                        domain=self.bus.domain,
                        error=escape_control(str(e)),
                    )
                if e.reply_code == NOT_FOUND:
                    self.missing[name] = (e, self.clock.seconds())
                refused = [p for p in self.waiting if p.exchange == name]
                self.waiting = deque(p for p in self.waiting if p.exchange != name)
                for pending in refused:
                    pending.outcome.errback(type(e)(e.reply_code, e.reply_text))
            except Exception:
                # The connection went away: teardown fails what waits.
                return
            else:
                self.known_exchanges.add(name)
                self.missing.pop(name, None)
            finally:
                self.checking = None
            self.pump()

        Deferred.fromCoroutine(check())

    def _schedule_confirm_check(self) -> None:
        if self.confirm_call is not None or not self.unconfirmed or self.client.blocked:
            return
        oldest = next(iter(self.unconfirmed.values()))
        delay = max(0.0, oldest.deadline - self.clock.seconds())
        self.confirm_call = self.clock.callLater(delay, self._confirm_check)

    def _confirm_check(self) -> None:
        self.confirm_call = None
        if not self.alive or not self.unconfirmed or self.client.blocked:
            return
        oldest = next(iter(self.unconfirmed.values()))
        if self.clock.seconds() >= oldest.deadline:
            self.bus.stats.confirm_timeouts += 1
            self.log.error(
                "No publisher confirm for message {msg_id} within {timeout} s on domain"
                " {domain}; dropping the connection so unconfirmed messages are sent again",
                msg_id=oldest.message.id,
                timeout=self.bus.confirm_timeout,
                domain=self.bus.domain,
            )
            self.client.abort("publisher confirm timed out")
            return
        self._schedule_confirm_check()

    def _settle(self, seq: int, error: Exception | None) -> None:
        pending = self.unconfirmed.pop(seq)
        sent = self.by_id.get(pending.message.id)
        if sent == seq:
            del self.by_id[pending.message.id]
        elif isinstance(sent, list):
            if seq in sent:
                sent.remove(seq)
            if not sent:
                del self.by_id[pending.message.id]
        stats = self.bus.stats
        if error is None and pending.returned is not None:
            code, text = pending.returned
            error = MessageReturned(
                f"no queue is bound for {pending.routing_key!r} on exchange"
                f" {pending.exchange!r}: {code} {text}",
                pending.message.id,
                code,
            )
        if error is None:
            stats.confirmed += 1
            pending.outcome.callback(None)
        else:
            if isinstance(error, MessageReturned):
                stats.confirmed += 1
            pending.outcome.errback(error)

    def _confirmed(self, delivery_tag: int, multiple: bool, error: Callable[[_Pending], Exception] | None) -> None:
        bus = self.bus
        bus.confirming = True
        try:
            if multiple:
                unconfirmed = self.unconfirmed
                while unconfirmed:
                    seq = next(iter(unconfirmed))
                    if seq > delivery_tag:
                        break
                    self._settle(seq, error(unconfirmed[seq]) if error else None)
            elif delivery_tag in self.unconfirmed:
                pending = self.unconfirmed[delivery_tag]
                self._settle(delivery_tag, error(pending) if error else None)
            else:
                self.log.debug("Confirm for unknown delivery tag {tag}", tag=delivery_tag)
        finally:
            bus.confirming = False
        if not self.unconfirmed:
            # The confirm timer is left to run out: it finds nothing to time
            # then, or times the messages published meanwhile.  Cancelling
            # it here would make a timer per message where they go one at
            # a time.
            self.drained.fire()
        for callback in bus._after_confirms:
            try:
                callback()
            except Exception:
                self.log.failure("A callback after confirms failed on domain {domain}", domain=bus.domain)
        self.pump()

    # -- IConnectionEvents ----------------------------------------------------

    def basic_ack(self, channel_id: int, delivery_tag: int, multiple: bool) -> None:
        """The broker took responsibility for published messages."""
        if self.publish_channel is not None and channel_id == self.publish_channel.id:
            self._confirmed(delivery_tag, multiple, None)

    def basic_nack(self, channel_id: int, delivery_tag: int, multiple: bool) -> None:
        """The broker refused published messages."""
        if self.publish_channel is None or channel_id != self.publish_channel.id:
            return

        def nacked(pending: _Pending) -> Exception:
            self.bus.stats.nacked += 1
            self.log.warn(
                "The broker refused message {msg_id} ({topic}) on domain {domain}",
                msg_id=pending.message.id,
                topic=pending.routing_key,
                domain=self.bus.domain,
            )
            return MessageNacked("the broker refused the message (basic.nack)", pending.message.id)

        self._confirmed(delivery_tag, multiple, nacked)

    def basic_return(
        self,
        channel_id: int,
        reply_code: int,
        reply_text: str,
        exchange: str,
        routing_key: str,
        properties: Mapping[str, Any],
        body: bytes,
    ) -> None:
        """A message came back unroutable; its ack follows."""
        message_id = properties.get("message_id")
        sent = self.by_id.get(message_id) if isinstance(message_id, str) else None
        for seq in (sent,) if isinstance(sent, int) else sent or ():
            pending = self.unconfirmed.get(seq)
            if pending is not None and pending.returned is None:
                pending.returned = (reply_code, reply_text)
                self.bus.stats.returned += 1
                self.log.info(
                    "Message {msg_id} ({topic}) on domain {domain} was returned: no queue"
                    " is bound for it",
                    msg_id=message_id,
                    topic=escape_control(routing_key),
                    domain=self.bus.domain,
                )
                return
        self.log.warn(
            "A returned message matches nothing published: {msg_id}",
            msg_id=escape_control(str(message_id)),
        )

    def basic_deliver(
        self,
        channel_id: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: Mapping[str, Any],
        body: bytes,
    ) -> None:
        """A message for a subscriber: decode it and hand it over."""
        consumer = self.consumers.get(consumer_tag)
        if consumer is None or not consumer.active:
            # A cancelled consumer: its channel is closing, and the broker
            # puts the message back.
            return
        subscription = consumer.subscription
        stats = self.bus.stats
        try:
            message = from_amqp(
                routing_key, properties, body, queue=subscription.queue, redelivered=redelivered
            )
        except Exception as e:
            if not isinstance(e, DecodeError):
                # A bug of the decoder: the message is refused all the same,
                # or it would hold a prefetch slot until the channel closes.
                self.log.failure(
                    "Decoding message {msg_id} from queue {queue} failed unexpectedly",
                    msg_id=escape_control(str(properties.get("message_id")), 100),
                    queue=escape_control(subscription.queue),
                )
                e = DecodeError(f"the message could not be decoded ({type(e).__name__})")
            stats.undecodable += 1
            stats.rejected += self.client.send_method(
                channel_id, "basic.reject", delivery_tag, False
            )
            self.log.warn(
                "Rejected an undecodable message {msg_id} from queue {queue} of domain"
                " {domain}: {reason}",
                msg_id=escape_control(str(properties.get("message_id")), 100),
                queue=escape_control(subscription.queue),
                domain=self.bus.domain,
                reason=escape_control(e.reason, 300),
            )
            return
        stats.delivered += 1
        delivery = AMQPDelivery(message, redelivered, subscription.queue, consumer, delivery_tag)
        if consumer.coalesce:
            consumer.unsettled.append(delivery_tag)
        try:
            subscription.on_delivery(delivery)
        except Exception:
            self.log.failure(
                "A subscriber of queue {queue} raised on message {msg_id}",
                queue=escape_control(subscription.queue),
                msg_id=message.id,
            )

    def consumer_cancelled(self, channel_id: int, consumer_tag: str) -> None:
        """The broker cancelled a consumer: consume again."""
        consumer = self.consumers.pop(consumer_tag, None)
        if consumer is None:
            return
        consumer.active = False
        subscription = consumer.subscription
        self.log.warn(
            "The broker cancelled the consumer of queue {queue} on domain {domain}",
            queue=escape_control(subscription.queue),
            domain=self.bus.domain,
        )
        if subscription.stopped:
            # Its channel stays, for the verdicts on what it holds, until
            # the subscription is cancelled (which closes it).
            return
        if subscription.consumer is consumer:
            subscription.consumer = None
        self.bus._resume(subscription, consumer.channel)

    def channel_closed(self, channel_id: int, error: ChannelError) -> None:
        """The broker closed a channel: recover whatever used it."""
        if self.declare_channel is not None and self.declare_channel.id == channel_id:
            self.declare_channel = None
            return
        if self.publish_channel is not None and self.publish_channel.id == channel_id:
            self.log.error(
                "The broker closed the publish channel of domain {domain}: {error}",
                domain=self.bus.domain,
                error=escape_control(str(error)),
            )
            self.publish_channel = None
            if error.reply_code == ACCESS_REFUSED:
                # A publish the permissions forbid: the messages it names
                # fail for good (and so do later ones like them on this
                # connection); the others were discarded with the channel
                # and are sent again.
                self.refusals.append((error, self.clock.seconds()))
            elif error.reply_code == NOT_FOUND:
                # An exchange deleted since it was checked: every exchange
                # is checked again before its next message, so the one that
                # is gone fails its messages (NotFound) without closing the
                # channel again and again.
                self.known_exchanges = {""}
            limit = _size_limit(error)
            if limit is not None:
                # A body larger than the broker's max_message_size: that
                # message, and every other one that large, fails for good
                # (sending it again would only close the channel again);
                # the others were discarded with the channel and are sent
                # again.  The limit holds for this connection: the broker
                # may be reconfigured before the next one.
                self.body_limit = limit
                self.body_limit_text = error.reply_text

            def failure(pending: _Pending) -> Exception:
                refusal = self._refusal(pending) if self.refusing() else None
                if refusal is not None:
                    return refusal
                return NotConnected(f"the publish channel closed: {error}", pending.message.id)

            self._fail_unconfirmed(failure)
            # Those not written yet fail too: written first on the new
            # channel, they would overtake the failed ones when these are
            # sent again.
            self.fail_waiting(failure)
            self._reopen_publish_channel()
            return
        for tag, consumer in list(self.consumers.items()):
            if consumer.channel is not None and consumer.channel.id == channel_id:
                del self.consumers[tag]
                consumer.active = False
                subscription = consumer.subscription
                # A 406 here is usually RabbitMQ's consumer timeout: a
                # delivery was held longer than its consumer_timeout.
                self.log.warn(
                    "The broker closed the channel of the consumer of queue {queue} on"
                    " domain {domain} ({error}); consuming again, and the messages it"
                    " held come back redelivered",
                    queue=escape_control(subscription.queue),
                    domain=self.bus.domain,
                    error=escape_control(str(error)),
                )
                if subscription.consumer is consumer:
                    subscription.consumer = None
                self.bus._resume(subscription, None)

    def connection_blocked(self, reason: str) -> None:
        """Publishes wait; confirms may be late for as long, so stop timing them."""
        if self.confirm_call is not None and self.confirm_call.active():
            self.confirm_call.cancel()
        self.confirm_call = None

    def connection_unblocked(self) -> None:
        """Publishes flow again; confirms are timed afresh."""
        deadline = self.clock.seconds() + self.bus.confirm_timeout
        for pending in self.unconfirmed.values():
            pending.deadline = deadline
        self._schedule_confirm_check()
        self.pump()

    def writable_changed(self, writable: bool) -> None:
        """The transport's buffer drained (or filled)."""
        if writable:
            self.pump()

    def frames_handled(self) -> None:
        """The frames of a read are handled: write the acknowledgements held back."""
        if self.holding:
            holding, self.holding = self.holding, []
            for consumer in holding:
                consumer.flush()

    # -- recovery and teardown ------------------------------------------------

    def _reopen_publish_channel(self) -> None:
        if self.reopening or not self.alive:
            return
        self.reopening = True

        async def reopen() -> None:
            try:
                await self.open_publish_channel()
            except Exception as e:
                if self.alive:
                    self.log.error(
                        "Reopening the publish channel failed ({error}); reconnecting",
                        error=escape_control(str(e)),
                    )
                    self.client.abort("no publish channel")
                return
            finally:
                self.reopening = False
            self.by_id.clear()
            self.pump()

        Deferred.fromCoroutine(reopen())

    def _fail_unconfirmed(self, error: Callable[[_Pending], Exception]) -> None:
        if self.confirm_call is not None and self.confirm_call.active():
            self.confirm_call.cancel()
        self.confirm_call = None
        unconfirmed = list(self.unconfirmed.values())
        self.unconfirmed.clear()
        self.by_id.clear()
        for pending in unconfirmed:
            pending.outcome.errback(error(pending))
        self.drained.fire()

    def fail_waiting(self, error: Callable[[_Pending], Exception]) -> None:
        waiting, self.waiting = self.waiting, deque()
        for pending in waiting:
            pending.outcome.errback(error(pending))

    def teardown(self, why: str) -> None:
        """
        The connection is gone: fail every message not confirmed and every one
        waiting, and forget the consumers.
        """
        if not self.alive:
            return
        self.alive = False
        def lost(pending: _Pending) -> Exception:
            return NotConnected(why, pending.message.id)

        self._fail_unconfirmed(lost)
        self.fail_waiting(lost)
        for consumer in self.consumers.values():
            consumer.active = False
            if consumer.subscription.consumer is consumer:
                consumer.subscription.consumer = None
        self.consumers.clear()


# --- the bus -----------------------------------------------------------------------


@implementer(IBus)
class AMQPBus(Service):
    """
    An L{IBus} on one RabbitMQ connection, for one security domain.

    @ivar domain: The domain's name.
    @ivar exchange: The default exchange for publishing.
    @ivar settings: Where and how to connect.
    @ivar stats: Counters for metrics.
    @ivar confirm_timeout: Seconds a publisher confirm may take before the
        connection is dropped.
    @ivar max_in_flight: Messages waiting for confirms at once, at most.
    @ivar close_timeout: Seconds a connection may take to close (when the
        bus stops, or after the broker closed it) before it is dropped.
    @ivar confirming: Whether a publisher confirm is settling the messages
        it covers right now (see L{call_after_confirms}).
    @ivar passive_declares: Only check that exchanges and queues exist, and
        leave bindings to the broker's administrator.
    """

    log = HubLogger()

    def __init__(
        self,
        domain: str,
        settings: AMQPSettings,
        *,
        reactor: Any,
        exchange: str = "amq.topic",
        confirm_timeout: float = 30.0,
        max_in_flight: int = 1000,
        passive_declares: bool = False,
        reconnect_initial: float = 1.0,
        reconnect_max: float = 60.0,
        setup_timeout: float = 30.0,
        close_timeout: float = 5.0,
        endpoint: IStreamClientEndpoint | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """
        @param reactor: The reactor (for time and, unless C{endpoint} is given,
            for connecting).
        @param endpoint: Connect with this instead of the settings' address
            (tests, proxies).
        @param rand: The source of jitter for reconnect delays.
        """
        if confirm_timeout <= 0:
            raise ValueError("confirm_timeout must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.domain = domain
        self.exchange = exchange
        self.settings = settings
        self.confirm_timeout = confirm_timeout
        self.max_in_flight = max_in_flight
        self.passive_declares = passive_declares
        self.setup_timeout = setup_timeout
        self.close_timeout = close_timeout
        self.stats = AMQPBusStats()
        self._reactor = reactor
        self._endpoint = endpoint
        self._retry_delay = backoff(reconnect_initial, reconnect_max, rand=rand)
        self._reconnector: Reconnector | None = None
        self._session: _Session | None = None
        self._declared: list[_Declared] = []
        self._subscriptions: list[AMQPSubscription] = []
        self._tags = 0
        self._stopping = False
        self._connected_waiters: list[Deferred[None]] = []
        self.confirming = False
        self._after_confirms: list[Callable[[], object]] = []
        # Exchange names and routing keys found short enough already: most
        # messages go to a few topics.
        self._good_names: set[str] = set()

    @classmethod
    def from_domain(cls, domain: Any, reactor: Any, **options: Any) -> AMQPBus:
        """
        Build the bus of a configured domain (a L{fedhub.config.DomainConfig}:
        C{name}, C{broker} (the URL), C{exchange}, C{ca}, C{cert}, C{key},
        C{server_hostname}, C{auth_mechanism}, C{heartbeat},
        C{connection_name}, C{connection_timeout}, C{confirm_window},
        C{reconnect_delay}, C{reconnect_max_delay}, C{passive_declares}).
        Does no I/O.

        @param options: More keyword arguments for the constructor.
        @raise fedhub.errors.ConfigError: when the settings are not usable.
        """
        name = domain.name
        settings = parse_url(domain.broker, key=f"domains.{name}.broker")
        changes: dict[str, Any] = {}
        for attribute, setting in (
            ("ca", "ca"),
            ("cert", "cert"),
            ("key", "key"),
            ("server_hostname", "server_hostname"),
            ("connection_name", "connection_name"),
            ("auth_mechanism", "mechanism"),
            ("heartbeat", "heartbeat"),
            ("connection_timeout", "connection_timeout"),
        ):
            value = getattr(domain, attribute, None)
            if value is not None:
                changes[setting] = value
        if not changes.get("connection_name") and not settings.connection_name:
            changes["connection_name"] = f"fedhub {name}"
        settings = settings.with_changes(**changes)
        window = getattr(domain, "confirm_window", None)
        if window is not None:
            options.setdefault("max_in_flight", window)
        options.setdefault("passive_declares", bool(getattr(domain, "passive_declares", False)))
        for attribute, option in (("reconnect_delay", "reconnect_initial"),
                                  ("reconnect_max_delay", "reconnect_max")):
            value = getattr(domain, attribute, None)
            if value is not None:
                options.setdefault(option, value)
        return cls(
            name,
            settings,
            reactor=reactor,
            exchange=getattr(domain, "exchange", None) or "amq.topic",
            **options,
        )

    @property
    def last_error(self) -> BaseException | None:
        """
        Why the last connection attempt failed (typed where fedhub has a type
        for it: L{fedhub.errors.AccessRefused} for a refused login or vhost,
        L{TLSFailed} for a failed TLS handshake), or, until the next attempt
        ends, why the connection was lost (for one fedhub dropped, the
        reason it dropped it); C{None} when the bus is connected or has not
        failed yet.
        """
        return self._reconnector.last_error if self._reconnector is not None else None

    @property
    def blocked(self) -> bool:
        """
        Whether the broker has blocked publishing on the current connection
        (a resource alarm): publishes wait until it unblocks.
        """
        session = self._session
        return session is not None and session.alive and session.client.blocked

    @property
    def publish_refused(self) -> str | None:
        """
        The broker's latest refusal of a publish on the current connection
        while it still holds (L{REFUSAL_HOLD} seconds), as text; C{None}
        when there is none: a C{403} (messages refused so go to the
        outbox's failed area), or a C{404} for an exchange that does not
        exist (until a check finds it; the outbox keeps its messages and
        tries again).  A domain with one is not ready.
        """
        session = self._session
        if session is None or not session.alive:
            return None
        since = self._reactor.seconds() - REFUSAL_HOLD
        held = [(when, error) for error, when in session.refusals if when > since]
        held += [(when, error) for error, when in session.missing.values() if when > since]
        return str(max(held, key=lambda pair: pair[0])[1]) if held else None

    # -- IBus ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """
        Whether a broker connection is set up and takes messages (not while
        the bus stops).
        """
        return not self._stopping and self._session is not None and self._session.alive

    def when_connected(self) -> Deferred[None]:
        """
        A Deferred firing once the bus is connected (at once if it is).
        """
        if self.connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._connected_waiters.append(d)
        return d

    def publish(
        self, message: Message, exchange: str | None = None, routing_key: str | None = None
    ) -> Deferred[None]:
        """
        Publish one message persistently with C{mandatory} set; see the module
        docstring for what the Deferred does.
        """
        d: Deferred[None] = Deferred()
        self.publish_to(message, d, exchange, routing_key)
        return d

    def publish_to(
        self,
        message: Message,
        outcome: PublishOutcome,
        exchange: str | None = None,
        routing_key: str | None = None,
    ) -> None:
        """
        Publish like L{publish}, reporting to C{outcome} instead of a new
        Deferred: C{outcome.callback(None)} when the broker confirmed the
        message, C{outcome.errback(error)} with the error L{publish}'s
        Deferred would fail with, possibly before this returns.

        For a publisher of many messages (the outbox), which then makes no
        Deferred per message.  C{outcome} must not raise: the bus reports
        the outcomes of a confirm covering many messages one after another.
        """
        exchange = self.exchange if exchange is None else exchange
        routing_key = message.topic if routing_key is None else routing_key
        good = self._good_names
        if (
            routing_key.__class__ is not str
            or exchange.__class__ is not str
            or routing_key not in good
            or exchange not in good
        ):
            for what, value in (("exchange", exchange), ("routing key", routing_key)):
                if not isinstance(value, str) or len(value.encode("utf-8", "replace")) > MAX_NAME_BYTES:
                    outcome.errback(MessageError(f"the {what} must be a string of at most 255 bytes"))
                    return
            if len(good) >= _GOOD_NAMES:
                good.clear()
            good.update((exchange, routing_key))
        session = self._session
        if session is None or not session.alive or self._stopping:
            why = "the bus is stopping" if self._stopping else "not connected to the broker"
            outcome.errback(NotConnected(why, message.id))
            return
        session.enqueue(_Pending(message, exchange, routing_key, outcome))

    def call_after_confirms(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} after every publisher confirm (C{basic.ack} or
        C{basic.nack}) has settled the messages it covers.

        One confirm may cover many messages (C{multiple}), and their Deferreds
        fire one by one while L{confirming} is true.  A publisher that does
        the same follow-up work after each of them (writing down what was
        confirmed, sending the next messages) can leave that work to
        C{callback} while L{confirming} is true, and do it once per confirm.
        """
        self._after_confirms.append(callback)

    def declare(self, topology: Topology) -> Deferred[None]:
        """
        Declare a topology now if connected (else on connecting), and again
        after every reconnect.  A topology the broker refuses the first time
        (403, 404, 406) fails the Deferred and is forgotten.
        """
        if self._stopping or not self.running:
            return fail(NotConnected("the bus is not running"))
        entry = _Declared(topology)
        waiter: Deferred[None] = Deferred()
        entry.waiters.append(waiter)
        self._declared.append(entry)
        session = self._session
        if session is not None and session.alive:
            Deferred.fromCoroutine(self._declare(session, entry))
        return waiter

    def subscribe(
        self, queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> Deferred[ISubscription]:
        """
        Consume from a queue, now if connected (else on connecting), and again
        after every reconnect.  The Deferred fires once consuming started; it
        fails (and the subscription is forgotten) when the broker refuses it
        the first time, e.g. with L{NotFound} for a missing queue.
        """
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 < prefetch < 65536:
            return fail(ValueError(f"prefetch must be within 1..65535, not {prefetch!r}"))
        if not isinstance(queue, str) or len(queue.encode("utf-8", "replace")) > MAX_NAME_BYTES:
            return fail(ValueError("the queue name must be a string of at most 255 bytes"))
        if self._stopping or not self.running:
            return fail(NotConnected("the bus is not running"))
        subscription = AMQPSubscription(self, queue, on_delivery, prefetch)
        waiter: Deferred[ISubscription] = Deferred()
        subscription.waiters.append(waiter)
        self._subscriptions.append(subscription)
        session = self._session
        if session is not None and session.alive:
            Deferred.fromCoroutine(self._consume(session, subscription))
        return waiter

    def open_channel(self, *, exact_content: bool = False) -> Deferred[Any]:
        """
        A channel of its own on the current connection, for work at the AMQP
        level that the bus has no method for (C{basic.get}, say): the caller
        runs txamqp's channel methods on it (L{map_error} names their
        errors) and closes it with its client's C{close_channel}, which puts
        the messages it got and did not acknowledge back in their queues.
        It is not opened again after a reconnect.

        @param exact_content: Decode the properties of the messages it gets
            in exact mode (L{AMQPClient.exact_content}).
        @return: A Deferred firing with the open channel, or failing with
            L{NotConnected}.
        """
        session = self._session
        if session is None or not session.alive or self._stopping:
            return fail(NotConnected("not connected to the broker"))
        client = session.client

        def opened(channel: Any) -> Any:
            if exact_content:
                client.exact_content(channel.id)
            return channel

        return client.open_channel().addCallback(opened)

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        """
        Start connecting.  Reads the TLS files.

        @raise fedhub.errors.ConfigError: when TLS is configured unusably.
        """
        endpoint = self._endpoint
        tls: RenewableTLSOptions | None = None
        if endpoint is None:
            endpoint = clientFromString(  # type: ignore[no-untyped-call]
                self._reactor, endpoint_description(self.settings)
            )
            if self.settings.tls:
                try:
                    tls = RenewableTLSOptions(
                        self.settings.verify_hostname,
                        self.settings.ca,
                        self.settings.cert,
                        self.settings.key,
                        on_change=self._tls_files_changed,
                    )
                except ConfigError as e:
                    raise ConfigError(in_domain(self.domain, e)) from None
        settings = self.settings
        if not settings.tls and settings.host not in ("localhost", "127.0.0.1", "::1"):
            self.log.warn(
                "Domain {domain} talks to {broker} without TLS: neither the broker nor the"
                " messages are protected",
                domain=self.domain,
                broker=settings.safe_url(),
            )
        factory = ClientFactory(
            load_spec(),
            clock=self._reactor,
            vhost=settings.vhost,
            credentials=Credentials(settings.auth_mechanism, settings.username, settings.password),
            heartbeat=settings.heartbeat,
            connection_name=settings.connection_name,
            close_timeout=self.close_timeout,
            domain=self.domain,
        )
        connecting = endpoint

        def connect() -> Deferred[Any]:
            if tls is not None:
                # A renewed certificate is used from the next attempt on.
                return wrapClientTLS(tls.current(), connecting).connect(factory)
            return connecting.connect(factory)

        self._stopping = False
        self._reconnector = Reconnector(
            connect,
            lambda client: Deferred.fromCoroutine(self._prepare(client)),
            self._ready,
            self._lost,
            self._retry_delay,
            self._reactor,
            setup_timeout=self.setup_timeout,
            close_timeout=self.close_timeout,
            describe=f"{settings.safe_url()} (domain {self.domain})",
            explain=lambda failure: _attempt_error(
                failure, None if tls is None else tls.options, settings.cert if tls else None
            ),
            domain=self.domain,
        )
        super().startService()  # type: ignore[no-untyped-call]
        self._reconnector.start()

    def _tls_files_changed(self, error: ConfigError | None) -> None:
        if error is None:
            self.log.info(
                "The TLS files of domain {domain} changed; read again for the next connection",
                domain=self.domain,
            )
            return
        self.log.warn(
            "The TLS files of domain {domain} changed but can not be used ({error}); the ones "
            "read before stay in use until they change again",
            domain=self.domain,
            # One line, each problem named by its key, as at start:
            # "domains.infra.key: the private key in '...' does not match ...".
            error="; ".join(str(problem) for problem in in_domain(self.domain, error)),
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop: refuse new publishes, fail those not yet sent, wait (at most
        C{confirm_timeout}) for the confirms of those sent, close the
        connection.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        session = self._session
        if session is not None and session.alive:
            session.fail_waiting(lambda p: NotConnected("the bus is stopping", p.message.id))
            drained = session.drained.wait()
            drained.addTimeout(self.confirm_timeout, self._reactor)
            try:
                await drained
            except Exception:
                pass
        for subscription in self._subscriptions:
            if subscription.retry_call is not None and subscription.retry_call.active():
                subscription.retry_call.cancel()
            subscription.retry_call = None
        why = NotConnected("the bus stopped")
        for entry in self._declared:
            self._fail_waiters(entry.waiters, why)
        for subscription in self._subscriptions:
            self._fail_waiters(subscription.waiters, why)
        waiters, self._connected_waiters = self._connected_waiters, []
        self._fail_waiters(waiters, why)
        session = self._session
        if session is not None and session.alive:
            # A stop begun while the frames of a read are being handled would
            # close the connection before the acknowledgements held back for
            # the end of that read are written, and the broker would deliver
            # those messages again.
            session.frames_handled()
        if self._reconnector is not None:
            await self._reconnector.stop()

    @staticmethod
    def _fail_waiters(waiters: list[Deferred[Any]], error: Exception) -> None:
        pending, waiters[:] = list(waiters), []
        for d in pending:
            d.errback(error)

    # -- connection lifecycle -------------------------------------------------

    async def _prepare(self, client: AMQPClient) -> _Session:
        await client.open()
        session = _Session(self, client)
        client.events = session
        try:
            await session.open_publish_channel()
            for entry in list(self._declared):
                await self._declare(session, entry, preparing=True)
            for subscription in list(self._subscriptions):
                if not subscription.cancelled:
                    await self._consume(session, subscription, preparing=True)
        except BaseException:
            session.teardown("the connection could not be set up")
            raise
        return session

    def _ready(self, client: AMQPClient, session: _Session) -> None:
        self._session = session
        self.stats.connections += 1
        self.log.info(
            "Connected to {broker} for domain {domain} (heartbeat {heartbeat} s)",
            broker=self.settings.safe_url(),
            domain=self.domain,
            heartbeat=client.heartbeat_interval,
        )
        # Declarations and subscriptions that arrived while it was set up.
        for entry in list(self._declared):
            if entry.session is not session:
                Deferred.fromCoroutine(self._declare(session, entry))
        for subscription in list(self._subscriptions):
            if (
                not subscription.cancelled
                and subscription.consumer is None
                and not subscription.starting
                and subscription.retry_call is None
            ):
                Deferred.fromCoroutine(self._consume(session, subscription))
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.callback(None)
        session.pump()

    def _lost(self, client: AMQPClient, reason: BaseException) -> None:
        session, self._session = self._session, None
        self.stats.connection_losses += 1
        closed = getattr(client, "broker_closed", None)
        if closed:
            # The broker said why (320 CONNECTION_FORCED, a node shutting
            # down): its words rather than "closed cleanly".
            why = f"the broker closed the connection ({escape_control(closed, 200)})"
        else:
            why = f"the connection to the broker was lost ({escape_control(str(reason), 200)})"
        if session is not None:
            session.teardown(why)

    # -- declaring --------------------------------------------------------------

    async def _declare(self, session: _Session, entry: _Declared, preparing: bool = False) -> None:
        entry.session = session
        try:
            await session.declare(entry.topology, self.passive_declares)
        except ChannelError as e:
            if not entry.confirmed:
                if entry in self._declared:
                    self._declared.remove(entry)
                self._fail_waiters(entry.waiters, e)
            else:
                self.log.error(
                    "Declaring the topology of domain {domain} again failed: {error}",
                    domain=self.domain,
                    error=escape_control(str(e)),
                )
            return
        except Exception as e:
            if preparing:
                raise
            # The connection went away: the next connection declares it.
            self.log.debug("Declaring postponed: {error}", error=str(e))
            return
        if entry in self._declared and any(
            other.confirmed and other.topology == entry.topology
            for other in self._declared
            if other is not entry
        ):
            # Declared the same way before: remembering it once is enough.
            self._declared.remove(entry)
        entry.confirmed = True
        waiters, entry.waiters = entry.waiters, []
        for d in waiters:
            d.callback(None)

    # -- consuming ----------------------------------------------------------------

    def _next_tag(self) -> str:
        self._tags += 1
        return f"fedhub.{self.domain}.{self._tags}"

    async def _consume(
        self,
        session: _Session,
        subscription: AMQPSubscription,
        channel: Any = None,
        preparing: bool = False,
    ) -> None:
        if subscription.starting or subscription.cancelled or subscription.stopped:
            return
        subscription.starting = True
        client = session.client
        # Acknowledgements are coalesced on a channel of the consumer's own.
        consumer = _Consumer(
            session, subscription, self._next_tag(), coalesce=channel is None or channel.closed
        )
        try:
            if channel is None or channel.closed:
                channel = await client.open_channel()
                consumer.channel = channel
                await channel.basic_qos(
                    prefetch_size=0, prefetch_count=subscription.prefetch, global_=False
                )
                if subscription.stopped:
                    # It stopped consuming meanwhile: no consumer on this
                    # channel, which holds no delivery.
                    subscription.starting = False
                    if session.alive:
                        await client.close_channel(channel)
                    return
            consumer.channel = channel
            consumer.active = True
            session.consumers[consumer.tag] = consumer
            consuming = channel.basic_consume(
                queue=subscription.queue,
                consumer_tag=consumer.tag,
                no_local=False,
                no_ack=False,
                exclusive=False,
                no_wait=False,
                arguments={},
            )
            # Sent: a stop from now on cancels this consumer at once (see
            # _stop_consuming).
            subscription.pending = consumer
            await consuming
        except Exception as raw:
            error = map_error(raw)
            subscription.pending = None
            consumer.active = False
            session.consumers.pop(consumer.tag, None)
            if consumer.channel is not None and not consumer.channel.closed:
                client.close_channel(consumer.channel).addErrback(lambda _: None)
            subscription.starting = False
            if not isinstance(error, ChannelError):
                if preparing:
                    raise error from None
                return  # the connection went away; the next one consumes
            if not subscription.started:
                if subscription in self._subscriptions:
                    self._subscriptions.remove(subscription)
                subscription.cancelled = True
                self._fail_waiters(subscription.waiters, error)
                return
            subscription.last_error = str(error)
            self.log.error(
                "Consuming from queue {queue} of domain {domain} failed: {error}",
                queue=escape_control(subscription.queue),
                domain=self.domain,
                error=escape_control(str(error)),
            )
            self._schedule_resume(subscription)
            return
        subscription.starting = False
        subscription.pending = None
        if subscription.cancelled or not session.alive:
            consumer.active = False
            session.consumers.pop(consumer.tag, None)
            if session.alive:
                await client.close_channel(channel)
            return
        if subscription.stopped:
            # It stopped consuming while the basic.consume awaited its
            # answer, and sent basic.cancel for this consumer then (see
            # _stop_consuming); cancel() closes its channel.
            subscription.consumer = consumer
            return
        subscription.consumer = consumer
        subscription.started = True
        subscription.last_error = None
        subscription.retries = 0
        waiters, subscription.waiters = subscription.waiters, []
        for d in waiters:
            d.callback(subscription)

    def _resume(self, subscription: AMQPSubscription, channel: Any) -> None:
        """
        Consume again after the broker cancelled a consumer or closed its
        channel: at once the first time, then with backoff.
        """
        if subscription.cancelled or subscription.stopped or subscription.retry_call is not None:
            return
        session = self._session
        if subscription.retries == 0 and session is not None and session.alive:
            subscription.retries = 1
            Deferred.fromCoroutine(self._consume(session, subscription, channel))
        else:
            self._schedule_resume(subscription)

    def _schedule_resume(self, subscription: AMQPSubscription) -> None:
        if subscription.cancelled or subscription.stopped or subscription.retry_call is not None:
            return
        subscription.retries += 1
        delay = self._retry_delay(subscription.retries)

        def retry() -> None:
            subscription.retry_call = None
            session = self._session
            if session is not None and session.alive and subscription.consumer is None:
                Deferred.fromCoroutine(self._consume(session, subscription))

        subscription.retry_call = self._reactor.callLater(delay, retry)

    def _forget(self, subscription: AMQPSubscription, why: str) -> None:
        """
        Neither consume again after a reconnect nor resume: C{subscription}
        stopped consuming or was cancelled.
        """
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        if subscription.retry_call is not None and subscription.retry_call.active():
            subscription.retry_call.cancel()
        subscription.retry_call = None
        self._fail_waiters(subscription.waiters, NotConnected(why))

    def _stop_consuming(self, subscription: AMQPSubscription) -> Deferred[None]:
        """
        Forget a subscription that stops consuming, and cancel its consumer
        with the broker (see L{AMQPSubscription.stop_consuming}).
        """
        self._forget(subscription, "the subscription stopped consuming")
        # A consumer whose basic.consume awaits its answer is cancelled now,
        # not once it is set up: the broker handles the methods of a channel
        # in order, so the basic.cancel comes before any rejection sent from
        # now on (on a channel reused after a cancel by the broker, one of
        # the deliveries of the consumer it cancelled), which then goes to
        # the queue's other consumers rather than back to this one.
        consumer = subscription.consumer or subscription.pending
        if consumer is None:
            # Not consuming now: a reconnect, a consume waiting for its
            # backoff, or one opening its channel (which then does not
            # consume).
            return succeed(None)
        return self._cancel_consumer(consumer)

    def _cancel_consumer(self, consumer: _Consumer) -> Deferred[None]:
        """
        Send C{basic.cancel} for a consumer, leaving its channel open, and
        wait for C{basic.cancel-ok}: at most C{close_timeout} seconds, and
        no longer than the channel or the connection lasts.  The Deferred
        never fails.
        """
        if not consumer.open:
            # Its channel is gone, and the broker's consumer with it.
            return succeed(None)
        answered = consumer.channel.basic_cancel(consumer_tag=consumer.tag, no_wait=False)

        def unanswered(failure: Failure) -> None:
            self.log.info(
                "No basic.cancel-ok for the consumer of queue {queue} of domain {domain}: "
                "{error}",
                queue=escape_control(consumer.subscription.queue),
                domain=self.domain,
                error=escape_control(failure.getErrorMessage(), 200),
            )

        # Not cancelled on timeout: a late cancel-ok must still be taken
        # from the channel's answers, or a later method would get it.
        waited = with_timeout(
            answered,
            self.close_timeout,
            self._reactor,
            lambda: NotConnected(f"no answer within {self.close_timeout} s"),
        )
        return waited.addCallbacks(lambda _: None, unanswered)

    def _cancel(self, subscription: AMQPSubscription) -> Deferred[None]:
        self._forget(subscription, "the subscription was cancelled")
        consumer, subscription.consumer = subscription.consumer, None
        if consumer is None or not consumer.session.alive:
            return succeed(None)
        consumer.active = False
        consumer.session.consumers.pop(consumer.tag, None)
        # What it acknowledged goes out before the channel closes.
        consumer.flush()
        closing = consumer.session.client.close_channel(consumer.channel)
        closing.addErrback(lambda _: None)
        return closing

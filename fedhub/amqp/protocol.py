"""
fedhub's AMQP 0-9-1 client protocol: txamqp's C{AMQClient}, completed for RabbitMQ.

txamqp 0.8.2 leaves out what a reliable RabbitMQ client needs.  L{AMQPClient}
adds it:

  - a complete field-table codec for every frame (L{fedhub.amqp.codec});
  - the 0-9-1 protocol header (txamqp sends the 0-9 one);
  - C{client_properties} with the capabilities that make RabbitMQ send
    publisher confirms' C{basic.nack}, consumer cancel notifications,
    C{connection.blocked}/C{unblocked} and a proper C{connection.close} on a
    refused login; plus product, version and the connection name;
  - SASL C{EXTERNAL} (certificate) login besides C{PLAIN};
  - heartbeats that are never off, with dead-peer detection that drops a
    silent connection after two intervals, driven by one timer that does
    nothing once the connection is gone (txamqp's fired on a C{None}
    transport after a broker kill);
  - C{TCP_NODELAY} (Twisted leaves Nagle on: tens of milliseconds of latency);
  - write backpressure: a push producer registered on the transport tells
    the L{IConnectionEvents} listener when the transport's buffer is full;
  - handlers for C{basic.ack}, C{basic.nack}, C{basic.return},
    C{basic.deliver}, server-sent C{basic.cancel}, C{channel.close} and
    C{connection.blocked}/C{unblocked}, all forwarded to one
    L{IConnectionEvents} provider, and contained so that a failing listener
    never tears the connection down.

Frames become bytes in two places: L{AMQPClient.dataReceived} splits the
byte stream, and every outgoing frame goes through L{AMQPClient.write_bytes}.
The frames that come once or more per message are encoded and decoded
directly by L{fedhub.amqp.frames}: publishing (L{AMQPClient.basic_publish},
one buffer and one write per message), acknowledging
(L{AMQPClient.send_method}), and C{basic.deliver}, C{basic.return},
C{basic.ack} and C{basic.nack} from the broker, which reach the events
listener without txamqp's frame objects, channel queues or Deferreds.  Every
other frame goes through C{_pack_frame}/C{_unpack_frame} (the field-table
codec) and txamqp's channels.  Both paths give the same results; the tests
compare them byte for byte and event for event.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from txamqp.client import Closed, TwistedDelegate
from txamqp.connection import Body, Frame, Header, Method
from txamqp.message import Message as TxMessage
from txamqp.protocol import AMQClient, read_content
from txamqp.queue import Closed as QueueClosed
from txamqp.spec import pythonize
from zope.interface import Interface, implementer

from fedhub import __version__
from fedhub.amqp.codec import FieldTableFrameMixin, FrameError, unpack_frame
from fedhub.amqp.frames import (
    ACK,
    BASIC,
    DELIVER,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    MAX_BODY_SIZE,
    NACK,
    RETURN,
    Content,
    ContentDecoder,
    Deliver,
    PublishEncoder,
    check_header_size,
    decode_deliver,
    decode_properties,
    decode_return,
    decode_tag_bits,
    encode_ack,
    encode_nack,
    encode_reject,
)
from fedhub.errors import (
    AccessRefused,
    ChannelError,
    ConfigError,
    ConfigProblem,
    NotConnected,
    NotFound,
    PreconditionFailed,
)
from fedhub.logs import HubLogger

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
"""What a client sends first to speak AMQP 0-9-1."""

HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
"""A heartbeat frame: type 8, channel 0, empty payload, frame end."""

FRAME_HEADER_SIZE = 7
"""Type octet, channel short and payload size long in front of every frame."""

FRAME_OVERHEAD = 8
"""Header plus the frame-end octet."""

_FRAME_HEAD = struct.Struct("!BHI")
_CLASS_METHOD = struct.Struct("!HH")

_ACK_ENCODERS: dict[str, Any] = {
    "basic.ack": encode_ack,
    "basic.reject": encode_reject,
    "basic.nack": encode_nack,
}

DEFAULT_FRAME_MAX = 131072
"""The frame size fedhub asks for (RabbitMQ's default)."""

FRAME_MIN_SIZE = 4096
"""AMQP's smallest frame_max: a broker offering less is broken."""

_CLOCK_SLACK = 0.001
"""
Seconds a heartbeat tick may come early: a tick set for the moment two
intervals of silence are up can land a hair before it, as timers run on
floating-point instants.
"""

DEFAULT_CHANNEL_MAX = 2047
"""The number of channels fedhub asks for (RabbitMQ's default)."""

CAPABILITIES = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "basic.nack": True,
    "authentication_failure_close": True,
    "exchange_exchange_bindings": True,
    "per_consumer_qos": True,
}
"""The RabbitMQ extensions fedhub announces in its client properties."""


@dataclass(frozen=True)
class Credentials:
    """
    How to log in.

    @ivar mechanism: C{"PLAIN"} or C{"EXTERNAL"} (the TLS client certificate).
    @ivar username: The C{PLAIN} user.
    @ivar password: The C{PLAIN} password; never shown by C{repr}.
    """

    mechanism: str = "PLAIN"
    username: str = "guest"
    password: str = field(default="guest", repr=False)

    def __post_init__(self) -> None:
        if self.mechanism not in ("PLAIN", "EXTERNAL"):
            raise ValueError(f"unsupported SASL mechanism {self.mechanism!r}")

    def response(self) -> bytes:
        """
        The SASL response for C{connection.start-ok}: empty for C{EXTERNAL}
        (the broker takes the identity from the certificate).
        """
        if self.mechanism == "EXTERNAL":
            return b""
        return b"\0" + self.username.encode("utf-8") + b"\0" + self.password.encode("utf-8")


def client_properties(connection_name: str | None = None) -> dict[str, Any]:
    """
    The C{client-properties} table fedhub sends in C{connection.start-ok}.
    """
    properties: dict[str, Any] = {
        "product": "fedhub",
        "version": __version__,
        "platform": f"Python {sys.version.split()[0]}, Twisted {twisted.__version__}",
        "information": "fedhub message bus hub",
        "capabilities": dict(CAPABILITIES),
    }
    if connection_name:
        properties["connection_name"] = connection_name
    return properties


# --- errors ---------------------------------------------------------------

_BY_CODE: dict[int, type[ChannelError]] = {
    403: AccessRefused,
    404: NotFound,
    406: PreconditionFailed,
}


def error_for_reply(reply_code: int, reply_text: str) -> ChannelError:
    """
    The typed error for an AMQP error reply (from C{channel.close} or
    C{connection.close}): L{AccessRefused} for 403, L{NotFound} for 404,
    L{PreconditionFailed} for 406, L{ChannelError} otherwise.
    """
    text = reply_text.decode("utf-8", "replace") if isinstance(reply_text, bytes) else reply_text
    return _BY_CODE.get(reply_code, ChannelError)(reply_code, str(text))


def map_error(error: BaseException | Failure) -> BaseException:
    """
    Turn what txamqp raises into fedhub's errors.

      - a channel closed by the broker: the typed L{ChannelError} of its reply;
      - a connection closed by the broker: L{AccessRefused} for a refused
        login (403) or vhost (530), else L{NotConnected} naming the reply;
      - a connection lost or closed by us: L{NotConnected}.

    Anything else is returned unchanged.
    """
    if isinstance(error, Failure):
        if error.value is None:
            return NotConnected("the connection is closed")
        error = error.value
    if isinstance(error, (ChannelError, NotConnected)):
        return error
    if isinstance(error, Closed):
        reason: Any = error.args[0] if error.args else None
        if isinstance(reason, Failure):
            reason = reason.value
        if isinstance(reason, Closed):
            return map_error(reason)
        if isinstance(reason, (ChannelError, NotConnected)):
            return reason
        method = getattr(reason, "method", None)
        if method is not None and hasattr(reason, "reply_code"):
            code, text = reason.reply_code, reason.reply_text
            if method.klass.name == "channel":
                return error_for_reply(code, text)
            if code == 403:
                return error_for_reply(code, text)
            if code == 530:
                # NOT_ALLOWED on connection.open: the vhost is refused to
                # this user (or missing, or at its connection limit).
                return AccessRefused(code, _text(text))
            return NotConnected(f"the broker closed the connection: {code} {text}")
        return NotConnected(f"the connection is closed ({reason!r})")
    if isinstance(error, QueueClosed):
        return NotConnected("the connection is closed")
    return error


# --- events ---------------------------------------------------------------


class IConnectionEvents(Interface):
    """
    What an L{AMQPClient} reports about its connection, asynchronously.

    Every method is called from the reactor thread and must not raise (an
    exception is logged and otherwise ignored).
    """

    def basic_deliver(  # type: ignore[no-untyped-def]
        channel_id, consumer_tag, delivery_tag, redelivered, exchange, routing_key, properties, body
    ):
        """
        A message for a consumer.

        @param properties: The basic properties by Python name
            (C{content_type}, C{message_id}, C{headers}, ...).
        @param body: The body, C{bytes}.
        """

    def basic_return(  # type: ignore[no-untyped-def]
        channel_id, reply_code, reply_text, exchange, routing_key, properties, body
    ):
        """
        A C{mandatory} message came back unroutable.  It arrives before the
        C{basic.ack} of the same message.
        """

    def basic_ack(channel_id, delivery_tag, multiple):  # type: ignore[no-untyped-def]
        """
        The broker confirmed published messages (up to C{delivery_tag} when
        C{multiple}).
        """

    def basic_nack(channel_id, delivery_tag, multiple):  # type: ignore[no-untyped-def]
        """
        The broker refused responsibility for published messages.
        """

    def consumer_cancelled(channel_id, consumer_tag):  # type: ignore[no-untyped-def]
        """
        The broker cancelled a consumer (its queue was deleted, a node failed).
        """

    def channel_closed(channel_id, error):  # type: ignore[no-untyped-def]
        """
        The broker closed a channel with an error (a L{ChannelError}).
        """

    def connection_blocked(reason):  # type: ignore[no-untyped-def]
        """
        The broker stopped accepting publishes (a resource alarm).
        """

    def connection_unblocked():  # type: ignore[no-untyped-def]
        """
        The broker accepts publishes again.
        """

    def writable_changed(writable):  # type: ignore[no-untyped-def]
        """
        The transport's write buffer filled up (C{False}) or drained (C{True}).
        """

    def frames_handled():  # type: ignore[no-untyped-def]
        """
        Every complete frame of one read from the broker was handled (while
        they were, L{AMQPClient.receiving} was true): frames the listener
        held back meanwhile, such as acknowledgements it coalesces, are to
        be written now.
        """


@implementer(IConnectionEvents)
class NullConnectionEvents:
    """
    An L{IConnectionEvents} that ignores everything; a client's default.
    """

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
        """Ignore a delivery."""

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
        """Ignore a returned message."""

    def basic_ack(self, channel_id: int, delivery_tag: int, multiple: bool) -> None:
        """Ignore a confirm."""

    def basic_nack(self, channel_id: int, delivery_tag: int, multiple: bool) -> None:
        """Ignore a negative confirm."""

    def consumer_cancelled(self, channel_id: int, consumer_tag: str) -> None:
        """Ignore a consumer cancellation."""

    def channel_closed(self, channel_id: int, error: ChannelError) -> None:
        """Ignore a channel closed by the broker."""

    def connection_blocked(self, reason: str) -> None:
        """Ignore a block."""

    def connection_unblocked(self) -> None:
        """Ignore an unblock."""

    def writable_changed(self, writable: bool) -> None:
        """Ignore flow control."""

    def frames_handled(self) -> None:
        """Nothing is held back."""


# --- the protocol ---------------------------------------------------------


@implementer(IPushProducer)
class _WriteGate:
    """
    Registered on the transport so that it says when its write buffer is full
    (txamqp itself never registers a producer, so it buffers without bound).
    """

    def __init__(self, client: AMQPClient) -> None:
        self._client = client

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop writing."""
        self._client._set_writable(False)

    def resumeProducing(self) -> None:
        """The transport's buffer drained: write again."""
        self._client._set_writable(True)

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._client._set_writable(False)


def _set_no_delay(transport: object) -> bool:
    """
    Turn Nagle's algorithm off on the TCP transport under C{transport} (TLS
    wraps it); return whether that worked.
    """
    for _ in range(4):
        if transport is None:
            return False
        if ITCPTransport.providedBy(transport):
            try:
                transport.setTcpNoDelay(True)
                return True
            except Exception:
                pass
        transport = getattr(transport, "transport", None)
    return False


def _negotiate(server: int, client: int) -> int:
    """A tuning value: the smaller one, where 0 means "no limit"."""
    if server == 0:
        return client
    if client == 0:
        return server
    return min(server, client)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


class AMQPClient(FieldTableFrameMixin, AMQClient):  # type: ignore[misc]
    """
    One AMQP 0-9-1 connection to RabbitMQ.

    Built by L{ClientFactory}; after the transport connects, L{open} logs in
    and opens the vhost.  Channels come from L{open_channel}; their methods
    (C{queue_declare}, C{basic_consume}, ...) are txamqp's.  Messages are
    published with L{basic_publish}, acknowledged with L{send_method}, and
    everything the broker sends on its own goes to L{events}.

    @ivar events: The L{IConnectionEvents} provider told about deliveries,
        confirms, returns, cancels, closed channels, blocks and flow control.
    @ivar heartbeat_interval: The negotiated heartbeat, 0 before tuning.
    @ivar server_properties: What the broker said about itself.
    @ivar blocked: Whether the broker has blocked publishing.
    @ivar writable: Whether the transport takes more data now.
    @ivar receiving: Whether the frames of a read are being handled now;
        once they are, L{IConnectionEvents.frames_handled} is called.
    @ivar lost: Whether the connection is gone.
    @ivar close_timeout: Seconds the transport may take to close after the
        broker closed the connection before it is dropped.
    @ivar fast_frames: Whether the hot paths use L{fedhub.amqp.frames} (the
        default); when C{False}, every frame goes through txamqp's generic
        path, which is what the fast one is tested against.
    """

    log = HubLogger()
    #: The domain of the connection (see L{ClientFactory}), for what it logs.
    domain: str | None = None

    def __init__(
        self,
        spec: Any,
        *,
        clock: IReactorTime,
        vhost: str = "/",
        credentials: Credentials | None = None,
        heartbeat: int = 30,
        connection_name: str | None = None,
        channel_max: int = DEFAULT_CHANNEL_MAX,
        frame_max: int = DEFAULT_FRAME_MAX,
        close_timeout: float = 5.0,
    ) -> None:
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
            raise ConfigError(
                [
                    ConfigProblem(
                        "heartbeat",
                        f"must be at least 1 second, not {heartbeat!r}: without heartbeats"
                        " a frozen broker goes unnoticed",
                    )
                ]
            )
        # txamqp's own heartbeat machinery stays off (interval 0): it keeps
        # firing after the transport is gone.  This class runs its own.
        AMQClient.__init__(self, _Delegate(), vhost, spec, heartbeat=0, clock=clock)
        self.credentials = credentials or Credentials()
        self.requested_heartbeat = heartbeat
        self.connection_name = connection_name
        self.requested_channel_max = channel_max
        self.requested_frame_max = frame_max
        self.close_timeout = close_timeout
        self.events: Any = NullConnectionEvents()
        self.heartbeat_interval = 0
        self.channel_max = channel_max
        self.server_properties: dict[str, Any] = {}
        self.blocked = False
        #: The broker's reply code and text when it closed the connection
        #: (C{connection.close}), for what the loss is explained by.
        self.broker_closed: str | None = None
        self.writable = True
        self.receiving = False
        self.lost = False
        self.opened = False
        self.lost_reason: Failure | None = None
        # Why abort() dropped the connection, if it did.
        self._dropped_because: str | None = None
        # Until tuning, frames are small; AMQP's minimum frame size bounds them.
        self._frame_limit = DEFAULT_FRAME_MAX
        self._heartbeat_call: IDelayedCall | None = None
        self._close_call: IDelayedCall | None = None
        self._last_received = 0.0
        self._last_sent = 0.0
        self._lost_waiters: list[Deferred[BaseException]] = []
        # A frame split across reads: its pieces, their size, and how many
        # bytes the next step needs (a frame header, or the whole frame).
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._partial_need = 0
        self._broken = False
        self.fast_frames = True
        self._publisher = PublishEncoder(spec, DEFAULT_FRAME_MAX)
        self._contents = ContentDecoder(spec)
        # Messages on the generic path (basic.get-ok, and every message when
        # fast frames are off) by channel: -1 while the content header is
        # due, then the body bytes still due.  Header and body frames that
        # no method announced are protocol errors: queued, they would be
        # read as the answer to the channel's next request, and kept.
        self._generic_content: dict[int, int] = {}
        # Channels whose content headers on the generic path are decoded
        # exactly (see exact_content).
        self._exact_channels: set[int] = set()
        self._next_channel = 0
        self._closing_channels: set[int] = set()
        # Channel numbers whose next channel.close-ok answers a close of a
        # channel closed already: its channel.close crossed the broker's
        # (see _broker_closed_channel).
        self._crossed_closes: dict[int, int] = {}
        self._gate = _WriteGate(self)
        basic = spec.classes.byname["basic"]
        self._basic_class = basic
        self._wire_property = {pythonize(f.name): f.name for f in basic.fields}
        self._python_property = {f.name: pythonize(f.name) for f in basic.fields}
        self._methods: dict[str, Any] = {}

    # -- connection lifecycle --------------------------------------------

    def connectionMade(self) -> None:
        """
        Send the protocol header, turn Nagle off and register for write
        flow control.
        """
        self._last_received = self._last_sent = self.clock.seconds()
        self.send_init_string()
        _set_no_delay(self.transport)
        try:
            self.transport.registerProducer(self._gate, True)
        except Exception:
            # A transport without flow control (or with a producer already):
            # writes are simply never paused.
            self.log.debug("Transport takes no producer; no write flow control")
        self.frame_mode = True

    def send_init_string(self) -> None:
        """
        Send the AMQP 0-9-1 protocol header (txamqp's is the 0-9 one).
        """
        self.write_bytes(PROTOCOL_HEADER)

    def open(self) -> Deferred[None]:
        """
        Log in and open the vhost.

        @return: a Deferred firing when the connection is usable; it fails with
            L{AccessRefused} for a refused login or vhost and L{NotConnected}
            when the connection went away.
        """
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        try:
            await self.started.wait()
            channel0 = self._channel_now(0)
            await channel0.connection_open(virtual_host=self.vhost)
        except Exception as e:
            raise map_error(e) from None
        self.opened = True

    def when_lost(self) -> Deferred[BaseException]:
        """
        A Deferred that fires with the reason (the exception, as the result,
        not as an error) once the connection is gone.
        """
        if self.lost:
            assert self.lost_reason is not None
            return succeed(self.lost_reason.value or ConnectionDone())
        d: Deferred[BaseException] = Deferred()
        self._lost_waiters.append(d)
        return d

    def abort(self, why: str) -> None:
        """
        Drop the connection now without a closing handshake.  The loss is
        then told (C{lost_reason}, L{when_lost}) as a L{NotConnected} naming
        C{why}, not as the transport's abort.
        """
        if self.lost or self.transport is None:
            return
        self.log.info("Dropping the broker connection: {why}", why=why)
        # The loss is then told as this (see connectionLost), not as the
        # transport's "aborted locally".
        if self._dropped_because is None:
            self._dropped_because = why
        self.transport.abortConnection()

    def close_connection(self, timeout: float = 5.0) -> Deferred[None]:
        """
        Close the connection cleanly (C{connection.close}, wait for
        C{close-ok}), dropping it after C{timeout} seconds if the broker does
        not answer.

        @return: a Deferred firing once the connection is gone.
        """
        return Deferred.fromCoroutine(self._close_connection(timeout))

    async def _close_connection(self, timeout: float) -> None:
        if self.lost:
            return
        lost = self.when_lost()
        if self.opened and not self.closed:
            channel0 = self._channel_now(0)
            closing = channel0.connection_close(
                reply_code=200, reply_text="fedhub is stopping", class_id=0, method_id=0
            )
            closing.addTimeout(timeout, self.clock)
            try:
                await closing
            except Exception:
                pass
        if not self.lost and self.transport is not None:
            self.lose_transport()
        watchdog = self.clock.callLater(timeout, self.abort, "close timed out")
        await lost
        if watchdog.active():
            watchdog.cancel()

    def lose_transport(self) -> None:
        """
        Close the transport cleanly.  The write gate is unregistered first: a
        TLS transport sends no close_notify, and so never closes, while a
        producer is registered on it.
        """
        transport = self.transport
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        transport.loseConnection()

    def close_transport(self) -> None:
        """
        Close the transport cleanly after the broker closed the connection,
        and drop it if it is still not gone after L{close_timeout} seconds:
        a peer that never closes its side would leave the connection closing
        for ever, and nothing waiting for its loss would ever hear of it.
        """
        if self.lost or self.transport is None:
            return
        self.lose_transport()
        if self._close_call is None:
            self._close_call = self.clock.callLater(
                self.close_timeout, self.abort, "the connection did not close"
            )

    def do_close(self, reason: Any) -> None:
        """
        Close every channel and queue, then tell the delegate.  Unlike
        txamqp's, it iterates over copies: closing a channel fails what waits
        on it, and a channel being opened or closed then forgets itself, which
        made txamqp's loop raise half way, so the loss was never reported.
        """
        for channel in list(self.channels.values()):
            channel.close(reason)
        for queue in list(self.queues.values()):
            queue.close()
        self.delegate.close(reason)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        The connection is gone: stop the heartbeat, fail everything waiting on
        a channel, and tell L{when_lost} waiters.
        """
        if self.lost:
            return
        if reason is None:
            reason = Failure(ConnectionDone())  # type: ignore[no-untyped-call]
        if self._dropped_because is not None and reason.check(ConnectionAborted):
            reason = Failure(NotConnected(f"fedhub dropped the connection: {self._dropped_because}"))
        self.lost = True
        self.lost_reason = reason
        self.writable = False
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = None
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        if not self.closed:
            self.do_close(reason)
        try:
            self.disconnected.fire()
        except Exception:
            pass
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(reason.value or ConnectionDone())

    # -- heartbeats -------------------------------------------------------

    def reschedule_send_heartbeat(self) -> None:
        """Not used: heartbeats run from L{_heartbeat_tick}."""

    def reschedule_check_heartbeat(self) -> None:
        """Not used: heartbeats run from L{_heartbeat_tick}."""

    def check_heartbeat(self) -> None:
        """Not used: heartbeats run from L{_heartbeat_tick}."""

    def send_heartbeat(self) -> None:
        """
        Send one heartbeat frame.
        """
        self.write_bytes(HEARTBEAT_FRAME)

    def _start_heartbeat(self, interval: int) -> None:
        self.heartbeat_interval = interval
        now = self.clock.seconds()
        self._last_received = self._last_sent = now
        self._heartbeat_call = self.clock.callLater(interval / 2, self._heartbeat_tick)

    def _heartbeat_tick(self) -> None:
        """
        At least every half interval, and when two intervals of silence
        would be up: drop a connection silent for two intervals (AMQP's
        rule), and send a heartbeat when nothing else went out for half an
        interval.  Does nothing once the connection is gone.
        """
        self._heartbeat_call = None
        if self.lost or self.transport is None:
            return
        interval = self.heartbeat_interval
        now = self.clock.seconds()
        silent = now - self._last_received
        if silent >= 2 * interval - _CLOCK_SLACK:
            self.log.warn(
                "No data from the broker for {silent:.1f} s (heartbeat {interval} s);"
                " it is considered dead",
                silent=silent,
                interval=interval,
            )
            self.abort("missed heartbeats")
            return
        if now - self._last_sent >= interval / 2:
            self.send_heartbeat()
        # Ticking only every half interval would notice the silence up to
        # half an interval late.
        delay = min(interval / 2, 2 * interval - silent)
        self._heartbeat_call = self.clock.callLater(delay, self._heartbeat_tick)

    # -- bytes in ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Split the byte stream into frames and handle each one.

        A frame split across reads is kept in pieces and joined once it is
        complete, so a large frame arriving in many reads is copied once.
        """
        self._last_received = self.clock.seconds()
        if self.lost or self._broken or getattr(self.transport, "disconnecting", False):
            # Once closing, nothing more is handled (see _handle_frames),
            # so nothing more is kept either.
            return
        if self._partial:
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size < self._partial_need:
                return
            data = b"".join(self._partial)
            self._partial = []
            self._partial_size = 0
        self.receiving = True
        try:
            offset = self._handle_frames(data)
        except FrameError as e:
            self.log.error("Bad frame from the broker: {error}", error=str(e))
            # Nothing after a bad frame can be trusted.
            self._broken = True
            self._partial = []
            self._contents.clear()
            self._generic_content.clear()
            self.abort("protocol error")
            return
        finally:
            self.receiving = False
        if offset < len(data) and not getattr(self.transport, "disconnecting", False):
            rest = data[offset:]
            self._partial = [rest]
            self._partial_size = len(rest)
            if len(rest) < FRAME_HEADER_SIZE:
                self._partial_need = FRAME_HEADER_SIZE
            else:
                self._partial_need = FRAME_OVERHEAD + _FRAME_HEAD.unpack_from(rest)[2]
        self._notify("frames_handled")

    def _handle_frames(self, data: bytes) -> int:
        """
        Handle the complete frames at the start of C{data}.

        Frames of the hot paths (C{basic.deliver} and C{basic.return} with
        their content, C{basic.ack}, C{basic.nack}, heartbeats) are decoded
        here directly (L{fedhub.amqp.frames}); every other frame goes through
        txamqp's generic decoder and channel queues.

        @return: How many bytes were used (the rest is an incomplete frame,
            or follows a frame after which the connection was closed).
        @raise FrameError: A frame is malformed or too large.
        """
        size = len(data)
        offset = 0
        limit = self._frame_limit
        fast = self.fast_frames
        contents = self._contents
        while size - offset >= FRAME_HEADER_SIZE:
            frame_type, channel_id, length = _FRAME_HEAD.unpack_from(data, offset)
            if length + FRAME_OVERHEAD > limit:
                raise FrameError(
                    "bad-length", None, f"frame of {length} bytes exceeds frame-max {limit}"
                )
            end = offset + FRAME_OVERHEAD + length
            if end > size:
                break
            handled = False
            if fast:
                start = offset + FRAME_HEADER_SIZE
                stop = end - 1
                if data[stop] != FRAME_END:
                    raise FrameError(
                        "bad-frame-end", channel_id, f"expected {FRAME_END}, got {data[stop]}"
                    )
                if frame_type == FRAME_METHOD:
                    if channel_id in contents.pending or channel_id in self._generic_content:
                        raise FrameError(
                            "unexpected-frame", channel_id, "a method in the middle of a message"
                        )
                    if channel_id and length >= 4:
                        class_id, method_id = _CLASS_METHOD.unpack_from(data, start)
                        if class_id == BASIC:
                            handled = self._basic_method(data, start + 4, stop, channel_id, method_id)
                elif frame_type == FRAME_HEADER or frame_type == FRAME_BODY:
                    if channel_id in contents.pending:
                        handled = True
                        if frame_type == FRAME_HEADER:
                            content = contents.header(data, start, stop, channel_id)
                        else:
                            content = contents.body(data, start, stop, channel_id)
                        if content is not None:
                            self._content_received(content)
                elif frame_type == FRAME_HEARTBEAT:
                    handled = True
            if not handled:
                frame = self._unpack_frame(data[offset:end])
                offset = end
                self.frame_received(frame)
            else:
                offset = end
            if self.lost or getattr(self.transport, "disconnecting", False):
                break
        return offset

    def _open_channel_for(self, channel_id: int) -> Any:
        """
        The open channel a frame is for, or C{None} when it is unknown or
        closed (its frames are dropped, as L{frame_received} does).
        """
        channel = self.channels.get(channel_id)
        if channel is None or channel.closed:
            return None
        return channel

    def _basic_method(self, data: bytes, pos: int, end: int, channel_id: int, method_id: int) -> bool:
        """
        Handle a C{basic} method of the hot paths.

        @return: whether it was one (else the generic path handles it).
        """
        if method_id == DELIVER:
            deliver = decode_deliver(data, pos, end, channel_id)
            self._contents.method(channel_id, deliver, self._open_channel_for(channel_id))
        elif method_id == ACK or method_id == NACK:
            tag, bits = decode_tag_bits(data, pos, end, channel_id)
            if self._open_channel_for(channel_id) is not None:
                event = "basic_ack" if method_id == ACK else "basic_nack"
                self._notify(event, channel_id, tag, bool(bits & 1))
        elif method_id == RETURN:
            returned = decode_return(data, pos, end, channel_id)
            self._contents.method(channel_id, returned, self._open_channel_for(channel_id))
        else:
            return False
        return True

    def _content_received(self, content: Content) -> None:
        """
        A delivered or returned message is complete: tell the listener, unless
        its channel is gone or closed meanwhile.
        """
        target = content.target
        channel_id = content.channel
        if target is None or target.closed or self.channels.get(channel_id) is not target:
            return
        method = content.method
        if isinstance(method, Deliver):
            self._notify(
                "basic_deliver",
                channel_id,
                _text(method.consumer_tag),
                method.delivery_tag,
                method.redelivered,
                _text(method.exchange),
                _text(method.routing_key),
                content.properties,
                content.body,
            )
        else:
            self._notify(
                "basic_return",
                channel_id,
                method.reply_code,
                _text(method.reply_text),
                _text(method.exchange),
                _text(method.routing_key),
                content.properties,
                content.body,
            )

    def frame_received(self, frame: Any) -> None:
        """
        Hand one frame to its channel.  Heartbeats only count as traffic;
        frames for channels that are closed or unknown are dropped.

        @raise FrameError: A content header or body frame comes where no
            content-bearing method announced it, or a body runs past the
            size its header announced.
        """
        payload = frame.payload
        if payload.type == Frame.HEARTBEAT:
            return
        self._sequence_content(frame.channel, payload)
        if (
            frame.channel in self._crossed_closes
            and payload.type == Frame.METHOD
            and payload.method is self._method("channel.close-ok")
        ):
            # The answer to a close that crossed the broker's: it comes
            # before any answer to a channel that took the number since.
            crossed = self._crossed_closes.pop(frame.channel) - 1
            if crossed:
                self._crossed_closes[frame.channel] = crossed
            return
        channel = self.channels.get(frame.channel)
        if channel is None:
            if frame.channel != 0:
                self.log.debug("Frame for unknown channel {channel} dropped", channel=frame.channel)
                return
            channel = self._channel_now(0)
        if channel.closed:
            return
        if (
            frame.channel in self._closing_channels
            and payload.type == Frame.METHOD
            and payload.method is self._method("channel.close-ok")
        ):
            # The channel is closed, and an answer still awaited on it
            # never comes (a basic.cancel-ok the broker never sent, whose
            # wait timed out): txamqp hands answers to their waiters in
            # order, so the close-ok would go to the oldest one and the
            # close would wait for ever.  Closed here, the channel ends
            # every wait on it, the close's too (see _close_channel).
            channel.close(Closed("closed by fedhub"))
            return
        channel.dispatch(frame, self.work)

    def _sequence_content(self, channel_id: int, payload: Any) -> None:
        """
        Check one frame of the generic path against the message under way on
        its channel (see C{_generic_content}), whether the channel is open
        or not, and move on.

        @raise FrameError: The frame does not belong where it is.
        """
        expected = self._generic_content.get(channel_id)
        kind = payload.type
        if kind == Frame.METHOD:
            if expected is not None:
                raise FrameError("unexpected-frame", channel_id, "a method in the middle of a message")
            if payload.method.content:
                self._generic_content[channel_id] = -1
        elif kind == Frame.HEADER:
            if expected is None:
                raise FrameError("unexpected-frame", channel_id, "a content header no method announced")
            if expected != -1:
                raise FrameError("unexpected-frame", channel_id, "a second content header")
            if payload.weight != 0:
                raise FrameError("bad-length", channel_id, f"content weight {payload.weight}")
            size = payload.size
            if size > MAX_BODY_SIZE:
                raise FrameError(
                    "bad-length",
                    channel_id,
                    f"body of {size} bytes announced, at most {MAX_BODY_SIZE} allowed",
                )
            if size:
                self._generic_content[channel_id] = size
            else:
                del self._generic_content[channel_id]
        elif kind == Frame.BODY:
            if expected is None or expected == -1:
                raise FrameError(
                    "unexpected-frame", channel_id, "a body frame no content header announced"
                )
            left = expected - len(payload.content)
            if left < 0:
                raise FrameError(
                    "bad-length",
                    channel_id,
                    f"body frame of {len(payload.content)} bytes, {expected} still due",
                )
            if left:
                self._generic_content[channel_id] = left
            else:
                del self._generic_content[channel_id]

    def _unpack_frame(self, data: bytes) -> Any:
        """
        Decode one frame of the generic path; content headers of the
        channels in L{exact_content} in exact mode.
        """
        exact = (
            bool(self._exact_channels)
            and data[0] == FRAME_HEADER
            and _FRAME_HEAD.unpack_from(data)[1] in self._exact_channels
        )
        return unpack_frame(self.spec, data, exact=exact)

    def exact_content(self, channel_id: int) -> None:
        """
        Decode the properties of the messages an open channel gets through
        the generic path (C{basic.get-ok}) in exact mode: header values whose
        plain Python form would encode differently (a C{b} or C{l} integer, a
        long string that is not UTF-8) stay L{fedhub.amqp.codec.FieldValue}s,
        so that the properties encode back to the very same bytes, for
        copying a message untouched.  Ends with the channel.
        """
        if self.channel_is_open(channel_id):
            self._exact_channels.add(channel_id)

    def dispatch(self, queue: Any) -> Deferred[None]:
        """
        Read one method (and its content) from a channel's queue and hand it to
        the delegate.  Unlike txamqp's, it never creates a channel: a method
        for a channel closed meanwhile is dropped.
        """
        return Deferred.fromCoroutine(self._dispatch(queue))

    async def _dispatch(self, queue: Any) -> None:
        frame = await queue.get()
        payload = frame.payload
        content = await read_content(queue) if payload.method.content else None
        channel = self.channels.get(frame.channel)
        if channel is None and frame.channel == 0:
            channel = self._channel_now(0)
        if channel is None or (channel.closed and frame.channel != 0):
            return
        self.delegate.dispatch(channel, TxMessage(payload.method, payload.args, content))

    def worker(self, queue: Any) -> None:
        """
        txamqp's dispatch loop, with its failures contained: a frame that
        waits on a channel closed meanwhile is dropped instead of closing the
        whole connection.
        """
        d = self.dispatch(queue)

        def next_item(_: object) -> None:
            self.work.get().addCallback(self.worker)

        def failed(failure: Failure) -> None:
            if not failure.check(QueueClosed, Closed) and not self.lost:  # type: ignore[no-untyped-call]
                self.log.failure("Dispatching a frame failed", failure)
                self.abort("internal error")

        d.addErrback(failed)
        d.addCallback(next_item)

    # -- bytes out --------------------------------------------------------

    def write_bytes(self, data: bytes) -> bool:
        """
        Write raw bytes, unless the connection is gone.

        @return: whether they were written.
        """
        if self.lost or self.transport is None:
            return False
        self.transport.write(data)
        self._last_sent = self.clock.seconds()
        return True

    def send_frame(self, frame: Any) -> None:
        """
        Encode and write one frame (txamqp's channel methods come here).
        """
        self.write_bytes(self._pack_frame(frame))

    def _method(self, name: str) -> Any:
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = self.spec.parse_method(name)
        return method

    def channel_is_open(self, channel_id: int) -> bool:
        """
        Whether C{channel_id} is open and not being closed: the only channels
        that may carry acknowledgements and publishes.
        """
        channel = self.channels.get(channel_id)
        return (
            channel is not None
            and not channel.closed
            and channel_id not in self._closing_channels
            and not self.lost
        )

    def send_method(self, channel_id: int, name: str, *args: Any) -> bool:
        """
        Write one method that expects no answer (C{basic.ack},
        C{basic.reject}, ...) on an open channel, at once.

        @param name: C{"class.method"}, e.g. C{"basic.ack"}.
        @param args: Every field of the method, in order.
        @return: whether it was written (not when the channel is closed).
        """
        if not self.channel_is_open(channel_id):
            return False
        encode = _ACK_ENCODERS.get(name) if self.fast_frames else None
        if encode is not None:
            return self.write_bytes(encode(channel_id, *args))
        frame = Frame(channel_id, Method(self._method(name), *args))
        return self.write_bytes(self._pack_frame(frame))

    def basic_publish(
        self,
        channel_id: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Mapping[str, Any] | bytes,
        mandatory: bool = True,
    ) -> bool:
        """
        Publish one message: method, content header and body frames, encoded
        before anything is written and written as one buffer.

        @param properties: Basic properties by Python name (C{content_type},
            C{delivery_mode}, C{message_id}, C{headers}, ...), or encoded
            already (L{fedhub.amqp.frames.encode_properties}).
        @return: whether it was written (not on a closed channel).
        @raise fedhub.amqp.codec.FieldTableEncodeError: when the headers can
            not be encoded; nothing is written then.
        @raise KeyError: for an unknown property name.
        """
        if not self.channel_is_open(channel_id):
            return False
        if self.fast_frames:
            publisher = self._publisher
            publisher.frame_max = self.MAX_LENGTH
            data = publisher.publish(
                channel_id, exchange, routing_key, body, properties, mandatory
            )
            return self.write_bytes(data)
        if isinstance(properties, bytes):
            properties = decode_properties(properties)
        wire = {self._wire_property[name]: value for name, value in properties.items()}
        header = Frame(channel_id, Header(self._basic_class, 0, len(body), **wire))
        check_header_size(len(self._pack_frame(header)) - FRAME_OVERHEAD, self.MAX_LENGTH)
        frames = [
            Frame(
                channel_id,
                Method(self._method("basic.publish"), 0, exchange, routing_key, mandatory, False),
            ),
            header,
        ]
        chunk = self.MAX_LENGTH - FRAME_OVERHEAD
        for start in range(0, len(body), chunk):
            frames.append(Frame(channel_id, Body(body[start : start + chunk])))
        data = b"".join([self._pack_frame(f) for f in frames])
        return self.write_bytes(data)

    def python_properties(self, properties: Mapping[str, Any]) -> dict[str, Any]:
        """
        Content-header properties by Python name (C{content_type}) instead of
        wire name (C{content-type}).
        """
        names = self._python_property
        return {names.get(name, name): value for name, value in properties.items()}

    def _set_writable(self, writable: bool) -> None:
        if writable == self.writable or (writable and self.lost):
            return
        self.writable = writable
        self._notify("writable_changed", writable)

    def _notify(self, event: str, *args: Any) -> None:
        try:
            getattr(self.events, event)(*args)
        except Exception:
            self.log.failure("Handling the {event} event failed", event=event)

    # -- channels ---------------------------------------------------------

    def _channel_now(self, channel_id: int) -> Any:
        """
        The channel object for an id, made now if new (txamqp's C{channel()}
        does the same through a lock and a Deferred).
        """
        channel = self.channels.get(channel_id)
        if channel is None:
            channel = self.channelFactory(channel_id, self.outgoing, self)
            self.channels[channel_id] = channel
        return channel

    def _allocate_channel_id(self) -> int:
        limit = self.channel_max or 65535
        for _ in range(limit):
            self._next_channel = self._next_channel % limit + 1
            if self._next_channel not in self.channels:
                return self._next_channel
        raise NotConnected(f"all {limit} channels are in use")

    def open_channel(self) -> Deferred[Any]:
        """
        Open a new channel.

        @return: a Deferred firing with the open txamqp channel, or failing
            with L{NotConnected}.
        """
        return Deferred.fromCoroutine(self._open_channel())

    async def _open_channel(self) -> Any:
        if self.lost or self.closed or not self.opened:
            raise NotConnected("the connection is not open")
        channel_id = self._allocate_channel_id()
        channel = self._channel_now(channel_id)
        try:
            await channel.channel_open()
        except Exception as e:
            self._forget_channel(channel)
            raise map_error(e) from None
        return channel

    def close_channel(self, channel: Any) -> Deferred[None]:
        """
        Close a channel (unacknowledged deliveries on it go back to their
        queues) and free its id.

        @return: a Deferred firing when the broker confirmed, or at once when
            the channel or connection is already closed.
        """
        return Deferred.fromCoroutine(self._close_channel(channel))

    async def _close_channel(self, channel: Any) -> None:
        if channel.closed or self.lost:
            self._forget_channel(channel)
            return
        self._closing_channels.add(channel.id)
        try:
            await channel.channel_close(
                reply_code=200, reply_text="closed by fedhub", class_id=0, method_id=0
            )
        except Exception:
            # Closed meanwhile by the broker or with the connection: done too.
            pass
        finally:
            self._closing_channels.discard(channel.id)
            if not channel.closed:
                channel.close(Closed("closed by fedhub"))
            self._forget_channel(channel)

    def _forget_channel(self, channel: Any) -> None:
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
            self._contents.forget(channel.id)
            self._generic_content.pop(channel.id, None)
            self._exact_channels.discard(channel.id)

    def channel_failed(self, channel: Any, reason: Any) -> None:
        """
        txamqp's hook for a channel closed by the broker; fedhub handles that
        in L{_Delegate.channel_close}.
        """

    def _broker_closed_channel(self, channel: Any, message: Any) -> None:
        if channel.id in self._closing_channels:
            # fedhub's channel.close crossed this one: RabbitMQ answers it
            # still, with a close-ok that may come once the number is taken
            # by a new channel (see frame_received).
            self._crossed_closes[channel.id] = self._crossed_closes.get(channel.id, 0) + 1
        channel._closing = True
        try:
            channel.do_close(message)
        finally:
            channel._closing = False
        self._forget_channel(channel)
        error = error_for_reply(message.reply_code, _text(message.reply_text))
        self.log.info(
            "The broker closed channel {channel}: {code} {text}",
            channel=channel.id,
            code=error.reply_code,
            text=error.reply_text,
        )
        self._notify("channel_closed", channel.id, error)

    # -- handshake, from the delegate --------------------------------------

    def _on_start(self, channel: Any, message: Any) -> None:
        self.server_properties = dict(message.server_properties or {})
        offered = _text(message.mechanisms).split()
        mechanism = self.credentials.mechanism
        if mechanism not in offered:
            error = AccessRefused(
                403,
                f"the broker offers the login mechanisms {', '.join(offered) or 'none'},"
                f" not {mechanism}",
            )
            self.log.error("Login impossible: {reason}", reason=error.reply_text)
            self.started.fail_if_not_fired(error)
            self.abort("no usable login mechanism")
            return
        channel.connection_start_ok(
            client_properties=client_properties(self.connection_name),
            mechanism=mechanism,
            response=self.credentials.response(),
            locale="en_US",
        ).addErrback(lambda _: None)

    def _on_tune(self, channel: Any, message: Any) -> None:
        if 0 < message.frame_max < FRAME_MIN_SIZE:
            # Frames that small can not carry a message: every publish would
            # fail as unencodable, or never be complete.
            error = NotConnected(
                f"the broker offers frame_max {message.frame_max}, below AMQP's minimum"
                f" of {FRAME_MIN_SIZE}"
            )
            self.log.error("Connection refused: {reason}", reason=str(error))
            self.started.fail_if_not_fired(error)
            self.abort("frame_max below the minimum")
            return
        self.channel_max = _negotiate(message.channel_max, self.requested_channel_max)
        frame_max = _negotiate(message.frame_max, self.requested_frame_max)
        heartbeat = _negotiate(message.heartbeat, self.requested_heartbeat)
        self.MAX_LENGTH = frame_max
        self._frame_limit = max(frame_max, 4096)
        channel.connection_tune_ok(
            channel_max=self.channel_max, frame_max=frame_max, heartbeat=heartbeat
        ).addErrback(lambda _: None)
        self._start_heartbeat(heartbeat)
        self.started.fire()

    def _on_blocked(self, reason: str) -> None:
        self.blocked = True
        self.log.warn("The broker blocked publishing: {reason}", reason=reason)
        self._notify("connection_blocked", reason)

    def _on_unblocked(self) -> None:
        self.blocked = False
        self.log.info("The broker unblocked publishing")
        self._notify("connection_unblocked")


class _Delegate(TwistedDelegate):  # type: ignore[misc]
    """
    Routes the methods the broker sends on its own to the client.
    """

    client: AMQPClient
    log = HubLogger()

    def dispatch(self, channel: Any, message: Any) -> None:
        method = message.method
        name = f"{pythonize(method.klass.name)}_{pythonize(method.name)}"
        handler = getattr(self, name, None)
        if handler is None:
            self.log.warn("Unexpected {method} from the broker ignored", method=name)
            return
        try:
            handler(channel, message)
        except Exception:
            self.log.failure("Handling {method} failed", method=name)

    def connection_start(self, channel: Any, message: Any) -> None:
        self.client._on_start(channel, message)

    def connection_tune(self, channel: Any, message: Any) -> None:
        self.client._on_tune(channel, message)

    def connection_blocked(self, channel: Any, message: Any) -> None:
        self.client._on_blocked(_text(message.reason))

    def connection_unblocked(self, channel: Any, message: Any) -> None:
        self.client._on_unblocked()

    def connection_close(self, channel: Any, message: Any) -> None:
        self.log.info(
            "The broker closed the connection{of}: {code} {text}",
            of="" if self.client.domain is None else f" of domain {self.client.domain}",
            code=message.reply_code,
            text=_text(message.reply_text),
            domain=self.client.domain,
        )
        self.client.broker_closed = f"{message.reply_code} {_text(message.reply_text)}"
        channel.connection_close_ok().addErrback(lambda _: None)
        self.client.do_close(message)

    def close(self, reason: Any) -> None:
        client = self.client
        client.closed = True
        client.started.fail_if_not_fired(Closed(reason))
        client.close_transport()

    def channel_close(self, channel: Any, message: Any) -> None:
        channel.channel_close_ok().addErrback(lambda _: None)
        self.client._broker_closed_channel(channel, message)

    def basic_deliver(self, channel: Any, message: Any) -> None:
        content = message.content
        body = content.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.client._notify(
            "basic_deliver",
            channel.id,
            _text(message.consumer_tag),
            message.delivery_tag,
            bool(message.redelivered),
            _text(message.exchange),
            _text(message.routing_key),
            self.client.python_properties(content.properties),
            body,
        )

    def basic_return_(self, channel: Any, message: Any) -> None:
        content = message.content
        body = content.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.client._notify(
            "basic_return",
            channel.id,
            message.reply_code,
            _text(message.reply_text),
            _text(message.exchange),
            _text(message.routing_key),
            self.client.python_properties(content.properties),
            body,
        )

    def basic_ack(self, channel: Any, message: Any) -> None:
        self.client._notify("basic_ack", channel.id, message.delivery_tag, bool(message.multiple))

    def basic_nack(self, channel: Any, message: Any) -> None:
        self.client._notify("basic_nack", channel.id, message.delivery_tag, bool(message.multiple))

    def basic_cancel(self, channel: Any, message: Any) -> None:
        self.client._notify("consumer_cancelled", channel.id, _text(message.consumer_tag))


class ClientFactory(Factory):
    """
    Builds one L{AMQPClient} per connection, all with the same settings.
    """

    noisy = False

    def __init__(
        self,
        spec: Any,
        *,
        clock: IReactorTime,
        vhost: str = "/",
        credentials: Credentials | None = None,
        heartbeat: int = 30,
        connection_name: str | None = None,
        close_timeout: float = 5.0,
        domain: str | None = None,
    ) -> None:
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1:
            raise ConfigError(
                [ConfigProblem("heartbeat", f"must be at least 1 second, not {heartbeat!r}")]
            )
        self.spec = spec
        self.clock = clock
        self.vhost = vhost
        self.credentials = credentials or Credentials()
        self.heartbeat = heartbeat
        self.connection_name = connection_name
        self.close_timeout = close_timeout
        #: The domain the connections are for, named in what they log.
        self.domain = domain

    def buildProtocol(self, addr: Any) -> AMQPClient:
        """
        A new client for one connection.
        """
        client = AMQPClient(
            self.spec,
            clock=self.clock,
            vhost=self.vhost,
            credentials=self.credentials,
            heartbeat=self.heartbeat,
            connection_name=self.connection_name,
            close_timeout=self.close_timeout,
        )
        client.factory = self
        client.domain = self.domain
        return client

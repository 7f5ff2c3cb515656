"""
Tests for L{fedhub.amqp.protocol}: the AMQP client protocol, driven frame by
frame by a scripted broker over a C{StringTransport}, with a fake clock.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from typing import Any

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IProtocol, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import ChannelClosed, Closed, ConnectionClosed
from txamqp.spec import pythonize
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub import __version__
from fedhub.amqp.codec import body_frame, content_header_frame, pack_frame, unpack_frame
from fedhub.amqp.protocol import (
    CAPABILITIES,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    AMQPClient,
    ClientFactory,
    Credentials,
    IConnectionEvents,
    NullConnectionEvents,
    client_properties,
    error_for_reply,
    map_error,
)
from fedhub.amqp.spec import load_spec
from fedhub.errors import (
    AccessRefused,
    ChannelError,
    ConfigError,
    NotConnected,
    NotFound,
    PreconditionFailed,
)

_DEFAULTS = {
    "bit": False,
    "octet": 0,
    "short": 0,
    "long": 0,
    "longlong": 0,
    "shortstr": "",
    "longstr": b"",
    "table": {},
    "timestamp": 0,
}


@implementer(ITCPTransport)
class FakeTCP(StringTransport):
    """
    A C{StringTransport} that is a TCP transport: records Nagle, aborts and
    the number of writes.

    Once L{attach}ed to its protocol and a clock, it ends the connection as a
    reactor's TCP transport does: C{abortConnection} reports
    C{connectionLost} with L{ConnectionAborted} on the next turn of the clock,
    and C{loseConnection} (when L{peer_closes}) with L{ConnectionDone}.  The
    loss is reported once, whatever comes after.  Without C{peer_closes} a
    closing connection stays open until L{lose} says it is gone, as a peer
    that has not closed its side (or a TLS close not yet answered) leaves it.

    @ivar peer_closes: Whether C{loseConnection} completes on its own.
    @ivar lost_with: The reason reported to the protocol, once it was.
    """

    def __init__(self) -> None:
        super().__init__()
        self.no_delay = False
        self.aborted = False
        self.writes = 0
        self.peer_closes = False
        self.lost_with: Failure | None = None
        self._protocol: IProtocol | None = None
        self._clock: Clock | None = None
        self._loss_call: IDelayedCall | None = None

    def attach(self, protocol: IProtocol, clock: Clock) -> None:
        """
        Report the end of the connection to C{protocol}, delayed on C{clock}.
        """
        self._protocol = protocol
        self._clock = clock

    def lose(self, reason: BaseException | None = None) -> None:
        """
        The connection is gone now (the peer closed it, or it broke): report
        C{connectionLost} with C{reason} (L{ConnectionDone} by default),
        unless a loss was reported already.
        """
        if self._loss_call is not None and self._loss_call.active():
            self._loss_call.cancel()
        self._loss_call = None
        if self.lost_with is not None or self._protocol is None:
            return
        self.lost_with = Failure(reason if reason is not None else ConnectionDone())
        self.connected = False
        self.disconnected = True
        self._protocol.connectionLost(self.lost_with)

    def _lose_soon(self, reason: BaseException) -> None:
        if self._clock is None or self.lost_with is not None or self._loss_call is not None:
            return
        self._loss_call = self._clock.callLater(0, self.lose, reason)

    def loseConnection(self) -> None:
        super().loseConnection()
        if self.peer_closes:
            self._lose_soon(ConnectionDone())

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()
        self._lose_soon(ConnectionAborted())

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


@implementer(IConnectionEvents)
class RecordingEvents(NullConnectionEvents):
    """
    Records every event as C{(name, args...)}; raises for the event named in
    C{explode}.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.explode: str | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.seen.append((name, *args))
        if name == self.explode:
            raise RuntimeError(f"{name} handler broke")

    def basic_deliver(self, *args: Any) -> None:  # type: ignore[override]
        self._record("deliver", *args)

    def basic_return(self, *args: Any) -> None:  # type: ignore[override]
        self._record("return", *args)

    def basic_ack(self, *args: Any) -> None:  # type: ignore[override]
        self._record("ack", *args)

    def basic_nack(self, *args: Any) -> None:  # type: ignore[override]
        self._record("nack", *args)

    def consumer_cancelled(self, *args: Any) -> None:  # type: ignore[override]
        self._record("cancelled", *args)

    def channel_closed(self, *args: Any) -> None:  # type: ignore[override]
        self._record("channel_closed", *args)

    def connection_blocked(self, *args: Any) -> None:  # type: ignore[override]
        self._record("blocked", *args)

    def connection_unblocked(self) -> None:
        self._record("unblocked")

    def writable_changed(self, *args: Any) -> None:  # type: ignore[override]
        self._record("writable", *args)


class Broker:
    """
    The broker's side of one connection: builds frames for the client and
    reads what it wrote.
    """

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.spec = load_spec()
        self.client = AMQPClient(self.spec, clock=self.clock, **options)
        self.events = RecordingEvents()
        self.client.events = self.events
        self.transport = FakeTCP()
        self.transport.attach(self.client, self.clock)
        self.client.makeConnection(self.transport)
        self.header = self.transport.value()
        self.transport.clear()

    def frame(self, channel: int, name: str, **fields: Any) -> bytes:
        method = self.spec.parse_method(name)
        args = [fields.pop(pythonize(f.name), _DEFAULTS[f.type]) for f in method.fields]
        assert not fields, f"unknown fields {fields}"
        from txamqp.connection import Frame, Method

        return pack_frame(self.spec, Frame(channel, Method(method, *args)))  # type: ignore[no-any-return]

    def content(self, channel: int, body: bytes, **properties: Any) -> bytes:
        header = content_header_frame(self.spec, channel, len(body), properties)
        data = pack_frame(self.spec, header)
        if body:
            data += pack_frame(self.spec, body_frame(channel, body))
        return data  # type: ignore[no-any-return]

    def send(self, *chunks: bytes) -> None:
        self.client.dataReceived(b"".join(chunks))

    def written(self) -> list[Any]:
        """
        The frames the client wrote since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        frames = []
        while data:
            (size,) = struct.unpack_from("!I", data, 3)
            frames.append(unpack_frame(self.spec, data[: size + 8]))
            data = data[size + 8 :]
        return frames

    def methods(self) -> list[tuple[int, str, dict[str, Any]]]:
        """
        The methods the client wrote since the last call, with their fields
        by Python name.
        """
        result = []
        for frame in self.written():
            payload = frame.payload
            if not hasattr(payload, "method"):
                continue
            method = payload.method
            fields = {pythonize(f.name): a for f, a in zip(method.fields, payload.args)}
            result.append((frame.channel, f"{method.klass.name}.{method.name}", fields))
        return result

    def handshake(self, heartbeat: int = 60, frame_max: int = 131072) -> None:
        self.send(
            self.frame(
                0,
                "connection.start",
                version_major=0,
                version_minor=9,
                server_properties={"product": "RabbitMQ"},
                mechanisms=b"PLAIN AMQPLAIN EXTERNAL",
                locales=b"en_US",
            )
        )
        self.send(
            self.frame(
                0, "connection.tune", channel_max=2047, frame_max=frame_max, heartbeat=heartbeat
            )
        )
        self.opened = self.client.open()
        self.send(self.frame(0, "connection.open-ok"))
        self.written()

    def open_channel(self) -> Any:
        opening = self.client.open_channel()
        ((channel_id, name, _),) = self.methods()
        assert name == "channel.open"
        self.send(self.frame(channel_id, "channel.open-ok"))
        return opening


class _RecordingProtocol(Protocol):
    """
    Records the reasons it is told the connection was lost for.
    """

    def __init__(self) -> None:
        self.reasons: list[Failure] = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reasons.append(reason)


class FakeTCPTests(SynchronousTestCase):
    """
    L{FakeTCP} ends a connection as a reactor's TCP transport does.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = _RecordingProtocol()
        self.transport = FakeTCP()
        self.transport.attach(self.protocol, self.clock)
        self.protocol.makeConnection(self.transport)

    def kinds(self) -> list[type]:
        return [type(reason.value) for reason in self.protocol.reasons]

    def test_abort_reports_loss_once(self) -> None:
        """
        An abort reports ConnectionAborted on the next turn of the clock, not
        during the call; aborting again or losing later reports nothing more.
        """
        self.transport.abortConnection()
        self.assertEqual(self.protocol.reasons, [])
        self.clock.advance(0)
        self.assertEqual(self.kinds(), [ConnectionAborted])
        self.assertIs(self.transport.lost_with, self.protocol.reasons[0])
        self.transport.abortConnection()
        self.transport.lose(ConnectionLost())
        self.clock.advance(1)
        self.assertEqual(self.kinds(), [ConnectionAborted])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lose_during_abort(self) -> None:
        """
        A loss reported before an abort's is the only one.
        """
        self.transport.abortConnection()
        self.transport.lose(ConnectionLost())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.kinds(), [ConnectionLost])

    def test_close_waits_for_peer(self) -> None:
        """
        A clean close is not reported until the peer closed too; then as
        ConnectionDone, once, even if an abort follows.
        """
        self.transport.loseConnection()
        self.clock.advance(1)
        self.assertEqual(self.protocol.reasons, [])
        self.transport.lose()
        self.transport.abortConnection()
        self.clock.advance(1)
        self.assertEqual(self.kinds(), [ConnectionDone])

    def test_close_with_peer_closing(self) -> None:
        """
        With a peer that closes at once, a clean close reports
        ConnectionDone on the next turn, and an abort meanwhile adds nothing.
        """
        self.transport.peer_closes = True
        self.transport.loseConnection()
        self.transport.abortConnection()
        self.assertEqual(self.protocol.reasons, [])
        self.clock.advance(0)
        self.assertEqual(self.kinds(), [ConnectionDone])

    def test_detached(self) -> None:
        """
        A fake attached to no protocol reports nothing and schedules nothing.
        """
        transport = FakeTCP()
        transport.abortConnection()
        transport.lose()
        self.assertTrue(transport.aborted)
        self.assertIsNone(transport.lost_with)


class ConnectTests(SynchronousTestCase):
    """
    What the client does when the transport connects.
    """

    def test_protocol_header(self) -> None:
        """
        The client announces AMQP 0-9-1 (txamqp would announce 0-9).
        """
        self.assertEqual(Broker().header, PROTOCOL_HEADER)
        self.assertEqual(PROTOCOL_HEADER, b"AMQP\x00\x00\x09\x01")

    def test_nagle_off(self) -> None:
        """
        TCP_NODELAY is set on the TCP transport.
        """
        self.assertTrue(Broker().transport.no_delay)

    def test_nagle_off_under_tls(self) -> None:
        """
        Under a wrapping transport (TLS), the TCP transport below gets it.
        """

        class Wrapper(StringTransport):
            def __init__(self, inner: FakeTCP) -> None:
                super().__init__()
                self.transport = inner

        inner = FakeTCP()
        client = AMQPClient(load_spec(), clock=Clock())
        client.makeConnection(Wrapper(inner))
        self.assertTrue(inner.no_delay)

    def test_write_producer_registered(self) -> None:
        """
        A streaming producer is registered so the transport can push back.
        """
        broker = Broker()
        self.assertTrue(broker.transport.streaming)
        self.assertIsNotNone(broker.transport.producer)


class HandshakeTests(SynchronousTestCase):
    """
    Login, tuning and opening the vhost.
    """

    def start(self, broker: Broker, mechanisms: bytes = b"PLAIN EXTERNAL") -> dict[str, Any]:
        broker.send(
            broker.frame(
                0,
                "connection.start",
                version_major=0,
                version_minor=9,
                server_properties={},
                mechanisms=mechanisms,
                locales=b"en_US",
            )
        )
        ((channel, name, fields),) = broker.methods()
        self.assertEqual((channel, name), (0, "connection.start-ok"))
        return fields

    def test_client_properties(self) -> None:
        """
        start-ok carries product, version, the connection name and every
        capability RabbitMQ needs to send confirms' nacks, cancels and blocks.
        """
        fields = self.start(Broker(connection_name="hub infra"))
        properties = fields["client_properties"]
        self.assertEqual(properties["product"], "fedhub")
        self.assertEqual(properties["version"], __version__)
        self.assertEqual(properties["connection_name"], "hub infra")
        capabilities = properties["capabilities"]
        for name in (
            "publisher_confirms",
            "consumer_cancel_notify",
            "connection.blocked",
            "basic.nack",
            "authentication_failure_close",
        ):
            self.assertIs(capabilities[name], True, name)
        self.assertEqual(capabilities, CAPABILITIES)

    def test_no_connection_name(self) -> None:
        """
        Without a name, none is sent.
        """
        self.assertNotIn("connection_name", client_properties(None))

    def test_plain_login(self) -> None:
        """
        PLAIN sends NUL, user, NUL, password.
        """
        fields = self.start(Broker(credentials=Credentials("PLAIN", "alice", "s3cret")))
        self.assertEqual(fields["mechanism"], "PLAIN")
        self.assertEqual(fields["response"], "\0alice\0s3cret")
        self.assertEqual(fields["locale"], "en_US")

    def test_external_login(self) -> None:
        """
        EXTERNAL sends an empty response: the certificate is the identity.
        """
        fields = self.start(Broker(credentials=Credentials("EXTERNAL")))
        self.assertEqual(fields["mechanism"], "EXTERNAL")
        self.assertEqual(fields["response"], "")

    def test_mechanism_not_offered(self) -> None:
        """
        A broker that does not offer the mechanism gets no start-ok: the
        connection is dropped and open() fails with AccessRefused.
        """
        broker = Broker(credentials=Credentials("EXTERNAL"))
        opening = broker.client.open()
        broker.send(
            broker.frame(
                0,
                "connection.start",
                server_properties={},
                mechanisms=b"PLAIN AMQPLAIN",
                locales=b"en_US",
            )
        )
        self.assertEqual(broker.methods(), [])
        self.assertTrue(broker.transport.aborted)
        error = self.failureResultOf(opening, AccessRefused).value
        self.assertIn("not EXTERNAL", error.reply_text)
        broker.clock.advance(0)
        self.assertEqual(
            str(self.successResultOf(broker.client.when_lost())),
            "fedhub dropped the connection: no usable login mechanism",
        )

    def test_unknown_mechanism(self) -> None:
        """
        Credentials know only PLAIN and EXTERNAL, and hide the password.
        """
        self.assertRaises(ValueError, Credentials, "AMQPLAIN")
        self.assertNotIn("s3cret", repr(Credentials("PLAIN", "u", "s3cret")))

    def tune(self, broker: Broker, heartbeat: int, frame_max: int = 131072) -> dict[str, Any]:
        self.start(broker)
        broker.send(
            broker.frame(
                0, "connection.tune", channel_max=0, frame_max=frame_max, heartbeat=heartbeat
            )
        )
        ((_, name, fields),) = broker.methods()
        self.assertEqual(name, "connection.tune-ok")
        return fields

    def test_heartbeat_smaller_of_both(self) -> None:
        """
        The heartbeat is the smaller of the broker's and ours.
        """
        self.assertEqual(self.tune(Broker(heartbeat=30), 60)["heartbeat"], 30)
        self.assertEqual(self.tune(Broker(heartbeat=30), 10)["heartbeat"], 10)

    def test_heartbeat_when_broker_wants_none(self) -> None:
        """
        A broker proposing 0 (no heartbeat) still gets ours: heartbeats are never off.
        """
        broker = Broker(heartbeat=30)
        self.assertEqual(self.tune(broker, 0)["heartbeat"], 30)
        self.assertEqual(broker.client.heartbeat_interval, 30)

    def test_frame_and_channel_max(self) -> None:
        """
        frame_max is the smaller one; a broker's 0 for channel_max means ours.
        """
        broker = Broker()
        fields = self.tune(broker, 60, frame_max=8192)
        self.assertEqual(fields["frame_max"], 8192)
        self.assertEqual(fields["channel_max"], 2047)
        self.assertEqual(broker.client.MAX_LENGTH, 8192)

    def test_heartbeat_zero_refused(self) -> None:
        """
        A client or factory with heartbeat 0 can not be built.
        """
        self.assertRaises(ConfigError, AMQPClient, load_spec(), clock=Clock(), heartbeat=0)
        self.assertRaises(ConfigError, ClientFactory, load_spec(), clock=Clock(), heartbeat=0)
        self.assertRaises(ConfigError, AMQPClient, load_spec(), clock=Clock(), heartbeat=-1)

    def test_open(self) -> None:
        """
        open() sends connection.open for the vhost and fires on open-ok.
        """
        broker = Broker(vhost="infra")
        self.tune(broker, 60)
        opening = broker.client.open()
        ((_, name, fields),) = broker.methods()
        self.assertEqual((name, fields["virtual_host"]), ("connection.open", "infra"))
        self.assertNoResult(opening)
        broker.send(broker.frame(0, "connection.open-ok"))
        self.assertIsNone(self.successResultOf(opening))
        self.assertTrue(broker.client.opened)

    def test_login_refused(self) -> None:
        """
        A broker closing the connection with 403 during the handshake fails
        open() with AccessRefused; the client answers close-ok and disconnects.
        """
        broker = Broker()
        opening = broker.client.open()
        self.start(broker)
        broker.send(
            broker.frame(
                0, "connection.close", reply_code=403, reply_text="ACCESS_REFUSED - Login was refused"
            )
        )
        error = self.failureResultOf(opening, AccessRefused).value
        self.assertEqual(error.reply_code, 403)
        self.assertEqual([m[1] for m in broker.methods()], ["connection.close-ok"])
        self.assertTrue(broker.transport.disconnecting)

    def test_connection_lost_during_handshake(self) -> None:
        """
        A connection lost before it is open fails open() with NotConnected.
        """
        broker = Broker()
        opening = broker.client.open()
        broker.transport.lose(ConnectionLost())
        self.failureResultOf(opening, NotConnected)


class HeartbeatTests(SynchronousTestCase):
    """
    Heartbeats go out when the client is quiet, and a silent broker is dropped.
    """

    def setUp(self) -> None:
        self.broker = Broker(heartbeat=2)
        self.broker.handshake(heartbeat=2)

    def test_sends_when_quiet(self) -> None:
        """
        After half an interval without writing, a heartbeat frame goes out.
        """
        self.broker.clock.advance(0.5)
        self.assertEqual(self.broker.transport.value(), b"")
        self.broker.send(HEARTBEAT_FRAME)
        self.broker.clock.advance(0.5)
        self.assertEqual(self.broker.transport.value(), HEARTBEAT_FRAME)

    def test_no_heartbeat_while_writing(self) -> None:
        """
        Other frames count: a client that writes sends no heartbeats.
        """
        for _ in range(4):
            self.broker.clock.advance(0.5)
            self.broker.client.send_heartbeat()
            self.broker.transport.clear()
            self.broker.send(HEARTBEAT_FRAME)
        self.broker.clock.advance(0.5)
        self.assertEqual(self.broker.transport.value(), b"")

    def test_silent_broker_dropped(self) -> None:
        """
        Two intervals without a byte from the broker abort the connection.
        """
        lost = self.broker.client.when_lost()
        self.broker.clock.pump([0.5] * 7)
        self.assertFalse(self.broker.transport.aborted)
        self.assertNoResult(lost)
        self.broker.clock.advance(0.5)
        self.assertTrue(self.broker.transport.aborted)
        # The loss says why (the status page shows it), not "aborted locally".
        reason = self.successResultOf(lost)
        self.assertIsInstance(reason, NotConnected)
        self.assertEqual(str(reason), "fedhub dropped the connection: missed heartbeats")
        self.assertEqual(self.broker.clock.getDelayedCalls(), [])

    def test_traffic_keeps_alive(self) -> None:
        """
        Anything received (a heartbeat too) counts as a sign of life.
        """
        for _ in range(10):
            self.broker.clock.advance(1)
            self.broker.send(HEARTBEAT_FRAME)
        self.assertFalse(self.broker.transport.aborted)

    def test_nothing_after_loss(self) -> None:
        """
        After the connection is lost no timer is left, and an old tick firing
        on a transport that is gone (txamqp's crash after a broker kill) does
        nothing.
        """
        client = self.broker.client
        self.broker.transport.lose(ConnectionLost())
        self.assertEqual(self.broker.clock.getDelayedCalls(), [])
        client.transport = None
        client._heartbeat_tick()
        self.broker.clock.advance(10)
        self.assertEqual(self.broker.transport.value(), b"")
        self.assertFalse(self.broker.transport.aborted)

    def test_abort_after_loss_is_harmless(self) -> None:
        """
        abort() on a lost connection does nothing.
        """
        client = self.broker.client
        self.broker.transport.lose(ConnectionLost())
        client.abort("late")
        self.assertFalse(self.broker.transport.aborted)


class EventTests(SynchronousTestCase):
    """
    Methods the broker sends on its own reach the events listener.
    """

    def setUp(self) -> None:
        self.broker = Broker()
        self.broker.handshake()
        self.channel = self.successResultOf(self.broker.open_channel())
        self.events = self.broker.events

    def test_ack_nack(self) -> None:
        """
        basic.ack and basic.nack report channel, tag and multiple.
        """
        b = self.broker
        b.send(
            b.frame(1, "basic.ack", delivery_tag=3, multiple=True),
            b.frame(1, "basic.nack", delivery_tag=4, multiple=False, requeue=True),
        )
        self.assertEqual(self.events.seen, [("ack", 1, 3, True), ("nack", 1, 4, False)])

    def test_return_before_ack(self) -> None:
        """
        A return (with its content) and the ack after it arrive in that order,
        properties by Python name.
        """
        b = self.broker
        b.send(
            b.frame(1, "basic.return", reply_code=312, reply_text="NO_ROUTE", exchange="amq.topic",
                    routing_key="a.b"),
            b.content(1, b'{"x":1}', **{"message-id": "m1", "content-type": "application/json"}),
            b.frame(1, "basic.ack", delivery_tag=1),
        )
        self.assertEqual(
            self.events.seen,
            [
                ("return", 1, 312, "NO_ROUTE", "amq.topic", "a.b",
                 {"message_id": "m1", "content_type": "application/json"}, b'{"x":1}'),
                ("ack", 1, 1, False),
            ],
        )

    def test_deliver_with_x_death(self) -> None:
        """
        A delivery with RabbitMQ's x-death header (arrays of tables with
        timestamps) is decoded completely.
        """
        b = self.broker
        when = datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)
        headers = {
            "x-death": [
                {"count": 1, "reason": "rejected", "queue": "q", "time": when,
                 "exchange": "amq.topic", "routing-keys": ["a.b"]}
            ]
        }
        b.send(
            b.frame(1, "basic.deliver", consumer_tag="c1", delivery_tag=7, redelivered=True,
                    exchange="amq.topic", routing_key="a.b"),
            b.content(1, b"{}", headers=headers, **{"delivery-mode": 2}),
        )
        ((name, channel, tag, dtag, redelivered, exchange, key, props, body),) = self.events.seen
        self.assertEqual((name, channel, tag, dtag, redelivered), ("deliver", 1, "c1", 7, True))
        self.assertEqual(props["headers"]["x-death"][0]["time"], when)
        self.assertEqual(props["delivery_mode"], 2)
        self.assertEqual(body, b"{}")

    def test_empty_body(self) -> None:
        """
        A delivery without body frames has the empty bytes body.
        """
        b = self.broker
        b.send(b.frame(1, "basic.deliver", consumer_tag="c1", delivery_tag=1), b.content(1, b""))
        self.assertEqual(self.events.seen[0][-1], b"")

    def test_body_in_pieces(self) -> None:
        """
        Frames split across reads are put together.
        """
        b = self.broker
        data = b.frame(1, "basic.deliver", consumer_tag="c", delivery_tag=1) + b.content(1, b"xyz")
        for i in range(len(data)):
            b.send(data[i : i + 1])
        self.assertEqual(self.events.seen[0][-1], b"xyz")

    def test_cancel_blocked_unblocked(self) -> None:
        """
        A broker-side consumer cancel and connection.blocked/unblocked are reported.
        """
        b = self.broker
        b.send(
            b.frame(1, "basic.cancel", consumer_tag="c9"),
            b.frame(0, "connection.blocked", reason="low on memory"),
        )
        self.assertTrue(b.client.blocked)
        b.send(b.frame(0, "connection.unblocked"))
        self.assertFalse(b.client.blocked)
        self.assertEqual(
            self.events.seen,
            [("cancelled", 1, "c9"), ("blocked", "low on memory"), ("unblocked",)],
        )

    def test_failing_listener_contained(self) -> None:
        """
        A listener that raises is logged; the connection and later events go on.
        """
        b = self.broker
        self.events.explode = "ack"
        b.send(b.frame(1, "basic.ack", delivery_tag=1), b.frame(1, "basic.nack", delivery_tag=2))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e[0] for e in self.events.seen], ["ack", "nack"])
        self.assertFalse(b.transport.disconnecting)

    def test_channel_closed_by_broker(self) -> None:
        """
        A channel.close from the broker is answered with close-ok, reported as
        the typed error, fails what waits on the channel, and frees the channel.
        """
        b = self.broker
        declaring = self.channel.queue_declare(queue="q", passive=True)
        b.methods()
        b.send(b.frame(1, "channel.close", reply_code=404, reply_text="NOT_FOUND - no queue 'q'",
                       class_id=50, method_id=10))
        self.assertEqual([m[1] for m in b.methods()], ["channel.close-ok"])
        ((name, channel_id, error),) = self.events.seen
        self.assertEqual((name, channel_id), ("channel_closed", 1))
        self.assertIsInstance(error, NotFound)
        self.assertEqual(error.reply_code, 404)
        failure = self.failureResultOf(declaring)
        self.assertIsInstance(map_error(failure), NotFound)
        self.assertNotIn(1, b.client.channels)
        self.assertFalse(b.client.channel_is_open(1))

    def test_frames_for_unknown_channels_dropped(self) -> None:
        """
        A frame for a channel that is not open is dropped without creating it.
        """
        b = self.broker
        b.send(b.frame(9, "basic.ack", delivery_tag=1))
        self.assertEqual(self.events.seen, [])
        self.assertNotIn(9, b.client.channels)

    def test_connection_closed_by_broker(self) -> None:
        """
        A connection.close from the broker is answered, the transport closed,
        and when_lost fires once the connection is gone.
        """
        b = self.broker
        lost = b.client.when_lost()
        pending = self.channel.queue_declare(queue="q")
        b.send(b.frame(0, "connection.close", reply_code=320, reply_text="CONNECTION_FORCED"))
        self.assertIn("connection.close-ok", [m[1] for m in b.methods()])
        self.assertTrue(b.transport.disconnecting)
        self.assertIsInstance(map_error(self.failureResultOf(pending)), NotConnected)
        self.assertNoResult(lost)
        b.transport.lose()
        self.assertIsInstance(self.successResultOf(lost), ConnectionDone)
        self.assertIsInstance(self.successResultOf(b.client.when_lost()), ConnectionDone)

    def test_loss_while_channels_open_and_opening(self) -> None:
        """
        Losing the connection while one channel is open and another is being
        opened fails both, forgets both and still reports the loss (closing
        the opening channel removes it from the table being walked).
        """
        b = self.broker
        lost = b.client.when_lost()
        opening = b.client.open_channel()
        self.assertEqual(sorted(b.client.channels), [0, 1, 2])
        waiting = self.channel.queue_declare(queue="q")
        b.transport.lose(ConnectionLost())
        self.assertIsInstance(map_error(self.failureResultOf(waiting)), NotConnected)
        self.assertIsInstance(map_error(self.failureResultOf(opening)), NotConnected)
        self.assertNotIn(2, b.client.channels)
        self.assertIsInstance(self.successResultOf(lost), ConnectionLost)

    def test_bad_frame_end(self) -> None:
        """
        A frame with a wrong end octet is a protocol error: logged, connection dropped.
        """
        b = self.broker
        waiting = self.channel.queue_declare(queue="q")
        frame = bytearray(b.frame(1, "basic.ack", delivery_tag=1))
        frame[-1] = 0
        b.send(bytes(frame))
        self.assertTrue(b.transport.aborted)
        self.assertEqual(self.events.seen, [])
        b.clock.advance(0)
        self.assertIsInstance(map_error(self.failureResultOf(waiting)), NotConnected)
        self.assertEqual(
            str(self.successResultOf(b.client.when_lost())),
            "fedhub dropped the connection: protocol error",
        )

    def test_oversized_frame(self) -> None:
        """
        A frame announcing more than frame_max bytes drops the connection
        before it is buffered.
        """
        b = self.broker
        b.send(struct.pack("!BHI", 3, 1, 10_000_000))
        self.assertTrue(b.transport.aborted)
        b.clock.advance(0)
        self.assertEqual(
            str(self.successResultOf(b.client.when_lost())),
            "fedhub dropped the connection: protocol error",
        )


class WriteTests(SynchronousTestCase):
    """
    Publishing, acknowledging, channels and write flow control.
    """

    def setUp(self) -> None:
        self.broker = Broker(frame_max=4096)
        self.broker.handshake(frame_max=4096)
        self.channel = self.successResultOf(self.broker.open_channel())

    def test_publish_one_buffer(self) -> None:
        """
        A publish is method, header and body frames in one write, the body
        split by frame_max, properties by wire name.
        """
        b = self.broker
        body = b"x" * 10000
        writes = b.transport.writes
        written = b.client.basic_publish(
            1, "amq.topic", "a.b", body,
            {"content_type": "application/json", "delivery_mode": 2, "headers": {"k": True}},
        )
        self.assertTrue(written)
        self.assertEqual(b.transport.writes, writes + 1)
        frames = b.written()
        method, header, *bodies = frames
        self.assertEqual(method.payload.method.name, "publish")
        self.assertEqual(method.payload.args, (0, "amq.topic", "a.b", True, False))
        self.assertEqual(header.payload.size, 10000)
        self.assertEqual(
            header.payload.properties,
            {"content-type": "application/json", "delivery-mode": 2, "headers": {"k": True}},
        )
        self.assertEqual([len(f.payload.content) for f in bodies], [4088, 4088, 1824])
        self.assertEqual(b"".join(f.payload.content for f in bodies), body)

    def test_publish_unencodable_writes_nothing(self) -> None:
        """
        Headers that can not be encoded raise before anything is written.
        """
        b = self.broker
        self.assertRaises(
            Exception, b.client.basic_publish, 1, "", "q", b"{}", {"headers": {"k": object()}}
        )
        self.assertEqual(b.transport.value(), b"")

    def test_publish_on_closed_channel(self) -> None:
        """
        Nothing is written on a channel that is not open.
        """
        b = self.broker
        self.assertFalse(b.client.basic_publish(5, "", "q", b"{}", {}))
        self.assertFalse(b.client.send_method(5, "basic.ack", 1, False))
        self.assertEqual(b.transport.value(), b"")

    def test_send_method(self) -> None:
        """
        send_method writes one method frame at once.
        """
        b = self.broker
        self.assertTrue(b.client.send_method(1, "basic.reject", 5, True))
        self.assertEqual(b.methods(), [(1, "basic.reject", {"delivery_tag": 5, "requeue": True})])

    def test_channel_ids(self) -> None:
        """
        Channels get distinct ids; a closed one's id is free again.
        """
        b = self.broker
        second = self.successResultOf(b.open_channel())
        self.assertEqual((self.channel.id, second.id), (1, 2))
        closing = b.client.close_channel(self.channel)
        self.assertEqual(b.methods()[0][:2], (1, "channel.close"))
        self.assertFalse(b.client.channel_is_open(1))
        b.send(b.frame(1, "channel.close-ok"))
        self.successResultOf(closing)
        self.assertNotIn(1, b.client.channels)

    def test_crossing_close_ok_of_a_reused_channel(self) -> None:
        """
        When fedhub's channel.close crosses the broker's, the broker still
        answers fedhub's with a close-ok after taking its own close-ok: that
        late close-ok belongs to the closed channel, not to a new one that
        took its number meanwhile, whose channel.open it would otherwise
        answer (and fail, leaving the channel open on the broker's side).
        """
        b = Broker(channel_max=1)
        b.handshake()
        self.assertEqual(b.client.channel_max, 1)
        first = self.successResultOf(b.open_channel())
        closing = b.client.close_channel(first)
        self.assertEqual(b.methods()[0][:2], (1, "channel.close"))
        b.send(b.frame(1, "channel.close", reply_code=404, reply_text="NOT_FOUND - no exchange 'x'",
                       class_id=60, method_id=40))
        self.assertEqual([m[:2] for m in b.methods()], [(1, "channel.close-ok")])
        self.successResultOf(closing)
        opening = b.client.open_channel()
        self.assertEqual([m[:2] for m in b.methods()], [(1, "channel.open")])
        # The broker's answer to the crossed close, then to the open.
        b.send(b.frame(1, "channel.close-ok"), b.frame(1, "channel.open-ok"))
        second = self.successResultOf(opening)
        self.assertEqual(second.id, 1)
        self.assertTrue(b.client.channel_is_open(1))
        # Its own close-ok closes it as usual.
        closing = b.client.close_channel(second)
        self.assertEqual([m[:2] for m in b.methods()], [(1, "channel.close")])
        self.assertNoResult(closing)
        b.send(b.frame(1, "channel.close-ok"))
        self.successResultOf(closing)
        self.assertNotIn(1, b.client.channels)

    def test_open_channel_when_lost(self) -> None:
        """
        No channel opens on a lost connection.
        """
        b = self.broker
        b.transport.lose(ConnectionLost())
        self.failureResultOf(b.client.open_channel(), NotConnected)
        self.successResultOf(b.client.close_channel(self.channel))

    def test_write_flow_control(self) -> None:
        """
        The transport pausing and resuming its producer is reported as
        writable changes, once per change.
        """
        b = self.broker
        producer = b.transport.producer
        assert producer is not None
        producer.pauseProducing()
        producer.pauseProducing()
        self.assertFalse(b.client.writable)
        producer.resumeProducing()
        self.assertEqual(b.events.seen, [("writable", False), ("writable", True)])

    def test_nothing_written_after_loss(self) -> None:
        """
        After the connection is lost, writes are dropped, not sent to a dead transport.
        """
        b = self.broker
        b.transport.lose(ConnectionLost())
        self.assertFalse(b.client.write_bytes(b"x"))
        self.assertEqual(b.transport.value(), b"")

    def test_close_connection(self) -> None:
        """
        close_connection sends connection.close, closes the transport on
        close-ok and fires when the connection is gone.
        """
        b = self.broker
        closing = b.client.close_connection(timeout=5)
        self.assertEqual(b.methods()[0][1], "connection.close")
        b.send(b.frame(0, "connection.close-ok"))
        self.assertTrue(b.transport.disconnecting)
        self.assertNoResult(closing)
        b.transport.lose()
        self.successResultOf(closing)
        self.assertEqual(b.clock.getDelayedCalls(), [])

    def test_close_connection_unanswered(self) -> None:
        """
        A broker that does not answer connection.close is dropped after the timeout.
        """
        b = self.broker
        closing = b.client.close_connection(timeout=5)
        b.clock.advance(5)
        self.assertTrue(b.transport.disconnecting)
        self.assertNoResult(closing)
        b.clock.advance(5)
        self.assertTrue(b.transport.aborted)
        self.successResultOf(closing)
        self.assertEqual(
            str(self.successResultOf(b.client.when_lost())),
            "fedhub dropped the connection: close timed out",
        )
        self.assertEqual(b.clock.getDelayedCalls(), [])


class ErrorTests(SynchronousTestCase):
    """
    Mapping txamqp's exceptions and AMQP reply codes to fedhub's errors.
    """

    def test_reply_codes(self) -> None:
        """
        403, 404 and 406 get their own types; others are ChannelError.
        """
        self.assertIsInstance(error_for_reply(403, "x"), AccessRefused)
        self.assertIsInstance(error_for_reply(404, "x"), NotFound)
        self.assertIsInstance(error_for_reply(406, "x"), PreconditionFailed)
        other = error_for_reply(405, b"RESOURCE_LOCKED")  # type: ignore[arg-type]
        self.assertIs(type(other), ChannelError)
        self.assertEqual(other.reply_text, "RESOURCE_LOCKED")

    def test_map_closed(self) -> None:
        """
        A channel closed with a reply maps to its typed error; a connection
        closed by the broker to NotConnected (AccessRefused for 403); a plain
        close to NotConnected; anything else passes through.
        """
        spec = load_spec()

        class Reply:
            def __init__(self, name: str, code: int) -> None:
                self.method = spec.parse_method(name)
                self.reply_code = code
                self.reply_text = "text"

        self.assertIsInstance(map_error(ChannelClosed(Reply("channel.close", 406))),
                              PreconditionFailed)
        self.assertIsInstance(map_error(ConnectionClosed(Reply("connection.close", 320))),
                              NotConnected)
        self.assertIsInstance(map_error(ConnectionClosed(Reply("connection.close", 403))),
                              AccessRefused)
        self.assertIsInstance(map_error(Closed(Failure(ConnectionLost()))), NotConnected)
        self.assertIsInstance(map_error(Closed(Closed(Reply("channel.close", 404)))), NotFound)
        error = ValueError("x")
        self.assertIs(map_error(error), error)
        self.assertIs(map_error(Failure(error)), error)

    def test_null_events(self) -> None:
        """
        The default listener provides IConnectionEvents.
        """
        self.assertTrue(verifyObject(IConnectionEvents, NullConnectionEvents()))

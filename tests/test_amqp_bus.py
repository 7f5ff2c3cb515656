"""
Tests for L{fedhub.amqp.transport}: L{AMQPBus}.

The first part needs no broker: a scripted broker (L{ScriptedBroker})
answers the client frame by frame over a C{StringTransport}, on a fake
clock.  The second part (L{LiveBusTests}) runs against the shared RabbitMQ
at 127.0.0.1:5672 (guest/guest).  With C{CI=true} a missing broker fails
those tests; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txamqp.connection import Frame, Method
from txamqp.spec import pythonize
from zope.interface.verify import verifyObject

from fedhub.amqp.codec import body_frame, content_header_frame, pack_frame, unpack_frame
from fedhub.amqp.protocol import HEARTBEAT_FRAME, PROTOCOL_HEADER, AMQPClient
from fedhub.amqp import transport
from fedhub.amqp.transport import REFUSAL_HOLD, AMQPBus, AMQPSubscription, PublishRefused
from fedhub.amqp.url import AMQPSettings, parse_url
from fedhub.errors import (
    ConfigError,
    MessageError,
    MessageNacked,
    MessageReturned,
    NotConnected,
    NotFound,
    PreconditionFailed,
)
from fedhub.interfaces import IBus, IDelivery, ISubscription
from fedhub.message import Message
from fedhub.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology
from tests.broker import require_shared_broker, start_live_bus
from tests.test_amqp_protocol import _DEFAULTS, FakeTCP

# --- a scripted broker ----------------------------------------------------------


class ScriptedBroker:
    """
    The broker side of one client connection.  L{pump} reads what the client
    wrote and answers it like RabbitMQ, until nothing more happens.

    @ivar published: C{(channel, exchange, routing_key, properties, body)} of
        every publish, properties by wire name.
    @ivar client_methods: C{(channel, name, fields)} of every method the
        client sent.
    @ivar failures: C{{(name, key): (code, text)}}: answer the method C{name}
        (e.g. C{"queue.declare"}) for C{key} (the queue or exchange) by
        closing its channel with that reply.
    @ivar exchanges: Exchanges that exist (for passive declares).
    @ivar auto_confirm: Ack every publish at once.
    @ivar beats: Send heartbeats (on the client's clock) once they are
        agreed, as RabbitMQ does; clear it to play a broker that froze.
    @ivar answer_cancel: Answer a C{basic.cancel} at once; clear it to send
        the C{basic.cancel-ok} later (L{cancel_ok}).
    """

    def __init__(self, client: AMQPClient, transport: FakeTCP) -> None:
        self.client = client
        self.transport = transport
        self.spec = client.spec
        self.published: list[tuple[int, str, str, dict[str, Any], bytes]] = []
        self.client_methods: list[tuple[int, str, dict[str, Any]]] = []
        self.failures: dict[tuple[str, str], tuple[int, str]] = {}
        self.exchanges = {"amq.topic", "amq.direct", ""}
        self.auto_confirm = False
        self.confirm_seq: dict[int, int] = {}
        self.consumers: dict[str, int] = {}
        self.heartbeat = 60
        self.beats = True
        self.answer_cancel = True
        self._publishing: dict[int, list[Any]] = {}
        self._started = False

    def frame(self, channel: int, name: str, **fields: Any) -> bytes:
        method = self.spec.parse_method(name)
        args = [fields.pop(pythonize(f.name), _DEFAULTS[f.type]) for f in method.fields]
        assert not fields, fields
        return pack_frame(self.spec, Frame(channel, Method(method, *args)))  # type: ignore[no-any-return]

    def send(self, *chunks: bytes) -> None:
        self.client.dataReceived(b"".join(chunks))
        self.pump()

    def pump(self) -> None:
        while True:
            data = self.transport.value()
            self.transport.clear()
            if not data:
                return
            if not self._started and data.startswith(PROTOCOL_HEADER):
                data = data[len(PROTOCOL_HEADER) :]
                self._started = True
                self.client.dataReceived(
                    self.frame(
                        0,
                        "connection.start",
                        version_major=0,
                        version_minor=9,
                        server_properties={"product": "scripted"},
                        mechanisms=b"PLAIN EXTERNAL",
                        locales=b"en_US",
                    )
                )
            replies = []
            while data:
                (size,) = struct.unpack_from("!I", data, 3)
                frame = unpack_frame(self.spec, data[: size + 8])
                data = data[size + 8 :]
                replies.extend(self._handle(frame))
            if self.transport.disconnecting:
                return
            for reply in replies:
                self.client.dataReceived(reply)

    def _handle(self, frame: Any) -> list[bytes]:
        payload = frame.payload
        channel = frame.channel
        if payload.type == Frame.HEARTBEAT:
            return []
        if payload.type != Frame.METHOD:
            if channel not in self._publishing:
                return []  # the content of a publish refused by closing the channel
            parts = self._publishing[channel]
            parts.append(payload)
            header = parts[1]
            received = sum(len(p.content) for p in parts[2:])
            if received < header.size:
                return []
            del self._publishing[channel]
            args = parts[0].args
            body = b"".join(p.content for p in parts[2:])
            self.published.append((channel, args[1], args[2], dict(header.properties), body))
            if channel in self.confirm_seq:
                self.confirm_seq[channel] += 1
                if self.auto_confirm:
                    return [self.frame(channel, "basic.ack", delivery_tag=self.confirm_seq[channel])]
            return []
        method = payload.method
        name = f"{method.klass.name}.{method.name}"
        fields = {pythonize(f.name): a for f, a in zip(method.fields, payload.args)}
        self.client_methods.append((channel, name, fields))
        key = str(fields.get("queue") or fields.get("exchange") or "")
        failure = self.failures.get((name, key))
        if failure is not None:
            code, text = failure
            return [self.frame(channel, "channel.close", reply_code=code, reply_text=text,
                               class_id=method.klass.id, method_id=method.id)]
        if name == "basic.publish":
            self._publishing[channel] = [payload]
            return []
        if name == "connection.tune-ok" and fields["heartbeat"]:
            self._beat_every(fields["heartbeat"] / 2)
        if name == "connection.start-ok":
            self.client_properties = fields["client_properties"]
            return [self.frame(0, "connection.tune", channel_max=2047, frame_max=131072,
                               heartbeat=self.heartbeat)]
        if name == "exchange.declare":
            if fields["passive"] and fields["exchange"] not in self.exchanges:
                return [self.frame(channel, "channel.close", reply_code=404,
                                   reply_text=f"NOT_FOUND - no exchange '{fields['exchange']}'",
                                   class_id=40, method_id=10)]
            self.exchanges.add(fields["exchange"])
        if name == "confirm.select":
            self.confirm_seq[channel] = 0
        if name == "basic.consume":
            self.consumers[fields["consumer_tag"]] = channel
            return [self.frame(channel, "basic.consume-ok", consumer_tag=fields["consumer_tag"])]
        if name == "queue.declare":
            return [self.frame(channel, "queue.declare-ok", queue=fields["queue"])]
        if name == "basic.cancel":
            if not self.answer_cancel:
                return []
            return [self.frame(channel, "basic.cancel-ok", consumer_tag=fields["consumer_tag"])]
        answers = {
            "connection.open": "connection.open-ok",
            "connection.close": "connection.close-ok",
            "channel.open": "channel.open-ok",
            "channel.close": "channel.close-ok",
            "confirm.select": "confirm.select-ok",
            "exchange.declare": "exchange.declare-ok",
            "queue.bind": "queue.bind-ok",
            "basic.qos": "basic.qos-ok",
        }
        if name in answers:
            return [self.frame(channel, answers[name])]
        return []

    def _beat_every(self, period: float) -> None:
        """
        Send the client a heartbeat every C{period} seconds while the
        connection lasts.  Without them a test that moves the clock on by two
        heartbeat intervals between pumps plays a broker that died.
        """
        clock = self.client.clock
        calls: list[IDelayedCall] = []

        def beat() -> None:
            calls.clear()
            if not self.beats or self.transport.disconnecting or self.client.lost:
                return
            self.client.dataReceived(HEARTBEAT_FRAME)
            calls.append(clock.callLater(period, beat))

        def stop(reason: object) -> None:
            # A lost connection leaves no beat behind on the clock.
            for call in calls:
                call.cancel()
            calls.clear()

        calls.append(clock.callLater(period, beat))
        self.client.when_lost().addCallback(stop)

    def methods(self, *names: str) -> list[tuple[int, str, dict[str, Any]]]:
        """
        The client's methods with these names, in order.
        """
        return [m for m in self.client_methods if m[1] in names]

    def cancel_ok(self, tag: str) -> None:
        """
        Answer the client's C{basic.cancel} of consumer C{tag}.
        """
        self.send(self.frame(self.consumers[tag], "basic.cancel-ok", consumer_tag=tag))

    def publish_channel(self) -> int:
        return next(iter(self.confirm_seq))

    def refuse_publish(self, exchange: str) -> None:
        """
        Close the publish channel as RabbitMQ does when its permissions
        forbid a publish to C{exchange} (403).
        """
        self.send(
            self.frame(
                self.publish_channel(),
                "channel.close",
                reply_code=403,
                reply_text=f"ACCESS_REFUSED - access to exchange '{exchange}' in vhost '/' refused"
                " for user 'guest'",
                class_id=60,
                method_id=40,
            )
        )

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.send(self.frame(self.publish_channel(), "basic.ack", delivery_tag=tag,
                             multiple=multiple))

    def nack(self, tag: int, multiple: bool = False) -> None:
        self.send(self.frame(self.publish_channel(), "basic.nack", delivery_tag=tag,
                             multiple=multiple))

    def return_(self, message_id: str, routing_key: str = "a.b") -> None:
        channel = self.publish_channel()
        header = content_header_frame(self.spec, channel, 2, {"message-id": message_id})
        self.send(
            self.frame(channel, "basic.return", reply_code=312, reply_text="NO_ROUTE",
                       exchange="amq.topic", routing_key=routing_key),
            pack_frame(self.spec, header),
            pack_frame(self.spec, body_frame(channel, b"{}")),
        )

    def delivery(self, tag: str, delivery_tag: int, body: bytes, routing_key: str = "a.b",
                 redelivered: bool = False, properties: dict[str, Any] | None = None) -> bytes:
        """
        The frames of one delivery to consumer C{tag}.
        """
        channel = self.consumers[tag]
        header = content_header_frame(self.spec, channel, len(body), properties or {})
        data = self.frame(channel, "basic.deliver", consumer_tag=tag, delivery_tag=delivery_tag,
                          redelivered=redelivered, exchange="amq.topic", routing_key=routing_key)
        data += pack_frame(self.spec, header)
        if body:
            data += pack_frame(self.spec, body_frame(channel, body))
        return data

    def deliver(self, tag: str, delivery_tag: int, body: bytes, routing_key: str = "a.b",
                redelivered: bool = False, properties: dict[str, Any] | None = None) -> None:
        self.send(self.delivery(tag, delivery_tag, body, routing_key, redelivered, properties))

    def deliver_together(self, tag: str, delivery_tags: Iterable[int]) -> None:
        """
        Deliver C{b"{}"} under each of C{delivery_tags} in one read.
        """
        self.send(*(self.delivery(tag, n, b"{}") for n in delivery_tags))


class FakeEndpoint:
    """
    An endpoint that connects each attempt to a new L{ScriptedBroker}.
    """

    def __init__(self) -> None:
        self.brokers: list[ScriptedBroker] = []
        self.configure: Callable[[ScriptedBroker], None] = lambda broker: None

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        transport = FakeTCP()
        broker = ScriptedBroker(client, transport)
        self.configure(broker)
        self.brokers.append(broker)
        client.makeConnection(transport)
        return succeed(client)

    @property
    def broker(self) -> ScriptedBroker:
        return self.brokers[-1]


class RefusingEndpoint(FakeEndpoint):
    """
    Refuses connections until C{refuse} is cleared.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refuse = True
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError())
        return super().connect(factory)


class Recorder:
    """
    An on_delivery that keeps deliveries.
    """

    def __init__(self) -> None:
        self.deliveries: list[Any] = []

    def __call__(self, delivery: Any) -> None:
        self.deliveries.append(delivery)


class SteadyClock(Clock):
    """
    A L{Clock} that runs each call at its own time, as a reactor does while
    time passes.  L{Clock.advance} runs every call due within the step at the
    step's end, so a client measuring how long its broker was silent counts
    the whole step as silence, however often the broker's heartbeats were
    due within it.
    """

    def advance(self, amount: float) -> None:
        """
        Move the time on by C{amount}, running each due call at its time.
        """
        end = self.rightNow + amount
        self._sortCalls()
        while self.calls and self.calls[0].getTime() <= end:
            call = self.calls.pop(0)
            self.rightNow = max(self.rightNow, call.getTime())
            call.called = 1
            call.func(*call.args, **call.kw)
            self._sortCalls()
        self.rightNow = end


class BusCase(SynchronousTestCase):
    """
    Base: a started bus on a scripted broker and a fake clock.
    """

    def make_bus(self, endpoint: FakeEndpoint | None = None, **options: Any) -> AMQPBus:
        self.clock = SteadyClock()
        self.endpoint = endpoint or FakeEndpoint()
        options.setdefault("rand", lambda: 1.0)
        options.setdefault("reconnect_initial", 1.0)
        self.bus = AMQPBus(
            "infra",
            AMQPSettings(connection_name="hub infra"),
            reactor=self.clock,
            endpoint=cast(Any, self.endpoint),
            **options,
        )
        self.bus.startService()
        for broker in self.endpoint.brokers:
            broker.pump()
        return self.bus

    def setUp(self) -> None:
        self.make_bus()

    @property
    def broker(self) -> ScriptedBroker:
        return self.endpoint.broker

    def publish(self, topic: str = "a.b", **kwargs: Any) -> tuple[Message, Deferred[None]]:
        message = Message.create(topic, {"n": 1})
        d = self.bus.publish(message, **kwargs)
        self.broker.pump()
        return message, d

    def lose(self) -> None:
        self.broker.client.connectionLost(Failure(ConnectionLost()))

    def reconnect(self) -> None:
        """
        Let the retry delay pass and answer the new connection.
        """
        self.clock.advance(1.0)
        self.broker.pump()


# --- the bus on a scripted broker ------------------------------------------------


class ConnectTests(BusCase):
    """
    Starting a bus connects, logs in and prepares the publish channel.
    """

    def test_interfaces(self) -> None:
        """
        The bus provides IBus.
        """
        self.assertTrue(verifyObject(IBus, self.bus))

    def test_connected(self) -> None:
        """
        After the handshake the bus is connected, announces its connection
        name and has a publish channel in confirm mode.
        """
        self.assertTrue(self.bus.connected)
        self.successResultOf(self.bus.when_connected())
        self.assertEqual(self.broker.client_properties["connection_name"], "hub infra")
        self.assertEqual(len(self.broker.methods("confirm.select")), 1)

    def test_not_connected_until_ready(self) -> None:
        """
        While no connection is up, publishing fails with NotConnected at once,
        and when_connected waits.
        """
        endpoint = RefusingEndpoint()
        bus = self.make_bus(endpoint)
        self.assertFalse(bus.connected)
        waiting = bus.when_connected()
        message = Message.create("a.b", {})
        error = self.failureResultOf(bus.publish(message), NotConnected).value
        self.assertEqual(error.message_id, message.id)
        endpoint.refuse = False
        self.clock.advance(1.0)
        self.broker.pump()
        self.successResultOf(waiting)
        self.assertEqual(endpoint.attempts, 2)

    def test_broker_close_on_a_peer_that_never_closes(self) -> None:
        """
        After the broker's connection.close, a connection whose peer never
        closes TCP is dropped after the bus's close_timeout, so its loss is
        noticed and the bus reconnects.
        """
        self.make_bus(close_timeout=2.0)
        broker = self.broker
        broker.send(broker.frame(0, "connection.close", reply_code=320,
                                 reply_text="CONNECTION_FORCED"))
        self.assertTrue(broker.transport.disconnecting)
        self.clock.advance(1.9)
        self.assertFalse(broker.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(broker.transport.aborted)
        self.lose()
        self.assertFalse(self.bus.connected)
        self.reconnect()
        self.assertEqual(len(self.endpoint.brokers), 2)
        self.assertTrue(self.bus.connected)

    def test_rejected_setup_closes_late_harmlessly(self) -> None:
        """
        When setting a connection up fails, the bus drops that connection
        itself and tries again; when the dropped connection's close arrives
        late, after a healthy connection took over, the bus stays connected
        and does not reconnect.
        """
        endpoint = FakeEndpoint()
        endpoint.configure = lambda broker: broker.failures.update(
            {("confirm.select", ""): (406, "PRECONDITION_FAILED - no confirms")}
        )
        bus = self.make_bus(endpoint)
        first = endpoint.broker
        self.assertTrue(first.transport.aborted)
        self.assertFalse(bus.connected)
        endpoint.configure = lambda broker: None
        self.reconnect()
        self.assertTrue(bus.connected)
        first.client.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(bus.connected)
        # Long past any reconnect delay (and short of a heartbeat timeout).
        self.clock.advance(10.0)
        self.assertEqual(len(endpoint.brokers), 2)
        self.assertFalse(self.broker.transport.aborted)
        _, d = self.publish()
        self.broker.ack(1)
        self.successResultOf(d)

    def test_stop_while_unreachable(self) -> None:
        """
        Stopping a bus that never reached its broker stops retrying at once,
        and fails what waited for a connection.
        """
        endpoint = RefusingEndpoint()
        bus = self.make_bus(endpoint)
        waiting = bus.declare(Topology(queues=(QueueSpec("q"),)))
        self.successResultOf(bus.stopService())
        self.failureResultOf(waiting, NotConnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_from_domain(self) -> None:
        """
        from_domain reads a domain configuration's fields.
        """

        @dataclass
        class Domain:
            name: str = "accounts"
            broker: str = "amqp://u:p@broker.example/acct?heartbeat=9"
            exchange: str = "accounts.topic"
            ca: str | None = None
            cert: str | None = None
            key: str | None = None
            server_hostname: str | None = None
            auth_mechanism: str | None = None
            heartbeat: int = 20
            connection_name: str | None = None
            connection_timeout: float = 4.0
            confirm_window: int = 50
            passive_declares: bool = True
            reconnect_delay: float = 5.0
            reconnect_max_delay: float = 12.0

        bus = AMQPBus.from_domain(Domain(), self.clock, rand=lambda: 1.0)
        self.assertEqual(bus.domain, "accounts")
        self.assertEqual(bus.exchange, "accounts.topic")
        self.assertEqual(bus.settings.vhost, "acct")
        self.assertEqual(bus.settings.heartbeat, 20)
        self.assertEqual(bus.settings.connection_timeout, 4.0)
        self.assertEqual(bus.settings.connection_name, "fedhub accounts")
        self.assertEqual(bus.max_in_flight, 50)
        self.assertTrue(bus.passive_declares)
        # Attempts wait 5, 10, then 12 s at most (without jitter here).
        self.assertEqual([bus._retry_delay(attempt) for attempt in (1, 2, 3, 10)], [5.0, 10.0, 12.0, 12.0])
        self.assertRaises(ConfigError, AMQPBus.from_domain, Domain(heartbeat=0), self.clock)

    def test_tls_needs_ca_at_start(self) -> None:
        """
        An amqps bus without a CA refuses to start (and does no I/O before).
        """
        bus = AMQPBus("d", parse_url("amqps://broker.example/"), reactor=self.clock)
        self.assertRaises(ConfigError, bus.startService)
        self.assertFalse(bus.running)


class PublishTests(BusCase):
    """
    Publishing with confirms, returns and nacks.
    """

    def test_publish_and_confirm(self) -> None:
        """
        A publish goes out mandatory and persistent with the message's
        properties, and its Deferred fires on the broker's ack.
        """
        message, d = self.publish()
        ((_, exchange, key, properties, body),) = self.broker.published
        self.assertEqual((exchange, key), ("amq.topic", "a.b"))
        self.assertEqual(properties["delivery-mode"], 2)
        self.assertEqual(properties["message-id"], message.id)
        self.assertEqual(properties["content-type"], "application/json")
        self.assertEqual(body, message.body_bytes)
        (publish,) = self.broker.methods("basic.publish")
        self.assertIs(publish[2]["mandatory"], True)
        self.assertNoResult(d)
        self.broker.ack(1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.bus.stats.published, self.bus.stats.confirmed), (1, 1))

    def test_exchange_and_routing_key(self) -> None:
        """
        Exchange and routing key may be given; the default exchange needs no check.
        """
        self.publish(exchange="", routing_key="some.queue")
        self.assertEqual(self.broker.published[0][1:3], ("", "some.queue"))
        self.assertEqual(self.broker.methods("exchange.declare"), [])

    def test_multiple_ack(self) -> None:
        """
        An ack with multiple confirms every message up to its tag.
        """
        ds = [self.publish()[1] for _ in range(3)]
        self.broker.ack(2, multiple=True)
        self.successResultOf(ds[0])
        self.successResultOf(ds[1])
        self.assertNoResult(ds[2])
        self.broker.ack(3)
        self.successResultOf(ds[2])

    def test_after_confirms(self) -> None:
        """
        While one confirm settles the messages it covers, the bus says it is
        confirming; the callbacks given to call_after_confirms run once per
        confirm frame, after all of them.
        """
        events: list[tuple[str, int, bool]] = []
        ds = [self.publish()[1] for _ in range(3)]
        def settled(result: object, n: int) -> object:
            events.append(("settled", n, self.bus.confirming))
            return result

        for n, d in enumerate(ds):
            d.addBoth(settled, n)
        self.bus.call_after_confirms(lambda: events.append(("after", 0, self.bus.confirming)))
        self.broker.ack(2, multiple=True)
        self.assertEqual(events, [("settled", 0, True), ("settled", 1, True), ("after", 0, False)])
        self.broker.nack(3)
        self.assertEqual(events[3:], [("settled", 2, True), ("after", 0, False)])
        self.failureResultOf(ds[2], MessageNacked)
        self.assertFalse(self.bus.confirming)

    def test_after_confirms_failure(self) -> None:
        """
        A callback that raises is logged; the others still run, and so does
        sending what waits.
        """
        called: list[int] = []

        def broken() -> None:
            raise RuntimeError("broken callback")

        self.bus.call_after_confirms(broken)
        self.bus.call_after_confirms(lambda: called.append(1))
        d = self.publish()[1]
        self.broker.ack(1)
        self.successResultOf(d)
        self.assertEqual(called, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nack(self) -> None:
        """
        A nack fails the message with MessageNacked naming it.
        """
        message, d = self.publish()
        self.broker.nack(1)
        error = self.failureResultOf(d, MessageNacked).value
        self.assertEqual(error.message_id, message.id)
        self.assertEqual(self.bus.stats.nacked, 1)

    def test_return_before_ack(self) -> None:
        """
        A return followed by the ack of the same message fails it with
        MessageReturned (312); other messages are confirmed normally.
        """
        one, d1 = self.publish("nobody.here")
        two, d2 = self.publish()
        self.broker.return_(one.id, "nobody.here")
        self.assertNoResult(d1)
        self.broker.ack(2, multiple=True)
        error = self.failureResultOf(d1, MessageReturned).value
        self.assertEqual((error.message_id, error.reply_code), (one.id, 312))
        self.successResultOf(d2)

    def test_same_message_twice_returned_once(self) -> None:
        """
        When one message is published twice and returned once, the return
        belongs to the first copy.
        """
        message = Message.create("a.b", {})
        d1 = self.bus.publish(message)
        d2 = self.bus.publish(message)
        self.broker.pump()
        self.broker.return_(message.id)
        self.broker.ack(2, multiple=True)
        self.failureResultOf(d1, MessageReturned)
        self.successResultOf(d2)

    def test_stray_return_not_counted(self) -> None:
        """
        Only a return that matches a message in flight counts as returned.
        """
        message, d = self.publish()
        self.broker.return_("never-published")
        self.broker.return_(message.id)
        self.broker.return_(message.id)
        self.broker.ack(1)
        self.failureResultOf(d, MessageReturned)
        self.broker.return_(message.id)
        self.assertEqual(self.bus.stats.returned, 1)

    def test_unknown_exchange(self) -> None:
        """
        The first publish to an exchange checks it; a missing one fails the
        message with NotFound and the publish channel stays up.
        """
        message, d = self.publish(exchange="missing")
        error = self.failureResultOf(d, NotFound).value
        self.assertEqual(error.reply_code, 404)
        self.assertEqual(self.broker.published, [])
        _, d2 = self.publish()
        self.broker.ack(1)
        self.successResultOf(d2)
        checks = self.broker.methods("exchange.declare")
        self.assertEqual([c[2]["exchange"] for c in checks], ["missing", "amq.topic"])
        self.assertTrue(all(c[2]["passive"] for c in checks))

    def test_exchange_deleted_after_its_check(self) -> None:
        """
        An exchange deleted after its check closes the publish channel once:
        every exchange is checked again, so further messages to it fail with
        NotFound while the channel stays up, and the domain says the broker
        refuses until a check finds the exchange again.
        """
        self.broker.exchanges.add("x")
        _, d = self.publish(exchange="x")
        self.broker.ack(1)
        self.successResultOf(d)
        self.broker.exchanges.discard("x")
        self.broker.failures[("basic.publish", "x")] = (404, "NOT_FOUND - no exchange 'x'")
        _, lost = self.publish(exchange="x")
        self.failureResultOf(lost, NotConnected)
        # Each check runs on the declaring channel, which the broker closes
        # on a 404; the publish channel (in confirm mode) is opened once more.
        opened = len(self.broker.methods("confirm.select"))
        for _ in range(3):
            _, d = self.publish(exchange="x")
            self.assertIn("no exchange 'x'", str(self.failureResultOf(d, NotFound).value))
        self.assertEqual(len(self.broker.methods("confirm.select")), opened)
        self.assertEqual(opened, 2)
        self.assertIn("no exchange 'x'", str(self.bus.publish_refused))
        new_channel = self.broker.methods("confirm.select")[-1][0]
        self.broker.confirm_seq = {new_channel: 0}
        _, fine = self.publish()
        self.broker.ack(1)
        self.successResultOf(fine)
        self.broker.exchanges.add("x")
        del self.broker.failures[("basic.publish", "x")]
        _, d = self.publish(exchange="x")
        self.broker.ack(2)
        self.successResultOf(d)
        self.assertIsNone(self.bus.publish_refused)

    def test_known_exchange_checked_once(self) -> None:
        """
        An exchange is checked once per connection.
        """
        self.publish()
        self.publish()
        self.assertEqual(len(self.broker.methods("exchange.declare")), 1)
        self.assertEqual(len(self.broker.published), 2)

    def test_connection_lost_fails_unconfirmed(self) -> None:
        """
        Losing the connection fails every unconfirmed message with NotConnected.
        """
        message, d = self.publish()
        self.lose()
        error = self.failureResultOf(d, NotConnected).value
        self.assertEqual(error.message_id, message.id)
        self.assertFalse(self.bus.connected)
        self.failureResultOf(self.bus.publish(message), NotConnected)

    def test_broker_closing_the_connection_explained(self) -> None:
        """
        Messages in flight when the broker closes the connection fail with
        the broker's reason, not a bare "closed cleanly".
        """
        _, d = self.publish()
        self.broker.send(self.broker.frame(
            0, "connection.close", reply_code=320,
            reply_text="CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
            class_id=0, method_id=0))
        self.broker.pump()
        if not d.called:
            self.lose()
        reason = self.failureResultOf(d, NotConnected).value.reason
        self.assertEqual(
            reason,
            "the broker closed the connection (320 CONNECTION_FORCED - broker forced connection "
            "closure with reason 'shutdown')",
        )

    def test_confirm_timeout(self) -> None:
        """
        A confirm that does not come within confirm_timeout drops the
        connection, so the message fails with NotConnected; the bus reconnects.
        """
        bus = self.make_bus(confirm_timeout=10.0)
        _, d = self.publish()
        self.clock.advance(9.0)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertTrue(self.broker.transport.aborted)
        self.lose()
        self.failureResultOf(d, NotConnected)
        self.assertEqual(bus.stats.confirm_timeouts, 1)
        self.reconnect()
        self.assertEqual(len(self.endpoint.brokers), 2)
        self.assertTrue(bus.connected)

    def test_confirm_timer_follows_oldest(self) -> None:
        """
        The timeout counts from each message's own publish.
        """
        self.make_bus(confirm_timeout=10.0)
        self.publish()
        self.clock.advance(5.0)
        self.publish()
        self.clock.advance(4.9)
        self.broker.ack(1)
        self.clock.advance(5.0)
        self.assertFalse(self.broker.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(self.broker.transport.aborted)

    def test_confirm_timer_not_per_message(self) -> None:
        """
        Messages confirmed one at a time share one confirm timer instead of
        making one each; a message published after the others were
        confirmed is still timed from its own publish.
        """
        self.make_bus(confirm_timeout=10.0)
        for seq in range(1, 101):
            self.publish()
            self.broker.ack(seq)
            self.clock.advance(0.005)
        timers = [c for c in self.clock.getDelayedCalls() if c.func == self.bus._session._confirm_check]
        self.assertEqual(len(timers), 1)
        self.clock.advance(9.0)
        _, d = self.publish()
        # The shared timer runs out, finds the new message not yet due, and
        # times it from its publish.
        self.clock.advance(9.9)
        self.assertFalse(self.broker.transport.aborted)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTrue(self.broker.transport.aborted)

    def test_blocked_waits(self) -> None:
        """
        While the broker blocks the connection, publishes are not written and
        confirms are not timed; after unblocked they go out.
        """
        self.make_bus(confirm_timeout=10.0)
        _, first = self.publish()
        self.broker.send(self.broker.frame(0, "connection.blocked", reason="low on memory"))
        _, d = self.publish()
        self.assertEqual(len(self.broker.published), 1)
        for _ in range(12):
            # A blocked broker still sends heartbeats.
            self.clock.advance(5.0)
            self.broker.send(HEARTBEAT_FRAME)
        self.assertFalse(self.broker.transport.aborted)
        self.assertNoResult(d)
        self.broker.send(self.broker.frame(0, "connection.unblocked"))
        self.assertEqual(len(self.broker.published), 2)
        self.broker.ack(2, multiple=True)
        self.successResultOf(first)
        self.successResultOf(d)

    def test_transport_backpressure(self) -> None:
        """
        While the transport's buffer is full, publishes wait.
        """
        producer = self.broker.transport.producer
        assert producer is not None
        producer.pauseProducing()
        _, d = self.publish()
        self.assertEqual(self.broker.published, [])
        producer.resumeProducing()
        self.broker.pump()
        self.assertEqual(len(self.broker.published), 1)
        self.broker.ack(1)
        self.successResultOf(d)

    def test_confirm_window(self) -> None:
        """
        At most max_in_flight messages wait for confirms; the next waits for an ack.
        """
        self.make_bus(max_in_flight=2)
        ds = [self.publish()[1] for _ in range(3)]
        self.assertEqual(len(self.broker.published), 2)
        self.broker.ack(1)
        self.assertEqual(len(self.broker.published), 3)
        self.broker.ack(3, multiple=True)
        for d in ds:
            self.successResultOf(d)

    def test_waiting_fail_on_loss(self) -> None:
        """
        Messages still waiting to be written fail with NotConnected on loss.
        """
        self.make_bus(max_in_flight=1)
        _, sent = self.publish()
        _, waiting = self.publish()
        self.assertEqual(len(self.broker.published), 1)
        self.lose()
        self.failureResultOf(sent, NotConnected)
        self.failureResultOf(waiting, NotConnected)

    def test_publish_channel_closed_fails_waiting(self) -> None:
        """
        Messages still waiting to be written when the broker closes the
        publish channel fail with the unconfirmed ones, so that whoever
        sends them again (the outbox) keeps their order: written on the new
        channel first, they would overtake those.
        """
        self.make_bus(max_in_flight=1)
        _, sent = self.publish()
        _, waiting = self.publish()
        channel = self.broker.publish_channel()
        self.broker.send(self.broker.frame(channel, "channel.close", reply_code=406,
                                           reply_text="PRECONDITION_FAILED - boom"))
        self.broker.pump()
        self.failureResultOf(sent, NotConnected)
        self.failureResultOf(waiting, NotConnected)
        self.assertEqual(len(self.broker.published), 1)

    def test_publish_channel_closed(self) -> None:
        """
        When the broker closes the publish channel, its unconfirmed messages
        fail with NotConnected (the outbox sends them again), and a new
        publish channel in confirm mode takes over.
        """
        _, d = self.publish()
        channel = self.broker.publish_channel()
        self.broker.send(self.broker.frame(channel, "channel.close", reply_code=406,
                                           reply_text="PRECONDITION_FAILED - boom"))
        self.failureResultOf(d, NotConnected)
        self.assertEqual(len(self.broker.methods("confirm.select")), 2)
        new_channel = self.broker.methods("confirm.select")[-1][0]
        self.broker.confirm_seq = {new_channel: 0}
        _, d2 = self.publish()
        self.assertEqual(self.broker.published[-1][0], new_channel)
        self.broker.ack(1)
        self.successResultOf(d2)
        self.assertTrue(self.bus.connected)

    def test_bad_names(self) -> None:
        """
        Exchange names and routing keys longer than 255 bytes are refused.
        """
        message = Message.create("a.b", {})
        self.failureResultOf(self.bus.publish(message, routing_key="x" * 256), MessageError)
        self.failureResultOf(self.bus.publish(message, exchange="x" * 256), MessageError)

    def test_checked_names_remembered_boundedly(self) -> None:
        """
        Names found good are not measured again, and no more of them are
        kept than the bound; a long name is refused however often it comes.
        """
        from fedhub.amqp import transport

        for n in range(transport._GOOD_NAMES + 10):
            self.bus.publish(Message.create(f"a.b{n}", {}))
        self.assertLessEqual(len(self.bus._good_names), transport._GOOD_NAMES)
        self.assertIn("amq.topic", self.bus._good_names)
        message = Message.create("a.b", {})
        for _ in range(2):
            self.failureResultOf(self.bus.publish(message, routing_key="x" * 256), MessageError)
        self.assertNotIn("x" * 256, self.bus._good_names)

    def test_unencodable_names_and_properties(self) -> None:
        """
        A routing key that is not UTF-8, or a message whose properties AMQP can not carry, fails that publish alone.
        """
        message = Message.create("a.b", {})
        bad_key = self.bus.publish(message, routing_key="a.\udc80")
        huge = self.bus.publish(Message.create("a.b", {}, headers={"n": 2**64}))
        # A content header is one frame: one over frame_max would make the
        # broker close the connection, every time the message is sent.
        crowded = self.bus.publish(Message.create(
            "a.b", {}, headers={f"fedora_messaging_user_u{i:05d}": True for i in range(5000)}
        ))
        self.broker.pump()
        self.assertIn("can not be encoded", str(self.failureResultOf(bad_key, MessageError).value))
        self.assertIn("can not be encoded", str(self.failureResultOf(huge, MessageError).value))
        self.assertIn("frame_max", str(self.failureResultOf(crowded, MessageError).value))
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.broker.published, [])
        _, d = self.publish()
        self.broker.ack(1)
        self.successResultOf(d)

    def test_publish_to_reports_outcomes(self) -> None:
        """
        C{publish_to} reports to the object given instead of a Deferred:
        confirms, nacks, returns and a lost connection, one report per
        message, and refusals before anything is sent at once.
        """

        class Outcomes:
            def __init__(self) -> None:
                self.reports: list[object] = []

            def callback(self, result: None) -> None:
                self.reports.append(("confirmed", result))

            def errback(self, error: BaseException) -> None:
                self.reports.append(error)

        outcomes = [Outcomes() for _ in range(5)]
        messages = [Message.create("a.b", {"n": n}) for n in range(4)]
        for message, outcome in zip(messages, outcomes):
            self.bus.publish_to(message, outcome)
        self.broker.pump()
        self.assertEqual(len(self.broker.published), 4)
        self.assertEqual([o.reports for o in outcomes[:4]], [[], [], [], []])
        self.broker.return_(messages[1].id)
        self.broker.ack(2, multiple=True)
        self.broker.nack(3)
        self.assertEqual(outcomes[0].reports, [("confirmed", None)])
        (returned,) = outcomes[1].reports
        self.assertIsInstance(returned, MessageReturned)
        self.assertEqual(cast(MessageReturned, returned).message_id, messages[1].id)
        (nacked,) = outcomes[2].reports
        self.assertIsInstance(nacked, MessageNacked)
        self.lose()
        (lost,) = outcomes[3].reports
        self.assertIsInstance(lost, NotConnected)
        self.assertEqual(cast(NotConnected, lost).message_id, messages[3].id)
        # Not connected, and a bad routing key: reported before returning.
        self.bus.publish_to(messages[0], outcomes[4])
        self.bus.publish_to(messages[0], outcomes[4], routing_key="x" * 256)
        not_connected, bad_key = outcomes[4].reports
        self.assertIsInstance(not_connected, NotConnected)
        self.assertIsInstance(bad_key, MessageError)
        self.assertEqual([len(o.reports) for o in outcomes[:4]], [1, 1, 1, 1])

    def test_permission_refusal_held_for_a_while(self) -> None:
        """
        A publish the broker's permissions refuse (403 closing the publish
        channel) fails for good, and so do later ones like it, at once,
        without closing the channel again; after REFUSAL_HOLD seconds one is
        sent again, the permissions may have been granted: confirmed, the
        next ones go too.
        """
        self.assertIsNone(self.bus.publish_refused)
        _, first = self.publish()
        self.broker.refuse_publish("amq.topic")
        self.broker.pump()
        self.failureResultOf(first, PublishRefused)
        # Said while it holds (for /ready), then no more.
        refused = self.bus.publish_refused
        self.assertIsNotNone(refused)
        self.assertIn("403", refused or "")
        new_channel = self.broker.methods("confirm.select")[-1][0]
        self.broker.confirm_seq = {new_channel: 0}
        sent = len(self.broker.published)
        _, held = self.publish()
        self.broker.pump()
        self.failureResultOf(held, PublishRefused)
        self.assertEqual(len(self.broker.published), sent)
        self.clock.advance(REFUSAL_HOLD + 1)
        self.assertIsNone(self.bus.publish_refused)
        _, again = self.publish()
        self.broker.pump()
        self.assertEqual(len(self.broker.published), sent + 1)
        self.broker.ack(1)
        self.successResultOf(again)

    def test_stop_waits_for_confirms(self) -> None:
        """
        stopService refuses new messages, waits for outstanding confirms, then
        closes the connection.
        """
        _, d = self.publish()
        stopping = self.bus.stopService()
        self.assertNoResult(stopping)
        self.failureResultOf(self.bus.publish(Message.create("a.b", {})), NotConnected)
        self.broker.ack(1)
        self.successResultOf(d)
        self.assertIn("connection.close", [m[1] for m in self.broker.client_methods])
        self.assertNoResult(stopping)
        self.lose()
        self.successResultOf(stopping)
        self.assertFalse(self.bus.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DeclareTests(BusCase):
    """
    Declaring topology now and after every reconnect.
    """

    TOPOLOGY = Topology(
        exchanges=(ExchangeSpec("hub.events", "topic"),),
        queues=(QueueSpec("hub.q", arguments={"x-message-ttl": 1000}),),
        bindings=(BindingSpec("hub.q", "hub.events", "org.#"),),
    )

    def test_declare(self) -> None:
        """
        Exchanges, queues and bindings are declared in order, with arguments.
        """
        d = self.bus.declare(self.TOPOLOGY)
        self.broker.pump()
        self.successResultOf(d)
        names = [m[1] for m in self.broker.client_methods if m[1].split(".")[0] in
                 ("exchange", "queue")]
        self.assertEqual(names, ["exchange.declare", "queue.declare", "queue.bind"])
        (queue,) = self.broker.methods("queue.declare")
        self.assertEqual(queue[2]["arguments"], {"x-message-ttl": 1000})
        self.assertIs(queue[2]["durable"], True)
        (binding,) = self.broker.methods("queue.bind")
        self.assertEqual(binding[2]["routing_key"], "org.#")

    def test_refused_first_time_forgotten(self) -> None:
        """
        A declaration refused the first time fails with the typed error and is
        not declared again after a reconnect.
        """
        self.broker.failures[("queue.declare", "hub.q")] = (406, "PRECONDITION_FAILED - args")
        d = self.bus.declare(self.TOPOLOGY)
        self.broker.pump()
        self.assertEqual(self.failureResultOf(d, PreconditionFailed).value.reply_code, 406)
        self.lose()
        self.reconnect()
        self.assertEqual(self.broker.methods("queue.declare"), [])

    def test_declared_again_after_reconnect(self) -> None:
        """
        A declared topology is declared again on the next connection, once
        however often it was declared.
        """
        for _ in range(2):
            d = self.bus.declare(self.TOPOLOGY)
            self.broker.pump()
            self.successResultOf(d)
        self.lose()
        self.reconnect()
        self.assertEqual(len(self.broker.methods("queue.declare")), 1)
        self.assertEqual(len(self.broker.methods("queue.bind")), 1)

    def test_declare_before_connected(self) -> None:
        """
        A declaration made while disconnected waits for the connection.
        """
        endpoint = RefusingEndpoint()
        bus = self.make_bus(endpoint)
        d = bus.declare(self.TOPOLOGY)
        self.assertNoResult(d)
        endpoint.refuse = False
        self.reconnect()
        self.successResultOf(d)
        self.assertEqual(len(self.broker.methods("queue.bind")), 1)

    def test_channel_reopened_after_error(self) -> None:
        """
        After a refused declaration, the next one runs on a new channel.
        """
        self.broker.failures[("queue.declare", "bad")] = (406, "PRECONDITION_FAILED")
        d = self.bus.declare(Topology(queues=(QueueSpec("bad"),)))
        self.broker.pump()
        self.failureResultOf(d, PreconditionFailed)
        d = self.bus.declare(Topology(queues=(QueueSpec("good"),)))
        self.broker.pump()
        self.successResultOf(d)
        bad, good = self.broker.methods("queue.declare")
        self.assertNotEqual(bad[0], good[0])

    def test_passive(self) -> None:
        """
        With passive_declares, exchanges and queues are only checked, and
        bindings are left alone.
        """
        self.make_bus(passive_declares=True)
        self.broker.exchanges.add("hub.events")
        d = self.bus.declare(self.TOPOLOGY)
        self.broker.pump()
        self.successResultOf(d)
        self.assertTrue(all(m[2]["passive"] for m in self.broker.methods("exchange.declare",
                                                                         "queue.declare")))
        self.assertEqual(self.broker.methods("queue.bind"), [])

    def test_declare_after_stop(self) -> None:
        """
        A stopped bus declares nothing.
        """
        self.bus.stopService()
        self.failureResultOf(self.bus.declare(self.TOPOLOGY), NotConnected)


class ConsumeTests(BusCase):
    """
    Subscriptions, deliveries and their verdicts.
    """

    def subscribe(self, queue: str = "hub.q", prefetch: int = 5) -> tuple[Any, Recorder, str]:
        recorder = Recorder()
        d = self.bus.subscribe(queue, recorder, prefetch)
        self.broker.pump()
        subscription = self.successResultOf(d)
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        return subscription, recorder, tag

    def test_subscribe(self) -> None:
        """
        A subscription gets its own channel with its prefetch, and consumes
        with acknowledgements.
        """
        subscription, _, _ = self.subscribe(prefetch=7)
        self.assertTrue(verifyObject(ISubscription, subscription))
        self.assertEqual(subscription.queue, "hub.q")
        ((qos_channel, _, qos),) = self.broker.methods("basic.qos")
        self.assertEqual(qos["prefetch_count"], 7)
        ((channel, _, consume),) = self.broker.methods("basic.consume")
        self.assertEqual(channel, qos_channel)
        self.assertNotEqual(channel, self.broker.publish_channel())
        self.assertEqual((consume["queue"], consume["no_ack"]), ("hub.q", False))

    def test_delivery_ack(self) -> None:
        """
        A delivery carries the decoded message with its queue; ack sends
        basic.ack once however often it is called.
        """
        _, recorder, tag = self.subscribe()
        message = Message.create("org.x", {"k": "v"})
        self.broker.deliver(tag, 9, message.body_bytes, "org.x", redelivered=True,
                            properties={"message-id": message.id})
        (delivery,) = recorder.deliveries
        self.assertTrue(verifyObject(IDelivery, delivery))
        self.assertEqual(delivery.message.id, message.id)
        self.assertEqual(delivery.message.queue, "hub.q")
        self.assertEqual((delivery.queue, delivery.redelivered), ("hub.q", True))
        self.assertIs(delivery.message.redelivered, True)
        delivery.ack()
        delivery.ack()
        delivery.reject(True)
        self.broker.pump()
        self.assertEqual(
            [m[2] for m in self.broker.methods("basic.ack", "basic.reject", "basic.nack")],
            [{"delivery_tag": 9, "multiple": False}])

    def test_reject(self) -> None:
        """
        reject(requeue=False) sends basic.reject; a put-back,
        reject(requeue=True), sends basic.nack with requeue, which RabbitMQ
        4.3 and later do not count against a quorum queue's delivery-limit
        (it is no failure of the message).
        """
        _, recorder, tag = self.subscribe()
        self.broker.deliver(tag, 1, b"{}")
        self.broker.deliver(tag, 2, b"{}")
        recorder.deliveries[0].reject(requeue=True)
        recorder.deliveries[1].reject(requeue=False)
        self.broker.pump()
        self.assertEqual(
            [(m[1], m[2]) for m in self.broker.methods("basic.reject", "basic.nack")],
            [("basic.nack", {"delivery_tag": 1, "multiple": False, "requeue": True}),
             ("basic.reject", {"delivery_tag": 2, "requeue": False})])

    def verdicts(self) -> list[tuple[str, dict[str, Any]]]:
        """
        The acknowledgements and rejections the client sent, in order.
        """
        self.broker.pump()
        return [(m[1], m[2]) for m in self.broker.methods("basic.ack", "basic.reject", "basic.nack")]

    def assert_cancel_closes(self, subscription: Any, channel: int) -> None:
        """
        cancel() closes the subscription's C{channel}, and its Deferred fires.
        """
        closed = subscription.cancel()
        self.broker.pump()
        self.successResultOf(closed)
        self.assertEqual(self.broker.methods("channel.close")[-1][0], channel)

    def subscribe_with(self, on_delivery: Callable[[Any], object]) -> str:
        """
        Subscribe C{on_delivery} to C{hub.q}; the consumer tag.
        """
        d = self.bus.subscribe("hub.q", on_delivery, 100)
        self.broker.pump()
        self.successResultOf(d)
        return str(self.broker.methods("basic.consume")[-1][2]["consumer_tag"])

    def subscribe_acking_but(self, delivery_tag: int, instead: Callable[[Any], object]) -> str:
        """
        Subscribe a handler that acknowledges every delivery at once but
        the one of C{delivery_tag}, which goes to C{instead}; the consumer
        tag.
        """

        def handle(delivery: Any) -> None:
            if delivery.delivery_tag == delivery_tag:
                instead(delivery)
            else:
                delivery.ack()

        return self.subscribe_with(handle)

    def test_acks_of_one_read_coalesced(self) -> None:
        """
        Deliveries of one read acknowledged as they come are acknowledged
        with one basic.ack with multiple once the read is handled; a single
        one without multiple.
        """
        answers: list[bool] = []
        tag = self.subscribe_with(lambda delivery: answers.append(delivery.ack()))
        self.broker.deliver_together(tag, [1, 2, 3, 4, 5])
        self.broker.deliver(tag, 6, b"{}")
        self.assertEqual(answers, [True] * 6)
        self.assertEqual(
            self.verdicts(),
            [("basic.ack", {"delivery_tag": 5, "multiple": True}),
             ("basic.ack", {"delivery_tag": 6, "multiple": False})],
        )
        self.assertEqual(self.bus.stats.acked, 6)

    def test_coalesced_ack_never_covers_an_unsettled_delivery(self) -> None:
        """
        A delivery still being handled ends the run a multiple
        acknowledgement covers: those behind it are acknowledged one by
        one, and once it is settled the next run starts after it.
        """
        waiting: list[Any] = []
        tag = self.subscribe_acking_but(2, waiting.append)
        self.broker.deliver_together(tag, [1, 2, 3, 4])
        self.assertEqual(
            self.verdicts(),
            [("basic.ack", {"delivery_tag": n, "multiple": False}) for n in (1, 3, 4)],
        )
        # Settled later, outside a read: written at once.
        waiting[0].ack()
        self.assertEqual(self.verdicts()[-1], ("basic.ack", {"delivery_tag": 2, "multiple": False}))
        self.broker.deliver_together(tag, [5, 6, 7])
        self.assertEqual(self.verdicts()[-1], ("basic.ack", {"delivery_tag": 7, "multiple": True}))
        self.assertEqual(len(self.verdicts()), 5)

    def test_rejection_inside_a_coalesced_run(self) -> None:
        """
        A rejection is written at once; the acknowledgements around it are
        still coalesced (a multiple acknowledgement leaves out what was
        rejected already).
        """
        tag = self.subscribe_acking_but(2, lambda delivery: delivery.reject(requeue=False))
        self.broker.deliver_together(tag, [1, 2, 3, 4])
        self.assertEqual(
            self.verdicts(),
            [("basic.reject", {"delivery_tag": 2, "requeue": False}),
             ("basic.ack", {"delivery_tag": 4, "multiple": True})],
        )
        self.assertEqual((self.bus.stats.acked, self.bus.stats.rejected), (3, 1))

    def test_cancel_writes_held_acks_first(self) -> None:
        """
        A subscription cancelled while its acknowledgements are held back
        writes them before it closes its channel.
        """
        subscriptions: list[Any] = []

        def handle(delivery: Any) -> None:
            delivery.ack()
            if delivery.delivery_tag == 3:
                subscriptions[0].cancel()

        d = self.bus.subscribe("hub.q", handle, 100)
        self.broker.pump()
        subscriptions.append(self.successResultOf(d))
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.broker.deliver_together(tag, [1, 2, 3])
        methods = [(m[1], m[2]) for m in self.broker.methods("basic.ack", "channel.close")]
        self.assertEqual(methods[0], ("basic.ack", {"delivery_tag": 3, "multiple": True}))
        self.assertEqual([m[0] for m in methods[1:]], ["channel.close"])

    def test_stop_writes_held_acks_first(self) -> None:
        """
        A bus stopped while the frames of a read are still being handled
        writes the acknowledgements held back before it closes the
        connection; otherwise the broker would deliver those messages again.
        """
        stopping: list[Deferred[None]] = []

        def handle(delivery: Any) -> None:
            delivery.ack()
            if delivery.delivery_tag == 3:
                stopping.append(self.bus.stopService())

        tag = self.subscribe_with(handle)
        self.broker.deliver_together(tag, [1, 2, 3])
        methods = [(m[1], m[2]) for m in self.broker.methods("basic.ack", "connection.close")]
        self.assertEqual(methods[0], ("basic.ack", {"delivery_tag": 3, "multiple": True}))
        self.assertEqual([m[0] for m in methods[1:]], ["connection.close"])
        self.assertEqual(self.bus.stats.acked, 3)

    def test_held_acks_dropped_with_a_closed_channel(self) -> None:
        """
        Acknowledgements held back when the broker closes the channel in the
        same read are neither written (the broker has put the messages back)
        nor counted.
        """
        tag = self.subscribe_with(lambda delivery: delivery.ack())
        channel = self.broker.consumers[tag]
        close = self.broker.frame(channel, "channel.close", reply_code=406,
                                  reply_text="PRECONDITION_FAILED - delivery acknowledgement"
                                  " timed out", class_id=0, method_id=0)
        self.broker.send(self.broker.delivery(tag, 1, b"{}"), self.broker.delivery(tag, 2, b"{}"),
                         close)
        self.assertEqual(self.verdicts(), [])
        self.assertEqual(self.bus.stats.acked, 0)

    def test_delivery_live(self) -> None:
        """
        A delivery is live until its verdict is given or its channel
        closes; a verdict on one that is not is dropped.
        """
        kept: list[Any] = []
        tag = self.subscribe_with(kept.append)
        channel = self.broker.consumers[tag]
        self.broker.deliver_together(tag, [1, 2, 3])
        self.assertEqual([d.live for d in kept], [True, True, True])
        kept[0].ack()
        self.assertEqual([d.live for d in kept], [False, True, True])
        self.broker.send(self.broker.frame(channel, "channel.close", reply_code=406,
                                           reply_text="PRECONDITION_FAILED", class_id=0,
                                           method_id=0))
        self.assertEqual([d.live for d in kept], [False, False, False])
        self.assertFalse(kept[1].ack())

    def test_consumer_on_a_reused_channel_acks_one_by_one(self) -> None:
        """
        After the broker cancels a consumer, the bus consumes again on the
        same channel, where older deliveries may still be unsettled: that
        consumer's acknowledgements are never coalesced.
        """
        old: list[Any] = []
        tag = self.subscribe_with(old.append)
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}")
        self.broker.send(self.broker.frame(channel, "basic.cancel", consumer_tag=tag))
        new_tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.assertNotEqual(new_tag, tag)
        self.assertEqual(self.broker.consumers[new_tag], channel)
        # Its handler acknowledges at once from now on.
        self.bus._subscriptions[0].on_delivery = lambda delivery: delivery.ack()
        self.broker.deliver_together(new_tag, [2, 3, 4])
        self.assertEqual(
            self.verdicts(),
            [("basic.ack", {"delivery_tag": n, "multiple": False}) for n in (2, 3, 4)],
        )
        old[0].ack()
        self.assertEqual(self.verdicts()[-1], ("basic.ack", {"delivery_tag": 1, "multiple": False}))

    def test_acks_decided_later_leave_nothing_remembered(self) -> None:
        """
        Verdicts decided outside a read (a handler that answers later) are
        written at once, in any order, and the consumer remembers none of
        them afterwards.
        """
        kept: list[Any] = []
        tag = self.subscribe_with(kept.append)
        self.broker.deliver_together(tag, [1, 2, 3, 4, 5])
        by_tag = {d.delivery_tag: d for d in kept}
        for n in (2, 1, 3, 5):
            by_tag[n].ack()
        by_tag[4].reject(requeue=True)
        self.assertEqual(
            self.verdicts(),
            [("basic.ack", {"delivery_tag": n, "multiple": False}) for n in (2, 1, 3, 5)]
            + [("basic.nack", {"delivery_tag": 4, "multiple": False, "requeue": True})],
        )
        consumer = self.bus._subscriptions[0].consumer
        assert consumer is not None
        self.assertTrue(consumer.coalesce)
        self.assertEqual((list(consumer.unsettled), consumer.written), ([], set()))

    def test_coalescing_stops_behind_a_delivery_never_settled(self) -> None:
        """
        A consumer remembers a bounded number of deliveries settled behind
        one that is not; past that it stops coalescing rather than grow.
        """
        self.patch(transport, "_SETTLED_BEHIND_MAX", 3)
        tag = self.subscribe_acking_but(1, lambda delivery: None)
        self.broker.deliver_together(tag, [1, 2, 3])
        self.broker.deliver_together(tag, [4, 5])
        self.broker.deliver_together(tag, [6, 7])
        self.assertEqual(
            self.verdicts(),
            [("basic.ack", {"delivery_tag": n, "multiple": False}) for n in range(2, 8)],
        )
        consumer = self.bus._subscriptions[0].consumer
        assert consumer is not None
        self.assertFalse(consumer.coalesce)
        self.assertEqual((len(consumer.unsettled), len(consumer.written)), (0, 0))

    def test_undecodable_rejected(self) -> None:
        """
        A message that is not a valid fedhub message is rejected without
        requeue (dead-lettered), counted and logged, never handed over.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        _, recorder, tag = self.subscribe()
        self.broker.deliver(tag, 4, b"[1, 2", properties={"message-id": "bad\nid"})
        self.broker.pump()
        self.assertEqual(recorder.deliveries, [])
        ((_, _, reject),) = self.broker.methods("basic.reject")
        self.assertEqual(reject, {"delivery_tag": 4, "requeue": False})
        self.assertEqual(self.bus.stats.undecodable, 1)
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                    and "undecodable" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["msg_id"], "bad\\nid")
        self.assertIn("JSON", warnings[0]["reason"])

    def test_decoder_bug_rejected(self) -> None:
        """
        A decoder that fails unexpectedly refuses the message all the same
        (it would hold a prefetch slot until the channel closes), and logs
        the error.
        """

        def broken(*args: Any, **kwargs: Any) -> Message:
            raise RuntimeError("a decoder bug")

        self.patch(transport, "from_amqp", broken)
        _, recorder, tag = self.subscribe()
        self.broker.deliver(tag, 4, b"{}")
        self.broker.pump()
        self.assertEqual(recorder.deliveries, [])
        ((_, _, reject),) = self.broker.methods("basic.reject")
        self.assertEqual(reject, {"delivery_tag": 4, "requeue": False})
        self.assertEqual(self.bus.stats.undecodable, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_subscriber_contained(self) -> None:
        """
        A subscriber that raises is logged; later deliveries still come.
        """
        calls = []

        def broken(delivery: Any) -> None:
            calls.append(delivery)
            raise RuntimeError("plugin bug")

        self.bus.subscribe("hub.q", broken, 5)
        self.broker.pump()
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.broker.deliver(tag, 1, b"{}")
        self.broker.deliver(tag, 2, b"{}")
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(self.bus.connected)

    def test_missing_queue(self) -> None:
        """
        Subscribing to a queue that does not exist fails with NotFound, and
        the subscription is not tried again after a reconnect.
        """
        self.broker.failures[("basic.consume", "nope")] = (404, "NOT_FOUND - no queue 'nope'")
        d = self.bus.subscribe("nope", Recorder(), 5)
        self.broker.pump()
        self.failureResultOf(d, NotFound)
        self.lose()
        self.reconnect()
        self.assertEqual(self.broker.methods("basic.consume"), [])

    def test_bad_prefetch(self) -> None:
        """
        A prefetch outside 1..65535 is refused.
        """
        for prefetch in (0, 65536, True):
            self.failureResultOf(self.bus.subscribe("q", Recorder(), prefetch), ValueError)

    def test_broker_cancel_consumes_again(self) -> None:
        """
        When the broker cancels the consumer, the subscription consumes again
        at once, on the same channel.
        """
        _, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.send(self.broker.frame(channel, "basic.cancel", consumer_tag=tag))
        consumes = self.broker.methods("basic.consume")
        self.assertEqual(len(consumes), 2)
        self.assertEqual(consumes[1][0], channel)
        new_tag = consumes[1][2]["consumer_tag"]
        self.broker.deliver(new_tag, 1, b"{}")
        self.assertEqual(len(recorder.deliveries), 1)

    def test_consumer_channel_closed_backs_off(self) -> None:
        """
        When the broker closes a consumer's channel and the queue stays gone,
        the subscription retries with growing delays: no hot loop.
        """
        subscription, _, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.failures[("basic.consume", "hub.q")] = (404, "NOT_FOUND - no queue")
        self.broker.send(self.broker.frame(channel, "channel.close", reply_code=404,
                                           reply_text="NOT_FOUND - queue deleted"))
        self.assertEqual(len(self.broker.methods("basic.consume")), 2)
        for delay in (2.0, 4.0):
            self.clock.advance(delay - 0.01)
            self.broker.pump()
            count = len(self.broker.methods("basic.consume"))
            self.clock.advance(0.01)
            self.broker.pump()
            self.assertEqual(len(self.broker.methods("basic.consume")), count + 1)
        del self.broker.failures[("basic.consume", "hub.q")]
        self.clock.advance(8.0)
        self.broker.pump()
        self.assertIsNone(subscription.retry_call)
        self.assertIsNotNone(subscription.consumer)
        consumes = len(self.broker.methods("basic.consume"))
        self.clock.advance(100.0)
        self.assertEqual(len(self.broker.methods("basic.consume")), consumes)

    def test_consuming_follows_the_consumer(self) -> None:
        """
        A subscription says it consumes only while the broker has its
        consumer: not after a lost connection until consuming again, not
        while its queue is gone, and not once cancelled.
        """
        subscription, _, tag = self.subscribe()
        self.assertTrue(subscription.consuming)
        self.lose()
        self.assertFalse(subscription.consuming)
        self.reconnect()
        self.assertTrue(subscription.consuming)
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.broker.failures[("basic.consume", "hub.q")] = (404, "NOT_FOUND - no queue")
        self.broker.send(self.broker.frame(self.broker.consumers[tag], "channel.close",
                                           reply_code=404, reply_text="NOT_FOUND - queue deleted"))
        for delay in (2.0, 4.0):
            self.clock.advance(delay)
            self.broker.pump()
        self.assertTrue(self.bus.connected)
        self.assertFalse(subscription.consuming)
        self.assertIn("NOT_FOUND - no queue", subscription.last_error or "")
        del self.broker.failures[("basic.consume", "hub.q")]
        self.clock.advance(8.0)
        self.broker.pump()
        self.assertTrue(subscription.consuming)
        self.assertIsNone(subscription.last_error)
        subscription.cancel()
        self.assertFalse(subscription.consuming)

    def test_cancel(self) -> None:
        """
        cancel() closes the subscription's channel (its unacknowledged
        messages go back); later deliveries are not handed over; cancelling
        twice is harmless.
        """
        subscription, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        first = subscription.cancel()
        second = subscription.cancel()
        self.assertNoResult(first)
        self.broker.pump()
        self.assertEqual(self.broker.methods("channel.close")[-1][0], channel)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(subscription.cancel())
        self.broker.deliver(tag, 1, b"{}")
        self.assertEqual(recorder.deliveries, [])
        self.lose()
        self.reconnect()
        self.assertEqual(self.broker.methods("basic.consume"), [])

    def test_stop_consuming(self) -> None:
        """
        stop_consuming() sends basic.cancel for the consumer's tag and keeps
        its channel open: deliveries the broker sent before it had the
        cancel still reach the subscriber, verdicts still go out on the
        channel, and the Deferred fires on basic.cancel-ok.  cancel() then
        closes the channel.
        """
        subscription, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}")
        self.broker.answer_cancel = False
        stopped = subscription.stop_consuming()
        self.broker.pump()
        self.assertEqual(self.broker.methods("basic.cancel"),
                         [(channel, "basic.cancel", {"consumer_tag": tag, "no_wait": False})])
        self.assertEqual(self.broker.methods("channel.close"), [])
        self.assertFalse(subscription.consuming)
        self.assertNoResult(stopped)
        # One more, sent before the broker had the cancel.
        self.broker.deliver(tag, 2, b"{}")
        self.assertEqual([d.delivery_tag for d in recorder.deliveries], [1, 2])
        self.assertTrue(recorder.deliveries[1].reject(True))
        self.broker.cancel_ok(tag)
        self.successResultOf(stopped)
        # Asking again sends nothing more.
        self.successResultOf(subscription.stop_consuming())
        self.assertTrue(recorder.deliveries[0].ack())
        self.assertEqual(
            self.verdicts(),
            [("basic.nack", {"delivery_tag": 2, "multiple": False, "requeue": True}),
             ("basic.ack", {"delivery_tag": 1, "multiple": False})],
        )
        self.assertEqual(len(self.broker.methods("basic.cancel")), 1)
        self.assert_cancel_closes(subscription, channel)

    def test_stop_consuming_then_rejections_before_held_acks(self) -> None:
        """
        A subscriber that stops consuming in the middle of a read and
        rejects a delivery: the basic.cancel and the rejection go out at
        once, the acknowledgements held back for the end of the read after
        them, and the coalesced one does not stand for the rejected
        delivery (the broker has it back already).
        """
        subscriptions: list[Any] = []

        def handle(delivery: Any) -> None:
            if delivery.delivery_tag == 2:
                subscriptions[0].stop_consuming()
                delivery.reject(True)
            else:
                delivery.ack()

        d = self.bus.subscribe("hub.q", handle, 100)
        self.broker.pump()
        subscriptions.append(self.successResultOf(d))
        tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.broker.deliver_together(tag, [1, 2, 3])
        self.broker.pump()
        self.assertEqual(
            [(m[1], m[2]) for m in self.broker.methods("basic.cancel", "basic.ack", "basic.nack")],
            [("basic.cancel", {"consumer_tag": tag, "no_wait": False}),
             ("basic.nack", {"delivery_tag": 2, "multiple": False, "requeue": True}),
             ("basic.ack", {"delivery_tag": 3, "multiple": True})],
        )

    def test_stop_consuming_unanswered(self) -> None:
        """
        Without a basic.cancel-ok, stop_consuming's Deferred fires after the
        bus's close_timeout; a late answer changes nothing, and the channel
        still closes on cancel().
        """
        subscription, _, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.answer_cancel = False
        stopped = subscription.stop_consuming()
        self.broker.pump()
        self.clock.advance(self.bus.close_timeout - 0.1)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.broker.cancel_ok(tag)
        self.assert_cancel_closes(subscription, channel)
        self.assertTrue(self.bus.connected)

    def test_stop_consuming_then_connection_lost(self) -> None:
        """
        A connection lost while the basic.cancel waits for its answer fires
        stop_consuming's Deferred; the subscription does not consume again
        after the reconnect, and cancel() then has nothing to close.
        """
        subscription, recorder, tag = self.subscribe()
        self.broker.deliver(tag, 1, b"{}")
        self.broker.answer_cancel = False
        stopped = subscription.stop_consuming()
        self.broker.pump()
        self.lose()
        self.successResultOf(stopped)
        self.assertFalse(recorder.deliveries[0].live)
        self.assertFalse(recorder.deliveries[0].ack())
        self.reconnect()
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.broker.methods("basic.consume"), [])
        self.successResultOf(subscription.cancel())
        self.assertEqual(self.broker.methods("channel.close"), [])

    def test_stop_consuming_while_disconnected(self) -> None:
        """
        A subscription that stops consuming while the connection is down
        sends nothing and does not consume again after the reconnect.
        """
        subscription, _, _ = self.subscribe()
        self.lose()
        self.successResultOf(subscription.stop_consuming())
        self.reconnect()
        self.assertTrue(self.bus.connected)
        self.assertEqual(self.broker.methods("basic.consume", "basic.cancel"), [])

    def test_broker_cancel_after_stop_consuming(self) -> None:
        """
        A consumer the broker cancels after the subscription stopped
        consuming is not consumed again; its channel stays for the verdicts
        on what it holds, and cancel() closes it.
        """
        subscription, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}")
        self.broker.answer_cancel = False
        stopped = subscription.stop_consuming()
        self.broker.pump()
        self.broker.send(self.broker.frame(channel, "basic.cancel", consumer_tag=tag))
        self.broker.cancel_ok(tag)
        self.successResultOf(stopped)
        self.assertEqual(len(self.broker.methods("basic.consume")), 1)
        self.assertTrue(recorder.deliveries[0].ack())
        self.assert_cancel_closes(subscription, channel)

    def test_stop_consuming_while_consuming_again(self) -> None:
        """
        A subscription that stops consuming while its basic.consume after a
        cancel by the broker waits for its answer, on the same channel,
        sends basic.cancel for that consumer at once: a delivery of the
        cancelled consumer rejected then goes out after it, so it goes to
        the queue's other consumers rather than back to this channel.
        stop_consuming's Deferred fires on basic.cancel-ok.
        """
        subscription, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.deliver(tag, 1, b"{}")
        # The broker's cancel and the client's consume-ok to come.
        self.broker.client.dataReceived(
            self.broker.frame(channel, "basic.cancel", consumer_tag=tag)
        )
        self.assertTrue(subscription.starting)
        stopped = subscription.stop_consuming()
        self.assertTrue(recorder.deliveries[0].reject(True))
        self.assertNoResult(stopped)
        self.broker.pump()
        self.successResultOf(stopped)
        new_tag = self.broker.methods("basic.consume")[-1][2]["consumer_tag"]
        self.assertNotEqual(new_tag, tag)
        self.assertEqual(
            [(m[0], m[1], m[2].get("consumer_tag", m[2].get("delivery_tag")))
             for m in self.broker.methods("basic.consume", "basic.cancel", "basic.nack")][1:],
            [(channel, "basic.consume", new_tag), (channel, "basic.cancel", new_tag),
             (channel, "basic.nack", 1)],
        )
        self.assertFalse(subscription.consuming)
        self.assert_cancel_closes(subscription, channel)

    def test_stop_consuming_while_opening_a_channel_to_consume_again(self) -> None:
        """
        A subscription that stops consuming while it opens a new channel to
        consume again (the broker closed its channel) does not consume on
        it: once stop_consuming's Deferred fired, nothing more is delivered.
        The new channel is closed.
        """
        subscription, recorder, tag = self.subscribe()
        channel = self.broker.consumers[tag]
        self.broker.client.dataReceived(
            self.broker.frame(channel, "channel.close", reply_code=406,
                              reply_text="PRECONDITION_FAILED", class_id=0, method_id=0)
        )
        self.assertTrue(subscription.starting)
        self.successResultOf(subscription.stop_consuming())
        self.broker.pump()
        self.assertEqual(len(self.broker.methods("basic.consume")), 1)
        (opened,) = [m[0] for m in self.broker.methods("channel.open") if m[0] != channel][-1:]
        self.assertEqual(self.broker.methods("channel.close")[-1][0], opened)
        self.assertFalse(subscription.starting)
        self.assertFalse(subscription.consuming)
        self.successResultOf(subscription.cancel())
        self.assertEqual(recorder.deliveries, [])

    def test_resumed_after_reconnect(self) -> None:
        """
        After a reconnect the subscription consumes again and deliveries reach
        the same handler; a delivery from the old connection can no longer be
        acknowledged and is ignored.
        """
        _, recorder, tag = self.subscribe()
        self.broker.deliver(tag, 1, b"{}")
        old = recorder.deliveries[0]
        self.lose()
        self.reconnect()
        old.ack()
        self.assertEqual(self.broker.methods("basic.ack"), [])
        ((_, _, consume),) = self.broker.methods("basic.consume")
        self.broker.deliver(consume["consumer_tag"], 1, b"{}")
        self.assertEqual(len(recorder.deliveries), 2)

    def test_subscribe_before_connected(self) -> None:
        """
        A subscription made while disconnected starts when connected.
        """
        endpoint = RefusingEndpoint()
        bus = self.make_bus(endpoint)
        d = bus.subscribe("hub.q", Recorder(), 3)
        self.assertNoResult(d)
        endpoint.refuse = False
        self.reconnect()
        self.assertIsInstance(self.successResultOf(d), AMQPSubscription)
        self.assertEqual(len(self.broker.methods("basic.consume")), 1)


class HeartbeatTests(BusCase):
    """
    The bus's connection keeps a heartbeat and reconnects from a dead broker.
    """

    def test_dead_broker_reconnects(self) -> None:
        """
        A broker that falls silent is dropped after two heartbeat intervals
        and the bus connects again.
        """
        endpoint = FakeEndpoint()
        endpoint.configure = lambda broker: setattr(broker, "heartbeat", 2)
        self.make_bus(endpoint)
        self.assertEqual(self.broker.client.heartbeat_interval, 2)
        self.broker.beats = False
        self.clock.pump([0.5] * 8)
        self.assertTrue(self.broker.transport.aborted)
        self.lose()
        self.reconnect()
        self.assertEqual(len(self.endpoint.brokers), 2)
        self.assertTrue(self.bus.connected)

    def test_live_broker_kept_across_clock_jumps(self) -> None:
        """
        A scripted broker sends heartbeats as RabbitMQ does, so however far
        the clock jumps in one step the connection stays up.
        """
        for step in (59.0, 60.0, 600.0):
            self.clock.advance(step)
            self.assertFalse(self.broker.transport.aborted)
        self.assertEqual(len(self.endpoint.brokers), 1)
        self.assertTrue(self.bus.connected)


# --- the shared RabbitMQ -----------------------------------------------------------

def _reactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


async def rabbitmqctl(*args: str) -> bytes:
    """
    Run rabbitmqctl without blocking the reactor; fail on a non-zero exit.
    """
    out, err, code = await getProcessOutputAndValue(
        "/usr/sbin/rabbitmqctl", ("-q", *args), env=dict(os.environ)
    )
    if code != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed ({code}): {err!r}")
    return cast(bytes, out)


async def close_connection_named(connection_name: str) -> None:
    """
    Close, on the shared broker, only the connection whose client gave this
    name (never anyone else's).
    """
    listing = await rabbitmqctl("list_connections", "--no-table-headers", "pid",
                                "client_properties")
    marker = f'{{"connection_name","{connection_name}"}}'.encode()
    pids = [line.split(b"\t", 1)[0] for line in listing.splitlines() if marker in line]
    if len(pids) != 1:
        raise AssertionError(f"expected one connection named {connection_name!r}: {pids!r}")
    await rabbitmqctl("close_connection", pids[0].decode(), "fedhub test: forced close")


class LiveCase(TestCase):
    """
    Base: buses on the shared broker, stopped after each test.
    """

    timeout = 60

    def setUp(self) -> None:
        require_shared_broker(self)

    async def start_bus(self, **options: Any) -> AMQPBus:
        return await start_live_bus(self, "test", 10, **options)

    async def queue(self, bus: AMQPBus, *patterns: str, **arguments: Any) -> str:
        name = f"fedhub.test.amqp.{uuid.uuid4().hex}"
        await bus.declare(
            Topology(
                queues=(QueueSpec(name, arguments={"x-expires": 60000, **arguments}),),
                bindings=tuple(BindingSpec(name, "amq.topic", p) for p in patterns),
            )
        )
        return name

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        waited = 0.0
        while not condition():
            if waited >= timeout:
                self.fail(f"timed out waiting for {what}")
            await deferLater(_reactor(), 0.05, lambda: None)
            waited += 0.05


class Collector:
    """
    An on_delivery that keeps deliveries, acknowledging them if asked.
    """

    def __init__(self, ack: bool = True) -> None:
        self.deliveries: list[Any] = []
        self.ack = ack

    def __call__(self, delivery: Any) -> None:
        self.deliveries.append(delivery)
        if self.ack:
            delivery.ack()

    @property
    def ids(self) -> list[str]:
        return [d.message.id for d in self.deliveries]


class LiveBusTests(LiveCase):
    """
    The bus against the shared RabbitMQ.
    """

    async def test_publish_confirm_consume(self) -> None:
        """
        A published message is confirmed and consumed, every field intact.
        """
        bus = await self.start_bus()
        run = uuid.uuid4().hex
        queue = await self.queue(bus, f"fedhubtest.{run}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 10)
        message = Message.create(f"fedhubtest.{run}.hello", {"x": [1, "two", None]},
                                 headers={"fedora_messaging_user_jdoe": True}, priority=2)
        await bus.publish(message)
        await self.wait_for(lambda: collector.deliveries != [], "the delivery")
        received = collector.deliveries[0].message
        self.assertEqual(received, message.evolve(queue=queue))
        self.assertEqual(bus.stats.confirmed, 1)

    async def test_unroutable_returned(self) -> None:
        """
        A message nobody is bound for fails with MessageReturned.
        """
        bus = await self.start_bus()
        message = Message.create(f"fedhubtest.{uuid.uuid4().hex}.nobody", {})
        try:
            await bus.publish(message)
        except MessageReturned as e:
            self.assertEqual((e.message_id, e.reply_code), (message.id, 312))
        else:
            self.fail("not returned")

    async def test_nack_from_full_queue(self) -> None:
        """
        A full queue with overflow reject-publish makes the broker nack: the
        message fails with MessageNacked.
        """
        bus = await self.start_bus()
        queue = await self.queue(bus, **{"x-max-length": 1, "x-overflow": "reject-publish"})
        await bus.publish(Message.create("fedhubtest.fill", {}), exchange="", routing_key=queue)
        second = Message.create("fedhubtest.overflow", {})
        try:
            await bus.publish(second, exchange="", routing_key=queue)
        except MessageNacked as e:
            self.assertEqual(e.message_id, second.id)
        else:
            self.fail("not nacked")
        self.assertEqual(bus.stats.nacked, 1)

    async def test_prefetch_and_reject(self) -> None:
        """
        At most prefetch deliveries are unacknowledged; a rejected-with-requeue
        one comes back redelivered.
        """
        bus = await self.start_bus()
        queue = await self.queue(bus)
        for n in range(4):
            await bus.publish(Message.create("fedhubtest.p", {"n": n}), exchange="",
                              routing_key=queue)
        collector = Collector(ack=False)
        await bus.subscribe(queue, collector, 2)
        await self.wait_for(lambda: len(collector.deliveries) == 2, "two deliveries")
        await deferLater(_reactor(), 0.2, lambda: None)
        self.assertEqual(len(collector.deliveries), 2)
        first = collector.deliveries[0]
        first.reject(requeue=True)
        await self.wait_for(lambda: len(collector.deliveries) == 3, "the redelivery")
        again = collector.deliveries[2]
        self.assertEqual(again.message.id, first.message.id)
        self.assertTrue(again.redelivered)
        for delivery in collector.deliveries[1:]:
            delivery.ack()
        await self.wait_for(lambda: len(collector.deliveries) == 5, "the rest")

    async def test_dead_letter_with_x_death(self) -> None:
        """
        A rejected message is dead-lettered; its x-death header (arrays,
        tables, timestamps) is decoded into the message's headers.
        """
        bus = await self.start_bus()
        dead = await self.queue(bus)
        work = await self.queue(bus, **{"x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": dead})
        collector = Collector(ack=False)
        await bus.subscribe(work, collector, 5)
        message = Message.create("fedhubtest.dl", {"n": 1})
        await bus.publish(message, exchange="", routing_key=work)
        await self.wait_for(lambda: collector.deliveries != [], "the delivery")
        collector.deliveries[0].reject(requeue=False)
        dead_letters = Collector()
        await bus.subscribe(dead, dead_letters, 5)
        await self.wait_for(lambda: dead_letters.deliveries != [], "the dead letter")
        received = dead_letters.deliveries[0].message
        self.assertEqual(received.id, message.id)
        (death,) = received.headers["x-death"]
        self.assertEqual((death["queue"], death["reason"], death["count"]), (work, "rejected", 1))
        self.assertIsInstance(death["time"], datetime)

    async def test_undecodable_dead_lettered(self) -> None:
        """
        A message that is not JSON never reaches the subscriber: it is
        rejected without requeue, so it lands in the dead-letter queue.
        """
        bus = await self.start_bus()
        dead = await self.queue(bus)
        work = await self.queue(bus, **{"x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": dead})
        collector = Collector()
        await bus.subscribe(work, collector, 5)
        session = bus._session
        assert session is not None
        raw = await session.client.open_channel()
        session.client.basic_publish(raw.id, "", work, b"\xff not json", {"message_id": "raw-1"},
                                     mandatory=False)
        dead_letters = Collector()
        await bus.subscribe(dead, dead_letters, 5)
        await self.wait_for(lambda: bus.stats.undecodable == 1, "the rejection")
        self.assertEqual(collector.deliveries, [])
        # The dead-letter queue's subscriber rejects it once more (no DLX there).
        await self.wait_for(lambda: bus.stats.undecodable == 2, "the dead letter")

    async def test_coalesced_acks_settle_exactly_what_was_acked(self) -> None:
        """
        With a queue full of messages, acknowledgements are coalesced (fewer
        basic.ack frames than messages), yet a multiple acknowledgement
        never covers a delivery the handler kept: after cancelling, exactly
        the kept ones come back.
        """
        bus = await self.start_bus()
        queue = await self.queue(bus)
        messages = [Message.create("fedhubtest.coalesce", {"n": n}) for n in range(300)]
        for message in messages:
            bus.publish(message, exchange="", routing_key=queue)
        await bus.publish(Message.create("fedhubtest.coalesce", {"n": "last"}), exchange="",
                          routing_key=queue)
        assert bus._session is not None
        client = bus._session.client
        frames: list[bool] = []
        send_method = client.send_method

        def counting(channel_id: int, name: str, *args: Any) -> bool:
            if name == "basic.ack":
                frames.append(bool(args[1]))
            return bool(send_method(channel_id, name, *args))

        client.send_method = counting
        # Every 30th message is acknowledged five deliveries late; 295 and
        # 296 never are.
        late: dict[int, Any] = {}
        kept: list[Any] = []
        acked: list[str] = []

        def handle(delivery: Any) -> None:
            n = delivery.message.body["n"]
            if n in (295, 296):
                kept.append(delivery)
                return
            if n in range(15, 300, 30):
                late[n] = delivery
                return
            if isinstance(n, int) and n - 5 in late:
                earlier = late.pop(n - 5)
                acked.append(earlier.message.id)
                earlier.ack()
            acked.append(delivery.message.id)
            delivery.ack()

        subscription = await bus.subscribe(queue, handle, 100)
        await self.wait_for(lambda: len(kept) + len(acked) == 301, "every delivery")
        await subscription.cancel()
        self.assertEqual((len(kept), late), (2, {}))
        self.assertLess(len(frames), len(acked))
        self.assertIn(True, frames)

        again = Collector()
        await bus.subscribe(queue, again, 100)
        await self.wait_for(lambda: len(again.deliveries) >= 2, "the kept messages again")
        await deferLater(_reactor(), 0.3, lambda: None)
        self.assertEqual(sorted(again.ids), sorted(d.message.id for d in kept))
        self.assertTrue(all(d.redelivered for d in again.deliveries))

    async def test_reconnect_after_forced_close(self) -> None:
        """
        When the broker closes the connection, the bus reconnects, declares
        its queue again (an exclusive one, gone with the old connection) and
        resumes consuming.
        """
        bus = await self.start_bus()
        run = uuid.uuid4().hex
        name = f"fedhub.test.amqp.exclusive.{run}"
        await bus.declare(Topology(
            queues=(QueueSpec(name, durable=False, exclusive=True),),
            bindings=(BindingSpec(name, "amq.topic", f"fedhubtest.{run}.#"),),
        ))
        collector = Collector()
        await bus.subscribe(name, collector, 10)
        await close_connection_named(bus.settings.connection_name or "")
        await self.wait_for(lambda: bus.stats.connection_losses == 1, "the loss")
        await bus.when_connected()
        self.assertEqual(bus.stats.connections, 2)
        message = Message.create(f"fedhubtest.{run}.after", {})
        await bus.publish(message)
        await self.wait_for(lambda: collector.ids == [message.id], "the delivery after reconnect")

    async def test_queue_deleted_and_recreated(self) -> None:
        """
        When its queue is deleted, the broker cancels the consumer; once the
        queue exists again, the subscription consumes from it again.
        """
        bus = await self.start_bus()
        queue = await self.queue(bus)
        collector = Collector()
        await bus.subscribe(queue, collector, 5)
        session = bus._session
        assert session is not None
        await session.run_declaring(lambda channel: channel.queue_delete(queue=queue))
        await deferLater(_reactor(), 0.3, lambda: None)
        await self.queue_again(bus, queue)
        message = Message.create("fedhubtest.recreated", {})

        async def delivered() -> None:
            while collector.ids != [message.id]:
                if collector.deliveries:
                    self.fail(f"unexpected deliveries {collector.ids}")
                await deferLater(_reactor(), 0.1, lambda: None)

        await bus.publish(message, exchange="", routing_key=queue)
        waiting = Deferred.fromCoroutine(delivered())
        waiting.addTimeout(10, _reactor())
        await waiting

    async def queue_again(self, bus: AMQPBus, queue: str) -> None:
        await bus.declare(Topology(queues=(QueueSpec(queue, arguments={"x-expires": 60000}),)))

    async def test_unknown_exchange(self) -> None:
        """
        Publishing to a missing exchange fails with NotFound; the bus goes on.
        """
        bus = await self.start_bus()
        try:
            await bus.publish(Message.create("a.b", {}), exchange=f"missing.{uuid.uuid4().hex}")
        except NotFound as e:
            self.assertEqual(e.reply_code, 404)
        else:
            self.fail("no NotFound")
        queue = await self.queue(bus)
        await bus.publish(Message.create("a.b", {}), exchange="", routing_key=queue)

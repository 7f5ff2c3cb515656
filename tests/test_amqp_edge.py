"""
Tests for L{fedhub.amqp.protocol} against a broken or hostile broker: content
frames out of sequence, bodies far larger than any broker sends, a tuning
below the protocol's minimum frame size, a broker that falls silent, and a
peer that never closes the connection after the broker closed it.
Each is driven frame by frame over a C{StringTransport} with a fake clock.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fedhub.amqp.frames import MAX_BODY_SIZE
from fedhub.amqp.protocol import HEARTBEAT_FRAME
from fedhub.errors import NotConnected
from tests.test_amqp_protocol import Broker

_HEAD = struct.Struct("!BHI")


def raw_frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """A frame around C{payload}, whatever it holds."""
    return _HEAD.pack(frame_type, channel, len(payload)) + payload + b"\xce"


def header_frame(channel: int, body_size: int) -> bytes:
    """A C{basic} content header without properties announcing C{body_size} bytes."""
    return raw_frame(2, channel, struct.pack("!HHQH", 60, 0, body_size, 0))


def body(channel: int, data: bytes) -> bytes:
    """A body frame."""
    return raw_frame(3, channel, data)


@implementer(ILogObserver)
class Errors:
    """Collects the text of every error logged while it is installed."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.texts: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.texts.append(formatEvent(event))


class StrayContentTests(SynchronousTestCase):
    """
    Content header and body frames that no content-bearing method announced
    are protocol errors, on the fast path and the generic one.
    """

    def connect(self, fast: bool = True) -> tuple[Broker, Any]:
        broker = Broker()
        broker.client.fast_frames = fast
        broker.handshake()
        channel = self.successResultOf(broker.open_channel())
        return broker, channel

    def test_header_without_method_drops_connection(self) -> None:
        """A content header on a channel with no message under way drops the connection, logged."""
        errors = Errors(self)
        for fast in (True, False):
            broker, channel = self.connect(fast)
            broker.send(header_frame(1, 5))
            self.assertTrue(broker.transport.aborted, fast)
            self.assertEqual(len(channel.responses.pending) + len(channel.incoming.pending), 0)
        self.assertTrue(errors.texts)
        self.assertTrue(all("unexpected-frame" in text for text in errors.texts), errors.texts)

    def test_header_on_channel_zero(self) -> None:
        """A content header on channel 0 drops the connection instead of waiting in its queue."""
        broker, _ = self.connect()
        broker.send(header_frame(0, 5))
        self.assertTrue(broker.transport.aborted)
        self.assertEqual(len(broker.client.channels[0].responses.pending), 0)

    def test_stray_header_does_not_answer_a_request(self) -> None:
        """
        A stray content header never ends up as the answer to a request on
        its channel: the request fails as the connection goes, not with an
        internal error.
        """
        broker, channel = self.connect()
        asked = channel.basic_qos(prefetch_size=0, prefetch_count=5, global_=False)
        broker.methods()
        broker.send(header_frame(1, 5) + broker.frame(1, "basic.qos-ok"))
        self.assertTrue(broker.transport.aborted)
        self.assertNoResult(asked)

    def test_stray_body_frames_not_kept(self) -> None:
        """Body frames for no message drop the connection at the first: none is kept."""
        for fast in (True, False):
            broker, channel = self.connect(fast)
            broker.send(*[body(1, b"x" * 1000) for _ in range(50)])
            self.assertTrue(broker.transport.aborted, fast)
            self.assertEqual(len(channel.responses.pending) + len(channel.incoming.pending), 0)

    def test_generic_path_sequence_errors(self) -> None:
        """
        Without fast frames too: a second header, a body longer than
        announced and a method in the middle of a message drop the connection.
        """
        deliver_args = dict(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q")
        for tail in (
            header_frame(1, 4) + header_frame(1, 4),
            header_frame(1, 2) + body(1, b"abc"),
            header_frame(1, 4) + body(1, b"ab") + Broker().frame(1, "basic.ack", delivery_tag=1),
        ):
            broker, _ = self.connect(fast=False)
            broker.send(broker.frame(1, "basic.deliver", **deliver_args) + tail)
            self.assertTrue(broker.transport.aborted, tail)
            self.assertEqual(broker.events.seen, [])

    def test_content_for_unknown_channel_still_dropped_quietly(self) -> None:
        """A whole message for a channel that is not open is dropped, not a protocol error."""
        for fast in (True, False):
            broker, _ = self.connect(fast)
            broker.send(
                broker.frame(7, "basic.deliver", consumer_tag="c", delivery_tag=1, routing_key="q"),
                header_frame(7, 3),
                body(7, b"abc"),
                broker.frame(1, "basic.ack", delivery_tag=4),
            )
            self.assertFalse(broker.transport.aborted, fast)
            self.assertEqual(broker.events.seen, [("ack", 1, 4, False)])

    def test_get_ok_content_on_generic_path(self) -> None:
        """basic.get-ok and its content still reach the caller through the generic path."""
        broker, channel = self.connect()
        getting = channel.basic_get(queue="q", no_ack=True)
        broker.methods()
        broker.send(
            broker.frame(1, "basic.get-ok", delivery_tag=1, routing_key="q", message_count=0),
            header_frame(1, 4),
            body(1, b"ab"),
            body(1, b"cd"),
        )
        self.assertFalse(broker.transport.aborted)
        self.assertEqual(self.successResultOf(getting).content.body, b"abcd")


class BodySizeTests(SynchronousTestCase):
    """
    A content header announcing a body larger than any RabbitMQ message is
    refused before a byte of it is buffered.
    """

    def test_huge_body_refused(self) -> None:
        """A body announced beyond the largest message size drops the connection, logged."""
        errors = Errors(self)
        for fast in (True, False):
            broker = Broker()
            broker.client.fast_frames = fast
            broker.handshake()
            self.successResultOf(broker.open_channel())
            broker.send(
                broker.frame(1, "basic.deliver", consumer_tag="c", delivery_tag=1, routing_key="q"),
                header_frame(1, MAX_BODY_SIZE + 1),
            )
            self.assertTrue(broker.transport.aborted, fast)
            self.assertEqual(broker.client._contents.pending, {})
        self.assertEqual(len(errors.texts), 2)
        self.assertIn("bad-length", errors.texts[0])

    def test_largest_body_accepted(self) -> None:
        """A body of exactly the largest size is announced without complaint."""
        broker = Broker()
        broker.handshake()
        self.successResultOf(broker.open_channel())
        broker.send(
            broker.frame(1, "basic.deliver", consumer_tag="c", delivery_tag=1, routing_key="q"),
            header_frame(1, MAX_BODY_SIZE),
        )
        self.assertFalse(broker.transport.aborted)


class TuneTests(SynchronousTestCase):
    """
    A broker that tunes the frame size below AMQP's minimum is refused.
    """

    def test_frame_max_below_minimum(self) -> None:
        """
        A frame_max below 4096 fails the handshake and drops the connection
        with a clear reason, instead of making every message unsendable.
        """
        errors = Errors(self)
        for frame_max in (1, 8, 9, 4095):
            broker = Broker()
            opened = broker.client.open()
            broker.send(
                broker.frame(
                    0,
                    "connection.start",
                    version_major=0,
                    version_minor=9,
                    mechanisms=b"PLAIN",
                    locales=b"en_US",
                )
            )
            broker.written()
            broker.send(
                broker.frame(0, "connection.tune", channel_max=0, frame_max=frame_max, heartbeat=60)
            )
            self.assertTrue(broker.transport.aborted, frame_max)
            self.assertEqual(broker.methods(), [], frame_max)
            error = self.failureResultOf(opened, NotConnected).value
            self.assertIn(str(frame_max), str(error))
        self.assertEqual(len(errors.texts), 4)
        self.assertIn("4096", errors.texts[0])

    def test_frame_max_zero_is_no_limit(self) -> None:
        """A frame_max of 0 (no limit) leaves the client's own."""
        broker = Broker()
        broker.handshake(frame_max=0)
        self.assertFalse(broker.transport.aborted)
        self.assertEqual(broker.client.MAX_LENGTH, 131072)


class DeadBrokerTests(SynchronousTestCase):
    """
    A broker that falls silent is dropped two heartbeat intervals after the
    last byte it sent, not later.
    """

    def test_detected_within_two_intervals(self) -> None:
        """Silence of exactly two intervals drops the connection, wherever the last byte fell."""
        for offset in (0.1, 0.5, 0.9):
            broker = Broker(heartbeat=2)
            broker.handshake(heartbeat=2)
            broker.clock.advance(offset)
            broker.send(HEARTBEAT_FRAME)
            broker.clock.advance(4 - 0.01)
            self.assertFalse(broker.transport.aborted, offset)
            broker.clock.advance(0.01)
            self.assertTrue(broker.transport.aborted, offset)

    def test_idle_client_still_sends(self) -> None:
        """While the broker talks, an idle client sends a heartbeat at least once an interval."""
        broker = Broker(heartbeat=2)
        broker.handshake(heartbeat=2)
        sent = []
        for step in range(1, 41):
            broker.clock.advance(0.25)
            if step % 3 == 0:
                broker.send(HEARTBEAT_FRAME)
            if broker.transport.value():
                self.assertEqual(broker.transport.value(), HEARTBEAT_FRAME)
                sent.append(broker.clock.seconds())
                broker.transport.clear()
        self.assertFalse(broker.transport.aborted)
        gaps = [b - a for a, b in zip([0.0] + sent, sent)]
        self.assertTrue(sent)
        self.assertLessEqual(max(gaps), 2)


class AfterCloseTests(SynchronousTestCase):
    """
    Once the connection is closing, what the broker still sends is neither
    handled nor kept, and a transport that does not close is dropped.
    """

    def test_nothing_kept_after_broker_close(self) -> None:
        """Bytes after the broker's connection.close are dropped, however much they claim to be."""
        broker = Broker()
        broker.handshake()
        self.successResultOf(broker.open_channel())
        broker.send(
            broker.frame(0, "connection.close", reply_code=320, reply_text="CONNECTION_FORCED"),
            _HEAD.pack(3, 1, 0xFFFFFFF0),
        )
        self.assertTrue(broker.transport.disconnecting)
        for _ in range(20):
            broker.send(b"x" * 4096)
        self.assertEqual(broker.client._partial, [])
        broker.send(broker.frame(1, "basic.ack", delivery_tag=1))
        self.assertEqual(broker.events.seen, [])

    def test_peer_that_never_closes_is_dropped(self) -> None:
        """After the broker's connection.close, a peer that keeps TCP open is dropped."""
        broker = Broker()
        broker.handshake()
        broker.send(
            broker.frame(0, "connection.close", reply_code=320, reply_text="CONNECTION_FORCED")
        )
        self.assertTrue(broker.transport.disconnecting)
        # The peer keeps talking, so heartbeats never find it silent.
        for _ in range(int(broker.client.close_timeout / 0.25) - 1):
            broker.clock.advance(0.25)
            broker.send(HEARTBEAT_FRAME)
        self.assertFalse(broker.transport.aborted)
        broker.clock.advance(0.25)
        self.assertTrue(broker.transport.aborted)

    def test_no_timer_left_after_a_prompt_close(self) -> None:
        """A connection that closes in time after the broker's close leaves no timer behind."""
        broker = Broker()
        broker.handshake()
        broker.send(
            broker.frame(0, "connection.close", reply_code=320, reply_text="CONNECTION_FORCED")
        )
        broker.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(broker.clock.getDelayedCalls(), [])
        broker.clock.advance(3600)
        self.assertFalse(broker.transport.aborted)

    def test_refused_login_on_a_peer_that_never_closes(self) -> None:
        """A connection.close before tuning (no heartbeat yet) is still forced shut."""
        broker = Broker()
        broker.send(
            broker.frame(
                0,
                "connection.start",
                version_major=0,
                version_minor=9,
                server_properties={},
                mechanisms=b"PLAIN",
                locales=b"en_US",
            ),
            broker.frame(0, "connection.close", reply_code=403, reply_text="ACCESS_REFUSED"),
        )
        self.assertTrue(broker.transport.disconnecting)
        broker.clock.advance(broker.client.close_timeout)
        self.assertTrue(broker.transport.aborted)

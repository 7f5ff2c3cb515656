"""
Tests for L{fedhub.status.web} at its edges: clients that connect and then
take their time, driven through the service's own listening factory on a
memory reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fedhub.status import StatusService
from tests.test_status import FakeHub


class SlowClientTests(SynchronousTestCase):
    """
    A client gets a bounded time to send each request, however it spreads
    its bytes.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.status = StatusService(
            FakeHub(), "tcp:8070:interface=127.0.0.1", self.reactor, request_timeout=20.0
        )
        self.status.startService()
        self.addCleanup(self.status.stopService)
        self.factory = self.reactor.tcpServers[0][1]

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_trickling_request_closed(self) -> None:
        """A client sending its request a byte every few seconds is cut off at the deadline."""
        protocol, transport = self.connect()
        request = b"GET /live HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 100
        for byte in request[:10]:
            protocol.dataReceived(bytes([byte]))
            self.reactor.advance(1.9)
        self.assertFalse(transport.disconnecting)
        for byte in request[10:]:
            protocol.dataReceived(bytes([byte]))
            self.reactor.advance(1.9)
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.disconnected, "the connection is aborted, not closed politely")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.reactor.seconds(), 20.9)

    def test_idle_keepalive_closed_and_prompt_requests_served(self) -> None:
        """Each request on a kept-alive connection has its own deadline from the previous answer."""
        protocol, transport = self.connect()
        self.reactor.advance(19)
        protocol.dataReceived(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.reactor.advance(19)
        protocol.dataReceived(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"ok\n", transport.value())
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(20)
        self.assertTrue(transport.disconnecting)

    def test_live_view_outlasts_deadline(self) -> None:
        """An open /events stream is a request in progress: the deadline does not end it."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"text/event-stream", transport.value())
        for _ in range(30):
            self.reactor.advance(2)
        self.assertFalse(transport.disconnecting)
        self.assertIn(b"event: status", transport.value().rsplit(b"\n\n", 2)[-2])


class StopTests(SynchronousTestCase):
    """
    Stopping the status server does not wait on its clients.
    """

    def test_client_not_reading_cut_at_stop(self) -> None:
        """
        A connection whose client stopped reading (a stalled /events viewer)
        is closed politely when the server stops, and cut CLOSE_GRACE
        seconds later: the hub's stop, producers and consumers still running
        meanwhile, does not wait for the request timeout.
        """
        from twisted.python.failure import Failure
        from twisted.internet.error import ConnectionLost

        from fedhub.status.web import CLOSE_GRACE

        reactor = MemoryReactorClock()
        status = StatusService(FakeHub(), "tcp:8070:interface=127.0.0.1", reactor,
                               request_timeout=20.0)
        status.startService()
        factory = reactor.tcpServers[0][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        stopped = status.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        reactor.advance(CLOSE_GRACE)
        self.assertTrue(transport.disconnected, "the connection is cut")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(stopped)
        self.assertLess(reactor.seconds(), 20.0)
        self.assertEqual(reactor.getDelayedCalls(), [])

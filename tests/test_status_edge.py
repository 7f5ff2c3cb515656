"""
Tests for L{fedhub.status.web} at its edges: clients that connect and then
take their time, send request bodies or ask for what is not there, driven
through the service's own listening factory on a memory reactor.
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from fedhub.status import StatusService
from tests.test_status import FakeHub


def open_connection(factory: Any) -> tuple[Any, StringTransport]:
    """
    A client connected through the status server's listening C{factory}:
    the server's protocol, and the transport that holds what it answers.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class StatusServerCase(SynchronousTestCase):
    """
    A status server of a L{FakeHub} on a memory reactor, built with
    L{status_options}, started before each test and stopped after it.
    """

    status_options: ClassVar[dict[str, Any]] = {}

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.status = StatusService(
            FakeHub(), "tcp:8070:interface=127.0.0.1", self.reactor, **self.status_options
        )
        self.status.startService()
        self.addCleanup(self.status.stopService)
        self.factory = self.reactor.tcpServers[0][1]

    def connect(self) -> tuple[Any, StringTransport]:
        return open_connection(self.factory)


class SlowClientTests(StatusServerCase):
    """
    A client gets a bounded time to send each request, however it spreads
    its bytes.
    """

    status_options = {"request_timeout": 20.0}

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
        protocol, transport = open_connection(reactor.tcpServers[0][1])
        stopped = status.stopService()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        reactor.advance(CLOSE_GRACE)
        self.assertTrue(transport.disconnected, "the connection is cut")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(stopped)
        self.assertLess(reactor.seconds(), 20.0)
        self.assertEqual(reactor.getDelayedCalls(), [])


class RequestBodyTests(StatusServerCase):
    """
    The status server answers C{GET} and C{HEAD} only: a request with a body
    is refused before its body is read, so no client can make it store one.
    (Twisted keeps a request's body, whatever its size, in a temporary file
    before any resource sees the request.)
    """

    def setUp(self) -> None:
        from twisted.web import http

        super().setUp()
        self.stored: list[int | None] = []
        real = http._getContentFile

        def recorded(length: int | None) -> Any:
            self.stored.append(length)
            return real(length)

        self.patch(http, "_getContentFile", recorded)

    def assert_refused(self, transport: StringTransport) -> None:
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        head = answer.partition(b"\r\n\r\n")[0].lower()
        self.assertIn(b"\r\nconnection: close", head)
        self.assertIn(b"\r\ncontent-security-policy: default-src 'none'", head)
        self.assertIn(b"\r\nx-content-type-options: nosniff", head)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.stored, [], "no body was stored")

    def test_huge_body_refused_unread(self) -> None:
        """A body announced as a terabyte is answered 413 before any of it is kept."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST /live HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        self.assert_refused(transport)
        protocol.dataReceived(b"a" * 200_000)
        self.assertEqual(self.stored, [])

    def test_body_in_same_packet_refused(self) -> None:
        """Body bytes arriving with the headers are dropped, not handed on."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"PUT /status.json HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300000\r\n\r\n" + b"a" * 300_000
        )
        self.assert_refused(transport)

    def test_chunked_body_refused(self) -> None:
        """A chunked body, of no announced size, is refused the same way."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"100000\r\n" + b"a" * 100_000
        )
        self.assert_refused(transport)

    def test_get_with_empty_body_served(self) -> None:
        """C{Content-Length: 0}, as some clients send with C{GET}, is no body."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /live HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nok\n"))
        self.assertFalse(transport.disconnecting)

    def test_connection_lost_after_refusal(self) -> None:
        """The refused request's connection goes away cleanly."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /live HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n")
        self.assert_refused(transport)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(self.factory.protocols), 0)


class ErrorAnswerHeaderTests(StatusServerCase):
    """
    Every answer carries the security headers, Twisted's own error pages
    (an unknown path, a method not allowed or not known) included.
    """

    def answer(self, request_line: bytes) -> tuple[bytes, bytes]:
        protocol, transport = self.connect()
        protocol.dataReceived(request_line + b"\r\nHost: localhost\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return head.lower(), body

    def assert_secured(self, head: bytes, status: bytes) -> None:
        self.assertTrue(head.startswith(b"http/1.1 " + status), head[:100])
        for header in (
            b"content-security-policy: default-src 'none';",
            b"x-content-type-options: nosniff",
            b"x-frame-options: deny",
            b"referrer-policy: no-referrer",
            b"cache-control: no-store",
        ):
            self.assertIn(b"\r\n" + header, head)

    def test_not_found(self) -> None:
        head, body = self.answer(b"GET /nothing-here HTTP/1.1")
        self.assert_secured(head, b"404")
        self.assertIn(b"No Such Resource", body)

    def test_not_found_below_static(self) -> None:
        head, _ = self.answer(b"GET /static/nothing.js HTTP/1.1")
        self.assert_secured(head, b"404")

    def test_method_not_allowed(self) -> None:
        head, _ = self.answer(b"POST /ready HTTP/1.1")
        self.assert_secured(head, b"405")
        self.assertIn(b"\r\nallow: ", head)

    def test_method_not_known(self) -> None:
        head, _ = self.answer(b"BREW / HTTP/1.1")
        self.assert_secured(head, b"501")


class ConnectionLimitTests(StatusServerCase):
    """
    When every connection the server allows is taken, a new one takes the
    place of one waiting for its client's next request: of those that never
    sent one, the one that has waited longest, else the one answered
    longest ago.  Clients that connect and send nothing can keep neither a
    health probe out nor cut a scraper's kept-alive connection.
    Connections whose request is being answered are never closed for it.
    """

    status_options = {"max_connections": 3, "request_timeout": 20.0}

    def connect(self) -> tuple[Any, StringTransport] | None:  # type: ignore[override]
        """
        A client connection, or C{None} when the server refuses it.
        """
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        if protocol is None:
            return None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_idle_connections_do_not_keep_a_probe_out(self) -> None:
        """A probe gets in when idle clients hold every connection; the longest waiting is cut."""
        idle = []
        for _ in range(3):
            connection = self.connect()
            assert connection is not None
            idle.append(connection)
            self.reactor.advance(1)
        # The second has sent part of a request: it still only waits.
        idle[1][0].dataReceived(b"GET /live HTTP/1.1\r\n")
        probe = self.connect()
        assert probe is not None, "the probe's connection is refused"
        probe[0].dataReceived(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(probe[1].value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(idle[0][1].disconnected, "the oldest idle connection is cut")
        self.assertEqual([t.disconnecting for _, t in idle[1:]], [False, False])
        # The next newcomer cuts the next oldest waiting one, not the one
        # already closing.
        self.assertIsNotNone(self.connect())
        self.assertTrue(idle[1][1].disconnected)
        self.assertFalse(idle[2][1].disconnecting)

    def scrape(self, connection: tuple[Any, StringTransport]) -> bytes:
        """
        Ask for the metrics on a kept-alive connection; the answer's head.
        """
        protocol, transport = connection
        transport.clear()
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer: bytes = transport.value()
        return answer.partition(b"\r\n")[0]

    def test_scraper_kept_through_a_flood_of_silent_connections(self) -> None:
        """
        A metrics scraper's kept-alive connection, waiting between scrapes,
        is not cut for newcomers while connections that never sent a request
        are open: a flood of silent connections cuts only its own.
        """
        scraper = self.connect()
        assert scraper is not None
        self.assertEqual(self.scrape(scraper), b"HTTP/1.1 200 OK")
        silent = []
        for tick in range(1, 601):
            self.reactor.advance(0.1)
            connection = self.connect()
            assert connection is not None, "a newcomer is refused"
            silent.append(connection)
            if tick % 150 == 0:
                # Every 15 s, as Prometheus scrapes by default.
                self.assertEqual(self.scrape(scraper), b"HTTP/1.1 200 OK")
            self.assertFalse(scraper[1].disconnecting, f"the scraper is cut after {tick} newcomers")
        # Each newcomer took the place of the oldest silent one.
        self.assertEqual([t.disconnecting for _, t in silent[-3:]], [True, False, False])
        self.assertTrue(all(t.disconnected for _, t in silent[:-2]))

    def test_answered_connections_cut_after_silent_ones(self) -> None:
        """
        A silent connection is cut before one that has been answered, even
        when it is the newer; among answered ones, the longest waiting is cut.
        """
        first = self.connect()
        second = self.connect()
        assert first is not None and second is not None
        self.reactor.advance(1)
        self.assertEqual(self.scrape(first), b"HTTP/1.1 200 OK")
        self.reactor.advance(1)
        self.assertEqual(self.scrape(second), b"HTTP/1.1 200 OK")
        self.reactor.advance(1)
        silent = self.connect()
        assert silent is not None
        self.reactor.advance(1)
        newcomer = self.connect()
        assert newcomer is not None
        self.assertTrue(silent[1].disconnected)
        self.assertEqual([first[1].disconnecting, second[1].disconnecting], [False, False])
        # The newcomer asks too: now every connection has been answered, and
        # the one answered longest ago is the next to go.
        self.assertEqual(self.scrape(newcomer), b"HTTP/1.1 200 OK")
        self.assertIsNotNone(self.connect())
        self.assertTrue(first[1].disconnected)
        self.assertEqual([second[1].disconnecting, newcomer[1].disconnecting], [False, False])

    def test_kept_alive_connection_waits_from_its_last_answer(self) -> None:
        """A kept-alive connection has waited since its last answer, not since it was made."""
        first = self.connect()
        assert first is not None
        self.reactor.advance(1)
        second = self.connect()
        assert second is not None
        self.reactor.advance(1)
        first[0].dataReceived(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"ok\n", first[1].value())
        self.reactor.advance(1)
        third = self.connect()
        assert third is not None
        self.assertIsNotNone(self.connect())
        self.assertTrue(second[1].disconnected)
        self.assertFalse(first[1].disconnecting)
        self.assertFalse(third[1].disconnecting)

    def test_connections_being_answered_are_kept(self) -> None:
        """With every connection holding a request in progress, a new one is refused."""
        streams = []
        for _ in range(3):
            connection = self.connect()
            assert connection is not None
            connection[0].dataReceived(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertIn(b"text/event-stream", connection[1].value())
            streams.append(connection)
        self.assertIsNone(self.connect())
        self.assertEqual([t.disconnecting for _, t in streams], [False, False, False])

    def test_lost_connections_free_their_place(self) -> None:
        """A connection that went away leaves room without anyone being cut."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        connections = [self.connect() for _ in range(3)]
        assert None not in connections
        first = connections[0]
        assert first is not None
        first[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.connect())
        self.assertEqual([c[1].disconnecting for c in connections[1:] if c is not None], [False, False])

"""
Tests for L{fedhub.xmlrpc}: the XML-RPC client against real loopback servers
that answer well and badly (faults, HTTP errors, truncated and hostile XML, a
100 MB answer, an answer that never comes), and HTTPS verification.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import threading
from datetime import datetime
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from fedhub.xmlrpc import (
    MAX_RESPONSE_HEAD,
    BadResponse,
    ResponseHeadTooLarge,
    closed_before_answer,
    Call,
    HTTPStatusError,
    IXMLRPCCaller,
    ResponseTooLarge,
    TransportError,
    XMLRPCClient,
    XMLRPCError,
    XMLRPCFault,
    XMLRPCTimeout,
    _split_pem,
    tls_policy,
    unwrap,
)
from tests.broker import Authority
from tests.fakes_xmlrpc import FakeKoji, FakeXMLRPCServer, listen

reactor: Any = _reactor


def echo(*args: Any) -> Any:
    return list(args)


class ClientTestBase(TestCase):
    """
    Starts a fake server on a loopback port and builds clients for it, all
    stopped at the end of the test.
    """

    def serve(self, resource: Resource) -> str:
        port, url = listen(resource, reactor)
        self.addCleanup(port.stopListening)
        if isinstance(resource, FakeXMLRPCServer):
            self.addCleanup(resource.release_hanging)
        return url

    def client(self, url: str, **kwargs: Any) -> XMLRPCClient:
        client = XMLRPCClient(url, reactor, **kwargs)
        self.addCleanup(client.close)
        return client


class CallTests(ClientTestBase):
    """
    Calls that succeed, and faults.
    """

    def setUp(self) -> None:
        self.server = FakeXMLRPCServer({"echo": echo, "big": lambda: 2**40,
                                        "nothing": lambda: None})
        self.url = self.serve(self.server)

    def test_interface(self) -> None:
        """XMLRPCClient provides IXMLRPCCaller."""
        self.assertTrue(verifyObject(IXMLRPCCaller, self.client(self.url)))

    @inlineCallbacks
    def test_call(self) -> Any:
        """A call sends its parameters and returns the decoded result (nil, i8, struct)."""
        client = self.client(self.url)
        result = yield client.call("echo", 1, "ü", None, {"a": [1.5, True]})
        self.assertEqual(result, [1, "ü", None, {"a": [1.5, True]}])
        self.assertEqual((yield client.call("big")), 2**40)
        self.assertIsNone((yield client.call("nothing")))
        self.assertEqual(client.calls, 3)
        self.assertEqual(client.failures, {})

    @inlineCallbacks
    def test_fault(self) -> Any:
        """A fault becomes an XMLRPCFault with its code and string."""
        client = self.client(self.url)
        error = yield self.assertFailure(client.call("nosuch"), XMLRPCFault)
        self.assertEqual(error.fault_code, 1000)
        self.assertIn("Invalid method: nosuch", error.fault_string)
        self.assertEqual((error.url, error.method), (self.url, "nosuch"))
        self.assertEqual(client.failures, {"XMLRPCFault": 1})

    @inlineCallbacks
    def test_connection_reused(self) -> Any:
        """Consecutive calls work over the pool's persistent connection."""
        client = self.client(self.url)
        for i in range(3):
            self.assertEqual((yield client.call("echo", i)), [i])
        self.assertEqual(self.server.requests, 3)

    @inlineCallbacks
    def test_connections_not_announced(self) -> Any:
        """
        A new connection per call (a server that does not keep them) logs
        nothing: Twisted's HTTP client would log two lines for each.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = self.client(self.url, persistent=False)
        for i in range(2):
            self.assertEqual((yield client.call("echo", i)), [i])
        said = [e.get("log_format") or "" for e in events]
        self.assertEqual([s for s in said if "factory" in s.lower()], [])

    def test_bad_url(self) -> None:
        """Only http and https endpoints are accepted."""
        self.assertRaises(XMLRPCError, XMLRPCClient, "ftp://example.org/", reactor)
        self.assertRaises(XMLRPCError, XMLRPCClient, "http://example.org/", reactor, timeout=0)

    @inlineCallbacks
    def test_unencodable_parameters(self) -> Any:
        """Parameters XML-RPC can not carry fail the call without a request."""
        client = self.client(self.url)
        yield self.assertFailure(client.call("echo", object()), XMLRPCError)
        yield self.assertFailure(client.call("echo", 2**70), XMLRPCError)
        self.assertEqual(self.server.requests, 0)


class ClosingServerTests(ClientTestBase):
    """
    A server that closes the connection after each answer (an HTTP/1.0
    server: Python's own SimpleXMLRPCServer), in a thread.
    """

    def test_calls_back_to_back(self) -> Any:
        """
        Calls made one right after the other all succeed: the one sent on a
        kept connection the server had closed goes again on a new one.
        """
        server = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        server.register_function(echo, "echo")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def shut() -> None:
            server.shutdown()
            server.server_close()

        self.addCleanup(shut)
        client = self.client(f"http://127.0.0.1:{server.server_address[1]}/RPC2")

        async def run() -> list[Any]:
            results = []
            for n in range(5):
                results.append(await client.call("echo", n))
            return results

        d = Deferred.fromCoroutine(run())

        def check(results: list[Any]) -> None:
            self.assertEqual(results, [[0], [1], [2], [3], [4]])
            self.assertEqual(client.failures, {})

        return d.addCallback(check)


class _Flood(Protocol):
    """
    Answers a request with C{head}, then nothing more (the connection stays
    open).
    """

    head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.head:
            self.transport.write(self.head)  # type: ignore[union-attr]
            self.head = b""


class ResponseHeadTests(ClientTestBase):
    """
    Answers whose status line and headers never end.
    """

    def flood(self, head: bytes) -> str:
        factory = Factory()

        def build(addr: Any) -> _Flood:
            protocol = _Flood()
            protocol.head = head
            return protocol

        factory.buildProtocol = build  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/RPC2"

    @inlineCallbacks
    def test_endless_headers(self) -> Any:
        """
        Header lines without end are read up to MAX_RESPONSE_HEAD, then the
        call fails saying so (the headers were kept in memory all along).
        """
        url = self.flood(b"HTTP/1.1 200 OK\r\n" + (b"X-Flood: " + b"v" * 1000 + b"\r\n") * 300)
        client = self.client(url, timeout=10)
        error = yield self.assertFailure(client.call("x"), TransportError)
        self.assertIn(f"the answer's headers are larger than {MAX_RESPONSE_HEAD} bytes", str(error))

    @inlineCallbacks
    def test_endless_interim_answers(self) -> Any:
        """
        Interim 1xx answers without end count towards the same bound and
        are not logged one by one.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        url = self.flood(b"HTTP/1.1 102 Processing\r\n\r\n" * 5000)
        client = self.client(url, timeout=10)
        error = yield self.assertFailure(client.call("x"), TransportError)
        self.assertIn("headers are larger than", str(error))
        self.assertEqual([e for e in events if "Ignoring unexpected" in e.get("log_format", "")], [])

    def test_closed_before_answer(self) -> None:
        """
        Only a connection closed or lost before any answer counts as one
        to send again on; a TLS failure or an unreadable answer does not.
        """
        from OpenSSL import SSL
        from twisted.internet.error import ConnectionDone, ConnectionLost
        from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived

        def never(*reasons: BaseException) -> Failure:
            return Failure(ResponseNeverReceived([Failure(r) for r in reasons]))

        self.assertTrue(closed_before_answer(never(ConnectionDone())))
        self.assertTrue(closed_before_answer(never(ConnectionLost())))
        self.assertTrue(closed_before_answer(
            Failure(RequestTransmissionFailed([Failure(ConnectionLost())]))))
        self.assertFalse(closed_before_answer(never(SSL.Error([("SSL routines", "", "certificate verify failed")]))))
        self.assertFalse(closed_before_answer(never(ResponseHeadTooLarge())))
        self.assertFalse(closed_before_answer(never()))
        self.assertFalse(closed_before_answer(Failure(ValueError("x"))))


class MulticallTests(ClientTestBase):
    """
    Batching with Koji's multiCall.
    """

    def setUp(self) -> None:
        self.koji = FakeKoji()
        self.url = self.serve(self.koji.server)

    @inlineCallbacks
    def test_batches_in_order(self) -> Any:
        """Calls are sent in batches of batch_size and results come back in order."""
        client = self.client(self.url, multicall_method="multiCall")
        calls = [Call("getBuild", (574,)), Call("getEvent", (497788,)),
                 Call("getTag", ("f24",)), Call("getAPIVersion"), Call("getBuild", (99999,))]
        results = yield client.multicall(calls, batch_size=2)
        self.assertEqual(self.koji.server.requests, 3)
        self.assertEqual(results[0]["nvr"], "fake-1.1-35MYDISTTAG")
        self.assertEqual(results[1]["id"], 497788)
        self.assertEqual(results[2]["name"], "f24")
        self.assertEqual(results[3], 1)
        self.assertIsNone(results[4])

    @inlineCallbacks
    def test_faults_per_call(self) -> Any:
        """A fault of one call is returned in its place; the others succeed."""
        client = self.client(self.url, multicall_method="multiCall")
        results = yield client.multicall(
            [Call("getEvent", (1, {"strict": True, "__starstar": True})), Call("getAPIVersion")]
        )
        self.assertIsInstance(results[0], XMLRPCFault)
        self.assertEqual(results[0].method, "getEvent")
        self.assertEqual(results[1], 1)
        self.assertRaises(XMLRPCFault, unwrap, results[0])
        self.assertEqual(unwrap(results[1]), 1)

    @inlineCallbacks
    def test_request_failure_fails_all(self) -> Any:
        """A failed request fails the whole multicall."""
        client = self.client(self.url, multicall_method="multiCall")
        self.koji.server.misbehave = ["ok", "http500"]
        d = client.multicall([Call("getAPIVersion")] * 4, batch_size=2)
        yield self.assertFailure(d, HTTPStatusError)

    @inlineCallbacks
    def test_empty(self) -> Any:
        """An empty multicall makes no request."""
        client = self.client(self.url, multicall_method="multiCall")
        self.assertEqual((yield client.multicall([])), [])
        self.assertEqual(self.koji.server.requests, 0)


class MisbehavingServerTests(ClientTestBase):
    """
    Every kind of bad answer fails the call with a typed error.
    """

    def setUp(self) -> None:
        self.server = FakeXMLRPCServer({"echo": echo})
        self.url = self.serve(self.server)

    @inlineCallbacks
    def misbehaving(self, mode: str, error: type[Exception], **kwargs: Any) -> Any:
        client = self.client(self.url, **kwargs)
        self.server.mode = mode
        failure = yield self.assertFailure(client.call("echo", "x" * 200), error)
        # The client stays usable for the next call.
        self.server.mode = None
        self.assertEqual((yield client.call("echo", 1)), [1])
        return failure

    def test_fault(self) -> Any:
        """A server that always faults gives XMLRPCFault."""
        return self.misbehaving("fault", XMLRPCFault)

    @inlineCallbacks
    def test_http_500(self) -> Any:
        """HTTP 500 gives HTTPStatusError with the status."""
        error = yield self.misbehaving("http500", HTTPStatusError)
        self.assertEqual(error.status, 500)

    @inlineCallbacks
    def test_retry_after_kept(self) -> Any:
        """An HTTP 503's Retry-After in seconds is kept on the error, capped; a date is not."""

        class Busy(Resource):
            isLeaf = True
            value = b"120"

            def render_POST(self, request: Request) -> bytes:
                request.setResponseCode(503)
                request.setHeader(b"retry-after", self.value)
                return b"busy"

        resource = Busy()
        client = self.client(self.serve(resource))
        error = yield self.assertFailure(client.call("x"), HTTPStatusError)
        self.assertEqual((error.status, error.retry_after), (503, 120.0))
        resource.value = b"99999999999999"
        error = yield self.assertFailure(client.call("x"), HTTPStatusError)
        self.assertEqual(error.retry_after, 3600.0)
        resource.value = b"Wed, 21 Oct 2026 07:28:00 GMT"
        error = yield self.assertFailure(client.call("x"), HTTPStatusError)
        self.assertIsNone(error.retry_after)

    @inlineCallbacks
    def test_redirect_names_its_target(self) -> Any:
        """A redirect is not followed; the error says where it points, control characters escaped."""

        class Moved(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                request.setResponseCode(301)
                request.setHeader(b"location", b"https://xmlrpc.example.org/RPC2\x1b[0m")
                return b"<html>moved</html>"

        client = self.client(self.serve(Moved()))
        error = yield self.assertFailure(client.call("echo"), HTTPStatusError)
        self.assertEqual(error.status, 301)
        self.assertEqual(error.location, "https://xmlrpc.example.org/RPC2\\x1b[0m")
        self.assertIn("https://xmlrpc.example.org/RPC2", str(error))
        self.assertNotIn("\x1b", str(error))

    @inlineCallbacks
    def test_redirect_target_without_query(self) -> Any:
        """
        Where a redirect points is named without its query string: a server
        moving C{http} to C{https} keeps the query, which may carry the
        configured URL's API key, and the error is logged.
        """

        class Moved(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                request.setResponseCode(301)
                request.setHeader(b"location",
                                  b"https://xmlrpc.example.org/RPC2?api_key=s3cret#top")
                return b"<html>moved</html>"

        client = self.client(self.serve(Moved()))
        error = yield self.assertFailure(client.call("echo"), HTTPStatusError)
        self.assertEqual(error.location, "https://xmlrpc.example.org/RPC2")
        self.assertIn("to https://xmlrpc.example.org/RPC2 (redirects", str(error))
        self.assertNotIn("s3cret", str(error))

    @inlineCallbacks
    def test_datetime_forms(self) -> Any:
        """
        dateTime values in the forms servers send besides the specified one
        (dashes, Z, an offset, fractions) are read, as naive UTC; one that is
        no time at all fails the answer as malformed.
        """
        forms = ["20261129T04:00:00", "2026-11-29T04:00:00", "2026-11-29T04:00:00Z",
                 "2026-11-29T06:00:00+02:00", "2026-11-29T04:00:00.500"]
        values = "".join(f"<value><dateTime.iso8601>{f}</dateTime.iso8601></value>" for f in forms)

        class Times(Resource):
            isLeaf = True
            body = values

            def render_POST(self, request: Request) -> bytes:
                request.setHeader(b"content-type", b"text/xml")
                return (b"<?xml version='1.0'?><methodResponse><params><param><value><array><data>"
                        + self.body.encode() + b"</data></array></value></param></params>"
                        b"</methodResponse>")

        resource = Times()
        client = self.client(self.serve(resource))
        got = yield client.call("times")
        base = datetime(2026, 11, 29, 4, 0, 0)
        self.assertEqual(got, [base, base, base, base, base.replace(microsecond=500000)])
        resource.body = "<value><dateTime.iso8601>yesterday</dateTime.iso8601></value>"
        yield self.assertFailure(client.call("times"), BadResponse)
        # Closed right after a failed answer, whose connection goes back to
        # the pool only after: it is closed too (the reactor is left clean).

    @inlineCallbacks
    def test_odd_faults_and_html_named(self) -> Any:
        """
        A fault whose value is not a struct, one without a faultString, and an
        HTML page are reported as what they are, not as Python's errors.
        """

        class Odd(Resource):
            isLeaf = True
            kind = b"text/xml"
            body = b""

            def render_POST(self, request: Request) -> bytes:
                request.setHeader(b"content-type", self.kind)
                return self.body

        resource = Odd()
        client = self.client(self.serve(resource))
        resource.body = (b"<?xml version='1.0'?><methodResponse><fault><value><string>boom</string>"
                         b"</value></fault></methodResponse>")
        error = yield self.assertFailure(client.call("x"), BadResponse)
        self.assertIn("a fault whose value is not a struct: 'boom'", str(error))
        resource.body = (b"<?xml version='1.0'?><methodResponse><fault><value><struct><member>"
                         b"<name>faultCode</name><value><int>3</int></value></member></struct>"
                         b"</value></fault></methodResponse>")
        fault = yield self.assertFailure(client.call("x"), XMLRPCFault)
        self.assertEqual((fault.fault_code, fault.fault_string), (3, "(the fault has no faultString)"))
        resource.kind = b"text/html; charset=utf-8"
        resource.body = b"<html><body>502 Bad Gateway</body></html>"
        error = yield self.assertFailure(client.call("x"), BadResponse)
        self.assertIn("the answer is an HTML page, not XML-RPC", str(error))
        resource.kind = b"text/xml"
        resource.body = (b"<?xml version='1.0'?><methodResponse><params><param><value><int>1</int>"
                         b"</value></param></params></methodResponse>")
        self.assertEqual((yield client.call("x")), 1)

    def test_truncated(self) -> Any:
        """A cleanly ended but truncated answer is a BadResponse."""
        return self.misbehaving("truncated", BadResponse)

    def test_cut(self) -> Any:
        """An answer cut short by a dropped connection is a TransportError."""
        return self.misbehaving("cut", TransportError)

    def test_not_xml(self) -> Any:
        """An HTML page instead of XML-RPC is a BadResponse."""
        return self.misbehaving("not_xml", BadResponse)

    @inlineCallbacks
    def test_billion_laughs(self) -> Any:
        """Entity declarations are refused: no expansion happens."""
        error = yield self.misbehaving("billion_laughs", BadResponse)
        self.assertIn("DTD", error.reason)

    @inlineCallbacks
    def test_external_entity(self) -> Any:
        """External entities are refused: no local file is read."""
        error = yield self.misbehaving("external_entity", BadResponse)
        self.assertIn("DTD", error.reason)
        self.assertNotIn("root:", error.reason)

    @inlineCallbacks
    def test_huge_answer_aborted_at_cap(self) -> Any:
        """A 100 MB answer is dropped at the cap: neither side moves more than a little beyond it."""
        cap = 1024 * 1024
        error = yield self.misbehaving("huge", ResponseTooLarge, max_response_bytes=cap)
        self.assertEqual(error.limit, cap)
        self.assertLess(error.received, cap + 128 * 1024)
        # The text is the same however much arrived: a failure repeated at
        # every poll is known by it, and logged once.
        self.assertEqual(error.reason, f"response larger than {cap} bytes")
        # Socket buffers hold a few MB at most; the server never got to write
        # anything like the 100 MB it meant to.
        self.assertLess(self.server.flood_sent, 32 * 1024 * 1024)

    @inlineCallbacks
    def test_announced_length_over_cap(self) -> Any:
        """A Content-Length over the cap fails at once, without reading the body."""
        self.server.handlers["blob"] = lambda: "y" * (2 * 1024 * 1024)
        client = self.client(self.url, max_response_bytes=1024 * 1024)
        error = yield self.assertFailure(client.call("blob"), ResponseTooLarge)
        self.assertGreater(error.received, 2 * 1024 * 1024)
        self.assertIn(f"({error.received} announced)", error.reason)
        self.assertEqual(client.bytes_received, 0)

    @inlineCallbacks
    def test_hang_times_out(self) -> Any:
        """A server that accepts and never answers gives XMLRPCTimeout after the timeout."""
        error = yield self.misbehaving("hang", XMLRPCTimeout, timeout=0.3)
        self.assertEqual(error.timeout, 0.3)
        self.assertEqual(len(self.server.hanging), 1)

    @inlineCallbacks
    def wait_until_dropped(self, count: int = 1) -> Any:
        """
        Wait (at most about ten seconds) until the client has dropped
        C{count} connections of unfinished answers.
        """
        for _ in range(1000):
            if len(self.server.dropped) >= count:
                return
            yield deferLater(0.01)
        self.fail(f"the client kept {len(self.server.hanging) - len(self.server.dropped)} "
                  "unfinished answers' connections open")

    @inlineCallbacks
    def test_stalled_error_page_dropped_on_timeout(self) -> Any:
        """An error page that never ends times out, and its connection is dropped."""
        error = yield self.misbehaving("stalled_error", XMLRPCTimeout, timeout=0.3)
        self.assertEqual(error.timeout, 0.3)
        yield self.wait_until_dropped()

    @inlineCallbacks
    def test_close_drops_stalled_error_page(self) -> Any:
        """close() drops the connection of an error page still arriving."""
        client = XMLRPCClient(self.url, reactor)
        self.server.mode = "stalled_error"
        d = client.call("echo")
        while not self.server.hanging:
            yield deferLater(0.01)
        yield deferLater(0.05)
        yield client.close()
        yield self.assertFailure(d, CancelledError)
        yield self.wait_until_dropped()

    @inlineCallbacks
    def test_announced_length_over_cap_without_body(self) -> Any:
        """A Content-Length over the cap fails at once even when no body byte follows."""
        client = self.client(self.url, max_response_bytes=1024 * 1024, timeout=60)
        self.server.mode = "stalled_huge"
        error = yield self.assertFailure(client.call("echo"), ResponseTooLarge)
        self.assertEqual(error.received, self.server.huge_size)
        yield self.wait_until_dropped()

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        """Nobody listening is a TransportError."""
        port, url = listen(Resource(), reactor)
        yield port.stopListening()
        client = self.client(url)
        yield self.assertFailure(client.call("echo"), TransportError)

    @inlineCallbacks
    def test_compressed_answer_refused(self) -> Any:
        """A content encoding the client did not ask for is refused (no decompression bombs)."""

        class Gzipped(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                request.setHeader(b"content-encoding", b"gzip")
                return b"\x1f\x8b..."

        client = self.client(self.serve(Gzipped()))
        yield self.assertFailure(client.call("echo"), BadResponse)

    @inlineCallbacks
    def test_close_cancels_calls(self) -> Any:
        """close() cancels calls in progress."""
        client = XMLRPCClient(self.url, reactor)
        self.server.mode = "hang"
        d = client.call("echo")
        while not self.server.hanging:
            yield deferLater(0.01)
        yield client.close()
        yield self.assertFailure(d, CancelledError)


def deferLater(delay: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, delay, lambda: None)


# --- HTTPS --------------------------------------------------------------


def make_pki(directory: str) -> dict[str, str]:
    """
    A test CA, an unrelated CA, and a server certificate for 127.0.0.1 signed
    by the first (the test PKI of L{tests.broker}); PEM files in C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    paths: dict[str, str] = {}
    authority = Authority.create("fedhub test CA")
    ca_cert = authority.certificate
    other_cert = Authority.create("some other CA").certificate
    server_key, server_cert = authority.issue("127.0.0.1", server=True, ips=["127.0.0.1"])
    # Signed by the same CA, but naming no host (as client certificates do).
    nameless_key, nameless_cert = authority.issue("127.0.0.1", server=True)
    pem = serialization.Encoding.PEM

    def write(name: str, data: bytes) -> None:
        paths[name] = os.path.join(directory, name)
        with open(paths[name], "wb") as f:
            f.write(data)

    write("ca.pem", ca_cert.public_bytes(pem))
    write("other.pem", other_cert.public_bytes(pem))
    # The signing CA second: loading only the first certificate would fail.
    write("bundle.pem", other_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    write("server.pem", server_cert.public_bytes(pem) + server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write("nameless.pem", nameless_cert.public_bytes(pem) + nameless_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class HTTPSTests(ClientTestBase):
    """
    HTTPS endpoints are verified.
    """

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        with open(self.pki["server.pem"], "rb") as f:
            options = PrivateCertificate.loadPEM(f.read()).options()
        server = FakeXMLRPCServer({"echo": echo})
        site = Site(server)
        site.log = lambda request: None  # type: ignore[method-assign]
        port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"https://127.0.0.1:{port.getHost().port}/RPC2"

    @inlineCallbacks
    def test_trusted_by_ca_file(self) -> Any:
        """A server whose certificate chains to the configured CA file is accepted."""
        client = self.client(self.url, ca_file=self.pki["ca.pem"])
        self.assertEqual((yield client.call("echo", 7)), [7])

    @inlineCallbacks
    def test_every_certificate_of_bundle(self) -> Any:
        """Every certificate of a CA bundle is trusted, not only the first."""
        client = self.client(self.url, ca_file=self.pki["bundle.pem"])
        self.assertEqual((yield client.call("echo", 8)), [8])

    @inlineCallbacks
    def test_untrusted_refused(self) -> Any:
        """A server the trust roots do not vouch for is refused."""
        client = self.client(self.url, ca_file=self.pki["other.pem"])
        yield self.assertFailure(client.call("echo"), TransportError)

    @inlineCallbacks
    def test_certificate_naming_no_host_refused(self) -> Any:
        """
        A certificate from the trusted CA that names no host at all (no
        subjectAltName) is refused, quietly: Twisted's own check only logs
        that case, critically, and lets the connection go on.
        """
        with open(self.pki["nameless.pem"], "rb") as f:
            options = PrivateCertificate.loadPEM(f.read()).options()
        site = Site(FakeXMLRPCServer({"echo": echo}))
        site.log = lambda request: None  # type: ignore[method-assign]
        port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.client(f"https://127.0.0.1:{port.getHost().port}/RPC2",
                             ca_file=self.pki["ca.pem"])
        error = yield self.assertFailure(client.call("echo"), TransportError)
        self.assertIn("subjectAltName", error.reason)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_platform_trust_refuses_test_ca(self) -> Any:
        """Without a CA file the platform's trust store is used: the test CA is not in it."""
        client = self.client(self.url)
        yield self.assertFailure(client.call("echo"), TransportError)

    @inlineCallbacks
    def test_unreadable_ca_file(self) -> Any:
        """A CA file that can not be read fails the call with its reason."""
        client = self.client(self.url, ca_file=os.path.join(self.mktemp(), "missing.pem"))
        error = yield self.assertFailure(client.call("echo"), XMLRPCError)
        self.assertIn("can not read CA file", error.reason)


class PEMTests(SynchronousTestCase):
    """
    Reading CA bundles.
    """

    def test_split(self) -> None:
        """Every certificate block of a bundle is found, text around them ignored."""
        block = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        self.assertEqual(_split_pem(b"# comment\n" + block + b"\njunk\n" + block),
                         [block + b"\n", block + b"\n"])

    def test_no_certificate(self) -> None:
        """A file without a certificate is refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"nothing here")
        self.assertRaises(XMLRPCError, tls_policy, path)


class FaultMappingTests(SynchronousTestCase):
    """
    Error values.
    """

    def test_fault_string_escaped(self) -> None:
        """Control characters in a fault string can not forge log lines."""
        error = XMLRPCFault("http://h/", "m", 1, "bad\nINFO forged line")
        self.assertNotIn("\n", str(error))
        self.assertEqual(error.fault_code, 1)

    def test_stdlib_fault_shape(self) -> None:
        """The fake server's faults are standard XML-RPC faults."""
        data = xmlrpc.client.dumps(xmlrpc.client.Fault(3, "x"), methodresponse=True)
        self.assertRaises(xmlrpc.client.Fault, xmlrpc.client.loads, data)

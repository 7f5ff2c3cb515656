"""
Tests for the C{webhook} consumer against local twisted.web servers on
127.0.0.1 (plain and TLS, certificates made in the test): the request's body
and headers, every class of answer, a server that never answers, a refused
connection, TLS verification, and the option checks.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

import fedhub
from fedhub.consumers.webhook import (
    WebhookHandler,
    WebhookPlugin,
    display_url,
    load_ca_bundle,
    hide_secrets,
    parse_retry_after,
    shown_location,
    url_secrets,
    verdict_for_status,
)
from fedhub.errors import ConfigError, DeadLetter, Retry
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.message import Message, from_amqp, loads
from tests.broker import Authority
from fedhub.testing import ConsumerHarness, Settled

TOPIC = "org.example.dev.hook.test"

#: The real reactor, untyped: these tests listen with it.
reactor: Any = _reactor


@dataclass
class Received:
    """
    One request the test server got.
    """

    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


class Hook(Resource):
    """
    A webhook endpoint that records requests and answers as told.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.status = 200
        self.answer = b"thanks"
        self.answer_headers: dict[bytes, bytes] = {}
        self.hang = False
        self.hanging: list[Request] = []
        self.drop_next = 0

    def render(self, request: Request) -> Any:
        assert request.content is not None
        self.received.append(Received(
            request.method,
            request.uri,
            {name: list(values) for name, values in request.requestHeaders.getAllRawHeaders()},
            request.content.read(),
        ))
        if self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.drop_next:
            self.drop_next -= 1
            channel: Any = request.channel
            channel.transport.loseConnection()
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        for name, value in self.answer_headers.items():
            request.setHeader(name, value)
        return self.answer


class Echo(Resource):
    """
    An endpoint that refuses every request, quoting it: its URL in the
    status phrase, its URL and headers in the answer.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(400, b"no good: " + request.uri)
        lines = [b"URL " + request.uri] + [
            name + b": " + value
            for name, values in request.requestHeaders.getAllRawHeaders() for value in values
        ]
        return b"\n".join(lines)


class Tracking(WrappingFactory):
    """
    A site (without idle timeout) whose open connections are known, so a
    test can close them, and which counts the connections it accepted.
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(Site(resource, timeout=None))
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)

    def close_all(self) -> None:
        """
        Abort every open connection.
        """
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()


# --- certificates ------------------------------------------------------------


def make_ca(common: str) -> tuple[Any, x509.Certificate]:
    """
    A self-signed CA (the test PKI of L{tests.broker}): its key and certificate.
    """
    authority = Authority.create(common)
    return authority.key, authority.certificate


def make_server_pem(ca_key: Any, ca_cert: x509.Certificate, named: bool = True) -> bytes:
    """
    A certificate for 127.0.0.1 signed by the CA, with its key, as PEM;
    with no subjectAltName when not C{named}.
    """
    key, cert = Authority("ca", ca_key, ca_cert).issue(
        "127.0.0.1", server=True, ips=["127.0.0.1"] if named else [])
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def pem(cert: x509.Certificate) -> bytes:
    """
    A certificate as PEM.
    """
    return cert.public_bytes(serialization.Encoding.PEM)


# --- the tests -----------------------------------------------------------------


class HelperTests(SynchronousTestCase):
    """
    The pure parts: status verdicts, Retry-After, URLs for logs, CA bundles.
    """

    def test_status_classes(self) -> None:
        """2xx succeeds; 5xx, 408 and 429 retry; other statuses dead-letter."""
        for status in (200, 201, 204, 299):
            self.assertIsNone(verdict_for_status(status, "", "", "u"))
        for status in (500, 502, 503, 599, 408, 429):
            self.assertIsInstance(verdict_for_status(status, "", "", "u"), Retry)
        for status in (400, 401, 403, 404, 410, 413, 422, 301, 302, 307, 100):
            self.assertIsInstance(verdict_for_status(status, "", "", "u"), DeadLetter)
        # Twisted's client takes any three digits: past 5xx is no server error.
        for status in (600, 700, 999):
            self.assertIsInstance(verdict_for_status(status, "", "", "u"), DeadLetter)
        moved = verdict_for_status(301, "Moved", "", "https://a/", location="https://b/hook")
        assert moved is not None
        self.assertIn("(redirects to https://b/hook are not followed)", moved.reason)

    def test_retry_after(self) -> None:
        """Retry-After in seconds is used and capped; dates and junk are ignored."""
        self.assertEqual(parse_retry_after(b"120"), 120.0)
        self.assertEqual(parse_retry_after(b"999999"), 3600.0)
        self.assertIsNone(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"))
        self.assertIsNone(parse_retry_after(b"-5"))
        self.assertIsNone(parse_retry_after(None))

    def test_retry_after_too_many_digits(self) -> None:
        """A Retry-After of more digits than int() converts is capped, not an error."""
        self.assertEqual(parse_retry_after(b"9" * 5000), 3600.0)

    def test_display_url_hides_query(self) -> None:
        """Logs show the URL without its query (where tokens live)."""
        self.assertEqual(display_url("https://h.example:8443/hook?token=s3cret#x"),
                         "https://h.example:8443/hook")

    def test_shown_location(self) -> None:
        """A redirect's target loses its user, password, query and fragment, nothing else."""
        self.assertEqual(shown_location("https://user:pw@other.example:8443/x/y?tok=1#f"),
                         "https://other.example:8443/x/y")
        self.assertEqual(shown_location("//pw@other.example/x"), "//other.example/x")
        self.assertEqual(shown_location("/elsewhere?tok=1"), "/elsewhere")
        self.assertEqual(shown_location("/a/b@c"), "/a/b@c")

    def test_url_secrets(self) -> None:
        """The query, its values (written and decoded) and the Authorization credentials are secrets; short ones are not."""
        secrets = url_secrets("https://h/p?token=a%2Fb%3Dsecret&x=1", b"Bearer t0ken")
        for secret in ("token=a%2Fb%3Dsecret&x=1", "a/b=secret", "a%2Fb%3Dsecret",
                       "Bearer t0ken", "t0ken"):
            self.assertIn(secret, secrets)
        self.assertNotIn("1", secrets)
        self.assertEqual(hide_secrets("got a/b=secret and Bearer t0ken", secrets),
                         "got *** and ***")
        self.assertEqual(url_secrets("https://h/p", None), ())

    def test_ca_bundle_needs_certificates(self) -> None:
        """A file without a PEM certificate is refused."""
        self.assertRaises(ValueError, load_ca_bundle, b"nothing here")
        self.assertRaises(ValueError, load_ca_bundle,
                          b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")

    def test_bad_options(self) -> None:
        """Non-HTTP URLs, inline credentials, reserved or malformed headers are refused."""
        for options in (
            {"url": "ftp://h/x"},
            {"url": "https:///nohost"},
            {"url": "https://user:pw@h.example/x"},
            {"url": "https://h.example/x#frag"},
            {"url": "https://h.example/a b"},
            {"url": "http://h.example:99999/"},
            {"url": "https://h.example/", "timeout": 0},
            {"url": "https://h.example/", "headers": {"Content-Type": "text/plain"}},
            {"url": "https://h.example/", "headers": {"Authorization": "Bearer x"}},
            {"url": "https://h.example/", "headers": {"X-Bad": "a\r\nInjected: yes"}},
            {"url": "https://h.example/", "headers": {"bad name": "x"}},
            {"url": "https://h.example/", "ca": "/nonexistent/ca.pem"},
        ):
            self.assertRaises(ConfigError, ConsumerHarness, WebhookPlugin(), options)

    def test_ca_with_plain_http(self) -> None:
        """A CA for an http:// URL would be ignored, so it is refused."""
        ca = Path(self.mktemp())
        ca.write_bytes(pem(make_ca("x")[1]))
        self.assertRaises(ConfigError, ConsumerHarness, WebhookPlugin(),
                          {"url": "http://127.0.0.1/", "ca": str(ca)})

    def test_provides(self) -> None:
        """The plugin and its handler provide their interfaces."""
        verifyObject(IConsumerPlugin, WebhookPlugin())
        harness = ConsumerHarness(WebhookPlugin(), {"url": "http://127.0.0.1/"})
        verifyObject(IMessageHandler, harness.handler)


class PostTests(TestCase):
    """
    Posting to a real local server.
    """

    timeout = 60

    def setUp(self) -> None:
        self.hook = Hook()
        self.site = Tracking(self.hook)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.close_server)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/hook?token=s3cret"

    @inlineCallbacks
    def close_server(self) -> Any:
        """
        Close every server connection, then the port.
        """
        self.site.close_all()
        yield self.port.stopListening()
        yield deferLater(reactor, 0.01, lambda: None)

    def harness(self, options: Mapping[str, Any] | None = None, **kwargs: Any) -> ConsumerHarness:
        """
        A started harness posting to the test server, stopped after the test.
        """
        harness = ConsumerHarness(WebhookPlugin(), {"url": self.url, **(options or {})},
                                  reactor=reactor, **kwargs)
        harness.start()
        self.addCleanup(harness.stop)
        return harness

    @inlineCallbacks
    def test_body_and_headers(self) -> Any:
        """A 2xx acks; the server got a POST of the serialized message with fedhub's headers."""
        harness = self.harness({"headers": {"X-Team": "infra"}})
        message = Message.create(TOPIC, {"pkg": "kernel", "text": "é"})
        settled: Settled = yield harness.deliver(message)
        self.assertEqual(settled.outcome, "acked")
        (got,) = self.hook.received
        self.assertEqual(got.method, b"POST")
        self.assertEqual(got.path, b"/hook?token=s3cret")
        (received,) = loads(got.body)
        self.assertEqual(received.id, message.id)
        self.assertEqual(received.topic, TOPIC)
        self.assertEqual(received.body, {"pkg": "kernel", "text": "é"})
        self.assertEqual(got.headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(got.headers[b"X-Fedhub-Topic"], [TOPIC.encode()])
        self.assertEqual(got.headers[b"X-Fedhub-Message-Id"], [message.id.encode()])
        self.assertEqual(got.headers[b"X-Team"], [b"infra"])
        self.assertEqual(got.headers[b"User-Agent"], [f"fedhub/{fedhub.__version__}".encode()])
        self.assertNotIn(b"Authorization", got.headers)

    @inlineCallbacks
    def test_connections_reused(self) -> Any:
        """Several messages go over one kept-alive connection."""
        harness = self.harness()
        for n in range(3):
            settled: Settled = yield harness.deliver(TOPIC, {"n": n})
            self.assertEqual(settled.outcome, "acked")
        self.assertEqual(len(self.hook.received), 3)
        self.assertEqual(self.site.accepted, 1)

    @inlineCallbacks
    def test_connection_closed_before_answer(self) -> Any:
        """A connection closed before the answer is tried once more at once; twice is a retry."""
        harness = self.harness()
        self.hook.drop_next = 1
        settled: Settled = yield harness.deliver(TOPIC, {"n": 1})
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(len(self.hook.received), 2)
        self.hook.drop_next = 2
        settled = yield harness.deliver(TOPIC, {"n": 2})
        self.assertEqual(settled.outcome, "retried")
        self.assertEqual(len(self.hook.received), 4)

    @inlineCallbacks
    def test_long_answer_keeps_connection(self) -> Any:
        """A long answer body is read past the kept part; the connection is reused."""
        harness = self.harness()
        self.hook.answer = b"y" * 300000
        for _ in range(2):
            settled: Settled = yield harness.deliver(TOPIC, {})
            self.assertEqual(settled.outcome, "acked")
        self.assertEqual(self.site.accepted, 1)

    @inlineCallbacks
    def test_id_with_control_characters(self) -> Any:
        """A message id with CR/LF can not inject headers: it is escaped."""
        harness = self.harness()
        message = Message(topic=TOPIC, body={}, id="abc\r\nX-Injected: 1")
        settled: Settled = yield harness.deliver(message)
        self.assertEqual(settled.outcome, "acked")
        (got,) = self.hook.received
        self.assertNotIn(b"X-Injected", got.headers)
        self.assertEqual(got.headers[b"X-Fedhub-Message-Id"], [b"abc\\r\\nX-Injected: 1"])

    @inlineCallbacks
    def test_header_name_not_utf8(self) -> Any:
        """A message whose header name was not UTF-8 on the wire is posted, and reads back."""
        harness = self.harness()
        odd = from_amqp(TOPIC, {"headers": {"\udcffname": "x"}}, b'{"n": 1}')
        settled: Settled = yield harness.deliver(odd)
        self.assertEqual(settled.outcome, "acked")
        (received,) = loads(self.hook.received[0].body)
        self.assertEqual(received.headers["\udcffname"], "x")

    @inlineCallbacks
    def test_huge_retry_after_on_success(self) -> Any:
        """A 2xx answer acks whatever its Retry-After header holds."""
        harness = self.harness()
        self.hook.answer_headers = {b"Retry-After": b"9" * 5000}
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(len(self.hook.received), 1)

    @inlineCallbacks
    def test_authorization_file(self) -> Any:
        """The Authorization header comes from its file."""
        secret = Path(self.mktemp())
        secret.write_text("Bearer t0ken\n")
        harness = self.harness({"authorization_file": str(secret)})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(self.hook.received[0].headers[b"Authorization"], [b"Bearer t0ken"])

    def test_authorization_file_must_be_one_line(self) -> None:
        """An empty or multi-line authorization file is refused at start."""
        for text in ("", "a\nb\n"):
            secret = Path(self.mktemp())
            secret.write_text(text)
            harness = ConsumerHarness(WebhookPlugin(),
                                      {"url": self.url, "authorization_file": str(secret)})
            self.assertRaises(ConfigError, harness.handler.start)

    @inlineCallbacks
    def test_server_errors_retry(self) -> Any:
        """5xx answers are retries, the reason naming the status, without the URL's query."""
        harness = self.harness()
        for status in (500, 502, 503):
            self.hook.status = status
            self.hook.answer = b"backend down"
            settled: Settled = yield harness.deliver(TOPIC, {})
            self.assertEqual(settled.outcome, "retried", status)
            self.assertIn(f"HTTP {status}", settled.reason or "")
            self.assertIn("backend down", settled.reason or "")
            self.assertNotIn("s3cret", settled.reason or "")

    @inlineCallbacks
    def test_408_and_429_retry(self) -> Any:
        """408 and 429 are retries; Retry-After picks a retry queue that waits long enough."""
        harness = self.harness()
        self.hook.status = 408
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.hook.status = 429
        self.hook.answer_headers = {b"Retry-After": b"120"}
        settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        # Retry delays are 10, 20, 40, 80, 160 s: 120 s needs level 5.
        self.assertEqual(harness.bus.queue_depth("fedhub.test.retry.5"), 1)
        self.assertEqual(harness.bus.queue_depth("fedhub.test.retry.1"), 1)

    @inlineCallbacks
    def test_client_errors_dead_letter(self) -> Any:
        """Other 4xx answers dead-letter with the status and the start of the answer."""
        harness = self.harness()
        for status in (400, 404, 410, 422):
            self.hook.status = status
            self.hook.answer = b"missing field 'x'" + b"!" * 100000
            settled: Settled = yield harness.deliver(TOPIC, {})
            self.assertEqual(settled.outcome, "dead_lettered", status)
            self.assertIn(f"HTTP {status}", settled.reason or "")
            self.assertIn("missing field 'x'", settled.reason or "")
            self.assertLess(len(settled.reason or ""), 1000)

    @inlineCallbacks
    def test_redirect_dead_letters(self) -> Any:
        """A redirect is not followed: the message is dead-lettered."""
        harness = self.harness()
        self.hook.status = 302
        self.hook.answer_headers = {b"Location": b"http://127.0.0.1:1/elsewhere"}
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("redirect", settled.reason or "")
        self.assertEqual(len(self.hook.received), 1)

    @inlineCallbacks
    def test_redirect_target_without_credentials(self) -> Any:
        """A redirect's reason names its target without user, password or query."""
        harness = self.harness()
        self.hook.status = 307
        self.hook.answer_headers = {b"Location": b"http://user:pa55word@other.example:81/x?sig=abc"}
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("to http://other.example:81/x ", settled.reason or "")
        self.assertNotIn("pa55word", settled.reason or "")
        self.assertNotIn("sig=", settled.reason or "")

    @inlineCallbacks
    def test_answer_quoting_secrets(self) -> Any:
        """
        An answer quoting the request (its URL's token, its Authorization)
        is shown with those replaced, in the reason and the log.
        """
        secret = Path(self.mktemp())
        secret.write_text("Bearer t0ken-XYZ\n")
        echo = Echo()
        site = Tracking(echo)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(site.close_all)
        logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            # The test server's own access log shows the URL.
            if str(event.get("log_namespace", "")).startswith("fedhub."):
                logged.append(formatEvent(event) or "")

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        harness = self.harness({"url": f"http://127.0.0.1:{port.getHost().port}/hook?token=s3cret",
                                "authorization_file": str(secret)})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "dead_lettered")
        reason = settled.reason or ""
        self.assertIn("HTTP 400 no good: /hook?***", reason)
        self.assertIn("Authorization: ***", reason)
        self.assertIn("URL /hook?***", reason)
        text = reason + "\n".join(logged)
        self.assertIn("Authorization: ***", "\n".join(logged))
        for leak in ("s3cret", "t0ken"):
            self.assertNotIn(leak, text)

    @inlineCallbacks
    def test_status_past_5xx_dead_letters(self) -> Any:
        """A status of 600 or more, which HTTP does not define, is dead-lettered."""
        url = self.raw_server(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n")
        harness = self.harness({"url": url})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("HTTP 999 Odd", settled.reason or "")

    @inlineCallbacks
    def test_no_answer_times_out(self) -> Any:
        """A server that never answers makes a retry after the timeout."""
        self.hook.hang = True
        harness = self.harness({"timeout": 0.5})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("no answer", settled.reason or "")
        self.assertEqual(len(self.hook.received), 1)

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        """A refused connection is a retry."""
        spare = reactor.listenTCP(0, Tracking(Hook()), interface="127.0.0.1")
        port = spare.getHost().port
        yield spare.stopListening()
        harness = ConsumerHarness(WebhookPlugin(), {"url": f"http://127.0.0.1:{port}/"},
                                  reactor=reactor)
        harness.start()
        self.addCleanup(harness.stop)
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("refused", (settled.reason or "").lower())

    def raw_server(self, answer: bytes) -> str:
        """
        The URL of a server that reads a request, writes C{answer} and
        closes the connection.
        """

        class Answering(Protocol):
            received = b""

            def dataReceived(self, data: bytes) -> None:
                self.received += data
                head, found, body = self.received.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if found and length is not None and len(body) >= int(length.group(1)):
                    self.transport.write(answer)
                    self.transport.loseConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(Answering), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    @inlineCallbacks
    def test_success_cut_off_retries(self) -> Any:
        """A 2xx whose body the connection cut off is a retry: it may not have been one."""
        url = self.raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        harness = self.harness({"url": url})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("HTTP 200 OK", settled.reason or "")
        self.assertIn("cut off", settled.reason or "")

    @inlineCallbacks
    def test_success_ended_by_close_acks(self) -> Any:
        """A 2xx without a length, whose end is the connection closing, is complete."""
        url = self.raw_server(b"HTTP/1.0 200 OK\r\n\r\nfine")
        harness = self.harness({"url": url})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "acked")

    @inlineCallbacks
    def test_error_cut_off_keeps_its_verdict(self) -> Any:
        """A 4xx cut off is still decided by its status."""
        url = self.raw_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\nno")
        harness = self.harness({"url": url})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "dead_lettered")
        self.assertIn("HTTP 400 Bad Request", settled.reason or "")

    @inlineCallbacks
    def test_stop_closes_connections(self) -> Any:
        """Stopping closes the connections kept for reuse."""
        harness = ConsumerHarness(WebhookPlugin(), {"url": self.url}, reactor=reactor)
        harness.start()
        yield harness.deliver(TOPIC, {})
        self.assertEqual(len(self.site.protocols), 1)
        yield harness.stop()
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.site.protocols), 0)
        handler = harness.handler
        assert isinstance(handler, WebhookHandler)
        self.assertEqual(handler.posted, 1)


class TLSTests(TestCase):
    """
    HTTPS: verified against a configured CA bundle, never unverified.
    """

    timeout = 60

    def setUp(self) -> None:
        self.ca_key, self.ca_cert = make_ca("fedhub test CA")
        server = ssl.PrivateCertificate.loadPEM(make_server_pem(self.ca_key, self.ca_cert))
        self.hook = Hook()
        self.site = Tracking(self.hook)
        self.port = reactor.listenSSL(0, self.site, server.options(), interface="127.0.0.1")
        self.addCleanup(self.close_server)
        self.port_number = self.port.getHost().port
        other = make_ca("another CA")[1]
        self.bundle = Path(self.mktemp())
        # Ours second: every certificate of a bundle must be trusted.
        self.bundle.write_bytes(pem(other) + pem(self.ca_cert))

    @inlineCallbacks
    def close_server(self) -> Any:
        """
        Close every server connection, then the port.
        """
        self.site.close_all()
        yield self.port.stopListening()
        yield deferLater(reactor, 0.01, lambda: None)

    def harness(self, options: Mapping[str, Any]) -> ConsumerHarness:
        """
        A started harness, stopped after the test.
        """
        harness = ConsumerHarness(WebhookPlugin(), options, reactor=reactor)
        harness.start()
        self.addCleanup(harness.stop)
        return harness

    @inlineCallbacks
    def test_configured_ca(self) -> Any:
        """With the CA bundle configured, the server is verified and the post succeeds."""
        harness = self.harness({"url": f"https://127.0.0.1:{self.port_number}/", "ca": str(self.bundle)})
        settled: Settled = yield harness.deliver(TOPIC, {"x": 1})
        self.assertEqual(settled.outcome, "acked")
        self.assertEqual(len(self.hook.received), 1)

    @inlineCallbacks
    def test_default_trust_refuses_unknown_ca(self) -> Any:
        """Without the CA, the system's trust store does not know the server: retried, nothing sent."""
        harness = self.harness({"url": f"https://127.0.0.1:{self.port_number}/"})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("certificate", (settled.reason or "").lower())
        self.assertEqual(self.hook.received, [])

    @inlineCallbacks
    def test_certificate_naming_no_host_refused(self) -> Any:
        """
        A certificate from the trusted CA that names no host (no
        subjectAltName) is refused: Twisted's own check lets it through.
        """
        nameless = ssl.PrivateCertificate.loadPEM(
            make_server_pem(self.ca_key, self.ca_cert, named=False))
        hook = Hook()
        port = reactor.listenSSL(0, Tracking(hook), nameless.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        harness = self.harness({"url": f"https://127.0.0.1:{port.getHost().port}/",
                                "ca": str(self.bundle)})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertEqual(hook.received, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_wrong_host_name(self) -> Any:
        """A certificate for another name is refused even from a trusted CA."""
        harness = self.harness({"url": f"https://localhost:{self.port_number}/",
                                "ca": str(self.bundle)})
        settled: Settled = yield harness.deliver(TOPIC, {})
        self.assertEqual(settled.outcome, "retried")
        self.assertEqual(self.hook.received, [])

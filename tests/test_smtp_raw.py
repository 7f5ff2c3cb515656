"""
Raw-socket adversaries against the Bugzilla mail listener over real
loopback TCP: the listener runs on port 0 with the real reactor, and clients
write bytes and read replies themselves (no SMTP client library), so
pipelining, TLS switches and connection limits behave as on the wire.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from fedhub.errors import TemporarilyUnavailable
from fedhub.producers.bugzilla.smtp import BugmailListener, ListenerSettings
from tests.broker import Authority
from tests.test_smtp_server import (
    CHANGED,
    RECIPIENT,
    FakePublisher,
    copy_for,
    dot_stuffed,
    envelope,
    sample,
    topic,
)

#: How long any single wait may take before the test fails (not a
#: measurement: a guard against hanging).
GUARD = 20.0


class RawClient(Protocol):
    """
    A client that writes raw bytes and collects raw replies.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost = False
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._poll()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self._poll()

    def _poll(self) -> None:
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate() or self.lost:
                self._waiters.remove(waiter)
                d.callback(None)

    def until(self, predicate: Callable[[], bool]) -> Deferred[None]:
        """
        Fire when C{predicate()} holds or the connection is lost.
        """
        if predicate() or self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((predicate, d))
        d.addTimeout(GUARD, reactor)
        return d

    def lines(self) -> list[bytes]:
        """
        Every complete reply line so far.
        """
        return self.received.split(b"\r\n")[:-1]

    def codes(self) -> list[int]:
        """
        The codes of every complete final reply line so far.
        """
        return [int(line[:3]) for line in self.lines() if line[3:4] == b" "]

    def replies(self, count: int) -> Deferred[None]:
        """
        Fire once C{count} final replies arrived (or the connection is lost).
        """
        return self.until(lambda: len(self.codes()) >= count)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def make_pki(directory: str) -> dict[str, str]:
    """
    A test CA, a server certificate for localhost/127.0.0.1 and a client
    certificate (the test PKI of L{tests.broker}), written as PEM files;
    returns their paths.
    """
    os.makedirs(directory, exist_ok=True)
    paths: dict[str, str] = {}

    def write(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
        return path

    def key_pem(key: Any) -> bytes:
        return bytes(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))

    ca = Authority.create("fedhub test CA")
    write("ca.pem", ca.certificate.public_bytes(serialization.Encoding.PEM))
    key, cert = ca.issue("localhost", server=True, dns=["localhost"], ips=["127.0.0.1"])
    write("server.pem", cert.public_bytes(serialization.Encoding.PEM))
    write("server.key", key_pem(key))
    key, cert = ca.issue("bugzilla-relay")
    write("client.pem", cert.public_bytes(serialization.Encoding.PEM) + key_pem(key))
    return paths


class RawSMTPTestCase(TestCase):
    """
    Starts a listener on a free loopback port and connects raw clients.
    """

    def start(self, **settings: Any) -> BugmailListener:
        self.publisher = FakePublisher()
        listener = BugmailListener.with_publisher(
            "tcp:0:interface=127.0.0.1",
            ListenerSettings(recipients=frozenset({RECIPIENT}), **settings),
            self.publisher,
            topic,
            reactor=reactor,
        )
        listener.startService()
        self.listener = listener
        self.clients: list[RawClient] = []
        self.addCleanup(self._stop)
        return listener

    @inlineCallbacks
    def _stop(self) -> Generator[Deferred[Any], Any, None]:
        for client in self.clients:
            if not client.lost and client.transport is not None:
                client.transport.loseConnection()
            yield client.until(lambda: False)
        factory = self.listener.factory
        while factory is not None and factory.sessions:
            yield deferLater(reactor, 0.01, lambda: None)
        yield self.listener.stopService()

    @inlineCallbacks
    def connect(self, source: str = "127.0.0.1") -> Generator[Deferred[Any], Any, RawClient]:
        port = yield self.listener.when_listening()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, bindAddress=(source, 0))
        client: RawClient = yield connectProtocol(endpoint, RawClient())
        self.clients.append(client)
        yield client.replies(1)
        return client

    @inlineCallbacks
    def send_mail(self, raw: bytes) -> Generator[Deferred[Any], Any, RawClient]:
        """
        One connection, one mail, QUIT; returns the client after its close.
        """
        client: RawClient = yield self.connect()
        client.send(envelope() + dot_stuffed(raw) + b"QUIT\r\n")
        yield client.until(lambda: client.lost)
        return client


class DeliveryTests(RawSMTPTestCase):
    """
    Mails over real sockets: accepted, de-duplicated, refused.
    """

    @inlineCallbacks
    def test_ordinary_bugmail(self) -> Generator[Deferred[Any], Any, None]:
        """An ordinary bugmail gets 250 and exactly one message with the right topic and body is published."""
        self.start()
        client = yield self.send_mail(sample(CHANGED))
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 250, 221])
        [message] = self.publisher.published
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update")
        self.assertEqual(message.body["bug_id"], 218297)
        self.assertEqual(message.body["event_type"], "changed")
        self.assertEqual(
            [(c["field"], c["removed"], c["added"]) for c in message.body["changes"]],
            [("Status", "RESOLVED", "REOPENED"), ("Resolution", "ANSWERED", "---")],
        )

    @inlineCallbacks
    def test_three_copies_publish_once(self) -> Generator[Deferred[Any], Any, None]:
        """Three copies of one bugmail to three recipients (different To/Message-ID) publish once."""
        self.start()
        raw = sample(CHANGED)
        for n, reason in enumerate(("AssignedTo", "CC", "None")):
            copy = copy_for(raw, f"user{n}@example.net", f"bug-218297-{n}-XXXXXXXXXX@bz.example/", reason)
            client = yield self.send_mail(copy)
            self.assertEqual(client.codes()[-2:], [250, 221])
        self.assertEqual(len(self.publisher.published), 1)

    @inlineCallbacks
    def test_temporarily_unavailable_451(self) -> Generator[Deferred[Any], Any, None]:
        """A publisher raising TemporarilyUnavailable makes the listener answer 451, never 550."""
        self.start()
        self.publisher.failure = TemporarilyUnavailable("the outbox is not running")
        client = yield self.send_mail(sample(CHANGED))
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 451, 221])
        self.assertNotIn(550, client.codes())

    @inlineCallbacks
    def test_size_552(self) -> Generator[Deferred[Any], Any, None]:
        """SIZE over the limit and a body over the limit both get 552; nothing is published."""
        self.start(max_message_size=4096)
        client = yield self.connect()
        client.send(b"EHLO raw\r\nMAIL FROM:<a@b.example> SIZE=5000\r\n")
        yield client.replies(3)
        self.assertEqual(client.codes()[-1], 552)
        client.send(envelope() + b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200 + b".\r\n")
        yield client.replies(8)
        self.assertEqual(client.codes()[-5:], [250, 250, 250, 354, 552])
        self.assertEqual(self.publisher.published, [])

    @inlineCallbacks
    def test_unparsable_address_reply_short(self) -> Generator[Deferred[Any], Any, None]:
        """
        The 553 for an address that can not be parsed stays one short line
        (RFC 5321 allows 512 octets), however long the address.
        """
        self.start()
        client = yield self.connect()
        client.send(b"EHLO raw\r\nMAIL FROM:<a@b.example>\r\n"
                    b"RCPT TO:<a@example.org" + b",x" * 900 + b">\r\n")
        yield client.replies(4)
        self.assertEqual(client.codes()[-1], 553)
        self.assertLessEqual(len(client.lines()[-1]), 512)

    @inlineCallbacks
    def test_unknown_recipient(self) -> Generator[Deferred[Any], Any, None]:
        """An unknown recipient and a relay attempt are refused, and DATA without a recipient too."""
        self.start()
        client = yield self.connect()
        client.send(b"EHLO raw\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<postmaster@example.org>\r\n"
                    b"RCPT TO:<victim@elsewhere.example>\r\nDATA\r\n")
        yield client.replies(6)
        self.assertEqual(client.codes(), [220, 250, 250, 550, 550, 503])
        self.assertIn(b"550 5.7.1 Relaying denied", client.lines())


class InjectionTests(RawSMTPTestCase):
    """
    Attempts to make mail text run as commands.
    """

    @inlineCallbacks
    def test_long_data_line_injection(self) -> Generator[Deferred[Any], Any, None]:
        """Commands after a DATA line longer than 16384 bytes are not executed and nothing is published from them."""
        self.start()
        client = yield self.connect()
        injected = (
            b"MAIL FROM:<evil@attacker.example>\r\n"
            b"RCPT TO:<bugs@example.org>\r\n"
            b"DATA\r\n"
            + dot_stuffed(sample(CHANGED))[:-3]
        )
        client.send(envelope() + b"Subject: hello\r\n\r\n" + b"Z" * 20_000 + b"\r\n")
        yield client.replies(5)
        # A separate write, so the listener reads it after the long line as a
        # relay's later packets would arrive (stock twisted.mail would by then
        # be back in command mode and run it).
        yield deferLater(reactor, 0.05, lambda: None)
        client.send(injected + b".\r\n")
        yield client.replies(6)
        # Give the listener the chance to answer anything it (wrongly) ran.
        client.send(b"NOOP\r\n")
        yield client.replies(7)
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 500, 250])
        self.assertIn(b"500 5.5.2 Line too long (limit 10000 bytes)", client.lines())
        self.assertEqual(self.publisher.published, [])

    @inlineCallbacks
    def test_starttls_pipelining_discarded(self) -> Generator[Deferred[Any], Any, None]:
        """Plaintext pipelined after STARTTLS is discarded, not executed inside the TLS session."""
        pki = make_pki(self.mktemp())
        self.start(tls_certificate=pki["server.pem"], tls_key=pki["server.key"])
        client = yield self.connect()
        client.send(b"EHLO raw\r\n")
        yield client.replies(2)
        self.assertIn(b"250 STARTTLS", client.lines())
        client.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<bugs@example.org>\r\n")
        yield client.replies(3)
        self.assertEqual(client.lines()[-1], b"220 2.0.0 Ready to start TLS")
        trust = Certificate.loadPEM(open(pki["ca.pem"], "rb").read())
        assert client.transport is not None
        client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
        # Inside TLS: RCPT must find no sender, so the injected MAIL never ran.
        client.send(b"RCPT TO:<bugs@example.org>\r\nEHLO raw\r\n")
        yield client.replies(5)
        self.assertEqual(client.codes()[3:], [503, 250])
        self.assertNotIn(b"250-STARTTLS", client.lines()[client.lines().index(b"220 2.0.0 Ready to start TLS"):])
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                    + dot_stuffed(sample(CHANGED)))
        yield client.replies(9)
        self.assertEqual(client.codes()[5:], [250, 250, 354, 250])
        self.assertEqual(len(self.publisher.published), 1)

    @inlineCallbacks
    def test_nothing_runs_after_closing_over_tls(self) -> Generator[Deferred[Any], Any, None]:
        """
        Over TLS as over plaintext, commands sent after the session's closing
        reply (221 after QUIT, 421 after too many errors) are not run: a
        mail in them is not published.
        """
        pki = make_pki(self.mktemp())
        self.start(tls_certificate=pki["server.pem"], tls_key=pki["server.key"])
        trust = Certificate.loadPEM(open(pki["ca.pem"], "rb").read())
        mail = (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                + dot_stuffed(sample(CHANGED)))
        for closing, code in ((b"QUIT\r\n", 221), (b"BOGUS\r\n" * 20, 421)):
            client = yield self.connect()
            client.send(b"EHLO raw\r\nSTARTTLS\r\n")
            yield client.replies(3)
            assert client.transport is not None
            client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
            client.send(b"EHLO raw\r\n" + closing + mail)
            yield client.until(lambda: client.lost)
            self.assertEqual(client.codes()[-1], code)
            self.assertNotIn(354, client.codes())
        self.assertEqual(self.publisher.published, [])

    @inlineCallbacks
    def test_client_certificate_required(self) -> Generator[Deferred[Any], Any, None]:
        """With a client CA, MAIL before TLS gets 530, a TLS client without a certificate is refused and one with a certificate is served."""
        pki = make_pki(self.mktemp())
        self.start(tls_certificate=pki["server.pem"], tls_key=pki["server.key"], tls_client_ca=pki["ca.pem"])
        trust = Certificate.loadPEM(open(pki["ca.pem"], "rb").read())

        client = yield self.connect()
        client.send(b"EHLO raw\r\nMAIL FROM:<a@b.example>\r\nSTARTTLS\r\n")
        yield client.replies(4)
        self.assertEqual(client.codes()[1:], [250, 530, 220])
        assert client.transport is not None
        client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
        client.send(b"EHLO raw\r\nMAIL FROM:<a@b.example>\r\n")
        yield client.until(lambda: client.lost)
        self.assertEqual(len(client.codes()), 4)

        identity = PrivateCertificate.loadPEM(open(pki["client.pem"], "rb").read())
        good = yield self.connect()
        good.send(b"EHLO raw\r\nSTARTTLS\r\n")
        yield good.replies(3)
        assert good.transport is not None
        good.transport.startTLS(
            optionsForClientTLS("localhost", trustRoot=trust, clientCertificate=identity)
        )
        good.send(envelope() + dot_stuffed(sample(CHANGED)))
        yield good.replies(8)
        self.assertEqual(good.codes()[3:], [250, 250, 250, 354, 250])
        self.assertEqual(len(self.publisher.published), 1)


class ConnectionLimitTests(RawSMTPTestCase):
    """
    The listener's own connection limiter, per peer and overall.
    """

    @inlineCallbacks
    def test_per_peer_limit(self) -> Generator[Deferred[Any], Any, None]:
        """A third connection from one address gets 421 and is closed; another address is still served; a freed slot is reused."""
        self.start(max_connections_per_peer=2)
        first = yield self.connect()
        yield self.connect()
        third = yield self.connect()
        yield third.until(lambda: third.lost)
        self.assertEqual(third.lines(), [b"421 4.7.0 Too many connections from your address, try again later"])
        other = yield self.connect("127.0.0.2")
        self.assertEqual(other.codes(), [220])
        assert first.transport is not None
        first.transport.loseConnection()
        factory = self.listener.factory
        assert factory is not None
        while factory.connections_from("127.0.0.1") > 1:
            yield deferLater(reactor, 0.01, lambda: None)
        again = yield self.connect()
        self.assertEqual(again.codes(), [220])

    @inlineCallbacks
    def test_overall_limit(self) -> Generator[Deferred[Any], Any, None]:
        """Beyond max_connections, a connection from any address gets 421."""
        self.start(max_connections=2, max_connections_per_peer=10)
        yield self.connect("127.0.0.1")
        yield self.connect("127.0.0.2")
        third = yield self.connect("127.0.0.3")
        yield third.until(lambda: third.lost)
        self.assertEqual(third.lines(), [b"421 4.7.0 Too many connections, try again later"])

    @inlineCallbacks
    def test_slot_held_until_hand_over_ends(self) -> Generator[Deferred[Any], Any, None]:
        """A client that leaves after a 451 for a slow hand-over keeps its slot until the hand-over ends, then the slot is free again."""
        self.start(max_connections=1, delivery_timeout=0.2)
        self.publisher.hold = True

        def release() -> None:
            # Whatever the test's outcome, let the listener stop.
            self.publisher.hold = False
            for _, held in self.publisher.held:
                if not held.called:
                    held.callback(None)

        self.addCleanup(release)
        first = yield self.connect()
        first.send(envelope() + dot_stuffed(sample(CHANGED)))
        yield first.until(lambda: first.codes()[-1:] == [451])
        first.send(b"QUIT\r\n")
        yield first.until(lambda: first.lost)
        self.assertEqual(first.codes()[-1], 221)
        refused = yield self.connect()
        self.assertEqual(refused.lines(), [b"421 4.7.0 Too many connections, try again later"])
        yield refused.until(lambda: refused.lost)
        self.assertEqual(len(self.publisher.held), 1)
        release()
        factory = self.listener.factory
        assert factory is not None
        self.assertEqual(factory.sessions, set())
        again = yield self.connect()
        self.assertEqual(again.codes(), [220])
        self.assertEqual(len(self.publisher.published), 1)


class CommandLimitTests(RawSMTPTestCase):
    """
    C{max_commands_per_mail} against clients that send mail over and over.
    """

    #: One mail's commands, pipelined: MAIL, RCPT and DATA.
    ENVELOPE = b"MAIL FROM:<>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"

    @inlineCallbacks
    def mails(self, client: RawClient, data: bytes, count: int) -> Generator[Deferred[Any], Any, None]:
        """
        Send C{count} mails with the body C{data} (dot-stuffed, ended by its
        lone dot), each once the previous one was answered, until the
        connection is lost.
        """
        for _ in range(count):
            if client.lost:
                return
            answered = len(client.codes()) + 4
            client.send(self.ENVELOPE + data)
            yield client.replies(answered)

    @inlineCallbacks
    def test_refused_mails_closed(self) -> Generator[Deferred[Any], Any, None]:
        """A client sending empty mails over and over (each refused 550) is closed with 421 once its commands pass max_commands_per_mail: a refused mail does not start the count again."""
        self.start(max_recipients=1, max_commands_per_mail=8)
        client = yield self.connect()
        yield self.mails(client, b".\r\n", 10)
        if not client.lost:
            client.send(b"QUIT\r\n")
        yield client.until(lambda: client.lost)
        # Three commands a mail: the third mail's DATA is the ninth command.
        self.assertEqual(client.codes(), [220, 250, 250, 354, 550, 250, 250, 354, 550, 250, 250, 421])
        self.assertEqual(client.lines()[-1],
                         b"421 4.7.0 Too many commands without a mail, closing connection")
        self.assertEqual(self.publisher.published, [])

    @inlineCallbacks
    def test_taken_mails_not_closed(self) -> Generator[Deferred[Any], Any, None]:
        """A client sending mails that are taken (250: published, then duplicates) over and over is never closed by max_commands_per_mail."""
        self.start(max_recipients=1, max_commands_per_mail=8)
        client = yield self.connect()
        yield self.mails(client, dot_stuffed(sample(CHANGED)), 10)
        client.send(b"QUIT\r\n")
        yield client.until(lambda: client.lost)
        self.assertEqual(client.codes(), [220] + [250, 250, 354, 250] * 10 + [221])
        self.assertEqual(len(self.publisher.published), 1)

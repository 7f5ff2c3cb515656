"""
Tests for L{fedhub.producers.bugzilla.smtp}: the SMTP sessions of the
Bugzilla mail listener, driven in memory (C{StringTransport} and C{Clock}):
recipients, limits, timeouts, the answers to every kind of hand-over result,
the shared secret, connection limits and the listener service.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any, cast, get_args, get_type_hints

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.errors import MessageError, PublishError, TemporarilyUnavailable
from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.producers.bugzilla.parser import parse_bugmail
from fedhub.producers.bugzilla.producer import (
    Accepted,
    BugmailIntake,
    EventPublisher,
    IBugmailIntake,
    Quarantine,
    Refusal,
)
from fedhub.producers.bugzilla.smtp import (
    COUNTERS,
    BugmailListener,
    BugmailSMTP,
    BugmailSMTPFactory,
    ListenerSettings,
    SecretMismatch,
    settings_from_options,
    strip_secret_header,
)

DATA = Path(__file__).parent / "data" / "bugzilla"
RECIPIENT = "bugs@example.org"
CHANGED = "04_changed_status_resolution_with_comment.eml"
NEW = "01_new_bug_textplain_attachment.eml"
NOT_BUGMAIL = "14_not_bugzilla_launchpad_bug_mail.eml"


def sample(name: str) -> bytes:
    """
    A sample mail with CRLF line endings, as it arrives over SMTP.
    """
    return (DATA / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def copy_for(raw: bytes, to: str, message_id: str, reason: str = "CC") -> bytes:
    """
    The copy of a bugmail Bugzilla sends to another recipient: its own To,
    Message-ID and reason headers.
    """
    raw = re.sub(rb"(?m)^To:[^\r\n]*", b"To: " + to.encode(), raw, count=1)
    raw = re.sub(rb"(?m)^Message-ID:[^\r\n]*", b"Message-ID: <" + message_id.encode() + b">", raw, count=1)
    return re.sub(rb"(?m)^X-Bugzilla-Reason:[^\r\n]*", b"X-Bugzilla-Reason: " + reason.encode(), raw, count=1)


def dot_stuffed(raw: bytes) -> bytes:
    """
    A mail as the DATA phase carries it: dot-stuffed, ended by a lone dot.
    """
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    lines = raw[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def envelope(recipients: tuple[str, ...] = (RECIPIENT,), sender: str = "bugzilla-daemon@bugzilla.example") -> bytes:
    """
    EHLO, MAIL, RCPT and DATA commands, pipelined.
    """
    commands = [b"EHLO client.example", b"MAIL FROM:<" + sender.encode() + b">"]
    commands += [b"RCPT TO:<" + r.encode() + b">" for r in recipients]
    commands.append(b"DATA")
    return b"".join(c + b"\r\n" for c in commands)


def topic(suffix: str) -> str:
    """
    The topics of the tests' hub.
    """
    return "org.example.test." + suffix


@implementer(IPublisher)
class FakePublisher:
    """
    A publisher that records what it gets; it can fail every hand-over or
    hold them until the test fires them.
    """

    domain = "test"

    def __init__(self) -> None:
        self.published: list[Message] = []
        self.failure: Exception | None = None
        self.hold = False
        self.held: list[tuple[Message, Deferred[None]]] = []

    def publish(self, message: Message) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append((message, d))

            def stored(result: None) -> None:
                self.published.append(message)

            d.addCallback(stored)
            return d
        self.published.append(message)
        return succeed(None)


class Client:
    """
    One SMTP session over a C{StringTransport}.
    """

    def __init__(self, factory: BugmailSMTPFactory, host: str, port: int) -> None:
        address: IPv4Address | IPv6Address = (
            IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        )
        protocol = factory.buildProtocol(address)
        assert protocol is not None
        self.protocol = cast(BugmailSMTP, protocol)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8025), peerAddress=address
        )
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def replies(self) -> list[bytes]:
        """
        Every reply line sent since the last call.
        """
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def codes(self) -> list[int]:
        """
        The codes of the final reply lines sent since the last call.
        """
        return [int(line[:3]) for line in self.replies() if line[3:4] != b"-"]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        """
        End the connection as the reactor would.
        """
        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Harness:
    """
    A listener factory with a real intake and publisher pipeline, a fake
    publisher and a fake clock.
    """

    def __init__(
        self,
        settings: ListenerSettings | None = None,
        *,
        secret: bytes | None = None,
        quarantine_dir: str | None = None,
        quarantine_max_files: int = 10,
        intake: Any = None,
    ) -> None:
        self.clock = Clock()
        self.publisher = FakePublisher()
        quarantine = None
        if quarantine_dir is not None:
            quarantine = Quarantine(quarantine_dir, quarantine_max_files, 10**7, self.clock)
        self.intake = intake or BugmailIntake(
            EventPublisher(self.publisher, topic), clock=self.clock, quarantine=quarantine
        )
        self.settings = settings or ListenerSettings(recipients=frozenset({RECIPIENT}))
        self.factory = BugmailSMTPFactory(self.settings, self.intake, self.clock, secret=secret)
        self.clients: list[Client] = []
        self._port = 40000

    def connect(self, host: str = "127.0.0.1") -> Client:
        self._port += 1
        client = Client(self.factory, host, self._port)
        self.clients.append(client)
        return client

    def close_all(self) -> None:
        for client in self.clients:
            if client.protocol in self.factory.sessions:
                client.close()


@implementer(IBugmailIntake)
class RecordingIntake:
    """
    An intake that records the raw mails it gets and answers with a
    configurable result.
    """

    producer = "test"

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.result: Deferred[Accepted] | None = None

    def receive(self, raw: bytes, source: str = "") -> Deferred[Accepted]:
        self.received.append(raw)
        if self.result is not None:
            return self.result
        return succeed(Accepted("published", None, None, "id-1"))


class SessionTests(SynchronousTestCase):
    """
    The ordinary conversation and the answers to each hand-over result.
    """

    def setUp(self) -> None:
        self.harness = Harness()
        self.addCleanup(self.harness.close_all)

    def test_greeting_and_extensions(self) -> None:
        """The greeting is 220 and EHLO advertises SIZE, 8BITMIME, PIPELINING but no AUTH or STARTTLS without TLS."""
        client = self.harness.connect()
        self.assertEqual(client.replies(), [b"220 localhost ESMTP ready"])
        client.send(b"EHLO client.example\r\n")
        lines = client.replies()
        self.assertEqual(lines[0], b"250-localhost")
        self.assertIn(b"250-SIZE 1048576", lines)
        self.assertIn(b"250-8BITMIME", lines)
        self.assertIn(b"250-PIPELINING", lines)
        self.assertFalse(any(b"AUTH" in line or b"STARTTLS" in line for line in lines))

    def test_bugmail_published_once_with_topic_and_body(self) -> None:
        """An ordinary bugmail gets 250 and exactly one message with the update topic and the mail's body."""
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 250])
        [message] = self.harness.publisher.published
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update")
        self.assertEqual(message.schema, "fedhub.bugzilla.mail.v1")
        self.assertEqual(message.body["bug_id"], 218297)
        self.assertEqual(message.body["status"], "REOPENED")

    def test_new_bug_topic(self) -> None:
        """A new-bug mail is published on bugzilla.bug.new."""
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(NEW)))
        [message] = self.harness.publisher.published
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.new")

    def test_250_only_after_hand_over_fired(self) -> None:
        """No reply comes for a mail until the publisher's Deferred fires, and then it is 250."""
        self.harness.publisher.hold = True
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354])
        self.assertEqual(client.transport.producerState, "paused")
        [(message, d)] = self.harness.publisher.held
        d.callback(None)
        replies = client.replies()
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Ok: published as " + message.id.encode()))
        self.assertEqual(client.transport.producerState, "producing")

    def test_pipelined_commands_wait_for_the_answer(self) -> None:
        """A QUIT pipelined after the mail is answered only after the mail's 250, in order."""
        self.harness.publisher.hold = True
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)) + b"QUIT\r\n")
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354])
        self.assertFalse(client.closed)
        self.harness.publisher.held[0][1].callback(None)
        self.assertEqual(client.codes(), [250, 221])
        self.assertTrue(client.closed)

    def test_temporarily_unavailable_answers_451(self) -> None:
        """A publisher failing with TemporarilyUnavailable gets 451 4.3.0, never a 5xx."""
        self.harness.publisher.failure = TemporarilyUnavailable("the broker is away")
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        replies = client.replies()
        self.assertTrue(replies[-1].startswith(b"451 4.3.0 "), replies[-1])
        self.assertEqual(self.harness.publisher.published, [])

    def test_outbox_full_answers_452(self) -> None:
        """A full outbox (the reason says so) gets 452 4.3.1 insufficient storage."""
        self.harness.publisher.failure = TemporarilyUnavailable(
            "the outbox of domain test is full: 10 messages waiting (limit 10)"
        )
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertTrue(client.replies()[-1].startswith(b"452 4.3.1 "))

    def test_retry_after_451_is_published(self) -> None:
        """After a 451 the same mail sent again is published (the failed attempt is not remembered)."""
        self.harness.publisher.failure = TemporarilyUnavailable("later")
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes()[-1], 451)
        self.harness.publisher.failure = None
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n" + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [250, 250, 354, 250])
        self.assertEqual(len(self.harness.publisher.published), 1)

    def test_unexpected_error_answers_451(self) -> None:
        """An unexpected exception in the hand-over is logged and answered 451, so the mail is retried."""
        self.harness.publisher.failure = RuntimeError("bug")
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertTrue(client.replies()[-1].startswith(b"451 4.3.0 "))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_permanent_publish_error_answers_554(self) -> None:
        """A PublishError that is not temporary is answered 554 5.3.0 with the reason."""
        self.harness.publisher.failure = PublishError("larger than the whole outbox")
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.replies()[-1], b"554 5.3.0 larger than the whole outbox")

    def test_invalid_message_answers_550(self) -> None:
        """A message the publisher calls invalid is answered 550 5.6.0."""
        self.harness.publisher.failure = MessageError("no good")
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.replies()[-1], b"550 5.6.0 no good")

    def test_not_bugmail_answers_550_with_reason(self) -> None:
        """Mail that is not Bugzilla's is refused permanently (550 5.6.0) with the parser's reason."""
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(NOT_BUGMAIL)))
        last = client.replies()[-1]
        self.assertTrue(last.startswith(b"550 5.6.0 Launchpad bug mail"), last)
        self.assertEqual(self.harness.publisher.published, [])

    def test_malformed_answers_550(self) -> None:
        """Bugzilla mail that can not be understood is refused with 550 5.6.0."""
        raw = b"X-Bugzilla-Type: changed\r\nX-Bugzilla-URL: https://b.example/\r\nSubject: hi\r\n\r\nbody\r\n"
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(raw))
        self.assertTrue(client.replies()[-1].startswith(b"550 5.6.0 "))

    def test_reply_reason_is_one_safe_line(self) -> None:
        """A refusal reason with CR, LF and non-ASCII text is sent as one line of printable ASCII."""
        intake = RecordingIntake()
        intake.result = fail(MessageError("bad\r\n250 forged\u00e9"))
        harness = Harness(intake=intake)
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        replies = client.replies()
        self.assertEqual(replies[-1][:10], b"550 5.6.0 ")
        self.assertFalse(any(line.startswith(b"250 forged") for line in replies))
        self.assertTrue(all(32 <= c < 127 for c in replies[-1]))
        harness.close_all()

    def test_multiple_recipients_one_mail(self) -> None:
        """A mail for several accepted recipients is handed over once."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT, "other@example.org"}))
        intake = RecordingIntake()
        harness = Harness(settings, intake=intake)
        client = harness.connect()
        client.send(envelope((RECIPIENT, "Other@Example.org")) + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [220, 250, 250, 250, 250, 354, 250])
        self.assertEqual(len(intake.received), 1)
        harness.close_all()

    def test_mail_arrives_unstuffed_with_crlf(self) -> None:
        """The intake gets the mail with dot-stuffing removed and CRLF line ends."""
        intake = RecordingIntake()
        harness = Harness(intake=intake)
        client = harness.connect()
        client.send(envelope() + b"Subject: x\r\n\r\n..leading dot\r\nend\r\n.\r\n")
        self.assertEqual(intake.received, [b"Subject: x\r\n\r\n.leading dot\r\nend\r\n"])
        harness.close_all()

    def test_three_copies_publish_once(self) -> None:
        """Three copies of one event to three recipients (different To and Message-ID) publish one message."""
        raw = sample(CHANGED)
        copies = [
            copy_for(raw, "a@example.net", "bug-218297-1-AAAAAAAAAA@https.bugzilla.kernel.org/", "AssignedTo"),
            copy_for(raw, "b@example.net", "bug-218297-2-BBBBBBBBBB@https.bugzilla.kernel.org/", "CC"),
            copy_for(raw, "c@example.net", "bug-218297-3-CCCCCCCCCC@https.bugzilla.kernel.org/", "None"),
        ]
        self.assertEqual(len(set(copies)), 3)
        codes = []
        for copy in copies:
            client = self.harness.connect()
            client.send(envelope() + dot_stuffed(copy))
            codes.append(client.codes()[-1])
        self.assertEqual(codes, [250, 250, 250])
        self.assertEqual(len(self.harness.publisher.published), 1)

    def test_copy_during_hand_over_waits(self) -> None:
        """A copy arriving while the first is handed over is answered 250 when the first is, and not published again."""
        self.harness.publisher.hold = True
        raw = sample(CHANGED)
        first, second = self.harness.connect(), self.harness.connect()
        first.send(envelope() + dot_stuffed(copy_for(raw, "a@example.net", "m1@x")))
        second.send(envelope() + dot_stuffed(copy_for(raw, "b@example.net", "m2@x")))
        self.assertEqual(first.codes()[-1], 354)
        self.assertEqual(second.codes()[-1], 354)
        self.assertEqual(len(self.harness.publisher.held), 1)
        self.harness.publisher.held[0][1].callback(None)
        self.assertEqual(first.codes(), [250])
        self.assertEqual(second.replies()[0][:22], b"250 2.0.0 Ok: already ")
        self.assertEqual(len(self.harness.publisher.published), 1)

    def test_copy_during_failed_hand_over_fails_too(self) -> None:
        """When the first copy's hand-over fails temporarily, the waiting copy gets 451 as well."""
        self.harness.publisher.hold = True
        raw = sample(CHANGED)
        first, second = self.harness.connect(), self.harness.connect()
        first.send(envelope() + dot_stuffed(copy_for(raw, "a@example.net", "m1@x")))
        second.send(envelope() + dot_stuffed(copy_for(raw, "b@example.net", "m2@x")))
        self.harness.publisher.held[0][1].errback(TemporarilyUnavailable("disk trouble"))
        self.assertEqual(first.codes()[-1], 452)
        self.assertEqual(second.codes()[-1], 452)
        self.assertEqual(self.harness.publisher.published, [])

    def test_rset_noop_vrfy_auth(self) -> None:
        """RSET and NOOP answer 250, VRFY and AUTH are not offered (502)."""
        client = self.harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<bugs@example.org>\r\n"
                    b"NOOP\r\nVRFY bugs\r\nAUTH PLAIN AAAA\r\n")
        self.assertEqual(client.codes(), [220, 250, 250, 250, 503, 250, 502, 502])

    def test_null_sender_accepted(self) -> None:
        """The null reverse path MAIL FROM:<> is accepted."""
        client = self.harness.connect()
        client.send(b"HELO c\r\nMAIL FROM:<>\r\n")
        self.assertEqual(client.codes(), [220, 250, 250])

    def test_helo_needs_a_name(self) -> None:
        """HELO and EHLO without an argument are syntax errors."""
        client = self.harness.connect()
        client.send(b"HELO\r\nEHLO \r\n")
        self.assertEqual(client.codes(), [220, 501, 501])

    def test_sequence_errors(self) -> None:
        """DATA before RCPT, RCPT before MAIL and a second MAIL are refused with 503."""
        client = self.harness.connect()
        client.send(b"EHLO c\r\nDATA\r\nRCPT TO:<bugs@example.org>\r\nMAIL FROM:<a@b.example>\r\n"
                    b"MAIL FROM:<a@b.example>\r\nDATA\r\n")
        self.assertEqual(client.codes(), [220, 250, 503, 503, 250, 503, 503])

    def test_non_ascii_command_is_a_syntax_error(self) -> None:
        """A command word with bytes other than ASCII letters gets 500 and the session goes on."""
        client = self.harness.connect()
        client.send(b"\xff\xfeHELO x\r\nNOOP\r\n")
        self.assertEqual(client.codes(), [220, 500, 250])

    def test_info_logs_have_peer_and_msg_id_but_no_body(self) -> None:
        """The accept log line names the peer and msg_id, and no log event at info or above carries the mail text."""
        events: list[dict[str, Any]] = []
        self.patch(BugmailSMTP, "log", Logger(observer=cast(ILogObserver, events.append)))
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        [message] = self.harness.publisher.published
        accepted = [e for e in events if e.get("msg_id") == message.id]
        self.assertEqual(len(accepted), 1)
        self.assertEqual(accepted[0]["peer"], client.protocol.peer)
        comment = message.body["comment"]["text"]
        for event in events:
            if event["log_level"] >= LogLevel.info:
                self.assertNotIn(comment[:40], formatEvent(event))


class CounterTests(SynchronousTestCase):
    """
    The factory's event counters, for metrics.
    """

    def test_counts(self) -> None:
        """Published, duplicate, refused mails, refused recipients and refused connections are counted."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), max_connections_per_peer=1))
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                    + dot_stuffed(sample(CHANGED)))
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n" + dot_stuffed(sample(NOT_BUGMAIL)))
        harness.publisher.failure = TemporarilyUnavailable("later")
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n" + dot_stuffed(sample(NEW)))
        harness.connect()
        counted = {"connections": 1, "mails_published": 1, "mails_duplicate": 1, "recipients_refused": 1,
                   "mails_refused_content": 1, "mails_refused_unavailable": 1,
                   "connections_refused_peer_limit": 1}
        # Every other counter is there, at 0, from the start.
        self.assertEqual(dict(harness.factory.counters), {**dict.fromkeys(COUNTERS, 0), **counted})
        harness.close_all()

    def test_every_refusal_kind_counted_from_the_start(self) -> None:
        """The counters a listener starts with cover every kind of refusal the intake gives."""
        kinds = get_args(get_type_hints(Refusal)["kind"])
        self.assertTrue(kinds)
        for kind in kinds:
            self.assertIn(f"mails_refused_{kind}", COUNTERS)
        self.assertEqual(dict(Harness().factory.counters), dict.fromkeys(COUNTERS, 0))


class RecipientTests(SynchronousTestCase):
    """
    Only configured recipients are accepted; the listener never relays.
    """

    def setUp(self) -> None:
        self.harness = Harness()
        self.addCleanup(self.harness.close_all)
        self.client = self.harness.connect()
        self.client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
        self.client.replies()

    def rcpt(self, address: bytes) -> bytes:
        self.client.send(b"RCPT TO:" + address + b"\r\n")
        [reply] = self.client.replies()
        return reply

    def test_configured_recipient_any_case(self) -> None:
        """The configured address is accepted in any letter case."""
        self.assertEqual(self.rcpt(b"<BUGS@Example.ORG>")[:3], b"250")

    def test_unknown_local_part(self) -> None:
        """Another address in the same domain gets 550 5.1.1."""
        self.assertEqual(self.rcpt(b"<root@example.org>"), b"550 5.1.1 No such recipient here")

    def test_relay_denied(self) -> None:
        """An address in another domain gets 550 5.7.1: the listener never relays."""
        self.assertEqual(self.rcpt(b"<bugs@example.net>"), b"550 5.7.1 Relaying denied")

    def test_routing_tricks_refused(self) -> None:
        """Percent-hack and source-routed addresses that do not match exactly are refused."""
        self.assertEqual(self.rcpt(b"<bugs%evil.example@example.org>")[:3], b"550")
        self.assertEqual(self.rcpt(b'<"bugs@example.org"@evil.example>')[:3], b"550")

    def test_source_route_to_configured_address(self) -> None:
        """A source route is ignored: the final address decides."""
        self.assertEqual(self.rcpt(b"<@relay.example:bugs@example.org>")[:3], b"250")

    def test_recipient_limit(self) -> None:
        """Beyond max_recipients, RCPT gets 452 4.5.3."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=2)
        harness = Harness(settings)
        client = harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<bugs@example.org>\r\n" * 3)
        self.assertEqual(client.replies()[-1], b"452 4.5.3 Too many recipients")
        harness.close_all()


class LimitTests(SynchronousTestCase):
    """
    Size, line length, error and time limits.
    """

    def setUp(self) -> None:
        self.settings = ListenerSettings(
            recipients=frozenset({RECIPIENT}), max_message_size=20_000, max_line_length=1000,
            max_errors=5,
        )
        self.harness = Harness(self.settings)
        self.addCleanup(self.harness.close_all)

    def test_size_parameter_over_limit(self) -> None:
        """MAIL FROM with SIZE over the limit gets 552 5.3.4 before any data."""
        client = self.harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=20001\r\n")
        self.assertEqual(client.replies()[-1], b"552 5.3.4 Message size exceeds fixed maximum message size")
        client.send(b"MAIL FROM:<a@b.example> SIZE=20000 BODY=8BITMIME\r\n")
        self.assertEqual(client.codes(), [250])

    def test_mail_parameters_checked(self) -> None:
        """A bad SIZE gets 501, an unknown BODY 501 and an unknown parameter 555."""
        client = self.harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=lots\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n"
                    b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
        self.assertEqual(client.codes(), [220, 250, 501, 501, 555])

    def test_body_over_limit_552_at_end_without_buffering(self) -> None:
        """A body growing past the limit is dropped as it arrives and answered 552 at its end; nothing is handed over."""
        client = self.harness.connect()
        client.send(envelope())
        for _ in range(100):
            client.send(b"x" * 500 + b"\r\n")
        self.assertEqual(client.protocol._lines, [])
        client.send(b".\r\n")
        self.assertEqual(client.replies()[-1], b"552 5.3.4 Message size exceeds fixed maximum message size")
        self.assertEqual(self.harness.publisher.published, [])
        client.send(b"NOOP\r\n")
        self.assertEqual(client.codes(), [250])

    def test_long_data_line_never_returns_to_command_mode(self) -> None:
        """After an over-long DATA line the rest of the mail is discarded as data: injected commands never run."""
        intake = RecordingIntake()
        harness = Harness(self.settings, intake=intake)
        client = harness.connect()
        injected = dot_stuffed(sample(CHANGED))[:-3]  # without the final dot
        client.send(envelope() + b"Subject: x\r\n\r\n" + b"A" * 3000 + b"\r\n")
        client.send(b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                    + injected)
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354])
        client.send(b".\r\n")
        self.assertEqual(client.replies(), [b"500 5.5.2 Line too long (limit 1000 bytes)"])
        self.assertEqual(intake.received, [])
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        self.assertEqual(client.codes(), [250])
        harness.close_all()

    def test_long_line_split_over_many_chunks(self) -> None:
        """A too-long line arriving in small pieces (CRLF split between chunks) is skipped to its real end."""
        intake = RecordingIntake()
        harness = Harness(self.settings, intake=intake)
        client = harness.connect()
        client.send(envelope() + b"Subject: x\r\n\r\n")
        for _ in range(30):
            client.send(b"B" * 99)
        client.send(b"\r")
        client.send(b"\nQUIT\r\n")
        self.assertFalse(client.closed)
        client.send(b".\r\nNOOP\r\n")
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 500, 250])
        self.assertEqual(intake.received, [])
        harness.close_all()

    def test_line_at_the_limit_accepted(self) -> None:
        """A DATA line of exactly max_line_length bytes with its CRLF is accepted."""
        intake = RecordingIntake()
        harness = Harness(self.settings, intake=intake)
        client = harness.connect()
        client.send(envelope() + b"Subject: x\r\n\r\n" + b"C" * 998 + b"\r\n.\r\n")
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(intake.received, [b"Subject: x\r\n\r\n" + b"C" * 998 + b"\r\n"])
        harness.close_all()

    def test_long_command_line(self) -> None:
        """An over-long command line gets 500 5.5.2 and the session goes on."""
        client = self.harness.connect()
        client.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual(client.replies()[1:], [b"500 5.5.2 Line too long", b"250 2.0.0 OK"])

    def test_too_many_errors_close(self) -> None:
        """After max_errors refused commands the session is closed with 421."""
        client = self.harness.connect()
        client.send(b"BOGUS\r\n" * 10)
        replies = client.replies()
        self.assertEqual(replies[-1], b"421 4.7.0 Too many errors, closing connection")
        self.assertEqual(len([r for r in replies if r.startswith(b"500")]), 5)
        self.assertTrue(client.closed)

    def test_idle_timeout(self) -> None:
        """A silent client gets 421 and is disconnected after idle_timeout."""
        client = self.harness.connect()
        self.harness.clock.advance(299)
        self.assertFalse(client.closed)
        client.send(b"NOOP\r\n")
        self.harness.clock.advance(299)
        self.assertFalse(client.closed)
        self.harness.clock.advance(1)
        self.assertEqual(client.replies()[-1], b"421 4.4.2 Idle timeout, closing connection")
        self.assertTrue(client.closed)
        client.close()
        self.assertEqual(self.harness.clock.getDelayedCalls(), [])

    def test_partial_line_does_not_reset_idle(self) -> None:
        """Bytes without a line end do not keep a session alive."""
        client = self.harness.connect()
        for _ in range(10):
            self.harness.clock.advance(50)
            client.send(b"N")
        self.assertTrue(client.closed)

    def test_data_timeout(self) -> None:
        """A client trickling a mail slower than data_timeout allows gets 421 and nothing is handed over."""
        client = self.harness.connect()
        client.send(envelope())
        for _ in range(12):
            self.harness.clock.advance(59)
            client.send(b"x\r\n")
        self.assertEqual(client.replies()[-1], b"421 4.4.2 Timeout receiving the mail, closing connection")
        self.assertTrue(client.closed)
        self.assertEqual(self.harness.publisher.published, [])

    def test_delivery_timeout_answers_451_and_retry_is_duplicate(self) -> None:
        """A hand-over slower than delivery_timeout is answered 451; once it completes, the retry is a duplicate."""
        self.harness.publisher.hold = True
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        client.replies()
        self.harness.clock.advance(120)
        self.assertEqual(client.replies(), [b"451 4.4.1 Timed out handing the mail over, try again later"])
        self.harness.publisher.held[0][1].callback(None)
        self.assertEqual(client.replies(), [])
        self.harness.publisher.hold = False
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n" + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.replies()[-1][:22], b"250 2.0.0 Ok: already ")
        self.assertEqual(len(self.harness.publisher.published), 1)

    def test_idle_timer_paused_during_hand_over(self) -> None:
        """The idle timeout does not run while the listener itself waits for a hand-over."""
        self.harness.publisher.hold = True
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.harness.clock.advance(110)
        self.assertFalse(client.closed)
        self.harness.publisher.held[0][1].callback(None)
        self.assertEqual(client.codes()[-1], 250)

    def test_no_delayed_calls_left(self) -> None:
        """After a complete session closes, no timer is left behind."""
        client = self.harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)) + b"QUIT\r\n")
        client.close()
        self.assertEqual(self.harness.clock.getDelayedCalls(), [])


class AccessTests(SynchronousTestCase):
    """
    Connection limits, networks, TLS requirements and the shared secret.
    """

    def test_per_peer_limit(self) -> None:
        """Beyond max_connections_per_peer, one address gets 421 and is closed; others still connect."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), max_connections_per_peer=2))
        first, second, third = harness.connect(), harness.connect(), harness.connect()
        self.assertEqual(second.codes(), [220])
        self.assertEqual(third.replies(), [b"421 4.7.0 Too many connections from your address, try again later"])
        self.assertTrue(third.closed)
        self.assertEqual(harness.connect("127.0.0.2").codes(), [220])
        first.close()
        self.assertEqual(harness.connect().codes(), [220])
        harness.close_all()

    def test_overall_limit(self) -> None:
        """Beyond max_connections, any new connection gets 421."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), max_connections=2))
        harness.connect("10.0.0.1")
        harness.connect("10.0.0.2")
        third = harness.connect("10.0.0.3")
        self.assertEqual(third.replies(), [b"421 4.7.0 Too many connections, try again later"])
        self.assertEqual(len(harness.factory.sessions), 2)
        harness.close_all()

    def test_lost_connection_counted_once(self) -> None:
        """A session that loses its connection twice is forgotten once."""
        harness = Harness()
        client = harness.connect()
        client.close()
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(harness.factory.connections_from("127.0.0.1"), 0)
        self.assertEqual(len(harness.factory.sessions), 0)

    def test_allowed_networks(self) -> None:
        """A client outside allowed_networks gets 554 5.7.1; one inside (IPv4-mapped too) is served."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), allowed_networks=("10.1.0.0/16",)))
        self.assertEqual(harness.connect("10.2.0.1").replies(), [b"554 5.7.1 Access denied"])
        self.assertEqual(harness.connect("10.1.2.3").codes(), [220])
        mapped = harness.factory.buildProtocol(IPv6Address("TCP", "::ffff:10.1.0.9", 1))
        self.assertIsInstance(mapped, BugmailSMTP)
        unix = harness.factory.buildProtocol(UNIXAddress(b"/run/sock"))
        self.assertIsInstance(unix, BugmailSMTP)
        harness.close_all()

    def test_ipv4_mapped_peer_counted_with_plain_ipv4(self) -> None:
        """A peer connecting as an IPv4-mapped IPv6 address and as plain IPv4 shares one per-peer count."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), max_connections_per_peer=1))
        self.assertEqual(harness.connect("192.0.2.1").codes(), [220])
        mapped = harness.connect("::ffff:192.0.2.1")
        self.assertEqual(mapped.replies(), [b"421 4.7.0 Too many connections from your address, try again later"])
        self.assertEqual(harness.factory.connections_from("192.0.2.1"), 1)
        self.assertEqual(harness.factory.connections_from("::ffff:192.0.2.1"), 1)
        harness.close_all()
        self.assertEqual(harness.factory.connections_from("192.0.2.1"), 0)
        self.assertEqual(harness.connect("::ffff:192.0.2.1").codes(), [220])
        self.assertEqual(harness.connect("192.0.2.1").replies(),
                         [b"421 4.7.0 Too many connections from your address, try again later"])
        harness.close_all()

    def test_ipv4_mapped_network_matches_both_forms(self) -> None:
        """An allowed network written in IPv4-mapped form admits the peer in both forms, as its plain IPv4 form does."""
        for network in ("::ffff:10.1.0.0/112", "10.1.0.0/16"):
            harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), allowed_networks=(network,)))
            self.assertEqual(harness.connect("10.1.2.3").codes(), [220], network)
            self.assertEqual(harness.connect("::ffff:10.1.2.4").codes(), [220], network)
            self.assertEqual(harness.connect("10.2.0.1").replies(), [b"554 5.7.1 Access denied"], network)
            self.assertEqual(harness.connect("::ffff:10.2.0.1").replies(), [b"554 5.7.1 Access denied"], network)
            harness.close_all()

    def test_starttls_unavailable(self) -> None:
        """Without a certificate STARTTLS answers 454."""
        harness = Harness()
        client = harness.connect()
        client.send(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertEqual(client.replies()[-1], b"454 4.7.0 TLS not available")
        harness.close_all()

    def test_tls_required_refuses_mail(self) -> None:
        """With TLS required, MAIL before STARTTLS gets 530 5.7.0."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), tls_certificate="/x.pem", tls_required=True)
        harness = Harness(settings)
        client = harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
        self.assertEqual(client.replies()[-1], b"530 5.7.0 Must issue a STARTTLS command first")
        harness.close_all()

    def secret_harness(self) -> tuple[Harness, RecordingIntake]:
        intake = RecordingIntake()
        return Harness(secret=b"s3cret", intake=intake), intake

    def test_secret_missing(self) -> None:
        """With a shared secret configured, a mail without the header gets 550 5.7.1."""
        harness, intake = self.secret_harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.replies()[-1], b"550 5.7.1 Not authorized to send mail here")
        self.assertEqual(intake.received, [])
        harness.close_all()

    def test_secret_wrong(self) -> None:
        """A wrong secret gets 550 5.7.1."""
        harness, intake = self.secret_harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(b"X-Fedhub-Secret: guess\r\n" + sample(CHANGED)))
        self.assertEqual(client.replies()[-1], b"550 5.7.1 Not authorized to send mail here")
        self.assertEqual(intake.received, [])
        harness.close_all()

    def test_secret_right_and_stripped(self) -> None:
        """The right secret is accepted and the header is removed before the mail is handed over."""
        harness, intake = self.secret_harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(b"x-fedhub-secret: s3cret\r\n" + sample(CHANGED)))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(intake.received, [sample(CHANGED)])
        harness.close_all()


class SecretHeaderTests(SynchronousTestCase):
    """
    L{strip_secret_header}.
    """

    def test_folded_value(self) -> None:
        """A folded secret header is unfolded for the comparison and removed whole."""
        raw = b"A: 1\r\nX-Secret:\r\n s3cret\r\nB: 2\r\n continued\r\n\r\nbody\r\n"
        self.assertEqual(strip_secret_header(raw, "x-secret", b"s3cret"), b"A: 1\r\nB: 2\r\n continued\r\n\r\nbody\r\n")

    def test_every_occurrence_must_match(self) -> None:
        """A second occurrence with another value is refused as wrong."""
        raw = b"X-Secret: s3cret\r\nX-Secret: other\r\n\r\nbody\r\n"
        error = self.assertRaises(SecretMismatch, strip_secret_header, raw, "X-Secret", b"s3cret")
        self.assertEqual(error.reason, "wrong")

    def test_header_in_body_does_not_count(self) -> None:
        """The header after the blank line (in the body) is not the secret."""
        raw = b"A: 1\r\n\r\nX-Secret: s3cret\r\n"
        error = self.assertRaises(SecretMismatch, strip_secret_header, raw, "X-Secret", b"s3cret")
        self.assertEqual(error.reason, "missing")

    def test_prefix_of_secret_refused(self) -> None:
        """A value that is only a prefix of the secret is wrong."""
        self.assertRaises(SecretMismatch, strip_secret_header, b"X-Secret: s3c\r\n\r\n", "X-Secret", b"s3cret")


class SettingsTests(SynchronousTestCase):
    """
    L{ListenerSettings} and L{settings_from_options}.
    """

    def test_normalized(self) -> None:
        """Recipients are lower-cased and networks parsed."""
        settings = ListenerSettings(recipients=frozenset({" Bugs@Example.ORG "}), allowed_networks=("10.0.0.1/8",))
        self.assertEqual(settings.recipients, frozenset({"bugs@example.org"}))
        self.assertEqual(str(settings.allowed_networks[0]), "10.0.0.0/8")
        self.assertEqual(settings.domains, frozenset({"example.org"}))

    def test_invalid(self) -> None:
        """Empty or malformed recipients, a zero limit and TLS options without a certificate are refused."""
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset())
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset({"nobody"}))
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset({RECIPIENT}), max_connections=0)
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset({RECIPIENT}), tls_required=True)
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset({RECIPIENT}), secret_header="A:B")
        self.assertRaises(ValueError, ListenerSettings, recipients=frozenset({RECIPIENT}), hostname="a b")

    def test_from_options(self) -> None:
        """Plugin options become settings; absent optional ones keep the defaults."""
        settings = settings_from_options(
            {"recipients": ["bugs@example.org"], "max_recipients": 3, "tls_certificate": None,
             "allowed_networks": ["127.0.0.0/8"], "idle_timeout": 10.0, "max_errors": 4,
             "max_commands_per_mail": 30}
        )
        self.assertEqual(settings.max_recipients, 3)
        self.assertEqual(settings.idle_timeout, 10.0)
        self.assertEqual((settings.max_errors, settings.max_commands_per_mail), (4, 30))
        self.assertIsNone(settings.tls_certificate)
        self.assertEqual(settings.max_message_size, 1024 * 1024)


class ListenerServiceTests(SynchronousTestCase):
    """
    L{BugmailListener} as a service.
    """

    def listener(self, reactor: MemoryReactorClock, intake: Any) -> BugmailListener:
        return BugmailListener(
            "tcp:0:interface=127.0.0.1",
            ListenerSettings(recipients=frozenset({RECIPIENT})),
            intake,
            reactor=reactor,
        )

    def test_listens_on_endpoint(self) -> None:
        """Starting listens on the endpoint's interface; stopping stops listening."""
        reactor = MemoryReactorClock()
        listener = self.listener(reactor, RecordingIntake())
        self.assertEqual(reactor.tcpServers, [])
        listener.startService()
        port = self.successResultOf(listener.when_listening())
        [(portnum, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((portnum, interface), (0, "127.0.0.1"))
        self.assertIs(factory, listener.factory)
        stops: list[bool] = []
        port.stopListening = lambda: stops.append(True)  # type: ignore[method-assign]
        self.successResultOf(listener.stopService())
        self.assertEqual(stops, [True])
        self.assertIsNone(listener.port)

    def test_listen_failure_kept(self) -> None:
        """
        A listener that can not bind its port says why in C{start_error}
        (which the hub's /ready reports) and logs it; a later start that
        listens clears it.
        """
        from twisted.internet.error import CannotListenError

        reactor = MemoryReactorClock()
        listener = self.listener(reactor, RecordingIntake())

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise CannotListenError("127.0.0.1", 8025, OSError(98, "Address already in use"))

        self.patch(reactor, "listenTCP", refuse)
        self.assertIsNone(listener.start_error)
        listener.startService()
        self.failureResultOf(listener.when_listening(), CannotListenError)
        self.assertIn("Address already in use", listener.start_error or "")
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.successResultOf(listener.stopService())
        self.patch(reactor, "listenTCP", MemoryReactorClock.listenTCP.__get__(reactor))
        listener.startService()
        self.successResultOf(listener.when_listening())
        self.assertIsNone(listener.start_error)
        self.successResultOf(listener.stopService())

    def handing_over(
        self, reactor: MemoryReactorClock
    ) -> tuple[BugmailListener, RecordingIntake, Client]:
        """
        A started listener and a client whose mail it is handing over to an
        intake that has not answered yet.
        """
        intake = RecordingIntake()
        intake.result = Deferred()
        listener = self.listener(reactor, intake)
        listener.startService()
        assert listener.factory is not None
        busy = Client(listener.factory, "127.0.0.1", 1)
        busy.send(envelope() + dot_stuffed(sample(CHANGED)))
        busy.replies()
        return listener, intake, busy

    def test_stop_waits_for_hand_over(self) -> None:
        """Stopping closes idle sessions with 421 and waits for a mail being handed over, which is answered first."""
        reactor = MemoryReactorClock()
        listener, intake, busy = self.handing_over(reactor)
        assert listener.factory is not None
        idle = Client(listener.factory, "127.0.0.1", 2)
        idle.replies()
        stopped = listener.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(idle.replies(), [b"421 4.3.2 Service shutting down, try again later"])
        self.assertEqual(busy.replies(), [])
        intake.result.callback(Accepted("published", None, None, "m-1"))
        self.successResultOf(stopped)
        self.assertEqual(busy.codes(), [250, 421])
        busy.close()
        idle.close()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stop_does_not_wait_for_ever(self) -> None:
        """
        A hand-over that never ends (an embedding's callback whose Deferred
        never fires) is waited for at most delivery_timeout once stopping:
        its mail was answered 451, and the program can stop.
        """
        reactor = MemoryReactorClock()
        listener, _, busy = self.handing_over(reactor)
        assert listener.factory is not None
        timeout = listener.factory.settings.delivery_timeout
        reactor.advance(timeout)
        self.assertEqual(busy.codes(), [451])
        stopped = listener.stopService()
        reactor.advance(timeout - 0.1)
        self.assertNoResult(stopped)
        reactor.advance(0.1)
        self.successResultOf(stopped)
        busy.close()

    def test_with_publisher(self) -> None:
        """with_publisher builds a listener whose mails become messages on the given publisher."""
        reactor = MemoryReactorClock()
        publisher = FakePublisher()
        listener = BugmailListener.with_publisher(
            "tcp:0", ListenerSettings(recipients=frozenset({RECIPIENT})), publisher, topic, reactor=reactor
        )
        listener.startService()
        assert listener.factory is not None
        client = Client(listener.factory, "127.0.0.1", 1)
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(publisher.published[0].topic, "org.example.test.bugzilla.bug.update")
        client.close()
        self.successResultOf(listener.stopService())

    def test_with_callback(self) -> None:
        """with_callback calls the callback once per event with the parsed event and the raw mail."""
        reactor = MemoryReactorClock()
        calls: list[tuple[int, bytes]] = []

        def on_event(event: Any, raw: bytes) -> Deferred[None]:
            calls.append((event.bug_id, raw))
            return succeed(None)

        listener = BugmailListener.with_callback(
            "tcp:0", ListenerSettings(recipients=frozenset({RECIPIENT})), on_event, reactor=reactor
        )
        listener.startService()
        assert listener.factory is not None
        client = Client(listener.factory, "127.0.0.1", 1)
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                    + dot_stuffed(copy_for(sample(CHANGED), "x@y.example", "other@id")))
        self.assertEqual(calls, [(218297, sample(CHANGED))])
        client.close()
        self.successResultOf(listener.stopService())

    def test_bad_tls_files_fail_start(self) -> None:
        """A missing certificate file makes startService raise instead of listening without TLS."""
        from fedhub.producers.bugzilla.smtp import TLSFilesError

        reactor = MemoryReactorClock()
        listener = BugmailListener(
            "tcp:0",
            ListenerSettings(recipients=frozenset({RECIPIENT}), tls_certificate=self.mktemp()),
            RecordingIntake(),
            reactor=reactor,
        )
        self.assertRaises(TLSFilesError, listener.startService)
        self.assertEqual(reactor.tcpServers, [])

    def test_intake_provides_interface(self) -> None:
        """BugmailIntake provides IBugmailIntake."""
        verifyObject(IBugmailIntake, BugmailIntake(lambda e, r: succeed(None), clock=Clock()))

    def test_parser_sample_sanity(self) -> None:
        """The sample the tests use parses as the changed bug 218297."""
        self.assertEqual(parse_bugmail(sample(CHANGED)).bug_id, 218297)


class EmbedExampleTests(SynchronousTestCase):
    """
    C{examples/bugzilla-mail/embed.py} works as documented.
    """

    def load(self) -> Any:
        import importlib.util

        path = Path(__file__).parent.parent / "examples" / "bugzilla-mail" / "embed.py"
        spec = importlib.util.spec_from_file_location("fedhub_embed_example", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_callback_gets_events(self) -> None:
        """The example's listener calls its callback once per event and answers 250, or 451 when its board is full."""
        example = self.load()
        reactor = MemoryReactorClock()
        board = example.BugBoard(capacity=1)
        listener = example.make_listener("tcp:0:interface=127.0.0.1", board, reactor)
        self.patch(sys, "stdout", io.StringIO())
        listener.startService()
        client = Client(listener.factory, "127.0.0.1", 1)
        client.send(envelope(("bugs@localhost",)) + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(list(board.summaries), [218297])
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@localhost>\r\nDATA\r\n" + dot_stuffed(sample(NEW)))
        self.assertEqual(client.codes()[-1], 451)
        client.close()
        self.successResultOf(listener.stopService())

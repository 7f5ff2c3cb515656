"""
Edge cases of the Bugzilla mail listener's sessions: clients that stop
reading their replies, connections that do not close when asked to, and the
flow control between the replies a session writes and the commands it reads.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import TemporarilyUnavailable
from fedhub.producers.bugzilla.producer import Accepted
from fedhub.producers.bugzilla.smtp import BugmailSMTP, ListenerSettings
from tests.test_smtp_raw import GUARD, RawSMTPTestCase, make_pki
from tests.test_smtp_server import (
    CHANGED,
    RECIPIENT,
    Harness,
    RecordingIntake,
    dot_stuffed,
    envelope,
    sample,
)


def _buffered(transport: Any) -> int:
    """
    The bytes a TCP transport holds that the kernel has not taken yet.
    """
    return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)


class StuckClientTests(RawSMTPTestCase):
    """
    Clients over real loopback TCP that stop reading what the listener sends.
    """

    @inlineCallbacks
    def watch_session(self) -> Generator[Deferred[Any], Any, int]:
        """
        Wait until the listener has no session left, its replies pile up
        past 8 MiB, or the guard passes; return the most bytes of replies
        the session held at once.
        """
        factory = self.listener.factory
        assert factory is not None
        most = [0]
        done: Deferred[None] = Deferred()

        def poll() -> None:
            for session in factory.sessions:
                if session.transport is not None:
                    most[0] = max(most[0], _buffered(session.transport))
            if not factory.sessions or most[0] > 8 * 1024 * 1024:
                if not done.called:
                    done.callback(None)

        loop = LoopingCall(poll)
        loop.clock = reactor
        loop.start(0.02)
        # Past the guard, stop waiting and let the test's assertions say what
        # is wrong.
        guard = reactor.callLater(GUARD, lambda: done.called or done.callback(None))
        try:
            yield done
        finally:
            loop.stop()
            if guard.active():
                guard.cancel()
        return most[0]

    @inlineCallbacks
    def test_unread_replies_bounded_and_connection_freed(self) -> Generator[Deferred[Any], Any, None]:
        """A client that pipelines commands and never reads the replies can not make the listener buffer them without bound, and its connection is dropped after the idle timeout."""
        self.patch(BugmailSMTP, "abort_timeout", 0.5)
        self.start(idle_timeout=1.0)
        client = yield self.connect()
        assert client.transport is not None
        client.transport.pauseProducing()
        # About 11 bytes of reply per byte sent: far more than the kernel's
        # socket buffers hold.
        client.send(b"EHLO flood.example\r\n" * 100_000)
        try:
            most = yield self.watch_session()
        finally:
            client.transport.abortConnection()
        self.assertLess(most, 1024 * 1024)
        factory = self.listener.factory
        assert factory is not None
        self.assertEqual(factory.sessions, set())
        self.assertEqual(factory.connections_from("127.0.0.1"), 0)

    @inlineCallbacks
    def test_starttls_without_handshake_freed(self) -> Generator[Deferred[Any], Any, None]:
        """A client that sends STARTTLS and then never starts the TLS handshake loses its connection after the idle timeout."""
        self.patch(BugmailSMTP, "abort_timeout", 0.5)
        pki = make_pki(self.mktemp())
        self.start(tls_certificate=pki["server.pem"], tls_key=pki["server.key"], idle_timeout=0.5)
        client = yield self.connect()
        client.send(b"EHLO raw\r\nSTARTTLS\r\n")
        yield client.replies(3)
        self.assertEqual(client.lines()[-1], b"220 2.0.0 Ready to start TLS")
        yield self.watch_session()
        factory = self.listener.factory
        assert factory is not None
        self.assertEqual(factory.sessions, set())
        yield client.until(lambda: client.lost)
        self.assertTrue(client.lost)


class DisconnectDuringHandOverTests(RawSMTPTestCase):
    """
    A client that goes away while its mail is being made durable.
    """

    @inlineCallbacks
    def test_mail_kept_once_nothing_logged_as_error(self) -> Generator[Deferred[Any], Any, None]:
        """The mail of a client that resets the connection during the hand-over is published once, counted once and logs no error; the sender's retry is a duplicate."""
        self.start()
        self.publisher.hold = True
        client = yield self.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        yield client.replies(5)
        factory = self.listener.factory
        assert factory is not None
        while not self.publisher.held:
            yield deferLater(reactor, 0.01, lambda: None)
        assert client.transport is not None
        client.transport.abortConnection()
        yield client.until(lambda: client.lost)
        # The listener reads nothing during the hand-over, so it learns of
        # the reset only when it answers.
        yield deferLater(reactor, 0.05, lambda: None)
        self.publisher.hold = False
        [(_, stored)] = self.publisher.held
        stored.callback(None)
        while factory.sessions:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.publisher.published), 1)
        self.assertEqual(factory.counters["mails_published"], 1)
        retry = yield self.send_mail(sample(CHANGED))
        self.assertIn(b"250 2.0.0 Ok: already published", b"\n".join(retry.lines()))
        self.assertEqual(len(self.publisher.published), 1)
        self.assertEqual(factory.counters["mails_duplicate"], 1)
        self.assertEqual(self.flushLoggedErrors(), [])


class FlowControlTests(SynchronousTestCase):
    """
    The session as the push producer of its replies, in memory.
    """

    def test_reading_stops_while_replies_wait(self) -> None:
        """While the transport says its buffer of replies is full, no further command is read or answered; they are when it drains."""
        harness = Harness()
        client = harness.connect()
        client.replies()
        self.assertIs(client.transport.producer, client.protocol)
        client.protocol.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        client.send(b"NOOP\r\nNOOP\r\n")
        self.assertEqual(client.replies(), [])
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.codes(), [250, 250])
        harness.close_all()

    def test_hand_over_does_not_resume_reading_while_replies_wait(self) -> None:
        """A mail answered while the replies are held back does not make the session read again until they drain."""
        intake = RecordingIntake()
        held: Deferred[Any] = Deferred()
        intake.result = held
        harness = Harness(intake=intake)
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)) + b"NOOP\r\n")
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.pauseProducing()
        held.callback(Accepted("published", None, None, "id-1"))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.codes(), [250])
        harness.close_all()

    def test_close_unregisters_and_aborts_later(self) -> None:
        """A session that closes lets go of the transport and aborts the connection if it has not closed after abort_timeout."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), idle_timeout=10.0))
        client = harness.connect()
        client.send(b"QUIT\r\n")
        self.assertEqual(client.codes(), [220, 221])
        self.assertTrue(client.closed)
        self.assertIsNone(client.transport.producer)
        self.assertFalse(client.transport.disconnected)
        harness.clock.advance(BugmailSMTP.abort_timeout)
        self.assertTrue(client.transport.disconnected)
        client.close()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_idle_close_aborts_later(self) -> None:
        """After the idle timeout closes a session, a connection that does not close is aborted abort_timeout later."""
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}), idle_timeout=10.0))
        client = harness.connect()
        harness.clock.advance(10.0)
        self.assertEqual(client.codes(), [220, 421])
        self.assertFalse(client.transport.disconnected)
        harness.clock.advance(BugmailSMTP.abort_timeout)
        self.assertTrue(client.transport.disconnected)
        client.close()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_closed_in_time_no_abort(self) -> None:
        """A connection that closes after QUIT leaves no abort timer behind."""
        harness = Harness()
        client = harness.connect()
        client.send(b"QUIT\r\n")
        client.close()
        self.assertEqual(harness.clock.getDelayedCalls(), [])
        self.assertFalse(client.transport.disconnected)


class SlotDuringHandOverTests(SynchronousTestCase):
    """
    A session keeps its connection slot while its mail is handed over, even
    after its connection is gone, so C{max_connections} bounds the hand-overs
    running at once.
    """

    def harness(self) -> tuple[Harness, RecordingIntake, Deferred[Any]]:
        intake = RecordingIntake()
        held: Deferred[Any] = Deferred()
        intake.result = held
        settings = ListenerSettings(
            recipients=frozenset({RECIPIENT}), max_connections=1, max_connections_per_peer=1
        )
        return Harness(settings, intake=intake), intake, held

    def test_slot_kept_after_disconnect_until_hand_over_ends(self) -> None:
        """A client that disconnects after its end-of-data line keeps its slot (overall and per peer) until the hand-over ends; the mail is handed over and counted once."""
        harness, intake, held = self.harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        client.close()
        self.assertEqual(len(harness.factory.sessions), 1)
        self.assertEqual(harness.factory.connections_from("127.0.0.1"), 1)
        self.assertEqual(harness.connect("10.0.0.1").replies(),
                         [b"421 4.7.0 Too many connections, try again later"])
        held.callback(Accepted("published", None, None, "id-1"))
        self.assertEqual(harness.factory.sessions, set())
        self.assertEqual(harness.factory.connections_from("127.0.0.1"), 0)
        self.assertEqual(len(intake.received), 1)
        self.assertEqual(harness.factory.counters["mails_published"], 1)
        self.assertEqual(harness.connect().codes(), [220])
        harness.close_all()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_failed_hand_over_frees_slot(self) -> None:
        """The slot of a gone client is freed when its hand-over fails, too."""
        harness, intake, held = self.harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        client.close()
        held.errback(TemporarilyUnavailable("later"))
        self.assertEqual(harness.factory.sessions, set())
        self.assertEqual(harness.factory.counters["mails_refused_unavailable"], 1)
        self.assertEqual(harness.connect().codes(), [220])
        harness.close_all()

    def test_slot_kept_after_delivery_timeout_and_quit(self) -> None:
        """A client answered 451 for a slow hand-over that then quits keeps its slot until the hand-over ends."""
        harness, intake, held = self.harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        harness.clock.advance(harness.settings.delivery_timeout)
        self.assertEqual(client.codes()[-1], 451)
        client.send(b"QUIT\r\n")
        self.assertEqual(client.codes(), [221])
        client.close()
        self.assertEqual(harness.connect().replies(), [b"421 4.7.0 Too many connections, try again later"])
        held.callback(Accepted("published", None, None, "id-1"))
        self.assertEqual(harness.factory.sessions, set())
        self.assertEqual(harness.connect().codes(), [220])
        harness.close_all()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_one_hand_over_per_session(self) -> None:
        """After a 451 for a slow hand-over, the session takes no other mail (451 at DATA) until that hand-over has ended."""
        harness, intake, held = self.harness()
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(CHANGED)))
        harness.clock.advance(harness.settings.delivery_timeout)
        client.replies()
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n")
        self.assertEqual(client.replies()[-1],
                         b"451 4.3.0 The previous mail is still being handed over, try again later")
        self.assertEqual(len(intake.received), 1)
        self.assertFalse(client.closed)
        held.callback(Accepted("published", None, None, "id-1"))
        intake.result = None
        client.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bugs@example.org>\r\nDATA\r\n"
                    + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [250, 250, 354, 250])
        self.assertEqual(len(intake.received), 2)
        harness.close_all()

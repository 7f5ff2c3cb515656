"""
How the listener's replies reach the socket over real loopback TCP: sent at
once when nothing is waiting, and otherwise the usual way, in order, when
the socket takes only part of a reply or none of it.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.tcp import Server as _TCPServer
from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.smtp import BugmailSMTP, _write
from tests.test_smtp_raw import RawClient, RawSMTPTestCase
from tests.test_smtp_server import CHANGED, dot_stuffed, envelope, sample


class ChoppingSocket:
    """
    A socket that takes at most C{limit} bytes per C{send}, and refuses the
    first C{refusals} sends as a full send buffer would; everything else is
    the real socket's.
    """

    def __init__(self, real: Any, limit: int, refusals: int = 0) -> None:
        self.real = real
        self.limit = limit
        self.refusals = refusals
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.refusals:
            self.refusals -= 1
            raise BlockingIOError(errno.EAGAIN, "resource temporarily unavailable")
        chunk = bytes(data[: self.limit])
        self.sends.append(chunk)
        sent: int = self.real.send(chunk)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class ReplyWriteTests(RawSMTPTestCase):
    """
    Replies over a real socket.
    """

    #: The mail, pipelined with its envelope and a QUIT: eight replies.
    CONVERSATION = envelope() + dot_stuffed(sample(CHANGED)) + b"QUIT\r\n"

    def session(self) -> BugmailSMTP:
        factory = self.listener.factory
        assert factory is not None
        [session] = factory.sessions
        return session

    @inlineCallbacks
    def conversation(self, socket: Any = None) -> Generator[Deferred[Any], Any, tuple[bytes, list[bytes]]]:
        """
        Connect, have the session's socket replaced by C{socket(real)} when
        given, hold the conversation; the bytes received after the greeting,
        and what the session wrote through its transport's C{write}.
        """
        self.start()
        client: RawClient = yield self.connect()
        greeting = client.received
        session = self.session()
        transport: Any = session.transport
        written: list[bytes] = []
        write = transport.write

        def recording(data: bytes) -> None:
            written.append(data)
            write(data)

        transport.write = recording
        if socket is not None:
            transport.socket = socket(transport.socket)
        client.send(self.CONVERSATION)
        yield client.until(lambda: client.lost)
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 250, 221])
        return client.received[len(greeting):], written

    @inlineCallbacks
    def test_sent_at_once(self) -> Generator[Deferred[Any], Any, None]:
        """With nothing waiting, every reply goes straight to the socket, none through the transport's buffer."""
        received, written = yield self.conversation()
        self.assertEqual(written, [])
        self.assertEqual(received.count(b"\r\n"), 10)

    @inlineCallbacks
    def test_partial_sends_keep_order(self) -> Generator[Deferred[Any], Any, None]:
        """A socket taking a few bytes at a time gets every reply whole and in order, the rest through the buffer."""
        expected, _ = yield self.conversation()
        yield self._stop()
        chopping: list[ChoppingSocket] = []

        def socket(real: Any) -> ChoppingSocket:
            chopping.append(ChoppingSocket(real, 7))
            return chopping[0]

        received, written = yield self.conversation(socket)
        self.assertEqual(received, expected)
        self.assertTrue(written)
        self.assertEqual(b"".join(chopping[0].sends), expected)

    @inlineCallbacks
    def test_full_send_buffer(self) -> Generator[Deferred[Any], Any, None]:
        """A reply the socket refuses at once is buffered and sent when it can take it."""
        expected, _ = yield self.conversation()
        yield self._stop()
        received, written = yield self.conversation(lambda real: ChoppingSocket(real, 1 << 16, refusals=1))
        self.assertEqual(received, expected)
        self.assertTrue(written)


class UnknownTransportStateTests(SynchronousTestCase):
    """
    A TCP transport without the state the shortcut reads (another Twisted
    release) gets its replies the usual way.
    """

    def test_missing_state_goes_the_usual_way(self) -> None:
        """A reply to a transport lacking the private buffers is written through its write."""
        transport: Any = object.__new__(_TCPServer)
        transport.connected = 1
        written: list[bytes] = []
        transport.write = written.append
        sent: list[bytes] = []
        transport.socket = type("S", (), {"send": lambda self, data: sent.append(data) or len(data)})()
        self.assertFalse(hasattr(transport, "_tempDataBuffer"))
        _write(transport, b"250 ok\r\n")
        self.assertEqual((written, sent), ([b"250 ok\r\n"], []))

"""
The short cuts of the SMTP listener say what the long ways said: the reply
text made fit for SMTP, and the log line of each accepted mail.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.producer import Accepted
from fedhub.producers.bugzilla.smtp import BugmailSMTP, _reply_text
from fedhub.text import escape_control
from tests.test_smtp_server import CHANGED, Harness, RecordingIntake, dot_stuffed, envelope, sample


def _reply_text_by_byte(text: str) -> bytes:
    """
    The reply text made byte by byte: printable ASCII kept, anything else
    a question mark.
    """
    clean = escape_control(text, 200).encode("ascii", "backslashreplace")
    return bytes(c if 32 <= c < 127 else 63 for c in clean)


#: The format the accept line has always had.
ACCEPTED = "Accepted a mail from {peer}: {outcome}{bug}{detail}{after}"


class ReplyTextTests(SynchronousTestCase):
    """
    L{_reply_text}.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_same_as_byte_by_byte(self, text: str) -> None:
        """Any text gives the reply text the byte-by-byte rule gives."""
        self.assertEqual(_reply_text(text), _reply_text_by_byte(text))

    def test_examples(self) -> None:
        """Printable ASCII stays; controls are escaped, and a DEL becomes a question mark."""
        for text in ("6d343a6d-1ad1-5cc2-a557-16712ec189fd", "a\r\nb", "caf\u00e9", "x\x7fy", "\u2028"):
            self.assertEqual(_reply_text(text), _reply_text_by_byte(text))


class AcceptLineTests(SynchronousTestCase):
    """
    The info line of each accepted mail.
    """

    def accepted_events(self, harness: Harness, mails: list[bytes]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self.patch(BugmailSMTP, "log", Logger(observer=cast(ILogObserver, events.append)))
        client = harness.connect()
        for mail in mails:
            client.send(envelope() + dot_stuffed(mail))
        return [e for e in events if "outcome" in e]

    def check(self, event: dict[str, Any]) -> None:
        """
        The event reads as the format with fields read, and has the fields.
        """
        fields = {name: event[name] for name in ("peer", "outcome", "bug", "detail", "after")}
        self.assertEqual(formatEvent(event), ACCEPTED.format(**fields))
        for name in ("msg_id", "producer", "recipients", "tls", "late"):
            self.assertIn(name, event)

    def test_published_and_duplicate(self) -> None:
        """A published mail and a copy of it log the text the format with fields gave."""
        harness = Harness()
        events = self.accepted_events(harness, [sample(CHANGED), sample(CHANGED)])
        self.assertEqual([e["outcome"] for e in events], ["published", "duplicate"])
        for event in events:
            self.check(event)
        self.assertIn(" bug ", formatEvent(events[0]))
        self.assertIn("(already handed over)", formatEvent(events[1]))

    def test_braces(self) -> None:
        """Braces in what the line quotes are text, not format fields."""
        intake = RecordingIntake()
        intake.result = succeed(Accepted("quarantined", None, None, None, "/q/{peer}-{0}}{.eml"))
        harness = Harness(intake=intake)
        [event] = self.accepted_events(harness, [b"anything\r\n"])
        self.check(event)
        self.assertIn("(/q/{peer}-{0}}{.eml)", formatEvent(event))


class SendCodeTests(SynchronousTestCase):
    """
    L{BugmailSMTP.sendCode} writes what C{twisted.mail}'s own C{sendCode}
    writes for the same reply, enhanced status code added.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([220, 221, 250, 251, 252, 354, 421, 451, 452, 500, 501, 503, 530, 550, 554]),
        st.binary(max_size=60) | st.sampled_from([b"", b"2.0.0 OK", b"4.4.2 x", b"a\r\nb", b"a\nb\n", b"a\rb"]),
    )
    def test_same_as_twisted(self, code: int, message: bytes) -> None:
        """Single and multi-line replies, with and without enhanced codes, CR or LF."""
        from twisted.mail.smtp import ESMTP

        from fedhub.producers.bugzilla.smtp import _ENHANCED

        client = Harness().connect()
        client.transport.clear()
        client.protocol.sendCode(code, message)
        written = client.transport.value()
        client.transport.clear()
        expected = message
        if (code >= 400 or code in (250, 251, 252, 221)) and b"\n" not in message:
            if not _ENHANCED.match(message):
                expected = b"%d.0.0 %s" % (code // 100, message)
        ESMTP.sendCode(client.protocol, code, expected)
        self.assertEqual(written, client.transport.value())

"""
Tests for the SMTP listener's framing of mail data: however the bytes of a
mail are split into reads, the intake gets the same mail (dot-stuffing
undone, CRLF line ends) and the listener gives the same answer, including
at the line-length and size limits.  Whole lines are taken in blocks; the
line-by-line path handles the end of data and anything unusual.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fedhub.producers.bugzilla.smtp import ListenerSettings
from tests.test_smtp_server import RECIPIENT, Harness, RecordingIntake, envelope

LINE_LIMIT = 120
SIZE_LIMIT = 500

lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"x.", b"...dots", b"Subject: y", b"\xc3\xa9t\xc3\xa9"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.integers(100, 130).map(lambda n: b"L" * n),
    ),
    max_size=40,
)


def stuffed(line: bytes) -> bytes:
    """
    A line as it goes on the wire: one more dot when it starts with a dot.
    """
    return b"." + line if line[:1] == b"." else line


def expected(mail: list[bytes]) -> tuple[int, bytes | None]:
    """
    The answer and the mail the intake gets, worked out line by line: a
    wire line longer than the limit fails the mail (500), and so does the
    mail passing the size limit (552), whichever comes first.
    """
    size = 0
    for line in mail:
        if len(stuffed(line)) > LINE_LIMIT - 2:
            return 500, None
        size += len(line) + 2
        if size > SIZE_LIMIT:
            return 552, None
    return 250, b"".join(line + b"\r\n" for line in mail)


class FramingTests(SynchronousTestCase):
    """
    The same mail, split every way.
    """

    @settings(max_examples=200, deadline=None)
    @given(lines, st.lists(st.integers(1, 300), max_size=20))
    def test_any_split_same_outcome(self, mail: list[bytes], cuts: list[int]) -> None:
        """Whatever the reads, the answer and the mail handed over are those of the line-by-line rules."""
        intake = RecordingIntake()
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}),
                                           max_line_length=LINE_LIMIT,
                                           max_message_size=SIZE_LIMIT), intake=intake)
        client = harness.connect()
        client.send(envelope())
        data = b"".join(stuffed(line) + b"\r\n" for line in mail)
        data += b".\r\nNOOP\r\n"
        position = 0
        for cut in cuts:
            client.send(data[position:position + cut])
            position += cut
        client.send(data[position:])
        code, raw = expected(mail)
        codes = client.codes()
        self.assertEqual(codes[-2:], [code, 250])
        self.assertEqual(intake.received, [raw] if raw is not None else [])
        harness.close_all()

    def test_size_limit_in_one_read(self) -> None:
        """A mail of exactly max_message_size bytes arriving in one read is taken; one byte more gets 552."""
        for extra, code in ((0, 250), (1, 552)):
            intake = RecordingIntake()
            harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}),
                                               max_line_length=LINE_LIMIT,
                                               max_message_size=SIZE_LIMIT), intake=intake)
            client = harness.connect()
            client.send(envelope())
            mail = [b"L" * 98] * 4 + [b"L" * (98 + extra)]  # 500 + extra bytes with CRLFs
            client.send(b"".join(line + b"\r\n" for line in mail) + b".\r\n")
            self.assertEqual(client.codes()[-1], code)
            self.assertEqual(expected(mail)[0], code)
            harness.close_all()

    def test_long_line_ending_a_read(self) -> None:
        """A too-long line whose CRLF ends a read does not swallow the line after it (the end of the mail)."""
        intake = RecordingIntake()
        harness = Harness(ListenerSettings(recipients=frozenset({RECIPIENT}),
                                           max_line_length=LINE_LIMIT), intake=intake)
        client = harness.connect()
        client.send(envelope())
        client.send(b"ok\r\n" + b"L" * LINE_LIMIT + b"\r\n")
        client.send(b".\r\n")
        self.assertEqual(client.codes()[-1], 500)
        client.send(b"NOOP " + b"x" * 3000 + b"\r\n")
        client.send(b"NOOP\r\n")
        self.assertEqual(client.codes(), [500, 250])
        self.assertEqual(intake.received, [])
        harness.close_all()

    def test_byte_at_a_time(self) -> None:
        """A mail fed one byte at a time, dot-stuffed lines and all, arrives whole."""
        intake = RecordingIntake()
        harness = Harness(intake=intake)
        client = harness.connect()
        client.send(envelope())
        for byte in b".first\r\n..second\r\nthird.\r\n\r\n.\r\n":
            client.send(bytes([byte]))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(intake.received, [b"first\r\n.second\r\nthird.\r\n\r\n"])
        harness.close_all()

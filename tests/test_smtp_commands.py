"""
The listener's own handling of C{MAIL} and C{RCPT} (the address parsed and
validated without a Deferred) and of the command dispatch answers every
command line as C{twisted.mail}'s C{ESMTP} did.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.mail.smtp import Address, AddressError, SMTPBadSender, User
from twisted.trial.unittest import SynchronousTestCase

from fedhub.errors import PublishError, TemporarilyUnavailable
from fedhub.producers.bugzilla import smtp
from fedhub.producers.bugzilla.producer import Accepted
from fedhub.producers.bugzilla.smtp import BugmailSMTP, ListenerSettings, _parse_address
from tests.test_smtp_server import (
    CHANGED,
    NEW,
    NOT_BUGMAIL,
    RECIPIENT,
    Client,
    Harness,
    RecordingIntake,
    dot_stuffed,
    sample,
)

#: Command lines sent one at a time in a fresh session, and the reply lines
#: to each, as the listener gave them when C{ESMTP.state_COMMAND},
#: C{ESMTP.do_MAIL} and C{ESMTP.do_RCPT} handled them, except that C{HELP}
#: is answered (C{ESMTP} knew no such command) and C{RCPT} parameters are
#: refused (C{ESMTP} ignored them).
SESSIONS: list[tuple[list[bytes], list[list[bytes]]]] = [
    (
        [b'MAIL FROM:<bugzilla@redhat.com>', b'RCPT TO:<bugs@example.org>'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'mail from:<bugzilla@redhat.com>  ', b'rcpt to:<BUGS@EXAMPLE.ORG>   '],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'  MAIL   FROM:<a@b.example>', b'RCPT  TO:<bugs@example.org>'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'MAIL FROM:<>', b'RCPT TO:<bugs@example.org>'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME', b'RCPT TO:<someone@example.org>', b'RCPT TO:<x@elsewhere.example>'],
        [[b'250 2.0.0 Sender address accepted'], [b'550 5.1.1 No such recipient here'], [b'550 5.7.1 Relaying denied']],
    ),
    (
        [b'MAIL FROM:a@b.example', b'RCPT TO:bugs@example.org'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'MAIL FROM:<@relay.example:a@b.example>', b'RCPT TO:<@relay.example:bugs@example.org>'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted']],
    ),
    (
        [b'MAIL FROM:<a@b@c.example>'],
        [[b'553 5.0.0 Too many @']],
    ),
    (
        [b'MAIL FROM:<a@b.example', b'MAIL FROM:<"quoted local"@b.example>', b'RCPT TO:<"bugs"@example.org>'],
        [[b'501 5.5.4 Syntax: MAIL FROM:<address>'], [b'250 2.0.0 Sender address accepted'], [b'550 5.1.1 No such recipient here']],
    ),
    (
        [b'MAIL FROM:<a(b)@c.example>'],
        [[b'501 5.5.4 Syntax: MAIL FROM:<address>']],
    ),
    (
        [b'MAIL FROM:<a@b.example>', b'RCPT TO:<bu@gs@example.org>', b'RCPT TO:<@x>', b'RCPT TO:<bugs>', b'RCPT TO:<>'],
        [[b'250 2.0.0 Sender address accepted'], [b'553 5.0.0 Too many @'], [b'553 5.0.0 Malformed source route'], [b'550 5.7.1 Relaying denied'], [b'501 5.0.0 Syntax error']],
    ),
    (
        [b'MAIL FROM:<a@b.example>', b'MAIL FROM:<c@d.example>', b'RCPT TO:bugs@example.org extra'],
        [[b'250 2.0.0 Sender address accepted'], [b'503 5.5.1 Sender already given'], [b'555 5.5.4 Unsupported RCPT parameter']],
    ),
    (
        [b'RCPT TO:<bugs@example.org>', b'MAIL', b'MAIL FROM:', b'MAIL TO:<a@b.example>'],
        [[b'503 5.5.1 MAIL first'], [b'501 5.5.4 Syntax: MAIL FROM:<address>'], [b'501 5.5.4 Syntax: MAIL FROM:<address>'], [b'501 5.5.4 Syntax: MAIL FROM:<address>']],
    ),
    (
        [b'NOOP', b'noop   ', b'RSET x', b'VRFY a', b'EXPN b', b'HELP', b'FOO bar', b'AUTH PLAIN', b'STARTTLS', b'HELO', b'HELO   ', b'EHLO  x.example  '],
        [[b'250 2.0.0 OK'], [b'250 2.0.0 OK'], [b'250 2.0.0 OK'], [b'502 5.5.1 VRFY is not supported'], [b'502 5.5.1 VRFY is not supported'], [b'214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP'], [b'500 5.0.0 Command not implemented'], [b'502 5.5.1 AUTH is not supported'], [b'454 4.7.0 TLS not available'], [b'501 5.5.4 HELO needs a domain or address'], [b'501 5.5.4 HELO needs a domain or address'], [b'250-localhost', b'250-SIZE 1048576', b'250-8BITMIME', b'250-PIPELINING', b'250 ENHANCEDSTATUSCODES']],
    ),
    (
        [b'MAIL FROM:<a@b.example>', b'RCPT TO:<bugs@example.org>', b'RSET', b'RCPT TO:<bugs@example.org>'],
        [[b'250 2.0.0 Sender address accepted'], [b'250 2.0.0 Recipient address accepted'], [b'250 2.0.0 OK'], [b'503 5.5.1 MAIL first']],
    ),
]


class CommandTests(SynchronousTestCase):
    """
    C{MAIL}, C{RCPT} and the command dispatch.
    """

    def run_session(self, lines: list[bytes], harness: Harness | None = None) -> list[list[bytes]]:
        client = (harness or Harness()).connect()
        client.replies()
        replies = []
        for line in lines:
            client.send(line + b"\r\n")
            replies.append(client.replies())
        client.close()
        return replies

    def test_replies(self) -> None:
        """Every command line of the table gets the replies ESMTP's own handling gave."""
        for lines, expected in SESSIONS:
            self.assertEqual(self.run_session(lines), expected, lines)

    def test_envelope(self) -> None:
        """Accepted recipients and the sender reach the envelope as ESMTP's handling left them."""
        intake = RecordingIntake()
        harness = Harness(intake=intake)
        client = harness.connect()
        client.send(b"EHLO client.example\r\nMAIL FROM:<bugzilla@example.com>\r\n")
        client.send(b"RCPT TO:<" + RECIPIENT.upper().encode() + b">\r\n")
        protocol = client.protocol
        self.assertIsInstance(protocol._from, Address)
        self.assertEqual(str(protocol._from), "bugzilla@example.com")
        self.assertEqual(len(protocol._to), 1)
        user, address = protocol._to[0]
        self.assertIsInstance(user, User)
        self.assertEqual(str(user), RECIPIENT.upper())
        self.assertEqual(address, RECIPIENT)
        client.replies()
        client.send(b"DATA\r\n" + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [354, 250])
        self.assertEqual(intake.received, [sample(CHANGED)])

    def test_rcpt_parameters_refused(self) -> None:
        """RCPT parameters, none of which the listener advertises, get 555 and the recipient is not taken; without them it is."""
        harness = Harness()
        client = harness.connect()
        client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
        client.replies()
        for parameters in (b"NOTIFY=NEVER", b"ORCPT=rfc822;bugs@example.org", b"notify=success,failure", b"X"):
            client.send(b"RCPT TO:<bugs@example.org> " + parameters + b"\r\n")
            self.assertEqual(client.replies(), [b"555 5.5.4 Unsupported RCPT parameter"], parameters)
        self.assertEqual(client.protocol._to, [])
        client.send(b"RCPT TO:<bugs@example.org>  \r\nDATA\r\n" + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [250, 354, 250])
        client.close()

    def test_help_answered(self) -> None:
        """HELP, with or without a topic, gets a 214 reply naming the commands the listener takes."""
        client = Harness().connect()
        client.replies()
        client.send(b"HELP\r\nhelp DATA\r\n")
        replies = client.replies()
        self.assertEqual(len(replies), 2)
        for reply in replies:
            self.assertTrue(reply.startswith(b"214 2.0.0 "), reply)
            for command in (b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"):
                self.assertIn(command, reply)
        client.close()

    def test_unsupported_commands_are_not_errors(self) -> None:
        """HELP, VRFY, EXPN and AUTH, known but not offered, do not count toward max_errors; unknown commands do."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_errors=3)
        client = Harness(settings).connect()
        client.replies()
        client.send(b"HELP\r\nVRFY a\r\nEXPN b\r\nAUTH PLAIN\r\n" * 3 + b"NOOP\r\n")
        self.assertEqual(client.codes(), [214, 502, 502, 502] * 3 + [250])
        self.assertFalse(client.closed)
        client.send(b"FOO\r\n" * 3)
        self.assertEqual(client.codes(), [500, 500, 500, 421])
        self.assertTrue(client.closed)
        client.close()

    def test_commands_without_a_mail_are_bounded(self) -> None:
        """Answered commands that move no mail forward (NOOP, RSET, EHLO, a recipient over the limit) close the session past max_commands_per_mail, and a mail's data starts the count again."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=1,
                                    max_commands_per_mail=8)
        harness = Harness(settings)
        client = harness.connect()
        client.replies()
        rcpt = b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n"
        client.send(b"EHLO a.example\r\nMAIL FROM:<bugzilla@example.com>\r\n" + rcpt + rcpt)
        # The second recipient is over max_recipients: 452, not an error.
        self.assertEqual(client.codes(), [250, 250, 250, 452])
        client.send(b"DATA\r\n" + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [354, 250])
        # The mail taken (250) started the count again: eight commands more.
        client.send(b"NOOP\r\nRSET\r\nEHLO a.example\r\nMAIL FROM:<b@example.com>\r\n" + rcpt * 3
                    + b"NOOP\r\n")
        self.assertEqual(client.codes(), [250, 250, 250, 250, 250, 452, 452, 250])
        self.assertFalse(client.closed)
        client.send(b"NOOP\r\nNOOP\r\n")
        self.assertEqual(client.replies(),
                         [b"421 4.7.0 Too many commands without a mail, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(harness.factory.counters["command_limit_closes"], 1)
        self.assertEqual(harness.factory.counters["error_limit_closes"], 0)

    def send_mails(self, client: Client, data: bytes, mails: int) -> list[int]:
        """
        Send C{mails} mails with the body C{data} (dot-stuffed, ended by its
        lone dot) in C{client}'s session, each as C{MAIL}, C{RCPT} and
        C{DATA}, one command at a time, until the session is closed.

        @return: The codes of every reply.
        """
        codes: list[int] = []
        for _ in range(mails):
            for command in (b"MAIL FROM:<>", b"RCPT TO:<" + RECIPIENT.encode() + b">", b"DATA"):
                client.send(command + b"\r\n")
                codes += client.codes()
                if client.closed:
                    return codes
            client.send(data)
            codes += client.codes()
        return codes

    def test_refused_mails_do_not_restart_the_command_count(self) -> None:
        """Mail refused at the end of its data (4xx or 5xx: empty, not Bugzilla mail, too big, a line too long, no secret, the publisher refusing it or failing) does not start the count of commands again: sent over and over, it closes the session with 421 past max_commands_per_mail."""
        mail = dot_stuffed(sample(CHANGED))
        too_big = b"x" * 98 + b"\r\n"
        cases: list[tuple[str, dict[str, Any], bytes, Exception | None, bytes]] = [
            ("empty", {}, b".\r\n", None, b"550 5.6.0 "),
            ("not bugmail", {}, dot_stuffed(sample(NOT_BUGMAIL)), None, b"550 5.6.0 "),
            ("too big", {"max_message_size": 1000}, too_big * 11 + b".\r\n", None, b"552 5.3.4 "),
            ("line too long", {"max_line_length": 100}, too_big[:-2] * 2 + b"\r\n.\r\n", None,
             b"500 5.5.2 "),
            ("no secret", {"secret": b"s3cret"}, mail, None, b"550 5.7.1 "),
            ("unavailable", {}, mail, TemporarilyUnavailable("the broker is away"), b"451 4.3.0 "),
            ("outbox full", {}, mail,
             TemporarilyUnavailable("the outbox of domain test is full: 1 messages waiting (limit 1)"),
             b"452 4.3.1 "),
            ("publisher refuses", {}, mail, PublishError("larger than the whole outbox"),
             b"554 5.3.0 "),
        ]
        for name, options, data, failure, refusal in cases:
            secret = options.pop("secret", None)
            settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=1,
                                        max_commands_per_mail=8, **options)
            harness = Harness(settings, secret=secret)
            harness.publisher.failure = failure
            client = harness.connect()
            client.replies()
            client.send(b"MAIL FROM:<>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"
                        + data)
            # The refusal, as the listener gives it.
            replies = client.replies()
            self.assertEqual(len(replies), 4, (name, replies))
            self.assertTrue(replies[-1].startswith(refusal), (name, replies))
            refused = int(refusal[:3])
            # Three commands a mail: the third mail's DATA is the ninth
            # command, one over the limit.
            self.assertEqual(self.send_mails(client, data, 10),
                             [250, 250, 354, refused, 250, 250, 421], name)
            self.assertTrue(client.closed, name)
            self.assertEqual(harness.factory.counters["command_limit_closes"], 1, name)
            self.assertEqual(harness.publisher.published, [], name)

    def test_mail_answered_late_does_not_restart_the_command_count(self) -> None:
        """A mail answered 451 after delivery_timeout does not start the count of commands again, even when its hand-over then succeeds."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=1,
                                    max_commands_per_mail=8)
        harness = Harness(settings)
        harness.publisher.hold = True
        client = harness.connect()
        client.replies()
        client.send(b"MAIL FROM:<>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"
                    + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes(), [250, 250, 354])
        harness.clock.advance(settings.delivery_timeout)
        self.assertEqual(client.replies(),
                         [b"451 4.4.1 Timed out handing the mail over, try again later"])
        harness.publisher.held[0][1].callback(None)
        self.assertEqual(client.replies(), [])
        client.send(b"NOOP\r\n" * 5)
        self.assertEqual(client.codes(), [250] * 5)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.replies(),
                         [b"421 4.7.0 Too many commands without a mail, closing connection"])
        self.assertTrue(client.closed)

    def test_taken_mails_restart_the_command_count(self) -> None:
        """Every mail handed over (250: published, or a duplicate) starts the count of commands again, so a session sending them is never closed by max_commands_per_mail, and one refused mail before them does not count against the next."""
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=1,
                                    max_commands_per_mail=8)
        # Published, then duplicates of it.
        harness = Harness(settings)
        client = harness.connect()
        client.replies()
        mail = dot_stuffed(sample(CHANGED))
        self.assertEqual(self.send_mails(client, mail, 20), [250, 250, 354, 250] * 20)
        self.assertFalse(client.closed)
        self.assertEqual(len(harness.publisher.published), 1)
        self.assertEqual(harness.factory.counters["mails_duplicate"], 19)
        # A refused mail, then a taken one: the count starts again from the
        # 250, so eight commands more are answered and the ninth closes.
        harness = Harness(settings)
        client = harness.connect()
        client.replies()
        self.assertEqual(self.send_mails(client, b".\r\n", 1), [250, 250, 354, 550])
        self.assertEqual(self.send_mails(client, dot_stuffed(sample(NEW)), 1), [250, 250, 354, 250])
        client.send(b"NOOP\r\n" * 8)
        self.assertEqual(client.codes(), [250] * 8)
        self.assertFalse(client.closed)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.codes(), [421])
        self.assertTrue(client.closed)

    def quarantining_session(self) -> tuple[Harness, Any]:
        """
        A listener with a quarantine and C{max_commands_per_mail} 8, and a
        session on it past its greeting.
        """
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=1,
                                    max_commands_per_mail=8)
        harness = Harness(settings, quarantine_dir=self.mktemp(), quarantine_max_files=100)
        client = harness.connect()
        client.replies()
        return harness, client

    def test_quarantined_mails_do_not_restart_the_command_count(self) -> None:
        """Junk mail kept in the quarantine is answered 250 but does not start the count of commands again: sent over and over on one session, it is closed with 421 past max_commands_per_mail, long before the quarantine's own limits."""
        harness, client = self.quarantining_session()
        # Three commands a mail: the third mail's DATA is the ninth command,
        # one over the limit.
        self.assertEqual(self.send_mails(client, dot_stuffed(sample(NOT_BUGMAIL)), 10),
                         [250, 250, 354, 250, 250, 250, 354, 250, 250, 250, 421])
        self.assertTrue(client.closed)
        self.assertEqual(harness.factory.counters["mails_quarantined"], 2)
        self.assertEqual(harness.factory.counters["command_limit_closes"], 1)
        self.assertEqual(harness.publisher.published, [])

    def test_good_mail_after_quarantined_restarts_the_command_count(self) -> None:
        """A mail handed over after a quarantined one starts the count of commands again: the commands of the quarantined mail no longer count."""
        harness, client = self.quarantining_session()
        self.assertEqual(self.send_mails(client, b".\r\n", 1), [250, 250, 354, 250])
        self.assertEqual(harness.factory.counters["mails_quarantined"], 1)
        self.assertEqual(self.send_mails(client, dot_stuffed(sample(CHANGED)), 1),
                         [250, 250, 354, 250])
        self.assertEqual(len(harness.publisher.published), 1)
        client.send(b"NOOP\r\n" * 8)
        self.assertEqual(client.codes(), [250] * 8)
        self.assertFalse(client.closed)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.codes(), [421])
        self.assertTrue(client.closed)

    def session_time_harness(self) -> tuple[Harness, RecordingIntake]:
        intake = RecordingIntake()
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_session_time=60.0,
                                    idle_timeout=50.0)
        return Harness(settings, intake=intake), intake

    def test_session_time_between_mails(self) -> None:
        """A session that stays active (NOOP before every idle_timeout) past max_session_time is closed with 421 at once."""
        harness, _ = self.session_time_harness()
        client = harness.connect()
        client.replies()
        for _ in range(2):
            harness.clock.advance(29)
            client.send(b"NOOP\r\n")
            self.assertEqual(client.codes(), [250])
        client.send(b"MAIL FROM:<bugzilla@example.com>\r\n")
        self.assertEqual(client.codes(), [250])
        harness.clock.advance(2)
        self.assertEqual(client.replies(), [b"421 4.4.2 Session lasted too long, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(harness.factory.counters["session_time_closes"], 1)
        self.assertEqual(harness.factory.counters["idle_timeouts"], 0)

    def test_session_time_lets_the_mail_in_progress_finish(self) -> None:
        """A session past max_session_time during a mail's data, or its hand-over, gets the mail's answer first, then 421."""
        harness, intake = self.session_time_harness()
        mail = dot_stuffed(sample(CHANGED))
        envelope = b"MAIL FROM:<bugzilla@example.com>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"
        # Time runs out while the data comes in.
        client = harness.connect()
        client.replies()
        client.send(envelope + mail[:100])
        self.assertEqual(client.codes(), [250, 250, 354])
        harness.clock.advance(40)
        client.send(mail[100:200])
        harness.clock.advance(21)
        self.assertFalse(client.closed)
        self.assertEqual(harness.factory.counters["session_time_closes"], 1)
        client.send(mail[200:] + b"NOOP\r\n")
        self.assertEqual(client.replies()[0][:4], b"250 ")
        self.assertTrue(client.closed)
        self.assertEqual(len(intake.received), 1)
        # Time runs out while the mail is handed over.
        intake.result = Deferred()
        client = harness.connect()
        client.replies()
        client.send(envelope + mail)
        self.assertEqual(client.codes(), [250, 250, 354])
        harness.clock.advance(61)
        self.assertFalse(client.closed)
        intake.result.callback(Accepted("published", None, None, "id-2"))
        self.assertEqual(client.replies(), [b"250 2.0.0 Ok: published as id-2",
                                            b"421 4.4.2 Session lasted too long, closing connection"])
        self.assertTrue(client.closed)
        self.assertEqual(harness.factory.counters["session_time_closes"], 2)
        self.assertEqual(harness.factory.counters["mails_published"], 2)

    def test_command_limit_leaves_room_for_a_mail(self) -> None:
        """max_commands_per_mail below what a mail to max_recipients needs is refused, naming the least it can be."""
        with self.assertRaises(ValueError) as caught:
            ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=50,
                             max_commands_per_mail=54)
        self.assertIn("at least max_recipients + 5 (55)", str(caught.exception))
        settings = ListenerSettings(recipients=frozenset({RECIPIENT}), max_recipients=50,
                                    max_commands_per_mail=55)
        self.assertEqual(settings.max_commands_per_mail, 55)
        self.assertEqual(ListenerSettings(recipients=frozenset({RECIPIENT})).max_commands_per_mail,
                         100)
        # Not given, it makes room for max_recipients as a file that sets
        # only max_recipients expects.
        self.assertEqual(ListenerSettings(recipients=frozenset({RECIPIENT}),
                                          max_recipients=100).max_commands_per_mail, 105)

    def test_deferred_validation(self) -> None:
        """A validation that answers with a Deferred is still waited for."""
        sender: Deferred[object] = Deferred()
        recipient: Deferred[object] = Deferred()
        self.patch(BugmailSMTP, "validateFrom", lambda self, helo, origin: sender)
        self.patch(BugmailSMTP, "validateTo", lambda self, user: recipient)
        client = Harness().connect()
        client.replies()
        client.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(client.replies(), [])
        sender.callback(Address(b"a@example.com"))
        self.assertEqual(client.replies(), [b"250 2.0.0 Sender address accepted"])
        client.send(b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n")
        self.assertEqual(client.replies(), [])
        recipient.callback(RECIPIENT)
        self.assertEqual(client.replies(), [b"250 2.0.0 Recipient address accepted"])
        self.assertEqual(client.protocol._to[0][1], RECIPIENT)

    def test_failed_validation(self) -> None:
        """A refused sender gets its code, and a validation that fails unexpectedly gets 451 and is logged."""
        def refuse(self: BugmailSMTP, helo: object, origin: Address) -> object:
            raise SMTPBadSender(origin, 550, "not you")

        def broken(self: BugmailSMTP, user: User) -> object:
            raise RuntimeError("broken")

        self.patch(BugmailSMTP, "validateFrom", refuse)
        self.patch(BugmailSMTP, "validateTo", broken)
        self.assertEqual(
            self.run_session([b"MAIL FROM:<a@example.com>"]),
            [[b"550 5.0.0 Cannot receive from specified address <a@example.com>: not you"]],
        )
        self.patch(BugmailSMTP, "validateFrom", lambda self, helo, origin: succeed(origin))
        self.assertEqual(
            self.run_session([b"MAIL FROM:<a@example.com>", b"RCPT TO:<" + RECIPIENT.encode() + b">"]),
            [[b"250 2.0.0 Sender address accepted"],
             [b"451 4.0.0 Requested action aborted: local error in processing"]],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def _address_or_error(make: object, path: bytes) -> object:
    try:
        address = make(path, b"default.example")  # type: ignore[operator]
    except AddressError as e:
        return ("error", str(e))
    return (type(address), vars(address), bytes(address))


class ParseAddressTests(SynchronousTestCase):
    """
    L{_parse_address}, the short cut for plain paths, against
    C{twisted.mail}'s C{Address}.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=40) | st.text(alphabet="ab.-+_=@<>\"' :,%!()[]", max_size=30).map(str.encode))
    @example(b"<bugs@example.org>")
    @example(b"bugs@example.org")
    @example(b"<.a..b.@x.>")
    @example(b"<a@b")
    @example(b"a@b>")
    @example(b"<a@b@c>")
    @example(b"<@relay:a@b>")
    @example(b"<a>")
    @example(b"<>")
    @example(b'<"a b"@c>')
    def test_same_as_address(self, path: bytes) -> None:
        """Any path gives the address (or the error) Address gives."""
        self.assertEqual(_address_or_error(_parse_address, path), _address_or_error(Address, path))

    def test_plain_path_is_short_cut(self) -> None:
        """A plain path does not go through Address's tokenizer."""
        calls: list[bytes] = []
        original = Address.__init__

        def counting(self: Address, addr: object, defaultDomain: object = None) -> None:
            calls.append(addr)  # type: ignore[arg-type]
            original(self, addr, defaultDomain)

        self.patch(Address, "__init__", counting)
        self.assertEqual(str(_parse_address(b"<bugs@example.org>", b"x")), "bugs@example.org")
        self.assertEqual(calls, [])
        self.assertEqual(str(_parse_address(b'<"bugs"@example.org>', b"x")), '"bugs"@example.org')
        self.assertEqual(calls, [b'<"bugs"@example.org>'])


class FrequentReplyTests(SynchronousTestCase):
    """
    The reply lines made once.
    """

    def sent(self, replies: list[tuple[int, bytes]]) -> list[bytes]:
        client = Harness().connect()
        client.replies()
        for code, text in replies:
            client.protocol.sendCode(code, text)
        return client.replies()

    def test_same_as_made_each_time(self) -> None:
        """Each reply made once is the line sendCode writes when it makes it."""
        replies = list(smtp._FREQUENT_REPLIES)
        self.assertTrue(replies)
        once = self.sent(replies)
        self.patch(smtp, "_FREQUENT_REPLIES", {})
        self.assertEqual(once, self.sent(replies))
        self.assertEqual(len(once), len(replies))

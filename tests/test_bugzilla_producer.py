"""
Tests for L{fedhub.producers.bugzilla.producer}: bug events to messages, the
mail schema, fingerprints and de-duplication, the quarantine, failure
classification, the event publisher, the intake and the C{bugzilla-smtp}
plugin.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings, parse_config
from fedhub.errors import (
    ConfigError,
    MessageError,
    NotConnected,
    PublishError,
    SchemaValidationError,
    TemporarilyUnavailable,
    UnknownPlugin,
)
from fedhub.interfaces import IProducerPlugin
from fedhub.plugins import PluginContext, producer_plugins
from fedhub.producers.bugzilla.parser import (
    BugEvent,
    MalformedBugmail,
    NotBugmail,
    parse_bugmail,
)
from fedhub.producers.bugzilla.producer import (
    MAIL_SCHEMA,
    BugmailIntake,
    BugzillaSMTPPlugin,
    Deduplicator,
    EventPublisher,
    Quarantine,
    build_body,
    build_message,
    classify_failure,
    event_fingerprint,
    load_mail_schema,
    message_id_for,
)
from fedhub.schema import SchemaRegistry, registry
from fedhub.text import SUMMARY_HEADER
from tests.test_smtp_server import CHANGED, NEW, NOT_BUGMAIL, FakePublisher, copy_for, sample, topic

DATA = Path(__file__).parent / "data" / "bugzilla"
RHBZ = "12_rhbz_changed_needinfo_RECONSTRUCTED.eml"


def event(name: str = CHANGED) -> BugEvent:
    """
    The parsed event of a sample mail.
    """
    return parse_bugmail(sample(name))


def minimal(**changes: Any) -> BugEvent:
    """
    A small hand-made event.
    """
    fields: dict[str, Any] = dict(
        bug_id=7,
        summary="It breaks",
        product="Fedora",
        component="python-requests",
        who="jdoe@example.com",
        event_type="changed",
        url="https://bz.example/show_bug.cgi?id=7",
        date="Tue, 23 Jan 2024 14:05:09 +0000",
        source="https://bz.example/",
    )
    fields.update(changes)
    return BugEvent(**fields)


def only_this_plugin(kind: str, name: str) -> Any:
    """
    A plugin lookup that knows only the C{bugzilla-smtp} producer, so these
    tests do not depend on every installed plugin module importing.
    """
    if (kind, name) != ("producer", "bugzilla-smtp"):
        raise UnknownPlugin(kind, name, ["bugzilla-smtp"])
    return BugzillaSMTPPlugin()


class SchemaTests(SynchronousTestCase):
    """
    The mail schema: shipped, registered, and matched by real mail.
    """

    def test_registered(self) -> None:
        """The schema is registered under its name in the process-wide registry."""
        self.assertTrue(registry.known(MAIL_SCHEMA))
        self.assertEqual(load_mail_schema()["$id"], MAIL_SCHEMA)

    def test_every_sample_validates(self) -> None:
        """The message of every sample bugmail validates against its own schema."""
        names = sorted(p.name for p in DATA.glob("*.eml") if p.name != NOT_BUGMAIL)
        self.assertGreater(len(names), 5)
        for name in names:
            message = build_message(event(name), topic)
            self.assertTrue(registry.validate(message), name)

    def test_invalid_body_refused(self) -> None:
        """A body that breaks the schema (bug id 0, unknown event type) fails validation."""
        message = build_message(minimal(bug_id=0), topic)
        self.assertRaises(SchemaValidationError, registry.validate, message)
        message = build_message(minimal(event_type="exploded"), topic)
        self.assertRaises(SchemaValidationError, registry.validate, message)


class MessageTests(SynchronousTestCase):
    """
    L{build_message} and L{build_body}.
    """

    def test_topics(self) -> None:
        """new goes to bugzilla.bug.new; changed, comment, attachment and dep_changed to bugzilla.bug.update."""
        self.assertEqual(build_message(minimal(event_type="new"), topic).topic, "org.example.test.bugzilla.bug.new")
        for kind in ("changed", "comment", "attachment", "dep_changed"):
            message = build_message(minimal(event_type=kind), topic)
            self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update", kind)

    def test_hub_topic(self) -> None:
        """With the hub's topic function the topic is <prefix>.<env>.bugzilla.bug.update."""
        hub = HubSettings(topic_prefix="org.fedoraproject", environment="prod")
        self.assertEqual(build_message(event(), hub.topic).topic, "org.fedoraproject.prod.bugzilla.bug.update")

    def test_body_leaves_out_recipient_parts(self) -> None:
        """The body has the event's fields but not Message-ID, reasons or the per-recipient headers."""
        body = build_body(event())
        self.assertEqual(body["bug_id"], 218297)
        for key in ("message_id", "reasons", "watch_reason"):
            self.assertNotIn(key, body)
        self.assertNotIn("X-Bugzilla-Reason", body["headers"])
        self.assertNotIn("X-Bugzilla-Watch-Reason", body["headers"])
        self.assertEqual(body["headers"]["X-Bugzilla-Product"], "Virtualization")

    def test_headers(self) -> None:
        """The summary header holds the event's summary line; the changer and assignee get user headers."""
        message = build_message(event(), topic)
        self.assertEqual(message.headers[SUMMARY_HEADER], event().summary_line())
        self.assertIs(message.headers["fedora_messaging_user_awaneeshkmr@gmail.com"], True)
        self.assertIs(message.headers["fedora_messaging_user_virtualization_kvm@kernel-bugs.osdl.org"], True)
        self.assertFalse(any(h.startswith("fedora_messaging_rpm_") for h in message.headers))
        self.assertEqual(message.schema, MAIL_SCHEMA)

    def test_package_header_for_fedora(self) -> None:
        """A Fedora bug's component becomes a fedora_messaging_rpm_ header."""
        message = build_message(event(RHBZ), topic)
        self.assertIs(message.headers["fedora_messaging_rpm_python-requests"], True)

    def test_hostile_values_in_headers(self) -> None:
        """Control characters in the summary are escaped; logins that are not plain addresses give no header."""
        message = build_message(minimal(summary="x\n\x1b[31mred", who="a b@example.com",
                                        assignee="Bob@Example.COM", component="bad name"), topic)
        self.assertNotIn("\n", message.headers[SUMMARY_HEADER])
        self.assertNotIn("\x1b", message.headers[SUMMARY_HEADER])
        users = sorted(h for h in message.headers if h.startswith("fedora_messaging_user_"))
        self.assertEqual(users, ["fedora_messaging_user_bob@example.com"])
        self.assertFalse(any(h.startswith("fedora_messaging_rpm_") for h in message.headers))

    def test_enrichment(self) -> None:
        """Enrichment lands in the body's enrichment key and does not change the id."""
        plain = build_message(event(), topic)
        rich = build_message(event(), topic, enrichment={"priority": "high"})
        self.assertEqual(rich.body["enrichment"], {"priority": "high"})
        self.assertNotIn("enrichment", plain.body)
        self.assertEqual(plain.id, rich.id)


class FingerprintTests(SynchronousTestCase):
    """
    L{event_fingerprint} and L{message_id_for}.
    """

    def test_copies_share_fingerprint_and_id(self) -> None:
        """Copies for other recipients have the same fingerprint and message id."""
        raw = sample(CHANGED)
        one = parse_bugmail(copy_for(raw, "a@example.net", "id-1@x", "AssignedTo"))
        two = parse_bugmail(copy_for(raw, "b@example.net", "id-2@x", "CC"))
        self.assertNotEqual(one.message_id, two.message_id)
        self.assertEqual(event_fingerprint(one), event_fingerprint(two))
        self.assertEqual(build_message(one, topic).id, build_message(two, topic).id)

    def test_other_change_time_differs(self) -> None:
        """The same change at another time is another event."""
        self.assertNotEqual(
            event_fingerprint(minimal()), event_fingerprint(minimal(date="Tue, 23 Jan 2024 14:05:10 +0000"))
        )

    def test_message_id_is_a_uuid(self) -> None:
        """The derived message id is a stable UUID string."""
        key = event_fingerprint(minimal())
        self.assertEqual(uuid.UUID(message_id_for(key)).version, 5)
        self.assertEqual(message_id_for(key), message_id_for(key))


class DeduplicatorTests(SynchronousTestCase):
    """
    L{Deduplicator}.
    """

    def test_window(self) -> None:
        """A key is seen until window seconds after it was added."""
        clock = Clock()
        dedup = Deduplicator(10.0, 100, clock)
        self.assertFalse(dedup.seen("a"))
        dedup.add("a")
        clock.advance(9.5)
        self.assertTrue(dedup.seen("a"))
        clock.advance(0.5)
        self.assertFalse(dedup.seen("a"))
        self.assertEqual(len(dedup), 0)

    def test_bounded(self) -> None:
        """Beyond max_entries the oldest keys are forgotten first."""
        dedup = Deduplicator(100.0, 2, Clock())
        for key in "abc":
            dedup.add(key)
        self.assertEqual([dedup.seen(k) for k in "abc"], [False, True, True])

    def test_add_again_refreshes(self) -> None:
        """Adding a key again restarts its window and makes it the newest."""
        clock = Clock()
        dedup = Deduplicator(10.0, 2, clock)
        dedup.add("a")
        clock.advance(5)
        dedup.add("b")
        dedup.add("a")
        clock.advance(6)
        self.assertTrue(dedup.seen("a"))
        self.assertTrue(dedup.seen("b"))
        dedup.add("c")
        self.assertFalse(dedup.seen("b"))

    def test_invalid(self) -> None:
        """A negative window or no room is refused."""
        self.assertRaises(ValueError, Deduplicator, -1.0, 1, Clock())
        self.assertRaises(ValueError, Deduplicator, 1.0, 0, Clock())


class QuarantineTests(SynchronousTestCase):
    """
    L{Quarantine}.
    """

    def test_save(self) -> None:
        """A saved mail is kept byte for byte, private, with a note saying why."""
        directory = self.mktemp()
        quarantine = Quarantine(directory, 10, 1000, Clock())
        self.assertFalse(os.path.exists(directory))
        path = quarantine.save(b"mail", "not bugmail", "launchpad", "127.0.0.1:1")
        assert path is not None
        self.assertEqual(Path(path).read_bytes(), b"mail")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        note = json.loads(Path(path[: -len(".eml")] + ".json").read_text())
        self.assertEqual((note["reason"], note["code"], note["source"]), ("not bugmail", "launchpad", "127.0.0.1:1"))

    def test_file_cap_counts_existing(self) -> None:
        """Mails already in the directory count against max_files."""
        directory = self.mktemp()
        os.makedirs(directory)
        Path(directory, "old.eml").write_bytes(b"x")
        quarantine = Quarantine(directory, 2, 1000, Clock())
        self.assertIsNotNone(quarantine.save(b"1", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"2", "r", "c", "s"))

    def test_byte_cap(self) -> None:
        """A mail that would pass max_bytes is refused."""
        quarantine = Quarantine(self.mktemp(), 10, 10, Clock())
        self.assertIsNotNone(quarantine.save(b"123456", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"12345", "r", "c", "s"))


class ClassifyTests(SynchronousTestCase):
    """
    L{classify_failure}.
    """

    def test_temporary(self) -> None:
        """TemporarilyUnavailable (and NotConnected) is temporary; unexpected errors too."""
        self.assertEqual(classify_failure(TemporarilyUnavailable("broker away")).kind, "unavailable")
        self.assertTrue(classify_failure(NotConnected("no connection")).temporary)
        refusal = classify_failure(RuntimeError("bug"))
        self.assertEqual((refusal.temporary, refusal.kind), (True, "internal"))
        self.assertNotIn("bug", refusal.reason)

    def test_parser_failure_temporary(self) -> None:
        """
        A mail the parser failed on unexpectedly (a bug, memory running out)
        is kept by its sender (451), not bounced as malformed.
        """
        from fedhub.producers.bugzilla import parser

        def broken(raw: bytes) -> Any:
            raise MemoryError()

        self.patch(parser, "_parse", broken)
        with self.assertRaises(MalformedBugmail) as raised:
            parser.parse_bugmail(sample(CHANGED))
        refusal = classify_failure(raised.exception)
        self.assertEqual((refusal.temporary, refusal.kind), (True, "internal"))

    def test_storage(self) -> None:
        """A full outbox or disk, by reason, by attribute or by cause, is a storage shortage."""
        self.assertEqual(classify_failure(TemporarilyUnavailable("the outbox of domain x is full")).kind, "storage")
        error = TemporarilyUnavailable("could not store")
        error.disk_full = True  # type: ignore[attr-defined]
        self.assertEqual(classify_failure(error).kind, "storage")
        try:
            try:
                raise OSError(28, "No space left on device")
            except OSError as e:
                raise TemporarilyUnavailable("store failed") from e
        except TemporarilyUnavailable as e:
            self.assertEqual(classify_failure(e).kind, "storage")

    def test_permanent(self) -> None:
        """Not bugmail, malformed mail and invalid messages are content errors; other publish errors rejections."""
        for error in (NotBugmail("launchpad"), MalformedBugmail("broken"), MessageError("bad"),
                      SchemaValidationError("s", "no")):
            refusal = classify_failure(error)
            self.assertEqual((refusal.temporary, refusal.kind), (False, "content"), error)
        self.assertEqual(classify_failure(PublishError("too big")).kind, "rejected")
        self.assertEqual(classify_failure(NotBugmail("x\r\ny")).reason, "x\\r\\ny")


class EventPublisherTests(SynchronousTestCase):
    """
    L{EventPublisher}.
    """

    def test_publishes(self) -> None:
        """The event is published as its message, and the result is the message."""
        publisher = FakePublisher()
        message = self.successResultOf(EventPublisher(publisher, topic)(event(), b""))
        self.assertEqual(publisher.published, [message])
        self.assertEqual(message.id, build_message(event(), topic).id)

    def test_waits_for_publisher(self) -> None:
        """The result waits for the publisher's Deferred and carries its failure."""
        publisher = FakePublisher()
        publisher.hold = True
        d = EventPublisher(publisher, topic)(event(), b"")
        self.assertNoResult(d)
        publisher.held[0][1].errback(TemporarilyUnavailable("later"))
        self.failureResultOf(d, TemporarilyUnavailable)

    def test_enrich(self) -> None:
        """An enricher's dict is added to the body."""
        publisher = FakePublisher()
        calls: list[int] = []

        def enrich(e: BugEvent) -> Deferred[dict[str, Any] | None]:
            calls.append(e.bug_id)
            return succeed({"cc_count": 3})

        message = self.successResultOf(EventPublisher(publisher, topic, enrich=enrich)(event(), b""))
        self.assertEqual(calls, [218297])
        self.assertEqual(message.body["enrichment"], {"cc_count": 3})

    def test_enrich_failure_publishes_without(self) -> None:
        """A failing enricher is logged and the message is published without enrichment."""
        publisher = FakePublisher()
        result = EventPublisher(publisher, topic, enrich=lambda e: fail(RuntimeError("api down")))(event(), b"")
        message = self.successResultOf(result)
        self.assertNotIn("enrichment", message.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_enrich_non_dict_ignored(self) -> None:
        """An enricher returning something other than a dict or None is ignored."""
        publisher = FakePublisher()
        enrich: Any = lambda e: succeed(["not", "a", "dict"])
        message = self.successResultOf(EventPublisher(publisher, topic, enrich=enrich)(event(), b""))
        self.assertNotIn("enrichment", message.body)

    def test_schema_checked_before_publishing(self) -> None:
        """A message that breaks its schema fails with a MessageError and is not published."""
        publisher = FakePublisher()
        self.failureResultOf(EventPublisher(publisher, topic)(minimal(bug_id=0), b""), SchemaValidationError)
        self.assertEqual(publisher.published, [])

    def test_own_registry(self) -> None:
        """A separate schema registry without the mail schema falls back to the base schema."""
        publisher = FakePublisher()
        self.successResultOf(EventPublisher(publisher, topic, schemas=SchemaRegistry())(minimal(bug_id=0), b""))
        self.assertEqual(len(publisher.published), 1)


class IntakeTests(SynchronousTestCase):
    """
    L{BugmailIntake}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.publisher = FakePublisher()

    def intake(self, **kwargs: Any) -> BugmailIntake:
        return BugmailIntake(EventPublisher(self.publisher, topic), clock=self.clock, **kwargs)

    def test_published_then_duplicate(self) -> None:
        """The first copy is published; a copy within the window is a duplicate with the same id; after it, published again."""
        intake = self.intake(dedup_window=60.0)
        first = self.successResultOf(intake.receive(sample(CHANGED), "peer"))
        self.assertEqual(first.outcome, "published")
        second = self.successResultOf(intake.receive(copy_for(sample(CHANGED), "x@y.example", "m@x"), "peer"))
        self.assertEqual((second.outcome, second.message_id), ("duplicate", first.message_id))
        self.clock.advance(61)
        self.assertEqual(self.successResultOf(intake.receive(sample(CHANGED), "peer")).outcome, "published")
        self.assertEqual(len(self.publisher.published), 2)

    def test_failure_not_remembered(self) -> None:
        """A failed hand-over is not remembered: the retry publishes."""
        intake = self.intake()
        self.publisher.failure = TemporarilyUnavailable("later")
        self.failureResultOf(intake.receive(sample(CHANGED), "peer"), TemporarilyUnavailable)
        self.publisher.failure = None
        self.assertEqual(self.successResultOf(intake.receive(sample(CHANGED), "peer")).outcome, "published")

    def test_not_bugmail(self) -> None:
        """Mail that is not bugmail fails with NotBugmail and nothing is published."""
        self.failureResultOf(self.intake().receive(sample(NOT_BUGMAIL), "peer"), NotBugmail)
        self.assertEqual(self.publisher.published, [])

    def test_quarantine(self) -> None:
        """With a quarantine, refused mail is kept there and accepted as quarantined."""
        directory = self.mktemp()
        intake = self.intake(quarantine=Quarantine(directory, 5, 10**6, self.clock))
        accepted = self.successResultOf(intake.receive(sample(NOT_BUGMAIL), "peer"))
        self.assertEqual(accepted.outcome, "quarantined")
        self.assertEqual(Path(accepted.detail).read_bytes(), sample(NOT_BUGMAIL))

    def test_quarantine_invalid_message(self) -> None:
        """A message the publisher calls invalid is quarantined too, but a temporary failure never is."""
        intake = self.intake(quarantine=Quarantine(self.mktemp(), 5, 10**6, self.clock))
        self.publisher.failure = MessageError("bad")
        self.assertEqual(self.successResultOf(intake.receive(sample(CHANGED), "peer")).outcome, "quarantined")
        self.publisher.failure = TemporarilyUnavailable("later")
        self.failureResultOf(intake.receive(sample(NEW), "peer"), TemporarilyUnavailable)

    def test_quarantine_full(self) -> None:
        """When the quarantine is full, the mail is refused with its own reason."""
        intake = self.intake(quarantine=Quarantine(self.mktemp(), 1, 10**6, self.clock))
        self.successResultOf(intake.receive(sample(NOT_BUGMAIL), "peer"))
        self.failureResultOf(intake.receive(sample(NOT_BUGMAIL), "peer"), NotBugmail)

    def test_quarantine_unwritable(self) -> None:
        """When the quarantine can not be written, the mail is refused for now and the error logged."""
        blocker = self.mktemp()
        Path(blocker).write_bytes(b"a file, not a directory")
        intake = self.intake(quarantine=Quarantine(os.path.join(blocker, "q"), 5, 10**6, self.clock))
        self.failureResultOf(intake.receive(sample(NOT_BUGMAIL), "peer"), TemporarilyUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_callback_result_names_message(self) -> None:
        """A callback returning a message id string makes it the accepted message id."""
        intake = BugmailIntake(lambda e, raw: succeed("custom-id"), clock=self.clock)
        accepted = self.successResultOf(intake.receive(sample(CHANGED), "peer"))
        self.assertEqual((accepted.outcome, accepted.message_id), ("published", "custom-id"))
        assert accepted.event is not None
        self.assertEqual(accepted.event.bug_id, 218297)

    def test_callback_raising_fails(self) -> None:
        """A callback that raises synchronously fails the hand-over with its exception."""
        def boom(e: BugEvent, raw: bytes) -> Deferred[None]:
            raise RuntimeError("boom")

        self.failureResultOf(BugmailIntake(boom, clock=self.clock).receive(sample(CHANGED)), RuntimeError)

    def test_parser_type_error_fails(self) -> None:
        """An exception from the parse function other than a bugmail error fails the hand-over."""
        def parse(raw: bytes) -> BugEvent:
            raise TypeError("no")

        intake = BugmailIntake(lambda e, raw: succeed(None), clock=self.clock, parse=parse)
        self.failureResultOf(intake.receive(b"x"), TypeError)


class PluginTests(SynchronousTestCase):
    """
    The C{bugzilla-smtp} plugin.
    """

    def context(self, reactor: Any, **options: Any) -> PluginContext:
        plugin = BugzillaSMTPPlugin()
        values = {key: option.default for key, option in plugin.options.items() if not option.required}
        values.update(recipients=["bugs@example.org"], listen="tcp:0:interface=127.0.0.1")
        values.update(options)
        return PluginContext(
            name="bugzilla-mail",
            domain="community",
            options=values,
            publisher=FakePublisher(),
            reactor=reactor,
            hub=HubSettings(topic_prefix="org.example", environment="stg", state_dir=self.mktemp()),
        )

    def test_provides(self) -> None:
        """The plugin provides IPlugin and IProducerPlugin and is named bugzilla-smtp."""
        plugin = BugzillaSMTPPlugin()
        verifyObject(IPlugin, plugin)
        verifyObject(IProducerPlugin, plugin)
        self.assertEqual(plugin.name, "bugzilla-smtp")

    def test_installed(self) -> None:
        """getPlugins finds the plugin under its name."""
        self.assertIsInstance(producer_plugins()["bugzilla-smtp"], BugzillaSMTPPlugin)

    def test_build_does_no_io(self) -> None:
        """build returns a named service that has not started listening."""
        reactor = MemoryReactorClock()
        service = BugzillaSMTPPlugin().build(self.context(reactor))
        verifyObject(IService, service)
        self.assertEqual(service.name, "bugzilla-mail")
        self.assertEqual(reactor.tcpServers, [])

    def test_built_listener_publishes(self) -> None:
        """The built listener listens on the configured endpoint and publishes to the context's publisher and topics."""
        from tests.test_smtp_server import Client, dot_stuffed, envelope

        reactor = MemoryReactorClock()
        # Parsed in this process: a memory reactor spawns no parse workers
        # (tests/test_bugzilla_workers.py runs them).
        context = self.context(reactor, max_recipients=1, parse_workers=0)
        service: Any = BugzillaSMTPPlugin().build(context)
        service.startService()
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        self.assertEqual(service.settings.max_recipients, 1)
        client = Client(service.factory, "127.0.0.1", 5)
        client.send(envelope(("bugs@example.org",)) + dot_stuffed(sample(CHANGED)))
        self.assertEqual(client.codes()[-1], 250)
        [message] = context.publisher.published  # type: ignore[attr-defined]
        self.assertEqual(message.topic, "org.example.stg.bugzilla.bug.update")
        client.close()
        self.successResultOf(service.stopService())

    def test_quarantine_option(self) -> None:
        """quarantine_dir makes the built listener keep refused mail and answer 250."""
        from tests.test_smtp_server import Client, dot_stuffed, envelope

        reactor = MemoryReactorClock()
        directory = self.mktemp()
        service: Any = BugzillaSMTPPlugin().build(
            self.context(reactor, quarantine_dir=directory, parse_workers=0))
        service.startService()
        client = Client(service.factory, "127.0.0.1", 5)
        client.send(envelope(("bugs@example.org",)) + dot_stuffed(sample(NOT_BUGMAIL)))
        self.assertEqual(client.codes()[-1], 250)
        self.assertEqual(len([n for n in os.listdir(directory) if n.endswith(".eml")]), 1)
        client.close()
        self.successResultOf(service.stopService())

    def config(self, extra: str) -> str:
        return (
            '[domains.community]\nbroker = "memory"\n\n[[producers]]\nname = "bugzilla-mail"\n'
            'plugin = "bugzilla-smtp"\ndomain = "community"\n' + extra
        )

    def test_config_defaults(self) -> None:
        """A configuration naming only recipients gets every default, listening on 127.0.0.1:8025."""
        config = parse_config(self.config('recipients = ["bugs@example.org"]\n'), find_plugin=only_this_plugin)
        options = config.producers[0].options
        self.assertEqual(options["listen"], "tcp:8025:interface=127.0.0.1")
        self.assertEqual(options["max_line_length"], 10_000)
        self.assertIsNone(options["quarantine_dir"])

    def test_listen_must_be_an_endpoint(self) -> None:
        """A listen value that is no server endpoint string, or names an impossible port, is a configuration problem naming the key."""
        for bad in ("tcp:abc", "bogus:1", "tcp:99999", " "):
            text = self.config(f'recipients = ["a@b.example"]\nlisten = "{bad}"\n')
            error = self.assertRaises(ConfigError, parse_config, text, find_plugin=only_this_plugin)
            self.assertIn("producers[0].listen", str(error))
        config = parse_config(
            self.config('recipients = ["a@b.example"]\nlisten = "unix:/run/fedhub/smtp.sock"\n'),
            find_plugin=only_this_plugin,
        )
        self.assertEqual(config.producers[0].options["listen"], "unix:/run/fedhub/smtp.sock")

    def test_config_problems(self) -> None:
        """Missing recipients, a bad address, a bad network and a tiny line limit are configuration problems."""
        self.assertRaises(ConfigError, parse_config, self.config(""), find_plugin=only_this_plugin)
        for bad in ('recipients = ["nobody"]', 'recipients = ["a@b.example"]\nallowed_networks = ["10.0.0.300/8"]',
                    'recipients = ["a@b.example"]\nmax_line_length = 10',
                    'recipients = ["a@b.example"]\nsecret_header = "Bad: Header"'):
            error = self.assertRaises(ConfigError, parse_config, self.config(bad + "\n"), find_plugin=only_this_plugin)
            self.assertIn("producers[0]", str(error))


"""
Tests for the enrichment of bugmail from Bugzilla's web service
(L{fedhub.producers.bugzilla.enrich}): the C{bugzilla2fedmsg.messageV1}
bodies it builds, checked with the C{bugzilla2fedmsg-schema} package; the
fall-back to the mail-derived message on faults, timeouts, oversized
answers and missing data; the pause after an outage; the configuration
keys; and the whole path over real loopback sockets (a fake Bugzilla
XML-RPC server and the SMTP listener).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import os
import sys
import xmlrpc.client
from collections.abc import Generator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.config import HubSettings, check_options
from fedhub.errors import ConfigError
from fedhub.message import Message, loads
from fedhub.plugins import PluginContext
from fedhub.producers.bugzilla.api import BugzillaAPI
from fedhub.producers.bugzilla.enrich import (
    BugzillaEnricher,
    Enriched,
    EnrichmentUnavailable,
    enricher_from_options,
    messagev1_body,
)
from fedhub.producers.bugzilla.messagev1 import SCHEMA
from fedhub.producers.bugzilla.parser import BugEvent, parse_bugmail
from fedhub.producers.bugzilla.producer import (
    MAIL_SCHEMA,
    BugzillaSMTPPlugin,
    EventPublisher,
    event_fingerprint,
    message_id_for,
)
from fedhub.xmlrpc import XMLRPCCaller
from tests.fakes_xmlrpc import DirectCaller, FakeBugzilla, bz_time, check_with_schema_package, listen
from tests.test_poller import FakePublisher

reactor: Any = _reactor
DATA = os.path.join(os.path.dirname(__file__), "data", "bugzilla")
URL = "https://bugzilla.example.org/xmlrpc.cgi"
HOSTS = ["bugzilla.redhat.com", "bugzilla.kernel.org", "bugs.freedesktop.org"]

NEW = "01_new_bug_textplain_attachment.eml"
COMMENT = "05_comment_only_quoting_old_bugmail.eml"
ATTACHMENT = "06_attachment_added_to_existing_bug.eml"
FIELDS = "08_multi_field_change_multipart_html_long_subject.eml"
RHBZ = "12_rhbz_changed_needinfo_RECONSTRUCTED.eml"


def topic(suffix: str) -> str:
    return "org.example.test." + suffix


def raw(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def event(name: str) -> BugEvent:
    return parse_bugmail(raw(name))


def mail_time(e: BugEvent) -> float:
    assert e.date is not None
    return parsedate_to_datetime(e.date).timestamp()


def seed(bz: FakeBugzilla, e: BugEvent) -> int:
    """
    Make the fake Bugzilla hold the bug a mail is about, with its comments
    up to the mail's comment at the mail's time, and its attachment.
    """
    when = mail_time(e)
    bz.now = when - 1000.0
    bz.next_bug = e.bug_id
    bug_id = bz.new_bug(product=e.product, component=e.component, summary=e.summary,
                        reporter=e.who, assignee=e.assignee or "maintainer@example.org")
    number = e.comment.number if e.comment is not None else None
    if e.event_type != "new" and number:
        for _ in range(1, number):
            bz.add_comment(bug_id, "triage@example.org", "an earlier comment")
        bz.now = when - bz.step
        bz.add_comment(bug_id, e.who, e.comment.text if e.comment else "")
    for attachment in e.attachments:
        bz.attachments[attachment.id] = {
            "id": attachment.id, "bug_id": bug_id, "content_type": "text/plain",
            "creation_time": bz_time(when), "last_change_time": bz_time(when),
            "file_name": "dmesg.txt", "summary": attachment.description,
            "description": attachment.description, "flags": [], "is_obsolete": False,
            "is_patch": False, "is_private": False, "creator": e.who,
            "data": xmlrpc_binary(b"x" * 1000),
        }
    return bug_id


def xmlrpc_binary(data: bytes) -> Any:
    return xmlrpc.client.Binary(data)


class AttachmentBugzilla(FakeBugzilla):
    """
    The fake Bugzilla with C{Bug.attachments}, which honours
    C{include_fields} as Bugzilla does.
    """

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__(api_key)
        self.attachments: dict[int, dict[str, Any]] = {}
        self.attachment_calls: list[dict[str, Any]] = []
        self.server.handlers["Bug.attachments"] = self.get_attachments
        self.server.handlers["Bug.comments"] = self.get_comments

    def get_attachments(self, params: dict[str, Any]) -> dict[str, Any]:
        self._auth(params)
        self.attachment_calls.append(params)
        fields = params.get("include_fields")
        found = {}
        for attachment_id in params.get("attachment_ids", []):
            if attachment_id in self.attachments:
                attachment = self.attachments[attachment_id]
                found[str(attachment_id)] = {k: v for k, v in attachment.items()
                                             if fields is None or k in fields}
        return {"bugs": {}, "attachments": found}


def direct_api(bz: FakeBugzilla) -> BugzillaAPI:
    return BugzillaAPI(DirectCaller(bz.server, URL))


class BodyTests(SynchronousTestCase):
    """
    The messageV1 bodies of mail events, from the fake Bugzilla's answers,
    as C{bugzilla2fedmsg-schema} checks them.
    """

    def setUp(self) -> None:
        self.bz = AttachmentBugzilla()
        self.clock = Clock()
        self.enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)

    def enriched(self, name: str) -> tuple[BugEvent, Message]:
        e = event(name)
        seed(self.bz, e)
        publisher = FakePublisher()
        message = self.successResultOf(
            EventPublisher(publisher, topic, enrich=self.enricher)(e, raw(name)))
        self.assertEqual(publisher.messages, [message])
        self.assertEqual(message.schema, SCHEMA)
        check_with_schema_package(message)
        return e, message

    def test_changed_with_comment(self) -> None:
        """A change with a comment: modify/bug with the mail's rows as changes and the comment from the web service."""
        e, message = self.enriched(RHBZ)
        body = message.body
        self.assertEqual(body["bug"]["id"], e.bug_id)
        self.assertEqual(body["bug"]["component"], {"name": e.component})
        what = body["event"]
        self.assertEqual((what["action"], what["target"], what["routing_key"]),
                         ("modify", "bug", "bug.modify"))
        self.assertEqual(what["time"], mail_time(e))
        self.assertEqual(what["change_set"], f"{e.bug_id}.{int(mail_time(e))}")
        self.assertEqual(what["user"]["login"], e.who)
        self.assertEqual(what["changes"], [
            {"field": c.name or c.field, "removed": c.removed, "added": c.added} for c in e.changes])
        self.assertEqual(what["changes"][0]["field"], "bug_status")
        self.assertEqual(body["comment"]["number"], 3)
        self.assertEqual(body["comment"]["id"], self.bz.comments[e.bug_id][3]["id"])
        self.assertEqual(body["comment"]["creation_time"], mail_time(e))

    def test_message_keeps_mail_topic_id_and_headers(self) -> None:
        """The enriched message has the mail-derived topic, headers and id (copies of one event share it)."""
        e, message = self.enriched(RHBZ)
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update")
        self.assertEqual(message.id, message_id_for(event_fingerprint(e)))
        self.assertTrue(message.headers[f"fedora_messaging_user_{e.who}"])
        self.assertTrue(message.headers[f"fedora_messaging_rpm_{e.component}"])

    def test_new_bug(self) -> None:
        """A new bug: create/bug on the new topic, the reporter as user, no changes and no comment."""
        e, message = self.enriched(NEW)
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.new")
        what = message.body["event"]
        self.assertEqual((what["action"], what["target"], what["changes"]), ("create", "bug", []))
        self.assertEqual(what["user"]["login"], e.who)
        self.assertEqual(what["user"]["id"], 999)  # the reporter's id from creator_detail
        self.assertNotIn("comment", message.body)
        self.assertEqual(check_with_schema_package(message).summary[:len(e.who)], e.who)

    def test_comment(self) -> None:
        """A comment-only mail: create/comment with the comment's id, number, text and privacy."""
        e, message = self.enriched(COMMENT)
        what = message.body["event"]
        self.assertEqual((what["action"], what["target"]), ("create", "comment"))
        self.assertNotIn("changes", what)
        self.assertEqual(message.body["comment"]["number"], 3)
        self.assertFalse(message.body["comment"]["is_private"])
        self.assertEqual(what["user"]["real_name"], e.who_name)

    def test_attachment(self) -> None:
        """An attachment mail: create/attachment with the attachment fetched without its data."""
        e, message = self.enriched(ATTACHMENT)
        what = message.body["event"]
        self.assertEqual((what["action"], what["target"]), ("create", "attachment"))
        attachment = message.body["attachment"]
        self.assertEqual(attachment["id"], e.attachments[0].id)
        self.assertEqual(attachment["description"], e.attachments[0].description)
        self.assertEqual(attachment["creation_time"], mail_time(e))
        [call] = self.bz.attachment_calls
        self.assertNotIn("data", call["include_fields"])

    def test_custom_fields(self) -> None:
        """Rows of custom fields keep their label as field name; a change without comment has no comment."""
        e, message = self.enriched(FIELDS)
        fields = [c["field"] for c in message.body["event"]["changes"]]
        self.assertEqual(fields[:4], ["qa_contact", "i915 platform", "component", "i915 features"])
        self.assertNotIn("comment", message.body)

    def test_attachment_rows(self) -> None:
        """Rows about an attachment carry its id and make the target attachment."""
        e = event(RHBZ)
        seed(self.bz, e)
        from fedhub.producers.bugzilla.parser import Change

        e = BugEvent(**{**e.__dict__, "changes": (Change("Attachment #77 Flags", "", "review?"),)})
        bug = self.successResultOf(direct_api(self.bz).get([e.bug_id]))[0]
        comments = self.successResultOf(direct_api(self.bz).comments([e.bug_id]))[e.bug_id]
        body = messagev1_body(e, bug, comments)
        self.assertEqual(body["event"]["target"], "attachment")
        self.assertEqual(body["event"]["changes"],
                         [{"field": "flagtypes.name", "removed": "", "added": "review?",
                           "attachment_id": 77}])

    def test_dependency_change_not_enriched(self) -> None:
        """A dependency change has no messageV1 form: the enricher answers None without asking."""
        e = BugEvent(**{**event(RHBZ).__dict__, "event_type": "dep_changed"})
        self.assertIsNone(self.successResultOf(self.enricher(e)))
        self.assertEqual(self.bz.server.calls, [])
        self.assertRaises(EnrichmentUnavailable, messagev1_body, e, {"id": e.bug_id})

    def test_other_bugzilla_not_enriched(self) -> None:
        """Mail from a Bugzilla whose host is not configured is not looked up (its bug ids mean other bugs)."""
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL)
        self.assertIsNone(self.successResultOf(enricher(event(RHBZ))))
        self.assertEqual(self.bz.server.calls, [])
        self.assertEqual(enricher.counters["not_applicable"], 1)


class FallbackTests(SynchronousTestCase):
    """
    Whatever goes wrong, the mail-derived message is published, and why is logged.
    """

    def setUp(self) -> None:
        self.bz = AttachmentBugzilla()
        self.clock = Clock()
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def publish(self, enricher: BugzillaEnricher, name: str = RHBZ) -> Message:
        d = EventPublisher(FakePublisher(), topic, enrich=enricher)(event(name), raw(name))
        return self.successResultOf(d)

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if "Enriching" in e.get("log_format", "")]

    def fault(self) -> None:
        def fail(*args: Any) -> Any:
            raise xmlrpc.client.Fault(1000, "GenericError: the hub is sad")

        self.bz.server.handlers["Bug.get"] = fail

    def test_fault(self) -> None:
        """An XML-RPC fault publishes the mail-derived message and logs the fault."""
        seed(self.bz, event(RHBZ))
        self.fault()
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        message = self.publish(enricher)
        self.assertEqual(message.schema, MAIL_SCHEMA)
        self.assertEqual(message.id, message_id_for(event_fingerprint(event(RHBZ))))
        self.assertEqual(enricher.counters["failed"], 1)
        [warning] = self.warnings()
        self.assertIn("Bug.get: fault 1000", warning)

    def test_unknown_bug(self) -> None:
        """A bug the web service does not return (missing, or hidden from the key) falls back."""
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        self.assertEqual(self.publish(enricher).schema, MAIL_SCHEMA)
        self.assertIn("not in the web service's answer", self.warnings()[0])

    def test_comment_not_found(self) -> None:
        """A comment the web service does not return (e.g. private) falls back rather than dropping it."""
        e = event(RHBZ)
        seed(self.bz, e)
        del self.bz.comments[e.bug_id][3]
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        self.assertEqual(self.publish(enricher).schema, MAIL_SCHEMA)
        self.assertIn("comment 3", self.warnings()[0])

    def test_attachment_of_another_bug(self) -> None:
        """
        An attachment the web service says belongs to another bug is not
        published with this bug's event: the notice's id comes from the
        mail, whose comment text anyone who may comment can write.
        """
        e = event(ATTACHMENT)
        seed(self.bz, e)
        self.bz.attachments[e.attachments[0].id]["bug_id"] = e.bug_id + 1
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        message = self.publish(enricher, ATTACHMENT)
        self.assertEqual(message.schema, MAIL_SCHEMA)
        [warning] = self.warnings()
        self.assertIn(f"attachment {e.attachments[0].id} belongs to bug {e.bug_id + 1}", warning)
        self.assertEqual(enricher.counters["failed"], 1)

    def test_attachment_without_bug(self) -> None:
        """An attachment whose bug the answer does not name is not published either."""
        e = event(ATTACHMENT)
        seed(self.bz, e)
        del self.bz.attachments[e.attachments[0].id]["bug_id"]
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        self.assertEqual(self.publish(enricher, ATTACHMENT).schema, MAIL_SCHEMA)
        self.assertIn("belongs to bug None", self.warnings()[0])

    def test_comment_of_another_bug(self) -> None:
        """A comment the web service says belongs to another bug is not taken for this bug's."""
        e = event(RHBZ)
        seed(self.bz, e)
        self.bz.comments[e.bug_id][3]["bug_id"] = e.bug_id + 1
        enricher = BugzillaEnricher(direct_api(self.bz), self.clock, url=URL, hosts=HOSTS)
        self.assertEqual(self.publish(enricher).schema, MAIL_SCHEMA)
        self.assertIn("comment 3", self.warnings()[0])

    def test_api_key_echoed_in_a_fault_not_logged(self) -> None:
        """
        A fault (or any error) whose text repeats the API key, as a broken
        or hostile web service's may, is logged without the key.
        """
        seed(self.bz, event(RHBZ))

        def echo(params: dict[str, Any]) -> Any:
            raise xmlrpc.client.Fault(1000, f"bad key {params.get('Bugzilla_api_key')!r} in {params!r}")

        self.bz.server.handlers["Bug.get"] = echo
        key = "s3cret-Key-0123456789"
        api = BugzillaAPI(DirectCaller(self.bz.server, URL), api_key=key)
        enricher = BugzillaEnricher(api, self.clock, url=URL, hosts=HOSTS)
        self.assertEqual(self.publish(enricher).schema, MAIL_SCHEMA)
        [warning] = self.warnings()
        self.assertIn("bad key '<the API key>' in", warning)
        self.assertNotIn(key, warning)
        for logged in self.logged:
            self.assertNotIn(key, repr(logged))

    def test_faults_do_not_pause(self) -> None:
        """A fault concerns one bug: the next mail is looked up again."""
        self.fault()
        api = direct_api(self.bz)
        enricher = BugzillaEnricher(api, self.clock, url=URL, hosts=HOSTS)
        self.publish(enricher)
        self.publish(enricher)
        self.assertEqual(self.bz.server.calls.count("Bug.get"), 2)
        self.assertEqual(enricher.counters["failed"], 2)
        self.assertEqual(enricher.counters["skipped"], 0)

    def test_timeout_then_pause(self) -> None:
        """A look-up that takes longer than the timeout falls back, and the next ones are skipped until retry_after passed."""
        caller = HangingCaller()
        enricher = BugzillaEnricher(BugzillaAPI(caller), self.clock, url=URL, hosts=HOSTS,
                                    timeout=5.0, retry_after=60.0)
        d = EventPublisher(FakePublisher(), topic, enrich=enricher)(event(RHBZ), raw(RHBZ))
        self.assertNoResult(d)
        self.clock.advance(5.0)
        self.assertEqual(self.successResultOf(d).schema, MAIL_SCHEMA)
        self.assertEqual(caller.cancelled, 2)  # Bug.get and Bug.comments
        self.assertIn("timed out", self.warnings()[0])
        self.assertIn("not asking again for 60s", self.warnings()[0])
        # Within the pause: published at once, nothing asked.
        self.assertEqual(self.publish(enricher).schema, MAIL_SCHEMA)
        self.assertEqual(len(caller.calls), 2)
        self.assertEqual(enricher.counters["skipped"], 1)
        # After it: asked again.
        self.clock.advance(60.0)
        d = enricher(event(RHBZ))
        self.assertEqual(len(caller.calls), 4)
        self.clock.advance(5.0)
        self.assertIsNone(self.successResultOf(d))

    def test_invalid_enriched_body(self) -> None:
        """An enricher's body that its schema refuses is logged and the mail-derived message published."""
        from fedhub.schema import SchemaRegistry

        schemas = SchemaRegistry()
        schemas.register("strict", {"type": "object", "required": ["bug"]})
        from fedhub.producers.bugzilla.producer import register_mail_schema

        register_mail_schema(schemas)
        publisher = EventPublisher(FakePublisher(), topic, schemas=schemas,
                                   enrich=lambda e: succeed(Enriched({}, "strict")))
        message = self.successResultOf(publisher(event(RHBZ), raw(RHBZ)))
        self.assertEqual(message.schema, MAIL_SCHEMA)
        self.assertTrue(any("is not valid" in e.get("log_format", "") for e in self.logged))


class HangingCaller:
    """
    An XML-RPC caller whose calls never answer; it counts cancellations.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cancelled = 0

    def call(self, method: str, *params: Any) -> Deferred[Any]:
        self.calls.append(method)

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)

    def multicall(self, calls: Any, batch_size: int = 100) -> Deferred[list[Any]]:
        raise NotImplementedError()

    def close(self) -> Deferred[None]:
        return succeed(None)


_caller: XMLRPCCaller = HangingCaller()  # the fake satisfies the caller protocol


class ConfigTests(SynchronousTestCase):
    """
    The C{enrich_*} keys of the C{bugzilla-smtp} producer.
    """

    def options(self, **extra: Any) -> Any:
        return check_options(BugzillaSMTPPlugin.options,
                             {"recipients": ["bugs@example.org"], **extra})

    def test_defaults(self) -> None:
        """Without enrich_url there is no enricher; the other keys have bounded defaults."""
        options = self.options()
        self.assertIsNone(options["enrich_url"])
        self.assertEqual(options["enrich_timeout"], 5.0)
        self.assertEqual(options["enrich_max_response_bytes"], 2 * 1024 * 1024)
        self.assertIsNone(enricher_from_options(options, Clock()))

    def test_enricher(self) -> None:
        """enrich_url builds an enricher with the configured client limits, key file and hosts."""
        key = self.mktemp()
        Path(key).write_text("secret-key\n")
        options = self.options(enrich_url=URL, enrich_timeout=2, enrich_max_response_bytes=4096,
                               enrich_api_key_file=key, enrich_hosts=["bugzilla.redhat.com"])
        enricher = enricher_from_options(options, Clock(), delivery_timeout=120.0)
        assert enricher is not None
        client: Any = enricher.api.caller
        self.assertEqual((client.url, client.timeout, client.max_response_bytes),
                         (URL, 2.0, 4096))
        self.assertEqual(enricher.timeout, 2.0)
        self.assertEqual(enricher.hosts, frozenset({"bugzilla.redhat.com"}))
        self.assertEqual(enricher.api._key(), "secret-key")

    def test_timeout_kept_below_delivery_timeout(self) -> None:
        """An enrichment timeout longer than half the SMTP delivery timeout is cut to that half."""
        options = self.options(enrich_url=URL, enrich_timeout=100, delivery_timeout=30)
        enricher = enricher_from_options(options, Clock(), delivery_timeout=30.0)
        assert enricher is not None
        self.assertEqual(enricher.timeout, 15.0)

    def test_problems_named_by_key_path(self) -> None:
        """Bad enrichment keys are reported under their key path."""
        for key, value, words in [
            ("enrich_url", "ftp://bugzilla.example.org/", "http:// or https://"),
            ("enrich_timeout", 0, "must be positive"),
            ("enrich_max_response_bytes", -5, "must be positive"),
            ("enrich_api_key_file", "/nonexistent/fedhub-key", "nonexistent"),
            ("enrich_retry_after", 0, "greater than 0"),
            ("enrich_hosts", "bugzilla.example.org", "expected"),
        ]:
            error = self.assertRaises(ConfigError, self.options, **{key: value})
            self.assertIn(f"options.{key}", str(error))
            self.assertIn(words, str(error))

    def test_check_config(self) -> None:
        """fedhub check-config names a bad enrichment key with its key path and line."""
        from fedhub.cli.main import main

        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        path = directory / "hub.toml"
        path.write_text(
            f'[hub]\nstate_dir = "{directory}"\n[domains.a]\nbroker = "memory"\n'
            '[[producers]]\nname = "mail"\nplugin = "bugzilla-smtp"\ndomain = "a"\n'
            'recipients = ["bugs@example.org"]\nenrich_url = "bugzilla.example.org"\n'
            'enrich_timeout = "soon"\n')
        err = io.StringIO()
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["check-config", str(path)]), 1)
        self.assertIn("producers[0].enrich_url: must be an http:// or https:// URL (line 10)",
                      err.getvalue())
        self.assertIn("producers[0].enrich_timeout: expected a number", err.getvalue())


class LoopbackTests(TestCase):
    """
    Enrichment from a fake Bugzilla over a real loopback socket.
    """

    def setUp(self) -> None:
        self.bz = AttachmentBugzilla(api_key="k3y")
        self.port, self.url = listen(self.bz.server, reactor)
        self.addCleanup(self.port.stopListening)
        key = self.mktemp()
        Path(key).write_text("k3y\n")
        self.options = check_options(BugzillaSMTPPlugin.options, {
            "recipients": ["bugs@example.org"], "enrich_url": self.url, "enrich_timeout": 1.0,
            "enrich_max_response_bytes": 64 * 1024, "enrich_api_key_file": key,
            "enrich_hosts": HOSTS})
        enricher = enricher_from_options(self.options, reactor, delivery_timeout=120.0)
        assert enricher is not None
        self.enricher = enricher
        self.addCleanup(self._close)

    @inlineCallbacks
    def _close(self) -> Generator[Deferred[Any], Any, None]:
        self.bz.server.release_hanging()
        yield self.enricher.close()

    def publish(self, name: str) -> Deferred[Message]:
        return EventPublisher(FakePublisher(), topic, enrich=self.enricher)(event(name), raw(name))

    @inlineCallbacks
    def test_enriched_then_fallbacks(self) -> Generator[Deferred[Any], Any, None]:
        """Enriched over HTTP with the API key; a fault, a huge answer and a hang fall back; then a pause."""
        seed(self.bz, event(RHBZ))
        message = yield self.publish(RHBZ)
        self.assertEqual(message.schema, SCHEMA)
        check_with_schema_package(message)
        self.assertEqual(message.body["comment"]["number"], 3)

        self.bz.server.mode = "fault"
        message = yield self.publish(RHBZ)
        self.assertEqual(message.schema, MAIL_SCHEMA)

        self.bz.server.mode = "huge"
        self.bz.server.huge_size = 4 * 1024 * 1024
        message = yield self.publish(RHBZ)
        self.assertEqual(message.schema, MAIL_SCHEMA)
        self.assertLess(self.bz.server.flood_sent, 1024 * 1024)

        self.bz.server.mode = "hang"
        message = yield self.publish(RHBZ)
        self.assertEqual(message.schema, MAIL_SCHEMA)
        self.assertEqual(self.enricher.counters, {"enriched": 1, "failed": 3, "skipped": 0,
                                                  "not_applicable": 0})
        self.bz.server.release_hanging()
        self.bz.server.mode = None
        # The hang looked like an outage: the next mail is not held up.
        yield deferLater(reactor, 0.05, lambda: None)
        requests = self.bz.server.requests
        message = yield self.publish(RHBZ)
        self.assertEqual(message.schema, MAIL_SCHEMA)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.bz.server.requests, requests)
        self.assertEqual(self.enricher.counters["skipped"], 1)

    @inlineCallbacks
    def test_smtp_listener(self) -> Generator[Deferred[Any], Any, None]:
        """The bugzilla-smtp plugin with enrich_url answers 250 for a mail and publishes the enriched message."""
        from tests.test_smtp_raw import RawClient
        from tests.test_smtp_server import dot_stuffed, envelope, sample

        seed(self.bz, event(RHBZ))
        publisher = FakePublisher()
        options = dict(self.options)
        options["listen"] = "tcp:0:interface=127.0.0.1"
        context = PluginContext(name="bugmail", domain="a", options=options, publisher=publisher,
                                reactor=reactor, hub=HubSettings(topic_prefix="org.example",
                                                                 environment="test",
                                                                 state_dir=self.mktemp()))
        listener: Any = BugzillaSMTPPlugin().build(context)
        self.addCleanup(listener._cleanups[0])  # closes the enrichment's client if the test fails early
        listener.startService()
        port = yield listener.when_listening()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client: RawClient = yield connectProtocol(endpoint, RawClient())
        client.send(envelope() + dot_stuffed(sample(RHBZ)) + b"QUIT\r\n")
        yield client.until(lambda: client.lost)
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354, 250, 221])
        [message] = publisher.messages
        self.assertEqual(message.schema, SCHEMA)
        self.assertEqual(message.topic, "org.example.test.bugzilla.bug.update")
        check_with_schema_package(message)
        while listener.factory.sessions:
            yield deferLater(reactor, 0.01, lambda: None)
        yield listener.stopService()
        # Stopping the listener closed the enrichment's cached connection too.
        client = listener._cleanups[0].__self__.api.caller
        self.assertEqual(client.calls, 2)
        self.assertEqual(client._pool._connections, {})


class InjectMailTests(TestCase):
    """
    C{fedhub inject-mail}, run as the command it is, reads the enrichment
    keys of its producer.
    """

    def inject(self, url: str) -> Deferred[tuple[int, bytes, Message]]:
        """
        Run C{fedhub inject-mail} on the RHBZ sample with a producer whose
        C{enrich_url} is C{url}: its exit status, its standard error and the
        one message it spooled.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        (directory / "mail.eml").write_bytes(raw(RHBZ))
        config = directory / "hub.toml"
        config.write_text(
            f'[hub]\ntopic_prefix = "org.example"\nenvironment = "prod"\n'
            f'state_dir = "{directory / "state"}"\n[domains.community]\nbroker = "memory"\n'
            '[[producers]]\nname = "bugzilla-mail"\nplugin = "bugzilla-smtp"\n'
            'domain = "community"\nrecipients = ["bugs@example.org"]\n'
            f'enrich_url = "{url}"\nenrich_timeout = 5.0\n'
            'enrich_hosts = ["bugzilla.redhat.com"]\n')

        def spooled(result: tuple[bytes, bytes, int]) -> tuple[int, bytes, Message]:
            _, err, code = result
            spool = directory / "state" / "spool" / "community"
            [path] = [p for p in spool.iterdir() if p.name.endswith(".msg")]
            [message] = loads(path.read_bytes())
            return code, err, message

        running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            sys.executable, ["-m", "fedhub.cli", "inject-mail", "--config", str(config),
                             "--input", str(directory / "mail.eml")],
            env=dict(os.environ), path=os.getcwd(), reactor=reactor)
        return running.addCallback(spooled)

    @inlineCallbacks
    def test_enriched_into_spool(self) -> Generator[Deferred[Any], Any, None]:
        """With enrich_url set, inject-mail spools a messageV1 message fetched over a real socket."""
        bz = AttachmentBugzilla()
        seed(bz, event(RHBZ))
        port, url = listen(bz.server, reactor)
        self.addCleanup(port.stopListening)
        code, err, message = yield self.inject(url)
        self.assertEqual((code, err), (0, b""))
        self.assertIn("Bug.get", bz.server.calls)
        self.assertEqual(message.schema, SCHEMA)
        self.assertEqual(message.id, message_id_for(event_fingerprint(event(RHBZ))))
        check_with_schema_package(message)

    @inlineCallbacks
    def test_fallback_warned_on_stderr(self) -> Generator[Deferred[Any], Any, None]:
        """
        When the enrichment fails (here nothing listens at enrich_url),
        inject-mail still spools the mail-derived message and exits 0, and
        says why on standard error, one line, for the mail server's log.
        """
        port, url = listen(AttachmentBugzilla().server, reactor)
        yield port.stopListening()
        code, err, message = yield self.inject(url)
        self.assertEqual(code, 0, err)
        [line] = err.decode().splitlines()
        self.assertTrue(line.startswith("fedhub inject-mail: warning: "), line)
        self.assertIn("mail-derived message", line)
        self.assertNotEqual(message.schema, SCHEMA)


class SiblingTests(SynchronousTestCase):
    """
    One failed call ends the look-up.
    """

    def test_failure_cancels_the_other_calls(self) -> None:
        """When Bug.get fails, the Bug.comments call still waiting is cancelled."""
        caller = HangingCaller()
        api = BugzillaAPI(caller)
        failing: Deferred[Any] = Deferred()
        api.get = lambda ids, fields=(): failing  # type: ignore[method-assign]
        enricher = BugzillaEnricher(api, Clock(), url=URL, hosts=HOSTS)
        d = enricher(event(RHBZ))
        self.assertEqual(caller.calls, ["Bug.comments"])
        failing.errback(xmlrpc_fault())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(caller.cancelled, 1)


def xmlrpc_fault() -> Exception:
    from fedhub.xmlrpc import XMLRPCFault

    return XMLRPCFault(URL, "Bug.get", 1000, "GenericError")

"""
Tests for the Bugzilla web service client (L{fedhub.producers.bugzilla.api})
and the Bugzilla poller (L{fedhub.producers.bugzilla_poll}): what is
published for a fake Bugzilla's changes, validated with
C{bugzilla2fedmsg-schema}, and how polling copes with overlap, paging,
private data, authentication and a misbehaving server.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import xmlrpc.client
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings
from fedhub.interfaces import IProducerPlugin
from fedhub.message import Message
from fedhub.plugins import PluginContext
from fedhub.producers.bugzilla.api import (
    BugzillaAPI,
    BugzillaError,
    from_epoch,
    jsonable,
    to_epoch,
)
from fedhub.producers.bugzilla_poll import SCHEMA, BugzillaPollPlugin, BugzillaSource, bug_object
from fedhub.producers.poller import (
    ForeignCursor,
    IPollSource,
    PollingService,
    PollResult,
    run_inline,
)
from fedhub.text import SUMMARY_HEADER
from fedhub.xmlrpc import XMLRPCClient, XMLRPCFault
from tests.fakes_xmlrpc import (
    DirectCaller,
    FakeBugzilla,
    check_with_schema_package,
    listen,
    schema_names,
)
from tests.test_poller import FakePublisher

reactor: Any = _reactor
URL = "https://bugzilla.example.org/xmlrpc.cgi"
PREFIX = "org.fedoraproject.test."


def topic(suffix: str) -> str:
    return PREFIX + suffix


class TimeTests(SynchronousTestCase):
    """
    Bugzilla's times.
    """

    def test_to_epoch(self) -> None:
        """Naive datetimes and XML-RPC DateTimes are UTC; numbers pass; None stays."""
        when = datetime(2025, 1, 1, 10, 0, 0)
        self.assertEqual(to_epoch(when), 1735725600.0)
        self.assertEqual(to_epoch(when.replace(tzinfo=timezone.utc)), 1735725600.0)
        self.assertEqual(to_epoch(xmlrpc.client.DateTime("20250101T10:00:00")), 1735725600.0)
        self.assertEqual(to_epoch(5), 5.0)
        self.assertIsNone(to_epoch(None))
        self.assertRaises(BugzillaError, to_epoch, "yesterday")

    def test_from_epoch(self) -> None:
        """Times sent to Bugzilla are naive UTC whole seconds."""
        self.assertEqual(from_epoch(1735725600.9), datetime(2025, 1, 1, 10, 0, 0))

    def test_jsonable(self) -> None:
        """Nested times become numbers, tuples lists."""
        self.assertEqual(jsonable({"a": (datetime(1970, 1, 1, 0, 1), [b"x"])}),
                         {"a": [60.0, ["x"]]})


class APITests(SynchronousTestCase):
    """
    L{BugzillaAPI} against the fake Bugzilla, in-process.
    """

    def setUp(self) -> None:
        self.bz = FakeBugzilla()
        self.caller = DirectCaller(self.bz.server, URL)
        self.api = BugzillaAPI(self.caller, batch_size=2)

    def test_search_get_history_comments(self) -> None:
        """The calls return JSON-ready bugs, history and comments keyed by bug id."""
        ids = [self.bz.new_bug(summary=f"bug {i}") for i in range(3)]
        self.bz.change(ids[1], "triage@example.org", status="ASSIGNED")
        self.bz.add_comment(ids[2], "maintainer@example.org", "Fixed in rawhide.")
        bugs = self.successResultOf(self.api.search_changed(self.bz.now - 3600))
        self.assertEqual([b["id"] for b in bugs], ids)
        self.assertIsInstance(bugs[0]["creation_time"], float)
        got = self.successResultOf(self.api.get(ids))
        self.assertEqual([b["summary"] for b in got], ["bug 0", "bug 1", "bug 2"])
        history = self.successResultOf(self.api.history(ids))
        self.assertEqual(history[ids[1]][0]["changes"],
                         [{"field_name": "status", "removed": "NEW", "added": "ASSIGNED"}])
        self.assertIsInstance(history[ids[1]][0]["when"], float)
        comments = self.successResultOf(self.api.comments(ids))
        self.assertEqual([c["text"] for c in comments[ids[2]]], ["Steps...", "Fixed in rawhide."])
        self.assertEqual(self.bz.server.calls.count("Bug.history"), 2)  # batches of two ids

    def test_server_time(self) -> None:
        """Bugzilla.time gives the database clock."""
        self.assertEqual(self.successResultOf(self.api.server_time()), self.bz.now)

    def test_api_key(self) -> None:
        """The API key is read from its file and sent with every call."""
        self.bz.api_key = "s3cret-key"
        key_file = self.mktemp()
        with open(key_file, "w") as f:
            f.write("s3cret-key\n")
        api = BugzillaAPI(self.caller, api_key_file=key_file)
        self.successResultOf(api.server_time())
        failure = self.failureResultOf(BugzillaAPI(self.caller).server_time(), XMLRPCFault)
        self.assertEqual(failure.value.fault_code, 410)

    def test_unreadable_key_file(self) -> None:
        """A missing API key file is a BugzillaError naming the file, not the key."""
        path = os.path.join(self.mktemp(), "key")
        failure = self.failureResultOf(
            BugzillaAPI(self.caller, api_key_file=path).server_time(), BugzillaError)
        self.assertIn(path, str(failure.value))

    def test_malformed_answers(self) -> None:
        """Answers without the promised structure are BugzillaErrors."""
        self.bz.server.handlers["Bug.search"] = lambda params: {"bugs": "none"}
        self.bz.server.handlers["Bug.history"] = lambda params: [1, 2]
        self.bz.server.handlers["Bug.comments"] = lambda params: {"bugs": []}
        self.bz.server.handlers["Bugzilla.time"] = lambda params: {}
        self.failureResultOf(self.api.search_changed(0), BugzillaError)
        self.failureResultOf(self.api.history([1]), BugzillaError)
        self.failureResultOf(self.api.comments([1]), BugzillaError)
        self.failureResultOf(self.api.server_time(), BugzillaError)


class SourceTestBase(SynchronousTestCase):
    """
    A fake Bugzilla, called in-process, and a source over it.
    """

    def setUp(self) -> None:
        self.bz = FakeBugzilla()
        self.caller = DirectCaller(self.bz.server, URL)

    def source(self, api: BugzillaAPI | None = None, **settings: Any) -> BugzillaSource:
        settings.setdefault("overlap", 300.0)
        return BugzillaSource("bugzilla", api or BugzillaAPI(self.caller), topic, url=URL,
                              **settings)

    def start(self, source: BugzillaSource) -> Any:
        return self.successResultOf(source.initial_cursor())

    def poll(self, source: BugzillaSource, cursor: Any) -> PollResult:
        result: PollResult = self.successResultOf(source.poll(cursor))
        for message in result.messages:
            check_with_schema_package(message)
        return result


@implementer(ILogObserver)
class Warnings:
    """Collects the text of every warning logged while it is installed."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.texts: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            self.texts.append(formatEvent(event))


def kinds(messages: Any) -> list[tuple[str, int, str, str]]:
    return [(m.topic[len(PREFIX):], m.body["bug"]["id"], m.body["event"]["action"],
             m.body["event"]["target"]) for m in messages]


class SourceTests(SourceTestBase):
    """
    L{BugzillaSource}.
    """

    def test_interface(self) -> None:
        """BugzillaSource provides IPollSource."""
        self.assertTrue(verifyObject(IPollSource, self.source()))

    def test_first_start_now(self) -> None:
        """The first cursor is Bugzilla's own clock; older bugs are not published."""
        self.bz.new_bug()
        self.bz.now += 3600
        source = self.source()
        cursor = self.start(source)
        self.assertEqual(cursor["since"], self.bz.now)
        self.assertEqual(self.poll(source, cursor).messages, [])

    def test_nothing_from_before_first_start(self) -> None:
        """Changes just before the first start (within the overlap) are not published."""
        bug = self.bz.new_bug()
        self.bz.add_comment(bug, "triage@example.org", "before the start")
        source = self.source(overlap=3600.0)
        cursor = self.start(source)
        self.bz.add_comment(bug, "triage@example.org", "after the start")
        result = self.poll(source, cursor)
        self.assertEqual([m.body["comment"]["body"] for m in result.messages], ["after the start"])

    def test_backfill(self) -> None:
        """backfill_seconds starts that long before now."""
        bug = self.bz.new_bug()
        self.bz.now += 600
        source = self.source(backfill_seconds=3600)
        result = self.poll(source, self.start(source))
        self.assertEqual(kinds(result.messages), [("bugzilla.bug.new", bug, "create", "bug")])

    def test_new_bug(self) -> None:
        """A new bug is bugzilla.bug.new with the bug in bugzilla2fedmsg's shape."""
        source = self.source()
        cursor = self.start(source)
        bug = self.bz.new_bug()
        result = self.poll(source, cursor)
        (message,) = result.messages
        self.assertEqual(message.topic, topic("bugzilla.bug.new"))
        self.assertEqual(message.schema, SCHEMA)
        body = message.body
        self.assertEqual(body["bug"]["component"], {"name": "python-requests"})
        self.assertEqual(body["bug"]["product"], {"name": "Fedora"})
        self.assertEqual(body["bug"]["version"], {"name": "41"})
        self.assertEqual(body["bug"]["status"], {"name": "NEW"})
        self.assertEqual(body["bug"]["reporter"], {"login": "packager.reporter@example.org",
                                                   "real_name": "Pat Reporter", "id": 410})
        self.assertEqual(body["bug"]["creation_time"], self.bz.now)
        self.assertFalse(body["bug"]["is_private"])
        self.assertEqual(body["event"]["action"], "create")
        self.assertEqual(body["event"]["routing_key"], "bug.create")
        self.assertEqual(body["event"]["bug_id"], bug)
        self.assertEqual(body["event"]["changes"], [])
        self.assertTrue(message.headers["fedora_messaging_rpm_python-requests"])
        loaded = check_with_schema_package(message)
        self.assertEqual(loaded.component_name, "python-requests")
        self.assertIn("filed a new bug", message.headers[SUMMARY_HEADER])

    def test_change_and_comment(self) -> None:
        """A change is an update with its changes; a comment an update with the comment."""
        bug = self.bz.new_bug()
        source = self.source()
        cursor = self.start(source)
        self.bz.change(bug, "triage@example.org", status="ASSIGNED",
                       assigned_to="maintainer@example.org")
        self.bz.add_comment(bug, "maintainer@example.org", "Déjà vu from F38 :-)")
        result = self.poll(source, cursor)
        self.assertEqual(kinds(result.messages), [
            ("bugzilla.bug.update", bug, "modify", "bug"),
            ("bugzilla.bug.update", bug, "create", "comment"),
        ])
        change, comment = result.messages
        self.assertEqual(change.body["event"]["changes"], [
            {"field": "status", "removed": "NEW", "added": "ASSIGNED"},
            {"field": "assigned_to", "removed": "maintainer@example.org",
             "added": "maintainer@example.org"},
        ])
        self.assertEqual(change.body["event"]["user"], {"login": "triage@example.org"})
        self.assertEqual(change.body["bug"]["status"], {"name": "ASSIGNED"})
        self.assertEqual(comment.body["comment"]["body"], "Déjà vu from F38 :-)")
        self.assertEqual(comment.body["comment"]["number"], 1)
        self.assertEqual(comment.body["event"]["routing_key"], "comment.create")
        self.assertEqual(check_with_schema_package(change).summary,
                         "triage@example.org updated 'status' and 'assigned_to' on RHBZ#"
                         f"{bug} 'requests fails with SSLError on redirect...'")

    def test_each_event_once_in_order(self) -> None:
        """Events across bugs come in time order, and later polls do not repeat them."""
        source = self.source()
        cursor = self.start(source)
        first = self.bz.new_bug()
        second = self.bz.new_bug(component="python-urllib3")
        self.bz.add_comment(first, "triage@example.org", "Needs info.")
        self.bz.change(second, "triage@example.org", severity="high")
        one = self.poll(source, cursor)
        self.bz.change(first, "triage@example.org", status="CLOSED", resolution="ERRATA")
        two = self.poll(source, one.cursor)
        three = self.poll(source, two.cursor)
        self.assertEqual(kinds([*one.messages, *two.messages]), [
            ("bugzilla.bug.new", first, "create", "bug"),
            ("bugzilla.bug.new", second, "create", "bug"),
            ("bugzilla.bug.update", first, "create", "comment"),
            ("bugzilla.bug.update", second, "modify", "bug"),
            ("bugzilla.bug.update", first, "modify", "bug"),
        ])
        self.assertEqual(three.messages, [])
        times = [m.body["event"]["time"] for m in [*one.messages, *two.messages]]
        self.assertEqual(times, sorted(times))

    def test_late_change_within_overlap(self) -> None:
        """A change that shows up with a time before the last one seen is published once."""
        bug = self.bz.new_bug()
        source = self.source(overlap=300.0)
        cursor = self.start(source)
        self.bz.change(bug, "triage@example.org", priority="high")
        one = self.poll(source, cursor)
        # A change committed late: its time is before the one already seen.
        self.bz.history[bug].append({"when": self.bz.history[bug][0]["when"].replace(second=1),
                                     "who": "late@example.org",
                                     "changes": [{"field_name": "keywords", "removed": "",
                                                  "added": "Triaged"}]})
        self.bz.bugs[bug]["last_change_time"] = self.bz.history[bug][0]["when"]
        two = self.poll(source, one.cursor)
        three = self.poll(source, two.cursor)
        self.assertEqual([m.body["event"]["user"]["login"] for m in two.messages],
                         ["late@example.org"])
        self.assertEqual(three.messages, [])

    def test_private_data_withheld(self) -> None:
        """Private bugs and private comments are not published unless asked for."""
        source = self.source()
        cursor = self.start(source)
        public = self.bz.new_bug()
        self.bz.new_bug(private=True)
        self.bz.add_comment(public, "triage@example.org", "internal note", private=True)
        self.bz.add_comment(public, "triage@example.org", "public note")
        result = self.poll(source, cursor)
        self.assertEqual([m.body["bug"]["id"] for m in result.messages], [public, public])
        self.assertEqual(result.messages[1].body["comment"]["body"], "public note")
        everything = self.poll(self.source(publish_private=True), cursor)
        self.assertEqual(len(everything.messages), 4)
        self.assertTrue(everything.messages[1].body["bug"]["is_private"])

    def test_products_and_components(self) -> None:
        """Only the configured products and components are asked for."""
        source = self.source(products=["Fedora EPEL"], components=["python-urllib3"])
        cursor = self.start(source)
        self.bz.new_bug()
        wanted = self.bz.new_bug(product="Fedora EPEL", component="python-urllib3")
        result = self.poll(source, cursor)
        self.assertEqual([m.body["bug"]["id"] for m in result.messages], [wanted])
        self.assertEqual(self.bz.search_calls[-1]["product"], ["Fedora EPEL"])
        self.assertEqual(self.bz.search_calls[-1]["component"], ["python-urllib3"])

    def test_paging(self) -> None:
        """More changed bugs than one poll's pages are taken over several polls, each once."""
        source = self.source(page_size=2, max_pages=2)
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(7)]
        messages: list[Message] = []
        polls = 0
        while True:
            result = self.poll(source, cursor)
            polls += 1
            messages += result.messages
            cursor = result.cursor
            if not result.more:
                break
        self.assertEqual(polls, 2)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages), bugs)
        self.assertEqual(cursor["offset"], 0)
        self.assertEqual(self.poll(source, cursor).messages, [])

    def drain(self, source: BugzillaSource, cursor: Any, between: Callable[[int], None]
              ) -> tuple[list[Message], Any]:
        """
        Poll, calling C{between} after each poll, until a poll is caught up
        and publishes nothing.
        """
        messages: list[Message] = []
        for polls in range(50):
            result = self.poll(source, cursor)
            messages += result.messages
            cursor = result.cursor
            between(polls)
            if not result.more and not result.messages:
                return messages, cursor
        self.fail("polling never caught up")

    def test_paging_past_the_bugzillas_own_limit(self) -> None:
        """
        A Bugzilla that gives fewer bugs than a page asks for (its
        max_search_results below page_size) is paged through all the same:
        the cut page is not taken for the end; page_size is lowered to what
        it gives, with one warning.
        """
        warnings = Warnings(self)
        self.bz.max_search_results = 120
        self.bz.step = 1.0
        source = self.source(page_size=200, max_pages=3)
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(450)]
        messages, _ = self.drain(source, cursor, lambda polls: None)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages), bugs)
        self.assertEqual(source.page_size, 119)
        cut = [t for t in warnings.texts if "max_search_results" in t]
        self.assertEqual(len(cut), 1, warnings.texts)
        self.assertIn("answered 120 bugs to a search for 200", cut[0])
        self.assertTrue(all(int(c["limit"]) <= 201 for c in self.bz.search_calls))

    def test_short_page_of_a_caught_up_poll_asks_once(self) -> None:
        """
        A poll whose page is short, and shorter than a cut page can be, is
        the end of the results: one search, no warning.
        """
        warnings = Warnings(self)
        source = self.source(page_size=200)
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(30)]
        calls = len(self.bz.search_calls)
        result = self.poll(source, cursor)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in result.messages), bugs)
        self.assertFalse(result.more)
        self.assertEqual(len(self.bz.search_calls), calls + 1)
        self.assertEqual(source.page_size, 200)
        self.assertEqual([t for t in warnings.texts if "max_search_results" in t], [])

    def test_long_short_page_not_cut(self) -> None:
        """
        A page shorter than asked but long enough to be a cut one is looked
        past once; when nothing follows it, page_size stays.
        """
        warnings = Warnings(self)
        self.bz.step = 1.0
        source = self.source(page_size=200)
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(150)]
        result = self.poll(source, cursor)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in result.messages), bugs)
        self.assertFalse(result.more)
        self.assertEqual(source.page_size, 200)
        self.assertEqual([t for t in warnings.texts if "max_search_results" in t], [])

    def test_paging_bug_leaving_the_results(self) -> None:
        """A bug already read that leaves the results mid-pass does not make the next one skipped."""
        source = self.source(page_size=2, max_pages=1, products=["Fedora"])
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(8)]

        def between(polls: int) -> None:
            if polls == 0:
                self.bz.change(bugs[0], "maintainer@example.org", product="Fedora EPEL")

        messages, _ = self.drain(source, cursor, between)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages), bugs)
        self.assertEqual(len(messages), len(bugs))

    def test_paging_many_bugs_leaving_the_results(self) -> None:
        """More bugs than a page leaving the results mid-pass: the pass steps back, skipping none."""
        source = self.source(page_size=2, max_pages=1, products=["Fedora"])
        cursor = self.start(source)
        self.bz.step = 400.0  # further apart than the overlap
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(10)]

        def between(polls: int) -> None:
            if polls == 1:  # b0 to b3 read
                for bug in bugs[:5]:
                    self.bz.change(bug, "maintainer@example.org", product="Fedora EPEL")

        messages, _ = self.drain(source, cursor, between)
        # b4 left before it was read: it is no longer a bug of the product.
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages),
                         [*bugs[:4], *bugs[5:]])

    def test_paging_cursor_without_last(self) -> None:
        """A cursor in a pass that does not say where (an older one) starts the pass again."""
        source = self.source(page_size=2, max_pages=1)
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(5)]
        first = self.poll(source, cursor)
        self.assertTrue(first.more)
        older = {k: v for k, v in first.cursor.items() if k not in ("last", "start")}
        older["offset"] = 2
        messages, _ = self.drain(source, older, lambda polls: None)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in [*first.messages, *messages]),
                         bugs)

    def test_paging_change_on_a_read_page(self) -> None:
        """A change to a bug on a page already read, then a later one past it, are both published."""
        source = self.source(page_size=2, max_pages=1)
        old = self.bz.new_bug(summary="changed before the start")
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(8)]

        def between(polls: int) -> None:
            if polls == 0:
                self.bz.change(old, "maintainer@example.org", status="ASSIGNED")
                self.bz.now += 360
                self.bz.change(bugs[7], "maintainer@example.org", status="ASSIGNED")

        messages, cursor = self.drain(source, cursor, between)
        # Pages are read by bug id: time order holds within each poll only.
        self.assertEqual(sorted(kinds(m for m in messages if m.topic.endswith("update"))), [
            ("bugzilla.bug.update", old, "modify", "bug"),
            ("bugzilla.bug.update", bugs[7], "modify", "bug"),
        ])
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages
                                if m.topic.endswith("new")), bugs)
        # The pass over, the cursor is past the changes and forgets what is behind it.
        self.assertEqual(cursor["offset"], 0)
        self.assertGreater(cursor["since"], self.bz.now - 600)
        self.assertLess(len(cursor["seen"]), 4)

    def test_paging_bugs_changed_before_the_offset(self) -> None:
        """Many bugs entering the results before the offset mid-pass skip none after it."""
        source = self.source(page_size=2, max_pages=1)
        old = [self.bz.new_bug(summary=f"old {i}") for i in range(5)]
        cursor = self.start(source)
        bugs = [self.bz.new_bug(summary=f"b{i}") for i in range(6)]

        def between(polls: int) -> None:
            if polls == 1:
                for bug in old:
                    self.bz.change(bug, "maintainer@example.org", status="CLOSED")

        messages, _ = self.drain(source, cursor, between)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages
                                if m.topic.endswith("new")), bugs)
        self.assertEqual(sorted(m.body["bug"]["id"] for m in messages
                                if m.topic.endswith("update")), old)

    def test_first_start_far_ahead_or_not_a_time_refused(self) -> None:
        """
        A first start from a Bugzilla clock more than a day past this host's
        fails (it would be the floor for good, nothing before it published),
        and so does one from a clock that is not a finite time; with the
        clock right, the start is taken.
        """
        clock = Clock()
        clock.advance(self.bz.now)
        source = self.source(clock=clock)
        right = self.bz.now
        for db_time, said in ((right + 2 * 86400, "more than a day ahead of this host's"),
                              (float("nan"), "not a time: nan"),
                              (float("inf"), "not a time: inf")):
            self.bz.server.handlers["Bugzilla.time"] = lambda *a, t=db_time: {"db_time": t}
            failure = self.failureResultOf(source.initial_cursor(), BugzillaError)
            self.assertIn(said, str(failure.value))
        self.bz.server.handlers["Bugzilla.time"] = self.bz.time
        self.assertEqual(self.start(source)["floor"], right)

    def test_server_clock_ahead_of_host(self) -> None:
        """With Bugzilla's clock an hour ahead of the host's, the cursor follows Bugzilla's."""
        clock = Clock()
        clock.advance(self.bz.now - 3600)
        source = self.source(clock=clock)
        cursor = self.start(source)
        bug = self.bz.new_bug()
        bodies: list[str] = []
        for i in range(10):
            self.bz.add_comment(bug, "triage@example.org", f"comment {i}")
            when = self.bz.now
            self.bz.now += 540
            clock.advance(600)
            result = self.poll(source, cursor)
            bodies += [m.body["comment"]["body"] for m in result.messages
                       if m.body.get("comment")]
            cursor = result.cursor
            self.assertEqual(cursor["since"], when)
            self.assertLessEqual(len(cursor["seen"]), 2)
        self.assertEqual(bodies, [f"comment {i}" for i in range(10)])

    def test_change_past_the_clocks_logged(self) -> None:
        """A change dated past both clocks is published once and logged once as such."""
        warnings = Warnings(self)
        clock = Clock()
        clock.advance(self.bz.now)
        source = self.source(clock=clock)
        cursor = self.start(source)
        bug = self.bz.new_bug()
        self.bz.add_comment(bug, "triage@example.org", "from the future")
        self.bz.comments[bug][1]["creation_time"] = datetime(9999, 1, 1)
        one = self.poll(source, cursor)
        two = self.poll(source, one.cursor)
        self.assertEqual(len(one.messages), 2)
        self.assertEqual(two.messages, [])
        ahead = [t for t in warnings.texts if "ahead" in t]
        self.assertEqual(len(ahead), 1, warnings.texts)
        self.assertIn(str(bug), ahead[0])

    def test_server_time_fails(self) -> None:
        """A poll whose Bugzilla.time call fails fails as a whole, and the cursor stays."""
        source = self.source()
        cursor = self.start(source)
        self.bz.new_bug()
        self.caller.fail_next.append(XMLRPCFault(URL, "Bugzilla.time", 1, "boom"))
        self.failureResultOf(source.poll(cursor), XMLRPCFault)
        self.assertEqual(len(self.poll(source, cursor).messages), 1)

    def test_row_with_a_bad_time_skipped(self) -> None:
        """A row whose time is not a time is skipped with a count; the others and later polls go on."""
        source = self.source()
        cursor = self.start(source)
        broken = self.bz.new_bug(summary="broken")
        self.bz.change(broken, "triage@example.org", status="ASSIGNED")
        self.bz.add_comment(broken, "triage@example.org", "bad time")
        self.bz.add_comment(broken, "triage@example.org", "no such year")
        good = self.bz.new_bug(summary="good")
        self.bz.bugs[broken]["creation_time"] = "yesterday"
        self.bz.history[broken][0]["when"] = {"not": "a time"}
        self.bz.comments[broken][1]["creation_time"] = float("inf")
        self.bz.comments[broken][1]["time"] = float("inf")
        self.bz.comments[broken][2]["creation_time"] = 1e30
        result = self.poll(source, cursor)
        self.assertEqual(kinds(result.messages), [("bugzilla.bug.new", good, "create", "bug")])
        self.assertEqual(source.skipped, 4)
        # Each bad row is reported once, not at every poll that reads it again.
        again = self.poll(source, result.cursor)
        self.assertEqual(again.messages, [])
        self.assertEqual(source.skipped, 4)
        self.bz.add_comment(good, "triage@example.org", "still published")
        later = self.poll(source, again.cursor)
        self.assertEqual([m.body["comment"]["body"] for m in later.messages], ["still published"])

    def test_change_far_in_the_future(self) -> None:
        """A change dated years ahead is published once but does not move the cursor past later changes."""
        clock = Clock()
        clock.advance(self.bz.now)
        source = self.source(clock=clock)
        cursor = self.start(source)
        bug = self.bz.new_bug(summary="dated ahead")
        self.bz.add_comment(bug, "triage@example.org", "from the future")
        self.bz.comments[bug][1]["creation_time"] = datetime(9999, 1, 1)
        result = self.poll(source, cursor)
        self.assertEqual([m.body["event"]["action"] for m in result.messages], ["create", "create"])
        self.assertLess(result.cursor["since"], clock.seconds() + 3600)
        self.assertEqual(self.poll(source, result.cursor).messages, [])
        self.bz.add_comment(bug, "triage@example.org", "still published")
        clock.advance(120)
        later = self.poll(source, result.cursor)
        self.assertEqual([m.body["comment"]["body"] for m in later.messages], ["still published"])

    def test_cursor_past_now_pulled_back(self) -> None:
        """A cursor saved far in the future is brought back to now, so changes after it are asked for."""
        clock = Clock()
        clock.advance(self.bz.now)
        source = self.source(clock=clock)
        cursor = self.start(source)
        cursor = {**cursor, "since": 253370764800.0, "high": 253370764800.0}
        bug = self.bz.new_bug(summary="after the bad cursor")
        clock.advance(120)
        result = self.poll(source, cursor)
        self.assertEqual(kinds(result.messages), [("bugzilla.bug.new", bug, "create", "bug")])
        self.assertLess(result.cursor["since"], clock.seconds() + 3600)

    def test_unpublishable_event_skipped(self) -> None:
        """An event no message can be made of is skipped with a count; the others go on."""
        source = self.source()
        cursor = self.start(source)
        broken = self.bz.new_bug(summary="broken")
        good = self.bz.new_bug(summary="good")
        self.bz.bugs[broken]["flags"] = 5  # a list in every Bugzilla
        result = self.poll(source, cursor)
        self.assertEqual(kinds(result.messages), [("bugzilla.bug.new", good, "create", "bug")])
        self.assertEqual(source.skipped, 1)
        self.assertEqual(self.poll(source, result.cursor).messages, [])
        self.assertEqual(source.skipped, 1)

    def test_rows_nested_too_deeply_skipped(self) -> None:
        """
        A bug, a history entry or a comment whose data is nested deeper than
        Python recurses is skipped and reported once; the other bugs, and
        the bug's other rows, are published, and later polls go on.
        """
        source_caller = self.caller
        deep: Any = 1
        for _ in range(5000):
            deep = [deep]

        class Deepening:
            # The fake Bugzilla's answers, with deep values put in after the
            # XML-RPC round trip (which would not carry them).
            url = URL

            def call(self, method: str, *params: Any) -> Any:
                return source_caller.call(method, *params).addCallback(self.deepen, method)

            def deepen(self, answer: Any, method: str) -> Any:
                if method in ("Bug.search", "Bug.get"):
                    for bug in answer["bugs"]:
                        if bug["id"] == broken:
                            bug["whiteboard"] = deep
                elif method == "Bug.history":
                    for bug in answer["bugs"]:
                        if bug["id"] == changed:
                            bug["history"][0]["changes"] = deep
                elif method == "Bug.comments":
                    answer["bugs"][str(changed)]["comments"][1]["tags"] = deep
                return answer

            def close(self) -> Any:
                return source_caller.close()

        warnings = Warnings(self)
        source = self.source(api=BugzillaAPI(cast(Any, Deepening())))
        cursor = self.start(source)
        broken = self.bz.new_bug(summary="broken")
        changed = self.bz.new_bug(summary="changed")
        self.bz.change(changed, "triage@example.org", status="ASSIGNED")
        self.bz.add_comment(changed, "triage@example.org", "deep")
        self.bz.add_comment(changed, "triage@example.org", "fine")
        result = self.poll(source, cursor)
        self.assertEqual(
            [(k[1], k[2], k[3]) for k in kinds(result.messages)],
            [(changed, "create", "bug"), (changed, "create", "comment")],
        )
        self.assertEqual(result.messages[1].body["comment"]["body"], "fine")
        self.assertEqual(source.skipped, 3)
        self.assertEqual(sum("nested too deeply" in text for text in warnings.texts), 3)
        again = self.poll(source, result.cursor)
        self.assertEqual(again.messages, [])
        self.assertEqual(source.skipped, 3)
        self.bz.add_comment(changed, "triage@example.org", "still published")
        later = self.poll(source, again.cursor)
        self.assertEqual([m.body["comment"]["body"] for m in later.messages], ["still published"])

    def test_one_users_updates_within_one_second(self) -> None:
        """
        Bugzilla makes one history entry of one user's updates within one
        second; a poll between two such updates publishes the first, and
        the next poll the second alone, not the first again.
        """
        bz = self.bz
        real_change = bz.change

        def grouping_change(bug_id: int, who: str, **fields: Any) -> None:
            real_change(bug_id, who, **fields)
            entries = bz.history[bug_id]
            if (len(entries) >= 2 and entries[-2]["who"] == who
                    and entries[-2]["when"] == entries[-1]["when"]):
                entries[-2]["changes"].extend(entries.pop()["changes"])

        bz.change = grouping_change  # type: ignore[method-assign]
        bug = bz.new_bug()
        source = self.source()
        cursor = self.start(source)
        bz.change(bug, "bot@example.org", status="ASSIGNED")
        one = self.poll(source, cursor)
        bz.now -= bz.step  # the second update in the same second
        bz.change(bug, "bot@example.org", priority="high")
        self.assertEqual(len(bz.history[bug][-1]["changes"]), 2)
        bz.now += 5
        two = self.poll(source, one.cursor)
        changes = [[c["field"] for c in m.body["event"]["changes"]]
                   for m in [*one.messages, *two.messages] if m.body["event"]["action"] == "modify"]
        self.assertEqual(changes, [["status"], ["priority"]])
        self.assertEqual(self.poll(source, two.cursor).messages, [])

    def test_foreign_cursor_refused(self) -> None:
        """
        A cursor of another poller (a Koji one's, a generic one's), or one
        whose time is not a number, is refused as not the poller's own
        before Bugzilla is asked anything.
        """
        source = self.source()
        good = self.start(source)
        calls = len(self.bz.server.calls)
        for cursor, reason in [
            ({"event": 497700, "builds": {}, "tasks": {}, "repos": {}},
             "is not a Bugzilla poller's cursor: its 'since' is None"),
            ({"value": 17, "seen": []}, "is not a Bugzilla poller's cursor: its 'since' is None"),
            ({**good, "since": "2025-01-01"},
             "is not a Bugzilla poller's cursor: its 'since' is '2025-01-01'"),
            ({**good, "since": True}, "is not a Bugzilla poller's cursor: its 'since' is True"),
            (None, "holds NoneType, not a Bugzilla poller's cursor"),
        ]:
            failure = self.failureResultOf(source.poll(cursor), ForeignCursor)
            self.assertEqual(failure.value.reason, reason)
        self.assertEqual(len(self.bz.server.calls), calls)
        self.poll(source, good)

    def test_same_ids_for_same_events(self) -> None:
        """The same events polled again get the same message ids."""
        source = self.source()
        cursor = self.start(source)
        bug = self.bz.new_bug()
        self.bz.add_comment(bug, "triage@example.org", "x")
        first = self.poll(source, cursor)
        again = self.poll(self.source(), cursor)
        self.assertEqual([m.id for m in first.messages], [m.id for m in again.messages])

    def test_overlap_at_least_a_second(self) -> None:
        """An overlap under Bugzilla's one-second resolution is refused."""
        self.assertRaises(ValueError, self.source, overlap=0.5)

    def test_bug_object_upstream_shapes(self) -> None:
        """Upstream Bugzilla's string component/version and a missing QA contact are handled."""
        bug = bug_object({"id": 1, "component": "Drivers", "version": "unspecified",
                          "qa_contact": "", "alias": "CVE-2024-1"})
        self.assertEqual(bug["component"], {"name": "Drivers"})
        self.assertEqual(bug["version"], {"name": "unspecified"})
        self.assertIsNone(bug["qa_contact"])
        self.assertEqual(bug["alias"], ["CVE-2024-1"])

    def test_schema_installed(self) -> None:
        """The schema name is an installed fedora.messages entry point."""
        self.assertIn(SCHEMA, schema_names())


class PluginTests(SynchronousTestCase):
    """
    The C{bugzilla} plugin.
    """

    def test_plugin(self) -> None:
        """The plugin provides IProducerPlugin and builds a polling service without I/O."""
        plugin = BugzillaPollPlugin()
        self.assertTrue(verifyObject(IProducerPlugin, plugin))
        options = {name: option.default for name, option in plugin.options.items()}
        options.update(url=URL, products=["Fedora"], api_key_file="/nonexistent/key")
        context = PluginContext("bz", "community", options, FakePublisher(), Clock(),
                                HubSettings(state_dir=self.mktemp()))
        service = plugin.build(context)
        self.assertIsInstance(service, PollingService)
        self.assertEqual(service.interval, 120.0)
        source = service.source
        assert isinstance(source, BugzillaSource)
        self.assertEqual(source.products, ("Fedora",))
        self.assertEqual(source.show_bug, "https://bugzilla.example.org/show_bug.cgi?id=")
        assert isinstance(source.api.caller, XMLRPCClient)


class EndToEndTests(TestCase):
    """
    The whole poller over a real loopback socket, the server misbehaving.
    """

    @inlineCallbacks
    def wait_for(self, predicate: Callable[[], bool], what: str) -> Any:
        for _ in range(1000):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_polls_through_failures(self) -> Any:
        """Faults, HTTP errors, hostile XML and a silent server are survived; events arrive."""
        bz = FakeBugzilla()
        port, url = listen(bz.server, reactor)
        self.addCleanup(port.stopListening)
        self.addCleanup(bz.server.release_hanging)
        api = BugzillaAPI.connect(url, reactor, timeout=0.5, max_response_bytes=256 * 1024)
        source = BugzillaSource("bz", api, topic, url=url)
        publisher = FakePublisher()
        service = PollingService("bz", source, publisher, reactor, self.mktemp(), interval=0.05,
                                 backoff=0.01, max_backoff=0.05, jitter=0.0,
                                 run_in_thread=run_inline)
        service.startService()
        self.addCleanup(service.stopService)
        yield self.wait_for(lambda: service.polls >= 1, "a first poll")
        bz.server.misbehave = ["fault", "http500", "external_entity", "huge", "hang", "cut"]
        bug = bz.new_bug()
        yield self.wait_for(lambda: len(publisher.messages) == 1, "the new bug")
        self.assertEqual(service.errors, 6)
        self.assertEqual(publisher.messages[0].body["bug"]["id"], bug)
        check_with_schema_package(publisher.messages[0])
        self.flushLoggedErrors()



"""
Tests for L{fedhub.producers.xmlrpc_poll}: templates, the cursor rules of the
generic XML-RPC poller, and the worked example of C{examples/pollers.toml}
run against a fake package database.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings, load_config
from fedhub.errors import ConfigError
from fedhub.interfaces import IProducerPlugin
from fedhub.message import WARNING
from fedhub.plugins import PluginContext
from fedhub.producers.poller import IPollSource, PollingService, PollResult, run_inline
from fedhub.producers.xmlrpc_poll import (
    ITEM_SLICE,
    AnswerError,
    ItemError,
    XMLRPCPollPlugin,
    XMLRPCSource,
    lookup,
    render,
    topic_word,
)
from fedhub.xmlrpc import XMLRPCClient, XMLRPCFault
from tests.fakes_xmlrpc import DirectCaller, FakeXMLRPCServer, listen
from tests.test_poller import FakePublisher

reactor: Any = _reactor
URL = "https://pkgdb.example.org/xmlrpc"
PREFIX = "org.fedoraproject.test."
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "pollers.toml")


def topic(suffix: str) -> str:
    return PREFIX + suffix


class FakePackageDB:
    """
    The package database of the worked example: C{updates.since(time, limit)}
    lists updates changed at or after C{time}, oldest first;
    C{updates.latest()} gives the newest change.
    """

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, 0)
        self.updates: list[dict[str, Any]] = []
        self.next_id = 8800
        self.since_args: list[Any] = []
        self.server = FakeXMLRPCServer({"updates.since": self.since,
                                        "updates.latest": self.latest})

    def update(self, package: str, action: str, user: str = "jdoe",
               branch: str = "rawhide", step: int = 60) -> int:
        self.now += timedelta(seconds=step)
        self.next_id += 1
        self.updates.append({"id": self.next_id, "package": package, "branch": branch,
                             "action": action, "user": {"name": user}, "changed": self.now})
        return self.next_id

    def since(self, when: datetime, limit: int) -> dict[str, Any]:
        self.since_args.append(when)
        # Updates are kept oldest first; broken ones (for tests) always come along.
        found = [u for u in self.updates
                 if not isinstance(u.get("changed"), datetime) or u["changed"] >= when]
        return {"updates": found[:limit]}

    def latest(self) -> dict[str, Any]:
        return {"changed": max((u["changed"] for u in self.updates), default=self.now)}


def example_options() -> dict[str, Any]:
    """
    The options of the C{pkgdb} producer of C{examples/pollers.toml}.
    """
    config = load_config(EXAMPLE)
    (pkgdb,) = [p for p in config.producers if p.name == "pkgdb"]
    return dict(pkgdb.options)


def example_source(caller: Any, **changes: Any) -> XMLRPCSource:
    o = {**example_options(), **changes}
    return XMLRPCSource(
        "pkgdb", caller, topic, method=o["method"], params=o["params"], items=o["items"],
        id_field=o["id_field"], cursor_field=o["cursor_field"], topic_template=o["topic"],
        body=o["body"], schema=o["schema"], severity=o["severity"],
        initial_cursor=o["initial_cursor"], initial_method=o["initial_method"],
        initial_params=o["initial_params"], initial_path=o["initial_path"],
        page_size=o["page_size"])


class TemplateTests(SynchronousTestCase):
    """
    L{render}, L{lookup} and L{topic_word}.
    """

    item = {"id": 7, "user": {"name": "jdoe", "groups": ["packager", "qa"]},
            "package": "python-requests", "tags": []}

    def test_whole_placeholder_keeps_type(self) -> None:
        """A placeholder alone is the value itself: number, table, list."""
        self.assertEqual(render("{id}", self.item), 7)
        self.assertEqual(render("{user}", self.item), self.item["user"])
        self.assertEqual(render("{user.groups.1}", self.item), "qa")
        self.assertEqual(render("{}", self.item), self.item)

    def test_text(self) -> None:
        """Placeholders inside text are filled with text; doubled braces are literal."""
        self.assertEqual(render("{user.name} owns {package} ({id}) {{x}}", self.item),
                         "jdoe owns python-requests (7) {x}")

    def test_nested(self) -> None:
        """Tables and lists are rendered element by element; other values kept."""
        self.assertEqual(render({"a": ["{id}", 3, True], "b": {"c": "{package}"}}, self.item),
                         {"a": [7, 3, True], "b": {"c": "python-requests"}})

    def test_missing(self) -> None:
        """A placeholder naming nothing is an ItemError."""
        self.assertRaises(ItemError, render, "{user.email}", self.item)
        self.assertRaises(ItemError, render, "x{tags.0}", self.item)

    def test_cursor(self) -> None:
        """{cursor} is the cursor, typed alone and as text inside a string."""
        when = datetime(2025, 1, 1)
        self.assertEqual(render(["{cursor}", "after {cursor}", 5], {}, cursor=when),
                         [when, "after 2025-01-01T00:00:00", 5])

    def test_topic_words(self) -> None:
        """Values in topics can not add words, spaces or wildcards."""
        self.assertEqual(render("pkgdb.{p}", {"p": "a.b #*\n"}, clean=topic_word),
                         "pkgdb.a_b____")
        self.assertEqual(topic_word(""), "_")

    def test_lookup(self) -> None:
        """Dotted paths go through tables and lists; the empty path is the value."""
        self.assertEqual(lookup({"a": [{"b": 1}]}, "a.0.b"), 1)
        self.assertEqual(lookup([1], ""), [1])
        self.assertRaises(KeyError, lookup, {"a": 1}, "a.b")


class SourceTests(SynchronousTestCase):
    """
    L{XMLRPCSource} with the example's configuration, in-process.
    """

    def setUp(self) -> None:
        self.db = FakePackageDB()
        self.db.update("old-package", "retire")
        self.caller = DirectCaller(self.db.server, URL)
        self.source = example_source(self.caller)

    def poll(self, cursor: Any, source: XMLRPCSource | None = None) -> PollResult:
        result: PollResult = self.successResultOf((source or self.source).poll(cursor))
        return result

    def test_interface(self) -> None:
        """XMLRPCSource provides IPollSource."""
        self.assertTrue(verifyObject(IPollSource, self.source))

    def test_first_start_at_latest(self) -> None:
        """The first cursor is the service's latest change; it is not published again."""
        cursor = self.successResultOf(self.source.initial_cursor())
        self.assertEqual(cursor, {"value": "2025-03-01T12:01:00", "time": True, "seen": [],
                                  "after": True})
        self.assertEqual(self.poll(cursor).messages, [])
        self.assertEqual(self.db.since_args[-1], datetime(2025, 3, 1, 12, 1, 0))

    def test_worked_example(self) -> None:
        """New updates become messages with the example's topic and body, once, in order."""
        cursor = self.successResultOf(self.source.initial_cursor())
        first = self.db.update("python-requests", "orphan", user="jdoe")
        second = self.db.update("python-urllib3", "unretire", user="asmith", branch="f42")
        result = self.poll(cursor)
        self.assertEqual([m.topic for m in result.messages],
                         [topic("pkgdb.package.orphan"), topic("pkgdb.package.unretire")])
        body = dict(result.messages[0].body)
        self.assertEqual(body["summary"], "jdoe set python-requests (rawhide) to orphan")
        self.assertEqual(body["agent"], "jdoe")
        self.assertEqual(body["update"]["id"], first)
        self.assertEqual(body["update"]["changed"], "2025-03-01T12:02:00+00:00")
        self.assertEqual(result.messages[1].body["update"]["id"], second)
        self.assertEqual(result.cursor["value"], "2025-03-01T12:03:00")
        self.assertEqual(result.cursor["seen"], [str(second)])
        again = self.poll(result.cursor)
        self.assertEqual(again.messages, [])

    def test_same_position_later(self) -> None:
        """An item that arrives later at the cursor's very position is still published."""
        cursor = self.successResultOf(self.source.initial_cursor())
        self.db.update("a", "orphan")
        one = self.poll(cursor)
        late = self.db.update("b", "orphan", step=0)
        two = self.poll(one.cursor)
        self.assertEqual([m.body["update"]["id"] for m in two.messages], [late])
        self.assertEqual(len(two.cursor["seen"]), 2)
        self.assertEqual(self.poll(two.cursor).messages, [])

    def test_numeric_cursor(self) -> None:
        """Numeric positions work with an initial_cursor and a whole-item body."""
        server = FakeXMLRPCServer({"changes": lambda after: [
            {"serial": n, "what": f"change {n}"} for n in range(max(after, 0), 5)]})
        source = XMLRPCSource("n", DirectCaller(server, URL), topic, method="changes",
                              params=["{cursor}"], items="", id_field="serial",
                              cursor_field="serial", topic_template="numbers.change",
                              initial_cursor=2, severity=WARNING)
        cursor = self.successResultOf(source.initial_cursor())
        result = self.poll(cursor, source)
        self.assertEqual([dict(m.body) for m in result.messages],
                         [{"serial": 3, "what": "change 3"}, {"serial": 4, "what": "change 4"}])
        self.assertEqual(result.messages[0].severity, WARNING)
        self.assertEqual(result.cursor["value"], 4)

    def test_position_beyond_64_bits_skipped(self) -> None:
        """
        A numeric position XML-RPC can not carry (it would be sent back as
        the cursor, and every later poll would fail) is skipped with a
        warning; the items around it are published and the cursor stays
        one that can be sent; an initial cursor that large is refused.
        """
        rows = [{"serial": 3}, {"serial": 2**63}, {"serial": 4}]
        server = FakeXMLRPCServer({"changes": lambda after: [r for r in rows if r["serial"] > after]})
        source = XMLRPCSource("n", DirectCaller(server, URL), topic, method="changes",
                              params=["{cursor}"], items="", id_field="serial",
                              cursor_field="serial", topic_template="numbers.change",
                              initial_cursor=2)
        cursor = self.successResultOf(source.initial_cursor())
        result = self.poll(cursor, source)
        self.assertEqual([m.body["serial"] for m in result.messages], [3, 4])
        self.assertEqual(result.cursor["value"], 4)
        self.assertEqual(source.skipped, 1)
        again = self.poll(result.cursor, source)
        self.assertEqual(again.messages, [])
        huge = XMLRPCSource("n", DirectCaller(server, URL), topic, method="changes",
                            params=["{cursor}"], items="", id_field="serial",
                            cursor_field="serial", topic_template="numbers.change",
                            initial_cursor=10**30)
        failure = self.failureResultOf(huge.initial_cursor(), AnswerError)
        self.assertIn("must fit in 64 bits", str(failure.value))

    def test_bad_items_skipped(self) -> None:
        """Items without an id or with a position of another kind are skipped, the rest published."""
        cursor = self.successResultOf(self.source.initial_cursor())
        good = self.db.update("good", "orphan")
        self.db.updates.append({"package": "no-id", "changed": self.db.now})
        self.db.updates.append({"id": 1, "package": "bad-time", "changed": 12})
        self.db.updates.append({"id": 2, "package": "no-action", "user": {"name": "x"},
                                "branch": "b", "changed": self.db.now})
        result = self.poll(cursor)
        self.assertEqual([m.body["update"]["id"] for m in result.messages], [good])
        self.assertEqual(self.source.skipped, 3)
        self.flushLoggedErrors()

    def test_huge_bad_ids_bounded(self) -> None:
        """
        Skipped items are remembered by a digest and logged cut short: a
        service answering ids of megabytes does not grow the hub's memory or
        its log by as much at every poll.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        polls = iter(range(1000))

        class Huge:
            url = URL

            def call(self, method: str, *params: Any) -> Any:
                n = next(polls)
                return succeed({"updates": [{"id": f"{n}" + "A\n" * 100_000, "action": "b"}]})

            def close(self) -> Any:
                return succeed(None)

        source = XMLRPCSource("gen", cast(Any, Huge()), lambda t: "org.example." + t, method="m",
                              params=["{cursor}"], items="updates", id_field="id",
                              cursor_field="changed", topic_template="t.{action}", initial_cursor=0)
        for _ in range(5):
            self.poll({"value": 0, "time": False, "seen": [], "after": True}, source)
        self.assertEqual(source.skipped, 5)
        self.assertTrue(all(len(key) == 64 for key in source._warned))
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 5)
        self.assertTrue(all(len(text) < 500 and "\n" not in text for text in warnings), warnings)

    def test_large_answer_lets_the_reactor_run(self) -> None:
        """
        A large answer is handled in slices with turns of the reactor in
        between (the status page and the heartbeats keep answering), and
        gives the same result as at once.
        """
        count = 3 * ITEM_SLICE + 7
        answer = {"updates": [{"id": n, "changed": 1000 + n, "action": "b"} for n in range(count)]}

        class Large:
            url = URL

            def call(self, method: str, *params: Any) -> Any:
                return succeed(answer)

            def close(self) -> Any:
                return succeed(None)

        clock = Clock()
        source = XMLRPCSource("gen", cast(Any, Large()), lambda t: "org.example." + t, method="m",
                              params=["{cursor}"], items="updates", id_field="id",
                              cursor_field="changed", topic_template="t.{action}",
                              initial_cursor=0, clock=clock)
        d = source.poll({"value": 0, "time": False, "seen": [], "after": True})
        # After the first slice it waits for the reactor's next turn.
        self.assertNoResult(d)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        result: PollResult = self.successResultOf(d)
        self.assertEqual(len(result.messages), count)
        self.assertEqual(result.cursor["value"], 1000 + count - 1)
        at_once = self.poll({"value": 0, "time": False, "seen": [], "after": True},
                            XMLRPCSource("gen", cast(Any, Large()), lambda t: "org.example." + t,
                                         method="m", params=["{cursor}"], items="updates",
                                         id_field="id", cursor_field="changed",
                                         topic_template="t.{action}", initial_cursor=0))
        self.assertEqual([m.id for m in at_once.messages], [m.id for m in result.messages])

    def test_answer_without_items(self) -> None:
        """An answer without the configured list fails the poll."""
        cursor = self.successResultOf(self.source.initial_cursor())
        self.db.server.handlers["updates.since"] = lambda when, limit: {"other": []}
        self.failureResultOf(self.source.poll(cursor), AnswerError)
        self.db.server.handlers["updates.since"] = lambda when, limit: {"updates": "none"}
        self.failureResultOf(self.source.poll(cursor), AnswerError)

    def test_fault(self) -> None:
        """A fault fails the poll with XMLRPCFault."""
        cursor = self.successResultOf(self.source.initial_cursor())
        del self.db.server.handlers["updates.since"]
        self.failureResultOf(self.source.poll(cursor), XMLRPCFault)

    def test_full_page_means_more(self) -> None:
        """A full answer asks for another poll at once."""
        source = example_source(self.caller, params=["{cursor}", 2], page_size=2)
        cursor = self.successResultOf(source.initial_cursor())
        for i in range(5):
            self.db.update(f"p{i}", "orphan")
        seen: list[str] = []
        polls = 0
        while True:
            result = self.poll(cursor, source)
            polls += 1
            seen += [m.body["package"] for m in result.messages]
            cursor = result.cursor
            if not result.more:
                break
        self.assertEqual(seen, [f"p{i}" for i in range(5)])
        # "At or after" answers repeat the item at the cursor: one new item per page of two.
        self.assertEqual(polls, 6)

    def test_full_page_at_one_position_warns_once(self) -> None:
        """More items at the cursor's position than a page holds is a warning, once per stall."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        source = example_source(self.caller, params=["{cursor}", 2], page_size=2)
        cursor = self.successResultOf(source.initial_cursor())
        for step in (60, 0, 0):
            self.db.update("same-time", "orphan", step=step)
        published = 0
        for _ in range(4):
            result = self.poll(cursor, source)
            published += len(result.messages)
            cursor = result.cursor
        self.assertEqual(published, 2)  # the third at that time never fits in an answer
        self.assertFalse(result.more)

        def stalls() -> list[dict[str, Any]]:
            return [e for e in events if e.get("log_level") == LogLevel.warn
                    and "page_size" in formatEvent(e)]

        self.assertEqual(len(stalls()), 1)
        self.assertIn("2025-03-01T12:02:00", formatEvent(stalls()[0]))
        # After a poll that moved on, being stuck again is a new occurrence.
        self.assertEqual(len(self.poll(dict(cursor, value="2025-03-01T12:01:00", seen=["8801"]),
                                       source).messages), 1)
        self.poll(cursor, source)
        self.assertEqual(len(stalls()), 2)

    def test_initial_cursor_date_time(self) -> None:
        """A TOML date-time initial_cursor is a dateTime cursor: sent as one, compared as one."""
        start = self.db.now
        first = self.db.update("a", "orphan")
        source = example_source(self.caller, initial_method=None,
                                initial_cursor=start.replace(tzinfo=timezone.utc))
        cursor = self.successResultOf(source.initial_cursor())
        self.assertEqual(cursor["value"], "2025-03-01T12:01:00")
        self.assertTrue(cursor["time"])
        result = self.poll(cursor, source)
        self.assertEqual(self.db.since_args[-1], start)
        self.assertEqual([m.body["update"]["id"] for m in result.messages], [first])
        self.assertEqual(source.skipped, 0)

    def test_quoted_time_hint(self) -> None:
        """A text initial_cursor against dateTime items says how to write a date-time cursor."""
        source = example_source(self.caller, initial_method=None,
                                initial_cursor="2025-03-01T12:00:00")
        cursor = self.successResultOf(source.initial_cursor())
        self.db.server.handlers["updates.since"] = lambda when, limit: {
            "updates": [u for u in self.db.updates]}
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.poll(cursor, source)
        self.assertEqual(source.skipped, 1)
        self.assertIn("without quotes", formatEvent(events[-1]))

    def numbers_source(self, answer: list[Any]) -> XMLRPCSource:
        """
        A source with numeric positions over a server that always answers C{answer}.
        """
        server = FakeXMLRPCServer({"changes": lambda after: answer})
        return XMLRPCSource("n", DirectCaller(server, URL), topic, method="changes",
                            params=["{cursor}"], items="", id_field="serial",
                            cursor_field="serial", topic_template="numbers.change",
                            initial_cursor=2)

    def test_infinite_position_skipped(self) -> None:
        """An item at an infinite position is skipped and can not push the cursor out of reach."""
        answer: list[Any] = [{"serial": float("inf"), "what": "bad"}, {"serial": 3, "what": "ok"}]
        source = self.numbers_source(answer)
        cursor = self.successResultOf(source.initial_cursor())
        result = self.poll(cursor, source)
        self.assertEqual([m.body["serial"] for m in result.messages], [3])
        self.assertEqual(result.cursor["value"], 3)
        self.assertEqual(source.skipped, 1)
        # Later items are still published.
        answer[:] = [{"serial": 4, "what": "later"}]
        self.assertEqual([m.body["serial"] for m in self.poll(result.cursor, source).messages],
                         [4])

    def test_nan_position_skipped(self) -> None:
        """An item whose position is NaN (it compares with nothing) is skipped."""
        source = self.numbers_source([{"serial": 3, "what": "ok"},
                                      {"serial": float("nan"), "what": "bad"}])
        cursor = self.successResultOf(source.initial_cursor())
        result = self.poll(cursor, source)
        self.assertEqual([m.body["serial"] for m in result.messages], [3])
        self.assertEqual(result.cursor["value"], 3)
        self.assertEqual(source.skipped, 1)
        self.assertEqual(self.poll(result.cursor, source).messages, [])

    def test_deeply_nested_item_skipped(self) -> None:
        """An item nested too deeply to convert is skipped; the poll and the other items go on."""
        nested: Any = "x"
        for _ in range(5000):
            nested = [nested]
        items = [{"serial": 3, "what": nested}, {"serial": 4, "what": "ok"}]

        class Direct:
            url = URL

            def call(self, method: str, *params: Any) -> Any:
                # The real client builds such values without recursion; the
                # test server's marshaller could not send them.
                return succeed(items)

        source = XMLRPCSource("n", Direct(), topic, method="changes", params=["{cursor}"],  # type: ignore[arg-type]
                              items="", id_field="serial", cursor_field="serial",
                              topic_template="numbers.change", initial_cursor=2)
        result = self.poll({"value": 2, "time": False, "seen": [], "after": True}, source)
        self.assertEqual([m.body["serial"] for m in result.messages], [4])
        self.assertEqual(result.cursor["value"], 4)
        self.assertEqual(source.skipped, 1)

    def test_needs_a_start(self) -> None:
        """Without initial_cursor or initial_method the source is refused."""
        self.assertRaises(ConfigError, example_source, self.caller, initial_method=None)

    def test_params_only_know_the_cursor(self) -> None:
        """A parameter placeholder other than {cursor} is refused when the source is built."""
        self.assertRaises(ConfigError, example_source, self.caller, params=["{since}"])

    def test_bad_initial_answer(self) -> None:
        """An initial_method answer without a usable position fails the first start."""
        source = example_source(self.caller, initial_path="nothing")
        self.failureResultOf(source.initial_cursor(), AnswerError)
        self.db.server.handlers["updates.latest"] = lambda: {"changed": [1]}
        self.failureResultOf(self.source.initial_cursor(), AnswerError)


class PluginTests(SynchronousTestCase):
    """
    The C{xmlrpc} plugin and the example configuration.
    """

    def test_example_is_valid(self) -> None:
        """examples/pollers.toml passes validation with all three pollers."""
        config = load_config(EXAMPLE)
        self.assertEqual([(p.name, p.plugin) for p in config.producers],
                         [("koji", "koji"), ("bugzilla", "bugzilla"), ("pkgdb", "xmlrpc")])

    def test_initial_cursor_date_time_in_config(self) -> None:
        """initial_cursor takes a TOML date-time in the configuration file."""
        path = self.mktemp()
        with open(EXAMPLE) as f:
            text = f.read()
        text = text.replace('initial_method = "updates.latest"',
                            "initial_cursor = 2025-03-01T12:01:00Z")
        with open(path, "w") as f:
            f.write(text)
        (pkgdb,) = [p for p in load_config(path).producers if p.name == "pkgdb"]
        self.assertEqual(pkgdb.options["initial_cursor"],
                         datetime(2025, 3, 1, 12, 1, tzinfo=timezone.utc))

    def test_plugin(self) -> None:
        """The plugin provides IProducerPlugin and builds a polling service without I/O."""
        plugin = XMLRPCPollPlugin()
        self.assertTrue(verifyObject(IProducerPlugin, plugin))
        context = PluginContext("pkgdb", "infra", example_options(), FakePublisher(), Clock(),
                                HubSettings(state_dir=self.mktemp()))
        service = plugin.build(context)
        self.assertIsInstance(service, PollingService)
        assert isinstance(service.source, XMLRPCSource)
        assert isinstance(service.source.client, XMLRPCClient)
        self.assertEqual(service.source.client.url, "https://pkgdb.example.org/xmlrpc")
        self.assertFalse(os.path.exists(context.state_dir))


class EndToEndTests(TestCase):
    """
    The worked example over a real socket, through a restart.
    """

    @inlineCallbacks
    def wait_for(self, predicate: Callable[[], bool], what: str) -> Any:
        for _ in range(1000):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_example_over_http_with_restart(self) -> Any:
        """The example publishes over HTTP, and a restarted poller goes on from its cursor."""
        db = FakePackageDB()
        port, url = listen(db.server, reactor)
        self.addCleanup(port.stopListening)
        state_dir = self.mktemp()
        publisher = FakePublisher()

        def service() -> PollingService:
            source = example_source(XMLRPCClient(url, reactor, timeout=5.0))
            return PollingService("pkgdb", source, publisher, reactor, state_dir,
                                  interval=0.05, jitter=0.0, run_in_thread=run_inline)

        first = service()
        first.startService()
        yield self.wait_for(lambda: first.polls >= 1, "a first poll")
        db.update("python-requests", "orphan")
        yield self.wait_for(lambda: len(publisher.messages) == 1, "the first update")
        yield first.stopService()
        db.update("python-urllib3", "retire")
        second = service()
        second.startService()
        self.addCleanup(second.stopService)
        yield self.wait_for(lambda: len(publisher.messages) == 2, "the second update")
        self.assertEqual([m.body["package"] for m in publisher.messages],
                         ["python-requests", "python-urllib3"])

"""
Edge cases of L{fedhub.producers.xmlrpc_poll}: items dated far ahead, rows
repeated within an answer, bad items a service keeps answering, and the
checks of the plugin's keys that C{check-config} reports.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli.check_config import build_problems
from fedhub.config import HubSettings, parse_config
from fedhub.errors import ConfigError
from fedhub.plugins import PluginContext
from fedhub.producers import xmlrpc_poll
from fedhub.producers.poller import FUTURE_MARGIN, ForeignCursor, PollingService, PollResult
from fedhub.producers.xmlrpc_poll import XMLRPCPollPlugin, XMLRPCSource
from tests.fakes_xmlrpc import DirectCaller, FakeXMLRPCServer
from tests.test_poller import FakePublisher
from tests.test_xmlrpc_poller import URL, FakePackageDB, example_options, topic

#: The fedhub host's clock in these tests: a few minutes after the fake
#: package database's first update.
NOW = datetime(2025, 3, 1, 12, 5, 0, tzinfo=timezone.utc)
FAR = datetime(2100, 1, 1)


class LogCapture:
    """
    Collects warnings logged while a test runs.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def warnings(self, containing: str = "") -> list[str]:
        texts = [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]
        return [t for t in texts if containing in t]


def built_source(case: SynchronousTestCase, db: FakePackageDB, clock: Clock,
                 **changes: Any) -> XMLRPCSource:
    """
    The example's source as the plugin builds it (with the hub's reactor as
    its clock), calling C{db} in-process.
    """
    options = {**example_options(), **changes}
    context = PluginContext("pkgdb", "infra", options, FakePublisher(), clock,
                            HubSettings(state_dir=case.mktemp()))
    source = XMLRPCPollPlugin().build(context).source
    assert isinstance(source, XMLRPCSource)
    source.client = DirectCaller(db.server, URL)
    return source


class FutureTests(SynchronousTestCase):
    """
    Items whose dateTime position is more than L{FUTURE_MARGIN} past the
    host's clock are published but do not become the cursor.
    """

    def setUp(self) -> None:
        self.db = FakePackageDB()
        self.db.update("old-package", "retire")  # 12:01
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.source = built_source(self, self.db, self.clock)
        self.logs = LogCapture(self)

    def poll(self, cursor: Any, source: XMLRPCSource | None = None) -> PollResult:
        d = (source or self.source).poll(cursor)
        # A large answer lets the reactor turn between slices of items.
        for _ in range(100):
            if d.called:
                break
            self.clock.advance(0)
        result: PollResult = self.successResultOf(d)
        return result

    def far_update(self, package: str = "broken-clock") -> int:
        """
        An update dated in the year 2100, listed like the others.
        """
        self.db.next_id += 1
        self.db.updates.append({"id": self.db.next_id, "package": package, "branch": "rawhide",
                                "action": "orphan", "user": {"name": "x"}, "changed": FAR})
        return self.db.next_id

    def ids(self, result: PollResult) -> list[int]:
        return [m.body["update"]["id"] for m in result.messages]

    def test_far_item_does_not_become_the_cursor(self) -> None:
        """An item dated far ahead is published once; items after it are still published."""
        cursor = self.successResultOf(self.source.initial_cursor())
        first = self.db.update("a", "orphan")  # 12:02
        far = self.far_update()
        one = self.poll(cursor)
        self.assertEqual(self.ids(one), [first, far])
        self.assertEqual(one.cursor["value"], "2025-03-01T12:02:00")
        later = self.db.update("b", "orphan")  # 12:03
        two = self.poll(one.cursor)
        self.assertEqual(self.ids(two), [later])
        three = self.poll(two.cursor)
        self.assertEqual(self.ids(three), [])
        warned = self.logs.warnings("2100-01-01")
        self.assertEqual(len(warned), 1)
        self.assertIn(str(far), warned[0])

    def test_far_item_remembered_until_the_cursor_passes_it(self) -> None:
        """A far item the clock reaches moves the cursor, unrepeated; then it is forgotten."""
        cursor = self.successResultOf(self.source.initial_cursor())
        self.db.update("a", "orphan")  # 12:02
        near = NOW.replace(tzinfo=None) + timedelta(seconds=2 * FUTURE_MARGIN)
        self.db.next_id += 1
        early = self.db.next_id
        self.db.updates.append({"id": early, "package": "early", "branch": "b",
                                "action": "orphan", "user": {"name": "x"}, "changed": near})
        one = self.poll(cursor)
        self.assertEqual(len(one.messages), 2)
        self.assertEqual(one.cursor["ahead"], [[near.isoformat(), str(early)]])
        # Time passes: the item is no longer ahead, but it was published.
        self.clock.advance(3 * FUTURE_MARGIN)
        two = self.poll(one.cursor)
        self.assertEqual(self.ids(two), [])
        self.assertEqual((two.cursor["value"], two.cursor["seen"]),
                         (near.isoformat(), [str(early)]))
        self.assertEqual(self.ids(self.poll(two.cursor)), [])
        later = self.db.update("c", "orphan", step=int(3 * FUTURE_MARGIN))
        three = self.poll(two.cursor)
        self.assertEqual(self.ids(three), [later])
        self.assertNotIn("ahead", three.cursor)

    def test_cursor_beyond_the_margin_is_brought_back(self) -> None:
        """A saved cursor far ahead (an older fedhub's) reads again from now, without repeats."""
        self.db.update("before-now", "orphan")  # 12:02, before the host's now
        at_now = self.db.update("at-now", "orphan", step=180)  # 12:05
        far = self.far_update()
        saved = {"value": FAR.isoformat(), "time": True, "seen": [str(far)]}
        result = self.poll(saved)
        self.assertEqual(self.db.since_args[-1], NOW.replace(tzinfo=None))
        self.assertEqual(self.ids(result), [at_now])
        self.assertEqual(result.cursor["value"], "2025-03-01T12:05:00")
        self.assertEqual(len(self.logs.warnings("brought back")), 1)
        self.assertEqual(self.ids(self.poll(result.cursor)), [])

    def test_brought_back_to_the_whole_second(self) -> None:
        """
        A cursor brought back while the clock is part-way into a second goes
        back to that second's start, as dateTime positions have no fraction:
        an item dated in that very second is still published.
        """
        self.clock.advance(0.75)
        at_now = self.db.update("at-now", "orphan", step=240)  # 12:05:00
        saved = {"value": FAR.isoformat(), "time": True, "seen": []}
        result = self.poll(saved)
        self.assertEqual(self.db.since_args[-1], NOW.replace(tzinfo=None))
        self.assertEqual(self.ids(result), [at_now])
        self.assertEqual(self.ids(self.poll(result.cursor)), [])

    def test_full_answer_ending_ahead(self) -> None:
        """A full answer of far items is not polled again at once; that is warned about once."""
        source = built_source(self, self.db, self.clock, params=["{cursor}", 2], page_size=2)
        cursor = self.successResultOf(source.initial_cursor())
        self.far_update()
        self.far_update()
        one = self.poll(cursor, source)
        self.assertEqual(len(one.messages), 1)  # the item at the start's position fills the rest
        self.assertFalse(one.more)
        two = self.poll(one.cursor, source)
        self.assertEqual(two.messages, [])
        self.assertFalse(two.more)
        warned = self.logs.warnings("full page")
        self.assertEqual(len(warned), 1)
        self.assertIn("ahead", warned[0])
        # New items sort before the far ones: they are read, a page at a time.
        first = self.db.update("a", "orphan")
        second = self.db.update("b", "orphan")
        self.db.updates.sort(key=lambda u: u["changed"])
        three = self.poll(two.cursor, source)
        self.assertEqual(self.ids(three), [first])
        self.assertTrue(three.more)
        self.assertEqual(self.ids(self.poll(three.cursor, source)), [second])

    def test_full_answer_advancing_past_far_items(self) -> None:
        """A full answer that moved the cursor asks for the next page at once, as usual."""
        source = built_source(self, self.db, self.clock, params=["{cursor}", 3], page_size=3)
        cursor = self.successResultOf(source.initial_cursor())
        first = self.db.update("a", "orphan")
        far = self.far_update()
        result = self.poll(cursor, source)
        self.assertEqual(self.ids(result), [first, far])
        self.assertTrue(result.more)

    def dated(self, when: datetime, package: str = "ahead") -> int:
        """
        An update dated C{when} (naive, UTC), listed in date order.
        """
        self.db.next_id += 1
        self.db.updates.append({"id": self.db.next_id, "package": package, "branch": "b",
                                "action": "orphan", "user": {"name": "x"}, "changed": when})
        self.db.updates.sort(key=lambda u: u["changed"])
        return self.db.next_id

    def poll_often(self, cursor: Any, times: int, source: XMLRPCSource | None = None,
                   published: list[int] | None = None) -> Any:
        """
        Poll C{times} times from C{cursor}, adding the ids published to
        C{published}, and check that the cursor never remembers more than
        L{xmlrpc_poll.AHEAD_LIMIT} items ahead.  The last cursor.
        """
        for _ in range(times):
            result = self.poll(cursor, source)
            if published is not None:
                published.extend(self.ids(result))
            self.assertLessEqual(len(result.cursor.get("ahead", [])), xmlrpc_poll.AHEAD_LIMIT)
            cursor = result.cursor
        return cursor

    def test_far_items_remembered_are_bounded(self) -> None:
        """Past AHEAD_LIMIT far items, the nearest are published; the others wait, unrepeated."""
        self.patch(xmlrpc_poll, "AHEAD_LIMIT", 2)
        cursor = self.successResultOf(self.source.initial_cursor())
        for year in (2101, 2100, 2102):
            self.dated(datetime(year, 1, 1), str(year))
        result = self.poll(cursor)
        self.assertEqual([m.body["package"] for m in result.messages], ["2100", "2101"])
        self.assertEqual([a[0][:4] for a in result.cursor["ahead"]], ["2100", "2101"])
        self.assertEqual(self.poll(result.cursor).messages, [])
        warned = self.logs.warnings("held back")
        self.assertEqual(len(warned), 1)
        self.assertIn("2102-01-01", warned[0])

    def test_many_items_ahead_warned_in_few_lines(self) -> None:
        """
        A poll that publishes many items ahead of the clock names the first
        AHEAD_WARNINGS in lines of their own and counts the others in one
        line; a later poll with nothing new adds no line.
        """
        source = built_source(self, self.db, self.clock, params=["{cursor}", 5000],
                              page_size=None)
        cursor = self.successResultOf(source.initial_cursor())
        start = NOW.replace(tzinfo=None) + timedelta(days=1)
        count = xmlrpc_poll.AHEAD_WARNINGS + 15
        expected = [self.dated(start + timedelta(minutes=i)) for i in range(count)]
        first = self.poll(cursor, source)
        self.assertEqual(self.ids(first), expected)
        named = self.logs.warnings("past this host's clock: published")
        self.assertEqual(len(named), xmlrpc_poll.AHEAD_WARNINGS)
        for warning, item in zip(named, expected):
            self.assertIn(f"Item {item} ", warning)
        [summary] = self.logs.warnings("more items")
        last = (start + timedelta(minutes=count - 1)).isoformat()
        self.assertIn("15 more items of ", summary)
        self.assertIn(f"up to {last}", summary)
        self.assertEqual(len(first.cursor["ahead"]), count)
        again = self.poll(first.cursor, source)
        self.assertEqual(self.ids(again), [])
        self.assertEqual(len(self.logs.warnings("past this host's clock")), xmlrpc_poll.AHEAD_WARNINGS + 1)

    def test_more_far_items_than_remembered_published_once(self) -> None:
        """
        More items ahead of the clock than a cursor remembers are each
        published once over many polls, as the clock reaches them, with
        the same message id never handed over twice; one that appears
        nearer while the cursor is full is published when it comes due.
        """
        source = built_source(self, self.db, self.clock, params=["{cursor}", 5000],
                              page_size=None)
        cursor = self.successResultOf(source.initial_cursor())
        start = NOW.replace(tzinfo=None) + timedelta(days=1)
        count = xmlrpc_poll.AHEAD_LIMIT + 250
        expected = [self.dated(start + timedelta(minutes=i)) for i in range(count)]
        published: list[int] = []
        message_ids: list[str] = []
        first = self.poll(cursor, source)
        message_ids.extend(m.id for m in first.messages)
        self.assertEqual(self.ids(first), expected[:xmlrpc_poll.AHEAD_LIMIT])
        published.extend(self.ids(first))
        cursor = self.poll_often(first.cursor, 5, source, published)
        self.assertEqual(len(published), xmlrpc_poll.AHEAD_LIMIT)
        # A change dated nearer than all of them, while the cursor is full.
        nearer = self.dated(start - timedelta(hours=1), "nearer")
        cursor = self.poll_often(cursor, 3, source, published)
        self.assertNotIn(nearer, published)
        # The clock reaches the change, then some of the items remembered:
        # each passed makes room for one held back.
        self.clock.advance(timedelta(days=1, minutes=100).total_seconds())
        for _ in range(3):
            result = self.poll(cursor, source)
            message_ids.extend(m.id for m in result.messages)
            published.extend(self.ids(result))
            cursor = result.cursor
        self.assertIn(nearer, published)
        self.assertEqual(len(cursor["ahead"]), xmlrpc_poll.AHEAD_LIMIT)
        # Then all of them.
        self.clock.advance(timedelta(minutes=count).total_seconds())
        for _ in range(3):
            result = self.poll(cursor, source)
            message_ids.extend(m.id for m in result.messages)
            published.extend(self.ids(result))
            cursor = result.cursor
        self.assertEqual(sorted(published), sorted([*expected, nearer]))
        self.assertEqual(len(set(message_ids)), len(message_ids))
        self.assertEqual(cursor["seen"], [str(expected[-1])])
        self.assertEqual(len(self.logs.warnings("held back")), 1)

    def test_held_items_published_as_room_is_made(self) -> None:
        """
        An item held back is published once the cursor passes a remembered
        one, before the clock reaches it; one coming due is published as it
        does; an item remembered is not published again on either way.
        """
        self.patch(xmlrpc_poll, "AHEAD_LIMIT", 2)
        cursor = self.successResultOf(self.source.initial_cursor())
        base = NOW.replace(tzinfo=None)
        hour1, hour2, hour3 = (self.dated(base + timedelta(hours=h)) for h in (1, 2, 3))
        one = self.poll(cursor)
        self.assertEqual(self.ids(one), [hour1, hour2])
        # Two changes appear while the cursor is full: held back.
        soon = self.dated(base + timedelta(minutes=30), "soon")  # 12:35
        past = self.dated(base + timedelta(hours=1, minutes=1), "past")  # 13:06
        self.assertEqual(self.ids(self.poll(one.cursor)), [])
        # 12:45: the bound is 12:55; the change at 12:35 comes due and is
        # published; both remembered items are still ahead.
        self.clock.advance(timedelta(minutes=40).total_seconds())
        two = self.poll(one.cursor)
        self.assertEqual(self.ids(two), [soon])
        self.assertEqual(len(two.cursor["ahead"]), 2)
        # 13:00: the bound is 13:10.  The cursor passes the first hour's item,
        # unrepeated, to the change at 13:06, published as it comes due; the
        # room the first hour's item leaves takes the third hour's.
        self.clock.advance(timedelta(minutes=15).total_seconds())
        three = self.poll(two.cursor)
        self.assertEqual(self.ids(three), [past, hour3])
        self.assertEqual(three.cursor["value"], (base + timedelta(hours=1, minutes=1)).isoformat())
        self.assertEqual([a[1] for a in three.cursor["ahead"]], [str(hour2), str(hour3)])
        self.clock.advance(timedelta(hours=3).total_seconds())
        four = self.poll(three.cursor)
        self.assertEqual(self.ids(four), [])
        self.assertEqual(four.cursor["value"], (base + timedelta(hours=3)).isoformat())
        self.assertEqual(four.cursor["seen"], [str(hour3)])
        self.assertEqual(len(self.logs.warnings("held back")), 1)

    def test_held_items_across_a_restart(self) -> None:
        """
        A poller restarted from its cursor file publishes the items held
        back once, and none of those it remembered again.
        """
        self.patch(xmlrpc_poll, "AHEAD_LIMIT", 3)
        publisher = FakePublisher()
        state = HubSettings(state_dir=self.mktemp())
        options = {**example_options(), "interval": 60.0, "jitter": 0.0}

        def service() -> PollingService:
            context = PluginContext("pkgdb", "infra", options, publisher, self.clock, state)
            built = XMLRPCPollPlugin().build(context)
            assert isinstance(built.source, XMLRPCSource)
            built.source.client = DirectCaller(self.db.server, URL)
            return built

        base = NOW.replace(tzinfo=None)
        first = service()
        first.startService()
        self.clock.advance(0)  # the first start: from the latest change, at 12:01
        self.assertEqual(first.polls, 1)
        expected = [self.dated(base + timedelta(hours=h)) for h in range(1, 7)]
        self.clock.advance(60)
        self.clock.advance(60)
        self.assertEqual(first.polls, 3)
        self.assertEqual(len(publisher.messages), 3)
        self.successResultOf(first.stopService())
        second = service()
        second.startService()
        self.clock.advance(0)
        self.clock.advance(60)
        self.assertEqual(second.polls, 2)
        self.assertEqual(len(publisher.messages), 3)
        # Hour after hour, the clock reaches them all.
        for _ in range(7):
            self.clock.advance(3600)
        self.assertEqual(second.polls, 9)
        self.successResultOf(second.stopService())
        ids = [m.body["update"]["id"] for m in publisher.messages]
        self.assertEqual(sorted(ids), expected)
        self.assertEqual(len({m.id for m in publisher.messages}), len(ids))

    def test_without_a_clock_nothing_is_bounded(self) -> None:
        """A source built without a clock keeps the former behaviour: the highest position wins."""
        source = XMLRPCSource("n", DirectCaller(self.db.server, URL), topic,
                              method="updates.since", params=["{cursor}", 100],
                              items="updates", id_field="id", cursor_field="changed",
                              topic_template="t", initial_method="updates.latest",
                              initial_path="changed")
        cursor = self.successResultOf(source.initial_cursor())
        self.far_update()
        self.assertEqual(self.poll(cursor, source).cursor["value"], FAR.isoformat())

    def test_numeric_positions_are_not_bounded(self) -> None:
        """A number has no known relation to time: a far-off number becomes the cursor."""
        server = FakeXMLRPCServer({"changes": lambda after: [
            {"serial": 3}, {"serial": 10**12}]})
        options = {**example_options(), "method": "changes", "params": ["{cursor}"],
                   "items": "", "id_field": "serial", "cursor_field": "serial",
                   "topic": "numbers.change", "body": None, "initial_method": None,
                   "initial_cursor": 2}
        context = PluginContext("n", "infra", options, FakePublisher(), self.clock,
                                HubSettings(state_dir=self.mktemp()))
        source = XMLRPCPollPlugin().build(context).source
        assert isinstance(source, XMLRPCSource)
        source.client = DirectCaller(server, URL)
        cursor = self.successResultOf(source.initial_cursor())
        result = self.poll(cursor, source)
        self.assertEqual(len(result.messages), 2)
        self.assertEqual(result.cursor["value"], 10**12)


class RepeatTests(SynchronousTestCase):
    """
    A row listed twice in one answer.
    """

    def setUp(self) -> None:
        self.db = FakePackageDB()
        self.db.update("old-package", "retire")
        self.source = built_source(self, self.db, Clock())
        self.source.clock = None

    def test_repeated_row_published_once(self) -> None:
        """The same item twice in one answer is one message."""
        cursor = self.successResultOf(self.source.initial_cursor())
        self.db.update("a", "orphan")
        self.db.updates.append(dict(self.db.updates[-1]))
        result: PollResult = self.successResultOf(self.source.poll(cursor))
        self.assertEqual(len(result.messages), 1)
        self.assertEqual(result.cursor["seen"], [str(self.db.next_id)])

    def test_same_id_at_two_positions(self) -> None:
        """One id at two positions is two events, as it would be across two polls."""
        cursor = self.successResultOf(self.source.initial_cursor())
        item = self.db.update("a", "orphan")
        self.db.updates.append(dict(self.db.updates[-1], changed=self.db.now
                                    + timedelta(seconds=60)))
        result: PollResult = self.successResultOf(self.source.poll(cursor))
        self.assertEqual([m.body["update"]["id"] for m in result.messages], [item, item])
        self.assertEqual(len({m.id for m in result.messages}), 2)


class ForeignCursorTests(SynchronousTestCase):
    """
    A saved cursor that is not a generic poller's.
    """

    def test_foreign_cursor_refused(self) -> None:
        """
        A cursor of another poller (a Koji one's, a Bugzilla one's), or one
        whose position is no number, text or time, is refused as not the
        poller's own before the service is called.
        """
        db = FakePackageDB()
        source = built_source(self, db, Clock())
        good = self.successResultOf(source.initial_cursor())
        calls = len(db.server.calls)
        for cursor, reason in [
            ({"event": 497700, "builds": {}, "tasks": {}, "repos": {}},
             "is not an XML-RPC poller's cursor: its 'value' is None"),
            ({"since": 1740000000.0, "seen": {}},
             "is not an XML-RPC poller's cursor: its 'value' is None"),
            ({**good, "value": [1]}, "is not an XML-RPC poller's cursor: its 'value' is [1]"),
            ("2025-03-01T12:01:00", "holds str, not an XML-RPC poller's cursor"),
        ]:
            failure = self.failureResultOf(source.poll(cursor), ForeignCursor)
            self.assertEqual(failure.value.reason, reason)
        self.assertEqual(len(db.server.calls), calls)
        self.successResultOf(source.poll(good))


class BadItemTests(SynchronousTestCase):
    """
    Items a service keeps answering that can not be published.
    """

    def setUp(self) -> None:
        self.db = FakePackageDB()
        self.db.update("old-package", "retire")
        self.source = built_source(self, self.db, Clock())
        self.source.clock = None
        self.logs = LogCapture(self)

    def poll_times(self, times: int) -> None:
        cursor: Any = {"value": "2025-03-01T12:01:00", "time": True, "seen": [], "after": True}
        for _ in range(times):
            result: PollResult = self.successResultOf(self.source.poll(cursor))
            cursor = result.cursor

    def test_bad_item_warned_once(self) -> None:
        """A position of the wrong type is warned about and counted once, not at every poll."""
        self.db.updates.append({"id": 77, "package": "bad-time", "changed": 12})
        self.poll_times(3)
        self.assertEqual(self.source.skipped, 1)
        warned = self.logs.warnings("Skipping")
        self.assertEqual(len(warned), 1)
        self.assertIn("77", warned[0])

    def test_bad_item_warned_once_while_the_cursor_moves(self) -> None:
        """
        An item whose position does not compare with the cursor is warned
        about once, though the warning names the cursor and good items move
        it at every poll.
        """
        self.db.updates.append({"id": 77, "package": "bad-time", "changed": 12})
        cursor: Any = {"value": "2025-03-01T12:01:00", "time": True, "seen": [], "after": True}
        for n in range(3):
            self.db.update(f"good-{n}", "orphan")
            result: PollResult = self.successResultOf(self.source.poll(cursor))
            self.assertNotEqual(result.cursor["value"], cursor["value"])
            cursor = result.cursor
        self.assertEqual(self.source.skipped, 1)
        self.assertEqual(len(self.logs.warnings("Skipping")), 1)

    def test_missing_position_names_the_item(self) -> None:
        """The warning about an item without a position names its id; it is given once."""
        self.db.updates.append({"id": 78, "package": "no-time"})
        self.poll_times(2)
        warned = self.logs.warnings("Skipping")
        self.assertEqual(len(warned), 1)
        self.assertIn("item 78", warned[0])
        self.assertIn("changed", warned[0])
        self.assertEqual(self.source.skipped, 1)

    def test_item_without_id_warned_once(self) -> None:
        """An item without an id is recognised by its content: warned about once."""
        self.db.updates.append({"package": "no-id", "changed": datetime(2025, 3, 1, 12, 30)})
        self.db.updates.append({"package": "no-id-either", "changed": datetime(2025, 3, 1, 12, 30)})
        self.poll_times(3)
        self.assertEqual(self.source.skipped, 2)
        self.assertEqual(len(self.logs.warnings("Skipping")), 2)

    def test_changed_problem_warned_again(self) -> None:
        """The same item with another problem is warned about again."""
        bad: dict[str, Any] = {"id": 79, "package": "bad", "changed": 12}
        self.db.updates.append(bad)
        self.poll_times(2)
        del bad["changed"]
        self.poll_times(2)
        self.assertEqual(self.source.skipped, 2)

    def test_memory_is_bounded(self) -> None:
        """Only the WARNED_LIMIT most recent problems are remembered."""
        self.patch(xmlrpc_poll, "WARNED_LIMIT", 2)
        for n in range(3):
            self.db.updates.append({"id": 90 + n, "package": "bad", "changed": 12})
        self.poll_times(1)
        self.assertEqual(self.source.skipped, 3)
        self.assertLessEqual(len(self.source._warned), 2)
        # The oldest was forgotten: warned again; the others are not.
        self.poll_times(1)
        self.assertEqual(self.source.skipped, 6)  # each poll forgets one the next needs


CONFIG = """
[hub]
state_dir = "{state}"
[domains.infra]
broker = "memory"

[[producers]]
name = "pkgdb"
plugin = "xmlrpc"
domain = "infra"
url = "http://127.0.0.1:16101/xmlrpc"
method = "updates.since"
id_field = "id"
cursor_field = "changed"
{extra}
"""


class ConfigTests(SynchronousTestCase):
    """
    The plugin's keys as C{check-config} checks them.
    """

    def parse(self, extra: str) -> Any:
        text = CONFIG.replace("{state}", self.mktemp()).replace("{extra}", extra)
        return parse_config(text, "hub.toml")

    def problems(self, extra: str) -> dict[str, str]:
        try:
            config = self.parse(extra)
        except ConfigError as e:
            found = e.problems
        else:
            found = build_problems(config)
        return {p.path: p.message for p in found}

    def test_params_checked_with_the_other_keys(self) -> None:
        """A params placeholder other than {cursor} is reported along with other problems."""
        problems = self.problems('params = ["{since}", 100]\ninitial_cursor = 5\n'
                                 'topic = "t"\ninterval = 0')
        self.assertIn("producers[0].interval", problems)
        self.assertIn("producers[0].params", problems)
        self.assertIn("{cursor}", problems["producers[0].params"])
        self.assertIn("{since}", problems["producers[0].params"])

    def test_no_start_named_by_key(self) -> None:
        """Neither initial_cursor nor initial_method: reported at producers[N].initial_cursor."""
        problems = self.problems('topic = "t"')
        self.assertEqual(list(problems), ["producers[0].initial_cursor"])
        self.assertIn("initial_method", problems["producers[0].initial_cursor"])

    def test_no_start_reported_with_the_others(self) -> None:
        """
        The missing start is found while the file is checked, with the
        file's other problems and the line of its table, not only once they
        are fixed.
        """
        error = self.assertRaises(ConfigError, self.parse, 'topic = "t"\ninterval = 0')
        found = {p.path: p for p in error.problems}
        self.assertEqual(sorted(found), ["producers[0].initial_cursor", "producers[0].interval"])
        self.assertIsNotNone(found["producers[0].initial_cursor"].line)

    def test_no_start_without_a_component(self) -> None:
        """Built outside a configuration, the problem is named by the bare key."""
        options = {**example_options(), "initial_method": None}
        context = PluginContext("pkgdb", "infra", options, FakePublisher(), Clock(),
                                HubSettings(state_dir=self.mktemp()))
        error = self.assertRaises(ConfigError, XMLRPCPollPlugin().build, context)
        self.assertEqual([p.path for p in error.problems], ["options.initial_cursor"])

    def test_unbalanced_topic_refused(self) -> None:
        """A topic with an unmatched brace is refused, saying how to write a literal one."""
        for topic_text in ("pkgdb.{action", "pkgdb.action}", "pkgdb.{{action}", "a.{b}}"):
            problems = self.problems(f'topic = "{topic_text}"\ninitial_cursor = 5')
            self.assertEqual(list(problems), ["producers[0].topic"], topic_text)
            self.assertIn('"{{"', problems["producers[0].topic"])

    def test_balanced_templates_accepted(self) -> None:
        """Placeholders and doubled braces pass."""
        config = self.parse('topic = "pkgdb.{action}.{{x}}"\ninitial_cursor = 5\n'
                            'params = ["{cursor}", "a {{b}} {cursor}"]\n'
                            '[producers.body]\nsummary = "{user.name} {{ok}}"')
        self.assertEqual(build_problems(config), [])

    def test_unbalanced_params_and_body_refused(self) -> None:
        """Every template is checked: params and body strings too."""
        problems = self.problems('topic = "t"\ninitial_cursor = 5\nparams = ["{cursor"]\n'
                                 '[producers.body]\nsummary = "{user.name set"')
        self.assertEqual(sorted(problems), ["producers[0].body", "producers[0].params"])
        self.assertIn("summary", problems["producers[0].body"])


class SecretInURLTests(SynchronousTestCase):
    """
    A poller URL's query string (often an API key) is never shown: not in
    the source's description (logs, the status page), nor in the text of a
    failed call.
    """

    def test_description_and_errors(self) -> None:
        from fedhub.testing import producer_context
        from fedhub.xmlrpc import TransportError, XMLRPCError, display_url

        url = "http://127.0.0.1:9/RPC2?apikey=S3CRET&x=1"
        plugin = XMLRPCPollPlugin()
        options = {**{k: v for k, v in example_options().items() if v is not None}, "url": url}
        service = plugin.build(producer_context(plugin, options))
        self.assertEqual(service.source.description, f"{options['method']} at http://127.0.0.1:9/RPC2")
        for error in (XMLRPCError(url, "m", "broken"), TransportError(url, "m", "refused")):
            self.assertNotIn("S3CRET", str(error))
            self.assertEqual(error.url, url)
        self.assertEqual(display_url("https://[::1]:8443/a/b?k=v#f"), "https://[::1]:8443/a/b")
        self.assertEqual(display_url("http://h:99999/x?k"), "http://h/x")

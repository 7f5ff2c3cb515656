"""
Tests for L{fedhub.producers.poller}: scheduling, containment, backoff, the
persisted cursor and what happens when the process dies between a poll and
the hand-over of its messages.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.errors import MessageError, PublishError, TemporarilyUnavailable
from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.producers.poller import (
    CURSOR_FILE,
    CursorError,
    CursorStore,
    ForeignCursor,
    IPollSource,
    PollingService,
    PollResult,
    http_url,
    require_fields,
    run_inline,
)


class SourceFailure(Exception):
    """
    What the fake source raises when told to fail.
    """


@implementer(IPollSource)
class FakeSource:
    """
    A source over a list of events: the cursor is the index of the next one;
    each poll returns at most C{page} of them.  Polls can be held (a Deferred
    kept unfired) or made to fail.
    """

    description = "fake source"

    def __init__(self, events: list[str] | None = None, page: int = 100, start: int = 0) -> None:
        self.events = list(events or [])
        self.page = page
        self.start = start
        self.polled: list[Any] = []
        self.initial_calls = 0
        self.hold = False
        self.held: list[Deferred[PollResult]] = []
        self.failures: list[Exception] = []
        self.closed = 0
        self.cancelled: list[Any] = []

    def initial_cursor(self) -> Deferred[Any]:
        self.initial_calls += 1
        return succeed(self.start)

    def poll(self, cursor: Any) -> Deferred[PollResult]:
        self.polled.append(cursor)
        if self.failures:
            return fail(self.failures.pop(0))
        position = int(cursor)
        batch = self.events[position : position + self.page]
        result = PollResult(
            [Message.create("org.example.test.event", {"event": e, "index": position + i},
                            id=f"id-{position + i}")
             for i, e in enumerate(batch)],
            position + len(batch),
            more=position + len(batch) < len(self.events),
            lag=float(len(self.events) - position - len(batch)),
        )
        if self.hold:
            d: Deferred[PollResult] = Deferred(lambda _: self.cancelled.append(cursor))
            self.held.append(d)
            return d
        return succeed(result)

    def close(self) -> None:
        self.closed += 1


@implementer(IPublisher)
class FakePublisher:
    """
    Records what it is given.  In C{auto} mode every hand-over succeeds at
    once; otherwise the Deferreds wait in C{pending}.  C{refuse} maps a
    message id to the exception its hand-over fails with.
    """

    domain = "test"

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.messages: list[Message] = []
        self.pending: list[Deferred[None]] = []
        self.refuse: dict[str, Exception] = {}
        self.refuse_all: Exception | None = None

    def publish(self, message: Message) -> Deferred[None]:
        self.messages.append(message)
        if self.refuse_all is not None:
            return fail(self.refuse_all)
        if message.id in self.refuse:
            return fail(self.refuse[message.id])
        if self.auto:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d

    def fire_all(self) -> None:
        while self.pending:
            self.pending.pop(0).callback(None)

    def bodies(self) -> list[Any]:
        return [m.body["event"] for m in self.messages]


class PollerTestsMixin:
    """
    Builds services over a temporary state directory and a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.state_dir = self.mktemp()  # type: ignore[attr-defined]
        self.randoms: list[float] = []

    def random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 0.5

    def service(self, source: FakeSource, publisher: FakePublisher, **kwargs: Any) -> PollingService:
        kwargs.setdefault("interval", 10.0)
        kwargs.setdefault("backoff", 1.0)
        kwargs.setdefault("max_backoff", 16.0)
        return PollingService(
            "test-poller", source, publisher, self.clock, self.state_dir,
            random=self.random, run_in_thread=run_inline, **kwargs,
        )

    def saved_cursor(self) -> Any:
        with open(os.path.join(self.state_dir, CURSOR_FILE)) as f:
            return json.load(f)["cursor"]


class ServiceTests(PollerTestsMixin, SynchronousTestCase):
    """
    L{PollingService} with a fake source, publisher and clock.
    """

    def test_interface(self) -> None:
        """The fake source used here provides IPollSource."""
        self.assertTrue(verifyObject(IPollSource, FakeSource()))

    def test_first_start_saves_initial_cursor(self) -> None:
        """On first start the source's initial cursor is saved before the first poll."""
        source = FakeSource(["a", "b"], start=1)
        source.hold = True
        service = self.service(source, FakePublisher())
        service.startService()
        self.clock.advance(0)
        self.assertEqual(source.initial_calls, 1)
        self.assertEqual(source.polled, [1])
        self.assertEqual(self.saved_cursor(), 1)
        self.successResultOf(service.stopService())

    def test_publishes_once_in_order(self) -> None:
        """Events are handed over once each, in order, and the cursor follows them."""
        source = FakeSource([f"e{i}" for i in range(7)], page=3)
        publisher = FakePublisher()
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)  # three polls back to back: the source says there is more
        self.assertEqual(publisher.bodies(), [f"e{i}" for i in range(7)])
        self.assertEqual(self.saved_cursor(), 7)
        self.assertEqual(source.polled, [0, 3, 6])
        self.clock.advance(10)
        self.assertEqual(source.polled, [0, 3, 6, 7])
        self.assertEqual(len(publisher.messages), 7)
        self.assertEqual(service.polls, 4)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cursor_survives_restart(self) -> None:
        """A new service on the same state directory continues from the saved cursor."""
        source = FakeSource(["a", "b"])
        publisher = FakePublisher()
        first = self.service(source, publisher)
        first.startService()
        self.clock.advance(0)
        self.successResultOf(first.stopService())
        source.events += ["c"]
        second = self.service(source, publisher)
        second.startService()
        self.clock.advance(0)
        self.assertEqual(source.initial_calls, 1)
        self.assertEqual(publisher.bodies(), ["a", "b", "c"])
        self.assertEqual(second.cursor, 3)
        self.successResultOf(second.stopService())

    def test_crash_between_poll_and_handover(self) -> None:
        """
        A process that dies before its hand-overs complete leaves the cursor
        where it was: the next process publishes the same poll again (same
        message ids) and nothing is skipped.
        """
        source = FakeSource(["a", "b", "c"])
        hung = FakePublisher(auto=False)
        first = self.service(source, hung)
        first.startService()
        self.clock.advance(0)
        self.assertEqual(hung.bodies(), ["a", "b", "c"])
        self.assertEqual(self.saved_cursor(), 0)
        # The process dies here: the first service is simply abandoned.
        source.events += ["d"]
        publisher = FakePublisher()
        second = self.service(source, publisher)
        second.startService()
        self.clock.advance(0)
        self.assertEqual(publisher.bodies(), ["a", "b", "c", "d"])
        self.assertEqual([m.id for m in publisher.messages[:3]], [m.id for m in hung.messages])
        self.assertEqual(self.saved_cursor(), 4)
        self.successResultOf(second.stopService())

    def test_cursor_waits_for_every_handover(self) -> None:
        """The cursor is saved only once the last hand-over of a poll has fired."""
        source = FakeSource(["a", "b"])
        publisher = FakePublisher(auto=False)
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        publisher.pending.pop(1).callback(None)
        self.assertEqual(self.saved_cursor(), 0)
        publisher.fire_all()
        self.assertEqual(self.saved_cursor(), 2)
        self.successResultOf(service.stopService())

    def test_failed_poll_is_contained(self) -> None:
        """A failing poll is logged and counted, and polling goes on after a backoff."""
        source = FakeSource(["a"])
        source.failures = [SourceFailure("boom"), SourceFailure("boom again")]
        publisher = FakePublisher()
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(SourceFailure)), 1)
        self.assertEqual((service.errors, service.consecutive_errors), (1, 1))
        self.assertEqual(publisher.messages, [])
        status = service.status()
        self.assertIn("boom", status["last_error"]["error"])
        self.assertEqual(status["state"], "backing off")
        self.clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(SourceFailure)), 1)
        self.clock.advance(2.0)
        self.assertEqual(publisher.bodies(), ["a"])
        self.assertEqual((service.errors, service.consecutive_errors, service.polls), (2, 0, 1))
        self.successResultOf(service.stopService())

    def info_events(self) -> list[dict[str, Any]]:
        """
        The log events of the rest of the test, at the log level C{info}.
        """
        from fedhub.logs import log_level, set_log_level
        from twisted.logger import LogLevel, globalLogPublisher

        self.addCleanup(set_log_level, log_level())
        set_log_level(LogLevel.info)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_repeated_failure_logged_once(self) -> None:
        """
        The same failure poll after poll is logged when it begins, then at
        debug level only (the status counts them), and a line says when
        polling works again; another failure is logged again.
        """
        from fedhub.errors import FedhubError
        from twisted.logger import LogLevel

        events = self.info_events()
        source = FakeSource(["a"])
        source.failures = [FedhubError("hub down")] * 3 + [FedhubError("hub odd")]
        service = self.service(source, FakePublisher())
        service.startService()
        for _ in range(60):
            self.clock.advance(1)
        about = [(e["log_level"], e.get("error"), e.get("count")) for e in events
                 if e.get("log_format", "").startswith("Poll of {source}")]
        self.assertEqual(about, [
            (LogLevel.error, "FedhubError: hub down", None),
            (LogLevel.error, "FedhubError: hub odd", None),
            (LogLevel.info, None, 4),
        ])
        self.assertEqual(service.errors, 4)
        self.successResultOf(service.stopService())

    def test_flapping_failure_logged_once_in_a_while(self) -> None:
        """
        A service that fails every other poll, each failure followed by a
        success, has that failure and its recovery logged once per
        FLAP_LOG_INTERVAL, not at every poll; a different failure is logged
        at once.
        """
        from fedhub.errors import FedhubError
        from fedhub.producers.poller import FLAP_LOG_INTERVAL
        from twisted.logger import LogLevel

        events = self.info_events()
        source = FakeSource(["a"])
        service = self.service(source, FakePublisher())
        service.startService()
        self.assertEqual(FLAP_LOG_INTERVAL, 600.0)
        # Each round: one failed poll, a success after the backoff, then
        # the interval (10 s): 90 rounds take 16 to 17 minutes.
        for _ in range(90):
            source.failures.append(FedhubError("hub flaps"))
            for _ in range(12):
                self.clock.advance(1)
        self.assertEqual(service.errors, 90)
        self.assertEqual(service.consecutive_errors, 0)
        about = [(e["log_level"], e.get("count")) for e in events
                 if e.get("log_format", "").startswith("Poll of {source}")
                 and e["log_level"] > LogLevel.debug]
        self.assertEqual(about, [(LogLevel.error, None), (LogLevel.info, 1)] * 2)
        source.failures.append(FedhubError("hub odd"))
        self.clock.advance(12)
        about = [e.get("error") for e in events
                 if e.get("log_format", "").startswith("Poll of {source} failed")
                 and e["log_level"] > LogLevel.debug]
        self.assertEqual(about, ["FedhubError: hub flaps"] * 2 + ["FedhubError: hub odd"])
        self.successResultOf(service.stopService())

    def test_outage_soon_after_a_flap_logged(self) -> None:
        """
        A failure like one logged a minute before, that goes on (a second
        failed poll in a row), is logged then, and so is its end: quiet is
        only for single failures between successes.
        """
        from fedhub.errors import FedhubError
        from twisted.logger import LogLevel

        events = self.info_events()
        source = FakeSource(["a"])
        service = self.service(source, FakePublisher())
        service.startService()
        source.failures.append(FedhubError("hub down"))
        for _ in range(60):
            self.clock.advance(1)
        source.failures.extend([FedhubError("hub down")] * 100)
        for _ in range(3600):
            self.clock.advance(1)
        self.assertEqual(service.consecutive_errors, 0)
        about = [(e["log_level"], e.get("count")) for e in events
                 if e.get("log_format", "").startswith("Poll of {source}")
                 and e["log_level"] > LogLevel.debug]
        self.assertEqual(about, [(LogLevel.error, None), (LogLevel.info, 1),
                                 (LogLevel.error, None), (LogLevel.info, 100)])

    def test_retry_after_is_waited_for(self) -> None:
        """
        A failure whose service asked to come back later (Retry-After, here
        on an error raised from it) is polled again no sooner; a shorter
        request leaves the backoff.
        """
        from fedhub.xmlrpc import HTTPStatusError

        def unavailable(seconds: float) -> Exception:
            try:
                raise HTTPStatusError("u", "m", 503, "Busy", retry_after=seconds)
            except HTTPStatusError as e:
                try:
                    raise SourceFailure("the API failed") from e
                except SourceFailure as wrapped:
                    return wrapped

        source = FakeSource(["a"])
        source.failures = [unavailable(120.0), unavailable(0.1)]
        service = self.service(source, FakePublisher())
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(source.polled), 1)
        self.clock.advance(119)
        self.assertEqual(len(source.polled), 1)
        self.clock.advance(1)
        self.assertEqual(len(source.polled), 2)
        # Asked for less than the backoff (1 s doubled to 2, jittered to 1.5).
        self.clock.advance(1.4)
        self.assertEqual(len(source.polled), 2)
        self.clock.advance(0.2)
        self.assertEqual(len(source.polled), 3)
        self.flushLoggedErrors(SourceFailure)
        self.successResultOf(service.stopService())

    def test_backoff_is_exponential_capped_and_jittered(self) -> None:
        """Delays double from the base up to the cap; jitter keeps them in [d/2, d]."""
        source = FakeSource()
        source.failures = [SourceFailure(str(i)) for i in range(8)]
        service = self.service(source, FakePublisher(), backoff=1.0, max_backoff=16.0)
        self.randoms = [1.0] * 7 + [0.0]
        service.startService()
        self.clock.advance(0)
        delays = []
        for _ in range(8):
            delays.append(service.status()["next_poll_in"])
            self.clock.advance(delays[-1])
        self.flushLoggedErrors(SourceFailure)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 8.0])
        self.successResultOf(service.stopService())

    def test_interval_jitter(self) -> None:
        """Successful polls are spaced by the interval within the jitter band."""
        service = self.service(FakeSource(), FakePublisher(), interval=100.0, jitter=0.2)
        self.randoms = [0.0, 1.0]
        service.startService()
        self.clock.advance(0)
        self.assertEqual(service.status()["next_poll_in"], 80.0)
        self.clock.advance(80)
        self.assertEqual(service.status()["next_poll_in"], 120.0)
        self.successResultOf(service.stopService())

    def test_polls_never_overlap(self) -> None:
        """While a poll is outstanding no other starts, however long it takes."""
        source = FakeSource(["a"])
        source.hold = True
        service = self.service(source, FakePublisher())
        service.startService()
        self.clock.advance(0)
        self.clock.advance(1000)
        self.assertEqual(len(source.polled), 1)
        self.assertEqual(service.status()["state"], "fetching")
        source.hold = False
        source.held[0].callback(PollResult([], 0))
        self.assertEqual(len(source.polled), 1)
        self.clock.advance(10)
        self.assertEqual(len(source.polled), 2)
        self.successResultOf(service.stopService())

    def test_temporarily_unavailable_keeps_cursor(self) -> None:
        """When the publisher can not take messages now, the cursor stays and the poll is retried."""
        source = FakeSource(["a", "b"])
        publisher = FakePublisher()
        publisher.refuse_all = TemporarilyUnavailable("outbox full")
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(self.saved_cursor(), 0)
        self.assertEqual(publisher.bodies(), ["a"])  # nothing more after the first refusal
        self.assertEqual(service.errors, 1)
        self.assertIn("TemporarilyUnavailable", service.status()["last_error"]["error"])
        publisher.refuse_all = None
        self.clock.advance(1.0)
        self.assertEqual(publisher.bodies(), ["a", "a", "b"])
        self.assertEqual(self.saved_cursor(), 2)
        self.successResultOf(service.stopService())

    def test_permanent_refusal_is_dropped(self) -> None:
        """A message refused for good is counted as dropped and does not block the cursor."""
        source = FakeSource(["a", "b", "c"])
        publisher = FakePublisher()
        publisher.refuse["id-1"] = PublishError("no route", "id-1")
        publisher.refuse["id-2"] = MessageError("too big")
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(self.saved_cursor(), 3)
        self.assertEqual((service.published, service.dropped, service.errors), (1, 2, 0))
        self.successResultOf(service.stopService())

    def test_unexpected_publish_error_is_temporary(self) -> None:
        """An unexpected exception from the publisher keeps the cursor (it may pass)."""
        source = FakeSource(["a"])
        publisher = FakePublisher()
        publisher.refuse_all = RuntimeError("disk on fire")
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.saved_cursor(), 0)
        self.assertEqual(service.errors, 1)
        self.successResultOf(service.stopService())

    def test_publish_window(self) -> None:
        """At most publish_window hand-overs are outstanding at once, in order."""
        source = FakeSource([str(i) for i in range(10)])
        publisher = FakePublisher(auto=False)
        service = self.service(source, publisher, publish_window=4)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(len(publisher.pending), 4)
        publisher.pending.pop(0).callback(None)
        self.assertEqual(len(publisher.pending), 4)
        self.assertEqual(publisher.bodies(), [str(i) for i in range(5)])
        while publisher.pending:
            publisher.fire_all()
        self.assertEqual(publisher.bodies(), [str(i) for i in range(10)])
        self.assertEqual(self.saved_cursor(), 10)
        self.successResultOf(service.stopService())

    def test_many_synchronous_handovers(self) -> None:
        """Thousands of hand-overs that fire at once do not recurse without bound."""
        source = FakeSource([str(i) for i in range(5000)], page=5000)
        publisher = FakePublisher()
        service = self.service(source, publisher, publish_window=1)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(service.published, 5000)
        self.successResultOf(service.stopService())

    def test_stop_cancels_fetch(self) -> None:
        """Stopping cancels a fetch in progress, closes the source and leaves no timer."""
        source = FakeSource(["a"])
        source.hold = True
        service = self.service(source, FakePublisher())
        service.startService()
        self.clock.advance(0)
        self.successResultOf(service.stopService())
        self.assertEqual(source.cancelled, [0])
        self.assertEqual(service.errors, 0)
        self.assertEqual(source.closed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(service.status()["state"], "stopped")

    def test_stop_waits_for_handover(self) -> None:
        """Stopping waits for hand-overs in progress, then saves the cursor."""
        source = FakeSource(["a"])
        publisher = FakePublisher(auto=False)
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        publisher.fire_all()
        self.successResultOf(stopped)
        self.assertEqual(self.saved_cursor(), 1)

    def test_stop_gives_up_waiting(self) -> None:
        """A hand-over that never completes delays stopping only by stop_timeout."""
        source = FakeSource(["a"])
        publisher = FakePublisher(auto=False)
        service = self.service(source, publisher, stop_timeout=5.0)
        service.startService()
        self.clock.advance(0)
        stopped = service.stopService()
        self.clock.advance(5.0)
        self.successResultOf(stopped)
        self.assertEqual(self.saved_cursor(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart_while_handover_in_flight(self) -> None:
        """A restart while an old poll is still handing over starts no second, overlapping poll."""
        source = FakeSource(["a", "b"], page=1)
        publisher = FakePublisher(auto=False)
        service = self.service(source, publisher, stop_timeout=5.0)
        service.startService()
        self.clock.advance(0)
        stopped = service.stopService()
        self.clock.advance(5.0)
        self.successResultOf(stopped)
        service.startService()
        self.clock.advance(0)
        self.assertEqual(source.polled, [0])
        # The old hand-over lands: polling goes on from its cursor, in one chain.
        publisher.fire_all()
        self.assertEqual(self.saved_cursor(), 1)
        self.clock.advance(0)
        self.assertEqual(source.polled, [0, 1])
        publisher.fire_all()
        self.assertEqual(self.saved_cursor(), 2)
        self.clock.advance(10)
        self.assertEqual(source.polled, [0, 1, 2])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(service.stopService())

    def test_corrupt_cursor_never_restarts_from_now(self) -> None:
        """An unreadable cursor file is an error, retried; the source's initial cursor is not used."""
        os.makedirs(self.state_dir)
        with open(os.path.join(self.state_dir, CURSOR_FILE), "w") as f:
            f.write("{not json")
        source = FakeSource(["a"])
        service = self.service(source, FakePublisher())
        service.startService()
        self.clock.advance(0)
        self.assertEqual((source.initial_calls, source.polled, service.errors), (0, [], 1))
        self.assertIn("CursorError", service.status()["last_error"]["error"])
        self.clock.advance(1.0)
        self.assertEqual(service.errors, 2)
        self.successResultOf(service.stopService())

    def test_foreign_cursor_is_a_cursor_error(self) -> None:
        """
        A cursor file of valid JSON that the source says is not its own is
        reported as the file's CursorError, not as a bug in the source,
        and retried; the source's initial cursor is not used, nothing is
        published and the file is left alone.
        """
        os.makedirs(self.state_dir)
        path = os.path.join(self.state_dir, CURSOR_FILE)
        with open(path, "w") as f:
            f.write('{"version": 1, "cursor": {"since": 1.0}}')
        source = FakeSource(["a"])
        source.failures = [ForeignCursor("is not a fake cursor"), ForeignCursor("still not")]
        publisher = FakePublisher()
        service = self.service(source, publisher)
        service.startService()
        self.clock.advance(0)
        self.assertEqual((source.initial_calls, service.errors), (0, 1))
        error = service.status()["last_error"]["error"]
        self.assertTrue(error.startswith(f"CursorError: cursor file {path}: is not a fake cursor"),
                        error)
        self.assertIn("remove the file to start from now", error)
        self.clock.advance(1.0)
        self.assertEqual((service.errors, publisher.messages), (2, []))
        with open(path) as f:
            self.assertEqual(json.load(f), {"version": 1, "cursor": {"since": 1.0}})
        self.successResultOf(service.stopService())

    def test_require_fields(self) -> None:
        """
        require_fields accepts a cursor with the fields and types asked
        for, and names what is wrong with any other; JSON's booleans are
        no numbers.
        """
        fields = {"event": int, "since": (int, float)}
        require_fields({"event": 3, "since": 2.5, "other": None}, "a test", fields)
        for cursor, reason in [
            ("abc", "holds str, not a test cursor"),
            ([1], "holds list, not a test cursor"),
            ({"since": 1.0}, "is not a test cursor: its 'event' is None"),
            ({"event": "3", "since": 1.0}, "is not a test cursor: its 'event' is '3'"),
            ({"event": True, "since": 1.0}, "is not a test cursor: its 'event' is True"),
            ({"event": 3, "since": False}, "is not a test cursor: its 'since' is False"),
        ]:
            error = self.assertRaises(ForeignCursor, require_fields, cursor, "a test", fields)
            self.assertEqual(error.reason, reason)

    def test_status(self) -> None:
        """status() reports counters, times, lag and the next poll."""
        source = FakeSource(["a", "b", "c"], page=2)
        service = self.service(source, FakePublisher())
        self.clock.advance(1_700_000_000)
        service.startService()
        self.clock.advance(0)
        status = service.status()
        self.assertEqual(status["polls"], 2)
        self.assertEqual(status["published"], 3)
        self.assertEqual(status["errors"], 0)
        self.assertEqual(status["lag"], 0.0)
        self.assertEqual(status["last_success"], "2023-11-14T22:13:20+00:00")
        self.assertIsNone(status["last_error"])
        self.assertEqual(status["next_poll_in"], 10.0)
        self.assertTrue(status["running"])
        self.successResultOf(service.stopService())

    def test_bad_settings(self) -> None:
        """Nonsensical intervals, jitter and windows are refused."""
        for kwargs in ({"interval": 0}, {"jitter": 1.0}, {"publish_window": 0}):
            self.assertRaises(ValueError, self.service, FakeSource(), FakePublisher(), **kwargs)


class HTTPURLTests(SynchronousTestCase):
    """
    The URL check the poller plugins share.
    """

    def test_http_and_https_with_a_host(self) -> None:
        """http:// and https:// URLs with a host pass; other schemes and host-less URLs do not."""
        for good in ("http://127.0.0.1:8080/RPC2", "https://koji.example/kojihub"):
            self.assertIsNone(http_url(good))
        for bad in ("ftp://koji.example/", "koji.example/kojihub", "https://", "http:///RPC2", ""):
            self.assertEqual(http_url(bad), "must be an http:// or https:// URL", bad)


class CursorStoreTests(SynchronousTestCase):
    """
    L{CursorStore}: the cursor file.
    """

    def test_missing(self) -> None:
        """A missing file means no cursor yet."""
        store = CursorStore(os.path.join(self.mktemp(), CURSOR_FILE))
        self.assertEqual(store.load(), (False, None))

    def test_round_trip(self) -> None:
        """A saved cursor loads back; the directory is created; no temporary file stays."""
        directory = os.path.join(self.mktemp(), "a", "b")
        store = CursorStore(os.path.join(directory, CURSOR_FILE))
        store.save({"event": 5, "seen": ["x"]})
        store.save({"event": 6, "seen": []})
        self.assertEqual(store.load(), (True, {"event": 6, "seen": []}))
        self.assertEqual(os.listdir(directory), [CURSOR_FILE])

    def test_wrong_envelope(self) -> None:
        """A JSON file that is not a cursor record is refused with its path."""
        path = os.path.join(self.mktemp(), CURSOR_FILE)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump({"cursor": 1}, f)
        error = self.assertRaises(CursorError, CursorStore(path).load)
        self.assertEqual(error.path, path)

    def test_unserializable(self) -> None:
        """A cursor that is not JSON is refused and the old file is kept."""
        path = os.path.join(self.mktemp(), CURSOR_FILE)
        store = CursorStore(path)
        store.save(1)
        self.assertRaises(CursorError, store.save, {"x": object()})
        self.assertEqual(store.load(), (True, 1))

    def test_unwritable(self) -> None:
        """A directory that can not be created is a CursorError, not an OSError."""
        base = self.mktemp()
        with open(base, "w") as f:
            f.write("a file, not a directory")
        store = CursorStore(os.path.join(base, "sub", CURSOR_FILE))
        self.assertRaises(CursorError, store.save, 1)


"""
Edge cases of the outbox and its spool importer: limits checked when the
store opens, stopping from a hand-over's failure, outcomes arriving after a
stop, starting again while a stop is closing the store, cancelled hand-overs,
and spool files the outbox can never take.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import subprocess
from collections import deque
from random import Random
from unittest import SkipTest

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger, LogEvent, formatEvent
from twisted.python.failure import Failure as TwistedFailure

from fedhub.errors import MessageReturned, TemporarilyUnavailable
from fedhub.message import Message
from fedhub.outbox import Store, StoreError, StoredRow, SynchronousExecutor
from fedhub.outbox.store import encode
from fedhub.outbox.outbox import Outbox
from tests.test_outbox import ManualExecutor, OutboxTestCase, ReportingBus, make_message


def capture_log(outbox: Outbox) -> list[LogEvent]:
    """
    Collect what one outbox logs from now on.
    """
    events: list[LogEvent] = []
    outbox.log = Logger(namespace="fedhub.outbox", observer=events.append)  # type: ignore[misc]
    return events


def texts(events: list[LogEvent]) -> list[str]:
    """
    The log events as an operator reads them.
    """
    return [formatEvent(event) for event in events]


class LimitsAtOpenTests(OutboxTestCase):
    """
    Hand-overs made while the store opens are held to the outbox's limits
    once the store's contents are known.
    """

    def fill(self, count: int) -> int:
        """
        Leave C{count} pending messages in the (closed) store; return the
        stored size of one.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        rows = []
        for n in range(count):
            message = make_message(n)
            rows.append((message.id, 1.0, encode(message)))
        self.successResultOf(store.commit(rows))
        self.successResultOf(store.close())
        return len(rows[0][2])

    def test_max_messages_before_open(self) -> None:
        """A hand-over made before the store opened is refused when the store turns out full."""
        self.fill(3)
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, max_messages=3)
        d = outbox.publish(make_message(100))
        self.assertNoResult(d)
        executor.run_all()
        failure = self.failureResultOf(d, TemporarilyUnavailable)
        self.assertIn("full", failure.value.reason)
        self.assertEqual(outbox.store.pending_count, 3)
        self.assertEqual(outbox.stats().waiting_for_disk, 0)

    def test_max_bytes_before_open(self) -> None:
        """Hand-overs made before the store opened count against the bytes the store holds."""
        size = self.fill(2)
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, max_bytes=size * 3 + 10)
        first = outbox.publish(make_message(100))
        second = outbox.publish(make_message(101))
        executor.run_all()
        self.successResultOf(first)
        self.failureResultOf(second, TemporarilyUnavailable)
        self.assertEqual(outbox.store.pending_count, 3)
        self.assertLessEqual(outbox.store.pending_bytes, size * 3 + 10)
        self.assertEqual(outbox.stats().waiting_for_disk, 0)


class StopFromFailureTests(OutboxTestCase):
    """
    Stopping from the callbacks of a failed transaction.
    """

    def test_stop_from_errback_of_failed_commit(self) -> None:
        """A stop begun from a hand-over's disk-full errback completes."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_all()
        conn = outbox.store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        stopped: list[Deferred[None]] = []

        def refused(failure: TwistedFailure) -> None:
            failure.trap(TemporarilyUnavailable)
            stopped.append(outbox.stopService())

        outbox.publish(Message.create("org.example.t", {"x": "y" * 20000})).addErrback(refused)
        executor.run_all()
        self.assertEqual(len(stopped), 1)
        self.successResultOf(stopped[0])
        self.assertFalse(outbox.store.is_open)


class FailingLoadStore(Store):
    """
    A store whose reads back always fail, as with a damaged page in the
    backlog, while its writes still work.
    """

    loads = 0

    def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
        self.loads += 1
        return fail(StoreError(self.path, "database disk image is malformed"))


class LoadFailureTests(OutboxTestCase):
    """
    A backlog that can not be read back.
    """

    def test_load_retries_back_off_despite_commits(self) -> None:
        """Reading back a damaged backlog is retried with a growing delay, even while hand-overs commit meanwhile."""
        seed = Store(self.directory, SynchronousExecutor())
        self.successResultOf(seed.open())
        message = make_message(0)
        self.successResultOf(seed.commit([(message.id, 1.0, encode(message))]))
        self.successResultOf(seed.close())
        store = FailingLoadStore(self.directory, SynchronousExecutor())
        outbox, bus = self.make(store=store, random=Random(1))
        for n in range(1, 61):
            self.successResultOf(outbox.publish(make_message(n)))
            self.clock.advance(1)
        # Doubling from 0.2 s to 10 s: about a dozen attempts in a minute,
        # besides the first failure's reads of fewer rows at once (2,000
        # halved down to 1: 11 reads, each failing too).
        self.assertLessEqual(store.loads, 20 + 11)
        self.assertEqual(outbox.store.pending_count, 61)
        self.flushLoggedErrors(StoreError)



class LateOutcomeTests(OutboxTestCase):
    """
    Confirms and returns that arrive after a stop gave up waiting for them
    can no longer be recorded: they are not reported as if they were.
    """

    def stopped_with_one_in_flight(self) -> tuple[Outbox, Message, list[tuple[str, str]], list[LogEvent]]:
        """
        An outbox stopped by its timeout while one message waited for its
        confirm, with an observer and its log captured.
        """
        outbox, bus = self.make(window=10, stop_timeout=5)
        self.bus = bus
        events: list[tuple[str, str]] = []
        outbox.add_observer(lambda event, message_id: events.append((event, message_id)))
        message = make_message(1)
        self.successResultOf(outbox.publish(message))
        stopped = outbox.stopService()
        self.clock.advance(5)
        self.successResultOf(stopped)
        return outbox, message, events, capture_log(outbox)

    def test_late_confirm_not_reported(self) -> None:
        """A confirm arriving after the stop completed reaches no observer and is logged as republished at the next start."""
        outbox, message, events, logged = self.stopped_with_one_in_flight()
        self.bus.ack()
        self.assertEqual(events, [])
        self.assertEqual(outbox.stats().confirmed, 0)
        self.assertEqual(self.pending_ids(), [message.id])
        [text] = texts(logged)
        self.assertIn(message.id, text)
        self.assertIn("published again at the next start", text)

    def test_late_return_not_reported(self) -> None:
        """A return arriving after the stop completed is neither reported nor logged as moved to the failed area."""
        outbox, message, events, logged = self.stopped_with_one_in_flight()
        self.bus.fail_next(MessageReturned("NO_ROUTE", message.id, 312))
        self.assertEqual(events, [])
        self.assertEqual(outbox.stats().returned, 0)
        [text] = texts(logged)
        self.assertNotIn("moved to the failed area", text)
        self.assertIn("NO_ROUTE", text)
        self.assertIn("published again at the next start", text)
        self.assertEqual(self.pending_ids(), [message.id])
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        self.addCleanup(lambda: self.successResultOf(store.close()))
        self.assertEqual(store.failed_count, 0)


class ReportingLateOutcomeTests(LateOutcomeTests):
    bus_class = ReportingBus


class StartWhileStoppingTests(OutboxTestCase):
    """
    A start that comes while a stop is still closing the store.
    """

    def test_start_waits_for_close(self) -> None:
        """Starting again while the store closes opens it once the close is done, and the outbox then works."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=10)
        executor.run_all()
        first = make_message(1)
        d = outbox.publish(first)
        executor.run_all()
        self.successResultOf(d)
        stopped = outbox.stopService()
        bus.ack()
        executor.run_one()  # the deletion; the close is queued now
        self.assertNoResult(stopped)
        outbox.startService()
        refused = self.failureResultOf(outbox.publish(make_message(2)), TemporarilyUnavailable)
        self.assertIn("stopping", refused.value.reason)
        executor.run_all()
        self.successResultOf(stopped)
        self.assertTrue(outbox.running)
        self.assertTrue(outbox.store.is_open)
        second = make_message(3)
        d = outbox.publish(second)
        executor.run_all()
        self.successResultOf(d)
        self.assertEqual(bus.published, [first, second])
        bus.ack()
        executor.run_all()
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(outbox.stats().confirmed, 1)

    def test_start_while_waiting_for_confirms(self) -> None:
        """Starting again while a stop waits for confirms lets that stop finish, then reopens; no timer is left over."""
        outbox, bus = self.make(window=10, stop_timeout=5)
        first = make_message(1)
        self.successResultOf(outbox.publish(first))
        stopped = outbox.stopService()
        outbox.startService()
        self.assertNoResult(stopped)
        bus.ack()
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(outbox.store.is_open)
        second = make_message(2)
        self.successResultOf(outbox.publish(second))
        self.assertEqual(bus.published, [first, second])
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)

    def test_start_then_stop_while_closing(self) -> None:
        """A start and another stop while the store closes leave the outbox stopped, and both stops fire."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_all()
        first = outbox.stopService()
        outbox.startService()
        second = outbox.stopService()
        executor.run_all()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertFalse(outbox.running)
        self.assertFalse(outbox.store.is_open)
        self.assertEqual(executor.queue, deque())


class CancelTests(OutboxTestCase):
    """
    Cancelling the Deferred of a hand-over.
    """

    def test_cancel_while_queued(self) -> None:
        """A hand-over cancelled while it waits for the next transaction is never written nor published."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=10)
        executor.run_all()
        a, b, c = make_message(1), make_message(2), make_message(3)
        first = outbox.publish(a)
        second = outbox.publish(b)
        third = outbox.publish(c)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(outbox.stats().waiting_for_disk, 2)
        executor.run_all()
        self.successResultOf(first)
        self.successResultOf(third)
        self.assertEqual(bus.published, [a, c])
        self.assertEqual(outbox.stats().waiting_for_disk, 0)
        self.assertEqual(outbox.store.pending_count, 2)

    def test_cancel_after_transaction_started(self) -> None:
        """A hand-over cancelled once its transaction started fails with CancelledError but is still stored and published."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=10)
        executor.run_all()
        a = make_message(1)
        d = outbox.publish(a)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        executor.run_all()
        self.assertEqual(bus.published, [a])
        self.assertEqual(outbox.stats().accepted, 1)
        self.assertEqual(outbox.stats().waiting_for_disk, 0)

    def test_cancelled_then_transaction_fails(self) -> None:
        """A hand-over cancelled during a transaction that then fails is settled once, with no error logged."""
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_all()
        conn = outbox.store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        d = outbox.publish(Message.create("org.example.t", {"x": "y" * 20000}))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        executor.run_all()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(outbox.stats().waiting_for_disk, 0)
        self.assertEqual(outbox.store.pending_count, 0)
        conn.execute("PRAGMA max_page_count = 1073741823")
        self.clock.advance(60)
        later = outbox.publish(make_message(1))
        executor.run_all()
        self.successResultOf(later)
        self.assertEqual(bus.published, [make_message(1)])


class OwnFullDiskTests(OutboxTestCase):
    """
    An outbox that fills its own disk while the broker is away (on a small
    tmpfs; mounting one needs root, which CI has).
    """

    def mount(self, size: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory], capture_output=True
        )
        if mounted.returncode != 0:
            reason = f"can not mount a tmpfs: {mounted.stderr.decode(errors='replace')}"
            if os.environ.get("CI") == "true":
                self.fail(reason)
            raise SkipTest(reason)
        self.addCleanup(subprocess.run, ["umount", "-l", directory], capture_output=True)
        return directory

    def test_confirms_free_the_disk_the_backlog_filled(self) -> None:
        """
        Hand-overs are refused as the backlog fills the disk; once the broker
        confirms, the deletions are written all the same, the backlog drains
        and hand-overs are taken again.  (SQLite's log needs room to delete
        rows: the outbox keeps some free.)
        """
        directory = self.mount("4m")
        outbox, bus = self.make(directory=os.path.join(directory, "outbox"), window=100)
        bus.connected = False
        taken = 0
        refused: list[str] = []
        while not refused and taken < 20_000:
            d = outbox.publish(Message.create("org.example.t", {"n": taken, "pad": "x" * 1000}))
            failure = self.failureResultOf(d, TemporarilyUnavailable) if d.called and isinstance(
                d.result, TwistedFailure) else None
            if failure is None:
                self.successResultOf(d)
                taken += 1
            else:
                refused.append(failure.value.reason)
        self.assertTrue(refused)
        self.assertIn("full", refused[0])
        self.assertGreater(taken, 100)
        bus.connected = True
        for _ in range(2000):
            self.clock.advance(1)
            bus.ack_all()
            if outbox.store.pending_count == 0:
                break
        self.assertEqual(outbox.store.pending_count, 0, outbox.problem)
        self.assertEqual(len({m.id for m in bus.published}), taken)
        # Past the backoff of the last refusal, hand-overs are taken again.
        self.clock.advance(10)
        self.successResultOf(outbox.publish(Message.create("org.example.t", {"after": True})))
        self.assertIsNone(outbox.problem)
        self.flushLoggedErrors()

"""
Edge cases of the outbox and its spool importer: limits checked when the
store opens, stopping from a hand-over's failure, and spool files the outbox
can never take.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from random import Random

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure as TwistedFailure

from fedhub.errors import TemporarilyUnavailable
from fedhub.message import Message
from fedhub.outbox import Store, StoreError, StoredRow, SynchronousExecutor
from fedhub.outbox.store import encode
from tests.test_outbox import ManualExecutor, OutboxTestCase, make_message


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
        # Doubling from 0.2 s to 10 s: about a dozen attempts in a minute.
        self.assertLessEqual(store.loads, 20)
        self.assertEqual(outbox.store.pending_count, 61)
        self.flushLoggedErrors(StoreError)


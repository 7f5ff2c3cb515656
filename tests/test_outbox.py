"""
Tests for L{fedhub.outbox.outbox.Outbox}: the durable publisher.

The bus is a hand-written fake whose publishes are Deferreds the tests fire;
the store's executor is either synchronous or driven by hand, so group commit
can be watched transaction by transaction.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import log
from twisted.python.failure import Failure as TwistedFailure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.errors import (
    MessageError,
    MessageNacked,
    MessageReturned,
    NotConnected,
    PublishError,
    TemporarilyUnavailable,
)
from fedhub.interfaces import IBus, IDelivery, IPublisher, ISubscription
from fedhub.message import Message
from fedhub.outbox import (
    NACKED,
    REJECTED,
    RETURNED,
    UNREADABLE,
    CommitResult,
    FailedRecord,
    Outbox,
    Store,
    StoreError,
    SynchronousExecutor,
)
from fedhub.outbox.store import StoredRow, encode


@implementer(ISubscription)
class FakeSubscription:
    """
    A subscription that delivers nothing.
    """

    def __init__(self, queue: str) -> None:
        self.queue = queue

    def cancel(self) -> Deferred[None]:
        return succeed(None)


@implementer(IBus)
class FakeBus:
    """
    A bus whose every publish is a Deferred the test fires by hand, like a
    broker connection whose confirms arrive when the test says so.

    @ivar published: Every message published, resends included, in order.
    @ivar outstanding: The publishes not yet confirmed or failed, oldest first.
    @ivar refuse: When set, every publish fails at once with it.
    @ivar auto_ack: Confirm every publish at once.
    """

    def __init__(self, domain: str = "test") -> None:
        self.domain = domain
        self.exchange = "amq.topic"
        self.connected = True
        self.published: list[Message] = []
        self.outstanding: deque[tuple[Message, Deferred[None]]] = deque()
        self.refuse: Exception | None = None
        self.auto_ack = False
        self.declared: list[object] = []

    def declare(self, topology: object) -> Deferred[None]:
        self.declared.append(topology)
        return succeed(None)

    def publish(
        self, message: Message, exchange: str | None = None, routing_key: str | None = None
    ) -> Deferred[None]:
        if not self.connected:
            return fail(NotConnected("no connection", message.id))
        self.published.append(message)
        if self.refuse is not None:
            return fail(self.refuse)
        if self.auto_ack:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.outstanding.append((message, d))
        return d

    def subscribe(
        self, queue: str, on_delivery: Callable[[IDelivery], object], prefetch: int
    ) -> Deferred[ISubscription]:
        return succeed(FakeSubscription(queue))

    def ack(self, count: int = 1) -> list[Message]:
        """
        Confirm the C{count} oldest outstanding publishes.
        """
        done = []
        for _ in range(count):
            message, d = self.outstanding.popleft()
            done.append(message)
            d.callback(None)
        return done

    def ack_all(self) -> list[Message]:
        """
        Confirm every outstanding publish.
        """
        return self.ack(len(self.outstanding))

    def fail_next(self, error: Exception) -> Message:
        """
        Fail the oldest outstanding publish with C{error}.
        """
        message, d = self.outstanding.popleft()
        d.errback(error)
        return message

    def drop(self) -> None:
        """
        Lose the connection: every outstanding publish fails with NotConnected.
        """
        self.connected = False
        while self.outstanding:
            message, d = self.outstanding.popleft()
            d.errback(NotConnected("connection lost", message.id))


class BatchingBus(FakeBus):
    """
    A fake bus that, like L{fedhub.amqp.transport.AMQPBus}, settles a
    confirm covering many messages in one go and then calls back.
    """

    def __init__(self, domain: str = "test") -> None:
        super().__init__(domain)
        self.confirming = False
        self.after: list[Callable[[], object]] = []

    def call_after_confirms(self, callback: Callable[[], object]) -> None:
        self.after.append(callback)

    def ack(self, count: int = 1) -> list[Message]:
        """
        Confirm the C{count} oldest outstanding publishes with one confirm.
        """
        self.confirming = True
        try:
            done = super().ack(count)
        finally:
            self.confirming = False
        for callback in self.after:
            # As AMQPBus does: a failing callback is logged, the others run.
            try:
                callback()
            except Exception:
                log.err(None, "a callback after confirms failed")
        return done


class ReportingBus(BatchingBus):
    """
    A batching bus that, like L{fedhub.amqp.transport.AMQPBus}, also has
    C{publish_to}: the outbox then has each publish's outcome reported to
    its entry rather than to a Deferred.
    """

    def __init__(self, domain: str = "test") -> None:
        super().__init__(domain)
        self.reported = 0

    def publish_to(self, message: Message, outcome: Any) -> None:
        def report(failure: TwistedFailure) -> None:
            outcome.errback(failure.value)

        self.reported += 1
        self.publish(message).addCallbacks(outcome.callback, report)


class ManualExecutor:
    """
    An executor that runs the store's calls only when the test says so, in
    the test's thread.
    """

    def __init__(self) -> None:
        self.queue: deque[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = deque()
        self.started = 0
        self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.stopped >= self.started:
            # As ThreadExecutor: nothing runs once its thread is gone.
            return fail(StoreError("manual", "the store's thread is not running"))
        d: Deferred[Any] = Deferred()
        self.queue.append((fn, args, d))
        return d

    def run_one(self) -> None:
        fn, args, d = self.queue.popleft()
        try:
            result = fn(*args)
        except BaseException:
            d.errback(TwistedFailure())
        else:
            d.callback(result)

    def run_all(self) -> int:
        """
        Run calls until none is queued (including those queued meanwhile).
        """
        count = 0
        while self.queue:
            self.run_one()
            count += 1
        return count


def make_message(n: int) -> Message:
    return Message.create(
        f"org.example.dev.test.n{n % 7}",
        {"n": n},
        id=f"00000000-0000-4000-8000-{n:012d}",
        sent_at=datetime(2026, 11, 28, 6, 0, n % 60, tzinfo=timezone.utc),
    )


def page_layout(store: Store) -> tuple[int, int]:
    """
    How many pages the open C{store}'s database has now, and their size:
    the next page it takes is the first past them.
    """
    conn = store._db.conn
    assert conn is not None
    pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
    page_size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return pages, page_size


def zero_page(path: str, index: int, page_size: int) -> None:
    """
    Overwrite page C{index} (counted from 0) of the database file at
    C{path} with zeros, as a bad disk would damage it.
    """
    with open(path, "r+b") as f:
        f.seek(index * page_size)
        f.write(bytes(page_size))


class OutboxTestCase(SynchronousTestCase):
    """
    Builds outboxes on temporary directories with a fake bus and a clock, and
    checks after each test that no timer is left behind.
    """

    #: The bus L{make} gives an outbox unless told.
    bus_class: type[FakeBus] = FakeBus

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = os.path.join(self.mktemp(), "outbox", "test")

    def make(
        self,
        bus: FakeBus | None = None,
        executor: Any = None,
        *,
        start: bool = True,
        directory: str | None = None,
        **options: Any,
    ) -> tuple[Outbox, FakeBus]:
        bus = bus or self.bus_class()
        options.setdefault("retry_initial", 0.2)
        options.setdefault("retry_max", 10.0)
        outbox = Outbox(
            "test",
            directory or self.directory,
            bus,
            self.clock,
            executor=executor or SynchronousExecutor(),
            **options,
        )
        if start:
            outbox.startService()
        self.addCleanup(self.stop, outbox, executor)
        return outbox, bus

    def stop(self, outbox: Outbox, executor: Any) -> None:
        if outbox.running:
            d = outbox.stopService()
            for _ in range(3):
                if isinstance(executor, ManualExecutor):
                    executor.run_all()
                self.clock.advance(3600)
            self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def publish_all(self, outbox: Outbox, messages: list[Message]) -> list[Deferred[None]]:
        return [outbox.publish(m) for m in messages]

    def pending_ids(self, directory: str | None = None) -> list[str]:
        """
        The ids of the pending messages in a (closed) outbox directory.
        """
        store = Store(directory or self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        try:
            return [row.message().id for row in self.successResultOf(store.load(0, 1_000_000))]
        finally:
            self.successResultOf(store.close())


class InterfaceTests(OutboxTestCase):
    """
    The outbox and the fake bus provide their interfaces.
    """

    def test_interfaces(self) -> None:
        """
        The outbox is an IPublisher for its domain; the fake bus an IBus.
        """
        outbox, bus = self.make()
        self.assertTrue(verifyObject(IPublisher, outbox))
        self.assertTrue(verifyObject(IBus, bus))
        self.assertEqual(outbox.domain, "test")

    def test_no_io_before_start(self) -> None:
        """
        Building an outbox creates nothing on disk.
        """
        self.make(start=False)
        self.assertFalse(os.path.exists(self.directory))


class HandOverTests(OutboxTestCase):
    """
    Handing messages over.
    """

    def test_fires_after_commit(self) -> None:
        """
        A hand-over fires only once its transaction is committed.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=10)
        executor.run_all()  # open
        d = outbox.publish(make_message(1))
        self.assertNoResult(d)
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(bus.published, [])
        executor.run_one()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(outbox.store.pending_count, 1)
        self.assertEqual(bus.published, [make_message(1)])

    def test_group_commit(self) -> None:
        """
        Hand-overs arriving while a transaction runs share the next one.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=1000)
        executor.run_all()
        commits: list[CommitResult] = []
        outbox.store.commit_hook = commits.append
        messages = [make_message(n) for n in range(200)]
        handovers = self.publish_all(outbox, messages[:1])
        handovers += self.publish_all(outbox, messages[1:])
        self.assertEqual(len(executor.queue), 1)
        executor.run_all()
        self.assertEqual([c.inserted for c in commits], [1, 199])
        for d in handovers:
            self.successResultOf(d)
        self.assertEqual(bus.published, messages)

    def test_group_commit_chained(self) -> None:
        """
        Hand-overs made from the callbacks of committed ones share the next transaction.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=1000)
        commits: list[CommitResult] = []
        outbox.store.commit_hook = commits.append
        follow_ups: list[Deferred[None]] = []
        # Handed over while the store opens: they go in the first transaction.

        def follow_up(result: None, n: int) -> None:
            follow_ups.append(outbox.publish(make_message(10 + n)))

        for n in range(3):
            outbox.publish(make_message(n)).addCallback(follow_up, n)
        executor.run_all()
        self.assertEqual([c.inserted for c in commits], [3, 3])
        for d in follow_ups:
            self.successResultOf(d)

    def test_large_batch_bounded(self) -> None:
        """
        A transaction larger than memory may hold leaves its newest messages on disk, and order holds.
        """
        bus = FakeBus()
        bus.connected = False
        executor = ManualExecutor()
        outbox, _ = self.make(bus, executor=executor, window=2, read_batch=4, max_waiting=10)
        executor.run_all()
        messages = [make_message(n) for n in range(10)]
        self.publish_all(outbox, messages)
        executor.run_all()
        self.assertLessEqual(outbox.held(), 2 + 4 + 10)
        more = [make_message(n) for n in range(10, 20)]
        self.publish_all(outbox, more)
        self.assertLessEqual(outbox.held(), 2 + 4 + 10)
        executor.run_all()
        self.assertLessEqual(outbox.held(), 2 + 4 + 10)
        bus.connected = True
        self.clock.advance(10)
        while bus.outstanding or executor.queue:
            executor.run_all()
            self.assertLessEqual(outbox.held(), 2 + 4 + 10)
            if bus.outstanding:
                bus.ack()
        self.assertEqual(bus.published, messages + more)

    def test_deletes_batched(self) -> None:
        """
        Confirms that arrive while a transaction runs are deleted together in the next one.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=1000)
        executor.run_all()
        self.publish_all(outbox, [make_message(n) for n in range(100)])
        executor.run_all()
        commits: list[CommitResult] = []
        outbox.store.commit_hook = commits.append
        bus.ack(1)
        bus.ack_all()
        executor.run_all()
        self.assertEqual([c.deleted for c in commits], [1, 99])
        self.assertEqual(outbox.store.pending_count, 0)

    def test_deletes_of_one_confirm_together(self) -> None:
        """
        On a bus that settles a confirm covering many messages in one go,
        their deletions go into one transaction and the window refills once,
        after all of them, in order.
        """
        executor = ManualExecutor()
        bus = BatchingBus()
        outbox, _ = self.make(bus, executor=executor, window=10)
        executor.run_all()
        messages = [make_message(n) for n in range(30)]
        self.publish_all(outbox, messages)
        executor.run_all()
        self.assertEqual(bus.published, messages[:10])
        commits: list[CommitResult] = []
        outbox.store.commit_hook = commits.append
        sent_during: list[int] = []
        bus.after.insert(0, lambda: sent_during.append(len(bus.published)))
        bus.ack(6)
        # Nothing was sent while the confirm settled its messages.
        self.assertEqual(sent_during, [10])
        self.assertEqual(bus.published, messages[:16])
        executor.run_all()
        self.assertEqual([c.deleted for c in commits], [6])
        while bus.outstanding:
            bus.ack_all()
            executor.run_all()
        self.assertEqual(bus.published, messages)
        self.assertEqual([c.deleted for c in commits], [6, 10, 10, 4])
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(outbox.stats().confirmed, 30)

    def test_confirm_batches_while_stopping(self) -> None:
        """
        A stop waiting for confirms ends once the last confirm covering many
        messages has settled them.
        """
        bus = BatchingBus()
        outbox, _ = self.make(bus, window=10)
        self.publish_all(outbox, [make_message(n) for n in range(5)])
        d = outbox.stopService()
        self.assertNoResult(d)
        bus.ack(5)
        self.successResultOf(d)
        self.assertEqual(self.pending_ids(), [])

    def test_invalid_message(self) -> None:
        """
        A message that can not be stored fails with MessageError; so does a non-message.
        """
        outbox, bus = self.make()
        bad = Message.create("org.example.t", {}, headers={"x": {1, 2}})
        self.failureResultOf(outbox.publish(bad), MessageError)
        self.failureResultOf(outbox.publish("hello"), MessageError)  # type: ignore[arg-type]
        # Properties AMQP can not carry are refused at the hand-over, not at the broker.
        long_id = Message.create("org.example.t", {}, id="i" * 256)
        self.assertIn("255", str(self.failureResultOf(outbox.publish(long_id), MessageError).value))
        huge = Message.create("org.example.t", {}, headers={"n": 2**64})
        self.assertIn(huge.id, str(self.failureResultOf(outbox.publish(huge), MessageError).value))
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(bus.published, [])

    def test_not_running(self) -> None:
        """
        Before start and after stop, hand-overs fail with TemporarilyUnavailable.
        """
        outbox, bus = self.make(start=False)
        failure = self.failureResultOf(outbox.publish(make_message(1)), TemporarilyUnavailable)
        self.assertIn("not running", failure.value.reason)
        outbox.startService()
        self.successResultOf(outbox.stopService())
        self.failureResultOf(outbox.publish(make_message(2)), TemporarilyUnavailable)

    def test_before_open(self) -> None:
        """
        Hand-overs made while the store opens are written once it is open.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        d = outbox.publish(make_message(1))
        self.assertNoResult(d)
        executor.run_all()
        self.successResultOf(d)
        self.assertEqual(bus.published, [make_message(1)])


class WindowTests(OutboxTestCase):
    """
    Publishing through the bus.
    """

    def test_window(self) -> None:
        """
        At most the window is unconfirmed at once; each confirm lets the next one go, in order.
        """
        outbox, bus = self.make(window=3)
        messages = [make_message(n) for n in range(10)]
        self.publish_all(outbox, messages)
        self.assertEqual(bus.published, messages[:3])
        self.assertEqual(outbox.stats().in_flight, 3)
        bus.ack()
        self.assertEqual(bus.published, messages[:4])
        bus.ack(2)
        self.assertEqual(bus.published, messages[:6])
        while bus.outstanding:
            self.assertLessEqual(len(bus.outstanding), 3)
            bus.ack()
        self.assertEqual(bus.published, messages)
        stats = outbox.stats()
        self.assertEqual((stats.accepted, stats.published, stats.confirmed, stats.depth), (10, 10, 10, 0))

    def test_delete_after_confirm(self) -> None:
        """
        A message stays on disk until its confirm arrives.
        """
        outbox, bus = self.make(window=10)
        self.publish_all(outbox, [make_message(1), make_message(2)])
        self.assertEqual(outbox.store.pending_count, 2)
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 1)
        self.assertEqual(outbox.stats().depth, 1)
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)

    def test_observer(self) -> None:
        """
        Observers hear of confirms, returns and nacks; one that raises is logged and does not stop the others.
        """
        outbox, bus = self.make(window=10)
        events: list[tuple[str, str]] = []

        def broken(event: str, message_id: str) -> None:
            raise RuntimeError("observer bug")

        outbox.add_observer(broken)
        outbox.add_observer(lambda event, message_id: events.append((event, message_id)))
        a, b, c = make_message(1), make_message(2), make_message(3)
        self.publish_all(outbox, [a, b, c])
        bus.ack()
        bus.fail_next(MessageReturned("NO_ROUTE", b.id))
        bus.fail_next(MessageNacked("refused", c.id))
        self.assertEqual(events, [("confirmed", a.id), (RETURNED, b.id), (NACKED, c.id)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        outbox.remove_observer(broken)

    def test_bug_in_outcome_logged(self) -> None:
        """
        An error inside the outbox while it handles a confirm is logged as a bug, and later confirms are handled.
        """
        outbox, bus = self.make(window=10)
        a, b = make_message(1), make_message(2)
        self.publish_all(outbox, [a, b])
        calls: list[str] = []

        def broken() -> None:
            calls.append("flush")
            raise RuntimeError("outbox bug")

        flush = outbox._flush
        self.patch(outbox, "_flush", broken)
        bus.ack()
        self.assertEqual(calls, ["flush"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.patch(outbox, "_flush", flush)
        bus.ack()
        self.assertEqual(outbox.stats().confirmed, 2)
        self.assertEqual(outbox.store.pending_count, 0)

    def test_stats_oldest_age(self) -> None:
        """
        The oldest age is the time since the oldest unconfirmed message was handed over.
        """
        outbox, bus = self.make(window=1)
        self.assertIsNone(outbox.stats().oldest_age)
        outbox.publish(make_message(1))
        self.clock.advance(5)
        outbox.publish(make_message(2))
        self.clock.advance(2)
        self.assertEqual(outbox.stats().oldest_age, 7.0)
        bus.ack()
        self.assertEqual(outbox.stats().oldest_age, 2.0)
        bus.ack()
        self.assertIsNone(outbox.stats().oldest_age)


class FailedAreaTests(OutboxTestCase):
    """
    Messages the broker returns or refuses.
    """

    def check_moved(self, error: Exception, kind: str, counter: str) -> FailedRecord:
        outbox, bus = self.make(window=10)
        a, b = make_message(1), make_message(2)
        self.publish_all(outbox, [a, b])
        bus.fail_next(error)
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(outbox.store.failed_count, 1)
        [record] = self.successResultOf(outbox.failed())
        self.assertEqual((record.message_id, record.kind, record.attempts), (a.id, kind, 1))
        self.assertEqual(record.message(), a)
        self.assertEqual(record.failed_at, self.clock.seconds())
        stats = outbox.stats()
        self.assertEqual(getattr(stats, counter), 1)
        self.assertEqual(stats.confirmed, 1)
        self.assertFalse(stats.paused)
        # Never retried by itself.
        self.clock.advance(3600)
        self.assertEqual(bus.published, [a, b])
        self.assertEqual(outbox.store.failed_count, 1)
        return record

    def test_returned(self) -> None:
        """
        A returned message goes to the failed area with the reason, counted, and is not sent again.
        """
        record = self.check_moved(MessageReturned("NO_ROUTE", None, 312), RETURNED, "returned")
        self.assertIn("NO_ROUTE", record.reason)
        self.assertIn("312", record.reason)

    def test_nacked(self) -> None:
        """
        A nacked message goes to the failed area, counted, and is not sent again.
        """
        self.check_moved(MessageNacked("refused by the broker"), NACKED, "nacked")

    def test_rejected(self) -> None:
        """
        A message the bus refuses as invalid goes to the failed area instead of blocking the queue.
        """
        self.check_moved(MessageError("header can not be encoded"), REJECTED, "rejected")

    def test_retry_and_drop(self) -> None:
        """
        Failed messages can be listed, queued again at the end, and dropped.
        """
        outbox, bus = self.make(window=10)
        messages = [make_message(n) for n in range(4)]
        self.publish_all(outbox, messages)
        bus.fail_next(MessageReturned("NO_ROUTE"))
        bus.fail_next(MessageReturned("NO_ROUTE"))
        bus.ack_all()
        records = self.successResultOf(outbox.failed())
        self.assertEqual([r.message_id for r in records], [messages[0].id, messages[1].id])
        later = make_message(9)
        outbox.publish(later)
        self.assertEqual(self.successResultOf(outbox.retry_failed([records[0].seq])), 1)
        self.assertEqual(bus.published[-2:], [later, messages[0]])
        bus.ack_all()
        self.assertEqual(self.successResultOf(outbox.drop_failed()), 1)
        self.assertEqual(self.successResultOf(outbox.failed()), [])
        self.assertEqual(outbox.store.failed_count, 0)
        self.assertEqual(outbox.store.pending_count, 0)

    def test_retry_failing_half_way_publishes_what_moved(self) -> None:
        """
        A retry whose second batch fails still publishes the messages its
        first batch moved back to pending, and fails with how many moved.
        """

        class OneByOne(Store):
            def retry_failed(
                self, seqs: Iterable[int] | None = None, now: float = 0.0, *, batch: int = 1
            ) -> Deferred[int]:
                return super().retry_failed(seqs, now, batch=1)

        store = OneByOne(self.directory, SynchronousExecutor())
        outbox, bus = self.make(store=store, window=10)
        messages = [make_message(n) for n in range(3)]
        self.publish_all(outbox, messages)
        for _ in messages:
            bus.fail_next(MessageReturned("NO_ROUTE"))
        bus.ack_all()
        self.assertEqual(store.failed_count, 3)
        batches = [0]
        failed_batch = store._db.failed_batch

        def second_fails(*args: Any) -> tuple[int, int, int, int]:
            batches[0] += 1
            if batches[0] == 2:
                raise StoreError(store.path, "disk I/O error")
            return failed_batch(*args)

        store._db.failed_batch = second_fails  # type: ignore[method-assign]
        error = self.failureResultOf(outbox.retry_failed(), StoreError).value
        self.assertIn("after 1 of the messages were moved back to pending", error.reason)
        self.assertEqual(bus.published[-1], messages[0])
        self.assertEqual(len(bus.published), 4)
        bus.ack_all()
        self.assertEqual(store.failed_count, 2)
        self.assertEqual(store.pending_count, 0)

    def test_handover_between_retry_batches(self) -> None:
        """
        A message handed over while a retry moves the failed area back a
        batch at a time does not hide the batches moved before it: every
        retried message is read back and published, none is left pending.
        """

        class OneByOne(Store):
            def retry_failed(
                self, seqs: Iterable[int] | None = None, now: float = 0.0, *, batch: int = 1
            ) -> Deferred[int]:
                return super().retry_failed(seqs, now, batch=1)

        executor = ManualExecutor()
        store = OneByOne(self.directory, executor)
        outbox, bus = self.make(executor=executor, store=store, window=10)
        executor.run_all()
        messages = [make_message(n) for n in range(3)]
        self.publish_all(outbox, messages)
        executor.run_all()
        for _ in messages:
            bus.fail_next(MessageReturned("NO_ROUTE"))
        bus.ack_all()
        executor.run_all()
        self.assertEqual(store.failed_count, 3)
        del bus.published[:]
        retried = outbox.retry_failed()
        executor.run_one()
        self.assertEqual(store.pending_count, 1)
        # Handed over while the second batch runs, committed before the
        # third.
        late = make_message(3)
        handed = outbox.publish(late)
        executor.run_one()
        self.assertEqual(store.pending_count, 2)
        executor.run_one()
        self.successResultOf(handed)
        executor.run_all()
        self.assertEqual(self.successResultOf(retried), 3)
        while bus.outstanding:
            bus.ack_all()
            executor.run_all()
        self.assertEqual(sorted(m.id for m in bus.published), sorted(m.id for m in messages + [late]))
        self.assertEqual(store.pending_count, 0)
        self.assertEqual(store.failed_count, 0)

    def test_not_open(self) -> None:
        """
        The failed area can not be used before the store is open.
        """
        outbox, bus = self.make(start=False)
        self.failureResultOf(outbox.failed(), TemporarilyUnavailable)
        self.failureResultOf(outbox.retry_failed(), TemporarilyUnavailable)
        self.failureResultOf(outbox.drop_failed(), TemporarilyUnavailable)


class BackoffTests(OutboxTestCase):
    """
    What happens when the bus can not take messages.
    """

    def test_connection_loss_resends_in_order(self) -> None:
        """
        Messages in flight at a connection loss are sent again, in order, with their ids.
        """
        outbox, bus = self.make(window=3)
        messages = [make_message(n) for n in range(5)]
        self.publish_all(outbox, messages)
        bus.ack()
        bus.drop()
        self.assertTrue(outbox.stats().paused)
        self.assertEqual(outbox.store.pending_count, 4)
        bus.connected = True
        self.clock.advance(10)
        # One probe first, then the window opens.
        self.assertEqual(bus.published[4:], [messages[1]])
        bus.ack()
        while bus.outstanding:
            bus.ack()
        self.assertEqual(bus.published[:4], messages[:4])
        self.assertEqual(bus.published[4:], messages[1:])
        self.assertEqual([m.id for m in bus.published[4:]], [m.id for m in messages[1:]])
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertFalse(outbox.stats().paused)

    def test_failure_reported_after_the_pause_resent(self) -> None:
        """
        A message sent before a pause whose transient failure is reported
        only after the pause is over is sent again at once, not left until
        some later hand-over or confirm happens to send.
        """
        outbox, bus = self.make(window=10)
        first, second = make_message(1), make_message(2)
        self.publish_all(outbox, [first, second])
        (_, sent_first), (_, sent_second) = list(bus.outstanding)
        bus.outstanding.clear()
        sent_first.errback(NotConnected("the connection was lost", first.id))
        self.assertTrue(outbox.stats().paused)
        self.clock.advance(1)
        self.assertEqual([m.id for m, _ in bus.outstanding], [first.id])
        bus.ack()
        self.assertFalse(outbox.stats().paused)
        sent_second.errback(NotConnected("the connection was lost", second.id))
        self.assertEqual([m.id for m, _ in bus.outstanding], [second.id])
        self.assertFalse(outbox.stats().paused)
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)

    def test_no_hot_loop(self) -> None:
        """
        A bus that fails every publish is tried with growing delays, one message at a time.
        """
        outbox, bus = self.make(window=50, retry_initial=0.1, retry_max=10.0)
        bus.refuse = NotConnected("flapping")
        messages = [make_message(n) for n in range(20)]
        self.publish_all(outbox, messages)
        self.assertEqual(len(bus.published), 1)
        for _ in range(1200):
            self.clock.advance(0.05)
        attempts = len(bus.published)
        # 60 s: doublings from 0.1 s to the 10 s cap, jittered: far fewer than one per tick.
        self.assertGreater(attempts, 5)
        self.assertLess(attempts, 30)
        self.assertEqual({m.id for m in bus.published}, {messages[0].id})
        self.assertEqual(outbox.store.pending_count, 20)
        # The bus recovers: everything goes, in order.
        bus.refuse = None
        self.clock.advance(10)
        bus.ack()
        bus.ack_all()
        self.assertEqual(bus.published[attempts:], messages)
        self.assertEqual(outbox.store.pending_count, 0)

    def held_while_disconnected(self, bus: FakeBus) -> tuple[Outbox, list[Message]]:
        """
        An outbox on C{bus}, not connected, that took three messages and,
        a minute later, has published none.
        """
        bus.connected = False
        outbox, _ = self.make(bus, window=10)
        messages = [make_message(n) for n in range(3)]
        for d in self.publish_all(outbox, messages):
            self.successResultOf(d)
        self.clock.advance(60)
        self.assertEqual(bus.published, [])
        return outbox, messages

    def test_disconnected_bus_not_called(self) -> None:
        """
        While the bus says it is not connected, nothing is published; when it is back, everything is.
        """
        bus = FakeBus()
        outbox, messages = self.held_while_disconnected(bus)
        self.assertTrue(outbox.stats().paused)
        bus.connected = True
        self.clock.advance(10)
        bus.ack()
        self.assertEqual(bus.published, messages)

    def test_resumes_when_the_bus_connects(self) -> None:
        """
        A bus that can say when it connects ends the pause at once, not at
        the end of a backoff delay that grew while the broker was away; one
        wait at a time however many backoffs pass; a bus that stops instead
        leaves the backoff as it was.
        """

        class Announcing(FakeBus):
            def __init__(self) -> None:
                super().__init__()
                self.waiters: list[Deferred[None]] = []

            def when_connected(self) -> Deferred[None]:
                d: Deferred[None] = Deferred()
                self.waiters.append(d)
                return d

            def come_back(self) -> None:
                self.connected = True
                waiters, self.waiters = self.waiters, []
                for d in waiters:
                    d.callback(None)

        bus = Announcing()
        outbox, messages = self.held_while_disconnected(bus)
        self.assertEqual(len(bus.waiters), 1)
        bus.come_back()
        # No clock advance: the probe goes at once, the rest on its confirm.
        self.assertEqual(bus.published, messages[:1])
        bus.ack()
        self.assertEqual(bus.published, messages)
        self.assertFalse(outbox.stats().paused)
        # Lost again, and the bus stops: the wait ends, the backoff goes on.
        bus.drop()
        self.clock.advance(1)
        self.assertEqual(len(bus.waiters), 1)
        bus.waiters.pop().errback(NotConnected("the bus stopped"))
        bus.connected = True
        self.clock.advance(10)
        # The probe first, then the other one on its confirm.
        self.assertEqual(len(bus.ack_all()), 1)
        self.assertEqual(len(bus.ack_all()), 1)
        self.assertEqual(outbox.stats().depth, 0)

    def test_unexpected_error(self) -> None:
        """
        A bus that raises something unexpected is logged and retried later like a lost connection.
        """
        outbox, bus = self.make(window=10)
        bus.refuse = ZeroDivisionError("bug in the bus")
        outbox.publish(make_message(1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(outbox.stats().paused)
        self.assertEqual(outbox.store.pending_count, 1)
        bus.refuse = None
        self.clock.advance(10)
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)

    def test_late_failure_of_old_connection(self) -> None:
        """
        A failure from before a pause puts its message back without pausing the resumed sending.
        """
        outbox, bus = self.make(window=3)
        messages = [make_message(n) for n in range(3)]
        self.publish_all(outbox, messages)
        # The first fails; the others are still outstanding on the old connection.
        bus.fail_next(NotConnected("lost"))
        self.clock.advance(10)
        self.assertEqual(bus.published[-1], messages[0])
        bus.fail_next(NotConnected("lost"))  # message 1, from the old connection
        bus.fail_next(NotConnected("lost"))  # message 2, likewise
        self.assertFalse(outbox.stats().paused)
        bus.ack()  # the probe
        bus.ack_all()
        self.assertEqual(bus.published[3:], messages)
        self.assertEqual(outbox.store.pending_count, 0)


class LimitTests(OutboxTestCase):
    """
    Limits on what the outbox takes.
    """

    def test_max_messages(self) -> None:
        """
        Past max_messages hand-overs fail temporarily; after draining they are taken again.
        """
        bus = FakeBus()
        bus.connected = False
        outbox, _ = self.make(bus, max_messages=3, window=10)
        messages = [make_message(n) for n in range(3)]
        for d in self.publish_all(outbox, messages):
            self.successResultOf(d)
        failure = self.failureResultOf(outbox.publish(make_message(3)), TemporarilyUnavailable)
        self.assertIn("full", failure.value.reason)
        self.assertIn("3 messages", failure.value.reason)
        self.assertEqual(outbox.store.pending_count, 3)
        bus.connected = True
        self.clock.advance(10)
        bus.ack()
        bus.ack_all()
        self.assertEqual(bus.published, messages)
        self.successResultOf(outbox.publish(make_message(4)))

    def test_max_bytes(self) -> None:
        """
        Past max_bytes hand-overs fail temporarily; failed messages count too.
        """
        size = len(encode(make_message(1)))
        outbox, bus = self.make(max_bytes=size * 2 + 10, window=10)
        self.successResultOf(outbox.publish(make_message(1)))
        self.successResultOf(outbox.publish(make_message(2)))
        failure = self.failureResultOf(outbox.publish(make_message(3)), TemporarilyUnavailable)
        self.assertIn("bytes", failure.value.reason)
        bus.fail_next(MessageReturned("NO_ROUTE"))
        bus.ack()
        # One byte budget is still taken by the failed message.
        self.successResultOf(outbox.publish(make_message(3)))
        self.failureResultOf(outbox.publish(make_message(4)), TemporarilyUnavailable)
        self.successResultOf(outbox.drop_failed())
        self.successResultOf(outbox.publish(make_message(4)))

    def test_too_large(self) -> None:
        """
        A message larger than the whole outbox fails for good, not temporarily.
        """
        outbox, bus = self.make(max_bytes=100)
        failure = self.failureResultOf(outbox.publish(make_message(1)), PublishError)
        self.assertNotIsInstance(failure.value, TemporarilyUnavailable)

    def test_max_waiting(self) -> None:
        """
        Too many hand-overs waiting for the disk fail temporarily.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, max_waiting=2)
        executor.run_all()
        a = outbox.publish(make_message(1))
        b = outbox.publish(make_message(2))
        failure = self.failureResultOf(outbox.publish(make_message(3)), TemporarilyUnavailable)
        self.assertIn("wait for the disk", failure.value.reason)
        executor.run_all()
        self.successResultOf(a)
        self.successResultOf(b)
        self.assertEqual(outbox.stats().waiting_for_disk, 0)

    def test_disk_full(self) -> None:
        """
        A full disk fails hand-overs temporarily, loses nothing taken, and taking resumes once confirms free space.
        """
        outbox, bus = self.make(window=1000)
        conn = outbox.store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 6}")
        accepted = []
        failure = None
        for n in range(1000):
            d = outbox.publish(make_message(n))
            if d.called and isinstance(d.result, TwistedFailure):
                failure = self.failureResultOf(d, TemporarilyUnavailable)
                break
            self.successResultOf(d)
            accepted.append(n)
        assert failure is not None
        self.assertIn("disk", failure.value.reason)
        self.assertIn("full", failure.value.reason)
        self.assertGreater(len(accepted), 5)
        # While the disk is full, hand-overs fail at once.
        self.failureResultOf(outbox.publish(make_message(5000)), TemporarilyUnavailable)
        # Nothing taken is lost: everything is published and confirmed.
        self.assertEqual([m.body["n"] for m in bus.published], accepted)
        self.assertEqual(outbox.store.pending_count, len(accepted))
        bus.ack_all()
        self.clock.advance(10)
        self.assertEqual(outbox.store.pending_count, 0)
        self.successResultOf(outbox.publish(make_message(6000)))
        self.assertEqual(bus.published[-1].body["n"], 6000)

    def test_fsync_failure(self) -> None:
        """
        A commit whose fsync fails (SQLite's "disk I/O error" at COMMIT)
        acknowledges none of its hand-overs: they fail temporarily, nothing
        of them is stored or published, the outbox says why, and the
        deletions of confirmed messages in it are written by a later
        transaction once the disk works again.
        """
        outbox, bus = self.make()
        db = outbox.store._db
        real = db.conn
        assert real is not None
        failing = [False]

        class FailingCommits:
            # The connection, whose COMMIT fails while asked to, leaving
            # the transaction open as SQLite does.
            def execute(self, sql: str, *args: Any) -> Any:
                if failing[0] and sql == "COMMIT":
                    raise sqlite3.OperationalError("disk I/O error")
                return real.execute(sql, *args)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        db.conn = FailingCommits()  # type: ignore[assignment]
        self.successResultOf(outbox.publish(make_message(1)))
        failing[0] = True
        bus.ack_all()
        refused = [outbox.publish(make_message(n)) for n in (2, 3)]
        for d in refused:
            reason = self.failureResultOf(d, TemporarilyUnavailable).value.reason
            self.assertIn("can not write", reason)
            self.assertIn("disk I/O error", reason)
        self.assertEqual(outbox.problem, reason)
        self.assertEqual([m.body["n"] for m in bus.published], [1])
        stats = outbox.stats()
        self.assertEqual((stats.accepted, stats.depth), (1, 1))
        self.assertFalse(real.in_transaction)
        self.assertEqual([r.seq for r in self.successResultOf(outbox.store.load(0, 10))], [1])
        self.clock.advance(10)
        self.assertEqual(outbox.store.pending_count, 1)
        failing[0] = False
        self.clock.advance(10)
        self.assertIsNone(outbox.problem)
        self.assertEqual(outbox.store.pending_count, 0)
        self.assertEqual(self.successResultOf(outbox.store.load(0, 10)), [])
        self.successResultOf(outbox.publish(make_message(4)))
        self.assertEqual([m.body["n"] for m in bus.published], [1, 4])
        self.flushLoggedErrors()

    def test_retry_from_errback_refused(self) -> None:
        """
        A producer that hands over again from the errback of a disk-full failure is refused without a new transaction.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_all()
        conn = outbox.store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        again: list[Deferred[None]] = []
        big = Message.create("org.example.t", {"x": "y" * 20000})
        first = outbox.publish(big)
        first.addErrback(lambda f: again.append(outbox.publish(big)))
        executor.run_all()
        self.assertEqual(len(again), 1)
        failure = self.failureResultOf(again[0], TemporarilyUnavailable)
        self.assertIn("full", failure.value.reason)
        self.assertEqual(len(executor.queue), 0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_store_locked_then_free(self) -> None:
        """
        An outbox whose store is held elsewhere refuses hand-overs, and opens once it is free.
        """
        holder = Store(self.directory, SynchronousExecutor())
        self.successResultOf(holder.open())
        store = Store(self.directory, SynchronousExecutor(), lock_timeout=0.01)
        outbox, bus = self.make(store=store)
        failure = self.failureResultOf(outbox.publish(make_message(1)), TemporarilyUnavailable)
        self.assertIn("in use", failure.value.reason)
        self.successResultOf(holder.close())
        self.clock.advance(10)
        self.successResultOf(outbox.publish(make_message(1)))


class RecoveryTests(OutboxTestCase):
    """
    Starting again after a crash or a stop.
    """

    def abandon(self, outbox: Outbox) -> None:
        """
        Simulate the death of the process: no stopService; the database
        connection goes away as the kernel would close it.
        """
        conn = outbox.store._db.conn
        assert conn is not None
        conn.close()
        outbox.store._db.conn = None
        outbox.running = False
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def test_crash_republishes(self) -> None:
        """
        After a crash every unconfirmed message is published again, in order, with its id and sent-at.
        """
        first, bus = self.make(window=4)
        messages = [make_message(n) for n in range(10)]
        self.publish_all(first, messages)
        bus.ack(3)
        self.abandon(first)
        second, bus2 = self.make(FakeBus(), window=100)
        self.assertEqual(bus2.published, messages[3:])
        self.assertEqual([m.sent_at for m in bus2.published], [m.sent_at for m in messages[3:]])
        bus2.ack_all()
        self.assertEqual(second.store.pending_count, 0)

    def test_uncommitted_not_accepted(self) -> None:
        """
        A hand-over whose transaction never completed was never acknowledged and is not published after a crash.
        """
        executor = ManualExecutor()
        first, bus = self.make(executor=executor, window=10)
        executor.run_all()
        done = first.publish(make_message(1))
        executor.run_all()
        lost = first.publish(make_message(2))
        self.assertNoResult(lost)
        executor.queue.clear()
        self.successResultOf(done)
        self.abandon(first)
        second, bus2 = self.make(FakeBus(), window=10)
        self.assertEqual(bus2.published, [make_message(1)])
        bus2.ack_all()

    def test_order_with_backlog(self) -> None:
        """
        A backlog larger than memory is read back in batches and published in order.
        """
        bus = FakeBus()
        bus.connected = False
        first, _ = self.make(bus, window=5, read_batch=8, max_waiting=4)
        messages = [make_message(n) for n in range(60)]
        self.publish_all(first, messages)
        self.assertLessEqual(first.held(), 5 + 8 + 4)
        self.abandon(first)
        second, bus2 = self.make(FakeBus(), window=5, read_batch=8)
        while bus2.outstanding:
            self.assertLessEqual(second.held(), 5 + 8)
            bus2.ack()
        self.assertEqual(bus2.published, messages)
        self.assertEqual(second.store.pending_count, 0)

    def test_live_backlog_order(self) -> None:
        """
        Hand-overs while a backlog is on disk are published after it, in order.
        """
        bus = FakeBus()
        bus.connected = False
        outbox, _ = self.make(bus, window=3, read_batch=4)
        messages = [make_message(n) for n in range(30)]
        self.publish_all(outbox, messages[:20])
        bus.connected = True
        self.clock.advance(20)
        bus.ack()
        self.publish_all(outbox, messages[20:25])
        bus.ack(2)
        self.publish_all(outbox, messages[25:])
        while bus.outstanding:
            bus.ack()
        self.assertEqual(bus.published, messages)

    def test_handover_behind_backlog(self) -> None:
        """
        A hand-over committed while older messages wait on disk is published after them, even when memory has room.
        """
        bus = FakeBus()
        bus.connected = False
        outbox, _ = self.make(bus, window=1, read_batch=4)
        messages = [make_message(n) for n in range(11)]
        self.publish_all(outbox, messages[:10])
        bus.connected = True
        self.clock.advance(10)
        self.assertEqual(bus.published, messages[:1])
        outbox.publish(messages[10])
        while bus.outstanding:
            bus.ack()
        self.assertEqual(bus.published, messages)
        self.assertEqual(outbox.store.pending_count, 0)

    def test_oldest_age_after_restart(self) -> None:
        """
        Right after a restart the oldest age comes from the store, before anything is read back.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        message = make_message(1)
        self.successResultOf(store.commit([(message.id, 100.0, encode(message))]))
        self.successResultOf(store.close())
        self.clock.advance(130)
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_one()
        self.assertEqual(outbox.stats().depth, 1)
        self.assertEqual(outbox.stats().oldest_age, 30.0)
        executor.run_all()
        self.assertEqual(bus.published, [message])
        self.assertEqual(outbox.stats().oldest_age, 30.0)
        bus.ack()
        executor.run_all()
        self.assertIsNone(outbox.stats().oldest_age)

    def test_oldest_age_while_backlog_unreadable(self) -> None:
        """
        Messages left on disk that can not be read back still have an
        oldest age (at least that of the last one read): the status must not
        lose it when the backlog is stuck.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        messages = [make_message(n) for n in range(10)]
        self.successResultOf(store.commit([(m.id, 0.0, encode(m)) for m in messages]))
        self.successResultOf(store.close())
        self.clock.advance(1000)
        loads = []

        class FailingLoads(Store):
            # The first read works; the next ones fail (a bad sector, say).
            def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
                loads.append(after_seq)
                if len(loads) > 1:
                    return fail(StoreError(self.path, "disk I/O error"))
                return super().load(after_seq, limit)

        outbox, bus = self.make(store=FailingLoads(self.directory, SynchronousExecutor()),
                                window=2, read_batch=2)
        self.assertEqual(outbox.stats().oldest_age, 1000.0)
        while bus.outstanding:
            bus.ack()
        stats = outbox.stats()
        self.assertEqual((stats.depth, stats.in_flight), (8, 0))
        self.assertEqual(stats.oldest_age, 1000.0)
        self.assertGreater(len(loads), 1)
        self.flushLoggedErrors(StoreError)

    def test_backlog_unreadable_is_a_problem(self) -> None:
        """
        A backlog that can not be read back (a damaged page) is the
        outbox's problem, for C{/ready}, even while hand-overs are still
        written; logged once as an error, then quietly while it lasts; the
        problem is over once a read works again.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        messages = [make_message(n) for n in range(6)]
        self.successResultOf(store.commit([(m.id, 0.0, encode(m)) for m in messages]))
        self.successResultOf(store.close())
        damaged = [True]

        class DamagedPage(Store):
            # Reads past the second message hit a damaged page.
            def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
                if damaged[0] and after_seq >= 2:
                    return fail(StoreError(self.path, "database disk image is malformed"))
                return super().load(after_seq, limit)

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        outbox, bus = self.make(store=DamagedPage(self.directory, SynchronousExecutor()),
                                window=2, read_batch=2)
        self.assertEqual([m.id for m in bus.published], [m.id for m in messages[:2]])
        path = os.path.join(self.directory, "outbox.sqlite3")
        expected = (
            f"the outbox of domain test can not read {path}: database disk image is malformed; "
            "the messages after sequence number 2 are not published"
        )
        self.assertEqual(outbox.problem, expected)
        # Hand-overs are still written; the problem stays.
        self.successResultOf(outbox.publish(make_message(10)))
        self.assertEqual(outbox.problem, expected)
        for _ in range(3):
            self.clock.advance(10)
        self.assertEqual(outbox.problem, expected)
        levels = [e["log_level"].name for e in events if e.get("reason") == expected]
        self.assertEqual(levels[0], "error")
        self.assertGreater(len(levels), 2)
        self.assertEqual(set(levels[1:]), {"info"})
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(bus.published), 2)
        damaged[0] = False
        self.clock.advance(10)
        self.assertIsNone(outbox.problem)
        while bus.outstanding:
            bus.ack()
        self.assertEqual(
            [m.id for m in bus.published], [m.id for m in messages] + [make_message(10).id]
        )

    def test_damaged_row_holds_back_only_what_follows(self) -> None:
        """
        A damaged row in the middle of a read-back batch fails every read
        that includes it; the outbox reads fewer rows at once until it has
        published every message before that row, and reports the problem
        from there.  Once a read works again, all rows are read whole again.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        before = [make_message(n) for n in range(5)]
        self.successResultOf(store.commit([(m.id, 0.0, encode(m)) for m in before]))
        pages, page_size = page_layout(store)
        big = Message.create("org.example.big", {"text": "x" * 20000})
        after = [make_message(n) for n in range(5, 8)]
        self.successResultOf(store.commit([(m.id, 0.0, encode(m)) for m in [big, *after]]))
        self.successResultOf(store.close())
        # The first page the big message (number 6) took starts its overflow
        # chain: zeroed, every read of that row fails.
        zero_page(os.path.join(self.directory, "outbox.sqlite3"), pages, page_size)
        loads: list[int] = []

        class Counting(Store):
            def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
                loads.append(limit)
                return super().load(after_seq, limit)

        outbox, bus = self.make(store=Counting(self.directory, SynchronousExecutor()),
                                window=100, read_batch=64)
        while bus.outstanding:
            bus.ack()
        self.assertEqual([m.id for m in bus.published], [m.id for m in before])
        self.assertIn("the messages after sequence number 5 are not published", outbox.problem or "")
        # Halved until a read worked, then narrowed down to the damaged row:
        # a few dozen reads, not one per row.
        self.assertEqual(loads[:4], [64, 32, 16, 8])
        self.assertLess(len(loads), 20)
        self.assertEqual(loads[-1], 1)
        self.flushLoggedErrors(StoreError)

    def test_read_size_grows_back(self) -> None:
        """
        After reads were narrowed by a failure, each full read doubles the
        size again, up to C{read_batch}.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        messages = [make_message(n) for n in range(40)]
        self.successResultOf(store.commit([(m.id, 0.0, encode(m)) for m in messages]))
        self.successResultOf(store.close())
        loads: list[int] = []
        failing = [1]

        class OnceFailing(Store):
            def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
                loads.append(limit)
                if failing[0]:
                    failing[0] -= 1
                    return fail(StoreError(self.path, "disk I/O error"))
                return super().load(after_seq, limit)

        outbox, bus = self.make(store=OnceFailing(self.directory, SynchronousExecutor()),
                                window=1, read_batch=8)
        for _ in range(40):
            bus.ack()
        self.assertEqual([m.id for m in bus.published], [m.id for m in messages])
        # Halved once, then back to as many as the batch has room for.
        self.assertEqual(loads[:2], [8, 4])
        self.assertGreater(max(loads[2:]), 4)
        self.assertEqual(outbox._load_cap, 8)
        self.assertIsNone(outbox.problem)

    def test_unreadable_row(self) -> None:
        """
        A stored row that does not decode goes to the failed area and the rest is published.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        good = make_message(1)
        self.successResultOf(store.commit([("bad", 1.0, b'{"topic": 5}\n'), (good.id, 1.0, encode(good))]))
        self.successResultOf(store.close())
        outbox, bus = self.make()
        self.assertEqual(bus.published, [good])
        [record] = self.successResultOf(outbox.failed())
        self.assertEqual((record.message_id, record.kind), ("bad", UNREADABLE))
        bus.ack_all()

    def test_memory_bound(self) -> None:
        """
        With 100,000 messages on disk the outbox holds at most the window plus a read batch, reading in order.
        """
        template = make_message(0)
        data = encode(template)
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        ids = [f"{n:036d}" for n in range(100_000)]
        old = template.id.encode()
        self.successResultOf(store.commit([(i, 1.0, data.replace(old, i.encode())) for i in ids]))
        self.successResultOf(store.close())
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=500, read_batch=1000)
        held = []
        seen: list[str] = []
        # Draining all of it only repeats these rounds; a few read batches show the bound.
        while len(seen) < 5000:
            executor.run_all()
            held.append(outbox.held())
            seen.extend(m.id for m in bus.ack_all())
        executor.run_all()
        self.assertEqual(seen, ids[: len(seen)])
        self.assertLessEqual(max(held), 500 + 1000)
        self.assertGreaterEqual(max(held), 500)
        self.assertEqual(outbox.store.pending_count, 100_000 - len(seen))

    def committed_held(self, outbox: Outbox) -> int:
        """
        The committed messages an outbox holds in memory.
        """
        return outbox.held() - outbox.stats().waiting_for_disk

    def test_memory_bound_during_outage(self) -> None:
        """
        Hand-overs piling up while the bus is away stay on disk: memory keeps one read batch of them, whatever max_waiting allows.
        """
        bus = FakeBus()
        bus.connected = False
        executor = ManualExecutor()
        outbox, _ = self.make(bus, executor=executor, window=100, read_batch=200, max_waiting=1000)
        executor.run_all()
        messages = [make_message(n) for n in range(10_000)]
        held_at_pause = None
        for start in range(0, len(messages), 1000):
            handovers = self.publish_all(outbox, messages[start : start + 1000])
            self.assertLessEqual(self.committed_held(outbox), 200)
            self.assertLessEqual(outbox.held(), 200 + 1000)
            executor.run_all()
            for d in handovers:
                self.successResultOf(d)
            self.assertEqual(outbox.stats().waiting_for_disk, 0)
            self.assertLessEqual(outbox.held(), 200)
            self.assertTrue(outbox.stats().paused)
            # Once paused, nothing more is kept in memory nor read back.
            if held_at_pause is None:
                held_at_pause = outbox.held()
            self.assertEqual(outbox.held(), held_at_pause)
        self.assertEqual(outbox.store.pending_count, 10_000)
        bus.connected = True
        self.clock.advance(10)
        while bus.outstanding or executor.queue:
            executor.run_all()
            self.assertLessEqual(outbox.held(), 100 + 200)
            bus.ack_all()
        self.assertEqual(bus.published, messages)
        self.assertEqual(outbox.store.pending_count, 0)

    def test_memory_bound_live(self) -> None:
        """
        A group commit larger than a read batch keeps one batch in memory and reads the rest back, in order.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor, window=10, read_batch=50, max_waiting=5000)
        executor.run_all()
        messages = [make_message(n) for n in range(3000)]
        handovers = self.publish_all(outbox, messages)
        # The first hand-over started a transaction of its own; the rest wait.
        executor.run_all()
        for d in handovers:
            self.successResultOf(d)
        self.assertLessEqual(self.committed_held(outbox), 10 + 50)
        while bus.outstanding or executor.queue:
            self.assertLessEqual(outbox.held(), 10 + 50)
            bus.ack_all()
            executor.run_all()
        self.assertEqual(bus.published, messages)
        self.assertEqual(outbox.store.pending_count, 0)


class StopTests(OutboxTestCase):
    """
    Stopping the service.
    """

    def test_waits_for_commit(self) -> None:
        """
        Stopping waits until every hand-over taken is on disk, then closes the store.
        """
        executor = ManualExecutor()
        outbox, bus = self.make(executor=executor)
        executor.run_all()
        d = outbox.publish(make_message(1))
        stopped = outbox.stopService()
        self.assertNoResult(stopped)
        self.failureResultOf(outbox.publish(make_message(2)), TemporarilyUnavailable)
        executor.run_all()
        self.successResultOf(d)
        self.successResultOf(stopped)
        self.assertFalse(outbox.store.is_open)
        self.assertEqual(executor.stopped, 1)
        self.assertEqual(self.pending_ids(), [make_message(1).id])

    def test_waits_for_confirms(self) -> None:
        """
        Stopping waits for confirms in flight and records them before closing.
        """
        outbox, bus = self.make(window=10)
        self.publish_all(outbox, [make_message(1), make_message(2)])
        stopped = outbox.stopService()
        self.assertNoResult(stopped)
        bus.ack()
        self.assertNoResult(stopped)
        bus.ack()
        self.successResultOf(stopped)
        self.assertEqual(self.pending_ids(), [])

    def test_confirm_timeout(self) -> None:
        """
        Confirms that do not arrive within the stop timeout leave their messages pending for the next start.
        """
        outbox, bus = self.make(window=10, stop_timeout=5)
        self.publish_all(outbox, [make_message(1), make_message(2)])
        bus.ack()
        stopped = outbox.stopService()
        self.clock.advance(4)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(self.pending_ids(), [make_message(2).id])
        # A late confirm after closing is ignored.
        bus.ack()

    def test_no_sending_while_stopping(self) -> None:
        """
        Nothing new is published once stopping has begun.
        """
        outbox, bus = self.make(window=1)
        self.publish_all(outbox, [make_message(1), make_message(2)])
        stopped = outbox.stopService()
        bus.ack()
        self.successResultOf(stopped)
        self.assertEqual(bus.published, [make_message(1)])
        self.assertEqual(self.pending_ids(), [make_message(2).id])

    def test_restart(self) -> None:
        """
        A stopped outbox can be started again and publishes what it kept.
        """
        outbox, bus = self.make(window=1)
        self.publish_all(outbox, [make_message(1), make_message(2)])
        stopped = outbox.stopService()
        bus.ack()
        self.successResultOf(stopped)
        outbox.startService()
        self.assertEqual(bus.published, [make_message(1), make_message(2)])
        bus.ack()
        self.assertEqual(outbox.store.pending_count, 0)

    def test_stop_paused(self) -> None:
        """
        Stopping while paused cancels the retry timer and keeps the messages.
        """
        bus = FakeBus()
        bus.connected = False
        outbox, _ = self.make(bus, window=1)
        self.publish_all(outbox, [make_message(1)])
        self.assertTrue(self.clock.getDelayedCalls())
        self.successResultOf(outbox.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pending_ids(), [make_message(1).id])


# --- the same, with a bus that reports outcomes through publish_to ---------------


class ReportingHandOverTests(HandOverTests):
    bus_class = ReportingBus


class ReportingWindowTests(WindowTests):
    bus_class = ReportingBus

    def test_outcomes_reported_to_entries(self) -> None:
        """
        With a bus that has C{publish_to}, the outbox publishes through it
        alone.
        """
        outbox, bus = self.make(window=10)
        self.publish_all(outbox, [make_message(n) for n in range(5)])
        bus.ack_all()
        assert isinstance(bus, ReportingBus)
        self.assertEqual(bus.reported, 5)
        self.assertEqual(outbox.stats().confirmed, 5)
        self.assertEqual(outbox.store.pending_count, 0)


class ReportingFailedAreaTests(FailedAreaTests):
    bus_class = ReportingBus


class ReportingBackoffTests(BackoffTests):
    bus_class = ReportingBus


class ReportingStopTests(StopTests):
    bus_class = ReportingBus

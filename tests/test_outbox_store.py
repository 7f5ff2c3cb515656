"""
Tests for L{fedhub.outbox.store}: the SQLite store behind the outbox.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timezone
from typing import Any, cast

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.errors import DecodeError, MessageError
from fedhub.message import Message, from_amqp
from fedhub.outbox.store import (
    CHECKPOINT_PAGES,
    DATABASE_NAME,
    FAILED_BATCH,
    NACKED,
    RETURNED,
    CommitResult,
    Failure,
    Store,
    StoreError,
    SynchronousExecutor,
    ThreadExecutor,
    _is_disk_full,
    decode,
    encode,
)
from tests.test_outbox import ManualExecutor, page_layout, zero_page


def make_message(n: int) -> Message:
    """
    A distinct message with a fixed sent-at time and an extra header.
    """
    return Message.create(
        "org.example.dev.test.event",
        {"n": n, "text": "h\u00e9llo", "list": [1, 2, {"x": None}]},
        headers={"fedora_messaging_user_jdoe": True},
        sent_at=datetime(2026, 11, 28, 6, 0, 0, tzinfo=timezone.utc),
    )


def row(message: Message, created: float = 100.0) -> tuple[str, float, bytes]:
    """
    An insert tuple for L{Store.commit}.
    """
    return (message.id, created, encode(message))


class StoreTestsMixin:
    """
    Helpers for tests on a store with a synchronous executor.
    """

    def open_store(self, directory: str | None = None) -> Store:
        case: SynchronousTestCase = self  # type: ignore[assignment]
        if directory is None:
            directory = os.path.join(case.mktemp(), "outbox", "test")
        store = Store(directory, SynchronousExecutor(), lock_timeout=0.05)
        case.successResultOf(store.open())
        case.addCleanup(store.close)
        return store


class EncodingTests(SynchronousTestCase):
    """
    The stored form of a message.
    """

    def test_round_trip(self) -> None:
        """
        A stored message decodes to an equal message, id, sent-at and headers included.
        """
        message = make_message(1)
        decoded = decode(encode(message))
        self.assertEqual(decoded, message)
        self.assertEqual(decoded.id, message.id)
        self.assertEqual(decoded.sent_at, message.sent_at)
        self.assertEqual(decoded.headers, {"fedora_messaging_user_jdoe": True})

    def test_round_trip_without_sent_at(self) -> None:
        """
        A message without a sent-at time stays without one.
        """
        message = Message("org.example.t", {"a": 1}, sent_at=None)
        self.assertIsNone(decode(encode(message)).sent_at)

    def test_round_trip_raw_body(self) -> None:
        """
        A received message whose body bytes are laid out oddly (spaces, newlines, a BOM) is stored faithfully.
        """
        for raw in (b'  {"a": [1, 2]}', b'{\n  "a": "x\\ny"\n}\n', b'\xef\xbb\xbf{"a": 1}'):
            message = from_amqp("org.example.t", {"message_id": "m1", "headers": {"x": 1}}, raw)
            self.assertEqual(decode(encode(message)), message)

    def test_unstorable_header(self) -> None:
        """
        A header value that has no serialized form is a MessageError.
        """
        message = Message.create("org.example.t", {}, headers={"x": object()})
        self.assertRaises(MessageError, encode, message)
        message = Message.create("org.example.t", {}, headers={"x": "\udc80"})
        self.assertRaises(MessageError, encode, message)

    def test_garbage(self) -> None:
        """
        Bytes that are not a stored message raise DecodeError.
        """
        self.assertRaises(DecodeError, decode, b"{not json")
        self.assertRaises(DecodeError, decode, b"")


class StoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    L{Store} with a synchronous executor.
    """

    def test_empty_file_refused(self) -> None:
        """
        An empty store file (truncated: the store never leaves one) is
        refused, naming it, instead of being taken for a new store, which
        would drop the messages of its log; the file and its log are left
        as they are.
        """
        directory = self.mktemp()
        store = self.open_store(directory)
        self.successResultOf(store.commit([row(make_message(1))]))
        path = os.path.join(directory, DATABASE_NAME)
        wal = path + "-wal"
        self.successResultOf(store.close())
        with open(path, "wb"):
            pass
        with open(wal, "wb") as f:
            f.write(b"log frames")
        again = Store(directory, SynchronousExecutor())
        error = self.failureResultOf(again.open(), StoreError).value
        self.assertEqual(error.path, path)
        self.assertIn("the file is empty: it was truncated or damaged", error.reason)
        self.assertEqual((os.path.getsize(path), os.path.getsize(wal)), (0, 10))

    def crashed_copy(self) -> tuple[str, list[Message]]:
        """
        A copy of the files of an open store that committed two messages
        and never checkpointed: what a crash leaves, the messages in the
        log alone.  Returns its directory and the messages.
        """
        directory = self.mktemp()
        store = self.open_store(directory)
        messages = [make_message(1), make_message(2)]
        self.successResultOf(store.commit([row(m) for m in messages]))
        copy = self.mktemp()
        os.mkdir(copy)
        for name in (DATABASE_NAME, DATABASE_NAME + "-wal"):
            with open(os.path.join(directory, name), "rb") as source:
                with open(os.path.join(copy, name), "wb") as target:
                    target.write(source.read())
        return copy, messages

    def test_crashed_copy_holds_messages(self) -> None:
        """
        The copy L{crashed_copy} makes opens with its messages: they are
        in its log.
        """
        copy, messages = self.crashed_copy()
        store = self.open_store(copy)
        self.assertEqual(store.pending_count, 2)
        rows = self.successResultOf(store.load(0, 10))
        self.assertEqual([r.message().id for r in rows], [m.id for m in messages])

    def test_missing_file_with_log_refused(self) -> None:
        """
        A store whose file is missing but whose log is there is refused,
        naming both, instead of being made anew over the log and the
        messages in it; the log is left as it is.
        """
        copy, _ = self.crashed_copy()
        path = os.path.join(copy, DATABASE_NAME)
        wal = path + "-wal"
        size = os.path.getsize(wal)
        os.unlink(path)
        error = self.failureResultOf(Store(copy, SynchronousExecutor()).open(), StoreError).value
        self.assertEqual(error.path, path)
        self.assertIn(f"the file is missing but its log {wal} ({size} bytes) is there", error.reason)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.path.getsize(wal), size)

    def test_damaged_page(self) -> None:
        """
        A store with a damaged page opens (counting needs no more than the
        rows' headers), but every read of the row on that page fails with a
        StoreError, which is not a full disk; rows after it are read.
        """
        directory = self.mktemp()
        store = self.open_store(directory)
        small = [make_message(1), make_message(3)]
        big = Message.create("org.example.big", {"text": "x" * 20000})
        self.successResultOf(store.commit([row(small[0])]))
        pages, page_size = page_layout(store)
        self.successResultOf(store.commit([row(big), row(small[1])]))
        self.successResultOf(store.close())
        # The first page the big message took holds the start of its
        # overflow chain: zeroed, the chain ends too soon.
        zero_page(os.path.join(directory, DATABASE_NAME), pages, page_size)
        again = self.open_store(directory)
        self.assertEqual(again.pending_count, 3)
        error = self.failureResultOf(again.load(0, 10), StoreError).value
        self.assertIn("malformed", error.reason)
        self.assertFalse(error.disk_full)
        self.assertEqual([r.seq for r in self.successResultOf(again.load(0, 1))], [1])
        self.assertEqual([r.seq for r in self.successResultOf(again.load(2, 10))], [3])

    def test_missing_file_with_empty_log(self) -> None:
        """
        An empty log without its file holds nothing: the store is made
        anew.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        with open(os.path.join(directory, DATABASE_NAME + "-wal"), "wb"):
            pass
        store = self.open_store(directory)
        self.assertEqual(store.pending_count, 0)
        self.successResultOf(store.commit([row(make_message(1))]))
        self.assertEqual(store.pending_count, 1)

    def test_open_creates(self) -> None:
        """
        Opening creates the directory and an empty WAL-mode database with full sync.
        """
        directory = os.path.join(self.mktemp(), "a", "b")
        store = self.open_store(directory)
        self.assertTrue(os.path.isfile(os.path.join(directory, DATABASE_NAME)))
        self.assertEqual((store.pending_count, store.pending_bytes), (0, 0))
        self.assertEqual((store.failed_count, store.failed_bytes), (0, 0))
        conn = store._db.conn
        assert conn is not None
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        # FULL is 2.
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 2)
        # FAST is 2: deleted rows zeroed in place, whole freed pages not written.
        self.assertEqual(conn.execute("PRAGMA secure_delete").fetchone()[0], 2)
        self.assertEqual(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0], CHECKPOINT_PAGES)

    def test_deleted_rows_leave_the_pages_still_in_use(self) -> None:
        """
        A deleted message's bytes do not stay readable on a page that still
        holds other messages.
        """
        directory = self.mktemp()
        store = self.open_store(directory)
        secret = "secret-\u00e9-marker-0123456789"
        kept = [make_message(n) for n in range(3)]
        gone = Message.create("org.example.test", {"text": secret})
        first = self.successResultOf(store.commit([row(kept[0]), row(gone), row(kept[1]), row(kept[2])]))
        stored = [r for r in self.successResultOf(store.load(0, 10)) if r.seq == first.first_seq + 1]
        self.successResultOf(store.commit([], [(stored[0].seq, len(stored[0].data))]))
        conn = store._db.conn
        assert conn is not None
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.successResultOf(store.close())
        marker = secret.encode("utf-8")
        with open(os.path.join(directory, DATABASE_NAME), "rb") as database:
            self.assertNotIn(marker, database.read())

    def test_commit_orders(self) -> None:
        """
        Inserted rows get consecutive sequence numbers in order and load back in order.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(5)]
        first = self.successResultOf(store.commit([row(m) for m in messages[:2]]))
        second = self.successResultOf(store.commit([row(m) for m in messages[2:]]))
        self.assertEqual((first.inserted, second.inserted), (2, 3))
        self.assertEqual(second.first_seq, first.first_seq + 2)
        rows = self.successResultOf(store.load(0, 100))
        self.assertEqual([r.seq for r in rows], list(range(first.first_seq, first.first_seq + 5)))
        self.assertEqual([r.message() for r in rows], messages)
        self.assertEqual(store.pending_count, 5)
        self.assertEqual(store.pending_bytes, sum(len(encode(m)) for m in messages))

    def test_load_pages(self) -> None:
        """
        Loading honours the after-sequence and the limit.
        """
        store = self.open_store()
        result = self.successResultOf(store.commit([row(make_message(n)) for n in range(10)]))
        page = self.successResultOf(store.load(result.first_seq + 2, 3))
        self.assertEqual([r.seq for r in page], [result.first_seq + i for i in (3, 4, 5)])

    def test_delete(self) -> None:
        """
        Deleting rows lowers the count and the byte size.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(3)]
        result = self.successResultOf(store.commit([row(m) for m in messages]))
        size = len(encode(messages[0]))
        done = self.successResultOf(store.commit([], [(result.first_seq, size)]))
        self.assertEqual(done.deleted, 1)
        self.assertEqual(store.pending_count, 2)
        self.assertEqual(store.pending_bytes, sum(len(encode(m)) for m in messages[1:]))
        self.assertEqual([r.message() for r in self.successResultOf(store.load(0, 10))], messages[1:])

    def test_delete_unknown_recounts(self) -> None:
        """
        Deleting a row that is not there leaves the counters exact.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(2)]
        result = self.successResultOf(store.commit([row(m) for m in messages]))
        self.successResultOf(store.commit([], [(result.first_seq, len(encode(messages[0]))), (9999, 50)]))
        self.assertEqual(store.pending_count, 1)
        self.assertEqual(store.pending_bytes, len(encode(messages[1])))

    def test_insert_delete_one_transaction(self) -> None:
        """
        Inserts, deletes and moves in one commit are one transaction.
        """
        store = self.open_store()
        hook: list[CommitResult] = []
        store.commit_hook = hook.append
        a, b, c = (make_message(n) for n in range(3))
        first = self.successResultOf(store.commit([row(a), row(b)]))
        result = self.successResultOf(
            store.commit(
                [row(c)],
                [(first.first_seq, len(encode(a)))],
                [Failure(first.first_seq + 1, RETURNED, "NO_ROUTE", 5.0)],
            )
        )
        self.assertEqual((result.inserted, result.deleted, result.moved), (1, 1, 1))
        self.assertEqual(store.transactions, 2)
        self.assertEqual(hook, [first, result])
        self.assertEqual(store.pending_count, 1)
        self.assertEqual(store.failed_count, 1)
        self.assertEqual(store.failed_bytes, len(encode(b)))
        self.assertEqual(store.pending_bytes, len(encode(c)))

    def test_large_commit(self) -> None:
        """
        A commit of more rows than one statement takes numbers them consecutively; scattered deletes remove exactly those.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(701)]
        result = self.successResultOf(store.commit([row(m) for m in messages]))
        self.assertEqual(result.inserted, 701)
        rows = self.successResultOf(store.load(0, 1000))
        self.assertEqual([r.seq for r in rows], list(range(result.first_seq, result.first_seq + 701)))
        self.assertEqual([r.message().id for r in rows], [m.id for m in messages])
        size = len(encode(messages[0]))
        gone = [0, 1, 2, 5, 299, 300, 301, 700, 3, 2]
        done = self.successResultOf(store.commit([], [(result.first_seq + i, size) for i in gone]))
        self.assertEqual(done.deleted, 9)
        left = self.successResultOf(store.load(0, 1000))
        self.assertEqual(
            [r.seq - result.first_seq for r in left], [i for i in range(701) if i not in set(gone)]
        )
        self.assertEqual(store.pending_count, 701 - 9)
        self.assertEqual(store.pending_bytes, sum(len(encode(messages[i])) for i in range(701) if i not in gone))

    def test_sync_per_transaction(self) -> None:
        """
        Hand-overs and moves to the failed area are committed with fsync; deleting confirmed messages alone is not.
        """
        store = self.open_store()
        conn = store._db.conn
        assert conn is not None

        def synchronous() -> int:
            value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
            return value

        result = self.successResultOf(store.commit([row(make_message(n)) for n in range(4)]))
        size = len(encode(make_message(0)))
        # FULL is 2, NORMAL 1.
        self.assertEqual(synchronous(), 2)
        self.successResultOf(store.commit([], [(result.first_seq, size)]))
        self.assertEqual(synchronous(), 1)
        self.successResultOf(store.commit([], [], [Failure(result.first_seq + 1, RETURNED, "r", 1.0)]))
        self.assertEqual(synchronous(), 2)
        self.successResultOf(store.commit([], [(result.first_seq + 2, size)]))
        self.assertEqual(synchronous(), 1)
        self.successResultOf(store.commit([row(make_message(9))], [(result.first_seq + 3, size)]))
        self.assertEqual(synchronous(), 2)
        self.assertEqual(self.successResultOf(store.retry_failed()), 1)
        self.assertEqual(synchronous(), 2)
        self.assertEqual(store.pending_count, 2)

    def test_failed_commit_writes_nothing(self) -> None:
        """
        A commit that fails half-way is rolled back entirely and reported as StoreError.
        """
        store = self.open_store()
        good = row(make_message(1))
        bad = ("id", 1.0, object())
        failure = self.failureResultOf(store.commit([good, bad]), StoreError)  # type: ignore[list-item]
        self.assertFalse(failure.value.disk_full)
        self.assertEqual(store.pending_count, 0)
        self.assertEqual(self.successResultOf(store.load(0, 10)), [])
        # The store still works afterwards.
        self.successResultOf(store.commit([good]))
        self.assertEqual(store.pending_count, 1)

    def test_disk_full(self) -> None:
        """
        SQLite's "database or disk is full" is a StoreError with disk_full set, and nothing of it is written.
        """
        store = self.open_store()
        conn = store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        big = [row(make_message(n)) for n in range(100)]
        failure = self.failureResultOf(store.commit(big), StoreError)
        self.assertTrue(failure.value.disk_full)
        self.assertEqual(store.pending_count, 0)
        self.assertEqual(self.successResultOf(store.load(0, 1000)), [])

    def test_disk_full_classification(self) -> None:
        """
        SQLITE_FULL and ENOSPC count as a full disk; other errors do not.
        """
        self.assertTrue(_is_disk_full(sqlite3.OperationalError("database or disk is full")))
        self.assertTrue(_is_disk_full(OSError(errno.ENOSPC, "No space left on device")))
        self.assertFalse(_is_disk_full(sqlite3.OperationalError("disk I/O error")))
        self.assertFalse(_is_disk_full(OSError(errno.EACCES, "Permission denied")))

    def test_move_to_failed(self) -> None:
        """
        A failure moves the row to the failed area with kind, reason, time and attempts.
        """
        store = self.open_store()
        message = make_message(7)
        result = self.successResultOf(store.commit([row(message, created=10.0)]))
        self.successResultOf(store.commit([], [], [Failure(result.first_seq, NACKED, "refused", 20.0)]))
        self.assertEqual(self.successResultOf(store.load(0, 10)), [])
        [record] = self.successResultOf(store.failed())
        self.assertEqual(
            (record.seq, record.message_id, record.created, record.failed_at, record.kind, record.reason),
            (result.first_seq, message.id, 10.0, 20.0, NACKED, "refused"),
        )
        self.assertEqual(record.attempts, 1)
        self.assertEqual(record.message(), message)

    def test_move_unknown_ignored(self) -> None:
        """
        Moving a row that is not pending changes nothing.
        """
        store = self.open_store()
        result = self.successResultOf(store.commit([], [], [Failure(42, NACKED, "x", 1.0)]))
        self.assertEqual(result.moved, 0)
        self.assertEqual(store.failed_count, 0)
        self.assertEqual(self.successResultOf(store.failed()), [])

    def test_failed_pages(self) -> None:
        """
        The failed area lists in sequence order, a page at a time.
        """
        store = self.open_store()
        result = self.successResultOf(store.commit([row(make_message(n)) for n in range(5)]))
        seqs = [result.first_seq + i for i in range(5)]
        self.successResultOf(store.commit([], [], [Failure(s, RETURNED, "r", 1.0) for s in reversed(seqs)]))
        page = self.successResultOf(store.failed(limit=2))
        self.assertEqual([r.seq for r in page], seqs[:2])
        page = self.successResultOf(store.failed(after_seq=page[-1].seq, limit=10))
        self.assertEqual([r.seq for r in page], seqs[2:])

    def test_failed_page_bounded(self) -> None:
        """
        failed_page reads at most C{limit} records and C{max_bytes} bytes of
        their data (but always one), and tells where the next page starts:
        nowhere after the last.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(5)]
        result = self.successResultOf(store.commit([row(m) for m in messages]))
        seqs = [result.first_seq + i for i in range(5)]
        self.successResultOf(store.commit([], [], [Failure(s, RETURNED, "r", 1.0) for s in seqs]))
        size = len(self.successResultOf(store.failed(limit=1))[0].data)
        # By count.
        page = self.successResultOf(store.failed_page(0, 2, 10**9))
        self.assertEqual(([r.seq for r in page.records], page.next_after), (seqs[:2], seqs[1]))
        page = self.successResultOf(store.failed_page(seqs[1], 3, 10**9))
        self.assertEqual(([r.seq for r in page.records], page.next_after), (seqs[2:], None))
        self.assertEqual([r.message() for r in page.records], messages[2:])
        # By bytes: two records and a bit are not room for three.
        page = self.successResultOf(store.failed_page(0, 10, 2 * size + size // 2))
        self.assertEqual(([r.seq for r in page.records], page.next_after), (seqs[:2], seqs[1]))
        # A record larger than the budget comes alone.
        page = self.successResultOf(store.failed_page(seqs[0], 10, 1))
        self.assertEqual(([r.seq for r in page.records], page.next_after), ([seqs[1]], seqs[1]))
        page = self.successResultOf(store.failed_page(seqs[3], 10, 1))
        self.assertEqual(([r.seq for r in page.records], page.next_after), ([seqs[4]], None))
        # Nothing after the last.
        page = self.successResultOf(store.failed_page(seqs[4], 10, 10**9))
        self.assertEqual((page.records, page.next_after), ([], None))

    def test_retry_moves_to_end(self) -> None:
        """
        Retrying puts failed messages after every pending one, in their order, keeping attempts.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(4)]
        result = self.successResultOf(store.commit([row(m) for m in messages]))
        first = result.first_seq
        self.successResultOf(
            store.commit([], [], [Failure(first, RETURNED, "r", 1.0), Failure(first + 1, NACKED, "n", 1.0)])
        )
        later = make_message(9)
        self.successResultOf(store.commit([row(later)]))
        self.assertEqual(self.successResultOf(store.retry_failed(now=50.0)), 2)
        rows = self.successResultOf(store.load(0, 10))
        self.assertEqual([r.message() for r in rows], [messages[2], messages[3], later, messages[0], messages[1]])
        self.assertEqual([r.created for r in rows[-2:]], [50.0, 50.0])
        self.assertEqual((store.failed_count, store.failed_bytes), (0, 0))
        self.assertEqual(store.pending_count, 5)
        self.assertEqual(store.pending_bytes, sum(len(encode(m)) for m in messages + [later]))
        # Failing again counts a second attempt.
        self.successResultOf(store.commit([], [], [Failure(rows[-1].seq, NACKED, "again", 60.0)]))
        [record] = self.successResultOf(store.failed())
        self.assertEqual((record.message_id, record.attempts), (messages[1].id, 2))

    def test_retry_some(self) -> None:
        """
        Retrying named records moves only those; unknown names are ignored.
        """
        store = self.open_store()
        result = self.successResultOf(store.commit([row(make_message(n)) for n in range(3)]))
        seqs = [result.first_seq + i for i in range(3)]
        self.successResultOf(store.commit([], [], [Failure(s, RETURNED, "r", 1.0) for s in seqs]))
        self.assertEqual(self.successResultOf(store.retry_failed([seqs[1], 12345])), 1)
        self.assertEqual([r.seq for r in self.successResultOf(store.failed())], [seqs[0], seqs[2]])
        self.assertEqual(store.pending_count, 1)
        self.assertEqual(store.failed_count, 2)

    def test_drop(self) -> None:
        """
        Dropping deletes failed records for good, named ones or all.
        """
        store = self.open_store()
        result = self.successResultOf(store.commit([row(make_message(n)) for n in range(3)]))
        seqs = [result.first_seq + i for i in range(3)]
        self.successResultOf(store.commit([], [], [Failure(s, RETURNED, "r", 1.0) for s in seqs]))
        self.assertEqual(self.successResultOf(store.drop_failed([seqs[0]])), 1)
        self.assertEqual(store.failed_count, 2)
        self.assertEqual(self.successResultOf(store.drop_failed()), 2)
        self.assertEqual((store.failed_count, store.failed_bytes), (0, 0))
        self.assertEqual(self.successResultOf(store.failed()), [])
        self.assertEqual(store.pending_count, 0)

    def test_reopen_counts(self) -> None:
        """
        A reopened store counts what is on disk and names the oldest pending hand-over time.
        """
        directory = os.path.join(self.mktemp(), "o")
        store = self.open_store(directory)
        messages = [make_message(n) for n in range(4)]
        result = self.successResultOf(store.commit([row(m, created=float(n)) for n, m in enumerate(messages)]))
        self.successResultOf(store.commit([], [(result.first_seq, len(encode(messages[0])))]))
        self.successResultOf(store.commit([], [], [Failure(result.first_seq + 1, RETURNED, "r", 1.0)]))
        self.successResultOf(store.close())
        again = Store(directory, SynchronousExecutor())
        summary = self.successResultOf(again.open())
        self.addCleanup(again.close)
        self.assertEqual((summary.pending, summary.failed), (2, 1))
        self.assertEqual(summary.oldest_created, 2.0)
        self.assertEqual(again.pending_count, 2)
        self.assertEqual(again.pending_bytes, sum(len(encode(m)) for m in messages[2:]))
        self.assertEqual(again.failed_bytes, len(encode(messages[1])))
        # Sequence numbers are never reused.
        later = self.successResultOf(again.commit([row(make_message(5))]))
        self.assertGreater(later.first_seq, result.first_seq + 3)

    def test_locked(self) -> None:
        """
        A second store can not open an outbox that is open, and can once it is closed.
        """
        directory = os.path.join(self.mktemp(), "o")
        store = self.open_store(directory)
        second = Store(directory, SynchronousExecutor(), lock_timeout=0.05)
        failure = self.failureResultOf(second.open(), StoreError)
        self.assertTrue(failure.value.locked)
        self.successResultOf(store.close())
        self.successResultOf(second.open())
        self.successResultOf(second.close())

    def test_unknown_layout(self) -> None:
        """
        A database written by another layout version is refused.
        """
        directory = os.path.join(self.mktemp(), "o")
        store = self.open_store(directory)
        self.successResultOf(store.close())
        conn = sqlite3.connect(os.path.join(directory, DATABASE_NAME))
        try:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
            conn.commit()
        finally:
            conn.close()
        failure = self.failureResultOf(Store(directory, SynchronousExecutor()).open(), StoreError)
        self.assertIn("99", failure.value.reason)

    def test_not_a_directory(self) -> None:
        """
        A directory that can not be created is a StoreError from open.
        """
        path = self.mktemp()
        with open(path, "w"):
            pass
        failure = self.failureResultOf(Store(os.path.join(path, "sub"), SynchronousExecutor()).open(), StoreError)
        self.assertFalse(failure.value.disk_full)

    def test_database_a_directory(self) -> None:
        """
        A directory where the database should be is refused, saying so
        rather than SQLite's "unable to open database file" alone.
        """
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, DATABASE_NAME))
        error = self.failureResultOf(Store(directory, SynchronousExecutor()).open(), StoreError).value
        self.assertEqual(
            error.reason, "unable to open database file (it is a directory, not a database file)"
        )

    def test_read_only(self) -> None:
        """
        A database or a directory this user may not write is refused,
        saying so rather than SQLite's "disk I/O error" alone (tried as
        root, whom permissions do not stop, with C{os.access} saying no).
        """
        directory = self.mktemp()
        store = self.open_store(directory)
        self.successResultOf(store.commit([row(make_message(1))]))
        self.successResultOf(store.close())
        path = os.path.join(directory, DATABASE_NAME)
        denied: list[str] = []

        def access(name: str, mode: int, **kwargs: Any) -> bool:
            return os.fspath(name) not in denied

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(os, "access", access)
        from fedhub.outbox import store as module

        self.patch(module.sqlite3, "connect", refuse)
        for name, hint in (
            (path, "this user may not read and write it"),
            (directory, f"this user may not write its directory {directory}, where its log goes"),
        ):
            denied[:] = [name]
            error = self.failureResultOf(Store(directory, SynchronousExecutor()).open(), StoreError).value
            self.assertEqual(error.reason, f"disk I/O error ({hint})")
        denied[:] = []
        error = self.failureResultOf(Store(directory, SynchronousExecutor()).open(), StoreError).value
        self.assertEqual(error.reason, "disk I/O error")

    def test_closed(self) -> None:
        """
        A closed store refuses work with a StoreError.
        """
        store = self.open_store()
        self.successResultOf(store.close())
        self.failureResultOf(store.commit([row(make_message(1))]), StoreError)
        self.failureResultOf(store.load(0, 1), StoreError)


_KILL_CHILD = r"""
import os, sys, time
from fedhub.message import Message, from_amqp
from fedhub.outbox.store import Store, SynchronousExecutor, encode
store = Store(sys.argv[1], SynchronousExecutor())
store.open()
ids = []
for batch in range(5):
    messages = [Message.create("org.example.kill", {"b": batch, "i": i}) for i in range(20)]
    d = store.commit([(m.id, 1.0, encode(m)) for m in messages])
    d.addErrback(lambda f: (print("ERR", f.getErrorMessage(), flush=True), os._exit(3)))
    ids.extend(m.id for m in messages)
print(" ".join(ids), flush=True)
time.sleep(60)
"""


class FailedBatchTests(SynchronousTestCase):
    """
    Retrying or dropping a large failed area runs in transactions of at most
    L{FAILED_BATCH} records, between which the hub's commits run.
    """

    COUNT = 2 * FAILED_BATCH + 500

    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "outbox", "test")
        self.executor = ManualExecutor()
        self.store = Store(self.directory, self.executor, lock_timeout=0.05)
        self.store.open()
        self.executor.run_all()
        self.addCleanup(self.close)
        self.ids = [f"m-{n}" for n in range(self.COUNT)]
        data = encode(make_message(0))
        self.store.commit([(i, 1.0, data) for i in self.ids])
        self.executor.run_all()
        self.seqs = list(range(1, self.COUNT + 1))
        self.store.commit([], [], [Failure(s, RETURNED, "r", 2.0) for s in self.seqs])
        self.executor.run_all()
        self.assertEqual((self.store.pending_count, self.store.failed_count), (0, self.COUNT))

    def close(self) -> None:
        if self.store._db.conn is not None:
            self.store.close()
            self.executor.run_all()

    def ids_on_disk(self) -> tuple[list[str], list[str]]:
        """
        The message ids of the pending and of the failed messages, read by a
        store of its own, as a new process would find them.
        """
        store = Store(self.directory, SynchronousExecutor())
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        pending = [r.seq for r in self.successResultOf(store.load(0, 10 * self.COUNT))]
        conn = store._db.conn
        assert conn is not None
        by_seq = dict(conn.execute("SELECT seq, message_id FROM pending").fetchall())
        failed = [r.message_id for r in self.successResultOf(store.failed(0, 10 * self.COUNT))]
        self.successResultOf(store.close())
        return [by_seq[seq] for seq in pending], failed

    def test_retry_all_in_batches(self) -> None:
        """
        C{retry_failed()} moves a batch per call on the executor; a commit
        submitted meanwhile runs before the next batch; every record ends up
        pending once, in order; one that fails again meanwhile stays failed.
        """
        retried = self.store.retry_failed(now=5.0)
        self.assertEqual(len(self.executor.queue), 1)
        self.executor.run_one()
        self.assertNoResult(retried)
        self.assertEqual(self.store.failed_count, self.COUNT - FAILED_BATCH)
        self.assertEqual(self.store.pending_count, FAILED_BATCH)
        # The hub hands a message over and a retried one fails again.
        handed = self.store.commit(
            [("new", 6.0, encode(make_message(1)))], [], [Failure(self.COUNT + 1, RETURNED, "again", 6.0)]
        )
        self.executor.run_one()
        self.assertNoResult(handed)
        self.executor.run_one()
        self.assertEqual(self.successResultOf(handed).inserted, 1)
        self.assertNoResult(retried)
        self.executor.run_all()
        self.assertEqual(self.successResultOf(retried), self.COUNT)
        self.assertEqual(self.store.failed_count, 1)
        self.assertEqual(self.store.pending_count, self.COUNT)
        self.close()
        pending, failed = self.ids_on_disk()
        self.assertEqual(failed, [self.ids[0]])
        expected = self.ids[1 : 2 * FAILED_BATCH] + ["new"] + self.ids[2 * FAILED_BATCH :]
        self.assertEqual(pending, expected)

    def test_retry_named_in_batches(self) -> None:
        """
        Named records (as the running hub's requests name them) are moved a
        batch at a time too.
        """
        retried = self.store.retry_failed(list(reversed(self.seqs)) + [10**9], now=5.0)
        calls = 0
        while self.executor.queue:
            self.executor.run_one()
            calls += 1
            self.assertLessEqual(self.store.pending_count, calls * FAILED_BATCH)
        self.assertEqual(calls, 3)
        self.assertEqual(self.successResultOf(retried), self.COUNT)
        self.close()
        self.assertEqual(self.ids_on_disk(), (self.ids, []))

    def test_retry_interrupted(self) -> None:
        """
        A retry that stops between two batches (the store closed under it,
        as by a killed process) leaves each record either pending or still
        failed, once; retrying again moves the rest.
        """
        retried = self.store.retry_failed(now=5.0)
        self.executor.run_one()
        conn = self.store._db.conn
        assert conn is not None
        conn.close()
        self.store._db.conn = None
        self.executor.run_all()
        error = self.failureResultOf(retried, StoreError).value
        self.assertIn(f"after {FAILED_BATCH} of the messages were moved back to pending", error.reason)
        self.assertEqual(self.store.failed_count, self.COUNT - FAILED_BATCH)
        pending, failed = self.ids_on_disk()
        self.assertEqual(pending, self.ids[:FAILED_BATCH])
        self.assertEqual(failed, self.ids[FAILED_BATCH:])
        again = Store(self.directory, SynchronousExecutor())
        self.successResultOf(again.open())
        self.assertEqual(self.successResultOf(again.retry_failed(now=7.0)), self.COUNT - FAILED_BATCH)
        self.successResultOf(again.close())
        self.assertEqual(self.ids_on_disk(), (self.ids, []))

    def test_drop_all_in_batches(self) -> None:
        """
        C{drop_failed()} deletes a batch per transaction as well.
        """
        dropped = self.store.drop_failed()
        self.executor.run_one()
        self.assertEqual(self.store.failed_count, self.COUNT - FAILED_BATCH)
        self.executor.run_all()
        self.assertEqual(self.successResultOf(dropped), self.COUNT)
        self.close()
        self.assertEqual(self.ids_on_disk(), ([], []))


class KillTests(SynchronousTestCase):
    """
    What a commit wrote survives the death of the process by SIGKILL.
    """

    def test_sigkill(self) -> None:
        """
        Every committed message is found by a new store after the writer was killed with SIGKILL.
        """
        directory = os.path.join(self.mktemp(), "o")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path
        )
        child = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, directory],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline().decode()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        ids = line.split()
        self.assertEqual(len(ids), 100, line)
        self.assertEqual(child.returncode, -signal.SIGKILL)
        store = Store(directory, SynchronousExecutor())
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        rows = self.successResultOf(store.load(0, 1000))
        self.assertEqual([r.message().id for r in rows], ids)


class ThreadExecutorTests(TestCase):
    """
    L{ThreadExecutor} with the real reactor.
    """

    def test_runs_off_the_reactor_thread(self) -> Deferred[None]:
        """
        Store calls run in order on one thread that is not the reactor's, and close stops it.
        """
        return Deferred.fromCoroutine(self._run_off_the_reactor_thread())

    async def _run_off_the_reactor_thread(self) -> None:
        executor = ThreadExecutor(cast(Any, global_reactor))
        store = Store(os.path.join(self.mktemp(), "o"), executor)
        await store.open()
        threads: list[int] = []
        order: list[int] = []

        def note(n: int) -> int:
            threads.append(threading.get_ident())
            order.append(n)
            return n

        results = [await d for d in [executor.submit(note, n) for n in range(20)]]
        self.assertEqual(results, list(range(20)))
        self.assertEqual(order, list(range(20)))
        self.assertEqual(len(set(threads)), 1)
        self.assertNotEqual(threads[0], threading.get_ident())
        result = await store.commit([row(make_message(1))])
        self.assertEqual(result.inserted, 1)
        await store.close()
        self.assertIsNone(executor._pool)
        await self.assertFailure(executor.submit(note, 1), StoreError)



    def test_open_while_closing(self) -> Deferred[None]:
        """
        A store opened again while its close runs waits for the close and then works on a fresh thread.
        """
        return Deferred.fromCoroutine(self._open_while_closing())

    async def _open_while_closing(self) -> None:
        executor = ThreadExecutor(cast(Any, global_reactor))
        store = Store(os.path.join(self.mktemp(), "o"), executor)
        await store.open()
        closed = store.close()
        opened = store.open()
        await closed
        summary = await opened
        self.assertEqual(summary.pending, 0)
        self.assertTrue(store.is_open)
        result = await store.commit([row(make_message(1))])
        self.assertEqual(result.inserted, 1)
        await store.close()
        self.assertIsNone(executor._pool)


class CloseOrderTests(SynchronousTestCase):
    """
    Opening and closing a store while an earlier close is still running.
    """

    def test_open_waits_for_close(self) -> None:
        """An open issued while a close runs starts the executor again only after the close stopped it."""
        executor = ManualExecutor()
        store = Store(os.path.join(self.mktemp(), "o"), executor)
        opened = store.open()
        executor.run_all()
        self.successResultOf(opened)
        closed = store.close()
        again = store.open()
        self.assertEqual(len(executor.queue), 1)
        executor.run_all()
        self.successResultOf(closed)
        self.successResultOf(again)
        self.assertTrue(store.is_open)
        self.assertEqual((executor.started, executor.stopped), (2, 1))
        closed = store.close()
        executor.run_all()
        self.successResultOf(closed)
        self.assertEqual((executor.started, executor.stopped), (2, 2))

    def test_close_open_close(self) -> None:
        """A close, an open and a close issued together run in that order and leave the store closed."""
        executor = ManualExecutor()
        store = Store(os.path.join(self.mktemp(), "o"), executor)
        first = store.open()
        executor.run_all()
        self.successResultOf(first)
        closing = store.close()
        opening = store.open()
        closing_again = store.close()
        executor.run_all()
        self.successResultOf(closing)
        self.successResultOf(opening)
        self.successResultOf(closing_again)
        self.assertFalse(store.is_open)
        self.assertEqual((executor.started, executor.stopped), (2, 2))

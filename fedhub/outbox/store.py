"""
The durable on-disk store behind an outbox.

One store holds the messages of one domain in an SQLite database in WAL mode
with C{synchronous=FULL}, so a transaction is on disk (fsync'd) when its
commit returns.  The database has two tables:

  - C{pending}: messages handed over and not yet confirmed by the broker, in
    hand-over order (an C{AUTOINCREMENT} sequence that is never reused);
  - C{failed}: messages the broker returned or refused, with the reason, when
    it happened and how often; kept until an operator retries or drops them.

Every database call runs on one dedicated thread (an L{Executor}), so disk
I/O never blocks the reactor; the store's methods return Deferreds and its
counters are read and written in the reactor thread only.  The database is
opened with an exclusive lock: a second process (or a second store in the same
process) can not open the same outbox while it is in use, so two hubs never
drain one outbox.

The store knows nothing about brokers; L{fedhub.outbox.outbox.Outbox} decides
what to write.  It writes in batches: L{Store.commit} inserts, deletes and
moves many rows in one transaction, so they share one fsync.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from fedhub.errors import DecodeError, FedhubError, MessageError
from fedhub.message import Message, dump_line, iter_loads

_T = TypeVar("_T")

#: The file name of the database inside a store's directory.
DATABASE_NAME = "outbox.sqlite3"

#: The layout version written to the database; a store refuses others.
SCHEMA_VERSION = 1

#: Why a message is in the failed area.
RETURNED = "returned"
NACKED = "nacked"
REJECTED = "rejected"
UNREADABLE = "unreadable"
FAILURE_KINDS = (RETURNED, NACKED, REJECTED, UNREADABLE)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pending (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        data BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS failed (
        seq INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL,
        created REAL NOT NULL,
        failed_at REAL NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        data BLOB NOT NULL
    )
    """,
)


class StoreError(FedhubError):
    """
    The outbox store could not do what was asked.

    @ivar path: The database file concerned.
    @ivar reason: What went wrong, as SQLite or the OS said it.
    @ivar disk_full: C{True} when the disk (or the file system quota) is full:
        the condition may clear by itself once space is freed.
    @ivar locked: C{True} when another process or store holds the database.
    """

    def __init__(self, path: str, reason: str, *, disk_full: bool = False, locked: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.disk_full = disk_full
        self.locked = locked
        super().__init__(f"{path}: {reason}")


# --- executors ----------------------------------------------------------


class Executor(Protocol):
    """
    Runs blocking calls in order, one at a time, and reports their results
    in the reactor thread.
    """

    def start(self) -> None:
        """
        Get ready to run calls.
        """

    def stop(self) -> None:
        """
        Stop after the calls submitted so far; no more may be submitted.
        """

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} after every call submitted before it.

        @return: a Deferred firing, in the reactor thread, with its result
            or its exception.
        """


class _ThreadReactor(Protocol):
    """
    What L{ThreadExecutor} needs of a reactor.
    """

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Run a call in the reactor thread."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any:
        """Call something at a phase of a reactor event."""

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        """Undo L{addSystemEventTrigger}."""


class ThreadExecutor:
    """
    Runs calls on one dedicated thread (a Twisted thread pool of size one).

    The thread is started by L{start} and joined by L{stop}; should a service
    never be stopped, the reactor's shutdown stops it so it can not keep the
    process alive.

    @ivar name: The thread's name, shown by debuggers.
    """

    def __init__(self, reactor: _ThreadReactor, name: str = "fedhub-outbox") -> None:
        self.name = name
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger: Any = None

    def start(self) -> None:
        """
        Start the thread, unless it runs already.
        """
        if self._pool is not None:
            return
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self.name)
        self._pool.start()
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

    def _shutdown(self) -> None:
        self._trigger = None
        self.stop()

    def stop(self) -> None:
        """
        Finish the calls submitted so far and join the thread.
        """
        pool, self._pool = self._pool, None
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if pool is not None:
            pool.stop()

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run C{fn(*args)} on the thread.
        """
        if self._pool is None:
            return fail(StoreError(self.name, "the store's thread is not running"))
        return deferToThreadPool(self._reactor, self._pool, fn, *args)  # type: ignore[arg-type]


class SynchronousExecutor:
    """
    Runs every call at once, in the calling thread.

    For command-line tools that have nothing else to do while the disk works,
    and for tests.  It blocks, so a running hub never uses it.
    """

    def start(self) -> None:
        """
        Nothing to start.
        """

    def stop(self) -> None:
        """
        Nothing to stop.
        """

    def submit(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Call C{fn(*args)} now.
        """
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: B036 - reported through the Deferred
            return fail(e)
        return succeed(result)


# --- records ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRow:
    """
    One pending message as stored.

    @ivar seq: Its place in the outbox; larger means handed over later.
    @ivar created: When it was handed over (POSIX time).
    @ivar attempts: How often it went to the failed area before.
    @ivar data: The message in the serialized form (one UTF-8 line).
    """

    seq: int
    created: float
    attempts: int
    data: bytes

    def message(self) -> Message:
        """
        Decode the stored message.

        @raise fedhub.errors.DecodeError: when the row does not hold one.
        """
        return decode(self.data)


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """
    One message in the failed area.

    @ivar seq: Its sequence number when it failed; names it for
        L{Store.retry_failed} and L{Store.drop_failed}.
    @ivar message_id: The message's id.
    @ivar created: When it was handed over (POSIX time).
    @ivar failed_at: When it last failed (POSIX time).
    @ivar kind: One of L{FAILURE_KINDS}.
    @ivar reason: What the broker (or the decoder) said.
    @ivar attempts: How often it has failed so far.
    @ivar data: The message in the serialized form.
    """

    seq: int
    message_id: str
    created: float
    failed_at: float
    kind: str
    reason: str
    attempts: int
    data: bytes

    def message(self) -> Message:
        """
        Decode the stored message.

        @raise fedhub.errors.DecodeError: when the row does not hold one.
        """
        return decode(self.data)


@dataclass(frozen=True, slots=True)
class Failure:
    """
    An instruction to move a pending message to the failed area.

    @ivar seq: The pending message's sequence number.
    @ivar kind: One of L{FAILURE_KINDS}.
    @ivar reason: Why.
    @ivar failed_at: When (POSIX time).
    """

    seq: int
    kind: str
    reason: str
    failed_at: float


@dataclass(frozen=True, slots=True)
class CommitResult:
    """
    What one L{Store.commit} transaction did.

    @ivar first_seq: The sequence number of the first inserted row; the
        others follow without gaps.  0 when nothing was inserted.
    @ivar inserted: How many rows were inserted.
    @ivar deleted: How many pending rows were deleted.
    @ivar moved: How many pending rows were moved to the failed area.
    """

    first_seq: int
    inserted: int
    deleted: int
    moved: int


@dataclass(frozen=True, slots=True)
class Summary:
    """
    The state of a store as found when it was opened.

    @ivar pending: Pending messages.
    @ivar pending_bytes: Their stored size.
    @ivar failed: Messages in the failed area.
    @ivar failed_bytes: Their stored size.
    @ivar oldest_created: When the first pending message was handed over,
        or C{None} when there is none.
    """

    pending: int
    pending_bytes: int
    failed: int
    failed_bytes: int
    oldest_created: float | None


#: Encodes the parts of a stored record other than the body; made once,
#: because building an encoder costs as much as using it.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(message: Message) -> bytes:
    """
    The stored form of a message: one record of the serialized form, UTF-8
    encoded.  It keeps the id, the sent-at time and every header, so a
    message published again after a restart is the same message.

    The body is spliced in as the message already holds it encoded, rather
    than encoded again: that is most of the cost of a hand-over.

    @raise fedhub.errors.MessageError: when a header value can not be stored.
    """
    try:
        body = message.body_bytes
        if not body.startswith(b"{"):
            # Raw bytes from a broker may start with whitespace or a BOM.
            return dump_line(message).encode("utf-8")
        rest = _ENCODER.encode(
            {
                "headers": message.wire_headers(),
                "id": message.id,
                "priority": message.priority,
                "queue": message.queue,
                "topic": message.topic,
            }
        ).encode("utf-8")
        return b'{"body":' + body + b"," + rest[1:] + b"\n"
    except RecursionError:
        raise MessageError("message is nested too deeply to store") from None
    except (TypeError, ValueError) as e:
        raise MessageError(f"message can not be stored: {e}") from None


def decode(data: bytes) -> Message:
    """
    Decode a stored message (see L{encode}).

    @raise fedhub.errors.DecodeError: when C{data} is not one.
    """
    for message in iter_loads((data,)):
        return message
    raise DecodeError("stored record is empty")


# --- the database, used on the store's thread only ----------------------


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(error)
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def _is_locked(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return True
        return "database is locked" in str(error)
    return False


class _Database:
    """
    The SQLite connection and the blocking operations on it.  Every method
    runs on the store's thread.
    """

    def __init__(self, directory: str, lock_timeout: float) -> None:
        self.directory = directory
        self.path = os.path.join(directory, DATABASE_NAME)
        self.lock_timeout = lock_timeout
        self.conn: sqlite3.Connection | None = None

    def _error(self, error: BaseException) -> StoreError:
        if _is_locked(error):
            return StoreError(
                self.path, "the outbox is in use by another process or service", locked=True
            )
        return StoreError(self.path, str(error) or type(error).__name__, disk_full=_is_disk_full(error))

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            raise StoreError(self.path, "the store is not open")
        return self.conn

    def _rollback(self) -> None:
        conn = self.conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """
        Run C{work} in one write transaction and commit it (the commit waits
        for fsync).
        """
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            self._rollback()
            raise self._error(e) from e
        except BaseException:
            self._rollback()
            raise
        return result

    def open(self) -> Summary:
        if self.conn is not None:
            return self._summary(self.conn)
        conn: sqlite3.Connection | None = None
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            # Exclusive before the first access: WAL then keeps its index in
            # this process's memory, and nobody else can open the file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(self.path, f"could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(
                    self.path, f"unknown outbox layout version {row[0]} (this fedhub knows {SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
            summary = self._summary(conn)
        except BaseException as e:
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            if isinstance(e, (sqlite3.Error, OSError)):
                raise self._error(e) from e
            raise
        self.conn = conn
        return summary

    def _summary(self, conn: sqlite3.Connection) -> Summary:
        pending, pending_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM pending"
        ).fetchone()
        failed, failed_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM failed"
        ).fetchone()
        oldest = conn.execute("SELECT created FROM pending ORDER BY seq LIMIT 1").fetchone()
        return Summary(
            pending=pending,
            pending_bytes=pending_bytes,
            failed=failed,
            failed_bytes=failed_bytes,
            oldest_created=None if oldest is None else oldest[0],
        )

    def commit(
        self,
        inserts: Sequence[tuple[str, float, bytes]],
        deletes: Sequence[int],
        failures: Sequence[Failure],
    ) -> tuple[CommitResult, int, int | None]:
        """
        @return: the result, the bytes moved to the failed area and, when a
            delete found fewer rows than asked, the pending bytes recounted.
        """

        def work(conn: sqlite3.Connection) -> tuple[CommitResult, int, int | None]:
            first = 0
            if inserts:
                conn.executemany(
                    "INSERT INTO pending (message_id, created, data) VALUES (?, ?, ?)", inserts
                )
                # One writer holds the database, so the rows of one
                # executemany get consecutive numbers.
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                first = last - len(inserts) + 1
            moved = 0
            moved_bytes = 0
            for failure in failures:
                row = conn.execute(
                    "SELECT length(data) FROM pending WHERE seq = ?", (failure.seq,)
                ).fetchone()
                if row is None:
                    continue
                conn.execute(
                    "INSERT INTO failed (seq, message_id, created, failed_at, kind, reason,"
                    " attempts, data) SELECT seq, message_id, created, ?, ?, ?, attempts + 1,"
                    " data FROM pending WHERE seq = ?",
                    (failure.failed_at, failure.kind, failure.reason, failure.seq),
                )
                conn.execute("DELETE FROM pending WHERE seq = ?", (failure.seq,))
                moved += 1
                moved_bytes += row[0]
            deleted = 0
            recount: int | None = None
            if deletes:
                cursor = conn.executemany(
                    "DELETE FROM pending WHERE seq = ?", [(seq,) for seq in deletes]
                )
                deleted = cursor.rowcount
                if deleted != len(deletes):
                    recount = conn.execute(
                        "SELECT coalesce(sum(length(data)), 0) FROM pending"
                    ).fetchone()[0]
            return CommitResult(first, len(inserts), deleted, moved), moved_bytes, recount

        return self._write(work)

    def load(self, after_seq: int, limit: int) -> list[StoredRow]:
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT seq, created, attempts, data FROM pending WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e
        return [StoredRow(seq, created, attempts, bytes(data)) for seq, created, attempts, data in rows]

    def failed(self, after_seq: int, limit: int) -> list[FailedRecord]:
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT seq, message_id, created, failed_at, kind, reason, attempts, data"
                " FROM failed WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from e
        return [
            FailedRecord(seq, message_id, created, failed_at, kind, reason, attempts, bytes(data))
            for seq, message_id, created, failed_at, kind, reason, attempts, data in rows
        ]

    def _select_failed(self, conn: sqlite3.Connection, seqs: Sequence[int] | None) -> list[tuple[int, int]]:
        if seqs is None:
            return list(conn.execute("SELECT seq, length(data) FROM failed ORDER BY seq"))
        found = []
        for seq in sorted(set(seqs)):
            row = conn.execute("SELECT seq, length(data) FROM failed WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                found.append((row[0], row[1]))
        return found

    def retry_failed(self, seqs: Sequence[int] | None, now: float) -> tuple[int, int]:
        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = self._select_failed(conn, seqs)
            for seq, _ in rows:
                conn.execute(
                    "INSERT INTO pending (message_id, created, attempts, data)"
                    " SELECT message_id, ?, attempts, data FROM failed WHERE seq = ?",
                    (now, seq),
                )
                conn.execute("DELETE FROM failed WHERE seq = ?", (seq,))
            return len(rows), sum(size for _, size in rows)

        return self._write(work)

    def drop_failed(self, seqs: Sequence[int] | None) -> tuple[int, int]:
        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = self._select_failed(conn, seqs)
            conn.executemany("DELETE FROM failed WHERE seq = ?", [(seq,) for seq, _ in rows])
            return len(rows), sum(size for _, size in rows)

        return self._write(work)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as e:
                raise self._error(e) from e


# --- the store ----------------------------------------------------------


class Store:
    """
    The durable store of one domain's outbox, in C{<directory>/outbox.sqlite3}.

    Every method that touches the disk returns a Deferred and runs on the
    executor's thread, in call order.  The counters (L{pending_count} and
    friends) describe committed state, are kept in memory and cost nothing to
    read; they are valid once L{open} has fired.

    @ivar directory: The directory holding the database.
    @ivar path: The database file.
    @ivar pending_count: Pending messages.
    @ivar pending_bytes: Their stored size, in bytes.
    @ivar failed_count: Messages in the failed area.
    @ivar failed_bytes: Their stored size, in bytes.
    @ivar transactions: How many L{commit} transactions have succeeded.
    @ivar commit_hook: When set, called in the reactor thread with the
        L{CommitResult} of every successful L{commit}.
    """

    def __init__(
        self, directory: str, executor: Executor, *, lock_timeout: float = 1.0
    ) -> None:
        """
        @param directory: Where the database lives; created on L{open}.
        @param executor: Runs the blocking calls; the store starts it in
            L{open} and stops it in L{close}.
        @param lock_timeout: How long L{open} waits for another holder of the
            database to let go before it fails.
        """
        self.directory = directory
        self._db = _Database(directory, lock_timeout)
        self.path = self._db.path
        self._executor = executor
        self._started = False
        self.is_open = False
        self.pending_count = 0
        self.pending_bytes = 0
        self.failed_count = 0
        self.failed_bytes = 0
        self.transactions = 0
        self.commit_hook: Callable[[CommitResult], None] | None = None

    def open(self) -> Deferred[Summary]:
        """
        Create or open the database, and count what it holds.

        @return: a Deferred firing with a L{Summary}, or failing with
            L{StoreError} (C{locked} set when another holder has it).
        """
        if not self._started:
            self._executor.start()
            self._started = True
        d = self._executor.submit(self._db.open)

        def opened(summary: Summary) -> Summary:
            self.is_open = True
            self.pending_count = summary.pending
            self.pending_bytes = summary.pending_bytes
            self.failed_count = summary.failed
            self.failed_bytes = summary.failed_bytes
            return summary

        return d.addCallback(opened)

    def commit(
        self,
        inserts: Sequence[tuple[str, float, bytes]],
        deletes: Sequence[tuple[int, int]] = (),
        failures: Sequence[Failure] = (),
    ) -> Deferred[CommitResult]:
        """
        In one transaction: append new pending messages, delete confirmed
        ones and move failed ones to the failed area.  It fires once the
        transaction is on disk.

        @param inserts: C{(message_id, created, data)} for each new message,
            in order; see L{encode} for C{data}.
        @param deletes: C{(seq, size)} of each pending message to delete,
            C{size} being the length of its data as stored.
        @param failures: The pending messages to move to the failed area.
        @return: a Deferred firing with a L{CommitResult}, or failing with
            L{StoreError} (C{disk_full} set when the disk is full); then
            nothing of it was written.
        """
        delete_seqs = [seq for seq, _ in deletes]
        delete_bytes = sum(size for _, size in deletes)
        d = self._executor.submit(self._db.commit, list(inserts), delete_seqs, list(failures))

        def committed(outcome: tuple[CommitResult, int, int | None]) -> CommitResult:
            result, moved_bytes, recount = outcome
            self.pending_count += result.inserted - result.deleted - result.moved
            self.failed_count += result.moved
            self.failed_bytes += moved_bytes
            if recount is not None:
                self.pending_bytes = recount
            else:
                self.pending_bytes += sum(len(row[2]) for row in inserts) - delete_bytes - moved_bytes
            self.transactions += 1
            if self.commit_hook is not None:
                self.commit_hook(result)
            return result

        return d.addCallback(committed)

    def load(self, after_seq: int, limit: int) -> Deferred[list[StoredRow]]:
        """
        Read pending messages back, oldest first.

        @param after_seq: Only those with a larger sequence number.
        @param limit: At most this many.
        """
        return self._executor.submit(self._db.load, after_seq, limit)

    def failed(self, after_seq: int = 0, limit: int = 100) -> Deferred[list[FailedRecord]]:
        """
        List the failed area, oldest failure first, a page at a time.

        @param after_seq: Only records with a larger sequence number (the
            last C{seq} of the previous page).
        @param limit: At most this many.
        """
        return self._executor.submit(self._db.failed, after_seq, limit)

    def retry_failed(self, seqs: Iterable[int] | None = None, now: float = 0.0) -> Deferred[int]:
        """
        Move messages from the failed area back to the end of the pending
        ones, to be published again.

        @param seqs: The records to retry (by L{FailedRecord.seq}); C{None}
            retries every one.  Unknown ones are ignored.
        @param now: The time they count as handed over again.
        @return: a Deferred firing with how many were moved.
        """
        chosen = None if seqs is None else list(seqs)
        d = self._executor.submit(self._db.retry_failed, chosen, now)

        def moved(outcome: tuple[int, int]) -> int:
            count, size = outcome
            self.failed_count -= count
            self.failed_bytes -= size
            self.pending_count += count
            self.pending_bytes += size
            return count

        return d.addCallback(moved)

    def drop_failed(self, seqs: Iterable[int] | None = None) -> Deferred[int]:
        """
        Delete messages from the failed area for good.

        @param seqs: The records to drop; C{None} drops every one.
        @return: a Deferred firing with how many were dropped.
        """
        chosen = None if seqs is None else list(seqs)
        d = self._executor.submit(self._db.drop_failed, chosen)

        def dropped(outcome: tuple[int, int]) -> int:
            count, size = outcome
            self.failed_count -= count
            self.failed_bytes -= size
            return count

        return d.addCallback(dropped)

    def close(self) -> Deferred[None]:
        """
        Close the database after every call submitted before, then stop the
        executor.
        """
        if not self._started:
            return succeed(None)
        d = self._executor.submit(self._db.close)

        def stop(result: object) -> object:
            self.is_open = False
            self._started = False
            self._executor.stop()
            return result

        return d.addBoth(stop)

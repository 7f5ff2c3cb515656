"""
Salvaging the readable messages of a damaged outbox database.

A page of the database that can no longer be read (a bad disk sector, a
file damaged by something else) fails every read of the rows on it: the
outbox can not read its backlog past that point, and publishes nothing
after it (C{outbox_error} on C{/ready}).  Neither the hub nor C{fedhub
outbox} can read or delete such a row through the store.

L{salvage} works on a stopped hub's outbox.  It reads both tables row by
row where a batch fails, copies every row it can read, with its sequence
number, into a new database, and puts the new database in the place of the
old one, which it keeps next to it (C{outbox-damaged-<time>.sqlite3}).  It
reports what could not be read: the sequence numbers (and, when they can
still be read, the message ids) of the rows whose message is unreadable,
and the ranges of sequence numbers whose rows can not even be listed (a
damaged page of the table itself: which numbers it held can not be told).

The new database continues the old sequence numbers (none is used twice),
so the hub publishes the salvaged backlog in its order.  A store whose
messages all read but whose other parts do not (its layout version, the
record of the sequence numbers given, an index or free page SQLite's check
finds damaged: the store would fail to open or to write) is rebuilt the same
way.  A store that reads whole is left as it is.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fedhub.outbox.store import _SCHEMA, DATABASE_NAME, SCHEMA_VERSION, _is_locked

#: Rows read per statement while none fails.
BATCH = 1000

#: Where the new database is built, in the outbox's directory.
BUILDING_NAME = "outbox-salvaging.sqlite3"

_COLUMNS = {
    "pending": ("seq", "message_id", "created", "attempts", "data"),
    "failed": ("seq", "message_id", "created", "failed_at", "kind", "reason", "attempts", "data"),
}


class SalvageError(Exception):
    """
    The salvage could not be done; nothing was changed.

    @ivar locked: Whether another process holds the database.
    """

    def __init__(self, reason: str, *, locked: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.locked = locked


@dataclass
class Lost:
    """
    What one table lost.

    @ivar rows: C{(seq, message_id)} of each row whose message can not be
        read; C{message_id} is C{None} when that can not be read either.
    @ivar ranges: C{(after, before)}: the rows with a sequence number
        between these (exclusive; C{before} C{None}: to the end) can not
        be listed.
    """

    rows: list[tuple[int, str | None]] = field(default_factory=list)
    ranges: list[tuple[int, int | None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.ranges)


@dataclass
class SalvageReport:
    """
    What L{salvage} found and did.

    @ivar pending: Pending messages read (and copied, when C{kept} is set).
    @ivar failed: Messages of the failed area read (and copied).
    @ivar lost_pending: What the pending messages lost.
    @ivar lost_failed: What the failed area lost.
    @ivar broken: What else of the database, outside the messages, is
        damaged (its layout version, the record of the sequence numbers
        given, a page SQLite's check finds bad): the store may fail to open
        or to write with every message readable.
    @ivar kept: Where the damaged database was kept, or C{None} when it
        read whole and was left as it was.
    @ivar log_kept: Where a copy of the database's log (C{-wal}) was kept as
        it was found, before SQLite read it (and dropped what of it fails
        its checksums), or C{None} when there was none.
    """

    pending: int = 0
    failed: int = 0
    lost_pending: Lost = field(default_factory=Lost)
    lost_failed: Lost = field(default_factory=Lost)
    broken: list[str] = field(default_factory=list)
    kept: str | None = None
    log_kept: str | None = None

    @property
    def damaged(self) -> bool:
        """
        Whether anything could not be read.
        """
        return bool(self.lost_pending or self.lost_failed or self.broken)


_ROW, _LOST, _GAP = "row", "lost", "gap"


def _rows(conn: sqlite3.Connection, table: str, upper: int) -> Iterator[tuple[str, tuple[object, ...]]]:
    """
    Every row of C{table} in order, as C{("row", values)}; each row that can
    not be read as C{("lost", (seq, message_id))}; each range of rows that
    can not be listed as C{("gap", (after, before))}.

    Rows are read a batch at a time; from a batch that fails, the rows
    before the failure are kept, then the following ones are found and read
    one at a time for a batch's length.  Where even finding the next row
    fails, the next sequence number from which rows can be found is looked
    for, up to C{upper}.
    """
    columns = ", ".join(_COLUMNS[table])
    # Each statement starts from a number (seq >= start), never after one:
    # the search for the row after the last one read would go into the
    # damaged page that held its successor.
    start = 0
    while True:
        count = 0
        try:
            for values in conn.execute(
                f"SELECT {columns} FROM {table} WHERE seq >= ? ORDER BY seq LIMIT ?", (start, BATCH)
            ):
                count += 1
                start = values[0] + 1
                yield _ROW, values
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
        else:
            if count < BATCH:
                return
            continue
        # Something in the next rows can not be read (and a statement reads
        # a row ahead of the one it returns): a row at a time, each found by
        # a statement of its own that reads no message.
        for _ in range(BATCH):
            works, seq = _first_from(conn, table, start)
            if not works:
                following = _next_key(conn, table, start - 1, upper)
                yield _GAP, (start - 1, following)
                if following is None:
                    return
                start = following
                break
            if seq is None:
                return
            try:
                values = conn.execute(f"SELECT {columns} FROM {table} WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.DatabaseError as e:
                if _is_locked(e):
                    raise
                yield _LOST, (seq, _message_id(conn, table, seq))
            else:
                if values is not None:
                    yield _ROW, values
            start = seq + 1


def _message_id(conn: sqlite3.Connection, table: str, seq: int) -> str | None:
    try:
        row = conn.execute(f"SELECT message_id FROM {table} WHERE seq = ?", (seq,)).fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None else str(row[0])


def _first_from(conn: sqlite3.Connection, table: str, start: int) -> tuple[bool, int | None]:
    """
    Whether the rows from C{start} on can be listed, and the first one's
    sequence number (C{None}: there is none).
    """
    try:
        row = conn.execute(f"SELECT seq FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1", (start,)).fetchone()
    except sqlite3.DatabaseError as e:
        if _is_locked(e):
            raise
        return False, None
    return True, None if row is None else int(row[0])


def _next_key(conn: sqlite3.Connection, table: str, after: int, upper: int) -> int | None:
    """
    The first sequence number after a damaged part of C{table} from which
    rows can be listed again, or C{None}: steps that double from C{after},
    then halving back to the first start that works.
    """
    failing = after
    step = 1
    while True:
        start = after + step
        if start > upper:
            start = upper + 1
        works, first = _first_from(conn, table, start)
        if works:
            break
        if start > upper:
            return None
        failing = start
        step *= 2
    # The damaged part ends between failing and start.
    low, high = failing + 1, start
    while low < high:
        middle = (low + high) // 2
        works_there, first_there = _first_from(conn, table, middle)
        if works_there:
            high, first = middle, first_there
        else:
            low = middle + 1
    return first


def _upper(conn: sqlite3.Connection) -> int:
    """
    The largest sequence number the store has given (or a bound on it).
    """
    candidates = [0]
    for sql in (
        "SELECT seq FROM sqlite_sequence WHERE name = 'pending'",
        "SELECT max(seq) FROM pending",
        "SELECT max(seq) FROM failed",
    ):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
            continue
        if row is not None and row[0] is not None:
            candidates.append(int(row[0]))
    return max(candidates)


def _schema(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError:
        return str(SCHEMA_VERSION)
    return str(SCHEMA_VERSION) if row is None else str(row[0])


def _broken(conn: sqlite3.Connection) -> list[str]:
    """
    What the store needs besides its messages and can not read: its layout
    version (read at every open), the sequence numbers given (read at every
    hand-over), and any page SQLite's own check finds damaged (an index, the
    list of free pages: a write that meets it fails).
    """
    broken = []
    for what, sql in (
        ("the outbox layout version (table meta)", "SELECT value FROM meta WHERE key = 'schema'"),
        ("the sequence numbers given (table sqlite_sequence)", "SELECT seq FROM sqlite_sequence"),
    ):
        try:
            conn.execute(sql).fetchall()
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
            broken.append(f"{what}: {e}")
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)")]
    except sqlite3.DatabaseError as e:
        if _is_locked(e):
            raise
        found = [str(e)]
    if found != ["ok"]:
        broken.append("SQLite's check of the file: " + "; ".join(found))
    return broken


def _walk(
    conn: sqlite3.Connection, upper: int, report: SalvageReport, copy: sqlite3.Connection | None
) -> int:
    """
    Read both tables into C{report}, inserting what reads into C{copy}.

    @return: the largest sequence number seen.
    """
    largest = 0
    for table in ("pending", "failed"):
        lost = report.lost_pending if table == "pending" else report.lost_failed
        insert = (
            f"INSERT INTO {table} ({', '.join(_COLUMNS[table])}) VALUES "
            f"({', '.join('?' * len(_COLUMNS[table]))})"
        )
        count = 0
        for kind, values in _rows(conn, table, upper):
            if kind == _ROW:
                count += 1
                seq = values[0]
                assert isinstance(seq, int)
                largest = max(largest, seq)
                if copy is not None:
                    copy.execute(insert, values)
            elif kind == _LOST:
                seq, message_id = values
                assert isinstance(seq, int)
                largest = max(largest, seq)
                lost.rows.append((seq, None if message_id is None else str(message_id)))
            else:
                start, end = values
                assert isinstance(start, int)
                lost.ranges.append((start, None if end is None else int(str(end))))
        if table == "pending":
            report.pending = count
        else:
            report.failed = count
    return largest


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=0.5, isolation_level=None, check_same_thread=False)
    # Held from the first read to the close: no hub opens the database
    # meanwhile.
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    return conn


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def salvage(directory: str, *, now: float | None = None) -> SalvageReport:
    """
    Check the outbox database in C{directory}, and when some of it can not
    be read, replace it with a new one holding everything that can.

    The hub must be stopped: the database is opened exclusively, and a hub
    holding it makes this fail with C{locked} set.

    @param now: The time named in the kept database's file name.
    @raise SalvageError: when it can not be done (nothing was changed).
    """
    path = os.path.join(directory, DATABASE_NAME)
    report = SalvageReport()
    # SQLite would take a missing or empty file for a new database (and
    # throw its log away): the store refuses those, and so does this.
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise SalvageError(f"can not open {path}: {e.strerror or e}") from None
    if not size:
        raise SalvageError(f"{path} is empty: there is nothing in it to salvage")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    # SQLite stops reading a log at its first frame that fails its checksum,
    # and drops the rest with the log once it brings the log in: a copy of
    # the log as found keeps those frames for whoever looks into the damage.
    log_kept = _keep_log(path, stamp)
    try:
        conn = _connect(path)
    except sqlite3.Error as e:
        raise SalvageError(f"can not open {path}: {e}") from None
    try:
        try:
            # Takes the exclusive lock, and brings the log in.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            upper = _upper(conn)
            _walk(conn, upper, report, None)
            if not report.damaged:
                report.broken = _broken(conn)
            broken = report.broken
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise SalvageError(f"{path} is in use by another process", locked=True) from None
            raise SalvageError(f"can not read {path}: {e}") from None
        if not report.damaged:
            report.log_kept = log_kept
            return report
        report = SalvageReport(broken=broken, log_kept=log_kept)
        building = os.path.join(directory, BUILDING_NAME)
        try:
            _build(conn, building, upper, report)
            # The log, if any, into the file: the kept copy is then whole
            # without it, and no log of the old file is left beside the new.
            conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        except (sqlite3.Error, OSError) as e:
            _remove(building)
            raise SalvageError(f"can not write the salvaged messages next to {path}: {e}") from None
    finally:
        conn.close()
    try:
        if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal"):
            raise SalvageError(f"the log {path}-wal could not be brought into {path}")
        stat = os.stat(path)
        os.chmod(building, stat.st_mode & 0o777)
        if os.geteuid() == 0:
            os.chown(building, stat.st_uid, stat.st_gid)
        kept = os.path.join(directory, f"outbox-damaged-{stamp}.sqlite3")
        number = 1
        while os.path.lexists(kept):
            number += 1
            kept = os.path.join(directory, f"outbox-damaged-{stamp}-{number}.sqlite3")
        # Kept first, then replaced: at every moment the outbox's file is
        # the old database or the new one.
        os.link(path, kept)
        _fsync_directory(directory)
        os.replace(building, path)
        _fsync_directory(directory)
    except SalvageError:
        _remove(building)
        raise
    except OSError as e:
        _remove(building)
        raise SalvageError(f"can not put the salvaged database in place of {path}: {e}") from None
    report.kept = kept
    return report


def _keep_log(path: str, stamp: str) -> str | None:
    """
    Copy the log of the database at C{path}, if it holds anything, to
    C{outbox-log-<stamp>.sqlite3-wal} beside it (fsync'd); where it went.

    @raise SalvageError: when it can not be copied (nothing was changed).
    """
    log = path + "-wal"
    try:
        if not os.path.getsize(log):
            return None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SalvageError(f"can not read the log {log}: {e.strerror or e}") from None
    directory = os.path.dirname(path)
    kept = os.path.join(directory, f"outbox-log-{stamp}.sqlite3-wal")
    number = 1
    while os.path.lexists(kept):
        number += 1
        kept = os.path.join(directory, f"outbox-log-{stamp}-{number}.sqlite3-wal")
    try:
        with open(log, "rb") as source, open(kept, "xb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fsync(copy.fileno())
        os.chmod(kept, os.stat(log).st_mode & 0o777)
        _fsync_directory(directory)
    except OSError as e:
        _remove(kept)
        raise SalvageError(f"can not keep a copy of the log {log}: {e.strerror or e}") from None
    return kept


def _build(conn: sqlite3.Connection, building: str, upper: int, report: SalvageReport) -> None:
    """
    Copy what reads into a new database at C{building}, continuing the old
    sequence numbers.
    """
    _remove(building)
    copy = sqlite3.connect(building, isolation_level=None)
    try:
        copy.execute("PRAGMA synchronous=FULL")
        copy.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            copy.execute(statement)
        copy.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (_schema(conn),))
        largest = max(_walk(conn, upper, report, copy), upper)
        for start, end in report.lost_pending.ranges + report.lost_failed.ranges:
            largest = max(largest, start, end or 0)
        # No sequence number is given twice, not even one lost.
        copy.execute("DELETE FROM sqlite_sequence WHERE name = 'pending'")
        copy.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('pending', ?)", (largest,))
        copy.execute("COMMIT")
    finally:
        copy.close()


def _remove(path: str) -> None:
    for name in (path, path + "-journal"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
